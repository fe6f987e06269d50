"""The training nodes in real ComfyUI graphs: previews on Flux-dev, chained and resumed runs, NaN rescue."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy.ldm.flux.model as comfy_flux
import random_models
from comfy.ldm.flux.layers import timestep_embedding
from conftest import ExecutionFailed


@pytest.fixture(scope="module")
def files(comfy):
    """Two small Flux models that read CLIP-L-wide text (dev2pro to train, dev to preview), a VAE and CLIP-L."""
    dev2pro = random_models.write_flux(comfy.path("diffusion_models", "nodes_dev2pro.safetensors"), random_models.DEMO_FLUX, seed=5)
    dev = random_models.write_flux(comfy.path("diffusion_models", "nodes_dev.safetensors"), random_models.DEMO_FLUX, seed=6)
    random_models.write_flux_vae(comfy.path("vae", "nodes_vae.safetensors"))
    random_models.write_clip_l(comfy.path("text_encoders", "nodes_clip_l.safetensors"))
    return {"dev2pro": dev2pro, "dev": dev}


def graph(train_inputs=None, broken_index=-1):
    return {
        "load": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": "nodes_dev2pro.safetensors", "weight_dtype": "fp8_e4m3fn"}},
        "guidance": {"class_type": "Dev2ProTrainingGuidance", "inputs": {"model": ["load", 0], "guidance": 1.0}},
        "latents": {"class_type": "TestDev2ProLatents", "inputs": {"count": 2, "size": 8, "seed": 1, "broken_index": broken_index}},
        "cond": {"class_type": "TestDev2ProConditioning", "inputs": {
            "context_dim": 768, "pooled_dim": 768, "tokens": 6, "count": 2, "seed": 2, "guidance": 3.5}},
        "dataset": {"class_type": "Dev2ProDatasetFromLatents", "inputs": {"latents": ["latents", 0], "conditioning": ["cond", 0]}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": {
            "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 4, "learning_rate": 1e-3, "rank": 4,
            "alpha": 4.0, "seed": 0, "gradient_checkpointing": True, "lr_schedule": "cosine", **(train_inputs or {})}},
    }


def preview_nodes(every_steps=2):
    return {
        "dev": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": "nodes_dev.safetensors", "weight_dtype": "fp8_e4m3fn"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "nodes_vae.safetensors"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "nodes_clip_l.safetensors", "type": "stable_diffusion"}},
        "previews": {"class_type": "Dev2ProPreviewSettings", "inputs": {
            "model": ["dev", 0], "clip": ["clip", 0], "vae": ["vae", 0], "prompts": "a dog\n\na cat on a sofa",
            "every_steps": every_steps, "guidance": 3.5, "steps": 1, "width": 64, "height": 64, "seed": 0,
            "sampler_name": "euler", "scheduler": "simple"}},
    }


def saved(comfy, outputs, node="save"):
    [name] = outputs[node]["lora_files"]
    return comfy.path("loras", name)


def test_previews_sample_flux_dev_at_its_guidance_with_the_adapter(comfy, files):
    fp8 = {name: load_file(path)["img_in.weight"].to(torch.float8_e4m3fn) for name, path in files.items()}
    calls, hooked, handles = [], set(), []

    def on_any_module(module, args):  # every Flux transformer the graph builds: which weights, which guidance
        if isinstance(module, comfy_flux.Flux) and id(module) not in hooked:
            hooked.add(id(module))

            def on_guidance(_, guidance_args, flux=module):
                which = [n for n, w in fp8.items() if torch.equal(flux.img_in.weight.to(torch.float8_e4m3fn), w)]
                calls.append((which, guidance_args[0].detach().float().clone()))

            handles.append(module.guidance_in.register_forward_pre_hook(on_guidance))

    g = {**graph(), **preview_nodes()}
    g["train"]["inputs"]["previews"] = ["previews", 0]
    g["show"] = {"class_type": "PreviewImage", "inputs": {"images": ["train", 2]}}
    handles.append(torch.nn.modules.module.register_module_forward_pre_hook(on_any_module))
    try:
        outputs = comfy.run(g)
    finally:
        for h in handles:
            h.remove()
    assert len(outputs["show"]["images"]) == 4  # after steps 2 and 4, one image per prompt
    at = {value: timestep_embedding(torch.tensor([value]), 256).float() for value in (1.0, 3.5)}
    training = [which for which, e in calls if torch.allclose(e, at[1.0], atol=1e-3)]
    previews = [which for which, e in calls if torch.allclose(e, at[3.5], atol=1e-2)]
    assert len(training) + len(previews) == len(calls)
    assert training == [["dev2pro"]] * 4
    assert previews == [["dev"]] * 4  # two rounds x two prompts x one sampling step, all on Flux-dev


def test_train_preview_continue_in_one_graph_equals_one_uninterrupted_run(comfy, files):
    straight = graph()
    straight["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "chain/straight"}}
    chained = {**graph({"stop_at_step": 2}), **preview_nodes(every_steps=2)}
    chained["train"]["inputs"]["previews"] = ["previews", 0]
    chained["more"] = {"class_type": "Dev2ProContinueTraining", "inputs": {
        "training_state": ["train", 3], "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 0, "stop_at_step": 0}}
    chained["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {
        "lora": ["more", 0], "filename_prefix": "chain/chained", "training_state": ["more", 3]}}
    a = load_file(saved(comfy, comfy.run(straight)))
    outputs = comfy.run(chained)
    b = load_file(saved(comfy, outputs))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert outputs["save"]["training_state_files"] == ["chain/chained_00001.dev2pro-state"]


def test_a_saved_training_state_continues_in_a_new_graph(comfy, files):
    first = graph({"stop_at_step": 3, "steps": 6})
    first["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {
        "lora": ["train", 0], "filename_prefix": "resume/part", "training_state": ["train", 3]}}
    [state_file] = comfy.run(first)["save"]["training_state_files"]
    assert os.path.isfile(comfy.path("loras", state_file))
    second = {k: v for k, v in graph().items() if k not in ("train",)}
    second["state"] = {"class_type": "Dev2ProLoadTrainingState", "inputs": {"state_file": state_file}}
    second["more"] = {"class_type": "Dev2ProContinueTraining", "inputs": {
        "training_state": ["state", 0], "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 0, "stop_at_step": 0}}
    second["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["more", 0], "filename_prefix": "resume/rest"}}
    straight = graph({"steps": 6})
    straight["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "resume/whole"}}
    rest = load_file(saved(comfy, comfy.run(second)))
    whole = load_file(saved(comfy, comfy.run(straight)))
    assert all(torch.equal(rest[k], whole[k]) for k in whole)


def test_continue_training_sets_a_new_rate_and_schedule_for_the_steps_it_adds(comfy, files):
    """The NaN advice made possible: continue a saved state at a lower rate; the new rate and schedule are in the
    LoRA's metadata and in the state, so a later continue keeps them."""
    g = graph()  # 4 steps at 1e-3, cosine
    g["more"] = {"class_type": "Dev2ProContinueTraining", "inputs": {
        "training_state": ["train", 3], "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 8,
        "stop_at_step": 0, "learning_rate": 5e-4, "lr_schedule": "linear"}}
    g["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {
        "lora": ["more", 0], "filename_prefix": "rate/lower", "training_state": ["more", 3]}}
    outputs = comfy.run(g)
    rates = {d["step"]: d["learning_rate"] for e, d in comfy.server.messages
             if e == "dev2pro.train.step" and d["node"] == "more"}
    assert rates == pytest.approx({5: 5e-4, 6: 3.75e-4, 7: 2.5e-4, 8: 1.25e-4}, rel=1e-12)
    with safe_open(saved(comfy, outputs), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_learning_rate"] == "0.0005" and meta["ss_lr_scheduler"] == "linear"
    assert json.loads(meta["dev2pro_learning_rates"]) == [[1, 0.001, "cosine"], [5, 0.0005, "linear"]]
    [state_file] = outputs["save"]["training_state_files"]
    with safe_open(comfy.path("loras", state_file), framework="pt") as f:
        config = json.loads(f.metadata()["config"])
    assert (config["learning_rate"], config["lr_schedule"], config["schedule_start"]) == (5e-4, "linear", 4)


def saved_state(comfy, prefix):
    first = graph({"steps": 6, "stop_at_step": 2})
    first["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {
        "lora": ["train", 0], "filename_prefix": prefix, "training_state": ["train", 3]}}
    [state_file] = comfy.run(first)["save"]["training_state_files"]
    return state_file


