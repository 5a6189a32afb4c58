"""run(model, recipe): the one entry point behind the CLI and the Python API.

It loads the model, resolves the recipe into pass instances sharing one PassContext, checks the declared
order, runs the passes (calibration happens inside the first pass that asks for statistics), writes the
output atomically, and validates it against the untouched input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxq import ir as onnxq_ir
from onnxq import registry
from onnxq.calibration.readers import DataSource, input_specs, open_data, rebatch
from onnxq.errors import GateFailure, RecipeError, UsageError
from onnxq.html_report import write_html
from onnxq.ort_session import MissingKernel
from onnxq.outputs import check_output_path, staged
from onnxq.pass_base import Pass, PassContext
from onnxq.qspec import COMPUTE_OPS, SHARED_SCALE_OPS, NodeQuant, get_qspec
from onnxq.recipe import Recipe, load_recipe
from onnxq.report import write_json
from onnxq.validate import ValidationResult, validate_models


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool


@dataclass
class Result:
    model: ir.Model
    output: Path | None
    recipe: Recipe
    passes: list[PassRecord] = field(default_factory=list)
    plan: list[dict[str, Any]] | None = None
    validation: list[ValidationResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report_path: Path | None = None
    sizes: dict[str, int] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    latency: list[dict[str, Any]] = field(default_factory=list)
    realization: list[dict[str, Any]] = field(default_factory=list)
    localization: dict[str, Any] | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # structured pass results (mixed_precision)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.validation)

    def report(self) -> dict[str, Any]:
        return {
            "output": str(self.output) if self.output else None,
            "recipe": self.recipe.dump(),
            "passes": [vars(p) for p in self.passes],
            "calibration_seconds": self.calibration_seconds,
            "notes": self.notes,
            "sizes": self.sizes,
            "ops": dict(Counter(n.op_type for n in self.model.graph)),
            "validation": [v.to_json() for v in self.validation],
            "passed": self.passed,
            "latency": self.latency,
            "realization": self.realization[0] if self.realization else None,
            "localization": self.localization,
            "precision": precision_map(self.model),
            **self.artifacts,
        }


def precision_map(model: ir.Model) -> list[dict[str, str]]:
    """Each node's precision in graph order, from its annotation or its lowered form (for the report)."""
    rows = []
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        spec = get_qspec(node)
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = node.attributes.get_int("bits", 4)
            precision = f"int{bits} weights"
        elif spec is None and _fused_activation(node):
            precision = "fused into its " + node.inputs[0].producer().op_type  # type: ignore[union-attr]
        elif spec is None or spec.skip:
            precision = "fp32"
        elif spec.activations.is_float:
            precision = f"{spec.weights.dtype} weights"
        else:
            precision = spec.activations.dtype
        rows.append({"name": node.name or "", "op_type": node.op_type, "precision": precision})
    return rows


def _fused_activation(node: ir.Node) -> bool:
    """A Relu/Clip between a quantized Conv/Gemm and its output QuantizeLinear: onnxruntime runs it inside the
    integer kernel (QLinearConv clamps to the output range)."""
    if node.op_type not in ("Relu", "Clip") or not node.inputs or node.inputs[0] is None:
        return False
    producer = node.inputs[0].producer()
    if producer is None or producer.op_type not in ("Conv", "Gemm", "MatMul"):
        return False
    spec = get_qspec(producer)
    quantized = spec is not None and not spec.skip and not spec.activations.is_float
    return quantized and any(use.node.op_type == "QuantizeLinear" for use in node.outputs[0].uses())


def build_passes(recipe: Recipe, context: PassContext) -> list[Pass]:
    """Instantiate the recipe's passes and check `after` constraints (never reorder silently)."""
    passes: list[Pass] = []
    for index, (name, cfg) in enumerate(recipe.pass_configs()):
        passes.append(registry.get(name, f"passes[{index}]")(cfg, context))
    position = {p.name: i for i, p in reversed(list(enumerate(passes)))}
    for index, p in enumerate(passes):
        for earlier in p.after:
            if earlier in position and position[earlier] > index:
                raise RecipeError(
                    f"passes[{index}]",
                    f"'{p.name}' must run after '{earlier}', which comes later",
                    f"move '{earlier}' before '{p.name}'",
                )
    return passes


