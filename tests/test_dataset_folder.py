"""Dataset from Folder: captions and repeat folders, colour conversion, buckets, clear errors, and the on-disk
encode cache, with a real (random-weight) Flux VAE and CLIP-L loaded by ComfyUI's own loaders."""
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import random_models
from conftest import ExecutionFailed


@pytest.fixture(scope="module")
def encoders(comfy):
    """ComfyUI's VAE and CLIP objects from random full-size files, with counters on their encoders."""
    import nodes

    random_models.write_flux_vae(comfy.path("vae", "folder_vae.safetensors"))
    random_models.write_clip_l(comfy.path("text_encoders", "folder_clip_l.safetensors"))
    with torch.inference_mode():
        vae = nodes.VAELoader().load_vae("folder_vae.safetensors")[0]
        clip = nodes.CLIPLoader().load_clip("folder_clip_l.safetensors", "stable_diffusion")[0]
    counts = {"image": 0, "text": 0}
    vae.first_stage_model.encoder.register_forward_hook(lambda *a: counts.__setitem__("image", counts["image"] + 1))
    clip.cond_stage_model.clip_l.transformer.register_forward_hook(lambda *a: counts.__setitem__("text", counts["text"] + 1))
    return vae, clip, counts, comfy.pack.nodes.dataset_nodes


