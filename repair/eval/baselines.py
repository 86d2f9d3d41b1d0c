"""What a user would try before a repair, scored next to it: one small function per baseline.

Weight-space baselines move the trainable tensors along the task vector ``tau = w_ft - w_zs`` and
need the kind's zero-shot values:

- ``wise-ft``: WiSE-FT, ``w_zs + a tau`` with ``a`` in [0, 1];
- ``task-arithmetic``: the same line with ``a`` up to 2 (past the fine-tuned model);
- ``ties``: TIES-Merging of the one task vector (trim to the top-k % magnitudes, elect signs,
  disjoint mean), then scaled;
- ``dare``: DARE (drop each entry with probability ``p``, rescale by ``1 / (1 - p)``), then scaled;
  the drop is seeded;
- ``entropy-alpha``: the WiSE-FT ``a`` whose predictions on the unlabelled evaluation images have the
  least mean entropy (AdaMerging's criterion, one scalar).

Output-space baselines mix the zero-shot and fine-tuned class probabilities: ``ensemble`` (1/2 each)
and ``weighted-ensemble`` (``(1 - w) p_zs + w p_ft``).

Every row says how its setting was chosen (``chosen_by``): on the caller's labelled **validation
split** (best HM, or base accuracy without held-out classes; ties go to the first setting of the grid),
**label-free** on the evaluation images, **fixed** (a published default, used without a validation
split), or **given** by the caller. Test labels never choose a setting. A baseline with neither a
validation split nor a fixed default is skipped, and the report says why.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from repair.errors import IncompatibleCheckpointError, UsageError
from repair.eval.metrics import Evaluation, ModelResult, Scorer, predict, selection_score
from repair.kinds import Kind

VALIDATION, LABEL_FREE, FIXED, GIVEN = "validation split", "label-free", "fixed", "given"

WISE_ALPHAS = tuple(step / 10 for step in range(11))
TASK_SCALES = tuple(step / 10 for step in range(21))  # 0 .. 2: past the fine-tuned model too
TIES_KEEP = (0.1, 0.2, 0.5)  # fraction of the task vector's largest magnitudes kept
DARE_DROP = (0.3, 0.5, 0.7, 0.9)  # probability of dropping each entry
MERGE_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # the trimmed / dropped vector's scale
ENSEMBLE_WEIGHTS = WISE_ALPHAS

Values = dict[str, torch.Tensor]
Settings = dict[str, float]


# ----------------------------------------------------------------------------- the tensor maths


def task_vector(zero_shot: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> Values:
    """``tau = w_ft - w_zs``, tensor by tensor."""
    return {name: finetuned[name] - zero_shot[name] for name in zero_shot}


def add_scaled(zero_shot: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], scale: float) -> Values:
    """``w_zs + scale * vector``."""
    return {name: zero_shot[name] + scale * vector[name] for name in zero_shot}


def trim(vector: Mapping[str, torch.Tensor], keep: float) -> Values:
    """TIES' trim: keep the ``keep`` fraction (at least one) of largest magnitudes over the whole vector, zero
    the rest; entries tied with the smallest kept magnitude are kept too."""
    magnitudes = torch.cat([value.detach().flatten().abs().float().cpu() for value in vector.values()])
    count = min(max(1, round(keep * magnitudes.numel())), magnitudes.numel())
    threshold = magnitudes.topk(count).values.min()
    return {name: torch.where(value.abs() >= threshold.to(value), value, torch.zeros_like(value))
            for name, value in vector.items()}


def ties(vectors: Sequence[Mapping[str, torch.Tensor]], keep: float) -> Values:
    """TIES-Merging (Yadav et al., 2023): trim each task vector, elect each entry's sign as the sign of the
    trimmed vectors' sum, and average the entries that agree with it (zero where none does)."""
    trimmed = [trim(vector, keep) for vector in vectors]
    merged = {}
    for name in trimmed[0]:
        stack = torch.stack([vector[name] for vector in trimmed])
        sign = torch.sign(stack.sum(dim=0))
        agrees = (torch.sign(stack) == sign) & (stack != 0)
        count = agrees.sum(dim=0)
        total = torch.where(agrees, stack, torch.zeros_like(stack)).sum(dim=0)
        merged[name] = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged


