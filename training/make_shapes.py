"""Write the shapes-world dataset in the project's two on-disk formats, plus object masks.

    python -m training.make_shapes --out data/shapes --train 5000 --val 500 --test 500 --seed 0

Per split, DIR/<split>/ holds `images/<id>.png`, `captions.json` (MS-COCO captions),
`questions.json` + `annotations.json` (VQA v2) and `objects.json` (each object's shape, colour, size,
centre, bbox and COCO RLE mask). The same seed gives byte-identical files; each split's scenes depend
only on (seed, split name), and image ids never collide across splits.

`--reword-train` gives each training question a twin in another word order of the generator's own
words (`captioner.data.paraphrase.reword`; same image and answer, question id + 50), so that a
model sees more than one sentence structure per form but no word a paraphrase brings in.
`--vary-train` gives the twin other sentence structures and everyday words instead
(`captioner.data.paraphrase.vary`: "tint", "contour", "element", "north of", ...), none of which a
paraphrase uses either, so that a model meets each meaning in more than one word.

`--paraphrase` also writes `questions_paraphrased.json`: the same questions (same ids, images and
answers) in words the generated questions never use (`captioner.data.paraphrase` lists them), so
`annotations.json` scores it as it does `questions.json`:

    python -m training.evaluate_vqa --model M --questions DIR/test/questions_paraphrased.json \
        --annotations DIR/test/annotations.json --images DIR/test/images
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from captioner.data.paraphrase import paraphrase, reword, vary
from captioner.data.shapes import (
    Scene,
    ShapeObject,
    derive_seed,
    encode_mask,
    generate_split,
    make_edge_pair_scene,
    object_mask,
    render,
)
from captioner.files import write_text_atomic

__all__ = [
    "edge_pair_scenes",
    "generate_split",
    "get_args_parser",
    "main",
    "object_record",
    "paraphrased_records",
    "split_seed",
    "write_split",
]

SPLITS = ("train", "val", "test")
IDS_PER_SPLIT = 10_000_000
JSON_FILES = ("captions.json", "questions.json", "annotations.json", "objects.json")
PARAPHRASED = "questions_paraphrased.json"
_IMAGE_NAME = re.compile(r"^\d{12}\.png$")


def split_seed(seed: int, split: str) -> int:
    """The seed of one split: adding or resizing another split never changes this one."""
    return derive_seed(seed, split)


def first_id(split: str) -> int:
    """Image ids of split k start at k * IDS_PER_SPLIT + 1, so they are unique across splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return SPLITS.index(split) * IDS_PER_SPLIT + 1


def object_record(obj: ShapeObject, size: int) -> dict[str, Any]:
    """One object of objects.json: attributes, centre, bbox [x, y, w, h], area and COCO RLE mask."""
    mask = object_mask(obj, size)
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "shape": obj.shape,
        "color": obj.color,
        "size": obj.size,
        "center": list(obj.center),
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        "area": int(mask.sum()),
        "mask": encode_mask(mask),
    }


def edge_pair_scenes(n: int, seed: int, size: int, start_id: int) -> list[Scene]:
    """`n` scenes of two objects near the edge of the relation rule
    (`captioner.data.shapes.make_edge_pair_scene`), ids from `start_id`; scene i depends only on
    (seed, i)."""
    return [
        make_edge_pair_scene(derive_seed(seed, "edge", i), start_id + i, size) for i in range(n)
    ]


def _render_scene(scene: Scene, images_dir: Path) -> list[dict[str, Any]]:
    render(scene).save(images_dir / scene.file_name, format="PNG")
    return [object_record(obj, scene.size) for obj in scene.objects]


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, separators=(",", ":")) + "\n")


REWORDED_ID = 50  # a reworded twin's question id: its question's + this (a scene asks at most 10)


def _question_id(scene: Scene, k: int) -> int:
    return scene.image_id * 100 + k


# How a training question's twin is written (`write_split(twin=...)`), and the "wording" its files
# record.
TWINS = {
    "reword": (reword, "each question also reworded (captioner.data.paraphrase.reword)"),
    "vary": (vary, "each question also in other words (captioner.data.paraphrase.vary)"),
}


