"""Shared bench plumbing: isolated child processes (so peak RSS is each quantizer's own), timing, metrics."""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _child(fn: Callable[..., Any], args: tuple, queue: mp.Queue, memory_cap_gb: float | None = None) -> None:
    if memory_cap_gb:
        # A peer that keeps every activation must fail alone, not take the machine down with it.
        cap = int(memory_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        cwd = tempfile.mkdtemp(prefix="onnxq-bench-")  # quantizers that litter write here, not in the repo
        os.chdir(cwd)
        started = time.perf_counter()
        value = fn(*args)
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        queue.put(("ok", value, seconds, peak_mb))
    except BaseException as exc:  # report, never hang the parent
        queue.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", 0.0, 0.0))


def isolated(
    fn: Callable[..., Any], *args: Any, timeout: float = 1800, memory_cap_gb: float | None = None
) -> dict[str, Any]:
    """Run fn(*args) in a fresh spawned process; returns value, wall seconds and peak RSS (MB) of that process.
    `memory_cap_gb` limits its address space (MemoryError instead of swapping the machine to death)."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue, memory_cap_gb))
    proc.start()
    try:
        status, value, seconds, peak = queue.get(timeout=timeout)
    except Exception:
        peak_mb = _peak_rss_mb(proc.pid)
        proc.kill()
        proc.join()
        if memory_cap_gb and peak_mb >= 0.8 * memory_cap_gb * 1024:
            return {"error": f"out of memory (peak {peak_mb / 1024:.1f} GB at the {memory_cap_gb:g} GB cap)"}
        return {"error": f"no result within {timeout:.0f} s (peak {peak_mb:.0f} MB)"}
    proc.join()
    if status != "ok":
        return {"error": value}
    return {"value": value, "seconds": seconds, "peak_rss_mb": peak}


def _peak_rss_mb(pid: int | None) -> float:
    """Peak resident memory of a live process, from /proc (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def session(model: str | Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def outputs(model: str | Path, feeds: dict[str, np.ndarray], batch: int = 8) -> np.ndarray:
    """First output over all samples, fed in batches (2 threads: the bench machine's cores)."""
    sess = session(model, threads=2)
    name = sess.get_inputs()[0].name
    x = feeds[name]
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def latencies_ms(
    models: dict[str, str | Path], sample: dict[str, np.ndarray], budget_s: float = 6.0
) -> dict[str, float]:
    """Median 1-thread latency of one sample per model, measured interleaved (one run of each model per
    round), so machine-wide drift hits every model alike and the ratios stay meaningful."""
    sessions = {label: session(path, threads=1) for label, path in models.items()}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, sample)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 7 or (time.perf_counter() < deadline and rounds < 1000):
        for label, sess in sessions.items():
            started = time.perf_counter()
            sess.run(None, sample)
            times[label].append(time.perf_counter() - started)
        rounds += 1
    return {label: 1000 * statistics.median(values) for label, values in times.items()}


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    from onnxq.qmath import sqnr_db as sqnr

    return sqnr(ref, test)
