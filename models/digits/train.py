"""Build the bundled default model: a small CNN on scikit-learn's 8x8 digits.

Only used to (re)build the example files in this folder; onnxq itself never
needs torch at run time.  Run from the repository root, in a separate venv
that has torch (CPU), scikit-learn, onnx, onnxscript and onnxruntime:

    python3 -m venv .venv-build
    .venv-build/bin/pip install torch==2.13.0 scikit-learn onnx onnxruntime onnxscript numpy
    .venv-build/bin/python models/digits/train.py

Writes, next to this file:
    digits_cnn.onnx  opset 17, IR 8, input "input" [batch,1,8,8] float32,
                     output "logits" [batch,10]; BatchNormalization nodes kept
                     unfused (inference form) so that onnxq's fold_batchnorm
                     pass has work to do, and a Concat joining two branches.
    calib.npz        "input": [128,1,8,8] float32 calibration samples (train split)
    eval.npz         "input": [540,1,8,8] float32, "label": [540] int64 (test split)

The script is deterministic: a rerun produces the same weights and accuracy.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "digits_cnn.onnx"
CALIB_PATH = HERE / "calib.npz"
EVAL_PATH = HERE / "eval.npz"

SEED = 0
EPOCHS = 40
BATCH = 64
LR = 3e-3
N_CALIB = 128
OPSET = 17
IR_VERSION = 8  # what opset 17 needs; onnx 1.23 stamps 14, which onnxruntime 1.31 refuses
MIN_ACC = 0.97


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=True)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, 16, 3)
        self.branch3 = ConvBNReLU(16, 16, 3)
        self.branch1 = ConvBNReLU(16, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = ConvBNReLU(32, 32, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch3(x), self.branch1(x)], dim=1)  # -> Concat
        x = self.pool(x)
        x = self.head(x)
        x = x.mean(dim=(2, 3))  # global average pool -> GlobalAveragePool + Flatten, [N, 32]
        return self.fc(x)


def load_data():
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None, :, :]  # [N,1,8,8]
    y = d.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=540, random_state=SEED, stratify=y)
    return X_tr, X_te, y_tr, y_te


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to +-max_shift pixels (zero fill)."""
    n = x.shape[0]
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    offs = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            sel = (offs[:, 0] == dy) & (offs[:, 1] == dx)
            out[sel] = padded[sel, :, dy : dy + 8, dx : dx + 8]
    return out


@torch.no_grad()
def accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    model.eval()
    logits = model(torch.from_numpy(X)).numpy()
    return float((logits.argmax(1) == y).mean()), logits


def train(X_tr, y_tr, X_te, y_te) -> nn.Module:
    gen = torch.Generator().manual_seed(SEED)
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps_per_epoch = (len(X_tr) + BATCH - 1) // BATCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch)
    Xt = torch.from_numpy(X_tr)
    yt = torch.from_numpy(y_tr)
    t0 = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(Xt), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH : (s + 1) * BATCH]
            xb = random_shift(Xt[idx], gen)
            yb = yt[idx]
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 5 == 0 or epoch == EPOCHS - 1:
            acc, _ = accuracy(model, X_te, y_te)
            print(f"epoch {epoch + 1:3d}  loss {total / len(Xt):.4f}  test acc {acc:.4f}  ({time.time() - t0:.1f}s)")
    model.eval()
    return model


def _global_average_pool(x, dim, keepdim=False, dtype=None):
    """ONNX translation of aten.mean.dim(x, [2, 3]) on a 4-D tensor as
    GlobalAveragePool + Flatten (the classic CNN head).  Without it the
    exporter emits an opset-18 ReduceMean whose axes input the 18->17
    version converter cannot handle."""
    from onnxscript import opset17 as op

    assert sorted(int(d) % 4 for d in dim) == [2, 3] and not keepdim and dtype is None, (
        dim,
        keepdim,
        dtype,
    )
    return op.Flatten(op.GlobalAveragePool(x), axis=1)


