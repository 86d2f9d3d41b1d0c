"""The MergeTune loop and the repair workflow through the Python API."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import repair.data.features
from repair import DataOptions, evaluate, finetune, load_repaired, repair as run_repair
from repair.io import read_tensors
from repair.data.folders import scan_image_folder
from repair.data.features import extract_features
from repair.kinds.coop import CoOpPrompts, init_context
from repair.record import Record
from repair.train.objective import Objective
from repair.train.loop import TrainConfig, train


def _finetuned_file(backbone, path, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ctx = init_context(backbone, "a photo of a") + 0.05 * torch.randn(4, backbone.text_width, generator=generator)
    save_file({"ctx": ctx.to(dtype)}, path)
    return path


def test_zero_steps_returns_the_input_exactly(tmp_path, tiny_spec, backbone, image_dirs):
    ft = _finetuned_file(backbone, tmp_path / "ft.safetensors", dtype=torch.float16)
    outcome = run_repair(ft, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                         config=TrainConfig(max_steps=0), data_options=DataOptions(shots=4), if_no_gain="repair")
    assert outcome.train_result.steps == 0
    written = read_tensors(outcome.path).tensors["ctx"]
    assert written.dtype == torch.float16
    assert torch.equal(written, read_tensors(ft).tensors["ctx"])


def _reference_coop_steps(backbone, ctx_init, features, labels, classnames, config, steps_per_epoch):
    """Plain CoOp written out by hand: full 77-token prompts through encode_text's maths."""
    ctx = ctx_init.clone().requires_grad_(True)
    placeholder = " ".join(["X"] * ctx.shape[0])
    tokens = backbone.tokenize([f"{placeholder} {name}." for name in classnames])
    embeddings = backbone.model.token_embedding(tokens).detach()
    optimizer = torch.optim.SGD([ctx], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    from repair.train.loop import cosine_with_warmup

    total = config.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, steps_per_epoch))
    generator = torch.Generator().manual_seed(config.seed)
    model = backbone.model
    for _ in range(config.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), config.batch_size):
            index = order[start:start + config.batch_size]
            prompts = torch.cat([embeddings[:, :1], ctx.expand(len(classnames), -1, -1),
                                 embeddings[:, 1 + ctx.shape[0]:]], dim=1)
            x = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)
            x = model.ln_final(x)[torch.arange(len(classnames)), tokens.argmax(-1)] @ model.text_projection
            logits = backbone.logit_scale * features[index] @ F.normalize(x, dim=-1).t()
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return ctx.detach()


def test_without_constraints_the_loop_is_plain_coop(backbone, image_dirs):
    dataset = scan_image_folder(image_dirs["train"])
    data = extract_features(backbone, dataset)
    ctx_ft = init_context(backbone, "a photo of a")
    config = TrainConfig(epochs=3, batch_size=16, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup_steps=3, seed=3)
    kind = CoOpPrompts(backbone, ctx_ft, dataset.classnames, ["a photo of a {}."])
    train(kind, Objective(lam_zs=0.0, lam_lmc=0.0), data, config)
    expected = _reference_coop_steps(backbone, ctx_ft, data.features, data.labels, dataset.classnames, config,
                                     steps_per_epoch=3)
    assert not torch.allclose(expected, ctx_ft)  # it did train
    assert torch.allclose(kind.ctx.detach(), expected, atol=1e-5)


def test_loss_terms_follow_the_objective(backbone, image_dirs):
    from repair.train.objective import mergetune_loss

    dataset = scan_image_folder(image_dirs["train"])
    data = extract_features(backbone, dataset)
    torch.manual_seed(0)
    ctx_ft = init_context(backbone, "a photo of a") + 0.1 * torch.randn(4, backbone.text_width)
    kind = CoOpPrompts(backbone, ctx_ft, dataset.classnames, ["a photo of a {}."])
    with torch.no_grad():
        kind.ctx.add_(0.1 * torch.randn_like(kind.ctx))
    objective = Objective(lam_zs=2.0, lam_lmc=3.0, surrogate="feature")
    assert torch.allclose(objective.path_ts(), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))
    terms = mergetune_loss(kind, objective, data.features, data.labels)
    text = kind.class_features()
    ce = F.cross_entropy(kind.scale * data.features @ text.t(), data.labels)
    surrogate = 1 - F.cosine_similarity(text, kind.zero_shot_class_features(), dim=-1).mean()
    path = torch.stack([
        F.cross_entropy(kind.scale * data.features @ F.normalize(kind.ft_features + t * (text - kind.ft_features),
                                                                 dim=-1).t(), data.labels)
        for t in (0.1, 0.3, 0.5, 0.7, 0.9)]).mean()
    assert torch.allclose(terms.ce, ce, atol=1e-5)
    assert torch.allclose(terms.surrogate, surrogate, atol=1e-6)
    assert torch.allclose(terms.path, path, atol=1e-5)
    assert torch.allclose(terms.total, ce + 2.0 * surrogate + 3.0 * path, atol=1e-4)


