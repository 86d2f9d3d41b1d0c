"""Options shared by several commands, declared once; closed value sets as Enums.

An Enum-typed option makes a bad value a usage error (exit 2) from Typer before any work.
The kinds' own options are not listed here: :func:`with_kind_options` reads each kind's
``Options`` declaration (field, type, help, stages) and adds one flag per field name.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repair.io.layouts import OUTPUT_FORMATS
from repair.kinds import KINDS
from repair.train.surrogates import SURROGATES
from repair.train.task_gain import IF_NO_GAIN
from repair.data.features import default_cache_dir
from repair.errors import UsageError
from repair.model.backbone import BackboneSpec
from repair.workflows.inputs import DataOptions
from repair.workflows.run import OUTPUT_DTYPES

KindName = enum.Enum("KindName", {name: name for name in KINDS}, type=str)
SurrogateName = enum.Enum("SurrogateName", {name: name for name in SURROGATES}, type=str)
OutputDtype = enum.Enum("OutputDtype", {name: name for name in OUTPUT_DTYPES}, type=str)
OutputFormat = enum.Enum("OutputFormat", {name: name for name in OUTPUT_FORMATS}, type=str)
IfNoGain = enum.Enum("IfNoGain", {name: name for name in IF_NO_GAIN}, type=str)


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _device(value: str) -> str:
    if not _DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not auto, cpu, cuda, cuda:N or mps")
    return value


ModelOpt = Annotated[str, typer.Option("--model", help="open_clip model name, local-dir:PATH or hf-hub:ORG/NAME.")]
PretrainedOpt = Annotated[str, typer.Option(
    "--pretrained", help="Pretrained tag (e.g. openai), a weights file, or 'none' for random init.")]
ModelConfigOpt = Annotated[Optional[Path], typer.Option(
    "--model-config", help="Register a custom open_clip architecture (JSON) before loading --model.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_device, help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", help="Forward passes in fp32, bf16 or fp16 (autocast); trainable tensors stay fp32.")]
DataOpt = Annotated[Path, typer.Option("--data", help="ImageFolder directory: one sub-folder per class.")]
ClassnamesOpt = Annotated[Optional[Path], typer.Option(
    "--classnames", help="Class display names: JSON {folder: name} / list, or text lines 'folder: name'.")]
TemplatesOpt = Annotated[Optional[Path], typer.Option(
    "--templates", help="Prompt templates with one '{}', one per line or a JSON list [default: 'a photo of a {}.'].")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="Where image features are cached [default: $MERGETUNE_CACHE or ~/.cache/mergetune].")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Image-decoding worker processes.")]
ShotsOpt = Annotated[Optional[int], typer.Option("--shots", min=1, help="Images per class to train on (all if unset).")]
ValOpt = Annotated[float, typer.Option(
    "--val-fraction", min=0.0, max=0.9, help="Hold out this fraction of the shots; keep the best epoch on it.")]
OtherClassesOpt = Annotated[bool, typer.Option(
    "--other-classes", help="Use a checkpoint on classes other than those it records (kinds that can score "
                            "unseen classes only, e.g. a shared CoOp prompt).")]
KindOpt = Annotated[Optional[KindName], typer.Option(
    "--kind", help="Checkpoint kind; detected from the file if unset.")]
DtypeOpt = Annotated[OutputDtype, typer.Option(
    "--dtype", help="Output dtype: input (same as the input), fp32, fp16, bf16.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run from the progress saved next to --out after each epoch.")]
DeterministicOpt = Annotated[bool, typer.Option(
    "--deterministic", help="Deterministic kernels only: bit-identical reruns (slower on GPU).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]
VocabularyOpt = Annotated[Optional[Path], typer.Option(
    "--vocabulary", help="Generic concepts, one per line, for the reference vocabulary of fisher-vocab, "
                         "fisher-dense, distill and --lam-zs auto [default: open_clip's 1,000 ImageNet names].")]


def lam_zs_value(text: Optional[str]) -> float | str | None:
    """``--lam-zs``: a number >= 0 or ``auto``; anything else is a usage error (exit 2)."""
    if text is None or text == "auto":
        return text
    try:
        number = float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number >= 0 or 'auto'") from None
    if not number >= 0.0:
        raise typer.BadParameter(f"{text} is not a number >= 0 or 'auto'")
    return number


# ----------------------------------------------------------------------------- the kinds' own options


@dataclasses.dataclass
class _KindFlag:
    name: str
    annotation: Any
    help: str
    kinds: list[str]


def kind_flags(stage: str) -> list[_KindFlag]:
    """One flag per option name over every registered kind whose option applies at ``stage``."""
    flags: dict[str, _KindFlag] = {}
    for kind in KINDS.values():
        hints = typing.get_type_hints(kind.Options)
        for field in dataclasses.fields(kind.Options):
            if stage not in field.metadata.get("stages", ()):
                continue
            if field.name in flags:
                flags[field.name].kinds.append(kind.name)
                continue
            flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
            value_type = _optional_inner(hints[field.name])
            option = typer.Option(flag, help=field.metadata.get("help", ""))
            flags[field.name] = _KindFlag(field.name, Annotated[Optional[value_type], option],
                                          field.metadata.get("help", ""), [kind.name])
    for flag in flags.values():
        if len(flag.kinds) < len(KINDS):
            flag.annotation.__metadata__[0].help += f" [{', '.join(flag.kinds)}]"
    return list(flags.values())


def _optional_inner(annotation: Any) -> Any:
    """``int | None`` -> ``int``: every kind flag is optional on the command line (unset = not given)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return args[0] if is_union and len(args) == 1 else annotation


