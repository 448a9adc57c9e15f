"""torch -> ONNX with a dynamic batch axis."""

from __future__ import annotations

import io

import onnx
import torch

OPSET = 17


def export_onnx(module: torch.nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str],
                output_names: list[str]) -> bytes:
    """Export ``module`` in eval mode; every input and output gets a dynamic leading batch axis."""
    module.eval()
    buf = io.BytesIO()
    axes = {name: {0: "batch"} for name in input_names + output_names}
    with torch.no_grad():
        torch.onnx.export(module, examples, buf, input_names=input_names, output_names=output_names,
                          dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return buf.getvalue()

