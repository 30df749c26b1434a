"""Decoding: greedy, temperature/top-k sampling and batched beam search, all under inference mode.

Every function takes a `CaptionDecoder` and encoder features (B, L, D) and returns, per image,
`Hypothesis` objects with word ids, per-word log-probabilities and per-word attention maps. All of
them stop at `max_length`, so a caption comes back even when `<end>` is never the best token.

A `Watch` hears each image's words while the search runs, as soon as they are fixed (greedy and
sampling: every step; beam search: the prefix that every hypothesis still able to win shares), and
can drop an image nobody waits for any more (the service's streamed captions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from captioner.caption.decoder import CaptionDecoder, Memory, State
from captioner.vocab import Vocabulary

START, END = Vocabulary.start_id, Vocabulary.end_id


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    token_logprobs: list[float]  # one per token
    attention: torch.Tensor | None  # (len(tokens), L), or None for a model without attention
    score: float  # log-probability of the whole caption (with <end>), length-normalised if asked
    finished: bool  # False when cut at max_length before <end>


@dataclass(frozen=True)
class Word:
    """A word the search has fixed: the final caption holds it at `position`, whatever comes next."""

    position: int  # 0-based place in the caption
    token: int
    logprob: float
    attention: torch.Tensor | None  # (L,) on the CPU, or None for a model without attention


class Watch:
    """What a caller hears of a running search. Both methods run in the search's thread.

    `words(image, words)` gets image `image`'s newly fixed words, in caption order; over the whole
    search an image's words are exactly its final caption's tokens, with their log-probabilities
    and attention. `wanted(image)` is asked after every step: False drops the image from the
    search at once (its result is then whatever the search had, and no more words come).
    """

    def words(self, image: int, words: list[Word]) -> None:
        pass

    def wanted(self, image: int) -> bool:
        return True


def _words(
    tokens: list[int], logps: list[float], alphas: torch.Tensor | None, start: int
) -> list[Word]:
    """Words `start`.. of one hypothesis's tokens, log-probs and (T, L) attention."""
    return [
        Word(p, tokens[p], float(logps[p]), None if alphas is None else alphas[p].float().cpu())
        for p in range(start, len(tokens))
    ]


