"""PromptSRC: independent text and image prompts (muzairkhattak/PromptSRC, ``trainers/promptsrc.py``).

What its ``VLPromptLearner`` setup trains (ViT-B/16, ``N_CTX_TEXT`` = ``N_CTX_VISION`` = 4,
``PROMPT_DEPTH_TEXT`` = ``PROMPT_DEPTH_VISION`` = 9; the IVLP design of open_clip-like blocks):

- ``prompt_learner.ctx`` [4, 512]: the context of ``[SOS] ctx {class}.`` (from ``ctx_init`` "a photo of a");
- ``text_encoder.transformer.resblocks.{1..8}.VPT_shallow`` [4, 512]: replace the context positions of
  the text tower's blocks 1..8;
- ``image_encoder.VPT`` [4, 768]: tokens appended to the image sequence (after the positional
  embedding, before ``ln_pre``), replaced in blocks 1..8 by
  ``image_encoder.transformer.resblocks.{1..8}.VPT_shallow`` [4, 768].

The trainer registers the whole ``CustomCLIP`` (``register_model("VLPromptLearner", self.model)``): its files
also hold the frozen towers (``image_encoder.*``, ``text_encoder.*``, fp16 under ``PREC: fp16``), a
*second* frozen image tower (``prompt_learner.ZS_image_encoder.*``, the zero-shot teacher of its
self-regularising losses), ``logit_scale`` and the ``token_prefix``/``token_suffix`` buffers; none of these
is trained. The saved prompts are already PromptSRC's Gaussian-weighted average over epochs (GPA): the
average of whole state dicts, so in an fp16 file even the frozen weights may differ from the pretrained ones
by fp16 rounding. ``ctx`` is fp16 under fp16, the ``VPT`` tensors fp32. The same layout without
``ZS_image_encoder`` is the multimodal-prompt-learning repository's IVLP trainer, read the same way; a file
without image prompts (IVLP language-only) is the text half.

Zero-shot point: none with image prompts (appended tokens change every image feature whatever their
values): ``fisher`` and ``l2`` are refused, ``feature`` and ``distill`` apply. The text half on open_clip's
causal text tower has one (context = the ``ctx_init`` embeddings, each deep prompt = the zero-shot hidden
states it replaces). ``finetune`` trains the prompts with the cross-entropy only: PromptSRC's own
self-regularising losses and GPA are not reproduced.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, KindOptions, RepairDefaults, Schedule
from repair.kinds.coop import init_context
from repair.kinds.maple import MaPLeOptions, prompt_depth
from repair.kinds.prompted import (
    InsertionKind,
    Values,
    canonical_keys,
    check_shape,
    image_width,
    prompt_words,
    seeded_normal,
    upstream_claims,
    zero_shot_deep_prompts,
)
from repair.model.backbone import Backbone
from repair.model.insertions import Insertions

CTX = "prompt_learner.ctx"
TEXT_DEEP = re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
IMAGE_TOKENS = "image_encoder.VPT"
IMAGE_DEEP = re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$")
IGNORED_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
FROZEN_TOWERS = ("prompt_learner.ZS_image_encoder.", "image_encoder.", "text_encoder.", "logit_scale")


@dataclass(frozen=True)
class PromptSRCOptions(MaPLeOptions):
    """MaPLe's options; ``n_ctx`` (text and image tokens alike) defaults to the words of ``ctx_init``."""


def promptsrc_keys(tensor_file: TensorFile) -> dict[str, str]:
    """PromptSRC's trained tensors in a file: upstream name -> the file's key."""
    return {name: key for name, key in canonical_keys(tensor_file).items()
            if name in (CTX, IMAGE_TOKENS) or TEXT_DEEP.match(name) or IMAGE_DEEP.match(name)}


