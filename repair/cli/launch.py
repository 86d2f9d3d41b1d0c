"""``mergetune eval --nproc N``: the same command as N ranks under torchrun on this machine.

``python -m repair.cli.launch ARGS`` is one rank of ``mergetune ARGS``. It initialises the
process group, keeps ranks other than 0 quiet and records each rank's exit code, because
torchrun itself turns every failure into exit 1 and a traceback, which would break the
documented exit codes (a failed gate must still exit 11).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from repair.data.group import init_from_env, rank_and_world
from repair.errors import EXIT_INTERNAL, EXIT_INTERRUPTED

LAUNCH_DIR_ENV = "MERGETUNE_LAUNCH_DIR"  # set by launch(): where ranks leave exit codes and logs


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``mergetune ARGV`` as ``nproc`` ranks under torchrun on this machine; returns its exit code.

    Rank 0 prints as usual; the other ranks write to logs, shown only when one of them is
    the sole rank to fail. The exit code is rank 0's, else the first failing rank's.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="mergetune-launch-") as folder:
        env = {**os.environ, LAUNCH_DIR_ENV: folder}
        # torchrun would otherwise pin every rank to one thread, and say so on stderr
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   "-m", "repair.cli.launch", *argv]
        with subprocess.Popen(command, env=env) as process:
            try:
                returncode = process.wait()
            except KeyboardInterrupt:  # the ranks got the same Ctrl-C: let torchrun wind them down
                returncode = process.wait()
        return _exit_code(Path(folder), nproc, returncode)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _exit_code(folder: Path, nproc: int, returncode: int) -> int:
    codes = {}
    for rank in range(nproc):
        recorded = folder / f"rank{rank}.exit"
        if recorded.is_file():
            codes[rank] = int(recorded.read_text())
    if codes.get(0):
        return codes[0]
    for rank, code in codes.items():
        if code:
            log = folder / f"rank{rank}.log"
            if log.is_file():
                sys.stderr.write(f"rank {rank} failed:\n{log.read_text(errors='replace')}")
            return code
    return returncode


def _run_worker(argv: list[str]) -> int:
    """One rank of :func:`launch`: join the group, run the CLI, record its exit code.

    Returns what torchrun should see: 0 for the CLI's handled refusals (every rank meets the
    same one, and rank 0 already said it in one line), the real code for crashes (exit 1), so
    that torchrun stops the other ranks at once.
    """
    rank, _ = rank_and_world()
    folder = os.environ.get(LAUNCH_DIR_ENV)
    if rank != 0:
        _redirect_output(os.path.join(folder, f"rank{rank}.log") if folder else os.devnull)
    code = EXIT_INTERNAL
    try:
        init_from_env()
        from repair.cli.app import app

        app(args=argv, prog_name="mergetune")  # click would name us after this module otherwise
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_INTERNAL)
    except KeyboardInterrupt:  # before the CLI could catch it, e.g. while importing
        code = EXIT_INTERRUPTED
        raise
    finally:
        if folder:
            Path(folder, f"rank{rank}.exit").write_text(str(code))
    return code if code == EXIT_INTERNAL else 0


def _redirect_output(path: str) -> None:
    """Point this process's stdout and stderr (file descriptors, so every writer) at ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(target, 1)
    os.dup2(target, 2)
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


if __name__ == "__main__":
    sys.exit(_run_worker(sys.argv[1:]))
