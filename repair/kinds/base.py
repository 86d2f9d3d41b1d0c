"""The whole protocol of a checkpoint kind, declared on one class.

A kind wraps the trainable tensors ``w`` of one fine-tuning method around the frozen
backbone. It starts at the fine-tuned values ``w_ft``, knows its zero-shot endpoint
``w_zs``, scores inputs at ``w`` and along the straight path ``w_ft -> w``, and exports
tensors with the names, shapes and dtypes the input file had.

Everything the rest of the tool needs to know about a kind is declared here, on the class:
its name and title, its own :class:`KindOptions` (each field becomes a CLI flag), its
default surrogate and ``lam_zs``, and whether it can score classes it was not trained on.
The CLI, the model card, the defaults table and the benchmark labels read these
declarations; nothing else in the tree lists kinds. A new kind is one module under
``repair/kinds`` plus one registry line in ``repair/kinds/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from repair.errors import IncompatibleCheckpointError, UsageError
from repair.io import TensorFile, check_output_path, write_safetensors
from repair.model.backbone import Backbone, ImageEncoder

STAGES = ("finetune", "repair", "eval", "path", "load")  # the workflows that build a kind
READ_STAGES = ("eval", "path", "load")  # an option meaning something here describes the file, not one run
WRAPPER_PREFIXES = ("module.", "model.", "state_dict.", "clip_model.", "clip.")


def model_key(file_key: str) -> str:
    """A file's tensor name as the open_clip model names it (wrapper prefixes removed)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if file_key.startswith(prefix):
                file_key, changed = file_key[len(prefix):], True
    return file_key


class PathSpace(str, enum.Enum):
    """Where the path term interpolates: class/image features (cheap) or the tensors themselves (exact)."""

    feature = "feature"
    weight = "weight"


class HeadFeatures(str, enum.Enum):
    """What a linear head was trained on."""

    normalized = "normalized"
    raw = "raw"


def option(default: Any, help: str, *, stages: Sequence[str] = STAGES, flag: str | None = None) -> Any:
    """A kind option: a dataclass field whose metadata the CLI turns into one flag.

    ``stages`` names the workflows where the option means something (``n_ctx`` only when
    fine-tuning from scratch); ``flag`` overrides the flag name derived from the field name.
    """
    return dataclasses.field(default=default, metadata={"help": help, "stages": tuple(stages), "flag": flag})


def logit_scale_option() -> Any:
    """The one option every kind shares: the temperature on cosine similarities."""
    return option(None, "Override CLIP's temperature, or a linear head's own scale (default: the model's, "
                        "at most 100; a head's is inferred).")


O = TypeVar("O", bound="KindOptions")


