"""Caption metrics: the COCO scores (pycocoevalcap), the references' own leave-one-out ceiling, and,
for the shapes world, attention grounding and object/scene accuracy read with its grammar.

    coco_scores(refs, candidates)             # Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr
    leave_one_out(refs)                       # Bleu_4 and CIDEr of each reference against the rest
    grounding(results, objects, (7, 7))       # share of colour/shape words attended on their object
    object_scene_accuracy(candidates, objects)

SPICE is not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP at run time, which an
offline machine cannot do (`SPICE_NOTE` says so in the metrics files).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from pycocoevalcap.tokenizer import ptbtokenizer

from .shapes import COLOUR_WORDS, SHAPE_WORDS, decode_mask, score_caption
from .vocab import tokenize

COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_NOTE = "SPICE skipped: pycocoevalcap's SPICE downloads Stanford CoreNLP at run time"

_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS)  # the tokens COCOEvalCap drops after PTB


def java_available() -> bool:
    """METEOR and the PTB tokenizer run on Java."""
    return shutil.which("java") is not None


def _check_java() -> None:
    if not java_available():
        raise ValueError(
            "METEOR and PTB tokenization need Java ('java' is not on PATH); install Java 17 "
            "or pass meteor=False, ptb_tokenize=False"
        )


# -- tokenization --------------------------------------------------------------------------------


def _ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, lower-cased, punctuation removed), run
    on a temp file outside the package folder, which may not be writable."""
    jar = os.path.join(
        os.path.dirname(ptbtokenizer.__file__), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR
    )
    fd, path = tempfile.mkstemp(prefix="ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(s.replace("\n", " ").replace("\r", " ") for s in sentences))
        cmd = ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer"]
        done = subprocess.run(
            [*cmd, "-preserveLines", "-lowerCase", path], capture_output=True, check=False
        )
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed: {done.stderr.decode(errors='replace')[-500:]}")
    lines = done.stdout.decode("utf-8").split("\n")
    lines += [""] * (len(sentences) - len(lines))  # trailing empty sentences give no line
    lines = lines[: len(sentences)]
    return [" ".join(w for w in line.split() if w not in _PUNCTUATION) for line in lines]


def _plain_tokenize(sentences: Sequence[str]) -> list[str]:
    """The project's tokenizer, punctuation marks dropped as on the PTB path (no Java needed)."""
    return [" ".join(t for t in tokenize(s) if t.isalnum()) for s in sentences]


def tokenize_all(
    captions: Mapping[Hashable, Sequence[str]], ptb_tokenize: bool = True
) -> dict[Hashable, list[str]]:
    """Every caption as space-joined lower-case tokens without punctuation, in one tokenizer call."""
    keys = [k for k, caps in captions.items() for _ in caps]
    flat = [c for caps in captions.values() for c in caps]
    tokens = _ptb_tokenize(flat) if ptb_tokenize else _plain_tokenize(flat)
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    for k, t in zip(keys, tokens, strict=True):
        out[k].append(t)
    return out


# -- COCO scores ---------------------------------------------------------------------------------


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress and stats
        return fn(*args)


def _bleu_cider(gts: dict, res: dict, rouge: bool = True) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    bleu, _ = _quiet(Bleu(4).compute_score, gts, res, 0)
    scores = {f"Bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    if rouge:
        scores["ROUGE_L"] = float(_quiet(Rouge().compute_score, gts, res)[0])
    scores["CIDEr"] = float(_quiet(Cider().compute_score, gts, res)[0])
    return scores


def _start_meteor():
    """pycocoevalcap's METEOR scorer: a JVM that first loads its paraphrase table (seconds), so
    it is started before tokenizing and scoring the rest, which run meanwhile."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _meteor(scorer, gts: dict, res: dict) -> float:
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        _stop_meteor(scorer)


def _stop_meteor(scorer) -> None:
    """Stop the Java process now, not whenever the object happens to be collected."""
    proc = scorer.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    proc.kill()
    proc.wait()


def coco_scores(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    meteor: bool = True,
    ptb_tokenize: bool = True,
) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr of `candidates` (image id -> caption) against
    `references` (image id -> captions), as pycocoevalcap's COCOEvalCap computes them, under its
    names (`Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr`). Every candidate needs references;
    references of other images are ignored. `meteor=False` leaves METEOR out and
    `ptb_tokenize=False` uses the project's tokenizer: together they need no Java (fast validation).
    """
    if not candidates:
        raise ValueError("no candidate captions to score")
    missing = [k for k in candidates if not references.get(k)]
    if missing:
        raise ValueError(
            f"{len(missing)} candidate(s) have no references, e.g. image {missing[0]!r}"
        )
    if meteor or ptb_tokenize:
        _check_java()
    ids = list(candidates)
    scorer = _start_meteor() if meteor else None
    try:
        gts = tokenize_all({k: list(references[k]) for k in ids}, ptb_tokenize)
        res = tokenize_all({k: [candidates[k]] for k in ids}, ptb_tokenize)
        scores = _bleu_cider(gts, res)
    except BaseException:
        if scorer is not None:
            _stop_meteor(scorer)
        raise
    if scorer is not None:
        scores["METEOR"] = _meteor(scorer, gts, res)
    return {k: scores[k] for k in COCO_METRICS if k in scores}


def leave_one_out(
    references: Mapping[Hashable, Sequence[str]], ptb_tokenize: bool = True
) -> dict[str, float]:
    """The references' own ceiling: fold j scores every image's reference j against its other
    references (BLEU-4 and CIDEr, corpus-level like `coco_scores`); the result is the mean over
    folds. Fold j holds the images with more than j references; images with a single reference
    have nothing to be scored against and are left out."""
    refs = {k: list(v) for k, v in references.items() if len(v) >= 2}
    if not refs:
        raise ValueError("leave-one-out needs images with at least 2 references; none have")
    if ptb_tokenize:
        _check_java()
    tokens = tokenize_all(refs, ptb_tokenize)
    folds = []
    for j in range(max(map(len, tokens.values()))):
        ids = [k for k, v in tokens.items() if len(v) > j]
        gts = {k: tokens[k][:j] + tokens[k][j + 1 :] for k in ids}
        res = {k: [tokens[k][j]] for k in ids}
        folds.append(_bleu_cider(gts, res, rouge=False))
    return {key: float(np.mean([f[key] for f in folds])) for key in ("Bleu_4", "CIDEr")}


# -- shapes world: grounding and object/scene accuracy -------------------------------------------


class AttendedCaption(Protocol):
    """What grounding reads from a caption result (`captioner.pipeline.CaptionResult` fits)."""

    tokens: list[str]
    attention: np.ndarray | None  # (len(tokens), h, w)


def cell_bounds(i: int, n: int, size: int) -> tuple[int, int]:
    """Pixel range [start, stop) of cell i of n along an axis of `size` pixels."""
    return math.floor(i * size / n), math.ceil((i + 1) * size / n)


def cells_overlapping(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: which grid cells hold at least one pixel of the (H, W) mask."""
    h, w = grid_hw
    H, W = mask.shape
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        r0, r1 = cell_bounds(i, h, H)
        for j in range(w):
            c0, c1 = cell_bounds(j, w, W)
            out[i, j] = mask[r0:r1, c0:c1].any()
    return out


def _word_cells(
    objects: Sequence[Mapping[str, Any]],
    grid_hw: tuple[int, int],
    image_size: tuple[int, int] | None,
) -> dict[tuple[str, str], np.ndarray]:
    """("color"|"shape", value) -> (h, w) cells overlapping any object with that value."""
    cells: dict[tuple[str, str], np.ndarray] = {}
    for obj in objects:
        mask = decode_mask(obj["mask"])
        if image_size is not None and mask.shape != tuple(image_size):
            raise ValueError(
                f"object mask is {mask.shape}, expected image_size {tuple(image_size)}"
            )
        overlap = cells_overlapping(mask, grid_hw)
        for key in (("color", obj["color"]), ("shape", obj["shape"])):
            cells[key] = cells[key] | overlap if key in cells else overlap
    return cells


def _word_key(token: str) -> tuple[str, str] | None:
    if token in COLOUR_WORDS:
        return ("color", COLOUR_WORDS[token])
    if token in SHAPE_WORDS:
        return ("shape", SHAPE_WORDS[token])
    return None


def grounding(
    results: Mapping[Hashable, AttendedCaption],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
    grid_hw: tuple[int, int],
    image_size: tuple[int, int] | None = None,
) -> dict[str, float | int | None]:
    """How often the attention that produced a colour or shape word peaks on a matching object.

    For each generated colour word (shape word, plurals included), take the attention map of
    that step; the word is grounded when its highest-weight grid cell overlaps at least one mask
    pixel of an object with that colour (shape). Cell (i, j) of an h x w grid covers image rows
    [floor(i*H/h), ceil((i+1)*H/h)) and columns [floor(j*W/w), ceil((j+1)*W/w)) of the H x W
    image: the encoder sees the whole image squashed to a square, so cells map proportionally
    (neighbouring cells share a border pixel row when h does not divide H).

    `grounding_uniform` is the same figure for uniform attention, where every cell ties: its
    expected value, the share of cells that overlap a matching object, averaged over the same
    words. `image_size` (H, W), when given, is checked against every mask. Returns `grounding`,
    `grounding_uniform` (None when no colour or shape word was generated) and `grounded_words`,
    the number of words counted."""
    h, w = grid_hw
    hits, uniform, n = 0, 0.0, 0
    for image_id, result in results.items():
        words = [(t, key) for t, token in enumerate(result.tokens) if (key := _word_key(token))]
        if not words:
            continue
        if result.attention is None:
            raise ValueError(f"image {image_id!r}: grounding needs attention maps, got None")
        attention = np.asarray(result.attention)
        if attention.shape != (len(result.tokens), h, w):
            raise ValueError(
                f"image {image_id!r}: attention shape {attention.shape}, expected "
                f"{(len(result.tokens), h, w)} (tokens x grid)"
            )
        if image_id not in objects_by_image:
            raise ValueError(f"image {image_id!r} has no objects in objects_by_image")
        cells = _word_cells(objects_by_image[image_id], grid_hw, image_size)
        for t, key in words:
            match = cells.get(key, np.zeros((h, w), dtype=bool))
            peak = np.unravel_index(int(np.argmax(attention[t])), (h, w))
            hits += bool(match[peak])
            uniform += float(match.mean())
            n += 1
    return {
        "grounding": hits / n if n else None,
        "grounding_uniform": uniform / n if n else None,
        "grounded_words": n,
    }


def object_scene_accuracy(
    captions: Mapping[Hashable, str],
    objects_by_image: Mapping[Hashable, Sequence[Mapping[str, Any]]],
) -> dict[str, float]:
    """Read each caption with the shapes grammar (`shapes.score_caption`): `object_accuracy` is
    the share of all objects whose size, colour and shape a caption states correctly;
    `scene_accuracy` the share of captions stating every object and nothing else."""
    if not captions:
        raise ValueError("no captions to score")
    missing = [k for k in captions if k not in objects_by_image]
    if missing:
        raise ValueError(f"{len(missing)} caption(s) have no objects, e.g. image {missing[0]!r}")
    correct = total = scenes = 0
    for image_id, text in captions.items():
        objects = objects_by_image[image_id]
        n, scene_ok = score_caption(text, objects)
        correct += n
        total += len(objects)
        scenes += scene_ok
    return {
        "object_accuracy": correct / total if total else 0.0,
        "scene_accuracy": scenes / len(captions),
    }
