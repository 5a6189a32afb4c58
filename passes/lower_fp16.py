"""lower_fp16: run the nodes annotated fp16 in float16, with Cast boundaries to the fp32 rest of the graph.

Why fp16: it halves the bytes of the weights it touches and keeps about three significant digits, so the
layers that int8 hurts (first and last layers, attention, normalization) lose almost nothing. Why Casts at
the edges: every value outside the fp16 region keeps its fp32 type and its name, so graph outputs, other
readers and QDQ regions (insert_qdq ignores fp16 nodes) compose with it unchanged.

For each annotated node of the main graph (subgraphs are left alone) whose op is in `_FP16_INPUTS`:
- fp32 constant inputs become fp16 initializers (one copy per source, shared by its readers; values beyond
  ±65504 are clipped and counted), and fp32 sources nothing reads anymore are dropped;
- other fp32 inputs are read through one Cast(to=FLOAT16) per value; a value that is the fp32 Cast of a
  node lowered here is read at its fp16 source, so adjacent fp16 nodes never bounce through fp32;
- the float output is produced in fp16 under a new name and a Cast(to=FLOAT) writes the original name.
Only the inputs listed per op change type: the others (Reshape's shape, ...) are fp32 or integer by spec.
Other annotated ops stay in fp32 and are named in the note.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from onnxq.pass_base import Pass, PassConfig
from onnxq.qspec import get_qspec

from ._graph import add_initializer, constant_array, forget_names, try_infer_shapes, unique_name

FP16_MAX = 65504.0
FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_COMPUTE = ["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Sub", "Div", "LayerNormalization"]
_ACTIVATIONS = ["Relu", "Sigmoid", "Tanh", "Softmax", "Gelu", "Erf", "Clip", "HardSigmoid", "HardSwish", "LeakyRelu"]
_OTHER = ["Concat", "Transpose", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization"]
# op -> positions of the inputs that run in fp16 (None: all of them; they share the output's type T)
_FP16_INPUTS: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(_COMPUTE + _ACTIVATIONS + _OTHER),
    "Reshape": (0,),
}


class LowerFP16Config(PassConfig):
    """No options: which nodes run in fp16 is decided by the annotations."""


class LowerFP16(Pass):
    """Run the nodes annotated fp16 in float16, with Cast boundaries to the fp32 rest of the graph."""

    name = "lower_fp16"
    Config = LowerFP16Config
    after = ("assign_precision", "mixed_precision", "fold_batchnorm", "simplify", "upgrade_opset")
    lowers = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        annotated = [
            n for n in graph if (s := get_qspec(n)) is not None and not s.skip and s.activations.dtype == "fp16"
        ]
        if any(v is not None and _dtype(v) is None for n in annotated for v in n.inputs):
            try_infer_shapes(model, strict_mode=False)  # types stay unknown: those nodes stay fp32 and are noted
        lowered: list[tuple[ir.Node, list[int]]] = []
        left: Counter[str] = Counter()
        for node in annotated:
            positions = _fp16_inputs(node)
            if positions is not None:
                lowered.append((node, positions))
            elif not _runs_in_fp16(node):  # lowered by an earlier run: nothing to do, nothing to say
                left[node.op_type] += 1
        # Outputs first, so that every fp16 reader below finds its producer's fp32 Cast and reads past it.
        to_fp32 = {_output_to_fp16(graph, node) for node, _ in lowered}
        fp16_of: dict[ir.Value, ir.Value] = {}
        clipped = 0
        for node, positions in lowered:
            for i in positions:
                value = node.inputs[i]
                assert value is not None
                if value not in fp16_of:
                    fp16_of[value], count = _fp16_version(graph, value, to_fp32)
                    clipped += count
                node.replace_input_with(i, fp16_of[value])
        dead = [cast for cast in to_fp32 if not cast.outputs[0].uses() and not cast.outputs[0].is_graph_output()]
        graph.remove(dead, safe=True)
        weights = _drop_unused(graph, [v for v, new in fp16_of.items() if new.const_value is not None])
        graph.sort()
        forget_names(graph)
        casts_in = sum(1 for new in fp16_of.values() if (p := new.producer()) is not None and p.op_type == "Cast")
        note = (
            f"lower_fp16: {len(lowered)} nodes run in float16 ({weights} weights stored as fp16, {casts_in} Casts in, "
            f"{len(to_fp32) - len(dead)} Casts out, {clipped} weight values clipped to ±65504)"
        )
        if left:
            kinds = ", ".join(f"{op}×{n}" for op, n in sorted(left.items()))
            note += f"; {left.total()} annotated fp16 left in fp32 (op or input types not lowered: {kinds})"
        self.context.notes.append(note)
        return ir.passes.PassResult(model, modified=bool(lowered))


def _dtype(value: ir.Value) -> ir.DataType | None:
    if value.dtype is not None:
        return value.dtype
    array = constant_array(value)
    return None if array is None else ir.DataType.from_numpy(array.dtype)


def _fp16_inputs(node: ir.Node) -> list[int] | None:
    """Positions of the inputs to convert, or None when the node cannot be lowered (op, domain, types)."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _FP16_INPUTS:
        return None
    if node.op_type == "BatchNormalization" and len(node.outputs) > 1:
        return None  # training mode: running statistics outputs
    positions = _FP16_INPUTS[node.op_type] or range(len(node.inputs))
    chosen = [i for i in positions if i < len(node.inputs) and node.inputs[i] is not None]
    known = {_dtype(node.inputs[i]) for i in chosen} - {None}  # type: ignore[arg-type]
    # the chosen inputs share one type T, so one known fp32 input settles the others
    return chosen if known == {FLOAT} and node.outputs[0].dtype in (FLOAT, None) else None


