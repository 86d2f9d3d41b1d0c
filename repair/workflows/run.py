"""One training workflow, :func:`fit`; ``repair`` and ``finetune`` are thin wrappers over it.

Each wrapper reads and validates its inputs before any expensive work and describes the run
as one :class:`RunInputs` value; the progress file's fingerprint and the output's
:class:`~repair.record.Record` both come from that value, so they can never disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from repair.data.folders import ImageFolder, load_templates
from repair.errors import OutputExistsError, Terminated, UsageError
from repair.io import OUTPUT_FORMATS, TensorFile, output_layout, output_lock, read_tensors, tensors_checksum
from repair.kinds import Kind, KindOptions, kind_class, plan_kind, read_kind, resolve_options
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import CheckpointInput, DataInput, DataSettings, Inputs, Record
from repair.train.loop import (ProgressFile, StepReport, TrainConfig, TrainResult, check_weight_ensemble,
                               seeded_run, train)
from repair.train.objective import Objective
from repair.train.curvature import read_vocabulary
from repair.train.select import choose_lam_zs
from repair.train.surrogates import SURROGATES, Surrogate, build_surrogate, refusals
from repair.train.task_gain import IF_NO_GAIN, can_write_zero_shot, measure_task_gain, no_zero_shot_point
from repair.train.fields import checked
from repair.workflows.inputs import (
    DataOptions,
    check_class_list,
    check_kind_output,
    check_outside_input_folders,
    check_output,
    check_record_backbone,
    encode_for,
    read_record,
    resolve_backbone,
    select_training_images,
    side_inputs,
)

OUTPUT_DTYPES = {"input": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KindChoices = Mapping[str, Any] | KindOptions | None  # flag-name -> value overrides, or one kind's Options


@dataclass
class RunOutcome:
    """What a repair or finetune wrote, with the record stored in its metadata."""

    path: Path
    record: Record
    train_result: TrainResult
    notes: list[str] = field(default_factory=list)  # choices made for the caller (a surrogate fallback)


@dataclass(frozen=True)
class RunInputs:
    """Everything one training run depends on; its fingerprint ties a progress file to it."""

    stage: str  # "repair" or "finetune"
    kind: Kind
    backbone: Backbone
    dataset: ImageFolder
    held_out: ImageFolder | None
    templates: tuple[str, ...]
    objective: Objective  # resolved for the kind: no unset choices
    config: TrainConfig
    data_options: DataOptions
    output_dtype: str = "input"
    source: TensorFile | None = None  # the fine-tuned checkpoint a repair starts from
    output_format: str | None = None  # repair.io.OUTPUT_FORMATS; None: by the output's name
    vocabulary: tuple[str, ...] | None = None  # generic concepts of the reference vocabulary (None: packaged)
    if_no_gain: str | None = None  # a repair of a checkpoint no better than zero-shot: IF_NO_GAIN

    def fingerprint(self) -> str:
        identity = [self.stage, self.kind.name, self.kind.recorded_options(), self.kind.describe(),
                    self.source.sha256 if self.source else None, self.dataset.manifest_sha256(),
                    self.held_out.manifest_sha256() if self.held_out else None, list(self.templates),
                    self.objective.as_dict(), self.config.as_dict(), self.backbone.visual_fingerprint,
                    self.backbone.text_fingerprint]
        if self.vocabulary is not None:
            identity.append(hashlib.sha256("\n".join(self.vocabulary).encode()).hexdigest())
        if self.if_no_gain is not None:
            identity.append(self.if_no_gain)
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def progress_file(self, out: Path) -> ProgressFile:
        """The per-epoch state file of a run writing ``out``, tied to exactly these inputs and settings."""
        return ProgressFile(progress_path(out), self.fingerprint())

    def record(self, result: TrainResult) -> Record:
        dataset, held_out = self.dataset, self.held_out
        checkpoint = None if self.source is None else CheckpointInput(self.source.path.name, self.source.sha256)
        data = DataInput(path=str(dataset.root), images=len(dataset), manifest_sha256=dataset.manifest_sha256(),
                         val_images=len(held_out) if held_out is not None else 0,
                         val_manifest_sha256=held_out.manifest_sha256() if held_out is not None else None,
                         per_class=[len(indices) for indices in dataset.indices_by_class()],
                         val_per_class=[len(indices) for indices in held_out.indices_by_class()] if held_out is not None else None)
        return Record(
            stage=self.stage, kind=self.kind.name, kind_options=self.kind.recorded_options(),
            kind_details=self.kind.describe(), trainable_numbers=self.kind.num_trainable(),
            backbone=self.backbone.identity(), logit_scale=self.kind.scale,
            class_folders=list(dataset.folders), classnames=list(dataset.classnames), templates=list(self.templates),
            objective=self.objective.as_dict(), train=self.config.as_dict(), seed=self.config.seed,
            data=DataSettings(self.data_options.shots, self.data_options.val_fraction, self.output_dtype),
            inputs=Inputs(checkpoint, data), result=result.as_dict(),
            scores_other_classes=self.kind.scores_other_classes(),
        )


@checked
def fit(inputs: RunInputs, out: Path, *, force: bool = False, resume: bool = False, deterministic: bool = False,
        on_step: Callable[[StepReport], None] | None = None) -> RunOutcome:
    """Encode once, check that a repair's checkpoint gained something to keep (:mod:`repair.train.task_gain`),
    build the zero-shot term once, choose ``lam_zs`` if asked (``"auto"``), train, write ``out`` atomically with
    its record (the task gain, the surrogate's build and lam_zs auto's curve in ``result``).

    A run that fails removes the progress file it created; an interrupted one (Ctrl-C, SIGTERM)
    keeps it for ``resume=True``.
    """
    kind, options = inputs.kind, inputs.data_options
    check_weight_ensemble(inputs.config, kind, inputs.held_out is not None)  # before encoding anything
    progress = inputs.progress_file(out)
    check_saved_progress(out, resume, force)
    if resume:
        progress.check_resumable()  # before encoding: a changed setting is refused at once
    elif progress.path.exists():  # --force: the saved progress of another run is discarded
        progress.remove()
    created_progress = not progress.path.exists()
    notes: list[str] = []
    try:
        train_set = encode_for(kind, inputs.backbone, inputs.dataset, options, training=True)
        if inputs.stage == "finetune":
            kind.start_from(train_set.features, train_set.labels)
        task_gain = _task_gain(inputs, train_set, notes) if inputs.stage == "repair" else None
        objective = inputs.objective
        if task_gain is not None and task_gain.get("action") == "zero-shot":
            kind.load_values(kind.zero_shot_values())
            result = TrainResult(steps=0, selected_epoch=None)
        else:
            result, objective = _train(inputs, train_set, progress, resume, deterministic, on_step)
        if task_gain is not None:
            result.choices["task_gain"] = task_gain
        record = replace(inputs, objective=objective).record(result)
        sources = [inputs.source.path] if inputs.source is not None else []
        tensors = export(kind, inputs.output_dtype)
        layout = output_layout(inputs.source.layout if inputs.source else None, inputs.output_format, out)
        path = kind.save(out, tensors, record.to_metadata(tensors_checksum(tensors)), force=force, inputs=sources,
                         layout=layout)
    except (KeyboardInterrupt, Terminated):
        raise
    except BaseException:
        if created_progress:
            progress.remove()
        raise
    progress.remove()
    return RunOutcome(path, record, result, notes)


def _task_gain(inputs: RunInputs, train_set, notes: list[str]) -> dict[str, object]:
    """What ``result["task_gain"]`` records: both accuracies on the repair images and the action taken (a note
    when there was no gain), or why they could not be measured."""
    why_not = no_zero_shot_point(inputs.kind)
    if why_not is not None:
        return {"not_measured": why_not}
    gain = measure_task_gain(inputs.kind, train_set)
    if gain.gained:
        return gain.as_dict()
    if inputs.if_no_gain == "repair":
        notes.append(f"{gain.describe()}: fine-tuning gained nothing there to keep; repaired as asked "
                     "(--if-no-gain repair)")
    elif not can_write_zero_shot(inputs.kind):
        notes.append(f"{gain.describe()}: fine-tuning gained nothing there to keep; repaired as usual, since a "
                     f"{inputs.kind.name} checkpoint cannot hold the zero-shot model")
    else:
        notes.append(f"{gain.describe()}: fine-tuning gained nothing there to keep, so the zero-shot weights were "
                     "written (check the fine-tuning run; --if-no-gain repair repairs it anyway)")
        gain = replace(gain, action="zero-shot")
    return gain.as_dict()


def _train(inputs: RunInputs, train_set, progress: ProgressFile, resume: bool, deterministic: bool,
           on_step: Callable[[StepReport], None] | None) -> tuple[TrainResult, Objective]:
    """The training itself, with the zero-shot term built and ``lam_zs`` chosen if asked; the result and the
    objective actually run (what the record says)."""
    kind = inputs.kind
    val_set = (encode_for(kind, inputs.backbone, inputs.held_out, inputs.data_options, training=True)
               if inputs.held_out is not None else None)
    surrogate = _prepare_surrogate(inputs, train_set)
    objective, choices = inputs.objective, {}
    if surrogate is not None and getattr(surrogate, "stats", None):
        # only what the inputs decide: the build time and a cache hit differ between identical runs
        choices["surrogate_build"] = {key: value for key, value in surrogate.stats.items()
                                      if key not in ("seconds", "from_cache")}
    with seeded_run(inputs.config.seed, deterministic):
        if objective.chooses_lam_zs:
            chosen, choices["lam_zs_auto"] = choose_lam_zs(kind, objective, train_set, inputs.config, surrogate,
                                                           vocabulary=inputs.vocabulary)
            objective = replace(objective, lam_zs=chosen)
        result = train(kind, objective, train_set, inputs.config, val_set=val_set, surrogate=surrogate,
                       on_step=on_step, progress=progress, resume=resume)
    result.choices.update(choices)
    return result, objective


def progress_path(out: Path) -> Path:
    """Where a run writing ``out`` saves its state after every epoch (hidden, next to it)."""
    return Path(out).with_name(f".{Path(out).name}.progress")


def check_saved_progress(out: Path, resume: bool, force: bool) -> None:
    """Saved progress for ``out`` (an interrupted run: hours of work, maybe) is continued with ``resume`` or
    discarded with ``force``; a run given neither refuses rather than overwrite it."""
    saved = ProgressFile(progress_path(out), "").saved() if not (resume or force) else None
    if saved is not None:
        raise OutputExistsError(f"{out}: an interrupted run saved its progress here ({progress_path(out).name}, "
                                f"epoch {saved.get('epoch', '?')}); pass --resume to continue it, or --force to "
                                "discard it and start over")


def _prepare_surrogate(inputs: RunInputs, train_set) -> Surrogate | None:
    objective, kind, dataset = inputs.objective, inputs.kind, inputs.dataset
    if objective.lam_zs == 0.0:
        return None
    zero_shot = hashlib.sha256()  # the Fisher is taken at w_zs, which a file can set (LoRA's A, a ctx_init)
    surrogate = SURROGATES[objective.surrogate]
    cached = getattr(surrogate, "needs_data", False)  # only data-built terms are cached
    # a kind without a zero-shot point gives distill the zero-shot model's outputs (Kind.zero_shot_model) instead
    outputs_only = not getattr(surrogate, "needs_zero_shot_point", True) and kind.zero_shot_model() is not None
    for name, value in sorted(kind.zero_shot_values().items() if cached and not outputs_only else ()):
        zero_shot.update(name.encode())
        zero_shot.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    cache_key = json.dumps([kind.name, kind.describe(), inputs.backbone.visual_fingerprint,
                            inputs.backbone.text_fingerprint, list(dataset.classnames), list(inputs.templates),
                            dataset.file_hashes(), zero_shot.hexdigest()], default=str)
    return build_surrogate(objective.surrogate, kind, train_set, seed=inputs.config.seed, cache_key=cache_key,
                           cache_dir=inputs.data_options.cache_dir, vocabulary=inputs.vocabulary)


def resolve_surrogate(objective: Objective, kind: Kind) -> tuple[Objective, list[str]]:
    """The objective for this checkpoint: a surrogate it cannot use is refused by name (with the ones that
    work); when the caller named none and the kind's default cannot apply, another is used, with a note."""
    resolved = objective.for_kind(kind)
    unsupported = refusals(kind)
    if resolved.lam_zs == 0.0 or resolved.surrogate not in unsupported:
        return resolved, []
    reason = unsupported[resolved.surrogate]
    working = [name for name in SURROGATES if name not in unsupported]
    if objective.surrogate is None and working:
        fallback = "feature" if "feature" in working else working[0]
        return replace(resolved, surrogate=fallback), [
            f"the default surrogate {resolved.surrogate} does not apply to this {kind.about.description} "
            f"({reason}); using {fallback}"]
    way_out = f"use --surrogate {' or '.join(working)}" if working else "use --lam-zs 0"
    raise UsageError(f"--surrogate {resolved.surrogate} does not apply to this {kind.about.description}: {reason}; "
                     f"{way_out}")


