"""More data sources: image folders with a declared preprocessing, and Python callables.

`open_data` in readers.py dispatches here: a folder of images (with `calibration.preprocess` set), or
`module:function` / `path/to/file.py:function` naming a function that yields feed dicts.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from onnxq.calibration.readers import Feeds, InputSpec, arrange, conform, limit
from onnxq.errors import UsageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class Preprocess(BaseModel):
    """How image files become one model input (applied in this order)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[int, int] = Field(..., description="resize to (height, width)")
    channels: Literal["RGB", "BGR", "L"] = "RGB"
    scale: float = Field(1 / 255, description="multiply pixel values by this first")
    mean: list[float] = Field(default_factory=lambda: [0.0], description="per channel, subtracted after scaling")
    std: list[float] = Field(default_factory=lambda: [1.0], description="per channel, divided after the mean")
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    input: str | None = Field(None, description="model input to feed; default: the only input")


class ImageFolderReader:
    """Images under a folder (sorted, recursive), preprocessed one by one: memory is one image."""

    def __init__(self, folder: Path, specs: list[InputSpec], preprocess: Preprocess, num_samples: int | None) -> None:
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UsageError(
                f"folder '{folder}' holds no images ({', '.join(IMAGE_SUFFIXES)})",
                "point calibration.data at a folder of images, or use .npz files",
            )
        if num_samples:
            self.files = self.files[:num_samples]
        names = [s.name for s in specs]
        target = preprocess.input or (names[0] if len(names) == 1 else None)
        if target not in names:
            raise UsageError(
                f"calibration.preprocess.input must name one of the model inputs {names}",
                "set calibration.preprocess.input",
            )
        self.spec = next(s for s in specs if s.name == target)
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[Feeds]:
        try:
            from PIL import Image
        except ImportError:
            raise UsageError("reading image folders needs Pillow", "pip install 'onnxq[images]'") from None
        p = self.preprocess
        for path in self.files:
            try:
                with Image.open(path) as image:
                    pixels = image.convert("L" if p.channels == "L" else "RGB").resize(p.size[::-1], Image.BILINEAR)
            except OSError as exc:
                raise UsageError(f"cannot read image '{path}' ({exc})", "remove it or convert it") from None
            array = np.asarray(pixels, dtype=np.float32)
            array = array[..., None] if array.ndim == 2 else array
            if p.channels == "BGR":
                array = array[..., ::-1]
            array = (array * p.scale - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
            if p.layout == "NCHW":
                array = array.transpose(2, 0, 1)
            yield {self.spec.name: conform(np.ascontiguousarray(array[None]), self.spec, path)}


def load_callable(reference: str, purpose: str = "calibration data") -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function`."""
    target, _, attribute = reference.rpartition(":")
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            if spec is None or spec.loader is None or not Path(target).is_file():
                raise ImportError(f"no file {target}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = _import_module(target)
    except ImportError as exc:
        raise UsageError(
            f"cannot import '{target}' for {purpose} ({exc})",
            "check the module path, or give a file: path/to/data.py:function",
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UsageError(f"'{target}' has no function '{attribute}'", f"name the function that provides the {purpose}")
    return function


def _import_module(target: str) -> Any:
    """Import as `python -m` would: a module in the current folder is found even from the console script."""
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if here in sys.path or "" in sys.path or (exc.name or "").split(".")[0] != target.split(".")[0]:
            raise
        sys.path.insert(0, here)
        try:
            return importlib.import_module(target)
        except ImportError:
            sys.path.remove(here)
            raise


class CallableReader:
    """Feeds yielded by a user function; one that requires an argument gets the model's input specs."""

    def __init__(
        self, reference: str, specs: list[InputSpec], num_samples: int | None, purpose: str = "calibration data"
    ) -> None:
        self.function = load_callable(reference, purpose)
        self.reference, self.specs, self.num_samples = reference, specs, num_samples

    def __iter__(self) -> Iterator[Feeds]:
        required = [
            p
            for p in inspect.signature(self.function).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        takes_specs = len(required) >= 1  # a function with only defaulted parameters is called bare
        batches = self.function(self.specs) if takes_specs else self.function()
        yield from limit(self._checked(batches), self.specs, self.num_samples, f"{self.reference} yielded no samples")

    def _checked(self, batches: Iterable[Any]) -> Iterator[Feeds]:
        where = Path(self.reference)
        for feeds in batches:
            if not isinstance(feeds, dict):
                raise UsageError(
                    f"{self.reference} yielded a {type(feeds).__name__}", "yield dicts {input_name: array}"
                )
            missing = [s.name for s in self.specs if s.name not in feeds]
            if missing:
                raise UsageError(
                    f"{self.reference} yielded no array for model input '{missing[0]}'",
                    "key each array by the model's input name",
                )
            arrays = {s.name: np.asarray(feeds[s.name]) for s in self.specs}
            extras = {k: np.asarray(v) for k, v in feeds.items() if k not in arrays}
            yield from arrange(arrays, self.specs, where, extras)
