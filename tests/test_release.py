"""The release workflow: eval report and its schema, baselines, markdown, gates, provenance."""

from __future__ import annotations

import json
import shutil
from importlib import resources

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from repair import DataOptions, evaluate, finetune, repair as run_repair
from repair.cli.app import app
from repair.errors import InputFileError, UsageError
from repair.eval.gate import Thresholds, check, load_thresholds
from repair.eval.metrics import Predictions, expected_calibration_error
from repair.train.loop import TrainConfig

runner = CliRunner()
SCHEMA = json.loads(resources.files("repair").joinpath("schemas/eval.schema.json").read_text())


def cli(*args):
    result = runner.invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, backbone, image_dirs):
    folder = tmp_path_factory.mktemp("release")
    ft = finetune("coop", image_dirs["train"], folder / "ft.safetensors", backbone=backbone,
                  config=TrainConfig(epochs=8, batch_size=16, lr=0.05), data_options=DataOptions(shots=8)).path
    fixed = run_repair(ft, image_dirs["train"], folder / "fixed.safetensors", backbone=backbone,
                       config=TrainConfig(epochs=4, batch_size=16, lr=0.05),
                       data_options=DataOptions(shots=8, val_fraction=0.25)).path
    return {"ft": ft, "fixed": fixed, "folder": folder}


@pytest.fixture(scope="module")
def report(backbone, image_dirs, checkpoints):
    return evaluate([checkpoints["ft"], checkpoints["fixed"]], image_dirs["test"], novel_dir=image_dirs["novel"],
                    backbone=backbone, baselines=True, data_options=DataOptions(shots=None, cache_dir=None))


def test_report_validates_against_its_schema(report):
    jsonschema.validate(report, SCHEMA)
    roles = [row["role"] for row in report["models"]]
    assert roles == ["zero-shot", "checkpoint", "checkpoint", "baseline", "baseline", "baseline", "baseline"]
    names = [row["name"] for row in report["models"]]
    assert names[3:] == ["wise-ft", "ties", "entropy-alpha", "ensemble"]  # no validation split: fixed or label-free
    assert set(report["baselines"]["skipped"]) == {"task-arithmetic", "dare", "weighted-ensemble"}


def test_wise_ft_endpoints_are_zero_shot_and_finetuned(report, backbone, image_dirs, checkpoints):
    rows = {row["name"]: row for row in report["models"]}
    for alpha, endpoint in ((0.0, "zero-shot"), (1.0, "ft.safetensors")):
        given = evaluate([checkpoints["ft"]], image_dirs["test"], novel_dir=image_dirs["novel"], backbone=backbone,
                         baselines=["wise-ft"], wise_alpha=alpha, data_options=DataOptions(shots=None, cache_dir=None))
        row = next(row for row in given["models"] if row["name"] == "wise-ft")
        assert (row["base"], row["novel"]) == pytest.approx((rows[endpoint]["base"], rows[endpoint]["novel"]))


def test_a_given_wise_alpha_is_used_as_is(report, backbone, image_dirs, checkpoints):
    given = evaluate([checkpoints["ft"]], image_dirs["test"], novel_dir=image_dirs["novel"], backbone=backbone,
                     baselines=["wise-ft"], wise_alpha=0.5, data_options=DataOptions(shots=None, cache_dir=None))
    row = next(row for row in given["models"] if row["name"] == "wise-ft")
    assert (row["chosen_by"], row["settings"]) == ("given", {"alpha": 0.5})
    fixed = next(row for row in report["models"] if row["name"] == "wise-ft")  # the fixed default is 0.5 too
    assert (fixed["chosen_by"], row["base"], row["novel"]) == ("fixed", fixed["base"], fixed["novel"])
    with pytest.raises(UsageError, match="wise_alpha must lie in"):
        evaluate([checkpoints["ft"]], image_dirs["test"], backbone=backbone, baselines=True, wise_alpha=1.5)
    result = cli("eval", checkpoints["ft"], "--data", image_dirs["test"], "--baselines", "--wise-alpha", "2")
    assert result.exit_code == 2
    with pytest.raises(UsageError, match="needs --baselines"):  # it would be ignored: no WiSE-FT row without it
        evaluate([checkpoints["ft"]], image_dirs["test"], backbone=backbone, wise_alpha=0.3)


