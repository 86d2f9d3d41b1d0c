"""Property: whatever bytes a file holds, read_tensors returns a TensorFile or a MergetuneError.

Inputs are random bytes, truncations and byte mutations of valid files of every
format, hand-made hostile safetensors headers, and damaged pickles re-packed into
a well-formed torch zip (so the unpickler, not the zip reader, meets the damage).
"""

from __future__ import annotations

import io
import json
import signal
import struct
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repair.io import ALLOWED_DTYPES, TensorFile, read_tensors
from repair.errors import InputFileError, MergetuneError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_EXAMPLE_SECONDS = 10

EDITS = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=1.0), st.integers(0, 255)),
    min_size=1,
    max_size=3,
)


def _dassl_bytes(legacy: bool) -> bytes:
    weight = torch.nn.Parameter(torch.randn(2, 3))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=5)
    embedding = torch.randn(2, 6, 4, dtype=torch.float16)
    state = {"ctx": torch.randn(2, 4).half(), "token_prefix": embedding[:, :1]}
    state["token_suffix"] = embedding[:, 3:]
    checkpoint = {
        "state_dict": state,
        "epoch": 5,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler,
    }
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _safetensors_bytes() -> bytes:
    tensors = {
        "a": torch.randn(3, 2),
        "b": torch.arange(4, dtype=torch.int32),
        "c": torch.ones(2).half(),
    }
    return safetensors.torch.save(tensors, metadata={"kind": "coop"})


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, coef_=np.ones((2, 3), dtype=np.float32), intercept_=np.zeros(2))
    return buffer.getvalue()


def _zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


torch.manual_seed(0)
TORCH_ZIP = _dassl_bytes(legacy=False)
TORCH_LEGACY = _dassl_bytes(legacy=True)
VALID = {
    "safetensors": _safetensors_bytes(),
    "torch_zip": TORCH_ZIP,
    "torch_legacy": TORCH_LEGACY,
    "npz": _npz_bytes(),
}
ZIP_MEMBERS = _zip_members(TORCH_ZIP)
DATA_PKL = next(data for name, data in ZIP_MEMBERS if name.endswith("/data.pkl"))


