"""CIDEr-D on word ids, for rewards during training (self-critical sequence training).

pycocoevalcap's `Cider` (which is CIDEr-D: clipped counts, a Gaussian length penalty, sigma 6)
recounts every reference's n-grams and its document frequencies on each call; a reward is asked
for hundreds of sampled captions per step. `CiderD` counts the references once, with document
frequencies from a fixed corpus (the training references, as Rennie et al. 2017 and
ruotianluo/ImageCaptioning.pytorch do), and then scores a caption against an image's cached
reference vectors. With the document frequencies of the evaluated references it gives
pycocoevalcap's figures (tests/test_cider.py), including its one quirk: the length in the
penalty counts bigrams, not words.

    cider = CiderD(references)            # image -> list of references (word-id sequences)
    cider.score(image, [4, 17, 9, 23])    # one caption of that image
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

Ngrams = Counter  # n-gram (a tuple of ids) -> count


def _ngrams(words: Sequence[int], n: int) -> Ngrams:
    return Counter(
        tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
    )


class CiderD:
    def __init__(
        self,
        references: Mapping[Hashable, Sequence[Sequence[int]]],
        document_frequency_from: Mapping[Hashable, Sequence[Sequence[int]]] | None = None,
        n: int = 4,
        sigma: float = 6.0,
    ):
        """`references`: image -> its references as word-id sequences (no <start>/<end>).
        Document frequencies come from `document_frequency_from` (default: `references`)."""
        self.n, self.sigma = n, sigma
        corpus = references if document_frequency_from is None else document_frequency_from
        if not corpus:
            raise ValueError("CIDEr-D needs at least one image with references")
        df: Counter = Counter()
        for refs in corpus.values():
            df.update({g for ref in refs for g in _ngrams(ref, n)})
        self.document_frequency = df
        self.log_corpus = math.log(float(len(corpus)))
        self._refs = {
            image: [self._vector(_ngrams(ref, n)) for ref in refs]
            for image, refs in references.items()
        }
        empty = [image for image, refs in self._refs.items() if not refs]
        if empty:
            raise ValueError(f"image {empty[0]!r} has no references")

    def _vector(self, counts: Ngrams) -> tuple[list[dict], list[float], int]:
        """tf-idf weights per n-gram order, their norms, and the length the penalty compares."""
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = tf * (self.log_corpus - math.log(max(1.0, self.document_frequency[gram])))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:  # sic: pycocoevalcap counts bigrams as the length
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, image: Hashable, words: Sequence[int]) -> float:
        """CIDEr-D of one caption (word ids) against `image`'s references, as pycocoevalcap's."""
        if image not in self._refs:
            raise KeyError(f"no references for image {image!r}")
        vec, norm, length = self._vector(_ngrams(list(words), self.n))
        refs = self._refs[image]
        total = 0.0
        for vec_ref, norm_ref, length_ref in refs:
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                ref_k = vec_ref[k]
                val = sum(min(w, ref_k[g]) * ref_k[g] for g, w in vec[k].items() if g in ref_k)
                if norm[k] != 0 and norm_ref[k] != 0:
                    val /= norm[k] * norm_ref[k]
                total += val * penalty
        return total / self.n / len(refs) * 10.0

    def scores(self, images: Sequence[Hashable], captions: Sequence[Sequence[int]]) -> list[float]:
        return [self.score(image, words) for image, words in zip(images, captions, strict=True)]
