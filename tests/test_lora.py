"""LoRA adapters: CLIP-LoRA torch files and PEFT adapter folders, through every command.

The files are built here on the tiny CLIP (one text block, one image block); the reference for what
an adapter means is open_clip itself with ``s * B @ A`` added to its weights by hand (and PEFT, where
it is installed, loading our folders).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import repair
from repair.kinds import load_kind
from repair.kinds.lora import LoRA
from repair.synthetic import TINY_CONFIG
from cli_helpers import fast, invoke

TEMPLATES = ["a photo of a {}."]
CLASSES = ["blue", "green", "red", "yellow"]


def clip_lora_file(path, *, encoder="both", projs=("q_proj", "v_proj", "proj"), layers=2, seed=1, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    weights = {f"layer_{i}": {proj: {"w_lora_A": torch.randn(2, 32, generator=generator) * scale,
                                     "w_lora_B": torch.randn(32, 2, generator=generator) * scale}
                              for proj in projs} for i in range(layers)}
    torch.save({"weights": weights, "metadata": {"r": 2, "alpha": 1, "encoder": encoder,
                                                  "params": ["q", "v", "o"], "position": "all"}}, path)
    return weights


def tiny_open_clip(tiny_model_dir):
    """The tiny CLIP as plain open_clip, with the backbone's own weights."""
    import open_clip
    from safetensors.torch import load_file

    folder = tiny_model_dir.removeprefix("local-dir:")
    model = open_clip.CLIP(**json.loads(TINY_CONFIG.read_text()))
    model.load_state_dict(load_file(f"{folder}/open_clip_model.safetensors"))
    return model.eval()


def features(model, backbone, pixels):
    with torch.no_grad():
        images = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(backbone.tokenize([TEMPLATES[0].format(c) for c in CLASSES])), dim=-1)
    return images, text


def kind_features(kind, pixels):
    with torch.no_grad():
        images = F.normalize(kind.image_encoder().encode(pixels), dim=-1)
        return images, kind._class_features(kind.model_weights(), CLASSES)