def make_context(
    model: ir.Model,
    recipe: Recipe,
    calib: str | None,
    show_progress: bool,
    stats_path: Path | None = None,
    explicit_stats: bool = False,
) -> PassContext:
    from onnxq.calibration.store import StatsStore, data_fingerprint

    cal = recipe.calibration
    source = calib or cal.data
    data = None
    fingerprint = None
    if source is not None:
        data = open_data(source, input_specs(model), cal.num_samples, cal.seed, preprocess=cal.preprocess)
        fingerprint = data_fingerprint(source, cal.num_samples, cal.seed)
    return PassContext(
        defaults=NodeQuant(activations=recipe.defaults.activations, weights=recipe.defaults.weights),
        calibration_data=data,
        calibration_settings={
            **cal.model_dump(exclude={"data", "seed", "preprocess"}),
            "dtype": recipe.defaults.activations.dtype,
            "symmetric": recipe.defaults.activations.symmetric,
        },
        stats_store=StatsStore(stats_path, explicit=explicit_stats, deferred=True) if stats_path else None,
        data_fingerprint=fingerprint,
        show_progress=show_progress,
    )


def run(
    model: str | Path | ir.Model,
    recipe: str | Path | dict[str, Any] | Recipe = "int8",
    *,
    output: str | Path | None = None,
    calib: str | None = None,
    data: str | None = None,
    overrides: list[str] | None = None,
    dry_run: bool = False,
    validate: bool | None = None,
    stats: str | Path | None = None,
    show_progress: bool = False,
    search: dict[str, Any] | None = None,
) -> Result:
    """Quantize `model` with `recipe`. A path input is never written; the output defaults to
    `<input>.q.onnx` beside it (an in-memory model needs `output`), with its calibration statistics in
    `<output>.calib.json` (reused by the next run on the same model, settings and data); `stats` names that
    file explicitly. Every input is checked before any work; the model, its report and its statistics are
    written together at the end, or not at all. Raises GateFailure (after writing) when validation gates
    fail. `search`: what a search above recipes found ({"notes": [...], "artifacts": {...}}), carried into the
    result and its report."""
    if isinstance(recipe, str) and recipe == "auto":
        return _auto(model, output, calib, data, overrides or [], dry_run, validate, show_progress)
    resolved = load_recipe(recipe, overrides)
    source_path = None if isinstance(model, ir.Model) else Path(model)
    working = model if isinstance(model, ir.Model) else onnxq_ir.load(model)
    float_reference: bytes | Path = source_path if source_path else onnxq_ir.model_bytes(working)
    out_path = _output_path(source_path, output or resolved.output.path, dry_run)
    if out_path is not None:
        check_output_path(out_path, source_path)
    stats_path = Path(stats) if stats else (out_path.with_name(out_path.name + ".calib.json") if out_path else None)
    context = make_context(working, resolved, calib, show_progress, stats_path, explicit_stats=stats is not None)
    do_validate = not dry_run and (resolved.validate_.enabled if validate is None else validate)
    evaluation = _evaluation_data(resolved, working, data or calib) if do_validate else None
    calibration = context.calibration_data
    _check_first_batch(calibration)
    if evaluation is not None and (calibration is None or evaluation.source != calibration.source):
        _check_first_batch(evaluation)  # when it is the calibration data, that was just read
    if context.calibration_data is not None or evaluation is not None:
        check_loads(float_reference, working)
    if search:
        context.notes.extend(search.get("notes", []))
        context.artifacts.update(search.get("artifacts", {}))
    result = Result(working, None, resolved, notes=context.notes, artifacts=context.artifacts)
    quantized_before = _quantized_ops(working)
    pre_lowering: bytes | None = None  # the float graph the quantized one was lowered from (localization)
    for pass_ in build_passes(resolved, context):
        if dry_run and (pass_.lowers or pass_.needs):
            break
        if pass_.lowers and pre_lowering is None and resolved.validate_.localize != "never":
            pre_lowering = onnxq_ir.model_bytes(working)
        pass_.requires(working)
        started = time.perf_counter()
        with _status(show_progress, f"{pass_.name}…"):
            outcome = pass_(working)
        result.passes.append(PassRecord(pass_.name, time.perf_counter() - started, outcome.modified))
        context.invalidate(pass_.invalidates)
    result.calibration_seconds = context.timings.get("calibration", 0.0)
    if dry_run:
        result.plan = plan_of(working)
        return result
    if _quantized_ops(working) <= quantized_before:
        context.notes.insert(0, _nothing_quantized(working, resolved.name))
    working.metadata_props["onnxq.recipe"] = json.dumps(resolved.dump(), sort_keys=True)
    if context.stats_fingerprint:
        working.metadata_props["onnxq.stats_fingerprint"] = context.stats_fingerprint
    assert out_path is not None
    folder = out_path.parent if str(out_path.parent) else Path(".")
    with staged(folder) as stage:
        quant_path = onnxq_ir.save(working, stage.path(out_path), max_shard_bytes=resolved.output.max_shard_bytes)
        result.output = out_path
        result.sizes = {"output_bytes": onnxq_ir.file_bytes(quant_path)}  # with their .data files
        if source_path is not None:
            result.sizes["input_bytes"] = onnxq_ir.file_bytes(source_path)
        if evaluation is not None:
            result.validation = _validate(resolved, float_reference, quant_path, evaluation, show_progress)
            _diagnose(result, resolved, float_reference, pre_lowering, quant_path, evaluation, show_progress)
        reports = [out_path.with_name(out_path.name + suffix) for suffix in (".report.html", ".report.json")]
        stage.stale = reports
        if resolved.output.report:
            report = result.report()
            write_html(report, stage.path(reports[0]))
            write_json(report, stage.path(reports[1]))
            result.report_path = reports[1]
        if context.stats_store is not None:
            stage.late_writes.append(context.stats_store.commit)
        stage.commit(out_path, before_replace=lambda paths: onnxq_ir.release_replaced(working, paths))
    if not result.passed:
        failed = [g for v in result.validation for g in v.gates if not g.passed]
        failure = GateFailure(
            f"validation gate {failed[0].gate} failed: {failed[0].value:.4g} vs threshold {failed[0].threshold:g} "
            f"(model written to {out_path})",
            "inspect the report, keep sensitive nodes in float with a skip rule, or relax the gate",
        )
        failure.result = result
        raise failure
    return result


