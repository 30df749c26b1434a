"""Model cards (captioner/card.py): written with a folder, read back, refused when malformed, built
from training.json when missing; the committed demo models' cards say what they know."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.caption.captioner import Captioner
from captioner.card import CARD, MAX_CARD_BYTES, ModelCard, card_from_training
from captioner.checkpoint import ModelDirError
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import save_tiny_captioner, save_tiny_vqa

ROOT = Path(__file__).resolve().parent.parent
DEMOS = {"shapes-captioner": Captioner, "shapes-vqa": Answerer, "easy-vqa": Answerer}


@pytest.mark.parametrize("name", sorted(DEMOS))
def test_demo_cards_say_what_the_models_know_and_where_their_figures_come_from(name):
    folder = ROOT / "models" / name
    card = DEMOS[name].load(folder).card
    training = json.loads((folder / "training.json").read_text())
    assert ModelCard.from_dict(json.loads((folder / CARD).read_text())) == card
    # shapes-vqa reads questions with word vectors from a file training.sentence_vectors writes
    # (its card says which, and the command that makes it); the others have none (their cards
    # were written before cards had `word_vectors`, which reads as null).
    if name == "shapes-vqa":
        assert card.word_vectors == training["word_vectors"]
        source = card.word_vectors["source"]
        assert source.endswith("minilm-96d.txt") and card.word_vectors["frozen"]
        assert f"training.sentence_vectors --out {source} --dims 96" in card.data["description"]
    else:
        assert card.word_vectors is None
    # Plainly: synthetic images only, not for photos.
    assert "synthetic" in card.domain.lower() and "never seen a photograph" in card.domain
    assert "not meant for real photos" in card.summary
    assert "Not for real photos" in card.intended_use
    assert any("photograph" in limit for limit in card.limitations)
    assert ("shapes-world" if name.startswith("shapes") else "easy-VQA") in card.summary
    # Filled in from training.json: the data and training commands, sizes, validation figures.
    assert card.data["command"] == training["data_command"]
    assert card.training["command"] == training["command"]
    assert card.data["sizes"]["train_images"] == training["data"]["train_images"]
    assert card.validation["epoch"] == training["metrics"]["epoch"]
    # Test figures with the command that measured them (the README's tables); shapes-vqa also
    # on the same questions reworded (make_shapes --paraphrase).
    test, *reworded = card.tests
    assert len(reworded) == (name == "shapes-vqa")
    for t in card.tests:
        assert t["command"].count("python -m training.evaluate") == 1
        assert f"--model models/{name}" in t["command"]
    figure = {"shapes-captioner": ("scene_accuracy", 0.972), "shapes-vqa": ("accuracy", 0.9951),
              "easy-vqa": ("accuracy", 0.9998)}[name]  # fmt: skip
    assert test["metrics"][figure[0]] == pytest.approx(figure[1], abs=5e-4)
    if reworded:
        assert "questions_paraphrased.json" in reworded[0]["command"]
        assert reworded[0]["metrics"]["accuracy"] == pytest.approx(0.9343, abs=5e-4)
    assert card.vocabulary_size == DEMOS[name].load(folder).metadata()["vocabulary_size"]


def test_a_saved_card_is_read_back(tmp_path):
    folder = save_tiny_vqa(tmp_path / "vqa")
    vqa = Answerer.load(folder)
    card = ModelCard.from_dict(
        {**vqa.card.to_dict(), "summary": "Answers tiny questions.", "domain": "noise images"}
    )
    vqa.card = card
    vqa.save(tmp_path / "again")
    assert Answerer.load(tmp_path / "again").card == card
    assert (
        Answerer.load(tmp_path / "again").metadata()["card"]["summary"] == "Answers tiny questions."
    )


def test_a_folder_without_a_card_loads_with_the_card_its_training_json_implies(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    (folder / CARD).unlink()
    captioner = Captioner.load(folder)
    card = captioner.card
    assert card.kind == "captioner" and card.vocabulary_size == len(captioner.vocab)
    assert card.answers is None and card.tests == ()
    assert "not stated" in card.domain and "without a written card" in card.summary
    assert card.validation == {"epoch": None, "metrics": {"bleu4": 0.5}}


def test_card_from_training_reads_the_training_record():
    training = {
        "command": "python -m training.train_vqa --data d",
        "data_command": "python -m training.make_shapes --out d",
        "data": {"root": "d", "train_images": 10, "skipped_missing_image": 0, "val": None},
        "metrics": {"epoch": 3, "accuracy": 0.5, "split": "val", "per_question_type": {"a": 1.0}},
        "wall_time_s": 12.5,
        "device": "cpu",
        "test_metrics": {"command": "python -m training.evaluate_vqa", "accuracy": 0.4},
    }
    card = card_from_training("vqa", training, vocabulary_size=9, answers=4)
    assert card.data == {
        "description": "the data at d",
        "command": "python -m training.make_shapes --out d",
        "sizes": {"train_images": 10},
    }
    assert card.training == {
        "command": "python -m training.train_vqa --data d",
        "wall_time_s": 12.5,
        "device": "cpu",
    }
    assert card.validation == {
        "epoch": 3,
        "metrics": {"accuracy": 0.5, "per_question_type": {"a": 1.0}},
    }
    assert [t["metrics"] for t in card.tests] == [{"accuracy": 0.4}]
    # New weights keep the words a person wrote, and lose the old weights' test figures.
    written = ModelCard.from_dict({**card.to_dict(), "domain": "tiny scenes"})
    again = written.with_training({**training, "command": "python -m training.train_vqa --x"})
    assert again.domain == "tiny scenes" and again.tests == ()
    assert again.training["command"] == "python -m training.train_vqa --x"


def _bad(card: dict) -> list[tuple[str, object, str]]:
    """(field path, bad value, what the error must name)."""
    return [
        ("summary", "", "summary"),
        ("domain", 3, "domain"),
        ("limitations", "one string", "limitations"),
        ("limitations", ["ok", ""], "limitations[1]"),
        ("kind", "detector", "kind"),
        ("card_format", 2, "card_format"),
        ("vocabulary_size", True, "vocabulary_size"),
        ("vocabulary_size", card["vocabulary_size"] + 1, "vocabulary_size"),
        ("answers", 3, "answers"),  # a captioner has none
        ("data", {"description": "x", "command": None}, "data is missing sizes"),
        ("data", {**card["data"], "sizes": {"train_images": -1}}, "data.sizes.train_images"),
        ("training", {**card["training"], "wall_time_s": "long"}, "training.wall_time_s"),
        ("validation", {"epoch": 1, "metrics": {"bleu": "high"}}, "validation.metrics.bleu"),
        ("tests", [{"data": "x", "command": "y", "metrics": {}, "extra": 1}], "unknown fields"),
        ("tests", [{"data": "x", "command": "", "metrics": {}}], "tests[0].command"),
        ("limitiations", ["typo"], "unknown fields limitiations"),
        ("limitations", ["x" * MAX_CARD_BYTES], "capped"),
    ]


def test_a_malformed_card_is_refused_with_a_clear_error(tmp_path):
    folder = save_tiny_captioner(tmp_path / "cap")
    good = json.loads((folder / CARD).read_text())
    for field, value, named in _bad(good):
        (folder / CARD).write_text(json.dumps({**good, field: value}))
        with pytest.raises(ModelDirError, match="card.json is not a valid model card") as info:
            Captioner.load(folder)
        assert named in str(info.value), (field, value, str(info.value))
    for text in ("[]", '"a card"', "{"):
        (folder / CARD).write_text(text)
        with pytest.raises(ModelDirError, match="card.json"):
            Captioner.load(folder)
    missing = {k: v for k, v in good.items() if k != "domain"}
    (folder / CARD).write_text(json.dumps(missing))
    with pytest.raises(ModelDirError, match="missing domain"):
        Captioner.load(folder)
    # The loader's own caps apply to the card too: depth is checked before the card is.
    nested: object = 1
    for _ in range(40):
        nested = [nested]
    (folder / CARD).write_text(json.dumps({**good, "limitations": nested}))
    with pytest.raises(ModelDirError, match="nests"):
        Captioner.load(folder)


def test_a_vqa_card_must_match_the_answer_set(tmp_path):
    folder = save_tiny_vqa(tmp_path / "vqa")
    good = json.loads((folder / CARD).read_text())
    for answers, named in ((good["answers"] + 1, "answers"), (None, "answers must be an int")):
        (folder / CARD).write_text(json.dumps({**good, "answers": answers}))
        with pytest.raises(ModelDirError, match=named):
            Answerer.load(folder)
