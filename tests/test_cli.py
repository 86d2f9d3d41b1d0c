"""The command line end to end: exit codes, one-line errors, JSON output, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from repair.errors import EXIT_CODES
from cli_helpers import invoke


def model_args(tiny_spec):
    return ["--model", tiny_spec.model]


def assert_one_line_error(result, code):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_help_does_not_import_torch():
    probe = "import sys, repair.cli.app; sys.exit(1 if 'torch' in sys.modules or 'open_clip' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_inspect_builds_no_model_and_does_not_import_open_clip(tmp_path):
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(3, 8), "bias": torch.zeros(3)}, head)
    probe = ("import sys; from repair.workflows.inspect import inspect_checkpoint; "
             f"report = inspect_checkpoint({str(head)!r}); "
             "sys.exit(2 if report['kind'] != 'linear' else 1 if 'open_clip' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_finetune_repair_eval_end_to_end(tmp_path, tiny_spec, image_dirs):
    ft, fixed = tmp_path / "ft.safetensors", tmp_path / "fixed.safetensors"
    result = invoke("finetune", "--kind", "coop", "--data", image_dirs["train"], "--out", ft, "--epochs", "4",
                    "--lr", "0.05", "--batch-size", "16", *model_args(tiny_spec))
    assert result.exit_code == 0, result.output
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", fixed, "--epochs", "2", "--shots", "8",
                    "--lam-zs", "1", "--surrogate", "l2", "--path-space", "weight", *model_args(tiny_spec),
                    "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["objective"]["surrogate"] == "l2" and record["kind_options"]["path_space"] == "weight"
    result = invoke("eval", ft, fixed, "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    *model_args(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "mergetune.eval/2"
    names = [row["name"] for row in report["models"]]
    assert names == ["zero-shot", "ft.safetensors", "fixed.safetensors"]
    for row in report["models"]:
        assert all(isinstance(row[key], float) and 0 <= row[key] <= 100 for key in ("base", "novel", "hm"))
    table = invoke("eval", fixed, "--data", image_dirs["test"], *model_args(tiny_spec))
    assert table.exit_code == 0 and "fixed.safetensors" in table.output


@pytest.fixture
def ft_file(tmp_path, backbone):
    path = tmp_path / "ft.safetensors"
    save_file({"ctx": torch.zeros(4, backbone.text_width)}, path)
    return path


def test_missing_checkpoint(tmp_path, tiny_spec, image_dirs):
    result = invoke("repair", tmp_path / "nope.safetensors", "--data", image_dirs["train"], "--out",
                    tmp_path / "o.safetensors", *model_args(tiny_spec))
    assert_one_line_error(result, 3)


def test_existing_output_is_not_overwritten(tmp_path, tiny_spec, image_dirs, ft_file):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    result = invoke("repair", ft_file, "--data", image_dirs["train"], "--out", out, *model_args(tiny_spec))
    assert_one_line_error(result, 8)
    assert out.read_bytes() == b"keep me"
    same = invoke("repair", ft_file, "--data", image_dirs["train"], "--out", ft_file, "--force",
                  *model_args(tiny_spec))
    assert_one_line_error(same, 8)


def test_weights_not_cached_offline(tmp_path, image_dirs, ft_file, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    result = invoke("repair", ft_file, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    "--model", "ViT-B-16", "--pretrained", "openai")
    assert_one_line_error(result, 7)
    assert "local-dir:" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_unknown_model_and_tag(tmp_path, image_dirs, ft_file):
    result = invoke("eval", ft_file, "--data", image_dirs["test"], "--model", "ViT-Nope")
    assert_one_line_error(result, 7)
    result = invoke("eval", ft_file, "--data", image_dirs["test"], "--model", "ViT-B-16", "--pretrained", "nope")
    assert_one_line_error(result, 7)


def test_a_folder_or_file_given_as_model_name_says_which_option_takes_it(tiny_model_dir, image_dirs, ft_file):
    folder = tiny_model_dir.removeprefix("local-dir:")
    result = invoke("eval", ft_file, "--data", image_dirs["test"], "--model", folder)
    assert_one_line_error(result, 7)
    assert f"--model local-dir:{folder}" in result.output
    result = invoke("eval", ft_file, "--data", image_dirs["test"], "--model", ft_file)
    assert_one_line_error(result, 7)
    assert "--pretrained" in result.output


def test_single_class_data_folder(tmp_path, tiny_spec, ft_file, image_dirs):
    lonely = tmp_path / "lonely"
    (lonely / "red").mkdir(parents=True)
    for source in list((image_dirs["train"] / "red").iterdir())[:3]:
        (lonely / "red" / source.name).write_bytes(source.read_bytes())
    result = invoke("repair", ft_file, "--data", lonely, "--out", tmp_path / "o.safetensors",
                    *model_args(tiny_spec))
    assert_one_line_error(result, 6)


@pytest.mark.parametrize("args", [["bogus"], ["--nope"], ["repair"], ["eval", "a.safetensors", "--min-hm", "x"]])
def test_click_usage_errors_are_one_line_too(args):
    result = invoke(*args)
    assert_one_line_error(result, 2)
    assert "--help" in result.output


def test_novel_data_that_is_the_base_folder_is_refused(tiny_spec, ft_file, image_dirs):
    same = invoke("eval", ft_file, "--data", image_dirs["test"], "--novel-data", image_dirs["test"] / ".",
                  *model_args(tiny_spec))
    assert_one_line_error(same, 2)
    assert "base folder" in same.output
    twice = invoke("eval", ft_file, "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                   "--novel-data", image_dirs["novel"], *model_args(tiny_spec))
    assert_one_line_error(twice, 2)


def test_the_markdown_summary_is_never_appended_to_an_input(tiny_spec, ft_file, image_dirs):
    before = ft_file.read_bytes()
    onto_checkpoint = invoke("eval", ft_file, "--data", image_dirs["test"], "--markdown", ft_file,
                             *model_args(tiny_spec))
    assert_one_line_error(onto_checkpoint, 8)
    assert ft_file.read_bytes() == before
    image = next(path for path in sorted(image_dirs["test"].rglob("*")) if path.is_file())
    before = image.read_bytes()
    onto_image = invoke("eval", ft_file, "--data", image_dirs["test"], "--markdown", image, *model_args(tiny_spec))
    assert_one_line_error(onto_image, 8)
    assert image.read_bytes() == before


@pytest.mark.parametrize("command", ["repair", "finetune"])
def test_an_image_of_the_data_folder_is_never_an_output_even_with_force(command, tiny_spec, ft_file, image_dirs):
    image = next(path for path in sorted(image_dirs["train"].rglob("*")) if path.is_file())
    before = image.read_bytes()
    source = [ft_file] if command == "repair" else []
    result = invoke(command, *source, "--data", image_dirs["train"], "--out", image, "--force", *model_args(tiny_spec))
    assert_one_line_error(result, 8)
    assert "input folder" in result.output and image.read_bytes() == before


def test_a_side_input_file_is_never_an_output_even_with_force(tmp_path, tiny_spec, ft_file, image_dirs):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n")
    result = invoke("repair", ft_file, "--data", image_dirs["train"], "--templates", templates, "--out", templates,
                    "--force", *model_args(tiny_spec))
    assert_one_line_error(result, 8)
    assert "is also an input" in result.output and templates.read_text() == "a photo of a {}.\n"


def test_a_feature_cache_that_is_a_file_is_one_line(tmp_path, tiny_spec, ft_file, image_dirs):
    out = tmp_path / "o.safetensors"
    result = invoke("repair", ft_file, "--data", image_dirs["train"], "--out", out, "--cache-dir", ft_file,
                    *model_args(tiny_spec))
    assert_one_line_error(result, 8)
    assert "--no-cache" in result.output and not out.exists()
    under_a_file = invoke("repair", ft_file, "--data", image_dirs["train"], "--out", out, "--cache-dir",
                          ft_file / "cache", "--epochs", "1", *model_args(tiny_spec))  # a miss: the run goes on
    assert under_a_file.exit_code == 0, under_a_file.output
    assert "damaged" not in under_a_file.output and out.is_file()


def test_a_symlink_loop_as_checkpoint_is_one_line(tmp_path, tiny_spec, image_dirs):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    result = invoke("repair", tmp_path / "a", "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    *model_args(tiny_spec))
    assert_one_line_error(result, 3)


def test_data_given_a_file_says_so(tmp_path, tiny_spec, ft_file):
    result = invoke("eval", ft_file, "--data", ft_file, *model_args(tiny_spec))
    assert_one_line_error(result, 6)
    assert "a file, not a data folder" in result.output


def test_wrong_context_width(tmp_path, tiny_spec, image_dirs):
    bad = tmp_path / "bad.safetensors"
    save_file({"ctx": torch.zeros(4, 7)}, bad)
    result = invoke("repair", bad, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    *model_args(tiny_spec))
    assert_one_line_error(result, 5)
    assert "[4, 7]" in result.output


def test_nan_context(tmp_path, tiny_spec, image_dirs, backbone):
    bad = tmp_path / "nan.safetensors"
    save_file({"ctx": torch.full((4, backbone.text_width), float("nan"))}, bad)
    result = invoke("repair", bad, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    *model_args(tiny_spec))
    assert_one_line_error(result, 9)


def test_foreign_file_kind(tmp_path, tiny_spec, image_dirs):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"something": torch.zeros(3)}, foreign)
    result = invoke("repair", foreign, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    *model_args(tiny_spec))
    assert_one_line_error(result, 5)
    assert "something [3]" in result.output


def test_diverging_loss_writes_nothing(tmp_path, tiny_spec, image_dirs, ft_file):
    out = tmp_path / "o.safetensors"
    result = invoke("repair", "--if-no-gain", "repair",
                    ft_file, "--data", image_dirs["train"], "--out", out, "--lr", "1e30",
                    "--epochs", "3", "--shots", "4", *model_args(tiny_spec))
    assert_one_line_error(result, 9)
    assert not out.exists()


def test_exit_codes_are_distinct_and_the_readme_table_matches():
    from pathlib import Path

    from repair.errors import ERROR_CLASSES

    codes = [cls.exit_code for cls in ERROR_CLASSES]
    assert len(codes) == len(set(codes)), "two error classes share an exit code"
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].isdigit():
            rows[int(cells[0])] = cells[1]
    assert rows == EXIT_CODES


@pytest.mark.parametrize("kind", ["coop", "linear", "clipfit"])
def test_every_kind_through_the_cli(tmp_path, tiny_spec, image_dirs, kind):
    ft = tmp_path / f"{kind}-ft.safetensors"
    common = [*model_args(tiny_spec), "--shots", "4", "--batch-size", "8", "--quiet"]
    result = invoke("finetune", "--kind", kind, "--data", image_dirs["train"], "--out", ft, "--epochs", "2", *common)
    assert result.exit_code == 0, result.output
    inspected = invoke("inspect", ft, "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.stdout)["kind"] == kind
    for surrogate in ("feature", "fisher", "l2"):
        fixed = tmp_path / f"{kind}-{surrogate}.safetensors"
        result = invoke("repair", ft, "--data", image_dirs["train"], "--out", fixed, "--surrogate", surrogate,
                        "--epochs", "1", *common, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["objective"]["surrogate"] == surrogate
    result = invoke("eval", ft, tmp_path / f"{kind}-fisher.safetensors", "--data", image_dirs["test"],
                    "--novel-data", image_dirs["novel"], *model_args(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["models"]
    assert all(row["base"] is not None for row in rows)
    if kind == "linear":  # a head cannot score novel classes: reported, not crashed
        assert rows[1]["novel"] is None and "scores only its own 4 classes" in rows[1]["notes"][0]
    else:
        assert all(row["hm"] is not None for row in rows)


def test_inspect_foreign_file_is_one_line(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer.0": torch.zeros(3)}, foreign)
    assert_one_line_error(invoke("inspect", foreign), 5)
    assert_one_line_error(invoke("inspect", tmp_path / "missing.pt"), 3)


def test_public_api_names_are_the_functions_not_submodules():
    import repair

    for name in ("repair", "finetune", "evaluate", "load_repaired", "verify", "inspect_checkpoint", "path_report",
                 "push"):
        assert callable(getattr(repair, name)), name
    import repair.eval.metrics  # importing every submodule must not shadow them

    assert callable(repair.evaluate)
