"""Readers yield feed dicts (`{input_name: batch_array}`) from calibration or evaluation data.

Data problems are reported here, at the edge, as one line that names the file, the input and the fix,
instead of as an onnxruntime error from deep inside a session.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxq.errors import UsageError, closest

Feeds = dict[str, np.ndarray]
SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]  # None where symbolic or unknown (old exporters write -1 or 0 for that)

    @property
    def batch_is_dynamic(self) -> bool:
        return not self.shape or self.shape[0] is None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a feed must provide (initializers listed as inputs have defaults and are left out)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = (
            tuple(d if isinstance(d, int) and d > 0 else None for d in value.shape) if value.shape is not None else ()
        )
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


class NpzReader:
    """`.npz` files (arrays keyed by input name, samples stacked on axis 0), or a folder of them.

    Arrays named in `extras` (e.g. labels) are passed through when present.
    """

    def __init__(
        self, source: str | Path, specs: list[InputSpec], num_samples: int | None = None, extras: tuple[str, ...] = ()
    ) -> None:
        self.source = Path(source)
        self.specs = specs
        self.num_samples = num_samples
        self.extras = extras
        self.files = self._files()

    def _files(self) -> list[Path]:
        if not self.source.exists():
            raise UsageError(
                f"calibration data '{self.source}' does not exist", "pass an .npz file or a folder of .npz files"
            )
        if self.source.is_dir():
            files = sorted(self.source.glob("*.npz"))
            if not files:
                raise UsageError(
                    f"folder '{self.source}' holds no .npz files",
                    "save arrays keyed by input name with numpy.savez, or for images set calibration.preprocess",
                )
            return files
        if self.source.suffix != ".npz":
            raise UsageError(
                f"calibration data '{self.source}' is not an .npz file",
                "save arrays keyed by input name with numpy.savez(path, **{name: array})",
            )
        return [self.source]

    def __iter__(self) -> Iterator[Feeds]:
        remaining = self.num_samples
        produced = 0
        for path in self.files:
            if remaining is not None and remaining <= 0:
                break
            feeds = self._read(path)
            count = next(iter(feeds.values())).shape[0]
            if remaining is not None and count > remaining:
                feeds = {k: v[:remaining] for k, v in feeds.items()}
                count = remaining
            if remaining is not None:
                remaining -= count
            produced += count
            if count:
                yield feeds
        if produced == 0:
            raise UsageError(f"calibration data '{self.source}' holds zero samples", "provide at least one sample")

    def _read(self, path: Path) -> Feeds:
        try:
            archive = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"cannot read '{path}' ({type(exc).__name__})", "write it with numpy.savez") from None
        with archive:
            feeds: Feeds = {}
            for spec in self.specs:
                if spec.name not in archive.files:
                    close = closest(spec.name, archive.files)
                    raise UsageError(
                        f"'{path.name}' has no array for model input '{spec.name}' (it has {sorted(archive.files)})",
                        (f"did you mean '{close}'? " if close else "") + "key each array by the model's input name",
                    )
                feeds[spec.name] = conform(archive[spec.name], spec, path)
            for extra in self.extras:
                if extra in archive.files:
                    feeds[extra] = archive[extra]
        counts = {k: v.shape[0] for k, v in feeds.items()}
        if len(set(counts.values())) > 1:
            raise UsageError(
                f"'{path.name}' has different sample counts per array: {counts}",
                "stack the same number of samples for every input on axis 0",
            )
        return feeds


def conform(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Check rank, dtype and finiteness; add the batch axis to a single unbatched sample."""
    if spec.shape and array.ndim == len(spec.shape) - 1:
        array = array[None]
    if spec.shape and array.ndim != len(spec.shape):
        raise UsageError(
            f"input '{spec.name}' in '{path.name}' has rank {array.ndim}, the model expects "
            f"{len(spec.shape)} (shape {_shape_text(spec.shape)})",
            "stack samples on axis 0 with the model's layout",
        )
    for axis, (got, want) in enumerate(zip(array.shape[1:], spec.shape[1:], strict=False), start=1):
        if want is not None and got != want:
            raise UsageError(
                f"input '{spec.name}' in '{path.name}' has size {got} on axis {axis}, the model "
                f"expects {want} (shape {_shape_text(spec.shape)})",
                "resize the data to the model",
            )
    want_kind, got_kind = spec.dtype.kind, array.dtype.kind
    if want_kind == "f":
        if got_kind != "f":  # integers into a float input: usually raw pixels that skipped preprocessing
            raise UsageError(
                f"input '{spec.name}' in '{path.name}' is {array.dtype}, the model expects {spec.dtype}",
                f"convert it to {spec.dtype}, scaled the way the model was trained (e.g. pixels / 255)",
            )
        if got_kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                raise UsageError(
                    f"input '{spec.name}' in '{path.name}' has {bad} NaN/Inf values",
                    "clean or drop those samples; they would poison the ranges",
                )
    elif want_kind in "iub" and got_kind not in "iub":
        raise UsageError(
            f"input '{spec.name}' in '{path.name}' is {array.dtype}, the model expects {spec.dtype}",
            f"save it as {spec.dtype}",
        )
    return array.astype(spec.dtype, copy=False)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class SyntheticReader:
    """Random inputs for smoke runs: standard-normal floats, zeros for integers; symbolic dims get
    `batch` (axis 0) or `dim` (other axes). Ranges from it are not meant for a model you ship."""

    def __init__(
        self, specs: list[InputSpec], num_samples: int = 16, seed: int = 0, batch: int = 1, dim: int = 32
    ) -> None:
        self.specs, self.num_samples, self.seed, self.batch, self.dim = specs, num_samples, seed, batch, dim

    def __iter__(self) -> Iterator[Feeds]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_samples):
            feeds = {}
            for spec in self.specs:
                shape = [(self.batch if i == 0 else self.dim) if d is None else d for i, d in enumerate(spec.shape)]
                if spec.dtype.kind == "f":
                    feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                else:
                    feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            yield feeds


