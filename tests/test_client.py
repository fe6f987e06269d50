"""scripts/dev2pro_client.py as a user runs it, a subprocess, against one real ComfyUI server (main.py --cpu with
the pack linked into custom_nodes) on the demo models: a run that succeeds and downloads its results, a failing
node, refused inputs, no server, and Ctrl-C as Stop & save and, twice, as Cancel."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

import demo

CLIENT = os.path.join(demo.PACK_DIR, "scripts", "dev2pro_client.py")


@pytest.fixture
def workflow(tmp_path):
    with open(demo.API_WORKFLOW) as f:
        prompt = demo.demo_prompt(json.load(f), 4)
    path = tmp_path / "demo_api.json"
    path.write_text(json.dumps(prompt))
    return str(path)


def client(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLIENT, *args], capture_output=True, text=True, timeout=600)


def summary(done) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def metadata(server, lora: str) -> dict:
    with safe_open(os.path.join(server.workdir, lora), framework="pt") as f:
        return f.metadata()


def test_a_run_succeeds_and_its_results_are_downloaded(server, workflow, tmp_path):
    out = tmp_path / "out"
    args = [workflow, "--server", server.url, "--steps", "4", "--seed", "5", "--output-dir", str(out), "--json"]
    done = client(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    result = summary(done)
    assert result["status"] == "done" and result["prompt_id"]
    [lora] = result["lora_files"]
    assert lora.startswith("models/loras/dev2pro/demo_lora_") and f"LoRA: {lora}" in done.stderr
    assert metadata(server, lora)["ss_steps"] == "4" and metadata(server, lora)["ss_seed"] == "5"
    [image] = result["images"]
    assert os.path.dirname(image) == str(out) and os.path.getsize(image) > 0
    assert re.search(r"4/4 \[.*loss [0-9.]+, [0-9.e-]+ s/step, ETA", done.stderr), done.stderr[-3000:]
    assert "finished at step 4 of 4" in done.stderr
    # queued again, ComfyUI answers from its cache; the download never replaces the first one
    again = client(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    [second] = summary(again)["images"]
    assert second != image and sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in (image, second))


def test_a_failing_node_exits_1_with_its_message(server, workflow):
    done = client(workflow, "--server", server.url, "--dataset-folder", "no_such_folder")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Dev2ProDataset (node 8) failed: " in done.stdout and "'no_such_folder' is not a folder" in done.stdout


def test_refused_inputs_exit_2_naming_node_and_input(server, workflow, tmp_path):
    done = client(workflow, "--server", server.url, "--set", "train lora on FLUX-DEV2PRO.rank=9999")
    assert done.returncode == 2, done.stdout[-3000:]
    assert "node 9 (Dev2ProTrainLoRA, 'Train LoRA on Flux-dev2pro'), input 'rank': Value 9999 bigger than max" \
        in done.stdout
    unknown = client(workflow, "--server", server.url, "--set", "No such node.rank=4")
    assert unknown.returncode == 2 and "9: Train LoRA on Flux-dev2pro (Dev2ProTrainLoRA)" in unknown.stdout
    not_an_input = client(workflow, "--server", server.url, "--set", "9.rnak=4")
    assert not_an_input.returncode == 2 and "has no input 'rnak'" in not_an_input.stdout
    with open(workflow) as f:
        prompt = json.load(f)
    prompt["12"]["_meta"]["title"] = prompt["1"]["_meta"]["title"]
    twins = tmp_path / "twins.json"
    twins.write_text(json.dumps(prompt))
    ambiguous = client(str(twins), "--server", server.url, "--set", "Load Flux-dev2pro (training base).weight_dtype=1")
    assert ambiguous.returncode == 2 and "is the title of several nodes" in ambiguous.stdout


def test_no_server_exits_3_and_says_how_to_start_one(workflow):
    url = f"http://127.0.0.1:{demo.free_port()}"
    done = client(workflow, "--server", url)
    assert done.returncode == 3
    assert url in done.stdout and "python main.py --listen 127.0.0.1 --port 8188" in done.stdout


def run_and_interrupt(server, workflow, tmp_path, presses: int):
    """The client on a 500-step run, sent ``presses`` SIGINTs once it printed its first step."""
    err, out = tmp_path / "stderr", tmp_path / "stdout"
    with open(err, "w") as e, open(out, "w") as o:
        process = subprocess.Popen([sys.executable, CLIENT, workflow, "--server", server.url, "--steps", "500",
                                    "--output-dir", str(tmp_path / "images"), "--json"], stdout=o, stderr=e)
    try:
        deadline = time.time() + 300
        while not re.search(r"\b[1-9][0-9]*/500\b", err.read_text()):
            assert process.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        for _ in range(presses):
            process.send_signal(signal.SIGINT)
            time.sleep(0.1)
        process.wait(300)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, out.read_text(), err.read_text()


def test_ctrl_c_stops_training_keeps_the_adapter_and_the_graph_goes_on(server, workflow, tmp_path):
    code, stdout, stderr = run_and_interrupt(server, workflow, tmp_path, presses=1)
    assert code == 0, stderr[-3000:]
    assert "stopping after the current step; the adapter is kept and the graph goes on" in stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    [lora] = result["lora_files"]
    meta = metadata(server, lora)
    assert "Stop & save" in meta["dev2pro_stopped_early"] and int(meta["ss_steps"]) < 500
    assert f"stopped at step {meta['ss_steps']} of 500" in stderr
    assert result["images"], "the rest of the graph ran and sampled"


def test_ctrl_c_twice_cancels_the_run(server, workflow, tmp_path):
    code, stdout, stderr = run_and_interrupt(server, workflow, tmp_path, presses=2)
    assert code == 130, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["status"] == "cancelled"
    assert "the run was cancelled" in stderr
