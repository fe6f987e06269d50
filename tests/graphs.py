"""API-format prompt pieces for tests on tiny random Flux models (context 48, pooled 32)."""


def training_graph(model_name, steps=3, guidance=1.0, with_guidance_node=True, prefix="test/lora", rank=4,
                   cond_guidance=3.5, seed=0, learning_rate=1e-3, images=2):
    g = {
        "load": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": model_name, "weight_dtype": "fp8_e4m3fn"}},
        "guidance": {"class_type": "Dev2ProTrainingGuidance", "inputs": {"model": ["load", 0], "guidance": guidance}},
        "latents": {"class_type": "TestDev2ProLatents", "inputs": {"count": images, "size": 8, "seed": 1}},
        "cond": {"class_type": "TestDev2ProConditioning", "inputs": {
            "context_dim": 48, "pooled_dim": 32, "tokens": 6, "count": images, "seed": 2, "guidance": cond_guidance}},
        "dataset": {"class_type": "Dev2ProDatasetFromLatents", "inputs": {"latents": ["latents", 0], "conditioning": ["cond", 0]}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": {
            "model": ["guidance" if with_guidance_node else "load", 0], "dataset": ["dataset", 0], "steps": steps,
            "learning_rate": learning_rate, "rank": rank, "alpha": float(rank), "seed": seed,
            "gradient_checkpointing": True}},
        "save": {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": prefix}},
    }
    if not with_guidance_node:
        del g["guidance"]
    return g


def sampling_nodes(model_ref, prefix, guidance=3.5, seed=0):
    """KSampler on ``model_ref`` with FluxGuidance, writing the latent with SaveLatent under ``prefix``."""
    return {
        f"{prefix}_cond": {"class_type": "TestDev2ProConditioning", "inputs": {
            "context_dim": 48, "pooled_dim": 32, "tokens": 6, "count": 1, "seed": 9, "guidance": 0.0}},
        f"{prefix}_fluxguidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": [f"{prefix}_cond", 0], "guidance": guidance}},
        f"{prefix}_empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        f"{prefix}_sampler": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": [f"{prefix}_fluxguidance", 0], "negative": [f"{prefix}_fluxguidance", 0],
            "latent_image": [f"{prefix}_empty", 0], "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "denoise": 1.0}},
        f"{prefix}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{prefix}_sampler", 0], "filename_prefix": prefix}},
    }
