"""Diagnostic, not a benchmark: torch.profiler tables (kernel and CPU time) of two training steps of ours on a
shallow full-width Flux (4 double + 8 single blocks), fp8_matmul off and on, after three warm-up steps:

    python benchmarks/profile_step.py [resolution]

Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH).
"""
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402


def main():
    resolution = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    pack = train_step.import_comfyui_and_pack(cpu=False)
    patcher, _ = train_step.random_flux_dev(dict(train_step.FLUX_DEV, depth=4, depth_single_blocks=8))
    for fp8 in ("off", "on"):
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
        print(f"==== fp8_matmul={fp8} resolution={resolution} (2 steps, 4+8 blocks)")
        print(state["profiler"].key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70))


if __name__ == "__main__":
    main()
