"""simplify: onnxsim constant folding and clean-up, with weights in `Constant` nodes made initializers.

PP-OCR and many older exports keep their weights in Constant nodes; a quantizer that does not lift them
quantizes weights as if they were activations. onnxsim is run without its BatchNorm fusion so that
`fold_batchnorm` stays the one place that does it, and without its batched MatMul+Add → Gemm fusion: on a
3-D activation (every transformer) that wraps each Gemm in Reshape/Shape/Slice/Concat, 60 extra nodes on
all-MiniLM-L6-v2, and onnxruntime, which fuses MatMul+Add itself, ran the result ~8% slower.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
from pydantic import Field

from onnxq import ir as onnxq_ir
from onnxq.pass_base import Pass, PassConfig

from ._graph import replace_model

# onnx-optimizer passes that make the graph slower on onnxruntime (see the module docstring).
SKIPPED_OPTIMIZERS = ("fuse_matmul_add_bias_into_gemm_batched",)


class SimplifyConfig(PassConfig):
    onnxsim: bool = Field(True, description="run onnxsim (constant folding, dead code, redundant ops)")
    lift_constants: bool = Field(True, description="turn tensor-valued Constant nodes into initializers")
    strict: bool = Field(False, description="fail when onnxsim fails, instead of going on unsimplified")


class Simplify(Pass):
    name = "simplify"
    Config = SimplifyConfig
    after = ("upgrade_opset",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if self.config.onnxsim:
            modified |= self._onnxsim(model)
        if self.config.lift_constants:
            modified |= LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model).modified
            modified |= RemoveUnusedNodesPass()(model).modified
        return ir.passes.PassResult(model, modified=modified)

    def _onnxsim(self, model: ir.Model) -> bool:
        import onnxsim

        before = model.graph.num_nodes()
        try:
            simplified, _ = onnxsim.simplify(
                onnxq_ir.to_proto(model),
                check_n=0,
                skip_fuse_bn=True,
                skipped_optimizers=list(SKIPPED_OPTIMIZERS),
            )
        except Exception as exc:  # onnxsim raises RuntimeError/ValueError/protobuf errors alike
            if self.config.strict:
                raise
            self.context.notes.append(f"simplify: onnxsim failed ({str(exc).splitlines()[0][:120]}); kept the graph")
            return False
        replace_model(model, onnxq_ir.from_proto(simplified))
        after = model.graph.num_nodes()
        if after != before:
            self.context.notes.append(f"simplify: {before} → {after} nodes")
        return True
