"""benchmarks/RESULTS.md and the HM chart, regenerated from the committed JSON results.

    python -m benchmarks.report    # rewrite RESULTS.md and results/hm.png from results/*.json
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MARKDOWN = RESULTS.parent / "RESULTS.md"
CHART = RESULTS / "hm.png"


def kind_title(name: str) -> str:
    """How a kind is labelled: its own declaration (``Kind.about.title``)."""
    from repair.kinds import KINDS

    return KINDS[name].about.title if name in KINDS else name


def kind_label(name: str, plan: dict[str, object]) -> str:
    """The kind's title and the options its protocol fine-tuned with: 'MaPLe (text half)'."""
    return kind_title(name) + _options_text(((plan.get("protocol") or {}).get(name) or {}).get("kind_options") or {})


def _options_text(options: dict[str, object]) -> str:
    """' (text half)' for ``{"text_half": True}``; '' for none."""
    shown = [key.replace("_", " ") if value is True else f"{key.replace('_', ' ')} {value}"
             for key, value in options.items() if value not in (False, None)]
    return f" ({', '.join(shown)})" if shown else ""


BASELINE_ORDER = ("wise-ft", "task-arithmetic", "ties", "dare", "entropy-alpha", "ensemble", "weighted-ensemble",
                  "weight-ensemble")


def ordered(summary: dict[str, dict]) -> list[tuple[str, dict]]:
    """Methods in reading order: zero-shot, fine-tuned, the repairs, then the baselines."""
    rank = {"zero-shot": 0, "fine-tuned": 1, **{name: 3 + i for i, name in enumerate(BASELINE_ORDER)}}
    return sorted(summary.items(), key=lambda item: (rank.get(item[0], 2), item[0]))


def _sizes(sizes: dict[str, int | None]) -> str:
    return ", ".join(f"{part} {'all' if n is None else n}" for part, n in sizes.items())


def _cell(row: dict[str, object], key: str) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if std is not None and std > 1e-9 else f"{mean:.1f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f}"


def _alpha(per_seed: dict[str, dict], method: str) -> str:
    if method != "wise-ft":
        return ""
    alphas = [rows[method].get("alpha") for rows in per_seed.values() if method in rows]
    return " (a = " + ", ".join("n/a" if a is None else f"{a:.1f}" for a in alphas) + ")"


# (result key, label, what the second number is, the plan's kinds for it, what the first number is)
SUITES = (("base_to_novel", "base-to-novel", "novel", "b2n_kinds", "base"),
          ("domain", "domain shift", "shifted", "domain_kinds", "photo"),
          ("robustness", "corruption", "shifted", "robustness_kinds", "ID"))


def blocks(bench: dict[str, object], suite: str) -> list[tuple[str, str, dict]]:
    """(dataset, kind, block) in the plan's order (the JSON's keys are sorted)."""
    plan = bench["plan"]
    kinds = plan.get(next(entry[3] for entry in SUITES if entry[0] == suite)) or ()
    results = bench.get(suite) or {}
    order = [d for d in plan.get("datasets", ()) if d in results] if suite == "base_to_novel" else list(results)
    return [(dataset, kind, results[dataset][kind]) for dataset in order for kind in kinds
            if kind in results[dataset]]


def all_blocks(bench: dict[str, object]) -> list[tuple[str, str, str, str, str, dict]]:
    """(suite, label, metric, dataset, kind, block) of every task, in the report's order."""
    return [(suite, label, metric, dataset, kind, block) for suite, label, metric, _, _ in SUITES
            for dataset, kind, block in blocks(bench, suite)]


def methods_of(bench: dict[str, object]) -> list[str]:
    """Every method any task measured, in reading order."""
    seen = {method: row for *_, block in all_blocks(bench) for method, row in block["summary"].items()}
    return [method for method, _ in ordered(seen)]


