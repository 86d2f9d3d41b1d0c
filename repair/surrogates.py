"""The zero-shot side of the objective: data-free stand-ins for "stay close to w_zs".

Around the zero-shot solution the pretraining loss along ``w_zs -> w`` grows like
``0.5 t^2 d^T H d`` with ``d = w - w_zs``; each surrogate approximates ``H`` differently
(see the README's surrogate table). Each is a function ``(kind, output) -> scalar`` in
:data:`SURROGATES`; adding one is one function and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from repair.kinds.base import Kind, KindOutput


def feature_surrogate(kind: Kind, output: KindOutput) -> torch.Tensor:
    """Gauss-Newton on the class text features: ``1 - mean_c cos(T_c, Z_c)`` (KgCoOp's term)."""
    anchor = kind.zero_shot_class_features()
    return 1.0 - F.cosine_similarity(output.class_features, anchor, dim=-1).mean()


def l2_surrogate(kind: Kind, output: KindOutput) -> torch.Tensor:
    """Isotropic H: ``0.5 ||w - w_zs||^2`` over the trainable tensors (L2-SP)."""
    anchors = kind.zero_shot_values()
    return 0.5 * sum(((tensor - anchors[name]) ** 2).sum() for name, tensor in kind.trainable().items())


Surrogate = Callable[[Kind, KindOutput], torch.Tensor]

SURROGATES: dict[str, Surrogate] = {
    "feature": feature_surrogate,
    "l2": l2_surrogate,
}
