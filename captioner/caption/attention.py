"""Soft (additive) attention over an image grid, as in Show, Attend and Tell (Xu et al., 2015)."""

from __future__ import annotations

import torch
from torch import nn

# Elements of tanh(W_a a + W_h h) computed at once when decoding: a beam search over 32 images
# at 14x14 with k = 3 and A = 512 would otherwise allocate 38 MB per step, which glibc serves with
# a fresh mmap (above its 32 MB threshold) whose page faults cost more than the tanh itself;
# chunks of 1 MB stay in the heap and in the cache (bench/decode.py measures the two).
ENERGY_CHUNK = 1 << 18


class SoftAttention(nn.Module):
    """e_ti = w^T tanh(W_a a_i + W_h h_{t-1}); alpha_t = softmax(e_t); z_t = sum_i alpha_ti a_i.

    `project(features)` computes W_a a_i once per image; `forward` then costs only the hidden-state
    projection per step (popular tutorial code recomputes the image projection at every word).
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)
        self.fused = None  # `fuse()`: the energy as one compiled loop, for inference

    def fuse(self) -> SoftAttention:
        """Compute the energy at inference as one torch.compile'd loop (add, tanh and the score's
        dot product fused: no (B, k, L, A) temporary). Pays on CPUs where the eager tanh pass is
        slow: on an AMD EPYC a beam-3 decode over 32 images at 14x14 with 512-d attention took
        2.74x its FLOP floor fused against 3.14x eager, identical captions (bench/decode.py); on
        an Intel Xeon the eager chunks were as fast. Needs a C++ compiler; the first search
        compiles for a few seconds. Training is unchanged."""
        self.fused = torch.compile(_energy, dynamic=True)
        return self

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(features)  # (B, L, A)

    def forward(
        self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """features (B, L, D), projected (B, L, A), hidden (B*k, H) -> context (B*k, D), alpha
        (B*k, L) and the energies e (B*k, L) that alpha is the softmax of.

        Rows b*k .. b*k+k-1 of `hidden` (k beams of a beam search; k = 1 elsewhere) all attend
        over image b: its grid is read once per image, by a batched matmul over the images with
        the beams as rows, never copied per beam.
        """
        B, L, A = projected.shape
        if hidden.dim() != 2 or B == 0 or hidden.shape[0] % B:
            raise ValueError(
                f"hidden must be (B*k, H) rows for {B} images, got {tuple(hidden.shape)}"
            )
        k = hidden.shape[0] // B
        query = self.hidden_proj(hidden).view(B, k, 1, A)
        images = max(1, ENERGY_CHUNK // (k * L * A))  # images per chunk
        exporting = torch.compiler.is_exporting()
        if self.fused is not None and not torch.is_grad_enabled() and not exporting:
            energy = self.fused(projected, query, self.score.weight.view(-1), self.score.bias)
        elif torch.is_grad_enabled() or exporting or images >= B:
            energy = self.score(torch.tanh(projected.unsqueeze(1) + query)).squeeze(3)  # (B, k, L)
        else:
            energy = projected.new_empty(B, k, L)
            for i in range(0, B, images):
                pre = projected[i : i + images].unsqueeze(1) + query[i : i + images]
                energy[i : i + images] = self.score(pre.tanh_()).squeeze(3)
        alpha = torch.softmax(energy, dim=2)  # (B, k, L)
        context = torch.bmm(alpha, features)  # (B, k, D)
        return context.view(B * k, -1), alpha.view(B * k, L), energy.view(B * k, L)


def _energy(
    projected: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """w^T tanh(projected + query) + b: projected (B, L, A), query (B, k, 1, A) -> (B, k, L)."""
    return (torch.tanh(projected.unsqueeze(1) + query) * weight).sum(-1) + bias


def doubly_stochastic_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Show, Attend and Tell eq. 14: sum_i (1 - sum_t alpha_ti)^2, pushing every cell to be attended.

    alphas (B, T, L) with padded steps zeroed by `mask` (B, T); averaged over the batch and cells.
    """
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, L)
    return ((1.0 - coverage) ** 2).mean()


def supervised_attention_loss(alphas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Attention correctness (Liu et al., 2017, "Attention Correctness in Neural Image
    Captioning"): minus the log of the attention mass on the cells of the object a word names,
    averaged over the words that name one. alphas (B, T, L); targets (B, T, L) bool, a row of
    False for the words that name nothing (those steps are left free).

    Targets may also be uint8 bit sets (`count_targets(each_copy=True)`): a word's term is then
    the mean, over the bits set in its row, of minus the log of the mass on that bit's cells, so
    a count word is asked to look at each copy it counts, not at any one of them. A row of 0s and
    1s gives the bool figure."""
    named = targets.ne(0).any(dim=2)  # (B, T), bool or bit-set targets alike
    if not bool(named.any()):
        return alphas.new_zeros(())
    if targets.dtype == torch.bool:
        mass = (alphas * targets.to(alphas.dtype)).sum(dim=2)[named]
        return -mass.clamp_min(1e-6).log().mean()
    bits = torch.arange(8, device=targets.device, dtype=targets.dtype)
    sets = ((targets[named].unsqueeze(-1) >> bits) & 1).to(alphas.dtype)  # (N, L, 8)
    mass = torch.einsum("nl,nlc->nc", alphas[named], sets)  # (N, 8)
    present = sets.amax(dim=1)  # (N, 8): the bits a row uses
    per_word = -(mass.clamp_min(1e-6).log() * present).sum(1) / present.sum(1)
    return per_word.mean()
