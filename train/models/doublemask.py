"""Double-masking classifier: a small ResNet-style CNN written as a flat list of units, splittable in two.

Any classifier works for pixel-space double masking; this one is also built so that feature-space masking
(PatchCURE) can cut it after any of its first units: the *front* (the units before the split) has a small
receptive field and runs once per frame, the *back* (the remaining units, global pooling and the linear head)
runs once per masked feature map.

Units are written ``KIND:WIDTH:STRIDE``:

* ``c3`` a 3x3 convolution, batch norm, ReLU;
* ``r3`` a residual basic block (two 3x3 convolutions, the first strided; 1x1 shortcut when the shape changes);
* ``r1`` a residual 1x1 bottleneck (``WIDTH`` wide inside; keeps the channels and the receptive field);
* ``pK`` a patch embedding: a KxK convolution at stride K without padding (``p4:WIDTH``), batch norm, ReLU. Each
  output cell sees exactly one KxK block of pixels, so a mask aligned with the blocks hides exactly its own cells
  on the feature map: no growth by the receptive field (a ``p4`` front with 8x8 masks at stride 4).

``build(config)`` rebuilds, for the torch engine, exactly the module a bundle's ONNX graph was exported from:
``config["module"]`` is ``doublemask-classifier`` (the whole network), ``doublemask-front`` or
``doublemask-back`` (the two parts at ``config["split"]``).
"""

from __future__ import annotations

import re

import torch
from torch import nn

MODULES = ("doublemask-classifier", "doublemask-front", "doublemask-back")


def _unit_spec(text: str) -> tuple[str, int, int]:
    kind, width, *stride = text.split(":")
    if re.fullmatch(r"p[1-9]", kind) and not stride:
        return kind, int(width), int(kind[1])
    if kind not in ("c3", "r3", "r1") or len(stride) > 1:
        raise ValueError(f"unit {text!r}: use c3:WIDTH[:STRIDE], r3:WIDTH[:STRIDE], r1:WIDTH or pK:WIDTH (K 1..9)")
    s = int(stride[0]) if stride else 1
    if s not in (1, 2) or (kind == "r1" and s != 1):
        raise ValueError(f"unit {text!r}: stride must be 1 or 2 (1 for r1)")
    return kind, int(width), s


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Sequential:
    pad = k // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout))


class ConvUnit(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True))


class PatchEmbed(nn.Sequential):
    def __init__(self, cin: int, cout: int, patch: int):
        super().__init__(_conv_bn(cin, cout, patch, patch, padding=0), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), _conv_bn(cout, cout, 3))
        self.shortcut = _conv_bn(cin, cout, 1, stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck1x1(nn.Module):
    def __init__(self, channels: int, width: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, width, 1), nn.ReLU(inplace=True), _conv_bn(width, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + x)


def _make_unit(kind: str, cin: int, width: int, stride: int) -> tuple[nn.Module, int]:
    if kind == "c3":
        return ConvUnit(cin, width, stride), width
    if kind == "r3":
        return BasicBlock(cin, width, stride), width
    if kind.startswith("p"):
        return PatchEmbed(cin, width, stride), width
    return Bottleneck1x1(cin, width), cin


def geometry(units: list[str] | tuple[str, ...], split: int, input_hw: tuple[int, int]) -> dict:
    """Receptive field, jump and padding of a feature cell after the first ``split`` units, and the map size.

    A basic block's receptive field is its two 3x3 convolutions' (the 1x1 shortcut sees less)."""
    rf, jump, pad, out = 1, 1, 0, list(input_hw)
    for text in units[:split]:
        kind, _, s = _unit_spec(text)
        # (kernel, stride, padding) of each convolution on the path a pixel's influence takes
        convs = {"c3": [(3, s, 1)], "r3": [(3, s, 1), (3, 1, 1)], "r1": []}[kind] if kind[0] != "p" else [(s, s, 0)]
        for k, stride, p in convs:
            rf += (k - 1) * jump
            pad += p * jump
            out = [(n + 2 * p - k) // stride + 1 for n in out]
            jump *= stride
    return {"rf": [rf, rf], "stride": [jump, jump], "padding": [pad, pad], "input_hw": list(input_hw),
            "output_hw": out}


class Classifier(nn.Module):
    """``units`` then global average pooling and a linear head: (N, 3, H, W) normalized -> (N, C) logits."""

    def __init__(self, num_classes: int, units: list[str] | tuple[str, ...], in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        self.unit_specs = tuple(units)
        layers, c = [], in_channels
        for text in self.unit_specs:
            kind, width, stride = _unit_spec(text)
            unit, c = _make_unit(kind, c, width, stride)
            layers.append(unit)
        self.units = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(c, num_classes)
        self.channels = c

    def front(self, x: torch.Tensor, split: int) -> torch.Tensor:
        for unit in self.units[:split]:
            x = unit(x)
        return x

    def back(self, f: torch.Tensor, split: int) -> torch.Tensor:
        for unit in self.units[split:]:
            f = unit(f)
        return self.head(self.dropout(f.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x, len(self.units)), len(self.units))


class Front(nn.Module):
    """The first ``split`` units of a classifier: (N, 3, H, W) -> (N, C', H', W') features."""

    def __init__(self, model: Classifier, split: int):
        super().__init__()
        self.model, self.split = model, split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.front(x, self.split)


class Back(nn.Module):
    """The rest of a classifier after ``split`` units: (N, C', H', W') features -> (N, C) logits."""

    def __init__(self, model: Classifier, split: int):
        super().__init__()
        self.model, self.split = model, split

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.back(f, self.split)


def classifier(num_classes: int, model: dict) -> Classifier:
    return Classifier(num_classes, tuple(model["units"]), dropout=float(model.get("dropout", 0.0)))


def build(config: dict) -> nn.Module:
    """The module named by ``config["module"]``, in eval mode, with fresh weights (load the state dict next).

    The front and back wrap the whole classifier (their state dicts are the classifier's, prefixed ``model.``)."""
    kind = config.get("module") if isinstance(config, dict) else None
    if kind not in MODULES:
        raise ValueError(f"model config: module must be one of {MODULES}, got {kind!r}")
    net = classifier(int(config["num_classes"]), dict(config["model"]))
    if kind == "doublemask-classifier":
        return net.eval()
    split = int(config["split"])
    if not 0 < split <= len(net.units):
        raise ValueError(f"split {split} outside 1..{len(net.units)}")
    return (Front(net, split) if kind == "doublemask-front" else Back(net, split)).eval()

