"""Saving a trained LoRA to models/loras, loading any Flux.1 LoRA, and applying one to a MODEL (Flux-dev)."""
from __future__ import annotations

import errno
import logging
import math
import os

import comfy.lora
import comfy.lora_convert
import folder_paths
from comfy_api.latest import io

from ..core.atomic_files import WriteFailed
from ..core.lora_convert import NotAFluxLoRA
from ..core.lora_format import (FORMATS, STATE_EXTENSION, TrainedLoRA, file_tensors, layer_prefixes,
                                load_training_state, lora_metadata, read_lora_file, save_numbered_lora,
                                training_state_parts)
from ..core import paths
from ..core.paths import OutsideFolder, find_in_folders
from ..core.training import TrainConfig, TrainingState
from ..core.live_runs import RUNS
from .common import CATEGORY, TrainingStateType, node_error
from .events import send_status


def checked_prefix(prefix: str) -> str:
    try:
        return paths.checked_prefix(prefix)
    except OutsideFolder as e:
        raise node_error("Dev2ProSaveLoRA", "filename_prefix", f"{e}.") from e


def write_lora(tensors: dict, info: dict, prefix: str, state: TrainingState | None = None, fmt: str = "kohya") -> str:
    """Save under models/loras as the next free ``<prefix>_NNNNN.safetensors`` (and its training state beside it)
    in ``fmt`` (kohya or diffusers keys); returns the LoRA's path. Never replaces a file."""
    try:
        tensors, format_metadata = file_tensors(tensors, fmt)
    except ValueError as e:
        raise node_error("Dev2ProSaveLoRA", "format" if fmt != "kohya" else "lora", f"{e}.") from e
    directory = folder_paths.get_folder_paths("loras")[0]
    parts = None
    if state is not None:
        parts = training_state_parts(state.config.to_dict(), state.step, state.adapter, state.optimizer, state.losses,
                                     state.info)
    try:
        path = save_numbered_lora(directory, prefix, tensors,
                                  lambda p: {**lora_metadata(info, os.path.basename(p)), **format_metadata}, parts)
    except FileExistsError as e:
        raise node_error("Dev2ProSaveLoRA", "filename_prefix", f"could not find a free file name for '{prefix}'.") from e
    except WriteFailed as e:
        raise node_error("Dev2ProSaveLoRA", "filename_prefix", write_failure(e)) from e
    return path


def write_failure(e: WriteFailed) -> str:
    """What went wrong, that nothing was left half-written, and what to do."""
    fix = {errno.EROFS: "make models/loras writable, or give a prefix in a writable folder",
           errno.EACCES: "let ComfyUI's user write to models/loras, or give another prefix",
           errno.ENOSPC: "free that much space"}.get(e.code, "fix that")
    names = " and ".join(os.path.basename(p) for p in e.paths)
    return (f"could not write {e.paths[0]}: {e.cause}. Nothing was written ({names} neither). Then {fix} and queue "
            "again: a finished training run is handed on, not trained again.")


def apply_lora(model, lora: dict, strength: float, node: str = "Dev2ProApplyLoRA"):
    """A clone of ``model`` with ``lora`` added through ComfyUI's own weight patching."""
    if not math.isfinite(strength):  # ComfyUI's range check lets NaN through; it would make every sample NaN
        raise node_error(node, "strength", f"{strength} is not a number. Use a finite strength such as 1.0.")
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    tensors = comfy.lora_convert.convert_lora(dict(lora))
    unmatched = sorted(p for p in layer_prefixes(tensors) if p not in key_map)
    if unmatched:
        raise node_error(node, "lora", f"{len(unmatched)} of its layers do not exist in this model "
                         f"(first: {unmatched[0]}). Apply a Flux LoRA to a Flux model.")
    check_shapes(model, tensors, key_map, node)
    patched = model.clone()
    patched.add_patches(comfy.lora.load_lora(tensors, key_map), strength)
    return patched


