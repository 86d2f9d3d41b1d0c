"""Provenance: recompute the hashes recorded at repair time and say which input differs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from repair.errors import InputFileError, ProvenanceError, UsageError
from repair.io import read_tensors, tensors_checksum
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import seal_checks
from repair.train.fields import checked
from repair.workflows.inputs import DataOptions, read_record, resolve_backbone, select_training_images


@checked
def verify(output: str | Path, *, finetuned: str | Path | None = None, data_dir: str | Path | None = None,
           backbone: Backbone | BackboneSpec | None = None, device: str = "cpu",
           precision: str = "fp32") -> dict[str, Any]:
    """Check the output itself (its tensors and record against the hashes sealed when it was written) and each
    given input against the record; raises nothing for a mismatch (see ``ok``).

    The data manifest is rebuilt exactly as the run built it: same folder scan, shots, seed and
    validation split, so a changed, added or removed training image is caught.
    """
    tensor_file = read_tensors(output)
    record = read_record(tensor_file)
    if record is None:
        raise InputFileError(f"{output}: no mergetune metadata to verify against")
    sealed = seal_checks(tensor_file.metadata, tensors_checksum(tensor_file.tensors))
    if sealed is None and finetuned is None and data_dir is None and backbone is None:
        raise UsageError(f"nothing to verify: {output} was written before mergetune sealed its outputs; "
                         "pass --ft, --data and/or --model")
    checks = [_check(what, recorded, actual) for what, recorded, actual in sealed or []]
    notes = [] if sealed is not None else [f"{Path(output).name} was written before mergetune sealed its outputs: "
                                           "its own tensors and record cannot be checked"]
    if finetuned is not None:
        recorded = record.inputs.checkpoint.sha256 if record.inputs.checkpoint else None
        checks.append(_check("fine-tuned checkpoint", recorded, read_tensors(finetuned).sha256))
    if data_dir is not None and record.inputs.data is None:
        raise UsageError(f"{output} records no images (a uniform soup): there is nothing to check --data against")
    if data_dir is not None:
        options = DataOptions(shots=record.data.shots, val_fraction=record.data.val_fraction, cache_dir=None)
        dataset, held_out = select_training_images(Path(data_dir), options, record.seed)
        checks.append(_check("training images", record.inputs.data.manifest_sha256, dataset.manifest_sha256()))
        if held_out is not None:
            checks.append(_check("validation images", record.inputs.data.val_manifest_sha256,
                                 held_out.manifest_sha256()))
    if backbone is not None:
        loaded = resolve_backbone(backbone, device, precision)
        checks.append(_check("image tower weights", record.backbone.visual_sha256, loaded.visual_fingerprint))
        checks.append(_check("text tower weights", record.backbone.text_sha256, loaded.text_fingerprint))
    return {"path": str(output), "checks": checks, "notes": notes, "ok": all(check["ok"] for check in checks)}


def require_verified(report: dict[str, Any]) -> None:
    """Turn a report with a differing input into the one-line refusal (exit 13)."""
    if not report["ok"]:
        differing = ", ".join(check["input"] for check in report["checks"] if not check["ok"])
        raise ProvenanceError(f"{report['path']}: not what the repair recorded ({differing} changed)")


def _check(name: str, recorded: object, actual: str) -> dict[str, Any]:
    return {"input": name, "recorded": recorded, "actual": actual, "ok": recorded == actual}
