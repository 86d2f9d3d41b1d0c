"""What each zero-shot surrogate costs a repair: its one-off build and every training step after it.

The defaults are chosen on HM (``benchmarks/run.py``); this says what a default costs a user. ViT-B-16
with random weights (``pretrained=None``: no download), a CoOp prompt of 4 context tokens, ``--classes``
classes (each count measured on its own), a batch of 32 cached image features, ``--images`` repair
images for the data-built surrogates (a real repair uses up to 64). With ``--kind clipfit`` the batch and the
repair images are random pixels, since CLIPFit trains the image tower. Each step is the repair loop's: the
MergeTune loss (task CE + surrogate + path term), backward and an SGD update.

Measured so that a shared or busy machine still gives fair ratios: the builds run ``--build-rounds``
times and the steps ``--steps`` times, round-robin over the surrogates (interleaved, after one warm-up
step each); a row reports medians, and its ``*_vs_fisher`` ratios are the medians of the ratios within
each round (the same moment's load on both). ``load`` records the machine's load average around each
class count.

Rows whose constants or value are estimates carry ``approximation``: for ``distill`` (sampled over the
vocabulary, :class:`repair.train.surrogates.SampledKL`) its value against the exact KL along a repair
trajectory from a moved prompt (``--error-steps`` SGD steps at ``--error-lr``, momentum 0.9); for the
vocabulary Fishers (``draws`` estimator) their unbiasedness is a test, and their error against the
exact expected Fisher is measured on the tiny test model (enumerated, ``--fisher-error-seeds`` seeds)
next to the one-label estimator's. Writes ``benchmarks/results/surrogate-speed.json``.

    python -m benchmarks.surrogate_speed                      # 10 and 100 classes, every CoOp surrogate
    python -m benchmarks.surrogate_speed --classes 10 --surrogates fisher distill --steps 5
    python -m benchmarks.surrogate_speed --kind clipfit --classes 10 --append   # pixels through the image tower
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "surrogate-speed.json"
SCHEMA = "mergetune.surrogate-speed/2"
KIND_SURROGATES = {"coop": ("feature", "fisher", "l2", "fisher-vocab", "fisher-dense", "distill"),
                   "clipfit": ("fisher", "distill")}  # the image tower trains: each step runs it, slow on CPU
BASELINE = "fisher"


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def setup_run(model: str, kind_name: str, classes: int, batch: int, images: int, seed: int = 0):
    """The bench (backbone, names, batch), a kind at its zero-shot point, its inputs, and the repair images."""
    from benchmarks.speed import build_kind, setup
    from repair.data.features import Features

    bench = setup(model, classes, batch)
    kind, inputs = build_kind(kind_name, bench)
    generator = torch.Generator().manual_seed(seed)
    if kind.input_kind == "pixels":  # a kind that trains the image tower is built from images
        repair_inputs = torch.randn(images, *bench.images.shape[1:], generator=generator)
    else:
        repair_inputs = torch.nn.functional.normalize(
            torch.randn(images, bench.backbone.embed_dim, generator=generator), dim=-1)
    return bench, kind, inputs, Features(features=repair_inputs, labels=torch.arange(images) % classes)


def interleaved(calls: dict[str, Callable[[], object]], rounds: int,
                returned: dict[str, object] | None = None) -> dict[str, list[float]]:
    """Seconds of each call, ``rounds`` times, round-robin; each call's last value goes into ``returned``."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            began = time.perf_counter()
            value = call()
            seconds[name].append(time.perf_counter() - began)
            if returned is not None:
                returned[name] = value
    return seconds


def paired_ratio(seconds: dict[str, list[float]], name: str) -> float | None:
    """The median over rounds of ``name``'s time over the baseline's in the same round."""
    if BASELINE not in seconds:
        return None
    return round(statistics.median(a / b for a, b in zip(seconds[name], seconds[BASELINE])), 2)


