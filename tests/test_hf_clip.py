"""Hugging Face transformers CLIP folders, read as the image-encoder kind; the name map tested both ways."""

from __future__ import annotations

import json

import pytest
import torch

import repair
from cli_helpers import invoke
from repair.io.hf_clip import to_hf
from upstream import through_every_command

transformers = pytest.importorskip("transformers", reason="Hugging Face CLIP folders are written with transformers")


def tiny_config():
    """transformers' CLIPConfig of the tiny open_clip model (GELU, as its config; OpenAI CLIPs use quick_gelu)."""
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="gelu", projection_dim=32)
    return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def open_clip_model(tensors):
    import open_clip

    from repair.synthetic import TINY_CONFIG

    model = open_clip.CLIP(**json.loads(TINY_CONFIG.read_text())).eval()
    model.load_state_dict(tensors, strict=True)
    return model


def test_the_name_map_both_ways(tmp_path):
    torch.manual_seed(0)
    hf = transformers.CLIPModel(tiny_config()).eval()
    hf.save_pretrained(tmp_path / "hf")
    read = repair.read_tensors(tmp_path / "hf")  # transformers -> open_clip names
    assert read.layout.name == "hf-clip" and "visual.transformer.resblocks.0.attn.in_proj_weight" in read.tensors
    model = open_clip_model(read.tensors)
    import open_clip

    pixels = torch.randn(2, 3, 32, 32)
    tokens = open_clip.get_tokenizer("ViT-B-16")(["a photo of a red thing.", "blue"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels)),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)),
                                   rtol=1e-4, atol=1e-5)
    # open_clip -> transformers names: what from_pretrained loads, with nothing missing or left over
    written = to_hf(model.state_dict(), read.layout.details["entries"])
    back = transformers.CLIPModel(tiny_config())
    missing, unexpected = back.load_state_dict(written, strict=False)
    assert not unexpected and not [key for key in missing if not key.endswith("position_ids")]
    assert all(torch.equal(back.state_dict()[key], hf.state_dict()[key]) for key in written)


def _features(output):
    """transformers 5 returns an output object (projected features in ``pooler_output``), earlier ones a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def fine_tuned_vision_tower(tmp_path, backbone, cls=None):
    """A CLIPModel holding the backbone's weights with its vision tower fine-tuned, saved as fusion_bench and the
    HF Trainer save one (``save_pretrained``: config.json + model.safetensors)."""
    cls = cls or transformers.CLIPModel
    model = transformers.CLIPModel(tiny_config())
    read = {**model.state_dict()}
    entries = [{"hf": key, **_entry(key)} for key in read if not key.endswith("position_ids")]
    model.load_state_dict(to_hf(backbone.model.state_dict(), entries), strict=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.vision_model.named_parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path / "fused-clip"
    if cls is transformers.CLIPModel:
        model.save_pretrained(folder)
    else:
        vision = cls(model.config.vision_config)
        getattr(vision, "vision_model", vision).load_state_dict(model.vision_model.state_dict())  # no prefix in 5.x
        vision.save_pretrained(folder)
    return folder


def _entry(key):
    from repair.io.hf_clip import open_clip_name

    name, block = open_clip_name(key, "vision_model.")
    return {"name": name, "block": block, "transposed": key.endswith("projection.weight")}


def test_a_fine_tuned_hf_clip_folder_through_every_command(tmp_path, backbone, tiny_spec, image_dirs):
    source = fine_tuned_vision_tower(tmp_path, backbone)
    report = json.loads(invoke("inspect", source, "--json").stdout)
    roles = {tensor["name"]: tensor["role"] for tensor in report["tensors"]}
    assert report["kind"] == "image-encoder" and report["layout"] == "hf-clip"
    assert roles["visual.conv1.weight"] == "trained" and roles["transformer.resblocks.0.ln_1.weight"] == "frozen"
    outputs = through_every_command(tmp_path, tiny_spec, image_dirs, source, "image-encoder", ["l2"],
                                    out_name="repaired-clip", novel=True)
    out = outputs["l2"]
    assert sorted(entry.name for entry in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = transformers.CLIPModel.from_pretrained(source)
    assert torch.equal(loaded.text_model.final_layer_norm.weight, original.text_model.final_layer_norm.weight)
    assert not torch.equal(loaded.vision_model.pre_layrnorm.weight, original.vision_model.pre_layrnorm.weight)


def test_a_vision_only_folder_borrows_the_backbones_projection(tmp_path, backbone, tiny_spec, image_dirs):
    source = fine_tuned_vision_tower(tmp_path, backbone, transformers.CLIPVisionModel)
    out = tmp_path / "repaired-vision"
    result = invoke("repair", source, "--data", image_dirs["train"], "--out", out, "--surrogate", "l2",
                    "--model", tiny_spec.model, "--epochs", "1", "--shots", "4", "--batch-size", "8", "--no-cache", "-q")
    assert result.exit_code == 0, result.output
    loaded, info = transformers.CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert "visual.proj" not in repair.read_tensors(out).tensors  # never written: it is not in the input's layout


def test_a_changed_text_tower_is_refused(tmp_path, backbone, tiny_spec, image_dirs):
    source = fine_tuned_vision_tower(tmp_path, backbone)
    model = transformers.CLIPModel.from_pretrained(source)
    with torch.no_grad():
        model.text_model.final_layer_norm.weight.add_(0.5)
    model.save_pretrained(source)
    result = invoke("repair", source, "--data", image_dirs["train"], "--out", tmp_path / "o",
                    "--model", tiny_spec.model, "--no-cache", "-q")
    assert result.exit_code == 5 and "text tower differs" in result.output, result.output
