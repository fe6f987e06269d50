"""The speed and memory paths on tiny random Flux models: block swap (low-VRAM mode), compiled blocks, and the
deferred loss read. Each must give the adapter of the plain path and leave the shared MODEL as it was."""
import re

import pytest
import torch

import random_models
from conftest import assert_same_adapter, forward, latent_dataset
from conftest import load_flux as load
from conftest import train_tiny as train


@pytest.fixture(scope="module")
def model_file(comfy):
    return random_models.write_flux(comfy.path("diffusion_models", "speed.safetensors"), seed=41)


def base_tensors(patcher):
    return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def test_block_swap_trains_the_same_adapter_and_puts_every_weight_back(core, model_file, monkeypatch):
    data = latent_dataset(core, images=2)
    plain = train(core, load(core, model_file), data, steps=3)
    patcher = load(core, model_file)
    before, output = base_tensors(patcher), forward(patcher)
    entered = []
    monkeypatch.setattr(core.block_swap.BlockSwap, "enter",
                        lambda self, i, original=core.block_swap.BlockSwap.enter: (entered.append(i), original(self, i)))
    swapped = train(core, patcher, data, steps=3, blocks_to_swap=2)
    assert_same_adapter(plain.weights, swapped.weights)
    blocks = len(patcher.model.diffusion_model.double_blocks) + len(patcher.model.diffusion_model.single_blocks)
    one_step = list(range(blocks)) + list(reversed(range(blocks)))  # forward, then backward's recomputation
    assert entered == one_step * 3
    after = patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].device == after[k].device for k in before)
    assert torch.equal(forward(patcher), output)


def test_block_swap_holds_at_most_two_blocks_and_fetches_the_next_one_ahead(core, model_file):
    patcher = load(core, model_file)
    transformer = patcher.model.diffusion_model
    blocks = list(transformer.double_blocks) + list(transformer.single_blocks)
    swap = core.block_swap.BlockSwap(blocks, list(range(len(blocks))), torch.device("cpu"))
    try:
        order = list(range(len(blocks))) + list(reversed(range(len(blocks))))
        prefetched = []
        for step in range(2):
            for i in order:
                prefetched.append(i in swap.loaded)  # a copy issued before the block was reached
                swap.enter(i)
                assert i in swap.loaded and len(swap.loaded) <= 2
        # once the order is known (the step boundary is seen in the second step), every block is on its way
        # before it is reached
        assert all(prefetched[2 * len(order):])
    finally:
        swap.restore()


def assert_compiled_trains_like_eager(core, model_file, steps, speed=None, **settings):
    """A compiled run (with ``settings`` and SpeedPlan overrides ``speed``) against eager on the same data: the same
    losses and adapter within float tolerance, and the shared MODEL left as it was."""
    data = latent_dataset(core, images=2)
    eager = train(core, load(core, model_file), data, steps=steps, compile="off")
    patcher = load(core, model_file)
    output = forward(patcher)
    compiled = train(core, patcher, data, steps=steps, compile="on", speed=speed, **settings)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    for name in eager.weights.up:
        assert torch.allclose(compiled.weights.up[name], eager.weights.up[name], rtol=1e-3, atol=1e-6), name
    assert torch.equal(forward(patcher), output)


def test_compiled_blocks_train_like_eager(core, model_file):
    assert_compiled_trains_like_eager(core, model_file, steps=3)


