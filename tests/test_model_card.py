"""`python -m training.model_card`: the words and test figures it adds to a model folder's card."""

from __future__ import annotations

import json

import pytest

from captioner.card import CARD
from captioner.checkpoint import ModelDirError
from captioner.vqa.answerer import Answerer
from tests.api_fixtures import save_tiny_vqa
from training import model_card


def _run(*argv: str) -> dict:
    return model_card.main(model_card.get_args_parser().parse_args(list(argv)))


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_card.get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--test-metrics" in out and "--limitation" in out and "--write" in out


def test_words_and_test_figures_are_added_and_written_only_with_write(tmp_path, capsys):
    folder = save_tiny_vqa(tmp_path / "vqa")
    before = (folder / CARD).read_text()
    metrics = tmp_path / "metrics.json"  # as training.evaluate_vqa writes it
    metrics.write_text(
        json.dumps(
            {
                "accuracy": 0.25,
                "per_question_type": {"color": 0.5},
                "n": 8,
                "model": {"name": "tiny-vqa"},
                "seconds": 1.5,
                "skipped_missing_image": 0,
            }
        )
    )
    argv = [
        "--model", str(folder), "--summary", "Answers questions about noise.",
        "--domain", "random noise images", "--intended-use", "tests",
        "--limitation", "knows nothing", "--limitation", "answers at random",
        "--test-metrics", str(metrics), "--test-metric", "extra=0.75",
        "--test-data", "8 noise images", "--test-command", "python -m training.evaluate_vqa ...",
    ]  # fmt: skip
    printed = _run(*argv)
    assert json.loads(capsys.readouterr().out) == printed
    assert (folder / CARD).read_text() == before  # printed only

    _run(*argv, "--write")
    card = Answerer.load(folder).card
    assert card.to_dict() == printed
    assert card.summary == "Answers questions about noise." and card.domain == "random noise images"
    assert card.limitations == ("knows nothing", "answers at random")
    assert card.tests == (
        {
            "data": "8 noise images",
            "command": "python -m training.evaluate_vqa ...",
            "metrics": {
                "accuracy": 0.25,
                "per_question_type": {"color": 0.5},
                "n": 8,
                "extra": 0.75,
            },
        },
    )
    # The same test again replaces it; a different one is added; other words stay.
    _run("--model", str(folder), "--test-metric", "accuracy=0.5", "--test-data", "8 noise images",
         "--test-command", "python -m training.evaluate_vqa --again", "--write")  # fmt: skip
    _run("--model", str(folder), "--test-metric", "accuracy=0.1", "--test-data", "other",
         "--test-command", "python -m other", "--write")  # fmt: skip
    card = Answerer.load(folder).card
    assert [(t["data"], t["metrics"]) for t in card.tests] == [
        ("8 noise images", {"accuracy": 0.5}),
        ("other", {"accuracy": 0.1}),
    ]
    assert card.domain == "random noise images"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--test-metric", "accuracy=0.5"], "--test-data and --test-command"),
        (["--test-metric", "accuracy"], "NAME=NUMBER"),
        (
            ["--test-metric", "accuracy=high", "--test-data", "x", "--test-command", "y"],
            "NAME=NUMBER",
        ),
        (["--test-data", "x"], "need --test-metrics"),
        (["--summary", " "], "summary must be a non-empty string"),
        (["--limitation", ""], "limitations[0]"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, argv, named):
    folder = save_tiny_vqa(tmp_path / "vqa")
    before = (folder / CARD).read_text()
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        _run("--model", str(folder), *argv, "--write")
    assert (folder / CARD).read_text() == before


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ModelDirError, match="config.json"):
        _run("--model", str(tmp_path))
