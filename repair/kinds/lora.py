"""LoRA adapters on open_clip's towers: CLIP-LoRA files and Hugging Face PEFT adapter folders.

A LoRA adapter adds ``s * B @ A`` (``A [r, in]``, ``B [out, r]``, ``s`` its scaling) to some weights of
the frozen model. Two layouts are read, and each output keeps its input's layout, ranks and names:

- **CLIP-LoRA** (``torch.save({"weights": {"layer_i": {"q_proj"|"k_proj"|"v_proj"|"proj": {"w_lora_A",
  "w_lora_B"}}}, "metadata": {r, alpha, encoder, params, position}})``): ``layer_i`` counts the adapted
  attention blocks, text tower first, then the image tower (``encoder`` and ``position`` say which);
  q/k/v are row slices of open_clip's packed ``attn.in_proj_weight``, ``proj`` (or ``o_proj``) is
  ``attn.out_proj.weight``; ``s = alpha / sqrt(r)``, as CLIP-LoRA's layers compute it.
- **PEFT** (``adapter_config.json`` + ``adapter_model.safetensors`` with
  ``base_model.model.<module>.lora_A.weight``): an ``nn.MultiheadAttention`` target adapts its packed
  ``in_proj_weight`` (its ``out_proj`` sits under ``base_layer.out_proj``), an ``nn.Linear`` its weight;
  ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per module with ``rank_pattern`` /
  ``alpha_pattern``. PEFT before 0.22 applied a MultiheadAttention's ``out_proj`` update twice; an
  adapter it wrote is read with ``2 s`` there, as its users ran it and as PEFT 0.22 loads it.

Which path the repair interpolates: the **merged low-rank update** ``dW = s B A``, i.e. the straight
line ``W_ft + t (W - W_ft)`` in the model's weights (``--path-space weight``, the default). Interpolating
the factors instead would trace ``(B_ft + t dB)(A_ft + t dA)``, a curve in weight space that is
quadratic in ``t`` and depends on how the update happens to be split into ``B`` and ``A`` (``B M``,
``M^-1 A`` is the same model), so its loss says nothing about linear connectivity. The factors are what
is trained and written; the merged update is what the path and the evaluation (WiSE-FT, ``mergetune
path``) use: a point between two adapters is represented exactly as one adapter of rank ``r1 + r2``.

The zero-shot point is "no adapter": ``B = 0`` (any ``A``; the input's is used, which makes WiSE-FT's
``(1 - a) w_zs + a w_ft`` exactly ``a dW_ft``). ``--merge`` writes the merged full open_clip checkpoint
instead, for users who deploy merged weights.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from repair.errors import IncompatibleCheckpointError
from repair.io import (ADAPTER_CONFIG, FLAT, Layout, TensorFile, check_output_folder, check_output_path, values_list,
                       write_adapter_folder, write_safetensors, write_torch_file)
from repair.kinds.base import About, KindOptions, PathSpace, RepairDefaults, logit_scale_option, option
from repair.kinds.weights import ModelWeightsKind, Weights
from repair.model.backbone import Backbone

PEFT_SEMANTICS_VERSION = "0.22.0"  # the first PEFT release that applies a MultiheadAttention's out_proj LoRA once
CLIP_LORA_KEY = re.compile(r"^(?P<stem>weights\.layer_(?P<layer>\d+)\.(?P<proj>q_proj|k_proj|v_proj|o_proj|proj))"
                           r"\.w_lora_(?P<factor>[AB])$")
PEFT_KEY = re.compile(r"^(?P<stem>.+)\.lora_(?P<factor>[AB])\.weight$")
PEFT_PREFIX = "base_model.model."
# CLIP-LoRA's block choices (its INDEX_POSITIONS tables, for 12-block towers); "all" is every block
POSITIONS = {"top": [11], "top1": [11], "top2": [10, 11], "top3": [9, 10, 11], "bottom": [0, 1, 2, 3],
             "mid": [4, 5, 6, 7], "up": [8, 9, 10, 11], "half-up": [6, 7, 8, 9, 10, 11],
             "half-bottom": [0, 1, 2, 3, 4, 5]}
QKV_ROWS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
MERGED_FORMAT = "mergetune-merged/1"


class LoraLayout(str, enum.Enum):
    clip_lora = "clip-lora"
    peft = "peft"


class LoraTowers(str, enum.Enum):
    text = "text"
    vision = "vision"
    both = "both"


@dataclass(frozen=True)
class LoraOptions(KindOptions):
    path_space: PathSpace = option(PathSpace.weight, "LoRA/CLIPFit/CoOp: interpolate the path in 'weight' space "
                                   "(LoRA: the merged update) or 'feature' space (cheaper).", stages=("repair",))
    lora_scale: float | None = option(None, "LoRA: the factor on B @ A (default: from the file; CLIP-LoRA "
                                      "alpha/sqrt(r), PEFT lora_alpha/r).")
    merge: bool = option(False, "LoRA: write the merged full open_clip checkpoint instead of the adapter.",
                         stages=("finetune", "repair"))
    logit_scale: float | None = logit_scale_option()
    lora_layout: LoraLayout = option(LoraLayout.clip_lora, "LoRA: the layout to write: clip-lora (a torch file) "
                                     "or peft (an adapter folder).", stages=("finetune",))
    lora_rank: int = option(2, "LoRA: the rank r of new adapters.", stages=("finetune",))
    lora_alpha: float = option(1.0, "LoRA: alpha of new adapters.", stages=("finetune",))
    lora_towers: LoraTowers = option(LoraTowers.both, "LoRA: adapt the attention of the text, vision or both "
                                     "towers.", stages=("finetune",))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        for name in ("lora_scale", "lora_alpha"):
            value = getattr(self, name)
            if value is not None and not (0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive number, got {value}")


@dataclass(frozen=True)
class Target:
    """One adapted weight slice: ``weight[rows] += scale * B @ A``."""

    weight: str  # open_clip name of the weight it adds to
    rows: tuple[int, int] | None  # a slice of the weight's rows (CLIP-LoRA's q/k/v of in_proj_weight)
    scale: float
    a_key: str  # names in the file
    b_key: str


# --------------------------------------------------------------------------- layouts


def layout_of(tensor_file: TensorFile) -> LoraLayout | None:
    keys = tensor_file.tensors
    if any(CLIP_LORA_KEY.match(key) for key in keys):
        return LoraLayout.clip_lora
    if any(PEFT_KEY.match(key) for key in keys):
        return LoraLayout.peft
    return None


def _blocks(backbone: Backbone, tower: str) -> list[str]:
    """Names of a tower's attention blocks, as CLIP-LoRA enumerates them (open_clip's native ViT/text)."""
    model = backbone.model
    owner, prefix = (model.visual, "visual.transformer.resblocks") if tower == "vision" else (model, "transformer.resblocks")
    resblocks = getattr(getattr(owner, "transformer", None), "resblocks", None)
    if resblocks is None or (tower == "text" and backbone.text.prefix != "transformer."):
        raise IncompatibleCheckpointError(
            f"CLIP-LoRA adapts CLIP's own {tower} transformer, which this model does not have "
            f"({backbone.describe_towers()['image' if tower == 'vision' else 'text']})")
    return [f"{prefix}.{index}" for index in range(len(resblocks))]


def clip_lora_targets(tensor_file: TensorFile, backbone: Backbone, scale: float | None) -> tuple[list[Target], dict]:
    """The targets of a CLIP-LoRA file and its metadata (r, alpha, encoder, params, position)."""
    values = tensor_file.values
    stems: dict[str, tuple[int, str]] = {}
    for key in tensor_file.tensors:
        match = CLIP_LORA_KEY.match(key)
        if match:
            stems[match["stem"]] = (int(match["layer"]), match["proj"])
    meta = {name: values.get(f"metadata.{name}") for name in ("r", "alpha", "encoder", "position")}
    meta["params"] = values_list(values, "metadata.params")
    encoder, position = meta["encoder"], meta["position"] or "all"
    if encoder not in ("text", "vision", "both"):
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: CLIP-LoRA file without metadata.encoder text/vision/both (found {encoder!r}); "
            "mergetune cannot tell which tower its layers adapt")
    if position != "all" and position not in POSITIONS:
        raise IncompatibleCheckpointError(f"{tensor_file.path}: unknown CLIP-LoRA position {position!r} "
                                          f"(known: all, {', '.join(POSITIONS)})")
    blocks: list[str] = []
    for tower in (["text", "vision"] if encoder == "both" else [encoder]):
        names = _blocks(backbone, tower)
        chosen = range(len(names)) if position == "all" else [i for i in POSITIONS[position] if i < len(names)]
        blocks += [names[index] for index in chosen]
    layers = sorted({layer for layer, _ in stems.values()})
    if layers != list(range(len(blocks))):
        raise IncompatibleCheckpointError(
            f"{tensor_file.path}: CLIP-LoRA layers {layers[:4]}{'...' if len(layers) > 4 else ''} ({len(layers)}) do not "
            f"match the {len(blocks)} attention blocks that encoder={encoder!r}, position={position!r} select in this "
            "model")
    r, alpha = meta["r"], meta["alpha"]
    if scale is None:
        if not isinstance(r, (int, float)) or not isinstance(alpha, (int, float)) or r <= 0:
            raise IncompatibleCheckpointError(f"{tensor_file.path}: CLIP-LoRA metadata lacks r and alpha; "
                                              "pass --lora-scale")
        scale = float(alpha) / math.sqrt(float(r))
    targets = []
    for stem, (layer, proj) in sorted(stems.items(), key=lambda item: (item[1][0], item[1][1])):
        block = blocks[layer]
        if proj in QKV_ROWS:
            width = int(backbone.model.get_submodule(f"{block}.attn").embed_dim)
            start = QKV_ROWS[proj] * width
            targets.append(Target(f"{block}.attn.in_proj_weight", (start, start + width), scale,
                                  f"{stem}.w_lora_A", f"{stem}.w_lora_B"))
        else:
            targets.append(Target(f"{block}.attn.out_proj.weight", None, scale, f"{stem}.w_lora_A", f"{stem}.w_lora_B"))
    return targets, meta


def peft_config(tensor_file: TensorFile) -> dict[str, Any] | None:
    text = tensor_file.metadata.get(ADAPTER_CONFIG)
    return None if text is None else json.loads(text)


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def applies_out_proj_twice(config: Mapping[str, Any], path: Path | str) -> bool:
    """Whether the PEFT that wrote this adapter applied a MultiheadAttention's out_proj LoRA twice.

    PEFT before 0.22.0 added that update twice (huggingface/peft#3774), so the model its user ran had
    ``2 s B A`` there; PEFT 0.22 doubles such an adapter's ``lora_B`` on load to keep its outputs, and
    mergetune reads it the same way. The rule is PEFT's: no ``peft_version`` (written before 0.18), a release
    before 0.21.1, or a non-dev release before 0.22.0."""
    if "peft_version" not in config:
        return True
    text = str(config["peft_version"]).partition("@")[0]
    try:
        version = Version(text)
    except InvalidVersion:
        raise IncompatibleCheckpointError(f"{path}: peft_version {text!r} in {ADAPTER_CONFIG} is not a version") from None
    release = Version(version.base_version)
    return release < Version("0.21.1") or (not version.is_devrelease and release < Version(PEFT_SEMANTICS_VERSION))


def is_attention_out_proj(stem: str, modules: Mapping[str, nn.Module]) -> bool:
    """PEFT's name for a MultiheadAttention's out_proj: ``<attention>.base_layer.out_proj``."""
    attention = stem.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.out_proj")
    return stem.endswith(".base_layer.out_proj") and isinstance(modules.get(attention), nn.MultiheadAttention)


def peft_targets(tensor_file: TensorFile, backbone: Backbone, scale: float | None) -> list[Target]:
    """The targets of a PEFT LoRA adapter on this open_clip model."""
    config = peft_config(tensor_file) or {}
    path = tensor_file.path
    if config:
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise IncompatibleCheckpointError(f"{path}: a PEFT {config.get('peft_type')} adapter; mergetune reads LoRA")
        for flag, what in (("use_dora", "DoRA magnitudes"), ("fan_in_fan_out", "transposed (Conv1D) weights"),
                           ("lora_bias", "LoRA biases")):
            if config.get(flag):
                raise IncompatibleCheckpointError(f"{path}: {flag} is set ({what}); mergetune reads plain LoRA")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise IncompatibleCheckpointError(f"{path}: the adapter also trains biases or whole modules "
                                              "(bias / modules_to_save); mergetune reads plain LoRA factors")
    elif scale is None:
        raise IncompatibleCheckpointError(f"{path}: PEFT LoRA tensors without {ADAPTER_CONFIG}; pass the adapter "
                                          "folder, or --lora-scale")
    others = [key for key in tensor_file.tensors if not PEFT_KEY.match(key)]
    if others:
        raise IncompatibleCheckpointError(f"{path}: tensors that are not LoRA factors (e.g. {others[0]}); "
                                          "mergetune reads plain LoRA adapters")
    modules = dict(backbone.model.named_modules())
    twice = bool(config) and applies_out_proj_twice(config, path)
    targets = []
    for key in sorted(tensor_file.tensors):
        match = PEFT_KEY.match(key)
        if match["factor"] != "A":
            continue
        stem = match["stem"]
        module_name = stem.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        module = modules.get(module_name)
        if isinstance(module, nn.MultiheadAttention):
            weight = f"{module_name}.in_proj_weight"
        elif isinstance(module, nn.Linear):
            weight = f"{module_name}.weight"
        else:
            found = "nothing" if module is None else type(module).__name__
            raise IncompatibleCheckpointError(f"{path}: {key} adapts {module_name!r}, which is {found} in this model; "
                                              "expected a Linear or MultiheadAttention layer of open_clip")
        if f"{stem}.lora_B.weight" not in tensor_file.tensors:
            raise IncompatibleCheckpointError(f"{path}: {key} has no matching lora_B")
        rank = int(tensor_file.tensors[key].shape[0])
        if scale is not None:
            module_scale = scale
        else:
            peft_name = stem.removeprefix(PEFT_PREFIX)
            alpha = float(_pattern(config.get("alpha_pattern") or {}, peft_name, config.get("lora_alpha", 8)))
            module_scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        if twice and is_attention_out_proj(stem, modules):
            module_scale *= 2  # as the writing PEFT computed it; the output keeps the config, so PEFT reads it alike
        targets.append(Target(weight, None, module_scale, key, f"{stem}.lora_B.weight"))
    return targets


# --------------------------------------------------------------------------- the kind


class LoRA(ModelWeightsKind):
    """LoRA factors on attention (or any Linear) layers of either tower; see the module docstring."""

    name: ClassVar[str] = "lora"
    Options: ClassVar[type[KindOptions]] = LoraOptions
    about: ClassVar[About] = About(
        title="LoRA", description="LoRA adapter",
        trained_tensors="LoRA factors: CLIP-LoRA `weights.layer_N.{q,k,v,}proj.w_lora_{A,B}`, or a PEFT adapter "
                        "folder (`...lora_A.weight`, `...lora_B.weight`)",
        scores_unseen_classes=True)  # the text tower, adapted or not, encodes any class name
    defaults: ClassVar[RepairDefaults] = RepairDefaults(surrogate="fisher", lam_zs=1.0)  # not benchmarked yet
    mergeable: ClassVar[bool] = False  # the mean of two (B, A) pairs is not the mean of their updates B A
    own_layouts: ClassVar[bool] = True  # the input's layout, or --merge

    def __init__(self, backbone: Backbone, targets: Sequence[Target], factors: Mapping[str, torch.Tensor],
                 classnames: Sequence[str], templates: Sequence[str], options: LoraOptions | None = None, *,
                 layout: LoraLayout, layout_data: Mapping[str, Any]) -> None:
        super().__init__(backbone, classnames, templates, options)
        options = self.options
        self.scale = float(options.logit_scale if options.logit_scale is not None else backbone.logit_scale)
        self.path_space = options.path_space
        self.layout, self.layout_data = layout, dict(layout_data)
        self.targets = list(targets)
        if not self.targets:
            raise IncompatibleCheckpointError("this LoRA adapter adapts no layer")
        pretrained = dict(backbone.model.named_parameters())
        self._check(self.targets, factors, pretrained)
        device = backbone.device
        self.input_dtypes = {key: factors[key].dtype for target in self.targets for key in (target.a_key, target.b_key)}
        self.lora_a = nn.ParameterList([nn.Parameter(factors[t.a_key].detach().to(device, torch.float32).clone())
                                        for t in self.targets])
        self.lora_b = nn.ParameterList([nn.Parameter(factors[t.b_key].detach().to(device, torch.float32).clone())
                                        for t in self.targets])
        self.a_ft = [a.detach().clone() for a in self.lora_a]
        self.b_ft = [b.detach().clone() for b in self.lora_b]
        self.base = {t.weight: pretrained[t.weight].detach() for t in self.targets}
        self._points: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # an evaluation point (see load_values)
        self._init_weights()

    @staticmethod
    def _check(targets: Sequence[Target], factors: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor]
               ) -> None:
        for target in targets:
            if target.weight not in pretrained:
                raise IncompatibleCheckpointError(f"LoRA target {target.weight} is not a weight of this model")
            a, b = factors[target.a_key], factors[target.b_key]
            weight = pretrained[target.weight]
            rows = weight.shape[0] if target.rows is None else target.rows[1] - target.rows[0]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or list(b.shape[:1]) + list(a.shape[1:]) != [
                    rows, weight.shape[1]]:
                raise IncompatibleCheckpointError(
                    f"LoRA factors {target.a_key} {list(a.shape)} and {target.b_key} {list(b.shape)} do not fit "
                    f"{target.weight} {list(weight.shape)}" + (f" rows {target.rows[0]}:{target.rows[1]}" if target.rows
                                                               else "") + f"; expected A [r, {weight.shape[1]}], "
                    f"B [{rows}, r]")
            if not (torch.is_floating_point(a) and torch.is_floating_point(b)):
                raise IncompatibleCheckpointError(f"LoRA factors {target.a_key} are not floating point")

    # ------------------------------------------------------------------ construction

    @classmethod
    def matches(cls, tensor_file: TensorFile) -> bool:
        return layout_of(tensor_file) is not None

    @classmethod
    def trainable_keys(cls, tensor_file: TensorFile, options: KindOptions | None = None) -> list[str]:
        return [key for key in tensor_file.tensors if CLIP_LORA_KEY.match(key) or PEFT_KEY.match(key)]

    @classmethod
    def from_file(cls, backbone: Backbone, tensor_file: TensorFile, classnames: Sequence[str],
                  templates: Sequence[str], options: LoraOptions | None = None) -> LoRA:
        options = options or LoraOptions()
        layout = layout_of(tensor_file)
        if layout is None:
            raise IncompatibleCheckpointError(f"{tensor_file.path}: no LoRA factors (w_lora_A / lora_A.weight)")
        if layout is LoraLayout.clip_lora:
            targets, meta = clip_lora_targets(tensor_file, backbone, options.lora_scale)
            data: dict[str, Any] = {"metadata": meta}
        else:
            targets = peft_targets(tensor_file, backbone, options.lora_scale)
            data = {"config": tensor_file.metadata.get(ADAPTER_CONFIG)}
        return cls(backbone, targets, tensor_file.tensors, classnames, templates, options, layout=layout,
                   layout_data=data)

    @classmethod
    def zero_shot(cls, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                  options: LoraOptions | None = None) -> LoRA:
        """A new adapter at ``w_zs``: B = 0 and A initialised as both libraries do (Kaiming-uniform), seeded."""
        options = options or LoraOptions()
        towers = ["text", "vision"] if options.lora_towers is LoraTowers.both else [options.lora_towers.value]
        blocks = [block for tower in towers for block in _blocks(backbone, tower)]
        generator = torch.Generator().manual_seed(0)
        rank, alpha = options.lora_rank, options.lora_alpha
        factors: dict[str, torch.Tensor] = {}
        targets: list[Target] = []

        def add(weight: str, rows: tuple[int, int] | None, scale: float, a_key: str, b_key: str) -> None:
            width = backbone.model.get_parameter(weight).shape[1]
            out = backbone.model.get_parameter(weight).shape[0] if rows is None else rows[1] - rows[0]
            a = torch.empty(rank, width)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            factors[a_key], factors[b_key] = a, torch.zeros(out, rank)
            targets.append(Target(weight, rows, scale, a_key, b_key))

        if options.lora_layout is LoraLayout.clip_lora:
            scale = (options.lora_scale or alpha / math.sqrt(rank))
            for layer, block in enumerate(blocks):
                width = int(backbone.model.get_submodule(f"{block}.attn").embed_dim)
                for proj in ("q_proj", "k_proj", "v_proj"):  # CLIP-LoRA's default params
                    start = QKV_ROWS[proj] * width
                    stem = f"weights.layer_{layer}.{proj}"
                    add(f"{block}.attn.in_proj_weight", (start, start + width), scale, f"{stem}.w_lora_A",
                        f"{stem}.w_lora_B")
            alpha_value: float | int = int(alpha) if float(alpha).is_integer() else alpha
            data: dict[str, Any] = {"metadata": {"r": rank, "alpha": alpha_value, "encoder": options.lora_towers.value,
                                                 "params": ["q", "k", "v"], "position": "all"}}
        else:
            scale = options.lora_scale or alpha / rank
            for block in blocks:  # PEFT on an nn.MultiheadAttention: its in_proj and its out_proj
                stem = f"{PEFT_PREFIX}{block}.attn"
                add(f"{block}.attn.in_proj_weight", None, scale, f"{stem}.lora_A.weight", f"{stem}.lora_B.weight")
                add(f"{block}.attn.out_proj.weight", None, scale, f"{stem}.base_layer.out_proj.lora_A.weight",
                    f"{stem}.base_layer.out_proj.lora_B.weight")
            config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none",
                      "target_modules": [f"{block}.attn" for block in blocks], "use_rslora": False,
                      "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                      "modules_to_save": None, "task_type": None, "base_model_name_or_path": None,
                      "rank_pattern": {}, "alpha_pattern": {},
                      # out_proj's delta counts once, as PEFT computes it since 0.22.0 (huggingface/peft#3774): a
                      # config without this field is read as older and has its out_proj lora_B doubled on load
                      "peft_version": PEFT_SEMANTICS_VERSION}
            data = {"config": json.dumps(config, indent=2) + "\n"}
        return cls(backbone, targets, factors, classnames, templates, options, layout=options.lora_layout,
                   layout_data=data)

    # ------------------------------------------------------------------ weights

    def _factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._points if self._points is not None else list(zip(self.lora_a, self.lora_b))

    def model_weights(self) -> Weights:
        weights: Weights = {}
        for target, (a, b) in zip(self.targets, self._factors()):
            delta = target.scale * (b @ a)
            current = weights.get(target.weight, self.base[target.weight])
            if target.rows is not None:
                start, stop = target.rows
                delta = torch.nn.functional.pad(delta, (0, 0, start, current.shape[0] - stop))
            weights[target.weight] = current + delta
        return weights

    @torch.no_grad()
    def load_values(self, values: Mapping[str, torch.Tensor]) -> None:
        """Set the factors; values of another rank (a point between two adapters, see :meth:`interpolate`)
        are held as that point until values of the adapter's own rank are loaded again."""
        own = all(values[name].shape == parameter.shape for name, parameter in self.trainable().items())
        if own:
            self._points = None
            super().load_values(values)
            return
        self._points = [(values[f"lora_a.{i}"].to(self.lora_a[i]), values[f"lora_b.{i}"].to(self.lora_b[i]))
                        for i in range(len(self.targets))]

    def interpolate(self, start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor],
                    t: float) -> dict[str, torch.Tensor]:
        """``(1 - t) dW_start + t dW_end`` exactly, as one adapter of the summed rank: [A0; A1], [(1-t) B0, t B1]."""
        values = {}
        for i in range(len(self.targets)):
            a, b = f"lora_a.{i}", f"lora_b.{i}"
            values[a] = torch.cat([start[a], end[a]], dim=0)
            values[b] = torch.cat([(1.0 - t) * start[b], t * end[b]], dim=1)
        return values

    def same_weights(self, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
        """Equal merged updates (B = 0 is the zero-shot model whatever A is)."""
        return all(torch.allclose(a[f"lora_b.{i}"] @ a[f"lora_a.{i}"], b[f"lora_b.{i}"] @ b[f"lora_a.{i}"])
                   for i in range(len(self.targets)))

    def zero_shot_values(self) -> dict[str, torch.Tensor]:
        values = {f"lora_a.{i}": a for i, a in enumerate(self.a_ft)}
        values.update({f"lora_b.{i}": torch.zeros_like(b) for i, b in enumerate(self.b_ft)})
        return values

    def finetuned_values(self) -> dict[str, torch.Tensor]:
        values = {f"lora_a.{i}": a for i, a in enumerate(self.a_ft)}
        values.update({f"lora_b.{i}": b for i, b in enumerate(self.b_ft)})
        return values

    # ------------------------------------------------------------------ output

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for target, a, b in zip(self.targets, self.lora_a, self.lora_b):
            tensors[target.a_key] = a.detach().cpu().to(self.input_dtypes[target.a_key])
            tensors[target.b_key] = b.detach().cpu().to(self.input_dtypes[target.b_key])
        return tensors

    @classmethod
    def _writes(cls, tensor_file: TensorFile | None, options: KindOptions) -> str:
        if getattr(options, "merge", False):
            return "merged"
        layout = layout_of(tensor_file) if tensor_file is not None else getattr(options, "lora_layout", None)
        return "folder" if layout is LoraLayout.peft else "file"

    @classmethod
    def writes_folder(cls, tensor_file: TensorFile | None, options: KindOptions) -> bool:
        return cls._writes(tensor_file, options) == "folder"

    @classmethod
    def check_output(cls, out: Path, tensor_file: TensorFile | None, options: KindOptions, force: bool,
                     inputs: Sequence[Path], layout: Layout = FLAT) -> None:
        """LoRA writes its own layouts (the input's); ``layout`` (the generic choice) does not apply."""
        if cls.writes_folder(tensor_file, options):
            check_output_folder(out, force, inputs)
        else:
            check_output_path(out, force, inputs)

    def save(self, out: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
             force: bool = False, inputs: Sequence[Path] = (), layout: Layout = FLAT) -> Path:
        """The input's layout (a CLIP-LoRA torch file, a PEFT folder), or with --merge the merged open_clip
        state dict (safetensors; the record under ``mergetune.merged``, so mergetune does not read it as LoRA)."""
        if self.options.merge:
            with torch.no_grad():
                merged = {name: value.detach() for name, value in self.model_weights().items()}
            state = {name: merged.get(name, tensor).detach().cpu().contiguous()
                     for name, tensor in self.backbone.model.state_dict().items()}
            return write_safetensors(out, state, {"format": MERGED_FORMAT, "merged_from": self.name,
                                                  "mergetune.merged": metadata.get("mergetune", "")},
                                     force=force, inputs=inputs)
        if self.layout is LoraLayout.peft:
            config = self.layout_data.get("config") or "{}"
            return write_adapter_folder(out, {ADAPTER_CONFIG: config.encode("utf-8")}, tensors,
                                        {**metadata, "format": "pt"}, force=force, inputs=inputs)
        nested: dict[str, Any] = {}
        for key, tensor in tensors.items():
            node = nested
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = tensor
        meta = {key: value for key, value in self.layout_data.get("metadata", {}).items() if value is not None}
        nested["metadata"] = {**meta, **metadata}  # CLIP-LoRA reads r/alpha/encoder/params/position; mergetune its record
        return write_torch_file(out, nested, force=force, inputs=inputs)

    def describe(self) -> dict[str, object]:
        ranks = sorted({int(a.shape[0]) for a in self.lora_a})
        return {"layout": self.layout.value, "adapted_weights": len({t.weight for t in self.targets}),
                "factor_pairs": len(self.targets), "ranks": ranks, "scales": sorted({t.scale for t in self.targets}),
                "towers": [tower for tower, used in (("text", self.touches_text), ("image", self.touches_image)) if used],
                "input_dtype": str(next(iter(self.input_dtypes.values()))).removeprefix("torch.")}
