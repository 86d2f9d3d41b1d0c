"""benchmarks/speed.py on the tiny CLIP: every measurement returns finite, positive numbers under the right
keys, the v2 report renders, and --device cuda without CUDA is one clear line. No timing thresholds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import speed

CLASSES, BATCH = 3, 2


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_floors_time_every_kind_against_its_floor(tiny_model_dir):
    rows = speed.measure_floors(tiny_model_dir, CLASSES, BATCH, steps=1)
    assert [row["kind"] for row in rows] == ["coop", "linear", "clipfit"]
    for row in rows:
        assert all(_positive(row[key]) for key in ("step_seconds", "floor_seconds", "ratio"))
        assert row["goal"] == speed.GOALS[row["kind"]] and isinstance(row["goal_met"], bool)
        assert row["steps_timed"] >= 1 and row["trainable_numbers"] > 0
        assert row["operators"]["ours"] > 0 and row["operators"]["floor"] > 0
    linear = next(row for row in rows if row["kind"] == "linear")  # the objective's terms cost operators
    assert linear["operators"]["ours"] > linear["operators"]["floor"]
    kinds = speed.kind_rows(rows)
    assert {"kind", "classes", "trainable_numbers", "step_seconds", "inputs"} <= set(kinds[0])
    assert "floor_seconds" not in kinds[0]


def test_reference_and_clipfit_cache_agree_on_the_first_loss(tiny_model_dir):
    reference = speed.measure(tiny_model_dir, CLASSES, BATCH, steps=1, reference_steps=1)
    assert reference["loss_abs_diff"] < 1e-4 and _positive(reference["speedup"])
    cache = speed.measure_clipfit_cache(tiny_model_dir, CLASSES, BATCH, steps=1)
    assert _positive(cache["before_seconds"]) and _positive(cache["after_seconds"]) and _positive(cache["speedup"])
    assert cache["first_loss_abs_diff"] < 1e-4  # caching w_ft's image features must not change the loss
    assert cache["cuda_max_allocated_mib"] == {"before": None, "after": None}


@pytest.mark.parametrize("chunks", [speed.DEFAULT_CHUNKS, None])
def test_memory_rows_separate_the_steps_from_loading(tiny_model_dir, chunks):
    row = speed.measure_memory(tiny_model_dir, "clipfit", CLASSES, BATCH, 1, text_chunk_size=chunks)
    assert _positive(row["rss_mib_before_steps"]) and row["rss_increase_mib"] >= 0
    assert row["peak_rss_mib_of_process"] >= row["rss_mib_before_steps"] and _positive(row["step_seconds"])
    assert row["setting"] == ("default" if chunks == speed.DEFAULT_CHUNKS else "text_chunk_size=None")
    if chunks is None:
        assert row["text_chunk_size"] is None
    plan = speed.memory_plan([10, 1000])
    assert ("coop", 1000, None) in plan and ("clipfit", 10, speed.DEFAULT_CHUNKS) in plan and len(plan) == 6


def test_main_writes_a_v2_report(tiny_model_dir, tmp_path, monkeypatch):
    # in this process: spawning a fresh one costs seconds of imports
    monkeypatch.setattr(speed, "in_fresh_process",
                        lambda function, *args, threads=None: speed._with_peak_memory(function, *args))
    out = tmp_path / "speed.json"
    speed.main(["--model", tiny_model_dir, "--parts", "clipfit_cache", "--cache-classes", "3", "--batch", "2",
                "--steps", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["schema"] == "mergetune.speed/2" and report["device"] == "cpu" and report["precisions"] == ["fp32"]
    assert len(report["clipfit_cache"]) == 1 and report["clipfit_cache"][0]["peak_rss_mib_of_process"] > 0
    assert "| CLIPFit step |" in speed.speed_markdown(report)


def test_device_cuda_without_cuda_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--device", "cuda", "--out", str(tmp_path / "speed.json")])
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message and "cuda" in message.lower()
    assert not (tmp_path / "speed.json").exists()


def _v2_report() -> dict:
    floor = {"batch": 32, "precision": "fp32", "trainable_numbers": 10, "inputs": "cached features",
             "step_seconds": 0.1, "floor_seconds": 0.2, "steps_timed": 5, "peak_rss_mib_of_process": 900.0,
             "cuda_max_allocated_mib": {"ours": None, "floor": None}}
    memory = {"kind": "coop", "batch": 32, "precision": "fp32", "steps": 2, "step_seconds": 1.5,
              "rss_mib_before_steps": 800.0, "peak_rss_mib_during_steps": 1300.0, "rss_increase_mib": 500.0,
              "peak_rss_mib_of_process": 1300.0, "cuda_max_allocated_mib": None}
    return {
        "schema": "mergetune.speed/2", "model": "ViT-B-16", "weights": "random (timing only)", "cpus": 2,
        "torch": "2.x", "gpu": None, "device": "cpu", "precisions": ["fp32"], "goals": speed.GOALS,
        "coop_vs_reference": [{"batch": 32, "classes": 10, "precision": "fp32", "step_seconds_ours": 0.1,
                               "step_seconds_reference": 40.0, "speedup": 400.0, "loss_ours": 5.0,
                               "loss_reference": 5.0, "peak_rss_mib_of_process": 1900.0}],
        "floors": [{**floor, "kind": "coop", "classes": 10, "ratio": 0.5, "goal": 0.6, "goal_met": True},
                   {**floor, "kind": "linear", "classes": 10, "ratio": 3.0, "goal": 1.2, "goal_met": False,
                    "operators": {"ours": 92, "floor": 16}}],
        "kinds": [{"kind": "coop", "classes": 10, "precision": "fp32", "trainable_numbers": 2048,
                   "step_seconds": 0.1, "inputs": "cached features"}],
        "clipfit_cache": [{"classes": 10, "batch": 32, "precision": "fp32", "before_seconds": 30.0,
                           "after_seconds": 22.0, "speedup": 30 / 22, "first_loss_abs_diff": 0.0,
                           "cache_attribute_present": True}],
        "memory": [{**memory, "classes": 1000, "text_chunk_size": 64, "setting": "default"},
                   {**memory, "classes": 1000, "text_chunk_size": None, "setting": "text_chunk_size=None"}],
        "extraction": [{"method": "plain loop", "images": 128, "images_per_second": 3.2}],
        "scale_out": [{"processes": 1, "images_per_second": 10.0}, {"processes": 2, "images_per_second": 19.5}],
    }


def test_speed_markdown_renders_floors_cache_memory_and_scale_out():
    text = speed.speed_markdown(_v2_report())
    assert "| coop | 10 | 32 | fp32 | 0.1000 | 0.2000 | 0.50x | ≤ 0.6x | yes |" in text
    assert "| linear | 10 | 32 | fp32 | 0.1000 | 0.2000 | 3.00x | ≤ 1.2x | no |" in text
    assert "coop ≤ 0.6x" in text and "clipfit ≤ 1.3x" in text
    assert "ours / floor: linear at 10 classes 92 / 16." in text  # rows without a count (older runs) left out
    assert "| batch 32 | 10 | fp32 | 30.000 | 22.000 | 1.36x |" in text
    assert "| coop | 1,000 | fp32 | chunks of 64 (default) | 800 | 1,300 | 500 |" in text
    assert "all prompts at once" in text
    assert "| processes | images per second |" in text and "| 2 | 19.50 |" in text
    assert "peak GPU" not in text  # a CPU run has no GPU columns


def test_speed_markdown_still_renders_a_v1_report():
    report = _v2_report()
    for part in ("floors", "clipfit_cache", "memory", "scale_out", "device", "precisions", "goals"):
        report.pop(part)
    report["schema"] = "mergetune.speed/1"
    text = speed.speed_markdown(report)
    assert "| CoOp repair step |" in text and "step / floor" not in text and "Scale-out" not in text


def test_speed_markdown_of_a_cuda_run_names_the_gpu_and_its_peaks():
    report = _v2_report()
    report.update(device="cuda", gpu="NVIDIA H200", precisions=["fp32", "bf16", "fp16"])
    report["floors"][0]["cuda_max_allocated_mib"] = {"ours": 1234.0, "floor": 2345.0}
    report["memory"][0]["cuda_max_allocated_mib"] = 4096.0
    text = speed.speed_markdown(report)
    assert "timed on cuda (fp32, bf16, fp16)" in text and "GPU: NVIDIA H200" in text
    assert "| peak GPU ours / floor (MiB) |" in text and "| 1,234 / 2,345 |" in text
    assert "| peak GPU (MiB) |" in text and "| 4,096 |" in text


def test_surrogate_speed_writes_each_surrogates_build_and_step(tiny_model_dir, tmp_path):
    from benchmarks import surrogate_speed

    out = tmp_path / "surrogate-speed.json"
    surrogate_speed.main(["--model", tiny_model_dir, "--surrogates", "fisher", "l2", "distill", "fisher-vocab",
                          "--classes", "3", "--batch", "2", "--images", "4", "--steps", "2", "--build-rounds", "1",
                          "--error-steps", "2", "--fisher-error-seeds", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["schema"] == surrogate_speed.SCHEMA
    assert [row["surrogate"] for row in report["rows"]] == ["fisher", "l2", "distill", "fisher-vocab"]
    for row in report["rows"]:
        assert _positive(row["step_seconds"]) and row["build_seconds"] >= 0 and row["final_loss_finite"]
        assert _positive(row["step_vs_fisher"]) and len(row["step_runs"]) == 2 and len(row["build_runs"]) == 1
    assert report["rows"][0]["step_vs_fisher"] == 1.0 == report["rows"][0]["build_vs_fisher"]
    assert report["rows"][0]["approximation"] == "exact"
    distill = report["rows"][2]["approximation"]
    assert len(distill["points"]) == 2 and distill["relative_error_max"] >= 0
    assert distill["points"][0]["relative_error"] < 1e-4  # the reference is current where the repair starts
    assert {"relative_error_draws", "relative_error_label"} <= set(report["rows"][3]["approximation"])
    surrogate_speed.main(["--model", tiny_model_dir, "--surrogates", "feature", "--classes", "3", "--batch", "2",
                          "--steps", "1", "--build-rounds", "1", "--out", str(out), "--append"])
    assert [row["surrogate"] for row in json.loads(out.read_text())["rows"]] == ["fisher", "l2", "distill",
                                                                                  "fisher-vocab", "feature"]


def test_distill_error_measures_a_copy_of_the_sampler_against_the_exact_kl(tiny_model_dir):
    from benchmarks import distill_error, surrogate_speed
    from repair.train.surrogates import build_surrogate

    _, kind, _, data = surrogate_speed.setup_run(tiny_model_dir, "coop", classes=3, batch=2, images=4)
    with torch.no_grad():  # a fine-tuned prompt: away from zero-shot, where the KL is 0
        kind.ctx.add_(0.5 * torch.randn(kind.ctx.shape, generator=torch.Generator().manual_seed(1)))
    term = build_surrogate("distill", kind, data, seed=0)  # the packaged vocabulary: a sample per step
    queue, reference = list(term.sampled.queue), term.sampled.reference.clone()
    point = distill_error.measure(kind, term)
    assert point["relative_error"] < 1e-4  # at the build's w the reference is current: exact
    assert -1.0 <= point["gradient_cosine"] <= 1.0 and point["names_scored"] == 8
    assert term.sampled.queue == queue and torch.equal(term.sampled.reference, reference)  # the run's is untouched
    with torch.no_grad():
        kind.ctx.add_(0.5 * torch.randn(kind.ctx.shape, generator=torch.Generator().manual_seed(0)))
    moved = distill_error.measure(kind, term)
    assert moved["exact"] != point["exact"] and moved["relative_error"] > 0


def test_surrogate_speed_times_clipfit_on_pixels(tiny_model_dir, tmp_path):
    from benchmarks import surrogate_speed

    out = tmp_path / "surrogate-speed.json"
    surrogate_speed.main(["--model", tiny_model_dir, "--kind", "clipfit", "--classes", "3", "--batch", "2",
                          "--images", "4", "--steps", "1", "--build-rounds", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["kind"], row["surrogate"]) for row in rows] == [("clipfit", "fisher"), ("clipfit", "distill")]
    assert all(_positive(row["step_seconds"]) and row["final_loss_finite"] for row in rows)
    assert "distill-error.json" in rows[1]["approximation"]["measured"]  # measured along real repairs instead


def test_surrogate_speed_can_time_another_kinds_distillation_sample(tiny_model_dir, tmp_path, monkeypatch):
    from benchmarks import surrogate_speed
    from repair.train.surrogates import DistillSurrogate, SampledKL

    samples = []
    arrange = SampledKL._arrange
    monkeypatch.setattr(SampledKL, "_arrange", lambda self: samples.append(self.sample) or arrange(self))
    out = tmp_path / "surrogate-speed.json"
    surrogate_speed.main(["--model", tiny_model_dir, "--surrogates", "fisher", "distill", "--classes", "3",
                          "--batch", "2", "--images", "4", "--steps", "1", "--build-rounds", "1", "--error-steps", "0",
                          "--fisher-error-seeds", "0", "--distill-sample", "image-tower", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {row["distill_sample"] for row in rows} == {"image-tower"}
    assert samples and set(samples) == {DistillSurrogate.image_bound}  # a prompt sampled as CLIPFit does
    assert DistillSurrogate.sample_for.__func__ is DistillSurrogate.__dict__["sample_for"].__func__  # restored
