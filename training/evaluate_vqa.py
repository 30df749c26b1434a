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
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.datasets import ImageTensors
from captioner.files import write_json_atomic
from captioner.vqa import VQAModel, encode_questions
from captioner.vqa_data import VQASplit, load_vqa
from captioner.vqa_metric import evaluate
from training.common import batches, progress


@dataclass
class PreparedSplit:
    """A VQA split with its images decoded once into memory and questions grouped by image."""

    split: VQASplit  # only the questions whose image decoded
    images: ImageTensors  # (N_images, 3, S, S) uint8
    by_image: list[list[int]]  # indices into split.items, per row of `images`
    unreadable: list[str]  # "path: reason" of images that did not decode

    @property
    def num_images(self) -> int:
        return len(self.images)


def prepare(split: VQASplit, input_size: int, show_progress: bool = False) -> PreparedSplit:
    """Decode every image of `split` once (resized to `input_size`); drop questions whose image
    does not decode."""
    paths: dict[Path, int] = {}
    for item in split.items:
        paths.setdefault(item.image_path, len(paths))
    images = ImageTensors(list(paths), input_size, progress if show_progress else None)
    row_of = {path_index: row for row, path_index in enumerate(images.kept)}
    kept_items, by_image = [], [[] for _ in images.kept]
    for item in split.items:
        row = row_of.get(paths[item.image_path])
        if row is not None:
            by_image[row].append(len(kept_items))
            kept_items.append(item)
    return PreparedSplit(
        VQASplit(kept_items, split.skipped_missing_image), images, by_image, images.unreadable
    )


def annotations_of(split: VQASplit) -> list[dict]:
    """The split's questions as VQA v2 annotation records, as `vqa_metric.evaluate` reads them."""
    return [
        {
            "question_id": item.question_id,
            "answers": [{"answer": a} for a in item.answers],
            "answer_type": item.answer_type,
            "question_type": item.question_type,
        }
        for item in split.items
    ]


@torch.inference_mode()
def predict(
    vqa: VQAModel, data: PreparedSplit, batch_size: int = 64, show_progress: bool = False
) -> dict[int, str]:
    """Question id -> the model's answer, encoding each image once for all its questions."""
    was_training = vqa.model.training
    vqa.model.eval()
    predictions: dict[int, str] = {}
    rows = [r for r in range(data.num_images) if data.by_image[r]]
    steps = (len(rows) + batch_size - 1) // batch_size
    for image_rows in progress(batches(rows, batch_size), steps, "evaluate", show_progress):
        memory = vqa.encode(data.images.batch(image_rows, vqa.device))  # (B, L, M)
        items = [data.split.items[k] for r in image_rows for k in data.by_image[r]]
        local = [j for j, r in enumerate(image_rows) for _ in data.by_image[r]]
        ids = encode_questions([item.question for item in items], vqa.question_vocab)
        logits, _ = vqa.model.head_prepared(
            memory, ids.to(vqa.device), torch.tensor(local, device=vqa.device)
        )
        for item, best in zip(items, logits.argmax(dim=1).tolist(), strict=True):
            predictions[item.question_id] = vqa.answers[best]
    vqa.model.train(was_training)
    return predictions


def score(vqa: VQAModel, data: PreparedSplit, batch_size: int = 64, show_progress: bool = False):
    """Official VQA accuracy of `vqa` on `data`: accuracy, per_answer_type, per_question_type, n."""
    if not data.split.items:
        raise ValueError("no questions to evaluate (every image missing or unreadable?)")
    return evaluate(predict(vqa, data, batch_size, show_progress), annotations_of(data.split))


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
    p.add_argument("--no-progress", action="store_true")
    return p


def main(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    vqa = VQAModel.load(args.model, device=args.device)
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
        data = prepare(split, vqa.input_size, show_progress=not args.no_progress)
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
    try:
        main(get_args_parser().parse_args())
    except ValueError as exc:
        print(f"evaluate_vqa: error: {exc}", file=sys.stderr)
        sys.exit(2)
