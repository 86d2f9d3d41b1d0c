"""Whole-module pickles (``torch.save(model)``) are read as data: no import, no call, no ``__setstate__``.

The pickled classes live in a module this test writes (``evil_models.py``) whose import, constructor,
``__setstate__`` and ``__reduce__`` would each create a marker file; the reading commands run in a
process where that module *is* importable, so any code run on the file's behalf would leave the marker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import repair

MODELS = textwrap.dedent('''
    import os, pathlib
    import torch

    def _mark(why):
        with open(os.environ["MARKER"], "a") as handle:
            handle.write(why + "\\n")

    _mark("import")

    class ClassificationHead(torch.nn.Linear):  # task vectors' head: weight, bias, normalize
        def __init__(self, normalize, weights, biases=None):
            _mark("init")
            out, dim = weights.shape
            super().__init__(dim, out)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros(out))

        def __setstate__(self, state):
            _mark("setstate")
            super().__setstate__(state)

    class ImageEncoder(torch.nn.Module):  # WiSE-FT's wrapper around an open_clip model
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.cache_dir = "/somewhere"

    class ImageClassifier(torch.nn.Module):
        def __init__(self, image_encoder, classification_head):
            super().__init__()
            self.image_encoder = image_encoder
            self.classification_head = classification_head
            self.process_images = True

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (pathlib.Path(os.environ["MARKER"]),))
''')

SAVE = textwrap.dedent('''
    import json, sys, torch, open_clip
    import evil_models as m
    out, config = sys.argv[1], json.loads(sys.argv[2])
    torch.manual_seed(0)
    head = m.ClassificationHead(True, torch.nn.functional.normalize(torch.randn(4, 32), dim=-1), torch.zeros(4))
    torch.save(head, f"{out}/head.pt")
    clip = open_clip.CLIP(**config)
    torch.save(m.ImageClassifier(m.ImageEncoder(clip), head), f"{out}/classifier.pt")
    torch.save(clip.state_dict(), f"{out}/clip_state.pt")
    torch.save({"model": m.Payload()}, f"{out}/payload.pt")
''')


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    from repair.synthetic import TINY_CONFIG

    root = tmp_path_factory.mktemp("pickles")
    (root / "evil_models.py").write_text(MODELS)
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MARKER": str(root / "saved.marker")}
    subprocess.run([sys.executable, "-c", SAVE, str(root), TINY_CONFIG.read_text()], env=env, check=True)
    assert (root / "saved.marker").read_text().split() == ["import", "init"]  # the module does what it says
    return root, {**env, "MARKER": str(root / "loaded.marker")}


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "repair.cli", *map(str, args)], env=env, capture_output=True,
                          text=True)


def test_reading_them_runs_no_code_and_refuses_a_payload(pickles):
    root, env = pickles
    result = cli(env, "inspect", root / "head.pt", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "linear" and {t["name"] for t in report["tensors"]} == {"weight", "bias"}
    result = cli(env, "inspect", root / "payload.pt")
    assert result.returncode == 4 and result.stderr.startswith("error: ") and "refused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (root / "loaded.marker").exists()  # no import, __init__, __setstate__ or __reduce__ ran


def test_tensors_come_out_by_module_path_with_plain_attributes(pickles):
    root, _ = pickles
    head = repair.read_tensors(root / "head.pt")
    assert head.values["normalize"] is True and head.tensors["weight"].shape == (4, 32)
    classifier = repair.read_tensors(root / "classifier.pt")
    state = repair.read_tensors(root / "clip_state.pt").tensors
    assert classifier.values["process_images"] is True and classifier.values["image_encoder.cache_dir"] == "/somewhere"
    expected = {f"image_encoder.model.{name}" for name in state} | {"classification_head.weight",
                                                                    "classification_head.bias"}
    assert set(classifier.tensors) == expected  # every parameter and buffer, named as state_dict() names it
    for name, tensor in state.items():
        assert torch.equal(classifier.tensors[f"image_encoder.model.{name}"], tensor)
    assert torch.equal(classifier.tensors["classification_head.weight"], head.tensors["weight"])


def test_a_pickled_head_repairs_like_its_state_dict(pickles, tmp_path, tiny_spec, image_dirs):
    root, env = pickles
    out = tmp_path / "fixed.safetensors"
    result = cli(env, "repair", root / "head.pt", "--data", image_dirs["train"], "--out", out, "--model",
                 tiny_spec.model, "--epochs", "1", "--shots", "4", "--batch-size", "8", "--no-cache", "-q")
    assert result.returncode == 0, result.stderr
    assert set(repair.read_tensors(out).tensors) == {"weight", "bias"}
    assert not (root / "loaded.marker").exists()