@dataclass(frozen=True)
class KindOptions:
    """Base of every kind's ``Options``: typed, recorded in outputs, refused where they do not apply."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # "weight" from a record or a caller becomes PathSpace.weight
            enum_type = type(field.default) if isinstance(field.default, enum.Enum) else None
            current = getattr(self, field.name)
            if enum_type is not None and not isinstance(current, enum_type):
                try:
                    object.__setattr__(self, field.name, enum_type(current))
                except ValueError:
                    choices = ", ".join(member.value for member in enum_type)
                    raise ValueError(f"{field.name} must be one of {choices}, not {current!r}") from None
        scale = getattr(self, "logit_scale", None)
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise ValueError(f"logit_scale must be a positive number, got {scale}")

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def file_options(cls) -> list[str]:
        """The options that describe the file itself (the class token's place, ``w_zs``'s words, the logit
        scale, ...): those that mean something whenever it is read (eval, path, load). The others (the
        path space, ``merge``, a fine-tuning run's choices) are settings of one run, free to change."""
        return [field.name for field in dataclasses.fields(cls)
                if set(field.metadata.get("stages", STAGES)) & set(READ_STAGES)]

    @classmethod
    def resolve(cls: type[O], kind_name: str, recorded: Mapping[str, Any] | None = None,
                overrides: Mapping[str, Any] | KindOptions | None = None, source: object = None) -> O:
        """Defaults, then what the file recorded, then the caller's choices (which must apply to this kind).

        A file's record outranks a flag: an option that describes the file (:meth:`file_options`) given
        again with another value than the file records is refused, never silently applied. ``overrides``
        may be one ``Options`` instance; its fields left at their defaults take the recorded values.
        """
        known = {key: value for key, value in (recorded or {}).items() if key in cls.names() and value is not None}
        if isinstance(overrides, KindOptions):
            defaults = cls()
            overrides = {name: getattr(overrides, name) for name in cls.names()
                         if name not in known or getattr(overrides, name) != getattr(defaults, name)}
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            flags = ", ".join("--" + name.replace("_", "-") for name in unknown)
            raise UsageError(f"{flags} does not apply to {kind_name} checkpoints"
                             f" (their options: {', '.join(cls.names()) or 'none'})")
        try:
            recorded_values, resolved = cls(**known), cls(**{**known, **overrides})
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{kind_name} options: {exc}") from None
        for name in cls.file_options():
            if name in known and name in overrides and not _same_value(getattr(resolved, name),
                                                                       getattr(recorded_values, name)):
                shown, given = (_shown(getattr(options, name)) for options in (recorded_values, resolved))
                raise UsageError(f"{cls.flag(name)} {given}: {source or 'the checkpoint'} "
                                 f"records {name} {shown}, and a file's record outranks a flag; leave "
                                 f"{cls.flag(name)} out (or give {shown})")
        return resolved

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line flag of option ``name``."""
        field = next(field for field in dataclasses.fields(cls) if field.name == name)
        return field.metadata.get("flag") or "--" + name.replace("_", "-")

    def as_record(self) -> dict[str, Any]:
        """JSON-ready values (enums as their strings), as written into an output's record."""
        return {key: value.value if isinstance(value, enum.Enum) else value
                for key, value in dataclasses.asdict(self).items()}


def _shown(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    return format(value, "g") if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _same_value(a: Any, b: Any) -> bool:
    """Equal, numbers up to the rounding of a value written out and typed back in (a logit scale)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-4)
    return a == b


@dataclass(frozen=True)
class About:
    """How people name a kind and what it trains: messages, model cards, tables, the README."""

    title: str  # "CoOp"
    description: str  # "CoOp soft prompt", as in "a CLIP CoOp soft prompt checkpoint"
    trained_tensors: str  # which tensors of a file it trains
    scores_unseen_classes: bool = False  # can logits_for take a class list it was not trained on?


@dataclass(frozen=True)
class RepairDefaults:
    """The zero-shot term a repair uses when the caller names none (chosen on the benchmark)."""

    surrogate: str
    lam_zs: float | str  # a number, or "auto": chosen per repair on held-out shots (repair.train.select)


@dataclass
class KindOutput:
    """One forward pass: logits at ``w``, along the path, and the class features used."""

    logits: torch.Tensor  # [B, C]
    path_logits: torch.Tensor | None  # [K, B, C] at w_ft + t_k (w - w_ft)
    class_features: torch.Tensor  # [C, E] normalised, at w


class Kind(nn.Module, ABC):
    """Base class: the declarations below, then the tensors' behaviour."""

    name: ClassVar[str]  # registry key, --kind value, recorded in outputs
    about: ClassVar[About]
    defaults: ClassVar[RepairDefaults]  # README "Defaults" has the evidence
    Options: ClassVar[type[KindOptions]] = KindOptions
    # kinds that also match every file this one matches but could not load it (detection then picks this one)
    outranks: ClassVar[tuple[str, ...]] = ()

    options: KindOptions
    scale: float  # the logit scale applied to cosine similarities (or a head's own scale)

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                 options: KindOptions | None) -> None:
        """What every kind holds: the frozen backbone, its classes and templates, its options."""
        super().__init__()
        self.backbone = backbone
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.options = options if options is not None else self.Options()

    # ------------------------------------------------------------------ building

    @classmethod
    @abstractmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        """Whether a file looks like this kind (used by detection; metadata wins when present)."""

    @classmethod
    @abstractmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        """Names of the file's tensors this kind trains (what ``inspect`` reports)."""

    @classmethod
    @abstractmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: KindOptions) -> Kind:
        """The checkpoint at ``w_ft``, scoring ``classnames``."""

    @classmethod
    @abstractmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: KindOptions) -> Kind:
        """A fresh checkpoint at ``w_zs``: where plain fine-tuning starts."""

    # ------------------------------------------------------------------ scoring

    @abstractmethod
    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        """Score image features (or pixels when ``input_kind == 'pixels'``) over the training classes."""

    @abstractmethod
    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Score image features over any class list (novel classes too, where the kind can)."""

    @abstractmethod
    def zero_shot_class_features(self) -> torch.Tensor:
        """[C, E] normalised class features of the zero-shot model: the feature surrogate's anchor."""

    @abstractmethod
    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        """``w_zs`` for each trainable tensor (same keys as ``trainable()``)."""

    @abstractmethod
    def finetuned_values(self) -> dict[str, torch.Tensor]:
        """``w_ft``: the values the run started from."""

    @abstractmethod
    def export(self) -> dict[str, torch.Tensor]:
        """The tensors to write: the input's names, shapes and dtypes, current values."""

    def recorded_options(self) -> dict[str, Any]:
        """The options as an output records them: with the scale this checkpoint actually used, so a
        later read scores exactly as this run did (a head's inferred scale may not be re-inferable)."""
        values = self.options.as_record()
        if "logit_scale" in values:
            values["logit_scale"] = self.scale
        return values

    def describe(self) -> dict[str, object]:
        """Facts about this checkpoint recorded in metadata beside the options (n_ctx, dtypes, ...)."""
        return {}

    # ------------------------------------------------------------------ output

    @classmethod
    def writes_folder(cls, tensor_file: TensorFile | None, options: KindOptions) -> bool:
        """Whether an output of this kind (repairing ``tensor_file``, or fine-tuned when None) is a folder."""
        return False

    @classmethod
    def check_output(cls, out: Path, tensor_file: TensorFile | None, options: KindOptions, force: bool,
                     inputs: Sequence[Path]) -> None:
        """Refuse an output path this kind cannot write, before any work (the same check the write makes)."""
        check_output_path(out, force, inputs)

    def save(self, out: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             force: bool = False, inputs: Sequence[Path] = ()) -> Path:
        """Write ``tensors`` (from :meth:`export`) with the run's record, atomically. Default: safetensors;
        a kind whose users load another format (a PEFT folder, a CLIP-LoRA torch file) writes that."""
        return write_safetensors(out, tensors, metadata, force=force, inputs=inputs)

    # ------------------------------------------------------------------ surrogates

    def unsupported_surrogates(self) -> dict[str, str]:
        """Surrogates that mean nothing for this checkpoint, each with the reason (e.g. no zero-shot point
        in prompt space for a randomly initialised prompt); a repair refuses them by name."""
        return {}

    def open_vocabulary_logits(self, inputs: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``forward``'s inputs scored over any class list, differentiable in ``w``: what the open-vocabulary
        surrogates (``fisher-vocab``, ``fisher-dense``, ``distill``) score. The default, :meth:`logits_for`, is
        right where the inputs are the frozen tower's features; a kind that trains the image tower overrides it."""
        return self.logits_for(inputs, classnames)

    @property
    def input_kind(self) -> str:
        """What ``forward`` takes: 'features' (normalised), 'raw-features', or 'pixels' (the image tower trains)."""
        return "features"

    def image_encoder(self) -> ImageEncoder | None:
        """The image tower this checkpoint scores with, when it is not the backbone's frozen one."""
        return None

    def scores_other_classes(self) -> bool:
        """Whether this checkpoint can honestly score classes it was not trained on."""
        return self.about.scores_unseen_classes

    def can_score(self, classnames: Sequence[str]) -> bool:
        """Whether :meth:`logits_for` is honest on this class list."""
        return self.scores_other_classes() or list(classnames) == list(self.classnames)

    def check_can_score(self, classnames: Sequence[str]) -> None:
        if not self.can_score(classnames):
            raise IncompatibleCheckpointError(
                f"this {self.about.description} scores only its own {len(self.classnames)} classes; it cannot score other classes")

    # ------------------------------------------------------------------ values

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def num_trainable(self) -> int:
        return sum(parameter.numel() for parameter in self.trainable().values())

    @torch.no_grad()
    def load_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set ``w`` (used to start from ``w_zs`` and to restore the selected epoch)."""
        for name, parameter in self.trainable().items():
            parameter.copy_(values[name].to(parameter))

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone() for name, parameter in self.trainable().items()}

    def interpolate(self, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                    t: float) -> dict[str, torch.Tensor]:
        """The point at ``t`` of the straight segment ``start -> end`` in the model's weights, as
        :meth:`load_values` takes it (WiSE-FT, ``mergetune path``). Linear in the trainable tensors
        unless they parametrise the weights non-linearly (LoRA's factors override this)."""
        return {name: (1.0 - t) * start[name] + t * end[name] for name in start}

    def same_weights(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
        """Whether two sets of values give the same model (``path`` checks both files imply one ``w_zs``)."""
        return a.keys() == b.keys() and all(torch.equal(a[name], b[name].to(a[name])) for name in a)
