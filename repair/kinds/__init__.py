"""Checkpoint kinds: one module each, registered here. Detection: metadata first, then shape."""

from __future__ import annotations

from repair.checkpoints import TensorFile
from repair.errors import IncompatibleCheckpointError
from repair.kinds.base import Kind, KindOutput
from repair.kinds.coop import CoOpPrompts

KINDS: dict[str, type[Kind]] = {
    CoOpPrompts.name: CoOpPrompts,
}


def detect_kind(tensor_file: TensorFile, override: str | None = None) -> type[Kind]:
    """The kind of a checkpoint: ``override``, else its mergetune metadata, else its tensors."""
    if override is not None:
        if override not in KINDS:
            raise IncompatibleCheckpointError(f"unknown kind {override!r}; choose one of {', '.join(KINDS)}")
        return KINDS[override]
    recorded = tensor_file.metadata.get("kind")
    if recorded in KINDS:
        return KINDS[recorded]
    matching = [kind for kind in KINDS.values() if kind.matches(tensor_file)]
    if len(matching) == 1:
        return matching[0]
    found = ", ".join(f"{key} {list(t.shape)}" for key, t in list(tensor_file.tensors.items())[:6]) or "no tensors"
    if not matching:
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: not a checkpoint mergetune knows (found {found}); "
            "expected a CoOp prompt 'ctx' [n_ctx, width] or [n_cls, n_ctx, width]"
        )
    names = ", ".join(kind.name for kind in matching)
    raise IncompatibleCheckpointError(f"{tensor_file.path}: could be {names}; pass --kind")


__all__ = ["KINDS", "Kind", "KindOutput", "CoOpPrompts", "detect_kind"]
