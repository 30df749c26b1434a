"""The official VQA accuracy: leave-one-out arithmetic, answer normalisation, aggregation."""

from __future__ import annotations

import pytest

from captioner.evaluation.vqa_accuracy import (
    evaluate,
    leave_one_out_accuracy,
    normalize_answer,
    question_accuracy,
)


def humans(**votes: int) -> list[str]:
    out = [answer for answer, n in votes.items() for _ in range(n)]
    assert len(out) == 10
    return out


# Leave-one-out: with m of the 10 humans giving the prediction, the m subsets that drop one of
# them hold m - 1 matches and the 10 - m others hold m; each subset scores min(1, matches / 3).


def test_three_or_more_matching_humans_score_one():
    # m = 3: 3 subsets hold 2 matches (2/3), 7 hold 3 (1) -> (3 * 2/3 + 7) / 10 = 0.9, not 1;
    # m = 4: every subset holds 3 or 4 matches -> 1.0.
    assert question_accuracy("cat", humans(cat=4, dog=6)) == 1.0
    assert question_accuracy("cat", humans(cat=10)) == 1.0
    assert question_accuracy("cat", humans(cat=3, dog=7)) == 0.9


def test_one_of_ten_scores_point_three():
    # m = 1: 1 subset holds 0 matches, 9 hold 1 (1/3) -> (9 * 1/3) / 10 = 0.3
    assert question_accuracy("cat", humans(cat=1, dog=9)) == 0.3


def test_two_of_ten_scores_point_six():
    # m = 2: 8 subsets contain both (2/3), 2 contain one (1/3) -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    assert question_accuracy("cat", humans(cat=2, dog=8)) == 0.6
    assert question_accuracy("cat", humans(dog=8, cat=2)) == 0.6  # order never matters


def test_no_match_scores_zero():
    assert question_accuracy("bird", humans(cat=5, dog=5)) == 0.0


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_leave_one_out_for_any_position_of_the_matches(m, expected):
    for start in range(10 - m + 1):
        answers = ["no"] * 10
        answers[start : start + m] = ["yes"] * m
        assert leave_one_out_accuracy("yes", answers) == expected


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("  Yes\n", "yes"),
        ("10,000", "10000"),  # a digit-comma-digit deletes every mark instead of spacing it
        ("red,blue", "red blue"),  # no digits around the comma: it becomes a space
        ("red, blue", "red blue"),  # touching a space: deleted
        ("a man's hat", "man's hat"),  # the apostrophe is not in the official list
        ("3.5", "3.5"),  # a period before a digit stays
        ("t-shirt", "t shirt"),
        ("Im", "im"),  # sic: the official table's key is "Im", never matched after lower-casing
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_prediction_is_normalised_and_humans_are_not_when_identical():
    assert question_accuracy("Two.", humans(**{"2": 10})) == 1.0
    assert question_accuracy("the dog", humans(dog=10)) == 1.0
    # the official code leaves identical human answers alone, so an unnormalised one never matches
    assert question_accuracy("two", humans(two=10)) == 0.0
    # ... and only punctuation-processes differing ones (no lower-casing, no number words)
    assert question_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == 0.9
    # sic: "yes!" becomes "yes " (a mark not touching a space turns into one) and human answers
    # are never stripped, so it does not match "yes"
    assert question_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0
    assert question_accuracy("yes", ["Yes"] * 3 + ["no"] * 7) == 0.0


def test_bad_answers_raise():
    with pytest.raises(ValueError, match="non-empty"):
        question_accuracy("yes", [])
    with pytest.raises(ValueError, match="strings"):
        question_accuracy("yes", ["yes", 3])
    with pytest.raises(ValueError, match="string"):
        normalize_answer(None)


def annotation(qid: int, answers: list[str], answer_type: str, question_type: str) -> dict:
    return {
        "question_id": qid,
        "image_id": 1,
        "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)],
        "answer_type": answer_type,
        "question_type": question_type,
        "multiple_choice_answer": answers[0] if answers else "",
    }


def test_evaluate_aggregates_per_type():
    annotations = [
        annotation(1, humans(yes=10), "yes/no", "is the"),
        annotation(2, humans(no=8, yes=2), "yes/no", "is there a"),
        annotation(3, humans(**{"2": 9, "3": 1}), "number", "how many"),
        annotation(4, humans(red=1, blue=9), "other", "what color is the"),
    ]
    predictions = {1: "yes", 2: "yes", 3: "two", 4: "red", 99: "ignored"}
    result = evaluate(predictions, annotations)
    assert result["n"] == 4
    assert result["accuracy"] == pytest.approx((1.0 + 0.6 + 1.0 + 0.3) / 4)
    assert result["per_answer_type"] == pytest.approx({"yes/no": 0.8, "number": 1.0, "other": 0.3})
    assert result["per_question_type"] == pytest.approx(
        {"is the": 1.0, "is there a": 0.6, "how many": 1.0, "what color is the": 0.3}
    )


def test_evaluate_names_missing_predictions():
    annotations = [annotation(q, humans(yes=10), "yes/no", "is") for q in (7, 8, 9)]
    with pytest.raises(ValueError, match=r"2 question id\(s\): 7, 9"):
        evaluate({8: "yes"}, annotations)


def test_evaluate_rejects_empty_and_malformed_annotations():
    with pytest.raises(ValueError, match="empty"):
        evaluate({}, [])
    with pytest.raises(ValueError, match="answer_type"):
        evaluate({1: "yes"}, [{"question_id": 1, "answers": [], "question_type": "is"}])
    with pytest.raises(ValueError, match="answers"):
        evaluate({1: "yes"}, [annotation(1, [], "yes/no", "is")])
