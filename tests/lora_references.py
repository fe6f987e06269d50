"""Flux.1 LoRA files written by each tool's own code, the delta each tool means by them, and the deltas each loader
applies: ours (Load LoRA + ComfyUI's patching), ComfyUI's LoraLoader, diffusers' load_lora_weights.

Models are full-size Flux.1 (19 + 38 blocks, 3072 wide) on the meta device: only the LoRA tensors are real, so every
tool sees the real names and shapes at no memory cost. Deltas are compared per BFL weight, in fp32.
Names are placed with ComfyUI's own diffusers map (``comfy.utils.flux_to_diffusers``), not with the pack's table.
A delta is compared through a fixed random projection (``delta @ P``, P: in x 8): any difference shows there with
probability 1, and a full-size delta (up to 264 MB) is built only where ComfyUI's patching itself builds one.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch
from safetensors.torch import save_file

import random_models

FLUX1 = dict(random_models.FULL_WIDTH_FLUX, depth=19, depth_single_blocks=38)
DIFFUSERS_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# The Linear layers of each block that LoRA trainers target (diffusers names).
DIFFUSERS_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"]


# --- models ----------------------------------------------------------------------------------------------------

def comfy_flux():
    """ComfyUI's Flux.1 ModelPatcher, full size, weights on the meta device."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = dict(random_models.flux_params(FLUX1), image_model="flux")
    config = comfy.supported_models.Flux(unet_config)
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({}, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def diffusers_flux():
    """diffusers' Flux.1 transformer, full size, every weight a zero-stride view of one zero (peft leaves adapters of a
    meta-device model on the meta device, so the base needs a real device; this one costs no memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**DIFFUSERS_CONFIG)
    zero_weights(transformer)
    return transformer


@functools.cache
def diffusers_map() -> dict:
    """diffusers weight name -> (BFL weight name, rows slice or None, row transform or None), from ComfyUI."""
    import comfy.utils

    out = {}
    for diff, to in comfy.utils.flux_to_diffusers(FLUX1, output_prefix="").items():
        if isinstance(to, str):
            out[diff] = (to, None, None)
        elif len(to) == 2:
            out[diff] = (to[0], None if to[1] is None else slice(to[1][1], to[1][1] + to[1][2]), None)
        else:
            out[diff] = (to[0], None, to[2])
    return out


def weight_shapes(patcher) -> dict[str, torch.Size]:
    """BFL module name -> weight shape."""
    return {k[len("diffusion_model."):-len(".weight")]: v.shape for k, v in patcher.model.state_dict().items()
            if k.endswith(".weight") and v.dim() == 2}


PROBES = 8
_probes, _zeros = {}, {}


def probe(in_features: int) -> torch.Tensor:
    if in_features not in _probes:
        _probes[in_features] = torch.randn(in_features, PROBES, generator=torch.Generator().manual_seed(in_features))
    return _probes[in_features]


def zeros(shape) -> torch.Tensor:
    """A reused zero weight: allocating 264 MB per call costs more than the patch math."""
    shape = tuple(shape)
    if shape not in _zeros:
        _zeros.clear()
        _zeros[shape] = torch.zeros(shape)
    return _zeros[shape].zero_()


def placed(shapes: dict, parts: list[tuple[str, callable]]) -> dict:
    """diffusers-named deltas [(diffusers module, delta thunk)] -> {BFL module: thunk of its whole delta}."""
    names = diffusers_map()
    grouped = {}
    for name, thunk in parts:
        bfl, rows, transform = names[name + ".weight"]
        grouped.setdefault(bfl[: -len(".weight")], []).append((rows, transform, thunk))

    def build(module, members):
        full = torch.zeros(shapes[module][0], PROBES)
        for rows, transform, thunk in members:
            delta = thunk().float()
            delta = transform(delta) if transform is not None else delta
            if rows is None:
                full += delta
            else:
                full[rows] += delta
        return full

    return {m: (lambda m=m, members=members: build(m, members)) for m, members in grouped.items()}


# --- what each tool means by its file ---------------------------------------------------------------------------

def kohya_names(shapes: dict) -> dict:
    """``lora_unet_double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv`` for every weight of the model."""
    return {"lora_unet_" + m.replace(".", "_"): m for m in shapes}


def kohya_truth(tensors: dict, prefix_to_module) -> dict:
    """``alpha / rank * up @ down`` per layer, the kohya / ComfyUI definition."""
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            layer = key[: -len(".lora_down.weight")]
            down, up = tensors[key].float(), tensors[layer + ".lora_up.weight"].float()
            alpha = tensors.get(layer + ".alpha", torch.tensor(float(down.shape[0]))).float().item()
            out[prefix_to_module(layer)] = lambda a=alpha / down.shape[0], u=up, d=down: a * (u @ (d @ probe(d.shape[1])))
    return out


def peft_deltas(transformer, adapter: str, shapes: dict) -> dict:
    from peft.tuners.lora import LoraLayer

    return placed(shapes, [(name, lambda m=module: peft_delta(m, adapter))
                           for name, module in transformer.named_modules()
                           if isinstance(module, LoraLayer) and adapter in module.lora_A])


def peft_delta(layer, adapter: str) -> torch.Tensor:
    """peft's ``scaling * B @ A`` in fp32 (its get_delta_weight rounds the product to the adapter's dtype), probed."""
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    return float(layer.scaling[adapter]) * (b @ (a @ probe(a.shape[1])))


def random_peft_adapter(transformer, config, seed: int, dtype=torch.bfloat16) -> None:
    """Add ``config`` as adapter 'default' and give its A and B seeded random values (peft starts B at zero)."""
    transformer.add_adapter(config)
    randomize_peft(transformer, seed, dtype)


def randomize_peft(transformer, seed: int, dtype=torch.bfloat16) -> None:
    from peft.tuners.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    for name, module in sorted(transformer.named_modules()):
        if isinstance(module, LoraLayer):
            for part in (module.lora_A["default"], module.lora_B["default"]):
                shape = part.weight.shape
                part.weight = torch.nn.Parameter((torch.randn(shape, generator=g) / math.sqrt(shape[1])).to(dtype))


# --- the loaders ------------------------------------------------------------------------------------------------

class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def patched_deltas(patcher, shapes: dict) -> dict:
    """What ComfyUI's patching adds to each weight of a patched ModelPatcher (base weights taken as zero)."""
    import comfy.lora

    out = {}
    for key, patches in patcher.patches.items():
        module = key[len("diffusion_model."):-len(".weight")]
        if not key.endswith(".weight") or module not in shapes:
            continue
        out[module] = lambda p=patches, k=key, m=module: (
            comfy.lora.calculate_weight(p, zeros(shapes[m]), k).float() @ probe(shapes[m][1]))
    return out


