"""Training settings, validated once at the boundary: every later stage may trust them."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .settings import (COMPILE_MODES, FLUX_BLOCKS, FP8_MATMUL_MODES, LOSSES, LR_SCHEDULES,  # noqa: F401
                       OPTIMIZERS, SETTINGS, TIMESTEP_SAMPLINGS, default)

# Where Dev2ProTrainingGuidance stores its value in a ModelPatcher's model_options.
GUIDANCE_OPTION = "dev2pro_training_guidance"
DEFAULT_TRAINING_GUIDANCE = 1.0

class InputError(ValueError):
    """Bad input; ``input_name`` is the node input it belongs to, as data, so nodes never parse it from the text."""

    def __init__(self, input_name: str, message: str):
        super().__init__(message)
        self.input_name = input_name


class SettingError(InputError):
    """A training setting is out of range; ``input_name`` is the setting (and the node input of that name)."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = default("steps")
    learning_rate: float = default("learning_rate")
    rank: int = default("rank")
    alpha: float = default("alpha")
    seed: int = default("seed")
    guidance: float = DEFAULT_TRAINING_GUIDANCE
    gradient_checkpointing: bool = default("gradient_checkpointing")
    batch_size: int = default("batch_size")
    gradient_accumulation: int = default("gradient_accumulation")
    optimizer: str = default("optimizer")
    weight_decay: float = default("weight_decay")
    lr_schedule: str = default("lr_schedule")
    warmup_steps: int = default("warmup_steps")
    max_grad_norm: float = default("max_grad_norm")  # 0 turns clipping off
    timestep_sampling: str = default("timestep_sampling")
    sigmoid_scale: float = default("sigmoid_scale")
    shift: float = default("shift")  # the fixed shift of timestep_sampling "shift"
    logit_mean: float = default("logit_mean")
    logit_std: float = default("logit_std")
    loss: str = default("loss")
    huber_delta: float = default("huber_delta")
    caption_dropout: float = default("caption_dropout")
    compile: str = default("compile")
    blocks_to_swap: int = default("blocks_to_swap")  # blocks whose weights stay in CPU memory and stream in
    fp8_matmul: str = default("fp8_matmul")  # auto/on: the fp8 base multiplies on fp8 tensor cores in the forward passes
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
        for setting in SETTINGS.values():
            problem = setting.problem(getattr(self, setting.name))
            if problem:
                raise SettingError(setting.name, problem)
        checks = [
            (self.guidance >= 0, "guidance", f"guidance must be >= 0, got {self.guidance}"),
            (self.warmup_steps < self.steps - self.schedule_start or self.warmup_steps == 0, "warmup_steps",
             f"warmup_steps must be below steps ({self.steps}), got {self.warmup_steps}"),
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