def export(kind: Kind, output_dtype: str) -> dict[str, torch.Tensor]:
    """The output's tensors (the trained ones and the input's others) in the input's dtypes, or all floating
    tensors in ``output_dtype``."""
    dtype = OUTPUT_DTYPES[output_dtype]
    return {name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
            for name, tensor in kind.output_tensors().items()}


def _check_output_dtype(output_dtype: str) -> None:
    if output_dtype not in OUTPUT_DTYPES:
        raise UsageError(f"unknown output dtype {output_dtype!r}; choose {', '.join(OUTPUT_DTYPES)}")


def _check_output_format(output_format: str | None) -> None:
    if output_format not in (None, *OUTPUT_FORMATS):
        raise UsageError(f"unknown output format {output_format!r}; choose {', '.join(OUTPUT_FORMATS)}")


@checked
def repair(
    finetuned: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    backbone: Backbone | BackboneSpec | None = None,
    objective: Objective = Objective(),
    config: TrainConfig = TrainConfig(),
    data_options: DataOptions | None = None,
    kind: str | None = None,
    kind_options: KindChoices = None,
    other_classes: bool = False,
    output_dtype: str = "input",
    output_format: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    force: bool = False,
    resume: bool = False,
    deterministic: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    vocabulary: str | Path | None = None,
    if_no_gain: str = "zero-shot",
) -> RunOutcome:
    """MergeTune continued fine-tuning of a fine-tuned checkpoint; writes a same-shape safetensors file.

    A checkpoint that scores no better than the zero-shot model on the repair images gained nothing there to
    keep (:mod:`repair.train.task_gain`): with ``if_no_gain="zero-shot"`` (the default) the zero-shot weights are
    written in its shape instead, with a note; ``"repair"`` repairs it anyway. Both accuracies are recorded in
    ``result["task_gain"]`` of every repair.

    ``objective.lam_zs="auto"`` chooses the zero-shot weight on held-out shots (:mod:`repair.train.select`);
    ``vocabulary`` is a text file of generic concepts (one per line) replacing the packaged ImageNet names in
    the reference vocabulary of ``fisher-vocab``, ``fisher-dense``, ``distill`` and ``lam_zs="auto"``.

    ``kind_options`` overrides the kind's options (``{"ctx_init": "a photo of a"}``); an option the
    detected kind does not have is refused. A checkpoint recorded for other classes than ``data_dir``'s
    is refused unless ``other_classes`` and its kind can score them. Progress is saved next to ``out`` after every epoch;
    ``resume=True`` continues an interrupted run.

    The output is written the way the input was packaged (a Dassl checkpoint stays one, a Hugging Face folder stays
    one), or as one safetensors file with ``output_format="safetensors"`` or an ``out`` ending in ``.safetensors``
    (:func:`repair.io.output_layout`); it holds every tensor of the input, the untrained ones unchanged.
    """
    finetuned, out = Path(finetuned), Path(out)
    data_options = data_options or DataOptions()  # built per call: the cache location follows the environment
    _check_output_dtype(output_dtype)
    _check_output_format(output_format)
    if if_no_gain not in IF_NO_GAIN:
        raise UsageError(f"unknown if_no_gain {if_no_gain!r}; choose {' or '.join(IF_NO_GAIN)}")
    files, folders = side_inputs(data_options, backbone, vocabulary)
    check_outside_input_folders(out, [Path(data_dir), *folders])
    if not out.is_dir():  # an existing folder may be a PEFT output: checked once the kind is known
        check_output(out, [finetuned, *files], force)
    check_saved_progress(out, resume, force)
    with output_lock(out):  # a second run writing the same file refuses now, not after training
        source = read_tensors(finetuned)
        record = read_record(source)
        cls, options = plan_kind(source, kind=kind, recorded_kind=record.kind if record else None,
                                 recorded_options=record.kind_options if record else None, overrides=kind_options)
        if output_format == "safetensors" and cls.own_layouts:
            raise UsageError(f"--format safetensors does not apply to {cls.name} checkpoints: their output keeps the "
                             "input's own layout")
        check_kind_output(cls, out, source, options, force, [finetuned, *files],
                          output_layout(source.layout, output_format, out))
        templates = load_templates(data_options.templates_file)
        concepts = tuple(read_vocabulary(vocabulary)) if vocabulary is not None else None
        dataset, held_out = select_training_images(Path(data_dir), data_options, config.seed)
        backbone = resolve_backbone(backbone, device, precision)
        check_record_backbone(record, backbone, finetuned)
        model = read_kind(cls, backbone, source, dataset.classnames, templates, options)
        check_class_list(record, dataset, finetuned, model, other_classes=other_classes)
        resolved, notes = resolve_surrogate(objective, model)
        inputs = RunInputs("repair", model, backbone, dataset, held_out, tuple(templates), resolved,
                           config.for_kind(model, "repair"), data_options, output_dtype, source, output_format,
                           concepts, if_no_gain)
        outcome = fit(inputs, out, force=force, resume=resume, deterministic=deterministic, on_step=on_step)
        outcome.notes.extend(notes)
        return outcome


