"""The sampled distillation against the exact KL along whole repairs on the towers proxy, per kind.

``benchmarks/surrogate_speed.py`` checks the estimator over a few steps on random weights, where every
prediction is nearly flat; this follows real repairs, with the peaked predictions of a trained CLIP. For each
kind and seed: the base-to-novel task's fine-tuned checkpoint (the one ``python -m benchmarks.run`` made, in
the same work folder, else fine-tuned here on the same protocol), repaired with ``distill`` on the protocol's
schedule; at ``--points`` evenly spaced steps (and after the first) the exact KL over the whole vocabulary
beside the sampled term at the same ``w``, and the cosine between the gradient of the sampled term (one
step's sample) and the exact KL's. The measurement works on a copy of the sampler, so the repair itself runs
as it would. Writes ``benchmarks/results/distill-error.json``.

    python -m benchmarks.distill_error                                 # CoOp and CLIPFit, CIFAR-10, seed 1
    python -m benchmarks.distill_error --kinds clipfit --datasets caltech101 --seeds 1 2
    python -m benchmarks.distill_error --kinds clipfit --sample prompts --append   # CLIPFit as it sampled before
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.run import DEFAULT_DATA_ROOT, TOWERS_PROTOCOL, KindProtocol, ensure_backbone, training_images
from benchmarks.tasks import Sizes, base_to_novel_task
from repair import DataOptions, finetune
from repair.data.features import default_cache_dir
from repair.io.write import atomic_output
from repair.train.surrogates import VocabularySample

OUT = Path(__file__).resolve().parent / "results" / "distill-error.json"
SCHEMA = "mergetune.distill-error/1"
SIZES = Sizes(val=20, test=50, shifted_test=50)  # the towers plan's, so the benchmark's folders are reused


def fine_tuned(kind: str, train_dir: Path, run_dir: Path, seed: int, protocol: KindProtocol, backbone) -> Path:
    """The benchmark's fine-tuned checkpoint for this block and seed, made here when it is missing."""
    path = run_dir / "finetuned.safetensors"
    if not path.is_file():
        config = protocol.train_config(seed, training_images(train_dir, protocol.shots))
        run_dir.mkdir(parents=True, exist_ok=True)
        finetune(kind, train_dir, path, backbone=backbone, config=config,
                 data_options=DataOptions(shots=protocol.shots), kind_options=protocol.kind_options or None)
    return path


class Probe:
    """Captures the run's kind and distill term as the repair builds them, and measures them at a step."""

    def __init__(self, points: int) -> None:
        self.wanted, self.kind, self.term, self.points, self.total_steps = points, None, None, [], 0

    def build(self, real_build):
        def capture(name, kind, *args, **kwargs):
            term = real_build(name, kind, *args, **kwargs)
            self.kind, self.term = kind, term
            return term
        return capture

    def on_step(self, report) -> None:
        self.total_steps = report.total_steps
        every = max(1, report.total_steps // self.wanted) | 1  # odd: the points fall at every phase of a refresh
        if report.step != 1 and report.step % every:
            return
        self.points.append({"step": report.step, **measure(self.kind, self.term)})


def flat_gradient(kind, value: torch.Tensor) -> torch.Tensor:
    tensors = list(kind.trainable().values())
    grads = torch.autograd.grad(value, tensors, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(t)).flatten() for g, t in zip(grads, tensors)])


def measure(kind, term) -> dict[str, float]:
    """The exact KL and one step's sampled term at the current ``w``, with their gradients' cosine."""
    from repair.train.curvature import vocabulary_logits
    from repair.train.surrogates import exact_kl

    exact = exact_kl(term.constants["log_p_zs"], vocabulary_logits(kind, term.images, term.vocabulary))
    exact_gradient = flat_gradient(kind, exact)
    sampler = copy.deepcopy(term.sampled)  # the run's own sampler keeps its state
    sampler.pending = None
    estimate = sampler(kind)
    cosine = F.cosine_similarity(flat_gradient(kind, estimate), exact_gradient, dim=0)
    exact, estimate = float(exact.detach()), float(estimate.detach())
    return {"exact": round(exact, 5), "estimate": round(estimate, 5),
            "relative_error": round(abs(estimate - exact) / max(exact, 1e-12), 4),
            "gradient_cosine": round(float(cosine), 4), "names_scored": len(sampler.always) + len(sampler.blocks[0])}


def parse_sample(text: str | None) -> VocabularySample | None:
    """``--sample``: ``prompts`` or ``image-tower`` (those kinds' samples), or ``take_all=4,block=4,...``."""
    from repair.train.surrogates import DistillSurrogate

    if text is None:
        return None
    named = {"prompts": DistillSurrogate.text_bound, "image-tower": DistillSurrogate.image_bound}
    if text in named:
        return named[text]
    fields = dict(part.split("=", 1) for part in text.split(","))
    return VocabularySample(**{key: (value.lower() == "true") if key == "per_image" else
                               None if value == "none" else int(value) for key, value in fields.items()})