def test_block_inputs_offloaded_between_forward_and_backward_train_like_eager(core, model_file, monkeypatch):
    """Block inputs leave device memory after their block's forward and are back, fetched one block ahead, when
    their block's backward recomputes it; training is unchanged."""
    offload = core.input_offload.BlockInputOffload
    monkeypatch.setattr(offload, "KEEP_LAST", 0)  # the tiny model has two blocks: park both
    parked, ahead, inputs_of = [], [], {}

    def park(self, index, inputs, outputs, original=offload.park):
        original(self, index, inputs, outputs)
        if index in self.parked:
            parked.append(index)
            inputs_of[index] = inputs
        # a block's inputs have given their memory back once the next block is queued
        earlier = [t for i in self.parked if i < index for t in inputs_of[i]]
        assert earlier or index == 0
        assert all(t.untyped_storage().nbytes() == 0 for t in earlier), "inputs still hold their memory"

    def before_backward(self, index, original=offload._before_backward):
        original(self, index)
        assert index not in self.parked
        earlier = [i for i in self.parked if i < index]
        ahead.append(not earlier or self.parked[max(earlier)].back is not None)

    monkeypatch.setattr(offload, "park", park)
    monkeypatch.setattr(offload, "_before_backward", before_backward)
    # from 0 tokens on: this tiny step stands in for a GPU-sized one
    assert_compiled_trains_like_eager(core, model_file, steps=3, speed={"offload_inputs_from_tokens": 0})
    patcher = load(core, model_file)
    blocks = len(patcher.model.diffusion_model.double_blocks) + len(patcher.model.diffusion_model.single_blocks)
    assert blocks == 2 and parked == [0, 1] * 3
    assert len(ahead) == blocks * 3 and all(ahead)


def test_a_session_whose_step_graphs_cannot_be_captured_trains_on_eagerly_and_saves_a_plain_state(
        core, model_file, monkeypatch, caplog):
    """CUDA graphs of the step (core.step_graphs) are captured on a GPU only; here the capture itself fails, as it
    would for an op a graph cannot hold: the session goes on eagerly with the very same results, says why, and the
    optimizer and its saved state are as an eager session leaves them."""
    data = latent_dataset(core, images=2)
    eager = train(core, load(core, model_file), data, steps=5, compile="on")
    captures = []
    monkeypatch.setattr(core.step_graphs.GraphedSteps, "_capture",
                        lambda self, *args, original=core.step_graphs.GraphedSteps._capture:
                        captures.append(len(captures)) or original(self, *args))
    with caplog.at_level("WARNING", logger="dev2pro-lora"):  # on the CPU, torch.cuda.CUDAGraph() itself fails
        graphed = train(core, load(core, model_file), data, steps=5, compile="on", speed={"step_graphs": True})
    assert captures == [0], "one capture, at the session's third step, and no retry"
    assert "could not be captured" in caplog.text
    assert graphed.speed["step_graphs"] == ["failed"] and eager.speed["step_graphs"] == ["eager"]
    assert graphed.losses == eager.losses
    assert_same_adapter(graphed.weights, eager.weights)
    groups = graphed.state.optimizer["param_groups"]
    assert all(isinstance(g["lr"], float) and g["capturable"] is False for g in groups)


def test_loss_of_every_step_is_reported_in_order_though_read_a_step_late(core, model_file):
    seen = []
    result = train(core, load(core, model_file), latent_dataset(core, images=2), seen.append, steps=5)
    assert [info.step for info in seen] == [1, 2, 3, 4, 5]
    assert [info.loss for info in seen] == result.losses


