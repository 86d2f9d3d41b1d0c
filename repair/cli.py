"""The `mergetune` command line: thin Typer commands over :mod:`repair.api`.

Everything heavy (torch, open_clip) is imported inside the commands so `mergetune --help`
stays fast. Errors become one line on stderr and a documented exit code in one place,
:func:`run`; ``--debug`` (or ``MERGETUNE_DEBUG=1``) shows tracebacks instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

from repair.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, MergetuneError

app = typer.Typer(
    name="mergetune",
    help="Repair fine-tuned CLIP checkpoints that forgot what zero-shot CLIP knew (MergeTune).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
stdout = Console()
stderr = Console(stderr=True)
T = TypeVar("T")
_state = {"debug": os.environ.get("MERGETUNE_DEBUG", "") not in ("", "0")}

# ----------------------------------------------------------------------------- shared options

ModelOpt = Annotated[str, typer.Option("--model", help="open_clip model name, local-dir:PATH or hf-hub:ORG/NAME.")]
PretrainedOpt = Annotated[str, typer.Option(
    "--pretrained", help="Pretrained tag (e.g. openai), a weights file, or 'none' for random init.")]
ModelConfigOpt = Annotated[Optional[Path], typer.Option(
    "--model-config", help="Register a custom open_clip architecture (JSON) before loading --model.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="Forward passes in fp32, bf16 or fp16 (autocast); trainable tensors stay fp32.")]
DataOpt = Annotated[Path, typer.Option("--data", help="ImageFolder directory: one sub-folder per class.")]
ClassnamesOpt = Annotated[Optional[Path], typer.Option(
    "--classnames", help="Class display names: JSON {folder: name} / list, or text lines 'folder: name'.")]
TemplatesOpt = Annotated[Optional[Path], typer.Option(
    "--templates", help="Prompt templates with one '{}', one per line or a JSON list [default: 'a photo of a {}.'].")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="Where image features are cached [default: $MERGETUNE_CACHE or ~/.cache/mergetune].")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=0, help="Image-decoding worker processes.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="The one seed: shots, split, batches, initialisation.")]
ShotsOpt = Annotated[Optional[int], typer.Option("--shots", min=1, help="Images per class to train on (all if unset).")]
ValOpt = Annotated[float, typer.Option(
    "--val-fraction", min=0.0, max=0.9, help="Hold out this fraction of the shots; keep the best epoch on it.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=0, help="Passes over the training images.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", min=0, help="Stop after this many steps.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per step.")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="SGD learning rate (cosine schedule).")]
MomentumOpt = Annotated[float, typer.Option("--momentum", min=0.0, help="SGD momentum.")]
WdOpt = Annotated[float, typer.Option("--weight-decay", min=0.0, help="SGD weight decay.")]
WarmupOpt = Annotated[int, typer.Option("--warmup-epochs", min=0, help="Linear warm-up epochs.")]
LogitScaleOpt = Annotated[Optional[float], typer.Option(
    "--logit-scale", help="Override CLIP's temperature (default: the model's own, at most 100).")]
CtxInitOpt = Annotated[Optional[str], typer.Option(
    "--ctx-init", help="Prompts: the zero-shot words the context starts from [default: 'a photo of a'].")]
KindOpt = Annotated[Optional[str], typer.Option(
    "--kind", help="Checkpoint kind: coop, linear or clipfit; detected from the file if unset.")]
KeyPrefixOpt = Annotated[Optional[str], typer.Option(
    "--key-prefix", help="Linear heads: the head's prefix in a state dict, e.g. 'head.' for head.weight.")]
HeadFeaturesOpt = Annotated[Optional[str], typer.Option(
    "--head-features", help="Linear heads: trained on 'normalized' (default) or 'raw' image features.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Output dtype: input (same as the input), fp32, fp16, bf16.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue an interrupted run from the progress saved next to --out after each epoch.")]
DeterministicOpt = Annotated[bool, typer.Option(
    "--deterministic", help="Deterministic kernels only: bit-identical reruns (slower on GPU).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of text.")]


def run(action: Callable[[], T]) -> T:
    """Run a command body: MergetuneError -> one line + its exit code; bugs -> exit 1."""
    try:
        return action()
    except MergetuneError as exc:
        if _state["debug"]:
            raise
        stderr.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr.print("interrupted; no output was written", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
        if _state["debug"]:
            raise
        stderr.print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                     markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERNAL) from None


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Repair fine-tuned CLIP checkpoints that forgot what zero-shot CLIP knew (MergeTune)."""
    if debug:
        _state["debug"] = True


