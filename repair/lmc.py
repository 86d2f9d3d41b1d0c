"""Linear mode connectivity: MergeTune's own diagnostic of a repair.

MergeTune pulls the repaired weights ``w_rep`` towards a point linearly connected at low
loss to both the fine-tuned ``w_ft`` and the zero-shot ``w_zs``. This module measures
exactly that: accuracy and loss along the three straight segments zero-shot -> fine-tuned,
zero-shot -> repaired and fine-tuned -> repaired on a labelled image folder, with each
segment's loss barrier (the standard LMC barrier: the largest rise above the chord). After a
good repair both segments that end at the repaired model are flat.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from repair.api import (
    DataOptions,
    KindOptions,
    _resolve_backbone,
    backbone_warnings,
    build_kind,
    check_same_backbone,
    encode_for,
    read_record,
    versions,
)
from repair.backbone import Backbone, BackboneSpec
from repair.checkpoints import TensorFile, atomic_output, read_tensors
from repair.data import Features, ImageFolder, extract_features, load_templates, scan_image_folder
from repair.errors import IncompatibleCheckpointError, MergetuneError
from repair.kinds import Kind, detect_kind

PATH_SCHEMA = "mergetune.path/1"
ZERO_SHOT, FINETUNED, REPAIRED = "zero-shot", "fine-tuned", "repaired"
SEGMENTS: tuple[tuple[str, str], ...] = ((ZERO_SHOT, FINETUNED), (ZERO_SHOT, REPAIRED), (FINETUNED, REPAIRED))
EVAL_BATCH = 4096  # the batch `evaluate` scores with, so the fine-tuned endpoint matches it exactly
SHOTS_SEED = 0  # only used when data_options.shots subsamples the folder

Values = dict[str, torch.Tensor]


@dataclass
class SegmentPoint:
    t: float
    accuracy: float  # percent
    loss: float  # mean cross-entropy


@dataclass
class Segment:
    name: str
    start: str
    end: str
    points: list[SegmentPoint]
    loss_barrier: float
    accuracy_drop: float  # best endpoint accuracy minus the lowest accuracy along the segment


# --------------------------------------------------------------------------- barrier


def loss_barrier(losses: Sequence[float], ts: Sequence[float]) -> float:
    """max_t [L(t) - chord(t)], clipped at 0; the chord joins the first and last points.

    With ``ts`` from 0 to 1 the chord is ``(1 - t) L(0) + t L(1)``: the usual LMC barrier.
    """
    if len(losses) != len(ts):
        raise ValueError(f"{len(losses)} losses for {len(ts)} values of t")
    if len(ts) < 2 or ts[-1] == ts[0]:
        raise ValueError("a barrier needs at least two distinct values of t")
    t0, t1, l0, l1 = ts[0], ts[-1], losses[0], losses[-1]
    rises = [loss - (l0 + (t - t0) / (t1 - t0) * (l1 - l0)) for loss, t in zip(losses, ts)]
    return max(0.0, float(max(rises)))


def accuracy_drop(accuracies: Sequence[float]) -> float:
    """How far accuracy falls inside the segment below its better endpoint."""
    return float(max(accuracies[0], accuracies[-1]) - min(accuracies))


def path_ts(points: int) -> list[float]:
    """``points`` evenly spaced values from 0 to 1; ``i / (n - 1)`` keeps 0.3 as 0.3, not 0.30000000000000004."""
    if points < 2:
        raise MergetuneError(f"a path needs at least 2 points, got {points}")
    return [index / (points - 1) for index in range(points)]


# --------------------------------------------------------------------------- validation


def _same_kind_class(ft_file: TensorFile, rep_file: TensorFile, override: str | None) -> None:
    """Cheap check (no model needed) that both files are one kind of checkpoint."""
    ft_kind, rep_kind = detect_kind(ft_file, override), detect_kind(rep_file, override)
    if ft_kind is not rep_kind:
        raise IncompatibleCheckpointError(
            f"{rep_file.path} is a {rep_kind.name} checkpoint but {ft_file.path} is {ft_kind.name}; "
            "a path needs two checkpoints of the same kind")


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
            "pass --logit-scale to use one for both")


def _zero_shot_point(ft_kind: Kind, rep_kind: Kind, finetuned: Path, repaired: Path) -> Values:
    """``w_zs``; both files must imply the same one (a CoOp prompt's ``ctx_init`` can differ)."""
    from_ft, from_rep = ft_kind.zero_shot_values(), rep_kind.zero_shot_values()
    if not all(torch.equal(from_ft[name], from_rep[name].to(from_ft[name])) for name in from_ft):
        raise IncompatibleCheckpointError(
            f"{finetuned} and {repaired} imply different zero-shot weights (e.g. another --ctx-init recorded "
            "in one of them); pass --ctx-init to use one for both")
    return {name: tensor.detach().clone() for name, tensor in from_ft.items()}


# --------------------------------------------------------------------------- scoring


def _interpolate(start: Values, end: Values, t: float) -> Values:
    return {name: (1.0 - t) * start[name] + t * end[name] for name in start}


@torch.no_grad()
def _score(kind: Kind, data: Features, classnames: Sequence[str]) -> tuple[float, float]:
    """Accuracy (%) and mean CE of the kind's current values, batched like ``evaluate``."""
    correct, total_loss = 0, 0.0
    for start in range(0, len(data), EVAL_BATCH):
        features = data.features[start:start + EVAL_BATCH]
        labels = data.labels[start:start + EVAL_BATCH]
        logits = kind.logits_for(features, classnames)
        correct += int((logits.argmax(dim=-1) == labels).sum())
        total_loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    count = max(len(data), 1)
    return 100.0 * correct / count, total_loss / count


def _feature_source(kind: Kind, backbone: Backbone, dataset: ImageFolder,
                    options: DataOptions) -> Callable[[], Features]:
    """Features for the kind's current values: encoded once when the image tower is frozen,
    re-encoded (uncached: every point is a new tower) when the checkpoint owns the tower."""
    if kind.image_encoder() is None:
        fixed = encode_for(kind, backbone, dataset, options)
        return lambda: fixed
    return lambda: extract_features(backbone, dataset, cache_dir=None, batch_size=options.batch_size,
                                    workers=options.workers, normalize=kind.input_kind != "raw-features",
                                    encoder=kind.image_encoder())


def _point_key(start: str, end: str, t: float) -> object:
    """Segments share endpoints: t=0 and t=1 are named by the endpoint, so each is scored once."""
    if t == 0.0:
        return start
    if t == 1.0:
        return end
    return (start, end, t)


def _walk_segments(kind: Kind, anchors: dict[str, Values], ts: Sequence[float], classnames: Sequence[str],
                   features: Callable[[], Features]) -> list[Segment]:
    memo: dict[object, tuple[float, float]] = {}
    segments = []
    for start, end in SEGMENTS:
        points = []
        for t in ts:
            key = _point_key(start, end, t)
            if key not in memo:
                values = anchors[key] if isinstance(key, str) else _interpolate(anchors[start], anchors[end], t)
                kind.load_values(values)
                memo[key] = _score(kind, features(), classnames)
            accuracy, loss = memo[key]
            points.append(SegmentPoint(t=t, accuracy=accuracy, loss=loss))
        segments.append(Segment(
            name=f"{start} -> {end}", start=start, end=end, points=points,
            loss_barrier=loss_barrier([p.loss for p in points], [p.t for p in points]),
            accuracy_drop=accuracy_drop([p.accuracy for p in points])))
    return segments


# --------------------------------------------------------------------------- report


def path_report(
    finetuned: str | Path,
    repaired: str | Path,
    data_dir: str | Path,
    *,
    backbone: Backbone | BackboneSpec | None = None,
    points: int = 11,
    data_options: DataOptions | None = None,
    kind_options: KindOptions = KindOptions(),
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
    _same_kind_class(ft_file, rep_file, kind_options.kind)
    dataset = scan_image_folder(data_dir, data_options.classnames_file)
    if data_options.shots is not None:
        dataset = dataset.few_shot(data_options.shots, SHOTS_SEED)
    templates = load_templates(data_options.templates_file)
    backbone = _resolve_backbone(backbone, device)
    warnings: list[str] = []
    for tensor_file in (ft_file, rep_file):
        check_same_backbone(read_record(tensor_file), backbone, tensor_file.path)
        warnings += backbone_warnings(read_record(tensor_file), backbone, tensor_file.path)
    ft_kind = build_kind(backbone, ft_file, dataset.classnames, templates, kind_options)
    rep_kind = build_kind(backbone, rep_file, dataset.classnames, templates, kind_options)
    _check_compatible(ft_kind, rep_kind, finetuned, repaired)
    anchors = {ZERO_SHOT: _zero_shot_point(ft_kind, rep_kind, finetuned, repaired),
               FINETUNED: ft_kind.snapshot(), REPAIRED: rep_kind.snapshot()}
    del rep_kind  # scoring uses one kind: the fine-tuned file's, with its values swapped per point
    features = _feature_source(ft_kind, backbone, dataset, data_options)
    segments = _walk_segments(ft_kind, anchors, ts, dataset.classnames, features)
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


__all__ = ["PATH_SCHEMA", "SegmentPoint", "Segment", "loss_barrier", "path_report", "plot_path", "write_path_json"]
