"""The labelled photos that ship inside mergetune for ``mergetune demo``: a small Caltech-101 subset.

Caltech 101 (Li, Andreetto, Ranzato, Perona; CaltechDATA, CC BY 4.0) is one of the CoOp benchmark's
datasets and the one among ours whose terms allow redistribution. Ten classes the embedded CLIP
(``mergetune-mini``) knows, five base and five novel, are taken from the benchmark's copy
(``shared/data/caltech101``: JPEG, shorter side 128 px), shrunk to a 48 px shorter side (bicubic,
JPEG quality 90) and written in the layout the demo reads, with ``classnames.json``, ``SOURCE.md``
and ``MANIFEST.sha256``:

    base-train/<class>/   16 images per base class (the shots fine-tuning and repair see)
    base-val/, novel-val/ 4 images per class (WiSE-FT's alpha and the other baselines are chosen here)
    base-test/, novel-test/  20 images per class

    python -m benchmarks.demo_images --data-root ../shared/data --out repair/assets/caltech-demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

# Chosen by measurement among the classes mergetune-mini knows (most of them at 55-95 % zero-shot over all 100
# Caltech classes): at 48 px, CoOp's default fine-tuning raises base and forgets novel (88.5 -> 74-77 % over two
# seeds), where full-size photos leave no room (zero-shot 96-97 % on both halves) and an animals-only set forgot
# less than 6 points. Vehicles and objects, base and novel alike.
BASE = ("airplanes", "Motorbikes", "ferry", "chair", "lamp")
NOVEL = ("car_side", "helicopter", "watch", "camera", "laptop")
SIZE = 48  # px, the shorter side: a low-resolution downstream domain, as CIFAR's 32 px in the benchmark
TRAIN, VAL, TEST = 16, 4, 20  # per class: the train folder's first 16 files, its next 4, the test folder's first 20


def parts(source: Path, base=BASE, novel=NOVEL) -> dict[str, dict[str, list[Path]]]:
    """{part: {class folder: files}} in the demo's layout, files in name order."""
    def files(split: str, folder: str) -> list[Path]:
        return sorted((source / split / folder).iterdir())

    layout: dict[str, dict[str, list[Path]]] = {}
    for group, classes in (("base", base), ("novel", novel)):
        for folder in classes:
            train = files("train", folder)
            if group == "base":
                layout.setdefault("base-train", {})[folder] = train[:TRAIN]
            layout.setdefault(f"{group}-val", {})[folder] = train[TRAIN:TRAIN + VAL]
            layout.setdefault(f"{group}-test", {})[folder] = files("test", folder)[:TEST]
    return layout


SOURCE = """# Caltech-101 demo subset (ships with mergetune for `mergetune demo`)

- What: 10 classes of Caltech 101, collected in 2003 by Fei-Fei Li, Marco Andreetto and Marc'Aurelio Ranzato at
  Caltech (L. Fei-Fei, R. Fergus, P. Perona, "Learning generative visual models from few training examples",
  CVPR 2004 Workshop on Generative-Model Based Vision). Base classes: {base}. Novel classes: {novel}.
- Licence: Creative Commons Attribution 4.0 International (CC BY 4.0): the licence Caltech's data repository
  (CaltechDATA) lists for Caltech 101, as does its Hugging Face mirror `HuggingFaceM4/Caltech-101` (the
  repository record itself could not be opened from the build machine). The pictures were collected from the web
  by the dataset's authors; attribution: Caltech 101, California Institute of Technology.
- Origin: the project's benchmark copy of Caltech 101 (GitHub `MachineLearning2020/Homework2-Caltech101`, commit
  `836044dd000296b2bb74d0aa4b4e462e459b01d7`, `101_ObjectCategories/` with its `train.txt` / `test.txt` split,
  resized there to a 128 px shorter side).
- Changes: per class the first 16 (base classes only), then the next 4 files of that copy's train split, and the first
  20 of its test split; each decoded, converted to RGB, resized to a {size} px shorter side (bicubic) and saved as
  JPEG quality 90. Folder names are Caltech's; `classnames.json` gives the base classes' prompt names
  (the novel folders are named as their prompts are).
- Layout: base-train/ (16 per base class), base-val/ and novel-val/ (4 per class), base-test/ and novel-test/ (up to
  20 per class): {counts}.
- Rebuild: `python -m benchmarks.demo_images --data-root ../shared/data --out repair/assets/caltech-demo`.
- Integrity: `MANIFEST.sha256` (sha256 of every image, relative paths).
"""


def shrink(source: Path, target: Path, size: int) -> None:
    """The image with its shorter side ``size`` px (bicubic), re-encoded as JPEG quality 90."""
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
        image.save(target, "JPEG", quality=90)


def build(data_root: Path, out: Path, size: int | None = SIZE, base=BASE, novel=NOVEL) -> dict[str, int]:
    source = data_root / "caltech101"
    names = {entry["folder"]: entry["name"] for entry in json.loads((source / "classes.json").read_text())}
    if out.exists():
        shutil.rmtree(out)
    manifest, counts = [], {}
    for part, classes in parts(source, base, novel).items():
        for folder, files in classes.items():
            target = out / part / folder
            target.mkdir(parents=True)
            for path in files:
                if size is None:
                    shutil.copyfile(path, target / path.name)
                else:
                    shrink(path, target / path.name, size)
                digest = hashlib.sha256((target / path.name).read_bytes()).hexdigest()
                manifest.append(f"{digest}  {part}/{folder}/{path.name}")
            counts[part] = counts.get(part, 0) + len(files)
    # the base folders' prompt names (--classnames); the novel folders' names are their folder names
    (out / "classnames.json").write_text(json.dumps({folder: names[folder] for folder in base}, indent=1) + "\n")
    (out / "SOURCE.md").write_text(SOURCE.format(size=size or "original", counts=counts,
                                                 base=", ".join(names[f] for f in base),
                                                 novel=", ".join(names[f] for f in novel)))
    (out / "MANIFEST.sha256").write_text("\n".join(sorted(manifest)) + "\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    counts = build(args.data_root, args.out)
    print(f"wrote {sum(counts.values())} images to {args.out}: {counts}")


if __name__ == "__main__":
    main()
