"""Loading the frozen open_clip backbone, and text encoding that is prompt-aware and cheap.

One front door, :func:`load_backbone`, hides where the weights come from (a pretrained
tag, a local file, ``local-dir:PATH`` or ``hf-hub:ORG/NAME``). Text encoding lives here
too because every checkpoint kind needs the same two tricks: feeding token *embeddings*
(so prompts can be learnt) and cutting sequences at the end-of-text token (the text
transformer is causal, so the positions after it never influence the pooled feature).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from repair.errors import IncompatibleCheckpointError, InputFileError, MergetuneError, WeightsUnavailableError
from repair.model.shared_prefix import CLASS_CHUNK, common_prefix_length, encode_shared_prefix, in_class_chunks
from repair.model.shared_prefix import project_text, supports_shared_prefix
from repair.record import BackboneIdentity

MINI_NAME = "mergetune-mini"  # the embedded pretrained CLIP (repair.model.mini)
RANDOM_INIT = "none"  # --pretrained none: deterministic random weights, for tests and timing
RANDOM_INIT_SEED = 0
TEXT_BATCH = 256  # sequences per text-encoder call when encoding many captions


@dataclass(frozen=True)
class BackboneSpec:
    """Where the backbone comes from; recorded verbatim in every output's metadata."""

    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    model_config: Path | None = None

    @property
    def uses_schema(self) -> bool:
        """Whether the model name says where its weights are (so ``pretrained`` means nothing)."""
        return self.model.startswith(("local-dir:", "hf-hub:")) or self.model == MINI_NAME

    def as_dict(self) -> dict[str, str | None]:
        return {
            "model": self.model,
            "pretrained": None if self.uses_schema else self.pretrained,
            "model_config": str(self.model_config) if self.model_config else None,
        }

    def describe(self) -> str:
        """How messages name it: ``ViT-B-16 / openai``."""
        return self.model if self.uses_schema else f"{self.model} / {self.pretrained}"


