"""Write a random-weight Flux.1-dev in diffusers layout (what SimpleTuner's pretrained_model_name_or_path expects).

model_index.json, scheduler/, transformer/ (SimpleTuner's own FluxTransformer2DModel class, the one it loads),
vae/ (AutoencoderKL, Flux's 16-channel config), text_encoder/ (CLIPTextModel, CLIP-L width 768), tokenizer/
(CLIP BPE built from a tiny byte-level vocab), text_encoder_2/ (T5EncoderModel, T5-XXL v1.1 config: width 4096),
tokenizer_2/ (T5 Unigram tokenizer built offline). Nothing is downloaded. Weights are built directly on the target
device in bf16 and refilled by ../random_init.py (randn / sqrt(fan_in), norm gains 1, other 1-D params 0), then
saved as safetensors.

--tiny: a tiny config of the same architecture for a CPU rehearsal.
Also writes the training image (random 1024x1024 PNG) and its caption when --dataset DIR is given.
"""
import argparse
import json
import os
import time

import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import st_stubs  # noqa: E402
from random_init import refill  # noqa: E402
from offline_tokenizers import clip_byte_vocab  # noqa: E402

st_stubs.install()


def log(msg):
    print(f"[make_random_model] {msg}", flush=True)


def build(cls_or_fn, dev, dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            m = cls_or_fn()
    finally:
        torch.set_default_dtype(prev)
    m = m.to(dtype)
    p = next(m.parameters())
    log(f"built {type(m).__name__} on {p.device} as {p.dtype}")
    if str(dev).startswith("cuda") and not p.is_cuda:
        raise RuntimeError("model was not built on the GPU; generation would be far too slow")
    return m


def save(model, path, dev):
    t = time.time()
    if dev != "cpu":
        model.to("cpu")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="10GB")
    log(f"saved {path} in {time.time() - t:.1f}s")


def write_t5_tokenizer(path, vocab_size_hint=32128):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()"
    pieces += [(c, -3.0) for c in chars]
    pieces += [("\u2581" + c, -2.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 512,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
    }
    json.dump(cfg, open(os.path.join(path, "tokenizer_config.json"), "w"), indent=1)
    json.dump({"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
              open(os.path.join(path, "special_tokens_map.json"), "w"))


def write_clip_tokenizer(path):
    vocab = clip_byte_vocab()  # then a few merges and the two specials
    merges = []
    for a, b in [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n")]:
        merges.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(path, exist_ok=True)
    json.dump(vocab, open(os.path.join(path, "vocab.json"), "w"))
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "errors": "replace",
    }
    json.dump(cfg, open(os.path.join(path, "tokenizer_config.json"), "w"), indent=1)
    json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}, open(os.path.join(path, "special_tokens_map.json"), "w"))


def write_dataset(path, caption, size=1024):
    import numpy as np
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(os.path.join(path, "image_0000.png"))
    with open(os.path.join(path, "image_0000.txt"), "w") as f:
        f.write(caption)
    log(f"wrote dataset {path} ({size}x{size} random PNG + caption)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--caption", default="a photo of a random noise texture, sks style")
    ap.add_argument("--only", default="transformer,text_encoder_2,text_encoder,vae",
                    help="comma list of weight components to write (debugging; the default writes all)")
    args = ap.parse_args()
    dev, dtype, out = args.device, torch.bfloat16, args.out
    t0 = time.time()
    torch.manual_seed(0)
    os.makedirs(out, exist_ok=True)

    if args.tiny:
        tcfg = dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4,
                    joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
        t5 = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
        clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32)
        vae_blocks = [32, 32, 32, 32]
        vae_layers = 1
    else:
        tcfg = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
        t5 = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64)  # T5-XXL v1.1
        clip = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768)  # CLIP-L/14 text tower
        vae_blocks = [128, 256, 512, 512]
        vae_layers = 2

    # --- scheduler + model_index
    os.makedirs(f"{out}/scheduler", exist_ok=True)
    json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
               "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
               "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True},
              open(f"{out}/scheduler/scheduler_config.json", "w"), indent=1)
    json.dump({"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
               "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]},
              open(f"{out}/model_index.json", "w"), indent=1)

    # --- tokenizers
    write_clip_tokenizer(f"{out}/tokenizer")
    write_t5_tokenizer(f"{out}/tokenizer_2")

    only = set(args.only.split(","))

    # --- transformer (SimpleTuner's class: the one its Flux model loads)
    from simpletuner.helpers.models.flux.transformer import FluxTransformer2DModel

    t = time.time()
    if "transformer" in only:
        tr = build(lambda: FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **tcfg), dev, dtype)
        refill(tr)
        n = sum(p.numel() for p in tr.parameters())
        log(f"transformer built+filled: {n / 1e9:.3f}B params in {time.time() - t:.1f}s")
        save(tr, f"{out}/transformer", dev)
        del tr

    # --- T5 encoder
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t = time.time()
    t5cfg = T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=True, tie_word_embeddings=False,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
                     layer_norm_epsilon=1e-6, dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=0,
                     eos_token_id=1, decoder_start_token_id=0, num_decoder_layers=t5["num_layers"],
                     architectures=["T5EncoderModel"], **t5)
    if "text_encoder_2" in only:
        te2 = build(lambda: T5EncoderModel(t5cfg), dev, dtype)
        refill(te2)
        log(f"T5 built+filled: {sum(p.numel() for p in te2.parameters()) / 1e9:.3f}B params in {time.time() - t:.1f}s")
        save(te2, f"{out}/text_encoder_2", dev)
        del te2

    # --- CLIP text encoder
    ccfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
                          eos_token_id=2, pad_token_id=1, architectures=["CLIPTextModel"], **clip)
    if "text_encoder" in only:
        te1 = build(lambda: CLIPTextModel(ccfg), dev, dtype)
        refill(te1)
        save(te1, f"{out}/text_encoder", dev)
        del te1

    # --- VAE (Flux: 16 latent channels, no quant convs)
    from diffusers import AutoencoderKL

    if "vae" in only:
        vae = build(lambda: AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=vae_blocks, layers_per_block=vae_layers,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            norm_num_groups=32, act_fn="silu", sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False, force_upcast=True), dev, dtype)
        refill(vae)
        save(vae, f"{out}/vae", dev)
        del vae

    if args.dataset:
        write_dataset(args.dataset, args.caption)
    with open(f"{out}/.complete", "w") as f:
        f.write("ok\n")
    log(f"done in {time.time() - t0:.1f}s -> {out}")


if __name__ == "__main__":
    main()