def continue_graph(state_file, model_name="nodes_dev2pro.safetensors", **inputs):
    g = {k: v for k, v in graph().items() if k != "train"}
    g["load"]["inputs"]["model_name"] = model_name
    g["state"] = {"class_type": "Dev2ProLoadTrainingState", "inputs": {"state_file": state_file}}
    g["more"] = {"class_type": "Dev2ProContinueTraining", "inputs": {
        "training_state": ["state", 0], "model": ["guidance", 0], "dataset": ["dataset", 0], "steps": 0,
        "stop_at_step": 0, **inputs}}
    g["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["more", 0], "filename_prefix": "states/more"}}
    return g


def failure(comfy, g) -> str:
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(g)
    return caught.value.message


def test_a_bit_flipped_or_damaged_state_is_refused_before_training(comfy, files):
    state_file = saved_state(comfy, "states/flip")
    path = comfy.path("loras", state_file)
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0x10]))
    message = failure(comfy, continue_graph(state_file))
    assert message.startswith("Dev2ProLoadTrainingState (state_file): "), message
    assert "is damaged (its checksum does not match" in message
    # a state without a checksum (as older versions wrote) whose metadata is broken
    from safetensors.torch import save_file
    state_file = saved_state(comfy, "states/broken")
    path = comfy.path("loras", state_file)
    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta.pop("checksum")
    meta["optimizer"] = "{not json"
    save_file(tensors, path, meta)
    message = failure(comfy, continue_graph(state_file))
    assert "is damaged or incomplete (JSONDecodeError" in message, message


