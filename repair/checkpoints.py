"""Reading and writing checkpoint files without ever running code from them.

Every input is sniffed by content (never by extension), loaded through a path
that cannot execute pickled code, flattened to ``name -> tensor`` and checked
(dtype, NaN/Inf) before anything else sees it. Every failure is one line that
names the file. Outputs go through :func:`atomic_output`, so an interrupted run
never leaves a half-written file or clobbers an input.
"""

from __future__ import annotations

import _compat_pickle
import collections
import hashlib
import io
import json
import math
import os
import pickle
import secrets
import stat
import struct
import types
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from repair.errors import (
    IncompatibleCheckpointError,
    InputFileError,
    MergetuneError,
    NumericalError,
    OutputExistsError,
    UnsafeFileError,
)

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_SAFETENSORS_HEADER",
    "TensorFile",
    "atomic_output",
    "check_output_path",
    "read_safetensors_metadata",
    "read_tensors",
    "sha256_file",
    "write_safetensors",
]

ACCEPTED_FORMATS = (
    "safetensors, a torch.save checkpoint (zip or legacy pickle) or a numpy .npz archive"
)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
ALLOWED_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.bool,
    }
)
_NUMPY_DTYPES = {
    np.dtype(name): name
    for name in (
        "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"
    )
}
_LEGACY_TEXT_MAGIC = b"L1195470"  # torch's magic number as a protocol-0/1 LONG opcode
_HASH_CHUNK = 1 << 20
_MAX_DEPTH = 64  # nesting deeper than any real checkpoint; guards RecursionError
_MAX_NODES = 2_000_000  # bounds flattening of shared-subtree (DAG) pickles
_DEFLATE_MAX_RATIO = 1100  # deflate cannot expand more than ~1032:1
_MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class TensorFile:
    """A validated checkpoint: flat CPU tensors plus where they came from."""

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


# --------------------------------------------------------------------------- messages


def _one_line(text: str) -> str:
    """Error text from files or libraries may hold newlines; we promise one line."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str(text))
    clean = " ".join(clean.split())
    return clean if len(clean) <= _MESSAGE_LIMIT else clean[: _MESSAGE_LIMIT - 3] + "..."


def _fail(cls: type[MergetuneError], path: Path | str, text: str) -> MergetuneError:
    """Build the one-line, file-naming error every caller expects."""
    return cls(_one_line(f"{path}: {text}"))


def _describe_exception(exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()
    return type(exc).__name__ + (f": {detail[0]}" if detail else "")


# --------------------------------------------------------------------------- hashing / sniffing


def sha256_file(path: Path) -> str:
    """Hex digest of the file, streamed so multi-GB checkpoints never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _regular_file_size(path: Path) -> int:
    """Refuse missing paths, directories and FIFOs/devices (which could block forever)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise _fail(InputFileError, path, "no such file; expected a checkpoint file") from None
    except OSError as exc:
        raise _fail(InputFileError, path, f"cannot access it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise _fail(InputFileError, path, "is a directory; expected a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        raise _fail(InputFileError, path, "is not a regular file; expected a checkpoint file")
    if info.st_size == 0:
        raise _fail(InputFileError, path, f"is empty; expected {ACCEPTED_FORMATS}")
    return info.st_size


def _read_head(path: Path, count: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError as exc:
        raise _fail(InputFileError, path, f"cannot read it ({exc.strerror or exc})") from None


def _sniff(path: Path) -> str:
    """Decide the format from the first bytes: the extension is only a hint users get wrong."""
    head = _read_head(path, 9)
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return _sniff_zip(path)
    if head[:1] == b"\x80" or head.startswith(_LEGACY_TEXT_MAGIC):
        return "torch"
    raise _fail(
        InputFileError,
        path,
        f"unrecognised file format (starts with {head[:8]!r}); expected {ACCEPTED_FORMATS}",
    )


def _sniff_zip(path: Path) -> str:
    """torch.save and numpy.savez both write zip archives; member names tell them apart."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except MemoryError:
        raise
    except Exception as exc:
        raise _fail(
            InputFileError, path, f"corrupt zip archive ({_describe_exception(exc)})"
        ) from None
    if any(name.endswith("constants.pkl") for name in names):
        raise _fail(
            InputFileError,
            path,
            "is a TorchScript archive; expected a state dict saved with torch.save or safetensors",
        )
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "torch"
    if any(name.endswith(".npy") for name in names):
        return "npz"
    raise _fail(
        InputFileError,
        path,
        "zip archive with neither data.pkl (torch) nor .npy members (npz); "
        f"expected {ACCEPTED_FORMATS}",
    )


