"""A kind written here, in one file, runs through finetune, repair and eval without touching the tree.

``TextResidual`` learns one vector added to every class's zero-shot text feature: a made-up
method, small enough to read, that still has a zero-shot point (the zero vector), a path
and an option of its own. Registering it is the one line a real kind adds to the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import repair
from repair.kinds import KINDS, Kind, KindOptions, KindOutput, register
from repair.kinds.base import About, RepairDefaults, option


@dataclass(frozen=True)
class ResidualOptions(KindOptions):
    residual_gain: float = option(1.0, "Text residual: how strongly the residual moves the class features.")


class TextResidual(Kind):
    name: ClassVar[str] = "residual"
    Options: ClassVar[type[KindOptions]] = ResidualOptions
    about: ClassVar[About] = About(title="text residual", description="shared text-feature residual",
                                   trained_tensors="`residual` [embed_dim]", scores_unseen_classes=True)
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="l2", lam_zs=1.0)

    def __init__(self, backbone, residual, classnames, templates, options=None):
        super().__init__(backbone, classnames, templates, options)
        self.scale = backbone.logit_scale
        self.residual = nn.Parameter(residual.detach().float().clone())
        self.register_buffer("residual_ft", self.residual.detach().clone(), persistent=False)
        self.register_buffer("zs_features", backbone.zero_shot_classifier(self.classnames, self.templates),
                             persistent=False)

    @classmethod
    def matches(cls, tensor_file):
        return "residual" in tensor_file.tensors

    @classmethod
    def trainable_keys(cls, tensor_file, options=None):
        return ["residual"] if "residual" in tensor_file.tensors else []

    @classmethod
    def from_file(cls, backbone, tensor_file, classnames, templates, options=None):
        return cls(backbone, tensor_file.tensors["residual"], classnames, templates, options)

    @classmethod
    def zero_shot(cls, backbone, classnames, templates, options=None):
        return cls(backbone, torch.zeros(backbone.embed_dim), classnames, templates, options)

    def _class_features(self, residual: torch.Tensor, classnames: Sequence[str] | None = None) -> torch.Tensor:
        base = (self.zs_features if classnames is None or list(classnames) == self.classnames
                else self.backbone.zero_shot_classifier(list(classnames), self.templates))
        return F.normalize(base + self.options.residual_gain * residual, dim=-1)

    def forward(self, inputs, path_ts=None):
        text = self._class_features(self.residual)
        path_logits = None
        if path_ts is not None:
            points = self.residual_ft + path_ts.to(inputs).view(-1, 1) * (self.residual - self.residual_ft)
            path_logits = torch.stack([self.scale * inputs @ self._class_features(point).t() for point in points])
        return KindOutput(self.scale * inputs @ text.t(), path_logits, text)

    def logits_for(self, features, classnames):
        return self.scale * features @ self._class_features(self.residual, classnames).t()

    def zero_shot_class_features(self):
        return self.zs_features

    def zero_shot_values(self):
        return {"residual": torch.zeros_like(self.residual)}

    def finetuned_values(self):
        return {"residual": self.residual_ft}

    def export(self):
        return {"residual": self.residual.detach().cpu()}


@pytest.fixture
def registered():
    register(TextResidual)  # the one registry line
    yield TextResidual
    KINDS.pop(TextResidual.name)


def test_a_kind_defined_in_one_file_runs_every_workflow(registered, tmp_path, backbone, image_dirs):
    data = repair.DataOptions(shots=8)
    config = repair.TrainConfig(epochs=2, batch_size=8, lr=0.05)
    ft = repair.finetune("residual", image_dirs["train"], tmp_path / "ft.safetensors", backbone=backbone,
                         config=config, data_options=data, kind_options={"residual_gain": 0.5})
    assert ft.record.kind == "residual" and ft.record.kind_options == {"residual_gain": 0.5}
    assert not torch.equal(repair.read_tensors(ft.path).tensors["residual"], torch.zeros(backbone.embed_dim))
    assert repair.inspect_checkpoint(ft.path)["kind_title"] == "text residual"
    outputs = []
    for surrogate in ("feature", "fisher", "l2"):
        fixed = repair.repair(ft.path, image_dirs["train"], tmp_path / f"fixed-{surrogate}.safetensors",
                              backbone=backbone, config=config, data_options=data,
                              objective=repair.Objective(lam_zs=1.0, surrogate=surrogate))
        assert fixed.record.kind_options == {"residual_gain": 0.5}  # recorded options carry over
        outputs.append(fixed.path)
    defaulted = repair.repair(ft.path, image_dirs["train"], tmp_path / "fixed.safetensors", backbone=backbone,
                              config=config, data_options=data)
    assert defaulted.record.objective["surrogate"] == "l2" and defaulted.record.objective["lam_zs"] == 1.0
    report = repair.evaluate([ft.path, *outputs], image_dirs["test"], novel_dir=image_dirs["novel"],
                             backbone=backbone, baselines=True)
    rows = {row["name"]: row for row in report["models"]}
    assert all(rows[path.name]["novel"] is not None for path in outputs)  # it scores unseen classes
    assert "wise-ft" in report["baselines"]["chosen"]  # WiSE-FT from its declared zero-shot values


def test_its_options_become_flags_and_foreign_options_are_refused(registered, tmp_path, backbone, image_dirs):
    from repair.cli.options import kind_flags

    flags = {flag.name: flag for flag in kind_flags("repair")}
    assert "residual_gain" in flags and flags["residual_gain"].kinds == ["residual"]
    path = tmp_path / "residual.safetensors"
    save_file({"residual": torch.zeros(backbone.embed_dim)}, path)
    with pytest.raises(repair.MergetuneError, match="--ctx-init does not apply to residual checkpoints"):
        repair.repair(path, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                      kind_options={"ctx_init": "a photo of a"})
    assert not (tmp_path / "out.safetensors").exists()
