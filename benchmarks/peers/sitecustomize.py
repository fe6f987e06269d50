"""Step clock for a peer trainer's process, the same clock benchmarks/train_step.py puts on ours and ComfyUI's.

Put this folder on PYTHONPATH and set PEER_STEP_LOG to a file: Python imports this module at start, and every
optimizer step of any torch optimizer (accelerate's wrappers call the inner optimizer's step, which the global hook
sees) records a CUDA event on the current stream; no sync is added. Each finished step appends one JSON line:
``{"step": n, "seconds": gap since step n-1 on the GPU timeline, "peak_gib": max_memory_allocated since the end of
step PEER_WARMUP (default 3), "process_peak_gib": max_memory_allocated before that reset, "trainable_params": numel
of the first stepped optimizer's parameters}``. Lines are written once their events have completed (queried, not
waited for), the rest at exit.

PEER_NO_CUDNN_SDPA=1 turns cuDNN's attention off in SDPA, which torch 2.11 picks first on Hopper: its backward hit
illegal memory accesses in our own runs (benchmarks/results/2026-11-24_h100_low_vram_crash_isolated.txt). ai-toolkit
crashed with the same error (2026-12-02) and trained with it off, on new random weights as well: which of the two
changes fixed it is not known.
"""
import atexit
import json
import os

_LOG = os.environ.get("PEER_STEP_LOG")
if _LOG:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _WARMUP = int(os.environ.get("PEER_WARMUP", "3"))
    _state = {"events": [], "written": 0, "peak_before": None, "params": None}
    GIB = 2**30

    def _write(final=False):
        events = _state["events"]
        with open(_LOG, "a") as f:
            while _state["written"] + 1 < len(events):
                i = _state["written"] + 1
                (a, _), (b, peak) = events[i - 1], events[i]
                if not final and not b.query():
                    break
                f.write(json.dumps({"step": i, "seconds": round(a.elapsed_time(b) / 1000, 5),
                                    "peak_gib": round(peak / GIB, 3),
                                    "process_peak_gib": _state["peak_before"],
                                    "trainable_params": _state["params"]}) + "\n")
                _state["written"] = i

    def _record(optimizer, args, kwargs):
        if not torch.cuda.is_available():
            return
        if _state["params"] is None:
            _state["params"] = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if len(_state["events"]) == _WARMUP:  # peak of the steps from here on: resident weights and activations
            _state["peak_before"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
            torch.cuda.reset_peak_memory_stats()
        _state["events"].append((event, torch.cuda.max_memory_allocated()))
        _write()

    def _at_exit():
        if _state["events"]:
            torch.cuda.synchronize()
            _write(final=True)

    register_optimizer_step_post_hook(_record)
    atexit.register(_at_exit)

if os.environ.get("PEER_NO_CUDNN_SDPA") == "1":
    import torch

    torch.backends.cuda.enable_cudnn_sdp(False)
