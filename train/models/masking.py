"""PatchGuard's networks as the torch engine rebuilds them: BagNet local logits (``bagnet-local-logits``, see
:mod:`certinfer.train.models.bagnet`) or the de-randomized smoothing base classifier (``drs``,
:mod:`certinfer.train.models.drs`)."""

from __future__ import annotations

from torch import nn

from certinfer.train.models.bagnet import LocalLogits, build_bagnet
from certinfer.train.models.drs import build_drs


MODULES = ("bagnet-local-logits", "drs")


def build(config: dict) -> nn.Module:
    """The module a masking bundle's ONNX is exported from."""
    n, model = int(config["num_classes"]), dict(config["model"])
    return build_drs(n, model) if config["module"] == "drs" else LocalLogits(build_bagnet(n, model))
