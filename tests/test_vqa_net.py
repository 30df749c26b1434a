"""The VQA network: shapes, gradients, attention maps, soft-target loss, that it can learn, the
bidirectional question encoder and a question embedding started from word vectors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.vocab import Vocabulary
from captioner.vqa.answerer import Answerer, encode_questions
from captioner.vqa.vqa_net import VQAConfig, VQANet, soft_cross_entropy
from captioner.word_vectors import WordVectors, init_embedding
from tests.conftest import tiny_encoder_config

ROOT = Path(__file__).resolve().parent.parent

QUESTIONS = [
    "what color is the circle?",
    "what shape is the red object?",
    "how many squares are there?",
    "is there a blue triangle?",
    "is the circle to the left of the square?",
]

VARIANTS = {
    "kazemi": dict(glimpses=2),
    "one_glimpse_gru": dict(glimpses=1, cell="gru"),
    "stacked_coords_count_pos": dict(
        glimpses=3, stacked=True, coords=True, count=True, positional=True, normalize=False
    ),
    "question_attention": dict(glimpses=2, question_attention=True, coords=True),
    "relative": dict(glimpses=3, relative=True),
    "all": dict(
        glimpses=2, question_attention=True, stacked=True, coords=True, count=True, relative=True
    ),
    "baseline": dict(attention=False, positional=True),
    "bilstm_all": dict(
        glimpses=2,
        bidirectional=True,
        question_attention=True,
        stacked=True,
        coords=True,
        count=True,
        relative=True,
    ),
    "bigru": dict(glimpses=1, cell="gru", bidirectional=True),
}


def tiny_vqa(vocab_size: int = 30, num_answers: int = 7, seed: int = 0, **kwargs) -> VQANet:
    torch.manual_seed(seed)
    args = dict(embed_dim=8, hidden_dim=12, attention_dim=10, fusion_dim=16, dropout=0.0)
    args.update(kwargs)
    return VQANet.build(tiny_encoder_config(), vocab_size, num_answers, **args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_every_parameter_gets_a_finite_gradient(variant):
    vocab = Vocabulary.build(QUESTIONS)
    net = tiny_vqa(len(vocab), **VARIANTS[variant])
    net.train()
    images = torch.randn(2, 3, 32, 32)
    questions = encode_questions(QUESTIONS, vocab)  # (5, T)
    image_index = torch.tensor([0, 0, 1, 1, 1])
    targets = torch.zeros(5, 7)
    targets[torch.arange(5), torch.tensor([0, 3, 6, 2, 1])] = 1.0
    targets[0, 4] = 0.3
    logits, loss = net(images, questions, image_index, targets)
    assert logits.shape == (5, 7)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("variant", ["kazemi", "stacked_coords_count_pos", "all"])
def test_attention_maps_sum_to_one_per_glimpse(variant):
    net = tiny_vqa(**VARIANTS[variant]).eval()
    glimpses = VARIANTS[variant]["glimpses"]
    feats = net.features(torch.randn(3, 3, 32, 32))
    questions = torch.randint(4, 30, (3, 6))
    logits, alpha = net.head(feats, questions)
    assert alpha.shape == (3, glimpses, net.encoder.num_cells)
    assert torch.allclose(alpha.sum(dim=2), torch.ones(3, glimpses), atol=1e-6)
    assert (alpha >= 0).all()


def test_baseline_has_no_attention():
    net = tiny_vqa(attention=False).eval()
    logits, alpha = net.head(net.features(torch.randn(2, 3, 32, 32)), torch.randint(4, 30, (2, 5)))
    assert alpha is None and logits.shape == (2, 7)
    assert net.attend is None


@pytest.mark.parametrize("variant", ["all", "bilstm_all"])
def test_shared_image_index_equals_repeated_images(variant):
    """Several questions about one image give what repeating the image once per question gives."""
    net = tiny_vqa(**VARIANTS[variant]).eval()
    images = torch.randn(2, 3, 32, 32)
    questions = torch.randint(4, 30, (4, 6))
    index = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        shared, _ = net(images, questions, index)
        repeated, _ = net(images[index], questions)
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["kazemi", "all", "bilstm_all", "bigru"])
def test_padding_changes_nothing(variant):
    net = tiny_vqa(**VARIANTS[variant]).eval()
    feats = net.features(torch.randn(1, 3, 32, 32))
    q = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(net.question(q)[0], net.question(padded)[0])
        torch.testing.assert_close(net.head(feats, q), net.head(feats, padded))


def test_soft_cross_entropy_uses_all_answers_and_skips_unanswerable():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.3, 0.0], [0.0, 0.0, 0.0]])  # second: no answer in vocabulary
    log_p = torch.log_softmax(logits[0], dim=0)
    expected = -(1.0 / 1.3 * log_p[0] + 0.3 / 1.3 * log_p[1])
    torch.testing.assert_close(soft_cross_entropy(logits, targets), expected)


def test_tiny_model_learns_a_tiny_dataset():
    """20 questions about 4 synthetic images (a coloured square in one quadrant) learned exactly."""
    colors = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
    spots = {
        "top left": (0, 0),
        "top right": (0, 16),
        "bottom left": (16, 0),
        "bottom right": (16, 16),
    }
    scenes = [("red", "top left"), ("blue", "bottom right"), ("green", "top right"), ("red", "bottom left")]  # fmt: skip
    images = torch.full((4, 3, 32, 32), -1.0)
    for i, (color, spot) in enumerate(scenes):
        y, x = spots[spot]
        images[i, :, y : y + 16, x : x + 16] = torch.tensor(colors[color]).view(3, 1, 1)
    qa = []
    for i, (color, spot) in enumerate(scenes):
        qa += [(i, "what color is the square?", color), (i, "where is the square?", spot)]
        for c in colors:
            qa.append((i, f"is the square {c}?", "yes" if c == color else "no"))
    assert len(qa) == 20
    vocab = Vocabulary.build(q for _, q, _ in qa)
    answers = sorted({a for _, _, a in qa})
    questions = encode_questions([q for _, q, _ in qa], vocab)
    index = torch.tensor([i for i, _, _ in qa])
    targets = torch.zeros(len(qa), len(answers))
    targets[torch.arange(len(qa)), torch.tensor([answers.index(a) for _, _, a in qa])] = 1.0
    net = tiny_vqa(len(vocab), len(answers), coords=True, hidden_dim=24, fusion_dim=32)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(300):
        _, loss = net(images, questions, index, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    net.eval()
    with torch.no_grad():
        logits, _ = net(images, questions, index)
    predicted = [answers[i] for i in logits.argmax(dim=1)]
    assert predicted == [a for _, _, a in qa]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown cell 'rnn'"):
        VQAConfig(question_vocab_size=5, num_answers=2, feature_dim=4, grid_cells=4, cell="rnn")
    with pytest.raises(ValueError, match="glimpses must be >= 1"):
        VQAConfig(question_vocab_size=5, num_answers=2, feature_dim=4, grid_cells=4, glimpses=0)
    with pytest.raises(ValueError, match="dropout"):
        VQAConfig(question_vocab_size=5, num_answers=2, feature_dim=4, grid_cells=4, dropout=1.0)


def test_config_must_match_the_encoder():
    with pytest.raises(ValueError, match="grid_cells 9 does not match"):
        VQANet(tiny_encoder_config(), VQAConfig(30, 7, feature_dim=16, grid_cells=9))
    with pytest.raises(ValueError, match="feature_dim 5 does not match"):
        VQANet(tiny_encoder_config(), VQAConfig(30, 7, feature_dim=5, grid_cells=16))


def test_a_question_without_words_is_refused():
    net = tiny_vqa().eval()
    with pytest.raises(ValueError, match="at least one word"):
        net.question(torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="has no words"):
        encode_questions(["   "], Vocabulary.build(QUESTIONS))


def test_head_prepared_refuses_memory_that_is_not_prepare_output():
    net = tiny_vqa().eval()
    feats = net.features(torch.randn(2, 3, 32, 32))
    questions = torch.randint(4, 30, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            net.head_prepared(net.prepare(feats), questions)[0], net.head(feats, questions)[0]
        )
        with pytest.raises(ValueError, match="expected prepared image memory"):
            net.head_prepared(feats, questions)  # raw grid features, not prepare(features)


def test_bidirectional_states_are_both_directions_over_the_words_only():
    net = tiny_vqa(bidirectional=True, question_attention=True, glimpses=2).eval()
    H = net.config.hidden_dim
    assert net.config.question_dim == 2 * H and net.config.question_encoder == "bilstm"
    questions = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]])
    with torch.no_grad():
        last, states, mask = net.question(questions)
        assert last.shape == (3, 2 * H) and states.shape == (3, 5, 2 * H)
        for row, n in enumerate([3, 5, 1]):
            words = questions[row : row + 1, :n]
            x = torch.tanh(net.question.embedding(words))  # (1, n, E); dropout is off in eval
            forward, _ = net.question.rnn(x)
            backward, _ = net.question.rnn_back(x.flip(1))  # the words right to left
            torch.testing.assert_close(states[row, :n, :H], forward[0])
            torch.testing.assert_close(states[row, :n, H:], backward[0].flip(0))
            # The question vector: left to right after the last word, right to left after the first.
            torch.testing.assert_close(last[row], torch.cat([forward[0, -1], backward[0, -1]]))
    # Whatever reads the question takes the doubled width.
    assert net.attend.question_proj.in_features == 2 * H
    assert net.attend.words.state_proj.in_features == 2 * H
    assert net.classifier[1].in_features == 2 * net.config.cell_dim + 2 * H


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_one_call_for_both_directions_agrees_with_two(cell):
    # At inference, questions without padding run both directions in one bidirectional kernel
    # call; a padded batch runs the two RNNs. Each question alone must get its row of the batch.
    net = tiny_vqa(bidirectional=True, cell=cell, question_attention=True, glimpses=2).eval()
    calls = []
    net.question.rnn_back.register_forward_hook(lambda *_: calls.append(1))
    questions = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 0, 0, 0, 0]])
    with torch.no_grad():
        last, states, _ = net.question(questions)
        assert len(calls) == 1  # padded: the two RNNs
        for row, n in enumerate([3, 5, 1]):
            alone_last, alone_states, _ = net.question(questions[row : row + 1, :n])
            torch.testing.assert_close(alone_last[0], last[row])
            torch.testing.assert_close(alone_states[0], states[row, :n])
        assert len(calls) == 1  # alone, without padding: one call for both directions
        same_length = torch.tensor([[5, 6, 7], [9, 10, 11]])
        batch_last = net.question(same_length)[0]
        torch.testing.assert_close(batch_last[1], net.question(questions[1:2, 1:4])[0][0])
        assert len(calls) == 1
        net.train()  # training keeps the two RNNs, with or without padding
        net.question(same_length)
        assert len(calls) == 2


def small_vectors(words: list[str], dim: int = 6) -> WordVectors:
    rng = np.random.default_rng(0)
    return WordVectors(words, rng.normal(size=(len(words), dim)).astype(np.float32), "test")


@pytest.mark.parametrize("freeze", [True, False], ids=["frozen", "fine-tuned"])
def test_frozen_vectors_get_no_gradient_and_fine_tuned_ones_do(freeze):
    vectors = small_vectors(["the", "circle", "what", "color", "is", "zebra", "hue", "?"])
    vocab = Vocabulary.build(QUESTIONS).extended(vectors.text_words(8))
    net = tiny_vqa(len(vocab), embed_dim=6, bidirectional=True, question_attention=True)
    init_embedding(net.question.embedding, vocab.itos, vectors, freeze=freeze)
    net.train()
    questions = encode_questions(QUESTIONS[:3], vocab)
    _, loss = net(torch.randn(3, 3, 32, 32), questions, targets=torch.eye(7)[:3])
    loss.backward()
    grad = net.question.embedding.weight.grad
    if freeze:
        assert grad is None
    else:
        used = set(questions.flatten().tolist()) - {vocab.pad_id}
        assert all(grad[i].abs().sum() > 0 for i in used)
        assert grad[vocab.stoi["zebra"]].abs().sum() == 0  # in no question: no gradient
    for name, p in net.named_parameters():
        if name != "question.embedding.weight":
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_word_unseen_in_training_reads_as_its_glove_vector():
    glove = WordVectors.load("glove-6b-50d")
    trained = Vocabulary.build(QUESTIONS)
    vocab = trained.extended(glove.text_words(2000))
    assert "ball" not in trained and "ball" in vocab
    [ids] = encode_questions(["what color is the ball?"], vocab).tolist()
    assert vocab.unk_id not in ids and vocab.stoi["ball"] in ids
    net = tiny_vqa(len(vocab), embed_dim=glove.dim)
    record = init_embedding(net.question.embedding, vocab.itos, glove)
    assert record["rows_from_vectors"] == len(vocab) - 4  # every word but the 4 special tokens
    row = net.question.embedding.weight[vocab.stoi["ball"]].detach()
    np.testing.assert_array_equal(row.numpy(), glove.get("ball"))


def test_a_demo_folder_from_before_the_bidirectional_option_loads_one_way():
    folder = ROOT / "models" / "easy-vqa"
    assert "bidirectional" not in json.loads((folder / "config.json").read_text())["vqa"]
    vqa = Answerer.load(folder)
    assert not vqa.model.config.bidirectional and vqa.model.question.rnn_back is None
    assert vqa.metadata()["question_encoder"] == "lstm"


def test_the_shapes_demo_reads_questions_both_ways():
    vqa = Answerer.load(ROOT / "models" / "shapes-vqa")
    assert vqa.model.config.bidirectional and vqa.model.question.rnn_back is not None
    assert vqa.metadata()["question_encoder"] == "bilstm"
