"""Train and export models/tinygpt/tinygpt.onnx, a byte-level GPT on Python stdlib sources (torch venv only).

Weight-only int4/int8 quantization needs a model whose quality is a number that every weight moves: a
language model's perplexity.  No hub can be reached here, so we train a small one ourselves on the one real
text corpus every machine has, the Python standard library's ``.py`` sources.  Run once, in the build venv
(torch CPU, onnx, onnxscript, onnxruntime; two threads, about six minutes)::

    .venv-build/bin/python models/tinygpt_train.py

Data: the stdlib's ``.py`` files outside tests, GUI, vendored and generated code, in sorted order.  Files at
even positions are the training text (about 4 MB); positions 7 and 15 (mod 16) are held out, whole files,
and the first few KB of each make ``eval.txt`` and ``calib.txt`` (each ≤ 64 kB).  Those two are committed,
so evaluation does not depend on the Python a machine has; the training text is not (rebuilt on demand).

Model: decoder-only transformer, byte vocabulary 256, d_model 128, 4 layers of 4 heads, FFN 512 (GELU),
pre-LayerNorm, learned positions, context 128, untied lm_head.  Every Linear exports as MatMul (+ Add): the
reduction dims are 128 or 512, multiples of the int4 block sizes 32 and 128.  Attention is written out
(MatMul, Softmax, MatMul, no SDPA), and the causal mask is a Where with -1e4, not -inf: finite in fp16 and
in a static quantizer's range, and still exactly zero after Softmax.

Export: the torch.export-based exporter at opset 17 (LayerNormalization is one op), dynamic batch and
sequence axes, weights inside the file, MatMuls and weights named after their torch modules, IR version
lowered to 8 (what opset 17 came with; onnxruntime 1.31 refuses onnx 1.23's default stamp).  Files are
written atomically and only after the graph passes ``onnx.checker`` (full check) and onnxruntime's logits
match PyTorch's, in several batch and sequence shapes.
"""

from __future__ import annotations

import argparse
import collections
import math
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `models` importable

from models import tinygpt
from models.zoo import write_atomically

