"""MMA: multi-modal adapters (ZjjConan/Multi-Modal-Adapter, ``trainers/mmadapter.py``; the reference
MergeTune code's ``MMA_LMC``).

What its ``AdapterLearner`` trains (ViT-B/16, ``ADAPTER_START`` 5, ``ADAPTER_END`` 12, ``ADAPTER_DIM`` 32),
for each layer index ``N`` in 5..12 (index ``N`` sits beside block ``N - 1``; index 0 would act on the
token embeddings, or after the image tower's ``ln_pre``):

- ``text_adapter.N.down.0`` [32, 512] + [32] (then a ReLU) and ``text_adapter.N.up`` [512, 32] + [512];
- ``visual_adapter.N.down.0`` [32, 768] + [32] and ``visual_adapter.N.up`` [768, 32] + [768];
- ``shared_adapter.N.0`` [32, 32] + [32] (then a ReLU), used by both towers.

Block ``N - 1`` of a tower outputs ``block(x) + s * up(shared(down(ln_1(x))))`` with ``s`` the
``ADAPTER_SCALE`` (0.001; not in the file: ``--adapter-scale``). The prompts are the fixed
``"a photo of a {class}."`` (``TEXT_CTX_INIT``); the file's ``token_embedding`` and ``tokenized_prompts``
buffers are rebuilt from the class names. Registered alone (``register_model("adapter_learner", ...)``),
fp32 under its default ``PREC: amp``.

Zero-shot point: every ``up`` = 0 (weights and biases), with the file's ``down`` and ``shared`` (which then
change nothing: two such points are the same model, see :meth:`MMA.same_weights`).

Step size: MMA scales the gradients of every adapter tensor by ``1 / s`` (its ``gradient_scale_layer``
around each adapter), so its learning rate (0.0015) moves the tensors ``1 / s`` times further than plain
SGD would. Here the trained parameters are ``q = sqrt(s) * p`` for each file tensor ``p``: plain SGD on
``q`` (with momentum and weight decay) moves ``p`` exactly as MMA's SGD does, so MMA's and the reference's
learning rates carry over; the path, WiSE-FT and the outputs are in ``p``, straight lines either way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from repair.errors import IncompatibleCheckpointError
from repair.io import TensorFile
from repair.kinds.base import About, Claims, KindOptions, PathSpace, RepairDefaults, Schedule
from repair.kinds.base import logit_scale_option, option
from repair.kinds.coop import DEFAULT_CTX_INIT
from repair.kinds.prompted import InsertionKind, Values, canonical_keys, check_shape, image_width, upstream_claims
from repair.model.backbone import Backbone
from repair.model.insertions import Adapter, Insertions, image_blocks, mma_adapter, text_blocks

ADAPTER = re.compile(r"^(text_adapter|visual_adapter)\.(\d+)\.(down\.0|up)\.(weight|bias)$")
SHARED = re.compile(r"^shared_adapter\.(\d+)\.0\.(weight|bias)$")
IGNORED_BUFFERS = ("token_embedding", "tokenized_prompts")  # the prompts' embeddings and ids, rebuilt


@dataclass(frozen=True)
class MMAOptions(KindOptions):
    ctx_init: str = option(DEFAULT_CTX_INIT, "MMA: the words before the class name (its TEXT_CTX_INIT).")
    adapter_scale: float = option(0.001, "MMA: the ADAPTER_SCALE the adapters were trained with (not in its files).")
    path_space: PathSpace = option(PathSpace.feature, "Interpolate the path in 'feature' space (cheap) or "
                                   "'weight' space (exact, K more passes of both towers).", stages=("repair",))
    logit_scale: float | None = logit_scale_option()
    adapter_start: int = option(5, "MMA: adapters from this layer index to the last (ADAPTER_START; 0 is the token "
                                "embeddings, N sits beside block N-1).", stages=("finetune",))
    adapter_dim: int = option(32, "MMA: the adapters' hidden width (ADAPTER_DIM).", stages=("finetune",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.adapter_scale < float("inf"):
            raise ValueError(f"adapter_scale must be a positive number, got {self.adapter_scale}")
        if self.adapter_start < 0 or self.adapter_dim < 1:
            raise ValueError("adapter_start must be at least 0 and adapter_dim at least 1")


def mma_keys(tensor_file: TensorFile) -> dict[str, str]:
    """MMA's trained tensors in a file: upstream name -> the file's key."""
    return {name: key for name, key in canonical_keys(tensor_file).items() if ADAPTER.match(name) or SHARED.match(name)}


class MMA(InsertionKind):
    """Adapters beside the blocks of both towers (see the module docstring)."""

    name: ClassVar[str] = "mma"
    Options: ClassVar[type[KindOptions]] = MMAOptions
    about: ClassVar[About] = About(
        title="MMA", description="MMA multi-modal adapter",
        trained_tensors="`text_adapter.N`, `visual_adapter.N` (`down.0`, `up`), `shared_adapter.N.0`",
        scores_unseen_classes=True)
    # not benchmarked: CoOp's term and strength, CLIPFit's schedule (the image tower runs in every step, as there)
    defaults: ClassVar[RepairDefaults] = RepairDefaults(
        surrogate="feature", lam_zs=3.0, schedule=Schedule(steps=40, batch_size=32, step_size=0.1))

    def __init__(self, backbone: Backbone, values: Mapping[str, torch.Tensor], classnames: Sequence[str],
                 templates: Sequence[str], options: MMAOptions | None = None, *,
                 file_keys: Mapping[str, str] | None = None) -> None:
        options = options or MMAOptions()
        self.factor = math.sqrt(options.adapter_scale)  # q = sqrt(s) p: see the module docstring
        super().__init__(backbone, values, classnames, templates, options, file_keys=file_keys or {})
        self.adapter_scale = options.adapter_scale
        self.layers = sorted({int(match.group(2)) for name in values if (match := ADAPTER.match(name))})
        if not self.layers:
            raise IncompatibleCheckpointError("an MMA checkpoint needs text_adapter.N and visual_adapter.N tensors")
        self._check(values, backbone)
        self.n_ctx, self.words, self.touches_image = 0, self.options.ctx_init, True
        self.no_zero_shot_point = None
        zero = {name: torch.zeros_like(value) if ".up." in name else value for name, value in values.items()}
        self._init_features(zero)

    def _check(self, values: Mapping[str, torch.Tensor], backbone: Backbone) -> None:
        text, visual = backbone.text_width, image_width(backbone)
        first = _name("text_adapter", self.layers[0], "down.0", "weight")
        if first not in values:
            raise IncompatibleCheckpointError(f"an MMA checkpoint with layer {self.layers[0]} adapters lacks {first}")
        hidden = values[first].shape[0]
        limits = {"text": text_blocks(backbone.text), "image": image_blocks(backbone.model.visual)}
        for index in self.layers:
            for tower, width in (("text_adapter", text), ("visual_adapter", visual)):
                if width is None:
                    continue  # a CNN: refused with its reason once the image tower is checked
                expected = {_name(tower, index, "down.0", "weight"): [hidden, width],
                            _name(tower, index, "down.0", "bias"): [hidden],
                            _name(tower, index, "up", "weight"): [width, hidden],
                            _name(tower, index, "up", "bias"): [width]}
                for name, shape in expected.items():
                    if name not in values:
                        raise IncompatibleCheckpointError(f"an MMA checkpoint with layer {index} adapters lacks {name}")
                    check_shape(name, values[name], shape)
            for tensor, shape in (("weight", [hidden, hidden]), ("bias", [hidden])):
                name = f"shared_adapter.{index}.0.{tensor}"
                if name not in values:
                    raise IncompatibleCheckpointError(f"an MMA checkpoint with layer {index} adapters lacks {name}")
                check_shape(name, values[name], shape)
            for tower, blocks in limits.items():
                if blocks is not None and index > blocks:
                    raise IncompatibleCheckpointError(
                        f"the checkpoint has adapters at layer {index}, and this model's {tower} tower has {blocks} "
                        "blocks")

    # ------------------------------------------------------------------ the reparametrisation

    def to_trainable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value * self.factor

    def from_trainable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return value / self.factor

    # ------------------------------------------------------------------ insertions

    def _adapters(self, values: Values, tower: str) -> tuple[dict[int, Adapter], Adapter | None]:
        def pair(name: str, part: str) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(values[_name(name, index, part, tensor)] / self.factor for tensor in ("weight", "bias"))

        adapters = {}
        for index in self.layers:
            shared = tuple(values[f"shared_adapter.{index}.0.{tensor}"] / self.factor for tensor in ("weight", "bias"))
            adapters[index] = mma_adapter(pair(tower, "down.0"), pair(tower, "up"), shared, self.adapter_scale)
        first = adapters.pop(0, None)
        return {index - 1: adapter for index, adapter in adapters.items()}, first

    def text_insertions(self, values: Values) -> tuple[None, Insertions]:
        adapters, first = self._adapters(values, "text_adapter")
        return None, Insertions(adapters=adapters, input_adapter=first)

    def image_insertions(self, values: Values) -> Insertions:
        adapters, first = self._adapters(values, "visual_adapter")
        return Insertions(adapters=adapters, input_adapter=first)

    def same_weights(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
        """The same model: equal tensors, except ``down`` and ``shared`` of a layer whose ``up`` tensors are
        zero in both (an adapter that adds nothing), as at two zero-shot points."""
        if a.keys() != b.keys():
            return False
        names = dict(zip((f"params.{index}" for index in range(len(self.names))), self.names))
        silent = {index for index in self.layers
                  if all(not bool(values[key].any()) for values in (a, b) for key, name in names.items()
                         if name.split(".")[1] == str(index) and ".up." in name)}
        return all(torch.equal(a[key], b[key].to(a[key])) for key, name in names.items()
                   if int(name.split(".")[1]) not in silent or ".up." in name)

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return bool(mma_keys(tensor_file))

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return list(mma_keys(tensor_file).values())

    @classmethod
    def claims(cls, tensor_file: TensorFile, options: KindOptions | None = None,
               backbone: Backbone | None = None) -> Claims:
        return upstream_claims(tensor_file, cls.trainable_keys(tensor_file, options), IGNORED_BUFFERS)

    @classmethod
    def ignored_keys(cls, tensor_file: TensorFile) -> dict[str, str]:
        """Tensors of an MMA file it does not train, each with why (for the no-partial-reads check)."""
        return {key: "the prompts' buffer, rebuilt from the class names"
                for name, key in canonical_keys(tensor_file).items() if name in IGNORED_BUFFERS}

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: MMAOptions | None = None) -> MMA:
        keys = mma_keys(tensor_file)
        values = {name: tensor_file.tensors[key] for name, key in keys.items()}
        return cls(backbone, values, classnames, templates, options, file_keys=keys)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: MMAOptions | None = None) -> MMA:
        """At ``w_zs``: every ``up`` zero, ``down`` and ``shared`` as MMA initialises them (Kaiming normal, fan-out,
        zero biases), from a fixed seed."""
        options = options or MMAOptions()
        visual = image_width(backbone)
        if visual is None:
            raise IncompatibleCheckpointError(f"MMA's visual adapters need a ViT image tower, and this one is a "
                                              f"{type(backbone.model.visual).__name__}")
        last = min(text_blocks(backbone.text), image_blocks(backbone.model.visual))
        hidden, values = options.adapter_dim, {}
        for index in range(min(options.adapter_start, last), last + 1):
            for tower, width in (("text_adapter", backbone.text_width), ("visual_adapter", visual)):
                values[_name(tower, index, "down.0", "weight")] = _kaiming(hidden, width, seed=index * 10 + len(tower))
                values[_name(tower, index, "down.0", "bias")] = torch.zeros(hidden)
                values[_name(tower, index, "up", "weight")] = torch.zeros(width, hidden)
                values[_name(tower, index, "up", "bias")] = torch.zeros(width)
            values[f"shared_adapter.{index}.0.weight"] = _kaiming(hidden, hidden, seed=index * 10)
            values[f"shared_adapter.{index}.0.bias"] = torch.zeros(hidden)
        return cls(backbone, values, classnames, templates, options)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "adapter_layers": f"{self.layers[0]}-{self.layers[-1]}"}


def _name(tower: str, index: int, part: str, tensor: str) -> str:
    return f"{tower}.{index}.{part}.{tensor}"


def _kaiming(rows: int, columns: int, seed: int) -> torch.Tensor:
    """``nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu")``: std sqrt(2 / rows)."""
    return math.sqrt(2.0 / rows) * torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))
