"""Readers yield feed dicts (`{input_name: batch_array}`) from calibration or evaluation data.

Data problems are reported here, at the edge, as one line that names the file, the input and the fix,
instead of as an onnxruntime error from deep inside a session.
"""

from __future__ import annotations

import re
from collections import Counter
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
    batch_axis: int = 0  # the axis samples are stacked on (an RNN state [layers, batch, hidden] has 1)

    @property
    def batch_is_dynamic(self) -> bool:
        return not self.shape or self.shape[self.batch_axis] is None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a feed must provide (initializers listed as inputs have defaults and are left out)."""
    values = [v for v in model.graph.inputs if v.name not in model.graph.initializers]
    shapes = [_dims(v) for v in values]
    axes = batch_axes(shapes)
    specs = []
    for value, dims, axis in zip(values, shapes, axes, strict=True):
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else None for d in dims)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, axis))
    return specs


def _dims(value: ir.Value) -> tuple[int | str | None, ...]:
    """Fixed sizes as ints, named symbolic dims as their names, unknown ones as None."""
    if value.shape is None:
        return ()
    dims: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d if d > 0 else None)
        else:
            dims.append(getattr(d, "value", None) or None)
    return tuple(dims)


def batch_axes(shapes: list[tuple[int | str | None, ...]]) -> list[int]:
    """Each input's batch axis: where the batch dim name shared by the inputs' leading axes sits (an LSTM's
    h0 `[layers, batch, hidden]` beside `x [batch, time, features]`), or, without names, the first dynamic
    axis of an input whose leading axis is fixed while another input's leading axis is dynamic; else 0."""
    leading = Counter(s[0] for s in shapes if s and isinstance(s[0], str))
    name = leading.most_common(1)[0][0] if leading else None
    some_dynamic_lead = any(s and not isinstance(s[0], int) for s in shapes)
    axes = []
    for dims in shapes:
        if name is not None and name in dims:
            axes.append(dims.index(name))
        elif dims and isinstance(dims[0], int) and some_dynamic_lead:
            axes.append(next((i for i, d in enumerate(dims) if not isinstance(d, int)), 0))
        else:
            axes.append(0)
    return axes


def sample_count(feeds: Feeds, specs: list[InputSpec] | tuple[InputSpec, ...]) -> int:
    """Samples in a feed batch: the common size of the inputs' batch axes, or 1 for a feed whose inputs
    do not share one (it runs as it is, a single sample)."""
    counts = _batch_counts(feeds, specs)
    return counts.pop() if len(counts) == 1 else 1


def _batch_counts(feeds: Feeds, specs: list[InputSpec] | tuple[InputSpec, ...]) -> set[int]:
    counts = set()
    for spec in specs:
        value = feeds.get(spec.name)
        if value is None or value.ndim <= spec.batch_axis or not spec.shape:
            return set()
        counts.add(value.shape[spec.batch_axis])
    return counts


class NpzReader:
    """`.npz` files (arrays keyed by input name, samples stacked on axis 0), or a folder of them.

    Arrays named in `extras` (e.g. labels) are passed through when present.
    """

    def __init__(
        self,
        source: str | Path,
        specs: list[InputSpec],
        num_samples: int | None = None,
        extras: tuple[str, ...] = (),
        purpose: str = "calibration data",
    ) -> None:
        self.source = Path(source)
        self.purpose = purpose
        self.specs = specs
        self.num_samples = num_samples
        self.extras = extras
        self.files = self._files()

    def _files(self) -> list[Path]:
        if not self.source.exists():
            raise UsageError(
                f"{self.purpose} '{self.source}' does not exist", "pass an .npz file or a folder of .npz files"
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
                f"{self.purpose} '{self.source}' is not an .npz file",
                "save arrays keyed by input name with numpy.savez(path, **{name: array})",
            )
        return [self.source]

    def __iter__(self) -> Iterator[Feeds]:
        return limit(
            (feeds for path in self.files for feeds in self._read(path)),
            self.specs,
            self.num_samples,
            f"{self.purpose} '{self.source}' holds zero samples",
        )

    def _read(self, path: Path) -> Iterator[Feeds]:
        try:
            archive = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise UsageError(f"cannot read '{path}' ({type(exc).__name__})", "write it with numpy.savez") from None
        with archive:
            arrays: Feeds = {}
            for spec in self.specs:
                if spec.name not in archive.files:
                    close = closest(spec.name, archive.files)
                    raise UsageError(
                        f"'{path.name}' has no array for model input '{spec.name}' (it has {sorted(archive.files)})",
                        (f"did you mean '{close}'? " if close else "") + "key each array by the model's input name",
                    )
                arrays[spec.name] = archive[spec.name]
            extras = {extra: archive[extra] for extra in self.extras if extra in archive.files}
        yield from arrange(arrays, self.specs, path, extras)


