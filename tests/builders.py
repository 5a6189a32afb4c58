"""Small ONNX graphs built with onnx.helper for tests: real graphs, random weights, run by onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def small_cnn(
    opset: int = 13, seed: int = 0, weights_as_constants: bool = False, batch: str | int = "N"
) -> onnx.ModelProto:
    """Conv+BN+Relu → two branches → Concat → MaxPool → Conv+Relu → GlobalAveragePool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = {
        "w1": rng.normal(0, 0.4, (8, 1, 3, 3)).astype(f32),
        "b1": rng.normal(0, 0.1, 8).astype(f32),
        "bn_s": rng.uniform(0.5, 1.5, 8).astype(f32),
        "bn_b": rng.normal(0, 0.1, 8).astype(f32),
        "bn_m": rng.normal(0, 0.1, 8).astype(f32),
        "bn_v": rng.uniform(0.5, 1.5, 8).astype(f32),
        "wa": rng.normal(0, 0.2, (8, 8, 3, 3)).astype(f32),
        "wb": rng.normal(0, 0.3, (8, 8, 1, 1)).astype(f32),
        "w2": rng.normal(0, 0.15, (16, 16, 3, 3)).astype(f32),
        "b2": rng.normal(0, 0.1, 16).astype(f32),
        "wfc": rng.normal(0, 0.3, (10, 16)).astype(f32),
        "bfc": rng.normal(0, 0.1, 10).astype(f32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "wa"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["r1", "wb"], ["cb"], name="conv_b"),
        helper.make_node("Concat", ["ra", "cb"], ["cat"], name="concat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["mp", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc", transB=1),
    ]
    initializers = []
    if weights_as_constants:
        consts = [helper.make_node("Constant", [], [k], name=f"const_{k}", value=_init(k, v)) for k, v in inits.items()]
        nodes = consts + nodes
    else:
        initializers = [_init(k, v) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset >= 13 else 6
    onnx.checker.check_model(model)
    return model


def cnn_data(n: int = 64, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)
    return (base * (rng.uniform(0, 1, (n, 1, 1, 1)) > 0.2)).astype(np.float32)


def float_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list],
    outputs: dict[str, list],
    initializers: dict[str, np.ndarray],
    opset: int = 13,
) -> onnx.ModelProto:
    """A checked model with float inputs/outputs of the given (symbolic) shapes, at an IR version onnxruntime takes."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        initializer=[_init(n, a) for n, a in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def tiny_transformer(
    seed: int = 0, dim: int = 64, ffn: int = 80, opset: int = 17, activation: str = "Relu"
) -> onnx.ModelProto:
    """One pre-LN transformer block with the shapes weight-only quantization meets in the wild: Q/K/V
    MatMuls sharing one LayerNorm output, activation × activation attention MatMuls, a Gemm (transB, bias)
    on a flattened activation, and a down projection whose K (`ffn`) need not be a multiple of the block.
    With Relu (or Clip) after the up projection onnxruntime's own DQ→MatMulNBits fusion gives up there."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    def weight(k: int, n: int) -> np.ndarray:
        return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(f32)

    inits = [
        _init("gamma", rng.uniform(0.5, 1.5, dim).astype(f32)),
        _init("beta", rng.normal(0, 0.1, dim).astype(f32)),
        _init("wq", weight(dim, dim)),
        _init("wk", weight(dim, dim)),
        _init("wv", weight(dim, dim)),
        _init("wo", weight(dim, dim)),
        _init("bo", rng.normal(0, 0.1, dim).astype(f32)),
        _init("w_up_t", weight(dim, ffn).T.copy()),  # Gemm transB layout [N, K]
        _init("b_up", rng.normal(0, 0.1, ffn).astype(f32)),
        _init("w_down", weight(ffn, dim)),
        _init("flat", np.array([-1, dim], np.int64)),
        _init("scale", np.array(1 / np.sqrt(dim), f32)),
    ]
    make = helper.make_node
    nodes = [
        make("LayerNormalization", ["x", "gamma", "beta"], ["ln"], axis=-1, name="ln"),
        make("MatMul", ["ln", "wq"], ["q"], name="q_proj"),
        make("MatMul", ["ln", "wk"], ["k"], name="k_proj"),
        make("MatMul", ["ln", "wv"], ["v"], name="v_proj"),
        make("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
        make("MatMul", ["q", "kt"], ["scores"], name="qk"),
        make("Mul", ["scores", "scale"], ["scaled"], name="scale_scores"),
        make("Softmax", ["scaled"], ["probs"], axis=-1, name="softmax"),
        make("MatMul", ["probs", "v"], ["context"], name="av"),
        make("MatMul", ["context", "wo"], ["attn"], name="o_proj"),
        make("Add", ["attn", "bo"], ["attn_b"], name="o_bias"),
        make("Add", ["x", "attn_b"], ["h"], name="residual"),
        make("Reshape", ["h", "flat"], ["h2"], name="flatten"),
        make("Gemm", ["h2", "w_up_t", "b_up"], ["up"], transB=1, name="up_proj"),
        make(activation, ["up"], ["act"], name="activation"),
        make("MatMul", ["act", "w_down"], ["y"], name="down_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_transformer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def bert_attention(
    seed: int = 0,
    dim: int = 32,
    heads: int = 4,
    softmax_axis: int = -1,
    value_perm: tuple[int, ...] = (0, 2, 1, 3),
    fused_qkv: bool = False,
) -> onnx.ModelProto:
    """A BERT (post-LN) self-attention block as torch exports it: Q/K/V projections with biases, heads split
    by Reshape [0, 0, H, D] and Transposes, Kᵀ by one (0, 2, 3, 1) Transpose, a scaled and masked softmax,
    heads merged back, the output projection with its bias, the residual and LayerNorm. The LayerNorm input
    is read by the projections and the residual, so SmoothQuant cannot fold into it. `fused_qkv`: one
    MatMul for Q, K and V and a Split, as some exporters (and onnxsim) write it."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    width = dim // heads

    def weight(k: int, n: int) -> np.ndarray:
        return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(f32)

    inits = [_init(f"w{p}", weight(dim, dim)) for p in "qkvo"]
    inits += [_init(f"b{p}", rng.normal(0, 0.5, dim).astype(f32)) for p in "qkvo"]
    inits += [
        _init("gamma", rng.uniform(0.5, 1.5, dim).astype(f32)),
        _init("beta", rng.normal(0, 0.1, dim).astype(f32)),
        _init("split", np.array([0, 0, heads, width], np.int64)),
        _init("merge", np.array([0, 0, dim], np.int64)),
        _init("scale", np.array(1 / np.sqrt(width), f32)),
    ]
    make = helper.make_node
    nodes = []
    if fused_qkv:
        inits.append(_init("wqkv", np.concatenate([numpy_helper.to_array(t) for t in inits[:3]], axis=1)))
        inits.append(_init("qkv_split", np.array([dim, dim, dim], np.int64)))
        nodes += [
            make("MatMul", ["x", "wqkv"], ["qkv"], name="attention.self.qkv/MatMul"),
            make("Split", ["qkv", "qkv_split"], ["q_mm", "k_mm", "v_mm"], axis=-1, name="qkv_split"),
        ]
    for p in "qkv":
        nodes += [
            *([] if fused_qkv else [make("MatMul", ["x", f"w{p}"], [f"{p}_mm"], name=f"attention.self.{p}/MatMul")]),
            make("Add", [f"{p}_mm", f"b{p}"], [f"{p}_lin"], name=f"attention.self.{p}/Add"),
            make("Reshape", [f"{p}_lin", "split"], [f"{p}_heads"], name=f"{p}_split"),
        ]
    nodes += [
        make("Transpose", ["q_heads"], ["q_t"], perm=[0, 2, 1, 3]),
        make("Transpose", ["k_heads"], ["k_t"], perm=[0, 2, 3, 1]),
        make("Transpose", ["v_heads"], ["v_t"], perm=list(value_perm)),
        make("MatMul", ["q_t", "k_t"], ["scores"], name="qk"),
        make("Mul", ["scores", "scale"], ["scaled"]),
        make("Add", ["scaled", "mask"], ["masked"]),
        make("Softmax", ["masked"], ["probs"], axis=softmax_axis),
        make("MatMul", ["probs", "v_t"], ["context"], name="av"),
        make("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        make("Reshape", ["context_t", "merge"], ["merged"], name="merge"),
        make("MatMul", ["merged", "wo"], ["o_mm"], name="attention.output.dense/MatMul"),
        make("Add", ["o_mm", "bo"], ["o_lin"], name="attention.output.dense/Add"),
        make("Add", ["o_lin", "x"], ["residual"]),
        make("LayerNormalization", ["residual", "gamma", "beta"], ["y"], axis=-1, name="ln"),
    ]
    graph = helper.make_graph(
        nodes,
        "bert_attention",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", dim]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def attention_feeds(n: int, seed: int, dim: int = 32, seq: int = 7) -> list[dict[str, np.ndarray]]:
    """Hidden states with outlier channels, and masks that hide a different tail of keys per sample."""
    rng = np.random.default_rng(seed)
    feeds = []
    for i in range(n):
        x = rng.standard_normal((1, seq, dim)).astype(np.float32)
        x[..., :2] *= 10.0
        mask = np.zeros((1, 1, 1, seq), np.float32)
        mask[..., seq - i % 3 :] = -10000.0
        feeds.append({"x": x, "mask": mask})
    return feeds


def transformer_data(n: int, seed: int, dim: int = 64, seq: int = 12) -> np.ndarray:
    """Correlated channels with a few outliers, as real hidden states have (GPTQ's error compensation and
    AWQ's scaling only pay on inputs like these, not on white noise)."""
    mix = np.random.default_rng(1234).standard_normal((dim, dim)) / np.sqrt(dim) + np.eye(dim)  # one "model"
    x = np.random.default_rng(seed).standard_normal((n, seq, dim)) @ mix
    x[..., :3] *= 8.0
    return x.astype(np.float32)


def box_score_head(seed: int = 0) -> onnx.ModelProto:
    """A detector-style head: box regression (values in the hundreds) and a sigmoid score (0..1) joined by
    one Concat on the channel axis, as YOLO-like exports do. One scale for both crushes the scores."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    inits = [
        _init("w_box", rng.normal(0, 0.5, (4, 3, 3, 3)).astype(f32)),
        _init("b_box", rng.normal(0, 0.1, 4).astype(f32)),
        _init("w_score", rng.normal(0, 0.5, (1, 3, 3, 3)).astype(f32)),
        _init("b_score", np.zeros(1, f32)),
        _init("stride", np.array(200.0, f32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_box", "b_box"], ["box_raw"], pads=[1, 1, 1, 1], name="box_conv"),
        helper.make_node("Mul", ["box_raw", "stride"], ["box"], name="box_scale"),
        helper.make_node("Conv", ["x", "w_score", "b_score"], ["score_raw"], pads=[1, 1, 1, 1], name="score_conv"),
        helper.make_node("Sigmoid", ["score_raw"], ["score"], name="score_sigmoid"),
        helper.make_node("Concat", ["box", "score"], ["y"], axis=1, name="head_concat"),
    ]
    graph = helper.make_graph(
        nodes,
        "box_score_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8, 8])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


# --- models as they come from the wild: subgraphs, old and new opsets, custom ops -------------------------


def _checked(graph: onnx.GraphProto, opset: int, domains: tuple[str, ...] = ()) -> onnx.ModelProto:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    )
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    if not domains:
        onnx.checker.check_model(model, full_check=True)
    return model


def _matrix(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def if_model(opset: int = 13, dim: int = 16, seed: int = 0, same_names: bool = False) -> onnx.ModelProto:
    """y = x·W0·W3 in the main graph, and an If on sum(x) > 0 whose branches read x directly and return
    `branch` (then: Relu(x·Wt)·Wt2, else: Relu(x·We)·We2): a model output computed only inside subgraphs,
    each branch with a tensor of its own to calibrate. With `same_names` both branches name their tensors
    alike (ONNX allows that in sibling scopes)."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info

    def branch(tag: str, scale: float) -> onnx.GraphProto:
        prefix = "" if same_names else f"{tag}_"
        return helper.make_graph(
            [
                helper.make_node("MatMul", ["x", f"w_{tag}"], [f"{prefix}mm"], name=f"{tag}_matmul"),
                helper.make_node("Relu", [f"{prefix}mm"], [f"{prefix}hidden"], name=f"{tag}_relu"),
                helper.make_node("MatMul", [f"{prefix}hidden", f"w2_{tag}"], [f"{prefix}out"], name=f"{tag}_matmul2"),
            ],
            tag,
            [],
            [vi(f"{prefix}out", TensorProto.FLOAT, None)],
            initializer=[
                _init(f"w_{tag}", _matrix(rng, dim, dim) * np.float32(scale)),
                _init(f"w2_{tag}", _matrix(rng, dim, dim)),
            ],
        )

    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="matmul0"),
        helper.make_node("MatMul", ["h", "w3"], ["y"], name="matmul3"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0, name="total"),
        helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
        helper.make_node(
            "If", ["positive"], ["branch"], then_branch=branch("then", 1.0), else_branch=branch("else", 4.0), name="if"
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "if_model",
        [vi("x", TensorProto.FLOAT, ["batch", dim])],
        [vi("y", TensorProto.FLOAT, ["batch", dim]), vi("branch", TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            _init("w0", _matrix(rng, dim, dim)),
            _init("w3", _matrix(rng, dim, dim)),
            _init("zero", np.array(0.0, np.float32)),
        ],
    )
    return _checked(graph, opset)


def loop_model(
    opset: int = 13, dim: int = 16, seed: int = 0, nested_if: bool = False, custom_op: bool = False
) -> onnx.ModelProto:
    """h = x·W0; a Loop carries s (from h) through Tanh(s·Wb) 3 times, or 0 times when max(x) ≤ 0; y = s·W3.
    With `nested_if` the body's MatMul sits in an If (on mean(x) > 0.5, from the main graph) instead; with
    `custom_op` a com.example::MyOp follows the Tanh in the body."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    if nested_if:
        branches = [
            helper.make_graph(
                [helper.make_node("MatMul", ["s_in", f"w_{tag}"], [f"{tag}_out"], name=f"{tag}_matmul")],
                tag,
                [],
                [vi(f"{tag}_out", TensorProto.FLOAT, None)],
                initializer=[_init(f"w_{tag}", _matrix(rng, dim, dim))],
            )
            for tag in ("then", "else")
        ]
        step = [
            helper.make_node("If", ["high"], ["m"], then_branch=branches[0], else_branch=branches[1], name="body_if")
        ]
        body_inits = []
    else:
        step = [helper.make_node("MatMul", ["s_in", "w_body"], ["m"], name="body_matmul")]
        body_inits = [_init("w_body", _matrix(rng, dim, dim))]
    body = helper.make_graph(
        [
            *step,
            helper.make_node("Tanh", ["m"], ["t" if custom_op else "s_out"], name="body_tanh"),
            *([helper.make_node("MyOp", ["t"], ["s_out"], domain="com.example", name="custom")] if custom_op else []),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [vi("i", TensorProto.INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("s_in", TensorProto.FLOAT, None)],
        [vi("cond_out", TensorProto.BOOL, []), vi("s_out", TensorProto.FLOAT, None)],
        initializer=body_inits,
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="matmul0"),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0, name="peak"),
        helper.make_node("Greater", ["peak", "zero"], ["any_positive"], name="any_positive"),
        helper.make_node("Cast", ["any_positive"], ["runs"], to=TensorProto.INT64, name="runs"),
        helper.make_node("Mul", ["runs", "three"], ["trips"], name="trips"),
        *(
            [
                helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0, name="mean"),
                helper.make_node("Greater", ["mean", "half"], ["high"], name="high"),
            ]
            if nested_if
            else []
        ),
        helper.make_node("Loop", ["trips", "true", "h"], ["s_final"], body=body, name="loop"),
        helper.make_node("MatMul", ["s_final", "w3"], ["y"], name="matmul3"),
    ]
    graph = helper.make_graph(
        nodes,
        "loop_model",
        [vi("x", TensorProto.FLOAT, ["batch", dim])],
        [vi("y", TensorProto.FLOAT, ["batch", dim])],
        initializer=[
            _init("w0", _matrix(rng, dim, dim)),
            _init("w3", _matrix(rng, dim, dim)),
            _init("zero", np.array(0.0, np.float32)),
            *([_init("half", np.array(0.5, np.float32))] if nested_if else []),
            _init("three", np.array(3, np.int64)),
            _init("true", np.array(True)),
        ],
    )
    return _checked(graph, opset, ("com.example",) if custom_op else ())


def scan_model(opset: int = 13, dim: int = 16, seed: int = 0) -> onnx.ModelProto:
    """An RNN as a Scan over the sequence axis of e = x·W0: h_t = Tanh(e_t·Wx + h_{t-1}·Wh); y = hs·W3."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["e_t", "wx"], ["a"], name="scan_matmul_x"),
            helper.make_node("MatMul", ["h_in", "wh"], ["b"], name="scan_matmul_h"),
            helper.make_node("Add", ["a", "b"], ["pre"], name="scan_add"),
            helper.make_node("Tanh", ["pre"], ["h_out"], name="scan_tanh"),
            helper.make_node("Identity", ["h_out"], ["h_t"], name="scan_emit"),
        ],
        "body",
        [vi("h_in", TensorProto.FLOAT, None), vi("e_t", TensorProto.FLOAT, None)],
        [vi("h_out", TensorProto.FLOAT, None), vi("h_t", TensorProto.FLOAT, None)],
        initializer=[_init("wx", _matrix(rng, dim, dim)), _init("wh", _matrix(rng, dim, dim))],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["e"], name="matmul0"),
        helper.make_node(
            "Scan",
            ["h0", "e"],
            ["h_last", "hs"],
            body=body,
            num_scan_inputs=1,
            scan_input_axes=[1],
            scan_output_axes=[1],
            name="scan",
        ),
        helper.make_node("MatMul", ["hs", "w3"], ["y"], name="matmul3"),
    ]
    graph = helper.make_graph(
        nodes,
        "scan_model",
        [vi("x", TensorProto.FLOAT, ["batch", "seq", dim]), vi("h0", TensorProto.FLOAT, ["batch", dim])],
        [vi("y", TensorProto.FLOAT, ["batch", "seq", dim]), vi("h_last", TensorProto.FLOAT, ["batch", dim])],
        initializer=[_init("w0", _matrix(rng, dim, dim)), _init("w3", _matrix(rng, dim, dim))],
    )
    return _checked(graph, opset)


