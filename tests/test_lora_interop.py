"""Flux.1 LoRA files as each tool writes them, applied by Load LoRA (Dev2Pro), by ComfyUI's LoraLoader and by
diffusers, against the delta the writing tool itself computes; and our saved files in diffusers.

Writers are the tools' own code where it installs (diffusers' training-script save, ``save_lora_adapter``, peft's
``save_pretrained``, LyCORIS, ComfyUI's training adapter, our Save LoRA). x-flux (XLabs) cannot be installed, so its
files are written in x-flux's key layout (``LoRALinearLayer`` down/up, no alpha, scale 1), which diffusers'
reader checks independently. The table these rows produce is the README's format table (``test_readme_table``).
"""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

import lora_references as ref

RANK, ALPHA = 12, 16.0  # alpha / rank not a power of two: where a bf16 alpha made diffusers 0.18 % too strong
DOUBLE = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "img_mlp.2", "txt_mlp.0",
          "txt_mlp.2", "img_mod.lin", "txt_mod.lin")
SINGLE = ("linear1", "linear2", "modulation.lin")
BLOCKS = ((0, 18), (37,))  # first and last blocks: index and naming errors show, and it is cheap to compare


@pytest.fixture(scope="module")
def lab(comfy):
    patcher = ref.comfy_flux()
    return {"patcher": patcher, "shapes": ref.weight_shapes(patcher), "comfy": comfy, "rows": {}}


def bfl_modules(blocks=BLOCKS):
    return [f"double_blocks.{i}.{m}" for i in blocks[0] for m in DOUBLE] + \
           [f"single_blocks.{i}.{m}" for i in blocks[1] for m in SINGLE]


def random_kohya(shapes, rank=RANK, alpha=ALPHA, seed=0, modules=None, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules or bfl_modules():
        out_f, in_f = shapes[module]
        key = "lora_unet_" + module.replace(".", "_")
        out[key + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)).to(dtype)
        out[key + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=g) / math.sqrt(rank)).to(dtype)
        out[key + ".alpha"] = torch.tensor(alpha)
    return out


def ours_loader(lab, name):
    """Load LoRA (Dev2Pro) -> Apply LoRA (Dev2Pro): what our nodes hand to sampling."""
    nodes = lab["comfy"].pack.nodes
    lora, report = nodes.Dev2ProLoadLoRA.execute(name).result
    patched = nodes.Dev2ProApplyLoRA.execute(lab["patcher"], lora, 1.0).result[0]
    return ref.patched_deltas(patched, lab["shapes"]), report


def measure(lab, row, name, truth):
    path = lab["comfy"].path("loras", name)
    ours, report = ours_loader(lab, name)
    comfy_deltas, comfy_missed = ref.comfyui_loader(lab["patcher"], path, lab["shapes"])
    diff_deltas, diff_error = ref.diffusers_loader(path, lab["shapes"])
    result = {"ours": ref.compare(ours, truth), "comfyui": ref.compare(comfy_deltas, truth),
              "diffusers": ref.compare(diff_deltas, truth), "comfyui_keys_not_loaded": comfy_missed,
              "diffusers_error": diff_error, "report": report}
    lab["rows"][row] = result
    return result


def assert_exact_for_ours(result):
    ours = result["ours"]
    assert ours["modules"] == ours["of"], result["report"]
    assert ours["error"] <= EXACT, ours
    assert "not applied" not in result["report"], result["report"]


# Tolerance for "exact": deltas are compared through the probe (lora_references), where one side computes
# (up @ down) @ P and the other up @ (down @ P); in fp32 over sums of up to 15,360 terms that differs by about 1e-6
# of the largest entry (measured: at most 1.2e-6). A wrong scale, a lost row or a swapped block is >= 1e-3: a bf16
# rounding of the scale is 2^-9, the smallest alpha mismatch in the table is 0.18 %.
EXACT = 1e-5