def test_per_class_and_forgetting_order(report):
    per_class = report["per_class"]["ft.safetensors"]
    assert set(per_class) == {"base", "novel"} and set(per_class["base"]) == {"blue", "green", "red", "yellow"}
    ranking = report["forgetting"]["ft.safetensors"]
    changes = [row["change"] for row in ranking]
    assert changes == sorted(changes) and len(ranking) == 8
    for row in ranking:
        assert row["change"] == pytest.approx(row["model"] - report["per_class"]["zero-shot"][row["split"]][row["class"]])


def test_expected_calibration_error_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 0])
    # bins of width 1/15: 0.9 alone (correct), 0.6 alone (wrong), 0.7 alone (correct), 0.8 alone (wrong)
    expected = 100 * (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(0 - 0.8)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-4)
    assert Predictions(probs, labels).probs.shape == (4, 2)


def test_gate_thresholds_from_flags_and_file(tmp_path, report):
    rows = {row["name"]: row for row in report["models"]}
    assert check(report, Thresholds(min_base=0.0, min_hm=0.0)) == []
    failures = check(report, Thresholds(min_base=100.1))
    assert len(failures) == 2 and failures[0].startswith("ft.safetensors: base accuracy")
    gate_file = tmp_path / "gate.toml"
    gate_file.write_text("[gate]\nmin_base = 10\nmax_forgetting = 100\n")
    assert load_thresholds(gate_file) == Thresholds(min_base=10.0, max_forgetting=100.0)
    assert load_thresholds(gate_file).merged(Thresholds(min_base=20.0)).min_base == 20.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[gate]\nmin_bsae = 10\n")
    with pytest.raises(InputFileError, match="unknown: min_bsae"):
        load_thresholds(bad)
    bad.write_text("[gate]\nmin_hm = 0.7\n")  # a fraction for 70 %: it would pass any model
    with pytest.raises(InputFileError, match="write 70 for 70 %"):
        load_thresholds(bad)
    assert rows["zero-shot"]["novel"] is not None


def test_gate_exit_codes_and_markdown(tmp_path, tiny_spec, image_dirs, checkpoints):
    common = [checkpoints["fixed"], "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
              "--model", tiny_spec.model]
    summary = tmp_path / "summary.md"
    passing = cli("eval", *common, "--min-base", "0", "--max-forgetting", "100", "--markdown", summary)
    assert passing.exit_code == 0, passing.output
    failing = cli("eval", *common, "--min-hm", "100", "--markdown", summary)
    assert failing.exit_code == 11
    assert "error: gate failed: fixed.safetensors: HM accuracy" in failing.output
    text = summary.read_text()
    assert text.count("## mergetune evaluation") == 2  # appended, as a CI step summary expects
    assert "| fixed.safetensors |" in text and "**Gate passed**" in text and "**Gate FAILED" in text
    gate_file = tmp_path / "gate.json"
    gate_file.write_text(json.dumps({"min_novel": 100}))
    assert cli("eval", *common, "--gate", gate_file).exit_code == 11
    for flag, value in (("--min-hm", "100.5"), ("--min-base", "0.7"), ("--max-forgetting", "-101")):
        refused = cli("eval", *common, flag, value)  # before any model is loaded
        assert refused.exit_code == 2 and flag in refused.output and "Traceback" not in refused.output
    no_novel = cli("eval", checkpoints["fixed"], "--data", image_dirs["test"], "--model", tiny_spec.model,
                   "--min-hm", "1")
    assert no_novel.exit_code == 2 and "--novel-data" in no_novel.output


