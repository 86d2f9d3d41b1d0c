"""The benchmark's own machinery: splits, shifts, the proxy CLIP and one tiny end-to-end plan."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import proxy, shifts, splits


def _all_files(parts: splits.Parts) -> dict[str, set[Path]]:
    return {part: {path for files in by_class.values() for path in files} for part, by_class in parts.items()}


def test_splits_are_disjoint_and_keep_evaluation_images_out_of_pretraining(shared_data):
    for name in ("cifar10", "flowers5", "caltech101", "gtsrb"):
        files = _all_files(splits.dataset_parts(shared_data, name))
        for first in files:
            for second in files:
                if first < second:
                    assert not files[first] & files[second], (name, first, second)
        assert files == _all_files(splits.dataset_parts(shared_data, name))  # deterministic
    flowers = _all_files(splits.flowers5_parts(shared_data / "flowers5"))
    everything = {p for folder in splits.class_folders(shared_data / "flowers5") for p in splits.images_in(folder)}
    assert set().union(*flowers.values()) == everything
    corpus = proxy.build_corpus(shared_data, proxy.ProxyConfig())
    used = {sample.path for sample in corpus.samples}
    for name in ("cifar10", "flowers5"):
        parts = _all_files(splits.dataset_parts(shared_data, name))
        assert parts["pretrain"] <= used
        assert not used & (parts["pool"] | parts["val"] | parts["test"])


@pytest.mark.parametrize("name", sorted(shifts.CORRUPTIONS))
def test_every_corruption_is_seeded_by_file_name_and_keeps_the_size(name):
    rng = random.Random(0)
    image = Image.new("RGB", (48, 40))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48 * 40)])
    shift = [(name, shifts.CORRUPTIONS[name])]
    first, again = shifts.apply(shift, image, "a.png"), shifts.apply(shift, image, "a.png")
    assert first.size == image.size and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != image.tobytes()
    if name == "noise":
        assert shifts.apply(shift, image, "b.png").tobytes() != first.tobytes()


def test_multi_positive_loss_is_clip_loss_for_one_positive_each_and_rewards_positives():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(20.0)
    logits = scale * images @ texts.T
    labels = torch.arange(6)
    clip = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(proxy.multi_positive_loss(images, texts, torch.eye(6, dtype=torch.bool), scale), clip)
    same = proxy.multi_positive_loss(images, images, torch.eye(6, dtype=torch.bool), scale)
    assert same < clip  # matching pairs aligned: lower loss


def test_caption_positives_follow_class_superclass_and_generic_captions():
    corpus = proxy.Corpus()
    cat, dog = corpus.add_class(["cat"]), corpus.add_class(["dog"])
    animal = list(proxy.SUPERCLASSES).index("animal")
    samples = [proxy.Sample(Path("a"), cat, animal), proxy.Sample(Path("b"), dog, animal),
               proxy.Sample(Path("c"), -1, -1)]
    import open_clip

    sampler = proxy.CaptionSampler(corpus, proxy.ProxyConfig(), open_clip.get_tokenizer("ViT-B-32", 32), seed=0)
    for _ in range(30):
        tokens, positives = sampler.draw(samples)
        assert tokens.shape == (3, 32)
        assert positives.diagonal().all()  # every caption is true of its own image
        assert torch.equal(positives[2], positives.all(dim=0))  # c (no label) only matches generic captions


def test_small_proxy_is_a_loadable_local_dir_and_is_rebuilt_only_when_inputs_change(shared_data, tmp_path):
    from repair.model.backbone import BackboneSpec, load_backbone

    config = proxy.ProxyConfig(epochs=1, batch_size=32, warmup_steps=1, per_class_limit=8,
                               sources=("hymenoptera", "flowers5"))
    messages: list[str] = []
    model = proxy.ensure_proxy(shared_data, tmp_path / "proxy", config, log=messages.append)
    info = json.loads((tmp_path / "proxy" / "proxy.json").read_text())
    assert info["fingerprint"] == proxy.input_fingerprint(shared_data, config)
    assert set(info["zero_shot"]) == {"flowers5 test split (5-way)"}
    assert "zero-shot" in (tmp_path / "proxy" / "PROXY.md").read_text()
    backbone = load_backbone(BackboneSpec(model=model))
    assert backbone.tokenizer(["a photo of a rose."]).shape[-1] == proxy.MODEL_CFG["text_cfg"]["context_length"]
    weights = tmp_path / "proxy" / "open_clip_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    messages.clear()
    proxy.ensure_proxy(shared_data, tmp_path / "proxy", config, log=messages.append)
    assert messages == [f"proxy CLIP up to date in {tmp_path / 'proxy'}"] and weights.stat().st_mtime_ns == stamp
    assert proxy.input_fingerprint(shared_data, replace(config, seed=1)) != info["fingerprint"]


def test_tiny_plan_end_to_end_writes_every_method_and_renders(shared_data, tiny_spec, tmp_path):
    from benchmarks import report, run
    from benchmarks.tasks import Sizes

    short = run.KindProtocol(epochs=2, lr=0.05, lam_zs={"feature": 1.0, "l2": 1.0}, shots=2)
    by_steps = run.KindProtocol(epochs=0, steps=3, batch_size=2, lr=0.05,
                                lam_zs={"feature": 1.0, "l2": 1.0, "kfac": 1.0}, shots=2)
    assert by_steps.epochs_for(images=4) == 2 and by_steps.train_config(1, images=4).warmup_steps == 0
    plan = run.Plan(seeds=(1, 2), datasets=("flowers5",), b2n_kinds=("coop",), domain_kinds=("linear",),
                    robustness_kinds=("linear",), surrogates=("feature", "l2"), style="blur",
                    sizes=Sizes(val=3, test=4, shifted_test=2), protocol={"coop": short, "linear": by_steps},
                    kind_surrogates={"linear": ("kfac", "l2:auto")})
    saved = []  # a snapshot after each block: a run stopped late keeps what it measured
    result = run.run_plan(plan, tiny_spec, shared_data, tmp_path / "work", log=lambda message: None,
                          save=lambda partial: saved.append(json.loads(json.dumps(partial))))
    assert [snapshot["complete"] for snapshot in saved] == [False, False, False, True]
    assert saved[0]["base_to_novel"] and not saved[0]["robustness"] and saved[-1] == json.loads(json.dumps(result))
    block = result["base_to_novel"]["flowers5"]["coop"]
    methods = {"zero-shot", "fine-tuned", "repaired (feature)", "repaired (l2)", "wise-ft", "ensemble"}
    assert set(block["per_seed"]) == {1, 2} and set(block["per_seed"][1]) == methods
    assert 0.0 <= block["per_seed"][1]["wise-ft"]["alpha"] <= 1.0
    hms = [block["per_seed"][seed]["fine-tuned"]["hm"] for seed in (1, 2)]
    assert block["summary"]["fine-tuned"]["hm_mean"] == pytest.approx(sum(hms) / 2)
    assert set(block["checks"]["repaired"]) == {"repaired (feature)", "repaired (l2)"}
    assert set(block["val_per_seed"][1]) == methods and "phenomenon" in block["val_checks"]  # defaults choose on val
    linear = result["robustness"]["cifar10"]["linear"]["summary"]  # Plan.kind_surrogates: only linear heads
    assert {"repaired (kfac)", "repaired (l2:auto)"} <= set(linear) and "repaired (kfac)" not in block["summary"]
    robust = result["robustness"]["cifar10"]["linear"]["per_seed"][1]
    assert set(robust["fine-tuned"]["novel_sets"]) == set(shifts.CORRUPTIONS)
    assert robust["fine-tuned"]["shifted"] == pytest.approx(
        sum(robust["fine-tuned"]["novel_sets"].values()) / len(shifts.CORRUPTIONS))
    domain = result["domain"]["pacs"]["linear"]["per_seed"][1]
    assert set(domain["fine-tuned"]["novel_sets"]) == set(splits.PACS_SHIFTED)
    assert set(result["domain"]["pacs"]["linear"]["val_per_seed"][1]["zero-shot"]["novel_sets"]) == set(
        splits.PACS_SHIFTED)
    (tmp_path / "latest.json").write_text(json.dumps(result))
    report.write_results(markdown=tmp_path / "RESULTS.md", bench_json=tmp_path / "latest.json",
                         speed_json=tmp_path / "absent.json", chart=tmp_path / "hm.png")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| repaired (feature) |" in text and "### Corruption" in text and "### Domain shift" in text
    assert "pacs, Linear" in text or "pacs, linear" in text.lower()
    assert (tmp_path / "hm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stopped before its end" not in text
    (tmp_path / "partial.json").write_text(json.dumps(saved[0]))
    report.write_results(markdown=tmp_path / "PARTIAL.md", bench_json=tmp_path / "partial.json",
                         speed_json=tmp_path / "absent.json", chart=tmp_path / "partial.png")
    assert "stopped before its end" in (tmp_path / "PARTIAL.md").read_text()


def test_numbers_do_not_depend_on_how_many_worker_processes_share_the_seeds(shared_data, tiny_spec, tmp_path):
    from benchmarks import run
    from benchmarks.tasks import Sizes

    protocol = run.KindProtocol(epochs=2, lr=0.05, lam_zs={"l2": 1.0}, shots=2)
    plan = run.Plan(seeds=(1, 2), datasets=("flowers5",), b2n_kinds=("coop",), domain_kinds=(), robustness_kinds=(),
                    surrogates=("l2",), style="blur", sizes=Sizes(val=2, test=3, shifted_test=2),
                    protocol={"coop": protocol}, kind_surrogates={})
    threads = torch.get_num_threads()
    results = [run.run_plan(plan, tiny_spec, shared_data, tmp_path / f"work{workers}", log=lambda message: None,
                            workers=workers)["base_to_novel"]["flowers5"]["coop"] for workers in (1, 2)]
    assert results[0]["per_seed"] == results[1]["per_seed"] and results[0]["val_per_seed"] == results[1]["val_per_seed"]
    assert set(results[1]["seed_s"]) == {1, 2} and torch.get_num_threads() == threads  # restored in-process


def test_cocoop_and_maples_text_half_join_base_to_novel_and_say_what_does_not_apply(shared_data, hf_backbone,
                                                                                     tmp_path):
    """Named with --kinds, both run as the other kinds do; on a bidirectional (Hugging Face) text tower, as on the
    towers proxy, MaPLe's deep prompts have no zero-shot point: WiSE-FT and fisher are recorded, not run."""
    from benchmarks import report, run
    from benchmarks.tasks import Sizes
    from repair.io import read_tensors

    tiny = {"epochs": 0, "steps": 2, "batch_size": 4, "lr": 0.05, "shots": 2}
    protocol = {kind: replace(run.TOWERS_PROTOCOL[kind], **tiny) for kind in ("cocoop", "maple")}
    plan = run.Plan(seeds=(1,), datasets=("flowers5",), b2n_kinds=("cocoop", "maple"), domain_kinds=(),
                    robustness_kinds=(), surrogates=(run.DEFAULT, "fisher"), kind_surrogates={}, left_out=(),
                    sizes=Sizes(val=2, test=2, shifted_test=2), protocol=protocol, baselines=("wise-ft", "ensemble"))
    result = run.run_plan(plan, hf_backbone.spec, shared_data, tmp_path / "work", log=lambda message: None)
    assert set(result["plan"]["protocol"]) == {"cocoop", "maple"}  # the protocols of the kinds it ran
    cocoop, maple = (result["base_to_novel"]["flowers5"][kind] for kind in ("cocoop", "maple"))
    repaired = {"fine-tuned", "repaired (default)"}
    assert repaired | {"repaired (fisher)", "wise-ft", "ensemble", "zero-shot"} <= set(cocoop["summary"])
    assert "not_applicable" not in cocoop
    assert repaired | {"ensemble", "zero-shot"} <= set(maple["summary"])
    assert set(maple["not_applicable"]) == {"wise-ft", "repaired (fisher)"}
    assert "no zero-shot point" in maple["not_applicable"]["wise-ft"]
    assert not {"wise-ft", "repaired (fisher)"} & set(maple["summary"])
    finetuned = tmp_path / "work" / "runs" / "b2n-flowers5-none" / "maple" / "seed1" / "finetuned.safetensors"
    assert not any("proj" in key for key in read_tensors(finetuned).tensors)  # the protocol's text half

    (tmp_path / "prompt-kinds.json").write_text(json.dumps(result))
    report.write_results(markdown=tmp_path / "RESULTS.md", bench_json=tmp_path / "latest.json",
                         speed_json=tmp_path / "absent.json", chart=tmp_path / "hm.png")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Prompt kinds beyond CoOp" in text and "| flowers5 | MaPLe (text half) | 1 |" in text
    assert "| flowers5 | CoCoOp | 1 |" in text and "Not applicable to MaPLe (text half) here: wise-ft (" in text


