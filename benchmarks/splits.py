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
SPLITS_VERSION = 2  # bump when a split changes: the towers proxy's card and fingerprint follow
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




def missing_datasets(data_root: Path, names: list[str] | tuple[str, ...]) -> list[str]:
    """The named dataset folders that ``data_root`` lacks, so a script can refuse in one line."""
    return [name for name in names if not (data_root / name).is_dir()]


def dataset_parts(data_root: Path, name: str) -> Parts:
    return DATASET_PARTS[name](data_root / name)


# --------------------------------------------------------------------------- proxy v2 (benchmarks/towers.py)
#
# Base-to-novel: classes sorted by label, base = the first ceil(n/2). Tiny-ImageNet's ``train/``
# (50 per class, sorted by file name) gives files 0-15 to the few-shot pool, 16-23 to validation and
# 24-49 to the proxy's alignment ("pretrain"); ``val/`` is the test set. PACS: the photo domain
# (60 per class, sorted) gives 0-15 to the pool, 16-23 to validation, 24-59 to the photo test set;
# each other domain gives files 0-9 to its validation split and 10-59 to its test set. No PACS image
# is ever used for alignment.

TINY_TRAIN_PARTS = {"pool": (0, 16), "val": (16, 24), "pretrain": (24, 50)}
PACS_PHOTO_PARTS = {"pool": (0, 16), "val": (16, 24), "test": (24, 60)}
PACS_SHIFTED = ("art_painting", "cartoon", "sketch")
PACS_SHIFTED_VAL = 10  # files 0-9 of each class of a shifted domain validate, the rest test

# ImageNet-1k indices (sorted-wnid order) that are the same concept as, or a kind of, a novel class
# of a benchmark dataset, where the last-word name rule of ``novel_conflicts`` does not see it.
# Images of these classes are never aligned on (their names stay in the distillation's label space:
# see ``towers.TowersConfig.distill_all_names``).
IMAGENET_HYPONYMS_OF_NOVEL = {
    "cifar10:dog": list(range(151, 269)),  # the 118 dog breeds
    "cifar10:frog": [30, 31, 32],
    "cifar10:horse": [339, 603],  # sorrel; horse cart (the picture is mostly a horse)
    "cifar10:ship": [403, 472, 484, 510, 554, 576, 625, 628, 693, 724, 780, 814, 833, 871, 913, 914],
    "cifar10:truck": [555, 569, 675, 717, 734, 864, 867],
    "caltech101:wild cat": [286, 287],  # cougar, lynx (WordNet: kinds of wildcat)
    "caltech101:kangaroo": [104],  # wallaby
    "caltech101:rooster": [7],  # cock
    "caltech101:nautilus": [117],
    "caltech101:lobster": [122, 123],
    "caltech101:panda": [387, 388],
    "caltech101:laptop": [620, 681],
    "caltech101:lamp": [846, 619],  # table lamp, lampshade
    "caltech101:watch": [531, 826],  # digital watch, stopwatch
}


def base_novel(names: list[str]) -> tuple[list[str], list[str]]:
    """Split class names (already in label order) into base = first ceil(n/2) and novel = the rest."""
    cut = (len(names) + 1) // 2
    return names[:cut], names[cut:]


def tiny_imagenet_classes(root: Path) -> list[dict]:
    """``classes.json`` entries in label (sorted-wnid) order."""
    return sorted(json.loads((root / "classes.json").read_text()), key=lambda entry: entry["index"])


def tiny_imagenet_parts(root: Path) -> Parts:
    """Tiny-ImageNet parts keyed by the readable class name (first synonym), in label order."""
    parts: Parts = {name: {} for name in (*TINY_TRAIN_PARTS, "test")}
    for entry in tiny_imagenet_classes(root):
        files = images_in(root / "train" / entry["wnid"])
        for part, (start, stop) in TINY_TRAIN_PARTS.items():
            parts[part][entry["name"]] = files[start:stop]
        parts["test"][entry["name"]] = images_in(root / "val" / entry["wnid"])
    return parts


def pacs_parts(root: Path) -> Parts:
    """PACS: pool/val/test from photos; ``val_<domain>`` / ``test_<domain>`` from each shifted domain."""
    shifted = [f"{part}_{domain}" for domain in PACS_SHIFTED for part in ("val", "test")]
    parts: Parts = {name: {} for name in (*PACS_PHOTO_PARTS, *shifted)}
    for folder in class_folders(root / "photo"):
        files = images_in(folder)
        for part, (start, stop) in PACS_PHOTO_PARTS.items():
            parts[part][folder.name] = files[start:stop]
    for domain in PACS_SHIFTED:
        for folder in class_folders(root / domain):
            files = images_in(folder)
            parts[f"val_{domain}"][folder.name] = files[:PACS_SHIFTED_VAL]
            parts[f"test_{domain}"][folder.name] = files[PACS_SHIFTED_VAL:]
    return parts


def _words(text: str) -> list[str]:
    return [word for word in text.lower().replace("-", " ").replace("_", " ").split() if word]


def _names_match(candidate: str, novel: str) -> bool:
    """Same concept or a kind of it by the last-word rule: 'tailed frog' is a 'frog', 'frog' a 'frogs'."""
    cand, nov = _words(candidate), _words(novel)
    if not cand or not nov:
        return False
    singular = lambda words: [w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words]  # noqa: E731
    cand, nov = singular(cand), singular(nov)
    return cand[-len(nov):] == nov


