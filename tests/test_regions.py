"""Boxes and polygons drawn from masks: one per connected part, in Label Studio's percent
coordinates, accepted by label-studio-sdk's validation for real predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface
from PIL import Image, ImageDraw

from common.labelstudio.config import parse_label_config
from common.labelstudio.regions import draw_outline, polygon_value, rectangle_value
from worker.regions import parts, polygons, rectangles


def _raster(value: dict, size: tuple[int, int]) -> np.ndarray:
    """A polygon value drawn back at ``size`` (what Label Studio shows)."""
    width, height = size
    image = Image.new("1", size)
    ImageDraw.Draw(image).polygon([(x * width / 100, y * height / 100) for x, y in value["points"]], fill=1)
    return np.asarray(image)


def test_rectangles_are_the_parts_boxes_in_percent_largest_first():
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:50, 10:40] = True  # 900 pixels
    mask[60:100, 150:200] = True  # 2,000 pixels, touching the right and bottom edges
    mask[5, 100] = True  # one stray pixel
    boxes = rectangles(mask, min_area=0.001)  # 20 pixels at least: the stray pixel goes
    assert boxes == [
        {"x": 75.0, "y": 60.0, "width": 25.0, "height": 40.0, "rotation": 0},
        {"x": 5.0, "y": 20.0, "width": 15.0, "height": 30.0, "rotation": 0},
    ]
    assert len(rectangles(mask, min_area=0.0)) == 3
    assert rectangles(np.zeros((10, 10), dtype=bool), 0.0) == []


@pytest.mark.parametrize("shape", ["square", "l-shape", "disc", "thin line", "one pixel"])
def test_polygons_follow_the_part_they_outline(shape):
    mask = np.zeros((120, 160), dtype=bool)
    if shape == "square":
        mask[30:70, 40:100] = True
    elif shape == "l-shape":
        mask[10:110, 10:40] = True
        mask[80:110, 10:150] = True
    elif shape == "disc":
        ys, xs = np.ogrid[:120, :160]
        mask[(ys - 60) ** 2 + (xs - 80) ** 2 <= 45**2] = True
    elif shape == "thin line":
        mask[60, 20:140] = True
    else:
        mask[7, 9] = True
    (value,) = polygons(mask, min_area=0.0)
    assert len(value["points"]) >= 3 and value["closed"]
    assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in value["points"])
    drawn = _raster(value, (160, 120))
    if shape in ("square", "l-shape", "disc"):
        iou = (drawn & mask).sum() / (drawn | mask).sum()
        assert iou > 0.9, iou
    if shape == "square":
        assert len(value["points"]) == 4
    if shape == "l-shape":
        assert len(value["points"]) == 6
    xs, ys = [x for x, _ in value["points"]], [y for _, y in value["points"]]
    assert max(xs) > min(xs) and max(ys) > min(ys)  # an area, even for a line or a pixel


def test_a_thin_diagonal_part_keeps_a_thin_outline():
    mask = np.eye(20, dtype=bool)
    (value,) = polygons(mask, min_area=0.0)
    drawn = _raster(value, (20, 20))
    assert drawn.sum() < 80  # a sliver along the diagonal, not its 400-pixel box
    assert json.loads(json.dumps(value)) == value  # plain numbers: the job result goes through JSON


def test_an_outline_covers_the_pixels_whose_centres_it_holds():
    box = [(0, 0), (20, 0), (20, 20), (0, 20)]  # percent of a 100 x 100 image: pixels 0..19
    drawn = draw_outline(box, (100, 100))
    assert drawn.sum() == 400 and drawn[:20, :20].all()


def test_at_most_twenty_parts_per_label_the_largest():
    mask = np.zeros((100, 100), dtype=bool)
    for i in range(30):  # 30 separate squares, the i-th of side 1 + i // 10
        y, x = divmod(i, 10)
        mask[y * 20 : y * 20 + 1 + i // 10, x * 10 : x * 10 + 1 + i // 10] = True
    kept = parts(mask, 0.0)
    assert len(kept) == 20 and min(p.sum() for p in kept) == 4  # the 10 single pixels are dropped


def test_parts_are_eight_connected():
    mask = np.eye(6, dtype=bool)  # a diagonal: one part
    assert len(parts(mask, 0.0)) == 1


def test_percent_values_are_clamped_and_rounded():
    assert rectangle_value((0, 0, 3, 3), (3, 3)) == {"x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0,
                                                     "rotation": 0}  # fmt: skip
    assert polygon_value([(-1, 0), (1, 2), (3.3333, 1)], (3, 3))["points"] == [[0.0, 0.0], [33.3333, 66.6667],
                                                                               [100.0, 33.3333]]  # fmt: skip


BOXES_AND_POLYGONS = """<View>
  <Image name="image" value="$image"/>
  <Choices name="tags" toName="image" choice="multiple">
    <Choice value="cat"/><Choice value="dog"/><Choice value="person"/><Choice value="grass"/>
  </Choices>
  <RectangleLabels name="boxes" toName="image"><Label value="cat"/><Label value="dog"/>
    <Label value="person"/><Label value="grass"/></RectangleLabels>
  <PolygonLabels name="outlines" toName="image"><Label value="cat"/><Label value="dog"/>
    <Label value="person"/><Label value="grass"/></PolygonLabels>
  <BrushLabels name="mask" toName="image"><Label value="cat"/><Label value="dog"/>
    <Label value="person"/><Label value="grass"/></BrushLabels>
</View>"""


def test_the_config_reads_region_controls():
    spec = parse_label_config(BOXES_AND_POLYGONS, max_labels=1000)
    assert [(r.from_name, r.type) for r in spec.regions] == [("boxes", "rectanglelabels"),
                                                             ("outlines", "polygonlabels")]  # fmt: skip
    assert [label.name for label in spec.regions[0].labels] == ["cat", "dog", "person", "grass"]
    only_boxes = parse_label_config(
        '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="a"/>'
        "</RectangleLabels></View>",
        max_labels=1000,
    )
    assert only_boxes.choices == () and only_boxes.brushes == () and len(only_boxes.regions) == 1


def test_boxes_and_polygons_of_real_photos_are_valid_predictions(make_settings, label_studio):
    from backend.app import create_app

    app = create_app(make_settings(label_studio_url=label_studio.url, label_studio_api_key=label_studio.legacy_token,
                                   background_words=("sky",), mask_min_area=0.0))  # fmt: skip
    names = ["2011_000003.jpg", "n02391049_zebra.JPEG", "114.png"]
    tasks = [{"id": 300 + i, "data": {"image": label_studio.upload_path(n)}} for i, n in enumerate(names)]
    response = app.test_client().post("/predict", json={"tasks": tasks, "label_config": BOXES_AND_POLYGONS})
    assert response.status_code == 200
    interface = LabelInterface(BOXES_AND_POLYGONS)
    drawn = 0
    for prediction in response.get_json()["results"]:
        assert prediction and interface.validate_prediction(prediction, return_errors=True) == []
        by_type: dict[str, set[str]] = {}
        for item in prediction["result"]:
            labels = item["value"].get(item["type"], [])
            by_type.setdefault(item["type"], set()).update(labels)
        # The same masks give the brush, the boxes and the polygons: the same labels in each.
        assert by_type.get("rectanglelabels", set()) == by_type.get("polygonlabels", set())
        assert by_type.get("rectanglelabels", set()) == by_type.get("brushlabels", set())
        drawn += sum(1 for item in prediction["result"] if item["type"] in ("rectanglelabels", "polygonlabels"))
    assert drawn > 0
