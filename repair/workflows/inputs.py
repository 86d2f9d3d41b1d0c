"""What every workflow does first: resolve the backbone, read records, check outputs, pick images.

Each helper is cheap or validates before expensive work, so a workflow refuses bad input
before it loads a model or encodes an image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from repair.data.features import Features, default_cache_dir, extract_features, load_pixels
from repair.data.folders import ImageFolder, scan_image_folder
from repair.errors import IncompatibleCheckpointError, OutputExistsError
from repair.io import FLAT, Layout, TensorFile, check_output_path, check_writable
from repair.kinds import Kind, KindOptions
from repair.model.backbone import Backbone, BackboneSpec, ImageEncoder, load_backbone
from repair.record import Record
from repair.train.fields import check_fields


@dataclass(frozen=True)
class DataOptions:
    """How a data folder becomes training or test features."""

    classnames_file: Path | None = None
    templates_file: Path | None = None
    shots: int | None = field(default=16, metadata={"min": 1})
    val_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 0.9})
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None disables the cache
    workers: int = field(default=0, metadata={"min": 0})
    batch_size: int = field(default=64, metadata={"min": 1})
    on_progress: Callable[[int, int], None] | None = None  # (images encoded, total) while encoding

    def __post_init__(self) -> None:
        check_fields(self)
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise OutputExistsError(f"{self.cache_dir}: the feature cache (--cache-dir or MERGETUNE_CACHE) is a "
                                    "file, not a folder; name a folder, or pass --no-cache")


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


def check_class_list(record: Record | None, dataset: ImageFolder, source: Path, kind: Kind, *,
                     other_classes: bool = False) -> None:
    """A checkpoint is scored or trained on the classes it records, unless the caller asks for other
    classes and the kind can honestly score them (a shared CoOp prompt can; a linear head cannot)."""
    if record is None or list(record.class_folders) == list(dataset.folders):
        return
    if other_classes and kind.scores_other_classes():
        return
    recorded, found = _listed(record.class_folders), _listed(dataset.folders)
    way_out = ("pass --other-classes to use it on other classes" if kind.scores_other_classes()
               else f"a {kind.about.description} can only score its own classes")
    raise IncompatibleCheckpointError(f"{source} was made for classes {recorded} but {dataset.root} has {found}; "
                                      f"{way_out}")


def _listed(names: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return f"[{shown}{', ...' if len(names) > most else ''}] ({len(names)})"


def side_inputs(data_options: DataOptions | None = None, backbone: Backbone | BackboneSpec | None = None,
                *files: str | Path | None) -> tuple[list[Path], list[Path]]:
    """The files and folders a run reads besides its checkpoints and data folders (class names, templates,
    a vocabulary, a model config, weights): (files, folders)."""
    named = [data_options.classnames_file, data_options.templates_file] if data_options is not None else []
    spec = backbone.spec if isinstance(backbone, Backbone) else backbone
    folders = []
    if spec is not None:
        named.append(spec.model_config)
        if spec.pretrained and Path(spec.pretrained).is_file():
            named.append(spec.pretrained)
        if spec.model.startswith("local-dir:"):
            folders.append(Path(spec.model[len("local-dir:"):]))
    return [Path(path) for path in (*named, *files) if path is not None], folders


def check_outside_input_folders(out: Path, folders: Sequence[Path]) -> None:
    """No output lies anywhere under an input folder (a data folder, a model's folder), whether or not it exists
    yet, not even with --force: a new file there changes an input; input *files* are refused by
    :func:`repair.io.check_output_path`."""
    out = Path(out)
    where = Path(os.path.realpath(out))  # realpath, not resolve(): a symlink loop must not raise here
    for folder in folders:
        if where.is_relative_to(os.path.realpath(folder)):
            raise OutputExistsError(f"{out}: is inside the input folder {folder}; mergetune never writes to its "
                                    "inputs, even with --force")


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Fail before the expensive part, not after it: the same check the atomic write makes."""
    out = Path(out)
    if not out.parent.is_dir():  # an output problem for the commands (exit 8), not an unreadable input
        raise OutputExistsError(f"{out.parent}: output directory does not exist")
    check_output_path(out, force, [Path(source) for source in inputs])
    check_writable(out.parent)


def check_kind_output(cls: type[Kind], out: Path, tensor_file: TensorFile | None, options: KindOptions,
                      force: bool, inputs: Sequence[Path], layout: Layout = FLAT) -> None:
    """:func:`check_output` for the output this kind writes in ``layout`` (a file, or a folder such as a PEFT
    adapter or a Hugging Face model)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise OutputExistsError(f"{out.parent}: output directory does not exist")
    cls.check_output(out, tensor_file, options, force, [Path(source) for source in inputs], layout)
    check_writable(out.parent)


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
