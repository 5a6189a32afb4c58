"""upgrade_opset: raise the default-domain opset so the quantized form is expressible.

Per-channel QuantizeLinear/DequantizeLinear (`axis`) needs opset 13; int4/int16 and `block_size` need 21.
onnxruntime's quantizer writes per-channel Q/DQ into opset 11/12 models anyway and the result will not
load; we upgrade with onnx's version converter instead. Never downgrades.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from pydantic import Field

from onnxq import ir as onnxq_ir
from onnxq.errors import OnnxqError
from onnxq.pass_base import Pass, PassConfig

from ._graph import default_opset, replace_model


class UpgradeOpsetConfig(PassConfig):
    target: int = Field(13, ge=7, le=23, description="lowest default-domain opset the model should have")


class UpgradeOpset(Pass):
    name = "upgrade_opset"
    Config = UpgradeOpsetConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = default_opset(model)
        if current >= self.config.target:
            return ir.passes.PassResult(model, modified=False)
        proto = onnxq_ir.to_proto(model)
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