def _auto(  # type: ignore[no-untyped-def]
    model, output, calib: str | None, data: str | None, overrides: list[str], dry_run: bool, validate, show_progress
) -> Result:
    """`recipe='auto'`: the search above recipes (onnxq/auto.py), checked like any run before it starts."""
    from onnxq import auto

    if isinstance(model, ir.Model):
        raise UsageError("auto quantizes a model file", "save the model and pass its path")
    if dry_run:
        raise UsageError("auto has no dry run: its plan is what the candidates measure", "drop --dry-run")
    if calib is None:
        raise UsageError(
            "auto needs calibration data (a quarter is held out to score the candidates)", "pass --calib DATA"
        )
    source = Path(model)
    onnxq_ir.load(source)  # a bad model is a one-line error before any candidate runs
    out = _output_path(source, output, False)
    assert out is not None
    check_output_path(out, source)
    metric = next((o.split("=", 1)[1] for o in overrides if o.startswith("validate.metric=")), None)
    return auto.run(
        source,
        output=out,
        calib=calib,
        data=data,
        overrides=overrides,
        validate=validate,
        show_progress=show_progress,
        metric=metric,
    )


def _nothing_quantized(model: ir.Model, recipe: str) -> str:
    compute = Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type in COMPUTE_OPS)
    found = ", ".join(f"{op}×{k}" for op, k in sorted(compute.items())) or "no Conv/MatMul/Gemm"
    return (
        f"nothing was quantized by recipe '{recipe}' (this model has {found}); "
        + (
            "MatMul/Gemm-only recipes leave Convs alone: try --recipe int8; "
            if compute and not compute.keys() & {"MatMul", "Gemm"}
            else ""
        )
        + "`onnxq run MODEL --dry-run` shows what each node was given"
    )


