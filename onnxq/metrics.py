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


def _ctc_decode(logits: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC: best class per step, repeats merged, blanks dropped; one sequence per row."""
    best = np.argmax(logits, axis=-1).reshape(logits.shape[0], -1)
    out = []
    for row in best:
        keep = np.ones(row.shape, bool)
        keep[1:] = row[1:] != row[:-1]
        out.append(tuple(int(c) for c in row[keep] if c != blank))
    return out


def ctc_agreement(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray], batch: dict) -> float:
    """Share of lines whose greedy CTC decoding (class 0 = blank, as in PaddleOCR and most CRNNs) is
    identical in both models: the text-recognition metric that logits SQNR only approximates."""
    ref, test = _ctc_decode(_first(reference)), _ctc_decode(_first(quantized))
    return float(np.mean([a == b for a, b in zip(ref, test, strict=True)]))
