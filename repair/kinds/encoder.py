"""A fully fine-tuned image encoder (WiSE-FT, FLYP robust fine-tuning): every image-tower weight.

Every parameter of ``visual`` is trained, optionally with a linear classification head on the
normalised image features. With a head (WiSE-FT's ``ImageClassifier``), the head scores and is trained
too; its zero-shot point is the zero-shot classifier in the head's own units, as for the ``linear`` kind.
Without one (FLYP, or an encoder deployed with text prompts) the frozen text tower's template features
of the classes score, so it scores any class list. The zero-shot point of the tower is the backbone's
pretrained tower, so WiSE-FT's ``(1 - a) w_zs + a w_ft`` is exactly the straight line in these weights.

The path term runs in weight space by default: each point ``W_ft + t (W - W_ft)`` is one more pass of
the tower, checkpointed so that only one point's activations are alive
(:func:`~repair.kinds.weights.along_path`). ``--path-space feature`` is the cheap alternative: one
no-grad pass of the tower at ``W_ft`` per batch, interpolated in feature space. The fine-tuned weights
are the input file's own tensors (no second copy), and the zero-shot ones the backbone's.

Layouts read (the ``visual.`` names may sit under any prefix, e.g. ``module.`` or WiSE-FT's
``image_encoder.model.``): a file with only the image tower's tensors; a whole-module pickle of
WiSE-FT's ``ImageClassifier`` (read as data, see :mod:`repair.io.unpickle`) with
``classification_head.weight`` / ``bias``; a full open_clip state dict with ``--kind image-encoder``
(detection leaves full state dicts to CLIPFit, which reads them too). Text-tower tensors in the file are
kept in the output as they are; without a head they must equal the backbone's, since its text tower
scores. A CNN tower's BatchNorm running statistics are the file's and stay fixed (eval mode).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import CLIP_WEIGHT, About, Claims, KindOptions, KindOutput, PathSpace, RepairDefaults
from repair.kinds.base import backbone_name, logit_scale_option, option
from repair.kinds.clipfit import is_clipfit_name
from repair.kinds.linear import implied_head_scale
from repair.kinds.weights import ModelWeightsKind, Weights, along_path
from repair.model.backbone import Backbone

HEAD = "classification_head"  # WiSE-FT's (and task vectors') name for the head module
TEXT_SIDE = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "text.")
BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")
PROJ = "visual.proj"


# --------------------------------------------------------------------------- layouts (no model needed)


def visual_prefix(tensor_file: TensorFile) -> str | None:
    """What stands before ``visual.`` in the file's image-tower names ('' or e.g. 'image_encoder.model.')."""
    prefixes = Counter()
    for key in tensor_file.tensors:
        index = key.find("visual.")
        while index > 0 and key[index - 1] != ".":
            index = key.find("visual.", index + 1)
        if index >= 0:
            prefixes[key[:index]] += 1
    return prefixes.most_common(1)[0][0] if prefixes else None


def head_keys(tensor_file: TensorFile) -> tuple[str, str | None] | None:
    """(weight key, bias key or None) of a ``classification_head`` under any prefix."""
    tensors = tensor_file.tensors
    for key in sorted(tensors, key=len):
        if (key == f"{HEAD}.weight" or key.endswith(f".{HEAD}.weight")) and tensors[key].dim() == 2:
            bias = key[: -len("weight")] + "bias"
            return key, bias if bias in tensors and tensors[bias].dim() == 1 else None
    return None


def _tower_names(tensor_file: TensorFile, prefix: str) -> list[str]:
    return [key[len(prefix):] for key in tensor_file.tensors if key.startswith(prefix + "visual.")]


def holds_whole_tower(tensor_file: TensorFile) -> bool:
    """Image-tower weights beyond normalisation layers and the projection (CLIPFit's and ProLIP's tensors)."""
    prefix = visual_prefix(tensor_file)
    return prefix is not None and any(not is_clipfit_name(name) and name != "visual.proj"
                                      for name in _tower_names(tensor_file, prefix))


def _copy_name(key: str, prefix: str) -> str | None:
    """The backbone weight a tensor beside the image tower copies (the text tower, under the tower's prefix)."""
    if key.startswith(prefix) and CLIP_WEIGHT.match(key[len(prefix):]):
        return key[len(prefix):]
    return backbone_name(key)


def _holds_text_tower(tensor_file: TensorFile, prefix: str) -> bool:
    return any(key.startswith(prefix) and key[len(prefix):].startswith(TEXT_SIDE) for key in tensor_file.tensors)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ImageEncoderOptions(KindOptions):
    path_space: PathSpace = option(PathSpace.weight, "Image encoder: 'weight' (exact: one more tower pass per "
                                   "point) or 'feature' (one no-grad pass at w_ft).", stages=("repair",))
    logit_scale: float | None = logit_scale_option()
    classification_head: bool = option(False, "Image encoder: fine-tune a linear classification head with it "
                                       "(WiSE-FT); without one the text tower's class features score.",
                                       stages=("finetune",))