def _evaluation_data(recipe: Recipe, model: ir.Model, data: str | None) -> DataSource | None:
    """The validation data, opened (and so checked) before any work; None when there is none."""
    cfg = recipe.validate_
    source = cfg.data or data or recipe.calibration.data
    if source is None:
        return None
    return open_data(
        source,
        input_specs(model),
        cfg.num_samples,
        recipe.calibration.seed,
        extras=(cfg.labels,),
        purpose="evaluation data",
    )


def _check_first_batch(data: DataSource | None) -> None:
    """Read the first batch now: names, ranks, shapes, dtypes and NaNs are checked before any work."""
    if data is not None:
        next(iter(data()), None)


PREFLIGHT_MAX_BYTES = 2**30  # a bigger model is not loaded twice; its load errors come from calibration


def check_loads(model: bytes | Path, loaded: ir.Model) -> None:
    """onnxruntime can load the float model: a model it refuses is the user's input (exit 2, naming the node
    and onnxruntime's reason), not an error inside calibration. A missing custom kernel is let through: run
    calibrates around such ops and skips validation."""
    if onnxq_ir.total_weight_bytes(loaded) > PREFLIGHT_MAX_BYTES:
        return
    import onnxruntime as ort

    from onnxq.ort_session import session

    try:
        folder = onnxq_ir.external_data_dir(loaded)
        session(model, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, external_data_dir=folder)
    except MissingKernel:
        return
    except Exception as exc:
        reason = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc).splitlines()[0] if str(exc) else "")
        reason = re.sub(r"^Load model from .*? failed:", "", reason).strip()
        raise UsageError(
            f"onnxruntime cannot load the float model: {reason[:300]}",
            "fix the model (re-export it, or check it with onnx.checker) before quantizing",
        ) from None


QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits"}
    | {"MatMulInteger", "ConvInteger", "QGemm"}
)


def _quantized_ops(model: ir.Model) -> int:
    """Nodes that hold quantized or half-precision data: Q/DQ, integer and n-bit kernels, inner fp16 Casts."""

    def quantized(node: ir.Node) -> bool:
        if node.op_type in QUANTIZED_OPS or node.op_type.startswith("QLinear"):
            return True
        to_half = node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT16
        return to_half and not any(v.is_graph_output() for v in node.outputs)

    return sum(quantized(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))


def _status(enabled: bool, text: str) -> contextlib.AbstractContextManager[object]:
    """A spinner on stderr while a pass runs (calibration draws its own progress bar inside); none in a log."""
    if not enabled or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def _output_path(source: Path | None, output: str | Path | None, dry_run: bool) -> Path | None:
    if output is not None:
        return Path(output)
    if dry_run:
        return None
    if source is None:
        raise UsageError("an in-memory model has no default output path", "pass output='model.q.onnx'")
    return source.with_name(source.name.removesuffix(".onnx") + ".q.onnx")


def _validate(
    recipe: Recipe, float_model: bytes | Path, quant_path: Path, data: DataSource, show_progress: bool = False
) -> list[ValidationResult]:
    cfg = recipe.validate_
    try:
        return validate_models(
            float_model,
            quant_path,
            data,
            list(data.specs),
            providers=list(cfg.providers),
            labels=cfg.labels,
            batch_size=cfg.batch_size,
            gates=cfg.gates,
            slice_axis=cfg.slice_axis,
            metric=cfg.metric,
            show_progress=show_progress,
        )
    except MissingKernel as missing:  # the model is written and may run where that kernel exists
        why = f"skipped: onnxruntime has no kernel for {missing.op} (pass --custom-ops LIB to validate)"
        return [ValidationResult("cpu", 0, [], skipped=why)]


def _diagnose(  # type: ignore[no-untyped-def]
    result: Result,
    recipe: Recipe,
    float_model,
    pre_lowering: bytes | None,
    quant_path: Path,
    data: DataSource,
    show_progress: bool = False,
) -> None:
    found = diagnose(
        result.validation,
        recipe.validate_,
        float_model,
        pre_lowering,
        quant_path,
        data,
        list(data.specs),
        show_progress,
    )
    result.latency, result.realization, result.localization = (
        found["latency"],
        found["realization"],
        found["localization"],
    )


