"""Stopping the processes a benchmark or test started, so none outlives it."""

from __future__ import annotations

import subprocess
import sys


def stop(*processes: subprocess.Popen, timeout: float = 30) -> list[subprocess.Popen]:
    """SIGTERM each process, give each up to ``timeout`` s to exit, SIGKILL the rest, and reap
    all (an unreaped child is still running to Python: a ResourceWarning later). Returns
    the ones that had to be killed, each reported on stderr."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    killed = []
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{process.args} did not exit within {timeout} s of SIGTERM; killed", file=sys.stderr)
            process.kill()
            process.wait()
            killed.append(process)
    return killed
