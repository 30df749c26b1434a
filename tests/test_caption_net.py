import torch

from captioner.caption.search import beam_search, greedy
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


def test_image_index_encodes_each_image_once_and_matches_repeating_the_images():
    vocab = Vocabulary.build(["a red circle", "two blue squares", "a green cross"])
    caps = torch.tensor(
        [
            vocab.encode(c) + [vocab.pad_id] * (6 - len(vocab.encode(c)))
            for c in ["a red circle", "two blue squares", "a green cross", "a red circle"]
        ]
    )
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    model = tiny_model(len(vocab)).eval()  # eval: BatchNorm statistics do not see the batch
    index = torch.tensor([0, 1, 1, 0])
    logits, loss = model(images, caps, image_index=index)
    repeated_logits, repeated_loss = model(images[index], caps)
    torch.testing.assert_close(logits, repeated_logits)
    torch.testing.assert_close(loss, repeated_loss)
