"""The recipe: a typed, validated description of a quantization job.

Top-level keys: `calibration`, `defaults`, `passes` (ordered one-key maps `- pass_name: {config}`),
`validate`, `output`. Every error names its key path and, for a misspelling, the closest valid key.
"""

from __future__ import annotations

import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxq import registry
from onnxq.calibration.sources import Preprocess
from onnxq.errors import RecipeError, UsageError, did_you_mean
from onnxq.qspec import DEFAULT_ACTIVATIONS, DEFAULT_WEIGHTS, QuantSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    data: str | None = Field(
        None,
        description="calibration data: .npz file or folder of them, a folder of images (with preprocess), "
        "module:function yielding feed dicts, or 'synthetic'",
    )
    method: Literal["minmax", "percentile", "entropy", "mse"] = Field(
        "minmax",
        description="how activation ranges are computed: minmax (exact extremes), percentile (clip rare "
        "outliers), entropy (TensorRT KL threshold), mse (least expected quantization error)",
    )
    percentile: float = Field(99.99, gt=50, le=100, description="percentile method: the kept share, in %")
    bins: int = Field(2048, ge=128, le=65536, description="histogram bins of the histogram methods")
    sample_per_tensor: int = Field(
        4096, ge=0, description="histogram methods: elements sampled per tensor per batch, in-graph; 0 = all"
    )
    num_samples: int = Field(128, ge=1, description="samples to read at most")
    batch_size: int = Field(
        1,
        ge=1,
        description="samples per onnxruntime run where the batch dim is dynamic; 1 is fastest and smallest "
        "on CPU (PP-OCR det, 32 samples: 3.0 s / 512 MB at 1, 9.4 s / 2 GB at 8)",
    )
    seed: int = Field(0, description="seed of the synthetic reader")
    workers: int = Field(1, ge=1, le=256, description="processes sharing the calibration data (merged exactly)")
    preprocess: Preprocess | None = Field(None, description="image folders: how files become the model input")


class Defaults(_Strict):
    activations: QuantSpec = DEFAULT_ACTIVATIONS
    weights: QuantSpec = DEFAULT_WEIGHTS


class Gates(_Strict):
    """Thresholds; a failed gate makes `onnxq run`/`validate` exit with code 3."""

    min_sqnr_db: float | None = Field(None, description="every output's SQNR in dB at least this")
    min_slice_sqnr_db: float | None = Field(
        10.0, description="every output slice along validate.slice_axis at least this (catches collapsed heads)"
    )
    min_cosine: float | None = Field(None, ge=-1, le=1)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, description="points of label accuracy lost at most")
    min_task_metric: float | None = Field(None, description="validate.metric's score at least this")
    ignore_outputs: list[str] = Field(
        default_factory=lambda: ["re:^present"],
        description="outputs measured and reported but not gated (names, or 're:' regexes); by default a decoder's "
        "KV-cache outputs (present.N.key/value): the logits judge the model, a cache is an intermediate",
    )


class ValidateConfig(_Strict):
    enabled: bool = True
    data: str | None = Field(None, description="evaluation data (.npz); defaults to the calibration data")
    num_samples: int | None = Field(None, ge=1, description="samples to validate on; default all")
    batch_size: int = Field(1, ge=1, description="samples per run; larger batches cost memory, not time, on CPU")
    labels: str = Field("label", description="array in the data holding class labels, used when present")
    providers: list[Literal["cpu", "cuda", "tensorrt"]] = ["cpu"]
    slice_axis: int | None = Field(1, ge=0, description="outputs are also judged per index along this axis")
    metric: str | None = Field(
        None, description="task metric module:function(float_outputs, quantized_outputs, batch) -> score"
    )
    localize: Literal["auto", "always", "never"] = Field(
        "auto", description="rank nodes by the error they add: auto = when a gate fails"
    )
    whatif_top: int = Field(5, ge=0, description="re-validate with this many top culprits kept in float")
    localize_samples: int = Field(
        32,
        ge=1,
        description="samples the localization and its what-if read (a ranking needs few; each costs a run "
        "of both models with every tensor exposed)",
    )
    latency: bool = Field(True, description="measure float vs quantized latency on each provider")
    threads: int = Field(1, ge=0, description="threads for the latency measurement (0: onnxruntime's default)")
    gates: Gates = Gates()


class OutputConfig(_Strict):
    path: str | None = Field(None, description="output model; default <input>.q.onnx beside the input")
    report: bool = Field(True, description="write <output>.report.json")
    max_shard_bytes: int | None = Field(
        None, gt=0, description="write the weights as external data in files of at most this many bytes"
    )


