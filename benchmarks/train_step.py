"""Seconds per step and peak GPU memory: Dev2ProTrainLoRA against ComfyUI's own TrainLoraNode, in one run.

The model is Flux-dev at its real size (19 double + 38 single blocks, 11.9B parameters) built through ComfyUI's
own classes with random weights, stored in fp8 e4m3fn with bf16 compute: the cost of a step equals the real
model's. Batch 1, 512 text tokens (T5 width 4096), LoRA rank 16, AdamW, gradient checkpointing (both trainers'
default). ComfyUI's node is called as ComfyUI calls it (under inference mode), ours through the trainer the node calls
(core.training.train_lora, under inference mode, so that each row can pass its SpeedPlan overrides), on the same
model and the same latent and caption. Prints one JSON line per configuration:

- ``seconds_per_step_median``: median over the timed steps after warm-up. A step's time is the GPU-timeline gap
  between consecutive optimizer steps (CUDA events recorded by a global optimizer hook): no sync is added.
- ``peak_gib``: torch.cuda.max_memory_allocated during the node's run, the resident fp8 weights included.
- ``speedup_vs_comfyui``: ComfyUI's median (its node's defaults) over ours at the same resolution;
  ``speedup_vs_comfyui_fastest`` likewise against its fastest settings (``--comfyui-settings``, below).
- ``comfyui_version`` (every row) and ``comfyui_settings`` (ComfyUI's rows): the ComfyUI in use and every input its
  TrainLoraNode got besides model, latents and conditioning.
- ``graph_breaks``: dynamo graph breaks during the node's run (0: each block kind compiled whole).
- loss comparisons (same seed, data and noise): ours against eager (``--eager-too``), fp8_matmul on or off against
  the default, auto (``--fp8-too``, ``--bf16-too``), without CUDA graphs of the step against with them (``--no-graphs-too``), low-VRAM against fast
  mode.
- ``allocated_after_unload_gib``: GPU memory still allocated once the node returned and the model was unloaded.
- ``speed_plan``: every speed decision of the row (core.speed_plan.SpeedPlan.describe()).
- ``step_graphs_captured`` / ``step_graphs_failed``: sessions whose steps replayed from CUDA graphs, or whose capture
  failed and ran eagerly (core.step_graphs; from the run's TrainResult.speed).
- low-VRAM rows emulate a card with ``--card-gib`` of free memory: the rest is taken by a placeholder tensor
  before the model is loaded, so ComfyUI loads only what fits and the trainer streams the rest; the placeholder
  is subtracted from the peak.

    python benchmarks/train_step.py [--resolutions 512 1024] [--steps 10] [--warmup 3] [--low-vram 1024]
                                    [--fp8-too] [--bf16-too] [--no-graphs-too] [--two-shapes-too] [--eager-too] [--python-wrapper-too] [--attention-too comfyui no_cudnn]
                                    [--depth 19 38]
                                    [--comfyui-settings default|fastest|both] [--skip-ours]

ComfyUI's TrainLoraNode is called with its own defaults (``default``) and with the fastest settings its inputs offer
(``fastest``, COMFYUI_FASTEST). ``both`` is the default where the node has 0.33's speed inputs (bypass_mode,
offloading); on 0.3.64 one row with its defaults.

Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH, or the ComfyUI the pack is installed in); on the lent GPU
machine, ``source benchmarks/gpu_setup.sh 0.33.0`` first (see there).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time

import torch
from torch._dynamo.utils import counters
from torch.optim.optimizer import register_optimizer_step_post_hook

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
TINY_FLUX = dict(FLUX_DEV, hidden_size=128, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=64,
                 axes_dim=[8, 28, 28])  # --smoke: the whole script on the CPU in seconds, numbers meaningless
GIB = 2**30
CUDA = torch.cuda.is_available()
# The benchmark's own choices; every other input of ComfyUI's node keeps the node's default.
COMFYUI_SHAPE = dict(batch_size=1, grad_accumulation_steps=1, learning_rate=1e-4, seed=0)
# Fastest settings of ComfyUI's node, applied where its schema has the input. Bypass: the LoRA runs beside the frozen
# weight (x·A·B, like peft), so backward computes no full-size gradient of the patched weight, a GEMM as large as the
# layer's own. No offloading: the model fits. Checkpointing stays on, whole blocks: without it 0.33's node fails in
# backward (Flux's blocks add their residuals in place, img += ..., into tensors a norm saved for backward).
COMFYUI_FASTEST = dict(bypass_mode=True, offloading=False, training_dtype="bf16", gradient_checkpointing=True,
                       checkpoint_depth=1)


def import_comfyui_and_pack(cpu: bool):
    sys.path.insert(0, os.path.join(PACK_DIR, "scripts"))
    from comfy_inprocess import comfyui_path

    sys.path.insert(0, comfyui_path())
    from comfy.cli_args import args

    args.cpu = cpu
    import utils.extra_config  # noqa: F401  ComfyUI's utils package must win over comfy/utils.py, as in main.py
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(PACK_DIR)):
        raise SystemExit("the pack failed to load")
    return sys.modules[PACK_DIR.replace(".", "_x_")]


def comfyui_version() -> str:
    import comfyui_version as v  # the tree on sys.path, i.e. in use

    return v.__version__


def call_v3(node_cls, hidden: dict, **inputs):
    """A V3 node's execute as ComfyUI's executor calls it: validated, on a locked clone of the class that holds the
    hidden inputs (0.3.64 takes them as a dict, 0.33 inside V3Data), each input wrapped in a list for INPUT_IS_LIST."""
    from comfy_api.internal import make_locked_method_func
    from comfy_api.latest import _io

    node_cls.VALIDATE_CLASS()
    v3_data = hasattr(_io.HiddenHolder, "from_v3_data")
    clone = node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden} if v3_data else hidden)
    if node_cls.INPUT_IS_LIST:
        inputs = {k: [v] for k, v in inputs.items()}
    return make_locked_method_func(node_cls, "execute", clone)(**inputs)


def random_flux_dev(shape: dict):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import random_models  # scripts/, on sys.path since import_comfyui_and_pack

    device = comfy.model_management.get_torch_device()
    config = comfy.supported_models.Flux(random_models.flux_params(shape))  # 0.33 requires txt_ids_dims
    config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
    model = config.get_model({}, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim < 2 and "norm" in name:  # RMSNorm gains: .scale up to 0.3.x, .weight from 0.33
                p.fill_(1)
            elif p.ndim < 2:
                p.zero_()
            else:
                w = torch.randn(p.shape, device=device, dtype=torch.bfloat16, generator=g) / math.sqrt(p.shape[1])
                p.copy_(w.to(p.dtype))
    model.diffusion_model.requires_grad_(False)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    if hasattr(patcher, "cached_patcher_init"):  # 0.33: its TrainLoraNode trains a fresh copy made through this
        patcher.cached_patcher_init = (rebuilt_flux, (config, model))
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)  # registered, so unloading works
    return patcher, params


def rebuilt_flux(config, source, disable_dynamic=True):
    """What re-reading the model's file yields (the loader nodes' cached_patcher_init does that): a new model with
    the same weights on the offload device, as comfy.sd.load_diffusion_model_state_dict builds it."""
    import comfy.model_management
    import comfy.model_patcher

    offload = torch.device("cpu")
    model = config.get_model({}, device=offload)
    model.diffusion_model.load_state_dict(source.diffusion_model.state_dict())
    model.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=offload)


class StepClock:
    """CUDA events after every optimizer step of any optimizer (ComfyUI's and ours alike)."""

    def __init__(self):
        self.events = []
        self.handle = register_optimizer_step_post_hook(self._record)

    def _record(self, optimizer, args, kwargs):
        if CUDA:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        else:
            self.events.append(time.perf_counter())

    def seconds(self, warmup: int) -> list[float]:
        self.handle.remove()
        if CUDA:
            torch.cuda.synchronize()
            times = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:])]
        else:
            times = [b - a for a, b in zip(self.events, self.events[1:])]
        return times[warmup - 1:] if warmup > 0 else times


