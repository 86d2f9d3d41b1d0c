"""A run never succeeds on something other than what it was given (issue 32, items 2 to 8).

Each section is one item; each test goes through the real CLI on the tiny model, as a user meets it,
and failed on the code before its fix (the commit that fixes an item adds its tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
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
    """The one ``error:`` line of a refused command (stderr), checked against its exit code."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def model(tiny_spec) -> list[str]:
    return ["--model", tiny_spec.model, "--device", "cpu", "--quiet"]


FAST = ["--epochs", "1", "--shots", "4", "--batch-size", "8"]


@pytest.fixture(scope="module")
def front_prompt(tmp_path_factory, tiny_spec, image_dirs) -> Path:
    """A CoOp prompt fine-tuned with the class name in front: its record says so."""
    out = tmp_path_factory.mktemp("front") / "front.safetensors"
    result = cli("finetune", "--data", image_dirs["train"], "--out", out, "--class-token-position", "front",
                 "--max-steps", "1", *FAST, *model(tiny_spec))
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------- 2. a file's record outranks a flag


@pytest.mark.parametrize("flag, value, recorded", [
    ("--class-token-position", "end", "class_token_position front"),
    ("--ctx-init", "a picture of a", "ctx_init 'a photo of a'"),
    ("--logit-scale", "50", "logit_scale"),
])
def test_2_a_recorded_option_given_otherwise_is_refused(tmp_path, tiny_spec, image_dirs, front_prompt, flag, value,
                                                        recorded):
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], flag, value, *model(tiny_spec)), 2)
    assert flag in line and recorded in line and "front.safetensors" in line
    out = tmp_path / "fixed.safetensors"
    one_line(cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, flag, value, *FAST,
                 *model(tiny_spec)), 2)
    assert not out.exists()


def test_2_the_recorded_value_again_and_a_run_setting_are_accepted(tmp_path, tiny_spec, image_dirs, front_prompt):
    out = tmp_path / "fixed.safetensors"
    result = cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, "--class-token-position",
                 "front", "--ctx-init", "a photo of a", "--path-space", "weight", "--max-steps", "1", *FAST,
                 *model(tiny_spec))
    assert result.exit_code == 0, result.output
    record = json.loads(repair.read_tensors(out).metadata["mergetune"])
    assert record["kind_options"]["class_token_position"] == "front"
    assert record["kind_options"]["path_space"] == "weight"  # how this run interpolated: free to choose


def test_2_an_options_object_from_python_cannot_outrank_the_record_either(backbone, image_dirs, front_prompt):
    from repair.errors import UsageError
    from repair.kinds.coop import CoOpOptions

    with pytest.raises(UsageError, match="records class_token_position front"):
        repair.evaluate([front_prompt], image_dirs["test"], backbone=backbone,
                        kind_options=CoOpOptions(class_token_position="middle"))
    # fields left at their defaults take the recorded values: the prompt keeps its class in front
    report = repair.evaluate([front_prompt], image_dirs["test"], backbone=backbone,
                             kind_options=CoOpOptions(ctx_init="a photo of a"))
    assert report["models"][1]["base"] == repair.evaluate([front_prompt], image_dirs["test"],
                                                          backbone=backbone)["models"][1]["base"]


# ----------------------------------------------------------------------------- 3. data means what it says


def test_3_a_classnames_mapping_with_an_unknown_folder_is_refused_by_name(tmp_path, tiny_spec, image_dirs,
                                                                          front_prompt):
    names = tmp_path / "names.txt"
    names.write_text("blue: navy\ngren: lime\nred: crimson\nyellow: gold\n")  # one typo: 'gren'
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], "--classnames", names,
                        *model(tiny_spec)), 6)
    assert "'gren'" in line and "does not have" in line


def test_3_a_mapping_line_among_plain_names_is_refused(tmp_path, tiny_spec, image_dirs, front_prompt):
    names = tmp_path / "names.txt"
    names.write_text("blue: navy\nlime\ncrimson\ngold\n")
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], "--classnames", names,
                        *model(tiny_spec)), 6)
    assert "'lime'" in line and "folder: name" in line


