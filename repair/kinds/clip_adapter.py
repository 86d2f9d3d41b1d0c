"""CLIP-Adapter (gaopengcuhk/CLIP-Adapter ``clip_adapter.py``): a bottleneck adapter on the image features.

The frozen image tower's feature ``f`` (before normalisation) goes through ``x = ReLU(fc.2(ReLU(fc.0(f))))``
(no biases) and is mixed back as ``r x + (1 - r) f``, ``r`` the residual ratio (0.2, hard-coded upstream);
the result is normalised and scored against the frozen text tower's class features, so any class list
can be scored. The trainer registers the adapter alone (``register_model('clip_adapter', model.adapter)``),
so its Dassl checkpoint holds ``fc.0.weight [c/4, c]`` and ``fc.2.weight [c, c/4]``, fp32 (the trainer
casts CLIP to float). Upstream hard-codes ``c = 1024`` (RN50's feature width); any ``c`` equal to the
model's embedding width is read.

Zero-shot point: zero weights (``x = 0``: ``(1 - r) f`` has the direction of ``f``). There both ReLUs
pass no gradient, so every term estimated from gradients at ``w_zs`` (the Fisher surrogates) is zero and
is refused; ``l2`` (towards zero weights) and ``distill`` (the zero-shot predictions) apply; ``feature`` is
refused (the class features are the frozen text tower's). Fine-tuning starts where upstream's does: ``nn.Linear``'s initialisation (seeded),
not at the zero-shot point, where no gradient would flow. The path interpolates the two weights (exact,
and cheap: the adapter runs once per point on cached features).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Kind, KindOptions, KindOutput, RepairDefaults, logit_scale_option, option
from repair.model.backbone import Backbone

DOWN, UP = "fc.0.weight", "fc.2.weight"
RATIO = 0.2  # upstream's `ratio` in CustomCLIP.forward
REDUCTION = 4  # upstream's Adapter(c_in, reduction=4)


def find_adapter(tensor_file: TensorFile) -> tuple[str, str] | None:
    """(down key, up key) of an adapter's ``fc.0.weight`` / ``fc.2.weight``, under any one prefix."""
    tensors = tensor_file.tensors
    for key in sorted(tensors, key=len):
        if key == DOWN or key.endswith("." + DOWN):
            up = key[: -len(DOWN)] + UP
            if up in tensors and tensors[key].dim() == 2 and tensors[up].dim() == 2:
                return key, up
    return None


@dataclass(frozen=True)
class CLIPAdapterOptions(KindOptions):
    residual_ratio: float = option(RATIO, "CLIP-Adapter: the share r of the adapted feature in r x + (1 - r) f "
                                          "(upstream: 0.2).")
    logit_scale: float | None = logit_scale_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.residual_ratio < 1.0:
            raise ValueError(f"residual_ratio must be in [0, 1), got {self.residual_ratio}")


