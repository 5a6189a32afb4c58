"""Errors a user can act on: each carries the problem and the fix, printed as one line by the CLI."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class OnnxqError(Exception):
    """Base class: `str(err)` is the one line shown to the user. Exit code 2 unless overridden."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


class UsageError(OnnxqError):
    """Bad input from the user: a path, a recipe, calibration data."""


class RecipeError(UsageError):
    """A recipe that does not validate; `path` is the key path inside the recipe."""

    def __init__(self, path: str, problem: str, fix: str | None = None) -> None:
        self.path = path
        super().__init__(f"recipe error at '{path}': {problem}" if path else f"recipe error: {problem}", fix)


class GateFailure(OnnxqError):
    """Validation gates failed: the model was written, but it is not good enough. `result` carries
    the run's Result so callers can still show what was measured."""

    exit_code = 3
    result: object | None = None


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt `word` most likely meant, if any is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The fix text for a misspelt name, or a list of what is allowed when nothing is close."""
    choices = sorted(set(choices))
    close = closest(word, choices)
    if close:
        return f"did you mean '{close}'?"
    if choices:
        shown = ", ".join(choices[:12]) + (", …" if len(choices) > 12 else "")
        return f"choose one of: {shown}"
    return None


def __getattr__(name: str) -> Any:
    # MissingPrerequisite subclasses onnx-ir's PreconditionError (onnx-ir's PassManager re-raises it as is,
    # with our message); made on first use so that importing the errors, as the CLI does, stays fast.
    if name == "MissingPrerequisite":
        from onnx_ir.passes import PreconditionError

        cls = type(
            "MissingPrerequisite",
            (OnnxqError, PreconditionError),
            {"__doc__": "A pass's `requires()` failed.", "__module__": __name__},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
