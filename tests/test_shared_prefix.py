"""Shared-prefix and class-chunked text encoding equal the plain encoding, forward and backward."""

from __future__ import annotations

import pytest
import torch

from repair.kinds import CLIPFit
from repair.kinds.coop import CoOpPrompts, init_context
from repair.model.shared_prefix import common_prefix_length
from repair.train.objective import Objective, mergetune_loss

ATOL = 1e-5  # another order of the same sums: float rounding only
NAMES = ["red", "dark green", "blue whale", "a very long and winding class name", "x"]  # ragged suffixes
TEMPLATES = ["a photo of a {}.", "{} in a picture.", "itap of the {}"]  # "{}" first: only the start token is shared


def _features_and_grad(kind, encode, parameters):
    for parameter in parameters:
        parameter.grad = None
    features = encode()
    (features if features.dim() == 0 else features.square().sum() + features[..., 0].sum()).backward()
    return features.detach(), [parameter.grad.clone() for parameter in parameters]


def _assert_same(first, second):
    features, grads = first
    other_features, other_grads = second
    assert torch.allclose(features, other_features, atol=ATOL)
    for grad, other in zip(grads, other_grads):
        assert torch.allclose(grad, other, atol=ATOL)


@pytest.fixture
def prompts(backbone):
    torch.manual_seed(0)
    ctx = init_context(backbone, "a photo of a") + 0.1 * torch.randn(4, backbone.text_width)
    return CoOpPrompts(backbone, ctx, NAMES, ["a photo of a {}."])


def _coop(prompts, shared, chunk=None):
    prompts.shared_prefix, prompts.text_chunk_size = shared, chunk
    return _features_and_grad(prompts, prompts.class_features, [prompts.ctx])


def test_coop_shared_prefix_equals_plain_encoding(prompts):
    assert prompts.backbone.text.shares_prefixes
    _assert_same(_coop(prompts, shared=True), _coop(prompts, shared=False))


def test_coop_chunked_encoding_equals_one_piece(prompts):
    whole = _coop(prompts, shared=True)
    _assert_same(_coop(prompts, shared=True, chunk=2), whole)
    _assert_same(_coop(prompts, shared=False, chunk=2), whole)


def test_coop_weight_space_path_points_share_the_suffixes(prompts):
    ts = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        prompts.ctx.add_(0.05)  # w != w_ft, so the path points differ

    def path():
        contexts = prompts.ctx_ft + ts.view(-1, 1, 1) * (prompts.ctx - prompts.ctx_ft)
        return prompts._text_features(contexts, prompts.bank)

    shared = _features_and_grad(prompts, path, [prompts.ctx])
    prompts.shared_prefix = False
    plain = _features_and_grad(prompts, path, [prompts.ctx])
    assert shared[0].shape == (2, len(NAMES), prompts.backbone.embed_dim)
    _assert_same(shared, plain)


@pytest.fixture(scope="module")
def two_block_backbone(tmp_path_factory):
    """The tiny CLIP with two text blocks: the second sees what the first made of each prefix."""
    import json

    from conftest import _save_local_dir
    from repair.model.backbone import BackboneSpec, load_backbone
    from repair.synthetic import TINY_CONFIG

    model_cfg = json.loads(TINY_CONFIG.read_text())
    model_cfg["text_cfg"]["layers"] = 2
    return load_backbone(BackboneSpec(model=_save_local_dir(tmp_path_factory.mktemp("two-blocks"), model_cfg)))


def test_several_prefixes_through_several_blocks_equal_one_at_a_time(two_block_backbone):
    """Weight-space path points are G prefixes encoded together: each must equal its own encoding (the rows of
    G > 1 prefixes were once regrouped in the wrong order after the first block)."""
    torch.manual_seed(0)
    ctx = init_context(two_block_backbone, "a photo of a") + 0.1 * torch.randn(4, two_block_backbone.text_width)
    kind = CoOpPrompts(two_block_backbone, ctx, NAMES, ["a photo of a {}."])
    contexts = torch.stack([kind.ctx_ft, kind.ctx_ft + 0.3, kind.ctx_ft - 0.2])
    with torch.no_grad():
        together = kind._text_features(contexts, kind.bank)
        alone = torch.stack([kind._text_features(context, kind.bank) for context in contexts])
        kind.shared_prefix = False
        plain = kind._text_features(contexts, kind.bank)
    assert torch.allclose(together, alone, atol=ATOL) and torch.allclose(together, plain, atol=ATOL)


def test_coop_under_no_grad_with_chunks(prompts):
    with torch.no_grad():
        plain = prompts.class_features()
        prompts.text_chunk_size = 2
        assert torch.allclose(prompts.class_features(), plain, atol=ATOL)


def _clipfit_step(kind, pixels, labels):
    def loss():
        return mergetune_loss(kind, Objective(lam_zs=1.0, surrogate="feature"), pixels, labels).total

    return _features_and_grad(kind, loss, list(kind.params))


@pytest.fixture
def clipfit(backbone):
    kind = CLIPFit.zero_shot(backbone, NAMES, TEMPLATES)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in kind.params:  # away from w_ft, so the path term and the text biases matter
            parameter.add_(0.05 * torch.randn_like(parameter))
    return kind


