"""CLIPFit: the text blocks' ``mlp.c_proj.bias`` and every image-tower LayerNorm.

These are the model's own tensors, so the image tower runs inside the loop here. The path
term defaults to feature space: image features at ``w_ft`` come from one extra no-grad pass
per batch and the fine-tuned class features are computed once; ``--path-space weight`` runs
both towers at every interpolated point instead (exact, K times the cost).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.backbone import Backbone, ImageEncoder, cut_at_end_of_text, encode_token_embeddings
from repair.checkpoints import TensorFile
from repair.errors import IncompatibleCheckpointError
from repair.kinds.base import Kind, KindOutput

TEXT_BIAS = re.compile(r"^transformer\.resblocks\.\d+\.mlp\.c_proj\.bias$")
IMAGE_NORM = re.compile(r"^visual\.(ln_pre|ln_post|transformer\.resblocks\.\d+\.ln_[12])\.(weight|bias)$")
WRAPPER_PREFIXES = ("module.", "model.", "state_dict.", "clip_model.", "clip.")


def is_clipfit_name(name: str) -> bool:
    return bool(TEXT_BIAS.match(name) or IMAGE_NORM.match(name))


def model_key(file_key: str) -> str:
    """A file's tensor name as the open_clip model names it (wrapper prefixes removed)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if file_key.startswith(prefix):
                file_key, changed = file_key[len(prefix):], True
    return file_key


def clipfit_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters() if is_clipfit_name(name)]


