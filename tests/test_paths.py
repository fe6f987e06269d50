"""File inputs resolve only inside their ComfyUI folders, whatever string an API client sends (ComfyUI does not
check V3 combo values against their list)."""
import os

import pytest
from hypothesis import given, settings, strategies as st

import random_models
from conftest import ExecutionFailed

HOSTILE = ["/etc/passwd", "/root", "../vae/ae.safetensors", "..", "sub/../../x.safetensors", "a\0b",
           "C:/Windows/win.ini", "\\\\server\\share\\x", "./x.safetensors", "x//y.safetensors", ""]


def load_model(name):
    return {"load": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": name, "weight_dtype": "bf16"}},
            "train": {"class_type": "Dev2ProTrainLoRA", "inputs": {
                "model": ["load", 0], "dataset": ["dataset", 0], "steps": 1, "learning_rate": 1e-4, "rank": 2,
                "alpha": 2.0, "seed": 0, "gradient_checkpointing": True}},
            "dataset": {"class_type": "Dev2ProDatasetFromLatents", "inputs": {"latents": ["latents", 0],
                                                                              "conditioning": ["cond", 0]}},
            "latents": {"class_type": "TestDev2ProLatents", "inputs": {"count": 1, "size": 4, "seed": 0}},
            "cond": {"class_type": "TestDev2ProConditioning", "inputs": {
                "context_dim": 48, "pooled_dim": 32, "tokens": 4, "count": 1, "seed": 0, "guidance": 3.5}},
            "save": {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "paths/x"}}}


def load_state(name):
    return {"state": {"class_type": "Dev2ProLoadTrainingState", "inputs": {"state_file": name}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["state", 0]}}}


def error_of(comfy, graph) -> str | None:
    """The node's error for ``graph``; None when ComfyUI itself refused the prompt (0.33+ checks V3 combo values
    against their lists, 0.3.64 does not)."""
    try:
        comfy.run(graph)
    except ExecutionFailed as error:
        return error.message
    except AssertionError as refused:
        assert "value_not_in_list" in str(refused) or "Value not in list" in str(refused), refused
        return None
    raise AssertionError("the prompt ran")


def node_error(comfy, node_type, **inputs) -> str:
    """What the node itself says, as when an API client's value reaches it (also where ComfyUI validates)."""
    with pytest.raises(ValueError) as error:
        node = next(n for n in comfy.pack.nodes.NODES if n.__name__ == node_type)
        node.execute(**inputs)
    return str(error.value)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_model_name_outside_the_model_folders_is_refused_before_any_read(comfy, name):
    for message in (error_of(comfy, load_model(name)), node_error(comfy, "Dev2ProLoadModel", model_name=name,
                                                                   weight_dtype="bf16")):
        if message is not None:
            assert message.startswith("Dev2ProLoadModel (model_name): "), message
            assert "is not a name inside models/diffusion_models" in message or "no name given" in message, message


@pytest.mark.parametrize("name", HOSTILE)
def test_a_state_file_outside_the_lora_folders_is_refused_before_any_read(comfy, name):
    for message in (error_of(comfy, load_state(name)), node_error(comfy, "Dev2ProLoadTrainingState", state_file=name)):
        if message is not None:
            assert message.startswith("Dev2ProLoadTrainingState (state_file): "), message
            assert "is not a name inside models/loras" in message or "no name given" in message, message


def test_the_error_for_a_name_outside_tells_nothing_of_what_exists_there(comfy):
    random_models.write_flux(comfy.path("vae", "outside.safetensors"))

    def said(name):
        return node_error(comfy, "Dev2ProLoadModel", model_name=name, weight_dtype="bf16").replace(name, "NAME")

    texts = {said(name) for name in ("../vae/outside.safetensors", "../vae/missing.safetensors", "/etc", "/nonexistent")}
    assert len(texts) == 1, texts


def test_a_model_inside_a_subfolder_and_a_symlinked_one_still_load(comfy, tmp_path):
    random_models.write_flux(comfy.path("diffusion_models", "paths_sub", "inner.safetensors"))
    target = random_models.write_flux(str(tmp_path / "elsewhere.safetensors"))
    os.symlink(target, comfy.path("diffusion_models", "paths_sub", "linked.safetensors"))
    for name in ("paths_sub/inner.safetensors", "paths_sub/linked.safetensors"):
        graph = load_model(name)
        graph["train"]["inputs"]["steps"] = 1
        graph["save"]["inputs"]["filename_prefix"] = "paths/ok"
        comfy.run(graph)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b.safetensors", ".", "..", "", "/", "\\", "\0", "C:", " ", "~", "é"]),
                max_size=6).map("".join))
def test_no_name_resolves_outside_its_folder(core, tmp_path_factory, name):
    folder = str(tmp_path_factory.getbasetemp() / "resolver")
    os.makedirs(folder, exist_ok=True)
    paths = core.paths
    try:
        parts = paths.checked_name(name, "the folder")
    except paths.OutsideFolder:
        return
    candidate = os.path.normpath(os.path.join(folder, *parts))
    assert os.path.commonpath([folder, candidate]) == folder and candidate != folder


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "/", "\\", "\0", "C:", "x" * 120, " ", "é"]),
                max_size=8).map("".join))
def test_no_prefix_saves_outside_the_lora_folder_or_past_a_name_length(core, tmp_path_factory, name):
    folder = str(tmp_path_factory.getbasetemp() / "prefixes")
    paths = core.paths
    try:
        prefix = paths.checked_prefix(name)
    except paths.OutsideFolder:
        return
    final = os.path.normpath(os.path.join(folder, prefix + "_00001.dev2pro-state"))
    assert os.path.commonpath([folder, final]) == folder
    assert all(0 < len(part.encode()) <= paths.NAME_MAX for part in os.path.relpath(final, folder).split(os.sep))
