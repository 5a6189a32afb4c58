"""upgrade_opset: raise the default-domain opset so the quantized form is expressible.

Per-channel QuantizeLinear/DequantizeLinear (`axis`) needs opset 13; int4/int16 and `block_size` need 21.
onnxruntime's quantizer writes per-channel Q/DQ into opset 11/12 models anyway and the result will not
load; we upgrade with onnx's version converter instead. Never downgrades.

From opset 13 to 25 the default domain only gained types and optional attributes or inputs, with one
exception: the Reduce ops took `axes` as an input from 18 on. Where that exception does not apply, raising
the opset import is the whole upgrade, and it skips the converter's protobuf round trip (0.7 s and two
model copies on all-MiniLM-L6-v2).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from pydantic import Field

from onnxq import ir as onnxq_ir
from onnxq.errors import OnnxqError
from onnxq.pass_base import Pass, PassConfig

from ._graph import default_opset, replace_model

ADDITIVE_OPSETS = range(13, 26)
AXES_INPUT_SINCE_18 = frozenset(
    {
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSumSquare",
    }
)


def import_bump_suffices(model: ir.Model, target: int) -> bool:
    """Whether setting the opset import to `target` alone keeps every node's meaning."""
    current = default_opset(model)
    if current not in ADDITIVE_OPSETS or target not in ADDITIVE_OPSETS:
        return False
    if current >= 18 or target < 18:
        return True
    return not any(
        node.op_type in AXES_INPUT_SINCE_18 and node.domain in ("", "ai.onnx")
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


class UpgradeOpsetConfig(PassConfig):
    target: int = Field(13, ge=7, le=23, description="lowest default-domain opset the model should have")


class UpgradeOpset(Pass):
    """Raise the default-domain opset so the quantized form is expressible."""

    name = "upgrade_opset"
    Config = UpgradeOpsetConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = default_opset(model)
        if current >= self.config.target:
            return ir.passes.PassResult(model, modified=False)
        if import_bump_suffices(model, self.config.target):
            if current < 18 <= self.config.target:
                _name_equal_splits(model)
            model.opset_imports.pop("ai.onnx", None)
            model.opset_imports[""] = self.config.target
            onnxq_ir.fix_ir_version(model)
            self.context.notes.append(f"upgraded opset {current} → {self.config.target}")
            return ir.passes.PassResult(model, modified=True)
        proto = onnxq_ir.proto_with_weights(model, f"upgrading from opset {current} to {self.config.target}")
        try:
            converted = onnx.version_converter.convert_version(proto, self.config.target)
        except Exception as exc:
            raise OnnxqError(
                f"cannot convert the model from opset {current} to {self.config.target} "
                f"({str(exc).splitlines()[0][:160]})",
                "re-export the model at a newer opset, or lower upgrade_opset.target",
            ) from None
        replace_model(model, onnxq_ir.from_proto(converted))
        self.context.notes.append(f"upgraded opset {current} → {self.config.target}")
        return ir.passes.PassResult(model, modified=True)


def _name_equal_splits(model: ir.Model) -> None:
    """An equal Split (no `split` sizes) must say how many parts from opset 18 on: num_outputs, the same split."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        sized = len(node.inputs) > 1 or "split" in node.attributes or "num_outputs" in node.attributes
        if node.op_type == "Split" and node.domain in ("", "ai.onnx") and not sized:
            node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))
