"""Reports as text for people and CI: the eval report as a markdown step summary."""

from __future__ import annotations

from collections.abc import Sequence


def format_percent(value: float | None) -> str:
    """A table cell for an accuracy or ECE: two decimals, or n/a where a model cannot score a set."""
    return "n/a" if value is None else f"{value:.2f}"


def eval_markdown(report: dict, gate_failures: Sequence[str] | None = None, top: int = 5) -> str:
    """A GitHub-flavoured markdown summary: accuracy table, worst-forgotten classes, gate verdict."""
    has_novel = report["data"]["novel"] is not None
    header = "| model | base | " + ("novel | HM | " if has_novel else "") + "ECE (base) |"
    lines = ["## mergetune evaluation", "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in report["models"]:
        cells = [row["name"], format_percent(row["base"])]
        if has_novel:
            cells += [format_percent(row["novel"]), format_percent(row["hm"])]
        cells.append(format_percent(row["base_ece"]))
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
