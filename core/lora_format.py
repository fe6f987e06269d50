"""LoRA key formats, metadata and file I/O: the one place that knows how an adapter is written to disk.

Files use kohya's Flux layout by default (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
``.lora_up.weight``, an fp32 ``.alpha``), which ComfyUI's LoraLoader, Forge, kohya, diffusers and CivitAI all read;
or diffusers' (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``). Reading any Flux.1 LoRA is
``lora_convert``'s job.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic_files import tensor_bytes, write_new_files
from .lora_convert import SUFFIXES, Converted, layer_of, to_comfy, to_diffusers

# With the suffixes ComfyUI's loader reads beyond lora_convert's (comfy/lora.py), longest first.
ALL_SUFFIXES = sorted(SUFFIXES + [".set_weight", ".reshape_weight", ".w_norm", ".b_norm"], key=len, reverse=True)

KOHYA_PREFIX = "lora_unet_"
DOWN = ".lora_down.weight"
UP = ".lora_up.weight"
ALPHA = ".alpha"


def kohya_name(module_name: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return KOHYA_PREFIX + module_name.replace(".", "_")


@dataclass
class LoRAWeights:
    """One adapter per module of the Flux transformer, keyed by the module's dotted name.

    ``down`` is peft's ``lora_A`` ([rank, in]), ``up`` its ``lora_B`` ([out, rank]); the applied delta is
    ``alpha / rank * up @ down``.
    """

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: float
    rank: int
    info: dict[str, str] = field(default_factory=dict)

    def to_kohya(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        out = {}
        for name in sorted(self.down):
            key = kohya_name(name)
            out[key + DOWN] = self.down[name].detach().to("cpu", dtype).contiguous()
            out[key + UP] = self.up[name].detach().to("cpu", dtype).contiguous()
            # fp32 whatever the weights' dtype: diffusers divides the stored alpha without converting it, so a bf16
            # alpha of 16 at rank 12 applied 0.18 % too strong there.
            out[key + ALPHA] = torch.tensor(float(self.alpha), dtype=torch.float32)
        return out


class TrainedLoRA(dict):
    """ComfyUI's LORA_MODEL value (a dict of tensors) that also remembers how it was trained.

    Core's "Load LoRA Model" and "Save LoRA Weights" see a plain dict; our save node reads ``info`` for the file's
    metadata.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], info: dict[str, str], origin: str | None = None):
        super().__init__(tensors)
        self.info = dict(info)
        self.origin = origin  # the trainer node id, so Save LoRA can tell its panel which file it wrote


def lora_metadata(info: dict[str, str], title: str) -> dict[str, str]:
    """kohya ``ss_*`` and SAI ModelSpec fields, so A1111/Forge, CivitAI and kohya tools describe the file."""
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "ss_network_module": "networks.lora_flux",
        "ss_base_model_version": "flux1",
    }
    meta.update({k: str(v) for k, v in info.items()})
    # A loaded file's info carries its own title and date; the file written now gets its own.
    meta.update({"modelspec.title": title, "modelspec.date": datetime.date.today().isoformat()})
    return meta


FORMATS = ("kohya", "diffusers")


def file_tensors(tensors: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An adapter in this pack's form (or any Flux.1 LoRA ComfyUI's nodes pass on) -> the tensors and extra
    metadata of a file in ``fmt``. Raises ValueError for a layer the format cannot hold."""
    converted = to_comfy(dict(tensors))
    canonical, kept = converted.tensors, converted.unmatched + converted.text_encoder
    if fmt == "kohya":  # keys for no Flux.1 layer are kept as they are: a save never drops anything
        return {**canonical, **{k: tensors[k] for k in kept}}, {}
    if fmt == "diffusers":
        if kept:
            raise ValueError(f"{len(kept)} keys of the adapter are not Flux.1 transformer layers (first: {kept[0]}); "
                             "the diffusers format cannot hold them. Save it as kohya")
        # No lora_adapter_metadata JSON beside the .alpha tensors: diffusers 0.42.1 refuses files with both
        # ("Both `network_alphas` and `metadata` cannot be specified"), and ComfyUI reads only the tensors.
        out, config = to_diffusers(canonical)
        return out, {"dev2pro_lora_format": "diffusers", "dev2pro_peft_config": json.dumps(config)}
    raise ValueError(f"unknown LoRA file format {fmt!r}; one of {', '.join(FORMATS)}")


def read_lora_file(path: str) -> Converted:
    """Any Flux.1 LoRA file -> this pack's form (``lora_convert.to_comfy``), with the file's metadata in ``info``.

    A peft folder's ``adapter_config.json`` beside the file gives its alpha. Raises ValueError naming the file when
    it cannot be read or is not a Flux.1 LoRA."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # OSError, or safetensors' own error type for a damaged or non-safetensors file
        raise ValueError(f"cannot read {os.path.basename(path)} as a safetensors file: {e}") from e
    peft = None
    config_path = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                peft = {k: v for k, v in json.load(f).items() if k in ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora")}
        except ValueError:
            peft = None
    converted = to_comfy(tensors, metadata, peft=peft)  # widths are checked against the model by Apply LoRA
    converted.info = {k: v for k, v in metadata.items() if k not in ("format", "lora_adapter_metadata")}
    return converted


def next_free_path(directory: str, prefix: str, exts: tuple[str, ...] = (".safetensors",)) -> str:
    """``<directory>/<prefix>_00001.safetensors``, numbered past every existing file of that prefix with any of
    ``exts`` (a LoRA and its training state share a number)."""
    base = os.path.basename(prefix)
    folder = os.path.join(directory, os.path.dirname(prefix))
    pattern = re.compile(re.escape(base) + r"_(\d{5})(" + "|".join(re.escape(e) for e in exts) + ")$")
    taken = [int(m.group(1)) for f in (os.listdir(folder) if os.path.isdir(folder) else []) if (m := pattern.match(f))]
    return os.path.join(folder, f"{base}_{max(taken, default=0) + 1:05d}{exts[0]}")


def save_new_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """Write ``tensors`` to ``path`` atomically, never replacing an existing file (FileExistsError)."""
    write_new_files([(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))])
    return path


