"""Time MergeTune repair steps: against the reference pattern, against each kind's floor, and their memory.

Parts (each measurement in a fresh process, the report rewritten after each):

- ``coop_vs_reference``: our CoOp step against the reference computation pattern. The reference
  (as in the MergeTune reference code) runs the frozen image encoder once per path point plus once
  for the main term (1 + K passes per step), encodes the current prompts twice and the fine-tuned
  prompts once per step, all at the full 77-token context. Our loop encodes images once per run
  (features cached), the current prompts once per step, the fine-tuned and zero-shot class features
  once per run, and cuts sequences at end-of-text. Both compute the same loss, checked on the
  first batch before timing.
- ``floors`` (and ``kinds``, the same measurement per kind): our step against the least work a
  step of that kind can do, interleaved step by step in one process (see :data:`FLOORS`).
- ``clipfit_cache``: the CLIPFit step recomputing the image features at ``w_ft`` every step
  against caching them (``cache_ft_images``), interleaved.
- ``memory``: peak resident memory of CoOp and CLIPFit steps per class count, each alone in a
  fresh process, with the kind's class-chunked text encoding and (at the largest count) without.
- ``extraction``: feature extraction, a plain ``encode_image`` loop against ours.

On ``--device cuda`` every part runs at fp32, bf16 and fp16 autocast, with the peak GPU memory
(``torch.cuda.max_memory_allocated``) of each measurement.

    python -m benchmarks.speed --classes 10 100 --batch 32 --out benchmarks/results/speed.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.report import write_results
from repair.errors import MergetuneError
from repair.io.write import atomic_output
from repair.kinds import CLIPFit, CoOpPrompts, LinearHead
from repair.kinds.base import Kind
from repair.kinds.clipfit import clipfit_names
from repair.kinds.coop import PromptBank, init_context
from repair.model.backbone import Backbone, BackboneSpec, load_backbone, resolve_device
from repair.train.objective import Objective, mergetune_loss
from repair.train.surrogates import Surrogate, build_surrogate

SCHEMA = "mergetune.speed/2"
CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
              "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle"]
TEMPLATES = ["a photo of a {}."]
# the feature surrogate (KgCoOp's term): data-free, so built once here, and what the reference runs; the
# lambdas change no step's work (lam_zs 10 against the reference: its losses match speed/1's)
OBJECTIVE = Objective(lam_zs=1.0, surrogate="feature")
REFERENCE_OBJECTIVE = Objective(lam_zs=10.0, surrogate="feature")
GOALS = {"linear": 1.2, "clipfit": 1.3, "coop": 0.6}  # step / floor, issue "Speed past the naive floor"
FLOORS = {
    "coop": "one text-tower forward+backward of every class prompt, built whole (no shared prefix), cut at "
            "end-of-text",
    "linear": "one matmul forward+backward, features [B, E] @ W.t(), grad to W",
    "clipfit": "one image-tower forward+backward of the batch (grads on the image normalisation tensors) plus one "
               "text-tower forward+backward of the class prompts (grads on the feed-forward output biases)",
}
CPU_PRECISIONS = ("fp32",)
CUDA_PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_CHUNKS = "default"  # memory: the kind's own text_chunk_size; None: every prompt at once
PARTS = ("coop_vs_reference", "floors", "clipfit_cache", "memory", "extraction")
MIB = 2 ** 20


def class_list(count: int) -> list[str]:
    """``count`` distinct class names (1,000 and more): the 20 words, then the words numbered."""
    names = [CLASSNAMES[i % len(CLASSNAMES)] + ("" if i < len(CLASSNAMES) else f" {i}") for i in range(count)]
    assert len(set(names)) == count
    return names


# ---------------------------------------------------------------------------------------- set-up


@dataclass
class Bench:
    """What one measurement process times on: the backbone, the class names and one batch."""

    backbone: Backbone
    names: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @cached_property
    def features(self) -> torch.Tensor:
        """The batch's normalised image features: what our loop computes once per run, not per step."""
        return self.backbone.encode_images(self.images)


