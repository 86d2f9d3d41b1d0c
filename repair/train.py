"""The training loop shared by ``repair`` and ``finetune``: SGD, warm-up + cosine, selection.

The loop knows nothing about files or terminals: it takes a kind, an objective and
batches, and reports progress through a callback, so the CLI and Python users drive it
the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from repair.data import Features
from repair.errors import NumericalError
from repair.kinds.base import Kind
from repair.objective import Objective, mergetune_loss
from repair.surrogates import Surrogate, build_surrogate


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop early after this many steps; 0 returns the input unchanged
    batch_size: int = 128
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    seed: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class StepReport:
    step: int
    total_steps: int
    epoch: int
    lr: float
    terms: dict[str, float]


@dataclass
class EpochReport:
    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float | None = None


@dataclass
class TrainResult:
    steps: int
    selected_epoch: int | None  # the epoch whose weights were kept, when a validation split was used
    history: list[EpochReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "selected_epoch": self.selected_epoch,
                "history": [asdict(report) for report in self.history]}


def shuffled_batches(data: Features, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
    order = torch.randperm(len(data), generator=generator).to(data.features.device)
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        yield data.features[index], data.labels[index]


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to zero at ``total_steps``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


@torch.no_grad()
def accuracy(kind: Kind, data: Features, batch_size: int = 1024) -> float:
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = kind(data.features[start:start + batch_size]).logits
        correct += int((logits.argmax(-1) == data.labels[start:start + batch_size]).sum())
    return correct / max(len(data), 1)


def train(
    kind: Kind,
    objective: Objective,
    train_set: Features,
    config: TrainConfig,
    *,
    val_set: Features | None = None,
    surrogate: Surrogate | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> TrainResult:
    """Run the loop in place on ``kind``'s trainable tensors; returns what happened."""
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    result = TrainResult(steps=0, selected_epoch=None)
    if total_steps == 0:
        return result
    if surrogate is None and objective.lam_zs != 0.0:
        surrogate = build_surrogate(objective.surrogate, kind, train_set, seed=config.seed)
    parameters = list(kind.trainable().values())
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, config.warmup_epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(config.seed)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    epoch = 0
    while result.steps < total_steps:
        epoch += 1
        loss_sum, correct, seen = 0.0, 0, 0
        for inputs, labels in shuffled_batches(train_set, config.batch_size, generator):
            terms = mergetune_loss(kind, objective, inputs, labels, surrogate)
            _check_finite(terms.total, result.steps + 1, epoch)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            schedule.step()
            result.steps += 1
            loss_sum += float(terms.total.detach()) * len(labels)
            correct += terms.correct
            seen += len(labels)
            if on_step is not None:
                on_step(StepReport(result.steps, total_steps, epoch, schedule.get_last_lr()[0], terms.as_floats()))
            if result.steps >= total_steps:
                break
        report = EpochReport(epoch, loss_sum / max(seen, 1), correct / max(seen, 1))
        if val_set is not None:
            report.val_accuracy = accuracy(kind, val_set)
            if best is None or report.val_accuracy >= best[0]:  # ties go to the later, more repaired epoch
                best = (report.val_accuracy, kind.snapshot())
                result.selected_epoch = epoch
        result.history.append(report)
    if best is not None:
        kind.load_values(best[1])
    return result


def _check_finite(loss: torch.Tensor, step: int, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise NumericalError(
            f"the loss became {float(loss.detach())} at step {step} (epoch {epoch}); nothing was written; "
            "try a lower --lr or smaller --lam-zs"
        )