def test_3_a_correct_text_mapping_names_the_classes(tmp_path, tiny_spec, image_dirs, front_prompt):
    names = tmp_path / "names.txt"
    names.write_text("yellow: gold\nblue: navy\ngreen: lime\nred: crimson\n")
    result = cli("eval", front_prompt, "--data", image_dirs["test"], "--classnames", names, "--json",
                 *model(tiny_spec))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["base"]["classes"] == ["navy", "lime", "crimson", "gold"]


def test_3_novel_data_sharing_classes_with_data_is_refused(tmp_path, tiny_spec, image_dirs, front_prompt):
    mixed = make_image_folder(tmp_path / "mixed", ["red", "cyan"], 3, seed=5)
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], "--novel-data", mixed,
                        *model(tiny_spec)), 2)
    assert "red" in line and "shares" in line
    copy = tmp_path / "copy"
    for source in image_dirs["test"].iterdir():  # the same classes and images under another path
        (copy / source.name).mkdir(parents=True)
        for image in source.iterdir():
            (copy / source.name / image.name).write_bytes(image.read_bytes())
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], "--novel-data", copy,
                        *model(tiny_spec)), 2)
    assert "mostly those of --data" in line and "(40 of 40)" in line
    (mixed / "red").rename(mixed / "Red")  # another folder, the same prompt: CLIP's tokenizer ignores case
    line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], "--novel-data", mixed,
                        *model(tiny_spec)), 2)
    assert "Red" in line and "shares" in line


def test_3_a_shifted_set_of_the_same_classes_is_still_a_held_out_set(tmp_path, tiny_spec, image_dirs, front_prompt):
    shifted = make_image_folder(tmp_path / "shifted", ["blue", "green", "red", "yellow"], 3, seed=9)
    result = cli("eval", front_prompt, "--data", image_dirs["test"], "--novel-data", shifted, *model(tiny_spec))
    assert result.exit_code == 0, result.output


