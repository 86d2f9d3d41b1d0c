"""``mergetune path``: MergeTune's own diagnostic of a repair, as a workflow.

Accuracy and loss along the three straight segments zero-shot -> fine-tuned, zero-shot ->
repaired and fine-tuned -> repaired on a labelled image folder (the measurement itself is
:mod:`repair.eval.path`), written as JSON and optionally plotted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from repair.data.features import Features, extract_features
from repair.data.folders import ImageFolder, load_templates, scan_image_folder
from repair.errors import IncompatibleCheckpointError, MergetuneError, ProvenanceError, UsageError
from repair.eval.path import FINETUNED, REPAIRED, SEGMENTS, ZERO_SHOT, Values, path_ts, walk_segments
from repair.io import TensorFile, atomic_output, read_tensors
from repair.kinds import Kind, detect_kind, load_kind
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import Record, versions
from repair.train.fields import checked
from repair.workflows import inputs
from repair.workflows.inputs import DataOptions
from repair.workflows.run import KindChoices

PATH_SCHEMA = "mergetune.path/1"
SHOTS_SEED = 0  # only used when data_options.shots subsamples the folder


# --------------------------------------------------------------------------- validation


def _same_kind_class(ft_file: TensorFile, rep_file: TensorFile, override: str | None,
                     records: Sequence[Record | None]) -> None:
    """Cheap check (no model needed) that both files are one kind of checkpoint."""
    ft_kind, rep_kind = (detect_kind(tensor_file, override, record.kind if record else None)
                         for tensor_file, record in zip((ft_file, rep_file), records))
    if ft_kind is not rep_kind:
        raise IncompatibleCheckpointError(
            f"{rep_file.path} is a {rep_kind.name} checkpoint but {ft_file.path} is {ft_kind.name}; "
            "a path needs two checkpoints of the same kind")


def _check_repaired_from(ft_file: TensorFile, rep_file: TensorFile, record: Record | None) -> list[str]:
    """REPAIRED must be a repair of FT: the segment fine-tuned -> repaired between unrelated files measures
    nothing. A record that names another input is refused; a file that names none is said loudly."""
    source = record.inputs.checkpoint if record is not None else None
    if source is not None and source.sha256 != ft_file.sha256:
        raise ProvenanceError(f"{rep_file.path} was repaired from {source.name} (sha256 {source.sha256[:12]}), not "
                              f"from {ft_file.path}; give the fine-tuned checkpoint it was repaired from")
    if source is not None:
        return []
    why = ("it was fine-tuned from zero-shot, not repaired" if record is not None and record.stage == "finetune"
           else "it records no input checkpoint")
    return [f"{rep_file.path.name} may not be a repair of {ft_file.path.name} ({why}): the segments to it "
            "measure whatever it is"]


def _describe_shapes(values: Values) -> str:
    return ", ".join(f"{name} {list(tensor.shape)}" for name, tensor in values.items())


def _check_compatible(ft_kind: Kind, rep_kind: Kind, finetuned: Path, repaired: Path) -> None:
    """Interpolating makes sense only between the same tensors scored the same way."""
    ft_values, rep_values = ft_kind.snapshot(), rep_kind.snapshot()
    same_shapes = ft_values.keys() == rep_values.keys() and all(
        ft_values[name].shape == rep_values[name].shape for name in ft_values)
    if not same_shapes:
        raise IncompatibleCheckpointError(
            f"{repaired} has trainable tensors {_describe_shapes(rep_values)} but {finetuned} has "
            f"{_describe_shapes(ft_values)}; a path needs the same shapes at both ends")
    if ft_kind.input_kind != rep_kind.input_kind:
        raise IncompatibleCheckpointError(
            f"{finetuned} scores {ft_kind.input_kind} but {repaired} scores {rep_kind.input_kind}; "
            "pass the same --head-features for both")
    ft_scale, rep_scale = getattr(ft_kind, "scale", None), getattr(rep_kind, "scale", None)
    if ft_scale is not None and rep_scale is not None and not math.isclose(ft_scale, rep_scale, rel_tol=1e-6):
        raise IncompatibleCheckpointError(
            f"{finetuned} scores with logit scale {ft_scale:g} but {repaired} with {rep_scale:g}; "
            "pass --logit-scale to use one for both (only where neither file records its own)")


def _zero_shot_point(ft_kind: Kind, rep_kind: Kind, finetuned: Path, repaired: Path) -> Values:
    """``w_zs``; both files must imply the same one (a CoOp prompt's ``ctx_init`` can differ)."""
    from_ft, from_rep = ft_kind.zero_shot_values(), rep_kind.zero_shot_values()
    if not ft_kind.same_weights(from_ft, from_rep):
        raise IncompatibleCheckpointError(
            f"{finetuned} and {repaired} imply different zero-shot weights (e.g. another --ctx-init recorded "
            "in one of them); pass --ctx-init to use one for both (only where neither file records its own)")
    return {name: tensor.detach().clone() for name, tensor in from_ft.items()}


# --------------------------------------------------------------------------- scoring


def _feature_source(kind: Kind, backbone: Backbone, dataset: ImageFolder,
                    options: DataOptions) -> Callable[[], Features]:
    """Features for the kind's current values: encoded once when the image tower is frozen,
    re-encoded (uncached: every point is a new tower) when the checkpoint owns the tower."""
    if kind.image_encoder() is None:
        fixed = inputs.encode_for(kind, backbone, dataset, options)
        return lambda: fixed
    return lambda: extract_features(backbone, dataset, cache_dir=None, batch_size=options.batch_size,
                                    workers=options.workers, normalize=kind.input_kind != "raw-features",
                                    encoder=kind.image_encoder())


# --------------------------------------------------------------------------- report


@checked
def path_report(
    finetuned: str | Path,
    repaired: str | Path,
    data_dir: str | Path,
    *,
    backbone: Backbone | BackboneSpec | None = None,
    points: int = 11,
    data_options: DataOptions | None = None,
    kind: str | None = None,
    kind_options: KindChoices = None,
    other_classes: bool = False,
    device: str = "cpu",
) -> dict[str, object]:
    """Accuracy and loss along zs -> ft, zs -> rep and ft -> rep, as a JSON-ready dict.

    ``data_options`` defaults to every image of the folder (``DataOptions(shots=None)``) with
    the default feature cache, resolved at call time so ``$MERGETUNE_CACHE`` is honoured.
    """
    finetuned, repaired = Path(finetuned), Path(repaired)
    data_options = data_options or DataOptions(shots=None)
    ts = path_ts(points)
    # everything cheap first: files, kinds, data, templates; then the model
    ft_file, rep_file = read_tensors(finetuned), read_tensors(repaired)
    if ft_file.sha256 == rep_file.sha256:  # the same file given twice, or a copy: every segment would be flat
        raise UsageError(f"{repaired}: the same bytes as {finetuned}; give the fine-tuned checkpoint and its repair")
    records = [inputs.read_record(ft_file), inputs.read_record(rep_file)]
    warnings = _check_repaired_from(ft_file, rep_file, records[1])
    _same_kind_class(ft_file, rep_file, kind, records)
    dataset = scan_image_folder(data_dir, data_options.classnames_file)
    if data_options.shots is not None:
        dataset = dataset.few_shot(data_options.shots, SHOTS_SEED)
    templates = load_templates(data_options.templates_file)
    backbone = inputs.resolve_backbone(backbone, device)
    for tensor_file, record in zip((ft_file, rep_file), records):
        inputs.check_record_backbone(record, backbone, tensor_file.path)
        if record is not None:
            warnings += record.image_tower_warning(backbone.visual_fingerprint, backbone.spec.describe(),
                                                   tensor_file.path)
    ft_kind, rep_kind = (
        load_kind(backbone, tensor_file, dataset.classnames, templates, kind=kind,
                  recorded_kind=record.kind if record else None,
                  recorded_options=record.kind_options if record else None, overrides=kind_options)
        for tensor_file, record in zip((ft_file, rep_file), records))
    for model, tensor_file, record in ((ft_kind, ft_file, records[0]), (rep_kind, rep_file, records[1])):
        inputs.check_class_list(record, dataset, tensor_file.path, model, other_classes=other_classes)
    _check_compatible(ft_kind, rep_kind, finetuned, repaired)
    anchors = {FINETUNED: ft_kind.snapshot(), REPAIRED: rep_kind.snapshot()}
    walked = SEGMENTS
    if ft_kind.zero_shot_model() is None:
        anchors[ZERO_SHOT] = _zero_shot_point(ft_kind, rep_kind, finetuned, repaired)
    else:  # no zero-shot point in its tensors (MaPLe's image prompts): no segment can start there
        walked = ((FINETUNED, REPAIRED),)
        warnings.append(f"this {ft_kind.about.description} has no zero-shot point in its tensors; only the "
                        f"{FINETUNED} -> {REPAIRED} segment is measured")
    del rep_kind  # scoring uses one kind: the fine-tuned file's, with its values swapped per point
    features = _feature_source(ft_kind, backbone, dataset, data_options)
    segments = walk_segments(ft_kind, anchors, ts, dataset.classnames, features, walked)
    return {
        "schema": PATH_SCHEMA,
        "backbone": backbone.spec.as_dict(),
        "data": {"path": str(dataset.root), "images": len(dataset), "classes": list(dataset.classnames),
                 "shots": data_options.shots, "manifest_sha256": dataset.manifest_sha256()},
        "kind": ft_kind.name,
        "kind_details": ft_kind.describe(),
        "checkpoints": {FINETUNED: {"path": str(finetuned), "sha256": ft_file.sha256},
                        REPAIRED: {"path": str(repaired), "sha256": rep_file.sha256}},
        "points": points,
        "segments": [asdict(segment) for segment in segments],
        "warnings": warnings,
        "versions": versions(),
    }


@checked
def path_outputs(finetuned: str | Path, repaired: str | Path, data_dir: str | Path, out: str | Path, *,
                 png: str | Path | None = None, force: bool = False, **options: object) -> dict[str, object]:
    """``mergetune path``: both outputs checked before any work, the report written, the plot drawn."""
    if png is not None and os.path.realpath(png) == os.path.realpath(out):
        raise UsageError(f"{png}: --png and --out name the same file; the plot would replace the report")
    files, folders = inputs.side_inputs(options.get("data_options"), options.get("backbone"))
    for target in (out, png):
        if target is not None:
            inputs.check_outside_input_folders(Path(target), [Path(data_dir), *folders])
            inputs.check_output(Path(target), [Path(finetuned), Path(repaired), *files], force)
    report = path_report(finetuned, repaired, data_dir, **options)
    write_path_json(report, out, force=force)
    if png is not None:
        plot_path(report, png, force=force)
    return report


def write_path_json(report: dict[str, object], path: str | Path, *, force: bool = False) -> Path:
    """The report as indented JSON, written atomically (never over a file without ``force``)."""
    target = Path(path)
    text = json.dumps(report, indent=2) + "\n"
    with atomic_output(target, force=force) as temp:
        temp.write_text(text, encoding="utf-8")
    return target


# --------------------------------------------------------------------------- plot


def _figure_class():
    """matplotlib's Figure with the Agg canvas; no pyplot, so no global backend is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MergetuneError("plotting needs matplotlib: pip install 'mergetune[plot]'") from None
    return Figure, FigureCanvasAgg


def _draw(figure, report: dict[str, object]) -> None:
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for segment in report["segments"]:
        ts = [point["t"] for point in segment["points"]]
        label = f"{segment['name']} (barrier {segment['loss_barrier']:.3g})"
        accuracy_axes.plot(ts, [point["accuracy"] for point in segment["points"]], marker="o", label=segment["name"])
        loss_axes.plot(ts, [point["loss"] for point in segment["points"]], marker="o", label=label)
    for axes, ylabel in ((accuracy_axes, "accuracy (%)"), (loss_axes, "loss (mean cross-entropy)")):
        axes.set_xlabel("t")
        axes.set_ylabel(ylabel)
        axes.set_xlim(0.0, 1.0)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    data = report.get("data") or {}
    figure.suptitle(f"{report.get('kind', '?')}: linear paths on {data.get('images', '?')} images")


def plot_path(report: dict[str, object], png: str | Path, *, force: bool = False) -> Path:
    """Two panels (accuracy, loss) against t, one line per segment; written atomically."""
    figure_class, canvas_class = _figure_class()
    target = Path(png)
    figure = figure_class(figsize=(11, 4.5), layout="constrained")
    canvas_class(figure)
    _draw(figure, report)
    with atomic_output(target, force=force) as temp:
        figure.savefig(temp, format="png", dpi=120)
    return target


__all__ = ["PATH_SCHEMA", "path_outputs", "path_report", "plot_path", "write_path_json"]
