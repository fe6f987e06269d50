"""The LoRA training loop for Flux on a ComfyUI ModelPatcher.

Objective: rectified-flow velocity matching. ``x_t = (1 - t) * x0 + t * noise`` and the transformer predicts
``noise - x0``; the loss (MSE or Huber) is taken on that velocity (ComfyUI's own trainer instead takes the MSE in
x0 space, which weights each step by t**2). ``t`` is drawn as ``TrainConfig.timestep_sampling`` says.

Randomness is a pure function of (seed, step): each step draws its batch, noise, timesteps and caption dropout
from its own generator, so a run continued from a saved state is bit-identical to one that never stopped.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_base
import comfy.model_management

from .block_swap import block_swap
from .comfy_compat import first_quantized_weight, non_dynamic, training_mode
from . import distributed, speed_plan, step_graphs
from .blocks import BlockRunner, compiler_settings
from .config import DEFAULT_TRAINING_GUIDANCE, GUIDANCE_OPTION, InputError, TrainConfig  # noqa: F401 (re-exported)
from .dataset import BatchPlan, TrainingDataset, mix_seed
from .fp8_matmul import Fp8Unavailable, fp8_base_matmuls, has_fp8_base, unsupported_reason
from .lora_format import LoRAWeights
from .lora_layers import adapter_parameters, extract_weights, flat_parameters, lora_injected
from .optimizers import make_optimizer
from .schedules import lr_multiplier, sample_timesteps
from .speed_plan import SpeedPlan

log = logging.getLogger("dev2pro-lora")


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    learning_rate: float
    seconds: float  # this step's own time, previews excluded
    samples: list[int]  # dataset indices of the step's first micro-batch


@dataclass
class TrainingState:
    """Everything a run needs to carry on exactly where it stopped (random state is implied by seed and step)."""

    config: TrainConfig
    step: int
    adapter: LoRAWeights  # fp32, on the CPU
    optimizer: dict  # torch optimizer state_dict, tensors on the CPU
    losses: list[float] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    weights: LoRAWeights
    losses: list[float] = field(default_factory=list)  # every step of the run, earlier sessions included
    state: TrainingState | None = None
    stopped_early: bool = False
    # how the run used the hardware: {"plan": SpeedPlan.describe(), "step_graphs": per training session
    # "replayed" (its steps replayed from CUDA graphs), "failed" (the capture failed: eager) or "eager",
    # "step_graph_shapes": per session, the batch shapes that had graphs of their own}
    speed: dict = field(default_factory=dict)


class ModelInputError(InputError):
    """The MODEL input cannot be trained as it is; the message says what to connect instead."""

    def __init__(self, message: str):
        super().__init__("model", message)


class StateMismatch(InputError):
    """The training state's adapter does not fit this model's layers."""

    def __init__(self, message: str):
        super().__init__("training_state", message)


class NonFiniteLoss(ArithmeticError):
    """Training hit a NaN or infinite loss or gradient; ``result`` holds the adapter from before that step."""

    def __init__(self, step: int, what: str, result: TrainResult):
        super().__init__(f"the {what} became NaN or infinite at step {step}")
        self.step, self.what, self.result = step, what, result


StepCallback = Callable[[StepInfo], None]
PreviewCallback = Callable[[int, LoRAWeights], None]


@contextlib.contextmanager
def frozen_base(model: torch.nn.Module):
    """Make the transformer's own tensors trainable-safe for the ``with`` body, and restore their flags after.

    ComfyUI's loaders run under ``torch.inference_mode()``, so their weights are inference tensors that autograd
    cannot save; those are swapped for equal ordinary copies (values unchanged, so the model samples the same).
    """
    flags = {}
    with torch.inference_mode(False):
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None and tensor.is_inference():
                        copy = tensor.clone()
                        store[name] = torch.nn.Parameter(copy, requires_grad=False) if store is module._parameters else copy
        for p in model.parameters():
            flags[p] = p.requires_grad
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def trainable_patcher(model_patcher):
    """The patcher to train through: a dynamic-VRAM one (ComfyUI 0.33+ loaders on NVIDIA) is replaced by a plain
    clone of it, which ComfyUI reloads from the same file, since the training modules need resident weights; the
    input MODEL is untouched either way. Quantized weights are refused with what to load instead."""
    try:
        model_patcher = non_dynamic(model_patcher)
    except RuntimeError as e:  # ComfyUI can reload only what a loader node read from a file (cached_patcher_init)
        raise ModelInputError(
            f"this dynamic-VRAM MODEL cannot be copied for training ({e}). Load the base with Load Flux-dev2pro "
            "(Dev2ProLoadModel), or start ComfyUI with --disable-dynamic-vram") from e
    quantized = first_quantized_weight(model_patcher.model.diffusion_model)
    if quantized:
        raise ModelInputError(
            f"the model holds ComfyUI quantized weights ({quantized}, ...), as ComfyUI's Load Diffusion Model "
            "makes of a scaled-fp8 file; LoRA training through them is not supported. Load the file with Load "
            "Flux-dev2pro (Dev2ProLoadModel) instead: it dequantizes scaled-fp8 files, so the LoRA also transfers "
            "exactly to Flux-dev")
    return model_patcher


def check_compatible(base_model, dataset: TrainingDataset) -> None:
    """Raise ValueError when ``dataset`` cannot train ``base_model`` (a ComfyUI BaseModel), saying what to change."""
    if not isinstance(base_model, comfy.model_base.Flux):
        raise ValueError(f"the model is {type(base_model).__name__}, not Flux. Load Flux-dev2pro with Dev2ProLoadModel.")
    params = base_model.diffusion_model.params
    if not params.guidance_embed:
        raise ValueError("the model has no guidance input (FLUX.1-schnell?). Train on Flux-dev2pro.")
    for i, sample in enumerate(dataset.samples):
        if sample.latent.shape[0] != params.in_channels:
            raise ValueError(f"sample {i} has a {sample.latent.shape[0]}-channel latent; this Flux takes "
                             f"{params.in_channels}. Encode the images with the Flux VAE.")
        if sample.context.shape[-1] != params.context_in_dim:
            raise ValueError(f"caption {i} is {sample.context.shape[-1]} wide; this Flux reads {params.context_in_dim}"
                             "-wide text. Encode captions with a Flux DualCLIPLoader (clip_l + t5xxl, type flux).")
        if sample.pooled.shape[-1] != params.vec_in_dim:
            raise ValueError(f"caption {i} has a {sample.pooled.shape[-1]}-wide pooled vector; this Flux reads "
                             f"{params.vec_in_dim}. Encode captions with a Flux DualCLIPLoader.")


def velocity_loss(prediction: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.loss == "huber":
        return torch.nn.functional.huber_loss(prediction, target, delta=config.huber_delta)
    return torch.nn.functional.mse_loss(prediction, target)


def _micro_batch(dataset: TrainingDataset, indices: list[int], config: TrainConfig, generator: torch.Generator,
                 rows: slice, pin: bool = False):
    """Stacked latents, captions (with dropout) and pooled vectors of the ``rows`` of one micro-batch, each row its
    own caption; the captions in page-locked memory with ``pin`` (they are the large part of a GPU step's input
    copies). Dropout is drawn for every row of the batch, so each row's draw does not depend on ``rows``."""
    drops = [config.caption_dropout > 0 and float(torch.rand(1, generator=generator)) < config.caption_dropout
             for _ in indices][rows]
    samples = [dataset.samples[i] for i in indices[rows]]
    contexts, pooled = [], []
    for sample, drop in zip(samples, drops):
        if drop:
            contexts.append(dataset.empty_caption[0])
            pooled.append(dataset.empty_caption[1])
        else:
            contexts.append(sample.context)
            pooled.append(sample.pooled)
    return torch.stack([s.latent for s in samples]).float(), _stacked(contexts, pin), _stacked(pooled, pin)


