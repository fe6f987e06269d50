"""Any Flux.1 LoRA's tensors -> the one form this pack hands on as LORA_MODEL, and that form -> diffusers/peft.

The form: kohya keys on BFL's modules (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ``.lora_up``),
one fp32 ``.alpha`` per module holding ``scale * rank``, so ComfyUI's patching (``alpha / rank * up @ down``)
applies each module at the scale its file's authors meant. LyCORIS layers (LoHa, LoKr, full diffs) keep their
tensors under a name ComfyUI's key map resolves.

Read: kohya / sd-scripts, ComfyUI (``diffusion_model.``), diffusers/peft (``transformer.``, ``base_model.model.``
or no prefix; alpha from ``.alpha``, from ``lora_adapter_metadata``, or rank), OneTrainer (``lora_transformer_``),
SimpleTuner LyCORIS (``lycoris_``), XLabs (``processor.qkv_lora1``), whole or partial.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch


# BFL module -> the diffusers modules it is split into: (name, first row, rows), in units of the hidden size.
# (None, None) = the whole module. The final layer's modulation stores shift/scale in the other order.
DOUBLE = {
    "img_attn.qkv": (("attn.to_q", 0, 1), ("attn.to_k", 1, 1), ("attn.to_v", 2, 1)),
    "txt_attn.qkv": (("attn.add_q_proj", 0, 1), ("attn.add_k_proj", 1, 1), ("attn.add_v_proj", 2, 1)),
    "img_attn.proj": (("attn.to_out.0", None, None),),
    "txt_attn.proj": (("attn.to_add_out", None, None),),
    "img_mlp.0": (("ff.net.0.proj", None, None),),
    "img_mlp.2": (("ff.net.2", None, None),),
    "txt_mlp.0": (("ff_context.net.0.proj", None, None),),
    "txt_mlp.2": (("ff_context.net.2", None, None),),
    "img_mod.lin": (("norm1.linear", None, None),),
    "txt_mod.lin": (("norm1_context.linear", None, None),),
}
SINGLE = {
    "linear1": (("attn.to_q", 0, 1), ("attn.to_k", 1, 1), ("attn.to_v", 2, 1), ("proj_mlp", 3, 4)),
    "linear2": (("proj_out", None, None),),
    "modulation.lin": (("norm.linear", None, None),),
}
GLOBAL = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SWAPPED = {"final_layer.adaLN_modulation.1"}
ROW_UNITS = {"img_attn.qkv": 3, "txt_attn.qkv": 3, "linear1": 7}
# Modules whose input is the hidden state (or the hidden-wide vector): their down-projections tell the width.
HIDDEN_INPUT = {"img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "txt_mlp.0",
                "img_mod.lin", "txt_mod.lin", "linear1", "modulation.lin", "time_in.out_layer",
                "vector_in.out_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"}
# x-flux's LoRA processors (XLabs): each adds to one BFL module; qkv_lora of a single block to linear1's q, k, v.
XLABS = {
    "double": {"processor.qkv_lora1": ("img_attn.qkv", None), "processor.qkv_lora2": ("txt_attn.qkv", None),
               "processor.proj_lora1": ("img_attn.proj", None), "processor.proj_lora2": ("txt_attn.proj", None)},
    "single": {"processor.qkv_lora": ("linear1", (0, 3)), "processor.proj_lora": ("linear2", None)},
}

# Tensor suffixes after a layer's name: LoRA's down / up / alpha in each tool's spelling, then what ComfyUI's
# weight adapters read for other LyCORIS algorithms (comfy/weight_adapter, comfy/lora.py).
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".down.weight")
UP_SUFFIXES = (".lora_up.weight", ".lora_B.weight", ".lora.up.weight", ".up.weight")
OTHER_SUFFIXES = (
    ".alpha", ".lora_mid.weight", ".dora_scale", ".diff", ".diff_b", ".lora_B.bias",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".rescale", ".lora_magnitude_vector",
)
SUFFIXES = sorted(DOWN_SUFFIXES + UP_SUFFIXES + OTHER_SUFFIXES, key=len, reverse=True)

# Key prefixes, longest first: (prefix, names are underscored, tool). "" = bare module names.
PREFIXES = (
    ("base_model.model.", False, "peft"), ("model.diffusion_model.", False, "comfyui"),
    ("diffusion_model.", False, "comfyui"), ("transformer.", False, "diffusers"),
    ("lora_transformer_", True, "onetrainer"), ("lora_unet_", True, "kohya"), ("lycoris_", True, "lycoris"),
    ("", False, "diffusers"),
)
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.", "te1.", "te2.", "lora_clip")
KOHYA_PREFIX = "lora_unet_"


class NotAFluxLoRA(ValueError):
    """The tensors are not a Flux.1 LoRA; the message says what they look like instead."""


@dataclass(frozen=True)
class Target:
    """Where one layer of a file lands: a BFL module, and the rows of its weight the layer covers (units of the
    hidden size; None = all), and whether the layer's rows are in the swapped (diffusers) order."""
    module: str
    rows: tuple[int, int] | None = None
    swapped: bool = False
    diffusers_name: str | None = None


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def in_block(module: str) -> str:
    """``single_blocks.3.linear1`` -> ``linear1``; global modules stay as they are."""
    return re.sub(r"^(double_blocks|single_blocks)\.\d+\.", "", module)


