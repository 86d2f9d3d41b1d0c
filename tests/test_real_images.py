"""Real photographs from the shared data folder: decoding, class-name files, a repair end to end."""

from __future__ import annotations

import json

from repair import DataOptions, evaluate, repair as run_repair
from repair.data.folders import scan_image_folder
from repair.data.features import extract_features
from repair.kinds.coop import init_context
from repair.train.loop import TrainConfig


def test_caltech_class_records_and_jpeg_decoding(shared_data, backbone):
    root = shared_data / "caltech101" / "train"
    dataset = scan_image_folder(root, shared_data / "caltech101" / "classes.json")
    records = {item["folder"]: item["name"] for item in json.loads((shared_data / "caltech101" /
                                                                    "classes.json").read_text())}
    assert dataset.classnames == tuple(records[folder] for folder in dataset.folders)
    sample = dataset.few_shot(1, seed=0).subset(range(8))
    features = extract_features(backbone, sample)
    assert features.features.shape == (8, backbone.embed_dim)


def test_repair_and_eval_on_flowers(tmp_path, shared_data, backbone):
    from safetensors.torch import save_file

    flowers = shared_data / "flowers5"
    ft = tmp_path / "ft.safetensors"
    save_file({"ctx": init_context(backbone, "a photo of a")}, ft)
    outcome = run_repair(ft, flowers, tmp_path / "fixed.safetensors", backbone=backbone,
                         config=TrainConfig(epochs=1, batch_size=16), data_options=DataOptions(shots=4))
    assert outcome.record.classnames == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert outcome.record.inputs.data.images == 20
    report = evaluate([outcome.path], flowers, backbone=backbone, data_options=DataOptions(shots=None))
    assert report["data"]["base"]["images"] == 4317
    assert all(0 <= row["base"] <= 100 for row in report["models"])
