"""The model card of a mergetune output: a README.md generated from its record.

Everything the card says comes from the typed :class:`~repair.record.Record` and the kind's
own declarations (its description and options), so a new kind gets a correct card for free.
User strings are escaped; local paths from the machine that made the file are never shown.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from repair.errors import InputFileError, UsageError
from repair.record import BackboneIdentity, Record
from repair.render.report import card_table

EVAL_SCHEMA = "mergetune.eval/2"  # same string as repair.eval.metrics.EVAL_SCHEMA (kept here: no torch import)
READABLE_EVAL_SCHEMAS = ("mergetune.eval/1", EVAL_SCHEMA)  # /2 changed only the baselines section, which cards skip
PIPELINE_TAG = "zero-shot-image-classification"  # a file that can score classes it was not trained on
CLOSED_SET_TAG = "image-classification"  # one that scores only its own classes (a linear head, a CSC prompt)
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_PLAIN_YAML = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}  # YAML 1.1 would not read these as text
_MESSAGE_LIMIT = 400
_MAX_LISTED_TENSORS = 20
_MAX_INLINE_CLASSES = 30



def one_line(text: object) -> str:
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


def is_repo_id(text: str) -> bool:
    parts = text.split("/")
    return (len(parts) == 2 and all(_REPO_PART.fullmatch(part) for part in parts)
            and "--" not in text and ".." not in text and not text.endswith(".git"))


# --------------------------------------------------------------------------- the record


def _kind_description(kind: str) -> str:
    from repair.kinds import KINDS  # the kind declares how it is named

    return KINDS[kind].about.description if kind in KINDS else f"`{kind}`"


def _kind_options(record: Record) -> list[tuple[str, Any]]:
    """The kind's options that say how this file was made, in their declared order where the kind is known:
    each once. Left out: options of another stage (a fine-tuning run's ``n_ctx`` in a repair's record), unset
    ones, the logit scale (its own row) and those the file's facts (``kind_details``) state themselves."""
    import dataclasses

    from repair.kinds import KINDS

    fields = {field.name: field for field in dataclasses.fields(KINDS[record.kind].Options)} \
        if record.kind in KINDS else {}
    names = list(fields) if fields else list(record.kind_options)

    def applies(name: str) -> bool:
        return name not in fields or record.stage in fields[name].metadata.get("stages", (record.stage,))

    return [(name, record.kind_options[name]) for name in names
            if name in record.kind_options and record.kind_options[name] is not None and applies(name)
            and name != "logit_scale" and name not in record.kind_details]


def scores_other_classes(record: Record) -> bool:
    """Whether the file can score classes it was not trained on: recorded since mergetune/2 outputs carry it,
    else what its kind declares (a class-specific prompt cannot)."""
    if record.scores_other_classes is not None:
        return bool(record.scores_other_classes)
    from repair.kinds import KINDS

    declared = KINDS[record.kind].about.scores_unseen_classes if record.kind in KINDS else True
    return declared and not record.kind_details.get("class_specific") and not record.kind_details.get("head")


def _hub_base_model(backbone: BackboneIdentity) -> str | None:
    """The Hub repo holding exactly these backbone weights, or None when that is not certain.

    ``hf-hub:ORG/NAME`` names it directly. For an open_clip name + tag, open_clip's own
    registry says which Hub repo it downloads those very weights from; transformers-format
    repos such as openai/clip-vit-base-patch16 are deliberately never claimed. Custom
    architectures, local folders and weight files have no Hub identity.
    """
    model = backbone.model
    if model.startswith("hf-hub:"):
        name = model[len("hf-hub:"):].strip("/")
        return name if is_repo_id(name) else None
    pretrained = backbone.pretrained
    if model.startswith("local-dir:") or backbone.model_config or not isinstance(pretrained, str):
        return None
    return _open_clip_hub_repo(model, pretrained)


def _open_clip_hub_repo(model: str, pretrained: str) -> str | None:
    try:
        import open_clip

        repo = str(open_clip.get_pretrained_cfg(model, pretrained).get("hf_hub") or "").strip("/")
    except Exception:  # an old or absent open_clip only costs the card its base_model line
        return None
    return repo if is_repo_id(repo) else None


def _is_weights_file(pretrained: str) -> bool:
    return "/" in pretrained or os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))


def _backbone_text(backbone: BackboneIdentity) -> str:
    """Name the backbone without leaking local paths from the machine that made the file."""
    model, pretrained = backbone.model, backbone.pretrained
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
    if not isinstance(report, Mapping) or report.get("schema") not in READABLE_EVAL_SCHEMAS:
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


