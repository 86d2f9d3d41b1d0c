"""Image folders, class names, templates and few-shot sampling: the labelled inputs.

An ImageFolder directory (one sub-folder per class) is the dataset. Classes are sorted by
folder name, which fixes the label order and therefore the base/novel split. Nothing here
decodes an image or touches a model: that is :mod:`repair.data.features`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from repair.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".webp",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".qoi"})
# image files of formats mergetune does not decode: refused by name, never skipped (a smaller class is another task)
UNREAD_IMAGE_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".avifs", ".jxl", ".jp2", ".j2k", ".jpx", ".svg",
                                     ".psd", ".exr", ".hdr", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                                     ".rw2", ".raf", ".eps", ".pcx", ".sgi", ".xcf"})
# how the common image formats start: an image under another name (no extension, ".bak") is found by its content
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*",
                     b"\xff\x0a", b"\x00\x00\x00\x0cJXL ", b"\x00\x00\x00\x0cjP  ")
_ISO_IMAGE_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class ImageFolder:
    """A labelled list of image files; cheap to subset, hashes its files on demand."""

    root: Path
    folders: tuple[str, ...]
    classnames: tuple[str, ...]
    files: tuple[Path, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_classes(self) -> int:
        return len(self.folders)

    def subset(self, indices: Sequence[int]) -> ImageFolder:
        return replace(self, files=tuple(self.files[i] for i in indices),
                       labels=tuple(self.labels[i] for i in indices))

    def indices_by_class(self) -> list[list[int]]:
        by_class: list[list[int]] = [[] for _ in self.folders]
        for index, label in enumerate(self.labels):
            by_class[label].append(index)
        return by_class

    def few_shot(self, shots: int | None, seed: int) -> ImageFolder:
        """``shots`` images per class drawn with ``seed``; a class with fewer keeps all of them
        (as Dassl does); all images when ``shots`` is None."""
        if shots is None:
            return self
        rng = random.Random(seed)
        chosen: list[int] = []
        for indices in self.indices_by_class():
            chosen.extend(sorted(rng.sample(indices, min(shots, len(indices)))))
        return self.subset(chosen)

    def split(self, fraction: float, seed: int) -> tuple[ImageFolder, ImageFolder]:
        """Stratified (train, held-out) split; every class keeps at least one training image."""
        if not 0.0 < fraction < 1.0:
            raise DataError(f"validation fraction must be between 0 and 1, got {fraction}")
        rng = random.Random(seed)
        train: list[int] = []
        held_out: list[int] = []
        for indices in self.indices_by_class():
            shuffled = list(indices)
            rng.shuffle(shuffled)
            count = min(len(shuffled) - 1, round(fraction * len(shuffled)))
            held_out.extend(shuffled[:count])
            train.extend(shuffled[count:])
        if not held_out:
            raise DataError(f"{self.root}: too few images for a validation split of {fraction}")
        return self.subset(sorted(train)), self.subset(sorted(held_out))

    def file_hashes(self) -> list[str]:
        return [_sha256_cached(path) for path in self.files]

    def listing_sha256(self) -> str:
        """One cheap hash of which files these are (class folder, name, size; no content read): enough to
        tell two machines' copies of a folder apart before they share work on it."""
        digest = hashlib.sha256()
        for path, label in zip(self.files, self.labels):
            try:
                size = path.stat().st_size
            except OSError:  # gone since the scan: decoding it will say so
                size = -1
            digest.update(f"{self.folders[label]}\t{path.name}\t{size}\n".encode())
        return digest.hexdigest()

    def manifest_sha256(self) -> str:
        """One hash for exactly these labelled images: what an output records as its data."""
        digest = hashlib.sha256()
        for path, label, file_hash in zip(self.files, self.labels, self.file_hashes()):
            digest.update(f"{self.folders[label]}\t{path.name}\t{file_hash}\n".encode())
        return digest.hexdigest()


HASH_MEMORY = 200_000  # file hashes remembered per process (about 40 MB at most)


