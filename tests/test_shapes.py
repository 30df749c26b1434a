import itertools
import random
import re
from collections import Counter

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from captioner.data.shapes import (
    COLOUR_WORDS,
    COLOURS,
    MAX_CAPTION_TOKENS,
    QUESTION_WORDS,
    RGB,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    Mention,
    ShapeObject,
    canonical_caption,
    decode_mask,
    encode_mask,
    generate_split,
    make_edge_pair_scene,
    make_questions,
    make_scene,
    object_mask,
    parse_caption,
    relation,
    render,
    score_caption,
    stated_relation,
)
from captioner.vocab import tokenize


@pytest.fixture(scope="module")
def scenes():
    return generate_split(300, seed=11)


def test_same_seed_same_scenes_and_pixels_other_seed_differs():
    a, b = generate_split(6, seed=3), generate_split(6, seed=3)
    assert a == b
    assert all(render(x).tobytes() == render(y).tobytes() for x, y in zip(a, b))
    assert generate_split(3, seed=3) == a[:3]  # scene i depends only on (seed, i)
    other = generate_split(6, seed=4)
    assert [s.objects for s in other] != [s.objects for s in a]


def test_scenes_hold_one_to_four_valid_objects(scenes):
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}
    assert [s.image_id for s in scenes] == list(range(1, 301))
    for s in scenes:
        for o in s.objects:
            assert (o.shape, o.color, o.size) in itertools.product(SHAPES, COLOURS, SIZES)
    radii = {sz: [o.radius for s in scenes for o in s.objects if o.size == sz] for sz in SIZES}
    assert min(radii["large"]) > 1.6 * max(radii["small"])  # large is clearly bigger


def test_objects_do_not_overlap_and_keep_off_the_border(scenes):
    for s in scenes[:100]:
        masks = [object_mask(o, s.size) for o in s.objects]
        for m in masks:
            assert m.any()
            assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
        for a, b in itertools.combinations(s.objects, 2):
            gap = np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])
            assert gap >= a.radius + b.radius
        assert sum(m.sum() for m in masks) == np.logical_or.reduce(masks).sum()


def test_every_reference_is_short_and_reads_back_as_exactly_the_scene(scenes):
    for s in scenes:
        assert len(s.captions) >= 5 and len(set(s.captions)) == len(s.captions)
        assert s.captions[0] == canonical_caption(s.objects, s.size)
        for caption in s.captions:
            assert len(tokenize(caption)) <= MAX_CAPTION_TOKENS, caption
            assert score_caption(caption, s.objects) == (len(s.objects), True), caption


def test_references_use_counts_relations_synonyms_and_openers(scenes):
    words = Counter(tok for s in scenes for c in s.captions for tok in tokenize(c))
    for word in ["two", "three", "left", "above", "big", "little", "tiny", "there", "picture"]:
        assert words[word] > 0, word
    assert set(SIZE_WORDS) <= set(words) and set(COLOURS) <= set(words)


_SAYS = [  # (pattern, where the first-named object lies relative to the second)
    (r"(.+) (?:is )?(?:to the )?left of (.+)", "left"),
    (r"(.+) (?:is )?(?:to the )?right of (.+)", "right"),
    (r"(.+) (?:is )?(?:above|over) (.+)", "above"),
    (r"(.+) (?:is )?(?:below|under) (.+)", "below"),
    (r"(.+) on the left and (.+) on the right", "left"),
    (r"(.+) on the right and (.+) on the left", "right"),
    (r"(.+) at the top and (.+) at the bottom", "above"),
    (r"(.+) at the bottom and (.+) at the top", "below"),
]


def test_spatial_relations_in_captions_are_true(scenes):
    checked = 0
    for s in scenes:
        if len(s.objects) != 2 or s.objects[0].attrs == s.objects[1].attrs:
            continue
        by_attrs = {o.attrs: o for o in s.objects}
        for caption in s.captions:
            for pattern, side in _SAYS:
                if m := re.fullmatch(pattern, caption):
                    (first,), (second,) = parse_caption(m[1]), parse_caption(m[2])
                    a = by_attrs[(first.size, first.color, first.shape)]
                    b = by_attrs[(second.size, second.color, second.shape)]
                    assert _side(a, b) == side, caption
                    checked += 1
                    break
    assert checked > 50


