"""The main job end to end: the shipped API workflow through a real ComfyUI server (main.py --cpu on 127.0.0.1),
queued with POST /prompt, on small random models and a synthetic dataset."""
import os

from safetensors import safe_open

import demo
from comfy_inprocess import comfyui_path


HOSTILE_PROMPTS = {
    "model_name": {"load": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": "../vae/ae.safetensors",
                                                                         "weight_dtype": "bf16"}},
                   "show": {"class_type": "PreviewAny", "inputs": {"source": ["load", 0]}}},
    "state_file": {"state": {"class_type": "Dev2ProLoadTrainingState", "inputs": {"state_file": "/etc/passwd"}},
                   "show": {"class_type": "PreviewAny", "inputs": {"source": ["state", 0]}}},
}


def refusal(server, prompt) -> str:
    """Why the server did not run ``prompt``: its validation (0.33+ checks combo values) or the node's error."""
    try:
        answer = server.queue(prompt)
        server.wait(answer["prompt_id"], 60)
    except RuntimeError as e:
        return str(e)
    return "it ran"


def test_api_workflow_runs_through_a_real_server(tmp_path):
    served = {}

    def front_end_files(server):
        script = next(e for e in server.get("/extensions") if e.endswith("/dev2pro_train_panel.js"))
        served["script"] = server.get_text(script)
        served["help"] = server.get_text(script.rsplit("/", 1)[0] + "/docs/Dev2ProTrainLoRA/en.md")
        served["refusals"] = {name: refusal(server, prompt) for name, prompt in HOSTILE_PROMPTS.items()}

    result = demo.run(comfyui_path(), "demo", str(tmp_path), train_steps=8, timeout=600, while_running=front_end_files)
    assert result["mode"] == "demo"
    assert result["node_errors"] == {}
    [lora] = result["lora_files"]
    with safe_open(lora, framework="pt") as f:
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in f.keys()
        assert f.metadata()["dev2pro_training_guidance"] == "1.0"
    [image] = result["images"]
    assert os.path.getsize(image) > 0
    with open(result["log"]) as f:
        log = f.read()
    assert "dev2pro-lora" in log and "IMPORT FAILED: " + os.path.join(str(tmp_path), "custom_nodes", "dev2pro-lora") not in log
    # the front end loads the progress extension, and the node's help page is served beside it
    assert "dev2pro.train.step" in served["script"]
    assert served["help"].startswith("# Train Flux LoRA (Dev2Pro)")
    # file names from an API client that leave the model folders reach no reader
    for name, why in served["refusals"].items():
        assert "value_not_in_list" in why or "is not a name inside models/" in why, (name, why)
