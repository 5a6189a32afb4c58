"""simplify: onnxsim constant folding and clean-up, with weights in `Constant` nodes made initializers.

PP-OCR and many older exports keep their weights in Constant nodes; a quantizer that does not lift them
quantizes weights as if they were activations. onnxsim is run without its BatchNorm fusion so that
`fold_batchnorm` stays the one place that does it, and without its batched MatMul+Add → Gemm fusion: on a
3-D activation (every transformer) that wraps each Gemm in Reshape/Shape/Slice/Concat, 60 extra nodes on
all-MiniLM-L6-v2, and onnxruntime, which fuses MatMul+Add itself, ran the result ~8% slower.

Exact GELU, 0.5·x·(1 + erf(x/√2)), comes out of torch as `x * (0.5 * (1 + erf))`, an order onnxruntime
does not fuse; as `(0.5 * x) * (1 + erf)` it becomes one Gelu, and with the bias Add in front one BiasGelu. The factors
are reordered (multiplying by 0.5 is exact, so the values are bit-identical): on all-MiniLM-L6-v2 five
nodes per layer and the up projection's bias Add become one kernel, float and quantized alike.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from pydantic import Field

from onnxq import ir as onnxq_ir
from onnxq.errors import OnnxqError
from onnxq.pass_base import Pass, PassConfig

from ._attention import fold_attention_biases
from ._graph import add_initializer, constant_array, is_constant, only_reader, replace_model, try_infer_shapes

# onnx-optimizer passes that make the graph slower on onnxruntime (see the module docstring).
SKIPPED_OPTIMIZERS = ("fuse_matmul_add_bias_into_gemm_batched",)


class SimplifyConfig(PassConfig):
    onnxsim: bool = Field(True, description="run onnxsim (constant folding, dead code, redundant ops)")
    lift_constants: bool = Field(True, description="turn tensor-valued Constant nodes into initializers")
    identities: bool = Field(
        True,
        description="readers of Identity(constant) read the constant: torch's legacy exporter reads weights it "
        "deduplicated through an Identity, which hides them from quantization",
    )
    strict: bool = Field(False, description="fail when onnxsim fails, instead of going on unsimplified")
    gelu_for_fusion: bool = Field(
        True, description="reorder exact-GELU factors so that onnxruntime fuses Gelu and its bias (bit-identical)"
    )
    conv_scale_fold: bool = Field(
        True,
        description="a constant Mul/Div after a Conv (a detector's stride, a per-channel scale) goes into its "
        "weight and bias (exact up to float rounding), so the Conv's quantized output covers the real range",
    )
    matmul_bias_to_gemm: bool = Field(
        True,
        description="a 2-D MatMul + bias Add becomes one Gemm (onnxruntime fuses the pair into a float Gemm "
        "that its QDQ path cannot make integer; as a Gemm it lowers to QGemm)",
    )
    attention_biases: bool = Field(
        True,
        description="drop attention's key bias (softmax ignores it) and move the value bias into the output "
        "projection's bias: exact, one Add fewer each",
    )
    spatial_mean_to_pool: bool = Field(
        True, description="ReduceMean over H, W of a 4-D tensor becomes GlobalAveragePool (an integer kernel exists)"
    )


class Simplify(Pass):
    """onnxsim constant folding and clean-up, with weights in `Constant` nodes made initializers."""

    name = "simplify"
    Config = SimplifyConfig
    after = ("upgrade_opset",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        simplified = self.config.onnxsim and self._onnxsim(model)
        modified |= simplified
        if not simplified and (
            self.config.spatial_mean_to_pool or self.config.attention_biases or self.config.matmul_bias_to_gemm
        ):
            _infer_shapes(model)  # onnxsim would have; these rewrites check ranks and head splits
        if self.config.spatial_mean_to_pool:
            modified |= _spatial_means_to_pools(model.graph) > 0
        if self.config.conv_scale_fold:
            folded = _conv_scales_folded(model.graph)
            if folded:
                self.context.notes.append(f"simplify: {folded} constant Mul/Div after a Conv folded into its weights")
                modified = True
        if self.config.matmul_bias_to_gemm:
            fused = _matmul_biases_to_gemms(model.graph)
            if fused:
                self.context.notes.append(f"simplify: {fused} 2-D MatMul + bias Add pairs became Gemm")
                modified = True
        if self.config.attention_biases:
            removed = fold_attention_biases(model.graph)
            if removed:
                self.context.notes.append(f"simplify: {removed} attention bias Adds folded away (exact)")
                modified = True
        if self.config.gelu_for_fusion:
            modified |= _gelus_in_fusable_order(model.graph) > 0
        if self.config.lift_constants:
            modified |= LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model).modified
            modified |= RemoveUnusedNodesPass()(model).modified
        if self.config.identities:
            modified |= _constant_identities_removed(model.graph) > 0
        return ir.passes.PassResult(model, modified=modified)

    def _onnxsim(self, model: ir.Model) -> bool:
        import onnxsim

        before = model.graph.num_nodes()
        try:
            proto = onnxq_ir.proto_with_weights(model, "onnxsim")
        except OnnxqError as exc:
            self.context.notes.append(f"simplify: onnxsim skipped ({exc.problem})")
            return False
        try:
            simplified, _ = onnxsim.simplify(
                proto,
                check_n=0,
                skip_fuse_bn=True,
                skipped_optimizers=list(SKIPPED_OPTIMIZERS),
            )
        except Exception as exc:  # onnxsim raises RuntimeError/ValueError/protobuf errors alike
            if self.config.strict:
                raise
            self.context.notes.append(f"simplify: onnxsim failed ({str(exc).splitlines()[0][:120]}); kept the graph")
            return False
        replace_model(model, onnxq_ir.from_proto(simplified))
        after = model.graph.num_nodes()
        if after != before:
            self.context.notes.append(f"simplify: {before} → {after} nodes")
        return True


def _constant_identities_removed(graph: ir.Graph) -> int:
    """Readers of Identity(constant) read the constant itself (main graph; the Identity's own output name
    goes with it unless it is a graph output, where the Identity stays)."""
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source is None or not is_constant(source) or out.is_graph_output():
            continue
        out.replace_all_uses_with(source)
        graph.remove(node, safe=True)
        removed += 1
    return removed


def _spatial_means_to_pools(graph: ir.Graph) -> int:
    """x.mean((2, 3)) as torch exports it is ReduceMean; onnxruntime quantizes GlobalAveragePool
    (QLinearGlobalAveragePool) but runs a quantized ReduceMean in float between a DQ and a Q."""
    rewritten = 0
    for node in list(graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if x.shape is None or x.shape.rank() != 4:
            continue
        axes_attr = node.attributes.get_ints("axes", None)
        axes = list(axes_attr) if axes_attr is not None else None
        if (
            axes is None
            and len(node.inputs) > 1
            and node.inputs[1] is not None
            and node.inputs[1].const_value is not None
        ):
            axes = [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        pool = ir.node("GlobalAveragePool", [x], name=f"{node.name}_pool")
        new_nodes = [pool]
        if not node.attributes.get_int("keepdims", 1):
            new_nodes.append(ir.node("Flatten", [pool.outputs[0]], attributes={"axis": 1}, name=f"{node.name}_flatten"))
            pool.outputs[0].name = f"{node.outputs[0].name}_pooled"
        new_nodes[-1].outputs[0].dtype = node.outputs[0].dtype
        new_nodes[-1].outputs[0].shape = node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, node.outputs, new_nodes[-1].outputs)
        rewritten += 1
    return rewritten


def _conv_scales_folded(graph: ir.Graph) -> int:
    """Conv(x, W, b) · s → Conv(x, W·s, b·s), and Conv / s → Conv(x, W/s, b/s), for a constant s that is a
    scalar or one value per output channel (s_c scales output channel c: Σ W_c·x + b_c times s_c). The Mul
    no longer stands between the Conv and its readers, so the Conv's quantized output has the real range
    (a detector's stride Mul before a box/score Concat) and one integer kernel does all of it."""
    folded = 0
    for conv in list(graph):
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.inputs) < 2:
            continue
        weight = constant_array(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        bias = constant_array(conv.inputs[2]) if has_bias else None
        if (
            weight is None
            or weight.dtype.kind != "f"
            or (has_bias and bias is None)
            or conv.outputs[0].is_graph_output()
        ):
            continue
        scaling = only_reader(conv.outputs[0])
        if scaling is None or scaling.op_type not in ("Mul", "Div") or scaling.domain not in ("", "ai.onnx"):
            continue
        if len(scaling.inputs) != 2 or (scaling.op_type == "Div" and scaling.inputs[0] is not conv.outputs[0]):
            continue
        other = scaling.inputs[1] if scaling.inputs[0] is conv.outputs[0] else scaling.inputs[0]
        factor = _per_output_channel(constant_array(other), weight)
        if factor is None or (scaling.op_type == "Div" and not np.all(factor != 0)):
            continue
        factor = 1 / factor if scaling.op_type == "Div" else factor
        base = conv.inputs[1].name or "conv_weight"
        shaped = factor.reshape(-1, *[1] * (weight.ndim - 1))
        inputs = [conv.inputs[0], add_initializer(graph, f"{base}_scaled", (weight * shaped).astype(weight.dtype))]
        if bias is not None:
            inputs.append(add_initializer(graph, f"{conv.inputs[2].name}_scaled", (bias * factor).astype(bias.dtype)))
        new = ir.node("Conv", inputs, attributes=dict(conv.attributes), name=conv.name)
        new.outputs[0].dtype, new.outputs[0].shape = scaling.outputs[0].dtype, scaling.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, conv, [conv, scaling], [new], scaling.outputs, new.outputs)
        folded += 1
    return folded


