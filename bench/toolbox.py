"""The accuracy toolbox on real models (the wild zoo), each pass where it should matter, against onnxruntime's
quantize_static in the equivalent configuration, same calibration and held-out feeds for both tools:

1. per-tensor int8 weights (the depthwise case): equalize (CLE + bias absorption) and bias_correction;
2. int4 per-channel weights: adaround against round-to-nearest;
3. activation ranges: search_ranges (per scale group, by output error) against each single method.

    python bench/toolbox.py                       # all three tables
    python bench/toolbox.py --tables 3 --n 32     # one table

Task metric on the held-out feeds (models/wild.py), mean output SQNR (dB) against fp32, quantize seconds.
Tables 1 and 2 calibrate activations with percentile ranges in both tools, so that the weights make the
difference. Results go to bench/results/toolbox.json too.
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

import numpy as np

from bench.common import isolated
from bench.wild import _ort
from models import wild

TABLES: dict[int, dict[str, Any]] = {
    1: {
        "title": "per-tensor int8 weights on depthwise models: CLE and bias correction",
        "models": ["orientation_lcnet", "ppocrv5_det"],
        "weights": ("int8", "tensor"),
        "method": "percentile",
        "onnxq": {
            "round to nearest": [],
            "bias_correction": ["bias_correction"],
            "equalize": ["equalize"],
            "equalize + bias_correction": ["equalize", "bias_correction"],
            "equalize + adaround": ["equalize", "adaround"],
        },
        "ort": {"per-tensor int8": {"per_channel": False, "calibrate_method": "Percentile"}},
    },
    2: {
        "title": "int4 per-channel weights: AdaRound",
        "models": ["ppocrv5_rec", "nsfw_resnet", "orientation_lcnet"],
        "weights": ("int4", "channel"),
        "method": "percentile",
        "onnxq": {
            "round to nearest": [],
            "bias_correction": ["bias_correction"],
            "adaround": ["adaround"],
            "adaround + bias_correction": ["adaround", "bias_correction"],
        },
        "ort": {"int4 per-channel": {"per_channel": True, "calibrate_method": "Percentile", "weight_type": "QInt4"}},
    },
    3: {
        "title": "activation ranges: one method for the model, or chosen per tensor by output error",
        "models": ["orientation_lcnet", "ppocrv5_det", "ppocrv5_rec", "nudenet_yolov8n"],
        "weights": ("int8", "channel"),
        "method": None,
        "onnxq": {
            "minmax": [],
            "percentile": [],
            "mse": [],
            "entropy": [],
            "search_ranges": ["search_ranges"],
            "int8-tuned (bias_correction + search_ranges)": ["bias_correction", "search_ranges"],
        },
        "ort": {
            "per-channel minmax": {"per_channel": True},
            "per-channel percentile": {"per_channel": True, "calibrate_method": "Percentile"},
            "per-channel entropy": {"per_channel": True, "calibrate_method": "Entropy"},
            "per-tensor minmax (default)": {},
            "per-tensor percentile": {"calibrate_method": "Percentile"},
        },
    },
}
BEFORE_ANNOTATION = {"equalize"}  # passes that change the float weights run before assign_precision


def toolbox_recipe(dtype: str, granularity: str, method: str, toolbox: list[str]) -> dict[str, Any]:
    """The int8 recipe with other weights, another calibration method and toolbox passes in their places."""
    from onnxq.recipe import read_recipe_source

    recipe = read_recipe_source("int8")
    recipe["calibration"]["method"] = method
    recipe["defaults"]["weights"] = {
        "dtype": dtype,
        "granularity": granularity,
        "symmetric": True,
        "reduce_range": "auto",
    }
    opset = {"upgrade_opset": {"target": 21 if dtype == "int4" else 13}}
    passes = [opset if "upgrade_opset" in p else p for p in recipe["passes"]]
    early = [{name: {}} for name in toolbox if name in BEFORE_ANNOTATION]
    late = [{name: {}} for name in toolbox if name not in BEFORE_ANNOTATION]
    annotate = next(i for i, p in enumerate(passes) if "assign_precision" in p)
    lower = next(i for i, p in enumerate(passes) if "insert_qdq" in p)
    recipe["passes"] = passes[:annotate] + early + passes[annotate:lower] + late + passes[lower:]
    return recipe


def _onnxq(model: str, calib: str, out: str, recipe: dict[str, Any]) -> list[str]:
    import onnxq

    result = onnxq.run(model, recipe, calib=calib, output=out, validate=False)
    return [n for n in result.notes if n.split(":")[0] in {"equalize", "bias_correction", "adaround", "search_ranges"}]


def _sqnr(reference: list[dict[str, np.ndarray]], test: list[dict[str, np.ndarray]]) -> float:
    from onnxq.qmath import sqnr_db

    key = next(iter(reference[0]))
    return float(np.mean([sqnr_db(r[key], t[key]) for r, t in zip(reference, test, strict=True)]))


def measure(table: int, name: str, n: int, timeout: float) -> dict[str, Any]:
    spec = TABLES[table]
    model = wild.WILD[name]
    source = str(wild.fetch(name))
    calib, held_out = (str(p) for p in wild.build(name, n))
    feeds = wild.unstack(held_out)
    reference = wild.outputs(source, feeds)
    work = Path(tempfile.mkdtemp(prefix=f"toolbox-{name}-"))
    dtype, granularity = spec["weights"]
    rows: dict[str, dict[str, Any]] = {}
    jobs: list[tuple[str, Any, tuple]] = []
    for label, toolbox in spec["onnxq"].items():
        method = spec["method"] or (label if label in ("minmax", "percentile", "mse", "entropy") else "minmax")
        jobs.append((f"onnxq {label}", _onnxq, (toolbox_recipe(dtype, granularity, method, toolbox),)))
    for label, config in spec["ort"].items():
        jobs.append((f"ort {label}", _ort, (config,)))
    for index, (label, fn, extra) in enumerate(jobs):
        out = str(work / f"{index}.onnx")
        run = isolated(fn, source, calib, out, *extra, timeout=timeout, memory_cap_gb=12)
        if "error" in run or not Path(out).is_file():
            rows[label] = {"error": run.get("error", "no output")}
            continue
        try:
            got = wild.outputs(out, feeds)
        except Exception as exc:  # a model onnxruntime cannot run is that tool's failure
            rows[label] = {"error": f"does not run: {str(exc).splitlines()[0][:120]}"}
            continue
        rows[label] = {
            "metric": model.metric(reference, got),
            "sqnr_db": _sqnr(reference, got),
            "seconds": run["seconds"],
            "notes": run["value"] or [],
        }
        print(f"   {label}: {rows[label]['metric']:.4f}, {rows[label]['sqnr_db']:.1f} dB", flush=True)
    return {"table": table, "name": name, "metric_name": model.metric_name, "rows": rows}


def report(results: list[dict[str, Any]]) -> None:
    for table, spec in TABLES.items():
        chosen = [r for r in results if r["table"] == table]
        if not chosen:
            continue
        print(f"\n### {table}. {spec['title']}\n")
        print("| model | metric | configuration | task metric | output SQNR (dB) | vs ORT (metric, dB) | quantize s |")
        print("|---|---|---|---|---|---|---|")
        for res in chosen:
            ort = [row for label, row in res["rows"].items() if label.startswith("ort") and "metric" in row]
            best = max(ort, key=lambda r: (r["metric"], r["sqnr_db"]), default=None)
            for label, row in res["rows"].items():
                if "error" in row:
                    print(f"| {res['name']} | {res['metric_name']} | {label} | error: {row['error'][:80]} | | | |")
                    continue
                versus = ""
                if best is not None and label.startswith("onnxq"):
                    versus = f"{row['metric'] - best['metric']:+.3f}, {row['sqnr_db'] - best['sqnr_db']:+.1f}"
                print(
                    f"| {res['name']} | {res['metric_name']} | {label} | {row['metric']:.4f} | {row['sqnr_db']:.1f} "
                    f"| {versus} | {row['seconds']:.1f} |"
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", default="1,2,3", help="which tables (1 CLE/bias correction, 2 AdaRound, 3 ranges)")
    ap.add_argument("--models", default=None, help="only these models (comma-separated)")
    ap.add_argument("--n", type=int, default=32, help="calibration and held-out feeds per model")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per quantizer run")
    args = ap.parse_args(argv)
    try:
        tables = [int(t) for t in args.tables.split(",")]
    except ValueError:
        ap.error(f"--tables takes numbers from {sorted(TABLES)}, got '{args.tables}'")
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        ap.error(f"unknown table {unknown[0]} (tables: {', '.join(map(str, TABLES))})")
    only = set(args.models.split(",")) if args.models else None
    listed = {name for t in tables for name in TABLES[t]["models"]}
    if only and not only <= listed:
        unknown = sorted(only - listed)[0]
        ap.error(f"model '{unknown}' is in none of tables {args.tables} (they run: {', '.join(sorted(listed))})")
    results = []
    for table in tables:
        for name in TABLES[table]["models"]:
            if only is None or name in only:
                print(f"== table {table}: {name}", flush=True)
                results.append(measure(table, name, args.n, args.timeout))
    report(results)
    folder = Path(__file__).parent / "results"
    folder.mkdir(exist_ok=True)
    (folder / "toolbox.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