def _data(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", ["blue", "red"], 3, seed=1)


@pytest.mark.parametrize("place, expected", [
    ("red/more/extra.png", "sub-folder"),  # an image one level down in a class folder
    ("red/extra.heic", "does not read .heic"),  # a format we do not decode
    ("red/extra", "without an image file extension"),  # a PNG saved without its extension
    ("extra.png", "outside any class folder"),  # an image beside the class folders
])
def test_3_images_that_would_not_be_read_are_refused_by_name(tmp_path, tiny_spec, front_prompt, place, expected):
    data = _data(tmp_path)
    target = data / place
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((data / "red" / "0000.png").read_bytes())
    line = one_line(cli("eval", front_prompt, "--data", data, "--other-classes", *model(tiny_spec)), 6)
    assert place.split("/")[-1] in line and expected in line


def test_3_an_image_of_a_readable_format_is_read_not_skipped(tmp_path, tiny_spec, front_prompt):
    data = _data(tmp_path)
    (data / "red" / "extra.jfif").write_bytes((data / "red" / "0000.png").read_bytes())
    result = cli("eval", front_prompt, "--data", data, "--other-classes", "--json", *model(tiny_spec))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["data"]["base"]["images"] == 7


def test_3_a_16_bit_image_is_scaled_not_clipped_to_white(tmp_path):
    import numpy as np
    from PIL import Image

    from repair.data.features import open_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").save(tmp_path / "flat.png")
    deep, flat = (np.asarray(open_image(tmp_path / name), dtype=np.int16) for name in ("deep.png", "flat.png"))
    assert np.abs(deep - flat).max() <= 1  # today: 255 almost everywhere


def test_3_a_16_bit_image_is_scored_as_its_8_bit_twin_through_the_cli(tmp_path, tiny_spec, front_prompt):
    import numpy as np
    from PIL import Image

    eight, sixteen = _data(tmp_path / "a"), _data(tmp_path / "b")
    for image in sorted(eight.rglob("*.png")):
        grey = np.asarray(Image.open(image).convert("L")).astype(np.uint16)
        Image.fromarray(grey).convert("RGB").save(image)
        Image.fromarray(grey * 257).save(sixteen / image.relative_to(eight))  # the same picture in 16 bits
    reports = [json.loads(cli("eval", front_prompt, "--data", data, "--other-classes", "--json", "--no-cache",
                              *model(tiny_spec)).stdout) for data in (eight, sixteen)]
    assert reports[0]["models"] == reports[1]["models"]


# ----------------------------------------------------------------------------- 4. nothing unfinished is published


@pytest.fixture(scope="module")
def repaired(tmp_path_factory, tiny_spec, image_dirs) -> dict[str, Path]:
    """A fine-tuned prompt, its repair, and another fine-tuned prompt (not its input)."""
    folder = tmp_path_factory.mktemp("repaired")
    files = {name: folder / f"{name}.safetensors" for name in ("ft", "fixed", "other")}
    for name, seed in (("ft", "0"), ("other", "3")):
        assert cli("finetune", "--data", image_dirs["train"], "--out", files[name], "--seed", seed, *FAST,
                   *model(tiny_spec)).exit_code == 0
    assert cli("repair", files["ft"], "--data", image_dirs["train"], "--out", files["fixed"], *FAST,
               *model(tiny_spec)).exit_code == 0
    return files


def test_4_a_cast_that_overflows_the_output_dtype_is_refused(tmp_path, tiny_spec, image_dirs, backbone):
    big = tmp_path / "big.safetensors"
    save_file({"ctx": init_context(backbone, "a photo of a") * 1e7}, big)  # finite in fp32, beyond fp16's 65504
    out = tmp_path / "out.safetensors"
    line = one_line(cli("repair", big, "--data", image_dirs["train"], "--out", out, "--dtype", "fp16",
                        "--max-steps", "0", "--if-no-gain", "repair", *FAST, *model(tiny_spec)), 9)
    assert "ctx" in line and "float16" in line and "--dtype fp32" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["big.safetensors"]


def _rewritten(source: Path, target: Path, change) -> Path:
    from safetensors import safe_open

    with safe_open(str(source), "pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    tensors, metadata = change(tensors, dict(metadata))
    save_file(tensors, target, metadata=metadata)
    return target


def test_4_verify_checks_the_output_itself(tmp_path, repaired):
    ok = cli("verify", repaired["fixed"], "--json")
    assert ok.exit_code == 0, ok.output
    assert [check["input"] for check in json.loads(ok.stdout)["checks"]] == ["this file's tensors",
                                                                             "this file's record"]
    tensors = _rewritten(repaired["fixed"], tmp_path / "tensors.safetensors",
                         lambda t, m: ({name: value + 1e-3 for name, value in t.items()}, m))
    assert "tensors changed" in one_line(cli("verify", tensors, "--ft", repaired["ft"]), 13)

    def other_seed(tensors, metadata):
        record = json.loads(metadata["mergetune"])
        record["seed"] = 7
        return tensors, {**metadata, "mergetune": json.dumps(record)}

    record = _rewritten(repaired["fixed"], tmp_path / "record.safetensors", other_seed)
    assert "record changed" in one_line(cli("verify", record), 13)


def test_4_push_refuses_an_eval_report_that_does_not_score_the_file(tmp_path, tiny_spec, image_dirs, repaired):
    report = tmp_path / "eval.json"
    result = cli("eval", repaired["ft"], repaired["fixed"], "--data", image_dirs["test"], "--json",
                 *model(tiny_spec))
    report.write_text(result.stdout)
    line = one_line(cli("push", repaired["other"], "--repo", "me/clip", "--eval-json", report, "--dry-run",
                        tmp_path / "staged"), 2)
    assert "other.safetensors" in line and "fixed.safetensors" in line
    assert not (tmp_path / "staged").exists()
    staged = cli("push", repaired["fixed"], "--repo", "me/clip", "--eval-json", report, "--dry-run",
                 tmp_path / "staged")
    assert staged.exit_code == 0, staged.output


def test_4_path_refuses_an_ft_the_repair_was_not_made_from(tmp_path, tiny_spec, image_dirs, repaired):
    out = tmp_path / "path.json"
    line = one_line(cli("path", repaired["other"], repaired["fixed"], "--data", image_dirs["test"], "--out", out,
                        *model(tiny_spec)[:-1]), 13)
    assert "repaired from ft.safetensors" in line and "not from" in line and not out.exists()
    loud = cli("path", repaired["ft"], repaired["other"], "--data", image_dirs["test"], "--out", out,
               *model(tiny_spec)[:-1])  # a fine-tuned file as REPAIRED: said, not refused
    assert loud.exit_code == 0 and "warning: other.safetensors may not be a repair" in loud.stderr


@pytest.mark.parametrize("name, content", [
    ("gate.toml", ""), ("gate.toml", "[gate]\n"), ("gate.json", "{}"), ("gate.json", '{"gate": {}}'),
    ("gate.toml", "[gate]\nmin_hm = true\n"), ("gate.json", '{"min_base": false}'),
])
def test_4_a_gate_file_that_gates_nothing_is_refused(tmp_path, tiny_spec, image_dirs, repaired, name, content):
    gate = tmp_path / name
    gate.write_text(content)
    line = one_line(cli("eval", repaired["fixed"], "--data", image_dirs["test"], "--novel-data",
                        image_dirs["novel"], "--gate", gate, *model(tiny_spec)), 3)
    assert name in line and ("gates nothing" in line or "must be numbers" in line)


# ----------------------------------------------------------------------------- 5. nothing lost


@pytest.mark.parametrize("where", ["red/new.safetensors", "new.safetensors"])
def test_5_a_new_output_under_an_input_data_folder_is_refused(tmp_path, tiny_spec, front_prompt, where):
    data = _data(tmp_path)
    out = data / where
    line = one_line(cli("repair", front_prompt, "--data", data, "--out", out, "--other-classes", *FAST,
                        *model(tiny_spec)), 8)
    assert "inside the input folder" in line and not out.exists()


def _interrupted(out: Path, ft: Path, data: Path, backbone) -> Path:
    """A repair stopped by Ctrl-C in its third epoch: its progress file is kept for --resume."""
    def stop(report) -> None:
        if report.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        repair.repair(ft, data, out, backbone=backbone, config=repair.TrainConfig(epochs=4, batch_size=8, seed=11),
                      data_options=repair.DataOptions(shots=4), on_step=stop)
    progress = out.with_name(f".{out.name}.progress")
    assert progress.exists()
    return progress


RESUMABLE = ["--epochs", "4", "--batch-size", "8", "--seed", "11", "--shots", "4"]


def test_5_saved_progress_is_not_discarded_without_resume(tmp_path, tiny_spec, backbone, image_dirs, front_prompt):
    out = tmp_path / "fixed.safetensors"
    progress = _interrupted(out, front_prompt, image_dirs["train"], backbone)
    saved = progress.read_bytes()
    line = one_line(cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, *RESUMABLE,
                        *model(tiny_spec)), 8)
    assert "--resume" in line and "--force" in line and progress.name in line and "epoch 2" in line
    assert progress.read_bytes() == saved and not out.exists()
    resumed = cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, *RESUMABLE, "--resume",
                  *model(tiny_spec))
    assert resumed.exit_code == 0, resumed.output
    assert out.exists() and not progress.exists()


