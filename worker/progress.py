"""Progress and cancellation for long jobs: what ``GET /jobs/<id>`` and the logs show."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from rq.job import Job

from common import keys
from worker.training.loop import TrainingCancelled

log = logging.getLogger(__name__)

#: Set when this worker process is asked to stop (SIGTERM: a redeploy, ``docker stop``). A running
#: training or few-shot job then stops at its next step, as when cancelled, instead of being
#: killed mid-step when the grace period ends and found dead 90 s later.
SHUTTING_DOWN = threading.Event()


#: Points of a stage's loss curve kept in the job's meta (halved, every other dropped, when full).
CURVE_POINTS = 200


def thin(values: list[float], points: int = CURVE_POINTS) -> list[list[float]]:
    """At most about ``points`` (step, loss) pairs of a loss curve (``values`` by step from 1),
    evenly spaced, the last one kept: a loss curve for a page."""
    pairs = [[step, round(loss, 5)] for step, loss in enumerate(values, start=1)]
    return sparse(pairs, points)


def sparse(pairs: list[list[float]], points: int = CURVE_POINTS) -> list[list[float]]:
    if len(pairs) <= points:
        return pairs
    stride = len(pairs) / points
    return [pairs[int(i * stride)] for i in range(points - 1)] + [pairs[-1]]


class JobProgress:
    """Writes (stage, step, steps, loss, eta) and the stage's loss curve into the RQ job's meta at
    most once a second, logs every tenth of a stage, and tells the job when the backend asked it
    to stop."""

    def __init__(self, job: Job | None, label: str, min_interval: float = 1.0) -> None:
        self.job = job
        self.label = label
        self.min_interval = min_interval
        self._stage: str | None = None
        self._stage_started = time.monotonic()
        self._last_write = 0.0
        self._curve: list[list[float]] = []  # (step, loss)

    def report(self, stage: str, step: int, steps: int, loss: float | None) -> None:
        now = time.monotonic()
        if stage != self._stage:
            self._stage, self._stage_started, self._last_write, self._curve = stage, now, 0.0, []
        if loss is not None:
            self._curve.append([step, round(loss, 5)])
            if len(self._curve) > 2 * CURVE_POINTS:
                self._curve = self._curve[::2]
        if self.job is None or (now - self._last_write < self.min_interval and step != steps):
            return
        self._last_write = now
        elapsed = now - self._stage_started
        eta = round(elapsed / step * (steps - step), 1) if step and steps else None
        self.job.meta["progress"] = {"stage": stage, "step": step, "steps": steps, "loss": loss, "eta_s": eta}
        self.job.meta["curve"] = sparse(self._curve)
        self.job.save_meta()
        if step and steps and (step == steps or step % max(1, steps // 10) == 0):
            shown = f"{loss:.4f}" if loss is not None else "-"
            log.info(
                "%s job %s: %s step %d/%d loss %s eta %s s", self.label, self.job.id, stage, step, steps, shown, eta
            )

    def should_stop(self) -> bool:
        if SHUTTING_DOWN.is_set():
            return True
        return self.job is not None and bool(self.job.connection.exists(keys.cancel(self.job.id)))


@contextlib.contextmanager
def naming_shutdown() -> Iterator[None]:
    """A job stopped because its worker is shutting down says so (a cancel says "stopped ...")."""
    try:
        yield
    except TrainingCancelled as e:
        if not SHUTTING_DOWN.is_set():
            raise
        raise TrainingCancelled(f"{e}: its worker was shut down (SIGTERM); start the run again") from e
