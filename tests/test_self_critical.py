"""Self-critical training (caption/self_critical.py, train_captioner --scst-from): the reward,
the sign of its gradient, and training runs that resume as if never stopped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner import Captioner
from captioner.caption.search import beam_search
from captioner.caption.self_critical import (
    SelfCritical,
    beam_candidates,
    caption_words,
    sample_captions,
)
from captioner.data.shapes import generate_split
from captioner.evaluation.cider import CiderD
from captioner.vocab import Vocabulary
from tests.conftest import TINY_CAPTIONS, tiny_model
from training import train_captioner
from training.make_shapes import write_split

START = Vocabulary.start_id


@torch.no_grad()
def _logprob(net, features: torch.Tensor, steps: list[int]) -> float:
    """log p(steps) under the sampling distribution (no <pad>/<start>), teacher-forced."""
    decoder = net.decoder
    memory = decoder.memory(features)
    state = decoder.init_state(memory)
    prev, total = torch.tensor([START]), 0.0
    for word in steps:
        logits, _, state = decoder.step(memory, state, prev)
        logits = logits.clone()
        logits[:, [Vocabulary.pad_id, START]] = float("-inf")
        total += float(F.log_softmax(logits, dim=1)[0, word])
        prev = torch.tensor([word])
    return total


@pytest.mark.parametrize("better", ["sample", "greedy"])
def test_a_sample_better_than_greedy_is_made_likelier_and_a_worse_one_less(better):
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=3).train()
    features = torch.randn(1, 16, net.decoder.config.feature_dim)
    torch.manual_seed(11)
    steps = sample_captions(net, features, 8)[0][0].tolist()  # the words, and <end> if reached
    sampled = caption_words(steps)
    net.eval()
    greedy_words = Captioner(net, vocab).caption_features(features, method="greedy")[0]
    greedy_ids = [vocab.stoi[w] for w in greedy_words.tokens]
    net.train()
    assert sampled != greedy_ids  # otherwise the advantage is 0 and nothing is learned
    reference = sampled if better == "sample" else greedy_ids
    others = {i + 1: [vocab.encode(c, add_special=False)] for i, c in enumerate(TINY_CAPTIONS)}
    cider = CiderD({0: [reference]}, document_frequency_from={0: [reference], **others})
    objective = SelfCritical(net, cider, samples=1, max_length=8)
    before = _logprob(net, features, steps)
    torch.manual_seed(11)  # the same sample again
    loss, stats = objective(features, [0])
    assert (stats["reward"] > stats["baseline"]) == (better == "sample")
    loss.backward()
    assert all(p.grad is not None for p in net.decoder.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = _logprob(net, features, steps)
    assert (after > before) == (better == "sample"), (before, after)


def test_the_mean_baseline_is_the_other_samples_reward_and_bad_options_are_refused():
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab))
    cider = CiderD({0: [[4, 5, 6]], 1: [[7, 8]]})
    loss, stats = SelfCritical(net, cider, samples=3, baseline="mean", max_length=5)(
        torch.randn(2, 16, net.decoder.config.feature_dim), [0, 1]
    )
    assert stats["baseline"] == pytest.approx(stats["reward"]) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="samples >= 2"):
        SelfCritical(net, cider, samples=1, baseline="mean")
    with pytest.raises(ValueError, match="baseline must be one of"):
        SelfCritical(net, cider, baseline="best")


def test_the_policy_weight_scales_the_reward_term_and_zero_leaves_the_cross_entropy_alone():
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=5).eval()  # no dropout: the same loss for the same sample
    features = torch.randn(3, 16, net.decoder.config.feature_dim)
    captions = [vocab.encode(c) for c in TINY_CAPTIONS[:3]]
    width = max(map(len, captions))
    padded = torch.tensor([c + [0] * (width - len(c)) for c in captions])
    cider = CiderD({i: [c[1:-1]] for i, c in enumerate(captions)})

    def loss(policy: float, xe: float) -> tuple[float, dict]:
        torch.manual_seed(2)
        objective = SelfCritical(net, cider, samples=2, policy_weight=policy, xe_weight=xe)
        value, stats = objective(features, [0, 1, 2], padded)
        return value.item(), stats

    policy, stats = loss(1.0, 0.0)
    assert set(stats) == {"reward", "baseline"} and policy != 0
    assert loss(2.0, 0.0)[0] == pytest.approx(2 * policy)
    xe = net.decoder(features, padded)[1].item()
    assert loss(2.0, 0.5)[0] == pytest.approx(2 * policy + 0.5 * xe)
    control, stats = loss(0.0, 0.5)  # nothing sampled: no reward, and the RNG is untouched
    drawn_next = torch.rand(1)
    assert stats == {} and control == pytest.approx(0.5 * xe)
    torch.manual_seed(2)
    assert torch.equal(drawn_next, torch.rand(1))
    with pytest.raises(ValueError, match="both 0"):
        SelfCritical(net, cider, policy_weight=0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        SelfCritical(net, cider, policy_weight=-1.0)


def test_given_captions_get_the_log_probabilities_of_the_teacher_forced_decoder():
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=4).eval()
    features = torch.randn(3, 16, net.decoder.config.feature_dim)
    captions = [vocab.encode(c) for c in TINY_CAPTIONS[:3]]  # <start> words <end>
    width = max(map(len, captions))
    padded = torch.tensor([c + [0] * (width - len(c)) for c in captions])
    given = torch.tensor([c[1:] + [Vocabulary.end_id] * (width - len(c)) for c in captions])
    words, logps, mask = sample_captions(net, features, 20, given)
    assert torch.equal(words, given)
    assert mask.sum(1).tolist() == [len(c) - 1 for c in captions]  # the words and <end>
    logits, _, _ = net.decoder(features, padded)
    logits[..., [Vocabulary.pad_id, START]] = float("-inf")
    forced = F.log_softmax(logits, dim=-1).gather(2, padded[:, 1:, None]).squeeze(2)
    assert torch.allclose(logps[mask.bool()], forced[mask.bool()], atol=1e-5)


def test_beam_candidates_are_the_beam_searchs_best_captions():
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=5).train()
    features = torch.randn(2, 16, net.decoder.config.feature_dim)
    rows = beam_candidates(net, features, 3, 6)
    assert net.training  # the search ran in eval mode and the mode came back
    net.eval()
    found = beam_search(net.decoder, features, 3, 6, n_best=3)
    for b, image in enumerate(found):
        for j, h in enumerate(image):
            row = rows[b * 3 + j].tolist()
            assert caption_words(row) == h.tokens
            assert (Vocabulary.end_id in row) == h.finished


@pytest.mark.parametrize("better", [0, 1])
def test_with_beam_candidates_the_better_caption_is_made_likelier_than_the_other(better):
    vocab = Vocabulary.build(TINY_CAPTIONS)
    net = tiny_model(len(vocab), seed=8).train()  # two captions cut at 8 words, not alike
    features = torch.randn(1, 16, net.decoder.config.feature_dim)
    rows = beam_candidates(net, features, 2, 8)
    found = [caption_words(r) for r in rows.tolist()]
    assert found[0] != found[1]
    reference = found[better]
    others = {i + 1: [vocab.encode(c, add_special=False)] for i, c in enumerate(TINY_CAPTIONS)}
    cider = CiderD({0: [reference]}, document_frequency_from={0: [reference], **others})
    objective = SelfCritical(net, cider, samples=2, baseline="mean", max_length=8, search="beam")
    steps = [r.tolist()[: len(w) + 1] for r, w in zip(rows, found)]  # with <end> when finished
    before = [_logprob(net, features, s) for s in steps]
    loss, stats = objective(features, [0])
    assert stats["reward"] == pytest.approx(stats["baseline"])  # the mean of the two
    assert cider.score(0, found[better]) > cider.score(0, found[1 - better])
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    after = [_logprob(net, features, s) for s in steps]
    other = 1 - better
    assert after[better] - after[other] > before[better] - before[other], (before, after)
    with pytest.raises(ValueError, match="search must be one of"):
        SelfCritical(net, cider, search="greedy")


TINY = ["--input-size", "32", "--encoder-width", "4", "--embed-dim", "16", "--hidden-dim", "24"]
TINY += ["--attention-dim", "12", "--warmup-steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny shapes split and a captioner trained on it for two epochs."""
    root = tmp_path_factory.mktemp("shapes")
    write_split(generate_split(24, seed=5, size=32), root / "train")
    write_split(generate_split(6, seed=6, size=32, start_id=1000), root / "val")
    argv = ["--data", str(root), "--out", str(root / "xe"), "--epochs", "2", *TINY]
    argv += ["--references", "first", "--batch-size", "8"]
    train_captioner.main(train_captioner.get_args_parser().parse_args(argv), argv)
    return root


