"""peft LoRA layers on the Flux transformer, injected for a training run and removed again afterwards.

Targets (every Linear inside the transformer blocks, kohya's ``networks.lora_flux`` default):
- double blocks: ``img_mod.lin``, ``img_attn.qkv``, ``img_attn.proj``, ``img_mlp.0``, ``img_mlp.2`` and the same
  five for ``txt_``;
- single blocks: ``linear1`` (fused qkv + mlp in), ``linear2`` (attention out + mlp out), ``modulation.lin``.
The embedders (``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``) and ``final_layer`` stay
untouched: training the guidance embedder is exactly what the dev2pro recipe avoids.
"""
from __future__ import annotations

import contextlib
import math
import re

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from .lora_format import LoRAWeights

TARGET_MODULES = (
    r"double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin)"
)
ADAPTER = "dev2pro"


def _lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _init_adapter(layer: LoraLayer, generator: torch.Generator, device: torch.device) -> None:
    """peft's default init (kaiming-uniform A, zero B) in fp32 from our generator, for bit-exact reruns.

    On ``device`` whatever the base layer's: in a partial (low-VRAM) load the base weight sits in CPU memory
    while the adapter trains on the GPU."""
    down = layer.lora_A[ADAPTER].weight
    up = layer.lora_B[ADAPTER].weight
    with torch.no_grad():
        down_cpu = torch.empty(down.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(down_cpu, a=math.sqrt(5), generator=generator)
        layer.lora_A[ADAPTER].weight = torch.nn.Parameter(down_cpu.to(device))
        layer.lora_B[ADAPTER].weight = torch.nn.Parameter(torch.zeros(up.shape, dtype=torch.float32, device=device))


@contextlib.contextmanager
def lora_injected(model: torch.nn.Module, rank: int, alpha: float, seed: int,
                  existing: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] | None = None,
                  device: torch.device | None = None):
    """Wrap the target Linears of ``model`` (a Flux transformer) in peft LoRA layers for the ``with`` body.

    Yields ``{module name: LoraLayer}``. On exit every wrapped module is put back, so the transformer that other
    nodes share has exactly its original modules again, whatever happened inside.
    Adapter weights are fp32 whatever the base dtype (peft would cast them to the fp8 base dtype). With
    ``existing`` ({name: (down, up)} from an earlier ``with``), the layers take those very Parameters, so an
    optimizer holding them carries on across sessions; otherwise they are initialised from ``seed``.
    """
    originals = {name: m for name, m in model.named_modules() if _is_target(name, m)}
    if not originals:
        raise ValueError("no LoRA target layers found: the model is not a Flux transformer with double/single blocks")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, lora_dropout=0.0, bias="none")
    attributes = set(vars(model))  # peft also leaves bookkeeping (peft_config) on the model it injects into
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        layers = _lora_layers(model)
        if existing is not None:
            if set(existing) != set(layers):
                raise ValueError("the adapter to continue does not fit this model's layers")
            for name, (down, up) in existing.items():
                layers[name].lora_A[ADAPTER].weight = down
                layers[name].lora_B[ADAPTER].weight = up
        else:
            generator = torch.Generator().manual_seed(seed)
            for name in sorted(layers):
                _init_adapter(layers[name], generator, device or layers[name].lora_A[ADAPTER].weight.device)
        yield layers
    finally:
        for name, original in originals.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, original)
        for name in set(vars(model)) - attributes:
            delattr(model, name)


def _is_target(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) and re.fullmatch(TARGET_MODULES, name) is not None


def adapter_parameters(layers: dict[str, LoraLayer]) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """{module name: (down, up)} in sorted name order: the optimizer's parameter order, stable across runs."""
    return {name: (layers[name].lora_A[ADAPTER].weight, layers[name].lora_B[ADAPTER].weight) for name in sorted(layers)}


def flat_parameters(adapter: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]) -> list[torch.nn.Parameter]:
    return [p for name in sorted(adapter) for p in adapter[name]]


def extract_weights(adapter: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, alpha: float) -> LoRAWeights:
    """A CPU fp32 copy of the adapter, detached from training."""
    return LoRAWeights(
        down={n: down.detach().float().cpu().clone() for n, (down, _) in adapter.items()},
        up={n: up.detach().float().cpu().clone() for n, (_, up) in adapter.items()},
        alpha=alpha,
        rank=rank,
    )
