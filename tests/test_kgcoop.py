"""KgCoOp: a Dassl prompt-learner checkpoint with KgCoOp's unused tensors, through every command."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file
from torch import nn

import repair
from cli_helpers import fast, invoke
from repair.kinds.coop import init_context
from upstream import dassl_save, prompt_buffers, through_every_command

N_CLS = 4


def kgcoop_file(tmp_path, backbone):
    """KgCoOp's ``save_model`` of ``prompt_learner`` (htyao89/KgCoOp ``trainers/kgcoop.py``), PREC fp16: ``ctx`` from
    "a photo of a", ``bias_vectors`` [1, 512] and ``meta_net.linear1`` Linear(512, 512) (unused), the buffers."""
    ctx = init_context(backbone, "a photo of a") + 0.05 * torch.randn(4, backbone.text_width)
    linear = nn.Linear(512, 512)
    state = {"ctx": ctx.half(), "bias_vectors": (0.02 * torch.randn(1, 512)).half(),
             "meta_net.linear1.weight": linear.weight.detach().half(), "meta_net.linear1.bias": linear.bias.detach().half(),
             **prompt_buffers(backbone, N_CLS, 4)}
    folder = tmp_path / "output" / "prompt_learner"
    folder.mkdir(parents=True)
    return dassl_save(folder / "model.pth.tar-50", state, epoch=50, trained=("ctx",))


def test_a_kgcoop_checkpoint_through_every_command(tmp_path, backbone, tiny_spec, image_dirs):
    source = kgcoop_file(tmp_path, backbone)
    report = json.loads(invoke("inspect", source, "--json").stdout)
    roles = {tensor["name"]: tensor["role"] for tensor in report["tensors"]}
    assert report["kind"] == "kgcoop" and roles["state_dict.ctx"] == "trained"
    assert roles["state_dict.bias_vectors"] == roles["state_dict.meta_net.linear1.weight"] == "ignored"
    assert roles["state_dict.token_prefix"] == "rebuilt"
    outputs = through_every_command(tmp_path, tiny_spec, image_dirs, source, "kgcoop", ["feature", "fisher", "l2"],
                                    out_name="model.pth.tar-50", novel=True)
    given = torch.load(source, weights_only=False)["state_dict"]
    for out in outputs.values():
        written = torch.load(out, weights_only=True)  # plain data: Dassl's torch.load reads it, even weights_only
        assert list(written) == ["state_dict", "epoch", "optimizer", "scheduler", "val_result", "metadata"]
        assert written["epoch"] == 50 and written["optimizer"] is None
        state = written["state_dict"]
        assert list(state) == list(given) and all(state[k].dtype == given[k].dtype for k in state)
        assert all(torch.equal(state[k], given[k]) for k in given if k != "ctx")  # unused tensors kept as they were
        assert not torch.equal(state["ctx"], given["ctx"])
        # KgCoOp's load_model: drop the prompt buffers, load_state_dict(strict=False) into its prompt learner
        learner = nn.Module()
        learner.ctx = nn.Parameter(torch.zeros(4, backbone.text_width).half())
        learner.bias_vectors = nn.Parameter(torch.zeros(1, 512).half())
        learner.meta_net = nn.Sequential()
        learner.meta_net.add_module("linear1", nn.Linear(512, 512).half())
        kept = {k: v for k, v in state.items() if k not in ("token_prefix", "token_suffix")}
        missing, unexpected = learner.load_state_dict(kept, strict=False)
        assert not missing and not unexpected and torch.equal(learner.ctx.detach(), state["ctx"])
    as_safetensors = tmp_path / "fixed.safetensors"
    result = invoke("repair", source, "--data", image_dirs["train"], "--out", as_safetensors, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert repair.read_tensors(as_safetensors).format == "safetensors"  # --out *.safetensors: one safetensors file


def test_finetune_makes_a_kgcoop_prompt_that_is_read_back_as_one(tmp_path, tiny_spec, image_dirs):
    out = tmp_path / "kg.safetensors"
    result = invoke("finetune", "--kind", "kgcoop", "--data", image_dirs["train"], "--out", out, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    tensors = repair.read_tensors(out).tensors
    assert set(tensors) == {"ctx", "bias_vectors", "meta_net.linear1.weight", "meta_net.linear1.bias"}
    plain = tmp_path / "plain.safetensors"  # no record: detected from its tensors alone
    save_file(tensors, plain)
    assert json.loads(invoke("inspect", plain, "--json").stdout)["kind"] == "kgcoop"


def test_a_kgcoop_file_was_read_as_coop_and_dropped_its_tensors_before(tmp_path, backbone, tiny_spec, image_dirs):
    source = kgcoop_file(tmp_path, backbone)
    result = invoke("repair", source, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                    "--kind", "coop", *fast(tiny_spec))
    assert result.exit_code == 5 and "bias_vectors" in result.output and "--kind" in result.output