def _torch_zip_with_pickle(pickled: bytes) -> bytes:
    """Re-pack the valid torch zip with a different data.pkl."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in ZIP_MEMBERS:
            archive.writestr(name, pickled if name.endswith("/data.pkl") else data)
    return buffer.getvalue()


def _mutate(data: bytes, edits: list[tuple[float, int]]) -> bytes:
    mutated = bytearray(data)
    for where, value in edits:
        mutated[min(int(where * len(mutated)), len(mutated) - 1)] = value
    return bytes(mutated)


def _with_header(header: object, data: bytes = b"\0" * 16) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _entry(dtype: str, shape: list[int], offsets: list[int]) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


_DEEP_JSON = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"

HOSTILE_SAFETENSORS = {
    "huge_shape": _with_header({"w": _entry("F32", [2**40, 2**40], [0, 16])}),
    "overflowing_shape": _with_header({"w": _entry("F32", [2**62, 4], [0, 16])}),
    "negative_shape": _with_header({"w": _entry("F32", [-1], [0, 16])}),
    "unknown_dtype": _with_header({"w": _entry("Q99", [4], [0, 16])}),
    "complex_dtype": _with_header({"w": _entry("C64", [2], [0, 16])}),
    "offsets_past_end": _with_header({"w": _entry("F32", [4], [8, 24])}),
    "offsets_reversed": _with_header({"w": _entry("F32", [4], [16, 0])}),
    "offsets_max": _with_header({"w": _entry("F32", [4], [0, 2**64 - 1])}),
    "overlapping": _with_header(
        {"w": _entry("F32", [2], [0, 8]), "v": _entry("F32", [2], [4, 12])}
    ),
    "metadata_not_str": _with_header(
        {"w": _entry("F32", [4], [0, 16]), "__metadata__": {"k": 1}}
    ),
    "nan_payload": _with_header({"w": _entry("F32", [4], [0, 16])}, data=b"\xff" * 16),
    "header_is_list": _with_header([1, 2, 3]),
    "no_tensors": _with_header({}),
    "length_2_63": struct.pack("<Q", 2**63) + b"{}",
    "length_over_100mb": struct.pack("<Q", 200 * 1024 * 1024) + b"{" + b" " * 64,
    "deeply_nested_json": struct.pack("<Q", len(_DEEP_JSON)) + _DEEP_JSON,
}


class _Hang(Exception):
    pass


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Turn a hang into a failure instead of a stuck test run."""

    def _alarm(signum: int, frame: object) -> None:
        raise _Hang(f"read_tensors took more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _check_outcome(workdir: Path, data: bytes) -> None:
    path = workdir / "fuzz.ckpt"
    path.write_bytes(data)
    with _time_limit(PER_EXAMPLE_SECONDS):
        try:
            result = read_tensors(path)
        except MergetuneError as exc:
            assert "\n" not in str(exc)
            return
    assert isinstance(result, TensorFile)
    assert result.tensors
    for tensor in result.tensors.values():
        assert type(tensor) is torch.Tensor
        assert tensor.device.type == "cpu" and tensor.is_contiguous()
        assert tensor.dtype in ALLOWED_DTYPES
        if tensor.dtype.is_floating_point:
            assert bool(torch.isfinite(tensor).all())


PREFIXES = [b"", b"PK\x03\x04", b"\x80\x02", b"L1195470", b"\x10\0\0\0\0\0\0\0{"]


@FUZZ
@given(data=st.binary(max_size=512), prefix=st.sampled_from(PREFIXES))
def test_random_bytes(workdir: Path, data: bytes, prefix: bytes) -> None:
    _check_outcome(workdir, prefix + data)


@FUZZ
@given(kind=st.sampled_from(sorted(VALID)), cut=st.floats(min_value=0.0, max_value=1.0))
def test_truncations(workdir: Path, kind: str, cut: float) -> None:
    original = VALID[kind]
    _check_outcome(workdir, original[: int(len(original) * cut)])


@FUZZ
@given(kind=st.sampled_from(sorted(VALID)), edits=EDITS)
def test_byte_mutations(workdir: Path, kind: str, edits: list[tuple[float, int]]) -> None:
    _check_outcome(workdir, _mutate(VALID[kind], edits))


@FUZZ
@given(edits=EDITS, cut=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)))
def test_damaged_pickle_inside_valid_zip(
    workdir: Path, edits: list[tuple[float, int]], cut: float | None
) -> None:
    pickled = _mutate(DATA_PKL, edits)
    if cut is not None:
        pickled = pickled[: int(len(pickled) * cut)]
    _check_outcome(workdir, _torch_zip_with_pickle(pickled))


@FUZZ
@given(opcodes=st.binary(min_size=1, max_size=256))
def test_random_pickle_opcodes_inside_valid_zip(workdir: Path, opcodes: bytes) -> None:
    _check_outcome(workdir, _torch_zip_with_pickle(b"\x80\x02" + opcodes + b"."))


@pytest.mark.parametrize("name", sorted(HOSTILE_SAFETENSORS))
def test_hostile_safetensors_headers(workdir: Path, name: str) -> None:
    _check_outcome(workdir, HOSTILE_SAFETENSORS[name])


def test_storage_larger_than_file_is_refused_before_allocation(workdir: Path) -> None:
    """A pickle claiming a 2**40-element storage must not make torch allocate it."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(3), "evil": _Opaque()}, buffer)  # forces the restricted path
    members = dict(_zip_members(buffer.getvalue()))
    name = next(n for n in members if n.endswith("/data.pkl"))
    numel = b"K\x03t"  # BININT1 3 closing the ('storage', type, key, 'cpu', numel) tuple
    assert members[name].count(numel) == 1
    big = members[name].replace(numel, b"\x8a\x06" + (2**40).to_bytes(6, "little") + b"t")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, big if member == name else data)
    path = workdir / "big.pt"
    path.write_bytes(out.getvalue())
    with pytest.raises(InputFileError, match="storages claim more bytes than the file holds"):
        read_tensors(path)


class _Opaque:
    """Any class outside the allow-list: weights_only refuses it, the fallback makes it inert."""


def test_fuzz_seeds_are_valid(workdir: Path) -> None:
    """The mutations start from files that really load, so they probe the parsers."""
    for data in (*VALID.values(), _torch_zip_with_pickle(DATA_PKL)):
        path = workdir / "seed.ckpt"
        path.write_bytes(data)
        assert read_tensors(path).tensors