SEED = 0
OPSET = 17
IR_VERSION = 8
D_MODEL, N_LAYERS, N_HEADS, D_FFN = 128, 4, 4, 512
CONTEXT = tinygpt.MAX_CONTEXT
STEPS, BATCH = 1300, 32  # ~0.25 s a step on 2 idle cores: 5 to 6 minutes
LR, MIN_LR, WARMUP, WEIGHT_DECAY = 2e-3, 1e-4, 100, 0.1
HOLDOUT_CHARS = 64_000  # eval.txt and calib.txt: each at most this many bytes
HOLDOUT_CHUNK = 8_000  # bytes taken from the start of each held-out file: more files, more variety
N_EVAL = 256  # eval windows of CONTEXT bytes; 256 x 128 < 64 000, so they do not overlap
MAX_ABS_DIFF = 1e-3  # fp32 export vs torch; an export bug shows up orders of magnitude above this
MAX_EVAL_PPL = 8.0  # refuse to write a model that has not learned (uniform is 256)
MAX_FILE_BYTES = 5 * 2**20
MASK_VALUE = -1e4
# stdlib folders that are not ordinary library code: tests, GUI, vendored/generated tables, installers
SKIP_DIRS = frozenset(
    (
        "test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "lib2to3", "idlelib",
        "turtledemo", "tkinter", "distutils", "ensurepip", "__pycache__", "__phello__",
    )
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ data


def stdlib_files() -> list[Path]:
    """The stdlib's ``.py`` files (ordinary library code only) in sorted order, so the split is reproducible."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & SKIP_DIRS or rel.parts[0].startswith("config-") or rel.name.startswith("_sysconfig"):
            continue
        files.append(path)
    if len(files) < 100:
        raise RuntimeError(f"only {len(files)} stdlib sources under {root}: not a full Python install?")
    return files


def _read(path: Path) -> bytes:
    """File bytes with CRLF normalised; files that are not UTF-8 are skipped (empty)."""
    data = path.read_bytes().replace(b"\r\n", b"\n")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return b""
    return data


def _holdout_text(files: Sequence[Path]) -> bytes:
    """The first HOLDOUT_CHUNK bytes of each file (whole lines), joined, cut at a line end ≤ HOLDOUT_CHARS."""
    parts, size = [], 0
    for path in files:
        data = _read(path)[:HOLDOUT_CHUNK]
        data = data[: data.rfind(b"\n") + 1]
        parts.append(data)
        size += len(data)
        if size >= HOLDOUT_CHARS:
            break
    text = b"".join(parts)[:HOLDOUT_CHARS]
    text = text[: text.rfind(b"\n") + 1]
    if len(text) < HOLDOUT_CHARS // 2:
        raise RuntimeError(f"held-out text only {len(text)} bytes")
    text.decode("utf-8")  # cut at a newline, so still whole characters
    return text


def corpus() -> tuple[bytes, bytes, bytes, dict[str, int]]:
    """Train, eval and calibration text, held out by file: even positions train, 7 and 15 (mod 16) are held out."""
    files = stdlib_files()
    train_files = files[0::2]
    eval_files = [f for i, f in enumerate(files) if i % 16 == 7]
    calib_files = [f for i, f in enumerate(files) if i % 16 == 15]
    assert not set(train_files) & (set(eval_files) | set(calib_files))
    train = b"\n".join(_read(f) for f in train_files)
    stats = {"files": len(files), "train files": len(train_files), "held-out files": len(eval_files + calib_files)}
    return train, _holdout_text(eval_files), _holdout_text(calib_files), stats


# ----------------------------------------------------------------------------------------------- model


class Attention(nn.Module):
    """Causal multi-head self-attention written out, so that it exports as MatMul / Softmax / MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(D_MODEL, D_MODEL)
        self.key = nn.Linear(D_MODEL, D_MODEL)
        self.value = nn.Linear(D_MODEL, D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        """``future`` [T, T] is True where a key comes after its query (shared by all layers: one mask in the graph)."""
        q, k, v = (proj(x).unflatten(-1, (N_HEADS, -1)).transpose(1, 2) for proj in (self.query, self.key, self.value))
        scores = (q @ k.transpose(-2, -1)) * (D_MODEL // N_HEADS) ** -0.5
        scores = scores.masked_fill(future, MASK_VALUE)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_MODEL, D_FFN)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(D_FFN, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), future)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(tinygpt.VOCAB, D_MODEL)
        self.pos_emb = nn.Embedding(CONTEXT, D_MODEL)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.lm_head = nn.Linear(D_MODEL, tinygpt.VOCAB)
        future = torch.ones(CONTEXT, CONTEXT, dtype=torch.bool).triu(1)
        self.register_buffer("future", future, persistent=False)
        for name, p in self.named_parameters():  # GPT-2 initialisation; residual outputs scaled by depth
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * N_LAYERS) if name.endswith(("out.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb.weight[:t]
        future = self.future[:t, :t]
        for block in self.blocks:
            x = block(x, future)
        return self.lm_head(self.ln_f(x))


# -------------------------------------------------------------------------------------------- training


def train(model: TinyGPT, text: bytes) -> float:
    """AdamW with warm-up and cosine decay on random windows of ``text``; returns the last 50 steps' mean loss."""
    data = torch.from_numpy(tinygpt.encode(text))
    rng = np.random.default_rng(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "emb" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        progress = (step - WARMUP) / max(1, STEPS - WARMUP)
        return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * progress))

    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(STEPS):
        starts = torch.from_numpy(rng.integers(0, len(data) - CONTEXT - 1, BATCH))
        batch = data[starts[:, None] + torch.arange(CONTEXT + 1)]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, tinygpt.VOCAB), batch[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step == 0:
            recent = losses[-100:]
            print(
                f"step {step + 1:5d}  loss {sum(recent) / len(recent):.4f}  lr {lr_at(step):.2e}  "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def torch_perplexity(model: TinyGPT, windows: np.ndarray) -> float:
    """The same metric as :func:`models.tinygpt.perplexity`, computed by PyTorch."""
    ids = torch.from_numpy(windows)
    logits = torch.cat([model(ids[i : i + 64]) for i in range(0, len(ids), 64)])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, tinygpt.VOCAB).double(), ids[:, 1:].reshape(-1))
    return float(torch.exp(loss))


