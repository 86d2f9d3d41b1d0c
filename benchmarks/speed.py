"""Time one MergeTune step for CoOp prompts: our loop against the reference computation pattern.

The reference pattern (as in the MergeTune reference code) runs the frozen image encoder once
per path point plus once for the main term (1 + K passes per step), encodes the current
prompts twice and the fine-tuned prompts once per step, all at the full 77-token context.
Our loop encodes images once per run (features cached), the current prompts once per step,
the fine-tuned and zero-shot class features once per run, and cuts sequences at end-of-text.

Both compute the same loss; the script checks that on the first batch before timing.

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
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.report import write_results
from repair.model.backbone import BackboneSpec, load_backbone
from repair.kinds import CLIPFit, CoOpPrompts, LinearHead
from repair.kinds.coop import init_context
from repair.train.objective import Objective, mergetune_loss

CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
              "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle"]


def class_list(count: int) -> list[str]:
    return [CLASSNAMES[i % len(CLASSNAMES)] + ("" if i < len(CLASSNAMES) else f" {i}") for i in range(count)]


class ReferencePattern:
    """The reference code's per-step work, re-created faithfully (full-length text, repeated passes)."""

    def __init__(self, prompts: CoOpPrompts, objective: Objective) -> None:
        self.prompts = prompts
        self.objective = objective
        backbone = prompts.backbone
        placeholder = " ".join(["X"] * prompts.n_ctx)
        self.tokens = backbone.tokenize([f"{placeholder} {name}." for name in prompts.classnames])
        with torch.no_grad():
            self.embeddings = backbone.model.token_embedding(self.tokens)

    def text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        model = self.prompts.backbone.model
        n = self.prompts.n_ctx
        prompts = torch.cat([self.embeddings[:, :1], ctx.expand(len(self.tokens), -1, -1),
                             self.embeddings[:, 1 + n:]], dim=1)
        x = model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask)
        x = model.ln_final(x)[torch.arange(len(self.tokens)), self.tokens.argmax(-1)] @ model.text_projection
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


def timed_steps(step, parameters, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(parameters, lr=1e-6)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        step().backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def measure(model: str, classes: int, batch: int, steps: int, reference_steps: int) -> dict[str, object]:
    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec(model, "none"))
    names = class_list(classes)
    ctx = init_context(backbone, "a photo of a") + 0.02 * torch.randn(4, backbone.text_width)
    prompts = CoOpPrompts(backbone, ctx, names, ["a photo of a {}."])
    objective = Objective()
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % classes

    reference = ReferencePattern(prompts, objective)
    start = time.perf_counter()
    with torch.no_grad():
        features = backbone.encode_images(images)  # what our loop does once per run, not per step
    extraction = time.perf_counter() - start
    with torch.no_grad():
        ours_loss = float(mergetune_loss(prompts, objective, features, labels).total)
        reference_loss = float(reference.loss(images, labels))
    ours = timed_steps(lambda: mergetune_loss(prompts, objective, features, labels).total, [prompts.ctx], steps)
    theirs = timed_steps(lambda: reference.loss(images, labels), [prompts.ctx], reference_steps)
    ours_step, reference_step = _median(ours[1:] or ours), _median(theirs[1:] or theirs)
    return {
        "model": model, "classes": classes, "batch": batch,
        "loss_ours": ours_loss, "loss_reference": reference_loss,
        "loss_abs_diff": abs(ours_loss - reference_loss),
        "step_seconds_ours": ours_step, "step_seconds_reference": reference_step,
        "speedup": reference_step / ours_step,
        "feature_extraction_seconds_once": extraction,
        "steps_timed": {"ours": len(ours), "reference": len(theirs)},
    }


