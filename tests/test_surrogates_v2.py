"""The zero-shot side beyond the diagonal: open-vocabulary, dense and K-FAC Fisher, distillation, lam_zs auto."""

from __future__ import annotations

from dataclasses import replace

import json

import pytest
import torch
from typer.testing import CliRunner

from repair import DataOptions, repair as run_repair
from repair.cli.app import app
from repair.data.features import extract_features, load_pixels
from repair.data.folders import scan_image_folder
from repair.errors import UsageError
from repair.kinds import CLIPFit, CoOpPrompts, LinearHead
from repair.kinds.linear import LinearOptions
from repair.train.curvature import (
    fisher_dense,
    fisher_diagonal,
    packaged_vocabulary,
    read_vocabulary,
    reference_vocabulary,
)
from repair.train.loop import TrainConfig
from repair.train.objective import Objective
from repair.train.select import AUTO_GRID, AUTO_TOLERANCE
from repair.train.surrogates import build_surrogate, refusals
from repair.workflows.run import resolve_surrogate
from tests.conftest import BASE, NOVEL

TEMPLATES = ["a photo of a {}."]
VOCAB = (*BASE, *NOVEL, "dog", "car", "tree")  # a small reference vocabulary keeps the text passes cheap
runner = CliRunner()


def features(backbone, image_dirs, shots=3):
    dataset = scan_image_folder(image_dirs["train"]).few_shot(shots, seed=0)
    return dataset, extract_features(backbone, dataset)


def moved_prompt(backbone, classnames, seed=0):
    kind = CoOpPrompts.zero_shot(backbone, classnames, TEMPLATES)
    with torch.no_grad():
        kind.ctx.add_(0.05 * torch.randn(kind.ctx.shape, generator=torch.Generator().manual_seed(seed)))
    return kind


def linear_head(backbone, classnames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(classnames), backbone.embed_dim, generator=generator)
    return LinearHead(backbone, weight, torch.randn(len(classnames), generator=generator), classnames, TEMPLATES,
                      LinearOptions(logit_scale=5.0))


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=1e-4), name


# ----------------------------------------------------------------------------- per-example gradients


@pytest.mark.parametrize("vocabulary", [None, VOCAB])
def test_vmap_and_loop_fisher_agree_for_a_prompt(backbone, image_dirs, vocabulary):
    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames)
    before = kind.snapshot()
    loop = fisher_diagonal(kind, data, seed=3, chunk=5, vocabulary=vocabulary, method="loop")
    vmapped = fisher_diagonal(kind, data, seed=3, chunk=5, vocabulary=vocabulary, method="vmap")
    one_forward = fisher_diagonal(kind, data, seed=3, chunk=5, vocabulary=vocabulary, method="vjp")
    assert float(loop["ctx"].abs().sum()) > 0
    assert_same(loop, vmapped)
    assert_same(loop, one_forward)
    assert torch.equal(kind.ctx.detach(), before["ctx"])  # evaluated at w_zs, restored after


def test_a_large_vocabulary_takes_smaller_gradient_chunks_with_the_same_fisher(backbone, image_dirs, monkeypatch):
    from repair.train import curvature

    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames)
    whole = fisher_diagonal(kind, data, seed=3, chunk=5, vocabulary=VOCAB, method="vmap")
    monkeypatch.setattr(curvature, "GRADIENT_PAIRS", 2 * len(VOCAB))  # two images per chunk
    assert curvature.gradient_chunk(kind, VOCAB, 5) == 2 and curvature.gradient_chunk(kind, VOCAB[:1], 5) == 5
    assert curvature.gradient_chunk(kind, VOCAB * 100, 5) == 1  # never zero
    assert_same(whole, fisher_diagonal(kind, data, seed=3, chunk=5, vocabulary=VOCAB, method="vmap"))


