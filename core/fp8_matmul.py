"""fp8 tensor-core matmuls for the frozen fp8 base weights in the forward passes.

With an fp8 e4m3fn base, ComfyUI casts every weight to bf16 and multiplies in bf16. Here the fp8 weight goes to
``torch._scaled_mm`` as it is stored, and only the layer input is quantized, to e4m3fn with one scale per tensor
chosen from its absolute maximum at every call (current scaling). That covers two of a step's three matmul passes
over the base (the forward, and its recomputation under checkpointing); the input gradient stays in bf16 (see
``_Fp8Matmul.backward``), and the base is frozen, so there is no weight gradient. The LoRA branch stays in bf16.

What it costs in accuracy is checked, not assumed: ``tests/test_fp8_matmul.py`` trains the same run with and
without it and bounds the gap of the loss curves, and the H100 benchmark reports the same on full-size Flux.
"""
from __future__ import annotations

import contextlib

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# Modulation layers read the pooled vector, one row per image: no matmul to speed up there.
SKIPPED_SUFFIXES = ("mod.lin", "modulation.lin")


class Fp8Unavailable(ValueError):
    """fp8_matmul is on, but this GPU or this model cannot do it; the message says what to change."""


def unsupported_reason(device: torch.device) -> str | None:
    """Why fp8 matmuls cannot run on ``device``, or None. CPUs run them (slowly): that is what the tests use."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"fp8 matmuls need an NVIDIA GPU; this device is {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return (f"fp8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (RTX 40xx, L4, L40, H100); "
                f"this {name} is {major}.{minor}")
    return None


def _quantize(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3fn [M, K], fp32 scale [M, 1] or []) with x ~= q * scale; the maximum maps to 448."""
    amax = (x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()).float()
    scale = torch.clamp(amax, min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(E4M3).contiguous(), scale


def _weight_scale(weight_scale: torch.Tensor, columns: int, rowwise: bool) -> torch.Tensor:
    if rowwise:  # row-wise scaling wants one scale per output column of the other operand too
        return weight_scale.float().reshape(1, 1).expand(1, columns).contiguous()
    return weight_scale.float().reshape(())


class _Fp8Matmul(torch.autograd.Function):
    """y = x @ (weight * weight_scale).T for a frozen e4m3fn weight [N, K]: fp8 forward, bf16 input gradient."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, out_dtype, rowwise, fast):
        q, scale = _quantize(x, rowwise)
        ctx.save_for_backward(weight, weight_scale)
        ctx.input_dtype = x.dtype
        weight_scale = _weight_scale(weight_scale, weight.shape[0], rowwise)
        if q.device.type == "cpu":
            # torch._scaled_mm on the CPU is a reference loop: 0.8 s for a 64x256 by 256x1024 product against 6 ms
            # for the same product of the fp8 operands in fp32 (torch 2.14.1, 2-core Xeon), which gives the same
            # result bit for bit there. The CPU suite's fp8 tests spent minutes in it.
            return ((q.float() @ weight.float().t()) * (scale * weight_scale)).to(out_dtype)
        return torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype,
                                use_fast_accum=fast)

    @staticmethod
    def backward(ctx, grad):
        # The input gradient stays a bf16 matmul: in fp8 it would need the weight transposed first (fp8 tensor cores
        # take both operands K-major), and on an H100 that transpose costs as much as the fp8 matmul saves.
        weight, weight_scale = ctx.saved_tensors
        dequantized = weight.to(grad.dtype) * weight_scale.to(grad.dtype)
        return (grad @ dequantized).to(ctx.input_dtype), None, None, None, None, None


class Fp8BaseLinear(torch.nn.Module):
    """Stands in for a frozen ComfyUI fp8 Linear inside a LoRA layer for one training session.

    Falls back to the Linear itself whenever its weight is not a resident e4m3fn tensor on the input's device
    (a partial low-VRAM load that casts on the fly, or ComfyUI weight patches applied at run time). ``rowwise``:
    one input scale per row (token) instead of one per tensor; ``fast``: Hopper's fast fp8 accumulation (both
    chosen by core.speed_plan)."""

    def __init__(self, linear: torch.nn.Module, compute_dtype: torch.dtype, rowwise: bool = False, fast: bool = True):
        super().__init__()
        self.linear = linear
        self.compute_dtype = compute_dtype
        self.rowwise = rowwise
        self.fast = fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        weight = linear.weight
        if (weight.dtype != E4M3 or weight.device != x.device or getattr(linear, "weight_function", None)
                or getattr(linear, "bias_function", None)):
            return linear(x)
        scale = getattr(linear, "scale_weight", None)
        if scale is None:
            scale = torch.ones((), device=x.device)
        rows = x.reshape(-1, x.shape[-1])
        out = _Fp8Matmul.apply(rows, weight, scale.to(x.device), self.compute_dtype, self.rowwise, self.fast)
        out = out.reshape(*x.shape[:-1], weight.shape[0])
        if linear.bias is not None:
            out = out + linear.bias.to(out.dtype)
        return out


def fits(linear: torch.nn.Module) -> bool:
    """_scaled_mm wants both weight dimensions divisible by 16."""
    return linear.weight.ndim == 2 and linear.weight.shape[0] % 16 == 0 and linear.weight.shape[1] % 16 == 0


def _takes(name: str, linear: torch.nn.Module) -> bool:
    return not name.endswith(SKIPPED_SUFFIXES) and linear.weight.dtype == E4M3 and fits(linear)


def has_fp8_base(transformer: torch.nn.Module) -> bool:
    """Whether ``transformer`` has Linear layers that fp8 matmuls take (fp8_matmul auto turns them on then)."""
    return any(isinstance(m, torch.nn.Linear) and _takes(name, m) for name, m in transformer.named_modules())


@contextlib.contextmanager
def fp8_base_matmuls(layers: dict, compute_dtype: torch.dtype, rowwise: bool = False, fast: bool = True,
                     required: bool = True):
    """Route the base Linear of each LoRA layer in ``layers`` ({name: peft LoraLayer}) through fp8 matmuls for
    the ``with`` body (``rowwise``, ``fast``: see Fp8BaseLinear). Raises Fp8Unavailable when none of them is fp8,
    unless not ``required`` (fp8_matmul auto: those layers keep bf16 matmuls then)."""
    routed = {name: layer.base_layer for name, layer in layers.items() if _takes(name, layer.base_layer)}
    if not routed and required:
        raise Fp8Unavailable("fp8_matmul 'on' needs the model loaded in fp8 e4m3fn (Dev2ProLoadModel weight_dtype "
                         "fp8_e4m3fn, or an fp8 checkpoint); this model's block weights are not fp8. Set "
                         "fp8_matmul to off, or load the model in fp8")
    try:
        for name, base in routed.items():
            layers[name].base_layer = Fp8BaseLinear(base, compute_dtype, rowwise, fast)
        yield
    finally:
        for name, base in routed.items():
            layers[name].base_layer = base