def measure_class_count(args: argparse.Namespace, classes: int) -> list[dict[str, object]]:
    from benchmarks.speed import update_step
    from repair.train.objective import Objective, mergetune_loss
    from repair.train.surrogates import DistillSurrogate, build_surrogate

    load_before = load_average()
    bench, kind, inputs, data = setup_run(args.model, args.kind, classes, args.batch, args.images)
    surrogates = list(args.surrogates or KIND_SURROGATES[args.kind])
    built: dict[str, object] = {}

    def build(name: str) -> Callable[[], None]:
        def call() -> None:
            built[name] = build_surrogate(name, kind, data, seed=0)
        return call

    build_seconds = interleaved({name: build(name) for name in surrogates}, args.build_rounds)
    steps = {}
    for name in surrogates:
        objective = Objective(lam_zs=1.0, surrogate=name)  # lam changes no step's work

        def loss(o=objective, s=built[name]) -> torch.Tensor:
            return mergetune_loss(kind, o, inputs, bench.labels, s).total

        steps[name] = update_step(list(kind.trainable().values()), loss, kind.backbone)
        steps[name]()  # warm-up
    losses: dict[str, object] = {}
    step_seconds = interleaved(steps, args.steps, losses)
    load_after = load_average()
    rows = []
    for name in surrogates:
        stats = getattr(built[name], "stats", {})
        rows.append({"kind": args.kind, "surrogate": name, "classes": classes, "batch": args.batch,
                     "images": args.images, "vocabulary": stats.get("vocabulary", {}).get("classes"),
                     **({"distill_sample": args.distill_sample} if args.distill_sample else {}),
                     "build_seconds": round(statistics.median(build_seconds[name]), 3),
                     "build_vs_fisher": paired_ratio(build_seconds, name),
                     "build_runs": [round(value, 3) for value in build_seconds[name]],
                     "step_seconds": round(statistics.median(step_seconds[name]), 4),
                     "step_vs_fisher": paired_ratio(step_seconds, name),
                     "step_runs": [round(value, 4) for value in step_seconds[name]],
                     "final_loss_finite": bool(torch.isfinite(losses[name]).item()),
                     "load_average_before_after": [load_before, load_after]})
    approximations = {}
    if "distill" in surrogates and args.kind != "coop":  # a trajectory from a moved prompt needs a prompt
        approximations["distill"] = {"estimator": repr(DistillSurrogate.sample_for(kind)),
                                     "measured": "along whole repairs: benchmarks/results/distill-error.json"}
    elif "distill" in surrogates and args.error_steps:
        approximations["distill"] = distill_error(kind, data, inputs, bench.labels, args.error_steps, args.error_lr)
    if args.fisher_error_seeds:
        fisher = fisher_error(args.fisher_error_seeds)
        approximations.update({name: fisher for name in ("fisher-vocab", "fisher-dense") if name in surrogates})
    for row in rows:
        row["approximation"] = approximations.get(row["surrogate"], "exact")
    return rows


def distill_error(kind, data, inputs: torch.Tensor, labels: torch.Tensor, steps: int, lr: float) -> dict[str, object]:
    """The sampled distillation's value against the exact KL along a repair from a moved prompt: the kind's
    context moved by one embedding-scale of noise (a stand-in fine-tuned prompt), then ``steps`` SGD steps of
    the MergeTune loss with the sampled term, the exact KL computed (no grad) before each update."""
    from repair.train.curvature import vocabulary_logits
    from repair.train.objective import Objective, mergetune_loss
    from repair.train.surrogates import DistillSurrogate, build_surrogate, exact_kl

    start = kind.snapshot()
    zero_shot = kind.zero_shot_values()["ctx"]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        kind.ctx.add_(zero_shot.std() * torch.randn(kind.ctx.shape, generator=generator))
    moved_from = kind.ctx.detach().clone()
    surrogate = build_surrogate("distill", kind, data, seed=0)
    optimizer = torch.optim.SGD([kind.ctx], lr=lr, momentum=0.9)
    objective = Objective(lam_zs=1.0, surrogate="distill")
    points = []
    for _ in range(steps):
        with torch.no_grad():
            exact = float(exact_kl(surrogate.constants["log_p_zs"],
                                   vocabulary_logits(kind, surrogate.images, surrogate.vocabulary)))
        optimizer.zero_grad(set_to_none=True)
        terms = mergetune_loss(kind, objective, inputs, labels, surrogate)
        estimate = float(terms.surrogate.detach())
        points.append({"exact": round(exact, 6), "estimate": round(estimate, 6),
                       "relative_error": round(abs(estimate - exact) / max(exact, 1e-12), 4)})
        terms.total.backward()
        optimizer.step()
    travelled = float((kind.ctx.detach() - moved_from).norm() / (moved_from - zero_shot).norm())
    kind.load_values(start)
    errors = [point["relative_error"] for point in points]
    sample = DistillSurrogate.sample_for(kind)
    return {"estimator": f"SampledKL: {sample.take_all} names of most mass + a block of {sample.block} per step",
            "measured": "|estimate - exact KL| / exact KL along the trajectory",
            "lr": lr, "steps": steps, "travelled_vs_start_displacement": round(travelled, 4),
            "relative_error_median": round(statistics.median(errors), 4), "relative_error_max": max(errors),
            "points": points}


