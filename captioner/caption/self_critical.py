"""Self-critical sequence training (Rennie et al., 2017, "Self-critical Sequence Training for
Image Captioning"): REINFORCE with the CIDEr-D of sampled captions as the reward, baselined by
the CIDEr-D of the model's own greedy caption of the same image (the paper), or by the mean of the
other samples of that image (`baseline="mean"`, as ruotianluo/ImageCaptioning.pytorch's "new
self-critical"), so that only captions better than what the model already says are made likelier.
With `search="beam"` the captions are not sampled but the best of a beam search as wide as
`samples` (Cornia et al. 2020, "Meshed-Memory Transformer for Image Captioning"), their
log-probabilities read by teacher forcing: no longer REINFORCE's unbiased estimate, but each
advantage compares captions the model would write.

`SelfCritical` wraps a `CaptionNet` so that DistributedDataParallel sees the whole objective in one
`forward` (the sampling that carries the gradient included):

    objective = SelfCritical(net, CiderD(train_references), samples=5)
    loss, stats = objective(features, image_ids)   # image_ids: keys of the CiderD references
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from captioner.caption.caption_net import CaptionNet
from captioner.caption.search import beam_search, greedy
from captioner.evaluation.cider import CiderD
from captioner.vocab import Vocabulary

START, END = Vocabulary.start_id, Vocabulary.end_id
BASELINES = ("greedy", "mean")
SEARCHES = ("sample", "beam")


def sample_captions(
    net: CaptionNet,
    features: torch.Tensor,
    max_length: int,
    given: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One caption sampled from the model per row of `features` (B, L, D), with the gradient of
    its log-probability: (word ids (B, T) ending in <end> or cut at `max_length`, log-probability
    of each (B, T), mask (B, T) of the steps that belong to the caption, <end> included).

    With `given` (B, T) word ids (a caption's words, its <end>, and anything after it), the
    model reads those words instead of sampling (teacher forcing), and the same three come back
    for them: the log-probabilities of captions another search chose."""
    decoder = net.decoder
    memory = decoder.memory(features)
    state = decoder.init_state(memory)
    prev = torch.full((len(features),), START, dtype=torch.long, device=features.device)
    alive = torch.ones(len(features), dtype=torch.bool, device=features.device)
    words, logps, masks = [], [], []
    for t in range(max_length if given is None else given.shape[1]):
        logits, _, state = decoder.step(memory, state, prev)
        logits = logits.float().clone()
        logits[:, [Vocabulary.pad_id, START]] = float("-inf")  # never words of a caption
        logp = F.log_softmax(logits, dim=1)
        if given is None:
            with torch.no_grad():
                prev = torch.multinomial(logp.exp(), 1).squeeze(1)
        else:
            prev = given[:, t]
        words.append(prev)
        logps.append(logp.gather(1, prev.unsqueeze(1)).squeeze(1))
        masks.append(alive.clone())
        alive &= prev != END
        if not bool(alive.any()):
            break
    return torch.stack(words, 1), torch.stack(logps, 1), torch.stack(masks, 1).float()


@contextmanager
def _searching(net: CaptionNet) -> Iterator[None]:
    """The network in eval mode (no dropout), without gradients; its mode comes back after."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def beam_candidates(
    net: CaptionNet, features: torch.Tensor, k: int, max_length: int
) -> torch.Tensor:
    """The `k` best captions of beam search (beam size `k`, the network in eval mode) for each row
    of `features` (B, L, D): word ids (B*k, T), image b's in rows b*k .. b*k+k-1, each caption's
    words then <end> (none when cut at `max_length`), and <end> again up to the longest."""
    with _searching(net):
        found = beam_search(net.decoder, features.detach(), k, max_length, n_best=k)
    rows = []
    for image in found:
        image = image + image[-1:] * (k - len(image))  # fewer than k finished: repeat the last
        rows += [torch.tensor(h.tokens + [END] if h.finished else h.tokens) for h in image]
    return pad_sequence(rows, batch_first=True, padding_value=END).to(features.device)


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
        search: str = "sample",
        policy_weight: float = 1.0,
    ):
        super().__init__()
        if policy_weight < 0 or xe_weight < 0:
            raise ValueError(
                f"weights must be >= 0, got policy_weight={policy_weight}, xe_weight={xe_weight}"
            )
        if policy_weight == 0 and xe_weight == 0:
            raise ValueError("policy_weight and xe_weight are both 0: nothing would be learned")
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
        if baseline == "mean" and samples < 2:
            raise ValueError("the mean baseline needs samples >= 2 (the other samples' mean)")
        self.net, self.cider = net, cider
        self.samples, self.baseline, self.max_length = samples, baseline, max_length
        self.xe_weight, self.search, self.policy_weight = xe_weight, search, policy_weight

    def forward(
        self,
        images_or_features: torch.Tensor,
        image_ids: Sequence[Hashable],
        captions: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`policy_weight` times the policy-gradient loss over `samples` captions per image, plus
        `xe_weight` times the cross-entropy of `captions` (caption b about image
        `image_index[b]`), and the batch's mean sampled and baseline rewards. With
        `policy_weight` 0 nothing is sampled: the cross-entropy alone, with the same frozen CNN
        and data, is the control that says what the reward adds (stats then empty)."""
        features = self.net.features(images_or_features)  # (B, L, D)
        loss, stats = features.new_zeros(()), {}
        if self.policy_weight > 0:
            loss, stats = self._policy_loss(features, image_ids)
            loss = self.policy_weight * loss
        if self.xe_weight > 0 and captions is not None:
            _, xe, _ = self.net.decoder(features, captions, image_index=image_index)
            loss = loss + self.xe_weight * xe
        return loss, stats

    def _policy_loss(
        self, features: torch.Tensor, image_ids: Sequence[Hashable]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        B, K = len(features), self.samples
        given = None
        if self.search == "beam":
            given = beam_candidates(self.net, features, K, self.max_length)
        words, logps, mask = sample_captions(
            self.net, features.repeat_interleave(K, dim=0), self.max_length, given
        )  # (B*K, T)
        ids = [image_ids[i] for i in range(B) for _ in range(K)]
        reward = torch.tensor(
            self.cider.scores(ids, [caption_words(r) for r in words.tolist()]),
            device=features.device,
        ).view(B, K)
        if self.baseline == "greedy":
            with _searching(self.net):
                best = greedy(self.net.decoder, features.detach(), self.max_length)
            base = torch.tensor(
                self.cider.scores(image_ids, [h.tokens for h in best]), device=features.device
            ).view(B, 1)
        else:  # each sample against the mean of the image's other samples
            base = (reward.sum(dim=1, keepdim=True) - reward) / (K - 1)
        advantage = (reward - base).view(B * K, 1)
        loss = -(advantage * logps * mask).sum() / mask.sum()
        stats = {"reward": float(reward.mean()), "baseline": float(base.mean())}
        return loss, stats
