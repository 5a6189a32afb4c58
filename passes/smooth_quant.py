"""smooth_quant: migrate activation outliers into the weights of MatMul/Gemm (SmoothQuant, Xiao et al. 2023).

For an activation X [..., K] feeding weights W [K, N], with per-channel maxima a_j = max|X_j| (measured on
the calibration data) and w_j = max_n |W_jn| (over every weight X feeds), s_j = a_j^α / w_j^(1-α) and
X·W = (X / s)·(diag(s)·W). Activations get flatter (easier per-tensor int8), weights absorb the range
(per-channel int8 handles it). 1/s is folded into a LayerNormalization that produces X, or through
attention into the value projection, when it can; else a Mul is inserted.
Activation ranges measured before are void afterwards (`invalidates`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxq.pass_base import ACTIVATION_STATS, Pass, PassConfig
from onnxq.qspec import Selector

from ._graph import add_initializer, constant_array, forget_names, is_constant
from ._scaling import divide_activation

WHERE = {"layernorm": "LayerNorm", "value_projection": "value projection", "mul": "Mul"}


class SmoothQuantConfig(PassConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 none, 1 all onto the weights")
    op_types: list[str] = Field(default_factory=lambda: ["MatMul", "Gemm"], description="ops whose inputs smooth")
    fold_scales: bool = Field(
        True,
        description="fold 1/s where it costs no run time: into a producing LayerNormalization, or for attention's "
        "output projection into the value projection's weights",
    )
    insert_mul: Literal["always", "after_norm", "never"] = Field(
        "always",
        description="where 1/s cannot fold, smooth anyway with a Mul (always), only activations a normalization "
        "produced (after_norm: the paper's QKV and FFN-up inputs), or not at all (never)",
    )
    ignore: list[Selector] = Field(
        default_factory=list,
        description="readers whose input is left unsmoothed (each smoothed activation costs a Mul at run time)",
    )


NORMALIZATIONS = frozenset(
    {
        "LayerNormalization",
        "RMSNormalization",
        "SkipLayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }
)


@dataclass
class _Target:
    """One activation and the (node, weight, layout) pairs that read it."""

    value: ir.Value
    uses: list[tuple[ir.Node, bool]] = field(default_factory=list)  # bool: weight is [N, K] (read when smoothing)


class SmoothQuant(Pass):
    """Migrate activation outliers into the weights of MatMul/Gemm (SmoothQuant, Xiao et al. 2023)."""

    name = "smooth_quant"
    Config = SmoothQuantConfig
    needs = frozenset({ACTIVATION_STATS})
    invalidates = frozenset({ACTIVATION_STATS})
    after = ("simplify", "fold_batchnorm")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets = self._targets(model.graph)
        if not targets:
            return ir.passes.PassResult(model, modified=False)
        maxima = self.context.channel_absmax(model, [t.value.name for t in targets])
        how: dict[str, int] = {}
        for target in targets:
            act_max = maxima.get(target.value.name)
            if act_max is None:
                continue
            done = self._smooth(model.graph, target, np.asarray(act_max, dtype=np.float64))
            if done is not None:
                how[done] = how.get(done, 0) + 1
        forget_names(model.graph)
        if how:
            self.context.notes.append(
                f"smooth_quant: smoothed {sum(how.values())} activations (alpha {self.config.alpha}; 1/s into "
                + ", ".join(f"{WHERE[k]} {v}" for k, v in sorted(how.items()))
                + ")"
            )
        return ir.passes.PassResult(model, modified=bool(how))

    def _targets(self, graph: ir.Graph) -> list[_Target]:
        found: dict[str, _Target] = {}
        for node in graph:
            if node.op_type not in self.config.op_types or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            if any(selector.matches(node) for selector in self.config.ignore):
                continue
            x, w_value = node.inputs[0], node.inputs[1]
            weight = constant_array(w_value)
            if x is None or weight is None or weight.ndim != 2 or is_constant(x):
                continue
            transposed = False
            if node.op_type == "Gemm":
                if node.attributes.get_int("transA", 0):
                    continue
                transposed = bool(node.attributes.get_int("transB", 0))
            found.setdefault(x.name, _Target(x)).uses.append((node, transposed))
        # every reader of X must be smoothed with the same s, unless a Mul isolates the smoothed ones
        return list(found.values())

    def _smooth(self, graph: ir.Graph, target: _Target, act_max: np.ndarray) -> str | None:
        """Smooth one activation; returns where 1/s went, or None when it was left alone."""
        k = act_max.shape[0]
        # read the weights now: smoothing an earlier activation may have rescaled them (value projections)
        weights = [constant_array(node.inputs[1]) for node, _ in target.uses]
        if any(w is None for w in weights):
            return None
        rows = [np.abs(w.T if transposed else w) for w, (_, transposed) in zip(weights, target.uses, strict=True)]
        if any(r.shape[0] != k for r in rows):
            return None
        w_max = np.max(np.stack([r.max(axis=1) for r in rows]), axis=0)
        alpha = self.config.alpha
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.power(act_max, alpha) / np.power(w_max, 1.0 - alpha)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        scale = np.clip(scale, 1e-5, 1e5)
        readers = [node for node, _ in target.uses]
        producer = target.value.producer()
        policy = self.config.insert_mul
        allow_mul = policy == "always" or (
            policy == "after_norm" and producer is not None and producer.op_type in NORMALIZATIONS
        )
        done = divide_activation(graph, target.value, readers, scale, self.config.fold_scales, allow_mul=allow_mul)
        if done is None:
            return None
        for weight, (node, transposed) in zip(weights, target.uses, strict=True):
            new = weight * (scale[None, :] if transposed else scale[:, None])
            base = node.inputs[1].name  # type: ignore[union-attr]
            node.replace_input_with(1, add_initializer(graph, f"{base}_smoothed", new.astype(weight.dtype)))
        return done
