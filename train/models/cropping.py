"""Crop classifier for randomized cropping: ResNet9 (Page 2018) without its final pooling, plus a learnable
positional encoding added at the first layer.

Input (N, 5, ch, cw), as ``certinfer.runtime.defenses.cropping.cut`` builds it: the normalized crop in channels
0-2 and the crop's top and left offset (pixels, constant over the crop) in channels 3 and 4. One input keeps
the engine contract (every backend takes a single array). The positional encoding is separable and learnable:
``row[:, top + i] + col[:, left + j]`` (C1 channels each) is added to the first convolution's output at crop
pixel (i, j), so every crop knows where in the frame it lies. Rows and columns are picked by one-hot
comparisons and a matrix product (exports to ONNX Equal + MatMul; no data-dependent slicing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class CropNetConfig:
    num_classes: int
    input_hw: tuple[int, int] = (32, 32)
    crop_hw: tuple[int, int] = (10, 10)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # prep, layer1, layer2, layer3 (ResNet9)
    pe_init: float = 0.02  # std of the positional encoding at initialisation

    def __post_init__(self) -> None:
        self.input_hw, self.crop_hw = tuple(self.input_hw), tuple(self.crop_hw)
        self.widths = tuple(self.widths)
        if len(self.widths) != 4:
            raise ValueError("widths: one entry each for prep, layer1, layer2, layer3")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(width, width), conv_bn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CropNet(nn.Module):
    """(N, 5, ch, cw) crop + location -> (N, C) logits."""

    def __init__(self, cfg: CropNetConfig):
        super().__init__()
        self.cfg = cfg
        w0, w1, w2, w3 = cfg.widths
        (h, w), (ch, cw) = cfg.input_hw, cfg.crop_hw
        self.prep = nn.Conv2d(3, w0, 3, padding=1, bias=False)
        self.row = nn.Parameter(cfg.pe_init * torch.randn(w0, h))
        self.col = nn.Parameter(cfg.pe_init * torch.randn(w0, w))
        self.register_buffer("pixels_h", torch.arange(h, dtype=torch.float32), persistent=False)
        self.register_buffer("pixels_w", torch.arange(w, dtype=torch.float32), persistent=False)
        self.register_buffer("offsets_h", torch.arange(ch, dtype=torch.float32), persistent=False)
        self.register_buffer("offsets_w", torch.arange(cw, dtype=torch.float32), persistent=False)
        self.prep_tail = nn.Sequential(nn.BatchNorm2d(w0), nn.ReLU(inplace=True))
        self.body = nn.Sequential(conv_bn(w0, w1), nn.MaxPool2d(2), Residual(w1),
                                  conv_bn(w1, w2), nn.MaxPool2d(2),
                                  conv_bn(w2, w3), nn.MaxPool2d(2), Residual(w3))
        if min(ch, cw) < 8:
            raise ValueError(f"crop {ch}x{cw}: ResNet9's three 2x2 poolings need sides of at least 8")
        self.head = nn.Linear(w3 * (ch // 8) * (cw // 8), cfg.num_classes)  # no final pooling: flatten

    def encoding(self, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """(N,) offsets -> (N, C1, ch, cw) positional encoding of each crop's pixels."""
        rows = (self.pixels_h[None, None] == (top[:, None, None] + self.offsets_h[None, :, None])).to(self.row.dtype)
        cols = (self.pixels_w[None, None] == (left[:, None, None] + self.offsets_w[None, :, None])).to(self.col.dtype)
        r = torch.matmul(rows, self.row.t())  # (N, ch, C1)
        c = torch.matmul(cols, self.col.t())  # (N, cw, C1)
        return (r[:, :, None, :] + c[:, None, :, :]).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        crop, top, left = x[:, :3], x[:, 3, 0, 0], x[:, 4, 0, 0]
        y = self.prep_tail(self.prep(crop) + self.encoding(top, left))
        return self.head(self.body(y).flatten(1))


def build_cropnet(num_classes: int, cfg: dict) -> CropNet:
    return CropNet(CropNetConfig(num_classes=num_classes, **cfg))


MODULES = ("cropnet",)


def build(config: dict) -> CropNet:
    """The torch engine's module (``cropnet``)."""
    return build_cropnet(int(config["num_classes"]), dict(config["model"]))
