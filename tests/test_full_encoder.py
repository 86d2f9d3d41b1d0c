"""The fully fine-tuned image encoder kind (WiSE-FT / FLYP): every image-tower weight, with or without a head.

The reference for what a file means is open_clip itself with the file's weights loaded; WiSE-FT's
pickled ``ImageClassifier`` is built here from small stand-in classes (read back as data, never imported).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import repair
from repair.kinds import detect_kind, load_kind
from repair.kinds.clipfit import CLIPFit, clipfit_names
from repair.kinds.encoder import FullImageEncoder, ImageEncoderOptions
from repair.kinds.projector import VisualProjector
from repair.synthetic import TINY_CONFIG
from cli_helpers import fast, invoke

CLASSES = ["blue", "green", "red", "yellow"]
TEMPLATES = ["a photo of a {}."]


class ImageEncoder(nn.Module):  # WiSE-FT's wrapper around the CLIP model
    def __init__(self, model):
        super().__init__()
        self.model = model


class ClassificationHead(nn.Linear):
    def __init__(self, normalize, weights, biases):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone())


class ImageClassifier(nn.Module):
    def __init__(self, image_encoder, classification_head):
        super().__init__()
        self.image_encoder = image_encoder
        self.classification_head = classification_head


def tuned_clip(backbone, seed=1):
    """The tiny CLIP as plain open_clip with every image-tower weight moved."""
    import open_clip

    model = open_clip.CLIP(**json.loads(TINY_CONFIG.read_text()))
    model.load_state_dict(backbone.model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.visual.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def visual_only(model):
    return {name: t.contiguous().clone() for name, t in model.state_dict().items() if name.startswith("visual.")}


def test_a_tower_file_scores_as_open_clip_with_those_weights(tmp_path, backbone):
    model = tuned_clip(backbone)
    save_file(visual_only(model), tmp_path / "tower.safetensors")
    kind = load_kind(backbone, repair.read_tensors(tmp_path / "tower.safetensors"), CLASSES, TEMPLATES)
    assert isinstance(kind, FullImageEncoder) and not kind.has_head and kind.input_kind == "pixels"
    pixels = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ours = kind.logits_for(F.normalize(kind.image_encoder().encode(pixels), dim=-1), ["cyan", "pink"])
        expected = backbone.logit_scale * F.normalize(model.encode_image(pixels), dim=-1) @ \
            backbone.zero_shot_classifier(["cyan", "pink"], TEMPLATES).t()  # any class list: the text tower scores
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert kind.num_trainable() == sum(p.numel() for p in backbone.model.visual.parameters())
    for name, value in kind.zero_shot_values().items():  # w_zs: the pretrained tower
        index = int(name.split(".")[1])
        assert torch.equal(value, backbone.model.get_parameter(kind.names[index]))


def test_both_path_spaces_start_at_the_finetuned_model_and_the_weight_path_is_exact(tmp_path, backbone):
    model = tuned_clip(backbone)
    pixels = torch.randn(4, 3, 32, 32)
    head = (F.normalize(torch.randn(4, 32), dim=-1) * 10, torch.randn(4))
    for space in ("weight", "feature"):
        kind = FullImageEncoder(backbone, visual_only(model), head, CLASSES, TEMPLATES,
                                ImageEncoderOptions(path_space=space))
        ts = torch.tensor([0.0, 0.5])
        with torch.no_grad():
            at_ft = kind(pixels, ts)
            assert torch.allclose(at_ft.path_logits[0], at_ft.logits, atol=1e-5)  # w = w_ft: the path is a point
            for parameter in kind.trainable().values():
                parameter.add_(0.1 * torch.randn_like(parameter))
        output = kind(pixels, ts)
        if space == "weight":  # t = 0.5 is open_clip with the mid-point weights, and the mid-point head
            midpoint = {name: (kind.ft_weights[name] + value.detach()) / 2 for name, value in kind.model_weights().items()}
            with torch.no_grad():
                images = F.normalize(torch.func.functional_call(
                    backbone.model.visual, {k.removeprefix("visual."): v for k, v in midpoint.items()}, (pixels,)),
                    dim=-1)
                weight = (kind.head_ft[0] + kind.head_weight) / 2
                bias = (kind.head_ft[1] + kind.head_bias) / 2
                expected = kind.scale * images @ weight.t() + bias
            torch.testing.assert_close(output.path_logits[1], expected, rtol=1e-4, atol=1e-4)
        output.path_logits.sum().backward()  # checkpointed points still give gradients to every weight
        assert all(parameter.grad is not None for parameter in kind.trainable().values())


def test_detection_leaves_clipfit_and_projector_files_alone(tmp_path, backbone):
    state = {name: t.contiguous().clone() for name, t in backbone.model.state_dict().items()}
    files = {
        "tower": (visual_only(tuned_clip(backbone)), FullImageEncoder),
        "clipfit": ({name: state[name] for name in clipfit_names(backbone)}, CLIPFit),
        "norms-only": ({name: state[name] for name in clipfit_names(backbone) if name.startswith("visual.")}, CLIPFit),
        "projector": ({"visual.proj": state["visual.proj"]}, VisualProjector),
        "full": (state, CLIPFit),  # a full state dict stays CLIPFit's; --kind image-encoder reads it
    }
    for name, (tensors, expected) in files.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        assert detect_kind(repair.read_tensors(tmp_path / f"{name}.safetensors")) is expected, name
    prefixed = tmp_path / "module.pt"  # torch, under a wrapper prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in visual_only(tuned_clip(backbone)).items()}}, prefixed)
    kind = load_kind(backbone, repair.read_tensors(prefixed), CLASSES, TEMPLATES)
    assert isinstance(kind, FullImageEncoder) and kind.describe()["prefix"] == "state_dict.module."
    full = load_kind(backbone, repair.read_tensors(tmp_path / "full.safetensors"), CLASSES, TEMPLATES,
                     kind="image-encoder")
    assert isinstance(full, FullImageEncoder) and set(full.export()) == set(state)


def wise_ft_pickle(path, backbone, normalize=True):
    model = tuned_clip(backbone)
    weights = backbone.logit_scale * backbone.zero_shot_classifier(CLASSES, TEMPLATES)  # WiSE-FT's zero-shot head
    torch.save(ImageClassifier(ImageEncoder(model), ClassificationHead(normalize, weights + 0.1, torch.zeros(4))), path)
    return model


def test_a_wise_ft_image_classifier_through_every_command(tmp_path, backbone, tiny_spec, image_dirs):
    ft = tmp_path / "classifier.pt"
    model = wise_ft_pickle(ft, backbone)
    report = json.loads(invoke("inspect", ft, "--json").stdout)
    assert report["kind"] == "image-encoder"
    trained = {t["name"] for t in report["tensors"] if t["trainable"]}
    assert "classification_head.weight" in trained and "image_encoder.model.visual.conv1.weight" in trained
    assert not any(name.startswith("image_encoder.model.transformer.") for name in trained)
    kind = load_kind(backbone, repair.read_tensors(ft), CLASSES, TEMPLATES)
    assert kind.has_head and kind.scale == 1.0  # rows of norm ~logit_scale carry their own scale
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = F.normalize(model.encode_image(pixels), dim=-1)
        expected = features @ kind.head_ft[0].t() + kind.head_ft[1]
        torch.testing.assert_close(kind.logits_for(F.normalize(kind.image_encoder().encode(pixels), dim=-1), CLASSES),
                                   expected, rtol=1e-5, atol=1e-5)
    outputs = {}
    for surrogate in ("feature", "fisher", "l2"):
        out = tmp_path / f"{surrogate}.safetensors"
        result = invoke("repair", ft, "--data", image_dirs["train"], "--out", out, "--surrogate", surrogate,
                        "--lr", "0.01", *fast(tiny_spec), "--json")
        assert result.exit_code == 0, result.output
        outputs[surrogate] = out
    source = repair.read_tensors(ft).tensors
    fixed = load_file(outputs["l2"])
    assert fixed.keys() == source.keys()  # every tensor of the input, under its own name
    assert not torch.equal(fixed["image_encoder.model.visual.conv1.weight"],
                           source["image_encoder.model.visual.conv1.weight"])
    assert not torch.equal(fixed["classification_head.weight"], source["classification_head.weight"])
    assert torch.equal(fixed["image_encoder.model.token_embedding.weight"],
                       source["image_encoder.model.token_embedding.weight"])
    result = invoke("eval", ft, outputs["l2"], "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    "--model", tiny_spec.model, "--baselines", "--wise-alpha", "1", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    rows = {row["name"]: row for row in document["models"]}
    assert rows["l2.safetensors"]["novel"] is None  # a head scores its own classes
    assert rows["wise-ft"]["base"] == rows["classifier.pt"]["base"]  # a = 1 is the fine-tuned model
    result = invoke("path", ft, outputs["l2"], "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", tiny_spec.model, "--points", "3", "--no-cache")
    assert result.exit_code == 0, result.output
    segments = json.loads((tmp_path / "path.json").read_text())["segments"]
    assert segments[0]["points"][-1]["accuracy"] == rows["classifier.pt"]["base"]
    result = invoke("push", outputs["l2"], "--repo", "org/wise-ft", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0 and "fully fine-tuned image encoder" in (tmp_path / "stage" / "README.md").read_text()


def test_finetune_repair_eval_without_a_head(tmp_path, tiny_spec, image_dirs):
    ft = tmp_path / "ft.safetensors"
    result = invoke("finetune", "--kind", "image-encoder", "--data", image_dirs["train"], "--out", ft, "--lr", "0.05",
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert all(name.startswith("visual.") for name in load_file(ft))
    headed = tmp_path / "headed.safetensors"
    result = invoke("finetune", "--kind", "image-encoder", "--classification-head", "--data", image_dirs["train"],
                    "--out", headed, *fast(tiny_spec), "--max-steps", "1")
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("inspect", headed, "--json").stdout)
    assert report["kind"] == "image-encoder" and report["metadata"]["kind_details"]["head"] is True
    assert {"classification_head.weight", "classification_head.bias"} <= {t["name"] for t in report["tensors"]}
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "f.safetensors", "--surrogate",
                    "feature", *fast(tiny_spec))
    assert result.exit_code == 2 and "use --surrogate fisher or l2" in result.output
    assert not (tmp_path / "f.safetensors").exists()
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "fisher.safetensors",
                    "--surrogate", "fisher", "--path-space", "feature", *fast(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kind_options"]["path_space"] == "feature"  # the cheap path, recorded
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "l2.safetensors",
                    *fast(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["objective"]["surrogate"] == "l2" and document["kind_options"]["path_space"] == "weight"
    fixed = tmp_path / "l2.safetensors"
    result = invoke("eval", ft, fixed, "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    "--model", tiny_spec.model, "--baselines", "--wise-alpha", "1", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    rows = {row["name"]: row for row in document["models"]}
    assert rows["l2.safetensors"]["novel"] is not None  # the text tower scores novel classes
    assert (rows["wise-ft"]["base"], rows["wise-ft"]["novel"]) == (rows["ft.safetensors"]["base"],
                                                                   rows["ft.safetensors"]["novel"])  # a = 1
    result = invoke("path", ft, fixed, "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", tiny_spec.model, "--points", "3", "--no-cache")
    assert result.exit_code == 0, result.output
    result = invoke("push", fixed, "--repo", "org/flyp", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output


def test_files_it_cannot_read_honestly_are_refused_in_one_line(tmp_path, backbone, tiny_spec, image_dirs):
    def refused(path, *extra):
        result = invoke("repair", path, "--data", image_dirs["train"], "--out", tmp_path / "out.safetensors",
                        *extra, *fast(tiny_spec))
        assert result.exit_code == 5 and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "out.safetensors").exists()
        return result.output

    state = {name: t.contiguous().clone() for name, t in tuned_clip(backbone).state_dict().items()}
    state["transformer.resblocks.0.attn.in_proj_weight"] += 0.1  # FLYP-style: the text tower moved too
    save_file(state, tmp_path / "both.safetensors")
    assert "text tower differs" in refused(tmp_path / "both.safetensors", "--kind", "image-encoder")
    tower = visual_only(tuned_clip(backbone))
    del tower["visual.conv1.weight"]
    tower["visual.transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(3)
    save_file(tower, tmp_path / "partial.safetensors")
    assert "lacks 1 of this image tower's" in refused(tmp_path / "partial.safetensors", "--kind", "image-encoder")
    wise_ft_pickle(tmp_path / "raw.pt", backbone, normalize=False)
    assert "unnormalised" in refused(tmp_path / "raw.pt")


def test_load_repaired_scores_with_the_checkpoints_own_tower(tmp_path, backbone, image_dirs):
    ft = repair.finetune("image-encoder", image_dirs["train"], tmp_path / "ft.safetensors", backbone=backbone,
                         config=repair.TrainConfig(epochs=1, batch_size=8, lr=0.5),
                         data_options=repair.DataOptions(shots=4, cache_dir=None))
    classifier = repair.load_repaired(ft.path, backbone=backbone)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model = tuned_clip(backbone)
        model.visual.load_state_dict({k.removeprefix("visual."): v for k, v in load_file(ft.path).items()})
        expected = backbone.logit_scale * F.normalize(model.encode_image(pixels), dim=-1) @ \
            backbone.zero_shot_classifier(CLASSES, TEMPLATES).t()
        frozen = backbone.logit_scale * backbone.encode_images(pixels) @ \
            backbone.zero_shot_classifier(CLASSES, TEMPLATES).t()
    assert not torch.allclose(expected, frozen, atol=1e-3)  # the fine-tuned tower really differs
    torch.testing.assert_close(classifier.logits(pixels), expected, rtol=1e-5, atol=1e-5)
