#!/usr/bin/env python3
"""Run an API-format workflow (e.g. workflows_api/dev2pro_train_and_apply_api.json) on a running ComfyUI server.

    python scripts/dev2pro_client.py workflows_api/dev2pro_train_and_apply_api.json \\
        --dataset-folder my_dog --steps 1500 --set "Sample prompt.text=a photo of sks dog in the snow"

Queues the workflow (POST /prompt), follows it over ComfyUI's websocket with a progress bar per trainer (step,
loss, seconds per step, ETA), then downloads the output images into --output-dir and prints the saved LoRA files.
Ctrl-C once: Stop & save (the trainers end after their current step, the adapter is kept and the rest of the graph
runs). Ctrl-C again: Cancel (ComfyUI's interrupt).

--set NODE.INPUT=VALUE picks the node by id or by title (case-insensitive); VALUE is read as JSON when it parses
(1500, 0.5, true, "7"), else as the plain string. --dataset-folder sets 'folder' on every Dev2Pro node that has it;
--steps, --seed and --learning-rate set the trainers' (Train LoRA, Continue Training) inputs.

Exit codes: 0 done, 1 a node failed, 2 the workflow or a --set was refused, 3 no server, 130 cancelled.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import websocket  # websocket-client
from tqdm import tqdm

STEP_EVENT, STATUS_EVENT = "dev2pro.train.step", "dev2pro.train.status"
TRAINERS = ("Dev2ProTrainLoRA", "Dev2ProContinueTraining")  # Preview Settings' steps / seed are sampler settings
SHORTCUTS = {"dataset_folder": "folder", "steps": "steps", "seed": "seed", "learning_rate": "learning_rate"}
START_HINT = "start ComfyUI with: python main.py --listen 127.0.0.1 --port 8188 (in the ComfyUI folder)"


class Refused(Exception):
    """The workflow, a --set or the server's validation refused it: exit 2."""


class NoServer(Exception):
    """Nothing answers at --server: exit 3."""


class Comfy:
    """ComfyUI's HTTP API at ``url``."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def request(self, method: str, path: str, body: object = None, timeout: float = 30) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.read()
        except (urllib.error.URLError, OSError) as e:
            if isinstance(e, urllib.error.HTTPError):  # the server answered
                raise
            raise NoServer(f"no ComfyUI server answers at {self.url} ({getattr(e, 'reason', e)}); {START_HINT}, "
                           "or point --server at yours") from e

    def json(self, method: str, path: str, body: object = None) -> object:
        raw = self.request(method, path, body)
        return json.loads(raw) if raw.strip() else None


def title(prompt: dict, node_id: str) -> str:
    node = prompt.get(str(node_id), {})
    return node.get("_meta", {}).get("title") or node.get("class_type", "?")


def find_node(prompt: dict, name: str) -> str:
    if name in prompt:
        return name
    found = [i for i in prompt if title(prompt, i).casefold() == name.casefold()]
    if len(found) == 1:
        return found[0]
    listing = "\n".join(f"  {i}: {title(prompt, i)} ({n.get('class_type')})" for i, n in prompt.items())
    raise Refused(f"--set: '{name}' {'is the title of several nodes' if found else 'is no node id or title'}; "
                  f"the nodes are:\n{listing}")


def parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_settings(prompt: dict, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Apply the shortcuts, then every --set (so a --set wins); returns the (node, input) pairs a --set added."""
    added = []
    for option, name in SHORTCUTS.items():
        value = getattr(args, option)
        if value is None:
            continue
        nodes = [i for i, n in prompt.items() if name in n.get("inputs", {}) and
                 (n["class_type"].startswith("Dev2Pro") if name == "folder" else n["class_type"] in TRAINERS)]
        if not nodes:
            raise Refused(f"--{option.replace('_', '-')}: no Dev2Pro node of this workflow has an input '{name}'")
        for i in nodes:
            prompt[i]["inputs"][name] = value
    for item in args.set:
        target, eq, value = item.partition("=")
        node, dot, name = target.rpartition(".")  # titles may hold dots ("Training guidance 1.0"), names do not
        if not (eq and dot and node and name):
            raise Refused(f"--set {item!r}: expected NODE.INPUT=VALUE, e.g. 9.steps=500")
        node_id = find_node(prompt, node)
        inputs = prompt[node_id].setdefault("inputs", {})
        if name not in inputs:
            added.append((node_id, name))
        inputs[name] = parse_value(value)
    return added


