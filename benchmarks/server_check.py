"""The shipped API workflow through a real ``main.py`` server on the machine's GPU, as users run it: ComfyUI's
defaults (on 0.33+ with comfy-aimdo: dynamic VRAM on), previews during training, save, apply to Flux-dev, sample,
and the guidance-response check of Flux-dev against Flux-dev with the LoRA.

Two variants on one server, one JSON line each:
- ``pack``: the shipped graph on scripts/demo.py's small random models (Dev2ProLoadModel for both models);
- ``core``: the training base and Flux-dev loaded with ComfyUI's own Load Diffusion Model (UNETLoader), so under
  dynamic VRAM the trainer gets a dynamic ModelPatcher and Apply LoRA / the previews / KSampler a dynamic Flux-dev.
  ComfyUI's Flux detection fixes the head width at 128 (0.33) or every width (0.3.64, which this variant skips), so
  these models are full width (3072) with one double and one single block, reading CLIP-L-wide text.

    python benchmarks/server_check.py [--variants pack core] [--steps 8] [--cpu]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PACK_DIR, "scripts"))

import demo  # noqa: E402
from comfy_inprocess import comfyui_path  # noqa: E402

CORE_DEV2PRO = "core-flux-dev2pro-fullwidth.safetensors"
CORE_FLUX_DEV = "core-flux-dev-fullwidth.safetensors"


def write_full_width(workdir: str) -> None:
    import random_models
    import torch

    config = dict(random_models.FULL_WIDTH_FLUX, context_in_dim=768)  # CLIP-L stands in for T5 in the demo
    for name, seed in ((CORE_DEV2PRO, 11), (CORE_FLUX_DEV, 12)):
        path = os.path.join(workdir, "models", "diffusion_models", name)
        if not os.path.exists(path):
            random_models.write_flux(path + ".partial", config, seed=seed, dtype=torch.float8_e4m3fn)
            os.replace(path + ".partial", path)


def prompt_for(variant: str, steps: int) -> dict:
    with open(demo.API_WORKFLOW) as f:
        prompt = demo.demo_prompt(json.load(f), steps)
    prompt["previews"] = {"class_type": "Dev2ProPreviewSettings", "inputs": {
        "model": ["12", 0], "clip": ["6", 0], "vae": ["4", 0], "prompts": "a red ellipse\na blue ellipse",
        "every_steps": max(1, steps // 2), "guidance": 3.5, "steps": 2, "width": 64, "height": 64, "seed": 0,
        "sampler_name": "euler", "scheduler": "simple"}}
    prompt["9"]["inputs"]["previews"] = ["previews", 0]
    prompt["previews_out"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 2]}}
    prompt["check"] = {"class_type": "Dev2ProGuidanceResponse", "inputs": {
        "model": ["12", 0], "model_b": ["13", 0], "conditioning": ["14", 0], "guidance_values": "1, 2, 3.5",
        "noise_levels": "0.5, 0.9", "seeds": 2, "first_seed": 0, "width": 64, "height": 64}}
    prompt["10"]["inputs"]["filename_prefix"] = f"dev2pro/check_{variant}"
    prompt["20"]["inputs"]["filename_prefix"] = f"dev2pro/check_{variant}_sample"
    if variant == "core":
        prompt["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": CORE_DEV2PRO, "weight_dtype": "default"}}
        prompt["12"] = {"class_type": "UNETLoader", "inputs": {"unet_name": CORE_FLUX_DEV, "weight_dtype": "default"}}
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=["pack", "core"], choices=["pack", "core"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workdir", default="/tmp/dev2pro-server-check")
    parser.add_argument("--cpu", action="store_true", help="run the server with --cpu (checks the script)")
    parser.add_argument("--timeout", type=float, default=900)
    a = parser.parse_args()
    comfyui = comfyui_path()
    demo.prepare_demo_folder(a.workdir)
    if "core" in a.variants:
        write_full_width(a.workdir)
    import comfyui_version  # ComfyUI's, on sys.path after prepare_demo_folder

    extra = ["--base-directory", a.workdir] + (["--cpu"] if a.cpu else [])
    log = os.path.join(a.workdir, "comfyui.log")
    with demo.ComfyServer(comfyui, extra, log) as server:
        for variant in a.variants:
            start = time.time()
            row = {"check": "server_workflow", "variant": variant, "comfyui_version": comfyui_version.__version__,
                   "date": datetime.date.today().isoformat(), "train_steps": a.steps}
            try:
                answer = server.queue(prompt_for(variant, a.steps))
                row["node_errors"] = answer.get("node_errors")
                entry = server.wait(answer["prompt_id"], a.timeout)
                outputs = entry["outputs"]
                row["lora_files"] = [f for ui in outputs.values() for f in ui.get("lora_files", [])]
                row["preview_images"] = len(outputs.get("previews_out", {}).get("images", []))
                row["sample_images"] = len(outputs.get("20", {}).get("images", []))
                row["guidance_check_plots"] = len(outputs.get("check", {}).get("images", []))
                row["ok"] = bool(row["lora_files"]) and row["preview_images"] > 0 and row["sample_images"] == 1 and \
                    row["guidance_check_plots"] == 1
            except Exception as e:  # noqa: BLE001  the row says what failed; the next variant still runs
                row["ok"], row["error"] = False, str(e)[:3000]
            row["seconds"] = round(time.time() - start, 1)
            print(json.dumps(row), flush=True)
    with open(log) as f:
        text = f.read()
    print(json.dumps({"check": "server_log", "dynamic_vram": "DynamicVRAM support detected and enabled" in text,
                      "errors": re.findall(r"^.*(?:Traceback|ERROR|Error:).*$", text, re.M)[:20]}))


if __name__ == "__main__":
    main()
