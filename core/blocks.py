"""How each Flux transformer block runs during training: input copies, checkpointing, compilation, block swap.

All of it goes through ComfyUI's own ``patches_replace`` hook ("dit" double_block / single_block entries), so the
modules of the MODEL that other nodes share are never replaced.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.utils.checkpoint import checkpoint

from .block_swap import BlockSwap
from .comfy_compat import block_options
from .input_offload import BlockInputOffload
from .speed_plan import SpeedPlan


def _double_block(block, img, txt, vec, pe, attn_mask, transformer_options):
    return block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)


def _single_block(block, img, vec, pe, attn_mask, transformer_options):
    return block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)


BLOCK_FUNCTIONS = {"double": (_double_block, 2), "single": (_single_block, 1)}  # function, number of input streams


class _OutOfPlaceAdds(torch.overrides.TorchFunctionMode):
    """Turns ``a += b`` on tensors into ``a = a + b``. Flux's blocks add into their input streams in place after
    normalising them (0.3.64: ``txt +=``, ``x +=``; 0.33 also ``img +=``), which overwrites tensors saved for
    backward: autograd refuses that, AOTAutograd's tracing too, and torch.utils.checkpoint's recomputation silently
    computes wrong gradients with it (ComfyUI 0.33's ``img +=``: 11 % off in the double block's img_mod and qkv,
    measured against plain autograd). Out of place, every path computes what plain autograd does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.add_:  # what `a += b` dispatches to
            return torch.add(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _double_out_of_place(block, *args):
    with _OutOfPlaceAdds():
        return _double_block(block, *args)


def _single_out_of_place(block, *args):
    with _OutOfPlaceAdds():
        return _single_block(block, *args)


def _own_code(function, name: str):
    """``function`` again, under a code object of its own. Dynamo keeps compiled graphs, and its recompile budget,
    per code object, so each use of the block functions whose graphs must never be shared gets its own copy."""
    return types.FunctionType(function.__code__.replace(co_name=name), function.__globals__, name,
                              function.__defaults__, function.__closure__)


@functools.cache
def _compiled(kind: str, use: str = "plain"):
    """One compiled function per block kind, shared by all blocks of that kind: the block is an argument, so
    the 19 double and 38 single blocks reuse one graph each instead of compiling 57 times. A new image size
    compiles once more, with dynamic shapes from then on.

    ``use`` keeps graphs apart that must not be reused for one another:
    - "recomputed": checkpointing done by the compiler. Compiled with an activation memory budget of 0, the
      block's backward graph recomputes its forward from the block's inputs, so a block is one compiled forward
      plus one compiled backward, with no Python checkpoint machinery around it; partitioned differently.
    - "swapped": block swap, where attention must go without cuDNN (``attention_without_cudnn``), whatever
      dynamo's guards cover."""
    function = _double_out_of_place if kind == "double" else _single_out_of_place
    if use != "plain":
        function = _own_code(function, f"_{kind}_{use}")
    return torch.compile(function)


def _call_recomputing(kind: str, budget: float, *args):
    # a graph partitioned under one budget must not serve another: each budget compiles its own code object
    use = "recomputed" if budget == 0 else f"recomputed_budget_{budget:g}".replace(".", "_")
    with torch._functorch.config.patch(activation_memory_budget=budget):
        return _compiled(kind, use)(*args)


def _eager_saving_copies(kind: str, block, args: tuple):
    """Eager without checkpointing: every tensor saved for backward that shares memory with an input copy is
    itself copied when saved, so the block's later in-place add cannot invalidate it."""
    function, streams = BLOCK_FUNCTIONS[kind]
    copies = [t.clone() for t in args[:streams]]
    mutated = {c.untyped_storage().data_ptr() for c in copies}

    def pack(t):
        return t.clone() if t.untyped_storage().data_ptr() in mutated else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return function(block, *copies, *args[streams:])


@contextlib.contextmanager
def compiler_settings(plan: SpeedPlan):
    """For a training session: room for the block functions' variants and, with ``plan.cpp_wrapper``, the C++
    launcher. Both are global compiler settings, so they are put back after the session."""
    limit = max(plan.recompile_limit, torch._dynamo.config.recompile_limit)
    with torch._dynamo.config.patch(recompile_limit=limit), torch._inductor.config.patch(cpp_wrapper=plan.cpp_wrapper):
        yield


def _sdpa(backends: list, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False):
    """What ComfyUI's PyTorch attention computes, on SDPA's ``backends`` in that order of preference."""
    from torch.nn.attention import sdpa_kernel

    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
    with sdpa_kernel(backends, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * dim_head)


def attention_without_cudnn(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                            skip_output_reshape=False, **kwargs):
    """ComfyUI's ``optimized_attention_override`` for block-swap sessions: flash or memory-efficient attention."""
    from torch.nn.attention import SDPBackend

    return _sdpa([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], q, k, v, heads,
                 mask, skip_reshape, skip_output_reshape)


def attention_cudnn_first(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                          skip_output_reshape=False, **kwargs):
    """ComfyUI's ``optimized_attention_override`` for GPU sessions without block swap: cuDNN's attention first."""
    from torch.nn.attention import SDPBackend

    return _sdpa([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH], q, k, v, heads, mask, skip_reshape, skip_output_reshape)


# The attention overrides a session can ask ComfyUI for (why each: core.speed_plan.ATTENTION_CHOICES).
ATTENTION = {"cudnn_first": attention_cudnn_first, "no_cudnn": attention_without_cudnn, "comfyui": None}


class BlockRunner:
    """Runs the transformer's blocks for training: ``replacements()`` gives the ``patches_replace`` "dit" entries.

    - ``plan.checkpointing``: each block is recomputed in backward from its saved input (far less memory).
    - ``plan.compiled``: each block kind goes through torch.compile (fused kernels, far fewer launches).
    - ``swap``: a BlockSwap that streams off-GPU block weights in just before each block runs.
    """

    def __init__(self, model: torch.nn.Module, plan: SpeedPlan, swap: BlockSwap | None = None):
        self.model = model
        self.plan = plan
        self.offload: BlockInputOffload | None = None  # made on the first block that offloads
        self.swap = swap

    def _run(self, kind: str, index: int, block, args: tuple):
        def call(*tensors):
            if self.swap is not None:
                self.swap.enter(index)
            if self.plan.compiled:
                return _compiled(kind, "swapped" if self.swap is not None else "plain")(block, *tensors, *args)
            if self.plan.checkpointing:
                return (_double_out_of_place if kind == "double" else _single_out_of_place)(block, *tensors, *args)
            return _eager_saving_copies(kind, block, tensors + args)

        return call

    def replacements(self) -> dict:
        """Each entry binds its block itself: ComfyUI's ``original_block`` closes over its loop variable, so
        calling it again during backward's recomputation would run the last block instead."""
        doubles = len(self.model.double_blocks)
        if self.recomputed_by_compiler:
            entry = self._recomputed_by_compiler
        else:
            entry = self._through_python
        dit = {("double_block", i): entry("double", i, b) for i, b in enumerate(self.model.double_blocks)}
        dit.update({("single_block", i): entry("single", doubles + i, b)
                    for i, b in enumerate(self.model.single_blocks)})
        return dit

    @property
    def recomputed_by_compiler(self) -> bool:
        """Whether each block is one compiled forward and one compiled backward, with no Python between them."""
        plan = self.plan
        return plan.compiled and plan.checkpointing and self.swap is None and plan.recompute_in_compiled_backward

    def attention_override(self):
        """ComfyUI's ``optimized_attention_override`` for this session, or None for ComfyUI's own choice."""
        return ATTENTION[self.plan.attention if self.swap is None else self.plan.attention_in_swap]

    def offloads(self, streams: tuple[torch.Tensor, ...]) -> bool:
        """Whether this forward's block inputs wait in host memory; the same answer for every block of it."""
        threshold = self.plan.offload_inputs_from_tokens
        return threshold is not None and sum(t.shape[0] * t.shape[1] for t in streams) >= threshold

    def _recomputed_by_compiler(self, kind: str, index: int, block):
        def replace(args, extra):
            rest = (args["vec"], args["pe"], args.get("attn_mask"), block_options(args.get("transformer_options")))
            streams = (args["img"], args["txt"]) if kind == "double" else (args["img"],)
            offloaded = self.offloads(streams)
            out = _call_recomputing(kind, self.plan.recompute_budgets[kind, offloaded], block, *streams, *rest)
            out = out if kind == "double" else (out,)
            if offloaded:
                if self.offload is None:
                    blocks = len(self.model.double_blocks) + len(self.model.single_blocks)
                    self.offload = BlockInputOffload(streams[0].device, blocks)
                self.offload.park(index, streams, out)
            return {"img": out[0], "txt": out[1]} if kind == "double" else {"img": out[0]}

        return replace

    def _through_python(self, kind: str, index: int, block):
        """Eager, or compiled with torch.utils.checkpoint around it (block swap fetches weights in ``_run``)."""
        def replace(args, extra):
            rest = (args["vec"], args["pe"], args.get("attn_mask"), block_options(args.get("transformer_options")))
            call = self._run(kind, index, block, rest)
            streams = (args["img"], args["txt"]) if kind == "double" else (args["img"],)
            out = checkpoint(call, *streams, use_reentrant=False) if self.plan.checkpointing else call(*streams)
            return {"img": out[0], "txt": out[1]} if kind == "double" else {"img": out}

        return replace