def write_image(path, size=(96, 64), color=(200, 30, 30), caption="a red square"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(caption)


@pytest.mark.parametrize("size, resolution, bucket", [
    ((1024, 1024), 1024, (1024, 1024)),
    ((3000, 2000), 1024, (1216, 832)),
    ((2000, 3000), 512, (384, 576)),
    ((300, 200), 1024, (256, 192)),  # small images are never scaled up
    ((64, 64), 512, (64, 64)),
])
def test_bucket_keeps_aspect_and_never_upscales(core, size, resolution, bucket):
    assert core.image_folder.bucket_size(*size, resolution) == bucket
    assert bucket[0] <= size[0] and bucket[1] <= size[1] and bucket[0] % 64 == 0 and bucket[1] % 64 == 0


def test_images_are_cropped_to_their_bucket(core, tmp_path):
    write_image(str(tmp_path / "wide.png"), size=(1500, 700))
    pixels = core.image_folder.training_pixels(str(tmp_path / "wide.png"), 512)
    assert pixels.shape == (320, 704, 3)


def test_colour_modes_are_converted(core, tmp_path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red -> white background
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (64, 64), 77).save(tmp_path / "gray.png")
    Image.fromarray(np.full((64, 64), 32896, dtype=np.uint16)).save(tmp_path / "gray16.png")  # 32896/257 = 128
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    load = core.image_folder.load_rgb
    assert load(str(tmp_path / "rgba.png")).getpixel((5, 5)) == (255, 255, 255)
    assert load(str(tmp_path / "rgba.png")).getpixel((0, 0)) == (0, 0, 255)
    assert load(str(tmp_path / "gray.png")).getpixel((3, 3)) == (77, 77, 77)
    assert load(str(tmp_path / "gray16.png")).getpixel((3, 3)) == (128, 128, 128)
    r, g, b = load(str(tmp_path / "cmyk.jpg")).getpixel((3, 3))
    assert r < 10 and g > 245 and b > 245  # full cyan


def test_truncated_and_unreadable_images_are_named(core, tmp_path):
    write_image(str(tmp_path / "ok.png"), size=(256, 256))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_bytes(b"not an image")
    for name in ("cut.png", "text.png"):
        with pytest.raises(core.image_folder.DatasetError, match=name):
            core.image_folder.load_rgb(str(tmp_path / name))


def test_folder_scan_repeats_captions_and_trigger_word(core, tmp_path):
    write_image(str(tmp_path / "a.png"), caption="first")
    write_image(str(tmp_path / "3_dog" / "b.jpg"), caption="second\n")
    write_image(str(tmp_path / "notes" / "c.png"))  # not an N_name folder: not read
    entries = core.image_folder.scan_folder(str(tmp_path))
    assert [(os.path.basename(e.path), e.caption, e.repeats) for e in entries] == [("a.png", "first", 1), ("b.jpg", "second", 3)]
    assert core.image_folder.final_caption("first", "sks", "error", "a.png") == "sks, first"
    assert core.image_folder.final_caption(None, "sks", "empty caption", "a.png") == "sks"


def test_folder_errors_name_the_problem(core, tmp_path):
    with pytest.raises(core.image_folder.DatasetError, match="no images"):
        core.image_folder.scan_folder(str(tmp_path))
    write_image(str(tmp_path / "lonely.png"), caption=None)
    with pytest.raises(core.image_folder.DatasetError, match="lonely.png has no caption file lonely.txt"):
        core.image_folder.final_caption(None, "", "error", str(tmp_path / "lonely.png"))


def build(core, folder, encoders, cache_root, resolution=128, trigger=""):
    dataset_nodes = encoders[3]
    vae, clip = encoders[0], encoders[1]
    cache = core.encode_cache.EncodeCache(cache_root)
    with torch.inference_mode():
        data = core.encode_cache.build_folder_dataset(
            folder, resolution, trigger, "error", dataset_nodes.vae_encoder(vae), dataset_nodes.text_encoder(clip),
            "vae", "clip", cache)
    return data, cache


def test_encode_cache_hits_and_invalidation(core, comfy, encoders, tmp_path):
    folder, cache_root = str(tmp_path / "set"), str(tmp_path / "cache")
    write_image(os.path.join(folder, "a.png"), size=(128, 128), caption="one")
    write_image(os.path.join(folder, "b.png"), size=(192, 128), color=(0, 90, 200), caption="two")
    counts = encoders[2]
    counts.update(image=0, text=0)
    first, cache = build(core, folder, encoders, cache_root)
    assert counts == {"image": 2, "text": 3}  # two captions and the empty one
    assert [tuple(s.latent.shape) for s in first.samples] == [(16, 16, 16), (16, 8, 16)]  # 192x128 at 128² px -> 128x64
    assert first.samples[0].caption == "one" and first.empty_caption is not None

    counts.update(image=0, text=0)
    again, cache = build(core, folder, encoders, cache_root)
    assert counts == {"image": 0, "text": 0} and cache.hits == 5
    for a, b in zip(first.samples, again.samples):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)

    write_image(os.path.join(folder, "b.png"), size=(192, 128), color=(10, 200, 10), caption=None)  # new pixels
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("one, changed")
    counts.update(image=0, text=0)
    changed, _ = build(core, folder, encoders, cache_root)
    assert counts == {"image": 1, "text": 1}
    assert not torch.equal(changed.samples[1].latent, first.samples[1].latent)
    assert torch.equal(changed.samples[0].latent, first.samples[0].latent)

    counts.update(image=0, text=0)
    build(core, folder, encoders, cache_root, resolution=64)  # another training size: new latents, same text
    assert counts == {"image": 2, "text": 0}


