"""Does the localization point at the right nodes? PP-OCRv4 rec quantized with `int8`; the top-k culprits
the localization ranks, kept in float by the what-if, against k randomly chosen quantized nodes kept in
float (several draws). Metric: decoded strings equal to fp32's on held-out rendered text lines.

    python bench/localize_rec.py [--calib 32] [--eval 64] [--k 5] [--draws 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import outputs  # noqa: E402
from models import ppocr, zoo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    import onnx

    import onnxq
    from onnxq import ir as onnxq_ir
    from onnxq.calibration.readers import input_specs
    from onnxq.localize import keep_float, localize

    source = zoo.fetch("ppocr_rec")
    with tempfile.TemporaryDirectory(prefix="onnxq-loc-") as work:
        tmp = Path(work)
        calib = ppocr.make_npz("ppocr_rec", args.calib, tmp / "calib.npz", seed=0)
        evaluation = ppocr.make_npz("ppocr_rec", args.eval, tmp / "eval.npz", seed=1)
        quantized = onnxq.run(source, "int8", calib=str(calib), output=tmp / "q.onnx", validate=False).output
        # the float graph the quantized one was lowered from: its tensor names match one to one
        reference = onnxq.run(source, "int8", calib=str(calib), dry_run=True).model
        data = np.load(evaluation)
        name = ppocr.input_name("ppocr_rec")
        fp = outputs(source, {name: data[name]})

        def agreement(model: str | Path) -> float:
            return ppocr.rec_string_agreement(fp, outputs(model, {name: data[name]}))

        specs = input_specs(onnxq_ir.load(source))
        started = time.perf_counter()
        found = localize(
            onnxq_ir.to_proto(reference), quantized, lambda: iter({name: x[None]} for x in data[name]), specs
        )
        seconds = time.perf_counter() - started
        proto = onnx.load(quantized)
        top = found.top(args.k)
        kept, unchanged = keep_float(proto, top)
        onnx.save(kept, tmp / "top.onnx")
        print(f"int8: strings equal to fp32 on {agreement(quantized):.3f} of {args.eval} lines")
        print(
            f"localization: {seconds:.1f} s, {found.samples} samples, {len(found.nodes)} nodes ranked; top quantized:"
        )
        for node in [n for n in found.nodes if n.quantized][: args.k]:
            print(f"  {node.name:48s} {node.op_type:10s} drop {node.drop_db:6.1f} dB (output {node.sqnr_db:5.1f} dB)")
        print(
            f"top-{args.k} kept in float: {agreement(tmp / 'top.onnx'):.3f}"
            + (f" (unchanged: {unchanged})" if unchanged else "")
        )
        producers = {out: n.op_type for n in proto.graph.node for out in n.output}
        quantized_nodes = [
            n.name
            for n in proto.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(producers.get(i) == "DequantizeLinear" for i in n.input)
        ]
        scores = []
        rng = random.Random(0)
        for draw in range(args.draws):
            chosen = rng.sample(quantized_nodes, args.k)
            kept, _ = keep_float(proto, chosen)
            onnx.save(kept, tmp / f"random{draw}.onnx")
            scores.append(agreement(tmp / f"random{draw}.onnx"))
        print(
            f"{args.k} random quantized nodes kept in float ({args.draws} draws of {len(quantized_nodes)}): "
            f"mean {np.mean(scores):.3f}, best {max(scores):.3f}, worst {min(scores):.3f}"
        )


if __name__ == "__main__":
    main()