def test_our_kohya_file(lab):
    tensors = random_kohya(lab["shapes"])
    nodes = lab["comfy"].pack.nodes
    from_trainer = lab["comfy"].pack.core.lora_format.TrainedLoRA(tensors, {})
    nodes.Dev2ProSaveLoRA.execute(from_trainer, "interop/ours_kohya", format="kohya")
    result = measure(lab, "ours, kohya (Save LoRA)", "interop/ours_kohya_00001.safetensors",
                     ref.kohya_truth(tensors, ref.kohya_names(lab["shapes"]).__getitem__))
    assert_exact_for_ours(result)
    assert result["comfyui"]["error"] <= EXACT
    assert result["diffusers"]["modules"] == result["diffusers"]["of"], result["diffusers_error"]


def test_our_diffusers_file(lab):
    tensors = random_kohya(lab["shapes"], seed=1)
    nodes = lab["comfy"].pack.nodes
    nodes.Dev2ProSaveLoRA.execute(lab["comfy"].pack.core.lora_format.TrainedLoRA(tensors, {}),
                                  "interop/ours_diffusers", format="diffusers")
    result = measure(lab, "ours, diffusers (Save LoRA)", "interop/ours_diffusers_00001.safetensors",
                     ref.kohya_truth(tensors, ref.kohya_names(lab["shapes"]).__getitem__))
    assert_exact_for_ours(result)
    # The point of the format: diffusers and ComfyUI apply it at the exact scale, every key matched.
    assert result["diffusers"]["modules"] == result["diffusers"]["of"] and result["diffusers"]["error"] <= EXACT
    assert result["comfyui"]["error"] <= EXACT and result["comfyui_keys_not_loaded"] == 0


def peft_config(rank=4, alpha=8.0, **extra):
    from peft import LoraConfig

    targets = [f"transformer_blocks.{i}.{m}" for i in BLOCKS[0] for m in ref.DIFFUSERS_TARGETS[:14]] + \
              [f"single_transformer_blocks.{i}.{m}" for i in BLOCKS[1] for m in ("attn.to_q", "attn.to_k",
               "attn.to_v", "proj_mlp", "proj_out", "norm.linear")]
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets, **extra)


@pytest.fixture(scope="module")
def peft_source(lab):
    """A diffusers transformer with a seeded random peft adapter, as diffusers' Flux training scripts hold it."""
    transformer = ref.diffusers_flux()
    config = peft_config()
    ref.random_peft_adapter(transformer, config, seed=2)
    return transformer, config, ref.peft_deltas(transformer, "default", lab["shapes"])


def test_diffusers_training_script_file(lab, peft_source):
    """train_dreambooth_lora_flux.py's save: transformer.* keys, lora_alpha only in lora_adapter_metadata."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    transformer, config, truth = peft_source
    folder = lab["comfy"].path("loras", "interop", "diffusers_script")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                   transformer_lora_adapter_metadata=config.to_dict())
    result = measure(lab, "diffusers training scripts (metadata alpha)",
                     "interop/diffusers_script/pytorch_lora_weights.safetensors", truth)
    assert_exact_for_ours(result)
    assert result["diffusers"]["error"] <= EXACT  # the reference reads its own file exactly
    assert abs(result["comfyui"]["error"] - 0.5) < 1e-3  # ComfyUI ignores the metadata: rank/alpha = 0.5x


def test_diffusers_save_lora_adapter_file(lab, peft_source):
    """ModelMixin.save_lora_adapter: no transformer. prefix, lora_alpha in the metadata."""
    transformer, config, truth = peft_source
    folder = lab["comfy"].path("loras", "interop", "save_lora_adapter")
    transformer.save_lora_adapter(folder, adapter_name="default")
    result = measure(lab, "diffusers save_lora_adapter (no prefix)",
                     "interop/save_lora_adapter/pytorch_lora_weights.safetensors", truth)
    assert_exact_for_ours(result)


def test_peft_file_without_alpha(lab):
    """ai-toolkit's Flux.1 LoRAs (toolkit/network_mixins.py): peft keys under transformer., no .alpha and no
    metadata, trained at alpha = rank (scale 1). Written through diffusers' save_lora_weights without metadata."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = ref.diffusers_flux()
    ref.random_peft_adapter(transformer, peft_config(rank=4, alpha=4.0), seed=11)
    truth = ref.peft_deltas(transformer, "default", lab["shapes"])
    folder = lab["comfy"].path("loras", "interop", "no_alpha")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    result = measure(lab, "ai-toolkit style (transformer., no alpha)", "interop/no_alpha/pytorch_lora_weights.safetensors",
                     truth)
    assert_exact_for_ours(result)


