"""quantize_weights: weight-only block quantization of MatMul/Gemm (int4/uint4/int8/uint8, blocks of 16–256).

Lowered to the portable form onnxruntime fuses into its MatMulNBits kernel:

    W_q (int) ─DequantizeLinear(scale, [zero], axis=0, block_size)─▶ MatMul(x, ·) ─▶ y

Nodes are chosen by their annotation (weights granularity `block`). Gemm becomes MatMul (+ Add for the
bias) so that the same fusion applies; alpha and beta are folded into the constants. Embedding tables
(Gather on a constant [V, D]) are quantized in blocks along D and lowered to onnxruntime's
GatherBlockQuantized, which dequantizes only the rows it gathers: onnxruntime has no fusion for
DequantizeLinear → Gather, so the portable form would dequantize the whole table on every run. With
`double_quant`, the block scales are stored as uint8 and dequantized by a second DequantizeLinear (see
docs/weight_only.md for what onnxruntime does with that chain). Algorithms are in onnxq.blockquant; GPTQ
and AWQ read E[x xᵀ] of each weight's input, collected in onnxruntime in groups that fit `hessian_budget_mb`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq import blockquant
from onnxq.errors import UsageError
from onnxq.pass_base import Pass, PassConfig
from onnxq.qspec import QuantSpec, get_qspec

from ._graph import add_initializer, constant_array, default_opset, forget_names, is_constant, unique_name
from ._scaling import divide_activation

PACKED_TYPES = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8}


class QuantizeWeightsConfig(PassConfig):
    algorithm: Literal["rtn", "gptq"] = Field("gptq", description="rtn: round to nearest; gptq: error compensation")
    awq: bool = Field(False, description="AWQ-style per-input-channel scaling search before quantizing")
    awq_grid: int = Field(20, ge=1, le=100, description="α steps searched in [0, 1]")
    awq_insert_mul: bool = Field(
        True, description="scale activations with a Mul where 1/s cannot fold into a LayerNormalization"
    )
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ damping, as a fraction of the mean Hessian diagonal")
    act_order: bool = Field(False, description="GPTQ: visit input channels by decreasing Hessian diagonal")
    double_quant: bool = Field(False, description="store block scales as uint8 with a float scale per super-block")
    super_block: int = Field(256, ge=2, description="scales per second-level scale (double_quant)")
    hessian_budget_mb: float = Field(1024.0, gt=0, description="memory for the Hessians collected in one pass")


@dataclass
class _Target:
    """One weight to quantize: the (Mat)Mul node, its weight [K, N] and what reads the same activation."""

    node: ir.Node
    weight: np.ndarray
    spec: QuantSpec
    bias: np.ndarray | None = None  # from a Gemm
    readers: list[ir.Node] = field(default_factory=list)
    source: ir.Value | None = None  # the float weight initializer

    def release(self) -> None:
        """Forget the float weight once it is lowered (see `_unmap`)."""
        self.weight = _RELEASED
        _unmap(self.source)


class QuantizeWeights(Pass):
    """Weight-only block quantization of MatMul/Gemm (int4/uint4/int8/uint8, blocks of 16–256)."""

    name = "quantize_weights"
    Config = QuantizeWeightsConfig
    after = ("assign_precision", "simplify", "upgrade_opset", "smooth_quant")
    lowers = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._embeddings = 0
        if default_opset(model) < 21:
            raise UsageError(
                f"block-quantized weights need opset 21 (the model has {default_opset(model)})",
                "put `upgrade_opset: {target: 21}` before quantize_weights in the recipe",
            )
        targets = self._targets(graph)
        if self._embeddings:
            model.opset_imports.setdefault("com.microsoft", 1)
            self.context.notes.append(f"quantize_weights: {self._embeddings} embedding tables → GatherBlockQuantized")
        if not targets:
            return ir.passes.PassResult(model, modified=self._embeddings > 0)
        by_input: dict[str, list[_Target]] = {}
        for target in targets:
            by_input.setdefault(target.node.inputs[0].name, []).append(target)  # type: ignore[union-attr]
        needs_hessian = self.config.algorithm == "gptq" or self.config.awq
        scaled = 0
        groups = (
            self.context.gram(model, list(by_input), self.config.hessian_budget_mb)
            if needs_hessian
            else iter([{name: None for name in by_input}])
        )
        for hessians in groups:
            for name, hessian in hessians.items():
                group = by_input[name]
                if self.config.awq and hessian is not None:
                    hessian, did_scale = self._awq(graph, group, hessian)
                    scaled += did_scale
                for target in group:
                    self._lower(graph, target, hessian)
                    target.release()
        graph.sort()
        forget_names(graph)
        algorithm = self.config.algorithm + (" + AWQ scaling" if self.config.awq else "")
        self.context.notes.append(
            f"quantize_weights: {len(targets)} weights in blocks ({algorithm})"
            + (f"; {scaled} activations rescaled" if self.config.awq else "")
        )
        return ir.passes.PassResult(model, modified=True)

    def _targets(self, graph: ir.Graph) -> list[_Target]:
        found = []
        for node in list(graph):
            spec = get_qspec(node)
            if spec is None or spec.skip or spec.weights.granularity != "block" or spec.weights.is_float:
                continue
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Gather":
                self._embeddings += self._lower_gather(graph, node, spec.weights)
                continue
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            target = _as_matmul_weight(node)
            if target is None:
                self.context.notes.append(f"quantize_weights: kept {node.name} in float (weight not a constant 2-D B)")
                continue
            weight, bias = target
            found.append(_Target(node, weight, spec.weights, bias, source=node.inputs[1]))
        return found

    def _awq(self, graph: ir.Graph, group: list[_Target], hessian: np.ndarray) -> tuple[np.ndarray, bool]:
        """One scale vector for every weight reading this activation (Q, K and V share theirs)."""
        spec = group[0].spec
        joined = np.concatenate([t.weight for t in group], axis=1)
        scale, alpha = blockquant.awq_scales(
            joined, hessian, spec.block_size or 32, spec.dtype, spec.symmetric, self.config.awq_grid
        )
        if alpha == 0.0:
            return hessian, False
        value = group[0].node.inputs[0]
        assert value is not None
        if (
            divide_activation(graph, value, [t.node for t in group], scale, allow_mul=self.config.awq_insert_mul)
            is None
        ):
            return hessian, False
        for target in group:
            target.weight = (target.weight * scale[:, None]).astype(np.float32)
        inverse = 1.0 / scale
        return hessian * inverse[:, None] * inverse[None, :], True

    def _lower(self, graph: ir.Graph, target: _Target, hessian: np.ndarray | None) -> None:
        spec = target.spec
        block_size = spec.block_size or 32
        if self.config.algorithm == "gptq" and hessian is not None:
            quant = blockquant.gptq(
                target.weight,
                hessian,
                block_size,
                spec.dtype,
                spec.symmetric,
                damp=self.config.damp,
                act_order=self.config.act_order,
            )
        else:
            quant = blockquant.rtn(target.weight, block_size, spec.dtype, spec.symmetric)
        node = target.node
        base = node.inputs[1].name or node.name  # type: ignore[union-attr]
        codes = add_initializer(graph, f"{base}_q", quant.q.astype(PACKED_TYPES[spec.dtype]))
        scale = self._scale_value(graph, base, quant.scale, node)
        inputs = [codes, scale]
        if quant.zero is not None:
            inputs.append(add_initializer(graph, f"{base}_zero", quant.zero.astype(PACKED_TYPES[spec.dtype])))
        dq = ir.node("DequantizeLinear", inputs, attributes={"axis": 0, "block_size": block_size}, name=f"{base}_dq")
        dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(quant.q.shape)
        graph.insert_before(node, dq)
        if node.op_type == "MatMul":
            node.replace_input_with(1, dq.outputs[0])
            return
        _replace_gemm(graph, node, dq.outputs[0], target.bias)

    def _lower_gather(self, graph: ir.Graph, node: ir.Node, spec: QuantSpec) -> int:
        """Gather(table [V, D], ids) → GatherBlockQuantized with blocks along D (round to nearest)."""
        table = constant_array(node.inputs[0]) if len(node.inputs) == 2 else None
        if table is None or table.ndim != 2 or table.dtype != np.float32 or node.attributes.get_int("axis", 0) != 0:
            return 0  # a Gather over shapes or indices, not an embedding
        if spec.dtype not in ("int4", "uint4"):
            self.context.notes.append(f"quantize_weights: kept embedding {node.name} in float (4-bit tables only)")
            return 0
        block_size = spec.block_size or 32
        quant = blockquant.rtn(np.ascontiguousarray(table.T), block_size, spec.dtype, spec.symmetric)
        base = node.inputs[0].name or node.name  # type: ignore[union-attr]
        inputs = [
            add_initializer(graph, f"{base}_q", quant.q.T.astype(PACKED_TYPES[spec.dtype])),
            node.inputs[1],
            add_initializer(graph, f"{base}_scale", np.ascontiguousarray(quant.scale.T)),
        ]
        if quant.zero is not None:
            inputs.append(add_initializer(graph, f"{base}_zero", quant.zero.T.astype(PACKED_TYPES[spec.dtype])))
        gather = ir.node(
            "GatherBlockQuantized",
            inputs,
            attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block_size},
            domain="com.microsoft",
            name=node.name,
        )
        source = node.inputs[0]
        ir.convenience.replace_nodes_and_values(graph, node, [node], [gather], node.outputs, gather.outputs)
        del table
        _unmap(source)
        return 1

    def _scale_value(self, graph: ir.Graph, base: str, scale: np.ndarray, before: ir.Node) -> ir.Value:
        if not self.config.double_quant:
            return add_initializer(graph, f"{base}_scale", scale.astype(np.float32))
        double = blockquant.double_quantize(scale, self.config.super_block)
        codes = add_initializer(graph, f"{base}_scale_q", double.codes)
        second = add_initializer(graph, f"{base}_scale_scale", double.scale)
        super_block = min(self.config.super_block, scale.shape[1])
        dq = ir.node(
            "DequantizeLinear",
            [codes, second],
            attributes={"axis": 1, "block_size": max(super_block, 1)},
            name=f"{base}_scale_dq",
        )
        dq.outputs[0].name = unique_name(graph, f"{base}_scale")
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(scale.shape)
        graph.insert_before(before, dq)
        return dq.outputs[0]


_RELEASED = np.empty((0, 0), np.float32)


def _unmap(value: ir.Value | None) -> None:
    """Close the memory map of a weight that lives in an external data file, once read. Pages of a mapped
    file that were touched count in RSS until unmapped: kept, they would hold the whole input model in
    memory by the end of the pass. The tensor maps the file again if anything reads it later."""
    tensor = value.const_value if value is not None else None
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # someone still holds a view: its pages stay, nothing breaks
            tensor.release()


def _as_matmul_weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The node's weight as [K, N] (B of x·B), and a Gemm's bias folded with beta; None if not expressible."""
    if len(node.inputs) < 2 or is_constant(node.inputs[0]):
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
        return None
    if node.op_type == "MatMul":
        return weight, None
    attrs = node.attributes
    if attrs.get_int("transA", 0):
        return None
    if attrs.get_int("transB", 0):
        weight = weight.T
    weight = weight * np.float32(attrs.get_float("alpha", 1.0))
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None or bias.size not in (1, weight.shape[1]):
            return None
        bias = np.broadcast_to(bias.reshape(-1) * np.float32(attrs.get_float("beta", 1.0)), (weight.shape[1],))
    return np.ascontiguousarray(weight, dtype=np.float32), None if bias is None else bias.astype(np.float32)


def _replace_gemm(graph: ir.Graph, gemm: ir.Node, weight: ir.Value, bias: np.ndarray | None) -> None:
    """Gemm(A, B, C) → MatMul(A, B') [+ Add(C')], the form onnxruntime fuses with a blocked DequantizeLinear."""
    output = gemm.outputs[0]
    matmul = ir.node("MatMul", [gemm.inputs[0], weight], name=f"{gemm.name}_matmul")
    new_nodes = [matmul]
    if bias is not None:
        bias_value = add_initializer(graph, f"{gemm.name}_bias", bias)
        new_nodes.append(ir.node("Add", [matmul.outputs[0], bias_value], name=f"{gemm.name}_bias_add"))
        matmul.outputs[0].name = unique_name(graph, f"{gemm.name}_matmul_out")
    result = new_nodes[-1].outputs[0]
    result.dtype = output.dtype or ir.DataType.FLOAT
    if output.shape is not None:
        result.shape = output.shape
    ir.convenience.replace_nodes_and_values(graph, gemm, [gemm], new_nodes, [output], [result])
