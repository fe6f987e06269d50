"""Write one ai-toolkit run: a one-image dataset (random 1024x1024 PNG + caption .txt) and its config YAML.

usage: prepare_run.py --model DIR --work DIR --resolution N --steps 13 [--device cuda:0] [--no-quantize]
Prints the config path. Settings follow ai-toolkit's config/examples/train_lora_flux_24gb.yaml, changed only where
the benchmark fixes them (see SETTINGS below; summarize.py copies them into the result line).
"""
import argparse
import json
import os

import numpy as np
import yaml
from PIL import Image


def settings(a):
    return {
        "network": "lora (ai-toolkit LoRASpecialNetwork), linear 16, linear_alpha 16, transformer_only (default): every "
                   "Linear inside transformer_blocks.* and single_transformer_blocks.* of FluxTransformer2DModel",
        "batch_size": 1, "gradient_accumulation_steps": 1, "steps": a.steps,
        "resolution": a.resolution, "dataset": "1 random 1024x1024 PNG + caption, resized to one square bucket",
        "optimizer": "adamw (torch.optim.AdamW, eps 1e-6 as ai-toolkit sets it)", "lr": 1e-4,
        "lr_scheduler": "constant (ai-toolkit default)",
        "gradient_checkpointing": True, "dtype": "bf16 (train.dtype)",
        "quantize": (not a.no_quantize), "qtype": "qfloat8 (optimum-quanto 0.2.4, ai-toolkit default)",
        "quantize_te": (not a.no_quantize), "low_vram": False,
        "guidance": "train.cfg_scale 1.0 -> Flux guidance embedding 1.0",
        "noise_scheduler": "flowmatch", "timestep_type": "sigmoid (default)",
        "cache_latents_to_disk": True, "cache_text_embeddings": True, "unload_text_encoder": "(implied by caching)",
        "ema": False, "sampling": "disabled", "saves": "final only (save_every > steps)", "logging": "none",
        "caption_dropout_rate": 0.0,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--no-quantize", action="store_true")
    a = ap.parse_args()

    run_dir = os.path.join(a.work, f"res{a.resolution}")
    data = os.path.join(run_dir, "data")
    os.makedirs(data, exist_ok=True)
    img = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(data, "img0.png"))
    with open(os.path.join(data, "img0.txt"), "w") as f:
        f.write("a photo of a red fox sitting in a snowy forest at dawn, detailed fur, soft light")

    cfg = {
        "job": "extension",
        "config": {
            "name": f"bench_flux_lora_res{a.resolution}",
            "process": [{
                "type": "sd_trainer",
                "training_folder": os.path.join(run_dir, "output"),
                "device": a.device,
                "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
                "save": {"dtype": "float16", "save_every": 100000, "max_step_saves_to_keep": 1,
                         "push_to_hub": False},
                "datasets": [{
                    "folder_path": data,
                    "caption_ext": "txt",
                    "caption_dropout_rate": 0.0,
                    "shuffle_tokens": False,
                    "cache_latents_to_disk": True,
                    "cache_text_embeddings": True,
                    "resolution": [a.resolution],
                }],
                "train": {
                    "batch_size": 1,
                    "steps": a.steps,
                    "gradient_accumulation_steps": 1,
                    "train_unet": True,
                    "train_text_encoder": False,
                    "gradient_checkpointing": True,
                    "noise_scheduler": "flowmatch",
                    "optimizer": "adamw",
                    "lr": 1e-4,
                    "cfg_scale": 1.0,
                    "skip_first_sample": True,
                    "disable_sampling": True,
                    "ema_config": {"use_ema": False},
                    "dtype": "bf16",
                },
                "model": {
                    "name_or_path": os.path.abspath(a.model),
                    "is_flux": True,
                    "quantize": not a.no_quantize,
                    "low_vram": False,
                },
                "logging": {"log_every": 100000, "use_wandb": False, "verbose": False},
                "sample": {
                    "sampler": "flowmatch", "sample_every": 100000, "width": a.resolution, "height": a.resolution,
                    "prompts": ["a red fox"], "neg": "", "seed": 42, "walk_seed": True, "guidance_scale": 4,
                    "sample_steps": 20,
                },
            }],
        },
        "meta": {"name": "[name]", "version": "1.0"},
    }
    path = os.path.join(run_dir, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    with open(os.path.join(run_dir, "settings.json"), "w") as f:
        json.dump(settings(a), f)
    print(path)


if __name__ == "__main__":
    main()
