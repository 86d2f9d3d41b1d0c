"""CoCoOp, MaPLe, PromptSRC and MMA: files written as their upstream trainers write them (Dassl's torch.save
wrapper, the documented names, shapes and dtypes), scored as the upstream models score, through every command.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import repair
from cli_helpers import invoke
from insertion_helpers import (cocoop_state, dassl_save, fp16_clip_state, maple_state, mma_state, promptsrc_state,
                               reference_block, save_deep_backbone)
from repair.kinds import detect_kind, load_kind
from repair.model.backbone import BackboneSpec, load_backbone

CLASSES = ["blue", "green", "red", "yellow"]  # the image folders' base classes (conftest)
NOVEL = ["cyan", "orange", "pink", "purple"]
TEMPLATES = ["a photo of a {}."]
STATES = {"cocoop": cocoop_state, "maple": maple_state, "promptsrc": promptsrc_state, "mma": mma_state}
REGISTERED = {"cocoop": "prompt_learner", "maple": "MultiModalPromptLearner", "promptsrc": "VLPromptLearner",
              "mma": "adapter_learner"}  # the folder Dassl saves each under


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> str:
    return save_deep_backbone(tmp_path_factory.mktemp("deep-clip"))


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory):
    """Fewer images than conftest's folders: every command here runs once per kind and surrogate."""
    from repair.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("few-images")
    return {"train": make_image_folder(root / "train", CLASSES, 2, seed=1),
            "test": make_image_folder(root / "test", CLASSES, 3, seed=2),
            "novel": make_image_folder(root / "novel", NOVEL, 3, seed=3)}


@pytest.fixture(scope="module")
def deep(deep_model):
    return load_backbone(BackboneSpec(model=deep_model))


def upstream_file(tmp_path, deep, kind: str, **options) -> tuple:
    folder = tmp_path / REGISTERED[kind]
    folder.mkdir(exist_ok=True)
    state = STATES[kind](deep, CLASSES, **options)
    return dassl_save(folder / "model.pth.tar-5", state), state


# ----------------------------------------------------------------------------- the upstream models, by hand


def _text(backbone, classnames, ctx=None, deep=None, adapters=None) -> torch.Tensor:
    """Upstream's TextEncoder on "a photo of a {class}." (77 positions, sequence first), context in place."""
    model = backbone.model
    tokens = backbone.tokenize([f"a photo of a {name}." for name in classnames])
    x = model.token_embedding(tokens)
    if ctx is not None:
        x = torch.cat([x[:, :1], ctx.expand(len(x), -1, -1), x[:, 1 + ctx.shape[-2]:]], dim=1)
    x = (x + model.positional_embedding).permute(1, 0, 2)
    for index, block in enumerate(model.transformer.resblocks):
        if deep and index in deep:
            n = deep[index].shape[0]
            x = torch.cat([x[:1], deep[index].unsqueeze(1).expand(-1, x.shape[1], -1), x[1 + n:]], dim=0)
        out = reference_block(block, x, model.attn_mask)
        if adapters and index in adapters:
            out = out + adapters[index](block.ln_1(x))
        x = out
    x = model.ln_final(x.permute(1, 0, 2))
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ model.text_projection


