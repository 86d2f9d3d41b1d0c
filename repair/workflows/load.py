"""A repaired checkpoint as a classifier from Python, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from repair.errors import InputFileError
from repair.io import read_tensors
from repair.kinds import Kind, load_kind
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import Record
from repair.workflows.inputs import check_record_backbone, read_record, recorded_backbone, resolve_backbone


@dataclass
class Classifier:
    """A repaired checkpoint ready to classify images from Python."""

    backbone: Backbone
    kind: Kind
    classnames: list[str]
    record: Record

    @torch.no_grad()
    def logits(self, images: torch.Tensor | Sequence[Image.Image], classnames: Sequence[str] | None = None
               ) -> torch.Tensor:
        """Logits for preprocessed pixels ``[B, 3, H, W]`` or PIL images, over ``classnames``."""
        if not isinstance(images, torch.Tensor):
            images = torch.stack([self.backbone.preprocess(image.convert("RGB")) for image in images])
        encoder = self.kind.image_encoder() or self.backbone.image_encoder  # a kind may own the image tower
        with self.backbone.autocast():
            features = encoder.encode(images.to(self.backbone.device)).float()
        if self.kind.input_kind != "raw-features":
            features = F.normalize(features, dim=-1)
        return self.kind.logits_for(features, list(classnames or self.classnames))

    def predict(self, images: torch.Tensor | Sequence[Image.Image],
                classnames: Sequence[str] | None = None) -> list[str]:
        names = list(classnames or self.classnames)
        return [names[index] for index in self.logits(images, names).argmax(dim=-1).tolist()]


def load_repaired(path: str | Path, *, backbone: Backbone | BackboneSpec | None = None,
                  classnames: Sequence[str] | None = None, device: str = "cpu", precision: str = "fp32") -> Classifier:
    """Rebuild a classifier from a mergetune output; the backbone and options come from its record."""
    tensor_file = read_tensors(path)
    record = read_record(tensor_file)
    if record is None:
        raise InputFileError(f"{path}: no mergetune metadata; pass the checkpoint to `mergetune eval` instead")
    backbone = resolve_backbone(backbone or recorded_backbone(record), device, precision)
    check_record_backbone(record, backbone, Path(path))
    names = list(classnames or record.classnames)
    kind = load_kind(backbone, tensor_file, names, record.templates or ["a photo of a {}."],
                     recorded_kind=record.kind, recorded_options=record.kind_options)
    return Classifier(backbone, kind, names, record)
