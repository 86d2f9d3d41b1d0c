"""Every split the benchmark uses, in one place, so pretraining never sees an evaluation image.

Each function returns ``{part: {class folder: [files]}}``; files are sorted by name before any
seeded choice, so a split depends only on the folder's contents and the seed written here.

- CIFAR-10: ``train/`` files 0-399 of each class (sorted) pretrain the proxy; 400-449 are the
  downstream few-shot pool; 450-499 the validation split; ``test/`` (1,000 per class) is the test set.
- flowers5 (no official split): per class, shuffled with ``random.Random(0)``: 40 % pretrain,
  20 % few-shot pool, 10 % validation, 30 % test.
- Caltech-101 and GTSRB (not in pretraining): ``train/`` files 0-15 (Caltech, 20 per class) or
  0-39 (GTSRB, 50 per class) are the few-shot pool, the rest of ``train/`` the validation split,
  ``test/`` the test set. Classes keep the dataset's index order and are named by its
  ``classes.json`` ("/" becomes "-", as a folder name cannot hold it).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from repair.data.folders import IMAGE_EXTENSIONS

SPLIT_SEED = 0
FLOWERS_FRACTIONS = {"pretrain": 0.4, "pool": 0.2, "val": 0.1, "test": 0.3}
CIFAR_TRAIN_PARTS = {"pretrain": (0, 400), "pool": (400, 450), "val": (450, 500)}

Parts = dict[str, dict[str, list[Path]]]


def images_in(folder: Path) -> list[Path]:
    """Image files of one class folder, sorted by name."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."))


def class_folders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def cifar10_parts(root: Path) -> Parts:
    parts: Parts = {name: {} for name in (*CIFAR_TRAIN_PARTS, "test")}
    for folder in class_folders(root / "train"):
        files = images_in(folder)
        for part, (start, stop) in CIFAR_TRAIN_PARTS.items():
            parts[part][folder.name] = files[start:stop]
    for folder in class_folders(root / "test"):
        parts["test"][folder.name] = images_in(folder)
    return parts


def flowers5_parts(root: Path) -> Parts:
    parts: Parts = {name: {} for name in FLOWERS_FRACTIONS}
    for folder in class_folders(root):
        files = images_in(folder)
        random.Random(f"{SPLIT_SEED}:{folder.name}").shuffle(files)
        start = 0
        for index, (part, fraction) in enumerate(FLOWERS_FRACTIONS.items()):
            stop = len(files) if index == len(FLOWERS_FRACTIONS) - 1 else start + round(fraction * len(files))
            parts[part][folder.name] = sorted(files[start:stop])
            start = stop
    return parts


def _named_train_test_parts(root: Path, pool_size: int) -> Parts:
    parts: Parts = {"pool": {}, "val": {}, "test": {}}
    for entry in json.loads((root / "classes.json").read_text()):
        name = entry["name"].replace("/", "-")
        train = images_in(root / "train" / entry["folder"])
        parts["pool"][name], parts["val"][name] = train[:pool_size], train[pool_size:]
        parts["test"][name] = images_in(root / "test" / entry["folder"])
    return parts


def caltech101_parts(root: Path) -> Parts:
    return _named_train_test_parts(root, 16)


def gtsrb_parts(root: Path) -> Parts:
    return _named_train_test_parts(root, 40)


DATASET_PARTS = {"cifar10": cifar10_parts, "flowers5": flowers5_parts, "caltech101": caltech101_parts,
                 "gtsrb": gtsrb_parts}


def missing_datasets(data_root: Path, names: list[str] | tuple[str, ...]) -> list[str]:
    """The named dataset folders that ``data_root`` lacks, so a script can refuse in one line."""
    return [name for name in names if not (data_root / name).is_dir()]


def dataset_parts(data_root: Path, name: str) -> Parts:
    return DATASET_PARTS[name](data_root / name)