def _lookups():
    """Name lookups, built once: {(block kind or None for global modules, underscored): {name in a file:
    (dotted diffusers name or None, BFL module, rows, swapped)}}."""
    tables = {}
    for bfl_kind, diff_kind, table, xlabs in (("double_blocks", "transformer_blocks", DOUBLE, XLABS["double"]),
                                              ("single_blocks", "single_transformer_blocks", SINGLE, XLABS["single"])):
        bfl = {module: (None, module, None, False) for module in table}
        bfl.update({name: (None, module, rows, False) for name, (module, rows) in xlabs.items()})
        diff = {name: (name, module, None if start is None else (start, length), False)
                for module, parts in table.items() for name, start, length in parts}
        for kind, entries in ((bfl_kind, bfl), (diff_kind, diff)):
            for underscored in (False, True):
                tables[(kind, underscored)] = {(_underscored(k) if underscored else k): v for k, v in entries.items()}
    globals_ = {m: (None, m, None, False) for m in GLOBAL}
    globals_.update({d: (d, m, None, m in SWAPPED) for m, d in GLOBAL.items()})
    for underscored in (False, True):
        tables[(None, underscored)] = {(_underscored(k) if underscored else k): v for k, v in globals_.items()}
    return tables


LOOKUPS = _lookups()
BLOCK_RE = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)[._](\d+)[._](.+)$")


def resolve(name: str, underscored: bool) -> Target | None:
    """A module name from a file (BFL or diffusers, dotted or underscored) -> its Target, or None."""
    m = BLOCK_RE.match(name)
    kind, index, rest = m.groups() if m else (None, None, name)
    entry = LOOKUPS[(kind, underscored)].get(rest)
    if entry is None:
        return None
    diffusers_name, module, rows, swapped = entry
    if kind is not None:
        module = f"{'single_blocks' if kind.startswith('single') else 'double_blocks'}.{index}.{module}"
        diffusers_name = diffusers_name and f"{kind}.{index}.{diffusers_name}"
    return Target(module, rows, swapped, diffusers_name)


def layer_of(key: str, suffixes=None) -> tuple[str, str] | None:
    """``lora_unet_x.lora_down.weight`` -> (``lora_unet_x``, ``.lora_down.weight``); None if no suffix fits.
    ``suffixes`` longest first (default: SUFFIXES)."""
    for suffix in SUFFIXES if suffixes is None else suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def split_key(key: str) -> tuple[str, str, str, bool] | None:
    """``transformer.x.lora_A.weight`` -> (tool, ``x``, ``.lora_A.weight``, underscored); None if no suffix fits."""
    split = layer_of(key)
    if split is None:
        return None
    stem, suffix = split
    for prefix, underscored, tool in PREFIXES:
        if stem.startswith(prefix):
            return tool, stem[len(prefix):], suffix, underscored
    return None


