"""The instrumented session: onnxruntime computes the statistics on an augmented clone of the model.

For every requested tensor the clone gets in-graph ReduceMin/ReduceMax outputs and, for histogram
methods, a strided subsample of at most `sample_per_tensor` elements (Reshape → Slice with a step
computed from Size), so each run ships a few scalars and small vectors back to Python instead of whole
activations; works for any input shape per batch.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxq import ir as onnxq_ir
from onnxq.calibration.collectors import COLLECTORS
from onnxq.calibration.readers import Feeds, InputSpec, input_specs, rebatch
from onnxq.errors import UsageError
from onnxq.pass_base import TensorRange

SUFFIX = "__onnxq_"


def augmented_model(
    model: ir.Model, names: list[str], reductions: tuple[str, ...], sample_per_tensor: int = 0
) -> onnx.ModelProto:
    """A protobuf clone of `model` with `<name>__onnxq_<reduction>` outputs for each tensor."""
    proto = onnxq_ir.to_proto(model)
    elem_types = _elem_types(proto)
    graph = proto.graph
    if {"sample", "channel_absmax", "gram"} & set(reductions):
        _add_sampling_constants(graph, sample_per_tensor)
    for name in names:
        elem_type = elem_types.get(name, onnx.TensorProto.FLOAT)
        for reduction in reductions:
            out = f"{name}{SUFFIX}{reduction}"
            if reduction == "sample":
                graph.node.extend(_sample_nodes(name, out, sample_per_tensor))
                graph.output.append(onnx.helper.make_tensor_value_info(out, elem_type, ["n"]))
                continue
            if reduction == "channel_absmax":
                graph.node.extend(_channel_absmax_nodes(name, out, _opset(proto)))
                graph.output.append(onnx.helper.make_tensor_value_info(out, elem_type, ["c"]))
                continue
            if reduction == "gram":
                graph.node.extend(_gram_nodes(name, out, f"{name}{SUFFIX}rows"))
                graph.output.append(onnx.helper.make_tensor_value_info(out, elem_type, ["c", "c"]))
                continue
            if reduction == "rows":
                graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.INT64, [1]))
                continue
            op = {"min": "ReduceMin", "max": "ReduceMax"}[reduction]
            graph.node.append(onnx.helper.make_node(op, [name], [out], keepdims=0, name=out))
            graph.output.append(onnx.helper.make_tensor_value_info(out, elem_type, []))
    return proto


_K = f"{SUFFIX}k_"


def _add_sampling_constants(graph: onnx.GraphProto, budget: int) -> None:
    int64 = onnx.TensorProto.INT64
    for name, values, dims in [
        ("flat", [-1], [1]),
        ("one", [1], [1]),
        ("zero", [0], [1]),
        ("end", [2**62], [1]),
        ("budget", [max(budget, 1)], []),
        ("budget_minus_1", [max(budget, 1) - 1], []),
    ]:
        graph.initializer.append(onnx.helper.make_tensor(f"{_K}{name}", int64, dims, values))


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)


def _channel_absmax_nodes(name: str, out: str, opset: int) -> list[onnx.NodeProto]:
    """max |x| per channel of the last axis, over every other axis: [..., C] → [C] (SmoothQuant's input)."""
    make = onnx.helper.make_node
    nodes = [make("Abs", [name], [f"{out}_abs"], name=f"{out}_abs")]
    rows, flat = _last_axis_rows(f"{out}_abs", out)
    nodes += rows
    if opset >= 18:
        nodes.append(make("ReduceMax", [flat, f"{_K}zero"], [out], keepdims=0, name=out))
    else:
        nodes.append(make("ReduceMax", [flat], [out], axes=[0], keepdims=0, name=out))
    return nodes


def _last_axis_rows(name: str, out: str) -> tuple[list[onnx.NodeProto], str]:
    """x [..., C] → [rows, C] (the value returned), for any rank and shape."""
    make = onnx.helper.make_node
    shape, last, new_shape, flat = (f"{out}_{p}" for p in ("shape", "last", "shape2d", "flat"))
    nodes = [
        make("Shape", [name], [shape], name=f"{out}_shape"),
        make("Slice", [shape, f"{_K}flat", f"{_K}end"], [last], name=f"{out}_last"),
        make("Concat", [f"{_K}flat", last], [new_shape], axis=0, name=f"{out}_concat"),
        make("Reshape", [name, new_shape], [flat], name=f"{out}_reshape"),
    ]
    return nodes, flat


def _gram_nodes(name: str, out: str, rows: str) -> list[onnx.NodeProto]:
    """Σ_rows x xᵀ as one [C, C] MatMul in onnxruntime, and the row count: Python sees C² numbers per batch
    instead of the activation itself."""
    make = onnx.helper.make_node
    nodes, flat = _last_axis_rows(name, out)
    nodes += [
        make("Transpose", [flat], [f"{out}_t"], perm=[1, 0], name=f"{out}_transpose"),
        make("MatMul", [f"{out}_t", flat], [out], name=out),
        make("Shape", [flat], [f"{out}_flat_shape"], name=f"{out}_flat_shape"),
        make("Slice", [f"{out}_flat_shape", f"{_K}zero", f"{_K}one"], [rows], name=f"{out}_rows"),
    ]
    return nodes


def _sample_nodes(name: str, out: str, budget: int) -> list[onnx.NodeProto]:
    """x → flat → every step-th element, step = ceil(size / budget) (all elements when budget is 0)."""
    make = onnx.helper.make_node
    flat = f"{out}_flat"
    nodes = [make("Reshape", [name, f"{_K}flat"], [flat if budget else out], name=f"{out}_reshape")]
    if not budget:
        return nodes
    size, ceil_num, step, step_1d = (f"{out}_{part}" for part in ("size", "num", "step", "step1d"))
    nodes += [
        make("Size", [name], [size], name=f"{out}_size"),
        make("Add", [size, f"{_K}budget_minus_1"], [ceil_num], name=f"{out}_add"),
        make("Div", [ceil_num, f"{_K}budget"], [step], name=f"{out}_div"),
        make("Reshape", [step, f"{_K}one"], [step_1d], name=f"{out}_step"),
        make("Slice", [flat, f"{_K}zero", f"{_K}end", f"{_K}zero", step_1d], [out], name=f"{out}_slice"),
    ]
    return nodes


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({t.name: t.data_type for t in graph.initializer})
    return {k: v for k, v in types.items() if v}


def make_session(proto: onnx.ModelProto, providers: list[str] | None = None, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), options, providers=providers or ["CPUExecutionProvider"])


