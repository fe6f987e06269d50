"""Diagnostic, not a benchmark: where a training step's GPU time goes, by kernel, and how long the GPU sits idle,
for ours on a full-width Flux (by default shallow: 4 double + 8 single blocks), fp8_matmul off and on:

    python benchmarks/profile_step.py [--resolutions 1024] [--depth 4 8] [--fp8 off on] [--pin on] [--rows 60]
                                      [--offload default] [--budgets DOUBLE:SINGLE ...] [--profiled-steps 2]

Per setting: the median seconds per step over steps 3-12 (not profiled), then a profile of the next two. Prints one
JSON line with kernel time per step by category (GEMMs, attention, Inductor's fused kernels, optimizer, copies,
the rest), the GPU's idle time per step and its longest idle gaps, then the top kernels by self GPU time.
``--pin off`` turns off page-locked input copies (SpeedPlan.pinned_inputs); ``--budgets`` sets the compiler's
activation memory budgets of the double and single blocks (SpeedPlan.recompute_budgets); ``--offload``
moves block inputs to host memory always, never, or by the trainer's rule. ``--profiled-steps 0`` only times.
Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH).
"""
import argparse
import json
import os
import re
import statistics
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402

CATEGORIES = (  # first match wins
    ("attention", r"cudnn|fmha|flash|attention|sdpa"),
    ("gemm", r"nvjet|gemm|sm90_xmma|cutlass|cublas|splitK"),
    ("fused", r"^triton_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy_cast", r"copy|convert|cast|elementwise|vectorized|unrolled"),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def kernel_rows(profiler, steps: int) -> list[dict]:
    rows = []
    for e in profiler.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
            continue
        rows.append({"kernel": e.key, "ms_per_step": e.self_device_time_total / 1000 / steps,
                     "calls_per_step": e.count / steps, "category": category(e.key)})
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def idle_gaps(profiler, steps: int, top: int = 8) -> dict:
    """GPU idle time between the first and last kernel of the profiled steps, and the longest gaps with the
    kernels around them (what the GPU waited to start)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in profiler.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, end, before = [], spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            gaps.append((start - end, before, name))
        if stop > end:
            end, before = stop, name
    idle = sum(g for g, _, _ in gaps)
    return {"window_ms_per_step": round((end - spans[0][0]) / 1000 / steps, 3),
            "idle_ms_per_step": round(idle / 1000 / steps, 3),
            "longest_idle": [{"us": round(g), "after": a[:60], "before": b[:60]}
                             for g, a, b in sorted(gaps, reverse=True)[:top]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", "--resolutions", type=int, nargs="+", default=[1024])
    parser.add_argument("--depth", type=int, nargs=2, default=[4, 8], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--fp8", nargs="*", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--pin", nargs="*", default=["on"], choices=["off", "on"])
    parser.add_argument("--offload", nargs="*", default=["default"], choices=["default", "off", "on"],
                        help="block inputs in host memory between forward and backward (SpeedPlan."
                             "offload_inputs_from_tokens): always, never, or the trainer's rule")
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--profiled-steps", type=int, default=2, help="0: time and measure memory only")
    parser.add_argument("--budgets", nargs="*", default=["default"], metavar="DOUBLE:SINGLE",
                        help="activation memory budgets of the recomputed double and single blocks, e.g. 0.05:0.07 "
                             "(SpeedPlan.recompute_budgets); default: the trainer's")
    parser.add_argument("--rows", type=int, default=60)
    parser.add_argument("--cpu-ops", type=int, default=0, help="also trace the CPU and print its top N ops by self time")
    a = parser.parse_args()
    pack = train_step.import_comfyui_and_pack(cpu=False)
    patcher, _ = train_step.random_flux_dev(dict(train_step.FLUX_DEV, depth=a.depth[0], depth_single_blocks=a.depth[1]))
    profiled_steps = a.profiled_steps
    timed = a.timed_steps
    settings = [(r, f, p, o, b) for r in a.resolution for f in a.fp8 for p in a.pin for o in a.offload for b in a.budgets]
    for resolution, fp8, pin, offload, budgets in settings:
        speed = {"pinned_inputs": pin == "on"}
        if offload != "default":
            speed["offload_inputs_from_tokens"] = 0 if offload == "on" else None
        if budgets != "default":
            double, single = (float(x) for x in budgets.split(":"))
            speed["recompute_budgets"] = {(kind, offloaded): value for kind, value in (("double", double), ("single", single))
                                          for offloaded in (False, True)}
        torch.cuda.reset_peak_memory_stats()
        state = {"steps": 0, "profiler": None}
        clock = train_step.StepClock()

        def after_step(optimizer, args, kwargs):
            state["steps"] += 1
            if state["steps"] == 2 + timed and profiled_steps:
                activities = [torch.profiler.ProfilerActivity.CUDA]
                if a.cpu_ops:
                    activities.append(torch.profiler.ProfilerActivity.CPU)
                state["profiler"] = torch.profiler.profile(activities=activities)
                state["profiler"].start()
            if state["steps"] == 2 + timed + profiled_steps and profiled_steps:
                torch.cuda.synchronize()
                state["profiler"].stop()

        handle = register_optimizer_step_post_hook(after_step)
        with torch.inference_mode():
            _, ran = train_step.run_ours(pack, patcher, resolution, 2 + timed + profiled_steps + 1, 512, 16,
                                         speed=speed, compile="auto", fp8_matmul=fp8)
        budget = ran["plan"]["recompute_budgets"]
        handle.remove()
        train_step.free_everything()
        seconds = clock.seconds(warmup=2)[:timed]  # steps 3 to 2 + timed, before the profiler starts
        summary = {"fp8_matmul": fp8, "pinned_inputs": pin, "offload": offload, "budget": budget,
                   "resolution": resolution, "depth": a.depth,
                   "seconds_per_step_median": round(statistics.median(seconds), 4),
                   "seconds_per_step": [round(x, 4) for x in seconds],
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if not profiled_steps:
            print(json.dumps(summary), flush=True)
            continue
        rows = kernel_rows(state["profiler"], profiled_steps)
        summary["kernel_ms_per_step"] = round(sum(r["ms_per_step"] for r in rows), 3)
        for label in [c for c, _ in CATEGORIES] + ["other"]:
            chosen = [r for r in rows if r["category"] == label]
            summary[label] = {"ms": round(sum(r["ms_per_step"] for r in chosen), 3),
                              "calls": sum(r["calls_per_step"] for r in chosen)}
        summary.update(idle_gaps(state["profiler"], profiled_steps))
        print(json.dumps(summary), flush=True)
        for r in rows[:a.rows]:
            print(json.dumps(dict(r, ms_per_step=round(r["ms_per_step"], 4))), flush=True)
        if a.cpu_ops:
            cpu = [e for e in state["profiler"].key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
            for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:a.cpu_ops]:
                print(json.dumps({"cpu_op": e.key[:90], "self_ms_per_step": round(e.self_cpu_time_total / 1000 / profiled_steps, 3),
                                  "total_ms_per_step": round(e.cpu_time_total / 1000 / profiled_steps, 3),
                                  "calls_per_step": e.count / profiled_steps}), flush=True)


if __name__ == "__main__":
    main()
