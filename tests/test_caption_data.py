import json

import pytest
import torch
from PIL import Image

from captioner.data.caption_data import (
    drop_unreadable,
    encode_captions,
    load_coco_captions,
    load_karpathy,
)
from captioner.data.images import ImageTensors, list_images
from captioner.image import load_image, preprocess
from captioner.vocab import Vocabulary


def _coco(tmp_path, names=("a.png", "b.png", "gone.png")):
    images = tmp_path / "images"
    images.mkdir()
    for i, name in enumerate(names[:2]):
        Image.new("RGB", (20, 10), (i * 100, 50, 50)).save(images / name)
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 20, "height": 10} for i, n in enumerate(names)
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "a red thing"},
            {"id": 2, "image_id": 1, "caption": "a thing in red"},
            {"id": 3, "image_id": 2, "caption": "a green thing"},
            {"id": 4, "image_id": 3, "caption": "missing image"},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(data))
    return tmp_path / "captions.json", images


def test_coco_captions_are_grouped_and_missing_images_counted(tmp_path):
    captions, images = _coco(tmp_path)
    data = load_coco_captions(captions, images)
    assert [r.image_id for r in data.records] == [1, 2]
    assert data.records[0].captions == ["a red thing", "a thing in red"]
    assert data.skipped_missing == 1


def test_bad_coco_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_coco_captions(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_coco_captions(tmp_path / "bad.json", tmp_path)
    (tmp_path / "odd.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="annotations"):
        load_coco_captions(tmp_path / "odd.json", tmp_path)


def test_karpathy_splits_include_restval_in_train(tmp_path):
    (tmp_path / "val2014").mkdir()
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "val2014" / name)
    items = [
        {
            "filepath": "val2014",
            "filename": "x.jpg",
            "split": "train",
            "cocoid": 1,
            "sentences": [{"raw": "A x."}],
        },
        {
            "filepath": "val2014",
            "filename": "y.jpg",
            "split": "restval",
            "cocoid": 2,
            "sentences": [{"raw": "A y."}],
        },
        {
            "filepath": "val2014",
            "filename": "z.jpg",
            "split": "test",
            "cocoid": 3,
            "sentences": [{"raw": "A z."}],
        },
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": items}))
    train = load_karpathy(tmp_path / "dataset_coco.json", tmp_path, "train")
    test = load_karpathy(tmp_path / "dataset_coco.json", tmp_path, "test")
    assert [r.image_id for r in train.records] == [1, 2]
    assert [r.captions for r in test.records] == [["A z."]]
    with pytest.raises(ValueError, match="split"):
        load_karpathy(tmp_path / "dataset_coco.json", tmp_path, "dev")


def test_unreadable_images_are_dropped_with_a_count_and_tensors_match_preprocess(tmp_path):
    captions, images = _coco(tmp_path)
    (images / "b.png").write_text("not a png")
    data = load_coco_captions(captions, images)
    tensors = ImageTensors([r.path for r in data.records], 16)
    kept = drop_unreadable(data, tensors)
    assert [r.image_id for r in kept.records] == [1]
    assert len(kept.skipped_unreadable) == 1 and "b.png" in kept.skipped_unreadable[0]
    torch.testing.assert_close(tensors.batch([0])[0], preprocess(load_image(images / "a.png"), 16))


def test_encode_captions_pads_and_cuts():
    vocab = Vocabulary.build(["a b c d"])
    ids = encode_captions(["a b c d", "a"], vocab, max_tokens=3)
    s, e, p = vocab.start_id, vocab.end_id, vocab.pad_id
    a, b, c = vocab.stoi["a"], vocab.stoi["b"], vocab.stoi["c"]
    assert ids.tolist() == [[s, a, b, c, e], [s, a, e, p, p]]


def test_list_images_filters_by_suffix(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.JPG", format="JPEG")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png"]
