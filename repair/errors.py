"""The errors a user of mergetune can meet, each with its own process exit code.

Every command maps a :class:`MergetuneError` to one line on stderr and ``exit_code``;
anything else is a bug and exits with :data:`EXIT_INTERNAL`. The README's exit-code
table is generated from :data:`EXIT_CODES`, so keep the two in one place: here.
"""

from __future__ import annotations

import threading

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2  # click/typer's own code for bad options


class MergetuneError(Exception):
    """Base class: a problem with the user's inputs or environment, not a bug."""

    exit_code = 10
    summary = "any other refusal by mergetune"


class UsageError(MergetuneError):
    """A value or option the command cannot take (found after parsing, e.g. once the kind is known)."""

    exit_code = EXIT_USAGE
    summary = "bad command-line usage (unknown option, bad value, an option that does not apply)"


class InputFileError(MergetuneError):
    """An input file is missing, unreadable, corrupt or of an unknown format."""

    exit_code = 3
    summary = "input file missing, unreadable or corrupt"


class UnsafeFileError(InputFileError):
    """A pickle that would need arbitrary code to load (refused, never executed)."""

    exit_code = 4
    summary = "file refused: loading it would run code"


class IncompatibleCheckpointError(MergetuneError):
    """The checkpoint does not fit the model, the classes or the requested kind."""

    exit_code = 5
    summary = "checkpoint does not fit the model, classes or kind"


class DataError(MergetuneError):
    """The image folder, class-name file or template file cannot be used."""

    exit_code = 6
    summary = "data folder, class names or templates unusable"


class WeightsUnavailableError(MergetuneError):
    """Backbone weights cannot be loaded (offline and not cached, unknown tag, bad file)."""

    exit_code = 7
    summary = "backbone weights unavailable"


class OutputExistsError(MergetuneError):
    """The output exists (and --force was not given), would overwrite an input, or cannot be written."""

    exit_code = 8
    summary = "output exists, would overwrite an input, or cannot be written"


class NumericalError(MergetuneError):
    """Non-finite values: NaN/Inf in an input tensor or in the loss during training."""

    exit_code = 9
    summary = "NaN or Inf in an input or in the loss"


class GateFailedError(MergetuneError):
    """A release gate threshold (``--min-base`` and friends) did not hold."""

    exit_code = 11
    summary = "a release gate threshold failed"


class ProvenanceError(MergetuneError):
    """``verify``: an input differs from the one recorded when the checkpoint was made."""

    exit_code = 13
    summary = "provenance check failed: an input differs from the recorded one"


class HubError(MergetuneError):
    """A Hugging Face Hub request failed (no token, no permission, server error)."""

    exit_code = 12
    summary = "Hugging Face Hub request failed"


EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process that died of it


class Terminated(BaseException):
    """SIGTERM, turned by the CLI into an exception so every cleanup runs, as for Ctrl-C."""


_termination_requested = threading.Event()


def request_termination() -> None:
    """Remember a SIGTERM beyond the exception the CLI raises for it: raised inside a C extension's callback
    (pydantic-core's validators, for one), that exception is reported as unraisable and dropped."""
    _termination_requested.set()


def stop_if_terminated() -> None:
    """The safe points where a remembered SIGTERM stops a run: every training step and before an output is
    put in place, so a run that was asked to stop never writes its output."""
    if _termination_requested.is_set():
        raise Terminated()


def forget_termination() -> None:
    """Once a termination is reported (the process exits; in-process callers such as tests go on)."""
    _termination_requested.clear()


ERROR_CLASSES: tuple[type[MergetuneError], ...] = (
    UsageError,
    InputFileError,
    UnsafeFileError,
    IncompatibleCheckpointError,
    DataError,
    WeightsUnavailableError,
    OutputExistsError,
    NumericalError,
    GateFailedError,
    HubError,
    ProvenanceError,
)

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it; --debug shows the traceback)",
    **{cls.exit_code: cls.summary for cls in ERROR_CLASSES},
    MergetuneError.exit_code: MergetuneError.summary,
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); no partial output is left behind, progress is kept for --resume",
    EXIT_TERMINATED: "terminated (SIGTERM); no partial output is left behind, progress is kept for --resume",
}
