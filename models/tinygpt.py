"""tinygpt: a small byte-level language model, so that perplexity can score weight-only int4/int8 quantization.

Classifiers and embedders hide weight error behind an argmax or a cosine; a language model's perplexity
moves with every logit, which is what block-wise int4 weights disturb.  ``models/tinygpt_train.py``
(torch, build time only) trains a GPT-style decoder on Python standard-library sources and commits
``models/tinygpt/tinygpt.onnx`` together with two held-out texts (files it never trained on):
``eval.txt`` for the metric and ``calib.txt`` for calibration.  Both are committed so that the numbers do
not depend on which Python, and so which stdlib, a machine has.  This module needs numpy and onnxruntime only.

Graph: input ``input_ids`` (int64 [batch, sequence], sequence ≤ 128, byte values 0..255); output
``logits`` (float32 [batch, sequence, 256]), position t predicting byte t + 1 (causal).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

HERE = Path(__file__).resolve().parent / "tinygpt"
MODEL_PATH = HERE / "tinygpt.onnx"
EVAL_PATH = HERE / "eval.txt"
CALIB_PATH = HERE / "calib.txt"
TRAIN_CMD = ".venv-build/bin/python models/tinygpt_train.py"
VOCAB = 256  # one token per byte: no vocabulary file, and any text encodes
MAX_CONTEXT = 128  # learned position embeddings stop here
INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"

Feed = dict[str, np.ndarray]


def encode(text: str | bytes) -> np.ndarray:
    """Token ids of ``text``: its UTF-8 bytes as int64 (the model's whole tokenizer)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def decode(ids: np.ndarray) -> str:
    """Text of token ids; bytes that end mid-character become U+FFFD rather than an error."""
    return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def eval_text() -> bytes:
    """The committed held-out evaluation text, as bytes (read raw: no newline translation on any OS)."""
    return EVAL_PATH.read_bytes()


def calib_text() -> bytes:
    """The committed held-out calibration text (other files than ``eval.txt``'s)."""
    return CALIB_PATH.read_bytes()


def make_windows(text: str | bytes, seq_len: int = MAX_CONTEXT, n: int = 64) -> np.ndarray:
    """``n`` windows of ``seq_len`` token ids spread evenly over ``text``: int64 [n, seq_len].

    Evenly spaced starts (not random ones) make the same windows on every machine and cover the whole
    text; they do not overlap while ``n * seq_len`` fits in it.
    """
    if not 2 <= seq_len <= MAX_CONTEXT:
        raise ValueError(f"seq_len {seq_len}: must be in 2..{MAX_CONTEXT} (the model's context)")
    ids = encode(text)
    if len(ids) < seq_len or n < 1:
        raise ValueError(f"cannot cut {n} windows of {seq_len} tokens from {len(ids)} tokens")
    starts = np.linspace(0, len(ids) - seq_len, n).round().astype(np.int64)
    return np.stack([ids[s : s + seq_len] for s in starts])


def calibration_feeds(n: int = 32, seq_len: int = MAX_CONTEXT) -> list[Feed]:
    """``n`` feeds ``{"input_ids": int64 [1, seq_len]}`` cut from ``calib.txt``, one window each."""
    return [{INPUT_NAME: w[None, :]} for w in make_windows(calib_text(), seq_len, n)]


def session(model: str | Path | bytes) -> ort.InferenceSession:
    """A CPU onnxruntime session on a model file (or serialized bytes), warnings muted."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def log_likelihoods(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Log-probability of each next token: logits [B, T, V] and ids [B, T] give [B, T - 1] (float64).

    A log-softmax with the row maximum subtracted first, so large logits cannot overflow exp.
    """
    z = logits[:, :-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return np.take_along_axis(z, ids[:, 1:, None], axis=-1)[..., 0] - log_norm


def perplexity(model: str | Path | bytes | ort.InferenceSession, windows: np.ndarray, batch: int = 16) -> float:
    """exp(mean next-token cross-entropy) over every position of every window (int64 [n, T]).

    Uniform guessing over bytes scores 256; lower is better.  Batched runs give the same logits as one
    window at a time (nothing is padded), so batching only saves time.
    """
    sess = session(model) if isinstance(model, (str, Path, bytes)) else model
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, T] with T >= 2, got shape {windows.shape}")
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        (logits,) = sess.run([OUTPUT_NAME], {INPUT_NAME: ids})
        ll = log_likelihoods(logits, ids)
        total -= float(ll.sum())
        count += ll.size
    return float(np.exp(total / count))
