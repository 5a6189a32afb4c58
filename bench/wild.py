"""The wild zoo (models/wild.py), every model, one run, the same data for every tool: fp32, onnxq `int8` and
onnxruntime's quantize_static in several configurations (its best is what onnxq must beat), scored by each
model's task metric on held-out feeds; plus 1-thread speedup, quantize time (onnxq validates in that time,
onnxruntime does not), size, and the verdict of onnxq's default gates against the task's own verdict.

    python bench/wild.py                              # all models, 32 calibration + 32 held-out feeds
    python bench/wild.py --models magika,silero_vad --ort default,per_channel --n 16

A task "dropped" when its metric falls below --task-floor (0.99 for agreements and cosines, 0.95 for F1).
Results go to bench/results/wild.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import isolated, latencies_ms
from models import wild

ORT_CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "per_channel": {"per_channel": True},
    "conv_matmul": {"per_channel": True, "op_types_to_quantize": ["Conv", "MatMul", "Gemm"]},
    "entropy": {"per_channel": True, "calibrate_method": "Entropy"},
    "percentile": {"per_channel": True, "calibrate_method": "Percentile"},
}


def _onnxq(model: str, calib: str, data: str, out: str, recipe: str) -> dict[str, Any]:
    import onnxq
    from onnxq.errors import GateFailure

    validate = not recipe.endswith(":unvalidated")
    recipe = recipe.removesuffix(":unvalidated")
    try:
        result = onnxq.run(model, recipe, calib=calib, data=data, output=out, validate=validate)
        if not validate:
            return {}
        passed = True
    except GateFailure as failure:
        result, passed = failure.result, False  # type: ignore[assignment]
    gates = [
        f"{g.gate} {g.value:.3g}"
        for v in result.validation
        for g in v.gates
        if not g.passed  # type: ignore[union-attr]
    ]
    return {"gates_pass": passed, "failed_gates": gates}


def _ort(model: str, calib: str, out: str, config: dict[str, Any]) -> None:
    """onnxruntime's quantize_static on the feeds of `calib`; enum settings (calibrate_method, weight_type)
    are given by name."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantType, quantize_static

    feeds = wild.unstack(calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.items, None)

    kwargs = dict(config)
    if "calibrate_method" in kwargs:
        kwargs["calibrate_method"] = getattr(CalibrationMethod, kwargs["calibrate_method"])
    if "weight_type" in kwargs:
        kwargs["weight_type"] = getattr(QuantType, kwargs["weight_type"])
    quantize_static(model, out, Reader(), **kwargs)


def _size(path: str | Path) -> int:
    from onnxq.ir import file_bytes

    return file_bytes(path)


def measure(name: str, n: int, ort_configs: list[str], floor: float | None, timeout: float) -> dict[str, Any]:
    model = wild.WILD[name]
    source = str(wild.fetch(name))
    calib, held_out = (str(p) for p in wild.build(name, n))
    feeds = wild.unstack(held_out)
    reference = wild.outputs(source, feeds)
    floor = floor if floor is not None else (0.95 if "F1" in model.metric_name else 0.99)
    work = Path(tempfile.mkdtemp(prefix=f"wild-{name}-"))
    rows: dict[str, dict[str, Any]] = {}
    candidates = {
        "onnxq int8": ("onnxq", "int8"),
        "onnxq int8 unvalidated": ("onnxq", "int8:unvalidated"),
        "onnxq mixed": ("onnxq", "mixed"),
        "onnxq auto": ("onnxq", "auto"),
    } | {f"ort {c}": ("ort", c) for c in ort_configs}
    for label, (tool, config) in candidates.items():
        out = str(work / f"{label.replace(' ', '_')}.onnx")
        if tool == "onnxq":
            run = isolated(_onnxq, source, calib, held_out, out, config, timeout=timeout)
        else:
            run = isolated(_ort, source, calib, out, ORT_CONFIGS[config], timeout=timeout, memory_cap_gb=12)
        if "error" in run or not Path(out).is_file():
            rows[label] = {"error": run.get("error", "no output")}
            continue
        try:
            score = model.metric(reference, wild.outputs(out, feeds))
        except Exception as exc:  # a quantized model onnxruntime cannot run is that tool's failure
            rows[label] = {"error": f"does not run: {str(exc).splitlines()[0][:120]}"}
            continue
        rows[label] = {
            "metric": score,
            "seconds": run["seconds"],
            "peak_rss_mb": run["peak_rss_mb"],
            "size": _size(out) / _size(source),
            "path": out,
            **(run["value"] or {}),
        }
    ok = {label: row for label, row in rows.items() if "error" not in row}
    sample = {k: v for k, v in feeds[0].items()}
    times = latencies_ms({"fp32": source, **{label: row["path"] for label, row in ok.items()}}, sample, budget_s=3.0)
    for label, row in ok.items():
        row["speedup"] = times["fp32"] / times[label]
    ort_rows = [row for label, row in ok.items() if label.startswith("ort")]
    best = max(ort_rows, key=lambda r: (r["metric"], r["speedup"]), default=None)
    ours = ok.get("onnxq int8")
    verdict = None
    if ours is not None:
        dropped = ours["metric"] < floor
        verdict = {"task_dropped": dropped, "gate_fired": not ours["gates_pass"], "floor": floor}
    return {
        "name": name,
        "kind": model.kind,
        "metric_name": model.metric_name,
        "quantized_already": model.quantized_already,
        "rows": rows,
        "ort_best": best and next(label for label, row in ok.items() if row is best),
        "gate": verdict,
    }