def save_numbered_lora(directory: str, prefix: str, tensors: dict[str, torch.Tensor],
                       metadata_for: Callable[[str], dict[str, str]], state: "StateParts | None" = None) -> str:
    """Save as the next free ``<prefix>_NNNNN.safetensors`` under ``directory``, with ``state`` beside it as
    ``.dev2pro-state``: both files appear or neither does, under a number neither kind of file has taken (a state
    left without its LoRA keeps its number). ``metadata_for(path)`` gives the LoRA's metadata. Returns the path."""
    for _ in range(100):  # another save may take a number between our look and our write
        path = next_free_path(directory, prefix, (".safetensors", STATE_EXTENSION))
        files = [(path, lambda tmp, path=path: save_file(tensors, tmp, metadata=metadata_for(path)))]
        if state is not None:
            files.append((state_path_for(path), lambda tmp: save_file(state.tensors, tmp, metadata=state.metadata)))
        try:
            write_new_files(files, needed=tensor_bytes(tensors, state.tensors if state else {}))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free number for '{prefix}' after 100 tries")


def layer_prefixes(tensors: dict) -> set[str]:
    """The layer names a LoRA file addresses: ``lora_unet_x.lora_down.weight`` -> ``lora_unet_x``."""
    return {(layer_of(key, ALL_SUFFIXES) or (key, ""))[0] for key in tensors}


# A training state is a safetensors file beside its LoRA, with an extension LoRA lists ignore.
STATE_EXTENSION = ".dev2pro-state"
STATE_FORMAT = "dev2pro-training-state/1"


def state_path_for(lora_path: str) -> str:
    """``flux_lora_00001.safetensors`` -> ``flux_lora_00001.dev2pro-state``."""
    return os.path.splitext(lora_path)[0] + STATE_EXTENSION


def training_state_tensors(adapter: LoRAWeights, optimizer: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an adapter and a torch optimizer state_dict into tensors plus the JSON-able rest."""
    tensors = {}
    for name in adapter.down:
        tensors[f"adapter.{name}.down"] = adapter.down[name].contiguous()
        tensors[f"adapter.{name}.up"] = adapter.up[name].contiguous()
    scalars = {}
    for index, entries in optimizer["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": optimizer["param_groups"], "scalars": scalars}


def state_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes and every metadata entry but the checksum: a
    flipped bit anywhere in a state file shows (hashing a 0.5 GB state takes about a second)."""
    h = hashlib.blake2b(digest_size=20)
    for key in sorted(metadata):
        if key != "checksum":
            h.update(f"{key}={metadata[key]}\0".encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class StateParts:
    """A training state as the tensors and metadata of its file."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def training_state_parts(config: dict, step: int, adapter: LoRAWeights, optimizer: dict, losses: list[float],
                         info: dict[str, str]) -> StateParts:
    tensors, rest = training_state_tensors(adapter, optimizer)
    metadata = {
        "format": STATE_FORMAT, "config": json.dumps(config), "step": str(step), "losses": json.dumps(losses),
        "rank": str(adapter.rank), "alpha": str(adapter.alpha), "optimizer": json.dumps(rest), "info": json.dumps(info),
    }
    metadata["checksum"] = state_checksum(tensors, metadata)
    return StateParts(tensors, metadata)


def save_training_state(path: str, config: dict, step: int, adapter: LoRAWeights, optimizer: dict,
                        losses: list[float], info: dict[str, str]) -> str:
    parts = training_state_parts(config, step, adapter, optimizer, losses, info)
    return save_new_file(parts.tensors, path, parts.metadata)


def load_training_state(path: str) -> dict:
    """The parts ``save_training_state`` wrote: config (dict), step, adapter, optimizer (state_dict), losses, info.

    Raises ValueError naming the file when it is not a dev2pro training state.
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a dev2pro training state (format {metadata.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except ValueError:
        raise
    except Exception as e:  # OSError, or safetensors' own error type for a damaged file
        raise ValueError(f"cannot read the training state {path}: {e}") from e
    if "checksum" in metadata and state_checksum(tensors, metadata) != metadata["checksum"]:  # older states: none
        raise ValueError(f"the training state {path} is damaged (its checksum does not match: a disk or copy error "
                         "changed it); continue from another saved state, or train anew")
    try:
        return _state_parts(tensors, metadata)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"the training state {path} is damaged or incomplete ({type(e).__name__}: {e}); continue "
                         "from another saved state, or train anew") from e


def _state_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    down, up, state = {}, {}, {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "adapter":
            name, _, part = rest.rpartition(".")
            (down if part == "down" else up)[name] = tensor
        else:
            index, _, entry = rest.partition(".")
            state.setdefault(int(index), {})[entry] = tensor
    optimizer = json.loads(metadata["optimizer"])
    for index, entries in optimizer["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {
        "config": json.loads(metadata["config"]),
        "step": int(metadata["step"]),
        "adapter": LoRAWeights(down, up, float(metadata["alpha"]), int(metadata["rank"])),
        "optimizer": {"state": state, "param_groups": optimizer["param_groups"]},
        "losses": json.loads(metadata["losses"]),
        "info": json.loads(metadata["info"]),
    }
