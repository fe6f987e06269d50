"""Train an API-format workflow data-parallel: every torchrun rank runs ComfyUI in-process on its own GPU.

    torchrun --nproc-per-node N scripts/distributed_train.py workflow_api.json [--set NODE.INPUT=VALUE ...]
    torchrun --nproc-per-node 2 scripts/distributed_train.py --demo

NODE is a node id or its title; VALUE is read as JSON when it parses (10, 1e-4, true, "text"), else as text.
Every rank executes the graph up to its training nodes, which split each global batch over the ranks (batch_size
is per GPU) and average the adapter's gradients; rank 0 alone runs the rest (Save LoRA, previews, sampling) and
writes files. Ctrl-C (or SIGTERM) stops every rank after the same step; rank 0 saves that adapter and its state under
models/loras/dev2pro-rescue/ at once. Rank 0 prints one JSON line: the files it wrote and the time taken.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
import uuid

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
PACK_DIR = os.path.dirname(SCRIPTS)
TRAINING_NODES = ("Dev2ProTrainLoRA", "Dev2ProContinueTraining")
STEP_EVENT = "dev2pro.train.step"
log = logging.getLogger("dev2pro-lora")


class UsageError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"distributed_train.py: {message}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workflow", nargs="?", help="an API-format workflow (ComfyUI: Workflow > Export (API))")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="change an input of the workflow, by node id or title (repeatable)")
    parser.add_argument("--demo", action="store_true", help="the shipped workflow on the random demo models and "
                        "dataset that scripts/run.sh --mode demo makes (made here when missing)")
    parser.add_argument("--demo-steps", type=int, default=30, help="training steps of --demo")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/dev2pro-lora/demo"),
                        help="--demo's ComfyUI base directory")
    parser.add_argument("--base-directory", help="ComfyUI's --base-directory: models, input and output under it")
    parser.add_argument("--custom-node", action="append", default=[], metavar="DIR",
                        help="also load this custom-node pack (repeatable)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (gloo), as the tests do")
    a = parser.parse_args(argv)
    if not a.demo and not a.workflow:
        parser.error("give an API-format workflow file, or --demo")
    return a


def set_inputs(prompt: dict, assignments: list[str]) -> None:
    """Apply ``--set NODE.INPUT=VALUE``; NODE is an id or a title (``_meta.title``)."""
    for assignment in assignments:
        target, sep, text = assignment.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot:
            raise UsageError(f"--set {assignment!r}: write NODE.INPUT=VALUE, e.g. --set 9.steps=2000")
        ids = [i for i, n in prompt.items() if i == node_ref or n.get("_meta", {}).get("title") == node_ref]
        if len(ids) != 1:
            titles = ", ".join(f"{i} ({n.get('_meta', {}).get('title', n['class_type'])})" for i, n in prompt.items())
            raise UsageError(f"--set {assignment!r}: {'no' if not ids else 'more than one'} node has the id or title "
                             f"{node_ref!r}; the workflow has {titles}")
        inputs = prompt[ids[0]]["inputs"]
        if isinstance(inputs.get(name), list):
            raise UsageError(f"--set {assignment!r}: input {name!r} of node {ids[0]} is a link, not a value")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        inputs[name] = value


def load_workflow(a: argparse.Namespace) -> dict:
    import demo

    path = a.workflow or demo.API_WORKFLOW
    try:
        with open(path) as f:
            prompt = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read the workflow {path}: {e}") from e
    if "nodes" in prompt and "links" in prompt:
        raise UsageError(f"{path} is a UI-format workflow; in ComfyUI use Workflow > Export (API) and give that file")
    if a.demo:
        prompt = demo.demo_prompt(prompt, a.demo_steps)
    set_inputs(prompt, a.set)
    return prompt


def rendezvous_defaults() -> None:
    """One process started without torchrun: a job of one rank."""
    if "RANK" not in os.environ:
        from demo import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


class Server:
    """Stands in for ComfyUI's PromptServer in-process: rank 0 prints training progress; errors are kept."""

    def __init__(self, rank: int):
        self.rank = rank
        self.client_id = "dev2pro-distributed"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.errors: list[dict] = []
        self._last_print = 0.0
        self._started = None
        try:  # ComfyUI 0.33+: nodes register replacements for renamed nodes, which the server applies to prompts
            from app.node_replace_manager import NodeReplaceManager

            self.node_replace_manager = NodeReplaceManager()
        except ImportError:
            self.node_replace_manager = None

    def send_sync(self, event, data, sid=None):
        if event == "execution_error":
            self.errors.append(data)
        elif event == STEP_EVENT and self.rank == 0:
            self._progress(data)

    def _progress(self, data: dict) -> None:
        now = time.monotonic()
        if self._started is None:
            self._started = (now, data["step"])
        step, total = data["step"], data["total"]
        if now - self._last_print < 2.0 and step < total:
            return
        self._last_print = now
        begun, first = self._started
        rate = (now - begun) / max(step - first, 1)
        left = rate * (total - step) if step > first else 0.0
        print(f"[rank 0] step {step}/{total}  loss {data['loss']:.4g}  {rate:.3g} s/step  {left / 60:.1f} min left",
              file=sys.stderr, flush=True)

    def queue_updated(self):
        pass

    def add_on_prompt_handler(self, handler):
        pass

    @property
    def routes(self):
        from aiohttp import web

        return web.RouteTableDef()  # routes registered here are never served: no HTTP server runs


