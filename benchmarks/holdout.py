"""Choose on some seeds, confirm on others: what the bare command gives, out of sample.

Each kind's defaults (surrogate, strength and schedule: ``Kind.defaults``) were chosen on the validation splits of
seeds 1-5 (``benchmarks/DEFAULTS.md``). This runs the bare default repair (``repair(ft, data, out)`` with only the
seed given, as ``mergetune repair FT --data DIR --out OUT``) and the cheap baselines (WiSE-FT with alpha from the
validation split, the output ensemble) on every task for seeds 6-10, whose shots no choice has seen, and scores
them on the test splits; the choosing run (seeds 1-5, ``results/latest.json``) gives the validation side. It
writes ``results/holdout-seeds.json`` (schema ``mergetune.holdout/1``) and its run ``results/holdout-confirm.json``:

    python -m benchmarks.holdout                                 # seeds 6-10 (about 30 min on 2 cores)
    python -m benchmarks.holdout --confirm results/holdout-confirm.json   # summarise an existing run only
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.report import all_blocks, kind_title
from benchmarks.run import (DEFAULT, DEFAULT_DATA_ROOT, PLANS, RESULTS, StaleRun, code_at_start, declared_defaults,
                            ensure_backbone, run_plan, write_json)
from repair.data.features import default_cache_dir

SCHEMA = "mergetune.holdout/1"
CHOOSE_SEEDS, CONFIRM_SEEDS = (1, 2, 3, 4, 5), (6, 7, 8, 9, 10)
DEFAULT_ROW = f"repaired ({DEFAULT})"
METHODS = ("zero-shot", "fine-tuned", DEFAULT_ROW, "wise-ft", "ensemble")
DO_NO_HARM = 0.5  # HM a default may cost against the fine-tuned model on any task, mean over seeds


def confirm_plan(seeds=CONFIRM_SEEDS, datasets: tuple[str, ...] | None = None):
    """The main plan with only the bare default repair and the cheap baselines."""
    plan = replace(PLANS["towers"], seeds=tuple(seeds), surrogates=(DEFAULT,), kind_surrogates={},
                   baselines=("wise-ft", "ensemble"), weight_ensemble=None)
    return plan if datasets is None else replace(plan, datasets=tuple(datasets))


def _means(per_seed: dict[str, dict[str, dict[str, object]]]) -> dict[str, dict[str, float]]:
    """Mean base, second number and HM over seeds of each method that every seed has."""
    means = {}
    for method in METHODS:
        rows = [rows[method] for rows in per_seed.values() if method in rows]
        if len(rows) != len(per_seed) or not rows:
            continue
        second = "novel" if "novel" in rows[0] else "shifted"
        means[method] = {key: round(sum(row[key] for row in rows) / len(rows), 2) for key in ("base", second, "hm")}
    return means


def task_rows(run: dict[str, object], split: str) -> dict[tuple[str, str, str], dict[str, object]]:
    """(suite, dataset, kind) -> the methods' means on ``split`` ('val' or 'test') and whether it forgets there."""
    rows = {}
    for suite, _, metric, dataset, kind, block in all_blocks(run):
        per_seed = block["val_per_seed"] if split == "val" else block["per_seed"]
        check = block["val_checks"] if split == "val" else block["checks"]
        rows[(suite, dataset, kind)] = {"seeds": sorted(int(seed) for seed in per_seed), "forgets": check["phenomenon"],
                                        "hm": _means(per_seed), "ran": block.get("ran")}
    return rows


def goals(task: dict[str, object]) -> dict[str, object]:
    """The issue's goals for one task: never below fine-tuned - 0.5; where it forgets, >= WiSE-FT and >= zero-shot."""
    hm = {method: row["hm"] for method, row in task["hm"].items()}
    default = hm.get(DEFAULT_ROW)
    if default is None:
        return {"met": False, "why": "the default repair is missing (diverged on some seed?)"}
    result = {"minus_finetuned": round(default - hm["fine-tuned"], 2),
              "minus_wise_ft": round(default - hm["wise-ft"], 2) if "wise-ft" in hm else None,
              "minus_zero_shot": round(default - hm["zero-shot"], 2),
              "minus_ensemble": round(default - hm["ensemble"], 2) if "ensemble" in hm else None}
    met = result["minus_finetuned"] >= -DO_NO_HARM
    if task["forgets"]:
        met = met and (result["minus_wise_ft"] is None or result["minus_wise_ft"] >= 0) and result["minus_zero_shot"] >= 0
    return {**result, "met": bool(met)}


