"""TaskRes (geekyutao/TaskRes ``trainers/taskres.py``): a per-class residual on stored base text features.

TaskRes-Text's ``TaskResLearner`` holds ``base_text_features`` (a buffer: each class's text features,
the mean over its templates of the unnormalised features, computed once from the zero-shot CLIP, or
from an "enhanced" base) and trains ``text_feature_residuals`` of the same shape, initialised at zero.
The class features are ``normalize(base + alpha * residual)``, ``alpha`` the residual scale
(``TRAINER.TaskRes.RESIDUAL_SCALE``: not in the file; 1.0 by default upstream, its scripts pass e.g. 0.5,
so pass ``--residual-scale`` as trained). The trainer registers the learner alone as ``prompt_learner``
and casts the model to float, so its Dassl checkpoint holds both tensors in fp32.

The base is read and used as it is (it may not be what this backbone's templates give); zero residual is
the zero-shot point, so its class features are the feature surrogate's anchor. One residual per class: it
scores only its own classes. The path interpolates the residual (exact, one normalisation per point).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, Kind, KindOptions, KindOutput, RepairDefaults, backbone_copies
from repair.kinds.base import logit_scale_option, option
from repair.model.backbone import Backbone

BASE, RESIDUAL = "base_text_features", "text_feature_residuals"


def find_residual(tensor_file: TensorFile) -> tuple[str, str] | None:
    """(base key, residual key) of a TaskRes learner under any one prefix."""
    for key in sorted(tensor_file.tensors, key=len):
        if key == RESIDUAL or key.endswith("." + RESIDUAL):
            base = key[: -len(RESIDUAL)] + BASE
            if base in tensor_file.tensors:
                return base, key
    return None


@dataclass(frozen=True)
class TaskResOptions(KindOptions):
    residual_scale: float = option(1.0, "TaskRes: alpha in base + alpha * residual (TRAINER.TaskRes.RESIDUAL_SCALE; "
                                        "not stored in its files).")
    logit_scale: float | None = logit_scale_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 < self.residual_scale < float("inf")):
            raise ValueError(f"residual_scale must be a positive number, got {self.residual_scale}")


class TaskRes(Kind):
    """TaskRes-Text: ``text_feature_residuals`` on fixed ``base_text_features``; see the module docstring."""

    name: ClassVar[str] = "taskres"
    Options: ClassVar[type[KindOptions]] = TaskResOptions
    about: ClassVar[About] = About(
        title="TaskRes", description="TaskRes text-feature residual",
        trained_tensors="`text_feature_residuals` [n_cls, embed_dim] on the stored `base_text_features`")
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="feature", lam_zs=1.0)  # not benchmarked yet

    def __init__(self, backbone: Backbone, base: torch.Tensor, residual: torch.Tensor, classnames: Sequence[str],
                 templates: Sequence[str], options: TaskResOptions | None = None, *,
                 keys: tuple[str, str] = (BASE, RESIDUAL), fresh_base: bool = False) -> None:
        self._check(backbone, base, residual, classnames, keys)
        super().__init__(backbone, classnames, templates, options)
        self.scale = float(self.options.logit_scale if self.options.logit_scale is not None else backbone.logit_scale)
        self.alpha = float(self.options.residual_scale)
        self.keys, self.input_dtype, self.fresh_base = keys, residual.dtype, fresh_base
        device = backbone.device
        self.register_buffer("base", base.detach().to(device, torch.float32).clone(), persistent=False)
        self.base_dtype = base.dtype
        self.residual = nn.Parameter(residual.detach().to(device, torch.float32).clone())
        self.register_buffer("residual_ft", self.residual.detach().clone(), persistent=False)
        self.register_buffer("zs_features", F.normalize(self.base, dim=-1), persistent=False)

    @staticmethod
    def _check(backbone: Backbone, base: torch.Tensor, residual: torch.Tensor, classnames: Sequence[str],
               keys: tuple[str, str]) -> None:
        expected = [len(classnames), backbone.embed_dim]
        for key, tensor in zip(keys, (base, residual)):
            if list(tensor.shape) != expected:
                raise IncompatibleCheckpointError(
                    f"{key} has shape {list(tensor.shape)}; expected {expected} ({len(classnames)} classes x the "
                    f"model's {backbone.embed_dim}-d features; TaskRes-Image's [1, d] residual is not read)")
            if not torch.is_floating_point(tensor):
                raise IncompatibleCheckpointError(f"{key} has dtype {tensor.dtype}; expected floating point")

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return find_residual(tensor_file) is not None

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        found = find_residual(tensor_file)
        return [found[1]] if found else []

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """The residual trained, the stored base fixed (read and used as it is)."""
        found = find_residual(tensor_file)
        if found is None:
            return Claims(trained=())
        base, residual = found
        return Claims(trained=(residual,), fixed=(base,),
                      frozen=backbone_copies(list(tensor_file.tensors), [base, residual]))

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: TaskResOptions | None = None) -> TaskRes:
        found = find_residual(tensor_file)
        if found is None:
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no TaskRes tensors ({BASE}, {RESIDUAL})")
        base, residual = (tensor_file.tensors[key] for key in found)
        return cls(backbone, base, residual, classnames, templates, options, keys=found)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: TaskResOptions | None = None) -> TaskRes:
        """TaskRes's start: the base as ``_get_base_text_features`` computes it (the mean over templates of the
        unnormalised text features), a zero residual."""
        with torch.no_grad():
            features = [backbone.text.encode_tokens(backbone.tokenize([template.format(name) for name in classnames]))
                        for template in templates]
            base = torch.stack(features, dim=1).float().mean(dim=1)
        return cls(backbone, base, torch.zeros_like(base), classnames, templates, options, fresh_base=True)

    # ------------------------------------------------------------------ scoring

    def _class_features(self, residual: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.base + self.alpha * residual, dim=-1)

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        text = self._class_features(self.residual)
        logits = self.scale * inputs @ text.t()
        path_logits = None
        if path_ts is not None:
            ts = path_ts.to(inputs).view(-1, 1, 1)
            points = self._class_features(self.residual_ft + ts * (self.residual - self.residual_ft))
            path_logits = self.scale * torch.einsum("be,kce->kbc", inputs, points)
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        self.check_can_score(classnames)
        return self.scale * features @ self._class_features(self.residual).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_features

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        return {"residual": torch.zeros_like(self.residual)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {"residual": self.residual_ft}

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {self.keys[1]: self.residual.detach().cpu().to(self.input_dtype)}
        if self.fresh_base:  # a residual made here: its base is written too (a read file carries its own)
            tensors = {self.keys[0]: self.base.detach().cpu().to(self.base_dtype), **tensors}
        return tensors

    def describe(self) -> dict[str, object]:
        return {"classes": int(self.residual.shape[0]), "input_dtype": str(self.input_dtype).removeprefix("torch.")}
