"""Runs every test against the real ComfyUI found through COMFYUI_PATH (or the one the pack is installed in), on the CPU.

ComfyUI's graph executor runs in-process as in its server (node code under torch.inference_mode()); models,
inputs and outputs live in a temporary root so the ComfyUI install is never written to.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
import sys
import uuid

import pytest

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PACK_DIR, "scripts"))

from comfy_inprocess import import_comfyui, load_packs, prompt_executor  # noqa: E402

nodes = import_comfyui()  # exits with instructions when no ComfyUI is found: the tests never skip it
import execution  # noqa: E402
import folder_paths  # noqa: E402
import server  # noqa: E402

MODEL_FOLDERS = ("diffusion_models", "loras", "vae", "text_encoders")


class RecordingServer:
    """Stands in for PromptServer: records what nodes and the executor send to the front end."""

    def __init__(self):
        self.client_id = "tests"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class Comfy:
    def __init__(self, root: str, pack):
        self.root = root
        self.pack = pack
        self.server = RecordingServer()
        self.executor = prompt_executor(self.server)

    def path(self, folder: str, *parts: str) -> str:
        return os.path.join(self.root, "models", folder, *parts) if folder in MODEL_FOLDERS else os.path.join(self.root, folder, *parts)

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns the history outputs. Raises with ComfyUI's error."""
        prompt = copy.deepcopy(prompt)  # as the server parses each request anew; ComfyUI writes into the prompt
        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            raise AssertionError(f"prompt failed validation: {error} {node_errors}")
        assert node_errors == {}, node_errors
        self.server.messages.clear()
        server.PromptServer.instance = self.server
        self.executor.execute(prompt, prompt_id, {"client_id": self.server.client_id}, outputs)
        if not self.executor.success:
            errors = [d for e, d in self.server.messages if e == "execution_error"]
            raise ExecutionFailed(errors[0] if errors else self.server.messages)
        return self.executor.history_result["outputs"]


class ExecutionFailed(Exception):
    @property
    def message(self) -> str:
        detail = self.args[0]
        return detail.get("exception_message", str(detail)) if isinstance(detail, dict) else str(detail)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("comfy_root"))
    for folder in MODEL_FOLDERS:
        os.makedirs(os.path.join(root, "models", folder))
        folder_paths.folder_names_and_paths[folder] = ([os.path.join(root, "models", folder)], folder_paths.supported_pt_extensions)
    for name, setter in (("output", folder_paths.set_output_directory), ("input", folder_paths.set_input_directory),
                         ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        os.makedirs(os.path.join(root, name))
        setter(os.path.join(root, name))
    logging.getLogger().setLevel(logging.ERROR)
    pack = load_packs(nodes, PACK_DIR, os.path.join(PACK_DIR, "tests", "testing_pack"))
    return Comfy(root, pack)


@pytest.fixture(scope="session")
def core(comfy):
    """The pack's plain-Python training core, as ComfyUI imported it."""
    return comfy.pack.core


def load_flux(core, path, dtype=None):
    """A Flux checkpoint through the pack's loader, under inference mode as ComfyUI's executor runs nodes."""
    import torch

    with torch.inference_mode():
        return core.flux_files.load_flux_model(path, dtype or torch.float8_e4m3fn)


def train_tiny(core, patcher, data, on_step=None, stop_at=0, speed=None, **settings):
    """A short rank-4 training run on a tiny model, under inference mode as ComfyUI's executor runs nodes.
    ``speed``: overrides of the run's SpeedPlan (core.speed_plan)."""
    import torch

    config = core.training.TrainConfig(**{"steps": 4, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0, **settings})
    with torch.inference_mode():
        return core.training.train_lora(patcher, data, config, on_step, stop_at=stop_at, speed=speed)


def latent_dataset(core, images=1, seed=0):
    """Random 8x8 latents with one caption each, for the tiny test models."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():  # as VAEEncode / CLIPTextEncode hand them over
        latents = torch.randn(images, 16, 8, 8, generator=g)
        pairs = [(torch.randn(6, 48, generator=g), torch.randn(32, generator=g)) for _ in range(images)]
    return core.dataset.TrainingDataset.from_batches(latents, pairs)


def forward(patcher, seed=3):
    """One denoising forward of the tiny model on fixed inputs: equal outputs mean an unchanged MODEL."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x, ctx, y = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 6, 48, generator=g), torch.randn(1, 32, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([0.4]), ctx, y, torch.tensor([1.0]))


def assert_same_adapter(a, b):
    import torch

    assert a.down.keys() == b.down.keys()
    for name in a.down:
        assert torch.equal(a.down[name], b.down[name]) and torch.equal(a.up[name], b.up[name]), name


@pytest.fixture(scope="module", name="server")
def demo_server(tmp_path_factory):
    """A real ComfyUI server (main.py --cpu, the pack linked into custom_nodes) on the demo models, one per test
    module that asks for it; ``.workdir`` is its --base-directory."""
    import demo
    from comfy_inprocess import comfyui_path

    workdir = str(tmp_path_factory.mktemp("demo_server"))
    with demo.demo_server(comfyui_path(), workdir) as s:
        s.workdir = workdir
        yield s
