"""Tip-Adapter-F: the three cache files upstream writes, through every command."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

import repair
from cli_helpers import fast, invoke
from repair.kinds import load_kind
from repair.kinds.tip_adapter import TipAdapterF
from upstream import through_every_command

CLASSES = ["blue", "green", "red", "yellow"]
SHOTS = 4


def cache_dir(tmp_path, backbone, image_dirs):
    """``build_cache_model`` then ``run_tip_adapter_F`` (gaopengcuhk/Tip-Adapter ``utils.py`` / ``main.py``), in fp16 as
    CLIP runs on a GPU: ``keys_<n>shots.pt`` [D, NK] (normalised image features), ``values_<n>shots.pt`` [NK, N]
    (one-hot, ``.half()``), ``best_F_<n>shots.pt`` (``torch.save(adapter.weight)``, a parameter [NK, D])."""
    from repair.data.features import extract_features
    from repair.data.folders import scan_image_folder

    data = extract_features(backbone, scan_image_folder(image_dirs["train"]).few_shot(SHOTS, 1))
    keys = F.normalize(data.features, dim=-1).t().half()
    values = F.one_hot(data.labels).half()
    adapter = nn.Linear(keys.shape[0], keys.shape[1], bias=False).half()
    adapter.weight = nn.Parameter(keys.t() + (0.05 * torch.randn(keys.t().shape)).half())
    folder = tmp_path / "caches" / "colours"
    folder.mkdir(parents=True)
    torch.save(keys, folder / f"keys_{SHOTS}shots.pt")
    torch.save(values, folder / f"values_{SHOTS}shots.pt")
    torch.save(adapter.weight, folder / f"best_F_{SHOTS}shots.pt")
    return folder / f"best_F_{SHOTS}shots.pt"


def test_it_scores_as_upstream(tmp_path, backbone, image_dirs):
    path = cache_dir(tmp_path, backbone, image_dirs)
    kind = load_kind(backbone, repair.read_tensors(path), CLASSES, ["a photo of a {}."],
                     overrides={"tip_alpha": 1.17, "tip_beta": 2.0, "logit_scale": 100.0})
    assert isinstance(kind, TipAdapterF)
    adapter = torch.load(path, weights_only=True).float()
    values = torch.load(path.with_name(f"values_{SHOTS}shots.pt"), weights_only=True).float()
    features = F.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
    weights = backbone.zero_shot_classifier(CLASSES, ["a photo of a {}."]).t()
    affinity = features @ adapter.t()
    expected = 100.0 * features @ weights + 1.17 * ((-1) * (2.0 - 2.0 * affinity)).exp() @ values
    torch.testing.assert_close(kind.logits_for(features, CLASSES), expected, rtol=1e-4, atol=1e-4)
    kind.load_values(kind.zero_shot_values())  # F = 0 with as many shots per class: zero-shot CLIP's prediction
    zero_shot = kind.logits_for(features, CLASSES)
    assert torch.equal(zero_shot.argmax(dim=-1), (features @ weights).argmax(dim=-1))


def test_a_tip_adapter_cache_through_every_command(tmp_path, backbone, tiny_spec, image_dirs):
    source = cache_dir(tmp_path, backbone, image_dirs)
    report = json.loads(invoke("inspect", source, "--json").stdout)
    roles = {tensor["name"]: tensor["role"] for tensor in report["tensors"]}
    assert roles == {"best_F": "trained", "cache_keys": "ignored", "cache_values": "fixed"}
    outputs = through_every_command(tmp_path, tiny_spec, image_dirs, source, "tip-adapter", ["l2", "fisher"],
                                    out_name="cache", novel=False, extra=("--tip-alpha", "1.17"))
    for out in outputs.values():
        assert sorted(entry.name for entry in out.iterdir()) == [
            f"best_F_{SHOTS}shots.pt", f"keys_{SHOTS}shots.pt", "mergetune.json", f"values_{SHOTS}shots.pt"]
        adapter = nn.Linear(backbone.embed_dim, SHOTS * len(CLASSES), bias=False).half()
        adapter.weight = torch.load(out / f"best_F_{SHOTS}shots.pt", weights_only=True)  # upstream's own assignment
        assert adapter.weight.dtype == torch.float16
        for name in ("keys", "values"):
            assert torch.equal(torch.load(out / f"{name}_{SHOTS}shots.pt", weights_only=True),
                               torch.load(source.with_name(f"{name}_{SHOTS}shots.pt"), weights_only=True))
    result = invoke("repair", source, "--data", image_dirs["train"], "--out", tmp_path / "flat.safetensors",
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert set(repair.read_tensors(tmp_path / "flat.safetensors").tensors) == {"best_F", "cache_keys", "cache_values"}


def test_finetune_builds_the_cache_from_the_training_images(tmp_path, tiny_spec, image_dirs):
    out = tmp_path / "tip.safetensors"
    result = invoke("finetune", "--kind", "tip-adapter", "--data", image_dirs["train"], "--out", out,
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    tensors = repair.read_tensors(out).tensors
    entries = 4 * len(CLASSES)  # --shots 4
    assert tensors["best_F"].shape == (entries, 32) and tensors["cache_values"].shape == (entries, len(CLASSES))
    assert json.loads(invoke("inspect", out, "--json").stdout)["kind"] == "tip-adapter"
