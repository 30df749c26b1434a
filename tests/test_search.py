import pytest
import torch

from captioner.caption.captioner import Captioner
from captioner.caption.search import (
    Hypothesis,
    Watch,
    Word,
    _log_probs,
    _reorder,
    beam_search,
    greedy,
    length_penalty_factor,
    sample,
)
from captioner.data.shapes import generate_split, render
from captioner.paths import DEFAULT_CAPTION_MODEL
from captioner.vocab import Vocabulary
from tests.conftest import tiny_model

END = Vocabulary.end_id


def _features(model, n=5, seed=1):
    torch.manual_seed(seed)
    return model.features(torch.randn(n, 3, 32, 32)).detach()


@pytest.mark.parametrize("variant", [dict(), dict(attention=False), dict(cell="gru", num_layers=2)])
def test_beam_size_one_equals_greedy(variant):
    model = tiny_model(**variant).eval()
    feats = _features(model)
    g = greedy(model.decoder, feats, max_length=12)
    b = beam_search(model.decoder, feats, beam_size=1, max_length=12)
    for gh, [bh] in zip(g, b):
        assert gh.tokens == bh.tokens
        assert gh.finished == bh.finished
        assert gh.score == pytest.approx(bh.score, abs=1e-5)
        assert gh.token_logprobs == pytest.approx(bh.token_logprobs, abs=1e-5)
        if gh.attention is not None:
            torch.testing.assert_close(gh.attention, bh.attention)


@pytest.mark.parametrize("beam_size", [2, 3, 5])
def test_batched_beam_search_equals_one_image_at_a_time(beam_size):
    model = tiny_model(seed=3).eval()
    feats = _features(model, n=6)
    batched = beam_search(model.decoder, feats, beam_size=beam_size, max_length=15, n_best=2)
    for i in range(6):
        single = beam_search(
            model.decoder, feats[i : i + 1], beam_size=beam_size, max_length=15, n_best=2
        )[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        for a, b in zip(single, batched[i]):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            torch.testing.assert_close(a.attention, b.attention, atol=1e-6, rtol=1e-5)


def test_step_by_step_decoding_reproduces_teacher_forced_logits():
    model = tiny_model(num_layers=2, positional=True).eval()
    feats = _features(model, n=2)
    caps = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 9, 10, 2, 0, 0]])
    logits, _, alphas = model.decoder(feats, caps)
    memory = model.decoder.memory(feats)
    state = model.decoder.init_state(memory)
    with torch.no_grad():
        for t in range(5):
            step_logits, alpha, state = model.decoder.step(memory, state, caps[:, t])
            for i, steps in enumerate([5, 3]):
                if t < steps:
                    torch.testing.assert_close(step_logits[i], logits[i, t], atol=1e-5, rtol=0)
                    torch.testing.assert_close(alpha[i], alphas[i, t], atol=1e-5, rtol=0)


def test_beam_hypotheses_carry_consistent_scores_and_normalised_attention():
    model = tiny_model(seed=5).eval()
    feats = _features(model, n=3)
    for hyps in beam_search(model.decoder, feats, beam_size=4, max_length=10, n_best=4):
        assert len(hyps) == 4
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        for h in hyps:
            assert len(h.tokens) == len(h.token_logprobs) == h.attention.shape[0]
            torch.testing.assert_close(h.attention.sum(-1), torch.ones(len(h.tokens)))
            assert Vocabulary.pad_id not in h.tokens and Vocabulary.start_id not in h.tokens
            # The score of a finished hypothesis is its token log-probs plus that of <end>.
            assert h.score <= sum(h.token_logprobs) + 1e-5


def _never_end(model):
    with torch.no_grad():
        model.decoder.out.bias[END] = -1e4
    return model


def test_search_always_terminates_with_a_caption_when_end_never_wins():
    model = _never_end(tiny_model().eval())
    feats = _features(model, n=2)
    for h in greedy(model.decoder, feats, max_length=7):
        assert len(h.tokens) == 7 and not h.finished
    for [h] in beam_search(model.decoder, feats, beam_size=3, max_length=7):
        assert len(h.tokens) == 7 and not h.finished
    for h in sample(model.decoder, feats, max_length=7):
        assert len(h.tokens) == 7


def test_length_penalty_prefers_longer_captions():
    assert length_penalty_factor(10, 0.0) == 1.0
    assert length_penalty_factor(10, 1.0) > length_penalty_factor(5, 1.0)
    model = tiny_model(seed=7).eval()
    feats = _features(model, n=4)
    short = beam_search(model.decoder, feats, beam_size=4, max_length=15)
    long = beam_search(model.decoder, feats, beam_size=4, max_length=15, length_penalty=2.0)
    assert sum(len(h[0].tokens) for h in long) >= sum(len(h[0].tokens) for h in short)


