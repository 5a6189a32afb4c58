"""The JSON report: what ran, what it cost, what it changed, how accurate the result is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Atomic write, like models: a reader never sees half a report."""
    from onnxq.outputs import write_text

    return write_text(Path(path), json.dumps(report, indent=2, sort_keys=False, default=str))
