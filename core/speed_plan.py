"""Every speed decision of a training run, made once from its settings and its device.

``plan()`` builds a SpeedPlan when a run starts; the speed modules read their part of it: core.blocks (compiling,
recomputation, block-input offload, attention, compiler settings), core.step_graphs (CUDA graphs of the step),
core.fp8_matmul (scaling, accumulation), core.block_swap (the copy stream) and core.training (page-locked input
copies). Benchmarks and tests change a decision by passing ``train_lora(speed={name: value})``, never by setting
module globals. Each default below names the measurement that chose it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from .config import TrainConfig
from .fp8_matmul import unsupported_reason

log = logging.getLogger("dev2pro-lora")

# The compiler's activation memory budget of the recomputed blocks, by (block kind, fp8_matmul, inputs offloaded):
# 0 recomputes the whole block in backward from its input; more lets the partitioner keep what costs most to
# recompute per byte (at 0.05, 700 fewer small matmuls a step: by their count, the LoRA down-projections and
# modulation vectors). Measured on the H100 at 1024x1024 (benchmarks/profile_step.py --budgets --offload,
# results/2026-11-24_h100_recompute_budget.jsonl and ..._offload_inputs_budgets.jsonl), s/step and peak:
# - inputs on the GPU, bf16: 0 -> 0.545 s / 14.8 GiB; 0.035 -> 0.532 / 15.15; 0.05 -> 0.510 / 16.3 (over 16).
# - inputs on the GPU, fp8_matmul: 0 -> 0.508 / 14.6; 0.05 -> 0.471-0.474 / 15.03; 0.07 -> 0.443 / 16.2 (over 16).
# - inputs offloaded, bf16: 0.05 -> 0.514 / 14.87; 0.1 -> 0.508 / 15.43.
# - inputs offloaded, fp8_matmul: 0 -> 0.500 / 13.71; 0.07 -> 0.454-0.464 / 14.73 (three runs); 0.085 -> 0.450 /
#   14.78; 0.1 -> 0.449 / 14.95 (the last three in one process: results/2026-11-24_h100_fp8_budget_sweep_1024.jsonl).
# Without offloading the budgets stay 0: in the one train_step.py run with budgets there, 512x512 got slower and
# larger (0.227 s / 15.3 GiB against 0.202 s / 13.1 GiB; results/2026-11-24_h100_recompute_budget_train_step_partial.txt).
RECOMPUTE_MEMORY_BUDGETS = MappingProxyType({
    ("double", False, False): 0.0, ("single", False, False): 0.0,
    ("double", True, False): 0.0, ("single", True, False): 0.0,
    ("double", False, True): 0.05, ("single", False, True): 0.05,
    ("double", True, True): 0.1, ("single", True, True): 0.1,
})

# From how many tokens a forward's block inputs (batch x (image + text) tokens) wait in host memory between forward
# and backward (core.input_offload) on a GPU, which frees 0.9 GiB at 1024x1024 (fp8_matmul, budget 0: 14.6 -> 13.71
# GiB at 0.508 -> 0.500 s) for the budgets above. Between 512x512 (1,536 tokens: launch-bound, nothing to gain from
# memory) and 1024x1024 (4,608); sizes in between are not measured.
OFFLOAD_INPUTS_FROM_TOKENS = 3072

# Compiled variants a block function may keep. Each training setting that changes what the blocks see (the first
# block's input not requiring grad, a new image size, fp8 matmuls on or off, another rank or dtype) adds one, and
# a ComfyUI server trains many times in one process. At dynamo's default of 8, the next variant would run eager
# without a word: slower, and without the compiler's recomputation, out of memory.
RECOMPILE_LIMIT = 64

# Eager steps of a session before its CUDA graphs are captured: the blocks compile in the first.
STEP_GRAPH_WARMUP = 2

# SDPA kernel preferences a session can ask ComfyUI's attention for (core.blocks.ATTENTION):
# - "cudnn_first": ComfyUI 0.3.64 asked SDPA for cuDNN's attention first; 0.33 asks for flash attention first. At
#   Flux's training shapes on Hopper cuDNN's is 1.8x faster: H200, 1024x1024, 4 double + 8 single full-width blocks
#   (benchmarks/profile_step.py), attention kernels 26.1 ms a step on 0.3.64 against 47.8 ms on 0.33
#   (pytorch_flash fwd + bwd), the rest equal.
# - "no_cudnn": block-swap sessions. cuDNN's attention backward crashed them with an illegal memory access (H100,
#   torch 2.11) whenever an eager session at the same size had run earlier in the process: 7 of 7 runs of
#   benchmarks/low_vram_after_fast.py --sequence eager:1024 low_vram:1024; cuDNN keeps its attention graphs in a
#   process-wide cache.
# - "comfyui": whatever ComfyUI's own attention does (no override).
ATTENTION_CHOICES = ("cudnn_first", "no_cudnn", "comfyui")


@dataclass(frozen=True)
class SpeedPlan:
    device_type: str
    # torch.compile per block kind (setting compile; auto: on a GPU)
    compiled: bool
    # each block recomputed in backward from its input (setting gradient_checkpointing)
    checkpointing: bool
    # compiled and checkpointed blocks without block swap: the compiler recomputes (one compiled forward and one
    # compiled backward per block, no Python between); off: torch.utils.checkpoint around the compiled block
    recompute_in_compiled_backward: bool = True
    # {(block kind, inputs offloaded): activation memory budget} of the compiler's recomputation
    recompute_budgets: Mapping[tuple[str, bool], float] = field(default_factory=dict)
    # block inputs wait in host memory from this many tokens per forward on; None: never
    offload_inputs_from_tokens: int | None = None
    # blocks whose weights stream in from page-locked memory (setting blocks_to_swap)
    blocks_to_swap: int = 0
    # block swap copies on a side stream, overlapped with compute (off: on the compute stream, a diagnostic)
    swap_copy_stream: bool = True
    # fp8 tensor-core matmuls of the fp8 base in the forward passes (setting fp8_matmul)
    fp8_matmul: bool = False
    # fp8_matmul's input scaling: one scale per tensor, or per row (token)
    fp8_rowwise: bool = False
    # Hopper's fast fp8 accumulation, as torchao's float8 forward uses it: 3-13% faster matmuls at Flux's shapes on
    # an H100 (benchmarks/fp8_gemm.py)
    fp8_fast_accumulation: bool = True
    # replay each step from CUDA graphs where the session allows it (core.step_graphs; training._graphed)
    step_graphs: bool = False
    step_graph_warmup: int = STEP_GRAPH_WARMUP
    # batch shapes (aspect buckets) of a session with graphs of their own; steps of any other shape run eagerly.
    # More than 1 ran on the H200 (two shapes at 512: 0.174 s against 0.169 for one) but is not yet checked against
    # eager steps there (benchmarks/step_graphs_check.py --cases batch_shapes)
    step_graph_shapes: int = 1
    # the step's input copies through page-locked memory (core.training._to_device)
    pinned_inputs: bool = False
    # attention kernels (ATTENTION_CHOICES), without block swap and with it
    attention: str = "comfyui"
    attention_in_swap: str = "comfyui"
    # Inductor's C++ wrapper launches a compiled block's kernels from C++ instead of Python: a step calls the compiled
    # blocks 57 times forward and 57 times backward, and at 512x512 it is bound by that launching. GPU only (on the
    # CPU it would compile every kernel into C++ too: slow to start, nothing gained), and only with a C++ compiler.
    cpp_wrapper: bool = False
    recompile_limit: int = RECOMPILE_LIMIT

    def describe(self) -> dict:
        """The plan as JSON-ready values, for logs and benchmark rows."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["recompute_budgets"] = {f"{kind}{' offloaded' if off else ''}": budget
                                       for (kind, off), budget in sorted(self.recompute_budgets.items())}
        return values

    def summary(self) -> str:
        """One line for the log."""
        parts = [("compiled" if self.compiled else "eager") + (", checkpointed" if self.checkpointing else "")]
        if self.blocks_to_swap:
            parts.append(f"{self.blocks_to_swap} blocks swapped")
        if self.fp8_matmul:
            parts.append("fp8 matmuls" + (" (row-wise)" if self.fp8_rowwise else ""))
        if self.step_graphs:
            parts.append("CUDA graphs of the step")
        if self.attention != "comfyui":
            parts.append(f"attention {self.attention}")
        return ", ".join(parts)


