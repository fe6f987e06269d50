"""Random-weight model files that take ComfyUI's real loading paths, for the tests and the CPU demo.

No real weights can be downloaded where this project is tested, so every model is built here through ComfyUI's
own classes, filled with seeded random values and written as the file formats users have:
- Flux transformers in BFL layout (single file, fp8 e4m3fn / bf16), diffusers folders, scaled-fp8 files;
- a full-size Flux VAE (16 latent channels) and a full-size CLIP-L.
Needs ComfyUI importable (``COMFYUI_PATH`` on ``sys.path``).
"""
from __future__ import annotations

import logging
import math
import os

import torch
from safetensors.torch import save_file

# Small enough for milliseconds per step on a CPU; widths follow Flux's ratios (head dim 32 -> axes 4/14/14).
TINY_FLUX = dict(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=64, mlp_ratio=4.0,
                 num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 14, 14], theta=10000, patch_size=2,
                 qkv_bias=True, guidance_embed=True)
# What the demo uses: tiny, but reading CLIP-L's 768-wide text so real ComfyUI text nodes can condition it.
DEMO_FLUX = dict(TINY_FLUX, vec_in_dim=768, context_in_dim=768, hidden_size=128, num_heads=4, depth=2,
                 depth_single_blocks=2)
# Full width, shallow: what ComfyUI's own Flux detection accepts (hidden 3072, 24 heads, T5 4096).
FULL_WIDTH_FLUX = dict(TINY_FLUX, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24,
                       axes_dim=[16, 56, 56])


def random_like(shapes: dict[str, torch.Size], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Fan-in scaled normal weights, zero biases and unit norm scales: activations stay in a sane range."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key.endswith((".scale", "norm.weight")) or (key.endswith(".weight") and len(shape) == 1 and "norm" in key):
            t = torch.ones(shape)
        elif key.endswith(".bias") or len(shape) < 2:
            t = torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[key] = t.to(dtype)
    return out


def flux_params(config: dict) -> dict:
    """``config`` with what this ComfyUI's FluxParams needs besides (0.33: ``txt_ids_dims``)."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**({"txt_ids_dims": []} if "txt_ids_dims" in fields else {}), **config}


def bfl_key(key: str) -> str:
    """The name BFL's files give a tensor: ComfyUI 0.33 builds the attention norms as torch RMSNorms
    (``query_norm.weight``); Flux files, as released, call them ``query_norm.scale``."""
    return key[: -len(".weight")] + ".scale" if key.endswith("_norm.weight") else key


def flux_shapes(config: dict) -> dict[str, torch.Size]:
    """Tensor shapes of a Flux transformer in BFL layout, whichever ComfyUI builds it."""
    import comfy.ldm.flux.model
    import comfy.ops

    with torch.device("meta"):
        model = comfy.ldm.flux.model.Flux(**flux_params(config), dtype=torch.float32,
                                          operations=comfy.ops.disable_weight_init)
    return {bfl_key(k): v.shape for k, v in model.state_dict().items()}


def flux_state_dict(config: dict = TINY_FLUX, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random Flux transformer state dict in BFL layout (``double_blocks.0.img_attn.qkv.weight``...)."""
    return random_like(flux_shapes(config), seed, dtype)


def write_flux(path: str, config: dict = TINY_FLUX, seed: int = 0, dtype=torch.bfloat16, prefix: str = "") -> str:
    sd = flux_state_dict(config, seed)
    if dtype == torch.float8_e4m3fn:
        sd = {k: v.clamp(-448, 448).to(dtype) for k, v in sd.items()}
    else:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({prefix + k: v for k, v in sd.items()}, path)
    return path


def to_diffusers(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL layout -> diffusers names (split q/k/v, ``norm_out`` with scale and shift swapped)."""
    import comfy.utils

    mapping = comfy.utils.flux_to_diffusers(
        {"depth": config["depth"], "depth_single_blocks": config["depth_single_blocks"],
         "hidden_size": config["hidden_size"]}, output_prefix="")
    out = {}
    for diffusers_key, target in mapping.items():
        if isinstance(target, str):
            if bfl_key(target) in sd:
                out[diffusers_key] = sd[bfl_key(target)]
            continue
        key, offset = bfl_key(target[0]), target[1]
        if key not in sd:
            continue
        t = sd[key] if offset is None else sd[key].narrow(*offset)
        if len(target) > 2:
            t = target[2](t)  # swap_scale_shift is its own inverse
        out[diffusers_key] = t.contiguous()
    return out


def write_diffusers_folder(folder: str, config: dict = TINY_FLUX, seed: int = 0, shards: int = 2) -> str:
    """ashen0209's layout: ``<folder>/transformer/diffusion_pytorch_model-0000i-of-0000n.safetensors``."""
    sd = {k: v.to(torch.bfloat16) for k, v in to_diffusers(flux_state_dict(config, seed), config).items()}
    keys = sorted(sd)
    target = os.path.join(folder, "transformer")
    os.makedirs(target, exist_ok=True)
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, os.path.join(target, f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"))
    return folder


def write_scaled_fp8(path: str, config: dict = TINY_FLUX, seed: int = 0) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 format: per-layer ``scale_weight`` and a ``scaled_fp8`` marker. Returns the file's
    tensors so a test can compute the exact dequantized weights."""
    sd = flux_state_dict(config, seed)
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, t in sd.items():
        if key.endswith(".weight") and t.ndim == 2:
            scale = t.abs().amax() / 448 * 4  # a scale well away from 1 so an un-applied scale shows
            out[key] = (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).float()
        else:
            out[key] = t.to(torch.bfloat16)
    save_file(out, path)
    return out


def write_flux_vae(path: str, seed: int = 0) -> str:
    """A full-size Flux VAE (16 latent channels) with random weights; about 84M parameters."""
    import comfy.sd

    probe = {"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3), "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3)}
    logging.disable(logging.WARNING)  # the probe is meant to lack every other key; ComfyUI lists them all
    try:
        shapes = {k: v.shape for k, v in comfy.sd.VAE(sd=probe).first_stage_model.state_dict().items()}
    finally:
        logging.disable(logging.NOTSET)
    save_file(random_like(shapes, seed, torch.float32), path)
    return path


def write_clip_l(path: str, seed: int = 0) -> str:
    """A full-size CLIP-L text encoder with random weights, in the HF layout CLIPLoader detects."""
    import comfy.sd1_clip

    with torch.device("meta"):
        model = comfy.sd1_clip.SDClipModel(device="meta")
    shapes = {k[len("transformer."):]: v.shape for k, v in model.state_dict().items() if k.startswith("transformer.")}
    sd = random_like(shapes, seed, torch.float32)
    save_file(sd, path)
    return path
