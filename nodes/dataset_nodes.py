"""Building a training dataset from ComfyUI's own latents and conditioning."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.dataset import TrainingDataset
from .common import CATEGORY, Dataset, node_error


def split_conditioning(conditioning) -> list[tuple]:
    """ComfyUI CONDITIONING ``[[context [b, L, D], {"pooled_output": [b, P], ...}], ...]`` -> one pair per prompt."""
    pairs = []
    for context, options in conditioning:
        pooled = options.get("pooled_output")
        if pooled is None:
            raise node_error("Dev2ProDatasetFromLatents", "conditioning", "it has no pooled output. Encode the "
                             "captions with CLIPTextEncode on a Flux DualCLIPLoader (clip_l + t5xxl, type flux).")
        for i in range(context.shape[0]):
            pairs.append((context[i], pooled[min(i, pooled.shape[0] - 1)]))
    return pairs


class Dev2ProDatasetFromLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProDatasetFromLatents",
            display_name="Dataset from Latents (Dev2Pro)",
            category=CATEGORY,
            description="Pairs VAE-encoded training images with their text conditioning, so ComfyUI's own "
            "VAEEncode, CLIPTextEncode and image-set nodes can feed Dev2ProTrainLoRA.",
            inputs=[
                io.Latent.Input("latents", tooltip="Training images encoded by VAEEncode with the Flux VAE "
                                "(ae.safetensors): 16 channels, all the same size."),
                io.Conditioning.Input("conditioning", tooltip="Captions from CLIPTextEncode: one conditioning for "
                                      "all images, or one per image in the same order (a batch of conditionings)."),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="The training set for Dev2ProTrainLoRA.")],
        )

    @classmethod
    def execute(cls, latents, conditioning) -> io.NodeOutput:
        samples = latents["samples"]
        if samples.ndim != 4 or samples.shape[1] != 16:
            raise node_error("Dev2ProDatasetFromLatents", "latents", f"got latents of shape {tuple(samples.shape)}; "
                             "Flux latents have 16 channels. Encode the images with the Flux VAE (ae.safetensors).")
        try:
            return io.NodeOutput(TrainingDataset.from_batches(samples, split_conditioning(conditioning)))
        except ValueError as e:
            raise node_error("Dev2ProDatasetFromLatents", "conditioning", str(e)) from e