def collect_ranges(
    model: ir.Model,
    names: list[str],
    data: Callable[[], Iterator[Feeds]],
    *,
    method: str = "minmax",
    batch_size: int = 1,
    num_samples: int | None = None,
    sample_per_tensor: int = 4096,
    exact: frozenset[str] = frozenset(),
    workers: int = 1,
    executor: Executor | None = None,
    show_progress: bool = False,
    **collector_settings: object,
) -> tuple[dict[str, TensorRange], str]:
    """Ranges of `names` over the data, and a fingerprint of (tensors, method, data) for caches.

    `collector_settings` go to the collector (percentile, bins, …); unknown ones are ignored so one
    recipe section can serve every method. Tensors in `exact` keep their min-max range whatever the method.
    With `workers > 1` (or an `executor`: any concurrent.futures.Executor, e.g. one backed by a cluster),
    batches are dealt round-robin to shards whose collector states are merged: the result is the same.
    """
    collector = make_collector(method, collector_settings)
    augmented = augmented_model(model, names, collector.reductions, sample_per_tensor)
    job = _ShardJob(
        augmented.SerializeToString(),
        tuple(input_specs(model)),
        tuple(names),
        method,
        dict(collector_settings),
        batch_size,
    )
    if workers > 1 or executor is not None:
        shards = max(workers, 1)
        own = executor is None
        pool = executor or ProcessPoolExecutor(shards, mp_context=multiprocessing.get_context("spawn"))
        try:
            parts = list(pool.map(_run_shard, [job] * shards, [data] * shards, range(shards), [shards] * shards))
        finally:
            if own:
                pool.shutdown()
        for part, _, _ in parts:
            collector = collector.merge(part)
        samples = sum(count for _, count, _ in parts)
        digest_text = "".join(text for _, _, text in sorted(parts, key=lambda p: p[2]))
    else:
        with _progress(show_progress, f"calibrating ({method})", num_samples) as advance:
            collector, samples, digest_text = job.run(data, 0, 1, collector, advance)
    if samples == 0:
        raise UsageError("the calibration data produced no batch", "check the data and the model's batch size")
    digest = hashlib.sha256(f"{method}|{sorted(names)}|{samples}|{digest_text}".encode())
    return collector.result(frozenset(exact)), digest.hexdigest()[:16]


@dataclass(frozen=True)
class _ShardJob:
    """What one shard needs (picklable): the augmented model's bytes and the collector settings."""

    model: bytes
    specs: tuple[InputSpec, ...]
    names: tuple[str, ...]
    method: str
    settings: dict[str, object]
    batch_size: int

    def run(self, data, shard: int, shards: int, collector=None, advance=lambda _n: None):  # type: ignore[no-untyped-def]
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if shards > 1:
            options.intra_op_num_threads = max(1, (os.cpu_count() or 1) // shards)
        session = ort.InferenceSession(self.model, options, providers=["CPUExecutionProvider"])
        collector = collector or make_collector(self.method, self.settings)
        inputs = {spec.name for spec in self.specs}
        wanted = [f"{n}{SUFFIX}{r}" for n in self.names for r in collector.reductions]
        samples, digest = 0, hashlib.sha256()
        for index, batch in enumerate(rebatch(data(), list(self.specs), self.batch_size)):
            if index % shards != shard:
                continue
            feeds = {k: v for k, v in batch.items() if k in inputs}
            try:
                outputs = session.run(wanted, feeds)
            except Exception as exc:
                raise UsageError(
                    f"onnxruntime failed on a calibration batch ({str(exc).splitlines()[0][:200]})",
                    "check that the data matches the model's inputs (shapes, layout, dtype)",
                ) from None
            it = iter(outputs)
            for name in self.names:
                collector.update(name, {r: next(it) for r in collector.reductions})
            count = next(iter(feeds.values())).shape[0] if feeds else 1
            if samples < 4:
                for value in feeds.values():
                    digest.update(np.ascontiguousarray(value).tobytes()[:4096])
            samples += count
            advance(count)
        return collector, samples, f"{shard}:{digest.hexdigest()}"


def _run_shard(job: _ShardJob, data, shard: int, shards: int):  # type: ignore[no-untyped-def]
    return job.run(data, shard, shards)


def make_collector(method: str, settings: dict[str, object]):  # type: ignore[no-untyped-def]
    """A collector for `method`, given the settings it declares (others are ignored)."""
    import dataclasses

    cls = COLLECTORS[method]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in settings.items() if k in fields and v is not None})


class _progress:
    """A rich progress bar when asked for, a no-op otherwise (tests, library use)."""

    def __init__(self, enabled: bool, label: str, total: int | None) -> None:
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda _n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._bar.stop()
