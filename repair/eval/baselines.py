"""The baselines every forgetting report carries: WiSE-FT and the output ensemble.

WiSE-FT interpolates the trainable tensors ``(1 - a) w_zs + a w_ft``; the ensemble averages
the zero-shot and fine-tuned class probabilities. Both cost nothing to train, so a repair
that does not beat them is not worth its training run.
"""

from __future__ import annotations

from typing import Any

from repair.errors import IncompatibleCheckpointError
from repair.eval.metrics import Evaluation, ModelResult, selection_score
from repair.kinds import Kind

WISE_ALPHAS = tuple(step / 10 for step in range(11))


def ensemble(evaluation: Evaluation, finetuned: str) -> ModelResult:
    return evaluation.ensemble(f"ensemble (zero-shot + {finetuned})", "zero-shot", finetuned)


def wise_ft(evaluation: Evaluation, kind: Kind, alpha: float | None = None) -> tuple[ModelResult, dict[str, Any]]:
    """The WiSE-FT row (best alpha by HM over 0, 0.1, ..., 1, or the given one) and its curve.

    Raises IncompatibleCheckpointError for a kind without zero-shot values.
    """
    zero_shot = kind.zero_shot_values()
    tuned = kind.snapshot()
    curve = []
    try:
        for value in [alpha] if alpha is not None else WISE_ALPHAS:
            kind.load_values(kind.interpolate(zero_shot, tuned, value))  # (1 - a) w_zs + a w_ft
            curve.append((value, evaluation.score(f"wise-ft a={value:.1f}", kind, "baseline")))
    finally:
        kind.load_values(tuned)
    best_alpha, best = max(curve, key=lambda item: selection_score(item[1]))
    best.name = f"wise-ft (a={best_alpha:.2f}, given)" if alpha is not None else f"wise-ft (best a={best_alpha:.1f})"
    best.chosen_on_test = alpha is None
    report = {
        "best_alpha": best_alpha,
        "selection": ("the caller (--wise-alpha, e.g. from a validation split)" if alpha is not None else
                      "highest HM (base accuracy without novel data) on the evaluated data: optimistic"),
        "curve": [{"alpha": value, "base": r.base, "novel": r.novel, "hm": r.hm} for value, r in curve],
    }
    return best, report


def baselines(evaluation: Evaluation, finetuned: str, kind: Kind, wise_alpha: float | None = None,
              ) -> tuple[list[ModelResult], dict[str, Any]]:
    """WiSE-FT (where the kind has zero-shot values) and the zero-shot + fine-tuned ensemble."""
    rows = [ensemble(evaluation, finetuned)]
    report: dict[str, Any] = {"finetuned": finetuned, "ensemble": rows[0].name, "wise_ft": None}
    try:
        row, report["wise_ft"] = wise_ft(evaluation, kind, wise_alpha)
    except IncompatibleCheckpointError as exc:
        report["wise_ft_unavailable"] = str(exc)
        return rows, report
    return [row, *rows], report


def best_wise_alpha(report: dict[str, Any]) -> float:
    """The WiSE-FT alpha an ``evaluate(..., baselines=True)`` report chose, to reuse on other data."""
    wise = (report.get("baselines") or {}).get("wise_ft")
    if not wise:
        raise IncompatibleCheckpointError("this report has no WiSE-FT curve (a kind without zero-shot values?)")
    return float(wise["best_alpha"])
