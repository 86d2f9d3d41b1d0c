"""What every workflow does first: resolve the backbone, read records, check outputs, pick images.

Each helper is cheap or validates before expensive work, so a workflow refuses bad input
before it loads a model or encodes an image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from repair.data.features import Features, default_cache_dir, extract_features, load_pixels
from repair.data.folders import ImageFolder, scan_image_folder
from repair.errors import OutputExistsError
from repair.io import TensorFile, check_output_path
from repair.model.backbone import Backbone, BackboneSpec, ImageEncoder, load_backbone
from repair.record import Record


@dataclass(frozen=True)
class DataOptions:
    """How a data folder becomes training or test features."""

    classnames_file: Path | None = None
    templates_file: Path | None = None
    shots: int | None = 16
    val_fraction: float = 0.0
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None disables the cache
    workers: int = 0
    batch_size: int = 64
    on_progress: Callable[[int, int], None] | None = None  # (images encoded, total) while encoding


class Encodes(Protocol):
    """What decides how images are encoded for a model: a kind, or the zero-shot scorer."""

    @property
    def input_kind(self) -> str: ...

    def image_encoder(self) -> ImageEncoder | None: ...


def resolve_backbone(backbone: Backbone | BackboneSpec | None, device: str, precision: str = "fp32") -> Backbone:
    if isinstance(backbone, Backbone):
        return backbone
    return load_backbone(backbone, device=device, precision=precision)


def read_record(tensor_file: TensorFile) -> Record | None:
    """The record of a file mergetune wrote; None for foreign files."""
    return Record.from_metadata(tensor_file.metadata, tensor_file.path)


def recorded_backbone(record: Record) -> BackboneSpec:
    """The backbone a file says it was made with: what eval and load use when none is given."""
    identity = record.backbone
    return BackboneSpec(identity.model, identity.pretrained,
                        Path(identity.model_config) if identity.model_config else None)


def check_record_backbone(record: Record | None, backbone: Backbone, source: Path) -> None:
    if record is not None:
        record.check_backbone(backbone.text_fingerprint, backbone.spec.describe(), source)


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Fail before the expensive part, not after it: the same check the atomic write makes."""
    out = Path(out)
    if not out.parent.is_dir():  # an output problem for the commands (exit 8), not an unreadable input
        raise OutputExistsError(f"{out.parent}: output directory does not exist")
    check_output_path(out, force, [Path(source) for source in inputs])


def select_training_images(data_dir: Path, options: DataOptions, seed: int) -> tuple[ImageFolder, ImageFolder | None]:
    """Scan, sample shots, split off validation: cheap, so it runs before any model work."""
    dataset = scan_image_folder(data_dir, options.classnames_file).few_shot(options.shots, seed)
    if options.val_fraction > 0:
        return dataset.split(options.val_fraction, seed)
    return dataset, None


def encode_for(scorer: Encodes, backbone: Backbone, dataset: ImageFolder, options: DataOptions, *,
               training: bool = False, shard: bool = False) -> Features:
    """The inputs a model scores: pixels when its image tower trains, else (cached) features of its tower."""
    if training and scorer.input_kind == "pixels":
        return load_pixels(backbone, dataset, batch_size=options.batch_size, workers=options.workers)
    return extract_features(backbone, dataset, cache_dir=options.cache_dir, batch_size=options.batch_size,
                            workers=options.workers, normalize=scorer.input_kind != "raw-features",
                            encoder=scorer.image_encoder(), on_progress=options.on_progress, shard=shard)
