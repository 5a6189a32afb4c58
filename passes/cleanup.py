"""cleanup: remove dead nodes and initializers, sort, and make names unique: the last pass of a recipe."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    NameFixPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from onnxq.pass_base import Pass, PassConfig


class Cleanup(Pass):
    name = "cleanup"
    Config = PassConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for step in (RemoveUnusedNodesPass(), RemoveUnusedOpsetsPass(), TopologicalSortPass(), NameFixPass()):
            modified |= step(model).modified
        return ir.passes.PassResult(model, modified=modified)
