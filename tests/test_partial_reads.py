"""No partial reads (issue 32, item 1): every tensor of an input is trained, rebuilt, frozen and compared with
the backbone, or explicitly ignored by the detected kind; otherwise the read is refused in one line (exit 5)
naming what was found and ``--kind``. Through the real CLI on the tiny CLIP."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import repair
import repair.kinds
from cli_helpers import fast, invoke
from upstream import (cocoop_state_dict, custom_clip_towers, dassl_save, maple_state_dict, prompt_buffers,
                      promptsrc_state_dict)

N_CLS = 4  # the tiny image folders' classes


def refused(tiny_spec, image_dirs, tmp_path, checkpoint, *extra):
    """``repair`` and ``inspect`` of a file both exit 5 in one line; the message, once."""
    out = tmp_path / "out.safetensors"
    result = invoke("repair", checkpoint, "--data", image_dirs["train"], "--out", out, *fast(tiny_spec), *extra)
    assert result.exit_code == 5, result.output
    assert len(result.output.strip().splitlines()) == 1 and "--kind" in result.output
    assert not out.exists()
    inspected = invoke("inspect", checkpoint, *extra)
    assert inspected.exit_code == 5 and "--kind" in inspected.output, inspected.output
    return result.output


@pytest.mark.parametrize("method", ["maple", "cocoop", "promptsrc"])
def test_deep_prompt_and_meta_net_files_are_not_read_as_plain_coop(method, tmp_path, backbone, tiny_spec, image_dirs):
    """Detected as their own kind (which claims every tensor); forced to CoOp, refused naming what CoOp leaves."""
    build = {"maple": maple_state_dict, "cocoop": cocoop_state_dict, "promptsrc": promptsrc_state_dict}[method]
    state = build(backbone, N_CLS)
    path = dassl_save(tmp_path / "model.pth.tar-5", state, trained=tuple(k for k in state if k.endswith("ctx")))
    inspected = invoke("inspect", path, "--json")
    assert inspected.exit_code == 0 and json.loads(inspected.output)["kind"] == method
    message = refused(tiny_spec, image_dirs, tmp_path, path, "--kind", "coop")
    hint = {"maple": "compound_prompt", "cocoop": "meta_net.linear1", "promptsrc": "VPT"}[method]
    assert "read as CoOp (coop)" in message and hint in message and "unread" in message


def test_a_vision_prompt_beside_ctx_is_refused(tmp_path, backbone, tiny_spec, image_dirs):
    path = tmp_path / "vpt.safetensors"
    save_file({"ctx": torch.randn(4, backbone.text_width), "visual_prompt": torch.randn(8, 32),
               "image_encoder.VPT": torch.randn(4, 32)}, path)
    message = refused(tiny_spec, image_dirs, tmp_path, path)
    assert "2 of its 3 tensors unread" in message and "visual_prompt [8, 32]" in message


def test_two_contexts_are_refused_not_one_kept(tmp_path, backbone, tiny_spec, image_dirs):
    path = tmp_path / "two.safetensors"
    save_file({"prompt_learner.ctx": torch.randn(4, backbone.text_width),
               "prompt_learner_2.ctx": torch.randn(4, backbone.text_width)}, path)
    assert "prompt_learner_2.ctx [4, 32]" in refused(tiny_spec, image_dirs, tmp_path, path)


def test_a_plot_file_with_as_many_prompts_as_classes_is_not_class_specific_coop(tmp_path, backbone, tiny_spec,
                                                                                image_dirs):
    # PLOT (CHENGY12/PLOT): ctx [N, n_ctx, D] with N prompts per class; its buffers hold N * n_cls rows
    state = {"ctx": (0.02 * torch.randn(N_CLS, 4, backbone.text_width)).half(),
             **prompt_buffers(backbone, N_CLS, 4, rows=N_CLS * N_CLS)}
    path = dassl_save(tmp_path / "model.pth.tar-50", state, trained=("ctx",))
    message = refused(tiny_spec, image_dirs, tmp_path, path)
    assert "token_prefix" in message and "token_suffix" in message


def test_a_fully_fine_tuned_clip_is_not_read_as_clipfit(tmp_path, backbone, tiny_spec, image_dirs):
    generator = torch.Generator().manual_seed(0)
    state = {name: (value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point()
                    else value).contiguous() for name, value in backbone.model.state_dict().items()}
    path = tmp_path / "full.safetensors"
    save_file(state, path)
    for command in (["repair", path, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                     *fast(tiny_spec)],
                    ["eval", path, "--data", image_dirs["test"], "--model", tiny_spec.model, "--no-cache"]):
        result = invoke(*command)
        assert result.exit_code == 5, result.output
        assert "differs from the loaded" in result.output and "clipfit" in result.output
    # only the image tower changed: the refusal names the kind that reads it, and that kind does
    state = {name: (value if not name.startswith("visual.") else state[name]) for name, value in
             backbone.model.state_dict().items()}
    save_file({name: value.contiguous() for name, value in state.items()}, path)
    result = invoke("repair", path, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    *fast(tiny_spec))
    assert result.exit_code == 5 and "--kind image-encoder" in result.output, result.output


def test_coop_with_its_own_clip_towers_is_compared_with_the_backbone(tmp_path, backbone, tiny_spec, image_dirs):
    learner = {"prompt_learner.ctx": (0.02 * torch.randn(4, backbone.text_width)).half(),
               **{f"prompt_learner.{k}": v for k, v in prompt_buffers(backbone, N_CLS, 4).items()}}
    towers = custom_clip_towers(backbone)
    towers["text_encoder.ln_final.weight"] = towers["text_encoder.ln_final.weight"] + 0.5  # another text tower
    other = dassl_save(tmp_path / "model.pth.tar-11", {**learner, **towers}, trained=("prompt_learner.ctx",))
    result = invoke("repair", other, "--data", image_dirs["train"], "--out", tmp_path / "x.safetensors",
                    *fast(tiny_spec))
    assert result.exit_code == 5 and "text tower differs" in result.output and "ln_final" in result.output

    same = dassl_save(tmp_path / "model.pth.tar-10", {**learner, **custom_clip_towers(backbone)},
                      trained=("prompt_learner.ctx",))
    out = tmp_path / "fixed.pth.tar-10"
    result = invoke("repair", same, "--data", image_dirs["train"], "--out", out, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    written, read = repair.read_tensors(out), repair.read_tensors(same)
    assert written.layout.name == "dassl" and list(written.tensors) == list(read.tensors)  # nothing dropped
    report = json.loads(invoke("inspect", same, "--json").stdout)
    roles = {tensor["name"]: tensor["role"] for tensor in report["tensors"]}
    assert roles["state_dict.prompt_learner.ctx"] == "trained"
    assert roles["state_dict.prompt_learner.token_prefix"] == "rebuilt"
    assert roles["state_dict.image_encoder.conv1.weight"] == roles["state_dict.logit_scale"] == "frozen"
    assert report["training_state"] and report["layout"] == "dassl"  # momentum buffers: listed, never read


class _DeepPrompts(repair.kinds.CoOpPrompts):
    """A stand-in for a kind registered later (MaPLe's, from the deep-prompt work): it declares MaPLe's tensors."""

    name = "deep-prompts-test"

    @classmethod
    def matches(cls, tensor_file):
        return any("compound_prompts_text" in key for key in tensor_file.tensors)

    @classmethod
    def claims(cls, tensor_file, options=None, backbone=None):
        base = super().claims(tensor_file, options, backbone)
        deep = tuple(key for key in tensor_file.tensors if "compound_prompt" in key or ".proj." in key)
        return repair.kinds.Claims(trained=(*base.trained, *deep), rebuilt=base.rebuilt,
                                   frozen={k: v for k, v in base.frozen.items() if k not in deep})


def test_a_kind_registered_later_claims_its_files_by_declaration(tmp_path, backbone, tiny_spec):
    """The mechanism with a stand-in for MaPLe (the real kind is set aside while the test runs)."""
    state = maple_state_dict(backbone, N_CLS)
    path = dassl_save(tmp_path / "model.pth.tar-2", state, trained=("prompt_learner.ctx",))
    maple = repair.kinds.KINDS.pop("maple")
    try:
        assert invoke("inspect", path).exit_code == 5
        repair.kinds.register(_DeepPrompts)
        report = json.loads(invoke("inspect", path, "--json").stdout)
        assert report["kind"] == "deep-prompts-test"  # the file is claimed whole: detected, nothing left over
        roles = {tensor["name"]: tensor["role"] for tensor in report["tensors"]}
        assert roles["state_dict.prompt_learner.compound_prompts_text.0"] == "trained"
        assert roles["state_dict.text_encoder.ln_final.weight"] == "frozen"
        plain = tmp_path / "ctx.safetensors"  # a plain prompt both kinds claim whole: never a guess
        save_file({"ctx": torch.randn(4, backbone.text_width), "compound_prompts_text.0": torch.randn(4, 32)}, plain)
        assert json.loads(invoke("inspect", plain, "--json").stdout)["kind"] == "deep-prompts-test"
        save_file({"ctx": torch.randn(4, backbone.text_width)}, plain)
        assert json.loads(invoke("inspect", plain, "--json").stdout)["kind"] == "coop"  # the new kind does not match
    finally:
        repair.kinds.KINDS.pop(_DeepPrompts.name, None)
        repair.kinds.KINDS["maple"] = maple


def test_a_file_two_kinds_claim_whole_is_refused_naming_kind(tmp_path, backbone):
    class Twin(repair.kinds.CoOpPrompts):
        name = "twin-test"

    repair.kinds.register(Twin)
    try:
        plain = tmp_path / "ctx.safetensors"
        save_file({"ctx": torch.randn(4, backbone.text_width)}, plain)
        result = invoke("inspect", plain)
        assert result.exit_code == 5 and "could be coop, twin-test; pass --kind" in result.output
        assert invoke("inspect", plain, "--kind", "coop").exit_code == 0
    finally:
        repair.kinds.KINDS.pop(Twin.name)
