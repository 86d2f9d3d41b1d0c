"""``mergetune demo``: forgetting and its repair, offline, on the embedded pretrained CLIP and real photos."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.cli.app import Progress, command_group, emit, run, say
from repair.cli.evaluate import print_eval_table
from repair.cli.options import ForceOpt, JsonOpt, QuietOpt

app = command_group()


class DemoKind(str, enum.Enum):
    coop = "coop"
    clipfit = "clipfit"
    all = "all"


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its checkpoints, report, plot "
                                                           "and model card.")] = Path("mergetune-demo"),
    kind: Annotated[Optional[list[DemoKind]], typer.Option(
        "--kind", help="What to fine-tune and repair: coop (default), clipfit, or all (both).")] = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a CLIP on five classes, see it forget five others, repair it: offline, with the defaults, on
    the embedded mergetune-mini and 316 Caltech-101 photos that ship with mergetune."""

    def action() -> None:
        from repair.workflows.demo import DEMO_KINDS, run_demo

        chosen = [item.value for item in kind or [DemoKind.coop]]
        kinds = list(DEMO_KINDS) if "all" in chosen else list(dict.fromkeys(chosen))
        with Progress("demo", quiet or as_json) as progress:
            runs = run_demo(workdir, kinds=kinds, force=force, on_step=progress.on_step,
                            say=(lambda text: None) if quiet or as_json else (lambda text: say(text, err=True)))

        def human() -> None:
            for demo in runs:
                say(f"\n{demo.kind}: {demo.finetuned.name} and {demo.repaired.name} on the test photos "
                    f"(base: 5 classes it was fine-tuned on; novel: 5 it never saw)")
                print_eval_table(demo.report)
                say(f"files: {demo.repaired}, {demo.card}" + (f", {demo.path_png}" if demo.path_png else ""))
            for demo in runs:
                say(demo.summary())

        # one kind: exactly `mergetune eval --json`'s report; several: those reports by kind
        emit(runs[0].report if len(runs) == 1 else {demo.kind: demo.report for demo in runs}, as_json, human)

    run(action)
