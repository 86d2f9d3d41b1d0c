"""The layout holds: data flows one way, and a new kind is one file plus one registry line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "repair"
# what each layer may import from inside the package; everything else in `repair` is off limits
LOWER_LAYERS = ("errors", "record", "io", "model", "kinds", "data", "train", "eval", "render", "synthetic")
ALLOWED = {
    "errors": set(),
    "record": {"errors"},
    "io": {"errors", "io"},
    "model": {"errors", "record", "model"},
    "kinds": {"errors", "io", "model", "kinds"},
    "data": {"errors", "io", "model", "data"},
    "train": {"errors", "io", "model", "kinds", "data", "train"},
    "eval": {"errors", "io", "model", "kinds", "data", "train", "eval"},
    "render": {"errors", "record", "kinds", "render"},
    "synthetic": {"errors", "model", "data"},
    "workflows": set(LOWER_LAYERS) | {"workflows"},
    "cli": set(LOWER_LAYERS) | {"workflows", "cli"},
}


def _layer(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or relative.stem != "__init__" else ""


def _imported_layers(path: Path) -> set[str]:
    """Every `repair.X` a module imports, at the top or inside a function."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "repair" and len(parts) > 1:
                layers.add(parts[1])
    return layers


def test_every_module_imports_only_downwards():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if not layer:  # the package's lazy front door names the public API of every layer
            continue
        for imported in _imported_layers(path) - ALLOWED[layer]:
            wrong.append(f"{path.relative_to(PACKAGE)} imports repair.{imported}")
    assert not wrong, "\n".join(wrong)


def test_the_check_itself_sees_function_level_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from repair.cli.app import app\n    import repair.workflows.run\n")
    assert _imported_layers(module) == {"cli", "workflows"}


def test_no_library_layer_reaches_the_cli_or_the_workflows():
    for path in PACKAGE.rglob("*.py"):
        if _layer(path) in LOWER_LAYERS:
            assert not {"cli", "workflows"} & _imported_layers(path), path


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_layer_in_the_table_exists(layer):
    assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file()
