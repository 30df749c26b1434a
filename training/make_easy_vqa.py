"""Convert easy-VQA (PyPI `easy-vqa`, MIT, data inside the wheel) into the VQA v2 format.

    python -m training.make_easy_vqa --out data/easy-vqa

Writes DIR/train and DIR/test, each with `questions.json` + `annotations.json` (VQA v2: ten identical
human answers per question) and `images/<image_id:012d>.png` (hard links into the installed package
where the file system allows, else copies). Image ids are unique across splits: test ids are offset
by TEST_ID_OFFSET; `info.original_image_ids` maps every new id back to easy-VQA's. Question id =
image id * 100 + the question's rank among its image's questions. Images are placed first and each
JSON file is written to a temporary file and renamed, so a crash never leaves a half-written JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections import Counter
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from captioner.files import write_text_atomic

__all__ = ["SPLITS", "TEST_ID_OFFSET", "convert_split", "get_args_parser", "main", "question_type"]

SPLITS = ("train", "test")
TEST_ID_OFFSET = 100_000  # easy-VQA's own ids are 0..3999 (train) and 0..999 (test)
MAX_QUESTIONS_PER_IMAGE = 100


def question_type(question: str) -> str:
    """ "yes/no", "color" or "shape", from the question's words (easy-VQA has 24 templates)."""
    words = question.lower().replace("?", " ").split()
    if not words:
        raise ValueError(f"empty question: {question!r}")
    if words[0] in ("is", "does", "are", "do"):
        return "yes/no"
    return "color" if "color" in words else "shape"


def _source_dir() -> Path:
    return Path(str(resources.files("easy_vqa") / "data"))


def _place(src: Path, dst: Path, copy: bool) -> None:
    """Hard-link (or copy) `src` to `dst`, replacing `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    if copy:
        shutil.copyfile(src, tmp)
    else:
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not supported
            shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, separators=(",", ":")) + "\n")  # dumps: the C encoder


def convert_split(
    split: str, out_dir: str | Path, *, source: Path | None = None, copy: bool = False
) -> dict[str, int]:
    """Write one easy-VQA split to `out_dir` in the VQA v2 format; returns its counts."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    source = (source or _source_dir()) / split
    offset = TEST_ID_OFFSET if split == "test" else 0
    try:
        raw = json.loads((source / "questions.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read easy-VQA questions from {source}: {exc}") from exc

    images = sorted((int(p.stem), p) for p in (source / "images").glob("*.png") if p.stem.isdigit())
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for image_id, path in images:
        _place(path, out_dir / "images" / f"{image_id + offset:012d}.png", copy)
    known = {image_id for image_id, _ in images}

    questions, annotations, per_image = [], [], Counter()
    for text, answer, orig_id in raw:
        if orig_id not in known:
            raise ValueError(f"easy-VQA {split} question {text!r} names missing image {orig_id}")
        image_id = orig_id + offset
        rank = per_image[image_id]
        per_image[image_id] += 1
        if rank >= MAX_QUESTIONS_PER_IMAGE:
            raise ValueError(f"image {orig_id} has over {MAX_QUESTIONS_PER_IMAGE} questions")
        qid = image_id * MAX_QUESTIONS_PER_IMAGE + rank
        questions.append({"image_id": image_id, "question": text, "question_id": qid})
        annotations.append(
            {
                "question_id": qid,
                "image_id": image_id,
                "question_type": question_type(text),
                "answer_type": "yes/no" if answer in ("yes", "no") else "other",
                "multiple_choice_answer": answer,
                "answers": [
                    {"answer": answer, "answer_confidence": "yes", "answer_id": i}
                    for i in range(1, 11)
                ],
            }
        )

    info = {
        "description": f"easy-VQA {split} split in the VQA v2 format",
        "source": f"easy-vqa {metadata.version('easy-vqa')} (PyPI, MIT licence)",
        "url": "https://github.com/vzhou842/easy-VQA",
        "image_id_offset": offset,
        "original_image_ids": {str(i + offset): i for i, _ in images},
    }
    header = {
        "info": info,
        "license": {"name": "MIT", "url": "https://opensource.org/licenses/MIT"},
        "task_type": "Open-Ended",
        "data_type": "easy-vqa",
        "data_subtype": split,
    }
    _write_json(out_dir / "annotations.json", {**header, "annotations": annotations})
    _write_json(out_dir / "questions.json", {**header, "questions": questions})
    return {"images": len(images), "questions": len(questions)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert the easy-VQA dataset (PyPI easy-vqa) into the VQA v2 format: "
        "DIR/{train,test}/{questions.json,annotations.json,images/}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (one subfolder per split)"
    )
    parser.add_argument(
        "--copy", action="store_true", help="copy the images instead of hard-linking them"
    )
    return parser


def main(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    counts = {}
    for split in SPLITS:
        counts[split] = convert_split(split, args.out / split, copy=args.copy)
        c = counts[split]
        print(f"{split}: {c['images']} images, {c['questions']} questions -> {args.out / split}")
    return counts


if __name__ == "__main__":
    main(get_args_parser().parse_args())