def _image(backbone, pixels, tokens=None, deep=None, adapters=None) -> torch.Tensor:
    """Upstream's VisionTransformer (MaPLe / IVLP / MMA variants): prompt tokens after the patches."""
    visual = backbone.model.visual
    x = F.conv2d(pixels, visual.conv1.weight, stride=8).flatten(2).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    if tokens is not None:
        x = torch.cat([x, tokens.expand(len(x), -1, -1)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    for index, block in enumerate(visual.transformer.resblocks):
        if deep and index in deep:
            x = torch.cat([x[:-deep[index].shape[0]], deep[index].unsqueeze(1).expand(-1, x.shape[1], -1)], dim=0)
        out = reference_block(block, x, None)
        if adapters and index in adapters:
            out = out + adapters[index](block.ln_1(x))
        x = out
    return visual.ln_post(x.permute(1, 0, 2)[:, 0]) @ visual.proj


def _mma_adapter(state, tower, index, scale=0.001):
    def adapter(x):
        y = torch.relu(F.linear(x, state[f"{tower}.{index}.down.0.weight"], state[f"{tower}.{index}.down.0.bias"]))
        y = torch.relu(F.linear(y, state[f"shared_adapter.{index}.0.weight"], state[f"shared_adapter.{index}.0.bias"]))
        return scale * F.linear(y, state[f"{tower}.{index}.up.weight"], state[f"{tower}.{index}.up.bias"])
    return adapter


def upstream_logits(kind: str, backbone, state, pixels, classnames) -> torch.Tensor:
    s = {key: value.float() for key, value in state.items() if value.is_floating_point()}
    scale = backbone.logit_scale
    images = F.normalize(_image(backbone, pixels), dim=-1)
    if kind == "cocoop":  # CustomCLIP.forward: one prompt set per image
        shift = F.linear(torch.relu(F.linear(images, s["meta_net.linear1.weight"], s["meta_net.linear1.bias"])),
                         s["meta_net.linear2.weight"], s["meta_net.linear2.bias"])
        rows = [scale * images[b] @ F.normalize(_text(backbone, classnames, s["ctx"] + shift[b]), dim=-1).t()
                for b in range(len(images))]
        return torch.stack(rows)
    if kind == "maple":
        learner = "prompt_learner."
        deep = {j: s[f"{learner}compound_prompts_text.{j - 1}"] for j in (1, 2)}
        text = _text(backbone, classnames, s[learner + "ctx"], deep)
        projected = {j: F.linear(deep[j], s[f"{learner}compound_prompt_projections.{j - 1}.weight"],
                                 s[f"{learner}compound_prompt_projections.{j - 1}.bias"]) for j in (1, 2)}
        tokens = F.linear(s[learner + "ctx"], s[learner + "proj.weight"], s[learner + "proj.bias"])
        images = F.normalize(_image(backbone, pixels, tokens, projected), dim=-1)
    elif kind == "promptsrc":
        text = _text(backbone, classnames, s["prompt_learner.ctx"],
                     {j: s[f"text_encoder.transformer.resblocks.{j}.VPT_shallow"] for j in (1, 2)})
        images = F.normalize(_image(backbone, pixels, s["image_encoder.VPT"],
                                    {j: s[f"image_encoder.transformer.resblocks.{j}.VPT_shallow"] for j in (1, 2)}),
                             dim=-1)
    else:  # mma: layer index N beside block N - 1
        text = _text(backbone, classnames, adapters={n - 1: _mma_adapter(s, "text_adapter", n) for n in (2, 3)})
        images = F.normalize(_image(backbone, pixels, adapters={n - 1: _mma_adapter(s, "visual_adapter", n)
                                                                for n in (2, 3)}), dim=-1)
    return scale * images @ F.normalize(text, dim=-1).t()


@pytest.mark.parametrize("kind", list(STATES))
def test_an_upstream_file_scores_as_the_upstream_model(tmp_path, deep, kind):
    path, state = upstream_file(tmp_path, deep, kind)
    tensor_file = repair.read_tensors(path)
    assert detect_kind(tensor_file).name == kind  # not CoOp, whose ctx these files hold too
    model = load_kind(deep, tensor_file, CLASSES, TEMPLATES)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = F.normalize(model.image_encoder().encode(pixels) if model.image_encoder() else
                               deep.encode_images(pixels), dim=-1)
        inputs = pixels if model.input_kind == "pixels" else features
        torch.testing.assert_close(model(inputs).logits, upstream_logits(kind, deep, state, pixels, CLASSES),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.logits_for(features, NOVEL), upstream_logits(kind, deep, state, pixels, NOVEL),
                                   rtol=1e-4, atol=1e-4)  # base-to-novel: any class list
    # every tensor of the file is trained or declared ignored (a buffer rebuilt, a frozen CLIP weight)
    keys = {key for key in tensor_file.tensors if key.startswith("state_dict.")}
    trained, ignored = set(type(model).trainable_keys(tensor_file)), set(type(model).ignored_keys(tensor_file))
    assert trained | ignored == keys and not trained & ignored
    assert {key.removeprefix("state_dict.") for key in trained} <= {name for name in state if "token_" not in name}


def test_zero_shot_points_are_zero_shot_clip(tmp_path, deep):
    """CoCoOp and MMA at w_zs, and MaPLe's text half on a causal tower, score exactly as zero-shot CLIP."""
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        images = F.normalize(deep.encode_images(pixels), dim=-1)
        expected = deep.logit_scale * images @ deep.zero_shot_classifier(CLASSES, TEMPLATES).t()
    for kind, options in (("cocoop", {}), ("mma", {}), ("maple", {"vision": False})):
        (tmp_path / kind).mkdir()
        path, _ = upstream_file(tmp_path / kind, deep, kind, **options)
        model = load_kind(deep, repair.read_tensors(path), CLASSES, TEMPLATES)
        assert model.unsupported_surrogates() == {}
        model.load_values(model.zero_shot_values())
        with torch.no_grad():
            inputs = pixels if model.input_kind == "pixels" else images
            torch.testing.assert_close(model(inputs).logits, expected, rtol=1e-4, atol=1e-4)
            assert model.same_weights(model.snapshot(), model.zero_shot_values())


SURROGATES = {"cocoop": ["feature", "fisher", "l2", "fisher-vocab", "fisher-dense", "distill"],
              "maple": ["feature", "distill"], "promptsrc": ["feature", "distill"],
              "mma": ["feature", "fisher", "l2", "fisher-vocab", "fisher-dense", "distill"]}


@pytest.mark.parametrize("kind", list(STATES))
def test_an_upstream_file_through_every_command(tmp_path, deep, deep_model, image_dirs, kind):
    ft, state = upstream_file(tmp_path, deep, kind)
    vocabulary = tmp_path / "concepts.txt"
    vocabulary.write_text("dog\ncat\ncar\n")
    fast = ["--model", deep_model, "--max-steps", "1", "--shots", "2", "--batch-size", "4", "--no-cache", "-q"]
    report = json.loads(invoke("inspect", ft, "--json").stdout)
    assert report["kind"] == kind
    trained = {t["name"] for t in report["tensors"] if t["trainable"]}
    frozen = set(fp16_clip_state(deep, "image_encoder.", "text_encoder.")) | {n for n in state if "ZS_image" in n}
    assert trained == {f"state_dict.{name}" for name in state
                       if not name.split(".")[-1].startswith("token") and name not in frozen}
    outputs = {}
    refused = [] if "fisher" in SURROGATES[kind] else ["fisher", "l2", "fisher-vocab"]  # no zero-shot point
    for surrogate in (*SURROGATES[kind], *refused):
        out = tmp_path / f"{surrogate}.safetensors"
        result = invoke("repair", ft, "--data", image_dirs["train"], "--out", out, "--surrogate", surrogate,
                        "--vocabulary", vocabulary, *fast)
        if surrogate in SURROGATES[kind]:
            assert result.exit_code == 0, result.output
            outputs[surrogate] = out
        else:  # refused by name, with the ones that work
            assert result.exit_code == 2 and "use --surrogate" in result.output and not out.exists(), result.output
    fixed = load_file(outputs["feature"])
    source = repair.read_tensors(ft).tensors
    assert fixed.keys() == source.keys()  # the input's own names, every tensor (nothing read halfway)
    assert all(fixed[key].dtype == source[key].dtype for key in fixed)  # and dtypes (fp16 and fp32 mixed)
    assert any(not torch.equal(fixed[key], source[key]) for key in trained)
    assert all(torch.equal(fixed[key], source[key]) for key in fixed.keys() - trained)  # the rest as it was
    assert detect_kind(repair.read_tensors(outputs["feature"])).name == kind  # the output reloads as its kind
    result = invoke("eval", ft, outputs["feature"], "--data", image_dirs["test"], "--novel-data", image_dirs["novel"],
                    "--model", deep_model, "--baselines", "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    rows = {row["name"]: row for row in document["models"]}
    assert rows["feature.safetensors"]["novel"] is not None  # base-to-novel
    has_point = "fisher" in SURROGATES[kind]
    assert ("wise-ft" in rows) == has_point  # WiSE-FT needs a zero-shot point to interpolate from
    result = invoke("path", ft, outputs["feature"], "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", deep_model, "--points", "3", "--no-cache")
    assert result.exit_code == 0, result.output
    path = json.loads((tmp_path / "path.json").read_text())
    assert len(path["segments"]) == (3 if has_point else 1)
    assert path["segments"][-1]["points"][0]["accuracy"] == rows["model.pth.tar-5"]["base"]
    result = invoke("verify", outputs["feature"], "--ft", ft, "--data", image_dirs["train"])
    assert result.exit_code == 0, result.output
    result = invoke("push", outputs["feature"], "--repo", f"org/{kind}", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output
    assert kind in (tmp_path / "stage" / "README.md").read_text().lower()


@pytest.mark.parametrize("kind,flags", [("cocoop", []), ("maple", []), ("maple", ["--text-half"]),
                                        ("promptsrc", []), ("mma", ["--adapter-start", "2", "--adapter-dim", "8"])])
def test_finetune_then_repair(tmp_path, deep_model, image_dirs, kind, flags):
    ft = tmp_path / "ft.safetensors"
    fast = ["--model", deep_model, "--max-steps", "2", "--shots", "2", "--batch-size", "4", "--no-cache", "-q"]
    result = invoke("finetune", "--kind", kind, *flags, "--data", image_dirs["train"], "--out", ft, "--lr", "0.05",
                    *fast)
    assert result.exit_code == 0, result.output
    report = json.loads(invoke("inspect", ft, "--json").stdout)
    assert report["kind"] == kind
    details = report["metadata"]["kind_details"]
    if kind == "maple":
        assert details["image_tower"] is ("--text-half" not in flags)
        assert details["zero_shot_point"] is ("--text-half" in flags)  # the text half on a causal tower has one
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "fixed.safetensors", *fast,
                    "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    gain = document["result"]["task_gain"]
    assert 0.0 <= gain["finetuned"] <= 1.0 and 0.0 <= gain["zero_shot"] <= 1.0
    if not details.get("zero_shot_point", True):  # its zero-shot model is its insertions off: no weights to write
        assert gain["action"] == "repair"
        if gain["finetuned"] <= gain["zero_shot"]:  # PromptSRC on the random tiny CLIP
            assert any("cannot hold the zero-shot model" in note for note in document["notes"])


def test_the_text_half_on_other_towers(tmp_path, hf_backbone, cnn_backbone, image_dirs):
    """A Hugging Face BERT text tower (the towers proxy's kind) and a CNN image tower: CoCoOp and MaPLe's text
    half train and repair; MaPLe's image prompts on a CNN are refused in one line naming --text-half."""
    fast = ["--max-steps", "1", "--shots", "2", "--batch-size", "4", "--no-cache", "-q"]
    for backbone in (hf_backbone, cnn_backbone):
        for kind, flags in (("cocoop", []), ("maple", ["--text-half"])):
            ft = tmp_path / f"{kind}-{id(backbone)}.safetensors"
            result = invoke("finetune", "--kind", kind, *flags, "--data", image_dirs["train"], "--out", ft,
                            "--model", backbone.spec.model, *fast)
            assert result.exit_code == 0, result.output
            result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "fixed.safetensors",
                            "--force", "--model", backbone.spec.model, *fast)
            assert result.exit_code == 0, result.output
            result = invoke("eval", tmp_path / "fixed.safetensors", "--data", image_dirs["test"], "--novel-data",
                            image_dirs["novel"], "--model", backbone.spec.model, "--no-cache", "--json")
            assert result.exit_code == 0, result.output
    result = invoke("finetune", "--kind", "maple", "--data", image_dirs["train"], "--out", tmp_path / "full.safetensors",
                    "--model", cnn_backbone.spec.model, *fast)
    assert result.exit_code == 5 and "--text-half" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "full.safetensors").exists()


def test_mma_trains_as_its_gradient_scaling_does(deep):
    """MMA's gradient_scale_layer multiplies every adapter gradient by 1 / scale; training q = sqrt(scale) p
    gives p exactly that SGD step, so MMA's learning rate carries over."""
    from repair.kinds.mma import MMA, MMAOptions

    state = mma_state(deep, CLASSES)
    values = {name: value for name, value in state.items() if "adapter" in name}
    model = MMA(deep, values, CLASSES, TEMPLATES, MMAOptions())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    loss = model(pixels).logits.logsumexp(-1).sum()
    loss.backward()
    lr = 0.0015
    with torch.no_grad():
        for name, parameter in zip(model.names, model.params):
            parameter -= lr * parameter.grad
    # the same step on p with the true gradient times 1 / scale (MMA's SGD)
    reference = {name: value.clone().requires_grad_() for name, value in values.items()}
    plain = MMA(deep, {name: value.detach() for name, value in reference.items()}, CLASSES, TEMPLATES, MMAOptions())
    plain.load_values({f"params.{i}": model.ft[name] for i, name in enumerate(model.names)})
    grads = torch.autograd.grad(plain(pixels).logits.logsumexp(-1).sum(), list(plain.params))
    for (name, parameter), grad in zip(zip(plain.names, plain.params), grads):
        true_grad = grad * model.factor  # d loss / d p = sqrt(s) d loss / d q
        expected = values[name] - lr * true_grad / model.adapter_scale
        torch.testing.assert_close(model.export()[name], expected.detach(), rtol=1e-4, atol=1e-6)
