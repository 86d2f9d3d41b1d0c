"""Base-to-novel evaluation: accuracy per model on base and novel classes, and their harmonic mean.

Protocol (CoOp / CoCoOp): base test images are classified among the base classes only,
novel test images among the novel classes only; HM = 2 B N / (B + N). Accuracies are
percentages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch

from repair.backbone import Backbone
from repair.data import Features
from repair.errors import IncompatibleCheckpointError

EVAL_SCHEMA = "mergetune.eval/1"


class Scorer(Protocol):
    """Anything that turns image features into logits over a given class list.

    ``input_kind`` and ``image_encoder()`` say which features it needs (see ``Kind``).
    """

    input_kind: str

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor: ...

    def image_encoder(self): ...


class ZeroShot:
    """The zero-shot CLIP classifier: template text features of the classes."""

    def __init__(self, backbone: Backbone, templates: Sequence[str], logit_scale: float | None = None) -> None:
        self.backbone = backbone
        self.templates = list(templates)
        self.scale = float(logit_scale if logit_scale is not None else backbone.logit_scale)
        self._classifiers: dict[tuple[str, ...], torch.Tensor] = {}

    input_kind = "features"

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


@dataclass
class ModelResult:
    name: str
    base: float | None = None
    novel: float | None = None
    hm: float | None = None
    notes: list[str] = field(default_factory=list)


def harmonic_mean(base: float | None, novel: float | None) -> float | None:
    if base is None or novel is None:
        return None
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


@torch.no_grad()
def accuracy_percent(scorer: Scorer, evalset: EvalSet, batch_size: int = 4096) -> float:
    data = evalset.features_for(scorer)
    features, labels = data.features, data.labels
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = scorer.logits_for(features[start:start + batch_size], evalset.classnames)
        correct += int((logits.argmax(dim=-1) == labels[start:start + batch_size]).sum())
    return 100.0 * correct / max(len(labels), 1)


def evaluate_models(models: dict[str, Scorer], base: EvalSet, novel: EvalSet | None = None) -> list[ModelResult]:
    """Score every model on base (and novel) data; a model that cannot score a set gets a note."""
    results = []
    for name, scorer in models.items():
        result = ModelResult(name)
        for split, evalset in (("base", base), ("novel", novel)):
            if evalset is None:
                continue
            try:
                setattr(result, split, accuracy_percent(scorer, evalset))
            except IncompatibleCheckpointError as exc:
                result.notes.append(f"{split}: {exc}")
        result.hm = harmonic_mean(result.base, result.novel)
        results.append(result)
    return results


def results_as_dicts(results: list[ModelResult]) -> list[dict[str, object]]:
    return [asdict(result) for result in results]