def _optimize_keep_batchnorm(model) -> None:
    """Constant folding and clean-up, in place, on the exporter's onnx_ir model.

    This is torch.onnx's own optimize step (onnxscript.optimizer.optimize_ir)
    minus its pattern rewriter, whose default rules fuse BatchNormalization
    into the preceding Conv; the BN nodes must survive for onnxq's
    fold_batchnorm pass to have work to do."""
    import onnx_ir.passes.common as common
    from onnx_ir.passes import Sequential
    from onnxscript.optimizer import fold_constants_ir

    Sequential(common.InlinePass(), common.RemoveUnusedFunctionsPass())(model)
    for _ in range(2):
        fold_constants_ir(model, onnx_shape_inference=True)
        Sequential(
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        )(model)
    Sequential(
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.CommonSubexpressionEliminationPass(),
        common.IdentityEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
        common.TopologicalSortPass(),
    )(model)


def _rename_nodes(m: onnx.ModelProto) -> None:
    """Give nodes readable names after the torch modules they come from:
    stem.conv, stem.bn, stem.relu, branch3.*, branch1.*, concat, pool,
    head.*, gap, flatten, fc."""
    fixed = {"Concat": "concat", "MaxPool": "pool", "GlobalAveragePool": "gap", "Flatten": "flatten"}
    inits = {t.name for t in m.graph.initializer}
    producer = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "BatchNormalization", "Gemm"):
            assert n.input[1] in inits, (n.op_type, n.input[1])
            n.name = n.input[1].rsplit(".", 1)[0]  # "stem.conv.weight" -> "stem.conv"
        elif n.op_type == "Relu":
            prev = producer[n.input[0]]
            assert prev.endswith(".bn"), prev
            n.name = prev[: -len(".bn")] + ".relu"
        else:
            n.name = fixed[n.op_type]
        for o in n.output:
            producer[o] = n.name
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names), names
    # Intermediate tensors: "<node name>.out".
    graph_outputs = {o.name for o in m.graph.output}
    rename = {}
    for n in m.graph.node:
        assert len(n.output) == 1, (n.name, list(n.output))
        if n.output[0] not in graph_outputs:
            rename[n.output[0]] = n.name + ".out"
            n.output[0] = rename[n.output[0]]
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)


