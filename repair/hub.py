"""Publishing a repaired checkpoint on the Hugging Face Hub, with a model card that says what it is.

A repaired file is only useful to someone else if they can tell which backbone it needs, how
it was made and how well it does, so the card is generated from the mergetune record the file
carries rather than written by hand. Uploads are staged: :func:`prepare_upload` writes exactly
the files that would be sent (a dry run shows them), and :func:`push` sends that folder in one
commit. huggingface_hub is imported inside the functions so the CLI starts fast without it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from repair.errors import HubError, InputFileError, MergetuneError, OutputExistsError
from repair.report import format_percent

__all__ = ["HubError", "PushResult", "model_card", "prepare_upload", "push"]

CARD_NAME = "README.md"
EVAL_NAME = "eval.json"
EVAL_SCHEMA = "mergetune.eval/1"  # same string as repair.evaluation.EVAL_SCHEMA (kept here: no torch import)
PIPELINE_TAG = "zero-shot-image-classification"
_NO_TOKEN = "no Hugging Face token: run `hf auth login` or set HF_TOKEN"
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_PLAIN_YAML = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}  # YAML 1.1 would not read these as text
_TOKEN_LIKE = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{8,}")
_MESSAGE_LIMIT = 400
_MAX_LISTED_TENSORS = 20
_MAX_INLINE_CLASSES = 30
_KIND_NAMES = {
    "coop": "CoOp soft prompt",
    "linear": "linear-probe head",
    "clipfit": "CLIPFit (a few native CLIP parameters)",
}
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """What was (or, for a dry run, would have been) pushed; ``revision`` None is the default branch."""

    repo_id: str
    revision: str | None
    commit_url: str | None
    files: list[str]
    dry_run: bool


# --------------------------------------------------------------------------- small helpers


def _one_line(text: object) -> str:
    """Library and server messages may span lines; every mergetune error is one line."""
    clean = " ".join(str(text).split())
    return clean if len(clean) <= _MESSAGE_LIMIT else clean[: _MESSAGE_LIMIT - 3] + "..."


def _md(text: object) -> str:
    """User strings (class names, model names) must not break tables or turn into markup."""
    escaped = re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", " ".join(str(text).split()))
    return escaped or " "


def _code(text: object) -> str:
    """Inline code that survives backticks inside the text."""
    value = " ".join(str(text).split())
    fence = "``" if "`" in value else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def _number(value: object) -> str:
    """Hyperparameters read like the CLI options that set them (0.002, not 0.0020000000)."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _yaml_scalar(value: str) -> str:
    """Plain when obviously safe, else a JSON string (which YAML reads identically)."""
    plain = _PLAIN_YAML.fullmatch(value) and value.lower() not in _YAML_WORDS and not value[0].isdigit()
    return value if plain else json.dumps(value)


def _is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(_REPO_PART.fullmatch(part) for part in parts)
            and "--" not in text and ".." not in text and not text.endswith(".git"))


# --------------------------------------------------------------------------- the record


def _require_record(record: object, filename: str) -> dict[str, Any]:
    """The card describes the file from its record; without kind and backbone it cannot."""
    if not isinstance(record, Mapping) or not record:
        raise InputFileError(
            f"{filename}: no mergetune record in its metadata; only files written by "
            "`mergetune repair` or `mergetune finetune` can be described and pushed"
        )
    kind, backbone = record.get("kind"), record.get("backbone")
    if not isinstance(kind, str) or not kind or not isinstance(backbone, Mapping) \
            or not isinstance(backbone.get("model"), str):
        raise InputFileError(f"{filename}: damaged mergetune record (no kind or backbone model)")
    return dict(record)


