"""Train a VQA model (question LSTM + question-guided attention, or the no-attention baseline).

    python -m training.make_shapes --out /work/data/shapes --train 8000 --val 500 --test 1000
    python -m training.train_vqa --data /work/data/shapes --out runs/shapes-vqa --epochs 20
    python -m training.make_easy_vqa --out /work/data/easy-vqa
    python -m training.train_vqa --data /work/data/easy-vqa --val-split none --out runs/easy
    torchrun --nproc_per_node=2 -m training.train_vqa --data /work/data/shapes --out runs/ddp

Data are VQA v2 splits (questions.json, annotations.json, images/) under --data. Images are decoded
once into memory, and a step takes a batch of *images* with all their questions, so the encoder
runs once per image however many questions it has. The run folder gets `args.json`,
`metrics.jsonl` (one line per epoch), and the model folders `best/` (highest validation accuracy)
and `last/` (with optimizer state, for `--resume`, which works as in `train_captioner`: the loop
itself is `training.loop`, shared by both).

Questions in the user's own words: with `--word-vectors glove-6b-50d` the question vocabulary is
the training questions' words plus the `--vector-words` most frequent words of the vectors, and the
question embedding starts from their vectors (fine-tuned, or kept with `--freeze-vectors`), so a
word no training question used ("what hue is the ball?") reads as its own vector, not `<unk>`:

    python -m training.train_vqa --data /work/data/shapes --out runs/glove \
        --word-vectors glove-6b-50d --vector-words 20000 --question-encoder bilstm

`--swap-words P` and `--insert-words P` then show the model such words in training: a question
gets one of its words swapped for, or a few more words drawn from, the `--noise-words` most
frequent vector words that no training question uses (`training.question_noise`);
`--noise-max-similarity S` leaves out those whose vector lies within cosine S of a training
question word's, as likely meaning the same.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from captioner.data.images import ImageTensors
from captioner.data.vqa_data import (
    PreparedSplit,
    build_answer_vocab,
    load_split,
    prepare,
    soft_targets,
)
from captioner.evaluation.vqa_scores import score
from captioner.progress import progress
from captioner.vocab import Vocabulary
from captioner.vqa.answerer import ANSWERS, QUESTION_VOCAB, Answerer, encode_questions
from captioner.vqa.vqa_net import VQANet
from captioner.word_vectors import WordVectors, init_embedding
from training import loop
from training.common import epoch_order, run_script
from training.question_noise import drop_words, noisy_questions, unseen_words

# VQAConfig fields given by the command-line arguments of the same name
NET_ARGS = ("hidden_dim", "glimpses", "attention_dim", "fusion_dim")
NET_ARGS += (
    "positional",
    "coords",
    "count",
    "stacked",
    "question_attention",
    "relative",
    "dropout",
)


QUESTION_ENCODERS = ("lstm", "gru", "bilstm", "bigru")
EMBED_DIM = 128
VECTOR_WORDS = 20_000  # 20,000 x 50 floats: 4 MB of weights with glove-6b-50d
NOISE_WORDS = 5_000  # English's everyday words: those a rewording brings in


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    groups = loop.add_common_args(p, grid_size=8, epochs=20, batch_unit="images (all questions)")
    data = groups["data"]
    data.add_argument(
        "--data", help="folder of VQA v2 splits: DATA/<split>/... (required unless --resume)"
    )
    data.add_argument("--train-split", default="train")
    data.add_argument(
        "--val-split", default="val", help="validation split under --data; 'none' for no validation"
    )
    data.add_argument("--answers", type=int, default=1000, help="classify over the top-K answers")
    data.add_argument("--min-count", type=int, default=1, help="rarer question words become <unk>")
    data.add_argument("--max-question-tokens", type=int, default=30)
    data.add_argument(
        "--vector-words",
        type=int,
        default=None,
        metavar="N",
        help="with --word-vectors: the question vocabulary also holds the N most frequent words "
        f"of the vectors (default {VECTOR_WORDS}; N x dim floats of weights)",
    )

    model = groups["model"]
    model.add_argument(
        "--question-encoder",
        choices=QUESTION_ENCODERS,
        default=None,
        help="lstm or gru reads each question left to right; bilstm or bigru also right to left "
        "(default lstm, or --cell's)",
    )
    model.add_argument(
        "--cell", choices=("lstm", "gru"), default=None, help="as --question-encoder"
    )
    model.add_argument(
        "--embed-dim",
        type=int,
        default=None,
        help=f"question word embedding width (default {EMBED_DIM}; with --word-vectors: theirs)",
    )
    model.add_argument("--hidden-dim", type=int, default=256)
    model.add_argument("--attention-dim", type=int, default=128)
    model.add_argument("--fusion-dim", type=int, default=512)
    model.add_argument("--glimpses", type=int, default=2)
    model.add_argument("--no-attention", action="store_true", help="the pooled-image baseline")
    model.add_argument("--stacked", action="store_true", help="each glimpse sees the ones before")
    model.add_argument("--coords", action="store_true", help="append each cell's (x, y)")
    model.add_argument(
        "--question-attention", action="store_true", help="each glimpse weighs the question words"
    )
    model.add_argument(
        "--relative", action="store_true", help="glimpses after the first score offsets from it"
    )
    model.add_argument("--positional", action="store_true", help="learned embedding per cell")
    model.add_argument("--count", action="store_true", help="feed each glimpse's sigmoid mass")
    model.add_argument("--no-normalize", action="store_true", help="skip the L2 norm per cell")
    model.add_argument("--dropout", type=float, default=0.1)
    data.add_argument(
        "--word-dropout",
        type=float,
        default=0.0,
        metavar="P",
        help="at training, each question word reads as <unk> with probability P (word dropout, "
        "Iyyer et al. 2015; Bowman et al. 2016): the model learns to answer from the words it "
        "knows among ones it does not",
    )
    data.add_argument(
        "--swap-words",
        type=float,
        default=0.0,
        metavar="P",
        help="with --word-vectors, at training: with probability P a question has one word "
        "swapped for one of the --noise-words words no training question uses (SwitchOut, Wang "
        "et al. 2018), so an unfamiliar word does not throw the model",
    )
    data.add_argument(
        "--insert-words",
        type=float,
        default=0.0,
        metavar="P",
        help="with --word-vectors, at training: one of those words goes into a question while a "
        "draw falls under P (none with probability 1-P, one with P(1-P), ...): a question in "
        "more words than the generator's still asks the same",
    )
    data.add_argument(
        "--noise-words",
        type=int,
        default=NOISE_WORDS,
        metavar="N",
        help="--swap-words and --insert-words draw from the N most frequent vector words of the "
        f"vocabulary that no training question uses (default {NOISE_WORDS})",
    )
    data.add_argument(
        "--noise-max-similarity",
        type=float,
        default=None,
        metavar="S",
        help="leave out of those words every one whose vector has a cosine similarity of S or "
        "more with the vector of a word the training questions use (the next most frequent take "
        "their places): such a word likely means the same, and noise teaches the model to pass "
        "over it (default: no such limit)",
    )
    return p


def question_encoder(args: argparse.Namespace) -> tuple[str, bool]:
    """(cell, bidirectional) from --question-encoder, else --cell (default lstm, one way)."""
    if args.question_encoder is None:
        return args.cell or "lstm", False
    cell = args.question_encoder.removeprefix("bi")
    if args.cell is not None and args.cell != cell:
        raise ValueError(
            f"--cell {args.cell} contradicts --question-encoder {args.question_encoder}; give one"
        )
    return cell, args.question_encoder.startswith("bi")


def vector_words(args: argparse.Namespace) -> int:
    n = VECTOR_WORDS if args.vector_words is None else args.vector_words
    if n < 0:
        raise ValueError(f"--vector-words must be >= 0, got {n}")
    return n


def embed_dim(args: argparse.Namespace, vectors: WordVectors | None) -> int:
    """--embed-dim, or the vectors' width: the pretrained rows are the embedding itself.

    No projection to another width: the LSTM's input weights already map each embedding
    linearly, so a linear layer in front of them would add weights but nothing they cannot learn.
    """
    if vectors is None:
        return args.embed_dim or EMBED_DIM
    if args.embed_dim is not None and args.embed_dim != vectors.dim:
        raise ValueError(
            f"--embed-dim {args.embed_dim} differs from the {vectors.dim} dimensions of "
            f"--word-vectors {args.word_vectors}: the question embedding is the vectors' width, "
            "so leave --embed-dim out"
        )
    return vectors.dim


def question_vocabulary(items, args: argparse.Namespace, vectors: WordVectors | None) -> Vocabulary:
    """The training questions' words (seen --min-count times), then with --word-vectors the
    --vector-words most frequent words of the vectors that a question can hold (`tokenize`
    keeps them whole) and that are not already in it."""
    vocab = Vocabulary.build((item.question for item in items), args.min_count)
    if vectors is None:
        return vocab
    return vocab.extended(vectors.text_words(vector_words(args)))


class TrainTensors:
    """Question ids, image rows and sparse soft targets of a prepared training split."""

    def __init__(self, data: PreparedSplit, vocab: Vocabulary, answers: list[str], max_tokens: int):
        index = {a: i for i, a in enumerate(answers)}
        items = data.split.items
        targets = [soft_targets(item.answers, index) for item in items]
        width = max((len(t) for t in targets), default=1) or 1
        self.target_index = torch.zeros(len(items), width, dtype=torch.long)  # (N, K)
        self.target_score = torch.zeros(len(items), width)  # (N, K), 0 where padded
        for k, t in enumerate(targets):
            self.target_index[k, : len(t)] = torch.tensor(list(t.keys()), dtype=torch.long)
            self.target_score[k, : len(t)] = torch.tensor(list(t.values()))
        self.unanswerable = sum(1 for t in targets if not t)
        self.questions = encode_questions([item.question for item in items], vocab, max_tokens)
        self.num_answers = len(answers)
        self.by_image = data.by_image

    def batch(self, image_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(questions (Q, T), image_index (Q,) into `image_rows`, dense targets (Q, A))."""
        qs = [k for r in image_rows for k in self.by_image[r]]
        local = torch.tensor([j for j, r in enumerate(image_rows) for _ in self.by_image[r]])
        questions = self.questions[qs]
        questions = questions[:, : int((questions != 0).sum(1).max())]
        targets = torch.zeros(len(qs), self.num_answers)
        targets.scatter_add_(1, self.target_index[qs], self.target_score[qs])
        return questions, local, targets


