"""An fp16 copy of an fp32 ONNX graph, for TensorRT's strongly typed networks.

A strongly typed TensorRT network computes in the types the graph declares, so fp16 there means an fp16 graph:
float32 weights and constants become float16, ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``, and Casts at the
edges keep the graph's interface as it was (float32 in, float32 or integer out), so the runtime feeds both
graphs the same arrays. Graphs this cannot convert safely (ops whose float inputs must stay float32, subgraphs,
custom domains) raise :class:`Fp16Error`; the builder then falls back to TensorRT's FP16 flag.
"""

from __future__ import annotations

import numpy as np

# ops with a float input that must stay float32 (Resize scales), or whose output type is an attribute
_FP32_ONLY = frozenset({"Resize", "Upsample", "RandomNormal", "RandomUniform", "RandomNormalLike",
                        "RandomUniformLike", "EyeLike", "Bernoulli", "Multinomial"})


class Fp16Error(ValueError):
    """A graph that cannot be converted to fp16 without changing what some op means."""


def _check(graph, onnx) -> None:
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise Fp16Error(f"node {node.name or node.op_type} is in the custom domain {node.domain!r}")
        if node.op_type in _FP32_ONLY:
            raise Fp16Error(f"{node.op_type} takes float32 inputs that cannot become float16")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise Fp16Error(f"{node.op_type} has a subgraph")


def _half(tensor, onnx):
    """The same tensor as float16 (name kept)."""
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def _convert_constants(graph, onnx) -> None:
    float32, float16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    for i, init in enumerate(graph.initializer):
        if init.data_type == float32:
            graph.initializer[i].CopyFrom(_half(init, onnx))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == float32:  # Constant, ConstantOfShape
                attr.t.CopyFrom(_half(attr.t, onnx))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == float32:
                attr.i = float16
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                raise Fp16Error("Constant with a value_float(s) attribute")


def _rename(graph, old: str, new: str, inputs: bool, outputs: bool) -> None:
    for node in graph.node:
        if inputs:
            node.input[:] = [new if n == old else n for n in node.input]
        if outputs:
            node.output[:] = [new if n == old else n for n in node.output]


def _cast_edges(graph, onnx) -> None:
    """float32 graph inputs and outputs keep their type: a Cast behind each input and before each output."""
    helper, float32, float16 = onnx.helper, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    head, tail = [], []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == float32:
            inner = f"{inp.name}__fp16"
            _rename(graph, inp.name, inner, inputs=True, outputs=False)
            head.append(helper.make_node("Cast", [inp.name], [inner], to=float16, name=f"{inner}_cast"))
    for out in graph.output:
        if out.type.tensor_type.elem_type == float32:
            inner = f"{out.name}__fp16"
            _rename(graph, out.name, inner, inputs=True, outputs=True)
            tail.append(helper.make_node("Cast", [inner], [out.name], to=float32, name=f"{inner}_cast"))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)


def to_fp16(model: bytes) -> bytes:
    """The fp16 copy of a serialized fp32 ONNX model (needs the ``onnx`` package); Fp16Error if it cannot be."""
    try:
        import onnx
    except ImportError as err:
        raise Fp16Error(f"converting the graph to fp16 needs the onnx package ({err})") from None
    m = onnx.load_from_string(model)
    if len(m.functions):
        raise Fp16Error("the graph has local functions")
    initializer_names = {i.name for i in m.graph.initializer}
    if any(i.name in initializer_names for i in m.graph.input):
        raise Fp16Error("the graph lists initializers as inputs")
    _check(m.graph, onnx)
    _convert_constants(m.graph, onnx)
    _cast_edges(m.graph, onnx)
    del m.graph.value_info[:]  # intermediate types changed; consumers infer them again
    onnx.checker.check_model(m)
    return m.SerializeToString()
