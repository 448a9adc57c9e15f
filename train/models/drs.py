"""De-randomized smoothing base classifier (Levine & Feizi 2020), the ensemble model of PatchGuard Sec. III-C.

Input (N, 4, H, W): the image in [0, 1] in channels 0-2 and the keep mask (1 kept, 0 ablated) in channel 3,
as ``certinfer.runtime.ablation.batch`` builds it. The module encodes kept pixels as (x, 1 - x) and ablated
ones as (0, 0), six channels, so an ablated pixel is distinguishable from any colour and its value is
multiplied away before the first convolution: the output cannot depend on it. Then a ResNet (basic blocks,
global average pooling, one linear layer) gives (N, C) logits. ``resnet18`` is the paper's DS-4-ResNet-18 base;
the default is a small CPU network (about 28 M multiply-adds per 32x32 image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class DRSConfig:
    num_classes: int
    widths: tuple[int, ...] = (24, 48, 96)  # per stage
    blocks: tuple[int, ...] = (1, 1, 1)  # basic blocks per stage
    strides: tuple[int, ...] = (1, 2, 2)  # first block of each stage
    stem_width: int = 24

    def __post_init__(self) -> None:
        self.widths, self.blocks, self.strides = tuple(self.widths), tuple(self.blocks), tuple(self.strides)
        if not len(self.widths) == len(self.blocks) == len(self.strides):
            raise ValueError("widths, blocks and strides need one entry per stage")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


RESNET18 = dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), strides=(1, 2, 2, 2), stem_width=64)


def encode(inp: torch.Tensor) -> torch.Tensor:
    """(N, 4, H, W) image + keep mask -> (N, 6, H, W): kept pixels (x, 1 - x), ablated pixels (0, 0)."""
    x, keep = inp[:, :3], inp[:, 3:4]
    return torch.cat([x * keep, (1 - x) * keep], dim=1)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if cin == cout and stride == 1 else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class DRSNet(nn.Module):
    """Base classifier: (N, 4, H, W) image + keep mask -> (N, C) logits."""

    def __init__(self, cfg: DRSConfig):
        super().__init__()
        self.cfg = cfg
        self.stem = nn.Sequential(nn.Conv2d(6, cfg.stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.stem_width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], cfg.stem_width
        for w, n, s in zip(cfg.widths, cfg.blocks, cfg.strides):
            for i in range(n):
                layers.append(BasicBlock(cin, w, s if i == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, cfg.num_classes)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        z = self.layers(self.stem(encode(inp)))
        return self.fc(torch.flatten(self.pool(z), 1))


def build_drs(num_classes: int, model: dict) -> DRSNet:
    return DRSNet(DRSConfig(num_classes=num_classes, **model))


def multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of convolutions and linear layers for one input of ``input_shape`` (C, H, W)."""
    total = 0

    def hook(module, _inp, out):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += out[0].numel() * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