@dataclass
class Converted:
    """What ``to_comfy`` made of a file: the tensors, and everything it did not apply."""
    tensors: dict[str, torch.Tensor]
    tools: list[str]            # the key styles seen (kohya, diffusers, ...)
    modules: int                # BFL modules the LoRA changes
    hidden_size: int | None
    unmatched: list[str] = field(default_factory=list)      # keys naming no Flux.1 layer
    text_encoder: list[str] = field(default_factory=list)   # keys for CLIP-L / T5 (a MODEL node cannot apply them)
    algorithms: list[str] = field(default_factory=list)     # lora, loha, lokr, ...
    info: dict[str, str] = field(default_factory=dict)      # the file's own metadata, for a later save

    def report(self, name: str) -> str:
        """What a user reads on the node: what was loaded, and every key that was not applied."""
        width = f", {self.hidden_size} wide" if self.hidden_size else ""
        lines = [f"{name}: {' + '.join(self.tools)} {'/'.join(self.algorithms)}, {self.modules} Flux.1 modules{width}"]
        if self.text_encoder:
            lines.append(f"not applied, {len(self.text_encoder)} text-encoder keys (apply them with ComfyUI's "
                         f"LoraLoader, which also patches CLIP): {', '.join(self.text_encoder[:5])}"
                         + (" ..." if len(self.text_encoder) > 5 else ""))
        if self.unmatched:
            lines.append(f"not applied, {len(self.unmatched)} keys that name no Flux.1 layer: " + ", ".join(self.unmatched))
        return "\n".join(lines)


def _algorithm(parts: dict[str, torch.Tensor]) -> str:
    if any(s.startswith(".hada_") for s in parts):
        return "loha"
    if any(s.startswith(".lokr_") for s in parts):
        return "lokr"
    if any(s in (".a1.weight", ".b1.weight") for s in parts):
        return "glora"
    if ".oft_blocks" in parts:
        return "oft"
    if any(s in DOWN_SUFFIXES for s in parts) and any(s in UP_SUFFIXES for s in parts):
        return "lora"
    if ".diff" in parts or ".diff_b" in parts:
        return "full"
    return "unknown"


def peft_config(metadata: dict[str, str] | None) -> dict:
    """The transformer's LoraConfig fields from diffusers' ``lora_adapter_metadata`` JSON ({} when absent)."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        return {}
    for prefix in ("transformer.", ""):
        picked = {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if "r" in picked or "lora_alpha" in picked:
            return picked
    return {}


def _pattern_value(patterns: dict, name: str):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def lora_scale(parts: dict, rank: int, peft: dict, diffusers_name: str) -> float:
    """The factor the file's authors apply to ``up @ down``: kohya/ComfyUI/diffusers read an ``.alpha`` tensor as
    alpha / rank; peft's metadata gives lora_alpha (or a pattern's) over r, or over sqrt(r) with rsLoRA; with
    neither, every tool uses 1."""
    if ".alpha" in parts:
        return float(parts[".alpha"].float().item()) / rank
    if peft:
        alpha = _pattern_value(peft.get("alpha_pattern"), diffusers_name)
        alpha = peft.get("lora_alpha", rank) if alpha is None else alpha
        return float(alpha) / (math.sqrt(rank) if peft.get("use_rslora") else rank)
    return 1.0


def _down_up(parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    down = next(parts[s] for s in DOWN_SUFFIXES if s in parts)
    up = next(parts[s] for s in UP_SUFFIXES if s in parts)
    return down, up


def _fp32_alpha(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _kept(suffix: str, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor handed on as the file has it, except that an alpha becomes an fp32 scalar."""
    return _fp32_alpha(float(tensor.float().item())) if suffix == ".alpha" else tensor


