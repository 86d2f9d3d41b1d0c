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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from repair.data.features import Features
from repair.errors import InputFileError, NumericalError, UsageError, stop_if_terminated
from repair.io import write_state_file
from repair.kinds.base import Kind
from repair.train.fields import check_fields
from repair.train.objective import Objective, mergetune_loss
from repair.train.surrogates import Surrogate, build_surrogate


OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """The schedule; each field's metadata is its command-line flag (help and bounds).

    Unset fields (None) take the kind's declared :class:`Schedule` (:meth:`for_kind`): a repair runs that many
    Adam steps whose step size is relative to how far fine-tuning moved each tensor (``Kind.step_scales``).
    ``lr`` gives an absolute learning rate instead; ``epochs`` counts passes over the images instead of steps.
    """

    steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps [default: the kind's, README 'Defaults'].", "min": 0})
    epochs: int | None = field(default=None, metadata={
        "help": "Passes over the training images, instead of --steps.", "min": 0})
    max_steps: int | None = field(default=None, metadata={  # 0 returns the input unchanged
        "help": "Stop after this many steps, whatever --steps or --epochs say.", "min": 0})
    batch_size: int | None = field(default=None, metadata={
        "help": "Images per step [default: the kind's].", "min": 1})
    optimizer: str = field(default="adam", metadata={"help": "adam or sgd."})
    step_size: float | None = field(default=None, metadata={
        "help": "Relative step: each step moves a tensor by about this fraction of its scale (how far "
                "fine-tuning moved it; for fine-tuning, its size) [default: the kind's].", "min": 0.0})
    lr: float | None = field(default=None, metadata={
        "help": "Absolute learning rate instead of --step-size (required with --optimizer sgd).", "min": 0.0})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum, or Adam's beta1, in [0, 1).",
                                                   "min": 0.0})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (towards 0).", "min": 0.0})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "Linear warm-up steps [default: 5% of the steps].", "min": 0})
    seed: int = field(default=0, metadata={"help": "The one seed: shots, split, batches, initialisation.",
                                           "min": 0, "max": 2**63 - 1})
    weight_ensemble: int | None = field(default=None, metadata={  # ZSCL's WE; see RunningMean
        "help": "Write the running mean of the weights taken every N steps, the start counted (ZSCL's weight "
                "ensemble), instead of the last weights.", "min": 1})

    def __post_init__(self) -> None:
        check_fields(self)  # types and the bounds above: one message for Python callers and the flags
        for name in ("lr", "step_size", "momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value}")
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        if self.lr is not None and self.step_size is not None:
            raise UsageError("give --lr (absolute) or --step-size (relative), not both")
        if self.optimizer == "sgd" and self.lr is None:
            raise UsageError("--optimizer sgd needs an absolute --lr (a relative --step-size is Adam's)")

    def for_kind(self, kind: type[Kind] | Kind, stage: str) -> TrainConfig:
        """Every unset choice filled in from the kind's declared schedule for ``stage`` (repair or finetune)."""
        schedule = kind.defaults.schedule if stage == "repair" else kind.finetune_schedule
        steps = self.steps if self.steps is not None or self.epochs is not None else schedule.steps
        step_size = self.step_size if self.step_size is not None or self.lr is not None else schedule.step_size
        return replace(self, steps=steps, step_size=step_size,
                       batch_size=self.batch_size if self.batch_size is not None else schedule.batch_size)

    @property
    def resolved(self) -> bool:
        """Whether every choice is made: a length, a batch size and a step size."""
        return ((self.steps is not None or self.epochs is not None) and self.batch_size is not None
                and (self.lr is not None or self.step_size is not None))

    def total_steps(self, images: int) -> int:
        """Steps this schedule runs on ``images`` training images (``--epochs`` converted, ``--max-steps`` applied)."""
        if not self.resolved:
            raise UsageError("the schedule is not resolved: call TrainConfig.for_kind(kind, stage) first")
        total = self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(images)
        return min(total, self.max_steps) if self.max_steps is not None else total

    def steps_per_epoch(self, images: int) -> int:
        return math.ceil(images / (self.batch_size or 1))

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else math.ceil(0.05 * total_steps)

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
    weight_ensemble: dict[str, int] | None = None  # {"every": N, "averaged": points in the mean}, with WE

    def as_dict(self) -> dict[str, object]:
        extra = {"weight_ensemble": self.weight_ensemble} if self.weight_ensemble is not None else {}
        return {"steps": self.steps, "selected_epoch": self.selected_epoch,
                "history": [asdict(report) for report in self.history], **extra, **self.choices}


