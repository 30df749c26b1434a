import pytest
import torch
import torch.nn.functional as F

from captioner.caption.decoder import DecoderConfig
from tests.conftest import tiny_model

CAPS = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 2, 0, 0, 0], [1, 9, 10, 11, 12, 2]])


@pytest.mark.parametrize(
    "variant",
    [
        dict(),
        dict(cell="gru"),
        dict(cell="rnn"),
        dict(num_layers=2, dropout=0.3),
        dict(attention=False),
        dict(positional=True),
        dict(hard_attention=True),
        dict(hard_attention=True, hard_expected=0.0),
        dict(hard_attention=True, hard_expected=1.0),
        dict(word_dim=6),
        dict(attention_mass=True, hard_attention=True),
        dict(similarity_mass=True, attention_mass=True, hard_attention=True),
        dict(refine_layers=2, positional=True),
        dict(refine_layers=1, attention=False),
    ],
    ids=[
        *("lstm", "gru", "rnn", "lstm2", "no-attention", "positional", "hard-attention"),
        *("hard-all-sampled", "hard-all-expected", "word-dim", "mass-hard", "similar-hard"),
        *("refine-2", "refine-no-attention"),
    ],
)
def test_every_parameter_gets_a_finite_gradient(variant):
    model = tiny_model(**variant).train()
    logits, loss = model(torch.randn(3, 3, 32, 32), CAPS)
    assert logits.shape == (3, 5, 30)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name.endswith("embedding.weight"):
            assert p.grad is not None
            continue
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_padding_is_not_computed_and_does_not_change_outputs():
    model = tiny_model().eval()
    feats = model.features(torch.randn(3, 3, 32, 32))
    logits, loss, alphas = model.decoder(feats, CAPS)
    # Logits at padded steps are never computed.
    assert torch.all(logits[0, 4:] == 0) and torch.all(logits[1, 2:] == 0)
    # Extra padding columns change nothing.
    padded = torch.cat([CAPS, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    logits2, loss2, _ = model.decoder(feats, padded)
    torch.testing.assert_close(logits2[:, :5], logits)
    torch.testing.assert_close(loss2, loss)
    # Each caption alone gives the same logits as in the batch.
    for i in range(3):
        n = int((CAPS[i] != 0).sum())
        alone, _, _ = model.decoder(feats[i : i + 1], CAPS[i : i + 1, :n])
        torch.testing.assert_close(alone[0], logits[i, : n - 1], atol=1e-5, rtol=1e-5)


def test_attention_maps_sum_to_one_on_real_steps():
    model = tiny_model().eval()
    _, _, alphas = model.decoder(model.features(torch.randn(3, 3, 32, 32)), CAPS)
    assert alphas.shape == (3, 5, 16)
    torch.testing.assert_close(alphas[2].sum(-1), torch.ones(5))
    torch.testing.assert_close(alphas[1, 0].sum(), torch.tensor(1.0))


def test_doubly_stochastic_term_adds_to_the_loss():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    _, with_term = tiny_model(doubly_stochastic=1.0).eval()(x, CAPS)
    _, without = tiny_model(doubly_stochastic=0.0).eval()(x, CAPS)
    assert with_term > without


def test_lstm_forget_gate_bias_is_one():
    model = tiny_model()
    cell = model.decoder.cells[0]
    h = model.decoder.config.hidden_dim
    total = cell.bias_ih + cell.bias_hh
    assert torch.all(total[h : 2 * h] == 1) and torch.all(total[:h] == 0)


def test_bad_configs_and_captions_are_clear_errors():
    with pytest.raises(ValueError, match="cell"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, cell="transformer")
    with pytest.raises(ValueError, match="dropout"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, dropout=1.5)
    with pytest.raises(ValueError, match="word_dim must be >= 0"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, word_dim=-1)
    with pytest.raises(ValueError, match="preview_steps must be >= 0"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, preview_steps=-1)
    with pytest.raises(ValueError, match="attention_mass needs attention"):
        DecoderConfig(
            vocab_size=5, feature_dim=4, grid_cells=4, attention_mass=True, attention=False
        )
    with pytest.raises(ValueError, match="preview_steps needs attention"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, preview_steps=1, attention=False)
    with pytest.raises(ValueError, match="refine_layers must be >= 0"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, refine_layers=-1)
    with pytest.raises(ValueError, match="refine_heads must be >= 1 and divide feature_dim 6"):
        DecoderConfig(vocab_size=5, feature_dim=6, grid_cells=4, refine_layers=1, refine_heads=4)
    model = tiny_model()
    with pytest.raises(ValueError, match="at least"):
        model(torch.randn(1, 3, 32, 32), torch.tensor([[1, 0, 0]]))


def test_a_word_table_of_another_width_is_mapped_to_embed_dim():
    model = tiny_model(word_dim=6)  # embed_dim 16
    decoder = model.decoder
    assert decoder.embedding.weight.shape == (30, 6) and decoder.word_proj.weight.shape == (16, 6)
    tokens = torch.tensor([5, 0, 7])
    torch.testing.assert_close(
        decoder.embed(tokens), decoder.embedding(tokens) @ decoder.word_proj.weight.T
    )
    assert tiny_model().decoder.word_proj is None  # word_dim 0: the table is embed_dim wide
    assert tiny_model(word_dim=16).decoder.word_proj is None


def test_precomputed_features_equal_images():
    model = tiny_model().eval()
    x = torch.randn(3, 3, 32, 32)
    a, _ = model(x, CAPS)
    b, _ = model(model.features(x), CAPS)
    torch.testing.assert_close(a, b)


def test_hard_attention_reads_one_sampled_cell_per_step_in_training():
    model = tiny_model(hard_attention=True).train()
    decoder = model.decoder
    feats = model.features(torch.randn(3, 3, 32, 32))
    memory = decoder.memory(feats)
    state = decoder.init_state(memory)
    cells: list[torch.Tensor] = []
    torch.manual_seed(0)
    logits, alpha, _ = decoder.step(memory, state, CAPS[:, 0], cells)
    [cell] = cells
    assert cell.shape == (3,) and bool(((cell >= 0) & (cell < feats.shape[1])).all())
    assert torch.allclose(alpha.sum(1), torch.ones(3))  # the maps are still the distribution
    # The step read exactly the sampled cells: a soft twin attending one-hot there agrees.
    one_hot = torch.nn.functional.one_hot(cell, feats.shape[1]).float()
    twin = tiny_model(hard_attention=False).train()
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.decoder.attend.forward = lambda f, p, h: (
        torch.bmm(one_hot.unsqueeze(1), f).squeeze(1),
        one_hot,
        one_hot.log(),  # the energies one_hot is the softmax of
    )
    torch.manual_seed(0)
    expected, _, _ = twin.decoder.step(memory, state, CAPS[:, 0])
    assert torch.allclose(logits, expected, atol=1e-6)


def _hard_and_soft_twin(training: bool, images: int, **hard_args):
    """A hard-attention model, a soft one with its weights, and the first step's inputs."""
    hard = tiny_model(hard_attention=True, dropout=0.0, **hard_args).train(training)
    soft = tiny_model(hard_attention=False, dropout=0.0).train(training)
    soft.load_state_dict(hard.state_dict(), strict=False)
    feats = hard.features(torch.randn(images, 3, 32, 32))
    memory = hard.decoder.memory(feats)
    return hard, soft, feats, memory, hard.decoder.init_state(memory)


def test_hard_attention_rows_told_to_read_the_expected_context_read_it_in_training():
    hard, soft, _, memory, state = _hard_and_soft_twin(True, 3)
    cells: list[torch.Tensor] = []
    read_expected = torch.tensor([True, False, True])
    logits, _, _ = hard.decoder.step(memory, state, CAPS[:, 0], cells, read_expected)
    expected, _, _ = soft.decoder.step(memory, state, CAPS[:, 0])
    assert len(cells) == 1  # every row still drew its cell
    torch.testing.assert_close(logits[read_expected], expected[read_expected])
    assert not torch.allclose(logits[1], expected[1])  # the other row read its one cell


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_hard_expected_share_decides_whether_teacher_forcing_reads_the_expected_context(share):
    """hard_expected 1: every caption reads the expected context, so teacher forcing gives the
    soft model's logits and the REINFORCE term has no policy part; 0: none does."""
    hard, soft, feats, _, _ = _hard_and_soft_twin(True, 3, hard_expected=share)
    hard_logits, _, _ = hard.decoder(feats, CAPS)
    soft_logits, _, _ = soft.decoder(feats, CAPS)
    assert torch.allclose(hard_logits, soft_logits, atol=1e-6) == (share == 1.0)
    baseline = hard.decoder.reward_baseline.clone()
    hard.decoder(feats, CAPS)
    assert torch.equal(hard.decoder.reward_baseline, baseline) == (share == 1.0)


def test_hard_attention_inference_reads_the_expected_context_or_the_most_likely_cell():
    hard, soft, _, memory, state = _hard_and_soft_twin(False, 2)
    expected, _, _ = hard.decoder.step(memory, state, CAPS[:2, 0])
    assert torch.equal(expected, soft.decoder.step(memory, state, CAPS[:2, 0])[0])

    argmax = tiny_model(hard_attention=True, hard_inference="argmax").eval()
    argmax.load_state_dict(hard.state_dict())
    cells: list[torch.Tensor] = []
    logits, alpha, _ = argmax.decoder.step(memory, state, CAPS[:2, 0], cells)
    assert torch.equal(cells[0], alpha.argmax(1))
    other = memory.features.clone()  # change every cell but the most likely ones
    keep = torch.zeros_like(other, dtype=torch.bool)
    keep[torch.arange(2), cells[0]] = True
    other = torch.where(keep, other, other + 5.0)
    changed = type(memory)(other, memory.projected, memory.pooled)
    assert torch.allclose(argmax.decoder.step(changed, state, CAPS[:2, 0])[0], logits, atol=1e-6)


def test_hard_attention_options_are_checked():
    with pytest.raises(ValueError, match="hard_attention needs attention"):
        DecoderConfig(
            vocab_size=5, feature_dim=4, grid_cells=4, attention=False, hard_attention=True
        )
    with pytest.raises(ValueError, match=r"hard_expected must be in \[0, 1\], got 1.5"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, hard_expected=1.5)
    with pytest.raises(ValueError, match="hard_inference must be one of"):
        DecoderConfig(vocab_size=5, feature_dim=4, grid_cells=4, hard_inference="mode")


def test_a_hard_attention_beam_search_reads_each_beams_own_image():
    """With the most likely cell at inference, beams of a batch read their own image's cell: the
    batched search gives each image's captions as searching it alone does."""
    from captioner.caption.search import beam_search

    model = tiny_model(hard_attention=True, hard_inference="argmax").eval()
    feats = model.features(torch.randn(3, 3, 32, 32))
    batched = beam_search(model.decoder, feats, beam_size=3, max_length=6)
    for i in range(3):
        alone = beam_search(model.decoder, feats[i : i + 1], beam_size=3, max_length=6)[0]
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]


def test_preview_steps_attend_before_the_first_word_and_train():
    """Each preview step reads the image and moves the state, with no weights of its own: the
    first word then depends on what they saw, and the caption's loss trains through them."""
    plain, preview = tiny_model(seed=5), tiny_model(seed=5, preview_steps=2)
    preview.load_state_dict(plain.state_dict())  # the same weights: previews add none
    features = torch.randn(2, 16, plain.decoder.config.feature_dim)
    with torch.no_grad():
        h0 = plain.decoder.init_state(plain.decoder.memory(features))[0][0]
        h2 = preview.decoder.init_state(preview.decoder.memory(features))[0][0]
    assert not torch.allclose(h0, h2)
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    assert not torch.allclose(plain(features, captions)[1], preview(features, captions)[1])
    preview(features, captions)[1].backward()
    assert all(p.grad is not None for p in preview.decoder.parameters())


def _step_lstm_input(decoder, memory, state, tokens):
    """(alpha, what the first LSTM cell reads) of one step, without gradients."""
    seen = []
    hook = decoder.cells[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            _, alpha, _ = decoder.step(memory, state, tokens)
    finally:
        hook.remove()
    return alpha, seen[0]


def test_attention_mass_reaches_the_lstm_and_trains():
    """With attention_mass each step's LSTM reads log(1 + sum sigmoid(e)) of the energies its
    alpha is the softmax of: more cells that match the query give more mass where alpha, summing
    to 1, cannot tell. Everything, the attention's score included, gets a gradient."""
    net = tiny_model(seed=6, attention_mass=True)
    decoder = net.decoder
    assert decoder.cells[0].input_size == 16 + decoder.config.feature_dim + 1
    features = torch.randn(2, 16, decoder.config.feature_dim)
    memory = decoder.memory(features)
    state = decoder.init_state(memory)
    alpha, lstm_input = _step_lstm_input(decoder, memory, state, torch.tensor([1, 1]))
    with torch.no_grad():
        _, _, energy = decoder.attend(memory.features, memory.projected, state[0][-1])
    torch.testing.assert_close(alpha, torch.softmax(energy, dim=1))
    torch.testing.assert_close(lstm_input[:, -1], torch.log1p(torch.sigmoid(energy).sum(1)))
    # Energies shifted by a constant (the score's bias): the same alpha, a larger mass.
    with torch.no_grad():
        decoder.attend.score.bias.add_(3.0)
    shifted_alpha, lstm_input = _step_lstm_input(decoder, memory, state, torch.tensor([1, 1]))
    torch.testing.assert_close(shifted_alpha, alpha)
    more = torch.log1p(torch.sigmoid(energy + 3.0).sum(1))
    torch.testing.assert_close(lstm_input[:, -1], more)
    assert (more > torch.log1p(torch.sigmoid(energy).sum(1)) + 0.3).all()
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    net(features, captions)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


def test_similarity_mass_counts_the_cells_that_look_like_the_attended_one():
    """With similarity_mass each step's LSTM reads log(1 + sum_i sigmoid(s cos(w z, w a_i) + b)),
    z the expected context before the gate: a second copy of what the step attends adds its
    cells, a different object does not. Beam rows read their own image's cells, and every
    parameter, w, s and b among them, gets a gradient."""
    net = tiny_model(seed=6, similarity_mass=True)
    decoder = net.decoder
    D = decoder.config.feature_dim
    assert decoder.cells[0].input_size == 16 + D + 1
    torch.manual_seed(0)
    thing, other = torch.randn(D), torch.randn(D)
    background = 0.05 * torch.randn(2, 16, D)
    one, two = background.clone(), background.clone()
    one[0, 3] = two[0, 3] = two[0, 12] = thing  # image 0: one copy / two copies of `thing`
    one[1, 3] = two[1, 3] = thing  # image 1: `thing` and a different object in both
    one[1, 12] = two[1, 12] = other
    context = thing.expand(2, D)
    single = decoder._similarity_mass(one, context)
    double = decoder._similarity_mass(two, context)
    for features, got in ((one, single), (two, double)):  # w = 1, s = 10, b = -7 at the start
        cosine = F.cosine_similarity(features, context.unsqueeze(1), dim=2)  # (2, L)
        want = torch.log1p(torch.sigmoid(10 * cosine - 7).sum(1, keepdim=True))
        torch.testing.assert_close(got, want)
    assert torch.expm1(double[0]) > torch.expm1(single[0]) + 0.9  # the copy: sigmoid(3) more
    torch.testing.assert_close(single[1], double[1])  # another object is not a copy
    # k = 3 rows per image: rows 0..2 read image 0, rows 3..5 image 1
    rows = decoder._similarity_mass(two, thing.expand(6, D))
    torch.testing.assert_close(rows, double.repeat_interleave(3, dim=0))
    # The LSTM reads it, computed from the step's own (ungated) context.
    memory = decoder.memory(two)
    state = decoder.init_state(memory)
    _, lstm_input = _step_lstm_input(decoder, memory, state, torch.tensor([1, 1]))
    with torch.no_grad():
        context, _, _ = decoder.attend(memory.features, memory.projected, state[0][-1])
    torch.testing.assert_close(
        lstm_input[:, -1:], decoder._similarity_mass(memory.features, context)
    )
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    net(two, captions)[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())


def test_refine_layers_let_each_cell_see_the_others_once_per_image():
    """Without refine layers a cell of the memory is its own feature (plus its position); with
    them it also depends on every other cell: a copy of an object placed elsewhere changes the
    object's own refined cell. The memory is computed once per image, and the pooled vector and
    the attention's projection read the refined grid."""
    torch.manual_seed(0)
    D = 16
    thing = torch.randn(D)
    one = 0.05 * torch.randn(1, 16, D)
    one[0, 3] = thing
    two = one.clone()
    two[0, 12] = thing  # the same object again, elsewhere
    plain = tiny_model(seed=2).eval().decoder
    refined = tiny_model(seed=2, refine_layers=1).eval().decoder
    assert refined.refine is not None and plain.refine is None
    with torch.no_grad():
        torch.testing.assert_close(
            plain.memory(one).features[0, 3], plain.memory(two).features[0, 3]
        )
        a, b = refined.memory(one), refined.memory(two)
        assert (a.features[0, 3] - b.features[0, 3]).abs().max() > 1e-3
    with torch.no_grad():
        memory = refined.memory(two)
        torch.testing.assert_close(memory.pooled, memory.features.mean(dim=1))
        torch.testing.assert_close(memory.projected, refined.attend.project(memory.features))
        torch.testing.assert_close(memory.features, refined.refine(two))


def test_teacher_forcing_builds_each_images_memory_once_for_all_its_captions():
    """Captions about the same image (`image_index`) read one memory: the refine layers see each
    image once, and the logits, loss and attention are those of copying the image per caption."""
    net = tiny_model(seed=5, refine_layers=1, positional=True).eval()
    features = net.features(torch.randn(2, 3, 32, 32))
    image_index = torch.tensor([1, 0, 1])
    seen = []
    net.decoder.refine.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    with torch.no_grad():
        shared = net.decoder(features, CAPS, image_index=image_index)
        copied = net.decoder(features[image_index], CAPS)
    assert seen == [2, 3]
    for got, want in zip(shared, copied, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="B=3"):
        net.decoder(features, CAPS[:2], image_index=image_index)