def test_a_stopped_run_resumes_with_only_the_blocks_it_lacks(shared_data, tiny_spec, tmp_path):
    from benchmarks import run
    from benchmarks.tasks import Sizes

    protocol = run.KindProtocol(epochs=1, lr=0.05, lam_zs={"l2": 1.0}, shots=2)
    plan = run.Plan(seeds=(1,), datasets=("flowers5",), b2n_kinds=("coop", "clipfit"), domain_kinds=(),
                    robustness_kinds=(), surrogates=("l2",), style="none", sizes=Sizes(val=2, test=2, shifted_test=2),
                    protocol={"coop": protocol, "clipfit": protocol}, kind_surrogates={}, baselines=(), left_out=())
    saved = []
    full = run.run_plan(plan, tiny_spec, shared_data, tmp_path / "work", log=lambda message: None,
                        save=lambda result: saved.append(json.loads(json.dumps(result))))
    stopped = saved[0]  # after its first block
    assert stopped["complete"] is False and list(stopped["base_to_novel"]["flowers5"]) == ["coop"]
    stopped["base_to_novel"]["flowers5"]["coop"]["marker"] = True  # kept, not recomputed
    messages = []
    resumed = run.run_plan(plan, tiny_spec, shared_data, tmp_path / "work", log=messages.append, resume=stopped)
    assert resumed["complete"] and resumed["base_to_novel"]["flowers5"]["coop"]["marker"]
    assert resumed["base_to_novel"]["flowers5"]["clipfit"]["per_seed"] == full["base_to_novel"]["flowers5"][
        "clipfit"]["per_seed"]  # the block it lacked, run again: the same numbers
    assert "resumed: 1 blocks kept from the earlier run, 1 to run" in messages
    with pytest.raises(run.StaleRun, match="another plan"):
        run.run_plan(replace(plan, seeds=(2,)), tiny_spec, shared_data, tmp_path / "work", log=lambda m: None,
                     resume=stopped)


