"""Release gates: thresholds on an eval report that a CI step can fail on.

Thresholds come from command-line flags or a TOML/JSON file kept in the user's repository
(``[gate]`` table or top-level keys); flags win. Every checkpoint row of the report is
checked (not the zero-shot model, not the baselines).
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from repair.errors import GateFailedError, InputFileError, UsageError


@dataclass(frozen=True)
class Thresholds:
    min_base: float | None = None
    min_novel: float | None = None
    min_hm: float | None = None
    max_forgetting: float | None = None  # novel accuracy points lost against zero-shot

    def any(self) -> bool:
        return any(value is not None for value in asdict(self).values())

    def merged(self, overrides: Thresholds) -> Thresholds:
        return replace(self, **{key: value for key, value in asdict(overrides).items() if value is not None})


def load_thresholds(path: str | Path) -> Thresholds:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise InputFileError(f"{path}: gate file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputFileError(f"{path}: unreadable gate file ({type(exc).__name__}: {exc})") from None
    table = data.get("gate", data) if isinstance(data, dict) else None
    known = {field.name for field in fields(Thresholds)}
    if not isinstance(table, dict) or set(table) - known:
        unknown = sorted(set(table) - known) if isinstance(table, dict) else []
        raise InputFileError(f"{path}: expected keys {', '.join(sorted(known))}"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    if not table:
        raise InputFileError(f"{path}: gates nothing (no thresholds); give at least one of {', '.join(sorted(known))}")
    if any(isinstance(value, bool) or not isinstance(value, (int, float)) for value in table.values()):
        raise InputFileError(f"{path}: gate thresholds must be numbers "
                             f"({', '.join(f'{key} = {value!r}' for key, value in table.items())})")
    values = {key: float(value) for key, value in table.items()}
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    if bad:  # nan would pass every comparison: a gate that can never fail
        raise InputFileError(f"{path}: gate thresholds must be finite numbers ({', '.join(bad)} is not)")
    thresholds = Thresholds(**values)
    problem = out_of_range(thresholds)
    if problem:
        raise InputFileError(f"{path}: {problem[0]} {problem[1]}")
    return thresholds


def out_of_range(thresholds: Thresholds) -> tuple[str, str] | None:
    """The first threshold that cannot mean what its writer meant, and why; None if all can. Accuracies are
    percentages: a minimum above 100 can never pass, and one below 1 is almost surely a fraction (0.7 for 70 %)
    that passes any model."""
    for name in ("min_base", "min_novel", "min_hm"):
        value = getattr(thresholds, name)
        if value is None:
            continue
        if not 0.0 <= value <= 100.0:
            return name, f"{value:g} is not a percentage (0-100)"
        if 0.0 < value < 1.0:
            return name, f"{value:g} is {value:g} %: thresholds are percentages, write {value * 100:g} for {value * 100:g} %"
    if thresholds.max_forgetting is not None and not -100.0 <= thresholds.max_forgetting <= 100.0:
        return "max_forgetting", f"{thresholds.max_forgetting:g} is not a number of accuracy points (-100 to 100)"
    return None


def check(report: dict[str, object], thresholds: Thresholds) -> list[str]:
    """One line per failed threshold and checkpoint; empty when everything holds."""
    rows = report["models"]
    zero_shot = next(row for row in rows if row["role"] == "zero-shot")
    require_novel(thresholds, report["data"]["novel"] is not None)
    failures = []
    for row in rows:
        if row["role"] != "checkpoint":
            continue
        values = {"base": row["base"], "novel": row["novel"], "HM": row["hm"]}
        for label, minimum in (("base", thresholds.min_base), ("novel", thresholds.min_novel),
                               ("HM", thresholds.min_hm)):
            if minimum is not None and (values[label] is None or values[label] < minimum):
                shown = "n/a" if values[label] is None else f"{values[label]:.2f}"
                failures.append(f"{row['name']}: {label} accuracy {shown} < {minimum:g}")
        if thresholds.max_forgetting is not None:
            if row["novel"] is None or zero_shot["novel"] is None:
                failures.append(f"{row['name']}: forgetting cannot be measured (no novel accuracy)")
            elif zero_shot["novel"] - row["novel"] > thresholds.max_forgetting:
                lost = zero_shot["novel"] - row["novel"]
                failures.append(f"{row['name']}: forgot {lost:.2f} novel points since zero-shot "
                                f"> {thresholds.max_forgetting:g}")
    return failures


def require_novel(thresholds: Thresholds, has_novel: bool) -> None:
    """Thresholds on novel accuracy need held-out data: without it they could never be checked (a usage error)."""
    needing = [name for name in ("min_novel", "min_hm", "max_forgetting") if getattr(thresholds, name) is not None]
    if needing and not has_novel:
        raise UsageError(f"{', '.join('--' + name.replace('_', '-') for name in needing)} "
                         f"{'need' if len(needing) > 1 else 'needs'} --novel-data (held-out classes to measure novel "
                         "accuracy on)")


def assemble(flags: Thresholds, gate_file: str | Path | None = None, has_novel: bool | None = None) -> Thresholds:
    """The thresholds a command enforces: the gate file's, overridden by the flags given. With ``has_novel``
    (whether --novel-data is given), thresholds that need it are refused before any work."""
    problem = out_of_range(flags)
    if problem:
        raise UsageError(f"--{problem[0].replace('_', '-')} {problem[1]}")
    thresholds = load_thresholds(gate_file).merged(flags) if gate_file else flags
    if has_novel is not None:
        require_novel(thresholds, has_novel)
    return thresholds


def apply(report: dict[str, object], thresholds: Thresholds) -> list[str] | None:
    """Check the report and record the verdict in it (``report["gate"]``); None when nothing is gated."""
    if not thresholds.any():
        return None
    failures = check(report, thresholds)
    report["gate"] = {"thresholds": asdict(thresholds), "failures": failures, "passed": not failures}
    return failures


def require_passed(failures: list[str] | None) -> None:
    """The one-line refusal (exit 11) for a failed gate."""
    if failures:
        raise GateFailedError("gate failed: " + "; ".join(failures))