def check_added_inputs(comfy: Comfy, prompt: dict, added: list[tuple[str, str]]) -> None:
    """An input a --set adds must be one the node's class declares (ComfyUI would silently ignore it)."""
    for node_id, name in added:
        cls = prompt[node_id]["class_type"]
        info = (comfy.json("GET", f"/object_info/{urllib.parse.quote(cls)}") or {}).get(cls)
        declared = [n for part in ("required", "optional") for n in (info or {}).get("input", {}).get(part, {})]
        if info is not None and name not in declared:
            raise Refused(f"--set: node {node_id} ({cls}, '{title(prompt, node_id)}') has no input '{name}'; "
                          f"its inputs: {', '.join(declared)}")


def refusal(answer: dict, prompt: dict) -> str:
    """ComfyUI's validation answer as lines naming node, input and what ComfyUI said."""
    error, node_errors = answer.get("error") or {}, answer.get("node_errors") or {}
    if isinstance(error, str):
        error = {"message": error}
    lines = [f"ComfyUI refused the workflow: {error.get('message', 'no reason given')}" +
             (f" ({error['details']})" if error.get("details") and not node_errors else "")]
    for node_id, entry in node_errors.items():
        who = f"node {node_id} ({entry.get('class_type') or prompt.get(node_id, {}).get('class_type')}, " \
              f"'{title(prompt, node_id)}')"
        for e in entry.get("errors", []):
            name = (e.get("extra_info") or {}).get("input_name")
            details = e.get("details") if e.get("details") and e.get("details") != name else ""
            lines.append(f"  {who}" + (f", input '{name}'" if name else "") + f": {e.get('message')}" +
                         (f" ({details})" if details else ""))
    return "\n".join(lines)


