"""Model cards, dry runs and pushes to a Hub stand-in on 127.0.0.1 (never the real Hub)."""

from __future__ import annotations

import base64
import json
import socket
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from repair import DataOptions, repair as run_repair
from repair.record import BackboneIdentity
from repair.workflows.inputs import read_record
from repair.io import read_tensors
from repair.errors import InputFileError, OutputExistsError, UsageError
from repair.workflows.hub import HubError, PushResult, model_card, prepare_upload, push
from repair.kinds.coop import init_context
from repair.kinds import CoOpPrompts
from repair.train.loop import TrainConfig

TOKEN = "hf_MergetuneTestToken0123456789abcdef"
REPO = "test-org/repaired-coop"


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def repaired(tmp_path_factory, backbone, image_dirs) -> Path:
    """One repaired file (zero steps: the record is complete, the run instant)."""
    folder = tmp_path_factory.mktemp("hub-inputs")
    ctx = init_context(backbone, "a photo of a") + 0.01
    save_file({"ctx": ctx}, folder / "ft.safetensors")
    outcome = run_repair(folder / "ft.safetensors", image_dirs["train"], folder / "fixed.safetensors",
                         backbone=backbone, config=TrainConfig(max_steps=0),
                         data_options=DataOptions(shots=4, cache_dir=None))
    return outcome.path


@pytest.fixture
def eval_file(tmp_path, repaired) -> Path:
    sha = read_tensors(repaired).sha256
    report = {
        "schema": "mergetune.eval/1",
        "backbone": {"model": "tiny", "pretrained": None, "model_config": None},
        "data": {"base": None, "novel": None},
        "models": [
            {"name": "zero-shot", "base": 50.0, "novel": 40.0, "hm": 44.4444, "notes": [], "source": None},
            {"name": "fixed.safetensors", "base": 75.5, "novel": None, "hm": None,
             "notes": ["no novel folder"], "source": {"path": str(repaired), "sha256": sha}},
        ],
        "versions": {},
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report, indent=1))
    return path


def front_matter(card: str) -> dict[str, object]:
    """The YAML block between the first two '---' lines, for the flat keys and lists a card uses."""
    lines = card.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    parsed: dict[str, object] = {}
    key = None
    for line in lines[1:end]:
        if line.startswith("- "):
            assert key is not None and isinstance(parsed[key], list), line
            parsed[key].append(line[2:].strip().strip('"'))
        else:
            key, sep, value = line.partition(":")
            assert sep == ":" and key and not key.startswith(" "), line
            parsed[key] = value.strip().strip('"') if value.strip() else []
    return parsed


# --------------------------------------------------------------------------- the card


def test_card_names_backbone_method_kind_and_hyperparameters(repaired, tiny_model_dir, image_dirs):
    record = read_record(read_tensors(repaired))
    card = model_card(record, filename="fixed.safetensors")
    meta = front_matter(card)
    assert meta["library_name"] == "mergetune"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["tags"] == ["clip", "mergetune", "coop"]
    assert "base_model" not in meta  # a local folder has no Hub identity
    assert "MergeTune continued fine-tuning" in card
    assert "a local open_clip folder" in card and str(tiny_model_dir) not in card  # no local paths leak
    assert str(image_dirs["train"]) not in card
    defaults = CoOpPrompts.defaults
    for expected in (f"| lam_zs (zero-shot surrogate weight) | `{defaults.lam_zs:g}` |",
                     "| lam_lmc (path term weight) | `1` |", "| path points K | `5` |",
                     f"| surrogate | `{defaults.surrogate}` |", f"| steps | `{defaults.schedule.steps}` |",
                     f"| step size | `{defaults.schedule.step_size:g}` |", "| optimizer | `adam` |",
                     "| shots per class used | `4 (4 asked)` |", "| seed | `0` |", "| n ctx | `4` |"):
        assert expected in card
    assert "blue, green, red, yellow" in card
    assert record.inputs.checkpoint.sha256 in card
    assert record.inputs.data.manifest_sha256 in card
    assert record.versions["torch"] in card
    assert "## Evaluation" not in card
    assert "mergetune eval fixed.safetensors --data" in card
    assert 'clf = repair.load_repaired("fixed.safetensors"' in card


def test_card_base_model_only_for_hub_weights(repaired):
    record = read_record(read_tensors(repaired))
    hub = model_card(replace(record, backbone=BackboneIdentity("hf-hub:some-org/clip-b16")), filename="f.safetensors")
    assert front_matter(hub)["base_model"] == "some-org/clip-b16"
    assert "`hf-hub:some-org/clip-b16`" in hub

    pair = replace(record, backbone=BackboneIdentity("ViT-B-16", "openai"))
    card = model_card(pair, filename="f.safetensors")
    assert "open_clip `ViT-B-16` with pretrained weights `openai`" in card
    assert "--model ViT-B-16 --pretrained openai" in card
    assert "openai/clip-vit-base-patch16" not in card  # transformers weights: not the same files
    base = front_matter(card).get("base_model")
    if base is not None:  # only ever the repo open_clip itself loads these weights from
        import open_clip

        assert base == open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"].strip("/")

    custom = replace(pair, backbone=replace(pair.backbone, model_config="/home/me/arch.json"))
    card = model_card(custom, filename="f.safetensors")
    assert "base_model" not in front_matter(card) and "/home/me" not in card


