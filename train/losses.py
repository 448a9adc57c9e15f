"""BagCert training losses (Sec. 3.3): the margin loss L~_R and the one-hot penalty L_oh."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_loss(s: torch.Tensor, y: torch.Tensor, margin: float) -> torch.Tensor:
    """-min(min_{c != t} mean_ij (s_t - s_c), M), averaged over the batch; ``s`` is (N, C, H', W') in [0, 1]."""
    votes = s.mean(dim=(2, 3))  # g_Sigma normalized by the map size: S in [0, 1]
    delta = votes.gather(1, y[:, None]) - votes  # (N, C)
    delta = delta.masked_fill(F.one_hot(y, votes.shape[1]).bool(), float("inf"))
    return -torch.clamp(delta.min(dim=1).values, max=margin).mean()


def one_hot_penalty(s: torch.Tensor) -> torch.Tensor:
    """max_{c != c_max} S_c - S_{c_max}: -1 when one class has every vote and the others none."""
    votes = s.mean(dim=(2, 3))
    top2 = votes.topk(2, dim=1).values
    return (top2[:, 1] - top2[:, 0]).mean()


def bagcert_loss(s: torch.Tensor, y: torch.Tensor, margin: float, sigma: float) -> torch.Tensor:
    loss = margin_loss(s, y, margin)
    return loss + sigma * one_hot_penalty(s) if sigma else loss