def summary_markdown(bench: dict[str, object]) -> list[str]:
    """One line per task: HM of every method (mean over seeds), the best repair in bold."""
    methods = methods_of(bench)
    lines = ["| suite | dataset | kind | fine-tuning: base / novel (or shifted) change | forgets? | " +
             " | ".join(methods) + " |", "|---|---|---|---|---|" + "---|" * len(methods)]
    for suite, label, metric, dataset, kind, block in all_blocks(bench):
        summary, check = block["summary"], block["checks"]
        hms = {m: summary[m]["hm_mean"] for m in methods if m in summary and summary[m].get("hm_mean") is not None}
        best = max((m for m in hms if m.startswith("repaired")), key=hms.get, default=None)
        cells = [("**{:.1f}**" if m == best else "{:.1f}").format(hms[m]) if m in hms else "n/a"
                 for m in methods]
        change = f"{_signed(check['base_gain'])} / {_signed(_negated(check[f'{metric}_drop']))}"
        lines.append(f"| {label} | {dataset} | {kind_title(kind)} | {change} | "
                     f"{'yes' if check['phenomenon'] else 'no'} | " + " | ".join(cells) + " |")
    return lines


def phenomenon_count(bench: dict[str, object]) -> str:
    """'Fine-tuning forgets on N of M tasks (test; validation: K)' with the tasks named."""
    tasks = all_blocks(bench)
    shown = [f"{dataset} {kind_title(kind)}" for _, _, _, dataset, kind, block in tasks if block["checks"]["phenomenon"]]
    on_val = sum(bool((block.get("val_checks") or {}).get("phenomenon")) for *_, block in tasks)
    return (f"Fine-tuning forgets (base or ID ≥ +3, novel or shifted ≤ −2 against zero-shot) on {len(shown)} of "
            f"{len(tasks)} tasks on test ({', '.join(shown) or 'none'}) and on {on_val} on validation.")


DO_NO_HARM = 0.5  # the most HM a default may cost on any task (the surrogate issue's rule)


def _hm_gains(block: dict[str, object], split: str) -> dict[str, float | None]:
    """HM of each repair minus the fine-tuned model's, mean over seeds, on ``split`` ('val' or 'test');
    None for a repair missing on some seed the fine-tuned model has (it diverged there)."""
    per_seed = block["val_per_seed"] if split == "val" else block["per_seed"]
    gains: dict[str, list[float]] = {}
    seeds = 0
    for rows in per_seed.values():
        fine = (rows.get("fine-tuned") or {}).get("hm")
        seeds += fine is not None
        for method, row in rows.items():
            if method.startswith("repaired") and fine is not None and row.get("hm") is not None:
                gains.setdefault(method, []).append(row["hm"] - fine)
    return {method: sum(values) / len(values) if len(values) == seeds else None for method, values in gains.items()}


def default_choices(bench: dict[str, object], extra: list[dict[str, object]] = ()) -> dict[str, dict[str, object]]:
    """Per kind: every repair's HM gain over fine-tuned (mean over tasks and worst task) on validation and on
    test, and the candidate the do-no-harm rule picks on validation (None: no fixed setting meets it).

    ``extra`` runs (same seeds and protocol) add candidates to the tasks they cover; every gain is against the
    fine-tuned model of its own run (a proxy rebuilt on another CPU can differ in the last bits, and CoOp at
    lr 3 turns that into different fine-tuned prompts)."""
    tasks_of: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
    for run in (bench, *extra):
        for suite, _, _, dataset, kind, block in all_blocks(run):
            if "val_per_seed" not in block or run is not bench and (suite, dataset, kind) not in tasks_of:
                continue
            task = tasks_of.setdefault((suite, dataset, kind), {"val": {}, "test": {}})
            for split in ("val", "test"):
                task[split].update(_hm_gains(block, split))
    by_kind: dict[str, list[dict[str, dict[str, float]]]] = {}
    for (_, _, kind), task in tasks_of.items():
        by_kind.setdefault(kind, []).append(task)
    choices = {}
    for kind, tasks in by_kind.items():
        candidates = {}
        for method in sorted({m for task in tasks for m in task["val"]}):
            row = {}
            for split in ("val", "test"):
                gains = [task[split][method] for task in tasks if task[split].get(method) is not None]
                row[split] = {"mean": sum(gains) / len(gains) if gains else None, "worst": min(gains, default=None),
                              "tasks": len(gains)}
            row["diverged_on"] = sum(task["val"].get(method, 0.0) is None or task["test"].get(method, 0.0) is None
                                     for task in tasks)
            candidates[method] = row
        eligible = [m for m, row in candidates.items() if row["val"]["tasks"] == len(tasks)
                    and not row["diverged_on"] and row["val"]["mean"] > 0 and row["val"]["worst"] >= -DO_NO_HARM]
        chosen = max(eligible, key=lambda m: candidates[m]["val"]["mean"], default=None)
        choices[kind] = {"tasks": len(tasks), "candidates": candidates, "chosen": chosen}
    return choices


