"""The training core on tiny random Flux models: it learns, it changes only the adapter, it leaves the shared
MODEL exactly as it was, and it is reproducible. Run under torch.inference_mode() as ComfyUI's executor runs nodes."""
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy.model_management
import comfy.utils
import graphs
from conftest import ExecutionFailed, forward
from conftest import latent_dataset as dataset
from conftest import load_flux as load
from conftest import train_tiny as train
import random_models
from comfy import model_management as comfy_model_management
from comfy import utils as comfy_utils


@pytest.fixture(scope="module")
def model_file(comfy):
    return random_models.write_flux(comfy.path("diffusion_models", "train_core.safetensors"), seed=21)


def velocity_loss(patcher, data, pairs=16):
    """Velocity MSE over fixed (noise, t) draws: the training objective, measured without sampling noise."""
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    model = patcher.model
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        for sample in data.samples:
            x0 = model.process_latent_in(sample.latent[None])
            for _ in range(pairs):
                noise, t = torch.randn(x0.shape, generator=g), torch.rand(1, generator=g)
                xt = (1 - t) * x0 + t * noise
                v = model.diffusion_model(xt, t, sample.context[None], sample.pooled[None], torch.tensor([1.0]))
                total += torch.nn.functional.mse_loss(v, noise - x0).item()
    return total / (len(data) * pairs)


def test_training_changes_only_the_adapter_and_leaves_the_model_as_it_was(core, model_file):
    patcher = load(core, model_file)
    transformer = patcher.model.diffusion_model
    weights_before = {k: v.clone() for k, v in transformer.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in transformer.named_modules()]
    attributes_before = set(vars(transformer))
    output_before = forward(patcher)

    result = train(core, patcher, dataset(core), steps=6)

    assert all(up.abs().sum() > 0 for up in result.weights.up.values()), "every adapter must have been trained"
    weights_after = transformer.state_dict()
    assert weights_after.keys() == weights_before.keys()
    assert all(torch.equal(weights_after[k], weights_before[k]) for k in weights_before)
    assert [(n, type(m)) for n, m in transformer.named_modules()] == modules_before
    assert set(vars(transformer)) == attributes_before
    assert not any(p.requires_grad for p in transformer.parameters())
    assert torch.equal(forward(patcher), output_before), "the shared MODEL must sample bit-identically after training"


def test_adapter_targets_are_the_block_linears(core, model_file):
    result = train(core, load(core, model_file), dataset(core), steps=1)
    expected = {f"double_blocks.0.{s}_{m}" for s in ("img", "txt")
                for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    expected |= {"single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin"}
    assert set(result.weights.down) == expected
    assert result.weights.down["double_blocks.0.img_attn.qkv"].shape == (4, 64)
    assert result.weights.up["double_blocks.0.img_attn.qkv"].shape == (192, 4)


def test_training_lowers_the_loss_on_a_small_overfit_set(comfy, core, model_file):
    patcher = load(core, model_file, torch.bfloat16)
    data = dataset(core, images=1, seed=5)
    before = velocity_loss(patcher, data)
    result = train(core, patcher, data, steps=60, learning_rate=3e-3, rank=8, alpha=8.0)
    lora = core.lora_format.TrainedLoRA(result.weights.to_kohya(torch.float32), {})
    with torch.inference_mode():
        trained = comfy.pack.nodes.Dev2ProApplyLoRA.execute(patcher, lora, 1.0).result[0]
    after = velocity_loss(trained, data)
    assert after < 0.8 * before, (before, after)
    assert velocity_loss(patcher, data) == before, "applying the LoRA must not change the base MODEL"


def test_same_seed_same_adapter_bit_for_bit(core, model_file):
    data = dataset(core, images=2)
    a = train(core, load(core, model_file), data, seed=7).weights
    b = train(core, load(core, model_file), data, seed=7).weights
    c = train(core, load(core, model_file), data, seed=8).weights
    assert all(torch.equal(a.up[k], b.up[k]) and torch.equal(a.down[k], b.down[k]) for k in a.up)
    assert any(not torch.equal(a.up[k], c.up[k]) for k in a.up)


def test_gradient_checkpointing_gives_the_same_adapter(core, model_file):
    data = dataset(core, images=2)
    a = train(core, load(core, model_file), data, gradient_checkpointing=True).weights
    b = train(core, load(core, model_file), data, gradient_checkpointing=False).weights
    assert all(torch.allclose(a.up[k], b.up[k], rtol=0, atol=1e-6) for k in a.up)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be 1..100000, got 0"),
    ("rank", 0, "rank must be 1..256"),
    ("learning_rate", 0.0, "learning_rate must be 1e-08..10.0, got 0.0"),
    ("optimizer", "sgd", "optimizer must be one of adamw, adafactor, prodigy"),
    ("warmup_steps", 1200, "warmup_steps must be below steps (1000)"),
    ("caption_dropout", 1.0, "caption_dropout must be 0.0..0.99, got 1.0"),
])
def test_bad_settings_are_refused_before_any_work(core, field, value, message):
    with pytest.raises(core.config.SettingError, match=re.escape(message)) as error:
        core.training.TrainConfig(**{field: value}).validate()
    assert error.value.input_name == field


