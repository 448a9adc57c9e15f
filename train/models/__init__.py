"""Model builder for the torch backend: ``build(config)`` rebuilds exactly the module a bundle's ONNX was
exported from, so a ``format: "torch"`` engine entry (a safetensors state dict) runs the same graph in torch.

``config`` (the engine entry's ``config``, JSON): ``module`` names the exported module, ``num_classes`` and
``model`` (the network's config as trained) rebuild it, ``input_shape`` is the engine's per-sample input shape.

* ``bagcert-code-map``: :class:`bagcert.CodeMap` over a region scorer (``tolerance``): uint8 (N, H', W', C).
* ``bagnet-local-logits``: :class:`bagnet.LocalLogits` over a BagNet: float32 (N, H', W', C).
* ``drs``: the de-randomized smoothing base classifier: (N, 4, H, W) -> (N, C).
* ``cropnet``: the randomized-cropping crop classifier: (N, 5, ch, cw) -> (N, C).
* ``scalecert``: the ScaleCert SIN network: (N, 4, H, W) frame + occlusion mask -> ((N, C), (N, H, W)).
* ``ibp-logits``: the IBP network: (N, C, H, W) -> (N, K) logits.
* ``ibp-bounds``: the same weights as its bounds graph: (N, 2C, H, W) lower/upper image -> (N, K, K) lower bounds.
"""

from __future__ import annotations

import json

from torch import nn

MODULES = ("bagcert-code-map", "bagnet-local-logits", "drs", "cropnet", "ibp-logits", "ibp-bounds", "scalecert")


def build(config: dict) -> nn.Module:
    """The module named by ``config["module"]``, in eval mode, with fresh weights (load the state dict next)."""
    from certinfer.train.models.bagcert import CodeMap, RegionScorer, RegionScorerConfig
    from certinfer.train.models.bagnet import LocalLogits
    from certinfer.train.models.cropnet import build_cropnet
    from certinfer.train.models.drs import build_drs
    from certinfer.train.models.scalecert import build_scalecert
    from certinfer.train.models.ibp import IBPBounds, IBPNet

    kind = config.get("module") if isinstance(config, dict) else None
    if kind not in MODULES:
        raise ValueError(f"model config: module must be one of {MODULES}, got {kind!r}")
    n, model = int(config["num_classes"]), dict(config["model"])
    if kind == "bagcert-code-map":
        module = CodeMap(RegionScorer(RegionScorerConfig(num_classes=n, **model)), float(config["tolerance"]))
    elif kind == "bagnet-local-logits":
        module = LocalLogits(RegionScorer(RegionScorerConfig(num_classes=n, **model)))
    elif kind == "drs":
        module = build_drs(n, model)
    elif kind == "ibp-logits":
        module = IBPNet(n, model)
    elif kind == "ibp-bounds":
        module = IBPBounds(n, model)
    elif kind == "scalecert":
        module = build_scalecert(n, model)
    else:
        module = build_cropnet(n, model)
    return module.eval()


def config(module: str, num_classes: int, model: dict, input_shape: tuple[int, ...], **extra) -> dict:
    """A JSON-ready ``config`` for :func:`build` (tuples become lists)."""
    if module not in MODULES:
        raise ValueError(f"module must be one of {MODULES}, got {module!r}")
    return json.loads(json.dumps({"module": module, "num_classes": int(num_classes), "model": model,
                                  "input_shape": [int(v) for v in input_shape], **extra}))
