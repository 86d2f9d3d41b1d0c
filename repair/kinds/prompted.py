"""Kinds that put something into the towers themselves: deep prompts, prompt tokens, in-block adapters.

MaPLe, PromptSRC and MMA each declare, for any values of their trainable tensors, what goes into each
tower (:meth:`InsertionKind.text_insertions`, :meth:`InsertionKind.image_insertions`); running a tower
with it is :mod:`repair.model.insertions`'. Everything else is done here once:

- class features: the prompt ``[SOS] ctx <the rest of "ctx_init class.">`` (MaPLe and PromptSRC keep the
  words of ``ctx_init`` after the first ``n_ctx``; MMA learns no context) through the text tower with the
  text insertions, cut at end-of-text, in class chunks;
- image features: pixels through the image tower with its insertions (the image tower in the loop, as
  CLIPFit's), or the frozen tower's cached features when the kind inserts nothing there (a text half);
- the path term: ``feature`` (default) interpolates both the class features and the image features
  between ``w_ft`` and ``w``: the image features at ``w_ft`` are constants, computed once per image (keyed
  by its pixels) and the class features once per run, so it costs no extra pass; ``weight`` runs both
  towers at each interpolated point (exact; K more passes, each checkpointed). Every tensor here enters the
  towers linearly or through a linear layer, so the weight-space segment is well defined.
- a checkpoint whose tensors hold no zero-shot point (prompt tokens in the image sequence change every
  image feature, whatever their values) scores as zero-shot CLIP inside :meth:`zero_shot_model` (its
  insertions off): ``feature`` and ``distill`` use that; ``fisher`` and ``l2``, which need ``w_zs``, are
  refused by name.

Names: the trainable tensors keep the upstream module names (``prompt_learner.ctx``,
``text_adapter.5.up.weight``) under whatever wrapper prefix the file had (``state_dict.`` in a Dassl file);
the output writes them under the input's own keys and dtypes.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import Claims, Kind, KindOptions, KindOutput, PathSpace, backbone_copies, model_key
from repair.kinds.coop import PLACEHOLDER, _check_fits, init_context
from repair.kinds.weights import along_path
from repair.model.backbone import Backbone, ImageEncoder, NativeTextTower
from repair.model.insertions import Insertions, encode_image, image_insertions_unsupported, text_states, with_insertions
from repair.model.shared_prefix import CLASS_CHUNK

Values = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------- file layouts


def canonical_keys(tensor_file: TensorFile) -> dict[str, str]:
    """Upstream module name (wrapper prefixes such as ``state_dict.`` or ``module.`` removed) -> the file's key."""
    return {model_key(key): key for key in tensor_file.tensors}


def upstream_claims(tensor_file: TensorFile, trained: Sequence[str], buffers: Sequence[str],
                    towers: Sequence[str] = ()) -> Claims:
    """What a prompt or adapter method's file holds (:class:`~repair.kinds.base.Claims`): its trained tensors; its
    class-name ``buffers`` (names after any ``prompt_learner.``), rebuilt; and, for a model saved whole, the
    ``towers``: compared with the loaded backbone where they are CLIP's own weights, ignored (with why) where
    they are a copy the method keeps for itself (PromptSRC's zero-shot teacher)."""
    names = canonical_keys(tensor_file)
    rebuilt = tuple(key for name, key in names.items()
                    if name in buffers or name.removeprefix("prompt_learner.") in buffers)
    saved = [key for name, key in names.items() if name.startswith(tuple(towers)) and key not in trained]
    frozen = backbone_copies(saved)
    ignored = {key: "a frozen tower the method keeps for itself (not the backbone's own weights)"
               for key in saved if key not in frozen}
    return Claims(trained=tuple(trained), rebuilt=rebuilt, frozen=frozen, ignored=ignored)


def prompt_words(backbone: Backbone, ctx_init: str, n_ctx: int) -> str:
    """The words whose first ``n_ctx`` tokens the context replaces: ``ctx_init`` when it has that many
    tokens (MaPLe's 2 of "a photo of a" keep "of a"), else ``n_ctx`` placeholders (a random init)."""
    if n_ctx and ctx_init and init_context(backbone, ctx_init).shape[0] >= n_ctx:
        return ctx_init
    return " ".join([PLACEHOLDER] * n_ctx)


