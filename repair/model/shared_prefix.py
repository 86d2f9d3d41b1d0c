"""Text encoding that computes a shared prompt prefix once, and class-chunked encoding that bounds memory.

CLIP's text transformer is causal: the hidden state at position ``i`` depends only on
positions ``<= i``. Every CoOp prompt ``[SOS][ctx][class][.][EOS]`` (and every caption
of one template, ``a photo of a {}.``) starts with the same tokens, so their hidden states
are the same for every class. :func:`encode_shared_prefix` runs that prefix once per
context, and of each class only the suffix positions up to its end-of-text token (the rest
cannot reach the pooled feature), whose queries attend to the prefix's keys and values at
every layer; the prefix rows ride along in the same matrix products, and the last block runs
only the end-of-text rows. It equals the plain encoding up to float rounding, forward and
backward, with ``P + sum_c S_c`` token-passes instead of ``C * (P + max_c S_c)``.

Large class lists (1,000 ImageNet names) are encoded in chunks of classes; while training,
each chunk runs under activation checkpointing, so the peak memory is that of one chunk
and the backward pass recomputes it (one more forward of the suffixes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # open_clip is imported when a model is built; its import takes seconds
    from open_clip.transformer import ResidualAttentionBlock, Transformer

CLASS_CHUNK = 256  # classes per chunk: smaller lists run in one piece, without recomputation
Overrides = dict[str, torch.Tensor]
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [G, H, P, head_dim]


def supports_shared_prefix(model: nn.Module) -> bool:
    """Whether ``model``'s text tower is open_clip's causal transformer made of plain attention blocks."""
    from open_clip.transformer import ResidualAttentionBlock, Transformer

    transformer = getattr(model, "transformer", None)
    if not isinstance(transformer, Transformer) or getattr(model, "attn_mask", None) is None:
        return False
    if getattr(model, "text_pool_type", "argmax") not in ("argmax", "eos"):
        return False
    return all(type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
               and block.attn._qkv_same_embed_dim for block in transformer.resblocks)


def common_prefix_length(tokens: torch.Tensor) -> int:
    """How many leading token ids all rows share."""
    same = (tokens == tokens[:1]).all(dim=0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else tokens.shape[1]


def encode_shared_prefix(model: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor, suffix_eot: torch.Tensor,
                         parameters: Overrides | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Unnormalised features of the prompts ``cat(prefix[g], suffix[c])``: [G, C, embed_dim].

    ``prefix`` [G, P, width] holds token embeddings shared by every class (G contexts, e.g. the
    points of a weight-space path); ``suffix`` [C, S, width] each class's remaining embeddings,
    ``suffix_eot`` [C] the end-of-text index within the suffix. ``parameters`` replaces tensors
    of ``model.transformer`` (names relative to it) as in :func:`repair.model.backbone.encode_token_embeddings`.
    """
    parameters = parameters or {}
    dtype = model.transformer.get_cast_dtype()
    length = prefix.shape[1]
    positions = model.positional_embedding.to(dtype)
    x_prefix = prefix.to(dtype) + positions[:length]
    x_suffix = suffix.to(dtype) + positions[length:length + suffix.shape[1]]

    def pool(hidden: torch.Tensor) -> torch.Tensor:  # [G, c, width] at end-of-text -> [G, c, embed_dim]
        return project_text(model, model.ln_final(hidden))

    if chunk_size is None or len(suffix) <= chunk_size:  # prefix and suffix rows share every matrix product
        return pool(_layers(model.transformer, x_suffix, suffix_eot, parameters, x_prefix=x_prefix)[1])
    key_values, _ = _layers(model.transformer, x_suffix[:0], suffix_eot[:0], parameters, x_prefix=x_prefix)
    flat = [tensor for pair in key_values for tensor in pair]

    def encode(rows: torch.Tensor, eot: torch.Tensor, *flat_key_values: torch.Tensor) -> torch.Tensor:
        pairs = list(zip(flat_key_values[0::2], flat_key_values[1::2]))
        return pool(_layers(model.transformer, rows, eot, parameters, prefix_key_values=pairs)[1])

    return in_class_chunks(lambda rows, eot: encode(rows, eot, *flat), x_suffix, suffix_eot, chunk_size, dim=1)