class PromptSRC(InsertionKind):
    """Independent deep prompts in both towers (PromptSRC / IVLP; see the module docstring)."""

    name: ClassVar[str] = "promptsrc"
    Options: ClassVar[type[KindOptions]] = PromptSRCOptions
    about: ClassVar[About] = About(
        title="PromptSRC", description="PromptSRC / IVLP deep prompt",
        trained_tensors="`prompt_learner.ctx`, `image_encoder.VPT`, `*.transformer.resblocks.N.VPT_shallow` of both "
                        "towers",
        scores_unseen_classes=True)
    # not benchmarked: CoOp's term and strength, CLIPFit's schedule (the image tower runs in every step, as there)
    defaults: ClassVar[RepairDefaults] = RepairDefaults(
        surrogate="feature", lam_zs=3.0, schedule=Schedule(steps=40, batch_size=32, step_size=0.1))
    outranks: ClassVar[tuple[str, ...]] = ("coop",)  # CoOp finds its ctx and would drop the deep prompts

    def __init__(self, backbone: Backbone, values: Mapping[str, torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], options: PromptSRCOptions | None = None, *,
                 file_keys: Mapping[str, str] | None = None) -> None:
        super().__init__(backbone, values, classnames, templates, options, file_keys=file_keys or {})
        if CTX not in values:
            raise IncompatibleCheckpointError(f"a PromptSRC checkpoint needs {CTX}")
        self.n_ctx, width = int(values[CTX].shape[0]), backbone.text_width
        check_shape(CTX, values[CTX], [self.n_ctx, width])
        self.text_deep = _deep_indices(values, TEXT_DEEP, "text")
        for index in self.text_deep:
            check_shape(_text(index), values[_text(index)], [self.n_ctx, width])
        self.image_deep = _deep_indices(values, IMAGE_DEEP, "image")
        self.touches_image = IMAGE_TOKENS in values
        if self.image_deep and not self.touches_image:
            raise IncompatibleCheckpointError(f"deep image prompts without {IMAGE_TOKENS}, the tokens they replace")
        visual = image_width(backbone)
        if self.touches_image and visual is not None:
            tokens = values[IMAGE_TOKENS]
            check_shape(IMAGE_TOKENS, tokens, [tokens.shape[0], visual])
            for index in self.image_deep:
                check_shape(_image(index), values[_image(index)], list(tokens.shape))
        self.words = prompt_words(backbone, self.options.ctx_init, self.n_ctx)
        self.no_zero_shot_point = ("its prompt tokens in the image sequence change every image feature" if
                                   self.touches_image else "deep prompts in a bidirectional text tower, or no "
                                   "--ctx-init words for the context")
        self._init_features(self._zero_shot_point(backbone))

    def _zero_shot_point(self, backbone: Backbone) -> Values | None:
        if self.touches_image:
            return None
        depth = 1 + max(self.text_deep, default=0)
        deep = zero_shot_deep_prompts(backbone, self.words, self.n_ctx, depth)
        if deep is None:
            return None
        point = {CTX: init_context(backbone, self.options.ctx_init)[:self.n_ctx]}
        point.update({_text(index): deep[index - 1] for index in self.text_deep})
        return point

    @classmethod
    def text_half_hint(cls) -> str:
        return f"; its text half alone needs a file without {IMAGE_TOKENS}, or finetune --text-half"

    # ------------------------------------------------------------------ insertions

    def text_insertions(self, values: Values) -> tuple[torch.Tensor, Insertions]:
        return values[CTX], Insertions(prompts={index: values[_text(index)] for index in self.text_deep})

    def image_insertions(self, values: Values) -> Insertions:
        return Insertions(prompts={index: values[_image(index)] for index in self.image_deep},
                          tokens=values[IMAGE_TOKENS])

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        names = canonical_keys(tensor_file)
        return CTX in names and (IMAGE_TOKENS in names or any(TEXT_DEEP.match(name) for name in names))

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return list(promptsrc_keys(tensor_file).values())

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        return upstream_claims(tensor_file, cls.trainable_keys(tensor_file, options), IGNORED_BUFFERS, FROZEN_TOWERS)

    @classmethod
    def ignored_keys(cls, tensor_file: TensorFile) -> dict[str, str]:
        """Tensors of a PromptSRC file it does not train, each with why (for the no-partial-reads check)."""
        trained = set(promptsrc_keys(tensor_file).values())
        ignored = {}
        for name, key in canonical_keys(tensor_file).items():
            if name in IGNORED_BUFFERS:
                ignored[key] = "class-name buffer, rebuilt from the class names"
            elif name.startswith(FROZEN_TOWERS[0]):
                ignored[key] = "the frozen zero-shot image tower PromptSRC distils from"
            elif name.startswith(FROZEN_TOWERS[1:]) and key not in trained:
                ignored[key] = "frozen CLIP weight saved with the whole model"
        return ignored

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: PromptSRCOptions | None = None) -> PromptSRC:
        keys = promptsrc_keys(tensor_file)
        values = {name: tensor_file.tensors[key] for name, key in keys.items()}
        return cls(backbone, values, classnames, templates, options, file_keys=keys)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: PromptSRCOptions | None = None) -> PromptSRC:
        """PromptSRC's initialisation: ctx from ``ctx_init``, every VPT prompt N(0, 0.02)."""
        options = options or PromptSRCOptions()
        words = len(init_context(backbone, options.ctx_init)) if options.ctx_init else 4
        n_ctx = options.n_ctx or words
        depth = prompt_depth(backbone, options)
        width = backbone.text_width
        ctx_words = prompt_words(backbone, options.ctx_init, n_ctx)
        ctx = (init_context(backbone, ctx_words)[:n_ctx] if ctx_words == options.ctx_init
               else seeded_normal([n_ctx, width], 0.02, seed=0))
        values = {CTX: ctx}
        values.update({_text(index): seeded_normal([n_ctx, width], 0.02, seed=index) for index in range(1, depth)})
        if not options.text_half:
            visual = image_width(backbone)
            if visual is None:
                raise IncompatibleCheckpointError(
                    f"PromptSRC's image prompts need a ViT image tower, and this one is a "
                    f"{type(backbone.model.visual).__name__}; pass --text-half to train its text half")
            values[IMAGE_TOKENS] = seeded_normal([n_ctx, visual], 0.02, seed=100)
            values.update({_image(index): seeded_normal([n_ctx, visual], 0.02, seed=100 + index)
                           for index in range(1, depth)})
        return cls(backbone, values, classnames, templates, options)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "text_depth": 1 + max(self.text_deep, default=0),
                "image_depth": 1 + max(self.image_deep, default=0) if self.touches_image else 0}


def _text(index: int) -> str:
    return f"text_encoder.transformer.resblocks.{index}.VPT_shallow"


def _image(index: int) -> str:
    return f"image_encoder.transformer.resblocks.{index}.VPT_shallow"


def _deep_indices(values: Mapping[str, torch.Tensor], pattern: re.Pattern, tower: str) -> list[int]:
    """Blocks 1 .. d-1 with a deep prompt (IVLP prompts every block below its depth but the first)."""
    indices = sorted(int(match.group(1)) for name in values if (match := pattern.match(name)))
    if indices != list(range(1, len(indices) + 1)):
        raise IncompatibleCheckpointError(f"the {tower} tower's deep prompts sit in blocks {indices}, "
                                          f"not 1 .. {len(indices)}")
    return indices