# --------------------------------------------------------------------------- safetensors


def _safetensors_header(path: Path, size: int) -> dict[str, Any]:
    """Parse the JSON header ourselves so an absurd length is refused before allocating it."""
    if size < 8:
        raise _fail(InputFileError, path, f"truncated safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", _read_head(path, 8))
    if length > size - 8:
        raise _fail(
            InputFileError,
            path,
            f"safetensors header claims {length} bytes but the file has only {size - 8} after it",
        )
    if length > MAX_SAFETENSORS_HEADER:
        raise _fail(
            InputFileError,
            path,
            f"safetensors header is {length} bytes; expected at most {MAX_SAFETENSORS_HEADER}",
        )
    raw = _read_head(path, 8 + length)[8:]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(
            InputFileError, path, f"corrupt safetensors header ({_describe_exception(exc)})"
        ) from None
    if not isinstance(header, dict):
        raise _fail(InputFileError, path, "safetensors header is not a JSON object")
    return header


def _header_metadata(path: Path, header: Mapping[str, Any]) -> dict[str, str]:
    meta = header.get("__metadata__", {})
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(
            InputFileError, path, "safetensors __metadata__ is not a mapping of strings to strings"
        )
    return dict(meta)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Header-only read: lets callers check provenance without loading any tensor."""
    p = Path(path)
    size = _regular_file_size(p)
    if _sniff(p) != "safetensors":
        raise _fail(InputFileError, p, "is not a safetensors file; expected a safetensors header")
    return _header_metadata(p, _safetensors_header(p, size))


def _load_safetensors(path: Path, size: int) -> tuple[Any, dict[str, str]]:
    header = _safetensors_header(path, size)
    metadata = _header_metadata(path, header)
    with _safe_open(path) as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, metadata


def _safe_open(path: Path) -> Any:
    """The pread backend gives each tensor its own heap buffer, not a view into one mmap."""
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors before the backend option: it copies anyway
        return safe_open(str(path), framework="pt", device="cpu")


# --------------------------------------------------------------------------- restricted pickle


class _Refused(Exception):
    """Raised inside unpickling when the pickle asks us to call something not allow-listed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _Malformed(Exception):
    """Raised inside unpickling for opcode sequences no torch.save ever writes."""


class _Inert:
    """Base of stand-ins for classes we refuse to import; instances hold nothing."""

    __slots__ = ()


class _PlaceholderMeta(type):
    """Calling a placeholder class would mean running its constructor: refuse instead."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise _Refused(cls._origin)


def _placeholder(module: str, name: str) -> type:
    namespace = {
        "__slots__": (),
        "_origin": f"{module}.{name}",
        "_data_only": (module, name) in _DATA_ONLY,
    }
    return _PlaceholderMeta("Placeholder", (_Inert,), namespace)


# Constructors of plain numpy data (scalars such as a saved best accuracy, arrays, dtypes):
# a REDUCE on them yields an inert object *without* calling numpy, so such checkpoints
# still load; the values are dropped like any other non-tensor leaf.
_DATA_ONLY = frozenset(
    (package, name)
    for package in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("scalar", "_reconstruct")
) | {("numpy", "dtype"), ("numpy", "ndarray")}


def _describe_callable(obj: Any) -> str:
    if isinstance(obj, _PlaceholderMeta):
        return obj._origin
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return f"an object of type {type(obj).__name__}"


def _inert_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Replaces copyreg._reconstructor: rebuilds placeholder instances without any __init__."""
    if isinstance(cls, _PlaceholderMeta):
        return object.__new__(cls)
    raise _Refused(f"copyreg._reconstructor({_describe_callable(cls)})")


