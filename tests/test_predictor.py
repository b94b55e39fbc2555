"""The predict pipeline end to end in-process: task order, per-task errors, and models that start
while a job's images are still downloading."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

from common.errors import ImageFetchError
from common.jobs import BrushControl, ChoicesControl, ClassLabel, ImageTask, PredictJob
from worker import predictor as pipeline
from worker.loading import load_clip
from worker.predictor import Predictor

LABELS = tuple(ClassLabel(name, (name,)) for name in ("cat", "dog", "person"))
CHOICES = (ChoicesControl("tags", "image", LABELS, True),)
BRUSHES = (BrushControl("mask", "image", LABELS),)


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buffer, "JPEG")
    return buffer.getvalue()


class Files:
    """A fetcher serving named images from memory; ``gate`` holds back one of them until set."""

    def __init__(self, files: dict[str, bytes], held: str | None = None) -> None:
        self.files = files
        self.held = held
        self.gate = threading.Event()

    def fetch(self, url: str, task_id: object = None) -> bytes:
        if url == self.held and not self.gate.wait(timeout=60):
            raise AssertionError("the models waited for every image before starting")
        if url not in self.files:
            raise ImageFetchError(f"{url}: 404 Not Found")
        return self.files[url]


def _job(urls: list[str]) -> PredictJob:
    tasks = tuple(ImageTask(10 + i, url) for i, url in enumerate(urls))
    return PredictJob("v", "image", CHOICES, tasks, BRUSHES)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_results_keep_task_order_across_sizes_and_failures(make_settings, batch_size):
    files = {"wide": _jpeg((96, 48)), "tall": _jpeg((48, 96)), "square": _jpeg((64, 64))}
    settings = make_settings(batch_size=batch_size, mask_min_area=0.0)
    predictor = Predictor(settings, load_clip(settings), fetcher=Files(files))
    urls = ["wide", "missing", "tall", "wide", "square", "tall"]
    result = predictor.predict(_job(urls))
    assert [t.task_id for t in result.tasks] == [10 + i for i in range(len(urls))]
    for url, task in zip(urls, result.tasks, strict=True):
        if url == "missing":
            assert "404" in task.error and not task.choices and not task.masks
            continue
        assert task.error is None and task.choices and task.choices[0].from_name == "tags"
        assert (task.image_width, task.image_height) == Image.open(io.BytesIO(files[url])).size
    assert {"text", "waiting_for_images", "model", "masks", "total"} <= set(result.timings_ms)


def test_models_run_full_batches_while_later_images_download(make_settings, monkeypatch):
    """The last image is held back until a trunk pass has run: a pipeline that fetched every image
    before starting the models would wait here for ever (the fetcher gives up after a minute)."""
    files = {name: _jpeg((64, 48)) for name in ("a", "b", "c")}
    fetcher = Files(files, held="c")
    trunk = pipeline.run_trunk

    def observed_trunk(*args, **kwargs):
        fetcher.gate.set()
        return trunk(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_trunk", observed_trunk)
    settings = make_settings(batch_size=2)
    bundle = load_clip(settings)
    result = Predictor(settings, bundle, fetcher=fetcher).predict(_job(["a", "b", "c"]))
    assert [t.error for t in result.tasks] == [None, None, None]
    # Starting early changes nothing: the same answers as with every image there from the start.
    monkeypatch.undo()
    upfront = Predictor(settings, bundle, fetcher=Files(files)).predict(_job(["a", "b", "c"]))
    assert result.tasks == upfront.tasks