def test_leave_one_out_bleu4_of_references_is_varied(scenes):
    gts, res = {}, {}
    for s in scenes[:200]:
        refs = [" ".join(tokenize(c)) for c in s.captions]
        for j, hyp in enumerate(refs):
            res[f"{s.image_id}_{j}"] = [hyp]
            gts[f"{s.image_id}_{j}"] = refs[:j] + refs[j + 1 :]
    bleu4 = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    print(f"leave-one-out BLEU-4 of the references: {bleu4:.3f}")
    assert 0.1 < bleu4 <= 0.75


TWO = (
    ShapeObject("circle", "red", "small", (30, 60), 9.6),
    ShapeObject("square", "blue", "large", (90, 60), 19.2),
)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a small red circle to the left of a large blue square", (2, True)),
        ("there is a tiny circle in red with a big square colored blue", (2, True)),
        ("a red circle that is little is to the left of a blue square that is big", (2, True)),
        ("a small green circle to the left of a large blue square", (1, False)),  # wrong colour
        ("a small red circle to the left of a small blue square", (1, False)),  # wrong size
        ("a large blue square", (1, False)),  # missing object
        ("a red circle and a large blue square", (1, False)),  # size not stated
        ("a small red circle, a large blue square and a tiny white cross", (2, False)),  # extra
        ("two small red circles and a big blue square", (2, False)),  # one circle too many
        ("a cat on a mat", (0, False)),
    ],
)
def test_score_caption(caption, expected):
    assert score_caption(caption, TWO) == expected
    as_json = [{"shape": o.shape, "color": o.color, "size": o.size} for o in TWO]
    assert score_caption(caption, as_json) == expected


def test_parse_caption_reads_counts_plurals_and_synonyms():
    assert parse_caption("Two small red circles.") == [Mention(2, "small", "red", "circle")]
    assert parse_caption("a pair of big crosses") == [Mention(2, "large", None, "cross")]
    assert parse_caption("three tiny diamonds in yellow, one above the other") == [
        Mention(3, "small", "yellow", "diamond")
    ]
    assert parse_caption("a triangle and four squares") == [
        Mention(1, None, None, "triangle"),
        Mention(4, None, None, "square"),
    ]
    assert SHAPE_WORDS["crosses"] == "cross" and SIZE_WORDS["big"] == "large"
    assert COLOUR_WORDS["purple"] == "purple"


_REL = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def _matching(objects, words):
    """The objects that every canonical attribute word in `words` describes."""
    return [o for o in objects if all(w in (o.size, o.color, o.shape) for w in words.split())]


