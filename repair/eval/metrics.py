"""Base-to-novel evaluation: accuracy, calibration and forgetting per model, plus baselines.

Protocol (CoOp / CoCoOp): base test images are classified among the base classes only,
novel test images among the novel classes only; HM = 2 B N / (B + N). Accuracies and ECE
are percentages. Each model's class probabilities are computed once per split; every
metric, and the output-ensemble baseline, is derived from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from repair.model.backbone import Backbone
from repair.data.features import Features
from repair.errors import IncompatibleCheckpointError

EVAL_SCHEMA = "mergetune.eval/2"
ECE_BINS = 15


class Scorer(Protocol):
    """Anything that turns image features into logits over a given class list.

    ``input_kind`` and ``image_encoder()`` say which features it needs (see ``Kind``).
    """

    input_kind: str

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor: ...

    def image_encoder(self): ...


class ZeroShot:
    """The zero-shot CLIP classifier: template text features of the classes."""

    input_kind = "features"

    def __init__(self, backbone: Backbone, templates: Sequence[str], logit_scale: float | None = None) -> None:
        self.backbone = backbone
        self.templates = list(templates)
        self.scale = float(logit_scale if logit_scale is not None else backbone.logit_scale)
        self._classifiers: dict[tuple[str, ...], torch.Tensor] = {}

    def image_encoder(self) -> None:
        return None

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._classifiers:
            self._classifiers[key] = self.backbone.zero_shot_classifier(key, self.templates)
        return self.scale * features @ self._classifiers[key].t()


@dataclass(frozen=True)
class EvalSet:
    """One test folder: its class names and the image features each scorer needs."""

    name: str
    classnames: tuple[str, ...]
    features_for: Callable[[Scorer], Features]


@dataclass(frozen=True)
class Predictions:
    probs: torch.Tensor  # [N, C]
    labels: torch.Tensor  # [N]


@dataclass
class SplitMetrics:
    accuracy: float
    ece: float
    per_class: dict[str, float]


@dataclass
class ModelResult:
    name: str
    role: str = "checkpoint"  # zero-shot | checkpoint | baseline
    base: float | None = None
    novel: float | None = None
    hm: float | None = None
    base_ece: float | None = None
    novel_ece: float | None = None
    novel_sets: dict[str, float] = field(default_factory=dict)  # accuracy per held-out set
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    chosen_by: str | None = None  # a baseline's: how its setting was chosen (repair.eval.baselines)
    settings: dict[str, float] = field(default_factory=dict)  # a baseline's chosen setting, e.g. {"alpha": 0.5}
    chosen_on_test: bool = False  # a baseline whose setting (WiSE-FT's alpha) was chosen on this data: optimistic
    _novel_eces: dict[str, float] = field(default_factory=dict, repr=False)

    def set_split(self, split: str, metrics: SplitMetrics) -> None:
        """Base is one set; novel is the mean over every held-out set (each is kept too)."""
        self.per_class[split] = metrics.per_class
        if split == "base":
            self.base, self.base_ece = metrics.accuracy, metrics.ece
        else:
            self.novel_sets[split] = metrics.accuracy
            self._novel_eces[split] = metrics.ece
            self.novel = sum(self.novel_sets.values()) / len(self.novel_sets)
            self.novel_ece = sum(self._novel_eces.values()) / len(self._novel_eces)
        self.hm = harmonic_mean(self.base, self.novel)


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@torch.no_grad()
def predict(scorer: Scorer, evalset: EvalSet, batch_size: int = 4096) -> Predictions:
    data = evalset.features_for(scorer)
    chunks = [torch.softmax(scorer.logits_for(data.features[start:start + batch_size], evalset.classnames).float(),
                            dim=-1) for start in range(0, len(data), batch_size)]
    return Predictions(torch.cat(chunks).cpu(), data.labels.cpu())


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent: |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += float(in_bin.float().mean()) * abs(float(correct[in_bin].mean() - confidence[in_bin].mean()))
    return 100.0 * error


def split_metrics(predictions: Predictions, classnames: Sequence[str]) -> SplitMetrics:
    correct = predictions.probs.argmax(dim=-1) == predictions.labels
    per_class = {}
    for index, name in enumerate(classnames):
        mask = predictions.labels == index
        if mask.any():
            per_class[name] = _percent(int(correct[mask].sum()), int(mask.sum()))
    accuracy = _percent(int(correct.sum()), len(correct))
    return SplitMetrics(accuracy, expected_calibration_error(predictions.probs, predictions.labels), per_class)


def _percent(correct: int, total: int) -> float:
    """Exact in double precision (a float32 mean is off by ~1e-6)."""
    return 100.0 * correct / total if total else 0.0


class Evaluation:
    """Scores models on the base (and novel) sets, keeping each model's predictions for baselines."""

    def __init__(self, base: EvalSet, novel: Sequence[EvalSet] = ()) -> None:
        self.splits = {"base": base, **{evalset.name: evalset for evalset in novel}}
        self.predictions: dict[str, dict[str, Predictions]] = {}

    def score(self, name: str, scorer: Scorer, role: str = "checkpoint") -> ModelResult:
        result = ModelResult(name, role)
        self.predictions[name] = {}
        for split, evalset in self.splits.items():
            try:
                predictions = predict(scorer, evalset)
            except IncompatibleCheckpointError as exc:
                result.notes.append(f"{split}: {exc}")
                continue
            self.predictions[name][split] = predictions
            result.set_split(split, split_metrics(predictions, evalset.classnames))
        return result

    def ensemble(self, name: str, first: str, second: str, weight: float = 0.5) -> ModelResult:
        """Output ensemble: ``(1 - weight) p_first + weight p_second`` of two models' class probabilities."""
        result = ModelResult(name, "baseline")
        self.predictions[name] = {}
        for split, evalset in self.splits.items():
            a, b = self.predictions[first].get(split), self.predictions[second].get(split)
            if a is None or b is None:
                result.notes.append(f"{split}: {first} or {second} cannot score these classes")
                continue
            mixed = Predictions((1.0 - weight) * a.probs + weight * b.probs, a.labels)
            self.predictions[name][split] = mixed
            result.set_split(split, split_metrics(mixed, evalset.classnames))
        return result

    def discard(self, name: str) -> None:
        """Forget a model's predictions (a baseline's candidate once it is scored)."""
        self.predictions.pop(name, None)


def forgetting(results: Sequence[ModelResult], reference: str = "zero-shot", top: int | None = None
               ) -> dict[str, list[dict[str, object]]]:
    """Per model, the classes that lost most accuracy since the zero-shot model, worst first."""
    by_name = {result.name: result for result in results}
    anchor = by_name[reference]
    ranking: dict[str, list[dict[str, object]]] = {}
    for result in results:
        if result.name == reference:
            continue
        rows = []
        for split, per_class in result.per_class.items():
            for name, accuracy in per_class.items():
                before = anchor.per_class.get(split, {}).get(name)
                if before is not None:
                    rows.append({"split": split, "class": name, "zero_shot": before, "model": accuracy,
                                 "change": accuracy - before})
        rows.sort(key=lambda row: (row["change"], row["class"]))
        ranking[result.name] = rows[:top] if top else rows
    return ranking


def selection_score(result: ModelResult) -> float:
    """What "best" means for a baseline's knob: HM, or base accuracy when there is no novel set."""
    return result.hm if result.hm is not None else (result.base or 0.0)