class PromptTokens(nn.Module):
    """Frozen token embeddings of ``"{words} {class}."`` for one class list, cut at end-of-text, with
    positions ``1 .. n_ctx`` left to the learnt context (upstream's ``token_prefix`` / ``token_suffix``)."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], words: str, n_ctx: int) -> None:
        super().__init__()
        prompts = [f"{words} {name}." if words else f"{name}." for name in classnames]
        _check_fits(backbone, prompts, n_ctx)
        tokens, pooling = backbone.text.cut(backbone.tokenize(prompts))
        with torch.no_grad():
            embeddings = backbone.text.embed(tokens).float()
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("pooling", pooling, persistent=False)

    def assemble(self, ctx: torch.Tensor | None) -> torch.Tensor:
        """[C, L, width] prompt embeddings with ``ctx`` [n_ctx, width] in place (None: no context)."""
        if ctx is None:
            return torch.cat([self.prefix, self.suffix], dim=1)
        return torch.cat([self.prefix, ctx.to(self.prefix).expand(len(self.prefix), -1, -1), self.suffix], dim=1)


def zero_shot_deep_prompts(backbone: Backbone, words: str, n_ctx: int, depth: int) -> list[torch.Tensor] | None:
    """The zero-shot values of deep text prompts at blocks ``1 .. depth - 1``: the hidden states of positions
    ``1 .. n_ctx`` of ``"[SOS] words"`` there. In a causal tower these rows depend on nothing after them, so
    putting them back is the identity: the zero-shot model exactly. None for a bidirectional tower (their
    states depend on each class name) or without ``ctx_init`` words."""
    if not isinstance(backbone.text, NativeTextTower) or words.split()[:1] == [PLACEHOLDER] or not n_ctx:
        return None
    tokens = backbone.tokenize([words])[:, :1 + n_ctx]
    with torch.no_grad():
        states = text_states(backbone.text, backbone.text.embed(tokens).float(), depth)
    return [state[0, 1:1 + n_ctx].float().clone() for state in states]


# ----------------------------------------------------------------------------------------- the base


class InsertionKind(Kind):
    """Base of kinds that declare their insertions (see the module docstring); subclasses declare the layout."""

    path_space: PathSpace
    text_chunk_size: int | None = CLASS_CHUNK  # classes per checkpointed text chunk; None: all at once
    cache_ft_images: bool = True  # the path term's image features at w_ft: computed once per image
    n_ctx: int  # learnt context tokens at the text input (0: none)
    words: str  # the words of "{words} {class}." whose first n_ctx tokens the context replaces
    touches_image: bool  # whether anything goes into the image tower (then it trains on pixels)
    no_zero_shot_point: str | None = None  # why w_zs does not exist in these tensors (None: it does)

    def __init__(self, backbone: Backbone, values: Mapping[str, torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], options: KindOptions | None, *, file_keys: Mapping[str, str]) -> None:
        super().__init__(backbone, classnames, templates, options)
        for name, value in values.items():
            if not torch.is_floating_point(value):
                raise IncompatibleCheckpointError(f"{file_keys.get(name, name)} has dtype {value.dtype}; "
                                                  "expected a floating-point tensor")
        self.scale = float(self.options.logit_scale if self.options.logit_scale is not None else backbone.logit_scale)
        self.path_space = self.options.path_space
        self.names = sorted(values, key=_natural)  # one order whatever the file's: params.i name the same tensor
        self.file_keys = {name: file_keys.get(name, name) for name in self.names}
        self.input_dtypes = {name: value.dtype for name, value in values.items()}
        self.inputs = {name: value.detach().cpu() for name, value in values.items()}  # written back when unmoved
        device = backbone.device
        trained = {name: self.to_trainable(name, value.detach().to(device, torch.float32)) for name, value in
                   values.items()}
        self.params = nn.ParameterList([nn.Parameter(trained[name].clone()) for name in self.names])
        self.ft = {name: trained[name].clone() for name in self.names}
        self.zs: Values | None = None
        self._banks: dict[tuple[str, ...], PromptTokens] = {}
        self._zero_shot_text: dict[tuple[str, ...], torch.Tensor] = {}
        self._ft_images: dict[bytes, torch.Tensor] = {}
        self._as_zero_shot = False

    def _init_features(self, zero_shot: Values | None) -> None:
        """Call at the end of a subclass's ``__init__``: ``w_zs`` (file-space values, None: no point), the
        fine-tuned and zero-shot class features (constants of the path and the feature surrogate)."""
        if zero_shot is not None:
            self.zs = {name: self.to_trainable(name, zero_shot[name].to(self.backbone.device, torch.float32))
                       for name in self.names}
        if self.touches_image:
            reason = image_insertions_unsupported(self.backbone.model.visual)
            if reason is not None:
                raise IncompatibleCheckpointError(f"this {self.about.description} prompts the image tower, but "
                                                  f"{reason}{self.text_half_hint()}")
        with torch.no_grad():
            self.zs_text = self.backbone.zero_shot_classifier(self.classnames, self.templates)
            self.ft_text = self._class_features(self.ft, self.classnames)

    # ------------------------------------------------------------------ declarations

    @abstractmethod
    def text_insertions(self, values: Values) -> tuple[torch.Tensor | None, Insertions]:
        """(the context at the text input [n_ctx, width] or None, the text tower's insertions) for ``values``."""

    def image_insertions(self, values: Values) -> Insertions:
        """The image tower's insertions for ``values`` (only called when ``touches_image``)."""
        raise NotImplementedError

    def to_trainable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A file tensor (fp32) as the trained parameter: the identity unless a kind reparametrises (MMA)."""
        return value

    def from_trainable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value

    @classmethod
    def text_half_hint(cls) -> str:
        """How to use this kind without image prompts, for the refusal on a CNN image tower."""
        return ""

    # ------------------------------------------------------------------ encoding

    def current(self) -> Values:
        return dict(zip(self.names, self.params))

    def _bank(self, classnames: Sequence[str]) -> PromptTokens:
        key = tuple(classnames)
        if key not in self._banks:
            self._banks[key] = PromptTokens(self.backbone, key, self.words, self.n_ctx)
        return self._banks[key]

    def _class_features(self, values: Values, classnames: Sequence[str]) -> torch.Tensor:
        """[C, E] normalised class features with these values (the zero-shot classifier inside zero_shot_model)."""
        if self._as_zero_shot:
            key = tuple(classnames)
            if key not in self._zero_shot_text:
                self._zero_shot_text[key] = self.backbone.zero_shot_classifier(list(key), self.templates)
            return self._zero_shot_text[key]
        ctx, insertions = self.text_insertions(values)
        bank = self._bank(classnames)
        tower = with_insertions(self.backbone.text, insertions)
        features = tower.encode_rows(bank.assemble(ctx), bank.pooling, chunk_size=self.text_chunk_size)
        return F.normalize(features.float(), dim=-1)

    def _raw_image_features(self, values: Values, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.backbone.device, memory_format=torch.channels_last)
        if self._as_zero_shot:
            return self.backbone.model.encode_image(pixels).float()
        return encode_image(self.backbone.model.visual, pixels, self.image_insertions(values)).float()

    def _image_features(self, values: Values, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised image features: pixels through the prompted tower, or the frozen tower's features."""
        if not self.touches_image:
            return inputs
        return F.normalize(self._raw_image_features(values, inputs), dim=-1)

    @property
    def input_kind(self) -> str:
        return "pixels" if self.touches_image else "features"

    def image_encoder(self) -> ImageEncoder | None:
        """This checkpoint's prompted image tower, for evaluation; its own cache key."""
        if not self.touches_image:
            return None
        values = {name: value.detach().clone() for name, value in self.current().items()}
        digest = hashlib.sha256(f"{self.name}\n{self.backbone.visual_fingerprint}".encode())
        for name in self.names:
            digest.update(name.encode())
            digest.update(values[name].to("cpu", torch.float32).contiguous().numpy().tobytes())

        def encode(pixels: torch.Tensor) -> torch.Tensor:
            with self.backbone.autocast():
                return self._raw_image_features(values, pixels)

        return ImageEncoder(digest.hexdigest(), encode)

    # ------------------------------------------------------------------ Kind protocol

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

    def _feature_path(self, inputs: torch.Tensor, images: torch.Tensor, text: torch.Tensor,
                      path_ts: torch.Tensor) -> torch.Tensor:
        """[K, B, C]: class and image features each on the straight line from their ``w_ft`` values."""
        ts = path_ts.to(images).view(-1, 1, 1)
        if self.touches_image:
            images_ft = self._finetuned_image_features(inputs)
            path_images = F.normalize(images_ft + ts * (images - images_ft), dim=-1)
        else:
            path_images = images.expand(len(ts), *images.shape)
        path_text = F.normalize(self.ft_text + ts * (text - self.ft_text), dim=-1)
        return self.scale * torch.einsum("kbe,kce->kbc", path_images, path_text)

    def _finetuned_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features at ``w_ft``, keyed by the pixels' content: each image runs the tower once per run."""
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

    def _weight_path(self, inputs: torch.Tensor, values: Values, path_ts: torch.Tensor) -> torch.Tensor:
        def score(t: torch.Tensor, *current: torch.Tensor) -> torch.Tensor:
            point = {name: self.ft[name] + t * (value - self.ft[name]) for name, value in zip(self.names, current)}
            return self.scale * self._image_features(point, inputs) @ self._class_features(point, self.classnames).t()

        return along_path(score, path_ts.to(self.params[0].device, torch.float32), [values[n] for n in self.names])

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        """``features`` come from :meth:`image_encoder` when the kind prompts the image tower."""
        return self.scale * features @ self._class_features(self.current(), classnames).t()

    def open_vocabulary_logits(self, inputs: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        values = self.current()
        return self.scale * self._image_features(values, inputs) @ self._class_features(values, classnames).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def _check_point(self) -> Values:
        if self.zs is None:
            raise IncompatibleCheckpointError(
                f"this {self.about.description} has no zero-shot point in its tensors ({self.no_zero_shot_point})")
        return self.zs

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        zs = self._check_point()
        return {f"params.{index}": zs[name] for index, name in enumerate(self.names)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {f"params.{index}": self.ft[name] for index, name in enumerate(self.names)}

    def unsupported_surrogates(self) -> dict[str, str]:
        if self.zs is not None:
            return {}
        reason = f"it has no zero-shot point in its tensors ({self.no_zero_shot_point})"
        return {"fisher": reason, "l2": reason}

    def zero_shot_model(self):
        if self.zs is not None:
            return None
        return self._scoring_as_zero_shot()

    @contextmanager
    def _scoring_as_zero_shot(self) -> Iterator[None]:
        saved, self._as_zero_shot = self._as_zero_shot, True
        try:
            yield
        finally:
            self._as_zero_shot = saved

    def export(self) -> dict[str, torch.Tensor]:
        """The input's keys and dtypes; a tensor that did not move is written back bit for bit."""
        tensors = {}
        for name, parameter in self.current().items():
            value = parameter.detach()
            if torch.equal(value, self.ft[name]) and name in self.inputs:
                tensors[self.file_keys[name]] = self.inputs[name]
            else:
                tensors[self.file_keys[name]] = self.from_trainable(name, value).cpu().to(self.input_dtypes[name])
        return tensors

    def describe(self) -> dict[str, object]:
        dtypes = sorted({str(dtype).removeprefix("torch.") for dtype in self.input_dtypes.values()})
        return {"tensors": len(self.names), "n_ctx": self.n_ctx, "image_tower": self.touches_image,
                "zero_shot_point": self.zs is not None, "input_dtypes": ",".join(dtypes)}


def _natural(name: str) -> list[object]:
    """``compound_prompts_text.10`` after ``.9``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int]) -> None:
    """One line naming the tensor, its shape and the one this model needs."""
    if list(value.shape) != list(expected):
        raise IncompatibleCheckpointError(
            f"{name} has shape {list(value.shape)}; this model needs {list(expected)}")


def image_width(backbone: Backbone) -> int | None:
    """The image transformer's width (a ViT's token width), or None for another tower."""
    conv = getattr(backbone.model.visual, "conv1", None)
    return int(conv.out_channels) if isinstance(conv, nn.Conv2d) else None


def seeded_normal(shape: Sequence[int], std: float, seed: int) -> torch.Tensor:
    """Upstream's ``nn.init.normal_(std=...)`` from a fixed seed (a fine-tuning run's start is reproducible)."""
    return std * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def linear_init(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nn.Linear``'s default initialisation, seeded."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)
    weight = (torch.rand(out_features, in_features, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_features, generator=generator) * 2 - 1) * bound
    return weight, bias


__all__ = ["InsertionKind", "PromptTokens", "canonical_keys", "check_shape", "image_width", "linear_init",
           "prompt_words", "seeded_normal", "zero_shot_deep_prompts"]
