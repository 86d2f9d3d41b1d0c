"""``mergetune eval``, ``path``, ``verify`` and ``inspect``: thin calls into :mod:`repair.workflows`."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repair.cli.app import Progress, command_group, emit, run, say, stdout
from repair.cli.options import (
    BackboneFlags,
    DataFlags,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    KindOpt,
    ModelConfigOpt,
    OtherClassesOpt,
    Precision,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    value,
    with_flags,
    with_kind_options,
)
from repair.model.backbone import BackboneSpec

app = command_group()


def _finite_threshold(threshold: Optional[float]) -> Optional[float]:
    if threshold is not None and not math.isfinite(threshold):
        raise typer.BadParameter(f"{threshold} is not a finite number")
    return threshold


def threshold_option(flag: str, help: str) -> Any:
    """A gate threshold: a finite percentage (``nan`` would pass every check)."""
    return Annotated[Optional[float], typer.Option(flag, callback=_finite_threshold, help=help)]


def _baseline_names(values: Optional[list[str]]) -> Optional[list[str]]:
    """``--baseline ties,dare --baseline wise-ft`` -> the names, each known (else a usage error, exit 2)."""
    if not values:
        return None
    from repair.eval.baselines import baseline_names
    from repair.errors import UsageError

    try:
        return baseline_names(",".join(values))[0]
    except UsageError as exc:
        raise typer.BadParameter(str(exc)) from None


MinBaseOpt = threshold_option("--min-base", "Gate: minimum base accuracy (%).")
MinNovelOpt = threshold_option("--min-novel", "Gate: minimum novel accuracy (%).")
MinHmOpt = threshold_option("--min-hm", "Gate: minimum harmonic mean (%).")
MaxForgettingOpt = threshold_option("--max-forgetting",
                                    "Gate: most novel accuracy points a checkpoint may lose against zero-shot.")


@app.command("eval")
@with_kind_options("eval")
@with_flags("data_flags", DataFlags)
def eval_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints to score next to the zero-shot model.")],
    data: Annotated[Path, typer.Option("--data", help="Test images of the base (repair) classes.")],
    novel_data: Annotated[Optional[list[Path]], typer.Option(
        "--novel-data", help="Test images of held-out classes or datasets; repeat for several (novel = their mean)."
    )] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="open_clip model name, local-dir:PATH or hf-hub:ORG/NAME [default: the one the first "
                        "checkpoint records, else ViT-B-16].")] = None,
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    kind: KindOpt = None,
    other_classes: OtherClassesOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    baselines: Annotated[bool, typer.Option(
        "--baselines", help="Add every baseline built from zero-shot and the FIRST checkpoint (WiSE-FT, task "
                            "arithmetic, TIES, DARE, entropy-alpha, ensembles; README 'Baselines').")] = False,
    baseline: Annotated[Optional[list[str]], typer.Option(
        "--baseline", metavar="NAME[,NAME]", callback=_baseline_names,
        help="Add only these baselines (implies --baselines); repeatable.")] = None,
    val_data: Annotated[Optional[Path], typer.Option(
        "--val-data", help="Labelled validation images of the base classes: the baselines' settings are chosen "
                           "on them (never on the test data).")] = None,
    val_novel_data: Annotated[Optional[list[Path]], typer.Option(
        "--val-novel-data", help="Validation images of held-out classes (with --val-data); repeat for several.")
    ] = None,
    wise_alpha: Annotated[Optional[float], typer.Option(
        "--wise-alpha", min=0.0, max=1.0,
        help="With --baselines: use this WiSE-FT alpha (chosen elsewhere) instead of choosing one.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seeds DARE's random drop.")] = 0,
    min_base: MinBaseOpt = None,
    min_novel: MinNovelOpt = None,
    min_hm: MinHmOpt = None,
    max_forgetting: MaxForgettingOpt = None,
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
    data_flags: Any = None,
    kind_options: Any = None,
) -> None:
    """The forgetting report: zero-shot CLIP and each checkpoint on base / novel classes, optionally gated."""

    def action() -> None:
        from repair.cli.launch import launch, without_option
        from repair.data.group import agreed, init_from_env, leave, rank_and_world, rank_device
        from repair.eval import gate as gating
        from repair.io import append_text, check_appendable
        from repair.workflows.inputs import check_outside_input_folders, side_inputs
        from repair.render.report import eval_markdown
        from repair.workflows.evaluate import evaluate

        if nproc > 1 and rank_and_world()[1] == 1:
            raise typer.Exit(launch(nproc, without_option(sys.argv[1:], "--nproc")))
        init_from_env()  # also when started as `torchrun -m repair.cli eval ...`
        writes = rank_and_world()[0] == 0  # --markdown is written by rank 0 alone, and checked there
        with agreed():  # a gate file that one machine lacks, or rank 0's summary path, stops every rank alike
            thresholds = gating.assemble(gating.Thresholds(min_base, min_novel, min_hm, max_forgetting), gate,
                                         has_novel=bool(novel_data))
            if markdown is not None and writes:
                files, folders = side_inputs(data_flags.options(), BackboneSpec(model, pretrained, model_config)
                                             if model else None)
                check_outside_input_folders(markdown, [data, *(novel_data or []), *([val_data] if val_data else []),
                                                       *(val_novel_data or []), *folders])
                check_appendable(markdown, inputs=[*checkpoints, *files])
        with Progress("evaluating", quiet) as progress:
            report = evaluate(
                checkpoints, data, novel_dir=novel_data,
                backbone=BackboneSpec(model, pretrained, model_config) if model else None,
                data_options=data_flags.options(progress=progress),
                kind=value(kind), kind_options=kind_options, other_classes=other_classes,
                baselines=baseline or baselines, val_dir=val_data, val_novel_dir=val_novel_data,
                wise_alpha=wise_alpha, seed=seed,
                device=rank_device(device), precision=value(precision),
            )
        leave()  # every rank is done with the group here (nothing when not distributed)
        failures = gating.apply(report, thresholds)
        if markdown is not None and writes:
            append_text(markdown, eval_markdown(report, failures))
        emit(report, as_json, lambda: print_eval_table(report))
        for warning in report["warnings"]:
            say(f"warning: {warning}", err=True)
        gating.require_passed(failures)

    run(action)


def print_eval_table(report: dict[str, Any]) -> None:
    from repair.render.report import rich_table

    table, lines = rich_table(report)
    stdout.print(table)
    for line in lines:
        say(line)


@app.command("path")
@with_kind_options("path")
@with_flags("data_flags", DataFlags)
@with_flags("backbone", BackboneFlags)
def path_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint.")],
    repaired: Annotated[Path, typer.Argument(help="Its repaired version.")],
    data: Annotated[Path, typer.Option("--data", help="Labelled test images (an ImageFolder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the JSON report.")],
    png: Annotated[Optional[Path], typer.Option("--png", help="Also plot accuracy and loss along the paths.")] = None,
    points: Annotated[int, typer.Option("--points", help="Points per segment, t = 0 .. 1 (2..1001).")] = 11,
    kind: KindOpt = None,
    other_classes: OtherClassesOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    backbone: Any = None, data_flags: Any = None, kind_options: Any = None,
) -> None:
    """Accuracy and loss along zero-shot -> fine-tuned, zero-shot -> repaired and fine-tuned -> repaired."""

    def action() -> None:
        from repair.workflows.path import path_outputs

        report = path_outputs(
            finetuned, repaired, data, out, png=png, force=force,
            backbone=backbone.spec(), points=points, data_options=data_flags.options(),
            kind=value(kind), kind_options=kind_options, other_classes=other_classes, device=backbone.device,
        )

        for warning in report["warnings"]:
            say(f"warning: {warning}", err=True)

        def human() -> None:
            for segment in report["segments"]:
                say(f"{segment['name']}: loss barrier {segment['loss_barrier']:.4f}, accuracy drop "
                    f"{segment['accuracy_drop']:.2f} points")
            say(f"wrote {out}" + (f" and {png}" if png else ""))

        emit(report, as_json, human)
        for warning in report["warnings"]:
            say(f"warning: {warning}", err=True)

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
        from repair.workflows.verify import require_verified, verify

        backbone = BackboneSpec(model, pretrained, model_config) if model else None
        report = verify(output, finetuned=ft, data_dir=data, backbone=backbone)

        def human() -> None:
            for check in report["checks"]:
                say(f"{check['input']}: {'matches' if check['ok'] else 'DIFFERS'}")
            for note in report["notes"]:
                say(f"note: {note}", err=True)

        emit(report, as_json, human)
        require_verified(report)

    run(action)


@app.command("inspect")
def inspect_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint file (safetensors, torch, npz).")],
    kind: KindOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Name a checkpoint's kind, its tensors, shapes, dtypes, trainable numbers and metadata."""

    def action() -> None:
        from repair.workflows.inspect import inspect_checkpoint

        report = inspect_checkpoint(checkpoint, value(kind))
        emit(report, as_json, lambda: _print_inspection(report))

    run(action)


def _print_inspection(report: dict[str, Any]) -> None:
    import json

    from rich.table import Table

    say(f"{report['path']}: {report['kind']} checkpoint ({report['kind_title']}), {report['trainable_numbers']:,} "
        f"trainable numbers ({report['format']}, sha256 {report['sha256'][:12]})")
    table = Table("tensor", "shape", "dtype", "role")
    for tensor in report["tensors"][:50]:
        table.add_row(tensor["name"], str(tensor["shape"]), tensor["dtype"], tensor["role"])
    stdout.print(table)
    if len(report["tensors"]) > 50:
        say(f"... and {len(report['tensors']) - 50} more tensors (--json lists all)")
    if report["training_state"]:
        say(f"training state, not read: {len(report['training_state'])} optimizer/scheduler tensors "
            f"(e.g. {report['training_state'][0]['name']})")
    metadata = report["metadata"]
    towers = metadata.get("backbone") if isinstance(metadata.get("backbone"), dict) else {}
    if towers.get("image_tower"):
        say(f"towers: image {towers['image_tower']}, text {towers['text_tower']}")
    if metadata:
        summary = {key: metadata[key] for key in ("stage", "backbone", "objective", "seed") if key in metadata}
        stdout.print_json(json.dumps(summary or metadata))

