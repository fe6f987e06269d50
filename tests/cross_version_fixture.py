"""One fixed training run, for comparing ComfyUI versions: a tiny Flux file and a dataset file in, the adapter out.

Used in-process by tests/test_cross_version.py, and as a script under the other ComfyUI:
``COMFYUI_PATH=<tree> <its python> tests/cross_version_fixture.py <model.safetensors> <data.safetensors> <out>``.
"""
from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import load_file, save_file

STEPS = 6
SETTINGS = dict(steps=STEPS, learning_rate=2e-3, rank=4, alpha=4.0, seed=7, max_grad_norm=0.0)


def write_inputs(model_path: str, data_path: str) -> None:
    import random_models

    random_models.write_flux(model_path, seed=31, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(32)
    save_file({"latents": torch.randn(3, 16, 8, 8, generator=g), "context": torch.randn(3, 6, 48, generator=g),
               "pooled": torch.randn(3, 32, generator=g)}, data_path)


def train(core, model_path: str, data_path: str) -> dict[str, torch.Tensor]:
    """Load with the pack's loader (bf16 storage, fp32 CPU compute), train, return the adapter and the losses."""
    data = load_file(data_path)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        patcher = core.flux_files.load_flux_model(model_path, torch.bfloat16)
        dataset = core.dataset.TrainingDataset.from_batches(
            data["latents"], list(zip(data["context"], data["pooled"])))
        result = core.training.train_lora(patcher, dataset, core.training.TrainConfig(**SETTINGS))
    out = {"losses": torch.tensor(result.losses, dtype=torch.float64)}
    for name in result.weights.down:
        out[f"{name}.down"] = result.weights.down[name]
        out[f"{name}.up"] = result.weights.up[name]
    return out


def main(model_path: str, data_path: str, out_path: str) -> None:
    scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
    sys.path.insert(0, scripts)
    from comfy_inprocess import import_comfyui, load_packs

    nodes = import_comfyui()
    pack = load_packs(nodes, os.path.dirname(scripts))
    save_file(train(pack.core, model_path, data_path), out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
