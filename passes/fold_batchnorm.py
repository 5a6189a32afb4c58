"""fold_batchnorm: fold inference BatchNormalization into the Conv/ConvTranspose before it.

For y = γ·(conv(x) − μ)/√(σ²+ε) + β, with f = γ/√(σ²+ε) per output channel:
W' = W·f (along the output-channel axis) and b' = (b − μ)·f + β. Quantizing W' per channel is what
integer kernels run, so folding must happen before weights are quantized.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxq.pass_base import Pass, PassConfig

from ._graph import add_initializer, constant_array, forget_names


class FoldBatchNorm(Pass):
    """Fold inference BatchNormalization into the Conv/ConvTranspose before it."""

    name = "fold_batchnorm"
    Config = PassConfig
    after = ("simplify",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        folded = 0
        for bn in list(graph):
            if bn.op_type == "BatchNormalization" and bn.domain in ("", "ai.onnx") and self._fold(graph, bn):
                folded += 1
        forget_names(graph)
        if folded:
            self.context.notes.append(f"fold_batchnorm: folded {folded} BatchNormalization nodes")
        return ir.passes.PassResult(model, modified=bool(folded))

    def _fold(self, graph: ir.Graph, bn: ir.Node) -> bool:
        if len([o for o in bn.outputs if o.uses() or o.is_graph_output()]) != 1 or bn.attributes.get_int(
            "training_mode", 0
        ):
            return False
        conv_out = bn.inputs[0]
        conv = conv_out.producer() if conv_out is not None else None
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
            return False
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            return False
        params = [constant_array(v) for v in bn.inputs[1:5]]
        weight = constant_array(conv.inputs[1])
        if weight is None or any(p is None for p in params):
            return False
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
        eps = bn.attributes.get_float("epsilon", 1e-5)
        factor = gamma / np.sqrt(var + eps)
        if conv.op_type == "ConvTranspose":
            if conv.attributes.get_int("group", 1) != 1:
                return False
            axis = 1
        else:
            axis = 0
        if weight.shape[axis] != factor.shape[0]:
            return False
        bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        bias64 = np.zeros_like(factor) if bias is None else bias.astype(np.float64)
        shape = [1] * weight.ndim
        shape[axis] = -1
        new_weight = (weight.astype(np.float64) * factor.reshape(shape)).astype(weight.dtype)
        new_bias = ((bias64 - mean) * factor + beta).astype(weight.dtype)
        base = conv.name or conv_out.name or "conv"
        conv.replace_input_with(1, add_initializer(graph, f"{base}.weight_bnfolded", new_weight))
        bias_value = add_initializer(graph, f"{base}.bias_bnfolded", new_bias)
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, bias_value)
        bn_out = bn.outputs[0]
        out_name, was_output = bn_out.name, bn_out.is_graph_output()
        bn_out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        if was_output:
            conv_out.name = out_name
        return True
