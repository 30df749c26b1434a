"""VQA v2 data through the one data path: a questions JSON, an annotations JSON and an image folder.

    split = load_vqa("v2_OpenEnded_mscoco_val2014_questions.json",
                     "v2_mscoco_val2014_annotations.json", "val2014/")
    answers = build_answer_vocab(split.items, top_k=3000)
    targets = soft_targets(split.items[0].answers, {a: i for i, a in enumerate(answers)})

Questions whose image file is missing are counted and skipped up front, so an epoch never crashes
half-way.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioner.data.images import IMAGE_SUFFIXES, ImageTensors
from captioner.evaluation.vqa_accuracy import leave_one_out_accuracy, normalize_answer

_TRAILING_DIGITS = re.compile(r"(\d{12,})$")


@dataclass
class VQAItem:
    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: list[str]  # the human answers as written in the annotations (ten in VQA v2)
    multiple_choice_answer: str
    answer_type: str
    question_type: str


@dataclass
class VQASplit:
    items: list[VQAItem]
    skipped_missing_image: int = 0  # questions dropped because their image file is missing

    def __len__(self) -> int:
        return len(self.items)


def _read_list(path: str | Path, key: str, what: str) -> tuple[dict[str, Any], list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(
            f"{what} file {path} must be a JSON object whose '{key}' is a list (VQA v2)"
        )
    if not all(isinstance(r, dict) for r in data[key]):
        raise ValueError(f"{what} file {path}: every entry of '{key}' must be a JSON object")
    return data, data[key]


def _require(record: dict, fields: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    for name, kind in fields.items():
        value = record.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: field {name!r} is {value!r}; a {_kind(kind)} is required")


def _kind(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


class _ImageFinder:
    """Finds image files by id: COCO names, zero-padded or plain ids, or any name ending in the
    zero-padded id (the last resort, indexed on first use). The folder is listed once."""

    def __init__(self, image_dir: Path, subtype: str | None):
        self.dir = image_dir
        self.subtype = subtype
        with os.scandir(image_dir) as entries:
            self.names = {e.name for e in entries if e.is_file()}
        self._by_suffix: dict[int, str] | None = None

    def __call__(self, image_id: int) -> Path | None:
        padded = f"{image_id:012d}"
        candidates = [f"{padded}.jpg", f"{padded}.png", f"{image_id}.png", f"{image_id}.jpg"]
        if self.subtype:
            candidates.insert(0, f"COCO_{self.subtype}_{padded}.jpg")
        for name in candidates:
            if name in self.names:
                return self.dir / name
        if self._by_suffix is None:
            self._by_suffix = {}
            for name in sorted(self.names):
                stem, suffix = os.path.splitext(name)
                match = _TRAILING_DIGITS.search(stem)
                if match and suffix.lower() in IMAGE_SUFFIXES:
                    self._by_suffix.setdefault(int(match.group(1)), name)
        name = self._by_suffix.get(image_id)
        return None if name is None else self.dir / name


def load_vqa(
    questions_json: str | Path,
    annotations_json: str | Path,
    image_dir: str | Path,
    image_name: Callable[[int], str] | None = None,
) -> VQASplit:
    """Join a VQA v2 questions file and annotations file by question id and find each image.

    Images are looked up in `image_dir` as `image_name(image_id)` when given; otherwise as
    `COCO_<data_subtype>_<id:012d>.jpg` (subtype from the questions file), `<id:012d>.jpg/.png`,
    `<id>.png/.jpg`, or any image whose file stem ends with the zero-padded id. Questions whose
    image is missing are skipped and counted. Every question needs an annotation (ValueError
    otherwise); annotations of questions not in the questions file are ignored.
    """
    q_data, questions = _read_list(questions_json, "questions", "questions")
    _, annotations = _read_list(annotations_json, "annotations", "annotations")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ValueError(f"image folder not found: {image_dir}")

    by_id: dict[int, dict] = {}
    for ann in annotations:
        where = f"annotations file {annotations_json}, question {ann.get('question_id')!r}"
        _require(
            ann,
            {
                "question_id": int,
                "image_id": int,
                "answers": list,
                "multiple_choice_answer": str,
                "answer_type": str,
                "question_type": str,
            },
            where,
        )
        if not ann["answers"] or not all(
            isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ann["answers"]
        ):
            raise ValueError(f'{where}: answers must be a non-empty list of {{"answer": str}}')
        by_id[ann["question_id"]] = ann

    subtype = q_data.get("data_subtype")
    finder = None if image_name else _ImageFinder(image_dir, subtype)
    paths: dict[int, Path | None] = {}
    items, skipped, unannotated = [], 0, []
    for q in questions:
        where = f"questions file {questions_json}, question {q.get('question_id')!r}"
        _require(q, {"question_id": int, "image_id": int, "question": str}, where)
        ann = by_id.get(q["question_id"])
        if ann is None:
            unannotated.append(q["question_id"])
            continue
        if ann["image_id"] != q["image_id"]:
            raise ValueError(
                f"{where}: image id {q['image_id']} differs from the annotation's {ann['image_id']}"
            )
        image_id = q["image_id"]
        if image_id not in paths:
            if finder is None:
                path = image_dir / image_name(image_id)
                paths[image_id] = path if path.is_file() else None
            else:
                paths[image_id] = finder(image_id)
        if paths[image_id] is None:
            skipped += 1
            continue
        items.append(
            VQAItem(
                question_id=q["question_id"],
                image_id=image_id,
                image_path=paths[image_id],
                question=q["question"],
                answers=[a["answer"] for a in ann["answers"]],
                multiple_choice_answer=ann["multiple_choice_answer"],
                answer_type=ann["answer_type"],
                question_type=ann["question_type"],
            )
        )
    if unannotated:
        shown = ", ".join(map(str, unannotated[:10])) + (" ..." if len(unannotated) > 10 else "")
        raise ValueError(
            f"annotations file {annotations_json} has no annotation for {len(unannotated)} "
            f"question(s) of {questions_json}: {shown}"
        )
    return VQASplit(items, skipped_missing_image=skipped)


def build_answer_vocab(items: Iterable[VQAItem], top_k: int) -> list[str]:
    """The `top_k` most frequent normalised `multiple_choice_answer`s, ties broken alphabetically.

    Answers that normalise to nothing (e.g. "the") are left out.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    counts = Counter(normalize_answer(item.multiple_choice_answer) for item in items)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [answer for answer, _ in ranked[:top_k]]


