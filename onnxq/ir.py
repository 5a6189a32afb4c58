"""Model I/O through onnx-ir: loading with lazy external data, saving atomically with a valid IR version.

onnx 1.23 stamps IR version 14, which onnxruntime 1.31 refuses, so every save goes through `save`, which
writes the lowest IR version the model's opsets allow. Outputs are written to a temporary folder beside the
target and renamed, so a failure never leaves a half-written model, and the input is never written.

Models over 2 GB keep their weights in external data files: `load` maps them lazily, passes read one weight
at a time, and `save` copies the ones left in float tensor by tensor into the output's own data file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import OnnxqError, UsageError

TWO_GB = 2**31


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model; weights in external data stay memory-mapped until used."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"model file '{path}' does not exist", "check the path")
    if not path.is_file():
        raise UsageError(f"'{path}' is not a file", "pass the path of a .onnx file")
    _check_structure(path)
    try:
        model = ir.load(path.resolve())  # absolute: external weights resolve the same from any folder
    except Exception as exc:  # protobuf raises a zoo of types for garbage input
        causes = _causes(exc)
        if any("Map types are not supported" in str(c) for c in causes):
            raise UsageError(
                f"'{path}' has map-typed values (scikit-learn's ZipMap output, for one), which onnxq cannot read",
                "export without them (skl2onnx: options={id(model): {'zipmap': False}})",
            ) from None
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"'{path}' is not a readable ONNX model ({reason[:120]})",
            "pass an .onnx file exported by torch.onnx, tf2onnx or similar; a truncated download also ends here",
        ) from None
    return model


def _causes(exc: BaseException) -> list[BaseException]:
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in found:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def _check_structure(path: Path) -> None:
    """onnx.checker on the file: a graph that reads a value nothing produces, or nodes out of order, must be
    a clear error here, not a crash three passes later. Given a path, the checker parses the .onnx alone
    and only checks that external data files exist: it reads no external weight (8 MB on a 2.2 GiB model)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        if "Unable to parse" in str(exc) or "parse" in str(exc).split(":")[0].lower():
            return  # not protobuf at all: the loader says so in the user's terms
        reason = " ".join(str(exc).split())
        if "does not have an ir_version" in reason:  # random bytes can parse as an empty ModelProto
            raise UsageError(
                f"'{path}' is not a readable ONNX model (no IR version, no graph)",
                "pass an .onnx file exported by torch.onnx, tf2onnx or similar; a truncated download also ends here",
            ) from None
        if "is not a registered" in reason or "No Op registered" in reason or "IR version" in reason:
            return  # unknown ops and new IR stamps are handled later (kept in float, IR fixed)
        if "should be stored in" in reason:
            raise UsageError(
                f"'{path.name}' keeps weights in an external data file that is missing: {reason[:200]}",
                "copy the model's .data file(s) into the same folder as the .onnx file",
            ) from None
        raise UsageError(
            f"'{path.name}' fails onnx.checker: {reason[:200]}",
            "re-export the model, or repair it (e.g. with onnx-graphsurgeon) so every input is produced",
        ) from None


def is_constant(value: ir.Value | None) -> bool:
    """Whether the value is known before run time: an initializer (not a graph input) or a Constant output."""
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and "value" in producer.attributes


def min_ir_version(model: ir.Model) -> int:
    """Lowest IR version that can express the model's opsets (what onnxruntime wants to see)."""
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    needed = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return max(3, needed)