@dataclass(frozen=True)
class DataSource:
    """A re-iterable, picklable data source: what a worker process needs to re-open the same data.

    Calling it returns a fresh iterator of feed batches; `source` is a .npz file or folder, an image
    folder (with `preprocess`), 'synthetic', or `module:function`.
    """

    source: str
    specs: tuple[InputSpec, ...]
    num_samples: int | None = None
    seed: int = 0
    extras: tuple[str, ...] = ()
    preprocess: object | None = None

    def reader(self) -> Iterable[Feeds]:
        specs = list(self.specs)
        if self.source == SYNTHETIC:
            return SyntheticReader(specs, self.num_samples or 16, self.seed)
        path = Path(self.source)
        if ":" in self.source and not path.exists():
            from onnxq.calibration.sources import CallableReader

            return CallableReader(self.source, specs, self.num_samples)
        if path.is_dir() and self.preprocess is not None:
            from onnxq.calibration.sources import ImageFolderReader

            return ImageFolderReader(path, specs, self.preprocess, self.num_samples)  # type: ignore[arg-type]
        return NpzReader(path, specs, self.num_samples, self.extras)

    def __call__(self) -> Iterator[Feeds]:
        return iter(self.reader())


def open_data(
    source: str | Path | None,
    specs: list[InputSpec],
    num_samples: int | None = None,
    seed: int = 0,
    extras: tuple[str, ...] = (),
    preprocess: object | None = None,
) -> DataSource:
    """The data source for `source`, validated now (path, files, callable); data is read lazily."""
    if source is None:
        raise UsageError("no data given", "pass --calib DATA.npz, or set calibration.data: synthetic")
    data = DataSource(str(source), tuple(specs), num_samples, seed, extras, preprocess)
    data.reader()  # raises the one-line error for a bad path, an empty folder or a missing callable
    return data


def rebatch(feeds: Iterator[Feeds], specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
    """Chunks of `batch_size` samples where the model's batch dim is dynamic, else of the fixed size."""
    fixed = next((s.shape[0] for s in specs if s.shape and s.shape[0] is not None), None)
    size = fixed if fixed is not None else batch_size
    for chunk in feeds:
        count = next(iter(chunk.values())).shape[0]
        for start in range(0, count - (count % size if fixed else 0), size):
            yield {k: v[start : start + size] for k, v in chunk.items()}