def in_class_chunks(encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], rows: torch.Tensor,
                    pooling: torch.Tensor, chunk_size: int | None, dim: int = 0) -> torch.Tensor:
    """``encode(rows, pooling)`` over chunks of ``chunk_size`` rows, concatenated along ``dim``.

    Under autograd each chunk is checkpointed: its activations are dropped after the forward
    pass and recomputed in the backward pass, so memory stays that of one chunk.
    """
    if chunk_size is None or len(rows) <= chunk_size:
        return encode(rows, pooling)
    training = torch.is_grad_enabled() and not _under_torch_func()
    parts = []
    for start in range(0, len(rows), chunk_size):
        chunk, chunk_pooling = rows[start:start + chunk_size], pooling[start:start + chunk_size]
        parts.append(checkpoint(encode, chunk, chunk_pooling, use_reentrant=False) if training
                     else encode(chunk, chunk_pooling))
    return torch.cat(parts, dim=dim)


def _under_torch_func() -> bool:
    """Inside a torch.func transform (the Fisher's ``vmap(grad)``), which cannot run checkpointed code:
    there the chunks bound the forward pass only."""
    try:
        from torch._C._functorch import peek_interpreter_stack
    except ImportError:  # another torch layout: assume plain autograd
        return False
    return peek_interpreter_stack() is not None


# ---------------------------------------------------------------------------------------- the layers

def _layers(transformer: Transformer, x_suffix: torch.Tensor, suffix_eot: torch.Tensor, parameters: Overrides, *,
            x_prefix: torch.Tensor | None = None, prefix_key_values: KeyValues | None = None
            ) -> tuple[KeyValues, torch.Tensor]:
    """Every block over the suffixes [C, S, width], attending causally to the prefix; -> (the prefix's
    keys and values per layer, each suffix's last hidden state at its end-of-text token [G, C, width]).

    The prefix comes either as hidden states ``x_prefix`` [G, P, width], run through the blocks
    alongside the suffixes (their rows go through each linear layer together), or as the keys
    and values a previous call returned. Only the positions up to each end-of-text run (the
    rest cannot reach the pooled feature), and the last block runs only the end-of-text rows.
    """
    groups = len(x_prefix) if x_prefix is not None else len(prefix_key_values[0][0])
    layout = _SuffixLayout(suffix_eot, x_suffix.shape[1])
    x = layout.pack(x_suffix.unsqueeze(0).expand(groups, *x_suffix.shape))  # [G, T, width]
    key_values: KeyValues = []
    last = len(transformer.resblocks) - 1
    for index, block in enumerate(transformer.resblocks):
        weights = _block_overrides(parameters, index)
        rows = _Rows(x_prefix, x)
        prefix_qkv, suffix_qkv = rows.split(_qkv(block, _call(block.ln_1, weights, "ln_1", rows.joined), weights))
        if prefix_qkv is not None:
            prefix_query, prefix_key, prefix_value = (_heads(block, part) for part in prefix_qkv.chunk(3, dim=-1))
        else:
            prefix_key, prefix_value = prefix_key_values[index]
        key_values.append((prefix_key, prefix_value))
        query, key, value = (_heads(block, part) for part in layout.pad(suffix_qkv).chunk(3, dim=-1))
        if index == last:  # only the end-of-text rows feed the pooled feature
            attended = _attend_after_prefix(layout.at_end(query), key, value, prefix_key, prefix_value,
                                            layout.visible_from_end)
            return key_values, _finish_block(block, weights, layout.end_rows(x), _merge_heads(attended).squeeze(-2))
        attended = layout.pack(_merge_heads(_attend_after_prefix(query, key, value, prefix_key, prefix_value,
                                                                 layout.causal)))
        width = x.shape[-1]
        attended = attended.reshape(-1, width)
        if prefix_qkv is not None:  # in the order of rows.joined: every prefix row, then every suffix row
            attended_prefix = F.scaled_dot_product_attention(prefix_query, prefix_key, prefix_value, is_causal=True)
            attended = torch.cat([_merge_heads(attended_prefix).reshape(-1, width), attended])
        x_prefix, x = rows.split(_finish_block(block, weights, rows.joined, attended))
    raise ValueError("a text transformer without blocks")


