"""How each Flux transformer block runs during training: input copies, checkpointing, compilation, block swap.

All of it goes through ComfyUI's own ``patches_replace`` hook ("dit" double_block / single_block entries), so the
modules of the MODEL that other nodes share are never replaced.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch
from torch.utils.checkpoint import checkpoint

from .block_swap import BlockSwap
from .comfy_compat import block_options
from .input_offload import BlockInputOffload

log = logging.getLogger("dev2pro-lora")


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


# The compiler's activation memory budget of the recomputed blocks, by block kind, fp8_matmul and whether the block
# inputs wait in host memory (OFFLOAD_INPUTS_FROM_TOKENS): 0 recomputes the whole block in backward from its input;
# more lets the partitioner keep what costs most to recompute per byte (at 0.05, 700 fewer small matmuls a step: by
# their count, the LoRA down-projections and modulation vectors). Measured on the H100 at 1024x1024
# (benchmarks/profile_step.py --budgets --offload, results/2026-11-24_h100_recompute_budget.jsonl and
# ..._offload_inputs_budgets.jsonl), s/step and peak:
# - inputs on the GPU, bf16: 0 -> 0.545 s / 14.8 GiB; 0.035 -> 0.532 / 15.15; 0.05 -> 0.510 / 16.3 (over 16).
# - inputs on the GPU, fp8_matmul: 0 -> 0.508 / 14.6; 0.05 -> 0.471-0.474 / 15.03; 0.07 -> 0.443 / 16.2 (over 16).
# - inputs offloaded, bf16: 0.05 -> 0.514 / 14.87; 0.1 -> 0.508 / 15.43.
# - inputs offloaded, fp8_matmul: 0 -> 0.500 / 13.71; 0.07 -> 0.454-0.464 / 14.73 (three runs); 0.085 -> 0.450 /
#   14.78; 0.1 -> 0.449 / 14.95 (the last three in one process: results/2026-11-24_h100_fp8_budget_sweep_1024.jsonl).
# Without offloading the budgets stay 0: in the one train_step.py run with budgets there, 512x512 got slower and
# larger (0.227 s / 15.3 GiB against 0.202 s / 13.1 GiB; results/2026-11-24_h100_recompute_budget_train_step_partial.txt).
# Benchmarks flip these.
RECOMPUTE_MEMORY_BUDGETS = {
    ("double", False, False): 0.0, ("single", False, False): 0.0,
    ("double", True, False): 0.0, ("single", True, False): 0.0,
    ("double", False, True): 0.05, ("single", False, True): 0.05,
    ("double", True, True): 0.1, ("single", True, True): 0.1,
}  # (kind, fp8_matmul, inputs offloaded)


def recompute_budgets(fp8_matmul: bool) -> dict[tuple[str, bool], float]:
    """{(block kind, inputs offloaded): budget} for a session."""
    return {(kind, offloaded): budget for (kind, fp8, offloaded), budget in RECOMPUTE_MEMORY_BUDGETS.items()
            if fp8 == fp8_matmul}


# From how many tokens a forward's block inputs (batch x (image + text) tokens) wait in host memory between forward
# and backward (core.input_offload) on a GPU, which frees 0.9 GiB at 1024x1024 (fp8_matmul, budget 0: 14.6 -> 13.71
# GiB at 0.508 -> 0.500 s) for the budgets above. Between 512x512 (1,536 tokens: launch-bound, nothing to gain from
# memory) and 1024x1024 (4,608); sizes in between are not measured. Benchmarks flip this.
OFFLOAD_INPUTS_FROM_TOKENS = 3072


def _call_recomputing(kind: str, budget: float, *args):
    # a graph partitioned under one budget must not serve another: each budget compiles its own code object
    use = "recomputed" if budget == 0 else f"recomputed_budget_{budget:g}".replace(".", "_")
    with torch._functorch.config.patch(activation_memory_budget=budget):
        return _compiled(kind, use)(*args)


# Block swap needs the recomputation to pass through Python (to fetch the weights back), so it keeps
# torch.utils.checkpoint around the compiled block; without swap the compiler recomputes. Benchmarks flip this.
RECOMPUTE_IN_COMPILED_BACKWARD = True


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


# Compiled variants a block function may keep. Each training setting that changes what the blocks see (the first
# block's input not requiring grad, a new image size, fp8 matmuls on or off, another rank or dtype) adds one, and
# a ComfyUI server trains many times in one process. At dynamo's default of 8, the next variant would run eager
# without a word: slower, and without the compiler's recomputation, out of memory.
RECOMPILE_LIMIT = 64


# Inductor's C++ wrapper launches a compiled block's kernels from C++ instead of Python. A training step calls the
# compiled blocks 57 times forward and 57 times backward, and at 512x512 the step is bound by that launching.
# GPU only: on the CPU it would compile every block's kernels into C++ as well (slow to start, nothing gained).
CPP_WRAPPER_ON_GPU = True


@functools.cache
def _cpp_compiler_found() -> bool:
    """The C++ wrapper needs a C++ compiler at run time (g++/clang, or MSVC's cl on Windows), which torch.compile
    itself does not: without one, the blocks keep Inductor's Python launcher instead of failing to compile."""
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
        return True
    except Exception as e:  # noqa: BLE001  any failure to find or run it means: no C++ wrapper
        log.warning("no C++ compiler for Inductor's C++ wrapper (%s): compiled blocks keep the Python launcher, "
                    "slower at small image sizes. Install g++ (Linux) or the MSVC build tools (Windows)", e)
        return False


@contextlib.contextmanager
def compiler_settings(device_type: str):
    """For a training session: room for the block functions' variants and, on a GPU, the C++ launcher. Both are
    global compiler settings, so they are put back after the session."""
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    cpp_wrapper = CPP_WRAPPER_ON_GPU and device_type == "cuda" and _cpp_compiler_found()
    with torch._dynamo.config.patch(recompile_limit=limit), torch._inductor.config.patch(cpp_wrapper=cpp_wrapper):
        yield


# cuDNN's attention backward crashed block-swap training with an illegal memory access (H100, torch 2.11) whenever
# an eager training session at the same size had run earlier in the process: 7 of 7 runs of
# benchmarks/low_vram_after_fast.py --sequence eager:1024 low_vram:1024, whatever the kernel launcher or copy stream;
# with CUDA_LAUNCH_BLOCKING=1 the faulting kernel is cuDNN's attention backward inside the compiled block. cuDNN
# keeps its attention graphs in a process-wide cache. ComfyUI puts cuDNN first inside its own attention call, so a
# global switch cannot reach it: swap sessions route attention through ComfyUI's override hook instead, to SDPA's
# other fused kernels. Benchmarks flip this.
CUDNN_ATTENTION_IN_SWAP = False


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


# ComfyUI 0.3.64 asked SDPA for cuDNN's attention first; 0.33 asks for flash attention first. At Flux's training
# shapes on Hopper cuDNN's is 1.8x faster: H200, 1024x1024, 4 double + 8 single full-width blocks
# (benchmarks/profile_step.py), attention kernels 26.1 ms a step on 0.3.64 against 47.8 ms on 0.33
# (pytorch_flash fwd + bwd), the rest equal. Sessions without block swap ask for cuDNN first on either version.
def attention_cudnn_first(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                          skip_output_reshape=False, **kwargs):
    """ComfyUI's ``optimized_attention_override`` for GPU sessions without block swap: cuDNN's attention first."""
    from torch.nn.attention import SDPBackend

    return _sdpa([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                  SDPBackend.MATH], q, k, v, heads, mask, skip_reshape, skip_output_reshape)


def session_attention(swap) -> object:
    """The attention override of a GPU training session (attention_without_cudnn or attention_cudnn_first)."""
    return attention_cudnn_first if swap is None or CUDNN_ATTENTION_IN_SWAP else attention_without_cudnn


class BlockRunner:
    """Runs the transformer's blocks for training: ``replacements()`` gives the ``patches_replace`` "dit" entries.

    - ``checkpointing``: each block is recomputed in backward from its saved input (far less memory).
    - ``compiled``: each block kind goes through torch.compile (fused kernels, far fewer launches).
    - ``swap``: a BlockSwap that streams off-GPU block weights in just before each block runs.
    """

    def __init__(self, model: torch.nn.Module, checkpointing: bool, compiled: bool, swap: BlockSwap | None = None,
                 budgets: dict[tuple[str, bool], float] | None = None):
        self.model = model
        self.recompute_budgets = budgets if budgets is not None else recompute_budgets(fp8_matmul=False)
        self.offload: BlockInputOffload | None = None  # made on the first block that offloads
        self.checkpointing = checkpointing
        self.compiled = compiled
        self.swap = swap

    def _run(self, kind: str, index: int, block, args: tuple):
        def call(*tensors):
            if self.swap is not None:
                self.swap.enter(index)
            if self.compiled:
                return _compiled(kind, "swapped" if self.swap is not None else "plain")(block, *tensors, *args)
            if self.checkpointing:
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
        return self.compiled and self.checkpointing and self.swap is None and RECOMPUTE_IN_COMPILED_BACKWARD

    def offloads(self, streams: tuple[torch.Tensor, ...]) -> bool:
        """Whether this forward's block inputs wait in host memory; the same answer for every block of it."""
        tokens = sum(t.shape[0] * t.shape[1] for t in streams)
        return streams[0].is_cuda and tokens >= OFFLOAD_INPUTS_FROM_TOKENS

    def _recomputed_by_compiler(self, kind: str, index: int, block):
        def replace(args, extra):
            rest = (args["vec"], args["pe"], args.get("attn_mask"), block_options(args.get("transformer_options")))
            streams = (args["img"], args["txt"]) if kind == "double" else (args["img"],)
            offloaded = self.offloads(streams)
            out = _call_recomputing(kind, self.recompute_budgets[kind, offloaded], block, *streams, *rest)
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
            out = checkpoint(call, *streams, use_reentrant=False) if self.checkpointing else call(*streams)
            return {"img": out[0], "txt": out[1]} if kind == "double" else {"img": out}

        return replace
