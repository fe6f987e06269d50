"""Writes the shipped workflows from the graphs defined here: the UI templates in workflows/<name>.json (what
ComfyUI's template browser lists) and their API twins in workflows_api/<name>_api.json (for the HTTP API and
scripts/dev2pro_client.py).

Run after changing a node's inputs:  python scripts/build_workflows.py  (with ComfyUI importable).
The test suite checks that each UI workflow still converts to its API twin and matches the live node definitions;
tests/test_browser.py checks in Chromium that no node overlaps another. Thumbnails: scripts/workflow_thumbnails.py.
"""
from __future__ import annotations

import json
import os
import sys

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(PACK_DIR, "workflows")
API_WORKFLOWS = os.path.join(PACK_DIR, "workflows_api")

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
    "8": node("Dev2ProDataset", "Training images + captions (input/dev2pro_dataset)",
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

# Columns left to right, each stacked top to bottom; layout() turns them into positions and sizes.
COLUMNS = [["1", "2", "12"], ["4", "6", "14", "15", "16", "17"], ["8", "13"], ["9"], ["10", "11"], ["18", "19"], ["20"]]

# Train with previews, save the state half way, and continue from a saved state (muted until there is one).
PREVIEW_GRAPH = {
    "1": node("Dev2ProLoadModel", "Load Flux-dev2pro (training base)", model_name=DEV2PRO_FILE, weight_dtype="fp8_e4m3fn"),
    "2": node("Dev2ProTrainingGuidance", "Training guidance 1.0", model=["1", 0], guidance=1.0),
    "3": node("Dev2ProLoadModel", "Load Flux-dev (for previews)", model_name=FLUX_DEV_FILE, weight_dtype="fp8_e4m3fn"),
    "4": node("VAELoader", "Flux VAE", vae_name=VAE_FILE),
    "6": node("DualCLIPLoader", "Flux text encoders", clip_name1=CLIP_L_FILE, clip_name2=T5_FILE, type="flux"),
    "7": node("Dev2ProPreviewSettings", "Previews on Flux-dev every 250 steps", model=["3", 0], clip=["6", 0],
              vae=["4", 0], prompts="a photo of sks dog on a beach\na painting of sks dog", every_steps=250,
              guidance=3.5, steps=20, width=768, height=768, seed=0, sampler_name="euler", scheduler="simple"),
    "8": node("Dev2ProDataset", "Training images + captions (input/dev2pro_dataset)",
              folder=DATASET_FOLDER, vae=["4", 0], clip=["6", 0], resolution=1024, trigger_word="sks dog",
              missing_captions="error"),
    "9": node("Dev2ProTrainLoRA", "Train 1000 of 2000 steps, with previews", model=["2", 0], dataset=["8", 0],
              steps=2000, learning_rate=0.0001, rank=16, alpha=16.0, seed=0, gradient_checkpointing=True,
              stop_at_step=1000, previews=["7", 0]),
    "10": node("Dev2ProSaveLoRA", "Save LoRA and its training state", lora=["9", 0], filename_prefix="dev2pro/run",
               format="kohya", training_state=["9", 3]),
    "11": node("PreviewImage", "Previews so far", images=["9", 2]),
    "12": node("Dev2ProLoadTrainingState", "Saved state to continue (unmute these three: Ctrl+M)",
               state_file="dev2pro/run_00001.dev2pro-state"),
    "13": node("Dev2ProContinueTraining", "Continue to step 2000", training_state=["12", 0], model=["2", 0],
               dataset=["8", 0], steps=0, stop_at_step=0, previews=["7", 0]),
    "14": node("Dev2ProSaveLoRA", "Save the continued LoRA", lora=["13", 0], filename_prefix="dev2pro/run_continued",
               format="kohya", training_state=["13", 3]),
}
PREVIEW_MUTED = ("12", "13", "14")
PREVIEW_COLUMNS = [["1", "2", "3"], ["4", "6", "7"], ["8", "12"], ["9"], ["10", "11"], ["13"], ["14"]]

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
    "7": node("Dev2ProDataset", "Training images + captions (input/dev2pro_dataset)",
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
AB_COLUMNS = [["1", "2", "3", "4"], ["5", "6", "7", "14", "15", "16", "17"], ["8", "9"], ["10", "12", "11", "13"],
              ["18", "19"], ["20", "21"], ["22", "23"], ["24", "25"]]
WORKFLOW_GRAPHS = {  # name: (graph, columns, muted nodes)
    "dev2pro_train_and_apply": (GRAPH, COLUMNS, ()),
    "dev2pro_train_preview_continue": (PREVIEW_GRAPH, PREVIEW_COLUMNS, PREVIEW_MUTED),
    "dev2pro_ab_guidance": (AB_GRAPH, AB_COLUMNS, ()),
}

# Heights as the front ends draw nodes (LiteGraph: 20 px a socket row, about 24 a widget), with room to spare;
# tests/test_browser.py measures the real ones and fails on any overlap.
WIDTH, GAP = 360, 50
# Save LoRA grows by the lines naming the files it wrote (js/dev2pro_file_text.js).
EXTRA_HEIGHT = {"Dev2ProTrainLoRA": 310, "Dev2ProContinueTraining": 310, "PreviewImage": 280, "SaveImage": 280,
                "Dev2ProGuidanceResponse": 280, "Dev2ProSaveLoRA": 80, "Dev2ProLoadLoRA": 80}
EXTRA_WIDTH = {"Dev2ProTrainLoRA": 460, "Dev2ProContinueTraining": 460}


def node_size(definition: dict, title: str, class_type: str) -> tuple[int, int]:
    """The front ends grow a node to fit every socket and widget its definition has (linked or not) and its title."""
    from workflow_format import has_control_widget, is_widget, ordered_inputs

    sockets = sum(1 for _, spec in ordered_inputs(definition["input"]) if not is_widget(spec))
    widgets = 0
    for name, spec in ordered_inputs(definition["input"]):
        if is_widget(spec):
            options = spec[1] if len(spec) > 1 else {}
            widgets += 1 + has_control_widget(name, spec) + 3 * bool(options.get("multiline"))
    height = 20 * max(sockets, len(definition["output"]), 1) + 24 * widgets + 24 + EXTRA_HEIGHT.get(class_type, 0)
    width = max(EXTRA_WIDTH.get(class_type, WIDTH), int(6.8 * len(title)) + 80)
    return width, height


def layout(graph: dict, columns: list[list[str]], defs: dict) -> tuple[dict, dict]:
    """Positions and sizes: columns left to right, nodes stacked with a gap that leaves room for the title bar."""
    positions, sizes, x = {}, {}, 40
    assert sorted(n for column in columns for n in column) == sorted(graph), "every node in exactly one column"
    for column in columns:
        y = 40
        for node_id in column:
            node = graph[node_id]
            sizes[node_id] = node_size(defs[node["class_type"]], node["_meta"]["title"], node["class_type"])
            positions[node_id] = (x, y)
            y += sizes[node_id][1] + GAP
        x += max(sizes[n][0] for n in column) + GAP
    return positions, sizes


def with_defaults(graph: dict, defs: dict) -> dict:
    """Every widget input spelled out (its default where the graph gives none): a UI workflow lists widget values by
    position, so a value after a missing one would land in the wrong widget; API users see every setting too."""
    from workflow_format import is_widget, ordered_inputs

    out = {}
    for node_id, n in graph.items():
        inputs = dict(n["inputs"])
        for name, spec in ordered_inputs(defs[n["class_type"]]["input"]):
            if is_widget(spec) and name not in inputs:
                options = spec[1] if len(spec) > 1 else {}
                choices = spec[0] if isinstance(spec[0], list) else options.get("options")
                inputs[name] = options.get("default", choices[0] if choices else None)
        out[node_id] = {**n, "inputs": inputs}
    return out


def write_json(path: str, value, indent: int) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_inprocess import import_comfyui, load_packs
    from workflow_format import api_to_ui, node_definition

    nodes = import_comfyui()
    load_packs(nodes, PACK_DIR)
    os.makedirs(API_WORKFLOWS, exist_ok=True)
    for name, (graph, columns, muted) in WORKFLOW_GRAPHS.items():
        defs = {n["class_type"]: node_definition(nodes.NODE_CLASS_MAPPINGS[n["class_type"]]) for n in graph.values()}
        graph = with_defaults(graph, defs)
        positions, sizes = layout(graph, columns, defs)
        api_file, ui_file = os.path.join(API_WORKFLOWS, f"{name}_api.json"), os.path.join(WORKFLOWS, f"{name}.json")
        write_json(api_file, {k: v for k, v in graph.items() if k not in muted}, 2)
        write_json(ui_file, api_to_ui(graph, defs, positions, sizes, muted), 1)
        print(f"wrote {api_file} and {ui_file}")


if __name__ == "__main__":
    main()
