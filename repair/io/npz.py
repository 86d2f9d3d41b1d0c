"""Reading numpy ``.npz`` archives without pickle and without trusting their headers.

Each member's ``.npy`` header is parsed and checked (version, dtype, declared shape against the
bytes actually stored, compression ratio) before numpy allocates what it declares; object arrays,
which only pickle can load, are refused.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from repair.errors import IncompatibleCheckpointError, InputFileError, UnsafeFileError
from repair.io._messages import _fail

_NUMPY_DTYPES = {
    np.dtype(name): name
    for name in (
        "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"
    )
}
_DEFLATE_MAX_RATIO = 1100  # deflate cannot expand more than ~1032:1


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
