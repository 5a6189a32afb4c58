"""Sensitivity of each quantizable group to each precision: measured in onnxruntime, and cheap proxies.

Measured: the float graph with *only this group* at a candidate precision is lowered by the real passes
and run on calibration samples; its output degradation against the float outputs is the group's loss
(relative noise energy by default: noise powers of independent errors add, which is what the knapsack
assumes; KL of the output distributions, or a task metric, on request). Variants are lowered and run in
worker processes through a `concurrent.futures` executor, like sharded calibration: the base model,
annotations, ranges and samples are sent to each worker once.

Proxies need one statistics pass and no variants: the weight error of the candidate weighted by the
layer input's per-channel second moments (the diagonal of the layer Hessian E[xxᵀ]), plus the input
rounding noise; and a HAWQ-style variant that uses only the Hessian trace (its mean diagonal). They are
reported next to the measured ranking (Spearman) so a user can judge when the cheap one is enough.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import blockquant, qmath
from onnxq import ir as onnxq_ir
from onnxq.calibration.readers import Feeds
from onnxq.pass_base import PassContext, TensorRange
from onnxq.qspec import ANNOTATED_KEY, NodeQuant, set_qspec

LOSSES = ("noise", "kl", "metric")


# --- lowering a configuration ------------------------------------------------------------------------------


def lower(model: bytes, annotations: dict[int, NodeQuant | None], ranges: dict[str, TensorRange]) -> bytes:
    """The float model (serialized, annotations lost) with `annotations` by node index, lowered by the
    real passes (RTN for block weights) using known activation ranges; returns the quantized model."""
    from onnxq.passes.insert_qdq import InsertQDQ
    from onnxq.passes.lower_fp16 import LowerFP16
    from onnxq.passes.quantize_weights import QuantizeWeights

    graph_model = onnxq_ir.from_proto(onnx.load_from_string(model))
    nodes = list(graph_model.graph)
    for index, spec in annotations.items():
        set_qspec(nodes[index], spec)
    graph_model.graph.meta[ANNOTATED_KEY] = True
    specs = [s for s in annotations.values() if s is not None and not s.skip]
    context = PassContext(ranges=dict(ranges))
    if any(s.weights.granularity == "block" and not s.weights.is_float for s in specs):
        QuantizeWeights({"algorithm": "rtn"}, context)(graph_model)
    if any(not s.activations.is_float for s in specs):
        InsertQDQ({}, context)(graph_model)
    if any(s.activations.dtype == "fp16" for s in specs):
        LowerFP16({}, context)(graph_model)
    return onnxq_ir.model_bytes(graph_model)


# --- measuring a configuration -----------------------------------------------------------------------------


@dataclass
class Scores:
    """Degradation of one configuration against the float model over the samples."""

    noise: float  # mean over outputs of Σ(y-ŷ)² / Σy²
    kl: float  # mean KL(softmax(y) || softmax(ŷ)) over the last axis of every output
    sqnr_db: float  # worst output
    cosine: float  # worst output
    metric: float | None = None  # task metric (higher is better)

    def loss(self, kind: str, metric_reference: float | None = None) -> float:
        if kind == "kl":
            return self.kl
        if kind == "metric" and self.metric is not None:
            return max(0.0, (metric_reference if metric_reference is not None else 1.0) - self.metric)
        return self.noise

    def value(self, name: str) -> float:
        """The score a target names: sqnr (dB), cosine, or the task metric."""
        return {"sqnr": self.sqnr_db, "cosine": self.cosine}.get(name, self.metric if self.metric is not None else 0)


@dataclass
class _Job:
    """What a worker needs, sent once: base model, annotations, ranges, samples and float outputs."""

    model: bytes
    base: dict[int, NodeQuant | None]
    ranges: dict[str, TensorRange]
    feeds: list[Feeds]
    reference: list[list[np.ndarray]]
    output_names: list[str]
    metric: Callable[..., float] | str | None
    threads: int

    def score(self, changes: dict[int, NodeQuant | None]) -> Scores:
        """The base configuration with `changes`, lowered and measured."""
        return score(lower(self.model, {**self.base, **changes}, self.ranges), self)


_JOB: _Job | None = None


def _install(job: _Job) -> None:
    global _JOB
    _JOB = job


def _session(model: bytes, threads: int):  # type: ignore[no-untyped-def]
    from onnxq.ort_session import session

    return session(model, threads=threads)


def _metric(job: _Job) -> Callable[..., float] | None:
    if isinstance(job.metric, str):
        from onnxq.calibration.sources import load_callable

        return load_callable(job.metric, "the task metric")
    return job.metric


def score(model: bytes, job: _Job) -> Scores:
    session = _session(model, job.threads)
    metric = _metric(job)
    names = job.output_names
    noise = np.zeros(len(names))
    signal = np.zeros(len(names))
    dot = np.zeros(len(names))
    test_energy = np.zeros(len(names))
    kl_sum, kl_rows, metric_sum, samples = 0.0, 0, 0.0, 0
    inputs = {i.name for i in session.get_inputs()}
    for feeds, reference in zip(job.feeds, job.reference, strict=True):
        outputs = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        for i, (ref, test) in enumerate(zip(reference, outputs, strict=True)):
            r, t = np.asarray(ref, np.float64), np.asarray(test, np.float64)
            noise[i] += np.sum((r - t) ** 2)
            signal[i] += np.sum(r**2)
            dot[i] += np.sum(r * t)
            test_energy[i] += np.sum(t**2)
            if r.ndim and r.shape[-1] > 1:
                kl_sum += float(np.sum(_kl_rows(r, t)))
                kl_rows += r.size // r.shape[-1]
        count = next(iter(feeds.values())).shape[0] if feeds else 1
        if metric is not None:
            metric_sum += count * float(
                metric(dict(zip(names, reference, strict=True)), dict(zip(names, outputs, strict=True)), feeds)
            )
        samples += count
    signal = np.maximum(signal, 1e-30)
    ratio = noise / signal
    sqnr = 10 * np.log10(1 / np.maximum(ratio, 1e-30))
    cosine = dot / np.sqrt(signal * np.maximum(test_energy, 1e-30))
    return Scores(
        noise=float(np.mean(ratio)),
        kl=kl_sum / max(kl_rows, 1),
        sqnr_db=float(np.min(sqnr)),
        cosine=float(np.min(cosine)),
        metric=metric_sum / samples if metric is not None and samples else None,
    )


def _kl_rows(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """KL per row of the last axis; outputs that already are distributions (a Softmax output) are used as
    they are, anything else is read as logits."""

    def log_probs(x: np.ndarray) -> np.ndarray:
        if x.min() >= 0 and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3):
            return np.log(np.maximum(x, 1e-12))
        shifted = x - x.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p, log_q = log_probs(ref), log_probs(test)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def _score_variant(changes: dict[int, NodeQuant | None]) -> Scores:
    assert _JOB is not None, "worker not initialised"
    return _JOB.score(changes)


@dataclass
class Evaluator:
    """Scores configurations (changes to a base annotation) in worker processes, or in this one."""

    model: bytes
    base: dict[int, NodeQuant | None]
    ranges: dict[str, TensorRange]
    feeds: list[Feeds]
    metric: Callable[..., float] | str | None = None
    workers: int = 1
    executor: Executor | None = None
    _job: _Job | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        threads = max(1, (os.cpu_count() or 1) // max(self.workers, 1))
        session = _session(self.model, threads)
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name for i in session.get_inputs()}
        reference = [session.run(names, {k: v for k, v in f.items() if k in inputs}) for f in self.feeds]
        self._job = _Job(self.model, self.base, self.ranges, self.feeds, reference, names, self.metric, threads)

    @property
    def metric_reference(self) -> float | None:
        """The task metric of the float model against itself (its best possible score)."""
        assert self._job is not None
        metric = _metric(self._job)
        if metric is None:
            return None
        names = self._job.output_names
        scores = [
            metric(dict(zip(names, r, strict=True)), dict(zip(names, r, strict=True)), f)
            for f, r in zip(self.feeds, self._job.reference, strict=True)
        ]
        return float(np.mean(scores))

    def one(self, changes: dict[int, NodeQuant | None]) -> Scores:
        assert self._job is not None
        return self._job.score(changes)

    def many(
        self, variants: list[dict[int, NodeQuant | None]], advance: Callable[[int], None] = lambda _n: None
    ) -> list[Scores]:
        if self.workers <= 1 and self.executor is None:
            results = []
            for changes in variants:
                results.append(self.one(changes))
                advance(1)
            return results
        own = self.executor is None
        pool = self.executor or ProcessPoolExecutor(
            self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_install,
            initargs=(self._job,),
        )
        try:
            if not own:  # a user's executor: install the job with every call instead
                return list(pool.map(_score_with, [self._job] * len(variants), variants))
            return list(_bounded(pool, variants, 2 * self.workers, advance))
        finally:
            if own:
                pool.shutdown()


def _score_with(job: _Job, changes: dict[int, NodeQuant | None]) -> Scores:
    return job.score(changes)


def _bounded(
    pool: Executor, variants: list[dict[int, NodeQuant | None]], window: int, advance: Callable[[int], None]
) -> Iterator[Scores]:
    """Results in order, with at most `window` variants in flight (their models are not all in memory)."""
    pending: list[Future[Scores]] = []
    items = iter(variants)
    for changes in items:
        pending.append(pool.submit(_score_variant, changes))
        if len(pending) >= window:
            break
    done = 0
    while done < len(variants):
        result = pending[done].result()
        pending[done] = None  # type: ignore[call-overload]
        done += 1
        advance(1)
        nxt = next(items, None)
        if nxt is not None:
            pending.append(pool.submit(_score_variant, nxt))
        yield result


# --- proxies ---------------------------------------------------------------------------------------------


@dataclass
class LayerStats:
    """Per-input-channel E[x²] of a group's data input, and the element count of its output."""

    channel_sqmean: np.ndarray | None
    output_size: int


