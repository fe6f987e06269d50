"""The shipped workflows: the UI file is the same graph as its API twin, and every node in them exists."""
import json
import os

import nodes
from workflow_format import node_definition, ui_to_api

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


def load(name):
    with open(os.path.join(WORKFLOWS, name)) as f:
        return json.load(f)


def test_ui_workflow_converts_to_the_api_workflow(comfy):
    api = load("dev2pro_train_and_apply_api.json")
    ui = load("dev2pro_train_and_apply.json")
    defs = {n["type"]: node_definition(nodes.NODE_CLASS_MAPPINGS[n["type"]]) for n in ui["nodes"]}
    expected = {node_id: {"class_type": n["class_type"], "inputs": n["inputs"]} for node_id, n in api.items()}
    assert ui_to_api(ui, defs) == expected


def test_workflow_covers_the_recipe(comfy):
    api = load("dev2pro_train_and_apply_api.json")
    types = [n["class_type"] for n in api.values()]
    for class_type in types:
        assert class_type in nodes.NODE_CLASS_MAPPINGS, class_type
    by_type = {n["class_type"]: n for n in api.values()}
    assert by_type["Dev2ProTrainingGuidance"]["inputs"]["guidance"] == 1.0
    assert by_type["FluxGuidance"]["inputs"]["guidance"] == 3.5
    assert by_type["Dev2ProLoadModel"]["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    # Training reads the dev2pro model, sampling the Flux-dev one the LoRA is applied to.
    apply = by_type["Dev2ProApplyLoRA"]["inputs"]
    assert api[apply["model"][0]]["inputs"]["model_name"] != api["1"]["inputs"]["model_name"]
