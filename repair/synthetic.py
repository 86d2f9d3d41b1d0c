"""A tiny CLIP and generated images: the offline default for `mergetune demo` and the tests.

Nothing here downloads anything. The tiny architecture ships as a JSON config inside the
package; its random weights are saved as an open_clip ``local-dir:`` folder so every
command loads it exactly as it would load a real model from the Hub.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

TINY_CONFIG = Path(__file__).parent / "configs" / "mergetune-tiny.json"
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 130, 190),
}


def save_tiny_backbone(folder: Path, seed: int = 0, model_cfg: dict | None = None) -> str:
    """Write a randomly initialised tiny CLIP (or ``model_cfg``'s) as an open_clip local-dir; returns
    ``local-dir:PATH``."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = model_cfg or json.loads(TINY_CONFIG.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    state = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    config = {"model_cfg": model_cfg, "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return f"local-dir:{folder}"


def make_image_folder(root: Path, classes: Sequence[str], per_class: int, *, seed: int = 0, size: int = 32) -> Path:
    """One sub-folder per colour class; each image a noisy shape of that colour on a random background."""
    rng = random.Random(seed)
    for name in classes:
        colour = COLOURS[name]
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            _draw(colour, size, rng).save(root / name / f"{index:04d}.png")
    return root


def _draw(colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    jitter = tuple(max(0, min(255, channel + rng.randint(-30, 30))) for channel in colour)
    x0, y0 = rng.randint(0, size // 3), rng.randint(0, size // 3)
    x1, y1 = rng.randint(2 * size // 3, size - 1), rng.randint(2 * size // 3, size - 1)
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=jitter)
    return image
