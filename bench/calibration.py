"""Calibration methods, onnxq vs onnxruntime's calibrators, on the same data in one run.

Prints, per method and model (PP-OCRv4 det and rec): calibration time per sample as a multiple of a
plain fp32 forward pass, and peak RSS at a small and a large sample count; then, on rec, the share of
lines whose decoded string equals fp32's after int8 quantization with each method (onnxq's int8 recipe
vs onnxruntime quantize_static). Every run is its own process; onnxruntime's runs get a memory cap and a
time limit so that a calibrator that keeps every activation fails alone.

    python bench/calibration.py                       # det at 320x320 and rec; 32 and 512 samples
    python bench/calibration.py --models rec --counts 32,128 --skip-ort
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.calib_memory import write_shards  # noqa: E402
from bench.common import isolated, outputs, session  # noqa: E402
from models import ppocr, zoo  # noqa: E402

METHODS = ["minmax", "percentile", "entropy", "mse"]
ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def forward_seconds_per_sample(model: str, folder: Path, count: int) -> float:
    sess = session(model, threads=0)
    name = sess.get_inputs()[0].name
    samples = list(itertools.islice(_samples(folder, name), count))
    sess.run(None, {name: samples[0]})
    started = time.perf_counter()
    for sample in samples:
        sess.run(None, {name: sample})
    return (time.perf_counter() - started) / len(samples)


def _samples(folder: Path, name: str):  # type: ignore[no-untyped-def]
    for shard in sorted(folder.glob("*.npz")):
        data = np.load(shard)[name]
        for i in range(len(data)):
            yield data[i : i + 1]


def calibrate_onnxq(model: str, folder: str, count: int, method: str) -> float:
    import onnxq

    out = Path(tempfile.mkdtemp()) / "q.onnx"
    result = onnxq.run(
        model,
        "int8",
        calib=folder,
        output=out,
        validate=False,
        overrides=[f"calibration.method={method}", f"calibration.num_samples={count}"],
    )
    return result.calibration_seconds


def calibrate_ort(model: str, folder: str, count: int, method: str) -> float:
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    proto = onnx.version_converter.convert_version(onnx.load(model), 13)
    proto.ir_version = 7
    work = Path(tempfile.mkdtemp())
    onnx.save(proto, work / "model.onnx")
    name = proto.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = itertools.islice(_samples(Path(folder), name), count)

        def get_next(self):  # type: ignore[no-untyped-def]
            sample = next(self.samples, None)
            return None if sample is None else {name: sample}

    started = time.perf_counter()
    calibrator = create_calibrator(
        work / "model.onnx",
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=getattr(CalibrationMethod, ORT_METHODS[method]),
    )
    calibrator.collect_data(Reader())
    calibrator.compute_data()
    return time.perf_counter() - started


def quantize_ort(model: str, calib: str, out: str, method: str) -> str:
    from bench.vs_ort import quantize_ort as quantize

    return quantize(model, calib, out, method=ORT_METHODS[method])


def quantize_onnxq(model: str, calib: str, out: str, method: str) -> str:
    import onnxq

    onnxq.run(model, "int8", calib=calib, output=out, validate=False, overrides=[f"calibration.method={method}"])
    return out


def cost_table(short: str, counts: list[int], size: int, skip_ort: bool, cap_gb: float, limit_s: float) -> list[dict]:
    name = f"ppocr_{short}"
    model = str(zoo.fetch(name))
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-calib-") as work:
        folder = write_shards(name, max(counts), Path(work) / "data", size)
        forward = forward_seconds_per_sample(model, folder, min(32, max(counts)))
        for method in METHODS:
            for tool, fn in (("onnxq", calibrate_onnxq), ("onnxruntime", calibrate_ort)):
                if tool == "onnxruntime" and (skip_ort or method not in ORT_METHODS):
                    continue
                row = {"model": short, "method": method, "tool": tool, "forward_ms": 1000 * forward}
                for count in counts:
                    run = isolated(
                        fn,
                        model,
                        str(folder),
                        count,
                        method,
                        timeout=limit_s,
                        memory_cap_gb=cap_gb if tool == "onnxruntime" else None,
                    )
                    if "error" in run:
                        row[count] = run["error"]
                        continue
                    row[count] = {"x_forward": run["value"] / count / forward, "peak_rss_mb": run["peak_rss_mb"]}
                rows.append(row)
                print(_cost_line(row, counts), flush=True)
    return rows


def _cost_line(row: dict, counts: list[int]) -> str:
    cells = []
    for count in counts:
        cell = row.get(count)
        if isinstance(cell, dict):
            cells.append(f"{count}: {cell['x_forward']:.2f}× fwd {cell['peak_rss_mb']:.0f} MB")
        else:
            cells.append(f"{count}: {str(cell)[:60]}")
    ok = [row[c] for c in counts if isinstance(row.get(c), dict)]
    ratio = f"  RSS ratio {ok[-1]['peak_rss_mb'] / ok[0]['peak_rss_mb']:.2f}" if len(ok) == len(counts) > 1 else ""
    return f"{row['model']:4s} {row['method']:10s} {row['tool']:12s} " + "  ".join(cells) + ratio


def accuracy_table(n_calib: int, n_eval: int, skip_ort: bool) -> list[dict]:
    name = "ppocr_rec"
    model = str(zoo.fetch(name))
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxq-bench-acc-") as work:
        calib = str(ppocr.make_npz(name, n_calib, Path(work) / "calib.npz", seed=0))
        evaluation = ppocr.make_inputs(name, n_eval, seed=1)
        reference = outputs(model, evaluation)
        for method in METHODS:
            for tool, fn in (("onnxq", quantize_onnxq), ("onnxruntime", quantize_ort)):
                if tool == "onnxruntime" and (skip_ort or method not in ORT_METHODS):
                    continue
                out = str(Path(work) / f"{tool}-{method}.onnx")
                run = isolated(fn, model, calib, out, method, memory_cap_gb=12 if tool == "onnxruntime" else None)
                if "error" in run:
                    rows.append({"tool": tool, "method": method, "error": run["error"]})
                else:
                    agreement = ppocr.rec_string_agreement(reference, outputs(out, evaluation))
                    rows.append({"tool": tool, "method": method, "agreement": agreement})
                print(
                    f"rec strings = fp32  {tool:12s} {method:10s} {rows[-1].get('agreement', rows[-1].get('error'))}",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--counts", default="32,512")
    parser.add_argument("--size", type=int, default=320, help="det image side")
    parser.add_argument("--skip-ort", action="store_true")
    parser.add_argument("--ort-memory-gb", type=float, default=10.0)
    parser.add_argument("--ort-time-limit", type=float, default=180.0)
    parser.add_argument("--accuracy-calib", type=int, default=64)
    parser.add_argument("--accuracy-eval", type=int, default=64)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "calibration.json")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print("calibration cost: time per sample as a multiple of one fp32 forward pass, peak RSS per sample count")
    costs = [
        row
        for short in args.models.split(",")
        for row in cost_table(short.strip(), counts, args.size, args.skip_ort, args.ort_memory_gb, args.ort_time_limit)
    ]
    print("\naccuracy: PP-OCRv4 rec int8, decoded strings equal to fp32 (higher is better)")
    accuracy = accuracy_table(args.accuracy_calib, args.accuracy_eval, args.skip_ort)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"costs": costs, "accuracy": accuracy}, indent=2, default=str))


if __name__ == "__main__":
    main()
