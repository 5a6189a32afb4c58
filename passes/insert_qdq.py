"""insert_qdq: lower QuantSpec annotations to QuantizeLinear/DequantizeLinear pairs (the QDQ format).

Placement is what onnxruntime fuses into integer kernels:
- DQ on the activation inputs and the weight of Conv/ConvTranspose/MatMul/Gemm, Q→DQ on their output;
  a Relu/Clip right after the op is kept inside the group (Q goes after it: ReluQuantFusion removes it).
- Weights become integer initializers + DequantizeLinear (per-channel along the output-channel axis);
  biases become int32 with scale s_x·s_w, the accumulator's scale.
- Data-movement ops (Reshape, Transpose, MaxPool, …) whose input is quantized take their input's scale:
  values joined by such ops form one group (union-find) sharing one scale and zero point, so DQ→op→Q
  collapses to an integer op. Concat is the exception by default: a shared scale would make a Relu
  branch signed and stop onnxruntime from fusing that Conv+Relu, so each input keeps its scale and the
  output gets the union range (QLinearConcat requantizes); `share_concat_scale` restores sharing.
- A value produced by a quantized op is read through its DQ by every consumer; a value produced in
  float (a graph input, a float op) is read through the DQ only by the quantized consumers.
- Parts already in QDQ form (a QAT export, a model quantized before) are left alone: a node that reads a
  DequantizeLinear output, and a value that already feeds a QuantizeLinear, are never quantized again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq import qmath
from onnxq.errors import MissingPrerequisite, OnnxqError
from onnxq.pass_base import ACTIVATION_STATS, Pass, PassConfig, TensorRange
from onnxq.qspec import (
    ANNOTATED_KEY,
    COMPUTE_OPS,
    FUSED_ACTIVATIONS,
    OWN_SCALE_OPS,
    SHARED_SCALE_OPS,
    NodeQuant,
    QuantSpec,
    get_qspec,
)

from ._graph import (
    add_initializer,
    constant_array,
    default_opset,
    forget_names,
    is_constant,
    iter_values,
    unique_name,
)

NEEDS_OPSET_21 = {"int4", "uint4"}
NEEDS_OPSET_21_ACT = {"int16", "uint16", "int4", "uint4"}
ONNX_TYPES = {
    "int4": ir.DataType.INT4,
    "uint4": ir.DataType.UINT4,
    "int8": ir.DataType.INT8,
    "uint8": ir.DataType.UINT8,
    "int16": ir.DataType.INT16,
    "uint16": ir.DataType.UINT16,
}


class InsertQDQConfig(PassConfig):
    fuse_activations: bool = Field(True, description="put the output Q after a Relu/Clip that follows the op")
    share_concat_scale: bool = Field(
        False,
        description="one scale for Concat inputs and output; off keeps each input's own scale (QLinearConcat "
        "requantizes), which keeps Relu outputs unsigned so onnxruntime can still fuse Conv+Relu",
    )
    float_output_ops: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gemm"],
        description="ops whose output stays float when no quantized op reads it (onnxruntime has integer "
        "kernels with float outputs for these; quantizing a residual-stream output only adds error)",
    )
    quantize_bias: bool = Field(True, description="int32 bias (s_x·s_w) for Conv/Gemm, as integer kernels expect")


@dataclass
class _Plan:
    """Activation values to quantize, grouped by shared scale, and which consumers read the DQ."""

    spec: dict[str, QuantSpec] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)
    produced_quantized: set[str] = field(default_factory=set)
    readers: dict[str, set[int]] = field(default_factory=dict)  # value -> ids of quantized consumers
    weight_only: list[tuple[ir.Node, NodeQuant]] = field(default_factory=list)  # input already Q/DQ'd
    bias_only: list[ir.Node] = field(default_factory=list)  # input and weight already Q/DQ'd

    def add(self, value: ir.Value, spec: QuantSpec) -> None:
        if _feeds_quantize(value):
            return  # rounded already (QAT, an earlier run): rounding twice only adds error
        self.spec.setdefault(value.name, spec)
        self.parent.setdefault(value.name, value.name)

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        if a not in self.parent or b not in self.parent:
            return  # one of them was quantized before this pass ran
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def read_by(self, value: ir.Value, node: ir.Node) -> None:
        self.readers.setdefault(value.name, set()).add(id(node))


def _reads_dequantized(node: ir.Node) -> bool:
    return any(
        v is not None and (p := v.producer()) is not None and p.op_type == "DequantizeLinear" for v in node.inputs
    )


def _float_weight_behind_rounded_input(node: ir.Node) -> bool:
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return False
    source = inputs[0].producer()
    return source is not None and source.op_type == "DequantizeLinear" and constant_array(inputs[1]) is not None


def _quantize_bias_behind_qdq(graph: ir.Graph, node: ir.Node) -> int:
    """A Conv/Gemm whose input and weight are both read through DequantizeLinear, with a float bias: the
    bias becomes int32 at s_x·s_w so that onnxruntime can run the op as one integer kernel."""
    if len(node.inputs) < 3 or node.inputs[2] is None:
        return 0
    bias = constant_array(node.inputs[2])
    producers = [v.producer() if v is not None else None for v in node.inputs[:2]]
    if bias is None or bias.ndim != 1 or any(p is None or p.op_type != "DequantizeLinear" for p in producers):
        return 0
    if node.op_type == "Gemm" and (
        node.attributes.get_float("beta", 1.0) != 1.0 or node.attributes.get_int("transA", 0)
    ):
        return 0
    x_scale = constant_array(producers[0].inputs[1])  # type: ignore[union-attr]
    w_scale = constant_array(producers[1].inputs[1])  # type: ignore[union-attr]
    if x_scale is None or w_scale is None or np.size(x_scale) != 1 or np.size(w_scale) not in (1, bias.size):
        return 0
    q, scale = qmath.quantize_bias(
        bias, float(np.asarray(x_scale).reshape(-1)[0]), np.asarray(w_scale, np.float32).reshape(-1)
    )
    per_channel = np.size(scale) > 1
    dq = _dequantized_constant(
        graph, node.inputs[2].name, q, scale, np.zeros(scale.shape, np.int32), 0 if per_channel else None
    )
    node.replace_input_with(2, dq.outputs[0])
    return 1


def _existing_qparams(node: ir.Node) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """The input's scale as the Q/DQ already in the graph says it (for the int32 bias at s_x·s_w)."""
    dq = node.inputs[0].producer()  # type: ignore[union-attr]
    q = dq.inputs[0].producer() if dq is not None and dq.inputs[0] is not None else None
    scale = constant_array(dq.inputs[1]) if dq is not None and len(dq.inputs) > 1 else None
    if q is None or q.op_type != "QuantizeLinear" or scale is None or np.size(scale) != 1:
        return {}
    return {q.inputs[0].name: (scale, np.zeros(()), "uint8")}  # type: ignore[union-attr,dict-item]


