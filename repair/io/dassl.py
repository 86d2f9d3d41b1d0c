"""Dassl checkpoints: ``torch.save({"state_dict", "epoch", "optimizer", "scheduler"[, "val_result"]})``.

Every code base built on Dassl (CoOp, CoCoOp, KgCoOp, CLIP-Adapter, TaskRes, MaPLe, PromptSRC, ...)
saves each registered model this way, as ``<out>/<registered name>/model.pth.tar-<epoch>`` (or
``model-best.pth.tar``). Read: the model's tensors are the ``state_dict`` entries (named
``state_dict.<key>``); the optimizer's and scheduler's tensors (momentum buffers) are training state,
listed on the :class:`~repair.io.read.TensorFile` and never read as weights. Written back: the same
wrapper with the repaired ``state_dict`` in the input's names, order and dtypes, its ``epoch`` and
``val_result``, ``optimizer`` and ``scheduler`` set to None (the input's optimizer state belongs to the
input's weights, and Dassl writes None where a model has none), and mergetune's record under
``metadata``, a key Dassl's loaders never read. Dassl's ``load_checkpoint`` (``torch.load``) and its
trainers' ``load_model`` (``checkpoint["state_dict"]``, ``["epoch"]``, ``["val_result"]``) read it, with
``weights_only`` too: it holds plain data only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from repair.io.layout import Layout
from repair.io.write import write_torch_file

WRAPPER_KEYS = ("state_dict", "epoch", "optimizer", "scheduler", "val_result")
STATE_PREFIX = "state_dict."
TRAINING_STATE = ("optimizer.", "scheduler.")
RECORD_KEY = "metadata"  # where mergetune's own outputs keep their record


def dassl_layout(obj: Any, values: Mapping[str, Any]) -> Layout | None:
    """The Dassl layout of a loaded checkpoint, or None when ``obj`` is not a Dassl wrapper."""
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict) or "epoch" not in obj:
        return None
    if not set(obj) <= {*WRAPPER_KEYS, RECORD_KEY}:
        return None
    details = {"keys": [key for key in obj if key != RECORD_KEY], "epoch": values.get("epoch"),
               "val_result": values.get("val_result")}
    return Layout("dassl", details)


def split_training_state(tensors: Mapping[str, torch.Tensor]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """(the model's tensors, ``name -> shape`` of the optimizer's and scheduler's)."""
    model = {name: tensor for name, tensor in tensors.items() if not name.startswith(TRAINING_STATE)}
    state = {name: tuple(tensor.shape) for name, tensor in tensors.items() if name.startswith(TRAINING_STATE)}
    return model, state


def write_dassl(out: Path, layout: Layout, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                force: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """The repaired ``state_dict`` in the input's wrapper (see the module docstring), atomically."""
    state = {name[len(STATE_PREFIX):] if name.startswith(STATE_PREFIX) else name: tensor
             for name, tensor in tensors.items()}
    wrapper: dict[str, Any] = {}
    for key in layout.details.get("keys") or ("state_dict", "epoch", "optimizer", "scheduler"):
        wrapper[key] = {"state_dict": state, "epoch": layout.details.get("epoch"),
                        "val_result": layout.details.get("val_result")}.get(key)
    wrapper.setdefault("state_dict", state)
    wrapper[RECORD_KEY] = dict(metadata)
    return write_torch_file(out, wrapper, force=force, inputs=inputs)
