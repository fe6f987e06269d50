"""Does fp8_matmul cost quality? Adapters trained with and without it, each evaluated with bf16 compute.

On one full-size random Flux-dev (fp8 e4m3fn weights, bf16 compute; train_step.random_flux_dev), three runs of
``--steps`` steps on the same fixed dataset (``--images`` random latents at ``--resolution``, each its own random
caption of 512 tokens), rank 16, lr 1e-4, seed 0:

- ``bf16``: fp8_matmul off;
- ``bf16_again``: the same run once more: how far two runs of identical settings land apart (nondeterministic GPU
  kernels, amplified by Adam), the yardstick for the deltas;
- ``fp8``: fp8_matmul on.

Each adapter, and the base without one, is then evaluated with bf16 compute (fp8_matmul off, the adapter unmerged in
the training forward, no patches) on a held-out set (``--held-out`` other random latents and captions) and on the
training set, at timesteps 0.25, 0.5 and 0.75 with fixed noise: the mean velocity MSE, the loss training minimises.

Prints one JSON line per evaluation, then a verdict line: fp8 passes when its held-out loss is within
``--tolerance`` (relative, default 1 %) of the bf16 adapter's, and the cosine similarity of its weight deltas
(up @ down * alpha / rank, all layers flattened) to the bf16 adapter's is at least ``--min-cosine`` (default 0.9)
times what the bf16 rerun reaches. ``--smoke``: a tiny model on the CPU, checks the script only.

    python benchmarks/fp8_quality.py [--steps 500] [--resolution 512] [--images 8] [--held-out 4]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  the benchmark's model, data and import helpers

TIMESTEPS = (0.25, 0.5, 0.75)


def samples(count: int, resolution: int, tokens: int, width: int, seed: int) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    return [(torch.randn(1, 16, side, side, generator=g), torch.randn(1, tokens, width, generator=g),
             torch.randn(1, 768, generator=g)) for _ in range(count)]


def train(pack, patcher, data, steps, fp8: bool):
    core = pack.core
    dataset = core.dataset.TrainingDataset.from_batches(torch.cat([s[0] for s in data]),
                                                        [(s[1][0], s[2][0]) for s in data])
    config = core.config.TrainConfig(steps=steps, learning_rate=1e-4, rank=16, alpha=16.0, seed=0, guidance=1.0,
                                     fp8_matmul="on" if fp8 else "off")
    start = time.perf_counter()
    with torch.inference_mode():
        result = core.training.train_lora(patcher.clone(), dataset, config)
    return result, time.perf_counter() - start


def flow_loss(pack, patcher, weights, data) -> float:
    """Mean velocity MSE over ``data`` x TIMESTEPS with bf16 compute, the adapter (if any) in peft layers."""
    import comfy.model_management

    core = pack.core
    comfy.model_management.load_models_gpu([patcher])
    base = patcher.model
    transformer = base.diffusion_model
    device = patcher.load_device
    g = torch.Generator().manual_seed(1234)
    losses = []
    with torch.inference_mode(False), core.training.frozen_base(transformer), contextlib.ExitStack() as stack:
        if weights is not None:
            existing = {n: (torch.nn.Parameter(weights.down[n].to(device), requires_grad=False),
                            torch.nn.Parameter(weights.up[n].to(device), requires_grad=False)) for n in weights.down}
            stack.enter_context(core.lora_layers.lora_injected(transformer, weights.rank, weights.alpha, 0,
                                                               existing=existing, device=device))
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for latent, context, pooled in data:
                x0 = base.process_latent_in(latent).to(device)
                for t in TIMESTEPS:
                    noise = torch.randn(x0.shape, generator=g).to(device)
                    xt = (1 - t) * x0 + t * noise
                    v = transformer(xt, torch.full((1,), t, device=device), context.to(device), y=pooled.to(device),
                                    guidance=torch.ones(1, device=device), transformer_options={})
                    losses.append(torch.nn.functional.mse_loss(v.float(), noise - x0).item())
    return sum(losses) / len(losses)


def inner(a, b) -> float:
    """<delta_a, delta_b> summed over layers, delta = alpha / rank * up @ down, from the factors alone:
    <U1 D1, U2 D2> = sum((U1^T U2) * (D1 D2^T)). (The full deltas of every layer, 47 GB in fp32 per adapter, got
    the first GPU run killed for host memory.)"""
    total = 0.0
    for n in a.down:
        ups = a.up[n].double().t() @ b.up[n].double()
        downs = a.down[n].double() @ b.down[n].double().t()
        total += float((ups * downs).sum()) * (a.alpha / a.rank) * (b.alpha / b.rank)
    return total


def cosine(a, b) -> float:
    return inner(a, b) / (inner(a, a) * inner(b, b)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--min-cosine", type=float, default=0.9)
    parser.add_argument("--smoke", action="store_true")
    a = parser.parse_args()
    if a.smoke:
        a.steps, a.resolution, a.images, a.held_out = 6, 64, 2, 1
    pack = train_step.import_comfyui_and_pack(cpu=a.smoke)
    patcher, params = train_step.random_flux_dev(train_step.TINY_FLUX if a.smoke else train_step.FLUX_DEV)
    width = patcher.model.diffusion_model.params.context_in_dim
    tokens = 8 if a.smoke else 512
    training = samples(a.images, a.resolution, tokens, width, seed=1)
    held_out = samples(a.held_out, a.resolution, tokens, width, seed=2)
    common = {"benchmark": "fp8_quality", "comfyui_version": train_step.comfyui_version(),
              "gpu": torch.cuda.get_device_name() if train_step.CUDA else "cpu (smoke)", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "parameters": params, "steps": a.steps,
              "resolution": a.resolution, "images": a.images, "held_out_images": a.held_out, "timesteps": TIMESTEPS}

    def emit(row):
        print(json.dumps({**row, **common}), flush=True)

    base = {"held_out": flow_loss(pack, patcher, None, held_out), "training": flow_loss(pack, patcher, None, training)}
    emit({"adapter": "none (base)", "held_out_loss": round(base["held_out"], 5), "training_loss": round(base["training"], 5)})
    runs = {}
    for name, fp8 in (("bf16", False), ("bf16_again", False), ("fp8", True)):
        result, seconds = train(pack, patcher, training, a.steps, fp8)
        train_step.free_everything()
        losses = result.losses
        runs[name] = {"weights": result.weights, "held_out": flow_loss(pack, patcher, result.weights, held_out),
                      "training": flow_loss(pack, patcher, result.weights, training)}
        train_step.free_everything()
        emit({"adapter": name, "held_out_loss": round(runs[name]["held_out"], 5),
              "training_loss": round(runs[name]["training"], 5), "train_seconds": round(seconds, 1),
              "loss_first_10": round(statistics.mean(losses[:10]), 5),
              "loss_last_50": round(statistics.mean(losses[-50:]), 5)})
    reference = runs["bf16"]["weights"]
    rerun_cosine = cosine(runs["bf16_again"]["weights"], reference)
    fp8_cosine = cosine(runs["fp8"]["weights"], reference)
    gap = (runs["fp8"]["held_out"] - runs["bf16"]["held_out"]) / runs["bf16"]["held_out"]
    rerun_gap = (runs["bf16_again"]["held_out"] - runs["bf16"]["held_out"]) / runs["bf16"]["held_out"]
    emit({"verdict": "pass" if abs(gap) <= a.tolerance and fp8_cosine >= a.min_cosine * rerun_cosine else "fail",
          "held_out_rel_gap_fp8_vs_bf16": round(gap, 5), "held_out_rel_gap_rerun_vs_bf16": round(rerun_gap, 5),
          "held_out_improvement_bf16": round(base["held_out"] - runs["bf16"]["held_out"], 5),
          "held_out_improvement_fp8": round(base["held_out"] - runs["fp8"]["held_out"], 5),
          "delta_cosine_fp8_vs_bf16": round(fp8_cosine, 5), "delta_cosine_rerun_vs_bf16": round(rerun_cosine, 5),
          "tolerance": a.tolerance, "min_cosine_fraction_of_rerun": a.min_cosine})


if __name__ == "__main__":
    main()
