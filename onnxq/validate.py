"""Float vs quantized on the same data through onnxruntime: per-output and per-slice metrics, and gates.

Metrics are accumulated batch by batch (sums, dot products, maxima), so validation memory does not grow
with the number of samples. Each output is also judged slice by slice along an axis (1 by default: the
channel of NCHW maps, the field of a detection head [N, 4 + classes, anchors]): a box+score head joined by
one Concat can keep 0.999 cosine overall while its score slice has collapsed, and only the slice shows it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.calibration.readers import Feeds, InputSpec, rebatch, sample_count
from onnxq.errors import UsageError

SLICE_ENERGY_FLOOR = 1e-9  # slices below this share of the mean slice energy are not judged
# In a probability output (softmax over the slice axis), a class whose probability never reaches this is not
# judged: its relative error cannot move a decision (magika's 214 classes: one at 0.1% had 5.4 dB while top-1
# agreement stayed 1.0, the only false alarm of the old gate on the wild zoo, bench/wild.py).
MIN_JUDGED_PROBABILITY = 0.01
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass
class _Accumulator:
    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    test_sq: float = 0.0
    max_abs: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    rows: int = 0
    agree: int = 0
    slice_axis: int | None = None
    slice_signal: np.ndarray | None = None
    slice_noise: np.ndarray | None = None
    slice_peak: np.ndarray | None = None
    distribution: bool = True  # every batch so far sums to 1 along the slice axis, with values in [0, 1]

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = ref.astype(np.float64)
        t = test.astype(np.float64)
        diff = r - t
        if self.slice_axis is not None and r.ndim > self.slice_axis:
            others = tuple(i for i in range(r.ndim) if i != self.slice_axis)
            signal, noise = np.sum(r * r, axis=others), np.sum(diff * diff, axis=others)
            peak = np.max(np.abs(r), axis=others) if r.size else np.zeros(r.shape[self.slice_axis])
            if self.slice_signal is None or self.slice_signal.shape != signal.shape:
                self.slice_signal, self.slice_noise, self.slice_peak = signal, noise, peak  # (rare: restart)
            else:
                self.slice_signal += signal
                self.slice_noise += noise
                self.slice_peak = np.maximum(self.slice_peak, peak)  # type: ignore[arg-type]
            self.distribution = self.distribution and is_distribution(r, self.slice_axis)
        self.signal += float(np.sum(r * r))
        self.noise += float(np.sum(diff * diff))
        self.dot += float(np.sum(r * t))
        self.test_sq += float(np.sum(t * t))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        self.abs_sum += float(np.sum(np.abs(diff)))
        self.count += diff.size
        if r.ndim >= 2 and r.shape[-1] >= 2:
            self.rows += int(np.prod(r.shape[:-1]))
            self.agree += int(np.sum(np.argmax(r, axis=-1) == np.argmax(t, axis=-1)))


def is_distribution(r: np.ndarray, axis: int) -> bool:
    """Values in [0, 1] that sum to 1 along `axis` (a softmax over classes)."""
    if r.size == 0 or r.shape[axis] < 2 or r.min() < 0 or r.max() > 1:
        return False
    return bool(np.allclose(np.sum(r, axis=axis), 1.0, atol=1e-3))


def _sqnr(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@dataclass
class SliceMetrics:
    """SQNR of every index along `axis`; slices whose reference is all zeros are not judged."""

    axis: int
    sqnr_db: list[float]
    worst_index: int
    worst_sqnr_db: float


@dataclass
class OutputMetrics:
    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None
    slices: SliceMetrics | None = None

    @classmethod
    def from_acc(cls, name: str, acc: _Accumulator) -> OutputMetrics:
        denom = math.sqrt(acc.signal * acc.test_sq)
        cos = acc.dot / denom if denom else (1.0 if acc.noise == 0 else 0.0)
        slices = None
        if acc.slice_signal is not None and acc.slice_noise is not None and acc.slice_signal.size > 1:
            values = [_sqnr(float(s), float(n)) for s, n in zip(acc.slice_signal, acc.slice_noise, strict=True)]
            # a slice with (next to) no signal, like a softmax tail, has no meaningful SQNR; a small but
            # real one (a 0..1 score beside boxes in the hundreds: 1e-5 of the mean energy) is judged
            floor = float(np.mean(acc.slice_signal)) * SLICE_ENERGY_FLOOR
            judged = [i for i, s in enumerate(acc.slice_signal) if s > floor]
            if acc.distribution and acc.slice_peak is not None:
                judged = [i for i in judged if acc.slice_peak[i] >= MIN_JUDGED_PROBABILITY]
            if judged:
                worst = min(judged, key=lambda i: values[i])
                slices = SliceMetrics(acc.slice_axis or 0, values, worst, values[worst])
        agreement = acc.agree / acc.rows if acc.rows else None
        mean_abs = acc.abs_sum / max(acc.count, 1)
        return cls(name, _sqnr(acc.signal, acc.noise), cos, acc.max_abs, mean_abs, agreement, slices)


@dataclass
class GateResult:
    gate: str
    threshold: float
    value: float
    passed: bool


@dataclass
class ValidationResult:
    provider: str
    samples: int
    outputs: list[OutputMetrics]
    accuracy_float: float | None = None
    accuracy_quantized: float | None = None
    task_metric: float | None = None  # the user's metric, sample-weighted mean over batches
    gates: list[GateResult] = field(default_factory=list)
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        return _json_safe(data)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _session(model: bytes | str | Path, provider: str, threads: int = 0):  # type: ignore[no-untyped-def]
    from onnxq.ort_session import session

    return session(model, [PROVIDERS[provider]], threads)


def available_providers() -> list[str]:
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in have]


def validate_models(
    float_model: bytes | str | Path,
    quant_model: bytes | str | Path,
    data: Callable[[], Iterator[Feeds]],
    specs: list[InputSpec],
    *,
    providers: list[str] = ("cpu",),  # type: ignore[assignment]
    labels: str = "label",
    batch_size: int = 1,
    gates: Any = None,
    slice_axis: int | None = 1,
    metric: str | Callable[..., float] | None = None,
    show_progress: bool = False,
) -> list[ValidationResult]:
    """`metric`: a callable (or `module:function`) given, per batch, the float outputs, the quantized
    outputs (dicts by output name) and the batch; it returns a score (higher is better, e.g. the share of
    decoded strings that agree). The sample-weighted mean is reported and gated by `min_task_metric`."""
    if isinstance(metric, str):
        from onnxq.calibration.sources import load_callable

        metric = load_callable(metric, "the task metric")
    results = []
    available = available_providers()
    for provider in providers:
        if provider not in available:
            results.append(
                ValidationResult(
                    provider,
                    0,
                    [],
                    skipped=f"skipped: onnxruntime here has no "
                    f"{PROVIDERS[provider]} (install onnxruntime-gpu on a machine with a GPU)",
                )
            )
            continue
        results.append(
            _validate_one(
                float_model,
                quant_model,
                data,
                specs,
                provider,
                labels,
                batch_size,
                gates,
                slice_axis,
                metric,
                show_progress,
            )
        )
    return results


def _validate_one(  # type: ignore[no-untyped-def]
    float_model, quant_model, data, specs, provider, labels, batch_size, gates, slice_axis, metric, show_progress=False
) -> ValidationResult:
    from onnxq.progress import progress

    with progress(show_progress, f"validating on {provider}", getattr(data, "num_samples", None)) as advance:
        return _compare(
            float_model, quant_model, data, specs, provider, labels, batch_size, gates, slice_axis, metric, advance
        )


def _compare(  # type: ignore[no-untyped-def]
    float_model, quant_model, data, specs, provider, labels, batch_size, gates, slice_axis, metric, advance
) -> ValidationResult:
    ref_session, test_session = _session(float_model, provider), _session(quant_model, provider)
    output_names = [o.name for o in ref_session.get_outputs()]
    missing = [n for n in output_names if n not in {o.name for o in test_session.get_outputs()}]
    if missing:
        raise UsageError(
            f"the quantized model lacks output '{missing[0]}' of the float model",
            "compare a model with the quantized form of the same model",
        )
    feed_names = {s.name for s in specs}
    accs = {n: _Accumulator(slice_axis=slice_axis) for n in output_names}
    correct_ref = correct_test = labelled = samples = 0
    metric_sum = 0.0
    for batch in rebatch(data(), specs, batch_size):
        feeds = {k: v for k, v in batch.items() if k in feed_names}
        ref = ref_session.run(output_names, feeds)
        test = test_session.run(output_names, feeds)
        for name, r, t in zip(output_names, ref, test, strict=True):
            accs[name].update(np.asarray(r), np.asarray(t))
        count = sample_count(feeds, specs)
        samples += count
        advance(count)
        if metric is not None:
            score = metric(dict(zip(output_names, ref, strict=True)), dict(zip(output_names, test, strict=True)), batch)
            metric_sum += float(score) * count
        if labels in batch and ref[0].ndim == 2:
            y = batch[labels].reshape(-1)
            correct_ref += int(np.sum(np.argmax(ref[0], axis=1) == y))
            correct_test += int(np.sum(np.argmax(test[0], axis=1) == y))
            labelled += y.size
    result = ValidationResult(provider, samples, [OutputMetrics.from_acc(n, accs[n]) for n in output_names])
    if metric is not None and samples:
        result.task_metric = metric_sum / samples
    if labelled:
        result.accuracy_float = correct_ref / labelled
        result.accuracy_quantized = correct_test / labelled
    if gates is not None:
        result.gates = evaluate_gates(result, gates)
    return result


def latency(
    float_model: bytes | str | Path,
    quant_model: bytes | str | Path,
    feeds: Feeds,
    provider: str = "cpu",
    threads: int = 1,
    budget_s: float = 0.5,
) -> dict[str, Any]:
    """Median latency of both models on one batch, interleaved run by run after a warm-up, so drift in
    the machine's load hits both alike."""
    import time

    sessions = [_session(m, provider, threads) for m in (float_model, quant_model)]
    names = [{i.name for i in s.get_inputs()} for s in sessions]
    for session, wanted in zip(sessions, names, strict=True):
        for _ in range(3):
            session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    times: list[list[float]] = [[], []]
    deadline = time.perf_counter() + budget_s
    while len(times[0]) < 5 or (time.perf_counter() < deadline and len(times[0]) < 200):
        for index, (session, wanted) in enumerate(zip(sessions, names, strict=True)):
            started = time.perf_counter()
            session.run(None, {k: v for k, v in feeds.items() if k in wanted})
            times[index].append(time.perf_counter() - started)
    float_ms, quant_ms = (1000 * float(np.median(t)) for t in times)
    return {
        "provider": provider,
        "threads": threads,
        "float_ms": float_ms,
        "quantized_ms": quant_ms,
        "speedup": float_ms / quant_ms,
    }


