"""Training samples: VAE latents paired with their text conditioning."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainingSample:
    latent: torch.Tensor  # [16, h, w] raw VAE latent, as VAEEncode returns it
    context: torch.Tensor  # [tokens, context_dim] T5 hidden states
    pooled: torch.Tensor  # [vec_dim] CLIP-L pooled output


class TrainingDataset:
    """The DEV2PRO_DATASET value: a list of samples that training draws from."""

    def __init__(self, samples: list[TrainingSample]):
        if not samples:
            raise ValueError("a training dataset needs at least one sample")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def from_batches(cls, latents: torch.Tensor, conds: list[tuple[torch.Tensor, torch.Tensor]]) -> "TrainingDataset":
        """Pair a latent batch [N, C, h, w] with ``conds``: one (context, pooled) for all images, or one per image.

        Tensors are copied outside inference mode: ComfyUI creates them under ``torch.inference_mode()``, and
        autograd refuses to save such tensors for backward.
        """
        n = latents.shape[0]
        if len(conds) not in (1, n):
            raise ValueError(f"got {n} latents but {len(conds)} conditionings; give one for all images or one per image")
        with torch.inference_mode(False):
            samples = []
            for i in range(n):
                context, pooled = conds[i if len(conds) == n else 0]
                samples.append(TrainingSample(latents[i].clone(), context.clone(), pooled.clone()))
        return cls(samples)
