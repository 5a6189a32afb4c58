"""The instrumented session: onnxruntime computes the statistics on an augmented clone of the model.

For every requested tensor the clone gets in-graph ReduceMin/ReduceMax outputs and, for histogram
methods, a strided subsample of at most `sample_per_tensor` elements (Reshape → Slice with a step
computed from Size), so each run ships a few scalars and small vectors back to Python instead of whole
activations; works for any input shape per batch.

A tensor made inside a subgraph (an If branch, a Loop or Scan body) cannot be a graph output. Its min and
max are reduced where it lives, returned as an extra output of the subgraph (the other If branch returns
+inf/-inf, which no range contains), reduced again over the iterations in the enclosing graph, and so on
out to the main graph. Such tensors get min-max ranges whatever the method. A batch in which the tensor
was never computed (a branch not taken, zero iterations) contributes nothing to its range.

Ops onnxruntime has no schema for (a custom domain without its kernel library) are cut from the clone with
everything computed from them, so the rest of the model can still be calibrated.
"""

from __future__ import annotations

import functools
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
from onnxq.calibration.readers import Feeds, InputSpec, input_specs, rebatch, sample_count
from onnxq.errors import UsageError
from onnxq.pass_base import TensorRange
from onnxq.progress import progress

SUFFIX = "__onnxq_"


def augmented_model(
    model: ir.Model, names: list[str], reductions: tuple[str, ...], sample_per_tensor: int = 0
) -> onnx.ModelProto:
    """A protobuf clone of `model` with `<name>__onnxq_<reduction>` outputs for each tensor.

    A tensor defined inside a subgraph gets its min/max (and a two-element sample) carried out to the main
    graph; one that cannot be (other reductions, or a node whose subgraph outputs cannot be extended) gets
    no outputs."""
    return _augment(model, names, reductions, sample_per_tensor)[0]


