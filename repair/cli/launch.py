"""``mergetune eval --nproc N``: the same command as N ranks under torchrun, on one machine or several.

Under torchrun, ``python -m repair.cli.launch ARGS`` is one rank of ``mergetune ARGS``. It
initialises the process group, keeps ranks other than 0 quiet and records each rank's exit
code, because torchrun itself turns every failure into exit 1 and a traceback, which would
break the documented exit codes (a failed gate must still exit 11).

Started by hand, ``python -m repair.cli.launch TORCHRUN_OPTIONS -- ARGS`` is one machine's
share of a multi-machine run: it starts torchrun with those options (``--nnodes``,
``--rdzv-endpoint``, ...) and exits with the documented code, as ``--nproc`` does locally.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from repair.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

LAUNCH_DIR_ENV = "MERGETUNE_LAUNCH_DIR"  # set by launch(): where ranks leave exit codes and logs


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``mergetune ARGV`` as ``nproc`` ranks under torchrun on this machine; returns its exit code.

    Rank 0 prints as usual; the other ranks write to logs, shown only when one of them is
    the sole rank to fail. The exit code is rank 0's, else the first failing rank's.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    options = ["--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return _run_torchrun(options, argv, nproc)


def launch_node(argv: list[str]) -> int:
    """``python -m repair.cli.launch TORCHRUN_OPTIONS -- ARGS``: this machine's ranks of a multi-machine run.

    Every machine runs the same line (its own ``--node-rank`` with a static rendezvous). The machine
    holding rank 0 prints the report; each machine exits with the code its ranks recorded.
    """
    options, command = _split_at_separator(argv)
    return _run_torchrun(options, command, _processes_per_node(options))


def _run_torchrun(options: list[str], argv: list[str], nproc: int) -> int:
    """torchrun OPTIONS -m repair.cli.launch ARGV, its ranks' exit codes collected in a folder of this machine."""
    with tempfile.TemporaryDirectory(prefix="mergetune-launch-") as folder:
        env = {**os.environ, LAUNCH_DIR_ENV: folder}
        # torchrun would otherwise pin every rank to one thread, and say so on stderr
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # torchrun's own log lines are not the user's errors (the ranks report theirs, one line): at the end of a
        # multi-machine run an agent can lose the store in its exit barrier, when the machine that hosts it leaves
        # first, and log that with a traceback although every rank is done. LOGLEVEL given by the user wins.
        env.setdefault("LOGLEVEL", "CRITICAL")
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # the C++ side's socket warnings, likewise
        command = [sys.executable, "-m", "torch.distributed.run", *options, "-m", "repair.cli.launch", *argv]
        with subprocess.Popen(command, env=env) as process, _passing_sigterm_to(process):
            try:
                returncode = process.wait()
            except KeyboardInterrupt:  # the ranks got the same Ctrl-C: let torchrun wind them down
                returncode = process.wait()
        return _exit_code(Path(folder), returncode)