def fisher_error(seeds: int, images: int = 16) -> dict[str, object]:
    """Relative error (Frobenius, diagonal) of the ``draws`` and ``label`` estimates against the exact expected
    vocabulary Fisher, enumerated on the tiny test model (a CoOp prompt, 11 names), mean over seeds."""
    from repair.data.features import Features
    from repair.kinds import CoOpPrompts
    from repair.model.backbone import BackboneSpec, load_backbone
    from repair.synthetic import save_tiny_backbone
    from repair.train import curvature

    with tempfile.TemporaryDirectory() as folder:
        backbone = load_backbone(BackboneSpec(model=save_tiny_backbone(Path(folder))))
    names = ["blue", "green", "red", "yellow"]
    vocabulary = (*names, "cyan", "orange", "pink", "purple", "dog", "car", "tree")
    kind = CoOpPrompts.zero_shot(backbone, names, ["a photo of a {}."])
    generator = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(images, backbone.embed_dim, generator=generator), dim=-1)
    data = Features(features=feats, labels=torch.zeros(images, dtype=torch.long))
    with curvature.AtZeroShot(kind):
        every_name = torch.arange(len(vocabulary)).repeat(images, 1)
        grads = curvature.logit_gradients(kind, feats, vocabulary, every_name)["ctx"].flatten(2)  # [n, V, P]
        with torch.no_grad():
            probs = torch.softmax(curvature.vocabulary_logits(kind, feats, vocabulary).float(), dim=-1)
    centred = grads - torch.einsum("iy,iyk->ik", probs, grads)[:, None]
    exact = torch.einsum("iy,iyk->k", probs, centred ** 2) / images
    errors = {}
    for estimator in curvature.ESTIMATORS:
        values = [float((curvature.fisher_diagonal(kind, data, seed=seed, vocabulary=vocabulary,
                                                   estimator=estimator)["ctx"].reshape(-1) - exact).norm()
                        / exact.norm()) for seed in range(seeds)]
        errors[estimator] = round(statistics.mean(values), 4)
    return {"estimator": f"draws: sample covariance of {curvature.FISHER_DRAWS} drawn labels' logit gradients "
                         "per image (unbiased; tests/test_surrogates_v2.py)",
            "measured": f"diagonal's relative error against the exact expected Fisher, tiny model, {images} images, "
                        f"mean over {seeds} seeds",
            "relative_error_draws": errors["draws"], "relative_error_label": errors["label"]}


def write_report(out: Path, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    """The JSON, rewritten atomically after every class count, so a run stopped early keeps what it measured."""
    from repair.io.write import atomic_output

    report = {"schema": SCHEMA, "model": f"{args.model} (open_clip, random weights)", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "protocol": {"build_rounds": args.build_rounds, "step_rounds": args.steps, "interleaved": True,
                           "ratios": "median over rounds of the within-round ratio to fisher"},
              "note": args.note, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, replace=True) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--kind", choices=sorted(KIND_SURROGATES), default="coop")
    parser.add_argument("--surrogates", nargs="+", default=None, help="default: every surrogate the kind takes")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="repair images the data-built surrogates use")
    parser.add_argument("--steps", type=int, default=5, help="interleaved rounds of steps")
    parser.add_argument("--build-rounds", type=int, default=2, help="interleaved rounds of builds")
    parser.add_argument("--error-steps", type=int, default=8, help="distill's error trajectory (0: skip)")
    parser.add_argument("--error-lr", type=float, default=0.002, help="its SGD lr (CoOp's reference lr)")
    parser.add_argument("--fisher-error-seeds", type=int, default=20, help="0: skip")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--append", action="store_true", help="keep --out's rows (e.g. another class count)")
    parser.add_argument("--distill-sample", default=None,
                        help="distill samples this way instead of the kind's own (benchmarks/distill_error.py's "
                             "--sample: prompts, image-tower, or take_all=N,block=N,...); recorded in its rows")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = json.loads(args.out.read_text())["rows"] if args.append and args.out.exists() else []
    from benchmarks.distill_error import forced_distill_sample

    for classes in args.classes:
        with forced_distill_sample(args.distill_sample):
            rows += measure_class_count(args, classes)
        for row in rows[-len(args.surrogates or KIND_SURROGATES[args.kind]):]:
            print(json.dumps({key: value for key, value in row.items() if key != "approximation"}), flush=True)
        write_report(args.out, rows, args)


if __name__ == "__main__":
    main()
