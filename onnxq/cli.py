"""The `onnxq` command line. Every failure a user can fix prints one line and exits 2 (3: gates failed)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxq.errors import OnnxqError


class _Command(typer.core.TyperCommand):
    """Help that reads like a command line: flags without a `<bool>` type, arguments as MODEL, not {model}."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False):
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
            elif param.metavar:
                param.display_type_rich = lambda ctx, p=param: p.metavar  # type: ignore[method-assign]
            if isinstance(param, typer.core.TyperArgument):
                param.get_usage_pieces = lambda ctx, p=param: [  # type: ignore[method-assign]
                    (p.metavar or p.name or "").upper() if p.required else f"[{(p.metavar or p.name or '').upper()}]"
                ]
        return params


class _Group(typer.core.TyperGroup):
    command_class = _Command


def _recipe_help() -> str:
    from onnxq.recipes import descriptions

    listed = "; ".join(f"{name}: {text}" for name, text in descriptions().items())
    return f"a built-in recipe or a YAML file. Built-in ({len(descriptions())}): {listed}"


app = typer.Typer(
    cls=_Group,
    name="onnxq",
    help="Quantize ONNX models with recipes of graph passes, calibrated and validated on onnxruntime.\n\n"
    "Start with:  onnxq run model.onnx --recipe int8 --calib calib.npz",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def interrupted_line() -> str:
    """What Ctrl-C leaves behind, exactly: nothing, or the files the run had already put in place."""
    outputs = sys.modules.get("onnxq.outputs")
    written = list(getattr(outputs, "committed", []))
    if not written:
        return "interrupted; no output was written"
    return "interrupted after writing " + ", ".join(str(p) for p in written)


HEAVY_COMMANDS = frozenset({"run", "validate", "inspect"})


def _load_heavy_modules() -> None:
    """Import onnx, onnx-ir, numpy and onnxruntime with Ctrl-C deferred: an interrupt inside a C extension's
    module init could crash the interpreter (seen: SIGSEGV) instead of printing one line."""
    from onnxq.outputs import deferred_interrupts

    with deferred_interrupts():
        import onnxruntime  # noqa: F401

        import onnxq.runner  # noqa: F401


def _guard(fn):  # type: ignore[no-untyped-def]
    """Turn known errors into one line and an exit code; unexpected ones into one line plus a hint."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if fn.__name__ in HEAVY_COMMANDS:
                _load_heavy_modules()
            return fn(*args, **kwargs)
        except OnnxqError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print(interrupted_line(), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except typer.Exit:
            raise
        except Exception as exc:
            if os.environ.get("ONNXQ_DEBUG"):
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            err.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {first[:300]} "
                "(a bug in onnxq: rerun with ONNXQ_DEBUG=1 for the traceback and report it)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


@app.command(cls=_Command)
@_guard
def run(
    model: Annotated[
        Path | None, typer.Argument(metavar="MODEL", help="the float .onnx model (never modified)", show_default=False)
    ] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", metavar="NAME|FILE", help=_recipe_help())] = "int8",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="output model (default: MODEL.q.onnx beside the input)"),
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            metavar="DATA",
            help="calibration data: .npz of arrays keyed by input name (samples on the batch axis, or whole feeds "
            "stacked on a new axis 0), a folder of them, a folder of images (with calibration.preprocess), "
            "module:function or file.py:function yielding feed dicts, or 'synthetic' for a smoke run",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            metavar="DATA",
            help="evaluation data for validation, in the forms --calib takes (default: the calibration data); "
            "a 'label' array adds accuracy",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="override a recipe key (repeatable): calibration.num_samples=64, passes.upgrade_opset.target=17",
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="calibration statistics to reuse (a .calib.json of an earlier run; by default OUTPUT.calib.json "
            "is written and reused when model, settings and data match)",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(metavar="N", help="calibrate in N processes (same result, merged exactly)", min=1)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the per-node plan; write nothing")] = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="skip validation against the float model")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or tables")] = False,
    custom_ops: Annotated[
        list[Path] | None,
        typer.Option(
            "--custom-ops", metavar="LIB", help="onnxruntime kernel library for the model's custom ops (repeatable)"
        ),
    ] = None,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo", help="quantize the bundled digits CNN with its own data, writing ./digits_cnn.q.onnx (no MODEL)"
        ),
    ] = False,
) -> None:
    """Quantize MODEL with a recipe, validate it against the float model, and write MODEL.q.onnx.

    Examples:

      onnxq run model.onnx --calib calib.npz                  (static int8, min-max)

      onnxq run model.onnx --calib calib.npz --set calibration.method=percentile --workers 2

      onnxq run model.onnx --recipe int8-dynamic              (MatMul/Gemm, no data needed)

      onnxq run model.onnx --dry-run                          (the per-node plan)

      onnxq run --demo                                        (the bundled digits CNN, its own data)

    Exit codes: 0 ok, 2 bad input (model, recipe, data), 3 validation gates failed (output still written).
    """
    from onnxq.errors import GateFailure, UsageError
    from onnxq.ort_session import use_custom_ops
    from onnxq.runner import run as run_recipe

    use_custom_ops(custom_ops or [])
    model, output, calib, data = _demo_inputs(model, output, calib, data) if demo else (model, output, calib, data)
    if model is None:
        raise UsageError("no MODEL given", "pass the path of a float .onnx model, or --demo for the bundled one")
    show = not quiet  # a bar on a terminal, a line now and then in a log (onnxq/progress.py)
    try:
        result = run_recipe(
            model,
            recipe,
            output=output,
            calib=calib,
            data=data,
            overrides=[*(set_ or []), *([f"calibration.workers={workers}"] if workers else [])],
            stats=stats,
            dry_run=dry_run,
            validate=False if no_validate else None,
            show_progress=show,
        )
    except GateFailure as failure:
        if not quiet and failure.result is not None:
            _print_result(failure.result)
        raise
    if quiet:
        return
    if dry_run:
        _print_plan(result.plan or [])
        for note in result.notes:
            out.print(f"[dim]{escape(note)}[/dim]")
        return
    _print_result(result)


def _demo_inputs(
    model: Path | None, output: Path | None, calib: str | None, data: str | None
) -> tuple[Path, Path, str, str]:
    """The bundled digits CNN and its data; the output goes to the current folder, not into the package."""
    from onnxq import demo as bundled
    from onnxq.errors import UsageError

    if model is not None:
        raise UsageError(f"--demo quantizes the bundled model, and MODEL '{model}' was given too", "drop one of them")
    return (
        bundled.MODEL,
        output or Path("digits_cnn.q.onnx"),
        calib or str(bundled.CALIB),
        data or str(bundled.EVAL),
    )


def _print_result(result: Any) -> None:
    _print_passes(result)
    for validation in result.validation:
        _print_validation(validation)
    _print_diagnosis(result.report())
    report = ""
    if result.report_path:
        html = result.report_path.with_name(result.report_path.name.removesuffix(".json") + ".html")
        report = f", report {html} (and {result.report_path.name})"
    stats = [p for p in getattr(sys.modules.get("onnxq.outputs"), "committed", []) if p.name.endswith(".calib.json")]
    out.print(
        f"wrote [bold]{result.output}[/] ({_size_line(result.sizes)}){report}"
        + (f", statistics {stats[0]}" if stats else "")
    )


def _size_line(sizes: dict[str, int]) -> str:
    if "input_bytes" in sizes:
        return f"{sizes['output_bytes'] / 1e6:.2f} MB, {sizes['output_bytes'] / sizes['input_bytes']:.2f}× the input"
    return f"{sizes.get('output_bytes', 0) / 1e6:.2f} MB"


def _print_passes(result: Any) -> None:
    table = Table(title="passes", title_justify="left")
    for col in ("pass", "seconds", "changed"):
        table.add_column(col)
    for record in result.passes:
        table.add_row(record.name, f"{record.seconds:.2f}", "yes" if record.modified else "no")
    out.print(table)
    for note in result.notes:
        out.print(f"  · {note}")


def _print_validation(v: Any) -> None:
    if v.skipped:
        out.print(f"validation [{v.provider}]: {v.skipped}")
        return
    table = Table(title=f"validation on {v.provider} ({v.samples} samples)", title_justify="left")
    for col in ("output", "SQNR dB", "worst slice", "cosine", "max |err|", "mean |err|", "top-1 agree"):
        table.add_column(col, justify="right" if col != "output" else "left")
    for o in v.outputs:
        agree = "-" if o.top1_agreement is None else f"{o.top1_agreement:.4f}"
        worst = "-" if o.slices is None else f"{o.slices.worst_sqnr_db:.2f} @[{o.slices.axis}={o.slices.worst_index}]"
        table.add_row(
            o.name,
            f"{o.sqnr_db:.2f}",
            worst,
            f"{o.cosine:.5f}",
            f"{o.max_abs_error:.4g}",
            f"{o.mean_abs_error:.4g}",
            agree,
        )
    out.print(table)
    if v.task_metric is not None:
        out.print(f"task metric: {v.task_metric:.4f}")
    if v.accuracy_float is not None:
        out.print(f"label accuracy: float {100 * v.accuracy_float:.2f}%  quantized {100 * v.accuracy_quantized:.2f}%")
    for gate in v.gates:
        mark = "[green]pass[/]" if gate.passed else "[red]FAIL[/]"
        out.print(f"gate {gate.gate}: {gate.value:.4g} (threshold {gate.threshold:g}) {mark}")


def _print_diagnosis(report: dict[str, Any], top: int = 10) -> None:
    """Latency, the realization check and the localization, as `run` and `validate` print them."""
    for row in report.get("latency") or []:
        out.print(
            f"latency ({row['provider']}, {row['threads']} thread(s)): float {row['float_ms']:.3f} ms, "
            f"quantized {row['quantized_ms']:.3f} ms, speedup {row['speedup']:.2f}×"
        )
    slower = [row for row in report.get("latency") or [] if row["speedup"] < 0.95]
    if slower:
        out.print(f"[yellow]slower than float[/]: {_slow_reason(report, slower[0])}")
    realized = report.get("realization")
    if realized:
        kernels = ", ".join(f"{k}×{n}" for k, n in sorted(realized["integer_kernels"].items())) or "none"
        out.print(f"integer kernels ({realized['provider']}): {kernels}")
        for fallback in realized["fallbacks"][:top]:
            out.print(f"  [yellow]runs in float[/]: {fallback['node']} ({fallback['op_type']}): {fallback['reason']}")
    found = report.get("localization")
    if not found:
        return
    table = Table(title="where the error comes from (worst-slice SQNR drop)", title_justify="left")
    for col in ("node", "op", "input dB", "output dB", "drop dB"):
        table.add_column(col, justify="left" if col in ("node", "op") else "right")
    for node in found["nodes"][:top]:
        table.add_row(
            node["name"],
            node["op_type"],
            f"{float(node['input_sqnr_db']):.1f}",
            f"{float(node['sqnr_db']):.1f}",
            f"{float(node['drop_db']):.1f}",
        )
    out.print(table)
    whatif = found.get("whatif")
    if whatif and whatif.get("kept_float"):
        moved = f"{float(whatif['before']):.1f} to {float(whatif['after']):.1f} dB"
        if whatif.get("helped", True):
            out.print(
                f"what-if: keeping {', '.join(whatif['kept_float'])} in float moves the worst output slice from "
                f"{moved}" + (" (gates pass)" if whatif["gates_pass_after"] else "")
            )
        else:
            out.print(
                f"what-if: keeping the {len(whatif['kept_float'])} worst nodes in float does not help (worst output "
                f"slice {moved}): {whatif.get('advice')}"
            )


def _slow_reason(report: dict[str, Any], row: dict[str, Any]) -> str:
    """Why the quantized model runs slower than the float one, and what to try, in one line."""
    realized = report.get("realization") or {}
    fallbacks = realized.get("fallbacks") or []
    if fallbacks:
        return (
            f"{len(fallbacks)} quantized op(s) run on float kernels behind Q/DQ (listed below), paying for the "
            "conversions without the integer math; keep them in float with a skip rule"
        )
    if row["float_ms"] < 1.0:
        return (
            f"the model takes {row['float_ms']:.2f} ms in float: too small for integer kernels to repay the "
            "Quantize/Dequantize steps; quantize for size (--recipe w8-block) or leave it in float"
        )
    if not realized.get("integer_kernels"):
        return "no op runs on an integer kernel; try --recipe int8 (Conv) or int8-dynamic (MatMul)"
    return (
        "the integer kernels do not repay the Q/DQ steps between them at this size; try --recipe int8-dynamic "
        "for MatMul-heavy models, or time it with more threads (validate.threads)"
    )


def _print_plan(plan: list[dict[str, Any]]) -> None:
    table = Table(title="per-node plan (dry run: nothing written)", title_justify="left")
    for col in ("node", "op", "activations", "weights"):
        table.add_column(col)
    for row in plan:
        table.add_row(row["node"], row["op"], row["activations"], row["weights"])
    out.print(table)
    counts = Counter(r["op"] for r in plan if not r["skip"] and not r.get("follows_input"))
    out.print("to quantize: " + (", ".join(f"{k}×{v}" for k, v in sorted(counts.items())) or "nothing"))


@app.command(cls=_Command)
@_guard
def validate(
    float_model: Annotated[Path, typer.Argument(metavar="FLOAT_MODEL", help="the float reference model")],
    quant_model: Annotated[Path, typer.Argument(metavar="QUANT_MODEL", help="the quantized model")],
    data: Annotated[str, typer.Option(help=".npz data (or folder, or module:function) keyed by input name")],
    providers: Annotated[
        str, typer.Option(help="comma-separated: cpu,cuda,tensorrt (missing ones are skipped)")
    ] = "cpu",
    min_sqnr_db: Annotated[float | None, typer.Option(help="gate: every output's SQNR at least this")] = None,
    min_slice_sqnr_db: Annotated[
        float | None, typer.Option(help="gate: every output slice along --slice-axis at least this (default 10)")
    ] = 10.0,
    slice_axis: Annotated[int, typer.Option(help="judge outputs per index along this axis too")] = 1,
    metric: Annotated[
        str | None, typer.Option(help="task metric module:function(float_outputs, quantized_outputs, batch) -> score")
    ] = None,
    min_task_metric: Annotated[float | None, typer.Option(help="gate: the task metric at least this")] = None,
    localize: Annotated[
        str, typer.Option(help="rank nodes by the error they add: auto (when a gate fails), always, never")
    ] = "auto",
    whatif: Annotated[int, typer.Option(help="re-validate with this many top culprits kept in float")] = 5,
    threads: Annotated[int, typer.Option(help="threads for the latency measurement")] = 1,
    report: Annotated[Path | None, typer.Option(help="write the report here (.html, with a .json beside it)")] = None,
    custom_ops: Annotated[
        list[Path] | None,
        typer.Option(
            "--custom-ops", metavar="LIB", help="onnxruntime kernel library for the model's custom ops (repeatable)"
        ),
    ] = None,
) -> None:
    """Compare a quantized model with its float original on the same data: per-output and per-slice metrics,
    latency, which ops run on integer kernels, and (when a gate fails) which nodes lost the accuracy.

    Exit code 3 when a gate fails.  Example:

        onnxq validate model.onnx model.q.onnx --data eval.npz --providers cpu,cuda --report report.html
    """
    from onnxq import ir as onnxq_ir
    from onnxq.calibration.readers import input_specs, open_data
    from onnxq.errors import GateFailure, UsageError, did_you_mean
    from onnxq.ort_session import use_custom_ops
    from onnxq.recipe import Gates, ValidateConfig
    from onnxq.runner import diagnose
    from onnxq.validate import PROVIDERS, validate_models

    use_custom_ops(custom_ops or [])

    names = [p.strip() for p in providers.split(",") if p.strip()]
    for name in names:
        if name not in PROVIDERS:
            raise UsageError(f"unknown provider '{name}'", did_you_mean(name, PROVIDERS))
    if localize not in ("auto", "always", "never"):
        raise UsageError(f"unknown --localize '{localize}'", did_you_mean(localize, ["auto", "always", "never"]))
    model = onnxq_ir.load(float_model)
    onnxq_ir.load(quant_model)
    specs = input_specs(model)
    gates = Gates(min_sqnr_db=min_sqnr_db, min_slice_sqnr_db=min_slice_sqnr_db, min_task_metric=min_task_metric)
    cfg = ValidateConfig(
        providers=names,
        gates=gates,
        slice_axis=slice_axis,
        localize=localize,
        whatif_top=whatif,
        threads=threads,  # type: ignore[arg-type]
    )
    reader = open_data(data, specs, None, extras=("label",))
    results = validate_models(
        float_model, quant_model, reader, specs, providers=names, gates=gates, slice_axis=slice_axis, metric=metric
    )
    for result in results:
        _print_validation(result)
    found = diagnose(results, cfg, float_model, None, quant_model, reader, specs)
    summary = {
        "input": str(float_model),
        "output": str(quant_model),
        "sizes": {"input_bytes": onnxq_ir.file_bytes(float_model), "output_bytes": onnxq_ir.file_bytes(quant_model)},
        "validation": [r.to_json() for r in results],
        "passed": all(r.passed for r in results),
        "latency": found["latency"],
        "realization": found["realization"][0] if found["realization"] else None,
        "localization": found["localization"],
    }
    _print_diagnosis(summary)
    if report is not None:
        from onnxq.html_report import write_html
        from onnxq.report import write_json

        write_json(summary, report.with_suffix(".json"))
        write_html(summary, report if report.suffix == ".html" else report.with_suffix(".html"))
        out.print(f"report {report}")
    failed = [g for r in results for g in r.gates if not g.passed]
    if failed:
        raise GateFailure(f"validation gate {failed[0].gate} failed: {failed[0].value:.4g}")


@app.command(cls=_Command)
@_guard
def inspect(model: Annotated[Path, typer.Argument(metavar="MODEL", help="an .onnx model")]) -> None:
    """Show opsets, inputs/outputs, the op histogram and which nodes the int8 recipe would quantize."""
    from onnxq import ir as onnxq_ir
    from onnxq.calibration.readers import input_specs
    from onnxq.qspec import COMPUTE_OPS, DEFAULT_TARGETS

    m = onnxq_ir.load(model)
    g = m.graph
    out.print(
        f"[bold]{model}[/]  ir_version {m.ir_version}  opsets "
        + ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in m.opset_imports.items())
        + f"  producer {m.producer_name or '?'} {m.producer_version or ''}"
    )
    for spec in input_specs(m):
        out.print(f"  input  {spec.name}: {spec.dtype} {['?' if d is None else d for d in spec.shape]}")
    for value in g.outputs:
        shape = [d if isinstance(d, int) else "?" for d in value.shape] if value.shape is not None else "?"
        dtype = value.dtype.numpy() if value.dtype is not None else "?"
        out.print(f"  output {value.name}: {dtype} {shape}")
    weight_bytes = sum(v.const_value.nbytes for v in g.initializers.values() if v.const_value is not None)
    constants = [n for n in g if n.op_type == "Constant" and "value" in n.attributes]
    constant_bytes = sum(n.attributes["value"].as_tensor().nbytes for n in constants)
    parts = [f"{g.num_nodes()} nodes"]
    if g.initializers:
        parts.append(f"{len(g.initializers)} initializers ({weight_bytes / 1e6:.2f} MB)")
    if constants:
        parts.append(
            f"{len(constants)} Constant nodes ({constant_bytes / 1e6:.2f} MB: weights in the graph, lifted by simplify)"
        )
    out.print("  " + ", ".join(parts))
    counts = Counter(n.op_type if not n.domain else f"{n.domain}::{n.op_type}" for n in g)
    table = Table(title="ops", title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    table.add_column("int8 recipe")
    for op, count in counts.most_common():
        role = "quantized" if op in COMPUTE_OPS else ("follows its input" if op in DEFAULT_TARGETS else "")
        table.add_row(op, str(count), role)
    out.print(table)


@app.command(cls=_Command)
@_guard
def passes() -> None:
    """List the registered passes (built-in and plugins) with their config fields."""
    from onnxq import registry

    table = Table(title="passes", title_justify="left", show_lines=True)
    table.add_column("pass")
    table.add_column("what it does")
    table.add_column("config fields (default)")
    for name in registry.names():
        cls = registry.get(name)
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().split("\n")[0]
        doc = doc.split(":", 1)[1].strip() if doc.startswith(f"{name}:") else doc
        fields = [
            f"{key} ({info.default if info.default_factory is None else info.default_factory()})"
            for key, info in cls.Config.model_fields.items()
        ]
        table.add_row(name, doc, "\n".join(fields) or "-")
    out.print(table)


@app.command(cls=_Command)
@_guard
def recipes() -> None:
    """List the built-in recipes with what each one does (use one with `onnxq run MODEL --recipe NAME`)."""
    from onnxq.recipes import descriptions

    table = Table(
        title="built-in recipes (onnxq run MODEL --recipe NAME; any YAML file works too)", title_justify="left"
    )
    table.add_column("recipe")
    table.add_column("what it does")
    for name, text in descriptions().items():
        table.add_row(name, text)
    out.print(table)


@app.command(cls=_Command)
@_guard
def schema() -> None:
    """Print the JSON Schema of recipes (for editors and CI checks)."""
    print(json.dumps(recipe_schema(), indent=2))


def recipe_schema() -> dict[str, Any]:
    from onnxq import registry
    from onnxq.recipe import Recipe

    doc = Recipe.model_json_schema(by_alias=True)
    items = []
    for name in registry.names():
        cls = registry.get(name)
        items.append(
            {
                "type": "object",
                "additionalProperties": False,
                "required": [name],
                "properties": {name: {"anyOf": [cls.Config.model_json_schema(), {"type": "null"}]}},
            }
        )
    doc["properties"]["passes"]["items"] = {"anyOf": items}
    return doc


def main() -> None:
    """The console script: Ctrl-C at any moment, imports included, is one line and exit 130."""
    import signal

    try:
        app(prog_name="onnxq")  # also under `python -m onnxq`
    except KeyboardInterrupt:
        err.print(interrupted_line(), highlight=False, soft_wrap=True)
        sys.exit(130)
    finally:  # the command has said what it did: a Ctrl-C during the interpreter's exit changes nothing
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    main()