def novel_class_names(data_root: Path) -> dict[str, list[str]]:
    """The novel class names of each base-to-novel dataset, in label order."""
    cifar = sorted(folder.name for folder in class_folders(data_root / "cifar10" / "train"))
    tiny = [entry["name"] for entry in tiny_imagenet_classes(data_root / "tiny_imagenet")]
    caltech = list(caltech101_parts(data_root / "caltech101")["test"])
    return {"cifar10": base_novel(cifar)[1], "tiny_imagenet": base_novel(tiny)[1],
            "caltech101": base_novel(caltech)[1]}


def novel_conflicts(data_root: Path) -> dict[int, str]:
    """ImageNet-1k indices that must stay out of alignment, each with the novel class it collides with.

    An index is out when it is a Tiny-ImageNet novel class, when one of its names (open_clip's
    ImageNet class name, the Tiny-ImageNet synonyms, the ``imagenet_samples`` name) is the same as or
    ends in a novel class name of any dataset, or when ``IMAGENET_HYPONYMS_OF_NOVEL`` lists it.
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    imagenet = json.loads((data_root / "imagenet_samples" / "classes.json").read_text())
    index_of = {entry["wnid"]: entry["index"] for entry in imagenet}
    names: dict[int, list[str]] = {entry["index"]: [entry["name"], IMAGENET_CLASSNAMES[entry["index"]]]
                                   for entry in imagenet}
    tiny = tiny_imagenet_classes(data_root / "tiny_imagenet")
    for entry in tiny:
        names[index_of[entry["wnid"]]] += [w.strip() for w in entry["words"].split(",") if w.strip()]
    conflicts: dict[int, str] = {}
    for entry in base_novel(tiny)[1]:
        conflicts[index_of[entry["wnid"]]] = f"tiny_imagenet:{entry['name']}"
    for dataset, novel in novel_class_names(data_root).items():
        for index, synonyms in names.items():
            for name in novel:
                if index not in conflicts and any(_names_match(s, name) for s in synonyms):
                    conflicts[index] = f"{dataset}:{name}"
    for reason, indices in IMAGENET_HYPONYMS_OF_NOVEL.items():
        for index in indices:
            conflicts.setdefault(index, reason)
    return conflicts


def alignment_files(data_root: Path) -> dict[str, dict[str, list[Path]]]:
    """What the towers proxy aligns on, and nothing else: ``{"contrastive": ..., "distill": ...}``.

    - contrastive (captions name the class): CIFAR-10 base classes, their ``pretrain`` files; the
      Tiny-ImageNet base classes, their ``pretrain`` files (24-49); minus every class in
      ``novel_conflicts`` and every CIFAR base class whose name collides with a novel class.
    - distill (ImageNet softmax only): the same images, plus the ``imagenet_samples`` image of every
      ImageNet class outside ``novel_conflicts`` that is not a Tiny-ImageNet class (a Tiny class's
      ImageNet picture could be one of its val images). Caltech-101 and PACS give nothing: all their
      images are pool, validation or test.
    """
    conflicts = novel_conflicts(data_root)
    novel = [name for names in novel_class_names(data_root).values() for name in names]
    imagenet = json.loads((data_root / "imagenet_samples" / "classes.json").read_text())
    index_of = {entry["wnid"]: entry["index"] for entry in imagenet}
    contrastive: dict[str, list[Path]] = {}
    cifar_base = base_novel(sorted(cifar10_parts(data_root / "cifar10")["pretrain"]))[0]
    cifar = cifar10_parts(data_root / "cifar10")["pretrain"]
    for name in cifar_base:
        if not any(_names_match(name, other) for other in novel):
            contrastive[name] = cifar[name]
    tiny = tiny_imagenet_classes(data_root / "tiny_imagenet")
    tiny_pretrain = tiny_imagenet_parts(data_root / "tiny_imagenet")["pretrain"]
    for entry in base_novel(tiny)[0]:
        if index_of[entry["wnid"]] not in conflicts:
            contrastive[entry["name"]] = tiny_pretrain[entry["name"]]
    tiny_wnids = {entry["wnid"] for entry in tiny}
    distill = dict(contrastive)
    for entry in imagenet:
        if entry["index"] not in conflicts and entry["wnid"] not in tiny_wnids:
            distill[f"imagenet:{entry['wnid']}"] = images_in(data_root / "imagenet_samples" / entry["wnid"])
    return {"contrastive": contrastive, "distill": distill}


DATASET_PARTS = {"cifar10": cifar10_parts, "flowers5": flowers5_parts, "caltech101": caltech101_parts,
                 "gtsrb": gtsrb_parts, "tiny_imagenet": tiny_imagenet_parts, "pacs": pacs_parts}


def evaluation_files(data_root: Path) -> dict[str, list[Path]]:
    """Every file that a benchmark may test, validate or few-shot on, by dataset (for disjointness checks)."""
    out: dict[str, list[Path]] = {}
    for name, parts in (("cifar10", cifar10_parts(data_root / "cifar10")),
                        ("tiny_imagenet", tiny_imagenet_parts(data_root / "tiny_imagenet")),
                        ("caltech101", caltech101_parts(data_root / "caltech101")),
                        ("pacs", pacs_parts(data_root / "pacs"))):
        out[name] = [path for part, classes in parts.items() if part != "pretrain"
                     for files in classes.values() for path in files]
    return out