def _backbone_spec(model: str, pretrained: str, model_config: Optional[Path]):
    from repair.backbone import BackboneSpec

    return BackboneSpec(model=model, pretrained=pretrained, model_config=model_config)


def _data_options(classnames, templates, shots, val_fraction, cache_dir, no_cache, workers, progress=None):
    from repair.api import DataOptions
    from repair.data import default_cache_dir

    return DataOptions(classnames_file=classnames, templates_file=templates, shots=shots,
                       val_fraction=val_fraction, cache_dir=None if no_cache else (cache_dir or default_cache_dir()),
                       workers=workers, on_progress=progress.on_images if progress else None)


class _Progress:
    """Rich progress on stderr; silent when stderr is not a terminal or --quiet is given."""

    def __init__(self, description: str, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[terms]}"), console=stderr, disable=quiet or not stderr.is_terminal,
            transient=True,
        )
        self.description = description
        self.task = self.progress.add_task(description, total=None, terms="")
        self.images_task: Any = None
        self.images_done = 0

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.__exit__(*exc_info)

    def on_images(self, done: int, total: int) -> None:
        """Encoding progress: images per second and time left (a new bar for each folder)."""
        if self.images_task is None or done <= self.images_done:
            self.images_task = self.progress.add_task("encoding images", total=total, terms="")
        self.images_done = done
        self.progress.update(self.images_task, total=total, completed=done)
        task = next(task for task in self.progress.tasks if task.id == self.images_task)
        if task.speed:
            self.progress.update(self.images_task, terms=f"{task.speed:.1f} img/s")

    def on_step(self, report: Any) -> None:
        terms = " ".join(f"{key} {value:.3f}" for key, value in report.terms.items())
        self.progress.update(self.task, total=report.total_steps, completed=report.step,
                             terms=f"epoch {report.epoch}  {terms}")


def _report_run(outcome: Any, as_json: bool, verb: str) -> None:
    if as_json:
        stdout.print_json(json.dumps({"path": str(outcome.path), **outcome.record}))
        return
    record = outcome.record
    result = record["result"]
    selected = f", kept epoch {result['selected_epoch']}" if result["selected_epoch"] else ""
    stdout.print(f"{verb} {outcome.path} ({record['kind']}, {record['trainable_numbers']} trainable numbers, "
                 f"{result['steps']} steps{selected})", markup=False, highlight=False)


# ----------------------------------------------------------------------------- commands