def test_peft_save_pretrained_folder(lab):
    """peft's own PeftModel.save_pretrained: base_model.model.* keys, alpha in adapter_config.json beside."""
    import peft

    model = peft.get_peft_model(ref.diffusers_flux(), peft_config())
    ref.randomize_peft(model, seed=3)
    truth = ref.peft_deltas(model.base_model.model, "default", lab["shapes"])
    folder = lab["comfy"].path("loras", "interop", "peft_folder")
    model.save_pretrained(folder)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert json.load(f)["lora_alpha"] == 8.0
    result = measure(lab, "peft save_pretrained folder (adapter_config.json)",
                     "interop/peft_folder/adapter_model.safetensors", truth)
    assert_exact_for_ours(result)


@pytest.fixture
def comfy_blocks(lab):
    """ComfyUI's own Flux blocks (fp32 zero weights) for the tools that wrap a BFL-layout model. Fresh for each test:
    LyCORIS replaces the forward of what it wraps."""
    model = ref.comfy_flux().model.diffusion_model
    ref.zero_weights(model, torch.float32)
    return ref.block_subset(model, {"double_blocks": list(BLOCKS[0]), "single_blocks": list(BLOCKS[1])})


@pytest.fixture
def diffusers_blocks(lab):
    transformer = ref.diffusers_flux()
    ref.zero_weights(transformer, torch.float32)
    return ref.block_subset(transformer, {"transformer_blocks": list(BLOCKS[0]),
                                          "single_transformer_blocks": list(BLOCKS[1])})


def lycoris_row(lab, root, row, name, prefix, algo, seed, diffusers_names, **kwargs):
    truth = ref.lycoris_file(root, lab["comfy"].path("loras", name), prefix, algo, seed, **kwargs)
    if diffusers_names:
        truth = ref.placed(lab["shapes"], list(truth.items()))
    return measure(lab, row, name, truth)


def test_kohya_lora_written_by_lycoris(lab, comfy_blocks):
    """kohya's layout as LyCORIS writes it for sd-scripts (lora_unet_ on BFL modules), alpha / rank = 0.75."""
    result = lycoris_row(lab, comfy_blocks, "kohya / sd-scripts (lora_unet_, LyCORIS lora)", "interop/kohya_lycoris.safetensors",
                         "lora_unet", "lora", 4, False, linear_dim=8, linear_alpha=6)
    assert_exact_for_ours(result)


def test_onetrainer_naming_written_by_lycoris(lab, diffusers_blocks):
    """OneTrainer's legacy layout: lora_transformer_ + diffusers names, q/k/v split, per-module alpha."""
    result = lycoris_row(lab, diffusers_blocks, "OneTrainer legacy (lora_transformer_)", "interop/onetrainer.safetensors",
                         "lora_transformer", "lora", 5, True, linear_dim=8, linear_alpha=6)
    assert_exact_for_ours(result)


def test_simpletuner_lokr(lab, diffusers_blocks):
    """SimpleTuner's LyCORIS example: full-matrix LoKr, factor 16, lycoris_ + diffusers names."""
    result = lycoris_row(lab, diffusers_blocks, "SimpleTuner LyCORIS LoKr (lycoris_)", "interop/simpletuner_lokr.safetensors",
                         "lycoris", "lokr", 6, True, linear_dim=10000, linear_alpha=1, factor=16, full_matrix=True)
    assert_exact_for_ours(result)


