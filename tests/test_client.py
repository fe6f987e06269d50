"""scripts/dev2pro_client.py against a real ComfyUI server on the demo models: a run that succeeds and downloads
its results, a failing node, a refused input, no server, and Ctrl-C as Stop & save."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

import demo
from comfy_inprocess import comfyui_path

CLIENT = os.path.join(demo.PACK_DIR, "scripts", "dev2pro_client.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("client_demo"))
    demo.prepare_demo_folder(workdir)
    with demo.ComfyServer(comfyui_path(), ["--cpu", "--base-directory", workdir],
                          os.path.join(workdir, "comfyui.log")) as s:
        s.workdir = workdir
        yield s


@pytest.fixture
def workflow(tmp_path):
    with open(demo.API_WORKFLOW) as f:
        prompt = demo.demo_prompt(json.load(f), 3)
    path = tmp_path / "demo_api.json"
    path.write_text(json.dumps(prompt))
    return str(path)


def client(*args, **kwargs):
    return subprocess.run([sys.executable, CLIENT, *args], capture_output=True, text=True, timeout=600, **kwargs)


def test_a_run_succeeds_and_its_results_are_downloaded(server, workflow, tmp_path):
    out = tmp_path / "out"
    done = client(workflow, "--server", server.url, "--steps", "2", "--seed", "5", "--output-dir", str(out), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["status"] == "done"
    [lora] = summary["lora_files"]
    with safe_open(os.path.join(server.workdir, lora), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_seed"] == "5"
    [image] = summary["images"]
    assert os.path.getsize(image) > 0 and os.path.dirname(image) == str(out)
    assert "loss" in done.stderr and "finished at step 2 of 2" in done.stderr
    again = client(workflow, "--server", server.url, "--steps", "2", "--seed", "5", "--output-dir", str(out), "--json")
    assert again.returncode == 0
    assert sorted(os.listdir(out)) == sorted({os.path.basename(image), *[os.path.basename(i) for i in
                                              json.loads(again.stdout.strip().splitlines()[-1])["images"]]})
    assert len(os.listdir(out)) == 2, "a second download never replaces the first"


def test_a_failing_node_exits_1_with_its_message(server, workflow):
    done = client(workflow, "--server", server.url, "--dataset-folder", "no_such_folder", "--steps", "2")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Dev2ProDataset (node 8) failed:" in done.stderr and "no_such_folder" in done.stderr


def test_a_refused_input_names_node_and_input(server, workflow):
    done = client(workflow, "--server", server.url, "--set", "Train LoRA on Flux-dev2pro.rank=9999")
    assert done.returncode == 2
    assert "Dev2ProTrainLoRA (node 9" in done.stderr and "rank" in done.stderr
    unknown = client(workflow, "--server", server.url, "--set", "No such node.rank=4")
    assert unknown.returncode == 2 and "Train LoRA on Flux-dev2pro" in unknown.stderr


def test_no_server_exits_3_and_says_how_to_start_one(workflow):
    url = f"http://127.0.0.1:{demo.free_port()}"
    done = client(workflow, "--server", url)
    assert done.returncode == 3 and url in done.stderr and "main.py" in done.stderr


def test_ctrl_c_stops_training_keeps_the_adapter_and_the_graph_goes_on(server, workflow, tmp_path):
    process = subprocess.Popen([sys.executable, CLIENT, workflow, "--server", server.url, "--steps", "2000",
                                "--output-dir", str(tmp_path / "out"), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = [r for r in server.get("/dev2pro/runs")["runs"] if r["status"] == "running" and r["total"] == 2000]
        if runs and runs[0]["step"] >= 3:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert "stopping after the current step" in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    [lora] = summary["lora_files"]
    with safe_open(os.path.join(server.workdir, lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["dev2pro_stopped_early"].startswith("stopped by Stop & save at step ")
    assert int(meta["ss_steps"]) < 2000 and summary["images"], "the rest of the graph sampled"