@app.command("repair")
def repair_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint to repair.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the repaired safetensors file.")],
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    kind: KindOpt = None,
    surrogate: Annotated[Optional[str], typer.Option(
        "--surrogate", help="Zero-shot surrogate: feature, fisher or l2 (default: the kind's, see README).")] = None,
    key_prefix: KeyPrefixOpt = None,
    head_features: HeadFeaturesOpt = None,
    lam_zs: Annotated[Optional[float], typer.Option(
        "--lam-zs", help="Weight of the zero-shot surrogate (default: the kind's, see README).")] = None,
    lam_lmc: Annotated[float, typer.Option("--lam-lmc", help="Weight of the path term towards the input.")] = 1.0,
    path_points: Annotated[int, typer.Option("--path-points", min=1, help="K points t=(k+0.5)/K on the path.")] = 5,
    path_space: Annotated[str, typer.Option(
        "--path-space", help="Interpolate prompts in 'feature' space (cheap) or 'weight' space (exact).")] = "feature",
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    shots: ShotsOpt = 16,
    val_fraction: ValOpt = 0.0,
    epochs: EpochsOpt = 10,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = 128,
    lr: LrOpt = 0.002,
    momentum: MomentumOpt = 0.9,
    weight_decay: WdOpt = 5e-4,
    warmup_epochs: WarmupOpt = 1,
    seed: SeedOpt = 0,
    logit_scale: LogitScaleOpt = None,
    ctx_init: CtxInitOpt = None,
    dtype: DtypeOpt = "input",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    deterministic: DeterministicOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Repair FINETUNED with MergeTune on the images in --data; write a same-shape checkpoint to --out."""

    def action() -> None:
        from repair.api import KindOptions, repair
        from repair.objective import Objective
        from repair.train import TrainConfig

        objective = Objective(lam_zs=lam_zs, lam_lmc=lam_lmc, path_points=path_points, surrogate=surrogate)
        config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed)
        kind_options = KindOptions(kind=kind, ctx_init=ctx_init, logit_scale=logit_scale, path_space=path_space,
                                   output_dtype=dtype, key_prefix=key_prefix,
                                   normalize_features=_head_features(head_features))
        with _Progress("repairing", quiet) as progress:
            outcome = repair(
                finetuned, data, out, backbone=_backbone_spec(model, pretrained, model_config), objective=objective,
                config=config, kind_options=kind_options, device=device, precision=precision, force=force,
                resume=resume, deterministic=deterministic, on_step=progress.on_step,
                data_options=_data_options(classnames, templates, shots, val_fraction, cache_dir, no_cache, workers,
                                           progress),
            )
        _report_run(outcome, as_json, "wrote")

    run(action)


@app.command("finetune")
def finetune_command(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the fine-tuned safetensors file.")],
    kind: Annotated[str, typer.Option("--kind", help="What to fine-tune: coop, linear or clipfit.")] = "coop",
    head_features: HeadFeaturesOpt = None,
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", min=1, help="Context tokens (= words of --ctx-init).")] = None,
    class_specific: Annotated[bool, typer.Option("--class-specific", help="One context per class (CoOp CSC).")] = False,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    shots: ShotsOpt = 16,
    val_fraction: ValOpt = 0.0,
    epochs: EpochsOpt = 10,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = 128,
    lr: LrOpt = 0.002,
    momentum: MomentumOpt = 0.9,
    weight_decay: WdOpt = 5e-4,
    warmup_epochs: WarmupOpt = 1,
    seed: SeedOpt = 0,
    logit_scale: LogitScaleOpt = None,
    ctx_init: CtxInitOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    deterministic: DeterministicOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Plain fine-tuning from zero-shot (no repair terms): makes the baseline checkpoint to repair."""

    def action() -> None:
        from repair.api import KindOptions, finetune
        from repair.train import TrainConfig

        config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed)
        with _Progress("fine-tuning", quiet) as progress:
            outcome = finetune(
                kind, data, out, backbone=_backbone_spec(model, pretrained, model_config), config=config,
                kind_options=KindOptions(ctx_init=ctx_init, logit_scale=logit_scale,
                                         normalize_features=_head_features(head_features)), n_ctx=n_ctx,
                class_specific=class_specific, device=device, precision=precision, force=force, resume=resume,
                deterministic=deterministic, on_step=progress.on_step,
                data_options=_data_options(classnames, templates, shots, val_fraction, cache_dir, no_cache, workers,
                                           progress),
            )
        _report_run(outcome, as_json, "wrote")

    run(action)