def check_shapes(model, tensors: dict, key_map: dict, node: str) -> None:
    """A LoRA made for another width would fail only when sampling starts, with a bare shape error: refuse it here."""
    state = model.model.state_dict()
    for prefix, target in key_map.items():
        down, up = tensors.get(prefix + ".lora_down.weight"), tensors.get(prefix + ".lora_up.weight")
        if down is None or up is None or isinstance(target, tuple) or target not in state:
            continue
        if up.shape[1] != down.shape[0]:
            raise node_error(node, "lora", f"{prefix} has a rank-{down.shape[0]} down-projection but a rank-"
                             f"{up.shape[1]} up-projection: the file is damaged or mixes two LoRAs. Re-export it.")
        expected = tuple(state[target].shape[:2])
        if (up.shape[0], down.shape[1]) != expected:
            raise node_error(node, "lora", f"{prefix} is {up.shape[0]} x {down.shape[1]}, but this model's layer is "
                             f"{expected[0]} x {expected[1]}: the LoRA was made for another model. Apply a Flux.1 "
                             "LoRA to a Flux.1 model.")


class Dev2ProLoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProLoadLoRA",
            display_name="Load LoRA (Dev2Pro)",
            category=CATEGORY,
            description="Reads any Flux.1 LoRA file from models/loras (kohya / sd-scripts, ComfyUI, diffusers / "
            "peft, OneTrainer, SimpleTuner, ai-toolkit, XLabs, LyCORIS LoHa / LoKr) at the scale its authors "
            "meant, for Apply LoRA, previews and ComfyUI's own LoRA nodes. Lists every key it could not apply.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors file in models/loras. A peft folder's adapter_config.json "
                               "beside it gives its alpha."),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA in kohya keys with an fp32 alpha per "
                                    "layer, which ComfyUI applies exactly at the file's scale."),
                io.String.Output(display_name="report", tooltip="Format, layers, and the keys not applied."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        """A file replaced under the same name is read again (ComfyUI's own LoRA loaders keep the old one)."""
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            return float("nan")
        stat = os.stat(path)
        adapter_config = os.path.join(os.path.dirname(path), "adapter_config.json")
        return stat.st_size, stat.st_mtime_ns, os.path.getmtime(adapter_config) if os.path.isfile(adapter_config) else 0

    @classmethod
    def execute(cls, lora_name) -> io.NodeOutput:
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise node_error("Dev2ProLoadLoRA", "lora_name", f"'{lora_name}' is not in models/loras. Put the file "
                             "there and refresh (press R) so the list shows it.")
        try:
            converted = read_lora_file(path)
        except NotAFluxLoRA as e:
            raise node_error("Dev2ProLoadLoRA", "lora_name", f"{lora_name} is {e}. Pick a Flux.1 LoRA, or load "
                             "this file with the nodes of its own model.") from e
        except ValueError as e:
            raise node_error("Dev2ProLoadLoRA", "lora_name", f"{e}. Pick a .safetensors LoRA file.") from e
        report = converted.report(lora_name)
        if converted.unmatched or converted.text_encoder:
            logging.warning("Dev2ProLoadLoRA: %s", report)
        info = {**converted.info, "dev2pro_source_file": lora_name, "dev2pro_source_format": "+".join(converted.tools)}
        return io.NodeOutput(TrainedLoRA(converted.tensors, info), report, ui={"text": [report]})


class Dev2ProSaveLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProSaveLoRA",
            display_name="Save LoRA (Dev2Pro)",
            category=CATEGORY,
            description="Writes the adapter to models/loras as a kohya-style .safetensors with training metadata, "
            "so LoraLoader lists it. Never overwrites: each save gets the next free number.",
            inputs=[
                io.LoraModel.Input("lora", tooltip="From Dev2ProTrainLoRA (or ComfyUI's own Train LoRA)."),
                io.String.Input("filename_prefix", default="dev2pro/flux_lora",
                                tooltip="Path inside models/loras without extension; '_00001.safetensors' and up "
                                "are appended."),
                TrainingStateType.Input("training_state", optional=True,
                                        tooltip="Also save the training state (adapter, optimizer, step) beside the "
                                        f"LoRA as '{STATE_EXTENSION}', to continue later with Load Training State."),
                io.Combo.Input("format", options=list(FORMATS), default="kohya", optional=True,
                               tooltip="kohya: lora_unet_* keys, read by ComfyUI, Forge, kohya, diffusers and "
                               "CivitAI. diffusers: transformer.* keys (peft names), for diffusers' "
                               "load_lora_weights; ComfyUI reads it too. Both carry an fp32 alpha per layer."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix, training_state=None, format="kohya") -> io.NodeOutput:
        path = write_lora(lora, getattr(lora, "info", {}), checked_prefix(filename_prefix), training_state, format)
        relative = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0]).replace(os.sep, "/")
        ui = {"lora_files": [relative], "text": [f"models/loras/{relative}"]}
        if training_state is not None:
            ui["training_state_files"] = [relative[: -len(".safetensors")] + STATE_EXTENSION]
        run = RUNS.saved(getattr(lora, "origin", None), f"models/loras/{relative}")
        if run is not None:  # the trainer's panel names the file
            send_status(run)
        return io.NodeOutput(ui=ui)