def free_everything():
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if CUDA else 0


def timed(run, warmup: int, placeholder_bytes: int = 0) -> dict:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    breaks_before = sum(counters["graph_break"].values())
    start = time.perf_counter()
    try:
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            out = run()
    except BaseException:
        clock.handle.remove()
        raise
    wall = time.perf_counter() - start
    times = clock.seconds(warmup)
    breaks = sum(counters["graph_break"].values()) - breaks_before
    losses, speed = out if isinstance(out, tuple) else (out, None)  # ours reports its TrainResult.speed
    row = {"steps_timed": len(times), "seconds_per_step_median": round(statistics.median(times), 4),
           "seconds_per_step_mean": round(statistics.mean(times), 4),
           "peak_gib": round((peak_bytes() - placeholder_bytes) / GIB, 2),
           "node_wall_seconds": round(wall, 1), "graph_breaks": breaks, "losses": [round(x, 5) for x in losses]}
    if speed is not None:
        row.update(step_graphs_captured=speed["step_graphs"].count("replayed"),
                   step_graphs_failed=speed["step_graphs"].count("failed"),
                   step_graph_shapes=max(speed["step_graph_shapes"], default=0), speed_plan=speed["plan"])
    return row


def data(resolution: int, tokens: int, width: int):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, resolution // 8, resolution // 8, generator=g)
    context, pooled = torch.randn(1, tokens, width, generator=g), torch.randn(1, 768, generator=g)
    return latent, context, pooled


