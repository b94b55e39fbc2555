import pytest

from worker.model.selection import select_tags


def test_relative_threshold_selects_labels_above_the_cut():
    scores = {"cat": 0.50, "dog": 0.42, "car": 0.10, "tree": 0.05}
    selected, confidence = select_tags(scores, multiple=True, threshold=0.5)
    assert selected == ("cat", "dog")  # cut = 0.05 + 0.5 * 0.45 = 0.275
    assert 0 < confidence <= 1


def test_threshold_moves_the_cut():
    scores = {"cat": 0.50, "dog": 0.42, "car": 0.10, "tree": 0.05}
    assert select_tags(scores, multiple=True, threshold=0.9)[0] == ("cat",)
    assert select_tags(scores, multiple=True, threshold=0.05)[0] == ("cat", "dog", "car")


def test_confidence_is_low_when_labels_hover_at_the_cut():
    clear = {"a": 1.0, "b": 0.0, "c": 0.0}
    unsure = {"a": 1.0, "b": 0.52, "c": 0.0, "d": 0.48}
    assert select_tags(unsure, True, 0.5)[1] < select_tags(clear, True, 0.5)[1]


def test_single_choice_takes_the_best_with_its_margin():
    selected, confidence = select_tags({"indoor": 0.6, "outdoor": 0.3}, multiple=False, threshold=0.5)
    assert selected == ("indoor",)
    assert confidence == pytest.approx(0.5)


def test_flat_scores_still_answer_but_with_zero_confidence():
    assert select_tags({"only": 0.2}, multiple=True, threshold=0.5) == (("only",), 0.0)
    assert select_tags({"a": 0.3, "b": 0.3}, multiple=True, threshold=0.5)[1] == 0.0