def _pixels(backbone, count):
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_clipfit_text_biases_through_shared_prefixes(backbone, clipfit):
    pixels, labels = _pixels(backbone, 6), torch.arange(6) % len(NAMES)
    shared = _clipfit_step(clipfit, pixels, labels)
    clipfit.shared_prefix = False
    _assert_same(shared, _clipfit_step(clipfit, pixels, labels))
    clipfit.shared_prefix, clipfit.text_chunk_size = True, 2
    _assert_same(shared, _clipfit_step(clipfit, pixels, labels))


def test_clipfit_template_prefixes_stop_before_the_class(clipfit):
    shared = [len(prompts.prefix[0]) for prompts in clipfit._prompts_for(NAMES)]
    assert shared == [5, 1, 5]  # [SOS] a photo of a | [SOS] | [SOS] it ap of the


def test_clipfit_caches_finetuned_image_features_per_image(backbone, clipfit, monkeypatch):
    pixels = _pixels(backbone, 6)
    encoded = []
    original = clipfit._image_features

    def counting(values, images):
        if values is clipfit.ft:
            encoded.append(len(images))
        return original(values, images)

    monkeypatch.setattr(clipfit, "_image_features", counting)
    batch_with_new_images = torch.cat([pixels[:2], _pixels(backbone, 8)[6:]])
    first = clipfit._finetuned_image_features(pixels)
    again = clipfit._finetuned_image_features(pixels[[5, 0, 2]])
    mixed = clipfit._finetuned_image_features(batch_with_new_images)
    assert encoded == [6, 2]  # the second batch was all cached; the third had two new images
    assert torch.equal(again, first[[5, 0, 2]])
    clipfit.cache_ft_images = False
    assert torch.allclose(mixed, clipfit._finetuned_image_features(batch_with_new_images), atol=ATOL)
    assert encoded[-1] == 4  # without the cache the whole batch runs again


def test_common_prefix_length():
    tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 7]])
    assert common_prefix_length(tokens) == 2
    assert common_prefix_length(tokens[:1]) == 4


def test_prefix_never_swallows_an_end_of_text(backbone):
    tokens, pooling = backbone.text.cut(backbone.tokenize(["cat", "cat"]))
    assert backbone.text.shared_prefix_length(tokens, pooling) == int(pooling.min())


def test_bidirectional_tower_encodes_whole_prompts(hf_backbone):
    text = hf_backbone.text
    tokens, pooling = text.cut(hf_backbone.tokenize(["a photo of a red.", "a photo of a blue."]))
    assert text.shared_prefix_length(tokens, pooling) == 0
    prompts = CoOpPrompts.zero_shot(hf_backbone, ["red", "blue"], ["a photo of a {}."])
    with torch.no_grad():
        shared = prompts.class_features()
        prompts.shared_prefix = False
        assert torch.allclose(shared, prompts.class_features(), atol=ATOL)


@pytest.mark.parametrize("tower", ["backbone", "hf_backbone"])
def test_zero_shot_classifier_equals_encoding_every_caption(tower, request):
    backbone = request.getfixturevalue(tower)
    names = ["red", "blue", "green", "yellow"] if tower == "hf_backbone" else NAMES
    captions = [template.format(name) for name in names for template in TEMPLATES]
    per_caption = backbone.encode_texts(captions).view(len(names), len(TEMPLATES), -1).mean(dim=1)
    expected = torch.nn.functional.normalize(per_caption, dim=-1)
    assert torch.allclose(backbone.zero_shot_classifier(names, TEMPLATES), expected, atol=ATOL)


def test_per_example_gradients_through_chunks_equal_the_loop(prompts):
    from repair.train.curvature import per_example_grads

    class Scores(torch.nn.Module):  # what the Fisher builds differentiate: the kind's logits
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def forward(self, features):
            return self.kind(features).logits

    features = torch.nn.functional.normalize(torch.randn(3, prompts.backbone.embed_dim), dim=-1)
    labels = torch.tensor([0, 3, 4])
    prompts.text_chunk_size = 2  # checkpointed chunks under autograd; plain chunks under torch.func
    vmapped = next(per_example_grads(Scores(prompts), features, labels, method="vmap"))["ctx"]
    looped = next(per_example_grads(Scores(prompts), features, labels, method="loop"))["ctx"]
    assert torch.allclose(vmapped, looped, atol=ATOL)


@pytest.mark.parametrize("tower", ["backbone", "hf_backbone"])
def test_rows_past_one_chunk_go_shortest_first_with_the_same_features_and_gradients(tower, request):
    """A vocabulary longer than a chunk is encoded in length buckets, each cut to its own longest row."""
    backbone = request.getfixturevalue(tower)
    text = backbone.text
    names = ["red", "a very long and winding name of a colour", "blue", "green yellowish", "pink", "teal grey"]
    tokens, pooling = text.cut(backbone.tokenize([f"a photo of a {name}." for name in names]))
    assert len(set(text.row_lengths(pooling).tolist())) > 2  # the buckets differ in length
    embeddings = text.embed(tokens).detach().requires_grad_()
    whole = text.encode_rows(embeddings, pooling, chunk_size=None)
    bucketed = text.encode_rows(embeddings, pooling, chunk_size=2)
    assert torch.allclose(bucketed, whole, atol=ATOL)
    weights = torch.randn_like(whole)
    grad_whole, = torch.autograd.grad((whole * weights).sum(), embeddings)
    grad_bucketed, = torch.autograd.grad((bucketed * weights).sum(), embeddings)
    assert float((grad_bucketed - grad_whole).abs().max()) <= 1e-5 * float(grad_whole.abs().max())  # relative: rounding
