"""Data-parallel training under torchrun (scripts/distributed_train.py), 2 and 3 CPU ranks on the gloo backend.

Each test starts a real torchrun job; every rank imports the same ComfyUI as the tests and executes the graph."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import PACK_DIR
from graphs import training_graph

import demo
import random_models

SCRIPT = os.path.join(PACK_DIR, "scripts", "distributed_train.py")
TESTING_PACK = os.path.join(PACK_DIR, "tests", "testing_pack")
MODEL = "distributed_flux.safetensors"
# Per element of the fp32 adapter: N ranks sum their gradients in another order than one process's batched matmuls,
# and AdamW scales a near-zero gradient's rounding up to a full step. After 4 steps at lr 1e-3 (up weights moved
# up to 4.0e-3), measured with torch 2.14.1: at most 1.8e-7 (2 ranks), 2.4e-6 (3 ranks, ComfyUI 0.33; 1.9e-7 on
# 0.3.64) and 3.3e-6 (2 ranks, gradient_accumulation 2), a handful of 16384 elements above 1e-7. The bound is 0.25 %
# of the largest move.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model(comfy):
    random_models.write_flux(comfy.path("diffusion_models", MODEL), seed=61, dtype=torch.bfloat16)
    return MODEL


def torchrun_command(comfy, ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), SCRIPT,
            "--cpu", "--base-directory", comfy.root, "--custom-node", TESTING_PACK, *args]


def torchrun(comfy, tmp_path, ranks: int, graph: dict, *args: str, timeout: float = 300):
    path = tmp_path / f"graph_{ranks}.json"
    path.write_text(json.dumps(graph))
    start = time.monotonic()
    done = subprocess.run(torchrun_command(comfy, ranks, str(path), *args), capture_output=True, text=True,
                          timeout=timeout)
    done.seconds = time.monotonic() - start
    return done


def summary(done) -> dict:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary line; stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    return json.loads(lines[-1])


def graph_with_state(model, prefix, batch_size, steps=4, images=4, **kw):
    g = training_graph(model, steps=steps, images=images, prefix=prefix, **kw)
    g["train"]["inputs"]["batch_size"] = batch_size
    g["save"]["inputs"]["training_state"] = ["train", 3]
    return g


def state(comfy, prefix, number=1):
    return comfy.pack.core.lora_format.load_training_state(comfy.path("loras", f"{prefix}_{number:05d}.dev2pro-state"))


def assert_close_adapters(a, b):
    assert a.down.keys() == b.down.keys()
    for name in a.down:
        for x, y in ((a.down[name], b.down[name]), (a.up[name], b.up[name])):
            assert (x - y).abs().max() <= ATOL, name


@pytest.mark.parametrize("ranks,accumulation", [(2, 1), (3, 1), (2, 2)])
def test_ranks_train_the_adapter_of_one_process_with_their_whole_batch(comfy, model, tmp_path, ranks, accumulation):
    """N ranks at batch 1 train what one process trains at batch N. 4 images at N=3: every epoch has a batch of
    3 and one of 1, which leaves ranks 1 and 2 without rows."""
    folder = f"dist{ranks}_{accumulation}"
    g = graph_with_state(model, f"{folder}/lora", 1)
    g["train"]["inputs"]["gradient_accumulation"] = accumulation
    done = torchrun(comfy, tmp_path, ranks, g)
    assert done.returncode == 0, done.stderr[-4000:]
    g = graph_with_state(model, f"{folder}/one", ranks)
    g["train"]["inputs"]["gradient_accumulation"] = accumulation
    comfy.run(g)
    many, one = state(comfy, f"{folder}/lora"), state(comfy, f"{folder}/one")
    assert many["step"] == one["step"] == 4
    assert many["config"]["batch_size"] == ranks  # the state records the run's whole batch
    assert_close_adapters(many["adapter"], one["adapter"])
    assert many["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # only rank 0 writes: one LoRA and one state, named in its summary
    assert sorted(os.listdir(comfy.path("loras", folder))) == [
        "lora_00001.dev2pro-state", "lora_00001.safetensors", "one_00001.dev2pro-state", "one_00001.safetensors"]
    assert summary(done)["lora_files"] == [comfy.path("loras", folder, "lora_00001.safetensors")]


def test_a_state_from_two_ranks_continues_in_one_process_and_on_three(comfy, model, tmp_path):
    done = torchrun(comfy, tmp_path, 2, graph_with_state(model, "resume/two", 1, steps=6))
    assert done.returncode == 0, done.stderr[-4000:]
    g = graph_with_state(model, "resume/two_partial", 1, steps=6)
    g["train"]["inputs"]["stop_at_step"] = 3
    done = torchrun(comfy, tmp_path, 2, g)
    assert done.returncode == 0, done.stderr[-4000:]
    assert state(comfy, "resume/two_partial")["step"] == 3
    continued = copy.deepcopy(g)
    continued["state"] = {"class_type": "Dev2ProLoadTrainingState",
                          "inputs": {"state_file": "resume/two_partial_00001.dev2pro-state"}}
    continued["train"] = {"class_type": "Dev2ProContinueTraining", "inputs": {
        "training_state": ["state", 0], "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 0,
        "stop_at_step": 0}}
    continued["save"]["inputs"]["filename_prefix"] = "resume/one_continued"
    comfy.run(continued)
    continued["save"]["inputs"]["filename_prefix"] = "resume/three_continued"
    done = torchrun(comfy, tmp_path, 3, continued)
    assert done.returncode == 0, done.stderr[-4000:]
    whole = state(comfy, "resume/two")
    for prefix in ("resume/one_continued", "resume/three_continued"):
        resumed = state(comfy, prefix)
        assert resumed["step"] == whole["step"] == 6
        assert resumed["config"]["batch_size"] == 2  # the run's batch, whatever the number of ranks
        assert_close_adapters(resumed["adapter"], whole["adapter"])
        assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)


def test_two_machines_meet_through_torchrun_rendezvous(comfy, model, tmp_path):
    """torchrun's multi-node flags, two launchers of one rank each on this host: the same adapter as one process."""
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(graph_with_state(model, "nodes/lora", 1)))
    port = demo.free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dev2pro-test", SCRIPT,
              "--cpu", "--base-directory", comfy.root, "--custom-node", TESTING_PACK, str(path)]
    machines = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [m.communicate(timeout=300) for m in machines]
    assert [m.returncode for m in machines] == [0, 0], [err[-3000:] for _, err in results]
    comfy.run(graph_with_state(model, "nodes/one", 2))
    assert_close_adapters(state(comfy, "nodes/lora")["adapter"], state(comfy, "nodes/one")["adapter"])
    assert sum("lora_files" in out for out, _ in results) == 1  # one summary: rank 0's, on one machine