def limit(batches: Iterable[Feeds], specs: list[InputSpec], num_samples: int | None, empty: str) -> Iterator[Feeds]:
    """At most `num_samples` samples (the last batch cut on its batch axes); one line if there are none."""
    remaining, produced = num_samples, 0
    for feeds in batches:
        if remaining is not None and remaining <= 0:
            break
        count = sample_count(feeds, specs)
        if remaining is not None and count > remaining:
            feeds = take(feeds, specs, 0, remaining)
            count = remaining
        if remaining is not None:
            remaining -= count
        produced += count
        yield feeds
    if produced == 0:
        raise UsageError(empty, "provide at least one sample")


def take(feeds: Feeds, specs: list[InputSpec] | tuple[InputSpec, ...], start: int, stop: int) -> Feeds:
    """Samples start:stop of a batch: each input cut on its batch axis, extras (labels) on axis 0."""
    axes = {s.name: s.batch_axis for s in specs}
    out = {}
    for name, value in feeds.items():
        axis = axes.get(name, 0)
        index = [slice(None)] * value.ndim
        if value.ndim:
            index[axis] = slice(start, stop)
        out[name] = value[tuple(index)]
    return out


def arrange(
    arrays: dict[str, np.ndarray], specs: list[InputSpec], where: Path, extras: dict[str, np.ndarray] | None = None
) -> Iterator[Feeds]:
    """The feed batches in one set of arrays, whatever the layout people save:

    - batched: every array has the model's rank and the inputs share a batch size on their batch axes
      (axis 0, or 1 for an RNN state): one batch, split later by `rebatch`;
    - one feed: arrays of the model's rank that share no batch size (an If model's `cond[1]` beside
      `input_0[4,3,32,32]`, an LSTM's `x[1,T,F]` beside `h0[3,1,H]`): it runs as it is, one sample;
    - stacked: arrays of rank + 1, each `array[i]` a full feed (a state `[2,1,128]` stacked to
      `[N,2,1,128]`), possibly beside batched arrays with N on their batch axis: N feeds;
    - a single unbatched sample (rank - 1) gets its batch axis.
    """
    extras = extras or {}
    stacked = {s.name for s in specs if s.shape and arrays[s.name].ndim == len(s.shape) + 1}
    if not stacked:
        feeds = {s.name: conform(arrays[s.name], s, where) for s in specs}
        counts = _batch_counts(feeds, specs)
        if len(counts) > 1:  # no shared batch: a feed that must run as it is
            feeds = {s.name: conform(arrays[s.name], s, where, whole=True) for s in specs}
            counts = {1}
        if counts == {0}:
            return
        yield {**feeds, **extras}
        return
    total = {arrays[name].shape[0] for name in stacked}
    if len(total) > 1:
        sizes = {name: arrays[name].shape[0] for name in sorted(stacked)}
        raise UsageError(
            f"'{where.name}' stacks different numbers of samples on axis 0: {sizes}",
            "stack the same number of feeds for every input",
        )
    (count,) = total
    for spec in specs:
        value = arrays[spec.name]
        batched = spec.name not in stacked and spec.shape and value.ndim == len(spec.shape)
        if batched and value.shape[spec.batch_axis] != count:
            raise UsageError(
                f"input '{spec.name}' in '{where.name}' has {value.shape[spec.batch_axis]} samples on its batch "
                f"axis {spec.batch_axis}, the stacked inputs {sorted(stacked)} have {count}",
                "stack every input the same way: one full feed per index on a new axis 0",
            )
    for index in range(count):
        feeds = {}
        for spec in specs:
            value = arrays[spec.name]
            if spec.name in stacked:
                feeds[spec.name] = conform(value[index], spec, where, whole=True, given=value.shape)
            elif spec.shape and value.ndim == len(spec.shape):
                feeds[spec.name] = conform(np.take(value, [index], axis=spec.batch_axis), spec, where)
            else:
                feeds[spec.name] = conform(value, spec, where, whole=True)
        yield {**feeds, **{k: v[index : index + 1] for k, v in extras.items()}}


def conform(
    array: np.ndarray, spec: InputSpec, path: Path, whole: bool = False, given: tuple[int, ...] | None = None
) -> np.ndarray:
    """Check rank, sizes, dtype and finiteness; add the batch axis to a single unbatched sample. `whole`:
    the array is one complete feed, so its batch axis must match a fixed size too; `given`: the shape of
    the stack it was taken from (for the message)."""
    given = given or array.shape
    if spec.shape and array.ndim == len(spec.shape) - 1:
        array = np.expand_dims(array, spec.batch_axis)
    if spec.shape and array.ndim != len(spec.shape):
        raise _wrong_rank(spec, path, given)
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=False)):
        if want is not None and got != want and (whole or axis != spec.batch_axis):
            if len(given) != len(spec.shape):  # a sample axis added or taken off: the rank is what is wrong
                raise _wrong_rank(spec, path, given)
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