def test_dataset_node_trains_and_reruns_when_a_caption_changes(comfy, encoders, request):
    random_models.write_flux(comfy.path("diffusion_models", "folder_flux.safetensors"), random_models.DEMO_FLUX, seed=4)
    folder = comfy.path("input", "node_set")
    write_image(os.path.join(folder, "a.png"), size=(128, 128), caption="one")
    write_image(os.path.join(folder, "2_more", "b.png"), size=(128, 64), caption="two")
    graph = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "folder_vae.safetensors"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "folder_clip_l.safetensors", "type": "stable_diffusion"}},
        "data": {"class_type": "Dev2ProDataset", "inputs": {"folder": "node_set", "vae": ["vae", 0], "clip": ["clip", 0],
                                                            "resolution": 128, "trigger_word": "sks"}},
        "load": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": "folder_flux.safetensors", "weight_dtype": "fp8_e4m3fn"}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": {
            "model": ["load", 0], "dataset": ["data", 0], "steps": 2, "learning_rate": 1e-3, "rank": 4, "alpha": 4.0,
            "seed": 0, "gradient_checkpointing": True, "batch_size": 2, "caption_dropout": 0.2}},
        "save": {"class_type": "Dev2ProSaveLoRA", "inputs": {"lora": ["train", 0], "filename_prefix": "folder/lora"}},
    }
    vae_encoder, text_model = type(encoders[0].first_stage_model.encoder), type(encoders[1].cond_stage_model.clip_l.transformer)
    counts = {"image": 0, "text": 0}

    def count(module, args, output):  # the graph loads its own VAE and CLIP: watch every module of their types
        if type(module) is vae_encoder:
            counts["image"] += 1
        elif type(module) is text_model:
            counts["text"] += 1

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    request.addfinalizer(hook.remove)
    outputs = comfy.run(graph)
    assert outputs["save"]["lora_files"]
    assert counts == {"image": 2, "text": 3}
    counts.update(image=0, text=0)
    comfy.run(graph)  # nothing changed on disk: ComfyUI reuses the node's result
    assert counts == {"image": 0, "text": 0}
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("one, now longer")
    os.utime(os.path.join(folder, "a.txt"), ns=(1, 1))
    comfy.run(graph)
    assert counts["text"] == 1 and counts["image"] == 0


def test_dataset_node_errors_name_node_and_input(comfy, encoders):
    folder = comfy.path("input", "uncaptioned")
    write_image(os.path.join(folder, "x.png"), size=(128, 128), caption=None)
    graph = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "folder_vae.safetensors"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "folder_clip_l.safetensors", "type": "stable_diffusion"}},
        "data": {"class_type": "Dev2ProDataset", "inputs": {"folder": "uncaptioned", "vae": ["vae", 0],
                                                            "clip": ["clip", 0], "resolution": 128}},
        "train": {"class_type": "PreviewAny", "inputs": {"source": ["data", 0]}},
    }
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(graph)
    assert "Dev2ProDataset (folder)" in caught.value.message and "x.png has no caption" in caught.value.message
    graph["data"]["inputs"]["folder"] = "missing_folder"
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(graph)
    assert "'missing_folder' is not a folder" in caught.value.message
    shutil.rmtree(folder)


def huge_png_header(path, width=20000, height=20000):
    """A PNG whose header says width x height (400 megapixels): Pillow refuses it from the header alone."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("fault, words", [
    ("latin-1 caption", "is not UTF-8 text (byte 5 is 0xe9); save it as UTF-8"),
    ("20000x20000 image", "is too large to open safely"),
])
def test_a_bad_caption_or_image_names_the_file_and_the_fix(comfy, encoders, fault, words):
    folder = comfy.path("input", f"faults_{fault.split()[0]}")
    write_image(os.path.join(folder, "fine.png"), size=(128, 128))
    if fault == "latin-1 caption":
        write_image(os.path.join(folder, "bad.png"), size=(128, 128), caption=None)
        with open(os.path.join(folder, "bad.txt"), "wb") as f:
            f.write("a caf\u00e9 photo".encode("latin-1"))
        named = os.path.join(folder, "bad.txt")
    else:
        huge_png_header(os.path.join(folder, "bad.png"))
        with open(os.path.join(folder, "bad.txt"), "w") as f:
            f.write("huge")
        named = os.path.join(folder, "bad.png")
    graph = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "folder_vae.safetensors"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "folder_clip_l.safetensors", "type": "stable_diffusion"}},
        "data": {"class_type": "Dev2ProDataset", "inputs": {"folder": os.path.basename(folder), "vae": ["vae", 0],
                                                            "clip": ["clip", 0], "resolution": 128}},
        "train": {"class_type": "PreviewAny", "inputs": {"source": ["data", 0]}},
    }
    with pytest.raises(ExecutionFailed) as caught:
        comfy.run(graph)
    message = caught.value.message
    assert message.startswith("Dev2ProDataset (folder): "), message
    assert named in message and words in message, message
    shutil.rmtree(folder)
