"""Property tests of the key conversions on small widths: kohya <-> ComfyUI <-> diffusers/peft round trips are exact,
and merging peft's split q/k/v layers keeps every layer's delta, over ranks, alphas and block sets."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

DOUBLE = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
          "txt_mlp.2", "img_mod.lin", "txt_mod.lin")
SINGLE = ("linear1", "linear2", "modulation.lin")
GLOBAL = ("final_layer.adaLN_modulation.1", "final_layer.linear", "guidance_in.in_layer")


def shape(module: str, h: int) -> tuple[int, int]:
    """(out, in) of a Flux.1 layer at hidden size h (mlp ratio 4)."""
    tail = module.split(".", 2)[-1] if module.startswith(("double_blocks", "single_blocks")) else module
    return {"img_attn.qkv": (3 * h, h), "txt_attn.qkv": (3 * h, h), "img_attn.proj": (h, h), "txt_attn.proj": (h, h),
            "img_mlp.0": (4 * h, h), "txt_mlp.0": (4 * h, h), "img_mlp.2": (h, 4 * h), "txt_mlp.2": (h, 4 * h),
            "img_mod.lin": (6 * h, h), "txt_mod.lin": (6 * h, h), "linear1": (7 * h, h), "linear2": (h, 5 * h),
            "modulation.lin": (3 * h, h), "final_layer.adaLN_modulation.1": (2 * h, h), "final_layer.linear": (64, h),
            "guidance_in.in_layer": (h, 256)}[tail]


@st.composite
def kohya_loras(draw):
    """A kohya-keyed LoRA: random modules of random blocks, a rank and alpha per module, bf16 or fp32 weights."""
    h = draw(st.sampled_from([8, 16]))
    modules = draw(st.lists(st.one_of(
        st.tuples(st.integers(0, 18), st.sampled_from(DOUBLE)).map(lambda t: f"double_blocks.{t[0]}.{t[1]}"),
        st.tuples(st.integers(0, 37), st.sampled_from(SINGLE)).map(lambda t: f"single_blocks.{t[0]}.{t[1]}"),
        st.sampled_from(GLOBAL)), min_size=1, max_size=6, unique=True))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        rank = draw(st.integers(1, 8))
        alpha = draw(st.one_of(st.none(), st.floats(0.25, 64.0, allow_nan=False, width=32)))
        out_f, in_f = shape(module, h)
        key = "lora_unet_" + module.replace(".", "_")
        tensors[key + ".lora_down.weight"] = torch.randn(rank, in_f, generator=g).to(dtype)
        tensors[key + ".lora_up.weight"] = torch.randn(out_f, rank, generator=g).to(dtype)
        if alpha is not None:
            tensors[key + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return tensors


def assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def canonical(core, tensors):
    """What Load LoRA hands on for ``tensors``: kohya keys, every module with an fp32 alpha (rank when absent)."""
    return core.lora_convert.to_comfy(tensors).tensors


@settings(max_examples=60, deadline=None)
@given(kohya_loras())
def test_kohya_to_diffusers_and_back_is_exact(core, tensors):
    ours = canonical(core, tensors)
    diffusers, config = core.lora_convert.to_diffusers(ours)
    assert all(k.startswith("transformer.") for k in diffusers)
    assert_same(canonical(core, diffusers), ours)
    bare = {k[len("transformer."):]: v for k, v in diffusers.items()}  # save_lora_adapter's keys
    assert_same(canonical(core, bare), ours)


@settings(max_examples=60, deadline=None)
@given(kohya_loras(), st.sampled_from(["diffusion_model.", ""]), st.sampled_from([("lora_down", "lora_up"), ("lora_A", "lora_B")]))
def test_kohya_to_comfyui_and_back_is_exact(core, tensors, prefix, names):
    """ComfyUI's trainer and OneTrainer's COMFY_LORA write diffusion_model.<BFL name>; OneTrainer's ORIGINAL_LORA and
    BFL's own files the bare BFL name; with lora_down/up or peft's lora_A/B."""
    ours = canonical(core, tensors)
    comfyui = {}
    for k, v in ours.items():
        layer, _, suffix = k.partition(".")
        suffix = "." + suffix.replace("lora_down", names[0]).replace("lora_up", names[1])
        comfyui[prefix + core.lora_convert.bfl_module(layer) + suffix] = v
    assert_same(canonical(core, comfyui), ours)
    assert_same(canonical(core, ours), ours)  # loading its own output changes nothing


@settings(max_examples=60, deadline=None)
@given(kohya_loras(), st.data())
def test_split_peft_layers_merge_to_the_same_deltas(core, tensors, data):
    """peft files train q, k, v (and proj_mlp) as separate layers, each with its own down, rank and alpha; the merged
    module's delta equals the layers' deltas side by side (fp64, so only exact arithmetic passes)."""
    ours = canonical(core, tensors)
    diffusers, _ = core.lora_convert.to_diffusers(ours)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    split = {}
    for key in diffusers:
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            rank = data.draw(st.integers(1, 6))
            split[layer + ".lora_A.weight"] = torch.randn(rank, diffusers[key].shape[1], generator=g, dtype=torch.float64)
            split[layer + ".lora_B.weight"] = torch.randn(diffusers[layer + ".lora_B.weight"].shape[0], rank,
                                                          generator=g, dtype=torch.float64)
            split[layer + ".alpha"] = torch.tensor(data.draw(st.sampled_from([1.0, 3.0, 8.0, 16.0])), dtype=torch.float32)
    merged = canonical(core, split)
    for key in merged:
        if not key.endswith(".lora_down.weight"):
            continue
        layer = key[: -len(".lora_down.weight")]
        down, up = merged[key], merged[layer + ".lora_up.weight"]
        got = merged[layer + ".alpha"].double() / down.shape[0] * (up @ down)
        expected = torch.zeros_like(got)
        module = core.lora_convert.bfl_module(layer)
        h = down.shape[1]
        for name, rows, swapped in core.lora_convert.diffusers_parts(module):
            part = "transformer." + name
            if part + ".lora_A.weight" not in split:
                continue
            a, b = split[part + ".lora_A.weight"], split[part + ".lora_B.weight"]
            delta = split[part + ".alpha"].double() / a.shape[0] * (b @ a)
            if swapped:
                delta = torch.cat(delta.chunk(2)[::-1])
            if rows is None:
                expected += delta
            else:
                expected[rows[0] * h:(rows[0] + rows[1]) * h] += delta
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_lora_and_lokr_rows_of_one_module_keep_their_scales(core):
    """A LoKr on q and a peft LoRA on k of the same qkv cannot merge: both stay on their rows, the LoRA with its
    metadata alpha made an fp32 .alpha that ComfyUI reads."""
    import json

    tensors = {"transformer.transformer_blocks.0.attn.to_q.lokr_w1": torch.ones(2, 2),
               "transformer.transformer_blocks.0.attn.to_q.lokr_w2": torch.ones(4, 4),
               "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.ones(2, 8),
               "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.ones(8, 2)}
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 1.0})}
    out = core.lora_convert.to_comfy(tensors, metadata).tensors
    assert sorted(out) == ["transformer.transformer_blocks.0.attn.to_k.alpha",
                           "transformer.transformer_blocks.0.attn.to_k.lora_down.weight",
                           "transformer.transformer_blocks.0.attn.to_k.lora_up.weight",
                           "transformer.transformer_blocks.0.attn.to_q.lokr_w1",
                           "transformer.transformer_blocks.0.attn.to_q.lokr_w2"]
    alpha = out["transformer.transformer_blocks.0.attn.to_k.alpha"]
    assert alpha.dtype == torch.float32 and alpha.item() == 1.0
