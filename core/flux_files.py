"""Reading Flux transformer checkpoints into a ComfyUI MODEL.

Accepted forms:
- a single ``.safetensors`` in BFL layout (Kijai's fp8 e4m3fn Flux-dev2pro, bf16/fp16 Flux-dev files), with or
  without the ``model.diffusion_model.`` prefix of full checkpoints;
- a diffusers folder (ashen0209's Flux-dev2pro): ``<folder>/transformer/diffusion_pytorch_model-*.safetensors``;
- scaled-fp8 files (``scaled_fp8`` marker + per-layer ``scale_weight``), dequantized on load so that a LoRA trained
  on them transfers 1:1 to an unscaled Flux-dev.

Model widths are read from the tensor shapes instead of ComfyUI's hard-coded Flux sizes, so the same path loads
the real 12B model and the small random models the tests write.
"""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.utils

WEIGHT_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "bf16": torch.bfloat16}
FP8_MAX = 448.0  # largest finite float8_e4m3fn value; casts beyond it are not saturating in torch
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


class FluxFileError(ValueError):
    """A file that cannot be trained on, with a message that says which file and what to do instead."""


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files that make up one model: the file itself, or a diffusers folder's shards."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.startswith("diffusion_pytorch_model") and "-of-" in name:
            return checkpoint_files(os.path.dirname(path))
        return [path]
    for folder in (os.path.join(path, "transformer"), path):
        shards = sorted(glob.glob(os.path.join(folder, "diffusion_pytorch_model*.safetensors")))
        if shards:
            return shards
    raise FluxFileError(
        f"'{path}' holds no diffusion_pytorch_model*.safetensors (looked in it and in its transformer/ subfolder). "
        "Point at a single .safetensors file or at the diffusers folder of Flux-dev2pro."
    )


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    if dtype == torch.float8_e4m3fn:
        tensor = tensor.float().clamp_(-FP8_MAX, FP8_MAX)
    return tensor.to(dtype)


