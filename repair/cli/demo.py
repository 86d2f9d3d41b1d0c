"""``mergetune demo``: the whole workflow offline on a built-in tiny CLIP."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repair.cli.app import Progress, command_group, run, say
from repair.cli.evaluate import print_eval_table
from repair.cli.options import ForceOpt, QuietOpt

app = command_group()


@app.command("demo")
def demo_command(
    workdir: Annotated[Path, typer.Option("--workdir", help="Where the demo writes its model, images and files.")
                       ] = Path("mergetune-demo"),
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the whole workflow offline on a built-in tiny CLIP and generated images."""

    def action() -> None:
        from repair.workflows.demo import READING_THE_DEMO, run_demo

        with Progress("demo", quiet) as progress:
            report = run_demo(workdir, force=force, on_step=progress.on_step, say=lambda text: say(text, err=True))
        print_eval_table(report)
        say(READING_THE_DEMO)

    run(action)