def report(results: list[dict[str, Any]]) -> None:
    print("\n| model | metric | tool | task metric | speedup (1 thread) | quantize s | size | gates |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for label, row in res["rows"].items():
            if "error" in row:
                print(f"| {res['name']} | {res['metric_name']} | {label} | error: {row['error'][:80]} | | | | |")
                continue
            best = " (ORT best)" if label == res["ort_best"] else ""
            gates = (
                ""
                if "gates_pass" not in row
                else ("pass" if row["gates_pass"] else "FAIL " + "; ".join(row["failed_gates"])[:60])
            )
            print(
                f"| {res['name']} | {res['metric_name']} | {label}{best} | {row['metric']:.4f} | {row['speedup']:.2f}× "
                f"| {row['seconds']:.1f} | {row['size']:.2f} | {gates} |"
            )
    print(
        "\nAgainst onnxruntime's best configuration: metric difference and speedup ratio of onnxq int8, mixed, auto; "
        "quantize time ratio of int8 with and without validation:"
    )
    for res in results:
        rows, best = res["rows"], res["rows"].get(res["ort_best"] or "", {})
        if "metric" not in best:
            continue
        parts = [f"  {res['name']:20s}"]
        for label in ("onnxq int8", "onnxq mixed", "onnxq auto"):
            if "metric" in rows.get(label, {}):
                row = rows[label]
                parts.append(
                    f"{label.split()[1]} {row['metric'] - best['metric']:+.4f} {row['speedup'] / best['speedup']:.2f}×"
                )
        for label in ("onnxq int8", "onnxq int8 unvalidated"):
            if "seconds" in rows.get(label, {}):
                parts.append(
                    f"time{' (unvalidated)' if 'un' in label else ''} {rows[label]['seconds'] / best['seconds']:.2f}×"
                )
        print("  ".join(parts))
    print("\nDefault gate against the task (task dropped = metric below its floor):")
    table = {(f, d): 0 for f in (True, False) for d in (True, False)}
    for res in results:
        if res["gate"]:
            table[(res["gate"]["gate_fired"], res["gate"]["task_dropped"])] += 1
            print(
                f"  {res['name']:20s} gate {'fired' if res['gate']['gate_fired'] else 'quiet'}, task "
                f"{'dropped' if res['gate']['task_dropped'] else 'kept'} (floor {res['gate']['floor']})"
            )
    print(
        f"  confusion: fired & dropped {table[(True, True)]}, fired & kept {table[(True, False)]} (false alarms), "
        f"quiet & dropped {table[(False, True)]} (misses), quiet & kept {table[(False, False)]}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="all", help="comma-separated names from `python -m models.wild list`")
    ap.add_argument(
        "--ort", default=",".join(ORT_CONFIGS), help=f"onnxruntime configurations: {', '.join(ORT_CONFIGS)}"
    )
    ap.add_argument("--n", type=int, default=32, help="calibration and held-out feeds per model")
    ap.add_argument("--task-floor", type=float, default=None, help="override the 'task dropped' threshold")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per quantizer run")
    args = ap.parse_args(argv)
    names = list(wild.WILD) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in wild.WILD] + [c for c in args.ort.split(",") if c not in ORT_CONFIGS]
    if unknown:
        ap.error(f"unknown model or configuration '{unknown[0]}' (models: {', '.join(wild.WILD)})")
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        results.append(measure(name, args.n, args.ort.split(","), args.task_floor, args.timeout))
    report(results)
    folder = Path(__file__).parent / "results"
    folder.mkdir(exist_ok=True)
    (folder / "wild.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