def test_5_force_discards_saved_progress(tmp_path, tiny_spec, backbone, image_dirs, front_prompt):
    out = tmp_path / "fixed.safetensors"
    progress = _interrupted(out, front_prompt, image_dirs["train"], backbone)
    result = cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, *RESUMABLE, "--force",
                 *model(tiny_spec))
    assert result.exit_code == 0, result.output
    assert out.exists() and not progress.exists()


# ----------------------------------------------------------------------------- 6. exit codes and bounds


def test_6_a_zero_length_prompt_is_refused_not_an_internal_error(tmp_path, tiny_spec, image_dirs):
    empty = tmp_path / "empty.safetensors"
    save_file({"ctx": torch.zeros(0, 32)}, empty)
    line = one_line(cli("eval", empty, "--data", image_dirs["test"], *model(tiny_spec)), 5)
    assert "no tokens" in line
    out = tmp_path / "ft.safetensors"
    line = one_line(cli("finetune", "--data", image_dirs["train"], "--out", out, "--ctx-init", " ", *FAST,
                        *model(tiny_spec)), 2)
    assert "ctx_init" in line and not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "seed must be at least 0"),
    (["--seed", str(2**64)], "seed must be at most 9223372036854775807"),
    (["--path-points", "1000000000000"], "path_points must be at most 100"),
    (["--path-points", "0"], "path_points must be at least 1"),
])
def test_6_a_seed_or_path_points_out_of_bounds_is_a_usage_error(tmp_path, tiny_spec, image_dirs, front_prompt,
                                                                  flags, message):
    out = tmp_path / "fixed.safetensors"
    line = one_line(cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, *flags, *FAST,
                        *model(tiny_spec)), 2)
    assert message in line and not out.exists()