def conv_matmul(
    opset: int = 13,
    seed: int = 0,
    weights_as_constants: bool = False,
    channels: int = 8,
    classes: int = 10,
    spatial: tuple[int | str, int | str] = (8, 8),
) -> onnx.ModelProto:
    """Conv+Relu → GlobalAveragePool → Flatten → MatMul+Add on [N, 3, H, W], written with ops every opset
    from 10 has; the weights in initializers, or in Constant nodes as older exporters (and PP-OCR) write them."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    weights = {
        "wc": rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(f32),
        "bc": rng.normal(0, 0.1, channels).astype(f32),
        "wm": _matrix(rng, channels, classes),
        "bm": rng.normal(0, 0.1, classes).astype(f32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wm"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "bm"], ["y"], name="bias"),
    ]
    initializers = [_init(k, v) for k, v in weights.items()]
    if weights_as_constants:
        constants = [
            helper.make_node("Constant", [], [k], value=t, name=f"const_{k}")
            for k, t in zip(weights, initializers, strict=True)
        ]
        nodes, initializers = constants + nodes, []
    graph = helper.make_graph(
        nodes,
        "conv_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])],
        initializer=initializers,
    )
    return _checked(graph, opset)


def custom_op_model(domain: str = "com.example", op_type: str = "MyOp") -> onnx.ModelProto:
    """Conv → an op outside the ONNX standard → Conv → Reshape → MatMul (the custom op is unary)."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(op_type, ["c"], ["u"], domain=domain, name="custom"),
        helper.make_node("Conv", ["u", "wc2"], ["c2"], name="conv2"),
        helper.make_node("Reshape", ["c2", "flat"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "wm"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom_op_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            _init("wc", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(f32)),
            _init("wc2", _matrix(rng, 8, 8).reshape(8, 8, 1, 1)),
            _init("flat", np.array([-1, 512], np.int64)),
            _init("wm", _matrix(rng, 512, 10)),
        ],
    )
    return _checked(graph, 13, (domain,))