@dataclass
class RunningMean:
    """ZSCL's weight ensemble (Zheng et al., 2023): ``mean <- (mean * n + theta) / (n + 1)``, started at the
    run's first weights (``n = 1``: ``w_zs`` for a fine-tuning, ``w_ft`` for a repair)."""

    count: int
    mean: dict[str, torch.Tensor]

    @classmethod
    def starting_at(cls, values: dict[str, torch.Tensor]) -> RunningMean:
        return cls(1, {name: value.detach().clone() for name, value in values.items()})

    @torch.no_grad()
    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            self.mean[name].mul_(self.count).add_(value.detach()).div_(self.count + 1)
        self.count += 1


def check_weight_ensemble(config: TrainConfig, kind: Kind, held_out: bool) -> None:
    """Refuse a weight ensemble where it means nothing, before any work."""
    if config.weight_ensemble is None:
        return
    if held_out:
        raise UsageError("--weight-ensemble writes the mean of the run's weights, --val-fraction keeps one epoch's: "
                         "use one of them")
    if not kind.mergeable:
        raise UsageError(f"--weight-ensemble averages the trainable tensors, and a {kind.about.description}'s are "
                         "not its weights (their mean is not the mean model)")


@dataclass
class LoopState:
    """Everything the loop needs to continue: weights, optimizer state, schedule position, shuffling RNG."""

    epoch: int
    steps: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]]  # per trainable tensor: momentum, or Adam's moments and step
    rng: torch.Tensor
    history: list[EpochReport]
    best_accuracy: float | None = None
    best_weights: dict[str, torch.Tensor] | None = None
    selected_epoch: int | None = None
    average: RunningMean | None = None  # the weight ensemble so far


