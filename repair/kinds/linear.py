"""Linear probes: a head ``weight [n_cls, d]`` (+ ``bias [n_cls]``) on the image features.

Logits are linear in the head, so the path term interpolates the head exactly and cheaply.
The zero-shot endpoint is the zero-shot classifier itself: the classes' template text
features, in the same units as the head (see ``head_scale``).
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
from repair.kinds.base import About, Claims, HeadFeatures, Kind, KindOptions, KindOutput, RepairDefaults
from repair.kinds.base import Schedule, backbone_copies, logit_scale_option, model_key, option
from repair.model.backbone import Backbone

SKLEARN_EXTRAS = ("classes_", "n_iter_", "n_features_in_")  # saved beside coef_ / intercept_ by LogisticRegression
HEAD_NAMES = ("weight", "head.weight", "fc.weight", "classifier.weight", "linear.weight", "coef_")


def find_head(tensor_file: TensorFile, key_prefix: str | None = None) -> tuple[str, str | None] | None:
    """(weight key, bias key or None) of a linear head, under any prefix; ``key_prefix`` pins it."""
    tensors = tensor_file.tensors
    if key_prefix is not None:
        weight = f"{key_prefix}weight" if f"{key_prefix}weight" in tensors else f"{key_prefix}coef_"
        return (weight, _bias_key(tensors, weight)) if weight in tensors else None
    for name in HEAD_NAMES:
        candidates = sorted((key for key in tensors if _is_head_key(key, name)), key=len)
        for key in candidates:
            if tensors[key].dim() == 2:
                return key, _bias_key(tensors, key)
    return None


def _is_head_key(key: str, name: str) -> bool:
    """``weight`` only at the top level (after wrapper prefixes); ``head.weight`` etc. anywhere."""
    key = model_key(key)
    return key == name or (name != "weight" and key.endswith("." + name))


def implied_head_scale(weight: torch.Tensor, backbone: Backbone) -> float:
    """The scale a head's logits get. Heads initialised from CLIP text features have unit rows and need CLIP's
    temperature; heads trained freely (or stored times the logit scale, as WiSE-FT's) carry their own.
    Decided by the rows' typical norm."""
    typical_norm = float(weight.float().norm(dim=1).median())
    return backbone.logit_scale if typical_norm < backbone.logit_scale ** 0.5 else 1.0


def _bias_key(tensors: dict[str, torch.Tensor], weight_key: str) -> str | None:
    stem = weight_key[: -len("coef_")] + "intercept_" if weight_key.endswith("coef_") else weight_key[:-6] + "bias"
    return stem if stem in tensors and tensors[stem].dim() == 1 else None


@dataclass(frozen=True)
class LinearOptions(KindOptions):
    key_prefix: str | None = option(None, "Linear heads: the head's prefix in a state dict, e.g. 'head.' for "
                                    "head.weight.", stages=("repair", "eval", "path", "load"))
    head_features: HeadFeatures = option(HeadFeatures.normalized, "Linear heads: trained on 'normalized' or "
                                         "'raw' image features.")
    logit_scale: float | None = logit_scale_option()


class LinearHead(Kind):
    """A linear classifier on frozen CLIP image features."""

    name: ClassVar[str] = "linear"
    Options: ClassVar[type[KindOptions]] = LinearOptions
    about: ClassVar[About] = About(
        title="linear probe", description="linear-probe head",
        trained_tensors="`weight` [n_cls, dim] (+ `bias`), any prefix; sklearn `coef_`/`intercept_`")
    defaults: ClassVar[RepairDefaults] = RepairDefaults(  # benchmarks/DEFAULTS.md
        surrogate="fisher", lam_zs=10.0, schedule=Schedule(steps=100, batch_size=128, step_size=0.02))

    def __init__(self, backbone: Backbone, weight: torch.Tensor, bias: torch.Tensor | None,
                 classnames: Sequence[str], templates: Sequence[str], options: LinearOptions | None = None, *,
                 weight_key: str = "weight", bias_key: str | None = "bias") -> None:
        self._check_shapes(backbone, weight, bias, classnames)
        super().__init__(backbone, classnames, templates, options)
        options = self.options
        self.weight_key, self.bias_key = weight_key, bias_key
        self.input_dtype = weight.dtype
        self.normalize_features = options.head_features is HeadFeatures.normalized
        logit_scale = options.logit_scale
        self.scale = float(logit_scale) if logit_scale is not None else implied_head_scale(weight, backbone)
        device = backbone.device
        self.weight = nn.Parameter(weight.detach().to(device, torch.float32).clone())
        initial_bias = bias if bias is not None else torch.zeros(len(classnames))
        self.bias = nn.Parameter(initial_bias.detach().to(device, torch.float32).clone())
        self.has_bias = bias is not None
        self.bias.requires_grad_(self.has_bias)
        self.register_buffer("weight_ft", self.weight.detach().clone(), persistent=False)
        self.register_buffer("bias_ft", self.bias.detach().clone(), persistent=False)
        with torch.no_grad():
            zero_shot = backbone.zero_shot_classifier(self.classnames, templates)
        self.register_buffer("zs_features", zero_shot, persistent=False)
        # in the head's own units: logits = scale * f @ W.T must equal CLIP's logit_scale * f @ Z.T
        self.register_buffer("weight_zs", zero_shot * (backbone.logit_scale / self.scale), persistent=False)

    @staticmethod
    def _check_shapes(backbone: Backbone, weight: torch.Tensor, bias: torch.Tensor | None,
                      classnames: Sequence[str]) -> None:
        expected = [len(classnames), backbone.embed_dim]
        if list(weight.shape) != expected:
            raise IncompatibleCheckpointError(
                f"linear head weight has shape {list(weight.shape)}; expected {expected} "
                f"({len(classnames)} classes x the model's {backbone.embed_dim}-d image features)"
            )
        if bias is not None and list(bias.shape) != [len(classnames)]:
            raise IncompatibleCheckpointError(f"linear head bias has shape {list(bias.shape)}; expected "
                                              f"[{len(classnames)}]")

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return find_head(tensor_file) is not None

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        found = find_head(tensor_file, getattr(options, "key_prefix", None))
        return [key for key in found if key] if found else []

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """The head trained; scikit-learn's bookkeeping arrays ignored; copies of CLIP's weights frozen."""
        trained = cls.trainable_keys(tensor_file, options)
        ignored = {key: "scikit-learn's bookkeeping, not weights" for key in tensor_file.tensors
                   if key not in trained and model_key(key) in SKLEARN_EXTRAS}
        return Claims(trained=tuple(trained), ignored=ignored,
                      frozen=backbone_copies(list(tensor_file.tensors), [*trained, *ignored]))

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: LinearOptions | None = None) -> LinearHead:
        key_prefix = (options or LinearOptions()).key_prefix
        found = find_head(tensor_file, key_prefix)
        if found is None:
            keys = ", ".join(sorted(tensor_file.tensors)[:6]) or "none"
            where = f" under --key-prefix {key_prefix!r}" if key_prefix else ""
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no linear head weight{where} (tensors: {keys})")
        weight_key, bias_key = found
        bias = tensor_file.tensors[bias_key] if bias_key else None
        return cls(backbone, tensor_file.tensors[weight_key], bias, classnames, templates, options,
                   weight_key=weight_key, bias_key=bias_key)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: LinearOptions | None = None) -> LinearHead:
        """The zero-shot classifier as a head (unit rows, CLIP's temperature applied outside)."""
        head = backbone.zero_shot_classifier(list(classnames), templates)
        return cls(backbone, head, torch.zeros(len(classnames)), classnames, templates, options)

    @property
    def input_kind(self) -> str:
        return "features" if self.normalize_features else "raw-features"

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        logits = self.scale * inputs @ self.weight.t() + self.bias
        path_logits = None
        if path_ts is not None:  # logits are linear in (W, b): along the path they interpolate the endpoints'
            with torch.no_grad():
                logits_ft = self.scale * inputs @ self.weight_ft.t() + self.bias_ft
            ts = path_ts.to(inputs).view(-1, 1, 1)
            path_logits = logits_ft + ts * (logits - logits_ft)
        return KindOutput(logits=logits, path_logits=path_logits, class_features=F.normalize(self.weight, dim=-1))

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        self.check_can_score(classnames)
        return self(features).logits

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_features

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        values = {"weight": self.weight_zs, "bias": torch.zeros_like(self.bias)}
        return {name: values[name] for name in self.trainable()}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        values = {"weight": self.weight_ft, "bias": self.bias_ft}
        return {name: values[name] for name in self.trainable()}

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {self.weight_key: self.weight.detach().cpu().to(self.input_dtype)}
        if self.has_bias:
            tensors[self.bias_key or "bias"] = self.bias.detach().cpu().to(self.input_dtype)
        return tensors

    def describe(self) -> dict[str, object]:
        return {"head_scale": self.scale, "has_bias": self.has_bias, "weight_key": self.weight_key, "bias_key": self.bias_key,
                "input_dtype": str(self.input_dtype).removeprefix("torch.")}