def setup(model: str, classes: int, batch: int, device: str = "cpu", precision: str = "fp32") -> Bench:
    """Random weights (timing only), a random pixel batch, labels cycling through the classes."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec(model, "none"), device=device, precision=precision)
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=backbone.device)
    labels = torch.arange(batch, device=backbone.device) % classes
    return Bench(backbone, class_list(classes), images, labels)


def build_kind(name: str, bench: Bench) -> tuple[Kind, torch.Tensor]:
    """A kind at its zero-shot point, with the inputs its step takes (cached features, or pixels)."""
    if name == "clipfit":
        return CLIPFit.zero_shot(bench.backbone, bench.names, TEMPLATES), bench.images
    kind_class = {"coop": CoOpPrompts, "linear": LinearHead}[name]
    return kind_class.zero_shot(bench.backbone, bench.names, TEMPLATES), bench.features


# ---------------------------------------------------------------------------------------- steps


Step = Callable[[], torch.Tensor]


def update_step(parameters: Sequence[torch.Tensor], loss: Step, backbone: Backbone) -> Step:
    """One training step as the repair loop takes it: zero the grads, the loss under autocast, backward,
    an SGD update. Our steps and the floors share it, so a ratio is the losses' difference alone."""
    optimizer = torch.optim.SGD(list(parameters), lr=1e-6)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with backbone.autocast():
            value = loss()
        value.backward()
        optimizer.step()
        return value.detach()

    return step


def repair_step(kind: Kind, inputs: torch.Tensor, labels: torch.Tensor, objective: Objective = OBJECTIVE) -> Step:
    """Our step: the MergeTune loss of one batch (the surrogate built once, as the workflow does)."""
    surrogate: Surrogate = build_surrogate(objective.for_kind(kind).surrogate, kind)
    return update_step(list(kind.trainable().values()),
                       lambda: mergetune_loss(kind, objective, inputs, labels, surrogate).total, kind.backbone)


def coop_floor(bench: Bench, kind: CoOpPrompts) -> Step:
    """Every class prompt assembled whole and encoded once: the naive encoding, not the kind's own."""
    bank = PromptBank(bench.backbone, kind.classnames, kind.n_ctx)
    ctx = kind.ctx.detach().clone().requires_grad_(True)
    text = bench.backbone.text
    return update_step([ctx], lambda: text.encode_embeddings(bank.assemble(ctx, False), bank.pooling).float().sum(),
                       bench.backbone)


def linear_floor(bench: Bench, kind: LinearHead) -> Step:
    weight = kind.weight.detach().clone().requires_grad_(True)
    features = bench.features
    return update_step([weight], lambda: (features @ weight.t()).float().sum(), bench.backbone)


def clipfit_floor(bench: Bench, kind: CLIPFit) -> Step:
    """Both towers once, with grads on CLIPFit's tensors only (the image tower's no-grad pass at w_ft left out)."""
    backbone, text = bench.backbone, bench.backbone.text
    values = dict(backbone.model.named_parameters())
    leaves = {name: values[name].detach().clone().requires_grad_(True) for name in clipfit_names(backbone)}
    image_params = {n.removeprefix("visual."): v for n, v in leaves.items() if n.startswith("visual.")}
    text_params = {n.removeprefix(text.prefix): v for n, v in leaves.items() if n.startswith(text.prefix)}
    captions = [template.format(name) for name in kind.classnames for template in kind.templates]
    tokens, pooling = text.cut(backbone.tokenize(captions))
    with torch.no_grad():
        embeddings = text.embed(tokens)
    pixels, visual = bench.images, backbone.model.visual

    def loss() -> torch.Tensor:
        images = torch.func.functional_call(visual, image_params, (pixels,), strict=False)
        return images.float().sum() + text.encode_embeddings(embeddings, pooling, text_params).float().sum()

    return update_step(list(leaves.values()), loss, backbone)


FLOOR_STEPS: dict[str, Callable[[Bench, Kind], Step]] = {"coop": coop_floor, "linear": linear_floor,
                                                         "clipfit": clipfit_floor}


# ---------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


class OperatorCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active (the backward pass's too)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def warm_up(step: Step, device: torch.device) -> tuple[float, float | None, int]:
    """One untimed step alone: (its loss, its peak GPU memory in MiB or None on the CPU, the aten operators it
    dispatched). At microsecond sizes a step costs about its operator count times the per-operator overhead,
    whatever the arithmetic: the count says why a tiny step stays above a floor of few operators."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with OperatorCount() as operators:
        loss = float(step())
    synchronize(device)
    return loss, torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None, operators.count


def interleaved(steps: dict[str, Step], rounds: int, device: torch.device) -> dict[str, dict[str, object]]:
    """Time the steps alternately, so load and clock drift hit each alike.

    A warm-up round first (each step alone: first loss, peak GPU memory), then ``rounds`` timed
    rounds, the order reversed every other round. Returns per step: median seconds, times, first loss, peak.
    """
    results = {}
    for name, step in steps.items():
        loss, peak, operators = warm_up(step, device)
        results[name] = {"first_loss": loss, "cuda_max_allocated_mib": _rounded(peak), "operators": operators,
                         "times": []}
    names = list(steps)
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            results[name]["times"].append(timed(steps[name], device))
    for result in results.values():
        result["seconds"] = statistics.median(result["times"])
    return results


def sequential(step: Step, rounds: int, device: torch.device) -> dict[str, object]:
    """``rounds`` timed steps after one warm-up (for the slow reference pattern, timed on its own)."""
    loss, peak, _ = warm_up(step, device)
    times = [timed(step, device) for _ in range(rounds)]
    return {"first_loss": loss, "cuda_max_allocated_mib": _rounded(peak), "times": times,
            "seconds": statistics.median(times)}


def floor_rounds(kind: str, steps: int, device: torch.device) -> int:
    """A CLIPFit step runs the image tower (tens of seconds on a CPU); a linear one takes microseconds."""
    if kind == "linear":
        return 5 * steps
    return max(3, steps // 3) if kind == "clipfit" and device.type == "cpu" else steps


# ---------------------------------------------------------------------------------------- CoOp vs reference


class ReferencePattern:
    """The reference code's per-step work, re-created faithfully (full-length text, repeated passes)."""

    def __init__(self, prompts: CoOpPrompts, objective: Objective) -> None:
        self.prompts = prompts
        self.objective = objective.for_kind(prompts)
        backbone = prompts.backbone
        placeholder = " ".join(["X"] * prompts.n_ctx)
        self.tokens = backbone.tokenize([f"{placeholder} {name}." for name in prompts.classnames])
        with torch.no_grad():
            self.embeddings = backbone.model.token_embedding(self.tokens)

    def text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        model = self.prompts.backbone.model
        n = self.prompts.n_ctx
        prompts = torch.cat([self.embeddings[:, :1], ctx.expand(len(self.tokens), -1, -1).to(self.embeddings),
                             self.embeddings[:, 1 + n:]], dim=1)
        x = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)
        rows = torch.arange(len(self.tokens), device=self.tokens.device)
        x = model.ln_final(x)[rows, self.tokens.argmax(-1)] @ model.text_projection
        return F.normalize(x, dim=-1)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model, scale = self.prompts.backbone.model, self.prompts.scale
        ts = self.objective.path_ts()
        with torch.no_grad():
            passes = [F.normalize(model.encode_image(images), dim=-1) for _ in range(1 + len(ts))]
            ft_text = self.text_features(self.prompts.ctx_ft)
        text = self.text_features(self.prompts.ctx)
        text_again = self.text_features(self.prompts.ctx)  # the reference encodes the prompts twice
        ce = F.cross_entropy(scale * passes[0] @ text.t(), labels)
        surrogate = 1 - F.cosine_similarity(text_again, self.prompts.zero_shot_class_features(), dim=-1).mean()
        path = torch.stack([
            F.cross_entropy(scale * passes[k + 1] @ F.normalize(ft_text + t * (text - ft_text), dim=-1).t(), labels)
            for k, t in enumerate(ts.tolist())]).mean()
        return ce + self.objective.lam_zs * surrogate + self.objective.lam_lmc * path


def measure(model: str, classes: int, batch: int, steps: int, reference_steps: int, device: str = "cpu",
            precision: str = "fp32") -> dict[str, object]:
    """Our CoOp step against the reference pattern (same loss on the first batch, then timed)."""
    bench = setup(model, classes, batch, device, precision)
    backbone = bench.backbone
    noise = 0.02 * torch.randn(4, backbone.text_width, device=bench.device)
    prompts = CoOpPrompts(backbone, init_context(backbone, "a photo of a") + noise, bench.names, TEMPLATES)
    reference = ReferencePattern(prompts, REFERENCE_OBJECTIVE)
    synchronize(bench.device)
    start = time.perf_counter()
    features = bench.features  # what our loop does once per run, not per step
    synchronize(bench.device)
    extraction = time.perf_counter() - start
    surrogate = build_surrogate(REFERENCE_OBJECTIVE.surrogate, prompts)
    with torch.no_grad(), backbone.autocast():
        ours_loss = float(mergetune_loss(prompts, REFERENCE_OBJECTIVE, features, bench.labels, surrogate).total)
        reference_loss = float(reference.loss(bench.images, bench.labels))
    ours = sequential(repair_step(prompts, features, bench.labels, REFERENCE_OBJECTIVE), steps, bench.device)
    theirs = sequential(update_step([prompts.ctx], lambda: reference.loss(bench.images, bench.labels), backbone),
                        reference_steps, bench.device)
    return {
        "model": model, "classes": classes, "batch": batch, "precision": precision,
        "loss_ours": ours_loss, "loss_reference": reference_loss,
        "loss_abs_diff": abs(ours_loss - reference_loss),
        "step_seconds_ours": ours["seconds"], "step_seconds_reference": theirs["seconds"],
        "speedup": theirs["seconds"] / ours["seconds"],
        "feature_extraction_seconds_once": extraction,
        "steps_timed": {"ours": len(ours["times"]), "reference": len(theirs["times"])},
        "cuda_max_allocated_mib": {"ours": ours["cuda_max_allocated_mib"],
                                   "reference": theirs["cuda_max_allocated_mib"]},
    }


