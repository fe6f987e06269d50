"""The recipe's claim, measured on random weights: LoRAs trained at guidance 1.0 and at 3.5, each one's guidance response.

A full-size random Flux-dev (11.9B parameters, fp8 e4m3fn, bf16 compute; benchmarks/train_step.py builds it) stands
in for both Flux-dev2pro and Flux-dev: random weights have no guidance distillation to wear away, so the numbers say
how the measurement behaves at full size and what it costs, not what happens to the real Flux-dev. Two LoRAs are
trained through Dev2ProTrainLoRA with the same data, seed and steps, one at training guidance 1.0 and one at 3.5;
each is applied to the model and measured against it with Dev2ProGuidanceResponse at its defaults (guidance 1, 2,
3.5, 5, 7; noise 0.5, 0.75, 0.9; 2 seeds; 1024x1024). The check runs a second time with the GPU's free memory cut
to ``--card-gib`` (a placeholder tensor takes the rest), to show it fits a 24 GB card; its seconds are the H200's.
Prints one JSON line per run (training, then each check).

    python benchmarks/guidance_response.py [--steps 300] [--resolution 512] [--images 8] [--card-gib 22]
    python benchmarks/guidance_response.py --smoke     # a tiny model on the CPU: checks the script, not the numbers
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import (FLUX_DEV, GIB, TINY_FLUX, call_v3, comfyui_version, free_everything,  # noqa: E402
                        import_comfyui_and_pack, random_flux_dev)

CUDA = torch.cuda.is_available()


def dataset(core, images: int, resolution: int, width: int, tokens: int):
    """Fixed random latents with one random caption each (seeded), and one more caption held out for the check."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(images, 16, resolution // 8, resolution // 8, generator=g)
    pairs = [(torch.randn(tokens, width, generator=g), torch.randn(768, generator=g)) for _ in range(images + 1)]
    data = core.dataset.TrainingDataset.from_batches(latents, pairs[:images])
    context, pooled = pairs[-1]
    return data, [[context[None], {"pooled_output": pooled[None]}]]


def train(pack, patcher, data, guidance: float, steps: int, rank: int) -> tuple[dict, dict]:
    model = patcher.clone()
    model.model_options[pack.core.config.GUIDANCE_OPTION] = guidance  # what Training Guidance (Dev2Pro) sets
    start = time.perf_counter()
    out = call_v3(pack.nodes.train_nodes.Dev2ProTrainLoRA, {"UNIQUE_ID": "train"}, model=model, dataset=data,
                  steps=steps, learning_rate=1e-4, rank=rank, alpha=float(rank), seed=0, gradient_checkpointing=True)
    losses = out.args[3].losses
    row = {"run": "train", "training_guidance": guidance, "steps": steps, "rank": rank,
           "seconds": round(time.perf_counter() - start, 1), "loss_first_10": statistics.fmean(losses[:10]),
           "loss_last_10": statistics.fmean(losses[-10:])}
    return out.args[0], row


def check(pack, base, with_lora, conditioning, resolution: int, card_gib: float | None) -> dict:
    placeholder = None
    if card_gib is not None and CUDA:
        free_everything()
        placeholder = torch.empty(max(0, torch.cuda.mem_get_info()[0] - int(card_gib * GIB)), dtype=torch.uint8,
                                  device="cuda")
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    node = pack.nodes.guidance_nodes.Dev2ProGuidanceResponse
    out = call_v3(node, {"UNIQUE_ID": "check"}, model=base, model_b=with_lora, conditioning=conditioning,
                  guidance_values="1, 2, 3.5, 5, 7", noise_levels="0.5, 0.75, 0.9", seeds=2, first_seed=0,
                  width=resolution, height=resolution)
    if CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    reserved = placeholder.numel() if placeholder is not None else 0
    peak = (torch.cuda.max_memory_allocated() - reserved) / GIB if CUDA else 0
    del placeholder
    numbers = json.loads(out.args[1])
    return {"seconds": round(seconds, 1), "peak_gib": round(peak, 2), "emulated_card_gib": card_gib,
            "verdict": numbers["verdict"], "base": numbers["base"], "with_lora": numbers["with_lora"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=512, help="training resolution")
    parser.add_argument("--check-resolution", type=int, default=1024)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--card-gib", type=float, default=22.0, help="free memory of the emulated card for the "
                        "second check (a 24 GB card with ComfyUI and the desktop running)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script only")
    a = parser.parse_args()
    if not CUDA and not a.smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke to check the script on the CPU)")
    if a.smoke:
        a.steps, a.resolution, a.check_resolution, a.images, a.tokens, a.rank = 4, 64, 64, 2, 8, 4
    pack = import_comfyui_and_pack(cpu=a.smoke)
    shape = TINY_FLUX if a.smoke else FLUX_DEV
    patcher, params = random_flux_dev(shape)
    data, conditioning = dataset(pack.core, a.images, a.resolution, shape["context_in_dim"], a.tokens)
    common = {"benchmark": "guidance_response", "comfyui_version": comfyui_version(), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if CUDA else "cpu (smoke)", "parameters": params,
              "weights": "random (seed 0), fp8 e4m3fn, bf16 compute", "train_resolution": a.resolution,
              "images": a.images, "date": datetime.date.today().isoformat()}
    rows = []

    def emit(row):
        rows.append({**row, **common})
        line = json.dumps(rows[-1])
        print(line, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(line + "\n")

    apply_lora = pack.nodes.lora_nodes.apply_lora
    loras = {}
    for guidance in (1.0, 3.5):
        loras[guidance], row = train(pack, patcher, data, guidance, a.steps, a.rank)
        emit(row)
    for guidance, lora in loras.items():
        result = check(pack, patcher, apply_lora(patcher, lora, 1.0), conditioning, a.check_resolution, None)
        emit({"run": "check", "training_guidance": guidance, "check_resolution": a.check_resolution, **result})
    result = check(pack, patcher, apply_lora(patcher, loras[3.5], 1.0), conditioning, a.check_resolution,
                   None if a.smoke else a.card_gib)
    emit({"run": "check, emulated card", "training_guidance": 3.5, "check_resolution": a.check_resolution, **result})


if __name__ == "__main__":
    main()
