"""``mergetune repair`` and ``mergetune finetune``: thin calls into :mod:`repair.workflows.run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repair.cli.app import Progress, command_group, emit, run, say
from repair.cli.options import (
    BatchOpt,
    CacheDirOpt,
    ClassnamesOpt,
    DataOpt,
    DeterministicOpt,
    DeviceOpt,
    DtypeOpt,
    EpochsOpt,
    ForceOpt,
    JsonOpt,
    KindName,
    KindOpt,
    LrOpt,
    MaxStepsOpt,
    ModelConfigOpt,
    ModelOpt,
    MomentumOpt,
    NoCacheOpt,
    OutputDtype,
    Precision,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ResumeOpt,
    SeedOpt,
    ShotsOpt,
    SurrogateName,
    TemplatesOpt,
    ValOpt,
    WarmupOpt,
    WdOpt,
    WorkersOpt,
    data_options,
    value,
    with_kind_options,
)
from repair.model.backbone import BackboneSpec
from repair.train.loop import TrainConfig
from repair.train.objective import Objective
from repair.workflows.run import RunOutcome, finetune, repair

app = command_group()
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Where to write the safetensors file.")]


def report_run(outcome: RunOutcome, as_json: bool, verb: str) -> None:
    def human() -> None:
        record = outcome.record
        selected = f", kept epoch {record.result['selected_epoch']}" if record.result["selected_epoch"] else ""
        say(f"{verb} {outcome.path} ({record.kind}, {record.trainable_numbers} trainable numbers, "
            f"{record.result['steps']} steps{selected})")

    emit({"path": str(outcome.path), **outcome.record.as_dict()}, as_json, human)


@app.command("repair")
@with_kind_options("repair")
def repair_command(
    finetuned: Annotated[Path, typer.Argument(help="The fine-tuned checkpoint to repair.")],
    data: DataOpt,
    out: OutOpt,
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    kind: KindOpt = None,
    surrogate: Annotated[Optional[SurrogateName], typer.Option(
        "--surrogate", help="Zero-shot surrogate (default: the kind's, see README).")] = None,
    lam_zs: Annotated[Optional[float], typer.Option(
        "--lam-zs", min=0.0, help="Weight of the zero-shot surrogate (default: the kind's, see README).")] = None,
    lam_lmc: Annotated[float, typer.Option("--lam-lmc", min=0.0, help="Weight of the path term towards the input.")
                       ] = 1.0,
    path_points: Annotated[int, typer.Option("--path-points", min=1, help="K points t=(k+0.5)/K on the path.")] = 5,
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
    dtype: DtypeOpt = OutputDtype.input,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    deterministic: DeterministicOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    kind_options: dict[str, Any] | None = None,
) -> None:
    """Repair FINETUNED with MergeTune on the images in --data; write a same-shape checkpoint to --out."""

    def action() -> None:
        objective = Objective(lam_zs=lam_zs, lam_lmc=lam_lmc, path_points=path_points, surrogate=value(surrogate))
        config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed)
        with Progress("repairing", quiet) as progress:
            outcome = repair(
                finetuned, data, out, backbone=BackboneSpec(model, pretrained, model_config), objective=objective,
                config=config, kind=value(kind), kind_options=kind_options, output_dtype=value(dtype),
                device=device, precision=value(precision), force=force, resume=resume, deterministic=deterministic,
                on_step=progress.on_step, data_options=data_options(
                    classnames, templates, shots, val_fraction, cache_dir, no_cache, workers, progress),
            )
        report_run(outcome, as_json, "wrote")

    run(action)


@app.command("finetune")
@with_kind_options("finetune")
def finetune_command(
    data: DataOpt,
    out: OutOpt,
    kind: Annotated[KindName, typer.Option("--kind", help="What to fine-tune.")] = KindName("coop"),
    model: ModelOpt = "ViT-B-16",
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
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
    dtype: DtypeOpt = OutputDtype.input,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    deterministic: DeterministicOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    kind_options: dict[str, Any] | None = None,
) -> None:
    """Plain fine-tuning from zero-shot (no repair terms): makes the baseline checkpoint to repair."""

    def action() -> None:
        config = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                             weight_decay=weight_decay, warmup_epochs=warmup_epochs, seed=seed)
        with Progress("fine-tuning", quiet) as progress:
            outcome = finetune(
                value(kind), data, out, backbone=BackboneSpec(model, pretrained, model_config), config=config,
                kind_options=kind_options, output_dtype=value(dtype), device=device, precision=value(precision),
                force=force, resume=resume, deterministic=deterministic, on_step=progress.on_step,
                data_options=data_options(classnames, templates, shots, val_fraction, cache_dir, no_cache, workers,
                                          progress),
            )
        report_run(outcome, as_json, "wrote")

    run(action)
