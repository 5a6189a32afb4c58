"""The pass contract: an onnx-ir InPlacePass with a typed config and declared dependencies.

Any onnxq pass can be dropped into a user's own `onnx_ir.passes.PassManager`; what it needs beyond the
model (calibration data, statistics, defaults) comes in a `PassContext`, never from a global.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from onnxq.errors import UsageError
from onnxq.qspec import DEFAULT_ACTIVATIONS, DEFAULT_WEIGHTS, NodeQuant

Feeds = dict[str, np.ndarray]
# Stats kinds a pass can declare in `needs` / `invalidates`.
ACTIVATION_STATS = "activation_stats"


class PassConfig(BaseModel):
    """Base of every pass's `Config`: unknown keys are errors, and a config never changes once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)


CALIB_FIX = (
    "pass --calib DATA.npz (arrays keyed by input name), or --calib synthetic for a smoke run; in Python, "
    "PassContext(calibration_data=onnxq.calibration.open_data('calib.npz', onnxq.calibration.input_specs(model)))"
)


@dataclass
class TensorRange:
    """Calibrated range of one activation tensor."""

    min: float
    max: float


@dataclass
class PassContext:
    """What passes may use besides the model. Build one per pipeline run.

    `calibration_data` is a callable returning a fresh iterator of feed batches (so a pass can re-read
    the data). With a `stats_store` (a calibration.store.StatsStore) ranges computed before for the same
    model, settings and data (`data_fingerprint`) are reused instead of running onnxruntime again.
    """

    defaults: NodeQuant = field(
        default_factory=lambda: NodeQuant(activations=DEFAULT_ACTIVATIONS, weights=DEFAULT_WEIGHTS)
    )
    calibration_data: Callable[[], Iterator[Feeds]] | None = None
    calibration_settings: dict[str, Any] = field(default_factory=dict)
    ranges: dict[str, TensorRange] = field(default_factory=dict)
    stats_fingerprint: str | None = None
    stats_store: Any | None = None
    data_fingerprint: str | None = None
    show_progress: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # structured results a pass wants in the report (e.g. mixed_precision's plan and Pareto front)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def activation_ranges(
        self, model: ir.Model, names: Iterable[str], exact: Iterable[str] = ()
    ) -> dict[str, TensorRange]:
        """Ranges for `names`, collecting those not yet known with one onnxruntime pass over the data.
        Names in `exact` get their true min-max whatever the method (clipping them would change results)."""
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self.ranges]
        if missing:
            self.ranges.update(self._collect(model, missing, [n for n in exact if n in set(missing)]))
        return {n: self.ranges[n] for n in wanted if n in self.ranges}

    def _collect(self, model: ir.Model, names: list[str], exact: list[str]) -> dict[str, TensorRange]:
        key = None
        if self.stats_store is not None:
            from onnxq.calibration.store import stats_key
            from onnxq.ir import model_fingerprint

            # how the work is split does not change the result, so it is not part of the key
            settings = {k: v for k, v in self.calibration_settings.items() if k not in ("batch_size", "workers")}
            key = stats_key(model_fingerprint(model), settings, self.data_fingerprint or "none", exact)
            found = self.stats_store.lookup(key, names, settings.get("method", "minmax"))
            if found is not None:
                ranges, same = found
                self.notes.append(
                    f"calibration: reused {len(ranges)} ranges from {self.stats_store.path}"
                    + ("" if same else " (computed for another model or data version: explicit --stats)")
                )
                self.stats_fingerprint = key
                return ranges
        if self.calibration_data is None:
            raise UsageError(
                f"{len(names)} activation tensors need calibration statistics and no data was given",
                CALIB_FIX,
            )
        from onnxq.calibration.session import collect_ranges

        with self._timed("calibration"):
            found_ranges, fingerprint = collect_ranges(
                model,
                names,
                self.calibration_data,
                exact=frozenset(exact),
                show_progress=self.show_progress,
                **self.calibration_settings,
            )
        self.stats_fingerprint = key or fingerprint
        if self.stats_store is not None and key is not None:
            self.stats_store.save(key, self.calibration_settings.get("method", "minmax"), found_ranges)
        return found_ranges

    def channel_absmax(self, model: ir.Model, names: Iterable[str]) -> dict[str, Any]:
        """Per-channel (last axis) max |x| of each tensor over the calibration data: one onnxruntime pass."""
        return self._tensor_statistic(model, list(names), "channel_absmax", "per-channel activation statistics")

    def gram(self, model: ir.Model, names: Iterable[str], budget_mb: float = 1024.0) -> Iterator[dict[str, Any]]:
        """E[x xᵀ] over the rows of each tensor (last axis = features), yielded in groups whose matrices
        fit in `budget_mb` together: one onnxruntime pass per group, so memory stays bounded on big models
        and a consumer can finish one group (GPTQ) before the next is computed."""
        groups: list[list[str]] = [[]]
        used = 0.0
        for name in dict.fromkeys(names):
            size = _last_dim(model, name) ** 2 * 8 / 2**20
            if groups[-1] and used + size > budget_mb:
                groups.append([])
                used = 0.0
            groups[-1].append(name)
            used += size
        for group in groups:
            if group:
                yield self._tensor_statistic(model, group, "gram", "second-moment (Hessian) statistics")

    def _tensor_statistic(self, model: ir.Model, names: list[str], method: str, what: str) -> dict[str, Any]:
        if self.calibration_data is None:
            raise UsageError(f"{what} need calibration data", CALIB_FIX)
        from onnxq.calibration.session import collect_ranges

        settings = {k: v for k, v in self.calibration_settings.items() if k in ("batch_size", "workers", "num_samples")}
        with self._timed("calibration"):
            found, _ = collect_ranges(
                model, names, self.calibration_data, method=method, show_progress=self.show_progress, **settings
            )
        return found  # type: ignore[return-value]

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - started

    def invalidate(self, what: Iterable[str]) -> None:
        if ACTIVATION_STATS in set(what):
            self.ranges.clear()
            self.stats_fingerprint = None


