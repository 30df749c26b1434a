"""Caption scores (evaluation/coco.py) and shapes-world grounding and accuracy
(evaluation/grounding.py) on hand-checkable inputs."""

from __future__ import annotations

import numpy as np
import pytest

from captioner.data.shapes import encode_mask, generate_split
from captioner.evaluation.coco import COCO_METRICS, coco_scores, java_available, leave_one_out
from captioner.evaluation.grounding import (
    cell_bounds,
    cells_overlapping,
    count_accuracy,
    grounding,
    invented_relations,
    object_scene_accuracy,
    relation_accuracy,
)
from captioner.results import CaptionResult
from training.make_shapes import edge_pair_scenes, object_record

needs_java = pytest.mark.skipif(
    not java_available(), reason="java not on PATH (METEOR and the PTB tokenizer need it)"
)

REFS = {
    1: ["a small red circle to the left of a large blue square", "a red circle and a blue square"],
    2: ["two green triangles above a yellow cross", "a pair of green triangles and a cross"],
}


def test_identical_candidates_score_one_and_unrelated_score_zero():
    same = coco_scores(REFS, {k: v[0] for k, v in REFS.items()}, meteor=False, ptb_tokenize=False)
    assert list(same) == [k for k in COCO_METRICS if k != "METEOR"]
    assert same["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE_L"] == pytest.approx(1.0)
    assert same["CIDEr"] > 1.0
    other = coco_scores(REFS, {1: "dog", 2: "cat sleeping"}, meteor=False, ptb_tokenize=False)
    assert other["Bleu_1"] == pytest.approx(0.0, abs=1e-6)
    assert other["Bleu_4"] == pytest.approx(0.0, abs=1e-6)
    assert other["CIDEr"] == 0.0 and other["ROUGE_L"] == 0.0


def test_plain_tokenizer_ignores_case_and_punctuation():
    loud = {1: "A small RED circle to the left of a large blue square.", 2: "Two green triangles!"}
    quiet = {1: "a small red circle to the left of a large blue square", 2: "two green triangles"}
    a = coco_scores(REFS, loud, meteor=False, ptb_tokenize=False)
    assert a == coco_scores(REFS, quiet, meteor=False, ptb_tokenize=False)