def _per_output_channel(scale: np.ndarray | None, weight: np.ndarray) -> np.ndarray | None:
    """`scale` as one factor per output channel of a Conv with `weight`, if it broadcasts only along the channel
    axis of the output [N, C, spatial…] (a scalar, [C], [C, 1, 1], [1, C, 1, 1]); None otherwise."""
    if scale is None or scale.dtype != weight.dtype or scale.ndim > weight.ndim:
        return None
    channels = weight.shape[0]
    if scale.size == 1:
        return np.full(channels, scale.reshape(-1)[0], dtype=weight.dtype)
    padded = (1,) * (weight.ndim - scale.ndim) + scale.shape
    if padded[1] != channels or any(d != 1 for i, d in enumerate(padded) if i != 1):
        return None
    return scale.reshape(-1)


def _matmul_biases_to_gemms(graph: ir.Graph) -> int:
    """MatMul(A [M, K], W [K, N]) + b [N] → Gemm(A, W, b). onnxruntime's MatMulAddFusion does the same at load
    time, after which DQ → Gemm with a float bias stays float (the weight dequantized on every run: 2.5× slower
    than fp32 on a 128×384×1536 product); lowered as a Gemm, the bias becomes int32 and the node QGemm."""
    fused = 0
    for matmul in list(graph):
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx") or len(matmul.inputs) != 2:
            continue
        a, w = matmul.inputs
        weight = constant_array(w)
        if a is None or a.shape is None or a.shape.rank() != 2 or weight is None or weight.ndim != 2:
            continue
        add = only_reader(matmul.outputs[0])
        if add is None or add.op_type != "Add" or len(add.inputs) != 2:
            continue
        bias_value = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
        bias = constant_array(bias_value)
        if bias is None or bias.dtype != weight.dtype or bias.size != weight.shape[1] or bias.shape[-1] != bias.size:
            continue
        if bias.ndim != 1:
            bias_value = add_initializer(graph, f"{bias_value.name}_flat", bias.reshape(-1))  # type: ignore[union-attr]
        gemm = ir.node("Gemm", [a, w, bias_value], name=matmul.name)
        gemm.outputs[0].dtype = add.outputs[0].dtype
        gemm.outputs[0].shape = add.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, matmul, [matmul, add], [gemm], add.outputs, gemm.outputs)
        fused += 1
    return fused


