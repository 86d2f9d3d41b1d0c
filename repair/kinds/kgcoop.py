"""KgCoOp (htyao89/KgCoOp ``trainers/kgcoop.py``): a CoOp prompt trained with a knowledge-guided term.

KgCoOp's model is CoOp's (the same ``ctx`` in front of the class name, the same scoring); only its
training adds ``1 - cos(T, T_zs)`` towards the zero-shot class features, which is mergetune's
``feature`` surrogate. Its prompt learner also creates two tensors it never uses (its ``forward``
reads only ``ctx`` and the prompt buffers, and only tensors named ``*ctx*`` train): ``bias_vectors``
``[1, 512]`` and ``meta_net.linear1`` ``Linear(512, 512)``, both random at initialisation and hard-coded
to 512 wide. They are saved in every KgCoOp checkpoint, so a KgCoOp file is read as such (not as
plain CoOp), its two unused tensors ignored and written back unchanged: KgCoOp's own loader
(``load_state_dict(strict=False)`` after deleting ``token_prefix`` / ``token_suffix``) then finds
every tensor it saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from repair.io import TensorFile
from repair.kinds.base import About, Claims, KindOptions, RepairDefaults, backbone_copies
from repair.kinds.coop import CoOpOptions, CoOpPrompts, find_ctx, prompt_buffers
from repair.model.backbone import Backbone

UNUSED = {"bias_vectors": (1, 512), "meta_net.linear1.weight": (512, 512), "meta_net.linear1.bias": (512,)}
WHY = "KgCoOp creates it but its forward never reads it"


def unused_keys(tensor_file: TensorFile, ctx_key: str) -> list[str]:
    """KgCoOp's unused tensors beside ``ctx_key`` (any width: they are not read)."""
    stem = ctx_key[: -len("ctx")]
    return [stem + name for name in UNUSED if stem + name in tensor_file.tensors]


class KgCoOpPrompts(CoOpPrompts):
    """A KgCoOp prompt: CoOp's ``ctx`` beside KgCoOp's unused ``bias_vectors`` (and ``meta_net.linear1``)."""

    name: ClassVar[str] = "kgcoop"
    Options: ClassVar[type[KindOptions]] = CoOpOptions
    about: ClassVar[About] = About(
        title="KgCoOp", description="KgCoOp soft prompt",
        trained_tensors="`ctx` [n_ctx, width], beside KgCoOp's unused `bias_vectors` [1, 512] and "
                        "`meta_net.linear1` (kept as they are)",
        scores_unseen_classes=True)
    defaults: ClassVar[RepairDefaults] = CoOpPrompts.defaults  # CoOp's: the same model

    def __init__(self, backbone: Backbone, ctx: torch.Tensor, classnames: Sequence[str], templates: Sequence[str],
                 options: CoOpOptions | None = None, *, ctx_key: str = "ctx",
                 fresh: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(backbone, ctx, classnames, templates, options, ctx_key=ctx_key)
        self.fresh = dict(fresh or {})  # the unused tensors of a prompt made here (a read file carries its own)

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        found = find_ctx(tensor_file)
        return found is not None and found[0][: -len("ctx")] + "bias_vectors" in tensor_file.tensors

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """CoOp's claims, and KgCoOp's unused tensors ignored."""
        found = find_ctx(tensor_file)
        if found is None:
            return Claims(trained=())
        key, ctx = found
        rebuilt = prompt_buffers(tensor_file, key, ctx)
        ignored = {name: WHY for name in unused_keys(tensor_file, key)}
        return Claims(trained=(key,), rebuilt=tuple(rebuilt), ignored=ignored,
                      frozen=backbone_copies(list(tensor_file.tensors), [key, *rebuilt, *ignored]))

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: CoOpOptions | None = None) -> KgCoOpPrompts:
        """CoOp's starting prompt, with the unused tensors KgCoOp's prompt learner creates (seeded N(0, 0.02)
        ``bias_vectors``, ``nn.Linear``'s default initialisation for ``meta_net.linear1``)."""
        model = super().zero_shot(backbone, classnames, templates, options)
        generator = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            linear = nn.Linear(512, 512)
        model.fresh = {"bias_vectors": 0.02 * torch.randn(1, 512, generator=generator),
                       "meta_net.linear1.weight": linear.weight.detach(), "meta_net.linear1.bias": linear.bias.detach()}
        return model

    def export(self) -> dict[str, torch.Tensor]:
        return {**super().export(), **{name: tensor.to(self.input_dtype) for name, tensor in self.fresh.items()}}
