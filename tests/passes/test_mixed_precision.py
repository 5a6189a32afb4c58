"""mixed_precision end to end: measured sensitivity, budgets in bytes/bit-ops, the accuracy-target search, and
what the lowering makes of the plan, all through real onnxruntime runs."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import small_cnn, tiny_transformer, transformer_data

import onnxq
from onnxq.qmath import sqnr_db


def _recipe(mixed: dict[str, Any], opset: int = 13, weight_only: bool = False) -> dict[str, Any]:
    defaults = (
        {"activations": {"dtype": "fp32"}, "weights": {"dtype": "uint4", "granularity": "block", "block_size": 32}}
        if weight_only
        else {}
    )
    return {
        "name": "mixed-test",
        "calibration": {"num_samples": 32},
        **({"defaults": defaults} if defaults else {}),
        "passes": [
            {"upgrade_opset": {"target": opset}},
            {"simplify": {"onnxsim": False}},
            {"fold_batchnorm": {}},
            {"assign_precision": {"targets": ["Conv", "MatMul", "Gemm"]}},
            {"mixed_precision": mixed},
            *([{"quantize_weights": {"algorithm": "rtn"}}] if weight_only else [{"insert_qdq": {}}]),
            {"lower_fp16": {}},
            {"cleanup": {}},
        ],
        "validate": {"enabled": False},
    }


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cnn")
    onnx.save(small_cnn(), tmp / "cnn.onnx")
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)
    np.savez(tmp / "calib.npz", x=x)
    return tmp / "cnn.onnx", tmp / "calib.npz"


@pytest.fixture(scope="module")
def block(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("block")
    onnx.save(tiny_transformer(), tmp / "block.onnx")
    np.savez(tmp / "calib.npz", x=transformer_data(32, seed=0))
    return tmp / "block.onnx", tmp / "calib.npz"


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])


def _table(report: dict[str, Any]) -> list[dict[str, dict[str, float]]]:
    return [{c: {"cost": o["cost"], "loss": o["loss"]} for c, o in g["options"].items()} for g in report["groups"]]


def test_budget_mode_picks_the_brute_force_optimum_of_its_measured_table(
    cnn: tuple[Path, Path], tmp_path: Path
) -> None:
    source, calib = cnn
    mixed = {"candidates": ["fp32", "int8"], "objective": "size", "budget": 0.6}
    result = onnxq.run(source, _recipe(mixed), calib=str(calib), output=tmp_path / "q.onnx")
    report = result.artifacts["mixed_precision"]
    table = _table(report)
    assert len(table) == 5  # conv1 (BN folded), conv_a, conv_b, conv2 and the fc Gemm
    budget = 0.6 * report["cost_fp32"] - report["cost_rest"]
    best = min(
        sum(table[g][c]["loss"] for g, c in enumerate(combo))
        for combo in itertools.product(*[list(options) for options in table])
        if sum(table[g][c]["cost"] for g, c in enumerate(combo)) <= budget
    )
    chosen = sum(table[g][group["choice"]]["loss"] for g, group in enumerate(report["groups"]))
    assert chosen == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert report["chosen_cost_ratio"] <= 0.6
    assert report["greedy"]["loss"] >= chosen - 1e-12
    # the lowering follows the plan: one integer weight per int8 group, the fp32 ones keep float weights
    int8 = sum(g["choice"] == "int8" for g in report["groups"])
    proto = onnx.load(result.output)
    weight_dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert 0 < int8 < len(table)
    assert len({n.input[0] for n in weight_dqs}) >= int8
    x = np.load(calib)["x"]
    assert sqnr_db(_outputs(source, x), _outputs(result.output, x)) > 15


def test_measured_losses_follow_the_precision(cnn: tuple[Path, Path]) -> None:
    """int16-free CNN at opset 13: fp16 loses orders of magnitude less than int8 on every group."""
    source, calib = cnn
    mixed = {"candidates": ["fp32", "fp16", "int8"], "objective": "size", "budget": 0.9}
    report = onnxq.run(source, _recipe(mixed), calib=str(calib), dry_run=True).artifacts["mixed_precision"]
    for group in report["groups"]:
        options = group["options"]
        assert options["fp32"]["loss"] == 0.0
        assert 0 < options["fp16"]["loss"] < options["int8"]["loss"] / 100
        assert options["fp16"]["cost"] == pytest.approx(options["fp32"]["cost"] / 2)


def test_fp16_choice_is_lowered_with_casts_and_runs(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    source, calib = cnn
    # only fp16 and fp32 allowed, half the weight bytes: every group that fits goes fp16
    mixed = {"candidates": ["fp32", "fp16"], "objective": "size", "budget": 0.75}
    result = onnxq.run(source, _recipe(mixed), calib=str(calib), output=tmp_path / "h.onnx")
    report = result.artifacts["mixed_precision"]
    fp16 = [g["node"] for g in report["groups"] if g["choice"] == "fp16"]
    assert fp16
    proto = onnx.load(result.output)
    halves = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) >= len(fp16)
    assert any(n.op_type == "Cast" for n in proto.graph.node)
    x = np.load(calib)["x"]
    assert sqnr_db(_outputs(source, x), _outputs(result.output, x)) > 45


def test_target_mode_returns_the_cheapest_probe_that_meets_the_target(block: tuple[Path, Path], tmp_path: Path) -> None:
    source, calib = block
    mixed = {"candidates": ["fp32", "int8"], "objective": "bitops", "target": {"metric": "sqnr", "min": 30.0}}
    result = onnxq.run(source, _recipe(mixed), calib=str(calib), output=tmp_path / "t.onnx")
    report = result.artifacts["mixed_precision"]
    probes = report["probes"]
    chosen = report["chosen"]
    assert chosen["score"] >= 30.0
    assert all(p["score"] < 30.0 for p in probes if p["cost_ratio"] < chosen["cost_ratio"])
    assert chosen["cost_ratio"] < 1.0  # something was quantized
    assert any("target sqnr ≥ 30 dB met with" in note and " dB at " in note for note in result.notes)
    # the saved model is what the probe measured: the same samples give the same SQNR
    x = np.load(calib)["x"]
    assert sqnr_db(_outputs(source, x), _outputs(result.output, x)) == pytest.approx(chosen["score"], abs=0.05)


def test_an_unreachable_target_keeps_the_best_model_and_says_so(block: tuple[Path, Path], tmp_path: Path) -> None:
    source, calib = block
    mixed = {"candidates": ["int8"], "objective": "bitops", "target": {"metric": "sqnr", "min": 200.0}}
    result = onnxq.run(source, _recipe(mixed), calib=str(calib), output=tmp_path / "u.onnx")
    assert result.output is not None and result.output.exists()
    assert any("not met; kept the best found" in note for note in result.notes)


def test_weight_only_mix_lowers_each_choice_to_its_block_type(block: tuple[Path, Path], tmp_path: Path) -> None:
    source, calib = block
    mixed = {"candidates": ["w4", "w8"], "objective": "size", "budget": 0.24, "loss": "noise"}
    result = onnxq.run(source, _recipe(mixed, opset=21, weight_only=True), calib=str(calib), output=tmp_path / "w.onnx")
    report = result.artifacts["mixed_precision"]
    choices = [g["choice"] for g in report["groups"]]
    assert sorted(set(choices)) == ["w4", "w8"]
    proto = onnx.load(result.output)
    kinds = {t.name: t.data_type for t in proto.graph.initializer}
    blocked = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and kinds.get(n.input[0]) is not None]
    types = sorted(kinds[n.input[0]] for n in blocked)
    assert types.count(onnx.TensorProto.INT8) == choices.count("w8")
    assert types.count(onnx.TensorProto.UINT4) == choices.count("w4")
    # the measured table is consistent with bits: 8-bit blocks lose less than 4-bit ones on every weight
    for group in report["groups"]:
        assert group["options"]["w8"]["loss"] < group["options"]["w4"]["loss"]
    assert report["proxy_agreement"]["diag_hessian"] > 0.5


def test_workers_measure_the_same_losses(block: tuple[Path, Path]) -> None:
    source, calib = block
    losses = []
    for workers in (1, 2):
        mixed = {"candidates": ["fp32", "int8"], "objective": "bitops", "budget": 0.5, "workers": workers}
        report = onnxq.run(source, _recipe(mixed), calib=str(calib), dry_run=True).artifacts["mixed_precision"]
        losses.append([g["options"]["int8"]["loss"] for g in report["groups"]])
        assert report["workers"] == workers
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxq", *args], capture_output=True, text=True, timeout=300)


def test_dry_run_prints_the_plan_and_a_low_budget_is_a_one_line_error(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    source, calib = cnn
    shown = _cli("run", str(source), "--recipe", "mixed", "--calib", str(calib), "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert "conv_a" in shown.stdout and "mixed_precision" in shown.stdout + shown.stderr
    assert not list(source.parent.glob("cnn.q.onnx*"))
    low = _cli(
        "run",
        str(source),
        "--recipe",
        "mixed",
        "--calib",
        str(calib),
        "--set",
        "passes.mixed_precision.budget=0.01",
        "--set",
        "passes.mixed_precision.objective=size",
        "-o",
        str(tmp_path / "never.onnx"),
    )
    assert low.returncode == 2
    lines = [line for line in low.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "below the cheapest configuration" in lines[0], low.stderr
    assert "Traceback" not in low.stderr
    assert not (tmp_path / "never.onnx").exists()


def test_int16_activation_candidate_loses_less_than_int8_and_lowers_to_uint16(
    block: tuple[Path, Path], tmp_path: Path
) -> None:
    source, calib = block
    mixed = {"candidates": ["int16", "int8"], "objective": "bitops", "budget": 0.1}
    result = onnxq.run(source, _recipe(mixed, opset=21), calib=str(calib), output=tmp_path / "i16.onnx")
    report = result.artifacts["mixed_precision"]
    # same int8 weights; o_proj reads the attention MatMul's int8 output either way (not a group: no weight)
    pairs = [(g["options"]["int16"]["loss"], g["options"]["int8"]["loss"]) for g in report["groups"]]
    assert all(a <= b for a, b in pairs)
    assert sum(a < b for a, b in pairs) >= 4  # all but o_proj (and onnxruntime's rounding of ties)
    assert sum(a for a, _ in pairs) < sum(b for _, b in pairs) / 2
    choices = [g["choice"] for g in report["groups"]]
    assert "int16" in choices and "int8" in choices
    proto = onnx.load(result.output)
    zero_types = {t.name: t.data_type for t in proto.graph.initializer}
    q_types = [
        zero_types.get(n.input[2]) for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
    ]
    assert onnx.TensorProto.UINT16 in q_types and onnx.TensorProto.UINT8 in q_types
    x = np.load(calib)["x"]
    assert sqnr_db(_outputs(source, x), _outputs(result.output, x)) > 25


def test_latency_costs_are_measured_once_and_reused_from_the_stats_file(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    """A rerun with another budget reads the variants' timings from OUTPUT.calib.json instead of timing again."""
    import json

    source, calib = cnn
    costs = []
    for budget in (2.0, 3.0):  # int8 may well be slower than fp32 on a model this small
        mixed = {"candidates": ["fp32", "int8"], "objective": "latency", "budget": budget, "samples": 4}
        result = onnxq.run(source, _recipe(mixed), calib=str(calib), output=tmp_path / "lat.onnx")
        notes = [n for n in result.notes if "latency all-int8" in n]
        assert len(notes) == 1 and notes[0].endswith(", cached") == (budget == 3.0), notes
        costs.append(_table(result.artifacts["mixed_precision"]))
    assert costs[0] == costs[1]  # the same timings, not a second measurement
    stored = json.loads((tmp_path / "lat.onnx.calib.json").read_text())["measurements"]
    assert len(stored) == 1 and set(next(iter(stored.values()))) == {"float_ms", "quantized_ms"}