def _section(record: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    return dict(value) if isinstance(value, Mapping) else {}


def _hub_base_model(backbone: Mapping[str, Any]) -> str | None:
    """The Hub repo holding exactly these backbone weights, or None when that is not certain.

    ``hf-hub:ORG/NAME`` names it directly. For an open_clip name + tag, open_clip's own
    registry says which Hub repo it downloads those very weights from; transformers-format
    repos such as openai/clip-vit-base-patch16 are deliberately never claimed. Custom
    architectures, local folders and weight files have no Hub identity.
    """
    model = str(backbone.get("model") or "")
    if model.startswith("hf-hub:"):
        name = model[len("hf-hub:"):].strip("/")
        return name if _is_repo_id(name) else None
    pretrained = backbone.get("pretrained")
    if model.startswith("local-dir:") or backbone.get("model_config") or not isinstance(pretrained, str):
        return None
    return _open_clip_hub_repo(model, pretrained)


def _open_clip_hub_repo(model: str, pretrained: str) -> str | None:
    try:
        import open_clip

        repo = str(open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub") or "").strip("/")
    except Exception:  # an old or absent open_clip only costs the card its base_model line
        return None
    return repo if _is_repo_id(repo) else None


def _is_weights_file(pretrained: str) -> bool:
    return "/" in pretrained or os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))


def _backbone_text(backbone: Mapping[str, Any]) -> str:
    """Name the backbone without leaking local paths from the machine that made the file."""
    model = str(backbone["model"])
    pretrained = backbone.get("pretrained")
    if model.startswith("hf-hub:"):
        return f"open_clip {_code(model)} (weights from the Hub)"
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).name
        return f"a local open_clip folder {_code(folder)} (not on the Hub; identified by its fingerprints below)"
    if pretrained in (None, "", "none"):
        return f"open_clip {_code(model)} with random initial weights (`--pretrained none`)"
    if _is_weights_file(str(pretrained)):
        return f"open_clip {_code(model)} with a local weights file {_code(Path(str(pretrained)).name)}"
    return f"open_clip {_code(model)} with pretrained weights {_code(pretrained)}"


# --------------------------------------------------------------------------- eval reports


