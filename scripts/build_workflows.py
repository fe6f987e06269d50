"""Writes the shipped workflows (workflows/<name>.json and its API twin <name>_api.json) from the graphs defined here.

Run after changing a node's inputs:  python scripts/build_workflows.py  (with ComfyUI importable).
The test suite checks that the shipped UI workflow still converts to the shipped API prompt.
"""
from __future__ import annotations

import json
import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(PACK_DIR, "workflows")

# The files a user puts into ComfyUI/models/... for the recipe (names as the common downloads ship them).
DEV2PRO_FILE = "flux1-dev2pro-fp8.safetensors"
FLUX_DEV_FILE = "flux1-dev-fp8.safetensors"
CLIP_L_FILE = "clip_l.safetensors"
T5_FILE = "t5xxl_fp8_e4m3fn.safetensors"
VAE_FILE = "ae.safetensors"
DATASET_FOLDER = "dev2pro_dataset"


def node(class_type, title, **inputs):
    return {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}


# Flux-dev's usual sampling: guidance comes from FluxGuidance, so cfg 1.
SAMPLE = dict(seed=0, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
GRAPH = {
    "1": node("Dev2ProLoadModel", "Load Flux-dev2pro (training base)", model_name=DEV2PRO_FILE, weight_dtype="fp8_e4m3fn"),
    "2": node("Dev2ProTrainingGuidance", "Training guidance 1.0", model=["1", 0], guidance=1.0),
    "4": node("VAELoader", "Flux VAE", vae_name=VAE_FILE),
    "6": node("DualCLIPLoader", "Flux text encoders", clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux"),
    "8": node("Dev2ProDataset", "Training images + .txt captions (ComfyUI/input/dev2pro_dataset)",
              folder=DATASET_FOLDER, vae=["4", 0], clip=["6", 0], resolution=1024, trigger_word="sks dog",
              missing_captions="error"),
    "9": node("Dev2ProTrainLoRA", "Train LoRA on Flux-dev2pro", model=["2", 0], dataset=["8", 0], steps=1000,
              learning_rate=0.0001, rank=16, alpha=16.0, seed=0, gradient_checkpointing=True),
    "10": node("Dev2ProSaveLoRA", "Save LoRA to models/loras", lora=["9", 0], filename_prefix="dev2pro/flux_lora",
               format="kohya"),
    "11": node("PreviewImage", "Loss curve", images=["9", 1]),
    "12": node("Dev2ProLoadModel", "Load Flux-dev (for sampling)", model_name=FLUX_DEV_FILE, weight_dtype="fp8_e4m3fn"),
    "13": node("Dev2ProApplyLoRA", "Apply LoRA to Flux-dev", model=["12", 0], lora=["9", 0], strength=1.0),
    "14": node("CLIPTextEncode", "Sample prompt", clip=["6", 0], text="a photo of sks dog on a beach"),
    "15": node("FluxGuidance", "Flux-dev guidance 3.5", conditioning=["14", 0], guidance=3.5),
    "16": node("ConditioningZeroOut", "Empty negative", conditioning=["14", 0]),
    "17": node("EmptySD3LatentImage", "Image size", width=1024, height=1024, batch_size=1),
    "18": node("KSampler", "Sample on Flux-dev", model=["13", 0], positive=["15", 0], negative=["16", 0],
               latent_image=["17", 0], **SAMPLE),
    "19": node("VAEDecode", "Decode", samples=["18", 0], vae=["4", 0]),
    "20": node("SaveImage", "Save sample", images=["19", 0], filename_prefix="dev2pro/sample"),
}

# Left to right: training column, dataset column, sampling column.
POSITIONS = {
    "1": (40, 40), "2": (40, 260), "4": (420, 240), "6": (420, 420), "8": (800, 40), "9": (1180, 260), "10": (1560, 40), "11": (1560, 240), "12": (40, 700),
    "13": (420, 700), "14": (800, 480), "15": (1180, 700), "16": (1180, 880), "17": (800, 900), "18": (1560, 700),
    "19": (1940, 700), "20": (2320, 700),
}

# The A/B recipe: the same dataset, seed and steps trained on Flux-dev2pro at guidance 1.0 and on Flux-dev at 3.5,
# both applied to Flux-dev with the same prompt and seed; samples side by side, each with its guidance-response plot.
TRAIN = dict(steps=1000, learning_rate=0.0001, rank=16, alpha=16.0, seed=0, gradient_checkpointing=True)
CHECK = dict(guidance_values="1, 2, 3.5, 5, 7", noise_levels="0.5, 0.75, 0.9", seeds=2, first_seed=0, width=1024,
             height=1024)  # Dev2ProGuidanceResponse's defaults
AB_GRAPH = {
    "1": node("Dev2ProLoadModel", "Load Flux-dev2pro (A: training base)", model_name=DEV2PRO_FILE, weight_dtype="fp8_e4m3fn"),
    "2": node("Dev2ProTrainingGuidance", "A: training guidance 1.0", model=["1", 0], guidance=1.0),
    "3": node("Dev2ProLoadModel", "Load Flux-dev (B: training base; both: sampling)", model_name=FLUX_DEV_FILE,
              weight_dtype="fp8_e4m3fn"),
    "4": node("Dev2ProTrainingGuidance", "B: training guidance 3.5 (the usual way)", model=["3", 0], guidance=3.5),
    "5": node("VAELoader", "Flux VAE", vae_name=VAE_FILE),
    "6": node("DualCLIPLoader", "Flux text encoders", clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux"),
    "7": node("Dev2ProDataset", "Training images + .txt captions (ComfyUI/input/dev2pro_dataset)",
              folder=DATASET_FOLDER, vae=["5", 0], clip=["6", 0], resolution=1024, trigger_word="sks dog",
              missing_captions="error"),
    "8": node("Dev2ProTrainLoRA", "A: train on Flux-dev2pro at 1.0", model=["2", 0], dataset=["7", 0], **TRAIN),
    "9": node("Dev2ProTrainLoRA", "B: train on Flux-dev at 3.5", model=["4", 0], dataset=["7", 0], **TRAIN),
    "10": node("Dev2ProSaveLoRA", "A: save LoRA", lora=["8", 0], filename_prefix="dev2pro/ab_dev2pro_g1", format="kohya"),
    "11": node("Dev2ProSaveLoRA", "B: save LoRA", lora=["9", 0], filename_prefix="dev2pro/ab_dev_g3.5", format="kohya"),
    "12": node("Dev2ProApplyLoRA", "A: apply to Flux-dev", model=["3", 0], lora=["8", 0], strength=1.0),
    "13": node("Dev2ProApplyLoRA", "B: apply to Flux-dev", model=["3", 0], lora=["9", 0], strength=1.0),
    "14": node("CLIPTextEncode", "Sample prompt (both)", clip=["6", 0], text="a photo of sks dog on a beach"),
    "15": node("FluxGuidance", "Flux-dev guidance 3.5", conditioning=["14", 0], guidance=3.5),
    "16": node("ConditioningZeroOut", "Empty negative", conditioning=["14", 0]),
    "17": node("EmptySD3LatentImage", "Image size", width=1024, height=1024, batch_size=1),
    "18": node("KSampler", "A: sample on Flux-dev", model=["12", 0], positive=["15", 0], negative=["16", 0],
               latent_image=["17", 0], **SAMPLE),
    "19": node("KSampler", "B: sample on Flux-dev", model=["13", 0], positive=["15", 0], negative=["16", 0],
               latent_image=["17", 0], **SAMPLE),
    "20": node("VAEDecode", "A: decode", samples=["18", 0], vae=["5", 0]),
    "21": node("VAEDecode", "B: decode", samples=["19", 0], vae=["5", 0]),
    "22": node("SaveImage", "A: dev2pro at 1.0", images=["20", 0], filename_prefix="dev2pro/ab_dev2pro_g1"),
    "23": node("SaveImage", "B: Flux-dev at 3.5", images=["21", 0], filename_prefix="dev2pro/ab_dev_g3.5"),
    "24": node("Dev2ProGuidanceResponse", "A: guidance response kept?", model=["3", 0], conditioning=["14", 0],
               **CHECK, model_b=["12", 0]),
    "25": node("Dev2ProGuidanceResponse", "B: guidance response kept?", model=["3", 0], conditioning=["14", 0],
               **CHECK, model_b=["13", 0]),
}
# Two rows, A above B, left to right: models, dataset and prompt, training, apply, sample, decode, image, check.
AB_POSITIONS = {
    "1": (40, 40), "2": (40, 260), "3": (40, 760), "4": (40, 980), "5": (420, 40), "6": (420, 220),
    "7": (420, 420), "14": (420, 760), "15": (420, 1000), "16": (420, 1160), "17": (420, 1320),
    "8": (800, 40), "9": (800, 760), "10": (1180, 40), "11": (1180, 760), "12": (1180, 240), "13": (1180, 960),
    "18": (1560, 40), "19": (1560, 760), "20": (1940, 40), "21": (1940, 760), "22": (2320, 40), "23": (2320, 760),
    "24": (2700, 40), "25": (2700, 760),
}
WORKFLOW_GRAPHS = {"dev2pro_train_and_apply": (GRAPH, POSITIONS), "dev2pro_ab_guidance": (AB_GRAPH, AB_POSITIONS)}


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_inprocess import import_comfyui, load_packs
    from workflow_format import api_to_ui, node_definition

    nodes = import_comfyui()
    load_packs(nodes, PACK_DIR)
    os.makedirs(WORKFLOWS, exist_ok=True)
    for name, (graph, positions) in WORKFLOW_GRAPHS.items():
        defs = {n["class_type"]: node_definition(nodes.NODE_CLASS_MAPPINGS[n["class_type"]]) for n in graph.values()}
        api_file, ui_file = os.path.join(WORKFLOWS, f"{name}_api.json"), os.path.join(WORKFLOWS, f"{name}.json")
        with open(api_file, "w") as f:
            json.dump(graph, f, indent=2)
            f.write("\n")
        with open(ui_file, "w") as f:
            json.dump(api_to_ui(graph, defs, positions), f, indent=1)
            f.write("\n")
        print(f"wrote {api_file} and {ui_file}")


if __name__ == "__main__":
    main()