def test_6_path_points_of_a_path_report_are_bounded(tmp_path, tiny_spec, image_dirs, repaired):
    line = one_line(cli("path", repaired["ft"], repaired["fixed"], "--data", image_dirs["test"], "--out",
                        tmp_path / "p.json", "--points", str(10**12), *model(tiny_spec)[:-1]), 2)
    assert "at most 1001 points" in line


def test_6_gate_thresholds_without_novel_data_are_a_usage_error_before_any_work(tmp_path, image_dirs, front_prompt):
    gate = tmp_path / "gate.toml"
    gate.write_text("[gate]\nmin_base = 10\nmax_forgetting = 5\n")
    for flags in (["--min-hm", "50"], ["--gate", gate]):
        line = one_line(cli("eval", front_prompt, "--data", image_dirs["test"], *flags,
                            "--model", "no-such-model-is-ever-loaded"), 2)  # refused before a model is loaded
        assert "--novel-data" in line and "need" in line


def test_6_resume_with_changed_settings_is_a_usage_error(tmp_path, tiny_spec, backbone, image_dirs, front_prompt):
    out = tmp_path / "fixed.safetensors"
    _interrupted(out, front_prompt, image_dirs["train"], backbone)
    changed = [flag if flag != "11" else "12" for flag in RESUMABLE]  # another seed
    line = one_line(cli("repair", front_prompt, "--data", image_dirs["train"], "--out", out, *changed, "--resume",
                        *model(tiny_spec)), 2)
    assert "another run" in line


@pytest.mark.parametrize("make, message", [
    (lambda: repair.TrainConfig(epochs=-1), "epochs must be at least 0, got -1"),
    (lambda: repair.TrainConfig(seed=2**64), "seed must be at most 9223372036854775807"),
    (lambda: repair.TrainConfig(epochs="3"), "epochs must be an integer"),
    (lambda: repair.Objective(path_points=10**12), "path_points must be at most 100"),
    (lambda: repair.Objective(path_points=2.5), "path_points must be an integer"),
    (lambda: repair.DataOptions(shots=0), "shots must be at least 1"),
])
def test_6_the_python_api_validates_its_value_objects_as_the_cli_does(make, message):
    from repair.errors import UsageError

    with pytest.raises(UsageError, match=message):
        make()


def test_6_the_cli_gives_the_api_s_message(tmp_path, tiny_spec, image_dirs, front_prompt):
    line = one_line(cli("repair", front_prompt, "--data", image_dirs["train"], "--out", tmp_path / "o.safetensors",
                        "--epochs", "-1", *model(tiny_spec)), 2)
    assert "epochs must be at least 0, got -1" in line


