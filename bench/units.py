"""Finished parts of a long benchmark run, kept on disk so the run can stop and go on later.

The quality benchmark's learning loop costs hours of CPU per seed. With a units folder, every
finished unit (one seed's sections 1-3, one row of section 4) is written there as JSON; running
the same command again reads those back instead of recomputing them, on another machine too if the
folder travels (it is small enough to commit). The folder records the configuration its units were
measured with and refuses another one. It cannot tell a change to the benchmark's code: start a
new folder after one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

CONFIG = "config.json"


class Units:
    """Units of work by name, computed once: ``get(name, compute)``. Without a folder (``None``)
    every unit is computed and nothing is kept."""

    def __init__(self, folder: Path | None, config: dict | None = None) -> None:
        self.folder = folder
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        recorded = folder / CONFIG
        config = json.loads(json.dumps(config or {}))  # as it reads back: tuples become lists
        if recorded.is_file():
            theirs = json.loads(recorded.read_text())
            if theirs != config:
                changed = sorted(k for k in {*theirs, *config} if theirs.get(k) != config.get(k))
                raise ValueError(
                    f"{folder} holds units measured with another configuration (differs in {', '.join(changed)}): "
                    "run with the same options, or give another units folder"
                )
        else:
            recorded.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def get(self, name: str, compute: Callable[[], dict]) -> dict:
        """The unit ``name``: read back if a run finished it, else computed (and kept). A unit
        computed here goes through JSON like one read back, so both give the same report."""
        path = self.folder / f"{name}.json" if self.folder else None
        if path is not None and path.is_file():
            print(json.dumps({"unit": name, "read": str(path)}), flush=True)
            return json.loads(path.read_text())
        text = json.dumps(compute(), indent=1)
        if path is not None:
            partial = path.with_suffix(".partial")  # a run stopped while writing leaves no unit behind
            partial.write_text(text + "\n")
            partial.replace(path)
        return json.loads(text)
