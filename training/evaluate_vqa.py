"""Score a VQA model folder with the official VQA accuracy, overall and per answer/question type.

    python -m training.evaluate_vqa --model models/shapes-vqa --questions DATA/test/questions.json \\
        --annotations DATA/test/annotations.json --images DATA/test/images --out metrics.json
    python -m training.evaluate_vqa --model models/easy-vqa --easy-vqa test --out metrics.json

Writes `accuracy`, `per_answer_type`, `per_question_type` (fractions in 0..1), `n`, the questions
skipped because their image is missing or unreadable, and what was evaluated.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from captioner.data.vqa_data import load_vqa, prepare
from captioner.evaluation.vqa_scores import score
from captioner.files import write_json_atomic
from captioner.progress import progress
from captioner.vqa.answerer import Answerer
from training.common import run_script


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="VQA model folder")
    p.add_argument("--questions", help="VQA v2 questions JSON")
    p.add_argument("--annotations", help="VQA v2 annotations JSON")
    p.add_argument("--images", help="image folder of the questions")
    p.add_argument(
        "--easy-vqa",
        choices=("train", "test"),
        help="evaluate on this split of the installed easy-vqa package instead",
    )
    p.add_argument("--out", help="write the metrics JSON here (also printed)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--quantize", choices=["int8"], help="int8 LSTM and linear layers (CPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    vqa = Answerer.load(args.model, device=args.device, quantize=args.quantize)
    with tempfile.TemporaryDirectory(prefix="easy-vqa-") as tmp:
        if args.easy_vqa:
            from training.make_easy_vqa import convert_split

            convert_split(args.easy_vqa, Path(tmp))
            files = (Path(tmp) / "questions.json", Path(tmp) / "annotations.json", Path(tmp) / "images")  # fmt: skip
            source = {"easy_vqa": args.easy_vqa}
        elif args.questions and args.annotations and args.images:
            files = (Path(args.questions), Path(args.annotations), Path(args.images))
            source = {"questions": args.questions, "annotations": args.annotations}
        else:
            raise ValueError("give --questions, --annotations and --images, or --easy-vqa SPLIT")
        split = load_vqa(*files)
        data = prepare(split, vqa.input_size, None if args.no_progress else progress)
    metrics = score(vqa, data, args.batch_size, show_progress=not args.no_progress)
    metrics.update(
        model={"name": vqa.name, "version": vqa.version, "path": str(args.model)},
        data=source,
        skipped_missing_image=split.skipped_missing_image,
        skipped_unreadable_image=len(split.items) - len(data.split.items),
        seconds=round(time.monotonic() - started, 1),
    )
    if args.out:
        write_json_atomic(args.out, metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    run_script(main, get_args_parser(), "evaluate_vqa")