def _scst(argv):
    return train_captioner.main(train_captioner.get_args_parser().parse_args(argv), argv)


@pytest.mark.parametrize("search", ["sample", "beam"])
def test_scst_runs_from_a_model_folder_and_resumes_as_an_uninterrupted_run(
    trained, tmp_path, search
):
    common = ["--data", str(trained), "--scst-from", str(trained / "xe" / "best"), "--epochs", "2"]
    common += ["--batch-size", "6", "--scst-samples", "2", "--no-progress", "--device", "cpu"]
    common += ["--scst-search", search]
    common += ["--scst-xe-weight", "0.5", "--warmup-steps", "1"]
    straight = _scst([*common, "--out", str(tmp_path / "a")])
    assert straight["step"] == 8  # 24 images, 6 per step, 2 epochs
    line = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"train_reward"' in line and '"CIDEr"' in line
    stopped = _scst([*common, "--out", str(tmp_path / "b"), "--stop-after-steps", "5"])
    assert stopped["step"] == 5
    resumed = _scst(["--out", str(tmp_path / "b"), "--resume"])
    assert resumed["step"] == 8 and resumed["weights_sha256"] == straight["weights_sha256"]
    start = Captioner.load(trained / "xe" / "best").model.encoder.state_dict()
    for name, tensor in Captioner.load(tmp_path / "a" / "best").model.encoder.state_dict().items():
        assert torch.equal(tensor, start[name]), name  # the CNN stays as it was


