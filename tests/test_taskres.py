"""TaskRes: a Dassl checkpoint of TaskRes-Text's learner, through every command."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

import repair
from cli_helpers import fast, invoke
from repair.kinds import load_kind
from repair.kinds.taskres import TaskRes
from upstream import dassl_save, through_every_command

CLASSES = ["blue", "green", "red", "yellow"]
TEMPLATES = ["a photo of a {}.", "a picture of a {}."]


def taskres_file(tmp_path, backbone):
    """``register_model("prompt_learner", TaskResLearner)`` after ``model.float()`` (geekyutao/TaskRes
    ``trainers/taskres.py``): the base text features (per class, the mean over templates of the unnormalised
    features) and the trained residuals, fp32."""
    with torch.no_grad():
        features = [backbone.text.encode_tokens(backbone.tokenize([t.format(c) for c in CLASSES])) for t in TEMPLATES]
        base = torch.stack(features, dim=1).mean(dim=1)
    residual = 0.05 * torch.randn_like(base)
    folder = tmp_path / "output" / "prompt_learner"
    folder.mkdir(parents=True)
    state = {"base_text_features": base, "text_feature_residuals": residual}
    return dassl_save(folder / "model-best.pth.tar", state, epoch=200, trained=("text_feature_residuals",))


def test_it_scores_as_upstreams_custom_clip(tmp_path, backbone):
    path = taskres_file(tmp_path, backbone)
    state = torch.load(path, weights_only=False)["state_dict"]
    kind = load_kind(backbone, repair.read_tensors(path), CLASSES, TEMPLATES, overrides={"residual_scale": 0.5})
    assert isinstance(kind, TaskRes)
    images = F.normalize(torch.randn(5, backbone.embed_dim), dim=-1)
    text = F.normalize(state["base_text_features"] + 0.5 * state["text_feature_residuals"], dim=-1)
    torch.testing.assert_close(kind.logits_for(images, CLASSES), backbone.logit_scale * images @ text.t())
    kind.load_values(kind.zero_shot_values())  # zero residual: the stored base, i.e. zero-shot CLIP
    torch.testing.assert_close(kind.logits_for(images, CLASSES),
                               backbone.logit_scale * images @ F.normalize(state["base_text_features"], dim=-1).t())


def test_a_taskres_checkpoint_through_every_command(tmp_path, backbone, tiny_spec, image_dirs):
    source = taskres_file(tmp_path, backbone)
    report = json.loads(invoke("inspect", source, "--json").stdout)
    roles = {tensor["name"]: tensor["role"] for tensor in report["tensors"]}
    assert roles == {"state_dict.base_text_features": "fixed", "state_dict.text_feature_residuals": "trained"}
    outputs = through_every_command(tmp_path, tiny_spec, image_dirs, source, "taskres", ["feature", "fisher", "l2"],
                                    out_name="model-best.pth.tar", novel=False, extra=("--residual-scale", "0.5"))
    given = torch.load(source, weights_only=False)["state_dict"]
    for out in outputs.values():
        state = torch.load(out, weights_only=True)["state_dict"]
        assert list(state) == list(given) and all(value.dtype == torch.float32 for value in state.values())
        assert torch.equal(state["base_text_features"], given["base_text_features"])
        assert not torch.equal(state["text_feature_residuals"], given["text_feature_residuals"])
    recorded = repair.read_tensors(outputs["l2"])
    assert json.loads(recorded.metadata["mergetune"])["kind_options"]["residual_scale"] == 0.5
    result = invoke("eval", outputs["l2"], "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    "--model", tiny_spec.model, "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    row = {row["name"]: row for row in json.loads(result.stdout)["models"]}[outputs["l2"].name]
    assert row["base"] is not None and row["novel"] is None  # one residual per class: no score on unseen classes


def test_finetune_makes_one(tmp_path, tiny_spec, image_dirs):
    out = tmp_path / "taskres.safetensors"
    result = invoke("finetune", "--kind", "taskres", "--data", image_dirs["train"], "--out", out, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    tensors = repair.read_tensors(out).tensors
    assert set(tensors) == {"base_text_features", "text_feature_residuals"}
    assert json.loads(invoke("inspect", out, "--json").stdout)["kind"] == "taskres"
