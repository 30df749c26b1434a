"""Self-critical sequence training (Rennie et al., 2017, "Self-critical Sequence Training for
Image Captioning"): REINFORCE with the CIDEr-D of sampled captions as the reward, baselined by
the CIDEr-D of the model's own greedy caption of the same image (the paper), or by the mean of the
other samples of that image (`baseline="mean"`, as ruotianluo/ImageCaptioning.pytorch's "new
self-critical"), so that only captions better than what the model already says are made likelier.

`SelfCritical` wraps a `CaptionNet` so that DistributedDataParallel sees the whole objective in one
`forward` (the sampling that carries the gradient included):

    objective = SelfCritical(net, CiderD(train_references), samples=5)
    loss, stats = objective(features, image_ids)   # image_ids: keys of the CiderD references
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from captioner.caption.caption_net import CaptionNet
from captioner.caption.search import greedy
from captioner.evaluation.cider import CiderD
from captioner.vocab import Vocabulary

START, END = Vocabulary.start_id, Vocabulary.end_id
BASELINES = ("greedy", "mean")


def sample_captions(
    net: CaptionNet, features: torch.Tensor, max_length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One caption sampled from the model per row of `features` (B, L, D), with the gradient of
    its log-probability: (word ids (B, T) ending in <end> or cut at `max_length`, log-probability
    of each (B, T), mask (B, T) of the steps that belong to the caption, <end> included)."""
    decoder = net.decoder
    memory = decoder.memory(features)
    state = decoder.init_state(memory)
    prev = torch.full((len(features),), START, dtype=torch.long, device=features.device)
    alive = torch.ones(len(features), dtype=torch.bool, device=features.device)
    words, logps, masks = [], [], []
    for _ in range(max_length):
        logits, _, state = decoder.step(memory, state, prev)
        logits = logits.float().clone()
        logits[:, [Vocabulary.pad_id, START]] = float("-inf")  # never words of a caption
        logp = F.log_softmax(logits, dim=1)
        with torch.no_grad():
            prev = torch.multinomial(logp.exp(), 1).squeeze(1)
        words.append(prev)
        logps.append(logp.gather(1, prev.unsqueeze(1)).squeeze(1))
        masks.append(alive.clone())
        alive &= prev != END
        if not bool(alive.any()):
            break
    return torch.stack(words, 1), torch.stack(logps, 1), torch.stack(masks, 1).float()


def caption_words(row: Sequence[int]) -> list[int]:
    """The words of a sampled or decoded caption: up to its <end>."""
    row = list(row)
    return row[: row.index(END)] if END in row else row


class SelfCritical(nn.Module):
    def __init__(
        self,
        net: CaptionNet,
        cider: CiderD,
        samples: int = 5,
        baseline: str = "greedy",
        max_length: int = 20,
        xe_weight: float = 0.0,
    ):
        super().__init__()
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if baseline == "mean" and samples < 2:
            raise ValueError("the mean baseline needs samples >= 2 (the other samples' mean)")
        self.net, self.cider = net, cider
        self.samples, self.baseline, self.max_length = samples, baseline, max_length
        self.xe_weight = xe_weight

    def forward(
        self,
        images_or_features: torch.Tensor,
        image_ids: Sequence[Hashable],
        captions: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The policy-gradient loss over `samples` captions per image (plus `xe_weight` times the
        cross-entropy of `captions`, caption b about image `image_index[b]`), and the batch's mean
        sampled and baseline rewards."""
        features = self.net.features(images_or_features)  # (B, L, D)
        B, K = len(features), self.samples
        words, logps, mask = sample_captions(
            self.net, features.repeat_interleave(K, dim=0), self.max_length
        )  # (B*K, T)
        ids = [image_ids[i] for i in range(B) for _ in range(K)]
        reward = torch.tensor(
            self.cider.scores(ids, [caption_words(r) for r in words.tolist()]),
            device=features.device,
        ).view(B, K)
        if self.baseline == "greedy":
            was_training = self.net.training
            self.net.eval()
            with torch.no_grad():
                best = greedy(self.net.decoder, features.detach(), self.max_length)
            self.net.train(was_training)
            base = torch.tensor(
                self.cider.scores(image_ids, [h.tokens for h in best]), device=features.device
            ).view(B, 1)
        else:  # each sample against the mean of the image's other samples
            base = (reward.sum(dim=1, keepdim=True) - reward) / (K - 1)
        advantage = (reward - base).view(B * K, 1)
        loss = -(advantage * logps * mask).sum() / mask.sum()
        if self.xe_weight > 0 and captions is not None:
            selected = features if image_index is None else features[image_index]
            _, xe, _ = self.net.decoder(selected, captions)
            loss = loss + self.xe_weight * xe
        stats = {"reward": float(reward.mean()), "baseline": float(base.mean())}
        return loss, stats
