"""Write or update a model folder's card (`card.json`): what the model knows, its figures, its limits.

    python -m training.model_card --model models/shapes-vqa                 # print the card
    python -m training.model_card --model DIR --summary "..." --domain "..." \\
        --intended-use "..." --limitation "..." --limitation "..." --write
    python -m training.model_card --model DIR --test-metrics metrics.json \\
        --test-data "shapes world, 1,000 test images (seed 7)" --test-command "python -m ..." --write

Training (`training/loop.py`) already writes a card with what it knows: the data record and the
data command, the sizes, the training command and the validation figures. This tool adds what
only a person or a later run knows: a one-line summary, the domain in plain words, the intended use
and the known limits (each --limitation replaces the list), and test figures with the command that
measured them (`--test-metrics`: the JSON `training.evaluate` or `training.evaluate_vqa` wrote;
`--test-metric NAME=VALUE` for figures given by hand). A test with the same --test-data or
--test-command as one already on the card replaces it. Without --write the new card is printed only. The card is checked
before it is written (atomically); the folder's other files are left as they are.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from captioner.card import ModelCard, figures, write_card
from captioner.checkpoint import CONFIG, ModelDirError
from training.common import run_script


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, type=Path, help="model folder")
    p.add_argument("--summary", help="one line: what the model does, on what images")
    p.add_argument("--domain", help="what it was trained on, in plain words")
    p.add_argument("--intended-use", help="what it is meant for")
    p.add_argument(
        "--limitation",
        action="append",
        help="a known limit (repeat for several; the given ones replace the card's list)",
    )
    p.add_argument("--data-description", help="the training data, in plain words")
    p.add_argument("--test-metrics", type=Path, help="metrics JSON of a test run")
    p.add_argument(
        "--test-metric",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a test figure by hand (repeatable; added to --test-metrics' figures)",
    )
    p.add_argument("--test-data", help="the test split, in plain words (needed with test figures)")
    p.add_argument("--test-command", help="the command(s) that measured the test figures")
    p.add_argument("--write", action="store_true", help="write card.json (default: print only)")
    return p


def load_card(folder: Path) -> ModelCard:
    """The card of a model folder (its card.json, or the one its training.json implies)."""
    from captioner.caption.captioner import Captioner
    from captioner.vqa.answerer import Answerer

    config = folder / CONFIG
    try:
        kind = json.loads(config.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelDirError(f"{config} cannot be read as a model's config.json: {exc}") from exc
    loaders = {"captioner": Captioner.load, "vqa": Answerer.load}
    if kind not in loaders:
        raise ModelDirError(f"{folder} holds a {kind!r} model; cards are for captioner or vqa")
    return loaders[kind](folder).card


def measured_test(args: argparse.Namespace) -> dict[str, Any] | None:
    """The test the arguments describe, or None when they give no test figures."""
    metrics: dict[str, Any] = {}
    if args.test_metrics is not None:
        try:
            data = json.loads(args.test_metrics.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--test-metrics {args.test_metrics}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"--test-metrics {args.test_metrics} must hold a JSON object")
        metrics = figures(data)
    for item in args.test_metric:
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name or number is None:
            raise ValueError(f"--test-metric must be NAME=NUMBER, got {item!r}")
        metrics[name] = number
    if not metrics:
        if args.test_data or args.test_command:
            raise ValueError("--test-data and --test-command need --test-metrics or --test-metric")
        return None
    if not args.test_data or not args.test_command:
        raise ValueError("test figures need --test-data and --test-command (what and how)")
    return {"data": args.test_data, "command": args.test_command, "metrics": metrics}


def updated(card: ModelCard, args: argparse.Namespace) -> ModelCard:
    changes: dict[str, Any] = {}
    for name in ("summary", "domain", "intended_use"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.limitation:
        changes["limitations"] = tuple(args.limitation)
    if args.data_description is not None:
        changes["data"] = {**card.data, "description": args.data_description}
    test = measured_test(args)
    if test is not None:
        kept = [
            t for t in card.tests if test["data"] != t["data"] and test["command"] != t["command"]
        ]
        changes["tests"] = (*kept, test)
    new = replace(card, **changes)
    return ModelCard.from_dict(new.to_dict())  # names the bad field of what was given


def main(args: argparse.Namespace) -> dict[str, Any]:
    card = updated(load_card(args.model), args)
    if args.write:
        write_card(args.model, card)
    print(json.dumps(card.to_dict(), indent=2))
    return card.to_dict()


if __name__ == "__main__":
    run_script(main, get_args_parser(), "model_card")