def _stacked(tensors: list[torch.Tensor], pin: bool) -> torch.Tensor:
    if not pin:
        return torch.stack(tensors)
    out = torch.empty((len(tensors), *tensors[0].shape), dtype=tensors[0].dtype, pin_memory=True)
    return torch.stack(tensors, out=out)


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None, pinned: bool = False) -> torch.Tensor:
    """``t`` on ``device``; with ``pinned`` (SpeedPlan.pinned_inputs) through page-locked memory, without a host sync,
    the cast happening there. (From pageable memory a copy first waits for all work queued on the stream: the six
    small input copies of every step drained the GPU's queue, so the CPU lost its lead each step and the GPU then
    idled while the next step's first blocks were launched.)"""
    if pinned:
        t = (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)


class _Run:
    """The adapter and optimizer of one training run, alive across the sessions between previews."""

    def __init__(self, config: TrainConfig, resume: TrainingState | None):
        self.config = config
        self.step = resume.step if resume else 0
        self.losses = list(resume.losses) if resume else []
        self.resume = resume
        self.adapter = None  # {name: (down, up)} Parameters, made in the first session
        self.optimizer = None
        self.speed = {"plan": {}, "step_graphs": [], "step_graph_shapes": []}  # TrainResult.speed

    def attach(self, layers, device: torch.device) -> None:
        """First session: take the fresh layers' Parameters, load a resumed state into them, build the optimizer."""
        self.adapter = adapter_parameters(layers)
        if self.resume is not None:
            saved = self.resume.adapter
            for name, (down, up) in self.adapter.items():
                if name not in saved.down or name not in saved.up:
                    raise StateMismatch(f"the training state has no adapter for {name} ({len(saved.down)} layers "
                                        f"saved, this model has {len(self.adapter)}); it was made for another model. "
                                        "Continue on the base it was trained on")
                have, want = (tuple(saved.down[name].shape), tuple(saved.up[name].shape)), (tuple(down.shape),
                                                                                          tuple(up.shape))
                if have != want:
                    raise StateMismatch(f"the training state's {name} is down {have[0]} / up {have[1]}, this model's "
                                        f"layer needs {want[0]} / {want[1]}: another width or rank. Continue on the "
                                        "base it was trained on")
            with torch.no_grad():
                for name, (down, up) in self.adapter.items():
                    down.copy_(saved.down[name])
                    up.copy_(saved.up[name])
        self.optimizer = make_optimizer(self.config, flat_parameters(self.adapter), device)
        if self.resume is not None:
            self.optimizer.load_state_dict(_to_cpu(self.resume.optimizer))  # fresh copies, never inference tensors
            self.resume = None

    def weights(self) -> LoRAWeights:
        return extract_weights(self.adapter, self.config.rank, self.config.alpha)

    def result(self, stopped_early: bool = False) -> TrainResult:
        """The adapter so far and the state to continue from; one CPU copy of the adapter serves both."""
        optimizer_state = step_graphs.plain_param_groups(_to_cpu(self.optimizer.state_dict()), self.optimizer)
        state = TrainingState(self.config, self.step, self.weights(), optimizer_state,
                              list(self.losses))
        return TrainResult(state.adapter, list(self.losses), state, stopped_early, self.speed)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        with torch.inference_mode(False):
            return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def check_resumable(config: TrainConfig, resume: TrainingState) -> None:
    for name in TrainConfig.STATE_BOUND:
        if getattr(config, name) != getattr(resume.config, name):
            raise ValueError(f"the training state was made with {name}={getattr(resume.config, name)!r}, "
                             f"not {getattr(config, name)!r}; continue with the same {name}")