# --------------------------------------------------------------------------- the kind


class FullImageEncoder(ModelWeightsKind):
    """Every image-tower weight (+ an optional head on normalised features); see the module docstring."""

    name: ClassVar[str] = "image-encoder"
    Options: ClassVar[type[KindOptions]] = ImageEncoderOptions
    about: ClassVar[About] = About(
        title="full image encoder", description="fully fine-tuned image encoder (WiSE-FT / FLYP)",
        trained_tensors="every `visual.*` weight (any prefix, e.g. WiSE-FT's `image_encoder.model.visual.*`), "
                        "+ `classification_head.weight`/`bias` if present",
        scores_unseen_classes=True)  # without a head (see scores_other_classes)
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="l2", lam_zs=1.0)  # not benchmarked yet
    outranks: ClassVar[tuple[str, ...]] = ("clipfit",)  # CLIPFit matches on the tower's LayerNorms, cannot load these

    def __init__(self, backbone: Backbone, tower: dict[str, torch.Tensor],
                 head: tuple[torch.Tensor, torch.Tensor | None] | None, classnames: Sequence[str],
                 templates: Sequence[str], options: ImageEncoderOptions | None = None, *,
                 file_keys: dict[str, str] | None = None, passthrough: dict[str, torch.Tensor] | None = None,
                 borrowed: Sequence[str] = ()) -> None:
        super().__init__(backbone, classnames, templates, options)
        options = self.options
        self.path_space = options.path_space
        visual = backbone.model.visual
        device = backbone.device
        # ``borrowed``: tower weights the file lacks by design (a transformers CLIPVisionModel has no projection):
        # the backbone's, frozen, and never written
        self.borrowed = set(borrowed)
        own = {"visual." + name: value for name, value in visual.named_parameters()}
        tower = {**tower, **{name: own[name].detach() for name in self.borrowed}}
        self.names = [name for name in own if name not in self.borrowed]
        self._check_tower(tower, backbone)
        self.file_keys = file_keys or {}
        self.passthrough = passthrough or {}
        self.input_dtypes = {name: tower[name].dtype for name in self.names}
        self.params = nn.ParameterList([nn.Parameter(tower[name].detach().to(device, torch.float32).clone())
                                        for name in self.names])
        self.fixed = {name: value.to(device) for name, value in tower.items() if name not in self.names}  # BN stats
        self.zs = {name: parameter.detach() for name, parameter in visual.named_parameters(prefix="visual")}
        ft = {name: tower[name].detach().to(device, torch.float32) for name in self.names}  # the file's, if fp32
        self.has_head = head is not None
        if head is not None:
            weight, bias = head
            self._check_head(weight, bias, backbone, classnames)
            self.scale = float(options.logit_scale if options.logit_scale is not None
                               else implied_head_scale(weight, backbone))
            self.head_dtype = weight.dtype
            self.head_weight = nn.Parameter(weight.detach().to(device, torch.float32).clone())
            self.head_bias = nn.Parameter((bias if bias is not None else torch.zeros(len(classnames)))
                                          .detach().to(device, torch.float32).clone(), requires_grad=bias is not None)
            self.head_ft = (self.head_weight.detach().clone(), self.head_bias.detach().clone())
        else:
            self.scale = float(options.logit_scale if options.logit_scale is not None else backbone.logit_scale)
        self._init_weights({**ft, **self.fixed})
        if head is not None:  # in the head's units: scale * f @ W.T must equal CLIP's logit_scale * f @ Z.T
            self.head_zs = self.zs_text * (backbone.logit_scale / self.scale)

    @staticmethod
    def _check_tower(tower: dict[str, torch.Tensor], backbone: Backbone) -> None:
        expected = {"visual." + name: value for name, value in backbone.model.visual.state_dict().items()}
        params = {"visual." + name for name, _ in backbone.model.visual.named_parameters()}
        missing = [name for name in expected if name in params and name not in tower]
        if missing:
            raise IncompatibleCheckpointError(
                f"the file lacks {len(missing)} of this image tower's {len(params)} weights (e.g. {missing[0]}); "
                "a fully fine-tuned image encoder needs all of them")
        for name, value in tower.items():
            if name not in expected:
                raise IncompatibleCheckpointError(
                    f"{name} is not a tensor of this image tower ({backbone.describe_towers()['image']}); the file "
                    "belongs to another architecture")
            if value.shape != expected[name].shape:
                raise IncompatibleCheckpointError(
                    f"{name} has shape {list(value.shape)}; this model's is {list(expected[name].shape)}")
            if name in params and not torch.is_floating_point(value):
                raise IncompatibleCheckpointError(f"{name} has dtype {value.dtype}; expected floating point")

    @staticmethod
    def _check_head(weight: torch.Tensor, bias: torch.Tensor | None, backbone: Backbone,
                    classnames: Sequence[str]) -> None:
        expected = [len(classnames), backbone.embed_dim]
        if list(weight.shape) != expected:
            raise IncompatibleCheckpointError(
                f"{HEAD}.weight has shape {list(weight.shape)}; expected {expected} ({len(classnames)} classes x the "
                f"model's {backbone.embed_dim}-d image features)")
        if bias is not None and list(bias.shape) != [len(classnames)]:
            raise IncompatibleCheckpointError(f"{HEAD}.bias has shape {list(bias.shape)}; expected [{len(classnames)}]")

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        """A whole image tower with a classification head, or without any text-tower tensors beside it; or a
        transformers CLIP folder (fine-tuned whole image towers are what is saved that way)."""
        if not holds_whole_tower(tensor_file):
            return False
        if tensor_file.layout.name == "hf-clip":
            return True
        return head_keys(tensor_file) is not None or not _holds_text_tower(tensor_file, visual_prefix(tensor_file))

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        prefix = visual_prefix(tensor_file)
        if prefix is None:
            return []
        keys = [prefix + name for name in _tower_names(tensor_file, prefix) if not name.endswith(BUFFER_SUFFIXES)]
        head = head_keys(tensor_file)
        return keys + ([key for key in head if key] if head else [])

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """The image tower (and head) trained, a CNN's BatchNorm statistics fixed; the text tower beside it frozen
        (compared with the backbone's, whose text tower scores) or, with a head, ignored (the head scores)."""
        prefix = visual_prefix(tensor_file)
        if prefix is None:
            return Claims(trained=())
        trained = cls.trainable_keys(tensor_file, options)
        fixed = [prefix + name for name in _tower_names(tensor_file, prefix) if name.endswith(BUFFER_SUFFIXES)]
        others = [key for key in tensor_file.tensors if key not in {*trained, *fixed}]
        copies = {key: name for key in others if (name := _copy_name(key, prefix)) is not None}
        if head_keys(tensor_file) is not None:
            ignored = {key: "its text tower: the classification head scores, not the text features" for key in copies}
            return Claims(trained=tuple(trained), fixed=tuple(fixed), ignored=ignored)
        return Claims(trained=tuple(trained), fixed=tuple(fixed), frozen=copies)

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: ImageEncoderOptions | None = None) -> FullImageEncoder:
        prefix = visual_prefix(tensor_file)
        if prefix is None:
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no image-tower tensors (visual.*)")
        tower = {name: tensor_file.tensors[prefix + name] for name in _tower_names(tensor_file, prefix)}
        file_keys = {name: prefix + name for name in tower}
        found = head_keys(tensor_file)
        head = None
        if found is not None:
            weight_key, bias_key = found
            normalize = tensor_file.values.get(weight_key[: -len("weight")] + "normalize", True)
            if normalize is not True:
                raise IncompatibleCheckpointError(
                    f"{tensor_file.path}: its {HEAD} works on unnormalised image features (normalize={normalize!r}); "
                    "mergetune reads heads on normalised features for this kind")
            head = (tensor_file.tensors[weight_key], tensor_file.tensors[bias_key] if bias_key else None)
            file_keys.update({"head_weight": weight_key, **({"head_bias": bias_key} if bias_key else {})})
        used = set(file_keys.values())
        passthrough = {key: tensor for key, tensor in tensor_file.tensors.items() if key not in used}
        borrowed = [PROJ] if tensor_file.layout.name == "hf-clip" and prefix + PROJ not in tensor_file.tensors else []
        return cls(backbone, tower, head, classnames, templates, options, file_keys=file_keys, passthrough=passthrough,
                   borrowed=borrowed)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: ImageEncoderOptions | None = None) -> FullImageEncoder:
        """The pretrained tower (and, with ``classification_head``, the zero-shot classifier as a head)."""
        options = options or ImageEncoderOptions()
        tower = {name: tensor.detach() for name, tensor in backbone.model.visual.state_dict(prefix="visual.").items()}
        head = None
        keys = {name: name for name in tower}
        if options.classification_head:
            head = (backbone.zero_shot_classifier(list(classnames), templates), torch.zeros(len(classnames)))
            keys.update({"head_weight": f"{HEAD}.weight", "head_bias": f"{HEAD}.bias"})
        return cls(backbone, tower, head, classnames, templates, options, file_keys=keys)

    # ------------------------------------------------------------------ weights

    def model_weights(self) -> Weights:
        return {**dict(zip(self.names, self.params)), **self.fixed}

    def _head(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.head_weight, self.head_bias) if self.has_head else None

    def _logits(self, images: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor] | None,
                classnames: Sequence[str] | None = None) -> torch.Tensor:
        if head is not None:
            return self.scale * images @ head[0].t() + head[1]
        text = self.zs_text if classnames is None else self._class_features({}, classnames)
        return self.scale * images @ text.t()

    # ------------------------------------------------------------------ Kind protocol

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        weights = self.model_weights()
        images = self._image_features(weights, inputs)
        head = self._head()
        path_logits = None
        if path_ts is not None:
            path_logits = (self._feature_path_logits(inputs, images, path_ts) if self.path_space is PathSpace.feature
                           else self._weight_path_logits(inputs, weights, path_ts))
        class_features = F.normalize(head[0], dim=-1) if head is not None else self.zs_text
        return KindOutput(logits=self._logits(images, head), path_logits=path_logits, class_features=class_features)

    def _head_point(self, t: torch.Tensor, head: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        if head is None:
            return None
        (weight_ft, bias_ft), (weight, bias) = self.head_ft, head
        return weight_ft + t * (weight - weight_ft), bias_ft + t * (bias - bias_ft)

    def _feature_path_logits(self, inputs: torch.Tensor, images: torch.Tensor, path_ts: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the tower at W_ft: no graph, no activations kept
            images_ft = self._image_features(self.ft_weights, inputs)
        head = self._head()
        points = []
        for t in path_ts.to(images):
            point_images = F.normalize(images_ft + t * (images - images_ft), dim=-1)
            points.append(self._logits(point_images, self._head_point(t, head)))
        return torch.stack(points)

    def _weight_path_logits(self, inputs: torch.Tensor, weights: Weights, path_ts: torch.Tensor) -> torch.Tensor:
        def score(t: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
            tower = dict(zip(self.names, values))
            point = {**self.fixed, **{name: self.ft_weights[name] + t * (tower[name] - self.ft_weights[name])
                                      for name in self.names}}
            head = tuple(values[len(self.names):]) if self.has_head else None
            return self._logits(self._image_features(point, inputs), self._head_point(t, head))

        values = [weights[name] for name in self.names] + ([self.head_weight, self.head_bias] if self.has_head else [])
        return along_path(score, path_ts.to(inputs.device, torch.float32), values)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``features`` come from :meth:`image_encoder` (this checkpoint's tower, normalised)."""
        if self.has_head:
            self.check_can_score(classnames)
            return self._logits(features, self._head())
        return self._logits(features, None, classnames)

    def scores_other_classes(self) -> bool:
        return not self.has_head  # a head scores only its own classes

    def unsupported_surrogates(self) -> dict[str, str]:
        if self.has_head:
            return {}  # the feature term anchors the head's rows to the zero-shot class features
        return {"feature": "without a classification head its class features are the frozen text tower's, which "
                           "never leave the zero-shot ones"}

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        values = {f"params.{index}": self.zs[name] for index, name in enumerate(self.names)}
        if self.has_head:
            values.update({"head_weight": self.head_zs, "head_bias": torch.zeros_like(self.head_bias)})
        return {name: values[name] for name in self.trainable()}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        values = {f"params.{index}": self.ft_weights[name] for index, name in enumerate(self.names)}
        if self.has_head:
            values.update({"head_weight": self.head_ft[0], "head_bias": self.head_ft[1]})
        return {name: values[name] for name in self.trainable()}

    def export(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.passthrough)
        for name, parameter in zip(self.names, self.params):
            tensors[self.file_keys.get(name, name)] = parameter.detach().cpu().to(self.input_dtypes[name])
        for name, tensor in self.fixed.items():
            if name not in self.borrowed:
                tensors.setdefault(self.file_keys.get(name, name), tensor.cpu())
        if self.has_head:
            tensors[self.file_keys["head_weight"]] = self.head_weight.detach().cpu().to(self.head_dtype)
            if self.head_bias.requires_grad:
                tensors[self.file_keys["head_bias"]] = self.head_bias.detach().cpu().to(self.head_dtype)
        return tensors

    def describe(self) -> dict[str, Any]:
        prefix = self.file_keys[self.names[0]][: -len(self.names[0])] if self.names else ""
        details: dict[str, Any] = {"tensors": len(self.names), "prefix": prefix, "head": self.has_head,
                                   "input_dtype": str(self.input_dtypes[self.names[0]]).removeprefix("torch.")}
        if self.has_head:
            details.update({"head_scale": self.scale, "head_bias": bool(self.head_bias.requires_grad)})
        return details
