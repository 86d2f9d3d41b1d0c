"""CLIP-Adapter: a Dassl checkpoint of the adapter module, through every command."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

import repair
from cli_helpers import fast, invoke
from repair.kinds import load_kind
from repair.kinds.clip_adapter import CLIPAdapter
from upstream import dassl_save, through_every_command

CLASSES = ["blue", "green", "red", "yellow"]


class Adapter(nn.Module):
    """gaopengcuhk/CLIP-Adapter ``clip_adapter.py``'s Adapter, as written there."""

    def __init__(self, c_in, reduction=4):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_in // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(c_in // reduction, c_in, bias=False), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.fc(x)


def adapter_file(tmp_path, backbone, seed=0):
    """``register_model('clip_adapter', model.adapter)``: the Adapter's state dict, fp32 (CLIP cast to float)."""
    torch.manual_seed(seed)
    adapter = Adapter(backbone.embed_dim, 4)
    folder = tmp_path / "output" / "clip_adapter"
    folder.mkdir(parents=True, exist_ok=True)
    return dassl_save(folder / "model.pth.tar-200", adapter.state_dict(), epoch=200, val_result=71.5,
                      trained=("fc.0.weight", "fc.2.weight")), adapter


def test_it_scores_as_upstreams_custom_clip(tmp_path, backbone):
    path, adapter = adapter_file(tmp_path, backbone)
    kind = load_kind(backbone, repair.read_tensors(path), CLASSES, ["a photo of a {}."])
    assert isinstance(kind, CLIPAdapter)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        image = backbone.model.encode_image(pixels)
        ours = kind.logits_for(image, CLASSES)
        mixed = 0.2 * adapter(image) + 0.8 * image  # CustomCLIP.forward, ratio = 0.2
        text = backbone.zero_shot_classifier(CLASSES, ["a photo of a {}."])
        expected = backbone.logit_scale * F.normalize(mixed, dim=-1) @ text.t()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the zero-shot point (zero weights) scores exactly as zero-shot CLIP
        kind.load_values(kind.zero_shot_values())
        torch.testing.assert_close(kind.logits_for(image, CLASSES),
                                   backbone.logit_scale * F.normalize(image, dim=-1) @ text.t())


def test_a_clip_adapter_checkpoint_through_every_command(tmp_path, backbone, tiny_spec, image_dirs):
    source, _ = adapter_file(tmp_path, backbone)
    outputs = through_every_command(tmp_path, tiny_spec, image_dirs, source, "clip-adapter", ["l2", "distill"],
                                    out_name="model.pth.tar-200", novel=True)
    result = invoke("repair", source, "--data", image_dirs["train"], "--out", tmp_path / "f.pth.tar",
                    "--surrogate", "fisher", *fast(tiny_spec))
    assert result.exit_code == 2 and "Fisher there is zero" in result.output and "use --surrogate" in result.output
    written = torch.load(outputs["l2"], weights_only=True)
    assert written["epoch"] == 200 and written["val_result"] == 71.5  # Dassl's load_model prints both
    upstream = Adapter(backbone.embed_dim, 4)
    upstream.load_state_dict(written["state_dict"])  # strict: exactly the adapter's tensors, fp32
    assert all(value.dtype == torch.float32 for value in written["state_dict"].values())


def test_finetune_makes_one(tmp_path, tiny_spec, image_dirs):
    out = tmp_path / "adapter.safetensors"
    result = invoke("finetune", "--kind", "clip-adapter", "--data", image_dirs["train"], "--out", out,
                    *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("inspect", out, "--json").stdout)
    assert report["kind"] == "clip-adapter" and report["trainable_numbers"] == 2 * 32 * 8
