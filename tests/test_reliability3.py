"""A run never succeeds on something other than what it was given (issue 32, items 2 to 8).

Each section is one item; each test goes through the real CLI on the tiny model, as a user meets it,
and failed on the code before its fix (the commit that fixes an item adds its tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import repair
from repair.cli.app import app
from repair.kinds.coop import init_context
from repair.synthetic import make_image_folder

runner = CliRunner()


def cli(*args: object):
    result = runner.invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output, result.output
    return result


def one_line(result, code: int) -> str:
    """The one ``error:`` line of a refused command (stderr), checked against its exit code."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def model(tiny_spec) -> list[str]:
    return ["--model", tiny_spec.model, "--device", "cpu", "--quiet"]


FAST = ["--epochs", "1", "--shots", "4", "--batch-size", "8"]


@pytest.fixture(scope="module")
def front_prompt(tmp_path_factory, tiny_spec, image_dirs) -> Path:
    """A CoOp prompt fine-tuned with the class name in front: its record says so."""
    out = tmp_path_factory.mktemp("front") / "front.safetensors"
    result = cli("finetune", "--data", image_dirs["train"], "--out", out, "--class-token-position", "front",
                 "--max-steps", "1", *FAST, *model(tiny_spec))
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- 2. a file's record outranks a flag


@pytest.mark.parametrize("flag, value, recorded", [
    ("--class-token-position", "end", "class_token_position front"),
    ("--ctx-init", "a picture of a", "ctx_init 'a photo of a'"),
    ("--logit-scale", "50", "logit_scale"),
])
def test_2_a_recorded_option_given_otherwise_is_refused(tmp_path, tiny_spec, image_dirs, front_prompt, flag, value,
                                                        recorded):
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], flag, value, *model(tiny_spec)), 2)
    assert flag in line and recorded in line and "front.safetensors" in line
    out = tmp_path / "fixed.safetensors"
    one_line(cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, flag, value, *FAST,
                 *model(tiny_spec)), 2)
    assert not out.exists()


def test_2_the_recorded_value_again_and_a_run_setting_are_accepted(tmp_path, tiny_spec, image_dirs, front_prompt):
    out = tmp_path / "fixed.safetensors"
    result = cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, "--class-token-position",
                 "front", "--ctx-init", "a photo of a", "--path-space", "weight", "--max-steps", "1", *FAST,
                 *model(tiny_spec))
    assert result.exit_code == 0, result.output
    record = json.loads(repair.read_tensors(out).metadata["mergetune"])
    assert record["kind_options"]["class_token_position"] == "front"
    assert record["kind_options"]["path_space"] == "weight"  # how this run interpolated: free to choose


def test_2_an_options_object_from_python_cannot_outrank_the_record_either(backbone, image_dirs, front_prompt):
    from repair.errors import UsageError
    from repair.kinds.coop import CoOpOptions

    with pytest.raises(UsageError, match="records class_token_position front"):
        repair.evaluate([front_prompt], image_dirs["test"], backbone=backbone,
                        kind_options=CoOpOptions(class_token_position="middle"))
    # fields left at their defaults take the recorded values: the prompt keeps its class in front
    report = repair.evaluate([front_prompt], image_dirs["test"], backbone=backbone,
                             kind_options=CoOpOptions(ctx_init="a photo of a"))
    assert report["models"][1]["base"] == repair.evaluate([front_prompt], image_dirs["test"],
                                                          backbone=backbone)["models"][1]["base"]
