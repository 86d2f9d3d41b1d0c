"""Every kind on the towers real users have: a Hugging Face text tower and a CNN image tower.

Both are tiny configs built offline (see conftest): a BERT text tower inside open_clip's
CustomTextCLIP, and open_clip's ModifiedResNet with BatchNorm as the image tower.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repair
from repair.io import read_tensors
from repair.kinds.clipfit import clipfit_names
from repair.kinds.coop import CoOpPrompts, init_context
from repair.model.backbone import HFTextTower

TEMPLATE = "a photo of a {}."
FAST = repair.TrainConfig(epochs=2, batch_size=8, lr=0.05)
SHOTS = repair.DataOptions(shots=4)


def test_the_hf_tower_is_recognised_and_encodes_like_open_clip(hf_backbone):
    assert isinstance(hf_backbone.text, HFTextTower)
    assert hf_backbone.describe_towers()["text"].startswith("Hugging Face BertModel")
    texts = ["a photo of a red.", "a picture of the blue."]
    tokens = hf_backbone.tokenize(texts)
    with torch.no_grad():
        reference = F.normalize(hf_backbone.model.encode_text(tokens), dim=-1)
    assert torch.allclose(hf_backbone.encode_texts(texts), reference, atol=1e-6)


def test_a_prompt_holding_the_init_words_equals_the_towers_own_encoding(hf_backbone):
    classes = ["red", "green", "blue"]
    ctx = init_context(hf_backbone, "a photo of a")
    assert ctx.shape == (4, hf_backbone.text_width)
    prompts = CoOpPrompts(hf_backbone, ctx, classes, [TEMPLATE])
    with torch.no_grad():
        ours = prompts.class_features()
    assert torch.allclose(ours, hf_backbone.encode_texts([TEMPLATE.format(name) for name in classes]), atol=1e-5)


def test_coop_finetune_repair_eval_on_an_hf_tower(tmp_path, hf_backbone, image_dirs):
    ft = repair.finetune("coop", image_dirs["train"], tmp_path / "ft.safetensors", backbone=hf_backbone,
                         config=FAST, data_options=SHOTS)
    assert ft.record.backbone.text_tower.startswith("Hugging Face")
    fixed = repair.repair(ft.path, image_dirs["train"], tmp_path / "fixed.safetensors", backbone=hf_backbone,
                          config=FAST, data_options=SHOTS, objective=repair.Objective(lam_zs=1.0, surrogate="fisher"))
    report = repair.evaluate([ft.path, fixed.path], image_dirs["test"], novel_dir=image_dirs["novel"],
                             backbone=hf_backbone, baselines=True)
    assert all(row["novel"] is not None for row in report["models"] if row["role"] == "checkpoint")


def test_clipfit_on_an_hf_tower_trains_the_ffn_output_biases(tmp_path, hf_backbone, image_dirs):
    names = clipfit_names(hf_backbone)
    text = [name for name in names if name.startswith("text.")]
    assert text == [f"text.transformer.encoder.layer.{i}.output.dense.bias" for i in range(2)]
    assert all(name.startswith("visual.") for name in names if name not in text)
    ft = repair.finetune("clipfit", image_dirs["train"], tmp_path / "ft.safetensors", backbone=hf_backbone,
                         config=FAST, data_options=SHOTS)
    tensors = read_tensors(ft.path).tensors
    pretrained = dict(hf_backbone.model.named_parameters())
    assert set(tensors) == set(names) and not torch.equal(tensors[text[0]], pretrained[text[0]])
    same = repair.repair(ft.path, image_dirs["train"], tmp_path / "same.safetensors", backbone=hf_backbone,
                         config=repair.TrainConfig(max_steps=0), data_options=SHOTS, if_no_gain="repair")
    assert all(torch.equal(read_tensors(same.path).tensors[name], tensors[name]) for name in names)


def test_clipfit_on_a_cnn_trains_batchnorm_affines_and_freezes_its_statistics(tmp_path, cnn_backbone, image_dirs):
    names = clipfit_names(cnn_backbone)
    image = [name for name in names if name.startswith("visual.")]
    modules = dict(cnn_backbone.model.named_modules())
    assert image and all(isinstance(modules[name.rsplit(".", 1)[0]], torch.nn.BatchNorm2d) for name in image)
    assert len(image) == 2 * sum(isinstance(module, torch.nn.BatchNorm2d) for module in modules.values())
    assert any(name.startswith("transformer.resblocks.") for name in names)
    statistics = {name: buffer.clone() for name, buffer in cnn_backbone.model.visual.named_buffers()
                  if "running" in name}
    ft = repair.finetune("clipfit", image_dirs["train"], tmp_path / "ft.safetensors", backbone=cnn_backbone,
                         config=FAST, data_options=SHOTS)
    assert all(torch.equal(buffer, statistics[name]) for name, buffer in cnn_backbone.model.visual.named_buffers()
               if "running" in name)
    pretrained = dict(cnn_backbone.model.named_parameters())
    assert not torch.equal(read_tensors(ft.path).tensors[image[0]], pretrained[image[0]])
    fixed = repair.repair(ft.path, image_dirs["train"], tmp_path / "fixed.safetensors", backbone=cnn_backbone,
                          config=FAST, data_options=SHOTS, objective=repair.Objective(lam_zs=1.0, surrogate="l2"))
    report = repair.evaluate([fixed.path], image_dirs["test"], backbone=cnn_backbone)
    assert report["models"][1]["base"] is not None


@pytest.mark.parametrize("tower", ["hf_backbone", "cnn_backbone"])
def test_linear_heads_work_unchanged_on_either_tower(tmp_path, request, image_dirs, tower):
    backbone = request.getfixturevalue(tower)
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(4, backbone.embed_dim), "bias": torch.zeros(4)}, head)
    fixed = repair.repair(head, image_dirs["train"], tmp_path / "fixed.safetensors", backbone=backbone,
                          config=FAST, data_options=SHOTS)
    assert read_tensors(fixed.path).tensors["weight"].shape == (4, backbone.embed_dim)


def test_inspect_names_the_towers(tmp_path, cnn_backbone, image_dirs):
    ft = repair.finetune("linear", image_dirs["train"], tmp_path / "ft.safetensors", backbone=cnn_backbone,
                         config=FAST, data_options=SHOTS)
    backbone = repair.inspect_checkpoint(ft.path)["metadata"]["backbone"]
    assert backbone["image_tower"].startswith("ModifiedResNet") and backbone["text_tower"].startswith("CLIP text")
