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

**What a kind claims in a file** (:meth:`Kind.claims`, returning :class:`Claims`). Nothing is read
halfway: every tensor of an input lands in exactly one of five groups, or the read is refused in one
line (exit 5) naming the tensors left over and ``--kind``:

- ``trained``: the tensors the kind trains; written back with their new values.
- ``fixed``: tensors the kind reads and uses as they are, never trains (TaskRes's stored base text
  features, Tip-Adapter's cache values, a CNN's BatchNorm statistics).
- ``rebuilt``: buffers the kind rebuilds itself and so never reads (CoOp's ``token_prefix`` /
  ``token_suffix``, recomputed from the current class names).
- ``frozen``: ``file key -> open_clip name`` of copies of the frozen backbone (a Dassl ``CustomCLIP``
  saved whole: ``image_encoder.*`` -> ``visual.*``, ``text_encoder.*`` -> the text tower). They are
  compared with the loaded backbone before anything else (:func:`repair.kinds.check_frozen`): a
  difference is refused, since the kind would score with the backbone's weights, not the file's.
- ``ignored``: ``file key -> why``: tensors the method saves but never uses (KgCoOp's ``bias_vectors``).

Every group but ``trained`` is written back unchanged, so an output has the input's tensors, names and
dtypes. The default declaration (:meth:`Kind.claims`) is ``trainable_keys`` as ``trained`` plus, as
``frozen``, every other tensor whose name is an open_clip CLIP weight (:func:`backbone_name`); a kind
adds its own groups by overriding ``claims`` and calling ``super().claims(...)`` or building a
:class:`Claims` itself; a key belongs to one group only (:meth:`Claims.roles` raises otherwise), so a
kind that trains tensors inside the towers (deep prompts such as ``...resblocks.N.VPT_shallow``) lists
them as ``trained`` and passes them to :func:`backbone_copies` as ``exclude``. Detection (``repair.kinds.detect_kind``) picks among the kinds that match a
file only those whose claims leave nothing over, so a kind registered later (deep prompts, adapters
in the towers) takes the files it claims whole, and no other kind reads them halfway.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from repair.errors import IncompatibleCheckpointError, UsageError
from repair.io import FLAT, Layout, TensorFile, check_layout_output, write_layout
from repair.model.backbone import Backbone, ImageEncoder

CLIP_INIT_STD = 0.02  # a step scale's last fallback: the std CLIP initialises its embeddings with
STAGES = ("finetune", "repair", "eval", "path", "load")  # the workflows that build a kind
READ_STAGES = ("eval", "path", "load")  # an option meaning something here describes the file, not one run
WRAPPER_PREFIXES = ("module.", "model.", "state_dict.", "clip_model.", "clip.")
# Dassl's CustomCLIP (CoOp and the code bases built on it) holds the towers under these names
DASSL_TOWERS = (("image_encoder.", "visual."), ("text_encoder.", ""))
_BLOCK = (r"resblocks\.\d+\.(ln_[12]\.(weight|bias)|attn\.(in_proj_weight|in_proj_bias|out_proj\.(weight|bias))"
          r"|mlp\.(c_fc|c_proj)\.(weight|bias)|ls_[12]\.gamma)")
_STATS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_VISION = (rf"visual\.(conv1\.weight|class_embedding|positional_embedding|proj|ln_(pre|post)\.(weight|bias)"
           rf"|transformer\.{_BLOCK}|(conv[123]|bn[123])\.{_STATS}"
           rf"|layer\d\.\d+\.((conv[123]|bn[123])|downsample\.[012])\.{_STATS}"
           r"|attnpool\.(positional_embedding|[qkvc]_proj\.(weight|bias))|trunk\..+|head\..+)")
_TEXT = (rf"transformer\.{_BLOCK}|token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)"
         r"|text_projection(\.weight|\.bias)?|logit_scale|logit_bias|text\..+")
CLIP_WEIGHT = re.compile(rf"^({_VISION}|{_TEXT})$")  # open_clip's names for CLIP's own weights


def model_key(file_key: str) -> str:
    """A file's tensor name as the open_clip model names it (wrapper prefixes removed)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if file_key.startswith(prefix):
                file_key, changed = file_key[len(prefix):], True
    return file_key


def backbone_name(file_key: str) -> str | None:
    """The open_clip name of the backbone weight a file's tensor is a copy of, or None when the name is not
    one of CLIP's own weights (a prompt, an adapter, a head). Wrapper prefixes are removed and Dassl's
    ``image_encoder.`` / ``text_encoder.`` mapped to open_clip's ``visual.`` / text tower first."""
    name = model_key(file_key)
    for module, replacement in DASSL_TOWERS:
        if name.startswith(module):
            name = replacement + name[len(module):]
            break
    return name if CLIP_WEIGHT.match(name) else None


def backbone_copies(keys: Sequence[str], exclude: Sequence[str] = ()) -> dict[str, str]:
    """``file key -> open_clip name`` for the keys (but ``exclude``) that name CLIP's own weights."""
    skipped = set(exclude)
    return {key: name for key in keys if key not in skipped and (name := backbone_name(key)) is not None}


@dataclass(frozen=True)
class Claims:
    """What a kind reads from one file: each tensor in exactly one group (see the module docstring)."""

    trained: tuple[str, ...]
    fixed: tuple[str, ...] = ()
    rebuilt: tuple[str, ...] = ()
    frozen: Mapping[str, str] = field(default_factory=dict)  # file key -> open_clip name in the backbone
    ignored: Mapping[str, str] = field(default_factory=dict)  # file key -> why the method never uses it

    def roles(self) -> dict[str, str]:
        """``file key -> group``; a key declared twice is the kind's bug, not the file's."""
        roles: dict[str, str] = {}
        for role, keys in (("trained", self.trained), ("fixed", self.fixed), ("rebuilt", self.rebuilt),
                           ("frozen", self.frozen), ("ignored", self.ignored)):
            for key in keys:
                if key in roles:
                    raise ValueError(f"{key!r} is declared both {roles[key]} and {role}")
                roles[key] = role
        return roles

    def unclaimed(self, keys: Sequence[str]) -> list[str]:
        """The keys of a file this declaration leaves over (the read is refused when there are any)."""
        roles = self.roles()
        return [key for key in keys if key not in roles]


def frozen_differences(tensor_file: TensorFile, frozen: Mapping[str, str], reference: Mapping[str, torch.Tensor]
                       ) -> tuple[list[str], list[tuple[str, float]]]:
    """(keys naming no tensor of ``reference`` or of another shape, keys whose values differ with the largest
    absolute difference). A copy matches when it equals the reference cast to the file's dtype, up to that dtype's
    rounding: a file saved in fp16 from the same weights passes, a fine-tuned tensor does not."""
    foreign, differing = [], []
    for key, name in frozen.items():
        tensor, expected = tensor_file.tensors[key], reference.get(name)
        if expected is None or tuple(tensor.shape) != tuple(expected.shape):
            foreign.append(key)
            continue
        if not tensor.is_floating_point():
            if not torch.equal(tensor, expected.detach().to("cpu", tensor.dtype)):
                differing.append((key, float("nan")))
            continue
        cast = expected.detach().to("cpu", tensor.dtype).float()
        difference = float((tensor.float() - cast).abs().max()) if tensor.numel() else 0.0
        tolerance = 2 * torch.finfo(tensor.dtype).eps * max(1.0, float(cast.abs().max()) if cast.numel() else 0.0)
        if difference > tolerance:
            differing.append((key, difference))
    return foreign, differing


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
        for declared in dataclasses.fields(self):  # "weight" from a record or a caller becomes PathSpace.weight
            enum_type = type(declared.default) if isinstance(declared.default, enum.Enum) else None
            current = getattr(self, declared.name)
            if enum_type is not None and not isinstance(current, enum_type):
                try:
                    object.__setattr__(self, declared.name, enum_type(current))
                except ValueError:
                    choices = ", ".join(member.value for member in enum_type)
                    raise ValueError(f"{declared.name} must be one of {choices}, not {current!r}") from None
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
class Schedule:
    """A default schedule, in optimizer steps and a relative step size, so that it transfers across
    backbones (a BERT's input embeddings and CLIP's differ in scale) and dataset sizes (steps, not epochs)."""

    steps: int
    batch_size: int
    step_size: float  # Adam's per-step move as a fraction of each trained tensor's scale (Kind.step_scales)


DEFAULT_SCHEDULE = Schedule(steps=100, batch_size=128, step_size=0.02)


@dataclass(frozen=True)
class RepairDefaults:
    """What a repair uses when the caller names nothing: the zero-shot term and the schedule (README "Defaults")."""

    surrogate: str
    lam_zs: float | str  # a number, or "auto": chosen per repair on held-out shots (repair.train.select)
    schedule: Schedule = DEFAULT_SCHEDULE


@dataclass
class KindOutput:
    """One forward pass: logits at ``w``, along the path, and the class features used."""

    logits: torch.Tensor  # [B, C]
    path_logits: torch.Tensor | None  # [K, B, C] at w_ft + t_k (w - w_ft)
    class_features: torch.Tensor  # [C, E] normalised, at w ([B, C, E] where each image has its own: CoCoOp)


class Kind(nn.Module, ABC):
    """Base class: the declarations below, then the tensors' behaviour."""

    name: ClassVar[str]  # registry key, --kind value, recorded in outputs
    about: ClassVar[About]
    defaults: ClassVar[RepairDefaults]  # README "Defaults" has the evidence
    finetune_schedule: ClassVar[Schedule] = DEFAULT_SCHEDULE  # plain fine-tuning's default
    Options: ClassVar[type[KindOptions]] = KindOptions
    # kinds that also match every file this one matches but could not load it (detection then picks this one)
    outranks: ClassVar[tuple[str, ...]] = ()
    # whether element-wise arithmetic on the trainable tensors (a mean of checkpoints, a trimmed or dropped task
    # vector) is that arithmetic on the model: False where they parametrise the weights non-linearly (LoRA's factors)
    mergeable: ClassVar[bool] = True
    # True where the kind writes its own layouts whatever --format says (LoRA: a CLIP-LoRA file or a PEFT folder)
    own_layouts: ClassVar[bool] = False

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
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """What this kind reads from ``tensor_file``, every tensor in one group (see the module docstring).
        Default: :meth:`trainable_keys` trained, and the other tensors named as CLIP's own weights frozen.

        Without ``backbone`` (detection, ``inspect``) by names alone; with the loaded backbone (reading the file)
        a kind whose trained tensors depend on the model (CLIPFit's normalisation layers of a CNN) says exactly
        which, so that none of them is compared as a frozen copy."""
        trained = cls.trainable_keys(tensor_file, options)
        return Claims(trained=tuple(trained), frozen=backbone_copies(list(tensor_file.tensors), trained))

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

    def start_from(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Called by ``finetune`` with the encoded training images (``forward``'s inputs) and labels before the
        first step: a kind whose starting point is built from them (Tip-Adapter's cache) builds it here."""

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
        """The trained tensors to write: the input's names, shapes and dtypes, current values."""

    def keep_source(self, tensor_file: TensorFile, claims: Claims) -> None:
        """Hold the input's tensors this kind does not train, so the output has all of them, unchanged and in
        the input's order (called once the file is read: :func:`repair.kinds.read_kind`)."""
        trained = set(claims.trained)
        self.source_keys = list(tensor_file.tensors)
        self.carried = {key: tensor for key, tensor in tensor_file.tensors.items() if key not in trained}

    def output_tensors(self) -> dict[str, torch.Tensor]:
        """What an output holds: :meth:`export`'s tensors and the input's others, in the input's order."""
        exported = dict(self.export())
        carried: dict[str, torch.Tensor] = getattr(self, "carried", {})
        tensors = {}
        for key in getattr(self, "source_keys", ()):
            if key in exported:
                tensors[key] = exported.pop(key)
            elif key in carried:
                tensors[key] = carried[key]
        tensors.update(exported)
        return tensors

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
                     inputs: Sequence[Path], layout: Layout = FLAT) -> None:
        """Refuse an output path this kind cannot write, before any work (the same check the write makes)."""
        check_layout_output(out, layout, force, inputs)

    def save(self, out: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             force: bool = False, inputs: Sequence[Path] = (), layout: Layout = FLAT) -> Path:
        """Write ``tensors`` (from :meth:`output_tensors`) with the run's record, atomically, in ``layout``
        (:func:`repair.io.output_layout`: the input's own, e.g. a Dassl checkpoint, or safetensors); a kind
        whose users load another format (a PEFT folder, a CLIP-LoRA torch file) writes that."""
        return write_layout(out, layout, tensors, metadata, force=force, inputs=inputs)

    # ------------------------------------------------------------------ surrogates

    def unsupported_surrogates(self) -> dict[str, str]:
        """Surrogates that mean nothing for this checkpoint, each with the reason (e.g. no zero-shot point
        in prompt space for a randomly initialised prompt); a repair refuses them by name."""
        return {}

    def zero_shot_model(self) -> AbstractContextManager[None] | None:
        """For a kind whose tensors hold no zero-shot point (prompt tokens in the image sequence: MaPLe,
        PromptSRC), a context in which it scores as zero-shot CLIP (its insertions off), so that what reads only
        the zero-shot model's outputs (``distill``, ``lam_zs auto``) still applies. None: use ``w_zs``."""
        return None

    def open_vocabulary_logits(self, inputs: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``forward``'s inputs scored over any class list, differentiable in ``w``: what the open-vocabulary
        surrogates (``fisher-vocab``, ``fisher-dense``, ``distill``) score. The default, :meth:`logits_for`, is
        right where the inputs are the frozen tower's features; a kind that trains the image tower overrides it."""
        return self.logits_for(inputs, classnames)

    def pair_logit_gradients(self, inputs: torch.Tensor, classnames: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """``d z(inputs[r], classnames[r]) / dw`` for every row ``r`` (``{name: [R, *shape]}``) where the kind
        has a batched way (a prompt: one copy of the context per row, one text pass for all rows); None: the
        caller pulls back class by class (:func:`repair.train.curvature.logit_gradients`)."""
        return None

    def encode_alongside(self, classnames: Sequence[str] | None) -> AbstractContextManager[None]:
        """While open, :meth:`forward` may encode ``classnames`` in its own text pass, and the next
        :meth:`open_vocabulary_logits` for exactly that list uses those features: one pass instead of two
        where a surrogate scores a few names per step (``distill``). Kinds without a text pass ignore it."""
        return nullcontext()

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

    @torch.no_grad()
    def step_scales(self) -> dict[str, float]:
        """Each trainable tensor's scale, which a relative step size multiplies (``TrainConfig.step_size``).

        A repair moves each tensor at a rate set by how far fine-tuning moved it, the RMS of ``w_ft - w_zs``:
        the repaired point lies within a few such distances of both ends, whatever the backbone's
        parametrisation. A tensor fine-tuning left where it was takes the whole displacement's RMS; where
        nothing moved (plain fine-tuning starts at ``w_zs``) or the kind has no zero-shot point, the RMS of the
        tensor itself, then of all of them, then CLIP's initialisation std.
        """
        current = {name: parameter.detach().float() for name, parameter in self.trainable().items()}
        try:
            zero_shot = {name: value.detach().float().to(current[name].device)
                         for name, value in self.zero_shot_values().items()}
        except IncompatibleCheckpointError:  # no zero-shot point in this checkpoint's parameter space
            zero_shot = {}
        moved = {name: _rms(current[name] - zero_shot[name]) if name in zero_shot else 0.0 for name in current}
        sizes = {name: _rms(tensor) for name, tensor in current.items()}
        all_moved = _rms_of(current, zero_shot) if len(zero_shot) == len(current) else 0.0
        all_sizes = _rms_of(current, {})
        scales = {}
        for name in current:
            for candidate in (moved[name], all_moved, sizes[name], all_sizes, CLIP_INIT_STD):
                if candidate > 0.0:
                    scales[name] = candidate
                    break
        return scales

    def same_weights(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
        """Whether two sets of values give the same model (``path`` checks both files imply one ``w_zs``)."""
        return a.keys() == b.keys() and all(torch.equal(a[name], b[name].to(a[name])) for name in a)


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.pow(2).mean().sqrt()) if tensor.numel() else 0.0


def _rms_of(values: Mapping[str, torch.Tensor], minus: Mapping[str, torch.Tensor]) -> float:
    """RMS over every number of ``values`` (minus the matching ``minus`` tensors, where given)."""
    squares = sum(float((tensor - minus[name] if name in minus else tensor).pow(2).sum())
                  for name, tensor in values.items())
    count = sum(tensor.numel() for tensor in values.values())
    return (squares / count) ** 0.5 if count else 0.0
