"""Running a CLIP tower with insertions: deep prompts at block i, prompt tokens in the image sequence,
adapters beside a block. Every kind that changes the towers themselves (MaPLe, PromptSRC, MMA) declares
an :class:`Insertions` value per tower and per forward pass; this module is the one place that runs a
tower with it.

What each insertion means, as the upstream code bases define it:

- ``prompts[i]`` (``[n, width]``): rows that *replace* the prompt positions of block ``i``'s input.
  Text: positions ``1 .. n`` (after the start token, where the learnt context sits); image: the last
  ``n`` positions (the appended ``tokens``). MaPLe's compound prompts and the IVLP / PromptSRC
  ``VPT_shallow`` prompts of layers ``1 .. depth - 1``.
- ``tokens`` (image tower, ``[n, width]``): appended after the patch tokens, after the positional
  embedding and before ``ln_pre`` (MaPLe's projected ``shared_ctx``, PromptSRC's ``VPT``). They are
  dropped again before pooling, so they shape the class token through attention only.
- ``adapters[i]``: ``block(x) + adapter(block.ln_1(x))``, MMA's adapter added after block ``i``'s MLP,
  reading the block's own input normalisation.
- ``input_adapter``: MMA's index 0: on the token embeddings (text) or after ``ln_pre`` (image).

Text stays cut at end-of-text (the transformer is causal and every insertion sits before the end-of-text
token, so the cut is exact) and keeps the class-chunked encoding of :meth:`TextTower.encode_rows`; only the
shared-prefix path is off, since prompts replaced inside the blocks are not the tokens it would share.
open_clip's own towers run block by block here, with their own modules; a Hugging Face text tower runs
its own forward with the prompts put in by hooks on its layers, installed inside each (re)computed call
so that activation checkpointing recomputes the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.model.backbone import HFTextTower, NativeTextTower, TextTower
from repair.model.shared_prefix import project_text, supports_shared_prefix

Adapter = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Insertions:
    """What one forward pass puts into one tower; block indices count from 0."""

    prompts: Mapping[int, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    adapters: Mapping[int, Adapter] = field(default_factory=dict)
    input_adapter: Adapter | None = None

    @property
    def empty(self) -> bool:
        return not self.prompts and self.tokens is None and not self.adapters and self.input_adapter is None

    def check(self, blocks: int, tower: str) -> None:
        """Every insertion names a block the tower has (a file for a deeper model is refused, not cut)."""
        deepest = max([*self.prompts, *self.adapters], default=-1)
        if deepest >= blocks:
            raise IncompatibleCheckpointError(
                f"the checkpoint inserts into block {deepest + 1} of the {tower} tower, which has {blocks} blocks")


def mma_adapter(down: tuple[torch.Tensor, torch.Tensor], up: tuple[torch.Tensor, torch.Tensor],
                shared: tuple[torch.Tensor, torch.Tensor] | None, scale: float) -> Adapter:
    """MMA's adapter: ``scale * up(shared(down(x)))``, each of ``down`` and ``shared`` a linear layer + ReLU."""

    def adapter(x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(nn.functional.linear(x, down[0].to(x.dtype), down[1].to(x.dtype)))
        if shared is not None:
            y = torch.relu(nn.functional.linear(y, shared[0].to(x.dtype), shared[1].to(x.dtype)))
        return scale * nn.functional.linear(y, up[0].to(x.dtype), up[1].to(x.dtype))

    return adapter


# ----------------------------------------------------------------------------------------- blocks


def _replace_front(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Text: positions ``1 .. n`` of [N, L, width] replaced by ``rows`` [n, width] (or [N, n, width])."""
    count = rows.shape[-2]
    return torch.cat([x[:, :1], rows.to(x.dtype).expand(len(x), -1, -1), x[:, 1 + count:]], dim=1)


def _replace_back(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Image: the last ``n`` positions (the appended prompt tokens) replaced by ``rows``."""
    count = rows.shape[-2]
    return torch.cat([x[:, :-count], rows.to(x.dtype).expand(len(x), -1, -1)], dim=1)


def _run_blocks(transformer: nn.Module, x: torch.Tensor, insertions: Insertions,
                replace: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip's ``Transformer.forward`` (batch first), with the insertions before and after each block."""
    for index, block in enumerate(transformer.resblocks):
        if index in insertions.prompts:
            x = replace(x, insertions.prompts[index])
        out = block(x, attn_mask=attn_mask)
        if index in insertions.adapters:
            out = out + insertions.adapters[index](block.ln_1(x))
        x = out
    return x


def _check_blocks(transformer: nn.Module, tower: str) -> None:
    if not getattr(transformer, "batch_first", True):
        raise IncompatibleCheckpointError(f"the {tower} transformer is not batch-first (open_clip before 2.26); "
                                          "insertions need a newer open_clip")


# ----------------------------------------------------------------------------------------- image tower


def image_insertions_unsupported(visual: nn.Module) -> str | None:
    """Why prompts or adapters cannot go into this image tower (None: they can): open_clip's ViT only."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        return f"the image tower is a {type(visual).__name__}, not a ViT: it has no token sequence to prompt"
    if visual.attn_pool is not None:
        return "the image tower pools with attention (CoCa); prompt tokens are defined for class-token pooling"
    if not all(type(block) is ResidualAttentionBlock for block in visual.transformer.resblocks):
        return "the image tower's blocks are not open_clip's plain attention blocks"
    return None


def encode_image(visual: nn.Module, pixels: torch.Tensor, insertions: Insertions) -> torch.Tensor:
    """Raw (unnormalised) image features of ``pixels`` through open_clip's ``VisionTransformer`` with the
    insertions: its ``forward`` step by step, with the tokens appended before ``ln_pre``."""
    reason = image_insertions_unsupported(visual)
    if reason is not None:
        raise IncompatibleCheckpointError(reason)
    _check_blocks(visual.transformer, "image")
    insertions.check(len(visual.transformer.resblocks), "image")
    if insertions.prompts and insertions.tokens is None:
        raise IncompatibleCheckpointError("deep image prompts replace appended prompt tokens, and there are none")
    x = visual.conv1(pixels)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid ** 2, width]
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    x = visual.patch_dropout(x + visual.positional_embedding.to(x.dtype))
    if insertions.tokens is not None:
        x = torch.cat([x, insertions.tokens.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x)
    if insertions.input_adapter is not None:
        x = x + insertions.input_adapter(x)
    x = _run_blocks(visual.transformer, x, insertions, _replace_back)
    if insertions.tokens is not None:
        x = x[:, :-insertions.tokens.shape[-2]]
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled


# ----------------------------------------------------------------------------------------- text tower


def text_insertions_unsupported(tower: TextTower, insertions: Insertions) -> str | None:
    """Why these insertions cannot go into this text tower (None: they can)."""
    if isinstance(tower, NativeTextTower):
        return None if supports_shared_prefix(tower.model) else \
            "the text tower is not open_clip's causal transformer of plain attention blocks"
    if isinstance(tower, HFTextTower):
        if insertions.adapters:
            return ("in-block adapters read a block's ln_1 (MMA); a Hugging Face text tower's layers have none, so "
                    "they need open_clip's own CLIP text tower")
        return None if _hf_layers(tower.text.transformer) is not None else \
            f"the Hugging Face text tower {type(tower.text.transformer).__name__} has no encoder layer list"
    return f"the text tower {type(tower).__name__} takes no insertions"


def with_insertions(tower: TextTower, insertions: Insertions) -> TextTower:
    """``tower`` running with ``insertions`` on every call: same cut, pooling and class chunks."""
    if insertions.empty:
        return tower
    reason = text_insertions_unsupported(tower, insertions)
    if reason is not None:
        raise IncompatibleCheckpointError(reason)
    return InsertedTextTower(tower, insertions)


class InsertedTextTower(TextTower):
    """A text tower whose every forward pass carries the same insertions (see the module docstring)."""

    def __init__(self, tower: TextTower, insertions: Insertions) -> None:
        self.tower = tower
        self.insertions = insertions
        self.width, self.output_dim = tower.width, tower.output_dim
        self.module, self.prefix = tower.module, tower.prefix
        if isinstance(tower, NativeTextTower):
            _check_blocks(tower.model.transformer, "text")
            insertions.check(len(tower.model.transformer.resblocks), "text")
        else:
            insertions.check(len(_hf_layers(tower.text.transformer)), "text")

    def describe(self) -> str:
        return self.tower.describe()

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.embed(tokens)

    def cut(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower.cut(tokens)

    def content_end(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower.content_end(tokens)

    def row_lengths(self, pooling: torch.Tensor) -> torch.Tensor:
        return self.tower.row_lengths(pooling)

    def trim(self, rows: torch.Tensor, pooling: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tower.trim(rows, pooling, length)

    def encode_embeddings(self, embeddings: torch.Tensor, pooling: torch.Tensor,
                          parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if parameters:
            raise ValueError("a tower with insertions runs its own weights")
        if self.insertions.input_adapter is not None:
            embeddings = embeddings + self.insertions.input_adapter(embeddings)
        if isinstance(self.tower, NativeTextTower):
            return _encode_native_text(self.tower.model, embeddings, pooling, self.insertions)
        with _hf_prompts(_hf_layers(self.tower.text.transformer), self.insertions):
            return self.tower.encode_embeddings(embeddings, pooling)


def _encode_native_text(model: nn.Module, embeddings: torch.Tensor, eot: torch.Tensor,
                        insertions: Insertions) -> torch.Tensor:
    """open_clip's ``encode_text`` from token embeddings on, cut to their length, with the insertions."""
    length = embeddings.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = _run_blocks(model.transformer, x, insertions, _replace_front, model.attn_mask[:length, :length])
    x = model.ln_final(x)
    return project_text(model, x[torch.arange(x.shape[0], device=x.device), eot])


def _hf_layers(transformer: nn.Module) -> nn.ModuleList | None:
    """The encoder layers of a Hugging Face model (BERT, RoBERTa, XLM-R: ``encoder.layer``)."""
    encoder = getattr(transformer, "encoder", transformer)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


@contextmanager
def _hf_prompts(layers: nn.ModuleList, insertions: Insertions) -> Iterator[None]:
    """Hooks that replace positions ``1 .. n`` of a layer's input hidden states, for one call."""
    handles = []

    def hook(rows: torch.Tensor):
        def replace(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (_replace_front(args[0], rows), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _replace_front(kwargs["hidden_states"], rows)}
        return replace

    try:
        for index, rows in insertions.prompts.items():
            handles.append(layers[index].register_forward_pre_hook(hook(rows), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def text_blocks(tower: TextTower) -> int:
    """How many blocks (layers) the text tower has."""
    if isinstance(tower, NativeTextTower):
        return len(tower.model.transformer.resblocks)
    layers = _hf_layers(tower.text.transformer) if isinstance(tower, HFTextTower) else None
    if layers is None:
        raise IncompatibleCheckpointError(f"the text tower {type(tower).__name__} takes no insertions")
    return len(layers)


def image_blocks(visual: nn.Module) -> int | None:
    """How many blocks the image transformer has (None: not a transformer)."""
    transformer = getattr(visual, "transformer", None)
    return len(transformer.resblocks) if transformer is not None and hasattr(transformer, "resblocks") else None


def text_states(tower: TextTower, embeddings: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """The inputs of blocks ``1 .. blocks - 1`` of open_clip's text transformer for these embeddings
    (no insertions): the hidden states a deep prompt replaces, where the tower is causal."""
    if not isinstance(tower, NativeTextTower):
        raise IncompatibleCheckpointError("hidden states of a prompt prefix are defined for a causal text tower only")
    model = tower.model
    length = embeddings.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    states = []
    for block in list(model.transformer.resblocks)[:blocks - 1]:
        x = block(x, attn_mask=model.attn_mask[:length, :length])
        states.append(x)
    return states


__all__ = ["Adapter", "Insertions", "encode_image", "image_insertions_unsupported", "mma_adapter",
           "image_blocks", "text_blocks", "text_insertions_unsupported", "text_states", "with_insertions"]
