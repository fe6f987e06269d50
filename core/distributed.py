"""Data-parallel training across the ranks of a torch.distributed job (scripts/distributed_train.py under torchrun).

Every rank executes the same graph on its own device. Training splits every global batch over the ranks (rank r
takes a contiguous share of its rows; a bucket's smaller last batch may leave a rank none) and sums the adapter's
gradients with one all-reduce per optimizer step, after the backward pass and before clipping. Each rank's loss is
weighted by its share of the rows, so the summed gradient is the one-process gradient of the whole batch and the
run does not depend on the number of ranks.

The step's all-reduce also carries a few flags: whether any rank asked to stop (Ctrl-C / SIGTERM, seen at a step
boundary) and which ranks failed inside their forward or backward pass. Every rank therefore takes the same
decision at the same step: go on, stop after it, or end the run with the adapter from before it.
"""
from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

import torch

# Set from a signal handler (scripts/distributed_train.py): stop after the current step on every rank. Not ComfyUI's
# interrupt flag, which makes ComfyUI 0.33's ops raise inside a forward pass, where one rank leaving an all-reduce
# would stall the others.
_stop = threading.Event()
STEP_TIMEOUT = datetime.timedelta(minutes=60)  # a collective waits this long: rank 0 may sample previews meanwhile


def request_stop() -> None:
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


class PeerFailed(RuntimeError):
    """Another rank failed, or this one did; every rank raises it at the same step. ``result`` (a TrainResult, when
    training had begun) holds the adapter from before that step."""

    def __init__(self, message: str, step: int = 0, result=None):
        super().__init__(message)
        self.step, self.result = step, result


class CollectiveFailed(RuntimeError):
    """A collective could not complete: a rank left without taking part."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device  # where this rank's own collectives run: its GPU with NCCL, the CPU with gloo

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: int) -> slice:
        """This rank's rows of a global batch of ``rows``: contiguous, the first ``rows % world`` ranks one more."""
        base, extra = divmod(rows, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def rows(self, rows: int) -> int:
        share = self.share(rows)
        return share.stop - share.start

    def agree(self, ok: bool) -> bool:
        """Whether every rank is ok; also a barrier."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        torch.distributed.all_reduce(flag)
        return float(flag) == 0.0

    def flags(self, device: torch.device) -> torch.Tensor:
        """A fresh step-flags tensor on the training ``device`` (gloo reduces GPU tensors too): [stop, failed(rank
        0), ..., failed(rank world-1)], all clear."""
        return torch.zeros(1 + self.world, device=device)

    def reduce_step(self, params: list[torch.nn.Parameter], loss: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """Sum the gradients of ``params`` (in place), the weighted losses and the flags over the ranks, in one
        all-reduce; returns [loss, stop, failed per rank]. One flat buffer: with a rank-16 Flux adapter it is
        306 MB of fp32, and one collective keeps every rank's sequence of collectives the same whatever it trained."""
        grads = []
        for p in params:
            if p.grad is None:  # a rank without rows this step
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).float(), flags.float()])
        try:
            torch.distributed.all_reduce(flat)
        except RuntimeError as e:  # gloo: a rank's process ended (its sockets closed); NCCL waits instead
            raise CollectiveFailed(f"the gradient all-reduce failed, another rank has stopped ({e})") from e
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset:]

    def describe_failed(self, failed: list[float]) -> str:
        return ", ".join(str(r) for r, f in enumerate(failed) if f > 0)


def current() -> Ranks | None:
    """The ranks of this process's torch.distributed job, or None when it runs alone (the UI, scripts, tests)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)


def global_batch(per_rank: int) -> int:
    """The batch a run trains on when each rank takes ``per_rank`` rows (what its settings and state record)."""
    ranks = current()
    return per_rank if ranks is None else per_rank * ranks.world


def is_main() -> bool:
    ranks = current()
    return ranks is None or ranks.main


def main_first(work, what: str):
    """``work()`` on rank 0 first, then on the others (which then find what rank 0 cached). A failure on rank 0
    is raised on every rank, so none waits for it."""
    ranks = current()
    if ranks is None or ranks.world == 1:
        return work()
    result, error = None, None
    if ranks.main:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001  re-raised below, after the others have heard of it
            error = e
    ok = ranks.agree(error is None)
    if error is not None:
        raise error
    if not ok:
        raise PeerFailed(f"rank 0 failed while {what}; its log says why")
    return result if ranks.main else work()
