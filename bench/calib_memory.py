"""Calibration memory is flat in the number of samples: peak RSS at 16 vs 256 samples, onnxq vs onnxruntime.

Data is a folder of .npz shards (8 samples each), the form onnxq streams from. Each measurement runs in a
fresh process, so the peak RSS is that calibration's own. Goal: onnxq RSS(256) / RSS(16) <= 1.15.

    python bench/calib_memory.py                 # PP-OCRv4 det at 320x320
    python bench/calib_memory.py --model rec --counts 16,256
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import isolated  # noqa: E402
from models import ppocr, zoo  # noqa: E402

SHARD = 8


def write_shards(name: str, count: int, folder: Path, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, count, SHARD)):
        n = min(SHARD, count - start)
        if name == "ppocr_det":
            arrays = {ppocr.input_name(name): ppocr.det_inputs(n, size=size, seed=start)}
        else:
            arrays = ppocr.make_inputs(name, n, seed=start)
        np.savez(folder / f"{index:05d}.npz", **arrays)
    return folder


def calibrate_onnxq(model: str, folder: str, count: int) -> int:
    import onnxq
    from onnxq import ir as onnxq_ir
    from onnxq.calibration.readers import input_specs, open_data
    from onnxq.calibration.session import collect_ranges
    from onnxq.passes import AssignPrecision

    m = onnxq_ir.load(model)
    AssignPrecision()(m)
    names = [n.outputs[0].name for n in m.graph if n.op_type in ("Conv", "MatMul", "Gemm")]
    data = open_data(folder, input_specs(m), count)
    ranges, _ = collect_ranges(m, names, data)
    del onnxq
    return len(ranges)


def calibrate_ort(model: str, folder: str, count: int) -> int:
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationDataReader, create_calibrator

    proto = onnx.load(model)
    proto.ir_version = min(proto.ir_version, 8)
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    onnx.save(proto, path)
    name = proto.graph.input[0].name
    shards = sorted(Path(folder).glob("*.npz"))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            every = (x[i : i + 1] for shard in shards for x in [np.load(shard)[name]] for i in range(len(x)))
            self.samples = itertools.islice(every, count)

        def get_next(self):  # type: ignore[no-untyped-def]
            sample = next(self.samples, None)
            return None if sample is None else {name: sample}

    calibrator = create_calibrator(path, augmented_model_path=str(path.with_name("augmented.onnx")))
    calibrator.collect_data(Reader())
    ranges = calibrator.compute_data()
    return len(getattr(ranges, "data", ranges))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="det", choices=["det", "rec", "cls"])
    parser.add_argument("--counts", default="16,256")
    parser.add_argument("--size", type=int, default=320, help="det image side")
    parser.add_argument("--skip-ort", action="store_true")
    args = parser.parse_args()
    name = f"ppocr_{args.model}"
    model = str(zoo.fetch(name))
    counts = [int(c) for c in args.counts.split(",")]
    results: dict[str, dict[int, dict]] = {"onnxq": {}, "onnxruntime": {}}
    with tempfile.TemporaryDirectory(prefix="onnxq-calib-mem-") as work:
        folder = write_shards(name, max(counts), Path(work) / "data", args.size)
        for count in counts:
            results["onnxq"][count] = isolated(calibrate_onnxq, model, str(folder), count)
            if not args.skip_ort:
                results["onnxruntime"][count] = isolated(calibrate_ort, model, str(folder), count)
    print(f"{name}: calibration peak RSS (MB) and time (s) by sample count, minmax")
    for tool, by_count in results.items():
        if not by_count:
            continue
        cells = []
        for count, r in by_count.items():
            cells.append(
                f"{count}: {r['error']}" if "error" in r else f"{count}: {r['peak_rss_mb']:.0f} MB {r['seconds']:.1f} s"
            )
        line = "  ".join(cells)
        ok = [r for r in by_count.values() if "error" not in r]
        if len(ok) == len(counts) >= 2:
            line += f"  ratio RSS({counts[-1]})/RSS({counts[0]}) = {ok[-1]['peak_rss_mb'] / ok[0]['peak_rss_mb']:.2f}"
        print(f"  {tool:12s} {line}")


if __name__ == "__main__":
    main()
