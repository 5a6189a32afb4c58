"""equalize: cross-layer equalization of Conv pairs, with high-bias absorption (Nagel et al. 2019, DFQ).

Per-tensor (and low-bit) weight quantization suffers when one output channel's weights span 100× the range
of another's: the shared scale is set by the widest channel and the rest round to a few codes. Depthwise
convolutions after BatchNorm folding are the known case. For two Convs joined by positively homogeneous
ops f (Relu, LeakyRelu, MaxPool, zero Pad: f(s·x) = s·f(x) for s > 0), y = W₂·f(W₁x + b₁) is unchanged by

    W₁[i] ← W₁[i] / sᵢ,   b₁[i] ← b₁[i] / sᵢ,   W₂[:, i] ← W₂[:, i] · sᵢ

and sᵢ = √(r₁ᵢ / r₂ᵢ), with r₁ᵢ = max|W₁[i]| (output channel i) and r₂ᵢ = max|W₂[:, i]| (input channel i),
gives both the same range √(r₁ᵢ r₂ᵢ) per channel: the product of the two relative precisions is maximal.
Chains (A → B → C) are swept until the scales settle. Depthwise second layers scale their own filter i.

High-bias absorption (`absorb_bias`): equalizing can leave large biases, and so wide activations. Where
every input of channel i is at least cᵢ = max(0, min over the calibration data of W₁x + b₁), then
f(z − cᵢ) + cᵢ = f(z), so b₁[i] ← b₁[i] − cᵢ and b₂ ← b₂ + Σ_taps W₂[:, i]·cᵢ leave the output as it was
on that data, with a narrower activation range. It is exact only when the second Conv pads nothing (a
padded border would see cᵢ where it saw 0), so it is applied to those pairs only.

The model computes the same function afterwards (up to float rounding); activation ranges measured before
are void (`invalidates`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq.pass_base import ACTIVATION_STATS, Pass, PassConfig

from ._graph import add_initializer, constant_array, forget_names, only_reader
from ._measure import Layer, Reduction, layer_of, reduce_per_channel

HOMOGENEOUS = ("Relu", "LeakyRelu")  # and MaxPool and zero Pad, which commute with a positive scale


class EqualizeConfig(PassConfig):
    sweeps: int = Field(20, ge=1, le=1000, description="passes over all pairs (chains need several to settle)")
    absorb_bias: bool = Field(True, description="move each channel's guaranteed minimum into the next Conv's bias")
    max_scale: float = Field(1e4, gt=1, description="bound on each channel's factor and its inverse")


class _Pair:
    """Conv₁ → [f] → Conv₂, with working copies of the weights and biases."""

    def __init__(self, first: Layer, chain: list[ir.Node], second: Layer) -> None:
        self.first, self.chain, self.second = first, chain, second

    @property
    def absorbable(self) -> bool:
        """f(z − c) + c = f(z) for z ≥ c ≥ 0 along the chain, and no border of the second Conv sees c."""
        ops = {n.op_type for n in self.chain}
        return bool(ops & set(HOMOGENEOUS)) and "Pad" not in ops and not _pads(self.second.node)

    @property
    def depthwise(self) -> bool:
        return self.second.groups > 1


class Equalize(Pass):
    """Cross-layer equalization of Conv pairs joined by Relu/LeakyRelu/MaxPool/Pad, with bias absorption."""

    name = "equalize"
    Config = EqualizeConfig
    after = ("fold_batchnorm", "simplify")
    invalidates = frozenset({ACTIVATION_STATS})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        pairs = _pairs(graph)
        if not pairs:
            self.context.notes.append("equalize: no Conv pairs joined directly or by Relu/LeakyRelu/MaxPool/Pad")
            return ir.passes.PassResult(model, modified=False)
        weights = {id(layer.node): layer.weight.astype(np.float64) for p in pairs for layer in (p.first, p.second)}
        biases = {id(layer.node): _bias(layer).astype(np.float64) for p in pairs for layer in (p.first, p.second)}
        spread_before = _spread(pairs, weights)
        for _ in range(self.config.sweeps):
            moved = 0.0
            for pair in pairs:
                moved = max(moved, self._equalize(pair, weights, biases))
            if moved < 1e-4:
                break
        spread_after = _spread(pairs, weights)
        for key, layer in {id(layer.node): layer for p in pairs for layer in (p.first, p.second)}.items():
            _write(graph, layer, weights[key], biases[key], "equalized")
        absorbed = self._absorb(model, pairs) if self.config.absorb_bias else 0
        forget_names(graph)
        self.context.invalidate(self.invalidates)
        self.context.notes.append(
            f"equalize: {len(pairs)} Conv pairs equalized (median per-channel weight range spread "
            f"{spread_before:.0f}× → {spread_after:.0f}×)" + (f", {absorbed} biases absorbed" if absorbed else "")
        )
        return ir.passes.PassResult(model, modified=True)

    def _equalize(self, pair: _Pair, weights: dict[int, np.ndarray], biases: dict[int, np.ndarray]) -> float:
        w1, w2 = weights[id(pair.first.node)], weights[id(pair.second.node)]
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
        r2 = _input_ranges(w2, pair.depthwise)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(r1 / r2)
        bound = self.config.max_scale
        s = np.where(np.isfinite(s) & (s > 0), np.clip(s, 1 / bound, bound), 1.0)
        shape = (-1,) + (1,) * (w1.ndim - 1)
        weights[id(pair.first.node)] = w1 / s.reshape(shape)
        biases[id(pair.first.node)] = biases[id(pair.first.node)] / s
        if pair.depthwise:
            weights[id(pair.second.node)] = w2 * s.reshape(shape)
        else:
            weights[id(pair.second.node)] = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
        return float(np.max(np.abs(np.log(s))))

    def _absorb(self, model: ir.Model, pairs: list[_Pair]) -> int:
        """Shift each channel's guaranteed minimum (on the calibration data) into the next Conv's bias."""
        chosen = [p for p in pairs if p.absorbable]
        if not chosen or self.context.calibration_data is None:
            return 0
        requests = [Reduction(p.first.node.outputs[0].name, "min") for p in chosen]
        minima = reduce_per_channel(model, self.context, requests)
        absorbed = 0
        for pair, low in zip(chosen, minima, strict=True):
            c = np.maximum(np.asarray(low, np.float64), 0.0)
            if c.shape != (pair.first.weight.shape[0],) or not np.any(c > 0):
                continue
            first, second = layer_of(pair.first.node), layer_of(pair.second.node)
            assert first is not None and second is not None
            w2 = second.weight.astype(np.float64)
            taps = w2.reshape(w2.shape[0], w2.shape[1], -1).sum(axis=2)  # [O, C/g]
            shift = taps[:, 0] * c if pair.depthwise else taps @ c
            _write(model.graph, first, first.weight, _bias(first) - c, "absorbed")
            _write(model.graph, second, second.weight, _bias(second) + shift, "absorbed")
            absorbed += 1
        return absorbed


def _commutes(node: ir.Node) -> bool:
    """f(s·x) = s·f(x) per channel for s > 0: the op may sit between the two Convs."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in HOMOGENEOUS or node.op_type == "MaxPool":
        return len(node.outputs) == 1
    if node.op_type == "Pad":  # zero padding scales with the channel
        value = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        mode = node.attributes.get_string("mode", "constant")
        return mode == "constant" and (value is None or not np.any(value)) and node.attributes.get("value") is None
    return False


