"""Seconds per step and peak GPU memory of Dev2ProTrainLoRA's training core on a full-size Flux-dev.

The model is Flux-dev at its real size (19 double + 38 single blocks, 11.9B parameters) built through ComfyUI's
own classes with random weights, stored in fp8 e4m3fn with bf16 compute: the cost of a step equals the real
model's. Batch 1, 512 text tokens (T5 width 4096), LoRA rank 16, AdamW. Prints one JSON line per configuration.

    python benchmarks/train_step.py [--resolutions 512 1024] [--steps 10] [--warmup 3] [--no-checkpointing-too]

Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH, or ~/comfy/ComfyUI).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def import_core():
    """The pack's core package under its own name, without the node layer (no ComfyUI server needed)."""
    init = os.path.join(PACK_DIR, "core", "__init__.py")
    spec = importlib.util.spec_from_file_location("dev2pro_core", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dev2pro_core"] = module
    spec.loader.exec_module(module)
    import dev2pro_core.dataset
    import dev2pro_core.training

    return module


def random_flux_dev(weight_dtype=torch.float8_e4m3fn):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    device = comfy.model_management.get_torch_device()
    config = comfy.supported_models.Flux(dict(FLUX_DEV))
    config.set_inference_dtype(weight_dtype, torch.bfloat16)
    model = config.get_model({}, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1)
            elif p.ndim < 2:
                p.zero_()
            else:
                w = torch.randn(p.shape, device=device, dtype=torch.bfloat16, generator=g) / math.sqrt(p.shape[1])
                p.copy_(w.to(p.dtype))
    model.diffusion_model.requires_grad_(False)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu")), params


def measure(core, patcher, resolution, steps, warmup, checkpointing, rank, tokens):
    g = torch.Generator().manual_seed(0)
    data = core.dataset.TrainingDataset.from_batches(
        torch.randn(1, 16, resolution // 8, resolution // 8, generator=g),
        [(torch.randn(tokens, 4096, generator=g), torch.randn(768, generator=g))])
    config = core.training.TrainConfig(steps=warmup + steps, learning_rate=1e-4, rank=rank, alpha=float(rank),
                                       gradient_checkpointing=checkpointing)
    stamps = []

    def on_step(info):
        stamps.append(time.perf_counter())  # the core reads the loss every step, so the GPU is in sync here

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = core.training.train_lora(patcher, data, config, on_step)
    times = [b - a for a, b in zip([start] + stamps, stamps)][warmup:]
    return {
        "benchmark": "train_step", "trainer": "Dev2ProTrainLoRA", "resolution": resolution, "rank": rank,
        "batch": 1, "text_tokens": tokens, "base_dtype": "float8_e4m3fn", "compute_dtype": "bfloat16",
        "gradient_checkpointing": checkpointing, "steps_timed": len(times),
        "seconds_per_step_median": round(statistics.median(times), 4),
        "seconds_per_step_mean": round(statistics.mean(times), 4),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "final_loss_finite": math.isfinite(result.losses[-1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--no-checkpointing-too", action="store_true", help="also measure without checkpointing")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    sys.path.insert(0, os.path.join(PACK_DIR, "scripts"))
    from comfy_inprocess import comfyui_path

    sys.path.insert(0, comfyui_path())
    core = import_core()
    patcher, params = random_flux_dev()
    common = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "parameters": params,
              "date": datetime.date.today().isoformat()}
    for checkpointing in [True, False] if a.no_checkpointing_too else [True]:
        for resolution in a.resolutions:
            try:
                row = measure(core, patcher, resolution, a.steps, a.warmup, checkpointing, a.rank, a.tokens)
            except torch.cuda.OutOfMemoryError:
                row = {"benchmark": "train_step", "resolution": resolution, "gradient_checkpointing": checkpointing,
                       "error": "out of memory"}
                torch.cuda.empty_cache()
            print(json.dumps({**row, **common}), flush=True)


if __name__ == "__main__":
    main()
