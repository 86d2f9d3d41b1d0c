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