class VQATask(loop.Task):
    """Batches of images, each with all its questions; soft targets over the top answers."""

    script, kind, rate_unit = "train_vqa", "vqa", "q_s"
    side_files = (ANSWERS, QUESTION_VOCAB)

    def __init__(self, args: argparse.Namespace, d, show: bool):
        if not args.data:
            raise ValueError("--data is required (the folder of VQA v2 splits)")
        for name in ("word_dropout", "swap_words", "insert_words"):
            if not 0 <= getattr(args, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be in [0, 1), got {getattr(args, name)}")
        if (args.swap_words or args.insert_words) and not args.word_vectors:
            raise ValueError(
                "--swap-words and --insert-words need --word-vectors: they bring in words no "
                "training question uses, which only vectors give a meaning (else: --word-dropout)"
            )
        if args.noise_words < 1:
            raise ValueError(f"--noise-words must be >= 1, got {args.noise_words}")
        if args.noise_max_similarity is not None:
            if not (args.swap_words or args.insert_words):
                raise ValueError(
                    "--noise-max-similarity limits the words of --swap-words/--insert-words; "
                    "give one of them"
                )
            if not -1 < args.noise_max_similarity <= 1:
                raise ValueError(
                    f"--noise-max-similarity must be in (-1, 1], got {args.noise_max_similarity}"
                )
        super().__init__(args, d, show)
        self.root = Path(args.data)
        self.train_split = load_split(self.root, args.train_split)
        if not self.train_split.items:
            raise ValueError(f"no training questions with images in {self.root / args.train_split}")

    def build(self, side: dict[str, Any] | None) -> VQANet:
        args = self.args
        vectors = loop.load_word_vectors(args)
        if vectors is None and args.vector_words is not None:
            raise ValueError("--vector-words needs --word-vectors")
        if side is not None:
            self.vocab = Vocabulary.from_json(side[QUESTION_VOCAB])
            self.answers = side[ANSWERS]["answers"]
        else:
            self.vocab = question_vocabulary(self.train_split.items, args, vectors)
            self.answers = build_answer_vocab(self.train_split.items, args.answers)
        cell, bidirectional = question_encoder(args)
        net = VQANet.build(
            loop.encoder_config(args),
            question_vocab_size=len(self.vocab),
            num_answers=len(self.answers),
            pad_id=self.vocab.pad_id,
            attention=not args.no_attention,
            normalize=not args.no_normalize,
            cell=cell,
            bidirectional=bidirectional,
            embed_dim=embed_dim(args, vectors),
            **{name: getattr(args, name) for name in NET_ARGS},
        )
        if vectors is not None:  # on --resume the saved rows then replace these
            record = init_embedding(
                net.question.embedding, self.vocab.itos, vectors, args.freeze_vectors, args.seed
            )
            self.word_vectors = {**record, "vector_words": vector_words(args)}
        self.noise_pool = None
        if args.swap_words or args.insert_words:
            questions = (item.question for item in self.train_split.items)
            self.noise_pool = unseen_words(
                self.vocab, questions, args.noise_words, vectors, args.noise_max_similarity
            )
            if len(self.noise_pool) == 0:
                raise ValueError(
                    "--swap-words/--insert-words: every word of the vocabulary is in a training "
                    "question; raise --vector-words"
                )
        return net

    def wrap(self, model: VQANet, name: str, version: str) -> Answerer:
        return Answerer(model, self.vocab, self.answers, name, version, device=self.d.device)

    def prepare(self) -> ImageTensors:
        args = self.args
        self.train = prepare(self.train_split, args.input_size, progress if self.show else None)
        self.tensors = TrainTensors(self.train, self.vocab, self.answers, args.max_question_tokens)
        self.val = None
        if args.val_split != "none" and self.d.is_main:
            self.val = prepare(load_split(self.root, args.val_split), args.input_size)
        return self.train.images

    def num_samples(self) -> int:
        return self.train.num_images

    def epoch_order(self, epoch: int) -> list[int]:
        return epoch_order(self.train.num_images, self.args.seed, epoch, self.d)

    def batch(self, samples: list[int]) -> tuple[list[int], Any, int]:
        questions, local, targets = self.tensors.batch(samples)
        return samples, (questions, local, targets), len(questions)

    def loss(self, net, inputs, payload, step: int, total_steps: int) -> torch.Tensor:
        device = inputs.device
        questions, local, targets = payload
        if self.noise_pool is not None:
            args = self.args
            questions = noisy_questions(
                questions,
                self.noise_pool,
                args.swap_words,
                args.insert_words,
                args.seed,
                step,
                args.max_question_tokens,
            )
        if self.args.word_dropout > 0:
            questions = drop_words(questions, self.args.word_dropout, self.args.seed, step)
        questions, local, targets = questions.to(device), local.to(device), targets.to(device)
        _, loss = net(inputs, questions, local, targets)
        return loss

    def validate(self, answerer: Answerer):
        if self.val is None:
            return None
        metrics = score(answerer, self.val)
        fields = {
            "val_accuracy": metrics["accuracy"],
            "per_answer_type": metrics["per_answer_type"],
            "per_question_type": metrics["per_question_type"],
        }
        return fields, {"split": self.args.val_split, **metrics}, metrics["accuracy"]

    def data_record(self) -> dict[str, Any]:
        args = self.args
        return {
            "root": str(self.root),
            "train": args.train_split,
            "val": None if args.val_split == "none" else args.val_split,
            "train_images": self.train.num_images,
            "train_questions": len(self.train.split.items),
            "answers": len(self.answers),
            "unanswerable_train_questions": self.tensors.unanswerable,
            "skipped_missing_image": self.train_split.skipped_missing_image,
            "skipped_unreadable_image": len(self.train.unreadable),
        }


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Train; returns {"step", "epoch", "metrics", "best", "weights_sha256", "model"} on every rank."""
    return loop.main(VQATask, args, argv)


if __name__ == "__main__":
    run_script(main, get_args_parser(), "train_vqa")