@checked
def finetune(
    kind: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    backbone: Backbone | BackboneSpec | None = None,
    config: TrainConfig = TrainConfig(),
    data_options: DataOptions | None = None,
    kind_options: KindChoices = None,
    output_dtype: str = "input",
    device: str = "cpu",
    precision: str = "fp32",
    force: bool = False,
    resume: bool = False,
    deterministic: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
) -> RunOutcome:
    """Plain fine-tuning from the zero-shot point (both constraint terms off): the baseline to repair."""
    out = Path(out)
    data_options = data_options or DataOptions()
    cls = kind_class(kind)
    options = resolve_options(cls, None, kind_options)
    _check_output_dtype(output_dtype)
    files, folders = side_inputs(data_options, backbone)
    check_outside_input_folders(out, [Path(data_dir), *folders])
    check_kind_output(cls, out, None, options, force, files)
    check_saved_progress(out, resume, force)
    with output_lock(out):
        templates = load_templates(data_options.templates_file)
        dataset, held_out = select_training_images(Path(data_dir), data_options, config.seed)
        backbone = resolve_backbone(backbone, device, precision)
        model = cls.zero_shot(backbone, dataset.classnames, templates, options)
        inputs = RunInputs("finetune", model, backbone, dataset, held_out, tuple(templates),
                           Objective(lam_zs=0.0, lam_lmc=0.0).for_kind(model), config.for_kind(model, "finetune"),
                           data_options, output_dtype)
        return fit(inputs, out, force=force, resume=resume, deterministic=deterministic, on_step=on_step)


__all__ = ["RunInputs", "RunOutcome", "fit", "repair", "finetune", "export", "resolve_surrogate", "OUTPUT_DTYPES",
           "check_saved_progress", "progress_path"]