def test_vmap_and_loop_fisher_agree_for_a_linear_head_and_clipfit(backbone, image_dirs):
    dataset, data = features(backbone, image_dirs)
    head = linear_head(backbone, dataset.classnames)
    assert_same(fisher_diagonal(head, data, seed=1, method="loop"), fisher_diagonal(head, data, seed=1, method="vmap"))
    assert_same(fisher_diagonal(head, data, seed=1, method="loop"), fisher_diagonal(head, data, seed=1, method="vjp"))
    pixels = load_pixels(backbone, dataset)
    clipfit = CLIPFit.zero_shot(backbone, dataset.classnames, TEMPLATES)
    loop = fisher_diagonal(clipfit, pixels, seed=1, chunk=4, vocabulary=VOCAB, method="loop")
    auto = fisher_diagonal(clipfit, pixels, seed=1, chunk=4, vocabulary=VOCAB, method="auto")
    assert_same(loop, auto, atol=1e-5)


def test_auto_gradients_match_the_loop_on_hugging_face_and_batchnorm_towers(hf_backbone, cnn_backbone, image_dirs):
    dataset, data = features(hf_backbone, image_dirs, shots=2)
    prompt = CoOpPrompts(hf_backbone, 0.02 * torch.randn(2, hf_backbone.text_width,
                                                         generator=torch.Generator().manual_seed(0)),
                         dataset.classnames, TEMPLATES, ctx_init_words(hf_backbone))
    assert_same(_fisher_at(prompt, data, "loop"), _fisher_at(prompt, data, "auto"))
    dataset = scan_image_folder(image_dirs["train"]).few_shot(2, seed=0)
    pixels = load_pixels(cnn_backbone, dataset)
    clipfit = CLIPFit.zero_shot(cnn_backbone, dataset.classnames, TEMPLATES)
    assert_same(fisher_diagonal(clipfit, pixels, seed=2, method="loop"),
                fisher_diagonal(clipfit, pixels, seed=2, method="auto"), atol=1e-5)


def ctx_init_words(backbone):
    from repair.kinds.coop import CoOpOptions

    return CoOpOptions(ctx_init="a photo")


def _fisher_at(kind, data, method):
    return fisher_diagonal(kind, data, seed=2, chunk=3, method=method)


def test_an_unknown_gradient_method_is_refused(backbone, image_dirs):
    dataset, data = features(backbone, image_dirs)
    with pytest.raises(ValueError, match="vmap"):
        fisher_diagonal(linear_head(backbone, dataset.classnames), data, method="jacobian")


# ----------------------------------------------------------------------------- dense and K-FAC


def test_the_dense_fishers_diagonal_is_the_diagonal_fisher(backbone, image_dirs):
    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames)
    dense = fisher_dense(kind, data, seed=4, vocabulary=VOCAB)
    diagonal = fisher_diagonal(kind, data, seed=4, vocabulary=VOCAB)
    assert dense.shape == (kind.num_trainable(), kind.num_trainable())
    assert torch.allclose(dense, dense.t(), atol=1e-7)
    assert torch.allclose(dense.diagonal(), diagonal["ctx"].reshape(-1), atol=1e-7, rtol=1e-4)
    assert float(dense.abs().sum() - dense.diagonal().abs().sum()) > 0  # it does carry off-diagonal curvature


def test_kfac_equals_the_dense_fisher_for_one_sample_of_a_linear_head(backbone, image_dirs):
    dataset, data = features(backbone, image_dirs)
    one = type(data)(features=data.features[:1], labels=data.labels[:1])
    head = linear_head(backbone, dataset.classnames)
    kfac = build_surrogate("kfac", head, one, seed=5)
    dense = build_surrogate("fisher-dense", head, one, seed=5)
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        head.load_values({name: value + torch.randn(value.shape, generator=generator)
                          for name, value in head.zero_shot_values().items()})
        output = head(data.features)
        assert torch.allclose(kfac(head, output), dense(head, output), rtol=1e-4, atol=1e-6)
    # and the matrices: G (x) A in the head's row-major [W | b] order is the dense Fisher, up to that order
    factors = kfac.constants
    matrix = torch.kron(factors["G"], factors["A"])
    classes, width = head.weight.shape
    order = [c * (width + 1) + j for c in range(classes) for j in range(width)] + \
            [c * (width + 1) + width for c in range(classes)]
    assert torch.allclose(matrix[order][:, order], dense.constants["dense"], atol=1e-6, rtol=1e-4)


