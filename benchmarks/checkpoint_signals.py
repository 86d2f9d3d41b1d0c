"""What a repair can know about a fine-tuned checkpoint before it trains, for the benchmark's own checkpoints.

For each fine-tuned checkpoint a benchmark run left in the work folder (``runs/<task>/<kind>/seed<N>``), on the
images its repair trains on (the same shots, drawn with the same seed):

* the task gain the repair checks first (:mod:`repair.train.task_gain`): fine-tuned and zero-shot accuracy;
* with ``--vocabulary-kl``, how far its predictions over the reference vocabulary moved from zero-shot's: the
  mean KL(p_zs || p_ft) over the repair images (the kind of label-free signal a per-checkpoint choice of the
  repair's strength would read);
* with ``--image-drift``, for kinds that train the image tower (CLIPFit), how far the image features moved:
  one minus the mean cosine between each repair image's features at ``w_ft`` and at ``w_zs``.

    python -m benchmarks.checkpoint_signals                       # task gain of every checkpoint found
    python -m benchmarks.checkpoint_signals --kinds clipfit --vocabulary-kl --seeds 1 2 3 4 5 \
        --out benchmarks/results/checkpoint-signals-clipfit-kl.json
    python -m benchmarks.checkpoint_signals --kinds clipfit --image-drift \
        --out benchmarks/results/checkpoint-signals-clipfit-drift.json

It reads checkpoints only (run ``benchmarks.run`` and ``benchmarks.holdout`` first: seeds 1-10) and writes
``results/checkpoint-signals.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.run import DEFAULT_DATA_ROOT, PLANS, RESULTS, ensure_backbone, environment, plan_blocks, plan_tasks
from repair.data.features import default_cache_dir
from repair.data.folders import load_templates
from repair.io import read_tensors
from repair.kinds import Kind, load_kind
from repair.model.backbone import load_backbone
from repair.train.curvature import AtZeroShot, reference_vocabulary, scores_vocabulary, vocabulary_logits
from repair.train.task_gain import measure_task_gain, no_zero_shot_point
from repair.workflows.inputs import DataOptions, encode_for, read_record, select_training_images

SCHEMA = "mergetune.checkpoint-signals/1"
RUN_FOLDER = {"base_to_novel": "b2n", "domain": "robust", "robustness": "robust"}


@torch.no_grad()
def vocabulary_kl(kind: Kind, images: torch.Tensor, chunk: int = 256) -> float:
    """Mean KL(p_zs || p_ft) over the reference vocabulary (the kind's classes where it scores no others)."""
    names = reference_vocabulary(kind.classnames) if scores_vocabulary(kind) else None

    def log_probs() -> torch.Tensor:  # each chunk encodes the vocabulary again: few, large chunks
        return F.log_softmax(torch.cat([vocabulary_logits(kind, images[start:start + chunk], names).float()
                                        for start in range(0, len(images), chunk)]), dim=-1)

    finetuned = log_probs()
    with kind.zero_shot_model() or AtZeroShot(kind):
        zero_shot = log_probs()
    return float((zero_shot.exp() * (zero_shot - finetuned)).sum(-1).mean())


@torch.no_grad()
def image_drift(kind: Kind, pixels: torch.Tensor, chunk: int = 64) -> float | None:
    """1 - mean cos(f_ft(x), f_zs(x)) over the images; None for a kind that scores with the frozen image tower."""
    if kind.input_kind != "pixels":
        return None

    def features() -> torch.Tensor:
        encoder = kind.image_encoder()
        return torch.cat([F.normalize(encoder.encode(pixels[start:start + chunk]).float(), dim=-1)
                          for start in range(0, len(pixels), chunk)])

    finetuned = features()
    with kind.zero_shot_model() or AtZeroShot(kind):
        zero_shot = features()
    return float(1 - (finetuned * zero_shot).sum(-1).mean())


def checkpoint_signals(checkpoint: Path, train_dir: Path, seed: int, shots: int, backbone,
                       with_kl: bool, with_drift: bool = False) -> dict[str, object]:
    """The signals of one fine-tuned checkpoint on the shots its repair draws with ``seed``."""
    options = DataOptions(shots=shots)
    dataset, _ = select_training_images(train_dir, options, seed)
    source = read_tensors(checkpoint)
    record = read_record(source)
    kind = load_kind(backbone, source, dataset.classnames, load_templates(options.templates_file),
                     recorded_kind=record.kind if record else None,
                     recorded_options=record.kind_options if record else None)
    images = encode_for(kind, backbone, dataset, options, training=True)
    why_not = no_zero_shot_point(kind)
    if why_not is not None:
        return {"not_measured": why_not}
    row: dict[str, object] = measure_task_gain(kind, images).as_dict()
    row.pop("action")
    if with_kl:
        row["vocabulary_kl"] = vocabulary_kl(kind, images.features)
    if with_drift:
        row["image_drift"] = image_drift(kind, images.features)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--kinds", nargs="+", default=None, help="default: every kind the towers plan runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 11)))
    parser.add_argument("--vocabulary-kl", action="store_true", help="also the vocabulary KL (slow for pixel kinds)")
    parser.add_argument("--image-drift", action="store_true",
                        help="also how far the image features moved (kinds that train the image tower)")
    parser.add_argument("--out", type=Path, default=RESULTS / "checkpoint-signals.json")
    args = parser.parse_args(argv)
    spec, _ = ensure_backbone("towers", args.data_root, None, default_cache_dir())  # the proxy benchmarks.run built
    cache = default_cache_dir() / "bench"  # its work folder: task folders and checkpoints
    backbone = load_backbone(spec)
    plan = PLANS["towers"]
    started = time.perf_counter()
    rows = []
    for suite, task, kind in plan_blocks(plan, plan_tasks(plan, args.data_root, cache, print)):
        if args.kinds and kind not in args.kinds:
            continue
        for seed in args.seeds:
            checkpoint = (cache / "runs" / f"{RUN_FOLDER[suite]}-{task.dataset}-{task.style}" / kind / f"seed{seed}"
                          / "finetuned.safetensors")
            if not checkpoint.is_file():
                continue
            signals = checkpoint_signals(checkpoint, task.train, seed, plan.protocol[kind].shots, backbone,
                                         args.vocabulary_kl, args.image_drift)
            rows.append({"suite": suite, "dataset": task.dataset, "kind": kind, "seed": seed, **signals})
            print(json.dumps(rows[-1]), flush=True)
    result = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": environment(), "wall_s": round(time.perf_counter() - started, 1), "checkpoints": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({len(rows)} checkpoints)")


if __name__ == "__main__":
    main()