def test_6_public_functions_check_their_argument_types(tmp_path, backbone, image_dirs, front_prompt):
    from repair.errors import UsageError

    report = repair.evaluate(str(front_prompt), image_dirs["test"], backbone=backbone)  # one path, not characters
    assert [row["name"] for row in report["models"]] == ["zero-shot", "front.safetensors"]
    with pytest.raises(UsageError, match=r"repair\(\): config must be a TrainConfig"):
        repair.repair(front_prompt, image_dirs["train"], tmp_path / "o.safetensors", backbone=backbone,
                      config={"epochs": 1})
    with pytest.raises(UsageError, match=r"evaluate\(\): backbone must be"):
        repair.evaluate([front_prompt], image_dirs["test"], backbone="ViT-B-16")


def test_6_predict_takes_one_image_or_a_list_and_refuses_an_empty_one(backbone, image_dirs, repaired):
    from PIL import Image

    from repair.errors import UsageError

    classifier = repair.load_repaired(repaired["fixed"], backbone=backbone)
    image = Image.open(sorted((image_dirs["test"] / "red").iterdir())[0])
    assert classifier.predict(image) == classifier.predict([image])
    assert len(classifier.predict([image, image])) == 2
    with pytest.raises(UsageError, match="at least one"):
        classifier.predict([])
    with pytest.raises(UsageError, match="PIL images"):
        classifier.predict(["red.png"])


# ----------------------------------------------------------------------------- 7. --json keeps its promise on failure


@pytest.mark.parametrize("command", [
    ["repair", "{missing}", "--data", "{data}", "--out", "{out}"],
    ["finetune", "--data", "{missing}", "--out", "{out}"],
    ["eval", "{missing}", "--data", "{data}"],
    ["path", "{missing}", "{missing}", "--data", "{data}", "--out", "{out}"],
    ["verify", "{missing}", "--ft", "{missing}"],
    ["inspect", "{missing}"],
    ["push", "{missing}", "--repo", "me/clip", "--dry-run", "{folder}"],
    ["eval", "{missing}", "--data", "{data}", "--no-such-flag"],  # a parse error, before any command body runs
])
def test_7_every_json_command_prints_a_json_error_document(tmp_path, image_dirs, command):
    values = {"missing": tmp_path / "missing.safetensors", "data": image_dirs["test"], "out": tmp_path / "o.safetensors",
              "folder": tmp_path / "staged"}
    result = cli(*[part.format(**values) for part in command], "--json")
    assert result.exit_code in (2, 3, 6), result.output
    document = json.loads(result.stdout)
    assert document == {"error": result.stderr.strip().removeprefix("error: "), "exit_code": result.exit_code}


def test_7_a_failed_gate_keeps_the_report_as_the_one_document(tiny_spec, image_dirs, repaired):
    result = cli("eval", repaired["fixed"], "--data", image_dirs["test"], "--min-base", "100", "--json",
                 *model(tiny_spec))
    assert result.exit_code == 11
    document = json.loads(result.stdout)  # one document: the report, with the gate's verdict in it
    assert document["gate"]["passed"] is False


# ----------------------------------------------------------------------------- 8. the model card tells the truth


def _card(tmp_path: Path, checkpoint: Path, *extra: object) -> str:
    staged = tmp_path / f"staged-{checkpoint.stem}"
    result = cli("push", checkpoint, "--repo", "me/clip", "--dry-run", staged, *extra)
    assert result.exit_code == 0, result.output
    return (staged / "README.md").read_text()


def test_8_one_value_per_option(tmp_path, tiny_spec, image_dirs, backbone):
    foreign = tmp_path / "coop.safetensors"  # a CoOp prompt with no record: its n_ctx is read from the tensor
    save_file({"ctx": init_context(backbone, "a photo of a")}, foreign)
    fixed = tmp_path / "fixed.safetensors"
    assert cli("repair", foreign, "--data", image_dirs["train"], "--out", fixed, "--max-steps", "1", *FAST,
               *model(tiny_spec)).exit_code == 0
    card = _card(tmp_path, fixed)
    assert "not set" not in card  # today: "n ctx | `not set`" beside "n ctx | `4`"
    for label in ("n ctx", "class specific", "seed"):
        assert card.count(f"| {label} |") == 1, label
    assert "| n ctx | `4` |" in card


