import torch

from captioner.search import beam_search, greedy
from captioner.vocab import Vocabulary
from tests.conftest import tiny_model


def test_tiny_model_overfits_two_captions_and_decodes_them_exactly():
    captions = ["a small red circle above a big blue square", "two green triangles"]
    vocab = Vocabulary.build(captions)
    encoded = [vocab.encode(c) for c in captions]
    width = max(map(len, encoded))
    caps = torch.tensor([e + [vocab.pad_id] * (width - len(e)) for e in encoded])
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    model = tiny_model(len(vocab), doubly_stochastic=0.0, hidden_dim=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        _, loss = model(images, caps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    assert loss.item() < 1e-3
    model.eval()
    feats = model.features(images)
    for hyps in (
        greedy(model.decoder, feats, 20),
        [h[0] for h in beam_search(model.decoder, feats, 3, 20)],
    ):
        assert [vocab.decode(h.tokens) for h in hyps] == captions
        assert all(h.finished for h in hyps)
