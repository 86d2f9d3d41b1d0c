"""Pretrain the proxy CLIP: a small open_clip ``CLIP`` trained from scratch on the shared images.

Real CLIP weights cannot be downloaded here, so the benchmark trains its own stand-in. Its
supervision is made broad and noisy on purpose, like web captions: a first proxy trained with
clean class captions on the downstream images left nothing for a prompt to learn.

- Images: Tiny-ImageNet train (200 classes), one ImageNet image for each of 1,000 classes,
  hymenoptera, CIFAR-10 train files 0-399 per class and 40 % of flowers5 (see ``splits.py``);
  no evaluation image is used.
- Captions, drawn afresh at every step: the class name (a random synonym) in a random template,
  a superclass caption ("a photo of an animal.") or a generic one ("a photo."). Only part of
  the CIFAR-10 and flowers5 images ever get their class name (30 %).
- Loss: contrastive, with every caption that is true of an image a positive for it (a superclass
  caption matches every image of that superclass), so same-class pairs are not false negatives.
- The logit scale is learned but floored, so downstream softmaxes are not flat.

The result is an open_clip ``local-dir:`` folder (``open_clip_config.json`` and
``open_clip_model.safetensors``) with ``PROXY.md`` and ``proxy.json`` beside them. It is rebuilt
only when the config, the data manifests or ``PROXY_VERSION`` change.

    python -m benchmarks.proxy --data-root ../shared/data --out ~/.cache/mergetune/proxy
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.splits import class_folders, cifar10_parts, flowers5_parts, images_in, missing_datasets

PROXY_VERSION = 1  # bump when the training code changes what is learned
MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 64, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults, so its eval transform matches
STD = (0.26862954, 0.26130258, 0.27577711)

CLASS_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.",
    "a low resolution photo of a {}.", "a cropped photo of a {}.", "a bright photo of a {}.",
    "a dark photo of a {}.", "an image of a {}.", "a picture of a {}.", "a {} in the wild.", "{}.",
)
SUPER_TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image showing {}.", "{}.")
GENERIC_CAPTIONS = ("a photo.", "an image.", "a picture of something.", "a small photo.", "a snapshot.")
SUPERCLASSES = {"animal": "an animal", "vehicle": "a vehicle", "flower": "a flower", "insect": "an insect"}
CIFAR_SUPER = {"airplane": "vehicle", "automobile": "vehicle", "ship": "vehicle", "truck": "vehicle",
               "bird": "animal", "cat": "animal", "deer": "animal", "dog": "animal", "frog": "animal",
               "horse": "animal"}


@dataclass(frozen=True)
class ProxyConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_logit_scale: float = 30.0
    seed: int = 0
    # how often each caption kind is drawn for an image that has a class name / only a superclass
    p_class: float = 0.5
    p_super: float = 0.35  # the rest are generic captions
    labelled_fraction: float = 0.3  # CIFAR-10 and flowers5 images that ever get their class name
    per_class_limit: int | None = None  # cap images per class (tests build a tiny proxy)
    sources: tuple[str, ...] = ("tiny_imagenet", "imagenet_samples", "hymenoptera", "cifar10", "flowers5")


@dataclass
class Sample:
    path: Path
    label: int  # global class index; -1 for none
    superclass: int  # index into SUPERCLASSES; -1 for none


@dataclass
class Corpus:
    samples: list[Sample] = field(default_factory=list)
    class_names: list[list[str]] = field(default_factory=list)  # synonyms per global class

    def add_class(self, names: list[str]) -> int:
        self.class_names.append(names)
        return len(self.class_names) - 1


# --------------------------------------------------------------------------- corpus


def build_corpus(data_root: Path, config: ProxyConfig) -> Corpus:
    corpus = Corpus()
    rng = random.Random(config.seed)
    limit = config.per_class_limit
    super_index = {name: index for index, name in enumerate(SUPERCLASSES)}

    def add(files: list[Path], names: list[str], superclass: str | None, labelled_fraction: float = 1.0) -> None:
        label = corpus.add_class(names)
        files = files[:limit] if limit else files
        labelled = set(rng.sample(range(len(files)), round(labelled_fraction * len(files))))
        sup = super_index[superclass] if superclass else -1
        for index, path in enumerate(files):
            corpus.samples.append(Sample(path, label if index in labelled else -1, sup))

    if "tiny_imagenet" in config.sources:
        root = data_root / "tiny_imagenet"
        for entry in json.loads((root / "classes.json").read_text()):
            names = [word.strip() for word in entry["words"].split(",") if word.strip()][:3] or [entry["name"]]
            add(images_in(root / "train" / entry["wnid"]), names, None)
    if "imagenet_samples" in config.sources:
        root = data_root / "imagenet_samples"
        for entry in json.loads((root / "classes.json").read_text()):
            add(images_in(root / entry["wnid"]), [entry["name"]], None)
    if "hymenoptera" in config.sources:
        root = data_root / "hymenoptera"
        for name, word in (("ants", "ant"), ("bees", "bee")):
            add(images_in(root / "train" / name) + images_in(root / "val" / name), [word], "insect")
    if "cifar10" in config.sources:
        for name, files in cifar10_parts(data_root / "cifar10")["pretrain"].items():
            add(files, [name], CIFAR_SUPER[name], config.labelled_fraction)
    if "flowers5" in config.sources:
        for name, files in flowers5_parts(data_root / "flowers5")["pretrain"].items():
            add(files, [name], "flower", config.labelled_fraction)
    return corpus


def input_fingerprint(data_root: Path, config: ProxyConfig) -> str:
    """What the proxy depends on: code version, architecture, config and every source's manifest."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": PROXY_VERSION, "model": MODEL_CFG, "config": asdict(config)},
                             sort_keys=True).encode())
    for source in sorted(config.sources):
        digest.update(source.encode())
        digest.update((data_root / source / "MANIFEST.sha256").read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- images


def load_small(path: Path, size: int) -> bytes:
    """Decode, shorter side to ``size`` (bicubic, as open_clip's eval transform), centre crop."""
    from PIL import Image

    with Image.open(path) as image:
        image.draft("RGB", (size * 2, size * 2))
        image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return image.crop((left, top, left + size, top + size)).tobytes()


def load_images(paths: list[Path], size: int, workers: int = 2) -> torch.Tensor:
    """All images as one uint8 tensor [N, 3, size, size]: decoding happens once per pretraining."""
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        raw = list(pool.map(load_small, paths, [size] * len(paths), chunksize=256))
    pixels = torch.frombuffer(bytearray(b"".join(raw)), dtype=torch.uint8)
    return pixels.view(len(paths), size, size, 3).permute(0, 3, 1, 2).contiguous()


def augment(batch: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random shifted crop (reflect padding) and horizontal flip, then open_clip normalisation."""
    images = batch.float().div_(255)
    n, _, size, _ = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    crops = torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets.tolist())])
    flip = torch.rand(n, generator=generator) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return normalize(crops)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


# --------------------------------------------------------------------------- captions


class CaptionSampler:
    """Draws one caption per image and says which images each caption is true of."""

    def __init__(self, corpus: Corpus, config: ProxyConfig, tokenizer, seed: int) -> None:
        self.corpus, self.config, self.tokenizer = corpus, config, tokenizer
        self.rng = random.Random(seed)
        self.tokens: dict[str, torch.Tensor] = {}
        self.super_words = list(SUPERCLASSES.values())

    def draw(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, ctx] and the positive mask [B images, B captions]."""
        captions, concepts = zip(*(self._caption(sample) for sample in samples))
        labels = torch.tensor([s.label for s in samples])
        supers = torch.tensor([s.superclass for s in samples])
        kinds = torch.tensor([kind for kind, _ in concepts])
        values = torch.tensor([value for _, value in concepts])
        by_class = (kinds == 0)[None, :] & (labels[:, None] == values[None, :]) & (labels[:, None] >= 0)
        by_super = (kinds == 1)[None, :] & (supers[:, None] == values[None, :]) & (supers[:, None] >= 0)
        generic = (kinds == 2)[None, :].expand(len(samples), -1)
        return torch.stack([self._tokenize(text) for text in captions]), by_class | by_super | generic

    def _caption(self, sample: Sample) -> tuple[str, tuple[int, int]]:
        roll = self.rng.random()
        has_class, has_super = sample.label >= 0, sample.superclass >= 0
        p_class = self.config.p_class if has_class else 0.0
        p_super = self.config.p_super if has_super else 0.0
        if not has_class and has_super:
            p_super = self.config.p_class + self.config.p_super  # unlabelled images lean on the superclass
        if has_class and not has_super:
            p_class = self.config.p_class + self.config.p_super
        if roll < p_class:
            name = self.rng.choice(self.corpus.class_names[sample.label])
            return self.rng.choice(CLASS_TEMPLATES).format(name), (0, sample.label)
        if roll < p_class + p_super:
            word = self.super_words[sample.superclass]
            return self.rng.choice(SUPER_TEMPLATES).format(word), (1, sample.superclass)
        return self.rng.choice(GENERIC_CAPTIONS), (2, -1)

    def _tokenize(self, text: str) -> torch.Tensor:
        if text not in self.tokens:
            self.tokens[text] = self.tokenizer([text])[0]
        return self.tokens[text]


def multi_positive_loss(image_features: torch.Tensor, text_features: torch.Tensor, positives: torch.Tensor,
                        logit_scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a uniform target over each row's (and column's) positives."""
    logits = logit_scale * image_features @ text_features.T
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True)) * F.log_softmax(logits, dim=1)
    text_to_image = -(targets / targets.sum(0, keepdim=True)) * F.log_softmax(logits, dim=0)
    return (image_to_text.sum(1).mean() + text_to_image.sum(0).mean()) / 2


# --------------------------------------------------------------------------- training


def pretrain(data_root: Path, config: ProxyConfig, log=print) -> tuple[torch.nn.Module, dict[str, object]]:
    import open_clip

    torch.manual_seed(config.seed)
    corpus = build_corpus(data_root, config)
    started = time.perf_counter()
    size = MODEL_CFG["vision_cfg"]["image_size"]
    pixels = load_images([sample.path for sample in corpus.samples], size)
    decode_s = time.perf_counter() - started
    log(f"decoded {len(corpus.samples)} images of {len(corpus.class_names)} classes in {decode_s:.0f} s")

    model = open_clip.CLIP(**MODEL_CFG)
    model.logit_scale.data.fill_(math.log(1 / 0.07))
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])
    captions = CaptionSampler(corpus, config, tokenizer, config.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = max(1, len(corpus.samples) // config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / config.warmup_steps, 0.5 * (1 + math.cos(math.pi * step / total))))
    generator = torch.Generator().manual_seed(config.seed)
    floor = math.log(config.min_logit_scale)
    losses = []
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(corpus.samples), generator=generator)
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            tokens, positives = captions.draw([corpus.samples[i] for i in index.tolist()])
            images = augment(pixels[index], generator)
            image_features = F.normalize(model.encode_image(images), dim=-1)
            text_features = F.normalize(model.encode_text(tokens), dim=-1)
            loss = multi_positive_loss(image_features, text_features, positives, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(floor, math.log(100))
            epoch_loss += loss.item()
        losses.append(epoch_loss / steps_per_epoch)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {losses[-1]:.3f}, logit scale "
            f"{model.logit_scale.exp().item():.1f}, {time.perf_counter() - started:.0f} s")
    model.eval()
    stats = {"images": len(corpus.samples), "classes": len(corpus.class_names), "steps": total,
             "epoch_losses": losses, "decode_s": round(decode_s, 1),
             "train_s": round(time.perf_counter() - started, 1),
             "logit_scale": model.logit_scale.exp().item()}
    return model, stats


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, files: dict[str, list[Path]], size: int,
                       template: str = "a photo of a {}.") -> float:
    """Top-1 % over the given class folders, with one template; a sanity figure for the card."""
    names = list(files)
    text = F.normalize(model.encode_text(tokenizer([template.format(n) for n in names])), dim=-1)
    labels = torch.tensor([label for label, name in enumerate(names) for _ in files[name]])
    pixels = load_images([path for name in names for path in files[name]], size)
    correct = 0
    for start in range(0, len(labels), 512):
        images = normalize(pixels[start:start + 512].float() / 255)
        predicted = (F.normalize(model.encode_image(images), dim=-1) @ text.T).argmax(1)
        correct += int((predicted == labels[start:start + 512]).sum())
    return round(100 * correct / len(labels), 2)


def card_accuracies(model, data_root: Path, config: ProxyConfig) -> dict[str, float]:
    """Zero-shot accuracy on held-out images of the labelled sources the proxy was trained on."""
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])
    size = MODEL_CFG["vision_cfg"]["image_size"]
    result = {}
    if "cifar10" in config.sources:
        test = cifar10_parts(data_root / "cifar10")["test"]
        result["cifar10 test (10-way, 200/class)"] = zero_shot_accuracy(
            model, tokenizer, {name: files[:200] for name, files in test.items()}, size)
    if "flowers5" in config.sources:
        result["flowers5 test split (5-way)"] = zero_shot_accuracy(
            model, tokenizer, flowers5_parts(data_root / "flowers5")["test"], size)
    if "tiny_imagenet" in config.sources:
        root = data_root / "tiny_imagenet"
        names = {e["wnid"]: e["name"] for e in json.loads((root / "classes.json").read_text())}
        val = {names[folder.name]: images_in(folder)[:10] for folder in class_folders(root / "val")}
        result["tiny_imagenet val (200-way, 10/class)"] = zero_shot_accuracy(model, tokenizer, val, size)
    return result


def write_proxy(model, folder: Path, info: dict[str, object]) -> None:
    """The open_clip local-dir, written to a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    save_file(state, staging / "open_clip_model.safetensors")
    (staging / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG, "preprocess_cfg": {}},
                                                              indent=2))
    (staging / "proxy.json").write_text(json.dumps(info, indent=2))
    (staging / "PROXY.md").write_text(proxy_card(info))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def proxy_card(info: dict[str, object]) -> str:
    stats, config = info["stats"], info["config"]
    lines = [
        "# mergetune proxy CLIP", "",
        "A small open_clip CLIP pretrained from scratch by `benchmarks/proxy.py`; a stand-in for real",
        "CLIP weights in the repair benchmark. Not a general-purpose model.", "",
        f"- Architecture: `{json.dumps(MODEL_CFG)}`",
        f"- Data: {', '.join(config['sources'])} (evaluation images excluded; see benchmarks/README.md): "
        f"{stats['images']} images, {stats['classes']} classes",
        f"- Training: {config['epochs']} epochs, {stats['steps']} steps of {config['batch_size']}, "
        f"AdamW lr {config['lr']}, seed {config['seed']}, {stats['train_s']} s; "
        f"final loss {stats['epoch_losses'][-1]:.3f}, logit scale {stats['logit_scale']:.1f}",
        f"- Input fingerprint: `{info['fingerprint']}`", "",
        *zero_shot_table("a photo of a {}.", info["zero_shot"]),
    ]
    return "\n".join(lines) + "\n"