# ---------------------------------------------------------------------------------------- floors


def measure_floors(model: str, classes: int, batch: int, steps: int, device: str = "cpu",
                   precision: str = "fp32", kinds: Sequence[str] = tuple(FLOOR_STEPS)) -> list[dict[str, object]]:
    """Per kind: our step and its floor, interleaved in this process; step / floor against the goal."""
    bench = setup(model, classes, batch, device, precision)
    rows = []
    for name in kinds:
        kind, inputs = build_kind(name, bench)
        steps_by_name = {"ours": repair_step(kind, inputs, bench.labels), "floor": FLOOR_STEPS[name](bench, kind)}
        result = interleaved(steps_by_name, floor_rounds(name, steps, bench.device), bench.device)
        ours, floor = result["ours"], result["floor"]
        ratio = ours["seconds"] / floor["seconds"]
        rows.append({
            "kind": name, "classes": classes, "batch": batch, "precision": precision,
            "trainable_numbers": kind.num_trainable(), "inputs": "pixels" if name == "clipfit" else "cached features",
            "step_seconds": ours["seconds"], "floor_seconds": floor["seconds"], "ratio": ratio,
            "goal": GOALS[name], "goal_met": ratio <= GOALS[name], "floor": FLOORS[name],
            "steps_timed": len(ours["times"]), "operators": {"ours": ours["operators"], "floor": floor["operators"]},
            "cuda_max_allocated_mib": {"ours": ours["cuda_max_allocated_mib"],
                                       "floor": floor["cuda_max_allocated_mib"]},
        })
    return rows


