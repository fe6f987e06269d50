"""Diagnostic, not a benchmark: torch.profiler tables (kernel and CPU time) of two training steps of ours on a
full-width Flux (by default shallow: 4 double + 8 single blocks), fp8_matmul off and on, after three warm-up steps:

    python benchmarks/profile_step.py [--resolution 1024] [--depth 4 8] [--fp8 off on] [--sort cuda_time_total]

Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH).
"""
import argparse
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--depth", type=int, nargs=2, default=[4, 8], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--fp8", nargs="*", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--sort", default="cuda_time_total", help="a key_averages column, e.g. self_cpu_time_total")
    a = parser.parse_args()
    resolution = a.resolution
    pack = train_step.import_comfyui_and_pack(cpu=False)
    patcher, _ = train_step.random_flux_dev(dict(train_step.FLUX_DEV, depth=a.depth[0], depth_single_blocks=a.depth[1]))
    for fp8 in a.fp8:
        state = {"steps": 0, "profiler": None}

        def after_step(optimizer, args, kwargs):
            state["steps"] += 1
            if state["steps"] == 4:
                state["profiler"] = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU])
                state["profiler"].start()
            if state["steps"] == 6:
                torch.cuda.synchronize()
                state["profiler"].stop()

        handle = register_optimizer_step_post_hook(after_step)
        with torch.inference_mode():
            train_step.run_ours(pack, patcher, resolution, 7, 512, 16, compile="auto", fp8_matmul=fp8)
        handle.remove()
        train_step.free_everything()
        print(f"==== fp8_matmul={fp8} resolution={resolution} (2 steps, {a.depth[0]}+{a.depth[1]} blocks)")
        print(state["profiler"].key_averages().table(sort_by=a.sort, row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
