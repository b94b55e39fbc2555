"""Writing benchmark reports: regenerated tables, hand-written notes kept."""

from __future__ import annotations

from pathlib import Path

NOTES_MARKER = "<!-- notes: kept when the tables are regenerated -->"


def write_report(path: Path, tables: str) -> None:
    """Write ``tables`` to ``path``, keeping whatever follows NOTES_MARKER in the current file."""
    notes = path.read_text().partition(NOTES_MARKER)[2] if path.is_file() else ""
    path.write_text(tables + (f"\n{NOTES_MARKER}{notes}" if notes else ""))
