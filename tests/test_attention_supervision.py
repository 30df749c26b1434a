"""Attention correctness (train_captioner --supervise-attention): the target cells read from the
shapes objects, the loss that draws a word's attention onto them, and training runs with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.caption.attention import supervised_attention_loss
from captioner.caption.captioner import Captioner
from captioner.data.caption_data import encode_captions, load_coco_captions
from captioner.data.shapes import encode_mask, generate_split
from captioner.evaluation.caption_scores import read_objects
from captioner.evaluation.grounding import attention_targets, count_targets, grounding
from captioner.results import CaptionResult
from captioner.vocab import Vocabulary, tokenize
from tests.conftest import TINY_CAPTIONS, TINY_TRAINING, tiny_model, write_tiny_shapes
from training import train_captioner
from training.make_shapes import write_split
from training.train_captioner import caption_attention_targets


def _object(color: str, shape: str, rows: slice, cols: slice) -> dict:
    mask = np.zeros((4, 4), dtype=bool)
    mask[rows, cols] = True
    return {"size": "small", "color": color, "shape": shape, "mask": encode_mask(mask)}


SCENE = [
    _object("red", "circle", slice(0, 2), slice(0, 2)),  # cell (0, 0) of a 2 x 2 grid
    _object("blue", "square", slice(2, 4), slice(0, 4)),  # cells (1, 0) and (1, 1)
]


def test_targets_are_the_cells_grounding_counts_as_right():
    tokens = ["a", "red", "circle", "and", "two", "blue", "squares", "green"]
    targets = attention_targets(tokens, SCENE, (2, 2))
    assert targets.shape == (8, 4) and targets.dtype == bool
    assert targets[1].tolist() == targets[2].tolist() == [True, False, False, False]
    assert targets[5].tolist() == targets[6].tolist() == [False, False, True, True]
    assert not targets[[0, 3, 4, 7]].any()  # not colour/shape words, or no green object
    # attention peaking on a target cell is what grounding calls grounded, and only that
    for t in (1, 2, 5, 6):
        for cell in range(4):
            attention = np.zeros((1, 2, 2))
            attention[0, cell // 2, cell % 2] = 1.0
            one = CaptionResult(tokens[t], [tokens[t]], [0.0], 0.0, attention)
            grounded = grounding({1: one}, {1: SCENE}, (2, 2))["grounding"]
            assert grounded == float(targets[t, cell]), (tokens[t], cell)


def test_count_words_target_every_object_their_phrase_names():
    twins = [
        SCENE[0],
        {**SCENE[1], "size": "large"},
        _object("red", "circle", slice(0, 2), slice(2, 4)),  # cell (0, 1): a second red circle
    ]
    tokens = tokenize("a picture of two small red circles and a blue square that is large")
    targets = count_targets(tokens, twins, (2, 2))
    assert targets.shape == (len(tokens), 4)
    assert targets[3].tolist() == [True, True, False, False]  # "two": both red circles
    assert targets[8].tolist() == [False, False, True, True]  # "a": the square, size after it
    others = [t for t in range(len(tokens)) if t not in (3, 8)]
    assert not targets[others].any()  # "a picture" names nothing
    # a size or colour no object has: no cell; a phrase naming only the shape: every such object
    assert not count_targets(tokenize("two large red circles"), twins, (2, 2)).any()
    assert not count_targets(tokenize("a green square"), twins, (2, 2)).any()
    circles = count_targets(tokenize("three circles"), twins, (2, 2))
    assert circles[0].tolist() == [True, True, False, False]
    # beside the colour and shape words' targets, which they do not change
    words = attention_targets(tokens, twins, (2, 2))
    assert not (words & targets).any()


def test_each_copy_targets_give_each_counted_object_its_own_bit():
    twins = [SCENE[0], SCENE[1], _object("red", "circle", slice(0, 2), slice(2, 4))]
    tokens = tokenize("two red circles and a blue square")
    copies = count_targets(tokens, twins, (2, 2), each_copy=True)
    assert copies.dtype == np.uint8
    assert copies[0].tolist() == [1, 2, 0, 0]  # "two": the first circle bit 0, the second bit 1
    assert copies[4].tolist() == [0, 0, 1, 1]  # "a": one square, bit 0
    assert ((copies != 0) == count_targets(tokens, twins, (2, 2))).all()
    both = attention_targets(tokens, twins, (2, 2), counts=True, each_copy=True)
    assert both.dtype == np.uint8 and both[2].tolist() == [1, 1, 0, 0]  # "circles": plain cells
    assert ((both != 0) == attention_targets(tokens, twins, (2, 2), counts=True)).all()
    many = count_targets(tokenize("three red circles"), [SCENE[0]] * 9, (2, 2), each_copy=True)
    assert many[0].tolist() == [255, 0, 0, 0]  # copies 8 and 9 share the last bit


def test_each_copy_loss_asks_for_attention_on_every_copy():
    targets = torch.tensor([[[1, 2, 0, 0], [0, 0, 1, 1]]], dtype=torch.uint8)  # two words, 4 cells
    one_copy = torch.tensor([[[0.97, 0.01, 0.01, 0.01], [0.1, 0.1, 0.4, 0.4]]])
    split = torch.tensor([[[0.49, 0.49, 0.01, 0.01], [0.1, 0.1, 0.4, 0.4]]])
    for alphas in (one_copy, split):  # the mean over copies of minus the log of each copy's mass
        copies = -(alphas[0, 0, 0].log() + alphas[0, 0, 1].log()) / 2
        expected = (copies - alphas[0, 1, 2:].sum().log()) / 2
        assert float(supervised_attention_loss(alphas, targets)) == pytest.approx(float(expected))
    assert supervised_attention_loss(split, targets) < supervised_attention_loss(one_copy, targets)
    plain = targets != 0  # the bool loss only asks for the mass on any copy: it prefers neither
    assert float(supervised_attention_loss(one_copy, plain)) == pytest.approx(
        float(supervised_attention_loss(split, plain))
    )
    ones = torch.tensor([[[1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.uint8)  # 0/1: the bool figure
    assert float(supervised_attention_loss(split, ones)) == pytest.approx(
        float(supervised_attention_loss(split, ones.bool()))
    )
    assert supervised_attention_loss(split, torch.zeros_like(targets)) == 0.0


def test_the_loss_draws_attention_onto_the_target_cells_and_ignores_free_words():
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=2)
    L = net.decoder.config.grid_cells
    features = torch.randn(2, L, net.decoder.config.feature_dim)
    captions = torch.tensor([vocab.encode(TINY_CAPTIONS[0]), vocab.encode(TINY_CAPTIONS[0])])
    steps = captions.shape[1] - 1
    targets = torch.zeros(2, steps, L, dtype=torch.bool)
    targets[0, 2, [3, 4]] = True  # the word at step 2 of caption 0 should look at cells 3 and 4
    with torch.no_grad():
        _, _, alphas = net.decoder(features, captions)
        assert supervised_attention_loss(alphas, torch.zeros_like(targets)) == 0.0
        assert float(supervised_attention_loss(alphas, targets)) == pytest.approx(
            float(-alphas[0, 2, [3, 4]].sum().log()), rel=1e-5
        )

    def mass() -> float:
        with torch.no_grad():
            return float(net.decoder(features, captions)[2][0, 2, [3, 4]].sum())

    before = mass()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(20):
        _, _, alphas = net.decoder(features, captions)
        loss = supervised_attention_loss(alphas, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert mass() > max(0.5, 2 * before), (before, mass())
    with torch.no_grad():
        with_term = net(features, captions, attention_targets=targets, attention_weight=2.0)[1]
        without = net(features, captions)[1]
        _, _, alphas = net.decoder(features, captions)
    assert float(with_term - without) == pytest.approx(
        2.0 * float(supervised_attention_loss(alphas, targets)), rel=1e-4
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_tiny_shapes(tmp_path_factory.mktemp("shapes"))


def _run(argv):
    return train_captioner.main(train_captioner.get_args_parser().parse_args(argv), argv)


def test_training_with_supervised_attention_raises_the_attention_on_named_objects(shapes, tmp_path):
    common = ["--data", str(shapes), "--epochs", "4", "--val-limit", "2", *TINY_TRAINING]
    common += ["--lr", "0.01", "--seed", "1"]
    plain = _run([*common, "--out", str(tmp_path / "plain")])
    supervised = _run([*common, "--out", str(tmp_path / "sup"), "--supervise-attention", "3"])
    args = json.loads((tmp_path / "sup" / "args.json").read_text())
    assert args["supervise_attention"] == 3.0
    assert args["train_objects"] == str(shapes / "train" / "objects.json")
    # the same seed and schedule: attention on the named objects of the training scenes rises
    assert plain["step"] == supervised["step"]
    sup = _named_mass(tmp_path / "sup" / "last", shapes)
    base = _named_mass(tmp_path / "plain" / "last", shapes)
    assert sup > 1.5 * base, (sup, base)


def test_count_targets_draw_the_count_words_attention_onto_their_objects(shapes, tmp_path):
    common = ["--data", str(shapes), "--epochs", "8", "--val-limit", "2", *TINY_TRAINING]
    common += ["--lr", "0.01", "--seed", "1", "--supervise-attention", "3", "--attention-mass"]
    _run([*common, "--out", str(tmp_path / "words")])
    _run([*common, "--out", str(tmp_path / "counts"), "--supervise-counts"])
    assert json.loads((tmp_path / "counts" / "args.json").read_text())["supervise_counts"]
    each = [*common, "--out", str(tmp_path / "copies"), "--supervise-counts", "--count-each-copy"]
    _run([*each, "--epochs", "1"])
    assert json.loads((tmp_path / "copies" / "args.json").read_text())["count_each_copy"]
    counted = _named_mass(tmp_path / "counts" / "last", shapes, counts=True)
    free = _named_mass(tmp_path / "words" / "last", shapes, counts=True)
    assert counted > 1.5 * free, (counted, free)


def _named_mass(folder, shapes, counts: bool = False) -> float:
    """Mean attention (teacher-forced) of the colour and shape words of the training split's
    first references on the cells of the objects they name; with `counts`, that of the count
    words on the objects of their phrase."""
    captioner = Captioner.load(folder)
    data = load_coco_captions(shapes / "train" / "captions.json", shapes / "train" / "images")
    objects = read_objects(shapes / "train" / "objects.json")
    vocab = captioner.vocab
    texts = [r.captions[0] for r in data.records]
    captions = encode_captions(texts, vocab, max_tokens=24)
    targets = caption_attention_targets(
        captions,
        [r.image_id for r in data.records],
        objects,
        vocab,
        captioner.model.grid_hw,
        counts=counts,
    )
    if counts:  # only the count words' targets
        targets &= ~caption_attention_targets(
            captions, [r.image_id for r in data.records], objects, vocab, captioner.model.grid_hw
        ).any(dim=2, keepdim=True)
    with torch.no_grad():
        features = captioner.encode(captioner.preprocess([r.path for r in data.records]))
        alphas = captioner.model.decoder(features, captions)[2]
    named = targets.any(dim=2)
    return float((alphas * targets).sum(dim=2)[named].mean())


def test_supervised_attention_refuses_what_it_cannot_do(shapes, tmp_path):
    base = ["--data", str(shapes), "--epochs", "1", *TINY_TRAINING, "--out", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="--supervise-attention must be >= 0"):
        _run([*base, "--supervise-attention", "-1"])
    with pytest.raises(ValueError, match="needs attention"):
        _run([*base, "--supervise-attention", "1", "--no-attention"])
    with pytest.raises(ValueError, match="--supervise-counts needs --supervise-attention"):
        _run([*base, "--supervise-counts"])
    with pytest.raises(ValueError, match="--count-each-copy needs --supervise-counts"):
        _run([*base, "--supervise-attention", "1", "--count-each-copy"])
    with pytest.raises(ValueError, match="not with --scst-from"):
        _run([*base, "--supervise-attention", "1", "--scst-from", str(tmp_path / "model")])
    bare = tmp_path / "bare"
    write_split(generate_split(8, seed=5, size=32), bare / "train")
    (bare / "train" / "objects.json").unlink()
    with pytest.raises(ValueError, match="--train-objects"):
        _run(["--data", str(bare), *base[2:], "--supervise-attention", "1"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="has no objects"):
        _run([*base, "--supervise-attention", "1", "--train-objects", str(other)])