class CLIPAdapter(Kind):
    """CLIP-Adapter: ``fc.0`` / ``fc.2`` on the frozen image features; see the module docstring."""

    name: ClassVar[str] = "clip-adapter"
    Options: ClassVar[type[KindOptions]] = CLIPAdapterOptions
    about: ClassVar[About] = About(
        title="CLIP-Adapter", description="CLIP-Adapter feature adapter",
        trained_tensors="`fc.0.weight` [c/4, c] and `fc.2.weight` [c, c/4] on the image features",
        scores_unseen_classes=True)  # the class features are the frozen text tower's: any class name
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="l2", lam_zs=1.0)  # the one that applies

    def __init__(self, backbone: Backbone, down: torch.Tensor, up: torch.Tensor, classnames: Sequence[str],
                 templates: Sequence[str], options: CLIPAdapterOptions | None = None, *,
                 keys: tuple[str, str] = (DOWN, UP)) -> None:
        self._check(backbone, down, up, keys)
        super().__init__(backbone, classnames, templates, options)
        self.scale = float(self.options.logit_scale if self.options.logit_scale is not None else backbone.logit_scale)
        self.ratio = float(self.options.residual_ratio)
        self.keys, self.input_dtype = keys, down.dtype
        device = backbone.device
        self.down = nn.Parameter(down.detach().to(device, torch.float32).clone())
        self.up = nn.Parameter(up.detach().to(device, torch.float32).clone())
        self.register_buffer("down_ft", self.down.detach().clone(), persistent=False)
        self.register_buffer("up_ft", self.up.detach().clone(), persistent=False)
        self._classes: dict[tuple[str, ...], torch.Tensor] = {}
        self.zs_text = self._class_features(self.classnames)

    @staticmethod
    def _check(backbone: Backbone, down: torch.Tensor, up: torch.Tensor, keys: tuple[str, str]) -> None:
        width = backbone.embed_dim
        hidden = down.shape[0]
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != width or list(up.shape) != [width, hidden]:
            raise IncompatibleCheckpointError(
                f"{keys[0]} {list(down.shape)} and {keys[1]} {list(up.shape)} are not an adapter on this model's "
                f"{width}-d image features; expected [h, {width}] and [{width}, h] (upstream: h = c / 4)")
        if not (torch.is_floating_point(down) and torch.is_floating_point(up)):
            raise IncompatibleCheckpointError(f"{keys[0]} has dtype {down.dtype}; expected floating point")

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return find_adapter(tensor_file) is not None

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        found = find_adapter(tensor_file)
        return list(found) if found else []

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: CLIPAdapterOptions | None = None) -> CLIPAdapter:
        found = find_adapter(tensor_file)
        if found is None:
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no adapter ({DOWN}, {UP})")
        down, up = (tensor_file.tensors[key] for key in found)
        return cls(backbone, down, up, classnames, templates, options, keys=found)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: CLIPAdapterOptions | None = None) -> CLIPAdapter:
        """Where upstream's fine-tuning starts: ``nn.Linear``'s initialisation, seeded (see the module docstring)."""
        width = backbone.embed_dim
        generator = torch.Generator().manual_seed(0)
        down, up = torch.empty(width // REDUCTION, width), torch.empty(width, width // REDUCTION)
        for weight in (down, up):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        return cls(backbone, down, up, classnames, templates, options)

    # ------------------------------------------------------------------ scoring

    @property
    def input_kind(self) -> str:
        return "raw-features"  # the image feature before normalisation, as the adapter sees it

    def _adapted(self, features: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        adapted = F.relu(F.relu(features @ down.t()) @ up.t())
        return F.normalize(self.ratio * adapted + (1.0 - self.ratio) * features, dim=-1)

    def _class_features(self, classnames: Sequence[str]) -> torch.Tensor:
        key = tuple(classnames)
        if key not in self._classes:
            self._classes[key] = self.backbone.zero_shot_classifier(list(key), self.templates)
        return self._classes[key]

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        text = self.zs_text
        logits = self.scale * self._adapted(inputs, self.down, self.up) @ text.t()
        path_logits = None
        if path_ts is not None:
            points = []
            for t in path_ts.to(inputs):
                down = self.down_ft + t * (self.down - self.down_ft)
                up = self.up_ft + t * (self.up - self.up_ft)
                points.append(self.scale * self._adapted(inputs, down, up) @ text.t())
            path_logits = torch.stack(points)
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        return self.scale * self._adapted(features, self.down, self.up) @ self._class_features(classnames).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        return {"down": torch.zeros_like(self.down), "up": torch.zeros_like(self.up)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {"down": self.down_ft, "up": self.up_ft}

    def unsupported_surrogates(self) -> dict[str, str]:
        dead = "at its zero-shot point (zero weights) both ReLUs pass no gradient, so the Fisher there is zero"
        return {"feature": "the class features are the frozen text tower's, which never leave the zero-shot ones",
                "fisher": dead, "fisher-vocab": dead, "fisher-dense": dead}

    def export(self) -> dict[str, torch.Tensor]:
        return {self.keys[0]: self.down.detach().cpu().to(self.input_dtype),
                self.keys[1]: self.up.detach().cpu().to(self.input_dtype)}

    def describe(self) -> dict[str, object]:
        return {"hidden": int(self.down.shape[0]), "input_dtype": str(self.input_dtype).removeprefix("torch.")}