def read_state_dict(path: str, weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint at ``path``, cast to ``weight_dtype`` as they are read.

    Casting tensor by tensor keeps peak memory near the size of the result rather than of the (wider) file.
    Scaled-fp8 tensors are kept as stored until they are dequantized.
    """
    files = checkpoint_files(path)
    sd = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
                scaled = any(k.endswith(SCALED_FP8_MARKER) for k in keys)
                for key in keys:
                    tensor = f.get_tensor(key)
                    sd[key] = tensor if scaled else _cast(tensor, weight_dtype)
        except Exception as e:  # safetensors raises its own SafetensorError besides OSError for broken files
            raise FluxFileError(f"'{file}' is not a readable .safetensors file ({e}). Re-download it.") from e
    return sd


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor], weight_dtype: torch.dtype) -> bool:
    """Replace ``weight`` by ``weight * scale_weight`` for every scaled layer, dropping the scale tensors.

    Returns whether the file was scaled-fp8. Training through ComfyUI's scaled-fp8 ops would multiply the LoRA
    delta by ``scale_weight`` too, so the adapter would not transfer to an unscaled Flux-dev.
    """
    markers = [k for k in sd if k.endswith(SCALED_FP8_MARKER)]
    if not markers:
        return False
    for key in markers:
        del sd[key]
    for key in [k for k in sd if k.endswith(".scale_weight")]:
        scale = sd.pop(key).float()
        weight_key = key[: -len(".scale_weight")] + ".weight"
        if weight_key not in sd:
            raise FluxFileError(f"scaled-fp8 file has '{key}' but no '{weight_key}': the file is damaged.")
        sd[weight_key] = _cast(sd[weight_key].float() * scale, weight_dtype)
    for key in [k for k in sd if k.endswith(".scale_input")]:
        del sd[key]
    for key, tensor in sd.items():
        sd[key] = _cast(tensor, weight_dtype)
    return True


def to_bfl_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip checkpoint prefixes and convert diffusers names (``transformer_blocks.N.attn.to_q``...) to BFL's."""
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    if stripped:
        sd = stripped
    if "x_embedder.weight" in sd:
        converted = comfy.model_detection.convert_diffusers_mmdit(sd, "")
        if converted is not None:
            sd = converted
    return sd


# BFL files name the attention norms' weights ``.scale``; ComfyUI 0.33 builds them as torch RMSNorms (``.weight``),
# and its diffusers conversion writes ``.weight``. Either is a Flux norm.
NORM_SUFFIXES = (".scale", ".weight")


def _has_norm(sd: dict, stem: str) -> bool:
    return any(stem + suffix in sd for suffix in NORM_SUFFIXES)


def _norm(sd: dict, stem: str) -> torch.Tensor:
    return next(sd[stem + suffix] for suffix in NORM_SUFFIXES if stem + suffix in sd)


def check_trainable_flux(sd: dict[str, torch.Tensor], name: str) -> None:
    if not _has_norm(sd, "double_blocks.0.img_attn.norm.key_norm") or "img_in.weight" not in sd:
        hint = _what_else(sd)
        raise FluxFileError(
            f"'{name}' is not a Flux.1 transformer ({hint}). Pick the Flux-dev2pro model file "
            "(e.g. flux1-dev2pro-fp8.safetensors) or its diffusers folder from models/diffusion_models."
        )
    if "guidance_in.in_layer.weight" not in sd:
        raise FluxFileError(
            f"'{name}' is a Flux model without a guidance embedding (FLUX.1-schnell or a de-distilled Flux). "
            "The dev2pro recipe trains a guidance-distilled Flux at guidance 1.0: pick Flux-dev2pro "
            "(or Flux-dev) instead."
        )
    in_channels = sd["img_in.weight"].shape[1] // 4
    if in_channels != 16:
        raise FluxFileError(
            f"'{name}' takes {in_channels} latent channels, not Flux's 16 (a Fill/Depth/Canny variant). "
            "Train on plain Flux-dev2pro."
        )


def _what_else(sd: dict[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any("distilled_guidance_layer" in k for k in keys):
        return "it looks like Chroma"
    if any(k.startswith(("encoder.block.", "text_model.")) for k in keys):
        return "it looks like a text encoder; load it with DualCLIPLoader"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "it looks like a VAE; load it with VAELoader"
    return f"none of its {len(keys)} tensors is a Flux block"


def flux_config_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    """Flux widths read from tensor shapes; for the real model they equal ComfyUI's hard-coded values."""
    hidden = sd["img_in.weight"].shape[0]
    head_dim = _norm(sd, "double_blocks.0.img_attn.norm.query_norm").shape[0]
    if hidden % head_dim or head_dim % 32:
        raise FluxFileError(f"unsupported Flux widths: hidden {hidden}, head dim {head_dim} (want a multiple of 32)")
    # Flux splits each head's rotary dimensions 1:7:7 over (index, height, width).
    axes_dim = [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16]
    return {
        "hidden_size": hidden,
        "num_heads": hidden // head_dim,
        "axes_dim": axes_dim,
        "context_in_dim": sd["txt_in.weight"].shape[1],
        "vec_in_dim": sd["vector_in.in_layer.weight"].shape[1],
        "mlp_ratio": sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
    }


def load_flux_model(path: str, weight_dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    """Load the Flux-dev(2pro) transformer at ``path`` as a ComfyUI ModelPatcher with ``weight_dtype`` storage.

    Runs outside inference mode so the parameters are ordinary tensors that autograd can save.
    """
    name = os.path.basename(os.path.normpath(path))
    with torch.inference_mode(False):
        sd = read_state_dict(path, weight_dtype)
        dequantize_scaled_fp8(sd, weight_dtype)
        sd = to_bfl_layout(sd)
        check_trainable_flux(sd, name)
        model_config = comfy.model_detection.model_config_from_unet(sd, "")
        if model_config is None:
            raise FluxFileError(f"ComfyUI does not recognise '{name}' as a Flux model.")
        model_config.unet_config.update(flux_config_from_shapes(sd))
        load_device = comfy.model_management.get_torch_device()
        offload_device = comfy.model_management.unet_offload_device()
        manual_cast = comfy.model_management.unet_manual_cast(
            weight_dtype, load_device, model_config.supported_inference_dtypes
        )
        model_config.set_inference_dtype(weight_dtype, manual_cast)
        model = model_config.get_model(sd, "").to(offload_device)
        # ComfyUI's own renames (0.33: ``_norm.scale`` -> ``.weight``), then a strict check. Under dynamic VRAM the
        # Linears have no weight until loaded, so the check uses what load_state_dict reports, not state_dict().
        sd = model_config.process_unet_state_dict(sd)
        try:
            missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shapes that contradict the widths read from the file itself
            raise FluxFileError(f"'{name}' is not a consistent Flux transformer ({str(e).splitlines()[-1].strip()}). "
                                "Re-download it.") from e
        _check_keys(missing, unexpected, name)
        model.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def _check_keys(missing: list[str], unexpected: list[str], name: str) -> None:
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing:
        raise FluxFileError(
            f"'{name}' lacks {len(missing)} Flux tensors (first: {missing[:3]}): the file is truncated or is not a "
            "complete Flux transformer. Re-download it."
        )
    if unexpected:
        raise FluxFileError(f"'{name}' has tensors a Flux transformer does not use: {unexpected[:3]}")
