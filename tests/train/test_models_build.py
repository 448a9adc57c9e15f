"""certinfer.train.models.build: the torch backend's builder rebuilds each exported module from its config."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from certinfer.export.torch_weights import torch_engine  # noqa: E402
from certinfer.train import models  # noqa: E402

TINY_SCORER = dict(kernels=(3, 1), strides=(1, 2), widths=(8, 8), stem_width=8)
CASES = [
    (models.config("bagcert-code-map", 3, TINY_SCORER, (3, 16, 16), tolerance=0.05), (8, 8, 3), torch.uint8),
    (models.config("bagnet-local-logits", 3, TINY_SCORER, (3, 16, 16)), (8, 8, 3), torch.float32),
    (models.config("drs", 3, dict(widths=(4, 8), blocks=(1, 1), strides=(1, 2), stem_width=4), (4, 16, 16)), (3,),
     torch.float32),
    (models.config("cropnet", 3, dict(input_hw=(16, 16), crop_hw=(8, 8), widths=(4, 4, 8, 8)), (5, 8, 8)), (3,),
     torch.float32),
    (models.config("ibp-logits", 3, dict(convs=[[4, 4, 2, 1]], fcs=[8], input_hw=[16, 16]), (3, 16, 16)), (3,),
     torch.float32),
    (models.config("ibp-bounds", 3, dict(convs=[[4, 4, 2, 1]], fcs=[8], input_hw=[16, 16]), (6, 16, 16)), (3, 3),
     torch.float32),
]


@pytest.mark.parametrize("config,out_shape,dtype", CASES, ids=[c[0]["module"] for c in CASES])
def test_build_rebuilds_every_exported_module(config, out_shape, dtype):
    torch.manual_seed(0)
    module = models.build(config)
    x = torch.rand(2, *config["input_shape"])
    if config["module"] == "cropnet":
        x[:, 3:] = torch.randint(0, 9, (2, 2, 1, 1)).float()  # top/left offsets, constant over the crop
    with torch.no_grad():
        out = module(x)
    assert out.shape == (2, *out_shape) and out.dtype == dtype
    entry, weights = torch_engine(module, config, max_batch=16)  # fails unless build(config) takes the weights
    assert entry["format"] == "torch" and entry["batch"] == [1, 16] and entry["config"] == config
    from safetensors.torch import load

    again = models.build(config)
    again.load_state_dict(load(weights), strict=True)
    with torch.no_grad():
        assert np.array_equal(again(x).numpy(), out.numpy())


def test_build_refuses_a_config_without_a_known_module():
    with pytest.raises(ValueError, match="module must be one of"):
        models.build({"num_classes": 3, "model": TINY_SCORER})
    with pytest.raises(ValueError, match="module must be one of"):
        models.config("resnet", 3, {}, (3, 8, 8))