def soft_targets(answers: Sequence[str], answer_to_index: Mapping[str, int]) -> dict[int, float]:
    """Index -> target score of each vocabulary answer the humans gave.

    The score is the official leave-one-out VQA accuracy of that answer against the (normalised)
    human answers: with ten humans, 1, 2, 3 and 4+ votes score 0.3, 0.6, 0.9 and 1.0 (Teney et
    al. 2018, "Tips and Tricks for Visual Question Answering", use these same soft scores), so the
    training target is exactly what the metric would award. Answers outside the vocabulary are
    dropped; a question none of whose answers is in it gets `{}`.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty sequence of strings, got {answers!r}")
    normalised = [normalize_answer(a) for a in answers]
    return {
        answer_to_index[a]: leave_one_out_accuracy(a, normalised)
        for a in sorted(set(normalised))
        if a in answer_to_index
    }


def load_split(root: str | Path, name: str) -> VQASplit:
    """The split `root/name` of a make_shapes / make_easy_vqa folder (questions.json,
    annotations.json, images/)."""
    folder = Path(root) / name
    if not folder.is_dir():
        raise ValueError(f"split folder not found: {folder}")
    return load_vqa(folder / "questions.json", folder / "annotations.json", folder / "images")


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


def prepare(split: VQASplit, input_size: int, progress=None) -> PreparedSplit:
    """Decode every image of `split` once (resized to `input_size`); drop questions whose image
    does not decode. `progress` wraps the paths (e.g. tqdm) while decoding."""
    paths: dict[Path, int] = {}
    for item in split.items:
        paths.setdefault(item.image_path, len(paths))
    images = ImageTensors(list(paths), input_size, progress)
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