@contextlib.contextmanager
def _passing_sigterm_to(process: subprocess.Popen) -> Iterator[None]:
    """While torchrun runs, a SIGTERM for us goes to it: it stops the ranks, which record 143, rather
    than this process dying alone and leaving them running."""
    if threading.current_thread() is not threading.main_thread():  # signals can only be set there
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _split_at_separator(argv: list[str]) -> tuple[list[str], list[str]]:
    """``TORCHRUN_OPTIONS -- ARGS`` -> (options, args); a bare ``--`` keeps option values and
    command names apart (``--rdzv-id eval`` stays an option)."""
    if "--" not in argv:
        raise ValueError("expected TORCHRUN_OPTIONS -- COMMAND ARGS")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def _processes_per_node(options: list[str]) -> int:
    """``--nproc-per-node`` among torchrun's options, to share the cores; 1 (torchrun's default)
    when absent or not a number (``auto``, ``gpu``)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--nproc-per-node", "--nproc_per_node", default="1")
    value = parser.parse_known_args(options)[0].nproc_per_node
    return int(value) if value.isdigit() and int(value) > 0 else 1


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a one-machine rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _exit_code(folder: Path, returncode: int) -> int:
    """Rank 0's recorded code, unless it only crashed (exit 1) because another rank stopped with a
    refusal of its own (its connection closed); else the first failing rank's, with its log; else torchrun's.

    Ranks record under their global rank, so on a machine without rank 0 (``rank2.exit``,
    ``rank3.exit`` ...) the code is still that of the ranks there.
    """
    failed = {rank: code for rank, code in _recorded_codes(folder).items() if code}
    refusals = [rank for rank, code in failed.items() if code != EXIT_INTERNAL]
    if 0 in failed and (failed[0] != EXIT_INTERNAL or not refusals):
        return failed[0]  # rank 0 explained it itself
    if not failed:
        return returncode
    cause = refusals[0] if refusals else next(iter(failed))
    log = folder / f"rank{cause}.log"
    if log.is_file():
        sys.stderr.write(f"rank {cause} failed:\n{log.read_text(errors='replace')}")
    return failed[cause]


def _recorded_codes(folder: Path) -> dict[int, int]:
    """{global rank: exit code} of the ranks that recorded one here, in rank order."""
    codes = {}
    for recorded in folder.glob("rank*.exit") if folder.is_dir() else ():
        match = re.fullmatch(r"rank(\d+)\.exit", recorded.name)
        if match:
            codes[int(match.group(1))] = int(recorded.read_text())
    return dict(sorted(codes.items()))


def _run_worker(argv: list[str]) -> int:
    """One rank of :func:`launch`: join the group, run the CLI, record its exit code.

    Returns what torchrun should see: 0 for the CLI's handled refusals (every rank meets the
    same one, and rank 0 already said it in one line), the real code for crashes (exit 1), so
    that torchrun stops the other ranks at once. Under a bare torchrun (no launcher to read the
    recorded code) every failure is returned as it is: torchrun's exit 1 beats a failed gate's 0.
    """
    from repair.cli.app import TERMINATED, install_sigterm_handler  # typer and rich: quick, unlike torch

    install_sigterm_handler()  # from the first moment, as `mergetune` does: imports take a while
    rank = _rank_from_env()
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if rank != 0:
        _redirect_output(os.path.join(folder, f"rank{rank}.log") if folder else os.devnull)
    code = EXIT_INTERNAL
    try:
        from repair.cli.app import app
        from repair.data.group import init_from_env

        init_from_env()
        app(args=argv, prog_name="mergetune")  # click would name us after this module otherwise
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_INTERNAL)
    except Terminated:  # before the CLI could catch it, e.g. while importing
        code = EXIT_TERMINATED
        sys.stderr.write(TERMINATED + "\n")
    except KeyboardInterrupt:  # the same, for Ctrl-C
        code = EXIT_INTERRUPTED
        raise
    finally:
        if folder:
            Path(folder, f"rank{rank}.exit").write_text(str(code))
        if code != EXIT_INTERNAL:  # a handled end (a refusal every rank meets alike, or success): leave together
            _leave_group()
    return code if code == EXIT_INTERNAL or not folder else 0


def _leave_group() -> None:
    """Meet the other ranks at a bounded barrier and tear the group down (nothing if none was joined), so no
    rank closes its connections while a peer still exchanges: left to interpreter exit, gloo's threads can abort
    a rank that has finished (SIGABRT), its machine's torchrun then fails and rank 0's waits 300 s for it."""
    if "torch.distributed" in sys.modules:  # not imported: no group (a refusal or a signal during the imports)
        from repair.data.group import leave

        leave()


def _rank_from_env() -> int:
    """torchrun's RANK, read before torch is imported (that takes seconds, and SIGTERM may come first)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _redirect_output(log: str) -> None:
    """Send this rank's stdout (file descriptors, so every writer) nowhere and its stderr to ``log``:
    its report would repeat rank 0's, its errors may be the ones to show."""
    sys.stdout.flush()
    sys.stderr.flush()
    for descriptor, path in ((1, os.devnull), (2, log)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, descriptor)
        os.close(target)


def without_option(argv: list[str], option: str) -> list[str]:
    """argv minus ``option VALUE`` / ``option=VALUE``: the workers must not see the launcher's own flag
    (torchrun would also take ``--nproc`` for its ``--nproc-per-node``)."""
    kept, skip = [], False
    for argument in argv:
        if skip:
            skip = False
        elif argument == option:
            skip = True
        elif not argument.startswith(option + "="):
            kept.append(argument)
    return kept


def main(argv: list[str]) -> int:
    """A rank when torchrun started us (it sets LOCAL_RANK), else a machine's launcher if given ``--``."""
    if "LOCAL_RANK" not in os.environ and "--" in argv:
        return launch_node(argv)
    return _run_worker(argv)


def exit_rank(code: int) -> None:
    """End a rank at once with ``code``, its output flushed: the interpreter's own teardown is where gloo's
    threads, still running in a process that never destroyed its group, abort a finished rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    if "LOCAL_RANK" in os.environ:  # a rank under torchrun (its code is recorded, its group left)
        exit_rank(exit_code)
    sys.exit(exit_code)
