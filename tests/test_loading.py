"""Dev2ProLoadModel: every file form loads with the right weights; every bad file gets an error that says what to do."""
import os

import pytest
import torch
from safetensors.torch import save_file

import comfy.sd as comfy_sd
import random_models
from conftest import ExecutionFailed



def load(comfy, name, weight_dtype="fp8_e4m3fn"):
    """Run the node as ComfyUI runs it (under inference mode) and return the MODEL."""
    node = comfy.pack.nodes.Dev2ProLoadModel
    with torch.inference_mode():
        return node.execute(name, weight_dtype).result[0]


def transformer_sd(model):
    return {k: v.detach().float() for k, v in model.model.diffusion_model.state_dict().items()}


def test_single_file_bf16_loads_as_fp8_with_values_cast(comfy):
    path = random_models.write_flux(comfy.path("diffusion_models", "dev2pro_bf16.safetensors"), dtype=torch.bfloat16)
    model = load(comfy, "dev2pro_bf16.safetensors", "fp8_e4m3fn")
    weight = model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight
    assert weight.dtype == torch.float8_e4m3fn
    from safetensors.torch import load_file
    stored = load_file(path)["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(weight.float(), stored.float().to(torch.float8_e4m3fn).float())
    assert not weight.is_inference(), "weights must be ordinary tensors so autograd can train around them"


def test_single_file_bf16_weight_dtype_keeps_bf16(comfy):
    path = random_models.write_flux(comfy.path("diffusion_models", "dev2pro_bf16b.safetensors"), seed=3)
    model = load(comfy, "dev2pro_bf16b.safetensors", "bf16")
    from safetensors.torch import load_file
    stored = load_file(path)
    loaded = {random_models.bfl_key(k): v for k, v in model.model.diffusion_model.state_dict().items()}
    assert loaded["single_blocks.0.linear1.weight"].dtype == torch.bfloat16
    assert loaded.keys() == stored.keys()
    assert all(torch.equal(loaded[k].float(), stored[k].float()) for k in stored)


def test_full_checkpoint_prefix_is_stripped(comfy):
    random_models.write_flux(comfy.path("diffusion_models", "full_ckpt.safetensors"), prefix="model.diffusion_model.")
    model = load(comfy, "full_ckpt.safetensors", "bf16")
    assert "double_blocks.0.img_attn.qkv.weight" in model.model.diffusion_model.state_dict()


def test_diffusers_folder_equals_bfl_file(comfy):
    random_models.write_diffusers_folder(comfy.path("diffusion_models", "FLUX.1-dev2pro"), seed=5)
    random_models.write_flux(comfy.path("diffusion_models", "same_as_folder.safetensors"), seed=5)
    choices = comfy.pack.nodes.model_nodes.model_choices()
    assert "FLUX.1-dev2pro/" in choices, choices
    assert not any("diffusion_pytorch_model" in c for c in choices), "shards must be listed as their folder only"
    from_folder = transformer_sd(load(comfy, "FLUX.1-dev2pro/", "bf16"))
    from_file = transformer_sd(load(comfy, "same_as_folder.safetensors", "bf16"))
    assert from_folder.keys() == from_file.keys()
    assert all(torch.equal(from_folder[k], from_file[k]) for k in from_file)


def test_scaled_fp8_is_dequantized(comfy):
    stored = random_models.write_scaled_fp8(comfy.path("diffusion_models", "scaled.safetensors"), seed=7)
    model = load(comfy, "scaled.safetensors", "bf16")
    weight = model.model.diffusion_model.double_blocks[0].img_mlp[0].weight
    expected = stored["double_blocks.0.img_mlp.0.weight"].float() * stored["double_blocks.0.img_mlp.0.scale_weight"]
    assert torch.equal(weight.float(), expected.to(torch.bfloat16).float())
    assert not any("scale_weight" in k for k in model.model.diffusion_model.state_dict())
    # The ops are ComfyUI's plain ones: no scaled-fp8 op would multiply a training delta by scale_weight.
    assert not hasattr(model.model.diffusion_model.double_blocks[0].img_mlp[0], "scale_weight")


def test_full_width_fp8_file_matches_comfyui_unetloader(comfy):
    """At Flux's real widths our loader builds the same model as ComfyUI's own UNETLoader path."""
    path = random_models.write_flux(comfy.path("diffusion_models", "full_width_fp8.safetensors"),
                                    config=random_models.FULL_WIDTH_FLUX, dtype=torch.float8_e4m3fn)
    ours = load(comfy, "full_width_fp8.safetensors", "fp8_e4m3fn")
    theirs = comfy_sd.load_diffusion_model(path, {"dtype": torch.float8_e4m3fn})
    assert ours.model.model_config.unet_config == theirs.model.model_config.unet_config
    g = torch.Generator().manual_seed(0)
    x, ctx, y = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 3, 4096, generator=g), torch.randn(1, 768, generator=g)
    t, guidance = torch.tensor([0.5]), torch.tensor([1.0])
    with torch.no_grad():
        a = ours.model.diffusion_model(x, t, ctx, y, guidance)
        b = theirs.model.diffusion_model(x, t, ctx, y, guidance)
    assert torch.isfinite(a).all() and torch.equal(a, b)
    os.remove(path)


@pytest.mark.parametrize("case, message", [
    ("schnell", "without a guidance embedding"),
    ("vae", "not a Flux.1 transformer"),
    ("truncated", "not a readable .safetensors"),
    ("missing_tensor", "truncated or is not a complete Flux"),
])
def test_bad_files_get_clear_errors(comfy, case, message):
    name = f"bad_{case}.safetensors"
    path = comfy.path("diffusion_models", name)
    sd = random_models.flux_state_dict(seed=1)
    if case == "schnell":
        save_file({k: v for k, v in sd.items() if not k.startswith("guidance_in.")}, path)
    elif case == "vae":
        save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3), "decoder.up.0.x": torch.zeros(1)}, path)
    elif case == "truncated":
        random_models.write_flux(path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        save_file({k: v for k, v in sd.items() if k != "final_layer.linear.weight"}, path)
    with pytest.raises(ExecutionFailed) as error:
        comfy.run({"1": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": name, "weight_dtype": "bf16"}},
                   "2": {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["3", 0], "filename_prefix": "x"}},
                   "3": {"class_type": "Dev2ProTrainLoRA", "inputs": {
                       "model": ["1", 0], "dataset": ["4", 0], "steps": 1, "learning_rate": 1e-4, "rank": 2,
                       "alpha": 2.0, "seed": 0, "gradient_checkpointing": True}},
                   "4": {"class_type": "Dev2ProDatasetFromLatents", "inputs": {"latents": ["5", 0], "conditioning": ["6", 0]}},
                   "5": {"class_type": "TestDev2ProLatents", "inputs": {"count": 1, "size": 4, "seed": 0}},
                   "6": {"class_type": "TestDev2ProConditioning", "inputs": {"context_dim": 48, "pooled_dim": 32,
                                                                              "tokens": 4, "count": 1, "seed": 0, "guidance": 3.5}}})
    assert "Dev2ProLoadModel (model_name)" in error.value.message
    assert message in error.value.message, error.value.message