def _wordings(scene: Scene, k: int, question: str, twin: str | None) -> list[tuple[int, str]]:
    """(question id, text) of question k: the generated one, and with `twin` (a key of TWINS)
    its twin, drawn from (the scene's seed, twin, k) alone."""
    qid = _question_id(scene, k)
    if twin is None:
        return [(qid, question)]
    rewrite, _ = TWINS[twin]
    text = rewrite(question, random.Random(derive_seed(scene.seed, twin, k)))
    return [(qid, question), (qid + REWORDED_ID, text)]


def _vqa_records(scenes: Sequence[Scene], twin: str | None = None) -> tuple[list[dict], list[dict]]:
    """VQA v2 questions and annotations (10 identical answers each); question id = image id * 100
    + k (+ REWORDED_ID for a twin)."""
    questions, answers = [], []
    for s in scenes:
        for k, q in enumerate(s.questions):
            ten = [
                {"answer": q.answer, "answer_confidence": "yes", "answer_id": i}
                for i in range(1, 11)
            ]
            for qid, text in _wordings(s, k, q.question, twin):
                questions.append({"image_id": s.image_id, "question": text, "question_id": qid})
                answers.append(
                    {
                        "question_id": qid,
                        "image_id": s.image_id,
                        "question_type": q.question_type,
                        "answer_type": q.answer_type,
                        "multiple_choice_answer": q.answer,
                        "answers": ten,
                    }
                )
    return questions, answers


def paraphrased_records(scenes: Sequence[Scene]) -> list[dict]:
    """The questions of `_vqa_records` reworded by `captioner.data.paraphrase`, with the same ids
    and images; question k of a scene draws its wording from (the scene's seed, k) alone."""
    return [
        {
            "image_id": s.image_id,
            "question": paraphrase(q.question, random.Random(derive_seed(s.seed, "paraphrase", k))),
            "question_id": _question_id(s, k),
        }
        for s in scenes
        for k, q in enumerate(s.questions)
    ]


