"""Annotations: what each node gets. Passes that *choose* write these; only lowering passes read them.

A `NodeQuant` sits in `node.meta[QSPEC_KEY]`. Rules are applied in order and later matches override
earlier fields, so a recipe can say "all Conv int8" and then "this one Conv skip".
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal

import onnx_ir as ir
from pydantic import BaseModel, ConfigDict, Field, field_validator

from onnxq.ir import is_constant

QSPEC_KEY = "onnxq.qspec"
# Set on the graph by annotating passes: "annotations were decided", even when no node got one.
ANNOTATED_KEY = "onnxq.annotated"

DType = Literal["int4", "uint4", "int8", "uint8", "int16", "uint16", "fp16", "fp32"]
Granularity = Literal["tensor", "channel", "block"]

# Ops whose weights and activations are worth integer kernels (DESIGN §11: the default target set).
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
# Ops that only move data: their output takes the input's scale, so onnxruntime runs them on integers.
SHARED_SCALE_OPS = frozenset(
    {
        "MaxPool",
        "Reshape",
        "Transpose",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Split",
        "Slice",
        "DepthToSpace",
        "SpaceToDepth",
        "Resize",
        "Gather",
        "Expand",
        "Tile",
        "Identity",
    }
)
# Ops with their own output scale, quantized only where a rule asks (they are cheap in float).
OWN_SCALE_OPS = frozenset(
    {
        "Add",
        "Mul",
        "AveragePool",
        "GlobalAveragePool",
        "Sigmoid",
        "LeakyRelu",
        "HardSigmoid",
        "Softmax",
        "ReduceMean",
        "Where",
        "ArgMax",
    }
)
# Activations that onnxruntime folds into the preceding integer kernel (ReluQuantFusion, ClipQuantFusion).
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
DEFAULT_TARGETS = sorted(COMPUTE_OPS | SHARED_SCALE_OPS)


def _bool_or_auto(schema: dict) -> None:  # type: ignore[type-arg]
    schema.pop("type", None)
    schema["anyOf"] = [{"type": "boolean"}, {"const": "auto"}]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantSpec(_Frozen):
    """How one tensor is represented. `fp16`/`fp32` keep it in float."""

    dtype: DType = "int8"
    granularity: Granularity = "tensor"
    axis: int | None = Field(None, description="channel axis; None picks the op's output-channel axis")
    block_size: int | None = Field(None, ge=16, le=256, description="elements per block (granularity=block)")
    symmetric: bool = False
    reduce_range: bool = Field(
        False,
        description="7-bit range for 8-bit types: avoids int16 saturation in x86 kernels without VNNI; 'auto' "
        "decides by this CPU (true on x86 without VNNI)",
        json_schema_extra=_bool_or_auto,
    )
    dynamic: bool = Field(
        False, description="activations: quantized at run time (DynamicQuantizeLinear, uint8); no calibration"
    )

    @field_validator("reduce_range", mode="before")
    @classmethod
    def _auto_range(cls, value: object) -> object:
        if value == "auto":
            from onnxq.cpu import int8_pairs_saturate

            return int8_pairs_saturate()
        return value

    @property
    def is_float(self) -> bool:
        return self.dtype in ("fp16", "fp32")


DEFAULT_ACTIVATIONS = QuantSpec(dtype="uint8", granularity="tensor", symmetric=False)
DEFAULT_WEIGHTS = QuantSpec(dtype="int8", granularity="channel", symmetric=True, reduce_range="auto")  # type: ignore[arg-type]


class NodeQuant(_Frozen):
    """The annotation of one node: its activation (inputs/outputs) and weight specs, or skip."""

    activations: QuantSpec = DEFAULT_ACTIVATIONS
    weights: QuantSpec = DEFAULT_WEIGHTS
    skip: bool = False
    frozen_by: str | None = Field(None, description="what fixed this spec (e.g. 'qat'); calibration keeps it")


class Selector(_Frozen):
    """Which nodes a rule applies to. Names may be exact or 're:<regex>' (searched, not anchored)."""

    op_types: list[str] | None = None
    names: list[str] | None = None
    # True: only nodes with a constant operand (a weight); False: only nodes without one, such as the
    # activation × activation MatMuls of attention, which are too small to gain from integer kernels.
    has_weight: bool | None = None

    @field_validator("names")
    @classmethod
    def _regexes_compile(cls, names: list[str] | None) -> list[str] | None:
        for name in names or []:
            if name.startswith("re:"):
                try:
                    re.compile(name[3:])
                except re.error as exc:
                    raise ValueError(f"bad regex {name!r}: {exc}") from None
        return names

    @cached_property
    def _patterns(self) -> list[re.Pattern[str]]:
        return [re.compile(n[3:]) for n in self.names or [] if n.startswith("re:")]

    def matches(self, node: ir.Node) -> bool:
        if self.op_types is not None and node.op_type not in self.op_types:
            return False
        if self.has_weight is not None and any(is_constant(v) for v in node.inputs) != self.has_weight:
            return False
        if self.names is not None:
            name = node.name or ""
            exact = {n for n in self.names if not n.startswith("re:")}
            if name not in exact and not any(p.search(name) for p in self._patterns):
                return False
        return True


class Rule(Selector):
    """A selector plus the fields it sets; unset fields keep what earlier rules gave."""

    activations: QuantSpec | None = None
    weights: QuantSpec | None = None
    skip: bool | None = None

    def apply(self, current: NodeQuant | None, base: NodeQuant) -> NodeQuant:
        spec = current or base
        updates = {k: getattr(self, k) for k in ("activations", "weights", "skip") if getattr(self, k) is not None}
        return spec.model_copy(update=updates)


def get_qspec(node: ir.Node) -> NodeQuant | None:
    return node.meta.get(QSPEC_KEY)


def set_qspec(node: ir.Node, spec: NodeQuant | None) -> None:
    if spec is None:
        node.meta.pop(QSPEC_KEY, None)
    else:
        node.meta[QSPEC_KEY] = spec
