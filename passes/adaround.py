"""adaround: learn each weight's rounding (up or down) from calibration data (AdaRound, Nagel et al. 2020).

Round-to-nearest minimizes each weight's own error, not the layer's output error. For a layer y = W·x with
rows w (one output channel), scale s and zero point z, AdaRound picks q = clip(⌊w/s⌋ + z + h, qmin, qmax)
with h ∈ {0, 1} per element to minimize the output error over the calibration inputs:

    E‖(W̃ − W)·x‖² = Σ_rows (w̃ − w)ᵀ H (w̃ − w),   H = E[x xᵀ],   w̃ = s·(q − z)

H is measured once per layer (patches of the Conv's input: passes/_measure.py). h is relaxed to the
rectified sigmoid h(V) = clip(σ(V)·(ζ − γ) + γ, 0, 1), ζ = 1.1, γ = −0.1, started at the fractional part
(so the first iterate is the float weight), and V is trained by Adam on

    L(V) = tr(Δ H Δᵀ) / L_rtn + λ · mean(1 − |2h − 1|^β),   Δ = s·(q(V) − z) − W

with the analytic gradient ∂L/∂Δ = 2ΔH / L_rtn, ∂Δ/∂h = s (zero where clipped), ∂h/∂V = (ζ − γ)·σ(1 − σ)
(zero where rectified). The first `warmup` share of the iterations has λ = 0; then β is annealed from 20 to
2, pushing every h to 0 or 1. The result is rounded hard (h ≥ ½); a layer where that does not beat
round-to-nearest's output error keeps round-to-nearest. The element at each row's extremes keeps its
round-to-nearest code, so the scale the lowering derives from the rounded weight is the scale used here.

The pass writes the rounded weights back in float, on the exact grid of the layer's annotation: insert_qdq
(or quantize_dynamic) then reproduces the learned integers bit for bit. Symmetric weights, per tensor or
per channel, int8/int4 (and their unsigned forms); Conv (any group count), MatMul and Gemm.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq import qmath
from onnxq.pass_base import Pass, PassConfig
from onnxq.progress import progress
from onnxq.qspec import QuantSpec, get_qspec

from ._graph import add_initializer, forget_names
from ._measure import FLOAT_WEIGHT_KEY, ROUNDED_KEY, Layer, layer_grams, layer_of

ZETA, GAMMA = 1.1, -0.1


class AdaRoundConfig(PassConfig):
    iterations: int = Field(1000, ge=1, le=100_000, description="Adam steps per layer")
    learning_rate: float = Field(0.05, gt=0, description="Adam step size on V")
    regularization: float = Field(
        10.0, ge=0, description="λ: weight of the push towards 0/1 roundings (against the output error, RTN = 1)"
    )
    warmup: float = Field(0.2, ge=0, lt=1, description="share of the iterations without the rounding push")
    samples: int | None = Field(
        None, ge=1, description="calibration samples for H = E[x xᵀ] (default: the recipe's num_samples)"
    )
    rows_per_sample: int = Field(2048, ge=16, description="input rows (Conv patches) used per sample for H")
    max_rank: int = Field(
        256, ge=8, description="above this input size K, iterate on H's top eigenvectors (cost m·K·r, not m·K²)"
    )
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "MatMul", "Gemm"], description="ops to round")
    max_inputs: int = Field(
        8192, ge=1, description="layers whose rows sum over more inputs K keep round-to-nearest (H is K×K)"
    )
    budget_mb: float = Field(1024.0, gt=0, description="memory for the H matrices measured in one pass")


class AdaRound(Pass):
    """Learn each weight's rounding from calibration data (AdaRound): the layer's output error, not the weight's."""

    name = "adaround"
    Config = AdaRoundConfig
    after = ("assign_precision", "fold_batchnorm", "equalize", "simplify")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets, skipped = self._targets(model.graph)
        if skipped:
            self.context.notes.append(f"adaround: {skipped}")
        if not targets:
            self.context.notes.append("adaround: no Conv/MatMul/Gemm with symmetric integer weights to round")
            return ir.passes.PassResult(model, modified=False)
        gains: list[float] = []
        with self.context._timed("adaround"), progress(self.context.show_progress, "adaround", len(targets)) as advance:
            for group in _budgeted(targets, self.config.budget_mb):
                layers = [layer for layer, _ in group]
                grams = layer_grams(model, self.context, layers, self.config.samples, self.config.rows_per_sample)
                for (layer, spec), gram in zip(group, grams, strict=True):
                    gains.append(self._round(model.graph, layer, spec, gram))
                    advance(1)
                del grams
        forget_names(model.graph)
        improved = [g for g in gains if g < 1.0]
        median = float(np.median(improved)) if improved else 1.0
        self.context.notes.append(
            f"adaround: {len(improved)} of {len(targets)} layers rounded by learning "
            f"(median layer-output error {median:.2f}× round-to-nearest's)"
        )
        self.context.artifacts.setdefault("adaround", {})["error_vs_rtn"] = gains
        return ir.passes.PassResult(model, modified=bool(improved))

    def _targets(self, graph: ir.Graph) -> tuple[list[tuple[Layer, QuantSpec]], str]:
        targets: list[tuple[Layer, QuantSpec]] = []
        asymmetric, shared, wide = 0, 0, 0
        for node in graph:
            spec = get_qspec(node)
            if spec is None or spec.skip or node.op_type not in self.config.op_types:
                continue
            w = spec.weights
            if w.is_float or w.granularity == "block" or w.dtype not in ("int8", "uint8", "int4", "uint4"):
                continue
            layer = layer_of(node)
            if layer is None or (w.axis is not None and w.axis % layer.weight.ndim != layer.row_axis):
                continue
            if not w.symmetric:
                asymmetric += 1
                continue
            if len(node.inputs[1].uses()) > 1:
                shared += 1
                continue
            if layer.rows().shape[2] > self.config.max_inputs:
                wide += 1
                continue
            targets.append((layer, w))
        notes = []
        if asymmetric:
            notes.append(f"{asymmetric} asymmetric weights kept round-to-nearest (only symmetric grids are learned)")
        if shared:
            notes.append(f"{shared} weights read by several ops kept round-to-nearest")
        if wide:
            notes.append(f"{wide} layers over {self.config.max_inputs} inputs kept round-to-nearest (max_inputs)")
        return targets, "; ".join(notes)

    def _round(self, graph: ir.Graph, layer: Layer, spec: QuantSpec, gram: np.ndarray) -> float:
        weight = layer.weight.astype(np.float32)
        axis = None if spec.granularity == "tensor" else layer.row_axis
        _, scale, zero = qmath.quantize_weight(weight, spec.dtype, spec.symmetric, axis, spec.reduce_range)
        qmin, qmax = qmath.qrange(spec.dtype, spec.symmetric, spec.reduce_range)
        rows = layer.rows(weight)
        shape = (rows.shape[0], rows.shape[1], 1)
        per = shape if axis is not None else (1, 1, 1)
        s = np.broadcast_to(np.asarray(scale, np.float32).reshape(per), shape).copy()
        z = np.broadcast_to(np.asarray(zero, np.float32).reshape(per), shape).copy()
        q, ratio = learn_rounding(
            rows,
            s,
            z,
            qmin,
            qmax,
            gram.astype(np.float32),
            iterations=self.config.iterations,
            learning_rate=self.config.learning_rate,
            regularization=self.config.regularization,
            warmup=self.config.warmup,
            factor=low_rank(gram, self.config.max_rank) if gram.shape[-1] > 2 * self.config.max_rank else None,
        )
        if ratio >= 1.0:
            return ratio
        rounded = layer.from_rows((s * (q - z)).astype(np.float32))
        base = layer.node.name or layer.node.outputs[0].name
        layer.node.replace_input_with(1, add_initializer(graph, f"{base}.weight_adaround", rounded))
        layer.node.meta[ROUNDED_KEY] = "adaround"
        layer.node.meta[FLOAT_WEIGHT_KEY] = weight
        return ratio


