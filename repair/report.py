"""Reports as text for people and CI: the eval report as a markdown step summary."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def eval_markdown(report: dict, gate_failures: Sequence[str] | None = None, top: int = 5) -> str:
    """A GitHub-flavoured markdown summary: accuracy table, worst-forgotten classes, gate verdict."""
    has_novel = report["data"]["novel"] is not None
    header = "| model | base | " + ("novel | HM | " if has_novel else "") + "ECE (base) |"
    lines = ["## mergetune evaluation", "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["models"]:
        cells = [row["name"], _cell(row["base"])]
        if has_novel:
            cells += [_cell(row["novel"]), _cell(row["hm"])]
        cells.append(_cell(row["base_ece"]))
        lines.append("| " + " | ".join(cells) + " |")
    for name, rows in report["forgetting"].items():
        losers = [row for row in rows if row["change"] < 0][:top]
        if losers:
            lines += ["", f"Classes that lost the most since zero-shot, {name}: " + ", ".join(
                f"{row['class']} ({row['split']}, {row['change']:+.1f})" for row in losers)]
    if report.get("baselines") and report["baselines"].get("wise_ft"):
        lines += ["", f"WiSE-FT alpha chosen by {report['baselines']['wise_ft']['selection']}."]
    if gate_failures is not None:
        verdict = "passed" if not gate_failures else "FAILED: " + "; ".join(gate_failures)
        lines += ["", f"**Gate {verdict}**"]
    return "\n".join(lines) + "\n"
