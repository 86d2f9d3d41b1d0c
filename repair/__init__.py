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
    "repair": "repair.workflows.run",
    "finetune": "repair.workflows.run",
    "fit": "repair.workflows.run",
    "RunInputs": "repair.workflows.run",
    "RunOutcome": "repair.workflows.run",
    "evaluate": "repair.workflows.evaluate",
    "soup": "repair.workflows.soup",
    "best_wise_alpha": "repair.eval.baselines",
    "load_repaired": "repair.workflows.load",
    "Classifier": "repair.workflows.load",
    "verify": "repair.workflows.verify",
    "inspect_checkpoint": "repair.workflows.inspect",
    "path_report": "repair.workflows.path",
    "push": "repair.workflows.hub",
    "DataOptions": "repair.workflows.inputs",
    "Record": "repair.record",
    "KINDS": "repair.kinds",
    "Kind": "repair.kinds",
    "KindOptions": "repair.kinds",
    "register_kind": "repair.kinds",
    "BackboneSpec": "repair.model.backbone",
    "Backbone": "repair.model.backbone",
    "load_backbone": "repair.model.backbone",
    "Objective": "repair.train.objective",
    "TrainConfig": "repair.train.loop",
    "read_tensors": "repair.io",
    "scan_image_folder": "repair.data.folders",
    "MergetuneError": "repair.errors",
}

_RENAMED = {"register_kind": "register"}  # public name -> name in its module
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), _RENAMED.get(name, name))
        globals()[name] = value
        return value
    raise AttributeError(f"module 'repair' has no attribute {name!r}")
