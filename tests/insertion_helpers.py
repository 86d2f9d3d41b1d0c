"""Shared by the insertion tests: a tiny CLIP deep enough for deep prompts, and files written as the
upstream Dassl trainers write them (imported by the tests; tests/ is on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
