"""Built-in task metrics for `validate.metric` / `onnxq validate --metric onnxq.metrics:NAME`.

A task metric gets, per batch, the float model's outputs, the quantized model's outputs (dicts by output
name) and the batch itself, and returns a score where higher is better; validation reports the
sample-weighted mean. Write your own the same way (`mypackage.metrics:decoded_strings_agree`).
"""

from __future__ import annotations

import numpy as np


def _first(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(next(iter(outputs.values())))


def top1_agreement(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray], batch: dict) -> float:
    """Share of rows (last axis = classes) where both models pick the same class."""
    ref, test = _first(reference), _first(quantized)
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(test, axis=-1)))


def accuracy(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray], batch: dict) -> float:
    """Label accuracy of the quantized model (labels under `label` in the data)."""
    labels = np.asarray(batch["label"]).reshape(-1)
    return float(np.mean(np.argmax(_first(quantized).reshape(len(labels), -1), axis=-1) == labels))
