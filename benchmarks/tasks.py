"""Downstream tasks as plain image folders, so the suite drives mergetune exactly as a user does.

A task's images are written once under the work directory (PNG, with the task's style and any
corruption applied) and reused while the split, style and shift code are unchanged.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.shifts import CORRUPTIONS, STYLES, apply
from benchmarks.splits import PACS_SHIFTED, dataset_parts

TASKS_VERSION = 1
BASE_CLASSES = {"cifar10": 5, "flowers5": 3, "caltech101": 50, "gtsrb": 22,  # base = the first N classes
                "tiny_imagenet": 100}


@dataclass(frozen=True)
class Sizes:
    """How many images per class each part keeps (None = all); --quick shrinks these."""

    val: int | None = None
    test: int | None = None
    shifted_test: int | None = 300  # robustness: images per class under each corruption

    def tag(self) -> str:
        """A folder name per size set, so runs of different sizes never overwrite each other's images."""
        return "-".join(f"{part}{'all' if n is None else n}" for part, n in
                        (("val", self.val), ("test", self.test), ("shifted", self.shifted_test)))


@dataclass(frozen=True)
class BaseToNovelTask:
    dataset: str
    style: str
    base_classes: list[str]
    novel_classes: list[str]
    train: Path  # few-shot pool of the base classes
    val_base: Path
    val_novel: Path
    test_base: Path
    test_novel: Path


@dataclass(frozen=True)
class RobustnessTask:
    dataset: str
    style: str
    classes: list[str]
    train: Path
    val: Path
    test: Path
    val_shifted: list[Path] = field(default_factory=list)
    test_shifted: dict[str, Path] = field(default_factory=dict)  # corruption -> folder


def _limit(files: dict[str, list[Path]], classes: list[str], per_class: int | None) -> dict[str, list[Path]]:
    return {name: files[name][:per_class] if per_class else files[name] for name in classes}


def _render(job: tuple[Path, Path, tuple[str, ...]]) -> None:
    from PIL import Image

    source, target, shift_names = job
    shifts = [(name, STYLES.get(name) or CORRUPTIONS[name]) for name in shift_names]
    with Image.open(source) as image:
        apply(shifts, image.convert("RGB"), source.name).save(target)


def write_folder(target: Path, files: dict[str, list[Path]], shifts: tuple[str, ...], workers: int = 2) -> Path:
    """``target/<class>/<stem>.png`` for every file, shifted; skipped when already complete."""
    stamp = hashlib.sha256(json.dumps({"version": TASKS_VERSION, "shifts": shifts,
                                       "files": {k: [str(p) for p in v] for k, v in files.items()}},
                                      sort_keys=True).encode()).hexdigest()
    marker = target / ".complete"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    shutil.rmtree(target, ignore_errors=True)
    jobs = []
    for name, paths in files.items():
        (target / name).mkdir(parents=True)
        jobs += [(path, target / name / f"{path.stem}.png", shifts) for path in paths]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(_render, jobs, chunksize=64))
    marker.write_text(stamp)
    return target


def _style_shifts(style: str) -> tuple[str, ...]:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    return () if style == "none" else (style,)


def base_to_novel_task(data_root: Path, dataset: str, style: str, work: Path, sizes: Sizes) -> BaseToNovelTask:
    parts = dataset_parts(data_root, dataset)
    classes = list(parts["test"])  # the dataset's class order (folder name order for CIFAR-10, flowers5)
    base, novel = classes[:BASE_CLASSES[dataset]], classes[BASE_CLASSES[dataset]:]
    shifts = _style_shifts(style)
    root = work / f"{dataset}-{style}" / sizes.tag()
    return BaseToNovelTask(
        dataset, style, base, novel,
        train=write_folder(root / "train-base", _limit(parts["pool"], base, None), shifts),
        val_base=write_folder(root / "val-base", _limit(parts["val"], base, sizes.val), shifts),
        val_novel=write_folder(root / "val-novel", _limit(parts["val"], novel, sizes.val), shifts),
        test_base=write_folder(root / "test-base", _limit(parts["test"], base, sizes.test), shifts),
        test_novel=write_folder(root / "test-novel", _limit(parts["test"], novel, sizes.test), shifts),
    )


def robustness_task(data_root: Path, dataset: str, style: str, work: Path, sizes: Sizes) -> RobustnessTask:
    parts = dataset_parts(data_root, dataset)
    classes = list(parts["test"])
    shifts = _style_shifts(style)
    root = work / f"{dataset}-{style}" / sizes.tag()
    shifted_val = _limit(parts["val"], classes, sizes.val)
    shifted_test = _limit(parts["test"], classes, sizes.shifted_test)
    return RobustnessTask(
        dataset, style, classes,
        train=write_folder(root / "train-all", _limit(parts["pool"], classes, None), shifts),
        val=write_folder(root / "val-all", shifted_val, shifts),
        test=write_folder(root / "test-all", _limit(parts["test"], classes, sizes.test), shifts),
        val_shifted=[write_folder(root / f"val-{name}", shifted_val, (*shifts, name)) for name in CORRUPTIONS],
        test_shifted={name: write_folder(root / f"test-{name}", shifted_test, (*shifts, name))
                      for name in CORRUPTIONS},
    )


def domain_task(data_root: Path, work: Path, sizes: Sizes) -> RobustnessTask:
    """PACS: fit on photos of every class, test on photos and on the art, cartoon and sketch domains.

    The shifted domains' validation images (``splits.pacs_parts``) choose WiSE-FT's alpha; the
    task reuses :class:`RobustnessTask`, with domains where the corruption suite has corruptions.
    """
    parts = dataset_parts(data_root, "pacs")
    classes = list(parts["test"])
    root = work / "pacs-none" / sizes.tag()
    return RobustnessTask(
        "pacs", "none", classes,
        train=write_folder(root / "train-photo", _limit(parts["pool"], classes, None), ()),
        val=write_folder(root / "val-photo", _limit(parts["val"], classes, sizes.val), ()),
        test=write_folder(root / "test-photo", _limit(parts["test"], classes, sizes.test), ()),
        val_shifted=[write_folder(root / f"val-{domain}", _limit(parts[f"val_{domain}"], classes, sizes.val), ())
                     for domain in PACS_SHIFTED],
        test_shifted={domain: write_folder(root / f"test-{domain}",
                                           _limit(parts[f"test_{domain}"], classes, sizes.shifted_test), ())
                      for domain in PACS_SHIFTED},
    )