def diagnose(  # type: ignore[no-untyped-def]
    validation: list[ValidationResult],
    cfg,
    float_model,
    reference,
    quant_path: Path,
    reader,
    specs,
    show_progress=False,
) -> dict[str, Any]:
    """What a report adds to the metrics: latency, how the provider realizes the quantized graph, and,
    when a gate failed (or always, if asked), which nodes lost the accuracy and what keeping the worst
    of them in float recovers. `reference` is the float graph the quantized one was lowered from (its
    tensor names match best), or None for `float_model`."""
    import onnx

    from onnxq import localize as loc
    from onnxq.validate import latency

    found: dict[str, Any] = {"latency": [], "realization": [], "localization": None}
    judged = [v for v in validation if v.skipped is None]
    if not judged:
        return found
    if cfg.latency:
        first = next(iter(rebatch(reader(), specs, cfg.batch_size)))
        feeds = {s.name: first[s.name] for s in specs}
        found["latency"] = [latency(float_model, quant_path, feeds, v.provider, cfg.threads) for v in judged]
    found["realization"] = [loc.realization(quant_path, v.provider).to_json() for v in judged]
    if cfg.localize == "never" or (cfg.localize == "auto" and all(v.passed for v in judged)):
        return found
    if isinstance(reader, DataSource):  # a ranking needs few samples; each costs two fully exposed runs
        limit = min(cfg.localize_samples, reader.num_samples or cfg.localize_samples)
        reader = dataclasses.replace(reader, num_samples=limit)
    source = reference if reference is not None else float_model
    reference_proto = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    # the pre-lowering snapshot keeps external weights by reference, relative to the input model's folder
    folder = Path(float_model).parent if isinstance(source, bytes) and isinstance(float_model, Path) else None
    located = loc.localize(
        reference_proto,
        quant_path,
        reader,
        specs,
        slice_axis=cfg.slice_axis,
        reference_dir=folder,
        show_progress=show_progress,
    )
    culprits = located.top(cfg.whatif_top) if cfg.whatif_top else []
    kept, unchanged = loc.keep_float(onnx.load(str(quant_path)), culprits) if culprits else (None, culprits)
    if kept is not None and len(unchanged) < len(culprits):
        (after,) = validate_models(
            float_model,
            kept.SerializeToString(),
            reader,
            specs,
            labels=cfg.labels,
            batch_size=cfg.batch_size,
            gates=cfg.gates,
            slice_axis=cfg.slice_axis,
            show_progress=show_progress,
        )
        (before_run,) = validate_models(  # the same samples as the what-if, so the two numbers compare
            float_model, quant_path, reader, specs, batch_size=cfg.batch_size, gates=cfg.gates,
            slice_axis=cfg.slice_axis,
        )  # fmt: skip
        before, after_db = _worst_slice(before_run), _worst_slice(after)
        located.whatif = {
            "kept_float": [n for n in culprits if n not in unchanged],
            "metric": "worst output slice SQNR (dB)",
            "before": before,
            "after": after_db,
            "gates_pass_after": after.passed,
            "helped": bool(after_db > before + 0.5),
            "advice": None
            if after_db > before + 0.5
            else "the error is spread over many nodes (each adds a little, each rounding feeds the next), so "
            "no few nodes in float recover it: try calibration.method=percentile, or --recipe mixed",
        }
    found["localization"] = located.to_json()
    return found


def _worst_slice(result: ValidationResult) -> float:
    values = [o.slices.worst_sqnr_db if o.slices is not None else o.sqnr_db for o in result.outputs]
    return min(values, default=float("nan"))


def plan_of(model: ir.Model) -> list[dict[str, Any]]:
    """Per-node precision plan from the annotations (what `--dry-run` prints)."""
    rows = []
    for node in model.graph:
        spec = get_qspec(node)
        if spec is None:
            continue
        follows = node.op_type in SHARED_SCALE_OPS and not spec.skip
        rows.append(
            {
                "node": node.name,
                "op": node.op_type,
                "skip": spec.skip,
                "follows_input": follows,  # data movement: quantized only where its input is
                "activations": "float"
                if spec.skip
                else "as its input"
                if follows
                else f"{spec.activations.dtype}/{spec.activations.granularity}",
                "weights": "float"
                if spec.skip
                else "-"
                if follows
                else f"{spec.weights.dtype}/{spec.weights.granularity}",
            }
        )
    return rows
