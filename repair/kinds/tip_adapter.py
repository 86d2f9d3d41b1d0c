"""Tip-Adapter-F (gaopengcuhk/Tip-Adapter ``main.py``): a fine-tuned cache of few-shot image features.

Its logits on a normalised image feature ``f`` are CLIP's plus the cache's:
``100 f W + alpha exp(-beta (1 - f F^T)) V``, with ``W`` the zero-shot classifier (CLIP's template text
features), ``V`` the cache values (one-hot labels ``[NK, N]`` of the ``NK`` few-shot images) and ``F``
the fine-tuned adapter weight ``best_F`` ``[NK, D]``, initialised from the cache keys ``[D, NK]`` (their
transpose: training-free Tip-Adapter) and the only tensor trained. ``alpha`` and ``beta`` come from a
search on validation data and are not in the files: pass ``--tip-alpha`` / ``--tip-beta`` as chosen
(upstream starts the search from ``init_alpha`` / ``init_beta``, 1.17 / 1 on ImageNet). The keys are not
used to score once ``F`` is trained: they are ignored, and written back unchanged.

Zero-shot point: ``F = 0``. Every cache entry then has affinity 0, so the cache adds
``alpha exp(-beta)`` times the number of entries of each class: the same for every class when each has
as many shots (Tip-Adapter's caches are built so), which leaves the zero-shot prediction unchanged; with
unequal shots it is a per-class bias. Its class features are the frozen text tower's: ``feature`` does
not apply. It scores only its cache's classes. The path interpolates ``F`` (exact; the cache is small).
``finetune`` builds the cache from the training images (keys: their normalised features; values: their
labels) and starts at ``F = keys^T``, as upstream does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, Kind, KindOptions, KindOutput, RepairDefaults, backbone_copies
from repair.kinds.base import logit_scale_option, option
from repair.model.backbone import Backbone

ADAPTER, KEYS, VALUES = "best_F", "cache_keys", "cache_values"


@dataclass(frozen=True)
class TipAdapterOptions(KindOptions):
    tip_alpha: float = option(1.0, "Tip-Adapter-F: alpha, the cache logits' weight (its searched best_alpha; not "
                                   "stored in its files).")
    tip_beta: float = option(1.0, "Tip-Adapter-F: beta, the affinity sharpness (its searched best_beta; not "
                                  "stored in its files).")
    logit_scale: float | None = logit_scale_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("tip_alpha", "tip_beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < float("inf")):
                raise ValueError(f"{name} must be a number >= 0, got {value}")


class TipAdapterF(Kind):
    """Tip-Adapter-F: ``best_F`` over a fixed cache; see the module docstring."""

    name: ClassVar[str] = "tip-adapter"
    Options: ClassVar[type[KindOptions]] = TipAdapterOptions
    about: ClassVar[About] = About(
        title="Tip-Adapter-F", description="Tip-Adapter-F cache adapter",
        trained_tensors="`best_F` [NK, D] over the cache values `[NK, N]` (keys `[D, NK]` kept as they are)")
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="l2", lam_zs=1.0)  # not benchmarked yet

    def __init__(self, backbone: Backbone, adapter: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 classnames: Sequence[str], templates: Sequence[str], options: TipAdapterOptions | None = None, *,
                 fresh: bool = False) -> None:
        self._check(backbone, adapter, keys, values, classnames)
        super().__init__(backbone, classnames, templates, options)
        self.scale = float(self.options.logit_scale if self.options.logit_scale is not None else backbone.logit_scale)
        self.alpha, self.beta = float(self.options.tip_alpha), float(self.options.tip_beta)
        self.fresh = fresh  # a cache made here (finetune) is written with the output; a read one is carried
        self.dtypes = {ADAPTER: adapter.dtype, KEYS: keys.dtype, VALUES: values.dtype}
        device = backbone.device
        self.adapter = nn.Parameter(adapter.detach().to(device, torch.float32).clone())
        self.register_buffer("adapter_ft", self.adapter.detach().clone(), persistent=False)
        self.register_buffer("keys", keys.detach().to(device, torch.float32).clone(), persistent=False)
        self.register_buffer("values", values.detach().to(device, torch.float32).clone(), persistent=False)
        self.zs_text = backbone.zero_shot_classifier(self.classnames, self.templates)

    @staticmethod
    def _check(backbone: Backbone, adapter: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               classnames: Sequence[str]) -> None:
        width, entries = backbone.embed_dim, values.shape[0] if values.dim() == 2 else -1
        expected = {ADAPTER: ([entries, width], adapter), KEYS: ([width, entries], keys),
                    VALUES: ([entries, len(classnames)], values)}
        for name, (shape, tensor) in expected.items():
            if list(tensor.shape) != shape or not torch.is_floating_point(tensor):
                raise IncompatibleCheckpointError(
                    f"{name} has shape {list(tensor.shape)} ({tensor.dtype}); expected {shape} floating point "
                    f"({entries} cache entries, the model's {width}-d features, {len(classnames)} classes)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return all(name in tensor_file.tensors for name in (ADAPTER, KEYS, VALUES))

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return [ADAPTER] if cls.matches(tensor_file) else []

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """``best_F`` trained, the values fixed, the keys ignored (training-free Tip-Adapter's ``F``)."""
        if not cls.matches(tensor_file):
            return Claims(trained=())
        return Claims(trained=(ADAPTER,), fixed=(VALUES,),
                      ignored={KEYS: "the cache keys: Tip-Adapter-F's starting point, not used to score"},
                      frozen=backbone_copies(list(tensor_file.tensors), [ADAPTER, KEYS, VALUES]))

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: TipAdapterOptions | None = None) -> TipAdapterF:
        if not cls.matches(tensor_file):
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no Tip-Adapter-F cache ({ADAPTER}, {KEYS}, "
                                              f"{VALUES})")
        tensors = tensor_file.tensors
        return cls(backbone, tensors[ADAPTER], tensors[KEYS], tensors[VALUES], classnames, templates, options)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: TipAdapterOptions | None = None) -> TipAdapterF:
        """An empty cache: :meth:`start_from` fills it from the training images before fine-tuning."""
        empty = torch.zeros(0, backbone.embed_dim)
        return cls(backbone, empty, empty.t(), torch.zeros(0, len(classnames)), classnames, templates, options,
                   fresh=True)

    def start_from(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Tip-Adapter's cache from the training images: keys their normalised features, values their one-hot
        labels, ``F`` the keys' transpose (where Tip-Adapter-F's fine-tuning starts)."""
        keys = F.normalize(features.detach().float(), dim=-1).t().contiguous()
        self.keys = keys
        self.values = F.one_hot(labels, len(self.classnames)).float()
        self.adapter = nn.Parameter(keys.t().clone())
        self.adapter_ft = self.adapter.detach().clone()

    # ------------------------------------------------------------------ scoring

    def _logits(self, features: torch.Tensor, adapter: torch.Tensor) -> torch.Tensor:
        affinity = features @ adapter.t()
        cache = torch.exp(-self.beta * (1.0 - affinity)) @ self.values
        return self.scale * features @ self.zs_text.t() + self.alpha * cache

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        logits = self._logits(inputs, self.adapter)
        path_logits = None
        if path_ts is not None:
            path_logits = torch.stack([self._logits(inputs, self.adapter_ft + t * (self.adapter - self.adapter_ft))
                                       for t in path_ts.to(inputs)])
        return KindOutput(logits=logits, path_logits=path_logits, class_features=self.zs_text)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        self.check_can_score(classnames)
        return self._logits(features, self.adapter)

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_text

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        return {"adapter": torch.zeros_like(self.adapter)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {"adapter": self.adapter_ft}

    def unsupported_surrogates(self) -> dict[str, str]:
        return {"feature": "its class features are the frozen text tower's, which never leave the zero-shot ones"}

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {ADAPTER: self.adapter.detach().cpu().to(self.dtypes[ADAPTER])}
        if self.fresh:
            tensors[KEYS] = self.keys.detach().cpu().to(self.dtypes[KEYS])
            tensors[VALUES] = self.values.detach().cpu().to(self.dtypes[VALUES])
        return tensors

    def describe(self) -> dict[str, Any]:
        return {"entries": int(self.adapter.shape[0]), "input_dtype": str(self.dtypes[ADAPTER]).removeprefix("torch.")}