def with_kind_options(stage: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one flag per kind option (at ``stage``); the body gets the given ones as
    ``kind_options={name: value}``. The library refuses those that do not apply to the file's kind."""
    flags = kind_flags(stage)

    def collect(values: dict[str, Any]) -> dict[str, Any]:
        return {name: choice.value if isinstance(choice, enum.Enum) else choice
                for name, choice in values.items() if choice is not None}

    return _extended("kind_options", [(flag.name, flag.annotation, None) for flag in flags], collect)


def with_flags(name: str, group: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the fields of a dataclass as flags; the body gets the instance as ``name``.

    A field annotated with a Typer option is used as it is; a plain field (``TrainConfig``'s) becomes
    ``--field-name`` with the help and bounds of its metadata.
    """
    hints = typing.get_type_hints(group, include_extras=True)
    fields = [(field.name, _flag_annotation(field, hints[field.name]), field.default)
              for field in dataclasses.fields(group)]
    return _extended(name, fields, lambda values: group(**values))


def _flag_annotation(field: dataclasses.Field, hint: Any) -> Any:
    """The field's flag; its bounds are checked by the dataclass itself (one message for flags and Python),
    and shown in the help."""
    if typing.get_origin(hint) is Annotated:
        return hint
    low, high = field.metadata.get("min"), field.metadata.get("max")
    bounds = f" [{low}..{high}]" if low is not None and high is not None else f" [>= {low}]" if low is not None else ""
    option = typer.Option("--" + field.name.replace("_", "-"), help=field.metadata.get("help", "") + bounds)
    return Annotated[hint, option]


def _extended(name: str, fields: list[tuple[str, Any, Any]], collect: Callable[[dict[str, Any]], Any]
              ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Replace the body's parameter ``name`` by ``fields`` (flags for Typer); pass ``collect(their values)``."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        base = inspect.signature(command, eval_str=True)
        kept = [parameter for key, parameter in base.parameters.items() if key != name]
        extra = [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                 for key, annotation, default in fields]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            grouped = {key: values.pop(key) for key, _, _ in fields}
            try:
                collected = collect(grouped)
            except UsageError as exc:  # a value the flags' own checks could not see (e.g. --lr nan)
                raise typer.BadParameter(str(exc)) from None
            return command(**values, **{name: collected})

        wrapper.__signature__ = base.replace(parameters=[*kept, *extra])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in [*kept, *extra]}
        del wrapper.__wrapped__  # Typer must read the new signature, not the body's
        return wrapper

    return decorate


@dataclasses.dataclass(frozen=True)
class RunFlags:
    """How a training run writes, computes and reports."""

    dtype: DtypeOpt = OutputDtype.input
    precision: PrecisionOpt = Precision.fp32
    force: ForceOpt = False
    resume: ResumeOpt = False
    deterministic: DeterministicOpt = False
    quiet: QuietOpt = False
    as_json: JsonOpt = False

    def settings(self) -> dict[str, Any]:
        """The library's keyword arguments for these flags."""
        return {"output_dtype": self.dtype.value, "precision": self.precision.value, "force": self.force,
                "resume": self.resume, "deterministic": self.deterministic}


@dataclasses.dataclass(frozen=True)
class DataFlags:
    """How every command reads an image folder and where features are cached."""

    classnames: ClassnamesOpt = None
    templates: TemplatesOpt = None
    cache_dir: CacheDirOpt = None
    no_cache: NoCacheOpt = False
    workers: WorkersOpt = 0

    def options(self, shots: Optional[int] = None, val_fraction: float = 0.0, progress: Any = None) -> DataOptions:
        return DataOptions(classnames_file=self.classnames, templates_file=self.templates, shots=shots,
                           val_fraction=val_fraction,
                           cache_dir=None if self.no_cache else (self.cache_dir or default_cache_dir()),
                           workers=self.workers, on_progress=progress.on_images if progress else None)


@dataclasses.dataclass(frozen=True)
class BackboneFlags:
    """Which frozen CLIP to load, and where."""

    model: ModelOpt = "ViT-B-16"
    pretrained: PretrainedOpt = "openai"
    model_config: ModelConfigOpt = None
    device: DeviceOpt = "auto"

    def spec(self) -> BackboneSpec:
        return BackboneSpec(self.model, self.pretrained, self.model_config)


def value(choice: enum.Enum | str | None) -> str | None:
    """An Enum option's plain string for the library."""
    return choice.value if isinstance(choice, enum.Enum) else choice
