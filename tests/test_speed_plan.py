"""The speed plan (core.speed_plan): every speed decision of a run made once, from its settings and its device, and
changed only through ``train_lora(speed=...)`` for that one run."""
import pytest
import torch

import random_models
from conftest import latent_dataset
from conftest import load_flux as load
from conftest import train_tiny as train


@pytest.fixture(scope="module")
def model_file(comfy):
    return random_models.write_flux(comfy.path("diffusion_models", "speed_plan.safetensors"), seed=47)


def test_a_gpu_run_takes_every_speed_path_and_a_cpu_run_none(core):
    config = core.training.TrainConfig()
    gpu = core.speed_plan.plan(config, torch.device("cuda"))
    assert gpu.compiled and gpu.checkpointing and gpu.recompute_in_compiled_backward
    assert gpu.step_graphs and gpu.pinned_inputs
    assert (gpu.attention, gpu.attention_in_swap) == ("cudnn_first", "no_cudnn")
    assert gpu.offload_inputs_from_tokens == core.speed_plan.OFFLOAD_INPUTS_FROM_TOKENS
    cpu = core.speed_plan.plan(config, torch.device("cpu"))
    assert not (cpu.compiled or cpu.step_graphs or cpu.pinned_inputs or cpu.cpp_wrapper)
    assert (cpu.attention, cpu.attention_in_swap, cpu.offload_inputs_from_tokens) == ("comfyui", "comfyui", None)


def test_the_settings_decide_their_part_of_the_plan(core):
    config = core.training.TrainConfig(compile="off", fp8_matmul="on", blocks_to_swap=5)
    gpu = core.speed_plan.plan(config, torch.device("cuda"))
    assert not gpu.compiled and gpu.fp8_matmul and gpu.blocks_to_swap == 5
    budgets = core.speed_plan.RECOMPUTE_MEMORY_BUDGETS
    assert gpu.recompute_budgets == {(kind, off): budgets[kind, True, off] for kind in ("double", "single")
                                     for off in (False, True)}, "fp8_matmul's budgets"
    assert core.speed_plan.plan(core.training.TrainConfig(compile="on"), torch.device("cpu")).compiled


def test_fp8_matmul_auto_is_on_only_for_an_fp8_base_on_a_gpu_that_runs_fp8_matmuls(core, monkeypatch):
    """The default: an RTX 40xx / H100 with an fp8 base gets fp8 matmuls; an RTX 3090, a bf16 base or the CPU get
    bf16 matmuls and no error (fp8_matmul on raises there instead)."""
    config = core.training.TrainConfig()
    assert config.fp8_matmul == "auto"
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))  # RTX 4090
    fp8 = core.speed_plan.plan(config, cuda, fp8_base=True)
    budgets = core.speed_plan.RECOMPUTE_MEMORY_BUDGETS
    assert fp8.fp8_matmul and fp8.recompute_budgets[("double", False)] == budgets["double", True, False]
    assert not core.speed_plan.plan(config, cuda, fp8_base=False).fp8_matmul
    assert not core.speed_plan.plan(config, torch.device("cpu"), fp8_base=True).fp8_matmul
    assert not core.speed_plan.plan(core.training.TrainConfig(fp8_matmul="off"), cuda, fp8_base=True).fp8_matmul
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # RTX 3090
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    assert not core.speed_plan.plan(config, cuda, fp8_base=True).fp8_matmul
    assert core.speed_plan.plan(core.training.TrainConfig(fp8_matmul="on"), cuda, fp8_base=True).fp8_matmul


def test_overrides_replace_single_decisions_and_unknown_ones_are_refused(core):
    config = core.training.TrainConfig()
    gpu = core.speed_plan.plan(config, torch.device("cuda"), step_graphs=False,
                               recompute_budgets={("double", True): 0.2})
    assert not gpu.step_graphs and gpu.pinned_inputs
    assert gpu.recompute_budgets[("double", True)] == 0.2
    assert gpu.recompute_budgets[("single", True)] == core.speed_plan.RECOMPUTE_MEMORY_BUDGETS["single", False, True]
    with pytest.raises(TypeError, match="unknown speed override step_graph"):
        core.speed_plan.plan(config, torch.device("cuda"), step_graph=False)
    with pytest.raises(ValueError, match="attention must be one of cudnn_first, no_cudnn, comfyui, got 'fa3'"):
        core.speed_plan.plan(config, torch.device("cuda"), attention="fa3")
    assert gpu.describe()["recompute_budgets"]["double offloaded"] == 0.2  # JSON-ready for benchmark rows


def test_a_runs_overrides_reach_its_model_and_end_with_it(core, model_file, monkeypatch, caplog):
    """Overrides are arguments of one run, not settings of the process: the next run plans afresh."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return core.blocks.attention_cudnn_first(*args, **kwargs)

    monkeypatch.setitem(core.blocks.ATTENTION, "cudnn_first", recording)
    data = latent_dataset(core)
    with caplog.at_level("INFO", logger="dev2pro-lora"):
        overridden = train(core, load(core, model_file), data, steps=2, speed={"attention": "cudnn_first"})
    assert calls, "the run's attention went through the override it was given"
    assert overridden.speed["plan"]["attention"] == "cudnn_first"  # the run reports the plan it ran with
    assert "training from the start: eager, checkpointed, attention cudnn_first" in caplog.text
    calls.clear()
    plain = train(core, load(core, model_file), data, steps=2)
    assert not calls, "the next run did not inherit the override"
    assert overridden.losses == pytest.approx(plain.losses, rel=1e-5)  # the same attention, another kernel order
    with pytest.raises(TypeError, match="unknown speed override"):
        train(core, load(core, model_file), data, steps=2, speed={"graphs": False})