def test_verify_catches_a_changed_input_byte(tmp_path, tiny_spec, image_dirs, checkpoints):
    data = tmp_path / "data"
    shutil.copytree(image_dirs["train"], data)
    ft = tmp_path / "ft.safetensors"
    shutil.copy(checkpoints["ft"], ft)
    fixed = tmp_path / "fixed.safetensors"
    assert cli("repair", ft, "--data", data, "--out", fixed, "--model", tiny_spec.model, "--shots", "5",
               "--val-fraction", "0.2", "--epochs", "1").exit_code == 0
    ok = cli("verify", fixed, "--ft", ft, "--data", data, "--model", tiny_spec.model, "--json")
    assert ok.exit_code == 0, ok.output
    assert [check["ok"] for check in json.loads(ok.stdout)["checks"]] == [True] * 7  # the file itself, then inputs

    for image in (data / "red").iterdir():  # every image of a class, so a sampled shot surely changes
        raw = bytearray(image.read_bytes())
        raw[-1] ^= 0xFF
        image.write_bytes(bytes(raw))
    changed = cli("verify", fixed, "--ft", ft, "--data", data)
    assert changed.exit_code == 13 and "images" in changed.output.splitlines()[-1]

    tampered = bytearray(ft.read_bytes())
    tampered[-1] ^= 0x01
    ft.write_bytes(bytes(tampered))
    result = cli("verify", fixed, "--ft", ft)
    assert result.exit_code == 13 and "(fine-tuned checkpoint changed)" in result.output


def test_path_command_writes_json_and_png(tmp_path, tiny_spec, image_dirs, checkpoints):
    out, png = tmp_path / "path.json", tmp_path / "path.png"
    result = cli("path", checkpoints["ft"], checkpoints["fixed"], "--data", image_dirs["test"], "--out", out,
                 "--png", png, "--model", tiny_spec.model)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["schema"] == "mergetune.path/1"
    assert [len(segment["points"]) for segment in report["segments"]] == [11, 11, 11]
    assert all(segment["loss_barrier"] >= 0 for segment in report["segments"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = cli("path", checkpoints["ft"], checkpoints["fixed"], "--data", image_dirs["test"], "--out", out,
                "--model", tiny_spec.model)
    assert again.exit_code == 8
    same = tmp_path / "same.json"  # the plot would replace the report: refused before any work
    both = cli("path", checkpoints["ft"], checkpoints["fixed"], "--data", image_dirs["test"], "--out", same,
               "--png", same, "--model", tiny_spec.model)
    assert both.exit_code == 2 and "same file" in both.output and not same.exists()
    twice = cli("path", checkpoints["ft"], checkpoints["ft"], "--data", image_dirs["test"], "--out", same,
                "--model", tiny_spec.model)  # a model against itself: a flat path that looks like a result
    assert twice.exit_code == 2 and "the same bytes as" in twice.output and not same.exists()


def test_precision_and_device_options(tmp_path, tiny_spec, image_dirs, checkpoints, backbone):
    from repair.model.backbone import load_backbone
    from repair.data.folders import scan_image_folder
    from repair.data.features import extract_features

    bf16 = load_backbone(tiny_spec, precision="bf16")
    assert bf16.visual_fingerprint != backbone.visual_fingerprint  # separate cache entries
    dataset = scan_image_folder(image_dirs["test"])
    low = extract_features(bf16, dataset).features
    full = extract_features(backbone, dataset).features
    assert low.dtype == torch.float32 and torch.allclose(low, full, atol=0.05)
    result = cli("eval", checkpoints["fixed"], "--data", image_dirs["test"], "--model", tiny_spec.model,
                 "--precision", "bf16", "--json")
    assert result.exit_code == 0, result.output
    if not torch.cuda.is_available():
        unavailable = cli("eval", checkpoints["fixed"], "--data", image_dirs["test"], "--model", tiny_spec.model,
                          "--device", "cuda:3")
        assert unavailable.exit_code == 10 and "not available" in unavailable.output


def test_several_novel_sets_are_reported_and_averaged(tmp_path, backbone, image_dirs, checkpoints):
    from repair.synthetic import make_image_folder

    extra = make_image_folder(tmp_path / "other", ("cyan", "pink"), 6, seed=9)
    report = evaluate([checkpoints["fixed"]], image_dirs["test"], novel_dir=[image_dirs["novel"], extra],
                      backbone=backbone, data_options=DataOptions(shots=None, cache_dir=None))
    jsonschema.validate(report, SCHEMA)
    assert [folder["classes"] for folder in report["data"]["novel"]] == [
        ["cyan", "orange", "pink", "purple"], ["cyan", "pink"]]
    for row in report["models"]:
        sets = row["novel_sets"]
        assert set(sets) == {"novel:novel", "novel:other"}
        assert row["novel"] == pytest.approx(sum(sets.values()) / 2)
