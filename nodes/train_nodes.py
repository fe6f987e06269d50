"""The training node: ComfyUI inputs in, a LORA_MODEL and a loss curve out."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..core.dataset import TrainingDataset
from ..core.lora_format import TrainedLoRA
from ..core.loss_plot import draw_loss_curve
from ..core.training import DEFAULT_TRAINING_GUIDANCE, GUIDANCE_OPTION, TrainConfig, train_lora
from .common import CATEGORY, MODEL_NAME_OPTION, Dataset, node_error

log = logging.getLogger("dev2pro-lora")
STEP_EVENT = "dev2pro.train.step"


def pil_to_image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


def send_event(node_id: str, data: dict) -> None:
    """Per-step numbers for the front end's loss display; silently skipped when no server runs (scripts, tests)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_sync(STEP_EVENT, {"node": node_id, **data}, server.client_id)


class Dev2ProTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProTrainLoRA",
            display_name="Train Flux LoRA (Dev2Pro)",
            category=CATEGORY,
            description="Trains a LoRA on the double and single blocks of a Flux transformer with the rectified-"
            "flow velocity loss, at the guidance set by Dev2ProTrainingGuidance (1.0 when none is set). "
            "The input MODEL is left exactly as it was.",
            inputs=[
                io.Model.Input("model", tooltip="Flux-dev2pro from Dev2ProLoadModel, through Dev2ProTrainingGuidance."),
                Dataset.Input("dataset", tooltip="From Dev2ProDatasetFromLatents."),
                io.Int.Input("steps", default=1000, min=1, max=100000,
                             tooltip="Optimizer steps, one image each. 1000-2000 is typical for a subject LoRA."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-2, step=1e-5,
                               tooltip="AdamW learning rate. 1e-4 suits Flux LoRAs at rank 16."),
                io.Int.Input("rank", default=16, min=1, max=256,
                             tooltip="LoRA rank: capacity and file size (rank 16 is about 150 MB in bf16)."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank. alpha = rank means 1.0."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the LoRA init, image order, noise and timesteps: same seed, same LoRA."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute each block in the backward pass: far less memory, ~30% slower."),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora", tooltip="The trained adapter (kohya keys). Works with "
                                    "Dev2ProSaveLoRA, Dev2ProApplyLoRA and ComfyUI's Load/Save LoRA nodes."),
                io.Image.Output(display_name="loss_curve", tooltip="Loss per step and its moving average."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, dataset: TrainingDataset, steps, learning_rate, rank, alpha, seed,
                gradient_checkpointing) -> io.NodeOutput:
        guidance = model.model_options.get(GUIDANCE_OPTION)
        if guidance is None:
            guidance = DEFAULT_TRAINING_GUIDANCE
            log.info("Dev2ProTrainLoRA: no Dev2ProTrainingGuidance on the model; training at guidance %s", guidance)
        config = TrainConfig(steps=steps, learning_rate=learning_rate, rank=rank, alpha=alpha, seed=seed,
                             guidance=guidance, gradient_checkpointing=gradient_checkpointing)
        node_id = cls.hidden.unique_id
        progress = comfy.utils.ProgressBar(steps, node_id=node_id)
        last_step_end = [time.perf_counter()]

        def on_step(step: int, total: int, loss: float) -> None:
            now = time.perf_counter()
            seconds, last_step_end[0] = now - last_step_end[0], now
            progress.update_absolute(step, total)
            send_event(node_id, {"step": step, "total": total, "loss": loss, "learning_rate": learning_rate,
                                 "seconds_per_step": seconds})
            comfy.model_management.throw_exception_if_processing_interrupted()

        try:
            result = train_lora(model, dataset, config, on_step)
        except ValueError as e:
            raise node_error("Dev2ProTrainLoRA", "model/dataset", str(e)) from e
        base_name = model.model_options.get(MODEL_NAME_OPTION, "unknown")
        info = {
            "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha),
            "ss_steps": str(steps),
            "ss_max_train_steps": str(steps),
            "ss_learning_rate": str(learning_rate),
            "ss_optimizer": "torch.optim.AdamW",
            "ss_seed": str(seed),
            "ss_guidance_scale": str(guidance),
            "ss_training_base": base_name,
            "ss_gradient_checkpointing": str(gradient_checkpointing),
            "dev2pro_training_guidance": str(guidance),
            "dev2pro_base_model": base_name,
            "dev2pro_final_loss": f"{result.losses[-1]:.6g}",
        }
        lora = TrainedLoRA(result.weights.to_kohya(), info)
        title = f"{len(lora) // 3} layers, {steps} steps at guidance {guidance}, {result.seconds:.0f} s"
        return io.NodeOutput(lora, pil_to_image(draw_loss_curve(result.losses, title)))
