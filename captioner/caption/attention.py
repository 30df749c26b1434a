"""Soft (additive) attention over an image grid, as in Show, Attend and Tell (Xu et al., 2015)."""

from __future__ import annotations

import torch
from torch import nn


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

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature_proj(features)  # (B, L, A)

    def forward(
        self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # features (B, L, D), projected (B, L, A), hidden (B, H)
        energy = self.score(
            torch.tanh(projected + self.hidden_proj(hidden).unsqueeze(1))
        )  # (B, L, 1)
        alpha = torch.softmax(energy.squeeze(2), dim=1)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, D)
        return context, alpha


def doubly_stochastic_penalty(alphas: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Show, Attend and Tell eq. 14: sum_i (1 - sum_t alpha_ti)^2, pushing every cell to be attended.

    alphas (B, T, L) with padded steps zeroed by `mask` (B, T); averaged over the batch and cells.
    """
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)  # (B, L)
    return ((1.0 - coverage) ** 2).mean()
