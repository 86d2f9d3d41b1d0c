"""The repair benchmark: forgetting and repair, measured with mergetune's own workflows.

Three suites, each over several few-shot seeds:

- base-to-novel (CoOp, CLIPFit; CoCoOp and MaPLe's text half when named with ``--kinds``): fit on 16
  shots of the base classes; test on base and novel classes; zero-shot, fine-tuned, repaired with each
  surrogate, WiSE-FT and the output ensemble.
- domain (linear head, CoOp, CLIPFit): fit on 16 shots of PACS photos; test on photos and on
  the art, cartoon and sketch domains.
- corruption (linear head, CoOp, CLIPFit): fit on 16 shots of every class; test in distribution
  and under six seeded corruptions.

WiSE-FT's alpha is chosen on a validation split (base and novel classes, photos and the other
domains, or clean and corrupted images), never on the test set. Without ``--model`` the proxy
CLIP (``--proxy towers``, the default, or the older ``scratch`` one) is built or reused; with
``--model ViT-B-16 --pretrained openai`` the same protocol runs on real CLIP.

    python -m benchmarks.run            # full run: latest.json, RESULTS.md, hm.png
    python -m benchmarks.run --quick    # one seed, small test sets, for iteration

Seeds run in worker processes (``--workers``, one per core by default), each job on one thread, so the
numbers are the same whatever the core count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.proxy import ProxyConfig, ensure_proxy
from benchmarks.splits import missing_datasets
from benchmarks.tasks import BaseToNovelTask, RobustnessTask, Sizes, base_to_novel_task, domain_task, robustness_task
from repair import DataOptions, evaluate, finetune, repair
from repair.record import versions
from repair.model.backbone import BackboneSpec, load_backbone
from repair.data.features import default_cache_dir, extract_features
from repair.data.folders import scan_image_folder
from repair.errors import IncompatibleCheckpointError, NumericalError, UsageError
from repair.io.write import atomic_output
from repair.train.objective import Objective
from repair.train.surrogates import SURROGATES
from repair.train.loop import TrainConfig
from repair.eval.baselines import BASELINES

SCHEMA = "mergetune.bench/3"  # 3: seconds per seed (seed_s) replace a block's wall_s; workers recorded
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"


@dataclass(frozen=True)
class KindProtocol:
    """How a kind is fine-tuned and repaired in the benchmark (repair runs the same schedule).

    ``steps`` (when set) fixes the number of optimizer steps instead of the epochs, so a task with
    1,600 training images and one with 80 get the same amount of training: ``epochs`` becomes
    ceil(steps x batch / images), with no warm-up below 5 epochs. ``kind_options`` go to ``finetune`` (e.g.
    MaPLe's ``text_half``); the repair reads them from the fine-tuned file's record.
    """

    epochs: int
    lr: float
    lam_zs: dict[str, float]  # per surrogate: their penalties live on different scales
    lam_lmc: float = 1.0
    batch_size: int = 32
    shots: int = 16
    steps: int | None = None
    kind_options: dict[str, object] = field(default_factory=dict)  # finetune's (repair reads them from the record)

    def epochs_for(self, images: int) -> int:
        if self.steps is None:
            return self.epochs
        return max(1, math.ceil(self.steps * self.batch_size / max(images, 1)))

    def train_config(self, seed: int, images: int = 0) -> TrainConfig:
        """SGD with momentum 0.9 and weight decay 5e-4, one warm-up epoch (none below 5 epochs in steps mode)."""
        epochs = self.epochs_for(images)
        warmup = 1 if self.steps is None or epochs >= 5 else 0
        steps_per_epoch = math.ceil(images / self.batch_size) if images else 1
        return TrainConfig(epochs=epochs, optimizer="sgd", lr=self.lr, weight_decay=5e-4, batch_size=self.batch_size,
                           warmup_steps=warmup * steps_per_epoch, seed=seed)

    def repair(self, candidate: str, seed: int) -> RepairSpec:
        """A benchmarked repair from its name (:func:`parse_candidate`): ``default`` is what the bare command
        runs; ``NAME[:LAM]`` runs this protocol's schedule; ``...@steps=N,step=S,batch=B`` the default Adam
        schedule with those choices (unset ones: the kind's)."""
        surrogate, schedule = parse_candidate(candidate)
        if surrogate == DEFAULT:
            return RepairSpec(Objective(), TrainConfig(seed=seed))
        objective = self.objective(surrogate)
        if schedule is None:
            return RepairSpec(objective, None)  # the protocol's schedule, set per task by fit_and_repair
        return RepairSpec(objective, TrainConfig(seed=seed, **schedule))

    def objective(self, surrogate: str) -> Objective:
        """``name`` at this protocol's lam_zs, ``name:auto`` with lam_zs chosen on held-out shots, or
        ``name:LAM`` at that value (its label says so, so it never passes for the protocol's)."""
        name, _, lam = surrogate.partition(":")
        if name not in SURROGATES:
            raise ValueError(f"unknown surrogate {name!r}; choose one of {', '.join(SURROGATES)}")
        if lam == "" and name not in self.lam_zs:
            raise ValueError(f"the protocol has no lam_zs for {name!r}: name one ({name}:LAM) or {name}:auto")
        try:
            lam_zs = self.lam_zs[name] if lam == "" else lam if lam == "auto" else float(lam)
        except ValueError:
            raise ValueError(f"a benchmarked repair is 'surrogate', 'surrogate:auto' or 'surrogate:LAM', "
                             f"not {surrogate!r}") from None
        return Objective(lam_zs=lam_zs, lam_lmc=self.lam_lmc, surrogate=name)


DEFAULT = "default"  # the bare command: no schedule, surrogate or lam_zs given
WEIGHT_ENSEMBLE = "weight-ensemble"  # ZSCL's WE of the fine-tuning run (finetune --weight-ensemble N)
SCHEDULE_KEYS = {"steps": ("steps", int), "step": ("step_size", float), "batch": ("batch_size", int)}


@dataclass(frozen=True)
class RepairSpec:
    """One benchmarked repair: its objective and schedule (``config`` None: the protocol's, per task)."""

    objective: Objective
    config: TrainConfig | None


def parse_candidate(candidate: str) -> tuple[str, dict[str, object] | None]:
    """'fisher:10@steps=200,step=0.05' -> ('fisher:10', {'steps': 200, 'step_size': 0.05}); no '@': None."""
    surrogate, at, settings = candidate.partition("@")
    if not at:
        return surrogate, None
    schedule: dict[str, object] = {}
    for item in filter(None, settings.split(",")):
        key, _, text = item.partition("=")
        if key not in SCHEDULE_KEYS:
            raise ValueError(f"{candidate!r}: unknown schedule key {key!r}; use {', '.join(SCHEDULE_KEYS)}")
        field_name, convert = SCHEDULE_KEYS[key]
        try:
            schedule[field_name] = convert(text)
        except ValueError:
            raise ValueError(f"{candidate!r}: {key} must be a number, not {text!r}") from None
    return surrogate, schedule


# The scratch proxy's protocol: lam_zs per kind and surrogate, the best validation HM (seeds 1 and 2,
# 50 images per class) over the grids in benchmarks/README.md ("Choosing lam_zs").
SCRATCH_PROTOCOL = {
    "coop": KindProtocol(epochs=30, lr=0.05, lam_zs={"feature": 10.0, "fisher": 10.0, "l2": 5.0}),
    "clipfit": KindProtocol(epochs=20, lr=0.01, lam_zs={"feature": 10.0, "fisher": 5.0, "l2": 1.0}),
    "linear": KindProtocol(epochs=30, lr=0.05, lam_zs={"feature": 30.0, "fisher": 10.0, "l2": 5.0}),
}


def _with_fisher_family(lam_zs: dict[str, float]) -> dict[str, float]:
    """``lam_zs`` plus fisher's value for the surrogates that approximate the same KL (see below)."""
    return {**lam_zs, **{name: lam_zs["fisher"] for name in ("kfac", "fisher-vocab", "fisher-dense", "distill")}}


# The towers proxy's protocol (benchmarks/README.md, "Protocol on the towers proxy"): schedules chosen on
# validation splits only, so that fine-tuning forgets. lam_zs keeps the scratch values, except CoOp's l2:
# at lr 3 an SGD step on 5 * 0.5 ||d||^2 overshoots (lr * lam > 2 (1 + momentum)) and the loss became inf.
# kfac, fisher-vocab, fisher-dense and distill take fisher's value: each approximates the same
# E_x KL(p_zs || p_w) around w_zs (distill is that KL; fisher-dense its second-order term; fisher-vocab
# and kfac that term's diagonal and Kronecker forms), so one lam_zs means one strength for all of them.
# Except CoOp's fisher-dense and distill, for l2's reason: the dense Fisher (distill's curvature at w_zs)
# has a largest eigenvalue of about 2 on the proxy (its largest diagonal entry 0.07), so at lr 3 lam 10
# diverged by step 14; 0.5 keeps lr * lam * 2 under 2 (1 + momentum). A linear head's dense Fisher has
# eigenvalues up to 12 on PACS: fisher-dense at 10 (measured first) diverged on 2 of 5 seeds there, so
# distill, chosen after that and before it ran, takes 5 (lr 0.05 * 5 * 12 = 3, CoOp's margin) and
# benchmarks/results/surrogates-vocab-linear.json measures fisher-dense:5 beside it.
TOWERS_PROTOCOL_COOP_LAM = {**_with_fisher_family({**SCRATCH_PROTOCOL["coop"].lam_zs, "l2": 0.5}),
                            "fisher-dense": 0.5, "distill": 0.5}
TOWERS_PROTOCOL = {
    "coop": KindProtocol(epochs=0, steps=100, lr=3.0, batch_size=256, lam_zs=TOWERS_PROTOCOL_COOP_LAM),
    "clipfit": KindProtocol(epochs=0, steps=40, lr=0.05, batch_size=32,
                            lam_zs=_with_fisher_family(SCRATCH_PROTOCOL["clipfit"].lam_zs)),
    "linear": KindProtocol(epochs=0, steps=100, lr=0.05, batch_size=32,
                           lam_zs={**_with_fisher_family(SCRATCH_PROTOCOL["linear"].lam_zs), "distill": 5.0}),
    # Prompt kinds beyond CoOp, run only when named (--kinds; benchmarks/README.md, "Prompt kinds beyond CoOp").
    # Both take CoOp's protocol (SGD lr 3, CoOp's lam_zs), so that fine-tuning forgets as CoOp's does, CoCoOp
    # with fewer images: it encodes every class prompt once per image (no shared prefix in the proxy's
    # bidirectional text tower), so a step costs batch x classes text passes, 25-45 ms per image on one core of
    # the loaded 2-core machine against CoOp's 0.7, and CoOp's 320 full-batch epochs of CIFAR-10's 80 shots
    # (25,600 image-steps) would take 10-20 min per fine-tuning. 200 steps of 8 images (20 epochs, 1,600
    # image-steps) took 44 s there; the rest of a CIFAR-10 seed is the bare default repair (CoOp's defaults:
    # 100 steps of all 80 images, 352 s of the seed's 486 s in the --quick smoke), which no protocol sets.
    "cocoop": KindProtocol(epochs=0, steps=200, lr=3.0, batch_size=8,
                           lam_zs={**TOWERS_PROTOCOL_COOP_LAM}),
    # MaPLe's text half: its context and deep text prompts, the image tower frozen (the proxy's is a CNN,
    # where MaPLe's projected image prompts have no tokens to enter: they are not measured). Its steps cost
    # what CoOp's do, so CoOp's schedule as it is. In the proxy's bidirectional text tower the deep prompts
    # have no zero-shot values: fisher, l2, WiSE-FT and the task-vector baselines do not apply (recorded).
    "maple": KindProtocol(epochs=0, steps=100, lr=3.0, batch_size=256, lam_zs={**TOWERS_PROTOCOL_COOP_LAM},
                          kind_options={"text_half": True}),
}
KINDS_B2N = ("coop", "clipfit")  # the default plan's; cocoop and maple only when named
BENCHMARKED_SURROGATES = ("feature", "fisher", "l2")  # the set the committed runs measured; --surrogates adds others
KINDS_ALL = ("linear", "coop", "clipfit")


@dataclass(frozen=True)
class Plan:
    proxy: str = "towers"  # which proxy CLIP without --model: towers (benchmarks/towers.py) or scratch
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    datasets: tuple[str, ...] = ("cifar10", "tiny_imagenet", "caltech101")  # base-to-novel
    b2n_kinds: tuple[str, ...] = KINDS_B2N
    domain_kinds: tuple[str, ...] = KINDS_ALL  # PACS: photo -> art_painting, cartoon, sketch
    robustness_dataset: str = "cifar10"  # the corruption suite
    robustness_kinds: tuple[str, ...] = KINDS_ALL
    surrogates: tuple[str, ...] = BENCHMARKED_SURROGATES
    kind_surrogates: dict[str, tuple[str, ...]] = field(default_factory=lambda: {"linear": ("kfac",)})  # only those kinds
    style: str = "none"
    sizes: Sizes = Sizes(val=20, test=50, shifted_test=50)
    # (suite or dataset, kind) blocks left out to keep the full run inside an hour on 2 cores: CLIPFit runs
    # the image tower in its loop and in every evaluation, and these two have the largest evaluation sets
    # (10,000 test images; 3,500 clean and corrupted) (benchmarks/README.md, "Cost")
    left_out: tuple[tuple[str, str], ...] = (("tiny_imagenet", "clipfit"), ("robustness", "clipfit"))
    protocol: dict[str, KindProtocol] = field(default_factory=lambda: dict(TOWERS_PROTOCOL))
    baselines: tuple[str, ...] = ("wise-ft", "ensemble")  # eval --baseline names; settings chosen on validation
    weight_ensemble: int | None = None  # also fine-tune with ZSCL's weight ensemble every N steps (None: not)


# Labelled comparisons beside each kind's bare default: the default's neighbours in strength and the previous
# defaults' surrogates, each with the schedule it names (benchmarks/DEFAULTS.md reads the choice off them).
COMPARISONS = {
    "coop": ("feature:1@step=0.1", "feature:10@step=0.1"),
    "clipfit": ("fisher:5@steps=40,batch=32,step=0.1",),
    "linear": ("feature:auto@step=0.02", "fisher:10@step=0.05"),
}

PLANS = {
    "towers": Plan(surrogates=(DEFAULT,), kind_surrogates=dict(COMPARISONS), baselines=tuple(BASELINES),
                   weight_ensemble=10),
    "scratch": Plan(proxy="scratch", seeds=(1, 2, 3), datasets=("cifar10", "flowers5"), domain_kinds=(),
                    style="blur", sizes=Sizes(), left_out=(), protocol=dict(SCRATCH_PROTOCOL), kind_surrogates={}),
}
QUICK_SIZES = {"towers": Sizes(val=20, test=20, shifted_test=20), "scratch": Sizes(val=20, test=100, shifted_test=50)}


def quick(plan: Plan) -> Plan:
    """One seed and small test sets: a few minutes, for iteration (numbers too noisy to report)."""
    plan = replace(plan, seeds=plan.seeds[:1], sizes=QUICK_SIZES[plan.proxy])
    if plan.proxy == "towers":  # CLIPFit's image tower and the 50- and 100-class prompt tasks dominate
        plan = replace(plan, datasets=("cifar10",),
                       left_out=(*plan.left_out, ("cifar10", "clipfit"), ("domain", "clipfit"), ("domain", "coop")))
    return plan


# --------------------------------------------------------------------------- one model family, one seed


def training_images(train_dir: Path, shots: int) -> int:
    """How many images a run on ``train_dir`` trains on: at most ``shots`` per class folder."""
    return sum(min(shots, len(list(folder.iterdir()))) for folder in train_dir.iterdir() if folder.is_dir())


def fit_and_repair(kind: str, train_dir: Path, run_dir: Path, seed: int, protocol: KindProtocol,
                   repairs: dict[str, Objective | RepairSpec], backbone, log,
                   weight_ensemble: int | None = None, not_applicable: dict[str, str] | None = None
                   ) -> dict[str, Path]:
    """Fine-tune from zero-shot with the protocol, then repair that checkpoint with each named repair (an
    objective on the protocol's schedule, or a :class:`RepairSpec`); paths by name. With ``weight_ensemble``,
    also ZSCL's weight ensemble of the same fine-tuning (the running mean every that many steps). A repair the
    kind refuses (a surrogate that needs a zero-shot point it lacks) goes into ``not_applicable`` with why."""
    options = DataOptions(shots=protocol.shots)
    config = protocol.train_config(seed, training_images(train_dir, protocol.shots))
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    kind_options = protocol.kind_options or None
    paths = {"fine-tuned": finetune(kind, train_dir, run_dir / "finetuned.safetensors", backbone=backbone,
                                    config=config, data_options=options, kind_options=kind_options, force=True).path}
    if weight_ensemble is not None:
        paths[WEIGHT_ENSEMBLE] = finetune(kind, train_dir, run_dir / "weight-ensemble.safetensors", backbone=backbone,
                                          config=replace(config, weight_ensemble=weight_ensemble),
                                          data_options=options, kind_options=kind_options, force=True).path
    for name, spec in repairs.items():
        spec = spec if isinstance(spec, RepairSpec) else RepairSpec(spec, None)
        try:
            paths[name] = repair(paths["fine-tuned"], train_dir, run_dir / f"{_file_stem(name)}.safetensors",
                                 backbone=backbone, objective=spec.objective, config=spec.config or config,
                                 data_options=options, force=True).path
        except NumericalError as error:  # recorded as missing for this seed; the run goes on
            log(f"  {kind} seed {seed}: {name} diverged ({error})")
        except (UsageError, IncompatibleCheckpointError) as error:  # the repairs were parsed before the run
            if not_applicable is None:
                raise
            not_applicable[name] = str(error)
            log(f"  {kind} seed {seed}: {name} does not apply ({error})")
    log(f"  {kind} seed {seed}: fine-tuned and repaired in {time.perf_counter() - started:.0f} s")
    return paths


def _file_stem(name: str) -> str:
    """'repaired (fisher)' -> 'repaired-fisher'; 'l2 5' -> 'l2-5'; 'repaired (l2:auto)' -> 'repaired-l2-auto';
    'repaired (fisher:10@steps=50,step=0.1)' -> 'repaired-fisher-10-steps-50-step-0.1'."""
    for mark in "():@=,":
        name = name.replace(mark, " ")
    return "-".join(name.split())


def plan_repairs(kind: str, plan: Plan, seed: int = 0) -> dict[str, RepairSpec]:
    protocol = plan.protocol[kind]
    surrogates = (*plan.surrogates, *plan.kind_surrogates.get(kind, ()))
    return {f"repaired ({surrogate})": protocol.repair(surrogate, seed) for surrogate in surrogates}


def method_rows(report: dict[str, object], paths: dict[str, Path]) -> dict[str, dict[str, object]]:
    """Evaluate-report rows renamed by method: zero-shot, fine-tuned, repaired (...), and each baseline by its
    name (wise-ft, ensemble, ties, ...) with how it was chosen."""
    by_path = {str(path): method for method, path in paths.items()}
    rows = {}
    for model in report["models"]:
        if model["role"] == "zero-shot":
            method = "zero-shot"
        elif model["role"] == "baseline":
            method = model["name"]
        else:
            method = by_path[model["source"]["path"]]
        rows[method] = {"base": model["base"], "novel": model["novel"], "hm": model["hm"],
                        "novel_sets": model["novel_sets"]}
        if model["role"] == "baseline":
            rows[method].update(chosen_by=model["chosen_by"], settings=model["settings"])
    if "wise-ft" in rows:
        rows["wise-ft"]["alpha"] = rows["wise-ft"]["settings"].get("alpha")
    return rows


NOT_CHOSEN_ON_VALIDATION = ("ensemble", "entropy-alpha")  # a fixed weight; a label-free choice on what it scores


def baseline_val_rows(report: dict[str, object]) -> dict[str, dict[str, object]]:
    """Each validation-chosen baseline's score on the validation split at its chosen settings (its curve point)."""
    rows = {}
    for name, choice in ((report.get("baselines") or {}).get("chosen") or {}).items():
        point = next((point for point in choice.get("curve") or ()
                      if all(point.get(key) == value for key, value in choice["settings"].items())), None)
        if choice["chosen_by"] == "validation split" and point is not None:
            rows[name] = {key: point[key] for key in ("base", "novel", "hm", "novel_sets") if key in point}
    return rows


def evaluate_with_baselines(paths: dict[str, Path], val: tuple[Path, list[Path]], test: tuple[Path, list[Path]],
                            backbone, baselines: tuple[str, ...] = (), seed: int = 0) -> dict[str, dict[str, object]]:
    """Every method on the validation folders, then on the test folders with the baselines' settings chosen on
    the validation folders (``evaluate(..., val_dir=...)``), never on test.

    The validation rows come back under ``"val"``: the protocol is judged (does fine-tuning
    forget?) and defaults are chosen (which surrogate, which lam_zs) on them, never on test. A baseline the
    fine-tuned checkpoint cannot have (WiSE-FT without a zero-shot point) comes back under
    ``"not_applicable"`` with the evaluation's reason.
    """
    unchosen = [name for name in baselines if name in NOT_CHOSEN_ON_VALIDATION]  # scored as they are, anywhere
    val_report = evaluate(list(paths.values()), val[0], novel_dir=val[1], backbone=backbone,
                          baselines=unchosen or False, seed=seed, skip_inapplicable=True)
    report = evaluate(list(paths.values()), test[0], novel_dir=test[1], backbone=backbone,
                      baselines=list(baselines) or False, val_dir=val[0] if baselines else None,
                      val_novel_dir=val[1] if baselines else None, seed=seed, skip_inapplicable=True)
    rows = method_rows(report, paths)
    rows["val"] = {**method_rows(val_report, paths), **baseline_val_rows(report)}
    rows["not_applicable"] = dict((report.get("baselines") or {}).get("skipped") or {})
    return rows


def run_base_to_novel(task: BaseToNovelTask, kind: str, seed: int, plan: Plan, work: Path, backbone, log):
    run_dir = work / "runs" / f"b2n-{task.dataset}-{task.style}" / kind / f"seed{seed}"
    refused: dict[str, str] = {}
    paths = fit_and_repair(kind, task.train, run_dir, seed, plan.protocol[kind], plan_repairs(kind, plan, seed),
                           backbone, log, plan.weight_ensemble, refused)
    rows = evaluate_with_baselines(paths, (task.val_base, [task.val_novel]), (task.test_base, [task.test_novel]),
                                   backbone, plan.baselines, seed)
    rows["not_applicable"].update(refused)
    return rows


def run_robustness(task: RobustnessTask, kind: str, seed: int, plan: Plan, work: Path, backbone, log):
    run_dir = work / "runs" / f"robust-{task.dataset}-{task.style}" / kind / f"seed{seed}"
    refused: dict[str, str] = {}
    paths = fit_and_repair(kind, task.train, run_dir, seed, plan.protocol[kind], plan_repairs(kind, plan, seed),
                           backbone, log, plan.weight_ensemble, refused)
    rows = evaluate_with_baselines(paths, (task.val, task.val_shifted), (task.test, list(task.test_shifted.values())),
                                   backbone, plan.baselines, seed)
    rows["not_applicable"].update(refused)
    for row in [*(row for method, row in rows.items() if method not in ("val", "not_applicable")),
                *rows["val"].values()]:
        row["shifted"] = row.pop("novel")  # "novel" here is the mean over the shifted test sets
        row["novel_sets"] = {key.split(":", 1)[-1].removeprefix("test-").removeprefix("val-"): value
                             for key, value in row["novel_sets"].items()}
    return rows


# --------------------------------------------------------------------------- aggregation


def summarise(per_seed: dict[int, dict[str, dict[str, object]]]) -> dict[str, dict[str, float | None]]:
    """Mean and sample standard deviation over seeds of every number of every method."""
    methods = dict.fromkeys(method for seed_rows in per_seed.values() for method in seed_rows)
    summary = {}
    for method in methods:
        rows = [seed_rows[method] for seed_rows in per_seed.values() if method in seed_rows]
        numbers = {key for row in rows for key, value in row.items() if isinstance(value, (int, float))}
        numbers |= {f"{key}:{name}" for row in rows for key, value in row.items() if isinstance(value, dict)
                    for name in value}
        summary[method] = {}
        for key in sorted(numbers):
            values = [_lookup(row, key) for row in rows]
            values = [value for value in values if value is not None]
            summary[method][f"{key}_mean"] = sum(values) / len(values) if values else None
            summary[method][f"{key}_std"] = _std(values)
        summary[method]["seeds"] = len(rows)  # fewer than the plan's where a repair diverged
    return summary


def _lookup(row: dict[str, object], key: str) -> float | None:
    if ":" in key:
        outer, inner = key.split(":", 1)
        return (row.get(outer) or {}).get(inner)
    return row.get(key)


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return 0.0 if values else None
    mean = sum(values) / len(values)
    return math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


PHENOMENON = {"base_gain": 3.0, "drop": 2.0}  # fine-tuning must raise base by >= 3 and cost >= 2 elsewhere


def phenomenon(summary: dict[str, dict[str, float | None]], metric: str) -> dict[str, object]:
    """Does fine-tuning show forgetting here: base up by >= 3 points, novel (or shifted) down by >= 2?"""
    zs, ft = summary["zero-shot"], summary["fine-tuned"]
    gain = ft["base_mean"] - zs["base_mean"]
    drop = zs[f"{metric}_mean"] - ft[f"{metric}_mean"] if ft.get(f"{metric}_mean") is not None else None
    return {"base_gain": gain, f"{metric}_drop": drop,
            "phenomenon": bool(gain >= PHENOMENON["base_gain"] and drop is not None and drop >= PHENOMENON["drop"])}


def checks(summary: dict[str, dict[str, float | None]], metric: str = "novel") -> dict[str, object]:
    """The phenomenon (fine-tuning gains base, loses novel) and, per repair, the targets against baselines."""
    ft = summary["fine-tuned"]
    result: dict[str, object] = phenomenon(summary, metric)
    hm = "hm_mean"
    wise = summary.get("wise-ft", {}).get(hm)
    result["repaired"] = {}
    for method, row in summary.items():
        if not method.startswith("repaired") or row.get(hm) is None:
            continue
        result["repaired"][method] = {
            "hm_minus_finetuned": row[hm] - ft[hm],
            "hm_minus_wise_ft": row[hm] - wise if wise is not None else None,
            "base_minus_finetuned": row["base_mean"] - ft["base_mean"],
            "target_met": bool(row[hm] > ft[hm] and (wise is None or row[hm] >= wise)
                               and row["base_mean"] >= ft["base_mean"] - 1),
        }
    return result


# --------------------------------------------------------------------------- the whole run


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@functools.cache
def code_at_start() -> dict[str, object]:
    """The commit (and whether the code differs from it) when first asked: entry points ask before a long run
    starts, so a commit made while it goes on is not recorded as the code it ran."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", "repair/*.py", "benchmarks/*.py")
    return {"git_commit": _git("rev-parse", "HEAD"), "code_modified_since_commit": None if status is None else bool(status)}


def environment() -> dict[str, object]:
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, **code_at_start(), "cpu": cpu_identity(), **versions()}


def declared_defaults() -> dict[str, dict[str, object]]:
    """Every kind's declared repair defaults (surrogate, lam_zs, schedule): what a "default" row ran."""
    from repair.kinds import KINDS

    return {name: asdict(kind.defaults) for name, kind in KINDS.items()}


def cpu_identity() -> dict[str, str | None]:
    """The processor the numbers came from: bit-reproducibility holds per CPU model, not across them
    (benchmarks/README), so a run records the model and the vector kernels torch chose for it."""
    fields = {"model name": "model_name", "cpu family": "family", "model": "model", "stepping": "stepping"}
    found: dict[str, str | None] = {"torch_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open("/proc/cpuinfo") as info:  # Linux; elsewhere the platform's own name
            for line in info:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in fields:
                    found.setdefault(fields[key], value)
    except OSError:
        found["model_name"] = platform.processor() or None
    return found


# Every number of the benchmark is computed on one intra-op thread, in whichever worker process: the
# results then depend neither on the core count nor on --workers, and 2 cores give nearly twice the
# throughput of one process on two threads (small convolutions and short text sequences do not split well).
THREADS_PER_JOB = 1


@dataclass(frozen=True)
class SeedJob:
    """One (suite, task, kind, seed): fine-tune, repair, evaluate; the unit the worker processes share."""

    suite: str  # base_to_novel, domain or robustness
    task: BaseToNovelTask | RobustnessTask
    kind: str
    seed: int


_BACKBONES: dict[BackboneSpec, object] = {}


def _backbone(spec: BackboneSpec):
    """One loaded backbone per process and spec: workers keep theirs across jobs."""
    if spec not in _BACKBONES:
        _BACKBONES[spec] = load_backbone(spec)
    return _BACKBONES[spec]


@contextlib.contextmanager
def _one_job_threads():
    """Torch on THREADS_PER_JOB intra-op threads for the block, restored after (in-process runs share the process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS_PER_JOB)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_job(job: SeedJob, plan: Plan, spec: BackboneSpec, work: Path, log=print) -> tuple[dict, float]:
    """The rows of one seed and the seconds they took, on THREADS_PER_JOB threads from a fixed global seed."""
    with _one_job_threads():
        torch.manual_seed(0)  # nothing should draw from it; if something does, the job order cannot matter
        started = time.perf_counter()
        backbone = _backbone(spec)
        run_seed = run_base_to_novel if job.suite == "base_to_novel" else run_robustness
        rows = run_seed(job.task, job.kind, job.seed, plan, work, backbone, log)
        return rows, round(time.perf_counter() - started, 1)


def warm_features(spec: BackboneSpec, folder: Path) -> None:
    """Encode an evaluation folder with the frozen tower into mergetune's feature cache, once for all jobs."""
    with _one_job_threads():
        extract_features(_backbone(spec), scan_image_folder(folder), cache_dir=default_cache_dir())


def eval_folders(task: BaseToNovelTask | RobustnessTask) -> list[Path]:
    if isinstance(task, BaseToNovelTask):
        return [task.val_base, task.val_novel, task.test_base, task.test_novel]
    return [task.val, *task.val_shifted, task.test, *task.test_shifted.values()]


class _Deferred:
    """A future that runs its call when first asked for the result: the in-process executor's."""

    def __init__(self, call) -> None:
        self._call, self._done, self._value = call, False, None

    def result(self):
        if not self._done:
            self._value, self._done = self._call(), True
        return self._value


class InProcess:
    """``--workers 1``: jobs run here, in plan order, as their results are collected."""

    def submit(self, fn, *args, **kwargs) -> _Deferred:
        return _Deferred(lambda: fn(*args, **kwargs))

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


def executor(workers: int):
    """Worker processes (spawned: forking a process that already ran torch's thread pools can hang)."""
    if workers <= 1:
        return InProcess()
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def block_result(rows_and_seconds: dict[int, tuple[dict, float]], metric: str) -> dict[str, object]:
    """One (task, kind) over every seed: rows per seed, their summary and checks, val checks, seconds per seed,
    and the repairs and baselines that do not apply to the kind, with why (absent when all did)."""
    per_seed, val_per_seed, not_applicable = {}, {}, {}
    for seed, (rows, _) in rows_and_seconds.items():
        rows = dict(rows)
        val_per_seed[seed] = rows.pop("val")
        for method, reason in rows.pop("not_applicable", {}).items():
            not_applicable.setdefault(method, reason)
        per_seed[seed] = rows
    summary = summarise(per_seed)
    block = {"per_seed": per_seed, "summary": summary, "checks": checks(summary, metric),
             "val_per_seed": val_per_seed, "val_checks": phenomenon(summarise(val_per_seed), metric),
             "seed_s": {seed: seconds for seed, (_, seconds) in rows_and_seconds.items()}}
    if not_applicable:
        block["not_applicable"] = not_applicable
    return block


def plan_tasks(plan: Plan, data_root: Path, work: Path, log) -> list[tuple[str, BaseToNovelTask | RobustnessTask]]:
    """The plan's tasks as (suite, task), their image folders written; each kind runs on them unless left out."""
    tasks = []
    for dataset in plan.datasets:
        task = base_to_novel_task(data_root, dataset, plan.style, work / "data", plan.sizes)
        log(f"base-to-novel {dataset} ({plan.style}): base {_names(task.base_classes)}, "
            f"novel {_names(task.novel_classes)}")
        tasks.append(("base_to_novel", task))
    shifted = (("domain", plan.domain_kinds, lambda: domain_task(data_root, work / "data", plan.sizes)),
               ("robustness", plan.robustness_kinds, lambda: robustness_task(
                   data_root, plan.robustness_dataset, plan.style, work / "data", plan.sizes)))
    for suite, kinds, make_task in shifted:
        if kinds:
            task = make_task()
            log(f"{suite} {task.dataset} ({task.style}): shifted sets {', '.join(task.test_shifted)}")
            tasks.append((suite, task))
    return tasks


def plan_blocks(plan: Plan, tasks) -> list[tuple[str, BaseToNovelTask | RobustnessTask, str]]:
    kinds = {"base_to_novel": plan.b2n_kinds, "domain": plan.domain_kinds, "robustness": plan.robustness_kinds}
    return [(suite, task, kind) for suite, task in tasks for kind in kinds[suite]
            if (task.dataset if suite == "base_to_novel" else suite, kind) not in plan.left_out]


def plan_kinds(plan: Plan) -> list[str]:
    """Every kind the plan runs, in any suite, in order."""
    return list(dict.fromkeys((*plan.b2n_kinds, *plan.domain_kinds, *plan.robustness_kinds)))


def plan_record(plan: Plan) -> dict[str, object]:
    """The plan as a run records it: the protocols of the kinds it runs, not every one it could."""
    record = asdict(plan)
    record["protocol"] = {kind: protocol for kind, protocol in record["protocol"].items() if kind in plan_kinds(plan)}
    return record


def _comparable_plan(record: dict[str, object]) -> dict[str, object]:
    """A recorded plan as a resume compares it: the protocols of the kinds it runs, empty kind options dropped
    (a run recorded before protocols named kind options, or that recorded every protocol, is the same plan)."""
    record = json.loads(json.dumps(record))
    kinds = {*record.get("b2n_kinds", ()), *record.get("domain_kinds", ()), *record.get("robustness_kinds", ())}
    record["protocol"] = {kind: {key: value for key, value in protocol.items() if key != "kind_options" or value}
                          for kind, protocol in (record.get("protocol") or {}).items() if kind in kinds}
    return record


class StaleRun(ValueError):
    """A stopped run that cannot be resumed by this one (another plan, defaults or backbone)."""


def kept_blocks(resume: dict[str, object] | None, result: dict[str, object]) -> set[tuple[str, str, str]]:
    """The finished blocks of an earlier run of the same plan and backbone, copied into ``result`` (each seed is
    deterministic, so rerunning them would give the same numbers), except those of a kind whose declared defaults
    changed since: its "default" rows ran another repair, so only that kind's blocks run again. A kept block
    records the run it came from (``ran``: when, which commit, which processor)."""
    if resume is None:
        return set()
    for key in ("plan", "backbone"):
        ours, theirs = (json.loads(json.dumps(run.get(key))) for run in (result, resume))
        if key == "plan":
            ours, theirs = _comparable_plan(ours), _comparable_plan(theirs or {})
        if theirs != ours:
            raise StaleRun(f"the run to resume has another {key}; start afresh")
    ours, theirs = (json.loads(json.dumps(run.get("defaults") or {})) for run in (result, resume))
    kept = set()
    for suite in ("base_to_novel", "domain", "robustness"):
        for dataset, kinds in (resume.get(suite) or {}).items():
            for kind, block in kinds.items():
                if theirs.get(kind) != ours.get(kind):
                    continue
                result[suite].setdefault(dataset, {})[kind] = {**block, "ran": block.get("ran") or provenance(resume)}
                kept.add((suite, dataset, kind))
    return kept


def provenance(run: dict[str, object]) -> dict[str, object]:
    """Which run a block's numbers came from: bit-reproducibility holds per processor model, so a run that keeps
    another's blocks says where each came from."""
    environment = run.get("environment") or {}
    return {"created": run.get("created"), "git_commit": environment.get("git_commit"), "cpu": environment.get("cpu")}


def run_plan(plan: Plan, spec: BackboneSpec, data_root: Path, work: Path, log=print,
             proxy_info: dict[str, object] | None = None, save=None, workers: int = 1,
             resume: dict[str, object] | None = None) -> dict[str, object]:
    """Every block of the plan, its seeds spread over ``workers`` processes; ``save(result)`` after each block,
    so a run stopped late keeps what it measured (``result["complete"]`` says whether it got to the end), and
    ``resume`` (that saved result) runs only the blocks it lacks."""
    started = time.perf_counter()
    result: dict[str, object] = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {**environment(), "workers": workers, "threads_per_job": THREADS_PER_JOB},
        "backbone": spec.as_dict(), "proxy": proxy_info, "plan": plan_record(plan), "defaults": declared_defaults(),
        "base_to_novel": {}, "domain": {}, "robustness": {}, "complete": False,
    }

    def block_done() -> None:
        result["wall_s"] = round(time.perf_counter() - started, 1)
        if save is not None:
            save(result)

    kept = kept_blocks(resume, result)
    tasks = plan_tasks(plan, data_root, work, log)
    blocks = [(suite, task, kind) for suite, task, kind in plan_blocks(plan, tasks)
              if (suite, task.dataset, kind) not in kept]
    if kept:
        log(f"resumed: {len(kept)} blocks kept from the earlier run, {len(blocks)} to run")
    job_log = log if workers <= 1 else print  # a worker cannot call back into this process
    pool = executor(workers)
    try:
        warming = [pool.submit(warm_features, spec, folder) for _, task in tasks for folder in eval_folders(task)]
        for future in warming:
            future.result()
        log(f"evaluation folders encoded (or found cached) in {time.perf_counter() - started:.0f} s")
        futures = [{seed: pool.submit(run_job, SeedJob(suite, task, kind, seed), plan, spec, work, job_log)
                    for seed in plan.seeds} for suite, task, kind in blocks]
        for (suite, task, kind), seeds in zip(blocks, futures):
            metric = "novel" if suite == "base_to_novel" else "shifted"
            block = block_result({seed: future.result() for seed, future in seeds.items()}, metric)
            result[suite].setdefault(task.dataset, {})[kind] = {**block, "ran": provenance(result)}
            title = f"{task.dataset} {kind}" + ("" if suite == "base_to_novel" else f" ({suite})")
            log_summary(log, title, block, metric)
            block_done()
    finally:  # a failed job or Ctrl-C ends the run after the running jobs, not after the whole queue
        pool.shutdown(wait=True, cancel_futures=True)
    result["complete"] = True
    block_done()
    return result


def write_json(path: Path, result: dict[str, object]) -> None:
    """Atomically: a run stopped mid-write leaves the previous file, never half of one."""
    with atomic_output(path, replace=True) as temp:
        temp.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


def log_summary(log, title: str, block: dict[str, object], metric: str) -> None:
    check, val = block["checks"], block["val_checks"]
    log(f"  {title} ({sum(block['seed_s'].values()):.0f} s over its seeds): fine-tuning moved base "
        f"{check['base_gain']:+.1f} and {metric} {-check[f'{metric}_drop']:+.1f} (validation: {val['base_gain']:+.1f} / {-val[f'{metric}_drop']:+.1f})")
    for method, row in block["summary"].items():
        log(f"    {method:20s} base {row['base_mean']:5.1f}  {metric} {_fmt(row.get(f'{metric}_mean'))}  "
            f"hm {_fmt(row.get('hm_mean'))}")


def _names(classes: list[str], shown: int = 6) -> str:
    return ", ".join(classes) if len(classes) <= shown else f"{', '.join(classes[:shown])}, ... ({len(classes)})"


def _fmt(value: float | None) -> str:
    return "  n/a" if value is None else f"{value:5.1f}"


TOWERS_SOURCES = ("cifar10", "tiny_imagenet", "caltech101", "pacs", "imagenet_samples")


def ensure_backbone(proxy: str, data_root: Path, proxy_dir: Path | None, cache: Path) -> tuple[BackboneSpec, dict]:
    """The named proxy CLIP, built or reused, and its card (``proxy.json``)."""
    if proxy == "towers":
        from benchmarks.towers import TowersConfig, ensure_towers

        proxy_dir = proxy_dir or cache / "proxy-towers"
        model = ensure_towers(data_root, proxy_dir, TowersConfig())
    else:
        proxy_dir = proxy_dir or cache / "proxy"
        model = ensure_proxy(data_root, proxy_dir, ProxyConfig())
    return BackboneSpec(model=model, pretrained=None), json.loads((proxy_dir / "proxy.json").read_text())


def main(argv: list[str] | None = None) -> None:
    code_at_start()  # before the proxy build and the run: what the record names
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed and small test sets (a few minutes)")
    parser.add_argument("--proxy", choices=tuple(PLANS), default="towers",
                        help="which proxy CLIP (and its plan) without --model; default: towers")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--model", default=None, help="open_clip model or local-dir:/hf-hub:; default: the proxy")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--proxy-dir", type=Path, default=None, help="where the proxy CLIP is kept")
    parser.add_argument("--work", type=Path, default=None, help="task folders and checkpoints")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--datasets", nargs="*", default=None, help="base-to-novel datasets")
    parser.add_argument("--kinds", nargs="*", default=None,
                        help="base-to-novel kinds (default: coop clipfit; also cocoop, maple: its text half)")
    parser.add_argument("--domain-kinds", nargs="*", default=None, help="PACS domain-shift kinds")
    parser.add_argument("--robustness-kinds", nargs="*", default=None, help="corruption-suite kinds")
    parser.add_argument("--surrogates", nargs="+", default=None,
                        help="repairs to run: surrogate names at the protocol's lam_zs, NAME:auto or NAME:LAM")
    parser.add_argument("--style", default=None, help="downstream style: none, blur, grayscale, low-res")
    parser.add_argument("--weight-ensemble", type=int, default=None, metavar="N",
                        help="also fine-tune with ZSCL's weight ensemble (the running mean every N steps)")
    parser.add_argument("--baselines", nargs="*", default=None,
                        help="eval baselines to score beside the repairs (settings chosen on validation); "
                             "default: the plan's (every one on the towers proxy); 'all' for every one")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/latest.json "
                        "(quick runs: quick.json)")
    parser.add_argument("--include-left-out", action="store_true",
                        help="also run the blocks the plan leaves out for cost (CLIPFit on the large tasks)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes that share the seeds (default: one per core); the numbers do not depend on it")
    parser.add_argument("--no-markdown", action="store_true", help="do not regenerate RESULTS.md and the chart")
    parser.add_argument("--resume", action="store_true",
                        help="keep the blocks of the --out file (same plan and backbone) and run only the others: "
                             "those it lacks and those of a kind whose declared defaults changed since")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    plan = PLANS[args.proxy]
    plan = quick(plan) if args.quick else plan
    overrides = {"seeds": args.seeds, "datasets": args.datasets, "b2n_kinds": args.kinds,
                 "domain_kinds": args.domain_kinds, "robustness_kinds": args.robustness_kinds,
                 "surrogates": args.surrogates, "style": args.style,
                 "baselines": (tuple(BASELINES) if args.baselines == ["all"] else args.baselines),
                 "weight_ensemble": args.weight_ensemble}
    plan = replace(plan, **{key: tuple(value) if isinstance(value, list) else value
                            for key, value in overrides.items() if value is not None})
    kinds = plan_kinds(plan)
    unknown = [kind for kind in kinds if kind not in plan.protocol]
    if unknown:
        parser.error(f"no benchmark protocol for kind {unknown[0]!r}; choose from {', '.join(plan.protocol)}")
    if args.surrogates is not None:  # exactly the ones asked for
        plan = replace(plan, kind_surrogates={})
    for kind in kinds:  # every repair asked for must parse before anything is built or run
        try:
            plan_repairs(kind, plan)
        except (ValueError, UsageError) as error:
            parser.error(f"--surrogates: {error}")
    if args.include_left_out:
        plan = replace(plan, left_out=())
    needed = {*plan.datasets, *(["pacs"] if plan.domain_kinds else []),
              *([plan.robustness_dataset] if plan.robustness_kinds else [])}
    if args.model is None:
        needed |= set(TOWERS_SOURCES if plan.proxy == "towers" else ProxyConfig().sources)
    missing = missing_datasets(args.data_root, sorted(needed))
    if missing:
        parser.error(f"{args.data_root}: no {', '.join(missing)} folder (see benchmarks/README.md, --data-root)")
    cache = default_cache_dir()
    work = args.work or cache / "bench"
    proxy_info = None
    if args.model is None:
        spec, proxy_info = ensure_backbone(plan.proxy, args.data_root, args.proxy_dir, cache)
    else:
        spec = BackboneSpec(model=args.model, pretrained=args.pretrained)
    out = args.out or RESULTS / ("quick.json" if args.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict[str, object]) -> None:
        result["quick"] = args.quick
        write_json(out, result)

    earlier = json.loads(out.read_text()) if args.resume and out.is_file() else None
    try:
        result = run_plan(plan, spec, args.data_root, work, proxy_info=proxy_info, save=save, workers=args.workers,
                          resume=earlier)
    except StaleRun as error:
        parser.error(f"--resume: {error}")
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    if not args.no_markdown and not args.quick:
        from benchmarks.report import write_results

        write_results(bench_json=out)


if __name__ == "__main__":
    main()
