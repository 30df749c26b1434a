"""CIDEr-D on word ids (evaluation/cider.py) against pycocoevalcap's Cider on the same captions."""

import random

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.data.shapes import generate_split
from captioner.evaluation.cider import CiderD
from captioner.vocab import Vocabulary, tokenize


@pytest.fixture(scope="module")
def corpus():
    """60 shapes scenes' references, and candidates of every kind: a reference of the image, one of
    another image, a cut one, a shuffled one, one word repeated, and an empty caption."""
    scenes = generate_split(60, seed=3, size=64)
    refs = {i: [" ".join(tokenize(c)) for c in s.captions] for i, s in enumerate(scenes)}
    rng = random.Random(0)
    candidates = {}
    for i, texts in refs.items():
        words = rng.choice(texts).split()
        kind = i % 6
        if kind == 1:
            words = refs[(i + 7) % len(refs)][0].split()
        elif kind == 2:
            words = words[: max(1, len(words) // 2)]
        elif kind == 3:
            rng.shuffle(words)
        elif kind == 4:
            words = [words[0]] * 6
        elif kind == 5 and i % 12 == 5:
            words = []
        candidates[i] = " ".join(words)
    return refs, candidates


def test_agrees_with_pycocoevalcap(corpus):
    refs, candidates = corpus
    vocab = Vocabulary.build(t for texts in refs.values() for t in texts)
    ids = lambda text: vocab.encode(text, add_special=False)  # noqa: E731
    mean, expected = Cider().compute_score(refs, {i: [c] for i, c in candidates.items()})
    cider = CiderD({i: [ids(t) for t in texts] for i, texts in refs.items()})
    got = cider.scores(list(candidates), [ids(c) for c in candidates.values()])
    assert got == pytest.approx(list(expected), rel=1e-9, abs=1e-12)
    assert sum(got) / len(got) == pytest.approx(mean, rel=1e-9)
    assert max(got) > 1.0 and min(got) == 0.0  # the candidates span good to nothing


def test_document_frequencies_from_another_corpus_change_the_weights(corpus):
    refs, _ = corpus
    vocab = Vocabulary.build(t for texts in refs.values() for t in texts)
    ids = {i: [vocab.encode(t, add_special=False) for t in texts] for i, texts in refs.items()}
    own = CiderD({0: ids[0]})  # one image: every n-gram is in every document, idf 0
    assert own.score(0, ids[0][0]) == 0.0
    wide = CiderD({0: ids[0]}, document_frequency_from=ids)
    assert wide.score(0, ids[0][0]) > wide.score(0, ids[1][0]) > 0.0


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="at least one image"):
        CiderD({})
    with pytest.raises(ValueError, match="no references"):
        CiderD({1: [[4, 5]], 2: []})
    with pytest.raises(KeyError, match="no references for image 9"):
        CiderD({1: [[4, 5]]}).score(9, [4])
