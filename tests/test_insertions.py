"""Towers with insertions (repair.model.insertions) against hand-written forwards, forward and gradients.

The references follow the upstream code bases (MaPLe's and IVLP's blocks, MMA's adapters) with the
attention written out from the raw weights, the sequences at full context length in sequence-first
layout, pooled at the end-of-text token: what our tower computes cut at end-of-text, batch first,
with open_clip's modules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from insertion_helpers import reference_block, save_deep_backbone
from repair.model.backbone import BackboneSpec, load_backbone
from repair.model.insertions import Insertions, encode_image, mma_adapter, text_states, with_insertions

PROMPTS = ["a photo of a red.", "a photo of a dark green.", "a photo of a cat.", "a photo of a blue car.",
           "a photo of a very yellow dog."]


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    return load_backbone(BackboneSpec(model=save_deep_backbone(tmp_path_factory.mktemp("deep-clip"))))


def _adapter_params(width: int, hidden: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(hidden, width), (hidden,), (width, hidden), (width,), (hidden, hidden), (hidden,)]
    return [(0.3 * torch.randn(*shape, generator=generator)).requires_grad_() for shape in shapes]


def _ref_adapter(params: list[torch.Tensor], x: torch.Tensor, scale: float) -> torch.Tensor:
    """MMA's ``seq_adapter.up(shared(seq_adapter.down(x))) * scale`` (down and shared: Linear + ReLU)."""
    down_w, down_b, up_w, up_b, shared_w, shared_b = params
    y = torch.relu(x @ down_w.t() + down_b)
    y = torch.relu(y @ shared_w.t() + shared_b)
    return scale * (y @ up_w.t() + up_b)


def _ours_adapter(params: list[torch.Tensor], scale: float):
    return mma_adapter(tuple(params[0:2]), tuple(params[2:4]), tuple(params[4:6]), scale)


def _grads(output: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, output.numel()).view_as(output)
    return torch.autograd.grad((output * weights).sum(), tensors, retain_graph=True)


