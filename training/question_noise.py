"""Noise on training questions, so that a VQA model answers from the words it knows among ones it
does not: word dropout, and words no training question uses swapped in or inserted.

People ask in their own words. A model trained on a generator's few wordings learns where the
telling word sits, and an unfamiliar word ("the circle is which hue?", "how many pieces do you
count?") throws it. With word vectors, each such word still reads as its own vector, so the
model can be shown what meeting one is like: a question gets one of its words swapped for
(`swap_p`), or gains a few more of (`insert_p`), the most frequent vector words that no training
question uses (`unseen_words`), as SwitchOut (Wang et al., 2018) swaps words for random
vocabulary words. Inserting adds words and takes none away, so the answer still holds; a swap
may hide the word that decides it, so it is drawn per question, not per word. Every draw comes
from (seed, step): a resumed run, and every rank of a distributed one, draws the same.

A word shown as noise is a word the model learns to pass over. The most frequent words include
the ones people reword with ("number" for "how many", "does" for "is", "higher" for "above"), so
`max_similarity` keeps out of the pool every word whose vector lies that close (cosine) to the
vector of a word the training questions use: those likely mean what that word means.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from captioner.vocab import Vocabulary, tokenize
from captioner.word_vectors import WordVectors

__all__ = ["drop_words", "noisy_questions", "unseen_words"]


def _step_seed(seed: int, step: int) -> int:
    """The seed of a training step's draws: the same on a resumed run and on every rank."""
    return seed * 1_000_003 + step


def drop_words(questions: torch.Tensor, p: float, seed: int, step: int) -> torch.Tensor:
    """`questions` (Q, T) with each word (not padding) replaced by `<unk>` with probability `p`,
    drawn from (seed, step): the same on a resumed run and on every rank."""
    if not 0 <= p < 1:
        raise ValueError(f"--word-dropout must be in [0, 1), got {p}")
    generator = torch.Generator().manual_seed(_step_seed(seed, step))
    dropped = (torch.rand(questions.shape, generator=generator) < p) & (
        questions != Vocabulary.pad_id
    )
    return questions.masked_fill(dropped, Vocabulary.unk_id)


def unseen_words(
    vocab: Vocabulary,
    questions: Iterable[str],
    n: int,
    vectors: WordVectors | None = None,
    max_similarity: float | None = None,
) -> torch.Tensor:
    """The ids of the first `n` words of `vocab` (after the special tokens; a vocabulary extended
    with word vectors lists them most frequent first) that are alphabetic and that none of
    `questions` uses; with `max_similarity`, also none whose vector in `vectors` has a cosine
    similarity of `max_similarity` or more with the vector of a word `questions` use."""
    if n < 1:
        raise ValueError(f"the number of unseen words must be >= 1, got {n}")
    used = {token for q in questions for token in tokenize(q)}
    ids = [
        i
        for i, word in enumerate(vocab.itos)
        if i > Vocabulary.unk_id and word.isalpha() and word not in used
    ]
    if max_similarity is not None:
        if vectors is None:
            raise ValueError("max_similarity needs the word vectors")
        if not -1 < max_similarity <= 1:
            raise ValueError(f"max_similarity must be in (-1, 1], got {max_similarity}")
        near = _nearest(vectors, [vocab.itos[i] for i in ids], sorted(used))
        ids = [i for i, similarity in zip(ids, near.tolist()) if similarity < max_similarity]
    return torch.tensor(ids[:n], dtype=torch.long)


def _nearest(vectors: WordVectors, words: Sequence[str], others: Sequence[str]) -> torch.Tensor:
    """Per word of `words`, the highest cosine similarity of its vector with the vector of one of
    `others` (-1 where either side has none)."""
    table, found = vectors.rows([*others, *words])
    has_vector = torch.tensor(found, dtype=torch.bool)
    table = torch.nn.functional.normalize(table, dim=1)
    k = len(others)
    reference = table[:k][has_vector[:k]]
    if len(reference) == 0:
        return torch.full((len(words),), -1.0)
    return (table[k:] @ reference.T).amax(1).masked_fill(~has_vector[k:], -1.0)


def noisy_questions(
    questions: torch.Tensor,
    pool: torch.Tensor,
    swap_p: float,
    insert_p: float,
    seed: int,
    step: int,
    max_tokens: int,
) -> torch.Tensor:
    """`questions` (Q, T), words first and padding after, with words of `pool` (ids) swapped in
    and inserted: with probability `swap_p` a question has one word, drawn uniformly, replaced;
    then, while a draw falls under `insert_p` (so none with probability 1 - insert_p, one with
    insert_p (1 - insert_p), ...), one word goes in before a position drawn uniformly (never
    after the last word, the question mark of most questions), up to `max_tokens` words.
    Returns (Q, T') padded to the longest question."""
    for name, p in (("swap", swap_p), ("insert", insert_p)):
        if not 0 <= p < 1:
            raise ValueError(f"the {name} probability must be in [0, 1), got {p}")
    if len(pool) == 0:
        raise ValueError("no words to swap in or insert")
    rng = random.Random(_step_seed(seed, step))
    choices = pool.tolist()
    rows = []
    for row in questions.tolist():
        words = [w for w in row if w != Vocabulary.pad_id]
        if words and rng.random() < swap_p:
            words[rng.randrange(len(words))] = rng.choice(choices)
        while words and len(words) < max_tokens and rng.random() < insert_p:
            words.insert(rng.randrange(len(words)), rng.choice(choices))
        rows.append(words)
    width = max((len(w) for w in rows), default=0)
    out = torch.full((len(rows), width), Vocabulary.pad_id, dtype=questions.dtype)
    for k, words in enumerate(rows):
        out[k, : len(words)] = torch.tensor(words, dtype=questions.dtype)
    return out
