"""Linear mode connectivity, the measurement: scores along straight segments between weights.

MergeTune pulls the repaired weights ``w_rep`` towards a point linearly connected at low
loss to both the fine-tuned ``w_ft`` and the zero-shot ``w_zs``. This module measures
accuracy and loss along straight segments between named anchors, with each segment's loss
barrier (the standard LMC barrier: the largest rise above the chord). After a good repair
both segments that end at the repaired model are flat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from repair.data.features import Features
from repair.errors import UsageError
from repair.kinds import Kind

ZERO_SHOT, FINETUNED, REPAIRED = "zero-shot", "fine-tuned", "repaired"
SEGMENTS: tuple[tuple[str, str], ...] = ((ZERO_SHOT, FINETUNED), (ZERO_SHOT, REPAIRED), (FINETUNED, REPAIRED))
EVAL_BATCH = 4096  # the batch `evaluate` scores with, so the fine-tuned endpoint matches it exactly

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


MAX_POINTS = 1001  # each point scores every image once: a finer path shows nothing more


def path_ts(points: int) -> list[float]:
    """``points`` evenly spaced values from 0 to 1; ``i / (n - 1)`` keeps 0.3 as 0.3, not 0.30000000000000004."""
    if isinstance(points, bool) or not isinstance(points, int) or not 2 <= points <= MAX_POINTS:
        raise UsageError(f"a path needs at least 2 and at most {MAX_POINTS} points, got {points!r}")
    return [index / (points - 1) for index in range(points)]


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


def _point_key(start: str, end: str, t: float) -> object:
    """Segments share endpoints: t=0 and t=1 are named by the endpoint, so each is scored once."""
    if t == 0.0:
        return start
    if t == 1.0:
        return end
    return (start, end, t)


def walk_segments(kind: Kind, anchors: dict[str, Values], ts: Sequence[float], classnames: Sequence[str],
                   features: Callable[[], Features],
                   segments_to_walk: Sequence[tuple[str, str]] = SEGMENTS) -> list[Segment]:
    memo: dict[object, tuple[float, float]] = {}
    segments = []
    for start, end in segments_to_walk:
        points = []
        for t in ts:
            key = _point_key(start, end, t)
            if key not in memo:
                values = anchors[key] if isinstance(key, str) else kind.interpolate(anchors[start], anchors[end], t)
                kind.load_values(values)
                memo[key] = _score(kind, features(), classnames)
            accuracy, loss = memo[key]
            points.append(SegmentPoint(t=t, accuracy=accuracy, loss=loss))
        segments.append(Segment(
            name=f"{start} -> {end}", start=start, end=end, points=points,
            loss_barrier=loss_barrier([p.loss for p in points], [p.t for p in points]),
            accuracy_drop=accuracy_drop([p.accuracy for p in points])))
    return segments
