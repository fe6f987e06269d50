"""How a training step's work reaches the GPU: launched op by op, or replayed from two CUDA graphs.

Launching a step's ~10,000 kernels from Python bounds the step at small image sizes (at 512x512 on an H100 the GPU
idled for a tenth of it) and leaves gaps at large ones, whenever the CPU falls behind. A CUDA graph records the
step's kernels once and replays them with one launch. On the H100 (benchmarks/train_step.py --no-graphs-too):
512x512 0.232 -> 0.183 s (fp8_matmul 0.264 -> 0.165 s), 1024x1024 0.506 -> 0.490 s (fp8_matmul 0.448 -> 0.435 s),
same memory, losses within 0.02 % (bf16) and 0.2 % (fp8_matmul) of the eager steps'.

Inductor's own CUDA graphs (``mode="reduce-overhead"``) were measured first and left out: their graph trees are
process-wide and keep every weight they saw alive after the session (11.4 GiB per session). Here the graphs belong
to one training session and are freed with it.

A step is two graphs, so that a stop asked for after step k still discards step k+1's gradients before its update,
as the eager loop does: the forward and backward passes (up to the loss and gradient norm), then the optimizer
update. Their inputs are static tensors that each step's batch is copied into; the learning rate is a tensor on the
GPU. The graphs are captured at a session's third step, once the compiled blocks have compiled and warmed up.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

log = logging.getLogger("dev2pro-lora")

StepInputs = Sequence[Sequence[torch.Tensor]]  # per micro-batch: the tensors its forward reads
Gradients = Callable[[StepInputs], torch.Tensor]  # queues forward and backward; returns [loss, gradient norm]


class EagerSteps:
    """A step launched kernel by kernel. An update is skipped when the step's loss or gradient norm is not finite:
    with ``skip_non_finite`` by the optimizer (fused AdamW) on the device, so that no host sync is needed to keep it
    out; otherwise after reading them here."""

    outcome = "eager"  # how the session ran (TrainResult.speed); GraphedSteps says whether it replayed

    def __init__(self, optimizer: torch.optim.Optimizer, gradients: Gradients, skip_non_finite: bool):
        self.optimizer = optimizer
        self._gradients = gradients
        self.skip_non_finite = skip_non_finite

    def gradients(self, inputs: StepInputs) -> torch.Tensor:
        """Queue the forward and backward passes; returns [loss, gradient norm] on the device, not read."""
        return self._gradients(inputs)

    def update(self, learning_rate: float, stats: torch.Tensor) -> None:
        """Queue the optimizer update from the gradients of the last ``gradients`` call."""
        if not self.skip_non_finite and not bool(torch.isfinite(stats).all()):
            self.optimizer.zero_grad(set_to_none=True)
            return
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self._step(stats, self.optimizer.step)
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self, stats: torch.Tensor, step: Callable[[], object]) -> None:
        if self.skip_non_finite:
            self.optimizer.found_inf = (~torch.isfinite(stats).all()).float()
        step()

    def close(self) -> None:
        pass


class GraphedSteps(EagerSteps):
    """Eager for the session's first ``warmup`` steps (SpeedPlan.step_graph_warmup), then captured and replayed. Any
    failure to capture (an op the graph cannot hold, a recompile) logs why and leaves the session eager."""

    def __init__(self, optimizer: torch.optim.Optimizer, gradients: Gradients, skip_non_finite: bool,
                 device: torch.device, warmup: int):
        super().__init__(optimizer, gradients, skip_non_finite)
        self.device = device
        self.warmup = warmup
        self.eager_steps = 0
        self.failed = False
        self.captured = False
        self._replayed = False  # whether the current step runs from the graphs
        self.inputs: list[list[torch.Tensor]] | None = None  # static: each step's batch is copied in
        self.stats: torch.Tensor | None = None  # static output of the gradients graph
        self.learning_rate: torch.Tensor | None = None
        self._graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self._groups = [(g["lr"], g.get("capturable", False)) for g in optimizer.param_groups]

    @property
    def replaying(self) -> bool:
        return self._graphs is not None

    @property
    def outcome(self) -> str:
        """How this session ran: "replayed" from its graphs, "failed" to capture them (eager), or "eager" (too few
        steps to capture)."""
        return "failed" if self.failed else "replayed" if self.captured else "eager"

    def gradients(self, inputs: StepInputs) -> torch.Tensor:
        self._replayed = self._replays(inputs)
        if not self._replayed:
            self.eager_steps += 1
            self.optimizer.zero_grad(set_to_none=True)  # not into the graph's gradients
            return super().gradients(inputs)
        for static, new in zip(_flat(self.inputs), _flat(inputs)):
            static.copy_(new, non_blocking=True)
        self._graphs[0].replay()
        return self.stats

    def _replays(self, inputs: StepInputs) -> bool:
        if self.failed or (not self.replaying and self.eager_steps < self.warmup):
            return False
        if not self.replaying:
            return self._capture(inputs)
        # a batch of another shape (a smaller last batch of an image size, another size) runs eagerly
        return [t.shape for t in _flat(inputs)] == [t.shape for t in _flat(self.inputs)]

    def update(self, learning_rate: float, stats: torch.Tensor) -> None:
        if not self._replayed:
            return super().update(learning_rate, stats)
        self.learning_rate.fill_(learning_rate)
        # the optimizer's own step hooks (torch.optim.Optimizer.register_step_*_hook and the global ones) run around
        # each replayed update as they would around optimizer.step(): timing and logging tools rely on them
        # (in torch's order: global pre-hooks first, global post-hooks last)
        hooks = self.optimizer._optimizer_step_pre_hooks, self.optimizer._optimizer_step_post_hooks
        for hook in (*_global_optimizer_pre_hooks.values(), *hooks[0].values()):
            hook(self.optimizer, (), {})
        self._graphs[1].replay()
        for hook in (*hooks[1].values(), *_global_optimizer_post_hooks.values()):
            hook(self.optimizer, (), {})

    def _capture(self, inputs: StepInputs) -> bool:
        """Record both graphs (nothing runs while recording); returns whether they were made."""
        self.inputs = [[t.clone() for t in micro] for micro in inputs]
        self.learning_rate = torch.tensor(float(self._groups[0][0]), device=self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate  # fused AdamW reads a tensor learning rate on the device
            group["capturable"] = True
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are made inside the graph's memory
        try:
            gradients, update = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch._dynamo.config.patch(error_on_recompile=True):
                with torch.cuda.graph(gradients, capture_error_mode="thread_local"):
                    self.stats = self._gradients(self.inputs)
                with torch.cuda.graph(update, pool=gradients.pool(), capture_error_mode="thread_local"):
                    # the step without its hooks: a hook recording a CUDA event would record it into the graph
                    self._step(self.stats, lambda: _unhooked_step(self.optimizer))
        except Exception as e:  # noqa: BLE001  whatever the graph cannot hold, the session goes on eagerly
            log.warning("CUDA graphs of the training step could not be captured (%s: %s); this session runs without "
                        "them (slower steps, same results)", type(e).__name__, e)
            self.failed = True
            self.close()
            return False
        self._graphs = (gradients, update)
        self.captured = True
        return True

    def close(self) -> None:
        """Free the graphs and their memory, and give the optimizer back its plain settings."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # nothing still reads the graphs' memory
        self._graphs = None
        self.inputs = self.stats = self.learning_rate = None
        for group, (learning_rate, capturable) in zip(self.optimizer.param_groups, self._groups):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = learning_rate
            group["capturable"] = capturable
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)


def _unhooked_step(optimizer: torch.optim.Optimizer) -> None:
    step = type(optimizer).step
    getattr(step, "__wrapped__", step)(optimizer)  # torch wraps step() in the hook-running profile_hook_step


def _flat(inputs: StepInputs) -> list[torch.Tensor]:
    return [t for micro in inputs for t in micro]


def plain_param_groups(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state_dict as an eager session would save it: learning rates as numbers, ``capturable`` as
    the optimizer was made. (A state saved during a graphed session, when training stops on a NaN, has them as
    the graphs need them.)"""
    capturable = optimizer.defaults.get("capturable", False)
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), torch.Tensor):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = capturable
    return state
