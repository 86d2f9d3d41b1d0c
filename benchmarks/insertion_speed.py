"""Time one repair step of the kinds that put prompts or adapters into the towers, next to CoOp and CLIPFit.

Random weights (``--pretrained none``: timing only), one batch of random pixels, each kind at its
zero-shot or initial point built by ``zero_shot`` (what ``finetune`` starts from), the step as the repair
loop takes it (the default surrogate, the path term with K = 5 in feature space, an SGD update).
The steps are interleaved round by round in one process, so the machine's load affects them alike;
the median of the timed rounds is reported, after one untimed warm-up round. CoCoOp's first rounds encode
the path's class features at ``w_ft`` for each new image (cached afterwards, as the image features of the
image-side kinds are): the warm-up round pays that, the timed ones show the steady state.

    python -m benchmarks.insertion_speed --model ViT-B-16 --classes 10 --batch 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from repair.kinds import KINDS
from repair.model.backbone import BackboneSpec, load_backbone
from repair.train.objective import Objective, mergetune_loss
from repair.train.surrogates import build_surrogate

TEMPLATES = ["a photo of a {}."]
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck", "apple", "baby",
         "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl"]
KIND_NAMES = ("coop", "clipfit", "cocoop", "maple", "promptsrc", "mma")


def build(name: str, backbone, classes: list[str]):
    kind = KINDS[name].zero_shot(backbone, classes, TEMPLATES, KINDS[name].Options())
    objective = Objective(lam_zs=1.0, lam_lmc=1.0, surrogate="feature")  # data-free: each kind's step, no estimate
    surrogate = build_surrogate("feature", kind)
    optimizer = torch.optim.SGD(list(kind.trainable().values()), lr=1e-6, momentum=0.9)
    return kind, objective, surrogate, optimizer


def step(kind, objective, surrogate, optimizer, inputs, labels) -> float:
    began = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with kind.backbone.autocast():
        loss = mergetune_loss(kind, objective, inputs, labels, surrogate).total
    loss.backward()
    optimizer.step()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=list(KIND_NAMES))
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(BackboneSpec(args.model, "none"), device=args.device)
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    pixels = torch.randn(args.batch, 3, size, size, device=backbone.device)
    features = backbone.encode_images(pixels)
    labels = torch.arange(args.batch, device=backbone.device) % args.classes
    classes = NAMES[:args.classes]
    runs = {name: build(name, backbone, classes) for name in args.kinds}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):
        for name, (kind, objective, surrogate, optimizer) in runs.items():
            inputs = pixels if kind.input_kind == "pixels" else features
            seconds = step(kind, objective, surrogate, optimizer, inputs, labels)
            if round_index:  # the first round warms up (and fills the caches of constants)
                times[name].append(seconds)
    rows = [{"kind": name, "trainable_numbers": runs[name][0].num_trainable(), "inputs": runs[name][0].input_kind,
             "step_seconds_median": statistics.median(values), "step_seconds": [round(v, 3) for v in values]}
            for name, values in times.items()]
    print(json.dumps({"model": args.model, "classes": args.classes, "batch": args.batch, "device": args.device,
                      "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine(),
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
