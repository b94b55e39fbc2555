"""The job schema: the only way the request path (backend) and the compute path (worker) talk.

Payloads travel through Redis as JSON (RQ's JSONSerializer), so every type here converts to and
from plain dicts. This module imports neither Flask nor torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from rq.job import Job

from common.settings import project_version

#: RQ queue that predict jobs go to; ``prelabel-worker`` listens on it by default.
PREDICT_QUEUE = "predict"
#: The job function, by dotted path, so the backend never imports the worker.
PREDICT_FUNCTION = "worker.tasks.predict"

#: Training runs go to their own queue, served by a worker of their own (its own GPU).
TRAIN_QUEUE = "train"
TRAIN_FUNCTION = "worker.tasks.train"

#: The few-shot learner's jobs (seconds each): served by the predict workers after their predict
#: queue, so a project's first corrections change its tags without waiting for a training run.
ADAPT_QUEUE = "adapt"
ADAPT_FUNCTION = "worker.tasks.adapt"

#: The only functions a job may name (see ``AllowListedJob``).
JOB_FUNCTIONS = (PREDICT_FUNCTION, TRAIN_FUNCTION, ADAPT_FUNCTION)

TaskId = int | str


class RefusedJob(Exception):
    """A job in Redis names a function prelabel does not run."""


class AllowListedJob(Job):
    """RQ's job, limited to prelabel's job functions, with no callbacks and no webhooks. RQ imports
    and calls whatever dotted name a job in Redis carries (as its function, or as a callback when
    a registry cleans it up) and requests whatever webhook URL it lists, so without this anyone who
    can write to Redis could run any function, or make any request, in a process that holds the
    Label Studio API key. Every queue, registry and fetch in the backend and the workers uses it."""

    @property
    def func(self):
        if self.func_name not in JOB_FUNCTIONS:
            raise RefusedJob(f"prelabel runs only {', '.join(JOB_FUNCTIONS)}; refused {self.func_name!r:.100}")
        return super().func

    @property
    def success_callback(self):
        return None

    @property
    def failure_callback(self):
        return None

    @property
    def stopped_callback(self):
        return None

    def send_webhooks(self, status, *, exc_string=None) -> None:
        return None


@dataclass(frozen=True)
class ClassLabel:
    """One label of a control: the value Label Studio stores, and the words CLIP reads for it."""

    name: str
    texts: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassLabel:
        return cls(name=d["name"], texts=tuple(d["texts"]))


@dataclass(frozen=True)
class ChoicesControl:
    """A ``<Choices>`` control on the image: one multi- or single-label answer per task."""

    from_name: str
    to_name: str
    labels: tuple[ClassLabel, ...]
    multiple: bool

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChoicesControl:
        return cls(
            from_name=d["from_name"],
            to_name=d["to_name"],
            labels=tuple(ClassLabel.from_dict(x) for x in d["labels"]),
            multiple=d["multiple"],
        )


@dataclass(frozen=True)
class BrushControl:
    """A ``<BrushLabels>`` control on the image: one mask per label the model finds."""

    from_name: str
    to_name: str
    labels: tuple[ClassLabel, ...]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BrushControl:
        return cls(
            from_name=d["from_name"],
            to_name=d["to_name"],
            labels=tuple(ClassLabel.from_dict(x) for x in d["labels"]),
        )


#: Region controls drawn from the masks: the config tag -> the type of their results.
REGION_TYPES = {"RectangleLabels": "rectanglelabels", "PolygonLabels": "polygonlabels"}


@dataclass(frozen=True)
class RegionControl:
    """A ``<RectangleLabels>`` or ``<PolygonLabels>`` control on the image: one box or polygon per
    connected part of each found label's mask. ``type`` is the result type (``REGION_TYPES``)."""

    from_name: str
    to_name: str
    labels: tuple[ClassLabel, ...]
    type: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegionControl:
        return cls(
            from_name=d["from_name"],
            to_name=d["to_name"],
            labels=tuple(ClassLabel.from_dict(x) for x in d["labels"]),
            type=d["type"],
        )


@dataclass(frozen=True)
class ImageTask:
    """One Label Studio task reduced to what the worker needs."""

    task_id: TaskId
    image_url: str | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageTask:
        return cls(task_id=d["task_id"], image_url=d["image_url"])


