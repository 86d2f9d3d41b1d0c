"""Checkpoint kinds: one module each, registered here. Detection: metadata first, then tensors.

Adding a kind is one module (a :class:`Kind` subclass with its declarations) and one line in
:data:`KINDS`; the CLI flags, the model card and the defaults table follow from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import Kind, KindOptions, KindOutput
from repair.kinds.clipfit import CLIPFit
from repair.kinds.coop import CoOpPrompts
from repair.kinds.encoder import FullImageEncoder
from repair.kinds.linear import LinearHead
from repair.kinds.lora import LoRA
from repair.kinds.projector import VisualProjector
from repair.model.backbone import Backbone

KINDS: dict[str, type[Kind]] = {kind.name: kind for kind in (CoOpPrompts, LinearHead, CLIPFit, LoRA, VisualProjector,
                                                               FullImageEncoder)}


def register(kind: type[Kind]) -> type[Kind]:
    """Add a kind at run time (a plug-in, or a test's throw-away kind); usable as a class decorator."""
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"a kind named {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def kind_class(name: str) -> type[Kind]:
    """The registered kind ``name``, or a one-line refusal naming the known ones."""
    if name not in KINDS:
        raise IncompatibleCheckpointError(f"unknown kind {name!r}; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def expected_layouts() -> str:
    return "expected " + "; or ".join(f"{kind.about.title}: {kind.about.trained_tensors}" for kind in KINDS.values())


def detect_kind(tensor_file: TensorFile, override: str | None = None, recorded: str | None = None) -> type[Kind]:
    """The kind of a checkpoint: ``override``, else the kind its record names, else its tensors."""
    if override is not None:
        return kind_class(override)
    if recorded in KINDS:
        return KINDS[recorded]
    matching = [kind for kind in KINDS.values() if kind.matches(tensor_file)]
    outranked = {name for kind in matching for name in kind.outranks}
    matching = [kind for kind in matching if kind.name not in outranked]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        found = ", ".join(f"{key} {list(t.shape)}" for key, t in list(tensor_file.tensors.items())[:6])
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: not a checkpoint mergetune knows (found {found or 'no tensors'}); "
            f"{expected_layouts()}")
    names = ", ".join(kind.name for kind in matching)
    raise IncompatibleCheckpointError(f"{tensor_file.path}: could be {names}; pass --kind")


def plan_kind(tensor_file: TensorFile, *, kind: str | None = None, recorded_kind: str | None = None,
              recorded_options: Mapping[str, Any] | None = None,
              overrides: Mapping[str, Any] | KindOptions | None = None) -> tuple[type[Kind], KindOptions]:
    """The kind of a file and its options, without a model: cheap, so workflows refuse bad options early."""
    cls = detect_kind(tensor_file, kind, recorded_kind)
    return cls, resolve_options(cls, recorded_options, overrides, source=tensor_file.path)


def load_kind(backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str], templates: Sequence[str], *,
              kind: str | None = None, recorded_kind: str | None = None,
              recorded_options: Mapping[str, Any] | None = None,
              overrides: Mapping[str, Any] | KindOptions | None = None) -> Kind:
    """A checkpoint file as its kind, at ``w_ft``; options: the caller's, else recorded, else defaults."""
    cls, options = plan_kind(tensor_file, kind=kind, recorded_kind=recorded_kind,
                             recorded_options=recorded_options, overrides=overrides)
    return cls.from_file(backbone, tensor_file, classnames, templates, options)


def resolve_options(cls: type[Kind], recorded: Mapping[str, Any] | None = None,
                    overrides: Mapping[str, Any] | KindOptions | None = None, source: object = None) -> KindOptions:
    """One kind's options; an ``Options`` instance must be that kind's own. A recorded option given again
    with another value is refused (:meth:`KindOptions.resolve`)."""
    if isinstance(overrides, KindOptions) and not isinstance(overrides, cls.Options):
        raise IncompatibleCheckpointError(f"{type(overrides).__name__} are not options of {cls.name} checkpoints")
    return cls.Options.resolve(cls.name, recorded, overrides, source)


__all__ = ["KINDS", "Kind", "KindOptions", "KindOutput", "CoOpPrompts", "LinearHead", "CLIPFit", "LoRA", "VisualProjector",
           "FullImageEncoder", "detect_kind",
           "kind_class", "load_kind", "plan_kind", "register", "resolve_options", "expected_layouts"]
