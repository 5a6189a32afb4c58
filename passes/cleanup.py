"""cleanup: remove dead nodes and initializers, sort, and make names unique: the last pass of a recipe.

onnx-ir's dead-code pass drops unused initializers of the main graph only; those of If branches and
Loop/Scan bodies (a float weight whose quantized copy replaced it) are dropped here too.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import (
    NameFixPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
    TopologicalSortPass,
)

from onnxq.pass_base import Pass, PassConfig

from ._graph import subgraphs
from ._half import restore_half_initializers


class Cleanup(Pass):
    """Remove dead nodes and initializers, sort, and make names unique: the last pass of a recipe."""

    name = "cleanup"
    Config = PassConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = RemoveUnusedNodesPass()(model).modified
        restored = restore_half_initializers(model)  # after dead code is gone: quantized weights are not kept
        if restored:
            self.context.notes.append(f"cleanup: {restored} initializers that stayed float are stored in half again")
        modified |= restored > 0
        for step in (RemoveUnusedOpsetsPass(), TopologicalSortPass(), NameFixPass()):
            modified |= step(model).modified
        modified |= _remove_unused_subgraph_initializers(model.graph) > 0
        return ir.passes.PassResult(model, modified=modified)


def _remove_unused_subgraph_initializers(graph: ir.Graph) -> int:
    removed = 0
    for sub in subgraphs(graph):
        signature = {id(v) for v in (*sub.inputs, *sub.outputs)}
        for name, value in list(sub.initializers.items()):
            if not value.uses() and id(value) not in signature:
                del sub.initializers[name]
                removed += 1
    return removed
