"""What the accuracy-toolbox passes measure on calibration data, computed by onnxruntime on an augmented clone.

- `layer_grams`: each layer's input second moment H = E[x xᵀ] over the rows the weight multiplies. For a
  Conv those rows are its input patches (im2col). onnxruntime makes them itself, with a grouped Conv of
  one-hot kernels that has the layer's strides, pads, dilations and auto_pad. The patches are therefore
  the ones the layer sees, border handling included. A grouped Conv gets one H per group ([g, K, K]).
- `reduce_per_channel`: the min or mean over the data of chosen tensors per channel, optionally of a
  Conv/MatMul with another weight applied to a layer's input (bias correction's output shift).

Python sees reductions (or patches of one sample at a time), never the whole data set at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import ir as onnxq_ir
from onnxq.errors import UsageError
from onnxq.pass_base import CALIB_FIX, PassContext

from ._graph import constant_array

PREFIX = "__onnxq_measure_"
ROUNDED_KEY = "onnxq.rounded"  # node meta: the weight is already on its quantization grid (and how)
FLOAT_WEIGHT_KEY = "onnxq.float_weight"  # node meta: the float weight before rounding (bias_correction reads it)
LINEAR_OPS = ("Conv", "MatMul", "Gemm")


@dataclass
class Layer:
    """A Conv/MatMul/Gemm with a constant weight, seen as g groups of rows: W ≅ [g, m, K], y = W·x per row."""

    node: ir.Node
    weight: np.ndarray  # as stored in the model
    groups: int

    @property
    def op(self) -> str:
        return self.node.op_type

    def rows(self, weight: np.ndarray | None = None) -> np.ndarray:
        """The weight as [g, m, K]: output rows m per group, K = what one output sums over."""
        w = self.weight if weight is None else weight
        if self.op == "Conv":
            return w.reshape(self.groups, w.shape[0] // self.groups, -1)
        if self.op == "Gemm" and self.node.attributes.get_int("transB", 0):
            return w[None]
        return w.T[None]  # MatMul / Gemm: [K, N] → [1, N, K]

    def from_rows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of `rows`: back to the stored layout."""
        if self.op == "Conv":
            return rows.reshape(self.weight.shape)
        if self.op == "Gemm" and self.node.attributes.get_int("transB", 0):
            return rows[0]
        return rows[0].T

    @property
    def row_axis(self) -> int:
        """The stored weight's output-channel axis (the axis of one scale per row)."""
        if self.op == "Conv" or (self.op == "Gemm" and self.node.attributes.get_int("transB", 0)):
            return 0
        return 1


def layer_of(node: ir.Node) -> Layer | None:
    """The node as a Layer, or None when it is not a plain linear op with a constant weight."""
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = constant_array(node.inputs[1])
    if weight is None or node.inputs[0] is None or weight.dtype != np.float32:
        return None
    if node.op_type == "Conv":
        if weight.ndim < 3:
            return None
        return Layer(node, weight, node.attributes.get_int("group", 1))
    if weight.ndim != 2 or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
        return None
    return Layer(node, weight, 1)


def _conv_attributes(node: ir.Node) -> dict[str, object]:
    kept = {}
    for key in ("strides", "pads", "dilations"):
        attr = node.attributes.get(key)
        if attr is not None:
            kept[key] = list(attr.as_ints())
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        kept["auto_pad"] = auto_pad
    return kept


def _patch_nodes(layer: Layer, out: str, graph: onnx.GraphProto) -> None:
    """x [N, C, *S] → patches [N, C·k, *S'] (channel-major, then kernel taps: the weight's layout)."""
    channels = layer.weight.shape[1] * layer.groups
    kernel = layer.weight.shape[2:]
    taps = int(np.prod(kernel))
    onehot = np.zeros((channels * taps, 1, *kernel), np.float32)
    flat = onehot.reshape(channels, taps, taps)
    flat[:, np.arange(taps), np.arange(taps)] = 1.0
    graph.initializer.append(onnx.numpy_helper.from_array(onehot, f"{out}_onehot"))
    graph.node.append(
        onnx.helper.make_node(
            "Conv",
            [layer.node.inputs[0].name, f"{out}_onehot"],
            [out],
            name=out,
            group=channels,
            kernel_shape=list(kernel),
            **_conv_attributes(layer.node),
        )
    )


def _run(
    model: ir.Model, context: PassContext, build: Callable[[onnx.ModelProto], list[str]], samples: int | None, what: str
) -> Iterator[list[np.ndarray]]:
    """Augment a clone with `build`, then yield its outputs for each calibration sample."""
    from onnxq.calibration.readers import input_specs, rebatch
    from onnxq.ort_session import session

    if context.calibration_data is None:
        raise UsageError(f"{what} need calibration data", CALIB_FIX)
    proto = onnxq_ir.to_proto(model)
    wanted = build(proto)
    for name in wanted:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = session(proto.SerializeToString(), external_data_dir=onnxq_ir.external_data_dir(model))
    inputs = {i.name for i in sess.get_inputs()}
    limit = samples or context.calibration_settings.get("num_samples")
    for seen, batch in enumerate(rebatch(context.calibration_data(), input_specs(model), 1)):
        if limit is not None and seen >= limit:
            break
        yield sess.run(wanted, {k: v for k, v in batch.items() if k in inputs})


