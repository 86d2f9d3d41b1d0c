"""The visual projector kind (ProLIP): ``visual.proj`` alone, through every command."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import repair
from repair.kinds import load_kind
from repair.kinds.projector import VisualProjector
from cli_helpers import fast, invoke

CLASSES = ["blue", "green", "red", "yellow"]


def test_it_scores_as_open_clip_does_with_that_projection(tmp_path, backbone):
    projection = backbone.model.visual.proj.detach() + 0.1 * torch.randn_like(backbone.model.visual.proj)
    save_file({"visual.proj": projection.contiguous()}, tmp_path / "p.safetensors")
    kind = load_kind(backbone, repair.read_tensors(tmp_path / "p.safetensors"), CLASSES, ["a photo of a {}."])
    assert isinstance(kind, VisualProjector)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = kind.logits_for(kind.image_encoder().encode(pixels), CLASSES)
        swapped = torch.func.functional_call(backbone.model.visual, {"proj": projection}, (pixels,), strict=False)
        expected = kind.scale * F.normalize(swapped, dim=-1) @ backbone.zero_shot_classifier(CLASSES,
                                                                                             ["a photo of a {}."]).t()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert kind.image_encoder().fingerprint == load_kind(  # one cached pre-projection entry for every projector
        backbone, repair.read_tensors(tmp_path / "p.safetensors"), CLASSES, ["x {}"]).image_encoder().fingerprint


def test_a_projector_through_every_command(tmp_path, tiny_spec, tiny_model_dir, image_dirs):
    ft, fixed = tmp_path / "ft.safetensors", tmp_path / "fixed.safetensors"
    result = invoke("finetune", "--kind", "projector", "--data", image_dirs["train"], "--out", ft, "--lr", "0.5",
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("inspect", ft, "--json").stdout)
    assert report["kind"] == "projector" and report["trainable_numbers"] == 32 * 32
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "f.safetensors", "--surrogate",
                    "feature", *fast(tiny_spec))
    assert result.exit_code == 2 and "use --surrogate fisher or l2" in result.output, result.output
    for surrogate in ("fisher", "l2"):
        result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / f"{surrogate}.safetensors",
                        "--surrogate", surrogate, *fast(tiny_spec))
        assert result.exit_code == 0, result.output
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", fixed, *fast(tiny_spec), "--json")
    assert json.loads(result.stdout)["objective"]["surrogate"] == "l2"
    tensors = load_file(fixed)
    assert list(tensors) == ["visual.proj"] and tensors["visual.proj"].shape == (32, 32)
    import open_clip  # the output is an open_clip state-dict fragment
    from repair.synthetic import TINY_CONFIG
    model = open_clip.CLIP(**json.loads(TINY_CONFIG.read_text()))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and torch.equal(model.visual.proj.detach(), tensors["visual.proj"])
    result = invoke("eval", ft, fixed, "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    "--model", tiny_spec.model, "--baselines", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert "wise-ft" in document["baselines"]["chosen"]
    assert all(row["novel"] is not None for row in document["models"])
    result = invoke("path", ft, fixed, "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", tiny_spec.model, "--points", "3", "--no-cache")
    assert result.exit_code == 0, result.output
    result = invoke("push", fixed, "--repo", "org/projector", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0 and "visual projector" in (tmp_path / "stage" / "README.md").read_text()
