"""Real inputs and task metrics for the PP-OCR models in :mod:`models.zoo`.

Inputs are made the way rapidocr-onnxruntime 1.4.4 preprocesses them, so calibration and validation see
what the models see in production:

* det: BGR image (rapidocr reads with cv2), side a multiple of 32, ``(x / 255 - 0.5) / 0.5`` (its
  mean = std = 0.5), CHW.
* rec: text-line crop resized to height 48 keeping its aspect ratio (width ``ceil(48 * w / h)``, capped at
  the batch width), same normalisation, zero padding on the right.
* cls: as rec, at 3x48x192.

Pictures are scikit-image's bundled photos with text drawn on them, and text-line crops rendered with the
DejaVu fonts; the words come from Python standard-library docstrings, so lines look like real prose.
Everything is deterministic for a given seed (and Python / Pillow / scikit-image version).

The metrics compare a quantized model with the fp32 one on the task's own terms: decoded strings for rec,
direction accuracy for cls, text boxes for det.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models import zoo

if TYPE_CHECKING:
    import onnxruntime as ort

Rng = np.random.Generator
BILINEAR = Image.Resampling.BILINEAR  # what cv2.resize does by default
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
REC_HEIGHT = 48
CLS_SHAPE = (3, 48, 192)
DET_THRESH = 0.3  # rapidocr DBPostProcess defaults
DET_BOX_THRESH = 0.5
DET_UNCLIP = 1.6

# Modules whose docstrings are long, plain English prose; the order fixes the corpus, hence the lines.
_CORPUS_MODULES = (
    "argparse", "calendar", "collections", "csv", "datetime", "decimal", "difflib", "email.message",
    "fractions", "functools", "heapq", "http.client", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "unittest", "urllib.parse", "zipfile",
)  # fmt: skip
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'.,;:!?()%&/\-]{0,17}")


# ----------------------------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """Words of the stdlib docstrings in reading order; only plain tokens, so lines are prose not code."""
    words: list[str] = []
    seen: set[str] = set()
    for modname in _CORPUS_MODULES:
        mod = importlib.import_module(modname)
        members = sorted((k, v) for k, v in vars(mod).items() if not k.startswith("_"))
        docs = [mod.__doc__] + [getattr(v, "__doc__", None) for _, v in members]
        for doc in docs:
            if not isinstance(doc, str) or doc in seen:
                continue
            seen.add(doc)
            words.extend(t for t in doc.split() if _WORD.fullmatch(t) and t.isascii())
    return tuple(words)


def text_lines(n: int, seed: int = 0, max_words: int = 5) -> list[str]:
    """``n`` runs of 1..max_words consecutive words from standard-library docstrings."""
    words = _corpus()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_words + 1))
        start = int(rng.integers(0, len(words) - k))
        out.append(" ".join(words[start : start + k]))
    return out


@functools.lru_cache(maxsize=1)
def _font_files() -> tuple[str, ...]:
    """DejaVu faces (sans, serif, mono, condensed, bold, italic, light); the math font has no Latin text."""
    files = sorted(str(p) for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name)
    if not files:
        raise RuntimeError(f"no DejaVu fonts in {FONT_DIR}; install fonts-dejavu-core")
    return tuple(files)


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: no dependence on whether libraqm is present, so renders match across machines.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _random_font(rng: Rng, lo: int, hi: int) -> ImageFont.FreeTypeFont:
    files = _font_files()
    return _font(files[int(rng.integers(len(files)))], int(rng.integers(lo, hi + 1)))


def _render_line(text: str, rng: Rng, max_ratio: float | None = None) -> tuple[np.ndarray, str]:
    """RGB uint8 crop of one dark-on-light text line with a detector-like margin around it, and its text.

    With ``max_ratio`` trailing words are dropped until width / height fits, so the line is not squeezed
    when padded to a fixed width (a single over-long word is kept and squeezed, as rapidocr would).
    """
    font = _random_font(rng, 18, 40)
    size = font.size
    pad_y = [int(rng.uniform(0.1, 0.35) * size) for _ in range(2)]
    pad_x = [int(rng.uniform(0.15, 0.6) * size) for _ in range(2)]
    words = text.split()
    while True:
        x0, y0, x1, y1 = font.getbbox(" ".join(words))
        w, h = x1 - x0 + sum(pad_x), y1 - y0 + sum(pad_y)
        if max_ratio is None or w / h <= max_ratio or len(words) == 1:
            break
        words = words[:-1]
    bg = rng.integers(185, 256) - rng.integers(0, 25, size=3)  # light, slightly tinted paper
    grad = np.linspace(0, rng.uniform(-25, 25), w)[None, :, None]
    img = np.clip(bg[None, None, :] + grad + rng.normal(0, rng.uniform(0, 6), (h, w, 3)), 0, 255)
    pil = Image.fromarray(img.astype(np.uint8))
    ink = tuple(int(c) for c in rng.integers(0, 80, size=3))
    text = " ".join(words)
    ImageDraw.Draw(pil).text((pad_x[0] - x0, pad_y[0] - y0), text, font=font, fill=ink)
    return np.asarray(pil), text


def _norm_line(img: np.ndarray, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height 48, width ceil(48 * w / h) capped at ``width``, right zero pad."""
    h, w = img.shape[:2]
    resized_w = min(width, math.ceil(REC_HEIGHT * w / h))
    resized = Image.fromarray(img).resize((resized_w, REC_HEIGHT), BILINEAR)
    out = np.zeros((3, REC_HEIGHT, width), np.float32)
    out[:, :, :resized_w] = _normalize(np.asarray(resized))
    return out


