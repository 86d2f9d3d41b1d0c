"""``lam_zs = "auto"``: the zero-shot weight chosen on the repair shots alone, no test labels.

A quarter of each class's shots is held out (seeded). For every ``lam_zs`` of :data:`AUTO_GRID` the
checkpoint is repaired from ``w_ft`` on the rest with the same schedule; a value is *eligible* when its
held-out accuracy stays within :data:`AUTO_TOLERANCE` (1 point) of the reference: the ``lam_zs = 0`` repair
(path term only) of the same part, so that the only difference measured is the zero-shot term's. The
fine-tuned model itself is no fair reference when the repair shots are its own training shots: it has
memorised the held-out quarter (100 % on it) and no repair from 3/4 of the shots keeps that (the
fine-tuned model's accuracy is the reference only for a grid without 0). Among the
eligible ones the repair whose predictions over the reference vocabulary agree most with the zero-shot
model's wins (label-free generality; the strongest constraint usually agrees most, and where a stronger
``lam_zs`` agrees less it is not a stronger constraint in function space); ties go to the larger ``lam_zs``.
``lam_zs = 0`` is eligible by definition, so there is always a choice. A value whose repair diverges
(the loss turns inf or NaN: too strong a pull at this learning rate) is recorded as diverged and is
not eligible; the others still count. The whole curve is recorded in the output's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from repair.data.features import Features
from repair.errors import NumericalError, UsageError
from repair.kinds.base import Kind
from repair.train.curvature import AtZeroShot, reference_vocabulary, scores_vocabulary, vocabulary_logits
from repair.train.loop import TrainConfig, accuracy, train
from repair.train.objective import Objective
from repair.train.surrogates import Surrogate

AUTO_GRID = (0.0, 1.0, 3.0, 10.0, 30.0)  # five repairs on 3/4 of the shots, then the real one
AUTO_HELD_OUT = 0.25  # the fraction of each class's shots held out
AUTO_TOLERANCE = 0.01  # base accuracy may drop at most 1 point below the fine-tuned model's


def split_shots(data: Features, seed: int, fraction: float = AUTO_HELD_OUT) -> tuple[Features, Features]:
    """(fit part, held-out part): ``fraction`` of each class's images (at least one) held out, seeded."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    labels = data.labels.cpu()
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().squeeze(1)
        if len(rows) < 2:
            raise UsageError("lam_zs auto holds out part of every class's shots and needs at least 2 per class; "
                             f"class {label} has {len(rows)} (give --lam-zs a number instead)")
        count = max(1, round(fraction * len(rows)))
        held.append(rows[torch.randperm(len(rows), generator=generator)[:count]])
    held_rows = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_rows] = False
    fit_rows = keep.nonzero().squeeze(1)

    def part(rows: torch.Tensor) -> Features:
        rows = rows.to(data.features.device)
        return replace(data, features=data.features[rows], labels=data.labels[rows])

    return part(fit_rows), part(held_rows)


@torch.no_grad()
def _predictions(kind: Kind, images: torch.Tensor, vocabulary: Sequence[str] | None) -> torch.Tensor:
    return torch.cat([vocabulary_logits(kind, images[start:start + 256], vocabulary).argmax(-1)
                      for start in range(0, len(images), 256)])


def choose_lam_zs(kind: Kind, objective: Objective, train_set: Features, config: TrainConfig,
                  surrogate: Surrogate | None, *, vocabulary: Sequence[str] | None = None,
                  grid: Sequence[float] = AUTO_GRID) -> tuple[float, dict[str, object]]:
    """The chosen ``lam_zs`` and the curve behind it; ``kind`` is left at the values it came with (``w_ft``).

    ``vocabulary``: the generic concepts of the reference vocabulary (None: the packaged names); a kind that
    scores only its own classes is compared on those.
    """
    fit_part, held = split_shots(train_set, config.seed)
    names = reference_vocabulary(kind.classnames, vocabulary) if scores_vocabulary(kind) else None
    start = kind.snapshot()
    with kind.zero_shot_model() or AtZeroShot(kind):
        zero_shot = _predictions(kind, held.features, names)
    finetuned = accuracy(kind, held)
    curve = []
    try:
        for lam in grid:
            kind.load_values(start)
            try:
                train(kind, replace(objective, lam_zs=float(lam)), fit_part, config, surrogate=surrogate)
            except NumericalError as error:
                curve.append({"lam_zs": float(lam), "diverged": str(error)})
                continue
            agreement = float((_predictions(kind, held.features, names) == zero_shot).float().mean())
            curve.append({"lam_zs": float(lam), "base_accuracy": accuracy(kind, held),
                          "zero_shot_agreement": agreement})
    finally:
        kind.load_values(start)
    measured = [point for point in curve if "diverged" not in point]
    unconstrained = next((point for point in measured if point["lam_zs"] == 0.0), None)
    reference = unconstrained["base_accuracy"] if unconstrained is not None else finetuned
    eligible = [point for point in measured if point["base_accuracy"] >= reference - AUTO_TOLERANCE - 1e-9]
    best = max(eligible, key=lambda point: (point["zero_shot_agreement"], point["lam_zs"]), default=None)
    chosen = float(best["lam_zs"]) if best is not None else 0.0
    return chosen, {"chosen": chosen, "grid": [float(lam) for lam in grid], "curve": curve,
                    "reference_base_accuracy": reference,
                    "reference": "lam_zs 0 repair" if unconstrained is not None else "fine-tuned",
                    "finetuned_base_accuracy": finetuned, "tolerance": AUTO_TOLERANCE,
                    "held_out_images": len(held), "fit_images": len(fit_part),
                    "agreement_classes": len(names) if names is not None else len(kind.classnames)}