def train_lora(model_patcher, dataset: TrainingDataset, config: TrainConfig, on_step: StepCallback | None = None, *,
               resume: TrainingState | None = None, stop_at: int = 0, should_stop: Callable[[], bool] | None = None,
               preview_every: int = 0, on_preview: PreviewCallback | None = None,
               speed: dict | None = None) -> TrainResult:
    """Train a LoRA on the Flux transformer of ``model_patcher`` and return its weights and training state.

    Runs from step 0, or from ``resume``, to ``config.steps`` (or to ``stop_at`` when that is earlier).
    ``should_stop`` is asked after every step: true ends the run there, and the adapter so far is returned.
    ``on_preview(step, weights)`` runs every ``preview_every`` steps and after the last one, between training
    sessions: the adapter is out of the model then, so ComfyUI may swap models freely for sampling.
    The patcher's modules are restored after every session, also when a callback raises, so the MODEL that
    other nodes share samples exactly as before. A NaN or infinite loss or gradient raises NonFiniteLoss
    carrying the adapter from before that step. ``speed`` overrides single decisions of the run's SpeedPlan
    (core.speed_plan; benchmarks and tests).
    """
    config.validate()
    model_patcher = trainable_patcher(model_patcher)
    check_compatible(model_patcher.model, dataset)
    plan = speed_plan.plan(config, model_patcher.load_device, has_fp8_base(model_patcher.model.diffusion_model),
                           **(speed or {}))
    if plan.fp8_matmul and (reason := unsupported_reason(model_patcher.load_device)):
        raise Fp8Unavailable(f"{reason}. Set fp8_matmul to off in the advanced settings")
    if resume is not None:
        check_resumable(config, resume)
    if config.caption_dropout > 0:
        empty = dataset.empty_caption
        if empty is None or any(s.context.shape != empty[0].shape for s in dataset.samples):
            raise ValueError("caption_dropout needs the dataset's encoded empty caption: build the dataset with "
                             "Dev2ProDataset (it encodes one), or set caption_dropout to 0")
    run = _Run(config, resume)
    run.speed["plan"] = plan.describe()
    end = min(config.steps, stop_at) if stop_at > 0 else config.steps
    batches = BatchPlan(dataset, config.batch_size, config.seed)
    previewing = on_preview is not None and preview_every > 0
    stopped = False
    log.info("training %s: %s", "from step %d" % run.step if run.step else "from the start", plan.summary())
    while run.step < end and not stopped:
        until = min(end, (run.step // preview_every + 1) * preview_every) if previewing else end
        stopped = _train_session(model_patcher, dataset, run, batches, plan, until, on_step, should_stop)
        if previewing and (run.step % preview_every == 0 or run.step == end):
            on_preview(run.step, run.weights())
            # with ranks, a stop is decided at a step, for all of them at once
            stopped = stopped or (distributed.current() is None and bool(should_stop and should_stop()))
    if run.adapter is None:  # nothing left to train: hand the resumed state back
        if resume is None:
            raise ValueError("no training steps to run")
        return TrainResult(resume.adapter, list(resume.losses), resume, speed=run.speed)
    return run.result(stopped)


def activation_bytes(config: TrainConfig, dataset: TrainingDataset) -> int:
    """A generous estimate of the GPU memory a step needs besides the weights, for ComfyUI's model loading.

    Measured on Flux-dev (H100, bf16 compute): with checkpointing about 0.8 MB per token (block inputs kept
    for backward plus one block's recomputation); without it about 12 MB per token.
    """
    tokens = max(s.latent.shape[-1] * s.latent.shape[-2] // 4 + s.context.shape[-2] for s in dataset.samples)
    per_token = 0.8e6 if config.gradient_checkpointing else 12e6
    ranks = distributed.current()
    rows = config.batch_size if ranks is None else ranks.rows(config.batch_size)
    return int(tokens * max(rows, 1) * per_token) + 2**30


@dataclass
class _Launched:
    """A step whose work is queued on the device; its loss and gradient norm are read once ``done`` is reached."""

    step: int
    learning_rate: float
    indices: list[int]
    stats: torch.Tensor  # [loss, gradient norm, and with ranks the step's flags], on the CPU once ``done``
    done: object  # a CUDA event, or None when ``stats`` was read at once


def _deferred_check(optimizer: torch.optim.Optimizer) -> bool:
    """Fused AdamW can skip its update on the device (``found_inf``), so a NaN step needs no host sync to be
    kept out of the adapter: the step's numbers are read one step later, while the GPU is busy."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


class _Commits:
    """Steps are committed (counted in the run, reported, asked whether to stop) once their numbers are read.

    ``deferred``: a step's numbers are read one step late, after the next step's forward and backward are queued, so
    reading them never waits for the GPU; a stop asked for after step k then drops step k+1's gradients before its
    update, and the run ends exactly at step k. Otherwise each step is read right after its update (which skips a
    non-finite step, core.step_graphs)."""

    def __init__(self, run: _Run, deferred: bool, device: torch.device, ranks: distributed.Ranks | None,
                 on_step: StepCallback | None, should_stop):
        self.run, self.deferred, self.device, self.ranks = run, deferred, device, ranks
        self.on_step, self.should_stop = on_step, should_stop
        self.pending: _Launched | None = None
        self.own_failure: BaseException | None = None  # this rank's error in the step, raised once all ranks know
        self.clock = time.perf_counter()

    def earlier(self) -> bool:
        """Commit the step still pending; returns whether to stop (the current step's gradients are then dropped)."""
        pending, self.pending = self.pending, None
        if pending is not None and self._commit(pending):
            self.run.optimizer.zero_grad(set_to_none=True)
            return True
        return False

    def launched(self, step: int, learning_rate: float, indices: list[int], stats: torch.Tensor) -> bool:
        """Step ``step``'s update is queued: commit it now, or (deferred) when the next step is queued. Returns
        whether to stop."""
        if not self.deferred:
            return self._commit(_Launched(step, learning_rate, indices, stats.cpu(), None))
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        self.pending = _Launched(step, learning_rate, indices, stats.to("cpu", non_blocking=done is not None), done)
        if done is not None:
            done.record()
        return False

    def settle(self) -> None:
        """After a Cancel or a failed collective: keep the last step whose update was queued, drop the one in flight."""
        self.run.optimizer.zero_grad(set_to_none=True)
        pending, self.pending = self.pending, None
        if pending is not None and pending.step > self.run.step:
            self._commit(pending)

    def _commit(self, launched: _Launched) -> bool:
        """Account for a finished step (raise NonFiniteLoss or PeerFailed if it went bad); returns whether to stop."""
        run, ranks = self.run, self.ranks
        if launched.done is not None:
            if ranks is None:
                launched.done.synchronize()
            else:  # polled, so that a SIGTERM from torchrun is handled while the GPU works
                while not launched.done.query():
                    time.sleep(1e-4)
        loss_value, norm_value, *step_flags = launched.stats.tolist()
        if ranks is not None and any(step_flags[1:]):
            run.optimizer.zero_grad(set_to_none=True)
            raise _peer_failed(ranks, launched.step, step_flags[1:], self.own_failure, run.result())
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            run.optimizer.zero_grad(set_to_none=True)
            what = "loss" if not math.isfinite(loss_value) else "gradient"
            raise NonFiniteLoss(launched.step, what, run.result())  # the adapter from before that step
        run.step = launched.step
        run.losses.append(loss_value)
        now = time.perf_counter()
        if self.on_step is not None:
            self.on_step(StepInfo(launched.step, run.config.steps, loss_value, launched.learning_rate,
                                  now - self.clock, launched.indices))
        self.clock = now
        if ranks is not None:
            return step_flags[0] > 0  # every rank stops after the same step
        return self.should_stop is not None and bool(self.should_stop())


def _train_session(model_patcher, dataset: TrainingDataset, run: _Run, batches: BatchPlan, plan: SpeedPlan,
                   until: int, on_step: StepCallback | None, should_stop) -> bool:
    """Train with the adapter in the model until step ``until``; returns whether ``should_stop`` asked to stop.

    No host sync inside a step on a GPU: step k is committed during step k+1 (_Commits), so its callback comes one
    step late. That is also what lets a GPU session replay its steps from CUDA graphs (core.step_graphs).
    """
    config = run.config
    comfy.model_management.load_models_gpu([model_patcher], memory_required=activation_bytes(config, dataset))
    base = model_patcher.model
    transformer = base.diffusion_model
    device = model_patcher.load_device
    compute_dtype = base.manual_cast_dtype or base.get_dtype()
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        compute_dtype = torch.bfloat16
    # without autocast's cast cache, which a CUDA graph cannot hold (nothing here reuses a cast: the adapter's casts
    # are inside the compiled blocks)
    autocast = torch.autocast(device.type, dtype=compute_dtype, cache_enabled=False,
                              enabled=device.type == "cuda" and compute_dtype != torch.float32)
    transformer_options = dict(model_patcher.model_options.get("transformer_options", {}))

    with torch.inference_mode(False), frozen_base(transformer), \
            lora_injected(transformer, config.rank, config.alpha, config.seed, existing=run.adapter,
                          device=device) as layers, \
            (fp8_base_matmuls(layers, compute_dtype, plan.fp8_rowwise, plan.fp8_fast_accumulation,
                              required=config.fp8_matmul == "on") if plan.fp8_matmul
             else contextlib.nullcontext()), \
            block_swap(transformer, plan.blocks_to_swap, device, plan.swap_copy_stream) as swap, \
            compiler_settings(plan), training_mode():
        runner = BlockRunner(transformer, plan, swap)
        transformer_options["patches_replace"] = {"dit": runner.replacements()}
        if (attention := runner.attention_override()) is not None:
            transformer_options.setdefault("optimized_attention_override", attention)
        if run.adapter is None:
            run.attach(layers, device)
        ranks = distributed.current()
        deferred = _deferred_check(run.optimizer)
        commits = _Commits(run, deferred, device, ranks, on_step, should_stop)
        gradients, flags = _gradients_function(transformer, transformer_options, autocast, config, run, device,
                                               ranks, commits)
        if _graphed(plan, runner, deferred, ranks):
            steps = step_graphs.GraphedSteps(run.optimizer, gradients, deferred, device, plan.step_graph_warmup,
                                             plan.step_graph_shapes)
        else:
            steps = step_graphs.EagerSteps(run.optimizer, gradients, deferred)

        step = run.step
        try:
            while step < until:
                step += 1
                lr = config.learning_rate * lr_multiplier(config, step)
                batch, indices = _step_inputs(run, dataset, batches, step, base, device, compute_dtype, ranks,
                                              plan.pinned_inputs)
                if flags is not None:  # read by the step's all-reduce (and its CUDA graph)
                    flags.zero_()
                    flags[0] = float(should_stop is not None and bool(should_stop()))
                stats = steps.gradients(batch)  # forward and backward, queued
                if commits.earlier():  # the step before (deferred), read while this one's work runs
                    return True
                steps.update(lr, stats)  # skipped, on the device or here, when the step is not finite
                if commits.launched(step, lr, indices, stats):
                    return True
            return commits.earlier()
        except (comfy.model_management.InterruptProcessingException, distributed.CollectiveFailed) as e:
            # The step in flight is dropped and the last completed one kept, as when a stop is seen between steps.
            # - Cancel raised inside an op (ComfyUI 0.33+ checks it in every op's forward; a BaseException from 0.33
            #   on). ComfyUI cleared its flag when it raised; it is set again so that the node sees the Cancel.
            # - a rank left the job (gloo), and this rank's all-reduce failed.
            commits.settle()
            if isinstance(e, distributed.CollectiveFailed):
                raise distributed.PeerFailed(f"training stopped after step {run.step}: {e}", run.step + 1,
                                             run.result()) from e
            comfy.model_management.interrupt_current_processing(True)
            return True
        finally:
            run.speed["step_graphs"].append(steps.outcome)
            run.speed["step_graph_shapes"].append(getattr(steps, "shapes_captured", 0))
            steps.close()


def _gradients_function(transformer, transformer_options: dict, autocast, config: TrainConfig, run: _Run,
                        device: torch.device, ranks: distributed.Ranks | None, commits: _Commits):
    """The step's forward and backward as one function of its inputs, returning [loss, gradient norm] (with ranks
    [.., stop, failed per rank], summed over the ranks) on the device; and the ranks' flags tensor, or None."""
    params = flat_parameters(run.adapter)
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    flags = ranks.flags(device) if ranks is not None else None

    def gradients(inputs) -> torch.Tensor:
        if ranks is None:
            loss = _forward_backward(transformer, transformer_options, autocast, config, inputs, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            return torch.stack([loss, grad_norm.to(loss)])
        try:
            loss = _forward_backward(transformer, transformer_options, autocast, config, inputs, device)
        except Exception as e:  # noqa: BLE001  the other ranks hear of it through the all-reduce, then it is raised
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise  # GraphedSteps goes on eagerly
            commits.own_failure = e
            run.optimizer.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            flags[1 + ranks.rank] = 1.0
        reduced = ranks.reduce_step(params, loss, flags)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # a step in which a rank failed is skipped as a NaN step is (fused AdamW's found_inf)
        grad_norm = torch.where(reduced[2:].sum() > 0, math.inf, grad_norm.to(reduced))
        return torch.cat([reduced[:1], grad_norm.reshape(1), reduced[1:]])

    return gradients, flags


def _peer_failed(ranks: distributed.Ranks, step: int, failed: list[float], own: BaseException | None,
                 result: TrainResult) -> distributed.PeerFailed:
    if own is not None:
        message = f"rank {ranks.rank} failed at step {step} ({type(own).__name__}: {own})"
    else:
        message = f"rank {ranks.describe_failed(failed)} failed at step {step} (that rank's log says why)"
    error = distributed.PeerFailed(message + "; every rank stopped there", step, result)
    error.__cause__ = own
    return error


def _graphed(plan: SpeedPlan, runner: BlockRunner, deferred: bool, ranks: distributed.Ranks | None) -> bool:
    """Whether a session replays its steps from CUDA graphs (core.step_graphs): where the plan says so (GPUs), with
    the compiler recomputing the blocks (no block swap, whose weights move in Python) and fused AdamW (which skips a
    NaN step on the device); with ranks, only when their all-reduce runs on the GPU (NCCL), which a graph can hold."""
    return (plan.step_graphs and runner.recomputed_by_compiler and deferred
            and (ranks is None or ranks.device.type == "cuda"))


def _step_inputs(run: _Run, dataset: TrainingDataset, batches: BatchPlan, step: int, base, device, compute_dtype,
                 ranks: distributed.Ranks | None, pinned: bool) -> tuple[list[tuple[torch.Tensor, ...]], list[int]]:
    """Per micro-batch of step ``step``, what its forward reads, on the device: (x_t, t, context, pooled, guidance,
    velocity target, loss weight); and the dataset indices of its first micro-batch. Drawn on the CPU from the
    step's own generators, for the whole batch: with ``ranks``, this rank keeps its share of the rows (none, for a
    small last batch, leaves that micro-batch out) and weights its loss by that share. ``pinned``: the copies go
    through page-locked memory (SpeedPlan.pinned_inputs)."""
    config = run.config
    inputs, first_indices = [], None
    for micro in range(config.gradient_accumulation):
        indices = batches.batch((step - 1) * config.gradient_accumulation + micro)
        first_indices = first_indices or indices
        rows = ranks.share(len(indices)) if ranks is not None else slice(0, len(indices))
        if rows.start == rows.stop:
            continue
        generator = torch.Generator().manual_seed(mix_seed(config.seed, 2, step, micro))
        latents, context, pooled = _micro_batch(dataset, indices, config, generator, rows, pin=pinned)
        x0 = base.process_latent_in(latents)
        noise = torch.randn((len(indices), *x0.shape[1:]), generator=generator)[rows]
        tokens = math.ceil(x0.shape[-2] / 2) * math.ceil(x0.shape[-1] / 2)
        t = sample_timesteps(config, len(indices), tokens, generator)[rows].view(-1, 1, 1, 1)
        xt = (1 - t) * x0 + t * noise
        guidance = torch.full((x0.shape[0],), config.guidance)
        weight = torch.tensor(x0.shape[0] / len(indices))  # 1.0 alone: the loss is unchanged, bit for bit
        inputs.append(tuple(_to_device(x, device, dtype, pinned) for x, dtype in (
            (xt, compute_dtype), (t.flatten(), None), (context, compute_dtype), (pooled, compute_dtype),
            (guidance, compute_dtype), (noise - x0, None), (weight, None))))
    return inputs, first_indices


def _forward_backward(transformer, transformer_options: dict, autocast, config: TrainConfig, inputs,
                      device) -> torch.Tensor:
    """Queue the forward and backward passes of one optimizer step; returns its loss (on the device, not read)."""
    loss_sum = torch.zeros((), device=device)
    for xt, t, context, pooled, guidance, target, weight in inputs:
        with autocast:
            velocity = transformer(xt, t, context, y=pooled, guidance=guidance,
                                   transformer_options=transformer_options)
        loss = velocity_loss(velocity.float(), target, config) * weight / config.gradient_accumulation
        loss.backward()
        loss_sum += loss.detach()
    return loss_sum
