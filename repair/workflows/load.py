"""A repaired checkpoint as a classifier from Python, in one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from repair.errors import InputFileError, UsageError
from repair.io import read_tensors
from repair.kinds import Kind, load_kind
from repair.model.backbone import Backbone, BackboneSpec
from repair.record import Record
from repair.train.fields import checked
from repair.workflows.inputs import check_record_backbone, read_record, recorded_backbone, resolve_backbone


@dataclass
class Classifier:
    """A repaired checkpoint ready to classify images from Python."""

    backbone: Backbone
    kind: Kind
    classnames: list[str]
    record: Record

    @torch.no_grad()
    def logits(self, images: Image.Image | torch.Tensor | Sequence[Image.Image],
               classnames: Sequence[str] | None = None) -> torch.Tensor:
        """Logits over ``classnames`` for one PIL image, a list of them, or preprocessed pixels ``[B, 3, H, W]``
        (one image ``[3, H, W]``): one row per image."""
        pixels = self._pixels(images)
        encoder = self.kind.image_encoder() or self.backbone.image_encoder  # a kind may own the image tower
        with self.backbone.autocast():
            features = encoder.encode(pixels.to(self.backbone.device)).float()
        if self.kind.input_kind != "raw-features":
            features = F.normalize(features, dim=-1)
        return self.kind.logits_for(features, self._classnames(classnames))

    def predict(self, images: Image.Image | torch.Tensor | Sequence[Image.Image],
                classnames: Sequence[str] | None = None) -> list[str]:
        """The class name of each image (a list, also for one image)."""
        names = self._classnames(classnames)
        return [names[index] for index in self.logits(images, names).argmax(dim=-1).tolist()]

    def _pixels(self, images: Image.Image | torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.dim() == 3:
                images = images.unsqueeze(0)
            if images.dim() != 4 or images.shape[0] == 0 or not images.is_floating_point():
                raise UsageError(f"pixels must be a float tensor [B, 3, H, W] with B >= 1, got "
                                 f"{images.dtype} {list(images.shape)}")
            return images
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise UsageError(f"expected a PIL image, a list of them or a pixel tensor, not {type(images).__name__}")
        if not images:
            raise UsageError("no images to classify: give at least one")
        wrong = next((item for item in images if not isinstance(item, Image.Image)), None)
        if wrong is not None:
            raise UsageError(f"expected PIL images, got a {type(wrong).__name__} among them (open files with "
                             "PIL.Image.open)")
        return torch.stack([self.backbone.preprocess(image.convert("RGB")) for image in images])

    def _classnames(self, classnames: Sequence[str] | None) -> list[str]:
        if classnames is None:
            return list(self.classnames)
        if isinstance(classnames, str) or not classnames or not all(isinstance(name, str) for name in classnames):
            raise UsageError("classnames must be a non-empty list of class names")
        return list(classnames)


@checked
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