def find_pack_module():
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and os.path.realpath(file) == os.path.realpath(os.path.join(PACK_DIR, "__init__.py")):
            return module
    return None


def load_nodes(nodes, server, extra_packs: list[str]) -> tuple:
    """ComfyUI's nodes and custom nodes as its server loads them, this pack included; returns this pack."""
    import folder_paths

    for folder in folder_paths.get_folder_paths("custom_nodes"):
        os.makedirs(folder, exist_ok=True)  # a fresh --base-directory has none
    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)
    server.PromptServer.instance = Server(int(os.environ["RANK"]))  # built-in nodes register with it as they load
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    for pack_dir in ([] if find_pack_module() else [PACK_DIR]) + extra_packs:
        if not asyncio.run(nodes.load_custom_node(os.path.abspath(pack_dir))):
            raise UsageError(f"the custom-node pack {pack_dir} failed to load; its error is logged above")
    return find_pack_module(), server.PromptServer.instance


def main(argv=None) -> int:
    a = parse_args(argv)
    sys.path.insert(0, SCRIPTS)
    rendezvous_defaults()
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    log.setLevel(logging.INFO)  # the pack's own lines, from every rank; ComfyUI's start-up chatter stays out
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.is_available() and not a.cpu
    if gpu:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                             "start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(local_rank)  # ComfyUI trains on torch.cuda.current_device()
    from comfy_inprocess import import_comfyui, prompt_executor

    nodes = import_comfyui(cpu=not gpu, base_directory=a.workdir if a.demo else a.base_directory)
    import execution
    import server

    pack, srv = load_nodes(nodes, server, a.custom_node)
    distributed = pack.core.distributed
    dist.init_process_group("nccl" if gpu else "gloo", timeout=distributed.STEP_TIMEOUT,
                            **({"device_id": torch.device("cuda", local_rank)} if gpu else {}))
    try:
        return run(a, distributed, execution, srv, prompt_executor, rank, world)
    finally:
        dist.destroy_process_group()


def run(a, distributed, execution, srv: Server, prompt_executor, rank: int, world: int) -> int:
    def stop(signum, frame):
        log.warning("%s: every rank stops after the current step; rank 0 saves the adapter",
                    signal.Signals(signum).name)
        distributed.request_stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if a.demo:
        import demo

        distributed.main_first(lambda: demo.prepare_demo_folder(a.workdir), "making the demo models")
    prompt = load_workflow(a)
    prompt_id = str(uuid.uuid4())
    if srv.node_replace_manager is not None:
        srv.node_replace_manager.apply_replacements(prompt)
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok:
        details = "; ".join(f"node {i}: {e['errors'][0]['message']}: {e['errors'][0].get('details', '')}"
                            for i, e in node_errors.items() if e.get("errors"))
        print(f"[rank {rank}] the workflow is not valid: {error.get('message')} {error.get('details', '')} "
              f"{details}", file=sys.stderr)
        return 2
    trainers = [i for i, n in prompt.items() if n["class_type"] in TRAINING_NODES]
    if not trainers and rank == 0:
        log.warning("the workflow has no training node (%s): the other ranks have nothing to do",
                    ", ".join(TRAINING_NODES))
    targets = outputs if rank == 0 else trainers  # the other ranks train and leave the rest to rank 0
    executor = prompt_executor(srv)
    start = time.monotonic()
    if targets:
        executor.execute(prompt, prompt_id, {"client_id": srv.client_id}, targets)
        if not executor.success:
            for e in srv.errors or [{"exception_message": "the workflow failed; see the log above"}]:
                print(f"[rank {rank}] node {e.get('node_id')} ({e.get('node_type')}) failed: "
                      f"{e.get('exception_message', '').strip()}", file=sys.stderr, flush=True)
            return 1
    if rank == 0:
        print(json.dumps(summary(executor, world, time.monotonic() - start, distributed.stop_requested())),
              flush=True)
    return 0


def summary(executor, world: int, seconds: float, stopped: bool) -> dict:
    import folder_paths

    results = executor.history_result.get("outputs", {}) if getattr(executor, "history_result", None) else {}
    loras = [os.path.join(folder_paths.get_folder_paths("loras")[0], f)
             for ui in results.values() for f in ui.get("lora_files", [])]
    images = [os.path.join(folder_paths.get_output_directory(), i["subfolder"], i["filename"])
              for ui in results.values() for i in ui.get("images", []) if i.get("type") == "output"]
    return {"ranks": world, "lora_files": loras, "images": images, "stopped": stopped, "seconds": round(seconds, 1)}


if __name__ == "__main__":
    sys.exit(main())
