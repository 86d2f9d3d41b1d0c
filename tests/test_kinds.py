"""Linear probes and CLIPFit next to CoOp: input formats, zero steps, path terms, surrogates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from repair import DataOptions, finetune, inspect_checkpoint, repair as run_repair
from repair.io import read_tensors
from repair.data.folders import scan_image_folder
from repair.data.features import extract_features, load_pixels
from repair.errors import IncompatibleCheckpointError
from repair.kinds import CLIPFit, CoOpPrompts, LinearHead, detect_kind
from repair.kinds.clipfit import CLIPFitOptions, clipfit_names
from repair.kinds.linear import LinearOptions
from repair.train.objective import Objective, mergetune_loss
from repair.train.surrogates import FisherSurrogate, L2Surrogate, build_surrogate, fisher_diagonal
from repair.train.loop import TrainConfig

TEMPLATES = ["a photo of a {}."]


def zero_steps(backbone, path, data_dir, kind=None, **kind_options):
    out = path.with_name(path.stem + "-out.safetensors")
    run_repair(path, data_dir, out, backbone=backbone, config=TrainConfig(max_steps=0),
               data_options=DataOptions(shots=4), kind=kind, kind_options=kind_options, if_no_gain="repair")
    return read_tensors(out).tensors


def random_head(backbone, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(classes, backbone.embed_dim, generator=generator), torch.randn(classes, generator=generator)


# ----------------------------------------------------------------------------- input formats


@pytest.mark.parametrize("prefix", ["", "head.", "fc.", "classifier.", "model.head."])
def test_linear_heads_from_torch_state_dicts_round_trip(tmp_path, backbone, image_dirs, prefix):
    weight, bias = random_head(backbone)
    path = tmp_path / "probe.pth"
    torch.save({f"{prefix}weight": weight.half(), f"{prefix}bias": bias.half(), "epoch": 3}, path)
    assert detect_kind(read_tensors(path)) is LinearHead
    out = zero_steps(backbone, path, image_dirs["train"])
    assert torch.equal(out[f"{prefix}weight"], weight.half()) and torch.equal(out[f"{prefix}bias"], bias.half())


def test_linear_head_from_sklearn_npz_and_key_prefix(tmp_path, backbone, image_dirs):
    weight, bias = random_head(backbone)
    npz = tmp_path / "sklearn.npz"
    np.savez(npz, coef_=weight.double().numpy(), intercept_=bias.double().numpy())
    out = zero_steps(backbone, npz, image_dirs["train"])
    assert torch.equal(out["coef_"], weight.double()) and torch.equal(out["intercept_"], bias.double())
    odd = tmp_path / "odd.safetensors"
    save_file({"probe.weight": weight, "probe.bias": bias}, odd)
    out = zero_steps(backbone, odd, image_dirs["train"], kind="linear", key_prefix="probe.")
    assert torch.equal(out["probe.weight"], weight)
    odd = tmp_path / "odder.safetensors"
    save_file({"probe.weight": weight, "probe.bias": bias, "other.weight": torch.zeros(2, 2)}, odd)
    with pytest.raises(IncompatibleCheckpointError, match=r"leave 1 of its 3 tensors unread: other.weight \[2, 2\]"):
        zero_steps(backbone, odd, image_dirs["train"], kind="linear", key_prefix="probe.")  # never dropped silently


def test_linear_head_with_wrong_row_count_is_refused(tmp_path, backbone, image_dirs):
    path = tmp_path / "probe.safetensors"
    save_file({"weight": torch.zeros(7, backbone.embed_dim)}, path)
    with pytest.raises(IncompatibleCheckpointError, match=r"\[7, 32\].*expected \[4, 32\]"):
        zero_steps(backbone, path, image_dirs["train"])


def clipfit_values(backbone, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: tensor.detach() + 0.01 * torch.randn(tensor.shape, generator=generator)
            for name, tensor in backbone.model.named_parameters() if name in clipfit_names(backbone)}


def test_clipfit_tensors_only_file_round_trips(tmp_path, backbone, image_dirs):
    values = clipfit_values(backbone)
    names = set(values)
    assert any("mlp.c_proj.bias" in name for name in names) and "visual.ln_post.weight" in names
    assert any(".ln_1." in name for name in names) and "visual.ln_pre.bias" in names
    path = tmp_path / "clipfit.safetensors"
    save_file(values, path)
    assert detect_kind(read_tensors(path)) is CLIPFit
    out = zero_steps(backbone, path, image_dirs["train"])
    assert out.keys() == values.keys() and all(torch.equal(out[name], values[name]) for name in values)


def test_clipfit_full_state_dict_finds_the_tuned_tensors(tmp_path, backbone, image_dirs):
    state = {name: tensor.clone() for name, tensor in backbone.model.state_dict().items()}
    tuned = [name for name in clipfit_names(backbone)][:3]
    for name in tuned:
        state[name] += 0.5
    path = tmp_path / "full.pth"
    torch.save({"state_dict": {f"module.{name}": tensor for name, tensor in state.items()}}, path)
    tensor_file = read_tensors(path)
    kind = CLIPFit.from_file(backbone, tensor_file, ["a", "b"], TEMPLATES)
    assert kind.tuned == tuned
    assert kind.describe()["full_state_dict"] is True
    out = zero_steps(backbone, path, image_dirs["train"], kind="clipfit")
    assert out.keys() == tensor_file.tensors.keys()  # a drop-in replacement of the same shape
    assert all(torch.equal(out[key], tensor_file.tensors[key]) for key in out)


def test_coop_from_dassl_checkpoint(tmp_path, backbone, image_dirs):
    ctx = torch.randn(2, backbone.text_width).half()
    prefix = torch.randn(4, 1, backbone.text_width).half()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": ctx, "token_prefix": prefix, "token_suffix": prefix[:, :, :]},
                "epoch": 50, "optimizer": optimizer.state_dict(), "scheduler": scheduler}, path)
    out = zero_steps(backbone, path, image_dirs["train"], ctx_init="a photo")
    assert list(out) == ["state_dict.ctx", "state_dict.token_prefix", "state_dict.token_suffix"]  # the input's names
    assert torch.equal(out["state_dict.ctx"], ctx) and torch.equal(out["state_dict.token_prefix"], prefix)


# ----------------------------------------------------------------------------- path terms


def test_linear_path_term_is_the_ce_of_the_interpolated_head(backbone, image_dirs):
    dataset = scan_image_folder(image_dirs["train"])
    data = extract_features(backbone, dataset)
    weight, bias = random_head(backbone)
    kind = LinearHead(backbone, weight, bias, dataset.classnames, TEMPLATES, LinearOptions(logit_scale=10.0))
    with torch.no_grad():
        kind.weight.add_(torch.randn_like(kind.weight))
        kind.bias.add_(1.0)
    terms = mergetune_loss(kind, Objective(lam_zs=0.0, lam_lmc=1.0), data.features, data.labels)
    expected = []
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        head = weight + t * (kind.weight - weight)
        offset = bias + t * (kind.bias - bias)
        expected.append(F.cross_entropy(10.0 * data.features @ head.t() + offset, data.labels))
    assert torch.allclose(terms.path, torch.stack(expected).mean(), atol=1e-5)


def test_linear_head_scale_is_detected_from_row_norms(backbone):
    unit = F.normalize(torch.randn(4, backbone.embed_dim), dim=-1)
    assert LinearHead(backbone, unit, None, "abcd", TEMPLATES).scale == pytest.approx(backbone.logit_scale)
    assert LinearHead(backbone, 50 * unit, None, "abcd", TEMPLATES).scale == 1.0
    zero_shot = LinearHead.zero_shot(backbone, list("abcd"), TEMPLATES)
    assert torch.allclose(zero_shot.zero_shot_values()["weight"], zero_shot.weight)


def test_clipfit_paths_start_at_the_finetuned_model(backbone, image_dirs):
    dataset = scan_image_folder(image_dirs["train"]).few_shot(2, seed=0)
    pixels = load_pixels(backbone, dataset)
    for space in ("feature", "weight"):
        kind = CLIPFit(backbone, clipfit_values(backbone), dataset.classnames, TEMPLATES, CLIPFitOptions(path_space=space))
        before = kind(pixels.features).logits.detach()
        with torch.no_grad():
            for parameter in kind.params:
                parameter.add_(0.05)
        output = kind(pixels.features, torch.tensor([0.0, 1.0]))
        assert torch.allclose(output.path_logits[0], before, atol=1e-4)
        assert torch.allclose(output.path_logits[1], output.logits, atol=1e-4)


# ----------------------------------------------------------------------------- surrogates


def test_fisher_matches_a_direct_per_sample_computation(backbone, image_dirs):
    dataset = scan_image_folder(image_dirs["train"]).few_shot(3, seed=0)
    data = extract_features(backbone, dataset)
    weight, bias = random_head(backbone)
    kind = LinearHead(backbone, weight, bias, dataset.classnames, TEMPLATES, LinearOptions(logit_scale=5.0))
    fisher = fisher_diagonal(kind, data, seed=7, chunk=5)
    assert torch.equal(kind.weight.detach(), weight)  # restored after evaluating at w_zs

    # direct: one sample at a time, labels drawn the same way, at w_zs
    w_zs = kind.zero_shot_values()
    generator = torch.Generator().manual_seed(7)
    expected_w = torch.zeros_like(weight)
    expected_b = torch.zeros_like(bias)
    for start in range(0, len(data), 5):
        chunk = data.features[start:start + 5]
        probs = F.softmax(5.0 * chunk @ w_zs["weight"].t() + w_zs["bias"], dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for x, y in zip(chunk, labels.tolist()):
            w = w_zs["weight"].clone().requires_grad_(True)
            b = w_zs["bias"].clone().requires_grad_(True)
            loss = -F.log_softmax(5.0 * x @ w.t() + b, dim=-1)[y]
            grad_w, grad_b = torch.autograd.grad(loss, [w, b])
            expected_w += grad_w ** 2
            expected_b += grad_b ** 2
    assert torch.allclose(fisher["weight"], expected_w / len(data), atol=1e-6)
    assert torch.allclose(fisher["bias"], expected_b / len(data), atol=1e-6)


@pytest.mark.parametrize("name", ["l2", "fisher"])
def test_penalties_vanish_at_w_zs_and_pull_back_to_it(backbone, image_dirs, name):
    dataset = scan_image_folder(image_dirs["train"]).few_shot(3, seed=0)
    data = extract_features(backbone, dataset)
    weight, bias = random_head(backbone)
    kind = LinearHead(backbone, weight, bias, dataset.classnames, TEMPLATES, LinearOptions(logit_scale=5.0))
    surrogate = build_surrogate(name, kind, data)
    assert isinstance(surrogate, FisherSurrogate if name == "fisher" else L2Surrogate)
    kind.load_values(kind.zero_shot_values())
    output = kind(data.features)
    assert float(surrogate(kind, output).detach()) == 0.0
    kind.load_values({"weight": weight, "bias": bias})
    penalty = surrogate(kind, kind(data.features))
    assert float(penalty.detach()) > 0
    grads = torch.autograd.grad(penalty, [kind.weight, kind.bias])
    for grad, (key, anchor) in zip(grads, kind.zero_shot_values().items()):
        displacement = getattr(kind, key).detach() - anchor
        assert float((grad * displacement).sum()) > 0  # descent moves towards w_zs
        assert torch.all(grad * displacement >= -1e-12)


def test_coop_l2_needs_a_matching_zero_shot_prompt(backbone):
    kind = CoOpPrompts(backbone, torch.zeros(3, backbone.text_width), ["a", "b"], TEMPLATES)
    with pytest.raises(IncompatibleCheckpointError, match="--ctx-init"):
        build_surrogate("l2", kind)


# ----------------------------------------------------------------------------- finetune, inspect


@pytest.mark.parametrize("kind_name", ["coop", "linear", "clipfit"])
def test_finetune_moves_from_zero_shot_and_records_it(tmp_path, backbone, image_dirs, kind_name):
    outcome = finetune(kind_name, image_dirs["train"], tmp_path / f"{kind_name}.safetensors", backbone=backbone,
                       config=TrainConfig(epochs=2, batch_size=16, lr=0.05), data_options=DataOptions(shots=4))
    record = outcome.record
    assert record.stage == "finetune" and record.objective["lam_zs"] == 0.0
    report = inspect_checkpoint(outcome.path)
    assert report["kind"] == kind_name and report["trainable_numbers"] == record.trainable_numbers


def test_inspect_reports_every_tensor_and_refuses_foreign_files(tmp_path, backbone):
    weight, bias = random_head(backbone)
    path = tmp_path / "probe.safetensors"
    save_file({"head.weight": weight, "head.bias": bias}, path)
    report = inspect_checkpoint(path)
    assert report["kind"] == "linear" and report["trainable_numbers"] == weight.numel() + bias.numel()
    assert {tensor["name"]: tensor["shape"] for tensor in report["tensors"]} == {
        "head.weight": [4, backbone.embed_dim], "head.bias": [4]}
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.layer.0": torch.zeros(3)}, foreign)
    with pytest.raises(IncompatibleCheckpointError, match="not a checkpoint mergetune knows"):
        inspect_checkpoint(foreign)
    assert json.dumps(report)  # JSON-serialisable as the CLI prints it
