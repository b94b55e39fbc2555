"""Read a Label Studio labeling config into what prelabel can predict for it."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from label_studio_sdk.label_interface import LabelInterface

from common.errors import LabelConfigError
from common.jobs import REGION_TYPES, BrushControl, ChoicesControl, ClassLabel, RegionControl

log = logging.getLogger(__name__)

SUPPORTED_CONTROLS = ("Choices", "BrushLabels", *REGION_TYPES)
#: Label configs are untrusted input (any /predict or webhook body carries one); real ones are a
#: few kB, a 1,000-class taxonomy about 60 kB.
MAX_LABEL_CONFIG_BYTES = 512 * 1024
#: Texts CLIP reads for one label (value, alias, hint, predicted_values; the first ones) and their
#: length (cut; CLIP reads 77 tokens anyway): each text costs 85 prompts through the text encoder,
#: so a config's cost is bounded by its labels.
MAX_TEXTS_PER_LABEL = 8
MAX_TEXT_CHARS = 200


@dataclass(frozen=True)
class LabelSpec:
    """The image a project labels and the controls prelabel fills in for it."""

    image_name: str
    image_key: str
    choices: tuple[ChoicesControl, ...]
    brushes: tuple[BrushControl, ...] = ()
    regions: tuple[RegionControl, ...] = ()  # boxes and polygons, drawn from the masks


def parse_label_config(xml: str, max_labels: int) -> LabelSpec:
    """Parse ``xml`` (cached: Label Studio sends the same config with every request).

    Raises:
        LabelConfigError: the config is not a string or too large, declares a DTD or entities,
            cannot be parsed, has more than ``max_labels`` labels (``MAX_LABELS``) or no control
            prelabel supports.
    """
    if not isinstance(xml, str):  # before the cache, which cannot hash a list or an object
        raise LabelConfigError(f"The label config must be an XML string, not {type(xml).__name__}.")
    return _parse_label_config(xml, max_labels)


@functools.lru_cache(maxsize=64)
def _parse_label_config(xml: str, max_labels: int) -> LabelSpec:
    if not xml.strip():
        raise LabelConfigError("The label config is empty.")
    size = len(xml.encode())
    if size > MAX_LABEL_CONFIG_BYTES:
        raise LabelConfigError(
            f"The label config is {size:,} bytes, over the {MAX_LABEL_CONFIG_BYTES:,} prelabel reads."
        )
    if "<!" in xml.replace("<![CDATA[", "").replace("<!--", ""):
        raise LabelConfigError(
            "The label config declares a DTD or entities (<!DOCTYPE, <!ENTITY), which prelabel refuses."
        )
    try:
        interface = LabelInterface(xml)
    except Exception as e:  # the SDK raises several types for malformed XML
        raise LabelConfigError(f"The label config cannot be parsed: {e}") from e

    images = [obj for obj in interface.objects if obj.tag == "Image"]
    if not images:
        raise LabelConfigError(
            "prelabel pre-annotates images, and this label config has no <Image> tag. "
            'Add <Image name="image" value="$image"/> (see label_config/ for ready configs).'
        )

    for image in images:
        controls = [
            c
            for c in interface.controls
            if c.tag in SUPPORTED_CONTROLS and image.name in c.to_name and _has_static_labels(c)
        ]
        if controls:
            if "valueList" in image.attr:
                raise LabelConfigError(
                    f'<Image name="{image.name}"> uses valueList (several images per task), '
                    "which prelabel does not support."
                )
            count = sum(len(c.labels) for c in controls)
            if count > max_labels:
                raise LabelConfigError(
                    f"The label config has {count:,} labels; prelabel scores at most MAX_LABELS={max_labels:,}."
                )
            return LabelSpec(
                image_name=image.name,
                image_key=(image.value or "").lstrip("$"),
                choices=tuple(_choices_control(c, image.name) for c in controls if c.tag == "Choices"),
                brushes=tuple(
                    BrushControl(c.name, image.name, _class_labels(c)) for c in controls if c.tag == "BrushLabels"
                ),
                regions=tuple(
                    RegionControl(c.name, image.name, _class_labels(c), REGION_TYPES[c.tag])
                    for c in controls
                    if c.tag in REGION_TYPES
                ),
            )

    found = sorted({control.tag for control in interface.controls}) or ["none"]
    raise LabelConfigError(
        "The label config has no control prelabel can predict. Supported: "
        f"{', '.join(f'<{tag}>' for tag in SUPPORTED_CONTROLS)} with toName pointing at an <Image> "
        f"and fixed <Choice> values; found: {', '.join(found)}."
    )


def _has_static_labels(control) -> bool:
    """Controls filled from task data (``value="$options"``) have no labels to score up front."""
    if not control.labels:
        log.info("Skipping <%s name=%s>: its labels come from task data", control.tag, control.name)
        return False
    return True


def _class_labels(control) -> tuple[ClassLabel, ...]:
    return tuple(_class_label(name, tag.attr) for name, tag in control.labels_attrs.items())


def _choices_control(control, image_name: str) -> ChoicesControl:
    return ChoicesControl(
        from_name=control.name,
        to_name=image_name,
        labels=_class_labels(control),
        multiple=bool(control.is_multiple_choice),
    )


def _class_label(name: str, attr: dict[str, str]) -> ClassLabel:
    """``name`` is what Label Studio stores (the alias if there is one); the texts CLIP reads are
    the value first, then the alias, ``hint`` and comma-separated ``predicted_values``."""
    candidates = [attr.get("value", name), attr.get("alias", ""), attr.get("hint", "")]
    candidates += attr.get("predicted_values", "").split(",")
    texts: dict[str, str] = {}  # lower case -> the first spelling, in order
    cut = False
    for text in (c.strip() for c in candidates):
        cut |= len(text) > MAX_TEXT_CHARS
        if text:
            texts.setdefault(text[:MAX_TEXT_CHARS].lower(), text[:MAX_TEXT_CHARS])
    if len(texts) > MAX_TEXTS_PER_LABEL or cut:
        log.warning("label %.60r: CLIP reads its first %d texts (value, alias, hint, predicted_values) of at most "
                    "%d characters each", name, MAX_TEXTS_PER_LABEL, MAX_TEXT_CHARS)  # fmt: skip
    kept = tuple(texts.values())[:MAX_TEXTS_PER_LABEL]
    return ClassLabel(name=name, texts=kept or (name,))