def channel_axis(node: ir.Node) -> int:
    """The axis of the data input that the weight's input channels index."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 1
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return 0
    return -1


def layer_stats(model: ir.Model, nodes: list[ir.Node], feeds: Iterable[Feeds]) -> list[LayerStats]:
    """One onnxruntime pass with in-graph ReduceSumSquare per channel (Python sees [C] per layer)."""
    proto = onnxq_ir.to_proto(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    make = onnx.helper.make_node
    outputs: dict[int, tuple[str | None, str, str]] = {}
    for index, node in enumerate(nodes):
        x, y = node.inputs[0], node.outputs[0]
        rank = x.shape.rank() if x is not None and x.shape is not None else None
        prefix = f"__onnxq_stats_{index}"
        sumsq = None
        if rank:
            axis = channel_axis(node) % rank
            axes = [a for a in range(rank) if a != axis]
            sumsq = f"{prefix}_sumsq"
            if opset >= 18:
                axes_name = f"{prefix}_axes"
                proto.graph.initializer.append(
                    onnx.helper.make_tensor(axes_name, onnx.TensorProto.INT64, [len(axes)], axes)
                )
                proto.graph.node.append(make("ReduceSumSquare", [x.name, axes_name], [sumsq], keepdims=0))
            else:
                proto.graph.node.append(make("ReduceSumSquare", [x.name], [sumsq], axes=axes, keepdims=0))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(sumsq, onnx.TensorProto.FLOAT, None))
        sizes = []
        for value, tag in ((x, "in"), (y, "out")):
            name = f"{prefix}_{tag}_size"
            proto.graph.node.append(make("Size", [value.name], [name]))
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
            sizes.append(name)
        outputs[index] = (sumsq, sizes[0], sizes[1])
    session = _session(proto.SerializeToString(), 0)
    wanted = [n for triple in outputs.values() for n in triple if n is not None]
    inputs = {i.name for i in session.get_inputs()}
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, float] = {}
    out_size: dict[int, int] = {}
    for batch in feeds:
        values = dict(zip(wanted, session.run(wanted, {k: v for k, v in batch.items() if k in inputs}), strict=True))
        for key, (sumsq, in_size, o_size) in outputs.items():
            out_size.setdefault(key, int(values[o_size]))
            if sumsq is not None:
                s = np.asarray(values[sumsq], np.float64)
                sums[key] = sums.get(key, 0) + s
                counts[key] = counts.get(key, 0) + int(values[in_size]) / max(s.size, 1)
    return [
        LayerStats(sums[key] / max(counts[key], 1) if key in sums else None, out_size.get(key, 0)) for key in outputs
    ]


def weight_matrix(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [input channels, rest]: rows line up with the input's channel axis."""
    if node.op_type == "Conv":  # [O, C/g, kh, kw] → [C/g, O·kh·kw]
        return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def channel_weights(node: ir.Node, weight: np.ndarray, sqmean: np.ndarray) -> np.ndarray:
    """E[x²] for each weight element's input channel (grouped convs read a slice per output group)."""
    if node.op_type == "Conv":
        out_channels, per_group = weight.shape[0], weight.shape[1]
        groups = max(1, sqmean.size // per_group)
        group_of_output = np.arange(out_channels) // max(1, out_channels // groups)
        channel = group_of_output[:, None] * per_group + np.arange(per_group)[None, :]
        h = sqmean[np.clip(channel, 0, sqmean.size - 1)]  # [O, C/g]
        return np.broadcast_to(h.reshape(h.shape + (1,) * (weight.ndim - 2)), weight.shape)  # Conv1d/2d/3d
    rows = weight_matrix(node, weight).shape[0]
    h = sqmean[:rows] if sqmean.size >= rows else np.resize(sqmean, rows)
    matrix = np.broadcast_to(h[:, None], weight_matrix(node, weight).shape)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return matrix.T
    return matrix.reshape(weight.shape)


def rounded_weight(node: ir.Node, weight: np.ndarray, spec: NodeQuant) -> np.ndarray:
    """The weight as the candidate stores it (what the lowering would compute), back in float."""
    w = spec.weights
    if spec.skip or w.dtype == "fp32":
        return weight
    if w.dtype == "fp16":
        return weight.astype(np.float16).astype(np.float32)
    if w.granularity == "block":
        matrix = weight_matrix(node, weight) if node.op_type != "Conv" else weight.reshape(weight.shape[0], -1).T
        quant = blockquant.rtn(matrix.astype(np.float32), w.block_size or 32, w.dtype, w.symmetric)
        back = quant.dequantize()
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
            return back.T
        return back.reshape(weight.shape) if node.op_type != "Conv" else back.T.reshape(weight.shape)
    from onnxq.passes.insert_qdq import _weight_axis

    axis = _weight_axis(node, weight, w)
    q, scale, zero = qmath.quantize_weight(weight, w.dtype, w.symmetric, axis, w.reduce_range)
    return qmath.dequantize(q, scale, zero, axis)


def proxies(
    node: ir.Node,
    weight: np.ndarray,
    spec: NodeQuant,
    stats: LayerStats,
    input_range: TensorRange | None,
) -> tuple[float, float]:
    """(diagonal-Hessian proxy, Hessian-trace proxy): predicted relative noise energy of the layer output."""
    weight = weight.astype(np.float64)
    error = (rounded_weight(node, weight.astype(np.float32), spec) - weight) ** 2
    act_noise = 0.0
    if not spec.skip and not spec.activations.is_float and input_range is not None:
        lo, hi = qmath.qrange(spec.activations.dtype, spec.activations.symmetric)
        step = (max(input_range.max, 0.0) - min(input_range.min, 0.0)) / max(hi - lo, 1)
        act_noise = step**2 / 12
    h = np.ones_like(weight) if stats.channel_sqmean is None else channel_weights(node, weight, stats.channel_sqmean)
    energy = float(np.sum(h * weight**2)) or 1e-30
    diag = (float(np.sum(h * error)) + act_noise * float(np.sum(weight**2))) / energy
    mean_h = float(np.mean(h)) or 1e-30
    trace = (mean_h * float(np.sum(error)) + act_noise * float(np.sum(weight**2))) / (
        mean_h * float(np.sum(weight**2)) or 1e-30
    )
    return diag, trace


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (ties get their mean rank); nan with fewer than 3 pairs."""
    if len(a) < 3:
        return float("nan")

    def ranks(x: list[float]) -> np.ndarray:
        values = np.asarray(x, np.float64)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for v in np.unique(values):
            tied = values == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def first_samples(model: ir.Model, context: PassContext, count: int) -> list[Feeds]:
    """Up to `count` single-sample feeds from the calibration data (only the model's inputs)."""
    from onnxq.calibration.readers import input_specs, rebatch

    if context.calibration_data is None:
        return []
    out: list[Feeds] = []
    for batch in rebatch(context.calibration_data(), input_specs(model), 1):
        out.append(batch)  # extras (labels) stay: a task metric may read them
        if len(out) >= count:
            break
    return out


def model_feeds(model: bytes, batches: list[Feeds]) -> list[Feeds]:
    """Only the model's own inputs (data files may carry labels)."""
    names = {i.name for i in onnx.load_from_string(model).graph.input}
    return [{k: v for k, v in b.items() if k in names} for b in batches]


def to_json(value: Any) -> Any:
    from onnxq.validate import _json_safe

    return _json_safe(value)
