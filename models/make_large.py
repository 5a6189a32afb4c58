"""make_large: a transformer-like decoder with random weights, as large as asked (default ~2.2 GiB), to
measure quantization on models over protobuf's 2 GB limit.

The weights are never all in memory: the graph is a small ModelProto whose initializers point into a
``.data`` file that is written one tensor at a time, in chunks of rows, so generating 2.2 GiB holds a few
MB of weights at once. Opset 21 (block DequantizeLinear needs no opset upgrade), with the lowest IR
version those opsets allow (what onnxruntime accepts).

Graph (no biases, no positions: the weights are random anyway)::

    input_ids int64 [batch, seq] ─Gather(embedding)─▶ x
    layers × { h = LayerNorm(x); q, k, v = h·Wq, h·Wk, h·Wv split into heads (Reshape/Transpose);
               x += Softmax(q·kᵀ/√d + causal mask)·v ·Wo;  x += Gelu(LayerNorm(x)·W1)·W2 }
    logits float [batch, seq, vocab] = LayerNorm(x)·W_head

    python models/make_large.py --out /tmp/large/large.onnx            # ~2.2 GiB, 9 layers of 2048
    python models/make_large.py --out /tmp/s.onnx --hidden 256 --layers 2 --vocab 4096
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper

if __package__ in (None, ""):  # run as a script: make `models` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.zoo import write_atomically

OPSET = 21
ALIGNMENT = 4096  # tensor offsets in the data file: onnxruntime memory-maps page-aligned external data
CHUNK_VALUES = 1 << 22  # random values generated and written at once (16 MB of float32)
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class Dims:
    """The decoder's dimensions; `ffn` defaults to 4 × hidden."""

    hidden: int = 2048
    layers: int = 9
    vocab: int = 32000
    heads: int = 16
    ffn: int = 0

    @property
    def ffn_dim(self) -> int:
        return self.ffn or 4 * self.hidden

    def layer_bytes(self) -> int:
        h = self.hidden
        return 4 * (4 * h * h + 2 * h * self.ffn_dim + 4 * h)

    def fixed_bytes(self) -> int:
        return 4 * (2 * self.vocab * self.hidden + 2 * self.hidden)

    def total_bytes(self) -> int:
        return self.fixed_bytes() + self.layers * self.layer_bytes()


def layers_for(gib: float, hidden: int, vocab: int, heads: int = 16, ffn: int = 0) -> int:
    """Number of layers whose weights come closest to `gib` GiB (at least one)."""
    dims = Dims(hidden, 1, vocab, heads, ffn)
    return max(1, round((gib * 2**30 - dims.fixed_bytes()) / dims.layer_bytes()))


