"""Peak memory of weight-only quantization of a model over 2 GB (external data): onnxq vs onnxruntime.

Generates models/make_large.py's random decoder (default ~2.2 GiB) in a temporary folder, runs the onnxq
CLI on it in a child process (`--recipe int4-weight --set passes.quantize_weights.algorithm=rtn
--no-validate`: RTN needs no calibration data, and validation would run the float model in onnxruntime)
while sampling the resident memory of that process and its children (psutil; the kernel's own peak from
wait4 as well), and prints model size, output size, peak RSS, peak RSS / model size (goal ≤ 0.6) and wall
time. Then onnxruntime loads the output and runs one token. For reference, onnxruntime.quantization's
MatMulNBitsQuantizer (RTN, int4 blocks of 32, asymmetric: the same format) quantizes the same file in its
own process under a memory cap. Logits are compared with float on a small instance only: onnxruntime
would need the big float model's size in memory.

    .venv/bin/python bench/large_model.py                          # ~2.2 GiB model, about a minute
    .venv/bin/python bench/large_model.py --model big.onnx --no-ort --recipe w8-block
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import isolated, sqnr_db  # noqa: E402
from models import make_large  # noqa: E402

SMALL = make_large.Dims(hidden=512, layers=2, vocab=8000, heads=8)
GOAL = 0.6  # peak RSS / model size


def onnxq_command(model: Path, out: Path, recipe: str) -> list[str]:
    overrides = ["--set", "passes.quantize_weights.algorithm=rtn"] if recipe == "int4-weight" else []
    cli = [sys.executable, "-m", "onnxq", "run", str(model), "--recipe", recipe, *overrides]
    return [*cli, "--no-validate", "-q", "-o", str(out)]


def measure(command: list[str], interval: float = 0.02) -> dict[str, Any]:
    """Run `command`; its wall time and peak RSS: the larger of the sampled sum over the process tree and
    the kernel's high-water mark of the process itself (which sampling can miss between two samples)."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    peak, done = [0], threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    with contextlib.suppress(psutil.Error):  # a child that just exited
                        total += p.memory_info().rss
                peak[0] = max(peak[0], total)
                time.sleep(interval)
        except psutil.Error:  # exited before the first sample
            pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    log = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "seconds": seconds,
        "peak_rss_mb": max(peak[0] / 2**20, usage.ru_maxrss / 1024),
        "log": log[-2000:],
    }


def ort_quantize(model: str, out: str) -> str:
    """onnxruntime's weight-only int4 RTN, blocks of 32, asymmetric, saved with external data."""
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)  # one INFO line per node otherwise
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False)
    quantizer = nbits.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=False, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(out, use_external_data_format=True)
    return out


def run_tokens(model: str, ids: np.ndarray) -> np.ndarray:
    """Logits of `ids` (int64 [batch, seq]) on onnxruntime's CPU provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {make_large.INPUT_NAME: ids})[0]


def one_token(model: str) -> str:
    logits = run_tokens(model, np.array([[7]], np.int64))
    finite = bool(np.isfinite(logits).all())
    return f"logits {list(logits.shape)}, {'finite' if finite else 'NOT FINITE'}"


def check_output(model: Path) -> str:
    """Load the model in onnxruntime (in its own process) and run one token."""
    found = isolated(one_token, str(model))
    return found.get("value") or f"FAILED ({found.get('error')})"


def small_fidelity(folder: Path, recipe: str, with_ort: bool) -> dict[str, float]:
    """Logits SQNR vs float on a small instance of the same decoder (4 sequences of 32 random tokens)."""
    model = make_large.write_model(folder / "small.onnx", SMALL, seed=1)
    ids = np.random.default_rng(2).integers(0, SMALL.vocab, (4, 32)).astype(np.int64)
    reference = run_tokens(str(model), ids)
    found = {}
    out = folder / "small.q.onnx"
    done = subprocess.run(onnxq_command(model, out, recipe), cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxq failed on the small instance:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found["onnxq"] = sqnr_db(reference, run_tokens(str(out), ids))
    if with_ort:
        ort_out = folder / "small.ort.onnx"
        ort_quantize(str(model), str(ort_out))
        found["onnxruntime"] = sqnr_db(reference, run_tokens(str(ort_out), ids))
    return found


def _row(label: str, run: dict[str, Any], model_size: int, out: Path) -> str:
    if "error" in run:
        return f"{label:<34} {run['error']}"
    out_size = make_large.model_bytes(out) if out.exists() else 0
    peak = run["peak_rss_mb"] * 2**20
    return (
        f"{label:<34} {model_size / 2**30:>8.2f} {out_size / 2**30:>9.2f} {peak / 2**30:>9.2f} "
        f"{peak / model_size:>6.2f} {run['seconds']:>8.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="reuse this model instead of generating one")
    parser.add_argument("--gb", type=float, default=2.2, help="size of the generated model in GiB")
    parser.add_argument("--recipe", default="int4-weight", choices=["int4-weight", "w8-block"])
    parser.add_argument("--no-ort", action="store_true", help="skip onnxruntime's quantizer")
    parser.add_argument("--ort-cap-gb", type=float, default=16.0, help="address-space cap for onnxruntime's run")
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.recipe != "int4-weight":
        args.no_ort = True  # onnxruntime's reference is the int4 format
    work = args.workdir or Path(tempfile.mkdtemp(prefix="onnxq-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.model is None:
            started = time.perf_counter()
            dims = make_large.Dims(layers=make_large.layers_for(args.gb, 2048, 32000))
            model = make_large.write_model(work / "large.onnx", dims)
            print(f"generated {model} in {time.perf_counter() - started:.1f} s")
        else:
            model = args.model
        size = make_large.model_bytes(model)
        out = work / "large.q.onnx"
        run = measure(onnxq_command(model, out, args.recipe))
        if run["rc"] != 0:
            print(run["log"])
            return 1
        rows = [_row(f"onnxq {args.recipe} (RTN)", run, size, out)]
        ratio = run["peak_rss_mb"] * 2**20 / size
        checks = [f"onnxq output: {check_output(out)}", f"onnxq peak RSS / model size {ratio:.2f}: goal ≤ {GOAL}"]
        if not args.no_ort:
            ort_out = work / "large.ort.onnx"
            ort = isolated(ort_quantize, str(model), str(ort_out), memory_cap_gb=args.ort_cap_gb, timeout=3600)
            rows.append(_row("onnxruntime MatMulNBitsQuantizer", ort, size, ort_out))
            if "error" not in ort:
                checks.append(f"onnxruntime output: {check_output(ort_out)}")
        fidelity = small_fidelity(work, args.recipe, not args.no_ort)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'quantizer':<34} {'model GiB':>8} {'output GiB':>9} {'peak GiB':>9} {'ratio':>6} {'seconds':>8}")
    print("\n".join(rows))
    print("\n".join(checks))
    shape = f"{SMALL.layers} layers of {SMALL.hidden}, vocab {SMALL.vocab}"
    print(f"logits SQNR vs float, small instance ({shape}, 4 × 32 tokens):")
    print("\n".join(f"  {name:<12} {value:6.2f} dB" for name, value in fidelity.items()))
    return 0 if ratio <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
