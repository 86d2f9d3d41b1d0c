"""Writing checkpoint files atomically: an interrupted run never leaves a half-written file.

There is one writer, :func:`atomic_output`: the bytes go to a hidden temp file created next to
the target (same filesystem, ``O_EXCL``, mode ``0o666`` so the umask is honoured), the file is
fsynced, ``os.replace`` puts it in place and the directory is fsynced; on any exception,
interrupts included, the temp file is removed. Outputs the user names are checked first
(:func:`check_output_path`: never clobber an input, an existing file without force, or a
directory). Files mergetune owns itself (cache entries, resumable training state) pass
``replace=True``: they skip those checks and replace whatever is there.
"""

from __future__ import annotations

import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import safetensors.torch
import torch

from repair.errors import InputFileError, OutputExistsError
from repair.io._messages import _fail

__all__ = [
    "atomic_output",
    "check_output_path",
    "read_cache_entry",
    "write_cache_entry",
    "write_safetensors",
    "write_state_file",
]


def check_output_path(target: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse an output that exists (without force), is an input, is a directory, or has no parent."""
    parent = target.parent
    if not parent.is_dir():
        raise _fail(InputFileError, target, f"output directory {parent} does not exist")
    for source in inputs:
        if _same_file(target, Path(source)):
            raise _fail(
                OutputExistsError,
                target,
                f"is also an input ({source}); refusing to overwrite it even with force",
            )
    if target.is_dir():
        raise _fail(OutputExistsError, target, "is a directory; expected a path for a file")
    if (target.exists() or target.is_symlink()) and not force:
        raise _fail(
            OutputExistsError, target, "already exists; expected a new path (or use --force)"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _create_temp(target: Path) -> tuple[Path, int]:
    """Hidden sibling so os.replace stays on one filesystem; mode honours the umask.

    Returns the path and the permission bits it was created with (0o666 less the umask).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        candidate = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            fd = os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
        try:
            return candidate, stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def _fsync(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # some filesystems cannot open directories; the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_output(
    path: str | Path, *, force: bool = False, inputs: Sequence[Path] = (), replace: bool = False
) -> Iterator[Path]:
    """Yield a temp path that becomes ``path`` only if the body finishes: no half-written files.

    ``replace=True`` is for files mergetune owns (caches, training state): no output checks,
    an existing file is replaced, and failures surface as the OSError that caused them.
    """
    target = Path(path)
    if not replace:
        check_output_path(target, force, inputs)
    temp, mode = _create_temp(target)
    try:
        yield temp
        if stat.S_IMODE(os.stat(temp).st_mode) != mode:
            # safetensors' save_file replaces the file with its own 0o600 one: restore the mode.
            os.chmod(temp, mode)
        _fsync(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(target.parent, directory=True)


def _save_atomically(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None,
    **options: object,
) -> Path:
    target = Path(path)
    with atomic_output(target, **options) as temp:  # type: ignore[arg-type]
        safetensors.torch.save_file(dict(tensors), str(temp), metadata=metadata)
    return target


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> Path:
    """Write tensors atomically; clones so views and shared storages serialise cleanly."""
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; non-str entries: {bad!r}")
    owned = {
        name: tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for name, tensor in tensors.items()
    }
    return _save_atomically(path, owned, dict(metadata), force=force, inputs=inputs)


def write_state_file(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Atomically replace a state file mergetune owns (e.g. training progress); errors propagate."""
    return _save_atomically(path, tensors, dict(metadata), replace=True)


def read_cache_entry(path: Path, device: str = "cpu") -> dict[str, torch.Tensor] | None:
    """A cached tensor file, or None when absent or damaged: caches are recomputed, never trusted."""
    if not path.is_file():
        return None
    try:
        tensors = safetensors.torch.load_file(str(path), device=device)
    except Exception:
        return None
    if not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
        return None
    return tensors


def write_cache_entry(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Best effort, atomic: a read-only or full cache directory must not fail the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        _save_atomically(path, contiguous, None, replace=True)
    except OSError:
        pass  # atomic_output has already removed its temp file