def comfyui_loader(patcher, path: str, shapes: dict) -> tuple[dict, int]:
    """ComfyUI's own LoraLoaderModelOnly path: (deltas, keys it logged as not loaded)."""
    import comfy.sd
    import comfy.utils

    handler = Captured()
    logging.getLogger().addHandler(handler)
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(path), 1.0, 0)
    finally:
        logging.getLogger().removeHandler(handler)
    missed = sum(m.startswith("lora key not loaded") for m in handler.messages)
    return patched_deltas(patched, shapes), missed


def diffusers_loader(path: str, shapes: dict) -> tuple[dict | None, str]:
    """diffusers' FluxPipeline.load_lora_weights on a fresh transformer: (deltas, or None and the error)."""
    from diffusers import FluxPipeline

    transformer = diffusers_flux()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        pipe.load_lora_weights(path, adapter_name="ref")
    except Exception as e:  # what a diffusers user gets
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return peft_deltas(transformer, "ref", shapes), ""


def compare(applied: dict | None, truth: dict) -> dict:
    """Modules applied (of the truth's), and the largest difference relative to the module's largest truth entry.

    Both are {BFL module: thunk of its delta}, evaluated one module at a time (a full-size delta is up to 264 MB)."""
    if applied is None:
        return {"modules": 0, "of": len(truth), "error": None}
    with torch.no_grad():
        return _compare(applied, truth)


def _compare(applied: dict, truth: dict) -> dict:
    worst, hit = 0.0, 0
    for module in sorted(set(truth) | set(applied)):
        t = truth[module]() if module in truth else None
        a = applied[module]() if module in applied else None
        if t is None:
            worst = max(worst, float("inf") if a.abs().max() > 0 else 0.0)
            continue
        hit += a is not None and bool(a.abs().max() > 0)
        a = torch.zeros_like(t) if a is None else a
        worst = max(worst, ((a - t).abs().max() / t.abs().max()).item())
    return {"modules": hit, "of": len(truth), "error": worst}


def save(tensors: dict, path: str, metadata: dict | None = None) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def zero_weights(model, dtype=None) -> None:
    """Replace every parameter and buffer by a zero-stride view of one zero: real device, no memory, shapes kept."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            zero = torch.zeros((), dtype=dtype or p.dtype).expand(p.shape)
            setattr(module, name, torch.nn.Parameter(zero, requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = torch.zeros((), dtype=b.dtype).expand(b.shape)


def block_subset(model, blocks: dict[str, list[int]]) -> torch.nn.Module:
    """A module holding only ``model``'s blocks in ``blocks`` ({"double_blocks": [0, 18]}) under their own names, so
    a tool that wraps a whole module names them exactly as in the full model."""
    root = torch.nn.Module()
    for attr, indexes in blocks.items():
        setattr(root, attr, torch.nn.ModuleDict({str(i): getattr(model, attr)[i] for i in indexes}))
    return root


def lycoris_file(root, path: str, prefix: str, algo: str, seed: int, **kwargs) -> dict:
    """LyCORIS's own network on ``root`` (every Linear), seeded random weights, saved in bf16 by LyCORIS; returns the
    truth: {module name in ``root``: thunk of its probed delta}, from LyCORIS's own forward on a zero base weight."""
    from lycoris import LycorisNetwork, create_lycoris

    saved = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "LORA_PREFIX")}
    LycorisNetwork.apply_preset({"target_module": ["Linear"], "lora_prefix": prefix})
    try:
        network = create_lycoris(root, 1.0, algo=algo, **kwargs)
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    network.apply_to()
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(network.named_parameters()):
        if p.dim() >= 1 and p.numel() > 1:
            p.data = (torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])).to(torch.bfloat16).float()
    network.eval()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    network.save_weights(path, torch.bfloat16, {})
    names = {id(m): n for n, m in root.named_modules()}

    def forward_delta(lora):
        x = probe(lora.org_module[0].in_features).T.contiguous()
        with torch.no_grad():
            return lora.forward(x).float().T

    return {names[id(lora.org_module[0])]: (lambda lora=lora: forward_delta(lora)) for lora in network.loras}