def test_the_dense_fisher_and_kfac_refuse_kinds_they_cannot_take_in_one_line(backbone, image_dirs):
    dataset, _ = features(backbone, image_dirs)
    prompt = moved_prompt(backbone, dataset.classnames)
    with pytest.raises(UsageError, match="--surrogate kfac does not apply.*linear head.*use --surrogate feature or"):
        resolve_surrogate(Objective(surrogate="kfac", lam_zs=1.0), prompt)
    assert "fisher-dense" not in refusals(prompt) and "kfac" in refusals(prompt)
    big = CoOpPrompts(backbone, torch.zeros(len(dataset.classnames), 70, backbone.text_width), dataset.classnames,
                      TEMPLATES)
    assert "8,192" in refusals(big)["fisher-dense"]  # more than DENSE_LIMIT numbers (and no zero-shot point)
    random_init = CoOpPrompts(backbone, torch.zeros(7, backbone.text_width), dataset.classnames, TEMPLATES)
    assert {"fisher", "fisher-vocab", "distill", "l2"} <= set(refusals(random_init))


# ----------------------------------------------------------------------------- vocabulary and distillation


def test_the_reference_vocabulary_puts_the_repair_classes_first(tmp_path):
    packaged = packaged_vocabulary()
    assert len(packaged) == len(set(packaged)) >= 990 and "goldfish" in packaged
    vocabulary = reference_vocabulary(["goldfish", "blue"])
    assert vocabulary[:2] == ("goldfish", "blue") and vocabulary.count("goldfish") == 1
    path = tmp_path / "concepts.txt"
    path.write_text("# generic\ndog\n\ncar\ndog\n")
    assert read_vocabulary(path) == ["dog", "car"]
    assert reference_vocabulary(["red"], read_vocabulary(path)) == ("red", "dog", "car")


def test_distillation_is_zero_at_w_zs_and_pulls_back_to_it(backbone, image_dirs, monkeypatch):
    from repair.train.surrogates import DistillSurrogate, VocabularySample

    monkeypatch.setattr(DistillSurrogate, "text_bound", VocabularySample(len(VOCAB), 4))  # all names, every step
    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames)
    surrogate = build_surrogate("distill", kind, data, seed=0, vocabulary=VOCAB[len(BASE):])
    assert surrogate.constants["log_p_zs"].shape == (len(data), len(VOCAB))
    assert surrogate.stats["vocabulary"]["classes"] == len(VOCAB)
    moved = surrogate(kind, kind(data.features))
    assert float(moved.detach()) > 0
    (grad,) = torch.autograd.grad(moved, [kind.ctx])
    assert float((grad * (kind.ctx.detach() - kind.zero_shot_values()["ctx"])).sum()) > 0  # descent heads to w_zs
    kind.load_values(kind.zero_shot_values())
    assert abs(float(surrogate(kind, kind(data.features)).detach())) < 1e-6


def test_open_vocabulary_terms_on_a_linear_head_use_its_own_classes(backbone, image_dirs):
    dataset, data = features(backbone, image_dirs)
    head = linear_head(backbone, dataset.classnames)
    surrogate = build_surrogate("fisher-vocab", head, data, seed=0)
    assert surrogate.stats["vocabulary"] == {"classes": len(dataset.classnames), "scope": "the repair classes"}
    assert_same(surrogate.fisher, fisher_diagonal(head, data, seed=0))


