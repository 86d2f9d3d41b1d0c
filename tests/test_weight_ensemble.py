"""ZSCL's weight ensemble (--weight-ensemble N): the running mean of the trajectory, recorded, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import fast, invoke
from repair import DataOptions, repair as run_repair
from repair.data.folders import scan_image_folder
from repair.errors import UsageError
from repair.io import read_tensors
from repair.kinds import load_kind
from repair.kinds.coop import init_context
from repair.train.loop import TrainConfig, train
from repair.train.objective import Objective
from repair.workflows.inputs import encode_for

DATA = DataOptions(shots=6, cache_dir=None)


@pytest.fixture
def ft(tmp_path, backbone):
    ctx = init_context(backbone, "a photo of a") + 0.05 * torch.randn(4, backbone.text_width,
                                                                        generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ft.safetensors"
    save_file({"ctx": ctx}, path)
    return path


def test_the_weight_ensemble_is_the_mean_of_the_start_and_every_nth_step(backbone, image_dirs, ft):
    kind = load_kind(backbone, read_tensors(ft), ["blue", "green", "red", "yellow"], ["a photo of a {}."])
    data = encode_for(kind, backbone, scan_image_folder(image_dirs["train"]).few_shot(6, 0), DATA, training=True)
    snapshots = [kind.snapshot()["ctx"]]  # the start counts

    def keep(report) -> None:
        if report.step % 3 == 0:
            snapshots.append(kind.snapshot()["ctx"])

    config = TrainConfig(epochs=4, batch_size=8, lr=0.05, weight_ensemble=3)  # 24 images: 3 steps per epoch
    result = train(kind, Objective(lam_zs=0.0), data, config, on_step=keep)
    assert result.steps == 12 and len(snapshots) == 5
    assert result.weight_ensemble == {"every": 3, "averaged": 5}
    mean = torch.stack(snapshots).mean(dim=0)
    assert torch.allclose(kind.snapshot()["ctx"], mean, atol=1e-6)
    assert not torch.allclose(mean, snapshots[-1], atol=1e-4)  # not the last weights


def test_an_interrupted_weight_ensemble_resumes_bit_for_bit(tmp_path, backbone, image_dirs, ft):
    config = TrainConfig(epochs=4, batch_size=8, lr=0.02, seed=11, weight_ensemble=2)
    reference = run_repair(ft, image_dirs["train"], tmp_path / "reference.safetensors", backbone=backbone,
                           config=config, data_options=DATA, if_no_gain="repair")
    out = tmp_path / "fixed.safetensors"

    def interrupt(report) -> None:
        if report.step == 8:  # epoch 3 of 4 (3 steps per epoch): resumed from the end of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_repair(ft, image_dirs["train"], out, backbone=backbone, config=config, data_options=DATA,
                   on_step=interrupt, if_no_gain="repair")
    resumed = run_repair(ft, image_dirs["train"], out, backbone=backbone, config=config, data_options=DATA,
                         resume=True, if_no_gain="repair")
    assert torch.equal(read_tensors(resumed.path).tensors["ctx"], read_tensors(reference.path).tensors["ctx"])
    assert resumed.record.result == reference.record.result
    assert resumed.record.result["weight_ensemble"] == {"every": 2, "averaged": 7}  # the start, steps 2 .. 12
    assert resumed.record.train["weight_ensemble"] == 2


def test_weight_ensemble_refuses_a_validation_split_before_any_work(tmp_path, backbone, image_dirs, ft):
    with pytest.raises(UsageError, match="use one of them"):
        run_repair(ft, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                   config=TrainConfig(epochs=1, weight_ensemble=2),
                   data_options=DataOptions(shots=6, val_fraction=0.34, cache_dir=None))
    assert not (tmp_path / "out.safetensors").exists()


def test_finetune_and_repair_weight_ensemble_flags(tmp_path, tiny_spec, image_dirs):
    ft = tmp_path / "ft.safetensors"
    result = invoke("finetune", "--kind", "coop", "--data", image_dirs["train"], "--out", ft, "--weight-ensemble",
                    "1", *fast(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["train"]["weight_ensemble"] == 1 and document["result"]["weight_ensemble"] == {
        "every": 1, "averaged": document["result"]["steps"] + 1}
    result = invoke("repair", "--if-no-gain", "repair",
                    ft, "--data", image_dirs["train"], "--out", tmp_path / "we.safetensors",
                    "--weight-ensemble", "2", *fast(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["result"]["weight_ensemble"]["every"] == 2
    for args, message in ((["--weight-ensemble", "0"], "weight_ensemble must be at least 1"),
                          (["--weight-ensemble", "2", "--val-fraction", "0.25"], "use one of them")):
        result = invoke("repair", "--if-no-gain", "repair",
                        ft, "--data", image_dirs["train"], "--out", tmp_path / "bad.safetensors", *args,
                        *fast(tiny_spec))
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "bad.safetensors").exists()
    result = invoke("finetune", "--kind", "lora", "--data", image_dirs["train"], "--out", tmp_path / "lora.pt",
                    "--weight-ensemble", "2", *fast(tiny_spec))
    assert result.exit_code == 2 and "not its weights" in result.output, result.output
