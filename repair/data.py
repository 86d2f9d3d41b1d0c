"""Image folders, class names, templates, few-shot sampling and the image-feature cache.

An ImageFolder directory (one sub-folder per class) is the dataset. Classes are sorted by
folder name, which fixes the label order and therefore the base/novel split. The feature
cache is keyed by the image tower's fingerprint and the *content* hashes of the images, so a
moved or renamed folder still hits, and a changed byte never does.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from repair.backbone import Backbone, ImageEncoder
from repair.checkpoints import write_cache_entry
from repair.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CACHE_FORMAT = "mergetune-features/2"  # raw (unnormalised) float32 features


@dataclass(frozen=True)
class ImageFolder:
    """A labelled list of image files; cheap to subset, hashes its files on demand."""

    root: Path
    folders: tuple[str, ...]
    classnames: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.folders)

    def subset(self, indices: Sequence[int]) -> ImageFolder:
        return replace(self, files=tuple(self.files[i] for i in indices),
                       labels=tuple(self.labels[i] for i in indices))

    def indices_by_class(self) -> list[list[int]]:
        by_class: list[list[int]] = [[] for _ in self.folders]
        for index, label in enumerate(self.labels):
            by_class[label].append(index)
        return by_class

    def few_shot(self, shots: int | None, seed: int) -> ImageFolder:
        """``shots`` images per class drawn with ``seed``; a class with fewer keeps all of them
        (as Dassl does); all images when ``shots`` is None."""
        if shots is None:
            return self
        rng = random.Random(seed)
        chosen: list[int] = []
        for indices in self.indices_by_class():
            chosen.extend(sorted(rng.sample(indices, min(shots, len(indices)))))
        return self.subset(chosen)

    def split(self, fraction: float, seed: int) -> tuple[ImageFolder, ImageFolder]:
        """Stratified (train, held-out) split; every class keeps at least one training image."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"validation fraction must be between 0 and 1, got {fraction}")
        rng = random.Random(seed)
        train: list[int] = []
        held_out: list[int] = []
        for indices in self.indices_by_class():
            shuffled = list(indices)
            rng.shuffle(shuffled)
            count = min(len(shuffled) - 1, round(fraction * len(shuffled)))
            held_out.extend(shuffled[:count])
            train.extend(shuffled[count:])
        if not held_out:
            raise DataError(f"{self.root}: too few images for a validation split of {fraction}")
        return self.subset(sorted(train)), self.subset(sorted(held_out))

    def file_hashes(self) -> list[str]:
        return [_sha256_cached(path) for path in self.files]

    def manifest_sha256(self) -> str:
        """One hash for exactly these labelled images: what an output records as its data."""
        digest = hashlib.sha256()
        for path, label, file_hash in zip(self.files, self.labels, self.file_hashes()):
            digest.update(f"{self.folders[label]}\t{path.name}\t{file_hash}\n".encode())
        return digest.hexdigest()


_HASHES: dict[tuple[Path, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    """Content hash, remembered per (path, size, mtime) within one process."""
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _HASHES[key]


def scan_image_folder(root: str | Path, classnames_file: str | Path | None = None) -> ImageFolder:
    """Read an ImageFolder tree; class names from the folder names or from ``classnames_file``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        images = sorted(
            path for path in (root / folder).iterdir()
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
        )
        if not images:
            raise DataError(f"{root / folder}: class folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files.extend(images)
        labels.extend([label] * len(images))
    if len(folders) < 2:
        raise DataError(f"{root}: needs one sub-folder per class and at least 2 classes, found {len(folders)}")
    classnames = load_classnames(classnames_file, folders) if classnames_file else default_classnames(folders)
    return ImageFolder(root, tuple(folders), tuple(classnames), tuple(files), tuple(labels))


def default_classnames(folders: Sequence[str]) -> list[str]:
    return [folder.replace("_", " ").strip() for folder in folders]


def load_classnames(path: str | Path, folders: Sequence[str]) -> list[str]:
    """Display names for the folders, from JSON or text.

    JSON: ``{"folder": "name"}``, a list of names in folder order, or a list of
    ``{"folder": ..., "name": ...}`` records. Text: ``folder<TAB or colon>name`` per line,
    or one name per line in sorted folder order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class names ({exc.__class__.__name__})") from None
    mapping = _parse_classnames(path, text, folders)
    missing = [folder for folder in folders if folder not in mapping]
    if missing:
        raise DataError(f"{path}: no class name for folder(s) {', '.join(missing[:5])}")
    return [mapping[folder] for folder in folders]


def _parse_classnames(path: Path, text: str, folders: Sequence[str]) -> dict[str, str]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):
            return {str(key): str(value) for key, value in data.items()}
        if isinstance(data, list) and all(isinstance(item, dict) for item in data):
            try:
                return {str(item["folder"]): str(item["name"]) for item in data}
            except KeyError:
                raise DataError(f"{path}: JSON records need 'folder' and 'name'") from None
        if isinstance(data, list) and all(isinstance(item, str) for item in data):
            return _names_in_folder_order(path, data, folders)
        raise DataError(f"{path}: expected an object folder->name or a list of names")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    pairs = [_split_pair(line) for line in lines]
    if pairs and all(pair is not None and pair[0] in folders for pair in pairs):
        return dict(pair for pair in pairs if pair is not None)
    return _names_in_folder_order(path, lines, folders)


def _split_pair(line: str) -> tuple[str, str] | None:
    for separator in ("\t", ":"):
        if separator in line:
            folder, name = line.split(separator, 1)
            return folder.strip(), name.strip()
    return None


def _names_in_folder_order(path: Path, names: Sequence[str], folders: Sequence[str]) -> dict[str, str]:
    if len(names) != len(folders):
        raise DataError(f"{path}: {len(names)} class names for {len(folders)} class folders")
    return dict(zip(folders, names))


def load_templates(path: str | Path | None) -> list[str]:
    """Prompt templates with one ``{}`` each: one per line of a text file, or a JSON list."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read templates ({exc.__class__.__name__})") from None
    if path.suffix.lower() == ".json":
        try:
            templates = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg})") from None
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise DataError(f"{path}: expected a JSON list of template strings")
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [template for template in templates if template.count("{}") != 1]
    if not templates or bad:
        raise DataError(f"{path}: every template needs exactly one '{{}}' for the class name"
                        + (f" (bad: {bad[0]!r})" if bad else " (file is empty)"))
    return templates


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class Features:
    """Image features (or pixels, for kinds that train the image tower), row-aligned with ``labels``."""

    features: torch.Tensor  # [N, embed_dim] float32, normalised unless asked otherwise
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, files: Sequence[Path], transform) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(open_image(self.files[index]))


def open_image(path: Path) -> Image.Image:
    """Decode one image as RGB; a corrupt file is a DataError naming it (we never guess labels)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__}); remove or replace it") from None


