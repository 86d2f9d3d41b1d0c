"""Kinds whose trainable tensors set some of the backbone's own weights: LoRA adapters, a whole image tower.

Such a kind says which model weights its values give (:meth:`ModelWeightsKind.model_weights`, by their
open_clip names, e.g. ``visual.transformer.resblocks.0.attn.in_proj_weight``); everything else is done
here once. The towers run with those weights swapped in (``torch.func.functional_call``); a tower the
kind does not touch stays the backbone's frozen one, so a text-only adapter trains on cached image
features and a vision adapter on pixels.

The path term runs in one of two spaces:

- ``weight``: the straight line in the model's weights, ``W_ft + t (W - W_ft)`` at every point, one
  tower pass per point, each checkpointed so that only one point's activations are alive in backward;
- ``feature``: the fine-tuned towers' features (image features from one no-grad pass at ``W_ft`` per
  batch, class features once) interpolated with the current ones: no extra pass with grad.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from repair.errors import IncompatibleCheckpointError
from repair.kinds.base import Kind, KindOutput, PathSpace
from repair.model.backbone import ImageEncoder

Weights = dict[str, torch.Tensor]


class ModelWeightsKind(Kind):
    """Base for kinds whose values are (or parametrise) open_clip weights; see the module docstring."""

    path_space: PathSpace

    def _init_weights(self, ft: Weights | None = None) -> None:
        """Call at the end of a subclass's ``__init__``, once its parameters exist. ``ft``: the fine-tuned
        weights when the subclass holds them already (no second copy of a whole tower)."""
        prefix = self.backbone.text.prefix
        if ft is None:
            with torch.no_grad():
                ft = {name: value.detach().clone() for name, value in self.model_weights().items()}
        foreign = [name for name in ft if not name.startswith((prefix, "visual."))]
        if foreign:
            raise IncompatibleCheckpointError(
                f"{self.about.description} sets {foreign[0]}, which is in neither the image tower (visual.) nor "
                f"the text tower ({prefix}); mergetune trains tower weights only")
        self.ft_weights: Weights = ft
        self.touches_text = any(name.startswith(prefix) for name in ft)
        self.touches_image = any(name.startswith("visual.") for name in ft)
        self._tokens: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._zero_shot: dict[tuple[str, ...], torch.Tensor] = {}
        with torch.no_grad():
            self.zs_text = self.backbone.zero_shot_classifier(self.classnames, self.templates)
            self.ft_text = self._class_features(ft, self.classnames)

    @abstractmethod
    def model_weights(self) -> Weights:
        """The model weights this checkpoint sets, at its current values (differentiable), by open_clip name."""

    # ------------------------------------------------------------------ towers

    def _split(self, weights: Weights) -> tuple[Weights, Weights]:
        prefix = self.backbone.text.prefix
        text = {name.removeprefix(prefix): value for name, value in weights.items() if name.startswith(prefix)}
        image = {name.removeprefix("visual."): value for name, value in weights.items() if name.startswith("visual.")}
        return text, image

    def _class_features(self, weights: Weights, classnames: Sequence[str]) -> torch.Tensor:
        """[C, E] normalised template-mean class features with these text weights (zero-shot if it sets none)."""
        key = tuple(classnames)
        text_weights, _ = self._split(weights)
        if not text_weights:
            if key not in self._zero_shot:
                self._zero_shot[key] = self.backbone.zero_shot_classifier(list(key), self.templates)
            return self._zero_shot[key]
        if key not in self._tokens:
            captions = [template.format(name) for name in key for template in self.templates]
            self._tokens[key] = self.backbone.text.cut(self.backbone.tokenize(captions))
        tokens, pooling = self._tokens[key]
        text = self.backbone.text
        features = text.encode_embeddings(text.embed(tokens), pooling, text_weights).float()
        features = F.normalize(features, dim=-1).view(len(key), len(self.templates), -1)
        return F.normalize(features.mean(dim=1), dim=-1)

    def _raw_image_features(self, weights: Weights, pixels: torch.Tensor) -> torch.Tensor:
        _, image_weights = self._split(weights)
        return torch.func.functional_call(self.backbone.model.visual, image_weights, (pixels,), strict=False).float()

    def _image_features(self, weights: Weights, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised image features: from pixels through this tower, or the given (frozen-tower) features."""
        if not self.touches_image:
            return inputs
        return F.normalize(self._raw_image_features(weights, inputs), dim=-1)

    @property
    def input_kind(self) -> str:
        return "pixels" if self.touches_image else "features"

    def image_encoder(self) -> ImageEncoder | None:
        """This checkpoint's image tower for evaluation, keyed by its weights; None when it is the backbone's."""
        if not self.touches_image:
            return None
        with torch.no_grad():
            weights = {name: value.detach() for name, value in self.model_weights().items()
                       if name.startswith("visual.")}
        digest = hashlib.sha256(self.backbone.visual_fingerprint.encode())
        for name in sorted(weights):
            digest.update(name.encode())
            digest.update(weights[name].to("cpu", torch.float32).contiguous().numpy().tobytes())
        return ImageEncoder(digest.hexdigest(), lambda pixels: self._raw_image_features(weights, pixels))

    # ------------------------------------------------------------------ Kind protocol

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        weights = self.model_weights()
        images = self._image_features(weights, inputs)
        text = self._class_features(weights, self.classnames)
        logits = self.scale * images @ text.t()
        path_logits = None
        if path_ts is not None:
            path_logits = (self._feature_path(inputs, images, text, path_ts) if self.path_space is PathSpace.feature
                           else self._weight_path(inputs, weights, path_ts))
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def _feature_path(self, inputs: torch.Tensor, images: torch.Tensor, text: torch.Tensor,
                      path_ts: torch.Tensor) -> torch.Tensor:
        ts = path_ts.to(images).view(-1, 1, 1)
        if self.touches_image:
            with torch.no_grad():  # the tower at W_ft: no graph, no activations kept
                images_ft = self._image_features(self.ft_weights, inputs)
            path_images = F.normalize(images_ft + ts * (images - images_ft), dim=-1)
        else:
            path_images = images.expand(len(ts), *images.shape)
        path_text = F.normalize(self.ft_text + ts * (text - self.ft_text), dim=-1)
        return self.scale * torch.einsum("kbe,kce->kbc", path_images, path_text)

    def _weight_path(self, inputs: torch.Tensor, weights: Weights, path_ts: torch.Tensor) -> torch.Tensor:
        names = list(weights)

        def score(t: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
            point = {name: ft + t * (value - ft) for name, ft, value in
                     zip(names, (self.ft_weights[name] for name in names), values)}
            return self.scale * self._image_features(point, inputs) @ self._class_features(point, self.classnames).t()

        return along_path(score, path_ts.to(inputs.device, torch.float32), list(weights.values()))

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``features`` come from :meth:`image_encoder` when this checkpoint sets image weights."""
        return self.scale * features @ self._class_features(self.model_weights(), classnames).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def unsupported_surrogates(self) -> dict[str, str]:
        if self.touches_text:
            return {}
        return {"feature": "it sets no text weights, so its class features never leave the zero-shot ones"}


def along_path(score: Callable[..., torch.Tensor], path_ts: torch.Tensor, values: Sequence[torch.Tensor]
               ) -> torch.Tensor:
    """``[K, B, C]``: ``score(t, *values)`` at each path point, one point at a time. With grad enabled each
    point is checkpointed (recomputed in backward), so only one point's activations are ever alive: the
    path costs K more tower passes, not K times the memory."""
    points = []
    for t in path_ts:
        if torch.is_grad_enabled():
            points.append(checkpoint(score, t, *values, use_reentrant=False))
        else:
            points.append(score(t, *values))
    return torch.stack(points)
