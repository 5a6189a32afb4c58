"""StatsStore: calibration results on disk, keyed by what they depend on, so a rerun skips calibration.

The key is a hash of the model as calibrated (graph and weights), the collector settings, the data
(file contents or the synthetic seed) and the tensors kept exact. A JSON file holds any number of
entries; it is rewritten atomically. The same file keeps other measurements that are slow to repeat and
depend only on what their key says (mixed_precision's latency costs), under `measurements`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxq.errors import UsageError
from onnxq.pass_base import TensorRange

VERSION = 1


def stats_key(model_fingerprint: str, settings: dict[str, Any], data_fingerprint: str, exact: list[str]) -> str:
    blob = json.dumps([model_fingerprint, settings, data_fingerprint, sorted(exact)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def data_fingerprint(source: str | os.PathLike, num_samples: int | None, seed: int) -> str:
    """Content hash of the calibration files (streamed), or the synthetic reader's parameters."""
    if str(source) == "synthetic":
        return f"synthetic:{seed}:{num_samples}"
    path = Path(source)
    if not path.exists():  # module:function: its output cannot be fingerprinted without running it
        return f"callable:{source}:{num_samples}:{os.urandom(8).hex()}"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256(f"{num_samples}".encode())
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:24]


@dataclass
class StatsStore:
    path: Path
    explicit: bool = False  # given with --stats: entries are used even if the model or data changed
    deferred: bool = False  # keep new entries in memory until `commit` (a run writes all its files together)
    _pending: dict[str, Any] | None = field(default=None, repr=False)

    def _read(self) -> dict[str, Any]:
        if self._pending is not None:
            return self._pending
        if not self.path.exists():
            if self.explicit:
                raise UsageError(
                    f"statistics file '{self.path}' does not exist",
                    "pass a .calib.json written by an earlier onnxq run, or drop --stats",
                )
            return {"version": VERSION, "entries": {}}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            raise UsageError(
                f"statistics file '{self.path}' is not valid JSON",
                "delete it (it will be recomputed) or pass another --stats file",
            ) from None
        if data.get("version") != VERSION:
            return {"version": VERSION, "entries": {}}
        return data

    def lookup(self, key: str, names: list[str], method: str) -> tuple[dict[str, TensorRange], bool] | None:
        """Ranges for all `names` under `key` (exact match), or, for an explicit file, any entry of the
        same method that covers them. The flag says whether the match was exact."""
        entries = self._read()["entries"]
        candidates = [(entries[key], True)] if key in entries else []
        if self.explicit:
            candidates += [(e, False) for k, e in entries.items() if k != key and e.get("method") == method]
        for entry, exact in candidates:
            ranges = entry["ranges"]
            if all(n in ranges for n in names):
                return {n: TensorRange(*ranges[n]) for n in names}, exact
        return None

    def save(self, key: str, method: str, ranges: dict[str, TensorRange]) -> None:
        data = self._read() if self._pending is not None or self.path.exists() else {"version": VERSION, "entries": {}}
        entry = data["entries"].setdefault(key, {"method": method, "ranges": {}})
        entry["ranges"].update({n: [r.min, r.max] for n, r in ranges.items()})
        self._write(data)

    def measurement(self, key: str) -> dict[str, float] | None:
        """A measurement saved under `key` (exact match only: a latency from another machine is no use)."""
        if self._pending is None and not self.path.exists():
            return None
        return self._read().get("measurements", {}).get(key)

    def save_measurement(self, key: str, value: dict[str, float]) -> None:
        data = self._read() if self._pending is not None or self.path.exists() else {"version": VERSION, "entries": {}}
        data.setdefault("measurements", {})[key] = value
        self._write(data)

    def _write(self, data: dict[str, Any]) -> None:
        if self.deferred:
            self._pending = data
            return
        self.commit(data)

    def commit(self, data: dict[str, Any] | None = None) -> Path | None:
        """Write the statistics (the pending ones of a deferred store); None when there is nothing to write."""
        from onnxq.outputs import write_text

        data = data if data is not None else self._pending
        if data is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return write_text(self.path, json.dumps(data))
