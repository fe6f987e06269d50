"""The random weights every peer's files get: benchmarks/train_step.py's rule for ours and ComfyUI's model.

A weight of two or more dimensions is randn / sqrt(fan_in) (fan_in: all but its first dimension, so a Linear or a
conv keeps unit gain), a norm's gain (a 1-D tensor named ...norm..., not a bias) is 1, every other 1-D tensor 0.
Unit gain matters: normal(0, 0.02) grows the activations by up to 2.5x per layer through Flux's 57 blocks
(ai-toolkit's loss went non-finite after its first step on such a model, 2026-12-02).
"""
import math

import torch


def random_value(name: str, shape, generator: torch.Generator, device) -> torch.Tensor:
    shape = tuple(shape)
    if len(shape) < 2:
        gain = "norm" in name and not name.endswith("bias")
        return (torch.ones if gain else torch.zeros)(shape, device=device)
    return torch.randn(shape, device=device, generator=generator) / math.sqrt(math.prod(shape[1:]))


@torch.no_grad()
def refill(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter of ``model`` in place, on its own device and in its own dtype."""
    generators = {}
    for name, p in model.named_parameters():
        g = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.copy_(random_value(name, p.shape, g, p.device).to(p.dtype))
    return model
