"""Behaviour of repair.checkpoints: formats, safety of pickles, validation, atomic writes."""

from __future__ import annotations

import argparse
import builtins
import collections
import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from repair.io import (
    TensorFile,
    atomic_output,
    read_safetensors_metadata,
    read_tensors,
    sha256_file,
    write_safetensors,
)
from repair.errors import (
    IncompatibleCheckpointError,
    InputFileError,
    MergetuneError,
    NumericalError,
    OutputExistsError,
    UnsafeFileError,
)


def _dassl_checkpoint() -> tuple[dict, dict[str, torch.Tensor]]:
    """A CoOp/Dassl-style checkpoint: prompt weights plus optimizer and a live scheduler object."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(4, 8))
    optimizer = torch.optim.SGD([weight], lr=0.002, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=50)
    weight.sum().backward()
    optimizer.step()
    scheduler.step()
    embedding = torch.randn(3, 77, 16, dtype=torch.float16)
    state = {
        "ctx": torch.randn(4, 16, dtype=torch.float16),
        "token_prefix": embedding[:, :1, :],
        "token_suffix": embedding[:, 5:, :],
    }
    checkpoint = {
        "state_dict": state,
        "epoch": 50,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler,
        "val_result": None,
    }
    expected = {f"state_dict.{k}": v for k, v in state.items()}  # the optimizer's momentum is training state
    return checkpoint, expected


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_keeps_tensors_metadata_and_hash(tmp_path: Path) -> None:
    tensors = {
        "visual.proj": torch.randn(8, 4),
        "logit_scale": torch.tensor(4.6, dtype=torch.float64),
        "half": torch.randn(3, 2).half(),
        "bf": torch.randn(5).bfloat16(),
        "ids": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    metadata = {"mergetune.kind": "coop", "n": "3"}
    out = write_safetensors(tmp_path / "w.safetensors", tensors, metadata)
    loaded = read_tensors(out)
    assert isinstance(loaded, TensorFile)
    assert loaded.format == "safetensors"
    assert loaded.metadata == {"mergetune.kind": "coop", "n": "3"}
    assert loaded.sha256 == hashlib.sha256(out.read_bytes()).hexdigest() == sha256_file(out)
    assert set(loaded.tensors) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor)
    assert read_safetensors_metadata(out) == {"mergetune.kind": "coop", "n": "3"}


def test_safetensors_tensors_own_their_storage(tmp_path: Path) -> None:
    base = torch.randn(10, 4)
    write_safetensors(tmp_path / "v.safetensors", {"a": base[:3], "b": base[3:].t()}, {})
    loaded = read_tensors(tmp_path / "v.safetensors").tensors
    pointers = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(pointers) == 2
    for name, tensor in loaded.items():
        assert tensor.is_contiguous()
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert torch.equal(loaded["b"], base[3:].t())


def test_format_is_sniffed_from_content_not_extension(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "really_torch.safetensors")
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "really_safetensors.pt")
    assert read_tensors(tmp_path / "really_torch.safetensors").format == "torch"
    assert read_tensors(tmp_path / "really_safetensors.pt").format == "safetensors"


def test_safetensors_header_length_beyond_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b'{"a": 1}')
    with pytest.raises(InputFileError, match="huge.safetensors: safetensors header claims"):
        read_tensors(path)
    with pytest.raises(InputFileError):
        read_safetensors_metadata(path)


def test_safetensors_header_declaring_huge_shape_is_refused(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}
    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "shape.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(InputFileError) as info:
        read_tensors(path)
    assert "shape.safetensors" in _one_line(info.value)


def test_read_safetensors_metadata_rejects_other_formats(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    with pytest.raises(InputFileError, match="not a safetensors file"):
        read_safetensors_metadata(tmp_path / "a.pt")


def test_write_safetensors_requires_string_metadata(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        bad_metadata: dict = {"epoch": 3}
        write_safetensors(tmp_path / "m.safetensors", {"a": torch.ones(1)}, bad_metadata)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- torch pickles


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_dassl_checkpoint_with_scheduler_object_is_flattened(tmp_path: Path, legacy: bool) -> None:
    checkpoint, expected = _dassl_checkpoint()
    path = tmp_path / "model.pth.tar-50"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(pickle.UnpicklingError):  # the fallback path is really exercised
        torch.load(path, weights_only=True)

    loaded = read_tensors(path)

    assert loaded.format == "torch" and loaded.layout.name == "dassl"
    assert loaded.metadata == {}
    assert set(loaded.tensors) == set(expected)
    assert loaded.training_state == {"optimizer.state.0.momentum_buffer": (4, 8)}  # listed, never read as weights
    pointers = set()
    for name, tensor in loaded.tensors.items():
        assert tensor.dtype == expected[name].dtype
        assert torch.equal(tensor, expected[name])
        assert tensor.is_contiguous()
        assert tensor.device.type == "cpu"
        assert type(tensor) is torch.Tensor and not tensor.requires_grad
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        pointers.add(tensor.untyped_storage().data_ptr())
    assert len(pointers) == len(loaded.tensors)
    assert loaded.tensors["state_dict.ctx"].dtype == torch.float16


def test_plain_state_dict_with_parameters_and_nested_lists(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    extra = [torch.ones(1), (torch.zeros(2), "x")]
    torch.save({"model": model.state_dict(), "extra": extra}, tmp_path / "m.pt")
    loaded = read_tensors(tmp_path / "m.pt").tensors
    assert set(loaded) == {"model.weight", "model.bias", "extra.0", "extra.1.0"}
    assert torch.equal(loaded["model.weight"], model.weight.detach())


def test_bare_tensor_is_named_tensor(tmp_path: Path) -> None:
    torch.save(torch.arange(3), tmp_path / "t.pt")
    assert list(read_tensors(tmp_path / "t.pt").tensors) == ["tensor"]


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


class _ExecCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload", [_SystemCall, _ExecCall], ids=["os.system", "builtins.exec"])
def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, legacy: bool, payload: type
) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "ckpt.pth"
    checkpoint = {"w": torch.ones(2), "evil": payload(marker)}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeFileError) as info:
        read_tensors(path)
    message = _one_line(info.value)
    assert message.startswith(f"{path}: refused: loading it would call ")
    assert ("system" in message) if payload is _SystemCall else ("builtins.exec" in message)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "script.pt"))
    with pytest.raises(InputFileError, match="TorchScript"):
        read_tensors(tmp_path / "script.pt")


def test_checkpoint_without_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "name": "x"}, tmp_path / "empty.pt")
    with pytest.raises(InputFileError, match="no tensors"):
        read_tensors(tmp_path / "empty.pt")


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_nan_and_inf_are_numerical_errors(tmp_path: Path, fmt: str) -> None:
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("nan")], dtype=torch.float16)
    path = tmp_path / "bad.bin"
    tensors = {"ok": torch.ones(2), "prompt_learner.ctx": bad}
    if fmt == "torch":
        torch.save(tensors, path)
    else:
        safetensors.torch.save_file(tensors, path)
    with pytest.raises(NumericalError) as info:
        read_tensors(path)
    message = _one_line(info.value)
    assert "prompt_learner.ctx" in message and "2 NaN" in message and "1 Inf" in message


def test_complex_dtype_is_incompatible(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(IncompatibleCheckpointError, match="complex64"):
        read_tensors(tmp_path / "c.pt")


def test_sparse_tensor_is_incompatible(tmp_path: Path) -> None:
    torch.save({"w": torch.eye(3).to_sparse()}, tmp_path / "s.pt")
    with pytest.raises(IncompatibleCheckpointError, match="layout"):
        read_tensors(tmp_path / "s.pt")


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_linear_probe_round_trip(tmp_path: Path, compressed: bool) -> None:
    coef = np.random.default_rng(0).standard_normal((10, 512)).astype(np.float32)
    intercept = np.arange(10, dtype=np.float64)
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "probe.npz", coef_=coef, intercept_=intercept, classes_=np.arange(10))
    loaded = read_tensors(tmp_path / "probe.npz")
    assert loaded.format == "npz"
    assert set(loaded.tensors) == {"coef_", "intercept_", "classes_"}
    assert np.array_equal(loaded.tensors["coef_"].numpy(), coef)
    assert loaded.tensors["intercept_"].dtype == torch.float64
    assert loaded.tensors["coef_"].is_contiguous()


def test_npz_big_endian_and_fortran_arrays_come_back_native(tmp_path: Path) -> None:
    data = np.asfortranarray(np.arange(12, dtype=">f4").reshape(3, 4))
    np.savez(tmp_path / "be.npz", w=data)
    tensor = read_tensors(tmp_path / "be.npz").tensors["w"]
    assert tensor.is_contiguous()
    assert np.array_equal(tensor.numpy(), data.astype(np.float32))


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    labels = np.array([{"a": 1}, None], dtype=object)
    np.savez(tmp_path / "obj.npz", coef_=np.ones(3), labels=labels)
    with pytest.raises(UnsafeFileError, match="object array"):
        read_tensors(tmp_path / "obj.npz")


def test_npz_string_array_is_incompatible(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", names=np.array(["cat", "dog"]))
    with pytest.raises(IncompatibleCheckpointError):
        read_tensors(tmp_path / "s.npz")


# --------------------------------------------------------------------------- bad inputs


def test_unknown_bytes_are_refused_with_accepted_formats(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"GIF89a not a checkpoint at all")
    with pytest.raises(InputFileError) as info:
        read_tensors(path)
    message = _one_line(info.value)
    assert str(path) in message and "safetensors" in message and "npz" in message


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_missing_directory_and_empty_inputs(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.pt"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(InputFileError) as info:
        read_tensors(path)
    assert str(path) in _one_line(info.value)


def test_truncated_torch_file_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(64)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputFileError):
        read_tensors(path)


def test_errors_are_mergetune_errors() -> None:
    for cls in (UnsafeFileError, IncompatibleCheckpointError, NumericalError, OutputExistsError):
        assert issubclass(cls, MergetuneError)


# --------------------------------------------------------------------------- atomic output


def test_atomic_output_leaves_nothing_when_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output(target) as temp:
            assert temp.parent == tmp_path and temp.name.startswith(".out.safetensors.tmp-")
            temp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_cleans_up_on_keyboard_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "out.bin") as temp:
            temp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with atomic_output(target) as temp:
        temp.write_bytes(b"done")
    assert target.read_bytes() == b"done"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError) as info:
        write_safetensors(target, {"a": torch.ones(1)}, {})
    assert str(target) in _one_line(info.value)
    assert target.read_bytes() == b"old"
    write_safetensors(target, {"a": torch.ones(1)}, {}, force=True)
    assert torch.equal(read_tensors(target).tensors["a"], torch.ones(1))


def test_refuses_to_overwrite_an_input_even_with_force(tmp_path: Path) -> None:
    source = tmp_path / "in.safetensors"
    write_safetensors(source, {"a": torch.ones(1)}, {})
    before = source.read_bytes()
    alias = tmp_path / "alias.safetensors"
    alias.symlink_to(source)
    for target in (source, tmp_path / "." / "in.safetensors", alias):
        with pytest.raises(OutputExistsError, match="input"):
            write_safetensors(target, {"a": torch.zeros(1)}, {}, force=True, inputs=[source])
    assert source.read_bytes() == before


def test_missing_output_directory_is_reported(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "out.safetensors"
    with pytest.raises(InputFileError, match="output directory .* does not exist"):
        with atomic_output(target):
            pass


# --------------------------------------------------------------------------- pickle corner cases


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [1, 2, 4, 5])
def test_dassl_checkpoint_loads_under_every_pickle_protocol(
    tmp_path: Path, legacy: bool, protocol: int
) -> None:
    checkpoint, expected = _dassl_checkpoint()
    path = tmp_path / "ckpt.pth"
    torch.save(
        checkpoint, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy
    )
    loaded = read_tensors(path).tensors
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


class _DictSubclass(dict):
    pass


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_harmless_python_values_are_dropped_not_refused(tmp_path: Path, legacy: bool) -> None:
    config = _DictSubclass(lr=0.1, hidden=torch.ones(1))
    config.note = "attribute"
    checkpoint = {
        "w": torch.ones(2),
        "best_acc": np.float64(71.5),
        "probe": np.ones(3),
        "args": argparse.Namespace(lr=0.002, backbone="ViT-B/16"),
        "config": config,
        "blobs": [b"", b"abc", complex(1, 2)],
        "device": torch.device("cpu"),
        "shapes": {
            "size": torch.Size([2, 3]),
            "set": {1, 2},
            "frozen": frozenset({3}),
            "slice": slice(1, 4),
        },
        "ordered": collections.OrderedDict(z=torch.zeros(1)),
    }
    torch.save(checkpoint, tmp_path / "c.pt", _use_new_zipfile_serialization=not legacy)
    assert sorted(read_tensors(tmp_path / "c.pt").tensors) == ["ordered.z", "w"]


def test_whole_pickled_model_is_read_by_its_module_paths(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    torch.save(model, tmp_path / "model.pt")
    tensors = read_tensors(tmp_path / "model.pt").tensors
    assert tensors.keys() == model.state_dict().keys()
    assert all(torch.equal(tensors[name], value) for name, value in model.state_dict().items())


def test_objects_without_tensors_get_a_state_dict_hint(tmp_path: Path) -> None:
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "args.pt")
    with pytest.raises(InputFileError, match="state dict"):
        read_tensors(tmp_path / "args.pt")


def test_cyclic_containers_do_not_recurse_forever(tmp_path: Path) -> None:
    loop: list = [torch.ones(1)]
    loop.append(loop)
    torch.save({"loop": loop}, tmp_path / "loop.pt")
    assert list(read_tensors(tmp_path / "loop.pt").tensors) == ["loop.0"]


def test_restricted_unpickler_refuses_calls_but_builds_inert_objects() -> None:
    from repair.io.unpickle import _Refused, _restricted_pickle_module

    module = _restricted_pickle_module(byte_budget=0)
    inert = module.load(io.BytesIO(pickle.dumps(argparse.Namespace(a=1), protocol=1)))
    assert type(inert).__name__ == "Placeholder"
    marker = Path("/nonexistent/MARKER")
    for payload in (_SystemCall(marker), _ExecCall(marker)):
        with pytest.raises(_Refused):
            module.load(io.BytesIO(pickle.dumps(payload, protocol=2)))