def _normalize(rgb: np.ndarray) -> np.ndarray:
    """HWC RGB uint8 -> CHW BGR float32 in [-1, 1], as rapidocr does on cv2 (BGR) images."""
    return (rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) / 0.5


def rec_inputs(n: int, seed: int = 0, width: int = 320) -> np.ndarray:
    """[n, 3, 48, width] float32 rendered text lines, preprocessed as rapidocr's TextRecognizer."""
    return np.stack(_rec_batch(n, seed, width)[0])


def _rec_batch(n: int, seed: int, width: int) -> tuple[list[np.ndarray], list[str]]:
    """Preprocessed lines and the text actually drawn on each."""
    rng = np.random.default_rng([seed, 1])
    arrays, texts = [], []
    for line in text_lines(n, seed):
        img, text = _render_line(line, rng, max_ratio=width / REC_HEIGHT)
        arrays.append(_norm_line(img, width))
        texts.append(text)
    return arrays, texts


def cls_inputs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, 3, 48, 192] text lines, half upright (label 0) and half rotated 180 degrees (label 1)."""
    rng = np.random.default_rng([seed, 2])
    labels = rng.permutation(np.arange(n) % 2).astype(np.int64)
    lines = text_lines(n, seed + 7919, max_words=4)  # different lines from rec_inputs(seed)
    xs = []
    for text, label in zip(lines, labels, strict=True):
        img, _ = _render_line(text, rng, max_ratio=1.5 * CLS_SHAPE[2] / CLS_SHAPE[1])
        xs.append(_norm_line(img[::-1, ::-1] if label else img, CLS_SHAPE[2]))
    return np.stack(xs), labels


# ----------------------------------------------------------------------------------------------- det


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-image photos bundled in the wheel (no pooch download); grey ones made RGB."""
    from skimage import data

    colour = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(), data.immunohistochemistry(),
              data.hubble_deep_field(), data.retina(), data.stereo_motorcycle()[0]]  # fmt: skip
    grey = [data.camera(), data.brick(), data.grass(), data.gravel(), data.moon(), data.coins(), data.clock()]
    return tuple(colour + [np.repeat(g[:, :, None], 3, axis=2) for g in grey])


def det_samples(n: int, size: int = 480, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """RGB uint8 [n, size, size, 3] photos with text drawn on them, and each one's drawn text boxes
    [k, 4] (x0, y0, x1, y1) - the ground truth that proves the detector sees the text."""
    if size % 32:
        raise ValueError(f"det size must be a multiple of 32 (network stride), got {size}")
    photos = _photos()
    rng = np.random.default_rng([seed, 3])
    order: list[int] = []
    images, boxes = [], []
    for _ in range(n):
        if not order:  # every photo once per round, in a fresh order, so n may exceed the photo count
            order = list(rng.permutation(len(photos)))
        photo = photos[order.pop()]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.45, 1.0) * min(h, w))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        b = _draw_text(crop, rng, int(rng.integers(3, 9)))
        images.append(np.asarray(crop))
        boxes.append(b)
    return np.stack(images), boxes


