"""QAT import on the digits CNN: each committed torch export (models/digits/qat) folded by the `qat`
recipe, against PTQ of the float model at the same bit widths. Accuracy on the 540-sample test split,
with onnxruntime running the graph as written (the reference semantics, = PyTorch's fake quantization)
and with its default optimizations (integer kernels; on CPUs without VNNI full-range int8 weights
saturate there), plus 1-thread latency of the folded int8 model vs the PTQ int8 model.

    python bench/qat.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import latencies_ms  # noqa: E402

QAT = REPO / "models" / "digits" / "qat"
DIGITS = REPO / "models" / "digits"
CASES = {  # export → extra recipe settings
    "digits_qat_int8_qdq": [],
    "digits_qat_int8_dynamo": [],
    "digits_lsq_int8": [f"passes.fold_qat.sidecar={QAT / 'digits_lsq_int8.json'}"],
    "digits_lsq_int8_dynamo": [],
    "digits_qat_int4_qdq": [],
    "digits_lsq_int4": [f"passes.fold_qat.sidecar={QAT / 'digits_lsq_int4.json'}", "passes.upgrade_opset.target=21"],
}


def accuracy(model: Path, optimized: bool) -> float:
    import onnxruntime as ort

    data = np.load(DIGITS / "eval.npz")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": data["input"]})[0]
    return float(np.mean(np.argmax(logits, axis=1) == data["label"]))


def main() -> None:
    import onnxq

    torch_acc = {
        k: v["torch_fake_quant_acc"] for k, v in json.loads((QAT / "results.json").read_text())["variants"].items()
    }
    calib = str(DIGITS / "calib.npz")
    with tempfile.TemporaryDirectory(prefix="onnxq-qat-") as work:
        tmp = Path(work)
        paths: dict[str, Path] = {"fp32": DIGITS / "digits_cnn.onnx"}
        rows = []
        for name, settings in CASES.items():
            out = tmp / f"{name}.onnx"
            onnxq.run(QAT / f"{name}.onnx", "qat", calib=calib, output=out, overrides=settings, validate=False)
            paths[name] = out
            rows.append((f"QAT {name} + fold_qat", torch_acc.get(name), accuracy(out, False), accuracy(out, True)))
        for bits, settings in (
            ("int8", []),
            ("int8, 8-bit weights", ["defaults.weights.reduce_range=false"]),
            ("int4 weights", ["defaults.weights.dtype=int4", "passes.upgrade_opset.target=21"]),
        ):
            out = tmp / f"ptq_{bits.replace(' ', '_').replace(',', '')}.onnx"
            onnxq.run(DIGITS / "digits_cnn.onnx", "int8", calib=calib, output=out, overrides=settings, validate=False)
            paths[f"PTQ {bits}"] = out
            rows.append((f"PTQ {bits} (float model)", None, accuracy(out, False), accuracy(out, True)))
        print(f"{'model':44s} {'torch':>7s} {'as written':>11s} {'optimized':>10s}")
        print(
            f"{'fp32':44s} {'':>7s} {100 * accuracy(paths['fp32'], False):10.2f}% "
            f"{100 * accuracy(paths['fp32'], True):9.2f}%"
        )
        for label, torch_value, exact, optimized in rows:
            shown = f"{100 * torch_value:6.2f}%" if torch_value is not None else ""
            print(f"{label:44s} {shown:>7s} {100 * exact:10.2f}% {100 * optimized:9.2f}%")
        sample = {"input": np.load(DIGITS / "eval.npz")["input"][:1]}
        wanted = ["fp32", "PTQ int8", "digits_qat_int8_qdq", "digits_lsq_int8"]
        latency = latencies_ms({k: paths[k] for k in wanted}, sample)
        print("\n1-thread latency, one image:")
        for label, ms in latency.items():
            print(f"  {label:28s} {ms * 1000:7.1f} µs   vs PTQ int8 {ms / latency['PTQ int8']:.3f}")


if __name__ == "__main__":
    main()
