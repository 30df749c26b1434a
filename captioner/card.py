"""Model cards: what a model folder says about itself, in `card.json`.

A card tells a user what the model was trained on (the domain in plain words, the data command and
sizes), its vocabulary and answer-set sizes, the pretrained word vectors its embedding started
from (if any), its validation and test figures with the commands that measured them, what it is
meant for and its known limits:

    card = Captioner.load("models/shapes-captioner").card
    card.summary       # one line
    card.to_dict()     # what card.json holds and GET /models returns

Training writes a card from what it knows (`card_from_training`: the data record, the commands,
the validation figures); `python -m training.model_card` adds the test figures and the words a
person must write (summary, domain, intended use, limits). A folder without `card.json` still
loads: its card is then built from `training.json`, and says that it was not written. A
`card.json` that is not a valid card is refused (`ModelCard.from_dict` names the bad field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .files import write_json_atomic

CARD = "card.json"
CARD_FORMAT = 1
MAX_CARD_BYTES = 64 * 1024  # a card is read by people and served by /models: a few KB
NOT_STATED = (
    "not stated: this card was built from training.json; see `python -m training.model_card`"
)
KINDS = ("captioner", "vqa")

_FIELDS = (
    "card_format",
    "kind",
    "summary",
    "domain",
    "intended_use",
    "limitations",
    "data",
    "training",
    "vocabulary_size",
    "answers",
    "validation",
    "tests",
    "word_vectors",
)
_OPTIONAL_FIELDS = ("word_vectors",)  # absent from cards written before it: read as null
_WORD_VECTOR_FIELDS = ("source", "dim", "vectors", "rows_from_vectors", "vector_words", "frozen")
_DATA_FIELDS = ("description", "command", "sizes")
_TRAINING_FIELDS = ("command", "wall_time_s", "device")
_VALIDATION_FIELDS = ("epoch", "metrics")
_TEST_FIELDS = ("data", "command", "metrics")


@dataclass(frozen=True)
class ModelCard:
    kind: str  # "captioner" or "vqa", as the folder's config.json
    summary: str  # one line: what the model does, on what images
    domain: str  # the images (and questions) it was trained on, in plain words
    intended_use: str
    limitations: tuple[str, ...]
    data: dict[str, Any]  # {"description": str, "command": str | None, "sizes": {str: int}}
    training: dict[str, Any]  # {"command": str | None, "wall_time_s": float | None, "device": ...}
    vocabulary_size: int  # words the model reads (a captioner's vocabulary writes them too)
    answers: int | None = None  # a VQA model's answer-set size; None for a captioner
    validation: dict[str, Any] | None = None  # {"epoch": int | None, "metrics": {name: value}}
    tests: tuple[dict[str, Any], ...] = field(default=())  # [{"data", "command", "metrics"}]
    # The pretrained vectors the word embedding started from (`captioner.word_vectors`):
    # {"source", "dim", "vectors" (the source's words), "rows_from_vectors" (embedding rows set
    # from a vector), "vector_words" (the vocabulary also holds this many of the vectors' most
    # frequent words; null: none added),
    # "frozen"}; None when the embedding was learned from scratch.
    word_vectors: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "card_format": CARD_FORMAT,
            "kind": self.kind,
            "summary": self.summary,
            "domain": self.domain,
            "intended_use": self.intended_use,
            "limitations": list(self.limitations),
            "data": self.data,
            "training": self.training,
            "vocabulary_size": self.vocabulary_size,
            "answers": self.answers,
            "validation": self.validation,
            "tests": list(self.tests),
            "word_vectors": self.word_vectors,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """A card from its JSON; a ValueError names the first field that is missing, unknown or
        of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError(f"a model card must be a JSON object, got {type(data).__name__}")
        _keys(data, _FIELDS, "the card", optional=_OPTIONAL_FIELDS)
        if data["card_format"] != CARD_FORMAT:
            raise ValueError(
                f"card_format is {data['card_format']!r}; this code reads {CARD_FORMAT}"
            )
        if data["kind"] not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {data['kind']!r}")
        for name in ("summary", "domain", "intended_use"):
            _text(data[name], name)
        limitations = _list(data["limitations"], "limitations")
        for i, item in enumerate(limitations):
            _text(item, f"limitations[{i}]")
        card_data = _object(data["data"], "data", _DATA_FIELDS)
        _text(card_data["description"], "data.description")
        _text_or_null(card_data["command"], "data.command")
        sizes = _object(card_data["sizes"], "data.sizes")
        for key, value in sizes.items():
            if not _is_int(value) or value < 0:
                raise ValueError(f"data.sizes.{key} must be a count (an int >= 0), got {value!r}")
        training = _object(data["training"], "training", _TRAINING_FIELDS)
        _text_or_null(training["command"], "training.command")
        _text_or_null(training["device"], "training.device")
        if training["wall_time_s"] is not None and not _is_number(training["wall_time_s"]):
            raise ValueError(
                f"training.wall_time_s must be a number or null, got {training['wall_time_s']!r}"
            )
        if not _is_int(data["vocabulary_size"]) or data["vocabulary_size"] < 1:
            raise ValueError(
                f"vocabulary_size must be an int >= 1, got {data['vocabulary_size']!r}"
            )
        answers = data["answers"]
        if data["kind"] == "vqa" and not (_is_int(answers) and answers >= 1):
            raise ValueError(f"answers must be an int >= 1 for a VQA model, got {answers!r}")
        if data["kind"] == "captioner" and answers is not None:
            raise ValueError(f"answers must be null for a captioner, got {answers!r}")
        validation = data["validation"]
        if validation is not None:
            validation = _object(validation, "validation", _VALIDATION_FIELDS)
            if validation["epoch"] is not None and not _is_int(validation["epoch"]):
                raise ValueError(
                    f"validation.epoch must be an int or null, got {validation['epoch']!r}"
                )
            _metrics(validation["metrics"], "validation.metrics")
        tests = _list(data["tests"], "tests")
        for i, test in enumerate(tests):
            test = _object(test, f"tests[{i}]", _TEST_FIELDS)
            _text(test["data"], f"tests[{i}].data")
            _text(test["command"], f"tests[{i}].command")
            _metrics(test["metrics"], f"tests[{i}].metrics")
        word_vectors = data.get("word_vectors")
        if word_vectors is not None:
            _check_word_vectors(word_vectors)
        card = cls(
            kind=data["kind"],
            summary=data["summary"],
            domain=data["domain"],
            intended_use=data["intended_use"],
            limitations=tuple(limitations),
            data=card_data,
            training=training,
            vocabulary_size=data["vocabulary_size"],
            answers=answers,
            validation=validation,
            tests=tuple(tests),
            word_vectors=word_vectors,
        )
        size = len(json.dumps(card.to_dict()).encode("utf-8"))
        if size > MAX_CARD_BYTES:
            raise ValueError(f"the card is {size} bytes; a card is capped at {MAX_CARD_BYTES}")
        return card

    def check_matches(self, kind: str, vocabulary_size: int, answers: int | None) -> None:
        """Refuse a card written for another model: its kind and sizes must be the folder's."""
        for name, says, has in (
            ("kind", self.kind, kind),
            ("vocabulary_size", self.vocabulary_size, vocabulary_size),
            ("answers", self.answers, answers),
        ):
            if says != has:
                raise ValueError(f"the card says {name} {says!r} but the model has {has!r}")

    def with_training(self, training: dict[str, Any]) -> ModelCard:
        """This card for new weights from the run `training` describes: the data, command and
        validation figures are the run's; test figures (of other weights) are dropped; the
        summary, domain, intended use and limits are kept."""
        built = card_from_training(self.kind, training, self.vocabulary_size, self.answers)
        return replace(
            built,
            summary=self.summary,
            domain=self.domain,
            intended_use=self.intended_use,
            limitations=self.limitations,
            tests=(),
        )