def defaults_table(bench: dict[str, object]) -> list[str]:
    """The declared defaults the run's `repaired (default)` rows ran (recorded in the run itself)."""
    declared = bench.get("defaults") or {}
    kinds = sorted({kind for *_, kind, _ in all_blocks(bench)})
    if not declared or not kinds:
        return []
    lines = ["The bare command's defaults for the kinds measured here (Adam; the step size is relative to each "
             "trained tensor's fine-tuning displacement):", "",
             "| kind | surrogate | lam_zs | steps | batch | step size |", "|---|---|---|---|---|---|"]
    for kind in kinds:
        d = declared.get(kind)
        if d:
            sched = d["schedule"]
            lines.append(f"| {kind_title(kind)} | {d['surrogate']} | {d['lam_zs']:g} | {sched['steps']} | "
                         f"{sched['batch_size']} | {sched['step_size']:g} |")
    return lines + [""]


def protocol_schedule_runs(runs: list[dict[str, object]]) -> list[dict[str, object]]:
    """Older candidate runs repaired with the fine-tuning protocol's own SGD schedule, which no user gets: their
    rows are renamed so that no reader takes them for the bare default or for this run's comparisons."""
    renamed = []
    for run in runs:
        run = json.loads(json.dumps(run))
        for *_, block in all_blocks(run):
            for key in ("per_seed", "val_per_seed"):
                for rows in (block.get(key) or {}).values():
                    for method in [m for m in rows if m.startswith("repaired")]:
                        rows[method.replace(")", ", protocol SGD schedule)")] = rows.pop(method)
        renamed.append(run)
    return renamed


def defaults_markdown(bench: dict[str, object], extra: list[dict[str, object]] = ()) -> list[str]:
    lines = ["### Candidates on validation and test", "",
             "The declared defaults were chosen in separate validation sweeps (`benchmarks/DEFAULTS.md`, "
             "`results/defaults-sweep-*.json`) and confirmed on seeds 6-10 (hold-out table below); this table adds "
             "what this run and the older candidate runs (`results/surrogates-*.json`, repaired with the fine-tuning "
             "protocol's SGD schedule, which no user gets, and labelled so) measured. Per kind, each repair's HM minus the fine-tuned model's, mean over that kind's tasks and the worst "
             f"task (means over seeds). The rule: on validation, the candidate with the largest mean gain among "
             f"those that gain on average and cost at most {DO_NO_HARM} HM on every task; test shows whether it "
             "held. Candidates a task did not measure, or that diverged on some seed, are ineligible (the table "
             "counts the tasks behind each mean; a task with a diverged seed is left out of it). Extra candidates come from `results/surrogates-*.json` (the same seeds and protocol; each gain "
             "is taken against the fine-tuned model of its own run, seed by seed).", "",
             "| kind | repaired with | validation: mean / worst | test: mean / worst | the rule's pick on validation |",
             "|---|---|---|---|---|"]
    for kind, choice in default_choices(bench, extra).items():
        for method, row in choice["candidates"].items():
            val, test = row["val"], row["test"]
            diverged = f"; diverged on some seed of {row['diverged_on']}" if row["diverged_on"] else ""
            lines.append(f"| {kind_title(kind)} | {method.removeprefix('repaired ').strip('()')} ({val['tasks']} of "
                         f"{choice['tasks']} tasks{diverged}) | {_signed(val['mean'])} / {_signed(val['worst'])} | {_signed(test['mean'])} / "
                         f"{_signed(test['worst'])} | {'**yes**' if method == choice['chosen'] else ''} |")
        if choice["chosen"] is None:
            lines.append(f"| {kind_title(kind)} | none meets the rule on validation | | | |")
    return lines + [""]


