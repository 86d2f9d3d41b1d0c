"""``mergetune soup``: a thin call into :func:`repair.workflows.soup.soup`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repair.cli.app import Progress, command_group, emit, run, say
from repair.cli.options import (
    DataFlags,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    KindOpt,
    ModelConfigOpt,
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


@app.command("soup")
@with_kind_options("eval")
@with_flags("data_flags", DataFlags)
def soup_command(
    checkpoints: Annotated[list[Path], typer.Argument(help="Checkpoints of one kind, e.g. one per seed.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the soup (the first checkpoint's format).")],
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Labelled validation images of their classes: the soup is then greedy (each checkpoint kept "
                       "only if the soup's score does not drop) [default: uniform].")] = None,
    novel_data: Annotated[Optional[list[Path]], typer.Option(
        "--novel-data", help="With --data: validation images of held-out classes (greedy on HM); repeatable.")
    ] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="open_clip model name, local-dir:PATH or hf-hub:ORG/NAME [default: the one the first "
                        "checkpoint records, else ViT-B-16].")] = None,
    pretrained: PretrainedOpt = "openai",
    model_config: ModelConfigOpt = None,
    kind: KindOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.fp32,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    data_flags: Any = None,
    kind_options: Any = None,
) -> None:
    """Average fine-tuned checkpoints of one kind into one (a model soup): uniform, or greedy on --data."""

    def action() -> None:
        from repair.workflows.soup import soup

        with Progress("souping", quiet) as progress:
            outcome = soup(checkpoints, out, data_dir=data, novel_dir=novel_data,
                           backbone=BackboneSpec(model, pretrained, model_config) if model else None,
                           data_options=data_flags.options(progress=progress), kind=value(kind),
                           kind_options=kind_options, device=device, precision=value(precision), force=force)

        def human() -> None:
            kept = [item["name"] for item in outcome.report["ingredients"] if item["kept"]]
            say(f"wrote {outcome.path} ({outcome.record.kind}, {outcome.report['method']} soup of {len(kept)} of "
                f"{len(outcome.report['ingredients'])} checkpoints: {', '.join(kept)})")

        emit({"path": str(outcome.path), **outcome.record.as_dict()}, as_json, human)

    run(action)
