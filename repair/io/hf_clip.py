"""Hugging Face transformers CLIP folders (``CLIPModel``, ``CLIPVisionModel``, ``...WithProjection``).

A folder with ``config.json`` (``model_type`` ``clip`` or ``clip_vision_model``) and ``model.safetensors``,
as ``save_pretrained`` writes it (fusion_bench and the HF Trainer save fully fine-tuned towers so), is
read with its tensors renamed to open_clip's (:func:`to_open_clip`), so the kinds see one naming; the
output is renamed back (:func:`to_hf`) and written as the same folder (its ``config.json`` unchanged,
``model.safetensors`` with the input's names, order and dtypes, and ``"format": "pt"`` in its metadata, which
``from_pretrained`` requires), so ``from_pretrained`` loads it.

The map, per transformer block ``i`` of either tower (``vision_model.encoder.layers.i`` /
``text_model.encoder.layers.i`` -> ``visual.transformer.resblocks.i`` / ``transformer.resblocks.i``):
``self_attn.{q,k,v}_proj`` are the three row blocks of open_clip's packed ``attn.in_proj_weight`` /
``in_proj_bias``; ``self_attn.out_proj`` -> ``attn.out_proj``; ``layer_norm1`` / ``layer_norm2`` -> ``ln_1`` /
``ln_2``; ``mlp.fc1`` / ``mlp.fc2`` -> ``mlp.c_fc`` / ``mlp.c_proj``. Around them: ``embeddings.class_embedding``
-> ``visual.class_embedding``, ``embeddings.patch_embedding.weight`` -> ``visual.conv1.weight``,
``embeddings.position_embedding.weight`` -> ``visual.positional_embedding`` (text: ``positional_embedding``),
``pre_layrnorm`` / ``post_layernorm`` -> ``visual.ln_pre`` / ``visual.ln_post``, ``token_embedding.weight``,
``final_layer_norm`` -> ``ln_final``, ``logit_scale``; the projections are ``nn.Linear`` without bias in
transformers and matrices used as ``x @ P`` in open_clip: ``visual_projection.weight`` is ``visual.proj``
transposed, ``text_projection.weight`` is ``text_projection`` transposed. ``CLIPVisionModel`` has no
projection (its output is the pooled, normalised token); its vision keys carry no ``vision_model.`` prefix
in transformers 5 and one before. Older versions' ``position_ids`` buffers (``arange``) are rebuilt on
write. The activation (``hidden_act``) must be the backbone's: quick_gelu for OpenAI weights (open_clip's
``-quickgelu`` models).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from repair.errors import IncompatibleCheckpointError, InputFileError
from repair.io._messages import _fail
from repair.io.layout import Layout
from repair.io.write import write_folder

CONFIG, WEIGHTS = "config.json", "model.safetensors"
MODEL_TYPES = ("clip", "clip_vision_model")
MAX_CONFIG = 1024 * 1024
_BLOCK_PARTS = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_LAYER = re.compile(r"^encoder\.layers\.(?P<i>\d+)\.(?P<part>self_attn\.[qkv]_proj|self_attn\.out_proj|layer_norm[12]"
                    r"|mlp\.fc[12])\.(?P<leaf>weight|bias)$")
_VISION = {"embeddings.class_embedding": "visual.class_embedding",
           "embeddings.patch_embedding.weight": "visual.conv1.weight",
           "embeddings.position_embedding.weight": "visual.positional_embedding",
           "pre_layrnorm.weight": "visual.ln_pre.weight", "pre_layrnorm.bias": "visual.ln_pre.bias",
           "post_layernorm.weight": "visual.ln_post.weight", "post_layernorm.bias": "visual.ln_post.bias"}
_TEXT = {"embeddings.token_embedding.weight": "token_embedding.weight",
         "embeddings.position_embedding.weight": "positional_embedding",
         "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_TOP = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection",
        "logit_scale": "logit_scale"}
_TRANSPOSED = ("visual_projection.weight", "text_projection.weight")


def open_clip_name(hf_key: str, vision_prefix: str) -> tuple[str, int | None] | None:
    """(open_clip name, q/k/v row block or None) of a transformers CLIP tensor; None for a name not in the map."""
    if hf_key in _TOP:
        return _TOP[hf_key], None
    for prefix, tower, singles in ((vision_prefix, "visual.", _VISION), ("text_model.", "", _TEXT)):
        if prefix and not hf_key.startswith(prefix) or (not prefix and hf_key.startswith("text_model.")):
            continue
        name = hf_key[len(prefix):]
        if name in singles:
            return singles[name], None
        match = _LAYER.match(name)
        if match:
            block, part, leaf = f"{tower}transformer.resblocks.{match['i']}", match["part"], match["leaf"]
            projection = part.removeprefix("self_attn.")
            if projection in _QKV:
                return f"{block}.attn.in_proj_{leaf}", _QKV[projection]
            return f"{block}.{_BLOCK_PARTS[part]}.{leaf}", None
    return None


def to_open_clip(tensors: Mapping[str, torch.Tensor], vision_prefix: str, source: Path
                 ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """transformers names -> open_clip names (q/k/v packed), and the map back (one entry per transformers key,
    in the file's order). A name outside the map, or a block missing q, k or v, is refused in one line."""
    renamed: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[int, torch.Tensor]] = {}
    entries: list[dict[str, Any]] = []
    for key, tensor in tensors.items():
        found = open_clip_name(key, vision_prefix)
        if found is None:
            raise IncompatibleCheckpointError(f"{source}: {key} is not a tensor of a transformers CLIP model mergetune "
                                              "reads (CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection)")
        name, block = found
        entries.append({"hf": key, "name": name, "block": block, "transposed": key in _TRANSPOSED})
        if block is None:
            renamed[name] = tensor.t().contiguous() if key in _TRANSPOSED else tensor
        else:
            renamed.setdefault(name, torch.empty(0))  # keeps the file's order
            packed.setdefault(name, {})[block] = tensor
    for name, blocks in packed.items():
        if sorted(blocks) != [0, 1, 2] or len({t.dtype for t in blocks.values()}) != 1:
            raise IncompatibleCheckpointError(f"{source}: {name} needs q_proj, k_proj and v_proj of one dtype; found "
                                              f"{len(blocks)} of them")
        renamed[name] = torch.cat([blocks[index] for index in range(3)])
    return renamed, entries