def test_a_clip_lora_file_is_the_hand_merged_open_clip_model(tmp_path, backbone, tiny_model_dir):
    weights = clip_lora_file(tmp_path / "a.pt")
    kind = load_kind(backbone, repair.read_tensors(tmp_path / "a.pt"), CLASSES, TEMPLATES)
    assert isinstance(kind, LoRA) and kind.touches_text and kind.touches_image
    model = tiny_open_clip(tiny_model_dir)
    scale = 1 / math.sqrt(2)  # CLIP-LoRA: alpha / sqrt(r)
    with torch.no_grad():
        for layer, block in ((0, model.transformer.resblocks[0]), (1, model.visual.transformer.resblocks[0])):
            factors = weights[f"layer_{layer}"]
            for proj, rows in (("q_proj", slice(0, 32)), ("v_proj", slice(64, 96))):
                block.attn.in_proj_weight[rows] += scale * factors[proj]["w_lora_B"] @ factors[proj]["w_lora_A"]
            block.attn.out_proj.weight += scale * factors["proj"]["w_lora_B"] @ factors["proj"]["w_lora_A"]
    pixels = torch.randn(3, 3, 32, 32)
    for ours, reference in zip(kind_features(kind, pixels), features(model, backbone, pixels)):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_a_clip_lora_file_through_every_command(tmp_path, tiny_spec, image_dirs):
    source = tmp_path / "ft.pt"
    clip_lora_file(source)
    before = source.read_bytes()
    result = invoke("inspect", source, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "lora" and report["trainable_numbers"] == 2 * 3 * (2 * 32 + 32 * 2)
    outputs = {}
    for surrogate in ("feature", "fisher", "l2"):
        out = tmp_path / f"fixed-{surrogate}.pt"
        result = invoke("repair", source, "--data", image_dirs["train"], "--out", out, "--surrogate", surrogate,
                        "--lam-zs", "1", *fast(tiny_spec), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["objective"]["surrogate"] == surrogate
        outputs[surrogate] = out
    assert source.read_bytes() == before
    fixed = torch.load(outputs["fisher"], weights_only=True)  # loads where CLIP-LoRA loads it: plain torch.load
    original = torch.load(source, weights_only=True)
    assert set(fixed) == {"weights", "metadata"}
    assert {key: fixed["metadata"][key] for key in ("r", "alpha", "encoder", "params", "position")} == original["metadata"]
    for layer, projs in original["weights"].items():
        for proj, factors in projs.items():
            for name, tensor in factors.items():
                assert fixed["weights"][layer][proj][name].shape == tensor.shape
                assert fixed["weights"][layer][proj][name].dtype == tensor.dtype
    assert not torch.equal(fixed["weights"]["layer_1"]["proj"]["w_lora_B"], original["weights"]["layer_1"]["proj"]["w_lora_B"])
    assert json.loads(fixed["metadata"]["mergetune"])["kind"] == "lora"
    result = invoke("eval", source, outputs["fisher"], "--data", image_dirs["test"], "--novel-data",
                    image_dirs["novel"], "--model", tiny_spec.model, "--baselines", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["models"]}
    assert rows["fixed-fisher.pt"]["novel"] is not None
    baselines = json.loads(result.stdout)["baselines"]
    assert {"wise-ft", "entropy-alpha"} <= set(baselines["chosen"])  # exact interpolation of the updates
    assert "not its weights" in baselines["skipped"]["ties"]  # an element-wise merge of factors is no merge
    result = invoke("path", source, outputs["fisher"], "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", tiny_spec.model, "--points", "3", "--no-cache")
    assert result.exit_code == 0, result.output
    path = json.loads((tmp_path / "path.json").read_text())
    assert [segment["points"][0]["t"] for segment in path["segments"]] == [0.0, 0.0, 0.0]
    result = invoke("push", outputs["fisher"], "--repo", "org/lora-fixed", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "LoRA adapter" in card and (tmp_path / "stage" / "fixed-fisher.pt").read_bytes() == outputs["fisher"].read_bytes()


def test_points_between_adapters_are_the_straight_line_in_weights(tmp_path, backbone):
    clip_lora_file(tmp_path / "a.pt", seed=1)
    clip_lora_file(tmp_path / "b.pt", seed=2)
    a = load_kind(backbone, repair.read_tensors(tmp_path / "a.pt"), CLASSES, TEMPLATES)
    b = load_kind(backbone, repair.read_tensors(tmp_path / "b.pt"), CLASSES, TEMPLATES)
    start, end = a.snapshot(), b.snapshot()
    w_start, w_end = a.model_weights(), b.model_weights()
    a.load_values(a.interpolate(start, end, 0.3))
    for name, value in a.model_weights().items():
        torch.testing.assert_close(value, 0.7 * w_start[name] + 0.3 * w_end[name])
    a.load_values(a.interpolate(a.zero_shot_values(), start, 0.4))  # WiSE-FT: 0.4 of the fine-tuned update
    base = dict(backbone.model.named_parameters())
    for name, value in a.model_weights().items():
        torch.testing.assert_close(value - base[name], 0.4 * (w_start[name] - base[name]))
    a.load_values(start)  # the adapter's own rank again: back to its factors
    assert all(torch.equal(value, w_start[name]) for name, value in a.model_weights().items())
    assert a.same_weights(a.zero_shot_values(), b.zero_shot_values())  # B = 0 whatever A is


def test_peft_folders_round_trip_and_load_in_peft(tmp_path, tiny_spec, tiny_model_dir, backbone, image_dirs):
    ft, fixed = tmp_path / "ft-adapter", tmp_path / "fixed-adapter"
    result = invoke("finetune", "--kind", "lora", "--lora-layout", "peft", "--lora-rank", "4", "--lora-alpha", "8",
                    "--data", image_dirs["train"], "--out", ft, "--lr", "0.05", *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ft.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    result = invoke("inspect", ft, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["format"] == "peft", result.output
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", fixed, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or lock left behind
    theirs = repair.read_tensors(ft)
    ours = repair.read_tensors(fixed)
    assert {k: (t.shape, t.dtype) for k, t in ours.tensors.items()} == {k: (t.shape, t.dtype) for k, t in theirs.tensors.items()}
    assert all(key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
               for key in ours.tensors)
    assert json.loads((fixed / "adapter_config.json").read_text())["r"] == 4
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", fixed, *fast(tiny_spec))
    assert result.exit_code == 8  # an existing folder needs --force
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", fixed, "--force", *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    result = invoke("push", fixed, "--repo", "org/adapter", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output
    staged = tmp_path / "stage" / "fixed-adapter"
    assert repair.read_tensors(staged).sha256 == repair.read_tensors(fixed).sha256
    assert "--include 'fixed-adapter/*'" in (tmp_path / "stage" / "README.md").read_text()
    kind = load_kind(backbone, repair.read_tensors(fixed), CLASSES, TEMPLATES)
    peft = pytest.importorskip("peft", reason="peft is not installed: names and shapes were checked above")
    model = peft.PeftModel.from_pretrained(tiny_open_clip(tiny_model_dir), str(fixed))
    # PEFT's own per-layer updates (its MultiheadAttention merge() adds out_proj's twice: huggingface/peft#3774)
    base = dict(backbone.model.named_parameters())
    ours = {name: value - base[name] for name, value in kind.model_weights().items()}
    for block in ("transformer.resblocks.0.attn", "visual.transformer.resblocks.0.attn"):
        layer = model.base_model.model.get_submodule(block)
        torch.testing.assert_close(layer.get_delta_weight("default"), ours[f"{block}.in_proj_weight"])
        torch.testing.assert_close(layer.base_layer.out_proj.get_delta_weight("default"),
                                   ours[f"{block}.out_proj.weight"])
    assert len(ours) == 4


def test_an_adapter_saved_by_peft_is_read_as_peft_computes_it(tmp_path, backbone, tiny_model_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = tiny_open_clip(tiny_model_dir)
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_fc", "c_proj"], rank_pattern={"c_fc": 3},
                             alpha_pattern={"visual.transformer.resblocks.0.mlp.c_proj": 1.5})
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    wrapped.save_pretrained(tmp_path / "adapter")
    kind = load_kind(backbone, repair.read_tensors(tmp_path / "adapter"), CLASSES, TEMPLATES)
    assert kind.describe()["ranks"] == [2, 3]
    merged = wrapped.merge_and_unload()
    pixels = torch.randn(2, 3, 32, 32)
    for got, expected in zip(kind_features(kind, pixels), features(merged, backbone, pixels)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_merge_writes_the_full_open_clip_checkpoint(tmp_path, tiny_spec, tiny_model_dir, backbone, image_dirs):
    from safetensors.torch import load_file

    clip_lora_file(tmp_path / "ft.pt")
    out = tmp_path / "merged.safetensors"
    result = invoke("repair", "--if-no-gain", "repair",
                    tmp_path / "ft.pt", "--data", image_dirs["train"], "--out", out, "--merge",
                    "--max-steps", "0", *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    model = tiny_open_clip(tiny_model_dir)
    model.load_state_dict(load_file(out))  # every open_clip tensor, the adapter merged in
    kind = load_kind(backbone, repair.read_tensors(tmp_path / "ft.pt"), CLASSES, TEMPLATES)
    pixels = torch.randn(2, 3, 32, 32)
    for got, expected in zip(kind_features(kind, pixels), features(model, backbone, pixels)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_refusals_are_one_line_with_their_exit_codes(tmp_path, tiny_spec, image_dirs):
    vision = tmp_path / "vision.pt"
    clip_lora_file(vision, encoder="vision", layers=1)
    out = tmp_path / "out.pt"
    result = invoke("repair", vision, "--data", image_dirs["train"], "--out", out, "--surrogate", "feature",
                    *fast(tiny_spec))
    assert result.exit_code == 2 and "use --surrogate fisher or l2" in result.output, result.output
    wrong = tmp_path / "wrong.pt"
    clip_lora_file(wrong, encoder="vision", layers=2)  # the tiny image tower has one block
    result = invoke("repair", wrong, "--data", image_dirs["train"], "--out", out, *fast(tiny_spec))
    assert result.exit_code == 5 and "do not match the 1 attention blocks" in result.output, result.output
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                             "use_dora": True}))
    from safetensors.torch import save_file
    save_file({"base_model.model.transformer.resblocks.0.attn.out_proj.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.transformer.resblocks.0.attn.out_proj.lora_B.weight": torch.zeros(32, 2)},
              folder / "adapter_model.safetensors")
    result = invoke("repair", folder, "--data", image_dirs["train"], "--out", tmp_path / "o", *fast(tiny_spec))
    assert result.exit_code == 5 and "use_dora" in result.output, result.output
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False, "peft_version": "recent"}))
    result = invoke("repair", folder, "--data", image_dirs["train"], "--out", tmp_path / "o", *fast(tiny_spec))
    assert result.exit_code == 5 and "peft_version 'recent'" in result.output, result.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.22.0"}))
    result = invoke("repair", folder, "--data", image_dirs["train"], "--out", busy, "--force", *fast(tiny_spec))
    assert result.exit_code == 8 and (busy / "notes.txt").read_text() == "mine", result.output
    assert not out.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("written_by", [None, "0.17.1", "0.21.0", "0.22.0"])
def test_an_attention_adapter_is_read_as_the_peft_that_wrote_it_ran_it(tmp_path, tiny_spec, backbone, tiny_model_dir,
                                                                         image_dirs, written_by):
    """PEFT < 0.22 applied a MultiheadAttention's out_proj LoRA twice (huggingface/peft#3774); PEFT 0.22 loads
    such an adapter with lora_B doubled. mergetune reads it, and writes its repair, so that PEFT loads both alike."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    wrapped = peft.get_peft_model(tiny_open_clip(tiny_model_dir), peft.LoraConfig(r=2, lora_alpha=4,
                                                                                  target_modules=["attn"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.pop("peft_version")
    if written_by is not None:
        config["peft_version"] = written_by
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    def peft_features(folder, pixels):
        model = peft.PeftModel.from_pretrained(tiny_open_clip(tiny_model_dir), str(folder)).eval()
        return features(model.base_model.model, backbone, pixels)

    pixels = torch.randn(2, 3, 32, 32)
    kind = load_kind(backbone, repair.read_tensors(adapter), CLASSES, TEMPLATES)
    for got, expected in zip(kind_features(kind, pixels), peft_features(adapter, pixels)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    twice = written_by in (None, "0.17.1", "0.21.0")
    assert sorted(kind.describe()["scales"]) == ([2.0, 4.0] if twice else [2.0])

    fixed = tmp_path / "fixed"
    result = invoke("repair", adapter, "--data", image_dirs["train"], "--out", fixed, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert json.loads((fixed / "adapter_config.json").read_text()).get("peft_version") == written_by
    repaired = load_kind(backbone, repair.read_tensors(fixed), CLASSES, TEMPLATES)
    assert not repaired.same_weights(repaired.finetuned_values(), kind.finetuned_values())  # the repair moved it
    for got, expected in zip(kind_features(repaired, pixels), peft_features(fixed, pixels)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
