"""BagNet-style local-logits networks for PatchGuard (Xiang et al. 2021, Sec. III-C; Brendel & Bethge 2019).

The BagCert region scorer is already a BagNet-style ResNet: a 3x3 stem and residual blocks whose kernels are
mostly 1x1, no pooling and no dense layer, so its head gives per-cell class logits (N, C, H', W'), the
"local logits" that PatchGuard's robust masking aggregates. This module adds the BagNet pieces: a kernel layout
for a wanted receptive field under any stride layout (BagNet-9/17/33), the BagNet objective (cross-entropy on
the spatial mean of the local logits) and the export wrapper that emits NHWC local logits.
"""

from __future__ import annotations

from itertools import product

import torch
import torch.nn.functional as F
from torch import nn

from certinfer.train.models.bagcert import RegionScorer, RegionScorerConfig


def bagnet_kernels(rf: int, strides: tuple[int, ...], stem_kernel: int = 3) -> tuple[int, ...]:
    """Block kernels (1 or 3) that give receptive field ``rf`` exactly, the 3x3 kernels as early as possible.

    A 3x3 block adds ``2 * jump`` to the receptive field, where ``jump`` is the product of the strides before
    it (a strided block's 3x3 comes first, so its own stride does not count). BagNet keeps the 3x3 kernels in
    the early layers; among the exact layouts this takes the first in (3 before 1) lexicographic order.
    """
    strides = tuple(int(s) for s in strides)
    gains, jump = [], 1
    for s in strides:
        gains.append(2 * jump)
        jump *= s
    for kernels in product((3, 1), repeat=len(strides)):
        if stem_kernel + sum(g for g, k in zip(gains, kernels) if k == 3) == rf:
            return kernels
    reachable = sorted({stem_kernel + sum(g for g, k in zip(gains, ks) if k == 3)
                        for ks in product((3, 1), repeat=len(strides))})
    raise ValueError(f"no kernel layout gives RF {rf} with strides {strides}: reachable {reachable}")


def build_bagnet(num_classes: int, model: dict) -> RegionScorer:
    return RegionScorer(RegionScorerConfig(num_classes=num_classes, **model))


def bagnet_loss(local_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BagNet's objective: cross-entropy on the spatial mean of the (N, C, H', W') local logits."""
    return F.cross_entropy(local_logits.float().mean(dim=(2, 3)), y)


def masked_evidence_loss(local_logits: torch.Tensor, y: torch.Tensor, window: tuple[int, int],
                         weight: float) -> torch.Tensor:
    """Cross-entropy on what robust masking aggregates (our addition; the paper trains plain BagNet).

    Both terms see clipped evidence (ReLU of the local logits), as masking does: a plain-logit term lets the
    network decide with negative logits that clipping then throws away. With T = 0 the certificate needs the
    true class's evidence, less what the attacker's window and masking can take (at most two of its largest
    windows), to beat every other class's whole evidence; the second term is cross-entropy on exactly those
    scores, so training spreads the evidence a sign leaves. ``window`` is the most feature rows and columns
    one patch reaches.
    """
    u = torch.relu(local_logits.float())
    kh, kw = window
    windows = F.avg_pool2d(F.pad(u, (kw - 1, kw - 1, kh - 1, kh - 1)), (kh, kw), stride=1) * (kh * kw)
    top = windows.amax(dim=(2, 3))
    total = u.sum(dim=(2, 3))
    worst = total - 2 * top * F.one_hot(y, u.shape[1])
    cells = u.shape[2] * u.shape[3]
    return (1 - weight) * F.cross_entropy(total / cells, y) + weight * F.cross_entropy(worst / cells, y)


class LocalLogits(nn.Module):
    """Export wrapper: normalized (N, 3, H, W) -> float32 local logits (N, H', W', C), channels last."""

    def __init__(self, scorer: RegionScorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer(x).permute(0, 2, 3, 1)