def rescue_files(comfy) -> set[str]:
    folder = comfy.path("loras", "dev2pro-rescue")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


def failing_graph(model, how="raise"):
    g = graph_with_state(model, "failing/lora", 1, steps=50)
    g["fail"] = {"class_type": "TestDev2ProFailOnRank", "inputs": {"model": ["load", 0], "rank": 1, "at_call": 3,
                                                                  "how": how}}
    g["guidance"]["inputs"]["model"] = ["fail", 0]
    return g


def test_a_rank_that_raises_stops_every_rank_and_rank0_keeps_the_last_good_step(comfy, model, tmp_path):
    before = rescue_files(comfy)
    done = torchrun(comfy, tmp_path, 2, failing_graph(model), timeout=180)
    assert done.returncode != 0
    assert "rank 1 failed at step 3 (RuntimeError: injected failure on rank 1" in done.stderr
    assert "[rank 0] node train (Dev2ProTrainLoRA) failed: Dev2ProTrainLoRA (ranks): rank 1 failed at step 3" in \
        done.stderr
    new = [n for n in sorted(rescue_files(comfy) - before) if n.endswith(".safetensors")]
    assert len(new) == 1 and new[0].startswith("step_00002_"), new  # numbered past earlier rescues
    saved = comfy.pack.core.lora_format.load_training_state(
        comfy.path("loras", "dev2pro-rescue", new[0].replace(".safetensors", ".dev2pro-state")))
    assert saved["step"] == 2 and len(saved["losses"]) == 2
    assert not os.path.exists(comfy.path("loras", "failing"))  # Save LoRA never ran


def test_a_rank_that_dies_stops_the_others_within_bounded_time(comfy, model, tmp_path):
    """Killed without a word (os._exit in its third forward): gloo sees its sockets close and rank 0 keeps step 2."""
    before = rescue_files(comfy)
    done = torchrun(comfy, tmp_path, 2, failing_graph(model, how="exit"), timeout=180)
    assert done.returncode != 0
    assert done.seconds < 120, done.seconds
    assert "the gradient all-reduce failed, another rank has stopped" in done.stderr
    new = [n for n in sorted(rescue_files(comfy) - before) if n.endswith(".safetensors")]
    assert len(new) == 1 and new[0].startswith("step_00002_"), new