def _sha256_cached(path: Path) -> str:
    """Content hash, remembered per (path, size, mtime) within one process."""
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=HASH_MEMORY)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan_image_folder(root: str | Path, classnames_file: str | Path | None = None) -> ImageFolder:
    """Read an ImageFolder tree; class names from the folder names or from ``classnames_file``."""
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root}: a file, not a data folder (one folder of images per class)")
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    entries = _entries(root)
    stray = [entry for entry in entries if entry.is_file() and _is_image_file(entry)]
    if stray:
        raise DataError(f"{stray[0]}: an image outside any class folder; put it in its class's folder or remove it")
    folders = sorted(entry.name for entry in entries if entry.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        images = _class_images(root / folder)
        if not images:
            raise DataError(f"{root / folder}: class folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files.extend(images)
        labels.extend([label] * len(images))
    if len(folders) < 2:
        raise DataError(f"{root}: needs one sub-folder per class and at least 2 classes, found {len(folders)}")
    classnames = load_classnames(classnames_file, folders) if classnames_file else default_classnames(folders)
    check_classnames(classnames, classnames_file or root)
    return ImageFolder(root, tuple(folders), tuple(classnames), tuple(files), tuple(labels))


def _entries(folder: Path) -> list[Path]:
    """A folder's visible entries; one that cannot be followed (a dangling link) or read is an error
    naming it, never silently skipped: a skipped class or image would change what is measured."""
    try:
        entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"{folder}: cannot list this folder ({exc.strerror or type(exc).__name__})") from None
    for entry in entries:
        if entry.is_symlink() and not entry.exists():
            raise DataError(f"{entry}: dangling symbolic link; remove it or point it at an image or class folder")
        if not (entry.is_dir() or entry.is_file()) and entry.suffix.lower() in IMAGE_EXTENSIONS:
            raise DataError(f"{entry}: not a regular file")
    return entries


def _class_images(folder: Path) -> list[Path]:
    """The images of one class folder. Images it holds that would not be read are refused by name, never
    skipped: one in a sub-folder, or of a format mergetune does not decode."""
    images = []
    for entry in _entries(folder):
        if entry.is_dir():
            nested = _first_image_under(entry)
            if nested is not None:
                raise DataError(f"{nested}: an image in a sub-folder of the class folder {folder}; only images "
                                "directly in a class folder are read: move it up, or out of the data folder")
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(entry)
        elif entry.suffix.lower() in UNREAD_IMAGE_EXTENSIONS:
            raise DataError(f"{entry}: mergetune does not read {entry.suffix.lower()} images; convert it to PNG or "
                            "JPEG, or remove it")
        elif _is_image_file(entry):
            raise DataError(f"{entry}: an image (by its content) without an image file extension; give it its "
                            "format's extension (.jpg, .png, ...), or remove it")
    return sorted(images)


def _first_image_under(folder: Path) -> Path | None:
    for parent, children, names in os.walk(folder):
        children[:] = sorted(child for child in children if not child.startswith("."))
        for name in sorted(names):
            path = Path(parent) / name
            if not name.startswith(".") and path.is_file() and (path.suffix.lower() in IMAGE_EXTENSIONS
                                                                 or _is_image_file(path)):
                return path
    return None


def _is_image_file(path: Path) -> bool:
    """An image by its extension, or by how its content starts (a JPEG saved without its extension)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS or suffix in UNREAD_IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return head.startswith(_IMAGE_SIGNATURES) or (head[4:8] == b"ftyp" and head[8:12] in _ISO_IMAGE_BRANDS)


def check_classnames(classnames: Sequence[str], source: str | Path) -> None:
    """Two classes with one display name would get the same prompt: their scores would be meaningless."""
    empty = [index for index, name in enumerate(classnames) if not name.strip()]
    if empty:
        raise DataError(f"{source}: class {empty[0]} has an empty display name")
    seen: dict[str, int] = {}
    for index, name in enumerate(classnames):
        key = " ".join(name.split()).lower()
        if key in seen:
            raise DataError(f"{source}: classes {seen[key]} and {index} share the display name {name!r}")
        seen[key] = index


def default_classnames(folders: Sequence[str]) -> list[str]:
    return [folder.replace("_", " ").strip() for folder in folders]


def load_classnames(path: str | Path, folders: Sequence[str]) -> list[str]:
    """Display names for the folders, from JSON or text.

    JSON: ``{"folder": "name"}``, a list of names in folder order, or a list of
    ``{"folder": ..., "name": ...}`` records. Text: ``folder<TAB or colon>name`` per line,
    or one name per line in sorted folder order. A file that looks like a mapping (every text
    line a pair) is read as one: a folder it names that the data folder lacks is refused by
    name, never turned into a list of names in folder order.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read class names ({exc.__class__.__name__})") from None
    mapping = _parse_classnames(path, text, folders)
    unknown = [folder for folder in mapping if folder not in folders]
    if unknown:
        raise DataError(f"{path}: names class folder(s) {', '.join(map(repr, unknown[:5]))} that the data folder "
                        f"does not have (its folders: {', '.join(folders[:8])}{', ...' if len(folders) > 8 else ''})")
    missing = [folder for folder in folders if folder not in mapping]
    if missing:
        raise DataError(f"{path}: no class name for folder(s) {', '.join(missing[:5])}")
    return [mapping[folder] for folder in folders]


def _parse_classnames(path: Path, text: str, folders: Sequence[str]) -> dict[str, str]:
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):
            return {str(key): str(value) for key, value in data.items()}
        if isinstance(data, list) and all(isinstance(item, dict) for item in data):
            try:
                return _one_name_each(path, [(str(item["folder"]), str(item["name"])) for item in data])
            except KeyError:
                raise DataError(f"{path}: JSON records need 'folder' and 'name'") from None
        if isinstance(data, list) and all(isinstance(item, str) for item in data):
            return _names_in_folder_order(path, data, folders)
        raise DataError(f"{path}: expected an object folder->name or a list of names")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    pairs = [_split_pair(line) for line in lines]
    if pairs and all(pair is not None for pair in pairs):
        return _one_name_each(path, pairs)  # type: ignore[arg-type]
    paired = [line for line, pair in zip(lines, pairs) if pair is not None and pair[0] in folders]
    if paired:  # some lines map a folder, others do not: neither a mapping nor a list
        line = next(line for line, pair in zip(lines, pairs) if pair is None)
        raise DataError(f"{path}: {line!r} is not a 'folder: name' line, though {paired[0]!r} is; write every "
                        "line as 'folder: name', or list only names (one per line, in folder order)")
    return _names_in_folder_order(path, lines, folders)


