"""The training loop shared by ``repair`` and ``finetune``: SGD, warm-up + cosine, selection, resume.

The loop knows nothing about terminals: it takes a kind, an objective and batches, and
reports progress through a callback, so the CLI and Python users drive it the same way.
With a :class:`ProgressFile` it saves its whole state after every epoch, and a resumed run
continues bit for bit where the saved one stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from repair.data.features import Features
from repair.errors import InputFileError, NumericalError, UsageError
from repair.io import write_state_file
from repair.kinds.base import Kind
from repair.train.fields import check_fields
from repair.train.objective import Objective, mergetune_loss
from repair.train.surrogates import Surrogate, build_surrogate


@dataclass(frozen=True)
class TrainConfig:
    """The schedule; each field's metadata is its command-line flag (help and bounds)."""

    epochs: int = field(default=10, metadata={"help": "Passes over the training images.", "min": 0})
    max_steps: int | None = field(default=None, metadata={  # 0 returns the input unchanged
        "help": "Stop after this many steps.", "min": 0})
    batch_size: int = field(default=128, metadata={"help": "Images per step.", "min": 1})
    lr: float = field(default=0.002, metadata={"help": "SGD learning rate (cosine schedule).", "min": 0.0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum, in [0, 1).", "min": 0.0})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay.", "min": 0.0})
    warmup_epochs: int = field(default=1, metadata={"help": "Linear warm-up epochs.", "min": 0})
    seed: int = field(default=0, metadata={"help": "The one seed: shots, split, batches, initialisation.",
                                           "min": 0, "max": 2**63 - 1})

    def __post_init__(self) -> None:
        check_fields(self)  # types and the bounds above: one message for Python callers and the flags
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"momentum must lie in [0, 1), got {self.momentum}")

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
    # what the workflow decided around the loop: the surrogate's build ("surrogate_build"), lam_zs auto's curve
    choices: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"steps": self.steps, "selected_epoch": self.selected_epoch,
                "history": [asdict(report) for report in self.history], **self.choices}


@dataclass
class LoopState:
    """Everything the loop needs to continue: weights, momentum, schedule position, shuffling RNG."""

    epoch: int
    steps: int
    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    rng: torch.Tensor
    history: list[EpochReport]
    best_accuracy: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    selected_epoch: int | None = None


@dataclass(frozen=True)
class ProgressFile:
    """Where a long run saves its state each epoch; ``fingerprint`` ties it to one run's inputs and settings."""

    path: Path
    fingerprint: str

    def save(self, state: LoopState) -> None:
        tensors = {"rng": state.rng}
        for group, values in (("w", state.weights), ("m", state.momentum), ("best", state.best_weights or {})):
            tensors.update({f"{group}/{name}": value.detach().cpu().contiguous() for name, value in values.items()})
        record = {"fingerprint": self.fingerprint, "epoch": state.epoch, "steps": state.steps,
                  "best_accuracy": state.best_accuracy, "selected_epoch": state.selected_epoch,
                  "history": [asdict(report) for report in state.history]}
        write_state_file(self.path, tensors, {"state": json.dumps(record)})

    def saved(self) -> dict | None:
        """What the saved progress says about itself (its fingerprint, epoch, ...) without loading its tensors;
        None when there is none."""
        if not self.path.is_file():
            return None
        try:
            with safe_open(self.path, "pt") as handle:
                return json.loads(handle.metadata()["state"])
        except Exception:
            raise InputFileError(f"{self.path}: saved progress is damaged; delete it to start over") from None

    def check_resumable(self) -> dict:
        """The saved state's record, if it belongs to exactly this run; else a one-line refusal."""
        record = self.saved()
        if record is None:
            raise UsageError(f"{self.path}: no saved progress to resume from; run without --resume")
        if record.get("fingerprint") != self.fingerprint:
            raise UsageError(f"{self.path}: saved progress belongs to another run (inputs or settings differ); "
                             "resume with the same command, or pass --force instead of --resume to discard it")
        return record

    def load(self, device: torch.device) -> LoopState:
        record = self.check_resumable()
        try:
            tensors = load_file(self.path)
        except Exception:
            raise InputFileError(f"{self.path}: saved progress is damaged; delete it to start over") from None

        def group(prefix: str) -> dict[str, torch.Tensor]:
            return {key.split("/", 1)[1]: value.to(device) for key, value in tensors.items()
                    if key.startswith(prefix + "/")}

        return LoopState(epoch=record["epoch"], steps=record["steps"], weights=group("w"), momentum=group("m"),
                         rng=tensors["rng"], history=[EpochReport(**item) for item in record["history"]],
                         best_accuracy=record["best_accuracy"], best_weights=group("best") or None,
                         selected_epoch=record["selected_epoch"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


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
    progress: ProgressFile | None = None,
    resume: bool = False,
) -> TrainResult:
    """Run the loop in place on ``kind``'s trainable tensors; returns what happened.

    With ``progress``, the state is saved after every epoch; ``resume`` continues from it.
    """
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    result = TrainResult(steps=0, selected_epoch=None)
    if total_steps == 0:
        return result
    objective = objective.for_kind(kind)
    if objective.chooses_lam_zs:
        raise UsageError("lam_zs='auto' is chosen before training (repair.train.select.choose_lam_zs); "
                         "train() takes a number")
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
    if resume and progress is not None:
        state = progress.load(train_set.features.device)
        kind.load_values(state.weights)
        for name, parameter in kind.trainable().items():
            if name in state.momentum:
                optimizer.state[parameter]["momentum_buffer"] = state.momentum[name].clone()
        generator.set_state(state.rng)
        epoch, result.steps, result.history = state.epoch, state.steps, state.history
        schedule.last_epoch = state.steps
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * schedule.lr_lambdas[0](state.steps)
        if state.best_weights is not None and state.best_accuracy is not None:
            best = (state.best_accuracy, state.best_weights)
            result.selected_epoch = state.selected_epoch
    while result.steps < total_steps:
        epoch += 1
        loss_sum, correct, seen = 0.0, 0, 0
        for inputs, labels in shuffled_batches(train_set, config.batch_size, generator):
            with kind.backbone.autocast():  # forward in the chosen precision; tensors and updates stay fp32
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
        if progress is not None:
            progress.save(_loop_state(kind, optimizer, generator, epoch, result, best))
    if best is not None:
        kind.load_values(best[1])
    return result


def _loop_state(kind: Kind, optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int,
                result: TrainResult, best: tuple[float, dict[str, torch.Tensor]] | None) -> LoopState:
    momentum = {name: optimizer.state[parameter]["momentum_buffer"]
                for name, parameter in kind.trainable().items()
                if optimizer.state.get(parameter, {}).get("momentum_buffer") is not None}
    return LoopState(epoch=epoch, steps=result.steps, weights=kind.snapshot(), momentum=momentum,
                     rng=generator.get_state(), history=list(result.history),
                     best_accuracy=best[0] if best else None, best_weights=best[1] if best else None,
                     selected_epoch=result.selected_epoch)


@contextmanager
def seeded_run(seed: int, deterministic: bool = False) -> Iterator[None]:
    """The run's seed and kernel choice, scoped: a library caller's RNG and flags are restored after.

    ``deterministic`` asks for bit-identical reruns: deterministic kernels only (CUDA needs a fixed
    cuBLAS workspace too).
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0])
            torch.backends.cudnn.benchmark = saved[1]
            if saved[2] is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _check_finite(loss: torch.Tensor, step: int, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise NumericalError(
            f"the loss became {float(loss.detach())} at step {step} (epoch {epoch}); nothing was written; "
            "try a lower --lr or smaller --lam-zs"
        )
