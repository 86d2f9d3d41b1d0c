"""Hostile inputs: no silent wrong answer, nothing left behind, every refusal one line with its code.

Each test names the case it covers; most go through the real CLI, as a user meets them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import repair
from repair.cli.app import app
from repair.kinds.coop import init_context
from repair.synthetic import make_image_folder

runner = CliRunner()


def cli(*args: object):
    result = runner.invoke(app, [str(arg) for arg in args])
    assert "Traceback" not in result.output, result.output
    return result


def one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.fixture
def prompt(tmp_path, backbone) -> Path:
    ctx = init_context(backbone, "a photo of a") + 0.05 * torch.randn(4, backbone.text_width,
                                                                        generator=torch.Generator().manual_seed(0))
    path = tmp_path / "ft.safetensors"
    save_file({"ctx": ctx}, path)
    return path


def model(tiny_spec) -> list[str]:
    return ["--model", tiny_spec.model, "--device", "cpu", "--quiet"]


FAST = ["--epochs", "1", "--shots", "4", "--batch-size", "8"]


# ----------------------------------------------------------------------------- 1. another class list


@pytest.fixture
def linear_on_two(tmp_path, tiny_spec):
    train = make_image_folder(tmp_path / "blue-red", ["blue", "red"], 6, seed=1)
    out = tmp_path / "head.safetensors"
    assert cli("finetune", "--kind", "linear", "--data", train, "--out", out, *FAST, *model(tiny_spec)).exit_code == 0
    return out


def test_1_a_head_is_not_scored_or_trained_on_other_classes(tmp_path, tiny_spec, linear_on_two):
    other = make_image_folder(tmp_path / "green-yellow", ["green", "yellow"], 6, seed=2)
    line = one_line(cli("eval", linear_on_two, "--data", other, *model(tiny_spec)), 5)
    assert "[blue, red]" in line and "[green, yellow]" in line and "only score its own classes" in line
    one_line(cli("eval", linear_on_two, "--data", other, "--other-classes", *model(tiny_spec)), 5)
    out = tmp_path / "fixed.safetensors"
    one_line(cli("repair", linear_on_two, "--data", other, "--out", out, *FAST, *model(tiny_spec)), 5)
    assert not out.exists() and leftovers(tmp_path) == []


def test_1_a_shared_prompt_may_be_used_on_other_classes_when_asked(tmp_path, tiny_spec, image_dirs):
    ft = tmp_path / "coop.safetensors"
    assert cli("finetune", "--data", image_dirs["train"], "--out", ft, *FAST, *model(tiny_spec)).exit_code == 0
    line = one_line(cli("eval", ft, "--data", image_dirs["novel"], *model(tiny_spec)), 5)
    assert "--other-classes" in line
    assert cli("eval", ft, "--data", image_dirs["novel"], "--other-classes", *model(tiny_spec)).exit_code == 0


# ----------------------------------------------------------------------------- 2. damaged cache entries


def test_2_flipped_bytes_in_a_feature_cache_entry_are_a_miss(tmp_path, backbone, image_dirs, capsys):
    from repair.data.features import extract_features, features_cache_file
    from repair.data.folders import scan_image_folder

    dataset = scan_image_folder(image_dirs["test"])
    cache = tmp_path / "cache"
    clean = extract_features(backbone, dataset, cache_dir=cache)
    entry = features_cache_file(cache, backbone.image_encoder, dataset)
    data = bytearray(entry.read_bytes())
    data[-7] ^= 0x55  # inside the float data: finite, plausible, wrong
    entry.write_bytes(bytes(data))
    again = extract_features(backbone, dataset, cache_dir=cache)
    assert torch.equal(again.features, clean.features)
    assert "damaged cache entry" in capsys.readouterr().err


def test_2_a_damaged_fisher_entry_is_recomputed(tmp_path, backbone, image_dirs, capsys):
    from repair.io import read_cache_entry, write_cache_entry

    entry = tmp_path / "fisher" / "entry.safetensors"
    write_cache_entry(entry, {"ctx": torch.arange(8.0)})
    assert torch.equal(read_cache_entry(entry)["ctx"], torch.arange(8.0))
    tensors = load_file(entry)
    save_file({"ctx": tensors["ctx"] + 1}, entry, metadata={"mergetune.sha256": "0" * 64})
    assert read_cache_entry(entry) is None and not entry.exists()
    assert "damaged cache entry" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. dangling links


def test_3_a_dangling_image_link_is_an_error_naming_it(tmp_path, tiny_spec, prompt):
    data = make_image_folder(tmp_path / "data", ["blue", "red"], 4, seed=1)
    (data / "red" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    line = one_line(cli("eval", prompt, "--data", data, *model(tiny_spec)), 6)
    assert "gone.png" in line and "dangling" in line


def test_3_a_dangling_class_folder_link_is_an_error_too(tmp_path, tiny_spec, prompt):
    data = make_image_folder(tmp_path / "data", ["blue", "red"], 4, seed=1)
    (data / "green").symlink_to(tmp_path / "no-such-folder")
    out = tmp_path / "out.safetensors"
    line = one_line(cli("repair", prompt, "--data", data, "--out", out, *FAST, *model(tiny_spec)), 6)
    assert "green" in line and not out.exists()


# ----------------------------------------------------------------------------- 4. class names


@pytest.mark.parametrize("names", [["navy", "navy"], ["navy", ""], ["Navy", "navy "]])
def test_4_duplicate_or_empty_class_names_are_refused(tmp_path, tiny_spec, prompt, names):
    data = make_image_folder(tmp_path / "data", ["blue", "red"], 4, seed=1)
    names_file = tmp_path / "names.json"
    names_file.write_text(json.dumps(names))
    one_line(cli("eval", prompt, "--data", data, "--classnames", names_file, *model(tiny_spec)), 6)


# ----------------------------------------------------------------------------- 5. NaN thresholds, strict JSON


def test_5_a_nan_threshold_is_refused_from_a_flag_or_a_file(tmp_path, tiny_spec, prompt, image_dirs):
    result = cli("eval", prompt, "--data", image_dirs["test"], "--min-base", "nan", *model(tiny_spec))
    assert "finite" in one_line(result, 2)
    gate = tmp_path / "gate.toml"
    gate.write_text("[gate]\nmin_hm = nan\n")
    one_line(cli("eval", prompt, "--data", image_dirs["test"], "--gate", gate, *model(tiny_spec)), 3)


def test_5_json_output_is_strict_even_with_non_finite_numbers():
    from repair.cli.app import _strict

    document = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": float("-inf")}}
    assert json.loads(json.dumps(_strict(document), allow_nan=False)) == {"a": None, "b": [1.0, None], "c": {"d": None}}


# ----------------------------------------------------------------------------- 6. unwritable outputs


def test_6_an_unwritable_output_folder_is_refused_before_any_model_work(tmp_path, tiny_spec, prompt, image_dirs):
    if os.geteuid() == 0:
        target = Path("/proc/mergetune-out.safetensors")  # root writes anywhere but pseudo filesystems
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out.safetensors"
    started = time.monotonic()
    line = one_line(cli("repair", prompt, "--data", image_dirs["train"], "--out", target,
                        "--model", "no-such-model-is-ever-loaded", "--quiet"), 8)
    assert "cannot write" in line and time.monotonic() - started < 60


def test_6_a_failing_write_is_exit_8_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch

    from repair.errors import OutputExistsError
    from repair.io import write_safetensors

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OutputExistsError, match="No space left"):
        write_safetensors(tmp_path / "out.safetensors", {"w": torch.zeros(2)}, {})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 7. SIGTERM


def _run_in_background(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "repair.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("moment", ["while training", "while loading"])
def test_7_sigterm_exits_143_in_one_line_and_keeps_only_progress(tmp_path, tiny_spec, prompt, image_dirs, moment):
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = "400" if moment == "while training" else "1"
    # --if-no-gain repair: the tiny checkpoint gains nothing on its shots, and the task-gain check would write
    # zero-shot without training, long before the signal
    process = _run_in_background(["repair", str(prompt), "--data", str(image_dirs["train"]), "--out", str(out),
                                  "--epochs", epochs, "--batch-size", "2", "--if-no-gain", "repair",
                                  *model(tiny_spec)], env)
    progress = tmp_path / f".{out.name}.progress"
    deadline = time.monotonic() + 120
    while moment == "while training" and not progress.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if moment == "while loading":
        time.sleep(1.0)  # past the CLI's own start-up (a fraction of a second), into importing torch
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    finished = process.returncode == 0 or out.exists()  # done, or at interpreter exit (Python's handlers are gone)
    assert not (finished and moment == "while training"), "400 epochs ended before their first progress file"
    if finished:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == ["terminated; no output was written (progress is kept for --resume)"]
    assert not out.exists()
    kept = [".out.safetensors.progress"] if moment == "while training" else []
    assert [name for name in leftovers(tmp_path) if name != ".out.safetensors.progress"] == []
    assert set(kept) <= set(leftovers(tmp_path))


def test_7_sigterm_inside_an_import_is_asked_again_after_it_not_raised_there(tmp_path, monkeypatch):
    """Raised inside an import, Terminated can cross C++ frames (torch's pybind11 callbacks: the process aborts)
    or an importlib callback (the exception is ignored and the signal lost); it is sent again instead."""
    from repair.cli import app
    from repair.errors import Terminated

    asked = []
    monkeypatch.setattr(app, "_ask_again", asked.append)
    (tmp_path / "slow_to_import.py").write_text(
        "import signal, sys\n"
        "from repair.cli.app import _terminate\n"
        "_terminate(signal.SIGTERM, sys._getframe())\n"
        "IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import slow_to_import

    assert slow_to_import.IMPORTED and asked == [signal.SIGTERM]
    with pytest.raises(Terminated):
        app._terminate(signal.SIGTERM, sys._getframe())
    assert asked == [signal.SIGTERM]


def test_7_a_sigterm_a_callback_swallowed_still_stops_the_run_before_its_output(tmp_path, monkeypatch):
    """A C extension's callback (pydantic-core's, met during start-up) reports the Terminated raised in it as
    unraisable and goes on: the run must still stop, before it puts its output in place, and print no traceback."""
    from repair.cli import app as cli
    from repair.errors import Terminated, forget_termination
    from repair.io import write_safetensors

    class Callback:  # an exception raised in __del__ is dropped the same way
        def __del__(self) -> None:
            cli._terminate(signal.SIGTERM, sys._getframe())

    printed = []
    monkeypatch.setattr(sys, "__unraisablehook__", printed.append)
    monkeypatch.setattr(sys, "unraisablehook", cli._quiet_unraisable)
    try:
        Callback()
        assert printed == []  # swallowed, and not shown as a traceback
        with pytest.raises(Terminated):
            write_safetensors(tmp_path / "out.safetensors", {"w": torch.zeros(2)}, {})
        assert list(tmp_path.iterdir()) == []
    finally:
        forget_termination()
    write_safetensors(tmp_path / "out.safetensors", {"w": torch.zeros(2)}, {})  # once reported, runs go on
    assert [path.name for path in tmp_path.iterdir()] == ["out.safetensors"]


# ----------------------------------------------------------------------------- 8. failures leave nothing


def test_8_a_diverging_run_leaves_no_progress_file(tmp_path, tiny_spec, prompt, image_dirs):
    out = tmp_path / "out.safetensors"
    one_line(cli("repair", prompt, "--data", image_dirs["train"], "--out", out, "--lr", "1e30", "--epochs", "2",
                 "--batch-size", "4", "--if-no-gain", "repair", *model(tiny_spec)), 9)
    assert leftovers(tmp_path) == [] and not out.exists()


def test_8_a_bad_dtype_is_refused_before_any_work(tmp_path, tiny_spec, prompt, image_dirs):
    result = cli("repair", prompt, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                 "--dtype", "fp8", *model(tiny_spec))
    assert result.exit_code == 2 and leftovers(tmp_path) == []


def test_8_a_second_run_on_the_same_output_refuses_at_once(tmp_path, backbone, prompt, image_dirs):
    from repair.errors import OutputExistsError
    from repair.io import output_lock

    out = tmp_path / "out.safetensors"
    with output_lock(out):
        started = time.monotonic()
        with pytest.raises(OutputExistsError, match="another mergetune run is writing"):
            repair.repair(prompt, image_dirs["train"], out, backbone=backbone)
        assert time.monotonic() - started < 30
    assert leftovers(tmp_path) == []


def test_8_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, backbone, prompt, image_dirs):
    out = tmp_path / "out.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".{out.name}.lock").write_text(dead.stdout.strip())
    repair.repair(prompt, image_dirs["train"], out, backbone=backbone,
                  config=repair.TrainConfig(max_steps=0), data_options=repair.DataOptions(shots=4))
    assert out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 9. only regular files


def test_9_force_never_replaces_a_fifo_or_a_device(tmp_path, tiny_spec, prompt, image_dirs):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        line = one_line(cli("repair", prompt, "--data", image_dirs["train"], "--out", target, "--force",
                            *FAST, *model(tiny_spec)), 8)
        assert "not a regular file" in line
    assert stat.S_ISFIFO(fifo.stat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ----------------------------------------------------------------------------- 10. --markdown


def test_10_an_unwritable_markdown_path_is_refused_before_evaluating(tmp_path, tiny_spec, prompt, image_dirs):
    for target in (tmp_path / "no-such-folder" / "summary.md", tmp_path):
        line = one_line(cli("eval", prompt, "--data", image_dirs["test"], "--markdown", target,
                            "--model", "no-such-model-is-ever-loaded"), 8)
        assert str(target) in line


# ----------------------------------------------------------------------------- 11. decompression bombs


def test_11_a_decompression_bomb_is_exit_6_naming_the_file(tmp_path, tiny_spec, prompt):
    data = make_image_folder(tmp_path / "data", ["blue", "red"], 3, seed=1)
    bomb = data / "red" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels, a few kB on disk
    line = one_line(cli("eval", prompt, "--data", data, "--no-cache", *model(tiny_spec)), 6)
    assert "bomb.png" in line and "too large" in line


# ----------------------------------------------------------------------------- 12. prompts longer than the context


def test_12_a_prompt_longer_than_the_text_context_is_exit_5(tmp_path, tiny_spec, backbone, image_dirs):
    context = backbone.tokenizer.context_length
    long_ctx = tmp_path / "long.safetensors"
    save_file({"ctx": torch.zeros(context + 23, backbone.text_width)}, long_ctx)
    line = one_line(cli("eval", long_ctx, "--data", image_dirs["test"], *model(tiny_spec)), 5)
    assert f"holds {context}" in line


# ----------------------------------------------------------------------------- 13 and 15. bad values are usage errors


@pytest.mark.parametrize("flags", [
    ["--path-space", "bogus"], ["--lam-zs", "-1"], ["--lam-lmc", "-0.5"], ["--momentum", "1.0"],
    ["--momentum", "-0.1"], ["--logit-scale", "0"], ["--logit-scale", "-3"], ["--surrogate", "hessian"],
    ["--lr", "nan"], ["--device", "gpu"], ["--precision", "fp8"], ["--key-prefix", "head."],
])
def test_13_15_bad_values_are_usage_errors_before_any_work(tmp_path, tiny_spec, prompt, image_dirs, flags):
    result = cli("repair", prompt, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                 "--model", "no-such-model-is-ever-loaded", *flags)
    one_line(result, 2)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 14. worker processes


def test_14_an_unreadable_image_is_one_line_with_workers_too(tmp_path, tiny_spec, prompt):
    data = make_image_folder(tmp_path / "data", ["blue", "red"], 3, seed=1)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    for workers in ("0", "2"):
        line = one_line(cli("eval", prompt, "--data", data, "--no-cache", "--workers", workers,
                            *model(tiny_spec)), 6)
        assert "broken.png" in line


# ----------------------------------------------------------------------------- 16. the umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_16_outputs_honour_the_umask(tmp_path, umask):
    from repair.io import write_safetensors

    previous = os.umask(umask)
    try:
        path = write_safetensors(tmp_path / f"out-{umask:o}.safetensors", {"w": torch.zeros(2)}, {})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------------------- 17. no network


def test_17_without_network_a_missing_model_is_one_quick_line(tmp_path, image_dirs, prompt):
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # a closed local port
    done = subprocess.run([sys.executable, "-m", "repair.cli", "eval", str(prompt), "--data",
                           str(image_dirs["test"]), "--no-cache"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 7
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0], done.stderr


def test_17_a_hanging_name_lookup_does_not_hold_the_hub_probe(monkeypatch):
    """The socket timeout does not cover the DNS lookup; the probe must answer while the lookup still hangs."""
    import threading

    from repair.model import backbone as backbone_module

    release, lookup_returned = threading.Event(), threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(60)
        lookup_returned.set()
        raise socket.gaierror("released by the test")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    try:
        assert backbone_module.hub_reachable(timeout_s=0.2) is False
        assert not lookup_returned.is_set()  # the answer did not wait for the lookup
    finally:
        release.set()


def test_17_offline_mode_prints_only_the_error_line(tmp_path, image_dirs, prompt):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "repair.cli", "eval", str(prompt), "--data",
                           str(image_dirs["test"]), "--no-cache"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 7 and len(done.stderr.strip().splitlines()) == 1, done.stderr


# ----------------------------------------------------------------------------- 18 and 19. friendliness


def test_18_version_flag():
    result = cli("--version")
    assert result.exit_code == 0 and result.output.strip() == f"mergetune {repair.__version__}"


def test_18_evaluate_uses_the_backbone_the_checkpoint_records(tmp_path, tiny_spec, image_dirs):
    ft = repair.finetune("coop", image_dirs["train"], tmp_path / "ft.safetensors", backbone=tiny_spec,
                         config=repair.TrainConfig(max_steps=1, batch_size=8), data_options=repair.DataOptions(shots=4))
    report = repair.evaluate([ft.path], image_dirs["test"])  # no backbone given: the recorded one
    assert report["backbone"]["model"] == tiny_spec.model


def test_18_a_dassl_prompt_keeps_its_tensor_name(tmp_path, backbone, image_dirs):
    path = tmp_path / "prompt_learner.pth.tar"
    torch.save({"state_dict": {"ctx": init_context(backbone, "a photo of a").half()}, "epoch": 5}, path)
    out = repair.repair(path, image_dirs["train"], tmp_path / "out.safetensors", backbone=backbone,
                        config=repair.TrainConfig(max_steps=0), data_options=repair.DataOptions(shots=4))
    assert list(load_file(out.path)) == ["state_dict.ctx"]


