"""VQA v2 reading (questions + annotations + image folder), answer vocabulary, soft targets, and
the easy-VQA conversion read back through the same path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from captioner.data.vqa_data import build_answer_vocab, load_vqa, soft_targets
from tests.conftest import assert_umask_modes
from training import make_easy_vqa


def write_png(path: Path, color: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def vqa_pair(entries: list[tuple[int, int, str, list[str]]], subtype: str = "val2014") -> tuple:
    """(questions, annotations) dicts from (question id, image id, question, ten answers)."""
    questions = {
        "data_subtype": subtype,
        "questions": [{"question_id": q, "image_id": i, "question": t} for q, i, t, _ in entries],
    }
    annotations = {
        "annotations": [
            {
                "question_id": q,
                "image_id": i,
                "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)],
                "multiple_choice_answer": max(answers, key=answers.count),
                "answer_type": "yes/no" if answers[0] in ("yes", "no") else "other",
                "question_type": " ".join(t.split()[:2]),
            }
            for q, i, t, answers in entries
        ]
    }
    return questions, annotations


def write_pair(tmp_path: Path, questions, annotations) -> tuple[Path, Path]:
    q_path, a_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    q_path.write_text(json.dumps(questions))
    a_path.write_text(json.dumps(annotations))
    return q_path, a_path


ENTRIES = [
    (10, 1, "what color is it?", ["red"] * 8 + ["Red."] * 2),
    (11, 1, "is it red?", ["yes"] * 10),
    (20, 2, "what is it?", ["circle"] * 2 + ["ball"] * 8),
    (30, 3, "what shape?", ["square"] * 10),
    (40, 4, "how many?", ["two"] * 3 + ["2"] * 7),
    (50, 5, "is it there?", ["no"] * 10),  # image 5 has no file
]


@pytest.fixture
def tiny_vqa(tmp_path):
    images = tmp_path / "images"
    write_png(images / "COCO_val2014_000000000001.jpg")  # a PNG under a COCO name is fine here
    write_png(images / "000000000002.png")
    write_png(images / "3.png")
    write_png(images / "shot_000000000004.png")  # found by its zero-padded id suffix
    write_png(images / "000000000099.png")  # an image no question asks about
    q_path, a_path = write_pair(tmp_path, *vqa_pair(ENTRIES))
    return q_path, a_path, images


def _image_paths(split) -> dict:
    """Image id -> file, for the images the split's questions use."""
    return {item.image_id: item.image_path for item in split.items}


def test_load_vqa_joins_finds_images_and_skips_missing(tiny_vqa):
    q_path, a_path, images = tiny_vqa
    split = load_vqa(q_path, a_path, images)
    assert split.skipped_missing_image == 1
    assert [item.question_id for item in split.items] == [10, 11, 20, 30, 40]
    assert {i: p.name for i, p in _image_paths(split).items()} == {
        1: "COCO_val2014_000000000001.jpg",
        2: "000000000002.png",
        3: "3.png",
        4: "shot_000000000004.png",
    }
    first = split.items[0]
    assert first.question == "what color is it?"
    assert first.answers == ["red"] * 8 + ["Red."] * 2
    assert (first.multiple_choice_answer, first.answer_type, first.question_type) == (
        "red",
        "other",
        "what color",
    )


def test_load_vqa_with_an_image_name_function(tiny_vqa):
    q_path, a_path, images = tiny_vqa
    split = load_vqa(q_path, a_path, images, image_name=lambda i: f"{i}.png")
    assert [item.image_id for item in split.items] == [3]
    assert split.skipped_missing_image == 5


def test_missing_and_malformed_files_raise(tmp_path, tiny_vqa):
    q_path, a_path, images = tiny_vqa
    with pytest.raises(ValueError, match="questions file not found: .*nope.json"):
        load_vqa(tmp_path / "nope.json", a_path, images)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_vqa(q_path, bad, images)
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(
        ValueError, match="bad.json must be a JSON object whose 'annotations' is a list"
    ):
        load_vqa(q_path, bad, images)
    with pytest.raises(ValueError, match="image folder not found"):
        load_vqa(q_path, a_path, tmp_path / "no-images")


