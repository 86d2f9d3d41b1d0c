"""CoOp variants: random-init prompts of any length (no zero-shot point in prompt space) and
class-specific contexts, through the real CLI."""

from __future__ import annotations

import repair.kinds

import json

import torch
from safetensors.torch import load_file
from cli_helpers import fast, invoke


def test_a_random_init_prompt_falls_back_to_the_feature_surrogate(tmp_path, tiny_spec, image_dirs, monkeypatch):
    from repair.kinds.base import RepairDefaults

    # a default that needs a zero-shot point in prompt space (CoOp's own default, feature, needs none)
    monkeypatch.setattr(repair.kinds.CoOpPrompts, "defaults",
                        RepairDefaults("fisher", 10.0, repair.kinds.CoOpPrompts.defaults.schedule))
    ft = tmp_path / "ft.safetensors"
    result = invoke("finetune", "--kind", "coop", "--n-ctx", "16", "--data", image_dirs["train"], "--out", ft,
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert load_file(ft)["ctx"].shape == (16, 32)
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "fixed.safetensors",
                    *fast(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["objective"]["surrogate"] == "feature"
    assert "no zero-shot point in prompt space" in document["notes"][0] and "using feature" in document["notes"][0]
    assert "n_ctx=16" in document["result"]["task_gain"]["not_measured"]  # no zero-shot prompt to compare with
    for surrogate in ("fisher", "l2"):
        result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / f"{surrogate}.safetensors",
                        "--surrogate", surrogate, *fast(tiny_spec))
        assert result.exit_code == 2 and "use --surrogate feature" in result.output, result.output
        assert not (tmp_path / f"{surrogate}.safetensors").exists()
    result = invoke("eval", ft, tmp_path / "fixed.safetensors", "--data", image_dirs["test"], "--novel-data",
                    image_dirs["novel"], "--model", tiny_spec.model, "--baselines", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    baselines = json.loads(result.stdout)["baselines"]
    assert "wise-ft" not in baselines["chosen"] and "n_ctx=16" in baselines["skipped"]["wise-ft"]
    assert "ensemble" in baselines["chosen"]  # output ensembles need no zero-shot point


def test_class_specific_contexts_through_every_command(tmp_path, tiny_spec, image_dirs):
    ft, fixed = tmp_path / "csc.safetensors", tmp_path / "fixed.safetensors"
    result = invoke("finetune", "--kind", "coop", "--class-specific", "--data", image_dirs["train"], "--out", ft,
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert json.loads(invoke("inspect", ft, "--json").stdout)["tensors"][0]["shape"] == [4, 4, 32]
    for surrogate in ("feature", "fisher", "l2"):
        result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / f"{surrogate}.safetensors",
                        "--surrogate", surrogate, *fast(tiny_spec))
        assert result.exit_code == 0, result.output
    fixed = tmp_path / "fisher.safetensors"
    assert load_file(fixed)["ctx"].shape == (4, 4, 32) and not torch.equal(load_file(fixed)["ctx"], load_file(ft)["ctx"])
    result = invoke("eval", ft, fixed, "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    "--model", tiny_spec.model, "--baselines", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert rows[fixed.name]["base"] is not None and rows[fixed.name]["novel"] is None  # one context per class
    result = invoke("path", ft, fixed, "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", tiny_spec.model, "--points", "3", "--no-cache")
    assert result.exit_code == 0, result.output
    result = invoke("push", fixed, "--repo", "org/csc", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output