def _negated(value: float | None) -> float | None:
    return None if value is None else -value


def protocol_rows(plan: dict[str, object]) -> list[str]:
    """The fine-tuning protocol table's rows, one per kind the run recorded."""
    rows = []
    for kind, p in plan["protocol"].items():
        lams = ", ".join(f"{name} {value:g}" for name, value in p["lam_zs"].items())
        schedule = f"{p['steps']} steps" if p.get("steps") else f"{p['epochs']} epochs"
        label = kind + _options_text(p.get("kind_options") or {})
        rows.append(f"| {label} | {schedule} | {p['lr']} | {p['batch_size']} | {p['shots']} | {lams} | "
                    f"{p['lam_lmc']} |")
    return rows


def not_applicable_line(block: dict[str, object], label: str) -> list[str]:
    """The repairs and baselines the kind could not have here, with why (recorded by the run)."""
    skipped = block.get("not_applicable") or {}
    if not skipped:
        return []
    return [f"Not applicable to {label} here: " + "; ".join(f"{method} ({reason})"
                                                             for method, reason in skipped.items()) + ".", ""]


def phenomenon_line(block: dict[str, object], metric: str, first: str) -> str:
    """How fine-tuning moved the two numbers against zero-shot, on test and (when recorded) validation."""
    check, val = block["checks"], block.get("val_checks")
    line = (f"fine-tuning moved {first} {_signed(check['base_gain'])} and {metric} "
            f"{_signed(_negated(check[f'{metric}_drop']))} points against zero-shot")
    if val:
        line += (f" (validation: {_signed(val['base_gain'])} / {_signed(_negated(val[f'{metric}_drop']))})")
    verdict = "shown" if check["phenomenon"] else "NOT shown"
    line += f"; forgetting {verdict} (needs {first} ≥ +3 and {metric} ≤ −2)"
    if "seed_s" in block:  # schema 3: each seed on one core
        line += f"; {sum(block['seed_s'].values()) / 60:.1f} min for all seeds on one core each"
    elif "wall_s" in block:
        line += f"; {block['wall_s'] / 60:.1f} min for all seeds"
    return line + "."


def base_to_novel_markdown(bench: dict[str, object]) -> list[str]:
    lines = ["### Base-to-novel", "",
             "Mean ± standard deviation over seeds; accuracy in %. WiSE-FT's alpha (per seed in brackets) "
             "was chosen on the validation split.", ""]
    for dataset, kind, block in blocks(bench, "base_to_novel"):
        lines += base_to_novel_block(dataset, kind_label(kind, bench["plan"]), block)
    return lines


def base_to_novel_block(dataset: str, label: str, block: dict[str, object]) -> list[str]:
    """One task's base, novel and HM per method, what did not apply, and each repair against its targets."""
    lines = [f"**{dataset}, {label}**: {phenomenon_line(block, 'novel', 'base')}", "",
             "| method | base | novel | HM |", "|---|---|---|---|"]
    for method, row in ordered(block["summary"]):
        name = method + _alpha(block["per_seed"], method)
        lines.append(f"| {name} | {_cell(row, 'base')} | {_cell(row, 'novel')} | {_cell(row, 'hm')} |")
    return lines + [""] + not_applicable_line(block, label) + target_lines(block["checks"]) + [""]