def _feeds_quantize(value: ir.Value) -> bool:
    return any(use.node.op_type == "QuantizeLinear" for use in value.uses())


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (None, ir.DataType.FLOAT)


def _weight_axis(node: ir.Node, weight: np.ndarray, spec: QuantSpec) -> int | None:
    """Output-channel axis of a weight, or None for per-tensor."""
    if spec.granularity == "tensor":
        return None
    if spec.axis is not None:
        return spec.axis % weight.ndim
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1 if node.attributes.get_int("group", 1) == 1 else None
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul":
        return 1 if weight.ndim == 2 else None
    return None


class InsertQDQ(Pass):
    name = "insert_qdq"
    Config = InsertQDQConfig
    needs = frozenset({ACTIVATION_STATS})
    after = ("assign_precision", "fold_batchnorm", "simplify", "upgrade_opset")
    lowers = True

    def requires(self, model: ir.Model) -> None:
        if not model.graph.meta.get(ANNOTATED_KEY) and not any(get_qspec(n) for n in model.graph):
            raise MissingPrerequisite(
                "insert_qdq found no node annotated for quantization",
                "run assign_precision (or another annotating pass) before insert_qdq",
            )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        opset = default_opset(model)
        plan, compute_nodes = self._plan(graph)
        weight_cache: dict[tuple[str, QuantSpec, int | None], ir.Value] = {}
        for node, spec in plan.weight_only:
            self._quantize_weight_and_bias(graph, node, spec, _existing_qparams(node), weight_cache)
        biases = sum(_quantize_bias_behind_qdq(graph, node) for node in plan.bias_only)
        if biases:
            self.context.notes.append(f"insert_qdq: {biases} float biases of QDQ ops stored as int32 at s_x·s_w")
        if plan.weight_only:
            self.context.notes.append(
                f"insert_qdq: {len(plan.weight_only)} float weights behind inputs quantized before (QAT) quantized"
            )
        if not plan.spec:
            if plan.weight_only or biases:
                graph.sort()
                return ir.passes.PassResult(model, modified=True)
            self.context.notes.append(
                "insert_qdq: nothing left to quantize (annotated ops are float16, or already in QDQ form)"
            )
            return ir.passes.PassResult(model, modified=False)
        self._check_opset(opset, plan, compute_nodes)
        values = {v.name: v for v in iter_values(graph) if v.name in plan.spec}  # the activations, by name
        ranges = self._ranges(model, plan, values)
        qparams = self._group_qparams(plan, ranges)
        self._insert_activation_qdq(graph, plan, qparams, values)
        for node, spec in compute_nodes:
            self._quantize_weight_and_bias(graph, node, spec, qparams, weight_cache)
        graph.sort()
        forget_names(graph)
        self.context.notes.append(
            f"insert_qdq: {len(plan.spec)} activations in {len({plan.find(n) for n in plan.spec})} scale groups, "
            f"{len(weight_cache)} weights, {len(compute_nodes)} compute ops"
        )
        return ir.passes.PassResult(model, modified=True)

    # --- planning ---------------------------------------------------------------------------------------

    def _plan(self, graph: ir.Graph) -> tuple[_Plan, list[tuple[ir.Node, NodeQuant]]]:
        plan = _Plan()
        compute: list[tuple[ir.Node, NodeQuant]] = []
        for node in graph:  # topological: a shared-scale op sees its producer's decision
            spec = get_qspec(node)
            if spec is None or spec.skip or spec.activations.is_float or spec.activations.dynamic:
                continue  # float, or lowered at run time by quantize_dynamic
            if node.domain not in ("", "ai.onnx"):
                continue
            if _reads_dequantized(node):
                if node.op_type in COMPUTE_OPS and _float_weight_behind_rounded_input(node):
                    plan.weight_only.append((node, spec))  # training rounded the input, not the weight
                elif node.op_type in ("Conv", "Gemm") and self.config.quantize_bias:
                    plan.bias_only.append(node)  # QAT exports keep a float bias: integer kernels need int32
                if node.op_type in COMPUTE_OPS and not spec.activations.is_float:
                    self._plan_uncovered_output(node, spec.activations, plan)
                continue
            act = spec.activations
            if node.op_type in COMPUTE_OPS:
                if self._plan_compute(node, act, spec, plan):
                    compute.append((node, spec))
            elif node.op_type in SHARED_SCALE_OPS:
                self._plan_shared(node, act, plan)
            elif node.op_type in OWN_SCALE_OPS:
                inputs = [v for v in node.inputs if _is_float(v)]
                outputs = [v for v in node.outputs if _is_float(v) and v.name]
                if inputs and outputs and len(node.outputs) == 1:
                    for value in inputs:
                        plan.add(value, act)
                        plan.read_by(value, node)
                    plan.add(outputs[0], act)
                    plan.produced_quantized.add(outputs[0].name)
        return plan, compute

    def _plan_compute(self, node: ir.Node, act: QuantSpec, spec: NodeQuant, plan: _Plan) -> bool:
        inputs = list(node.inputs)
        if len(inputs) < 2 or not all(_is_float(v) for v in inputs[:2]):
            return False
        weight_is_const = is_constant(inputs[1])
        if node.op_type in ("Conv", "ConvTranspose") and not weight_is_const:
            return False  # a computed conv weight: leave the op in float
        if is_constant(inputs[0]) or spec.weights.is_float:
            return False
        activations = [inputs[0]] if weight_is_const else inputs[:2]
        for value in activations:
            plan.add(value, act)
            plan.read_by(value, node)
        out = self._group_output(node)
        if node.op_type in self.config.float_output_ops and not _reaches_quantized_op(out):
            return True  # integer kernel with a float output (QGemm, MatMulIntegerToFloat): no output error
        plan.add(out, act)
        plan.produced_quantized.add(out.name)
        return True

    def _plan_uncovered_output(self, node: ir.Node, act: QuantSpec, plan: _Plan) -> None:
        """An op whose inputs training rounded but whose output it did not (Conv → Relu → ReduceMean):
        without an output Q onnxruntime runs it in float, so its output is calibrated and rounded too."""
        out = self._group_output(node)
        if node.op_type in self.config.float_output_ops or _feeds_quantize(out) or out.is_graph_output():
            return
        if any(use.node.op_type in SHARED_SCALE_OPS for use in out.uses()):
            return  # fold_qat carries the next Q's scale back through data movement instead
        plan.add(out, act)
        plan.produced_quantized.add(out.name)

    def _group_output(self, node: ir.Node) -> ir.Value:
        """The value whose Q ends the group: the op's output, or that of a Relu/Clip fused after it."""
        out = node.outputs[0]
        if not self.config.fuse_activations or out.is_graph_output() or len(out.uses()) != 1:
            return out
        consumer = next(iter(out.uses())).node
        if consumer.op_type in FUSED_ACTIVATIONS and consumer.domain in ("", "ai.onnx"):
            if consumer.op_type == "Clip" and not all(is_constant(v) for v in consumer.inputs[1:] if v is not None):
                return out
            return consumer.outputs[0]
        return out

    def _plan_shared(self, node: ir.Node, act: QuantSpec, plan: _Plan) -> None:
        data_inputs = list(node.inputs) if node.op_type == "Concat" else node.inputs[:1]
        data_inputs = [v for v in data_inputs if v is not None]
        if not data_inputs or not any(v.name in plan.spec for v in data_inputs):
            return  # only quantized where its input already is: never start a quantized region here
        if not all(_is_float(v) for v in data_inputs):
            return
        outputs = [v for v in node.outputs if v.name]
        if node.op_type == "Concat" and not self.config.share_concat_scale:
            for value in data_inputs:
                plan.add(value, act)
                plan.read_by(value, node)
            plan.add(outputs[0], plan.spec.get(data_inputs[0].name, act))
            plan.produced_quantized.add(outputs[0].name)
            return
        for value in data_inputs:
            plan.add(value, plan.spec.get(data_inputs[0].name, act))
            plan.read_by(value, node)
            plan.union(data_inputs[0].name, value.name)
        for out in outputs:
            plan.add(out, plan.spec.get(data_inputs[0].name, act))
            plan.produced_quantized.add(out.name)
            plan.union(data_inputs[0].name, out.name)

    def _check_opset(self, opset: int, plan: _Plan, compute: list[tuple[ir.Node, NodeQuant]]) -> None:
        if opset < 10:
            raise OnnxqError(
                f"the model is at opset {opset}; QuantizeLinear needs 10 or newer",
                "add '- upgrade_opset: {target: 13}' as the first pass",
            )
        if opset < 13 and any(s.weights.granularity == "channel" for _, s in compute):
            raise OnnxqError(
                f"per-channel weights need opset 13, the model is at opset {opset}",
                "add '- upgrade_opset: {target: 13}' before insert_qdq, or use weights granularity: tensor",
            )
        if opset < 21:
            wide = {s.dtype for s in plan.spec.values()} & NEEDS_OPSET_21_ACT
            wide |= {s.weights.dtype for _, s in compute} & NEEDS_OPSET_21
            if wide:
                raise OnnxqError(
                    f"{sorted(wide)} Q/DQ need opset 21, the model is at opset {opset}",
                    "add '- upgrade_opset: {target: 21}' before insert_qdq",
                )
        blocked = [n.name for n, s in compute if s.weights.granularity == "block"]
        if blocked:
            raise OnnxqError(
                f"insert_qdq lowers per-tensor and per-channel weights; '{blocked[0]}' asks for blocks",
                "use granularity: channel for int8 QDQ",
            )

    # --- parameters -------------------------------------------------------------------------------------

    def _ranges(self, model: ir.Model, plan: _Plan, values: dict[str, ir.Value]) -> dict[str, TensorRange]:
        ranges: dict[str, TensorRange] = {}
        to_collect = []
        for name in plan.spec:
            array = constant_array(values.get(name))
            if array is not None:
                ranges[name] = TensorRange(float(array.min()), float(array.max()))
            else:
                to_collect.append(name)
        exact = [n for n in to_collect if n in values and _clipping_changes_decisions(values[n])]
        ranges.update(self.context.activation_ranges(model, to_collect, exact=exact))
        missing = [n for n in to_collect if n not in ranges]
        if missing:
            raise OnnxqError(
                f"no calibration range for '{missing[0]}' ({len(missing)} in all)",
                "check that the calibration data reaches every quantized op",
            )
        return ranges

    def _group_qparams(
        self, plan: _Plan, ranges: dict[str, TensorRange]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
        groups: dict[str, list[str]] = {}
        for name in plan.spec:
            groups.setdefault(plan.find(name), []).append(name)
        params: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}
        for root, members in groups.items():
            spec = plan.spec[root]
            rmin = min(ranges[m].min for m in members)
            rmax = max(ranges[m].max for m in members)
            if not (np.isfinite(rmin) and np.isfinite(rmax)):
                raise OnnxqError(
                    f"the calibrated range of '{root}' is not finite ({rmin}, {rmax})",
                    "check the calibration data for NaN/Inf or overflowing inputs",
                )
            scale, zero = qmath.qparams(rmin, rmax, spec.dtype, spec.symmetric)
            for member in members:
                params[member] = (scale, zero, spec.dtype)
        return params

    # --- rewriting --------------------------------------------------------------------------------------

    def _insert_activation_qdq(self, graph: ir.Graph, plan: _Plan, qparams: dict, values: dict[str, ir.Value]) -> None:
        group_inits: dict[str, tuple[ir.Value, ir.Value]] = {}
        for name, value in values.items():
            root = plan.find(name)
            scale, zero, dtype = qparams[name]
            if root not in group_inits:
                group_inits[root] = (
                    add_initializer(graph, f"{root}_scale", np.asarray(scale, dtype=np.float32)),
                    add_initializer(graph, f"{root}_zero_point", np.asarray(zero)),
                )
            scale_v, zero_v = group_inits[root]
            q = ir.node("QuantizeLinear", [value, scale_v, zero_v], name=unique_name(graph, f"{name}_QuantizeLinear"))
            q.outputs[0].name = unique_name(graph, f"{name}_quantized")
            dq = ir.node(
                "DequantizeLinear", [q.outputs[0], scale_v, zero_v], name=unique_name(graph, f"{name}_DequantizeLinear")
            )
            dq_out = dq.outputs[0]
            dq_out.name = unique_name(graph, f"{name}_dequantized")
            dq_out.dtype = ir.DataType.FLOAT
            dq_out.shape = value.shape
            q.outputs[0].dtype = ONNX_TYPES[dtype]
            graph.extend([q, dq])
            self._reroute(value, q, dq_out, plan.readers.get(name, set()), name in plan.produced_quantized)

    @staticmethod
    def _reroute(value: ir.Value, q: ir.Node, dq_out: ir.Value, readers: set[int], produced_quantized: bool) -> None:
        for use in list(value.uses()):
            if use.node is q:
                continue
            if produced_quantized or id(use.node) in readers:
                use.node.replace_input_with(use.idx, dq_out)
        if produced_quantized and value.is_graph_output():
            graph = value.graph
            assert graph is not None
            outputs = graph.outputs
            index = next(i for i, v in enumerate(outputs) if v is value)
            original = value.name
            value.name = unique_name(graph, f"{original}_float")
            outputs[index] = dq_out
            dq_out.name = original

    def _quantize_weight_and_bias(
        self, graph: ir.Graph, node: ir.Node, spec: NodeQuant, qparams: dict, cache: dict
    ) -> None:
        weight_value = node.inputs[1]
        weight = constant_array(weight_value)
        if weight is None or weight_value is None:
            return  # both MatMul inputs are activations: already handled as activations
        wspec = spec.weights
        axis = _weight_axis(node, weight, wspec)
        bias = self._bias_to_quantize(node, weight, axis, qparams)
        min_scale = None if bias is None else qmath.bias_min_weight_scale(bias[0], bias[1], axis is not None)
        key = (weight_value.name, wspec, axis)
        cached = cache.get(key)
        if cached is None or (min_scale is not None and np.any(min_scale > cached.producer().meta["onnxq.scale"])):
            # A bias that would overflow int32 at s_x·s_w floors this node's weight scale: it gets its own DQ.
            q, scale, zero = qmath.quantize_weight(
                weight.astype(np.float32), wspec.dtype, wspec.symmetric, axis, wspec.reduce_range, min_scale
            )
            dq = _dequantized_constant(graph, weight_value.name, q, scale, zero, axis, ONNX_TYPES[wspec.dtype])
            cached = dq.outputs[0]
            if key not in cache:
                cache[key] = cached
        node.replace_input_with(1, cached)
        if bias is not None:
            b, x_scale = bias
            w_scale = cached.producer().meta["onnxq.scale"]
            q, scale = qmath.quantize_bias(b, x_scale, w_scale)
            dq = _dequantized_constant(
                graph, node.inputs[2].name, q, scale, np.zeros(scale.shape, np.int32), 0 if axis is not None else None
            )
            node.replace_input_with(2, dq.outputs[0])

    def _bias_to_quantize(
        self, node: ir.Node, weight: np.ndarray, axis: int | None, qparams: dict
    ) -> tuple[np.ndarray, float] | None:
        """(bias, input scale) when this node's bias becomes int32 at s_x·s_w, as integer kernels expect."""
        if not self.config.quantize_bias or node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3:
            return None
        bias = constant_array(node.inputs[2])
        if bias is None or bias.ndim != 1 or node.inputs[0] is None:
            return None
        if node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0:
            return None
        if axis is not None and weight.shape[axis] != bias.shape[0]:
            return None
        x = node.inputs[0]
        source = x.producer()
        x_name = x.name
        if source is not None and source.op_type == "DequantizeLinear":
            quantize = source.inputs[0].producer() if source.inputs[0] is not None else None
            if quantize is None or quantize.op_type != "QuantizeLinear":
                return None
            x_name = quantize.inputs[0].name
        if x_name not in qparams:
            return None
        return bias, float(qparams[x_name][0])