def test_ctrl_c_stops_every_rank_after_one_step_and_rank0_saves(comfy, model, tmp_path):
    before = rescue_files(comfy)
    path = tmp_path / "long.json"
    path.write_text(json.dumps(graph_with_state(model, "stopped/lora", 1, steps=100000)))
    job = subprocess.Popen(torchrun_command(comfy, 2, str(path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    seen = []
    for line in job.stderr:  # rank 0 prints its first step at once
        seen.append(line)
        if line.startswith("[rank 0] step "):
            break
    job.send_signal(signal.SIGINT)  # what torchrun does to its ranks on Ctrl-C
    out, err = job.communicate(timeout=120)
    err = "".join(seen) + err
    assert "every rank stops after the current step" in err
    stopped = [n for n in sorted(rescue_files(comfy) - before) if n.endswith(".safetensors")]
    assert len(stopped) == 1 and stopped[0].startswith("stopped_step_"), (stopped, err[-3000:])
    saved = comfy.pack.core.lora_format.load_training_state(
        comfy.path("loras", "dev2pro-rescue", stopped[0].replace(".safetensors", ".dev2pro-state")))
    assert 1 <= saved["step"] < 100000 and len(saved["losses"]) == saved["step"]
    assert f"stopped at step {saved['step']} of 100000" in err


def test_demo_runs_on_two_ranks_and_rank0_encodes_the_dataset(comfy, tmp_path):
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT, "--demo",
         "--cpu", "--workdir", str(workdir), "--demo-steps", "2", "--set", "Image size.width=32",
         "--set", "Image size.height=32"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = summary(done)
    assert result["ranks"] == 2 and len(result["lora_files"]) == 1 and len(result["images"]) == 1
    assert all(os.path.isfile(f) for f in result["lora_files"] + result["images"])
    encoded = [line for line in done.stderr.splitlines() if "encoded," in line]
    assert any(line.startswith("[rank 0]") and " 9 encoded, 0 from the cache" in line for line in encoded), encoded
    assert any(line.startswith("[rank 1]") and " 0 encoded, 9 from the cache" in line for line in encoded), encoded

    # previews every 2 of 4 steps: rank 0 leaves training to sample them while rank 1 waits for the next step
    g = demo.demo_prompt(json.loads(open(demo.API_WORKFLOW).read()), 4)
    g["17"]["inputs"].update(width=32, height=32)
    g["previews"] = {"class_type": "Dev2ProPreviewSettings", "inputs": {
        "model": ["12", 0], "clip": ["6", 0], "vae": ["4", 0], "prompts": "a red ellipse", "every_steps": 2,
        "guidance": 3.5, "steps": 1, "width": 64, "height": 64, "seed": 0, "sampler_name": "euler",
        "scheduler": "simple"}}
    g["9"]["inputs"]["previews"] = ["previews", 0]
    g["save_previews"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 2], "filename_prefix": "previews"}}
    (tmp_path / "previews.json").write_text(json.dumps(g))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", SCRIPT, "--cpu",
         "--base-directory", str(workdir), str(tmp_path / "previews.json")], capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    images = summary(done)["images"]
    assert sorted(os.path.basename(i) for i in images if "previews" in i) == ["previews_00001_.png",
                                                                             "previews_00002_.png"]


def test_set_names_nodes_by_id_or_title_and_says_what_is_wrong():
    sys.path.insert(0, os.path.join(PACK_DIR, "scripts"))
    import distributed_train

    prompt = {"9": {"class_type": "Dev2ProTrainLoRA", "inputs": {"steps": 1000, "model": ["1", 0]},
                    "_meta": {"title": "Train LoRA on Flux-dev2pro"}}}
    distributed_train.set_inputs(prompt, ["9.steps=20", "Train LoRA on Flux-dev2pro.learning_rate=5e-6"])
    assert prompt["9"]["inputs"]["steps"] == 20 and prompt["9"]["inputs"]["learning_rate"] == 5e-6
    with pytest.raises(SystemExit, match="no node has the id or title 'Trainer'"):
        distributed_train.set_inputs(prompt, ["Trainer.steps=2"])
    with pytest.raises(SystemExit, match="input 'model' of node 9 is a link"):
        distributed_train.set_inputs(prompt, ["9.model=x"])
    with pytest.raises(SystemExit, match="write NODE.INPUT=VALUE"):
        distributed_train.set_inputs(prompt, ["steps"])
