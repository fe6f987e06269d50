"""Seconds per global step of data-parallel training under torchrun, against one process, on full-size random Flux-dev.

    torchrun --nproc-per-node N benchmarks/distributed_step.py [--resolution 1024] [--variants default fp8 swap]
    torchrun --nproc-per-node 2 benchmarks/distributed_step.py --share-gpu --depth 2 4   # speed paths, 2 ranks, 1 GPU

Rank 0 first trains alone (no process group) at batch N: the one-process reference, run through the same node. Then
every rank joins an NCCL group (gloo with ``--share-gpu``, where NCCL refuses two ranks on one GPU) and trains
Dev2ProTrainLoRA at batch 1 per rank, once per variant: ``default`` (compiled blocks, CUDA graphs of the step with
the all-reduce inside), ``fp8`` (fp8_matmul on), ``swap`` (blocks_to_swap 19). Prints one JSON line per row (rank 0):

- ``seconds_per_step_median``: the GPU-timeline gap between consecutive optimizer steps on rank 0 (CUDA events, as
  benchmarks/train_step.py), after ``--warmup`` steps;
- ``speedup``: the reference's seconds per step (one GPU, the same global batch) over this row's, and
  ``scaling_efficiency`` = speedup / N (1.0: N GPUs are N times as fast; at N = 1 it is the cost of the
  distributed path itself);
- ``losses_match_reference``: the largest relative difference of the per-step losses from the reference's;
- ``step_graphs_captured``: rank 0's sessions that replayed their steps from CUDA graphs.
Model, data and settings as benchmarks/train_step.py (rank 16, 512 text tokens, fp8 base, bf16 compute).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402

VARIANTS = {"default": {"compile": "auto"}, "fp8": {"compile": "auto", "fp8_matmul": "on"},
            "swap": {"compile": "auto", "blocks_to_swap": 19}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--variants", nargs="*", default=["default", "fp8", "swap"], choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--depth", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--share-gpu", action="store_true", help="every rank on GPU 0, through gloo")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (gloo): checks the script only")
    a = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if a.smoke:
        a.resolution, a.steps, a.warmup, a.share_gpu, a.variants = 64, 2, 1, True, ["default"]
    else:
        torch.cuda.set_device(0 if a.share_gpu else int(os.environ["LOCAL_RANK"]))
    pack = train_step.import_comfyui_and_pack(cpu=a.smoke)
    shape = train_step.TINY_FLUX if a.smoke else dict(train_step.FLUX_DEV, depth=a.depth[0],
                                                       depth_single_blocks=a.depth[1])
    patcher, params = train_step.random_flux_dev(shape)
    tokens = 8 if a.smoke else 512
    steps = a.warmup + a.steps
    common = {"benchmark": "distributed_step", "ranks": world, "backend": "gloo" if a.share_gpu else "nccl",
              "shared_gpu": a.share_gpu, "gpu": "cpu (smoke)" if a.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
              "comfyui_version": train_step.comfyui_version(), "parameters": params, "resolution": a.resolution,
              "batch_per_rank": 1, "global_batch": world, "rank": 16, "text_tokens": tokens,
              "date": datetime.date.today().isoformat()}
    reference = None
    if rank == 0:  # one process, batch N, before the group exists
        settings = dict(VARIANTS["default"], batch_size=world)
        reference = train_step.timed(lambda: train_step.run_ours(pack, patcher, a.resolution, steps, tokens, 16,
                                                                 world, **settings), a.warmup)
        print(json.dumps({**common, "row": "one process, batch N", **reference}), flush=True)
        train_step.free_everything()
    torch.distributed.init_process_group("gloo" if a.share_gpu else "nccl",
                                         timeout=pack.core.distributed.STEP_TIMEOUT)
    try:
        for variant in a.variants:
            row = train_step.timed(lambda: train_step.run_ours(pack, patcher, a.resolution, steps, tokens, 16, world,
                                               **VARIANTS[variant]), a.warmup)
            train_step.free_everything()
            if rank == 0:
                ref = reference["losses"]
                diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(row["losses"], ref))
                print(json.dumps({**common, "row": f"{world} ranks, {variant}", "variant": variant,
                                  "settings": VARIANTS[variant],
                                  "speedup": round(reference["seconds_per_step_median"]
                                                   / row["seconds_per_step_median"], 3),
                                  "scaling_efficiency": round(reference["seconds_per_step_median"]
                                                              / row["seconds_per_step_median"] / world, 3),
                                  "losses_match_reference": diff, **row}), flush=True)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
