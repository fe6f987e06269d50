"""Encoding a folder dataset once: latents and text embeddings cached on disk, keyed on what they depend on.

An image's latent is keyed on the image file's bytes, the training resolution and the VAE; a caption's embedding
on its text, the token length and the text encoder. Re-queuing reads the cache; a changed image or caption,
resolution, VAE or text encoder makes a new entry. Entries are written atomically and a damaged one is re-made.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .atomic_files import cause_in_words, is_file_system_error, temp_file, tensor_bytes
from .dataset import TrainingDataset, TrainingSample
from .image_folder import DatasetError, file_sha256, final_caption, scan_folder, training_pixels

log = logging.getLogger("dev2pro-lora")
CACHE_VERSION = 1  # bump when encoding or bucketing changes what an entry holds

# encode_image([1, H, W, 3] float 0..1) -> [1, 16, H/8, W/8]; encode_text(text, min_tokens) -> ([L, D], [P]).
ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]


def model_fingerprint(state_dict: dict[str, torch.Tensor], sample: int = 4096) -> str:
    """Identifies a model's weights from every tensor's name, shape, dtype and first ``sample`` values (fast even
    for T5-XXL, and different for any two real checkpoints)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.detach().reshape(-1)[:sample]
        h.update(flat.to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


@dataclass
class EncodeCache:
    root: str
    hits: int = 0
    misses: int = 0
    unwritable: int = 0  # entries made but not stored (read-only or full disk)
    read_only: bool = False  # a torchrun rank other than 0: only rank 0 writes files

    def path_for(self, kind: str, key: dict) -> str:
        digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
        return os.path.join(self.root, kind, digest[:2], digest + ".safetensors")

    def get(self, kind: str, key: dict, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        path = self.path_for(kind, key)
        if os.path.isfile(path):
            try:
                tensors = load_file(path)
                self.hits += 1
                return tensors
            except Exception as e:  # a damaged entry (disk full, killed mid-write elsewhere): make it again
                log.warning("dev2pro-lora: re-making damaged cache entry %s (%s)", path, e)
        tensors = {k: v.detach().cpu().contiguous() for k, v in make().items()}
        self.misses += 1
        if self.read_only:
            return tensors
        try:
            self._store(path, tensors)
        except Exception as e:  # a read-only or full disk: the dataset is built all the same, only not cached
            if not is_file_system_error(e):
                raise
            self.unwritable += 1
            if self.unwritable == 1:
                log.warning("dev2pro-lora: cannot write the encode cache in %s (%s); encoding goes on without "
                            "caching, so the next run encodes again. Free space or make it writable.", self.root,
                            cause_in_words(e, os.path.dirname(path), tensor_bytes(tensors)))
        return tensors

    @staticmethod
    def _store(path: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = temp_file(os.path.dirname(path))  # also clears what a killed encode left there
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def build_folder_dataset(folder: str, resolution: int, trigger_word: str, missing_captions: str,
                         encode_image: ImageEncoder, encode_text: TextEncoder, vae_id: str, text_encoder_id: str,
                         cache: EncodeCache, on_progress: Callable[[int, int], None] | None = None) -> TrainingDataset:
    """Scan ``folder``, encode what the cache lacks, and return the samples with the encoded empty caption.

    All captions are encoded to one token length (the longest caption's), so any of them can share a batch.
    """
    entries = scan_folder(folder)
    captions = [final_caption(e.caption, trigger_word, missing_captions, e.path) for e in entries]
    total = 2 * len(entries) + 1
    done = 0

    def text(caption: str, min_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = {"text": caption, "min_tokens": min_tokens, "encoder": text_encoder_id}

        def make():
            context, pooled = encode_text(caption, min_tokens)
            return {"context": context, "pooled": pooled}

        t = cache.get("text", key, make)
        return t["context"], t["pooled"]

    with torch.no_grad():  # the encoders' weights may require grad; nothing here is trained
        embeddings = []
        for caption in captions:
            embeddings.append(text(caption, 0))
            done += 1
            if on_progress:
                on_progress(done, total)
        length = max(context.shape[0] for context, _ in embeddings)
        embeddings = [e if e[0].shape[0] == length else text(c, length) for e, c in zip(embeddings, captions)]
        empty = text("", length)
        if empty[0].shape[0] != length:
            raise DatasetError(f"the text encoder gave {empty[0].shape[0]} tokens for the empty caption, not {length}")
        done += 1
        latents = []
        for entry in entries:
            key = {"image": file_sha256(entry.path), "resolution": resolution, "vae": vae_id}

            def make(path=entry.path):
                pixels = torch.from_numpy(training_pixels(path, resolution))[None]
                return {"latent": encode_image(pixels)[0]}

            latents.append(cache.get("latent", key, make)["latent"])
            done += 1
            if on_progress:
                on_progress(done, total)
    with torch.inference_mode(False):  # ordinary tensors: autograd refuses inference tensors
        samples = [TrainingSample(latent.clone(), context.clone(), pooled.clone(), caption, entry.repeats)
                   for entry, caption, latent, (context, pooled) in zip(entries, captions, latents, embeddings)]
        dataset = TrainingDataset(samples, empty_caption=(empty[0].clone(), empty[1].clone()))
    sizes = sorted({(s.latent.shape[-1] * 8, s.latent.shape[-2] * 8) for s in samples})
    log.info("dev2pro-lora: dataset %s: %d images in buckets %s; %d encoded, %d from the cache", folder, len(samples),
             " ".join(f"{w}x{h}" for w, h in sizes), cache.misses, cache.hits)
    return dataset