def _is_accuracy(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def _check_eval_report(report: object, source: str) -> dict[str, Any]:
    """Refuse anything but a mergetune eval report: a card must not show numbers of unknown meaning."""
    if not isinstance(report, Mapping) or report.get("schema") != EVAL_SCHEMA:
        raise InputFileError(f"{source}: not a mergetune eval report (expected \"schema\": \"{EVAL_SCHEMA}\")")
    models = report.get("models")
    if not isinstance(models, list):
        raise InputFileError(f"{source}: eval report has no \"models\" list")
    for row in models:
        if not isinstance(row, Mapping) or not isinstance(row.get("name"), str):
            raise InputFileError(f"{source}: eval report has a model entry without a name")
        if not all(_is_accuracy(row.get(key)) for key in ("base", "novel", "hm")):
            raise InputFileError(f"{source}: eval report entry {row['name']!r} has a non-numeric accuracy")
    return dict(report)


def _load_eval_report(path: Path) -> tuple[dict[str, Any], bytes]:
    """The parsed report (to render) and its exact bytes (to upload unchanged)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such eval report") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the eval report ({exc.strerror or exc})") from None
    try:
        report = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(_one_line(f"{path}: eval report is not JSON ({exc})")) from None
    return _check_eval_report(report, str(path)), raw


# --------------------------------------------------------------------------- the card


def model_card(record: dict, *, filename: str, eval_report: dict | None = None, repo_id: str | None = None,
               shapes: Mapping[str, Sequence[int]] | None = None, file_sha256: str | None = None) -> str:
    """The README.md for a Hub repo holding one mergetune output, generated from its record.

    ``shapes`` and ``file_sha256`` describe the file itself (the record cannot know its own
    hash); ``repo_id`` adds a download line. All three are optional extras.
    """
    record = _require_record(record, filename)
    report = _check_eval_report(eval_report, "eval report") if eval_report is not None else None
    parts = [
        _front_matter(record),
        _intro(record, filename),
        _what_section(record, filename, shapes),
        _method_section(record),
        _classes_section(record),
        _provenance_section(record, filename, file_sha256),
    ]
    if report is not None:
        parts.append(_eval_section(report, filename, file_sha256))
    parts.append(_usage_section(record, filename, repo_id))
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def _front_matter(record: Mapping[str, Any]) -> str:
    lines = ["---", "library_name: mergetune", f"pipeline_tag: {PIPELINE_TAG}", "tags:",
             "- clip", "- mergetune", f"- {_yaml_scalar(record['kind'])}"]
    base_model = _hub_base_model(record["backbone"])
    if base_model:
        lines.append(f"base_model: {_yaml_scalar(base_model)}")
    lines.append("---")
    return "\n".join(lines)


def _method_name(record: Mapping[str, Any]) -> str:
    if record.get("stage") == "finetune":
        return "plain fine-tuning from the zero-shot model (`mergetune finetune`, both MergeTune terms off)"
    return "MergeTune continued fine-tuning"


def _intro(record: Mapping[str, Any], filename: str) -> str:
    kind = record["kind"]
    what = _KIND_NAMES.get(kind, f"`{kind}`")
    made = ("repaired with MergeTune continued fine-tuning" if record.get("stage") != "finetune"
            else "fine-tuned from zero-shot CLIP (the baseline MergeTune repairs)")
    return (f"# {_md(filename)}\n\n"
            f"A CLIP {what} checkpoint, {made} by mergetune. Using it needs the "
            "frozen CLIP backbone named below, which is loaded separately.")


def _what_section(record: Mapping[str, Any], filename: str, shapes: Mapping[str, Sequence[int]] | None) -> str:
    details = _section(record, "kind_details")
    rows = [("file", _code(filename)), ("kind", _code(record["kind"]))]
    rows += [(_md(key.replace("_", " ")), _code(_number(value))) for key, value in details.items()]
    if shapes is not None:
        rows.append(("tensors in this file", _tensor_list(shapes)))
    if record.get("trainable_numbers") is not None:
        rows.append(("trainable numbers", _code(_number(record["trainable_numbers"]))))
    rows += [("base model", _backbone_text(record["backbone"])), ("method", _method_name(record)),
             ("seed", _code(_number(record.get("seed"))))]
    if record.get("logit_scale") is not None:
        rows.append(("logit scale", _code(_number(record["logit_scale"]))))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## What this file is\n\n| | |\n|---|---|\n{table}"


def _tensor_list(shapes: Mapping[str, Sequence[int]]) -> str:
    items = [f"{_code(name)} {list(shape)}" for name, shape in list(shapes.items())[:_MAX_LISTED_TENSORS]]
    extra = len(shapes) - len(items)
    return ", ".join(items) + (f" and {extra} more" if extra > 0 else "")


def _method_section(record: Mapping[str, Any]) -> str:
    objective, train = _section(record, "objective"), _section(record, "train")
    data, result = _section(record, "data"), _section(record, "result")
    path_space = _section(record, "kind_details").get("path_space")
    lines = [f"## Method: {_method_name(record)}", "",
             "`L(w) = CE(w) + lam_zs * S(w, w_zs) + lam_lmc * mean_k CE(w_ft + t_k (w - w_ft))`, "
             "starting from the fine-tuned weights `w_ft`.", "",
             "| objective | value |", "|---|---|"]
    lines += [f"| {name} | {_code(_number(objective.get(key)))} |" for name, key in (
        ("lam_zs (zero-shot surrogate weight)", "lam_zs"), ("lam_lmc (path term weight)", "lam_lmc"),
        ("path points K", "path_points"), ("surrogate", "surrogate"))]
    if path_space is not None:
        lines.append(f"| path space | {_code(path_space)} |")
    lines += ["", "| training | value |", "|---|---|"]
    lines += [f"| {_md(key.replace('_', ' '))} | {_code(_number(value))} |" for key, value in train.items()]
    lines += [f"| {_md(key.replace('_', ' '))} | {_code(_number(value))} |" for key, value in data.items()]
    if result:
        lines.append(f"| steps run | {_code(_number(result.get('steps')))} |")
        if result.get("selected_epoch") is not None:
            lines.append(f"| kept epoch (best held-out accuracy) | {_code(_number(result['selected_epoch']))} |")
    templates = record.get("templates") or []
    if templates:
        lines += ["", "Prompt templates: " + ", ".join(_code(template) for template in templates)]
    return "\n".join(lines)


def _classes_section(record: Mapping[str, Any]) -> str:
    names = [str(name) for name in record.get("classnames") or []]
    listed = ", ".join(_md(name) for name in names) or "not recorded"
    header = f"## Classes ({len(names)})\n\nIn label order: "
    if len(names) <= _MAX_INLINE_CLASSES:
        return header + listed
    return header + f"\n\n<details><summary>all {len(names)} class names</summary>\n\n{listed}\n\n</details>"


def _provenance_section(record: Mapping[str, Any], filename: str, file_sha256: str | None) -> str:
    inputs, backbone = _section(record, "inputs"), record["backbone"]
    checkpoint, data = inputs.get("checkpoint"), inputs.get("data") if isinstance(inputs.get("data"), Mapping) else {}
    lines = ["## Provenance", ""]
    if file_sha256:
        lines.append(f"- this file: {_code(filename)}, sha256 {_code(file_sha256)}")
    if isinstance(checkpoint, Mapping):
        lines.append(f"- input checkpoint: {_code(checkpoint.get('name'))}, sha256 {_code(checkpoint.get('sha256'))}")
    else:
        lines.append("- input checkpoint: none (trained from the zero-shot model)")
    if data:
        lines.append(f"- training images: {_number(data.get('images'))}, manifest sha256 "
                     f"{_code(data.get('manifest_sha256'))}")
        if data.get("val_images"):
            lines.append(f"- held-out images: {_number(data['val_images'])}, manifest sha256 "
                         f"{_code(data.get('val_manifest_sha256'))}")
    for tower in ("visual", "text"):
        if backbone.get(f"{tower}_sha256"):
            lines.append(f"- backbone {tower} weights sha256: {_code(backbone[f'{tower}_sha256'])}")
    versions = _section(record, "versions")
    if versions:
        lines.append("- versions: " + ", ".join(f"{_md(name)} {_code(value)}" for name, value in versions.items()))
    if record.get("stage"):
        lines.append(f"- stage: {_code(record['stage'])}")
    return "\n".join(lines)


def _eval_section(report: Mapping[str, Any], filename: str, file_sha256: str | None) -> str:
    lines = ["## Evaluation", "", "Top-1 accuracy (%) from `mergetune eval` "
             "(base: the repair classes; novel: held-out classes; HM: their harmonic mean).", "",
             "| model | base | novel | HM |", "|---|---:|---:|---:|"]
    notes = []
    for row in report["models"]:
        label = _md(row["name"]) + (" (this file)" if _is_this_file(row, filename, file_sha256) else "")
        lines.append(f"| {label} | {format_percent(row.get('base'))} | {format_percent(row.get('novel'))} "
                     f"| {format_percent(row.get('hm'))} |")
        notes += [f"- {_md(row['name'])}: {_md(note)}" for note in row.get("notes") or []]
    return "\n".join(lines + ([""] + notes if notes else []))


def _is_this_file(row: Mapping[str, Any], filename: str, file_sha256: str | None) -> bool:
    source = row.get("source")
    if file_sha256 and isinstance(source, Mapping) and source.get("sha256"):
        return source["sha256"] == file_sha256
    return row.get("name") == filename


def _model_flags(backbone: Mapping[str, Any]) -> str:
    """The --model/--pretrained flags that load the backbone this file was made against."""
    model, pretrained = str(backbone["model"]), backbone.get("pretrained")
    if model.startswith("local-dir:"):
        flags = "--model local-dir:PATH/TO/OPEN_CLIP_FOLDER"
    elif model.startswith("hf-hub:") or pretrained in (None, ""):
        flags = f"--model {model}"
    elif _is_weights_file(str(pretrained)):
        flags = f"--model {model} --pretrained PATH/TO/{Path(str(pretrained)).name}"
    else:
        flags = f"--model {model} --pretrained {pretrained}"
    if backbone.get("model_config"):
        flags += f" --model-config {Path(str(backbone['model_config'])).name}"
    return flags


def _usage_section(record: Mapping[str, Any], filename: str, repo_id: str | None) -> str:
    backbone = record["backbone"]
    name = shlex.quote(filename)
    download = f"hf download {repo_id} {name} --local-dir .\n" if repo_id else ""
    python_backbone = ""
    if str(backbone["model"]).startswith("local-dir:"):
        python_backbone = ', backbone=repair.BackboneSpec("local-dir:PATH/TO/OPEN_CLIP_FOLDER")'
    return (
        "## How to use\n\n"
        "Install mergetune, then score it next to zero-shot CLIP on your test images "
        "(one sub-folder per class):\n\n"
        f"```bash\n{download}mergetune eval {name} --data path/to/test-images {_model_flags(backbone)}\n```\n\n"
        "Or classify images from Python (the backbone is rebuilt from the file's metadata):\n\n"
        "```python\nimport repair\nfrom PIL import Image\n\n"
        f"clf = repair.load_repaired({json.dumps(filename)}{python_backbone})\n"
        'print(clf.predict([Image.open("photo.jpg")]))\n```'
    )


# --------------------------------------------------------------------------- staging


def prepare_upload(checkpoint: Path, folder: Path, *, eval_report: Path | None = None,
                   repo_id: str | None = None) -> list[Path]:
    """Write into ``folder`` exactly what a push uploads: the checkpoint, README.md, eval.json.

    Everything is validated before the first byte is written, and a failure part-way removes
    what was written, so the folder is either complete or as it was. ``repo_id`` only adds a
    download line to the card.
    """
    return _stage(Path(checkpoint), Path(folder), eval_report, repo_id).paths


@dataclass(frozen=True)
class _Staged:
    paths: list[Path]
    record: dict[str, Any]
    sha256: str


def _stage(checkpoint: Path, folder: Path, eval_report: Path | None, repo_id: str | None) -> _Staged:
    from repair.api import read_record
    from repair.checkpoints import read_tensors

    tensor_file = read_tensors(checkpoint)
    if checkpoint.name in (CARD_NAME, EVAL_NAME):
        raise InputFileError(f"{checkpoint}: rename the checkpoint; {checkpoint.name} is reserved for the card/report")
    record = read_record(tensor_file)
    report, report_bytes = _load_eval_report(Path(eval_report)) if eval_report is not None else (None, None)
    card = model_card(record, filename=checkpoint.name, eval_report=report, repo_id=repo_id,
                      shapes={name: tuple(t.shape) for name, t in tensor_file.tensors.items()},
                      file_sha256=tensor_file.sha256)
    created = _claim_folder(folder)
    written: list[Path] = []
    try:
        written.append(_copy_verified(checkpoint, folder / checkpoint.name, tensor_file.sha256))
        written.append(_write_bytes(folder / CARD_NAME, card.encode("utf-8")))
        if report_bytes is not None:
            written.append(_write_bytes(folder / EVAL_NAME, report_bytes))
    except BaseException:
        _undo(written, folder if created else None)
        raise
    return _Staged(written, record, tensor_file.sha256)


def _claim_folder(folder: Path) -> bool:
    """Use an empty or new folder only: never mix staged files with someone else's. True if created."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputExistsError(f"{folder} exists and is not a folder; choose a new or empty folder")
    if folder.is_dir():
        if any(folder.iterdir()):
            raise OutputExistsError(f"{folder} is not empty; choose a new or empty folder")
        return False
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise OutputExistsError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None
    return True


def _copy_verified(source: Path, target: Path, sha256: str) -> Path:
    """Byte-for-byte copy, checked against the hash that was validated: the file may change meanwhile."""
    from repair.checkpoints import atomic_output, sha256_file

    with atomic_output(target) as temp:
        shutil.copyfile(source, temp)
        if sha256_file(temp) != sha256:
            raise InputFileError(f"{source}: the file changed while it was being copied; try again")
    return target


def _write_bytes(target: Path, data: bytes) -> Path:
    from repair.checkpoints import atomic_output

    with atomic_output(target) as temp:
        temp.write_bytes(data)
    return target


def _undo(written: Sequence[Path], created: Path | None) -> None:
    for path in written:
        path.unlink(missing_ok=True)
    if created is not None:
        try:
            created.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------- pushing


def push(checkpoint: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         eval_report: Path | None = None, dry_run_dir: Path | None = None, token: str | None = None,
         commit_message: str | None = None, endpoint: str | None = None) -> PushResult:
    """Upload a mergetune output with its model card (and eval report) to a Hub model repo.

    The repo is created if missing (``private`` only applies then) and, when ``revision`` names
    a branch that does not exist, that branch too. ``dry_run_dir`` stages the files there and
    touches no network. ``endpoint`` overrides HF_ENDPOINT (a mirror, or a test server).
    """
    _check_repo_id(repo_id)
    _check_revision(revision)
    checkpoint = Path(checkpoint)
    if dry_run_dir is not None:
        staged = _stage(checkpoint, Path(dry_run_dir), eval_report, repo_id)
        return PushResult(repo_id, revision, None, [path.name for path in staged.paths], dry_run=True)
    with tempfile.TemporaryDirectory(prefix="mergetune-push-") as staging:
        resolved = _resolve_token(token)  # before copying a possibly large file for nothing
        folder = Path(staging) / "upload"
        staged = _stage(checkpoint, folder, eval_report, repo_id)
        message, description = _commit_text(checkpoint.name, staged, commit_message)
        commit_url = _upload(folder, repo_id, token=resolved, endpoint=endpoint, private=private,
                             revision=revision, message=message, description=description)
    return PushResult(repo_id, revision, commit_url, [path.name for path in staged.paths], dry_run=False)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _is_repo_id(repo_id):
        raise MergetuneError(_one_line(
            f"invalid Hub repo id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.'; "
            "at most 96 each; no '--' or '..')"))


def _check_revision(revision: str | None) -> None:
    if revision is not None and (not revision.strip() or any(ch.isspace() for ch in revision)):
        raise MergetuneError(_one_line(f"invalid revision {revision!r}: expected a branch name such as main"))


def _resolve_token(token: str | None) -> str:
    """The explicit token, else HF_TOKEN or the cached login; never echoed anywhere."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange; its text is not ours to trust
        raise HubError(_one_line(f"could not obtain a Hugging Face token ({type(exc).__name__})")) from None
    if not found:
        raise HubError(_NO_TOKEN)
    return found


def _commit_text(filename: str, staged: _Staged, commit_message: str | None) -> tuple[str, str]:
    """A summary naming the kind and the input checkpoint, with full hashes in the description."""
    record = staged.record
    source = _section(record, "inputs").get("checkpoint")
    source_hash = source.get("sha256") if isinstance(source, Mapping) else None
    origin = f"input sha256 {str(source_hash)[:12]}" if source_hash else "trained from zero-shot"
    summary = commit_message or f"Upload mergetune {record['kind']} checkpoint {filename} ({origin})"
    description = (f"kind: {record['kind']}\nstage: {record.get('stage')}\n"
                   f"input checkpoint sha256: {source_hash or 'none'}\nthis file sha256: {staged.sha256}")
    return summary, description


def _upload(folder: Path, repo_id: str, *, token: str, endpoint: str | None, private: bool,
            revision: str | None, message: str, description: str) -> str | None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="mergetune", library_version=_version())
    where = api.endpoint

    def call(step: str, action: Callable[[], T]) -> T:
        return _hub_call(step, repo_id, where, token, action)

    call("creating repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        call(f"creating branch {revision} in", lambda: api.create_branch(
            repo_id, branch=revision, exist_ok=True, repo_type="model"))
    info = call("uploading to", lambda: api.upload_folder(
        repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
        commit_message=message, commit_description=description))
    return getattr(info, "commit_url", None) or None


def _version() -> str | None:
    """Sent in the user agent so Hub-side logs can tell mergetune uploads apart."""
    from importlib import metadata

    try:
        return metadata.version("mergetune")
    except metadata.PackageNotFoundError:
        return None


def _hub_call(step: str, repo_id: str, endpoint: str, token: str, action: Callable[[], T]) -> T:
    """Run one Hub request; every library or network failure becomes one token-free line."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return action()
    except HfHubHTTPError as exc:
        detail = _http_detail(exc)
    except OfflineModeIsEnabled:
        detail = "HF_HUB_OFFLINE is set; unset it to push"
    except _transport_errors() as exc:
        detail = f"cannot reach {endpoint} ({type(exc).__name__}: {exc})"
    except ValueError as exc:  # huggingface_hub's own checks (repo id, README metadata, malformed answers)
        detail = f"{type(exc).__name__}: {exc}"
    raise HubError(_scrub(f"{step} {repo_id} on the Hugging Face Hub failed: {detail}", token)) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures from whichever HTTP client this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module_name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _http_detail(exc: Any) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    server = (getattr(exc, "server_message", None) or "").strip()
    detail = f"HTTP {status}" + (f": {server}" if server else "")
    if status == 401:
        detail += " (the token was rejected: run `hf auth login` or set HF_TOKEN)"
    elif status == 403:
        detail += " (the token may not write to this namespace: check its permissions)"
    return detail


def _scrub(text: str, token: str | None) -> str:
    """Servers and libraries may echo credentials; no message of ours ever carries one."""
    clean = " ".join(str(text).split())
    if token:
        clean = clean.replace(token, "***")
    return _one_line(_TOKEN_LIKE.sub(lambda match: match.group(1) + "***", clean))
