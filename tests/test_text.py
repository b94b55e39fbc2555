import dataclasses

import torch
import torch.nn.functional as F

from worker.loading import load_clip
from worker.model.text import TEMPLATES, TextEmbedder, encode_text_trimmed


def test_templates_are_clips_eighty_plus_tagclips_five():
    assert len(TEMPLATES) == 85 and len(set(TEMPLATES)) == 85
    assert all(t.count("{}") == 1 for t in TEMPLATES)


def test_trimmed_text_encoding_equals_open_clips(make_settings):
    bundle = load_clip(make_settings(model_checkpoint=None, model_name="ViT-S-32", model_pretrained="random"))
    tokens = bundle.tokenizer(["a photo of a dog.", "there is a dining table in the scene.", "cat"])
    assert tokens.shape[1] == 77
    with torch.no_grad():
        torch.testing.assert_close(
            encode_text_trimmed(bundle.model, tokens), bundle.model.encode_text(tokens), atol=1e-5, rtol=1e-5
        )


def test_a_word_is_the_normalised_mean_of_its_normalised_prompts(make_settings):
    """Checked from the definition with open_clip's own encoder, on more words than one batch
    holds (words are encoded a few at a time so that only their means are kept)."""
    bundle = load_clip(make_settings())
    words = ["cat", "dog", "red car", "tree", "a very long label name", "sky", "x"]
    with torch.no_grad():
        expected = torch.stack([
            F.normalize(F.normalize(bundle.model.encode_text(bundle.tokenizer([t.format(w) for t in TEMPLATES])),
                                    dim=-1).mean(dim=0), dim=-1)
            for w in words
        ])  # fmt: skip
    fp32 = dataclasses.replace(bundle, precision=torch.float32)
    torch.testing.assert_close(TextEmbedder(fp32).words(words), expected, atol=1e-5, rtol=1e-5)


def test_words_are_encoded_once_and_classes_average_their_synonyms(make_settings):
    embedder = TextEmbedder(load_clip(make_settings()))
    calls = []
    encode = embedder._encode
    embedder._encode = lambda words: calls.append(list(words)) or encode(words)

    first = embedder.words(["cat", "dog"])
    again = embedder.words(["dog", "cat", "cow"])
    assert calls == [["cat", "dog"], ["cow"]]
    torch.testing.assert_close(again[:2], first.flip(0))
    torch.testing.assert_close(first.norm(dim=-1), torch.ones(2))

    classes = embedder.classes([("dog", "puppy"), ("cat",)])
    expected_dog = F.normalize(embedder.words(["dog", "puppy"]).mean(dim=0), dim=-1)
    torch.testing.assert_close(classes[0], expected_dog)
    torch.testing.assert_close(classes[1], embedder.words(["cat"])[0])


def test_the_word_cache_is_bounded_least_recently_used_first(make_settings):
    embedder = TextEmbedder(load_clip(make_settings()), cached=3)
    calls = []
    encode = embedder._encode
    embedder._encode = lambda words: calls.append(list(words)) or encode(words)

    many = embedder.words(["a", "b", "c", "d", "e"])  # more words than the cache holds, in one call
    assert many.shape[0] == 5 and calls == [["a", "b", "c", "d", "e"]]
    assert list(embedder._cache) == ["c", "d", "e"]
    embedder.words(["c"])  # used again: now the most recent
    embedder.words(["f"])
    assert list(embedder._cache) == ["e", "c", "f"]
    torch.testing.assert_close(embedder.words(["a"]), many[:1])  # encoded again, the same vector
    assert calls[-1] == ["a"]


def test_words_in_bf16_agree_with_fp32(make_settings):
    bundle = load_clip(make_settings(model_checkpoint=None, model_name="ViT-S-32", model_pretrained="random"))
    fp32 = TextEmbedder(dataclasses.replace(bundle, precision=torch.float32)).words(["cat", "dining table"])
    bf16 = TextEmbedder(dataclasses.replace(bundle, precision=torch.bfloat16)).words(["cat", "dining table"])
    assert bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # the text tower did run in bf16 ...
    assert (fp32 * bf16).sum(dim=-1).min() > 0.999  # ... and agrees with fp32
