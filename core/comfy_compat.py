"""What differs between the ComfyUI versions the pack supports (0.3.64 to 0.33 tested, 0.38 read), in one place.

Every answer comes from a feature of the running ComfyUI (an attribute, a dataclass field, a class), never from its
version string, so a fork or a version in between gets the path its code actually has.
"""
from __future__ import annotations

import contextlib

import torch

import comfy.model_management

# Keys the Flux forward writes into transformer_options before each block from 0.33 on (block_index, ...). Their
# values change from block to block, so a compiled block that saw them would recompile per block, and a block
# recomputed in backward would see the last block's values: the blocks get the options without them.
PER_BLOCK_OPTIONS = ("block_index", "total_blocks", "block_type", "img_slice")


def block_options(transformer_options: dict | None) -> dict | None:
    """The options a block is called with, without the per-block keys (a fresh dict: the forward mutates its own)."""
    if transformer_options is None:
        return None
    return {k: v for k, v in transformer_options.items() if k not in PER_BLOCK_OPTIONS}


@contextlib.contextmanager
def training_mode():
    """ComfyUI's switch for training (0.33+: ``model_management.in_training``), on for the ``with`` body. With it
    off, Flux's RoPE runs through comfy-kitchen's fused kernel, which has no backward."""
    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    before = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = before


def is_dynamic(model_patcher) -> bool:
    """Whether ``model_patcher`` is a dynamic-VRAM patcher (0.33+ with comfy-aimdo), whose weights are streamed
    and may not exist as tensors until a forward needs them."""
    check = getattr(model_patcher, "is_dynamic", None)
    return bool(check()) if callable(check) else False


def non_dynamic(model_patcher):
    """A plain ModelPatcher over the same file for a dynamic one (ComfyUI reloads it with ``disable_dynamic``),
    with the same model_options and patches; ``model_patcher`` itself as it is otherwise."""
    if not is_dynamic(model_patcher):
        return model_patcher
    return model_patcher.clone(disable_dynamic=True)


def first_quantized_weight(module: torch.nn.Module) -> str | None:
    """The name of the first parameter held as a ComfyUI QuantizedTensor (0.33+: what Load Diffusion Model makes of
    a scaled-fp8 file), which LoRA training through this pack does not take; None when there is none."""
    try:
        from comfy.quant_ops import QuantizedTensor
    except ImportError:
        return None
    return next((name for name, p in module.named_parameters()
                 if isinstance(p, QuantizedTensor) or isinstance(getattr(p, "data", None), QuantizedTensor)), None)