@app.command("eval")
def eval_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to score next to the zero-shot model.")],
    data: Annotated[Path, typer.Option("--data", help="Test images of the base (repair) classes.")],
    novel_data: Annotated[Optional[list[Path]], typer.Option(
        "--novel-data", help="Test images of held-out classes or datasets; repeat for several (novel = their mean)."
    )] = None,
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    kind: KindOpt = None,
    key_prefix: KeyPrefixOpt = None,
    head_features: HeadFeaturesOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    logit_scale: LogitScaleOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    baselines: Annotated[bool, typer.Option(
        "--baselines", help="Add WiSE-FT (best alpha) and the output ensemble of zero-shot and the FIRST checkpoint."
    )] = False,
    wise_alpha: Annotated[Optional[float], typer.Option(
        "--wise-alpha", min=0.0, max=1.0,
        help="With --baselines: use this WiSE-FT alpha (e.g. one chosen on a validation split) instead of the "
             "best on the test data.")] = None,
    min_base: Annotated[Optional[float], typer.Option("--min-base", help="Gate: minimum base accuracy (%).")] = None,
    min_novel: Annotated[Optional[float], typer.Option("--min-novel", help="Gate: minimum novel accuracy (%).")
                         ] = None,
    min_hm: Annotated[Optional[float], typer.Option("--min-hm", help="Gate: minimum harmonic mean (%).")] = None,
    max_forgetting: Annotated[Optional[float], typer.Option(
        "--max-forgetting", help="Gate: most novel accuracy points a checkpoint may lose against zero-shot.")] = None,
    gate: Annotated[Optional[Path], typer.Option(
        "--gate", help="Gate thresholds from a TOML/JSON file ([gate] min_base, min_novel, min_hm, max_forgetting).")
    ] = None,
    markdown: Annotated[Optional[Path], typer.Option(
        "--markdown", help="Append a markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY).")] = None,
    nproc: Annotated[int, typer.Option(
        "--nproc", min=1, help="Encode test images on N local processes (torch.distributed, gloo); rank 0 reports."
    )] = 1,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """The forgetting report: zero-shot CLIP and each checkpoint on base / novel classes, optionally gated."""

    def action() -> None:
        from repair.distributed import init_from_env, launch, rank_and_world, rank_device

        if nproc > 1 and rank_and_world()[1] == 1:
            raise typer.Exit(launch(nproc, _without_option(sys.argv[1:], "--nproc")))
        init_from_env()  # also when started as `torchrun -m repair.cli eval ...`
        from repair.api import KindOptions, evaluate
        from repair.errors import GateFailedError
        from repair.gate import Thresholds, check, load_thresholds
        from repair.report import eval_markdown

        flags = Thresholds(min_base, min_novel, min_hm, max_forgetting)
        thresholds = load_thresholds(gate).merged(flags) if gate else flags
        with _Progress("evaluating", quiet) as progress:
            report = evaluate(
                checkpoints, data, novel_dir=novel_data, backbone=_backbone_spec(model, pretrained, model_config),
                data_options=_data_options(classnames, templates, None, 0.0, cache_dir, no_cache, workers, progress),
                kind_options=KindOptions(kind=kind, logit_scale=logit_scale, key_prefix=key_prefix,
                                         normalize_features=_head_features(head_features)),
                baselines=baselines, wise_alpha=wise_alpha, device=rank_device(device), precision=precision,
            )
        failures = check(report, thresholds) if thresholds.any() else None
        if failures is not None:
            report["gate"] = {"thresholds": thresholds.__dict__, "failures": failures, "passed": not failures}
        if markdown is not None and rank_and_world()[0] == 0:
            with open(markdown, "a", encoding="utf-8") as handle:
                handle.write(eval_markdown(report, failures))
        if as_json:
            stdout.print_json(json.dumps(report))
        else:
            _print_eval_table(report)
        for warning in report["warnings"]:
            stderr.print(f"warning: {warning}", markup=False, highlight=False)
        if failures:
            raise GateFailedError("gate failed: " + "; ".join(failures))

    run(action)