def test_loha_kohya_names(lab, comfy_blocks):
    result = lycoris_row(lab, comfy_blocks, "LyCORIS LoHa (lora_unet_)", "interop/loha.safetensors",
                         "lora_unet", "loha", 7, False, linear_dim=4, linear_alpha=2)
    assert_exact_for_ours(result)


def test_comfyui_trainer_file(lab):
    """ComfyUI's own training adapter (TrainLoraNode's LoRAAdapter.create_train, alpha 1.0) saved by its SaveLoRA."""
    import shutil

    import comfy.weight_adapter.lora
    import comfy_extras.nodes_train
    import folder_paths

    g = torch.Generator().manual_seed(8)
    state, truth = {}, {}
    for module in bfl_modules():
        shape = lab["shapes"][module]
        adapter = comfy.weight_adapter.lora.LoRAAdapter.create_train(torch.zeros(()).expand(shape), rank=4, alpha=1.0)
        for p in (adapter.lora_up.weight, adapter.lora_down.weight):  # create_train starts lora_down at zero
            p.data = (torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])).to(torch.bfloat16).float()
        for name, p in adapter.named_parameters():
            state[f"diffusion_model.{module}.{name}"] = p.detach().to(torch.bfloat16)
        truth[module] = lambda a=adapter, s=shape: a(ref.zeros(s)).float() @ ref.probe(s[1])
    node = comfy_extras.nodes_train.SaveLoRA
    if hasattr(node, "FUNCTION"):  # 0.3.64's V1 node
        getattr(node(), node.FUNCTION)(state, "loras/interop_comfyui")
    else:
        node.execute(state, "loras/interop_comfyui")
    [written] = [f for f in os.listdir(os.path.join(folder_paths.get_output_directory(), "loras"))
                 if f.startswith("interop_comfyui")]
    os.makedirs(lab["comfy"].path("loras", "interop"), exist_ok=True)
    shutil.copy(os.path.join(folder_paths.get_output_directory(), "loras", written),
                lab["comfy"].path("loras", "interop", "comfyui.safetensors"))
    result = measure(lab, "ComfyUI Train LoRA + Save LoRA Weights (diffusion_model.)", "interop/comfyui.safetensors", truth)
    assert_exact_for_ours(result)


def xlabs_file(lab, name, double, single, seed, rank=4):
    """x-flux's LoRA processors (src/flux/modules/layers.py): qkv_lora1/2 and proj_lora1/2 add up @ down to the
    image / text qkv and proj; a single block's qkv_lora to linear1's first 3 x 3072 rows, proj_lora (15360 in) to
    linear2. No alpha: scale 1. Saved in fp32, as x-flux's trainer holds them."""
    g = torch.Generator().manual_seed(seed)
    tensors, parts = {}, {}

    def lora(key, module, in_f, out_f, rows=None):
        down = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        up = torch.randn(out_f, rank, generator=g) / math.sqrt(rank)
        tensors[key + ".down.weight"], tensors[key + ".up.weight"] = down, up
        parts[module] = (up, down, rows)

    for i in double:
        for n, module, out_f in (("qkv_lora1", "img_attn.qkv", 9216), ("proj_lora1", "img_attn.proj", 3072),
                                 ("qkv_lora2", "txt_attn.qkv", 9216), ("proj_lora2", "txt_attn.proj", 3072)):
            lora(f"double_blocks.{i}.processor.{n}", f"double_blocks.{i}.{module}", 3072, out_f)
    for i in single:
        lora(f"single_blocks.{i}.processor.qkv_lora", f"single_blocks.{i}.linear1", 3072, 9216, slice(0, 9216))
        lora(f"single_blocks.{i}.processor.proj_lora", f"single_blocks.{i}.linear2", 15360, 3072)
    ref.save(tensors, lab["comfy"].path("loras", name))

    def delta(module):
        up, down, rows = parts[module]
        projected = up @ (down @ ref.probe(down.shape[1]))
        if rows is None:
            return projected
        full = torch.zeros(lab["shapes"][module][0], ref.PROBES)
        full[rows] = projected
        return full

    return {m: (lambda m=m: delta(m)) for m in parts}


