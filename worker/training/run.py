"""One training run for one project: corrections in, maybe a new active version out.

1. pull the project's current annotations from Label Studio and fetch their images;
2. hold out a fifth of the corrected tasks (by task id, so reruns hold out the same ones);
3. fine-tune the active version's ViT with CLIPSelf + the supervised terms (teacher: the base);
4. when enough corrected masks exist, train a ZegCLIP head on the new ViT (``ZEGCLIP_EPOCHS``
   passes over four fifths of them; its "no label" floor is set on the other fifth);
5. fit the few-shot adapter and tag thresholds on the new ViT (``adapt.py``);
6. measure the candidate and the active version on the held-out tasks, save the candidate as a
   new version with that report, and make it active only if the gate passes.

A crash or a cancel at any step leaves the active version as it was: activation is the last step.
A cancel is honoured between stages, between images while fetching, and before every optimiser step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from common.jobs import TrainJob
from common.versions import Registry
from worker.checkpoints import version_visual, write_version
from worker.predictor import Predictor
from worker.progress import thin
from worker.training.adapt import fit_adapter, fitted_config, newest, project_labels
from worker.training.clipself import CLIPSelfConfig, train_clipself
from worker.training.corrections import (
    FETCH_SHARE,
    Correction,
    fetch_images,
    mask_labels,
    pull_corrections,
    split,
)
from worker.training.evaluate import judge
from worker.training.loop import ShouldStop, check_stop
from worker.training.zegclip import (
    TrainingSample,
    calibrate_threshold,
    calibration_split,
    has_label,
    schedule,
    train_zegclip,
)
from worker.vocabulary import ClassBank

log = logging.getLogger(__name__)

#: Called with (stage, step, steps, loss) as training goes.
StageProgress = Callable[[str, int, int, float | None], None]


def run_training(
    base: Predictor,
    active: Predictor,
    registry: Registry,
    job: TrainJob,
    progress: StageProgress,
    should_stop: ShouldStop,
    collect: Callable[..., list[Correction]] = pull_corrections,
) -> dict[str, Any]:
    """Train, evaluate, save and maybe promote; returns the summary the job stores as its result.
    ``collect`` reads the corrections (from Label Studio unless a caller has them already)."""
    # the project's own settings (DENSE_HEAD, BACKGROUND_WORDS, ...): trained as it is served
    base, active = base.for_project(job.project_settings), active.for_project(job.project_settings)
    settings = base.settings
    started = time.perf_counter()
    progress("collecting corrections", 0, 0, None)
    limit = settings.train_max_corrections  # each held in memory with its image: bounded
    corrections = collect(settings, job.project, job.image_key, job.choices, job.brushes, job.regions, limit=limit)
    names = mask_labels(job.brushes, job.regions)  # what corrected masks (brush, polygons) can hold
    corrections = fetch_images(base, corrections, with_masks=bool(names), should_stop=should_stop,
                               seconds=FETCH_SHARE * settings.train_timeout)  # fmt: skip
    if len(corrections) < settings.train_min_corrections:
        reason = f"{len(corrections)} usable corrections; training starts at {settings.train_min_corrections}"
        log.info("project %s: not training: %s", job.project, reason)
        return {"status": "skipped", "reason": reason, "corrections": len(corrections)}
    parts = split(corrections, settings.train_holdout)

    labels = [label for control in (*job.choices, *job.brushes, *job.regions) for label in control.labels]
    bank = ClassBank.build(labels, settings.background_words)
    text = base.text.classes(bank.synonyms).to(base.bundle.device)
    index = {label.name: bank.index[label.texts] for label in labels}

    # TagCLIP's local stage reads the MaskCLIP path; with TAG_SCORES=global nothing served does
    cfg = CLIPSelfConfig(steps=settings.train_steps, lr=settings.train_lr, size=settings.image_size,
                         dense_head=settings.dense_head, tag_path=settings.tag_scores == "tagclip")  # fmt: skip
    weights, report = train_clipself(
        active.bundle.visual, base.bundle.visual, parts.train, text, index, base.bundle.mean, base.bundle.std, cfg,
        progress=lambda step, loss: progress("clipself", step + 1, cfg.steps, loss), should_stop=should_stop,
    )  # fmt: skip
    visual = version_visual(base.bundle.visual, weights)
    candidate = base.with_weights(visual, None)

    head, head_meta = None, {}
    curves = {"clipself": thin(report.losses)}  # for the dashboard
    masks = [c for c in parts.train if c.mask is not None and has_label(c.mask)]
    if names and len(masks) >= settings.zegclip_min_masks:
        samples, aside = calibration_split([TrainingSample(c.image, c.mask, c.mask_labels) for c in masks],
                                           settings.train_holdout)  # fmt: skip
        words = {label.name: label.texts for label in labels}
        texts = [words.get(name, (name,)) for name in names]  # as the predictor will ask the head
        steps = schedule(len(samples), settings.zegclip_epochs, settings.zegclip_max_steps)
        head, zeg_report = train_zegclip(
            candidate.bundle, samples, list(names), steps=steps, size=settings.image_size,
            progress=lambda step, loss: progress("zegclip", step + 1, steps, loss),
            should_stop=should_stop, texts=texts,
        )  # fmt: skip
        check_stop(should_stop, "before calibrating the ZegCLIP head")
        floor = calibrate_threshold(candidate.bundle, head, aside, list(names), settings.image_size, texts)
        head_meta = {"classes": list(names), "steps": zeg_report.steps, "train_masks": len(samples),
                     "calibration_masks": len(aside), "floor": floor}  # fmt: skip
        curves["zegclip"] = thin(zeg_report.losses)
        candidate = base.with_weights(visual, head)

    check_stop(should_stop, "before fitting the few-shot adapter")
    progress("fitting", 0, 0, None)
    # its cache must come from the new ViT; as many corrections as the few-shot learner reads
    fitted = fit_adapter(
        candidate, newest(parts.train, settings.adapt_max_corrections), project_labels(job), names, should_stop
    )
    candidate = candidate.with_few_shot(fitted.few_shot)

    check_stop(should_stop, "before evaluating")
    progress("evaluating", 0, 0, None)
    scores, promoted, reason = judge(candidate, active, parts.held_out, job, settings.promotion_margin)

    check_stop(should_stop, "before saving")
    info = registry.add(
        job.project,
        lambda directory: write_version(directory, weights, head, head_meta, fitted.few_shot),
        trained_on=[c.task_id for c in parts.train],
        held_out=[c.task_id for c in parts.held_out],
        metrics={**scores, "final_loss": report.losses[-1] if report.losses else None},
        config={
            "from_version": job.model_version,
            "trigger": job.trigger,
            "clipself": dataclasses.asdict(cfg),
            "zegclip": head_meta,
            **fitted_config(fitted),
            "curves": curves,
        },  # fmt: skip
        promoted=promoted,
        reason=reason,
    )
    if promoted and not registry.promote(job.project, info.version, job.model_version):
        promoted, reason = False, "another version was promoted while this one trained; kept as a candidate"
        info = dataclasses.replace(info, promoted=False, reason=reason)
        registry.save(info)
    log.info("project %s: version %s %s (%s) in %.0f s", job.project, info.version,
             "promoted" if promoted else "kept as candidate", reason, time.perf_counter() - started)  # fmt: skip
    return {
        "status": "promoted" if promoted else "rejected",
        "version": info.version,
        "reason": reason,
        "metrics": scores,
        "corrections": len(corrections),
        "seconds": round(time.perf_counter() - started, 1),
    }
