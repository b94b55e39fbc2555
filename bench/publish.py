"""Writing benchmark reports: regenerated tables, hand-written notes kept."""

from __future__ import annotations

import json
from pathlib import Path

NOTES_MARKER = "<!-- notes: kept when the tables are regenerated -->"


def write_report(path: Path, tables: str) -> None:
    """Write ``tables`` to ``path``, keeping whatever follows NOTES_MARKER in the current file."""
    notes = path.read_text().partition(NOTES_MARKER)[2] if path.is_file() else ""
    path.write_text(tables + (f"\n{NOTES_MARKER}{notes}" if notes else ""))


def publish(text: str, figures: dict, json_path: Path | None, out: Path | None) -> None:
    """Print a benchmark's tables; write its figures as JSON and its report as markdown when asked."""
    print(text)
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2))
    if out:
        write_report(out, text)