def dare(vector: Mapping[str, torch.Tensor], drop: float, seed: int) -> Values:
    """DARE (Yu et al., 2024): drop each entry with probability ``drop``, rescale the rest by ``1 / (1 - drop)``.

    The draws come from a generator seeded with ``seed``, tensor by tensor in name order, one uniform number
    per entry (dropped where it is below ``drop``): a larger ``drop`` drops a superset of the entries.
    """
    if not 0.0 <= drop < 1.0:
        raise UsageError(f"DARE's drop rate must lie in [0, 1), got {drop}")
    generator = torch.Generator().manual_seed(seed)
    dropped = {}
    for name in sorted(vector):
        value = vector[name]
        kept = torch.rand(value.shape, generator=generator) >= drop
        dropped[name] = torch.where(kept.to(value.device), value / (1.0 - drop), torch.zeros_like(value))
    return {name: dropped[name] for name in vector}


def mean_entropy(probs: torch.Tensor) -> float:
    """The mean over images of the predictive entropy (nats) of ``probs [N, C]``."""
    return float(torch.special.entr(probs.double()).sum(dim=-1).mean())


# ----------------------------------------------------------------------------- the context and the choice


class NeedsValidation(Exception):
    """A baseline with no fixed default and no validation split to choose its setting on."""


@dataclass
class Baselines:
    """What every baseline reads: the fine-tuned checkpoint, the test and (optional) validation evaluations."""

    kind: Kind  # the fine-tuned checkpoint, at w_ft (left there)
    finetuned: str  # its row name in the evaluations
    zero_shot: Scorer
    test: Evaluation  # already holds the "zero-shot" and fine-tuned predictions
    validation: Evaluation | None = None
    seed: int = 0
    wise_alpha: float | None = None  # the caller's WiSE-FT alpha
    _scored_validation: bool = field(default=False, repr=False)

    def endpoints(self) -> tuple[Values, Values]:
        """``(w_zs, w_ft)``; raises IncompatibleCheckpointError for a kind without zero-shot values."""
        return self.kind.zero_shot_values(), self.kind.snapshot()

    def task_vector(self) -> tuple[Values, Values]:
        """``(w_zs, tau)`` for the element-wise merges; refused where the tensors are not the weights."""
        if not self.kind.mergeable:
            raise IncompatibleCheckpointError(
                f"a {self.kind.about.description}'s tensors are not its weights: an element-wise merge of them is "
                "not a merge of the models")
        zero_shot, tuned = self.endpoints()
        return zero_shot, task_vector(zero_shot, tuned)

    @contextmanager
    def at(self, values: Mapping[str, torch.Tensor]) -> Iterator[Kind]:
        """The checkpoint with ``values`` loaded, back at ``w_ft`` after."""
        tuned = self.kind.snapshot()
        try:
            self.kind.load_values(values)
            yield self.kind
        finally:
            self.kind.load_values(tuned)

    def score_values(self, evaluation: Evaluation, name: str, values: Mapping[str, torch.Tensor]) -> ModelResult:
        with self.at(values) as kind:
            return evaluation.score(name, kind, "baseline")

    def endpoints_on(self, evaluation: Evaluation) -> None:
        """The zero-shot and fine-tuned predictions an output ensemble mixes (the test ones exist already)."""
        if evaluation is self.validation and not self._scored_validation:
            evaluation.score("zero-shot", self.zero_shot, "zero-shot")
            evaluation.score(self.finetuned, self.kind)
            self._scored_validation = True


ScoreSetting = Callable[[Evaluation, str, Settings], ModelResult]  # (where, row name, setting)


def choose(context: Baselines, name: str, grid: Sequence[Settings], score: ScoreSetting,
           fixed: Settings | None = None) -> tuple[ModelResult, dict[str, Any]]:
    """The row of the setting chosen on the validation split (else ``fixed``), scored on the test data."""
    curve: list[dict[str, Any]] = []
    if context.validation is not None:
        best: tuple[float, Settings] | None = None
        for settings in grid:
            label = f"{name} {settings}"
            result = score(context.validation, label, settings)
            context.validation.discard(label)
            curve.append({**settings, "base": result.base, "novel": result.novel, "hm": result.hm,
                          "novel_sets": dict(result.novel_sets)})
            if best is None or selection_score(result) > best[0]:  # ties: the first setting of the grid
                best = (selection_score(result), settings)
        assert best is not None
        chosen, chosen_by = best[1], VALIDATION
    elif fixed is not None:
        chosen, chosen_by = fixed, FIXED
    else:
        raise NeedsValidation(f"{name} chooses its setting on a validation split: give --val-data")
    return row(context, name, score(context.test, name, chosen), chosen, chosen_by, curve)


def row(context: Baselines, name: str, result: ModelResult, settings: Settings, chosen_by: str,
        curve: list[dict[str, Any]]) -> tuple[ModelResult, dict[str, Any]]:
    result.name, result.role, result.chosen_by, result.settings = name, "baseline", chosen_by, dict(settings)
    return result, {"chosen_by": chosen_by, "settings": dict(settings), "curve": curve}