def to_hf(tensors: Mapping[str, torch.Tensor], entries: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """open_clip names -> the transformers names of ``entries`` (the inverse of :func:`to_open_clip`)."""
    out = {}
    for entry in entries:
        tensor = tensors[entry["name"]]
        if entry["block"] is not None:
            rows = tensor.shape[0] // 3
            tensor = tensor[entry["block"] * rows:(entry["block"] + 1) * rows]
        elif entry["transposed"]:
            tensor = tensor.t()
        out[entry["hf"]] = tensor.contiguous()
    return out


def read_hf_clip_folder(folder: Path, read: Callable[[Path], Any]):
    """A transformers CLIP folder as open_clip-named tensors, its layout kept for the output (module docstring)."""
    from repair.io.read import TensorFile

    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if config_path.stat().st_size > MAX_CONFIG:
        raise _fail(InputFileError, config_path, f"is larger than {MAX_CONFIG} bytes; not a model config")
    try:
        config_text = config_path.read_text(encoding="utf-8")
        config = json.loads(config_text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(InputFileError, config_path, "not a readable JSON config") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise _fail(IncompatibleCheckpointError, folder, f"is a transformers {model_type!r} model; mergetune reads "
                                                         "CLIP folders (model_type clip or clip_vision_model)")
    if not weights_path.is_file():
        sharded = (folder / f"{WEIGHTS}.index.json").is_file()
        raise _fail(InputFileError, folder, "holds a sharded checkpoint; save it unsharded (save_pretrained with a "
                                            "larger max_shard_size)" if sharded else
                    f"has no {WEIGHTS} (only safetensors weights are read: save_pretrained writes them by default)")
    weights = read(weights_path)
    if weights.format != "safetensors":
        raise _fail(InputFileError, weights_path, "is not a safetensors file")
    rebuilt = {key: [list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in weights.tensors.items()
               if key.endswith("embeddings.position_ids")}
    tensors = {key: t for key, t in weights.tensors.items() if key not in rebuilt}
    vision_prefix = "vision_model." if any(key.startswith("vision_model.") for key in tensors) else ""
    renamed, entries = to_open_clip(tensors, vision_prefix, folder)
    digest = hashlib.sha256()
    for name, file_digest in ((CONFIG, hashlib.sha256(config_text.encode()).hexdigest()), (WEIGHTS, weights.sha256)):
        digest.update(f"{name} {file_digest}\n".encode())
    layout = Layout("hf-clip", {"config": config_text, "entries": entries, "position_ids": rebuilt,
                                "marker": CONFIG, "files": [CONFIG, WEIGHTS, "README.md"]}, folder=True)
    return TensorFile(path=folder, format="hf-clip", tensors=renamed, metadata=dict(weights.metadata),
                      sha256=digest.hexdigest(), layout=layout)


def write_hf_clip(out: Path, layout: Layout, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                  force: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """The same folder: ``config.json`` as read, ``model.safetensors`` under the input's names (module docstring)."""
    weights = to_hf(tensors, layout.details["entries"])
    for key, (shape, dtype) in layout.details.get("position_ids", {}).items():
        weights[key] = torch.arange(shape[-1], dtype=getattr(torch, dtype)).expand(*shape).contiguous()
    files = {CONFIG: layout.details["config"].encode("utf-8")}
    return write_folder(out, files, {WEIGHTS: (weights, {**metadata, "format": "pt"})}, force=force, inputs=inputs,
                        marker=CONFIG, allowed=layout.details.get("files", ()))
