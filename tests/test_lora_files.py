"""Saving and applying: kohya keys and metadata on disk, no overwrites, and the saved file behaves exactly like
the in-graph adapter when ComfyUI's stock LoraLoaderModelOnly loads it, on fp8 and bf16 Flux-dev alike."""
import logging
import os

import pytest
import torch
from safetensors import safe_open

import random_models
from conftest import ExecutionFailed
from graphs import sampling_nodes, training_graph


@pytest.fixture(scope="module")
def models(comfy):
    random_models.write_flux(comfy.path("diffusion_models", "files_dev2pro.safetensors"), seed=31)
    random_models.write_flux(comfy.path("diffusion_models", "files_flux_dev.safetensors"), seed=32)
    return "files_dev2pro.safetensors", "files_flux_dev.safetensors"


def saved_files(outputs):
    return [f for ui in outputs.values() for f in ui.get("lora_files", [])]


def test_saved_file_has_kohya_keys_and_training_metadata(comfy, models):
    outputs = comfy.run(training_graph(models[0], steps=2, prefix="files/meta", rank=4))
    [name] = saved_files(outputs)
    assert name == "files/meta_00001.safetensors"
    path = comfy.path("loras", name)
    with safe_open(path, framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alpha = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.alpha")
        down = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in keys
    assert "lora_unet_double_blocks_0_txt_mod_lin.lora_down.weight" in keys
    assert len(keys) == 13 * 3
    assert down.shape == (4, 64) and alpha.item() == 4.0
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "2"
    assert meta["dev2pro_training_guidance"] == "1.0"
    assert meta["dev2pro_base_model"] == models[0]
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")], "no temporary files left"


def test_save_never_overwrites(comfy, models):
    folder = comfy.path("loras", "keep")
    os.makedirs(folder, exist_ok=True)
    mine = os.path.join(folder, "mine_00001.safetensors")
    with open(mine, "wb") as f:
        f.write(b"the user's own file")
    outputs = comfy.run(training_graph(models[0], steps=1, prefix="keep/mine", seed=4))
    assert saved_files(outputs) == ["keep/mine_00002.safetensors"]
    with open(mine, "rb") as f:
        assert f.read() == b"the user's own file"


@pytest.mark.parametrize("prefix, words", [
    ("../escape", "is not a name inside models/loras"), ("/abs/path", "is not a name inside models/loras"),
    ("folder/", "names a folder, not a file"), ("a\0b", "is not a name inside"), ("", "no name given"),
    ("x" * 300, "a file or folder name holds 235 here"), ("d/" * 2000 + "x", "at most 1024 fit"),
])
def test_bad_prefix_is_refused_before_any_folder_is_made(comfy, models, prefix, words):
    before = sorted(os.walk(comfy.path("loras")))
    with pytest.raises(ExecutionFailed) as error:
        comfy.run(training_graph(models[0], steps=1, prefix=prefix))
    assert error.value.message.startswith("Dev2ProSaveLoRA (filename_prefix): "), error.value.message
    assert words in error.value.message and "use something like 'dev2pro/my_subject'" in error.value.message
    assert sorted(os.walk(comfy.path("loras"))) == before


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "bf16"])
def test_saved_file_through_stock_loader_equals_in_graph_adapter(comfy, models, weight_dtype, caplog):
    prefix = f"files/equal_{weight_dtype}"
    first = comfy.run(training_graph(models[0], steps=3, prefix=prefix, seed=12))
    [lora_file] = saved_files(first)

    graph = training_graph(models[0], steps=3, prefix=prefix, seed=12)  # same inputs: served from the cache
    graph["flux_dev"] = {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": models[1], "weight_dtype": weight_dtype}}
    graph["apply"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["flux_dev", 0], "lora": ["train", 0], "strength": 1.0}}
    graph["stock"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["flux_dev", 0], "lora_name": lora_file, "strength_model": 1.0}}
    graph.update(sampling_nodes(["apply", 0], f"ours_{weight_dtype}"))
    graph.update(sampling_nodes(["stock", 0], f"stock_{weight_dtype}"))
    graph.update(sampling_nodes(["flux_dev", 0], f"base_{weight_dtype}"))
    with caplog.at_level(logging.WARNING):
        comfy.run(graph)
    assert "lora key not loaded" not in caplog.text

    def latent(name):
        with safe_open(comfy.path("output", f"{name}_00001_.latent"), framework="pt") as f:
            return f.get_tensor("latent_tensor")

    ours, stock, base = latent(f"ours_{weight_dtype}"), latent(f"stock_{weight_dtype}"), latent(f"base_{weight_dtype}")
    assert torch.equal(ours, stock)
    assert not torch.equal(ours, base), "the LoRA must change what Flux-dev samples"


