"""The committed QAT exports of the digits CNN (models/digits/qat/, built by models/digits/qat_train.py from real
torch exports): each is a valid model onnxruntime runs to the accuracy recorded in results.json, the Q/DQ exports
carry Q/DQ on every Conv/Gemm weight and input, the LSQ dynamo export carries its fake quantization as arithmetic,
and each sidecar names tensors of its model and, applied as Q/DQ, reproduces the torch fake-quant model (accuracy,
and logits of the first samples). No torch here: the torch numbers come from results.json."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS
from onnx import helper, numpy_helper

QAT = DIGITS / "qat"
RESULTS = json.loads((QAT / "results.json").read_text())
VARIANTS = RESULTS["variants"]
EVAL = np.load(DIGITS / "eval.npz")
QDQ = sorted(k for k, v in VARIANTS.items() if v["style"] == "observer")
SIDECARS = sorted(k for k, v in VARIANTS.items() if "sidecar" in v)
LOGIT_ATOL = 0.03


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as results.json was measured
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0]


def _accuracy(model: onnx.ModelProto) -> float:
    return float((_logits(model, EVAL["input"]).argmax(1) == EVAL["label"]).mean())


def _load(name: str) -> onnx.ModelProto:
    return onnx.load(str(QAT / VARIANTS[name]["file"]))


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer, a Constant node's value, or either behind Identity nodes (the TorchScript exporter
    shares equal constants through Identity)."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = _producers(model)
    while name not in inits and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers[name]
    assert node.op_type == "Constant", (name, node.op_type)
    return numpy_helper.to_array(node.attribute[0].t)


def test_results_cover_every_committed_file() -> None:
    files = {v["file"] for v in VARIANTS.values()}
    assert files == {p.name for p in QAT.glob("*.onnx")}
    assert {v["sidecar"] for v in VARIANTS.values() if "sidecar" in v} == {p.name for p in QAT.glob("*.json")} - {
        "results.json"
    }
    assert RESULTS["float_acc"] == pytest.approx(532 / 540)
    for name, v in VARIANTS.items():  # the recorded torch and onnxruntime numbers agree
        assert v["torch_fake_quant_acc"] == v.get("onnxruntime_sidecar_qdq_acc", v["onnxruntime_acc"]), name


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_is_valid_and_has_the_recorded_accuracy(name: str) -> None:
    model = _load(name)
    onnx.checker.check_model(model, full_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert (opset, model.ir_version) == (VARIANTS[name]["opset"], VARIANTS[name]["ir_version"])
    assert model.ir_version == helper.find_min_ir_version_for(list(model.opset_import))
    assert _accuracy(model) == VARIANTS[name]["onnxruntime_acc"]
    assert _logits(model, EVAL["input"][:1]).shape == (1, 10)  # dynamic batch
    head = VARIANTS[name].get("torch_logits_head", VARIANTS[name].get("torch_float_weights_logits_head"))
    # torch rounds x * (1/s), onnxruntime x / s: a tie now and then lands one step apart
    atol = 1e-4 if "sidecar" in VARIANTS[name] else LOGIT_ATOL
    np.testing.assert_allclose(_logits(model, EVAL["input"][: len(head)]), head, atol=atol)


@pytest.mark.parametrize("name", QDQ)
def test_qdq_export_quantizes_every_conv_and_gemm(name: str) -> None:
    model = _load(name)
    producers = _producers(model)
    inits = {t.name for t in model.graph.initializer}
    qmin, qmax = VARIANTS[name]["weight_range"]
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 5
    for layer in layers:
        # activation: Q -> DQ -> layer
        act_dq = producers[layer.input[0]]
        assert act_dq.op_type == "DequantizeLinear", layer.name
        assert producers[act_dq.input[0]].op_type == "QuantizeLinear", layer.name
        assert _constant(model, act_dq.input[2]).dtype == np.uint8
        # weight: float initializer -> Q -> Clip(qmin, qmax) -> DQ (axis 0) -> layer
        w_dq = producers[layer.input[1]]
        assert w_dq.op_type == "DequantizeLinear", layer.name
        clip = producers[w_dq.input[0]]
        assert clip.op_type == "Clip", layer.name
        assert (int(_constant(model, clip.input[1])), int(_constant(model, clip.input[2]))) == (qmin, qmax)
        w_q = producers[clip.input[0]]
        assert w_q.op_type == "QuantizeLinear" and w_q.input[0] in inits, layer.name
        assert [a.i for a in w_dq.attribute if a.name == "axis"] == [0]
        assert _constant(model, w_dq.input[2]).dtype == np.int8
        channels = _constant(model, w_q.input[0]).shape[0]
        assert _constant(model, w_dq.input[1]).shape == (channels,)
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == concat.output[0] for n in model.graph.node)


def test_lsq_dynamo_export_writes_fake_quant_as_arithmetic() -> None:
    model = _load("digits_lsq_int8_dynamo")
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert ops.count("Round") == 6  # 5 activations + the one weight too large for the exporter's constant folding
    producers = _producers(model)
    for layer in (n for n in model.graph.node if n.op_type in ("Conv", "Gemm")):
        assert producers[layer.input[0]].op_type == "Mul", layer.name  # ... -> Clip -> Sub(z) -> Mul(s) -> layer
    # straight-through rounding as exported: Add(v, Sub(Round(v), v)) between the Div and the Clip
    for node in (n for n in model.graph.node if n.op_type == "Round"):
        div = producers[node.input[0]]
        assert div.op_type == "Div"
        sub = next(
            n for n in model.graph.node if n.op_type == "Sub" and list(n.input) == [node.output[0], div.output[0]]
        )
        assert any(n.op_type == "Add" and list(n.input) == [div.output[0], sub.output[0]] for n in model.graph.node)


def _apply_sidecar(model: onnx.ModelProto, tensors: dict) -> onnx.ModelProto:
    """Weights replaced by their fake-quantized values, activations through uint8 Q -> DQ."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}
    nodes = list(model.graph.node)
    for name, e in tensors.items():
        if name in inits:
            w = numpy_helper.to_array(inits[name])
            s = np.asarray(e["scale"], np.float32).reshape(-1, *([1] * (w.ndim - 1)))
            fq = (np.clip(np.round(w / s), e["qmin"], e["qmax"]) * s).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array(fq, name))
            continue
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(e["scale"], np.float32), f"{name}.s"),
                numpy_helper.from_array(np.array(e["zero_point"], np.uint8), f"{name}.z"),
            ]
        )
        for node in nodes:
            node.input[:] = [f"{name}.fq" if i == name else i for i in node.input]
        pair = [
            helper.make_node("QuantizeLinear", [name, f"{name}.s", f"{name}.z"], [f"{name}.q"]),
            helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.s", f"{name}.z"], [f"{name}.fq"]),
        ]
        producer = next((i for i, n in enumerate(nodes) if name in n.output), -1)
        nodes[producer + 1 : producer + 1] = pair
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("name", SIDECARS)
def test_sidecar_names_tensors_of_its_model_and_reproduces_torch(name: str) -> None:
    model = _load(name)
    sidecar = json.loads((QAT / VARIANTS[name]["sidecar"]).read_text())
    assert sidecar["model"] == VARIANTS[name]["file"]
    tensors = sidecar["tensors"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = set(inits) | {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    assert set(tensors) <= names
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert {n.input[i] for n in layers for i in (0, 1)} <= set(tensors)  # every layer input and weight
    concat = next(n for n in model.graph.node if n.op_type == "Concat")
    assert concat.output[0] in tensors
    bits = VARIANTS[name]["weight_bits"]
    for key, e in tensors.items():
        assert set(e) >= {"scale", "zero_point", "bits", "signed", "axis"}, key
        if key in inits:
            assert (e["bits"], e["signed"], e["axis"]) == (bits, True, 0)
            assert [e["qmin"], e["qmax"]] == VARIANTS[name]["weight_range"]
            assert len(e["scale"]) == len(e["zero_point"]) == inits[key].shape[0]
            assert not any(e["zero_point"])
        else:
            assert (e["bits"], e["signed"], e["axis"], e["qmin"], e["qmax"]) == (8, False, None, 0, 255)
            assert isinstance(e["scale"], float) and isinstance(e["zero_point"], int)
        assert np.all(np.asarray(e["scale"]) > 0)
    applied = _apply_sidecar(model, tensors)
    onnx.checker.check_model(applied, full_check=True)
    assert _accuracy(applied) == VARIANTS[name]["onnxruntime_sidecar_qdq_acc"] == VARIANTS[name]["torch_fake_quant_acc"]
    head = VARIANTS[name]["torch_fake_quant_logits_head"]
    np.testing.assert_allclose(_logits(applied, EVAL["input"][: len(head)]), head, atol=LOGIT_ATOL)
