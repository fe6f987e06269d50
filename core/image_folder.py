"""Training images from a folder: captions, kohya repeat folders, colour conversion and aspect-ratio buckets."""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: "10_sks dog" repeats its images 10 times per epoch
BUCKET_STEP = 64  # bucket sides are multiples of 64 px: 8 latent pixels, 4 Flux patches
MISSING_CAPTION_POLICIES = ("error", "empty caption")


class DatasetError(ValueError):
    """A problem with the training images, naming the file and what to do."""


@dataclass
class ImageEntry:
    path: str
    caption: str | None  # None: no .txt beside the image
    repeats: int


def scan_folder(folder: str) -> list[ImageEntry]:
    """Images directly in ``folder`` (repeats 1) and in its kohya ``N_name`` subfolders (repeats N), sorted.

    Other subfolders are not read. Captions come from the same-name ``.txt`` file (UTF-8).
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"the folder {folder} does not exist")
    places = [(folder, 1)]
    for name in sorted(os.listdir(folder)):
        match = REPEAT_FOLDER.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            places.append((os.path.join(folder, name), int(match.group(1))))
    entries = []
    for place, repeats in places:
        for name in sorted(os.listdir(place)):
            path = os.path.join(place, name)
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                continue
            caption_path = os.path.splitext(path)[0] + ".txt"
            caption = None
            if os.path.isfile(caption_path):
                try:
                    with open(caption_path, encoding="utf-8-sig") as f:
                        caption = " ".join(f.read().split())
                except UnicodeDecodeError as e:
                    raise DatasetError(f"the caption {caption_path} is not UTF-8 text (byte {e.start} is "
                                       f"0x{e.object[e.start]:02x}); save it as UTF-8") from e
            if repeats > 0:
                entries.append(ImageEntry(path, caption, repeats))
    if not entries:
        raise DatasetError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {folder} or its "
                           "'N_name' repeat folders")
    return entries


def final_caption(caption: str | None, trigger_word: str, policy: str, path: str) -> str:
    """The text a sample trains with: the trigger word first, then the caption."""
    if caption is None:
        if policy == "error":
            raise DatasetError(f"{path} has no caption file {os.path.splitext(os.path.basename(path))[0]}.txt; "
                               "add one, or set missing_captions to 'empty caption'")
        caption = ""
    trigger_word = trigger_word.strip()
    if trigger_word and caption:
        return f"{trigger_word}, {caption}"
    return trigger_word or caption


def folder_fingerprint(folder: str) -> str:
    """Changes whenever an image or caption is added, removed, or rewritten (name, size, modification time)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS + (".txt",)):
                st = os.stat(os.path.join(root, name))
                h.update(f"{os.path.relpath(os.path.join(root, name), folder)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_rgb(path: str) -> Image.Image:
    """The image as 8-bit RGB, upright, whatever its mode.

    Transparency is composited onto white; 16-bit images are scaled to 8 bits (not clipped); CMYK and palette
    images are converted. A truncated or unreadable file raises DatasetError naming it.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # ComfyUI may leave this on; a truncated training image is an error
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Image.DecompressionBombError as e:  # Pillow refuses > 2 x MAX_IMAGE_PIXELS before decoding
        raise DatasetError(f"{path} is too large to open safely ({e}); downscale it (training resizes every image "
                           "to the bucket resolution anyway)") from e
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path} is unreadable or truncated ({e}); re-export or remove it") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        if mode != "I" or values.max() > 255:
            values = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The training size for a ``width`` x ``height`` image: about ``resolution``² pixels, the image's aspect
    ratio, sides in multiples of 64, and never more pixels than the image has on either side (no upscaling)."""
    if width < BUCKET_STEP or height < BUCKET_STEP:
        raise DatasetError(f"an image of {width}x{height} is smaller than {BUCKET_STEP} px on a side")
    scale = min(1.0, resolution / math.sqrt(width * height))
    return (max(BUCKET_STEP, int(width * scale) // BUCKET_STEP * BUCKET_STEP),
            max(BUCKET_STEP, int(height * scale) // BUCKET_STEP * BUCKET_STEP))


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Downscale ``image`` (never up) until it covers ``size``, then centre-crop to it."""
    w, h = size
    scale = max(w / image.width, h / image.height)
    if scale < 1.0:
        image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                             Image.Resampling.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


def training_pixels(path: str, resolution: int) -> np.ndarray:
    """[H, W, 3] float32 in 0..1, bucketed for ``resolution``: what the VAE encodes."""
    image = load_rgb(path)
    try:
        size = bucket_size(image.width, image.height, resolution)
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}; training images need at least {BUCKET_STEP} px") from e
    return np.asarray(fit_to_bucket(image, size), dtype=np.float32) / 255.0
