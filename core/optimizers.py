"""The optimizers the trainer offers, built from validated settings."""
from __future__ import annotations

import torch

from .config import TrainConfig


class MissingPackage(RuntimeError):
    pass


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused kernels, which can skip a NaN step on the device), torch's Adafactor, or Prodigy from the ``prodigyopt`` package.

    Prodigy estimates the step size itself: its learning rate is a multiplier, 1.0 as its authors advise.
    """
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                 fused=device.type in ("cuda", "cpu"))
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    try:
        from prodigyopt import Prodigy
    except ImportError as e:
        raise MissingPackage("the Prodigy optimizer needs the prodigyopt package: run "
                             "'pip install prodigyopt' in ComfyUI's Python environment and restart ComfyUI") from e
    return Prodigy(params, lr=config.learning_rate, weight_decay=config.weight_decay, safeguard_warmup=config.warmup_steps > 0)
