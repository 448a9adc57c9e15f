"""ScaleCert network: a ResNet-style CNN with a SIN (superficial important neuron) layer after its stem.

Input (N, C+1, H, W): the normalized frame and an occlusion mask (1 = occluded) in the last channel, as
``certinfer.runtime.defenses.scalecert`` builds it. Outputs: logits (N, classes) and the winner mask (N, H', W').

* Occlusion: occluded pixels become exactly +0.0 (``torch.where``, so nothing of the occluded values passes).
* Superficial layer: one conv (k x k, stride 1, padding k // 2) + BN + ReLU; its geometry goes into the manifest.
* SIN layer: score = features summed over channels; positions whose receptive field meets an occluded pixel
  (a max-pool of the mask with the layer's geometry) are excluded and get the lowest float; winners are the
  remaining positions with score >= the k-th largest (ties all kept; no backend TopK tie-breaking involved).
  Only winners' features reach the body (``torch.where``: exact zeros elsewhere), so only winners get gradients
  during training (the paper's "update the winners only").
* Body: ResNet basic blocks on the pruned map, global average pooling, a linear head. Nothing else reads the
  input: the pruned map is the body's only input (no skip path around the SIN layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

LOWEST = torch.finfo(torch.float32).min


@dataclass
class SINNetConfig:
    num_classes: int
    input_hw: tuple[int, int] = (32, 32)
    channels: int = 3
    stem: int = 32  # superficial layer width
    kernel: int = 3  # superficial layer kernel (stride 1, same padding)
    widths: tuple[int, ...] = (32, 64, 128)  # one residual stage each
    strides: tuple[int, ...] = (2, 2, 2)
    blocks: tuple[int, ...] = (1, 1, 1)
    top_k: float = 0.2  # winner rate: the share of superficial positions kept

    def __post_init__(self) -> None:
        self.input_hw = tuple(int(v) for v in self.input_hw)
        self.widths, self.strides, self.blocks = tuple(self.widths), tuple(self.strides), tuple(self.blocks)
        if not len(self.widths) == len(self.strides) == len(self.blocks):
            raise ValueError("widths, strides and blocks need one entry per stage")
        if self.kernel % 2 != 1 or not 0.0 < self.top_k <= 1.0:
            raise ValueError(f"kernel must be odd and top_k in (0, 1], got {self.kernel}, {self.top_k}")

    @property
    def winners(self) -> int:
        h, w = self.input_hw
        return max(1, round(self.top_k * h * w))

    def geometry(self) -> dict:
        """The superficial layer's receptive-field geometry (``runtime.geometry.Geometry`` fields)."""
        k = self.kernel
        return {"rf": [k, k], "stride": [1, 1], "padding": [k // 2, k // 2], "input_hw": list(self.input_hw),
                "output_hw": list(self.input_hw)}

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "num_classes"}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                  nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(cout))
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class SINNet(nn.Module):
    """(N, C+1, H, W) frame + occlusion mask -> (logits (N, classes), winners (N, H, W) float)."""

    def __init__(self, cfg: SINNetConfig):
        super().__init__()
        self.cfg = cfg
        k = cfg.kernel
        self.superficial = nn.Sequential(nn.Conv2d(cfg.channels, cfg.stem, k, 1, k // 2, bias=False),
                                         nn.BatchNorm2d(cfg.stem), nn.ReLU(inplace=True))
        layers, cin = [], cfg.stem
        for width, stride, n in zip(cfg.widths, cfg.strides, cfg.blocks):
            for i in range(n):
                layers.append(BasicBlock(cin, width, stride if i == 0 else 1))
                cin = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, cfg.num_classes)
        self.sparse = True  # False: plain dense network (the trainer's warm-up before SIN fine-tuning)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Superficial features of the occluded frame (N, C', H, W) and the affected positions (N, H, W) bool.
        Constants are made on the input's device: a CUDA graph captures no host copy."""
        frame, occluded = x[:, :-1], x[:, -1:] > 0.5
        f = self.superficial(torch.where(occluded, x.new_zeros(()), frame))
        k = self.cfg.kernel
        affected = F.max_pool2d(occluded.to(x.dtype), k, 1, k // 2)[:, 0] > 0
        return f, affected

    def prune(self, f: torch.Tensor, affected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SIN layer: (pruned features, winners bool (N, H, W))."""
        score = torch.where(affected, f.new_full((), LOWEST), f.sum(dim=1))
        kth = torch.topk(score.flatten(1), self.cfg.winners, dim=1).values[:, -1]
        keep = (score >= kth[:, None, None]) & ~affected
        return torch.where(keep[:, None], f, f.new_zeros(())), keep

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f, affected = self.features(x)
        if self.sparse:
            pruned, keep = self.prune(f, affected)
        else:
            pruned, keep = f, ~affected
        return self.head(self.body(pruned)), keep.to(x.dtype)


def build_scalecert(num_classes: int, cfg: dict) -> SINNet:
    return SINNet(SINNetConfig(num_classes=num_classes, **cfg))


MODULES = ("scalecert",)


def build(config: dict) -> SINNet:
    """The torch engine's module (``scalecert``), pruning as exported."""
    return build_scalecert(int(config["num_classes"]), dict(config["model"]))