def _empty_bytes(*args: Any) -> bytes:
    """Replaces builtins.bytes, which protocol-2 pickles call with no argument for b''."""
    if args:
        raise _Malformed("unexpected builtins.bytes arguments")
    return b""


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """Replaces _codecs.encode, which protocol-2 pickles use to store bytes objects."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise _Malformed("unexpected _codecs.encode arguments")
    return text.encode("latin-1")


_CONTAINER_TYPES: tuple[type, ...] = (
    collections.OrderedDict,
    collections.defaultdict,
    dict,
    list,
    tuple,
    set,
    frozenset,
    slice,
    torch.Size,
)
_PLAIN_ARG_TYPES = frozenset(
    {list, tuple, dict, set, frozenset, str, bytes, int, float, bool, type(None)}
    | {collections.OrderedDict, collections.defaultdict}
)
_TENSOR_REBUILDERS: tuple[Callable[..., Any], ...] = (
    torch._utils._rebuild_tensor,
    torch._utils._rebuild_tensor_v2,
    torch._utils._rebuild_tensor_v3,
    torch._utils._rebuild_parameter,
    torch._utils._rebuild_parameter_with_state,
)


def _check_plain_args(func: Any, args: tuple[Any, ...]) -> None:
    """Container constructors iterate their argument; never let them iterate a tensor."""
    for arg in args:
        if type(arg) in _PLAIN_ARG_TYPES or isinstance(arg, _PlaceholderMeta):
            continue
        if any(arg is cls for cls in _CONTAINER_TYPES):
            continue
        raise _Malformed(
            f"unexpected argument of type {type(arg).__name__} to {_describe_callable(func)}"
        )


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickle may name; everything else becomes an inert placeholder."""
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("copyreg", "_reconstructor"): _inert_reconstructor,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): _empty_bytes,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
    }
    for kind in (dict, list, tuple, set, frozenset, slice, complex):
        table[("builtins", kind.__name__)] = kind
    for func in _TENSOR_REBUILDERS:
        table[("torch._utils", func.__name__)] = func
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            table[("torch", name)] = value
    return table


_ALLOWED_GLOBALS = _allowed_globals()
_CALLABLE_IDS = {
    id(obj): obj
    for obj in (
        *_CONTAINER_TYPES,
        *_TENSOR_REBUILDERS,
        torch.device,
        complex,
        _inert_reconstructor,
        _latin1_encode,
        _empty_bytes,
    )
}
_PLAIN_ARG_CALLABLES = (*_CONTAINER_TYPES, torch.device, complex)


def _call_allowed(func: Any, args: Any) -> Any:
    """REDUCE: the one place a pickle can make us call something, so it is gated here."""
    if type(args) is not tuple:
        raise _Malformed("REDUCE arguments are not a tuple")
    if isinstance(func, _PlaceholderMeta):
        if func._data_only:
            return object.__new__(func)
        raise _Refused(func._origin)
    if _CALLABLE_IDS.get(id(func)) is not func:
        if callable(func):
            raise _Refused(_describe_callable(func))
        raise _Malformed(f"REDUCE on a non-callable {type(func).__name__}")
    if any(func is plain for plain in _PLAIN_ARG_CALLABLES):
        _check_plain_args(func, args)
    return func(*args)


def _new_instance(cls: Any, args: Any, kwargs: Any) -> Any:
    """NEWOBJ: cls.__new__ runs no __init__, so placeholders become inert objects."""
    if type(args) is not tuple or type(kwargs) is not dict:
        raise _Malformed("object construction with malformed arguments")
    if isinstance(cls, _PlaceholderMeta):
        return object.__new__(cls)
    if any(cls is kind for kind in _CONTAINER_TYPES) and not kwargs:
        _check_plain_args(cls, args)
        return cls.__new__(cls, *args)
    if callable(cls):
        raise _Refused(_describe_callable(cls))
    raise _Malformed(f"cannot construct an object from {type(cls).__name__}")


