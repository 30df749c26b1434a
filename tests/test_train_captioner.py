import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from captioner.caption.captioner import Captioner
from captioner.vocab import SPECIALS, Vocabulary
from captioner.word_vectors import WordVectors
from tests.conftest import TINY_TRAINING, assert_umask_modes, run_torchrun, write_tiny_shapes
from training.train_captioner import get_args_parser, main


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_tiny_shapes(tmp_path_factory.mktemp("shapes"))


def _run(argv):
    return main(get_args_parser().parse_args(argv), argv)


def _shapes_argv(shapes: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    """Training on the tiny shapes splits; `extra` comes after TINY_TRAINING, so it can override it."""
    return [
        "--data",
        str(shapes),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        *TINY_TRAINING,
        *extra,
    ]


def test_training_writes_run_folder_and_resume_continues_the_step_count(shapes, tmp_path):
    out = tmp_path / "run"
    argv = _shapes_argv(shapes, out, 2, "--references", "first")
    first = _run(argv)
    assert first["step"] == 4 and first["epoch"] == 2
    assert {p.name for p in out.iterdir()} >= {"args.json", "metrics.jsonl", "best", "last"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"CIDEr", "Bleu_4", "scene_accuracy", "object_accuracy"} <= set(lines[0])
    training = json.loads((out / "best" / "training.json").read_text())
    assert training["command"].startswith("python -m training.train_captioner --data")
    card = Captioner.load(out / "best").card  # what training knows, in the folder's card.json
    assert card.training["command"] == training["command"]
    assert card.data["sizes"]["train_images"] == 24
    assert card.validation["epoch"] == training["metrics"]["epoch"]
    assert card.validation["metrics"]["CIDEr"] == training["metrics"]["CIDEr"]
    assert card.tests == () and "not stated" in card.domain
    assert Captioner.load(out / "last").card.data == card.data
    assert Captioner.load(out / "best").caption(
        [shapes / "val" / "images" / os.listdir(shapes / "val" / "images")[0]]
    )

    resumed = _run(["--out", str(out), "--resume", "--epochs", "3"])
    assert resumed["step"] == 6 and resumed["epoch"] == 3
    assert [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 3]


def test_run_folder_gets_the_modes_the_umask_implies(shapes, tmp_path, umask):
    """args.json, metrics.jsonl (appended, then rewritten by --resume) and the best and last model
    folders: what a plain mkdir()/open() would give under the umask."""
    out = tmp_path / "run"
    _run(_shapes_argv(shapes, out, 1, "--batch-size", "24"))  # one step
    assert {p.name for p in out.iterdir()} >= {"args.json", "metrics.jsonl", "best", "last"}
    assert_umask_modes(umask, out)
    _run(["--out", str(out), "--resume", "--epochs", "1"])  # nothing left to train
    assert_umask_modes(umask, out)


def test_resume_matches_an_uninterrupted_run(shapes, tmp_path):
    common = [
        "--data",
        str(shapes),
        "--references",
        "first",
        "--dropout",
        "0.2",
        "--scheduled-sampling",
        "0.5",
        *TINY_TRAINING,
    ]
    straight = _run([*common, "--out", str(tmp_path / "a"), "--epochs", "2"])
    stopped = _run(
        [*common, "--out", str(tmp_path / "b"), "--epochs", "2", "--stop-after-steps", "3"]
    )
    assert stopped["step"] == 3 and stopped["epoch"] == 1  # mid-way through the second epoch
    resumed = _run(["--out", str(tmp_path / "b"), "--resume", "--epochs", "2"])
    assert resumed["step"] == straight["step"] == 4
    for key, value in straight["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[key], value, msg=key)


def test_grouped_batches_resume_as_an_uninterrupted_run_and_encode_each_image_once(
    shapes, tmp_path, monkeypatch
):
    common = ["--data", str(shapes), *TINY_TRAINING, "--group-by-image", "--batch-size", "10"]
    encoded: list[int] = []
    from captioner.encoder import Encoder

    forward = Encoder.forward
    monkeypatch.setattr(
        Encoder, "forward", lambda self, x: (encoded.append(len(x)), forward(self, x))[1]
    )
    straight = _run([*common, "--out", str(tmp_path / "a"), "--epochs", "2"])
    # 24 images x 5 references in batches of 10 captions: 12 steps per epoch, and each batch
    # holds the references of 2 or 3 images, not 10 images (validation batches aside).
    assert straight["step"] == 24
    assert max(encoded[:12]) <= 3
    stopped = _run(
        [*common, "--out", str(tmp_path / "b"), "--epochs", "2", "--stop-after-steps", "17"]
    )
    assert stopped["step"] == 17
    resumed = _run(["--out", str(tmp_path / "b"), "--resume", "--epochs", "2"])
    assert resumed["step"] == straight["step"]
    for key, value in straight["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[key], value, msg=key)


def test_frozen_pretrained_encoder_uses_cached_features(shapes, tmp_path):
    argv = _shapes_argv(
        shapes,
        tmp_path / "r",
        1,
        "--encoder",
        "efficientnet_lite0",
        "--encoder-weights",
        "imagenet",
        "--input-size",
        "64",
        "--grid-size",
        "2",
    )
    result = _run(argv)
    assert result["model"].encoder.frozen
    meta = Captioner.load(tmp_path / "r" / "best").metadata()
    assert meta["encoder"] == "efficientnet_lite0" and meta["attention_grid"] == [2, 2]


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        _run(["--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="not found"):
        _run(
            [
                "--train-captions",
                str(tmp_path / "none.json"),
                "--train-images",
                str(tmp_path),
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_two_cpu_processes_under_torchrun_end_identical_and_the_loss_falls(shapes, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import os, sys\n"
        "from safetensors.torch import save_file\n"
        "from training.train_captioner import get_args_parser, main\n"
        "argv = sys.argv[1:]\n"
        "result = main(get_args_parser().parse_args(argv), argv)\n"
        "save_file({k: v.contiguous() for k, v in result['model'].state_dict().items()}, "
        "os.path.join(os.environ['OUT_DIR'], f\"rank{os.environ['RANK']}.safetensors\"))\n"
    )
    argv = _shapes_argv(shapes, out, 4, "--device", "cpu", "--lr", "5e-3")
    run_torchrun(script, argv, tmp_path, timeout=120)
    a, b = (
        load_file(str(tmp_path / "rank0.safetensors")),
        load_file(str(tmp_path / "rank1.safetensors")),
    )
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert json.loads((out / "best" / "training.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "fine-tuned"])
def test_word_vectors_start_the_decoders_input_embedding(shapes, tmp_path, freeze):
    glove = WordVectors.load("glove-6b-50d")
    out = tmp_path / "glove"
    train = shapes / "train"  # and no validation
    argv = [
        "--train-captions",
        str(train / "captions.json"),
        "--train-images",
        str(train / "images"),
    ]
    argv += ["--out", str(out), "--epochs", "1", *TINY_TRAINING, "--word-vectors", "glove-6b-50d"]
    _run([*argv, *(["--freeze-vectors"] if freeze else [])])
    captioner = Captioner.load(out / "best")
    decoder, vocab = captioner.model.decoder, captioner.vocab
    assert decoder.config.word_dim == 50 and decoder.config.embed_dim == 16  # --embed-dim
    assert decoder.embedding.weight.shape == (len(vocab), 50)
    assert decoder.word_proj.weight.shape == (16, 50)  # the vectors' width to embed_dim
    # The caption vocabulary is still the training captions' own.
    assert vocab.itos == Vocabulary.load(out / "last" / "vocab.json").itos and len(vocab) < 100
    record = captioner.card.word_vectors
    in_glove = [w for w in vocab.itos if w in glove and w not in SPECIALS]
    assert record == {
        "source": "glove-6b-50d",
        "dim": 50,
        "vectors": 400_000,
        "rows_from_vectors": len(in_glove),
        "vector_words": None,
        "frozen": freeze,
    }
    weight = decoder.embedding.weight.detach()
    kept = [np.array_equal(weight[vocab.stoi[w]].numpy(), glove.get(w)) for w in in_glove]
    assert all(kept) if freeze else not any(kept)  # fine-tuned: every caption word moved
    assert captioner.caption([next((shapes / "val" / "images").iterdir())])[0].tokens
