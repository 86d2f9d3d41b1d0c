"""The workflows a user runs, as plain functions: repair, finetune, evaluate, load_repaired.

Each reads its inputs, validates them before any expensive work, runs, and writes its
output atomically. The CLI is a thin layer over exactly these calls.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
from PIL import Image

from repair.backbone import Backbone, BackboneSpec, load_backbone
from repair.checkpoints import TensorFile, atomic_output, check_output_path, read_tensors, write_safetensors
from repair.data import (
    Features,
    ImageFolder,
    default_cache_dir,
    load_pixels,
    load_templates,
    scan_image_folder,
)
from repair.distributed import extract_features_sharded
from repair.errors import IncompatibleCheckpointError, InputFileError, OutputExistsError
from repair.evaluation import (
    EVAL_SCHEMA,
    EvalSet,
    Evaluation,
    ModelResult,
    Scorer,
    ZeroShot,
    selection_score,
    forgetting,
)
from repair.kinds import KINDS, Kind, detect_kind
from repair.kinds.coop import DEFAULT_CTX_INIT
from repair.surrogates import Surrogate, build_surrogate
from repair.objective import Objective
from repair.train import ProgressFile, StepReport, TrainConfig, TrainResult, set_deterministic, train

FORMAT = "mergetune/1"
OUTPUT_DTYPES = {"input": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DataOptions:
    """How a data folder becomes training or test features."""

    classnames_file: Path | None = None
    templates_file: Path | None = None
    shots: int | None = 16
    val_fraction: float = 0.0
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # None disables the cache
    workers: int = 0
    batch_size: int = 64
    on_progress: Callable[[int, int], None] | None = None  # (images encoded, total) while encoding


@dataclass(frozen=True)
class KindOptions:
    """Kind-level choices; ``None`` means: what the file records, else the kind's default."""

    kind: str | None = None
    ctx_init: str | None = None  # prompts: the zero-shot words (default "a photo of a")
    logit_scale: float | None = None  # CLIP's temperature, or a linear head's scale
    normalize_features: bool | None = None  # linear heads: on normalised image features (default yes)
    key_prefix: str | None = None  # linear heads: where the head lives in a state dict
    path_space: str = "feature"
    output_dtype: str = "input"

    def constructor_options(self, record: dict[str, object] | None = None) -> dict[str, object]:
        """Options for a kind's constructor: explicit choices win over what ``record`` stored."""
        record = record or {}
        details = record.get("kind_details") if isinstance(record.get("kind_details"), dict) else {}
        chosen = {
            "ctx_init": self.ctx_init or details.get("ctx_init") or DEFAULT_CTX_INIT,
            "logit_scale": self.logit_scale if self.logit_scale is not None else record.get("logit_scale"),
            "normalize_features": (self.normalize_features if self.normalize_features is not None
                                   else details.get("normalize_features", True)),
            "path_space": self.path_space,
        }
        if self.key_prefix is not None:
            chosen["key_prefix"] = self.key_prefix
        return chosen


@dataclass
class RunOutcome:
    """What a repair or finetune wrote, with the record stored in its metadata."""

    path: Path
    record: dict[str, object]
    train_result: TrainResult


def versions() -> dict[str, str]:
    def version(name: str) -> str:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            return "unknown"

    return {"mergetune": version("mergetune"), "torch": torch.__version__,
            "open_clip": version("open_clip_torch"), "python": platform.python_version()}


def read_record(tensor_file: TensorFile) -> dict[str, object]:
    """The mergetune record of a file this tool wrote; empty for foreign files."""
    raw = tensor_file.metadata.get("mergetune")
    if not raw:
        return {}
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        raise InputFileError(f"{tensor_file.path}: damaged mergetune metadata (not JSON)") from None
    return record if isinstance(record, dict) else {}


def _resolve_backbone(backbone: Backbone | BackboneSpec | None, device: str, precision: str = "fp32") -> Backbone:
    if isinstance(backbone, Backbone):
        return backbone
    return load_backbone(backbone, device=device, precision=precision)


