"""Publishing a repaired checkpoint on the Hugging Face Hub, with a model card that says what it is.

A repaired file is only useful to someone else if they can tell which backbone it needs, how
it was made and how well it does, so the card is generated from the mergetune record the file
carries rather than written by hand. Uploads are staged: :func:`prepare_upload` writes exactly
the files that would be sent (a dry run shows them), and :func:`push` sends that folder in one
commit. huggingface_hub is imported inside the functions so the CLI starts fast without it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from repair.errors import HubError, InputFileError, OutputExistsError, UsageError
from repair.record import Record
from repair.render.card import is_repo_id, load_eval_report, model_card, one_line
from repair.train.fields import checked

__all__ = ["HubError", "PushResult", "model_card", "prepare_upload", "push"]

CARD_NAME = "README.md"
EVAL_NAME = "eval.json"
_NO_TOKEN = "no Hugging Face token: run `hf auth login` or set HF_TOKEN"
_TOKEN_LIKE = re.compile(r"\b(hf_|api_org_)[A-Za-z0-9]{8,}")
T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """What was (or, for a dry run, would have been) pushed; ``revision`` None is the default branch."""

    repo_id: str
    revision: str | None
    commit_url: str | None
    files: list[str]
    dry_run: bool


# --------------------------------------------------------------------------- staging


@checked
def prepare_upload(checkpoint: Path, folder: Path, *, eval_report: Path | None = None,
                   repo_id: str | None = None, license: str | None = None) -> list[Path]:
    """Write into ``folder`` exactly what a push uploads: the checkpoint, README.md, eval.json.

    Everything is validated before the first byte is written, and a failure part-way removes
    what was written, so the folder is either complete or as it was. ``repo_id`` only adds a
    download line to the card.
    """
    return _stage(Path(checkpoint), Path(folder), eval_report, repo_id, license).paths


@dataclass(frozen=True)
class _Staged:
    paths: list[Path]
    record: Record
    sha256: str


def _stage(checkpoint: Path, folder: Path, eval_report: Path | None, repo_id: str | None,
           license: str | None = None) -> _Staged:
    from repair.io import read_tensors
    from repair.workflows.inputs import read_record

    tensor_file = read_tensors(checkpoint)
    if checkpoint.name in (CARD_NAME, EVAL_NAME):
        raise InputFileError(f"{checkpoint}: rename the checkpoint; {checkpoint.name} is reserved for the card/report")
    record = read_record(tensor_file)
    report, report_bytes = load_eval_report(Path(eval_report)) if eval_report is not None else (None, None)
    is_folder = checkpoint.is_dir()  # a PEFT adapter, HF model or Tip-Adapter folder: a sub-folder of that name
    card = model_card(record, filename=checkpoint.name + ("/" if is_folder else ""), eval_report=report,
                      repo_id=repo_id,
                      shapes={name: tuple(t.shape) for name, t in tensor_file.tensors.items()},
                      file_sha256=tensor_file.sha256, license=license)
    created = _claim_folder(folder)
    written: list[Path] = []
    try:
        if is_folder:
            written.append(_copy_folder_verified(checkpoint, folder / checkpoint.name, tensor_file.sha256))
        else:
            written.append(_copy_verified(checkpoint, folder / checkpoint.name, tensor_file.sha256))
        written.append(_write_bytes(folder / CARD_NAME, card.encode("utf-8")))
        if report_bytes is not None:
            written.append(_write_bytes(folder / EVAL_NAME, report_bytes))
    except BaseException:
        _undo(written, folder if created else None)
        raise
    return _Staged(written, record, tensor_file.sha256)


def _claim_folder(folder: Path) -> bool:
    """Use an empty or new folder only: never mix staged files with someone else's. True if created."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OutputExistsError(f"{folder} exists and is not a folder; choose a new or empty folder")
    if folder.is_dir():
        if any(folder.iterdir()):
            raise OutputExistsError(f"{folder} is not empty; choose a new or empty folder")
        return False
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise OutputExistsError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None
    return True


def _copy_verified(source: Path, target: Path, sha256: str) -> Path:
    """Byte-for-byte copy, checked against the hash that was validated: the file may change meanwhile."""
    from repair.io import atomic_output, sha256_file

    with atomic_output(target) as temp:
        shutil.copyfile(source, temp)
        if sha256_file(temp) != sha256:
            raise InputFileError(f"{source}: the file changed while it was being copied; try again")
    return target


def _copy_folder_verified(source: Path, target: Path, sha256: str) -> Path:
    """An output folder's files (a PEFT adapter's two, a Hugging Face model's, Tip-Adapter's cache files), copied
    and checked against the folder's validated hash."""
    from repair.io import read_tensors

    target.mkdir()
    try:
        for entry in sorted(source.iterdir()):
            if entry.is_file() and not entry.is_symlink() and not entry.name.startswith("."):
                shutil.copyfile(entry, target / entry.name)
        if read_tensors(target).sha256 != sha256:
            raise InputFileError(f"{source}: the folder changed while it was being copied; try again")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _write_bytes(target: Path, data: bytes) -> Path:
    from repair.io import atomic_output

    with atomic_output(target) as temp:
        temp.write_bytes(data)
    return target


def _undo(written: Sequence[Path], created: Path | None) -> None:
    for path in written:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if created is not None:
        try:
            created.rmdir()
        except OSError:
            pass


# --------------------------------------------------------------------------- pushing


