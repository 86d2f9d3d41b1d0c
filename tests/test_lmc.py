"""The linear-path diagnostic: barriers, shared endpoints, agreement with `evaluate`, outputs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repair.data.features
import repair.eval.path
from repair import DataOptions, evaluate, finetune, repair as run_repair
from repair.model.backbone import BackboneSpec
from repair.io import read_tensors
from repair.data.folders import scan_image_folder
from repair.data.features import extract_features
from repair.errors import IncompatibleCheckpointError, MergetuneError, OutputExistsError
from repair.kinds.coop import CoOpPrompts
from repair.eval.path import loss_barrier
from repair.workflows.path import path_report, plot_path, write_path_json
from repair.train.loop import TrainConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TS = [index / 10 for index in range(11)]


# --------------------------------------------------------------------------- loss_barrier


def test_barrier_of_a_straight_line_is_zero():
    assert loss_barrier([2.0 - 1.5 * t for t in TS], TS) == pytest.approx(0.0, abs=1e-12)


def test_barrier_of_a_bump_is_its_height_above_the_chord():
    losses = [1.0 + t + (0.7 if t == 0.5 else 0.0) for t in TS]  # chord 1 + t, bump 0.7 at the middle
    assert loss_barrier(losses, TS) == pytest.approx(0.7)


def test_barrier_below_the_chord_is_clipped_at_zero():
    assert loss_barrier([1.0 - 4 * t * (1 - t) for t in TS], TS) == 0.0


def test_barrier_needs_matching_points():
    with pytest.raises(ValueError):
        loss_barrier([1.0, 2.0], [0.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        loss_barrier([1.0], [0.0])


# --------------------------------------------------------------------------- fixtures


def _options(cache):
    return DataOptions(shots=None, cache_dir=cache)


def _pair(kind_name, root, backbone, image_dirs, cache):
    """A plain fine-tune and its repair, both tiny."""
    train_options = DataOptions(shots=8, cache_dir=cache)
    ft = finetune(kind_name, image_dirs["train"], root / f"{kind_name}-ft.safetensors", backbone=backbone,
                  config=TrainConfig(epochs=3, batch_size=16, lr=0.05), data_options=train_options).path
    rep = run_repair(ft, image_dirs["train"], root / f"{kind_name}-rep.safetensors", backbone=backbone,
                     config=TrainConfig(epochs=2, batch_size=16, lr=0.02), data_options=train_options).path
    return ft, rep


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lmc-cache")


@pytest.fixture(scope="module")
def coop_pair(tmp_path_factory, backbone, image_dirs, cache):
    return _pair("coop", tmp_path_factory.mktemp("lmc-coop"), backbone, image_dirs, cache)


@pytest.fixture(scope="module")
def coop_report(coop_pair, backbone, image_dirs, cache):
    ft, rep = coop_pair
    return path_report(ft, rep, image_dirs["test"], backbone=backbone, data_options=_options(cache))


def _segments(report):
    return {segment["name"]: segment for segment in report["segments"]}


def _ends(segment):
    return segment["points"][0], segment["points"][-1]


# --------------------------------------------------------------------------- CoOp


def test_report_has_three_segments_of_eleven_points(coop_report, image_dirs):
    assert coop_report["schema"] == "mergetune.path/1"
    assert coop_report["kind"] == "coop" and coop_report["warnings"] == []
    assert coop_report["data"]["images"] == 40 and coop_report["data"]["classes"] == ["blue", "green", "red", "yellow"]
    assert list(_segments(coop_report)) == ["zero-shot -> fine-tuned", "zero-shot -> repaired",
                                            "fine-tuned -> repaired"]
    for segment in coop_report["segments"]:
        assert [point["t"] for point in segment["points"]] == TS
        assert all(0.0 <= point["accuracy"] <= 100.0 and point["loss"] >= 0.0 for point in segment["points"])
        losses = [point["loss"] for point in segment["points"]]
        assert segment["loss_barrier"] == loss_barrier(losses, TS) >= 0.0
        accuracies = [point["accuracy"] for point in segment["points"]]
        assert segment["accuracy_drop"] == max(accuracies[0], accuracies[-1]) - min(accuracies) >= 0.0


def test_segments_agree_at_shared_endpoints(coop_report):
    segments = _segments(coop_report)
    zs_ft, zs_rep, ft_rep = (segments["zero-shot -> fine-tuned"], segments["zero-shot -> repaired"],
                             segments["fine-tuned -> repaired"])

    def same(a, b):
        return a["accuracy"] == b["accuracy"] and a["loss"] == b["loss"]

    assert same(_ends(zs_ft)[0], _ends(zs_rep)[0])  # zero-shot
    assert same(_ends(zs_ft)[1], _ends(ft_rep)[0])  # fine-tuned
    assert same(_ends(zs_rep)[1], _ends(ft_rep)[1])  # repaired


def test_endpoints_match_evaluate(coop_report, coop_pair, backbone, image_dirs, cache):
    ft, rep = coop_pair
    evaluated = evaluate([ft, rep], image_dirs["test"], backbone=backbone, data_options=_options(cache))
    rows = {row["name"]: row for row in evaluated["models"]}
    segments = _segments(coop_report)
    assert abs(_ends(segments["fine-tuned -> repaired"])[0]["accuracy"] - rows[ft.name]["base"]) < 1e-9
    assert abs(_ends(segments["fine-tuned -> repaired"])[1]["accuracy"] - rows[rep.name]["base"]) < 1e-9
    # w_zs of a prompt is "a photo of a": the zero-shot classifier's own prompt
    assert _ends(segments["zero-shot -> repaired"])[0]["accuracy"] == pytest.approx(rows["zero-shot"]["base"])


def test_endpoint_losses_equal_a_direct_computation(coop_report, coop_pair, backbone, image_dirs):
    ft, _ = coop_pair
    dataset = scan_image_folder(image_dirs["test"])
    data = extract_features(backbone, dataset)
    with torch.no_grad():
        prompts = CoOpPrompts(backbone, read_tensors(ft).tensors["ctx"], dataset.classnames, ["a photo of a {}."])
        ft_loss = F.cross_entropy(backbone.logit_scale * data.features @ prompts.class_features().t(), data.labels)
        zero_shot = backbone.zero_shot_classifier(dataset.classnames, ["a photo of a {}."])
        zs_loss = F.cross_entropy(backbone.logit_scale * data.features @ zero_shot.t(), data.labels)
    zs_point, ft_point = _ends(_segments(coop_report)["zero-shot -> fine-tuned"])
    assert ft_point["loss"] == pytest.approx(float(ft_loss), rel=1e-6)
    assert zs_point["loss"] == pytest.approx(float(zs_loss), rel=1e-4)


def test_frozen_tower_encodes_once_and_each_point_is_scored_once(coop_pair, backbone, image_dirs, monkeypatch):
    encoded, scored = [], []
    encode, score = repair.data.features._encode_files, repair.eval.path._score
    monkeypatch.setattr(repair.data.features, "_encode_files", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    monkeypatch.setattr(repair.eval.path, "_score", lambda *a, **k: scored.append(1) or score(*a, **k))
    ft, rep = coop_pair
    report = path_report(ft, rep, image_dirs["test"], backbone=backbone, points=5,
                         data_options=DataOptions(shots=None, cache_dir=None))
    assert len(encoded) == 1
    assert len(scored) == 3 + 3 * 3  # three shared endpoints, three interior points per segment
    assert [point["t"] for point in report["segments"][0]["points"]] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_report_is_json_and_written_atomically(coop_report, tmp_path):
    assert json.loads(json.dumps(coop_report)) == coop_report
    out = write_path_json(coop_report, tmp_path / "path.json")
    assert json.loads(out.read_text()) == coop_report
    with pytest.raises(OutputExistsError):
        write_path_json(coop_report, out)
    write_path_json(coop_report, out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["path.json"]  # no temporary file left behind


def test_plot_writes_a_png_and_refuses_to_overwrite(coop_report, tmp_path):
    png = plot_path(coop_report, tmp_path / "path.png")
    first = png.read_bytes()
    assert first.startswith(PNG_SIGNATURE) and len(first) > 1000
    with pytest.raises(OutputExistsError):
        plot_path(coop_report, png)
    assert png.read_bytes() == first
    assert plot_path(coop_report, png, force=True).read_bytes().startswith(PNG_SIGNATURE)
    assert [p.name for p in tmp_path.iterdir()] == ["path.png"]


def test_plot_without_matplotlib_says_what_to_install(coop_report, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MergetuneError, match=r"pip install 'mergetune\[plot\]'") as caught:
        plot_path(coop_report, tmp_path / "path.png")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "path.png").exists()


# --------------------------------------------------------------------------- other kinds, refusals


def test_linear_head_path(tmp_path_factory, backbone, image_dirs, cache):
    ft, rep = _pair("linear", tmp_path_factory.mktemp("lmc-linear"), backbone, image_dirs, cache)
    report = path_report(ft, rep, image_dirs["test"], backbone=backbone, points=3, data_options=_options(cache))
    assert report["kind"] == "linear"
    segments = _segments(report)
    assert [len(segment["points"]) for segment in report["segments"]] == [3, 3, 3]
    arriving, leaving = _ends(segments["zero-shot -> fine-tuned"])[1], _ends(segments["fine-tuned -> repaired"])[0]
    assert (arriving["accuracy"], arriving["loss"]) == (leaving["accuracy"], leaving["loss"])
    evaluated = evaluate([ft], image_dirs["test"], backbone=backbone, data_options=_options(cache))
    rows = {row["name"]: row for row in evaluated["models"]}
    assert abs(_ends(segments["fine-tuned -> repaired"])[0]["accuracy"] - rows[ft.name]["base"]) < 1e-9
    # the zero-shot head is the zero-shot classifier, in the head's units
    assert _ends(segments["zero-shot -> fine-tuned"])[0]["accuracy"] == pytest.approx(rows["zero-shot"]["base"])


def test_clipfit_re_encodes_each_distinct_point_once(tmp_path_factory, backbone, image_dirs, cache, monkeypatch):
    ft, rep = _pair("clipfit", tmp_path_factory.mktemp("lmc-clipfit"), backbone, image_dirs, cache)
    evaluated = evaluate([ft], image_dirs["test"], backbone=backbone, data_options=_options(cache))
    encoded = []
    encode = repair.data.features._encode_files
    monkeypatch.setattr(repair.data.features, "_encode_files", lambda *a, **k: encoded.append(1) or encode(*a, **k))
    cached_before = sorted(cache.rglob("features/*"))
    report = path_report(ft, rep, image_dirs["test"], backbone=backbone, points=3, data_options=_options(cache))
    assert len(encoded) == 3 + 3 * 1  # the tower moves with the weights: one encoding per distinct point
    assert sorted(cache.rglob("features/*")) == cached_before  # throwaway towers stay out of the cache
    fine_tuned = _ends(_segments(report)["fine-tuned -> repaired"])[0]
    rows = {row["name"]: row for row in evaluated["models"]}
    assert abs(fine_tuned["accuracy"] - rows[ft.name]["base"]) < 1e-9


def test_kind_mismatch_is_refused_before_loading_a_model(coop_pair, tmp_path, image_dirs):
    ft, _ = coop_pair
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(4, 32), "bias": torch.zeros(4)}, head)
    missing_model = BackboneSpec(model=f"local-dir:{tmp_path / 'no-such-model'}")
    with pytest.raises(IncompatibleCheckpointError, match="same kind") as caught:
        path_report(ft, head, image_dirs["test"], backbone=missing_model)
    assert "\n" not in str(caught.value)


def test_prompt_longer_than_its_zero_shot_words_is_refused(tmp_path, backbone, image_dirs):
    ctx, other = tmp_path / "ctx.safetensors", tmp_path / "other.safetensors"
    for path in (ctx, other):
        save_file({"ctx": 0.02 * torch.randn(3, backbone.text_width)}, path)  # "a photo of a" is 4 tokens
    with pytest.raises(IncompatibleCheckpointError, match="n_ctx=3") as caught:
        path_report(ctx, other, image_dirs["test"], backbone=backbone, data_options=DataOptions(shots=None,
                                                                                                 cache_dir=None))
    assert "\n" not in str(caught.value)


def test_too_few_points_is_refused(coop_pair, image_dirs, backbone):
    ft, rep = coop_pair
    with pytest.raises(MergetuneError, match="at least 2"):
        path_report(ft, rep, image_dirs["test"], backbone=backbone, points=1)