def _dequantized_constant(
    graph: ir.Graph,
    base: str,
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    axis: int | None,
    dtype: ir.DataType | None = None,
) -> ir.Node:
    """Integer initializer + scale + zero point + DequantizeLinear (per-channel along `axis`, else per-tensor)."""
    q_init = add_initializer(graph, f"{base}_quantized", q)
    if dtype is not None:
        q_init.dtype = dtype  # int4 is stored widened in numpy; the ONNX type says what it is
    if axis is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    scale_init = add_initializer(graph, f"{base}_scale", scale)
    zero_init = add_initializer(graph, f"{base}_zero_point", zero)
    dq = ir.node(
        "DequantizeLinear",
        [q_init, scale_init, zero_init],
        attributes={"axis": axis} if axis is not None else {},
        name=unique_name(graph, f"{base}_DequantizeLinear"),
    )
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(q.shape)
    dq.meta["onnxq.scale"] = scale
    graph.append(dq)
    return dq


# Ops whose result depends on which input is largest: clipping their input (percentile/entropy) makes ties.
_DECIDING_OPS = frozenset({"Softmax", "LogSoftmax", "ArgMax", "ArgMin", "TopK"})


def _clipping_changes_decisions(value: ir.Value) -> bool:
    """Logits and model outputs keep their exact range whatever the calibration method."""
    return value.is_graph_output() or any(use.node.op_type in _DECIDING_OPS for use in value.uses())


def _reaches_quantized_op(value: ir.Value, depth: int = 8) -> bool:
    """Whether an annotated compute or own-scale op reads `value`, looking through data-movement ops."""
    for use in value.uses():
        spec = get_qspec(use.node)
        if spec is None or spec.skip or spec.activations.is_float or spec.activations.dynamic:
            continue
        if use.node.op_type in COMPUTE_OPS or use.node.op_type in OWN_SCALE_OPS:
            return True
        if (
            use.node.op_type in SHARED_SCALE_OPS
            and depth > 0
            and any(_reaches_quantized_op(out, depth - 1) for out in use.node.outputs)
        ):
            return True
    return False
