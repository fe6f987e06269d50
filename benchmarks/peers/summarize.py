"""One JSON row from a peer's step log (benchmarks/peers/sitecustomize.py), shaped like train_step.py's rows.

    python summarize.py STEP_LOG --trainer NAME --resolution N [--warmup 3] [--settings JSON|FILE] [--extra JSON]
                        [--wall SECONDS]

The time of a step is the GPU-timeline gap between consecutive optimizer steps; the median is over the gaps after
the first ``--warmup`` steps (train_step.py's rule: 13 optimizer steps give 3 warm-up and 10 timed). ``peak_gib`` is
max_memory_allocated over those steps, resident weights included; ``process_peak_gib`` the peak before them (model
loading, quantizing, caching). ``--extra`` is merged into the row as it is.
"""
import argparse
import datetime
import json
import os
import statistics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--settings", default="{}", help="the settings as JSON, or a JSON file")
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--wall", type=float)
    a = ap.parse_args()
    rows = []
    if os.path.exists(a.log):
        with open(a.log) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    timed = [r for r in rows if r["step"] >= a.warmup]
    times = [r["seconds"] for r in timed]
    row = {"trainer": a.trainer, "resolution": a.resolution, "steps_logged": len(rows) + 1 if rows else 0,
           "steps_timed": len(timed),
           "seconds_per_step_median": round(statistics.median(times), 4) if times else None,
           "seconds_per_step_mean": round(statistics.mean(times), 4) if times else None,
           "peak_gib": round(max(r["peak_gib"] for r in timed), 2) if timed else None,
           "process_peak_gib": next((r["process_peak_gib"] for r in timed if r["process_peak_gib"] is not None), None),
           "trainable_params": rows[-1]["trainable_params"] if rows else None,
           "step_seconds": [r["seconds"] for r in rows]}
    try:
        import torch

        row.update(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__)
    except Exception:  # noqa: BLE001  summarizing must not need the trainer's environment
        pass
    if a.wall is not None:
        row["process_wall_seconds"] = a.wall
    settings = a.settings
    if os.path.isfile(settings):
        with open(settings) as f:
            settings = f.read()
    row["settings"] = json.loads(settings)
    row.update(json.loads(a.extra))
    row["date"] = datetime.date.today().isoformat()
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