def test_new_surrogates_are_cached_on_disk_per_surrogate(backbone, image_dirs, tmp_path):
    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames)
    first = build_surrogate("fisher-dense", kind, data, cache_key="k", cache_dir=tmp_path, vocabulary=VOCAB)
    again = build_surrogate("fisher-dense", kind, data, cache_key="k", cache_dir=tmp_path, vocabulary=VOCAB)
    assert not first.stats["from_cache"] and again.stats["from_cache"]
    assert torch.equal(first.constants["dense"], again.constants["dense"])
    other = build_surrogate("fisher-dense", kind, data, cache_key="k", cache_dir=tmp_path, vocabulary=VOCAB[:-1])
    assert not other.stats["from_cache"]  # another vocabulary is another entry
    assert len(list((tmp_path / "fisher").glob("*.safetensors"))) == 2

    vocab_fisher = build_surrogate("fisher-vocab", kind, data, cache_key="k", cache_dir=tmp_path, vocabulary=VOCAB)
    assert vocab_fisher.stats["from_cache"]  # the dense entry's diagonal: no second pass of gradients
    assert torch.equal(vocab_fisher.fisher["ctx"].reshape(-1), torch.diagonal(first.constants["dense"]))
    assert len(list((tmp_path / "fisher").glob("*.safetensors"))) == 2


# ----------------------------------------------------------------------------- lam_zs auto


def test_lam_zs_auto_picks_on_held_out_shots_and_records_the_curve(tmp_path, backbone, image_dirs):
    from safetensors.torch import save_file

    dataset = scan_image_folder(image_dirs["train"])
    weight = torch.randn(len(dataset.classnames), backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    ft = tmp_path / "head.safetensors"
    save_file({"weight": weight, "bias": torch.zeros(len(dataset.classnames))}, ft)
    outcome = run_repair(ft, image_dirs["train"], tmp_path / "fixed.safetensors", backbone=backbone,
                         objective=Objective(lam_zs="auto", surrogate="kfac"), config=TrainConfig(epochs=2, batch_size=8),
                         data_options=DataOptions(shots=8), kind="linear")
    record = outcome.record
    auto = record.result["lam_zs_auto"]
    assert [point["lam_zs"] for point in auto["curve"]] == list(AUTO_GRID)
    unconstrained = auto["curve"][0]  # the reference: the lam_zs = 0 repair of the same shots
    assert unconstrained["lam_zs"] == 0.0 and auto["reference_base_accuracy"] == unconstrained["base_accuracy"]
    eligible = [p for p in auto["curve"] if p["base_accuracy"] >= auto["reference_base_accuracy"] - AUTO_TOLERANCE]
    best = max(eligible, key=lambda p: (p["zero_shot_agreement"], p["lam_zs"]))
    assert record.objective["lam_zs"] == auto["chosen"] == best["lam_zs"]
    assert auto["held_out_images"] == 2 * len(dataset.classnames)  # a quarter of 8 shots per class
    assert record.result["surrogate_build"]["surrogate"] == "kfac"


def test_lam_zs_auto_leaves_out_a_value_whose_repair_diverges(backbone, image_dirs):
    from repair.train.select import choose_lam_zs

    dataset, data = features(backbone, image_dirs, shots=4)
    kind = linear_head(backbone, dataset.classnames)
    start = kind.snapshot()
    objective = Objective(lam_zs="auto", surrogate="l2")
    sgd = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.002)  # Adam's bounded steps would not diverge
    chosen, auto = choose_lam_zs(kind, objective, data, sgd, None, grid=(0.0, 1e38))
    assert "diverged" in auto["curve"][1] and "inf" in auto["curve"][1]["diverged"]
    assert chosen == auto["chosen"] == 0.0 and "base_accuracy" in auto["curve"][0]
    assert auto["reference"] == "lam_zs 0 repair"
    _, without_zero = choose_lam_zs(kind, objective, data, replace(sgd, epochs=1), None, grid=(1.0,))
    assert without_zero["reference"] == "fine-tuned"
    assert without_zero["reference_base_accuracy"] == without_zero["finetuned_base_accuracy"]
    assert_same(kind.snapshot(), start, atol=0.0)  # left at w_ft