def _wrong_rank(spec: InputSpec, path: Path, given: tuple[int, ...]) -> UsageError:
    return UsageError(
        f"input '{spec.name}' in '{path.name}' has rank {len(given)} (shape {list(given)}), the model expects "
        f"rank {len(spec.shape)} (shape {_shape_text(spec.shape)})",
        "save one feed per input in the model's layout, or stack feeds on a new axis 0",
    )


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


PAST = re.compile(r"(^|[._])past([._]|$)")  # past_key_values.0.key, past.0.value, layer.past_key
MASKS = ("attention_mask",)
POSITIONS = ("position_ids",)


class SyntheticReader:
    """Random inputs for smoke runs: standard-normal floats, zeros for integers; symbolic dims get
    `batch` (axis 0) or `dim` (other axes). Ranges from it are not meant for a model you ship.

    Decoder inputs get a consistent prefill instead, or attention kernels refuse them (GroupQueryAttention
    derives the sequence lengths from the mask): past key/value inputs are empty on their sequence axis
    (axis 2 of [batch, heads, past, head_dim]), `attention_mask` is ones over the `dim` new tokens,
    `position_ids` count 0…dim−1 (token ids stay 0: any vocabulary has it)."""

    def __init__(
        self, specs: list[InputSpec], num_samples: int = 16, seed: int = 0, batch: int = 1, dim: int = 32
    ) -> None:
        self.specs, self.num_samples, self.seed, self.batch, self.dim = specs, num_samples, seed, batch, dim

    def _shape(self, spec: InputSpec) -> list[int]:
        shape = [
            (self.batch if i == spec.batch_axis else self.dim) if d is None else d for i, d in enumerate(spec.shape)
        ]
        if PAST.search(spec.name) and len(shape) == 4 and spec.shape[2] is None:
            shape[2] = 0  # empty past: a prefill of `dim` tokens
        return shape

    def __iter__(self) -> Iterator[Feeds]:
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_samples):
            feeds = {}
            for spec in self.specs:
                shape = self._shape(spec)
                if spec.dtype.kind == "f":
                    feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
                elif spec.name in MASKS:
                    feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
                elif spec.name in POSITIONS and shape:
                    feeds[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype)
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
    purpose: str = "calibration data"  # or "evaluation data": what the messages call it

    def reader(self) -> Iterable[Feeds]:
        specs = list(self.specs)
        if self.source == SYNTHETIC:
            return SyntheticReader(specs, self.num_samples or 16, self.seed)
        path = Path(self.source)
        if ":" in self.source and not path.exists():
            from onnxq.calibration.sources import CallableReader

            return CallableReader(self.source, specs, self.num_samples, self.purpose)
        if path.is_dir() and self.preprocess is not None:
            from onnxq.calibration.sources import ImageFolderReader

            return ImageFolderReader(path, specs, self.preprocess, self.num_samples)  # type: ignore[arg-type]
        return NpzReader(path, specs, self.num_samples, self.extras, self.purpose)

    def __call__(self) -> Iterator[Feeds]:
        return iter(self.reader())


def open_data(
    source: str | Path | None,
    specs: list[InputSpec],
    num_samples: int | None = None,
    seed: int = 0,
    extras: tuple[str, ...] = (),
    preprocess: object | None = None,
    purpose: str = "calibration data",
) -> DataSource:
    """The data source for `source`, validated now (path, files, callable); data is read lazily."""
    if source is None:
        raise UsageError(f"no {purpose} given", "pass --calib DATA.npz (or --calib synthetic for a smoke run)")
    data = DataSource(str(source), tuple(specs), num_samples, seed, extras, preprocess, purpose)
    data.reader()  # raises the one-line error for a bad path, an empty folder or a missing callable
    return data


def rebatch(feeds: Iterable[Feeds], specs: list[InputSpec], batch_size: int) -> Iterator[Feeds]:
    """Chunks of `batch_size` samples where the model's batch dims are dynamic, else of the fixed size.
    A feed whose inputs share no batch size runs as it is."""
    fixed = next((s.shape[s.batch_axis] for s in specs if s.shape and s.shape[s.batch_axis] is not None), None)
    size = fixed if fixed is not None else batch_size
    for chunk in feeds:
        counts = _batch_counts(chunk, specs)
        if len(counts) != 1 or any(s.shape and s.shape[s.batch_axis] not in (None, size) for s in specs):
            yield chunk
            continue
        (count,) = counts
        if fixed is None and count <= size:
            yield chunk
            continue
        for start in range(0, count - (count % size if fixed else 0), size):
            yield take(chunk, specs, start, start + size)