def _draw_text(img: Image.Image, rng: Rng, k: int) -> np.ndarray:
    """Draw up to ``k`` non-overlapping lines in colours that contrast with what lies under them."""
    size = img.size[0]
    grey = np.asarray(img.convert("L"), np.float32)
    draw = ImageDraw.Draw(img)
    done: list[tuple[int, int, int, int]] = []  # boxes placed so far
    for text in text_lines(k, int(rng.integers(2**31)), max_words=4):
        font = _random_font(rng, max(14, size // 24), max(18, size // 9))
        bx0, by0, bx1, by1 = font.getbbox(text)
        tw, th = bx1 - bx0, by1 - by0
        if tw >= size - 8:
            continue
        for _ in range(20):  # a few tries for a free spot; gaps keep the boxes apart for the F1 metric
            x, y = int(rng.integers(4, size - tw - 3)), int(rng.integers(4, size - th - 3))
            g = th // 2 + 4  # gap
            if all(x > q[2] + g or x + tw < q[0] - g or y > q[3] + g or y + th < q[1] - g for q in done):
                break
        else:
            continue
        under, busy = grey[y : y + th, x : x + tw].mean(), grey[y : y + th, x : x + tw].std() > 35
        ink = rng.integers(0, 60, size=3) if under > 128 else rng.integers(200, 256, size=3)
        if rng.random() < 0.3:  # some saturated colour, kept only if it still contrasts with the photo
            tint = ink.copy()
            tint[int(rng.integers(3))] = 255 - tint[int(rng.integers(3))]
            if abs(float(tint @ np.array([0.299, 0.587, 0.114])) - under) > 90:
                ink = tint
        stroke = int(busy or rng.random() < 0.15) * max(1, font.size // 16)  # halo on textured photos
        halo = (255, 255, 255) if under <= 128 else (0, 0, 0)
        fill = tuple(int(c) for c in ink)
        draw.text((x - bx0, y - by0), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=halo)
        done.append((x, y, x + tw, y + th))
    return np.array(done, np.float32).reshape(-1, 4)


def det_inputs(n: int, size: int = 480, seed: int = 0) -> np.ndarray:
    """[n, 3, size, size] float32: :func:`det_samples` images preprocessed as rapidocr's TextDetector."""
    images, _ = det_samples(n, size, seed)
    return np.stack([_normalize(im) for im in images])


# ----------------------------------------------------------------------------------------------- metrics


def ctc_greedy_decode(logits: np.ndarray) -> list[tuple[int, ...]]:
    """Greedy CTC on rec output [n, T, C]: argmax per step, merge repeats, drop blank (class 0)."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"expected rec output [n, T, C], got shape {logits.shape}")
    idx = logits.argmax(axis=2)
    keep = idx != 0
    keep[:, 1:] &= idx[:, 1:] != idx[:, :-1]
    return [tuple(int(c) for c in row[k]) for row, k in zip(idx, keep, strict=True)]


def _decoded_pair(
    fp_logits: np.ndarray, q_logits: np.ndarray, strip: bool
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Both models' class sequences, optionally without leading/trailing spaces.

    The space is the last class (rapidocr's CTCLabelDecode appends it).  Whether the margin of a crop
    reads as a space flips on tiny output changes and is invisible in the text, so by default it is not
    counted as a disagreement.
    """
    if fp_logits.shape != q_logits.shape:
        raise ValueError(f"rec output shapes differ: {fp_logits.shape} vs {q_logits.shape}")
    fp, q = ctc_greedy_decode(fp_logits), ctc_greedy_decode(q_logits)
    if strip:
        space = fp_logits.shape[2] - 1
        fp, q = [_strip(s, space) for s in fp], [_strip(s, space) for s in q]
    return fp, q


def _strip(seq: tuple[int, ...], space: int) -> tuple[int, ...]:
    lo, hi = 0, len(seq)
    while lo < hi and seq[lo] == space:
        lo += 1
    while hi > lo and seq[hi - 1] == space:
        hi -= 1
    return seq[lo:hi]


def rec_string_agreement(fp_logits: np.ndarray, q_logits: np.ndarray, strip: bool = True) -> float:
    """Fraction of lines whose decoded class sequences are identical (exact string match); the headline
    rec metric.  ``strip`` ignores spaces at the line ends (see :func:`_decoded_pair`)."""
    fp, q = _decoded_pair(fp_logits, q_logits, strip)
    return sum(a == b for a, b in zip(fp, q, strict=True)) / max(1, len(fp))


def rec_char_agreement(fp_logits: np.ndarray, q_logits: np.ndarray, strip: bool = True) -> float:
    """1 - (total edit distance / total fp32 length): a softer rec metric that still moves when a few
    characters change, where the exact-match rate only counts whole lines."""
    fp, q = _decoded_pair(fp_logits, q_logits, strip)
    dist = sum(_edit_distance(a, b) for a, b in zip(fp, q, strict=True))
    return 1.0 - dist / max(1, sum(map(len, fp)))


def _edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance; lines are short (at most width / 8 classes), so the quadratic DP is fine."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@functools.lru_cache(maxsize=1)
def rec_charset(cache_dir: Path | None = None) -> tuple[str, ...]:
    """Class index -> character for the rec model: blank (""), the model's keys, then a space."""
    keys = zoo.fetch_rec_keys(cache_dir).read_text(encoding="utf-8").splitlines()
    return ("", *keys, " ")


def decode_text(seqs: Sequence[Sequence[int]], charset: Sequence[str] | None = None) -> list[str]:
    """Class sequences from :func:`ctc_greedy_decode` as strings (for eyeballing, not for the metric)."""
    chars = charset if charset is not None else rec_charset()
    return ["".join(chars[c] for c in s) for s in seqs]


def cls_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of lines whose argmax class equals the label."""
    return float(np.mean(np.asarray(logits).reshape(len(labels), -1).argmax(axis=1) == labels))


def det_boxes(
    prob_map: np.ndarray,
    thresh: float = DET_THRESH,
    min_area: int = 16,
    box_thresh: float = DET_BOX_THRESH,
    unclip_ratio: float = DET_UNCLIP,
) -> np.ndarray:
    """Axis-aligned text boxes [k, 4] (x0, y0, x1, y1) from one DB probability map [H, W] (or [1, 1, H, W]).

    A simplified rapidocr DBPostProcess: binarise at ``thresh``, dilate 2x2, 8-connected components,
    drop tiny ones and those whose mean probability is below ``box_thresh``, then grow each box by
    area * unclip_ratio / perimeter, since DB predicts shrunk text kernels.
    """
    from scipy import ndimage

    prob = np.asarray(prob_map, np.float32).squeeze()
    if prob.ndim != 2:
        raise ValueError(f"expected one probability map [H, W], got shape {np.shape(prob_map)}")
    bitmap = ndimage.binary_dilation(prob > thresh, structure=np.ones((2, 2), bool))
    labels, count = ndimage.label(bitmap, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if areas[i] < min_area or min(h, w) < 3 or prob[sl].mean() < box_thresh:
            continue
        d = w * h * unclip_ratio / (2 * (w + h))
        out.append((max(0.0, sl[1].start - d), max(0.0, sl[0].start - d),
                    min(prob.shape[1], sl[1].stop + d), min(prob.shape[0], sl[0].stop + d)))  # fmt: skip
    return np.array(out, np.float32).reshape(-1, 4)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of x0, y0, x1, y1 boxes."""
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    return inter / np.maximum(_area(a)[:, None] + _area(b)[None, :] - inter, 1e-9)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def match_boxes(pred: np.ndarray, ref: np.ndarray, iou: float = 0.5) -> int:
    """Number of one-to-one matches with IoU >= ``iou``, taking the best remaining pair first."""
    m = box_iou(pred, ref)
    hits = 0
    while m.size and m.max() >= iou:
        i, j = np.unravel_index(m.argmax(), m.shape)
        m[i, :] = -1
        m[:, j] = -1
        hits += 1
    return hits


def det_box_f1(fp_map: np.ndarray, q_map: np.ndarray, iou: float = 0.5) -> float:
    """F1 of the quantized model's boxes against the fp32 model's, pooled over the batch [n, 1, H, W].

    1.0 when both find no boxes at all.
    """
    fp_map, q_map = np.asarray(fp_map), np.asarray(q_map)
    if fp_map.shape != q_map.shape:
        raise ValueError(f"map shapes differ: {fp_map.shape} vs {q_map.shape}")
    hits = n_fp = n_q = 0
    hw = fp_map.shape[-2:]
    for f, q in zip(fp_map.reshape(-1, *hw), q_map.reshape(-1, *hw), strict=True):
        bf, bq = det_boxes(f), det_boxes(q)
        hits += match_boxes(bq, bf, iou)
        n_fp += len(bf)
        n_q += len(bq)
    return 1.0 if n_fp + n_q == 0 else 2 * hits / (n_fp + n_q)


# ----------------------------------------------------------------------------------------------- files


def input_name(name: str, cache_dir: Path | None = None) -> str:
    """The model's (single) graph input name."""
    import onnx

    return onnx.load(zoo.fetch(name, cache_dir), load_external_data=False).graph.input[0].name


def make_inputs(name: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What :func:`make_npz` writes: {graph input name: inputs}, plus "label" for ppocr_cls."""
    if name == "ppocr_det":
        x, extra = det_inputs(n, seed=seed), {}
    elif name == "ppocr_rec":
        x, extra = rec_inputs(n, seed=seed), {}
    elif name == "ppocr_cls":
        x, labels = cls_inputs(n, seed=seed)
        extra = {"label": labels}
    else:
        raise KeyError(f"no inputs for {name!r}; known: {', '.join(zoo.ZOO)}")
    return {input_name(name): x, **extra}


def make_npz(name: str, n: int, path: Path, seed: int = 0) -> Path:
    """Write :func:`make_inputs` to ``path`` (uncompressed .npz, written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = make_inputs(name, n, seed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ----------------------------------------------------------------------------------------------- check


def _session(name: str, threads: int = 1) -> ort.InferenceSession:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(zoo.fetch(name)), so, providers=["CPUExecutionProvider"])


def check(n: int = 16, seed: int = 0) -> None:
    """Run the fp32 models on the inputs and print what proves the preprocessing right."""
    det, rec, cls = _session("ppocr_det"), _session("ppocr_rec"), _session("ppocr_cls")

    images, gt = det_samples(n, seed=seed)
    x = np.stack([_normalize(im) for im in images])
    t0 = time.perf_counter()
    key = det.get_inputs()[0].name
    maps = np.concatenate([det.run(None, {key: x[i : i + 1]})[0] for i in range(n)])
    dt = (time.perf_counter() - t0) / n
    found = [det_boxes(m) for m in maps]
    recall = sum(match_boxes(f, g, 0.5) for f, g in zip(found, gt, strict=True)) / max(1, sum(map(len, gt)))
    n_found, n_gt = sum(map(len, found)), sum(map(len, gt))
    print(f"det: {n_found} boxes found, {n_gt} lines drawn, recall@0.5 {recall:.2f}; {dt * 1e3:.0f} ms/image")

    xs, lines = _rec_batch(n, seed, 320)
    t0 = time.perf_counter()
    key = rec.get_inputs()[0].name
    out = np.concatenate([rec.run(None, {key: xi[None]})[0] for xi in xs])
    dt = (time.perf_counter() - t0) / n
    got = decode_text(ctc_greedy_decode(out))
    exact = np.mean([g.strip() == t for g, t in zip(got, lines, strict=True)])
    print(f"rec: output {out.shape}, exact-match vs drawn text {exact:.2f}; {dt * 1e3:.0f} ms/line at 48x320")
    for g, t in list(zip(got, lines, strict=True))[:8]:
        print(f"  {t!r:40} -> {g!r}")

    xc, labels = cls_inputs(n, seed)
    t0 = time.perf_counter()
    key = cls.get_inputs()[0].name
    out = np.concatenate([cls.run(None, {key: xi[None]})[0] for xi in xc])
    dt = (time.perf_counter() - t0) / n
    print(f"cls: accuracy {cls_accuracy(out, labels):.2f} on {n} lines; {dt * 1e3:.1f} ms/line at 48x192")


def main(argv: Sequence[str] | None = None) -> int:
    """``npz NAME N PATH [--seed S]`` writes inputs; ``check [--n N]`` verifies them on the fp32 models."""
    ap = argparse.ArgumentParser(prog="python -m models.ppocr", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("npz", help="write an input .npz for one model")
    p.add_argument("name", choices=list(zoo.ZOO))
    p.add_argument("n", type=int)
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("check", help="run the fp32 models on the inputs, print sanity numbers")
    c.add_argument("--n", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "npz":
        print(make_npz(args.name, args.n, args.path, args.seed))
    else:
        check(args.n, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def rec_agreement_metric(reference: dict[str, np.ndarray], quantized: dict[str, np.ndarray], batch: dict) -> float:
    """:func:`rec_string_agreement` as an onnxq task metric (`--metric models.ppocr:rec_agreement_metric`)."""
    ref, test = next(iter(reference.values())), next(iter(quantized.values()))
    return rec_string_agreement(np.asarray(ref), np.asarray(test))