def export(model: nn.Module) -> None:
    """Export with the dynamo exporter, which keeps eval-mode BatchNorm as
    separate (inference-form) BatchNormalization nodes instead of folding it
    into the preceding Conv like the TorchScript exporter does."""
    example = torch.zeros(2, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: batch}},
        external_data=False,
        optimize=False,  # see _optimize_keep_batchnorm
        verify=False,
        report=False,
        custom_translation_table={torch.ops.aten.mean.dim: _global_average_pool},
    )
    _optimize_keep_batchnorm(prog.model)
    m = prog.model_proto

    # Clean up so onnxruntime 1.31 accepts it: IR 8, one default-domain opset,
    # no leftover local functions or opset imports that no node uses.
    m.ir_version = IR_VERSION
    del m.functions[:]
    used_domains = {n.domain for n in m.graph.node}
    keep = []
    seen = set()
    for imp in m.opset_import:
        dom = imp.domain
        if dom in ("", "ai.onnx"):
            if "" in seen:
                continue
            keep.append(onnx.helper.make_opsetid("", OPSET))
            seen.add("")
        elif dom in used_domains and dom not in seen:
            keep.append(onnx.helper.make_opsetid(dom, imp.version))
            seen.add(dom)
    if "" not in seen:
        keep.insert(0, onnx.helper.make_opsetid("", OPSET))
    del m.opset_import[:]
    m.opset_import.extend(keep)
    # Symbolic batch dim on input/output named "batch".
    for vi in list(m.graph.input) + list(m.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.ClearField("dim_value")
        d0.dim_param = "batch"
    # Drop intermediate value_info (shape inference can recreate it) and
    # metadata that pins the exporter's internals.
    del m.graph.value_info[:]
    del m.metadata_props[:]
    for n in m.graph.node:
        n.ClearField("doc_string")
        del n.metadata_props[:]
    for v in [*m.graph.input, *m.graph.output, *m.graph.initializer]:
        v.ClearField("doc_string")
        del v.metadata_props[:]
    m.graph.name = "digits_cnn"
    _rename_nodes(m)
    m.producer_name = "onnxq-models-digits"
    m.producer_version = torch.__version__
    m.doc_string = "Small CNN on scikit-learn 8x8 digits; built by models/digits/train.py"

    onnx.checker.check_model(m, full_check=True)
    onnx.save_model(m, str(ONNX_PATH), save_as_external_data=False)

    # Reload from disk and validate again.
    m2 = onnx.load(str(ONNX_PATH))
    onnx.checker.check_model(m2, full_check=True)
    assert m2.ir_version == IR_VERSION, m2.ir_version
    assert not m2.functions
    default = [o for o in m2.opset_import if o.domain in ("", "ai.onnx")]
    assert len(default) == 1 and default[0].version == OPSET, m2.opset_import
    assert {n.domain for n in m2.graph.node} <= {""}, {n.domain for n in m2.graph.node}
    assert [i.name for i in m2.graph.input] == ["input"]
    assert [o.name for o in m2.graph.output] == ["logits"]
    for t in m2.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL, t.name
    bns = [n for n in m2.graph.node if n.op_type == "BatchNormalization"]
    # One per Conv: stem, branch3, branch1, head.
    assert len(bns) == 4, f"expected 4 BatchNormalization nodes, got {len(bns)}"
    for n in bns:
        assert len(n.output) == 1, (n.name, list(n.output))
        for a in n.attribute:
            assert not (a.name == "training_mode" and a.i != 0), n.name
    concats = [n for n in m2.graph.node if n.op_type == "Concat"]
    assert len(concats) == 1, f"expected 1 Concat, got {len(concats)}"
    gaps = [n for n in m2.graph.node if n.op_type == "GlobalAveragePool"]
    assert len(gaps) == 1, f"expected 1 GlobalAveragePool, got {len(gaps)}"
    assert not [n for n in m2.graph.node if n.op_type in ("Constant", "Shape")]
    uses = collections.Counter(i for n in m2.graph.node for i in n.input)
    shared = [t.name for t in m2.graph.initializer if uses[t.name] != 1]
    assert not shared, f"initializers not used exactly once: {shared}"
    size = ONNX_PATH.stat().st_size
    assert size < 300_000, size


def main() -> int:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    X_tr, X_te, y_tr, y_te = load_data()
    print(f"train {X_tr.shape} / test {X_te.shape}")

    model = train(X_tr, y_tr, X_te, y_te)
    torch_acc, torch_logits = accuracy(model, X_te, y_te)
    print(f"torch test accuracy: {torch_acc:.4f}")
    if torch_acc < MIN_ACC:
        print(f"ERROR: accuracy {torch_acc:.4f} below {MIN_ACC}", file=sys.stderr)
        return 1

    export(model)

    perm = np.random.RandomState(SEED).permutation(len(X_tr))
    calib = np.ascontiguousarray(X_tr[perm[:N_CALIB]], dtype=np.float32)
    np.savez(CALIB_PATH, input=calib)
    np.savez(
        EVAL_PATH,
        input=np.ascontiguousarray(X_te, dtype=np.float32),
        label=y_te.astype(np.int64),
    )

    # Verify with onnxruntime against the saved files.
    ev = np.load(EVAL_PATH)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(ONNX_PATH), so, providers=["CPUExecutionProvider"])
    (ort_logits,) = sess.run(["logits"], {"input": ev["input"]})
    ort_acc = float((ort_logits.argmax(1) == ev["label"]).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    (one,) = sess.run(["logits"], {"input": ev["input"][:1]})  # dynamic batch
    assert one.shape == (1, 10), one.shape
    print(f"onnxruntime test accuracy: {ort_acc:.4f}  (max |logit diff| vs torch {max_diff:.2e})")
    if ort_acc != torch_acc or max_diff > 1e-3:
        print("ERROR: onnxruntime disagrees with torch", file=sys.stderr)
        return 1

    m = onnx.load(str(ONNX_PATH))
    hist = collections.Counter(n.op_type for n in m.graph.node)
    print("op histogram:", dict(sorted(hist.items())))
    for n in m.graph.node:
        if n.op_type in ("BatchNormalization", "Concat"):
            print(f"  {n.op_type:20s} {n.name}")
    for p in (ONNX_PATH, CALIB_PATH, EVAL_PATH):
        print(f"{p.relative_to(HERE.parent.parent)}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
