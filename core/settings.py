"""Every training setting, defined once: default, range, widget step, help and check.

``TrainConfig`` takes its defaults from here and validates against these ranges; the nodes build their inputs from
here (``nodes/common.py: setting_input``); the help pages' tables are generated from the nodes
(``scripts/build_docs.py``). So the UI, the API and the docs cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("adamw", "adafactor", "prodigy")
LR_SCHEDULES = ("constant", "linear", "cosine")
TIMESTEP_SAMPLINGS = ("flux_shift", "shift", "sigmoid", "logit_normal", "uniform")
LOSSES = ("mse", "huber")
COMPILE_MODES = ("auto", "on", "off")  # auto: compile on CUDA, where it pays; eager elsewhere
FP8_MATMUL_MODES = ("auto", "off", "on")  # auto: on where the GPU and the base can do it
FLUX_BLOCKS = 57  # Flux.1: 19 double + 38 single blocks
MAX_STEPS = 100000


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # "int", "float", "bool", "combo"
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None  # the widget's increment
    round: float | None = None  # the widget's rounding (floats): small enough for the smallest sensible value
    options: tuple[str, ...] = ()
    node: str = "train"  # where it is an input: "train" (Train LoRA), "advanced" (Advanced Training Settings)
    optional: bool = True  # an optional node input (old workflows without it load with the default)

    def problem(self, value) -> str | None:
        """Why ``value`` is not accepted, or None."""
        if self.kind == "combo":
            return None if value in self.options else (f"{self.name} must be one of {', '.join(self.options)}, "
                                                       f"got {value!r}")
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{self.name} must be true or false, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every range check (and ComfyUI's)
            return f"{self.name} must be a finite number, got {value}"
        if self.min is not None and self.max is not None and not self.min <= value <= self.max:
            lo, hi = (int(self.min), int(self.max)) if self.kind == "int" else (self.min, self.max)
            return f"{self.name} must be {lo}..{hi}, got {value}"
        return None


def _s(*args, **kwargs) -> Setting:
    return Setting(*args, **kwargs)


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    _s("steps", "int", 1000, "Optimizer steps of the run; the learning-rate schedule spans them. 1000-2000 is "
       "typical for a subject LoRA.", 1, MAX_STEPS, optional=False),
    _s("learning_rate", "float", 1e-4, "1e-4 suits AdamW at rank 16; Adafactor similar; Prodigy takes 1.0 (it sets "
       "its own step size and treats this as a multiplier). Values down to 1e-8 are kept as typed.", 1e-8, 10.0,
       # the front ends round a float widget to the decimals of its step: 1e-5 once rounded 5e-6 away
       step=1e-8, round=1e-8, optional=False),
    _s("rank", "int", 16, "LoRA rank: capacity and file size (rank 16 is about 150 MB in bf16).", 1, 256,
       optional=False),
    _s("alpha", "float", 16.0, "LoRA alpha; the update is scaled by alpha / rank. alpha = rank means 1.0.", 0.01,
       1024.0, step=0.5, round=0.01, optional=False),
    _s("seed", "int", 0, "Seeds the LoRA init, image order, noise, timesteps and caption dropout: same inputs and "
       "seed, same LoRA.", 0, 0xFFFFFFFFFFFFFFFF, optional=False),
    _s("gradient_checkpointing", "bool", True, "Recompute each block in the backward pass: far less memory, "
       "slower.", optional=False),
    _s("batch_size", "int", 1, "Images per micro-batch, each with its own caption. Batches hold images of one bucket "
       "(size), so a bucket's last batch can be smaller. Under torchrun (scripts/distributed_train.py) this is per "
       "GPU: N GPUs train a batch N times this.", 1, 64),
    _s("gradient_accumulation", "int", 1, "Micro-batches per optimizer step: an effective batch of batch_size x "
       "this without the memory.", 1, 256),
    _s("optimizer", "combo", "adamw", "adamw (fused); adafactor (less optimizer memory); prodigy (needs 'pip "
       "install prodigyopt'; set learning_rate 1.0).", options=OPTIMIZERS),
    _s("lr_schedule", "combo", "constant", "After warmup: constant, or linear / cosine decay towards 0 at the last "
       "step.", options=LR_SCHEDULES),
    _s("warmup_steps", "int", 0, "Raise the learning rate linearly over this many steps first (fewer than steps).",
       0, MAX_STEPS),
    _s("max_grad_norm", "float", 1.0, "Clip the adapter's gradient norm to this; 0 turns clipping off.", 0.0,
       1000.0, step=0.1, round=0.001),
    _s("timestep_sampling", "combo", "flux_shift", "flux_shift: sigmoid of a normal, shifted for the image size as "
       "Flux-dev samples (default). shift: with a fixed shift. sigmoid, logit_normal, uniform. Scale, shift and "
       "mean/std come from Advanced Training Settings.", options=TIMESTEP_SAMPLINGS),
    _s("loss", "combo", "mse", "mse, or huber (less swayed by outlier steps; delta in the advanced settings).",
       options=LOSSES),
    _s("caption_dropout", "float", 0.0, "Chance of training a sample with the empty caption instead of its own. "
       "Needs Dataset from Folder, which encodes the empty caption.", 0.0, 0.99, step=0.01, round=0.001),
    _s("blocks_to_swap", "int", 0, "Low-VRAM mode: keep this many blocks' weights in CPU memory and stream each onto "
       "the GPU just before it runs (19 = every double block, about 6 GB less). Weights ComfyUI could not fit are "
       "streamed anyway. Needs gradient_checkpointing.", 0, FLUX_BLOCKS),
    # Advanced Training Settings
    _s("sigmoid_scale", "float", 1.0, "flux_shift / shift / sigmoid: t = sigmoid(scale x N(0,1)); larger spreads "
       "timesteps towards both ends.", 0.01, 10.0, step=0.05, round=0.001, node="advanced", optional=False),
    _s("shift", "float", 3.0, "timestep_sampling 'shift': t' = s t / (1 + (s-1) t); above 1 favours noisier steps.",
       0.01, 100.0, step=0.05, round=0.001, node="advanced", optional=False),
    _s("logit_mean", "float", 0.0, "timestep_sampling 'logit_normal': mean of the normal before the sigmoid.", -5.0,
       5.0, step=0.05, round=0.001, node="advanced", optional=False),
    _s("logit_std", "float", 1.0, "timestep_sampling 'logit_normal': its standard deviation.", 0.01, 5.0, step=0.05,
       round=0.001, node="advanced", optional=False),
    _s("huber_delta", "float", 0.1, "loss 'huber': quadratic below this error, linear above.", 0.001, 10.0,
       step=0.01, round=0.0001, node="advanced", optional=False),
    _s("weight_decay", "float", 0.01, "Decoupled weight decay of the optimizer.", 0.0, 1.0, step=0.001,
       round=0.0001, node="advanced", optional=False),
    _s("compile", "combo", "auto", "torch.compile the transformer blocks: auto = on CUDA GPUs (about a minute of "
       "compiling on the first step and on each new image size, then faster steps); off = plain PyTorch.",
       options=COMPILE_MODES, node="advanced"),
    _s("fp8_matmul", "combo", "auto", "fp8 tensor-core matmuls for an fp8 (e4m3fn) base in the forward passes, each "
       "layer input scaled to fp8 on the fly; gradients stay bf16. auto = where they run: an fp8 base on an RTX 40xx "
       "/ L4 / H100 class GPU (bf16 matmuls elsewhere); on = the same, and an error where they cannot run; off = bf16 "
       "matmuls, as ComfyUI does. On an H200 11-12% less time a step at 512x512 and 1024x1024; after 500 steps the "
       "adapter's held-out loss was within 0.3% of bf16 training's.", options=FP8_MATMUL_MODES, node="advanced"),
]}


def on_node(node: str) -> list[Setting]:
    return [s for s in SETTINGS.values() if s.node == node]


def default(name: str):
    return SETTINGS[name].default