def test_a_state_continued_on_another_base_is_refused_unless_asked_for(comfy, files):
    state_file = saved_state(comfy, "states/base")
    message = failure(comfy, continue_graph(state_file, "nodes_dev.safetensors"))
    assert message.startswith("Dev2ProContinueTraining (model): the training state was trained on "
                              "'nodes_dev2pro.safetensors'"), message
    assert "allow_other_base" in message
    outputs = comfy.run(continue_graph(state_file, "nodes_dev.safetensors", allow_other_base=True))
    assert saved(comfy, outputs)
    # the same file loaded in bf16 instead of fp8 is the same base
    g = continue_graph(state_file)
    g["load"]["inputs"]["weight_dtype"] = "bf16"
    comfy.run(g)


def test_a_state_for_another_width_names_the_state_even_when_allowed(comfy, files):
    narrow = dict(random_models.DEMO_FLUX, hidden_size=64, num_heads=2)
    random_models.write_flux(comfy.path("diffusion_models", "nodes_narrow.safetensors"), narrow, seed=7)
    state_file = saved_state(comfy, "states/width")
    message = failure(comfy, continue_graph(state_file, "nodes_narrow.safetensors", allow_other_base=True))
    assert message.startswith("Dev2ProContinueTraining (training_state): the training state's "), message
    assert "another width or rank" in message


