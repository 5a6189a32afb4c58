"""Registry of passes, filled from the `onnxq.passes` entry-point group.

Built-in passes register through the same group as third-party plugins (see pyproject.toml), so a
plugin is a package with one entry point, never an edit to a dict in onnxq.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING

from onnxq.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from onnxq.pass_base import Pass

GROUP = "onnxq.passes"


@cache
def _entry_points() -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if not found:
        raise RuntimeError(
            "no onnxq passes are registered; onnxq is not installed: run `pip install -e .` in the repository"
        )
    return found


def names() -> list[str]:
    return sorted(_entry_points())


def get(name: str, path: str = "passes") -> type[Pass]:
    """The pass class registered as `name`; a RecipeError with a suggestion when unknown."""
    eps = _entry_points()
    if name not in eps:
        raise RecipeError(path, f"unknown pass '{name}'", did_you_mean(name, eps))
    cls = eps[name].load()
    if not getattr(cls, "name", None):  # a plugin that did not set it is known by its entry point
        cls.name = name
    return cls