class Follower:
    """Follows one prompt over the websocket until it ends; Ctrl-C asks Stop & save, twice Cancel."""

    def __init__(self, comfy: Comfy, ws: websocket.WebSocket, prompt_id: str, prompt: dict, say):
        self.comfy, self.ws, self.prompt_id, self.prompt, self.say = comfy, ws, prompt_id, prompt, say
        self.bars: dict[str, tqdm] = {}
        self.saved: list[str] = []
        self.states: dict[str, str] = {}
        self.presses = self.handled = self.waiting = 0
        self.started = False
        self.cancel_deadline: float | None = None
        self.end: tuple[str, dict] | None = None  # ("done" | "failed" | "cancelled", message data)

    def on_sigint(self, signum, frame) -> None:
        self.presses += 1
        if self.presses > 2:
            raise KeyboardInterrupt

    def run(self) -> tuple[str, dict]:
        previous = signal.signal(signal.SIGINT, self.on_sigint)
        self.ws.settimeout(0.5)  # a Ctrl-C is acted on within half a second
        try:
            while self.end is None:
                if self.handled < self.presses:
                    self.handled += 1
                    self.stop() if self.handled == 1 else self.cancel()
                if self.cancel_deadline is not None and time.time() > self.cancel_deadline:
                    return "cancelled", {}
                try:
                    frame = self.ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except (websocket.WebSocketConnectionClosedException, OSError) as e:
                    raise NoServer(f"lost the connection to ComfyUI at {self.comfy.url} ({e})") from e
                if isinstance(frame, str):  # binary frames are preview images
                    self.handle(json.loads(frame))
            return self.end
        finally:
            signal.signal(signal.SIGINT, previous)
            for bar in self.bars.values():
                bar.close()

    def stop(self) -> None:
        answer = self.post("/dev2pro/stop", {"prompt_id": self.prompt_id})
        if answer is not None and not answer.get("stopping"):
            self.say("no trainer of this prompt is training right now (Ctrl-C again cancels the run)")
        elif answer is not None:
            self.say("stopping after the current step; the adapter is kept and the graph goes on "
                     "(Ctrl-C again cancels the run)")

    def cancel(self) -> None:
        self.post("/queue", {"delete": [self.prompt_id]})  # in case it is still waiting in the queue
        self.post("/interrupt", {"prompt_id": self.prompt_id})
        self.say("cancelling the run (ComfyUI's interrupt)")
        self.cancel_deadline = time.time() + 30

    def post(self, path: str, body: dict) -> dict | None:
        try:
            return self.comfy.json("POST", path, body) or {}
        except (urllib.error.HTTPError, NoServer) as e:
            self.say(f"POST {path} failed: {e}")
            return None

    def handle(self, message: dict) -> None:
        kind, data = message.get("type"), message.get("data") or {}
        if kind == "status" and not self.started:  # queue length, for every client
            waiting = ((data.get("status") or {}).get("exec_info") or {}).get("queue_remaining", 0)
            if waiting > 1 and waiting != self.waiting:
                self.say(f"{waiting} prompts in ComfyUI's queue; this one waits its turn")
            self.waiting = waiting
            return
        if kind in (STEP_EVENT, STATUS_EVENT):
            if data.get("prompt_id") not in (None, self.prompt_id):
                return
        elif data.get("prompt_id") != self.prompt_id:
            return  # another client's prompt
        self.started = True
        node = str(data.get("node") or data.get("node_id") or "")
        if kind == STEP_EVENT:
            self.step(node, data)
        elif kind == STATUS_EVENT:
            self.status(node, data)
        elif kind == "executing" and data.get("node") is not None:
            self.say(f"> node {node}: {title(self.prompt, node)} ({self.prompt.get(node, {}).get('class_type')})")
        elif kind == "executing" or kind == "execution_success":  # node None: the prompt is done
            self.end = self.end or ("done", data)
        elif kind == "execution_error":
            self.end = ("failed", data)
        elif kind == "execution_interrupted":
            self.end = ("cancelled", data)

    def step(self, node: str, data: dict) -> None:
        bar = self.bar(node, data.get("total") or 0)
        bar.total, bar.n = data.get("total") or bar.total, data.get("step") or 0
        eta = data.get("eta_seconds")
        loss, speed = data.get("loss"), data.get("seconds_per_step")
        bar.set_postfix_str(f"loss {'?' if loss is None else format(loss, '.4g')}, "
                            f"{'?' if speed is None else format(speed, '.3g')} s/step, "
                            f"ETA {'?' if eta is None else tqdm.format_interval(eta)}")

    def bar(self, node: str, total: int) -> tqdm:
        if node not in self.bars:
            self.bars[node] = tqdm(total=total, desc=f"{title(self.prompt, node)} (node {node})", unit="step",
                                   file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}{postfix}]", dynamic_ncols=True)
        return self.bars[node]

    def status(self, node: str, data: dict) -> None:
        state, before = data.get("status"), self.states.get(node)
        self.states[node] = state
        if state == "running":  # a continued run starts at its first step
            self.bar(node, data.get("total") or 0).n = data.get("step") or 0
        elif state in ("stopped", "finished", "cancelled", "failed") and node in self.bars:
            self.bars.pop(node).close()
        if state in ("stopped", "finished", "cancelled") and state != before and data.get("message"):
            # a failure's message is said by execution_error
            self.say(f"{title(self.prompt, node)} (node {node}): {data['message']}")
        for path in data.get("saved") or []:
            if path not in self.saved:
                self.saved.append(path)
                self.say(f"saved {path}")