def _one_name_each(path: Path, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for folder, name in pairs:
        if folder in mapping:
            raise DataError(f"{path}: class folder {folder!r} is named twice")
        mapping[folder] = name
    return mapping


def _split_pair(line: str) -> tuple[str, str] | None:
    for separator in ("\t", ":"):
        if separator in line:
            folder, name = line.split(separator, 1)
            return folder.strip(), name.strip()
    return None


def _names_in_folder_order(path: Path, names: Sequence[str], folders: Sequence[str]) -> dict[str, str]:
    if len(names) != len(folders):
        raise DataError(f"{path}: {len(names)} class names for {len(folders)} class folders")
    return dict(zip(folders, names))


def load_templates(path: str | Path | None) -> list[str]:
    """Prompt templates with one ``{}`` each: one per line of a text file, or a JSON list."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read templates ({exc.__class__.__name__})") from None
    if path.suffix.lower() == ".json":
        try:
            templates = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON ({exc.msg})") from None
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise DataError(f"{path}: expected a JSON list of template strings")
    else:
        templates = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    bad = [template for template in templates if template.count("{}") != 1]
    if not templates or bad:
        raise DataError(f"{path}: every template needs exactly one '{{}}' for the class name"
                        + (f" (bad: {bad[0]!r})" if bad else " (file is empty)"))
    return templates