@app.command("path")
def path_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint.")],
    repaired: Annotated[Path, typer.Argument(help="Its repaired version.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled test images (an ImageFolder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON report.")],
    png: Annotated[Optional[Path], typer.Option("--png", help="Also plot accuracy and loss along the paths.")] = None,
    points: Annotated[int, typer.Option("--points", min=2, help="Points per segment, t = 0 .. 1.")] = 11,
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    kind: KindOpt = None,
    ctx_init: CtxInitOpt = None,
    classnames: ClassnamesOpt = None,
    templates: TemplatesOpt = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Accuracy and loss along zero-shot -> fine-tuned, zero-shot -> repaired and fine-tuned -> repaired."""

    def action() -> None:
        from repair.api import KindOptions, check_output
        from repair.lmc import path_report, plot_path, write_path_json

        check_output(out, [finetuned, repaired], force)
        if png is not None:
            check_output(png, [finetuned, repaired], force)
        report = path_report(
            finetuned, repaired, data, backbone=_backbone_spec(model, pretrained, model_config), points=points,
            data_options=_data_options(classnames, templates, None, 0.0, cache_dir, no_cache, workers),
            kind_options=KindOptions(kind=kind, ctx_init=ctx_init), device=device,
        )
        write_path_json(report, out, force=force)
        if png is not None:
            plot_path(report, png, force=force)
        if as_json:
            stdout.print_json(json.dumps(report))
            return
        for segment in report["segments"]:
            stdout.print(f"{segment['name']}: loss barrier {segment['loss_barrier']:.4f}, accuracy drop "
                         f"{segment['accuracy_drop']:.2f} points", markup=False, highlight=False)
        stdout.print(f"wrote {out}" + (f" and {png}" if png else ""), markup=False, highlight=False)

    run(action)


@app.command("verify")
def verify_command(
    output: Annotated[Path, typer.Argument(help="A file written by mergetune repair or finetune.")],
    ft: Annotated[Optional[Path], typer.Option("--ft", help="The fine-tuned checkpoint it was repaired from.")
                  ] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="The data folder it was trained on.")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Also check the backbone weights (open_clip name, local-dir:PATH, hf-hub:ORG/NAME).")] = None,
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recompute the input hashes recorded in OUTPUT and say which input differs (exit 13)."""

    def action() -> None:
        from repair.api import verify
        from repair.errors import ProvenanceError

        backbone = _backbone_spec(model, pretrained, model_config) if model else None
        report = verify(output, finetuned=ft, data_dir=data, backbone=backbone)
        if not report["checks"]:
            raise ProvenanceError("nothing to verify: pass --ft, --data and/or --model")
        if as_json:
            stdout.print_json(json.dumps(report))
        else:
            for check in report["checks"]:
                verdict = "matches" if check["ok"] else "DIFFERS"
                stdout.print(f"{check['input']}: {verdict}", markup=False, highlight=False)
        if not report["ok"]:
            differing = ", ".join(check["input"] for check in report["checks"] if not check["ok"])
            raise ProvenanceError(f"{output}: {differing} differ(s) from what was recorded at repair time")

    run(action)


@app.command("inspect")
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file (safetensors, torch, npz).")],
    kind: KindOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name a checkpoint's kind, its tensors, shapes, dtypes, trainable numbers and metadata."""

    def action() -> None:
        from repair.api import inspect_checkpoint

        report = inspect_checkpoint(checkpoint, kind)
        if as_json:
            stdout.print_json(json.dumps(report))
            return
        from rich.table import Table

        stdout.print(f"{report['path']}: {report['kind']} checkpoint, {report['trainable_numbers']:,} trainable "
                     f"numbers ({report['format']}, sha256 {report['sha256'][:12]})", markup=False, highlight=False)
        table = Table("tensor", "shape", "dtype", "trained")
        for tensor in report["tensors"][:50]:
            table.add_row(tensor["name"], str(tensor["shape"]), tensor["dtype"], "yes" if tensor["trainable"] else "")
        stdout.print(table)
        if len(report["tensors"]) > 50:
            stdout.print(f"... and {len(report['tensors']) - 50} more tensors (--json lists all)")
        metadata = report["metadata"]
        if metadata:
            summary = {key: metadata[key] for key in ("stage", "backbone", "objective", "seed") if key in metadata}
            stdout.print_json(json.dumps(summary or metadata))

    run(action)


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus ``option VALUE`` / ``option=VALUE``: the workers must not see the launcher's own flag
    (torchrun would also take ``--nproc`` for its ``--nproc-per-node``)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(option + "="):
            kept.append(argument)
    return kept


