"""Training samples (VAE latents paired with their text conditioning) and how they are drawn into batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainingSample:
    latent: torch.Tensor  # [16, h, w] raw VAE latent, as VAEEncode returns it
    context: torch.Tensor  # [tokens, context_dim] T5 hidden states
    pooled: torch.Tensor  # [vec_dim] CLIP-L pooled output
    caption: str | None = None
    repeats: int = 1  # kohya "N_name" folders: drawn N times per epoch

    def batch_key(self) -> tuple:
        """Samples with equal keys can share a batch: same image size and same caption length."""
        return tuple(self.latent.shape) + tuple(self.context.shape)


@dataclass
class TrainingDataset:
    """The DEV2PRO_DATASET value: the samples training draws from, and the encoded empty caption (for dropout)."""

    samples: list[TrainingSample]
    empty_caption: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self):
        if not self.samples:
            raise ValueError("a training dataset needs at least one sample")

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


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (splitmix64 steps), so each (seed, step, ...) has its own stream."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_batches(dataset: TrainingDataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch as sample indices, a pure function of its arguments.

    Each sample appears ``repeats`` times. Batches only group samples of one batch key (image size and caption
    length); a key's last batch may be smaller. Order within keys and of the batches is shuffled per epoch.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, 1, epoch))
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(dataset.samples):
        groups.setdefault(sample.batch_key(), []).extend([i] * sample.repeats)
    batches = []
    for key in sorted(groups):
        members = groups[key]
        order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        batches += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]


class BatchPlan:
    """Which samples micro-batch ``k`` (0-based, over the whole run) trains on; resumable from any ``k``."""

    def __init__(self, dataset: TrainingDataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._epoch, self._batches = 0, epoch_batches(dataset, batch_size, seed, 0)
        self.per_epoch = len(self._batches)

    def batch(self, k: int) -> list[int]:
        epoch, index = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.dataset, self.batch_size, self.seed, epoch)
        return self._batches[index]