def _gelus_in_fusable_order(graph: ir.Graph) -> int:
    """Rewrite x·(0.5·E), E = 1 + erf(x/√2), as (x·0.5)·E: onnxruntime's GeluFusion matches that order and
    (x·E)·0.5, not torch's. Only single-use intermediates are touched, so no other reader sees a change."""
    rewritten = 0
    for erf in list(graph):
        if erf.op_type != "Erf" or erf.domain not in ("", "ai.onnx") or erf.inputs[0] is None:
            continue
        div = erf.inputs[0].producer()
        if div is None or div.op_type != "Div" or not _is_scalar(div.inputs[1], np.sqrt(2.0)):
            continue
        x = div.inputs[0]
        add = only_reader(erf.outputs[0])
        if add is None or add.op_type != "Add" or not any(_is_scalar(v, 1.0) for v in add.inputs):
            continue
        half_e = only_reader(add.outputs[0])  # 0.5 · E
        if half_e is None or half_e.op_type != "Mul":
            continue
        half = _other_input(half_e, add.outputs[0])
        gelu = only_reader(half_e.outputs[0])  # x · (0.5 · E)
        if not _is_scalar(half, 0.5) or gelu is None or gelu.op_type != "Mul":
            continue
        if _other_input(gelu, half_e.outputs[0]) is not x:
            continue
        half_e.replace_input_with(0, x)  # now x · 0.5
        half_e.replace_input_with(1, half)
        gelu.replace_input_with(0, half_e.outputs[0])  # now (x · 0.5) · E
        gelu.replace_input_with(1, add.outputs[0])
        rewritten += 1
    return rewritten


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    others = [v for v in node.inputs if v is not value]
    return others[0] if len(node.inputs) == 2 and len(others) == 1 else None


def _is_scalar(value: ir.Value | None, expected: float) -> bool:
    array = constant_array(value)
    return array is not None and array.size == 1 and np.isclose(float(array.reshape(-1)[0]), expected, rtol=1e-6)


def _infer_shapes(model: ir.Model) -> None:
    try_infer_shapes(model)  # an unknown op or a 2 GB model: the rewrite is skipped, nothing breaks
