import pytest

from captioner.vocab import SPECIALS, Vocabulary, detokenize, tokenize


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("A Dog, running!") == ["a", "dog", ",", "running", "!"]


def test_build_respects_min_count_and_specials_first():
    v = Vocabulary.build(["a cat", "a dog", "a cat"], min_count=2)
    assert v.itos[:4] == list(SPECIALS)
    assert v.itos[4:] == ["a", "cat"]
    assert "dog" not in v
    assert v.encode("a dog") == [v.start_id, v.stoi["a"], v.unk_id, v.end_id]


def test_decode_hides_special_tokens_and_stops_at_end(vocab):
    ids = [vocab.start_id, vocab.stoi["two"], vocab.stoi["green"], vocab.end_id, vocab.stoi["red"]]
    assert vocab.decode(ids) == "two green"
    assert vocab.decode([vocab.pad_id, vocab.stoi["two"], vocab.pad_id]) == "two"


def test_detokenize_attaches_punctuation():
    assert detokenize(["a", "dog", ",", "a", "cat", "."]) == "a dog, a cat."


def test_json_round_trip(tmp_path, vocab):
    vocab.save(tmp_path / "vocab.json")
    again = Vocabulary.load(tmp_path / "vocab.json")
    assert again.itos == vocab.itos


@pytest.mark.parametrize("bad", [[], {"words": "abc"}, {"words": [1, 2]}, {"words": ["a", "a"]}])
def test_bad_json_is_refused(bad):
    with pytest.raises(ValueError):
        Vocabulary.from_json(bad)


def test_min_count_must_be_positive():
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary.build(["a"], min_count=0)


def test_decoded_captions_never_show_special_tokens():
    v = Vocabulary.build(["a cat", "a cat"], min_count=2)
    ids = [v.start_id, v.stoi["a"], v.unk_id, v.stoi["cat"], v.end_id, v.pad_id]
    assert v.decode(ids) == "a cat"
    assert v.decode_tokens(ids) == ["a", "<unk>", "cat"]  # aligned with per-token scores


def test_unknown_words_in_order_each_once_punctuation_aside():
    v = Vocabulary.build(["what color is the circle ?"])
    assert v.unknown_words("What colour is the zebra, the Zebra and the circle?") == [
        "colour",
        "zebra",
        "and",
    ]
    assert v.unknown_words("what color is the circle?") == []
    assert v.unknown_words("what color is the circle!") == []  # "!" is not a word


@pytest.mark.parametrize(
    ("question", "known"),
    [
        ("what color is the circle?", True),
        ("is there a zebra next to the circle?", True),  # "circle" is known
        ("is the zebra above the refrigerator?", False),  # only function words are known
        ("how many shapes are there?", False),  # "shapes" is unknown; the rest are function words
        ("what is it?", False),  # nothing to be about
    ],
)
def test_known_content_words(question, known):
    v = Vocabulary.build(["what color is the circle", "how many circles are there above it"])
    assert v.known_content_words(question) is known