def test_only_candidate_images_are_scored_and_each_needs_references():
    one = coco_scores(REFS, {1: REFS[1][0]}, meteor=False, ptb_tokenize=False)
    assert one["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="no references"):
        coco_scores(REFS, {3: "a red circle"}, meteor=False, ptb_tokenize=False)
    with pytest.raises(ValueError, match="no candidate"):
        coco_scores(REFS, {}, meteor=False, ptb_tokenize=False)


@pytest.mark.slow
@needs_java
def test_meteor_and_ptb_tokenizer_through_java():
    # One METEOR call only: its JVM loads a 60 MB paraphrase table (10+ s on a busy 2-core CPU).
    candidates = {1: "A small red circle to the left of a large blue square.", 2: "a green dog"}
    scores = coco_scores(REFS, candidates)  # METEOR and PTB: the Java path, as COCOEvalCap runs it
    assert list(scores) == list(COCO_METRICS)
    plain = coco_scores(REFS, candidates, meteor=False, ptb_tokenize=False)
    for key in ("Bleu_4", "ROUGE_L", "CIDEr"):  # PTB strips the same case and punctuation here
        assert scores[key] == pytest.approx(plain[key])
    assert 0.3 < scores["METEOR"] < 1.0
    refs = {1: ["A small red circle, on the left."] * 3, 2: ["Two big blue squares"] * 3}
    loo = leave_one_out(refs, ptb_tokenize=True)
    assert loo["Bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_leave_one_out_of_identical_references_is_perfect():
    refs = {1: ["a small red circle on the left"] * 4, 2: ["two big green squares in a row"] * 4}
    loo = leave_one_out(refs, ptb_tokenize=False)
    assert set(loo) == {"Bleu_4", "CIDEr"}
    assert loo["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert loo["CIDEr"] > 1.0


def test_leave_one_out_averages_the_folds():
    # Folds 0 and 1 find their twin among the others, fold 2 shares nothing with them.
    refs = {1: ["a b c d e", "a b c d e", "v w x y z"], 2: ["f g h i j", "f g h i j", "q r s t u"]}
    loo = leave_one_out(refs, ptb_tokenize=False)
    fold_bleu = []
    for j in range(3):
        others = {k: v[:j] + v[j + 1 :] for k, v in refs.items()}
        held_out = {k: v[j] for k, v in refs.items()}
        fold_bleu.append(coco_scores(others, held_out, meteor=False, ptb_tokenize=False)["Bleu_4"])
    assert loo["Bleu_4"] == pytest.approx(np.mean(fold_bleu))
    assert 0.5 < loo["Bleu_4"] < 1.0
    with pytest.raises(ValueError, match="at least 2 references"):
        leave_one_out({1: ["only one"]}, ptb_tokenize=False)


# -- grounding -------------------------------------------------------------------------------------


def _object(color: str, shape: str, rows: slice, cols: slice, size: int = 4) -> dict:
    mask = np.zeros((size, size), dtype=bool)
    mask[rows, cols] = True
    return {"color": color, "shape": shape, "size": "small", "mask": encode_mask(mask)}


def _result(tokens: list[str], peaks: list[tuple[int, int]]) -> CaptionResult:
    attention = np.full((len(tokens), 2, 2), 0.1)
    for t, (i, j) in enumerate(peaks):
        attention[t, i, j] = 0.7
    return CaptionResult(" ".join(tokens), tokens, [0.0] * len(tokens), 0.0, attention)


# A 4 x 4 image, 2 x 2 grid: the red circle fills the top-left cell, the blue squares the bottom row.
OBJECTS = {
    7: [
        _object("red", "circle", slice(0, 2), slice(0, 2)),
        _object("blue", "square", slice(3, 4), slice(0, 4)),
    ]
}


def test_grounding_peak_on_the_right_object():
    tokens = ["a", "red", "circle", "and", "blue", "squares"]
    result = _result(tokens, [(1, 1), (0, 0), (0, 0), (0, 1), (1, 0), (1, 1)])
    g = grounding({7: result}, OBJECTS, (2, 2), image_size=(4, 4))
    assert g["grounding"] == 1.0
    assert g["grounded_words"] == 4  # red, circle, blue, squares; "a" and "and" do not count
    # red, circle: 1 of 4 cells; blue, squares: 2 of 4 cells
    assert g["grounding_uniform"] == pytest.approx((0.25 + 0.25 + 0.5 + 0.5) / 4)


def test_grounding_peak_elsewhere_or_no_such_object():
    wrong = _result(["red", "circle", "blue"], [(1, 0), (0, 1), (0, 0)])
    assert grounding({7: wrong}, OBJECTS, (2, 2))["grounding"] == 0.0
    absent = _result(["green", "circle"], [(0, 0), (0, 0)])  # no green object: never grounded
    g = grounding({7: absent}, OBJECTS, (2, 2))
    assert g["grounding"] == 0.5 and g["grounding_uniform"] == pytest.approx((0 + 0.25) / 2)
    none = grounding({7: _result(["a", "picture"], [(0, 0), (0, 0)])}, OBJECTS, (2, 2))
    assert none == {"grounding": None, "grounding_uniform": None, "grounded_words": 0}


def test_grounding_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="attention shape"):
        grounding({7: _result(["red"], [(0, 0)])}, OBJECTS, (3, 3))
    with pytest.raises(ValueError, match="image_size"):
        grounding({7: _result(["red"], [(0, 0)])}, OBJECTS, (2, 2), image_size=(8, 8))
    no_attention = CaptionResult("red", ["red"], [0.0], 0.0, None)
    with pytest.raises(ValueError, match="needs attention"):
        grounding({7: no_attention}, OBJECTS, (2, 2))


def test_cells_cover_the_image_proportionally():
    assert [cell_bounds(i, 2, 5) for i in range(2)] == [(0, 3), (2, 5)]  # row 2 is in both
    assert [cell_bounds(i, 2, 4) for i in range(2)] == [(0, 2), (2, 4)]
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 0] = True
    assert cells_overlapping(mask, (2, 2)).tolist() == [[True, False], [True, False]]


# -- object and scene accuracy -----------------------------------------------------------------------


def test_object_and_scene_accuracy():
    scene = [
        {"size": "small", "color": "red", "shape": "circle"},
        {"size": "large", "color": "blue", "shape": "square"},
    ]
    objects = {1: scene, 2: scene, 3: scene}
    captions = {
        1: "a small red circle to the left of a big blue square",  # perfect (a synonym)
        2: "a small red circle",  # one of two objects
        3: "a large green cross",  # nothing right
    }
    acc = object_scene_accuracy(captions, objects)
    assert acc == {"object_accuracy": pytest.approx(3 / 6), "scene_accuracy": pytest.approx(1 / 3)}
    extra = object_scene_accuracy({1: captions[1] + " and a red cross"}, objects)
    assert extra == {"object_accuracy": 1.0, "scene_accuracy": 0.0}  # says something not there
    with pytest.raises(ValueError, match="no objects"):
        object_scene_accuracy({9: "a red circle"}, objects)


def _placed(size: str, color: str, shape: str, x: int, y: int) -> dict:
    """An object of objects.json in a 100 x 100 scene, centred at (x, y) (its mask is unused)."""
    mask = encode_mask(np.zeros((100, 100), dtype=bool))
    return {"size": size, "color": color, "shape": shape, "center": [x, y], "mask": mask}


def test_relation_accuracy_reads_every_form_of_the_grammar():
    left = [_placed("small", "red", "circle", 20, 50), _placed("large", "blue", "square", 80, 52)]
    upper = [_placed("large", "blue", "square", 50, 85), _placed("small", "red", "circle", 48, 15)]
    right = [
        "a small red circle to the left of a large blue square",
        "a big blue square to the right of a little red circle",
        "a small red circle on the left and a large blue square on the right",
        "a large blue square is to the right of a small red circle",
    ]
    above = [
        "a small red circle above a large blue square",
        "a large blue square below a small red circle",
        "a large blue square under a small red circle",
        "a small red circle at the top and a large blue square at the bottom",
    ]
    captions = {i: c for i, c in enumerate(right + above)}
    objects = {i: left if i < len(right) else upper for i in captions}
    assert relation_accuracy(captions, objects) == {"relation_accuracy": 1.0, "relation_scenes": 8}

    wrong = {
        0: "a small red circle to the right of a large blue square",  # the relation reversed
        1: "a small red circle and a large blue square",  # the relation left out
        2: "a small green circle to the left of a large blue square",  # an object wrong
        3: "a small red circle",  # an object left out
        4: "a small red circle above a large blue square",  # the wrong axis
    }
    assert relation_accuracy(wrong, dict.fromkeys(wrong, left)) == {
        "relation_accuracy": 0.0,
        "relation_scenes": 5,
    }


def test_relation_accuracy_counts_only_two_distinct_objects_with_a_clear_relation():
    twins = [_placed("small", "red", "circle", 20, 50), _placed("small", "red", "circle", 80, 50)]
    diagonal = [
        _placed("small", "red", "circle", 20, 20),
        _placed("large", "blue", "square", 70, 70),
    ]
    three = [*twins, _placed("large", "blue", "square", 50, 90)]
    objects = {1: twins, 2: diagonal, 3: three}
    captions = dict.fromkeys(objects, "a small red circle to the left of a large blue square")
    assert relation_accuracy(captions, objects) == {
        "relation_accuracy": None,
        "relation_scenes": 0,
    }


def test_invented_relations_counts_relations_stated_where_none_is_clear():
    diagonal = [
        _placed("small", "red", "circle", 20, 20),
        _placed("large", "blue", "square", 70, 70),
    ]
    near_the_edge = [  # dx is 0.55 of dy: not clear cut (it must be at most half)
        _placed("small", "red", "circle", 39, 20),
        _placed("large", "blue", "square", 50, 40),
    ]
    left = [_placed("small", "red", "circle", 20, 50), _placed("large", "blue", "square", 80, 52)]
    twins = [_placed("small", "red", "circle", 20, 50), _placed("small", "red", "circle", 80, 50)]
    captions = {
        1: "a small red circle and a large blue square",
        2: "a small red circle above a large blue square",  # invented
        3: "a small red circle at the top and a large blue square at the bottom",  # invented
        4: "a large blue square to the right of a small red circle",  # clear: not counted
        5: "a small red circle to the left of a small red circle",  # twins: not counted
    }
    objects = {1: diagonal, 2: near_the_edge, 3: diagonal, 4: left, 5: twins}
    assert invented_relations(captions, objects) == {
        "invented_relations": 2 / 3,
        "unclear_relation_scenes": 3,
    }
    assert relation_accuracy(captions, objects)["relation_scenes"] == 1
    assert invented_relations({4: captions[4]}, {4: left}) == {
        "invented_relations": None,
        "unclear_relation_scenes": 0,
    }


def test_no_reference_of_the_generator_invents_or_misses_a_relation():
    scenes = [
        *generate_split(300, seed=21),
        *edge_pair_scenes(100, seed=21, size=128, start_id=301),
    ]
    objects = {s.image_id: [object_record(o, s.size) for o in s.objects] for s in scenes}
    for k in range(5):
        captions = {s.image_id: s.captions[k] for s in scenes}
        assert invented_relations(captions, objects)["invented_relations"] == 0.0
    canonical = relation_accuracy({s.image_id: s.captions[0] for s in scenes}, objects)
    assert canonical["relation_accuracy"] == 1.0 and canonical["relation_scenes"] > 40


def test_count_accuracy_wants_repeated_objects_counted_in_one_phrase():
    twins = [_placed("small", "red", "circle", 20, 50), _placed("small", "red", "circle", 80, 50)]
    three = [*twins, _placed("large", "blue", "square", 50, 90)]
    distinct = [
        _placed("small", "red", "circle", 20, 50),
        _placed("large", "red", "circle", 80, 50),
    ]
    captions = {
        1: "two small red circles",
        2: "a pair of little circles in red",
        3: "two small red circles and a large blue square",
        4: "a small red circle and a small red circle",  # right scene, listed one by one
        5: "a small red circle, a large blue square and a small red circle",
        6: "three small red circles",  # counted, but the wrong number
        7: "two small red circles",  # right, yet no object repeats here: not counted
    }
    objects = {1: twins, 2: twins, 3: three, 4: twins, 5: three, 6: twins, 7: distinct}
    assert object_scene_accuracy({k: captions[k] for k in (4, 5)}, objects)["scene_accuracy"] == 1
    assert count_accuracy(captions, objects) == {
        "count_accuracy": pytest.approx(3 / 6),
        "count_scenes": 6,
    }
    assert count_accuracy({7: captions[7]}, objects) == {"count_accuracy": None, "count_scenes": 0}
