"""assign_precision: turn the recipe's rules into per-node QuantSpec annotations (no graph change).

Each rule selects nodes (`op_types`, `names`, `re:` regexes) and sets fields; rules apply in order and
later matches override earlier ones. With no rules, the default targets are the compute ops and the
data-movement ops around them (DESIGN §11): Add/Mul stay float unless a rule names them. Ops outside the
ONNX standard (a custom domain, onnxruntime's com.microsoft contrib ops, an op ONNX does not define) are
never lowered; the run's notes name them in one line.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_ir as ir
from pydantic import Field

from onnxq.pass_base import Pass, PassConfig
from onnxq.qspec import ANNOTATED_KEY, DEFAULT_TARGETS, Rule, Selector, get_qspec, set_qspec


class AssignPrecisionConfig(PassConfig):
    targets: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="op types annotated with the recipe defaults before rules apply",
    )
    rules: list[Rule] = Field(default_factory=list, description="ordered overrides; later matches win")
    ignore: list[Selector] = Field(default_factory=list, description="nodes kept in float whatever else says")


class AssignPrecision(Pass):
    """Turn the recipe's rules into per-node QuantSpec annotations (no graph change)."""

    name = "assign_precision"
    Config = AssignPrecisionConfig
    after = ("simplify", "fold_batchnorm")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        base = self.context.defaults
        targets = set(self.config.targets)
        count = 0
        foreign: Counter[str] = Counter()
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if _non_standard(node):
                foreign[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
            existing = get_qspec(node)
            if existing is not None and existing.frozen_by:
                continue  # fixed by training (QAT) or the user; rules never overwrite it
            spec = base if node.op_type in targets and node.domain in ("", "ai.onnx") else None
            for rule in self.config.rules:
                if rule.matches(node):
                    spec = rule.apply(spec, base)
            if spec is not None and any(sel.matches(node) for sel in self.config.ignore):
                spec = spec.model_copy(update={"skip": True})
            set_qspec(node, spec)
            count += spec is not None and not spec.skip
        model.graph.meta[ANNOTATED_KEY] = True
        if foreign:
            ops = ", ".join(f"{label}×{n}" for label, n in sorted(foreign.items()))
            total = _count(sum(foreign.values()), "op")
            self.context.notes.append(f"assign_precision: {total} outside the ONNX standard kept in float: {ops}")
        return ir.passes.PassResult(model, modified=count > 0)


def _non_standard(node: ir.Node) -> bool:
    """A custom-domain or contrib op, or a default-domain op ONNX does not define."""
    if node.domain in ("", "ai.onnx"):
        return not onnx.defs.has(node.op_type)
    return node.domain != "ai.onnx.ml"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
