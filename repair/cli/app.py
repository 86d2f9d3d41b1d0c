"""The `mergetune` command line: the app, its one error boundary and its one output sink.

Commands live one group per module (``repair.cli.train``, ``.evaluate``, ``.hub``, ``.demo``)
and are imported only when run: ``mergetune --help`` and ``--version`` never load torch or
open_clip. Errors become one line on stderr and a documented exit code in one place,
:func:`run`; ``--debug`` (or ``MERGETUNE_DEBUG=1``) shows tracebacks instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from repair.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, MergetuneError, Terminated,
                           forget_termination, request_termination)

# command -> (module holding it, one-line help shown by `mergetune --help` without importing it)
COMMANDS = {
    "repair": ("repair.cli.train", "Repair a fine-tuned checkpoint with MergeTune; write a same-shape file."),
    "finetune": ("repair.cli.train", "Plain fine-tuning from zero-shot: makes the baseline to repair."),
    "eval": ("repair.cli.evaluate", "The forgetting report: zero-shot and each checkpoint, optionally gated."),
    "soup": ("repair.cli.soup", "Average checkpoints of one kind (e.g. seeds): uniform, or greedy on --data."),
    "path": ("repair.cli.evaluate", "Accuracy and loss along the straight paths between the three models."),
    "verify": ("repair.cli.evaluate", "Recompute the recorded input hashes; say which input differs."),
    "inspect": ("repair.cli.evaluate", "A checkpoint's kind, tensors, trainable numbers and record."),
    "push": ("repair.cli.hub", "Upload a checkpoint with a generated model card to the Hugging Face Hub."),
    "demo": ("repair.cli.demo", "Watch a CLIP forget and its repair, offline, on the embedded mergetune-mini."),
}

TERMINATED = "terminated; no output was written (progress is kept for --resume)"
stdout = Console()
stderr = Console(stderr=True)
T = TypeVar("T")
_state = {"debug": os.environ.get("MERGETUNE_DEBUG", "") not in ("", "0"), "json": False, "emitted": False}


class LazyCommands(TyperGroup):
    """Import a command's module only when that command runs (or shows its own help)."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in COMMANDS:
            return None
        group = typer.main.get_command(import_module(COMMANDS[name][0]).app)
        return group.get_command(ctx, name) if isinstance(group, TyperGroup) else group

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short_help) for name, (_, short_help) in COMMANDS.items()])

    def make_context(self, info_name: Any, args: list[str], *rest: Any, **kwargs: Any) -> Any:
        # --json promises JSON on stdout, also for a failure: known before the command line is even parsed
        _state.update(json="--json" in args[: args.index("--") if "--" in args else None], emitted=False)
        with _one_line_usage_errors():
            return super().make_context(info_name, args, *rest, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


# click's UsageError as typer raises it: typer 0.12 uses click itself, newer versions a vendored copy
ClickUsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


class OneLineUsageError(ClickUsageError):
    """A usage error shown like every other error: one line on stderr (exit code 2), no usage block."""

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx is not None else "mergetune"
        fail(f"error: {self.format_message()} (see '{command} --help')", self.exit_code)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """Turn click's usage errors (unknown option, bad value, missing argument) into :class:`OneLineUsageError`;
    a bare ``mergetune`` still shows the help."""
    try:
        yield
    except ClickUsageError as error:
        if isinstance(error, OneLineUsageError) or type(error).__name__ == "NoArgsIsHelpError":
            raise
        raise OneLineUsageError(error.format_message(), error.ctx) from None


app = typer.Typer(
    name="mergetune",
    help="Repair fine-tuned CLIP checkpoints that forgot what zero-shot CLIP knew (MergeTune).",
    cls=LazyCommands,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def command_group() -> typer.Typer:
    """A command module's own Typer app, set up like the main one."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def run(action: Callable[[], T]) -> T:
    """Run a command body: MergetuneError -> one line + its exit code; bugs -> exit 1.

    SIGTERM is handled like Ctrl-C while the body runs: cleanups run, progress is kept, one line.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return action()
    except Terminated:
        forget_termination()
        fail(TERMINATED, EXIT_TERMINATED)
        raise typer.Exit(EXIT_TERMINATED) from None
    except MergetuneError as exc:
        if _state["debug"]:
            raise
        fail(f"error: {exc}", exc.exit_code)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        fail("interrupted; no output was written (progress is kept for --resume)", EXIT_INTERRUPTED)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as exc:  # a bug: say so plainly, keep the traceback behind --debug
        if _state["debug"]:
            raise
        fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_INTERNAL)
        raise typer.Exit(EXIT_INTERNAL) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM -> :class:`Terminated`, except inside an import, where it is asked again shortly.

    Importing torch runs Python callbacks from C++ (pybind11); an exception raised there crosses C++ frames
    that cannot pass it on, and the process aborts (SIGABRT) instead of exiting 143; raised in importlib's own
    callbacks it is ignored, and the run goes on. The signal is sent again every 50 ms until the import is
    done, so it stops the run as soon as unwinding is safe. Other C callbacks swallow it too (pydantic-core's
    validators): the request is remembered, and the next training step or output write stops the run."""
    request_termination()  # kept for the next safe point if the exception below is swallowed
    if _inside_import(frame):
        _ask_again(signum)
        return
    raise Terminated()


def install_sigterm_handler() -> None:
    """SIGTERM -> :class:`Terminated` for the whole process, and no traceback for one a C callback swallowed
    (it is remembered, and stops the run at its next safe point: :func:`repair.errors.stop_if_terminated`)."""
    signal.signal(signal.SIGTERM, _terminate)
    sys.unraisablehook = _quiet_unraisable


def _quiet_unraisable(unraisable: Any) -> None:
    if not isinstance(unraisable.exc_value, Terminated):
        sys.__unraisablehook__(unraisable)


def _ask_again(signum: int, after_s: float = 0.05) -> None:
    timer = threading.Timer(after_s, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _inside_import(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def say(text: str, *, err: bool = False) -> None:
    """One plain line for people (never Rich markup: paths and class names may hold brackets)."""
    (stderr if err else stdout).print(text, markup=False, highlight=False, soft_wrap=True)


def emit(document: Any, as_json: bool, human: Callable[[], None]) -> None:
    """The one output decision: strict JSON on stdout (no NaN, no Infinity), or the human form."""
    if as_json:
        stdout.out(json.dumps(_strict(document), allow_nan=False), highlight=False)
        _state["emitted"] = True  # a refusal after the report (a failed gate) must not add a second document
    else:
        human()


def fail(line: str, exit_code: int) -> None:
    """A failure's one line on stderr; with --json also a JSON error document on stdout (unless the command
    already printed its document), so a CI step that redirects stdout never reads an empty file."""
    say(line, err=True)
    if _state.get("json") and not _state.get("emitted"):
        message = line.removeprefix("error: ")
        stdout.out(json.dumps({"error": message, "exit_code": exit_code}), highlight=False)
        _state["emitted"] = True


def _strict(value: Any) -> Any:
    """Non-finite floats have no JSON spelling: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


class Progress:
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

    def __enter__(self) -> Progress:
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


def _version(show: bool) -> None:
    if show:
        from repair import __version__

        say(f"mergetune {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Repair fine-tuned CLIP checkpoints that forgot what zero-shot CLIP knew (MergeTune)."""
    if debug:
        _state["debug"] = True


def main() -> None:
    """The entry point: SIGTERM is handled from the first moment (imports, model loading), not only in commands."""
    install_sigterm_handler()
    try:
        app()
    except Terminated:
        forget_termination()
        stderr.print(TERMINATED, markup=False)
        raise SystemExit(EXIT_TERMINATED) from None