def load_eval_report(path: Path) -> tuple[dict[str, Any], bytes]:
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
        raise InputFileError(one_line(f"{path}: eval report is not JSON ({exc})")) from None
    return _check_eval_report(report, str(path)), raw


# --------------------------------------------------------------------------- the card


def model_card(record: Record | None, *, filename: str, eval_report: dict | None = None, repo_id: str | None = None,
               shapes: Mapping[str, Sequence[int]] | None = None, file_sha256: str | None = None,
               license: str | None = None) -> str:
    """The README.md for a Hub repo holding one mergetune output, generated from its record.

    ``shapes`` and ``file_sha256`` describe the file itself (the record cannot know its own
    hash); ``repo_id`` adds a download line; ``license`` (a Hub license id) goes into the front matter,
    else the base model's where its Hub card is in the local cache. All are optional extras.
    """
    if license is not None and not _LICENSE.fullmatch(license):
        raise UsageError(f"invalid license {license!r}: expected a Hub license id such as mit or apache-2.0")
    if record is None:
        raise InputFileError(
            f"{filename}: no mergetune record in its metadata; only files written by "
            "`mergetune repair` or `mergetune finetune` can be described and pushed")
    report = _check_eval_report(eval_report, "eval report") if eval_report is not None else None
    if report is not None:
        _check_scores_this_file(report, filename, file_sha256)
    parts = [
        _front_matter(record, license),
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


def _front_matter(record: Record, license: str | None) -> str:
    tag = PIPELINE_TAG if scores_other_classes(record) else CLOSED_SET_TAG
    lines = ["---", "library_name: mergetune", f"pipeline_tag: {tag}", "tags:",
             "- clip", "- mergetune", f"- {_yaml_scalar(record.kind)}"]
    base_model = _hub_base_model(record.backbone)
    if base_model:
        lines.append(f"base_model: {_yaml_scalar(base_model)}")
    license = license or (_cached_license(base_model) if base_model else None)
    if license:
        lines.append(f"license: {_yaml_scalar(license)}")
    lines.append("---")
    return "\n".join(lines)


def _cached_license(repo: str) -> str | None:
    """The ``license`` of a Hub model's card when that card is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        card = try_to_load_from_cache(repo, "README.md")
        text = Path(card).read_text(encoding="utf-8") if isinstance(card, str) else ""
    except Exception:  # no cache, an old huggingface_hub: the card just has no license line
        return None
    front = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    found = re.search(r"^license:\s*([A-Za-z0-9.+-]+)\s*$", front, re.MULTILINE)
    return found.group(1).lower() if found and _LICENSE.fullmatch(found.group(1).lower()) else None


def _method_name(record: Record) -> str:
    soup = record.result.get("soup") if record.stage == "soup" else None
    if soup is not None:
        return f"a {soup.get('method', 'uniform')} model soup (`mergetune soup`): the mean of fine-tuned checkpoints"
    if record.stage == "finetune":
        name = "plain fine-tuning from the zero-shot model (`mergetune finetune`, both MergeTune terms off)"
    else:
        name = "MergeTune continued fine-tuning"
    every = record.train.get("weight_ensemble")
    return name + (f", weights averaged every {every} steps (ZSCL's weight ensemble)" if every else "")


def _intro(record: Record, filename: str) -> str:
    what = _kind_description(record.kind)
    made = {"finetune": "fine-tuned from zero-shot CLIP (the baseline MergeTune repairs)",
            "soup": "averaged from fine-tuned checkpoints (a model soup)"}.get(
        record.stage, "repaired with MergeTune continued fine-tuning")
    return (f"# {_md(filename)}\n\n"
            f"A CLIP {what} checkpoint, {made} by mergetune. Using it needs the "
            "frozen CLIP backbone named below, which is loaded separately.")


def _what_section(record: Record, filename: str, shapes: Mapping[str, Sequence[int]] | None) -> str:
    rows = [("file", _code(filename)), ("kind", _code(record.kind))]
    rows += [(_md(key.replace("_", " ")), _code(_number(value))) for key, value in record.kind_details.items()]
    if shapes is not None:
        rows.append(("tensors in this file", _tensor_list(shapes)))
    rows.append(("trainable numbers", _code(_number(record.trainable_numbers))))
    rows += [("base model", _backbone_text(record.backbone)), ("method", _method_name(record))]
    if record.logit_scale is not None:
        rows.append(("logit scale", _code(_number(record.logit_scale))))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"## What this file is\n\n| | |\n|---|---|\n{table}"


def _tensor_list(shapes: Mapping[str, Sequence[int]]) -> str:
    items = [f"{_code(name)} {list(shape)}" for name, shape in list(shapes.items())[:_MAX_LISTED_TENSORS]]
    extra = len(shapes) - len(items)
    return ", ".join(items) + (f" and {extra} more" if extra > 0 else "")


def _shots_used(record: Record) -> str:
    """The images per class the run trained on (a class with fewer than the shots asked keeps all it has; a
    validation split takes some), with what was asked."""
    data, asked = record.inputs.data, record.data.shots
    per_class, held_out = data.per_class, data.val_per_class

    def span(counts: Sequence[int]) -> str:
        return str(min(counts)) if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"

    if not per_class:  # a record from before the counts were kept
        return f"{asked} asked" if asked is not None else "all images"
    text = span(per_class) + (f" ({asked} asked)" if asked is not None else " (all images)")
    if held_out:
        text += f", {span(held_out)} more held out for validation"
    return text


def _method_section(record: Record) -> str:
    if record.stage == "soup":
        return _soup_section(record)
    objective, train, result = record.objective, record.train, record.result
    data = {"shots per class used": _shots_used(record), "val_fraction": record.data.val_fraction,
            "output_dtype": record.data.output_dtype}
    start = ("starting from the zero-shot weights `w_zs`, both weights 0" if record.stage == "finetune"
             else "starting from the fine-tuned weights `w_ft`")
    lines = [f"## Method: {_method_name(record)}", "",
             "`L(w) = CE(w) + lam_zs * S(w, w_zs) + lam_lmc * mean_k CE(w_ft + t_k (w - w_ft))`, "
             f"{start}.", "",
             "| objective | value |", "|---|---|"]
    lines += [f"| {name} | {_code(_number(objective.get(key)))} |" for name, key in (
        ("lam_zs (zero-shot surrogate weight)", "lam_zs"), ("lam_lmc (path term weight)", "lam_lmc"),
        ("path points K", "path_points"), ("surrogate", "surrogate"))]
    lines += [f"| {_md(name.replace('_', ' '))} | {_code(_number(value))} |" for name, value in _kind_options(record)
              if name != "logit_scale"]
    lines += ["", "| training | value |", "|---|---|"]
    lines += [f"| {_md(key.replace('_', ' '))} | {_code(_number(value))} |" for key, value in train.items()
              if value is not None]  # an unset limit (max_steps) is no value to show
    lines += [f"| {_md(key.replace('_', ' '))} | {_code(value if isinstance(value, str) else _number(value))} |"
              for key, value in data.items()]
    if result:
        lines.append(f"| steps run | {_code(_number(result.get('steps')))} |")
        if result.get("selected_epoch") is not None:
            lines.append(f"| kept epoch (best held-out accuracy) | {_code(_number(result['selected_epoch']))} |")
    templates = record.templates
    if templates:
        lines += ["", "Prompt templates: " + ", ".join(_code(template) for template in templates)]
    return "\n".join(lines)


def _soup_section(record: Record) -> str:
    soup = record.result.get("soup") or {}
    lines = [f"## Method: {_method_name(record)}", "", "| ingredient | sha256 | in the soup |", "|---|---|---|"]
    lines += [f"| {_code(item.get('name'))} | {_code(item.get('sha256'))} | {'yes' if item.get('kept') else 'no'} |"
              for item in soup.get("ingredients") or []]
    if soup.get("method") == "greedy":
        lines += ["", "Greedy: ingredients ranked by their validation score; each kept only if the soup's score "
                      "did not drop."]
    return "\n".join(lines)


def _classes_section(record: Record) -> str:
    names = record.classnames
    listed = ", ".join(_md(name) for name in names) or "not recorded"
    header = f"## Classes ({len(names)})\n\nIn label order: "
    if len(names) <= _MAX_INLINE_CLASSES:
        return header + listed
    return header + f"\n\n<details><summary>all {len(names)} class names</summary>\n\n{listed}\n\n</details>"


def _provenance_section(record: Record, filename: str, file_sha256: str | None) -> str:
    checkpoint, data, backbone = record.inputs.checkpoint, record.inputs.data, record.backbone
    lines = ["## Provenance", ""]
    if file_sha256:
        lines.append(f"- this file: {_code(filename)}, sha256 {_code(file_sha256)}")
    if checkpoint is not None:
        lines.append(f"- input checkpoint: {_code(checkpoint.name)}, sha256 {_code(checkpoint.sha256)}")
    elif record.stage == "soup":
        lines.append("- input checkpoints: the ingredients above")
    else:
        lines.append("- input checkpoint: none (trained from the zero-shot model)")
    if data is None:
        lines.append("- images: none")
    else:
        what = "validation images" if record.stage == "soup" else "training images"
        lines.append(f"- {what}: {_number(data.images)}, manifest sha256 {_code(data.manifest_sha256)}")
    if data is not None and data.val_images:
        lines.append(f"- held-out images: {_number(data.val_images)}, manifest sha256 "
                     f"{_code(data.val_manifest_sha256)}")
    for tower, digest in (("visual", backbone.visual_sha256), ("text", backbone.text_sha256)):
        if digest:
            lines.append(f"- backbone {tower} weights sha256: {_code(digest)}")
    if record.versions:
        lines.append("- versions: " + ", ".join(f"{_md(name)} {_code(value)}"
                                                for name, value in record.versions.items()))
    lines.append(f"- stage: {_code(record.stage)}")
    return "\n".join(lines)


def _eval_section(report: Mapping[str, Any], filename: str, file_sha256: str | None) -> str:
    table = card_table(report, lambda row: _is_this_file(row, filename, file_sha256))
    lines = ["## Evaluation", "", "Top-1 accuracy (%) from `mergetune eval` "
             "(base: the repair classes; novel: held-out classes; HM: their harmonic mean). "
             + _test_images(report), "", *table.markdown(escape=_md)]
    notes = [f"- {_md(name)}: {_md(note)}" for name, note in table.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def _check_scores_this_file(report: Mapping[str, Any], filename: str, file_sha256: str | None) -> None:
    """A card's numbers must be this file's: a report in which no checkpoint row is it would publish another
    model's accuracy under its name."""
    rows = [row for row in report["models"] if row.get("role", "checkpoint") == "checkpoint"]
    if not any(_is_this_file(row, filename, file_sha256) for row in rows):
        scored = ", ".join(str(row["name"]) for row in rows) or "no checkpoint"
        which = f" (sha256 {file_sha256[:12]})" if file_sha256 else ""
        raise UsageError(f"the eval report scores {scored}, not {filename.rstrip('/')}{which}; evaluate this file "
                         "(`mergetune eval ... --json`) and pass that report")


def _test_images(report: Mapping[str, Any]) -> str:
    """How many test images each number rests on: a 100 % on 10 images says less than 90 % on 10,000."""
    def described(folder: Mapping[str, Any]) -> str:
        return f"{_number(folder.get('images'))} test images of {len(folder.get('classes') or [])} classes"

    data = report.get("data") or {}
    novel = data.get("novel") or []
    text = f"Base accuracy rests on {described(data.get('base') or {})}"
    if novel:
        text += "; novel accuracy on " + " and ".join(described(folder) for folder in novel)
    return text + "."


def _is_this_file(row: Mapping[str, Any], filename: str, file_sha256: str | None) -> bool:
    source = row.get("source")
    if file_sha256 and isinstance(source, Mapping) and source.get("sha256"):
        return source["sha256"] == file_sha256
    return row.get("name") == filename


def _model_flags(backbone: BackboneIdentity) -> str:
    """The --model/--pretrained flags that load the backbone this file was made against."""
    model, pretrained = backbone.model, backbone.pretrained
    if model.startswith("local-dir:"):
        flags = "--model local-dir:PATH/TO/OPEN_CLIP_FOLDER"
    elif model.startswith("hf-hub:") or pretrained in (None, ""):
        flags = f"--model {model}"
    elif _is_weights_file(str(pretrained)):
        flags = f"--model {model} --pretrained PATH/TO/{Path(str(pretrained)).name}"
    else:
        flags = f"--model {model} --pretrained {pretrained}"
    if backbone.model_config:
        flags += f" --model-config {Path(backbone.model_config).name}"
    return flags


def _usage_section(record: Record, filename: str, repo_id: str | None) -> str:
    backbone = record.backbone
    name = shlex.quote(filename)
    what = shlex.quote(f"{filename.rstrip('/')}/*") if filename.endswith("/") else name  # a folder (a PEFT adapter)
    download = (f"hf download {repo_id} {'--include ' if filename.endswith('/') else ''}{what} --local-dir .\n"
                if repo_id else "")
    python_backbone = ""
    if backbone.model.startswith("local-dir:"):
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

