"""The shipped workflows: each UI file is the same graph as its API twin, every node in them exists, they encode the
recipe, and the A/B workflow runs through on small random models."""
import copy
import json
import os

import pytest
import torch
from PIL import Image

import nodes
import random_models
from workflow_format import node_definition, ui_to_api

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
NAMES = ("dev2pro_train_and_apply", "dev2pro_ab_guidance")


def load(name):
    with open(os.path.join(WORKFLOWS, name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_the_api_workflow(comfy, name):
    api = load(f"{name}_api.json")
    ui = load(f"{name}.json")
    defs = {n["type"]: node_definition(nodes.NODE_CLASS_MAPPINGS[n["type"]]) for n in ui["nodes"]}
    expected = {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in api.items()}
    assert ui_to_api(ui, defs) == expected


@pytest.mark.parametrize("name", NAMES)
def test_every_node_of_the_workflow_exists(comfy, name):
    for n in load(f"{name}_api.json").values():
        assert n["class_type"] in nodes.NODE_CLASS_MAPPINGS, n["class_type"]


def test_workflow_covers_the_recipe(comfy):
    api = load("dev2pro_train_and_apply_api.json")
    by_type = {n["class_type"]: n for n in api.values()}
    assert by_type["Dev2ProTrainingGuidance"]["inputs"]["guidance"] == 1.0
    assert by_type["FluxGuidance"]["inputs"]["guidance"] == 3.5
    assert by_type["Dev2ProLoadModel"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    # Training reads the dev2pro model, sampling the Flux-dev one the LoRA is applied to.
    apply = by_type["Dev2ProApplyLoRA"]["inputs"]
    assert api[apply["model"][0]]["inputs"]["model_name"] != api["1"]["inputs"]["model_name"]


def of_type(api, class_type):
    return {node_id: n["inputs"] for node_id, n in api.items() if n["class_type"] == class_type}


def test_ab_workflow_trains_both_ways_alike_and_checks_both_on_flux_dev(comfy):
    api = load("dev2pro_ab_guidance_api.json")
    trainers = of_type(api, "Dev2ProTrainLoRA")
    assert len(trainers) == 2
    a, b = (dict(t) for t in trainers.values())
    guidance = sorted(api[t["model"][0]]["inputs"]["guidance"] for t in (a, b))
    assert guidance == [1.0, 3.5]
    bases = {api[t["model"][0]]["inputs"]["guidance"]: api[api[t["model"][0]]["inputs"]["model"][0]] for t in (a, b)}
    flux_dev = bases[3.5]["inputs"]["model_name"]
    assert bases[1.0]["inputs"]["model_name"] != flux_dev
    for t in (a, b):
        t.pop("model")
    assert a == b, "the two runs differ only in base model and training guidance"
    applies = of_type(api, "Dev2ProApplyLoRA")
    assert {api[x["model"][0]]["inputs"]["model_name"] for x in applies.values()} == {flux_dev}
    assert {x["lora"][0] for x in applies.values()} == set(trainers)
    samplers = list(of_type(api, "KSampler").values())
    assert len(samplers) == 2 and {s["model"][0] for s in samplers} == set(applies)
    assert samplers[0]["seed"] == samplers[1]["seed"] and samplers[0]["positive"] == samplers[1]["positive"]
    checks = list(of_type(api, "Dev2ProGuidanceResponse").values())
    assert {c["model_b"][0] for c in checks} == set(applies)
    assert all(api[c["model"][0]]["inputs"]["model_name"] == flux_dev for c in checks)


@pytest.fixture(scope="module")
def demo_files(comfy):
    random_models.write_flux(comfy.path("diffusion_models", "ab_dev2pro.safetensors"), random_models.DEMO_FLUX, seed=31,
                             dtype=torch.float8_e4m3fn)
    random_models.write_flux(comfy.path("diffusion_models", "ab_dev.safetensors"), random_models.DEMO_FLUX, seed=32,
                             dtype=torch.float8_e4m3fn)
    random_models.write_flux_vae(comfy.path("vae", "ab_vae.safetensors"))
    # its own weights: a CLIP-L of the default seed would share encode-cache entries with other tests
    random_models.write_clip_l(comfy.path("text_encoders", "ab_clip_l.safetensors"), seed=33)
    folder = comfy.path("input", "ab_dataset")
    os.makedirs(folder)
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (64, 64), colour).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(f"a {colour} square")


def small(api: dict) -> dict:
    """The A/B workflow on the demo's small models: CLIP-L alone for the text, 64x64 images, a few steps."""
    p = copy.deepcopy(api)
    for n in p.values():
        i, kind = n["inputs"], n["class_type"]
        if kind == "Dev2ProLoadModel":
            i["model_name"] = "ab_dev2pro.safetensors" if "dev2pro" in i["model_name"] else "ab_dev.safetensors"
        elif kind == "VAELoader":
            i["vae_name"] = "ab_vae.safetensors"
        elif kind == "DualCLIPLoader":
            n["class_type"], n["inputs"] = "CLIPLoader", {"clip_name": "ab_clip_l.safetensors", "type": "stable_diffusion"}
        elif kind == "Dev2ProDataset":
            i.update(folder="ab_dataset", resolution=64)
        elif kind == "Dev2ProTrainLoRA":
            i.update(steps=2, learning_rate=1e-3, rank=4, alpha=4.0)
        elif kind == "EmptySD3LatentImage":
            i.update(width=64, height=64)
        elif kind == "KSampler":
            i["steps"] = 2
        elif kind == "Dev2ProGuidanceResponse":
            i.update(width=64, height=64, seeds=1, noise_levels="0.9")
        if "filename_prefix" in i:
            i["filename_prefix"] = i["filename_prefix"].replace("dev2pro/", "ab_test/")
    return p


def test_ab_workflow_runs_and_shows_both_samples_and_both_checks(comfy, demo_files):
    api = load("dev2pro_ab_guidance_api.json")
    outputs = comfy.run(small(api))
    for node_id in of_type(api, "SaveImage"):
        assert len(outputs[node_id]["images"]) == 1
    for node_id in of_type(api, "Dev2ProGuidanceResponse"):
        assert len(outputs[node_id]["images"]) == 1
    saves = [outputs[node_id]["lora_files"][0] for node_id in of_type(api, "Dev2ProSaveLoRA")]
    assert sorted(saves) == ["ab_test/ab_dev2pro_g1_00001.safetensors", "ab_test/ab_dev_g3.5_00001.safetensors"]
