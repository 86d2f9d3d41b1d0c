"""Reading checkpoint files without ever running code from them.

Every input is sniffed by content (never by extension), loaded through a path that cannot
execute pickled code (safetensors; torch zip/legacy via ``weights_only`` or the restricted
unpickler in :mod:`repair.io.unpickle`; npz via :mod:`repair.io.npz`), flattened to
``name -> tensor`` and checked (layout, dtype, device, NaN/Inf) before anything else sees it.
Every failure is one line that names the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open

from repair.errors import (
    IncompatibleCheckpointError,
    InputFileError,
    MergetuneError,
    NumericalError,
    UnsafeFileError,
)
from repair.io._messages import _describe_exception, _fail
from repair.io.dassl import dassl_layout, split_training_state
from repair.io.layout import FLAT, Layout
from repair.io.npz import _load_npz
from repair.io.tip_adapter import read_tip_adapter, tip_adapter_file
from repair.io.unpickle import _Inert, _Malformed, _Refused, _restricted_pickle_module, inert_state

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_SAFETENSORS_HEADER",
    "TensorFile",
    "read_safetensors_metadata",
    "read_tensors",
    "sha256_file",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "values_list",
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
_LEGACY_TEXT_MAGIC = b"L1195470"  # torch's magic number as a protocol-0/1 LONG opcode
_HASH_CHUNK = 1 << 20
_MAX_DEPTH = 64  # nesting deeper than any real checkpoint; guards RecursionError
_MAX_NODES = 2_000_000  # bounds flattening of shared-subtree (DAG) pickles
_MAX_VALUES = 100_000  # plain (non-tensor) leaves kept beside the tensors
_PLAIN_LEAVES = (str, int, float, bool, type(None))
ADAPTER_CONFIG = "adapter_config.json"  # a Hugging Face PEFT adapter folder: its config ...
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # ... and its tensors
HF_CONFIG = "config.json"  # a Hugging Face transformers model folder
_MAX_ADAPTER_CONFIG = 1024 * 1024


@dataclass(frozen=True)
class TensorFile:
    """A validated checkpoint: flat CPU tensors plus where they came from.

    ``values`` holds the plain leaves (str, int, float, bool, None) found beside the tensors,
    by the same flattened names (CLIP-LoRA's ``metadata.r``, a pickled head's ``normalize``):
    kinds read their layout from them. ``metadata`` is the safetensors ``__metadata__``, a
    torch checkpoint's top-level ``metadata`` mapping (its string entries), or a PEFT folder's
    weights metadata plus its ``adapter_config.json`` text under :data:`ADAPTER_CONFIG`.
    ``layout`` says how the tensors were packaged (an output is packaged the same way);
    ``training_state`` lists, by name and shape, tensors of the optimizer and scheduler a
    training checkpoint carries (a Dassl file's momentum buffers): read, but never weights.
    """

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str
    values: dict[str, Any] = field(default_factory=dict)
    layout: Layout = FLAT
    training_state: dict[str, tuple[int, ...]] = field(default_factory=dict)


def values_list(values: Mapping[str, Any], prefix: str) -> list[Any] | None:
    """A list that was flattened into ``prefix.0``, ``prefix.1``, ...; a plain value as a one-item list."""
    if prefix in values:
        return [values[prefix]]
    items = []
    while f"{prefix}.{len(items)}" in values:
        items.append(values[f"{prefix}.{len(items)}"])
    return items or None


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


# --------------------------------------------------------------------------- torch


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


def _torch_metadata(obj: Any) -> dict[str, str]:
    """A torch checkpoint's top-level ``metadata`` mapping (CLIP-LoRA's; mergetune's own torch outputs):
    its string entries are the file's metadata, as a safetensors header's are."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return {}
    return {key: value for key, value in meta.items() if isinstance(key, str) and isinstance(value, str)}


# --------------------------------------------------------------------------- flatten / validate


def _join(prefix: str, key: Any) -> str:
    name = key if isinstance(key, str) else str(key)
    return f"{prefix}.{name}" if prefix else name


class _Flattener:
    """Walks nested dicts/lists keeping tensors; cycles and DAG blow-ups are bounded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out: dict[str, torch.Tensor] = {}
        self.values: dict[str, Any] = {}
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
        module = _module_items(obj)
        if module is not None:
            items: Any = module  # torch.save(model): a placeholder module's tensors by their module paths
        elif isinstance(obj, dict):
            items = list(obj.items())
        elif isinstance(obj, (list, tuple)):
            items = list(enumerate(obj))
        else:
            if isinstance(obj, _PLAIN_LEAVES) and len(self.values) < _MAX_VALUES:
                self.values[name] = obj  # layout facts (a LoRA rank, a head's normalize flag)
            self.dropped_objects += isinstance(obj, _Inert)
            return  # placeholders of optimizers/schedulers: not weights
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


_MODULE_DICTS = ("_parameters", "_buffers", "_modules")


def _module_items(obj: Any) -> list[tuple[str, Any]] | None:
    """A pickled ``torch.nn.Module`` (a placeholder holding its ``__dict__``) as name -> value, the way
    ``state_dict()`` names them: parameters, persistent buffers and sub-modules by attribute name, plus its plain
    attributes (``normalize``, ``process_images``) and attributes that hold further modules. None for
    anything else: optimizers, schedulers and other objects stay opaque."""
    state = inert_state(obj)
    if state is None or not all(isinstance(state.get(key), dict) for key in _MODULE_DICTS):
        return None
    transient = state.get("_non_persistent_buffers_set")
    transient = transient if isinstance(transient, (set, frozenset)) else set()  # not in state_dict (attn masks)
    items: list[tuple[str, Any]] = []
    for key in _MODULE_DICTS:
        items += [(name, value) for name, value in state[key].items()
                  if value is not None and not (key == "_buffers" and name in transient)]
    for name, value in state.items():
        if isinstance(name, str) and not name.startswith("_") and name != "training" and (
                isinstance(value, _PLAIN_LEAVES) or _module_items(value) is not None):
            items.append((name, value))
    return items


def _flatten(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
    return flattener.out, flattener.values


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
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any], Layout]:
    """Turn every library failure into one InputFileError line; keep interrupts and OOM."""
    try:
        obj, metadata = _LOADERS[fmt](path, size)
        tensors, values = _flatten(path, obj)
        layout = (dassl_layout(obj, values) if fmt == "torch" else None) or FLAT
        return tensors, metadata or (_torch_metadata(obj) if fmt == "torch" else {}), values, layout
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
    """Load a checkpoint as flat, validated, CPU-owned tensors; never runs code from it.

    A folder is read as a Hugging Face PEFT adapter (:func:`read_adapter_folder`), a Hugging Face transformers
    CLIP model (:mod:`repair.io.hf_clip`) or Tip-Adapter's cache files (:mod:`repair.io.tip_adapter`, also
    from its ``best_F_<n>shots.pt``).
    """
    p = Path(path)
    if p.is_dir():
        return _read_folder(p)
    if tip_adapter_file(p) is not None and p.is_file():
        return read_tip_adapter(p, _read_file)
    return _read_file(p)


def _read_folder(folder: Path) -> TensorFile:
    if (folder / ADAPTER_CONFIG).is_file():
        return read_adapter_folder(folder)
    if (folder / HF_CONFIG).is_file():
        from repair.io.hf_clip import read_hf_clip_folder  # the name map: only when such a folder is read

        return read_hf_clip_folder(folder, _read_file)
    best_f = tip_adapter_file(folder)
    if best_f is not None:
        return read_tip_adapter(best_f, _read_file)
    raise _fail(InputFileError, folder, f"is a directory without {ADAPTER_CONFIG}; expected a checkpoint file, a PEFT "
                                        f"adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}), a Hugging Face CLIP "
                                        f"folder ({HF_CONFIG} + model.safetensors) or a Tip-Adapter cache_dir "
                                        "(best_F_<n>shots.pt)")


def _read_file(p: Path) -> TensorFile:
    """One checkpoint file (not a folder)."""
    size = _regular_file_size(p)
    fmt = _sniff(p)
    try:
        digest = sha256_file(p)
    except OSError as exc:
        raise _fail(InputFileError, p, f"cannot read it ({exc.strerror or exc})") from None
    raw, metadata, values, layout = _guarded_load(p, fmt, size)
    training_state: dict[str, tuple[int, ...]] = {}
    if layout.name == "dassl":
        raw, training_state = split_training_state(raw)
    tensors = _validated(p, raw)
    return TensorFile(path=p, format=fmt, tensors=tensors, metadata=metadata, sha256=digest, values=values,
                      layout=layout, training_state=training_state)


def read_adapter_folder(folder: Path) -> TensorFile:
    """A PEFT adapter folder: ``adapter_model.safetensors`` read as any safetensors file, its
    ``adapter_config.json`` kept as text in the metadata. The folder's sha256 covers both files
    (name, then the file's own sha256, per line), so provenance checks see a changed config too."""
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise _fail(InputFileError, folder, f"is a directory without {ADAPTER_CONFIG}; expected a checkpoint "
                                            f"file or a PEFT adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    if not weights_path.is_file():
        raise _fail(InputFileError, folder, f"PEFT adapter folder without {ADAPTER_WEIGHTS} (only safetensors "
                                            "adapters are read: PEFT's save_pretrained writes them by default)")
    if config_path.stat().st_size > _MAX_ADAPTER_CONFIG:
        raise _fail(InputFileError, config_path, f"is larger than {_MAX_ADAPTER_CONFIG} bytes; not a PEFT config")
    try:
        config_text = config_path.read_text(encoding="utf-8")
        config = json.loads(config_text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(InputFileError, config_path, f"not a readable JSON config ({_describe_exception(exc)})") from None
    if not isinstance(config, dict):
        raise _fail(InputFileError, config_path, "is not a JSON object; expected a PEFT adapter config")
    weights = read_tensors(weights_path)
    if weights.format != "safetensors":
        raise _fail(InputFileError, weights_path, "is not a safetensors file")
    digest = hashlib.sha256()
    for name, file_digest in ((ADAPTER_CONFIG, sha256_file(config_path)), (ADAPTER_WEIGHTS, weights.sha256)):
        digest.update(f"{name} {file_digest}\n".encode())
    return TensorFile(path=folder, format="peft", tensors=weights.tensors,
                      metadata={**weights.metadata, ADAPTER_CONFIG: config_text}, sha256=digest.hexdigest())
