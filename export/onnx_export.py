"""torch -> ONNX with a dynamic batch axis, and graph surgery that exposes an inner tensor for probing."""

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


def expose_input_of(onnx_bytes: bytes, op_type: str, name: str = "preactivation") -> bytes:
    """The same graph with the first input of its (single) ``op_type`` node added as an output ``name``.

    The receptive-field probe reads the real engine's pre-threshold values through this output.
    """
    model = onnx.load_from_string(onnx_bytes)
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    if len(nodes) != 1:
        raise ValueError(f"expected one {op_type} node in the graph, found {len(nodes)}")
    inner = nodes[0].input[0]
    model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()
