"""Checkpoint kinds: one module each, registered here. Detection: metadata first, then tensors."""

from __future__ import annotations

from repair.checkpoints import TensorFile
from repair.errors import IncompatibleCheckpointError
from repair.kinds.base import Kind, KindOutput
from repair.kinds.clipfit import CLIPFit
from repair.kinds.coop import CoOpPrompts
from repair.kinds.linear import LinearHead

KINDS: dict[str, type[Kind]] = {
    CoOpPrompts.name: CoOpPrompts,
    LinearHead.name: LinearHead,
    CLIPFit.name: CLIPFit,
}

EXPECTED = (
    "expected a CoOp prompt 'ctx' [n_ctx, width] or [n_cls, n_ctx, width], a linear head 'weight' "
    "[n_cls, dim] (or head./fc./classifier. prefixes, sklearn coef_), or CLIPFit tensors "
    "(transformer.resblocks.N.mlp.c_proj.bias, visual LayerNorms)"
)


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
    if not matching:
        found = ", ".join(f"{key} {list(t.shape)}" for key, t in list(tensor_file.tensors.items())[:6])
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: not a checkpoint mergetune knows (found {found or 'no tensors'}); {EXPECTED}")
    names = ", ".join(kind.name for kind in matching)
    raise IncompatibleCheckpointError(f"{tensor_file.path}: could be {names}; pass --kind")


__all__ = ["KINDS", "Kind", "KindOutput", "CoOpPrompts", "LinearHead", "CLIPFit", "detect_kind"]