def card_from_training(
    kind: str, training: dict[str, Any] | None, vocabulary_size: int, answers: int | None = None
) -> ModelCard:
    """The card a folder implies: what its `training.json` (the record `training/loop.py` writes)
    says about the data, the commands, the figures and the word vectors; the words only a person
    can write (summary, domain, intended use, limits) say that they are not stated."""
    training = training if isinstance(training, dict) else {}
    record = training.get("data") if isinstance(training.get("data"), dict) else {}
    sizes = {
        k: v for k, v in record.items() if _is_int(v) and v >= 0 and not k.startswith("skipped")
    }
    where = [str(record[k]) for k in ("root", "train") if isinstance(record.get(k), str)]
    description = f"the data at {where[0]}" if where else "not recorded"
    metrics = training.get("metrics") if isinstance(training.get("metrics"), dict) else None
    validation = None
    if metrics:
        epoch = metrics.get("epoch")
        validation = {
            "epoch": epoch if _is_int(epoch) else None,
            "metrics": _numbers({k: v for k, v in metrics.items() if k != "epoch"}),
        }
    tests: tuple[dict[str, Any], ...] = ()
    test = training.get("test_metrics")
    if isinstance(test, dict) and isinstance(test.get("command"), str):
        tests = (
            {
                "data": "the split its command names (from training.json)",
                "command": test["command"],
                "metrics": figures(test),
            },
        )
    what = "caption" if kind == "captioner" else "VQA"
    word_vectors = training.get("word_vectors")
    try:
        if word_vectors is not None:
            _check_word_vectors(word_vectors)
    except ValueError:
        word_vectors = None  # a record this code did not write: the card says nothing of it
    return ModelCard(
        kind=kind,
        summary=f"A {what} model without a written card: what it knows is not stated.",
        domain=NOT_STATED,
        intended_use=NOT_STATED,
        limitations=(
            "No card was written for this model: its domain and limits are unknown; check what "
            "it was trained on before trusting it with your images.",
        ),
        data={
            "description": description,
            "command": _str_or_none(training.get("data_command")),
            "sizes": sizes,
        },
        training={
            "command": _str_or_none(training.get("command")),
            "wall_time_s": training.get("wall_time_s")
            if _is_number(training.get("wall_time_s"))
            else None,
            "device": _str_or_none(training.get("device")),
        },
        vocabulary_size=vocabulary_size,
        answers=answers,
        validation=validation,
        tests=tests,
        word_vectors=word_vectors,
    )


