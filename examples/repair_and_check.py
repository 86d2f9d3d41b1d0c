"""Repair, evaluate, gate and publish through the Python API: the CI workflow, as a script.

    python examples/repair_and_check.py checkpoints/ft.safetensors data/ --repo my-org/clip-repaired

Runs offline with `--demo`: the embedded `mergetune-mini` CLIP and the Caltech-101 photos that ship with the
package (nothing is pushed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import repair
from repair.eval.gate import Thresholds, check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finetuned", type=Path, nargs="?")
    parser.add_argument("data", type=Path, nargs="?", help="folder with train/, test-base/, test-novel/")
    parser.add_argument("--repo", help="Hub repository to push to when the gate passes")
    parser.add_argument("--demo", action="store_true", help="run on mergetune-mini and the shipped Caltech-101 photos")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mergetune-example-"))
    # the backbone is loaded once and shared across the calls below
    if args.demo:
        model, finetuned, folders, options = demo_inputs(workdir)
    elif args.finetuned and args.data:
        model = repair.load_backbone(repair.BackboneSpec("ViT-B-16", "openai"))
        finetuned, options = args.finetuned, repair.DataOptions()
        folders = {name: args.data / name for name in ("train", "test-base", "test-novel")}
    else:
        parser.error("give FINETUNED and DATA, or --demo")

    outcome = repair.repair(finetuned, folders["train"], workdir / "repaired.safetensors", backbone=model,
                            objective=repair.Objective(),  # the kind's default surrogate and lam_zs
                            config=repair.TrainConfig(seed=0), data_options=options)  # the kind's default schedule
    print(f"repaired: {outcome.path} ({outcome.record.trainable_numbers} numbers, "
          f"{outcome.train_result.steps} steps)")
    for note in outcome.notes:  # e.g. a checkpoint no better than zero-shot on the data gets the zero-shot weights
        print(f"note: {note}")

    report = repair.evaluate([finetuned, outcome.path], folders["test-base"], novel_dir=folders["test-novel"],
                             backbone=model, baselines=True,
                             data_options=repair.DataOptions(shots=None, classnames_file=options.classnames_file))
    for row in report["models"]:
        print(f"{row['name']:>40}  base {row['base']:6.2f}  novel {row['novel'] or 0:6.2f}  HM {row['hm'] or 0:6.2f}")

    failures = check(report, Thresholds(min_hm=0.0 if args.demo else 72.0, max_forgetting=100.0 if args.demo else 2.0))
    if failures:
        print("gate failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 11
    (workdir / "eval.json").write_text(json.dumps(report))
    if args.repo and not args.demo:
        from repair.workflows.hub import push

        result = push(outcome.path, args.repo, eval_report=workdir / "eval.json")
        print(f"pushed to {result.repo_id}: {result.commit_url}")
    return 0


def demo_inputs(workdir: Path):
    """The package's embedded CLIP, its Caltech-101 photos, and a CoOp checkpoint fine-tuned on the base classes."""
    from repair.workflows.demo import IMAGES

    model = repair.load_backbone(repair.BackboneSpec(model="mergetune-mini"))
    options = repair.DataOptions(shots=16, classnames_file=IMAGES / "classnames.json")
    folders = {"train": IMAGES / "base-train", "test-base": IMAGES / "base-test", "test-novel": IMAGES / "novel-test"}
    finetuned = repair.finetune("coop", folders["train"], workdir / "ft.safetensors", backbone=model,
                                data_options=options).path
    return model, finetuned, folders, options


if __name__ == "__main__":
    sys.exit(main())