def _merge_lora(layers: list[tuple[Target, dict, float]]) -> dict[str, torch.Tensor]:
    """LoRA layers that each cover some rows of one BFL module -> one LoRA on the whole module.

    Layers sharing one down-projection and scale (kohya qkv split for diffusers, our own diffusers files) merge
    back into that one rank-r LoRA, exactly. Otherwise the downs are stacked and the ups placed block-diagonally
    (rank = the sum), still exactly ``up_i @ down_i`` on each layer's rows; unequal scales are folded into the ups
    in fp32.
    """
    module = layers[0][0].module
    first_down = _down_up(layers[0][1])[0]
    hidden = first_down.shape[1]
    units = ROW_UNITS.get(in_block(module))
    downs, ups, scales = [], [], []
    for target, parts, scale in layers:
        down, up = _down_up(parts)
        if target.swapped:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        downs.append(down)
        ups.append((target.rows, up))
        scales.append(scale)
    if len(layers) == 1 and layers[0][0].rows is None:
        return {".lora_down.weight": downs[0], ".lora_up.weight": ups[0][1],
                ".alpha": _fp32_alpha(scales[0] * downs[0].shape[0])}
    total_rows = (units or 1) * hidden
    same_down = all(d.shape == downs[0].shape and torch.equal(d, downs[0]) for d in downs)
    same_scale = len(set(scales)) == 1
    dtype = torch.promote_types(downs[0].dtype, ups[0][1].dtype)
    if same_down and same_scale:
        rank = downs[0].shape[0]
        up = torch.zeros(total_rows, rank, dtype=dtype)
        for rows, part in ups:
            start, length = (0, units) if rows is None else rows
            up[start * hidden:(start + length) * hidden] = part
        return {".lora_down.weight": downs[0], ".lora_up.weight": up, ".alpha": _fp32_alpha(scales[0] * rank)}
    rank = sum(d.shape[0] for d in downs)
    up_dtype = dtype if same_scale else torch.promote_types(dtype, torch.float32)
    up = torch.zeros(total_rows, rank, dtype=up_dtype)
    col = 0
    for (rows, part), down, scale in zip(ups, downs, scales):
        start, length = (0, units) if rows is None else rows
        r = down.shape[0]
        up[start * hidden:(start + length) * hidden, col:col + r] = part if same_scale else part.to(up_dtype) * scale
        col += r
    down = torch.cat([d.to(dtype) for d in downs])
    return {".lora_down.weight": down, ".lora_up.weight": up, ".alpha": _fp32_alpha((scales[0] if same_scale else 1.0) * rank)}


def describe_non_flux(keys: list[str]) -> str | None:
    """What a file that is not a Flux.1 LoRA looks like, from its key names; None if nothing is recognised."""
    joined = "\n".join(keys)
    if re.search(r"(input_blocks|output_blocks|down_blocks|up_blocks|mid_block|middle_block)", joined):
        return "a Stable Diffusion 1.x / SDXL LoRA (UNet block names)"
    if re.search(r"(double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj)", joined):
        return "a Flux.2 LoRA (shared modulation layers)"
    if re.search(r"(joint_blocks|context_block|x_block)", joined):
        return "a Stable Diffusion 3 LoRA (MMDiT joint blocks)"
    weights = [k for k in keys if k.endswith(".weight") and split_key(k) is None]
    if len(weights) > len(keys) // 2 and any("double_blocks" in k or "transformer_blocks" in k for k in weights):
        return f"a full model checkpoint ({len(keys)} tensors of plain weights), not a LoRA"
    return None