@pytest.mark.parametrize("settings, message", [
    ({"blocks_to_swap": 3, "gradient_checkpointing": False}, "blocks_to_swap needs gradient_checkpointing on"),
    ({"blocks_to_swap": 58}, "blocks_to_swap must be 0..57"),
    ({"compile": "yes"}, "compile must be one of auto, on, off"),
    ({"fp8_matmul": "fast"}, "fp8_matmul must be one of auto, off, on"),
])
def test_bad_speed_settings_are_refused(core, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        core.training.TrainConfig(**settings).validate()


def test_swapping_more_blocks_than_the_model_has_is_refused(core, model_file):
    with pytest.raises(ValueError, match="this model has 2 blocks"):
        train(core, load(core, model_file), latent_dataset(core, images=2), steps=1, blocks_to_swap=5)


def test_compiled_blocks_with_block_swap_train_like_eager(core, model_file):
    # the low-VRAM path on a GPU: torch.utils.checkpoint around the compiled block, weights fetched per block
    assert_compiled_trains_like_eager(core, model_file, steps=2, blocks_to_swap=2)


def test_a_session_raises_the_recompile_limit_and_puts_compiler_settings_back(core, model_file):
    # ComfyUI trains many times in one process: at dynamo's default limit of 8 variants per function, the next
    # variant (another image size, fp8 on) would silently run the blocks eager, without recomputation
    seen = []
    limit, cpp_wrapper = torch._dynamo.config.recompile_limit, torch._inductor.config.cpp_wrapper
    train(core, load(core, model_file), latent_dataset(core), lambda info: seen.append(
        torch._dynamo.config.recompile_limit), steps=2)
    assert seen and all(during >= core.speed_plan.RECOMPILE_LIMIT for during in seen)
    assert (torch._dynamo.config.recompile_limit, torch._inductor.config.cpp_wrapper) == (limit, cpp_wrapper)


@pytest.mark.parametrize("compiler_found", [True, False])
def test_the_cpp_launcher_is_used_on_gpus_only_where_a_cpp_compiler_is(core, monkeypatch, compiler_found):
    # without g++ / MSVC (common on Windows ComfyUI installs), asking for it would fail the first compiled step
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler")

    if not compiler_found:
        monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    core.speed_plan.cpp_compiler_found.cache_clear()
    config = core.training.TrainConfig()
    try:
        gpu, cpu = (core.speed_plan.plan(config, torch.device(kind)) for kind in ("cuda", "cpu"))
    finally:
        core.speed_plan.cpp_compiler_found.cache_clear()
    before = torch._inductor.config.cpp_wrapper
    with core.blocks.compiler_settings(gpu):
        on_gpu = torch._inductor.config.cpp_wrapper
    with core.blocks.compiler_settings(cpu):
        on_cpu = torch._inductor.config.cpp_wrapper
    assert (on_gpu, on_cpu) == (compiler_found, False)
    assert torch._inductor.config.cpp_wrapper == before


@pytest.mark.parametrize("skip_reshape, skip_output_reshape, masked", [
    (True, False, False),  # how Flux calls it
    (False, False, True),
    (False, True, False),
])
@pytest.mark.parametrize("name", ["attention_without_cudnn", "attention_cudnn_first"])
def test_session_attention_computes_what_comfyuis_does(core, skip_reshape, skip_output_reshape, masked, name):
    """GPU sessions choose SDPA's attention backends through ComfyUI's optimized_attention_override hook (without
    cuDNN under block swap: the low-VRAM crash; cuDNN first otherwise, as 0.3.64 did and 0.33 no longer does); the
    replacement must compute the same attention for every calling form."""
    from comfy.ldm.modules.attention import attention_pytorch

    g = torch.Generator().manual_seed(0)
    heads, dim_head, tokens = 2, 16, 24
    shape = (1, heads, tokens, dim_head) if skip_reshape else (1, tokens, heads * dim_head)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    mask = torch.randn(tokens, tokens, generator=g) if masked else None
    options = dict(mask=mask, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    calls = []

    def override(*args, **kwargs):
        calls.append(args[0])
        return getattr(core.blocks, name)(*args, **kwargs)

    expected = attention_pytorch(q, k, v, heads, **options)
    routed = attention_pytorch(q, k, v, heads, transformer_options={"optimized_attention_override": override}, **options)
    assert len(calls) == 1
    assert routed.shape == expected.shape
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)


def test_blocks_see_no_per_block_options(core, comfy):
    """ComfyUI 0.33+ writes block_index, block_type, total_blocks and img_slice into transformer_options before each
    block. A compiled block that read them would be specialised per block index, and a block recomputed in backward
    would read the last block's values; the blocks get the options without them, forward and recomputation alike."""
    deeper = random_models.write_flux(comfy.path("diffusion_models", "speed_deeper.safetensors"),
                                      dict(random_models.TINY_FLUX, depth=2, depth_single_blocks=2), seed=43)
    seen = []
    patcher = load(core, deeper)
    transformer = patcher.model.diffusion_model
    hooks = [block.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw["transformer_options"])),
                                             with_kwargs=True)
             for block in list(transformer.double_blocks) + list(transformer.single_blocks)]
    try:
        train(core, patcher, latent_dataset(core), steps=2, compile="off")
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * 2 * 4  # two steps, forward and recomputation, four blocks
    assert all("patches_replace" in keys and not keys & set(core.comfy_compat.PER_BLOCK_OPTIONS) for keys in seen)
