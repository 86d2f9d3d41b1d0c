"""Checkpoint kinds: one module each, registered here. Detection: metadata first, then tensors.

Adding a kind is one module (a :class:`Kind` subclass with its declarations) and one line in
:data:`KINDS`; the CLI flags, the model card and the defaults table follow from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import Claims, Kind, KindOptions, KindOutput, frozen_differences
from repair.kinds.clip_adapter import CLIPAdapter
from repair.kinds.clipfit import CLIPFit
from repair.kinds.cocoop import CoCoOp
from repair.kinds.coop import CoOpPrompts
from repair.kinds.encoder import FullImageEncoder
from repair.kinds.kgcoop import KgCoOpPrompts
from repair.kinds.linear import LinearHead
from repair.kinds.lora import LoRA
from repair.kinds.maple import MaPLe
from repair.kinds.mma import MMA
from repair.kinds.projector import VisualProjector
from repair.kinds.promptsrc import PromptSRC
from repair.kinds.taskres import TaskRes
from repair.kinds.tip_adapter import TipAdapterF
from repair.model.backbone import Backbone

KINDS: dict[str, type[Kind]] = {kind.name: kind for kind in (CoOpPrompts, LinearHead, CLIPFit, LoRA, VisualProjector,
                                                               FullImageEncoder, KgCoOpPrompts, CLIPAdapter, TaskRes,
                                                               TipAdapterF, CoCoOp, MaPLe, PromptSRC, MMA)}


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


# Tensors of methods no registered kind reads, by a name part each method uses: only to say, in a refusal,
# what a file probably is. A kind registered for one of them claims its files before this is ever shown.
FOREIGN_HINTS = (("compound_prompt", "MaPLe"), ("meta_net.", "CoCoOp"), ("VPT", "PromptSRC / IVLP / VPT"),
                 ("visual_prompt", "a vision prompt"), ("adapter", "an adapter method"))


def detect_kind(tensor_file: TensorFile, override: str | None = None, recorded: str | None = None) -> type[Kind]:
    """The kind of a checkpoint: ``override``, else the kind its record names, else the one kind whose
    declaration claims every tensor of the file (:meth:`Kind.claims`); never a guess: a file two kinds
    claim whole, or that no kind claims whole, is refused in one line naming ``--kind``."""
    if override is not None:
        return kind_class(override)
    if recorded in KINDS:
        return KINDS[recorded]
    matching = [kind for kind in KINDS.values() if kind.matches(tensor_file)]
    outranked = {name for kind in matching for name in kind.outranks}
    matching = [kind for kind in matching if kind.name not in outranked]
    whole = [kind for kind in matching if not _unclaimed(kind, tensor_file)]
    if len(whole) == 1:
        return whole[0]
    if len(whole) > 1:
        names = ", ".join(kind.name for kind in whole)
        raise IncompatibleCheckpointError(f"{tensor_file.path}: could be {names}; pass --kind")
    if matching:
        closest = min(matching, key=lambda kind: len(_unclaimed(kind, tensor_file)))
        raise IncompatibleCheckpointError(_partial_read(tensor_file, closest, _unclaimed(closest, tensor_file)))
    found = ", ".join(f"{key} {list(t.shape)}" for key, t in list(tensor_file.tensors.items())[:6])
    raise IncompatibleCheckpointError(
        f"{tensor_file.path}: not a checkpoint mergetune knows (found {found or 'no tensors'}); "
        f"{expected_layouts()}")


def _unclaimed(kind: type[Kind], tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
    return kind.claims(tensor_file, options).unclaimed(list(tensor_file.tensors))


def _partial_read(tensor_file: TensorFile, kind: type[Kind], left: Sequence[str]) -> str:
    """The one-line refusal of a read that would leave tensors unread."""
    shown = ", ".join(f"{key} {list(tensor_file.tensors[key].shape)}" for key in left[:3])
    more = f" and {len(left) - 3} more" if len(left) > 3 else ""
    methods = sorted({method for key in left for part, method in FOREIGN_HINTS if part in key})
    probably = f"; it looks like {' or '.join(methods)}" if methods else ""
    return (f"{tensor_file.path}: read as {kind.about.title} ({kind.name}) it would leave {len(left)} of its "
            f"{len(tensor_file.tensors)} tensors unread: {shown}{more}{probably}; no registered kind reads all of "
            "them (pass --kind to name one that does)")


def check_claims(cls: type[Kind], tensor_file: TensorFile, options: KindOptions | None = None,
                 backbone: Backbone | None = None) -> Claims:
    """The kind's claims on a file (by names, or with the loaded ``backbone``), refused in one line when they
    leave any tensor over."""
    claims = cls.claims(tensor_file, options, backbone)
    left = claims.unclaimed(list(tensor_file.tensors))
    if left:
        raise IncompatibleCheckpointError(_partial_read(tensor_file, cls, left))
    return claims


def check_frozen(tensor_file: TensorFile, claims: Claims, backbone: Backbone, kind: type[Kind]) -> None:
    """The file's copies of backbone weights (``claims.frozen``) equal the loaded backbone's, or the read is
    refused: the kind would score with the backbone's weights, not the file's."""
    if not claims.frozen:
        return
    model = backbone.model
    reference = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    foreign, differing = frozen_differences(tensor_file, claims.frozen, reference)
    loaded = backbone.spec.describe()
    if foreign:
        key = foreign[0]
        name = claims.frozen[key]
        what = ("has another shape there" if name in reference else "has no such weight")
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: {key} {list(tensor_file.tensors[key].shape)} would be the backbone's {name}, but the "
            f"loaded {loaded} {what}; pass the --model it was made with")
    if differing:
        key, difference = max(differing, key=lambda item: item[1] if item[1] == item[1] else float("inf"))
        towers = sorted({"image" if claims.frozen[name].startswith("visual.") else "text" for name, _ in differing})
        which = f"{' and '.join(towers)} tower{'s' if len(towers) > 1 else ''}"
        hint = (" (a fully fine-tuned image tower: pass --kind image-encoder)" if towers == ["image"]
                and "image-encoder" in KINDS and kind.name != "image-encoder" else "")
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: its {which} differs from the loaded {loaded} ({len(differing)} tensors {kind.name} "
            f"does not train, e.g. {key} by up to {difference:.3g}): {kind.name} would score with the backbone's "
            f"weights, not the file's{hint}; pass the --model they belong to, or the --kind that trains them")


def plan_kind(tensor_file: TensorFile, *, kind: str | None = None, recorded_kind: str | None = None,
              recorded_options: Mapping[str, Any] | None = None,
              overrides: Mapping[str, Any] | KindOptions | None = None) -> tuple[type[Kind], KindOptions]:
    """The kind of a file and its options, without a model: cheap, so workflows refuse bad options early.
    A kind that would leave tensors of the file unread is refused here (:func:`check_claims`)."""
    cls = detect_kind(tensor_file, kind, recorded_kind)
    options = resolve_options(cls, recorded_options, overrides, source=tensor_file.path)
    check_claims(cls, tensor_file, options)
    return cls, options


def read_kind(cls: type[Kind], backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
              templates: Sequence[str], options: KindOptions) -> Kind:
    """A file as ``cls`` at ``w_ft``: its claims checked (nothing left over, frozen copies equal to the backbone),
    then read; the tensors it does not train are kept for the output."""
    claims = check_claims(cls, tensor_file, options, backbone)
    check_frozen(tensor_file, claims, backbone, cls)
    model = cls.from_file(backbone, tensor_file, classnames, templates, options)
    model.keep_source(tensor_file, claims)
    return model


def load_kind(backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str], templates: Sequence[str], *,
              kind: str | None = None, recorded_kind: str | None = None,
              recorded_options: Mapping[str, Any] | None = None,
              overrides: Mapping[str, Any] | KindOptions | None = None) -> Kind:
    """A checkpoint file as its kind, at ``w_ft``; options: the caller's, else recorded, else defaults."""
    cls, options = plan_kind(tensor_file, kind=kind, recorded_kind=recorded_kind,
                             recorded_options=recorded_options, overrides=overrides)
    return read_kind(cls, backbone, tensor_file, classnames, templates, options)


def resolve_options(cls: type[Kind], recorded: Mapping[str, Any] | None = None,
                    overrides: Mapping[str, Any] | KindOptions | None = None, source: object = None) -> KindOptions:
    """One kind's options; an ``Options`` instance must be that kind's own. A recorded option given again
    with another value is refused (:meth:`KindOptions.resolve`)."""
    if isinstance(overrides, KindOptions) and not isinstance(overrides, cls.Options):
        raise IncompatibleCheckpointError(f"{type(overrides).__name__} are not options of {cls.name} checkpoints")
    return cls.Options.resolve(cls.name, recorded, overrides, source)


__all__ = ["KINDS", "Kind", "KindOptions", "KindOutput", "CoOpPrompts", "LinearHead", "CLIPFit", "LoRA", "VisualProjector",
           "FullImageEncoder", "KgCoOpPrompts", "CLIPAdapter", "TaskRes", "TipAdapterF", "CoCoOp", "MaPLe", "PromptSRC",
           "MMA", "detect_kind", "kind_class", "load_kind", "plan_kind", "read_kind", "register", "resolve_options",
           "expected_layouts", "check_claims", "check_frozen", "Claims"]
