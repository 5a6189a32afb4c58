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
- Subgraphs (If branches, Loop and Scan bodies) stay float by default (`subgraphs: keep`): the main graph
  is lowered as if they were float readers. With `subgraphs: quantize` each nesting level is lowered
  after the one enclosing it, with one more calibration pass: a tensor made inside a subgraph is reduced
  in-graph and carried out through the If/Loop/Scan node's outputs (calibration/session.py), and an
  outer value that is already quantized is read through a DequantizeLinear copied into the subgraph,
  since onnxruntime fuses DQ → op → Q only within one graph. A subgraph with a tensor that never ran on
  the calibration data (a branch not taken) stays float.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

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
    node_subgraphs,
    share_names,
    subgraph_levels,
    subgraphs,
    unique_name,
    unique_subgraph_value_names,
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
    subgraphs: Literal["keep", "quantize"] = Field(
        "keep",
        description="ops inside If branches and Loop/Scan bodies: keep them float, or quantize them too "
        "(their tensors are calibrated through the enclosing node's outputs; a branch that never ran stays float)",
    )


@dataclass
class _Plan:
    """Activation values to quantize, grouped by shared scale, and which consumers read the DQ."""

    graph: ir.Graph | None = None
    spec: dict[str, QuantSpec] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)
    prequantized: set[str] = field(default_factory=set)  # outer activations read through a local DQ copy
    produced_quantized: set[str] = field(default_factory=set)
    readers: dict[str, set[int]] = field(default_factory=dict)  # value -> ids of quantized consumers
    weight_only: list[tuple[ir.Node, NodeQuant]] = field(default_factory=list)  # input already Q/DQ'd
    bias_only: list[ir.Node] = field(default_factory=list)  # input and weight already Q/DQ'd
    activation_only: list[ir.Node] = field(default_factory=list)  # weight already Q/DQ'd, the input float

    def add(self, value: ir.Value, spec: QuantSpec) -> None:
        if value.name in self.prequantized or _feeds_quantize(value, self.graph):
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


def _reads_dequantized(node: ir.Node, local_copies: set[str] = frozenset()) -> bool:  # type: ignore[assignment]
    return any(
        v is not None
        and v.name not in local_copies
        and (p := v.producer()) is not None
        and p.op_type == "DequantizeLinear"
        for v in node.inputs
    )


def _weight_quantized_before(node: ir.Node) -> bool:
    """A compute op whose weight is an integer constant read through DequantizeLinear (a model quantized
    weight-only, or by another tool) while its input is still a float activation."""
    inputs = list(node.inputs)
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None or not _is_float(inputs[0]):
        return False
    weight, source = inputs[1].producer(), inputs[0].producer()
    if (source is not None and source.op_type == "DequantizeLinear") or is_constant(inputs[0]):
        return False
    return weight is not None and weight.op_type == "DequantizeLinear" and is_constant(weight.inputs[0])


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


def _feeds_quantize(value: ir.Value, graph: ir.Graph | None = None) -> bool:
    """Whether a QuantizeLinear (in `graph`, when given) reads the value."""
    return any(
        use.node.op_type == "QuantizeLinear" and (graph is None or use.node.graph is graph) for use in value.uses()
    )


