"""Float vs quantized on the same data through onnxruntime: per-output metrics and gates.

Metrics are accumulated batch by batch (sums, dot products, maxima), so validation memory does not grow
with the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.calibration.readers import Feeds, InputSpec, rebatch
from onnxq.errors import UsageError

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

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = ref.astype(np.float64)
        t = test.astype(np.float64)
        diff = r - t
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


@dataclass
class OutputMetrics:
    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None

    @classmethod
    def from_acc(cls, name: str, acc: _Accumulator) -> OutputMetrics:
        if acc.noise == 0:
            sqnr = math.inf
        elif acc.signal == 0:
            sqnr = -math.inf
        else:
            sqnr = 10 * math.log10(acc.signal / acc.noise)
        denom = math.sqrt(acc.signal * acc.test_sq)
        cos = acc.dot / denom if denom else (1.0 if acc.noise == 0 else 0.0)
        return cls(
            name, sqnr, cos, acc.max_abs, acc.abs_sum / max(acc.count, 1), acc.agree / acc.rows if acc.rows else None
        )


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


def _session(model: bytes | str | Path, provider: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=[PROVIDERS[provider]])


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
) -> list[ValidationResult]:
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
        results.append(_validate_one(float_model, quant_model, data, specs, provider, labels, batch_size, gates))
    return results


def _validate_one(float_model, quant_model, data, specs, provider, labels, batch_size, gates) -> ValidationResult:
    ref_session, test_session = _session(float_model, provider), _session(quant_model, provider)
    output_names = [o.name for o in ref_session.get_outputs()]
    missing = [n for n in output_names if n not in {o.name for o in test_session.get_outputs()}]
    if missing:
        raise UsageError(
            f"the quantized model lacks output '{missing[0]}' of the float model",
            "compare a model with the quantized form of the same model",
        )
    feed_names = {s.name for s in specs}
    accs = {n: _Accumulator() for n in output_names}
    correct_ref = correct_test = labelled = samples = 0
    for batch in rebatch(data(), specs, batch_size):
        feeds = {k: v for k, v in batch.items() if k in feed_names}
        ref = ref_session.run(output_names, feeds)
        test = test_session.run(output_names, feeds)
        for name, r, t in zip(output_names, ref, test, strict=True):
            accs[name].update(np.asarray(r), np.asarray(t))
        samples += next(iter(feeds.values())).shape[0]
        if labels in batch and ref[0].ndim == 2:
            y = batch[labels].reshape(-1)
            correct_ref += int(np.sum(np.argmax(ref[0], axis=1) == y))
            correct_test += int(np.sum(np.argmax(test[0], axis=1) == y))
            labelled += y.size
    result = ValidationResult(provider, samples, [OutputMetrics.from_acc(n, accs[n]) for n in output_names])
    if labelled:
        result.accuracy_float = correct_ref / labelled
        result.accuracy_quantized = correct_test / labelled
    if gates is not None:
        result.gates = evaluate_gates(result, gates)
    return result


def evaluate_gates(result: ValidationResult, gates: Any) -> list[GateResult]:
    out = []
    if gates.min_sqnr_db is not None:
        worst = min(o.sqnr_db for o in result.outputs)
        out.append(GateResult("min_sqnr_db", gates.min_sqnr_db, worst, worst >= gates.min_sqnr_db))
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
    if gates.max_accuracy_drop is not None and result.accuracy_float is not None:
        drop = 100 * (result.accuracy_float - (result.accuracy_quantized or 0.0))
        out.append(GateResult("max_accuracy_drop", gates.max_accuracy_drop, drop, drop <= gates.max_accuracy_drop))
    return out