class CLIPFit(Kind):
    name: ClassVar[str] = "clipfit"

    def __init__(
        self,
        backbone: Backbone,
        values: dict[str, torch.Tensor],
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        file_keys: dict[str, str] | None = None,
        passthrough: dict[str, torch.Tensor] | None = None,
        logit_scale: float | None = None,
        path_space: str = "feature",
        **_: object,
    ) -> None:
        super().__init__()
        model = backbone.model
        pretrained = dict(model.named_parameters())
        names = clipfit_names(model)
        self._check(values, names, pretrained)
        self.backbone = backbone
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.scale = float(logit_scale if logit_scale is not None else backbone.logit_scale)
        if path_space not in ("feature", "weight"):
            raise ValueError(f"path_space must be 'feature' or 'weight', not {path_space!r}")
        self.path_space = path_space
        self.names = names
        self.file_keys = file_keys or {name: name for name in names}
        self.passthrough = passthrough or {}
        self.input_dtypes = {name: values[name].dtype for name in names}
        self.params = nn.ParameterList(
            [nn.Parameter(values[name].detach().to(backbone.device, torch.float32).clone()) for name in names])
        self.ft = {name: values[name].detach().to(backbone.device, torch.float32).clone() for name in names}
        self.zs = {name: pretrained[name].detach().float().clone() for name in names}
        self.tuned = [name for name in names if not torch.equal(self.ft[name], self.zs[name])]
        self._prompts: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            self.ft_text = self._class_features(self.ft, self.classnames)
            self.zs_text = backbone.zero_shot_classifier(self.classnames, self.templates)

    @staticmethod
    def _check(values: dict[str, torch.Tensor], names: list[str], pretrained: dict[str, torch.Tensor]) -> None:
        if not names:
            raise IncompatibleCheckpointError("this model has no CLIPFit tensors (text c_proj biases, image LayerNorms)")
        missing = [name for name in names if name not in values]
        if missing:
            raise IncompatibleCheckpointError(
                f"CLIPFit checkpoint lacks {len(missing)} of the model's {len(names)} tensors (e.g. {missing[0]})")
        for name in names:
            if values[name].shape != pretrained[name].shape:
                raise IncompatibleCheckpointError(
                    f"{name} has shape {list(values[name].shape)}; the model's is {list(pretrained[name].shape)}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return any(is_clipfit_name(model_key(key)) for key in tensor_file.tensors)

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile) -> list[str]:
        return [key for key in tensor_file.tensors if is_clipfit_name(model_key(key))]

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], **options: object) -> CLIPFit:
        by_model_key = {model_key(key): key for key in tensor_file.tensors}
        values = {name: tensor_file.tensors[key] for name, key in by_model_key.items() if is_clipfit_name(name)}
        file_keys = {name: by_model_key[name] for name in values}
        passthrough = {key: tensor for key, tensor in tensor_file.tensors.items()
                       if not is_clipfit_name(model_key(key))}
        return cls(backbone, values, classnames, templates, file_keys=file_keys, passthrough=passthrough,
                   **options)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  **options: object) -> CLIPFit:
        values = {name: tensor.detach() for name, tensor in backbone.model.named_parameters()
                  if is_clipfit_name(name)}
        options = {key: value for key, value in options.items() if key in ("logit_scale", "path_space")}
        return cls(backbone, values, classnames, templates, **options)

    # ------------------------------------------------------------------ encoding

    def current(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params))

    def _split(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        text = {name.removeprefix("transformer."): v for name, v in values.items() if name.startswith("transformer.")}
        image = {name.removeprefix("visual."): v for name, v in values.items() if name.startswith("visual.")}
        return text, image

    def _tokens(self, classnames: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(classnames)
        if key not in self._prompts:
            captions = [template.format(name) for name in key for template in self.templates]
            tokens, eot = cut_at_end_of_text(self.backbone.model, self.backbone.tokenize(captions))
            self._prompts[key] = (tokens, eot)
        return self._prompts[key]

    def _class_features(self, values: dict[str, torch.Tensor], classnames: Sequence[str]) -> torch.Tensor:
        """[C, E] normalised template-mean class features with the given text biases."""
        text_params, _ = self._split(values)
        tokens, eot = self._tokens(classnames)
        model = self.backbone.model
        features = encode_token_embeddings(model, model.token_embedding(tokens), eot, text_params).float()
        features = F.normalize(features, dim=-1).view(len(classnames), len(self.templates), -1)
        return F.normalize(features.mean(dim=1), dim=-1)

    def _image_features(self, values: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
        _, image_params = self._split(values)
        raw = torch.func.functional_call(self.backbone.model.visual, image_params, (pixels,), strict=False)
        return F.normalize(raw.float(), dim=-1)

    def image_encoder(self) -> ImageEncoder:
        """This checkpoint's image tower, for evaluation; its own cache key."""
        values = {name: tensor.detach() for name, tensor in self.current().items()}
        digest = hashlib.sha256(self.backbone.visual_fingerprint.encode())
        for name in self.names:
            if name.startswith("visual."):
                digest.update(values[name].cpu().numpy().tobytes())
        _, image_params = self._split(values)
        visual = self.backbone.model.visual
        return ImageEncoder(digest.hexdigest(),
                            lambda pixels: torch.func.functional_call(visual, image_params, (pixels,), strict=False))

    # ------------------------------------------------------------------ Kind protocol

    @property
    def input_kind(self) -> str:
        return "pixels"

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        values = self.current()
        images = self._image_features(values, inputs)
        text = self._class_features(values, self.classnames)
        logits = self.scale * images @ text.t()
        path_logits = None
        if path_ts is not None:
            path_logits = (self._feature_path(inputs, images, text, path_ts) if self.path_space == "feature"
                           else self._weight_path(inputs, values, path_ts))
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def _feature_path(self, pixels: torch.Tensor, images: torch.Tensor, text: torch.Tensor,
                      path_ts: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images_ft = self._image_features(self.ft, pixels)
        ts = path_ts.to(images).view(-1, 1, 1)
        path_images = F.normalize(images_ft + ts * (images - images_ft), dim=-1)
        path_text = F.normalize(self.ft_text + ts * (text - self.ft_text), dim=-1)
        return self.scale * torch.einsum("kbe,kce->kbc", path_images, path_text)

    def _weight_path(self, pixels: torch.Tensor, values: dict[str, torch.Tensor],
                     path_ts: torch.Tensor) -> torch.Tensor:
        points = []
        for t in path_ts.tolist():
            point = {name: self.ft[name] + t * (values[name] - self.ft[name]) for name in self.names}
            points.append(self.scale * self._image_features(point, pixels)
                          @ self._class_features(point, self.classnames).t())
        return torch.stack(points)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``features`` must come from :meth:`image_encoder` (this checkpoint's image tower)."""
        return self.scale * features @ self._class_features(self.current(), classnames).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        return {f"params.{index}": self.zs[name] for index, name in enumerate(self.names)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {f"params.{index}": self.ft[name] for index, name in enumerate(self.names)}

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {key: tensor for key, tensor in self.passthrough.items()}
        for name, parameter in self.current().items():
            tensors[self.file_keys.get(name, name)] = parameter.detach().cpu().to(self.input_dtypes[name])
        return tensors

    def describe(self) -> dict[str, object]:
        return {"tensors": len(self.names), "tuned_in_input": len(self.tuned), "path_space": self.path_space,
                "full_state_dict": bool(self.passthrough)}
