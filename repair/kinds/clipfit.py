"""CLIPFit: each text block's feed-forward output bias and every image-tower normalisation layer.

These are the model's own tensors, so the image tower runs inside the loop here. The path
term defaults to feature space: image features at ``w_ft`` come from one extra no-grad pass
per batch and the fine-tuned class features are computed once; ``--path-space weight`` runs
both towers at every interpolated point instead (exact, K times the cost).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, Kind, KindOptions, KindOutput, PathSpace, RepairDefaults
from repair.kinds.base import Schedule, backbone_copies, logit_scale_option, model_key, option
from repair.model.backbone import Backbone, ImageEncoder, TemplatePrompts
from repair.model.shared_prefix import CLASS_CHUNK

# By name alone (detection and inspect, without a model): each text block's feed-forward output bias
# (CLIP: mlp.c_proj; BERT-like Hugging Face towers: output.dense) and image normalisation layers.
TEXT_BIAS = re.compile(r"^(transformer\.resblocks\.\d+\.mlp\.c_proj|text\.transformer\.(encoder\.)?layers?\.\d+"
                       r"\.output\.dense)\.bias$")
IMAGE_NORM = re.compile(r"^visual\.(.+\.)?(ln_pre|ln_post|ln_[12]|ln|norm\w*|bn\w*)\.(weight|bias)$")
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def is_clipfit_name(name: str) -> bool:
    return bool(TEXT_BIAS.match(name) or IMAGE_NORM.match(name))


def clipfit_names(backbone: Backbone) -> list[str]:
    """The tensors CLIPFit trains in this model: every text block's feed-forward output bias, and the
    affine parameters of every normalisation layer of the image tower (LayerNorm in a ViT,
    BatchNorm / GroupNorm in a CNN, whose running statistics stay frozen: the model is in eval mode)."""
    text = {backbone.text.prefix + name for name in backbone.text.ffn_output_biases()}
    image = {f"visual.{module_name}.{tensor}" for module_name, module in backbone.model.visual.named_modules()
             if isinstance(module, NORM_LAYERS) for tensor in ("weight", "bias")
             if isinstance(getattr(module, tensor, None), nn.Parameter)}
    return [name for name, _ in backbone.model.named_parameters() if name in text | image]  # the model's order


@dataclass(frozen=True)
class CLIPFitOptions(KindOptions):
    path_space: PathSpace = option(PathSpace.feature, "Interpolate the path in 'feature' space (cheap) or "
                                   "'weight' space (exact, K more passes of both towers).", stages=("repair",))
    logit_scale: float | None = logit_scale_option()


class CLIPFit(Kind):
    """CLIPFit: a few native CLIP tensors (text MLP biases, image LayerNorms) were fine-tuned."""

    name: ClassVar[str] = "clipfit"
    Options: ClassVar[type[KindOptions]] = CLIPFitOptions
    about: ClassVar[About] = About(
        title="CLIPFit", description="CLIPFit (a few native CLIP parameters)",
        trained_tensors="`transformer.resblocks.N.mlp.c_proj.bias` + every `visual` LayerNorm (any wrapper prefix)",
        scores_unseen_classes=True)  # its text tower encodes any class name
    defaults: ClassVar[RepairDefaults] = RepairDefaults(  # benchmarks/DEFAULTS.md
        surrogate="fisher", lam_zs=1.0, schedule=Schedule(steps=40, batch_size=32, step_size=0.1))
    # the image tower runs in every step: fine-tuning's default is as short, on small batches
    finetune_schedule: ClassVar[Schedule] = Schedule(steps=40, batch_size=32, step_size=0.02)
    shared_prefix: bool = True  # each template's words before the class encoded once (repair.model.shared_prefix)
    text_chunk_size: int | None = CLASS_CHUNK  # classes per checkpointed text chunk; None: all at once
    cache_ft_images: bool = True  # the path term's image features at w_ft: computed once per image

    def __init__(self, backbone: Backbone, values: dict[str, torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], options: CLIPFitOptions | None = None, *, file_keys: dict[str, str] | None = None,
                 passthrough: dict[str, torch.Tensor] | None = None) -> None:
        model = backbone.model
        pretrained = dict(model.named_parameters())
        names = clipfit_names(backbone)
        self._check(values, names, pretrained)
        super().__init__(backbone, classnames, templates, options)
        options = self.options
        self.scale = float(options.logit_scale if options.logit_scale is not None else backbone.logit_scale)
        self.path_space = options.path_space
        self.names = names
        self.file_keys = file_keys or {name: name for name in names}
        self.passthrough = passthrough or {}
        self.input_dtypes = {name: values[name].dtype for name in names}
        self.params = nn.ParameterList(
            [nn.Parameter(values[name].detach().to(backbone.device, torch.float32).clone()) for name in names])
        self.ft = {name: values[name].detach().to(backbone.device, torch.float32).clone() for name in names}
        self.zs = {name: pretrained[name].detach().float().clone() for name in names}
        self.tuned = [name for name in names if not torch.equal(self.ft[name], self.zs[name])]
        self._prompts: dict[tuple[tuple[str, ...], bool], list[TemplatePrompts]] = {}
        self._ft_images: dict[bytes, torch.Tensor] = {}  # image content digest -> normalised feature at w_ft
        with torch.no_grad():
            self.ft_text = self._class_features(self.ft, self.classnames)
            self.zs_text = backbone.zero_shot_classifier(self.classnames, self.templates)

    @staticmethod
    def _check(values: dict[str, torch.Tensor], names: list[str], pretrained: dict[str, torch.Tensor]) -> None:
        if not names:
            raise IncompatibleCheckpointError("this model has no CLIPFit tensors (text feed-forward output biases, "
                                              "image normalisation layers)")
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
        if tensor_file.layout.name == "hf-clip":  # whole fine-tuned towers: the image-encoder kind reads those
            return False
        return any(is_clipfit_name(model_key(key)) for key in tensor_file.tensors)

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return [key for key in tensor_file.tensors if is_clipfit_name(model_key(key))]

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """Its tensors trained; in a full state dict every other CLIP weight frozen: compared with the backbone,
        so a fully fine-tuned CLIP is refused rather than repaired as CLIPFit with its other weights as-is. With
        the backbone, its own CLIPFit tensors (e.g. a CNN's downsampling BatchNorms, which names alone miss)."""
        if backbone is not None:
            wanted = set(clipfit_names(backbone))
            trained = [key for key in tensor_file.tensors if model_key(key) in wanted]
        else:
            trained = cls.trainable_keys(tensor_file, options)
        return Claims(trained=tuple(trained), frozen=backbone_copies(list(tensor_file.tensors), trained))

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: CLIPFitOptions | None = None) -> CLIPFit:
        wanted = set(clipfit_names(backbone))
        by_model_key = {model_key(key): key for key in tensor_file.tensors}
        values = {name: tensor_file.tensors[key] for name, key in by_model_key.items() if name in wanted}
        file_keys = {name: by_model_key[name] for name in values}
        passthrough = {key: tensor for key, tensor in tensor_file.tensors.items() if model_key(key) not in wanted}
        return cls(backbone, values, classnames, templates, options, file_keys=file_keys, passthrough=passthrough)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: CLIPFitOptions | None = None) -> CLIPFit:
        wanted = set(clipfit_names(backbone))
        values = {name: tensor.detach() for name, tensor in backbone.model.named_parameters() if name in wanted}
        return cls(backbone, values, classnames, templates, options)

    # ------------------------------------------------------------------ encoding

    def current(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.params))

    def _split(self, values: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        prefix = self.backbone.text.prefix
        text = {name.removeprefix(prefix): v for name, v in values.items() if name.startswith(prefix)}
        image = {name.removeprefix("visual."): v for name, v in values.items() if name.startswith("visual.")}
        return text, image

    def _prompts_for(self, classnames: Sequence[str]) -> list[TemplatePrompts]:
        """Each template's captions of these classes as token ids: built once per class list."""
        key = (tuple(classnames), self.shared_prefix)
        if key not in self._prompts:
            self._prompts[key] = self.backbone.template_prompts(key[0], self.templates, share_prefixes=key[1])
        return self._prompts[key]

    def _class_features(self, values: dict[str, torch.Tensor], classnames: Sequence[str]) -> torch.Tensor:
        """[C, E] normalised template-mean class features with the given text biases."""
        text_params, _ = self._split(values)
        features = self.backbone.encode_template_prompts(self._prompts_for(classnames), text_params,
                                                         self.text_chunk_size)
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
            path_logits = (self._feature_path(inputs, images, text, path_ts) if self.path_space is PathSpace.feature
                           else self._weight_path(inputs, values, path_ts))
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def _feature_path(self, pixels: torch.Tensor, images: torch.Tensor, text: torch.Tensor,
                      path_ts: torch.Tensor) -> torch.Tensor:
        images_ft = self._finetuned_image_features(pixels)
        ts = path_ts.to(images).view(-1, 1, 1)
        path_images = F.normalize(images_ft + ts * (images - images_ft), dim=-1)
        path_text = F.normalize(self.ft_text + ts * (text - self.ft_text), dim=-1)
        return self.scale * torch.einsum("kbe,kce->kbc", path_images, path_text)

    def _finetuned_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features at ``w_ft``: constants of the path term, so each image is encoded once per run.

        Keyed by the pixels' content, so the same image in another batch (or augmented
        differently) is never confused with another; only new images run through the tower.
        """
        if not self.cache_ft_images:
            with torch.no_grad():
                return self._image_features(self.ft, pixels)
        keys = [hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest() for image in pixels.detach()]
        missing = [row for row, key in enumerate(keys) if key not in self._ft_images]
        if missing:
            with torch.no_grad():
                computed = self._image_features(self.ft, pixels[missing])
            self._ft_images.update((keys[row], feature) for row, feature in zip(missing, computed))
        return torch.stack([self._ft_images[key] for key in keys])

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

    def open_vocabulary_logits(self, inputs: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """Pixels scored over any class list with the current tensors in both towers."""
        values = self.current()
        return self.scale * self._image_features(values, inputs) @ self._class_features(values, classnames).t()

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
        return {"tensors": len(self.names), "tuned_in_input": len(self.tuned),
                "full_state_dict": bool(self.passthrough)}
