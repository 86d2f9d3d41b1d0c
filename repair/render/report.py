"""One eval report, three renderings: the Rich table (terminal), the markdown summary (CI step
summaries) and the model card's table. Each is built from the same :class:`EvalTable`, so the
columns, the percent format and the notes can never drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def format_percent(value: float | None) -> str:
    """A table cell for an accuracy or ECE: two decimals, or n/a where a model cannot score a set."""
    return "n/a" if value is None else f"{value:.2f}"


@dataclass
class EvalTable:
    """Headers and rows as text cells, plus each model's notes (why a cell is n/a)."""

    headers: list[str]
    rows: list[list[str]]
    notes: list[tuple[str, str]] = field(default_factory=list)

    def markdown(self, escape: Callable[[str], str] = str) -> list[str]:
        align = ["---"] + ["---:"] * (len(self.headers) - 1)
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join(align) + "|"]
        return lines + ["| " + " | ".join([escape(row[0]), *row[1:]]) + " |" for row in self.rows]


def model_label(row: Mapping[str, Any]) -> str:
    """A row's name as people read it; a baseline's says what it chose and how:
    ``wise-ft (alpha 0.6; validation split)``."""
    if row.get("role") != "baseline" or not row.get("chosen_by"):
        return str(row["name"])
    settings = ", ".join(f"{key} {value:g}" for key, value in (row.get("settings") or {}).items())
    return f"{row['name']} ({settings}; {row['chosen_by']})" if settings else f"{row['name']} ({row['chosen_by']})"


def skipped_baselines(report: Mapping[str, Any]) -> list[str]:
    """One line per baseline that was asked for but not run, with the reason."""
    skipped = (report.get("baselines") or {}).get("skipped") or {}
    return [f"{name}: not run ({reason})" for name, reason in skipped.items()]


def eval_table(report: Mapping[str, Any], *, ece: bool = True, always_novel: bool = False,
               label: Callable[[Mapping[str, Any]], str] | None = None) -> EvalTable:
    """The accuracy table of an eval report: model, base, (novel, HM), (ECE base)."""
    has_novel = always_novel or report["data"]["novel"] is not None
    headers = ["model", "base"] + (["novel", "HM"] if has_novel else []) + (["ECE base"] if ece else [])
    rows, notes = [], []
    for row in report["models"]:
        cells = [label(row) if label else model_label(row), format_percent(row.get("base"))]
        if has_novel:
            cells += [format_percent(row.get("novel")), format_percent(row.get("hm"))]
        if ece:
            cells.append(format_percent(row.get("base_ece")))
        rows.append(cells)
        notes += [(row["name"], note) for note in row.get("notes") or []]
    return EvalTable(headers, rows, notes)


def most_forgotten(report: Mapping[str, Any], top: int = 5) -> dict[str, list[dict[str, Any]]]:
    """Per model, the classes that lost accuracy since zero-shot, worst first."""
    lost = {name: [row for row in rows if row["change"] < 0][:top] for name, rows in report["forgetting"].items()}
    return {name: rows for name, rows in lost.items() if rows}


def rich_table(report: Mapping[str, Any]):
    """The terminal table (Rich), with forgetting and notes as lines after it."""
    from rich.table import Table

    table_data = eval_table(report)
    table = Table(title="accuracy (%)", title_justify="left")
    for index, header in enumerate(table_data.headers):
        table.add_column(header, justify="left" if index == 0 else "right")
    for row in table_data.rows:
        table.add_row(*row)
    lines = [f"most forgotten by {name}: " + ", ".join(f"{row['class']} {row['change']:+.1f}" for row in rows)
             for name, rows in most_forgotten(report).items()]
    lines += [f"{name}: {note}" for name, note in table_data.notes]
    return table, lines + skipped_baselines(report)


def eval_markdown(report: Mapping[str, Any], gate_failures: Sequence[str] | None = None, top: int = 5) -> str:
    """A GitHub-flavoured markdown summary: accuracy table, worst-forgotten classes, gate verdict."""
    lines = ["## mergetune evaluation", "", *eval_table(report).markdown()]
    for name, rows in most_forgotten(report, top).items():
        lines += ["", f"Classes that lost the most since zero-shot, {name}: " + ", ".join(
            f"{row['class']} ({row['split']}, {row['change']:+.1f})" for row in rows)]
    if report.get("baselines"):
        validation = report["baselines"].get("validation")
        where = f"the validation split {validation['base']['path']}" if validation else "no validation split"
        lines += ["", f"Baselines' settings: chosen on {where}, label-free, or fixed defaults (never the test "
                      "labels); each row says which."]
        lines += [f"- {line}" for line in skipped_baselines(report)]
    if gate_failures is not None:
        verdict = "passed" if not gate_failures else "FAILED: " + "; ".join(gate_failures)
        lines += ["", f"**Gate {verdict}**"]
    return "\n".join(lines) + "\n"


def chosen_on_test(row: Mapping[str, Any]) -> bool:
    """A baseline whose setting was chosen on the data it is scored on (WiSE-FT's best alpha): optimistic.
    Reports from before the flag name it in the row's name."""
    return bool(row.get("chosen_on_test", row.get("role") == "baseline"
                        and str(row.get("name", "")).startswith("wise-ft (best")))


def card_table(report: Mapping[str, Any], is_this_file: Callable[[Mapping[str, Any]], bool]) -> EvalTable:
    """The model card's table: base, novel, HM for every model, this file marked, and every baseline chosen
    on these test images marked as such."""
    def label(row: Mapping[str, Any]) -> str:
        return model_label(row) + (" (this file)" if is_this_file(row) else "") + (
            " (chosen on these test images: optimistic)" if chosen_on_test(row) else "")

    return eval_table(report, ece=False, always_novel=True, label=label)
