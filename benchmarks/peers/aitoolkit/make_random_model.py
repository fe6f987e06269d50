"""Write a random-weight Flux.1-dev in diffusers layout (what ai-toolkit's `name_or_path` expects), offline.

usage: make_random_model.py OUT_DIR [--tiny] [--device cuda|cpu]

Full size: FluxTransformer2DModel 19 double + 38 single blocks, hidden 3072 (24 heads x 128), joint_attention_dim 4096,
pooled_projection_dim 768, guidance_embeds true; T5-XXL v1.1 encoder (d_model 4096, 24 layers, 64 heads, d_ff 10240,
gated-gelu); CLIP-L text model (768, 12 layers); Flux VAE (16 latent channels). --tiny: 1 double + 1 single block,
hidden 128, tiny T5/CLIP/VAE (for the CPU rehearsal). Modules are built on the meta device, given bf16 storage on
the device (to_empty), refilled by ../random_init.py (randn / sqrt(fan_in), norm gains 1, other 1-D params 0) and
saved with save_pretrained.
Tokenizers are built offline: T5 from a 1000-piece unigram vocab + 100 extra ids (ids < 32128), CLIP from a
byte-level vocab (no merges); only the shapes matter (CLIP 77, T5 512 tokens).
"""
import argparse
import json
import os
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import random_init  # noqa: E402
from offline_tokenizers import clip_byte_vocab  # noqa: E402

T0 = time.time()


def log(msg):
    print(f"[make_random_model +{time.time() - T0:.1f}s] {msg}", flush=True)


def build(cls, cfg, device, dtype=torch.bfloat16):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no init work anywhere; storage is allocated on the device, then refilled
            m = cls(cfg) if not isinstance(cfg, dict) else cls(**cfg)
    finally:
        torch.set_default_dtype(old)
    m = m.to_empty(device=device).to(dtype)
    if hasattr(m, "tie_weights"):  # to_empty gives tied modules separate storage (T5's shared / embed_tokens)
        m.tie_weights()
    for name, b in m.named_buffers():  # none is saved (CLIP's position_ids is non-persistent) but keep them sane
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
        else:
            b.zero_()
    return random_init.refill(m).eval()


def make_clip_tokenizer(path):
    from transformers import CLIPTokenizer
    vocab = clip_byte_vocab()
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(path)
    return tok


def make_t5_tokenizer(path):
    """T5-style unigram vocab: <pad>=0, </s>=1, <unk>=2, then pieces (letters, '▁'+letter, short words)."""
    import random
    from transformers import T5TokenizerFast
    rnd = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in letters] + [("▁" + c, -4.0) for c in letters]
    seen = {p for p, _ in pieces}
    while len(pieces) < 1000:
        w = "▁" + "".join(rnd.choice(letters[:26]) for _ in range(rnd.randint(2, 6)))
        if w not in seen:
            seen.add(w)
            pieces.append((w, -8.0 - rnd.random()))
    tok = T5TokenizerFast(vocab=pieces, extra_ids=100, model_max_length=512)
    tok.save_pretrained(path)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--wide", action="store_true", help="rehearsal: full widths, 1 double + 1 single block, 1-layer T5/CLIP")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    out, dev, tiny = a.out, a.device, a.tiny
    if os.path.exists(os.path.join(out, "DONE")):
        log(f"{out} already complete; reusing")
        return
    os.makedirs(out, exist_ok=True)
    from diffusers import AutoencoderKL, FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    shard = "5GB"
    # ---- tokenizers
    clip_tok = make_clip_tokenizer(os.path.join(out, "tokenizer"))
    t5_tok = make_t5_tokenizer(os.path.join(out, "tokenizer_2"))
    log(f"tokenizers: clip vocab {len(clip_tok)}, t5 vocab {len(t5_tok)}")

    # ---- scheduler (FLUX.1-dev's)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
                                    ).save_pretrained(os.path.join(out, "scheduler"))

    # ---- CLIP-L text encoder
    clip_cfg = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                    bos_token_id=clip_tok.convert_tokens_to_ids("<|startoftext|>"),
                    eos_token_id=clip_tok.convert_tokens_to_ids("<|endoftext|>"),
                    pad_token_id=clip_tok.convert_tokens_to_ids("<|endoftext|>"))
    t5_cfg = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                  is_encoder_decoder=True, tie_word_embeddings=False, dropout_rate=0.1, layer_norm_epsilon=1e-6,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    tr_cfg = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                   shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    if tiny:
        clip_cfg.update(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1, num_attention_heads=2)
        t5_cfg.update(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
        tr_cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4,
                      joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
        vae_cfg.update(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    elif a.wide:
        clip_cfg.update(num_hidden_layers=1)
        t5_cfg.update(num_layers=1)
        tr_cfg.update(num_layers=1, num_single_layers=1)

    m = build(CLIPTextModel, CLIPTextConfig(**clip_cfg), dev)
    m.save_pretrained(os.path.join(out, "text_encoder"), max_shard_size=shard)
    log(f"text_encoder (CLIP-L): {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params")
    del m

    m = build(T5EncoderModel, T5Config(**t5_cfg), dev)
    m.save_pretrained(os.path.join(out, "text_encoder_2"), max_shard_size=shard)
    log(f"text_encoder_2 (T5 enc): {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params")
    del m

    m = build(AutoencoderKL, vae_cfg, dev)
    m.save_pretrained(os.path.join(out, "vae"))
    log(f"vae: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M params")
    del m

    m = build(FluxTransformer2DModel, tr_cfg, dev)
    n = sum(p.numel() for p in m.parameters())
    m.save_pretrained(os.path.join(out, "transformer"), max_shard_size=shard)
    log(f"transformer: {n / 1e9:.3f}B params")
    del m
    if dev == "cuda":
        torch.cuda.empty_cache()

    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump({"_class_name": "FluxPipeline", "_diffusers_version": "0.39.0.dev0",
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
                   "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}, f, indent=1)
    open(os.path.join(out, "DONE"), "w").write("tiny\n" if tiny else "wide\n" if a.wide else "full\n")
    log("done")


if __name__ == "__main__":
    sys.exit(main())
