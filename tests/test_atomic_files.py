"""Saving writes a LoRA and its training state as one unit, numbered past both kinds of file, and clears the
temporary files that a killed save or encode left behind."""
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ExecutionFailed
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


@contextlib.contextmanager
def tmpfs(folder: str, kind: str):
    """A tmpfs at ``folder``, read-only ('ro') or of a size ('8k'): real read-only and full disks. Needs the right
    to mount (root with CAP_SYS_ADMIN, as in this project's sandboxes and CI); skips the test where that is denied."""
    os.makedirs(folder, exist_ok=True)
    size = "1m" if kind == "ro" else kind
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        if kind == "ro":
            subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=True)


@pytest.fixture
def small_mount(comfy, request):
    """``tmpfs`` at models/loras/<name> for ``request.param`` = kind or (kind, name)."""
    kind, name = request.param if isinstance(request.param, tuple) else (request.param, f"mount_{request.param}")
    with tmpfs(comfy.path("loras", name), kind):
        yield name


@pytest.mark.parametrize("small_mount, cause", [("ro", "is on a read-only file system"),
                                                ("8k", "the disk is full: about ")], indirect=["small_mount"])
def test_a_read_only_or_full_folder_is_said_in_words_and_nothing_is_lost(comfy, model, small_mount, cause):
    graph = with_state(training_graph(model, steps=2, prefix=f"{small_mount}/lora", seed=7))
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(graph)
    message = caught.value.message
    final = comfy.path("loras", small_mount, "lora_00001.safetensors")
    assert message.startswith(f"Dev2ProSaveLoRA (filename_prefix): could not write {final}: "), message
    assert cause in message and "Nothing was written (lora_00001.safetensors and lora_00001.dev2pro-state neither)" \
        in message, message
    assert "bytes are needed" not in message or "are free" in message
    assert os.listdir(comfy.path("loras", small_mount)) == [], "no temporary or half file"
    # fixed (another prefix), queued again: the finished run is handed on, not trained again
    graph["save"]["inputs"]["filename_prefix"] = f"after_{small_mount}/lora"
    steps = []
    record = comfy.server.send_sync
    comfy.server.send_sync = lambda e, d, sid=None: (steps.append(d) if e == "dev2pro.train.step" else None,
                                                    record(e, d, sid))
    try:
        comfy.run(graph)
    finally:
        comfy.server.send_sync = record
    assert steps == [] and os.path.isfile(comfy.path("loras", f"after_{small_mount}", "lora_00001.safetensors"))


@pytest.mark.parametrize("small_mount", [("ro", "dev2pro-rescue")], indirect=True)
def test_a_nan_stays_the_message_when_its_rescue_cannot_be_saved(comfy, core, model, small_mount):
    probe = core.dataset.TrainingDataset([core.dataset.TrainingSample(torch.zeros(16, 8, 8), torch.zeros(6, 48),
                                                                      torch.zeros(32)) for _ in range(2)])
    plan = core.dataset.BatchPlan(probe, 1, 9)
    bad_step = next(k + 1 for k in range(20) if plan.batch(k) != plan.batch(0))
    graph = training_graph(model, steps=20, prefix="nan_ro/lora", seed=9)
    graph["latents"]["inputs"]["broken_index"] = plan.batch(bad_step - 1)[0]
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(graph)
    message = caught.value.message
    assert message.startswith(f"Dev2ProTrainLoRA (learning_rate): training stopped: the loss became NaN or infinite "
                              f"at step {bad_step}."), message
    assert f"The adapter after step {bad_step - 1}, the last good one, could not be saved to models/loras/" \
           "dev2pro-rescue/ (" in message and "read-only file system" in message, message
    assert "Lower the learning rate" in message


def test_an_unwritable_encode_cache_encodes_all_the_same_and_says_so(core, tmp_path, caplog):
    with tmpfs(str(tmp_path / "cache"), "ro") as root:
        cache = core.encode_cache.EncodeCache(root)
        with caplog.at_level(logging.WARNING, logger="dev2pro-lora"):
            tensors = [cache.get("text", {"caption": c}, lambda: {"t": torch.ones(3)}) for c in "ab"]
    assert all(torch.equal(t["t"], torch.ones(3)) for t in tensors) and cache.unwritable == 2
    [warning] = [r.getMessage() for r in caplog.records if "encode cache" in r.getMessage()]
    assert "is on a read-only file system" in warning and "without caching" in warning