def to_comfy(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
             peft: dict | None = None) -> Converted:
    """Any Flux.1 LoRA's tensors (and its safetensors metadata) -> this pack's form; see the module docstring.

    ``peft``: LoraConfig fields from elsewhere (a peft folder's adapter_config.json); by default those in the
    metadata. Raises NotAFluxLoRA when no key names a Flux.1 layer or the shapes are not Flux.1's ratios. The
    width is reported, not checked: Apply LoRA checks it against the model (a 3072-wide Flux.1, or a test's).
    """
    peft = peft_config(metadata) if peft is None else peft
    layers: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}
    originals: dict[tuple[str, str, bool], list[str]] = {}
    unmatched, text_encoder, tools = [], [], []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            text_encoder.append(key)
            continue
        split = split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        tool, name, suffix, underscored = split
        layers.setdefault((tool, name, underscored), {})[suffix] = tensor
        originals.setdefault((tool, name, underscored), []).append(key)
    groups: dict[str, list[tuple[Target, dict, tuple]]] = {}
    for (tool, name, underscored), parts in layers.items():
        target = resolve(name, underscored)
        if target is None:
            unmatched += originals[(tool, name, underscored)]
            continue
        if tool == "diffusers" and not any(k.startswith("transformer.") for k in originals[(tool, name, underscored)]):
            tool = "xlabs" if "processor." in name else "bfl" if target.diffusers_name is None else "diffusers (no prefix)"
        if tool not in tools:
            tools.append(tool)
        groups.setdefault(target.module, []).append((target, parts, (tool, name, underscored)))
    if not groups:
        what = describe_non_flux(list(tensors))
        if what is None:
            what = "not a Flux.1 LoRA: none of its keys names a Flux.1 layer" + (
                f" (first: {sorted(tensors)[0]})" if tensors else " (it holds no tensors)")
        raise NotAFluxLoRA(what)

    out, algorithms, widths = {}, [], set()
    for module, members in sorted(groups.items()):
        kinds = {_algorithm(parts) for _, parts, _ in members}
        for kind in kinds:
            if kind not in algorithms:
                algorithms.append(kind)
        if any(".lora_magnitude_vector" in parts for _, parts, _ in members):
            raise NotAFluxLoRA(f"a peft DoRA LoRA (lora_magnitude_vector on {module}); DoRA files from peft are not "
                               "converted yet")
        kohya = KOHYA_PREFIX + _underscored(module)
        if kinds == {"lora"}:
            scaled = []
            for target, parts, _ in members:
                down, _ = _down_up(parts)
                if in_block(module) in HIDDEN_INPUT:
                    widths.add(down.shape[1])
                scaled.append((target, parts, lora_scale(parts, down.shape[0], peft, target.diffusers_name or module)))
            out.update({kohya + s: t for s, t in _merge_lora(scaled).items()})
            for target, parts, scale in scaled:
                for s in set(parts) - set(DOWN_SUFFIXES + UP_SUFFIXES) - {".alpha"}:
                    if len(members) > 1 or target.swapped:
                        raise NotAFluxLoRA(f"a LoRA with {s} on a split layer of {module}, which is not converted")
                    # peft's lora_B bias is scaled with the LoRA; ComfyUI adds diff_b as it is
                    out[kohya + (".diff_b" if s == ".lora_B.bias" else s)] = (
                        parts[s].float() * scale if s == ".lora_B.bias" else parts[s])
        elif len(members) == 1 and members[0][0].rows is None and not members[0][0].swapped:
            out.update({kohya + s: _kept(s, t) for s, t in members[0][1].items()})
        else:  # LyCORIS on a split diffusers layer: ComfyUI's key map applies it to the rows it names
            for target, parts, (tool, name, underscored) in members:
                if target.diffusers_name is None or target.swapped:
                    raise NotAFluxLoRA(f"a {'/'.join(sorted(kinds))} layer on part of {module}, which is not converted")
                layer = "transformer." + target.diffusers_name
                if _algorithm(parts) == "lora":  # beside LyCORIS rows of the same module: its scale made explicit
                    down, up = _down_up(parts)
                    scale = lora_scale(parts, down.shape[0], peft, target.diffusers_name)
                    out.update({layer + ".lora_down.weight": down, layer + ".lora_up.weight": up,
                                layer + ".alpha": _fp32_alpha(scale * down.shape[0])})
                    continue
                out.update({layer + s: _kept(s, t) for s, t in parts.items()})
    hidden = max(widths) if widths else None
    _check_flux1_ratios(out)
    return Converted(out, tools, len(groups), hidden, sorted(unmatched), sorted(text_encoder), algorithms)


