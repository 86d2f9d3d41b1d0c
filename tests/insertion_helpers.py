"""Shared by the insertion tests: a tiny CLIP deep enough for deep prompts, and files written as the
upstream Dassl trainers write them (imported by the tests; tests/ is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

# three blocks per tower (deep prompts at blocks 1 and 2), image width 48 != text width 32 so that every
# projection's shape is told apart, one patch grid of 4 x 4
DEEP_CONFIG = {"embed_dim": 32,
               "vision_cfg": {"image_size": 32, "layers": 3, "width": 48, "head_width": 16, "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}


def save_deep_backbone(folder: Path, seed: int = 0) -> str:
    """The tiny three-block CLIP as an open_clip local-dir; returns ``local-dir:PATH``."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**DEEP_CONFIG)
        with torch.no_grad():  # LayerNorms start as the identity: move them, so that each one tells
            for name, parameter in model.named_parameters():
                if ".ln_" in name or name.startswith(("ln_", "visual.ln_")):
                    parameter.add_(0.2 * torch.randn_like(parameter))
    save_file({name: t.contiguous().clone() for name, t in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": DEEP_CONFIG, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def dassl_save(path: Path, state_dict: dict[str, torch.Tensor], epoch: int = 5) -> Path:
    """``torch.save`` as Dassl's ``save_checkpoint`` writes ``model.pth.tar-<epoch>``: the state dict, the epoch,
    the SGD optimizer's state (momentum buffers of the trained tensors after a step) and the scheduler's state
    dict, whose ``successor`` is a live scheduler object (Dassl's warm-up wrapper), plus ``val_result``."""
    trained = [torch.nn.Parameter(t.detach().float().clone()) for t in state_dict.values() if t.is_floating_point()]
    optimizer = torch.optim.SGD(trained[:3], lr=0.002, momentum=0.9, weight_decay=5e-4)
    sum(p.sum() for p in trained[:3]).backward()
    optimizer.step()
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epoch)
    scheduler = {"successor": successor, "warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": epoch,
                 "base_lrs": [0.002], "_step_count": epoch + 1}
    torch.save({"state_dict": state_dict, "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler, "val_result": None}, path)
    return path


def fp16_clip_state(backbone, prefix_visual: str, prefix_text: str) -> dict[str, torch.Tensor]:
    """The frozen CLIP a whole-model MaPLe / PromptSRC file carries, as OpenAI CLIP's ``convert_weights`` leaves
    it: linear, convolution and attention weights and the projections fp16, the rest (LayerNorms, embeddings) fp32."""
    state = {}
    for name, tensor in backbone.model.state_dict().items():
        if name.startswith("visual."):
            key = prefix_visual + name.removeprefix("visual.")
        elif name.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            key = prefix_text + name
        elif name == "logit_scale":
            key = name
        else:
            continue  # token_embedding is not part of the text encoder module upstream
        half = any(part in name for part in ("attn.", "mlp.", "conv1", "proj"))
        state[key] = tensor.detach().clone().to(torch.float16 if half and "ln_" not in name else torch.float32)
    return state


def reference_block(block, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One open_clip / OpenAI CLIP block on [L, N, D] (sequence first), attention from the raw weights."""
    attn = block.attn
    heads, width = attn.num_heads, x.shape[-1]
    h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    q, k, v = (h @ attn.in_proj_weight.t() + attn.in_proj_bias).chunk(3, dim=-1)

    def split(t):  # [L, N, D] -> [N, H, L, d]
        return t.reshape(t.shape[0], t.shape[1], heads, width // heads).permute(1, 2, 0, 3)

    scores = split(q) @ split(k).transpose(-1, -2) / (width // heads) ** 0.5
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ split(v)).permute(2, 0, 1, 3).reshape(x.shape)
    x = x + out @ attn.out_proj.weight.t() + attn.out_proj.bias
    h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
    return x + block.mlp.c_proj(block.mlp.gelu(block.mlp.c_fc(h)))


# ----------------------------------------------------------------------------- files as upstream writes them


def _noise(generator: torch.Generator, *shape: int, std: float = 0.05) -> torch.Tensor:
    return std * torch.randn(*shape, generator=generator)


def _buffers(backbone, classnames, n_ctx: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """``token_prefix`` / ``token_suffix`` as the prompt learners register them (fp16, full 77 positions)."""
    tokens = backbone.tokenize([f"a photo of a {name}." for name in classnames])
    with torch.no_grad():
        embedding = backbone.model.token_embedding(tokens).half()
    return {f"{prefix}token_prefix": embedding[:, :1].clone(), f"{prefix}token_suffix": embedding[:, 1 + n_ctx:].clone()}


def _ctx(backbone, n_ctx: int, generator: torch.Generator) -> torch.Tensor:
    tokens = backbone.tokenize(["a photo of a"])
    with torch.no_grad():
        words = backbone.model.token_embedding(tokens)[0, 1:1 + n_ctx]
    return (words + _noise(generator, n_ctx, words.shape[-1])).half()


def cocoop_state(backbone, classnames, seed: int = 0) -> dict[str, torch.Tensor]:
    """CoCoOp's ``prompt_learner`` state dict under ``PREC: fp16`` (meta_net.half(), ctx in CLIP's dtype)."""
    generator = torch.Generator().manual_seed(seed)
    embed, width = backbone.embed_dim, backbone.text_width
    hidden = embed // 16
    state = {"ctx": _ctx(backbone, 4, generator)}
    state.update({"meta_net.linear1.weight": _noise(generator, hidden, embed, std=0.3).half(),
                  "meta_net.linear1.bias": _noise(generator, hidden).half(),
                  "meta_net.linear2.weight": _noise(generator, width, hidden, std=0.3).half(),
                  "meta_net.linear2.bias": _noise(generator, width).half()})
    return {**state, **_buffers(backbone, classnames, 4)}


def maple_state(backbone, classnames, seed: int = 0, vision: bool = True) -> dict[str, torch.Tensor]:
    """MaPLe's whole ``CustomCLIP`` under ``PREC: fp16``, N_CTX 2, PROMPT_DEPTH 3 (this model's depth)."""
    generator = torch.Generator().manual_seed(seed)
    width, visual = backbone.text_width, backbone.model.visual.conv1.out_channels
    learner = "prompt_learner."
    state = {learner + "ctx": _ctx(backbone, 2, generator)}
    if vision:
        state.update({learner + "proj.weight": _noise(generator, visual, width, std=0.2).half(),
                      learner + "proj.bias": _noise(generator, visual).half()})
    for index in range(2):
        state[f"{learner}compound_prompts_text.{index}"] = _noise(generator, 2, width, std=0.3)
        if vision:
            state[f"{learner}compound_prompt_projections.{index}.weight"] = _noise(generator, visual, width, std=0.2)
            state[f"{learner}compound_prompt_projections.{index}.bias"] = _noise(generator, visual)
    state.update(_buffers(backbone, classnames, 2, learner))
    return {**state, **fp16_clip_state(backbone, "image_encoder.", "text_encoder.")}


def promptsrc_state(backbone, classnames, seed: int = 0) -> dict[str, torch.Tensor]:
    """PromptSRC's whole ``CustomCLIP`` under ``PREC: fp16``, 4 + 4 tokens, depth 3, with ``ZS_image_encoder``."""
    generator = torch.Generator().manual_seed(seed)
    width, visual = backbone.text_width, backbone.model.visual.conv1.out_channels
    state = {"prompt_learner.ctx": _ctx(backbone, 4, generator), "image_encoder.VPT": _noise(generator, 4, visual, std=0.3)}
    for index in (1, 2):
        state[f"text_encoder.transformer.resblocks.{index}.VPT_shallow"] = _noise(generator, 4, width, std=0.3)
        state[f"image_encoder.transformer.resblocks.{index}.VPT_shallow"] = _noise(generator, 4, visual, std=0.3)
    state.update(_buffers(backbone, classnames, 4, "prompt_learner."))
    frozen = fp16_clip_state(backbone, "image_encoder.", "text_encoder.")
    teacher = fp16_clip_state(backbone, "prompt_learner.ZS_image_encoder.", "unused.")
    return {**state, **frozen, **{key: value for key, value in teacher.items() if "ZS_image_encoder" in key}}


def mma_state(backbone, classnames, seed: int = 0, layers: tuple[int, ...] = (2, 3), hidden: int = 8
              ) -> dict[str, torch.Tensor]:
    """MMA's ``adapter_learner`` state dict under ``PREC: amp`` (fp32), adapters at ``layers``."""
    generator = torch.Generator().manual_seed(seed)
    tokens = backbone.tokenize([f"a photo of a {name}." for name in classnames])
    with torch.no_grad():
        state = {"token_embedding": backbone.model.token_embedding(tokens).clone(), "tokenized_prompts": tokens.clone()}
    for index in layers:
        for tower, width in (("text_adapter", backbone.text_width),
                             ("visual_adapter", backbone.model.visual.conv1.out_channels)):
            state[f"{tower}.{index}.down.0.weight"] = _noise(generator, hidden, width, std=0.5)
            state[f"{tower}.{index}.down.0.bias"] = _noise(generator, hidden)
            state[f"{tower}.{index}.up.weight"] = _noise(generator, width, hidden, std=30.0)  # times the 0.001 scale
            state[f"{tower}.{index}.up.bias"] = _noise(generator, width, std=30.0)
        state[f"shared_adapter.{index}.0.weight"] = _noise(generator, hidden, hidden, std=0.5)
        state[f"shared_adapter.{index}.0.bias"] = _noise(generator, hidden)
    return state