def _head_features(value: Optional[str]) -> Optional[bool]:
    from repair.errors import IncompatibleCheckpointError

    if value is None:
        return None
    if value not in ("normalized", "raw"):
        raise IncompatibleCheckpointError(f"--head-features must be 'normalized' or 'raw', not {value!r}")
    return value == "normalized"


def _print_eval_table(report: dict[str, Any]) -> None:
    from rich.table import Table

    from repair.report import format_percent

    has_novel = report["data"]["novel"] is not None
    table = Table(title="accuracy (%)", title_justify="left")
    table.add_column("model")
    table.add_column("base", justify="right")
    if has_novel:
        table.add_column("novel", justify="right")
        table.add_column("HM", justify="right")
    table.add_column("ECE base", justify="right")
    notes = []
    for row in report["models"]:
        cells = [row["name"], format_percent(row["base"])]
        if has_novel:
            cells += [format_percent(row["novel"]), format_percent(row["hm"])]
        table.add_row(*cells, format_percent(row["base_ece"]))
        notes += [f"{row['name']}: {note}" for note in row["notes"]]
    stdout.print(table)
    for name, rows in report.get("forgetting", {}).items():
        losers = [row for row in rows if row["change"] < 0][:5]
        if losers:
            worst = ", ".join(f"{row['class']} {row['change']:+.1f}" for row in losers)
            stdout.print(f"most forgotten by {name}: {worst}", markup=False, highlight=False)
    for note in notes:
        stdout.print(note, markup=False, highlight=False)


@app.command("push")
def push_command(
    checkpoint: Annotated[Path, typer.Argument(help="A repaired (or fine-tuned) mergetune safetensors file.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository ORG/NAME; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created if missing).")
                        ] = None,
    eval_json: Annotated[Optional[Path], typer.Option(
        "--eval-json", help="A `mergetune eval --json` report to put in the model card and upload.")] = None,
    dry_run: Annotated[Optional[Path], typer.Option(
        "--dry-run", help="Write the exact folder that would be uploaded here; upload nothing.")] = None,
    message: Annotated[Optional[str], typer.Option("--message", help="Commit message.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a checkpoint with a generated model card to the Hugging Face Hub (token: HF login or HF_TOKEN)."""

    def action() -> None:
        from dataclasses import asdict

        from repair.hub import push

        result = push(checkpoint, repo, private=private, revision=revision, eval_report=eval_json,
                      dry_run_dir=dry_run, commit_message=message)
        if as_json:
            stdout.print_json(json.dumps(asdict(result)))
        elif result.dry_run:
            stdout.print(f"dry run: wrote {', '.join(result.files)} to {dry_run}; nothing was uploaded",
                         markup=False, highlight=False)
        else:
            stdout.print(f"pushed {', '.join(result.files)} to {result.repo_id}"
                         + (f" ({result.commit_url})" if result.commit_url else ""), markup=False, highlight=False)

    run(action)


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its model, images and files.")
                       ] = Path("mergetune-demo"),
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole workflow offline on a built-in tiny CLIP and generated images."""

    def action() -> None:
        from repair.demo import run_demo

        with _Progress("demo", quiet) as progress:
            report = run_demo(workdir, force=force, on_step=progress.on_step,
                              say=lambda text: stderr.print(text, markup=False, highlight=False))
        _print_eval_table(report)

    run(action)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
