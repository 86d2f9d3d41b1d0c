"""Writing an output in a layout: the input's own (:func:`output_layout`), one writer per layout.

A new layout is one module (its reader records a :class:`~repair.io.layout.Layout`, its writer takes
one) and one line in :data:`WRITERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from repair.io.dassl import write_dassl
from repair.io.layout import FLAT, Layout
from repair.io.write import check_finite, check_output_folder, check_output_path, write_safetensors

OUTPUT_FORMATS = ("input", "safetensors")  # --format: the input's layout, or one safetensors file


def _write_flat(out: Path, layout: Layout, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                force: bool = False, inputs: Sequence[Path] = ()) -> Path:
    return write_safetensors(out, tensors, metadata, force=force, inputs=inputs)


def _write_hf_clip(*args, **kwargs) -> Path:
    from repair.io.hf_clip import write_hf_clip  # the map to Hugging Face names: only when one is written
    return write_hf_clip(*args, **kwargs)


def _write_tip_adapter(*args, **kwargs) -> Path:
    from repair.io.tip_adapter import write_tip_adapter
    return write_tip_adapter(*args, **kwargs)


Writer = Callable[..., Path]
WRITERS: dict[str, Writer] = {"flat": _write_flat, "dassl": write_dassl, "hf-clip": _write_hf_clip,
                              "tip-adapter": _write_tip_adapter}


def output_layout(source_layout: Layout | None, output_format: str | None, out: Path) -> Layout:
    """The layout an output is written in: ``safetensors`` one safetensors file; ``input`` the input's own (a
    Dassl checkpoint stays one, a Hugging Face folder stays one; flat files become safetensors); unset: the
    input's, unless ``out`` ends in ``.safetensors``."""
    if output_format not in (None, *OUTPUT_FORMATS):
        raise ValueError(f"unknown output format {output_format!r}; choose {', '.join(OUTPUT_FORMATS)}")
    if source_layout is None or output_format == "safetensors":
        return FLAT
    if output_format is None and Path(out).name.endswith(".safetensors"):
        return FLAT
    return source_layout


def check_layout_output(out: Path, layout: Layout, force: bool, inputs: Sequence[Path]) -> None:
    """The output check the write of ``layout`` makes, before any work (a folder, or a file)."""
    if layout.folder:
        check_output_folder(out, force, inputs, marker=layout.details.get("marker"),
                            files=layout.details.get("files", ()))
    else:
        check_output_path(out, force, inputs)


def write_layout(out: Path, layout: Layout, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                 force: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """Write ``tensors`` (the input's names) with the run's record, atomically, in ``layout``: only finite ones."""
    check_finite(tensors, Path(out))
    return WRITERS[layout.name](Path(out), layout, tensors, metadata, force=force, inputs=inputs)
