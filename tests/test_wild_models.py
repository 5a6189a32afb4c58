"""Models as they come from the wild: If/Loop/Scan subgraphs, opsets 10–23, custom and contrib ops,
symbolic dims, weights in Constant nodes. Every output is loaded by onnx.checker and run by onnxruntime."""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import conv_matmul, custom_op_model, if_model, loop_model, scan_model, tiny_transformer, transformer_data
from ort_util import optimized_model

import onnxq
from onnxq.qmath import sqnr_db

Feeds = dict[str, np.ndarray]


def subgraph_ops(graph: onnx.GraphProto, path: str = "") -> collections.Counter[str]:
    """Op types inside subgraphs, keyed 'then_branch:MatMul', 'body/then_branch:MatMul', …"""
    found: collections.Counter[str] = collections.Counter()
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                inner = f"{path}/{attr.name}" if path else attr.name
                found.update(f"{inner}:{n.op_type}" for n in attr.g.node)
                found.update(subgraph_ops(attr.g, inner))
    return found


def main_ops(path: Path | str) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def run_each(path: Path | str, feeds: Feeds) -> list[np.ndarray]:
    """Outputs for each sample run alone (control flow decides per run), stacked on axis 0."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    count = next(iter(feeds.values())).shape[0]
    runs = [session.run(None, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(count)]
    return [np.concatenate(outs) for outs in zip(*runs, strict=True)]


def quantize(
    tmp_path: Path, model: onnx.ModelProto, calib: Feeds, recipe: str = "int8", sets: tuple[str, ...] = ()
) -> tuple[Path, Path, onnxq.runner.Result]:
    source, data = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(model, source)
    np.savez(data, **calib)
    result = onnxq.run(
        source, recipe, calib=str(data), output=tmp_path / "q.onnx", validate=False, overrides=list(sets)
    )
    onnx.checker.check_model(onnx.load(str(result.output)), full_check=True)
    return source, result.output, result  # type: ignore[return-value]


def _normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _loop_data(n: int, seed: int) -> Feeds:
    x = _normal((n, 16), seed)
    x[::4] = -np.abs(x[::4]) - 0.1  # max(x) ≤ 0: the loop runs zero times on these samples
    x[1::2] += 1.0  # mean(x) > 0.5: the nested If takes its then branch
    return {"x": x}


MODELS: dict[str, tuple[Callable[[], onnx.ModelProto], Callable[[int, int], Feeds]]] = {
    "if": (if_model, lambda n, seed: {"x": _normal((n, 16), seed)}),
    "loop": (loop_model, _loop_data),
    "loop_nested_if": (lambda: loop_model(nested_if=True), _loop_data),
    "scan": (scan_model, lambda n, seed: {"x": _normal((n, 5, 16), seed), "h0": _normal((n, 16), seed + 100)}),
}


# --- subgraphs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODELS))
def test_subgraphs_are_kept_float_by_default_and_the_model_stays_valid(tmp_path: Path, kind: str) -> None:
    build, data = MODELS[kind]
    model = build()
    source, output, result = quantize(tmp_path, model, data(24, 0))
    assert subgraph_ops(onnx.load(str(output)).graph) == subgraph_ops(model.graph)  # not one node changed
    assert sum("kept in float (subgraphs: keep)" in note for note in result.notes) == 1
    feeds = data(12, 1)
    for reference, quantized in zip(run_each(source, feeds), run_each(output, feeds), strict=True):
        assert sqnr_db(reference, quantized) > 20
    assert main_ops(output)["QuantizeLinear"] == 2


def test_a_kept_branch_computes_exactly_what_the_float_model_does(tmp_path: Path) -> None:
    source, output, _ = quantize(tmp_path, if_model(), {"x": _normal((24, 16), 0)})
    feeds = {"x": _normal((12, 16), 1)}
    (y_float, branch_float), (y_quant, branch_quant) = run_each(source, feeds), run_each(output, feeds)
    np.testing.assert_array_equal(branch_quant, branch_float)  # x reaches the If unrounded
    assert 20 < sqnr_db(y_float, y_quant) < 60


# Q/DQ inside each subgraph with `subgraphs: quantize`, and what onnxruntime turns them into.
QUANTIZED_SUBGRAPHS = {
    "if": (
        {
            "then_branch:DequantizeLinear": 4,  # x (a copy of the main graph's DQ), hidden, two weights
            "then_branch:QuantizeLinear": 1,  # hidden, calibrated through the If's outputs
            "then_branch:MatMul": 2,
            "then_branch:Relu": 1,
            "else_branch:DequantizeLinear": 4,
            "else_branch:QuantizeLinear": 1,
            "else_branch:MatMul": 2,
            "else_branch:Relu": 1,
        },
        {  # the first MatMul with its Relu and Q is one QLinearMatMul; the second keeps a float output
            "then_branch:QLinearMatMul": 1,
            "then_branch:MatMulIntegerToFloat": 1,
            "else_branch:QLinearMatMul": 1,
            "else_branch:MatMulIntegerToFloat": 1,
        },
    ),
    "loop": (
        {
            "body:QuantizeLinear": 1,  # the loop-carried state, over all iterations
            "body:DequantizeLinear": 2,
            "body:MatMul": 1,
            "body:Tanh": 1,
            "body:Identity": 1,
        },
        {"body:MatMulIntegerToFloat": 1},
    ),
    "loop_nested_if": (
        {
            "body:If": 1,
            "body:Tanh": 1,
            "body:Identity": 1,
            "body/then_branch:QuantizeLinear": 1,
            "body/then_branch:DequantizeLinear": 2,
            "body/then_branch:MatMul": 1,
            "body/else_branch:QuantizeLinear": 1,
            "body/else_branch:DequantizeLinear": 2,
            "body/else_branch:MatMul": 1,
        },
        {"body/then_branch:MatMulIntegerToFloat": 1, "body/else_branch:MatMulIntegerToFloat": 1},
    ),
    "scan": (
        {
            "body:QuantizeLinear": 2,  # the scanned slice and the state
            "body:DequantizeLinear": 4,
            "body:MatMul": 2,
            "body:Add": 1,
            "body:Tanh": 1,
            "body:Identity": 1,
        },
        {"body:MatMulIntegerToFloat": 1},  # onnxruntime folds the other MatMul and the Add into a FusedGemm
    ),
}


@pytest.mark.parametrize("kind", list(MODELS))
def test_subgraphs_quantize_into_integer_kernels_inside_the_subgraph(tmp_path: Path, kind: str) -> None:
    build, data = MODELS[kind]
    source, output, result = quantize(tmp_path, build(), data(24, 0), sets=("passes.insert_qdq.subgraphs=quantize",))
    layout, kernels = QUANTIZED_SUBGRAPHS[kind]
    assert subgraph_ops(onnx.load(str(output)).graph) == layout
    fused = subgraph_ops(optimized_model(output).graph)
    assert {k: fused[k] for k in kernels} == kernels
    assert any("quantized:" in note and "subgraph" in note for note in result.notes)
    feeds = data(12, 1)
    for reference, quantized in zip(run_each(source, feeds), run_each(output, feeds), strict=True):
        assert sqnr_db(reference, quantized) > 20


def test_a_branch_the_calibration_data_never_took_stays_float(tmp_path: Path) -> None:
    calib = {"x": np.abs(_normal((24, 16), 0))}  # sum(x) > 0 always: the else branch never runs
    source, output, result = quantize(tmp_path, if_model(), calib, sets=("passes.insert_qdq.subgraphs=quantize",))
    ops = subgraph_ops(onnx.load(str(output)).graph)
    assert ops["then_branch:QuantizeLinear"] == 1
    assert {k: v for k, v in ops.items() if k.startswith("else")} == {"else_branch:MatMul": 2, "else_branch:Relu": 1}
    assert any("1 subgraph kept in float: no calibration range for 'else_hidden'" in note for note in result.notes)
    feeds = {"x": -np.abs(_normal((6, 16), 1))}  # the float branch runs fine at inference
    branch_float, branch_quant = run_each(source, feeds)[1], run_each(output, feeds)[1]
    assert sqnr_db(branch_float, branch_quant) > 25


def test_sibling_branches_with_the_same_tensor_names_get_their_own_ranges(tmp_path: Path) -> None:
    model = if_model(same_names=True)  # both branches call their hidden tensor "hidden"
    _, output, _ = quantize(
        tmp_path, model, {"x": _normal((32, 16), 0)}, sets=("passes.insert_qdq.subgraphs=quantize",)
    )
    quantized = onnx.load(str(output))
    scales = {}
    for node in quantized.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                (q,) = [n for n in attr.g.node if n.op_type == "QuantizeLinear"]
                inits = {t.name: onnx.numpy_helper.to_array(t) for t in attr.g.initializer}
                scales[attr.name] = float(inits[q.input[1]])
    assert scales["else_branch"] > 2 * scales["then_branch"]  # the else weights are 4× larger


def test_calibration_with_a_histogram_method_reaches_into_subgraphs(tmp_path: Path) -> None:
    build, data = MODELS["loop_nested_if"]
    sets = ("passes.insert_qdq.subgraphs=quantize", "calibration.method=percentile")
    source, output, _ = quantize(tmp_path, build(), data(24, 0), sets=sets)
    assert subgraph_ops(onnx.load(str(output)).graph) == QUANTIZED_SUBGRAPHS["loop_nested_if"][0]
    feeds = data(8, 1)
    (reference,), (quantized,) = run_each(source, feeds), run_each(output, feeds)
    assert sqnr_db(reference, quantized) > 20


@pytest.mark.parametrize("recipe", ["int8-transformer", "int8-dynamic", "w8-block", "int4-weight"])
@pytest.mark.parametrize("kind", ["if", "loop_nested_if", "scan"])
def test_every_recipe_leaves_subgraphs_valid(tmp_path: Path, kind: str, recipe: str) -> None:
    build, data = MODELS[kind]
    model = build()
    source, output, _ = quantize(tmp_path, model, data(16, 0), recipe=recipe)
    assert subgraph_ops(onnx.load(str(output)).graph) == subgraph_ops(model.graph)
    feeds = data(8, 1)
    for reference, quantized in zip(run_each(source, feeds), run_each(output, feeds), strict=True):
        assert sqnr_db(reference, quantized) > 15


# --- opsets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [10, 11, 12, 13, 15, 17, 19, 21, 23])
def test_int8_takes_opsets_10_to_23(tmp_path: Path, opset: int) -> None:
    calib = {"x": np.random.default_rng(0).uniform(0, 1, (32, 3, 8, 8)).astype(np.float32)}
    source, output, result = quantize(tmp_path, conv_matmul(opset), calib)
    quantized = onnx.load(str(output))
    assert {o.domain: o.version for o in quantized.opset_import}[""] == max(opset, 13)
    assert (f"upgraded opset {opset} → 13" in result.notes) == (opset < 13)
    weight_axes = {
        n.input[0]: n.attribute[0].i for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.attribute
    }
    # per-channel; the MatMul + Add is a Gemm by then, so its bias is int32 too (QGemm)
    assert weight_axes == {"wc_quantized": 0, "bc_quantized": 0, "wm_quantized": 1, "bm_quantized": 0}
    assert main_ops(output)["QuantizeLinear"] == 3
    feeds = {"x": np.random.default_rng(1).uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)}
    (reference,), (quantized_out,) = run_each(source, feeds), run_each(output, feeds)
    assert sqnr_db(reference, quantized_out) > 30


@pytest.mark.parametrize("kind", ["if", "loop_nested_if", "scan"])
def test_subgraph_models_at_opset_10_are_upgraded_and_quantized(tmp_path: Path, kind: str) -> None:
    _, data = MODELS[kind]
    model = {"if": if_model, "loop_nested_if": lambda opset: loop_model(opset, nested_if=True), "scan": scan_model}[
        kind
    ](10)
    source, output, result = quantize(tmp_path, model, data(16, 0), sets=("passes.insert_qdq.subgraphs=quantize",))
    assert "upgraded opset 10 → 13" in result.notes
    assert subgraph_ops(onnx.load(str(output)).graph) == QUANTIZED_SUBGRAPHS[kind][0]
    feeds = data(8, 1)
    for reference, quantized in zip(run_each(source, feeds), run_each(output, feeds), strict=True):
        assert sqnr_db(reference, quantized) > 20


@pytest.mark.parametrize("opset", [11, 12])
def test_constant_node_weights_at_opset_11_and_12_become_per_channel_int8(tmp_path: Path, opset: int) -> None:
    """onnxruntime's quantizer writes per-channel Q/DQ into opset 11/12 models (they will not load) and
    treats Constant-node weights as activations; here they are weights, per channel, at opset 13."""
    model = conv_matmul(opset, weights_as_constants=True, channels=64, classes=128)
    calib = {"x": np.random.default_rng(0).uniform(0, 1, (32, 3, 8, 8)).astype(np.float32)}
    source, output, _ = quantize(tmp_path, model, calib)
    quantized = onnx.load(str(output))
    assert {o.domain: o.version for o in quantized.opset_import}[""] == 13
    assert "Constant" not in main_ops(output)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    dq = {n.input[0]: n for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    assert inits["wc_quantized"].dtype == np.int8 and inits[dq["wc_quantized"].input[1]].shape == (64,)
    assert inits["wm_quantized"].dtype == np.int8 and inits[dq["wm_quantized"].input[1]].shape == (128,)
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.size >= 64 * 27]  # no float copy kept
    assert inits["bm_quantized"].dtype == np.int32  # the MatMul + Add became a Gemm: QGemm takes an int32 bias
    assert output.stat().st_size < 0.42 * source.stat().st_size  # int8 weights; the int32 biases carry scales
    feeds = {"x": np.random.default_rng(1).uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)}
    (reference,), (quantized_out,) = run_each(source, feeds), run_each(output, feeds)
    assert sqnr_db(reference, quantized_out) > 30


# --- ops outside the ONNX standard ----------------------------------------------------------------------


def test_an_unknown_custom_op_stays_float_and_the_graph_before_it_is_quantized(tmp_path: Path) -> None:
    calib = {"x": np.random.default_rng(0).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    model = custom_op_model("com.example", "MyOp")
    _, output, result = quantize_unchecked(tmp_path, model, calib)
    quantized = onnx.load(str(output))
    onnx.checker.check_model(quantized)  # full_check needs the op's schema, which nobody has
    (custom,) = [n for n in quantized.graph.node if n.domain == "com.example"]
    assert (custom.op_type, custom.name, list(custom.output), list(custom.attribute)) == ("MyOp", "custom", ["u"], [])
    assert [n for n in result.notes if "com.example::MyOp" in n and n.startswith("assign_precision")] == [
        "assign_precision: 1 op outside the ONNX standard kept in float: com.example::MyOp×1"
    ]
    assert any(n.startswith("insert_qdq: 3 annotated ops after com.example::MyOp×1") for n in result.notes)
    ops = main_ops(output)
    assert (ops["QuantizeLinear"], ops["DequantizeLinear"], ops["Conv"], ops["MatMul"]) == (2, 3, 2, 1)
    conv = next(n for n in quantized.graph.node if n.name == "conv")
    assert conv.input[1] == "wc_dequantized"  # the conv before the custom op has int8 weights


def test_validating_a_model_onnxruntime_cannot_run_is_skipped_by_run_and_refused_by_validate(tmp_path: Path) -> None:
    """`run` writes the model (it may run where the op's kernel exists) and says validation was skipped;
    `validate`, asked to run it, refuses with one line naming the op and --custom-ops."""
    import subprocess
    import sys

    x = np.random.default_rng(0).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32)
    onnx.save(custom_op_model("com.example", "MyOp"), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    result = onnxq.run(tmp_path / "model.onnx", "int8", calib=str(tmp_path / "calib.npz"), output=tmp_path / "q.onnx")
    assert result.output is not None and result.output.exists()
    ((skipped,),) = [[v.skipped] for v in result.validation]
    assert skipped == "skipped: onnxruntime has no kernel for com.example:MyOp (pass --custom-ops LIB to validate)"
    cli = subprocess.run(
        [sys.executable, "-m", "onnxq", "validate", "model.onnx", "q.onnx", "--data", "calib.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert "no kernel for com.example:MyOp" in cli.stderr and "--custom-ops" in cli.stderr


def test_a_loop_whose_body_holds_a_custom_op_stays_float_and_the_rest_is_quantized(tmp_path: Path) -> None:
    model = loop_model(custom_op=True)
    sets = ["passes.insert_qdq.subgraphs=quantize"]
    _, output, result = quantize_unchecked(tmp_path, model, _loop_data(16, 0), sets)
    quantized = onnx.load(str(output))
    onnx.checker.check_model(quantized)
    assert subgraph_ops(quantized.graph) == subgraph_ops(model.graph)
    assert "assign_precision: 1 op outside the ONNX standard kept in float: com.example::MyOp×1" in result.notes
    assert "insert_qdq: 1 annotated op after com.example::MyOp×1 kept in float" in " ".join(result.notes)
    assert any("1 subgraph kept in float: no calibration range for 's_in'" in note for note in result.notes)
    assert main_ops(output)["QuantizeLinear"] == 1  # x, read by the first MatMul; matmul3 comes after the loop


def quantize_unchecked(
    tmp_path: Path, model: onnx.ModelProto, calib: Feeds, sets: list[str] | None = None
) -> tuple[Path, Path, onnxq.runner.Result]:
    """For a model onnxruntime cannot run (nor validate against): no validation, no full check."""
    source, data = tmp_path / "model.onnx", tmp_path / "calib.npz"
    onnx.save(model, source)
    np.savez(data, **calib)
    result = onnxq.run(source, "int8", calib=str(data), output=tmp_path / "q.onnx", validate=False, overrides=sets)
    return source, result.output, result  # type: ignore[return-value]


def test_a_contrib_op_stays_float_and_the_model_runs_in_onnxruntime(tmp_path: Path) -> None:
    calib = {"x": np.random.default_rng(0).uniform(0, 1, (16, 3, 8, 8)).astype(np.float32)}
    source, output, result = quantize_unchecked(tmp_path, custom_op_model("com.microsoft", "Gelu"), calib)
    assert "assign_precision: 1 op outside the ONNX standard kept in float: com.microsoft::Gelu×1" in result.notes
    ops = main_ops(output)
    assert (ops["Gelu"], ops["QuantizeLinear"], ops["Conv"], ops["MatMul"]) == (1, 5, 2, 1)  # x, c, u, c2, f
    fused = main_ops_of(optimized_model(output))
    assert (fused["QLinearConv"], fused["MatMulIntegerToFloat"]) == (2, 1)
    feeds = {"x": np.random.default_rng(1).uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)}
    (reference,), (quantized,) = run_each(source, feeds), run_each(output, feeds)
    assert sqnr_db(reference, quantized) > 20


def main_ops_of(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


# --- symbolic dims --------------------------------------------------------------------------------------


def test_symbolic_batch_and_sequence_calibrated_at_several_lengths_run_at_a_new_one(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(tiny_transformer(), source)
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, (batch, seq) in enumerate([(2, 5), (3, 9), (4, 17)]):  # one file per shape
        np.savez(calib / f"part{index}.npz", x=transformer_data(batch, index, seq=seq))
    result = onnxq.run(source, "int8", calib=str(calib), output=tmp_path / "q.onnx", validate=False)
    quantized = onnx.load(str(result.output))
    dims = [d.dim_param or d.dim_value for d in quantized.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq", 64]
    assert main_ops(result.output)["QuantizeLinear"] == 10
    feeds = {"x": transformer_data(3, 7, seq=13)}  # a length calibration never saw
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    quantized_out = ort.InferenceSession(str(result.output), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert quantized_out.shape == reference.shape == (39, 64)
    assert sqnr_db(reference, quantized_out) > 20


def test_symbolic_image_size_calibrated_at_several_sizes_runs_at_a_new_one(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    onnx.save(conv_matmul(spatial=("H", "W")), source)
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    for size in (8, 12, 16):
        np.savez(calib / f"{size}.npz", x=rng.uniform(0, 1, (6, 3, size, size)).astype(np.float32))
    result = onnxq.run(source, "int8", calib=str(calib), output=tmp_path / "q.onnx", validate=False)
    feeds = {"x": rng.uniform(0, 1, (2, 3, 20, 24)).astype(np.float32)}
    (reference,), (quantized,) = run_each(source, feeds), run_each(result.output, feeds)
    assert sqnr_db(reference, quantized) > 30