def read_card(
    side: dict[str, Any],
    kind: str,
    training: dict[str, Any] | None,
    vocabulary_size: int,
    answers: int | None = None,
) -> ModelCard:
    """The card of a folder whose side JSON files are `side` (`load_model_dir`): its card.json,
    checked against the folder, or the card `training.json` implies when there is none."""
    if CARD not in side:
        return card_from_training(kind, training, vocabulary_size, answers)
    card = ModelCard.from_dict(side[CARD])
    card.check_matches(kind, vocabulary_size, answers)
    return card


def write_card(folder: str | Path, card: ModelCard) -> Path:
    """Write (replace) `folder/card.json` atomically; the folder's other files are untouched."""
    ModelCard.from_dict(card.to_dict())  # never write a card that would not load
    return write_json_atomic(Path(folder) / CARD, card.to_dict())


def figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures of a metrics JSON (what `training.evaluate` or `training.evaluate_vqa`
    writes): its numbers and its objects of numbers (per question type, ...); names, paths,
    notes, the counts of skipped images and the run's duration (`seconds`, a property of the
    machine) are left out."""
    return _numbers(
        {k: v for k, v in metrics.items() if k != "seconds" and not k.startswith("skipped")}
    )


# -- checks -----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _numbers(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if _is_number(value):
            out[key] = value
        elif isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
            out[key] = dict(value)
    return out


def _keys(data: dict, fields: tuple[str, ...], where: str, optional: tuple[str, ...] = ()) -> None:
    missing = [f for f in fields if f not in data and f not in optional]
    unknown = sorted(set(data) - set(fields))
    if missing:
        raise ValueError(f"{where} is missing {', '.join(missing)}")
    if unknown:
        raise ValueError(f"{where} has unknown fields {', '.join(map(str, unknown))}")


def _object(value: Any, name: str, fields: tuple[str, ...] | None = None) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object, got {type(value).__name__}")
    if fields is not None:
        _keys(value, fields, name)
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return value


def _text(value: Any, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _text_or_null(value: Any, name: str) -> None:
    if value is not None:
        _text(value, name)


def _check_word_vectors(value: Any) -> None:
    vectors = _object(value, "word_vectors", _WORD_VECTOR_FIELDS)
    _text(vectors["source"], "word_vectors.source")
    for name in ("dim", "vectors", "rows_from_vectors", "vector_words"):
        number = vectors[name]
        if name == "vector_words" and number is None:
            continue
        if not _is_int(number) or number < (1 if name in ("dim", "vectors") else 0):
            raise ValueError(f"word_vectors.{name} must be a count, got {number!r}")
    if not isinstance(vectors["frozen"], bool):
        raise ValueError(f"word_vectors.frozen must be true or false, got {vectors['frozen']!r}")


def _metrics(value: Any, name: str) -> None:
    """{name: number, null, or {name: number or null}}: a figure, one not measured (METEOR
    without Java), or figures per question type."""
    for key, v in _object(value, name).items():
        if v is None or _is_number(v):
            continue
        if isinstance(v, dict) and all(x is None or _is_number(x) for x in v.values()):
            continue
        raise ValueError(f"{name}.{key} must be a number, null or an object of numbers, got {v!r}")
