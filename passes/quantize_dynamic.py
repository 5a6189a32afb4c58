"""quantize_dynamic: MatMul/Gemm with activations quantized at run time (no calibration data needed).

Lowered to the pattern onnxruntime fuses into its DynamicQuantizeMatMul kernel:

    x ─DynamicQuantizeLinear─▶ (x_q, s_x, z_x) ─MatMulInteger(W_q, z_x, z_w)─▶ Cast ─Mul(s_x·s_w)─▶ [Add b] ─▶ y

W_q is int8 per output column (MatMulInteger takes per-column zero points; the per-column scales ride in
the Mul), so the whole thing computes (x_q − z_x)(W_q − z_w)·s_x·s_w = x̂·Ŵ.
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
        lowered = 0
        for node in list(graph):
            spec = get_qspec(node)
            if spec is None or spec.skip or not spec.activations.dynamic or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in ("MatMul", "Gemm") and self._lower(graph, node, spec):
                lowered += 1
        if lowered:
            graph.sort()
            forget_names(graph)
            self.context.notes.append(f"quantize_dynamic: {lowered} MatMul/Gemm with run-time activation scales")
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