def _runs_in_fp16(node: ir.Node) -> bool:
    return bool(node.outputs) and node.outputs[0].dtype == FLOAT16


def _output_to_fp16(graph: ir.Graph, node: ir.Node) -> ir.Node:
    """Make the node write fp16 under a new name; a Cast(to=FLOAT) takes over the old value's name and readers."""
    out = node.outputs[0]
    shape = None if out.shape is None else ir.Shape(out.shape)
    back = ir.Value(name=out.name, shape=shape, type=ir.TensorType(FLOAT))
    out.replace_all_uses_with(back, replace_graph_outputs=True)
    out.name = unique_name(graph, f"{back.name}_fp16")
    out.type = ir.TensorType(FLOAT16)
    cast = ir.node("Cast", [out], {"to": FLOAT}, outputs=[back], name=unique_name(graph, f"{back.name}_to_fp32"))
    graph.insert_after(node, cast)
    return cast


def _fp16_version(graph: ir.Graph, value: ir.Value, to_fp32: set[ir.Node]) -> tuple[ir.Value, int]:
    """The fp16 value to read instead of `value`, and how many weight values were clipped to make it."""
    producer = value.producer()
    if producer is not None and producer in to_fp32:
        return producer.inputs[0], 0  # type: ignore[return-value]
    array = constant_array(value)
    if array is not None:
        beyond = np.isfinite(array) & (np.abs(array) > FP16_MAX)
        half = np.where(beyond, np.sign(array) * FP16_MAX, array).astype(np.float16)
        return add_initializer(graph, f"{value.name}_fp16", half), int(beyond.sum())
    shape = None if value.shape is None else ir.Shape(value.shape)
    new = ir.Value(name=unique_name(graph, f"{value.name}_fp16"), shape=shape, type=ir.TensorType(FLOAT16))
    graph.append(ir.node("Cast", [value], {"to": FLOAT16}, outputs=[new], name=unique_name(graph, f"{new.name}_cast")))
    return new, 0


def _drop_unused(graph: ir.Graph, sources: list[ir.Value]) -> int:
    """Remove the fp32 constants that no reader needs anymore; returns how many weights were converted."""
    for value in sources:
        if value.uses() or value.is_graph_output():
            continue
        if value.is_initializer():
            graph.initializers.pop(value.name)
        elif (producer := value.producer()) is not None:
            graph.remove(producer, safe=True)
    return len(sources)