def check_same_backbone(record: dict[str, object], backbone: Backbone, source: Path) -> None:
    """Refuse a checkpoint recorded against other backbone weights: its prompts would be meaningless."""
    recorded = record.get("backbone")
    if not isinstance(recorded, dict) or "text_sha256" not in recorded:
        return
    if recorded["text_sha256"] != backbone.text_fingerprint:
        raise IncompatibleCheckpointError(
            f"{source} was made with {recorded.get('model')} / {recorded.get('pretrained')}, whose text weights "
            f"differ from the loaded {backbone.spec.model} / {backbone.spec.pretrained}; pass the same --model"
        )


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Fail before the expensive part, not after it: the same check the atomic write makes."""
    out = Path(out)
    if not out.parent.is_dir():  # an output problem for the commands (exit 8), not an unreadable input
        raise OutputExistsError(f"{out.parent}: output directory does not exist")
    check_output_path(out, force, [Path(source) for source in inputs])


def select_training_images(data_dir: Path, options: DataOptions, seed: int) -> tuple[ImageFolder, ImageFolder | None]:
    """Scan, sample shots, split off validation: cheap, so it runs before any model work."""
    dataset = scan_image_folder(data_dir, options.classnames_file).few_shot(options.shots, seed)
    if options.val_fraction > 0:
        return dataset.split(options.val_fraction, seed)
    return dataset, None


def encode_for(scorer: Kind | Scorer, backbone: Backbone, dataset: ImageFolder, options: DataOptions,
               *, training: bool = False) -> Features:
    """The inputs a model scores: pixels when its image tower trains, else (cached) features of its tower."""
    if training and scorer.input_kind == "pixels":
        return load_pixels(backbone, dataset, batch_size=options.batch_size, workers=options.workers)
    return extract_features_sharded(backbone, dataset, cache_dir=options.cache_dir, batch_size=options.batch_size,
                                    workers=options.workers, normalize=scorer.input_kind != "raw-features",
                                    encoder=scorer.image_encoder(), on_progress=options.on_progress)


def encode_training_images(backbone: Backbone, kind: Kind, dataset: ImageFolder, held_out: ImageFolder | None,
                           options: DataOptions) -> tuple[Features, Features | None]:
    """Encode once with the frozen image tower (cached on disk), or load pixels for CLIPFit."""
    train_features = encode_for(kind, backbone, dataset, options, training=True)
    val_features = encode_for(kind, backbone, held_out, options, training=True) if held_out is not None else None
    return train_features, val_features


def prepare_surrogate(objective: Objective, kind: Kind, backbone: Backbone, dataset: ImageFolder,
                      train_set: Features, templates: Sequence[str], options: DataOptions, seed: int) -> Surrogate | None:
    if objective.lam_zs == 0.0:
        return None
    cache_key = json.dumps([kind.name, kind.describe(), backbone.visual_fingerprint, backbone.text_fingerprint,
                            list(dataset.classnames), list(templates), dataset.file_hashes()], default=str)
    return build_surrogate(objective.surrogate, kind, train_set, seed=seed, cache_key=cache_key,
                           cache_dir=options.cache_dir)


def build_kind(backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
               templates: Sequence[str], options: KindOptions) -> Kind:
    kind_class = detect_kind(tensor_file, options.kind)
    constructor = options.constructor_options(read_record(tensor_file))
    return kind_class.from_file(backbone, tensor_file, classnames, templates, **constructor)


def _export(kind: Kind, output_dtype: str) -> dict[str, torch.Tensor]:
    """The kind's tensors in the input's dtypes, or all floating tensors in ``output_dtype``."""
    if output_dtype not in OUTPUT_DTYPES:
        raise IncompatibleCheckpointError(f"unknown output dtype {output_dtype!r}; choose {', '.join(OUTPUT_DTYPES)}")
    dtype = OUTPUT_DTYPES[output_dtype]
    return {name: (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
            for name, tensor in kind.export().items()}


def _record(stage: str, kind: Kind, backbone: Backbone, dataset: ImageFolder, held_out: ImageFolder | None,
            templates: Sequence[str], objective: Objective, config: TrainConfig, data_options: DataOptions,
            kind_options: KindOptions, result: TrainResult, source: TensorFile | None) -> dict[str, object]:
    return {
        "format": FORMAT,
        "stage": stage,
        "kind": kind.name,
        "kind_details": kind.describe(),
        "trainable_numbers": kind.num_trainable(),
        "backbone": backbone.identity(),
        "logit_scale": kind.scale,
        "class_folders": list(dataset.folders),
        "classnames": list(dataset.classnames),
        "templates": list(templates),
        "objective": objective.as_dict(),
        "train": config.as_dict(),
        "seed": config.seed,
        "data": {"shots": data_options.shots, "val_fraction": data_options.val_fraction,
                 "output_dtype": kind_options.output_dtype},
        "inputs": {
            "checkpoint": None if source is None else {"name": source.path.name, "sha256": source.sha256},
            "data": {"path": str(dataset.root), "images": len(dataset), "manifest_sha256": dataset.manifest_sha256(),
                     "val_images": len(held_out) if held_out is not None else 0,
                     "val_manifest_sha256": held_out.manifest_sha256() if held_out is not None else None},
        },
        "result": result.as_dict(),
        "versions": versions(),
    }


def progress_file(out: Path, stage: str, kind: Kind, backbone: Backbone, dataset: ImageFolder,
                  held_out: ImageFolder | None, templates: Sequence[str], objective: Objective, config: TrainConfig,
                  source: TensorFile | None) -> ProgressFile:
    """The per-epoch state file of a run writing ``out``, tied to exactly these inputs and settings."""
    identity = [stage, kind.name, kind.describe(), source.sha256 if source else None, dataset.manifest_sha256(),
                held_out.manifest_sha256() if held_out else None, list(templates), objective.as_dict(),
                config.as_dict(), backbone.visual_fingerprint, backbone.text_fingerprint]
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return ProgressFile(out.with_name(f".{out.name}.progress"), fingerprint)


def _write(out: Path, kind: Kind, record: dict[str, object], output_dtype: str, force: bool,
           inputs: Sequence[Path]) -> Path:
    metadata = {"format": FORMAT, "kind": kind.name, "mergetune": json.dumps(record, sort_keys=True)}
    return write_safetensors(out, _export(kind, output_dtype), metadata, force=force, inputs=inputs)


def repair(
    finetuned: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    backbone: Backbone | BackboneSpec | None = None,
    objective: Objective = Objective(),
    config: TrainConfig = TrainConfig(),
    data_options: DataOptions | None = None,
    kind_options: KindOptions = KindOptions(),
    device: str = "cpu",
    precision: str = "fp32",
    force: bool = False,
    resume: bool = False,
    deterministic: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
) -> RunOutcome:
    """MergeTune continued fine-tuning of a fine-tuned checkpoint; writes a same-shape safetensors file.

    Progress is saved next to ``out`` after every epoch; ``resume=True`` continues an interrupted run.
    """
    finetuned, out = Path(finetuned), Path(out)
    data_options = data_options or DataOptions()  # built per call: the cache location follows the environment
    check_output(out, [finetuned], force)
    set_deterministic(deterministic)
    source = read_tensors(finetuned)
    backbone = _resolve_backbone(backbone, device, precision)
    check_same_backbone(read_record(source), backbone, finetuned)
    templates = load_templates(data_options.templates_file)
    dataset, held_out = select_training_images(Path(data_dir), data_options, config.seed)
    kind = build_kind(backbone, source, dataset.classnames, templates, kind_options)
    objective = objective.for_kind(kind.name)
    train_set, val_set = encode_training_images(backbone, kind, dataset, held_out, data_options)
    surrogate = prepare_surrogate(objective, kind, backbone, dataset, train_set, templates, data_options, config.seed)
    progress = progress_file(out, "repair", kind, backbone, dataset, held_out, templates, objective, config, source)
    torch.manual_seed(config.seed)
    result = train(kind, objective, train_set, config, val_set=val_set, surrogate=surrogate, on_step=on_step,
                   progress=progress, resume=resume)
    record = _record("repair", kind, backbone, dataset, held_out, templates, objective, config, data_options,
                     kind_options, result, source)
    path = _write(out, kind, record, kind_options.output_dtype, force, [finetuned])
    progress.remove()
    return RunOutcome(path, record, result)


def finetune(
    kind_name: str,
    data_dir: str | Path,
    out: str | Path,
    *,
    backbone: Backbone | BackboneSpec | None = None,
    config: TrainConfig = TrainConfig(),
    data_options: DataOptions | None = None,
    kind_options: KindOptions = KindOptions(),
    n_ctx: int | None = None,
    class_specific: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    force: bool = False,
    resume: bool = False,
    deterministic: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
) -> RunOutcome:
    """Plain fine-tuning from the zero-shot point (both constraint terms off): the baseline to repair."""
    out = Path(out)
    data_options = data_options or DataOptions()
    check_output(out, [], force)
    set_deterministic(deterministic)
    if kind_name not in KINDS:
        raise IncompatibleCheckpointError(f"unknown kind {kind_name!r}; choose one of {', '.join(KINDS)}")
    backbone = _resolve_backbone(backbone, device, precision)
    templates = load_templates(data_options.templates_file)
    dataset, held_out = select_training_images(Path(data_dir), data_options, config.seed)
    kind = KINDS[kind_name].zero_shot(backbone, dataset.classnames, templates, n_ctx=n_ctx,
                                      class_specific=class_specific, **kind_options.constructor_options())
    train_set, val_set = encode_training_images(backbone, kind, dataset, held_out, data_options)
    objective = Objective(lam_zs=0.0, lam_lmc=0.0)
    progress = progress_file(out, "finetune", kind, backbone, dataset, held_out, templates, objective, config, None)
    torch.manual_seed(config.seed)
    result = train(kind, objective, train_set, config, val_set=val_set, on_step=on_step, progress=progress,
                   resume=resume)
    record = _record("finetune", kind, backbone, dataset, held_out, templates, objective, config, data_options,
                     kind_options, result, None)
    path = _write(out, kind, record, kind_options.output_dtype, force, [])
    progress.remove()
    return RunOutcome(path, record, result)


# --------------------------------------------------------------------------- provenance


def verify(output: str | Path, *, finetuned: str | Path | None = None, data_dir: str | Path | None = None,
           backbone: Backbone | BackboneSpec | None = None, device: str = "cpu",
           precision: str = "fp32") -> dict[str, object]:
    """Recompute the hashes recorded at repair time and say which input differs.

    The data manifest is rebuilt exactly as the run built it: same folder scan, shots, seed and
    validation split, so a changed, added or removed training image is caught.
    """
    tensor_file = read_tensors(output)
    record = read_record(tensor_file)
    if not record:
        raise InputFileError(f"{output}: no mergetune metadata to verify against")
    inputs = record["inputs"]
    checks = []
    if finetuned is not None:
        recorded = (inputs.get("checkpoint") or {}).get("sha256")
        checks.append(_check("fine-tuned checkpoint", recorded, read_tensors(finetuned).sha256))
    if data_dir is not None:
        data = record["data"]
        options = DataOptions(shots=data.get("shots"), val_fraction=data.get("val_fraction", 0.0), cache_dir=None)
        dataset, held_out = select_training_images(Path(data_dir), options, int(record["seed"]))
        checks.append(_check("training images", inputs["data"]["manifest_sha256"], dataset.manifest_sha256()))
        if held_out is not None:
            checks.append(_check("validation images", inputs["data"]["val_manifest_sha256"],
                                 held_out.manifest_sha256()))
    if backbone is not None:
        loaded = _resolve_backbone(backbone, device, precision)
        recorded_backbone = record["backbone"]
        checks.append(_check("image tower weights", recorded_backbone.get("visual_sha256"),
                             loaded.visual_fingerprint))
        checks.append(_check("text tower weights", recorded_backbone.get("text_sha256"), loaded.text_fingerprint))
    return {"path": str(output), "checks": checks, "ok": all(check["ok"] for check in checks)}


def _check(name: str, recorded: object, actual: str) -> dict[str, object]:
    return {"input": name, "recorded": recorded, "actual": actual, "ok": recorded == actual}


# --------------------------------------------------------------------------- inspection


def inspect_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, object]:
    """What a checkpoint is, without loading a model: kind, tensors, trainable numbers, metadata."""
    tensor_file = read_tensors(path)
    kind_class = detect_kind(tensor_file, kind)
    trainable = kind_class.trainable_keys(tensor_file)
    if not trainable:
        raise IncompatibleCheckpointError(f"{tensor_file.path}: no {kind_class.name} tensors in this file")
    record = read_record(tensor_file)
    return {
        "path": str(tensor_file.path),
        "format": tensor_file.format,
        "sha256": tensor_file.sha256,
        "kind": kind_class.name,
        "trainable_numbers": sum(tensor_file.tensors[key].numel() for key in trainable),
        "tensors": [{"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                     "trainable": name in trainable} for name, tensor in tensor_file.tensors.items()],
        "metadata": record or dict(tensor_file.metadata),
    }


# --------------------------------------------------------------------------- evaluation


def load_evalset(backbone: Backbone, dataset: ImageFolder, name: str, options: DataOptions) -> EvalSet:
    """Features are encoded on first use per image tower and normalisation, then reused."""
    memo: dict[tuple[str, str], Features] = {}

    def features_for(scorer: Scorer) -> Features:
        encoder = scorer.image_encoder()
        key = (encoder.fingerprint if encoder else "backbone", scorer.input_kind)
        if key not in memo:
            memo[key] = encode_for(scorer, backbone, dataset, options)
        return memo[key]

    return EvalSet(name, dataset.classnames, features_for)


def evaluate(
    checkpoints: Sequence[str | Path],
    data_dir: str | Path,
    *,
    novel_dir: str | Path | Sequence[str | Path] | None = None,
    backbone: Backbone | BackboneSpec | None = None,
    data_options: DataOptions | None = None,
    kind_options: KindOptions = KindOptions(),
    baselines: bool = False,
    wise_alpha: float | None = None,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, object]:
    """The forgetting report: zero-shot and every checkpoint on base (and novel) test folders.

    ``novel_dir`` may be several held-out folders: each is reported, and "novel" is their mean.

    With ``baselines``, the first checkpoint is taken as the fine-tuned model and WiSE-FT
    (weight interpolation from zero-shot, alpha 0..1) and the output ensemble are added.
    WiSE-FT's alpha is the one with the best HM on this data (optimistic) unless ``wise_alpha``
    fixes it, e.g. to the alpha a report on a validation split chose (:func:`best_wise_alpha`).
    """
    if wise_alpha is not None and not 0.0 <= wise_alpha <= 1.0:
        raise ValueError(f"wise_alpha must lie in [0, 1], got {wise_alpha}")
    data_options = data_options or DataOptions(shots=None)
    files = [read_tensors(path) for path in checkpoints]  # validate every input before loading a model
    if baselines and not files:
        raise IncompatibleCheckpointError("--baselines needs the fine-tuned checkpoint as the first CHECKPOINT")
    backbone = _resolve_backbone(backbone, device, precision)
    templates = load_templates(data_options.templates_file)
    base_folder = scan_image_folder(data_dir, data_options.classnames_file)
    novel_folders = [scan_image_folder(folder) for folder in _as_list(novel_dir)]
    base = load_evalset(backbone, base_folder, "base", data_options)
    novel = [load_evalset(backbone, folder, name, data_options)
             for folder, name in zip(novel_folders, _novel_names(novel_folders))]
    warnings: list[str] = []
    kinds: dict[str, tuple[Kind, TensorFile]] = {}
    for tensor_file in files:
        record = read_record(tensor_file)
        check_same_backbone(record, backbone, tensor_file.path)
        warnings += backbone_warnings(record, backbone, tensor_file.path)
        name = tensor_file.path.name if tensor_file.path.name not in kinds else str(tensor_file.path)
        kinds[name] = (build_kind(backbone, tensor_file, base.classnames, templates, kind_options), tensor_file)
    evaluation = Evaluation(base, novel)
    results = [evaluation.score("zero-shot", ZeroShot(backbone, templates, kind_options.logit_scale), "zero-shot")]
    results += [evaluation.score(name, kind) for name, (kind, _) in kinds.items()]
    baseline_report = None
    if baselines:
        finetuned_name = next(iter(kinds))
        baseline_rows, baseline_report = _baselines(evaluation, finetuned_name, *kinds[finetuned_name], backbone,
                                                    templates, kind_options, wise_alpha)
        results += baseline_rows
    sources = {name: {"path": str(f.path), "sha256": f.sha256} for name, (_, f) in kinds.items()}
    return {
        "schema": EVAL_SCHEMA,
        "backbone": backbone.spec.as_dict(),
        "data": {"base": _describe_folder(base_folder),
                 "novel": [_describe_folder(folder) for folder in novel_folders] or None},
        "models": [_model_row(result, sources.get(result.name)) for result in results],
        "per_class": {result.name: result.per_class for result in results},
        "forgetting": forgetting(results),
        "baselines": baseline_report,
        "warnings": warnings,
        "versions": versions(),
    }


def _as_list(paths: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if paths is None:
        return []
    return [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]


def _novel_names(folders: Sequence[ImageFolder]) -> list[str]:
    """'novel' for one held-out set; 'novel:NAME' for several (unique)."""
    if len(folders) == 1:
        return ["novel"]
    names = []
    for index, folder in enumerate(folders):
        name = f"novel:{folder.root.name}"
        names.append(name if name not in names else f"{name}#{index}")
    return names


def _model_row(result: ModelResult, source: dict[str, str] | None) -> dict[str, object]:
    row = {key: value for key, value in asdict(result).items() if key not in ("per_class", "_novel_eces")}
    return {**row, "source": source}


def best_wise_alpha(report: dict[str, object]) -> float:
    """The WiSE-FT alpha an ``evaluate(..., baselines=True)`` report chose, to reuse on other data."""
    wise_ft = (report.get("baselines") or {}).get("wise_ft")
    if not wise_ft:
        raise IncompatibleCheckpointError("this report has no WiSE-FT curve (a kind without zero-shot values?)")
    return float(wise_ft["best_alpha"])


def _baselines(evaluation: Evaluation, finetuned: str, kind: Kind, tensor_file: TensorFile, backbone: Backbone,
               templates: Sequence[str], kind_options: KindOptions, wise_alpha: float | None = None,
               ) -> tuple[list[ModelResult], dict[str, object]]:
    """WiSE-FT (best alpha by HM over 0, 0.1, ..., 1, or the given one) and the zero-shot + fine-tuned ensemble."""
    ensemble = evaluation.ensemble(f"ensemble (zero-shot + {finetuned})", "zero-shot", finetuned)
    report: dict[str, object] = {"finetuned": finetuned, "ensemble": ensemble.name, "wise_ft": None}
    try:
        zero_shot = kind.zero_shot_values()
    except IncompatibleCheckpointError as exc:
        report["wise_ft_unavailable"] = str(exc)
        return [ensemble], report
    tuned = kind.snapshot()
    curve = []
    for alpha in [wise_alpha] if wise_alpha is not None else [step / 10 for step in range(11)]:
        kind.load_values({name: (1 - alpha) * zero_shot[name] + alpha * tuned[name] for name in tuned})
        curve.append((alpha, evaluation.score(f"wise-ft a={alpha:.1f}", kind, "baseline")))
    kind.load_values(tuned)
    best_alpha, best = max(curve, key=lambda item: selection_score(item[1]))
    best.name = f"wise-ft (a={best_alpha:.2f}, given)" if wise_alpha is not None else f"wise-ft (best a={best_alpha:.1f})"
    report["wise_ft"] = {
        "best_alpha": best_alpha,
        "selection": ("the caller (--wise-alpha, e.g. from a validation split)" if wise_alpha is not None else
                      "highest HM (base accuracy without novel data) on the evaluated data: optimistic"),
        "curve": [{"alpha": alpha, "base": r.base, "novel": r.novel, "hm": r.hm} for alpha, r in curve],
    }
    return [best, ensemble], report


def backbone_warnings(record: dict[str, object], backbone: Backbone, source: Path) -> list[str]:
    """Same text weights but another image tower: scores are still computable, but say so."""
    recorded = record.get("backbone")
    if isinstance(recorded, dict) and recorded.get("visual_sha256") not in (None, backbone.visual_fingerprint):
        return [f"{source.name} was made with another image tower or transform than the loaded "
                f"{backbone.spec.model} / {backbone.spec.pretrained}"]
    return []


def _describe_folder(folder: ImageFolder | None) -> dict[str, object] | None:
    if folder is None:
        return None
    return {"path": str(folder.root), "classes": list(folder.classnames), "images": len(folder),
            "manifest_sha256": folder.manifest_sha256()}


# --------------------------------------------------------------------------- loading


@dataclass
class Classifier:
    """A repaired checkpoint ready to classify images from Python."""

    backbone: Backbone
    kind: Kind
    classnames: list[str]
    record: dict[str, object]

    @torch.no_grad()
    def logits(self, images: torch.Tensor | Sequence[Image.Image], classnames: Sequence[str] | None = None
               ) -> torch.Tensor:
        """Logits for preprocessed pixels ``[B, 3, H, W]`` or PIL images, over ``classnames``."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.backbone.preprocess(image.convert("RGB")) for image in images])
        features = self.backbone.encode_images(images)
        return self.kind.logits_for(features, list(classnames or self.classnames))

    def predict(self, images: torch.Tensor | Sequence[Image.Image],
                classnames: Sequence[str] | None = None) -> list[str]:
        names = list(classnames or self.classnames)
        return [names[index] for index in self.logits(images, names).argmax(dim=-1).tolist()]