@pytest.mark.parametrize("orphan", [False, True])
def test_a_nan_loss_stops_with_a_clear_error_and_saves_the_last_good_adapter(comfy, files, orphan):
    """Also when dev2pro-rescue/ holds a state whose LoRA the user deleted: the rescue takes the next number."""
    core = comfy.pack.core
    probe = core.dataset.TrainingDataset([core.dataset.TrainingSample(torch.zeros(16, 8, 8), torch.zeros(6, 768),
                                                                      torch.zeros(768)) for _ in range(2)])
    plan = core.dataset.BatchPlan(probe, 1, 0)
    bad_step = next(k + 1 for k in range(20) if plan.batch(k) != plan.batch(0))
    g = graph({"steps": 20}, broken_index=plan.batch(bad_step - 1)[0])
    g["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "nan/lora"}}
    rescues = comfy.path("loras", "dev2pro-rescue")
    stems = {f.split(".")[0] for f in (os.listdir(rescues) if os.path.isdir(rescues) else [])}
    taken = len([stem for stem in stems if stem.startswith(f"step_{bad_step - 1:05d}_")])  # from other runs
    if orphan:
        os.makedirs(rescues, exist_ok=True)
        with open(os.path.join(rescues, f"step_{bad_step - 1:05d}_{taken + 1:05d}.dev2pro-state"), "wb") as f:
            f.write(b"a state whose LoRA was deleted")
        taken += 1
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(g)
    message = caught.value.message
    assert f"Dev2ProTrainLoRA (learning_rate): training stopped: the loss became NaN or infinite at step {bad_step}" in message
    rescue = os.path.join(rescues, f"step_{bad_step - 1:05d}_{taken + 1:05d}.safetensors")
    assert rescue in message and os.path.isfile(rescue)
    assert os.path.isfile(rescue.replace(".safetensors", ".dev2pro-state"))
    assert all(torch.isfinite(t.float()).all() for t in load_file(rescue).values())
    assert not os.path.exists(comfy.path("loras", "nan"))
    # the panel lists it as it lists a Cancel's rescue file
    run = core.live_runs.RUNS.get("train")
    assert run.status == "failed" and run.saved[-1] == f"models/loras/dev2pro-rescue/{os.path.basename(rescue)}"


def advanced(fp8_matmul):
    return {"class_type": "Dev2ProTrainAdvanced", "inputs": {
        "sigmoid_scale": 1.0, "shift": 3.0, "logit_mean": 0.0, "logit_std": 1.0, "huber_delta": 0.1,
        "weight_decay": 0.01, "compile": "off", "fp8_matmul": fp8_matmul}}


def test_fp8_matmul_from_the_advanced_settings_trains_and_saves(comfy, files):
    g = graph({"advanced": ["advanced", 0]})
    g["advanced"] = advanced("on")
    g["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "fp8/lora"}}
    plain = graph()
    plain["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "plain/lora"}}
    fp8_lora = load_file(saved(comfy, comfy.run(g)))
    plain_lora = load_file(saved(comfy, comfy.run(plain)))
    assert fp8_lora.keys() == plain_lora.keys()
    assert any(not torch.equal(fp8_lora[k], plain_lora[k]) for k in fp8_lora), "fp8_matmul must reach the trainer"
    assert all(torch.isfinite(t.float()).all() for t in fp8_lora.values())


def test_fp8_matmul_on_a_bf16_model_names_the_setting_and_the_fix(comfy, files):
    g = graph({"advanced": ["advanced", 0]})
    g["load"]["inputs"]["weight_dtype"] = "bf16"
    g["advanced"] = advanced("on")
    g["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "fp8bad/lora"}}
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(g)
    message = caught.value.message
    assert "Dev2ProTrainLoRA (advanced: fp8_matmul): fp8_matmul 'on' needs the model loaded in fp8 e4m3fn" in message
    assert "Set fp8_matmul to off" in message
    assert not os.path.exists(comfy.path("loras", "fp8bad"))


@pytest.mark.parametrize("inputs, where, words", [
    ({"warmup_steps": 10}, "warmup_steps", "warmup_steps must be below steps (4)"),
    ({"blocks_to_swap": 2, "gradient_checkpointing": False}, "blocks_to_swap", "blocks_to_swap needs gradient_checkpointing on"),
    ({"advanced": {"logit_mean": float("nan")}}, "advanced: logit_mean", "logit_mean must be a finite number"),
])
def test_settings_that_do_not_fit_together_name_their_input(comfy, files, inputs, where, words):
    settings = dict(inputs)
    g = graph(settings)
    if "advanced" in settings:
        g["advanced"] = advanced("off")
        g["advanced"]["inputs"].update(settings["advanced"])
        g["train"]["inputs"]["advanced"] = ["advanced", 0]
    g["curve"] = {"class_type": "PreviewImage", "inputs": {"images": ["train", 1]}}
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(g)
    assert caught.value.message.startswith(f"Dev2ProTrainLoRA ({where}): {words}"), caught.value.message


def test_a_finished_run_is_handed_on_when_comfyui_runs_the_node_again(comfy, files):
    """ComfyUI's default cache from 0.33 on drops outputs under RAM pressure and re-runs the dropped nodes, loaders
    included, when the graph is queued again: a fresh executor is that, at its most. The same inputs must not train
    for hours again; other inputs, and a re-run after Cancel (test_training), do."""
    from comfy_inprocess import prompt_executor

    def trained_steps(g):
        comfy.run(g)
        return [d["step"] for e, d in comfy.server.messages if e == "dev2pro.train.step"]

    g = graph({"seed": 11})
    g["save"] = {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "memo/first"}}
    executor = comfy.executor
    try:
        assert trained_steps(g) == [1, 2, 3, 4]
        comfy.executor = prompt_executor(comfy.server)  # every cached output gone
        g["save"]["inputs"]["filename_prefix"] = "memo/again"
        assert trained_steps(g) == []
        first, again = (load_file(comfy.path("loras", "memo", f"{n}_00001.safetensors")) for n in ("first", "again"))
        assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
        g["train"]["inputs"]["learning_rate"] = 2e-3
        assert trained_steps(g) == [1, 2, 3, 4]
    finally:
        comfy.executor = executor