def measure_kinds(model: str, classes: int, batch: int, steps: int) -> list[dict[str, object]]:
    """Our repair step for every kind (default objective), with its number of trainable numbers."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec(model, "none"))
    names = class_list(classes)
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    labels = torch.arange(batch) % classes
    with torch.no_grad():
        features = backbone.encode_images(images)
    kinds = {
        "coop": (CoOpPrompts.zero_shot(backbone, names, ["a photo of a {}."]), features),
        "linear": (LinearHead.zero_shot(backbone, names, ["a photo of a {}."]), features),
        "clipfit": (CLIPFit.zero_shot(backbone, names, ["a photo of a {}."]), images),
    }
    rows = []
    for name, (kind, inputs) in kinds.items():
        objective = Objective(lam_zs=1.0)
        times = timed_steps(lambda: mergetune_loss(kind, objective, inputs, labels).total,
                            list(kind.trainable().values()), steps if name != "clipfit" else max(3, steps // 3))
        rows.append({"kind": name, "classes": classes, "batch": batch, "trainable_numbers": kind.num_trainable(),
                     "step_seconds": _median(times[1:] or times), "inputs": "pixels" if name == "clipfit"
                     else "cached features"})
    return rows


def measure_extraction(model: str, image_dir: Path | None, count: int, batch: int, workers: int
                       ) -> list[dict[str, object]]:
    """Images/s of feature extraction: a plain loop over ``encode_image`` against ours.

    Plain: decode and preprocess one image at a time in the main process, ``encode_image`` per
    batch under ``no_grad``. Ours: ``repair.data.features.extract_features`` (DataLoader workers decoding in
    parallel, ``inference_mode``, channels-last), at fp32 and with bf16 autocast.
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
    backbone = load_backbone(BackboneSpec(model, "none"))

    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(dataset), batch):
            pixels = torch.stack([backbone.preprocess(Image.open(path).convert("RGB"))
                                  for path in dataset.files[first:first + batch]])
            backbone.model.encode_image(pixels)
    plain = time.perf_counter() - start
    rows.append({"method": "plain loop", "images": len(dataset), "seconds": plain,
                 "images_per_second": len(dataset) / plain})
    for precision in ("fp32", "bf16"):
        backbone = load_backbone(BackboneSpec(model, "none"), precision=precision)
        start = time.perf_counter()
        extract_features(backbone, dataset, cache_dir=None, batch_size=batch, workers=workers)
        seconds = time.perf_counter() - start
        rows.append({"method": f"mergetune ({precision}, {workers} workers)", "images": len(dataset),
                     "seconds": seconds, "images_per_second": len(dataset) / seconds})
    return rows


def in_fresh_process(function, *args):
    """Run one measurement in its own process, so its peak resident memory is its own."""
    context = multiprocessing.get_context("spawn")
    # not a Pool: its daemonic workers may not start DataLoader workers of their own
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_with_peak_memory, function, *args).result()


def _with_peak_memory(function, *args):
    result = function(*args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        row["peak_rss_mib_of_process"] = round(peak_mib, 1)
    return result


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, nargs="+", default=[10])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--reference-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                        / "flowers5", help="an ImageFolder for the extraction timing (generated if absent)")
    parser.add_argument("--extraction-images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="write the RESULTS.md speed section here")
    parser.add_argument("--markdown-only", action="store_true", help="regenerate --markdown from --out; no timing")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.markdown and args.out is None:
        parser.error("--markdown needs --out (RESULTS.md is rendered from the JSON results)")
    if args.markdown_only:
        write_results(markdown=args.markdown, speed_json=args.out)
        return
    report = {"schema": "mergetune.speed/1", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "machine": platform.machine(), "model": args.model, "weights": "random (timing only)",
              "coop_vs_reference": [], "kinds": [], "extraction": []}
    for count in args.classes:  # the report is rewritten after every part, so a late failure loses nothing
        report["coop_vs_reference"].append(
            in_fresh_process(measure, args.model, count, args.batch, args.steps, args.reference_steps))
        _save(report, args.out)
    for count in args.classes:
        report["kinds"] += in_fresh_process(measure_kinds, args.model, count, args.batch, args.steps)
        _save(report, args.out)
    report["extraction"] = in_fresh_process(measure_extraction, args.model, args.images, args.extraction_images,
                                            args.batch, args.workers)
    _save(report, args.out)
    if args.markdown:
        write_results(markdown=args.markdown, speed_json=args.out)
    print(json.dumps(report, indent=2))


def speed_markdown(report: dict) -> str:
    """The speed section of benchmarks/RESULTS.md, regenerated from speed.json."""
    lines = ["## Speed", "",
             f"{report['model']}, {report['weights']}, {report['cpus']} CPU cores, torch {report['torch']}, "
             f"GPU: {report['gpu'] or 'none available'}. Source: `benchmarks/results/speed.json`.", "",
             "| CoOp repair step | classes | ours (s) | reference pattern (s) | ratio | loss ours / reference | "
             "peak RSS of the process (MiB) |", "|---|---|---|---|---|---|---|"]
    for row in report["coop_vs_reference"]:
        lines.append(f"| batch {row['batch']} | {row['classes']} | {row['step_seconds_ours']:.3f} | "
                     f"{row['step_seconds_reference']:.1f} | {row['speedup']:.0f}x | "
                     f"{row['loss_ours']:.7f} / {row['loss_reference']:.7f} | {row['peak_rss_mib_of_process']} |")
    lines += ["", "| kind | classes | trainable numbers | repair step (s) | inputs |", "|---|---|---|---|---|"]
    for row in report["kinds"]:
        lines.append(f"| {row['kind']} | {row['classes']} | {row['trainable_numbers']:,} | "
                     f"{row['step_seconds']:.4f} | {row['inputs']} |")
    lines += ["", "| feature extraction | images | images/s |", "|---|---|---|"]
    for row in report["extraction"]:
        lines.append(f"| {row['method']} | {row['images']} | {row['images_per_second']:.2f} |")
    return "\n".join(lines) + "\n"


def _save(report: dict[str, object], path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