@checked
def push(checkpoint: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         eval_report: Path | None = None, dry_run_dir: Path | None = None, token: str | None = None,
         commit_message: str | None = None, endpoint: str | None = None, license: str | None = None) -> PushResult:
    """Upload a mergetune output with its model card (and eval report) to a Hub model repo.

    The repo is created if missing (``private`` only applies then) and, when ``revision`` names
    a branch that does not exist, that branch too. ``dry_run_dir`` stages the files there and
    touches no network. ``endpoint`` overrides HF_ENDPOINT (a mirror, or a test server).
    """
    _check_repo_id(repo_id)
    _check_revision(revision)
    checkpoint = Path(checkpoint)
    if dry_run_dir is not None:
        staged = _stage(checkpoint, Path(dry_run_dir), eval_report, repo_id, license)
        return PushResult(repo_id, revision, None, [path.name for path in staged.paths], dry_run=True)
    with tempfile.TemporaryDirectory(prefix="mergetune-push-") as staging:
        resolved = _resolve_token(token)  # before copying a possibly large file for nothing
        folder = Path(staging) / "upload"
        staged = _stage(checkpoint, folder, eval_report, repo_id, license)
        message, description = _commit_text(checkpoint.name, staged, commit_message)
        commit_url = _upload(folder, repo_id, token=resolved, endpoint=endpoint, private=private,
                             revision=revision, message=message, description=description)
    return PushResult(repo_id, revision, commit_url, [path.name for path in staged.paths], dry_run=False)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not is_repo_id(repo_id):
        raise UsageError(one_line(
            f"invalid Hub repo id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.'; "
            "at most 96 each; no '--' or '..')"))


def _check_revision(revision: str | None) -> None:
    if revision is not None and (not revision.strip() or any(ch.isspace() for ch in revision)):
        raise UsageError(one_line(f"invalid revision {revision!r}: expected a branch name such as main"))


def _resolve_token(token: str | None) -> str:
    """The explicit token, else HF_TOKEN or the cached login; never echoed anywhere."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception as exc:  # e.g. a failed OIDC exchange; its text is not ours to trust
        raise HubError(one_line(f"could not obtain a Hugging Face token ({type(exc).__name__})")) from None
    if not found:
        raise HubError(_NO_TOKEN)
    return found


def _commit_text(filename: str, staged: _Staged, commit_message: str | None) -> tuple[str, str]:
    """A summary naming the kind and the input checkpoint, with full hashes in the description."""
    record = staged.record
    source_hash = record.inputs.checkpoint.sha256 if record.inputs.checkpoint else None
    origin = f"input sha256 {source_hash[:12]}" if source_hash else "trained from zero-shot"
    summary = commit_message or f"Upload mergetune {record.kind} checkpoint {filename} ({origin})"
    description = (f"kind: {record.kind}\nstage: {record.stage}\n"
                   f"input checkpoint sha256: {source_hash or 'none'}\nthis file sha256: {staged.sha256}")
    return summary, description


def _upload(folder: Path, repo_id: str, *, token: str, endpoint: str | None, private: bool,
            revision: str | None, message: str, description: str) -> str | None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token, library_name="mergetune", library_version=_version())
    where = api.endpoint

    def call(step: str, action: Callable[[], T]) -> T:
        return _hub_call(step, repo_id, where, token, action)

    call("creating repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
    if revision is not None and revision != "main" and not revision.startswith("refs/"):
        call(f"creating branch {revision} in", lambda: api.create_branch(
            repo_id, branch=revision, exist_ok=True, repo_type="model"))
    info = call("uploading to", lambda: api.upload_folder(
        repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
        commit_message=message, commit_description=description))
    return getattr(info, "commit_url", None) or None


def _version() -> str | None:
    """Sent in the user agent so Hub-side logs can tell mergetune uploads apart."""
    from importlib import metadata

    try:
        return metadata.version("mergetune")
    except metadata.PackageNotFoundError:
        return None


def _hub_call(step: str, repo_id: str, endpoint: str, token: str, action: Callable[[], T]) -> T:
    """Run one Hub request; every library or network failure becomes one token-free line."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return action()
    except HfHubHTTPError as exc:
        detail = _http_detail(exc)
    except OfflineModeIsEnabled:
        detail = "HF_HUB_OFFLINE is set; unset it to push"
    except _transport_errors() as exc:
        detail = f"cannot reach {endpoint} ({type(exc).__name__}: {exc})"
    except ValueError as exc:  # huggingface_hub's own checks (repo id, README metadata, malformed answers)
        detail = f"{type(exc).__name__}: {exc}"
    raise HubError(_scrub(f"{step} {repo_id} on the Hugging Face Hub failed: {detail}", token)) from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures from whichever HTTP client this huggingface_hub version uses."""
    errors: list[type[BaseException]] = [OSError]
    for module_name in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module_name).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _http_detail(exc: Any) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    server = (getattr(exc, "server_message", None) or "").strip()
    detail = f"HTTP {status}" + (f": {server}" if server else "")
    if status == 401:
        detail += " (the token was rejected: run `hf auth login` or set HF_TOKEN)"
    elif status == 403:
        detail += " (the token may not write to this namespace: check its permissions)"
    return detail


def _scrub(text: str, token: str | None) -> str:
    """Servers and libraries may echo credentials; no message of ours ever carries one."""
    clean = " ".join(str(text).split())
    if token:
        clean = clean.replace(token, "***")
    return one_line(_TOKEN_LIKE.sub(lambda match: match.group(1) + "***", clean))
