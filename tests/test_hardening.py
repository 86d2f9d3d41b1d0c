"""Interrupted, resumed and deterministic runs; inputs refused before any work is done."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from repair import DataOptions, repair as run_repair
from repair.io import read_tensors
from repair.cli.app import app
from repair.errors import UsageError
from repair.kinds.coop import init_context
from repair.train.loop import TrainConfig

runner = CliRunner()
CONFIG = TrainConfig(epochs=4, batch_size=8, lr=0.02, seed=11)
DATA = DataOptions(shots=6, val_fraction=0.34)


@pytest.fixture
def ft(tmp_path, backbone):
    ctx = init_context(backbone, "a photo of a") + 0.05 * torch.randn(4, backbone.text_width,
                                                                        generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ft.safetensors"
    save_file({"ctx": ctx}, path)
    return path


def interrupt_at(step: int):
    def on_step(report) -> None:
        if report.step == step:
            raise KeyboardInterrupt

    return on_step


def test_interrupted_run_leaves_no_output_and_resumes_bit_for_bit(tmp_path, backbone, image_dirs, ft):
    reference = run_repair(ft, image_dirs["train"], tmp_path / "reference.safetensors", backbone=backbone,
                           config=CONFIG, data_options=DATA, if_no_gain="repair")
    out = tmp_path / "fixed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run_repair(ft, image_dirs["train"], out, backbone=backbone, config=CONFIG, data_options=DATA,
                   on_step=interrupt_at(5), if_no_gain="repair")  # epoch 3 of 4 (2 steps per epoch)
    assert not out.exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".fixed")] == [
        ".fixed.safetensors.progress"]
    resumed = run_repair(ft, image_dirs["train"], out, backbone=backbone, config=CONFIG, data_options=DATA,
                         resume=True, if_no_gain="repair")
    assert torch.equal(read_tensors(resumed.path).tensors["ctx"], read_tensors(reference.path).tensors["ctx"])
    assert resumed.record.result == reference.record.result
    assert not (tmp_path / ".fixed.safetensors.progress").exists()  # cleaned up after success


def test_resume_refuses_progress_of_another_run(tmp_path, backbone, image_dirs, ft):
    out = tmp_path / "fixed.safetensors"
    with pytest.raises(KeyboardInterrupt):
        run_repair(ft, image_dirs["train"], out, backbone=backbone, config=CONFIG, data_options=DATA,
                   on_step=interrupt_at(3), if_no_gain="repair")
    other = TrainConfig(epochs=4, batch_size=8, lr=0.5, seed=11)
    with pytest.raises(UsageError, match="another run"):  # a usage error (exit 2), before any work
        run_repair(ft, image_dirs["train"], out, backbone=backbone, config=other, data_options=DATA, resume=True,
                   if_no_gain="repair")
    with pytest.raises(UsageError, match="no saved progress"):
        run_repair(ft, image_dirs["train"], tmp_path / "new.safetensors", backbone=backbone, config=CONFIG,
                   data_options=DATA, resume=True, if_no_gain="repair")


def test_deterministic_runs_are_bit_identical(tmp_path, tiny_spec, image_dirs, ft):
    outputs = []
    for name in ("a.safetensors", "b.safetensors"):
        result = runner.invoke(app, ["repair", str(ft), "--data", str(image_dirs["train"]), "--out",
                                     str(tmp_path / name), "--model", tiny_spec.model, "--deterministic",
                                     "--epochs", "3", "--shots", "6", "--batch-size", "8", "--surrogate", "fisher"])
        assert result.exit_code == 0, result.output
        outputs.append(read_tensors(tmp_path / name))
    torch.use_deterministic_algorithms(False)
    assert torch.equal(outputs[0].tensors["ctx"], outputs[1].tensors["ctx"])
    assert json.loads(outputs[0].metadata["mergetune"]) == json.loads(outputs[1].metadata["mergetune"])


def cli(*args):
    result = runner.invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output
    return result


def test_checkpoint_made_for_another_model_is_refused(tmp_path, tiny_spec, image_dirs, ft):
    from repair.synthetic import save_tiny_backbone

    fixed = tmp_path / "fixed.safetensors"
    assert cli("repair", ft, "--data", image_dirs["train"], "--out", fixed, "--model", tiny_spec.model,
               "--max-steps", "1").exit_code == 0
    other = save_tiny_backbone(tmp_path / "other-model", seed=1)
    result = cli("eval", fixed, "--data", image_dirs["test"], "--model", other)
    assert result.exit_code == 5 and "text weights differ" in result.output


def test_class_names_that_do_not_match_the_folders(tmp_path, tiny_spec, image_dirs, ft):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"red": "crimson", "blue": "navy"}))
    result = cli("repair", ft, "--data", image_dirs["train"], "--classnames", names, "--out",
                 tmp_path / "o.safetensors", "--model", tiny_spec.model)
    assert result.exit_code == 6 and "no class name for folder" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_corrupt_image_names_the_file(tmp_path, tiny_spec, image_dirs, ft):
    data = tmp_path / "data"
    for cls in ("red", "blue"):
        (data / cls).mkdir(parents=True)
        for source in sorted((image_dirs["train"] / cls).iterdir())[:3]:
            (data / cls / source.name).write_bytes(source.read_bytes())
    (data / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    result = cli("repair", ft, "--data", data, "--out", tmp_path / "o.safetensors", "--model", tiny_spec.model,
                 "--no-cache")
    assert result.exit_code == 6 and "broken.png" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_template_without_placeholder(tmp_path, tiny_spec, image_dirs, ft):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of something\n")
    result = cli("repair", ft, "--data", image_dirs["train"], "--templates", templates, "--out",
                 tmp_path / "o.safetensors", "--model", tiny_spec.model)
    assert result.exit_code == 6 and "{}" in result.output
