import pytest
import torch
import torch.nn.functional as F

from common.errors import SettingsError
from common.jobs import ClassLabel
from worker.vocabulary import ClassBank, distinct_competitors, distractor_words


def test_the_shipped_vocabulary_is_a_few_hundred_concepts_and_none_means_none(tmp_path):
    words = distractor_words("builtin")
    assert 200 <= len(words) <= 1000
    assert {"dog", "car", "person", "tree", "red", "circle"} <= set(words)
    assert not any(w.startswith("#") or not w.strip() for w in words)
    assert distractor_words("none") == ()
    own = tmp_path / "words.txt"
    own.write_text("# mine\nforklift\n\npallet\nforklift\n")
    assert distractor_words(str(own)) == ("forklift", "pallet")


def test_an_unreadable_vocabulary_is_a_settings_error_that_says_what_to_do(tmp_path):
    with pytest.raises(SettingsError, match="DISTRACTORS=.*builtin, none"):
        distractor_words(str(tmp_path / "missing.txt"))


def test_labels_come_first_and_competitors_equal_to_a_label_are_left_out():
    labels = [ClassLabel("Car", ("car", "automobile")), ClassLabel("sky", ("sky",))]
    bank = ClassBank.build(labels, ("sky", "ground"), ("dog", "Car", "ground", "tree"))
    assert bank.synonyms == (("car", "automobile"), ("sky",), ("ground",), ("dog",), ("tree",))
    assert bank.n_labels == 2 and bank.n_background == 1  # "sky" is a label: only "ground" is left
    assert bank.index[("sky",)] == 1
    # masks compete with the labels and the background words: distractors decide tags only
    kept = torch.tensor([0, 1, 2, 4])  # what distinct_competitors kept: "dog" dropped
    assert bank.mask_rows(kept) == [0, 1, 2]


def test_competitors_that_are_a_label_or_an_earlier_competitor_for_the_model_are_dropped():
    torch.manual_seed(0)
    base = F.normalize(torch.randn(4, 32), dim=-1)
    near = lambda v: F.normalize(v + 0.01 * torch.randn(32), dim=-1)  # noqa: E731
    # rows: 2 labels, then a synonym of label 0, a new concept, its twin, another concept
    text = torch.stack([base[0], base[1], near(base[0]), base[2], near(base[2]), base[3]])
    assert distinct_competitors(text, 2).tolist() == [0, 1, 3, 5]
    # labels are always kept, even when two of them look alike to the model
    twins = torch.stack([base[0], near(base[0]), base[1]])
    assert distinct_competitors(twins, 2).tolist() == [0, 1, 2]