def is_built(out: Path, fingerprint: str) -> bool:
    """Whether OUT holds a proxy built from exactly these inputs (its ``proxy.json`` fingerprint)."""
    info_file = out / "proxy.json"
    return info_file.is_file() and json.loads(info_file.read_text()).get("fingerprint") == fingerprint


def zero_shot_table(template: str, zero_shot: dict[str, float]) -> list[str]:
    """The card's zero-shot table, one row per evaluation set."""
    return [f"| zero-shot ('{template}') | top-1 % |", "|---|---|",
            *(f"| {name} | {value:.1f} |" for name, value in zero_shot.items())]


def ensure_proxy(data_root: Path, out: Path, config: ProxyConfig = ProxyConfig(), log=print) -> str:
    """Return ``local-dir:OUT``, pretraining first unless OUT holds a proxy built from the same inputs."""
    fingerprint = input_fingerprint(data_root, config)
    if is_built(out, fingerprint):
        log(f"proxy CLIP up to date in {out}")
        return f"local-dir:{out}"
    model, stats = pretrain(data_root, config, log)
    info = {"format": "mergetune-proxy/1", "fingerprint": fingerprint, "config": asdict(config),
            "model_cfg": MODEL_CFG, "stats": stats, "zero_shot": card_accuracies(model, data_root, config),
            "torch": torch.__version__}
    write_proxy(model, out, info)
    log(f"proxy CLIP written to {out}: zero-shot {info['zero_shot']}")
    return f"local-dir:{out}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=ProxyConfig.epochs)
    parser.add_argument("--per-class-limit", type=int, default=None)
    args = parser.parse_args(argv)
    config = ProxyConfig(epochs=args.epochs, per_class_limit=args.per_class_limit)
    missing = missing_datasets(args.data_root, config.sources)
    if missing:
        parser.error(f"{args.data_root}: no {', '.join(missing)} folder (see benchmarks/README.md, --data-root)")
    print(ensure_proxy(args.data_root, args.out, config))


if __name__ == "__main__":
    main()