def default_cache_dir() -> Path:
    env = os.environ.get("MERGETUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergetune"


def features_cache_key(encoder: ImageEncoder, file_hashes: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}\n{encoder.fingerprint}\n".encode())
    digest.update("\n".join(file_hashes).encode())
    return digest.hexdigest()


def features_cache_file(cache_dir: Path, encoder: ImageEncoder, dataset: ImageFolder) -> Path:
    """Where the features of exactly these images under this tower are cached."""
    return Path(cache_dir) / "features" / f"{features_cache_key(encoder, dataset.file_hashes())}.safetensors"


def extract_features(
    backbone: Backbone,
    dataset: ImageFolder,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    normalize: bool = True,
    encoder: ImageEncoder | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Features:
    """Encode every image once (the backbone's frozen tower unless ``encoder`` is given); reuse the cache."""
    encoder = encoder or backbone.image_encoder
    labels = torch.tensor(dataset.labels, dtype=torch.long, device=backbone.device)
    cache_file = features_cache_file(cache_dir, encoder, dataset) if cache_dir is not None else None
    features = _read_cache(cache_file, len(dataset)) if cache_file is not None else None
    if features is None:
        features = _encode_files(backbone, encoder, dataset.files, batch_size=batch_size, workers=workers,
                                 on_progress=on_progress)
        if cache_file is not None:
            _write_cache(cache_file, features)
    features = features.to(backbone.device)
    return Features(F.normalize(features, dim=-1) if normalize else features, labels)


def load_pixels(backbone: Backbone, dataset: ImageFolder, *, batch_size: int = 64, workers: int = 0) -> Features:
    """Decoded, preprocessed images in memory: the few-shot inputs of kinds whose image tower trains."""
    loader = torch.utils.data.DataLoader(
        _ImageFiles(dataset.files, backbone.preprocess), batch_size=batch_size, num_workers=workers)
    pixels = torch.cat(list(loader)).to(backbone.device)
    return Features(pixels, torch.tensor(dataset.labels, dtype=torch.long, device=backbone.device))


def _encode_files(backbone: Backbone, encoder: ImageEncoder, files: Sequence[Path], *, batch_size: int,
                  workers: int, on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Stream the images through the tower in batches; only the features are kept."""
    loader = torch.utils.data.DataLoader(
        _ImageFiles(files, backbone.preprocess), batch_size=batch_size, num_workers=workers, shuffle=False
    )
    chunks = []
    with torch.inference_mode():
        for pixels in loader:
            chunks.append(encoder.encode(pixels.to(backbone.device)).float().cpu())
            if on_progress is not None:
                on_progress(sum(len(chunk) for chunk in chunks), len(files))
    return torch.cat(chunks).clone()


def _read_cache(path: Path, expected_rows: int) -> torch.Tensor | None:
    """The cached features, memory-mapped (pages load on demand, and stay file-backed)."""
    features = map_cached_features(path)
    if features is None or features.shape[0] != expected_rows or not torch.isfinite(features).all():
        return None
    return features


def map_cached_features(path: Path) -> torch.Tensor | None:
    """Map the ``features`` tensor of a cache entry without reading it; None if absent or malformed."""
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > 1 << 20:
                return None
            header = json.loads(handle.read(header_length))
        entry = header["features"]
        rows, columns = entry["shape"]
        start, end = entry["data_offsets"]
        if entry["dtype"] != "F32" or end - start != rows * columns * 4:
            return None
        mapped = np.memmap(path, dtype=np.float32, mode="c", offset=8 + header_length + start, shape=(rows, columns))
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return torch.from_numpy(mapped)  # copy-on-write mapping: writable for torch, never written back


def _write_cache(path: Path, features: torch.Tensor) -> None:
    write_cache_entry(path, {"features": features})