def test_8_the_shots_actually_used(tmp_path, tiny_spec, image_dirs):
    head = tmp_path / "head.safetensors"  # 12 images per class: 16 shots asked, a quarter held out
    assert cli("finetune", "--kind", "linear", "--data", image_dirs["train"], "--out", head, "--shots", "16",
               "--val-fraction", "0.25", "--epochs", "1", "--batch-size", "8", *model(tiny_spec)).exit_code == 0
    card = _card(tmp_path, head)
    assert "| shots per class used | `9 (16 asked), 3 more held out for validation` |" in card
    assert "| shots | `16` |" not in card


def test_8_test_images_and_baselines_chosen_on_test_are_said(tmp_path, tiny_spec, image_dirs, repaired):
    report = tmp_path / "eval.json"
    result = cli("eval", repaired["ft"], repaired["fixed"], "--data", image_dirs["test"], "--novel-data",
                 image_dirs["novel"], "--baselines", "--json", *model(tiny_spec))
    assert result.exit_code == 0, result.output
    report.write_text(result.stdout)
    card = _card(tmp_path, repaired["fixed"], "--eval-json", report)
    assert "Base accuracy rests on 40 test images of 4 classes; novel accuracy on 40 test images of 4 classes" in card
    wise = next(line for line in card.splitlines() if line.startswith("| wise-ft"))
    assert "fixed" in wise and "chosen on these test images" not in wise  # eval never chooses on test data now
    document = json.loads(result.stdout)  # a report that did (as eval did before its --val-data) is marked
    for row in document["models"]:
        row["chosen_on_test"] = row["name"] == "wise-ft"
    report.write_text(json.dumps(document))
    (tmp_path / "again").mkdir()
    card = _card(tmp_path / "again", repaired["fixed"], "--eval-json", report)
    wise = next(line for line in card.splitlines() if line.startswith("| wise-ft"))
    assert "chosen on these test images" in wise
    ensemble = next(line for line in card.splitlines() if line.startswith("| ensemble"))
    assert "chosen on these test images" not in ensemble


def test_8_a_head_that_scores_only_its_classes_is_image_classification(tmp_path, tiny_spec, image_dirs, repaired):
    head = tmp_path / "head.safetensors"
    assert cli("finetune", "--kind", "linear", "--data", image_dirs["train"], "--out", head, *FAST,
               *model(tiny_spec)).exit_code == 0
    assert "pipeline_tag: image-classification\n" in _card(tmp_path, head)
    assert "pipeline_tag: zero-shot-image-classification\n" in _card(tmp_path, repaired["fixed"])


def test_8_license_in_the_front_matter_where_known(tmp_path, monkeypatch, repaired):
    front = _card(tmp_path, repaired["fixed"], "--license", "apache-2.0").split("---")[1]
    assert "license: apache-2.0" in front
    line = one_line(cli("push", repaired["fixed"], "--repo", "me/clip", "--dry-run", tmp_path / "bad", "--license",
                        "MIT or whatever"), 2)
    assert "license" in line

    # the base model's own license, read from its card in the local Hugging Face cache (no network)
    from repair.record import BackboneIdentity
    from repair.render.card import model_card
    from repair.workflows.inputs import read_record

    cache = tmp_path / "hub"
    snapshot = cache / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: mit\nlibrary_name: open_clip\n---\n# card\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    record = read_record(repair.read_tensors(repaired["fixed"]))
    import dataclasses

    on_the_hub = dataclasses.replace(record, backbone=BackboneIdentity("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K"))
    front = model_card(on_the_hub, filename="fixed.safetensors").split("---")[1]
    assert "base_model: laion/CLIP-ViT-B-16-laion2B-s34B-b88K" in front and "license: mit" in front
