"""The LoRA training loop for Flux on a ComfyUI ModelPatcher.

Objective: rectified-flow velocity matching. ``x_t = (1 - t) * x0 + t * noise`` and the transformer predicts
``noise - x0``; the loss is the plain MSE on that velocity (ComfyUI's own trainer instead takes the MSE in x0
space, which weights each step by t**2). ``t`` is drawn logit-normal and shifted for the image size the way
Flux's own sampling schedule is (``mu`` from 0.5 at 256 image tokens to 1.15 at 4096).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

import comfy.model_base
import comfy.model_management

from .dataset import TrainingDataset
from .lora_format import LoRAWeights
from .lora_layers import adapter_parameters, extract_weights, lora_injected

# Where Dev2ProTrainingGuidance stores its value in a ModelPatcher's model_options.
GUIDANCE_OPTION = "dev2pro_training_guidance"
DEFAULT_TRAINING_GUIDANCE = 1.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float = 16.0
    seed: int = 0
    guidance: float = DEFAULT_TRAINING_GUIDANCE
    gradient_checkpointing: bool = True
    weight_decay: float = 0.01

    def validate(self) -> None:
        """Raise ValueError naming the setting and the accepted range; called once, before any work."""
        checks = [
            (self.steps >= 1, f"steps must be at least 1, got {self.steps}"),
            (0 < self.learning_rate < 1, f"learning_rate must be in (0, 1), got {self.learning_rate}"),
            (1 <= self.rank <= 256, f"rank must be 1..256, got {self.rank}"),
            (self.alpha > 0, f"alpha must be positive, got {self.alpha}"),
            (math.isfinite(self.guidance) and self.guidance >= 0, f"guidance must be >= 0, got {self.guidance}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class TrainResult:
    weights: LoRAWeights
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


StepCallback = Callable[[int, int, float], None]


def flux_shift_mu(image_tokens: int) -> float:
    """Flux's resolution-dependent shift: 0.5 at 256 tokens (256x256 px) to 1.15 at 4096 (1024x1024 px)."""
    return 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)


def sample_timesteps(batch: int, image_tokens: int, generator: torch.Generator) -> torch.Tensor:
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    shift = math.exp(flux_shift_mu(image_tokens))
    return shift * t / (1 + (shift - 1) * t)


def _call_on_copies(block_call, streams: list[torch.Tensor], use_checkpoint: bool):
    """Run ``block_call(*copies)`` where the copies are the block's input streams, safely for autograd.

    Flux's blocks add into their inputs in place (``txt += ...``, ``x += ...``) after normalising them, and the
    normalisation saved the input for backward. With checkpointing the copies are made inside the recomputed
    function, so backward recomputes from unmodified inputs. Without it, every tensor saved for backward that
    shares memory with a copy is itself copied when saved, so the later in-place add cannot invalidate it.
    """

    def run(*inputs):
        copies = [t.clone() for t in inputs]
        if use_checkpoint:
            return block_call(*copies)
        mutated = {c.untyped_storage().data_ptr() for c in copies}

        def pack(t):
            return t.clone() if t.untyped_storage().data_ptr() in mutated else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return block_call(*copies)

    if use_checkpoint:
        return checkpoint(run, *streams, use_reentrant=False)
    return run(*streams)


def _block_replacements(model: torch.nn.Module, use_checkpoint: bool) -> dict:
    """ComfyUI ``patches_replace`` entries that run each transformer block through ``_call_on_copies``.

    Using ComfyUI's own hook leaves the modules untouched. Each entry binds its block itself: ComfyUI's
    ``original_block`` closes over its loop variable, so calling it again during backward's recomputation would
    run the last block instead.
    """

    def double(block):
        def replace(args, extra):
            def call(img, txt):
                return block(img=img, txt=txt, vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                             transformer_options=args.get("transformer_options"))

            img, txt = _call_on_copies(call, [args["img"], args["txt"]], use_checkpoint)
            return {"img": img, "txt": txt}

        return replace

    def single(block):
        def replace(args, extra):
            def call(img):
                return block(img, vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                             transformer_options=args.get("transformer_options"))

            return {"img": _call_on_copies(call, [args["img"]], use_checkpoint)}

        return replace

    dit = {("double_block", i): double(b) for i, b in enumerate(model.double_blocks)}
    dit.update({("single_block", i): single(b) for i, b in enumerate(model.single_blocks)})
    return dit


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


def train_lora(model_patcher, dataset: TrainingDataset, config: TrainConfig, on_step: StepCallback | None = None) -> TrainResult:
    """Train a LoRA on the Flux transformer of ``model_patcher`` and return its weights.

    The patcher's modules are wrapped for the duration and restored on exit, also when ``on_step`` raises (that
    is how ComfyUI's Cancel arrives), so the MODEL that other nodes share samples exactly as before.
    """
    config.validate()
    check_compatible(model_patcher.model, dataset)
    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    base = model_patcher.model
    transformer = base.diffusion_model
    device = model_patcher.load_device
    compute_dtype = base.manual_cast_dtype or base.get_dtype()
    if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        compute_dtype = torch.bfloat16
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=device.type == "cuda" and compute_dtype != torch.float32)
    transformer_options = dict(model_patcher.model_options.get("transformer_options", {}))
    transformer_options["patches_replace"] = {"dit": _block_replacements(transformer, config.gradient_checkpointing)}
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    start = time.perf_counter()

    with torch.inference_mode(False), frozen_base(transformer), lora_injected(transformer, config.rank, config.alpha, config.seed) as layers:
        params = adapter_parameters(layers)
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, fused=device.type == "cuda")
        for step in range(1, config.steps + 1):
            sample = dataset.samples[int(torch.randint(len(dataset), (1,), generator=generator))]
            x0 = base.process_latent_in(sample.latent[None].float())
            noise = torch.randn(x0.shape, generator=generator)
            tokens = math.ceil(x0.shape[-2] / 2) * math.ceil(x0.shape[-1] / 2)
            t = sample_timesteps(1, tokens, generator)
            xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
            guidance = torch.full((1,), config.guidance)
            with autocast:
                velocity = transformer(
                    xt.to(device, compute_dtype),
                    t.to(device),
                    sample.context[None].to(device, compute_dtype),
                    y=sample.pooled[None].to(device, compute_dtype),
                    guidance=guidance.to(device, compute_dtype),
                    transformer_options=transformer_options,
                )
            loss = torch.nn.functional.mse_loss(velocity.float(), (noise - x0).to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, config.steps, losses[-1])
        weights = extract_weights(layers, config.rank, config.alpha)
    return TrainResult(weights=weights, losses=losses, seconds=time.perf_counter() - start)
