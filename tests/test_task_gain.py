"""A repair's precondition: a checkpoint no better than zero-shot on the repair images gets the zero-shot weights."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from cli_helpers import fast, invoke
from repair import DataOptions, finetune, repair as run_repair
from repair.io import read_tensors
from repair.kinds.coop import init_context
from repair.train.loop import TrainConfig
from repair.train.task_gain import TaskGain, measure_task_gain
from repair.kinds import load_kind
from repair.workflows.inputs import encode_for, select_training_images

SHOTS = DataOptions(shots=4, cache_dir=None)


def _zero_shot_file(backbone, path):
    """A CoOp "fine-tuned" checkpoint that is the zero-shot prompt itself: it gained exactly nothing."""
    save_file({"ctx": init_context(backbone, "a photo of a").contiguous()}, path)
    return path


def _gaining_file(backbone, image_dirs, path):
    """A linear probe fitted to the shots (on the random tiny CLIP a prompt cannot beat chance; a head can)."""
    return finetune("linear", image_dirs["train"], path, backbone=backbone,
                    config=TrainConfig(steps=30, batch_size=16), data_options=SHOTS).path


def _train_set(backbone, checkpoint, folder):
    dataset, _ = select_training_images(folder, SHOTS, 0)
    kind = load_kind(backbone, read_tensors(checkpoint), dataset.classnames, ["a photo of a {}."], kind="linear")
    return kind, encode_for(kind, backbone, dataset, SHOTS, training=True)


def test_ties_count_as_no_gain():
    assert not TaskGain(finetuned=0.5, zero_shot=0.5, images=8).gained
    assert TaskGain(finetuned=0.625, zero_shot=0.5, images=8).gained


def test_measurement_leaves_the_kind_and_the_random_state_alone(tmp_path, backbone, image_dirs):
    ft = _gaining_file(backbone, image_dirs, tmp_path / "ft.safetensors")
    kind, data = _train_set(backbone, ft, image_dirs["train"])
    before = {name: value.clone() for name, value in kind.snapshot().items()}
    state = torch.get_rng_state()
    gain = measure_task_gain(kind, data)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(kind.snapshot()[name], value) for name, value in before.items())
    assert gain.images == len(data)
    assert gain.gained, gain  # fitted to these shots, it beats the zero-shot head


def test_a_checkpoint_without_gain_gets_the_zero_shot_weights(tmp_path, backbone, image_dirs):
    ft = _zero_shot_file(backbone, tmp_path / "ft.safetensors")
    outcome = run_repair(ft, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                         config=TrainConfig(max_steps=3), data_options=SHOTS)
    gain = outcome.record.result["task_gain"]
    assert gain["action"] == "zero-shot" and gain["finetuned"] == gain["zero_shot"]
    assert outcome.train_result.steps == 0
    assert torch.equal(read_tensors(outcome.path).tensors["ctx"], init_context(backbone, "a photo of a"))
    assert any("gained nothing" in note and "--if-no-gain repair" in note for note in outcome.notes)


def test_if_no_gain_repair_repairs_it_anyway(tmp_path, backbone, image_dirs):
    ft = _zero_shot_file(backbone, tmp_path / "ft.safetensors")
    outcome = run_repair(ft, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                         config=TrainConfig(max_steps=3), data_options=SHOTS, if_no_gain="repair")
    assert outcome.record.result["task_gain"]["action"] == "repair"
    assert outcome.train_result.steps == 3
    assert not torch.equal(read_tensors(outcome.path).tensors["ctx"], read_tensors(ft).tensors["ctx"])
    assert any("repaired as asked" in note for note in outcome.notes)


def test_a_checkpoint_that_gained_is_repaired_and_its_gain_recorded(tmp_path, backbone, image_dirs):
    ft = _gaining_file(backbone, image_dirs, tmp_path / "ft.safetensors")
    outcome = run_repair(ft, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                         config=TrainConfig(max_steps=3), data_options=SHOTS)
    gain = outcome.record.result["task_gain"]
    assert gain["action"] == "repair" and gain["finetuned"] > gain["zero_shot"]
    assert outcome.train_result.steps == 3 and not outcome.notes


def test_the_command_line_takes_if_no_gain_and_refuses_other_values(tmp_path, tiny_spec, backbone, image_dirs):
    ft = _zero_shot_file(backbone, tmp_path / "ft.safetensors")
    out = tmp_path / "out.safetensors"
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", out, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert "zero-shot weights were written" in result.output
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", out, "--force", "--if-no-gain", "repair",
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert "repaired as asked" in result.output
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", out, "--force", "--if-no-gain", "keep",
                    *fast(tiny_spec))
    assert result.exit_code == 2 and "Traceback" not in result.output
