"""Shared fixtures: a tiny CLIP saved as an open_clip local-dir and generated image folders.

Nothing here touches the network or a model hub; the feature cache goes to a temporary
directory so tests never write to the user's home.
"""

from __future__ import annotations

from pathlib import Path

import pytest

BASE = ("blue", "green", "red", "yellow")
NOVEL = ("cyan", "orange", "pink", "purple")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MERGETUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from repair.synthetic import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_spec(tiny_model_dir):
    from repair.model.backbone import BackboneSpec

    return BackboneSpec(model=tiny_model_dir)


@pytest.fixture(scope="session")
def backbone(tiny_spec):
    from repair.model.backbone import load_backbone

    return load_backbone(tiny_spec)


@pytest.fixture(scope="session")
def image_dirs(tmp_path_factory) -> dict[str, Path]:
    from repair.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("images")
    return {
        "train": make_image_folder(root / "train", BASE, 12, seed=1),
        "test": make_image_folder(root / "test", BASE, 10, seed=2),
        "novel": make_image_folder(root / "novel", NOVEL, 10, seed=3),
    }


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (only CI and the team's machines have it)")
    return SHARED_DATA


HF_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", ".", "a", "an", "photo", "of", "the", "picture",
            *BASE, *NOVEL]


def _save_local_dir(folder: Path, model_cfg: dict, seed: int = 0) -> str:
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (open_clip.CustomTextCLIP if "hf_model_name" in model_cfg["text_cfg"] else open_clip.CLIP)(**model_cfg)
    save_file({name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()},
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    return f"local-dir:{folder}"


def _save_wordpiece_tokenizer(transformers, folder: Path) -> None:
    """A BERT-style tokenizer over HF_VOCAB, built from its parts (no download, any transformers version)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    ids = {word: index for index, word in enumerate(HF_VOCAB)}
    tokenizer = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
                                         ).save_pretrained(folder)


@pytest.fixture(scope="session")
def hf_backbone(tmp_path_factory):
    """A tiny CLIP whose text tower is a Hugging Face BERT (open_clip's CustomTextCLIP), built offline."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face text tower needs transformers")
    from repair.model.backbone import BackboneSpec, load_backbone

    folder = tmp_path_factory.mktemp("hf-clip")
    bert = folder / "bert"
    bert.mkdir()
    _save_wordpiece_tokenizer(transformers, bert)
    _save_wordpiece_tokenizer(transformers, folder)  # open_clip reads a local-dir's tokenizer from its root
    transformers.BertConfig(vocab_size=len(HF_VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64).save_pretrained(bert)
    model_cfg = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_model_pretrained": False,
                              "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 32}}
    return load_backbone(BackboneSpec(model=_save_local_dir(folder, model_cfg)))


@pytest.fixture(scope="session")
def cnn_backbone(tmp_path_factory):
    """A tiny CLIP whose image tower is a CNN with BatchNorm (open_clip's ModifiedResNet)."""
    from repair.model.backbone import BackboneSpec, load_backbone

    model_cfg = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    return load_backbone(BackboneSpec(model=_save_local_dir(tmp_path_factory.mktemp("cnn-clip"), model_cfg)))
