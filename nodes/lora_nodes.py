"""Saving a trained LoRA to models/loras and applying one to a MODEL (Flux-dev for sampling)."""
from __future__ import annotations

import os

import comfy.lora
import comfy.lora_convert
import folder_paths
from comfy_api.latest import io

from ..core.lora_format import layer_prefixes, lora_metadata, next_free_path, save_new_file
from .common import CATEGORY, node_error


def checked_prefix(prefix: str) -> str:
    prefix = prefix.strip().replace("\\", "/")
    parts = prefix.split("/")
    if not prefix or os.path.isabs(prefix) or ".." in parts or not parts[-1]:
        raise node_error("Dev2ProSaveLoRA", "filename_prefix", f"'{prefix}' is not a relative name inside "
                         "models/loras. Use something like 'dev2pro/my_subject'.")
    return prefix


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
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix) -> io.NodeOutput:
        prefix = checked_prefix(filename_prefix)
        directory = folder_paths.get_folder_paths("loras")[0]
        info = getattr(lora, "info", {})
        for _ in range(100):  # another save may take a number between our look and our write
            path = next_free_path(directory, prefix)
            try:
                save_new_file(dict(lora), path, lora_metadata(info, os.path.basename(path)))
                break
            except FileExistsError:
                continue
        else:
            raise node_error("Dev2ProSaveLoRA", "filename_prefix", f"could not find a free file name for '{prefix}'.")
        relative = os.path.relpath(path, directory).replace(os.sep, "/")
        return io.NodeOutput(ui={"lora_files": [relative]})


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
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        tensors = comfy.lora_convert.convert_lora(dict(lora))
        unmatched = sorted(p for p in layer_prefixes(tensors) if p not in key_map)
        if unmatched:
            raise node_error("Dev2ProApplyLoRA", "lora", f"{len(unmatched)} of its layers do not exist in this model "
                             f"(first: {unmatched[0]}). Apply a Flux LoRA to a Flux model.")
        patched = model.clone()
        patched.add_patches(comfy.lora.load_lora(tensors, key_map), strength)
        return io.NodeOutput(patched)
