"""What a checkpoint is, without loading a model: kind, tensors, trainable numbers, record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repair.errors import IncompatibleCheckpointError
from repair.io import read_tensors
from repair.kinds import check_claims, detect_kind
from repair.train.fields import checked
from repair.workflows.inputs import read_record


@checked
def inspect_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The kind, every tensor (name, shape, dtype, its role: trained, fixed, rebuilt, frozen or ignored, see
    :class:`repair.kinds.Claims`), the training state a file carries (never read as weights), the layout and the
    record or raw metadata. A file the kind would read halfway is refused, as every command refuses it."""
    tensor_file = read_tensors(path)
    record = read_record(tensor_file)
    kind_class = detect_kind(tensor_file, kind, record.kind if record else None)
    options = kind_class.Options.resolve(kind_class.name, record.kind_options if record else None)
    roles = check_claims(kind_class, tensor_file, options).roles()
    trainable = [key for key, role in roles.items() if role == "trained"]
    if not trainable:
        raise IncompatibleCheckpointError(f"{tensor_file.path}: no {kind_class.name} tensors in this file")
    return {
        "path": str(tensor_file.path),
        "format": tensor_file.format,
        "sha256": tensor_file.sha256,
        "kind": kind_class.name,
        "kind_title": kind_class.about.title,
        "trainable_numbers": sum(tensor_file.tensors[key].numel() for key in trainable),
        "layout": tensor_file.layout.name,
        "tensors": [{"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                     "trainable": roles[name] == "trained", "role": roles[name]}
                    for name, tensor in tensor_file.tensors.items()],
        "training_state": [{"name": name, "shape": list(shape)} for name, shape in tensor_file.training_state.items()],
        "metadata": record.as_dict() if record else dict(tensor_file.metadata),
    }
