"""The official VQA accuracy, as computed by `vqaEval.py` of the VQA API (GT-Vision-Lab/VQA, master,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`), reproduced step for step:

- the prediction: newlines and tabs become spaces, it is stripped, then `processPunctuation` and
  `processDigitArticle` run on it (`normalize_answer` below does exactly this);
- the ten human answers: if they are not all identical, `processPunctuation` runs on each (and only
  that: no lower-casing, no number words, no articles: the released VQA annotations are already
  normalised that way), and they are never stripped, so a human "yes!" becomes "yes " and matches
  no prediction; if all ten are identical they are compared as they are;
- accuracy of one question = the mean over the 10 leave-one-out subsets of 9 humans of
  min(1, #humans in the subset who gave the prediction / 3).

The official code forms a leave-one-out subset by dropping every answer *dict* equal to the current
one; in VQA v2 each dict carries a distinct `answer_id`, so that is dropping exactly one answer, which
is what is done here (by position). Its quirks are kept on purpose so scores match the official
ones: the period regex `(?!<=\\d)` is a look-ahead typo, not a look-behind; `re.UNICODE` is passed
where `re.sub` expects a count, so at most 32 periods are removed; the contractions table keeps its
capitalised keys (`"Im"`, never matched after lower-casing) and its `"somebody'd": "somebodyd"` entry.

Scores here are fractions in 0..1, unrounded (the official script reports 100 * score rounded to
2 decimals), and summed with `math.fsum`, so they never depend on the order of the answers (the
official plain `sum` can differ in the last bit).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["evaluate", "leave_one_out_accuracy", "normalize_answer", "question_accuracy"]

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]  # fmt: skip
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: behaves as r"\.(?!\d)"
_PERIOD_MAX = int(re.UNICODE)  # sic: the official code passes re.UNICODE (32) as `count`
_ARTICLES = {"a", "an", "the"}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip


def _process_punctuation(text: str) -> str:
    """`processPunctuation`: a mark touching a space, or any mark in a text holding a digit-comma-
    digit, is deleted; any other mark becomes a space. Then periods not before a digit go."""
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or delete_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_MAX)


def _process_digit_article(text: str) -> str:
    """`processDigitArticle`: lower-case, number words to digits, drop articles, fix contractions."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """A predicted answer as the official evaluation compares it: "Two" -> "2", "the dog." -> "dog"."""
    if not isinstance(ans, str):
        raise ValueError(f"an answer must be a string, got {type(ans).__name__}: {ans!r}")
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(ans))


def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the leave-one-out subsets of `answers` of min(1, matches / 3), comparing the
    strings as they are (no normalisation).

    Summed with `math.fsum`, so the score never depends on the order of the answers (the official
    plain `sum` can differ in the last bit: 0.5999999999999999 instead of 0.6).
    """
    if not answers:
        raise ValueError("answers is empty: at least one human answer is needed")
    matches = [a == prediction for a in answers]
    total = sum(matches)
    accs = [min(1.0, (total - hit) / 3) for hit in matches]
    return math.fsum(accs) / len(accs)


def question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official accuracy (0..1) of one predicted answer against the human answers (ten in VQA)."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty sequence of strings, got {answers!r}")
    if not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answers must all be strings, got {list(answers)!r}")
    gts = list(answers)
    if len(set(gts)) > 1:  # the official code punctuation-processes humans only when they differ
        gts = [_process_punctuation(a) for a in gts]
    return leave_one_out_accuracy(normalize_answer(prediction), gts)


def _answers_of(ann: Mapping[str, Any]) -> list[str]:
    answers = ann.get("answers")
    if not isinstance(answers, list) or not answers:
        raise ValueError(
            f"annotation of question {ann.get('question_id')!r} needs a non-empty 'answers' list"
        )
    out = []
    for a in answers:
        if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
            raise ValueError(
                f"annotation of question {ann.get('question_id')!r}: each answer must be "
                f'{{"answer": str, ...}}, got {a!r}'
            )
        out.append(a["answer"])  # used as they are, as in the official code
    return out


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def evaluate(predictions: Mapping[int, str], annotations: list[dict]) -> dict[str, Any]:
    """Official VQA accuracy of `predictions` (question id -> answer) over VQA v2 `annotations`.

    Returns `{"accuracy", "per_answer_type", "per_question_type", "n"}`; accuracies are fractions in
    0..1 (means of the per-question accuracies, overall and per type). Every annotated question
    needs a prediction (a ValueError names the missing ids); predictions for questions not in
    `annotations` are ignored, so a subset of a split can be scored.
    """
    if not annotations:
        raise ValueError("annotations is empty: there is nothing to evaluate")
    for ann in annotations:
        missing_keys = [
            k for k in ("question_id", "answers", "answer_type", "question_type") if k not in ann
        ]
        if missing_keys:
            raise ValueError(f"annotation {ann!r:.200} lacks {', '.join(missing_keys)}")
    missing = [ann["question_id"] for ann in annotations if ann["question_id"] not in predictions]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"no prediction for {len(missing)} question id(s): {shown}")
    scores: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for ann in annotations:
        acc = question_accuracy(predictions[ann["question_id"]], _answers_of(ann))
        scores.append(acc)
        by_answer_type.setdefault(ann["answer_type"], []).append(acc)
        by_question_type.setdefault(ann["question_type"], []).append(acc)
    return {
        "accuracy": _mean(scores),
        "per_answer_type": {t: _mean(v) for t, v in by_answer_type.items()},
        "per_question_type": {t: _mean(v) for t, v in by_question_type.items()},
        "n": len(scores),
    }