def test_dataset_that_does_not_fit_the_model_is_refused(core, model_file):
    g = torch.Generator().manual_seed(0)
    wrong = core.dataset.TrainingDataset.from_batches(torch.randn(1, 16, 8, 8, generator=g),
                                                      [(torch.randn(6, 4096, generator=g), torch.randn(32, generator=g))])
    with pytest.raises(ValueError, match="Flux DualCLIPLoader"):
        train(core, load(core, model_file), wrong)



def test_train_node_reports_every_step_to_the_front_end(comfy, model_file, monkeypatch):
    bar = []  # main.py installs this hook to forward ProgressBar updates to the UI; record what reaches it
    monkeypatch.setattr(comfy_utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: bar.append((node_id, value, total)))
    outputs = comfy.run(graphs.training_graph("train_core.safetensors", steps=3, prefix="events/lora"))
    assert outputs["save"]["lora_files"]
    steps = [data for event, data in comfy.server.messages if event == "dev2pro.train.step"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(s["node"] == "train" and s["total"] == 3 for s in steps)
    assert all(s["loss"] > 0 and s["seconds_per_step"] > 0 and s["learning_rate"] == 1e-3 for s in steps)
    shown = [b for b in bar if b[0] == "train"]
    if hasattr(comfy_utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):  # 0.33+: first, last, and 0.1 s / 0.5 % apart
        assert shown[0] == ("train", 1, 3) and shown[-1] == ("train", 3, 3)
        assert [v for _, v, _ in shown] == sorted(set(v for _, v, _ in shown))
    else:
        assert shown == [("train", 1, 3), ("train", 2, 3), ("train", 3, 3)]


def press_at(comfy, monkeypatch, step, action, node="train"):
    """Record the events; at ``node``'s step ``step`` (first time only) call ``action()``, as a user would press a
    button while that step's event reaches the browser. Returns the (node, step) pairs seen."""
    steps, record, pressed = [], comfy.server.send_sync, []

    def on_event(event, data, sid=None):
        record(event, data, sid)
        if event == "dev2pro.train.step":
            steps.append((data["node"], data["step"]))
            if data["node"] == node and data["step"] == step and not pressed:
                pressed.append(True)
                action()

    monkeypatch.setattr(comfy.server, "send_sync", on_event)
    return steps


def statuses(comfy, node="train"):
    return [d for e, d in comfy.server.messages if e == "dev2pro.train.status" and d["node"] == node]


def rescue_files(comfy, stem):
    folder = comfy.path("loras", "dev2pro-rescue")
    return sorted(f for f in os.listdir(folder) if f.startswith(stem) and f.endswith(".safetensors")) \
        if os.path.isdir(folder) else []


def test_stop_and_save_ends_after_the_current_step_and_the_graph_goes_on(comfy, model_file, monkeypatch):
    runs = comfy.pack.core.live_runs.RUNS
    steps = press_at(comfy, monkeypatch, 2, lambda: runs.request_stop(node="train"))
    outputs = comfy.run(graphs.training_graph("train_core.safetensors", steps=5, prefix="stop/lora"))
    assert steps == [("train", 1), ("train", 2)]
    [name] = outputs["save"]["lora_files"]
    with safe_open(comfy.path("loras", name), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "2"
        assert f.metadata()["dev2pro_stopped_early"] == "stopped by Stop & save at step 2 of 5"
    # the panel is told the run stopped, and then the file Save LoRA wrote from it
    last = statuses(comfy)[-1]
    assert last["status"] == "stopped" and last["message"] == "stopped at step 2 of 5"
    assert last["saved"] == [f"models/loras/{name}"]
    assert runs.get("train").summary()["losses"][-1][0] == 2
    # queued again, the node trains again instead of reusing the shortened result
    steps.clear()
    comfy.run(graphs.training_graph("train_core.safetensors", steps=5, prefix="stop/lora"))
    assert steps == [("train", s) for s in range(1, 6)]
    assert statuses(comfy)[-2]["status"] == "finished"


def test_cancel_stops_the_graph_and_keeps_the_adapter_as_a_rescue_file(comfy, model_file, monkeypatch):
    steps = press_at(comfy, monkeypatch, 2, lambda: comfy_model_management.interrupt_current_processing(True))
    try:
        with pytest.raises(ExecutionFailed):
            comfy.run(graphs.training_graph("train_core.safetensors", steps=5, prefix="cancel/lora", seed=43))
    finally:
        comfy_model_management.interrupt_current_processing(False)
    assert steps == [("train", 1), ("train", 2)]
    assert "execution_interrupted" in [event for event, _ in comfy.server.messages]
    assert not os.path.exists(comfy.path("loras", "cancel")), "Cancel stops the graph: Save LoRA does not run"
    [rescued] = rescue_files(comfy, "cancelled_step_00002")
    with safe_open(comfy.path("loras", "dev2pro-rescue", rescued), framework="pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["dev2pro_stopped_early"] == "cancelled at step 2 of 5"
    assert os.path.exists(comfy.path("loras", "dev2pro-rescue", rescued[: -len(".safetensors")] + ".dev2pro-state"))
    last = statuses(comfy)[-1]
    assert last["status"] == "cancelled" and f"saved as models/loras/dev2pro-rescue/{rescued}" in last["message"]
    # queued again, it trains again: ComfyUI keeps no result of an interrupted node
    steps.clear()
    comfy.run(graphs.training_graph("train_core.safetensors", steps=5, prefix="cancel/lora", seed=43))
    assert steps == [("train", s) for s in range(1, 6)]


def test_cancel_as_training_starts_stops_the_graph_and_saves_nothing(comfy, model_file, monkeypatch):
    press_at(comfy, monkeypatch, 1, lambda: comfy_model_management.interrupt_current_processing(True))
    try:
        with pytest.raises(ExecutionFailed):
            comfy.run(graphs.training_graph("train_core.safetensors", steps=5, prefix="cancel_start/lora", seed=41))
    finally:
        comfy_model_management.interrupt_current_processing(False)
    assert "execution_interrupted" in [event for event, _ in comfy.server.messages]
    assert not os.path.exists(comfy.path("loras", "cancel_start"))
    assert rescue_files(comfy, "cancelled_step_00001") == [], "one step is not worth a file"
    assert statuses(comfy)[-1]["status"] == "cancelled"


def test_stop_and_save_leaves_other_finished_trainings_cached(comfy, model_file, monkeypatch):
    """Queued again after one trainer was stopped early, only that one trains again: the other's finished adapter
    is reused from ComfyUI's cache and its Save LoRA writes no second file."""
    graph = graphs.training_graph("train_core.safetensors", steps=3, prefix="stop_one/other", seed=31)
    stopped = graphs.training_graph("train_core.safetensors", steps=3, prefix="stop_one/stopped", seed=32)
    for node_id, node in stopped.items():  # a second chain of nodes, "c_"-prefixed, linked among themselves
        inputs = {k: [f"c_{v[0]}", v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        graph[f"c_{node_id}"] = {**node, "inputs": inputs}
    runs = comfy.pack.core.live_runs.RUNS
    steps = press_at(comfy, monkeypatch, 2, lambda: runs.request_stop(node="c_train"), node="c_train")
    comfy.run(graph)
    first = list(steps)
    steps.clear()
    comfy.run(graph)
    assert ("c_train", 2) in first and ("c_train", 3) not in first and ("train", 3) in first
    assert steps == [("c_train", 1), ("c_train", 2), ("c_train", 3)], "only the stopped run trains again"
    assert sorted(os.listdir(comfy.path("loras", "stop_one"))) == [
        "other_00001.safetensors", "stopped_00001.safetensors", "stopped_00002.safetensors"]


def test_cancel_raised_inside_an_op_keeps_the_last_completed_step(comfy, model_file, monkeypatch):
    """ComfyUI 0.33+ raises Cancel from inside any op's forward (comfy.ops run_every_op), mid-step. The step in
    flight is dropped and the rescue file holds the adapter of the last completed step. On 0.3.x, whose ops do not
    check, a forward hook raises it the same way."""
    steps = press_at(comfy, monkeypatch, 0, lambda: None)

    def cancel_inside_step_three(module, args):
        if len(steps) == 2:
            comfy_model_management.interrupt_current_processing(True)
            comfy_model_management.throw_exception_if_processing_interrupted()  # what 0.33's ops do

    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: cancel_inside_step_three(module, args) if type(module).__name__ == "SingleStreamBlock"
        else None)
    try:
        with pytest.raises(ExecutionFailed):
            comfy.run(graphs.training_graph("train_core.safetensors", steps=5, prefix="cancel_op/lora", seed=3))
    finally:
        handle.remove()
        comfy_model_management.interrupt_current_processing(False)
    # the step in flight when Cancel came is dropped: step 3 with the loss read at once, step 4 where it is read one
    # step late (fused AdamW), since step 3's update had been queued already
    last = steps[-1][1]
    assert [s for _, s in steps] == list(range(1, last + 1)) and last in (2, 3)
    [rescued] = rescue_files(comfy, f"cancelled_step_{last:05d}")
    stopped = load_file(comfy.path("loras", "dev2pro-rescue", rescued))
    reference_graph = graphs.training_graph("train_core.safetensors", steps=5, prefix="cancel_op/ref", seed=3)
    reference_graph["train"]["inputs"]["stop_at_step"] = last
    [name] = comfy.run(reference_graph)["save"]["lora_files"]
    reference = load_file(comfy.path("loras", name))
    assert all(torch.equal(stopped[k], reference[k]) for k in reference), "the adapter must be the last completed step's"
    assert not comfy_model_management.processing_interrupted()


def test_stopping_early_leaves_the_model_as_it_was(core, model_file):
    patcher = load(core, model_file)
    before = forward(patcher)
    config = core.training.TrainConfig(steps=6, learning_rate=1e-3, rank=4, alpha=4.0)
    seen = []
    with torch.inference_mode():
        result = core.training.train_lora(patcher, dataset(core), config, seen.append, should_stop=lambda: len(seen) == 2)
    assert result.stopped_early and result.state.step == 2 and len(result.losses) == 2
    assert torch.equal(forward(patcher), before)
