"""The MergeTune loss: task CE + lam_zs * zero-shot surrogate + lam_lmc * path CE.

    L(w) = CE(w) + lam_zs * S(w, w_zs) + lam_lmc * mean_k CE(w_ft + t_k (w - w_ft))

With both lambdas at 0 this is plain continued fine-tuning (CoOp, a linear probe, CLIPFit).
``lam_zs = "auto"`` asks the training workflow to choose it on held-out shots (:mod:`repair.train.select`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from repair.errors import UsageError
from repair.kinds.base import Kind
from repair.train.fields import check_fields
from repair.train.surrogates import SURROGATES, Surrogate, build_surrogate, surrogate_names


AUTO = "auto"


MAX_PATH_POINTS = 100  # the path term is a mean over points of a straight segment: more add nothing but cost


@dataclass(frozen=True)
class Objective:
    lam_zs: float | str | None = None  # None: the kind's default (Kind.defaults); "auto": chosen on held-out shots
    lam_lmc: float = 1.0
    path_points: int = field(default=5, metadata={"min": 1, "max": MAX_PATH_POINTS})
    surrogate: str | None = None  # None: the kind's default (Kind.defaults)

    def __post_init__(self) -> None:
        check_fields(self)  # types and bounds, with the messages the flags give
        if self.surrogate is not None and self.surrogate not in SURROGATES:
            raise UsageError(f"unknown surrogate {self.surrogate!r}; choose one of {', '.join(SURROGATES)}")
        if isinstance(self.lam_zs, str) and self.lam_zs != AUTO:
            raise UsageError(f"lam_zs must be a number >= 0 or 'auto', not {self.lam_zs!r}")
        for name in ("lam_zs", "lam_lmc"):
            value = getattr(self, name)
            if value == AUTO and name == "lam_zs":
                continue
            if value is not None and not 0.0 <= value < float("inf"):
                raise UsageError(f"{name} must be a finite number >= 0, got {value}")

    def for_kind(self, kind: type[Kind] | Kind) -> Objective:
        """The same objective with every unset choice filled in from the kind's declared defaults."""
        if self.lam_zs is not None and self.surrogate is not None:
            return self  # the common case: called on every training step
        return replace(self, lam_zs=kind.defaults.lam_zs if self.lam_zs is None else self.lam_zs,
                       surrogate=self.surrogate or kind.defaults.surrogate)

    @property
    def chooses_lam_zs(self) -> bool:
        """Whether ``lam_zs`` is still to be chosen (``"auto"``): the workflow picks it before training."""
        return self.lam_zs == AUTO

    def path_ts(self) -> torch.Tensor:
        """Midpoints of K equal steps on (0, 1): K=5 gives 0.1, 0.3, 0.5, 0.7, 0.9."""
        return (torch.arange(self.path_points, dtype=torch.float32) + 0.5) / self.path_points

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    surrogate: torch.Tensor
    path: torch.Tensor
    correct: int

    def as_floats(self) -> dict[str, float]:
        terms = {"loss": self.total, "ce": self.ce, "surrogate": self.surrogate, "path": self.path}
        return {name: float(value.detach()) for name, value in terms.items()}


def mergetune_loss(kind: Kind, objective: Objective, inputs: torch.Tensor, labels: torch.Tensor,
                   surrogate: Surrogate | None = None) -> LossTerms:
    """One mini-batch of the objective; terms with a zero weight are not computed at all.

    ``surrogate`` is the prepared zero-shot term (:func:`repair.surrogates.build_surrogate`);
    data-free ones are built on the fly when it is not given.
    """
    objective = objective.for_kind(kind)
    if objective.chooses_lam_zs:
        raise UsageError("lam_zs='auto' is chosen by the repair workflow (repair.train.select.choose_lam_zs) "
                         "before training; pass a number here")
    wants_path = objective.lam_lmc != 0.0
    if objective.lam_zs != 0.0:
        surrogate = surrogate or build_surrogate(objective.surrogate, kind)
    # a surrogate that scores names at w (distill) has them encoded in the kind's own text pass
    names = surrogate_names(surrogate, kind) if objective.lam_zs != 0.0 else None
    with kind.encode_alongside(names):
        output = kind(inputs, objective.path_ts().to(inputs.device) if wants_path else None)
        ce = F.cross_entropy(output.logits, labels)
        penalty = surrogate(kind, output) if objective.lam_zs != 0.0 else ce.new_zeros(())
    zero = ce.new_zeros(())
    path = zero
    if wants_path and output.path_logits is not None:
        k, batch, classes = output.path_logits.shape
        path = F.cross_entropy(output.path_logits.reshape(k * batch, classes), labels.repeat(k))
    total = ce + objective.lam_zs * penalty + objective.lam_lmc * path
    correct = int((output.logits.argmax(dim=-1) == labels).sum())
    return LossTerms(total=total, ce=ce, surrogate=penalty, path=path, correct=correct)
