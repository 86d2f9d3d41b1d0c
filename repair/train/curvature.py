"""Curvature at ``w_zs`` from unlabelled images: per-example gradients, Fisher forms, the reference vocabulary.

The Fisher of a classifier is ``E_x E_{y ~ p_zs(y|x)} [g g^T]`` with ``g = d log p(y|x) / dw`` at ``w_zs``;
labels are drawn from the zero-shot model's own predictions, so no labels are needed. What ``p`` is
a distribution over decides which directions count: the repair classes only (what ``fisher`` has always
done) or a broad *reference vocabulary* (the repair classes plus generic concepts, closer to CLIP's
open-vocabulary contrastive pretraining). Three forms of the same matrix:

- diagonal: ``E[g^2]``, one number per trainable number (any kind);
- dense: ``E[g g^T]`` for kinds with few trainable numbers (a CoOp prompt: 2,048 at ViT-B/16);
- Kronecker-factored (K-FAC) for a linear head: ``E[d d^T] (x) E[x x^T]``, with ``d = p - onehot(y)`` the
  gradient at the logits and ``x`` the (scaled, bias-augmented) input: the exact structure of a linear
  layer's Gauss-Newton, exact for one sample.

Two estimators of the same expected Fisher ``E_x Cov_{y ~ p(.|x)}[dz_y/dw]`` (``z`` the logits):

- ``label`` (the default): one label per image, ``g = dz_y/dw - E_p[dz/dw]``; the mean runs over every
  scored class, so each image pulls back through the whole class list.
- ``draws``: ``k`` labels drawn independently per image (:data:`FISHER_DRAWS`) and the sample covariance of
  their logit gradients, ``1/(k-1) sum_k (dz_k/dw - mean)^2`` (outer products for the dense form):
  unbiased for the same matrix, each image touching ``k`` classes instead of all of them, which is what a
  1,005-name vocabulary needs (the open-vocabulary surrogates use it). Per coordinate its variance is
  ``(kurt/k - (k-3)/(k(k-1))) var^2`` against ``label``'s ``(kurt - 1) var^2``: at k = 4, lower unless the
  gradient's kurtosis is below about 1.2 (a near two-point distribution).

Per-example gradients come from torch.func over the kind's trainable tensors
(:func:`torch.func.functional_call`): for the dense Fisher and the reference vocabulary on image
features, one forward and a batched pull-back of each image's cotangent (``vjp``); otherwise
``vmap(grad(...))``; where neither can trace, a Python loop of backward passes (the reference, also used
by the tests) gives the same numbers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from repair.data.features import Features
from repair.errors import DataError
from repair.kinds.base import Kind

FISHER_IMAGES = 64  # the most images one Fisher estimate uses (a seeded sample beyond that)
DENSE_LIMIT = 8192  # the most trainable numbers a dense Fisher takes (8,192^2 floats = 256 MiB)
# image x class-prompt pairs in one vmap chunk of per-example gradients: the batched backward carries one
# cotangent per pair through the text tower (32 images x 1,005 vocabulary prompts took 16 GiB on the proxy)
GRADIENT_PAIRS = 2048
GRADIENT_METHODS = ("auto", "vjp", "vmap", "loop")
ESTIMATORS = ("label", "draws")
FISHER_DRAWS = 4  # labels drawn per image by the ``draws`` estimator (its sample covariance)
DRAW_NUMBERS = 2 ** 24  # the most gradient numbers one chunk of drawn labels holds (64 MiB)
LOOPED_ROWS = 4  # per-row gradients of at most this many rows run as a loop of backward passes

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the reference vocabulary


def packaged_vocabulary() -> list[str]:
    """The 1,000 ImageNet class names open_clip ships (duplicates such as 'crane' kept once)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # lazy: open_clip is a heavy import

    return list(dict.fromkeys(IMAGENET_CLASSNAMES))