def test_text_deep_prompts_and_adapters_match_the_upstream_forward(deep):
    model = deep.model
    generator = torch.Generator().manual_seed(0)
    n_ctx, width = 2, deep.text_width
    ctx = (0.1 * torch.randn(n_ctx, width, generator=generator)).requires_grad_()
    deep_prompts = [(0.1 * torch.randn(n_ctx, width, generator=generator)).requires_grad_() for _ in range(2)]
    adapters = [_adapter_params(width, 4, seed) for seed in (1, 2)]
    scale = 0.5
    full = deep.tokenize(PROMPTS)  # [5, 77]: the reference runs the whole context
    with torch.no_grad():
        embedded = model.token_embedding(full)

    def reference() -> torch.Tensor:  # MaPLe's TextEncoder with MMA's blocks, sequence first, 77 positions
        prompts = torch.cat([embedded[:, :1], ctx.expand(len(full), -1, -1), embedded[:, 1 + n_ctx:]], dim=1)
        x = (prompts + model.positional_embedding).permute(1, 0, 2)
        for index, block in enumerate(model.transformer.resblocks):
            if index in (1, 2):  # MaPLe: the counter's compound prompt replaces positions 1 .. n_ctx
                x = torch.cat([x[:1], deep_prompts[index - 1].unsqueeze(1).expand(-1, x.shape[1], -1),
                               x[1 + n_ctx:]], dim=0)
            out = reference_block(block, x, model.attn_mask)
            if index in (0, 2):  # MMA: + adapter(ln_1(x)) after the block's MLP
                ln = block.ln_1
                out = out + _ref_adapter(adapters[index // 2], F.layer_norm(x, (width,), ln.weight, ln.bias, ln.eps),
                                         scale)
            x = out
        x = model.ln_final(x.permute(1, 0, 2))
        return x[torch.arange(len(full)), full.argmax(-1)] @ model.text_projection

    tokens, pooling = deep.text.cut(full)
    insertions = Insertions(prompts={1: deep_prompts[0], 2: deep_prompts[1]},
                            adapters={0: _ours_adapter(adapters[0], scale), 2: _ours_adapter(adapters[1], scale)})
    tower = with_insertions(deep.text, insertions)
    with torch.no_grad():
        pieces = deep.text.embed(tokens)
    ours = tower.encode_rows(torch.cat([pieces[:, :1], ctx.expand(len(tokens), -1, -1), pieces[:, 1 + n_ctx:]], 1),
                             pooling)
    expected = reference()
    assert tokens.shape[1] < full.shape[1]  # cut at end-of-text
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    leaves = [ctx, *deep_prompts, *adapters[0], *adapters[1]]
    for mine, theirs in zip(_grads(ours, leaves), _grads(expected, leaves)):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    # in class chunks (checkpointed, recomputed in backward): the same numbers
    chunked = tower.encode_rows(torch.cat([pieces[:, :1], ctx.expand(len(tokens), -1, -1), pieces[:, 1 + n_ctx:]], 1),
                                pooling, chunk_size=2)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(_grads(chunked, leaves), _grads(expected, leaves)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_image_prompt_tokens_deep_prompts_and_adapters_match_the_upstream_forward(deep):
    visual = deep.model.visual
    width = visual.conv1.out_channels
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    tokens = (0.1 * torch.randn(2, width, generator=generator)).requires_grad_()
    deep_prompts = [(0.1 * torch.randn(2, width, generator=generator)).requires_grad_() for _ in range(2)]
    adapters = [_adapter_params(width, 4, seed) for seed in (3, 4, 5)]
    scale = 0.25

    def reference() -> torch.Tensor:  # VisionTransformer_MaPLe / IVLP's VPT, with MMA's adapters
        x = F.conv2d(pixels, visual.conv1.weight, stride=8).flatten(2).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
        x = torch.cat([x, tokens.expand(len(x), -1, -1)], dim=1)
        x = visual.ln_pre(x)
        x = x + _ref_adapter(adapters[0], x, scale)  # MMA's index 0: on ln_pre's output
        x = x.permute(1, 0, 2)
        for index, block in enumerate(visual.transformer.resblocks):
            if index in (1, 2):  # the last n_ctx tokens replaced
                x = torch.cat([x[:-2], deep_prompts[index - 1].unsqueeze(1).expand(-1, x.shape[1], -1)], dim=0)
            out = reference_block(block, x, None)
            if index in (0, 1):
                out = out + _ref_adapter(adapters[1 + index], block.ln_1(x), scale)
            x = out
        return visual.ln_post(x.permute(1, 0, 2)[:, 0]) @ visual.proj

    insertions = Insertions(prompts={1: deep_prompts[0], 2: deep_prompts[1]}, tokens=tokens,
                            adapters={0: _ours_adapter(adapters[1], scale), 1: _ours_adapter(adapters[2], scale)},
                            input_adapter=_ours_adapter(adapters[0], scale))
    ours = encode_image(visual, pixels, insertions)
    expected = reference()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    leaves = [tokens, *deep_prompts, *(p for params in adapters for p in params)]
    for mine, theirs in zip(_grads(ours, leaves), _grads(expected, leaves)):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # nothing inserted: open_clip's own forward
        torch.testing.assert_close(encode_image(visual, pixels, Insertions()), visual(pixels), rtol=0, atol=0)


def test_zero_shot_deep_prompts_leave_the_causal_tower_unchanged(deep):
    """Putting back the hidden states a deep prompt replaces is the identity: the text half's w_zs."""
    tokens, pooling = deep.text.cut(deep.tokenize(PROMPTS))
    with torch.no_grad():
        embeddings = deep.text.embed(tokens)
        states = text_states(deep.text, deep.text.embed(deep.tokenize(["a photo"])[:, :3]), 3)
        prompted = with_insertions(deep.text, Insertions(prompts={1: states[0][0, 1:3], 2: states[1][0, 1:3]}))
        torch.testing.assert_close(prompted.encode_rows(embeddings, pooling),
                                   deep.text.encode_rows(embeddings, pooling), rtol=1e-5, atol=1e-6)


def test_hf_text_tower_deep_prompts_match_a_layer_by_layer_forward(hf_backbone):
    """A BERT (open_clip's CustomTextCLIP): prompts as input embeddings with the attention mask, deep prompts
    replacing the hidden states after [CLS] at layer 1, the tower's mean pooler and projection."""
    text = hf_backbone.model.text
    bert = text.transformer
    names = ["red", "a green", "picture of the blue", "cyan"]
    tokens, mask = hf_backbone.text.cut(hf_backbone.tokenize([f"x x {name}." for name in names]))
    generator = torch.Generator().manual_seed(2)
    width = hf_backbone.text_width
    ctx = (0.1 * torch.randn(2, width, generator=generator)).requires_grad_()
    prompt = (0.1 * torch.randn(2, width, generator=generator)).requires_grad_()
    with torch.no_grad():
        pieces = hf_backbone.text.embed(tokens)
    embeddings = torch.cat([pieces[:, :1], ctx.expand(len(names), -1, -1), pieces[:, 3:]], dim=1)

    def reference() -> torch.Tensor:
        hidden = bert.embeddings(inputs_embeds=embeddings)
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(hidden.dtype).min
        for index, layer in enumerate(bert.encoder.layer):
            if index == 1:
                hidden = torch.cat([hidden[:, :1], prompt.expand(len(names), -1, -1), hidden[:, 3:]], dim=1)
            out = layer(hidden, additive)
            hidden = out[0] if isinstance(out, tuple) else out
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(-1, keepdim=True)
        return text.proj(pooled)

    tower = with_insertions(hf_backbone.text, Insertions(prompts={1: prompt}))
    expected = reference()
    for chunk in (None, 2):  # chunked: each chunk checkpointed, its hooks reinstalled when recomputed
        ours = tower.encode_rows(embeddings, mask, chunk_size=chunk)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        for mine, theirs in zip(_grads(ours, [ctx, prompt]), _grads(expected, [ctx, prompt])):
            assert theirs.abs().sum() > 0
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert not any(layer._forward_pre_hooks for layer in bert.encoder.layer)  # nothing left behind


def test_insertions_a_tower_cannot_take_are_refused(deep, hf_backbone, cnn_backbone):
    from repair.errors import IncompatibleCheckpointError

    with pytest.raises(IncompatibleCheckpointError, match="has 3 blocks"):
        with_insertions(deep.text, Insertions(prompts={3: torch.zeros(2, 32)}))
    with pytest.raises(IncompatibleCheckpointError, match="ln_1"):
        with_insertions(hf_backbone.text, Insertions(adapters={0: lambda x: x}))
    with pytest.raises(IncompatibleCheckpointError, match="not a ViT"):
        encode_image(cnn_backbone.model.visual, torch.zeros(1, 3, 32, 32), Insertions(tokens=torch.zeros(1, 8)))
