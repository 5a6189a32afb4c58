"""upcast_fp16: let a float16 or bfloat16 model compute in float32, keeping its inputs and outputs as they are.

Why: models are often exported in half precision (optimum's `--fp16`, GPU-first exports). onnxruntime's
integer kernels and the calibration statistics work in float32, so without this every op of such a model
stays unquantized. Why keep the interface: the caller's feeds and output handling must not change, so
half-precision graph inputs are read through a Cast to float32 and half-precision outputs are written
through a Cast back. Inside (subgraphs included) every half-precision initializer, Constant, Cast target
and dtype attribute becomes float32: exact, since float32 holds every float16 and bfloat16 value.
What is left unquantized afterwards computes in float32; onnxruntime's CPU provider does that anyway
(it brackets most half-precision kernels with Casts).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.pass_base import Pass, PassConfig

from ._graph import forget_names, iter_values, subgraphs, unique_name
from ._half import remember_upcast

HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
FLOAT = ir.DataType.FLOAT
# Ops whose integer attribute `dtype` (or `to`) names an output element type.
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype"}
_DTYPE_ATTRS |= {"RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


class UpcastFP16Config(PassConfig):
    """No options: a model without half-precision tensors is left untouched."""


class UpcastFP16(Pass):
    """Let a float16 or bfloat16 model compute in float32, keeping its inputs and outputs as they are."""

    name = "upcast_fp16"
    Config = UpcastFP16Config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        graphs = [graph, *subgraphs(graph)]
        half = next((v.dtype for g in graphs for v in iter_values(g) if _is_half(v)), None)
        if half is None and not any(_dtype_attribute(n) or _half_tensors(n) for g in graphs for n in g):
            return ir.passes.PassResult(model, modified=False)
        remember_upcast(model, half or ir.DataType.FLOAT16)
        outputs = self._bracket_outputs(graph)
        inputs = self._bracket_inputs(graph)
        tensors = 0
        interface = set(graph.inputs)
        for g in graphs:
            for value in iter_values(g):
                tensors += 0 if value in interface else _upcast_value(value)
            for node in g:
                tensors += _upcast_attributes(node)
        graph.sort()
        forget_names(graph)
        self.context.notes.append(
            f"upcast_fp16: the half-precision model computes in float32 ({tensors} constants upcast; "
            f"{inputs} inputs and {outputs} outputs keep their type through Casts)"
        )
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _bracket_inputs(graph: ir.Graph) -> int:
        count = 0
        for value in graph.inputs:
            if not _is_half(value) or value in graph.initializers.values():
                continue
            wide = ir.Value(name=unique_name(graph, f"{value.name}_fp32"), shape=value.shape, type=ir.TensorType(FLOAT))
            value.replace_all_uses_with(wide)
            name = unique_name(graph, f"{value.name}_upcast")
            graph.append(ir.node("Cast", [value], {"to": FLOAT}, outputs=[wide], name=name))  # sorted at the end
            count += 1
        return count

    @staticmethod
    def _bracket_outputs(graph: ir.Graph) -> int:
        """Each half-precision output is produced under a new name in float32 and cast back to its own."""
        count = 0
        for i, value in enumerate(list(graph.outputs)):
            if not _is_half(value) or value in graph.inputs:  # a passed-through input keeps its type anyway
                continue
            half = ir.Value(name=value.name, shape=value.shape, type=ir.TensorType(value.dtype))  # type: ignore[arg-type]
            value.name = unique_name(graph, f"{half.name}_fp32")
            graph.outputs[i] = half
            name = unique_name(graph, f"{half.name}_downcast")
            cast = ir.node("Cast", [value], {"to": half.dtype}, outputs=[half], name=name)
            cast.meta["onnxq.keep_dtype"] = True
            graph.append(cast)
            count += 1
        return count


def _is_half(value: ir.Value) -> bool:
    return value.dtype in HALF


def _dtype_attribute(node: ir.Node) -> str | None:
    """The name of the node's element-type attribute if it names a half type (Cast's `to`, …)."""
    name = _DTYPE_ATTRS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if name and name in node.attributes and ir.DataType(node.attributes[name].value) in HALF:
        return name
    return None


def _half_tensors(node: ir.Node) -> list[str]:
    """Names of the node's tensor attributes that hold half-precision data (Constant's `value`, …)."""
    return [k for k, a in node.attributes.items() if a.type == ir.AttributeType.TENSOR and a.value.dtype in HALF]


def _upcast_value(value: ir.Value) -> int:
    """Float32 type for a half-precision value; its constant data too (1 if it had some)."""
    if not _is_half(value):
        return 0
    producer = value.producer()
    if producer is not None and producer.meta.get("onnxq.keep_dtype"):
        return 0
    value.type = ir.TensorType(FLOAT)
    if value.const_value is None:
        return 0
    value.const_value = _wide(value.const_value, value.name)
    return 1


def _upcast_attributes(node: ir.Node) -> int:
    if node.meta.get("onnxq.keep_dtype"):
        return 0
    if name := _dtype_attribute(node):
        node.attributes[name] = ir.AttrInt64(name, FLOAT)
    keys = _half_tensors(node)
    for key in keys:
        tensor = node.attributes[key].value
        node.attributes[key] = ir.AttrTensor(key, _wide(tensor, tensor.name))
    return len(keys)


def _wide(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(np.asarray(tensor.numpy()).astype(np.float32), name=name)
