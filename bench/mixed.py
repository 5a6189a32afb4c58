"""Mixed precision (recipes/mixed.yaml) on PP-OCRv4 rec: the accuracy-target mode against full int8.

The target is decoded-string agreement with fp32 (greedy CTC, onnxq.metrics:ctc_agreement) on the
calibration lines; the figures below are measured on held-out lines with the bench's headline metric
(models.ppocr.rec_string_agreement), and the 1-thread latency of one line, interleaved. Also prints the
chosen plan, the Pareto front, and the sensitivity time with 1 and 2 workers.

    python bench/mixed.py [--calib 64] [--eval 64] [--target 0.95] [--samples 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import latencies_ms, outputs  # noqa: E402
from models import ppocr, zoo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--target", type=float, default=0.95, help="string agreement on the calibration lines")
    parser.add_argument("--samples", type=int, default=32, help="calibration lines per sensitivity measurement")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--loss", default="kl", choices=["noise", "kl", "metric"])
    args = parser.parse_args()
    import onnxq

    source = zoo.fetch("ppocr_rec")
    with tempfile.TemporaryDirectory(prefix="onnxq-mixed-") as work:
        tmp = Path(work)
        calib = ppocr.make_npz("ppocr_rec", args.calib, tmp / "calib.npz", seed=0)
        evaluation = ppocr.make_npz("ppocr_rec", args.eval, tmp / "eval.npz", seed=1)
        name = ppocr.input_name("ppocr_rec")
        data = np.load(evaluation)[name]
        fp = outputs(source, {name: data})
        int8 = onnxq.run(source, "int8", calib=str(calib), output=tmp / "int8.onnx", validate=False).output
        mixed_sets = [
            "passes.mixed_precision.target.metric=models.ppocr:rec_agreement_metric",
            f"passes.mixed_precision.loss={args.loss}",
            f"passes.mixed_precision.target.min={args.target}",
            f"passes.mixed_precision.samples={args.samples}",
            f"passes.mixed_precision.target_samples={args.calib}",
        ]
        seconds = {}
        result = None
        for workers in args.workers:
            result = onnxq.run(
                source,
                "mixed",
                calib=str(calib),
                output=tmp / f"mixed{workers}.onnx",
                validate=False,
                overrides=[*mixed_sets, f"passes.mixed_precision.workers={workers}"],
            )
            seconds[workers] = result.artifacts["mixed_precision"]["seconds"]
        assert result is not None and result.output is not None
        mixed = result.output
        report = result.artifacts["mixed_precision"]
        times = latencies_ms({"fp32": source, "int8": int8, "mixed": mixed}, {name: data[:1]})

        def agreement(model: Path) -> float:
            return ppocr.rec_string_agreement(fp, outputs(model, {name: data}))

        print(f"PP-OCRv4 rec, {args.calib} calibration / {args.eval} held-out lines, target {args.target} on calib")
        print(f"{'model':8s} {'strings = fp32':>15s} {'1-thread ms':>12s} {'speedup':>8s}")
        for label, path in (("fp32", source), ("int8", int8), ("mixed", mixed)):
            score = 1.0 if label == "fp32" else agreement(Path(path))
            print(f"{label:8s} {score:15.3f} {times[label]:12.2f} {times['fp32'] / times[label]:8.2f}")
        chosen = [g for g in report["groups"] if g["choice"] != "int8"]
        print(f"plan: {len(report['groups']) - len(chosen)} of {len(report['groups'])} groups int8; kept in float:")
        for group in chosen:
            loss = group["options"].get("int8", {}).get("loss", float("nan"))
            print(f"  {group['node']:48s} {group['op_type']:8s} int8 loss {loss:.3g}")
        print("probes along the front (cost = predicted latency / fp32, score = ctc agreement on calib):")
        for probe in report.get("probes", []):
            print(f"  point {probe['index']:3d}: cost {probe['cost_ratio']:.3f}, score {probe['score']:.3f}")
        front = report["front"]
        print(f"Pareto front: {len(front)} points, cost {front[0]['cost_ratio']:.3f} … {front[-1]['cost_ratio']:.3f}")
        for point in front[:: max(1, len(front) // 8)]:
            print(f"  cost {point['cost_ratio']:.3f}  predicted loss {point['loss']:.4g}")
        agreement_text = ", ".join(f"{k} {v:.2f}" for k, v in report["proxy_agreement"].items())
        print(f"proxy rank agreement with measured (Spearman): {agreement_text}")
        for workers, timing in seconds.items():
            print(
                f"sensitivity with {workers} worker(s): {timing.get('sensitivity', 0):.1f} s "
                f"(pass total {timing['total']:.1f} s)"
            )


if __name__ == "__main__":
    main()