def _augment(
    model: ir.Model, names: list[str], reductions: tuple[str, ...], sample_per_tensor: int
) -> tuple[onnx.ModelProto, list[str], set[str]]:
    """The augmented clone, the names it has outputs for, and which of those live in subgraphs."""
    proto = onnxq_ir.to_proto(model)
    elem_types = _elem_types(proto)
    graph = proto.graph
    lost = _drop_unrunnable(proto)
    if {"sample", "channel_absmax", "gram"} & set(reductions):
        _add_sampling_constants(graph, sample_per_tensor)
    inner = _inner_tensors(graph)
    defined = (
        {v.name for v in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    )
    kept, lifted = [], set()
    for name in names:
        if name in lost or (name not in defined and name not in inner):
            continue  # after an op onnxruntime cannot run, or in a subgraph of one
        if name in inner:
            if set(reductions) <= {"min", "max", "sample"} and _can_lift(inner[name]):
                _lift_min_max(graph, inner[name], name, reductions)
                kept.append(name)
                lifted.add(name)
            continue
        kept.append(name)
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
    return proto, kept, lifted


_K = f"{SUFFIX}k_"


@functools.cache
def _onnxruntime_ops() -> frozenset[tuple[str, str]] | None:
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        return frozenset((schema.domain, schema.name) for schema in ort_c.get_all_operator_schema())
    except Exception:  # a build without schema access: assume it runs everything
        return None


def onnxruntime_has_op(domain: str, op_type: str) -> bool:
    """Whether onnxruntime knows the op (ONNX, ai.onnx.ml or its com.microsoft contrib ops): a custom domain
    needs its kernel library, which calibration does not load."""
    known = _onnxruntime_ops()
    return known is None or ("" if domain == "ai.onnx" else domain, op_type) in known


def _runnable(node: onnx.NodeProto, functions: set[tuple[str, str]]) -> bool:
    if (node.domain, node.op_type) not in functions and not onnxruntime_has_op(node.domain, node.op_type):
        return False
    return all(_runnable(n, functions) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH for n in a.g.node)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Inputs of the node and every name its subgraphs mention (a superset of what they read from outside)."""
    names = set(node.input)
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            for inner in a.g.node:
                names |= _reads(inner)
    return names


def _drop_unrunnable(proto: onnx.ModelProto) -> set[str]:
    """Remove the nodes onnxruntime cannot run and all computed from them; returns the tensors lost.
    (Model-local functions run: onnxruntime inlines them.)"""
    graph = proto.graph
    functions = {(f.domain, f.name) for f in proto.functions}
    lost: set[str] = set()
    kept = []
    for node in graph.node:  # topological order
        if not _runnable(node, functions) or _reads(node) & lost:
            lost.update(node.output)
        else:
            kept.append(node)
    if lost:
        outputs = [o for o in graph.output if o.name not in lost]
        del graph.node[:], graph.output[:]
        graph.node.extend(kept)
        graph.output.extend(outputs)
    return lost


# (graph, node, attribute name): one step from a graph into the subgraph held by that node's attribute
Step = tuple[onnx.GraphProto, onnx.NodeProto, str]


def _inner_tensors(graph: onnx.GraphProto, path: tuple[Step, ...] = ()) -> dict[str, tuple[Step, ...]]:
    """Tensors defined inside subgraphs (their inputs and node outputs), with the path from `graph` down."""
    found: dict[str, tuple[Step, ...]] = {}
    for node in graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            steps = (*path, (graph, node, attr.name))
            sub = attr.g
            for name in [*(v.name for v in sub.input), *(o for n in sub.node for o in n.output)]:
                if name:
                    found.setdefault(name, steps)
            found.update({k: v for k, v in _inner_tensors(sub, steps).items() if k not in found})
    return found


def _can_lift(path: tuple[Step, ...]) -> bool:
    """Whether each node on the path can return one more value: If (both branches), Loop and Scan (a scan
    output), in the default domain, with as many node outputs as its subgraph has (Loop: minus `cond`)."""
    for _, node, attr in path:
        if node.domain not in ("", "ai.onnx"):
            return False
        body = _subgraph(node, attr)
        if node.op_type == "If":
            continue
        if node.op_type == "Loop" and len(node.output) == len(body.output) - 1:
            continue
        if node.op_type == "Scan" and len(node.output) == len(body.output):
            continue
        return False
    return True


def _lift_min_max(graph: onnx.GraphProto, path: tuple[Step, ...], name: str, reductions: tuple[str, ...]) -> None:
    """`<name>__onnxq_min`/`_max` (and `_sample` = [min, max]) in the main graph for a subgraph tensor."""
    make = onnx.helper.make_node
    for reduction, op, neutral in (("min", "ReduceMin", np.inf), ("max", "ReduceMax", -np.inf)):
        out = f"{name}{SUFFIX}{reduction}"
        innermost = _subgraph(*path[-1][1:])
        current = f"{out}_d{len(path)}"
        innermost.node.append(make(op, [name], [current], keepdims=0, name=current))
        for depth in range(len(path) - 1, -1, -1):
            parent, node, attr = path[depth]
            _subgraph(node, attr).output.append(_scalar_info(current))
            if node.op_type == "If":
                other = _subgraph(node, "else_branch" if attr == "then_branch" else "then_branch")
                other.node.append(_constant(f"{current}_other", np.float32(neutral)))
                other.output.append(_scalar_info(f"{current}_other"))
            for a in node.attribute:  # Scan: the new scan output is stacked on axis 0, forward
                if a.name in ("scan_output_axes", "scan_output_directions"):
                    a.ints.append(0)
            stacked = f"{out}_d{depth}_stacked"
            node.output.append(stacked)
            current = out if depth == 0 else f"{out}_d{depth}"
            # one value per iteration (one in all for If): flatten, add the neutral element (zero
            # iterations give an empty tensor), reduce
            parent.node.extend(
                [
                    _constant(f"{stacked}_shape", np.array([-1], np.int64)),
                    _constant(f"{stacked}_neutral", np.array([neutral], np.float32)),
                    make("Reshape", [stacked, f"{stacked}_shape"], [f"{stacked}_flat"], name=f"{stacked}_flat"),
                    make(
                        "Concat",
                        [f"{stacked}_flat", f"{stacked}_neutral"],
                        [f"{stacked}_all"],
                        axis=0,
                        name=f"{stacked}_all",
                    ),
                    make(op, [f"{stacked}_all"], [current], keepdims=0, name=current),
                ]
            )
        if reduction in reductions:
            graph.output.append(_scalar_info(out))
    if "sample" in reductions:  # only the extremes: subgraph tensors get min-max ranges
        out = f"{name}{SUFFIX}sample"
        ends = [f"{name}{SUFFIX}{r}" for r in ("min", "max")]
        graph.node.extend(
            [
                *(make("Reshape", [e, f"{_K}one"], [f"{e}_1d"], name=f"{e}_1d") for e in ends),
                make("Concat", [f"{e}_1d" for e in ends], [out], axis=0, name=out),
            ]
        )
        graph.output.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, ["n"]))


def _subgraph(node: onnx.NodeProto, attr: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == attr)


def _scalar_info(name: str) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [])


def _constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return onnx.helper.make_node(
        "Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(array), name), name=name
    )


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
    augmented, names, inner = _augment(model, names, collector.reductions, sample_per_tensor)
    exact = frozenset(exact) | inner  # only the extremes come out of a subgraph
    if not names:  # each was after an op onnxruntime cannot run, or in a subgraph nothing can be read from
        return {}, hashlib.sha256(f"{method}|[]".encode()).hexdigest()[:16]
    job = _ShardJob(
        augmented.SerializeToString(),
        tuple(input_specs(model)),
        tuple(names),
        method,
        dict(collector_settings),
        batch_size,
        onnxq_ir.external_data_dir(model),
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
        with progress(show_progress, f"calibrating ({method})", num_samples) as advance:
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
    external_data_dir: str | None = None  # where the weights that the bytes refer to are

    def run(self, data, shard: int, shards: int, collector=None, advance=lambda _n: None):  # type: ignore[no-untyped-def]
        from onnxq.ort_session import session as open_session

        threads = max(1, (os.cpu_count() or 1) // shards) if shards > 1 else 0
        session = open_session(self.model, threads=threads, external_data_dir=self.external_data_dir)
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
                reduced = {r: next(it) for r in collector.reductions}
                if not _computed(reduced):
                    continue  # a branch not taken, a loop that ran zero times: nothing to learn
                collector.update(name, reduced)
            count = sample_count(feeds, self.specs)
            if samples < 4:
                for value in feeds.values():
                    digest.update(np.ascontiguousarray(value).tobytes()[:4096])
            samples += count
            advance(count)
        return collector, samples, f"{shard}:{digest.hexdigest()}"


def _computed(reduced: dict[str, np.ndarray]) -> bool:
    """False when min > max: the tensor was empty or never computed in this batch."""
    if "min" not in reduced or "max" not in reduced:
        return True
    return bool(np.min(reduced["min"]) <= np.max(reduced["max"]))


def _run_shard(job: _ShardJob, data, shard: int, shards: int):  # type: ignore[no-untyped-def]
    return job.run(data, shard, shards)


def make_collector(method: str, settings: dict[str, object]):  # type: ignore[no-untyped-def]
    """A collector for `method`, given the settings it declares (others are ignored)."""
    import dataclasses

    cls = COLLECTORS[method]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in settings.items() if k in fields and v is not None})