def _apply_build(inst: Any, state: Any) -> None:
    """BUILD: state of placeholders and containers is dropped, never handed to __setstate__."""
    if isinstance(inst, _Inert) and not isinstance(inst, type):
        return
    if type(inst) in (dict, collections.OrderedDict, collections.defaultdict, list, set):
        return  # e.g. the `_metadata` attribute of a module state_dict: not needed here
    raise _Malformed(f"BUILD on an object of type {type(inst).__name__}")


_DICT_TYPES: tuple[type, ...] = (dict, collections.OrderedDict, collections.defaultdict)


def _is_storage_tag(tag: Any) -> bool:
    return type(tag) in (str, bytes) and tag in ("storage", b"storage")


class _RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler whose every code-reaching opcode goes through an allow-list."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    byte_budget = 0  # set per file: total storage bytes may not exceed the file size

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._placeholders: dict[tuple[str, str], type] = {}
        self._storage_keys: set[Any] = set()
        self._storage_total = 0
        self._torch_persistent_load: Callable[[Any], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Look names up in a fixed table: nothing is ever imported on a pickle's behalf."""
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        if key not in self._placeholders:
            self._placeholders[key] = _placeholder(module, name)
        return self._placeholders[key]

    @property
    def persistent_load(self) -> Callable[[Any], Any]:  # type: ignore[override]
        return self._bounded_persistent_load

    @persistent_load.setter
    def persistent_load(self, func: Callable[[Any], Any]) -> None:
        # torch assigns its storage loader here; we wrap it to bound allocations.
        self._torch_persistent_load = func

    def _bounded_persistent_load(self, saved_id: Any) -> Any:
        if self._torch_persistent_load is None:
            raise _Malformed("persistent id outside a torch checkpoint")
        if isinstance(saved_id, tuple) and saved_id and _is_storage_tag(saved_id[0]):
            self._charge_storage(saved_id)
        return self._torch_persistent_load(saved_id)

    def _charge_storage(self, saved_id: tuple[Any, ...]) -> None:
        """A storage cannot be larger than the file holding it; refuse before torch allocates."""
        if len(saved_id) < 5 or type(saved_id[4]) is not int or saved_id[4] < 0:
            raise _Malformed("malformed storage record")
        storage_type, key, numel = saved_id[1], saved_id[2], saved_id[4]
        if storage_type is torch.UntypedStorage:
            dtype = torch.uint8
        else:
            dtype = getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or type(key) not in (str, bytes, int):
            raise _Malformed("storage record without a dtype or key")
        if key in self._storage_keys:
            return
        self._storage_keys.add(key)
        self._storage_total += numel * torch._utils._element_size(dtype)
        if self._storage_total > self.byte_budget:
            raise _Malformed("storages claim more bytes than the file holds")

    def _load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = _call_allowed(self.stack[-1], args)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_instance(cls, args, {}))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(_new_instance(cls, args, kwargs))

    def _load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        cls = self.find_class(module, name)
        self.append(_call_allowed(cls, tuple(self.pop_mark())))

    def _load_obj(self) -> None:
        # INST/OBJ mean "call this with these arguments", so they go through the REDUCE gate.
        items = self.pop_mark()
        if not items:
            raise _Malformed("OBJ without a class")
        self.append(_call_allowed(items[0], tuple(items[1:])))

    def _load_build(self) -> None:
        state = self.stack.pop()
        _apply_build(self.stack[-1], state)

    def _target(self, kinds: tuple[type, ...], opcode: str) -> Any:
        """Only real containers get items; inert stand-ins (dict/list subclasses) swallow them."""
        target = self.stack[-1]
        if type(target) in kinds:
            return target
        if isinstance(target, _Inert) and not isinstance(target, type):
            return None
        raise _Malformed(f"{opcode} on an object of type {type(target).__name__}")

    def _load_append(self) -> None:
        value = self.stack.pop()
        target = self._target((list,), "APPEND")
        if target is not None:
            target.append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        target = self._target((list,), "APPENDS")
        if target is not None:
            target.extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._target(_DICT_TYPES, "SETITEM")
        if target is not None:
            target[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise _Malformed("SETITEMS with an odd number of items")
        target = self._target(_DICT_TYPES, "SETITEMS")
        for index in range(0, len(items), 2) if target is not None else ():
            target[items[index]] = items[index + 1]

    def _load_additems(self) -> None:
        items = self.pop_mark()
        target = self._target((set,), "ADDITEMS")
        if target is not None:
            target.update(items)

    def _load_unsupported(self) -> None:
        raise _Malformed("out-of-band buffers are not used by torch.save")

    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.INST[0]] = _load_inst
    dispatch[pickle.OBJ[0]] = _load_obj
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.BYTEARRAY8[0]] = _load_unsupported
    dispatch[pickle.NEXT_BUFFER[0]] = _load_unsupported
    dispatch[pickle.READONLY_BUFFER[0]] = _load_unsupported