def test_sampling_is_reproducible_with_a_generator_and_top_k_one_is_greedy():
    model = tiny_model(seed=2).eval()
    feats = _features(model, n=3)
    a = sample(model.decoder, feats, 10, generator=torch.Generator().manual_seed(1))
    b = sample(model.decoder, feats, 10, generator=torch.Generator().manual_seed(1))
    assert [h.tokens for h in a] == [h.tokens for h in b]
    top1 = sample(model.decoder, feats, 10, top_k=1)
    assert [h.tokens for h in top1] == [h.tokens for h in greedy(model.decoder, feats, 10)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beam_size=0), "beam_size"),
        (dict(max_length=0), "max_length"),
        (dict(n_best=4, beam_size=3), "n_best"),
        (dict(length_penalty=-1.0), "length_penalty"),
    ],
)
def test_bad_search_arguments_are_clear_errors(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        beam_search(model.decoder, _features(model, 1), **kwargs)


# -- the search before image memory was shared by beams, kept as the reference -----------------
@torch.inference_mode()
def _per_beam_copies_beam_search(decoder, features, beam_size, max_length, n_best=1):
    """The batched beam search as it was: every beam holds a copy of its image's memory (the
    memory is repeated k times, one row per beam, and re-copied when an image finishes)."""
    START = Vocabulary.start_id
    B, L, k = features.shape[0], features.shape[1], beam_size
    memory = decoder.memory(features)
    memory = memory.index_select(torch.arange(B).repeat_interleave(k))
    state = decoder.init_state(memory)
    scores = torch.full((B, k), float("-inf"))
    scores[:, 0] = 0.0
    prev = torch.full((B * k,), START, dtype=torch.long)
    tokens = torch.empty(B * k, 0, dtype=torch.long)
    logps = torch.empty(B * k, 0)
    alphas = torch.empty(B * k, 0, L) if decoder.attend is not None else None
    active = list(range(B))
    finished = [[] for _ in range(B)]
    for t in range(max_length):
        logits, alpha, state = decoder.step(memory, state, prev)
        logp = _log_probs(logits)
        n, V = len(active), logp.shape[1]
        cand = (scores.view(n * k, 1) + logp).view(n, k * V)
        top_scores, top_idx = cand.topk(min(2 * k, k * V), dim=1)
        beam, word = top_idx // V, top_idx % V
        is_end = word == END
        alive = ~is_end & (torch.cumsum(~is_end, dim=1) <= k)
        keep_scores = top_scores[alive].view(n, k)
        rows = (torch.arange(n).unsqueeze(1) * k + beam)[alive].view(-1)
        keep_words = word[alive].view(-1)
        for i, r in (is_end & (torch.arange(top_idx.shape[1]) < k)).nonzero().tolist():
            raw = float(top_scores[i, r])
            if raw != float("-inf"):
                row = i * k + int(beam[i, r])
                att = alphas[row].clone() if alphas is not None else None
                hyp = Hypothesis(tokens[row].tolist(), logps[row].tolist(), att, raw, True)
                finished[active[i]].append(hyp)
        step_logp = logp.view(n * k, V)[rows, keep_words]
        tokens = torch.cat([tokens[rows], keep_words.unsqueeze(1)], dim=1)
        logps = torch.cat([logps[rows], step_logp.unsqueeze(1)], dim=1)
        if alphas is not None:
            alphas = torch.cat([alphas[rows], alpha[rows].unsqueeze(1)], dim=1)
        state = _reorder(state, rows)
        scores, prev = keep_scores, keep_words
        best_alive = scores.max(dim=1).values.tolist()
        still = []
        for i, img in enumerate(active):
            fin = finished[img] = sorted(finished[img], key=lambda h: -h.score)[:k]
            if t == max_length - 1:
                if len(fin) < n_best:
                    for j in range(k):
                        raw, row = float(scores[i, j]), i * k + j
                        if raw != float("-inf"):
                            att = alphas[row].clone() if alphas is not None else None
                            hyp = Hypothesis(
                                tokens[row].tolist(), logps[row].tolist(), att, raw, False
                            )
                            fin.append(hyp)
            elif not (len(fin) >= k and best_alive[i] <= fin[-1].score):
                still.append(i)
        if not still:
            break
        if len(still) < n:
            keep = torch.tensor(still)
            keep_rows = (keep.unsqueeze(1) * k + torch.arange(k)).view(-1)
            memory = memory.index_select(keep_rows)
            state = _reorder(state, keep_rows)
            tokens, logps, prev = tokens[keep_rows], logps[keep_rows], prev[keep_rows]
            alphas = alphas[keep_rows] if alphas is not None else None
            scores = scores[keep]
            active = [active[i] for i in still]
    return [sorted(f, key=lambda h: -h.score)[:n_best] for f in finished]


def _assert_same_hypotheses(got, want):
    assert [[h.tokens for h in hs] for hs in got] == [[h.tokens for h in hs] for hs in want]
    for hs, ws in zip(got, want, strict=True):
        for h, w in zip(hs, ws, strict=True):
            assert h.finished == w.finished
            assert h.score == pytest.approx(w.score, abs=1e-5)
            assert h.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-5)
            if w.attention is not None:
                torch.testing.assert_close(h.attention, w.attention, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def demo_features():
    """The demo captioner and its encoder grids of 12 shapes scenes (1 to 4 objects each)."""
    captioner = Captioner.load(DEFAULT_CAPTION_MODEL)
    images = [render(scene) for scene in generate_split(12, seed=7)]
    return captioner.model.decoder, captioner.encode(captioner.preprocess(images))


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize(
    "model",
    [
        *("demo", "random", "random-gru-2", "random-no-attention", "random-preview-2"),
        *("random-mass", "random-similar", "random-refine"),
    ],
)
def test_shared_memory_search_equals_per_beam_copies(model, beam_size, demo_features):
    """Beams reading their image's one memory give the captions, scores, log-probs and attention
    of the search that copied the memory per beam, with images finishing at different steps."""
    if model == "demo":
        decoder, feats = demo_features
        max_length = 20
    else:
        variant = {
            "random": {},
            "random-gru-2": dict(cell="gru", num_layers=2),
            "random-no-attention": dict(attention=False),
            "random-preview-2": dict(preview_steps=2),
            "random-mass": dict(attention_mass=True, preview_steps=1),
            "random-similar": dict(similarity_mass=True, preview_steps=1),
            "random-refine": dict(refine_layers=1, preview_steps=1),
        }[model]
        net = tiny_model(seed=3, **variant).eval()
        with torch.no_grad():  # sharper words and a likelier <end>: captions end at 0..12 words
            net.decoder.out.weight.mul_(5.0)
            net.decoder.out.bias[END] = 1.0
        torch.manual_seed(1)
        decoder, feats, max_length = net.decoder, 5 * torch.randn(8, 16, 16), 12
    n_best = min(2, beam_size)
    got = beam_search(decoder, feats, beam_size, max_length, n_best=n_best)
    want = _per_beam_copies_beam_search(decoder, feats, beam_size, max_length, n_best)
    _assert_same_hypotheses(got, want)
    # The images leave the batch at different steps: the search drops finished images.
    lengths = {len(hs[0].tokens) for hs in got}
    assert len(lengths) > 1, lengths
    if beam_size == 1:
        for g, [b] in zip(greedy(decoder, feats, max_length), got, strict=True):
            assert g.tokens == b.tokens


def test_each_step_reads_one_memory_per_live_image_and_leaves_the_callers_features(demo_features):
    decoder, feats = demo_features
    before = feats.clone()
    seen = []
    step = decoder.step

    def spy(memory, state, prev):
        seen.append((len(memory), prev.shape[0], memory.features.data_ptr()))
        return step(memory, state, prev)

    decoder.step = spy
    try:
        hyps = beam_search(decoder, feats, beam_size=4, max_length=20)
    finally:
        del decoder.step
    assert torch.equal(feats, before)
    images = [n for n, _, _ in seen]
    assert images[0] == len(feats) and images[-1] < images[0]  # images left as they finished
    assert images == sorted(images, reverse=True)
    # One memory per live image, read by its 4 beams (one row each after the first step).
    assert seen[0][1] == len(feats) and all(rows == 4 * n for n, rows, _ in seen[1:])
    # The memory stays where it is (the demo model adds positions, so it is the search's own
    # copy from the start): finished images make room in place, the rest is never re-copied.
    assert len({ptr for _, _, ptr in seen}) == 1
    assert [h[0].tokens for h in hyps] == [
        h[0].tokens for h in _per_beam_copies_beam_search(decoder, feats, 4, 20)
    ]


def test_beams_wider_than_the_vocabulary_match_per_beam_copies():
    """With k >= V the first step cannot take k words from one row: k rows start, k-1 at -inf."""
    net = tiny_model(vocab_size=6, seed=4).eval()
    torch.manual_seed(2)
    feats = 5 * torch.randn(3, 16, 16)
    got = beam_search(net.decoder, feats, beam_size=6, max_length=5, n_best=3)
    _assert_same_hypotheses(got, _per_beam_copies_beam_search(net.decoder, feats, 6, 5, 3))


class _Recorder(Watch):
    """Every word a search tells, with the decoder step it was told after; stops images after
    a number of words on request. Counts steps by wrapping `decoder.step` while in use."""

    def __init__(self, decoder, stop_after_words: dict[int, int] | None = None):
        self.decoder = decoder
        self.heard: dict[int, list[tuple[int, Word]]] = {}
        self.steps = 0
        self.asked: list[tuple[int, int]] = []  # (step, image) of each `wanted` call
        self.stop_after_words = stop_after_words or {}

    def __enter__(self):
        step = self.decoder.step

        def counting(*args):
            self.steps += 1
            return step(*args)

        self.decoder.step = counting
        return self

    def __exit__(self, *exc):
        del self.decoder.step

    def words(self, image, words):
        self.heard.setdefault(image, []).extend((self.steps, w) for w in words)

    def wanted(self, image):
        self.asked.append((self.steps, image))
        limit = self.stop_after_words.get(image)
        return limit is None or len(self.heard.get(image, [])) < limit


def _sharp_random_decoder(seed=3, **variant):
    net = tiny_model(seed=seed, **variant).eval()
    with torch.no_grad():  # sharper words and a likelier <end>: captions end at 0..12 words
        net.decoder.out.weight.mul_(5.0)
        net.decoder.out.bias[END] = 1.0
    torch.manual_seed(1)
    return net.decoder, 5 * torch.randn(8, 16, 16)


def _assert_heard_is_result(recorder, hyps):
    for image, hyp in enumerate(hyps):
        heard = [w for _, w in recorder.heard.get(image, [])]
        assert [w.position for w in heard] == list(range(len(hyp.tokens)))
        assert [w.token for w in heard] == hyp.tokens
        assert [w.logprob for w in heard] == hyp.token_logprobs
        if hyp.attention is None:
            assert all(w.attention is None for w in heard)
        elif heard:
            assert torch.equal(torch.stack([w.attention for w in heard]), hyp.attention)


@pytest.mark.parametrize("beam_size", [1, 3, 5])
@pytest.mark.parametrize("model", ["demo", "random", "random-no-attention"])
def test_watched_words_are_the_final_captions_and_come_while_searching(
    model, beam_size, demo_features
):
    """A watch hears each image's words once, in order, equal to the returned hypothesis (tokens,
    log-probs, attention bit for bit); watching changes nothing; and words come before the end:
    beam 1 a word per step, wider beams as soon as every hypothesis that can still win agrees."""
    if model == "demo":
        (decoder, feats), max_length = demo_features, 20
    else:
        decoder, feats = _sharp_random_decoder(
            **({"attention": False} if model == "random-no-attention" else {})
        )
        max_length = 12
    with _Recorder(decoder) as recorder:
        got = beam_search(decoder, feats, beam_size, max_length, watch=recorder)
    _assert_same_hypotheses(got, beam_search(decoder, feats, beam_size, max_length))
    _assert_heard_is_result(recorder, [hs[0] for hs in got])
    if beam_size == 1:  # greedy: word p is told right after step p + 1 picked it
        for heard in recorder.heard.values():
            assert [step for step, _ in heard] == [w.position + 1 for _, w in heard]
    if beam_size > 1 and model == "demo":
        # Some first words are fixed (every live beam agrees) before their caption is done.
        done_at = [len(hs[0].tokens) + 1 for hs in got]
        assert any(recorder.heard[i][0][0] < done_at[i] for i in range(len(got)))


@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_greedy_and_sampling_tell_every_word_at_its_step(method):
    decoder, feats = _sharp_random_decoder()
    recorder = _Recorder(decoder).__enter__()
    if method == "greedy":
        hyps = greedy(decoder, feats, 12, watch=recorder)
        assert [h.tokens for h in hyps] == [h.tokens for h in greedy(decoder, feats, 12)]
    else:
        gen = torch.Generator().manual_seed(5)
        hyps = sample(decoder, feats, 12, generator=gen, watch=recorder)
        again = sample(decoder, feats, 12, generator=torch.Generator().manual_seed(5))
        assert [h.tokens for h in hyps] == [h.tokens for h in again]
    recorder.__exit__()
    _assert_heard_is_result(recorder, hyps)
    for heard in recorder.heard.values():
        assert [step for step, _ in heard] == [w.position + 1 for _, w in heard]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_watch_that_stops_wanting_an_image_ends_its_search(beam_size, demo_features):
    """Images the watch drops hear no more words and stop costing steps; the others get the
    same captions as without the watch; once nobody is wanted the search ends."""
    decoder, feats = demo_features
    want = beam_search(decoder, feats, beam_size, 20)
    # Two images whose first word is fixed before their last one, so stopping there saves steps.
    with _Recorder(decoder) as everything:
        beam_search(decoder, feats, beam_size, 20, watch=everything)
    early = [i for i, told in sorted(everything.heard.items()) if told[0][0] < told[-1][0]]
    assert len(early) >= 2, everything.heard
    stops = dict.fromkeys(early[:2], 1)
    with _Recorder(decoder, stop_after_words=stops) as recorder:
        got = beam_search(decoder, feats, beam_size, 20, watch=recorder)
    # Told words stop at the limit (a step may tell several at once); then it is never asked
    # about again: it left the search.
    for image, limit in stops.items():
        told = recorder.heard[image]
        assert limit <= len(told) < len(want[image][0].tokens)
        last_told = told[limit - 1][0]
        asked = [step for step, i in recorder.asked if i == image]
        assert asked[-1] == last_told + 1  # asked once more, after the step that told it
        assert all(step <= last_told for step, _ in told)
    others = [i for i in range(len(feats)) if i not in stops]
    _assert_same_hypotheses([got[i] for i in others], [want[i] for i in others])

    with _Recorder(decoder, stop_after_words=dict.fromkeys(range(len(feats)), 0)) as nobody:
        beam_search(decoder, feats, beam_size, 20, watch=nobody)
    assert nobody.steps == 1 < recorder.steps and not nobody.heard


def test_fused_attention_energy_gives_the_eager_search_and_leaves_training_alone():
    """`SoftAttention.fuse` (torch.compile of add, tanh and score) is an inference-only change:
    the same captions and, within float rounding, the same log-probs and attention."""
    decoder, feats = _sharp_random_decoder()
    want = beam_search(decoder, feats, 3, 12)
    decoder.attend.fuse()
    try:
        got = beam_search(decoder, feats, 3, 12)
        got_greedy = greedy(decoder, feats[:3], 12)  # another batch size: compiled dynamically
        assert [h[0].tokens for h in got] == [h[0].tokens for h in want]
        for g, w in zip(got, want, strict=True):
            assert g[0].token_logprobs == pytest.approx(w[0].token_logprobs, abs=1e-5)
            torch.testing.assert_close(g[0].attention, w[0].attention, atol=1e-6, rtol=1e-5)
        assert [h.tokens for h in got_greedy] == [
            h[0].tokens for h in beam_search(decoder, feats[:3], 1, 12)
        ]
        # Training reads the eager path (the compiled function is never differentiated).
        memory = decoder.memory(feats[:2])
        hidden = torch.randn(2, decoder.config.hidden_dim, requires_grad=True)
        with torch.enable_grad():
            context, *_ = decoder.attend(memory.features, memory.projected, hidden)
            context.sum().backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    finally:
        decoder.attend.fused = None


def test_a_captioner_loaded_with_fused_attention_captions_as_the_eager_one(tmp_path):
    """`Captioner.load(fuse_attention=True)` compiles while it loads and gives the same captions;
    a captioner without attention has nothing to fuse; int8 and fusing do not combine."""
    eager = Captioner.load(DEFAULT_CAPTION_MODEL)
    fused = Captioner.load(DEFAULT_CAPTION_MODEL, fuse_attention=True)
    assert fused.model.decoder.attend.fused is not None
    images = [render(scene) for scene in generate_split(6, seed=21)]
    for want, got in zip(eager.caption(images), fused.caption(images), strict=True):
        assert got.tokens == want.tokens
        assert got.token_logprobs == pytest.approx(want.token_logprobs, abs=1e-5)
    vocab = Vocabulary.build(["a red circle", "two blue squares"])
    plain = Captioner(tiny_model(len(vocab), attention=False), vocab)
    assert plain.fuse_attention() is False
    with pytest.raises(ValueError, match="fuse_attention works on float weights.*int8"):
        Captioner.load(DEFAULT_CAPTION_MODEL, quantize="int8", fuse_attention=True)