def test_card_with_eval_report_has_the_table(repaired, eval_file):
    tensor_file = read_tensors(repaired)
    report = json.loads(eval_file.read_text())
    card = model_card(read_record(tensor_file), filename="fixed.safetensors", eval_report=report,
                      file_sha256=tensor_file.sha256)
    assert "## Evaluation" in card
    assert "| model | base | novel | HM |" in card
    assert "| zero-shot | 50.00 | 40.00 | 44.44 |" in card
    assert "| fixed.safetensors (this file) | 75.50 | n/a | n/a |" in card
    with pytest.raises(InputFileError, match="eval report"):
        model_card(read_record(tensor_file), filename="x", eval_report={**report, "schema": "other/1"})


def test_eval_schema_matches_the_evaluator():
    import repair.eval.metrics
    import repair.render.card

    assert repair.render.card.EVAL_SCHEMA == repair.eval.metrics.EVAL_SCHEMA


def test_file_without_a_record_is_refused(tmp_path):
    with pytest.raises(InputFileError, match="no mergetune record") as caught:
        model_card(None, filename="plain.safetensors")
    assert "\n" not in str(caught.value)
    save_file({"w": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(InputFileError, match="no mergetune record"):
        prepare_upload(tmp_path / "plain.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- dry runs (hub fixture: see below)


def test_dry_run_writes_exactly_the_upload(hub, tmp_path, repaired, eval_file):
    result = push(repaired, REPO, dry_run_dir=tmp_path / "dry", eval_report=eval_file, token=None)
    assert hub.requests == []  # no token needed, no request made
    assert result == PushResult(REPO, None, None, ["fixed.safetensors", "README.md", "eval.json"], True)
    assert sorted(p.name for p in (tmp_path / "dry").iterdir()) == ["README.md", "eval.json", "fixed.safetensors"]
    assert (tmp_path / "dry" / "fixed.safetensors").read_bytes() == repaired.read_bytes()
    assert (tmp_path / "dry" / "eval.json").read_bytes() == eval_file.read_bytes()
    card = (tmp_path / "dry" / "README.md").read_text(encoding="utf-8")
    assert "| fixed.safetensors (this file) | 75.50 | n/a | n/a |" in card
    assert f"hf download {REPO} fixed.safetensors" in card

    paths = prepare_upload(repaired, tmp_path / "plain")
    assert [p.name for p in paths] == ["fixed.safetensors", "README.md"]
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["README.md", "fixed.safetensors"]


def test_dry_run_refuses_a_non_empty_folder(tmp_path, repaired):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not empty"):
        push(repaired, REPO, dry_run_dir=tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError):
        prepare_upload(repaired, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    assert len(prepare_upload(repaired, tmp_path / "empty")) == 2


BAD_REPORTS = ["{not json", json.dumps({"schema": "other/1", "models": []}),
               json.dumps({"schema": "mergetune.eval/1", "models": [{"name": "a", "base": "x"}]})]


@pytest.mark.parametrize("content", BAD_REPORTS)
def test_bad_eval_report_is_refused_before_writing(tmp_path, repaired, content):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(InputFileError) as caught:
        prepare_upload(repaired, tmp_path / "out", eval_report=tmp_path / "bad.json")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- a Hub stand-in


class FakeHub:
    """Records every request and answers the minimum huggingface_hub needs for a folder upload."""

    def __init__(self) -> None:
        self.requests: list[dict[str, object]] = []
        self.commits: list[dict[str, object]] = []
        self.fail: tuple[int, str] | None = None
        self.url = ""
        self.lock = threading.Lock()

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
        if self.fail is not None:
            return self.fail[0], {"error": self.fail[1]}
        parts = path.split("?")[0].strip("/").split("/")
        if method == "POST" and parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            return 200, {"url": f"{self.url}/{payload['organization']}/{payload['name']}"}
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return 200, {}
        if method == "POST" and len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo, action = f"{parts[2]}/{parts[3]}", parts[4]
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                        "oid": None} for f in files]}
            if action == "commit":
                return 200, self.commit(repo, body)
            if action == "branch":
                return 200, {}
        return 404, {"error": f"fake hub has no route for {method} {path}"}

    def commit(self, repo: str, body: bytes) -> dict[str, object]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                 for line in lines if line["key"] == "file"}
        self.commits.append({"header": header, "files": files, "keys": [line["key"] for line in lines]})
        oid = f"{len(self.commits):040x}"
        return {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() != "authorization"}
            auth = self.headers.get("Authorization")
            with hub.lock:
                hub.requests.append({"method": self.command, "path": self.path, "headers": headers,
                                     "authorized": auth == f"Bearer {TOKEN}", "has_auth": auth is not None,
                                     "json": json.loads(body) if body[:1] == b"{" and b"\n" not in body.strip()
                                     else None})
                status, answer = hub.answer(self.command, self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub on 127.0.0.1, with huggingface_hub pointed at it and no real credentials visible."""
    import huggingface_hub.constants as constants

    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it; this test talks to localhost only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-cached-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agents.json"))
    try:  # huggingface_hub may fetch an agent registry when building headers: give it an empty one
        import huggingface_hub.utils._detect_agent as detect_agent

        monkeypatch.setattr(detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    except ImportError:
        pass
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("revision", [None, "repaired"])
def test_push_uploads_card_and_checkpoint(hub, monkeypatch, capfd, repaired, eval_file, revision):
    if revision is None:  # token from the environment, endpoint from HF_ENDPOINT
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        result = push(repaired, REPO, private=True, eval_report=eval_file)
    else:  # explicit token and endpoint
        result = push(repaired, REPO, revision=revision, token=TOKEN, endpoint=hub.url)

    branch = revision or "main"
    expected = [("POST", "/api/repos/create")]
    if revision:
        expected.append(("POST", f"/api/models/{REPO}/branch/{revision}"))
    expected += [("POST", "/api/validate-yaml"), ("POST", f"/api/models/{REPO}/preupload/{branch}"),
                 ("POST", f"/api/models/{REPO}/commit/{branch}")]
    assert hub.calls() == expected
    assert all(request["authorized"] for request in hub.requests)
    assert hub.requests[0]["json"] == {"name": "repaired-coop", "organization": "test-org",
                                       "visibility": "private" if revision is None else "public", "type": "model"}

    assert len(hub.commits) == 1
    files = hub.commits[0]["files"]
    names = ["fixed.safetensors", "README.md"] + (["eval.json"] if revision is None else [])
    assert sorted(files) == sorted(names)
    assert files["fixed.safetensors"] == repaired.read_bytes()
    card = files["README.md"].decode()
    assert "MergeTune continued fine-tuning" in card and f"hf download {REPO}" in card
    assert front_matter(card)["tags"] == ["clip", "mergetune", "coop"]
    if revision is None:
        assert files["eval.json"] == eval_file.read_bytes() and "## Evaluation" in card
    summary = hub.commits[0]["header"]["summary"]
    input_sha = read_record(read_tensors(repaired)).inputs.checkpoint.sha256
    assert "coop" in summary and input_sha[:12] in summary

    assert result.repo_id == REPO and result.revision == revision and not result.dry_run
    assert result.commit_url == f"{hub.url}/{REPO}/commit/{1:040x}"
    assert sorted(result.files) == sorted(names)
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + repr(result)


def test_push_without_any_token_is_refused(hub, repaired):
    with pytest.raises(HubError) as caught:
        push(repaired, REPO)
    assert str(caught.value) == "no Hugging Face token: run `hf auth login` or set HF_TOKEN"
    assert caught.value.exit_code == 12
    assert hub.requests == []


@pytest.mark.parametrize("status", [401, 403, 500])
def test_hub_refusal_is_one_token_free_line(hub, capfd, repaired, status):
    hub.fail = (status, f"simulated refusal {TOKEN}")
    with pytest.raises(HubError) as caught:
        push(repaired, REPO, token=TOKEN)
    message = str(caught.value)
    assert f"HTTP {status}" in message and "simulated refusal" in message and REPO in message
    assert "\n" not in message and "Traceback" not in message
    assert TOKEN not in message and caught.value.__cause__ is None
    assert hub.calls()[0] == ("POST", "/api/repos/create")
    assert all(request["authorized"] for request in hub.requests)
    out, err = capfd.readouterr()
    assert TOKEN not in out + err


def test_unreachable_endpoint_is_a_hub_error(hub, repaired):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(HubError, match="cannot reach") as caught:
        push(repaired, REPO, token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert TOKEN not in str(caught.value)


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "org/na--me", "org/", "-org/name", "org/name.git"])
def test_malformed_repo_id_is_refused_before_any_request(hub, repaired, repo_id):
    with pytest.raises(UsageError, match="ORG/NAME") as caught:  # a bad option value: exit 2
        push(repaired, repo_id, token=TOKEN)
    assert caught.value.exit_code == 2
    with pytest.raises(UsageError, match="invalid revision"):
        push(repaired, REPO, revision="my branch", token=TOKEN)
    assert hub.requests == []