def download(comfy: Comfy, image: dict, folder: str) -> str:
    """An output image through GET /view into ``folder``; an existing file is never overwritten."""
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                    "type": image.get("type", "output")})
    data = comfy.request("GET", f"/view?{query}", timeout=300)
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(image["filename"]))
    for n in itertools.count():
        path = os.path.join(folder, f"{stem}{ext}" if n == 0 else f"{stem}_{n}{ext}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path
    raise AssertionError("unreachable")


def history(comfy: Comfy, prompt_id: str, wait: float = 30) -> dict:
    """The prompt's history entry (ComfyUI writes it just after execution_success)."""
    deadline = time.time() + wait
    while True:
        entry = (comfy.json("GET", f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry is not None or time.time() > deadline:
            return entry or {}
        time.sleep(0.2)


def submit_and_follow(args: argparse.Namespace, summary: dict, say) -> int:
    try:
        with open(args.workflow) as f:
            prompt = json.load(f)
    except (OSError, ValueError) as e:
        raise Refused(f"cannot read the workflow {args.workflow}: {e}") from e
    if not isinstance(prompt, dict) or "nodes" in prompt:
        raise Refused(f"{args.workflow} is not an API-format workflow (ComfyUI: Workflow > Export (API))")
    added = apply_settings(prompt, args)
    comfy = Comfy(args.server)
    comfy.request("GET", "/system_stats")
    check_added_inputs(comfy, prompt, added)
    client_id = str(uuid.uuid4())
    parts = urllib.parse.urlsplit(comfy.url)
    ws_url = f"{'wss' if parts.scheme == 'https' else 'ws'}://{parts.netloc}{parts.path}/ws?clientId={client_id}"
    try:
        ws = websocket.create_connection(ws_url, timeout=30)  # before queuing, so that no event is missed
    except (OSError, websocket.WebSocketException) as e:
        raise NoServer(f"cannot open ComfyUI's websocket at {ws_url} ({e}); {START_HINT}") from e
    try:
        try:
            answer = comfy.json("POST", "/prompt", {"prompt": prompt, "client_id": client_id})
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                answer = json.loads(body)
            except ValueError:
                answer = None
            raise Refused(refusal(answer, prompt) if isinstance(answer, dict) else
                          f"ComfyUI refused the workflow (HTTP {e.code}): {body[:2000]}") from e
        summary["prompt_id"] = prompt_id = answer["prompt_id"]
        if answer.get("node_errors"):  # the valid outputs run, these do not
            say(refusal({"error": {"message": "some outputs will not run"}, **answer}, prompt))
        say(f"queued prompt {prompt_id} on {comfy.url}")
        follower = Follower(comfy, ws, prompt_id, prompt, say)
        state, data = follower.run()
    finally:
        ws.close()
    summary["status"], summary["lora_files"] = state, list(follower.saved)
    if state == "failed":
        summary["error"] = f"{data.get('node_type')} (node {data.get('node_id')}) failed: " \
                           f"{str(data.get('exception_message', '')).strip()}"
        say(summary["error"])
        return 1
    if state == "cancelled":
        say("the run was cancelled" + (f" at node {data['node_id']} ({data.get('node_type')})"
                                       if data.get("node_id") else ""))
        return 130
    outputs = history(comfy, prompt_id).get("outputs", {})
    for ui in outputs.values():
        for name in ui.get("lora_files", []):
            if f"models/loras/{name}" not in summary["lora_files"]:
                summary["lora_files"].append(f"models/loras/{name}")
    for path in summary["lora_files"]:
        say(f"LoRA: {path}")
    for ui in outputs.values():
        for image in ui.get("images", []):
            if image.get("type") == "output":
                summary["images"].append(download(comfy, image, args.output_dir))
                say(f"image: {summary['images'][-1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("workflow", help="an API-format workflow JSON (e.g. "
                        "workflows_api/dev2pro_train_and_apply_api.json)")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's URL (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="set an input of the node with this id or title (case-insensitive); VALUE is JSON "
                        "when it parses, else a string. Repeatable")
    parser.add_argument("--dataset-folder", help="the dataset folder (Dataset from Folder's 'folder': a subfolder "
                        "of ComfyUI/input or an absolute path on the server)")
    parser.add_argument("--steps", type=int, help="training steps of every trainer node")
    parser.add_argument("--seed", type=int, help="training seed of every trainer node")
    parser.add_argument("--learning-rate", type=float, help="learning rate of every trainer node")
    parser.add_argument("--output-dir", default="dev2pro_outputs",
                        help="where the output images are downloaded (default: ./%(default)s); never overwrites")
    parser.add_argument("--json", action="store_true", help="print one summary JSON line at the end (prompt_id, "
                        "status, lora_files, images, seconds); the other messages go to stderr")
    args = parser.parse_args(argv)
    stream = sys.stderr if args.json else sys.stdout
    say = lambda text: tqdm.write(text, file=stream)  # noqa: E731  (keeps the progress bars intact)
    summary = {"prompt_id": None, "status": "refused", "lora_files": [], "images": []}
    start = time.time()
    try:
        code = submit_and_follow(args, summary, say)
    except Refused as e:
        say(str(e))
        code = 2
    except NoServer as e:
        say(str(e))
        summary["status"], code = "no_server", 3
    except KeyboardInterrupt:
        say("interrupted")
        summary["status"], code = "cancelled", 130
    if args.json:
        print(json.dumps({**summary, "seconds": round(time.time() - start, 1)}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