def kind_rows(floor_rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The ``kinds`` part (our step per kind): the floors' own measurement of our step, not a second one."""
    keys = ("kind", "classes", "batch", "precision", "trainable_numbers", "step_seconds", "inputs",
            "peak_rss_mib_of_process")
    return [{key: row[key] for key in keys if key in row} for row in floor_rows]


# ---------------------------------------------------------------------------------------- CLIPFit's cache


def measure_clipfit_cache(model: str, classes: int, batch: int, steps: int, device: str = "cpu",
                          precision: str = "fp32") -> dict[str, object]:
    """The CLIPFit step recomputing the image features at w_ft each step (before) and caching them (after).

    Two kinds on one backbone, interleaved; the same pixel batch every step, as in training without
    augmentation (the case the cache serves). Both start at w_ft, so their first losses must agree.
    """
    bench = setup(model, classes, batch, device, precision)
    before, _ = build_kind("clipfit", bench)
    after, pixels = build_kind("clipfit", bench)
    supported = hasattr(after, "cache_ft_images")
    setattr(before, "cache_ft_images", False)
    result = interleaved({"before": repair_step(before, pixels, bench.labels),
                          "after": repair_step(after, pixels, bench.labels)},
                         floor_rounds("clipfit", steps, bench.device), bench.device)
    first, second = result["before"], result["after"]
    return {
        "classes": classes, "batch": batch, "precision": precision, "cache_attribute_present": supported,
        "cache_ft_images_after": getattr(after, "cache_ft_images", None),
        "before_seconds": first["seconds"], "after_seconds": second["seconds"],
        "speedup": first["seconds"] / second["seconds"],
        "first_loss_abs_diff": abs(first["first_loss"] - second["first_loss"]),
        "steps_timed": len(first["times"]),
        "cuda_max_allocated_mib": {"before": first["cuda_max_allocated_mib"],
                                   "after": second["cuda_max_allocated_mib"]},
    }


# ---------------------------------------------------------------------------------------- memory


def rss_mib() -> float:
    """This process's resident memory now (Linux ``/proc``; elsewhere the peak so far)."""
    try:
        return _proc_status_mib("VmRSS")
    except (OSError, KeyError, ValueError):
        return peak_rss_mib()


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS count afresh (Linux ``clear_refs``), so it covers the steps alone.
    False where the kernel does not allow it (then the peak includes loading the model)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset() -> float:
    """The kernel's peak RSS (``VmHWM``, the same count as ``VmRSS``) since :func:`reset_peak_rss`."""
    try:
        return _proc_status_mib("VmHWM")
    except (OSError, KeyError, ValueError):
        return peak_rss_mib()


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (``ru_maxrss``), in MiB on Linux and macOS alike."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure_memory(model: str, kind_name: str, classes: int, batch: int, steps: int, device: str = "cpu",
                   precision: str = "fp32", text_chunk_size: int | None | str = DEFAULT_CHUNKS) -> dict[str, object]:
    """Resident memory of ``steps`` repair steps of one kind; meant to run alone in a fresh process.

    ``ru_maxrss`` alone would include loading the model, so this records the RSS right before the
    steps and the peak during them (the kernel's count reset in between), and their difference.
    ``text_chunk_size``: ``"default"`` keeps the kind's own; None encodes every prompt at once.
    """
    bench = setup(model, classes, batch, device, precision)
    kind, inputs = build_kind(kind_name, bench)
    supported = hasattr(kind, "text_chunk_size")
    if text_chunk_size != DEFAULT_CHUNKS:
        setattr(kind, "text_chunk_size", text_chunk_size)
    step = repair_step(kind, inputs, bench.labels)
    loading_peak = peak_rss_mib()
    reset = reset_peak_rss()
    before = rss_mib()
    if bench.device.type == "cuda":
        synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(bench.device)
    seconds = (time.perf_counter() - start) / steps
    during = peak_rss_since_reset() if reset else peak_rss_mib()
    return {
        "kind": kind_name, "classes": classes, "batch": batch, "precision": precision,
        "text_chunk_size": getattr(kind, "text_chunk_size", None),
        "setting": "default" if text_chunk_size == DEFAULT_CHUNKS else f"text_chunk_size={text_chunk_size}",
        "chunk_attribute_present": supported, "steps": steps, "step_seconds": seconds,
        "rss_mib_before_steps": round(before, 1),
        "peak_rss_mib_during_steps": round(during, 1) if reset else None,
        "rss_increase_mib": round(during - before, 1),
        "peak_rss_mib_of_process": round(max(loading_peak, during), 1),
        "cuda_max_allocated_mib": _rounded(torch.cuda.max_memory_allocated(bench.device) / MIB)
        if bench.device.type == "cuda" else None,
    }


def memory_plan(classes: Sequence[int]) -> list[tuple[str, int, int | None | str]]:
    """(kind, classes, text_chunk_size): ours at every count; at the largest, all prompts at once for contrast."""
    plan = [(kind, count, DEFAULT_CHUNKS) for count in classes for kind in ("coop", "clipfit")]
    return plan + [(kind, max(classes), None) for kind in ("coop", "clipfit")]


# ---------------------------------------------------------------------------------------- extraction


def measure_extraction(model: str, image_dir: Path | None, count: int, batch: int, workers: int,
                       device: str = "cpu", precisions: Sequence[str] = ("fp32", "bf16")) -> list[dict[str, object]]:
    """Images/s of feature extraction: a plain loop over ``encode_image`` against ours.

    Plain: decode and preprocess one image at a time in the main process, ``encode_image`` per
    batch under ``no_grad``. Ours: ``repair.data.features.extract_features`` (DataLoader workers decoding in
    parallel, ``inference_mode``, channels-last), at each precision (autocast).
    """
    from PIL import Image

    from repair.data.folders import scan_image_folder
    from repair.data.features import extract_features
    from repair.synthetic import make_image_folder

    if image_dir is None or not image_dir.is_dir():
        image_dir = make_image_folder(Path(tempfile.mkdtemp()) / "images", ["red", "green", "blue", "yellow"],
                                      count // 4 + 1, size=224)
    dataset = scan_image_folder(image_dir)
    dataset = dataset.subset(range(min(count, len(dataset))))
    rows = []
    backbone = load_backbone(BackboneSpec(model, "none"), device=device)

    synchronize(backbone.device)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(dataset), batch):
            pixels = torch.stack([backbone.preprocess(Image.open(path).convert("RGB"))
                                  for path in dataset.files[first:first + batch]])
            backbone.model.encode_image(pixels.to(backbone.device))
    synchronize(backbone.device)
    plain = time.perf_counter() - start
    rows.append({"method": "plain loop", "images": len(dataset), "seconds": plain,
                 "images_per_second": len(dataset) / plain})
    for precision in precisions:
        backbone = load_backbone(BackboneSpec(model, "none"), device=device, precision=precision)
        start = time.perf_counter()
        extract_features(backbone, dataset, cache_dir=None, batch_size=batch, workers=workers)
        synchronize(backbone.device)
        seconds = time.perf_counter() - start
        rows.append({"method": f"mergetune ({precision}, {workers} workers)", "images": len(dataset),
                     "seconds": seconds, "images_per_second": len(dataset) / seconds})
    return rows


