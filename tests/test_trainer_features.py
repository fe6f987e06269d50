"""The trainer's settings on tiny random Flux models, observed from outside: the learning rate each step used,
the timesteps drawn, what the model was fed (hooked), the adapters produced, and the files written."""
import math

import pytest
import torch

import random_models
from conftest import assert_same_adapter
from conftest import load_flux as load
from conftest import train_tiny as train


@pytest.fixture(scope="module")
def model_file(comfy):
    return random_models.write_flux(comfy.path("diffusion_models", "features.safetensors"), seed=31)


def make_dataset(core, sizes=((8, 8),) * 4, seed=0, empty_caption=False):
    g = torch.Generator().manual_seed(seed)
    samples = [core.dataset.TrainingSample(torch.randn(16, h, w, generator=g), torch.randn(6, 48, generator=g),
                                           torch.randn(32, generator=g)) for h, w in sizes]
    empty = (torch.zeros(6, 48), torch.zeros(32)) if empty_caption else None
    return core.dataset.TrainingDataset(samples, empty_caption=empty)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_each_learning_rate_schedule_reaches_the_optimizer_step_by_step(core, model_file, schedule, expected):
    patcher, seen = load(core, model_file), []
    train(core, patcher, make_dataset(core), seen.append, steps=6, warmup_steps=2, lr_schedule=schedule, learning_rate=1e-3)
    assert [info.learning_rate for info in seen] == pytest.approx([1e-3 * e for e in expected])


@pytest.mark.parametrize("mode, settings, tokens, median", [
    ("uniform", {}, 1024, 0.5),
    ("sigmoid", {"sigmoid_scale": 2.0}, 1024, 0.5),
    ("logit_normal", {"logit_mean": 1.0, "logit_std": 0.5}, 1024, 1 / (1 + math.exp(-1.0))),
    ("shift", {"shift": 3.0}, 1024, 0.75),
    ("flux_shift", {}, 4096, math.exp(1.15) * 0.5 / (1 + (math.exp(1.15) - 1) * 0.5)),
    ("flux_shift", {}, 256, math.exp(0.5) * 0.5 / (1 + (math.exp(0.5) - 1) * 0.5)),
])
def test_timestep_sampling_modes(core, mode, settings, tokens, median):
    config = core.training.TrainConfig(timestep_sampling=mode, **settings)
    t = core.schedules.sample_timesteps(config, 20000, tokens, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(median, abs=0.01)


def test_sigmoid_scale_spreads_timesteps(core):
    narrow = core.schedules.sample_timesteps(core.training.TrainConfig(timestep_sampling="sigmoid"), 20000, 1024,
                                             torch.Generator().manual_seed(0))
    wide = core.schedules.sample_timesteps(core.training.TrainConfig(timestep_sampling="sigmoid", sigmoid_scale=3.0),
                                           20000, 1024, torch.Generator().manual_seed(0))
    assert wide.std() > narrow.std() * 1.5


def test_each_batch_row_trains_with_its_own_caption(core, model_file):
    """Hook the transformer: row i of the text input is the caption of the sample in row i (ComfyUI's own trainer
    mixes captions across a batch)."""
    patcher = load(core, model_file)
    data = make_dataset(core, sizes=[(8, 8)] * 3 + [(8, 12)] * 3)
    calls, steps = [], []

    def record(module, args, kwargs):
        calls.append((args[0].shape, args[2].detach().clone(), kwargs["y"].detach().clone()))

    hook = patcher.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        train(core, patcher, data, steps.append, steps=6, batch_size=2)
    finally:
        hook.remove()
    assert len(calls) == 6
    sizes = set()
    for (shape, context, pooled), info in zip(calls, steps):
        assert context.shape[0] == len(info.samples) and shape[0] == len(info.samples)
        for row, index in enumerate(info.samples):
            assert torch.equal(context[row].float(), data.samples[index].context)
            assert torch.equal(pooled[row].float(), data.samples[index].pooled)
        assert len({tuple(data.samples[i].latent.shape) for i in info.samples}) == 1  # one bucket per batch
        sizes.add(tuple(shape[-2:]))
    assert sizes == {(8, 8), (8, 12)}


def test_every_sample_is_drawn_repeats_times_per_epoch(core):
    data = make_dataset(core, sizes=[(8, 8)] * 3 + [(8, 12)] * 2)
    data.samples[0].repeats = 3
    batches = core.dataset.epoch_batches(data, 2, seed=5, epoch=0)
    drawn = sorted(i for batch in batches for i in batch)
    assert drawn == [0, 0, 0, 1, 2, 3, 4]
    assert all(len({tuple(data.samples[i].latent.shape) for i in b}) == 1 for b in batches)
    assert core.dataset.epoch_batches(data, 2, seed=5, epoch=1) != batches or len(batches) == 1


def test_caption_dropout_feeds_the_empty_caption(core, model_file):
    patcher = load(core, model_file)
    data = make_dataset(core, empty_caption=True)
    contexts = []
    hook = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: contexts.append(a[2].clone()))
    try:
        train(core, patcher, data, steps=40, caption_dropout=0.5)
    finally:
        hook.remove()
    dropped = sum(bool((c == 0).all()) for c in contexts)
    assert 8 <= dropped <= 32