def _budgeted(targets: list[tuple[Layer, QuantSpec]], budget_mb: float) -> list[list[tuple[Layer, QuantSpec]]]:
    """Consecutive groups of layers whose H matrices ([g, K, K] float64) fit in `budget_mb` together: one
    onnxruntime pass per group, and memory bounded by the budget, not by the model (VGG16's classifier alone
    has K = 25088: a 5 GB H)."""
    groups: list[list[tuple[Layer, QuantSpec]]] = [[]]
    used = 0.0
    for target in targets:
        g, _, k = target[0].rows().shape
        size = g * k * k * 8 / 2**20
        if groups[-1] and used + size > budget_mb:
            groups.append([])
            used = 0.0
        groups[-1].append(target)
        used += size
    return [group for group in groups if group]


def output_error(delta: np.ndarray, gram: np.ndarray) -> float:
    """Σ over rows of δᵀ H δ for δ [g, m, K] and H [g, K, K]: the layer's mean squared output error."""
    return float(np.einsum("gmk,gmk->", np.matmul(delta, gram), delta, dtype=np.float64))


def low_rank(gram: np.ndarray, rank: int) -> np.ndarray:
    """F [g, K, r] with F Fᵀ ≈ H from H's top eigenvectors: ΔH becomes (ΔF)Fᵀ, 2·m·K·r per step instead of
    m·K². Input second moments of real layers are dominated by few directions (what is dropped is reported
    by the final check against round-to-nearest on the full H)."""
    values, vectors = np.linalg.eigh(gram.astype(np.float64))
    values, vectors = values[:, ::-1][:, :rank], vectors[:, :, ::-1][:, :, :rank]
    return (vectors * np.sqrt(np.maximum(values, 0.0))[:, None, :]).astype(np.float32)


