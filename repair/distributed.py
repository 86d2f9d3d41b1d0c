"""Encoding large test sets on several processes with PyTorch's own distributed runtime.

Each rank encodes a contiguous shard of the images with the same code path as
:func:`repair.data.extract_features`; the shards are gathered in rank order, so every rank
ends up with the rows one process would have produced (equal up to float rounding, since
batch boundaries move), and rank 0 writes the shared feature cache. Without an initialised
process group everything here is the plain single-process path.

:func:`launch` wraps ``torchrun``: ``python -m repair.distributed ARGS`` is one rank of
``mergetune ARGS``. It initialises the process group, keeps ranks other than 0 quiet and
records each rank's exit code, because torchrun itself turns every failure into exit 1
and a traceback, which would break the documented exit codes (a failed gate must still
exit 11).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from repair.backbone import Backbone, ImageEncoder
from repair.data import (
    Features,
    ImageFolder,
    _encode_files,
    _read_cache,
    _write_cache,
    extract_features,
    features_cache_file,
)
from repair.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, MergetuneError

LAUNCH_DIR_ENV = "MERGETUNE_LAUNCH_DIR"  # set by launch(): where ranks leave exit codes and logs


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: from the process group, else torchrun's env."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def init_from_env(backend: str = "gloo", *, timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes in the environment, once; returns whether distributed.

    gloo by default: every collective here moves CPU tensors, whatever device encodes the images.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    _, world = rank_and_world()
    if world <= 1 or not os.environ.get("MASTER_ADDR"):
        return False
    options = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, **options)  # env:// reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    atexit.register(_leave_group)
    return True


def _leave_group() -> None:
    """Tear the group down before interpreter exit: gloo's threads left running abort the process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """Under a launcher, ``cuda`` (or ``auto`` finding CUDA) means this rank's own GPU, not all on GPU 0."""
    if rank_and_world()[1] > 1 and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def shard(count: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous slice of ``range(count)``; the first ``count % world`` ranks get one more."""
    if world < 1 or not 0 <= rank < world or count < 0:
        raise ValueError(f"no shard {rank} of {count} items over {world} ranks")
    size, extra = divmod(count, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (1 if rank < extra else 0))


def extract_features_sharded(
    backbone: Backbone,
    dataset: ImageFolder,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    normalize: bool = True,
    encoder: ImageEncoder | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Features:
    """:func:`repair.data.extract_features`, with the encoding split over the ranks of the process group.

    Every rank returns all rows, so rank 0 can report; every rank must call this with the same
    arguments, as all ranks of ``mergetune eval`` do. ``on_progress`` counts this rank's shard.
    """
    if not _group_active():
        return extract_features(backbone, dataset, cache_dir=cache_dir, batch_size=batch_size, workers=workers,
                                normalize=normalize, encoder=encoder, on_progress=on_progress)
    import torch.distributed as dist

    encoder = encoder or backbone.image_encoder
    cache_file = features_cache_file(cache_dir, encoder, dataset) if cache_dir is not None else None
    features = _read_cache(cache_file, len(dataset)) if cache_file is not None else None
    if not _all_ranks(features is not None):  # one rank encoding alone would wait for the others forever
        features = _encode_shards(backbone, encoder, dataset, batch_size=batch_size, workers=workers,
                                  on_progress=on_progress)
        if cache_file is not None and dist.get_rank() == 0:
            _write_cache(cache_file, features)
        dist.barrier()  # the cache is complete before any rank moves on
    features = features.to(backbone.device)
    labels = torch.tensor(dataset.labels, dtype=torch.long, device=backbone.device)
    return Features(F.normalize(features, dim=-1) if normalize else features, labels)


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_ranks(flag: bool) -> bool:
    """True only where every rank says so: ranks must take the same branch around collectives."""
    import torch.distributed as dist

    agreed = torch.tensor([int(flag)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def _encode_shards(backbone: Backbone, encoder: ImageEncoder, dataset: ImageFolder, *, batch_size: int,
                   workers: int, on_progress: Callable[[int, int], None] | None) -> torch.Tensor:
    """Encode this rank's shard, gather every shard (they differ in length) and concatenate in rank order.

    A rank that fails still joins the gather, carrying its error, so every rank raises that error
    (rank 0 reports it with its own exit code) rather than a lost connection or a wait.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    part = shard(len(dataset), rank, world)
    local: torch.Tensor | None = None
    failure: Exception | None = None
    try:
        if part:
            local = _encode_files(backbone, encoder, dataset.files[part.start:part.stop], batch_size=batch_size,
                                  workers=workers, on_progress=on_progress)
    except Exception as exc:
        failure = exc
    gathered: list[tuple[torch.Tensor | None, Exception | None]] = [(None, None)] * world
    dist.all_gather_object(gathered, (local, _portable(failure, rank)))
    if failure is not None:
        raise failure
    for _, error in gathered:
        if error is not None:
            raise error
    return torch.cat([rows for rows, _ in gathered if rows is not None])


def _portable(error: Exception | None, rank: int) -> Exception | None:
    """Our own errors travel as they are (same message and exit code everywhere); others as a summary."""
    if error is None or isinstance(error, MergetuneError):
        return error
    return RuntimeError(f"rank {rank} failed: {type(error).__name__}: {error}")


# --------------------------------------------------------------------------- launching


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
                   "-m", "repair.distributed", *argv]
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
        from repair.cli import app

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


if __name__ == "__main__":
    sys.exit(_run_worker(sys.argv[1:]))