def write_split(
    scenes: Sequence[Scene],
    out_dir: str | Path,
    *,
    split: str | None = None,
    seed: int | None = None,
    workers: int = 1,
    progress: bool | None = None,
    paraphrased: bool = False,
    twin: str | None = None,
    edge_pairs: int = 0,
) -> None:
    """Write `scenes` into `out_dir`: images first, the JSON files last (each by temp file and
    rename, after removing old ones), so no JSON ever names an image that is not there.
    `progress=None` shows a bar only on a terminal; `paraphrased` also writes the questions
    reworded (`PARAPHRASED`); `twin` ("reword" or "vary", TWINS) gives each question a twin in
    other words (`_wordings`); `edge_pairs` is recorded in the files' info (how many of the
    scenes, the last ones, are `edge_pair_scenes`)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if twin is not None and twin not in TWINS:
        raise ValueError(f"twin must be one of {sorted(TWINS)} or None, got {twin!r}")
    out_dir = Path(out_dir)
    split = split or out_dir.name
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for name in (*JSON_FILES, PARAPHRASED):
        (out_dir / name).unlink(missing_ok=True)

    disable = None if progress is None else not progress  # tqdm: None means "not on a terminal"
    bar = dict(total=len(scenes), desc=f"{split} images", disable=disable, leave=False)
    if workers == 1 or len(scenes) < 64:
        records = list(tqdm(map(_render_scene, scenes, repeat(images_dir)), **bar))
    else:
        spawn = multiprocessing.get_context("spawn")  # forking a threaded parent is unsafe
        with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
            jobs = pool.map(_render_scene, scenes, repeat(images_dir), chunksize=32)
            records = list(tqdm(jobs, **bar))
    wanted = {s.file_name for s in scenes}
    for path in images_dir.iterdir():  # images of an earlier, larger run into this folder
        if _IMAGE_NAME.match(path.name) and path.name not in wanted:
            path.unlink()

    size = scenes[0].size if scenes else None
    info = {"description": "shapes world (captioner.data.shapes)", "version": "1.0", "split": split}
    info.update(seed=seed, split_seed=None if seed is None else split_seed(seed, split))
    info.update(image_size=size, images=len(scenes))
    if edge_pairs:
        info.update(edge_pairs=edge_pairs)
    images = [
        {"id": s.image_id, "file_name": s.file_name, "width": s.size, "height": s.size}
        for s in scenes
    ]
    questions, answers = _vqa_records(scenes, twin)
    vqa = {"task_type": "Open-Ended", "data_type": "shapes", "data_subtype": split}
    objects = [{"image_id": img["id"], **img, "objects": rec} for img, rec in zip(images, records)]
    _write_json(out_dir / "objects.json", {"info": info, "images": objects})
    asked = info if twin is None else {**info, "wording": TWINS[twin][1]}
    _write_json(out_dir / "questions.json", {"info": asked, **vqa, "questions": questions})
    _write_json(out_dir / "annotations.json", {"info": asked, **vqa, "annotations": answers})
    if paraphrased:
        para = {**info, "wording": "paraphrased (captioner.data.paraphrase)"}
        questions = paraphrased_records(scenes)
        _write_json(out_dir / PARAPHRASED, {"info": para, **vqa, "questions": questions})
    captions = [
        {"id": s.image_id * 10 + k, "image_id": s.image_id, "caption": c}
        for s in scenes
        for k, c in enumerate(s.captions)
    ]
    coco = {"info": info, "licenses": [], "images": images, "annotations": captions}
    _write_json(out_dir / "captions.json", coco)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Generate the shapes-world dataset: PNG images with COCO-format captions, "
        "VQA v2-format questions and answers, and per-object COCO RLE masks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (one subfolder per split)"
    )
    parser.add_argument("--train", type=int, default=1000, help="number of training images")
    parser.add_argument("--val", type=int, default=200, help="number of validation images")
    parser.add_argument("--test", type=int, default=200, help="number of test images")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    parser.add_argument("--size", type=int, default=128, help="image width and height in pixels")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes that draw and save the images"
    )
    parser.add_argument(
        "--paraphrase",
        action="store_true",
        help=f"also write {PARAPHRASED} per split: every question reworded in words the "
        "generated questions never use, with the same question ids, so annotations.json "
        "scores it (captioner.data.paraphrase lists the substitutions)",
    )
    twins = parser.add_mutually_exclusive_group()
    twins.add_argument(
        "--reword-train",
        action="store_const",
        const="reword",
        dest="twin",
        help="give each training question a twin in another word order of the generator's own "
        "words (captioner.data.paraphrase.reword), same answer; val and test stay as generated",
    )
    twins.add_argument(
        "--vary-train",
        action="store_const",
        const="vary",
        dest="twin",
        help="give each training question a twin in other sentence structures and everyday words "
        "that no paraphrase uses (captioner.data.paraphrase.vary), same answer; val and test "
        "stay as generated",
    )
    parser.add_argument(
        "--edge-pairs",
        type=int,
        default=0,
        help="add this many training scenes of two distinct objects near the edge of the "
        "relation rule (the minor offset 0.3 to 0.7 times the major one; the rule wants at most "
        "0.5), after the --train scenes; val and test stay as generated",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    for split in SPLITS:
        n = getattr(args, split)
        if not 0 <= n < IDS_PER_SPLIT:
            raise ValueError(f"--{split} must be in 0..{IDS_PER_SPLIT - 1}, got {n}")
    if not 0 <= args.edge_pairs < IDS_PER_SPLIT - args.train:
        raise ValueError(
            f"--edge-pairs must be in 0..{IDS_PER_SPLIT - 1 - args.train}, got {args.edge_pairs}"
        )
    for split in SPLITS:
        n = getattr(args, split)
        scenes = generate_split(n, split_seed(args.seed, split), args.size, first_id(split))
        edge = args.edge_pairs if split == "train" else 0
        scenes += edge_pair_scenes(
            edge, split_seed(args.seed, split), args.size, first_id(split) + n
        )
        write_split(
            scenes,
            args.out / split,
            split=split,
            seed=args.seed,
            workers=args.workers,
            paraphrased=args.paraphrase,
            twin=args.twin if split == "train" else None,
            edge_pairs=edge,
        )
        print(f"{split}: {n + edge} images -> {args.out / split}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
