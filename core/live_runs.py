"""What each training node of this ComfyUI session is doing, for the front end's panel and headless clients.

One ``Run`` per trainer node id (the latest run of that node): its losses, speed, ETA, previews, saved files and
status. The routes in ``nodes/routes.py`` serve it, so a page reloaded mid-run redraws everything, and Stop & save
reaches the training loop through ``request_stop``.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

RUNNING, STOPPING, STOPPED, FINISHED, CANCELLED, FAILED = "running", "stopping", "stopped", "finished", "cancelled", "failed"
ACTIVE = (RUNNING, STOPPING)


class Eta:
    """Seconds left from the wall-clock time of recent steps, previews and logging included: the mean over a window
    of the last ``window`` steps (at least two preview intervals, so a preview's pause is averaged in, not seen as
    a jump), after the first step, whose compile would dominate it."""

    def __init__(self, preview_every: int = 0, window: int = 20):
        self.times: deque[tuple[int, float]] = deque(maxlen=max(window, 2 * preview_every + 1))

    def add(self, step: int, now: float) -> None:
        self.times.append((step, now))

    def seconds_per_step(self) -> float | None:
        if len(self.times) < 2:
            return None
        (first_step, first), (last_step, last) = self.times[0], self.times[-1]
        return (last - first) / (last_step - first_step) if last_step > first_step else None

    def left(self, step: int, total: int) -> float | None:
        rate = self.seconds_per_step()
        return None if rate is None else max(0, total - step) * rate


@dataclass
class Run:
    node: str
    prompt_id: str | None
    total: int
    first_step: int = 0  # a continued run starts here
    status: str = RUNNING
    step: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    learning_rate: float | None = None
    seconds_per_step: float | None = None  # the step's own time, previews excluded
    eta_seconds: float | None = None
    previews: list[dict] = field(default_factory=list)  # {"step", "filename", "subfolder", "type"}
    saved: list[str] = field(default_factory=list)  # files under models/loras written from this run's adapter
    message: str = ""
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    eta: Eta = field(default_factory=Eta, repr=False)

    def summary(self, losses: bool = True) -> dict:
        out = {"node": self.node, "prompt_id": self.prompt_id, "status": self.status, "step": self.step,
               "total": self.total, "first_step": self.first_step, "learning_rate": self.learning_rate,
               "seconds_per_step": self.seconds_per_step, "eta_seconds": self.eta_seconds,
               "previews": list(self.previews), "saved": list(self.saved), "message": self.message,
               "elapsed_seconds": time.time() - self.started}
        if losses:
            out["losses"] = [list(p) for p in self.losses]
        return out


class Runs:
    """The runs of this process, by node id; every method is safe from the HTTP thread and the executor's."""

    def __init__(self):
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()

    def start(self, node: str, prompt_id: str | None, total: int, first_step: int, preview_every: int = 0,
              losses: list[float] = ()) -> Run:
        run = Run(str(node), prompt_id, total, first_step, step=first_step, eta=Eta(preview_every))
        # a continued run shows the curve it continues
        run.losses = [(i + 1, float(v)) for i, v in enumerate(losses)]
        with self._lock:
            self._runs[run.node] = run
        return run

    def step(self, run: Run, step: int, total: int, loss: float, learning_rate: float, seconds: float,
             now: float | None = None) -> None:
        with self._lock:
            run.step, run.total, run.learning_rate, run.seconds_per_step = step, total, learning_rate, seconds
            run.losses.append((step, float(loss)))
            run.eta.add(step, time.time() if now is None else now)
            run.eta_seconds = run.eta.left(step, total)

    def preview(self, run: Run, step: int, image: dict) -> None:
        with self._lock:
            run.previews.append({"step": step, **image})

    def end(self, run: Run, status: str, message: str = "") -> None:
        with self._lock:
            run.status, run.message, run.eta_seconds = status, message, None

    def saved(self, node: str | None, path: str) -> Run | None:
        """A file was written from the adapter of ``node``'s latest run; returns that run (None if unknown)."""
        with self._lock:
            run = self._runs.get(str(node)) if node is not None else None
            if run is not None:
                run.saved.append(path)
            return run

    def request_stop(self, node: str | None = None, prompt_id: str | None = None) -> list[str]:
        """Ask the running trainers (``node``, or those of ``prompt_id``, or all) to stop after their current step;
        returns the node ids asked."""
        with self._lock:
            asked = []
            for run in self._runs.values():
                if run.status != RUNNING or (node is not None and run.node != str(node)):
                    continue
                if prompt_id is not None and run.prompt_id != prompt_id:
                    continue
                run.stop_requested, run.status = True, STOPPING
                asked.append(run.node)
            return asked

    def get(self, node: str) -> Run | None:
        with self._lock:
            return self._runs.get(str(node))

    def summaries(self, losses: bool = False) -> list[dict]:
        with self._lock:
            return [run.summary(losses) for run in self._runs.values()]


RUNS = Runs()
