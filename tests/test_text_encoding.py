"""Prompt assembly and end-of-text cutting reproduce open_clip's encode_text."""

from __future__ import annotations

import torch

from repair.model.backbone import encode_token_embeddings, encode_tokens
from repair.kinds.coop import CoOpOptions, CoOpPrompts, init_context

CAPTIONS = ["a photo of a cat.", "a photo of a very large and hairy dog on a sofa.", "x", ""]
ATOL = 1e-5  # shorter sequences change the matmul blocking, not the maths


def test_cutting_at_end_of_text_matches_encode_text(backbone):
    tokens = backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        full = backbone.model.encode_text(tokens)
        cut = encode_tokens(backbone.model, tokens)
    assert torch.allclose(full, cut, atol=ATOL)


def test_cut_sequences_are_shorter_than_the_context(backbone):
    tokens = backbone.tokenize(CAPTIONS)
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]


def test_uncut_embeddings_path_equals_encode_text_exactly(backbone):
    tokens = backbone.tokenize(CAPTIONS)
    with torch.no_grad():
        full = backbone.model.encode_text(tokens)
        ours = encode_token_embeddings(backbone.model, backbone.model.token_embedding(tokens), tokens.argmax(-1))
    assert torch.equal(full, ours)


def test_prompt_with_init_embeddings_equals_encode_text(backbone):
    classnames = ["red", "dark green", "blue whale"]
    ctx = init_context(backbone, "a photo of a")
    assert ctx.shape == (4, backbone.text_width)
    prompts = CoOpPrompts(backbone, ctx, classnames, ["a photo of a {}."])
    with torch.no_grad():
        ours = prompts.class_features()
        reference = backbone.model.encode_text(backbone.tokenize([f"a photo of a {name}." for name in classnames]),
                                               normalize=True)
    assert torch.allclose(ours, reference, atol=ATOL)
    # and the zero-shot classifier built from the same template agrees with both
    assert torch.allclose(prompts.zero_shot_class_features(), reference, atol=ATOL)


def test_class_specific_context_and_novel_classes(backbone):
    ctx = init_context(backbone, "a photo of a").unsqueeze(0).repeat(3, 1, 1)
    prompts = CoOpPrompts(backbone, ctx, ["a", "b", "c"], ["a photo of a {}."])
    assert prompts.class_specific
    with torch.no_grad():
        shared = CoOpPrompts(backbone, ctx[0], ["a", "b", "c"], ["a photo of a {}."]).class_features()
        assert torch.allclose(prompts.class_features(), shared, atol=ATOL)


def test_weight_space_path_encodes_interpolated_prompts(backbone):
    torch.manual_seed(0)
    ctx_ft = init_context(backbone, "a photo of a") + 0.1 * torch.randn(4, backbone.text_width)
    prompts = CoOpPrompts(backbone, ctx_ft, ["red", "green"], ["a photo of a {}."], CoOpOptions(path_space="weight"))
    with torch.no_grad():
        prompts.ctx.add_(0.2 * torch.randn_like(prompts.ctx))
        features = torch.nn.functional.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
        ts = torch.tensor([0.25, 1.0])
        output = prompts(features, ts)
        assert torch.allclose(output.path_logits[1], output.logits, atol=1e-4)
        middle = prompts.ctx_ft + 0.25 * (prompts.ctx - prompts.ctx_ft)
        expected = prompts.scale * features @ prompts._text_features(middle, prompts.bank).t()
        assert torch.allclose(output.path_logits[0], expected, atol=1e-4)


def test_feature_space_path_ends_at_the_current_prompt(backbone):
    torch.manual_seed(1)
    ctx_ft = init_context(backbone, "a photo of a") + 0.1 * torch.randn(4, backbone.text_width)
    prompts = CoOpPrompts(backbone, ctx_ft, ["red", "green"], ["a photo of a {}."])
    with torch.no_grad():
        prompts.ctx.add_(0.2 * torch.randn_like(prompts.ctx))
        features = torch.nn.functional.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
        output = prompts(features, torch.tensor([0.0, 1.0]))
        assert torch.allclose(output.path_logits[1], output.logits, atol=1e-5)
        start = prompts.scale * features @ prompts.ft_features.t()
        assert torch.allclose(output.path_logits[0], start, atol=1e-5)