def test_malformed_records_raise(tmp_path, tiny_vqa):
    _, _, images = tiny_vqa
    questions, annotations = vqa_pair(ENTRIES)
    del annotations["annotations"][2]["answer_type"]
    with pytest.raises(ValueError, match="question 20: field 'answer_type' is None"):
        load_vqa(*write_pair(tmp_path, questions, annotations), images)

    questions, annotations = vqa_pair(ENTRIES)
    annotations["annotations"][0]["answers"] = [{"text": "red"}]
    with pytest.raises(ValueError, match="question 10: answers must be"):
        load_vqa(*write_pair(tmp_path, questions, annotations), images)

    questions, annotations = vqa_pair(ENTRIES)
    questions["questions"][1]["question_id"] = "11"
    with pytest.raises(ValueError, match="field 'question_id' is '11'"):
        load_vqa(*write_pair(tmp_path, questions, annotations), images)

    questions, annotations = vqa_pair(ENTRIES)
    del annotations["annotations"][3:5]
    with pytest.raises(ValueError, match="no annotation for 2 question.*: 30, 40"):
        load_vqa(*write_pair(tmp_path, questions, annotations), images)


def test_answer_vocab_normalises_and_breaks_ties_alphabetically(tiny_vqa):
    items = load_vqa(*tiny_vqa).items
    # multiple-choice answers: red, yes, ball, square, 2 (all once; normalised as predictions are)
    assert build_answer_vocab(items, top_k=10) == ["2", "ball", "red", "square", "yes"]
    twice = items + items[:2]
    assert build_answer_vocab(twice, top_k=3) == ["red", "yes", "2"]
    with pytest.raises(ValueError, match="top_k must be a positive integer, got 0"):
        build_answer_vocab(items, top_k=0)


def test_soft_targets_are_the_leave_one_out_scores():
    index = {"2": 0, "red": 1, "ball": 2, "circle": 3}
    # "two" and "Two." normalise to "2": 4 votes -> 1.0
    assert soft_targets(["two"] * 3 + ["Two."] + ["x"] * 6, index) == {0: 1.0}
    assert soft_targets(["ball"] * 7 + ["circle"] * 2 + ["red"], index) == {2: 1.0, 3: 0.6, 1: 0.3}
    assert soft_targets(["circle"] * 3 + ["blue"] * 7, index) == {3: 0.9}
    assert soft_targets(["blue"] * 10, index) == {}
    with pytest.raises(ValueError, match="non-empty"):
        soft_targets([], index)


def test_make_easy_vqa_converts_and_load_vqa_reads_it(tmp_path):
    args = make_easy_vqa.get_args_parser().parse_args(["--out", str(tmp_path / "easy")])
    counts = make_easy_vqa.main(args)
    assert counts == {
        "train": {"images": 4000, "questions": 38575},
        "test": {"images": 1000, "questions": 9673},
    }
    test_dir = tmp_path / "easy" / "test"
    split = load_vqa(
        test_dir / "questions.json", test_dir / "annotations.json", test_dir / "images"
    )
    assert len(split) == 9673 and split.skipped_missing_image == 0
    assert len({item.image_id for item in split.items}) == 1000

    info = json.loads((test_dir / "questions.json").read_text())["info"]
    train_ids = {int(p.stem) for p in (tmp_path / "easy" / "train" / "images").glob("*.png")}
    assert len(train_ids) == 4000 and not train_ids & set(_image_paths(split))
    original = info["original_image_ids"]
    assert sorted(original.values()) == list(range(1000))
    assert {int(k) for k in original} == set(_image_paths(split))

    colors = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
    for item in split.items:
        assert item.answers == [item.multiple_choice_answer] * 10
        yes_no = item.multiple_choice_answer in ("yes", "no")
        assert item.answer_type == ("yes/no" if yes_no else "other")
        expected = (
            "yes/no" if yes_no else "color" if item.multiple_choice_answer in colors else "shape"
        )
        assert item.question_type == expected, item.question
    assert build_answer_vocab(split.items, top_k=20)[:2] == ["yes", "no"]
    assert len(build_answer_vocab(split.items, top_k=20)) == 13


def test_make_easy_vqa_files_get_the_modes_the_umask_implies(tmp_path, umask):
    """The JSON files were chmod 0o644 whatever the umask; copied images follow it too."""
    source = tmp_path / "source" / "train"
    (source / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(source / "images" / "0.png")
    (source / "questions.json").write_text(json.dumps([["what color is the shape?", "red", 0]]))
    counts = make_easy_vqa.convert_split(
        "train", tmp_path / "easy", source=tmp_path / "source", copy=True
    )
    assert counts == {"images": 1, "questions": 1}
    assert_umask_modes(umask, tmp_path / "easy")