def target_lines(check: dict[str, object]) -> list[str]:
    lines = ["| repaired with | HM − fine-tuned | HM − WiSE-FT | base − fine-tuned | target met |",
             "|---|---|---|---|---|"]
    for method, row in check["repaired"].items():
        lines.append(f"| {method.removeprefix('repaired ').strip('()')} | {_signed(row['hm_minus_finetuned'])} | "
                     f"{_signed(row['hm_minus_wise_ft'])} | {_signed(row['base_minus_finetuned'])} | "
                     f"{'yes' if row['target_met'] else 'no'} |")
    return lines


def shifted_markdown(bench: dict[str, object], suite: str) -> list[str]:
    """The domain-shift or corruption suite: in-distribution, each shifted set, their mean and the HM."""
    _, label, _, _, first = next(entry for entry in SUITES if entry[0] == suite)
    intro = {"domain": "Fine-tuned on PACS photos; tested on photos (ID) and on the art_painting, cartoon and "
                       "sketch domains; 'shifted' is their mean and HM combines ID and shifted. WiSE-FT's alpha "
                       "was chosen on validation images of all four domains.",
             "robustness": "In-distribution (ID) test accuracy and accuracy under each corruption; 'shifted' is "
                           "their mean and HM combines ID and shifted. WiSE-FT's alpha was chosen on corrupted "
                           "validation images."}[suite]
    lines = [f"### {label[0].upper()}{label[1:]}", "", intro, ""]
    for dataset, kind, block in blocks(bench, suite):
        summary = block["summary"]
        sets = sorted({key.split(":", 1)[1].rsplit("_", 1)[0]
                       for row in summary.values() for key in row if key.startswith("novel_sets:")})
        lines += [f"**{dataset}, {kind_title(kind)}**: {phenomenon_line(block, 'shifted', first)}", "",
                  "| method | ID | shifted | HM | " + " | ".join(sets) + " |",
                  "|---|---|---|---|" + "---|" * len(sets)]
        for method, row in ordered(summary):
            per = " | ".join(_cell(row, f"novel_sets:{name}") for name in sets)
            name = method + _alpha(block["per_seed"], method)
            lines.append(f"| {name} | {_cell(row, 'base')} | {_cell(row, 'shifted')} | {_cell(row, 'hm')} | "
                         f"{per} |")
        lines += ["", *not_applicable_line(block, kind_label(kind, bench["plan"])), *target_lines(block["checks"]), ""]
    return lines


PROMPT_KINDS_BASELINES = ("wise-ft", "ensemble", "weight-ensemble")


