"""The baselines a repair is compared with: their maths by hand, how settings are chosen, and `eval`'s flags."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import invoke
from conftest import BASE, NOVEL
from repair import DataOptions, evaluate, finetune
from repair.errors import DataError, UsageError
from repair.eval.baselines import (
    BASELINES,
    DARE_DROP,
    best_wise_alpha,
    dare,
    mean_entropy,
    ties,
    trim,
)
from repair.data.folders import scan_image_folder
from repair.eval.metrics import predict
from repair.kinds import load_kind
from repair.io import read_tensors
from repair.train.loop import TrainConfig
from repair.workflows.evaluate import load_evalset

NO_CACHE = DataOptions(shots=None, cache_dir=None)


@pytest.fixture(scope="module")
def val_dirs(tmp_path_factory):
    from repair.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("validation")
    return {"base": make_image_folder(root / "val", BASE, 5, seed=4),
            "novel": make_image_folder(root / "val-novel", NOVEL, 5, seed=5),
            "other-test": make_image_folder(root / "other-test", BASE, 6, seed=6)}


@pytest.fixture(scope="module")
def ft(tmp_path_factory, backbone, image_dirs):
    folder = tmp_path_factory.mktemp("baselines")
    return finetune("coop", image_dirs["train"], folder / "ft.safetensors", backbone=backbone,
                    config=TrainConfig(epochs=6, batch_size=16, lr=0.05), data_options=DataOptions(shots=8)).path


# ----------------------------------------------------------------------------- the maths, by hand


def test_ties_trims_the_top_magnitudes_elects_signs_and_averages_the_agreeing_entries():
    vector = {"a": torch.tensor([0.5, -2.0, 0.1]), "b": torch.tensor([[1.0, -0.3]])}
    trimmed = trim(vector, keep=0.4)  # 2 of 5 entries: |-2.0| and |1.0|, over the whole vector
    assert torch.equal(trimmed["a"], torch.tensor([0.0, -2.0, 0.0])) and torch.equal(trimmed["b"],
                                                                                    torch.tensor([[1.0, 0.0]]))
    assert all(torch.equal(ties([vector], 0.4)[name], trimmed[name]) for name in vector)  # one vector: the trim
    first, second = {"x": torch.tensor([1.0, -2.0, 3.0, 0.5])}, {"x": torch.tensor([-3.0, 1.0, 1.0, -0.5])}
    # sums -2, -1, 4, 0: elected signs -, -, +, 0; agreeing entries -3 | -2 | mean(3, 1) | none
    assert torch.equal(ties([first, second], keep=1.0)["x"], torch.tensor([-3.0, -2.0, 2.0, 0.0]))
    # keep 0.5 of each: first keeps 3, -2; second keeps -3, 1 (ties at 1.0 are kept: 1.0, 1.0)
    assert torch.equal(trim(second, 0.5)["x"], torch.tensor([-3.0, 1.0, 1.0, 0.0]))
    assert torch.equal(ties([first, second], keep=0.5)["x"], torch.tensor([-3.0, -2.0, 2.0, 0.0]))


def test_dare_drops_with_the_seeded_draws_and_rescales_the_rest():
    vector = {"w": torch.tensor([[1.0, -2.0, 3.0], [4.0, -5.0, 6.0]]), "b": torch.tensor([0.5, -0.5])}
    dropped = dare(vector, 0.5, seed=7)
    generator = torch.Generator().manual_seed(7)
    draws = {name: torch.rand(vector[name].shape, generator=generator) for name in sorted(vector)}  # "b", then "w"
    for name, value in vector.items():
        kept = draws[name] >= 0.5
        assert torch.equal(dropped[name], torch.where(kept, 2.0 * value, torch.zeros_like(value)))
    assert torch.equal(dare(vector, 0.5, seed=7)["w"], dropped["w"])  # seeded: the same drop again
    assert all(torch.equal(dare(vector, 0.0, seed=1)[name], vector[name]) for name in vector)
    heavier = dare(vector, 0.9, seed=7)  # a larger rate drops a superset of the entries
    assert all(bool(((heavier[name] != 0) <= (dropped[name] != 0)).all()) for name in vector)
    with pytest.raises(UsageError, match="drop rate"):
        dare(vector, 1.0, seed=0)


def test_mean_entropy_by_hand():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert mean_entropy(probs) == pytest.approx(0.5 * torch.log(torch.tensor(2.0)).item())


# ----------------------------------------------------------------------------- label-free alpha


@pytest.mark.parametrize(("factor", "alpha"), [(3.0, 1.0), (0.25, 0.0)])
def test_entropy_alpha_picks_the_least_entropy(tmp_path, backbone, image_dirs, factor, alpha):
    """A head ``factor * w_zs``: along WiSE-FT's line the logits are the zero-shot ones times (1 - a) + factor a,
    and the entropy of softmax(beta z) falls as beta grows; so the sharpest end has the least entropy."""
    head = backbone.zero_shot_classifier(list(BASE), ["a photo of a {}."])
    path = tmp_path / "head.safetensors"
    save_file({"weight": factor * head}, path)
    options = {"logit_scale": backbone.logit_scale}  # the head's units are the zero-shot classifier's
    report = evaluate([path], image_dirs["test"], backbone=backbone, kind_options=options,
                      baselines=["entropy-alpha"], data_options=NO_CACHE)
    chosen = report["baselines"]["chosen"]["entropy-alpha"]
    assert chosen["chosen_by"] == "label-free" and chosen["settings"] == {"alpha": alpha}
    curve = {point["alpha"]: point["entropy"] for point in chosen["curve"]}
    assert min(curve, key=curve.get) == alpha and len(curve) == 11
    kind = load_kind(backbone, read_tensors(path), list(BASE), ["a photo of a {}."], overrides=options)
    evalset = load_evalset(backbone, scan_image_folder(image_dirs["test"]), "base", NO_CACHE)
    kind.load_values(kind.interpolate(kind.zero_shot_values(), kind.snapshot(), 0.5))
    assert curve[0.5] == pytest.approx(mean_entropy(predict(kind, evalset).probs))  # the curve is what it says
    row = next(row for row in report["models"] if row["name"] == "entropy-alpha")
    assert row["role"] == "baseline" and row["chosen_by"] == "label-free" and row["settings"] == {"alpha": alpha}


# ----------------------------------------------------------------------------- choosing on validation


def test_settings_are_chosen_on_the_validation_split_never_on_the_test_data(backbone, image_dirs, val_dirs, ft):
    first, second = (evaluate([ft], test, novel_dir=image_dirs["novel"], backbone=backbone, baselines=baselines,
                              val_dir=val_dirs["base"], val_novel_dir=val_dirs["novel"], data_options=NO_CACHE,
                              seed=3)
                     for test, baselines in ((image_dirs["test"], True),
                                             (val_dirs["other-test"], ["task-arithmetic", "weighted-ensemble"])))
    assert [row["name"] for row in first["models"]] == ["zero-shot", "ft.safetensors", *BASELINES]
    jsonschema.validate(first, json.loads(resources.files("repair").joinpath("schemas/eval.schema.json").read_text()))
    chosen = first["baselines"]["chosen"]
    assert {name: item["chosen_by"] for name, item in chosen.items()} == {
        "wise-ft": "validation split", "task-arithmetic": "validation split", "ties": "validation split",
        "dare": "validation split", "entropy-alpha": "label-free", "ensemble": "fixed",
        "weighted-ensemble": "validation split"}
    for name, item in chosen.items():
        if item["chosen_by"] == "validation split":  # the first setting with the best validation HM
            best = max(item["curve"], key=lambda point: point["hm"])
            assert item["settings"] == {key: best[key] for key in item["settings"]}
    on_validation = {row["name"]: row for row in evaluate([ft], val_dirs["base"], novel_dir=val_dirs["novel"],
                                                          backbone=backbone, data_options=NO_CACHE)["models"]}
    ends = {"wise-ft": ("alpha", "zero-shot", "ft.safetensors"), "weighted-ensemble": ("weight", "zero-shot",
                                                                                         "ft.safetensors")}
    for name, (knob, start, end) in ends.items():  # each curve is measured on the validation folders
        curve = {point[knob]: point for point in chosen[name]["curve"]}
        for value, model in ((0.0, start), (1.0, end)):
            assert (curve[value]["base"], curve[value]["novel"]) == pytest.approx(
                (on_validation[model]["base"], on_validation[model]["novel"]))
            assert curve[value]["novel_sets"] == pytest.approx(on_validation[model]["novel_sets"])
    for name, item in second["baselines"]["chosen"].items():  # other test images, the same validation split:
        assert item["settings"] == chosen[name]["settings"]  # the same choice (test labels choose nothing)
    assert [point["scale"] for point in chosen["task-arithmetic"]["curve"]][-1] == 2.0  # past the fine-tuned model
    assert len(chosen["dare"]["curve"]) == len(DARE_DROP) * 6 and first["baselines"]["seed"] == 3
    assert first["baselines"]["validation"]["base"]["path"] == str(val_dirs["base"])
    assert best_wise_alpha(first) == chosen["wise-ft"]["settings"]["alpha"]
    rows = {row["name"]: row for row in first["models"]}
    assert rows["wise-ft"]["settings"] == chosen["wise-ft"]["settings"] and rows["wise-ft"]["role"] == "baseline"


def test_without_a_validation_split_rows_use_fixed_defaults_or_are_skipped(backbone, image_dirs, ft):
    report = evaluate([ft], image_dirs["test"], novel_dir=image_dirs["novel"], backbone=backbone, baselines=True,
                      data_options=NO_CACHE)
    rows = {row["name"]: row for row in report["models"] if row["role"] == "baseline"}
    assert {name: (row["chosen_by"], row["settings"]) for name, row in rows.items()} == {
        "wise-ft": ("fixed", {"alpha": 0.5}), "ties": ("fixed", {"keep": 0.2, "scale": 1.0}),
        "entropy-alpha": ("label-free", rows["entropy-alpha"]["settings"]), "ensemble": ("fixed", {"weight": 0.5})}
    assert set(report["baselines"]["skipped"]) == {"task-arithmetic", "dare", "weighted-ensemble"}
    assert "--val-data" in report["baselines"]["skipped"]["dare"] and report["baselines"]["validation"] is None
    with pytest.raises(UsageError, match="not chosen on a validation split"):
        best_wise_alpha(report)
    with pytest.raises(UsageError, match="dare chooses a setting on a validation split"):
        evaluate([ft], image_dirs["test"], backbone=backbone, baselines=["ties", "dare"])


def test_a_validation_folder_must_hold_other_images_of_the_base_classes(backbone, image_dirs, val_dirs, ft):
    with pytest.raises(UsageError, match="is the base folder"):
        evaluate([ft], image_dirs["test"], backbone=backbone, baselines=True, val_dir=image_dirs["test"])
    with pytest.raises(UsageError, match="is a held-out folder"):
        evaluate([ft], image_dirs["test"], novel_dir=image_dirs["novel"], backbone=backbone, baselines=True,
                 val_dir=val_dirs["base"], val_novel_dir=image_dirs["novel"])
    with pytest.raises(DataError, match="has classes"):
        evaluate([ft], image_dirs["test"], backbone=backbone, baselines=True, val_dir=val_dirs["novel"])
    with pytest.raises(UsageError, match="needs --baselines"):
        evaluate([ft], image_dirs["test"], backbone=backbone, val_dir=val_dirs["base"])
    with pytest.raises(UsageError, match="unknown baseline soup"):
        evaluate([ft], image_dirs["test"], backbone=backbone, baselines="ties,soup")


# ----------------------------------------------------------------------------- the command line


def test_eval_baseline_flags(tiny_spec, image_dirs, val_dirs, ft):
    common = [ft, "--data", image_dirs["test"], "--novel-data", image_dirs["novel"], "--model", tiny_spec.model,
              "--no-cache"]
    result = invoke("eval", *common, "--baseline", "ties,dare", "--baseline", "wise-ft", "--val-data",
                    val_dirs["base"], "--val-novel-data", val_dirs["novel"], "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [row["name"] for row in document["models"] if row["role"] == "baseline"] == ["ties", "dare", "wise-ft"]
    assert document["baselines"]["seed"] == 5 and document["schema"] == "mergetune.eval/2"
    result = invoke("eval", *common, "--baseline", "wise-ft", "--val-data", val_dirs["base"], "--val-novel-data",
                    val_dirs["novel"])
    assert result.exit_code == 0, result.output
    assert "wise-ft (alpha" in result.output and "validation split)" in result.output
    result = invoke("eval", *common, "--baselines")
    assert result.exit_code == 0 and "dare: not run (dare chooses its setting on a validation split" in result.output
    for args, message in (
            (["--baseline", "soup"], "unknown baseline soup"),
            (["--baseline", "dare"], "dare chooses a setting on a validation split"),
            (["--baselines", "--val-data", image_dirs["test"]], "is the base folder (--data) again"),
            (["--val-data", val_dirs["base"]], "it needs --baselines"),
            (["--baselines", "--val-novel-data", val_dirs["novel"]], "--val-novel-data needs --val-data")):
        result = invoke("eval", *common, *args)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    result = invoke("eval", *common, "--baselines", "--val-data", val_dirs["base"] / "missing")
    assert result.exit_code == 6 and len(result.output.strip().splitlines()) == 1, result.output