def _is_output_of(value: ir.Value) -> bool:
    """Whether the value is an output of the graph that defines it (not merely of a subgraph that returns
    an outer value as its own output)."""
    graph = value.graph
    return value.is_graph_output() and graph is not None and any(v is value for v in graph.outputs)


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
    """Lower QuantSpec annotations to QuantizeLinear/DequantizeLinear pairs (the QDQ format)."""

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
        inner = list(subgraphs(graph))
        if inner and self.config.subgraphs == "quantize":
            unique_subgraph_value_names(graph)  # a tensor's name is its key in the calibration statistics
        share_names(graph)
        self._qparams: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}  # every level's activations
        modified = self._lower_main(model, opset)
        if inner and self.config.subgraphs == "quantize":
            for level in subgraph_levels(graph):
                modified |= self._lower_subgraphs(model, level, opset)
        elif inner:
            kept = sum(
                _lowerable(get_qspec(n)) and n.op_type in COMPUTE_OPS | OWN_SCALE_OPS and n.domain in ("", "ai.onnx")
                for g in inner
                for n in g
            )
            if kept:
                self.context.notes.append(
                    f"insert_qdq: {_count(kept, 'annotated op')} inside {_count(len(inner), 'subgraph')} "
                    "(If/Loop/Scan) kept in float (subgraphs: keep)"
                )
        if modified:
            graph.sort()
        forget_names(graph)
        return ir.passes.PassResult(model, modified=modified)

    def _lower_main(self, model: ir.Model, opset: int) -> bool:
        graph = model.graph
        unreachable, blockers = _after_unrunnable_ops(model)
        plan, compute_nodes = self._plan(graph, unreachable=unreachable)
        if blockers:
            kept = sum(1 for n in graph if _lowerable(get_qspec(n)) and any(id(v) in unreachable for v in n.inputs))
            self.context.notes.append(
                f"insert_qdq: {_count(kept, 'annotated op')} after {', '.join(blockers)} kept in float "
                "(onnxruntime cannot run that op, so calibration data cannot reach them)"
            )
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
                return True
            self.context.notes.append(
                "insert_qdq: nothing left to quantize (annotated ops already in QDQ form, or in float16: put "
                "`upcast_fp16: {}` first in the recipe, as the built-in recipes do)"
            )
            return False
        self._check_opset(opset, plan, compute_nodes)
        values = _values_named(graph, plan.spec)
        ranges = self._ranges(model, plan.spec, values)
        missing = [n for n in plan.spec if n not in ranges]
        if missing:
            raise OnnxqError(
                f"no calibration range for '{missing[0]}' ({len(missing)} in all)",
                "check that the calibration data reaches every quantized op",
            )
        qparams = self._group_qparams(plan, ranges)
        self._qparams.update(qparams)
        self._insert_activation_qdq(graph, plan, qparams, values)
        for node, spec in compute_nodes:
            self._quantize_weight_and_bias(graph, node, spec, qparams, weight_cache)
        if plan.activation_only:
            biases = sum(_quantize_bias_behind_qdq(graph, node) for node in plan.activation_only)
            self.context.notes.append(
                f"insert_qdq: {_count(len(plan.activation_only), 'op')} with weights quantized before got their "
                "activations quantized (integer kernels need both)"
                + (f"; {biases} float biases stored as int32 at s_x·s_w" if biases else "")
            )
        self.context.notes.append(
            f"insert_qdq: {len(plan.spec)} activations in {len({plan.find(n) for n in plan.spec})} scale groups, "
            f"{len(weight_cache)} weights, {len(compute_nodes)} compute ops"
        )
        return True

    def _lower_subgraphs(self, model: ir.Model, level: list[ir.Graph], opset: int) -> bool:
        """Lower every subgraph of one nesting level with one calibration pass; a subgraph that cannot be
        calibrated whole (a branch the data never took) is put back as it was and stays float."""
        planned = []
        for graph in level:
            copies = _copy_outer_dequantize(graph)
            plan, compute = self._plan(graph, set(copies))
            if not plan.spec and not compute:
                _undo_copies(graph, copies)
                continue
            self._check_opset(opset, plan, compute)
            planned.append((graph, plan, compute, copies, _values_named(graph, plan.spec)))
        if not planned:
            return False
        wanted = {n: v for *_, values in planned for n, v in values.items()}
        ranges = self._ranges(model, list(wanted), wanted)
        activations = weights = ops = 0
        kept: list[str] = []
        for graph, plan, compute, copies, values in planned:
            bad = [n for n in plan.spec if n not in ranges or not _finite(ranges[n])]
            if bad:
                _undo_copies(graph, copies)
                kept.append(bad[0])
                continue
            qparams = self._group_qparams(plan, ranges)
            self._qparams.update(qparams)
            self._insert_activation_qdq(graph, plan, qparams, values)
            cache: dict[tuple[str, QuantSpec, int | None], ir.Value] = {}
            for node, spec in compute:
                self._quantize_weight_and_bias(graph, node, spec, self._qparams, cache)
            activations, weights, ops = activations + len(plan.spec), weights + len(cache), ops + len(compute)
        done = len(planned) - len(kept)
        if done:
            self.context.notes.append(
                f"insert_qdq: {_count(done, 'subgraph')} quantized: {activations} activations, {weights} weights, "
                f"{ops} compute ops"
            )
        if kept:
            self.context.notes.append(
                f"insert_qdq: {_count(len(kept), 'subgraph')} kept in float: no calibration range for '{kept[0]}' "
                "(a branch the calibration data never took, or a body onnxruntime cannot run)"
            )
        return done > 0

    # --- planning ---------------------------------------------------------------------------------------

    def _plan(
        self,
        graph: ir.Graph,
        local_copies: set[str] = frozenset(),  # type: ignore[assignment]
        unreachable: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> tuple[_Plan, list[tuple[ir.Node, NodeQuant]]]:
        plan = _Plan(graph=graph, prequantized=set(local_copies))
        compute: list[tuple[ir.Node, NodeQuant]] = []
        for node in graph:  # topological: a shared-scale op sees its producer's decision
            spec = get_qspec(node)
            if spec is None or not _lowerable(spec):
                continue  # float, or lowered at run time by quantize_dynamic
            if node.domain not in ("", "ai.onnx") or any(id(v) in unreachable for v in node.inputs):
                continue  # a custom op, or after one that calibration cannot run
            if _reads_dequantized(node, plan.prequantized):
                if node.op_type in COMPUTE_OPS and not spec.activations.is_float and _weight_quantized_before(node):
                    self._plan_activations(node, spec.activations, [node.inputs[0]], plan)  # type: ignore[list-item]
                    plan.activation_only.append(node)  # as onnxruntime does: the integer kernel needs both
                    continue
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
        self._plan_activations(node, act, [inputs[0]] if weight_is_const else inputs[:2], plan)  # type: ignore[list-item]
        return True

    def _plan_activations(self, node: ir.Node, act: QuantSpec, activations: list[ir.Value], plan: _Plan) -> None:
        """Q/DQ on a compute op's activation inputs and, unless its float output is free, on its output."""
        for value in activations:
            plan.add(value, act)
            plan.read_by(value, node)
        out = self._group_output(node)
        if node.op_type in self.config.float_output_ops and not _reaches_quantized_op(out):
            return  # integer kernel with a float output (QGemm, MatMulIntegerToFloat): no output error
        plan.add(out, act)
        plan.produced_quantized.add(out.name)

    def _plan_uncovered_output(self, node: ir.Node, act: QuantSpec, plan: _Plan) -> None:
        """An op whose inputs training rounded but whose output it did not (Conv → Relu → ReduceMean):
        without an output Q onnxruntime runs it in float, so its output is calibrated and rounded too."""
        out = self._group_output(node)
        if node.op_type in self.config.float_output_ops or _feeds_quantize(out, plan.graph) or _is_output_of(out):
            return
        if any(use.node.op_type in SHARED_SCALE_OPS for use in out.uses()):
            return  # fold_qat carries the next Q's scale back through data movement instead
        plan.add(out, act)
        plan.produced_quantized.add(out.name)

    def _group_output(self, node: ir.Node) -> ir.Value:
        """The value whose Q ends the group: the op's output, or that of a Relu/Clip fused after it."""
        out = node.outputs[0]
        if not self.config.fuse_activations or _is_output_of(out) or len(out.uses()) != 1:
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
        per_channel = sorted({s.granularity for s in plan.spec.values() if not s.is_float} - {"tensor"})
        if per_channel:
            raise OnnxqError(
                f"activations granularity {per_channel[0]} is not supported: onnxruntime's integer kernels take one "
                "scale per activation tensor",
                "use activations granularity: tensor (weights granularity: channel keeps per-channel ranges)",
            )
        blocked = [n.name for n, s in compute if s.weights.granularity == "block"]
        if blocked:
            raise OnnxqError(
                f"insert_qdq lowers per-tensor and per-channel weights; '{blocked[0]}' asks for blocks",
                "use granularity: channel for int8 QDQ",
            )

    # --- parameters -------------------------------------------------------------------------------------

    def _ranges(self, model: ir.Model, names: Iterable[str], values: dict[str, ir.Value]) -> dict[str, TensorRange]:
        """Ranges of constants from their values, of the rest from the calibration data (one pass)."""
        ranges: dict[str, TensorRange] = {}
        to_collect = []
        for name in names:
            array = constant_array(values.get(name))
            if array is not None:
                ranges[name] = TensorRange(float(array.min()), float(array.max()))
            else:
                to_collect.append(name)
        exact = [n for n in to_collect if n in values and _clipping_changes_decisions(values[n])]
        ranges.update(self.context.activation_ranges(model, to_collect, exact=exact))
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
        if produced_quantized and _is_output_of(value):
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _lowerable(spec: NodeQuant | None) -> bool:
    return spec is not None and not spec.skip and not spec.activations.is_float and not spec.activations.dynamic


def _finite(found: TensorRange) -> bool:
    return bool(np.isfinite(found.min) and np.isfinite(found.max))


def _after_unrunnable_ops(model: ir.Model) -> tuple[set[int], list[str]]:
    """Ids of the main-graph values computed from ops onnxruntime cannot run (a custom domain without its
    kernel library), which calibration therefore cannot measure, and labels of those ops."""
    from onnxq.calibration.session import onnxruntime_has_op

    functions = {(domain, name) for domain, name, _ in model.functions}

    def runnable(node: ir.Node) -> bool:
        return (node.domain, node.op_type) in functions or onnxruntime_has_op(node.domain, node.op_type)

    lost: set[int] = set()
    blockers: dict[str, int] = {}
    for node in model.graph:
        inner = [n for sub in node_subgraphs(node) for n in ir.traversal.RecursiveGraphIterator(sub)]
        bad = [n for n in (node, *inner) if not runnable(n)]
        reads = [v for n in (node, *inner) for v in n.inputs if v is not None]
        if bad or any(id(v) in lost for v in reads):
            lost.update(id(v) for v in node.outputs)
        for n in bad:
            label = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
            blockers[label] = blockers.get(label, 0) + 1
    return lost, [f"{label}×{count}" for label, count in blockers.items()]


def _values_named(graph: ir.Graph, names: Iterable[str]) -> dict[str, ir.Value]:
    """The graph's values by name, with the outer-scope values its nodes read (a subgraph reads those)."""
    wanted = set(names)
    found = {v.name: v for v in iter_values(graph) if v.name in wanted}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.name in wanted:
                found.setdefault(value.name, value)
    return found


def _outer_dequantize(value: ir.Value) -> ir.Node | None:
    """The DequantizeLinear of an activation Q → DQ pair in the enclosing graph that stands for `value`:
    its producer, or the DQ behind a QuantizeLinear that reads it."""
    producer = value.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        source = producer.inputs[0].producer() if producer.inputs[0] is not None else None
        return producer if source is not None and source.op_type == "QuantizeLinear" else None
    for use in value.uses():
        q = use.node
        if q.op_type != "QuantizeLinear" or q.graph is not value.graph or use.idx != 0:
            continue
        for q_use in q.outputs[0].uses():
            dq = q_use.node
            if dq.op_type == "DequantizeLinear" and dq.graph is q.graph and list(dq.inputs[1:]) == list(q.inputs[1:]):
                return dq
    return None


def _copy_outer_dequantize(graph: ir.Graph) -> dict[str, tuple[ir.Node, ir.Value]]:
    """Give this subgraph its own DequantizeLinear for each quantized outer activation that one of its
    annotated compute ops reads: onnxruntime fuses DQ → op → Q only when all of it is in one graph.
    Returns {copy's output name: (the copy, the outer value it replaces)}."""
    copies: dict[str, tuple[ir.Node, ir.Value]] = {}
    made: dict[int, ir.Value] = {}
    for node in list(graph):
        if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx") or not _lowerable(get_qspec(node)):
            continue
        for index, value in enumerate(node.inputs[:2]):
            if value is None or value.graph is graph or is_constant(value):
                continue
            local = made.get(id(value))
            if local is None:
                source = _outer_dequantize(value)
                if source is None:
                    continue
                copy = ir.node(
                    "DequantizeLinear",
                    list(source.inputs),
                    attributes={k: a.value for k, a in source.attributes.items()},
                    name=unique_name(graph, f"{value.name}_local_DequantizeLinear"),
                )
                local = copy.outputs[0]
                local.name = unique_name(graph, f"{value.name}_local")
                local.dtype, local.shape = ir.DataType.FLOAT, value.shape
                graph.insert_before(node, copy)
                made[id(value)] = local
                copies[local.name] = (copy, value)
            node.replace_input_with(index, local)
    return copies


def _undo_copies(graph: ir.Graph, copies: dict[str, tuple[ir.Node, ir.Value]]) -> None:
    for copy, outer in copies.values():
        copy.outputs[0].replace_all_uses_with(outer)
        graph.remove(copy, safe=True)


def _reaches_quantized_op(value: ir.Value, depth: int = 8) -> bool:
    """Whether an annotated compute or own-scale op of the same graph reads `value`, looking through
    data-movement ops (a subgraph quantizes what it reads itself, or keeps it float)."""
    for use in value.uses():
        if use.node.graph is not value.graph:
            continue
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
