"""`mergetune demo`: fine-tune, repair and evaluate end to end, offline, in seconds.

It uses the built-in tiny CLIP with random weights and generated colour images, so it
shows the workflow and the files it writes, not the method's benefit (see benchmarks/).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from repair.errors import OutputExistsError
from repair.model.backbone import BackboneSpec
from repair.synthetic import make_image_folder, save_tiny_backbone
from repair.train.loop import StepReport, TrainConfig
from repair.train.objective import Objective
from repair.workflows.evaluate import evaluate
from repair.workflows.inputs import DataOptions
from repair.workflows.run import finetune, repair

READING_THE_DEMO = (
    "The tiny CLIP here has random weights, so its zero-shot accuracy is chance and its 'most forgotten' "
    "classes are noise: the demo shows the workflow and the files it writes, not the method's benefit. "
    "Look at the files in the work folder (ft.safetensors, fixed.safetensors and their metadata: "
    "`mergetune inspect`), and see benchmarks/RESULTS.md for what repair does on a trained CLIP.")
BASE_CLASSES = ("blue", "green", "red", "yellow")
NOVEL_CLASSES = ("cyan", "orange", "pink", "purple")


def run_demo(workdir: Path, *, force: bool = False, on_step: Callable[[StepReport], None] | None = None,
             say: Callable[[str], None] = print) -> dict[str, object]:
    """The whole workflow on a tiny random CLIP and generated images, written under ``workdir``."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise OutputExistsError(f"{workdir}: a file, not a folder; pass another --workdir")
    if workdir.exists() and any(workdir.iterdir()) and not force:
        raise OutputExistsError(f"{workdir} exists and is not empty; pass --force or another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, a read-only place
        raise OutputExistsError(f"{workdir}: cannot create the work folder ({exc.strerror or type(exc).__name__})"
                                ) from None
    say(f"1/4 tiny CLIP and generated images in {workdir}")
    spec = BackboneSpec(model=save_tiny_backbone(workdir / "tiny-clip"))
    train_dir = make_image_folder(workdir / "images" / "base-train", BASE_CLASSES, 16, seed=1)
    base_test = make_image_folder(workdir / "images" / "base-test", BASE_CLASSES, 24, seed=2)
    novel_test = make_image_folder(workdir / "images" / "novel-test", NOVEL_CLASSES, 24, seed=3)
    data_options = DataOptions(shots=16, cache_dir=workdir / "cache")
    say("2/4 fine-tuning a CoOp prompt on the base classes (the checkpoint that forgets)")
    finetuned = finetune("coop", train_dir, workdir / "ft.safetensors", backbone=spec, force=True,
                         config=TrainConfig(epochs=30, optimizer="sgd", lr=0.05, batch_size=32), data_options=data_options,
                         on_step=on_step)
    say("3/4 repairing it with MergeTune")
    repair(finetuned.path, train_dir, workdir / "fixed.safetensors", backbone=spec, force=True,
           objective=Objective(lam_zs=1.0, lam_lmc=1.0), config=TrainConfig(epochs=30, optimizer="sgd", lr=0.05, batch_size=32),
           data_options=data_options, on_step=on_step)
    say("4/4 evaluating zero-shot, fine-tuned and repaired on base and novel classes")
    return evaluate([workdir / "ft.safetensors", workdir / "fixed.safetensors"], base_test, novel_dir=novel_test,
                    backbone=spec, data_options=DataOptions(shots=None, cache_dir=workdir / "cache"))
