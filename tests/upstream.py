"""Checkpoints written the way the upstream code bases write them (imported by the tests; tests/ is on sys.path).

Each builder follows the upstream source named in its docstring: key names, shapes, dtypes and the
wrapper dict. Shapes that upstream hard-codes for ViT-B/16 (KgCoOp's 512, MaPLe's 768) are kept as
written there; shapes that follow the model (the context width, the class count) follow the tiny CLIP.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch


class WarmupScheduler:
    """Stands for Dassl's ``ConstantWarmupScheduler``: its ``state_dict()`` holds the successor scheduler object,
    which is why ``torch.load(weights_only=True)`` refuses Dassl checkpoints."""

    def __init__(self, successor):
        self.successor = successor
        self.last_epoch = 3

    def state_dict(self):
        return {key: value for key, value in self.__dict__.items()}


def dassl_save(path: Path, state_dict: dict[str, torch.Tensor], *, epoch: int = 50, val_result: float | None = None,
               trained: tuple[str, ...] = ()) -> Path:
    """Dassl's ``save_checkpoint`` of one registered model (``dassl/utils/torchtools.py``): the optimizer's state
    (SGD momentum buffers of ``trained``, after one step) and a scheduler state dict holding an object."""
    parameters = [torch.nn.Parameter(state_dict[name].detach().float().clone()) for name in trained] or [
        torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(parameters, lr=0.002, momentum=0.9)
    sum(parameter.sum() for parameter in parameters).backward()
    optimizer.step()
    successor = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 50)
    torch.save({"state_dict": OrderedDict(state_dict), "epoch": epoch, "optimizer": optimizer.state_dict(),
                "scheduler": WarmupScheduler(successor).state_dict(), "val_result": val_result}, path)
    return path


def prompt_buffers(backbone, n_cls: int, n_ctx: int, dtype=torch.float16, rows: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """CoOp's ``token_prefix`` [n_cls, 1, D] / ``token_suffix`` [n_cls, 77 - 1 - n_ctx, D] (SOS; class, EOS, pad)."""
    rows = n_cls if rows is None else rows
    length = backbone.model.context_length
    width = backbone.text_width
    embedding = torch.randn(rows, length, width).to(dtype)
    return {"token_prefix": embedding[:, :1, :], "token_suffix": embedding[:, 1 + n_ctx:, :]}