def test_lam_zs_auto_on_the_command_line_and_its_one_line_errors(tmp_path, tiny_spec, image_dirs):
    from safetensors.torch import save_file

    prompt = tmp_path / "prompt.safetensors"
    save_file({"ctx": 0.02 * torch.randn(4, 32, generator=torch.Generator().manual_seed(0))}, prompt)
    concepts = tmp_path / "concepts.txt"
    concepts.write_text("dog\ncar\n")
    common = ["--data", image_dirs["train"], "--model", tiny_spec.model, "--shots", "4", "--epochs", "1",
              "--batch-size", "16"]
    bad = runner.invoke(app, [str(a) for a in ["repair", prompt, "--out", tmp_path / "x.safetensors", *common,
                                               "--lam-zs", "strong"]])
    assert bad.exit_code == 2 and "strong" in bad.output and "auto" in bad.output
    assert "Traceback" not in bad.output
    missing = runner.invoke(app, [str(a) for a in ["repair", prompt, "--out", tmp_path / "y.safetensors", *common,
                                                   "--vocabulary", tmp_path / "nowhere.txt"]])
    assert missing.exit_code == 6 and len(missing.output.strip().splitlines()) == 1, missing.output
    out = tmp_path / "fixed.safetensors"
    good = runner.invoke(app, [str(a) for a in ["repair", prompt, "--out", out, *common, "--lam-zs", "auto",
                                                "--surrogate", "distill", "--vocabulary", concepts,
                                                "--ctx-init", "a photo of a", "--if-no-gain", "repair", "--json"]])
    assert good.exit_code == 0, good.output
    record = json.loads(good.stdout)
    assert record["objective"]["lam_zs"] == record["result"]["lam_zs_auto"]["chosen"]
    assert record["result"]["lam_zs_auto"]["agreement_classes"] == len(BASE) + 2
    assert record["result"]["surrogate_build"]["vocabulary"]["classes"] == len(BASE) + 2
    again = runner.invoke(app, [str(a) for a in ["repair", prompt, "--out", out, *common, "--lam-zs", "auto"]])
    assert again.exit_code == 8  # never overwrites without --force


# ----------------------------------------------------------------------------- the fast open-vocabulary terms


def _all_logit_gradients(kind, images, vocabulary):
    """[n, V, P] gradients of every image's logit of every name, one backward each: the reference."""
    from repair.train.curvature import vocabulary_logits

    rows = []
    for image in images:
        per_name = []
        for name in vocabulary:
            logit = vocabulary_logits(kind, image.unsqueeze(0), [name])[0, 0]
            (grad,) = torch.autograd.grad(logit, [kind.ctx])
            per_name.append(grad.reshape(-1))
        rows.append(torch.stack(per_name))
    return torch.stack(rows)


def test_the_draws_fisher_is_unbiased_for_the_exact_fisher_and_matches_its_gradients(backbone, image_dirs):
    from repair.train import curvature

    dataset, data = features(backbone, image_dirs, shots=2)
    kind = moved_prompt(backbone, dataset.classnames)
    images = data.features
    with curvature.AtZeroShot(kind):
        grads = _all_logit_gradients(kind, images, VOCAB)
        with torch.no_grad():
            probs = torch.softmax(curvature.vocabulary_logits(kind, images, VOCAB).float(), dim=-1)
        draws = curvature.sampled_label_draws(kind, images, VOCAB, 5, curvature.FISHER_DRAWS)
    centred = grads - torch.einsum("iy,iyk->ik", probs, grads)[:, None]
    exact = torch.einsum("iy,iyk,iyl->kl", probs, centred, centred) / len(images)
    # the expectation of two independent draws' 0.5 (a_y - a_y')(a_y - a_y')^T, enumerated, is the exact Fisher
    pairs = grads[:, :, None] - grads[:, None, :]
    expected = 0.5 * torch.einsum("iy,iz,iyzk,iyzl->kl", probs, probs, pairs, pairs) / len(images)
    assert torch.allclose(expected, exact, atol=1e-5 * float(exact.abs().max()))
    # and the estimate is the sample covariance of the drawn labels' gradients (k draws per image)
    drawn = grads[torch.arange(len(images))[:, None], draws]
    rows = (drawn - drawn.mean(dim=1, keepdim=True)).flatten(0, 1) / (draws.shape[1] - 1) ** 0.5
    dense = fisher_dense(kind, data, seed=5, vocabulary=VOCAB, estimator="draws")
    assert torch.allclose(dense, rows.t() @ rows / len(images), atol=1e-5 * float(dense.abs().max()))
    diagonal = fisher_diagonal(kind, data, seed=5, vocabulary=VOCAB, estimator="draws")["ctx"].reshape(-1)
    assert torch.allclose(diagonal, dense.diagonal(), atol=1e-6 * float(dense.abs().max()))
    with pytest.raises(ValueError, match="estimator"):
        fisher_diagonal(kind, data, vocabulary=VOCAB, estimator="exact")