def layer_grams(
    model: ir.Model, context: PassContext, layers: list[Layer], samples: int | None = None, rows_per_sample: int = 2048
) -> list[np.ndarray]:
    """E[x xᵀ] of each layer's input rows, [g, K, K] (float64). At most `rows_per_sample` patch rows of each
    sample are used (evenly spaced): enough for a K×K estimate, and it bounds the cost on large images."""

    def build(proto: onnx.ModelProto) -> list[str]:
        names = []
        for index, layer in enumerate(layers):
            if layer.op == "Conv":
                out = f"{PREFIX}patches_{index}"
                _patch_nodes(layer, out, proto.graph)
                names.append(out)
            else:
                names.append(layer.node.inputs[0].name)
        return names

    sums: list[np.ndarray | None] = [None] * len(layers)
    counts = [0] * len(layers)
    for outputs in _run(model, context, build, samples, "AdaRound's layer statistics"):
        for index, (layer, x) in enumerate(zip(layers, outputs, strict=True)):
            if layer.op == "Conv":
                # [N, g·K, *S'] → [g, K, N·S']
                rows = np.moveaxis(x.reshape(x.shape[0], layer.groups, -1, int(np.prod(x.shape[2:]))), 0, 2)
                rows = rows.reshape(layer.groups, rows.shape[1], -1)
            else:
                rows = x.reshape(-1, x.shape[-1]).T[None]
            step = max(1, -(-rows.shape[2] // rows_per_sample))
            rows = np.ascontiguousarray(rows[:, :, ::step], dtype=np.float32)
            gram = np.matmul(rows, rows.transpose(0, 2, 1)).astype(np.float64)
            sums[index] = gram if sums[index] is None else sums[index] + gram
            counts[index] += rows.shape[2]
    return [s / max(c, 1) if s is not None else np.zeros((1, 1, 1)) for s, c in zip(sums, counts, strict=True)]


@dataclass(frozen=True)
class Reduction:
    """A per-channel reduction over the data: of tensor `name`, or (with `weight`) of `layer`'s op applied to
    the layer's input with that weight and no bias. `axis` is the channel axis (1 for NCHW, -1 for [..., N])."""

    name: str
    how: str  # "min" | "mean"
    weight: np.ndarray | None = None
    layer: Layer | None = None
    axis: int = 1


def reduce_per_channel(
    model: ir.Model, context: PassContext, requests: list[Reduction], samples: int | None = None
) -> list[np.ndarray]:
    """Each request's per-channel min or mean over the calibration data (one onnxruntime pass for all)."""

    def build(proto: onnx.ModelProto) -> list[str]:
        names = []
        for index, request in enumerate(requests):
            source = request.name
            if request.weight is not None and request.layer is not None:
                layer, node = request.layer, request.layer.node
                source = f"{PREFIX}applied_{index}"
                proto.graph.initializer.append(onnx.numpy_helper.from_array(request.weight, f"{source}_w"))
                attrs: dict[str, object] = {}
                if layer.op == "Conv":
                    kernel = list(request.weight.shape[2:])
                    attrs = {"group": layer.groups, "kernel_shape": kernel, **_conv_attributes(node)}
                elif layer.op == "Gemm":
                    attrs = {"transB": node.attributes.get_int("transB", 0)}
                inputs = [node.inputs[0].name, f"{source}_w"]
                proto.graph.node.append(onnx.helper.make_node(layer.op, inputs, [source], name=source, **attrs))
            names.append(source)
        return names

    found: list[np.ndarray | None] = [None] * len(requests)
    counts = [0] * len(requests)
    for outputs in _run(model, context, build, samples, "per-channel statistics"):
        for index, (request, x) in enumerate(zip(requests, outputs, strict=True)):
            x = np.asarray(x, np.float64)
            axes = tuple(a for a in range(x.ndim) if a != request.axis % x.ndim)
            if request.how == "min":
                value = x.min(axis=axes)
                found[index] = value if found[index] is None else np.minimum(found[index], value)
            else:
                value = x.sum(axis=axes)
                found[index] = value if found[index] is None else found[index] + value
                counts[index] += int(np.prod([x.shape[a] for a in axes]))
    return [
        (f / max(c, 1) if r.how == "mean" else f) if f is not None else np.zeros(0)
        for f, c, r in zip(found, counts, requests, strict=True)
    ]