def test_apply_refuses_a_lora_for_another_model(comfy, models):
    """A LoRA with layers the model lacks is an error naming the node, not a silently partial patch."""
    deeper = dict(random_models.TINY_FLUX, depth=2)
    random_models.write_flux(comfy.path("diffusion_models", "files_deeper.safetensors"), config=deeper, seed=33)
    graph = training_graph("files_deeper.safetensors", steps=1, prefix="files/deeper", seed=13)
    graph["flux_dev"] = {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": models[1], "weight_dtype": "bf16"}}
    graph["apply"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["flux_dev", 0], "lora": ["train", 0], "strength": 1.0}}
    graph.update(sampling_nodes(["apply", 0], "deeper"))
    with pytest.raises(ExecutionFailed) as error:
        comfy.run(graph)
    assert "Dev2ProApplyLoRA (lora)" in error.value.message
    assert "lora_unet_double_blocks_1_" in error.value.message


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_file_loads_back_and_samples_like_the_in_graph_adapter(comfy, models, fmt):
    """Save LoRA in either format -> Load LoRA (Dev2Pro) -> Apply LoRA, or -> ComfyUI's own Load LoRA Model: the
    samples equal the trained adapter's, and Save LoRA shows the path it wrote."""
    graph = training_graph(models[0], steps=3, prefix=f"files/back_{fmt}", seed=21)
    graph["save"]["inputs"]["format"] = fmt
    outputs = comfy.run(graph)
    [name] = saved_files(outputs)
    assert outputs["save"]["text"] == [f"models/loras/{name}"]
    with safe_open(comfy.path("loras", name), framework="pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("transformer." if fmt == "diffusers" else "lora_unet_") for k in keys)
        assert f.get_tensor(keys[0].rsplit(".", 2)[0] + ".alpha" if fmt == "kohya" else
                            [k for k in keys if k.endswith(".alpha")][0]).dtype == torch.float32

    graph = training_graph(models[0], steps=3, prefix=f"files/back_{fmt}", seed=21)  # served from the cache
    graph["save"]["inputs"]["format"] = fmt
    graph["flux_dev"] = {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": models[1], "weight_dtype": "bf16"}}
    graph["file"] = {"class_type": "Dev2ProLoadLoRA", "inputs": {"lora_name": name}}
    graph["in_graph"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["flux_dev", 0], "lora": ["train", 0], "strength": 1.0}}
    graph["loaded"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["flux_dev", 0], "lora": ["file", 0], "strength": 1.0}}
    graph["core"] = {"class_type": "LoraModelLoader", "inputs": {"model": ["flux_dev", 0], "lora": ["file", 0], "strength_model": 1.0}}
    import nodes as comfy_nodes
    if "bypass" in comfy_nodes.NODE_CLASS_MAPPINGS["LoraModelLoader"].INPUT_TYPES()["required"]:  # 0.33 added it
        graph["core"]["inputs"]["bypass"] = False
    for node in ("in_graph", "loaded", "core"):
        graph.update(sampling_nodes([node, 0], f"back_{fmt}_{node}"))
    comfy.run(graph)

    def latent(node):
        with safe_open(comfy.path("output", f"back_{fmt}_{node}_00001_.latent"), framework="pt") as f:
            return f.get_tensor("latent_tensor")

    assert torch.equal(latent("loaded"), latent("in_graph"))
    assert torch.equal(latent("core"), latent("in_graph"))


def test_load_lora_reads_a_replaced_file_again(comfy, models):
    """Queued again after the file under the same name changed, Load LoRA reads the new one."""
    import time

    graph = training_graph(models[0], steps=1, prefix="files/replaced", seed=31)
    [name] = saved_files(comfy.run(graph))
    graph = {"file": {"class_type": "Dev2ProLoadLoRA", "inputs": {"lora_name": name}},
             "copy": {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["file", 0], "filename_prefix": "files/copy"}}}
    first = comfy.run(graph)["file"]["text"][0]
    path = comfy.path("loras", name)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if "single_blocks" not in k}
    time.sleep(0.01)
    from safetensors.torch import save_file
    save_file(tensors, path)
    second = comfy.run(graph)["file"]["text"][0]
    assert "13 Flux.1 modules" in first and "10 Flux.1 modules" in second


def test_apply_refuses_mismatched_ranks_and_a_non_finite_strength(comfy, models):
    """Both used to pass Apply LoRA: ComfyUI only logged the bad layer, and NaN made every sample NaN."""
    graph = training_graph(models[0], steps=1, prefix="files/nan_strength", seed=41)
    graph["flux_dev"] = {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": models[1], "weight_dtype": "bf16"}}
    graph["apply"] = {"class_type": "Dev2ProApplyLoRA", "inputs": {"model": ["flux_dev", 0], "lora": ["train", 0],
                                                                   "strength": float("nan")}}
    graph.update(sampling_nodes(["apply", 0], "nan_strength"))
    with pytest.raises(ExecutionFailed) as error:
        comfy.run(graph)
    assert "Dev2ProApplyLoRA (strength): nan is not a number" in error.value.message

    nodes = comfy.pack.nodes
    flux_dev = nodes.Dev2ProLoadModel.execute(models[1], "bf16").result[0]
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 3)}
    with pytest.raises(ValueError, match=r"Dev2ProApplyLoRA \(lora\): lora_unet_double_blocks_0_img_attn_qkv has a "
                       r"rank-4 down-projection but a rank-3 up-projection"):
        nodes.Dev2ProApplyLoRA.execute(flux_dev, lora, 1.0)