def test_repair_metadata_round_trips_and_loads(tmp_path, tiny_spec, backbone, image_dirs):
    ft = _finetuned_file(backbone, tmp_path / "ft.safetensors")
    outcome = run_repair(ft, image_dirs["train"], tmp_path / "fixed.safetensors", backbone=backbone,
                         config=TrainConfig(epochs=2, batch_size=8, lr=0.01, seed=5),
                         data_options=DataOptions(shots=6, val_fraction=0.34), if_no_gain="repair")
    stored = read_tensors(outcome.path)
    record = Record.from_metadata(stored.metadata, outcome.path)
    assert stored.metadata["kind"] == "coop" and record.kind == "coop"
    assert record == outcome.record
    assert record.backbone.model == tiny_spec.model
    assert record.classnames == ["blue", "green", "red", "yellow"]
    assert record.inputs.checkpoint.sha256 == read_tensors(ft).sha256
    surrogate, lam_zs = CoOpPrompts.defaults.surrogate, CoOpPrompts.defaults.lam_zs  # unset: the kind's defaults
    assert record.objective == {"lam_zs": lam_zs, "lam_lmc": 1.0, "path_points": 5, "surrogate": surrogate}
    assert record.train["seed"] == 5 and record.seed == 5
    assert record.inputs.data.images == 16 and record.inputs.data.val_images == 8
    assert record.result["selected_epoch"] in (1, 2)
    assert {"mergetune", "torch", "open_clip"} <= record.versions.keys()
    assert stored.tensors["ctx"].shape == (4, backbone.text_width)

    classifier = load_repaired(outcome.path)  # backbone rebuilt from the metadata alone
    images = sorted((image_dirs["test"] / "red").iterdir())[:3]
    from PIL import Image

    predictions = classifier.predict([Image.open(path) for path in images])
    assert len(predictions) == 3 and set(predictions) <= set(record.classnames)
    assert torch.equal(classifier.kind.ctx.detach(), stored.tensors["ctx"])


def test_same_seed_gives_bit_identical_tensors_and_equal_metadata(tmp_path, backbone, image_dirs):
    ft = _finetuned_file(backbone, tmp_path / "ft.safetensors")
    outputs = []
    for name in ("a.safetensors", "b.safetensors"):
        outputs.append(run_repair(ft, image_dirs["train"], tmp_path / name, backbone=backbone,
                                  config=TrainConfig(epochs=2, batch_size=8), data_options=DataOptions(shots=5)).path)
    first, second = read_tensors(outputs[0]), read_tensors(outputs[1])
    assert torch.equal(first.tensors["ctx"], second.tensors["ctx"])
    assert first.metadata == second.metadata


def test_second_run_reuses_cached_features(tmp_path, backbone, image_dirs, monkeypatch):
    calls = []
    original = repair.data.features._encode_files
    monkeypatch.setattr(repair.data.features, "_encode_files", lambda *a, **k: calls.append(1) or original(*a, **k))
    dataset = scan_image_folder(image_dirs["test"])
    first = extract_features(backbone, dataset, cache_dir=tmp_path)
    second = extract_features(backbone, dataset, cache_dir=tmp_path)
    assert len(calls) == 1
    assert torch.equal(first.features, second.features)


def test_eval_takes_the_zero_shot_scale_from_options_as_from_flags(tmp_path, backbone, image_dirs):
    """A caller's logit scale reaches the zero-shot row whether it comes as flag-style overrides or as the
    kind's Options (it was read from a dict only, so Options left the zero-shot ECE at CLIP's scale)."""
    from types import MappingProxyType

    ft = _finetuned_file(backbone, tmp_path / "ft.safetensors")

    def zero_shot_row(kind_options):
        report = evaluate([ft], image_dirs["test"], backbone=backbone, kind_options=kind_options,
                          data_options=DataOptions(shots=None, cache_dir=None))
        return next(row for row in report["models"] if row["name"] == "zero-shot")

    default = zero_shot_row(None)
    as_flags = zero_shot_row({"logit_scale": 3.0})
    assert as_flags["base_ece"] != default["base_ece"]  # the scale changes calibration, not accuracy
    assert as_flags["base"] == default["base"]
    assert zero_shot_row(CoOpPrompts.Options(logit_scale=3.0)) == as_flags
    assert zero_shot_row(MappingProxyType({"logit_scale": 3.0})) == as_flags