def prompt_kinds_markdown(prompt: dict[str, object], bench: dict[str, object] | None) -> str:
    """CoCoOp and MaPLe's text half on the base-to-novel tasks (``results/prompt-kinds.json``), next to the main
    run's CoOp on the same dataset: HM per method, then each task's full table."""
    plan = prompt["plan"]
    seeds = ("seeds " if len(plan["seeds"]) > 1 else "seed ") + ", ".join(map(str, plan["seeds"]))
    lines = ["## Prompt kinds beyond CoOp", "",
             f"CoCoOp and MaPLe's text half, fine-tuned and repaired as the other kinds are ({seeds}; "
             "source: `benchmarks/results/prompt-kinds.json`), beside CoOp from the main run above (same protocol "
             "and seeds, where it ran). "
             "`repaired (default)` is the bare command (each kind's declared defaults). The proxy's image tower is "
             "a CNN (EfficientNet-Lite0), which has no token sequence for MaPLe's projected image prompts: **MaPLe's "
             "vision half (`proj`, `compound_prompt_projections`) could not be measured**; its text half (the "
             "context and the deep text prompts) is, with the image tower frozen. In the proxy's bidirectional text "
             "tower the deep prompts have no zero-shot values, so WiSE-FT and the surrogates that need a zero-shot "
             "point do not apply to it (each task says which).", "",
             "Fine-tuning protocol (plain SGD from the kind's initialisation):", "",
             "| kind | schedule | lr | batch | shots | lam_zs per surrogate | lam_lmc |",
             "|---|---|---|---|---|---|---|", *protocol_rows(plan), ""]
    lines += defaults_table(prompt)
    columns = ("zero-shot", "fine-tuned", "repaired (default)", *PROMPT_KINDS_BASELINES)
    lines += ["HM in % (mean ± standard deviation over seeds; n/a: not measured or not applicable):", "",
              "| dataset | kind | seeds | forgets? | " + " | ".join(columns) + " |",
              "|---|---|---|---|" + "---|" * len(columns)]
    rows = [(dataset, kind_label(kind, plan), block) for dataset, kind, block in blocks(prompt, "base_to_novel")]
    main = {dataset: block for dataset, kind, block in (blocks(bench, "base_to_novel") if bench else ())
            if kind == "coop"}
    for dataset in dict.fromkeys(dataset for dataset, _, _ in rows):
        table = ([(dataset, f"{kind_title('coop')} (main run)", main[dataset])] if dataset in main else []) + [
            row for row in rows if row[0] == dataset]
        for name, label, block in table:
            summary = block["summary"]
            cells = [_cell(summary[column], "hm") if column in summary else "n/a" for column in columns]
            forgets = "yes" if block["checks"]["phenomenon"] else "no"
            lines.append(f"| {name} | {label} | {len(block['per_seed'])} | {forgets} | " + " | ".join(cells) + " |")
    lines.append("")
    for dataset, label, block in rows:
        lines += base_to_novel_block(dataset, label, block)
    return "\n".join(lines) + "\n"


def bench_markdown(bench: dict[str, object], extra: list[dict[str, object]] = ()) -> str:
    plan, proxy = bench["plan"], bench.get("proxy")
    backbone = "the proxy CLIP" if proxy else bench["backbone"]["model"]
    lines = ["## Repair benchmark", "",
             "**Every task's headline repair row, `repaired (default)`, is what a user's bare command runs:** "
             "`mergetune repair FT --data DIR --out OUT` with no schedule, surrogate or `lam_zs` given (each kind's "
             "declared defaults, below; chosen as `benchmarks/DEFAULTS.md` says). Hand-set schedules only fine-tune "
             "(to create the forgetting) and run the labelled comparison rows (`repaired (NAME:LAM@...)`), which a "
             "user reproduces only by passing those options.", "",
             f"Backbone: {backbone}" +
             f"; downstream style `{plan['style']}`; seeds {', '.join(map(str, plan['seeds']))}; "
             f"images per class: {_sizes(plan['sizes'])}; {bench['environment']['cpus']} CPU cores, "
             f"torch {bench['environment']['torch']}; git {(bench['environment']['git_commit'] or 'unknown')[:7]}; "
             f"wall time {bench['wall_s'] / 60:.0f} min (less when mergetune's feature cache already held "
             "the same images encoded by the same encoder). " + provenance_text(bench)
             + stale_defaults_text(bench.get("defaults"))
             + ("**This run stopped before its end: only the tasks below were measured.** "
                if bench.get("complete") is False else "") +
             "Source: `benchmarks/results/latest.json`; chart: `benchmarks/results/hm.png`.", "",
             "Fine-tuning protocol per kind (plain SGD from zero-shot: what makes the forgetting; the comparison rows "
             "start from it for what their names leave unset):", "",
             "| kind | schedule | lr | batch | shots | lam_zs per surrogate | lam_lmc |", "|---|---|---|---|---|---|---|"]
    lines += protocol_rows(plan) + [""]
    lines += defaults_table(bench)
    if proxy:
        lines += ["Proxy CLIP zero-shot (clean images, one template): " + ", ".join(
            f"{name} {value:.1f}" for name, value in proxy["zero_shot"].items())
            + f"; heads aligned in {proxy['stats']['train_s'] / 60:.1f} min.", ""]
    left_out = plan.get("left_out") or []
    if left_out:
        lines += ["Left out for cost (`--include-left-out` runs them): " +
                  ", ".join(f"{kind_title(kind)} on {where}" for where, kind in left_out) + ".", ""]
    lines += [phenomenon_count(bench), "", "HM in % (mean over seeds); the best repair of each task in bold:", ""]
    lines += summary_markdown(bench) + ["", "![HM per method](results/hm.png)", ""]
    lines += defaults_markdown(bench, extra)
    lines += base_to_novel_markdown(bench) + shifted_markdown(bench, "domain") + shifted_markdown(bench, "robustness")
    return "\n".join(lines) + "\n"


