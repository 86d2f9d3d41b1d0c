"""CoOp's class-token position (end, middle, front): the assembled prompt is the rearranged sentence.

At the init words a prompt must encode exactly as the tower encodes the sentence with the class
name moved: "a photo of a red." (end), "a photo red of a." (middle: half of the context on each
side), "red a photo of a." (front), on open_clip's own tower and on a Hugging Face one.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import repair
from repair.kinds.coop import ClassTokenPosition, CoOpOptions, CoOpPrompts, init_context
from cli_helpers import fast, invoke

WORDS = "a photo of a"
TEMPLATE = "a photo of a {}."


def sentence(name: str, position: str, words: str = WORDS) -> str:
    context = words.split()
    if position == "end":
        return " ".join(context + [name]) + "."
    if position == "front":
        return " ".join([name] + context) + "."
    half = len(context) // 2
    return " ".join(context[:half] + [name] + context[half:]) + "."


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_the_init_prompt_encodes_as_the_rearranged_sentence(backbone, position):
    classnames = ["red", "dark green", "blue whale with a long name"]  # 1, 2 and 6 tokens
    prompts = CoOpPrompts(backbone, init_context(backbone, WORDS), classnames, [TEMPLATE],
                          CoOpOptions(class_token_position=position))
    with torch.no_grad():
        ours = prompts.class_features()
        reference = backbone.encode_texts([sentence(name, position) for name in classnames])
        full_length = backbone.model.encode_text(backbone.tokenize([sentence(n, position) for n in classnames]),
                                                 normalize=True)  # open_clip itself, uncut
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours, full_length, atol=1e-5)


def test_an_odd_context_puts_the_shorter_half_first_and_positions_really_differ(backbone):
    words = "a photo of"  # CoOp: the first n_ctx // 2 = 1 token before the class
    features = {}
    for position in ClassTokenPosition:
        prompts = CoOpPrompts(backbone, init_context(backbone, words), ["red", "dark green"], [TEMPLATE],
                              CoOpOptions(ctx_init=words, class_token_position=position))
        with torch.no_grad():
            features[position.value] = prompts.class_features()
            reference = backbone.encode_texts([sentence(n, position.value, words) for n in ["red", "dark green"]])
        assert torch.allclose(features[position.value], reference, atol=1e-5)
    assert sentence("red", "middle", words) == "a red photo of."
    assert not torch.allclose(features["end"], features["front"], atol=1e-3)
    assert not torch.allclose(features["end"], features["middle"], atol=1e-3)


def test_class_specific_contexts_and_the_weight_path_keep_the_arrangement(backbone):
    ctx = init_context(backbone, WORDS)
    shared = CoOpPrompts(backbone, ctx, ["red", "dark green"], [TEMPLATE], CoOpOptions(class_token_position="front"))
    specific = CoOpPrompts(backbone, ctx.unsqueeze(0).repeat(2, 1, 1), ["red", "dark green"], [TEMPLATE],
                           CoOpOptions(class_token_position="front"))
    with torch.no_grad():
        assert torch.allclose(shared.class_features(), specific.class_features(), atol=1e-5)
        stacked = shared._text_features(torch.stack([ctx, ctx]), shared.bank)  # [K, C, E], as the weight path
    assert stacked.shape[:2] == (2, 2) and torch.allclose(stacked[1], shared.class_features(), atol=1e-5)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_the_hugging_face_tower_reads_the_same_arrangements(hf_backbone, position):
    classnames = ["red", "the green", "a blue"]  # 1 and 2 word-pieces
    prompts = CoOpPrompts(hf_backbone, init_context(hf_backbone, WORDS), classnames, [TEMPLATE],
                          CoOpOptions(class_token_position=position))
    with torch.no_grad():
        ours = prompts.class_features()
    reference = hf_backbone.encode_texts([sentence(name, position) for name in classnames])
    assert torch.allclose(ours, reference, atol=1e-5)


def test_the_position_is_recorded_and_declared_for_files_that_do_not_record_it(tmp_path, tiny_spec, image_dirs):
    ft = tmp_path / "front.safetensors"
    result = invoke("finetune", "--kind", "coop", "--class-token-position", "front", "--data", image_dirs["train"],
                    "--out", ft, *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    record = json.loads(invoke("inspect", ft, "--json").stdout)["metadata"]
    assert record["kind_options"]["class_token_position"] == "front"
    result = invoke("repair", ft, "--data", image_dirs["train"], "--out", tmp_path / "fixed.safetensors",
                    *fast(tiny_spec), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kind_options"]["class_token_position"] == "front"  # carried over

    foreign = tmp_path / "foreign.safetensors"  # a bare ctx: nothing recorded, so "end" unless declared
    save_file({"ctx": load_file(ft)["ctx"]}, foreign)
    result = invoke("eval", foreign, "--data", image_dirs["test"], "--model", tiny_spec.model, "--no-cache",
                    "--class-token-position", "middle", "--json")
    assert result.exit_code == 0, result.output
    out = tmp_path / "declared.safetensors"
    result = invoke("repair", foreign, "--data", image_dirs["train"], "--out", out, "--class-token-position",
                    "middle", *fast(tiny_spec))
    assert result.exit_code == 0, result.output
    assert repair.read_tensors(out).tensors.keys() == {"ctx"}
    assert json.loads(invoke("inspect", out, "--json").stdout)["metadata"]["kind_options"][
        "class_token_position"] == "middle"
    result = invoke("repair", foreign, "--data", image_dirs["train"], "--out", tmp_path / "bad.safetensors",
                    "--class-token-position", "left", *fast(tiny_spec))
    assert result.exit_code == 2 and not (tmp_path / "bad.safetensors").exists()