def custom_clip_towers(backbone, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The frozen parts of Dassl's ``CustomCLIP`` in its ``state_dict()``: ``image_encoder`` (= clip.visual),
    ``text_encoder`` (transformer, positional_embedding, ln_final, text_projection) and ``logit_scale``."""
    model = backbone.model
    tensors = {f"image_encoder.{name}": value for name, value in model.visual.state_dict().items()}
    text = {name: value for name, value in model.state_dict().items()
            if name.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection"))}
    tensors.update({f"text_encoder.{name}": value for name, value in text.items()})
    tensors["logit_scale"] = model.logit_scale.detach()
    return {name: value.detach().to(dtype).clone() for name, value in tensors.items()}


def maple_state_dict(backbone, n_cls: int, n_ctx: int = 2, depth: int = 9) -> dict[str, torch.Tensor]:
    """MaPLe (``trainers/maple.py``, registered as ``MultiModalPromptLearner``: the whole CustomCLIP, fp16):
    ``prompt_learner.ctx`` [n_ctx, D], ``proj`` Linear(D, 768), ``compound_prompts_text.{0..depth-2}`` [n_ctx, 512],
    ``compound_prompt_projections.{0..depth-2}`` Linear(D, 768), the prompt buffers and the frozen towers."""
    width = backbone.text_width
    half = torch.float16
    learner = {"ctx": 0.02 * torch.randn(n_ctx, width), "proj.weight": torch.randn(768, width),
               "proj.bias": torch.zeros(768)}
    for index in range(depth - 1):
        learner[f"compound_prompts_text.{index}"] = 0.02 * torch.randn(n_ctx, 512)
    for index in range(depth - 1):
        learner[f"compound_prompt_projections.{index}.weight"] = torch.randn(768, width)
        learner[f"compound_prompt_projections.{index}.bias"] = torch.zeros(768)
    learner.update(prompt_buffers(backbone, n_cls, n_ctx))
    state = {f"prompt_learner.{name}": value.to(half) for name, value in learner.items()}
    return {**state, **custom_clip_towers(backbone)}


def cocoop_state_dict(backbone, n_cls: int, n_ctx: int = 4) -> dict[str, torch.Tensor]:
    """CoCoOp (KaiyangZhou/CoOp ``trainers/cocoop.py``, registered ``prompt_learner``): ``ctx`` [n_ctx, D],
    ``meta_net.linear1`` Linear(vis_dim, vis_dim // 16), ``meta_net.linear2`` Linear(vis_dim // 16, D), buffers."""
    width, vis = backbone.text_width, backbone.embed_dim
    state = {"ctx": 0.02 * torch.randn(n_ctx, width), "meta_net.linear1.weight": torch.randn(vis // 16, vis),
             "meta_net.linear1.bias": torch.zeros(vis // 16), "meta_net.linear2.weight": torch.randn(width, vis // 16),
             "meta_net.linear2.bias": torch.zeros(width), **prompt_buffers(backbone, n_cls, n_ctx)}
    return {name: value.half() for name, value in state.items()}


def promptsrc_state_dict(backbone, n_cls: int, n_ctx: int = 4, depth: int = 9) -> dict[str, torch.Tensor]:
    """PromptSRC (``trainers/promptsrc.py``, registered ``VLPromptLearner``: the whole CustomCLIP): ``ctx``,
    ``image_encoder.VPT`` [n_ctx, width], ``...resblocks.{1..depth-1}.VPT_shallow`` in both towers, and a second
    frozen image tower ``prompt_learner.ZS_image_encoder.*``."""
    width, vision = backbone.text_width, backbone.model.visual.conv1.out_channels
    state = {"prompt_learner.ctx": 0.02 * torch.randn(n_ctx, width)}
    state.update({f"prompt_learner.{name}": value for name, value in prompt_buffers(backbone, n_cls, n_ctx).items()})
    state.update({f"prompt_learner.ZS_image_encoder.{name}": value
                  for name, value in backbone.model.visual.state_dict().items()})
    state.update(custom_clip_towers(backbone))
    state["image_encoder.VPT"] = 0.02 * torch.randn(n_ctx, vision)
    for layer in range(1, min(depth, len(backbone.model.visual.transformer.resblocks))):
        state[f"image_encoder.transformer.resblocks.{layer}.VPT_shallow"] = torch.randn(n_ctx, vision)
        state[f"text_encoder.transformer.resblocks.{layer}.VPT_shallow"] = torch.randn(n_ctx, width)
    return {name: value.half() for name, value in state.items()}


def through_every_command(tmp_path: Path, tiny_spec, image_dirs, source: Path, kind: str, surrogates: list[str], *,
                          out_name: str, novel: bool, extra: tuple[str, ...] = ()) -> dict[str, Path]:
    """``inspect``, ``repair`` with each surrogate, ``eval`` (base-to-novel where the kind scores unseen classes),
    ``path``, ``verify`` and ``push --dry-run`` on one upstream file, through the real CLI; the outputs by surrogate."""
    import json

    from cli_helpers import fast, invoke

    report = json.loads(invoke("inspect", source, "--json").stdout)
    assert report["kind"] == kind, report
    outputs = {}
    for surrogate in surrogates:
        folder = tmp_path / surrogate
        folder.mkdir()
        out = folder / out_name
        result = invoke("repair", source, "--data", image_dirs["train"], "--out", out, "--surrogate", surrogate,
                        "--lam-zs", "1", *fast(tiny_spec), *extra)
        assert result.exit_code == 0, result.output
        outputs[surrogate] = out
    fixed = outputs[surrogates[0]]
    evaluation = ["--novel-data", image_dirs["novel"]] if novel else []
    result = invoke("eval", source, fixed, "--data", image_dirs["test"], *evaluation, "--model", tiny_spec.model,
                    "--baselines", "--no-cache", "--json", *extra)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["models"]
    assert all((row["novel"] is not None) == novel for row in rows), rows
    result = invoke("path", source, fixed, "--data", image_dirs["test"], "--out", tmp_path / "path.json",
                    "--model", tiny_spec.model, "--points", "3", "--no-cache", *extra)
    assert result.exit_code == 0, result.output
    result = invoke("verify", fixed, "--ft", source)
    assert result.exit_code == 0, result.output
    result = invoke("push", fixed, "--repo", f"org/{kind}", "--dry-run", tmp_path / "stage")
    assert result.exit_code == 0, result.output
    from repair.kinds import KINDS

    card = (tmp_path / "stage" / "README.md").read_text()
    assert KINDS[kind].about.description in card and (tmp_path / "stage" / fixed.name).exists()
    return outputs
