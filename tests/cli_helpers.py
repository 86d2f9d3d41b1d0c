"""Running the command line in-process, as the CLI tests do (imported by them; tests/ is on sys.path)."""

from __future__ import annotations

from typer.testing import CliRunner

from repair.cli.app import app

runner = CliRunner()


def invoke(*args: object):
    """``mergetune ARGS`` in this process; a traceback in the output fails the test whatever the exit code."""
    result = runner.invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output
    return result


def fast(tiny_spec) -> list[str]:
    """Flags for the shortest training run on the tiny CLIP (one epoch, four shots, no cache)."""
    return ["--model", tiny_spec.model, "--epochs", "1", "--shots", "4", "--batch-size", "8", "--no-cache", "-q"]
