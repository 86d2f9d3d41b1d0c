"""How a checkpoint's tensors are packaged on disk, so that an output is packaged the same way.

A reader records the :class:`Layout` of what it read on the :class:`~repair.io.read.TensorFile`;
:func:`repair.io.layouts.write_layout` writes an output back in it (or as safetensors when asked).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Layout:
    """A packaging of tensors: its name (a key of :data:`repair.io.layouts.WRITERS`) and what its writer needs.

    ``flat``: a file of named tensors (safetensors, a torch state dict, npz), written as safetensors;
    ``dassl``: a Dassl ``torch.save({"state_dict", "epoch", ...})`` checkpoint (:mod:`repair.io.dassl`);
    ``hf-clip``: a Hugging Face transformers CLIP folder (:mod:`repair.io.hf_clip`);
    ``tip-adapter``: Tip-Adapter's cache files (:mod:`repair.io.tip_adapter`).
    """

    name: str
    details: Mapping[str, Any] = field(default_factory=dict)
    folder: bool = False  # whether it is written as a folder (checked as one before any work)


FLAT = Layout("flat")
