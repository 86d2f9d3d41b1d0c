"""The torch.distributed process group, as the data layer uses it: who am I, split, gather.

Without an initialised group everything here answers for one process, so callers need no
special case. gloo by default: every collective here moves CPU tensors, whatever device
encodes the images.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch

from repair.errors import MergetuneError

LEAVE_TIMEOUT_S = 60.0  # how long leave() waits for the other ranks before tearing the group down


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
    atexit.register(_destroy_group)  # the fallback for an exit that did not call leave()
    return True


def leave(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Leave the group once every rank is done with it: a barrier, then the teardown.

    Call it where all ranks have finished their collectives (the same point on every rank), so no
    rank tears its connections down while a peer may still finish the last exchange: the likely
    cause of a rank aborted once by gloo at exit (SIGABRT, "terminate called without an active
    exception"). The barrier is bounded: a rank that never arrives costs ``timeout_s``, then the
    group goes anyway.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        try:  # monitored: bounded by its timeout (gloo groups; another backend raises ValueError)
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError):  # a peer left or never came: nothing left to wait for
            pass
    _destroy_group()


def _destroy_group() -> None:
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


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_ranks(flag: bool) -> bool:
    """True only where every rank says so: ranks must take the same branch around collectives."""
    import torch.distributed as dist

    agreed = torch.tensor([int(flag)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def gather_objects(value: object) -> list[object]:
    """Every rank's ``value`` (anything picklable), in rank order, on every rank."""
    import torch.distributed as dist

    gathered: list[object] = [None] * rank_and_world()[1]
    dist.all_gather_object(gathered, value)
    return gathered


def gather_or_raise(local: torch.Tensor | None, failure: Exception | None) -> list[torch.Tensor]:
    """Every rank's rows in rank order; a rank that failed still joins, carrying its error, so every
    rank raises that error (rank 0 reports it with its own exit code) rather than losing a connection."""
    gathered = gather_objects((local, _portable(failure, rank_and_world()[0])))
    if failure is not None:
        raise failure
    for other, (_, error) in enumerate(gathered):
        if error is not None:
            raise _from_rank(error, other)
    return [rows for rows, _ in gathered if rows is not None]


@contextmanager
def agreed() -> Iterator[None]:
    """A block that may fail on some ranks only (an input missing on one machine, weights not cached
    there): every rank leaves it with the same outcome. Without this, the ranks that passed go on to
    wait in a collective for one that stopped, and fail with a lost connection (an internal error)."""
    failure: Exception | None = None
    try:
        yield
    except Exception as exc:
        if not active():
            raise
        failure = exc
    if active():
        gather_or_raise(None, failure)


def _portable(error: Exception | None, rank: int) -> Exception | None:
    """Our own errors travel as they are (same exit code everywhere); others as a summary."""
    if error is None or isinstance(error, MergetuneError):
        return error
    return RuntimeError(f"rank {rank} failed: {type(error).__name__}: {error}")


def _from_rank(error: Exception, rank: int) -> Exception:
    """Another rank's error as this rank raises it: our own keep their type (so their exit code), and
    say which rank met them: a path that exists here may be missing on another machine."""
    if not isinstance(error, MergetuneError):
        return error  # already a summary naming its rank
    try:
        return type(error)(f"rank {rank}: {error}")
    except TypeError:  # an error type with its own constructor
        return error
