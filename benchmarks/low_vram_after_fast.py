"""Diagnostic for the known low-VRAM crash: alternates fast sessions and low-VRAM sessions (emulated small card)
of Dev2ProTrainLoRA on full-size Flux-dev in one process, the order in which the low-VRAM session crashed with a
CUDA illegal memory access in 2 of 4 H100 runs. Prints one JSON line per finished session; a crash ends the
process, so the last line printed says which session did not finish.

    python benchmarks/low_vram_after_fast.py [--rounds 3] [--resolutions 1024 512] [--card-gib 10]

Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolutions", type=int, nargs="*", default=[1024, 512],
                        help="fast-session resolutions, taken in turn (the low-VRAM session is always 1024)")
    parser.add_argument("--card-gib", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=6)
    a = parser.parse_args()
    pack = train_step.import_comfyui_and_pack(cpu=False)
    patcher, _ = train_step.random_flux_dev(train_step.FLUX_DEV)
    side_stream = not os.environ.get("DEV2PRO_SWAP_ON_COMPUTE_STREAM")
    for round_ in range(a.rounds):
        resolution = a.resolutions[round_ % len(a.resolutions)]
        for mode in ("fast", "low_vram"):
            print(f"start: round {round_} {mode}", file=sys.stderr, flush=True)
            train_step.free_everything()
            placeholder = None
            if mode == "low_vram":
                free = torch.cuda.mem_get_info()[0]
                placeholder = torch.empty(max(0, free - int(a.card_gib * train_step.GIB)), dtype=torch.uint8,
                                          device="cuda")
            try:
                row = train_step.timed(lambda: train_step.run_ours(
                    pack, patcher, 1024 if mode == "low_vram" else resolution, a.steps, 512, 16, compile="auto"),
                    2, placeholder.numel() if placeholder is not None else 0)
                torch.cuda.synchronize()
            finally:
                del placeholder
            print(json.dumps({"round": round_, "mode": mode, "resolution": 1024 if mode == "low_vram" else resolution,
                              "swap_side_stream": side_stream, **row}), flush=True)
    train_step.free_everything()


if __name__ == "__main__":
    main()
