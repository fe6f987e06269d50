"""Guidance Response Check (Dev2Pro) in real graphs on tiny random Flux models.

Random weights say nothing about real Flux-dev: these tests check the measurement, not the recipe.
"""
import json
import os

import pytest
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import random_models
from conftest import ExecutionFailed
from graphs import sampling_nodes
from test_core_loaders import narrowest_detected_flux

NODE = "Dev2ProGuidanceResponse"
CHECK = {"guidance_values": "1, 2, 3.5, 5", "noise_levels": "0.5, 0.9", "seeds": 2, "first_seed": 3, "width": 64,
         "height": 64}
MODULATION_FREE = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "double_blocks.0.img_attn.proj",
                   "single_blocks.0.linear1", "single_blocks.0.linear2")


def lora_file(path, modules, seed):
    """A kohya-key LoRA of rank 2 with random down and up on ``modules`` of the tiny Flux (a strong, visible one)."""
    shapes = random_models.flux_shapes(random_models.TINY_FLUX)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        out_dim, in_dim = shapes[module + ".weight"]
        key = "lora_unet_" + module.replace(".", "_")
        tensors[key + ".lora_down.weight"] = torch.randn(2, in_dim, generator=g) * 0.5
        tensors[key + ".lora_up.weight"] = torch.randn(out_dim, 2, generator=g) * 0.5
        tensors[key + ".alpha"] = torch.tensor(2.0)
    save_file(tensors, path)
    return os.path.basename(path)


@pytest.fixture(scope="module")
def files(comfy):
    dev = random_models.write_flux(comfy.path("diffusion_models", "response_dev.safetensors"), seed=21)
    os.makedirs(comfy.path("loras", "response"), exist_ok=True)
    return {
        "dev": os.path.basename(dev),
        "stream_lora": "response/" + lora_file(comfy.path("loras", "response", "stream.safetensors"), MODULATION_FREE, 1),
        "mod_lora": "response/" + lora_file(comfy.path("loras", "response", "mod.safetensors"),
                                            ("double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"), 2),
    }


@pytest.fixture(scope="module")
def schnell(comfy):
    """A Flux without guidance input that ComfyUI's own Load Diffusion Model reads (its narrowest detected width)."""
    config = dict(narrowest_detected_flux(), guidance_embed=False)
    path = random_models.write_flux(comfy.path("diffusion_models", "response_schnell.safetensors"), config, seed=23,
                                    dtype=torch.float8_e4m3fn)
    yield os.path.basename(path)
    os.remove(path)


