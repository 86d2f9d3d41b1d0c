"""Choose lam_zs per kind and surrogate on the validation split (never the test set).

Fine-tunes once per seed, repairs that checkpoint with every (surrogate, lam_zs) of the grid,
and prints the mean validation base / novel / HM. The chosen values go into ``run.SCRATCH_PROTOCOL`` (the sweep runs the scratch proxy's protocol).

    python -m benchmarks.lam_sweep coop cifar10 --grid feature=3,10,30 fisher=2,5,10 l2=1,5
    python -m benchmarks.lam_sweep linear cifar10 --suite robustness --grid l2=1,5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.proxy import ProxyConfig, ensure_proxy
from benchmarks.run import DEFAULT_DATA_ROOT, SCRATCH_PROTOCOL as PROTOCOL, fit_and_repair
from benchmarks.splits import missing_datasets
from benchmarks.tasks import Sizes, base_to_novel_task, robustness_task
from repair import evaluate
from repair.model.backbone import BackboneSpec, load_backbone
from repair.data.features import default_cache_dir
from repair.train.objective import Objective


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    grid = {}
    for item in items:
        surrogate, values = item.split("=", 1)
        grid[surrogate] = [float(value) for value in values.split(",")]
    return grid


def sweep(kind: str, dataset: str, suite: str, grid: dict[str, list[float]], seeds: list[int], backbone,
          data_root: Path, work: Path, style: str = "blur") -> dict[str, list[tuple[float, float, float]]]:
    """Validation (base, novel-or-shifted, HM) per seed for the fine-tuned model and every grid point."""
    sizes = Sizes(val=50, test=100, shifted_test=50)
    if suite == "base-to-novel":
        task = base_to_novel_task(data_root, dataset, style, work / "data", sizes)
        train, val, held_out = task.train, task.val_base, [task.val_novel]
    else:
        task = robustness_task(data_root, dataset, style, work / "data", sizes)
        train, val, held_out = task.train, task.val, task.val_shifted
    protocol = PROTOCOL[kind]
    repairs = {f"{surrogate} {lam_zs:g}": Objective(lam_zs=lam_zs, lam_lmc=protocol.lam_lmc, surrogate=surrogate)
               for surrogate, values in grid.items() for lam_zs in values}
    scores: dict[str, list[tuple[float, float, float]]] = {}
    for seed in seeds:
        folder = work / "runs" / f"{suite}-{dataset}-{kind}" / f"seed{seed}"
        paths = fit_and_repair(kind, train, folder, seed, protocol, repairs, backbone, log=lambda message: None)
        report = evaluate(list(paths.values()), val, novel_dir=held_out, backbone=backbone)
        names = {str(path): name for name, path in paths.items()}
        for row in report["models"]:
            name = "zero-shot" if row["role"] == "zero-shot" else names[row["source"]["path"]]
            scores.setdefault(name, []).append((row["base"], row["novel"], row["hm"]))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(PROTOCOL))
    parser.add_argument("dataset", choices=["cifar10", "flowers5", "caltech101", "gtsrb"])
    parser.add_argument("--suite", choices=["base-to-novel", "robustness"], default="base-to-novel")
    parser.add_argument("--grid", nargs="+", required=True, help="SURROGATE=V1,V2,... (e.g. fisher=2,5,10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    missing = missing_datasets(args.data_root, sorted({args.dataset, *ProxyConfig().sources}))
    if missing:
        parser.error(f"{args.data_root}: no {', '.join(missing)} folder (see benchmarks/README.md, --data-root)")
    cache = default_cache_dir()
    backbone = load_backbone(BackboneSpec(model=ensure_proxy(args.data_root, cache / "proxy", ProxyConfig()),
                                          pretrained=None))
    scores = sweep(args.kind, args.dataset, args.suite, parse_grid(args.grid), args.seeds, backbone,
                   args.data_root, args.work or cache / "lam-sweep")
    held_out = "novel" if args.suite == "base-to-novel" else "shifted"
    for name, rows in scores.items():
        base, other, hm = (_mean(values) for values in zip(*rows))
        print(f"{name:16s} base {base}  {held_out} {other}  HM {hm}")


def _mean(values: tuple[float | None, ...]) -> str:
    """Mean over seeds as text; n/a when a kind cannot score the held-out classes (a linear head)."""
    present = [value for value in values if value is not None]
    return f"{sum(present) / len(present):5.1f}" if present else "  n/a"


if __name__ == "__main__":
    main()