def _check_flux1_ratios(tensors: dict[str, torch.Tensor]) -> None:
    """Flux.1's single-block linear1 is 7 hidden sizes tall (q, k, v, 4x MLP) and linear2 5 wide; Flux.2's are
    9 and 4. Checked where a LoRA covers them, so a Flux.2 LoRA in Flux.1 names is refused."""
    for key, tensor in tensors.items():
        if key.endswith("_linear1.lora_up.weight"):
            down = tensors[key.replace(".lora_up.", ".lora_down.")]
            if tensor.shape[0] != 7 * down.shape[1]:
                raise NotAFluxLoRA(f"a LoRA whose single-block linear1 is {tensor.shape[0]} x {down.shape[1]}: not "
                                   "Flux.1's 7:1 (Flux.2's is 9:1)")


# --- this pack's form -> diffusers / peft -------------------------------------------------------------------------

def bfl_module(kohya_layer: str) -> str | None:
    """``lora_unet_double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv``."""
    if not kohya_layer.startswith(KOHYA_PREFIX):
        return None
    target = resolve(kohya_layer[len(KOHYA_PREFIX):], underscored=True)
    return target.module if target is not None and target.rows is None else None


def diffusers_parts(module: str) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """A BFL module -> [(diffusers module, rows in hidden-size units or None, swapped)]."""
    m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", module)
    if m:
        kind, index, rest = m.groups()
        table, diff_kind = (DOUBLE, "transformer_blocks") if kind == "double_blocks" else (SINGLE, "single_transformer_blocks")
        return [(f"{diff_kind}.{index}.{name}", None if start is None else (start, length), False)
                for name, start, length in table[rest]]
    return [(GLOBAL[module], None, module in SWAPPED)]


def to_diffusers(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """This pack's form -> diffusers' Flux LoRA keys (``transformer.<module>.lora_A.weight``, ``.lora_B.weight``)
    with an fp32 ``.alpha`` per module, which ComfyUI and diffusers both apply at exactly the kohya file's scale;
    also the peft LoraConfig fields (r, lora_alpha, target_modules, rank/alpha patterns). Split modules (qkv,
    linear1) share the down-projection; rows a LoRA leaves at zero (x-flux's linear1) are left out.

    Raises ValueError naming a layer that is not a plain LoRA on a Flux.1 module.
    """
    out, ranks, alphas = {}, {}, {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, suffix = layer_of(key) or (key, "")
        layers.setdefault(layer, {})[suffix] = tensor
    for layer, parts in sorted(layers.items()):
        module = bfl_module(layer)
        down, up, alpha = (parts.pop(s, None) for s in (".lora_down.weight", ".lora_up.weight", ".alpha"))
        if module is None or down is None or up is None or parts:
            raise ValueError(f"{layer} is not a plain LoRA on a Flux.1 module; the diffusers format holds only those")
        rank = down.shape[0]
        alpha = float(alpha.float().item()) if alpha is not None else float(rank)
        hidden = down.shape[1]
        for name, rows, swapped in diffusers_parts(module):
            part = up
            if rows is not None:
                part = up[rows[0] * hidden:(rows[0] + rows[1]) * hidden]
                if not part.any():
                    continue
            if swapped:
                half = up.shape[0] // 2
                part = torch.cat([up[half:], up[:half]])
            out[f"transformer.{name}.lora_A.weight"] = down.clone()  # safetensors refuses shared storage
            out[f"transformer.{name}.lora_B.weight"] = part.contiguous()
            out[f"transformer.{name}.alpha"] = _fp32_alpha(alpha)
            ranks[name], alphas[name] = rank, alpha
    if not out:
        raise ValueError("the adapter has no LoRA layers")
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "r": r, "lora_alpha": lora_alpha, "target_modules": sorted(ranks),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != lora_alpha},
        "use_dora": False, "use_rslora": False, "lora_bias": False,
    }
    return out, config
