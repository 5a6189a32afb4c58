"""Where accuracy went: per-node error localization, the what-if that keeps culprits in float, and the
execution-provider realization check.

Localization runs the float and the quantized model on the same data with every float tensor of the
float graph exposed as an output, and compares each tensor with its namesake in the quantized graph (the
passes keep the names of the tensors they quantize; Q/DQ nodes get new ones). A tensor's quality is its
worst slice along `slice_axis` (per channel by default), so a collapsed channel is not averaged away. A
node's drop is the quality of its worst data input minus that of its output: the rounding of an input
shows up at the node that reads it, so a Concat whose inputs share one scale is blamed for the slice that
scale crushed, and a Conv for its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.calibration.readers import Feeds, InputSpec, rebatch, sample_count
from onnxq.validate import PROVIDERS, OutputMetrics, _Accumulator

# Kernels that compute on integers (what the realization check counts as "really quantized").
INTEGER_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "MatMulInteger",
        "ConvInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "MatMulNBits",
        "GatherBlockQuantized",
        "QLinearAdd",
        "QLinearMul",
        "QLinearConcat",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearSoftmax",
        "QLinearReduceMean",
        "QLinearWhere",
    }
)
EXACT_DB = 60.0  # quality of an exact tensor (graph inputs, float paths); caps drops at this
UNMATCHED_DB = -10.0  # a whole-tensor SQNR below this means the namesake is another quantity
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul"})


@dataclass
class NodeError:
    name: str
    op_type: str
    sqnr_db: float  # worst slice of the node's output, quantized vs float
    input_sqnr_db: float  # worst slice of its worst data input
    drop_db: float
    quantized: bool = True  # reads or writes rounded values in the quantized graph (what keep_float changes)


@dataclass
class Localization:
    provider: str
    samples: int
    nodes: list[NodeError]  # by decreasing drop
    tensors: dict[str, OutputMetrics] = field(default_factory=dict)
    whatif: dict[str, Any] | None = None

    def top(self, k: int) -> list[str]:
        """The k worst nodes that the quantization touched (a float op's error is inherited, not made)."""
        return [n.name for n in self.nodes if n.quantized][:k]

    def to_json(self) -> dict[str, Any]:
        from onnxq.validate import _json_safe

        return _json_safe(
            {
                "provider": self.provider,
                "samples": self.samples,
                "metric": "worst-slice SQNR drop (dB)",
                "nodes": [vars(n) for n in self.nodes],
                "whatif": self.whatif,
            }
        )


def _proto(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def _float_tensors(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Float node outputs of the top graph, by name, with their producer."""
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    return {
        out: node
        for node in proto.graph.node
        for out in node.output
        if out and types.get(out, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
    }


def _exposed(proto: onnx.ModelProto, names: Iterable[str]) -> bytes:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    present = {o.name for o in clone.graph.output}
    for name in names:
        if name not in present:
            clone.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return clone.SerializeToString()


def _session(model: bytes, provider: str, external_data_dir: Path | None = None):  # type: ignore[no-untyped-def]
    from onnxq.ort_session import session

    return session(model, [PROVIDERS[provider]], external_data_dir=external_data_dir)


def localize(
    float_model: onnx.ModelProto | str | Path,
    quant_model: onnx.ModelProto | str | Path,
    data: Callable[[], Iterator[Feeds]],
    specs: list[InputSpec],
    *,
    provider: str = "cpu",
    slice_axis: int | None = 1,
    batch_size: int = 1,
    reference_dir: Path | None = None,
    show_progress: bool = False,
) -> Localization:
    """Rank the float graph's nodes by how much quality their output loses in the quantized model.
    `reference_dir`: where the float model's external data files are, when it is given as a proto."""
    reference, quantized = _proto(float_model), _proto(quant_model)
    float_tensors = _float_tensors(reference)
    quant_outputs = {out for node in quantized.graph.node for out in node.output}
    names = [n for n in float_tensors if n in quant_outputs]
    ref_session = _session(_exposed(reference, names), provider, reference_dir)
    test_session = _session(_exposed(quantized, names), provider)
    feed_names = {s.name for s in specs}
    accs = {n: _Accumulator(slice_axis=slice_axis) for n in names}
    samples = 0
    from onnxq.progress import progress

    with progress(show_progress, "localizing the error", getattr(data, "num_samples", None)) as advance:
        for batch in rebatch(data(), specs, batch_size):
            feeds = {k: v for k, v in batch.items() if k in feed_names}
            outputs = zip(names, ref_session.run(names, feeds), test_session.run(names, feeds), strict=True)
            for name, ref, test in outputs:
                if ref.shape == test.shape:
                    accs[name].update(np.asarray(ref), np.asarray(test))
            count = sample_count(feeds, specs)
            samples += count
            advance(count)
    tensors = {n: OutputMetrics.from_acc(n, acc) for n, acc in accs.items() if acc.count}
    # A namesake that is a different quantity (a pass folded a Mul into the Conv that produced it) shows
    # as a hugely negative SQNR: such a pair is not a match, not an error. Exact values count as 60 dB.
    quality = {
        n: min(m.slices.worst_sqnr_db if m.slices is not None else m.sqnr_db, EXACT_DB)
        for n, m in tensors.items()
        if m.sqnr_db > UNMATCHED_DB
    }
    rounded = _rounding_nodes(quantized)
    nodes = []
    for node in reference.graph.node:
        outputs = [quality[o] for o in node.output if o in quality]
        if not outputs:
            continue
        inputs = [quality.get(i, EXACT_DB) for i in node.input if i and i in float_tensors]
        out_q, in_q = min(outputs), min(inputs, default=EXACT_DB)
        name = node.name or node.output[0]
        touched = name in rounded or any(f"output:{o}" in rounded for o in node.output)
        nodes.append(NodeError(name, node.op_type, out_q, in_q, in_q - out_q, touched))
    nodes.sort(key=lambda n: n.drop_db, reverse=True)
    return Localization(provider, samples, nodes, tensors)


def _rounding_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of nodes fed by a DequantizeLinear or feeding a QuantizeLinear, and integer kernels."""
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for value in node.input:
            readers.setdefault(value, set()).add(node.op_type)
    found = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = any(producers.get(v) == "DequantizeLinear" for v in node.input)
        feeds = any("QuantizeLinear" in readers.get(v, ()) for v in node.output)
        if fed or feeds or node.op_type in INTEGER_KERNELS:
            found.add(node.name or node.output[0])
            found.update(f"output:{o}" for o in node.output)  # a node renamed by a lowering keeps its outputs
    return found


def keep_float(quant_model: onnx.ModelProto, node_names: Iterable[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a QDQ model where the named nodes run in float: they read activations from before their
    QuantizeLinear and weights dequantized into float initializers, and what they produce is no longer
    rounded (Q → DQ pairs on their outputs are bypassed). Returns the copy and the names it could not
    change (nodes that are not in QDQ form, e.g. MatMulNBits)."""
    model = onnx.ModelProto()
    model.CopyFrom(quant_model)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    wanted = set(node_names)
    by_name = {node.name or node.output[0]: node for node in graph.node}
    unchanged = []
    for name in wanted:
        node = by_name.get(name)
        if node is None:
            unchanged.append(name)
            continue
        changed = False
        for index, value in enumerate(node.input):
            dq = producers.get(value)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = producers.get(dq.input[0])
            if source is not None and source.op_type == "QuantizeLinear":
                node.input[index] = source.input[0]
                changed = True
            elif dq.input[0] in inits:
                weight = _dequantized(dq, inits)
                if weight is not None:
                    float_name = f"{dq.input[0]}_float_{name}"
                    graph.initializer.append(numpy_helper.from_array(weight, float_name))
                    node.input[index] = float_name
                    changed = True
        changed |= _bypass_output_rounding(graph, node)
        if not changed:
            unchanged.append(name)
    return model, unchanged


def _bypass_output_rounding(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """Readers of Q(out) → DQ read `out` itself; a graph output produced by such a DQ takes `out`'s values."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for other in graph.node:
        for value in other.input:
            consumers.setdefault(value, []).append(other)
    changed = False
    for out in node.output:
        for q in [c for c in consumers.get(out, []) if c.op_type == "QuantizeLinear"]:
            for dq in [c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"]:
                for reader in consumers.get(dq.output[0], []):
                    reader.input[:] = [out if v == dq.output[0] else v for v in reader.input]
                if any(o.name == dq.output[0] for o in graph.output):
                    identity = onnx.helper.make_node("Identity", [out], [dq.output[0]], name=f"{dq.name}_float")
                    graph.node.remove(dq)
                    graph.node.append(identity)
                changed = True
    return changed


def _dequantized(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    try:
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zero = (
            numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
        )
    except KeyError:
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
    if np.ndim(scale) == 0:
        return ((q - zero) * scale).astype(np.float32)
    axis = axis % q.ndim
    if block:
        scale = np.repeat(scale, block, axis=axis).take(range(q.shape[axis]), axis=axis)
        zero = np.repeat(zero, block, axis=axis).take(range(q.shape[axis]), axis=axis) if np.ndim(zero) else zero
        return ((q - zero) * scale).astype(np.float32)
    shape = [1] * q.ndim
    shape[axis] = -1
    zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return ((q - zero) * np.reshape(scale, shape)).astype(np.float32)


@dataclass
class Realization:
    provider: str
    integer_kernels: dict[str, int]
    float_compute: dict[str, int]
    fallbacks: list[dict[str, str]]

    def to_json(self) -> dict[str, Any]:
        return vars(self)


def realization(quant_model: onnx.ModelProto | str | Path, provider: str = "cpu") -> Realization:
    """Which quantized groups the provider runs on integer kernels, read from its optimized graph; a
    DequantizeLinear still feeding a float compute op there is a fallback (the weights or activations
    are dequantized at run time and the op runs in float)."""
    import tempfile

    import onnxruntime as ort

    from onnxq.ort_session import session

    proto = _proto(quant_model)
    with tempfile.TemporaryDirectory(prefix="onnxq-ep-") as folder:
        optimized_path = Path(folder) / "optimized.onnx"
        session(
            proto.SerializeToString(),
            [PROVIDERS[provider]],
            optimization=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            optimized_path=optimized_path,
        )
        optimized = onnx.load(optimized_path)
    integer: dict[str, int] = {}
    floats: dict[str, int] = {}
    producers = {out: node for node in optimized.graph.node for out in node.output}
    fallbacks = []
    for node in optimized.graph.node:
        if node.op_type in INTEGER_KERNELS:
            integer[node.op_type] = integer.get(node.op_type, 0) + 1
        elif node.op_type in FLOAT_COMPUTE:
            floats[node.op_type] = floats.get(node.op_type, 0) + 1
            fed = [producers[i] for i in node.input if i in producers and producers[i].op_type == "DequantizeLinear"]
            if fed:
                fallbacks.append({"node": node.name, "op_type": node.op_type, "reason": _reason(node, fed, producers)})
    return Realization(provider, integer, floats, fallbacks)


def _reason(node: onnx.NodeProto, dqs: list[onnx.NodeProto], producers: dict[str, onnx.NodeProto]) -> str:
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} for dq in dqs]
    if any(a.get("block_size") for a in attrs):
        return "blocked DequantizeLinear not fused into MatMulNBits (see passes/matmul_nbits.py for the patterns)"
    if len(dqs) < 2 and node.op_type in ("Conv", "MatMul", "Gemm"):
        return "only one input is quantized: the integer kernel needs both the activation and the weight"
    return f"no integer {node.op_type} kernel for this Q/DQ pattern on this provider"
