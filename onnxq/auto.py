"""auto: a search above recipes. It runs a ladder of candidate recipes through the same runner, scores each
on a held-out part of the calibration data with the same validation code, and keeps the fastest candidate
that meets the target (else the best one), re-run on all the calibration data and validated as usual.

Why: no single calibration method wins on real models. On the wild zoo (bench/wild.py, 16 held-out feeds)
min-max int8 kept 0.625 of PP-LCNet's top-1 and 0.57 of YOLOv8n's box F1, MSE ranges 0.81 and 1.0; PP-OCRv5
rec did best with percentile ranges (0.875 against 0.75); only mixed precision kept PP-LCNet at 1.0.

The ladder and the score are data: a rung is a recipe and overrides; the score is the task metric when one
is given (`validate.metric`), else the validation's own gates (worst output SQNR and worst judged slice).
Candidates that cannot be faster than one already meeting the target (mixed, after an int8 that meets it)
and those that only cost more time for accuracy (int8-tuned: bias correction and a range search by output
error) are skipped once a rung meets it; `max_minutes` bounds the search.

    onnxq run model.onnx --recipe auto --calib calib.npz [--set auto.max_minutes=10 --set auto.target=0.99]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import UsageError


@dataclass(frozen=True)
class Rung:
    label: str
    recipe: str
    overrides: tuple[str, ...] = ()
    may_be_slower: bool = False  # keeps more in float: only worth trying when no faster rung met the target
    costly: bool = False  # as fast, but minutes more to quantize: only worth it when no cheaper rung met it


LADDER: tuple[Rung, ...] = (
    Rung("int8 minmax", "int8"),
    Rung("int8 percentile", "int8", ("calibration.method=percentile",)),
    Rung("int8 mse", "int8", ("calibration.method=mse",)),
    Rung("int8 entropy", "int8", ("calibration.method=entropy",)),
    Rung("int8 tuned", "int8-tuned", costly=True),  # bias correction + per-tensor range search (the toolbox)
    Rung("mixed int8/fp32", "mixed", (), may_be_slower=True),
)


@dataclass
class Settings:
    max_minutes: float = 20.0
    target: float | None = None  # task metric to reach; default: the validation gates
    holdout: float = 0.25  # share of the calibration samples kept aside for scoring
    samples: int = 128  # calibration samples read at most


@dataclass
class Tried:
    label: str
    score: float
    meets: bool
    speedup: float
    seconds: float
    size: float
    detail: str = ""
    path: Path | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "path"}


def split_settings(overrides: list[str]) -> tuple[Settings, list[str]]:
    """`auto.*` keys set the search; the others go to every candidate recipe."""
    settings, rest = Settings(), []
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("auto."):
            rest.append(item)
            continue
        name = key.removeprefix("auto.")
        if name not in vars(settings):
            raise UsageError(f"unknown setting '{key}'", "auto takes auto.max_minutes, auto.target, auto.holdout")
        try:
            setattr(settings, name, type(getattr(settings, name) or 0.0)(value))
        except ValueError:
            raise UsageError(f"'{key}' takes a number, got '{value}'", f"write --set {key}=NUMBER") from None
    return settings, rest


def run(
    model: Path,
    *,
    output: Path,
    calib: str,
    data: str | None,
    overrides: list[str],
    validate: bool | None,
    show_progress: bool,
    metric: str | None = None,
) -> Any:
    """The search; returns the final run's Result with every candidate in `artifacts['auto']`."""
    from onnxq import runner
    from onnxq.calibration.readers import input_specs, open_data
    from onnxq.ir import load

    settings, rest = split_settings(overrides)
    specs = input_specs(load(model))
    source = open_data(calib, specs, settings.samples)
    work = Path(tempfile.mkdtemp(prefix=".onnxq-auto-", dir=output.parent if str(output.parent) else "."))
    try:
        fit, held_out = _split(source, work, settings.holdout)
        held = open_data(str(held_out), specs, purpose="held-out calibration data")
        tried = _search(model, fit, held, rest, settings, metric, work)
        chosen = _choose(tried)
        notes = [
            f"auto: {t.label}: score {t.score:.4g}{' (meets the target)' if t.meets else ''}, speedup "
            f"{t.speedup:.2f}×, size {t.size:.2f}, {t.seconds:.1f} s{'; ' + t.detail if t.detail else ''}"
            for t in tried
        ]
        notes.append(f"auto: chose {chosen.label}" + ("" if chosen.meets else " (the best; none met the target)"))
        found = {"candidates": [t.to_json() for t in tried], "chosen": chosen.label}
        rung = next(r for r in LADDER if r.label == chosen.label)
        result = runner.run(
            model,
            rung.recipe,
            output=output,
            calib=calib,
            data=data,
            overrides=[*rest, *rung.overrides],
            validate=validate,
            show_progress=show_progress,
            search={"notes": notes, "artifacts": {"auto": found}},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _split(source: Any, work: Path, share: float) -> tuple[Path, Path]:
    """The calibration feeds as two folders of one-feed files: the fit part and the held-out part."""
    from onnxq.calibration.readers import rebatch

    feeds = list(rebatch(source(), list(source.specs), 1))
    if len(feeds) < 4:
        raise UsageError(
            f"auto needs at least 4 calibration samples to hold some out, got {len(feeds)}", "pass more --calib data"
        )
    # at least 8 held out (4 samples decided PP-LCNet's pick by noise: 1.0 held out, 0.56 on evaluation data),
    # at most half of them
    cut = len(feeds) - min(max(8, round(share * len(feeds))), len(feeds) // 2)
    folders = []
    for name, part in (("fit", feeds[:cut]), ("held_out", feeds[cut:])):
        folder = work / name
        folder.mkdir()
        for index, feed in enumerate(part):
            np.savez(folder / f"{index:05d}.npz", **feed)
        folders.append(folder)
    return folders[0], folders[1]


def _search(  # type: ignore[no-untyped-def]
    model: Path, fit: Path, held_out, rest: list[str], settings: Settings, metric, work: Path
) -> list[Tried]:
    from onnxq import runner
    from onnxq.errors import OnnxqError
    from onnxq.ir import file_bytes
    from onnxq.recipe import load_recipe

    deadline = time.monotonic() + 60 * settings.max_minutes
    tried: list[Tried] = []
    for index, rung in enumerate(LADDER):
        if tried and time.monotonic() > deadline:
            break
        if (rung.may_be_slower or rung.costly) and any(t.meets for t in tried):
            continue
        path = work / f"candidate{index}.onnx"
        started = time.perf_counter()
        try:
            runner.run(
                model, rung.recipe, output=path, calib=str(fit), overrides=[*rest, *rung.overrides], validate=False
            )
        except OnnxqError as exc:
            tried.append(Tried(rung.label, -np.inf, False, 0.0, time.perf_counter() - started, 0.0, str(exc)[:120]))
            continue
        seconds = time.perf_counter() - started
        gates = load_recipe(rung.recipe, rest).validate_.gates  # what `run` with that recipe would judge by
        score, meets, speedup, detail = _score(model, path, held_out, settings, metric, gates)
        tried.append(Tried(rung.label, score, meets, speedup, seconds, file_bytes(path) / file_bytes(model), detail))
    return tried


def _score(model: Path, candidate: Path, data, settings: Settings, metric, gates) -> tuple[float, bool, float, str]:  # type: ignore[no-untyped-def]
    """(score, meets the target, 1-thread speedup, what the score is) on the held-out feeds (`data`)."""
    from onnxq.calibration.readers import rebatch
    from onnxq.validate import latency, validate_models

    specs = list(data.specs)
    (result,) = validate_models(model, candidate, data, specs, gates=gates, metric=metric)
    first = next(iter(rebatch(data(), specs, 1)))
    speedup = latency(model, candidate, {s.name: first[s.name] for s in specs}, budget_s=0.3)["speedup"]
    if metric is not None and result.task_metric is not None:
        target = settings.target if settings.target is not None else 0.99
        return result.task_metric, result.task_metric >= target, speedup, "task metric"
    # No task metric: the distance to the default gates in dB (positive: all met).
    margins = [g.value - g.threshold for g in result.gates]
    margin = min(margins) if margins else 0.0
    return margin, margin >= 0, speedup, "dB above the default gates"


def _choose(tried: list[Tried]) -> Tried:
    if not tried:
        raise UsageError("auto ran out of time before any candidate finished", "raise auto.max_minutes")
    meeting = [t for t in tried if t.meets]
    if meeting:
        return max(meeting, key=lambda t: (round(t.speedup, 1), t.score))  # equal speed within noise: the better
    return max(tried, key=lambda t: t.score)