def stacked_lstm(
    layers: int = 2, features: int = 8, hidden: int = 16, classes: int = 5, seed: int = 0, named: bool = True
) -> onnx.ModelProto:
    """A torch-style multi-layer LSTM: x [batch, time, features] with states h0/c0 [layers, batch, hidden]
    sliced per layer, time-major LSTM ops, a MatMul head on the last layer, and the final states as outputs.
    `named=False` leaves the symbolic dims unnamed (old exporters)."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info
    batch, time = ("batch", "time") if named else (None, None)
    nodes = [helper.make_node("Transpose", ["x"], ["seq0"], perm=[1, 0, 2], name="to_time_major")]
    inits = [_init("head", _matrix(rng, hidden, classes))]
    h_out, c_out = [], []
    for layer in range(layers):
        width = features if layer == 0 else hidden
        for state in ("h", "c"):
            inits += [_init(f"{state}{layer}_start", np.array([layer], np.int64))]
            inits += [_init(f"{state}{layer}_end", np.array([layer + 1], np.int64))]
            nodes.append(
                helper.make_node(
                    "Slice",
                    [f"{state}0", f"{state}{layer}_start", f"{state}{layer}_end"],
                    [f"{state}_init{layer}"],
                    name=f"slice_{state}{layer}",
                )
            )
        inits += [
            _init(f"W{layer}", (rng.standard_normal((1, 4 * hidden, width)) / np.sqrt(width)).astype(np.float32)),
            _init(f"R{layer}", (rng.standard_normal((1, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)),
            _init(f"B{layer}", (0.1 * rng.standard_normal((1, 8 * hidden))).astype(np.float32)),
        ]
        nodes.append(
            helper.make_node(
                "LSTM",
                [f"seq{layer}", f"W{layer}", f"R{layer}", f"B{layer}", "", f"h_init{layer}", f"c_init{layer}"],
                [f"Y{layer}", f"Yh{layer}", f"Yc{layer}"],
                hidden_size=hidden,
                name=f"lstm{layer}",
            )
        )
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", "axis1"], [f"seq{layer + 1}"], name=f"squeeze{layer}"))
        h_out.append(f"Yh{layer}")
        c_out.append(f"Yc{layer}")
    inits.append(_init("axis1", np.array([1], np.int64)))
    nodes += [
        helper.make_node("Transpose", [f"seq{layers}"], ["batch_major"], perm=[1, 0, 2], name="to_batch_major"),
        helper.make_node("MatMul", ["batch_major", "head"], ["y"], name="head_matmul"),
        helper.make_node("Concat", h_out, ["hn"], axis=0, name="hn"),
        helper.make_node("Concat", c_out, ["cn"], axis=0, name="cn"),
    ]
    graph = helper.make_graph(
        nodes,
        "stacked_lstm",
        [
            vi("x", TensorProto.FLOAT, [batch, time, features]),
            vi("h0", TensorProto.FLOAT, [layers, batch, hidden]),
            vi("c0", TensorProto.FLOAT, [layers, batch, hidden]),
        ],
        [
            vi("y", TensorProto.FLOAT, [batch, time, classes]),
            vi("hn", TensorProto.FLOAT, [layers, batch, hidden]),
            vi("cn", TensorProto.FLOAT, [layers, batch, hidden]),
        ],
        initializer=inits,
    )
    return _checked(graph, 13)


def fixed_batch_if(seed: int = 0) -> onnx.ModelProto:
    """An If model with inputs of different fixed batch sizes: `cond [1]` (bool) and `input_0 [4,3,32,32]`;
    a Conv in the main graph, then either branch's Conv."""
    rng = np.random.default_rng(seed)
    vi = helper.make_tensor_value_info

    def branch(tag: str) -> onnx.GraphProto:
        weight = (rng.standard_normal((4, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
        return helper.make_graph(
            [helper.make_node("Conv", ["hidden", f"w_{tag}"], [f"{tag}_out"], pads=[1, 1, 1, 1], name=f"{tag}_conv")],
            tag,
            [],
            [vi(f"{tag}_out", TensorProto.FLOAT, [4, 4, 32, 32])],
            initializer=[_init(f"w_{tag}", weight)],
        )

    nodes = [
        helper.make_node("Conv", ["input_0", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["hidden"], name="relu"),
        helper.make_node("If", ["cond"], ["out"], then_branch=branch("then"), else_branch=branch("else"), name="if"),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_batch_if",
        [vi("cond", TensorProto.BOOL, [1]), vi("input_0", TensorProto.FLOAT, [4, 3, 32, 32])],
        [vi("out", TensorProto.FLOAT, [4, 4, 32, 32])],
        initializer=[_init("w", (rng.standard_normal((8, 3, 3, 3)) / np.sqrt(27)).astype(np.float32))],
    )
    return _checked(graph, 13)