def load_repaired(path: str | Path, *, backbone: Backbone | BackboneSpec | None = None,
                  classnames: Sequence[str] | None = None, device: str = "cpu", precision: str = "fp32") -> Classifier:
    """Rebuild a classifier from a mergetune output in one call; the backbone comes from its metadata."""
    tensor_file = read_tensors(path)
    record = read_record(tensor_file)
    if not record:
        raise InputFileError(f"{path}: no mergetune metadata; pass the checkpoint to `mergetune eval` instead")
    if backbone is None:
        recorded = record["backbone"]
        backbone = BackboneSpec(recorded["model"], recorded.get("pretrained"),
                                Path(recorded["model_config"]) if recorded.get("model_config") else None)
    backbone = _resolve_backbone(backbone, device, precision)
    check_same_backbone(record, backbone, Path(path))
    names = list(classnames or record["classnames"])
    details = record.get("kind_details", {})
    options = replace(KindOptions(), logit_scale=record.get("logit_scale"),
                      ctx_init=details.get("ctx_init", KindOptions.ctx_init),
                      path_space=details.get("path_space", "feature"))
    kind = build_kind(backbone, tensor_file, names, record.get("templates") or ["a photo of a {}."], options)
    return Classifier(backbone, kind, names, record)


__all__ = ["DataOptions", "KindOptions", "RunOutcome", "Classifier", "repair", "finetune", "evaluate",
           "load_repaired", "atomic_output"]
