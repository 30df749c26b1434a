"""The COCO caption scores (pycocoevalcap) and the references' own leave-one-out ceiling.

    coco_scores(refs, candidates)             # Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr
    leave_one_out(refs)                       # Bleu_4 and CIDEr of each reference against the rest

SPICE is not computed: pycocoevalcap's SPICE downloads Stanford CoreNLP at run time, which an
offline machine cannot do (`SPICE_NOTE` says so in the metrics files).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from pycocoevalcap.tokenizer import ptbtokenizer

from captioner.vocab import tokenize

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