def test_xlabs_full(lab):
    truth = xlabs_file(lab, "interop/xlabs_full.safetensors", range(19), range(38), seed=9)
    result = measure(lab, "XLabs x-flux, all blocks", "interop/xlabs_full.safetensors", truth)
    assert_exact_for_ours(result)


def test_xlabs_partial(lab):
    """x-flux's train_configs/test_lora.yaml: double_blocks null (all), single_blocks "1,2,3,4"."""
    truth = xlabs_file(lab, "interop/xlabs_partial.safetensors", range(19), (1, 2, 3, 4), seed=10)
    result = measure(lab, "XLabs x-flux, some blocks (test_lora.yaml)", "interop/xlabs_partial.safetensors", truth)
    assert_exact_for_ours(result)


# --- files that are not Flux.1 LoRAs, and keys that are not applied ------------------------------------------------

def load_error(lab, name, tensors):
    ref.save(tensors, lab["comfy"].path("loras", name))
    with pytest.raises(ValueError) as error:
        lab["comfy"].pack.nodes.Dev2ProLoadLoRA.execute(name)
    return str(error.value)


def test_non_flux_files_are_named_for_what_they_are(lab):
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4)}
    message = load_error(lab, "bad/sdxl.safetensors", sdxl)
    assert message.startswith("Dev2ProLoadLoRA (lora_name): bad/sdxl.safetensors is a Stable Diffusion 1.x / SDXL LoRA")
    flux2 = {"double_stream_modulation_img.lin.lora_A.weight": torch.zeros(4, 6144),
             "double_stream_modulation_img.lin.lora_B.weight": torch.zeros(36864, 4)}
    assert "a Flux.2 LoRA" in load_error(lab, "bad/flux2.safetensors", flux2)
    full = {f"double_blocks.0.img_attn.{n}.weight": torch.zeros(8, 8) for n in ("qkv", "proj")}
    assert "a full model checkpoint" in load_error(lab, "bad/checkpoint.safetensors", full)
    narrow = random_kohya({m: (s[0] // 2, s[1] // 2) for m, s in lab["shapes"].items()}, modules=bfl_modules(((0,), ())))
    ref.save(narrow, lab["comfy"].path("loras", "bad", "narrow.safetensors"))
    nodes = lab["comfy"].pack.nodes
    lora, report = nodes.Dev2ProLoadLoRA.execute("bad/narrow.safetensors").result
    assert "10 Flux.1 modules, 1536 wide" in report
    with pytest.raises(ValueError, match=r"Dev2ProApplyLoRA \(lora\): lora_unet_double_blocks_0_\w+ is "
                       r"\d+ x \d+, but this model's layer is \d+ x \d+: the LoRA was made for another model"):
        nodes.Dev2ProApplyLoRA.execute(lab["patcher"], lora, 1.0)
    path = lab["comfy"].path("loras", "bad", "broken.safetensors")
    with open(path, "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"Dev2ProLoadLoRA \(lora_name\): cannot read broken.safetensors"):
        lab["comfy"].pack.nodes.Dev2ProLoadLoRA.execute("bad/broken.safetensors")


def test_keys_it_cannot_apply_are_listed(lab):
    tensors = random_kohya(lab["shapes"], modules=bfl_modules(((0,), ())))
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 768)
    tensors["lora_unet_double_blocks_0_img_attn_nonsense.lora_down.weight"] = torch.zeros(4, 8)
    ref.save(tensors, lab["comfy"].path("loras", "odd", "extra_keys.safetensors"))
    lora, report = lab["comfy"].pack.nodes.Dev2ProLoadLoRA.execute("odd/extra_keys.safetensors").result
    assert "1 text-encoder keys" in report and "lora_te1_text_model_encoder_layers_0_mlp_fc1" in report
    assert "1 keys that name no Flux.1 layer: lora_unet_double_blocks_0_img_attn_nonsense.lora_down.weight" in report
    assert len([k for k in lora if k.endswith(".lora_down.weight")]) == 10  # the 10 layers it could apply


# --- the README's format table -------------------------------------------------------------------------------------

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TABLE_START, TABLE_END = "<!-- format-table: tests/test_lora_interop.py -->", "<!-- /format-table -->"


def cell(measured, missed=0, failure=""):
    if measured["error"] is None:
        return f"fails ({failure.split(':')[0]})"
    if measured["modules"] == 0:
        return f"0/{measured['of']}, nothing applied"
    text = f"{measured['modules']}/{measured['of']}, " + (
        "exact" if measured["error"] <= EXACT else f"{100 * measured['error']:.2g} % off")
    return text + (f", {missed} keys not loaded" if missed else "")


def same_cell(written: str, measured: str) -> bool:
    """A README cell against a measurement: the same text, but a "% off" within a tenth of the written one (the
    last digit moves between CPUs: diffusers' row read 0.22 % on one CI machine and 0.23 % on another)."""
    off = re.compile(r"(.*, )([0-9.e+-]+) % off(.*)")
    a, b = off.fullmatch(written), off.fullmatch(measured)
    if a is None or b is None:
        return written == measured
    return a[1] == b[1] and a[3] == b[3] and math.isclose(float(a[2]), float(b[2]), rel_tol=0.1)


COMFYUI_COLUMNS = ("0.33.0", "0.3.64")  # the versions CI runs; one column each


def test_readme_format_table(lab):
    """The README's table is what this module measured (layers applied of the writer's, largest difference relative to
    the writer's own delta), ComfyUI's column for the ComfyUI this run uses. DEV2PRO_WRITE_TABLE=1 rewrites the
    measured cells."""
    import comfyui_version

    version = comfyui_version.__version__
    assert version in COMFYUI_COLUMNS, f"add a README column for ComfyUI {version}"
    column = 3 + COMFYUI_COLUMNS.index(version)
    measured = {name: [cell(r["ours"]), cell(r["comfyui"], r["comfyui_keys_not_loaded"]),
                       cell(r["diffusers"], failure=r["diffusers_error"])] for name, r in lab["rows"].items()}
    with open(README, encoding="utf-8") as f:
        text = f.read()
    head, rest = text.split(TABLE_START)
    table, tail = rest.split(TABLE_END)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.strip().splitlines()[2:]}
    if os.environ.get("DEV2PRO_WRITE_TABLE") == "1":
        for name, (ours, comfyui, diffusers) in measured.items():
            row = rows.setdefault(name, [name, "", "-", "-", ""])
            row[1], row[column - 1], row[4] = ours, comfyui, diffusers
        header = ("| file, as its tool writes it | Load LoRA (Dev2Pro) | ComfyUI LoraLoader, " +
                  " | ComfyUI LoraLoader, ".join(COMFYUI_COLUMNS) + " | diffusers 0.42.1 load_lora_weights |\n"
                  "|---|---|---|---|---|\n")
        table = header + "\n".join("| " + " | ".join(r) + " |" for r in rows.values()) + "\n"
        with open(README, "w", encoding="utf-8") as f:
            f.write(head + TABLE_START + "\n" + table + TABLE_END + tail)
    for name, (ours, comfyui, diffusers) in measured.items():
        assert name in rows, f"README's format table lacks the row {name!r}"
        cells = rows[name][1], rows[name][column - 1], rows[name][4]
        assert all(same_cell(w, m) for w, m in zip(cells, (ours, comfyui, diffusers))), (
            f"README row differs from the measurement on ComfyUI {version}: {rows[name]} against "
            f"{[ours, comfyui, diffusers]}")