def test_caption_dropout_without_an_empty_caption_is_refused(core, model_file):
    with pytest.raises(ValueError, match="caption_dropout needs"):
        train(core, load(core, model_file), make_dataset(core), caption_dropout=0.1)


ALL_FEATURES = dict(steps=5, batch_size=2, gradient_accumulation=2, caption_dropout=0.3, loss="huber",
                    lr_schedule="cosine", warmup_steps=1, timestep_sampling="logit_normal", max_grad_norm=0.5)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "prodigy"])
def test_same_inputs_and_seed_give_the_same_adapter_bit_for_bit(core, model_file, optimizer):
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    runs = [train(core, load(core, model_file), make_dataset(core, empty_caption=True), optimizer=optimizer,
                  learning_rate=lr, seed=9, **ALL_FEATURES) for _ in range(2)]
    assert_same_adapter(runs[0].weights, runs[1].weights)
    assert runs[0].losses == runs[1].losses
    other = train(core, load(core, model_file), make_dataset(core, empty_caption=True), optimizer=optimizer,
                  learning_rate=lr, seed=10, **ALL_FEATURES)
    assert not torch.equal(other.weights.up[next(iter(other.weights.up))], runs[0].weights.up[next(iter(other.weights.up))])


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", "prodigy"])
def test_resumed_from_a_saved_state_equals_uninterrupted_training(core, model_file, optimizer, tmp_path):
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    config = core.training.TrainConfig(rank=4, alpha=4.0, learning_rate=lr, optimizer=optimizer, seed=3, **ALL_FEATURES)
    data = make_dataset(core, empty_caption=True)
    with torch.inference_mode():
        whole = core.training.train_lora(load(core, model_file), data, config)
        first = core.training.train_lora(load(core, model_file), data, config, stop_at=2)
    assert first.state.step == 2 and len(first.losses) == 2
    path = core.lora_format.save_training_state(
        str(tmp_path / "run.dev2pro-state"), first.state.config.to_dict(), first.state.step, first.state.adapter,
        first.state.optimizer, first.state.losses, {})
    parts = core.lora_format.load_training_state(path)
    state = core.training.TrainingState(core.training.TrainConfig.from_dict(parts["config"]), parts["step"],
                                        parts["adapter"], parts["optimizer"], parts["losses"])
    with torch.inference_mode():
        rest = core.training.train_lora(load(core, model_file), data, state.config, resume=state)
    assert_same_adapter(rest.weights, whole.weights)
    assert rest.losses == whole.losses


def test_resuming_with_another_rank_is_refused(core, model_file):
    first = train(core, load(core, model_file), make_dataset(core), steps=4, stop_at=0)
    config = core.training.TrainConfig(steps=8, rank=8, alpha=8.0)
    with pytest.raises(ValueError, match="made with rank=4"):
        core.training.train_lora(load(core, model_file), make_dataset(core), config, resume=first.state)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])  # a NaN step skipped on the device, or on the host
def test_a_nan_loss_stops_training_and_keeps_the_last_good_adapter(core, model_file, optimizer):
    data = make_dataset(core, sizes=[(8, 8)] * 2)
    plan = core.dataset.BatchPlan(data, 1, 0)
    first_bad = next(k + 1 for k in range(20) if plan.batch(k) != plan.batch(0))  # the step that first draws the
    data.samples[plan.batch(first_bad - 1)[0]].latent[0, 0, 0] = float("nan")     # other sample, which is broken
    with pytest.raises(core.training.NonFiniteLoss) as caught:
        train(core, load(core, model_file), data, steps=20, optimizer=optimizer)
    assert caught.value.step == first_bad and caught.value.what == "loss"
    kept = caught.value.result
    assert kept.state.step == first_bad - 1
    before = train(core, load(core, model_file), data, steps=20, stop_at=first_bad - 1, optimizer=optimizer)
    assert_same_adapter(kept.weights, before.weights)
    assert all(torch.isfinite(t).all() for t in kept.weights.down.values())


def test_gradient_accumulation_runs_that_many_micro_batches_per_step(core, model_file):
    patcher, calls, steps = load(core, model_file), [], []
    hook = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        train(core, patcher, make_dataset(core), steps.append, steps=3, gradient_accumulation=3, batch_size=2)
    finally:
        hook.remove()
    assert len(steps) == 3 and calls == [2] * 9
