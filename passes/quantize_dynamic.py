"""quantize_dynamic: MatMul/Gemm with activations quantized at run time (no calibration data needed).

Lowered to the pattern onnxruntime fuses into its DynamicQuantizeMatMul kernel:

    x ─DynamicQuantizeLinear─▶ (x_q, s_x, z_x) ─MatMulInteger(W_q, z_x, z_w)─▶ Cast ─Mul(s_x·s_w)─▶ [Add b] ─▶ y

W_q is int8 per output column (MatMulInteger takes per-column zero points; the per-column scales ride in
the Mul), so the whole thing computes (x_q − z_x)(W_q − z_w)·s_x·s_w = x̂·Ŵ.

An LSTM becomes onnxruntime's com.microsoft::DynamicQuantizeLSTM: its input and recurrent weights W [D, 4H, I]
and R [D, 4H, H] are stored int8, transposed to [D, I, 4H] / [D, H, 4H] as the kernel reads them, with one
symmetric scale per gate row (per channel) or per direction, and every time step quantizes x_t and h_t at run
time (Ŵx_t + R̂h_t + b). onnxruntime has no such kernel for GRU or RNN, so those stay float.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq import qmath
from onnxq.pass_base import Pass, PassConfig
from onnxq.qspec import get_qspec

from ._graph import add_initializer, constant_array, forget_names, unique_name


class QuantizeDynamic(Pass):
    """MatMul/Gemm with activations quantized at run time (no calibration data needed)."""

    name = "quantize_dynamic"
    Config = PassConfig
    after = ("assign_precision", "simplify", "upgrade_opset")
    lowers = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered = lstms = 0
        for node in list(graph):
            spec = get_qspec(node)
            if spec is None or spec.skip or not spec.activations.dynamic or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in ("MatMul", "Gemm") and self._lower(graph, node, spec):
                lowered += 1
            elif node.op_type == "LSTM" and _lower_lstm(graph, node, spec):
                lstms += 1
        if lowered or lstms:
            graph.sort()
            forget_names(graph)
        if lowered:
            self.context.notes.append(f"quantize_dynamic: {lowered} MatMul/Gemm with run-time activation scales")
        if lstms:
            self.context.notes.append(f"quantize_dynamic: {lstms} LSTM → DynamicQuantizeLSTM (int8 W and R)")
        lowered += lstms
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _lower(self, graph: ir.Graph, node: ir.Node, spec) -> bool:  # type: ignore[no-untyped-def]
        x = node.inputs[0]
        weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if x is None or weight is None or weight.ndim != 2 or x.dtype not in (None, ir.DataType.FLOAT):
            return False
        bias = None
        if node.op_type == "Gemm":
            attrs = node.attributes
            if (
                attrs.get_int("transA", 0)
                or attrs.get_float("alpha", 1.0) != 1.0
                or attrs.get_float("beta", 1.0) != 1.0
            ):
                return False
            if attrs.get_int("transB", 0):
                weight = weight.T
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                bias = constant_array(node.inputs[2])
                if bias is None or bias.ndim != 1:
                    return False
        wspec = spec.weights
        per_column = wspec.granularity == "channel"
        q, w_scale, w_zero = qmath.quantize_weight(
            weight.astype(np.float32), "int8", True, 1 if per_column else None, wspec.reduce_range
        )
        base = node.name or node.outputs[0].name
        w_q = add_initializer(graph, f"{base}_W_quantized", q)
        w_zp = add_initializer(graph, f"{base}_W_zero_point", w_zero if per_column else w_zero.reshape(()))
        w_s = add_initializer(graph, f"{base}_W_scale", w_scale if per_column else w_scale.reshape(()))

        def make(op: str, inputs: list[ir.Value], outputs: int = 1, **attributes: object) -> ir.Node:
            created = ir.node(
                op, inputs, attributes=attributes or None, num_outputs=outputs, name=unique_name(graph, f"{base}_{op}")
            )
            for i, value in enumerate(created.outputs):
                value.name = unique_name(graph, f"{base}_{op}_{i}")
            graph.append(created)
            return created

        dyn = make("DynamicQuantizeLinear", [x], outputs=3)
        x_q, x_s, x_z = dyn.outputs
        mm = make("MatMulInteger", [x_q, w_q, x_z, w_zp])
        cast = make("Cast", [mm.outputs[0]], to=ir.DataType.FLOAT)
        scale = make("Mul", [x_s, w_s])
        result = make("Mul", [cast.outputs[0], scale.outputs[0]])
        final = result.outputs[0]
        if bias is not None:
            b = add_initializer(graph, f"{base}_bias", bias.astype(np.float32))
            final = make("Add", [final, b]).outputs[0]
        out = node.outputs[0]
        name, was_output = out.name, out.is_graph_output()
        final.dtype, final.shape = ir.DataType.FLOAT, out.shape
        out.replace_all_uses_with(final, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if was_output:
            final.name = name
        return True


def _lower_lstm(graph: ir.Graph, node: ir.Node, spec) -> bool:  # type: ignore[no-untyped-def]
    """LSTM(X, W, R, …) → DynamicQuantizeLSTM(X, W_q, R_q, …, s_W, z_W, s_R, z_R), same outputs."""
    inputs = list(node.inputs)
    weights = [constant_array(v) if v is not None else None for v in inputs[1:3]]
    if len(inputs) < 3 or any(w is None or w.ndim != 3 for w in weights) or node.attributes.get_int("layout", 0):
        return False  # computed weights, or the batch-major layout the kernel does not take
    if inputs[0] is None or inputs[0].dtype not in (None, ir.DataType.FLOAT):
        return False
    wspec = spec.weights
    per_channel = wspec.granularity == "channel"
    base = node.name or node.outputs[0].name
    quantized: list[ir.Value] = []
    for tag, w in zip(("W", "R"), weights, strict=True):
        directions, rows, cols = w.shape  # type: ignore[union-attr]
        flat = w.reshape(directions * rows if per_channel else directions, -1).astype(np.float32)  # type: ignore[union-attr]
        q, scale, zero = qmath.quantize_weight(flat, "int8", True, 0, wspec.reduce_range)
        q = q.reshape(directions, rows, cols).transpose(0, 2, 1)
        shape = (directions, rows) if per_channel else (directions,)
        quantized += [
            add_initializer(graph, f"{base}_{tag}_quantized", np.ascontiguousarray(q)),
            add_initializer(graph, f"{base}_{tag}_scale", scale.reshape(shape).astype(np.float32)),
            add_initializer(graph, f"{base}_{tag}_zero_point", zero.reshape(shape).astype(np.int8)),
        ]
    w_q, w_s, w_z, r_q, r_s, r_z = quantized
    rest = (inputs[3:8] + [None] * 5)[:5]  # B, sequence_lens, initial_h, initial_c, P
    attributes = {k: v for k, v in node.attributes.items() if k != "layout"}
    lstm = ir.node(
        "DynamicQuantizeLSTM",
        [inputs[0], w_q, r_q, *rest, w_s, w_z, r_s, r_z],
        attributes=attributes,
        domain="com.microsoft",
        num_outputs=len(node.outputs),
        name=unique_name(graph, f"{base}_quant"),
    )
    graph.insert_after(node, lstm)
    for old, new in zip(node.outputs, lstm.outputs, strict=True):
        name, was_output = old.name, old.is_graph_output()
        new.dtype, new.shape = old.dtype, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        new.name = name if was_output else unique_name(graph, f"{base}_quant_{name}")
    graph.remove(node, safe=True)
    if "com.microsoft" not in graph.opset_imports:
        graph.opset_imports["com.microsoft"] = 1
    return True
