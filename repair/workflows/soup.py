"""``mergetune soup``: average checkpoints of one kind fine-tuned with different seeds (a model soup).

Uniform (Wortsman et al., 2022): the mean of every checkpoint's trainable tensors. Greedy, given a labelled
validation split: the checkpoints ranked by their own validation score (HM, or base accuracy without
held-out classes), the best one first; each next one stays in the soup only if the soup's score does not
drop. The output keeps the first checkpoint's format, tensor names and dtypes, and records its ingredients.
Checkpoints of different kinds, backbones, classes, shapes or options are refused before any averaging,
and so are kinds whose tensors are not the weights (LoRA's factors: the mean of two B A is not the B A of
the means).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repair.data.folders import ImageFolder, load_templates, scan_image_folder
from repair.errors import IncompatibleCheckpointError, UsageError
from repair.eval.metrics import Evaluation, selection_score
from repair.io import output_lock, read_tensors
from repair.kinds import Kind, plan_kind
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import DataInput, DataSettings, Inputs, Record
from repair.workflows.evaluate import describe_folder, load_evalset
from repair.workflows.inputs import (
    DataOptions,
    check_class_list,
    check_kind_output,
    check_outside_input_folders,
    check_output,
    check_record_backbone,
    read_record,
    recorded_backbone,
    resolve_backbone,
    side_inputs,
)
from repair.workflows.run import KindChoices, export

Values = dict[str, torch.Tensor]


@dataclass
class SoupOutcome:
    """What ``soup`` wrote: the output, its record, and the soup's own account (also in ``record.result``)."""

    path: Path
    record: Record
    report: dict[str, Any]


def average(values: Sequence[Values]) -> Values:
    """The element-wise mean, accumulated in float64 (on the CPU: MPS has none): the soup of identical
    checkpoints is that checkpoint."""
    return {name: torch.stack([item[name].detach().cpu().double() for item in values]).mean(dim=0)
            for name in values[0]}


def soup(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    novel_dir: str | Path | Sequence[str | Path] | None = None,
    backbone: Backbone | BackboneSpec | None = None,
    data_options: DataOptions | None = None,
    kind: str | None = None,
    kind_options: KindChoices = None,
    device: str = "cpu",
    precision: str = "fp32",
    force: bool = False,
) -> SoupOutcome:
    """Average ``checkpoints`` into ``out``: uniformly, or greedily on the validation folders ``data_dir``
    (the checkpoints' classes) and ``novel_dir`` (held-out classes). Without ``backbone`` the one the first
    checkpoint records is loaded; without ``data_dir`` the classes are the recorded ones."""
    paths, out = [Path(path) for path in checkpoints], Path(out)
    novel = [Path(novel_dir)] if isinstance(novel_dir, (str, Path)) else [Path(path) for path in novel_dir or ()]
    if len(paths) < 2:
        raise UsageError("a soup needs at least two checkpoints")
    if novel and data_dir is None:
        raise UsageError("--novel-data needs --data: the validation images of the checkpoints' classes")
    data_options = data_options or DataOptions(shots=None)
    files, folders = side_inputs(data_options, backbone)
    check_outside_input_folders(out, [*([Path(data_dir)] if data_dir is not None else []), *novel, *folders])
    if not out.is_dir():  # an existing folder may be a kind's folder output: checked once the kind is known
        check_output(out, [*paths, *files], force)
    with output_lock(out):
        sources = [read_tensors(path) for path in paths]
        records = [read_record(source) for source in sources]
        plans = [plan_kind(source, kind=kind, recorded_kind=record.kind if record else None,
                           recorded_options=record.kind_options if record else None, overrides=kind_options)
                 for source, record in zip(sources, records)]
        cls = _one_kind(paths, [plan[0] for plan in plans])
        check_kind_output(cls, out, sources[0], plans[0][1], force, [*paths, *files])
        _same_origin(paths, records)
        dataset = scan_image_folder(data_dir, data_options.classnames_file) if data_dir is not None else None
        held_out = [scan_image_folder(folder) for folder in novel]
        classnames, class_folders = _classes(paths[0], records[0], dataset)
        templates = (load_templates(data_options.templates_file) if data_options.templates_file is not None or
                     records[0] is None or not records[0].templates else list(records[0].templates))
        if backbone is None and records[0] is not None:
            backbone = recorded_backbone(records[0])
        backbone = resolve_backbone(backbone, device, precision)
        kinds = []
        for path, source, record, (_, options) in zip(paths, sources, records, plans):
            check_record_backbone(record, backbone, path)
            model = cls.from_file(backbone, source, classnames, templates, options)
            if dataset is not None:
                check_class_list(record, dataset, path, model)
            kinds.append(model)
        values = _same_shapes_and_options(paths, kinds)
        target = kinds[0]
        if dataset is None:
            kept, report = list(range(len(paths))), {"method": "uniform", "validation": None}
        else:
            evaluation = Evaluation(load_evalset(backbone, dataset, "base", data_options),
                                    [load_evalset(backbone, folder, f"novel:{index}", data_options)
                                     for index, folder in enumerate(held_out)])
            kept, report = _greedy(target, values, evaluation)
            report["validation"] = {"base": describe_folder(dataset),
                                    "novel": [describe_folder(folder) for folder in held_out] or None}
        report["ingredients"] = [{"name": path.name, "sha256": source.sha256, "kept": index in kept,
                                  **({"score": report["scores"][index]} if "scores" in report else {})}
                                 for index, (path, source) in enumerate(zip(paths, sources))]
        report.pop("scores", None)
        target.load_values(average([values[index] for index in kept]))
        record = _record(target, backbone, classnames, class_folders, templates, dataset, report)
        path = target.save(out, export(target, "input"), record.to_metadata(), force=force, inputs=paths)
        return SoupOutcome(path, record, report)