def summary(choose: dict[str, object], confirm: dict[str, object]) -> dict[str, object]:
    chosen, confirmed = task_rows(choose, "val"), task_rows(confirm, "test")
    tasks = []
    for key, test in confirmed.items():
        suite, dataset, kind = key
        val = chosen.get(key)
        tasks.append({"suite": suite, "dataset": dataset, "kind": kind, "title": f"{dataset} {kind_title(kind)}",
                      "choose": val, "confirm": test, "goals": goals(test)})
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "split": {"choose": {"seeds": chosen and next(iter(chosen.values()))["seeds"], "split": "validation",
                                 "run": "benchmarks/results/latest.json"},
                      "confirm": {"seeds": list(CONFIRM_SEEDS), "split": "test",
                                  "run": "benchmarks/results/holdout-confirm.json"}},
            "defaults": declared_defaults(), "environment": confirm.get("environment"),
            "rule": {"do_no_harm": DO_NO_HARM, "forgetting_tasks": "default HM >= WiSE-FT (alpha on validation) and "
                     ">= zero-shot", "every_task": f"default HM >= fine-tuned - {DO_NO_HARM}"},
            "tasks": tasks, "all_met": all(task["goals"]["met"] for task in tasks)}


def markdown(document: dict[str, object]) -> list[str]:
    """The hold-out table for RESULTS.md and the README."""
    lines = ["| task | forgets (test) | zero-shot | fine-tuned | **default** | WiSE-FT | ensemble | goals |",
             "|---|---|---|---|---|---|---|---|"]
    for task in document["tasks"]:
        hm = {method: row["hm"] for method, row in task["confirm"]["hm"].items()}
        cells = [f"{hm[m]:.1f}" if m in hm else "n/a" for m in METHODS]
        cells[2] = f"**{cells[2]}**"
        choose = task["choose"]["hm"] if task["choose"] else {}
        val = " / ".join(f"{choose[m]['hm']:.1f}" if m in choose else "n/a" for m in ("fine-tuned", DEFAULT_ROW))
        lines.append(f"| {task['title']} ({task['suite'].replace('_', '-')}) | "
                     f"{'yes' if task['confirm']['forgets'] else 'no'} | " + " | ".join(cells) +
                     f" | {'met' if task['goals']['met'] else '**missed**'} (validation FT / default: {val}) |")
    return lines


def main(argv: list[str] | None = None) -> None:
    code_at_start()  # before the run: what the record names
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--choose", type=Path, default=RESULTS / "latest.json",
                        help="the run of seeds 1-5 whose validation splits chose the defaults")
    parser.add_argument("--confirm", type=Path, default=None,
                        help="an existing run of seeds 6-10 to summarise (default: run it now)")
    parser.add_argument("--datasets", nargs="+", default=None, help="base-to-novel datasets (default: the plan's)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the blocks of results/holdout-confirm.json and run only the others (those it "
                             "lacks, and those of a kind whose declared defaults changed since)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "holdout-seeds.json")
    args = parser.parse_args(argv)
    if args.confirm is None:
        cache = default_cache_dir()
        spec, proxy_info = ensure_backbone("towers", args.data_root, None, cache)
        target = RESULTS / "holdout-confirm.json"

        stopped = json.loads(target.read_text()) if args.resume and target.is_file() else None
        try:
            confirm = run_plan(confirm_plan(datasets=args.datasets), spec, args.data_root, cache / "bench",
                               proxy_info=proxy_info, save=lambda result: write_json(target, result),
                               workers=args.workers, resume=stopped)
        except StaleRun as error:
            parser.error(f"--resume: {error}")
    else:
        confirm = json.loads(args.confirm.read_text())
    choose = json.loads(args.choose.read_text())
    for name, run in ((args.choose, choose), ("the confirming run", confirm)):
        if run.get("defaults") not in (None, declared_defaults()):
            parser.error(f"{name} was run with other defaults than the code declares; rerun it first")
    document = summary(choose, confirm)
    write_json(args.out, document)
    print("\n".join(markdown(document)))
    print(f"wrote {args.out}; every goal met: {document['all_met']}")


if __name__ == "__main__":
    main()
