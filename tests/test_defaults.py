"""The bare command repairs: its default schedule moves a fine-tuned checkpoint and lowers the repair loss,
whatever the scale of the backbone's parameters (a raw learning rate would not transfer)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import repair
from repair.data.features import extract_features
from repair.data.folders import scan_image_folder
from repair.io import read_tensors
from repair.kinds import load_kind
from repair.kinds.coop import init_context
from repair.model.backbone import Backbone
from repair.train.loop import TrainConfig
from repair.train.objective import Objective, mergetune_loss
from repair.train.surrogates import build_surrogate
from repair.workflows.inputs import DataOptions

SHOTS = DataOptions(shots=8, cache_dir=None)


@pytest.fixture(scope="module")
def scaled_backbone(tiny_spec) -> Backbone:
    """The tiny CLIP with token embeddings 50x larger: a prompt lives on another scale, as in a BERT tower."""
    from repair.model.backbone import load_backbone

    backbone = load_backbone(tiny_spec)
    with torch.no_grad():
        backbone.model.token_embedding.weight.mul_(50.0)
    return backbone


def _repair_loss(backbone: Backbone, path, data_dir, values=None, cache_dir=None) -> float:
    """The default objective on the training images at ``path``'s weights (or ``values``), Fisher built at w_zs."""
    source = read_tensors(path)
    dataset = scan_image_folder(data_dir)
    kind = load_kind(backbone, source, dataset.classnames, ["a photo of a {}."], kind="coop")
    if values is not None:
        kind.load_values(values)
    objective = Objective().for_kind(kind)
    data = extract_features(backbone, dataset, cache_dir=cache_dir)
    surrogate = build_surrogate(objective.surrogate, kind, data, seed=0)
    with torch.no_grad():
        return float(mergetune_loss(kind, objective, data.features, data.labels, surrogate).total)


@pytest.fixture(scope="module")
def vit_b16_backbone(tmp_path_factory) -> Backbone:
    """CLIP ViT-B-16's widths, context and open_clip's own initialisation (random weights, no download), two
    blocks per tower for time: the parametrisation a real ``openai`` checkpoint's prompts live in."""
    import open_clip

    from repair.model.backbone import BackboneSpec, load_backbone
    from repair.synthetic import save_tiny_backbone

    config = open_clip.get_model_config("ViT-B-16")
    config = {**config, "vision_cfg": {**config["vision_cfg"], "layers": 2},
              "text_cfg": {**config["text_cfg"], "layers": 2}}
    return load_backbone(BackboneSpec(save_tiny_backbone(tmp_path_factory.mktemp("vit-b-16"), model_cfg=config)))


@pytest.mark.parametrize("which", ["backbone", "scaled_backbone", "vit_b16_backbone"])
def test_the_bare_default_moves_the_checkpoint_and_lowers_the_repair_loss(which, request, image_dirs, tmp_path):
    backbone = request.getfixturevalue(which)
    train, cache = image_dirs["train"], tmp_path / "features"  # each image set encoded once
    shots = replace(SHOTS, cache_dir=cache)
    finetuned = repair.finetune("coop", train, tmp_path / "ft.safetensors", backbone=backbone,
                                config=TrainConfig(steps=40), data_options=shots).path  # Adam, relative steps
    fixed = repair.repair(finetuned, train, tmp_path / "fixed.safetensors", backbone=backbone,
                          data_options=shots).path  # the bare command: no schedule, surrogate or lam_zs
    zero_shot = init_context(backbone, "a photo of a").float()
    ctx_ft = read_tensors(finetuned).tensors["ctx"].float()
    ctx_fixed = read_tensors(fixed).tensors["ctx"].float()
    displacement = (ctx_ft - zero_shot).norm()
    assert displacement > 0.05 * zero_shot.norm()  # fine-tuning moved the prompt on either scale
    assert (ctx_fixed - ctx_ft).norm() > 0.05 * displacement  # and so did the repair: not a no-op
    before = _repair_loss(backbone, finetuned, train, cache_dir=cache)
    after = _repair_loss(backbone, finetuned, train, values={"ctx": ctx_fixed}, cache_dir=cache)
    assert after < before


def test_the_chosen_schedule_is_recorded(backbone, image_dirs, tmp_path):
    train = image_dirs["train"]
    finetuned = repair.finetune("coop", train, tmp_path / "ft.safetensors", backbone=backbone,
                                config=TrainConfig(steps=3), data_options=SHOTS).path
    outcome = repair.repair(finetuned, train, tmp_path / "fixed.safetensors", backbone=backbone,
                            config=TrainConfig(max_steps=2), data_options=SHOTS, if_no_gain="repair")
    schedule = outcome.record.train
    defaults = repair.KINDS["coop"].defaults.schedule
    assert schedule["steps"] == defaults.steps and schedule["step_size"] == defaults.step_size
    assert schedule["batch_size"] == defaults.batch_size and schedule["optimizer"] == "adam"
    assert outcome.train_result.steps == 2  # --max-steps caps it
    assert set(outcome.record.result["lr"]) == {"ctx"} and outcome.record.result["lr"]["ctx"] > 0


def test_step_scales_follow_the_fine_tuning_displacement(backbone, image_dirs, tmp_path):
    """A relative step is relative to how far fine-tuning moved each tensor: scaling that move scales the lr."""
    from repair.kinds.coop import CoOpPrompts

    dataset = scan_image_folder(image_dirs["train"])
    zero_shot = init_context(backbone, "a photo of a")
    direction = torch.randn(zero_shot.shape, generator=torch.Generator().manual_seed(0))
    scales = []
    for size in (0.01, 0.1):
        kind = CoOpPrompts(backbone, zero_shot + size * direction, dataset.classnames, ["a photo of a {}."])
        scales.append(kind.step_scales()["ctx"])
    assert scales[1] == pytest.approx(10 * scales[0], rel=1e-4)
    fresh = CoOpPrompts(backbone, zero_shot, dataset.classnames, ["a photo of a {}."])  # nothing moved yet
    assert fresh.step_scales()["ctx"] == pytest.approx(float(zero_shot.pow(2).mean().sqrt()), rel=1e-5)


@pytest.mark.parametrize("bad, message", [
    ({"steps": 3, "epochs": 2}, "--steps or --epochs"),
    ({"lr": 0.1, "step_size": 0.02}, "--lr (absolute) or --step-size"),
    ({"optimizer": "sgd"}, "needs an absolute --lr"),
    ({"optimizer": "lion"}, "optimizer must be one of"),
])
def test_contradictory_schedules_are_refused(bad, message):
    with pytest.raises(repair.MergetuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**bad)
