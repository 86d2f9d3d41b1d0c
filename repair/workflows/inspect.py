"""What a checkpoint is, without loading a model: kind, tensors, trainable numbers, record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repair.errors import IncompatibleCheckpointError
from repair.io import read_tensors
from repair.kinds import detect_kind
from repair.train.fields import checked
from repair.workflows.inputs import read_record


@checked
def inspect_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The kind, every tensor (name, shape, dtype, trained or not) and the record or raw metadata."""
    tensor_file = read_tensors(path)
    record = read_record(tensor_file)
    kind_class = detect_kind(tensor_file, kind, record.kind if record else None)
    options = kind_class.Options.resolve(kind_class.name, record.kind_options if record else None)
    trainable = kind_class.trainable_keys(tensor_file, options)
    if not trainable:
        raise IncompatibleCheckpointError(f"{tensor_file.path}: no {kind_class.name} tensors in this file")
    return {
        "path": str(tensor_file.path),
        "format": tensor_file.format,
        "sha256": tensor_file.sha256,
        "kind": kind_class.name,
        "kind_title": kind_class.about.title,
        "trainable_numbers": sum(tensor_file.tensors[key].numel() for key in trainable),
        "tensors": [{"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                     "trainable": name in trainable} for name, tensor in tensor_file.tensors.items()],
        "metadata": record.as_dict() if record else dict(tensor_file.metadata),
    }
