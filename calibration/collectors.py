"""Streaming, mergeable statistics collectors. Memory is independent of the number of samples.

A collector sees per-batch reductions computed in-graph by onnxruntime (`min`, `max` of each tensor), so
Python never holds whole activations. `merge` is what lets collection shard across processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxq.pass_base import TensorRange


@dataclass
class MinMaxCollector:
    """Running min and max of each tensor over all samples."""

    reductions = ("min", "max")
    mins: dict[str, float] = field(default_factory=dict)
    maxs: dict[str, float] = field(default_factory=dict)

    def update(self, name: str, reduced: dict[str, np.ndarray]) -> None:
        lo, hi = float(np.min(reduced["min"])), float(np.max(reduced["max"]))
        self.mins[name] = min(lo, self.mins.get(name, lo))
        self.maxs[name] = max(hi, self.maxs.get(name, hi))

    def merge(self, other: MinMaxCollector) -> MinMaxCollector:
        merged = MinMaxCollector(dict(self.mins), dict(self.maxs))
        for name, lo in other.mins.items():
            merged.mins[name] = min(lo, merged.mins.get(name, lo))
        for name, hi in other.maxs.items():
            merged.maxs[name] = max(hi, merged.maxs.get(name, hi))
        return merged

    def result(self) -> dict[str, TensorRange]:
        return {name: TensorRange(self.mins[name], self.maxs[name]) for name in self.mins}


COLLECTORS = {"minmax": MinMaxCollector}
