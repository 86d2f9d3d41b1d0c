"""``mergetune demo``: forgetting and its repair on real photos, offline, in a few minutes.

It runs the whole workflow with the bare defaults on what ships inside the package: the pretrained
``mergetune-mini`` CLIP (:mod:`repair.model.mini`) and ten Caltech-101 classes at 48 px
(``repair/assets/caltech-demo``, CC BY 4.0; its SOURCE.md says what was taken and changed). Per kind:
fine-tune on the five base classes (the checkpoint that forgets), repair it, score zero-shot, fine-tuned,
repaired, WiSE-FT and the output ensemble on the base and novel test images (the baselines' settings chosen
on the validation images), draw the three paths and write the model card a push would upload.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repair.errors import OutputExistsError, UsageError
from repair.model.backbone import MINI_NAME, BackboneSpec, load_backbone
from repair.train.loop import StepReport
from repair.workflows.evaluate import evaluate
from repair.workflows.inputs import DataOptions
from repair.workflows.run import finetune, repair

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "caltech-demo"
DEMO_KINDS = ("coop", "clipfit")
BASELINES = ("wise-ft", "ensemble")
SEED = 0


@dataclass
class DemoRun:
    """One kind's demo: the eval report (zero-shot row first, then fine-tuned and repaired) and the files."""

    kind: str
    report: dict[str, Any]
    finetuned: Path
    repaired: Path
    path_png: Path | None
    card: Path
    seconds: float

    def rows(self) -> dict[str, dict[str, Any]]:
        """The report's rows by role: zero-shot, fine-tuned, repaired, and each baseline by name."""
        named = {}
        for row in self.report["models"]:
            if row["role"] == "baseline":
                named[row["name"]] = row
            elif row["role"] == "zero-shot":
                named["zero-shot"] = row
            else:
                named["fine-tuned" if Path(row["source"]["path"]).name == self.finetuned.name else "repaired"] = row
        return named

    def summary(self) -> str:
        """What happened, in numbers, in one line."""
        rows = self.rows()
        zero, tuned, fixed = rows["zero-shot"], rows["fine-tuned"], rows["repaired"]
        baselines = ", ".join(f"{name} {rows[name]['hm']:.1f}" for name in BASELINES if name in rows)
        return (f"{self.kind}: fine-tuning moved base {zero['base']:.1f} -> {tuned['base']:.1f} and novel "
                f"{zero['novel']:.1f} -> {tuned['novel']:.1f} (HM {zero['hm']:.1f} -> {tuned['hm']:.1f}); the repaired "
                f"file, same shape and cost, has base {fixed['base']:.1f}, novel {fixed['novel']:.1f}, HM "
                f"{fixed['hm']:.1f} ({fixed['hm'] - tuned['hm']:+.1f}); {baselines} ({self.seconds:.0f} s)")


def run_demo(workdir: Path, *, kinds: Sequence[str] = DEMO_KINDS[:1], force: bool = False,
             on_step: Callable[[StepReport], None] | None = None, say: Callable[[str], None] = print,
             images: Path = IMAGES) -> list[DemoRun]:
    """The demo for each of ``kinds``, its files under ``workdir``."""
    workdir = _work_folder(Path(workdir), force)
    unknown = [kind for kind in kinds if kind not in DEMO_KINDS]
    if unknown or not kinds:
        raise UsageError(f"the demo runs {' and '.join(DEMO_KINDS)}, not {', '.join(unknown) or 'nothing'}")
    say(f"loading {MINI_NAME} (the embedded pretrained CLIP; assembled into the cache on the first run)")
    backbone = load_backbone(BackboneSpec(model=MINI_NAME))
    options = DataOptions(shots=16, classnames_file=images / "classnames.json", cache_dir=workdir / "cache")
    return [_run_kind(kind, backbone, images, workdir, options, force, on_step, say) for kind in kinds]


def _run_kind(kind: str, backbone, images: Path, workdir: Path, options: DataOptions, force: bool,
              on_step: Callable[[StepReport], None] | None, say: Callable[[str], None]) -> DemoRun:
    from repair.workflows.hub import prepare_upload
    from repair.workflows.path import path_outputs

    started = time.perf_counter()
    train = images / "base-train"
    say(f"{kind}: fine-tuning on 16 photos of each of the 5 base classes (the checkpoint that forgets)")
    tuned = finetune(kind, train, workdir / f"{kind}-finetuned.safetensors", backbone=backbone, force=force,
                     data_options=options, on_step=on_step).path
    say(f"{kind}: repairing it with the defaults (mergetune repair FT --data base-train --out FIXED)")
    repaired = repair(tuned, train, workdir / f"{kind}-repaired.safetensors", backbone=backbone, force=force,
                      data_options=options, on_step=on_step)
    for note in repaired.notes:
        say(f"{kind}: note: {note}")
    fixed = repaired.path
    say(f"{kind}: scoring zero-shot, fine-tuned, repaired, WiSE-FT and the ensemble on the test photos")
    report = evaluate([tuned, fixed], images / "base-test", novel_dir=images / "novel-test", backbone=backbone,
                      data_options=DataOptions(shots=None, classnames_file=options.classnames_file,
                                               cache_dir=options.cache_dir),
                      baselines=list(BASELINES), val_dir=images / "base-val", val_novel_dir=images / "novel-val",
                      seed=SEED)
    report_file = workdir / f"{kind}-eval.json"
    _write_text(report_file, json.dumps(report, indent=1), force)
    png = _draw_path(path_outputs, tuned, fixed, images, workdir, kind, backbone, options, force)
    stage = workdir / f"{kind}-card"
    if force and stage.is_dir():  # the demo's own earlier card
        shutil.rmtree(stage)
    prepare_upload(fixed, stage, eval_report=report_file)
    return DemoRun(kind, report, tuned, fixed, png, stage / "README.md", time.perf_counter() - started)


def _draw_path(path_outputs, tuned: Path, fixed: Path, images: Path, workdir: Path, kind: str, backbone,
               options: DataOptions, force: bool) -> Path | None:
    """The three straight paths on the base test photos, as JSON and (with matplotlib) a PNG."""
    png = workdir / f"{kind}-path.png"
    try:
        import matplotlib  # noqa: F401 (the plot is optional: the 'mini' extra installs it)
    except ImportError:
        png = None
    path_outputs(tuned, fixed, images / "base-test", workdir / f"{kind}-path.json", png=png, force=force,
                 backbone=backbone, points=6, data_options=DataOptions(shots=None, classnames_file=options.classnames_file,
                                                                       cache_dir=options.cache_dir))
    return png


def _write_text(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force or another --workdir")
    path.write_text(text + "\n")


def _work_folder(workdir: Path, force: bool) -> Path:
    if workdir.exists() and not workdir.is_dir():
        raise OutputExistsError(f"{workdir}: a file, not a folder; pass another --workdir")
    if workdir.exists() and any(workdir.iterdir()) and not force:
        raise OutputExistsError(f"{workdir} exists and is not empty; pass --force or another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, a read-only place
        raise OutputExistsError(f"{workdir}: cannot create the work folder ({exc.strerror or type(exc).__name__})"
                                ) from None
    return workdir
