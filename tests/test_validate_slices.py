"""The per-slice gate judges what can move a decision: in a softmax output, a class whose probability never
reaches 1% is not judged (its relative error is large and harmless), while every other slice still is."""

from __future__ import annotations

import numpy as np
from builders import float_model
from onnx import helper

from onnxq.recipe import Gates
from onnxq.validate import validate_models


def _classifier(weight: np.ndarray, bias: np.ndarray):  # type: ignore[no-untyped-def]
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["p"], axis=1, name="softmax"),
    ]
    return float_model(nodes, {"x": ["N", 8]}, {"p": ["N", 6]}, {"w": weight, "b": bias}).SerializeToString()


def _data(n: int = 64):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    return lambda: iter([{"x": x}])


def _specs():  # type: ignore[no-untyped-def]
    from onnxq.calibration.readers import InputSpec

    return [InputSpec("x", np.dtype(np.float32), (None, 8))]


def _check(reference: bytes, perturbed: bytes) -> tuple[bool, float]:
    gates = Gates(min_sqnr_db=None, min_slice_sqnr_db=10.0)
    (result,) = validate_models(reference, perturbed, _data(), _specs(), gates=gates)
    return result.passed, result.outputs[0].slices.worst_sqnr_db  # type: ignore[union-attr]


def test_a_rare_class_with_a_large_relative_error_does_not_fail_the_gate() -> None:
    rng = np.random.default_rng(1)
    w = (0.5 * rng.standard_normal((8, 6))).astype(np.float32)
    b = np.array([0, 0, 0, 0, 0, -12], np.float32)  # class 5: probability ~1e-5, never near 1%
    noisy = b.copy()
    noisy[5] = -11.0  # its probability x2.7: 0 dB on that slice, no decision changes
    passed, worst = _check(_classifier(w, b), _classifier(w, noisy))
    assert passed and worst > 10, worst


def test_a_real_class_with_the_same_error_fails_it() -> None:
    rng = np.random.default_rng(1)
    w = (0.5 * rng.standard_normal((8, 6))).astype(np.float32)
    b = np.zeros(6, np.float32)
    noisy = b.copy()
    noisy[5] = 1.0  # a likely class made e times likelier
    passed, worst = _check(_classifier(w, b), _classifier(w, noisy))
    assert not passed and worst < 10, worst
