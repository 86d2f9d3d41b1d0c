"""The zero-shot side of the objective: data-free stand-ins for "stay close to w_zs".

Around the zero-shot solution the pretraining loss along ``w_zs -> w`` grows like
``0.5 t^2 d^T H d`` with ``d = w - w_zs``; each surrogate approximates ``H`` differently:

- ``feature``: Gauss-Newton on the class text features, ``1 - mean_c cos(T_c, Z_c)``.
- ``fisher``: the diagonal Fisher at ``w_zs`` of the repair-class softmax, ``0.5 sum_i F_i (w_i - w_zs_i)^2``.
- ``fisher-vocab``: the same over a broad reference vocabulary (the repair classes plus 1,000 generic
  concepts, ``--vocabulary FILE`` to override): CLIP was pretrained open-vocabulary, so directions the
  repair classes never use count too. It and ``fisher-dense`` use curvature's ``draws`` estimator.
- ``fisher-dense``: the full ``E[g g^T]`` over the reference vocabulary, ``0.5 d^T F d``, for kinds with at most
  :data:`~repair.train.curvature.DENSE_LIMIT` trainable numbers (a CoOp prompt).
- ``kfac``: a linear head's Kronecker-factored Gauss-Newton, ``0.5 tr(G D A D^T)`` with ``D = [W, b] - [W, b]_zs``.
- ``distill``: ``KL(p_zs || p_w)`` over the reference vocabulary on (up to 64 of) the repair images (ZSCL's term):
  the zero-shot model's predictions kept, not its weights; over a long vocabulary each step scores a few
  names at ``w`` and estimates the rest (:class:`SampledKL`).
- ``l2``: ``c * I``, ``0.5 ||w - w_zs||^2`` (L2-SP).

The estimators live in :mod:`repair.train.curvature`. A surrogate is built once per run
(:func:`build_surrogate`), so its constants (anchors, the Fisher, the zero-shot predictions) are computed
once and data-built ones are cached on disk; adding one is one class with a ``build`` classmethod (and a
``refusal`` when some kinds cannot use it) and one line in :data:`SURROGATES` (the CLI's ``--surrogate``
choices come from there).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from repair.io import read_cache_entry, write_cache_entry
from repair.data.features import Features
from repair.errors import UsageError
from repair.kinds.base import Kind, KindOutput
from repair.kinds.linear import LinearHead
from repair.train.curvature import (
    DENSE_LIMIT,
    FISHER_DRAWS,
    FISHER_IMAGES,
    AtZeroShot,
    chosen_images,
    fisher_dense,
    fisher_diagonal,
    fisher_images,
    kfac_factors,
    reference_vocabulary,
    scores_vocabulary,
    vocabulary_logits,
)

FISHER_CACHE_FORMAT = "mergetune-fisher/2"  # checksummed entries


class DataFree:
    """A surrogate whose constants come from the kind alone: built without images."""

    needs_data = False
    stats: dict[str, object] = {}

    def __init__(self, kind: Kind) -> None:
        raise NotImplementedError

    @classmethod
    def refusal(cls, kind: Kind) -> str | None:
        """Why this surrogate cannot apply to ``kind`` (None: it can)."""
        return None

    @classmethod
    def build(cls, kind: Kind, data: Features | None, **_: object) -> DataFree:
        return cls(kind)


class FeatureSurrogate(DataFree):
    """Gauss-Newton on the class text features (KgCoOp's term; what the reference runs)."""

    name = "feature"

    def __init__(self, kind: Kind) -> None:
        self.anchor = F.normalize(kind.zero_shot_class_features().detach().float(), dim=-1)

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        # class features are unit rows (KindOutput's contract), so the cosine is a dot product: no norms
        # recomputed, forward or backward, on [C, E] (a 1,000-class linear head's step is mostly this term)
        return 1.0 - (output.class_features * self.anchor).sum(dim=-1).mean()


class L2Surrogate(DataFree):
    """Isotropic H: ``0.5 ||w - w_zs||^2`` over the trainable tensors (L2-SP)."""

    name = "l2"

    def __init__(self, kind: Kind) -> None:
        self.anchors = {name: value.detach() for name, value in kind.zero_shot_values().items()}

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        return 0.5 * sum(((tensor - self.anchors[name]) ** 2).sum() for name, tensor in kind.trainable().items())


class FromImages:
    """A surrogate whose constants are estimated at ``w_zs`` from the unlabelled repair images, cached on disk.

    ``vocabulary`` (the generic concepts; None: the packaged ImageNet names) matters only to the
    open-vocabulary ones; ``stats`` reports the build: seconds, bytes of constants, images, vocabulary size.
    """

    name: str
    needs_data = True
    needs_zero_shot_point = True  # False: reads only the zero-shot model's outputs (Kind.zero_shot_model)
    open_vocabulary = False  # whether p is over the reference vocabulary rather than the repair classes
    stats: dict[str, object]

    @classmethod
    def refusal(cls, kind: Kind) -> str | None:
        return None

    @classmethod
    def build(cls, kind: Kind, data: Features | None, *, seed: int = 0, cache_key: str | None = None,
              cache_dir: Path | None = None, vocabulary: Sequence[str] | None = None) -> FromImages:
        if data is None:
            raise ValueError(f"the {cls.name} surrogate needs the repair images")
        reason = cls.refusal(kind)
        if reason is not None:
            raise UsageError(f"--surrogate {cls.name} does not apply to this {kind.about.description}: {reason}")
        names = cls.vocabulary_for(kind, vocabulary)
        began = time.perf_counter()
        source = cls.estimated_by(kind)  # whose cache entry holds these constants (one gradient pass for both)
        constants, cached = _cached(source.name, names, source.entry_keys(kind), data, seed, cache_key, cache_dir,
                                    lambda: source.estimate(kind, data, seed, names), source.cache_variant())
        if source is not cls:
            constants = cls.from_entry(kind, constants)
        surrogate = cls(kind, constants, data, seed, names)
        surrogate.stats = {"surrogate": cls.name, "seconds": round(time.perf_counter() - began, 3),
                           "constant_bytes": sum(t.numel() * t.element_size() for t in constants.values()),
                           "images": min(len(data), FISHER_IMAGES), "from_cache": cached,
                           "vocabulary": _describe_vocabulary(kind, names)}
        return surrogate

    @classmethod
    def vocabulary_for(cls, kind: Kind, vocabulary: Sequence[str] | None) -> tuple[str, ...] | None:
        """The class list ``p`` is over: None (the repair classes) unless open-vocabulary and the kind scores it."""
        if not cls.open_vocabulary or not scores_vocabulary(kind):
            return None
        return reference_vocabulary(kind.classnames, vocabulary)

    @classmethod
    def estimate(cls, kind: Kind, data: Features, seed: int, vocabulary: tuple[str, ...] | None
                 ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def entry_keys(cls, kind: Kind) -> set[str]:
        """The tensor names of this surrogate's cache entry (an entry with others is recomputed)."""
        raise NotImplementedError

    @classmethod
    def cache_variant(cls) -> str | None:
        """What else tells this surrogate's cache entries apart (its estimator); None: nothing."""
        estimator = getattr(cls, "estimator", "label")
        return None if estimator == "label" else f"{estimator}:{FISHER_DRAWS}"

    @classmethod
    def estimated_by(cls, kind: Kind) -> type[FromImages]:
        """The surrogate whose estimate (and cache entry) this one's constants are read from: itself,
        unless another's contains them (:meth:`from_entry` reads them out)."""
        return cls

    @classmethod
    def from_entry(cls, kind: Kind, constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __init__(self, kind: Kind, constants: dict[str, torch.Tensor], data: Features, seed: int,
                 vocabulary: tuple[str, ...] | None) -> None:
        self.anchors = ({name: value.detach() for name, value in kind.zero_shot_values().items()}
                        if self.needs_zero_shot_point else {})
        self.constants = constants

    def displacement(self, kind: Kind) -> torch.Tensor:
        """``w - w_zs``, flattened over the trainable tensors in ``trainable()`` order."""
        return torch.cat([(tensor - self.anchors[name]).reshape(-1) for name, tensor in kind.trainable().items()])


class FisherSurrogate(FromImages):
    """Diagonal Fisher at ``w_zs`` of the repair-class softmax: ``0.5 sum_i F_i (w_i - w_zs_i)^2``."""

    name = "fisher"
    estimator = "label"  # curvature's estimators: one label per image, the exact mean over the classes

    @classmethod
    def estimate(cls, kind: Kind, data: Features, seed: int, vocabulary: tuple[str, ...] | None
                 ) -> dict[str, torch.Tensor]:
        return fisher_diagonal(kind, data, seed=seed, vocabulary=vocabulary, estimator=cls.estimator)

    @classmethod
    def entry_keys(cls, kind: Kind) -> set[str]:
        return set(kind.trainable())

    def __init__(self, kind: Kind, constants: dict[str, torch.Tensor], data: Features, seed: int,
                 vocabulary: tuple[str, ...] | None) -> None:
        super().__init__(kind, constants, data, seed, vocabulary)
        self.fisher = constants

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        return 0.5 * sum((self.fisher[name] * (tensor - self.anchors[name]) ** 2).sum()
                         for name, tensor in kind.trainable().items())


class VocabularyFisherSurrogate(FisherSurrogate):
    """Diagonal Fisher at ``w_zs`` over the reference vocabulary: open-vocabulary curvature, any kind.
    A kind that scores only its own classes (a linear head, a class-specific prompt) has those as vocabulary."""

    name = "fisher-vocab"
    open_vocabulary = True
    estimator = "draws"  # FISHER_DRAWS labels per image: two classes' text passes, not the vocabulary's

    @classmethod
    def estimated_by(cls, kind: Kind) -> type[FromImages]:
        # where the dense Fisher fits, the diagonal is its diagonal: one pass of per-example gradients
        # (minutes over a 1,005-name vocabulary) serves both surrogates through one cache entry
        return DenseFisherSurrogate if DenseFisherSurrogate.refusal(kind) is None else cls

    @classmethod
    def from_entry(cls, kind: Kind, constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        diagonal = torch.diagonal(constants["dense"]).clone()
        shapes = {name: tensor.shape for name, tensor in kind.trainable().items()}
        pieces = diagonal.split([shape.numel() for shape in shapes.values()])
        return {name: piece.reshape(shape) for (name, shape), piece in zip(shapes.items(), pieces)}


class DenseFisherSurrogate(FromImages):
    """The full Fisher ``E[g g^T]`` at ``w_zs`` over the reference vocabulary: ``0.5 d^T F d``, ``d = w - w_zs``.
    Only for kinds with at most ``DENSE_LIMIT`` trainable numbers (a CoOp prompt: 2,048 at ViT-B/16)."""

    name = "fisher-dense"
    open_vocabulary = True
    estimator = "draws"

    @classmethod
    def refusal(cls, kind: Kind) -> str | None:
        total = kind.num_trainable()
        if total <= DENSE_LIMIT:
            return None
        return (f"a dense Fisher takes at most {DENSE_LIMIT:,} trainable numbers and it has {total:,} "
                "(kfac fits a linear head, fisher-vocab any kind)")

    @classmethod
    def estimate(cls, kind: Kind, data: Features, seed: int, vocabulary: tuple[str, ...] | None
                 ) -> dict[str, torch.Tensor]:
        return {"dense": fisher_dense(kind, data, seed=seed, vocabulary=vocabulary, estimator=cls.estimator)}

    @classmethod
    def entry_keys(cls, kind: Kind) -> set[str]:
        return {"dense"}

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        d = self.displacement(kind)
        return 0.5 * d @ (self.constants["dense"] @ d)


class KFACSurrogate(FromImages):
    """A linear head's Kronecker-factored Fisher ``G (x) A`` at ``w_zs``: ``0.5 tr(G D A D^T)``, ``D = [W, b] - [W, b]_zs``.
    A head scores only its own classes, so ``p`` is over the repair classes."""

    name = "kfac"

    @classmethod
    def refusal(cls, kind: Kind) -> str | None:
        return None if isinstance(kind, LinearHead) else "K-FAC here is a linear head's factorisation"

    @classmethod
    def estimate(cls, kind: Kind, data: Features, seed: int, vocabulary: tuple[str, ...] | None
                 ) -> dict[str, torch.Tensor]:
        return kfac_factors(kind, data, seed=seed)

    @classmethod
    def entry_keys(cls, kind: Kind) -> set[str]:
        return {"A", "G"}

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        trainable = kind.trainable()
        d = trainable["weight"] - self.anchors["weight"]
        if "bias" in trainable:
            d = torch.cat([d, (trainable["bias"] - self.anchors["bias"]).unsqueeze(1)], dim=1)
        return 0.5 * torch.trace(self.constants["G"] @ d @ self.constants["A"] @ d.t())


@dataclass(frozen=True)
class VocabularySample:
    """Which names :class:`SampledKL` scores at ``w`` in a step: ``take_all`` names at every step (those of most
    mass over all images, or with ``per_image`` each image's own, their union at most ``cap``), plus one rotating
    ``block`` of the rest; with ``refresh_every``, every name's reference is re-scored (no grad) that often."""

    take_all: int
    block: int
    per_image: bool = False
    refresh_every: int | None = None
    cap: int = 128

    def smallest_whole_vocabulary(self, images: int) -> int:
        """Up to this many names, scoring all of them at every step costs no more than the sample."""
        return (min(self.take_all * images, self.cap) if self.per_image else self.take_all) + self.block


class DistillSurrogate(FromImages):
    """``KL(p_zs || p_w)`` over the reference vocabulary on up to 64 repair images (a seeded sample), as ZSCL
    distils for continual learning: label-free, and it keeps the zero-shot *predictions* rather than the weights.
    ``p_zs`` is computed once per build. Over a vocabulary longer than a step's sample a step scores only a few
    names at ``w`` (:class:`SampledKL`: exact where the reference logits are current, an estimate between); a
    shorter one is scored whole at every step."""

    name = "distill"
    open_vocabulary = True
    needs_zero_shot_point = False  # a kind without one (MaPLe) scores as zero-shot CLIP in its zero_shot_model()
    # A prompt's step is its text pass, so every name it scores costs: the 4 names of most mean mass and a block
    # of 4 (benchmarks/results/surrogate-speed.json), the reference refreshed by the names scored.
    text_bound = VocabularySample(take_all=4, block=4)
    # A kind that trains the image tower (CLIPFit) runs it over the batch and these images at every step, so a
    # name costs little beside them, and every name's logits move with the images: each image's own 4 names of
    # most mass (teacher or student) and every name's reference re-scored every 8 steps. With the prompts' sample
    # instead, a CLIPFit repair's estimate ran 45 % above the exact KL (median) and its gradient was at cosine 0.38
    # to the exact one; with this one 2.8 % and 0.69 (benchmarks/results/distill-error.json).
    image_bound = VocabularySample(take_all=4, per_image=True, block=4, refresh_every=8)

    @classmethod
    def estimate(cls, kind: Kind, data: Features, seed: int, vocabulary: tuple[str, ...] | None
                 ) -> dict[str, torch.Tensor]:
        with kind.zero_shot_model() or AtZeroShot(kind), torch.no_grad():
            logits = vocabulary_logits(kind, chosen_images(data, seed), vocabulary)
        return {"log_p_zs": F.log_softmax(logits.float(), dim=-1)}

    @classmethod
    def entry_keys(cls, kind: Kind) -> set[str]:
        return {"log_p_zs"}

    @classmethod
    def sample_for(cls, kind: Kind) -> VocabularySample:
        """Which names a step of this kind scores: the image tower's kinds afford more, and need it."""
        return cls.image_bound if kind.input_kind == "pixels" else cls.text_bound

    def __init__(self, kind: Kind, constants: dict[str, torch.Tensor], data: Features, seed: int,
                 vocabulary: tuple[str, ...] | None) -> None:
        super().__init__(kind, constants, data, seed, vocabulary)
        self.images = chosen_images(data, seed)
        self.vocabulary = vocabulary
        self.sampled = None
        sample = self.sample_for(kind)
        if vocabulary is not None and len(vocabulary) > sample.smallest_whole_vocabulary(len(self.images)):
            self.sampled = SampledKL(kind, self.images, vocabulary, constants["log_p_zs"], sample, seed)

    def names_this_step(self, kind: Kind) -> tuple[str, ...] | None:
        """The names the next call scores at ``w``, for the kind to encode with its classes
        (:meth:`~repair.kinds.base.Kind.encode_alongside`)."""
        if self.sampled is not None:
            return self.sampled.names_this_step(kind)
        return self.vocabulary

    def __call__(self, kind: Kind, output: KindOutput) -> torch.Tensor:
        if self.sampled is not None:
            return self.sampled(kind)
        return exact_kl(self.constants["log_p_zs"], vocabulary_logits(kind, self.images, self.vocabulary))


def exact_kl(log_p_zs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``mean_i KL(p_zs,i || softmax(logits_i))``."""
    return (log_p_zs.exp() * (log_p_zs - F.log_softmax(logits.float(), dim=-1))).sum(dim=-1).mean()


class SampledKL:
    """``KL(p_zs || p_w)`` over a long vocabulary from a few names scored at ``w`` per step.

    With reference logits ``r`` (every name's at some earlier ``w``) and the drift ``d = z(w) - r``,

        KL_i = sum_j q log q - sum_j q r - sum_j q d + logsumexp(r) + log sum_j softmax(r)_j exp(d_j)

    holds for any ``r`` (``q = p_zs``). A step scores at ``w`` the names of most mass (teacher and reference
    student; :class:`VocabularySample` says which), exactly, and one block of the rest for the rest's share of
    the two sums (:func:`sampled_kl`): the blocks stratify the rest by mass (block ``k`` holds ranks ``k, k + n,
    ...``) and are visited in a seeded random order, each once per round. Every scored name refreshes its
    reference, and with ``refresh_every`` every name does that often. So the value is exact where ``r`` is
    current (at the build's ``w``, at any ``w`` held for a round, after a refresh), and wherever the rest drift
    alike (a shift common to them cancels in the ratio); between, it is an estimate whose error
    ``benchmarks/surrogate_speed.py`` and ``benchmarks/distill_error.py`` measure against the exact KL.
    """

    def __init__(self, kind: Kind, images: torch.Tensor, vocabulary: Sequence[str], log_p_zs: torch.Tensor,
                 sample: VocabularySample, seed: int) -> None:
        self.images, self.vocabulary, self.sample = images, tuple(vocabulary), sample
        self.reference = self._every_name(kind)  # at the build's w
        self.log_q = log_p_zs.to(self.reference)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0  # scored since the build (or the restart), for refresh_every
        self.pending: torch.Tensor | None = None  # the names the next call scores, once chosen
        self._arrange()
        self.start = ({name: value.detach().clone() for name, value in kind.trainable().items()},
                      self.reference.clone())

    def _arrange(self) -> None:
        """Which names every step scores (``always``) and the rotating blocks of the others, from the reference."""
        teacher, student = self.log_q.exp(), F.softmax(self.reference, dim=-1)
        mass = 0.5 * (teacher.mean(dim=0) + student.mean(dim=0))
        order = torch.argsort(mass, descending=True, stable=True).to(self.reference.device)
        if self.sample.per_image:
            own = torch.maximum(teacher, student)
            always = torch.unique(own.topk(min(self.sample.take_all, own.shape[1]), dim=-1).indices)
            if len(always) > self.sample.cap:
                always = always[torch.argsort(own.amax(dim=0)[always], descending=True, stable=True)[:self.sample.cap]]
        else:
            always = order[:self.sample.take_all]
        is_always = torch.zeros(len(order), dtype=torch.bool, device=order.device)
        is_always[always] = True
        self.always, rest = always, order[~is_always[order]]
        rounds = -(-len(rest) // self.sample.block)
        self.blocks = [rest[start::rounds] for start in range(rounds)]
        self.queue: list[int] = []

    def restart_if_at_start(self, kind: Kind) -> None:
        """Back at the build's ``w`` (a repair starting over, as ``--lam-zs auto``'s runs do): its reference and
        block order again, so every run from there is the same run, whatever ran before."""
        values, reference = self.start
        if all(torch.equal(tensor.detach(), values[name]) for name, tensor in kind.trainable().items()):
            self.reference = reference.clone()
            self.generator.manual_seed(self.seed)
            self.steps = 0
            self.pending = None
            self._arrange()

    def refresh(self, kind: Kind) -> None:
        """Every name's reference at the current ``w``, and the names and blocks chosen again."""
        self.reference = self._every_name(kind)
        self._arrange()

    @torch.no_grad()
    def _every_name(self, kind: Kind) -> torch.Tensor:
        return vocabulary_logits(kind, self.images, self.vocabulary).float()

    def next_block(self) -> torch.Tensor:
        if not self.queue:
            self.queue = torch.randperm(len(self.blocks), generator=self.generator).tolist()
        return self.blocks[self.queue.pop()]

    def _scored(self, kind: Kind) -> torch.Tensor:
        if self.pending is None:
            self.restart_if_at_start(kind)
            every = self.sample.refresh_every
            if every and self.steps and self.steps % every == 0:
                self.refresh(kind)
            self.pending = torch.cat([self.always, self.next_block()])
        return self.pending

    def names_this_step(self, kind: Kind) -> tuple[str, ...]:
        """The names the next call scores: chosen now, so the kind can encode them with its classes."""
        return tuple(self.vocabulary[j] for j in self._scored(kind).tolist())

    def __call__(self, kind: Kind) -> torch.Tensor:
        names = self.names_this_step(kind)  # the names encode_alongside was given, if it was
        scored, self.pending = self._scored(kind), None
        logits = vocabulary_logits(kind, self.images, names).float()
        value = sampled_kl(self.log_q, self.reference, self.always, scored[len(self.always):], logits)
        self.reference = self.reference.index_copy(1, scored, logits.detach())
        self.steps += 1
        return value


def sampled_kl(log_q: torch.Tensor, reference: torch.Tensor, always: torch.Tensor, block: torch.Tensor,
               logits: torch.Tensor) -> torch.Tensor:
    """:class:`SampledKL`'s estimate from ``logits`` [n, A + B] at ``w`` of the ``always`` names then ``block``'s
    (a stratified sample of the rest), with every name's ``reference`` logits [n, V]: the rest's share of each
    expectation is its reference mass times the block's mass-weighted mean (a ratio estimate)."""
    q = log_q.exp()
    drift = logits - reference[:, torch.cat([always, block])]
    drift_always, drift_block = drift[:, :len(always)], drift[:, len(always):]
    tiny = torch.finfo(drift.dtype).tiny
    q_block = q[:, block]
    rest_q = (1.0 - q[:, always].sum(dim=-1)).clamp_min(0.0)
    teacher = ((q * reference).sum(dim=-1) + (q[:, always] * drift_always).sum(dim=-1)
               + rest_q * (q_block * drift_block).sum(dim=-1) / q_block.sum(dim=-1).clamp_min(tiny))
    log_p = F.log_softmax(reference, dim=-1)
    log_block = log_p[:, block]
    rest_mask = torch.ones(reference.shape[1], dtype=torch.bool, device=reference.device)
    rest_mask[always] = False
    log_rest = torch.logsumexp(log_p.masked_fill(~rest_mask, float("-inf")), dim=-1)
    rest = log_rest + torch.logsumexp(log_block + drift_block, dim=-1) - torch.logsumexp(log_block, dim=-1)
    log_norm = torch.logsumexp(reference, dim=-1) + torch.logsumexp(
        torch.cat([log_p[:, always] + drift_always, rest.unsqueeze(1)], dim=1), dim=-1)
    return ((q * log_q).sum(dim=-1) - teacher + log_norm).mean()


Surrogate = Callable[[Kind, KindOutput], torch.Tensor]


def surrogate_names(surrogate: Surrogate | None, kind: Kind) -> tuple[str, ...] | None:
    """The names ``surrogate`` scores at ``w`` in its next call, where it says (``names_this_step``)."""
    names_this_step = getattr(surrogate, "names_this_step", None)
    return None if names_this_step is None else names_this_step(kind)
SURROGATES: dict[str, type] = {cls.name: cls for cls in (FeatureSurrogate, FisherSurrogate, L2Surrogate,
                                                         VocabularyFisherSurrogate, DenseFisherSurrogate,
                                                         KFACSurrogate, DistillSurrogate)}


def refusals(kind: Kind) -> dict[str, str]:
    """Every surrogate this checkpoint cannot use, with the reason: the kind's own and the surrogates'. A kind
    without a zero-shot point (it refuses ``fisher`` and ``l2`` for that) cannot take any term estimated at
    ``w_zs``; one that refuses ``fisher`` alone (CLIP-Adapter: a point, but no gradient there) still can. One that
    scores as zero-shot CLIP all the same (:meth:`Kind.zero_shot_model`) keeps those that read only the zero-shot
    model's outputs (``distill``)."""
    own = kind.unsupported_surrogates()
    no_point = own.get("fisher") if "l2" in own else None
    outputs_only = kind.zero_shot_model() is not None  # it scores as zero-shot CLIP without a point
    refused = {}
    for name, cls in SURROGATES.items():
        needs_point = cls.needs_data and (cls.needs_zero_shot_point or not outputs_only)
        reason = cls.refusal(kind) or (no_point if needs_point else None)
        if reason is not None:
            refused[name] = reason
    return {**refused, **own}


def build_surrogate(name: str, kind: Kind, data: Features | None = None, *, seed: int = 0,
                    cache_key: str | None = None, cache_dir: Path | None = None,
                    vocabulary: Sequence[str] | None = None) -> Surrogate:
    """The named surrogate for this kind, its constants computed once (data-built ones cached on disk).

    ``vocabulary``: the generic concepts of the reference vocabulary (None: open_clip's 1,000 ImageNet
    names); only ``fisher-vocab``, ``fisher-dense`` and ``distill`` read it.
    """
    if name not in SURROGATES:
        raise UsageError(f"unknown surrogate {name!r}; choose one of {', '.join(SURROGATES)}")
    cls = SURROGATES[name]
    if not cls.needs_data:
        return cls.build(kind, data)
    return cls.build(kind, data, seed=seed, cache_key=cache_key, cache_dir=cache_dir, vocabulary=vocabulary)


def _describe_vocabulary(kind: Kind, vocabulary: tuple[str, ...] | None) -> dict[str, object]:
    if vocabulary is None:
        return {"classes": len(kind.classnames), "scope": "the repair classes"}
    return {"classes": len(vocabulary), "scope": "the repair classes and generic concepts",
            "sha256": hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()}


def _cached(name: str, vocabulary: tuple[str, ...] | None, keys: set[str], data: Features, seed: int,
            cache_key: str | None, cache_dir: Path | None,
            compute: Callable[[], dict[str, torch.Tensor]], variant: str | None = None
            ) -> tuple[dict[str, torch.Tensor], bool]:
    """``compute()``, or its entry in ``cache_dir/fisher`` (keyed by the run's inputs, the surrogate, the vocabulary
    and the estimator where it is not the first one)."""
    if cache_key is None or cache_dir is None:
        return compute(), False
    identity: list[object] = [FISHER_CACHE_FORMAT, cache_key, seed, FISHER_IMAGES]
    if name != "fisher":  # the diagonal's entries keep their names from before the other surrogates existed
        identity += [name, None if vocabulary is None else hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()]
    if variant is not None:
        identity.append(variant)
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
    path = Path(cache_dir) / "fisher" / f"{digest}.safetensors"
    stored = read_cache_entry(path, device=str(data.features.device))
    if stored is not None and set(stored) == keys:
        return stored, True
    computed = compute()
    write_cache_entry(path, computed)
    return computed, False


__all__ = ["SURROGATES", "Surrogate", "build_surrogate", "refusals", "fisher_diagonal", "fisher_images",
           "FISHER_IMAGES", "FeatureSurrogate", "FisherSurrogate", "L2Surrogate", "VocabularyFisherSurrogate",
           "DenseFisherSurrogate", "KFACSurrogate", "DistillSurrogate", "SampledKL", "VocabularySample", "exact_kl",
           "sampled_kl", "surrogate_names"]