def test_eval_numbers_equal_a_direct_computation(tmp_path, tiny_spec, backbone, image_dirs):
    ft = finetune("coop", image_dirs["train"], tmp_path / "ft.safetensors", backbone=backbone,
                  config=TrainConfig(epochs=5, batch_size=16, lr=0.05)).path
    report = evaluate([ft], image_dirs["test"], novel_dir=image_dirs["novel"], backbone=backbone,
                      data_options=DataOptions(shots=None, cache_dir=None))
    ctx = read_tensors(ft).tensors["ctx"]
    model = backbone.model

    def direct(folder, prompt_ctx):
        dataset = scan_image_folder(folder)
        from PIL import Image

        pixels = torch.stack([backbone.preprocess(Image.open(p).convert("RGB")) for p in dataset.files])
        with torch.no_grad():
            images = F.normalize(model.encode_image(pixels), dim=-1)
            if prompt_ctx is None:
                tokens = backbone.tokenize([f"a photo of a {name}." for name in dataset.classnames])
                text = F.normalize(model.encode_text(tokens), dim=-1)
            else:
                kind = CoOpPrompts(backbone, prompt_ctx, dataset.classnames, ["a photo of a {}."])
                text = kind.class_features()
        predictions = (images @ text.t()).argmax(-1)
        return 100.0 * float((predictions == torch.tensor(dataset.labels)).float().mean())

    rows = {row["name"]: row for row in report["models"]}
    assert rows["zero-shot"]["base"] == pytest.approx(direct(image_dirs["test"], None))
    assert rows["zero-shot"]["novel"] == pytest.approx(direct(image_dirs["novel"], None))
    assert rows["ft.safetensors"]["base"] == pytest.approx(direct(image_dirs["test"], ctx))
    assert rows["ft.safetensors"]["novel"] == pytest.approx(direct(image_dirs["novel"], ctx))
    base, novel = rows["ft.safetensors"]["base"], rows["ft.safetensors"]["novel"]
    expected_hm = 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
    assert rows["ft.safetensors"]["hm"] == pytest.approx(expected_hm)


def test_cached_features_are_memory_mapped(tmp_path, backbone, image_dirs):
    from repair.data.features import features_cache_file, map_cached_features

    dataset = scan_image_folder(image_dirs["test"])
    first = extract_features(backbone, dataset, cache_dir=tmp_path, normalize=False)
    path = features_cache_file(tmp_path, backbone.image_encoder, dataset)
    mapped = map_cached_features(path)
    assert mapped is not None and torch.equal(mapped, first.features)
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the entry is mapped into this process, not read into it
        assert str(path.resolve()) in maps.read_text()
    path.write_bytes(path.read_bytes()[:-8])  # a damaged entry is recomputed, not trusted
    again = extract_features(backbone, dataset, cache_dir=tmp_path, normalize=False)
    assert torch.equal(again.features, first.features)


def test_the_readme_defaults_table_is_what_the_kinds_declare():
    import re

    from repair.kinds import KINDS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Defaults\n", 1)[1].split("\n## ", 1)[0]
    rows = {name: cells for name, *cells in
            re.findall(r"^\| `([\w-]+)` \| `([\w-]+)` \| `?([\w.]+)`? \| (\d+) \| (\d+) \| ([\d.]+) \|", section,
                       flags=re.MULTILINE)}
    assert {"coop", "clipfit", "linear"} <= set(rows), "defaults rows missing from the README"
    for name, (surrogate, lam, steps, batch_size, step_size) in rows.items():
        defaults = KINDS[name].defaults
        assert surrogate == defaults.surrogate, name
        assert lam == (defaults.lam_zs if isinstance(defaults.lam_zs, str) else f"{defaults.lam_zs:g}"), name
        schedule = defaults.schedule
        assert (int(steps), int(batch_size), float(step_size)) == (
            schedule.steps, schedule.batch_size, schedule.step_size), name
