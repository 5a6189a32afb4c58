"""onnxq `int8` vs onnxruntime.quantization.quantize_static on the PP-OCR models, same data, one run.

onnxruntime is run the way its docs say for CPU: QDQ format, per-channel int8 weights, uint8 activations,
MinMax calibration, after converting the model to opset 13 (per-channel Q/DQ needs it; on the shipped
opset 11/12 its output does not load). Each quantizer runs in its own process so peak RSS is its own.

    python bench/vs_ort.py                      # all three models
    python bench/vs_ort.py --models rec --calib 64 --eval 64
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import isolated, latencies_ms, outputs, sqnr_db  # noqa: E402
from models import ppocr, zoo  # noqa: E402

NAMES = {"cls": "ppocr_cls", "rec": "ppocr_rec", "det": "ppocr_det"}


def quantize_onnxq(model: str, calib: str, out: str) -> str:
    import onnxq

    onnxq.run(model, "int8", calib=calib, output=out, validate=False)
    return out


def quantize_ort(model: str, calib: str, out: str, method: str = "MinMax") -> str:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    proto = onnx.version_converter.convert_version(onnx.load(model), 13)
    proto.ir_version = 7
    upgraded = str(Path(out).with_suffix(".opset13.onnx"))
    onnx.save(proto, upgraded)
    data = np.load(calib)
    name = proto.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(data[name][i : i + 1] for i in range(len(data[name])))

        def get_next(self):  # type: ignore[no-untyped-def]
            sample = next(self.samples, None)
            return None if sample is None else {name: sample}

    quantize_static(
        upgraded,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return out


def task_metric(name: str, ref: np.ndarray, test: np.ndarray, labels: np.ndarray | None) -> tuple[str, float]:
    if name == "ppocr_cls":
        return "accuracy", ppocr.cls_accuracy(test, labels)
    if name == "ppocr_rec":
        return "strings = fp32", ppocr.rec_string_agreement(ref, test)
    return "box F1 vs fp32", float(np.mean([ppocr.det_box_f1(r[0], t[0]) for r, t in zip(ref, test, strict=True)]))


def bench_model(short: str, n_calib: int, n_eval: int, work: Path) -> list[dict]:
    name = NAMES[short]
    model = str(zoo.fetch(name))
    calib = str(ppocr.make_npz(name, n_calib, work / f"{short}_calib.npz", seed=0))
    evaluation = ppocr.make_inputs(name, n_eval, seed=1)
    labels = evaluation.pop("label", None)
    input_name = next(iter(evaluation))
    sample = {input_name: evaluation[input_name][:1]}
    reference = outputs(model, evaluation)
    float_bytes = Path(model).stat().st_size
    rows = [{"model": short, "quantizer": "fp32", "metric": task_metric(name, reference, reference, labels)[1]}]
    runnable = {"fp32": model}
    for label, fn in (("onnxruntime", quantize_ort), ("onnxq", quantize_onnxq)):
        out = str(work / f"{short}.{label}.onnx")
        run = isolated(fn, model, calib, out)
        row = {"model": short, "quantizer": label}
        if "error" in run:
            rows.append({**row, "error": run["error"]})
            continue
        try:
            test = outputs(out, evaluation)
        except Exception as exc:  # a model the runtime refuses is a result, not a crash
            rows.append({**row, "error": f"does not run: {str(exc).splitlines()[0][:120]}"})
            continue
        metric_name, metric = task_metric(name, reference, test, labels)
        runnable[label] = out
        rows.append(
            {
                **row,
                "quantize_s": run["seconds"],
                "peak_rss_mb": run["peak_rss_mb"],
                "size_ratio": Path(out).stat().st_size / float_bytes,
                "sqnr_db": sqnr_db(reference, test),
                "metric_name": metric_name,
                "metric": metric,
            }
        )
    latency = latencies_ms(runnable, sample)
    for row in rows:
        if row["quantizer"] in latency:
            row["latency_ms"] = latency[row["quantizer"]]
            row["speedup"] = latency["fp32"] / row["latency_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="onnxq int8 vs onnxruntime quantize_static (QDQ, per-channel, MinMax)")
    for col in (
        "model",
        "quantizer",
        "quantize s",
        "peak RSS MB",
        "size",
        "SQNR dB",
        "task metric",
        "1-thr ms",
        "speedup",
    ):
        table.add_column(col, justify="left" if col in ("model", "quantizer") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], r["quantizer"], f"[red]{r['error']}[/]", *[""] * 6)
            continue
        if r["quantizer"] == "fp32":
            table.add_row(
                r["model"], "fp32", "", "", "1.00", "", f"{r['metric']:.3f}", f"{r['latency_ms']:.1f}", "1.00"
            )
            continue
        table.add_row(
            r["model"],
            r["quantizer"],
            f"{r['quantize_s']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['size_ratio']:.2f}",
            f"{r['sqnr_db']:.1f}",
            f"{r['metric']:.3f} {r['metric_name']}",
            f"{r['latency_ms']:.1f}",
            f"{r['speedup']:.2f}",
        )
    Console(width=170).print(table)
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = next((r for r in rows if r["model"] == model and r["quantizer"] == "onnxq" and "metric" in r), None)
        theirs = next(
            (r for r in rows if r["model"] == model and r["quantizer"] == "onnxruntime" and "metric" in r), None
        )
        if ours and theirs:
            print(
                f"{model}: onnxq/ORT  task metric {ours['metric']:.3f}/{theirs['metric']:.3f}  "
                f"SQNR {ours['sqnr_db']:.1f}/{theirs['sqnr_db']:.1f} dB  speedup ratio "
                f"{ours['speedup'] / theirs['speedup']:.2f}  quantize time ratio "
                f"{ours['quantize_s'] / theirs['quantize_s']:.2f}  peak RSS ratio "
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cls,rec,det", help="comma-separated: cls,rec,det")
    parser.add_argument("--calib", type=int, default=64, help="calibration samples")
    parser.add_argument("--eval", type=int, default=64, help="evaluation samples")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "vs_ort.json")
    args = parser.parse_args()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="onnxq-vs-ort-") as folder:
        for short in args.models.split(","):
            rows += bench_model(short.strip(), args.calib, args.eval, Path(folder))
    print_table(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
