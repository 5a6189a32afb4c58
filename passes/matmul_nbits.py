"""Block-quantized MatMul weights between DequantizeLinear and com.microsoft::MatMulNBits, bit-exact.

to_matmul_nbits and from_matmul_nbits move weights between the portable DQ form and onnxruntime's kernel:

DQ form (opset 21):  W_q [K, N] ─DequantizeLinear(scale [⌈K/bs⌉, N], [zero], axis=0, block_size=bs)─▶ MatMul B
MatMulNBits:         MatMulNBits(A, B uint8 [N, ⌈K/bs⌉, bs·bits/8], scales [N, ⌈K/bs⌉], [zero packed], bias)

MatMulNBits codes are unsigned with an implicit zero point 2^(bits−1), so signed weights without a zero
point (int4 symmetric) need no zero-point input, and come back as signed weights without one; unsigned
weights always carry their zero points (layout in onnxq.packing). A constant [N] bias Add after the
MatMul goes into MatMulNBits' bias input. onnxruntime's CPU kernel takes bits 2, 4, 8 and block sizes
16, 32, 64, 128, 256; anything else stays as it was, with a note.

Which DQ forms onnxruntime 1.31 fuses into MatMulNBits itself (CPU EP, graph optimization EXTENDED or
ALL; BASIC does not fuse), measured on DequantizeLinear(axis 0) → MatMul:

    weight (zero point)              block 16–256 (2^n) | 8, 24, 512, 2048 | fp16 scales + A | K % bs ≠ 0, K < bs
    INT4  (none or INT4)             fused               | not fused        | fused           | fused
    UINT4 (none or UINT4)            fused               | not fused        | fused           | fused
    INT8  (none or INT8)             fused               | not fused        | fused           | fused
    UINT8 (none or UINT8)            fused               | not fused        | fused           | fused
    INT2 / UINT2 (opset 25)          fused (bits 2)

Also fused: A of rank 2, 3 or from a Reshape; opsets 21–25; a following bias Add (into the bias input);
Gemm (transB=0) with its C. Not fused, the DQ and MatMul run as written:
- the MatMul's output goes straight into Relu or Clip whose output feeds another node (fused when that
  Relu is a graph output, or when an Add comes between, at rank 3); at rank 2 MatMul+Add+Relu becomes a
  FusedGemm with the DequantizeLinear left in front of it;
- one weight initializer read by two DequantizeLinear nodes, or one DQ read by two MatMuls (tied weights);
- a DQ output that is also a graph output; fp16 scales followed by a Cast to float.
to_matmul_nbits converts all of these. The node onnxruntime fuses gets accuracy_level 4 (int8 activations:
0.3–0.9 % max relative deviation from the DQ graph in our tests) unless the session sets
`session.qdq_matmulnbits_accuracy_level` (0 reproduces the DQ graph exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field

from onnxq import packing
from onnxq.errors import UsageError
from onnxq.ir import min_ir_version
from onnxq.pass_base import Pass, PassConfig

from ._graph import add_initializer, constant_array, default_opset, forget_names, unique_name

MS_DOMAIN = "com.microsoft"
DEFAULT_DOMAINS = ("", "ai.onnx")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what the CPU MatMulNBits kernel accepts
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# DequantizeLinear weight types by (bits, signed), and the opset where block_size meets that type
DQ_TYPES: dict[tuple[int, bool], tuple[ir.DataType, type, int]] = {
    (2, True): (ir.DataType.INT2, ml_dtypes.int2, 25),
    (2, False): (ir.DataType.UINT2, ml_dtypes.uint2, 25),
    (4, True): (ir.DataType.INT4, ml_dtypes.int4, 21),
    (4, False): (ir.DataType.UINT4, ml_dtypes.uint4, 21),
    (8, True): (ir.DataType.INT8, np.int8, 21),
    (8, False): (ir.DataType.UINT8, np.uint8, 21),
}
BITS_OF = {dtype: (bits, signed) for (bits, signed), (dtype, _, _) in DQ_TYPES.items()}


class _Skip(Exception):
    """Why one node stays as it is (collected into notes)."""


@dataclass(frozen=True)
class _Packed:
    """MatMulNBits constants for one DequantizeLinear, shared by every MatMul that reads it."""

    b: ir.Value
    scales: ir.Value
    zero: ir.Value | None
    k: int
    n: int
    bits: int
    block_size: int
    dtype: ir.DataType
    source: ir.Node  # the DequantizeLinear


class ToMatMulNBitsConfig(PassConfig):
    accuracy_level: int = Field(
        0, ge=0, le=4, description="MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations"
    )
    keep_zero_points: bool = Field(
        True,
        description="False: leave out a zero-point input equal to the implicit 2^(bits-1) everywhere "
        "(smaller; comes back as signed weights without zero points)",
    )


class ToMatMulNBits(Pass):
    """DequantizeLinear(block, axis 0) → MatMul [→ Add bias] becomes one com.microsoft::MatMulNBits."""

    name = "to_matmul_nbits"
    Config = ToMatMulNBitsConfig
    after = ("quantize_weights",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        packed: dict[int, _Packed] = {}
        skipped: dict[str, list[str]] = {}
        converted = with_bias = 0
        for node in list(graph):
            if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
                continue
            dq = node.inputs[1].producer() if node.inputs[1] is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in DEFAULT_DOMAINS:
                continue
            try:
                constants = packed.get(id(dq)) or self._pack(graph, dq)
                packed[id(dq)] = constants
                with_bias += self._replace(graph, node, constants)
                converted += 1
                if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
                    _remove_dead(graph, [dq], [])  # drop its codes now: on a big model they add up
            except _Skip as why:
                skipped.setdefault(f"DequantizeLinear→{node.op_type}: {why}", []).append(_label(node))
        _note_skipped(self.context.notes, self.name, skipped)
        made = [v for p in packed.values() for v in (p.b, p.scales, p.zero)]
        _remove_dead(graph, [p.source for p in packed.values()], made)
        if not converted:
            return ir.passes.PassResult(model, modified=False)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        forget_names(graph)
        self.context.notes.append(
            f"to_matmul_nbits: {converted} MatMul → MatMulNBits"
            + (f" ({with_bias} with bias)" if with_bias else "")
            + (f", accuracy_level {self.config.accuracy_level}" if self.config.accuracy_level else "")
        )
        return ir.passes.PassResult(model, modified=True)

    def _pack(self, graph: ir.Graph, dq: ir.Node) -> _Packed:
        weight = constant_array(dq.inputs[0])
        if weight is None or weight.ndim != 2:
            raise _Skip("weight is not a constant 2-D tensor")
        dtype = ir.DataType.from_numpy(weight.dtype)
        if dtype not in BITS_OF:
            raise _Skip(f"{dtype.name} weights (MatMulNBits stores 2, 4 or 8 bits)")
        bits, signed = BITS_OF[dtype]
        attrs = dq.attributes
        axis, block_size = attrs.get_int("axis", 1), attrs.get_int("block_size", 0)
        if axis % 2 != 0:
            raise _Skip("quantized along N (axis 1); MatMulNBits blocks run along K")
        if block_size not in BLOCK_SIZES:
            raise _Skip(f"block_size {block_size} (MatMulNBits takes {', '.join(map(str, BLOCK_SIZES))})")
        scale = _scale_array(dq.inputs[1])
        k, n = weight.shape
        blocks = packing.k_blocks(k, block_size)
        if scale is None or scale.shape != (blocks, n) or ir.DataType.from_numpy(scale.dtype) not in FLOATS:
            raise _Skip("scale is not a constant float/float16 [⌈K/block⌉, N] tensor")
        if attrs.get_int("output_dtype", 0) not in (0, ir.DataType.from_numpy(scale.dtype)):
            raise _Skip("DequantizeLinear output_dtype differs from its scale type")
        zero = None
        if len(dq.inputs) > 2 and dq.inputs[2] is not None:
            zero = constant_array(dq.inputs[2])
            if zero is None or zero.shape != (blocks, n):
                raise _Skip("zero point is not a constant [⌈K/block⌉, N] tensor")

        offset = packing.default_zero_point(bits) if signed else 0
        if zero is not None:
            zero_u = (zero.astype(np.int16) + offset).astype(np.uint8)
        else:
            zero_u = None if signed else np.zeros((blocks, n), np.uint8)
        if (
            zero_u is not None
            and not self.config.keep_zero_points
            and np.all(zero_u == packing.default_zero_point(bits))
        ):
            zero_u = None
        base = dq.inputs[0].name or dq.name or "weight"
        b = add_initializer(graph, f"{base}_nbits", _pack_columns(weight, offset, bits, block_size))
        scales = add_initializer(graph, f"{base}_nbits_scales", np.ascontiguousarray(scale.T))
        zero_value = None
        if zero_u is not None:
            per_column = packing.zero_point_bytes(blocks, bits)
            zero_value = add_initializer(
                graph, f"{base}_nbits_zero_points", packing.pack_zero_points(zero_u, bits).reshape(n, per_column)
            )
        return _Packed(b, scales, zero_value, k, n, bits, block_size, ir.DataType.from_numpy(scale.dtype), dq)

    def _replace(self, graph: ir.Graph, node: ir.Node, packed: _Packed) -> bool:
        """Put MatMulNBits in place of `node` (and of the bias Add it absorbs); True when it took a bias."""
        a = node.inputs[0]
        if a is None or (a.dtype is not None and a.dtype != packed.dtype):
            raise _Skip("input A type differs from the scale type")
        bias, add = None, None
        if node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0) or attrs.get_int("transB", 0) or attrs.get_float("alpha", 1.0) != 1.0:
                raise _Skip("transposed or scaled (alpha ≠ 1)")
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = constant_array(node.inputs[2])
                if c is None or c.shape != (packed.n,) or attrs.get_float("beta", 1.0) != 1.0:
                    raise _Skip("C is not a constant [N] vector with beta 1")
                bias = node.inputs[2]
        else:
            add, bias = _bias_add(node, packed)
        inputs: list[ir.Value | None] = [a, packed.b, packed.scales, packed.zero, None, bias]
        while inputs[-1] is None:
            inputs.pop()
        attributes = {"K": packed.k, "N": packed.n, "bits": packed.bits, "block_size": packed.block_size}
        if self.config.accuracy_level:  # left out at 0, as onnxruntime's quantizer does (other EPs reject it)
            attributes["accuracy_level"] = self.config.accuracy_level
        base = node.name or node.outputs[0].name or "matmul"
        nbits = ir.node(
            "MatMulNBits", inputs, attributes=attributes, domain=MS_DOMAIN, name=unique_name(graph, f"{base}_nbits")
        )
        graph.insert_before(node, nbits)
        last = add or node
        _take_over(graph, last.outputs[0], nbits.outputs[0], packed.dtype)
        graph.remove([n for n in (add, node) if n is not None], safe=True)
        return bias is not None


class FromMatMulNBitsConfig(PassConfig):
    pass


class FromMatMulNBits(Pass):
    """com.microsoft::MatMulNBits becomes DequantizeLinear(block, axis 0) → MatMul [→ Add bias] (opset ≥ 21)."""

    name = "from_matmul_nbits"
    Config = FromMatMulNBitsConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
        if not nodes:
            return ir.passes.PassResult(model, modified=False)
        if default_opset(model) < 21 and (changed := _changed_ops(model, 21)):
            raise UsageError(
                f"{self.name} writes block DequantizeLinear (opset 21) and the model is at opset "
                f"{default_opset(model)}, where {', '.join(changed[:5])} mean something else",
                f"put `upgrade_opset: {{target: 21}}` before {self.name} in the recipe",
            )
        two_bit_ok = default_opset(model) >= 25 or not _changed_ops(model, 25)
        skipped: dict[str, list[str]] = {}
        converted, opset_needed = 0, 0
        for node in nodes:
            try:
                if node.attributes.get_int("bits", 4) == 2 and not two_bit_ok:
                    raise _Skip("2-bit DequantizeLinear needs opset 25; run upgrade_opset with target 25 first")
                opset_needed = max(opset_needed, self._convert(graph, node))
                converted += 1
            except _Skip as why:
                skipped.setdefault(f"MatMulNBits: {why}", []).append(_label(node))
        _note_skipped(self.context.notes, self.name, skipped)
        if not converted:
            return ir.passes.PassResult(model, modified=False)
        _raise_opset(model, opset_needed)
        if not any(n.domain == MS_DOMAIN for n in ir.traversal.RecursiveGraphIterator(graph)):
            model.opset_imports.pop(MS_DOMAIN, None)
        forget_names(graph)
        self.context.notes.append(f"from_matmul_nbits: {converted} MatMulNBits → DequantizeLinear + MatMul")
        return ir.passes.PassResult(model, modified=True)

    def _convert(self, graph: ir.Graph, node: ir.Node) -> int:
        """Rewrite one node; returns the default-domain opset the DequantizeLinear it wrote needs."""
        attrs = node.attributes
        k, n = attrs.get_int("K", 0), attrs.get_int("N", 0)
        bits, block_size = attrs.get_int("bits", 4), attrs.get_int("block_size", 0)
        if attrs.get_int("weight_prepacked", 0):
            raise _Skip("B is prepacked for one runtime")
        if (bits, True) not in DQ_TYPES:
            raise _Skip(f"{bits}-bit codes have no DequantizeLinear type")
        if k <= 0 or n <= 0 or block_size < 16 or block_size & (block_size - 1):
            raise _Skip("K, N or block_size missing or invalid")
        inputs = [*node.inputs, None, None, None, None, None, None][:6]
        a, b_value, scales_value, zero_value, g_idx_value, bias_value = inputs
        blocks = packing.k_blocks(k, block_size)
        b = constant_array(b_value)
        scales = constant_array(scales_value)
        if b is None or b.dtype != np.uint8 or b.shape != (n, blocks, packing.blob_size(block_size, bits)):
            raise _Skip("B is not a constant uint8 [N, k_blocks, blob_size] tensor")
        if scales is None or scales.size != n * blocks or ir.DataType.from_numpy(scales.dtype) not in FLOATS:
            raise _Skip("scales are not a constant float/float16 tensor of N·k_blocks values")
        if g_idx_value is not None:
            g_idx = constant_array(g_idx_value)
            if g_idx is None or not np.array_equal(g_idx.reshape(-1), np.arange(k) // block_size):
                raise _Skip("g_idx reorders K (act-order), which block DequantizeLinear cannot express")
        codes = packing.unpack_weight(b, k, bits, block_size)
        zero = _zero_points(zero_value, n, blocks, bits, scales.dtype)
        scale = np.ascontiguousarray(scales.reshape(n, blocks).T)
        bias = None
        if bias_value is not None:
            bias = constant_array(bias_value)
            if bias is None or bias.size != n:
                raise _Skip("bias is not a constant [N] vector")

        signed = zero is None
        _, storage, opset = DQ_TYPES[(bits, signed)]
        weight = (packing.to_signed(codes, bits) if signed else codes).astype(storage)
        base = (b_value.name or node.name or "weight").removesuffix("_nbits")
        dq_inputs = [add_initializer(graph, f"{base}_q", weight), add_initializer(graph, f"{base}_scale", scale)]
        if zero is not None:
            dq_inputs.append(add_initializer(graph, f"{base}_zero_point", zero.astype(storage)))
        float_type = ir.DataType.from_numpy(scale.dtype)
        dq = ir.node(
            "DequantizeLinear",
            dq_inputs,
            attributes={"axis": 0, "block_size": block_size},
            name=unique_name(graph, f"{base}_dq"),
        )
        dq.outputs[0].name = unique_name(graph, f"{base}_dequantized")
        dq.outputs[0].dtype, dq.outputs[0].shape = float_type, ir.Shape([k, n])
        matmul = ir.node("MatMul", [a, dq.outputs[0]], name=unique_name(graph, f"{node.name or base}_matmul"))
        new_nodes = [dq, matmul]
        result = matmul.outputs[0]
        if bias is not None:
            matmul.outputs[0].name = unique_name(graph, f"{node.name or base}_matmul_out")
            matmul.outputs[0].dtype = float_type
            bias_init = bias_value if bias.shape == (n,) else add_initializer(graph, f"{base}_bias", bias.reshape(n))
            add = ir.node("Add", [matmul.outputs[0], bias_init], name=unique_name(graph, f"{node.name or base}_bias"))
            new_nodes.append(add)
            result = add.outputs[0]
        graph.insert_before(node, new_nodes)
        _take_over(graph, node.outputs[0], result, float_type)
        graph.remove(node, safe=True)
        constants = [b_value, scales_value, zero_value, g_idx_value, bias_value]
        _remove_dead(graph, [p for v in constants if v is not None and (p := v.producer()) is not None], constants)
        return opset


def _label(node: ir.Node) -> str:
    return node.name or node.outputs[0].name or "?"


def _note_skipped(notes: list[str], pass_name: str, skipped: dict[str, list[str]]) -> None:
    """One line per reason, naming the first few nodes it applies to."""
    for reason, names in skipped.items():
        shown = ", ".join(names[:3]) + (", …" if len(names) > 3 else "")
        notes.append(f"{pass_name}: kept {len(names)} {reason} ({shown})")


def _pack_columns(
    weight: np.ndarray, offset: int, bits: int, block_size: int, chunk_values: int = 1 << 22
) -> np.ndarray:
    """B of DequantizeLinear codes [K, N] (plus `offset`, making them unsigned), a slice of columns at a time:
    packing expands every code to 8 bytes on the way, ~1 GB at once for a 2048 × 32000 LM head."""
    k, n = weight.shape
    step = max(1, chunk_values // max(k, 1))
    packed = np.empty((n, packing.k_blocks(k, block_size), packing.blob_size(block_size, bits)), np.uint8)
    for start in range(0, n, step):
        codes = (weight[:, start : start + step].astype(np.int16) + offset).astype(np.uint8)
        packed[start : start + step] = packing.pack_weight(codes, bits, block_size)
    return packed


def _scale_array(value: ir.Value | None) -> np.ndarray | None:
    """A constant scale, or one produced by DequantizeLinear of constants (double quantization), folded:
    float32 (q − z)·s is what onnxruntime computes too, so folding changes no bit."""
    found = constant_array(value)
    if found is not None or value is None:
        return found
    dq = value.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain not in DEFAULT_DOMAINS:
        return None
    q, s = constant_array(dq.inputs[0]), constant_array(dq.inputs[1])
    z = constant_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None or s is None or (len(dq.inputs) > 2 and dq.inputs[2] is not None and z is None):
        return None
    axis, block_size = dq.attributes.get_int("axis", 1) % max(q.ndim, 1), dq.attributes.get_int("block_size", 0)

    def expand(param: np.ndarray) -> np.ndarray:
        if param.ndim == 0 or param.size == 1:
            return param.reshape(())
        if block_size:
            return np.repeat(param, block_size, axis=axis).take(np.arange(q.shape[axis]), axis=axis)
        shape = [1] * q.ndim
        shape[axis] = -1
        return param.reshape(shape)

    zero = 0 if z is None else expand(z.astype(np.int32))
    return ((q.astype(np.int32) - zero).astype(np.float32) * expand(s)).astype(s.dtype)


def _zero_points(value: ir.Value | None, n: int, blocks: int, bits: int, scale_dtype: np.dtype) -> np.ndarray | None:
    """Unsigned zero points [k_blocks, N] from packed uint8 or unpacked float; None when absent."""
    if value is None:
        return None
    zero = constant_array(value)
    if zero is None:
        raise _Skip("zero points are not constant")
    if zero.dtype == np.uint8:
        return packing.unpack_zero_points(zero, n, blocks, bits)
    if zero.dtype == scale_dtype and zero.size == n * blocks:
        flat = zero.astype(np.float64)
        if np.all(flat == np.rint(flat)) and flat.min() >= 0 and flat.max() < 1 << bits:
            return np.ascontiguousarray(flat.reshape(n, blocks).T.astype(np.uint8))
    raise _Skip("float zero points that are not whole codes")


def _bias_add(node: ir.Node, packed: _Packed) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add that follows a MatMul with a constant [N] vector, if it is the MatMul's only reader."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, None
    add, index = uses[0].node, uses[0].idx
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - index]
    bias = constant_array(other)
    if bias is None or bias.shape != (packed.n,) or ir.DataType.from_numpy(bias.dtype) != packed.dtype:
        return None, None
    return add, other


def _take_over(graph: ir.Graph, old: ir.Value, new: ir.Value, dtype: ir.DataType) -> None:
    """`new` replaces `old` everywhere, keeping its name (graph outputs stay named as before) and shape."""
    name = old.name
    new.dtype, new.shape = dtype, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name or unique_name(graph, "matmul_out")


def _remove_dead(graph: ir.Graph, nodes: list[ir.Node], values: list[ir.Value | None]) -> None:
    """Drop `nodes` (and the DequantizeLinear/Constant nodes feeding them) once nothing reads them, then
    the initializers among their inputs and `values` that nothing reads any more."""
    pending, seen = list(nodes), set()
    candidates = list(values)
    while pending:
        node = pending.pop()
        if id(node) in seen or node.graph is not graph:
            continue
        if any(out.uses() or out.is_graph_output() for out in node.outputs):
            continue
        seen.add(id(node))
        inputs = list(node.inputs)
        graph.remove(node, safe=True)
        candidates.extend(inputs)
        for value in inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type in ("DequantizeLinear", "Constant"):
                pending.append(producer)
    for value in candidates:
        if (
            value is not None
            and value.name in graph.initializers
            and graph.initializers[value.name] is value
            and not value.uses()
            and not value.is_graph_input()
            and not value.is_graph_output()
        ):
            graph.initializers.pop(value.name)


def _changed_ops(model: ir.Model, target: int) -> list[str]:
    """Default-domain ops of the graph whose meaning changes between its opset and `target`: raising the
    opset import alone is safe only when there are none."""
    current = default_opset(model)
    return sorted(
        {
            node.op_type
            for node in ir.traversal.RecursiveGraphIterator(model.graph)
            if node.domain in DEFAULT_DOMAINS and _schema_changes(node.op_type, current, target)
        }
    )


def _raise_opset(model: ir.Model, needed: int) -> None:
    if default_opset(model) >= needed:
        return
    model.opset_imports[""] = needed
    model.opset_imports.pop("ai.onnx", None)
    model.ir_version = max(model.ir_version or 0, min_ir_version(model))


def _schema_changes(op_type: str, old: int, new: int) -> bool:
    try:
        before = onnx.defs.get_schema(op_type, old, "").since_version
        after = onnx.defs.get_schema(op_type, new, "").since_version
    except onnx.defs.SchemaError:
        return True
    return before != after