class _SuffixLayout:
    """Where each class's live suffix positions (up to its end-of-text) sit, padded [G, C, S, .] or packed [G, T, .]."""

    def __init__(self, eot: torch.Tensor, length: int) -> None:
        positions = torch.arange(length, device=eot.device)
        self.classes, self.length = len(eot), length
        self.live = (positions <= eot.unsqueeze(1)).flatten().nonzero().squeeze(1)  # [T] in the padded order
        self.ends = (eot + 1).cumsum(0) - 1  # each end-of-text row in the packed order
        self.eot = eot
        self.dense = len(self.live) == self.classes * length  # every suffix is as long as the longest
        self.causal = torch.ones(length, length, dtype=torch.bool, device=eot.device).tril()
        self.visible_from_end = (positions <= eot.unsqueeze(1)).view(len(eot), 1, 1, length)  # [C, 1, 1, S]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return padded.flatten(1, 2)
        return padded.flatten(1, 2).index_select(1, self.live)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        shape = (packed.shape[0], self.classes, self.length, packed.shape[-1])
        if self.dense:
            return packed.view(shape)
        padded = packed.new_zeros(packed.shape[0], self.classes * self.length, packed.shape[-1])
        return padded.index_copy(1, self.live, packed).view(shape)

    def at_end(self, heads: torch.Tensor) -> torch.Tensor:
        """[G, C, H, S, d] -> the end-of-text position only, [G, C, H, 1, d]."""
        index = self.eot.view(1, -1, 1, 1, 1).expand(*heads.shape[:3], 1, heads.shape[-1])
        return heads.gather(3, index)

    def end_rows(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.index_select(1, self.ends)


class _Rows:
    """Prefix [G, P, width] and packed suffix [G, T, width] hidden states as one [rows, width] matrix, and back."""

    def __init__(self, prefix: torch.Tensor | None, suffix: torch.Tensor) -> None:
        self.prefix_shape = prefix.shape if prefix is not None else None
        self.suffix_shape = suffix.shape
        rows = suffix.reshape(-1, suffix.shape[-1])
        self.joined = rows if prefix is None else torch.cat([prefix.reshape(-1, prefix.shape[-1]), rows])

    def split(self, joined: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        width = joined.shape[-1]
        if self.prefix_shape is None:
            return None, joined.view(*self.suffix_shape[:-1], width)
        count = self.prefix_shape[:-1].numel()
        return (joined[:count].view(*self.prefix_shape[:-1], width),
                joined[count:].view(*self.suffix_shape[:-1], width))


def _attend_after_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                         prefix_value: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Suffix queries [G, C, H, Q, d] over the shared prefix's keys [G, H, P, d] and the suffix's own
    [G, C, H, S, d] that ``visible`` ([Q, S] or [C, 1, Q, S]) allows."""
    query = query * query.shape[-1] ** -0.5
    to_prefix = query @ prefix_key.unsqueeze(1).transpose(-1, -2)  # [G, C, H, S, P]: the prefix is not copied
    to_suffix = (query @ key.transpose(-1, -2)).masked_fill(~visible, float("-inf"))
    weights = torch.cat([to_prefix, to_suffix], dim=-1).softmax(dim=-1)
    split = prefix_key.shape[-2]
    return weights[..., :split] @ prefix_value.unsqueeze(1) + weights[..., split:] @ value


# ---------------------------------------------------------------------------------------- one block, by hand

def _qkv(block: ResidualAttentionBlock, x: torch.Tensor, weights: Overrides) -> torch.Tensor:
    """The attention's input projection of rows [N, width]: queries, keys and values side by side [N, 3 width]."""
    attention = block.attn
    return F.linear(x, weights.get("attn.in_proj_weight", attention.in_proj_weight),
                    weights.get("attn.in_proj_bias", attention.in_proj_bias))


def _heads(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """[..., L, width] -> [..., H, L, head_dim]."""
    return x.unflatten(-1, (block.attn.num_heads, -1)).transpose(-2, -3)


def _merge_heads(x: torch.Tensor | None) -> torch.Tensor | None:
    """[..., H, L, head_dim] -> [..., L, width]."""
    return None if x is None else x.transpose(-2, -3).flatten(-2)


def _finish_block(block: ResidualAttentionBlock, weights: Overrides, x: torch.Tensor,
                  attended: torch.Tensor) -> torch.Tensor:
    """The rest of open_clip's block: output projection, layer scale, residual, then the MLP half."""
    out = block.attn.out_proj
    attended = F.linear(attended, weights.get("attn.out_proj.weight", out.weight),
                        weights.get("attn.out_proj.bias", out.bias))
    x = x + _call(block.ls_1, weights, "ls_1", attended)
    mlp = _call(block.mlp, weights, "mlp", _call(block.ln_2, weights, "ln_2", x))
    return x + _call(block.ls_2, weights, "ls_2", mlp)


def _block_overrides(parameters: Overrides, index: int) -> Overrides:
    """The replacement tensors of block ``index``, named relative to the block."""
    if not parameters:
        return {}
    prefix = f"resblocks.{index}."
    return {name[len(prefix):]: value for name, value in parameters.items() if name.startswith(prefix)}


def _call(module: nn.Module, weights: Overrides, name: str, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, with the block's replacement tensors for this submodule swapped in."""
    prefix = name + "."
    swapped = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
    return torch.func.functional_call(module, swapped, (x,)) if swapped else module(x)


def project_text(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The text tower's output projection (a matrix, or an ``nn.Linear`` in some open_clip configs)."""
    projection = model.text_projection
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
