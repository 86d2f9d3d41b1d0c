"""Tip-Adapter's cache files (gaopengcuhk/Tip-Adapter ``main.py`` / ``utils.py``).

Tip-Adapter-F writes three files into its ``cache_dir``, each a bare ``torch.save``: ``keys_<n>shots.pt``
(the cache keys ``[D, NK]``, normalised few-shot image features), ``values_<n>shots.pt`` (their one-hot
labels ``[NK, N]``, fp16) and, after fine-tuning, ``best_F_<n>shots.pt`` (the adapter's weight
``[NK, D]``, an ``nn.Parameter``, which upstream assigns back with ``adapter.weight = torch.load(...)``).
Given ``best_F_<n>shots.pt`` (or the folder holding exactly one), the other two are read from beside it,
as ``best_F``, ``cache_keys`` and ``cache_values``. An output is a folder laid out like ``cache_dir``:
the three files in the input's dtypes (``best_F`` again a parameter, so upstream's assignment works),
plus ``mergetune.json``, the run's record (upstream never reads it).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from repair.errors import InputFileError
from repair.io._messages import _fail
from repair.io.layout import Layout
from repair.io.write import write_folder

BEST_F = re.compile(r"^best_F_(?P<shots>\d+)shots\.pt$")
NAMES = {"best_F": "best_F_{}shots.pt", "cache_keys": "keys_{}shots.pt", "cache_values": "values_{}shots.pt"}
RECORD = "mergetune.json"
MAX_RECORD = 16 * 1024 * 1024


def tip_adapter_file(path: Path) -> Path | None:
    """The ``best_F_<n>shots.pt`` a path names: itself, or the only one in a folder; None for anything else."""
    if path.is_dir():
        found = sorted(entry for entry in path.iterdir() if BEST_F.match(entry.name))
        if len(found) > 1:
            names = ", ".join(entry.name for entry in found)
            raise _fail(InputFileError, path, f"holds {len(found)} Tip-Adapter-F files ({names}); pass the "
                                              "best_F_<n>shots.pt to read")
        return found[0] if found else None
    return path if BEST_F.match(path.name) else None


def read_tip_adapter(best_f: Path, read: callable):
    """The three cache files as one :class:`~repair.io.read.TensorFile` (``read``: the single-file reader)."""
    from repair.io.read import TensorFile

    shots = BEST_F.match(best_f.name)["shots"]
    files = {name: best_f.with_name(pattern.format(shots)) for name, pattern in NAMES.items()}
    missing = [path.name for path in files.values() if not path.is_file()]
    if missing:
        raise _fail(InputFileError, best_f, f"a Tip-Adapter-F file needs {' and '.join(missing)} beside it (its cache "
                                            "keys and values, from the same cache_dir)")
    tensors, digest = {}, hashlib.sha256()
    for name, path in files.items():
        loaded = read(path)
        if len(loaded.tensors) != 1:
            raise _fail(InputFileError, path, f"holds {len(loaded.tensors)} tensors; Tip-Adapter saves one per file")
        tensors[name] = next(iter(loaded.tensors.values()))
        digest.update(f"{path.name} {loaded.sha256}\n".encode())
    metadata = _record(best_f.with_name(RECORD))
    layout = Layout("tip-adapter", {"shots": int(shots), "dtypes": {k: str(v.dtype) for k, v in tensors.items()},
                                    "marker": RECORD, "files": [*(p.format(shots) for p in NAMES.values()), RECORD]},
                    folder=True)
    return TensorFile(path=best_f, format="torch", tensors=tensors, metadata=metadata, sha256=digest.hexdigest(),
                      layout=layout)


def _record(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_RECORD:
        raise _fail(InputFileError, path, f"is larger than {MAX_RECORD} bytes; not a mergetune record")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(InputFileError, path, "damaged mergetune record (not JSON)") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise _fail(InputFileError, path, "damaged mergetune record (not a mapping of strings)")
    return data


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_tip_adapter(out: Path, layout: Layout, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                      force: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """A folder laid out like Tip-Adapter's ``cache_dir`` (see the module docstring), atomically."""
    shots = layout.details["shots"]
    files = {}
    for name, pattern in NAMES.items():
        tensor = tensors[name].detach().cpu().clone(memory_format=torch.contiguous_format)
        files[pattern.format(shots)] = _torch_bytes(torch.nn.Parameter(tensor) if name == "best_F" else tensor)
    files[RECORD] = (json.dumps(dict(metadata), sort_keys=True) + "\n").encode()
    return write_folder(out, files, {}, force=force, inputs=inputs, marker=RECORD,
                        allowed=layout.details.get("files", ()))