def _shared(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check(features: torch.Tensor, max_length: int) -> None:
    if features.dim() != 3:
        raise ValueError(f"features must be (B, L, D), got {tuple(features.shape)}")
    if not 1 <= max_length <= 1000:
        raise ValueError(f"max_length must be in 1..1000, got {max_length}")


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the words a caption may contain: `<pad>` and `<start>` never are.

    Overwrites those two columns of `logits` (a step's output, read nowhere else)."""
    logits = logits.float()
    logits[:, [Vocabulary.pad_id, START]] = float("-inf")
    return F.log_softmax(logits, dim=1)


def _reorder(state: State, rows: torch.Tensor) -> State:
    hs, cs = state
    return [h.index_select(0, rows) for h in hs], None if cs is None else [
        c.index_select(0, rows) for c in cs
    ]


@torch.inference_mode()
def greedy(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    max_length: int = 20,
    watch: Watch | None = None,
) -> list[Hypothesis]:
    return _sample_loop(
        decoder, features, max_length, pick=lambda logp: logp.argmax(dim=1), watch=watch
    )


@torch.inference_mode()
def sample(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    max_length: int = 20,
    temperature: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    watch: Watch | None = None,
) -> list[Hypothesis]:
    """Ancestral sampling from softmax(logits / temperature), restricted to the top_k words if > 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def pick(logp: torch.Tensor) -> torch.Tensor:
        logits = logp / temperature
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[1]), dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)

    return _sample_loop(decoder, features, max_length, pick, watch)


def _sample_loop(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    max_length: int,
    pick,
    watch: Watch | None = None,
) -> list[Hypothesis]:
    _check(features, max_length)
    B = features.shape[0]
    memory = decoder.memory(features)
    state = decoder.init_state(memory)
    prev = torch.full((B,), START, dtype=torch.long, device=features.device)
    words, logps, alphas = [], [], []
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    for t in range(max_length):
        logits, alpha, state = decoder.step(memory, state, prev)
        logp = _log_probs(logits)  # (B, V)
        prev = pick(logp)
        words.append(prev)
        logps.append(logp.gather(1, prev.unsqueeze(1)).squeeze(1))
        alphas.append(alpha)
        if watch is not None:
            done |= _tell_step(watch, t, prev, logps[-1], alpha, done)
        done |= prev == END
        if bool(done.all()):
            break
    words_t, logps_t = torch.stack(words, 1).tolist(), torch.stack(logps, 1).tolist()
    alphas_t = torch.stack(alphas, 1).float().cpu() if alphas[0] is not None else None  # (B, T, L)
    out = []
    for i in range(B):
        n = words_t[i].index(END) if END in words_t[i] else len(words_t[i])
        finished = n < len(words_t[i])
        score = sum(logps_t[i][: n + 1]) if finished else sum(logps_t[i][:n])
        att = alphas_t[i, :n] if alphas_t is not None else None
        out.append(Hypothesis(words_t[i][:n], logps_t[i][:n], att, score, finished))
    return out


def _tell_step(
    watch: Watch,
    t: int,
    picked: torch.Tensor,
    logp: torch.Tensor,
    alpha: torch.Tensor | None,
    done: torch.Tensor,
) -> torch.Tensor:
    """Greedy and sampling fix a word per step: tell the watch each running image's word (not
    `<end>`); returns which images it no longer wants."""
    picked_l, logp_l, done_l = picked.tolist(), logp.tolist(), done.tolist()
    stop = []
    for i, (token, lp, was_done) in enumerate(zip(picked_l, logp_l, done_l)):
        if not was_done and token != END:
            att = None if alpha is None else alpha[i].float().cpu()
            watch.words(i, [Word(t, token, lp, att)])
        stop.append(not was_done and not watch.wanted(i))
    return torch.tensor(stop, dtype=torch.bool, device=done.device)


def length_penalty_factor(length: int, alpha: float) -> float:
    """GNMT length normalisation (Wu et al., 2016): ((5 + |Y|) / 6) ** alpha; 1 when alpha is 0."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.inference_mode()
def beam_search(
    decoder: CaptionDecoder,
    features: torch.Tensor,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float = 0.0,
    n_best: int = 1,
    watch: Watch | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over all images at once; returns the `n_best` hypotheses per image, best first.

    All beams of all images live in one batch of rows (image i's k beams are rows i*k .. i*k+k-1),
    while each image's memory (grid and attention projection) is held once and read by its beams
    (`CaptionDecoder.step`), never copied per beam. Each step takes the top 2k continuations per
    image: those ending in `<end>` among the top k are retired into the image's finished list,
    the best k others stay alive. An image leaves the batch once it has k finished hypotheses and
    no live beam can still beat them: its slot is taken by the last live image, so an image that
    finishes costs one image's copy and the others are not copied. Beam size 1 is greedy.
    """
    _check(features, max_length)
    if not 1 <= beam_size <= 100:
        raise ValueError(f"beam_size must be in 1..100, got {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be in 1..beam_size ({beam_size}), got {n_best}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    B, L, device, k = features.shape[0], features.shape[1], features.device, beam_size
    memory = decoder.memory(features)  # (B, ...): the attention projection, once per image
    owned = memory.features is not features  # False: the memory holds the caller's tensor
    V = decoder.config.vocab_size
    # All k beams start identical: the first step runs one row per image (its top 2k words hold
    # at least k that do not end while V > k), the same search as k rows with k-1 at -inf.
    width = k if k >= V else 1
    state = decoder.init_state(memory)
    if width > 1:
        state = _reorder(state, torch.arange(B, device=device).repeat_interleave(width))
    scores = torch.full((B, width), float("-inf"), device=device)
    scores[:, 0] = 0.0
    prev = torch.full((B * width,), START, dtype=torch.long, device=device)
    tokens = torch.empty(B * width, 0, dtype=torch.long, device=device)
    logps = torch.empty(B * width, 0, device=device)
    alphas = torch.empty(B * width, 0, L, device=device) if decoder.config.attention else None
    active = list(range(B))  # the image in each slot of the memory (its first len(active))
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    told = [0] * B  # words of each image the watch has heard
    bound = length_penalty_factor(max_length, length_penalty)
    for t in range(max_length):
        logits, alpha, state = decoder.step(memory, state, prev)
        logp = _log_probs(logits)  # (n*w, V), w beams per image
        n, w = len(active), scores.shape[1]
        cand = (scores.view(n * w, 1) + logp).view(n, w * V)
        top_scores, top_idx = cand.topk(min(2 * k, w * V), dim=1)  # (n, 2k)
        beam, word = top_idx // V, top_idx % V
        is_end = word == END
        # The best k candidates that do not end stay alive.
        alive = ~is_end & (torch.cumsum(~is_end, dim=1) <= k)
        keep_scores = top_scores[alive].view(n, k)
        rows = (torch.arange(n, device=device).unsqueeze(1) * w + beam)[alive].view(-1)  # (n*k,)
        keep_words = word[alive].view(-1)

        # Retire the finished candidates (host-side bookkeeping on small tensors).
        ends = (is_end & (torch.arange(top_idx.shape[1], device=device) < k)).nonzero().tolist()
        if ends:
            top_scores_l, beam_l = top_scores.tolist(), beam.tolist()
            for i, r in ends:
                raw = top_scores_l[i][r]
                if raw == float("-inf"):
                    continue
                row = i * w + beam_l[i][r]
                finished[active[i]].append(
                    Hypothesis(
                        tokens[row].tolist(),
                        logps[row].tolist(),
                        alphas[row].float().cpu() if alphas is not None else None,
                        raw / length_penalty_factor(t + 1, length_penalty),
                        True,
                    )
                )

        step_logp = logp[rows, keep_words]
        tokens = torch.cat([tokens[rows], keep_words.unsqueeze(1)], dim=1)
        logps = torch.cat([logps[rows], step_logp.unsqueeze(1)], dim=1)
        if alphas is not None:
            alphas = torch.cat([alphas[rows], alpha[rows].unsqueeze(1)], dim=1)
        state = _reorder(state, rows)
        scores, prev = keep_scores, keep_words

        # Which images are done: k finished and no live beam can still beat the k-th of them.
        best_alive = (scores.max(dim=1).values / bound).tolist()
        last = t == max_length - 1
        if watch is not None:  # the words all live beams of each image share, and the worst
            live = tokens.view(n, k, -1)
            live_shared = (live == live[:, :1]).all(dim=1).long().cumprod(dim=1).sum(1).tolist()
            worst = scores.min(dim=1).values / length_penalty_factor(t + 1, length_penalty)
            live_worst = worst.tolist()
        still = []
        for i, img in enumerate(active):
            fin = sorted(finished[img], key=lambda h: -h.score)[:k]
            finished[img] = fin
            stop = watch is not None and not watch.wanted(img)
            if last or stop:
                if len(fin) < n_best:  # cut at max_length: the live beams become results
                    for j in range(k):
                        raw = float(scores[i, j])
                        if raw == float("-inf"):
                            continue
                        row = i * k + j
                        fin.append(
                            Hypothesis(
                                tokens[row].tolist(),
                                logps[row].tolist(),
                                alphas[row].float().cpu() if alphas is not None else None,
                                raw / length_penalty_factor(t + 1, length_penalty),
                                False,
                            )
                        )
                done = True
            else:
                done = len(fin) >= k and best_alive[i] <= fin[-1].score
            if not done:
                still.append(i)
            if watch is not None and not stop:
                told[img] = _tell_beam(
                    watch,
                    img,
                    told[img],
                    done,
                    fin,
                    live_shared[i],
                    live_worst[i],
                    i * k,
                    tokens,
                    logps,
                    alphas,
                )
        if not still:
            break
        if len(still) < n:
            if not owned:  # the slots are about to be overwritten: not in the caller's tensor
                memory.features, owned = memory.features.clone(), True
            memory, order = _drop_images(memory, still)
            keep = torch.tensor(order, device=device)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k, device=device)).view(-1)
            state = _reorder(state, keep_rows)
            tokens, logps, prev = tokens[keep_rows], logps[keep_rows], prev[keep_rows]
            alphas = alphas[keep_rows] if alphas is not None else None
            scores = scores[keep]
            active = [active[i] for i in order]
    return [sorted(f, key=lambda h: -h.score)[:n_best] for f in finished]


def _tell_beam(
    watch: Watch,
    img: int,
    told: int,
    done: bool,
    fin: list[Hypothesis],
    live_shared: int,
    live_worst: float,
    row: int,
    tokens: torch.Tensor,
    logps: torch.Tensor,
    alphas: torch.Tensor | None,
) -> int:
    """Tell the watch image `img`'s words from the `told`-th on that the search commits to;
    returns how many it has told in all.

    Once the image is done, that is the rest of its best hypothesis. Before, it is the prefix its
    live beams (the first at `row`) all share, `live_shared` words, cut where the best finished
    hypothesis `fin[0]` departs from it unless that one scores below every live beam
    (`live_worst`): a caption that ended early with a poor score would win only if every live
    beam's continuation fell below it, and waiting for that would hold back every word until
    the end. Committing is exact otherwise: finished hypotheses that do not start with the told
    words are dropped from `fin` (in place), so the result always starts with them.
    Beams that share a prefix descend from the one row that held it, so its log-probs and
    attention are the same in all of them and in the result."""
    if done:
        best = max(fin, key=lambda h: h.score)  # what `beam_search` returns first
        watch.words(img, _words(best.tokens, best.token_logprobs, best.attention, told))
        return len(best.tokens)
    ahead = tokens[row].tolist()
    fixed = live_shared
    if fin and fin[0].score >= live_worst:
        fixed = min(fixed, _shared(fin[0].tokens, ahead))
    if fixed <= told:
        return told
    fin[:] = [h for h in fin if h.tokens[:fixed] == ahead[:fixed]]
    att = None if alphas is None else alphas[row]
    watch.words(img, _words(ahead[:fixed], logps[row].tolist(), att, told))
    return fixed


def _drop_images(memory: Memory, still: list[int]) -> tuple[Memory, list[int]]:
    """Keep the images in slots `still` (ascending) as the first m = len(still) slots, in place.

    Each slot below m whose image leaves takes an image staying from a slot at or above m, so the
    copy is one image per image that leaves, and the images that stay where they are are not
    copied at all. Returns the memory of the first m slots (views) and, for each new slot, the
    slot its image came from.
    """
    m, staying = len(still), set(still)
    holes = [s for s in range(m) if s not in staying]
    movers = [s for s in still if s >= m]
    order = list(range(m))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    if holes:
        device = memory.features.device
        dst = torch.tensor(holes, device=device)
        src = torch.tensor(movers, device=device)
        for t in (memory.features, memory.projected, memory.pooled):
            if t is not None:
                t.index_copy_(0, dst, t.index_select(0, src))
    return memory.narrow(m), order