def test_the_vocabulary_fishers_use_draws_and_their_own_cache_entries(backbone, image_dirs, tmp_path):
    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames)
    dense = build_surrogate("fisher-dense", kind, data, seed=2, vocabulary=VOCAB, cache_key="k", cache_dir=tmp_path)
    assert torch.equal(dense.constants["dense"], fisher_dense(kind, data, seed=2, vocabulary=reference_vocabulary(
        dataset.classnames, VOCAB), estimator="draws"))
    # an entry of the one-label estimator (another identity) is never read back as this one
    from repair.train import surrogates

    assert surrogates.DenseFisherSurrogate.cache_variant() != surrogates.FisherSurrogate.cache_variant()


def _sampled_distill(backbone, image_dirs, monkeypatch, take_all=2, block=3):
    from repair.train.surrogates import DistillSurrogate, VocabularySample

    monkeypatch.setattr(DistillSurrogate, "text_bound", VocabularySample(take_all, block))
    dataset, data = features(backbone, image_dirs)
    kind = moved_prompt(backbone, dataset.classnames, seed=1)
    surrogate = build_surrogate("distill", kind, data, seed=0, vocabulary=VOCAB)
    return kind, surrogate


def _exact_distill(kind, surrogate):
    from repair.train.curvature import vocabulary_logits
    from repair.train.surrogates import exact_kl

    return exact_kl(surrogate.constants["log_p_zs"], vocabulary_logits(kind, surrogate.images, surrogate.vocabulary))


def test_sampled_distillation_is_the_exact_kl_where_its_reference_is_current(backbone, image_dirs, monkeypatch):
    kind, surrogate = _sampled_distill(backbone, image_dirs, monkeypatch)
    sampled = surrogate.sampled
    assert sampled is not None and len(sampled.blocks) == 3  # 11 names: 2 always, 9 in blocks of 3
    assert sorted(torch.cat([sampled.always, *sampled.blocks]).tolist()) == list(range(len(VOCAB)))
    exact = float(_exact_distill(kind, surrogate).detach())
    assert exact > 1e-3
    start = kind.snapshot()
    surrogate(kind, None)
    first_queue = list(sampled.queue)
    for _ in range(2 * len(sampled.blocks)):  # held at one w, every step (every block) gives the exact value
        assert float(surrogate(kind, None).detach()) == pytest.approx(exact, rel=1e-5, abs=1e-7)
    # moved: an estimate; once each block has been scored at the new w, the reference is current again
    with torch.no_grad():
        kind.ctx.add_(0.05 * torch.randn(kind.ctx.shape, generator=torch.Generator().manual_seed(3)))
    moved_exact = float(_exact_distill(kind, surrogate).detach())
    assert moved_exact != pytest.approx(exact, rel=1e-3)
    for _ in range(len(sampled.queue) + len(sampled.blocks)):  # the round under way, then a whole one
        surrogate(kind, None)
    assert float(surrogate(kind, None).detach()) == pytest.approx(moved_exact, rel=1e-5, abs=1e-7)
    (grad,) = torch.autograd.grad(surrogate(kind, None), [kind.ctx])
    assert float(grad.abs().sum()) > 0  # differentiable through the scored names
    # back at the build's w (a repair starting over): the same values as the first run, in the same order
    kind.load_values(start)
    again = [float(surrogate(kind, None).detach()) for _ in range(3)]
    assert again == pytest.approx([exact] * 3, rel=1e-5, abs=1e-7)
    assert surrogate.sampled.queue == first_queue


