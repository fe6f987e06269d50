"""Finished training runs, remembered by what went into them, so a training node that ComfyUI runs again on the same
inputs hands back the run it finished instead of training for hours once more.

ComfyUI's default cache from 0.33 on drops node outputs under RAM pressure (``CacheType.RAM_PRESSURE``, main.py),
and then re-runs the dropped nodes when a graph is queued again, upstream loaders included. So the key is what the
inputs hold, not which objects they are: the base weights (a sample of every tensor), the dataset's tensors, the
settings, the state continued from and the preview settings. A run stopped by Cancel is never remembered: queued
again, it trains again.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import torch

KEEP = 2  # finished runs remembered per process; each holds an adapter and its optimizer state
_SAMPLE = 4096  # elements read from each base tensor: any merge or fine-tune of a layer shows within them
_runs: OrderedDict[str, object] = OrderedDict()


def _tensor(h, t: torch.Tensor, sample: bool, as_dtype: torch.dtype | None = None) -> None:
    """``t``'s dtype, shape and values (the first _SAMPLE with ``sample``), or its values cast to ``as_dtype``."""
    t = t.detach()
    h.update(f"{as_dtype or t.dtype}{tuple(t.shape)}".encode())
    if t.device.type == "meta":
        return
    flat = t.reshape(-1)[:_SAMPLE] if sample else t.reshape(-1)
    if as_dtype is not None:
        flat = flat.float().cpu().to(as_dtype)
    h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def _value(h, value) -> None:
    if isinstance(value, torch.Tensor):
        _tensor(h, value, sample=False)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__name__.encode())
        for f in dataclasses.fields(value):
            h.update(f.name.encode())
            _value(h, getattr(value, f.name))
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _value(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for v in value:
            _value(h, v)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(repr(value).encode())
    elif isinstance(value, torch.nn.Module):
        _module(h, value)
    elif isinstance(getattr(value, "model", None), torch.nn.Module) and hasattr(value, "model_options"):
        h.update(model_key(value).encode())  # a ModelPatcher: the preview model
    elif isinstance(getattr(value, "weights", None), (list, tuple)):
        _value(h, value.weights)  # a ComfyUI weight adapter (LoRAAdapter, ...) inside a patch
    elif isinstance(getattr(value, "first_stage_model", None), torch.nn.Module):
        _module(h, value.first_stage_model)  # a VAE
    else:  # nothing to compare but the object itself
        h.update(f"{type(value).__name__}@{id(value)}".encode())


def _module(h, module: torch.nn.Module, as_dtype: torch.dtype | None = None) -> None:
    for name, tensor in module.state_dict(keep_vars=True).items():
        h.update(name.encode())
        if tensor is not None:
            _tensor(h, tensor, sample=True, as_dtype=as_dtype)


def model_key(model_patcher) -> str:
    """The base a run trains: every transformer tensor sampled, ComfyUI weight patches and this pack's options."""
    h = hashlib.blake2b(digest_size=16)
    _module(h, model_patcher.model.diffusion_model)
    _value(h, model_patcher.patches)  # ComfyUI weight patches (a LoRA loaded onto the base), not their uuid
    _value(h, {k: v for k, v in model_patcher.model_options.items() if k.startswith("dev2pro")})
    return h.hexdigest()


def run_key(node: str, model_patcher, *inputs) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(node.encode())
    h.update(model_key(model_patcher).encode())
    for value in inputs:
        _value(h, value)
    return h.hexdigest()


def recall(key: str):
    """The result remembered under ``key``, or None."""
    result = _runs.get(key)
    if result is not None:
        _runs.move_to_end(key)
    return result


def remember(key: str, result) -> None:
    _runs[key] = result
    _runs.move_to_end(key)
    while len(_runs) > KEEP:
        _runs.popitem(last=False)


def base_fingerprint(model_patcher) -> str:
    """What a training state was made for: every transformer tensor's name, shape and a sample of its values cast
    to fp8 e4m3fn (so the same file loaded in fp8 or bf16 matches), and ComfyUI weight patches on it."""
    h = hashlib.blake2b(digest_size=16)
    _module(h, model_patcher.model.diffusion_model, as_dtype=torch.float8_e4m3fn)
    _value(h, model_patcher.patches)
    return h.hexdigest()
