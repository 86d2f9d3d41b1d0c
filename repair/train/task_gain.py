"""The repair's precondition: the fine-tuned checkpoint beats zero-shot on the repair images.

MergeTune keeps what fine-tuning gained on the task (the path term ties the repair to ``w_ft``) while it pulls
the rest back towards zero-shot. A checkpoint that scores no better than the zero-shot model on the repair images,
which are labelled images of its own task (usually its own training shots), gained nothing there to keep: its
fine-tuning failed (it diverged, or it was trained for other data). Tying the repair to it then keeps a model
that is worse on the task and has forgotten the rest; the zero-shot weights are the better model on both counts.

Measured on the towers proxy (the benchmark's 100 fine-tuned checkpoints: CoOp, CLIPFit, linear probe, seeds
1-10): 99 beat zero-shot on their repair images by 1.6 to 58.8 points; CIFAR-10 CLIPFit seed 6's scored 55.0 %
on its 80 shots, as zero-shot did (43 % base and 21 % novel test accuracy against zero-shot's 56 % and 71 %);
repaired as usual it reached HM 37.2 where the zero-shot model has 62.7. Ties count as no gain: the margin
that separates a real gain is small (Tiny-ImageNet CoOp gains 1.6 points), so none is added.

It catches a fine-tune that gained nothing on its own shots, not every failed one: on another processor the same
seed's fine-tune failed alike (42 % base, 20 % novel on test) yet scored 67.5 % on its shots against zero-shot's
55.0 %, so it was repaired as usual (benchmarks/DEFAULTS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from repair.data.features import Features
from repair.errors import IncompatibleCheckpointError
from repair.kinds.base import Kind
from repair.train.curvature import AtZeroShot
from repair.train.loop import accuracy

IF_NO_GAIN = ("zero-shot", "repair")  # what a repair writes for a checkpoint that gained nothing: see below


@dataclass(frozen=True)
class TaskGain:
    """Accuracy on the repair images of the fine-tuned and the zero-shot model, and what the repair did about it."""

    finetuned: float
    zero_shot: float
    images: int
    action: str = "repair"  # "repair", or "zero-shot": the zero-shot weights were written instead

    @property
    def gained(self) -> bool:
        """Whether fine-tuning left the model better than zero-shot on these images (ties count as no gain)."""
        return self.finetuned > self.zero_shot

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return (f"the fine-tuned checkpoint scores {100 * self.finetuned:.1f} % on the {self.images} repair images, "
                f"zero-shot {100 * self.zero_shot:.1f} %")


def no_zero_shot_point(kind: Kind) -> str | None:
    """Why the kind cannot score as zero-shot CLIP (a random-init prompt of another length); None where it can."""
    if kind.zero_shot_model() is not None:
        return None
    try:
        kind.zero_shot_values()
    except IncompatibleCheckpointError as error:
        return str(error)
    return None


@torch.no_grad()
def measure_task_gain(kind: Kind, data: Features) -> TaskGain:
    """Both accuracies on ``data``; ``kind`` is left at the values it came with. Draws no random numbers, so a
    run that goes on to repair is the same as without the measurement."""
    batch_size = 64 if kind.input_kind == "pixels" else 1024  # pixels run the image tower: keep activations small
    finetuned = accuracy(kind, data, batch_size)
    with kind.zero_shot_model() or AtZeroShot(kind):
        zero_shot = accuracy(kind, data, batch_size)
    return TaskGain(finetuned=finetuned, zero_shot=zero_shot, images=len(data))


def can_write_zero_shot(kind: Kind) -> bool:
    """Whether the kind's own tensors can hold the zero-shot model (not so where zero-shot means insertions off)."""
    return kind.zero_shot_model() is None