def read_vocabulary(path: str | Path) -> list[str]:
    """Concept names from a text file, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the vocabulary file ({exc.__class__.__name__})") from None
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise DataError(f"{path}: the vocabulary file has no names (one per line)")
    return list(dict.fromkeys(names))


def reference_vocabulary(classnames: Sequence[str], extra: Sequence[str] | None = None) -> tuple[str, ...]:
    """The repair classes first (so label ``c < C`` is repair class ``c``), then the generic concepts
    (``extra``, default :func:`packaged_vocabulary`) not already among them."""
    generic = packaged_vocabulary() if extra is None else list(extra)
    return tuple(dict.fromkeys([*classnames, *generic]))


def scores_vocabulary(kind: Kind) -> bool:
    """Whether ``kind`` scores an arbitrary class list (a linear head or a class-specific prompt does not:
    for them the reference vocabulary is their own classes)."""
    overridden = type(kind).open_vocabulary_logits is not Kind.open_vocabulary_logits
    return kind.scores_other_classes() and (kind.input_kind != "pixels" or overridden)


def vocabulary_logits(kind: Kind, inputs: torch.Tensor, vocabulary: Sequence[str] | None) -> torch.Tensor:
    """Logits of ``forward``'s inputs over ``vocabulary`` (None or not scorable: the kind's own classes),
    differentiable in the trainable tensors."""
    if vocabulary is None or list(vocabulary) == list(kind.classnames) or not scores_vocabulary(kind):
        return kind(inputs).logits
    return kind.open_vocabulary_logits(inputs, list(vocabulary))


class _Scores(nn.Module):
    """The kind's logits over a vocabulary as a module, so :func:`torch.func.functional_call` can swap ``w``."""

    def __init__(self, kind: Kind, vocabulary: Sequence[str] | None) -> None:
        super().__init__()
        self.kind = kind
        self.vocabulary = None if vocabulary is None else tuple(vocabulary)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return vocabulary_logits(self.kind, inputs, self.vocabulary)


# ----------------------------------------------------------------------------- samples and labels


