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

import hashlib
import os
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import safetensors.torch
import torch
from safetensors import safe_open

from repair.errors import InputFileError, NumericalError, OutputExistsError, stop_if_terminated
from repair.io._messages import _fail

__all__ = [
    "append_text",
    "atomic_output",
    "check_appendable",
    "check_output_path",
    "check_finite",
    "check_writable",
    "output_lock",
    "tensors_checksum",
    "read_cache_entry",
    "write_cache_entry",
    "write_safetensors",
    "write_state_file",
    "write_torch_file",
    "write_adapter_folder",
    "write_folder",
    "check_output_folder",
]


def check_output_path(target: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse an output that exists (without force), is an input, is not a regular file (a directory,
    a device, a FIFO: never replaced, even with force), or has no parent."""
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
    if target.exists() and not target.is_file():
        raise _fail(OutputExistsError, target, "is not a regular file (a device, FIFO or socket); refusing to "
                                               "replace it even with --force")
    if (target.exists() or target.is_symlink()) and not force:
        raise _fail(
            OutputExistsError, target, "already exists; expected a new path (or use --force)"
        )


def check_writable(directory: Path) -> None:
    """Create and remove a probe file: a read-only or pseudo filesystem fails here, before any work."""
    try:
        _, probe = _create_temp(directory / "mergetune-probe")
    except OSError as exc:
        raise OutputExistsError(f"{directory}: cannot write here ({exc.strerror or type(exc).__name__})") from None
    probe.unlink(missing_ok=True)


@contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """One run per output at a time: a second run writing the same file refuses at once (exit 8).

    The lock is a hidden file next to the output holding the owner's pid; a lock whose process is
    gone (a crash, a kill -9) is taken over.
    """
    lock = target.with_name(f".{target.name}.lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if _lock_is_alive(lock):
                raise OutputExistsError(f"{target}: another mergetune run is writing this output "
                                        f"(lock {lock}); wait for it or choose another --out") from None
            lock.unlink(missing_ok=True)
            continue
        except OSError as exc:
            raise OutputExistsError(f"{target}: cannot create a lock next to it ({exc.strerror})") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_is_alive(lock: Path) -> bool:
    try:
        pid = int(lock.read_text() or "0")
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True  # unreadable or another user's process: assume it is in use
    return pid > 0


def check_appendable(path: Path, inputs: Sequence[Path] = ()) -> None:
    """A file a report is appended to (a CI step summary): checked before the work, not after it; never one
    of ``inputs``."""
    path = Path(path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputExistsError(f"{path}: is also an input ({source}); refusing to append the summary to it")
    if path.exists() and not path.is_file():
        raise OutputExistsError(f"{path}: not a regular file; cannot append the summary to it")
    if not path.parent.is_dir():
        raise OutputExistsError(f"{path}: its directory {path.parent} does not exist")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise OutputExistsError(f"{path}: not writable")


def append_text(path: Path, text: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as exc:
        raise OutputExistsError(f"{path}: cannot append ({exc.strerror or type(exc).__name__})") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing, or a symlink loop: compare where they point (realpath never raises)
        return os.path.realpath(a) == os.path.realpath(b)


def _create_temp(target: Path) -> tuple[int, Path]:
    """Hidden sibling so os.replace stays on one filesystem; mode honours the umask.

    Returns the permission bits it was created with (0o666 less the umask) and the path.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        candidate = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            fd = os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
        try:
            return stat.S_IMODE(os.fstat(fd).st_mode), candidate
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
    try:
        mode, temp = _create_temp(target)
    except OSError as exc:
        if replace:
            raise
        raise OutputExistsError(f"{target}: cannot write ({exc.strerror or type(exc).__name__})") from None
    try:
        yield temp
        if stat.S_IMODE(os.stat(temp).st_mode) != mode:
            # safetensors' save_file replaces the file with its own 0o600 one: restore the mode.
            os.chmod(temp, mode)
        _fsync(temp)
        if not replace:  # progress and caches are kept on termination; outputs are not
            stop_if_terminated()
        os.replace(temp, target)
    except OSError as exc:  # a full disk, a vanished directory: one line (exit 8), nothing left behind
        temp.unlink(missing_ok=True)
        if replace:
            raise
        raise OutputExistsError(f"{target}: writing failed ({exc.strerror or type(exc).__name__}); "
                                "nothing was written") from None
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


def check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Nothing unfinished is published: a tensor with NaN or Inf (an fp16 cast that overflowed) is refused
    before a byte is written. Inputs with them are refused on reading, so any here were made on the way out."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NumericalError(f"{path}: {name} would hold {bad} NaN/Inf value(s) as {str(tensor.dtype)[6:]} "
                                 "(values beyond its range); nothing was written; write a wider dtype (--dtype fp32)")


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> Path:
    """Write tensors atomically (finite ones only); clones so views and shared storages serialise cleanly."""
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; non-str entries: {bad!r}")
    check_finite(tensors, Path(path))
    owned = {
        name: tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for name, tensor in tensors.items()
    }
    return _save_atomically(path, owned, dict(metadata), force=force, inputs=inputs)


def write_torch_file(
    path: str | Path, obj: object, *, force: bool = False, inputs: Sequence[Path] = ()
) -> Path:
    """``torch.save`` of plain data (nested dicts, lists, strings, numbers, tensors), atomically: for
    formats whose own tool reads a torch file (CLIP-LoRA). Tensors are cloned so views save alone."""
    owned = _owned_tree(obj)
    target = Path(path)
    check_finite(dict(_tree_tensors(owned)), target)
    with atomic_output(target, force=force, inputs=inputs) as temp:
        torch.save(owned, temp)
    return target


def _tree_tensors(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (dict, list)):
        for key, value in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            yield from _tree_tensors(value, f"{prefix}.{key}" if prefix else str(key))


