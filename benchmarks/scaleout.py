"""Images/s of ``mergetune eval``'s feature encoding on 1, 2, ... processes of one machine (torchrun, gloo).

Each row is one torchrun run of this module's worker. Every rank builds the backbone and encodes a
few warm-up images on its own, then the ranks time ``extract_features(shard=True)`` between two
barriers: what ``mergetune eval --nproc N`` does per image folder (each rank encodes its shard,
the shards are gathered), without the imports and the model build, which do not shrink with N.
The machine's cores are shared evenly between the processes, as ``--nproc`` does.

    python -m benchmarks.scaleout    # 1 and 2 processes, 128 images -> benchmarks/results/scaleout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from repair.cli.launch import free_port

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers5"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scaleout.json"
WARMUP_IMAGES = 4  # one-time costs (thread pools, first-call allocations) stay out of the timing
RUN_TIMEOUT_S = 1800


def measure_scale_out(processes: list[int], *, model: str = "ViT-B-16", pretrained: str = "none",
                      image_dir: Path | None = DEFAULT_IMAGES, count: int = 128, batch: int = 64,
                      workers: int = 0, device: str = "cpu") -> list[dict[str, object]]:
    """One row per process count: {"processes", "images", "seconds", "images_per_second", ...}.

    Every count encodes the same ``count`` images (generated ones if ``image_dir`` is absent).
    """
    with tempfile.TemporaryDirectory(prefix="mergetune-scaleout-") as scratch:
        images = _image_folder(image_dir, Path(scratch), count)
        worker = ["--model", model, "--pretrained", pretrained, "--images", str(images), "--count", str(count),
                  "--batch", str(batch), "--workers", str(workers), "--device", device]
        return [_timed_run(n, worker, Path(scratch) / f"ranks{n}.json") for n in processes]


def _image_folder(image_dir: Path | None, scratch: Path, count: int) -> Path:
    """The given folder, else ``count`` generated 224 px images (four colour classes)."""
    if image_dir is not None and image_dir.is_dir():
        return image_dir
    from repair.synthetic import make_image_folder

    return make_image_folder(scratch / "images", ["red", "green", "blue", "yellow"], -(-count // 4), size=224)


def _timed_run(nproc: int, worker: list[str], result: Path) -> dict[str, object]:
    """torchrun ``nproc`` ranks of :func:`_worker` on this machine; rank 0 leaves the row in ``result``."""
    if nproc < 1:
        raise ValueError(f"processes must be at least 1, got {nproc}")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "benchmarks.scaleout", "--worker", str(result), *worker]
    subprocess.run(command, env=env, check=True, timeout=RUN_TIMEOUT_S)
    return json.loads(result.read_text())


def _worker(args: argparse.Namespace) -> None:
    """One rank: build, warm up alone, then time the sharded encoding with every rank started together."""
    from repair.data import group
    from repair.data.features import extract_features
    from repair.data.folders import scan_image_folder
    from repair.model.backbone import BackboneSpec, load_backbone

    distributed = group.init_from_env()
    rank, world = group.rank_and_world()
    backbone = load_backbone(BackboneSpec(args.model, args.pretrained),
                             device=group.rank_device(args.device))
    dataset = scan_image_folder(args.images)
    dataset = dataset.subset(range(min(args.count, len(dataset))))
    mine = group.shard(len(dataset), rank, world)
    extract_features(backbone, dataset.subset(mine[:WARMUP_IMAGES]), cache_dir=None, batch_size=args.batch)

    def together() -> None:
        if distributed:
            group.barrier()

    together()
    start = time.perf_counter()
    extract_features(backbone, dataset, cache_dir=None, batch_size=args.batch, workers=args.workers, shard=True)
    together()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(args.worker).write_text(json.dumps({
            "processes": world, "images": len(dataset), "seconds": seconds,
            "images_per_second": len(dataset) / seconds, "threads_per_process": torch.get_num_threads()}))


def _weights(model: str, pretrained: str) -> str:
    from repair.model.backbone import BackboneSpec

    if BackboneSpec(model, pretrained).uses_schema:
        return "the model's own"
    return "random (timing only)" if pretrained == "none" else pretrained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none", help="open_clip weights tag; none: random (timing only)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="an ImageFolder (generated if absent)")
    parser.add_argument("--count", type=int, default=128, help="images encoded per row")
    parser.add_argument("--batch", type=int, default=64, help="as mergetune eval")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding workers per rank, as --workers")
    parser.add_argument("--device", default="cpu", help="cpu, cuda (each rank its own GPU) or auto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a rank under torchrun
    args = parser.parse_args(argv)
    if args.worker is not None:
        _worker(args)
        return
    rows = measure_scale_out(args.processes, model=args.model, pretrained=args.pretrained, image_dir=args.images,
                             count=args.count, batch=args.batch, workers=args.workers, device=args.device)
    report = {"schema": "mergetune.scaleout/1", "torch": torch.__version__, "cpus": os.cpu_count(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "machine": platform.machine(), "model": args.model, "device": args.device,
              "weights": _weights(args.model, args.pretrained),
              "scale_out": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
