"""Encoding images into features, once: the feature cache, pixels for kinds that train a tower,
and sharded encoding over the ranks of a torch.distributed process group.

The feature cache is keyed by the image tower's fingerprint and the *content* hashes of the
images, so a moved or renamed folder still hits, and a changed byte never does. With
``shard=True`` and an initialised process group, each rank encodes a contiguous shard and the
shards are gathered in rank order, so every rank ends up with the rows one process would have
produced (equal up to float rounding, since batch boundaries move), and rank 0 writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from repair.data import group
from repair.data.folders import ImageFolder
from repair.errors import DataError
from repair.io import write_cache_entry
from repair.io.write import CHECKSUM_KEY, report_damaged, tensors_checksum
from repair.model.backbone import Backbone, ImageEncoder, default_cache_dir  # noqa: F401 (re-exported)

CACHE_FORMAT = "mergetune-features/3"  # raw (unnormalised) float32 features, checksummed


@dataclass(frozen=True)
class Features:
    """Image features (or pixels, for kinds that train the image tower), row-aligned with ``labels``."""

    features: torch.Tensor  # [N, embed_dim] float32, normalised unless asked otherwise
    labels: torch.Tensor  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class _ImageFiles(torch.utils.data.Dataset):
    """Decoded images; a failure travels as a message, so a worker process reports it in one line too."""

    def __init__(self, files: Sequence[Path], transform) -> None:
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.transform(open_image(self.files[index])), None
        except DataError as exc:
            return None, str(exc)


def _stacked(items: list[tuple[torch.Tensor | None, str | None]]) -> torch.Tensor:
    """The batch, or the first decoding failure raised here, in the process that reads the batches."""
    for _, error in items:
        if error is not None:
            raise DataError(error)
    return torch.stack([pixels for pixels, _ in items])


def _batches(files: Sequence[Path], transform, batch_size: int, workers: int):
    loader = torch.utils.data.DataLoader(_ImageFiles(files, transform), batch_size=batch_size, num_workers=workers,
                                         shuffle=False, collate_fn=list)
    return (_stacked(items) for items in loader)


def open_image(path: Path) -> Image.Image:
    """Decode one image as RGB; a corrupt file is a DataError naming it (we never guess labels)."""
    try:
        with Image.open(path) as image:
            return _as_rgb(image)
    except Image.DecompressionBombError:
        raise DataError(f"{path}: image too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} "
                        "pixels); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__}); remove or replace it") from None


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. PIL's own conversion clips a 16-bit or 32-bit grey image at 255 (almost
    all white): such values are scaled from their full range instead (16 bits; floats from 0..1 when they all
    lie there, else read as 0..255)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        scaled = np.asarray(image).astype(np.float64).clip(0, 65535) / 257.0
    elif image.mode == "F":
        values = np.nan_to_num(np.asarray(image).astype(np.float64))
        scaled = (values * 255.0 if values.max(initial=0.0) <= 1.0 else values).clip(0.0, 255.0)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L").convert("RGB")


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
    shard: bool = False,
) -> Features:
    """Encode every image once (the backbone's frozen tower unless ``encoder`` is given); reuse the cache.

    With ``shard`` and an active process group, the ranks split the encoding; every rank must call
    this with the same arguments and every rank returns all rows. ``on_progress`` counts this rank's part.
    """
    encoder = encoder or backbone.image_encoder
    sharded = shard and group.active()
    if sharded:
        _check_same_images(dataset)
    cache_file = features_cache_file(cache_dir, encoder, dataset) if cache_dir is not None else None
    features = _read_cache(cache_file, len(dataset)) if cache_file is not None else None
    # under a group, ranks must take the same branch around collectives: encode unless all have the cache
    if (not group.all_ranks(features is not None)) if sharded else features is None:
        if sharded:
            features = _encode_shards(backbone, encoder, dataset, batch_size=batch_size, workers=workers,
                                      on_progress=on_progress)
        else:
            features = _encode_files(backbone, encoder, dataset.files, batch_size=batch_size, workers=workers,
                                     on_progress=on_progress)
        if cache_file is not None and group.rank_and_world()[0] == 0:
            _write_cache(cache_file, features)
        if sharded:
            group.barrier()  # the cache is complete before any rank moves on
    features = features.to(backbone.device)
    labels = torch.tensor(dataset.labels, dtype=torch.long, device=backbone.device)
    return Features(F.normalize(features, dim=-1) if normalize else features, labels)


def load_pixels(backbone: Backbone, dataset: ImageFolder, *, batch_size: int = 64, workers: int = 0) -> Features:
    """Decoded, preprocessed images in memory: the few-shot inputs of kinds whose image tower trains."""
    pixels = torch.cat(list(_batches(dataset.files, backbone.preprocess, batch_size, workers))).to(backbone.device)
    return Features(pixels, torch.tensor(dataset.labels, dtype=torch.long, device=backbone.device))


def _encode_files(backbone: Backbone, encoder: ImageEncoder, files: Sequence[Path], *, batch_size: int,
                  workers: int, on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Stream the images through the tower in batches; only the features are kept."""
    chunks = []
    with torch.inference_mode():
        for pixels in _batches(files, backbone.preprocess, batch_size, workers):
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
    """Map the ``features`` tensor of a cache entry (pages load on demand and stay file-backed) and
    check it against the entry's checksum; None if absent, malformed or damaged (then said once)."""
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
    except (FileNotFoundError, NotADirectoryError):  # not cached (yet), or no cache folder to hold it
        return None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return report_damaged(path)
    features = torch.from_numpy(mapped)  # copy-on-write mapping: writable for torch, never written back
    if (header.get("__metadata__") or {}).get(CHECKSUM_KEY) != tensors_checksum({"features": features}):
        return report_damaged(path)
    return features


def _write_cache(path: Path, features: torch.Tensor) -> None:
    write_cache_entry(path, {"features": features})


def _check_same_images(dataset: ImageFolder) -> None:
    """Every rank encodes its slice of *its own* file list and the slices are joined in rank order: a
    machine that sees other images (a file more or less, another size, other class folders) would give
    rows that do not match the labels, a silently wrong score. Names and sizes are compared, not content."""
    digests = group.gather_objects(dataset.listing_sha256())
    others = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
    if others:
        raise DataError(f"{dataset.root}: rank {others[0]} sees other images here than rank 0 (files, sizes or class "
                        "folders differ); every machine needs the same data at the same path")


def _encode_shards(backbone: Backbone, encoder: ImageEncoder, dataset: ImageFolder, *, batch_size: int,
                   workers: int, on_progress: Callable[[int, int], None] | None) -> torch.Tensor:
    """Encode this rank's shard, gather every shard (they differ in length) and concatenate in rank order.

    A rank that fails still joins the gather, carrying its error, so every rank raises that error
    (rank 0 reports it with its own exit code) rather than a lost connection or a wait.
    """
    rank, world = group.rank_and_world()
    part = group.shard(len(dataset), rank, world)
    local: torch.Tensor | None = None
    failure: Exception | None = None
    try:
        if part:
            local = _encode_files(backbone, encoder, dataset.files[part.start:part.stop], batch_size=batch_size,
                                  workers=workers, on_progress=on_progress)
    except Exception as exc:
        failure = exc
    return torch.cat(group.gather_or_raise(local, failure))
