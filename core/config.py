"""Training settings, validated once at the boundary: every later stage may trust them."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

# Where Dev2ProTrainingGuidance stores its value in a ModelPatcher's model_options.
GUIDANCE_OPTION = "dev2pro_training_guidance"
DEFAULT_TRAINING_GUIDANCE = 1.0

OPTIMIZERS = ("adamw", "adafactor", "prodigy")
LR_SCHEDULES = ("constant", "linear", "cosine")
TIMESTEP_SAMPLINGS = ("flux_shift", "shift", "sigmoid", "logit_normal", "uniform")
LOSSES = ("mse", "huber")
COMPILE_MODES = ("auto", "on", "off")  # auto: compile on CUDA, where it pays; eager elsewhere
FP8_MATMUL_MODES = ("off", "on")
FLUX_BLOCKS = 57  # Flux.1: 19 double + 38 single blocks


class InputError(ValueError):
    """Bad input; ``input_name`` is the node input it belongs to, as data, so nodes never parse it from the text."""

    def __init__(self, input_name: str, message: str):
        super().__init__(message)
        self.input_name = input_name


class SettingError(InputError):
    """A training setting is out of range; ``input_name`` is the setting (and the node input of that name)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float = 16.0
    seed: int = 0
    guidance: float = DEFAULT_TRAINING_GUIDANCE
    gradient_checkpointing: bool = True
    batch_size: int = 1
    gradient_accumulation: int = 1
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    timestep_sampling: str = "flux_shift"
    sigmoid_scale: float = 1.0
    shift: float = 3.0  # the fixed shift of timestep_sampling "shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss: str = "mse"
    huber_delta: float = 0.1
    caption_dropout: float = 0.0
    compile: str = "auto"
    blocks_to_swap: int = 0  # blocks whose weights stay in CPU memory and stream in (low-VRAM mode)
    fp8_matmul: str = "off"  # on: the fp8 base multiplies on fp8 tensor cores in the forward passes
    # Continue Training with a new rate or schedule: the schedule (warmup included) runs over the steps after this
    # one; the rates before it, as JSON [[first step, rate, schedule], ...], for the files' metadata.
    schedule_start: int = 0
    lr_history: str = ""

    def compiled_on(self, device_type: str) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda")

    def validate(self) -> None:
        """Raise SettingError naming the setting and what it accepts; called once, before any work."""
        for f in dataclasses.fields(self):  # NaN passes every range check below (and ComfyUI's)
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingError(f.name, f"{f.name} must be a finite number, got {value}")
        checks = [
            (self.steps >= 1, "steps", f"steps must be at least 1, got {self.steps}"),
            (0 < self.learning_rate < 10, "learning_rate", f"learning_rate must be in (0, 10), got {self.learning_rate}"),
            (1 <= self.rank <= 256, "rank", f"rank must be 1..256, got {self.rank}"),
            (self.alpha > 0, "alpha", f"alpha must be positive, got {self.alpha}"),
            (math.isfinite(self.guidance) and self.guidance >= 0, "guidance", f"guidance must be >= 0, got {self.guidance}"),
            (self.batch_size >= 1, "batch_size", f"batch_size must be at least 1, got {self.batch_size}"),
            (self.gradient_accumulation >= 1, "gradient_accumulation", f"gradient_accumulation must be at least 1, got {self.gradient_accumulation}"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.weight_decay >= 0, "weight_decay", f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"),
            (0 <= self.warmup_steps < self.steps - self.schedule_start or self.warmup_steps == 0, "warmup_steps",
             f"warmup_steps must be below steps ({self.steps}), got {self.warmup_steps}"),
            (self.max_grad_norm >= 0, "max_grad_norm", f"max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}"),
            (self.timestep_sampling in TIMESTEP_SAMPLINGS, "timestep_sampling",
             f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {self.timestep_sampling!r}"),
            (self.sigmoid_scale > 0, "sigmoid_scale", f"sigmoid_scale must be positive, got {self.sigmoid_scale}"),
            (self.shift > 0, "shift", f"shift must be positive, got {self.shift}"),
            (self.logit_std > 0, "logit_std", f"logit_std must be positive, got {self.logit_std}"),
            (self.loss in LOSSES, "loss", f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.huber_delta > 0, "huber_delta", f"huber_delta must be positive, got {self.huber_delta}"),
            (0 <= self.caption_dropout < 1, "caption_dropout", f"caption_dropout must be in [0, 1), got {self.caption_dropout}"),
            (self.compile in COMPILE_MODES, "compile", f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}"),
            (self.fp8_matmul in FP8_MATMUL_MODES, "fp8_matmul",
             f"fp8_matmul must be one of {', '.join(FP8_MATMUL_MODES)}, got {self.fp8_matmul!r}"),
            (0 <= self.blocks_to_swap <= FLUX_BLOCKS, "blocks_to_swap", f"blocks_to_swap must be 0..{FLUX_BLOCKS}, got {self.blocks_to_swap}"),
            (self.blocks_to_swap == 0 or self.gradient_checkpointing, "blocks_to_swap",
             "blocks_to_swap needs gradient_checkpointing on (a swapped block's weights leave the GPU after it ran)"),
            (self.schedule_start >= 0, "schedule_start", f"schedule_start must be >= 0, got {self.schedule_start}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise SettingError(name, message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_new_rate(self, step: int, learning_rate: float | None, lr_schedule: str | None) -> "TrainConfig":
        """This run continued after ``step`` at ``learning_rate`` and/or ``lr_schedule`` (None keeps each): the
        schedule restarts there without warmup, and the rate so far joins ``lr_history``."""
        history = json.loads(self.lr_history) if self.lr_history else []
        history.append([self.schedule_start + 1, self.learning_rate, self.lr_schedule])
        return dataclasses.replace(self, learning_rate=learning_rate or self.learning_rate,
                                   lr_schedule=lr_schedule or self.lr_schedule, warmup_steps=0, schedule_start=step,
                                   lr_history=json.dumps(history))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    # Settings a continued run must share with the run it continues: they shape the adapter or its optimizer.
    STATE_BOUND = ("rank", "alpha", "optimizer")
