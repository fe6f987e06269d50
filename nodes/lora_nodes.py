"""Saving a trained LoRA to models/loras and applying one to a MODEL (Flux-dev for sampling)."""
from __future__ import annotations

import os

import comfy.lora
import comfy.lora_convert
import folder_paths
from comfy_api.latest import io

from ..core.lora_format import (STATE_EXTENSION, layer_prefixes, load_training_state, lora_metadata, next_free_path,
                                save_new_file, save_training_state, state_path_for)
from ..core.training import TrainConfig, TrainingState
from .common import CATEGORY, TrainingStateType, node_error


def checked_prefix(prefix: str) -> str:
    prefix = prefix.strip().replace("\\", "/")
    parts = prefix.split("/")
    if not prefix or os.path.isabs(prefix) or ".." in parts or not parts[-1]:
        raise node_error("Dev2ProSaveLoRA", "filename_prefix", f"'{prefix}' is not a relative name inside "
                         "models/loras. Use something like 'dev2pro/my_subject'.")
    return prefix


def write_lora(tensors: dict, info: dict, prefix: str, state: TrainingState | None = None) -> str:
    """Save under models/loras as the next free ``<prefix>_NNNNN.safetensors`` (and its training state beside it);
    returns the LoRA's path. Never replaces a file."""
    directory = folder_paths.get_folder_paths("loras")[0]
    for _ in range(100):  # another save may take a number between our look and our write
        path = next_free_path(directory, prefix)
        if state is not None and os.path.exists(state_path_for(path)):
            continue
        try:
            save_new_file(dict(tensors), path, lora_metadata(info, os.path.basename(path)))
            break
        except FileExistsError:
            continue
    else:
        raise node_error("Dev2ProSaveLoRA", "filename_prefix", f"could not find a free file name for '{prefix}'.")
    if state is not None:
        save_training_state(state_path_for(path), state.config.to_dict(), state.step, state.adapter, state.optimizer,
                            state.losses, state.info)
    return path


def apply_lora(model, lora: dict, strength: float, node: str = "Dev2ProApplyLoRA"):
    """A clone of ``model`` with ``lora`` added through ComfyUI's own weight patching."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    tensors = comfy.lora_convert.convert_lora(dict(lora))
    unmatched = sorted(p for p in layer_prefixes(tensors) if p not in key_map)
    if unmatched:
        raise node_error(node, "lora", f"{len(unmatched)} of its layers do not exist in this model "
                         f"(first: {unmatched[0]}). Apply a Flux LoRA to a Flux model.")
    patched = model.clone()
    patched.add_patches(comfy.lora.load_lora(tensors, key_map), strength)
    return patched


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
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix, training_state=None) -> io.NodeOutput:
        path = write_lora(lora, getattr(lora, "info", {}), checked_prefix(filename_prefix), training_state)
        relative = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0]).replace(os.sep, "/")
        ui = {"lora_files": [relative]}
        if training_state is not None:
            ui["training_state_files"] = [relative[: -len(".safetensors")] + STATE_EXTENSION]
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
                io.LoraModel.Input("lora", tooltip="From Dev2ProTrainLoRA, or any Flux LoRA ComfyUI can read."),
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
        for directory in folder_paths.get_folder_paths("loras"):
            path = os.path.join(directory, state_file)
            if os.path.isfile(path):
                break
        else:
            raise node_error("Dev2ProLoadTrainingState", "state_file", f"'{state_file}' is not in models/loras.")
        try:
            parts = load_training_state(path)
        except ValueError as e:
            raise node_error("Dev2ProLoadTrainingState", "state_file", str(e)) from e
        return io.NodeOutput(TrainingState(config=TrainConfig.from_dict(parts["config"]), step=parts["step"],
                                           adapter=parts["adapter"], optimizer=parts["optimizer"],
                                           losses=parts["losses"], info=parts["info"]))