def _pairs(graph: ir.Graph) -> list[_Pair]:
    pairs = []
    for node in graph:
        first = layer_of(node)
        if first is None or node.op_type != "Conv" or len(node.inputs[1].uses()) > 1:
            continue
        chain: list[ir.Node] = []
        reader = only_reader(node.outputs[0])
        while reader is not None and _commutes(reader) and len(chain) < 4:
            chain.append(reader)
            reader = only_reader(reader.outputs[0])
        second = layer_of(reader) if reader is not None else None
        if second is None or second.op != "Conv" or len(reader.inputs[1].uses()) > 1:
            continue
        if reader.inputs[0] is not (chain[-1].outputs[0] if chain else node.outputs[0]):
            continue
        channels = first.weight.shape[0]
        dense = second.groups == 1 and second.weight.shape[1] == channels
        depthwise = second.groups == channels and second.weight.shape[:2] == (channels, 1)
        if dense or depthwise:
            pairs.append(_Pair(first, chain, second))
    return pairs


def _input_ranges(w2: np.ndarray, depthwise: bool) -> np.ndarray:
    if depthwise:
        return np.abs(w2.reshape(w2.shape[0], -1)).max(axis=1)
    return np.abs(np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)).max(axis=1)


def _spread(pairs: list[_Pair], weights: dict[int, np.ndarray]) -> float:
    """Median over equalized layers of max/min of the per-output-channel weight ranges."""
    spreads = []
    for layer in {id(layer.node): layer for p in pairs for layer in (p.first, p.second)}.values():
        w = weights[id(layer.node)]
        r = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        if np.any(r > 0):
            spreads.append(float(r.max() / max(r[r > 0].min(), 1e-30)))
    return float(np.median(spreads)) if spreads else 1.0


def _bias(layer: Layer) -> np.ndarray:
    node = layer.node
    found = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return found if found is not None else np.zeros(layer.weight.shape[0], layer.weight.dtype)


def _pads(node: ir.Node) -> bool:
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    pads = node.attributes.get("pads")
    return pads is not None and any(p != 0 for p in pads.as_ints())


def _write(graph: ir.Graph, layer: Layer, weight: np.ndarray, bias: np.ndarray, tag: str) -> None:
    node = layer.node
    dtype = layer.weight.dtype
    base = node.name or node.outputs[0].name
    node.replace_input_with(1, add_initializer(graph, f"{base}.weight_{tag}", weight.astype(dtype)))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, add_initializer(graph, f"{base}.bias_{tag}", bias.astype(dtype)))
