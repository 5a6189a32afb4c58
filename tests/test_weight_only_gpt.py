"""Weight-only int4 on the committed tiny GPT (real text, real perplexity): what bench/weight_only.py
measures, pinned at CI size. GPTQ must close a real part of RTN's perplexity gap; embeddings become
GatherBlockQuantized; a tiny Hessian budget (one onnxruntime pass per weight) changes nothing important."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import onnxq
from models import tinygpt

CALIB = "models.tinygpt:calibration_feeds"


@pytest.fixture(scope="module")
def windows():  # type: ignore[no-untyped-def]
    return tinygpt.make_windows(tinygpt.eval_text(), n=48)


def _quantize(tmp: Path, name: str, overrides: list[str]) -> Path:
    settings = ["calibration.num_samples=16", *overrides]
    return onnxq.run(
        tinygpt.MODEL_PATH, "int4-weight", calib=CALIB, output=tmp / f"{name}.onnx", overrides=settings
    ).output


def test_gptq_closes_a_third_of_the_rtn_perplexity_gap(tmp_path: Path, windows) -> None:  # type: ignore[no-untyped-def]
    projections = "passes.assign_precision.targets=[MatMul,Gemm]"  # GPTQ's work: the embedding table is RTN either way
    fp32 = tinygpt.perplexity(tinygpt.MODEL_PATH, windows)
    rtn = tinygpt.perplexity(
        _quantize(tmp_path, "rtn", ["passes.quantize_weights.algorithm=rtn", projections]), windows
    )
    gptq = tinygpt.perplexity(_quantize(tmp_path, "gptq", [projections]), windows)
    assert fp32 < gptq < rtn < fp32 * 1.05, (fp32, gptq, rtn)
    assert (rtn - gptq) / (rtn - fp32) > 0.33, (fp32, gptq, rtn)  # bench, 128 windows: 0.76


def test_hessians_in_many_small_passes_give_the_same_quality(tmp_path: Path, windows) -> None:  # type: ignore[no-untyped-def]
    whole = tinygpt.perplexity(_quantize(tmp_path, "whole", []), windows)
    streamed = tinygpt.perplexity(
        _quantize(tmp_path, "streamed", ["passes.quantize_weights.hessian_budget_mb=0.1"]), windows
    )
    assert abs(streamed - whole) < 0.01 * whole, (whole, streamed)


def test_embedding_tables_become_gather_block_quantized_by_default(tmp_path: Path, windows) -> None:  # type: ignore[no-untyped-def]
    out = _quantize(tmp_path, "emb", ["passes.quantize_weights.algorithm=rtn"])
    ops = [n.op_type for n in onnx.load(out).graph.node]
    # the token table; the position table is read by Slice (pos_emb[:T]), not Gather, and stays float
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    assert out.stat().st_size < 0.2 * tinygpt.MODEL_PATH.stat().st_size
    fp32 = tinygpt.perplexity(tinygpt.MODEL_PATH, windows)
    assert tinygpt.perplexity(out, windows) < fp32 * 1.1