def fix_ir_version(model: ir.Model) -> None:
    """Set the IR version the opsets need; also rescues models stamped with a too-new version."""
    model.ir_version = min_ir_version(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize for the protobuf edges (onnxsim, checker, onnxruntime); IR version fixed on the copy."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = min_ir_version(model)
    return proto


def proto_with_weights(model: ir.Model, purpose: str) -> onnx.ModelProto:
    """`to_proto` with external weights read into the proto, for protobuf tools (onnxsim, the version
    converter) that would resolve the data files against the current folder, or compare tensors by their
    file references (onnxsim then merges different weights of one shape). The model itself is not changed.
    Raises OnnxqError when the weights cannot fit one protobuf (2 GB)."""
    proto = to_proto(model)
    folder = external_data_dir(model)
    if folder is None:
        return proto
    if total_weight_bytes(model) >= TWO_GB:
        raise OnnxqError(
            f"{purpose} needs the model in one protobuf, and its weights exceed 2 GB",
            "leave that step out of the recipe for this model",
        )
    onnx.external_data_helper.load_external_data_for_model(proto, folder)
    return proto


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def model_bytes(model: ir.Model) -> bytes:
    """In-memory bytes for an onnxruntime session: no temp files for models under 2 GB."""
    return to_proto(model).SerializeToString()


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write `model` to `path` atomically; refuse to overwrite `source` (the input model).

    Weights go to `<path>.data` beside it when they reach 2 GB (protobuf's limit), when some still live in
    an external data file (the input's: copied tensor by tensor, never loaded, so the output does not
    depend on the input's files), or in shards of at most `max_shard_bytes` (`<stem>-00001-of-0000N.<ext>`;
    shards of an earlier save with another count are left alone). The proto is then written without
    weights, so saving never builds a proto the size of the model. Everything is written into a temporary
    folder beside `path` and renamed into place, data files first."""
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise UsageError(
            f"output path '{path}' is the input model", "choose another output with -o, the input is never modified"
        )
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"output folder '{folder}' does not exist", "create it first or choose another -o path")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output folder '{folder}' is not writable", "choose another -o path")
    fix_ir_version(model)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        if max_shard_bytes is not None or total_weight_bytes(model) >= TWO_GB or _external_tensors(model):
            ir.save(model, staging / path.name, external_data=f"{path.name}.data", max_shard_size_bytes=max_shard_bytes)
        else:
            ir.save(model, staging / path.name)
        written = sorted(p.name for p in staging.iterdir() if p.name != path.name)
        release_replaced(model, {(folder / name).resolve() for name in written})
        for name in written:
            os.replace(staging / name, folder / name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def release_replaced(model: ir.Model, replaced: set[Path]) -> None:
    """Tensors mapped from a file that is about to change under them fail from now on, never misread."""
    for tensor in _external_tensors(model):
        if Path(tensor.path).resolve() in replaced:
            tensor.release()
            tensor.invalidate()


def total_weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for g in model.graphs() for v in g.initializers.values() if v.const_value is not None
    )


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a model on disk: the .onnx file and every external data file it refers to (read without
    loading the weights)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    graphs = [proto.graph]
    locations: set[str] = set()
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
        for node in graph.node:
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.HasField("g") else attribute.graphs)
    data = [path.parent / location for location in locations]
    return path.stat().st_size + sum(file.stat().st_size for file in data if file.is_file())


def external_weight_bytes(model: ir.Model) -> int:
    """Bytes of the weights still in external data files (not read by this count)."""
    return sum(t.nbytes for t in _external_tensors(model))


def external_data_dir(model: ir.Model) -> str | None:
    """The folder the model's external weights are relative to (None when all are inline): a session on the
    serialized bytes needs it to find them."""
    return next((str(t.base_dir) for t in _external_tensors(model) if t.base_dir), None)


def _external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    return [
        v.const_value
        for g in model.graphs()
        for v in g.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    ]


def model_fingerprint(model: ir.Model) -> str:
    """Fingerprint of the graph structure and weights as they are now (stats are only valid for this).

    Streamed: nodes, inputs and outputs are hashed one by one, then each weight on its own; a weight still
    in an external data file by reference (file, offset, length, and the file's size and modification
    time), without reading it. Serializing the whole model would need its size in memory, and fails over
    2 GB. Weights of subgraphs are hashed with their node."""
    digest = hashlib.sha256(repr((model.ir_version, sorted(model.opset_imports.items()))).encode())
    graph = model.graph
    for value in (*graph.inputs, *graph.outputs):
        digest.update(ir.serde.serialize_value(value).SerializeToString(deterministic=True))
    for node in graph:
        digest.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    for function in model.functions.values():
        digest.update(ir.serde.serialize_function(function).SerializeToString(deterministic=True))
    for name, value in graph.initializers.items():
        tensor = value.const_value
        digest.update(f"{name}\0{value.is_graph_input()}".encode())
        if isinstance(tensor, ir.ExternalTensor):
            stat = Path(tensor.path).stat()
            digest.update(f"{tensor.path}:{tensor.offset}:{tensor.length}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        elif tensor is not None:
            digest.update(f"{tensor.dtype}{tensor.shape}".encode())
            digest.update(tensor.tobytes())
    return digest.hexdigest()[:16]
