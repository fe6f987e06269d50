"""The shipped workflows: workflows/ holds UI templates only (ComfyUI's template browser lists every JSON there),
each the same graph as its API twin in workflows_api/, every widget value fits the live node definitions, they
encode the recipe, and the A/B and preview-continue workflows run through on small random models."""
import copy
import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import nodes
import random_models
from workflow_format import has_control_widget, node_definition, ui_to_api

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS, API_WORKFLOWS = os.path.join(PACK, "workflows"), os.path.join(PACK, "workflows_api")
NAMES = ("dev2pro_train_and_apply", "dev2pro_train_preview_continue", "dev2pro_ab_guidance")


def load(name):
    folder = API_WORKFLOWS if name.endswith("_api.json") else WORKFLOWS
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def test_the_template_folder_holds_ui_workflows_only_each_with_a_thumbnail():
    names = sorted(f for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
    assert names == sorted(f"{n}.json" for n in NAMES)
    for name in names:
        workflow = load(name)
        assert {"nodes", "links", "version"} <= set(workflow), f"{name} is not a UI workflow"
        thumbnail = os.path.join(WORKFLOWS, name[: -len(".json")] + ".jpg")
        assert os.path.getsize(thumbnail) > 1000, f"{name} has no thumbnail"
        with Image.open(thumbnail) as image:
            assert image.width >= 256 and image.height >= 128


def widget_inputs(definition):
    from workflow_format import is_widget, ordered_inputs

    return [(name, spec) for name, spec in ordered_inputs(definition["input"]) if is_widget(spec)]


@pytest.mark.parametrize("name", NAMES)
def test_every_widget_value_fits_the_live_node_definition(comfy, name):
    """What a user sees on loading the template: each node type exists, has no more widget values than widgets (in
    their order), and each value is one the widget accepts (in range, or one of the combo's options)."""
    for n in load(f"{name}.json")["nodes"]:
        assert n["type"] in nodes.NODE_CLASS_MAPPINGS, n["type"]
        definition = node_definition(nodes.NODE_CLASS_MAPPINGS[n["type"]])
        values = iter(n["widgets_values"])
        count = 0
        for input_name, spec in widget_inputs(definition):
            options = spec[1] if len(spec) > 1 else {}
            value = next(values, values)
            if value is values:  # fewer values than widgets: the front end gives the rest their defaults
                break
            count += 1
            if has_control_widget(input_name, spec):
                assert next(values) in ("fixed", "increment", "decrement", "randomize")
                count += 1
            kind = spec[0]
            choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
            if choices is not None:
                if not (isinstance(value, str) and value.endswith((".safetensors", ".dev2pro-state"))):
                    assert value in choices, (n["title"], input_name, value)  # file names are the user's
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", value) <= value <= options.get("max", value), (n["title"], input_name)
        assert count == len(n["widgets_values"]), (n["title"], "widget count")


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_the_api_workflow(comfy, name):
    api = load(f"{name}_api.json")
    ui = load(f"{name}.json")
    defs = {n["type"]: node_definition(nodes.NODE_CLASS_MAPPINGS[n["type"]]) for n in ui["nodes"]}
    expected = {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in api.items()}
    assert ui_to_api(ui, defs) == expected
    assert all(n["title"] == api[str(n["id"])]["_meta"]["title"] for n in ui["nodes"] if str(n["id"]) in api)


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
            if i.get("stop_at_step"):
                i.update(steps=4, stop_at_step=2)
        elif kind == "Dev2ProPreviewSettings":
            i.update(width=64, height=64, steps=2, every_steps=1)
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


def test_preview_workflow_trains_half_saves_the_state_and_its_muted_part_continues_it(comfy, demo_files):
    ui = load("dev2pro_train_preview_continue.json")
    muted = {str(n["id"]) for n in ui["nodes"] if n["mode"] == 2}
    assert {ui_node["type"] for ui_node in ui["nodes"] if str(ui_node["id"]) in muted} == {
        "Dev2ProLoadTrainingState", "Dev2ProContinueTraining", "Dev2ProSaveLoRA"}
    api = small(load("dev2pro_train_preview_continue_api.json"))
    first = comfy.run(api)
    [train] = of_type(api, "Dev2ProTrainLoRA")
    assert first[[k for k in of_type(api, "PreviewImage")][0]]["images"], "previews are shown"
    [lora] = first[[k for k in of_type(api, "Dev2ProSaveLoRA")][0]]["lora_files"]
    [state] = first[[k for k in of_type(api, "Dev2ProSaveLoRA")][0]]["training_state_files"]
    # the user unmutes the second part and picks the state just saved
    defs = {n["type"]: node_definition(nodes.NODE_CLASS_MAPPINGS[n["type"]]) for n in ui["nodes"]}
    for n in ui["nodes"]:
        n["mode"] = 0
        if n["type"] == "Dev2ProLoadTrainingState":
            n["widgets_values"] = [state]
    both = small({k: {**v, "_meta": {"title": ""}} for k, v in ui_to_api(ui, defs).items()})
    outputs = comfy.run(both)
    saves = {k: outputs[k]["lora_files"][0] for k in of_type(both, "Dev2ProSaveLoRA") if k in outputs}
    continued = [f for k, f in saves.items() if k in muted]
    assert continued and "run_continued" in continued[0]
    with safe_open(comfy.path("loras", continued[0]), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "4"
    assert lora.startswith("ab_test/run_")