def test_refine_measures_switches_around_the_plan_and_drops_a_round_that_measures_worse(
    block: tuple[Path, Path], tmp_path: Path
) -> None:
    """At this budget the re-linearised table proposes moving two groups, the whole-model measurement says
    that is worse, so the round is reported and the one-shot plan is kept (within the budget)."""
    source, calib = block

    def plan(refine: int) -> dict[str, Any]:
        mixed = {"candidates": ["w4", "w8"], "objective": "size", "budget": 0.28, "loss": "noise", "refine": refine}
        recipe = _recipe(mixed, opset=21, weight_only=True)
        return onnxq.run(source, recipe, calib=str(calib), output=tmp_path / f"r{refine}.onnx").artifacts[
            "mixed_precision"
        ]

    one_shot, refined = plan(0), plan(2)
    assert "refine" not in one_shot
    (round_,) = refined["refine"]
    assert round_["changed_groups"] == 2 and not round_["accepted"]
    assert round_["measured_after"] > round_["measured_before"] > 0
    assert [g["choice"] for g in refined["groups"]] == [g["choice"] for g in one_shot["groups"]]
    assert refined["chosen_cost_ratio"] <= 0.28


@pytest.mark.parametrize("spatial", [1, 3])
def test_conv1d_and_conv3d_get_proxies_and_a_plan(tmp_path: Path, spatial: int) -> None:
    """The Hessian proxies spread per-channel input energy over a weight of any rank (audio Conv1d, video
    Conv3d), not only the 4-D weights of image models."""
    rng = np.random.default_rng(0)
    helper = onnx.helper
    kernel, size = [3] * spatial, [6] * spatial
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w0"], ["a"], pads=[1] * 2 * spatial),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Conv", ["b", "w1"], ["y"], pads=[1] * 2 * spatial),
        ],
        "conv_nd",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 2, *size])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, *size])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((8, 2, *kernel)).astype(np.float32) * 0.3, "w0"),
            onnx.numpy_helper.from_array(rng.standard_normal((4, 8, *kernel)).astype(np.float32) * 0.2, "w1"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 2, *size)).astype(np.float32))
    for sensitivity in ("diag_hessian", "measured"):
        mixed = {"candidates": ["fp32", "int8"], "objective": "size", "budget": 0.6, "sensitivity": sensitivity}
        result = onnxq.run(
            tmp_path / "m.onnx", _recipe(mixed), calib=str(tmp_path / "calib.npz"), output=tmp_path / "q.onnx"
        )
        report = result.artifacts["mixed_precision"]
        assert [g["choice"] for g in report["groups"]].count("int8") >= 1
        assert all(g["options"]["int8"]["diag_hessian"] > 0 for g in report["groups"])