def _last_dim(model: ir.Model, name: str) -> int:
    """Size of the feature axis of a tensor, from its recorded shape (1 when unknown: it is only a budget)."""
    values = [*model.graph.inputs, *(out for node in model.graph for out in node.outputs)]
    for value in values:
        if value.name == name and value.shape is not None and value.shape.rank() and isinstance(value.shape[-1], int):
            return value.shape[-1]
    return 1


class Pass(ir.passes.InPlacePass):
    """Base for onnxq passes.

    Subclasses set `name`, `Config`, and optionally `needs`, `invalidates`, `after` (names of passes
    that must run earlier when both are in a recipe; checked, never silently reordered) and `lowers`
    (rewrites the graph from annotations; `--dry-run` stops before the first such pass).
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    needs: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    after: ClassVar[tuple[str, ...]] = ()
    lowers: ClassVar[bool] = False

    def __init__(
        self, config: PassConfig | dict[str, Any] | None = None, context: PassContext | None = None, **fields: Any
    ) -> None:
        super().__init__()
        if isinstance(config, PassConfig):
            self.config = config
        else:
            self.config = self.Config.model_validate({**(config or {}), **fields})
        self.context = context or PassContext()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def apply(pass_: ir.passes.PassBase, model: Any) -> Any:
    """Run one pass on a ModelProto, a path or an ir.Model; returns the same kind it was given (a path
    gives back an ir.Model, since the input file is never written)."""
    import onnx

    from onnxq import ir as onnxq_ir

    if isinstance(model, onnx.ModelProto):
        result = pass_(onnxq_ir.from_proto(model)).model
        return onnxq_ir.to_proto(result)
    if isinstance(model, ir.Model):
        return pass_(model).model
    return pass_(onnxq_ir.load(model)).model