@dataclass(frozen=True)
class PredictJob:
    """Up to MAX_TASKS_PER_JOB tasks of one /predict call or import: one job, so images batch on the GPU."""

    model_version: str
    image_key: str
    choices: tuple[ChoicesControl, ...]
    tasks: tuple[ImageTask, ...]
    brushes: tuple[BrushControl, ...] = ()
    project: str | None = None
    regions: tuple[RegionControl, ...] = ()
    #: The project's own settings (Label Studio's extra_params, by environment name), checked
    #: again by the worker (``Settings.project_overrides``).
    project_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def served_version(self) -> str:
        """The model version its predictions carry: the weights' version and the project's settings."""
        return project_version(self.model_version, self.project_settings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictJob:
        return cls(
            model_version=d["model_version"],
            image_key=d["image_key"],
            choices=tuple(ChoicesControl.from_dict(x) for x in d["choices"]),
            tasks=tuple(ImageTask.from_dict(x) for x in d["tasks"]),
            brushes=tuple(BrushControl.from_dict(x) for x in d.get("brushes", ())),
            project=d.get("project"),
            regions=tuple(RegionControl.from_dict(x) for x in d.get("regions", ())),
            project_settings=dict(d.get("project_settings") or {}),
        )


@dataclass(frozen=True)
class ControlTags:
    """The model's answer for one ``<Choices>`` control.

    ``scores`` holds every label's score (for thresholds, sorting and later calibration);
    ``selected`` the labels to pre-fill; ``score`` the confidence of the whole answer.
    """

    from_name: str
    selected: tuple[str, ...]
    scores: dict[str, float]
    score: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlTags:
        return cls(
            from_name=d["from_name"],
            selected=tuple(d["selected"]),
            scores=dict(d["scores"]),
            score=d["score"],
        )


@dataclass(frozen=True)
class MaskResult:
    """One label's mask for a ``<BrushLabels>`` control, already in Label Studio's brush RLE at
    the image's size, with the mean probability inside it."""

    from_name: str
    label: str
    rle: list[int]
    score: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MaskResult:
        return cls(from_name=d["from_name"], label=d["label"], rle=list(d["rle"]), score=d["score"])


@dataclass(frozen=True)
class RegionResult:
    """One box or polygon of a label for a region control: ``value`` is Label Studio's value
    without the labels (``x, y, width, height, rotation`` or ``points``, in percent of the image),
    ``score`` the mean probability of the label's mask."""

    from_name: str
    label: str
    type: str
    value: dict[str, Any]
    score: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RegionResult:
        return cls(from_name=d["from_name"], label=d["label"], type=d["type"], value=dict(d["value"]), score=d["score"])


@dataclass(frozen=True)
class TaskResult:
    """The answer for one task; ``error`` set (and nothing else) when that task failed."""

    task_id: TaskId
    choices: tuple[ControlTags, ...] = ()
    masks: tuple[MaskResult, ...] = ()
    image_width: int | None = None
    image_height: int | None = None
    error: str | None = None
    regions: tuple[RegionResult, ...] = ()

    @property
    def score(self) -> float:
        """The task's score in Label Studio: the mean of its tag confidences and its mask and region
        scores (0 with none). Label Studio sorts tasks by it: low scores are the ones to review first."""
        scores = [c.score for c in self.choices] + [m.score for m in self.masks] + [r.score for r in self.regions]
        return sum(scores) / len(scores) if scores else 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        return cls(
            task_id=d["task_id"],
            choices=tuple(ControlTags.from_dict(x) for x in d["choices"]),
            masks=tuple(MaskResult.from_dict(x) for x in d.get("masks", ())),
            image_width=d.get("image_width"),
            image_height=d.get("image_height"),
            error=d.get("error"),
            regions=tuple(RegionResult.from_dict(x) for x in d.get("regions", ())),
        )


@dataclass(frozen=True)
class PredictResult:
    """What a predict job returns: one ``TaskResult`` per task, in the job's order."""

    model_version: str
    tasks: tuple[TaskResult, ...]
    worker: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PredictResult:
        return cls(
            model_version=d["model_version"],
            tasks=tuple(TaskResult.from_dict(x) for x in d["tasks"]),
            worker=dict(d.get("worker", {})),
            timings_ms=dict(d.get("timings_ms", {})),
        )


@dataclass(frozen=True)
class TrainJob:
    """Train ``project`` from its corrections in Label Studio, starting from ``model_version``."""

    project: str
    model_version: str
    image_key: str
    choices: tuple[ChoicesControl, ...]
    brushes: tuple[BrushControl, ...]
    trigger: str  # start_training | corrections | schedule
    regions: tuple[RegionControl, ...] = ()
    project_settings: dict[str, Any] = field(default_factory=dict)  # the project's extra_params, as predictions'

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        return cls(
            project=d["project"],
            model_version=d["model_version"],
            image_key=d["image_key"],
            choices=tuple(ChoicesControl.from_dict(x) for x in d["choices"]),
            brushes=tuple(BrushControl.from_dict(x) for x in d["brushes"]),
            trigger=d["trigger"],
            regions=tuple(RegionControl.from_dict(x) for x in d.get("regions", ())),
            project_settings=dict(d.get("project_settings") or {}),
        )
