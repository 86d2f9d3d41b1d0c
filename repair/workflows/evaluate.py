"""The forgetting report: zero-shot CLIP and each checkpoint on base (and novel) test folders."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from repair.data import group
from repair.data.features import Features
from repair.data.folders import ImageFolder, load_templates, scan_image_folder
from repair.errors import DataError, UsageError
from repair.eval.baselines import BASELINES, Baselines, baseline_names, check_request, run_baselines
from repair.eval.metrics import EVAL_SCHEMA, EvalSet, Evaluation, ModelResult, Scorer, ZeroShot, forgetting
from repair.io import TensorFile, read_tensors
from repair.kinds import Kind, load_kind
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import versions
from repair.train.fields import checked
from repair.workflows.inputs import (
    DataOptions,
    check_class_list,
    check_record_backbone,
    encode_for,
    read_record,
    recorded_backbone,
    resolve_backbone,
)
from repair.workflows.run import KindChoices


def load_evalset(backbone: Backbone, dataset: ImageFolder, name: str, options: DataOptions) -> EvalSet:
    """Features are encoded on first use per image tower and normalisation, then reused."""
    memo: dict[tuple[str, str], Features] = {}

    def features_for(scorer: Scorer) -> Features:
        encoder = scorer.image_encoder()
        key = (encoder.fingerprint if encoder else "backbone", scorer.input_kind)
        if key not in memo:
            memo[key] = encode_for(scorer, backbone, dataset, options, shard=True)
        return memo[key]

    return EvalSet(name, dataset.classnames, features_for)


@checked
def evaluate(
    checkpoints: str | Path | Sequence[str | Path],
    data_dir: str | Path,
    *,
    novel_dir: str | Path | Sequence[str | Path] | None = None,
    backbone: Backbone | BackboneSpec | None = None,
    data_options: DataOptions | None = None,
    kind: str | None = None,
    kind_options: KindChoices = None,
    other_classes: bool = False,
    baselines: bool | str | Sequence[str] = False,
    val_dir: str | Path | None = None,
    val_novel_dir: str | Path | Sequence[str | Path] | None = None,
    wise_alpha: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    precision: str = "fp32",
    skip_inapplicable: bool = False,
) -> dict[str, Any]:
    """The forgetting report: zero-shot and every checkpoint on base (and novel) test folders.

    ``checkpoints`` is one path or a list of them. ``novel_dir`` may be several held-out folders: each is
    reported, and "novel" is their mean.
    Without ``backbone``, the one the first checkpoint records is loaded. The base folder must hold the
    classes each checkpoint records, unless ``other_classes`` and its kind can score other classes.

    With ``baselines`` (``True``: all of :data:`~repair.eval.baselines.BASELINES`; or some names), the first
    checkpoint is taken as the fine-tuned model and each baseline becomes a row (``role`` "baseline", its
    name, ``chosen_by`` and ``settings``). Settings are chosen on the labelled validation folders ``val_dir``
    (base classes) and ``val_novel_dir`` (held-out ones), never on the test folders; without them a baseline
    uses its fixed default or is skipped (the report's ``baselines.skipped`` says why). ``wise_alpha`` fixes
    WiSE-FT's alpha instead; ``seed`` seeds DARE's random drop. A named baseline the fine-tuned checkpoint
    cannot have (the weight-space ones need a zero-shot point) is refused, or with ``skip_inapplicable``
    skipped like an unnamed one (for a benchmark that names the same baselines for every kind).
    """
    names, named = baseline_names(baselines)
    val_novel = _as_list(val_novel_dir)
    if wise_alpha is not None and not 0.0 <= wise_alpha <= 1.0:
        raise UsageError(f"wise_alpha must lie in [0, 1], got {wise_alpha}")
    if wise_alpha is not None and "wise-ft" not in names:
        raise UsageError("--wise-alpha sets the WiSE-FT baseline's alpha: it needs --baselines")
    if (val_dir is not None or val_novel) and not names:
        raise UsageError("--val-data chooses the baselines' settings: it needs --baselines")
    if val_novel and val_dir is None:
        raise UsageError("--val-novel-data needs --val-data: the validation images of the base classes")
    check_request(names, named, val_dir is not None)
    data_options = data_options or DataOptions(shots=None)
    with group.agreed():  # under eval --nproc, an input missing on one machine stops every rank alike
        files = [read_tensors(path) for path in _as_list(checkpoints)]  # validate every input before loading a model
        if names and not files:
            raise UsageError("--baselines needs the fine-tuned checkpoint as the first CHECKPOINT")
        _check_distinct_folders(data_dir, _as_list(novel_dir), val_dir, val_novel)
        records = [read_record(tensor_file) for tensor_file in files]
        if backbone is None and records and records[0] is not None:
            backbone = recorded_backbone(records[0])
        backbone = resolve_backbone(backbone, device, precision)
        templates = load_templates(data_options.templates_file)
        base_folder = scan_image_folder(data_dir, data_options.classnames_file)
        novel_folders = [scan_image_folder(folder) for folder in _as_list(novel_dir)]
        _check_held_out(base_folder, novel_folders)
        base = load_evalset(backbone, base_folder, "base", data_options)
        novel = [load_evalset(backbone, folder, name, data_options)
                 for folder, name in zip(novel_folders, _novel_names(novel_folders))]
        val_folders = _validation_folders(val_dir, val_novel, base_folder, data_options)
        warnings: list[str] = []
        kinds: dict[str, tuple[Kind, TensorFile]] = {}
        for tensor_file, record in zip(files, records):
            check_record_backbone(record, backbone, tensor_file.path)
            if record is not None:
                warnings += record.image_tower_warning(backbone.visual_fingerprint, backbone.spec.describe(),
                                                       tensor_file.path)
            reserved = {*kinds, "zero-shot", *BASELINES}  # a row name is a key of per_class and forgetting
            name = tensor_file.path.name if tensor_file.path.name not in reserved else str(tensor_file.path)
            model = load_kind(backbone, tensor_file, base.classnames, templates, kind=kind,
                              recorded_kind=record.kind if record else None,
                              recorded_options=record.kind_options if record else None, overrides=kind_options)
            check_class_list(record, base_folder, tensor_file.path, model, other_classes=other_classes)
            kinds[name] = (model, tensor_file)
    evaluation = Evaluation(base, novel)
    zero_shot_scale = _logit_scale(kind_options)
    zero_shot = ZeroShot(backbone, templates, zero_shot_scale)
    results = [evaluation.score("zero-shot", zero_shot, "zero-shot")]
    results += [evaluation.score(name, model) for name, (model, _) in kinds.items()]
    baseline_report = None
    if names:
        validation = _validation(backbone, val_folders, data_options)
        finetuned_name = next(iter(kinds))
        context = Baselines(kinds[finetuned_name][0], finetuned_name, zero_shot, evaluation, validation, seed,
                            wise_alpha)
        rows, baseline_report = run_baselines(context, names, named and not skip_inapplicable)
        baseline_report["validation"] = _describe_validation(val_folders)
        if val_folders and len(val_folders) == 1 and novel:
            warnings.append("the validation split has no held-out classes (--val-novel-data): the baselines' "
                            "settings were chosen on base accuracy alone, which favours the fine-tuned end")
        results += rows
    sources = {name: {"path": str(f.path), "sha256": f.sha256} for name, (_, f) in kinds.items()}
    return {
        "schema": EVAL_SCHEMA,
        "backbone": backbone.spec.as_dict(),
        "data": {"base": describe_folder(base_folder),
                 "novel": [describe_folder(folder) for folder in novel_folders] or None},
        "models": [_model_row(result, sources.get(result.name)) for result in results],
        "per_class": {result.name: result.per_class for result in results},
        "forgetting": forgetting(results),
        "baselines": baseline_report,
        "warnings": warnings,
        "versions": versions(),
    }


def _logit_scale(kind_options: KindChoices) -> float | None:
    """The temperature the caller chose for the models, which the zero-shot row shares; from flag-style
    overrides (any mapping) or from one kind's ``Options`` alike."""
    if isinstance(kind_options, Mapping):
        return kind_options.get("logit_scale")
    return getattr(kind_options, "logit_scale", None)


def _as_list(paths: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if paths is None:
        return []
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]


def _check_distinct_folders(base_dir: str | Path, novel_dirs: Sequence[Path], val_dir: str | Path | None = None,
                            val_novel_dirs: Sequence[Path] = ()) -> None:
    """A held-out folder that is the base folder (or another held-out one) would pass base accuracy off as
    novel accuracy, or weigh one set twice in the novel mean; a validation folder that is a test folder would
    let test labels choose the baselines' settings."""
    seen = {os.path.realpath(base_dir): "the base folder (--data)"}
    given = [(folder, "a held-out folder (--novel-data)", "a held-out folder given before") for folder in novel_dirs]
    if val_dir is not None:
        given.append((Path(val_dir), "a validation folder (--val-data)", "the validation folder (--val-data)"))
    given += [(folder, "a validation folder (--val-novel-data)", "a validation folder given before")
              for folder in val_novel_dirs]
    for folder, role, seen_as in given:
        resolved = os.path.realpath(folder)
        if resolved in seen:
            raise UsageError(f"{folder}: {role} that is {seen[resolved]} again")
        seen[resolved] = seen_as


def _validation_folders(val_dir: str | Path | None, val_novel: Sequence[Path], base_folder: ImageFolder,
                        data_options: DataOptions) -> list[ImageFolder]:
    """[validation base, validation held-out ...], scanned (cheap); the base one holds the test base classes."""
    if val_dir is None:
        return []
    folder = scan_image_folder(val_dir, data_options.classnames_file)
    if list(folder.folders) != list(base_folder.folders):
        raise DataError(f"{val_dir}: the validation folder (--val-data) has classes {_listed(folder.folders)} but "
                        f"--data has {_listed(base_folder.folders)}; it holds other images of the same classes")
    return [folder, *(scan_image_folder(path) for path in val_novel)]


def _validation(backbone: Backbone, folders: Sequence[ImageFolder], options: DataOptions) -> Evaluation | None:
    if not folders:
        return None
    base, *held_out = folders
    return Evaluation(load_evalset(backbone, base, "base", options),
                      [load_evalset(backbone, folder, name, options)
                       for folder, name in zip(held_out, _novel_names(held_out))])


def _describe_validation(folders: Sequence[ImageFolder]) -> dict[str, Any] | None:
    if not folders:
        return None
    return {"base": describe_folder(folders[0]), "novel": [describe_folder(folder) for folder in folders[1:]] or None}


def _listed(names: Sequence[str], most: int = 6) -> str:
    return f"[{', '.join(names[:most])}{', ...' if len(names) > most else ''}] ({len(names)})"


def _check_held_out(base: ImageFolder, held_out: Sequence[ImageFolder]) -> None:
    """A held-out set holds other classes than the base set (base-to-novel), or exactly its classes in other
    images (a domain shift, a corruption). One that shares some base classes, or is mostly base images, would score
    base accuracy as novel accuracy."""
    def prompts(folder: ImageFolder) -> dict[str, str]:  # CLIP's tokenizer ignores case and spacing
        return {" ".join(name.split()).lower(): name for name in folder.classnames}

    for folder in held_out:
        shared = [name for name in folder.folders if name in base.folders] or \
            [name for key, name in prompts(folder).items() if key in prompts(base)]
        if shared and set(folder.folders) != set(base.folders):
            raise UsageError(f"{folder.root}: a held-out folder (--novel-data) that shares class(es) "
                             f"{', '.join(shared[:5])} with --data {base.root}; held-out classes must be other "
                             "classes (a domain-shifted set has exactly the classes of --data)")
        if shared:  # mostly copies of --data's images; a few equal ones happen (a grayscale of a grey photo)
            hashes = folder.file_hashes()
            copies = sum(digest in set(base.file_hashes()) for digest in hashes)
            if copies * 2 > len(hashes):
                raise UsageError(f"{folder.root}: a held-out folder (--novel-data) whose images are mostly those of "
                                 f"--data {base.root} ({copies} of {len(hashes)}); held-out images must be other images")


def _novel_names(folders: Sequence[ImageFolder]) -> list[str]:
    """'novel' for one held-out set; 'novel:NAME' for several (unique)."""
    if len(folders) == 1:
        return ["novel"]
    names = []
    for index, folder in enumerate(folders):
        name = f"novel:{folder.root.name}"
        names.append(name if name not in names else f"{name}#{index}")
    return names


def _model_row(result: ModelResult, source: dict[str, str] | None) -> dict[str, Any]:
    row = {key: value for key, value in asdict(result).items() if key not in ("per_class", "_novel_eces")}
    return {**row, "source": source}


def describe_folder(folder: ImageFolder) -> dict[str, Any]:
    return {"path": str(folder.root), "classes": list(folder.classnames), "images": len(folder),
            "manifest_sha256": folder.manifest_sha256()}


__all__ = ["evaluate", "load_evalset", "describe_folder"]
