"""Saving writes a LoRA and its training state as one unit, numbered past both kinds of file, and clears the
temporary files that a killed save or encode left behind."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from graphs import training_graph
import random_models


@pytest.fixture(scope="module")
def model(comfy):
    random_models.write_flux(comfy.path("diffusion_models", "atomic_dev2pro.safetensors"), seed=41)
    return "atomic_dev2pro.safetensors"


def with_state(graph):
    graph["save"]["inputs"]["training_state"] = ["train", 3]
    return graph


def listing(comfy, sub):
    return sorted(os.listdir(comfy.path("loras", sub)))


@pytest.mark.parametrize("connect_state", [True, False])
def test_a_state_without_its_lora_keeps_its_number(comfy, model, connect_state):
    """The user deleted a LoRA and kept its state: the next save takes the next number, with or without a state,
    so a new LoRA is never paired with the old state."""
    sub = f"orphan_{connect_state}"
    os.makedirs(comfy.path("loras", sub))
    with open(comfy.path("loras", sub, "lora_00001.dev2pro-state"), "wb") as f:
        f.write(b"the state of a deleted LoRA")
    graph = training_graph(model, steps=1, prefix=f"{sub}/lora", seed=3)
    comfy.run(with_state(graph) if connect_state else graph)
    expected = ["lora_00001.dev2pro-state", "lora_00002.safetensors"]
    assert listing(comfy, sub) == sorted(expected + (["lora_00002.dev2pro-state"] if connect_state else []))
    with open(comfy.path("loras", sub, "lora_00001.dev2pro-state"), "rb") as f:
        assert f.read() == b"the state of a deleted LoRA"


def test_lora_and_state_appear_together_or_not_at_all(core, tmp_path):
    fmt = core.lora_format
    good = {"w": torch.zeros(2)}
    broken = fmt.StateParts({"w": "not a tensor"}, {})  # its file cannot be written
    with pytest.raises(Exception):
        fmt.save_numbered_lora(str(tmp_path), "pair/lora", good, lambda path: {}, broken)
    assert os.listdir(tmp_path / "pair") == [], "no LoRA without its state, no temporary file"
    path = fmt.save_numbered_lora(str(tmp_path), "pair/lora", good, lambda path: {}, fmt.StateParts(good, {}))
    assert sorted(os.listdir(tmp_path / "pair")) == ["lora_00001.dev2pro-state", "lora_00001.safetensors"]
    assert path == str(tmp_path / "pair" / "lora_00001.safetensors")


def killed_writer(folder: str) -> str:
    """A process that opened a temporary file in ``folder`` as a save does, then was SIGKILLed; returns the file."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from atomic_files import temp_file; "
            "print(temp_file(sys.argv[2]), flush=True); import time; time.sleep(60)")
    core_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core")
    child = subprocess.Popen([sys.executable, "-c", code, core_dir, folder], stdout=subprocess.PIPE, text=True)
    path = child.stdout.readline().strip()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.isfile(path)
    return path


def test_a_save_clears_what_a_killed_save_left_in_its_folder(comfy, model):
    folder = comfy.path("loras", "killed")
    os.makedirs(folder)
    left = killed_writer(folder)
    old = os.path.join(folder, ".dev2pro-abcdef.tmp")  # written by an older version, without a pid
    with open(old, "wb") as f:
        f.write(b"x")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    live = os.path.join(folder, f".dev2pro-{os.getpid()}-inflight.tmp")  # a save still running (this process)
    open(live, "wb").close()
    comfy.run(with_state(training_graph(model, steps=1, prefix="killed/lora", seed=5)))
    assert not os.path.exists(left) and not os.path.exists(old)
    assert os.path.exists(live)
    assert sorted(os.listdir(folder)) == sorted([os.path.basename(live), "lora_00001.dev2pro-state",
                                                 "lora_00001.safetensors"])


def test_an_encode_clears_what_a_killed_encode_left_in_its_folder(core, tmp_path):
    cache = core.encode_cache.EncodeCache(str(tmp_path))
    first = {"caption": "a"}
    folder = os.path.dirname(cache.path_for("text", first))
    cache.get("text", first, lambda: {"t": torch.zeros(1)})
    left = killed_writer(folder)
    cache.get("text", first, lambda: {"t": torch.zeros(1)})  # a hit: nothing written
    assert os.path.exists(left), "reading the cache deletes nothing"
    same_folder = next({"caption": "b", "n": n} for n in range(100000)
                       if os.path.dirname(cache.path_for("text", {"caption": "b", "n": n})) == folder)
    cache.get("text", same_folder, lambda: {"t": torch.ones(1)})
    assert not os.path.exists(left)
    assert len(os.listdir(folder)) == 2
