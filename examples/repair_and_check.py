"""Repair, evaluate, gate and publish through the Python API: the CI workflow, as a script.

    python examples/repair_and_check.py checkpoints/ft.safetensors data/ --repo my-org/clip-repaired

Runs offline on the built-in tiny model with `--demo` (generated images; nothing is pushed).
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
    parser.add_argument("--demo", action="store_true", help="run on the built-in tiny model and generated images")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mergetune-example-"))
    if args.demo:
        backbone, finetuned, data = demo_inputs(workdir)
    elif args.finetuned and args.data:
        backbone, finetuned, data = repair.BackboneSpec("ViT-B-16", "openai"), args.finetuned, args.data
    else:
        parser.error("give FINETUNED and DATA, or --demo")

    model = repair.load_backbone(backbone)  # load once, share across the calls below
    outcome = repair.repair(finetuned, data / "train", workdir / "repaired.safetensors", backbone=model,
                            objective=repair.Objective(),  # the kind's default surrogate and lam_zs
                            config=repair.TrainConfig(seed=0))  # the kind's default schedule
    print(f"repaired: {outcome.path} ({outcome.record.trainable_numbers} numbers, "
          f"{outcome.train_result.steps} steps)")

    report = repair.evaluate([finetuned, outcome.path], data / "test-base", novel_dir=data / "test-novel",
                             backbone=model, baselines=True)
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
    from repair.synthetic import make_image_folder, save_tiny_backbone

    spec = repair.BackboneSpec(model=save_tiny_backbone(workdir / "tiny-clip"))
    data = workdir / "data"
    make_image_folder(data / "train", ("blue", "green", "red", "yellow"), 16, seed=1)
    make_image_folder(data / "test-base", ("blue", "green", "red", "yellow"), 16, seed=2)
    make_image_folder(data / "test-novel", ("cyan", "orange", "pink", "purple"), 16, seed=3)
    finetuned = repair.finetune("coop", data / "train", workdir / "ft.safetensors", backbone=spec,
                                config=repair.TrainConfig(epochs=20, optimizer="sgd", lr=0.05, batch_size=32)).path
    return spec, finetuned, data


if __name__ == "__main__":
    sys.exit(main())
