"""bias_correction: remove the mean output shift that weight rounding causes (empirical bias correction).

Rounding W to W_q = W + ΔW shifts each output channel's mean by E[ΔW·x]: a bias error that the next
layers see on every sample, and that per-tensor or low-bit weights make large (Nagel et al. 2019 report it
as the main loss of per-tensor MobileNetV2). Measured on the calibration data, with onnxruntime running
the layer's own op (Conv with its strides and pads, MatMul, Gemm) with weight ΔW and no bias on the layer's
float input, the shift per channel is

    δ_c = E_x[(ΔW·x)_c]   (mean over samples and, for Conv, positions)

and the bias becomes b − δ, so that E[W_q·x + b − δ] = E[W·x + b]. The weights' quantization is computed
exactly as the lowering will (same spec, same scale): insert_qdq then rounds W to that W_q. A Conv or Gemm
without a bias gets one; a MatMul is corrected through the constant Add that follows it, else left alone.
A weight adaround rounded already is on its grid: its shift is measured against the float weight that pass
kept (node meta), since AdaRound's objective is judged on float inputs and leaves some mean error.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq import qmath
from onnxq.pass_base import Pass, PassConfig
from onnxq.qspec import get_qspec

from ._graph import add_initializer, constant_array, forget_names, only_reader
from ._measure import FLOAT_WEIGHT_KEY, Layer, Reduction, layer_of, reduce_per_channel


class BiasCorrectionConfig(PassConfig):
    samples: int | None = Field(None, ge=1, description="calibration samples to measure on (default: num_samples)")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "MatMul", "Gemm"], description="ops to correct")


class BiasCorrection(Pass):
    """Remove the mean output shift that weight rounding causes, measured on calibration data."""

    name = "bias_correction"
    Config = BiasCorrectionConfig
    after = ("assign_precision", "fold_batchnorm", "equalize", "adaround", "simplify")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets: list[tuple[Layer, np.ndarray]] = []
        learned = 0
        for node in model.graph:
            spec = get_qspec(node)
            if spec is None or spec.skip or node.op_type not in self.config.op_types:
                continue
            w = spec.weights
            layer = layer_of(node)
            if w.is_float or w.granularity == "block" or layer is None or not _has_bias_slot(layer):
                continue
            original = node.meta.get(FLOAT_WEIGHT_KEY)
            if original is not None:  # rounded already (adaround): what is left is the rest of its mean shift
                learned += 1
                targets.append((layer, layer.weight - original))
                continue
            axis = None if w.granularity == "tensor" else layer.row_axis
            q, scale, zero = qmath.quantize_weight(layer.weight, w.dtype, w.symmetric, axis, w.reduce_range)
            targets.append((layer, qmath.dequantize(q, scale, zero, axis) - layer.weight))
        if not targets:
            self.context.notes.append("bias_correction: no layer with quantized weights and a bias to correct")
            return ir.passes.PassResult(model, modified=False)
        requests = [
            Reduction(layer.node.outputs[0].name, "mean", delta, layer, 1 if layer.op == "Conv" else -1)
            for layer, delta in targets
        ]
        with self.context._timed("bias_correction"):
            shifts = reduce_per_channel(model, self.context, requests, self.config.samples)
        relative = []
        for (layer, _), shift in zip(targets, shifts, strict=True):
            relative.append(_correct(model.graph, layer, shift))
        forget_names(model.graph)
        self.context.notes.append(
            f"bias_correction: {len(targets)} layers' output means corrected (median shift "
            f"{np.median(relative):.2g} of the output's mean |bias|)"
            + (f", {learned} of them rounded by adaround" if learned else "")
        )
        return ir.passes.PassResult(model, modified=True)


def _following_add(layer: Layer) -> tuple[ir.Node, int] | None:
    """The Add right after a MatMul whose other input is a constant bias [N], and that input's index."""
    reader = only_reader(layer.node.outputs[0])
    if reader is None or reader.op_type != "Add" or reader.domain not in ("", "ai.onnx"):
        return None
    for index in (0, 1):
        other = reader.inputs[1 - index]
        if reader.inputs[index] is layer.node.outputs[0] and other is not None:
            bias = constant_array(other)
            columns = layer.weight.shape[1]
            if bias is not None and bias.shape == (columns,) and len(other.uses()) == 1:
                return reader, 1 - index
    return None


def _has_bias_slot(layer: Layer) -> bool:
    node = layer.node
    if layer.op == "MatMul":
        return _following_add(layer) is not None
    if layer.op == "Gemm":
        if node.attributes.get_float("beta", 1.0) != 1.0:
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant_array(node.inputs[2])
            rows = layer.rows().shape[1]
            return bias is not None and bias.size in (1, rows) and len(node.inputs[2].uses()) == 1
        return True
    return len(node.inputs) < 3 or node.inputs[2] is None or constant_array(node.inputs[2]) is not None


def _correct(graph: ir.Graph, layer: Layer, shift: np.ndarray) -> float:
    """b ← b − shift; returns |shift| relative to the mean |b| (or to 1 where there was no bias)."""
    node = layer.node
    if layer.op == "MatMul":
        found = _following_add(layer)
        assert found is not None
        add, index = found
        holder, slot = add, index
    else:
        holder, slot = node, 2
    current = constant_array(holder.inputs[slot]) if len(holder.inputs) > slot else None
    channels = shift.shape[0]
    bias = np.zeros(channels) if current is None else np.broadcast_to(current, (channels,)).astype(np.float64)
    corrected = (bias - shift).astype(np.float32)
    base = node.name or node.outputs[0].name
    if len(holder.inputs) <= slot:
        holder.resize_inputs(slot + 1)
    holder.replace_input_with(slot, add_initializer(graph, f"{base}.bias_corrected", corrected))
    scale = float(np.mean(np.abs(bias))) or 1.0
    return float(np.mean(np.abs(shift))) / scale