def _cpu_text(cpu: dict[str, object] | None) -> str:
    cpu = cpu or {}
    return " ".join(str(part) for part in (cpu.get("model_name"), cpu.get("family") and f"family {cpu['family']}",
                                           cpu.get("model") and f"model {cpu['model']}") if part) or "an unrecorded CPU"


def stale_defaults_text(recorded: dict[str, object] | None) -> str:
    """A bold warning naming the kinds whose "default" rows ran other defaults than the code declares now (a
    default changed after the run): those rows are not what the bare command gives today. '' when none."""
    from benchmarks.run import declared_defaults

    declared = declared_defaults()
    stale = sorted(kind for kind, defaults in (recorded or {}).items() if kind in declared and defaults != declared[kind])
    if not stale:
        return ""
    def text(defaults: dict[str, object]) -> str:
        return f"`{defaults['surrogate']} {defaults['lam_zs']:g}`"
    return ("**Stale rows: " + "; ".join(f"{kind_title(kind)}'s default rows ran {text(recorded[kind])}, the bare command "
                                           f"now runs {text(declared[kind])}" for kind in stale)
            + " (rerun with `--resume`: only those kinds' blocks run again).** ")


def provenance_text(bench: dict[str, object]) -> str:
    """Which run each block came from, where a resumed run kept another run's blocks (see ``run.kept_blocks``);
    '' when every block is this run's own."""
    from benchmarks.run import provenance

    own = provenance(bench)
    runs = _group_by_run((f"{dataset} {kind_title(kind)}", block.get("ran") or own)
                         for _, _, _, dataset, kind, block in all_blocks(bench))
    return _mixed_runs_text(runs, "Blocks", "; the wall time is this run's blocks")


def _group_by_run(blocks: Iterable[tuple[str, dict[str, object]]]) -> dict[str, list[str]]:
    """Block titles grouped by the run they came from (date, commit, processor)."""
    runs: dict[str, list[str]] = {}
    for title, ran in blocks:
        text = (f"{(ran.get('created') or 'unknown')[:10]}, git {(ran.get('git_commit') or 'unknown')[:7]}, on "
                f"{_cpu_text(ran.get('cpu'))}")
        runs.setdefault(text, []).append(title)
    return runs


def _mixed_runs_text(runs: dict[str, list[str]], what: str, aside: str = "") -> str:
    """The sentence naming each run's blocks; '' when they all come from one run."""
    if len(runs) < 2:
        return ""
    return (f"**{what} from more than one run** (a resume reran the kinds whose defaults changed; numbers are "
            f"bit-reproducible per processor model only{aside}): " +
            "; ".join(f"{', '.join(tasks)}: {text}" for text, tasks in runs.items()) + ". ")


def holdout_provenance_text(holdout: dict[str, object]) -> str:
    """Which run each hold-out task's seeds came from, where a resumed hold-out kept another run's tasks."""
    runs = _group_by_run((task["title"], task["confirm"].get("ran") or {}) for task in holdout.get("tasks", [])
                         if task.get("confirm"))
    return _mixed_runs_text(runs, "Tasks")


