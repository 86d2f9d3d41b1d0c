"""The record every mergetune output carries: what was run, on what, with which tool.

One typed value, built once per run, written into the safetensors metadata with
:meth:`Record.to_metadata` and read back once per file with :meth:`Record.from_metadata`.
It is versioned (``format``); older versions are read and upgraded here, in one place.
The backbone check (was this file made against these weights?) lives on it too.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from repair.errors import IncompatibleCheckpointError, InputFileError

FORMAT = "mergetune/2"
READABLE_FORMATS = ("mergetune/1", FORMAT)
METADATA_KEY = "mergetune"  # the safetensors metadata entry holding the record as JSON
TENSORS_SEAL = "mergetune.tensors_sha256"  # the output's own tensors, hashed when written (verify rechecks)
RECORD_SEAL = "mergetune.record_sha256"  # the record's JSON, hashed when written


def versions() -> dict[str, str]:
    """The versions that made an output (recorded, and shown in reports)."""
    def version(name: str) -> str:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            return "unknown"

    import torch

    return {"mergetune": version("mergetune"), "torch": torch.__version__,
            "open_clip": version("open_clip_torch"), "python": platform.python_version()}


@dataclass(frozen=True)
class BackboneIdentity:
    """Which frozen CLIP the file belongs to: how to load it, and hashes of what was loaded."""

    model: str
    pretrained: str | None = None
    model_config: str | None = None
    visual_sha256: str | None = None
    text_sha256: str | None = None
    image_tower: str | None = None  # what the towers are (module classes), for people reading the record
    text_tower: str | None = None


@dataclass(frozen=True)
class CheckpointInput:
    name: str
    sha256: str


@dataclass(frozen=True)
class DataInput:
    path: str
    images: int
    manifest_sha256: str
    val_images: int = 0
    val_manifest_sha256: str | None = None
    per_class: list[int] | None = None  # training images of each class: the shots actually used
    val_per_class: list[int] | None = None  # held-out images of each class


@dataclass(frozen=True)
class Inputs:
    checkpoint: CheckpointInput | None
    data: DataInput | None  # None: no images went into it (a uniform soup)


@dataclass(frozen=True)
class DataSettings:
    shots: int | None
    val_fraction: float = 0.0
    output_dtype: str = "input"


@dataclass(frozen=True)
class Record:
    """Everything an output records about how it was made."""

    stage: str  # "repair", "finetune" or "soup"
    kind: str
    kind_options: dict[str, Any]
    kind_details: dict[str, Any]
    trainable_numbers: int
    backbone: BackboneIdentity
    logit_scale: float | None
    class_folders: list[str]
    classnames: list[str]
    templates: list[str]
    objective: dict[str, Any]  # repair.train.objective.Objective, resolved for the kind
    train: dict[str, Any]  # repair.train.loop.TrainConfig
    seed: int | None  # None: nothing random went into it (a soup)
    data: DataSettings
    inputs: Inputs
    result: dict[str, Any]  # repair.train.loop.TrainResult
    versions: dict[str, str] = field(default_factory=versions)
    format: str = FORMAT
    scores_other_classes: bool | None = None  # can the file score classes it was not trained on (None: not recorded)

    # ------------------------------------------------------------------ writing and reading

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_metadata(self, tensors_sha256: str | None = None) -> dict[str, str]:
        """The safetensors metadata of an output: the record, plus its format and kind for other tools; with
        the hash of the output's tensors (:func:`repair.io.tensors_checksum`), a seal of both, so ``verify``
        can check the file itself."""
        record = json.dumps(self.as_dict(), sort_keys=True)
        metadata = {"format": self.format, "kind": self.kind, METADATA_KEY: record}
        if tensors_sha256 is not None:
            metadata[TENSORS_SEAL] = tensors_sha256
            metadata[RECORD_SEAL] = hashlib.sha256(record.encode()).hexdigest()
        return metadata

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: Path | str) -> Record | None:
        """The record of a file mergetune wrote; None for a foreign file; a damaged one is refused."""
        raw = metadata.get(METADATA_KEY)
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            raise InputFileError(f"{source}: damaged mergetune metadata (not JSON)") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: object, source: Path | str) -> Record:
        if not isinstance(data, dict):
            raise InputFileError(f"{source}: damaged mergetune metadata (not a record)")
        try:
            return cls._parse(_upgraded(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"{source}: damaged mergetune record ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> Record:
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"unknown record format {data.get('format')!r}")
        inputs = data["inputs"]
        checkpoint = inputs.get("checkpoint")
        values = {
            **{name: data[name] for name in ("stage", "kind", "trainable_numbers", "logit_scale", "seed", "format")},
            "kind_options": _mapping(data.get("kind_options", {})),
            "kind_details": _mapping(data.get("kind_details", {})),
            "backbone": _typed(BackboneIdentity, data["backbone"]),
            "class_folders": _strings(data["class_folders"]),
            "classnames": _strings(data["classnames"]),
            "templates": _strings(data["templates"]),
            "objective": _mapping(data["objective"]),
            "train": _mapping(data["train"]),
            "data": _typed(DataSettings, data["data"]),
            "inputs": Inputs(checkpoint=None if checkpoint is None else _typed(CheckpointInput, checkpoint),
                             data=None if inputs.get("data") is None else _typed(DataInput, inputs["data"])),
            "result": _mapping(data["result"]),
            "versions": {str(key): str(value) for key, value in _mapping(data.get("versions", {})).items()},
            "scores_other_classes": data.get("scores_other_classes"),
        }
        if not isinstance(values["kind"], str) or not values["kind"] or not isinstance(values["backbone"].model, str):
            raise ValueError("no kind or backbone model")
        return cls(**values)

    # ------------------------------------------------------------------ checks

    def check_backbone(self, text_fingerprint: str, loaded: str, source: Path | str) -> None:
        """Refuse a checkpoint recorded against other text weights: its prompts would be meaningless."""
        recorded = self.backbone.text_sha256
        if recorded is not None and recorded != text_fingerprint:
            raise IncompatibleCheckpointError(
                f"{source} was made with {self.backbone.model} / {self.backbone.pretrained}, whose text weights "
                f"differ from the loaded {loaded}; pass the same --model")

    def image_tower_warning(self, visual_fingerprint: str, loaded: str, source: Path | str) -> list[str]:
        """Same text weights but another image tower: scores are still computable, but say so."""
        if self.backbone.visual_sha256 not in (None, visual_fingerprint):
            return [f"{Path(source).name} was made with another image tower or transform than the loaded {loaded}"]
        return []


def seal_checks(metadata: Mapping[str, str], tensors_sha256: str) -> list[tuple[str, str, str]] | None:
    """(what, recorded, now) for a sealed output's tensors (their hash now: ``tensors_sha256``) and record;
    None for a file written without a seal."""
    if TENSORS_SEAL not in metadata or RECORD_SEAL not in metadata:
        return None
    record = hashlib.sha256(metadata.get(METADATA_KEY, "").encode()).hexdigest()
    return [("this file's tensors", metadata[TENSORS_SEAL], tensors_sha256),
            ("this file's record", metadata[RECORD_SEAL], record)]


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """mergetune/1 kept the kind's options among its details; /2 records them apart."""
    if data.get("format") != "mergetune/1":
        return data
    details = dict(data.get("kind_details") or {})
    options = {key: details.pop(key) for key in ("ctx_init", "path_space") if key in details}
    if "normalize_features" in details:
        options["head_features"] = "normalized" if details.pop("normalize_features") else "raw"
    if data.get("logit_scale") is not None:
        options["logit_scale"] = data["logit_scale"]
    return {**data, "kind_details": details, "kind_options": options}


def _typed(cls: type, value: object) -> Any:
    if not isinstance(value, dict):
        raise TypeError(f"{cls.__name__} is not an object")
    names = {item.name for item in fields(cls)}
    return cls(**{key: item for key, item in value.items() if key in names})


def _mapping(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError("expected an object")
    return dict(value)


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("expected a list of strings")
    return list(value)