def _owned_tree(obj: object) -> object:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if isinstance(obj, dict):
        return {key: _owned_tree(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_owned_tree(value) for value in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"write_torch_file takes plain data only, not {type(obj).__name__}")


ADAPTER_MARKER = "adapter_config.json"  # what makes an existing folder a PEFT adapter mergetune may replace


ADAPTER_FILES = (ADAPTER_MARKER, "adapter_model.safetensors", "README.md")


def check_output_folder(target: Path, force: bool, inputs: Sequence[Path], *, marker: str | None = None,
                        files: Sequence[str] = ()) -> None:
    """An output folder (a PEFT adapter by default; ``marker`` and ``files`` for another layout: the file
    that identifies such a folder, and every file it may hold): never an input, never a file, and an existing
    folder is replaced only with force and only when it is itself such a folder (never a folder of other files)."""
    marker, files = (marker, tuple(files)) if marker else (ADAPTER_MARKER, ADAPTER_FILES)
    what = "PEFT adapter" if marker == ADAPTER_MARKER else f"{marker} folder"
    if not target.parent.is_dir():
        raise _fail(OutputExistsError, target, f"output directory {target.parent} does not exist")
    for source in inputs:
        if _same_file(target, Path(source)):
            raise _fail(OutputExistsError, target,
                        f"is also an input ({source}); refusing to overwrite it even with force")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise _fail(OutputExistsError, target, f"exists and is not a folder; expected a path for a {what} folder")
    if target.is_dir():
        if not force:
            raise _fail(OutputExistsError, target, "already exists; expected a new path (or use --force)")
        unknown = [entry.name for entry in target.iterdir() if entry.name not in (*files, marker)]
        if not (target / marker).is_file() or unknown:
            raise _fail(OutputExistsError, target, f"is a folder that is not (only) a {what}; refusing to "
                                                   "replace it even with --force")


def write_adapter_folder(
    path: str | Path,
    files: Mapping[str, bytes],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> Path:
    """A PEFT adapter folder: ``files`` (name -> bytes) plus ``adapter_model.safetensors`` (:func:`write_folder`)."""
    return write_folder(path, files, {"adapter_model.safetensors": (tensors, metadata)}, force=force, inputs=inputs)


def write_folder(
    path: str | Path,
    files: Mapping[str, bytes],
    tensor_files: Mapping[str, tuple[Mapping[str, torch.Tensor], Mapping[str, str]]],
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
    marker: str | None = None,
    allowed: Sequence[str] = (),
) -> Path:
    """A folder of ``files`` (name -> bytes) and safetensors files (name -> (tensors, metadata)), made whole in a
    hidden sibling folder and renamed into place: an interrupted run leaves no half-written folder. With force,
    an existing folder of the same layout (``marker``, ``allowed``: see :func:`check_output_folder`) is moved
    aside first and removed once the new one is in place."""
    target = Path(path)
    check_output_folder(target, force, inputs, marker=marker, files=allowed)
    for tensors, _ in tensor_files.values():
        check_finite(tensors, target)
    temp = _temp_folder(target)
    try:
        for name, data in files.items():
            (temp / name).write_bytes(data)
            os.chmod(temp / name, 0o666 & ~_umask())
            _fsync(temp / name)
        for name, (tensors, metadata) in tensor_files.items():
            weights = temp / name
            owned = {key: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                     for key, t in tensors.items()}
            safetensors.torch.save_file(owned, str(weights), metadata=dict(metadata))
            os.chmod(weights, 0o666 & ~_umask())
            _fsync(weights)
        _fsync(temp, directory=True)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
            os.rename(target, old)
        try:
            os.rename(temp, target)
        except BaseException:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputExistsError(f"{target}: writing failed ({exc.strerror or type(exc).__name__}); "
                                "nothing was written") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync(target.parent, directory=True)
    return target


def _temp_folder(target: Path) -> Path:
    while True:
        candidate = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            candidate.mkdir(mode=0o777)
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputExistsError(f"{target}: cannot write ({exc.strerror or type(exc).__name__})") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_state_file(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Atomically replace a state file mergetune owns (e.g. training progress); errors propagate."""
    return _save_atomically(path, tensors, dict(metadata), replace=True)


CHECKSUM_KEY = "mergetune.sha256"  # a cache entry's metadata: the hash of its tensors' bytes
_warned: set[str] = set()


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: what a cache entry must still hold."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\t{tensor.dtype}\t{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy: memory-mapped entries stay mapped
    return digest.hexdigest()


def read_cache_entry(path: Path, device: str = "cpu") -> dict[str, torch.Tensor] | None:
    """A cached tensor file, or None when absent or damaged: caches are recomputed, never trusted.

    A damaged entry (flipped bytes, a truncated file, a missing checksum) is a miss, said once on stderr.
    """
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as handle:  # one read: the checksum and the tensors
            recorded = (handle.metadata() or {}).get(CHECKSUM_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:
        return report_damaged(path)
    if recorded != tensors_checksum(tensors):
        return report_damaged(path)
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def report_damaged(path: Path) -> None:
    """A damaged entry is a miss: said once per cache folder on stderr, removed so it is rewritten."""
    if str(path.parent) not in _warned:
        _warned.add(str(path.parent))
        sys.stderr.write(f"warning: {path}: damaged cache entry (checksum mismatch); recomputing it\n")
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only cache: the entry stays a miss
        pass
    return None


def write_cache_entry(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Best effort, atomic, checksummed: a read-only or full cache directory must not fail the run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        _save_atomically(path, contiguous, {CHECKSUM_KEY: tensors_checksum(contiguous)}, replace=True)
    except OSError:
        pass  # atomic_output has already removed its temp file
