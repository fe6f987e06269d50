"""Diagnostic for the low-VRAM crash: runs Dev2ProTrainLoRA sessions on full-size Flux-dev in one process in a given
order, low-VRAM ones (emulated small card) among them. ``--sequence eager:1024 low_vram:1024`` crashed with a CUDA
illegal memory access in cuDNN's attention backward while swap sessions used cuDNN attention (7 of 7 H100 runs;
``--cudnn-attention-in-swap`` brings that back). Prints one JSON line per finished session; a crash ends the
process, so the last line printed says which session did not finish.

    python benchmarks/low_vram_after_fast.py [--rounds 1] [--sequence fast:1024 low_vram:1024 fast:512 low_vram:1024]
                                             [--python-launcher] [--card-gib 10]

A session is MODE:RESOLUTION with MODE fast (compiled), eager (compile off), low_vram (compiled, block swap) or
low_vram_eager (block swap, compile off).
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


MODES = ("fast", "eager", "low_vram", "low_vram_eager")


def session(spec: str) -> tuple[str, int]:
    mode, _, resolution = spec.partition(":")
    if mode not in MODES or not resolution.isdigit():
        raise argparse.ArgumentTypeError(f"{spec!r}: want MODE:RESOLUTION, MODE one of {', '.join(MODES)}")
    return mode, int(resolution)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sequence", type=session, nargs="+",
                        default=[session(s) for s in "fast:1024 low_vram:1024 fast:512 low_vram:1024 fast:1024 "
                                                     "low_vram:1024".split()])
    parser.add_argument("--python-launcher", action="store_true", help="Inductor's Python launcher, not its C++ wrapper")
    parser.add_argument("--cudnn-attention-in-swap", action="store_true",
                        help="let block-swap sessions use cuDNN attention (the crash's setting before the fix)")
    parser.add_argument("--swap-on-compute-stream", action="store_true",
                        help="block swap copies on the compute stream, without overlap (a diagnostic for races)")
    parser.add_argument("--card-gib", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=6)
    a = parser.parse_args()
    pack = train_step.import_comfyui_and_pack(cpu=False)
    speed = {"cpp_wrapper": not a.python_launcher, "swap_copy_stream": not a.swap_on_compute_stream}
    if a.cudnn_attention_in_swap:
        speed["attention_in_swap"] = "cudnn_first"
    patcher, _ = train_step.random_flux_dev(train_step.FLUX_DEV)
    for round_ in range(a.rounds):
        for index, (mode, resolution) in enumerate(a.sequence):
            print(f"start: round {round_} session {index} {mode} {resolution}", file=sys.stderr, flush=True)
            train_step.free_everything()
            placeholder = None
            if mode.startswith("low_vram"):
                free = torch.cuda.mem_get_info()[0]
                placeholder = torch.empty(max(0, free - int(a.card_gib * train_step.GIB)), dtype=torch.uint8,
                                          device="cuda")
            try:
                row = train_step.timed(lambda: train_step.run_ours(
                    pack, patcher, resolution, a.steps, 512, 16, speed=speed,
                    compile="off" if mode.endswith("eager") else "auto"),
                    2, placeholder.numel() if placeholder is not None else 0)
                torch.cuda.synchronize()
            finally:
                del placeholder
            print(json.dumps({"round": round_, "session": index, "mode": mode, "resolution": resolution,
                              "launcher": "python" if a.python_launcher else "c++", "swap_side_stream": not a.swap_on_compute_stream,
                              "cudnn_attention_in_swap": a.cudnn_attention_in_swap,
                              **row}), flush=True)
    train_step.free_everything()


if __name__ == "__main__":
    main()
