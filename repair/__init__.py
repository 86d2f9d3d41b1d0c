"""mergetune: repair fine-tuned CLIP checkpoints with MergeTune continued fine-tuning.

The public API, importable cheaply (torch and open_clip load on first use)::

    import repair
    outcome = repair.repair("ft.safetensors", "./imgs", "fixed.safetensors")
    classifier = repair.load_repaired("fixed.safetensors")
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "repair": "repair.api",
    "finetune": "repair.api",
    "evaluate": "repair.api",
    "load_repaired": "repair.api",
    "verify": "repair.api",
    "inspect_checkpoint": "repair.api",
    "path_report": "repair.lmc",
    "push": "repair.hub",
    "Classifier": "repair.api",
    "DataOptions": "repair.api",
    "KindOptions": "repair.api",
    "RunOutcome": "repair.api",
    "BackboneSpec": "repair.backbone",
    "Backbone": "repair.backbone",
    "load_backbone": "repair.backbone",
    "Objective": "repair.objective",
    "TrainConfig": "repair.train",
    "read_tensors": "repair.checkpoints",
    "scan_image_folder": "repair.data",
    "MergetuneError": "repair.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repair' has no attribute {name!r}")