# ---------------------------------------------------------------------------------------------- export


def export(model: TinyGPT) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with dynamic batch/sequence axes, then naming, IR and metadata fix-ups."""
    example = (torch.randint(0, tinygpt.VOCAB, (2, 16), generator=torch.Generator().manual_seed(SEED)),)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=CONTEXT)
    program = torch.onnx.export(
        model, example, None, input_names=[tinygpt.INPUT_NAME], output_names=[tinygpt.OUTPUT_NAME],
        opset_version=OPSET, dynamo=True, external_data=False, optimize=True,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}},
    )  # fmt: skip
    proto = program.model_proto
    opsets = {o.domain: o.version for o in proto.opset_import}
    if opsets.get("", 0) != OPSET:
        raise RuntimeError(f"exporter produced opsets {opsets}, not ai.onnx {OPSET}")
    del proto.functions[:]
    _name_matmuls(proto, model)
    proto.ir_version = IR_VERSION
    proto.graph.name = "tinygpt"
    proto.producer_name = "onnxq-models-tinygpt"
    onnx.helper.set_model_props(
        proto,
        {
            "source": "models/tinygpt_train.py: byte-level GPT trained on Python stdlib sources",
            "exporter": f"torch {torch.__version__} torch.onnx dynamo, opset {OPSET}, eager attention",
            "tokenizer": "UTF-8 bytes, vocab 256 (models.tinygpt.encode)",
            "architecture": f"d_model {D_MODEL}, {N_LAYERS} layers, {N_HEADS} heads, FFN {D_FFN}, context {CONTEXT}",
        },
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _name_matmuls(proto: onnx.ModelProto, model: nn.Module) -> None:
    """Name each Linear's MatMul, bias Add and transposed weight after its module (``blocks.0.mlp.fc1/MatMul``,
    ``blocks.0.mlp.fc1.weight_t``), and the attention MatMuls ``blocks.N.attn/MatMul_qk`` and ``/MatMul_av``.

    Linears are found by matching weight bytes with the torch parameters (exact); attention MatMuls by
    following their inputs back through Reshape/Transpose to the query and value projections.
    """
    from onnx import numpy_helper

    by_bytes = {
        m.weight.detach().numpy().T.tobytes(): name for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    inits = {init.name: init for init in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in proto.graph.node:
        for value in node.input:
            consumers[value].append(node)
    renamed: dict[str, str] = {}
    linear_of: dict[str, str] = {}  # output of a Linear's bias Add -> module name
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        module = by_bytes.get(np.ascontiguousarray(numpy_helper.to_array(inits[node.input[1]])).tobytes())
        if module is None:
            raise RuntimeError(f"MatMul {node.name}: weight {node.input[1]} matches no torch Linear")
        node.name = f"{module}/MatMul"
        renamed[node.input[1]] = f"{module}.weight_t"
        for user in consumers[node.output[0]]:
            if user.op_type == "Add" and any(v in inits for v in user.input):
                user.name = f"{module}/Add"
                linear_of[user.output[0]] = module
    if len(renamed) != len(by_bytes):
        raise RuntimeError(f"{len(renamed)} weight MatMuls named, {len(by_bytes)} Linears in the model")

    def source(value: str) -> str:
        """The Linear whose output ``value`` is, looking through reshapes and transposes."""
        while value not in linear_of and value in producer and producer[value].op_type in ("Reshape", "Transpose"):
            value = producer[value].input[0]
        return linear_of.get(value, "")

    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] not in inits:
            query, value = source(node.input[0]), source(node.input[1])
            if query.endswith(".query"):
                node.name = f"{query.rsplit('.', 1)[0]}/MatMul_qk"
            elif value.endswith(".value"):
                node.name = f"{value.rsplit('.', 1)[0]}/MatMul_av"
            else:
                raise RuntimeError(f"attention MatMul {node.name}: cannot trace its inputs to query or value")
    for init in proto.graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for node in proto.graph.node:
        node.input[:] = [renamed.get(v, v) for v in node.input]


def compare(proto: onnx.ModelProto, model: TinyGPT, windows: np.ndarray) -> float:
    """Largest |logit difference| between onnxruntime and PyTorch over several batch and sequence shapes."""
    sess = tinygpt.session(proto.SerializeToString())
    worst = 0.0
    for n, t in ((8, CONTEXT), (1, CONTEXT), (3, 37), (1, 2)):
        ids = np.ascontiguousarray(windows[:n, :t])
        (got,) = sess.run([tinygpt.OUTPUT_NAME], {tinygpt.INPUT_NAME: ids})
        with torch.no_grad():
            want = model(torch.from_numpy(ids)).numpy()
        if got.shape != (n, t, tinygpt.VOCAB) or got.dtype != np.float32:
            raise RuntimeError(f"onnxruntime logits {got.dtype} {got.shape}, expected float32 {(n, t, tinygpt.VOCAB)}")
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > MAX_ABS_DIFF:
        raise RuntimeError(f"ONNX export disagrees with PyTorch: max |logit diff| {worst:.3g}")
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    """Build the corpus, train, export, check, write; prints what was measured."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=tinygpt.HERE, help="folder (default models/tinygpt)")
    args = ap.parse_args(argv)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    t0 = time.perf_counter()
    train_text, eval_text, calib_text, stats = corpus()
    print(
        f"stdlib {sysconfig.get_paths()['stdlib']}: {stats['files']} files, {stats['train files']} for training "
        f"({len(train_text) / 1e6:.2f} MB), {stats['held-out files']} held out; "
        f"eval.txt {len(eval_text)} B, calib.txt {len(calib_text)} B"
    )
    model = TinyGPT()
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    t1 = time.perf_counter()
    final_loss = train(model, train_text)
    t2 = time.perf_counter()
    windows = tinygpt.make_windows(eval_text, CONTEXT, N_EVAL)
    ppl_torch = torch_perplexity(model, windows)
    try:
        proto = export(model)
        diff = compare(proto, model, windows)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data = proto.SerializeToString()
    ppl_onnx = tinygpt.perplexity(data, windows)
    t3 = time.perf_counter()
    if any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer):
        print("error: weights stored as external data", file=sys.stderr)
        return 1
    if len(data) > MAX_FILE_BYTES:
        print(f"error: model is {len(data)} bytes, over {MAX_FILE_BYTES}", file=sys.stderr)
        return 1
    if not ppl_onnx < MAX_EVAL_PPL or abs(ppl_onnx - ppl_torch) > 1e-3 * ppl_torch:
        print(
            f"error: eval perplexity torch {ppl_torch:.4f}, onnx {ppl_onnx:.4f} (limit {MAX_EVAL_PPL})", file=sys.stderr
        )
        return 1
    # the texts first: a model implies the eval/calib texts it was held out from
    write_atomically(args.out / tinygpt.EVAL_PATH.name, eval_text)
    write_atomically(args.out / tinygpt.CALIB_PATH.name, calib_text)
    write_atomically(args.out / tinygpt.MODEL_PATH.name, data)

    print(
        f"data {t1 - t0:.1f} s, training {t2 - t1:.1f} s ({STEPS} steps of {BATCH}x{CONTEXT}), checks {t3 - t2:.1f} s"
    )
    print(f"final training loss (last 50 steps) {final_loss:.4f} nats/byte")
    print(f"eval perplexity ({N_EVAL} windows of {CONTEXT}): torch {ppl_torch:.4f}, onnx {ppl_onnx:.4f}")
    print(f"max |logit diff| onnxruntime vs torch: {diff:.2e}")
    print(f"opset {OPSET}, ir_version {proto.ir_version}, {len(data) / 2**20:.2f} MiB")
    for value in [*proto.graph.input, *proto.graph.output]:
        t = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        print(f"  {value.name}: {onnx.TensorProto.DataType.Name(t.elem_type).lower()} {dims}")
    ops = collections.Counter(n.op_type for n in proto.graph.node).most_common()
    print("ops: " + ", ".join(f"{k} {v}" for k, v in ops))
    shapes = {init.name: list(init.dims) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "MatMul":
            print(f"  {node.name}: {shapes.get(node.input[1], 'activation')}")
    for name in (tinygpt.MODEL_PATH.name, tinygpt.EVAL_PATH.name, tinygpt.CALIB_PATH.name):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