def holdout_markdown(holdout: dict[str, object]) -> str:
    from benchmarks.holdout import markdown

    rule = holdout["rule"]
    confirm, choose = holdout["split"]["confirm"], holdout["split"]["choose"]
    lines = ["## Hold-out: the bare default on seeds no choice saw", "",
             f"HM (mean over seeds {', '.join(map(str, confirm['seeds']))}, **test** splits; "
             f"`{confirm['run']}`) of the bare default repair and the cheap baselines; the validation figures in the "
             f"last column come from seeds {', '.join(map(str, choose['seeds'] or []))} (`{choose['run']}`). Goals: "
             f"on every task {rule['every_task']}; where fine-tuning forgets, {rule['forgetting_tasks']}. "
             f"Every goal met: **{'yes' if holdout['all_met'] else 'no'}**. " + stale_defaults_text(holdout.get("defaults"))
             + holdout_provenance_text(holdout),
             ""]
    return "\n".join(lines + markdown(holdout)) + "\n"


def results_markdown(bench: dict[str, object] | None, speed: dict[str, object] | None,
                     extra: list[dict[str, object]] = (), holdout: dict[str, object] | None = None,
                     prompt_kinds: dict[str, object] | None = None) -> str:
    from benchmarks.speed import speed_markdown

    parts = ["# Benchmark results", ""]
    if bench:
        parts.append(bench_markdown(bench, extra))
    if holdout:
        parts.append(holdout_markdown(holdout))
    if prompt_kinds:
        parts.append(prompt_kinds_markdown(prompt_kinds, bench))
    if speed:
        parts.append(speed_markdown(speed))
    return "\n".join(parts)


def hm_chart(bench: dict[str, object], path: Path) -> None:
    """One panel per (suite, dataset, kind): HM per method, mean with the seeds' standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{dataset} {kind_title(kind)}", block["summary"])
              for dataset, kind, block in blocks(bench, "base_to_novel")]
    panels += [(f"{dataset} {kind_title(kind)}\n({'photo x domains' if suite == 'domain' else 'ID x corrupted'})",
                block["summary"]) for suite in ("domain", "robustness") for dataset, kind, block in blocks(bench, suite)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, (title, summary) in zip(axes.flat, panels):
        methods = [m for m, row in ordered(summary) if row.get("hm_mean") is not None]
        means = [summary[m]["hm_mean"] for m in methods]
        errors = [summary[m]["hm_std"] or 0 for m in methods]
        colours = ["#999999" if m == "zero-shot" else "#d62728" if m == "fine-tuned" else
                   "#2ca02c" if m.startswith("repaired") else "#1f77b4" for m in methods]
        axis.bar(range(len(methods)), means, yerr=errors, color=colours, capsize=3)
        axis.set_xticks(range(len(methods)), [m.replace("repaired ", "rep. ") for m in methods], rotation=40,
                        ha="right", fontsize=8)
        low = min(means) - 5
        axis.set_ylim(max(0, low), max(means) + 3)
        axis.set_title(title, fontsize=9)
        axis.set_ylabel("HM (%)", fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _load(path: Path) -> dict[str, object] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_results(markdown: Path = MARKDOWN, bench_json: Path = RESULTS / "latest.json",
                  speed_json: Path = RESULTS / "speed.json", chart: Path = CHART) -> None:
    """RESULTS.md from whichever result files exist (and the chart from the repair benchmark)."""
    bench, speed = _load(bench_json), _load(speed_json)
    holdout = _load(bench_json.parent / "holdout-seeds.json")
    prompt_kinds = _load(bench_json.parent / "prompt-kinds.json")
    extra = protocol_schedule_runs([json.loads(path.read_text())
                                    for path in sorted(bench_json.parent.glob("surrogates-*.json"))])
    markdown.write_text(results_markdown(bench, speed, extra, holdout, prompt_kinds))
    if bench:
        hm_chart(bench, chart)


if __name__ == "__main__":
    write_results()
    print(f"wrote {MARKDOWN} and {CHART}")
