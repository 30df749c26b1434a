"""Word vocabulary: tokenisation, building from captions (and extending with other words, e.g. those
of pretrained vectors), encode/decode, JSON save/load, and which words of a text a vocabulary does
not know (`unknown_words`, `known_content_words`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_WORD = re.compile(r"[a-z0-9]+")

# English function words: question words, articles, pronouns, auxiliaries, prepositions (spatial
# ones too), conjunctions and quantifiers. A question whose other words are all unknown gives the
# model nothing to go on: "is the zebra above the refrigerator?" has only these besides
# "zebra" and "refrigerator", and "how many shapes are there?" only these besides "shapes".
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those there here it its they them their what which who whom whose
    where when why how is are was were be been being am do does did done has have had can could
    will would shall should may might must of in on at to from by with without about above below
    under over behind beside between near next into onto out off up down left right than then
    and or but nor not no yes so if as any some each every all both either neither many much
    more most few several one i you he she we me my your his her our us image picture photo
    """.split()  # noqa: SIM905 (a paragraph of words reads better than 120 quoted ones)
)


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

    def extended(self, words: Iterable[str]) -> Vocabulary:
        """This vocabulary (same ids) followed by those of `words` it lacks, in their order: e.g.
        the most frequent words of pretrained vectors, so a question's word never seen in
        training still has its own id (and its vector) instead of `<unk>`."""
        return Vocabulary([*self.itos, *(w for w in dict.fromkeys(words) if w not in self.stoi)])

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids for `text`, wrapped in `<start> ... <end>` when `add_special`."""
        ids = [self.stoi.get(tok, self.unk_id) for tok in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` (punctuation aside) this vocabulary does not know, as `tokenize`
        splits them: in order of first appearance, each once. They are read as `<unk>`."""
        unknown: dict[str, None] = {}
        for tok in tokenize(text):
            if _WORD.fullmatch(tok) and tok not in self.stoi:
                unknown[tok] = None
        return list(unknown)

    def known_content_words(self, text: str) -> bool:
        """Whether `text` has a content word (a word that is not in `FUNCTION_WORDS`) that this
        vocabulary knows. False means the model sees nothing of what the text is about: only
        function words and `<unk>`."""
        return any(
            tok in self.stoi
            for tok in tokenize(text)
            if _WORD.fullmatch(tok) and tok not in FUNCTION_WORDS
        )

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