class _Quadratic:
    """δ ↦ δH for a full H [g, K, K] or a factor F [g, K, r] (δH ≈ (δF)Fᵀ)."""

    def __init__(self, gram: np.ndarray, factor: np.ndarray | None = None) -> None:
        self.gram, self.factor = gram, factor

    def apply(self, delta: np.ndarray) -> np.ndarray:
        if self.factor is not None:
            return np.matmul(np.matmul(delta, self.factor), self.factor.transpose(0, 2, 1))
        return np.matmul(delta, self.gram)


def learn_rounding(
    w: np.ndarray,
    s: np.ndarray,
    z: np.ndarray,
    qmin: int,
    qmax: int,
    gram: np.ndarray,
    *,
    iterations: int = 1000,
    learning_rate: float = 0.05,
    regularization: float = 10.0,
    warmup: float = 0.2,
    factor: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """AdaRound on one layer: weights w [g, m, K] with scales/zero points s, z [g, m, 1] and H [g, K, K].
    Returns the integer codes (as float) and their output error relative to round-to-nearest's (< 1: better).
    With `factor` (F Fᵀ ≈ H, see low_rank) the iterations use F; the result is still judged on the full H."""
    quadratic = _Quadratic(gram, factor)
    x = w / s
    floor = np.floor(x)
    rtn = np.clip(np.rint(x) + z, qmin, qmax)
    reference = output_error(s * (rtn - z) - w, gram)
    if reference <= 0:
        return rtn, 1.0
    # Each row's extremes keep their code, so the scale recomputed from the rounded row is unchanged.
    absolute = np.abs(x)
    fixed = absolute >= absolute.max(axis=2, keepdims=True) * (1 - 1e-6)
    rest = np.clip((x - floor - GAMMA) / (ZETA - GAMMA), 1e-3, 1 - 1e-3)
    v = np.log(rest / (1 - rest)).astype(np.float32)
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    start = int(iterations * warmup)
    count = v.size
    for step in range(iterations):
        sig = 1.0 / (1.0 + np.exp(-v))
        stretched = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(stretched, 0.0, 1.0)
        soft = floor + z + h
        inside = (soft >= qmin) & (soft <= qmax)
        delta = s * (np.clip(soft, qmin, qmax) - z) - w
        grad_h = 2.0 * quadratic.apply(delta) * s * inside / reference
        if step >= start and regularization > 0:
            beta = 20.0 + (2.0 - 20.0) * (step - start) / max(iterations - start - 1, 1)
            a = 2.0 * h - 1.0
            grad_h -= regularization * 2.0 * beta * np.abs(a) ** (beta - 1.0) * np.sign(a) / count
        grad_v = grad_h * ((stretched > 0) & (stretched < 1)) * sig * (1 - sig) * (ZETA - GAMMA)
        grad_v[fixed] = 0.0
        m1 = b1 * m1 + (1 - b1) * grad_v
        m2 = b2 * m2 + (1 - b2) * grad_v * grad_v
        t = step + 1
        v -= (learning_rate * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)).astype(np.float32)
    hard = np.clip(floor + z + (v >= 0), qmin, qmax)
    hard[fixed] = rtn[fixed]
    ratio = output_error(s * (hard - z) - w, gram) / reference
    return (hard, ratio) if ratio < 1.0 else (rtn, 1.0)