def run_ours(pack, patcher, resolution, steps, tokens, rank, images=1, speed=None, two_shapes=False, **settings):
    """Ours on ``images`` copies of one latent and caption (each drawn with its own noise): core.training.train_lora
    as Dev2ProTrainLoRA calls it (under inference mode, the training guidance 1.0 that Training Guidance sets), with
    the node's defaults, ``settings`` and the SpeedPlan overrides ``speed``; ``batch_size`` per rank, as the node takes
    it. ``two_shapes``: as many again of a second aspect bucket, 9/8 as wide and 7/8 as tall (1152x896 at 1024).
    Returns the losses and the run's TrainResult.speed."""
    core = pack.core
    latent, context, pooled = data(resolution, tokens, patcher.model.diffusion_model.params.context_in_dim)
    dataset = core.dataset.TrainingDataset.from_batches(latent.repeat(images, 1, 1, 1), [(context[0], pooled[0])])
    if two_shapes:
        side = resolution // 8
        wide = torch.randn(images, 16, side * 7 // 8, side * 9 // 8, generator=torch.Generator().manual_seed(1))
        dataset = core.dataset.TrainingDataset(
            dataset.samples + core.dataset.TrainingDataset.from_batches(wide, [(context[0], pooled[0])]).samples)
    model = patcher.clone()
    settings["batch_size"] = core.distributed.global_batch(settings.get("batch_size", 1))
    config = core.config.TrainConfig(steps=steps, learning_rate=1e-4, rank=rank, alpha=float(rank), seed=0,
                                     guidance=1.0, gradient_checkpointing=True, **settings)
    with torch.inference_mode():
        result = core.training.train_lora(model, dataset, config, speed=speed)
    return list(result.losses), result.speed


def comfyui_settings(kind: str, steps: int, rank: int) -> dict:
    """Every input of ComfyUI's TrainLoraNode but model, latents and conditioning: its schema's defaults, the
    benchmark's shape, and for ``fastest`` the COMFYUI_FASTEST inputs its schema has."""
    from comfy_extras.nodes_train import TrainLoraNode

    schema = TrainLoraNode.INPUT_TYPES()
    inputs = {**schema.get("required", {}), **schema.get("optional", {})}
    settings = {k: spec[1]["default"] for k, spec in inputs.items() if len(spec) > 1 and "default" in spec[1]}
    settings.update(COMFYUI_SHAPE, steps=steps, rank=rank)
    if kind == "fastest":
        settings.update({k: v for k, v in COMFYUI_FASTEST.items() if k in inputs})
    return {k: v for k, v in settings.items() if k in inputs}


def comfyui_has_speed_inputs() -> bool:
    from comfy_extras.nodes_train import TrainLoraNode

    return "bypass_mode" in TrainLoraNode.INPUT_TYPES().get("required", {})


def run_comfyui(patcher, resolution, tokens, settings):
    """ComfyUI's node as its executor calls it: V1 (0.3.64: an instance's ``train``) or V3 (0.33: ``execute``)."""
    from comfy_api.internal import _ComfyNodeInternal
    from comfy_extras.nodes_train import TrainLoraNode

    latent, context, pooled = data(resolution, tokens, patcher.model.diffusion_model.params.context_in_dim)
    inputs = dict(model=patcher, latents={"samples": latent},
                  positive=[[context, {"pooled_output": pooled, "guidance": 1.0}]], **settings)
    if issubclass(TrainLoraNode, _ComfyNodeInternal):
        outputs = call_v3(TrainLoraNode, {"UNIQUE_ID": "bench"}, **inputs).args
    else:
        outputs = getattr(TrainLoraNode(), TrainLoraNode.FUNCTION)(**inputs)
    losses = list(outputs[list(TrainLoraNode.RETURN_TYPES).index("LOSS_MAP")]["loss"])
    del outputs
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--low-vram", type=int, nargs="*", default=[1024], help="resolutions for low-VRAM rows")
    parser.add_argument("--low-vram-compile", default="auto", choices=["auto", "off"])
    parser.add_argument("--card-gib", type=float, default=10.0, help="free memory of the emulated low-VRAM card")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--eager-too", action="store_true", help="also run ours without torch.compile")
    parser.add_argument("--fp8-too", action="store_true", help="also run ours with fp8_matmul on")
    parser.add_argument("--bf16-too", action="store_true", help="also run ours with fp8_matmul off (bf16 matmuls)")
    parser.add_argument("--no-graphs-too", action="store_true",
                        help="also run ours without CUDA graphs of the step (core.step_graphs), for each matmul setting")
    parser.add_argument("--low-vram-fp8", action="store_true", help="low-VRAM rows with fp8_matmul on")
    parser.add_argument("--low-vram-bf16", action="store_true", help="low-VRAM rows with fp8_matmul off")
    parser.add_argument("--python-wrapper-too", action="store_true",
                        help="also run ours with Inductor's Python kernel launcher instead of its C++ wrapper")
    parser.add_argument("--fp8-scaling", default="tensor", choices=["tensor", "row"], help="fp8_matmul's activation scaling")
    parser.add_argument("--attention-too", nargs="*", default=[], choices=["comfyui", "no_cudnn"],
                        help="also run ours with these attention choices (core.speed_plan.ATTENTION_CHOICES)")
    parser.add_argument("--two-shapes-too", action="store_true",
                        help="also ours on two aspect buckets, each with step graphs of its own; twice the warm-up steps")
    parser.add_argument("--checkpoint-outside-too", action="store_true",
                        help="also run ours with torch.utils.checkpoint around the compiled block instead of the compiler recomputing")
    parser.add_argument("--skip-comfyui", action="store_true")
    parser.add_argument("--comfyui-settings", choices=["default", "fastest", "both"],
                        help="ComfyUI's node with its defaults, its fastest settings (COMFYUI_FASTEST) or both "
                             "(default: both where the node has 0.33's bypass_mode/offloading, else default)")
    parser.add_argument("--skip-ours", action="store_true", help="only ComfyUI's rows")
    parser.add_argument("--skip-plain", action="store_true", help="leave out ours with default settings (A/B runs only)")
    parser.add_argument("--depth", type=int, nargs=2, default=[19, 38], metavar=("DOUBLE", "SINGLE"),
                        help="blocks of the model (a shallower Flux-dev width for quick diagnosis)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script, not speed")
    a = parser.parse_args()
    if not CUDA and not a.smoke:
        raise SystemExit("this benchmark needs a CUDA GPU (or --smoke to check the script on the CPU)")
    if a.smoke:
        a.resolutions, a.low_vram, a.steps, a.warmup, a.tokens = [64], [], 2, 1, 8
    pack = import_comfyui_and_pack(cpu=a.smoke)
    fp8_speed = {"fp8_rowwise": a.fp8_scaling == "row"}
    import comfy.model_patcher
    comfyui_kinds = {"default": ["default"], "fastest": ["fastest"], "both": ["default", "fastest"]}[
        a.comfyui_settings or ("both" if comfyui_has_speed_inputs() else "default")]
    shape = TINY_FLUX if a.smoke else dict(FLUX_DEV, depth=a.depth[0], depth_single_blocks=a.depth[1])
    patcher, params = random_flux_dev(shape)
    common = {"benchmark": "train_step", "comfyui_version": comfyui_version(), "gpu": torch.cuda.get_device_name() if CUDA else "cpu (smoke)", "torch": torch.__version__,
              "parameters": params, "date": datetime.date.today().isoformat(), "rank": a.rank, "batch": 1,
              "text_tokens": a.tokens, "base_dtype": "float8_e4m3fn", "compute_dtype": "bfloat16",
              "gradient_checkpointing": True}
    steps = a.warmup + a.steps

    def emit(row):
        print(json.dumps({**row, **common}), flush=True)

    def progress(row):
        print("done:", row["trainer"], row["resolution"], row["mode"], row["seconds_per_step_median"], "s",
              row["peak_gib"], "GiB", file=sys.stderr, flush=True)

    rows = []
    fp8_low_vram = "on" if a.low_vram_fp8 else "off" if a.low_vram_bf16 else pack.core.settings.default("fp8_matmul")
    low_vram_name = {"auto": "Dev2ProTrainLoRA", "on": "Dev2ProTrainLoRA fp8", "off": "Dev2ProTrainLoRA bf16"}[fp8_low_vram]
    # Low-VRAM rows first, as in the README's numbers. (They crashed after an eager session at the same size while
    # swap sessions used cuDNN attention; see the README.)
    for resolution in [] if a.skip_ours else a.low_vram:
        free_everything()  # the model goes to the CPU, so the load below sees only the emulated card
        placeholder = torch.empty(max(0, torch.cuda.mem_get_info()[0] - int(a.card_gib * GIB)), dtype=torch.uint8,
                                  device="cuda")
        try:
            row = timed(lambda: run_ours(pack, patcher, resolution, steps, a.tokens, a.rank, speed=fp8_speed,
                                         compile=a.low_vram_compile, fp8_matmul=fp8_low_vram), a.warmup, placeholder.numel())
        finally:
            del placeholder
            free_everything()
        rows.append({"trainer": low_vram_name, "resolution": resolution,
                     "mode": "low_vram", "emulated_card_gib": a.card_gib, "compile": a.low_vram_compile,
                     "fp8_matmul": fp8_low_vram, **row})
        progress(rows[-1])

    for resolution in a.resolutions:
        # (name, settings, SpeedPlan overrides)
        variants = [("Dev2ProTrainLoRA", {"compile": "auto"}, {})]
        if a.fp8_too:
            variants.append(("Dev2ProTrainLoRA fp8", {"compile": "auto", "fp8_matmul": "on"}, {}))
        if a.bf16_too:
            variants.append(("Dev2ProTrainLoRA bf16", {"compile": "auto", "fp8_matmul": "off"}, {}))
        if a.no_graphs_too:
            variants += [(f"{name} no step graphs", dict(settings), {"step_graphs": False})
                         for name, settings, _ in variants]
        if a.eager_too:
            variants.append(("Dev2ProTrainLoRA eager", {"compile": "off"}, {}))
        if a.python_wrapper_too:
            variants.append(("Dev2ProTrainLoRA python wrapper", {"compile": "auto"}, {"cpp_wrapper": False}))
        if a.checkpoint_outside_too:
            variants.append(("Dev2ProTrainLoRA checkpoint outside compile", {"compile": "auto"},
                             {"recompute_in_compiled_backward": False}))
        variants += [(f"Dev2ProTrainLoRA attention {choice}", {"compile": "auto"}, {"attention": choice})
                     for choice in a.attention_too]
        if a.two_shapes_too:
            variants.append(("Dev2ProTrainLoRA two shapes", {"compile": "auto", "two_shapes": True},
                             {"step_graph_shapes": 2}))
        if a.skip_plain:
            variants = variants[1:]
        if a.skip_ours:
            variants = []
        for name, settings, speed in variants:
            speed = {**fp8_speed, **speed}
            shapes = 2 if settings.get("two_shapes") else 1  # each shape compiles and warms up its own graphs
            row = timed(lambda: run_ours(pack, patcher, resolution, a.warmup * (shapes - 1) + steps, a.tokens, a.rank,
                                         speed=speed, **settings), a.warmup * shapes)
            rows.append({"trainer": name, "resolution": resolution, "mode": "fast", **settings, **row})
            progress(rows[-1])
            free_everything()
            # with the model unloaded: what the session left on the GPU (the step graphs' memory must be gone)
            rows[-1]["allocated_after_unload_gib"] = round(torch.cuda.memory_allocated() / GIB, 3) if CUDA else 0.0
        for kind in [] if a.skip_comfyui else comfyui_kinds:
            settings = comfyui_settings(kind, steps, a.rank)
            row = timed(lambda: run_comfyui(patcher, resolution, a.tokens, settings), a.warmup)
            name = "ComfyUI TrainLoraNode" + (" fastest" if kind == "fastest" else "")
            rows.append({"trainer": name, "resolution": resolution, "mode": "fast", "comfyui_settings": settings, **row})
            progress(rows[-1])
            free_everything()
            # ComfyUI 0.3.64's trainer leaves its weight wrappers on the shared modules after it returns (unloading
            # wipes them only after a low-VRAM load); a partial load of the model later would pick them up. (0.33's
            # trains a deep copy: nothing to wipe, harmless.)
            for module in patcher.model.modules():
                comfy.model_patcher.wipe_lowvram_weight(module)

    def find(resolution, trainer, mode="fast"):
        return next((r for r in rows if r["resolution"] == resolution and r["trainer"] == trainer and r["mode"] == mode),
                    None)

    for r in rows:
        comfy, fast, eager = (find(r["resolution"], "ComfyUI TrainLoraNode"), find(r["resolution"], "Dev2ProTrainLoRA"),
                              find(r["resolution"], "Dev2ProTrainLoRA eager"))
        comfy_fastest = find(r["resolution"], "ComfyUI TrainLoraNode fastest")
        for key, reference in (("speedup_vs_comfyui", comfy), ("speedup_vs_comfyui_fastest", comfy_fastest)):
            if reference is not None and not r["trainer"].startswith("ComfyUI"):
                r[key] = round(reference["seconds_per_step_median"] / r["seconds_per_step_median"], 2)
        if r["mode"] == "low_vram":  # against the fast mode with the same matmuls
            same = find(r["resolution"], r["trainer"])
            if same is not None:
                r["slowdown_vs_fast_mode"] = round(r["seconds_per_step_median"] / same["seconds_per_step_median"], 2)
        # same seed, data and noise: the losses must track each other (the first step has the very same weights)
        references = {"low_vram": [("fast", find(r["resolution"], r["trainer"]))]}.get(r["mode"], [])
        if r is fast:
            references.append(("eager", eager))
        if r["trainer"] in ("Dev2ProTrainLoRA fp8", "Dev2ProTrainLoRA bf16"):
            references.append(("default", fast))
        if r["trainer"].endswith(" no step graphs"):
            references.append(("step_graphs", find(r["resolution"], r["trainer"].removesuffix(" no step graphs"))))
        for name, reference in references:
            if reference is None or reference is r:
                continue
            ours, ref = r["losses"], reference["losses"]
            diffs = [abs(x - y) / abs(y) for x, y in zip(ours, ref)]
            r[f"first_loss_rel_diff_vs_{name}"] = round(diffs[0], 6)
            r[f"loss_max_rel_diff_vs_{name}"] = round(max(diffs), 5)
            r[f"loss_mean_rel_diff_vs_{name}"] = round(statistics.mean(diffs), 5)
        emit(r)

if __name__ == "__main__":
    main()