def load(name, node_id="dev"):
    return {node_id: {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": name, "weight_dtype": "bf16"}}}


def with_lora(lora_name, node_id="lora_model", model="dev"):
    return {
        f"{node_id}_file": {"class_type": "Dev2ProLoadLoRA", "inputs": {"lora_name": lora_name}},
        node_id: {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": [model, 0], "lora": [f"{node_id}_file", 0],
                                                                "strength": 1.0}},
    }


def check_graph(model_b=None, context_dim=48, **inputs):
    g = {
        "cond": {"class_type": "TestDev2ProConditioning", "inputs": {
            "context_dim": context_dim, "pooled_dim": 32, "tokens": 6, "count": 1, "seed": 4, "guidance": 3.5}},
        "check": {"class_type": NODE, "inputs": {"model": ["dev", 0], "conditioning": ["cond", 0], **CHECK, **inputs}},
        "numbers": {"class_type": "PreviewAny", "inputs": {"source": ["check", 1]}},
        "verdict": {"class_type": "PreviewAny", "inputs": {"source": ["check", 2]}},
    }
    if model_b is not None:
        g["check"]["inputs"]["model_b"] = model_b
    return g


def run_check(comfy, graph):
    """The plot the check node shows, its numbers (JSON) and its verdict, as the front end receives them."""
    outputs = comfy.run(graph)
    [image] = outputs["check"]["images"]
    plot = Image.open(comfy.path(image["type"], image["subfolder"], image["filename"]))
    return plot, json.loads(outputs["numbers"]["text"][0]), outputs["verdict"]["text"][0]


def test_identical_models_give_identical_curves(comfy, files):
    graph = {**load(files["dev"]), **load(files["dev"], "dev_again"), **check_graph(["dev_again", 0])}
    plot, numbers, verdict = run_check(comfy, graph)
    base, other = numbers["base"], numbers["with_lora"]
    assert base == other
    assert base["guidance"] == [1.0, 2.0, 3.5, 5.0]
    assert base["prediction_response"][0] == 0.0 and min(base["prediction_response"][1:]) > 0
    assert min(base["modulation_response"][1:]) > 0
    assert verdict == "guidance response kept: 100 % of base at 3.5"
    assert numbers["verdict"] == verdict and numbers["settings"]["noise_levels"] == [0.5, 0.9]
    assert plot.width > 400 and np.asarray(plot.convert("L")).std() > 0


def test_a_model_with_its_guidance_input_cut_off_has_a_flat_curve_and_the_reduced_verdict(comfy, files):
    graph = {**load(files["dev"]), "cut": {"class_type": "TestDev2ProCutGuidance", "inputs": {"model": ["dev", 0]}},
             **check_graph(["cut", 0])}
    _, numbers, verdict = run_check(comfy, graph)
    cut = numbers["with_lora"]
    assert cut["prediction_response"] == [0.0] * 4 and cut["modulation_response"] == [0.0] * 4
    assert not cut["monotone"]
    assert verdict.startswith("guidance response reduced to 0 % of base at 3.5"), verdict


def test_a_model_without_guidance_response_is_named_in_the_verdict(comfy, files):
    graph = {**load(files["dev"]), "cut": {"class_type": "TestDev2ProCutGuidance", "inputs": {"model": ["dev", 0]}},
             **check_graph()}
    graph["check"]["inputs"]["model"] = ["cut", 0]
    _, numbers, verdict = run_check(comfy, graph)
    assert numbers["with_lora"] is None
    assert verdict.startswith("no guidance response"), verdict


def test_a_lora_that_leaves_the_modulation_layers_alone_keeps_the_modulation_curve_exactly(comfy, files):
    graph = {**load(files["dev"]), **with_lora(files["stream_lora"]), **check_graph(["lora_model", 0])}
    _, numbers, _ = run_check(comfy, graph)
    base, lora = numbers["base"], numbers["with_lora"]
    assert lora["modulation_response"] == base["modulation_response"]
    # the LoRA is applied: the prediction, and how it responds to guidance, did change
    assert lora["prediction_response"] != base["prediction_response"]


def test_a_lora_on_the_modulation_layers_changes_the_modulation_curve(comfy, files):
    graph = {**load(files["dev"]), **with_lora(files["mod_lora"]), **check_graph(["lora_model", 0])}
    _, numbers, _ = run_check(comfy, graph)
    assert numbers["with_lora"]["modulation_response"][1:] != numbers["base"]["modulation_response"][1:]


def sampled(comfy, graph, prefix):
    outputs = comfy.run(graph)
    [latent] = outputs[f"{prefix}_save"]["latents"]
    return load_file(comfy.path("output", latent["subfolder"], latent["filename"]))["latent_tensor"]


def test_both_models_sample_bit_identically_after_the_check(comfy, files):
    models = {**load(files["dev"]), **with_lora(files["mod_lora"])}

    def samples():  # the cached MODELs of ``models``, sampled anew each time
        graph = {**models, **sampling_nodes(["dev", 0], "resp_base"), **sampling_nodes(["lora_model", 0], "resp_lora")}
        return sampled(comfy, graph, "resp_base"), sampled(comfy, graph, "resp_lora")

    base_before, lora_before = samples()
    run_check(comfy, {**models, **check_graph(["lora_model", 0])})
    base_after, lora_after = samples()
    assert not torch.equal(base_before, lora_before)
    assert torch.equal(base_before, base_after) and torch.equal(lora_before, lora_after)


def test_an_encoded_latent_replaces_the_empty_one(comfy, files):
    graph = {**load(files["dev"]), **check_graph(),
             "latent": {"class_type": "TestDev2ProLatents", "inputs": {"count": 1, "size": 8, "seed": 5}}}
    _, empty, _ = run_check(comfy, graph)
    graph["check"]["inputs"]["latent"] = ["latent", 0]
    _, encoded, _ = run_check(comfy, graph)
    assert encoded["base"]["prediction_response"] != empty["base"]["prediction_response"]


@pytest.mark.parametrize("change, input_name, words", [
    ({"guidance_values": "1, two"}, "guidance_values", "'two' is not a number"),
    ({"guidance_values": "1"}, "guidance_values", "besides 1.0"),
    ({"guidance_values": "3.5, 200"}, "guidance_values", "outside [0, 100]"),
    ({"guidance_values": " "}, "guidance_values", "no values given"),
    ({"noise_levels": "0, 0.5"}, "noise_levels", "outside (0, 1]"),
    ({"noise_levels": "nan"}, "noise_levels", "outside (0, 1]"),
    ({"context_dim": 64}, "conditioning", "Encode with the Flux text encoders"),
    ({"model": ["fixed", 0]}, "model", "fixed by Training Guidance"),
    ({"model_b": ["fixed", 0]}, "model_b", "fixed by Training Guidance"),
    ({"model": ["schnell", 0]}, "model", "no guidance input"),
])
def test_every_input_error_names_the_node_and_the_input(comfy, files, change, input_name, words, request):
    change = dict(change)
    graph = {**load(files["dev"]),
             "fixed": {"class_type": "Dev2ProTrainingGuidance", "inputs": {"model": ["dev", 0], "guidance": 1.0}},
             **check_graph(context_dim=change.pop("context_dim", 48))}
    if change.get("model") == ["schnell", 0]:
        graph["schnell"] = {"class_type": "UNETLoader", "inputs": {"unet_name": request.getfixturevalue("schnell"),
                                                                   "weight_dtype": "default"}}
    graph["check"]["inputs"].update(change)
    with pytest.raises(ExecutionFailed) as error:
        comfy.run(graph)
    message = error.value.message
    assert message.startswith(f"{NODE} ({input_name}): "), message
    assert words in message, message


def test_a_latent_that_is_not_a_flux_latent_names_the_input(comfy, files):
    graph = {**load(files["dev"]), **check_graph(),
             "sd_latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}}
    graph["check"]["inputs"]["latent"] = ["sd_latent", 0]
    with pytest.raises(ExecutionFailed) as error:
        comfy.run(graph)
    assert error.value.message.startswith(f"{NODE} (latent): "), error.value.message
    assert "16 channels" in error.value.message


@pytest.mark.parametrize("base, lora, expected", [
    ([0, 0.2, 0.4], [0, 0.1, 0.38], "guidance response kept: 95 % of base at 3.5"),
    ([0, 0.2, 0.4], [0, 0.1, 0.2], "guidance response reduced to 50 % of base at 3.5"),
    ([0, 0.2, 0.4], [0, 0.3, 0.6], "guidance response exaggerated: 150 % of base at 3.5"),
    ([0, 0.2, 0.4], [0, 0.45, 0.4], "guidance response kept: 100 % of base at 3.5; no longer monotone in guidance"),
])
def test_the_verdict_reads_both_curves_at_3_5(core, base, lora, expected):
    gr = core.guidance_response
    curves = [gr.Curve([1.0, 2.0, 3.5], p, p) for p in (base, lora)]
    assert gr.verdict(*curves) == expected