def test_sampled_distillation_is_exact_for_a_drift_common_to_every_name():
    from repair.train.surrogates import exact_kl, sampled_kl

    generator = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(3 * torch.randn(5, 40, generator=generator), dim=-1)
    reference = 2 * torch.randn(5, 40, generator=generator)
    always, block = torch.tensor([3, 7]), torch.tensor([0, 11, 22, 33])
    shift = torch.randn(5, 1, generator=generator)  # per image: the softmax, so the KL, does not move
    now = reference + shift
    estimate = sampled_kl(log_q, reference, always, block, now[:, torch.cat([always, block])])
    assert float(estimate) == pytest.approx(float(exact_kl(log_q, now)), rel=1e-5)
    # the always-scored names moving on their own, the rest together: exact too
    other = now.clone()
    other[:, always] += 1.0
    estimate = sampled_kl(log_q, reference, always, block, other[:, torch.cat([always, block])])
    assert float(estimate) == pytest.approx(float(exact_kl(log_q, other)), rel=1e-5)
    # a name outside the step's block moving on its own is not seen: an estimate, not the exact value
    other[:, 5] += 2.0
    estimate = sampled_kl(log_q, reference, always, block, other[:, torch.cat([always, block])])
    assert float(estimate) != pytest.approx(float(exact_kl(log_q, other)), rel=1e-3)


def test_a_short_vocabulary_is_distilled_whole(backbone, image_dirs, monkeypatch):
    kind, surrogate = _sampled_distill(backbone, image_dirs, monkeypatch, take_all=8, block=8)
    assert surrogate.sampled is None
    assert float(surrogate(kind, None).detach()) == pytest.approx(float(_exact_distill(kind, surrogate).detach()),
                                                                rel=1e-6)


def test_the_step_encodes_distillations_names_in_the_prompts_own_text_pass(backbone, image_dirs, monkeypatch):
    from repair.train.objective import mergetune_loss

    kind, surrogate = _sampled_distill(backbone, image_dirs, monkeypatch)
    twin = build_surrogate("distill", kind, features(backbone, image_dirs)[1], seed=0, vocabulary=VOCAB)
    objective = Objective(lam_zs=1.0, surrogate="distill")
    inputs, labels = surrogate.images[:6], torch.arange(6) % len(kind.classnames)
    passes = []
    encode = CoOpPrompts._text_features
    monkeypatch.setattr(CoOpPrompts, "_text_features",
                        lambda self, ctx, bank: passes.append(bank.num_classes) or encode(self, ctx, bank))
    terms = mergetune_loss(kind, objective, inputs, labels, surrogate)
    names = len(surrogate.sampled.always) + len(surrogate.sampled.blocks[0])
    assert passes == [len(kind.classnames) + names]  # one pass: the classes, then the step's names
    # the same values as the kind's forward and the surrogate's own text pass, taken apart
    output = kind(inputs)
    assert float(twin(kind, output).detach()) == pytest.approx(float(terms.surrogate.detach()), rel=1e-5, abs=1e-7)
    assert torch.allclose(output.logits, kind(inputs).logits)
    (merged,) = torch.autograd.grad(terms.surrogate, [kind.ctx])
    (apart,) = torch.autograd.grad(build_surrogate("distill", kind, features(backbone, image_dirs)[1], seed=0,
                                                   vocabulary=VOCAB)(kind, kind(inputs)), [kind.ctx])
    # one text pass against two sums in another order: float32 rounding, on the scale of the gradient's largest entry
    torch.testing.assert_close(merged, apart, rtol=1e-4, atol=1e-5 * float(apart.abs().max()))
    assert kind._alongside is None and kind._alongside_features is None  # nothing kept past the step


