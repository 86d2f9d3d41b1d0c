"""The zero-shot side of the objective: data-free stand-ins for "stay close to w_zs".

Around the zero-shot solution the pretraining loss along ``w_zs -> w`` grows like
``0.5 t^2 d^T H d`` with ``d = w - w_zs``; each surrogate approximates ``H`` differently:

- ``feature``: Gauss-Newton on the class text features, ``1 - mean_c cos(T_c, Z_c)``.
- ``fisher``: the diagonal Fisher at ``w_zs``, ``0.5 sum_i F_i (w_i - w_zs_i)^2``.
- ``l2``: ``c * I``, ``0.5 ||w - w_zs||^2`` (L2-SP).

A surrogate is built once per run (:func:`build_surrogate`), so its constants (anchors, the
Fisher) are computed once; adding one is one class with a ``build`` classmethod and one line
in :data:`SURROGATES` (the CLI's ``--surrogate`` choices come from there).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from repair.io import read_cache_entry, write_cache_entry
from repair.data.features import Features
from repair.errors import UsageError
from repair.kinds.base import Kind, KindOutput

FISHER_CACHE_FORMAT = "mergetune-fisher/2"  # checksummed entries
FISHER_IMAGES = 64  # the most images one Fisher estimate uses (a seeded sample beyond that)


class DataFree:
    """A surrogate whose constants come from the kind alone: built without images."""

    needs_data = False

    def __init__(self, kind: Kind) -> None:
        raise NotImplementedError

    @classmethod
    def build(cls, kind: Kind, data: Features | None, **_: object) -> DataFree:
        return cls(kind)


class FeatureSurrogate(DataFree):
    """Gauss-Newton on the class text features (KgCoOp's term; what the reference runs)."""

    name = "feature"

    def __init__(self, kind: Kind) -> None:
        self.anchor = kind.zero_shot_class_features().detach()

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(output.class_features, self.anchor, dim=-1).mean()


class L2Surrogate(DataFree):
    """Isotropic H: ``0.5 ||w - w_zs||^2`` over the trainable tensors (L2-SP)."""

    name = "l2"

    def __init__(self, kind: Kind) -> None:
        self.anchors = {name: value.detach() for name, value in kind.zero_shot_values().items()}

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        return 0.5 * sum(((tensor - self.anchors[name]) ** 2).sum() for name, tensor in kind.trainable().items())


class FisherSurrogate:
    """Diagonal Fisher at ``w_zs``: ``0.5 sum_i F_i (w_i - w_zs_i)^2``; F needs images, not labels."""

    name = "fisher"
    needs_data = True

    @classmethod
    def build(cls, kind: Kind, data: Features | None, *, seed: int = 0, cache_key: str | None = None,
              cache_dir: Path | None = None) -> FisherSurrogate:
        if data is None:
            raise ValueError("the fisher surrogate needs the repair images")
        return cls(kind, _cached_fisher(kind, data, seed, cache_key, cache_dir))

    def __init__(self, kind: Kind, fisher: dict[str, torch.Tensor]) -> None:
        self.anchors = {name: value.detach() for name, value in kind.zero_shot_values().items()}
        self.fisher = fisher

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        return 0.5 * sum((self.fisher[name] * (tensor - self.anchors[name]) ** 2).sum()
                         for name, tensor in kind.trainable().items())


Surrogate = Callable[[Kind, KindOutput], torch.Tensor]
SURROGATES: dict[str, type] = {cls.name: cls for cls in (FeatureSurrogate, FisherSurrogate, L2Surrogate)}


def build_surrogate(name: str, kind: Kind, data: Features | None = None, *, seed: int = 0,
                    cache_key: str | None = None, cache_dir: Path | None = None) -> Surrogate:
    """The named surrogate for this kind, its constants computed once (the Fisher cached on disk)."""
    if name not in SURROGATES:
        raise UsageError(f"unknown surrogate {name!r}; choose one of {', '.join(SURROGATES)}")
    return SURROGATES[name].build(kind, data, seed=seed, cache_key=cache_key, cache_dir=cache_dir)


def fisher_images(count: int, seed: int, limit: int = FISHER_IMAGES) -> torch.Tensor | None:
    """Which images estimate the Fisher: all up to ``limit``, else a seeded sample of ``limit``.

    One gradient per image costs a backward pass through every class prompt (CoOp, CLIPFit), so
    a Tiny-ImageNet-sized repair set (1,600 images, 100 classes) would take a quarter of an hour on
    two cores; a few hundred samples estimate a diagonal expectation well.
    """
    if count <= limit:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def fisher_diagonal(kind: Kind, data: Features, *, seed: int = 0, chunk: int = 32,
                    limit: int = FISHER_IMAGES) -> dict[str, torch.Tensor]:
    """E_x E_{y ~ p_zs(y|x)} [(d log p(y|x) / dw)^2] at ``w_zs``, one gradient per image.

    Labels are drawn from the zero-shot model's own predictions, so no labels are needed.
    The kind is evaluated at ``w_zs`` and restored afterwards. At most ``limit`` images are used
    (:func:`fisher_images`).
    """
    chosen = fisher_images(len(data), seed, limit)
    images = data.features if chosen is None else data.features[chosen]
    saved = kind.snapshot()
    kind.load_values(kind.zero_shot_values())
    parameters = kind.trainable()
    fisher = {name: torch.zeros_like(parameter) for name, parameter in parameters.items()}
    generator = torch.Generator().manual_seed(seed)
    try:
        for start in range(0, len(images), chunk):
            log_probs = F.log_softmax(kind(images[start:start + chunk]).logits, dim=-1)
            sampled = torch.multinomial(log_probs.detach().exp().cpu(), 1, generator=generator).squeeze(1)
            for row, label in enumerate(sampled.tolist()):
                grads = torch.autograd.grad(-log_probs[row, label], list(parameters.values()), retain_graph=True)
                for name, grad in zip(parameters, grads):
                    fisher[name] += grad.detach() ** 2
    finally:
        kind.load_values(saved)
    return {name: value / max(len(images), 1) for name, value in fisher.items()}


def _cached_fisher(kind: Kind, data: Features, seed: int, cache_key: str | None,
                   cache_dir: Path | None) -> dict[str, torch.Tensor]:
    if cache_key is None or cache_dir is None:
        return fisher_diagonal(kind, data, seed=seed)
    digest = hashlib.sha256(json.dumps([FISHER_CACHE_FORMAT, cache_key, seed, FISHER_IMAGES]).encode()).hexdigest()
    path = Path(cache_dir) / "fisher" / f"{digest}.safetensors"
    stored = read_cache_entry(path, device=str(data.features.device))
    if stored is not None and stored.keys() == kind.trainable().keys():
        return stored
    fisher = fisher_diagonal(kind, data, seed=seed)
    write_cache_entry(path, fisher)
    return fisher
