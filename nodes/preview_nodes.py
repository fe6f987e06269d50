"""Preview images during training: the current adapter applied to Flux-dev, sampled at Flux-dev's own guidance."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from .common import CATEGORY, PreviewSettings, node_error
from .lora_nodes import apply_lora


@dataclass
class Previews:
    """The DEV2PRO_PREVIEWS value: what to sample, on which model, how often."""

    model: object  # the ModelPatcher to sample on (Flux-dev)
    vae: object
    prompts: list[str]
    conditionings: list[list]  # ComfyUI CONDITIONING per prompt, guidance included
    every_steps: int
    steps: int
    width: int
    height: int
    seed: int
    sampler_name: str
    scheduler: str


class Dev2ProPreviewSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProPreviewSettings",
            display_name="Training Previews (Dev2Pro)",
            category=CATEGORY,
            description="Sample images with the adapter as it trains, on Flux-dev (not the training base) at its "
            "own guidance, every N steps. Connect to Train LoRA's 'previews' input.",
            inputs=[
                io.Model.Input("model", tooltip="The model to preview on: Flux-dev, where the LoRA will be used."),
                io.Clip.Input("clip", tooltip="The Flux text encoders, to encode the prompts once."),
                io.Vae.Input("vae", tooltip="The Flux VAE, to decode the previews."),
                io.String.Input("prompts", multiline=True, default="a photo of sks dog on a beach",
                                tooltip="One prompt per line; each preview round samples one image per prompt."),
                io.Int.Input("every_steps", default=250, min=1, max=100000,
                             tooltip="Sample after every this many training steps, and after the last."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Flux-dev's guidance for the previews (3.5 is its usual value)."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampling steps per preview."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=16, tooltip="Preview width in pixels."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=16, tooltip="Preview height in pixels."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Noise seed, the same at every round so previews compare."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler, as in KSampler."),
            ],
            outputs=[PreviewSettings.Output(display_name="previews", tooltip="For Train LoRA's 'previews' input.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, prompts, every_steps, guidance, steps, width, height, seed, sampler_name,
                scheduler) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise node_error("Dev2ProPreviewSettings", "prompts", "no prompt given; write one per line.")
        conditionings = []
        for line in lines:
            context, pooled = clip.encode_from_tokens(clip.tokenize(line), return_pooled=True)
            conditionings.append([[context, {"pooled_output": pooled, "guidance": guidance}]])
        return io.NodeOutput(Previews(model, vae, lines, conditionings, every_steps, steps, width, height, seed,
                                      sampler_name, scheduler))


def sample_previews(previews: Previews, lora: dict) -> torch.Tensor:
    """[prompts, H, W, 3] images of ``lora`` on the preview model; ComfyUI loads and swaps models as memory needs.

    Cancel raises ComfyUI's InterruptProcessingException from inside sampling.
    """
    model = apply_lora(previews.model, lora, 1.0, node="Dev2ProPreviewSettings")
    latent = torch.zeros([1, 16, previews.height // 8, previews.width // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)

    def check_cancel(*args):
        comfy.model_management.throw_exception_if_processing_interrupted()

    images = []
    for conditioning in previews.conditionings:
        noise = comfy.sample.prepare_noise(latent, previews.seed)
        samples = comfy.sample.sample(model, noise, previews.steps, 1.0, previews.sampler_name, previews.scheduler,
                                      conditioning, conditioning, latent, denoise=1.0, callback=check_cancel,
                                      disable_pbar=True, seed=previews.seed)
        images.append(previews.vae.decode(samples)[:, :, :, :3])
    return torch.cat(images).float().cpu()
