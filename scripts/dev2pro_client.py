"""Run an API-format workflow on a ComfyUI server from the terminal, with a progress bar for training.

    python scripts/dev2pro_client.py workflows_api/dev2pro_train_and_apply_api.json \\
        --server http://127.0.0.1:8188 --steps 1500 --set "Train LoRA on Flux-dev2pro.learning_rate=5e-5"

Inputs are set by node id or title (``--set NODE.INPUT=VALUE``, VALUE read as JSON when it parses). Progress comes
from the server's websocket (the pack's ``dev2pro.train.*`` events). Ctrl-C asks the trainers for Stop & save
(POST /dev2pro/stop: the adapter is kept and the graph goes on); a second Ctrl-C cancels the run. Output images
are downloaded into --output-dir, never over an existing file. Exit codes: 0 done, 1 a node failed, 2 the server
refused the workflow or an input, 3 no server, 130 cancelled.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import websocket
from tqdm import tqdm

TRAINERS = ("Dev2ProTrainLoRA",)
SHORTCUTS = {  # option: (node types, input)
    "dataset_folder": (("Dev2ProDataset",), "folder"), "steps": (TRAINERS, "steps"), "seed": (TRAINERS, "seed"),
    "learning_rate": (TRAINERS, "learning_rate")}


class Refused(Exception):
    """The workflow or an input is wrong: exit 2."""


def http(server: str, path: str, body: dict | None = None, timeout: float = 30):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return r.read()


def set_input(prompt: dict, target: str, value) -> None:
    node_ref, _, name = target.rpartition(".")
    if not node_ref or not name:
        raise Refused(f"--set {target}: write NODE.INPUT=VALUE, NODE being a node id or title")
    if node_ref in prompt:
        ids = [node_ref]
    else:
        ids = [k for k, n in prompt.items() if n.get("_meta", {}).get("title", "").lower() == node_ref.lower()]
    if len(ids) != 1:
        titles = ", ".join(f"{k}: {n.get('_meta', {}).get('title', n['class_type'])}" for k, n in prompt.items())
        raise Refused(f"--set {target}: {'no' if not ids else 'more than one'} node '{node_ref}' (nodes: {titles})")
    prompt[ids[0]]["inputs"][name] = value


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def prepare(args) -> dict:
    with open(args.workflow) as f:
        prompt = json.load(f)
    if "nodes" in prompt and "links" in prompt:
        raise Refused(f"{args.workflow} is a UI workflow; use its API twin (workflows_api/, or Export (API) in ComfyUI)")
    for option, (types, name) in SHORTCUTS.items():
        value = getattr(args, option)
        if value is None:
            continue
        hits = [n for n in prompt.values() if n["class_type"] in types]
        if not hits:
            raise Refused(f"--{option.replace('_', '-')}: this workflow has no {' or '.join(types)} node")
        for n in hits:
            n["inputs"][name] = value
    for item in args.set:
        target, sep, value = item.partition("=")
        if not sep:
            raise Refused(f"--set {item}: write NODE.INPUT=VALUE")
        set_input(prompt, target, parse_value(value))
    return prompt


def refusal(prompt: dict, answer: dict) -> str:
    lines = [f"ComfyUI refused the workflow: {answer.get('error', {}).get('message', answer)}"]
    for node_id, errors in (answer.get("node_errors") or {}).items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title", errors.get("class_type", ""))
        for e in errors.get("errors", []):
            lines.append(f"  {errors.get('class_type')} (node {node_id}, '{title}'), input "
                         f"{e.get('details') or e.get('extra_info', {}).get('input_name', '?')}: {e.get('message')}")
    return "\n".join(lines)


def download(server: str, images: list[dict], folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    saved = []
    for image in images:
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        stem, ext = os.path.splitext(image["filename"])
        path, n = os.path.join(folder, image["filename"]), 1
        while os.path.exists(path):  # never over an existing file
            path, n = os.path.join(folder, f"{stem}_{n}{ext}"), n + 1
        data = http(server, f"/view?{query}")
        with open(path + ".partial", "wb") as f:
            f.write(data)
        os.replace(path + ".partial", path)
        saved.append(path)
    return saved


def run(args) -> int:
    server = args.server.rstrip("/")
    try:
        prompt = prepare(args)
    except (Refused, OSError, json.JSONDecodeError) as e:
        print(f"dev2pro_client: {e}", file=sys.stderr)
        return 2
    client_id = str(uuid.uuid4())
    try:
        http(server, "/system_stats", timeout=5)
        ws = websocket.create_connection(f"ws{server[4:]}/ws?clientId={client_id}", timeout=1)
    except (urllib.error.URLError, OSError, websocket.WebSocketException) as e:
        print(f"dev2pro_client: no ComfyUI server answers at {server} ({e}). Start one with "
              "'python main.py --listen 127.0.0.1 --port 8188' in your ComfyUI folder, or give --server.",
              file=sys.stderr)
        return 3
    try:
        prompt_id = json.loads(http(server, "/prompt", {"prompt": prompt, "client_id": client_id}))["prompt_id"]
    except urllib.error.HTTPError as e:
        print(refusal(prompt, json.loads(e.read() or b"{}")), file=sys.stderr)
        return 2
    interrupts = []

    def on_sigint(signum, frame):
        interrupts.append(time.time())
        if len(interrupts) == 1:
            http(server, "/dev2pro/stop", {"prompt_id": prompt_id})
            tqdm.write("stopping after the current step; the adapter is kept and the graph goes on "
                       "(Ctrl-C again cancels the run)", file=sys.stderr)
        else:
            http(server, "/interrupt", {"prompt_id": prompt_id})
            tqdm.write("cancelling the run", file=sys.stderr)

    signal.signal(signal.SIGINT, on_sigint)
    bars: dict[str, tqdm] = {}
    start, status = time.time(), "running"
    try:
        while True:
            if len(interrupts) > 1 and time.time() - interrupts[1] > 30:
                status = "cancelled"
                break
            try:
                message = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if not isinstance(message, str):
                continue  # preview images
            event = json.loads(message)
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (prompt_id, None):
                continue
            if kind == "dev2pro.train.step":
                bar = bars.get(data["node"])
                if bar is None:
                    bar = bars[data["node"]] = tqdm(total=data["total"], initial=data["step"] - 1, unit="step",
                                                    desc=f"train {data['node']}", file=sys.stderr)
                bar.update(data["step"] - bar.n)
                eta = data.get("eta_seconds")
                bar.set_postfix_str(f"loss {data['loss']:.4f}, {data['seconds_per_step']:.2f} s/step"
                                    + (f", {eta / 60:.1f} min left" if eta is not None else ""))
            elif kind == "dev2pro.train.status" and data.get("status") in ("stopped", "finished", "cancelled", "failed"):
                saved = f"; saved as {', '.join(data['saved'])}" if data.get("saved") else ""
                tqdm.write(f"trainer {data['node']}: {data.get('message')}{saved}", file=sys.stderr)
            elif kind == "execution_error":
                print(f"{data.get('node_type')} (node {data.get('node_id')}) failed: {data.get('exception_message')}",
                      file=sys.stderr)
                status = "failed"
                break
            elif kind == "execution_interrupted":
                status = "cancelled"
                break
            elif kind == "execution_success":
                status = "done"
                break
    finally:
        for bar in bars.values():
            bar.close()
        ws.close()
    entry = json.loads(http(server, f"/history/{prompt_id}")).get(prompt_id, {})
    outputs = entry.get("outputs", {})
    loras = [f"models/loras/{f}" for ui in outputs.values() for f in ui.get("lora_files", [])]
    images = [i for ui in outputs.values() for i in ui.get("images", []) if i.get("type") == "output"]
    files = download(server, images, args.output_dir) if status == "done" else []
    for path in loras + files:
        print(path)
    if args.json:
        print(json.dumps({"prompt_id": prompt_id, "status": status, "lora_files": loras, "images": files,
                          "seconds": round(time.time() - start, 1)}))
    return {"done": 0, "failed": 1, "cancelled": 130}[status]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", help="an API-format workflow (workflows_api/*.json, or Export (API) in ComfyUI)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="the ComfyUI server's address")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set an input of the node with this id or title (repeatable)")
    parser.add_argument("--dataset-folder", help="the training images folder (Dataset from Folder's 'folder')")
    parser.add_argument("--steps", type=int, help="training steps of every trainer")
    parser.add_argument("--seed", type=int, help="the training seed of every trainer")
    parser.add_argument("--learning-rate", type=float, help="the learning rate of every trainer")
    parser.add_argument("--output-dir", default="dev2pro_outputs", help="where output images are downloaded")
    parser.add_argument("--json", action="store_true", help="print a summary JSON line at the end")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
