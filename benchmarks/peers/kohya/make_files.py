"""Random-weight files in the four formats kohya's flux_train_network.py loads, built from sd-scripts' own classes.

Run with sd-scripts' folder as the working directory (its ``library`` package importable). Writes to OUT:
flux1-dev-fp8.safetensors (BFL layout, 19 + 38 blocks, fp8 e4m3fn: our benchmark's base), clip_l.safetensors and
t5xxl_bf16.safetensors (bf16), ae.safetensors (bf16), tokenizers/ (tiny offline stand-ins in the folder layout
``--tokenizer_cache_dir`` reads: only token ids matter, and T5's are padded to 512), and data/ (one random square PNG
and its caption). Weights: ../random_init.py, the rule of benchmarks/train_step.py's random_flux_dev. Every key
of each model is written: sd-scripts loads with strict=False and leaves missing ones on meta.

    python make_files.py OUT [--double 19 --single 38] [--size 1024] [--device cuda]
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from library import flux_models, flux_utils  # noqa: E402
from random_init import random_value  # noqa: E402


def random_state(module: torch.nn.Module, dtype, device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return {name: random_value(name, t.shape, g, device).to(dtype).contiguous().cpu()
            for name, t in module.state_dict().items()}


def tokenizers(folder: str):
    """CLIPTokenizer (vocab.json + merges.txt) and T5TokenizerFast (tokenizer.json) that need no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = os.path.join(folder, "openai_clip-vit-large-patch14")
    os.makedirs(clip, exist_ok=True)
    words = ["a", "photo", "of", "sks", "dog", "cat"]
    vocab = {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    vocab.update({w + "</w>": i for i, w in enumerate(words)})
    with open(os.path.join(clip, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(clip, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(clip, "vocab.json"), os.path.join(clip, "merges.txt")).save_pretrained(clip)

    t5 = os.path.join(folder, "google_t5-v1_1-xxl")
    t5_vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(t5_vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(t5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device(a.device)

    from dataclasses import replace
    params = replace(flux_models.configs["dev"].params, depth=a.double, depth_single_blocks=a.single)
    with torch.device("meta"):
        flux = flux_models.Flux(params)
        ae = flux_models.AutoEncoder(flux_models.configs["dev"].ae_params)
    save_file(random_state(flux, torch.float8_e4m3fn, dev, 0), os.path.join(a.out, "flux1-dev-fp8.safetensors"))
    del flux
    save_file(random_state(ae, torch.bfloat16, dev, 1), os.path.join(a.out, "ae.safetensors"))
    clip = flux_utils.load_clip_l(None, torch.bfloat16, "cpu", state_dict={})
    save_file(random_state(clip, torch.bfloat16, dev, 2), os.path.join(a.out, "clip_l.safetensors"))
    t5 = flux_utils.load_t5xxl(None, torch.bfloat16, "cpu", state_dict={})
    save_file(random_state(t5, torch.bfloat16, dev, 3), os.path.join(a.out, "t5xxl_bf16.safetensors"))
    tokenizers(os.path.join(a.out, "tokenizers"))

    data = os.path.join(a.out, "data")
    os.makedirs(data, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (a.size, a.size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(data, "image.png"))
    with open(os.path.join(data, "image.txt"), "w") as f:
        f.write("a photo of sks dog")
    print(json.dumps({"files": sorted(os.listdir(a.out)), "double": a.double, "single": a.single}))


if __name__ == "__main__":
    main()