def _restricted_pickle_module(byte_budget: int) -> types.ModuleType:
    """torch.load wants a module with Unpickler/load; give it one bound to this file's size."""
    unpickler = type("Unpickler", (_RestrictedUnpickler,), {"byte_budget": byte_budget})
    module = types.ModuleType("mergetune_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]

    def load(file: Any, **kwargs: Any) -> Any:
        return unpickler(file, **kwargs).load()

    module.load = load  # type: ignore[attr-defined]
    return module


class _CappedReader(io.BufferedReader):
    """Caps each read at the bytes left, so a corrupt length field cannot demand gigabytes."""

    def __init__(self, raw: io.RawIOBase, size: int) -> None:
        super().__init__(raw)
        self._size = size

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        if n is not None and n > 0:
            n = min(n, max(self._size - self.tell(), 0))
            if n == 0:
                return b""
        return super().read(n)


def _torch_load(handle: io.BufferedReader, **kwargs: Any) -> Any:
    handle.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(handle, map_location="cpu", **kwargs)


def _load_torch(path: Path, size: int) -> tuple[Any, dict[str, str]]:
    """weights_only first; Dassl checkpoints it refuses go through the restricted unpickler."""
    with _CappedReader(io.FileIO(path, "r"), size) as handle:
        try:
            return _torch_load(handle, weights_only=True), {}
        except MemoryError:
            raise
        except Exception:
            pass  # refused (or corrupt): the restricted path decides which
        module = _restricted_pickle_module(size)
        return _torch_load(handle, weights_only=False, pickle_module=module), {}


# --------------------------------------------------------------------------- npz


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_npy_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Validate an .npy header before numpy allocates what it declares."""
    where = f"npz member {info.filename!r}"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _fail(InputFileError, path, f"{where} uses an unsupported compression method")
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.file_size > info.compress_size * (1 if stored else _DEFLATE_MAX_RATIO) + 1024:
        raise _fail(InputFileError, path, f"{where} declares an impossible uncompressed size")
    with archive.open(info) as member:
        magic = member.read(8)
        if magic[:6] != np.lib.format.MAGIC_PREFIX:
            return  # not an array: numpy.load hands it back as bytes and we skip it
        version = (magic[6], magic[7]) if len(magic) == 8 else None
        if version not in _NPY_HEADER_READERS:
            raise _fail(InputFileError, path, f"{where} has unsupported .npy version {version}")
        shape, _fortran, dtype = _NPY_HEADER_READERS[version](member)
        offset = member.tell()
    _check_npy_dtype(path, info.filename, dtype)
    needed = math.prod(shape) * dtype.itemsize
    if needed > info.file_size - offset:
        raise _fail(
            InputFileError,
            path,
            f"{where} declares shape {tuple(shape)} ({needed} bytes) "
            f"but holds {info.file_size - offset} bytes",
        )


def _check_npy_dtype(path: Path, member: str, dtype: np.dtype) -> None:
    if dtype.hasobject:
        raise _fail(
            UnsafeFileError,
            path,
            f"refused: npz member {member!r} is an object array, which only pickle can load; "
            "mergetune never runs code from a checkpoint",
        )
    if dtype.newbyteorder("=") not in _NUMPY_DTYPES:
        raise _fail(
            IncompatibleCheckpointError,
            path,
            f"npz member {member!r} has dtype {dtype}; "
            f"expected one of {', '.join(_NUMPY_DTYPES.values())}",
        )


def _load_npz(path: Path, size: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            _check_npy_member(path, archive, info)
    tensors: dict[str, torch.Tensor] = {}
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            array = npz[name]
            if isinstance(array, np.ndarray):
                native = np.array(
                    array, dtype=array.dtype.newbyteorder("="), order="C", copy=True
                )
                tensors[name] = torch.from_numpy(native)
    return tensors, {}


# --------------------------------------------------------------------------- flatten / validate


def _join(prefix: str, key: Any) -> str:
    name = key if isinstance(key, str) else str(key)
    return f"{prefix}.{name}" if prefix else name


class _Flattener:
    """Walks nested dicts/lists keeping tensors; cycles and DAG blow-ups are bounded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out: dict[str, torch.Tensor] = {}
        self.nodes = 0
        self.dropped_objects = 0
        self.on_path: set[int] = set()

    def visit(self, name: str, obj: Any, depth: int) -> None:
        self.nodes += 1
        if self.nodes > _MAX_NODES:
            raise _fail(InputFileError, self.path, f"holds more than {_MAX_NODES} nested entries")
        if isinstance(obj, torch.Tensor):
            self.add(name or "tensor", obj)
            return
        if isinstance(obj, dict):
            items: Any = list(obj.items())
        elif isinstance(obj, (list, tuple)):
            items = list(enumerate(obj))
        else:
            self.dropped_objects += isinstance(obj, _Inert)
            return  # ints, strings, placeholders of optimizers/schedulers: not weights
        if depth >= _MAX_DEPTH:
            raise _fail(InputFileError, self.path, f"is nested more than {_MAX_DEPTH} levels deep")
        if id(obj) in self.on_path:
            return
        self.on_path.add(id(obj))
        for key, value in items:
            self.visit(_join(name, key), value, depth + 1)
        self.on_path.discard(id(obj))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.out:
            raise _fail(
                InputFileError, self.path, f"two tensors flatten to the same name {name!r}"
            )
        self.out[name] = tensor


def _flatten(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    flattener = _Flattener(path)
    flattener.visit("", obj, 0)
    if not flattener.out and flattener.dropped_objects:
        # Typically torch.save(model): the weights sit inside an object we refuse to rebuild.
        raise _fail(
            InputFileError,
            path,
            "contains no tensors outside pickled Python objects (e.g. a whole model saved with "
            "torch.save(model)); expected a state dict (torch.save(model.state_dict()))",
        )
    return flattener.out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    if tensor.layout != torch.strided or tensor.is_nested:
        raise _fail(
            IncompatibleCheckpointError,
            path,
            f"tensor {name!r} has layout {tensor.layout}; expected dense tensors",
        )
    if tensor.dtype not in ALLOWED_DTYPES:
        allowed = ", ".join(sorted(_dtype_name(d) for d in ALLOWED_DTYPES))
        raise _fail(
            IncompatibleCheckpointError,
            path,
            f"tensor {name!r} has dtype {_dtype_name(tensor.dtype)}; expected one of {allowed}",
        )
    if tensor.device.type != "cpu":
        raise _fail(
            IncompatibleCheckpointError,
            path,
            f"tensor {name!r} has no data (device {tensor.device}); expected CPU data",
        )
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise _fail(
            NumericalError,
            path,
            f"tensor {name!r} has {nan} NaN and {inf} Inf values; expected all finite",
        )


def _owned(tensor: torch.Tensor, claimed: set[int]) -> torch.Tensor:
    """Detach views (Dassl token_prefix/suffix share one storage) so callers may mutate freely."""
    plain = tensor.detach()
    if type(plain) is not torch.Tensor:
        plain = plain.as_subclass(torch.Tensor)
    storage = plain.untyped_storage()
    whole = (
        plain.is_contiguous()
        and plain.storage_offset() == 0
        and storage.nbytes() == plain.numel() * plain.element_size()
        and storage.data_ptr() != 0
        and storage.data_ptr() not in claimed
    )
    if not whole:
        plain = plain.clone(memory_format=torch.contiguous_format)
    claimed.add(plain.untyped_storage().data_ptr())
    return plain


def _validated(path: Path, raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not raw:
        raise _fail(InputFileError, path, "contains no tensors; expected a checkpoint with weights")
    claimed: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        _check_tensor(path, name, tensor)
        out[name] = _owned(tensor, claimed)
    return out


# --------------------------------------------------------------------------- read_tensors


_LOADERS: dict[str, Callable[[Path, int], tuple[Any, dict[str, str]]]] = {
    "safetensors": _load_safetensors,
    "torch": _load_torch,
    "npz": _load_npz,
}


def _guarded_load(
    path: Path, fmt: str, size: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Turn every library failure into one InputFileError line; keep interrupts and OOM."""
    try:
        obj, metadata = _LOADERS[fmt](path, size)
        return _flatten(path, obj), metadata
    except MergetuneError:
        raise
    except _Refused as exc:
        raise _fail(
            UnsafeFileError,
            path,
            f"refused: loading it would call {exc.name}; "
            "mergetune never runs code from a checkpoint",
        ) from None
    except _Malformed as exc:
        raise _fail(InputFileError, path, f"corrupt {fmt} file (malformed pickle: {exc})") from None
    except MemoryError:
        raise
    except RecursionError:
        raise _fail(InputFileError, path, f"corrupt {fmt} file (nested too deeply)") from None
    except Exception as exc:
        raise _fail(
            InputFileError,
            path,
            f"corrupt or truncated {fmt} file ({_describe_exception(exc)}); "
            f"expected a readable {fmt} checkpoint",
        ) from None


def read_tensors(path: str | Path) -> TensorFile:
    """Load a checkpoint as flat, validated, CPU-owned tensors; never runs code from it."""
    p = Path(path)
    size = _regular_file_size(p)
    fmt = _sniff(p)
    try:
        digest = sha256_file(p)
    except OSError as exc:
        raise _fail(InputFileError, p, f"cannot read it ({exc.strerror or exc})") from None
    raw, metadata = _guarded_load(p, fmt, size)
    tensors = _validated(p, raw)
    return TensorFile(path=p, format=fmt, tensors=tensors, metadata=metadata, sha256=digest)


# --------------------------------------------------------------------------- writing


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


def _create_temp(target: Path) -> Path:
    """Hidden sibling so os.replace stays on one filesystem; mode honours the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        candidate = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
        try:
            os.close(os.open(candidate, flags, 0o666))
            return candidate
        except FileExistsError:
            continue


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
    path: str | Path, *, force: bool = False, inputs: Sequence[Path] = ()
) -> Iterator[Path]:
    """Yield a temp path that becomes ``path`` only if the body finishes: no half-written files."""
    target = Path(path)
    check_output_path(target, force, inputs)
    temp = _create_temp(target)
    try:
        yield temp
        _fsync(temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync(target.parent, directory=True)


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
    target = Path(path)
    with atomic_output(target, force=force, inputs=inputs) as temp:
        safetensors.torch.save_file(owned, str(temp), metadata=dict(metadata))
    return target


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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()},
                                    str(temporary))
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
