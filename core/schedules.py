"""Timestep sampling and learning-rate schedules: pure functions of the settings, the step and a generator."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def flux_shift_mu(image_tokens: int) -> float:
    """Flux's resolution-dependent shift: 0.5 at 256 tokens (256x256 px) to 1.15 at 4096 (1024x1024 px)."""
    return 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift ``s t / (1 + (s - 1) t)``: s > 1 moves training towards noisier steps."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(config: TrainConfig, batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` flow times in (0, 1), 1 being pure noise, drawn as ``config.timestep_sampling`` says.

    - ``flux_shift``: sigmoid(scale * N(0, 1)), shifted by exp(mu) for the image size, as Flux-dev samples;
    - ``shift``: sigmoid(scale * N(0, 1)), shifted by the fixed ``config.shift``;
    - ``sigmoid``: sigmoid(scale * N(0, 1));
    - ``logit_normal``: sigmoid(N(mean, std)) (SD3's logit-normal);
    - ``uniform``: U(0, 1).
    """
    mode = config.timestep_sampling
    if mode == "uniform":
        return torch.rand(batch, generator=generator)
    if mode == "logit_normal":
        return torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(batch, generator=generator))
    t = torch.sigmoid(config.sigmoid_scale * torch.randn(batch, generator=generator))
    if mode == "flux_shift":
        return shift_timesteps(t, math.exp(flux_shift_mu(image_tokens)))
    if mode == "shift":
        return shift_timesteps(t, config.shift)
    return t


def lr_multiplier(config: TrainConfig, step: int) -> float:
    """Factor on the learning rate at optimizer step ``step`` (1-based).

    Linear warmup over ``warmup_steps`` from 1/warmup to 1, then ``constant`` 1, or ``linear`` / ``cosine`` decay
    that reaches 1/n of the rate at the last of the n remaining steps (never 0, so no step is wasted).
    """
    step -= config.schedule_start  # a continued run with a new rate: its schedule spans the steps it adds
    warmup = config.warmup_steps
    if step <= warmup:
        return step / warmup
    if config.lr_schedule == "constant":
        return 1.0
    remaining = config.steps - config.schedule_start - warmup
    progress = (step - warmup - 1) / remaining  # 0 at the first decaying step, (n-1)/n at the last
    if config.lr_schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
