"""`mergetune soup`: the mean of checkpoints of one kind, uniform or greedy, refused across kinds or classes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli_helpers import fast, invoke
from conftest import NOVEL
from repair.io import read_tensors
from repair.kinds.coop import init_context


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, tiny_spec, image_dirs):
    """Two CoOp prompts fine-tuned with different seeds, and a copy of the first under another name."""
    folder = tmp_path_factory.mktemp("seeds")
    paths = []
    for seed in (1, 2):
        path = folder / f"seed{seed}.safetensors"
        result = invoke("finetune", "--kind", "coop", "--data", image_dirs["train"], "--out", path, "--seed",
                        str(seed), "--lr", "0.05", *fast(tiny_spec))
        assert result.exit_code == 0, result.output
        paths.append(path)
    shutil.copy(paths[0], folder / "copy.safetensors")
    return [*paths, folder / "copy.safetensors"]


def soup(*args):
    return invoke("soup", *args, "--no-cache", "-q")


def test_a_soup_of_identical_files_is_that_file(tmp_path, tiny_spec, seeds):
    first, _, copy = seeds
    out = tmp_path / "soup.safetensors"
    result = soup(first, copy, first, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(out)["ctx"], load_file(first)["ctx"])
    record = json.loads(result.stdout)
    assert record["stage"] == "soup" and record["kind"] == "coop" and record["seed"] is None
    report = record["result"]["soup"]
    assert report["method"] == "uniform" and [item["name"] for item in report["ingredients"]] == [
        first.name, copy.name, first.name] and all(item["kept"] for item in report["ingredients"])
    assert report["ingredients"][0]["sha256"] == read_tensors(first).sha256


def test_a_uniform_soup_is_the_mean_and_reads_as_a_checkpoint(tmp_path, tiny_spec, image_dirs, seeds):
    first, second, _ = seeds
    before = read_tensors(first).sha256
    out = tmp_path / "soup.safetensors"
    result = soup(first, second, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (coop, uniform soup of 2 of 2 checkpoints" in result.output
    mean = (load_file(first)["ctx"].double() + load_file(second)["ctx"].double()) / 2
    assert torch.equal(load_file(out)["ctx"], mean.float())
    assert read_tensors(first).sha256 == before  # inputs are never modified
    result = invoke("eval", out, "--data", image_dirs["test"], "--model", tiny_spec.model, "--no-cache", "--json")
    assert result.exit_code == 0, result.output
    result = soup(first, second, "--out", out)
    assert result.exit_code == 8 and len(result.output.strip().splitlines()) == 1, result.output
    assert soup(first, second, "--out", out, "--force").exit_code == 0
    result = invoke("push", out, "--repo", "org/soup", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "stage" / "README.md").read_text()
    assert "model soup" in card and first.name in card
    result = invoke("verify", out, "--data", image_dirs["train"])
    assert result.exit_code == 2 and "records no images" in result.output, result.output


def test_a_greedy_soup_keeps_the_best_checkpoint_and_records_its_scores(tmp_path, tiny_spec, image_dirs, seeds,
                                                                       backbone):
    from repair.synthetic import make_image_folder
    from repair.workflows.soup import average, soup as make_soup

    first, second, _ = seeds
    noisy = tmp_path / "noisy.safetensors"  # a foreign file of the same shape, no record: refused beside records
    save_file({"ctx": init_context(backbone, "a photo of a") + 5.0 * torch.randn(
        4, backbone.text_width, generator=torch.Generator().manual_seed(0))}, noisy)
    result = soup(first, noisy, "--out", tmp_path / "mixed.safetensors")
    assert result.exit_code == 5 and "has no mergetune record" in result.output, result.output
    val = make_image_folder(tmp_path / "val", ("blue", "green", "red", "yellow"), 4, seed=9)
    val_novel = make_image_folder(tmp_path / "val-novel", NOVEL, 4, seed=10)
    outcome = make_soup([first, second], tmp_path / "greedy.safetensors", data_dir=val, novel_dir=val_novel,
                        backbone=backbone)
    report = outcome.record.result["soup"]
    scores = [item["score"] for item in report["ingredients"]]
    best = max(range(2), key=lambda index: (scores[index], -index))
    assert report["method"] == "greedy" and report["ingredients"][best]["kept"]
    kept = [path for path, item in zip((first, second), report["ingredients"]) if item["kept"]]
    expected = average([{"ctx": load_file(path)["ctx"]} for path in kept])["ctx"].float()
    assert torch.equal(load_file(outcome.path)["ctx"], expected)
    assert outcome.record.inputs.data.manifest_sha256 and report["validation"]["novel"]


def test_foreign_files_need_data_and_a_soup_refuses_what_does_not_average(tmp_path, tiny_spec, image_dirs, seeds,
                                                                         backbone):
    first, second, _ = seeds
    ctx = init_context(backbone, "a photo of a")
    plain = tmp_path / "a.safetensors"
    save_file({"ctx": ctx.half()}, plain)
    shutil.copy(plain, tmp_path / "b.safetensors")
    common = ["--model", tiny_spec.model]
    result = soup(plain, tmp_path / "b.safetensors", "--out", tmp_path / "s.safetensors", *common)
    assert result.exit_code == 2 and "pass --data" in result.output, result.output
    result = soup(plain, tmp_path / "b.safetensors", "--out", tmp_path / "s.safetensors", "--data",
                  image_dirs["test"], *common)
    assert result.exit_code == 0, result.output
    soup_ctx = load_file(tmp_path / "s.safetensors")["ctx"]
    assert soup_ctx.dtype == torch.float16 and torch.equal(soup_ctx, ctx.half())  # the input's dtype, unchanged
    longer = tmp_path / "long.safetensors"
    save_file({"ctx": torch.cat([ctx, ctx]).half()}, longer)
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(4, backbone.embed_dim)}, head)
    lora = tmp_path / "lora.pt"
    result = invoke("finetune", "--kind", "lora", "--data", image_dirs["train"], "--out", lora, *fast(tiny_spec),
                    "--max-steps", "1")
    assert result.exit_code == 0, result.output
    cases = [
        ([plain, longer, "--data", image_dirs["test"], *common], 5, "shapes"),
        ([plain, head, "--data", image_dirs["test"], *common], 5, "a soup averages checkpoints of one kind"),
        ([lora, lora], 5, "not its weights"),
        ([first], 2, "at least two checkpoints"),
        ([first, tmp_path / "missing.safetensors"], 3, "missing.safetensors"),
        ([first, second, "--novel-data", image_dirs["novel"]], 2, "--novel-data needs --data"),
    ]
    for args, code, message in cases:
        result = soup(*args, "--out", tmp_path / "refused.safetensors")
        assert result.exit_code == code and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "refused.safetensors").exists()


def test_a_soup_refuses_checkpoints_of_other_classes(tmp_path, tiny_spec, image_dirs, seeds):
    other = tmp_path / "other.safetensors"
    result = invoke("finetune", "--kind", "coop", "--data", image_dirs["novel"], "--out", other, *fast(tiny_spec),
                    "--max-steps", "1")
    assert result.exit_code == 0, result.output
    result = soup(seeds[0], other, "--out", tmp_path / "s.safetensors")
    assert result.exit_code == 5 and "made for other classes" in result.output, result.output
    with safe_open(seeds[1], "pt") as handle:  # the same file, recorded against other text weights
        metadata = handle.metadata()
    record = json.loads(metadata["mergetune"])
    record["backbone"]["text_sha256"] = "0" * 64
    moved = tmp_path / "moved.safetensors"
    save_file(load_file(seeds[1]), moved, metadata={**metadata, "mergetune": json.dumps(record)})
    result = soup(seeds[0], moved, "--out", tmp_path / "s.safetensors")
    assert result.exit_code == 5 and "another backbone" in result.output, result.output
