"""How long a Fisher build takes: per-example gradients by a Python loop, torch.func.vmap and one-forward vjp,
and the dense form.

ViT-B-16 with random weights (``pretrained=None``: no download), a CoOp prompt of 4 context tokens
(2,048 numbers), 10 and 100 classes, random unit image features (CoOp never runs the image tower).
Each build is timed once after a warm-up build on 2 images; the image count is ``--images`` (a real
build takes up to 64: the time is linear in it). Writes ``benchmarks/results/fisher-speed.json``.

    nice -n 19 python -m benchmarks.fisher_speed --images 8 --note "measured under load"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "fisher-speed.json"


def _timed(build) -> tuple[float, object]:
    began = time.perf_counter()
    value = build()
    return time.perf_counter() - began, value


def measure(classes: int, images: int, seed: int = 0) -> dict[str, object]:
    from benchmarks.speed import peak_rss_mib
    from repair.data.features import Features
    from repair.kinds import CoOpPrompts
    from repair.model.backbone import BackboneSpec, load_backbone
    from repair.train.curvature import fisher_dense, fisher_diagonal

    backbone = load_backbone(BackboneSpec("ViT-B-16", "none"))
    names = [f"class {index}" for index in range(classes)]
    kind = CoOpPrompts.zero_shot(backbone, names, ["a photo of a {}."])
    generator = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(images, backbone.embed_dim, generator=generator), dim=-1)
    data = Features(features=feats, labels=torch.zeros(images, dtype=torch.long))
    warm = Features(features=feats[:2], labels=data.labels[:2])
    row: dict[str, object] = {"classes": classes, "images": images, "trainable_numbers": kind.num_trainable()}
    results = {}
    for method in ("loop", "vmap", "vjp"):
        fisher_diagonal(kind, warm, seed=seed, method=method)
        seconds, results[method] = _timed(lambda: fisher_diagonal(kind, data, seed=seed, method=method))
        row[f"diagonal_{method}_s"] = round(seconds, 2)
    for method in ("vmap", "vjp"):
        row[f"{method}_speedup"] = round(row["diagonal_loop_s"] / max(row[f"diagonal_{method}_s"], 1e-9), 2)
        row[f"loop_{method}_max_abs_diff"] = float((results["loop"]["ctx"] - results[method]["ctx"]).abs().max())
    seconds, dense = _timed(lambda: fisher_dense(kind, data, seed=seed, method="vjp"))
    row["dense_vjp_s"] = round(seconds, 2)
    row["dense_matrix_mib"] = round(dense.numel() * dense.element_size() / 2 ** 20, 2)
    row["dense_diagonal_max_abs_diff"] = float((dense.diagonal() - results["vjp"]["ctx"].reshape(-1)).abs().max())
    row["peak_rss_mib_so_far"] = round(peak_rss_mib(), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows: list[dict[str, object]] = []
    for classes in args.classes:
        rows.append(measure(classes, args.images))
        print(json.dumps(rows[-1]), flush=True)
        write_report(args.out, rows, args.note, not_measured=[c for c in args.classes if c > classes])


def write_report(out: Path, rows: list[dict[str, object]], note: str, not_measured: list[int] = ()) -> None:
    """The JSON, rewritten atomically after every row, so a run stopped early keeps what it measured."""
    report = {"schema": "mergetune.fisher-speed/1", "model": "ViT-B-16 (open_clip, random weights)", "kind": "coop",
              "n_ctx": 4, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "machine": platform.machine(), "note": note, "rows": rows,
              "classes_not_measured": list(not_measured)}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)


if __name__ == "__main__":
    main()
