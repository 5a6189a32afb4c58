"""The instrumented session: onnxruntime computes the statistics on an augmented clone of the model.

For every requested tensor the clone gets in-graph ReduceMin/ReduceMax outputs, so each run ships a
few scalars back to Python instead of whole activations; works for any input shape per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnxq.calibration.collectors import COLLECTORS
from onnxq.calibration.readers import Feeds, input_specs, rebatch

from onnxq import ir as onnxq_ir
from onnxq.errors import UsageError
from onnxq.pass_base import TensorRange

SUFFIX = "__onnxq_"


def augmented_model(model: ir.Model, names: list[str], reductions: tuple[str, ...]) -> onnx.ModelProto:
    """A protobuf clone of `model` with `<name>__onnxq_<reduction>` scalar outputs for each tensor."""
    proto = onnxq_ir.to_proto(model)
    elem_types = _elem_types(proto)
    graph = proto.graph
    for name in names:
        for reduction in reductions:
            out = f"{name}{SUFFIX}{reduction}"
            op = {"min": "ReduceMin", "max": "ReduceMax"}[reduction]
            graph.node.append(onnx.helper.make_node(op, [name], [out], keepdims=0, name=out))
            graph.output.append(onnx.helper.make_tensor_value_info(out, elem_types.get(name, 1), []))
    return proto


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
    show_progress: bool = False,
    **_: object,
) -> tuple[dict[str, TensorRange], str]:
    """Ranges of `names` over the data, and a fingerprint of (tensors, method, data) for caches."""
    collector = COLLECTORS[method]()
    specs = input_specs(model)
    session = make_session(augmented_model(model, names, collector.reductions))
    wanted = [f"{n}{SUFFIX}{r}" for n in names for r in collector.reductions]
    feed_names = {s.name for s in specs}
    digest = hashlib.sha256(f"{method}|{sorted(names)}".encode())
    samples = 0
    with _progress(show_progress, "calibrating", num_samples) as advance:
        for batch in rebatch(data(), specs, batch_size):
            feeds = {k: v for k, v in batch.items() if k in feed_names}
            try:
                outputs = session.run(wanted, feeds)
            except Exception as exc:
                raise UsageError(
                    f"onnxruntime failed on a calibration batch ({str(exc).splitlines()[0][:200]})",
                    "check that the data matches the model's inputs (shapes, layout, dtype)",
                ) from None
            it = iter(outputs)
            for name in names:
                collector.update(name, {r: next(it) for r in collector.reductions})
            count = next(iter(feeds.values())).shape[0] if feeds else 1
            samples += count
            if samples <= 4 * batch_size:
                for value in feeds.values():
                    digest.update(np.ascontiguousarray(value).tobytes()[:4096])
            advance(count)
    if samples == 0:
        raise UsageError("the calibration data produced no batch", "check the data and the model's batch size")
    digest.update(str(samples).encode())
    return collector.result(), digest.hexdigest()[:16]


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
