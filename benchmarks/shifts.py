"""Image shifts: the downstream style of a task and the corruptions of the robustness suite.

Every shift is a pure function of the image and a seed derived from the file name, so a
corrupted test set is the same on every machine. Strengths are given for a 32-pixel image and
scale with the image's shorter side, so a 224-pixel dataset gets the same visual effect.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageFilter

Shift = Callable[[Image.Image, random.Random], Image.Image]


def _scale(image: Image.Image) -> float:
    return min(image.size) / 32


def blur(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=1.2 * _scale(image)))


def noise(image: Image.Image, rng: random.Random) -> Image.Image:
    """Additive Gaussian noise, sigma 0.08 of the pixel range, drawn from the image's own seed."""
    import numpy as np

    pixels = np.asarray(image, dtype=np.float32)
    generator = np.random.default_rng(rng.getrandbits(63))
    noisy = pixels + generator.normal(0.0, 0.08 * 255, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def contrast(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(0.35)


def jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=8)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def low_resolution(image: Image.Image, rng: random.Random) -> Image.Image:
    """Down to a quarter of the side (8 pixels for a 32-pixel image) and back up."""
    width, height = image.size
    small = image.resize((max(1, width // 4), max(1, height // 4)), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BILINEAR)


def grayscale(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.convert("L").convert("RGB")


def identity(image: Image.Image, rng: random.Random) -> Image.Image:
    return image


CORRUPTIONS: dict[str, Shift] = {
    "blur": blur, "noise": noise, "contrast": contrast, "jpeg": jpeg, "low-res": low_resolution,
    "grayscale": grayscale,
}
STYLES: dict[str, Shift] = {"none": identity, "blur": blur, "grayscale": grayscale, "low-res": low_resolution}


def seeded_rng(name: str, key: str) -> random.Random:
    """A generator that depends only on the shift and the file's name."""
    return random.Random(int.from_bytes(hashlib.sha256(f"{name}:{key}".encode()).digest()[:8], "big"))


def apply(shifts: list[tuple[str, Shift]], image: Image.Image, key: str) -> Image.Image:
    for name, shift in shifts:
        image = shift(image, seeded_rng(name, key))
    return image
