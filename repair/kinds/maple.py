"""MaPLe: multi-modal prompts, coupled (muzairkhattak/multimodal-prompt-learning, ``trainers/maple.py``).

What its ``MultiModalPromptLearner`` trains (ViT-B/16, ``N_CTX`` 2, ``PROMPT_DEPTH`` 9):

- ``prompt_learner.ctx`` [2, 512]: the first ``n_ctx`` tokens of ``ctx_init`` ("a photo of a": the prompt
  is ``[SOS] ctx of a {class}.``), also projected by ``prompt_learner.proj`` ([768, 512] + [768]) into
  ``n_ctx`` tokens appended to the image sequence (after the positional embedding, before ``ln_pre``);
- ``prompt_learner.compound_prompts_text.{0..7}`` [2, 512]: they replace the context positions of the
  text tower's blocks 1..8, and ``compound_prompt_projections.{i}`` ([768, 512] + [768]) projects each into
  the image tokens that replace the appended ones in the image tower's blocks 1..8.

The trainer registers the whole ``CustomCLIP`` (``register_model("MultiModalPromptLearner", self.model)``):
its files also hold the frozen towers (``image_encoder.*``, ``text_encoder.*``, fp16 under its default
``PREC: fp16``), ``logit_scale`` and the ``token_prefix``/``token_suffix`` buffers, which are rebuilt from
the class names. Dtypes under fp16: ``ctx`` and ``proj`` fp16 (``proj.half()``), the compound prompts and
projections fp32; each is written back in its own.

Zero-shot point: none. The projected tokens in the image sequence change every image feature whatever
their values, and the deep text prompts are random-initialised, so ``fisher`` and ``l2`` are refused;
``feature`` (the zero-shot template class features) and ``distill`` (the zero-shot model's predictions)
apply. MaPLe's **text half** (a file without ``proj`` / ``compound_prompt_projections``, or ``finetune
--text-half``, e.g. on a CNN image tower) keeps the frozen image tower; on open_clip's causal
text tower it does have a zero-shot point (the context = the ``ctx_init`` embeddings, each deep prompt =
the zero-shot hidden states it replaces), so every surrogate applies there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, KindOptions, PathSpace, RepairDefaults, Schedule
from repair.kinds.base import logit_scale_option, option
from repair.kinds.coop import DEFAULT_CTX_INIT, init_context
from repair.kinds.prompted import (
    InsertionKind,
    Values,
    canonical_keys,
    check_shape,
    image_width,
    linear_init,
    prompt_words,
    seeded_normal,
    upstream_claims,
    zero_shot_deep_prompts,
)
from repair.model.backbone import Backbone
from repair.model.insertions import Insertions, image_blocks, text_blocks

LEARNER = "prompt_learner."
TEXT_PROMPT = re.compile(r"^prompt_learner\.compound_prompts_text\.(\d+)$")
PROJECTION = re.compile(r"^prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)$")
IGNORED_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")  # rebuilt from class names
FROZEN_TOWERS = ("image_encoder.", "text_encoder.", "logit_scale")  # the pretrained CLIP, saved alongside


@dataclass(frozen=True)
class MaPLeOptions(KindOptions):
    ctx_init: str = option(DEFAULT_CTX_INIT, "Prompts: the words the context starts from (w_zs); MaPLe keeps the "
                           "words after its n_ctx tokens in the prompt.")
    path_space: PathSpace = option(PathSpace.feature, "Interpolate the path in 'feature' space (cheap) or "
                                   "'weight' space (exact, K more text passes).", stages=("repair",))
    logit_scale: float | None = logit_scale_option()
    n_ctx: int | None = option(None, "Context tokens (MaPLe: 2; PromptSRC: the words of --ctx-init).",
                               stages=("finetune",))
    prompt_depth: int = option(9, "MaPLe / PromptSRC: prompt blocks 0 .. N-1 of each tower (their PROMPT_DEPTH; at "
                               "most the tower's depth).", stages=("finetune",))
    text_half: bool = option(False, "MaPLe / PromptSRC: train the text half only (context and deep text prompts; "
                             "the image tower stays frozen), e.g. on a CNN image tower.", stages=("finetune",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {self.n_ctx}")
        if self.prompt_depth < 1:
            raise ValueError(f"prompt_depth must be at least 1, got {self.prompt_depth}")


def maple_keys(tensor_file: TensorFile) -> dict[str, str]:
    """MaPLe's trained tensors in a file: upstream name -> the file's key."""
    keys = canonical_keys(tensor_file)
    wanted = {"prompt_learner.ctx", "prompt_learner.proj.weight", "prompt_learner.proj.bias"}
    return {name: key for name, key in keys.items()
            if name in wanted or TEXT_PROMPT.match(name) or PROJECTION.match(name)}


class MaPLe(InsertionKind):
    """MaPLe's coupled text and image prompts (see the module docstring)."""

    name: ClassVar[str] = "maple"
    Options: ClassVar[type[KindOptions]] = MaPLeOptions
    about: ClassVar[About] = About(
        title="MaPLe", description="MaPLe multi-modal prompt",
        trained_tensors="`prompt_learner.ctx`, `proj`, `compound_prompts_text.N`, `compound_prompt_projections.N`",
        scores_unseen_classes=True)
    # not benchmarked: CoOp's term and strength, CLIPFit's schedule (the image tower runs in every step, as there)
    defaults: ClassVar[RepairDefaults] = RepairDefaults(
        surrogate="feature", lam_zs=3.0, schedule=Schedule(steps=40, batch_size=32, step_size=0.1))
    outranks: ClassVar[tuple[str, ...]] = ("coop",)  # CoOp finds its ctx and would drop everything else

    def __init__(self, backbone: Backbone, values: Mapping[str, torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], options: MaPLeOptions | None = None, *,
                 file_keys: Mapping[str, str] | None = None) -> None:
        super().__init__(backbone, values, classnames, templates, options, file_keys=file_keys or {})
        ctx = values.get(LEARNER + "ctx")
        if ctx is None:
            raise IncompatibleCheckpointError("a MaPLe checkpoint needs prompt_learner.ctx")
        self.n_ctx, width = int(ctx.shape[0]), backbone.text_width
        check_shape("prompt_learner.ctx", ctx, [self.n_ctx, width])
        self.depth = 1 + _count(values, TEXT_PROMPT)
        for index in range(self.depth - 1):
            check_shape(f"compound_prompts_text.{index}", values[_text(index)], [self.n_ctx, width])
        self.touches_image = LEARNER + "proj.weight" in values
        if self.touches_image:
            self._check_projections(values, backbone)
        self.words = prompt_words(backbone, self.options.ctx_init, self.n_ctx)
        self.no_zero_shot_point = ("its prompt tokens in the image sequence change every image feature" if
                                   self.touches_image else "deep prompts in a bidirectional text tower, or no "
                                   "--ctx-init words for the context")
        self._init_features(self._zero_shot_point(backbone))

    def _check_projections(self, values: Mapping[str, torch.Tensor], backbone: Backbone) -> None:
        visual, width = image_width(backbone), backbone.text_width
        expected = {LEARNER + "proj.weight": [visual, width], LEARNER + "proj.bias": [visual]}
        for index in range(self.depth - 1):
            expected.update({_projection(index, "weight"): [visual, width], _projection(index, "bias"): [visual]})
        missing = [name for name in expected if name not in values]
        if missing:
            raise IncompatibleCheckpointError(f"a MaPLe checkpoint with image prompts lacks {missing[0]}")
        if visual is None:
            return  # refused with the text-half hint once the image tower is checked
        for name, shape in expected.items():
            check_shape(name, values[name], shape)

    def _zero_shot_point(self, backbone: Backbone) -> Values | None:
        """The text half's exact zero-shot values (see the module docstring); None with image prompts."""
        if self.touches_image:
            return None
        deep = zero_shot_deep_prompts(backbone, self.words, self.n_ctx, self.depth)
        if deep is None:
            return None
        point = {LEARNER + "ctx": init_context(backbone, self.options.ctx_init)[:self.n_ctx]}
        point.update({_text(index): value for index, value in enumerate(deep)})
        return point

    @classmethod
    def text_half_hint(cls) -> str:
        return ("; its text half alone needs a file without prompt_learner.proj and compound_prompt_projections, "
                "or finetune --text-half")

    # ------------------------------------------------------------------ insertions

    def text_insertions(self, values: Values) -> tuple[torch.Tensor, Insertions]:
        deep = {index + 1: values[_text(index)] for index in range(self.depth - 1)}
        return values[LEARNER + "ctx"], Insertions(prompts=deep)

    def image_insertions(self, values: Values) -> Insertions:
        tokens = F.linear(values[LEARNER + "ctx"], values[LEARNER + "proj.weight"], values[LEARNER + "proj.bias"])
        deep = {index + 1: F.linear(values[_text(index)], values[_projection(index, "weight")],
                                    values[_projection(index, "bias")]) for index in range(self.depth - 1)}
        return Insertions(prompts=deep, tokens=tokens)

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return any(TEXT_PROMPT.match(name) for name in canonical_keys(tensor_file))

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return list(maple_keys(tensor_file).values())

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        return upstream_claims(tensor_file, cls.trainable_keys(tensor_file, options), IGNORED_BUFFERS, FROZEN_TOWERS)

    @classmethod
    def ignored_keys(cls, tensor_file: TensorFile) -> dict[str, str]:
        """Tensors of a MaPLe file it does not train, each with why (for the no-partial-reads check)."""
        ignored = {}
        for name, key in canonical_keys(tensor_file).items():
            if name in IGNORED_BUFFERS:
                ignored[key] = "class-name buffer, rebuilt from the class names"
            elif name.startswith(FROZEN_TOWERS):
                ignored[key] = "frozen CLIP weight saved with the whole model"
        return ignored

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: MaPLeOptions | None = None) -> MaPLe:
        keys = maple_keys(tensor_file)
        values = {name: tensor_file.tensors[key] for name, key in keys.items()}
        return cls(backbone, values, classnames, templates, options, file_keys=keys)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: MaPLeOptions | None = None) -> MaPLe:
        """MaPLe's initialisation: ctx from ``ctx_init``, deep prompts N(0, 0.02), projections as nn.Linear."""
        options = options or MaPLeOptions()
        n_ctx = options.n_ctx or 2
        depth = prompt_depth(backbone, options)
        words = prompt_words(backbone, options.ctx_init, n_ctx)
        width = backbone.text_width
        ctx = (init_context(backbone, words)[:n_ctx] if words == options.ctx_init
               else seeded_normal([n_ctx, width], 0.02, seed=0))
        values = {LEARNER + "ctx": ctx}
        values.update({_text(index): seeded_normal([n_ctx, width], 0.02, seed=1 + index) for index in range(depth - 1)})
        visual = image_width(backbone)
        if not options.text_half:
            if visual is None:
                raise IncompatibleCheckpointError(
                    f"MaPLe's image prompts need a ViT image tower, and this one is a "
                    f"{type(backbone.model.visual).__name__}; pass --text-half to train its text half")
            weight, bias = linear_init(visual, width, seed=100)
            values.update({LEARNER + "proj.weight": weight, LEARNER + "proj.bias": bias})
            for index in range(depth - 1):
                weight, bias = linear_init(visual, width, seed=101 + index)
                values.update({_projection(index, "weight"): weight, _projection(index, "bias"): bias})
        return cls(backbone, values, classnames, templates, options)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "prompt_depth": self.depth}


def _text(index: int) -> str:
    return f"{LEARNER}compound_prompts_text.{index}"


def _projection(index: int, tensor: str) -> str:
    return f"{LEARNER}compound_prompt_projections.{index}.{tensor}"


def _count(values: Mapping[str, torch.Tensor], pattern: re.Pattern) -> int:
    """How many consecutive indices from 0 the pattern's tensors cover; a gap is refused."""
    indices = sorted({int(match.group(1)) for name in values if (match := pattern.match(name))})
    if indices != list(range(len(indices))):
        raise IncompatibleCheckpointError(f"the deep prompts' indices {indices} are not 0 .. {len(indices) - 1}")
    return len(indices)


def prompt_depth(backbone: Backbone, options: MaPLeOptions) -> int:
    """``--prompt-depth``, at most the depth of each prompted tower."""
    depths = [options.prompt_depth, text_blocks(backbone.text)]
    if not options.text_half and image_blocks(backbone.model.visual) is not None:
        depths.append(image_blocks(backbone.model.visual))
    return min(depths)
