"""CoOp / KgCoOp soft prompts on an open_clip text tower.

The learnt context ``ctx`` replaces the embeddings of ``n_ctx`` placeholder words in
``"X X X X {class}."``; the start token before it and the class tokens after it (CoOp's
``token_prefix`` / ``token_suffix``) are rebuilt from the current class names, so a file
from another code base or another class list works. Every sequence is cut at the longest
end-of-text position of its class set.

Where the class tokens sit (CoOp's ``CLASS_TOKEN_POSITION``): ``end`` gives
``[SOS][ctx][class][.][EOS]``, ``middle`` splits the context in two halves around the class
(the first ``n_ctx // 2`` tokens before it), ``front`` gives ``[SOS][class][ctx][.][EOS]``.
Only tokens between the start token and the full stop move, so the end-of-text position (or
a Hugging Face tower's attention mask) is the same in every arrangement.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, Kind, KindOptions, KindOutput, PathSpace, RepairDefaults
from repair.kinds.base import Schedule, backbone_copies, logit_scale_option, option
from repair.model.backbone import Backbone
from repair.model.shared_prefix import CLASS_CHUNK

DEFAULT_CTX_INIT = "a photo of a"
PLACEHOLDER = "X"


class ClassTokenPosition(str, enum.Enum):
    """Where a prompt puts the class name relative to its context (CoOp's three choices)."""

    end = "end"
    middle = "middle"
    front = "front"


def find_ctx(tensor_file: TensorFile) -> tuple[str, torch.Tensor] | None:
    """The prompt context in a file: ``ctx`` at the top level or under any prefix."""
    for key in sorted(tensor_file.tensors, key=len):
        if key == "ctx" or key.endswith(".ctx"):
            return key, tensor_file.tensors[key]
    return None


PROMPT_BUFFERS = ("token_prefix", "token_suffix")  # Dassl's prompt learners save these; rebuilt here


def prompt_buffers(tensor_file: TensorFile, ctx_key: str, ctx: torch.Tensor) -> list[str]:
    """The ``token_prefix`` / ``token_suffix`` beside ``ctx_key`` that fit it as CoOp's buffers do: one row per
    class (one per context, for a class-specific one), the start token alone in the prefix, the context's
    width. Others (PLOT's N prompts per class repeat every row N times) are not CoOp's, and stay unclaimed."""
    stem = ctx_key[: -len("ctx")]
    found = {name: tensor_file.tensors.get(stem + name) for name in PROMPT_BUFFERS}
    rows = {int(t.shape[0]) for t in found.values() if t is not None and t.dim() == 3}
    fits = (len(rows) == 1 and all(t is None or (t.dim() == 3 and t.shape[-1] == ctx.shape[-1]) for t in found.values())
            and (found["token_prefix"] is None or found["token_prefix"].shape[1] == 1)
            and (ctx.dim() == 2 or rows == {int(ctx.shape[0])}))
    return [stem + name for name, tensor in found.items() if tensor is not None] if fits else []


def _check_fits(backbone: Backbone, prompts: Sequence[str], n_ctx: int) -> None:
    """The tokenizer would silently cut a prompt longer than the text context: refuse it instead."""
    context = getattr(backbone.tokenizer, "context_length", None)
    if context is None:
        return
    for prompt in prompts:
        needed = _token_count(backbone.tokenizer, prompt)
        if needed is None:
            return
        if needed > context:
            raise IncompatibleCheckpointError(
                f"a prompt of {n_ctx} context tokens and the class name {prompt.split(' ', n_ctx)[-1].rstrip('.')!r} needs "
                f"{needed} tokens, but this model's text context holds {context}")


def _token_count(tokenizer: object, text: str) -> int | None:
    """Tokens of ``text`` with its start and end tokens, before any truncation (None: cannot tell)."""
    if hasattr(tokenizer, "encode"):  # open_clip's BPE tokenizer
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's wrapper around a Hugging Face tokenizer
    if inner is not None:
        return len(inner(text)["input_ids"])
    return None


PAIR_ROWS = 64  # prompts per backward in pair_logit_gradients (their activations stay a few hundred MB)


class PromptBank(nn.Module):
    """Frozen token embeddings around the context for one class list, cut at end-of-text."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], n_ctx: int,
                 position: ClassTokenPosition = ClassTokenPosition.end) -> None:
        super().__init__()
        placeholder = " ".join([PLACEHOLDER] * n_ctx)
        prompts = [f"{placeholder} {name}." for name in classnames]
        _check_fits(backbone, prompts, n_ctx)
        tokens, pooling = backbone.text.cut(backbone.tokenize(prompts))
        if n_ctx and not bool((tokens[:, 1:1 + n_ctx] == tokens[:1, 1:2]).all()):
            raise IncompatibleCheckpointError(
                f"this text tower's tokenizer does not read the placeholder {PLACEHOLDER!r} as one token; "
                "prompts cannot be placed in it")
        with torch.no_grad():
            embeddings = backbone.text.embed(tokens).float()
        self.register_buffer("prefix", embeddings[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("pooling", pooling, persistent=False)  # end-of-text positions, or a mask
        self.num_classes = len(classnames)
        order = None
        if position is not ClassTokenPosition.end:  # the class tokens: after the context, before the full stop
            name_lengths = backbone.text.content_end(tokens) - 2 - n_ctx
            order = torch.stack([_arrangement(tokens.shape[1], n_ctx, int(length), position)
                                 for length in name_lengths.tolist()])
        self.register_buffer("order", order, persistent=False)

    def assemble(self, ctx: torch.Tensor, class_specific: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[*, (C,) n_ctx, D] contexts -> [*, C, L, D] prompt embeddings; ``rows``: only those classes'."""
        prefix, suffix, order = self.prefix, self.suffix, self.order
        if rows is not None:
            prefix, suffix = prefix[rows], suffix[rows]
            order = None if order is None else order[rows]
        classes = len(prefix)
        leading = ctx.shape[:-3] if class_specific else ctx.shape[:-2]
        if not class_specific:  # shared context: the same for every class
            ctx = ctx.unsqueeze(-3).expand(*leading, classes, *ctx.shape[-2:])
        prefix = prefix.expand(*leading, *prefix.shape)
        suffix = suffix.expand(*leading, *suffix.shape)
        prompts = torch.cat([prefix, ctx.to(prefix), suffix], dim=-2)  # the "end" arrangement
        if order is None:
            return prompts
        positions = torch.arange(classes, device=prompts.device).unsqueeze(1)
        return prompts[..., positions, order, :]


def _arrangement(length: int, n_ctx: int, name_length: int, position: ClassTokenPosition) -> torch.Tensor:
    """Positions of the "end" prompt, in the order ``position`` reads them (one class of ``name_length`` tokens)."""
    context = list(range(1, 1 + n_ctx))
    name = list(range(1 + n_ctx, 1 + n_ctx + name_length))
    rest = list(range(1 + n_ctx + name_length, length))
    if position is ClassTokenPosition.front:
        middle = name + context
    else:  # CoOp's middle: the first n_ctx // 2 context tokens, the class, the rest of the context
        half = n_ctx // 2
        middle = context[:half] + name + context[half:]
    return torch.tensor([0] + middle + rest)


@dataclass(frozen=True)
class CoOpOptions(KindOptions):
    ctx_init: str = option(DEFAULT_CTX_INIT, "Prompts: the zero-shot words the context starts from (w_zs).")
    path_space: PathSpace = option(PathSpace.feature, "Interpolate the path in 'feature' space (cheap) or "
                                   "'weight' space (exact, K more text passes).", stages=("repair",))
    logit_scale: float | None = logit_scale_option()
    n_ctx: int | None = option(None, "Context tokens (default: the words of --ctx-init; another count starts "
                               "from CoOp's random init, N(0, 0.02)).", stages=("finetune",))
    class_specific: bool = option(False, "One context per class (CoOp CSC).", stages=("finetune",))
    class_token_position: ClassTokenPosition = option(
        ClassTokenPosition.end, "Prompts: where the class name sits: 'end' ([ctx] class.), 'middle' (half the "
        "context on each side) or 'front' (class [ctx].), as CoOp's CLASS_TOKEN_POSITION; recorded in outputs.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_ctx is not None and self.n_ctx < 1:
            raise ValueError(f"n_ctx must be at least 1, got {self.n_ctx}")
        if not isinstance(self.ctx_init, str) or not self.ctx_init.strip():
            raise ValueError("ctx_init must hold at least one word (the prompt's zero-shot start, e.g. 'a photo of a')")


class CoOpPrompts(Kind):
    """Soft prompts: ``ctx [n_ctx, D]`` (shared) or ``[n_cls, n_ctx, D]`` (class-specific)."""

    name: ClassVar[str] = "coop"
    Options: ClassVar[type[KindOptions]] = CoOpOptions
    about: ClassVar[About] = About(
        title="CoOp", description="CoOp soft prompt", trained_tensors="`ctx` [n_ctx, width] or [n_cls, n_ctx, width]",
        scores_unseen_classes=True)  # a shared context prompts any class name (class-specific ones: see can_score)
    defaults: ClassVar[RepairDefaults] = RepairDefaults(  # benchmarks/DEFAULTS.md
        surrogate="feature", lam_zs=3.0, schedule=Schedule(steps=100, batch_size=128, step_size=0.1))
    # plain fine-tuning fits the shots closely, as CoOp's own long recipe does (the checkpoint that forgets)
    finetune_schedule: ClassVar[Schedule] = Schedule(steps=200, batch_size=32, step_size=0.2)
    shared_prefix: bool = True  # encode [SOS][ctx] once for all classes (exact; see repair.model.shared_prefix)
    text_chunk_size: int | None = CLASS_CHUNK  # classes per checkpointed text chunk; None: all at once

    def __init__(self, backbone: Backbone, ctx: torch.Tensor, classnames: Sequence[str],
                 templates: Sequence[str], options: CoOpOptions | None = None, *, ctx_key: str = "ctx") -> None:
        self._check_shape(backbone, ctx, classnames)
        super().__init__(backbone, classnames, templates, options)
        options = self.options
        self.ctx_key = ctx_key
        self.ctx_init = options.ctx_init
        self.input_dtype = ctx.dtype
        self.class_specific = ctx.dim() == 3
        self.n_ctx = int(ctx.shape[-2])
        self.scale = float(options.logit_scale if options.logit_scale is not None else backbone.logit_scale)
        self.path_space = options.path_space
        self.ctx = nn.Parameter(ctx.detach().to(backbone.device, torch.float32).clone())
        self.register_buffer("ctx_ft", self.ctx.detach().clone(), persistent=False)
        self._banks: dict[tuple[str, ...], PromptBank] = {}
        self.bank = self._bank(self.classnames)
        self._alongside: tuple[str, ...] | None = None  # names forward() encodes with the classes (encode_alongside)
        self._alongside_features: torch.Tensor | None = None
        with torch.no_grad():
            self.register_buffer("ft_features", self._text_features(self.ctx_ft, self.bank), persistent=False)
            self.register_buffer(
                "zs_features", backbone.zero_shot_classifier(self.classnames, self.templates), persistent=False
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return find_ctx(tensor_file) is not None

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        found = find_ctx(tensor_file)
        return [found[0]] if found else []

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        """``ctx`` trained; its ``token_prefix`` / ``token_suffix`` rebuilt from the class names; copies of the
        CLIP towers (a Dassl ``CustomCLIP`` saved whole) frozen. Anything else (a second context, a meta-net,
        deep or vision prompts) is left over, so the file is not read as a plain prompt."""
        found = find_ctx(tensor_file)
        if found is None:
            return Claims(trained=())
        key, ctx = found
        rebuilt = prompt_buffers(tensor_file, key, ctx)
        return Claims(trained=(key,), rebuilt=tuple(rebuilt),
                      frozen=backbone_copies(list(tensor_file.tensors), [key, *rebuilt]))

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: CoOpOptions | None = None) -> CoOpPrompts:
        found = find_ctx(tensor_file)
        if found is None:
            keys = ", ".join(sorted(tensor_file.tensors)[:6]) or "none"
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no prompt context 'ctx' (tensors: {keys})")
        key, ctx = found
        return cls(backbone, ctx, classnames, templates, options, ctx_key=key)  # the output keeps the name

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: CoOpOptions | None = None) -> CoOpPrompts:
        """A fresh prompt at ``w_zs``: the embeddings of ``ctx_init`` (what plain CoOp starts from)."""
        options = options or CoOpOptions()
        ctx = init_context(backbone, options.ctx_init)
        if options.n_ctx is not None and options.n_ctx != ctx.shape[0]:  # CoOp's random init, e.g. n_ctx=16
            generator = torch.Generator().manual_seed(0)
            shape = (len(classnames),) if options.class_specific else ()
            ctx = 0.02 * torch.randn(*shape, options.n_ctx, backbone.text_width, generator=generator)
            return cls(backbone, ctx.to(backbone.device), classnames, templates, options)
        if options.class_specific:
            ctx = ctx.unsqueeze(0).repeat(len(classnames), 1, 1)
        return cls(backbone, ctx, classnames, templates, options)

    @staticmethod
    def _check_shape(backbone: Backbone, ctx: torch.Tensor, classnames: Sequence[str]) -> None:
        if ctx.dim() not in (2, 3) or ctx.shape[-1] != backbone.text_width:
            raise IncompatibleCheckpointError(
                f"ctx has shape {list(ctx.shape)}; expected [n_ctx, {backbone.text_width}] "
                f"or [n_cls, n_ctx, {backbone.text_width}] for this model's text width"
            )
        if ctx.shape[-2] == 0:
            raise IncompatibleCheckpointError(f"ctx has shape {list(ctx.shape)}: a prompt of no tokens, nothing to "
                                              "train or score")
        if ctx.dim() == 3 and ctx.shape[0] != len(classnames):
            raise IncompatibleCheckpointError(
                f"class-specific ctx is for {ctx.shape[0]} classes but the data has {len(classnames)}"
            )
        if not torch.is_floating_point(ctx):
            raise IncompatibleCheckpointError(f"ctx has dtype {ctx.dtype}; expected a floating-point tensor")

    def _bank(self, classnames: Sequence[str]) -> PromptBank:
        key = tuple(classnames)
        if key not in self._banks:
            self._banks[key] = PromptBank(self.backbone, key, self.n_ctx, self.options.class_token_position)
        return self._banks[key]

    # ------------------------------------------------------------------ encoding

    def _text_features(self, ctx: torch.Tensor, bank: PromptBank) -> torch.Tensor:
        """Normalised class features for one or a stack of contexts: [..., C, E]."""
        text = self.backbone.text
        if self.shared_prefix and not self.class_specific and bank.order is None:
            leading = ctx.shape[:-2]  # [SOS][ctx] is the same for every class: the tower may encode it once
            contexts = ctx.reshape(-1, *ctx.shape[-2:])
            start = bank.prefix[:1].expand(len(contexts), -1, -1).to(contexts)
            features = text.encode_prompts(torch.cat([start, contexts], dim=1), bank.suffix, bank.pooling,
                                           chunk_size=self.text_chunk_size).float()
            return F.normalize(features, dim=-1).reshape(*leading, bank.num_classes, -1)
        prompts = bank.assemble(ctx, self.class_specific)
        leading = prompts.shape[:-3]
        flat = prompts.reshape(-1, *prompts.shape[-2:])
        repeats = flat.shape[0] // bank.num_classes
        pooling = bank.pooling.repeat(repeats, *([1] * (bank.pooling.dim() - 1)))
        features = text.encode_rows(flat, pooling, chunk_size=self.text_chunk_size).float()
        return F.normalize(features, dim=-1).reshape(*leading, bank.num_classes, -1)

    @contextmanager
    def encode_alongside(self, classnames: Sequence[str] | None) -> Iterator[None]:
        """One text pass per step for the classes and a surrogate's names (a pass has a fixed cost, the
        shared prefix included, that two small passes pay twice); a class-specific prompt scores none."""
        self._alongside = tuple(classnames) if classnames and not self.class_specific else None
        try:
            yield
        finally:
            self._alongside, self._alongside_features = None, None

    def _own_text_features(self) -> torch.Tensor:
        """The class features at ``w``, and the :meth:`encode_alongside` names' in the same pass."""
        if self._alongside is None:
            return self._text_features(self.ctx, self.bank)
        both = self._text_features(self.ctx, self._bank([*self.classnames, *self._alongside]))
        self._alongside_features = both[len(self.classnames):]
        return both[:len(self.classnames)]

    def class_features(self, classnames: Sequence[str] | None = None) -> torch.Tensor:
        if classnames is None or list(classnames) == self.classnames:
            return self._text_features(self.ctx, self.bank)
        if self._alongside_features is not None and tuple(classnames) == self._alongside:
            features, self._alongside_features = self._alongside_features, None  # taken once: this step's
            return features
        if self.class_specific:
            raise IncompatibleCheckpointError(
                "a class-specific prompt can only score the classes it was trained on")
        return self._text_features(self.ctx, self._bank(classnames))

    def pair_logit_gradients(self, inputs: torch.Tensor, classnames: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """Each row's prompt gets its own copy of the context, so one backward gives every row's gradient:
        a vocabulary Fisher's drawn labels (mostly distinct names) cost a batched text pass, not one pass each."""
        if self.class_specific or list(self.trainable()) != ["ctx"]:
            return None
        text = self.backbone.text
        bank = PromptBank(self.backbone, classnames, self.n_ctx, self.options.class_token_position)
        order = torch.argsort(text.row_lengths(bank.pooling).cpu(), stable=True)  # similar lengths share a chunk
        grads = torch.empty(len(classnames), *self.ctx.shape, device=self.ctx.device)
        for chunk in order.split(PAIR_ROWS):
            contexts = self.ctx.detach().expand(len(chunk), *self.ctx.shape).clone().requires_grad_(True)
            pooling = bank.pooling[chunk.to(bank.pooling.device)]
            prompts = bank.assemble(contexts, class_specific=True, rows=chunk.to(bank.prefix.device))
            prompts, pooling = text.trim(prompts, pooling, int(text.row_lengths(pooling).max()))
            with torch.enable_grad():
                features = F.normalize(text.encode_embeddings(prompts, pooling).float(), dim=-1)
                logits = self.scale * (inputs[chunk.to(inputs.device)].float() * features).sum(dim=-1)
                (grads[chunk.to(grads.device)],) = torch.autograd.grad(logits.sum(), [contexts])
        return {"ctx": grads}

    def scores_other_classes(self) -> bool:
        return not self.class_specific  # one context per class cannot prompt a new class

    # ------------------------------------------------------------------ Kind protocol

    def forward(self, inputs: torch.Tensor, path_ts: torch.Tensor | None = None) -> KindOutput:
        text = self._own_text_features()
        logits = self.scale * inputs @ text.t()
        path_logits = None
        if path_ts is not None:
            path_text = self._path_features(text, path_ts)
            path_logits = self.scale * torch.einsum("be,kce->kbc", inputs, path_text)
        return KindOutput(logits=logits, path_logits=path_logits, class_features=text)

    def _path_features(self, text: torch.Tensor, path_ts: torch.Tensor) -> torch.Tensor:
        """[K, C, E] class features at w_ft + t (w - w_ft), in feature or weight space."""
        ts = path_ts.to(text)
        if self.path_space is PathSpace.feature:
            ft = self.ft_features
            return F.normalize(ft + ts.view(-1, 1, 1) * (text - ft), dim=-1)
        shape = (-1,) + (1,) * self.ctx.dim()
        contexts = self.ctx_ft + ts.view(shape) * (self.ctx - self.ctx_ft)
        return self._text_features(contexts, self.bank)

    def logits_for(self, features: torch.Tensor, classnames: Sequence[str]) -> torch.Tensor:
        return self.scale * features @ self.class_features(classnames).t()

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.zs_features

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        ctx = init_context(self.backbone, self.ctx_init)
        if ctx.shape[0] != self.n_ctx:
            raise IncompatibleCheckpointError(
                f"the zero-shot prompt {self.ctx_init!r} is {ctx.shape[0]} tokens but the checkpoint has "
                f"n_ctx={self.n_ctx}; pass --ctx-init with {self.n_ctx} tokens"
            )
        if self.class_specific:
            ctx = ctx.unsqueeze(0).expand_as(self.ctx)
        return {"ctx": ctx.to(self.ctx)}

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.ctx_ft}

    def unsupported_surrogates(self) -> dict[str, str]:
        """A prompt of another length than the --ctx-init words (CoOp's random init, n_ctx=16) has no zero-shot
        point in prompt space; the feature surrogate needs none (its anchor is the template text features)."""
        words = int(init_context(self.backbone, self.ctx_init).shape[0])
        if words == self.n_ctx:
            return {}
        reason = (f"it has no zero-shot point in prompt space (n_ctx={self.n_ctx}, but --ctx-init "
                  f"{self.ctx_init!r} is {words} tokens)")
        return {"fisher": reason, "l2": reason}

    def export(self) -> dict[str, torch.Tensor]:
        return {self.ctx_key: self.ctx.detach().cpu().to(self.input_dtype)}

    def describe(self) -> dict[str, object]:
        return {"n_ctx": self.n_ctx, "class_specific": self.class_specific,
                "input_dtype": str(self.input_dtype).removeprefix("torch.")}


def init_context(backbone: Backbone, words: str) -> torch.Tensor:
    """Token embeddings of ``words`` (no start/end tokens): CoOp's ``ctx_init``, i.e. ``w_zs``."""
    tokens = backbone.tokenize([words])
    end = int(backbone.text.content_end(tokens)[0])
    with torch.no_grad():
        return backbone.text.embed(tokens[0, 1:end]).float().clone()
