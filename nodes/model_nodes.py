"""Loading Flux-dev2pro and fixing the guidance value training sees."""
from __future__ import annotations

import re

import torch

import folder_paths
from comfy_api.latest import io

from ..core.flux_files import WEIGHT_DTYPES, FluxFileError, load_flux_model
from ..core.paths import OutsideFolder, find_in_folders
from ..core.training import GUIDANCE_OPTION
from .common import CATEGORY, MODEL_NAME_OPTION, node_error

SHARD = re.compile(r"diffusion_pytorch_model(-\d+-of-\d+)?\.safetensors$")


def model_choices() -> list[str]:
    """Files in models/diffusion_models (and models/unet), with each diffusers folder listed once as a folder."""
    choices = []
    for name in folder_paths.get_filename_list("diffusion_models"):
        if not name.endswith(".safetensors"):
            continue
        parts = name.replace("\\", "/").split("/")
        if SHARD.match(parts[-1]) and len(parts) > 1:
            folder = parts[:-2] if parts[-2] == "transformer" and len(parts) > 2 else parts[:-1]
            name = "/".join(folder) + "/"
        if name not in choices:
            choices.append(name)
    return choices


def resolve_model_path(name: str) -> str | None:
    """The file or diffusers folder ``name`` inside models/diffusion_models (or models/unet); OutsideFolder for a
    name that leaves them."""
    return find_in_folders(folder_paths.get_folder_paths("diffusion_models"), name, "models/diffusion_models",
                           want_dir=True)


class Dev2ProLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProLoadModel",
            display_name="Load Flux-dev2pro (Dev2Pro)",
            category=CATEGORY,
            description="Loads the Flux transformer to train on: Kijai's single-file fp8 Flux-dev2pro, a bf16/fp16 "
            "single file, or ashen0209's diffusers folder. Scaled-fp8 files are dequantized on load.",
            inputs=[
                io.Combo.Input("model_name", options=model_choices(),
                               tooltip="A file or diffusers folder in models/diffusion_models (or models/unet). "
                               "Folders end in '/' and hold transformer/diffusion_pytorch_model-*.safetensors."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="fp8_e4m3fn",
                               tooltip="How the frozen base weights are kept in memory. fp8_e4m3fn halves memory "
                               "(bf16 files are cast on load); compute runs in bf16 either way."),
            ],
            outputs=[io.Model.Output(tooltip="The Flux-dev2pro MODEL, ready for Dev2ProTrainingGuidance.")],
        )

    @classmethod
    def execute(cls, model_name, weight_dtype) -> io.NodeOutput:
        try:
            path = resolve_model_path(model_name)
        except OutsideFolder as e:
            raise node_error("Dev2ProLoadModel", "model_name", f"{e}.") from e
        if path is None:
            raise node_error("Dev2ProLoadModel", "model_name", f"'{model_name}' is not in models/diffusion_models or "
                             "models/unet. Put the Flux-dev2pro file there and refresh (press R).")
        try:
            model = load_flux_model(path, WEIGHT_DTYPES[weight_dtype])
        except FluxFileError as e:
            raise node_error("Dev2ProLoadModel", "model_name", str(e)) from e
        model.model_options[MODEL_NAME_OPTION] = model_name.rstrip("/")
        return io.NodeOutput(model)


def guidance_wrapper(guidance: float, inner=None):
    """A ComfyUI model function wrapper that replaces the conditioning's guidance with ``guidance``.

    ComfyUI fills in 3.5 when the conditioning carries none; this makes every forward through the sampler
    machinery (ComfyUI's own trainer and samplers included) use the training value instead.
    """

    def wrapper(apply_model, args):
        x = args["input"]
        c = dict(args["c"])
        c["guidance"] = torch.full((x.shape[0],), guidance, device=x.device, dtype=torch.float32)
        if inner is not None:
            return inner(apply_model, {**args, "c": c})
        return apply_model(x, args["timestep"], **c)

    wrapper.replaces_guidance_of = inner  # a second guidance node replaces this one instead of wrapping it
    return wrapper


class Dev2ProTrainingGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProTrainingGuidance",
            display_name="Training Guidance (Dev2Pro)",
            category=CATEGORY,
            description="Fixes the Flux guidance input that training forwards see, whatever the conditioning "
            "carries. Flux-dev2pro was tuned at 1.0; training at Flux-dev's 3.5 wears the guidance embedding out.",
            inputs=[
                io.Model.Input("model", tooltip="The Flux-dev2pro MODEL to train on."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance value fed to the model in every training step. Keep 1.0 for "
                               "Flux-dev2pro; sample the finished LoRA on Flux-dev at its usual 3.5."),
            ],
            outputs=[io.Model.Output(tooltip="The same MODEL with its training guidance fixed.")],
        )

    @classmethod
    def execute(cls, model, guidance) -> io.NodeOutput:
        if not getattr(model.model.diffusion_model, "params", None) or not model.model.diffusion_model.params.guidance_embed:
            raise node_error("Dev2ProTrainingGuidance", "model", "this model has no Flux guidance input (schnell or "
                             "not a Flux model). Load Flux-dev2pro with Dev2ProLoadModel.")
        patched = model.clone()
        patched.model_options[GUIDANCE_OPTION] = float(guidance)
        inner = patched.model_options.get("model_function_wrapper")
        inner = getattr(inner, "replaces_guidance_of", inner)
        patched.set_model_unet_function_wrapper(guidance_wrapper(float(guidance), inner))
        return io.NodeOutput(patched)
