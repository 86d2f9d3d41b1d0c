"""``mergetune repair`` and ``mergetune finetune``: thin calls into :mod:`repair.workflows.run`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repair.cli.app import Progress, command_group, emit, run, say
from repair.cli.options import (
    BackboneFlags,
    DataFlags,
    KindName,
    IfNoGain,
    KindOpt,
    OtherClassesOpt,
    OutputFormat,
    RunFlags,
    ShotsOpt,
    SurrogateName,
    ValOpt,
    VocabularyOpt,
    lam_zs_value,
    value,
    with_flags,
    with_kind_options,
)
from repair.train.loop import TrainConfig
from repair.train.objective import MAX_PATH_POINTS, Objective
from repair.workflows.run import RunOutcome, finetune, repair

app = command_group()
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Where to write the output (see --format).")]


def report_run(outcome: RunOutcome, as_json: bool) -> None:
    def human() -> None:
        record = outcome.record
        selected = f", kept epoch {record.result['selected_epoch']}" if record.result["selected_epoch"] else ""
        say(f"wrote {outcome.path} ({record.kind}, {record.trainable_numbers} trainable numbers, "
            f"{record.result['steps']} steps{selected})")

    for note in outcome.notes:
        say(f"note: {note}", err=True)
    emit({"path": str(outcome.path), **outcome.record.as_dict(), "notes": outcome.notes}, as_json, human)


def train_and_report(verb: str, workflow: Callable[..., RunOutcome], backbone: BackboneFlags, data_flags: DataFlags,
                     shots: Optional[int], val_fraction: float, settings: RunFlags, **arguments: Any) -> None:
    """What both commands do around their workflow: progress, the shared flags, the report."""
    def action() -> None:
        with Progress(verb, settings.quiet) as progress:
            outcome = workflow(backbone=backbone.spec(), device=backbone.device, on_step=progress.on_step,
                               data_options=data_flags.options(shots, val_fraction, progress),
                               **settings.settings(), **arguments)
        report_run(outcome, settings.as_json)

    run(action)


@app.command("repair")
@with_kind_options("repair")
@with_flags("settings", RunFlags)
@with_flags("data_flags", DataFlags)
@with_flags("config", TrainConfig)
@with_flags("backbone", BackboneFlags)
def repair_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint to repair.")],
    data: Annotated[Path, typer.Option("--data", help="ImageFolder directory: one sub-folder per class.")],
    out: OutOpt,
    kind: KindOpt = None,
    surrogate: Annotated[Optional[SurrogateName], typer.Option(
        "--surrogate", help="Zero-shot surrogate (default: the kind's, see README).")] = None,
    lam_zs: Annotated[Optional[str], typer.Option(
        "--lam-zs", callback=lam_zs_value, metavar="FLOAT|auto",
        help="Weight of the zero-shot surrogate, or 'auto': chosen on a held-out quarter of the shots "
             "(default: the kind's, see README).")] = None,
    vocabulary: VocabularyOpt = None,
    lam_lmc: Annotated[float, typer.Option("--lam-lmc", help="Weight of the path term towards the input (>= 0).")
                       ] = 1.0,
    path_points: Annotated[int, typer.Option(
        "--path-points", help=f"K points t=(k+0.5)/K on the path (1..{MAX_PATH_POINTS}).")] = 5,
    other_classes: OtherClassesOpt = False,
    if_no_gain: Annotated[IfNoGain, typer.Option(
        "--if-no-gain", help="When the checkpoint scores no better than zero-shot on --data (its fine-tuning gained "
                             "nothing to keep): write the zero-shot weights in its shape, or repair it anyway.")
                          ] = IfNoGain("zero-shot"),
    output_format: Annotated[Optional[OutputFormat], typer.Option(
        "--format", help="Output packaging: 'input' (the input's own: a Dassl checkpoint stays one, a Hugging Face "
                         "folder stays one; other files become safetensors) or 'safetensors' [default: input, or "
                         "safetensors when --out ends in .safetensors].")] = None,
    shots: ShotsOpt = 16,
    val_fraction: ValOpt = 0.0,
    backbone: Any = None, config: Any = None, data_flags: Any = None, settings: Any = None,
    kind_options: Any = None,
) -> None:
    """Repair FINETUNED with MergeTune on the images in --data; write a same-shape checkpoint to --out."""

    objective = run(lambda: Objective(lam_zs=lam_zs, lam_lmc=lam_lmc, path_points=path_points,
                                      surrogate=value(surrogate)))  # refuses e.g. --lam-zs inf in one line
    train_and_report("repairing", functools.partial(repair, finetuned, data, out, objective=objective),
                     backbone, data_flags, shots, val_fraction, settings, config=config, kind=value(kind),
                     kind_options=kind_options, other_classes=other_classes, vocabulary=vocabulary,
                     output_format=value(output_format), if_no_gain=value(if_no_gain))


@app.command("finetune")
@with_kind_options("finetune")
@with_flags("settings", RunFlags)
@with_flags("data_flags", DataFlags)
@with_flags("config", TrainConfig)
@with_flags("backbone", BackboneFlags)
def finetune_command(
    data: Annotated[Path, typer.Option("--data", help="ImageFolder directory: one sub-folder per class.")],
    out: OutOpt,
    kind: Annotated[KindName, typer.Option("--kind", help="What to fine-tune.")] = KindName("coop"),
    shots: ShotsOpt = 16,
    val_fraction: ValOpt = 0.0,
    backbone: Any = None, config: Any = None, data_flags: Any = None, settings: Any = None,
    kind_options: Any = None,
) -> None:
    """Plain fine-tuning from zero-shot (no repair terms): makes the baseline checkpoint to repair."""

    train_and_report("fine-tuning", functools.partial(finetune, value(kind), data, out), backbone, data_flags,
                     shots, val_fraction, settings, config=config, kind_options=kind_options)