@contextlib.contextmanager
def forced_distill_sample(text: str | None) -> Iterator[None]:
    """While open, every kind's ``distill`` samples the vocabulary as ``text`` says (None: its own)."""
    from repair.train.surrogates import DistillSurrogate

    sample = parse_sample(text)
    if sample is None:
        yield
        return
    own = DistillSurrogate.sample_for
    DistillSurrogate.sample_for = classmethod(lambda cls, kind: sample)
    try:
        yield
    finally:
        DistillSurrogate.sample_for = own


def repair_with_probe(kind: str, dataset: str, seed: int, data_root: Path, work: Path, spec, points: int,
                      sample: str | None = None, tag: str = "distill-error") -> dict[str, object]:
    """One repair, measured; with ``sample`` (``--sample``) every kind samples that way instead of its own
    (what CLIPFit did before it had one: ``prompts``)."""
    import repair.workflows.run as workflow
    from repair.model.backbone import load_backbone

    task = base_to_novel_task(data_root, dataset, "none", work / "data", SIZES)
    protocol = TOWERS_PROTOCOL[kind]
    backbone = load_backbone(spec)
    run_dir = work / "runs" / f"b2n-{dataset}-none" / kind / f"seed{seed}"
    start = fine_tuned(kind, task.train, run_dir, seed, protocol, backbone)
    config = protocol.train_config(seed, training_images(task.train, protocol.shots))
    out = work / "distill-error" / f"{tag}-{kind}-{dataset}-seed{seed}.safetensors"  # tag: a run's own file
    out.parent.mkdir(parents=True, exist_ok=True)
    probe = Probe(points)
    real_build = workflow.build_surrogate
    workflow.build_surrogate = probe.build(real_build)
    began = time.perf_counter()
    try:
        with forced_distill_sample(sample):
            workflow.repair(start, task.train, out, backbone=backbone, objective=protocol.objective("distill"),
                            config=config, data_options=DataOptions(shots=protocol.shots), force=True,
                            on_step=probe.on_step)
    finally:
        workflow.build_surrogate = real_build
    if probe.term is None or probe.term.sampled is None:
        raise SystemExit(f"{kind} on {dataset}: distill scored its whole vocabulary; nothing sampled to measure")
    errors = [point["relative_error"] for point in probe.points]
    cosines = [point["gradient_cosine"] for point in probe.points]
    return {"kind": kind, "dataset": dataset, "seed": seed, "steps": probe.total_steps,
            "sample": repr(probe.term.sampled.sample), "sample_forced": sample,
            "wall_s": round(time.perf_counter() - began),
            "relative_error_median": round(statistics.median(errors), 4), "relative_error_max": max(errors),
            "gradient_cosine_median": round(statistics.median(cosines), 4), "gradient_cosine_min": min(cosines),
            "points": probe.points}


def write_report(out: Path, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    """The JSON, rewritten atomically after every run, so a run stopped early keeps what it measured."""
    from benchmarks.run import cpu_identity

    report = {"schema": SCHEMA, "model": "towers proxy", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": cpu_identity(), "points_per_repair": args.points, "note": args.note,
              "measured": "relative_error: |sampled - exact KL| / exact KL at the step's w; gradient_cosine: cosine "
                          "between one step's gradient of the sampled term and the exact KL's",
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, replace=True) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=["coop", "clipfit"], choices=["coop", "clipfit"])
    parser.add_argument("--datasets", nargs="+", default=["cifar10"], help="base-to-novel tasks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--sample", default=None, help="every kind samples the vocabulary this way instead of its "
                        "own: prompts, image-tower, or take_all=N,block=N,per_image=true,refresh_every=N")
    parser.add_argument("--append", action="store_true", help="keep --out's rows")
    parser.add_argument("--points", type=int, default=12,
                        help="measurements along each repair (and one after step 1)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--work", type=Path, default=None,
                        help="the benchmark's work folder (default: ~/.cache/mergetune/bench, as benchmarks.run)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = default_cache_dir()
    spec, _ = ensure_backbone("towers", args.data_root, None, cache)
    work = args.work or cache / "bench"
    rows = json.loads(args.out.read_text())["rows"] if args.append and args.out.exists() else []
    for kind in args.kinds:
        for dataset in args.datasets:
            for seed in args.seeds:
                rows.append(repair_with_probe(kind, dataset, seed, args.data_root, work, spec, args.points,
                                              args.sample, args.out.stem))
                print(json.dumps({key: value for key, value in rows[-1].items() if key != "points"}), flush=True)
                write_report(args.out, rows, args)


if __name__ == "__main__":
    main()
