"""Building a training dataset from ComfyUI's own latents and conditioning."""
from __future__ import annotations

import os

import comfy.utils
from comfy_api.latest import io

from ..core.dataset import TrainingDataset
from ..core import distributed
from ..core.encode_cache import EncodeCache, build_folder_dataset, model_fingerprint
from ..core.image_folder import MISSING_CAPTION_POLICIES, DatasetError, folder_fingerprint
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


def resolve_folder(folder: str) -> str:
    """An absolute path as given, else a subfolder of ComfyUI's input folder."""
    import folder_paths

    folder = folder.strip()
    return folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)


def encode_cache_root() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "dev2pro-lora", "encode-cache")


def vae_encoder(vae):
    def encode(pixels):
        return vae.encode(pixels)

    return encode


def text_encoder(clip):
    def encode(text: str, min_tokens: int):
        options = {"tokenizer_options": {"t5xxl_min_length": min_tokens}} if min_tokens else {}
        context, pooled = clip.encode_from_tokens(clip.tokenize(text, **options), return_pooled=True)
        return context[0], pooled[0]

    return encode


def clip_fingerprint(clip) -> str:
    patches = sorted((key, [float(p[0]) for p in value]) for key, value in clip.patcher.patches.items())
    return model_fingerprint(clip.cond_stage_model.state_dict()) + "|" + str(patches)


class Dev2ProDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProDataset",
            display_name="Dataset from Folder (Dev2Pro)",
            category=CATEGORY,
            description="Training images with same-name .txt captions, from a folder (kohya 'N_name' subfolders "
            "repeat their images N times). Images are sorted into aspect-ratio buckets, encoded once with the VAE "
            "and text encoder, and cached on disk: re-running reads the cache, a changed image or caption is "
            "encoded again.",
            inputs=[
                io.String.Input("folder", default="dev2pro_dataset",
                                tooltip="A subfolder of ComfyUI's input folder, or an absolute path. Images: png, jpg, "
                                "webp, bmp, tif; captions: a .txt file with the same name as each image."),
                io.Vae.Input("vae", tooltip="The Flux VAE (ae.safetensors)."),
                io.Clip.Input("clip", tooltip="The Flux text encoders (DualCLIPLoader: clip_l + t5xxl, type flux)."),
                io.Int.Input("resolution", default=1024, min=64, max=2048, step=64,
                             tooltip="Training size: each image is scaled to about resolution² pixels at its own "
                             "aspect ratio (sides in multiples of 64) and centre-cropped; never scaled up. 512-1024 for Flux."),
                io.String.Input("trigger_word", default="", optional=True,
                                tooltip="Put before every caption ('sks dog' -> 'sks dog, <caption>'). Empty: none."),
                io.Combo.Input("missing_captions", options=list(MISSING_CAPTION_POLICIES), default="error",
                               optional=True,
                               tooltip="An image without a .txt caption: 'error' stops and names it; 'empty caption' "
                               "trains it with the trigger word alone (or no text)."),
            ],
            outputs=[Dataset.Output(display_name="dataset", tooltip="The training set for Dev2ProTrainLoRA.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **kwargs):
        path = resolve_folder(folder)
        return folder_fingerprint(path) if os.path.isdir(path) else float("nan")

    @classmethod
    def execute(cls, folder, vae, clip, resolution, trigger_word="", missing_captions="error") -> io.NodeOutput:
        path = resolve_folder(folder)
        if not os.path.isdir(path):
            raise node_error("Dev2ProDataset", "folder", f"'{folder}' is not a folder (looked for {path}). Put the "
                             "images in a subfolder of ComfyUI's input folder, or give an absolute path.")
        progress = comfy.utils.ProgressBar(1, node_id=cls.hidden.unique_id)
        def build():
            return build_folder_dataset(
                path, resolution, trigger_word or "", missing_captions, vae_encoder(vae), text_encoder(clip),
                vae_id=model_fingerprint(vae.first_stage_model.state_dict()), text_encoder_id=clip_fingerprint(clip),
                cache=EncodeCache(encode_cache_root(), read_only=not distributed.is_main()),
                on_progress=lambda done, total: progress.update_absolute(done, total))

        try:  # under torchrun rank 0 encodes into the cache first; the other ranks then read it
            dataset = distributed.main_first(build, f"encoding the dataset {path}")
        except DatasetError as e:
            raise node_error("Dev2ProDataset", "folder", str(e)) from e
        return io.NodeOutput(dataset)