@functools.cache
def cpp_compiler_found() -> bool:
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


def plan(config: TrainConfig, device: torch.device, fp8_base: bool = False, **overrides) -> SpeedPlan:
    """The plan of a run of ``config`` on ``device``, for a base stored in fp8 e4m3fn or not (``fp8_base``);
    ``overrides`` replace single decisions (benchmarks, tests)."""
    gpu = device.type == "cuda"
    # fp8_matmul auto: on where it runs. On an H200 it took 12 % off a step at 1024x1024, 11 % at 512x512 and 6 % at
    # 10 GiB free; 500 steps trained to a held-out loss 0.24 % below bf16 training's, deltas at cosine 0.997
    # (benchmarks/results/2026-12-02_h200_fp8_quality_256.jsonl). Not on the CPU: _scaled_mm is a reference loop there.
    auto = config.fp8_matmul == "auto" and gpu and fp8_base and unsupported_reason(device) is None
    fp8 = overrides.get("fp8_matmul", config.fp8_matmul == "on" or auto)
    defaults = SpeedPlan(
        device_type=device.type,
        compiled=config.compiled_on(device.type),
        checkpointing=config.gradient_checkpointing,
        recompute_budgets=MappingProxyType({(kind, off): budget for (kind, f, off), budget
                                            in RECOMPUTE_MEMORY_BUDGETS.items() if f == fp8}),
        offload_inputs_from_tokens=OFFLOAD_INPUTS_FROM_TOKENS if gpu else None,
        blocks_to_swap=config.blocks_to_swap,
        fp8_matmul=fp8,
        step_graphs=gpu,
        pinned_inputs=gpu,
        attention="cudnn_first" if gpu else "comfyui",
        attention_in_swap="no_cudnn" if gpu else "comfyui",
        cpp_wrapper=gpu and cpp_compiler_found(),
    )
    known = {f.name for f in dataclasses.fields(SpeedPlan)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown speed override {', '.join(unknown)}; the plan's decisions are {', '.join(sorted(known))}")
    for name in ("attention", "attention_in_swap"):
        if overrides.get(name, "comfyui") not in ATTENTION_CHOICES:
            raise ValueError(f"speed override {name} must be one of {', '.join(ATTENTION_CHOICES)}, got {overrides[name]!r}")
    if "recompute_budgets" in overrides:
        overrides["recompute_budgets"] = MappingProxyType({**defaults.recompute_budgets,
                                                           **overrides["recompute_budgets"]})
    return dataclasses.replace(defaults, **overrides)