# ----------------------------------------------------------------------------- the baselines


def wise_ft(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """WiSE-FT (Wortsman et al., 2022): ``(1 - a) w_zs + a w_ft``; fixed a = 0.5, the paper's default."""
    zero_shot, tuned = context.endpoints()

    def score(evaluation: Evaluation, label: str, settings: Settings) -> ModelResult:
        return context.score_values(evaluation, label, context.kind.interpolate(zero_shot, tuned, settings["alpha"]))

    if context.wise_alpha is not None:
        settings = {"alpha": context.wise_alpha}
        return row(context, "wise-ft", score(context.test, "wise-ft", settings), settings, GIVEN, [])
    return choose(context, "wise-ft", [{"alpha": alpha} for alpha in WISE_ALPHAS], score, fixed={"alpha": 0.5})


def task_arithmetic(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """Task arithmetic (Ilharco et al., 2023) with the one task vector: ``w_zs + a tau``, a in 0 .. 2."""
    zero_shot, tuned = context.endpoints()

    def score(evaluation: Evaluation, label: str, settings: Settings) -> ModelResult:
        return context.score_values(evaluation, label, context.kind.interpolate(zero_shot, tuned, settings["scale"]))

    return choose(context, "task-arithmetic", [{"scale": scale} for scale in TASK_SCALES], score)


def ties_merge(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """``w_zs + s TIES(tau; k)``; fixed k = 20 %, s = 1, the TIES paper's defaults without validation data."""
    zero_shot, vector = context.task_vector()
    merged = {keep: ties([vector], keep) for keep in TIES_KEEP}

    def score(evaluation: Evaluation, label: str, settings: Settings) -> ModelResult:
        return context.score_values(evaluation, label,
                                    add_scaled(zero_shot, merged[settings["keep"]], settings["scale"]))

    grid = [{"keep": keep, "scale": scale} for keep in TIES_KEEP for scale in MERGE_SCALES]
    return choose(context, "ties", grid, score, fixed={"keep": 0.2, "scale": 1.0})


def dare_merge(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """``w_zs + s DARE(tau; p)``, the drop seeded by the evaluation's seed; p and s on the validation split."""
    zero_shot, vector = context.task_vector()
    dropped = {drop: dare(vector, drop, context.seed) for drop in DARE_DROP}

    def score(evaluation: Evaluation, label: str, settings: Settings) -> ModelResult:
        return context.score_values(evaluation, label,
                                    add_scaled(zero_shot, dropped[settings["drop"]], settings["scale"]))

    grid = [{"drop": drop, "scale": scale} for drop in DARE_DROP for scale in MERGE_SCALES]
    return choose(context, "dare", grid, score)


def entropy_alpha(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """The WiSE-FT alpha with the least mean prediction entropy on the evaluation images, whose labels it never
    reads (AdaMerging's criterion, Yang et al., 2024, for one coefficient): the mean over the sets the
    checkpoint can score, each set weighing the same."""
    zero_shot, tuned = context.endpoints()
    curve = []
    for alpha in WISE_ALPHAS:
        with context.at(context.kind.interpolate(zero_shot, tuned, alpha)) as kind:
            entropies = []
            for evalset in context.test.splits.values():
                try:
                    entropies.append(mean_entropy(predict(kind, evalset).probs))
                except IncompatibleCheckpointError:  # a set of classes this checkpoint cannot score
                    continue
        curve.append({"alpha": alpha, "entropy": sum(entropies) / len(entropies)})
    best = min(curve, key=lambda point: point["entropy"])  # ties: the first (smallest) alpha
    settings = {"alpha": best["alpha"]}
    result = context.score_values(context.test, "entropy-alpha",
                                  context.kind.interpolate(zero_shot, tuned, best["alpha"]))
    return row(context, "entropy-alpha", result, settings, LABEL_FREE, curve)


def ensemble(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """The output ensemble: the mean of the zero-shot and fine-tuned class probabilities."""
    settings = {"weight": 0.5}
    result = context.test.ensemble("ensemble", "zero-shot", context.finetuned, 0.5)
    return row(context, "ensemble", result, settings, FIXED, [])


def weighted_ensemble(context: Baselines) -> tuple[ModelResult, dict[str, Any]]:
    """``(1 - w) p_zs + w p_ft``, w in [0, 1] chosen on the validation split."""
    def score(evaluation: Evaluation, label: str, settings: Settings) -> ModelResult:
        context.endpoints_on(evaluation)
        return evaluation.ensemble(label, "zero-shot", context.finetuned, settings["weight"])

    return choose(context, "weighted-ensemble", [{"weight": weight} for weight in ENSEMBLE_WEIGHTS], score)


@dataclass(frozen=True)
class Baseline:
    """One baseline's declaration: its name (the report row's), function, and what choosing needs."""

    name: str
    run: Callable[[Baselines], tuple[ModelResult, dict[str, Any]]]
    needs_validation: bool  # no fixed default: skipped (or refused, when named) without a validation split
    summary: str


BASELINES: dict[str, Baseline] = {baseline.name: baseline for baseline in (
    Baseline("wise-ft", wise_ft, False, "WiSE-FT (1-a) w_zs + a w_ft, a in [0, 1] (fixed: 0.5)"),
    Baseline("task-arithmetic", task_arithmetic, True, "w_zs + a (w_ft - w_zs), a in [0, 2]"),
    Baseline("ties", ties_merge, False, "TIES-trimmed task vector, scaled (fixed: top 20 %, scale 1)"),
    Baseline("dare", dare_merge, True, "DARE-dropped task vector (seeded), scaled"),
    Baseline("entropy-alpha", entropy_alpha, False, "WiSE-FT a of least prediction entropy (label-free)"),
    Baseline("ensemble", ensemble, False, "mean of zero-shot and fine-tuned probabilities"),
    Baseline("weighted-ensemble", weighted_ensemble, True, "(1-w) p_zs + w p_ft, w in [0, 1]"),
)}
DEFAULT_BASELINES = tuple(BASELINES)  # all are cheap: no training


def baseline_names(requested: bool | str | Sequence[str]) -> tuple[list[str], bool]:
    """(the baselines to run, whether the caller named them): ``True`` is every baseline, ``False`` none;
    a comma-separated string or a sequence names some. An unknown name is refused with the known ones."""
    if isinstance(requested, bool):
        return (list(DEFAULT_BASELINES) if requested else []), False
    items = requested.split(",") if isinstance(requested, str) else list(requested)
    names = list(dict.fromkeys(item.strip() for item in items if item.strip()))
    unknown = [name for name in names if name not in BASELINES]
    if unknown or not names:
        raise UsageError(f"unknown baseline {', '.join(unknown) or '(none named)'}; choose from "
                         f"{', '.join(BASELINES)}")
    return names, True


def check_request(names: Sequence[str], named: bool, has_validation: bool) -> None:
    """Before any work: a baseline the caller named that can only be chosen on a validation split needs one."""
    missing = [name for name in names if named and BASELINES[name].needs_validation and not has_validation]
    if missing:
        raise UsageError(f"{', '.join(missing)} choose{'s' if len(missing) == 1 else ''} a setting on a validation "
                         "split: give --val-data DIR (and --val-novel-data DIR)")


def run_baselines(context: Baselines, names: Sequence[str], named: bool = False
                  ) -> tuple[list[ModelResult], dict[str, Any]]:
    """The rows of ``names`` and the report's ``baselines`` section (each choice and its curve; what was
    skipped and why). A named baseline the checkpoint cannot have is refused; a default one is skipped."""
    rows, chosen, skipped = [], {}, {}
    for name in names:
        try:
            result, chosen[name] = BASELINES[name].run(context)
        except NeedsValidation as exc:
            skipped[name] = str(exc)
            continue
        except IncompatibleCheckpointError as exc:
            if named:
                raise IncompatibleCheckpointError(f"baseline {name}: {exc}") from None
            skipped[name] = str(exc)
            continue
        rows.append(result)
    report = {"finetuned": context.finetuned, "seed": context.seed, "chosen": chosen, "skipped": skipped}
    return rows, report


def best_wise_alpha(report: Mapping[str, Any]) -> float:
    """The WiSE-FT alpha an ``evaluate(..., baselines=True, val_dir=...)`` report chose on its validation split,
    to reuse elsewhere (``wise_alpha=``). A fixed or given alpha is refused: nothing was chosen."""
    chosen = ((report.get("baselines") or {}).get("chosen") or {}).get("wise-ft")
    if not chosen:
        raise IncompatibleCheckpointError("this report has no WiSE-FT row (a kind without zero-shot values?)")
    if chosen["chosen_by"] != VALIDATION:
        raise UsageError(f"this report's WiSE-FT alpha is {chosen['chosen_by']}, not chosen on a validation split; "
                         "evaluate with val_dir= (eval --val-data)")
    return float(chosen["settings"]["alpha"])

