"""MODELs from ComfyUI's own Load Diffusion Model (UNETLoader), as users load Flux-dev: our nodes train on them,
apply to them and sample with them, or refuse with node, input and fix; the shared MODEL samples the same after.

ComfyUI's Flux detection reads the width from the file but fixes the head width at 128 (0.33), or fixes every width
at Flux's 3072 (0.3.64): these models are the narrowest the running ComfyUI reads (256 wide with 2 heads on 0.33,
full width on 0.3.64), with one double and one single block.
"""
import os

import pytest
import torch
from safetensors.torch import load_file

import random_models
from conftest import ExecutionFailed
from graphs import sampling_nodes


def full_width_conditioning(node_id, seed):
    return {node_id: {"class_type": "TestDev2ProConditioning", "inputs": {
        "context_dim": 4096, "pooled_dim": 768, "tokens": 3, "count": 1, "seed": seed, "guidance": 3.5}}}


def narrowest_detected_flux() -> dict:
    """The narrowest Flux config whose file ComfyUI's own detection builds at the file's widths."""
    import comfy.model_detection

    narrow = dict(random_models.FULL_WIDTH_FLUX, hidden_size=256, num_heads=2)
    with torch.device("meta"):
        sd = {k: torch.empty(shape) for k, shape in random_models.flux_shapes(narrow).items()}
    detected = comfy.model_detection.detect_unet_config(sd, "") or {}
    return narrow if detected.get("hidden_size") == 256 else random_models.FULL_WIDTH_FLUX


@pytest.fixture(scope="module")
def files(comfy):
    """A plain fp8 Flux and a scaled-fp8 one (what Kijai's repost is), as ComfyUI's loaders read them."""
    config = narrowest_detected_flux()
    plain = random_models.write_flux(comfy.path("diffusion_models", "core_plain_fp8.safetensors"),
                                     config=config, dtype=torch.float8_e4m3fn, seed=41)
    scaled = comfy.path("diffusion_models", "core_scaled_fp8.safetensors")
    random_models.write_scaled_fp8(scaled, config, seed=42)
    yield {"plain": os.path.basename(plain), "scaled": os.path.basename(scaled)}
    for path in (plain, scaled):
        os.remove(path)


def train_graph(unet_name, prefix):
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "guidance": {"class_type": "Dev2ProTrainingGuidance", "inputs": {"model": ["unet", 0], "guidance": 1.0}},
        "latents": {"class_type": "TestDev2ProLatents", "inputs": {"count": 1, "size": 4, "seed": 1}},
        **full_width_conditioning("cond", 2),
        "dataset": {"class_type": "Dev2ProDatasetFromLatents", "inputs": {"latents": ["latents", 0], "conditioning": ["cond", 0]}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": {
            "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 2, "learning_rate": 1e-3, "rank": 2,
            "alpha": 2.0, "seed": 0, "gradient_checkpointing": True}},
        "save": {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": prefix}},
    }
    return g


def quantized_by_comfyui(comfy, unet_name) -> bool:
    """Whether this ComfyUI's UNETLoader turns the file's weights into QuantizedTensors (0.33+ for scaled fp8)."""
    import nodes

    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet(unet_name, "default")[0]
    return comfy.pack.core.comfy_compat.first_quantized_weight(model.model.diffusion_model) is not None


def sampled(comfy, graph, prefix):
    """The latent the graph's sampler ``prefix`` wrote; fails if ComfyUI served that sampler from its cache."""
    outputs = comfy.run(graph)
    cached = [n for event, data in comfy.server.messages if event == "execution_cached" for n in data["nodes"]]
    assert f"{prefix}_sampler" not in cached
    [latent] = outputs[f"{prefix}_save"]["latents"]
    return load_file(comfy.path("output", latent["subfolder"], latent["filename"]))["latent_tensor"]


def with_sampling(graph, model_ref, prefix, seed=0):
    g = dict(graph)
    g.update(sampling_nodes(model_ref, prefix, seed=seed))
    g.update(full_width_conditioning(f"{prefix}_cond", 9))
    return g


def test_a_unetloader_flux_trains_applies_and_samples_unchanged_after(comfy, files):
    base = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": files["plain"], "weight_dtype": "default"}}}
    plain = with_sampling(base, ["unet", 0], "core_plain")
    before = sampled(comfy, plain, "core_plain")
    g = train_graph(files["plain"], "core/plain")
    g["apply"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["unet", 0], "lora": ["train", 0], "strength": 4.0}}
    with_lora = sampled(comfy, with_sampling(g, ["apply", 0], "core_lora"), "core_lora")
    after = sampled(comfy, plain, "core_plain")  # the same cached UNETLoader MODEL that was trained on
    assert os.path.isfile(comfy.path("loras", "core", "plain_00001.safetensors"))
    assert torch.isfinite(with_lora).all() and not torch.equal(with_lora, before)
    assert torch.equal(before, after), "training must leave ComfyUI's MODEL sampling exactly as before"


def test_a_scaled_fp8_unetloader_model_is_trained_or_refused_with_the_fix(comfy, files):
    g = train_graph(files["scaled"], "core/scaled")
    if quantized_by_comfyui(comfy, files["scaled"]):  # ComfyUI 0.33+: QuantizedTensor weights
        with pytest.raises(ExecutionFailed) as caught:
            comfy.run(g)
        message = caught.value.message
        assert message.startswith("Dev2ProTrainLoRA (model): "), message
        assert "quantized weights" in message and "Load Flux-dev2pro (Dev2ProLoadModel)" in message
        assert not os.path.exists(comfy.path("loras", "core", "scaled_00001.safetensors"))
    else:  # 0.3.x: ComfyUI's scaled-fp8 ops, which compute the scaled weight in the forward
        comfy.run(g)
        assert os.path.isfile(comfy.path("loras", "core", "scaled_00001.safetensors"))


def test_apply_lora_on_a_scaled_fp8_unetloader_flux_dev_changes_its_samples(comfy, files):
    """Flux-dev from Load Diffusion Model, quantized or not, takes the LoRA through ComfyUI's own patching."""
    g = train_graph(files["plain"], "core/for_scaled")
    g["dev"] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["scaled"], "weight_dtype": "default"}}
    g["apply"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["dev", 0], "lora": ["train", 0], "strength": 8.0}}
    with_lora = sampled(comfy, with_sampling(g, ["apply", 0], "scaled_lora"), "scaled_lora")
    without = sampled(comfy, with_sampling(g, ["dev", 0], "scaled_plain"), "scaled_plain")
    assert torch.isfinite(with_lora).all() and torch.isfinite(without).all()
    assert not torch.equal(with_lora, without), "the LoRA must reach the quantized model's weights"
