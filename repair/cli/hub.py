"""``mergetune push``: a thin call into :mod:`repair.workflows.hub`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from repair.cli.app import command_group, emit, run, say
from repair.cli.options import JsonOpt

app = command_group()


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
    license: Annotated[Optional[str], typer.Option(
        "--license", help="The card's license (a Hub id: mit, apache-2.0, ...) [default: the base model's, where "
                          "its card is in the local Hugging Face cache].")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a checkpoint with a generated model card to the Hugging Face Hub (token: HF login or HF_TOKEN)."""

    def action() -> None:
        from repair.workflows.hub import push

        result = push(checkpoint, repo, private=private, revision=revision, eval_report=eval_json,
                      dry_run_dir=dry_run, commit_message=message, license=license)

        def human() -> None:
            if result.dry_run:
                say(f"dry run: wrote {', '.join(result.files)} to {dry_run}; nothing was uploaded")
            else:
                say(f"pushed {', '.join(result.files)} to {result.repo_id}"
                    + (f" ({result.commit_url})" if result.commit_url else ""))

        emit(asdict(result), as_json, human)

    run(action)