@pytest.mark.parametrize("position", ["end", "middle"])
def test_a_prompts_batched_pair_gradients_equal_the_class_by_class_pull_back(backbone, image_dirs, position,
                                                                           monkeypatch):
    from repair.kinds.base import Kind
    from repair.kinds.coop import CoOpOptions
    from repair.train.curvature import logit_gradients

    dataset, data = features(backbone, image_dirs)
    kind = CoOpPrompts.zero_shot(backbone, dataset.classnames, TEMPLATES,
                                 CoOpOptions(class_token_position=position))
    with torch.no_grad():
        kind.ctx.add_(0.05 * torch.randn(kind.ctx.shape, generator=torch.Generator().manual_seed(0)))
    labels = torch.randint(0, len(VOCAB), (len(data.features), 3), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr("repair.kinds.coop.PAIR_ROWS", 4)  # several chunks of rows
    batched = logit_gradients(kind, data.features, VOCAB, labels)
    monkeypatch.setattr(CoOpPrompts, "pair_logit_gradients", Kind.pair_logit_gradients)
    by_class = logit_gradients(kind, data.features, VOCAB, labels)
    assert batched["ctx"].shape == (len(data.features), 3, *kind.ctx.shape)
    assert float(by_class["ctx"].abs().max()) > 0
    assert torch.allclose(batched["ctx"], by_class["ctx"], rtol=1e-4, atol=1e-4)  # float rounding of values to ~10


def test_a_kind_that_trains_the_image_tower_scores_each_images_own_names_and_refreshes_them(
        backbone, image_dirs, monkeypatch):
    """CLIPFit moves every name's logits with the images: each image's names of most mass are scored at every
    step, and every name's reference is re-scored every ``refresh_every`` steps, after which the value is exact."""
    from repair.train.surrogates import DistillSurrogate, VocabularySample

    dataset = scan_image_folder(image_dirs["train"]).few_shot(2, seed=0)
    pixels = load_pixels(backbone, dataset)
    clipfit = CLIPFit.zero_shot(backbone, dataset.classnames, TEMPLATES)
    assert DistillSurrogate.sample_for(clipfit) is DistillSurrogate.image_bound
    monkeypatch.setattr(DistillSurrogate, "image_bound", VocabularySample(take_all=2, block=2, per_image=True,
                                                                         refresh_every=2))
    with torch.no_grad():
        for tensor in clipfit.trainable().values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(1)))
    vocabulary = (*VOCAB, "cat", "boat", "house", "bird", "river", "road", "cloud", "chair", "lamp", "bread", "shoe",
                  "clock", "piano", "stone", "apple", "window", "bridge", "horse", "train", "flower")
    surrogate = build_surrogate("distill", clipfit, pixels, seed=0, vocabulary=vocabulary)
    sampled = surrogate.sampled
    assert sampled is not None, f"{len(pixels)} images: a sample of {len(vocabulary)} names"
    teacher, student = sampled.log_q.exp(), torch.softmax(sampled.reference, dim=-1)
    own = torch.maximum(teacher, student).topk(2, dim=-1).indices
    assert set(own.flatten().tolist()) == set(sampled.always.tolist())  # every image's own two names
    assert sorted(torch.cat([sampled.always, *sampled.blocks]).tolist()) == list(range(len(vocabulary)))
    exact = float(_exact_distill(clipfit, surrogate).detach())
    assert float(surrogate(clipfit, None).detach()) == pytest.approx(exact, rel=1e-4, abs=1e-6)  # the build's w: exact
    with torch.no_grad():
        for tensor in clipfit.trainable().values():
            tensor.add_(0.3 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(2)))
    moved = float(_exact_distill(clipfit, surrogate).detach())
    estimate = float(surrogate(clipfit, None).detach())  # step 2: the reference of the names not scored is stale
    assert estimate != pytest.approx(moved, rel=1e-2)
    refreshed = float(surrogate(clipfit, None).detach())  # step 3: every name re-scored first
    assert refreshed == pytest.approx(moved, rel=1e-4, abs=1e-6)
