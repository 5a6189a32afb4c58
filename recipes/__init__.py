"""Built-in recipes, installed as the data package `onnxq.recipes`; `onnxq run M --recipe int8` finds them."""

from __future__ import annotations

import re
from importlib import resources


def descriptions() -> dict[str, str]:
    """Each built-in recipe's one-line `description:`, read without a YAML parser (the CLI's --help uses it);
    `auto` is the search above the recipes (onnxq/auto.py), not a YAML file."""
    found = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            match = re.search(r"^description:\s*(.+)$", entry.read_text(encoding="utf-8"), re.MULTILINE)
            found[entry.name[:-5]] = match.group(1).strip() if match else ""
    found["auto"] = "search: int8 with each range method, int8-tuned, then mixed; the fastest meeting the gates"
    return dict(sorted(found.items()))