def fisher_images(count: int, seed: int, limit: int = FISHER_IMAGES) -> torch.Tensor | None:
    """Which images estimate the Fisher: all up to ``limit``, else a seeded sample of ``limit``.

    One gradient per image costs a backward pass through every class prompt (CoOp, CLIPFit), so
    a Tiny-ImageNet-sized repair set (1,600 images, 100 classes) would take a quarter of an hour on
    two cores; a few hundred samples estimate a diagonal expectation well.
    """
    if count <= limit:
        return None
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def gradient_chunk(kind: Kind, vocabulary: Sequence[str] | None, chunk: int) -> int:
    """Images per chunk of per-example gradients, so that chunk x scored classes stays within
    :data:`GRADIENT_PAIRS`: the same work in more, smaller passes when the vocabulary is large."""
    classes = len(vocabulary) if vocabulary is not None else len(kind.classnames)
    return max(1, min(chunk, GRADIENT_PAIRS // max(classes, 1)))


def chosen_images(data: Features, seed: int, limit: int = FISHER_IMAGES) -> torch.Tensor:
    chosen = fisher_images(len(data), seed, limit)
    return data.features if chosen is None else data.features[chosen]


class AtZeroShot:
    """Context: the kind evaluated at ``w_zs``, restored to its current values afterwards."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind

    def __enter__(self) -> Kind:
        self.saved = self.kind.snapshot()
        self.kind.load_values(self.kind.zero_shot_values())
        return self.kind

    def __exit__(self, *_: object) -> None:
        self.kind.load_values(self.saved)


@torch.no_grad()
def sampled_labels(scores: nn.Module, images: torch.Tensor, seed: int, chunk: int) -> torch.Tensor:
    """Labels drawn from the model's own predictions, chunk by chunk from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for start in range(0, len(images), chunk):
        probs = F.softmax(scores(images[start:start + chunk]).float(), dim=-1)
        labels.append(torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1))
    return torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def sampled_label_draws(kind: Kind, images: torch.Tensor, vocabulary: Sequence[str], seed: int,
                        draws: int) -> torch.Tensor:
    """``draws`` labels per image drawn independently (with replacement) from the model's predictions over
    ``vocabulary``: [n, draws]. One scoring pass for all images (the vocabulary's text side runs once)."""
    if len(images) == 0:
        return torch.zeros(0, draws, dtype=torch.long)
    probs = F.softmax(vocabulary_logits(kind, images, vocabulary).float(), dim=-1)
    return torch.multinomial(probs.cpu(), draws, replacement=True, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- per-example gradients


def logit_gradients(kind: Kind, images: torch.Tensor, vocabulary: Sequence[str], labels: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
    """``dz(x_i, vocabulary[labels[i, k]]) / dw`` for every image ``i`` and draw ``k``: ``{name: [n, k, *shape]}``.

    The kind's batched pairs where it has them (:meth:`~repair.kinds.base.Kind.pair_logit_gradients`: a prompt,
    one text pass for every pair); else one forward per distinct class among the labels, over the images that
    drew it, and one pull-back per (image, class) pair through that single class's encoding: each draw costs
    one class's text pass, not the whole vocabulary's. (A kind caches what it builds for each class list it
    scores: here single names, at most the vocabulary's own size.)
    """
    parameters = kind.trainable()
    count, draws = labels.shape
    rows = torch.arange(count).repeat_interleave(draws)
    flat = labels.reshape(-1).cpu()
    batched = kind.pair_logit_gradients(images[rows.to(images.device)], [vocabulary[j] for j in flat.tolist()])
    if batched is not None:
        return {name: value.detach().unflatten(0, (count, draws)) for name, value in batched.items()}
    out = {name: torch.zeros(count * draws, *parameter.shape, device=parameter.device)
           for name, parameter in parameters.items()}
    for label in flat.unique().tolist():
        picked = (flat == label).nonzero().squeeze(1)
        with torch.enable_grad():
            logits = kind.open_vocabulary_logits(images[rows[picked].to(images.device)], [vocabulary[label]])
            grads = _row_gradients(logits[:, 0].float(), list(parameters.values()))
        for name, value in zip(parameters, grads):
            out[name][picked.to(value.device)] = value.detach()
    return {name: value.unflatten(0, (count, draws)) for name, value in out.items()}


def centered_draws(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """[n, k, *shape] gradients of k draws per image -> [n * k, *shape] rows whose outer products summed give
    each image's unbiased sample covariance ``1/(k-1) sum_k (a_k - mean)(a_k - mean)^T``, summed over images."""
    out = {}
    for name, value in grads.items():
        draws = value.shape[1]
        out[name] = ((value - value.mean(dim=1, keepdim=True)) / (draws - 1) ** 0.5).flatten(0, 1)
    return out


def _row_gradients(values: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    """``d values[k] / d parameters`` for every k: ``[len(values), *shape]`` per parameter: one backward per row
    for a few rows (most classes drawn from a 1,005-name vocabulary are drawn once, and the batched pull-back's
    vmap costs more than it saves there), batched beyond."""
    if len(values) <= LOOPED_ROWS:
        return _looped_row_gradients(values, parameters)
    try:
        with warnings.catch_warnings():  # torch's note that CPU attention has no batching rule yet
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            eye = torch.eye(len(values), device=values.device, dtype=values.dtype)
            grads = torch.autograd.grad(values, parameters, grad_outputs=eye, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True, materialize_grads=True)
        return list(grads)
    except Exception as exc:  # noqa: BLE001 - a tracing failure: the loop gives the same numbers
        log.debug("per-row gradients: the batched backward cannot trace (%s); using a loop", exc)
    return _looped_row_gradients(values, parameters)


def _looped_row_gradients(values: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    rows = [torch.autograd.grad(value, parameters, retain_graph=index < len(values) - 1, allow_unused=True,
                                materialize_grads=True) for index, value in enumerate(values)]
    return [torch.stack([row[index] for row in rows]) for index in range(len(parameters))]


def per_example_grads(scores: _Scores, images: torch.Tensor, labels: torch.Tensor, *, method: str = "auto",
                      chunk: int = 32, one_forward: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Chunks of ``d(-log p(y|x))/dw`` per image: ``{name: [n, *shape]}`` over the kind's trainable tensors;
    at most ``chunk`` images each, fewer for a large vocabulary (:func:`gradient_chunk`).

    ``vjp`` scores every image in one forward pass and pulls each image's cotangent back through it
    (batched): for kinds that take image features, the text tower's forward over the class prompts runs
    once instead of once per chunk (a 1,005-name vocabulary: 32 forwards of about 2 s on the proxy).
    ``vmap`` batches ``grad`` over the images of each chunk, which is what pixel inputs need (each
    image's own image-tower pass); ``loop`` runs one backward per image (the reference). ``auto``: vjp
    for feature inputs when ``one_forward`` (the dense Fisher and the reference vocabulary ask for it),
    else vmap (over a task's own classes the gain is a forward or two, and vmap's numbers are those the
    committed benchmark's ``fisher`` rests on: the two agree to 2e-7, not bit for bit), falling back to
    the loop where torch.func cannot trace the kind.
    """
    if method not in GRADIENT_METHODS:
        raise ValueError(f"method must be one of {', '.join(GRADIENT_METHODS)}, not {method!r}")
    use_vmap = method != "loop"
    chunk = gradient_chunk(scores.kind, getattr(scores, "vocabulary", None), chunk)
    if method == "vjp" or (method == "auto" and one_forward and scores.kind.input_kind != "pixels"):
        started = False
        try:
            for grads in _vjp_grads(scores, images, labels, chunk):
                started = True
                yield grads
            return
        except Exception as exc:  # noqa: BLE001 - a tracing failure: the others give the same numbers
            if method == "vjp" or started:  # a failure after some chunks went out cannot start over
                raise
            log.debug("per-example gradients: vjp cannot trace this %s (%s)", scores.kind.name, exc)
    for start in range(0, len(images), chunk):
        x, y = images[start:start + chunk], labels[start:start + chunk].to(images.device)
        if use_vmap:
            try:
                with warnings.catch_warnings():  # torch's note that CPU attention has no batching rule yet
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                    grads = _vmap_grads(scores, x, y)
                yield grads
                continue
            except Exception as exc:  # noqa: BLE001 - any tracing failure: the loop gives the same numbers
                if method == "vmap":
                    raise
                log.debug("per-example gradients: vmap cannot trace this %s (%s); using the loop",
                          scores.kind.name, exc)
                use_vmap = False
        yield _loop_grads(scores, x, y)


def _vmap_grads(scores: _Scores, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {name: parameter.detach() for name, parameter in scores.kind.trainable().items()}

    def loss(values: dict[str, torch.Tensor], image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        swapped = {f"kind.{name}": value for name, value in values.items()}
        logits = functional_call(scores, swapped, (image.unsqueeze(0),), strict=False)
        return -F.log_softmax(logits.float(), dim=-1)[0].gather(0, label.unsqueeze(0)).squeeze(0)

    with torch.enable_grad():
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {name: value.detach() for name, value in grads.items()}


def _vjp_grads(scores: _Scores, images: torch.Tensor, labels: torch.Tensor, chunk: int
               ) -> Iterator[dict[str, torch.Tensor]]:
    """One forward over all images; image ``i``'s gradient pulls back ``softmax_i - onehot(y_i)`` on its row."""
    from torch.func import functional_call, vjp, vmap

    params = {name: parameter.detach() for name, parameter in scores.kind.trainable().items()}

    def logits_at(values: dict[str, torch.Tensor]) -> torch.Tensor:
        swapped = {f"kind.{name}": value for name, value in values.items()}
        return functional_call(scores, swapped, (images,), strict=False).float()

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        logits, pull_back = vjp(logits_at, params)
        delta = F.softmax(logits.detach(), dim=-1) - F.one_hot(labels.to(logits.device), logits.shape[1]).to(logits)
        for start in range(0, len(images), chunk):
            rows = torch.arange(start, min(start + chunk, len(images)), device=logits.device)
            cotangents = torch.zeros(len(rows), *logits.shape, device=logits.device, dtype=logits.dtype)
            cotangents[torch.arange(len(rows)), rows] = delta[rows]
            (grads,) = vmap(pull_back)(cotangents)
            yield {name: value.detach() for name, value in grads.items()}


def _loop_grads(scores: _Scores, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    parameters = scores.kind.trainable()
    out = {name: torch.empty(len(x), *parameter.shape, device=parameter.device) for name, parameter in parameters.items()}
    with torch.enable_grad():
        log_probs = F.log_softmax(scores(x).float(), dim=-1)
        for row, label in enumerate(y.tolist()):
            grads = torch.autograd.grad(-log_probs[row, label], list(parameters.values()), retain_graph=True)
            for name, value in zip(parameters, grads):
                out[name][row] = value.detach()
    return out


# ----------------------------------------------------------------------------- the Fisher, in its forms


def fisher_diagonal(kind: Kind, data: Features, *, seed: int = 0, chunk: int = 32, limit: int = FISHER_IMAGES,
                    vocabulary: Sequence[str] | None = None, method: str = "auto",
                    estimator: str = "label") -> dict[str, torch.Tensor]:
    """``E_x E_{y ~ p_zs(y|x)} [(d log p(y|x) / dw)^2]`` at ``w_zs``, one gradient per image.

    ``vocabulary`` None: ``p`` over the repair classes; else over that class list (see
    :func:`vocabulary_logits`). The kind is evaluated at ``w_zs`` and restored afterwards. At most
    ``limit`` images are used (:func:`fisher_images`). ``estimator``: ``label`` or ``draws`` (see the
    module's docstring; ``draws`` applies where the kind scores ``vocabulary``, else ``label`` runs).
    """
    images = chosen_images(data, seed, limit)
    fisher = {name: torch.zeros_like(parameter.detach()) for name, parameter in kind.trainable().items()}
    if _uses_draws(kind, vocabulary, estimator):
        with AtZeroShot(kind):
            for rows in _draw_chunks(kind, images, vocabulary, seed, chunk):
                for name, value in rows.items():
                    fisher[name] += (value ** 2).sum(dim=0)
        return {name: value / max(len(images), 1) for name, value in fisher.items()}
    with AtZeroShot(kind):
        scores = _Scores(kind, vocabulary)
        labels = sampled_labels(scores, images, seed, chunk)
        for grads in per_example_grads(scores, images, labels, method=method, chunk=chunk,
                                       one_forward=vocabulary is not None):
            for name, value in grads.items():
                fisher[name] += (value ** 2).sum(dim=0)
    return {name: value / max(len(images), 1) for name, value in fisher.items()}


def fisher_dense(kind: Kind, data: Features, *, seed: int = 0, chunk: int = 32, limit: int = FISHER_IMAGES,
                 vocabulary: Sequence[str] | None = None, method: str = "auto",
                 estimator: str = "label") -> torch.Tensor:
    """``E[g g^T]`` over all trainable numbers (flattened in ``trainable()`` order): ``[P, P]``; ``estimator``
    as in :func:`fisher_diagonal` (with ``draws``, its diagonal is that function's, for the same seed)."""
    total = kind.num_trainable()
    if total > DENSE_LIMIT:
        raise ValueError(f"a dense Fisher takes at most {DENSE_LIMIT} trainable numbers, not {total}")
    images = chosen_images(data, seed, limit)
    device = next(iter(kind.trainable().values())).device
    matrix = torch.zeros(total, total, device=device)
    if _uses_draws(kind, vocabulary, estimator):
        with AtZeroShot(kind):
            for part in _draw_chunks(kind, images, vocabulary, seed, chunk):
                flat = torch.cat([value.reshape(value.shape[0], -1) for value in part.values()], dim=1)
                matrix += flat.t() @ flat
        return matrix / max(len(images), 1)
    with AtZeroShot(kind):
        scores = _Scores(kind, vocabulary)
        labels = sampled_labels(scores, images, seed, chunk)
        for grads in per_example_grads(scores, images, labels, method=method, chunk=chunk, one_forward=True):
            flat = torch.cat([value.reshape(value.shape[0], -1) for value in grads.values()], dim=1)
            matrix += flat.t() @ flat
    return matrix / max(len(images), 1)


def _uses_draws(kind: Kind, vocabulary: Sequence[str] | None, estimator: str) -> bool:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, not {estimator!r}")
    return estimator == "draws" and vocabulary is not None and scores_vocabulary(kind)


def _draw_chunks(kind: Kind, images: torch.Tensor, vocabulary: Sequence[str], seed: int, chunk: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Rows whose squares (outer products) sum to the ``draws`` estimate times the image count: the centred
    logit gradients of ``draws`` sampled labels per image (:func:`centered_draws`), ``chunk`` images at a
    time so that memory stays that of ``chunk * draws`` gradients; every label is drawn first, from one
    seeded generator."""
    labels = sampled_label_draws(kind, images, tuple(vocabulary), seed, FISHER_DRAWS)
    # every image in one chunk where its gradients fit in DRAW_NUMBERS floats: each class then runs once
    chunk = max(chunk, DRAW_NUMBERS // max(FISHER_DRAWS * kind.num_trainable(), 1))
    for start in range(0, len(images), chunk):
        yield centered_draws(logit_gradients(kind, images[start:start + chunk], vocabulary,
                                             labels[start:start + chunk]))


def kfac_factors(kind: Kind, data: Features, *, seed: int = 0, chunk: int = 32,
                 limit: int = FISHER_IMAGES) -> dict[str, torch.Tensor]:
    """K-FAC of a linear head ``logits = s W x + b``: ``A = E[u u^T]`` with ``u = [s x, 1]`` (no 1 without a
    trained bias) and ``G = E[d d^T]`` with ``d = softmax - onehot(y)``, ``y`` sampled at ``w_zs``."""
    images = chosen_images(data, seed, limit)
    with AtZeroShot(kind), torch.no_grad():
        scores = _Scores(kind, None)
        labels = sampled_labels(scores, images, seed, chunk).to(images.device)
        probs = F.softmax(scores(images).float(), dim=-1)
    delta = probs - F.one_hot(labels, probs.shape[1]).to(probs)
    inputs = kind.scale * images.float()
    if "bias" in kind.trainable():
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, device=inputs.device)], dim=1)
    count = max(len(images), 1)
    return {"A": inputs.t() @ inputs / count, "G": delta.t() @ delta / count}
