import pytest
import torch

from captioner.caption.search import beam_search, greedy, length_penalty_factor, sample
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
