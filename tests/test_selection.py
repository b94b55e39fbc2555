import pytest

from common.settings import TAG_RULES
from worker.model import selection
from worker.model.selection import TagRule, select_tags

RELATIVE = TagRule("relative", relative=0.5)
ABSOLUTE = TagRule("absolute", min_score=0.3)


def test_absolute_rule_tags_every_label_over_its_threshold_and_may_tag_none():
    assert select_tags({"red": 0.8, "blue": 0.6, "green": 0.1}, True, ABSOLUTE)[0] == ("red", "blue")
    assert select_tags({"red": 0.8, "blue": 0.7}, True, ABSOLUTE)[0] == ("red", "blue")  # both of two
    assert select_tags({"red": 0.05, "blue": 0.1, "green": 0.2}, True, ABSOLUTE)[0] == ()  # none present
    assert select_tags({"only": 0.9}, True, ABSOLUTE)[0] == ("only",)
    assert select_tags({"only": 0.1}, True, ABSOLUTE)[0] == ()


def test_per_label_thresholds_override_the_default():
    fitted = TagRule("absolute", min_score=0.3, per_label={"blue": 0.65, "green": 0.15})
    assert select_tags({"red": 0.35, "blue": 0.6, "green": 0.2}, True, fitted)[0] == ("red", "green")


def test_absolute_confidence_is_low_near_the_thresholds():
    clear = {"a": 0.95, "b": 0.02}
    unsure = {"a": 0.32, "b": 0.28}
    assert select_tags(unsure, True, ABSOLUTE)[1] < 0.1 < select_tags(clear, True, ABSOLUTE)[1]


def test_relative_rule_is_tagclips_and_keeps_its_limits():
    scores = {"cat": 0.50, "dog": 0.42, "car": 0.10, "tree": 0.05}
    assert select_tags(scores, True, RELATIVE)[0] == ("cat", "dog")  # cut = 0.05 + 0.5 * 0.45
    assert select_tags(scores, True, TagRule("relative", relative=0.9))[0] == ("cat",)
    assert select_tags(scores, True, TagRule("relative", relative=0.05))[0] == ("cat", "dog", "car")
    # what the absolute rule exists for: the lowest label is never on, one label always is
    assert select_tags({"red": 0.8, "blue": 0.7}, True, RELATIVE)[0] == ("red",)
    assert select_tags({"red": 0.01, "blue": 0.02}, True, RELATIVE)[0] == ("blue",)
    assert select_tags({"only": 0.2}, True, RELATIVE) == (("only",), 0.0)


def test_relative_confidence_is_low_when_labels_hover_at_the_cut():
    clear = {"a": 1.0, "b": 0.0, "c": 0.0}
    unsure = {"a": 1.0, "b": 0.52, "c": 0.0, "d": 0.48}
    assert select_tags(unsure, True, RELATIVE)[1] < select_tags(clear, True, RELATIVE)[1]


def test_single_choice_takes_the_best_with_its_margin_when_it_reaches_its_threshold():
    selected, confidence = select_tags({"indoor": 0.6, "outdoor": 0.3}, False, ABSOLUTE)
    assert selected == ("indoor",)
    assert confidence == pytest.approx(0.5)
    assert select_tags({"indoor": 0.2, "outdoor": 0.1}, False, ABSOLUTE)[0] == ()
    assert select_tags({"indoor": 0.2, "outdoor": 0.1}, False, RELATIVE)[0] == ("indoor",)


def test_the_settings_know_the_same_rules():
    assert TAG_RULES == selection.TAG_RULES
    with pytest.raises(ValueError, match="unknown tag rule"):
        TagRule("loose")