class Recipe(_Strict):
    name: str | None = None
    description: str | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    defaults: Defaults = Defaults()
    passes: list[dict[str, dict[str, Any] | None]] = Field(
        default_factory=list, description="ordered list of one-key maps: - pass_name: {config}"
    )
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    output: OutputConfig = OutputConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def pass_configs(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, cfg or {}) for item in self.passes for name, cfg in item.items()]

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- loading ------------------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("onnxq.recipes").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError("", f"{origin} is not valid YAML{where}", "fix the indentation or quoting there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError("", f"{origin} must be a mapping of sections", "start with keys such as 'passes:'")
    return data


def read_recipe_source(recipe: str | Path) -> dict[str, Any]:
    """Raw recipe dict from a built-in name or a YAML file."""
    text = str(recipe)
    if text in builtin_names():
        return _read_yaml((resources.files("onnxq.recipes") / f"{text}.yaml").read_text(), f"recipe '{text}'")
    path = Path(text)
    if path.is_file():
        return _read_yaml(path.read_text(), f"'{path}'")
    if path.suffix in (".yaml", ".yml") or "/" in text:
        raise UsageError(
            f"recipe file '{path}' does not exist", "check the path, or use a built-in: " + ", ".join(builtin_names())
        )
    raise UsageError(f"unknown recipe '{text}'", did_you_mean(text, builtin_names()))


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set a.b=value` edits; `passes.NAME.key=v` edits the first pass called NAME."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(
                f"--set '{item}' has no '='", "write --set key.path=value, e.g. calibration.num_samples=64"
            )
        key, _, text = item.partition("=")
        value = yaml.safe_load(text) if text else None
        parts = key.strip().split(".")
        target: Any = raw
        if parts[0] == "passes" and len(parts) >= 3:
            entry = next((p for p in raw.get("passes") or [] if isinstance(p, dict) and parts[1] in p), None)
            if entry is None:
                present = [n for p in raw.get("passes") or [] if isinstance(p, dict) for n in p]
                raise RecipeError(
                    f"passes.{parts[1]}",
                    f"--set names pass '{parts[1]}', which the recipe does not run",
                    did_you_mean(parts[1], present),
                )
            if entry[parts[1]] is None:
                entry[parts[1]] = {}
            target, parts = entry[parts[1]], parts[2:]
        for part in parts[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = target[part] = {}
            target = nxt
        target[parts[-1]] = value
    return raw


def load_recipe(recipe: str | Path | dict[str, Any] | Recipe, overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe) and not overrides:
        return recipe
    if isinstance(recipe, Recipe):
        raw = recipe.dump()
    elif isinstance(recipe, dict):
        raw = dict(recipe)
    else:
        raw = read_recipe_source(recipe)
    raw = apply_overrides(raw, list(overrides or []))
    return validate_recipe(raw)


def validate_recipe(raw: dict[str, Any]) -> Recipe:
    try:
        parsed = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise _recipe_error(exc, Recipe) from None
    for index, item in enumerate(parsed.passes):
        if len(item) != 1:
            raise RecipeError(
                f"passes[{index}]",
                f"each pass is a one-key map, got keys {sorted(item)}",
                "write '- pass_name: {config}' per list item",
            )
        name, cfg = next(iter(item.items()))
        cls = registry.get(name, f"passes[{index}]")
        try:
            cls.Config.model_validate(cfg or {})
        except ValidationError as exc:
            raise _recipe_error(exc, cls.Config, prefix=f"passes[{index}].{name}") from None
    return parsed


def _recipe_error(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> RecipeError:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    path = ".".join([prefix, *loc] if prefix else loc).replace(".[", "[")
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(root, err["loc"][:-1])
        return RecipeError(path, f"unknown key '{loc[-1]}'", did_you_mean(loc[-1], allowed))
    if err["type"] == "literal_error":
        return RecipeError(path, f"{err['msg'].lower()}, got {err.get('input')!r}")
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    return RecipeError(path, f"{err['msg'].lower()} (got {shown})", _type_hint(root, err["loc"]))


def _unwrap(annotation: Any) -> Any:
    """Strip Optional/list/dict down to the BaseModel (or the plain type) that nests inside."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return _unwrap(models[0] if models else args[0])
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    return annotation


def _field_map(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or name): f.annotation for name, f in model.model_fields.items()}


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    current: Any = root
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            current = _field_map(current).get(str(part))
        elif typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]
        if current is None:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(_field_map(current))
    return []


def _type_hint(root: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    fields = _fields_at(root, loc[:-1]) if loc else []
    if loc and str(loc[-1]) in fields:
        return f"see `onnxq schema` for the type of '{loc[-1]}'"
    return None
