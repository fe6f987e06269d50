"""The main job: run the shipped API workflow (workflows_api/dev2pro_train_and_apply_api.json) on a real ComfyUI server.

- Real mode: when every model file the workflow names is in $COMFYUI_PATH/models and training images are in
  $COMFYUI_PATH/input/dev2pro_dataset, the workflow runs unchanged: it trains on Flux-dev2pro for real.
- Demo mode (otherwise): a work folder gets small random-weight models (a small Flux-dev2pro and Flux-dev,
  a full-size Flux VAE and CLIP-L) and a synthetic dataset; the same graph runs with CLIPLoader in place of
  DualCLIPLoader (a random T5-XXL is 4.7B parameters) and small sizes, so the whole path runs on a CPU.

Prints one JSON line: the mode, the LoRA file, the sample image, the seconds taken.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_WORKFLOW = os.path.join(PACK_DIR, "workflows_api", "dev2pro_train_and_apply_api.json")
DEMO_DEV2PRO = "demo-flux-dev2pro.safetensors"
DEMO_FLUX_DEV = "demo-flux-dev.safetensors"
MODEL_INPUTS = {  # (node input, models folder) of the files a real run needs
    "model_name": "diffusion_models", "vae_name": "vae", "clip_name1": "text_encoders", "clip_name2": "text_encoders",
}


class ComfyServer:
    """``python main.py`` on 127.0.0.1 with the pack loaded, driven over ComfyUI's HTTP API."""

    def __init__(self, comfyui: str, extra_args: list[str], log_path: str, python: str = sys.executable):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [python, os.path.join(comfyui, "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", *extra_args]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(cmd, cwd=comfyui, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up; see {self.log_path}")
            try:
                self.get("/object_info/Dev2ProTrainLoRA")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer within 300 s; see {self.log_path}")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def get(self, path: str):
        return json.loads(self.get_text(path))

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return r.read().decode()

    def queue(self, prompt: dict) -> dict:
        body = json.dumps({"prompt": prompt, "client_id": "dev2pro-demo"}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"ComfyUI refused the prompt: {e.read().decode()}") from e

    def wait(self, prompt_id: str, timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") == "error" or not entry["status"]["completed"]:
                    errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise RuntimeError(f"the workflow failed: {json.dumps(errors)[:2000]}")
                return entry
            time.sleep(1)
        raise RuntimeError(f"the workflow did not finish within {timeout} s; see {self.log_path}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_real_files(comfyui: str, prompt: dict) -> list[str]:
    missing = []
    for node in prompt.values():
        for name, folder in MODEL_INPUTS.items():
            value = node["inputs"].get(name)
            if isinstance(value, str) and not os.path.exists(os.path.join(comfyui, "models", folder, value)) and \
                    not os.path.exists(os.path.join(comfyui, "models", "unet", value)):
                missing.append(f"models/{folder}/{value}")
    dataset = os.path.join(comfyui, "input", "dev2pro_dataset")
    if not os.path.isdir(dataset) or not os.listdir(dataset):
        missing.append("input/dev2pro_dataset/ (your training images)")
    return missing


def demo_prompt(prompt: dict, train_steps: int) -> dict:
    """The shipped graph with small random models, a CLIP-L-only text encoder and small sizes."""
    p = copy.deepcopy(prompt)
    p["1"]["inputs"]["model_name"] = DEMO_DEV2PRO
    p["12"]["inputs"]["model_name"] = DEMO_FLUX_DEV
    p["6"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors", "type": "stable_diffusion"},
              "_meta": {"title": "CLIP-L (demo: stands in for clip_l + t5xxl)"}}
    p["9"]["inputs"]["steps"] = train_steps
    p["8"]["inputs"]["resolution"] = 64
    p["17"]["inputs"].update(width=64, height=64)
    p["18"]["inputs"]["steps"] = 4
    p["10"]["inputs"]["filename_prefix"] = "dev2pro/demo_lora"
    p["20"]["inputs"]["filename_prefix"] = "dev2pro/demo_sample"
    return p


def demo_ui_workflow(server: "ComfyServer", train_steps: int, preview_every: int = 0) -> dict:
    """The demo graph as a UI workflow (what the browser loads), laid out as the shipped template, from the live
    node definitions of ``server``; with ``preview_every``, Training Previews on the demo Flux-dev too."""
    from build_workflows import COLUMNS, layout
    from workflow_format import api_to_ui

    with open(API_WORKFLOW) as f:
        prompt = demo_prompt(json.load(f), train_steps)
    columns = COLUMNS
    if preview_every:
        prompt["21"] = {"class_type": "Dev2ProPreviewSettings", "_meta": {"title": "Previews (demo)"}, "inputs": {
            "model": ["12", 0], "clip": ["6", 0], "vae": ["4", 0], "prompts": "a red ellipse on white",
            "every_steps": preview_every, "guidance": 3.5, "steps": 2, "width": 64, "height": 64, "seed": 0,
            "sampler_name": "euler", "scheduler": "simple"}}
        prompt["9"]["inputs"]["previews"] = ["21", 0]
        columns = [list(c) + (["21"] if "8" in c else []) for c in COLUMNS]
    info = server.get("/object_info")
    defs = {n["class_type"]: info[n["class_type"]] for n in prompt.values()}
    positions, sizes = layout(prompt, columns, defs)
    return api_to_ui(prompt, defs, positions, sizes)


def demo_server(comfyui: str, workdir: str) -> "ComfyServer":
    """A ComfyUI server (main.py --cpu, for ``with``) on the demo models and dataset under ``workdir``, which are
    made first where missing; its log is ``workdir``/comfyui.log."""
    prepare_demo_folder(workdir)
    return ComfyServer(comfyui, ["--cpu", "--base-directory", workdir], os.path.join(workdir, "comfyui.log"))


def serve(comfyui: str, workdir: str, train_steps: int) -> None:
    """Demo models, a ComfyUI server on them and the demo workflow in its Workflows sidebar, until Ctrl-C."""
    with demo_server(comfyui, workdir) as server:
        folder = os.path.join(workdir, "user", "default", "workflows")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "dev2pro_demo.json")
        with open(path + ".partial", "w") as f:
            json.dump(demo_ui_workflow(server, train_steps), f, indent=1)
        os.replace(path + ".partial", path)
        print(f"ComfyUI runs the demo at {server.url}\n  open it in a browser, then Workflows (sidebar) -> "
              f"dev2pro_demo, and Queue. Ctrl-C stops the server.", flush=True)
        try:
            while server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def prepare_demo_folder(workdir: str) -> None:
    """Random models and a synthetic dataset under ``workdir`` (ComfyUI's --base-directory layout); kept between runs."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_inprocess import import_comfyui
    import random_models
    import torch
    from PIL import Image, ImageDraw

    if "comfy.cli_args" not in sys.modules:  # distributed_train.py imported it already, for its GPU
        import_comfyui()
    models = os.path.join(workdir, "models")
    files = {
        os.path.join(models, "diffusion_models", DEMO_DEV2PRO): lambda p: random_models.write_flux(p, random_models.DEMO_FLUX, seed=1, dtype=torch.float8_e4m3fn),
        os.path.join(models, "diffusion_models", DEMO_FLUX_DEV): lambda p: random_models.write_flux(p, random_models.DEMO_FLUX, seed=2, dtype=torch.float8_e4m3fn),
        os.path.join(models, "vae", "ae.safetensors"): random_models.write_flux_vae,
        os.path.join(models, "text_encoders", "clip_l.safetensors"): random_models.write_clip_l,
    }
    for path, write in files.items():
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".partial"
            write(tmp)
            os.replace(tmp, path)
    dataset = os.path.join(workdir, "input", "dev2pro_dataset")
    os.makedirs(dataset, exist_ok=True)
    for i, colour in enumerate(["red", "green", "blue", "orange"]):
        path = os.path.join(dataset, f"shape_{i}.png")
        if not os.path.exists(path):
            image = Image.new("RGB", (64, 64), "white")
            ImageDraw.Draw(image).ellipse([8 + 4 * i, 8, 56, 56 - 4 * i], fill=colour)
            image.save(path)
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(f"a {colour} ellipse on white")
    custom_nodes = os.path.join(workdir, "custom_nodes")
    os.makedirs(custom_nodes, exist_ok=True)
    link = os.path.join(custom_nodes, "dev2pro-lora")
    if not os.path.islink(link):
        os.symlink(PACK_DIR, link)


def pack_only_custom_nodes_config(tmpdir: str) -> str:
    """An extra_model_paths YAML whose custom_nodes folder holds only a link to this pack."""
    folder = os.path.join(tmpdir, "custom_nodes")
    os.makedirs(folder, exist_ok=True)
    os.symlink(PACK_DIR, os.path.join(folder, "dev2pro-lora"))
    path = os.path.join(tmpdir, "extra_model_paths.yaml")
    with open(path, "w") as f:
        f.write(f"dev2pro:\n  custom_nodes: {folder}\n")
    return path


def run(comfyui: str, mode: str, workdir: str, train_steps: int, timeout: float, while_running=None) -> dict:
    """Queue the workflow and wait for it; ``while_running(server)`` is called with the server still up."""
    with open(API_WORKFLOW) as f:
        prompt = json.load(f)
    missing = missing_real_files(comfyui, prompt)
    if mode == "real" and missing:
        raise SystemExit("real mode needs these files under " + comfyui + ":\n  " + "\n  ".join(missing))
    if mode == "auto":
        mode = "demo" if missing else "real"
    start = time.time()
    if mode == "demo":
        prepare_demo_folder(workdir)
        prompt = demo_prompt(prompt, train_steps)
        extra = ["--cpu", "--base-directory", workdir]
        outputs_root = os.path.join(workdir, "output")
        loras_root = os.path.join(workdir, "models", "loras")
        log = os.path.join(workdir, "comfyui.log")
    else:
        tmp = tempfile.mkdtemp(prefix="dev2pro-")
        installed = os.path.isdir(os.path.join(comfyui, "custom_nodes", "dev2pro-lora"))
        extra = [] if installed else ["--extra-model-paths-config", pack_only_custom_nodes_config(tmp)]
        outputs_root = os.path.join(comfyui, "output")
        loras_root = os.path.join(comfyui, "models", "loras")
        log = os.path.join(tmp, "comfyui.log")
    with ComfyServer(comfyui, extra, log) as server:
        answer = server.queue(prompt)
        if answer.get("node_errors"):
            raise RuntimeError(f"node errors: {json.dumps(answer['node_errors'])}")
        entry = server.wait(answer["prompt_id"], timeout)
        if while_running is not None:
            while_running(server)
    loras = [f for ui in entry["outputs"].values() for f in ui.get("lora_files", [])]
    images = [os.path.join(outputs_root, i["subfolder"], i["filename"]) for ui in entry["outputs"].values()
              for i in ui.get("images", []) if i.get("type") == "output"]
    return {"mode": mode, "lora_files": [os.path.join(loras_root, f) for f in loras], "images": images,
            "node_errors": answer["node_errors"], "seconds": round(time.time() - start, 1), "log": log}


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from comfy_inprocess import comfyui_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["auto", "real", "demo"], default="auto")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/dev2pro-lora/demo"),
                        help="demo mode's ComfyUI base directory (models, input, output)")
    parser.add_argument("--train-steps", type=int, help="training steps in demo mode (30; 200 with --serve)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--serve", action="store_true", help="demo mode for the browser: start ComfyUI on the demo "
                        "models with the demo workflow in its Workflows sidebar, and keep it running")
    a = parser.parse_args()
    if a.serve:
        serve(comfyui_path(), a.workdir, a.train_steps or 200)
        return
    print(json.dumps(run(comfyui_path(), a.mode, a.workdir, a.train_steps or 30, a.timeout)))


if __name__ == "__main__":
    main()
