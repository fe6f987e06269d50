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

Up to SpeedPlan.step_graph_shapes batch shapes (aspect buckets, a smaller last batch) get a forward-and-backward
graph each, captured after that shape's own warm-up steps, all in one memory pool and adding into the same gradient
tensors; the update graph is shared. Every graph's intermediates are dead when it ends and its outputs are copied
out before another replays, so sharing the pool is safe in any replay order.
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
            self._clear_gradients()
            return
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self._step(stats, self.optimizer.step)
        self._clear_gradients()

    def _clear_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self, stats: torch.Tensor, step: Callable[[], object]) -> None:
        if self.skip_non_finite:
            self.optimizer.found_inf = (~torch.isfinite(stats).all()).float()
        step()

    def close(self) -> None:
        pass


class GraphedSteps(EagerSteps):
    """Eager for each batch shape's first ``warmup`` steps (SpeedPlan.step_graph_warmup), then captured and replayed,
    for up to ``shapes`` shapes (SpeedPlan.step_graph_shapes). Any failure to capture (an op the graph cannot hold, a
    recompile) logs why and leaves the session eager."""

    def __init__(self, optimizer: torch.optim.Optimizer, gradients: Gradients, skip_non_finite: bool,
                 device: torch.device, warmup: int, shapes: int = 1):
        super().__init__(optimizer, gradients, skip_non_finite)
        self.device = device
        self.warmup = warmup
        self.max_shapes = shapes
        self.eager_steps: dict[tuple, int] = {}  # per batch shape
        self.failed = False
        self._replayed = False  # whether the current step runs from the graphs
        self._shapes: dict[tuple, _ShapeGraph] = {}
        self._update: torch.cuda.CUDAGraph | None = None
        self._params: list[torch.Tensor] = []
        self._gradients_kept: list[torch.Tensor] | None = None  # their gradients, which every graph adds into
        self._stats: torch.Tensor | None = None  # [loss, gradient norm, ...]: every graph's output, read by the update
        self.learning_rate: torch.Tensor | None = None
        self._groups = [(g["lr"], g.get("capturable", False)) for g in optimizer.param_groups]

    @property
    def shapes_captured(self) -> int:
        return len(self._shapes)

    @property
    def outcome(self) -> str:
        """How this session ran: "replayed" from its graphs, "failed" to capture them (eager), or "eager" (too few
        steps of any one shape to capture)."""
        return "failed" if self.failed else "replayed" if self._shapes else "eager"

    def gradients(self, inputs: StepInputs) -> torch.Tensor:
        key = _shape_key(inputs)
        graph = self._shapes.get(key)
        if (graph is None and not self.failed and len(self._shapes) < self.max_shapes
                and self.eager_steps.get(key, 0) >= self.warmup):
            graph = self._capture(key, inputs)
        self._replayed = graph is not None
        if graph is None:
            self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
            self._clear_gradients()  # whatever a replayed step left in the kept gradients
            return super().gradients(inputs)
        for static, new in zip(_flat(graph.inputs), _flat(inputs)):
            static.copy_(new, non_blocking=True)
        graph.graph.replay()
        return graph.stats

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
        self._update.replay()
        for hook in (*hooks[1].values(), *_global_optimizer_post_hooks.values()):
            hook(self.optimizer, (), {})

    def _clear_gradients(self) -> None:
        if self._gradients_kept is None:
            return super()._clear_gradients()
        for p, grad in zip(self._params, self._gradients_kept):
            p.grad = grad  # the graphs hold these addresses: eager steps add into them too
        torch._foreach_zero_(self._gradients_kept)

    def _capture(self, key: tuple, inputs: StepInputs) -> _ShapeGraph | None:
        """Record this shape's gradients graph, and the first time the update graph (nothing runs while recording);
        returns the shape's graph, or None where capturing failed."""
        first = self._update is None
        if first:
            self.learning_rate = torch.tensor(float(self._groups[0][0]), device=self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate  # fused AdamW reads a tensor learning rate on the device
                group["capturable"] = True
            self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
            # the first graph's backward allocates the gradients in the graphs' pool, where the freed activations
            # make room: zeros_like outside it cost 0.29 GiB of peak at 1024x1024 (issue 18, 2026-12-02 peers run)
            self.optimizer.zero_grad(set_to_none=True)
        static = [[t.clone() for t in micro] for micro in inputs]
        try:
            graph = torch.cuda.CUDAGraph()
            pool = next(iter(self._shapes.values())).graph.pool() if self._shapes else None
            with torch._dynamo.config.patch(error_on_recompile=True):
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    if not first:  # the first graph's backward writes the gradients; later ones add into them
                        torch._foreach_zero_(self._gradients_kept)
                    stats = self._gradients(static)
                    if not first:  # where the update graph reads whether the step is finite
                        self._stats.copy_(stats)
                        stats = self._stats
                if first:
                    if any(p.grad is None for p in self._params):
                        raise RuntimeError("a trained parameter got no gradient in the captured step")
                    self._gradients_kept = [p.grad for p in self._params]  # every later graph adds into these
                    self._stats = stats
                    update = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(update, pool=graph.pool(), capture_error_mode="thread_local"):
                        # the step without its hooks: a hook recording a CUDA event would record it into the graph
                        self._step(stats, lambda: _unhooked_step(self.optimizer))
                    self._update = update
        except Exception as e:  # noqa: BLE001  whatever the graph cannot hold, the session goes on eagerly
            log.warning("CUDA graphs of the training step could not be captured (%s: %s); this session runs without "
                        "them (slower steps, same results)", type(e).__name__, e)
            self.failed = True
            self.close()
            return None
        self._shapes[key] = _ShapeGraph(graph, static, stats)
        return self._shapes[key]

    def close(self) -> None:
        """Free the graphs and their memory, and give the optimizer back its plain settings."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # nothing still reads the graphs' memory
        self._shapes.clear()
        self._update = None
        self._gradients_kept = self._stats = self.learning_rate = None
        for group, (learning_rate, capturable) in zip(self.optimizer.param_groups, self._groups):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = learning_rate
            group["capturable"] = capturable
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)


class _ShapeGraph:
    """One batch shape's forward-and-backward graph: the static inputs each step's batch is copied into, and the
    static [loss, gradient norm] it leaves."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[list[torch.Tensor]], stats: torch.Tensor):
        self.graph, self.inputs, self.stats = graph, inputs, stats


def _shape_key(inputs: StepInputs) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in _flat(inputs))


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