def _side(a, b):
    """Where a lies relative to b, when clear cut (recomputed independently of the library)."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _answer(q, objects):
    rel = "|".join(_REL)
    if m := re.fullmatch(r"what (shape|color) is the object (" + rel + r") the (.+)\?", q):
        (b,) = _matching(objects, m[3])
        (a,) = [o for o in objects if o is not b and _side(o, b) == _REL[m[2]]]
        assert all(_side(o, b) is not None for o in objects if o is not b)
        return getattr(a, m[1])
    if m := re.fullmatch(r"what color is the (.+)\?", q):
        (obj,) = _matching(objects, m[1])
        return obj.color
    if m := re.fullmatch(r"what shape is the (.+) object\?", q):
        (obj,) = _matching(objects, m[1])
        return obj.shape
    if m := re.fullmatch(r"how many (.+) are there\?", q):
        words = m[1].removesuffix("objects").split()
        return str(len(_matching(objects, " ".join(SHAPE_WORDS.get(w, w) for w in words))))
    if m := re.fullmatch(r"is there a (.+)\?", q):
        return "yes" if _matching(objects, m[1]) else "no"
    if m := re.fullmatch(r"is the (.+) (" + rel + r") the (.+)\?", q):
        (a,) = _matching(objects, m[1])
        (b,) = _matching(objects, m[3])
        assert _side(a, b) is not None
        return "yes" if _side(a, b) == _REL[m[2]] else "no"
    raise AssertionError(f"unknown question form: {q}")


def test_question_answers_follow_from_the_objects(scenes):
    kinds = {"color": "other", "shape": "other", "count": "number", "exist": "yes/no"}
    types, yes_no = Counter(), Counter()
    for s in scenes:
        assert 6 <= len(s.questions) <= 10
        assert len({q.question for q in s.questions}) == len(s.questions)
        for q in s.questions:
            assert _answer(q.question, s.objects) == q.answer, q
            assert kinds.get(q.question_type, q.answer_type) == q.answer_type
            types[q.question_type] += 1
            if q.answer_type == "yes/no":
                yes_no[q.answer] += 1
            if q.answer_type == "number":
                assert q.answer in {"0", "1", "2", "3", "4"}
    assert set(types) == {"color", "shape", "count", "exist", "relation"}
    assert 0.4 < yes_no["yes"] / sum(yes_no.values()) < 0.6


def test_question_words_are_every_word_the_questions_use(scenes):
    used = {w for s in scenes for q in s.questions for w in tokenize(q.question)}
    assert used == QUESTION_WORDS
    assert {"what", "color", "shape", "object", "objects", "above", "?"} <= QUESTION_WORDS


def test_questions_are_deterministic():
    objects = make_scene(5).objects
    assert make_questions(objects, random.Random(1), 128) == make_questions(
        objects, random.Random(1), 128
    )


def test_masks_cover_pixels_of_the_objects_colour(scenes):
    for s in scenes[:40]:
        pixels = np.asarray(render(s), dtype=int)  # (H, W, 3)
        assert pixels.shape == (s.size, s.size, 3)
        covered = np.zeros((s.size, s.size), bool)
        for o in s.objects:
            m = object_mask(o, s.size)
            assert np.abs(pixels[m] - RGB[o.color]).max() <= 4
            covered |= m
        assert np.abs(pixels[~covered] - s.background).max() <= 4


def test_other_image_sizes_scale_the_scene():
    s = make_scene(2, size=64)
    assert render(s).size == (64, 64)
    assert all(object_mask(o, 64).any() for o in s.objects)


@pytest.mark.parametrize("kwargs", [dict(n=-1), dict(n=1, size=16), dict(n=1, start_id=0)])
def test_bad_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        generate_split(seed=0, **kwargs)


def test_mask_rle_round_trip(scenes):
    for o in scenes[0].objects:
        mask = object_mask(o, 128)
        rle = encode_mask(mask)
        assert isinstance(rle["counts"], str) and rle["size"] == [128, 128]
        assert np.array_equal(decode_mask(rle), mask)


def test_edge_pairs_are_two_distinct_objects_on_both_sides_of_the_relation_rule():
    pairs = [make_edge_pair_scene(seed, image_id=seed + 1) for seed in range(200)]
    assert pairs == [make_edge_pair_scene(seed, image_id=seed + 1) for seed in range(200)]
    ratios, clear = [], 0
    for s in pairs:
        a, b = s.objects
        assert a.attrs != b.attrs and list(s.objects) == sorted(s.objects, key=lambda o: o.center)
        dx, dy = abs(a.center[0] - b.center[0]), abs(a.center[1] - b.center[1])
        ratios.append(min(dx, dy) / max(dx, dy))
        clear += relation(a, b, s.size) is not None
        for o in s.objects:
            assert 0.03 * s.size + o.radius - 0.5 <= min(o.center)
            assert max(o.center) <= s.size - 0.03 * s.size - o.radius + 0.5
        assert np.hypot(dx, dy) >= a.radius + b.radius + 0.04 * s.size - 1
        assert all(score_caption(text, s.objects)[1] for text in s.captions)
        stated = stated_relation(s.captions[0])  # the canonical reference
        assert (stated is None) == (relation(a, b, s.size) is None)
    # rounding the centres to pixels moves a ratio by a little
    assert min(ratios) >= 0.28 and max(ratios) <= 0.72
    assert 0.3 < clear / len(pairs) < 0.7  # both sides of the edge, about half each
    assert min(ratios) < 0.35 and max(ratios) > 0.65 and 0.45 < np.median(ratios) < 0.55
    with pytest.raises(ValueError, match="edge ratios"):
        make_edge_pair_scene(0, ratios=(0.6, 0.4))
