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


def test_shipped_label_configs_are_supported():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "label_config").glob("*.xml"))
    assert configs
    for path in configs:
        spec = parse_label_config(path.read_text(), max_labels=1000)
        assert spec.image_key == "image" and spec.choices, path.name
