"""fold_qat: keep what quantization-aware training learned, as fixed integer weights and Q/DQ pairs.

Models come out of training in three forms, all handled here:
- Q/DQ pairs (torch.onnx from FakeQuantize modules): a weight's QuantizeLinear on a float initializer
  becomes an integer initializer read by its DequantizeLinear, so nothing rounds weights at run time.
- Fake quantization decomposed into arithmetic (x / s → Round → + z → Clip → − z → · s, as exporters
  write it when they trace the math instead of the op) is recognised and restored to Q → DQ.
- A sidecar of learned scales (JSON: {"tensors": {name: {scale, zero_point, bits, signed, axis}}}), the
  usual result of learned-step-size training whose fake-quant ops do not export: weights are quantized
  with the learned parameters and activations get Q → DQ with them.
Back-to-back DQ → Q with equal parameters is removed. Everything in QDQ form afterwards is left alone by
insert_qdq, so a recipe quantizes only what training did not cover, and running this pass again changes
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq import qmath
from onnxq.errors import UsageError
from onnxq.pass_base import Pass, PassConfig
from onnxq.qspec import SHARED_SCALE_OPS

from ._graph import add_initializer, constant_array, default_opset, forget_names, unique_name

STORAGE = {  # (bits, signed) -> onnxq dtype name
    (8, True): "int8",
    (8, False): "uint8",
    (4, True): "int4",
    (4, False): "uint4",
    (16, True): "int16",
    (16, False): "uint16",
}
RANGE_TYPES = {(0, 255): "uint8", (-128, 127): "int8", (-127, 127): "int8", (0, 15): "uint4", (-8, 7): "int4"}
RANGE_TYPES |= {(-7, 7): "int4"}


# Ops whose outputs are some of their input values (monotone selection): rounding before or after them
# gives the same result, so a scale can move across them exactly.
SELECTION_OPS = frozenset({"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Slice"})


class FoldQATConfig(PassConfig):
    sidecar: str | None = Field(None, description="learned scales (JSON): tensor name → scale, zero_point, bits, axis")
    decomposed: bool = Field(True, description="restore fake quantization written as Div/Round/Clip/Mul to Q/DQ")


class FoldQAT(Pass):
    """Keep what quantization-aware training learned, as fixed integer weights and Q/DQ pairs."""

    name = "fold_qat"
    Config = FoldQATConfig
    after = ("upgrade_opset",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts = {"restored": 0, "sidecar": 0, "weights": 0, "pairs": 0, "propagated": 0}
        if self.config.decomposed:
            counts["restored"] = self._restore_decomposed(graph)
        if self.config.sidecar:
            counts["sidecar"] = self._apply_sidecar(model, _load_sidecar(self.config.sidecar))
        counts["weights"] = self._fold_weight_quantize(graph)
        counts["pairs"] += self._drop_noop_clips(graph)
        counts["pairs"] += self._drop_equal_pairs(graph)
        counts["propagated"] = self._propagate_scales_upstream(graph)
        changed = sum(counts.values())
        if changed:
            graph.sort()
            forget_names(graph)
            self.context.notes.append(
                "fold_qat: "
                + ", ".join(
                    f"{n} {what}"
                    for what, n in [
                        ("fake-quant chains restored to Q/DQ", counts["restored"]),
                        ("tensors from the sidecar", counts["sidecar"]),
                        ("weights stored as integers", counts["weights"]),
                        ("redundant DQ→Q pairs removed", counts["pairs"]),
                        ("scales carried back through data movement", counts["propagated"]),
                    ]
                    if n
                )
            )
        elif not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph):
            self.context.notes.append(
                "fold_qat: no QAT scales found (no Q/DQ pairs, no fake-quant arithmetic"
                + ("" if self.config.sidecar else ", no sidecar")
                + "): everything is calibrated as in the int8 recipe"
            )
        return ir.passes.PassResult(model, modified=changed > 0)

    # --- weights: Q(float constant) → integer constant -------------------------------------------------

    def _fold_weight_quantize(self, graph: ir.Graph) -> int:
        folded = 0
        for node in list(graph):
            if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx"):
                continue
            weight = constant_array(node.inputs[0])
            scale = _const(node.inputs[1]) if len(node.inputs) > 1 else None
            zero_value = node.inputs[2] if len(node.inputs) > 2 else None
            zero = _const(zero_value) if zero_value is not None else None
            if weight is None or scale is None or (zero_value is not None and zero is None):
                continue
            if node.attributes.get_int("block_size", 0) or node.outputs[0].is_graph_output():
                continue
            dtype = _dtype_of(zero_value, node)
            if dtype is None:
                continue
            axis = node.attributes.get_int("axis", 1) if np.ndim(scale) == 1 and scale.size > 1 else None
            zero_array = np.zeros_like(scale, dtype=np.int64) if zero is None else zero
            q = qmath.quantize(weight, scale, zero_array, dtype, None if axis is None else axis % weight.ndim)
            source = node.inputs[0]
            clip = _clip_after(node)
            result = node.outputs[0]
            if clip is not None:  # Q → Clip(lo, hi): the narrow range training used (-127..127, -7..7)
                q = np.clip(q, clip[1], clip[2]).astype(q.dtype)
                result = clip[0].outputs[0]
            value = add_initializer(graph, f"{source.name}_qat", _as_storage(q, dtype))
            ir.convenience.replace_all_uses_with(result, value)
            if clip is not None:
                graph.remove(clip[0], safe=True)
            graph.remove(node, safe=True)
            _drop_if_unused(graph, source)
            folded += 1
        return folded

    def _drop_noop_clips(self, graph: ir.Graph) -> int:
        """Q → Clip(full range of the type) → DQ: the Clip changes nothing and hides the pair from
        onnxruntime's QDQ fusions."""
        dropped = 0
        for node in list(graph):
            if node.op_type != "QuantizeLinear" or len(node.inputs) < 3 or node.inputs[2] is None:
                continue
            clip = _clip_after(node)
            dtype = _dtype_of(node.inputs[2], node)
            if clip is None or dtype is None or (clip[1], clip[2]) != tuple(map(float, qmath.RANGES[dtype])):
                continue
            ir.convenience.replace_all_uses_with(clip[0].outputs[0], node.outputs[0])
            graph.remove(clip[0], safe=True)
            dropped += 1
        return dropped

    def _propagate_scales_upstream(self, graph: ir.Graph) -> int:
        """Training often rounds only after a Concat/MaxPool/Reshape, so the Conv+Relu feeding it has no
        output Q and onnxruntime runs it in float (DQ → FusedConv). Rounding each input of such an op with
        the scale of the Q after it gives exactly the same values, and makes the producer an integer kernel."""
        added = 0
        for node in list(graph):
            if node.op_type not in SHARED_SCALE_OPS or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
                continue
            uses = list(node.outputs[0].uses())
            if len(uses) != 1 or uses[0].node.op_type != "QuantizeLinear":
                continue
            q = uses[0].node
            scale = _const(q.inputs[1])
            zero = _const(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else np.zeros((), np.uint8)
            if scale is None or zero is None or np.size(scale) != 1:
                continue
            data = list(node.inputs) if node.op_type == "Concat" else node.inputs[:1]
            for value in data:
                producer = value.producer() if value is not None else None
                if value is None or producer is None or producer.op_type == "QuantizeLinear":
                    continue
                if len(value.uses()) != 1:
                    continue
                if producer.op_type == "DequantizeLinear" and (
                    node.op_type not in SELECTION_OPS or _same_params(producer, q)
                ):
                    continue  # rounded already; a requantize is exact only in front of ops that select values
                dtype = {"uint8": "uint8", "int8": "int8"}.get(str(zero.dtype))
                if dtype is None:
                    continue
                _insert_pair(graph, value, scale.reshape(()), zero.reshape(()).astype(np.int64), dtype, None, [node])
                added += 1
        return added

    # --- DQ → Q with the same parameters: the pair is the identity on the integers ---------------------

    def _drop_equal_pairs(self, graph: ir.Graph) -> int:
        dropped = 0
        for q in list(graph):
            if q.op_type != "QuantizeLinear" or q.inputs[0] is None:
                continue
            dq = q.inputs[0].producer()
            if dq is None or dq.op_type != "DequantizeLinear" or not _same_params(dq, q):
                continue
            if q.outputs[0].is_graph_output():
                continue
            ir.convenience.replace_all_uses_with(q.outputs[0], dq.inputs[0])
            graph.remove(q, safe=True)
            if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                graph.remove(dq, safe=True)
            dropped += 1
        return dropped

    # --- Div → Round → [Add z] → Clip → [Sub z] → Mul: fake quantization traced as arithmetic ----------

    def _restore_decomposed(self, graph: ir.Graph) -> int:
        _undo_straight_through(graph)
        restored = 0
        for mul in list(graph):
            match = _match_fake_quant(mul)
            if match is None:
                continue
            x, scale, zero, dtype, chain = match
            if constant_array(x) is not None:  # a weight: store the codes training converged to, exactly
                self._store_weight_codes(graph, x, scale, zero, chain, mul)
                restored += 1
                continue
            axis = _channel_axis(scale)
            flat_scale = (
                scale.reshape(-1).astype(np.float32) if axis is not None else scale.reshape(()).astype(np.float32)
            )
            flat_zero = np.rint(zero.reshape(-1) if axis is not None else zero.reshape(())).astype(np.int64)
            flat_zero = np.broadcast_to(flat_zero, flat_scale.shape) if axis is not None else flat_zero
            _insert_pair(graph, x, flat_scale, flat_zero, dtype, axis, readers=None, replace=mul.outputs[0])
            for node in chain:
                if all(not v.uses() for v in node.outputs):
                    graph.remove(node, safe=True)
            restored += 1
        return restored

    def _store_weight_codes(
        self, graph: ir.Graph, x: ir.Value, scale: np.ndarray, zero: np.ndarray, chain: list[ir.Node], mul: ir.Node
    ) -> None:
        weight = constant_array(x)
        clip = next(n for n in chain if n.op_type == "Clip")
        low, high = float(_const(clip.inputs[1])), float(_const(clip.inputs[2]))  # type: ignore[arg-type]
        codes = np.clip(np.rint(weight / scale) + zero, low, high)
        dtype = "int8" if low < 0 else "uint8"
        axis = _channel_axis(scale)
        flat_scale = scale.reshape(-1) if axis is not None else scale.reshape(())
        flat_zero = np.rint(zero.reshape(-1) if axis is not None else zero.reshape(())).astype(np.int64)
        stored = add_initializer(graph, f"{x.name}_qat", _as_storage(codes.astype(np.int64), dtype))
        zeros = np.broadcast_to(flat_zero, flat_scale.shape)
        dq = _dequantize_node(graph, x.name, stored, flat_scale, zeros, dtype, axis)
        graph.append(dq)
        ir.convenience.replace_all_uses_with(mul.outputs[0], dq.outputs[0])
        for node in chain:
            if all(not v.uses() for v in node.outputs):
                graph.remove(node, safe=True)
        _drop_if_unused(graph, x)

    # --- sidecar ----------------------------------------------------------------------------------------

    def _apply_sidecar(self, model: ir.Model, tensors: dict[str, dict]) -> int:
        graph = model.graph
        values = {v.name: v for v in graph.initializers.values()}
        for node in graph:
            for out in node.outputs:
                values[out.name] = out
        for value in graph.inputs:
            values[value.name] = value
        missing = [name for name in tensors if name not in values]
        if missing:
            raise UsageError(
                f"the sidecar names tensor '{missing[0]}', which the model does not have"
                + (f" ({len(missing)} such names)" if len(missing) > 1 else ""),
                "export the sidecar from the same model (names must match the ONNX graph)",
            )
        applied = 0
        opset = default_opset(model)
        for name, entry in tensors.items():
            value = values[name]
            bits, signed = int(entry.get("bits", 8)), bool(entry.get("signed", False))
            dtype = STORAGE.get((bits, signed))
            if dtype is None:
                raise UsageError(f"sidecar '{name}': {bits}-bit values are not supported", "use 4, 8 or 16 bits")
            weight = constant_array(value) if value.const_value is not None else None
            if weight is not None and dtype in ("int4", "uint4"):
                # 4-bit codes kept in 8-bit storage: onnxruntime has no 4-bit Conv/Gemm kernel, and an
                # INT4 DequantizeLinear in front of one runs the op in float
                dtype = "int8" if signed else "uint8"
            if dtype in ("int4", "uint4", "int16", "uint16") and opset < 21:
                raise UsageError(
                    f"sidecar '{name}' is {bits}-bit, which Q/DQ expresses from opset 21 (the model has {opset})",
                    "put `upgrade_opset: {target: 21}` before fold_qat",
                )
            scale = np.asarray(entry["scale"], dtype=np.float32)
            zero = np.rint(np.asarray(entry.get("zero_point", 0), dtype=np.float64)).astype(np.int64)
            axis = entry.get("axis")
            if scale.size == 1:
                scale, axis = scale.reshape(()), None
                zero = zero.reshape(())
            else:
                zero = np.broadcast_to(zero.reshape(-1), scale.shape)
            if weight is not None:
                q = qmath.quantize(weight, scale, zero, dtype, None if axis is None else int(axis) % weight.ndim)
                low, high = qmath.RANGES[STORAGE[(bits, signed)]]  # 4-bit codes in 8-bit storage stay 4-bit
                low, high = entry.get("qmin", low), entry.get("qmax", high)  # and a narrow range (-127..127)
                q = np.clip(q, low, high).astype(q.dtype)
                stored = add_initializer(graph, f"{name}_qat", _as_storage(q, dtype))
                readers = [use.node for use in value.uses()]
                _insert_pair_on_constant(graph, value, stored, scale, zero, dtype, axis, readers)
                _drop_if_unused(graph, value)
            else:
                _insert_pair(graph, value, scale, zero, dtype, axis, readers=[use.node for use in value.uses()])
            applied += 1
        return applied


def _const(value: ir.Value | None) -> np.ndarray | None:
    """A constant, also when the exporter routed it through Identity nodes (TorchScript shares zero
    points that way)."""
    seen = 0
    while value is not None and seen < 8:
        array = constant_array(value)
        if array is not None:
            return array
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return None
        value, seen = producer.inputs[0], seen + 1
    return None


def _clip_after(node: ir.Node) -> tuple[ir.Node, float, float] | None:
    """The Clip(lo, hi) that is the only reader of a QuantizeLinear (narrow int8 / int4 stored as int8)."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Clip" or len(uses[0].node.inputs) < 3:
        return None
    clip = uses[0].node
    low, high = _const(clip.inputs[1]), _const(clip.inputs[2])
    if low is None or high is None:
        return None
    return clip, float(low), float(high)


def _drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """The float copy of a weight, once nothing reads it (a float weight left behind is a size bug)."""
    if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
        return
    if value.name in graph.initializers and graph.initializers[value.name] is value:
        graph.initializers.pop(value.name)


def _load_sidecar(path: str) -> dict[str, dict]:
    file = Path(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"no sidecar file {path}", "pass the JSON written next to the model by training") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})", "pass the sidecar JSON") from None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if not isinstance(tensors, dict):
        raise UsageError(f"{path} has no 'tensors' map", 'write {"tensors": {name: {"scale": …, "bits": 8}}}')
    return tensors


def _as_storage(q: np.ndarray, dtype: str) -> np.ndarray:
    import ml_dtypes

    if dtype == "int4":
        return q.astype(ml_dtypes.int4)
    if dtype == "uint4":
        return q.astype(ml_dtypes.uint4)
    return q.astype(qmath.NUMPY_STORAGE[dtype])


def _dtype_of(zero: ir.Value | None, node: ir.Node) -> str | None:
    if zero is None:
        return "uint8"
    names = {
        ir.DataType.UINT8: "uint8",
        ir.DataType.INT8: "int8",
        ir.DataType.INT4: "int4",
        ir.DataType.UINT4: "uint4",
        ir.DataType.INT16: "int16",
        ir.DataType.UINT16: "uint16",
    }
    if zero.dtype in names:
        return names[zero.dtype]
    array = _const(zero)  # an Identity output carries no type: ask the constant behind it
    by_numpy = {
        "int8": "int8",
        "uint8": "uint8",
        "int16": "int16",
        "uint16": "uint16",
        "int4": "int4",
        "uint4": "uint4",
    }
    return None if array is None else by_numpy.get(str(array.dtype))


def _same_params(dq: ir.Node, q: ir.Node) -> bool:
    def params(node: ir.Node) -> list[np.ndarray | None]:
        return [_const(v) for v in node.inputs[1:3]] + [None] * (3 - len(node.inputs))

    a, b = params(dq), params(q)
    if any(x is None for x in a[:1] + b[:1]):
        return False
    if dq.attributes.get_int("axis", 1) != q.attributes.get_int("axis", 1) and np.size(a[0]) > 1:
        return False
    same_scale = np.array_equal(np.ravel(a[0]), np.ravel(b[0]))  # a scale of shape [] and [1] is one scale
    zero_a = a[1] if a[1] is not None else np.zeros((), np.uint8)
    zero_b = b[1] if b[1] is not None else np.zeros((), np.uint8)
    return same_scale and np.array_equal(np.ravel(zero_a), np.ravel(zero_b)) and zero_a.dtype == zero_b.dtype


def _channel_axis(scale: np.ndarray) -> int | None:
    """A broadcast scale [1, C, 1, 1] or [C, 1, 1, 1] is per-channel along its non-1 axis."""
    if scale.size <= 1:
        return None
    axes = [i for i, d in enumerate(scale.shape) if d > 1]
    return axes[0] if len(axes) == 1 else None


def _scalar_or_broadcast(value: ir.Value | None) -> np.ndarray | None:
    array = constant_array(value)
    return None if array is None else np.asarray(array, dtype=np.float64)


def _undo_straight_through(graph: ir.Graph) -> None:
    """x + (Round(x) − x), the straight-through estimator written out, is Round(x) at inference."""
    for add in list(graph):
        if add.op_type != "Add" or len(add.inputs) != 2:
            continue
        for a, b in ((0, 1), (1, 0)):
            sub = add.inputs[b].producer() if add.inputs[b] is not None else None
            if sub is None or sub.op_type != "Sub" or sub.inputs[1] is not add.inputs[a]:
                continue
            rounded = sub.inputs[0].producer() if sub.inputs[0] is not None else None
            if rounded is None or rounded.op_type != "Round" or rounded.inputs[0] is not add.inputs[a]:
                continue
            ir.convenience.replace_all_uses_with(add.outputs[0], rounded.outputs[0])
            graph.remove(add, safe=True)
            if not sub.outputs[0].uses():
                graph.remove(sub, safe=True)
            break


def _match_fake_quant(mul: ir.Node) -> tuple[ir.Value, np.ndarray, np.ndarray, str, list[ir.Node]] | None:
    """Mul(Sub?(Clip(Add?(Round(Div(x, s)), z), lo, hi), z), s) → (x, s, z, dtype, nodes of the chain)."""
    if mul.op_type != "Mul" or len(mul.inputs) != 2:
        return None
    for index in (0, 1):
        scale = _scalar_or_broadcast(mul.inputs[1 - index])
        inner = mul.inputs[index].producer() if mul.inputs[index] is not None else None
        if scale is None or inner is None:
            continue
        chain = [mul]
        zero_after = np.zeros(())
        if inner.op_type == "Sub":
            zero_after = _scalar_or_broadcast(inner.inputs[1])
            chain.append(inner)
            inner = inner.inputs[0].producer() if zero_after is not None else None
        if inner is None or inner.op_type != "Clip" or len(inner.inputs) < 3:
            continue
        low, high = _scalar_or_broadcast(inner.inputs[1]), _scalar_or_broadcast(inner.inputs[2])
        chain.append(inner)
        inner = inner.inputs[0].producer()
        zero_before = np.zeros(())
        if inner is not None and inner.op_type == "Add":
            zero_before = _scalar_or_broadcast(inner.inputs[1])
            chain.append(inner)
            inner = inner.inputs[0].producer() if zero_before is not None else None
        if inner is None or inner.op_type != "Round":
            continue
        chain.append(inner)
        div = inner.inputs[0].producer()
        if div is None or div.op_type != "Div" or low is None or high is None or zero_before is None:
            continue
        if not np.allclose(
            _scalar_or_broadcast(div.inputs[1]) if constant_array(div.inputs[1]) is not None else np.nan, scale
        ):
            continue
        if zero_after is None or not np.array_equal(np.broadcast_to(zero_before, np.shape(zero_after)), zero_after):
            continue
        chain.append(div)
        # the integer range, with the zero point removed again by the Sub
        dtype = RANGE_TYPES.get((int(np.min(low)), int(np.max(high))))
        if dtype is None:
            continue
        return div.inputs[0], scale, np.broadcast_to(zero_before, scale.shape), dtype, chain  # type: ignore[return-value]
    return None


def _dequantize_node(
    graph: ir.Graph, base: str, source: ir.Value, scale: np.ndarray, zero: np.ndarray, dtype: str, axis: int | None
) -> ir.Node:
    """DequantizeLinear(source) with new scale/zero-point initializers named after `base` (not yet added)."""
    scale_value = add_initializer(graph, f"{base}_qat_scale", scale.astype(np.float32))
    zero_value = add_initializer(graph, f"{base}_qat_zero_point", _as_storage(zero, dtype))
    attributes = {"axis": int(axis)} if axis is not None else {}
    dq = ir.node(
        "DequantizeLinear",
        [source, scale_value, zero_value],
        attributes=attributes,
        name=unique_name(graph, f"{base}_DequantizeLinear"),
    )
    dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
    dq.outputs[0].dtype = ir.DataType.FLOAT
    return dq


def _read_through(value: ir.Value, replacement: ir.Value, readers: list[ir.Node], skip: ir.Node | None = None) -> None:
    for node in readers:
        if node is skip:
            continue
        for index, node_input in enumerate(node.inputs):
            if node_input is value:
                node.replace_input_with(index, replacement)


def _insert_pair(
    graph: ir.Graph,
    value: ir.Value,
    scale: np.ndarray,
    zero: np.ndarray,
    dtype: str,
    axis: int | None,
    readers: list[ir.Node] | None,
    replace: ir.Value | None = None,
) -> None:
    """value → Q → DQ; `readers` (or every reader of `replace`) read the DQ output."""
    dq = _dequantize_node(graph, value.name, value, scale, zero, dtype, axis)
    attributes = {"axis": int(axis)} if axis is not None else {}
    q = ir.node(
        "QuantizeLinear",
        [value, dq.inputs[1], dq.inputs[2]],
        attributes=attributes,
        name=unique_name(graph, f"{value.name}_QuantizeLinear"),
    )
    q.outputs[0].name = unique_name(graph, f"{value.name}_quantized")
    dq.replace_input_with(0, q.outputs[0])
    dq.outputs[0].shape = value.shape
    graph.extend([q, dq])
    if replace is not None:
        ir.convenience.replace_all_uses_with(replace, dq.outputs[0], replace_graph_outputs=True)
        if replace.is_graph_output():
            name = replace.name
            replace.name = unique_name(graph, f"{name}_fake_quantized")
            dq.outputs[0].name = name
        return
    _read_through(value, dq.outputs[0], readers or [], skip=q)


def _insert_pair_on_constant(
    graph: ir.Graph,
    value: ir.Value,
    stored: ir.Value,
    scale: np.ndarray,
    zero: np.ndarray,
    dtype: str,
    axis: int | None,
    readers: list[ir.Node],
) -> None:
    dq = _dequantize_node(graph, value.name, stored, scale, zero, dtype, axis)
    dq.outputs[0].shape = value.shape
    graph.append(dq)
    _read_through(value, dq.outputs[0], readers)