def test_the_cross_entropy_control_runs_without_rewards_and_refuses_an_empty_objective(
    trained, tmp_path
):
    common = ["--data", str(trained), "--scst-from", str(trained / "xe" / "best"), "--epochs", "1"]
    common += ["--batch-size", "6", "--no-progress", "--device", "cpu", "--scst-weight", "0"]
    with pytest.raises(ValueError, match="--scst-weight 0 needs --scst-xe-weight"):
        _scst([*common, "--out", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="must be >= 0"):
        _scst([*common, "--scst-xe-weight", "-1", "--out", str(tmp_path / "neg")])
    done = _scst([*common, "--scst-xe-weight", "1", "--out", str(tmp_path / "xe")])
    assert done["step"] == 4  # 24 images, 6 per step
    line = (tmp_path / "xe" / "metrics.jsonl").read_text().splitlines()[0]
    assert '"train_reward"' not in line and '"CIDEr"' in line
    start = Captioner.load(trained / "xe" / "best").model
    after = Captioner.load(tmp_path / "xe" / "last").model
    for name, tensor in after.encoder.state_dict().items():
        assert torch.equal(tensor, start.encoder.state_dict()[name]), name
    changed = [
        name
        for name, tensor in after.decoder.state_dict().items()
        if not torch.equal(tensor, start.decoder.state_dict()[name])
    ]
    assert changed  # the decoder learned from the cross-entropy
