"""Word vocabulary: tokenisation, building from captions, encode/decode, JSON save/load."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-case and split into words, with each punctuation mark its own token."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """Maps words to ids; ids 0..3 are `<pad> <start> <end> <unk>`."""

    def __init__(self, words: Iterable[str]):
        words = [w for w in words if w not in SPECIALS]
        self.itos: list[str] = list(SPECIALS) + words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(tok for text in texts for tok in tokenize(text))
        words = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(words)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`, wrapped in `<start> ... <end>` when `add_special`."""
        ids = [self.stoi.get(tok, self.unk_id) for tok in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        """Words for `ids`, stopping at `<end>` and dropping `<pad>`/`<start>`; `<unk>` is kept."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return words

    def decode(self, ids: Sequence[int]) -> str:
        """A readable caption: no special tokens (`<unk>` included), punctuation attached to the
        word before it. `decode_tokens` keeps `<unk>`, so tokens stay aligned with their scores."""
        return detokenize([w for w in self.decode_tokens(ids) if w != UNK])

    def to_json(self) -> dict:
        return {"words": self.itos[len(SPECIALS) :]}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=0) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise ValueError("vocabulary JSON must be an object with a 'words' list")
        if not all(isinstance(w, str) for w in data["words"]):
            raise ValueError("vocabulary 'words' must all be strings")
        return cls(data["words"])

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def detokenize(words: Sequence[str]) -> str:
    out = ""
    for w in words:
        if out and not (len(w) == 1 and not w.isalnum() and w not in "<("):
            out += " "
        out += w
    return out