def test_a_run_records_the_processor_its_numbers_came_from(monkeypatch):
    """Bit-reproducibility holds per CPU model: every run's environment names it, and the kernels torch chose."""
    from benchmarks import run

    cpu = run.environment()["cpu"]
    assert cpu["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").is_file():
        assert cpu.keys() >= {"model_name", "family", "model", "stepping"}

    def no_cpuinfo(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr("builtins.open", no_cpuinfo)  # another OS: the platform's own name, never an error
    assert set(run.cpu_identity()) == {"torch_capability", "model_name"}


def test_run_refuses_fewer_than_one_worker_in_one_line(capsys):
    from benchmarks import run

    with pytest.raises(SystemExit) as exit_info:
        run.main(["--workers", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("--workers must be at least 1, got 0")


@pytest.mark.parametrize("repair, message", [("fisher:strong", "'surrogate:LAM', not 'fisher:strong'"),
                                             ("bogus", "unknown surrogate 'bogus'"),
                                             ("fisher:-1", "lam_zs must be a finite number >= 0")])
def test_run_refuses_a_repair_it_cannot_parse_before_building_anything(repair, message, capsys, tmp_path):
    from benchmarks import run

    with pytest.raises(SystemExit) as exit_info:
        run.main(["--surrogates", repair, "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("args, message", [(["--kinds", "bogus"], "no benchmark protocol for kind 'bogus'"),
                                           (["--proxy", "scratch", "--kinds", "maple"],
                                            "no benchmark protocol for kind 'maple'")])
def test_run_refuses_a_kind_without_a_protocol_before_building_anything(args, message, capsys, tmp_path):
    from benchmarks import run

    with pytest.raises(SystemExit) as exit_info:
        run.main([*args, "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "work").exists()


def test_a_run_recorded_before_protocols_named_kind_options_still_resumes():
    """A run records only its kinds' protocols now; one stopped earlier (every protocol, no kind_options) is the
    same plan, and a changed protocol of a kind it runs is not."""
    from dataclasses import asdict

    from benchmarks import run

    plan = run.Plan(b2n_kinds=("coop",), domain_kinds=(), robustness_kinds=())
    result = {"plan": run.plan_record(plan), "defaults": {}, "backbone": {}, "base_to_novel": {}, "domain": {},
              "robustness": {}}
    assert list(result["plan"]["protocol"]) == ["coop"]
    older = json.loads(json.dumps(result))
    older["plan"]["protocol"] = {kind: {key: value for key, value in asdict(run.TOWERS_PROTOCOL[kind]).items()
                                        if key != "kind_options"} for kind in ("linear", "coop", "clipfit")}
    older["base_to_novel"] = {"cifar10": {"coop": {"marker": True}}}
    assert run.kept_blocks(older, result) == {("base_to_novel", "cifar10", "coop")}
    older["plan"]["protocol"]["coop"]["lr"] = 1.0
    with pytest.raises(run.StaleRun, match="another plan"):
        run.kept_blocks(older, result)


def test_a_changed_default_reruns_only_that_kinds_blocks():
    """After a kind's defaults change, its "default" rows ran another repair: a resume drops that kind's blocks and
    keeps the others, each saying which run (commit, processor) its numbers came from."""
    from benchmarks import run

    plan = run.Plan(b2n_kinds=("coop", "clipfit"), domain_kinds=(), robustness_kinds=())
    result = {"plan": run.plan_record(plan), "backbone": {}, "base_to_novel": {}, "domain": {}, "robustness": {},
              "defaults": {"coop": {"lam_zs": 3.0}, "clipfit": {"lam_zs": 10.0}}}
    earlier = json.loads(json.dumps(result))
    earlier.update(defaults={"coop": {"lam_zs": 3.0}, "clipfit": {"lam_zs": 20.0}}, created="2026-12-01T00:00:00Z",
                   environment={"git_commit": "abc", "cpu": {"model_name": "some cpu"}},
                   base_to_novel={"cifar10": {"coop": {"marker": 1}, "clipfit": {"marker": 2}}})
    assert run.kept_blocks(earlier, result) == {("base_to_novel", "cifar10", "coop")}
    kept = result["base_to_novel"]["cifar10"]
    assert list(kept) == ["coop"] and kept["coop"]["marker"] == 1
    assert kept["coop"]["ran"] == {"created": "2026-12-01T00:00:00Z", "git_commit": "abc",
                                   "cpu": {"model_name": "some cpu"}}


def test_lam_sweep_scores_every_grid_point_on_validation_images(shared_data, backbone, tmp_path):
    from benchmarks.lam_sweep import parse_grid, sweep

    grid = parse_grid(["l2=1,5"])
    assert grid == {"l2": [1.0, 5.0]}
    scores = sweep("linear", "flowers5", "base-to-novel", grid, [1], backbone, shared_data, tmp_path)
    assert set(scores) == {"zero-shot", "fine-tuned", "l2 1", "l2 5"}
    assert all(len(rows) == 1 and rows[0][0] is not None for rows in scores.values())
    assert (tmp_path / "data" / "flowers5-blur" / "val50-test100-shifted50" / "val-base").is_dir()


@pytest.mark.parametrize("module, args", [("run", ["--quick"]), ("proxy", ["--out", "unused"]),
                                          ("lam_sweep", ["coop", "cifar10", "--grid", "l2=1"])])
def test_scripts_refuse_a_data_root_without_the_datasets_in_one_line(module, args, tmp_path, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"benchmarks.{module}").main([*args, "--data-root", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("folder (see benchmarks/README.md, --data-root)") and "cifar10" in error
    assert not (tmp_path / "unused").exists()


def _synthetic_bench(hms_by_dataset: dict[str, dict[str, tuple[float, float]]]) -> dict:
    """A benchmark JSON with CoOp base-to-novel blocks: per dataset, method -> (validation HM, test HM)."""
    def rows(split: int) -> dict:
        return {1: {method: {"hm": pair[split]} for method, pair in methods.items()}}

    results = {}
    for dataset, methods in hms_by_dataset.items():
        results[dataset] = {"coop": {"val_per_seed": rows(0), "per_seed": rows(1), "summary": {},
                                     "checks": {"phenomenon": False}}}
    return {"plan": {"datasets": list(hms_by_dataset), "b2n_kinds": ["coop"]}, "base_to_novel": results}


def test_defaults_rule_picks_the_best_validation_gain_that_never_costs_more_than_half_a_point():
    from benchmarks import report

    bench = _synthetic_bench({
        "a": {"fine-tuned": (50, 50), "repaired (x)": (53, 40), "repaired (y)": (51, 52)},
        "b": {"fine-tuned": (60, 60), "repaired (x)": (59.4, 61), "repaired (y)": (60.1, 59)},
    })
    choice = report.default_choices(bench)["coop"]
    assert choice["candidates"]["repaired (x)"]["val"] == pytest.approx({"mean": 1.2, "worst": -0.6, "tasks": 2})
    assert choice["chosen"] == "repaired (y)"  # x gains more on average but costs 0.6 on task b
    assert choice["candidates"]["repaired (y)"]["test"]["worst"] == pytest.approx(-1.0)  # test is only reported
    extra = _synthetic_bench({"a": {"fine-tuned": (50, 50), "repaired (z)": (52, 52)},
                              "b": {"fine-tuned": (60, 60), "repaired (z)": (62, 61)},
                              "c": {"fine-tuned": (1, 1), "repaired (z)": (90, 90)}})  # c: not a task of the run
    merged = report.default_choices(bench, [extra])["coop"]
    assert merged["chosen"] == "repaired (z)" and merged["tasks"] == 2
    partial = _synthetic_bench({"a": {"fine-tuned": (50, 50), "repaired (w)": (70, 70)}})
    assert report.default_choices(bench, [partial])["coop"]["chosen"] == "repaired (y)"  # w lacks task b


def test_a_candidate_that_diverged_on_a_seed_is_not_eligible_and_the_table_says_so():
    from benchmarks import report

    bench = _synthetic_bench({"a": {"fine-tuned": (50, 50), "repaired (y)": (51, 51)}})
    extra = _synthetic_bench({"a": {"fine-tuned": (50, 50), "repaired (v)": (60, 60)}})
    for split in ("val_per_seed", "per_seed"):  # a second seed on which v diverged (no row)
        extra["base_to_novel"]["a"]["coop"][split][2] = {"fine-tuned": {"hm": 50}}
    choice = report.default_choices(bench, [extra])["coop"]
    assert choice["candidates"]["repaired (v)"]["diverged_on"] == 1 and choice["chosen"] == "repaired (y)"
    assert any("v (0 of 1 tasks; diverged on some seed of 1)" in line for line in report.defaults_markdown(bench, [extra]))


def test_a_benchmarked_repair_takes_the_protocols_lam_auto_or_a_stated_value():
    from benchmarks.run import TOWERS_PROTOCOL

    coop = TOWERS_PROTOCOL["coop"]
    assert coop.objective("fisher").lam_zs == 10.0 and coop.objective("fisher:auto").lam_zs == "auto"
    assert coop.objective("fisher-dense:0.25").lam_zs == 0.25
    with pytest.raises(ValueError, match="surrogate:LAM"):
        coop.objective("fisher:strong")


def _holdout_run(hms: dict[str, float], forgets: bool) -> dict:
    """A one-task run (CoOp base-to-novel on 'a', two seeds) with every method at the given HM."""
    per_seed = {seed: {m: {"base": hm, "novel": hm, "hm": hm} for m, hm in hms.items()} for seed in (6, 7)}
    block = {"val_per_seed": per_seed, "per_seed": per_seed, "summary": {}, "checks": {"phenomenon": forgets},
             "val_checks": {"phenomenon": forgets}}
    return {"plan": {"datasets": ["a"], "b2n_kinds": ["coop"]}, "base_to_novel": {"a": {"coop": block}}}


@pytest.mark.parametrize("default_hm, forgets, met", [
    (64.0, True, True),    # above WiSE-FT and zero-shot where the task forgets
    (61.0, True, False),   # above fine-tuned but below WiSE-FT: where it forgets that is a miss
    (61.0, False, True),   # no forgetting: doing no harm is enough
    (54.0, False, False),  # a point below fine-tuned: harm
])
def test_holdout_goals_and_their_table(default_hm, forgets, met, tmp_path):
    from benchmarks import holdout, report

    baselines = {"zero-shot": 60.0, "fine-tuned": 55.0, "wise-ft": 62.0, "ensemble": 63.0}
    run = _holdout_run({**baselines, holdout.DEFAULT_ROW: default_hm}, forgets)
    document = holdout.summary(run, run)
    assert document["all_met"] is met
    assert document["tasks"][0]["goals"]["minus_finetuned"] == pytest.approx(default_hm - 55.0)
    (tmp_path / "holdout-seeds.json").write_text(json.dumps(document))
    report.write_results(markdown=tmp_path / "RESULTS.md", bench_json=tmp_path / "latest.json",
                         speed_json=tmp_path / "absent.json", chart=tmp_path / "hm.png")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Hold-out" in text and f"**{default_hm:.1f}**" in text
    assert ("**missed**" in text) is not met


def test_older_candidate_runs_are_labelled_with_the_schedule_they_ran():
    from benchmarks import report

    old = _synthetic_bench({"a": {"fine-tuned": (50, 50), "repaired (fisher)": (52, 52)}})
    renamed = report.protocol_schedule_runs([old])[0]["base_to_novel"]["a"]["coop"]
    assert set(renamed["per_seed"]["1"]) == {"fine-tuned", "repaired (fisher, protocol SGD schedule)"}
    assert "repaired (fisher)" in old["base_to_novel"]["a"]["coop"]["per_seed"][1]  # the input is left as it was


def test_vocabulary_kl_is_zero_at_zero_shot_and_grows_as_the_prompt_moves(backbone, image_dirs):
    from benchmarks.checkpoint_signals import vocabulary_kl
    from repair.data.features import extract_features
    from repair.data.folders import scan_image_folder
    from repair.kinds.coop import CoOpPrompts, init_context

    dataset = scan_image_folder(image_dirs["train"])
    images = extract_features(backbone, dataset, batch_size=16).features
    zero_shot = init_context(backbone, "a photo of a")
    direction = torch.randn(zero_shot.shape, generator=torch.Generator().manual_seed(0))

    def kl_at(scale: float) -> float:
        kind = CoOpPrompts(backbone, zero_shot + scale * direction, dataset.classnames, ["a photo of a {}."])
        return vocabulary_kl(kind, images)

    assert abs(kl_at(0.0)) < 1e-5
    assert 0.0 < kl_at(0.05) < kl_at(0.5)


def test_image_drift_is_zero_at_zero_shot_and_grows_as_the_image_norms_move(backbone, image_dirs):
    from benchmarks.checkpoint_signals import image_drift
    from repair.data.folders import scan_image_folder
    from repair.kinds.clipfit import CLIPFit, clipfit_names
    from repair.workflows.inputs import DataOptions, encode_for

    dataset = scan_image_folder(image_dirs["train"])
    pretrained = dict(backbone.model.named_parameters())
    names = clipfit_names(backbone)
    generator = torch.Generator().manual_seed(0)
    direction = {name: torch.randn(pretrained[name].shape, generator=generator) for name in names}

    def drift_at(scale: float) -> float:
        values = {name: pretrained[name].detach() + scale * direction[name] for name in names}
        kind = CLIPFit(backbone, values, dataset.classnames, ["a photo of a {}."])
        return image_drift(kind, encode_for(kind, backbone, dataset, DataOptions(), training=True).features)

    assert abs(drift_at(0.0)) < 1e-5
    assert 0.0 < drift_at(0.05) < drift_at(0.5)


def test_the_report_says_which_run_each_block_came_from():
    from benchmarks.report import provenance_text

    bench = {"created": "2026-12-07T21:00:00Z", "environment": {"git_commit": "def4567", "cpu": {"model_name": "B"}},
             "plan": {"datasets": ["cifar10"], "b2n_kinds": ["coop", "clipfit"]},
             "base_to_novel": {"cifar10": {"clipfit": {}, "coop": {"ran": {"created": "2026-12-01T00:00:00Z",
                                                                           "git_commit": "abc1234",
                                                                           "cpu": {"model_name": "A"}}}}}}
    text = provenance_text(bench)
    assert "cifar10 CoOp: 2026-12-01, git abc1234, on A" in text
    assert "cifar10 CLIPFit: 2026-12-07, git def4567, on B" in text
    del bench["base_to_novel"]["cifar10"]["coop"]["ran"]
    assert provenance_text(bench) == ""  # one run: nothing to say


def test_the_holdout_report_says_which_run_each_task_came_from():
    from benchmarks.report import holdout_provenance_text

    def task(title, created, cpu):
        return {"title": title, "confirm": {"ran": {"created": created, "git_commit": "abc1234",
                                                    "cpu": {"model_name": cpu}}}}

    holdout = {"tasks": [task("cifar10 CoOp", "2026-12-01T00:00:00Z", "A"), task("pacs CoOp", "2026-12-01T00:00:00Z", "A"),
                         task("cifar10 CLIPFit", "2026-12-07T00:00:00Z", "B")]}
    text = holdout_provenance_text(holdout)
    assert "cifar10 CoOp, pacs CoOp: 2026-12-01, git abc1234, on A" in text
    assert "cifar10 CLIPFit: 2026-12-07, git abc1234, on B" in text
    holdout["tasks"].pop()
    assert holdout_provenance_text(holdout) == ""  # one run: nothing to say


def test_the_report_flags_default_rows_that_ran_other_defaults_than_the_code_declares():
    from benchmarks.report import stale_defaults_text
    from benchmarks.run import declared_defaults

    recorded = json.loads(json.dumps(declared_defaults()))
    assert stale_defaults_text(recorded) == ""
    recorded["clipfit"]["lam_zs"] = recorded["clipfit"]["lam_zs"] + 7
    text = stale_defaults_text(recorded)
    assert text.startswith("**Stale rows: CLIPFit's default rows ran") and "coop" not in text.lower()