def _one_kind(paths: Sequence[Path], classes: Sequence[type[Kind]]) -> type[Kind]:
    for path, cls in zip(paths[1:], classes[1:]):
        if cls is not classes[0]:
            raise IncompatibleCheckpointError(f"{paths[0]} is a {classes[0].about.description} but {path} is a "
                                              f"{cls.about.description}: a soup averages checkpoints of one kind")
    if not classes[0].mergeable:
        raise IncompatibleCheckpointError(f"a {classes[0].about.description}'s tensors are not its weights: their "
                                          "mean is not the mean model, so it has no soup")
    return classes[0]


def _same_origin(paths: Sequence[Path], records: Sequence[Record | None]) -> None:
    """Recorded backbones and classes must agree; a file without a record beside one with cannot be checked."""
    first = records[0]
    for path, record in zip(paths[1:], records[1:]):
        if (record is None) != (first is None):
            with_record, without = (paths[0], path) if first is not None else (path, paths[0])
            raise IncompatibleCheckpointError(f"{without} has no mergetune record but {with_record} has: cannot "
                                              "check that they share a backbone and classes")
        if record is None or first is None:
            continue
        mine, theirs = first.backbone, record.backbone
        if (mine.model, mine.pretrained, mine.text_sha256, mine.visual_sha256) != (
                theirs.model, theirs.pretrained, theirs.text_sha256, theirs.visual_sha256):
            raise IncompatibleCheckpointError(f"{path} was made with another backbone ({theirs.model} / "
                                              f"{theirs.pretrained}) than {paths[0]} ({mine.model} / {mine.pretrained})")
        if list(record.class_folders) != list(first.class_folders):
            raise IncompatibleCheckpointError(f"{path} was made for other classes than {paths[0]} "
                                              f"({len(record.class_folders)} against {len(first.class_folders)})")


def _classes(path: Path, record: Record | None, dataset: ImageFolder | None) -> tuple[list[str], list[str]]:
    """(class names, class folders): the validation folder's, else the recorded ones."""
    if dataset is not None:
        return list(dataset.classnames), list(dataset.folders)
    if record is None:
        raise UsageError(f"{path} has no mergetune record naming its classes: pass --data (a validation split of "
                         "its classes; the soup is then greedy)")
    return list(record.classnames), list(record.class_folders)


def _same_shapes_and_options(paths: Sequence[Path], kinds: Sequence[Kind]) -> list[Values]:
    values = [model.snapshot() for model in kinds]
    for path, model, items in zip(paths[1:], kinds[1:], values[1:]):
        shapes = {name: list(value.shape) for name, value in items.items()}
        expected = {name: list(value.shape) for name, value in values[0].items()}
        if shapes != expected:
            differing = next((name for name in expected if shapes.get(name) != expected[name]), None)
            detail = (f"{differing} {shapes.get(differing)} against {expected[differing]}" if differing
                      else f"tensors {sorted(shapes)} against {sorted(expected)}")
            raise IncompatibleCheckpointError(f"{path} does not have {paths[0]}'s shapes ({detail})")
        if model.recorded_options() != kinds[0].recorded_options():
            raise IncompatibleCheckpointError(f"{path} was made with other options than {paths[0]} "
                                              f"({model.recorded_options()} against {kinds[0].recorded_options()})")
    return values


def _greedy(target: Kind, values: Sequence[Values], evaluation: Evaluation) -> tuple[list[int], dict[str, Any]]:
    """Greedy soup: ingredients by validation score, best first; each kept if the soup's score does not drop."""
    def score(members: Sequence[int]) -> float:
        target.load_values(average([values[index] for index in members]))
        label = f"soup {list(members)}"
        result = evaluation.score(label, target)
        evaluation.discard(label)
        return selection_score(result)

    scores = [score([index]) for index in range(len(values))]
    ranked = sorted(range(len(values)), key=lambda index: -scores[index])  # stable: ties keep the given order
    kept, best = [ranked[0]], scores[ranked[0]]
    for index in ranked[1:]:
        candidate = score([*kept, index])
        if candidate >= best:
            kept, best = [*kept, index], candidate
    return sorted(kept), {"method": "greedy", "scores": scores, "validation_score": best}


def _record(target: Kind, backbone: Backbone, classnames: list[str], class_folders: list[str],
            templates: list[str], dataset: ImageFolder | None, report: dict[str, Any]) -> Record:
    data = (DataInput(path=str(dataset.root), images=len(dataset), manifest_sha256=dataset.manifest_sha256())
            if dataset is not None else None)
    return Record(
        stage="soup", kind=target.name, kind_options=target.recorded_options(), kind_details=target.describe(),
        trainable_numbers=target.num_trainable(), backbone=backbone.identity(), logit_scale=target.scale,
        class_folders=class_folders, classnames=classnames, templates=templates, objective={}, train={},
        seed=None, data=DataSettings(shots=None), inputs=Inputs(checkpoint=None, data=data),
        result={"soup": report})


__all__ = ["soup", "average", "SoupOutcome"]
