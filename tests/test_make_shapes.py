import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from captioner.data.shapes import RGB, decode_mask, generate_split, score_caption
from tests.conftest import assert_umask_modes
from training import evaluate_vqa
from training.make_shapes import PARAPHRASED, SPLITS, get_args_parser, main, write_split

ROOT = Path(__file__).resolve().parent.parent

JSON_FILES = ("captions.json", "questions.json", "annotations.json", "objects.json")


def make(out, *extra):
    argv = ["--out", str(out), "--train", "3", "--val", "2", "--test", "0", "--size", "64"]
    main(get_args_parser().parse_args([*argv, *extra]))


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make(out, "--seed", "5")
    return out


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_writes_every_file_of_every_split(dataset):
    for split, n in zip(SPLITS, (3, 2, 0)):
        for name in JSON_FILES:
            assert (dataset / split / name).is_file()
        assert len(list((dataset / split / "images").glob("*.png"))) == n


def test_captions_are_coco_format(dataset):
    coco = COCO(str(dataset / "train" / "captions.json"))
    assert len(coco.getImgIds()) == 3
    for image_id in coco.getImgIds():
        image = coco.loadImgs(image_id)[0]
        assert image["width"] == image["height"] == 64
        with Image.open(dataset / "train" / "images" / image["file_name"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert len(coco.getAnnIds(imgIds=image_id)) >= 5
    info = load(dataset / "train" / "captions.json")["info"]
    assert info["seed"] == 5 and info["split"] == "train"


def test_questions_and_answers_are_vqa_v2_format(dataset):
    for split in ("train", "val"):
        questions = load(dataset / split / "questions.json")
        answers = load(dataset / split / "annotations.json")
        assert questions["data_subtype"] == split and questions["task_type"] == "Open-Ended"
        assert [q["question_id"] for q in questions["questions"]] == [
            a["question_id"] for a in answers["annotations"]
        ]
        assert len(questions["questions"]) >= 6 * (3 if split == "train" else 2)
        for q, a in zip(questions["questions"], answers["annotations"]):
            assert q["image_id"] == a["image_id"] and q["question"].endswith("?")
            assert a["question_type"] in {"color", "shape", "count", "exist", "relation"}
            assert a["answer_type"] in {"yes/no", "number", "other"}
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
            assert {x["answer_confidence"] for x in a["answers"]} == {"yes"}


def test_object_masks_decode_to_the_objects_pixels(dataset):
    captions = COCO(str(dataset / "train" / "captions.json"))
    for image in load(dataset / "train" / "objects.json")["images"]:
        with Image.open(dataset / "train" / "images" / image["file_name"]) as im:
            pixels = np.asarray(im, dtype=int)
        for obj in image["objects"]:
            mask = decode_mask(obj["mask"])  # (H, W)
            assert mask.sum() == obj["area"] > 0
            assert np.abs(pixels[mask] - RGB[obj["color"]]).max() <= 4
            ys, xs = np.nonzero(mask)
            x, y, w, h = obj["bbox"]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert mask[obj["center"][1], obj["center"][0]]
        for ann in captions.loadAnns(captions.getAnnIds(imgIds=image["image_id"])):
            assert score_caption(ann["caption"], image["objects"]) == (len(image["objects"]), True)


def test_same_seed_gives_identical_bytes_other_seed_differs(dataset, tmp_path):
    make(tmp_path / "again", "--seed", "5")
    assert files(tmp_path / "again") == files(dataset)
    make(tmp_path / "other", "--seed", "6")
    other, same = files(tmp_path / "other"), files(dataset)
    for name in ("train/captions.json", "train/images/000000000001.png"):
        assert other[Path(name)] != same[Path(name)]


def test_splits_do_not_depend_on_each_other(dataset, tmp_path):
    main(get_args_parser().parse_args(["--out", str(tmp_path), "--train", "1", "--val", "2",
                                       "--test", "0", "--size", "64", "--seed", "5"]))  # fmt: skip
    assert files(tmp_path / "val") == files(dataset / "val")
    ids = [
        img["id"] for split in SPLITS for img in load(dataset / split / "captions.json")["images"]
    ]
    assert len(ids) == len(set(ids)) == 5


def test_empty_split_is_valid(dataset):
    coco = COCO(str(dataset / "test" / "captions.json"))
    assert coco.getImgIds() == []
    assert load(dataset / "test" / "questions.json")["questions"] == []
    assert load(dataset / "test" / "annotations.json")["annotations"] == []
    assert load(dataset / "test" / "objects.json")["images"] == []


def test_rewriting_a_folder_removes_what_the_new_split_does_not_name(tmp_path):
    write_split(generate_split(3, seed=1, size=32), tmp_path)
    write_split(generate_split(1, seed=1, size=32), tmp_path)
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["000000000001.png"]
    assert len(load(tmp_path / "captions.json")["images"]) == 1


def test_worker_processes_write_the_same_files(tmp_path):
    scenes = generate_split(64, seed=2, size=32)
    write_split(scenes, tmp_path / "one", split="train", workers=1)
    write_split(scenes, tmp_path / "two", split="train", workers=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_files_get_the_modes_the_umask_implies(tmp_path, umask):
    make(tmp_path / "shapes", "--train", "2", "--val", "1", "--size", "32")
    assert (tmp_path / "shapes" / "test" / "captions.json").is_file()
    assert_umask_modes(umask, tmp_path / "shapes")


def test_help_and_bad_counts(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        get_args_parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--train" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--val"):
        main(get_args_parser().parse_args(["--out", str(tmp_path), "--val", "-1"]))
    with pytest.raises(ValueError, match="workers"):
        write_split([], tmp_path, workers=0)


def test_paraphrase_writes_the_questions_reworded_with_the_same_ids(dataset, tmp_path):
    make(tmp_path / "para", "--seed", "5", "--paraphrase")
    written = files(tmp_path / "para")
    reworded = {p for p in written if p.name == PARAPHRASED}
    assert reworded == {Path(split) / PARAPHRASED for split in SPLITS}
    rest = {p: b for p, b in written.items() if p not in reworded}
    assert rest == files(dataset)  # every other file as without the flag
    for split in ("train", "val"):
        canonical = load(dataset / split / "questions.json")
        para = load(tmp_path / "para" / split / PARAPHRASED)
        assert para["info"]["wording"].startswith("paraphrased")
        assert {k: v for k, v in para.items() if k not in ("info", "questions")} == {
            k: v for k, v in canonical.items() if k not in ("info", "questions")
        }
        pairs = list(zip(canonical["questions"], para["questions"], strict=True))
        assert all(
            c["question_id"] == p["question_id"] and c["image_id"] == p["image_id"]
            for c, p in pairs
        )
        assert all(c["question"] != p["question"] for c, p in pairs)
    make(tmp_path / "again", "--seed", "5", "--paraphrase")
    assert files(tmp_path / "again") == written
    make(tmp_path / "para", "--seed", "5")  # rewritten without the flag: no stale rewording left
    assert files(tmp_path / "para") == files(dataset)


@pytest.mark.parametrize("flag", ["--reword-train", "--vary-train"])
def test_a_twin_option_adds_a_twin_per_training_question_and_nothing_else(flag, dataset, tmp_path):
    make(tmp_path / "rw", "--seed", "5", flag)
    written = files(tmp_path / "rw")
    changed = {p for p, b in written.items() if files(dataset).get(p) != b}
    assert changed == {Path("train") / "questions.json", Path("train") / "annotations.json"}
    before = load(dataset / "train" / "questions.json")["questions"]
    after = load(tmp_path / "rw" / "train" / "questions.json")["questions"]
    by_id = {q["question_id"]: q for q in after}
    assert len(after) == 2 * len(before) == len(by_id)
    answers = {a["question_id"]: a for a in load(tmp_path / "rw" / "train" / "annotations.json")["annotations"]}  # fmt: skip
    for q in before:
        twin = by_id[q["question_id"] + 50]
        assert by_id[q["question_id"]] == q and twin["image_id"] == q["image_id"]
        assert twin["question"] != q["question"]
        a, b = answers[q["question_id"]], answers[twin["question_id"]]
        assert {**a, "question_id": None} == {**b, "question_id": None}
    rewrite = {"--reword-train": "reword", "--vary-train": "vary"}[flag]
    info = load(tmp_path / "rw" / "train" / "questions.json")["info"]
    assert f"captioner.data.paraphrase.{rewrite}" in info["wording"]
    make(tmp_path / "rw", "--seed", "5")  # rewritten without the flag: no twin left
    assert files(tmp_path / "rw") == files(dataset)


def test_edge_pairs_add_training_scenes_after_the_others_and_nothing_else(dataset, tmp_path):
    make(tmp_path / "edge", "--seed", "5", "--edge-pairs", "4")
    for split in ("val", "test"):
        assert files(tmp_path / "edge" / split) == files(dataset / split)
    before = load(dataset / "train" / "objects.json")
    after = load(tmp_path / "edge" / "train" / "objects.json")
    assert after["info"]["edge_pairs"] == 4 and after["info"]["images"] == 7
    assert after["images"][:3] == before["images"]  # the --train scenes are unchanged
    added = after["images"][3:]
    assert [im["id"] for im in added] == [before["images"][-1]["id"] + k for k in range(1, 5)]
    assert all(len(im["objects"]) == 2 for im in added)
    captions = load(tmp_path / "edge" / "train" / "captions.json")
    assert {a["image_id"] for a in captions["annotations"]} == {im["id"] for im in after["images"]}
    with pytest.raises(ValueError, match="--edge-pairs"):
        make(tmp_path / "bad", "--edge-pairs", "-1")


def test_one_twin_per_question_at_most(tmp_path, capsys):
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["--out", str(tmp_path), "--reword-train", "--vary-train"])
    assert "not allowed with argument" in capsys.readouterr().err
    scenes = generate_split(2, seed=5, size=32)
    with pytest.raises(ValueError, match="twin must be one of"):
        write_split(scenes, tmp_path / "train", twin="paraphrase")
    assert not (tmp_path / "train" / "questions.json").exists()


def test_evaluate_vqa_scores_the_paraphrased_questions(tmp_path):
    out = tmp_path / "shapes"
    main(get_args_parser().parse_args(["--out", str(out), "--train", "0", "--val", "0", "--test", "4",
                                       "--size", "64", "--seed", "7", "--paraphrase"]))  # fmt: skip
    test = out / "test"
    scores = {}
    for name in ("questions.json", PARAPHRASED):
        args = evaluate_vqa.get_args_parser().parse_args(
            ["--model", str(ROOT / "models" / "shapes-vqa"), "--questions", str(test / name),
             "--annotations", str(test / "annotations.json"), "--images", str(test / "images"),
             "--no-progress"]
        )  # fmt: skip
        scores[name] = evaluate_vqa.main(args)
    n = len(load(test / "questions.json")["questions"])
    for metrics in scores.values():
        assert metrics["n"] == n and metrics["skipped_missing_image"] == 0
        assert set(metrics["per_question_type"]) <= {"color", "shape", "count", "exist", "relation"}
    assert scores["questions.json"]["accuracy"] > 0.8  # the demo model on its own wording