def _gated(outputs: list[OutputMetrics], patterns: list[str]) -> list[OutputMetrics]:
    """The outputs the gates judge: all but those `patterns` name (all, if that would leave none)."""

    def ignored(name: str) -> bool:
        return any(re.search(p[3:], name) if p.startswith("re:") else p == name for p in patterns)

    kept = [o for o in outputs if not ignored(o.name)]
    return kept or outputs


def evaluate_gates(result: ValidationResult, gates: Any) -> list[GateResult]:
    out = []
    result = dataclasses.replace(result, outputs=_gated(result.outputs, getattr(gates, "ignore_outputs", [])))
    if gates.min_sqnr_db is not None:
        worst = min(o.sqnr_db for o in result.outputs)
        out.append(GateResult("min_sqnr_db", gates.min_sqnr_db, worst, worst >= gates.min_sqnr_db))
    if getattr(gates, "min_slice_sqnr_db", None) is not None:
        judged = [o for o in result.outputs if o.slices is not None]
        if judged:
            worst = min(judged, key=lambda o: o.slices.worst_sqnr_db)  # type: ignore[union-attr]
            value = worst.slices.worst_sqnr_db  # type: ignore[union-attr]
            label = f"min_slice_sqnr_db ({worst.name}[{worst.slices.axis}={worst.slices.worst_index}])"  # type: ignore[union-attr]
            out.append(GateResult(label, gates.min_slice_sqnr_db, value, value >= gates.min_slice_sqnr_db))
    if gates.min_cosine is not None:
        worst = min(o.cosine for o in result.outputs)
        out.append(GateResult("min_cosine", gates.min_cosine, worst, worst >= gates.min_cosine))
    if gates.min_top1_agreement is not None:
        values = [o.top1_agreement for o in result.outputs if o.top1_agreement is not None]
        if values:
            out.append(
                GateResult(
                    "min_top1_agreement", gates.min_top1_agreement, min(values), min(values) >= gates.min_top1_agreement
                )
            )
    if getattr(gates, "min_task_metric", None) is not None and result.task_metric is not None:
        value = result.task_metric
        out.append(GateResult("min_task_metric", gates.min_task_metric, value, value >= gates.min_task_metric))
    if gates.max_accuracy_drop is not None and result.accuracy_float is not None:
        drop = 100 * (result.accuracy_float - (result.accuracy_quantized or 0.0))
        out.append(GateResult("max_accuracy_drop", gates.max_accuracy_drop, drop, drop <= gates.max_accuracy_drop))
    return out
