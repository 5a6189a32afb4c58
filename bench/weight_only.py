"""Weight-only int4 (W4A16): onnxq RTN / GPTQ / AWQ vs onnxruntime's matmul_nbits_quantizer, same data, one run.

Models: the tiny GPT (models/tinygpt, committed; metric: perplexity on held-out stdlib text) and
all-MiniLM-L6-v2 (needs `.venv-build/bin/python models/minilm_export.py` once; metrics: sentence-embedding
cosine vs fp32 and Spearman of pairwise similarities). For block 32 and 128 it prints, per quantizer:
size ratio vs fp32, accuracy, quantize time and peak RSS (each quantizer in its own process), and the
1-thread speed vs fp32 (interleaved rounds) on a full sequence and at the one-token shape of decoding.
Both tools quantize asymmetric uint4 weights of every MatMul that has one; the "+ emb" row also puts the
embedding tables in int4 (GatherBlockQuantized). onnxruntime's GPTQ and HQQ import torch, which onnxq
never needs: without it their rows say so.

    python bench/weight_only.py [--models gpt,minilm] [--blocks 32,128] [--no-ort-gptq]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import isolated, latencies_ms  # noqa: E402


def onnxq_quantize(model: str, calib: str, samples: int, block: int, out: str, overrides: list[str]) -> str:
    import onnxq

    settings = [f"calibration.num_samples={samples}", f"defaults.weights.block_size={block}", *overrides]
    onnxq.run(model, "int4-weight", calib=calib, output=out, overrides=settings, validate=False)
    return out


def ort_quantize(model: str, calib: str, samples: int, block: int, out: str, algo: str) -> str:
    import importlib

    import onnx
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    module, function = calib.split(":")
    feeds = list(getattr(importlib.import_module(module), function)(samples))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.items, None)

        def rewind(self) -> None:
            self.items = iter(feeds)

    configs: dict[str, Callable[[], Any]] = {
        "rtn": lambda: nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False),
        "gptq": lambda: nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block),
        "hqq": lambda: nbits.HQQWeightOnlyQuantConfig(block_size=block),
    }
    quantizer = nbits.MatMulNBitsQuantizer(
        onnx.load(model), block_size=block, is_symmetric=False, algo_config=configs[algo]()
    )
    quantizer.process()
    quantizer.model.save_model_to_file(out, use_external_data_format=False)
    return out


class Task:
    """A model, its calibration callable and its accuracy metric."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "gpt":
            from models import tinygpt

            self.model = str(tinygpt.MODEL_PATH)
            self.calib, self.samples = "models.tinygpt:calibration_feeds", 32
            self.windows = tinygpt.make_windows(tinygpt.eval_text(), n=128)
            self.sample = {tinygpt.INPUT_NAME: self.windows[:1]}
            self.step = {tinygpt.INPUT_NAME: self.windows[:1, :1]}  # one token: the decode-time shape
            self.reference = tinygpt.perplexity(self.model, self.windows)
        else:
            from models import minilm

            self.model = str(minilm.model_path())
            self.calib, self.samples = "models.minilm:calibration_feeds", 64
            self.feeds = minilm.make_inputs(64, seed=1)
            self.sample = max(self.feeds, key=lambda f: f["input_ids"].shape[1])
            self.step = {k: v[:, :2] for k, v in self.sample.items()}  # [CLS] and one token
            self.reference = minilm.embeddings(self.model, self.feeds)

    def header(self) -> str:
        return "perplexity" if self.name == "gpt" else "cos mean  cos min  spearman"

    def score(self, path: str) -> str:
        if self.name == "gpt":
            from models import tinygpt

            return f"{tinygpt.perplexity(path, self.windows):10.4f}"
        from models import minilm

        emb = minilm.embeddings(path, self.feeds)
        cos = minilm.cosine_per_row(self.reference, emb)
        rho = minilm.spearman_of_pairwise_similarities(self.reference, emb)
        return f"{cos.mean():8.4f} {cos.min():8.4f} {rho:9.4f}"

    def fp32_row(self) -> str:
        if self.name == "gpt":
            return f"{self.reference:10.4f}"
        return f"{1.0:8.4f} {1.0:8.4f} {1.0:9.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt,minilm")
    parser.add_argument("--blocks", default="32,128")
    parser.add_argument("--no-ort-gptq", action="store_true", help="skip onnxruntime's GPTQ (slow on MiniLM)")
    args = parser.parse_args()
    onnxq_variants = {
        "onnxq rtn": ["passes.quantize_weights.algorithm=rtn"],
        # onnxruntime's quantizer leaves accuracy_level 0 (fp32 activations): the same kernel setting
        "onnxq rtn, level 0": ["passes.quantize_weights.algorithm=rtn", "passes.to_matmul_nbits.accuracy_level=0"],
        "onnxq gptq": [],
        "onnxq awq": ["passes.quantize_weights.algorithm=rtn", "passes.quantize_weights.awq=true"],
        "onnxq awq+gptq": ["passes.quantize_weights.awq=true"],
        "onnxq gptq + emb": ["passes.assign_precision.targets=[MatMul,Gemm,Gather]"],
    }
    ort_variants = ["rtn", "hqq"] + ([] if args.no_ort_gptq else ["gptq"])
    for name in args.models.split(","):
        try:
            task = Task(name)
        except FileNotFoundError as exc:
            print(f"\n{name}: skipped ({exc})")
            continue
        fp32_size = os.path.getsize(task.model)
        for block in (int(b) for b in args.blocks.split(",")):
            print(f"\n== {name}, int4 block {block} ==")
            columns = f"{'time s':>7s} {'RSS MB':>7s} {'speed':>6s} {'@1 tok':>6s}"
            print(f"{'quantizer':20s} {'size':>6s} {task.header():>28s} {columns}")
            print(f"{'fp32':20s} {1.0:6.3f} {task.fp32_row():>28s}")
            with tempfile.TemporaryDirectory(prefix="onnxq-wo-") as work:
                runs: dict[str, dict[str, Any]] = {}
                for label, overrides in onnxq_variants.items():
                    out = str(Path(work) / f"{len(runs)}.onnx")
                    runs[label] = isolated(onnxq_quantize, task.model, task.calib, task.samples, block, out, overrides)
                for algo in ort_variants:
                    out = str(Path(work) / f"{len(runs)}.onnx")
                    runs[f"ort {algo}"] = isolated(
                        ort_quantize, task.model, task.calib, task.samples, block, out, algo, timeout=900
                    )
                done = {label: run["value"] for label, run in runs.items() if "value" in run}
                latency = latencies_ms({"fp32": task.model, **done}, task.sample, budget_s=8.0)
                step = latencies_ms({"fp32": task.model, **done}, task.step, budget_s=4.0)
                for label, run in runs.items():
                    if "error" in run:
                        print(f"{label:20s} failed: {run['error'][:110]}")
                        continue
                    path = run["value"]
                    print(
                        f"{label:20s} {os.path.getsize(path) / fp32_size:6.3f} {task.score(path):>28s} "
                        f"{run['seconds']:7.1f} {run['peak_rss_mb']:7.0f} {latency['fp32'] / latency[label]:6.2f} "
                        f"{step['fp32'] / step[label]:6.2f}"
                    )


if __name__ == "__main__":
    main()
