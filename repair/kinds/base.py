"""What every checkpoint kind provides to the objective, the loop and evaluation.

A kind wraps the trainable tensors ``w`` of one fine-tuning method around the frozen
backbone. It starts at the fine-tuned values ``w_ft``, knows its zero-shot endpoint
``w_zs``, scores inputs at ``w`` and along the straight path ``w_ft -> w``, and exports
tensors with the names, shapes and dtypes the input file had.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from repair.backbone import ImageEncoder
from repair.checkpoints import TensorFile


@dataclass
class KindOutput:
    """One forward pass: logits at ``w``, along the path, and the class features used."""

    logits: torch.Tensor  # [B, C]
    path_logits: torch.Tensor | None  # [K, B, C] at w_ft + t_k (w - w_ft)
    class_features: torch.Tensor  # [C, E] normalised, at w


class Kind(nn.Module, ABC):
    """Base class; a new kind is one module under ``repair/kinds`` plus one registry line."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        """Whether a file looks like this kind (used by detection; metadata wins when present)."""

    @classmethod
    @abstractmethod
    def trainable_keys(cls, tensor_file: TensorFile) -> list[str]:
        """Names of the file's tensors this kind trains (what ``inspect`` reports)."""

    @abstractmethod
    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        """Score image features (or pixels when ``needs_pixels``) over the training classes."""

    @abstractmethod
    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Score image features over any class list (novel classes too, where the kind can)."""

    @abstractmethod
    def zero_shot_class_features(self) -> torch.Tensor:
        """[C, E] normalised class features of the zero-shot model: the feature surrogate's anchor."""

    @abstractmethod
    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        """``w_zs`` for each trainable tensor (same keys as ``trainable()``)."""

    @abstractmethod
    def finetuned_values(self) -> dict[str, torch.Tensor]:
        """``w_ft``: the values the run started from."""

    @abstractmethod
    def export(self) -> dict[str, torch.Tensor]:
        """The tensors to write: the input's names, shapes and dtypes, current values."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """Kind-specific facts recorded in metadata (n_ctx, class-specific, ...)."""

    @property
    def input_kind(self) -> str:
        """What ``forward`` takes: 'features' (normalised), 'raw-features', or 'pixels' (the image tower trains)."""
        return "features"

    def image_encoder(self) -> ImageEncoder | None:
        """The image tower this checkpoint scores with, when it is not the backbone's frozen one."""
        return None

    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def num_trainable(self) -> int:
        return sum(parameter.numel() for parameter in self.trainable().values())

    @torch.no_grad()
    def load_values(self, values: dict[str, torch.Tensor]) -> None:
        """Set ``w`` (used to start from ``w_zs`` and to restore the selected epoch)."""
        for name, parameter in self.trainable().items():
            parameter.copy_(values[name].to(parameter))

    @torch.no_grad()
    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: parameter.detach().clone() for name, parameter in self.trainable().items()}