class _DataWriter:
    """Appends tensors to the open data file and makes TensorProtos that point at them."""

    def __init__(self, file: BinaryIO, location: str, rng: np.random.Generator) -> None:
        self.file = file
        self.location = location
        self.rng = rng
        self.initializers: list[TensorProto] = []

    def random(self, name: str, shape: tuple[int, ...], std: float) -> str:
        """A float32 tensor of N(0, std²) values, written in chunks of rows."""
        rows, row = shape[0], math.prod(shape[1:])
        step = max(1, CHUNK_VALUES // max(row, 1))
        chunks = (
            (self.rng.standard_normal((min(step, rows - start), row), dtype=np.float32) * np.float32(std))
            for start in range(0, rows, step)
        )
        return self._external(name, shape, chunks)

    def constant(self, name: str, shape: tuple[int, ...], value: float) -> str:
        """A small float32 tensor stored inside the model (LayerNorm scale and bias)."""
        self.initializers.append(helper.make_tensor(name, TensorProto.FLOAT, shape, np.full(shape, value, np.float32)))
        return name

    def _external(self, name: str, shape: tuple[int, ...], chunks: Iterator[np.ndarray]) -> str:
        offset = -(-self.file.tell() // ALIGNMENT) * ALIGNMENT
        self.file.seek(offset)
        for chunk in chunks:
            chunk.astype("<f4", copy=False).tofile(self.file)
        length = self.file.tell() - offset
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        for key, val in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, val
        self.initializers.append(tensor)
        return name


def write_model(path: str | os.PathLike, dims: Dims = Dims(), seed: int = 0) -> Path:
    """Write the decoder to `path` and its weights to `path`.data; returns `path`. Readers see the old files or
    the new ones: the data file is written under a temporary name and renamed before the model."""
    path = Path(path)
    if dims.hidden % dims.heads:
        raise ValueError(f"hidden {dims.hidden} is not a multiple of heads {dims.heads}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = f"{path.name}.data"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{data_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            writer = _DataWriter(file, data_name, np.random.default_rng(seed))
            graph = _build_graph(writer, dims)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path.parent / data_name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    opsets = [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxq.models.make_large")
    model.ir_version = max(3, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    write_atomically(path, model.SerializeToString())
    return path


def _build_graph(w: _DataWriter, s: Dims) -> onnx.GraphProto:
    h, heads, d = s.hidden, s.heads, s.hidden // s.heads
    nodes: list[onnx.NodeProto] = []
    small = [
        helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, 0, heads, d]),
        helper.make_tensor("merged_shape", TensorProto.INT64, [3], [0, 0, h]),
        helper.make_tensor("attn_scale", TensorProto.FLOAT, [], [1.0 / math.sqrt(d)]),
        helper.make_tensor("seq_start", TensorProto.INT64, [1], [1]),
        helper.make_tensor("seq_end", TensorProto.INT64, [1], [2]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
    ]

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"{output}_{op}", **attrs))
        return output

    def norm(x: str, prefix: str) -> str:
        scale, bias = w.constant(f"{prefix}.weight", (h,), 1.0), w.constant(f"{prefix}.bias", (h,), 0.0)
        return node("LayerNormalization", [x, scale, bias], f"{prefix}.out", axis=-1, epsilon=1e-5)

    def linear(x: str, prefix: str, k: int, n: int, out: str = "") -> str:
        weight = w.random(f"{prefix}.weight", (k, n), 1.0 / math.sqrt(k))
        return node("MatMul", [x, weight], out or f"{prefix}.out")

    # causal mask [seq, seq]: 0 on and below the diagonal, -1e9 above it
    seq = node("Slice", [node("Shape", [INPUT_NAME], "ids_shape"), "seq_start", "seq_end"], "seq_len")
    square = node("Concat", [seq, seq], "mask_shape", axis=0)
    filled = node(
        "ConstantOfShape", [square], "mask_full", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1e9])
    )
    mask = node("Trilu", [filled, "one"], "causal_mask", upper=1)  # keeps column > row

    x = node("Gather", [w.random("embed.weight", (s.vocab, h), 1.0), INPUT_NAME], "embed.out", axis=0)
    for i in range(s.layers):
        p = f"layers.{i}"
        a = norm(x, f"{p}.attn_norm")
        q = node("Transpose", [node("Reshape", [linear(a, f"{p}.q", h, h), "heads_shape"], f"{p}.q_heads")],
                 f"{p}.q_t", perm=[0, 2, 1, 3])  # fmt: skip
        k = node("Transpose", [node("Reshape", [linear(a, f"{p}.k", h, h), "heads_shape"], f"{p}.k_heads")],
                 f"{p}.k_t", perm=[0, 2, 3, 1])  # fmt: skip
        v = node("Transpose", [node("Reshape", [linear(a, f"{p}.v", h, h), "heads_shape"], f"{p}.v_heads")],
                 f"{p}.v_t", perm=[0, 2, 1, 3])  # fmt: skip
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), "attn_scale"], f"{p}.scores")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.pv")], f"{p}.ctx_t", perm=[0, 2, 1, 3])
        merged = node("Reshape", [context, "merged_shape"], f"{p}.ctx")
        x = node("Add", [x, linear(merged, f"{p}.o", h, h)], f"{p}.attn_res")
        up = node("Gelu", [linear(norm(x, f"{p}.ffn_norm"), f"{p}.up", h, s.ffn_dim)], f"{p}.act")
        x = node("Add", [x, linear(up, f"{p}.down", s.ffn_dim, h)], f"{p}.ffn_res")
    linear(norm(x, "final_norm"), "lm_head", h, s.vocab, out=OUTPUT_NAME)
    return helper.make_graph(
        nodes,
        "large_decoder",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", "sequence", s.vocab])],
        initializer=[*w.initializers, *small],
    )


def model_bytes(path: str | os.PathLike) -> int:
    """Size of a model on disk: the .onnx file and every external data file it names."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / location).stat().st_size for location in locations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", required=True, help="model path; weights go to OUT.data beside it")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=None, help="default: as many as --gb asks")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=0, help="FFN width (default 4 × hidden)")
    parser.add_argument("--gb", type=float, default=2.2, help="target weight size in GiB (picks --layers)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = args.layers or layers_for(args.gb, args.hidden, args.vocab, args.heads, args.ffn)
    dims = Dims(args.hidden, layers, args.vocab, args.heads, args.ffn)
    path = write_model(args.out, dims, args.seed)
    size = model_bytes(path)
    print(f"{path}: {layers} layers of {dims.hidden}, vocab {dims.vocab}, {size / 2**30:.2f} GiB ({size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
