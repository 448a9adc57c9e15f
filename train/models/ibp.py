"""Networks and interval bound propagation for the IBP certified patch defense (Chiang et al., ICLR 2020).

A network is a plain stack the interval arithmetic covers exactly: Conv2d, ReLU, Flatten, Linear (no pooling,
no batch norm). :func:`propagate` is the paper's Eq. 5 to 8 (center/radius form for affine layers, the
monotone map for ReLU and Flatten); :func:`margin_lower` merges the last linear layer with (e_i - e_j) before
bounding, so the lower bound of z_i - z_j uses |W_i - W_j| rather than |W_i| + |W_j| (Sec. 4.1).

* :class:`IBPNet`: normalized image (N, C, H, W) -> logits (N, K); the bundle's ``model`` engine.
* :class:`IBPBounds`: the same weights (same state dict keys); input (N, 2C, H, W) = lower image channels then
  upper image channels -> lower bounds of z_i - z_j for every class pair (N, K, K); the ``bounds`` engine.
* :class:`MarginUNet`: a small U-net predicting the single-patch margins at every location (guided-patch
  training, Sec. 4.2).

Architectures (paper Appendix A.1, as in its code's CROWN-IBP model definitions): ``small`` (2 conv + 1 FC),
``large`` (4 conv + 2 FC), ``wide`` (5 conv + FC 512, Gowal et al.'s large model; 17 M parameters at 32x32).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# conv layers as (out_channels, kernel, stride, padding); fcs: hidden linear widths (the class layer follows)
ARCHS: dict[str, dict] = {
    "small": {"convs": [[4, 4, 2, 1], [8, 4, 2, 1]], "fcs": [256]},
    "large": {"convs": [[4, 3, 1, 1], [4, 4, 2, 1], [8, 3, 1, 1], [8, 4, 2, 1]], "fcs": [256, 256]},
    "wide": {"convs": [[64, 3, 1, 1], [64, 3, 1, 1], [128, 3, 2, 1], [128, 3, 1, 1], [128, 3, 1, 1]], "fcs": [512]},
}


def arch(name: str, input_hw: tuple[int, int], in_channels: int = 3) -> dict:
    """A model config (JSON-ready) for one of :data:`ARCHS`."""
    if name not in ARCHS:
        raise ValueError(f"IBP architecture {name!r}: choose from {sorted(ARCHS)}")
    return {**ARCHS[name], "arch": name, "input_hw": [int(v) for v in input_hw], "in_channels": int(in_channels)}


def _layers(num_classes: int, model: dict) -> list[nn.Module]:
    h, w = model["input_hw"]
    c = int(model.get("in_channels", 3))
    layers: list[nn.Module] = []
    for out, k, s, p in model["convs"]:
        layers += [nn.Conv2d(c, out, k, s, p), nn.ReLU()]
        c, h, w = out, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    layers.append(nn.Flatten())
    width = c * h * w
    for hidden in model["fcs"]:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return layers


def propagate(layers, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds through Conv2d / Linear (Eq. 5, 6), ReLU (Eq. 7, 8) and Flatten; anything else is refused."""
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            center, radius = (hi + lo) / 2, (hi - lo) / 2
            center = layer(center)
            if isinstance(layer, nn.Conv2d):
                radius = F.conv2d(radius, layer.weight.abs(), None, layer.stride, layer.padding)
            else:
                radius = F.linear(radius, layer.weight.abs())
            lo, hi = center - radius, center + radius
        elif isinstance(layer, nn.ReLU):
            lo, hi = F.relu(lo), F.relu(hi)
        elif isinstance(layer, nn.Flatten):
            lo, hi = layer(lo), layer(hi)
        else:
            raise TypeError(f"interval bounds: unsupported layer {type(layer).__name__}")
    return lo, hi


@lru_cache(maxsize=16)
def _pair_index(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs i < j of k classes, and for every (i, j) the column of its pair (the diagonal: the last, zero).
    Built in numpy, so ONNX export records them as constants; cached per device, so a CUDA graph captured after
    a warm-up run copies nothing from the host."""
    i, j = np.triu_indices(k, 1)
    index = np.full((k, k), len(i), dtype=np.int64)
    index[i, j] = index[j, i] = np.arange(len(i))
    return tuple(torch.from_numpy(a.astype(np.int64)).to(device) for a in (i, j, index.ravel()))


def margin_lower(net: IBPNet, lo: torch.Tensor, hi: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
    """Lower bounds of z_i - z_j over the input box [lo, hi], the last layer merged with (e_i - e_j).

    ``labels`` None: every pair, (N, K, K) (row i: the bounds for label i); ``|W_i - W_j|`` is symmetric, so
    the radius term is computed once per unordered pair. ``labels`` (N,): only row ``labels[n]``, (N, K), the
    certificate-training margins m (m_y = 0).
    """
    *body, last = net.layers
    lo, hi = propagate(body, lo, hi)
    center, radius = (hi + lo) / 2, (hi - lo) / 2
    z = F.linear(center, last.weight, last.bias)
    weight = last.weight
    if labels is None:
        k = weight.shape[0]
        i, j, index = _pair_index(k, weight.device)
        spread = F.linear(radius, (weight[i] - weight[j]).abs())  # (N, pairs)
        spread = torch.cat([spread, torch.zeros_like(spread[:, :1])], dim=1)[:, index].view(-1, k, k)
        return z[:, :, None] - z[:, None, :] - spread
    diff = (weight[labels][:, None, :] - weight[None]).abs()  # (N, K, D)
    spread = torch.einsum("nd,nkd->nk", radius, diff)
    return z.gather(1, labels[:, None]) - z - spread


class IBPNet(nn.Module):
    """Conv/ReLU/Flatten/Linear stack: normalized image -> logits."""

    def __init__(self, num_classes: int, model: dict):
        super().__init__()
        self.in_channels = int(model.get("in_channels", 3))
        self.layers = nn.Sequential(*_layers(num_classes, model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class IBPBounds(IBPNet):
    """The bounds graph: (N, 2C, H, W), lower then upper image channels -> (N, K, K) lower bounds of z_i - z_j."""

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        return margin_lower(self, packed[:, :c], packed[:, c:])


MODULES = ("ibp-logits", "ibp-bounds")


def build(config: dict) -> IBPNet:
    """The torch engine's modules: ``ibp-logits`` (the network) or ``ibp-bounds`` (its bounds graph)."""
    cls = IBPBounds if config["module"] == "ibp-bounds" else IBPNet
    return cls(int(config["num_classes"]), dict(config["model"]))


class MarginUNet(nn.Module):
    """Guided-patch training (Sec. 4.2, Eq. 15, 16): image -> predicted single-patch margins (N, K, H-ph+1, W-pw+1).

    Two-level U-net (one downsampling, a skip connection); the last convolution has the patch's size and no
    padding, so its output has exactly one cell per patch location.
    """

    def __init__(self, num_classes: int, patch: tuple[int, int], in_channels: int = 3, width: int = 16):
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, num_classes, tuple(patch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down1(x)
        up = self.up(self.down2(skip))[..., :skip.shape[2], :skip.shape[3]]
        up = F.pad(up, (0, skip.shape[3] - up.shape[3], 0, skip.shape[2] - up.shape[2]))
        return self.head(torch.cat([skip, up], dim=1))
