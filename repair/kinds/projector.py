"""The image projection alone (ProLIP): ``visual.proj [width, embed_dim]`` was fine-tuned, nothing else.

Everything before the projection is the frozen pretrained image tower, so its output (the pooled,
``ln_post``-normalised token, "pre-projection features") is encoded once and cached like any image
feature: the tower runs with ``proj`` set to the identity, which open_clip's ``x @ proj`` then leaves
as it is. Scores are ``normalize(f @ P) . T`` with the frozen zero-shot class features ``T``; the
path term interpolates ``P`` itself (exact, and as cheap as a matmul per point). The zero-shot point
is the pretrained projection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Kind, KindOptions, KindOutput, RepairDefaults, logit_scale_option, model_key
from repair.model.backbone import Backbone, ImageEncoder

PROJ = "visual.proj"


def find_projection(tensor_file: TensorFile) -> str | None:
    """The file's ``visual.proj`` (any wrapper prefix), when it is the only tensor there."""
    keys = [key for key in tensor_file.tensors if model_key(key) == PROJ]
    return keys[0] if len(keys) == 1 and len(tensor_file.tensors) == 1 else None


@dataclass(frozen=True)
class ProjectorOptions(KindOptions):
    logit_scale: float | None = logit_scale_option()


class VisualProjector(Kind):
    """ProLIP: only the image tower's final projection was fine-tuned."""

    name: ClassVar[str] = "projector"
    Options: ClassVar[type[KindOptions]] = ProjectorOptions
    about: ClassVar[About] = About(
        title="visual projector", description="visual projector (ProLIP)",
        trained_tensors="`visual.proj` [width, embed_dim] alone (any wrapper prefix)",
        scores_unseen_classes=True)  # the text tower is CLIP's own: any class name
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="l2", lam_zs=1.0)  # ProLIP's L2 towards w_zs

    def __init__(self, backbone: Backbone, projection: torch.Tensor, classnames: Sequence[str],
                 templates: Sequence[str], options: ProjectorOptions | None = None, *, key: str = PROJ) -> None:
        pretrained = getattr(backbone.model.visual, "proj", None)
        if not isinstance(pretrained, nn.Parameter):
            raise IncompatibleCheckpointError(
                f"this image tower ({backbone.describe_towers()['image']}) has no visual.proj matrix; the projector "
                "kind needs open_clip's ViT")
        if projection.shape != pretrained.shape or not torch.is_floating_point(projection):
            raise IncompatibleCheckpointError(f"{key} has shape {list(projection.shape)}; this model's visual.proj is "
                                              f"{list(pretrained.shape)}")
        super().__init__(backbone, classnames, templates, options)
        self.scale = float(self.options.logit_scale if self.options.logit_scale is not None else backbone.logit_scale)
        self.key, self.input_dtype = key, projection.dtype
        self.proj = nn.Parameter(projection.detach().to(backbone.device, torch.float32).clone())
        self.register_buffer("proj_ft", self.proj.detach().clone(), persistent=False)
        self.register_buffer("proj_zs", pretrained.detach().float().clone(), persistent=False)
        self._classes: dict[tuple[str, ...], torch.Tensor] = {}
        self.zs_text = self._class_features(self.classnames)

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return find_projection(tensor_file) is not None

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return [key for key in tensor_file.tensors if model_key(key) == PROJ][:1]

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: ProjectorOptions | None = None) -> VisualProjector:
        keys = cls.trainable_keys(tensor_file)
        if not keys:
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no visual.proj tensor")
        return cls(backbone, tensor_file.tensors[keys[0]], classnames, templates, options, key=keys[0])

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: ProjectorOptions | None = None) -> VisualProjector:
        return cls(backbone, backbone.model.visual.proj.detach(), classnames, templates, options)

    # ------------------------------------------------------------------ encoding

    @property
    def input_kind(self) -> str:
        return "raw-features"  # pre-projection features, unnormalised

    def image_encoder(self) -> ImageEncoder:
        """The frozen tower up to (not including) the projection; one cache entry for every projector."""
        visual = self.backbone.model.visual
        identity = {"proj": torch.eye(visual.proj.shape[0], device=self.backbone.device)}
        fingerprint = hashlib.sha256(f"{self.backbone.visual_fingerprint} pre-projection".encode()).hexdigest()
        return ImageEncoder(fingerprint, lambda pixels: torch.func.functional_call(
            visual, identity, (pixels.to(self.backbone.device),), strict=False).float())

    def _class_features(self, classnames: Sequence[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._classes:
            self._classes[key] = self.backbone.zero_shot_classifier(list(key), self.templates)
        return self._classes[key]

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        text = self.zs_text
        logits = self.scale * F.normalize(inputs @ self.proj, dim=-1) @ text.t()
        path_logits = None
        if path_ts is not None:
            ts = path_ts.to(inputs).view(-1, 1, 1)
            projections = self.proj_ft + ts * (self.proj - self.proj_ft)
            images = F.normalize(torch.einsum("bw,kwe->kbe", inputs, projections), dim=-1)
            path_logits = self.scale * images @ text.t()
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        return self.scale * F.normalize(features @ self.proj, dim=-1) @ self._class_features(classnames).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def unsupported_surrogates(self) -> dict[str, str]:
        return {"feature": "the text tower is frozen, so the class features never leave the zero-shot ones"}

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        return {"proj": self.proj_zs}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {"proj": self.proj_ft}

    def export(self) -> dict[str, torch.Tensor]:
        return {self.key: self.proj.detach().cpu().to(self.input_dtype)}

    def describe(self) -> dict[str, object]:
        return {"shape": list(self.proj.shape), "input_dtype": str(self.input_dtype).removeprefix("torch.")}
