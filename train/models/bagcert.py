"""BagCert region scorer (Metzen & Yatsura 2021, Appendix A.1).

A ResNet-style stem plus residual blocks whose kernels are mostly 1x1, no dense layer and no pooling:
the output is a dense (N, C, H', W') map of region scores, each seeing only a small receptive field.
The Heaviside output uses the sigmoid's gradient in the backward pass (straight-through).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class RegionScorerConfig:
    num_classes: int
    kernels: tuple[int, ...] = (3, 1, 3, 1, 1, 1, 1, 1)  # per residual block, 1 or 3
    strides: tuple[int, ...] = (1,) * 8  # per residual block, 1 or 2
    widths: tuple[int, ...] = (96,) * 8  # per residual block
    stem_width: int = 96
    stem_kernel: int = 3
    in_channels: int = 3
    shake_shake: bool = False

    def __post_init__(self) -> None:
        self.kernels, self.strides, self.widths = tuple(self.kernels), tuple(self.strides), tuple(self.widths)
        if not len(self.kernels) == len(self.strides) == len(self.widths):
            raise ValueError("kernels, strides and widths need one entry per residual block")
        if any(k not in (1, 3) for k in self.kernels) or any(s not in (1, 2) for s in self.strides):
            raise ValueError("block kernels must be 1 or 3 and strides 1 or 2")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def geometry(self, input_hw: tuple[int, int]) -> dict:
        """Receptive field, stride (jump) and padding of an output cell, per axis, and the output size."""
        rf, jump, pad = self.stem_kernel, 1, self.stem_kernel // 2
        out = list(input_hw)
        for k, s in zip(self.kernels, self.strides):
            rf += (k - 1) * jump
            pad += (k // 2) * jump
            out = [(n + 2 * (k // 2) - k) // s + 1 for n in out]
            jump *= s
        return {"rf": [rf, rf], "stride": [jump, jump], "padding": [pad, pad], "input_hw": list(input_hw),
                "output_hw": out}


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class _Path(nn.Sequential):
    """conv(k1) -> ReLU -> conv(k2); the kernel order sets which end sees the 3x3."""

    def __init__(self, cin: int, cout: int, k1: int, k2: int, stride: int):
        super().__init__(_conv_bn(cin, cout, k1, stride), nn.ReLU(inplace=True), _conv_bn(cout, cout, k2))


class _ShakeShake(torch.autograd.Function):
    """Batch-wise shake-shake: one alpha forward, an independent beta backward (Gastaldi 2017)."""

    @staticmethod
    def forward(ctx, a, b):
        alpha = torch.rand((), device=a.device)
        return alpha * a + (1 - alpha) * b

    @staticmethod
    def backward(ctx, grad):
        beta = torch.rand((), device=grad.device)
        return beta * grad, (1 - beta) * grad


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, shake_shake: bool):
        super().__init__()
        self.path1 = _Path(cin, cout, kernel, 1, stride)
        # Shake-shake's second path puts the 3x3 last (same receptive field) when the block keeps resolution;
        # a strided 3x3 must stay first, or the two paths would see different input windows.
        self.path2 = _Path(cin, cout, 1 if stride == 1 else kernel, kernel if stride == 1 else 1, stride) \
            if shake_shake else None
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else _conv_bn(cin, cout, 1, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.path1(x)
        if self.path2 is not None:
            y2 = self.path2(x)
            y = _ShakeShake.apply(y, y2) if self.training else 0.5 * (y + y2)
        return self.relu(y + self.shortcut(x))


class RegionScorer(nn.Module):
    """Maps normalized images (N, 3, H, W) to continuous region scores (N, C, H', W')."""

    def __init__(self, cfg: RegionScorerConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(_conv_bn(cfg.in_channels, cfg.stem_width, cfg.stem_kernel), nn.ReLU(inplace=True))
        blocks, cin = [], cfg.stem_width
        for k, s, w in zip(cfg.kernels, cfg.strides, cfg.widths):
            blocks.append(ResidualBlock(cin, w, k, s, cfg.shake_shake))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, cfg.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class _HeavisideSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        s = torch.sigmoid(z)
        return grad * s * (1 - s)


def heaviside(z: torch.Tensor) -> torch.Tensor:
    """H(z) = [z >= 0] forward; the sigmoid's derivative backward."""
    return _HeavisideSTE.apply(z)


class BinaryScoreMap(nn.Module):
    """Export wrapper: the binary (N, H', W', C) uint8 score map the runtime certifies."""

    def __init__(self, scorer: RegionScorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scorer(x) >= 0).permute(0, 2, 3, 1).to(torch.uint8)


PRESETS: dict[str, dict] = {
    # The paper's CIFAR-10 model (RF 7, width 768, shake-shake): a GPU job.
    "paper": dict(kernels=(3, 1, 3, 1, 1, 1, 1, 1), widths=(768,) * 8, stem_width=768, shake_shake=True),
}


class CodeMap(nn.Module):
    """Export wrapper: normalized (N, 3, H, W) -> uint8 code map (N, H', W', C): bit 0 the Heaviside score,
    bit 1 set where |pre-activation| < ``tolerance`` (cells a backend that is not bit-exact may get wrong)."""

    def __init__(self, scorer: RegionScorer, tolerance: float):
        super().__init__()
        self.scorer, self.tolerance = scorer, tolerance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scorer(x)
        code = (z >= 0).to(torch.uint8) + 2 * (z.abs() < self.tolerance).to(torch.uint8)
        return code.permute(0, 2, 3, 1)


def rf_kernels(rf: int, imagenet: bool = False) -> tuple[int, ...]:
    """Block kernels of the paper's RF tables (A.1.1 CIFAR: RF 5..13; A.1.2 ImageNet-style: RF 17, 25, 29)."""
    table = {
        5: (3, 1, 1, 1, 1, 1, 1, 1), 7: (3, 1, 3, 1, 1, 1, 1, 1), 9: (3, 1, 3, 1, 3, 1, 1, 1),
        11: (3, 1, 3, 1, 3, 1, 3, 1), 13: (3, 3, 3, 1, 3, 1, 3, 1),
    }
    imagenet_table = {17: (3, 1, 3, 1, 3, 1, 1, 1), 25: (3, 1, 3, 1, 3, 1, 3, 1), 29: (3, 3, 3, 1, 3, 1, 3, 1)}
    chosen = imagenet_table if imagenet else table
    if rf not in chosen:
        raise ValueError(f"no {'ImageNet-style' if imagenet else 'CIFAR'} preset for RF {rf}: "
                         f"choose from {sorted(chosen)}")
    return chosen[rf]



MODULES = ("bagcert-code-map",)


def build(config: dict) -> CodeMap:
    """The torch engine's module (``bagcert-code-map``): the code map over a region scorer."""
    scorer = RegionScorer(RegionScorerConfig(num_classes=int(config["num_classes"]), **config["model"]))
    return CodeMap(scorer, float(config["tolerance"]))
