"""The main job end to end: the shipped API workflow through a real ComfyUI server (main.py --cpu on 127.0.0.1),
queued with POST /prompt, on small random models and a synthetic dataset."""
import os

from safetensors import safe_open

import demo
from comfy_inprocess import comfyui_path


def test_api_workflow_runs_through_a_real_server(tmp_path):
    result = demo.run(comfyui_path(), "demo", str(tmp_path), train_steps=8, timeout=600)
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