@dataclass(frozen=True)
class ProgressFile:
    """Where a long run saves its state each epoch; ``fingerprint`` ties it to one run's inputs and settings."""

    path: Path
    fingerprint: str

    def save(self, state: LoopState) -> None:
        tensors = {"rng": state.rng}
        average = state.average.mean if state.average is not None else {}
        for group, values in (("w", state.weights), ("best", state.best_weights or {}), ("we", average)):
            tensors.update({f"{group}/{name}": value.detach().cpu().contiguous() for name, value in values.items()})
        for name, entries in state.optimizer.items():
            tensors.update({f"opt/{name}/{key}": value.detach().cpu().contiguous() for key, value in entries.items()})
        record = {"fingerprint": self.fingerprint, "epoch": state.epoch, "steps": state.steps,
                  "best_accuracy": state.best_accuracy, "selected_epoch": state.selected_epoch,
                  "history": [asdict(report) for report in state.history],
                  "averaged": state.average.count if state.average is not None else None}
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

        optimizer: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt/"):
                name, entry = key[len("opt/"):].rsplit("/", 1)
                optimizer.setdefault(name, {})[entry] = value if entry == "step" else value.to(device)
        averaged = record.get("averaged")
        return LoopState(epoch=record["epoch"], steps=record["steps"], weights=group("w"), optimizer=optimizer,
                         rng=tensors["rng"], history=[EpochReport(**item) for item in record["history"]],
                         best_accuracy=record["best_accuracy"], best_weights=group("best") or None,
                         selected_epoch=record["selected_epoch"],
                         average=RunningMean(averaged, group("we")) if averaged else None)

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

    ``config`` must be resolved (:meth:`TrainConfig.for_kind`). With ``progress``, the state is saved after
    every epoch; ``resume`` continues from it. With ``config.weight_ensemble``, ``kind`` ends at the running
    mean of its weights (:class:`RunningMean`).
    """
    total_steps = config.total_steps(len(train_set))
    result = TrainResult(steps=0, selected_epoch=None)
    if total_steps == 0:
        return result
    objective = objective.for_kind(kind)
    check_weight_ensemble(config, kind, val_set is not None)
    if objective.chooses_lam_zs:
        raise UsageError("lam_zs='auto' is chosen before training (repair.train.select.choose_lam_zs); "
                         "train() takes a number")
    if surrogate is None and objective.lam_zs != 0.0:
        surrogate = build_surrogate(objective.surrogate, kind, train_set, seed=config.seed)
    optimizer, result.choices["lr"] = make_optimizer(kind, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, config.warmup(total_steps)))
    generator = torch.Generator().manual_seed(config.seed)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    average = RunningMean.starting_at(kind.snapshot()) if config.weight_ensemble else None
    epoch = 0
    if resume and progress is not None:
        state = progress.load(train_set.features.device)
        kind.load_values(state.weights)
        for name, parameter in kind.trainable().items():
            if name in state.optimizer:
                optimizer.state[parameter] = {key: value.clone() for key, value in state.optimizer[name].items()}
        generator.set_state(state.rng)
        epoch, result.steps, result.history = state.epoch, state.steps, state.history
        schedule.last_epoch = state.steps
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * schedule.lr_lambdas[0](state.steps)
        if state.best_weights is not None and state.best_accuracy is not None:
            best = (state.best_accuracy, state.best_weights)
            result.selected_epoch = state.selected_epoch
        if average is not None and state.average is not None:
            average = state.average
    while result.steps < total_steps:
        epoch += 1
        loss_sum, correct, seen = 0.0, 0, 0
        for inputs, labels in shuffled_batches(train_set, config.batch_size, generator):
            stop_if_terminated()
            with kind.backbone.autocast():  # forward in the chosen precision; tensors and updates stay fp32
                terms = mergetune_loss(kind, objective, inputs, labels, surrogate)
            _check_finite(terms.total, result.steps + 1, epoch)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            schedule.step()
            result.steps += 1
            if average is not None and result.steps % config.weight_ensemble == 0:
                average.add(kind.snapshot())
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
            progress.save(_loop_state(kind, optimizer, generator, epoch, result, best, average))
    if best is not None:
        kind.load_values(best[1])
    if average is not None:
        kind.load_values(average.mean)
        result.weight_ensemble = {"every": config.weight_ensemble, "averaged": average.count}
    return result


def make_optimizer(kind: Kind, config: TrainConfig) -> tuple[torch.optim.Optimizer, dict[str, float]]:
    """The optimizer over ``kind``'s trainable tensors, one group each, and each tensor's learning rate.

    Adam is invariant to the gradient's scale, so a relative step size times the tensor's scale
    (:meth:`Kind.step_scales`) moves each tensor by about that fraction per step on any backbone; an absolute
    ``lr`` is used as given.
    """
    trainable = kind.trainable()
    if config.lr is not None:
        rates = {name: float(config.lr) for name in trainable}
    else:
        scales = kind.step_scales()
        rates = {name: float(config.step_size) * scales[name] for name in trainable}
    groups = [{"params": [parameter], "lr": rates[name]} for name, parameter in trainable.items()]
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=rates[next(iter(rates))] if rates else 0.0, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.Adam(groups, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)
    return optimizer, rates


def _loop_state(kind: Kind, optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int,
                result: TrainResult, best: tuple[float, dict[str, torch.Tensor]] | None,
                average: RunningMean | None = None) -> LoopState:
    state = {name: {key: value.detach().clone() for key, value in optimizer.state[parameter].items()
                    if isinstance(value, torch.Tensor)}
             for name, parameter in kind.trainable().items() if optimizer.state.get(parameter)}
    return LoopState(epoch=epoch, steps=result.steps, weights=kind.snapshot(), optimizer=state,
                     rng=generator.get_state(), history=list(result.history),
                     best_accuracy=best[0] if best else None, best_weights=best[1] if best else None,
                     selected_epoch=result.selected_epoch, average=average)


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
