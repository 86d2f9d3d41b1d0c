"""What each zero-shot surrogate costs a repair: its one-off build and every training step after it.

The defaults are chosen on HM (``benchmarks/run.py``); this says what a default costs a user. ViT-B-16
with random weights (``pretrained=None``: no download), a CoOp prompt of 4 context tokens, 10 classes,
a batch of 32 cached image features, ``--images`` repair images for the data-built surrogates (a real
repair uses up to 64; a build's time is about linear in it, a step's is not, except ``distill``'s small
image part). Each step is the repair loop's: the MergeTune loss (task CE + surrogate + path term),
backward and an SGD update, timed after one warm-up step; the median of ``--steps`` is reported.
Writes ``benchmarks/results/surrogate-speed.json``.

    python -m benchmarks.surrogate_speed                    # every CoOp surrogate, 64 images
    python -m benchmarks.surrogate_speed --surrogates fisher-vocab fisher-dense --images 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "surrogate-speed.json"
SCHEMA = "mergetune.surrogate-speed/1"
KIND_SURROGATES = {"coop": ("feature", "fisher", "l2", "fisher-vocab", "fisher-dense", "distill")}


def measure(model: str, kind_name: str, surrogate: str, classes: int, batch: int, images: int, steps: int,
            seed: int = 0) -> dict[str, object]:
    """One surrogate's build seconds and median step seconds on a fresh kind at its zero-shot point."""
    from benchmarks.speed import build_kind, setup, update_step
    from repair.data.features import Features
    from repair.train.objective import Objective, mergetune_loss
    from repair.train.surrogates import build_surrogate

    bench = setup(model, classes, batch)
    kind, inputs = build_kind(kind_name, bench)
    generator = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(images, bench.backbone.embed_dim, generator=generator), dim=-1)
    data = Features(features=feats, labels=torch.arange(images) % classes)
    began = time.perf_counter()
    built = build_surrogate(surrogate, kind, data, seed=seed)
    build_s = time.perf_counter() - began
    objective = Objective(lam_zs=1.0, surrogate=surrogate)  # lam changes no step's work
    step = update_step(list(kind.trainable().values()),
                       lambda: mergetune_loss(kind, objective, inputs, bench.labels, built).total, kind.backbone)
    step()
    seconds = []
    for _ in range(steps):
        began = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - began)
    return {"kind": kind_name, "surrogate": surrogate, "classes": classes, "batch": batch, "images": images,
            "build_seconds": round(build_s, 3), "step_seconds": round(statistics.median(seconds), 4),
            "steps_timed": steps, "final_loss_finite": bool(torch.isfinite(loss).item())}


def with_ratios(rows: list[dict[str, object]], baseline: str = "fisher") -> list[dict[str, object]]:
    """Each row's step time as a multiple of ``baseline``'s on the same kind and class count."""
    base = {(row["kind"], row["classes"]): row["step_seconds"] for row in rows if row["surrogate"] == baseline}
    for row in rows:
        reference = base.get((row["kind"], row["classes"]))
        row[f"step_vs_{baseline}"] = round(row["step_seconds"] / reference, 2) if reference else None
    return rows


def write_report(out: Path, rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    """The JSON, rewritten atomically after every row, so a run stopped early keeps what it measured."""
    from repair.io.write import atomic_output

    report = {"schema": SCHEMA, "model": f"{args.model} (open_clip, random weights)", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
              "note": args.note, "rows": with_ratios(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, replace=True) as partial:
        partial.write_text(json.dumps(report, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--kind", choices=sorted(KIND_SURROGATES), default="coop")
    parser.add_argument("--surrogates", nargs="+", default=None, help="default: every surrogate the kind takes")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="repair images the data-built surrogates use")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--append", action="store_true", help="keep --out's rows (e.g. a second --images)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = json.loads(args.out.read_text())["rows"] if args.append and args.out.exists() else []
    for surrogate in args.surrogates or KIND_SURROGATES[args.kind]:
        rows.append(measure(args.model, args.kind, surrogate, args.classes, args.batch, args.images, args.steps))
        print(json.dumps(rows[-1]), flush=True)
        write_report(args.out, rows, args)


if __name__ == "__main__":
    main()
