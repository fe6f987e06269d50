"""fp8 matmuls for the fp8 base (Advanced setting ``fp8_matmul``): the layer, the loss curve it gives against the
plain compute path, and the usual promises (only the adapter trains, the shared MODEL is left as it was).

On the CPU the plain path computes in fp32, so the gap measured here is fp8's own rounding of activations and
gradients (the weights are e4m3fn in both runs); the H100 benchmark reports the gap to bf16 on full-size Flux."""
import pytest
import torch

import random_models
from conftest import forward, latent_dataset
from conftest import load_flux as load
from conftest import train_tiny as train

# Wider than the suite's tiny model: fp8's per-element rounding averages out over the matmul's inner dimension
# as it does in Flux (3072), so a 64-wide model would overstate the gap.
FP8_FLUX = dict(random_models.TINY_FLUX, hidden_size=256, num_heads=4, axes_dim=[8, 28, 28])


@pytest.fixture(scope="module")
def model_file(comfy):
    return random_models.write_flux(comfy.path("diffusion_models", "fp8_matmul.safetensors"), FP8_FLUX, seed=51,
                                    dtype=torch.float8_e4m3fn)


class Fp8Weight(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.float(), self.bias)


def relative_error(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("scaling", ["tensor", "row"])
def test_fp8_layer_matches_the_dequantized_matmul_in_value_and_input_gradient(core, scaling):
    # fp8 in the forward only; the input gradient is a bf16 (here fp32) matmul with the dequantized weight
    g = torch.Generator().manual_seed(0)
    linear = Fp8Weight((torch.randn(384, 256, generator=g) / 16).to(torch.float8_e4m3fn), torch.randn(384, generator=g))
    x = torch.randn(3, 50, 256, generator=g, requires_grad=True)
    upstream = torch.randn(3, 50, 384, generator=g)
    fp8 = core.fp8_matmul.Fp8BaseLinear(linear, torch.float32, rowwise=scaling == "row")

    out = fp8(x)
    (out * upstream).sum().backward()
    grad, x.grad = x.grad, None
    reference = linear(x)
    (reference * upstream).sum().backward()

    assert out.shape == reference.shape and out.dtype == torch.float32
    # e4m3fn keeps 3 mantissa bits: about 2-4% per element, averaged over the 256-wide (384-wide) sums
    assert relative_error(out, reference) < 0.03
    assert relative_error(grad, x.grad) < 1e-5
    assert relative_error(out, reference) > 0, "the fp8 path must actually run"


def test_fp8_layer_falls_back_to_the_layer_when_its_weight_is_not_resident_fp8(core):
    g = torch.Generator().manual_seed(1)
    linear = Fp8Weight(torch.randn(32, 16, generator=g).to(torch.bfloat16), torch.zeros(32))
    x = torch.randn(4, 16, generator=g)
    assert torch.equal(core.fp8_matmul.Fp8BaseLinear(linear, torch.float32)(x), linear(x))


def loss_gap(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_fp8_matmul_loss_curve_tracks_the_plain_path(core, model_file):
    """The stated tolerance: over a 40-step run, every step's loss within 2% of the plain path's, and the trained
    adapters' weight deltas pointing the same way (cosine similarity above 0.95)."""
    data = latent_dataset(core, images=2, seed=5)
    settings = dict(steps=40, learning_rate=2e-3, rank=8, alpha=8.0)
    plain = train(core, load(core, model_file), data, **settings)
    fp8 = train(core, load(core, model_file), data, fp8_matmul="on", **settings)

    gap = loss_gap(fp8.losses, plain.losses)
    print(f"fp8 vs plain: max per-step loss gap {gap:.4f}, losses {plain.losses[0]:.4f} -> {plain.losses[-1]:.4f}")
    assert gap < 0.02, gap
    assert fp8.losses != plain.losses, "the fp8 path must actually run"
    for name in plain.weights.up:
        a = plain.weights.up[name] @ plain.weights.down[name]
        b = fp8.weights.up[name] @ fp8.weights.down[name]
        cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
        assert cosine > 0.95, (name, cosine)


def test_fp8_matmul_changes_only_the_adapter_and_leaves_the_model_as_it_was(core, model_file):
    patcher = load(core, model_file)
    transformer = patcher.model.diffusion_model
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    modules = [(n, type(m)) for n, m in transformer.named_modules()]
    output = forward(patcher)
    train(core, patcher, latent_dataset(core), steps=2, fp8_matmul="on")
    after = transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, type(m)) for n, m in transformer.named_modules()] == modules
    assert torch.equal(forward(patcher), output)


def test_fp8_matmul_on_a_bf16_model_says_what_to_change(core, model_file):
    with pytest.raises(ValueError, match="fp8_matmul 'on' needs the model loaded in fp8 e4m3fn.*Set fp8_matmul to off"):
        train(core, load(core, model_file, torch.bfloat16), latent_dataset(core), steps=1, fp8_matmul="on")


def test_auto_finds_an_fp8_base_and_trains_a_bf16_one_with_bf16_matmuls(core, model_file):
    assert core.fp8_matmul.has_fp8_base(load(core, model_file).model.diffusion_model)
    bf16 = load(core, model_file, torch.bfloat16)
    assert not core.fp8_matmul.has_fp8_base(bf16.model.diffusion_model)
    data = latent_dataset(core)
    # fp8 matmuls planned (as auto on a GPU) over a base with no fp8 layer: auto trains as off, where on would raise
    auto = train(core, bf16, data, steps=2, fp8_matmul="auto", speed={"fp8_matmul": True})
    off = train(core, load(core, model_file, torch.bfloat16), data, steps=2, fp8_matmul="off")
    assert auto.losses == off.losses


def test_compiled_fp8_matmul_trains_like_eager_fp8(core, comfy):
    # the path a GPU takes: the fp8 layer traced into the compiled block, the compiler recomputing it in backward
    # (the suite's 64-wide model: compiling is what costs here, and a narrower model compiles faster)
    small = random_models.write_flux(comfy.path("diffusion_models", "fp8_compiled.safetensors"), seed=52,
                                     dtype=torch.float8_e4m3fn)
    data = latent_dataset(core, images=2)
    eager = train(core, load(core, small), data, steps=2, compile="off", fp8_matmul="on")
    compiled = train(core, load(core, small), data, steps=2, compile="on", fp8_matmul="on")
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3)
    for name in eager.weights.up:
        assert torch.allclose(compiled.weights.up[name], eager.weights.up[name], rtol=1e-2, atol=1e-5), name
