import pytest

from common.errors import LabelConfigError
from common.labelstudio.config import parse_label_config

CONFIG = """<View>
  <Image name="photo" value="$img" zoom="true"/>
  <Choices name="objects" toName="photo" choice="multiple">
    <Choice value="Cat" hint="kitty"/>
    <Choice value="Dog" alias="D" predicted_values="dog, puppy"/>
    <Choice value="Person" predicted_values="person,people"/>
  </Choices>
  <Choices name="scene" toName="photo">
    <Choice value="Indoor"/><Choice value="Outdoor"/>
  </Choices>
  <BrushLabels name="mask" toName="photo"><Label value="Cat"/></BrushLabels>
</View>"""


def test_choices_controls_labels_and_synonyms():
    spec = parse_label_config(CONFIG, max_labels=1000)
    assert (spec.image_name, spec.image_key) == ("photo", "img")
    objects, scene = spec.choices
    assert objects.from_name == "objects" and objects.multiple
    assert not scene.multiple  # Label Studio's default is choice="single"
    by_name = {label.name: label.texts for label in objects.labels}
    assert by_name == {
        "Cat": ("Cat", "kitty"),
        "D": ("Dog", "D", "puppy"),  # the alias is what Label Studio stores; "dog" duplicates "Dog"
        "Person": ("Person", "people"),
    }


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image name='i' value='$i'/>", "cannot be parsed"),
        ("<View><Text name='t' value='$t'/><Choices name='c' toName='t'><Choice value='a'/></Choices></View>",
         "no <Image> tag"),
        ("<View><Image name='i' value='$i'/><KeyPointLabels name='k' toName='i'><Label value='a'/>"
         "</KeyPointLabels></View>", "Supported: <Choices>, <BrushLabels>, <RectangleLabels>, <PolygonLabels>.*"
         "found: KeyPointLabels"),
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i' value='$options'/></View>",
         "no control prelabel can predict"),
        ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
         "<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='&lol2;'/></Choices></View>",
         "DTD or entities"),
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'>" + "<Choice value='x'/>" * 40_000
         + "</Choices></View>", "over the 524,288 prelabel reads"),
        ("<View><Image name='i' value='$i'/><Choices name='c' toName='i'>"
         + "".join(f"<Choice value='c{i}'/>" for i in range(1001)) + "</Choices></View>", "MAX_LABELS=1,000"),
    ],
)  # fmt: skip
def test_unsupported_configs_say_why(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml, max_labels=1000)


def test_a_labels_texts_are_bounded(caplog):
    """Each text costs 85 prompts through the text encoder: a label's synonyms are read up to 8, of
    at most 200 characters (a long hint is a tooltip, not a name), in linear time."""
    synonyms = ",".join(f"w{i}" for i in range(50_000))
    xml = (f"<View><Image name='i' value='$i'/><Choices name='c' toName='i'><Choice value='a' hint='{'x' * 300}' "
           f"predicted_values='A, {synonyms}'/></Choices></View>")  # fmt: skip
    (label,) = parse_label_config(xml, max_labels=1000).choices[0].labels
    assert label.texts == ("a", "x" * 200, "w0", "w1", "w2", "w3", "w4", "w5")
    assert "CLIP reads its first 8 texts" in caplog.text


def test_shipped_label_configs_are_supported():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "label_config").glob("*.xml"))
    assert configs
    for path in configs:
        spec = parse_label_config(path.read_text(), max_labels=1000)
        assert spec.image_key == "image" and spec.choices, path.name


def test_a_tasks_score_is_the_mean_of_its_answers_and_label_studio_gets_it():
    from common.jobs import ControlTags, MaskResult, PredictResult, RegionResult, TaskResult
    from common.labelstudio.predictions import to_label_studio

    spec = parse_label_config(CONFIG, max_labels=1000)
    tags = ControlTags("objects", ("Cat",), {"Cat": 0.9, "D": 0.1, "Person": 0.0}, 0.2)
    box = RegionResult("box", "Cat", "rectangle", {"x": 1, "y": 1, "width": 5, "height": 5, "rotation": 0}, 0.6)
    task = TaskResult(7, (tags,), (MaskResult("mask", "Cat", [0, 0, 0], 0.7),), 10, 10, regions=(box,))
    assert task.score == pytest.approx((0.2 + 0.7 + 0.6) / 3)  # what Label Studio sorts the tasks by
    assert TaskResult(8).score == 0.0  # nothing found
    (prediction,) = to_label_studio(PredictResult("v1", (task,)), spec, "v1")
    assert prediction["score"] == round(task.score, 4)
