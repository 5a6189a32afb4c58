"""Model I/O through onnx-ir: loading with lazy external data, saving atomically with a valid IR version.

onnx 1.23 stamps IR version 14, which onnxruntime 1.31 refuses, so every save goes through `save`, which
writes the lowest IR version the model's opsets allow. Outputs are written to a temporary file beside the
target and renamed, so a failure never leaves a half-written model, and the input is never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import UsageError

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
        model = ir.load(path)
    except Exception as exc:  # protobuf raises a zoo of types for garbage input
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"'{path}' is not a readable ONNX model ({reason[:120]})",
            "pass an .onnx file exported by torch.onnx, tf2onnx or similar; a truncated download also ends here",
        ) from None
    return model


def _check_structure(path: Path) -> None:
    """onnx.checker on the file (it streams models over 2 GB): a graph that reads a value nothing
    produces, or nodes out of order, must be a clear error here, not a crash three passes later."""
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


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def model_bytes(model: ir.Model) -> bytes:
    """In-memory bytes for an onnxruntime session: no temp files for models under 2 GB."""
    return to_proto(model).SerializeToString()


def save(model: ir.Model, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write `model` to `path` atomically; refuse to overwrite `source` (the input model)."""
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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{path.name}.data"
    try:
        if _total_weight_bytes(model) >= TWO_GB:
            # External data: written under a temp name, renamed with the model, referenced by final name.
            tmp_data = folder / f".{data_name}.tmp"
            ir.save(model, tmp, external_data=tmp_data.name)
            _retarget_external_data(tmp, tmp_data.name, data_name)
            os.replace(tmp_data, folder / data_name)
        else:
            ir.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def _total_weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _retarget_external_data(model_path: Path, old: str, new: str) -> None:
    proto = onnx.load(model_path, load_external_data=False)
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, model_path)


def model_fingerprint(model: ir.Model) -> str:
    """Fingerprint of the graph structure and weights as they are now (stats are only valid for this)."""
    return hashlib.sha256(to_proto(model).SerializeToString(deterministic=True)).hexdigest()[:16]