@dataclass
class Backbone:
    """A frozen CLIP model with its eval transform and tokenizer."""

    model: nn.Module
    preprocess: Callable
    tokenizer: Callable
    spec: BackboneSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # autocast dtype for forward passes; weights and trainable tensors stay fp32

    def autocast(self):
        """Mixed precision for forward passes (a no-op at fp32)."""
        return autocast(self.device, self.precision)

    @cached_property
    def text(self) -> TextTower:
        """The text tower, behind one interface whether it is CLIP's own or a Hugging Face encoder."""
        return HFTextTower(self.model.text) if hasattr(self.model, "text") and hasattr(self.model.text, "transformer") \
            and hasattr(self.model.text, "pooler") else NativeTextTower(self.model)

    @property
    def text_width(self) -> int:
        return self.text.width

    @property
    def embed_dim(self) -> int:
        return self.text.output_dim

    def describe_towers(self) -> dict[str, str]:
        """What the towers are, for ``inspect`` and records: class names of the modules."""
        visual = self.model.visual
        trunk = getattr(visual, "trunk", None)
        return {"image": type(visual).__name__ + (f" ({type(trunk).__name__})" if trunk is not None else ""),
                "text": self.text.describe()}

    @property
    def logit_scale(self) -> float:
        """CLIP's learnt temperature, clamped at 100 as CLIP does in training."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100.0))

    @cached_property
    def visual_fingerprint(self) -> str:
        """sha256 of the image tower's weights and the eval transform: the feature-cache key."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.visual.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        digest.update(repr(self.preprocess).encode())
        digest.update(self.precision.encode())  # bf16 features differ from fp32 ones
        return digest.hexdigest()

    @cached_property
    def text_fingerprint(self) -> str:
        """sha256 of the text tower's weights; tells whether two backbones agree on text."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            if name.startswith("visual."):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def identity(self) -> BackboneIdentity:
        """What an output records so a later run can tell whether it has the same backbone."""
        towers = self.describe_towers()
        return BackboneIdentity(**self.spec.as_dict(), visual_sha256=self.visual_fingerprint,
                                text_sha256=self.text_fingerprint, image_tower=towers["image"],
                                text_tower=towers["text"])

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text features of plain captions, batched and cut at end-of-text."""
        chunks = [self.text.encode_tokens(self.tokenize(texts[start:start + TEXT_BATCH]))
                  for start in range(0, len(texts), TEXT_BATCH)]
        return F.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def zero_shot_classifier(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """[n_cls, embed_dim] class features: the normalised mean over templates, as in CLIP."""
        features = self.encode_template_prompts(self.template_prompts(classnames, templates))
        return F.normalize(features.mean(dim=1), dim=-1)

    def template_prompts(self, classnames: Sequence[str], templates: Sequence[str],
                         share_prefixes: bool = True) -> list[TemplatePrompts]:
        """Every template's captions of these classes, split where they stop sharing tokens."""
        prompts = []
        for template in templates:
            tokens, pooling = self.text.cut(self.tokenize([template.format(name) for name in classnames]))
            shared = self.text.shared_prefix_length(tokens, pooling) if share_prefixes else 0
            prompts.append(TemplatePrompts(tokens[:1, :shared], tokens[:, shared:], pooling))
        return prompts

    def encode_template_prompts(self, prompts: Sequence[TemplatePrompts],
                                parameters: dict[str, torch.Tensor] | None = None,
                                chunk_size: int | None = CLASS_CHUNK) -> torch.Tensor:
        """[C, T, embed_dim] normalised caption features, each template's shared words encoded once.

        ``parameters`` replaces text-tower tensors (names relative to ``text.module``), as CLIPFit needs.
        """
        text = self.text
        features = [text.encode_prompts(text.embed(template.prefix), text.embed(template.suffix), template.pooling,
                                        parameters, chunk_size)[0] for template in prompts]
        return F.normalize(torch.stack(features, dim=1).float(), dim=-1)

    @property
    def image_encoder(self) -> ImageEncoder:
        return ImageEncoder(self.visual_fingerprint, self._encode_raw)

    def _encode_raw(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.encode_image(pixels.to(self.device, memory_format=torch.channels_last)).float()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._encode_raw(pixels), dim=-1)


@dataclass(frozen=True)
class ImageEncoder:
    """Pixels -> raw (unnormalised) image features, with a fingerprint that keys the feature cache."""

    fingerprint: str
    encode: Callable[[torch.Tensor], torch.Tensor]


class TemplatePrompts(NamedTuple):
    """One template's captions of a class list as token ids, split where they stop sharing tokens."""

    prefix: torch.Tensor  # [1, P] the ids every caption starts with (none for a bidirectional tower)
    suffix: torch.Tensor  # [C, S] each caption's remaining ids
    pooling: torch.Tensor  # what the tower pools the whole [C, P + S] captions with


class TextTower:
    """What the kinds need from a text tower: token embeddings in, pooled features out, cut short.

    ``cut`` returns the tokens without the trailing positions that cannot change the pooled feature,
    and ``pooling``: what ``encode_embeddings`` needs to pool (end-of-text positions for CLIP's
    causal transformer, the attention mask for a bidirectional Hugging Face encoder).
    """

    width: int
    output_dim: int
    module: nn.Module  # whose parameters ``encode_*(parameters=...)`` names are relative to
    prefix: str  # ``module``'s name in the CLIP model, with a dot

    def describe(self) -> str: ...
    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def cut(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def content_end(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def encode_embeddings(self, embeddings: torch.Tensor, pooling: torch.Tensor,
                          parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor: ...

    def encode_tokens(self, tokens: torch.Tensor, parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Unnormalised text features of token ids, equal to the model's ``encode_text`` but cut short."""
        tokens, pooling = self.cut(tokens)
        return self.encode_embeddings(self.embed(tokens), pooling, parameters)

    def ffn_output_biases(self) -> list[str]:
        """Names (in ``module``) of each block's feed-forward output bias: CLIPFit's text side."""
        ...

    def shared_prefix_length(self, tokens: torch.Tensor, pooling: torch.Tensor) -> int:
        """How many leading positions of these (cut) prompts :meth:`encode_prompts` may encode once: 0 here,
        since a bidirectional tower's prefix states depend on what follows."""
        return 0

    def encode_prompts(self, prefix: torch.Tensor, suffix: torch.Tensor, pooling: torch.Tensor,
                       parameters: dict[str, torch.Tensor] | None = None,
                       chunk_size: int | None = CLASS_CHUNK) -> torch.Tensor:
        """Features of every prompt ``cat(prefix[g], suffix[c])``: [G, C, output_dim], unnormalised.

        ``pooling`` is what :meth:`encode_embeddings` takes for the C whole prompts. This plain
        version concatenates; the native causal tower encodes the prefix once instead.
        """
        groups, classes = prefix.shape[0], suffix.shape[0]
        prompts = torch.cat([prefix.unsqueeze(1).expand(-1, classes, -1, -1),
                             suffix.unsqueeze(0).expand(groups, -1, -1, -1)], dim=2).flatten(0, 1)
        features = self.encode_rows(prompts, pooling.repeat(groups, *([1] * (pooling.dim() - 1))), parameters,
                                    chunk_size)
        return features.unflatten(0, (groups, classes))

    def row_lengths(self, pooling: torch.Tensor) -> torch.Tensor:
        """How many leading positions each row needs (the rest cannot change its feature)."""
        return pooling + 1  # the end-of-text position, for a causal tower

    def trim(self, rows: torch.Tensor, pooling: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and their ``pooling`` cut to ``length`` positions (at least every row's :meth:`row_lengths`)."""
        return rows[:, :length], pooling

    def encode_rows(self, embeddings: torch.Tensor, pooling: torch.Tensor,
                    parameters: dict[str, torch.Tensor] | None = None,
                    chunk_size: int | None = CLASS_CHUNK) -> torch.Tensor:
        """:meth:`encode_embeddings` in chunks of rows (checkpointed under autograd), so memory stays bounded.

        Past one chunk (a reference vocabulary of 1,005 names), rows go in shortest first and each chunk is
        cut to its own longest row: the same features up to float rounding, for about half the positions
        where a few long names set the length. One chunk runs exactly as it comes.
        """
        if chunk_size is None or len(embeddings) <= chunk_size:
            return self.encode_embeddings(embeddings, pooling, parameters)

        def encode(rows: torch.Tensor, rows_pooling: torch.Tensor) -> torch.Tensor:
            length = int(self.row_lengths(rows_pooling).max())
            return self.encode_embeddings(*self.trim(rows, rows_pooling, length), parameters)

        order = torch.argsort(self.row_lengths(pooling), stable=True)
        features = in_class_chunks(encode, embeddings[order], pooling[order], chunk_size)
        return features[torch.argsort(order)]


class NativeTextTower(TextTower):
    """open_clip's own CLIP text transformer: causal, pooled at the end-of-text token."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.module = model.transformer
        self.prefix = "transformer."
        self.width = int(model.token_embedding.weight.shape[1])
        projection = model.text_projection
        self.output_dim = int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[-1])

    def describe(self) -> str:
        return f"CLIP text transformer ({type(self.model.transformer).__name__})"

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.token_embedding(tokens)

    def cut(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cut_at_end_of_text(self.model, tokens)

    def content_end(self, tokens: torch.Tensor) -> torch.Tensor:
        return pooling_positions(self.model, tokens)

    def encode_embeddings(self, embeddings: torch.Tensor, pooling: torch.Tensor,
                          parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return encode_token_embeddings(self.model, embeddings, pooling, parameters)

    def ffn_output_biases(self) -> list[str]:
        return [name for name, _ in self.module.named_parameters()
                if re.fullmatch(r"resblocks\.\d+\.mlp\.c_proj\.bias", name)]

    @cached_property
    def shares_prefixes(self) -> bool:
        return supports_shared_prefix(self.model)

    def shared_prefix_length(self, tokens: torch.Tensor, pooling: torch.Tensor) -> int:
        if not self.shares_prefixes:
            return 0
        return min(common_prefix_length(tokens), int(pooling.min()))  # every end-of-text stays in a suffix

    def encode_prompts(self, prefix: torch.Tensor, suffix: torch.Tensor, pooling: torch.Tensor,
                       parameters: dict[str, torch.Tensor] | None = None,
                       chunk_size: int | None = CLASS_CHUNK) -> torch.Tensor:
        if not self.shares_prefixes or prefix.shape[1] == 0:
            return super().encode_prompts(prefix, suffix, pooling, parameters, chunk_size)
        return encode_shared_prefix(self.model, prefix, suffix, pooling - prefix.shape[1], parameters, chunk_size)


class HFTextTower(TextTower):
    """A Hugging Face encoder inside open_clip (``CustomTextCLIP``: BERT, RoBERTa, XLM-R, MiniLM...).

    Prompts go in as ``inputs_embeds`` with the tower's attention mask; the tower's own pooler and
    projection make the feature. The encoder is bidirectional, so only padding can be cut.
    """

    def __init__(self, text: nn.Module) -> None:
        self.text = text
        self.module = text
        self.prefix = "text."
        self._from_embeddings = _EmbeddingsForward(text)  # built once: it runs on every training step
        self.width = int(text.transformer.get_input_embeddings().weight.shape[1])
        self.output_dim = int(text.output_dim)
        self.pad_id = text.config.pad_token_id

    def describe(self) -> str:
        return f"Hugging Face {type(self.text.transformer).__name__} ({self.text.config.model_type})"

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text.transformer.get_input_embeddings()(tokens)

    def cut(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (tokens != self.pad_id).long()
        length = int(mask.sum(dim=-1).max())
        return tokens[:, :length], mask[:, :length]

    def content_end(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens != self.pad_id).long().sum(dim=-1) - 1  # the separator token closing each text

    def row_lengths(self, pooling: torch.Tensor) -> torch.Tensor:
        return pooling.sum(dim=-1)  # the attention mask: padding is masked out

    def trim(self, rows: torch.Tensor, pooling: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rows[:, :length], pooling[:, :length]

    def encode_embeddings(self, embeddings: torch.Tensor, pooling: torch.Tensor,
                          parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if not parameters:
            return self._from_embeddings(embeddings, pooling)
        swapped = {f"text.{name}": value for name, value in parameters.items()}
        return torch.func.functional_call(self._from_embeddings, swapped, (embeddings, pooling), strict=False)

    def ffn_output_biases(self) -> list[str]:
        return [name for name, _ in self.text.named_parameters()
                if re.fullmatch(r"transformer\.(encoder\.)?layers?\.\d+\.output\.dense\.bias", name)]


class _EmbeddingsForward(nn.Module):
    """The HF text tower from input embeddings on, as a module ``functional_call`` can run."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.text = text

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.text.transformer(inputs_embeds=embeddings, attention_mask=mask)
        return self.text.proj(self.text.pooler(out, mask))


def pooling_positions(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token in each sequence, where open_clip pools the text feature."""
    pool_type = getattr(model, "text_pool_type", "argmax")
    if pool_type == "argmax":
        return tokens.argmax(dim=-1)
    if pool_type == "eos" and getattr(model, "text_eos_id", None) is not None:
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    raise IncompatibleCheckpointError(
        f"text tower pools with {pool_type!r}; mergetune needs a CLIP text tower that pools at end-of-text"
    )


def cut_at_end_of_text(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the positions after the longest end-of-text token: identical features, far less work."""
    eot = pooling_positions(model, tokens)
    length = int(eot.max()) + 1
    return tokens[:, :length], eot


def encode_token_embeddings(model: nn.Module, embeddings: torch.Tensor, eot: torch.Tensor,
                            parameters: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """open_clip's ``encode_text`` from token embeddings on: [N, L, width] -> [N, embed_dim].

    ``L`` may be shorter than the context length; the causal mask is cut to match.
    ``parameters`` replaces tensors of ``model.transformer`` (names relative to it) for this
    call only, which is how kinds that tune the text tower's own parameters use it.
    """
    if not hasattr(model, "transformer") or not hasattr(model, "attn_mask"):
        raise IncompatibleCheckpointError(
            f"{type(model).__name__} has no CLIP text transformer; prompt kinds need an open_clip CLIP model"
        )
    length = embeddings.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None
    if parameters:
        x = torch.func.functional_call(model.transformer, parameters, (x,), {"attn_mask": mask}, strict=False)
    else:
        x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    return project_text(model, x[torch.arange(x.shape[0], device=x.device), eot])


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features of token ids, equal to ``model.encode_text`` but cut short."""
    tokens, eot = cut_at_end_of_text(model, tokens)
    return encode_token_embeddings(model, model.token_embedding(tokens), eot)


def default_cache_dir() -> Path:
    """Where mergetune keeps what it can rebuild: image features, Fisher terms, the assembled mergetune-mini."""
    env = os.environ.get("MERGETUNE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mergetune"


def _open_clip():
    """open_clip, imported on first use: the import takes seconds, and reading, inspecting or verifying a
    checkpoint builds no model."""
    import open_clip

    return open_clip


def register_model_config(path: Path) -> str:
    """Register a custom architecture JSON with open_clip; returns the model name it defines."""
    if not path.is_file():
        raise InputFileError(f"{path}: model config not found")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: not a readable JSON model config ({exc})") from None
    if not isinstance(config, dict) or not {"vision_cfg", "text_cfg", "embed_dim"} <= config.keys():
        raise InputFileError(f"{path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
    _open_clip().add_model_config(path)
    return path.stem


def _offline_hint(unreachable: bool = False) -> str:
    if unreachable:
        state = ("the Hugging Face Hub is unreachable (no network?) and they are not cached "
                 "(set HF_HUB_OFFLINE=1 to skip the network check)")
    elif _offline_requested():
        state = "HF_HUB_OFFLINE is set and they are not cached"
    else:
        state = "they could not be downloaded"
    return (
        f"{state}; ways out: run once with network access to fill the Hugging Face cache, "
        "pass --pretrained /path/to/weights, or use --model local-dir:PATH"
    )


def _check_pretrained(spec: BackboneSpec) -> str | None:
    """Resolve --pretrained: a tag open_clip knows, an existing file, or none (random init)."""
    if spec.uses_schema:
        return None
    if spec.pretrained in (None, "", RANDOM_INIT):
        return None
    if os.path.isfile(spec.pretrained):
        return spec.pretrained
    tags = _open_clip().list_pretrained_tags_by_model(spec.model)
    if spec.pretrained not in tags:
        looks_like_path = os.sep in spec.pretrained or spec.pretrained.endswith((".pt", ".bin", ".safetensors"))
        if looks_like_path:
            raise WeightsUnavailableError(f"{spec.pretrained}: weights file not found")
        known = ", ".join(tags) or "none"
        raise WeightsUnavailableError(
            f"unknown pretrained tag {spec.pretrained!r} for {spec.model} (known: {known}); or pass a weights file"
        )
    return spec.pretrained


def _check_model_name(spec: BackboneSpec) -> None:
    if spec.model.startswith("local-dir:"):
        folder = Path(spec.model[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailableError(f"{folder}: not an open_clip folder (no open_clip_config.json)")
        return
    if spec.model.startswith("hf-hub:"):
        return
    if spec.model.replace("/", "-") not in _open_clip().list_models():
        _check_not_a_path(spec.model)
        raise WeightsUnavailableError(
            f"unknown model {spec.model!r}; `python -c 'import open_clip; print(open_clip.list_models())'` "
            "lists them, or register one with --model-config FILE.json"
        )


def _check_not_a_path(model: str) -> None:
    """A folder or file given as the model name: say which option takes it instead of "unknown model"."""
    path = Path(model)
    if path.is_dir():
        hint = (f"pass it as --model local-dir:{model}" if (path / "open_clip_config.json").is_file()
                else "an open_clip folder (local-dir:PATH) holds open_clip_config.json")
        raise WeightsUnavailableError(f"{model}: a folder, not a model name; {hint}")
    if path.is_file():
        raise WeightsUnavailableError(f"{model}: a file, not a model name; a weights file goes in --pretrained "
                                      "(with --model naming its architecture)")


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable device is one clear error."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergetuneError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and (not torch.cuda.is_available() or
                                    (resolved.index or 0) >= torch.cuda.device_count()):
        raise MergetuneError(f"device {device} is not available here (CUDA devices: {torch.cuda.device_count()})")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MergetuneError("device mps is not available here")
    return resolved


def load_backbone(spec: BackboneSpec | None = None, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> Backbone:
    """Build the frozen backbone in eval mode, with clear errors for every way loading fails."""
    spec = spec or BackboneSpec()
    if precision not in PRECISIONS:
        raise MergetuneError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    open_clip = _open_clip()  # imported here, before the offline and seeded contexts below
    if spec.model_config is not None:
        register_model_config(Path(spec.model_config))
    name = _embedded_model(spec.model)
    _check_model_name(replace(spec, model=name))
    pretrained = _check_pretrained(spec)
    device = resolve_device(device)
    downloads = (pretrained is not None and not os.path.isfile(pretrained)) or spec.model.startswith("hf-hub:")
    try:
        with _quiet_libraries(), _offline_unless_reachable(downloads) as unreachable, \
                torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # random init (--pretrained none) is reproducible
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
            tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError) as exc:
        if not downloads:
            raise WeightsUnavailableError(f"could not build {spec.model}: {_first_line(exc)}") from None
        raise WeightsUnavailableError(f"could not load weights for {spec.describe()}: "
                                      f"{_offline_hint(unreachable)}") from None
    model.eval().requires_grad_(False)
    model.visual.to(memory_format=torch.channels_last)  # the patch-embedding convolution prefers it
    return Backbone(model=model, preprocess=preprocess, tokenizer=tokenizer, spec=spec, device=device,
                    precision=precision)


def _embedded_model(model: str) -> str:
    """The open_clip name to build: ``mergetune-mini`` is assembled once into the cache as a local-dir."""
    if model != MINI_NAME:
        return model
    from repair.model import mini

    with _quiet_libraries():
        return f"local-dir:{mini.local_dir(default_cache_dir())}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """open_clip and huggingface_hub log warnings, retries and errors (``logging.error`` on the root
    logger, which would also install a stderr handler for good): while loading, their records go
    nowhere; the caller's own logging configuration is left as it was."""
    root = logging.getLogger()
    sink = logging.NullHandler()
    silence = _DropLibraryRecords()
    root.addHandler(sink)  # root has a handler now, so logging.error() adds none of its own
    root.addFilter(silence)
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    for logger in loggers:
        logger.addFilter(silence)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(silence)
        root.removeFilter(silence)
        root.removeHandler(sink)


_NOISY_LOGGERS = ("open_clip", "huggingface_hub", "urllib3", "timm")


class _DropLibraryRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


HUB_PROBE_TIMEOUT_S = 2.0


@contextmanager
def _offline_unless_reachable(downloads: bool) -> Iterator[bool]:
    """Without network, huggingface_hub retries for about a minute before failing. One short probe of
    the Hub instead; when it fails, load in offline mode (cached weights still load at once).
    Yields whether the Hub was found unreachable."""
    if not downloads or _offline_requested():
        yield False
        return
    if hub_reachable():
        yield False
        return
    import huggingface_hub.constants as hub_constants

    saved = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub (``HF_ENDPOINT``) opens within ``timeout_s``, name lookup included.

    The socket's timeout bounds the connection, not the lookup: a resolver that hangs (no route to its
    DNS server) can take tens of seconds. The probe runs in a daemon thread and is waited for ``timeout_s``
    at most; a lookup still hanging then is left to finish on its own.
    """
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    address = (endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80))
    opened = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
        except OSError:
            return
        opened.set()

    threading.Thread(target=probe, name="mergetune-hub-probe", daemon=True).start()
    return opened.wait(timeout_s)
