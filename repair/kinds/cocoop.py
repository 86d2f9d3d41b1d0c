"""CoCoOp: image-conditioned soft prompts (KaiyangZhou/CoOp, ``trainers/cocoop.py``).

What its ``PromptLearner`` trains (ViT-B/16, ``N_CTX`` 4, ``CTX_INIT`` "a photo of a"): ``ctx`` [4, 512]
and a meta-network on the normalised image feature, ``meta_net.linear1`` ([32, 512] + [32], then a ReLU)
and ``meta_net.linear2`` ([512, 32] + [512]); each image's prompt context is ``ctx + meta_net(image)``
(the same shift on every context token), so every image has its own class features. The trainer registers
the prompt learner alone (``register_model("prompt_learner", ...)``): a Dassl file holds these tensors
plus the ``token_prefix`` / ``token_suffix`` buffers (rebuilt from the class names), all fp16 under its
default ``PREC: fp16``.

The image tower is frozen, so the inputs are the cached image features. Each step encodes the class
prompts once per image: B times a CoOp step's text work.

Zero-shot point: ``ctx`` = the embeddings of ``ctx_init`` and ``linear2`` = 0 (weight and bias; the file's
``linear1`` then changes nothing, so two such points are the same model, see :meth:`CoCoOp.same_weights`).
``finetune`` starts there. The path term: ``feature`` interpolates each image's class features between
``w_ft`` and ``w`` (those at ``w_ft`` are constants, computed once per image); ``weight`` re-encodes at
interpolated tensors (exact; K more text passes per image).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import (
    About,
    Claims,
    Kind,
    KindOptions,
    KindOutput,
    PathSpace,
    RepairDefaults,
    Schedule,
    logit_scale_option,
    option,
)
from repair.kinds.coop import DEFAULT_CTX_INIT, CoOpPrompts, PromptBank, init_context
from repair.kinds.prompted import canonical_keys, check_shape, linear_init, seeded_normal, upstream_claims
from repair.kinds.weights import along_path
from repair.model.backbone import Backbone, TextTower
from repair.model.shared_prefix import CLASS_CHUNK

CTX = "ctx"
LINEAR1 = ("meta_net.linear1.weight", "meta_net.linear1.bias")
LINEAR2 = ("meta_net.linear2.weight", "meta_net.linear2.bias")
NAMES = (CTX, *LINEAR1, *LINEAR2)
IGNORED_BUFFERS = ("token_prefix", "token_suffix")
IMAGE_CHUNK = 256  # images per text pass when scoring without gradients (each image: C prompts)
FT_CACHE_BYTES = 1 << 30  # the path's per-image class features at w_ft are cached up to this size


@dataclass(frozen=True)
class CoCoOpOptions(KindOptions):
    ctx_init: str = option(DEFAULT_CTX_INIT, "Prompts: the zero-shot words the context starts from (w_zs).")
    path_space: PathSpace = option(PathSpace.feature, "Interpolate the path in 'feature' space (cheap) or "
                                   "'weight' space (exact, K more text passes).", stages=("repair",))
    logit_scale: float | None = logit_scale_option()
    n_ctx: int | None = option(None, "Context tokens (default: the words of --ctx-init; another count starts "
                               "from CoOp's random init, N(0, 0.02)).", stages=("finetune",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {self.n_ctx}")


def cocoop_keys(tensor_file: TensorFile) -> dict[str, str]:
    """CoCoOp's trained tensors in a file: name in its prompt learner -> the file's key."""
    found = {}
    for name, key in canonical_keys(tensor_file).items():
        name = name.removeprefix("prompt_learner.")
        if name in NAMES:
            found[name] = key
    return found


class CoCoOp(Kind):
    """CoCoOp's context and meta-network (see the module docstring)."""

    name: ClassVar[str] = "cocoop"
    Options: ClassVar[type[KindOptions]] = CoCoOpOptions
    about: ClassVar[About] = About(
        title="CoCoOp", description="CoCoOp image-conditioned prompt",
        trained_tensors="`ctx` [n_ctx, width] + `meta_net.linear1` [d/16, d] and `meta_net.linear2` [width, d/16]",
        scores_unseen_classes=True)
    defaults: ClassVar[RepairDefaults] = CoOpPrompts.defaults  # not benchmarked: CoOp's, the closest measured kind
    finetune_schedule: ClassVar[Schedule] = CoOpPrompts.finetune_schedule
    outranks: ClassVar[tuple[str, ...]] = ("coop",)  # CoOp finds its ctx and would drop the meta-network
    text_chunk_size: int | None = CLASS_CHUNK
    # one [SOS][ctx + shift] prefix per image, encoded once for all classes (repair.model.shared_prefix)
    shared_prefix: bool = True

    def __init__(self, backbone: Backbone, values: Mapping[str, torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], options: CoCoOpOptions | None = None, *,
                 file_keys: Mapping[str, str] | None = None) -> None:
        super().__init__(backbone, classnames, templates, options)
        missing = [name for name in NAMES if name not in values]
        if missing:
            raise IncompatibleCheckpointError(f"a CoCoOp checkpoint needs {', '.join(NAMES)}; it lacks {missing[0]}")
        width, embed = backbone.text_width, backbone.embed_dim
        self.n_ctx, hidden = int(values[CTX].shape[0]), int(values[LINEAR1[0]].shape[0])
        for name, shape in ((CTX, [self.n_ctx, width]), (LINEAR1[0], [hidden, embed]), (LINEAR1[1], [hidden]),
                            (LINEAR2[0], [width, hidden]), (LINEAR2[1], [width])):
            check_shape(name, values[name], shape)
            if not torch.is_floating_point(values[name]):
                raise IncompatibleCheckpointError(f"{name} has dtype {values[name].dtype}; expected floating point")
        self.scale = float(self.options.logit_scale if self.options.logit_scale is not None else backbone.logit_scale)
        self.path_space = self.options.path_space
        self.file_keys = {name: (file_keys or {}).get(name, name) for name in NAMES}
        self.input_dtypes = {name: values[name].dtype for name in NAMES}
        self.inputs = {name: values[name].detach().cpu() for name in NAMES}
        device = backbone.device
        self.params = nn.ParameterList([nn.Parameter(values[name].detach().to(device, torch.float32).clone())
                                        for name in NAMES])
        self.ft = {name: parameter.detach().clone() for name, parameter in zip(NAMES, self.params)}
        self._banks: dict[tuple[str, ...], PromptBank] = {}
        self.bank = self._bank(self.classnames)
        self._ft_text: dict[bytes, torch.Tensor] = {}
        with torch.no_grad():
            self.zs_text = backbone.zero_shot_classifier(self.classnames, self.templates)

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        found = cocoop_keys(tensor_file)
        return CTX in found and LINEAR1[0] in found

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return list(cocoop_keys(tensor_file).values())

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        return upstream_claims(tensor_file, cls.trainable_keys(tensor_file, options), IGNORED_BUFFERS)

    @classmethod
    def ignored_keys(cls, tensor_file: TensorFile) -> dict[str, str]:
        """Tensors of a CoCoOp file it does not train, each with why (for the no-partial-reads check)."""
        return {key: "class-name buffer, rebuilt from the class names" for name, key in
                canonical_keys(tensor_file).items() if name.removeprefix("prompt_learner.") in IGNORED_BUFFERS}

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: CoCoOpOptions | None = None) -> CoCoOp:
        keys = cocoop_keys(tensor_file)
        values = {name: tensor_file.tensors[key] for name, key in keys.items()}
        return cls(backbone, values, classnames, templates, options, file_keys=keys)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: CoCoOpOptions | None = None) -> CoCoOp:
        """At ``w_zs``: ``ctx`` from ``ctx_init`` (or CoOp's random init for another ``n_ctx``), ``linear1`` as
        ``nn.Linear`` initialises it (seeded), ``linear2`` zero."""
        options = options or CoCoOpOptions()
        ctx = init_context(backbone, options.ctx_init)
        if options.n_ctx is not None and options.n_ctx != ctx.shape[0]:
            ctx = seeded_normal([options.n_ctx, backbone.text_width], 0.02, seed=0)
        embed = backbone.embed_dim
        hidden = max(1, embed // 16)
        weight, bias = linear_init(hidden, embed, seed=1)
        values = {CTX: ctx, LINEAR1[0]: weight, LINEAR1[1]: bias,
                  LINEAR2[0]: torch.zeros(backbone.text_width, hidden), LINEAR2[1]: torch.zeros(backbone.text_width)}
        return cls(backbone, values, classnames, templates, options)

    def _bank(self, classnames: Sequence[str]) -> PromptBank:
        key = tuple(classnames)
        if key not in self._banks:
            self._banks[key] = PromptBank(self.backbone, key, self.n_ctx)
        return self._banks[key]

    # ------------------------------------------------------------------ encoding

    def current(self) -> dict[str, torch.Tensor]:
        return dict(zip(NAMES, self.params))

    def _text_features(self, values: Mapping[str, torch.Tensor], images: torch.Tensor,
                       bank: PromptBank) -> torch.Tensor:
        """[B, C, E] normalised class features, one set per image: contexts ``ctx + meta_net(image)``."""
        hidden = torch.relu(F.linear(images.float(), values[LINEAR1[0]], values[LINEAR1[1]]))
        shift = F.linear(hidden, values[LINEAR2[0]], values[LINEAR2[1]])
        contexts = values[CTX].unsqueeze(0) + shift.unsqueeze(1)  # [B, n_ctx, width]
        start = bank.prefix[:1].expand(len(contexts), -1, -1).to(contexts)
        text = self.backbone.text
        encode = type(text).encode_prompts if self.shared_prefix else TextTower.encode_prompts
        features = encode(text, torch.cat([start, contexts], dim=1), bank.suffix, bank.pooling,
                          chunk_size=self.text_chunk_size)
        return F.normalize(features.float(), dim=-1)

    def _scores(self, values: Mapping[str, torch.Tensor], images: torch.Tensor, bank: PromptBank) -> torch.Tensor:
        return self.scale * torch.einsum("be,bce->bc", images, self._text_features(values, images, bank))

    # ------------------------------------------------------------------ Kind protocol

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        values = self.current()
        text = self._text_features(values, inputs, self.bank)
        logits = self.scale * torch.einsum("be,bce->bc", inputs, text)
        path_logits = None
        if path_ts is not None:
            ts = path_ts.to(text)
            if self.path_space is PathSpace.feature:
                ft = self._finetuned_text(inputs)
                path_text = F.normalize(ft + ts.view(-1, 1, 1, 1) * (text - ft), dim=-1)
                path_logits = self.scale * torch.einsum("be,kbce->kbc", inputs, path_text)
            else:
                path_logits = self._weight_path(inputs, values, ts)
        # per-image class features [B, C, E]: the feature surrogate averages cos(T_bc, Z_c) over images and classes
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def _finetuned_text(self, images: torch.Tensor) -> torch.Tensor:
        """Each image's class features at ``w_ft``: constants, cached by the feature's content (up to a size)."""
        keys = [hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest() for image in images.detach()]
        missing = [row for row, key in enumerate(keys) if key not in self._ft_text]
        if missing:
            capacity = FT_CACHE_BYTES // (4 * len(self.classnames) * self.backbone.embed_dim)
            with torch.no_grad():
                if len(self._ft_text) + len(missing) > capacity:  # too many images to keep: encode this batch
                    return self._text_features(self.ft, images, self.bank)
                computed = self._text_features(self.ft, images[missing], self.bank)
            self._ft_text.update((keys[row], feature) for row, feature in zip(missing, computed))
        return torch.stack([self._ft_text[key] for key in keys])

    def _weight_path(self, inputs: torch.Tensor, values: Mapping[str, torch.Tensor],
                     path_ts: torch.Tensor) -> torch.Tensor:
        def score(t: torch.Tensor, *current: torch.Tensor) -> torch.Tensor:
            point = {name: self.ft[name] + t * (value - self.ft[name]) for name, value in zip(NAMES, current)}
            return self._scores(point, inputs, self.bank)

        return along_path(score, path_ts.float(), [values[name] for name in NAMES])

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        bank = self._bank(classnames)
        values = self.current()
        if torch.is_grad_enabled():
            return self._scores(values, features, bank)
        return torch.cat([self._scores(values, features[start:start + IMAGE_CHUNK], bank)
                          for start in range(0, len(features), IMAGE_CHUNK)])

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def _zero_shot_context(self) -> torch.Tensor | None:
        ctx = init_context(self.backbone, self.options.ctx_init)
        return ctx.to(self.params[0]) if ctx.shape[0] == self.n_ctx else None

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        ctx = self._zero_shot_context()
        if ctx is None:
            raise IncompatibleCheckpointError(
                f"the zero-shot prompt {self.options.ctx_init!r} is not {self.n_ctx} tokens like the checkpoint's "
                f"context; pass --ctx-init with {self.n_ctx} tokens")
        point = {CTX: ctx, **{name: self.ft[name] for name in LINEAR1},
                 **{name: torch.zeros_like(self.ft[name]) for name in LINEAR2}}
        return {f"params.{index}": point[name] for index, name in enumerate(NAMES)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {f"params.{index}": self.ft[name] for index, name in enumerate(NAMES)}

    def unsupported_surrogates(self) -> dict[str, str]:
        if self._zero_shot_context() is not None:
            return {}
        reason = (f"it has no zero-shot point in prompt space (n_ctx={self.n_ctx}, but --ctx-init "
                  f"{self.options.ctx_init!r} is another length)")
        return {"fisher": reason, "l2": reason}

    def same_weights(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
        """The same model: equal tensors, except ``linear1`` where ``linear2`` is zero in both (no shift)."""
        if a.keys() != b.keys():
            return False
        keys = {name: f"params.{index}" for index, name in enumerate(NAMES)}
        silent = all(not bool(values[keys[name]].any()) for values in (a, b) for name in LINEAR2)
        return all(torch.equal(a[keys[name]], b[keys[name]].to(a[keys[name]])) for name in NAMES
                   if not (silent and name in LINEAR1))

    def export(self) -> dict[str, torch.Tensor]:
        """The input's keys and dtypes; a tensor that did not move is written back bit for bit."""
        tensors = {}
        for name, parameter in self.current().items():
            value = parameter.detach()
            tensors[self.file_keys[name]] = (self.inputs[name] if torch.equal(value, self.ft[name])
                                             else value.cpu().to(self.input_dtypes[name]))
        return tensors

    def describe(self) -> dict[str, object]:
        return {"n_ctx": self.n_ctx, "meta_hidden": int(self.ft[LINEAR1[0]].shape[0]),
                "input_dtype": str(self.input_dtypes[CTX]).removeprefix("torch.")}