# ---------------------------------------------------------------------------------------- processes


def in_fresh_process(function, *args, threads: int | None = None):
    """Run one measurement in its own process, so its peak resident memory is its own.

    ``threads``: torch's intra-op threads there (a spawned process does not inherit ``set_num_threads``).
    """
    context = multiprocessing.get_context("spawn")  # also what CUDA needs
    # not a Pool: its daemonic workers may not start DataLoader workers of their own
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_set_threads,
                                                initargs=(threads,)) as pool:
        return pool.submit(_with_peak_memory, function, *args).result()


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _with_peak_memory(function, *args):
    result = function(*args)
    peak_mib = round(peak_rss_mib(), 1)
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        row.setdefault("peak_rss_mib_of_process", peak_mib)  # a memory row has its own, from before the reset
    return result


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ---------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (then fp32, bf16 and fp16 autocast)")
    parser.add_argument("--precisions", nargs="+", choices=CUDA_PRECISIONS, default=None,
                        help="autocast precisions to time (default: fp32 on the CPU, all three on CUDA)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=11, help="timed steps (CLIPFit on a CPU: a third of them)")
    parser.add_argument("--reference-steps", type=int, default=3)
    parser.add_argument("--cache-classes", type=int, nargs="+", default=[10], help="class counts of clipfit_cache")
    parser.add_argument("--memory-classes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "flowers5", help="an ImageFolder for the extraction timing (generated if absent)")
    parser.add_argument("--extraction-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="write the RESULTS.md speed section here")
    parser.add_argument("--markdown-only", action="store_true", help="regenerate --markdown from --out; no timing")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.markdown and args.out is None:
        parser.error("--markdown needs --out (RESULTS.md is rendered from the JSON results)")
    if args.markdown_only and not args.markdown:
        parser.error("--markdown-only needs --markdown and --out")
    return args


def check_device(name: str) -> torch.device:
    """The device to time on, or exit with one line saying why it cannot be used."""
    try:
        device = resolve_device(name)
    except MergetuneError as exc:
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        where = f" (torch {torch.__version__}, {build})" if name.startswith("cuda") else ""
        raise SystemExit(f"benchmarks.speed: error: {exc}{where}") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"benchmarks.speed: error: --device {name}: only cpu and cuda are benchmarked")
    return device


def new_report(args: argparse.Namespace, device: torch.device, precisions: Sequence[str]) -> dict[str, object]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"schema": SCHEMA, "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
            "cpus": os.cpu_count(), "device": device.type, "gpu": gpu, "machine": platform.machine(),
            "model": args.model, "weights": "random (timing only)", "precisions": list(precisions),
            "batch": args.batch, "goals": GOALS,
            "coop_vs_reference": [], "kinds": [], "floors": [], "clipfit_cache": [], "memory": [], "extraction": []}


def measure_at(report: dict[str, list], args: argparse.Namespace, device: str, precision: str) -> None:
    """Every asked-for part at one precision, each measurement in a fresh process; the report is rewritten
    after each, so a late failure loses nothing."""
    def fresh(*call):
        return in_fresh_process(*call, threads=args.threads)

    if "coop_vs_reference" in args.parts:
        for count in args.classes:
            report["coop_vs_reference"].append(fresh(measure, args.model, count, args.batch, args.steps,
                                                     args.reference_steps, device, precision))
            _save(report, args.out)
    if "floors" in args.parts:
        for count in args.classes:
            rows = fresh(measure_floors, args.model, count, args.batch, args.steps, device, precision)
            report["floors"] += rows
            report["kinds"] += kind_rows(rows)
            _save(report, args.out)
    if "clipfit_cache" in args.parts:
        for count in args.cache_classes:
            report["clipfit_cache"].append(fresh(measure_clipfit_cache, args.model, count, args.batch, args.steps,
                                                 device, precision))
            _save(report, args.out)
    if "memory" in args.parts:
        for kind, count, chunks in memory_plan(args.memory_classes):
            report["memory"].append(fresh(measure_memory, args.model, kind, count, args.batch, args.memory_steps,
                                          device, precision, chunks))
            _save(report, args.out)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.markdown_only:
        write_results(markdown=args.markdown, speed_json=args.out)
        return
    device = check_device(args.device)
    precisions = args.precisions or (CUDA_PRECISIONS if device.type == "cuda" else CPU_PRECISIONS)
    report = new_report(args, device, precisions)
    for precision in precisions:
        measure_at(report, args, str(device), precision)
    if "extraction" in args.parts:  # its rows name their precisions: bf16 is timed on the CPU too
        extraction_precisions = args.precisions or (CUDA_PRECISIONS if device.type == "cuda" else ("fp32", "bf16"))
        report["extraction"] = in_fresh_process(measure_extraction, args.model, args.images, args.extraction_images,
                                                args.batch, args.workers, str(device), extraction_precisions,
                                                threads=args.threads)
        _save(report, args.out)
    if args.markdown:
        write_results(markdown=args.markdown, speed_json=args.out)
    print(json.dumps(report, indent=2))


# ---------------------------------------------------------------------------------------- RESULTS.md


def speed_markdown(report: dict) -> str:
    """The speed section of benchmarks/RESULTS.md, regenerated from speed.json (schema 1 or 2)."""
    lines = ["## Speed", "", _header(report), ""]
    for section in (_reference_table, _floor_table, _kind_table, _cache_table, _memory_table, _scale_out_table,
                    _extraction_table):
        table = section(report)
        if table:
            lines += table + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _header(report: dict) -> str:
    device, precisions = report.get("device", "cpu"), ", ".join(report.get("precisions", ["fp32"]))
    return (f"{report['model']}, {report['weights']}, timed on {device} ({precisions}), {report['cpus']} CPU cores, "
            f"torch {report['torch']}, GPU: {report.get('gpu') or 'none available'}. "
            "Source: `benchmarks/results/speed.json`.")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _precision(row: dict) -> str:
    return row.get("precision", "fp32")  # speed/1 rows are fp32


def _mib(value: object) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _gpu_peaks(rows: list[dict]) -> bool:
    """Whether the rows carry peak GPU memory (a CUDA run): then their table gets a column for it."""
    def has_peak(value: object) -> bool:
        return any(v is not None for v in value.values()) if isinstance(value, dict) else value is not None

    return any(has_peak(row.get("cuda_max_allocated_mib")) for row in rows)


def _with_gpu(header: list[str], cells: list[list[str]], rows: list[dict], *names: str) -> list[str]:
    """The table, with a last column of peak GPU memory (``names``: which steps, e.g. ours / floor) on CUDA."""
    if not _gpu_peaks(rows):
        return _table(header, cells)
    label = "peak GPU " + " / ".join(names) + " (MiB)" if names else "peak GPU (MiB)"
    peaks = [row.get("cuda_max_allocated_mib") for row in rows]
    column = [" / ".join(_mib((peak or {}).get(name)) for name in names) if names else _mib(peak) for peak in peaks]
    return _table(header + [label], [row + [value] for row, value in zip(cells, column)])


def _reference_table(report: dict) -> list[str]:
    rows = report.get("coop_vs_reference") or []
    header = ["CoOp repair step", "classes", "precision", "ours (s)", "reference pattern (s)", "ratio",
              "loss ours / reference", "peak RSS of the process (MiB)"]
    cells = [[f"batch {row['batch']}", str(row["classes"]), _precision(row), f"{row['step_seconds_ours']:.3f}",
              f"{row['step_seconds_reference']:.1f}", f"{row['speedup']:.0f}x",
              f"{row['loss_ours']:.7f} / {row['loss_reference']:.7f}", str(row["peak_rss_mib_of_process"])]
             for row in rows]
    return _with_gpu(header, cells, rows, "ours", "reference") if rows else []


def _floor_table(report: dict) -> list[str]:
    rows = report.get("floors") or []
    if not rows:
        return []
    goals = report.get("goals", GOALS)
    lines = ["Each kind's step against its floor, the least work one step of it can do (timed interleaved with "
             "ours in one process, medians; both take the same SGD update). Goals: " +
             ", ".join(f"{kind} ≤ {goal}x" for kind, goal in goals.items()) + ".", ""]
    lines += [f"- {kind} floor: {text}." for kind, text in FLOORS.items() if any(r["kind"] == kind for r in rows)]
    header = ["kind", "classes", "batch", "precision", "our step (s)", "floor (s)", "step / floor", "goal", "met"]
    cells = [[row["kind"], str(row["classes"]), str(row["batch"]), _precision(row), f"{row['step_seconds']:.4f}",
              f"{row['floor_seconds']:.4f}", f"{row['ratio']:.2f}x", f"≤ {row['goal']}x",
              "yes" if row["goal_met"] else "no"] for row in rows]
    lines += [""] + _with_gpu(header, cells, rows, "ours", "floor")
    counted = [row for row in rows if row.get("operators")]
    if counted:
        lines += ["", "Aten operators one step dispatches (forward, backward and update), ours / floor: " + "; ".join(
            f"{row['kind']} at {row['classes']} classes {row['operators']['ours']} / {row['operators']['floor']}"
            for row in counted) + "."]
    return lines


def _kind_table(report: dict) -> list[str]:
    rows = report.get("kinds") or []
    header = ["kind", "classes", "precision", "trainable numbers", "repair step (s)", "inputs"]
    cells = [[row["kind"], str(row["classes"]), _precision(row), f"{row['trainable_numbers']:,}",
              f"{row['step_seconds']:.4f}", row["inputs"]] for row in rows]
    return _table(header, cells) if rows else []


def _cache_table(report: dict) -> list[str]:
    rows = report.get("clipfit_cache") or []
    if not rows:
        return []
    lines = ["CLIPFit's path term needs the image features at w_ft: recomputed every step (before) or computed "
             "once per image and cached (after, `cache_ft_images`); the same pixel batch every step, as in "
             "training without augmentation.", ""]
    header = ["CLIPFit step", "classes", "precision", "recomputed (s)", "cached (s)", "speedup",
              "first-loss difference", "cache attribute present"]
    cells = [[f"batch {row['batch']}", str(row["classes"]), _precision(row), f"{row['before_seconds']:.3f}",
              f"{row['after_seconds']:.3f}", f"{row['speedup']:.2f}x", f"{row['first_loss_abs_diff']:.1e}",
              "yes" if row["cache_attribute_present"] else "no"] for row in rows]
    return lines + _with_gpu(header, cells, rows, "before", "after")


def _memory_table(report: dict) -> list[str]:
    rows = report.get("memory") or []
    if not rows:
        return []
    lines = ["Resident memory of repair steps, each measurement alone in a fresh process: the RSS right before "
             "the steps (the model, the kind, the batch), the peak during them, and the increase.", ""]
    header = ["kind", "classes", "precision", "text encoding", "RSS before steps (MiB)", "peak during steps (MiB)",
              "increase (MiB)", "peak RSS of the process (MiB)", "step, mean (s)"]
    cells = [[row["kind"], f"{row['classes']:,}", _precision(row), _chunking(row), _mib(row["rss_mib_before_steps"]),
              _mib(row["peak_rss_mib_during_steps"]), _mib(row["rss_increase_mib"]),
              _mib(row["peak_rss_mib_of_process"]), f"{row['step_seconds']:.2f}"] for row in rows]
    return lines + _with_gpu(header, cells, rows)


def _chunking(row: dict) -> str:
    chunks = row["text_chunk_size"]
    text = "all prompts at once" if chunks is None else f"chunks of {chunks}"
    return text + (" (default)" if row["setting"] == "default" else "")


def _scale_out_table(report: dict) -> list[str]:
    """``scale_out`` (from ``benchmarks/scaleout.py``, when present): its rows as they are, one column per key."""
    rows = report.get("scale_out") or []
    if not rows:
        return []
    keys = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(key)) for key in keys] for row in rows]
    return ["Scale-out (images/s by number of processes):", ""] + _table([k.replace("_", " ") for k in keys], cells)


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.2f}" if isinstance(value, float) else str(value)


def _extraction_table(report: dict) -> list[str]:
    rows = report.get("extraction") or []
    cells = [[row["method"], str(row["images"]), f"{row['images_per_second']:.2f}"] for row in rows]
    return _table(["feature extraction", "images", "images/s"], cells) if rows else []


def _save(report: dict[str, object], path: Path | None) -> None:
    """Atomically, after every part: a run stopped mid-write keeps the previous file whole."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, replace=True) as temp:
            temp.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