class Dev2ProApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProApplyLoRA",
            display_name="Apply LoRA (Dev2Pro)",
            category=CATEGORY,
            description="Applies a trained adapter to a MODEL through ComfyUI's own weight patching: train on "
            "Flux-dev2pro, apply to Flux-dev (fp8 or bf16) and sample with FluxGuidance 3.5.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with, normally Flux-dev."),
                io.LoraModel.Input("lora", tooltip="From Dev2ProTrainLoRA or Load LoRA (Dev2Pro), or any Flux LoRA "
                                   "ComfyUI can read."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on the LoRA's effect; 1.0 is as trained."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, lora, strength) -> io.NodeOutput:
        return io.NodeOutput(apply_lora(model, lora, strength))


def training_state_files() -> list[str]:
    files = []
    for directory in folder_paths.get_folder_paths("loras"):
        for root, _, names in os.walk(directory, followlinks=True):
            files += [os.path.relpath(os.path.join(root, n), directory).replace(os.sep, "/")
                      for n in names if n.endswith(STATE_EXTENSION)]
    return sorted(set(files))


class Dev2ProLoadTrainingState(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProLoadTrainingState",
            display_name="Load Training State (Dev2Pro)",
            category=CATEGORY,
            description="Reads a training state saved by Save LoRA (Dev2Pro), to continue that run with Continue "
            "Training: same adapter, optimizer, step and schedule, bit-identical to a run that never stopped.",
            inputs=[
                io.Combo.Input("state_file", options=training_state_files(),
                               tooltip=f"A '{STATE_EXTENSION}' file in models/loras, saved beside its LoRA."),
            ],
            outputs=[TrainingStateType.Output(display_name="training_state",
                                              tooltip="For Continue Training (Dev2Pro).")],
        )

    @classmethod
    def execute(cls, state_file) -> io.NodeOutput:
        try:
            path = find_in_folders(folder_paths.get_folder_paths("loras"), state_file, "models/loras")
        except OutsideFolder as e:
            raise node_error("Dev2ProLoadTrainingState", "state_file", f"{e}.") from e
        if path is None:
            raise node_error("Dev2ProLoadTrainingState", "state_file", f"'{state_file}' is not in models/loras. Save "
                             "a state with Save LoRA's training_state input, then refresh (press R).")
        try:
            parts = load_training_state(path)
        except ValueError as e:
            raise node_error("Dev2ProLoadTrainingState", "state_file", str(e)) from e
        return io.NodeOutput(TrainingState(config=TrainConfig.from_dict(parts["config"]), step=parts["step"],
                                           adapter=parts["adapter"], optimizer=parts["optimizer"],
                                           losses=parts["losses"], info=parts["info"]))
