"""Quantization-aware-trained (QAT) variants of the bundled digits CNN, exported the ways torch users export them.

Only used to (re)build the files in models/digits/qat/; onnxq itself never needs torch at run time.
Run from the repository root in the build venv (see train.py):

    .venv-build/bin/python models/digits/qat_train.py

Steps:
  1. Retrain the float model exactly as train.py does (its functions are imported, same seeds), so the
     float checkpoint is the one behind digits_cnn.onnx (98.52% on the test split).
  2. Fold each BatchNorm into its Conv (standard for QAT), giving Conv+ReLU blocks.
  3. Fine-tune with fake quantization, straight-through estimator everywhere:
     weights per-channel symmetric (int8: -127..127, int4: -7..7, axis 0), activations per-tensor
     asymmetric uint8 (0..255) on the input of every Conv/Gemm and on the Concat output.
     (A) "observer" style: torch.ao.quantization.FakeQuantize with moving-average min/max observers
         (observers frozen for the last epochs). Exported with the TorchScript exporter (opset 13)
         and, for int8, with the dynamo exporter (opset 18).
     (B) "LSQ" style: learnable scales (and activation zero points) as nn.Parameter, fake quant written
         in plain torch ops (round with STE via x + (x.round() - x).detach(), clamp). Exported as the
         plain float model (the QAT-trained weights) plus a sidecar JSON of the learned parameters keyed
         by ONNX tensor name; the int8 LSQ model is also exported as is by the dynamo exporter, which
         writes its fake quantization out as arithmetic (Div/Round/Sub/Add/Clip/Mul).
  4. Check every export with onnx.checker (full) and onnxruntime against the torch fake-quant model, and
     write models/digits/qat/results.json.

The stock exporters refuse the narrow ranges (-127..127, -7..7) of fake_quantize_per_channel_affine (they
allow only (0, 255), (-128, 127) and (0, 127)); the script records those errors in results.json and exports
with a small user-side translation that writes QuantizeLinear -> Clip(qmin, qmax) -> DequantizeLinear, the
same pattern torch itself emits for the (0, 127) range. Deterministic: a rerun writes the same files.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch.ao.quantization import (
    FakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    disable_observer,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train as base  # noqa: E402  (models/digits/train.py: architecture, data split, float training)

sys.path.insert(0, str(HERE.parents[1]))
from models.zoo import write_atomically  # noqa: E402

OUT = HERE / "qat"
RESULTS_PATH = OUT / "results.json"
SEED = base.SEED
QAT_EPOCHS = 12
QAT_LR = 5e-4
SCALE_LR = 2e-4  # LSQ scales / zero points (Adam: LSQ's gradient scale factor is moot, so none is used)
FREEZE_OBSERVERS_AT = 8  # style A: observers update for epochs 0..7, scales fixed afterwards
N_LSQ_INIT = 256  # train samples used to initialise LSQ activation ranges
TS_OPSET, TS_IR = 13, 7  # TorchScript exporter
DYNAMO_OPSET, DYNAMO_IR = 18, 8  # dynamo exporter: torchlib's native opset, no version conversion
FLOAT_OPSET, FLOAT_IR = base.OPSET, base.IR_VERSION  # LSQ float export, same form as digits_cnn.onnx
ACT_RANGE = (0, 255)
WEIGHT_RANGES = {8: (-127, 127), 4: (-7, 7)}
# Activation tensors (ONNX names in the renamed float export) -> quantizer attribute in DigitsQAT.
ACT_QUANTIZERS = {
    "input": "input_fq",
    "stem.relu.out": "stem_out_fq",
    "concat.out": "concat_fq",
    "pool.out": "head_in_fq",
    "flatten.out": "fc_in_fq",
}
WEIGHT_LAYERS = ["stem", "branch3", "branch1", "head", "fc"]


# --- model -------------------------------------------------------------------------------------------


class QConvReLU(nn.Module):
    """Conv (BatchNorm folded in) with a weight quantizer, then ReLU."""

    def __init__(self, cin: int, cout: int, k: int, wq) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=True)
        self.weight_fq = wq(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(F.conv2d(x, self.weight_fq(self.conv.weight), self.conv.bias, padding=self.conv.padding))


class QLinear(nn.Module):
    def __init__(self, cin: int, cout: int, wq) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin))
        self.bias = nn.Parameter(torch.empty(cout))
        self.weight_fq = wq(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fq(self.weight), self.bias)


class DigitsQAT(nn.Module):
    """train.DigitsCNN with BatchNorm folded and fake quantization on the input of every Conv/Gemm and on
    the Concat output. With nn.Identity quantizers it is the plain folded float model."""

    def __init__(self, wq=lambda c: nn.Identity(), aq=nn.Identity) -> None:
        super().__init__()
        self.input_fq = aq()
        self.stem = QConvReLU(1, 16, 3, wq)
        self.stem_out_fq = aq()  # input of branch3 and branch1
        self.branch3 = QConvReLU(16, 16, 3, wq)
        self.branch1 = QConvReLU(16, 16, 1, wq)
        self.concat_fq = aq()
        self.pool = nn.MaxPool2d(2)
        self.head_in_fq = aq()
        self.head = QConvReLU(32, 32, 3, wq)
        self.fc_in_fq = aq()
        self.fc = QLinear(32, 10, wq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_out_fq(self.stem(self.input_fq(x)))
        x = self.concat_fq(torch.cat([self.branch3(x), self.branch1(x)], dim=1))
        x = self.head(self.head_in_fq(self.pool(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(self.fc_in_fq(x))


def folded_state(model: base.DigitsCNN) -> dict[str, torch.Tensor]:
    """Fold each eval-mode BatchNorm into its Conv:
    w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta."""
    state = {}
    with torch.no_grad():
        for name in ["stem", "branch3", "branch1", "head"]:
            block = getattr(model, name)
            bn = block.bn
            k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            state[f"{name}.conv.weight"] = (block.conv.weight * k.view(-1, 1, 1, 1)).clone()
            state[f"{name}.conv.bias"] = ((block.conv.bias - bn.running_mean) * k + bn.bias).clone()
        state["fc.weight"] = model.fc.weight.detach().clone()
        state["fc.bias"] = model.fc.bias.detach().clone()
    return state


def load_folded(qat: DigitsQAT, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = qat.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all("_fq" in k for k in missing), missing


# --- (A) observer-style fake quantization --------------------------------------------------------------


def observer_weight_fq(bits: int):
    qmin, qmax = WEIGHT_RANGES[bits]
    return lambda channels: FakeQuantize(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=qmin,
        quant_max=qmax,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        reduce_range=False,
    )


def observer_act_fq() -> FakeQuantize:
    return FakeQuantize(
        observer=MovingAverageMinMaxObserver,
        quant_min=ACT_RANGE[0],
        quant_max=ACT_RANGE[1],
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        reduce_range=False,
    )


class FrozenFakeQuant(nn.Module):
    """A FakeQuantize with its observer off, as a direct torch.fake_quantize_* call: the export view.

    (FakeQuantize.forward branches on its observer_enabled buffer, which torch.export cannot trace.)"""

    def __init__(self, fq: FakeQuantize) -> None:
        super().__init__()
        self.register_buffer("scale", fq.scale.detach().clone())
        self.register_buffer("zero_point", fq.zero_point.detach().clone().to(torch.int32))
        self.per_channel = fq.is_per_channel
        self.ch_axis = int(fq.ch_axis)
        self.quant_min = int(fq.activation_post_process.quant_min)
        self.quant_max = int(fq.activation_post_process.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)


def frozen_copy(model: DigitsQAT) -> DigitsQAT:
    frozen = DigitsQAT()
    frozen.load_state_dict({k: v for k, v in model.state_dict().items() if "_fq" not in k})
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize):
            parent_name, _, attr = name.rpartition(".")
            parent = frozen.get_submodule(parent_name) if parent_name else frozen
            setattr(parent, attr, FrozenFakeQuant(module))
    return frozen.eval()


# --- (B) LSQ: learnable scales, fake quant in plain torch ops -------------------------------------------


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()


class LSQFakeQuant(nn.Module):
    """Learned-step-size fake quantization. Weights: per-channel (axis 0) symmetric, zero point 0.
    Activations: per-tensor asymmetric with a learnable zero point (LSQ+), both initialised from data."""

    def __init__(self, qmin: int, qmax: int, channels: int | None) -> None:
        super().__init__()
        self.qmin, self.qmax = qmin, qmax
        self.per_channel = channels is not None
        self.scale = nn.Parameter(torch.ones(channels or 1))
        self.zero_point = None if self.per_channel else nn.Parameter(torch.zeros(1))
        self.initialized = False

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        if self.per_channel:
            amax = x.abs().flatten(1).amax(1).clamp_min(1e-8)
            self.scale.copy_(amax / self.qmax)
        else:
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            scale = max(hi - lo, 1e-8) / (self.qmax - self.qmin)
            self.scale.fill_(scale)
            self.zero_point.fill_(float(np.clip(np.round(self.qmin - lo / scale), self.qmin, self.qmax)))
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self._init(x.detach())
        if self.per_channel:
            s = self.scale.view(-1, *([1] * (x.dim() - 1)))
            q = torch.clamp(round_ste(x / s), self.qmin, self.qmax)
            return q * s
        s = self.scale
        z = torch.clamp(round_ste(self.zero_point), self.qmin, self.qmax)
        q = torch.clamp(round_ste(x / s) + z, self.qmin, self.qmax)
        return (q - z) * s

    def qparams(self) -> tuple[np.ndarray, np.ndarray]:
        scale = self.scale.detach().numpy().astype(np.float32).copy()
        if self.per_channel:
            return scale, np.zeros(scale.shape, np.int64)
        z = np.clip(np.round(self.zero_point.detach().numpy()), self.qmin, self.qmax).astype(np.int64)
        return scale, z


def lsq_weight_fq(bits: int):
    qmin, qmax = WEIGHT_RANGES[bits]
    return lambda channels: LSQFakeQuant(qmin, qmax, channels)


def lsq_act_fq() -> LSQFakeQuant:
    return LSQFakeQuant(*ACT_RANGE, None)


# --- training -------------------------------------------------------------------------------------------


def finetune(model: DigitsQAT, X_tr, y_tr, param_groups, on_epoch=None) -> None:
    gen = torch.Generator().manual_seed(SEED + 1)
    opt = torch.optim.AdamW(param_groups)
    steps_per_epoch = (len(X_tr) + base.BATCH - 1) // base.BATCH
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=QAT_EPOCHS * steps_per_epoch)
    Xt, yt = torch.from_numpy(X_tr), torch.from_numpy(y_tr)
    t0 = time.time()
    for epoch in range(QAT_EPOCHS):
        if on_epoch is not None:
            on_epoch(epoch)
        model.train()
        perm = torch.randperm(len(Xt), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * base.BATCH : (s + 1) * base.BATCH]
            xb = base.random_shift(Xt[idx], gen)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        print(f"  qat epoch {epoch + 1:3d}  loss {total / len(Xt):.4f}  ({time.time() - t0:.1f}s)")
    model.eval()


def train_observer(state, bits: int, X_tr, y_tr) -> DigitsQAT:
    torch.manual_seed(SEED)
    model = DigitsQAT(observer_weight_fq(bits), observer_act_fq)
    load_folded(model, state)

    def on_epoch(epoch: int) -> None:
        if epoch == FREEZE_OBSERVERS_AT:
            model.apply(disable_observer)

    groups = [{"params": list(model.parameters()), "lr": QAT_LR, "weight_decay": 1e-4}]  # FakeQuantize has none
    finetune(model, X_tr, y_tr, groups, on_epoch)
    model.apply(disable_observer)
    return model.eval()


def train_lsq(state, bits: int, X_tr, y_tr) -> DigitsQAT:
    torch.manual_seed(SEED)
    model = DigitsQAT(lsq_weight_fq(bits), lsq_act_fq)
    load_folded(model, state)
    perm = np.random.RandomState(SEED).permutation(len(X_tr))
    with torch.no_grad():  # initialise every quantizer from the folded float model on train samples
        model(torch.from_numpy(X_tr[perm[:N_LSQ_INIT]]))
    qparams = [p for n, p in model.named_parameters() if "_fq." in n]
    weights = [p for n, p in model.named_parameters() if "_fq." not in n]
    groups = [
        {"params": weights, "lr": QAT_LR, "weight_decay": 1e-4},
        {"params": qparams, "lr": SCALE_LR, "weight_decay": 0.0},
    ]
    finetune(model, X_tr, y_tr, groups)
    for module in model.modules():
        if isinstance(module, LSQFakeQuant):
            assert bool((module.scale > 0).all()), "an LSQ scale went non-positive"
    return model.eval()


# --- export helpers -------------------------------------------------------------------------------------


def save_model(m: onnx.ModelProto, path: Path) -> None:
    onnx.checker.check_model(m, full_check=True)
    write_atomically(path, m.SerializeToString())
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def _fq_symbolic(g, inputs, scale, zero_point, axis, quant_min, quant_max):
    """TorchScript symbolic for aten::fake_quantize_per_channel_affine (opset 13) that also takes ranges
    narrower than int8/uint8: Q -> Clip(qmin, qmax) -> DQ, as torch does itself for (0, 127)."""
    from torch.onnx import symbolic_helper as sh

    axis = sh._get_const(axis, "i", "axis")
    qmin = sh._get_const(quant_min, "i", "quant_min")
    qmax = sh._get_const(quant_max, "i", "quant_max")
    unsigned = qmin >= 0
    zdtype = TensorProto.UINT8 if unsigned else TensorProto.INT8
    tdtype = torch.uint8 if unsigned else torch.int8
    zero_point = g.op("Cast", zero_point, to_i=zdtype)
    q = g.op("QuantizeLinear", inputs, scale, zero_point, axis_i=axis)
    if (qmin, qmax) not in [(0, 255), (-128, 127)]:
        lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=tdtype))
        hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=tdtype))
        q = g.op("Clip", q, lo, hi)
    return g.op("DequantizeLinear", q, scale, zero_point, axis_i=axis)


def _fq_translation(self, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    """The same for the dynamo exporter (custom_translation_table), in onnxscript."""
    import onnx_ir as ir
    from onnxscript import opset18 as op

    unsigned = quant_min >= 0
    zdtype = ir.DataType.UINT8 if unsigned else ir.DataType.INT8
    npdtype = np.uint8 if unsigned else np.int8
    zp = op.Cast(zero_point, to=zdtype)
    q = op.QuantizeLinear(self, scale, zp, axis=axis)
    if (quant_min, quant_max) not in [(0, 255), (-128, 127)]:
        lo = op.Constant(value=ir.tensor(np.array(quant_min, npdtype)))
        hi = op.Constant(value=ir.tensor(np.array(quant_max, npdtype)))
        q = op.Clip(q, lo, hi)
    return op.DequantizeLinear(q, scale, zp, axis=axis)


def _first_error_line(exc: BaseException) -> str:
    """The innermost useful message of an exporter error (their messages run to many lines)."""
    text = f"{type(exc).__name__}: {exc}"
    for line in str(exc).splitlines():
        if any(
            key in line
            for key in ("ONNX allows only", "Could not guard", "NotImplementedError", "UnsupportedOperatorException")
        ):
            return f"{type(exc).__name__}: {line.split('[Caused by')[0].strip()}"
    return text.splitlines()[0][:400]


@contextlib.contextmanager
def _quiet(fd_level: bool = False):
    """The exporters print progress and tracer warnings; keep the log readable. fd_level also silences what
    C++ writes (the TorchScript exporter dumps its whole graph on an error)."""
    sink = io.StringIO()
    saved = []
    if fd_level:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = [(fd, os.dup(fd)) for fd in (1, 2)]
        for fd, _ in saved:
            os.dup2(devnull, fd)
        os.close(devnull)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _example() -> torch.Tensor:
    return torch.zeros(2, 1, 8, 8)


def export_torchscript(model: nn.Module, path: Path, doc: str) -> None:
    buf = io.BytesIO()
    with _quiet():
        torch.onnx.export(
            model,
            (_example(),),
            buf,
            dynamo=False,
            opset_version=TS_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load_from_string(buf.getvalue())
    assert m.ir_version == TS_IR, m.ir_version
    _stamp(m, doc)
    save_model(m, path)


def _clean_dynamo(m: onnx.ModelProto, opset: int, ir_version: int) -> None:
    """As train.py: IR version the opset needs (onnx 1.23 stamps one onnxruntime 1.31 refuses), one
    default-domain opset, no leftover functions, symbolic batch dim, no exporter metadata."""
    m.ir_version = ir_version
    del m.functions[:]
    used = {n.domain for n in m.graph.node}
    assert used <= {""}, used
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", opset))
    for vi in list(m.graph.input) + list(m.graph.output):
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.ClearField("dim_value")
        d0.dim_param = "batch"
    del m.graph.value_info[:]
    del m.metadata_props[:]
    for n in m.graph.node:
        n.ClearField("doc_string")
        del n.metadata_props[:]
    for v in [*m.graph.input, *m.graph.output, *m.graph.initializer]:
        v.ClearField("doc_string")
        del v.metadata_props[:]


def _stamp(m: onnx.ModelProto, doc: str) -> None:
    m.producer_name = "onnxq-models-digits-qat"
    m.producer_version = torch.__version__
    m.doc_string = doc


def export_dynamo(model: nn.Module, path: Path, doc: str, table=None, dynamic: bool = True) -> None:
    """dynamic=False: export with the example's static batch (2), then name the batch dimension of the graph
    input and output 'batch' (the graph has no batch-dependent constant; onnxruntime checks batch 540 and 1).
    torch.export decomposes fake_quantize_per_tensor_affine into *_cachemask ops that have no fake-tensor
    kernel, so a dynamic batch fails there; a static one runs the real kernel and keeps the op."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _quiet(), torch.no_grad():
        prog = torch.onnx.export(
            model,
            (_example(),),
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}} if dynamic else None,
            external_data=False,
            report=False,
            verify=False,
            custom_translation_table=table,
        )
    m = prog.model_proto
    _clean_dynamo(m, DYNAMO_OPSET, DYNAMO_IR)
    _stamp(m, doc)
    save_model(m, path)


def try_export(fn) -> str | None:
    """Run an export expected to fail with the stock exporter; return its error (None if it worked)."""
    try:
        with _quiet(fd_level=True), torch.no_grad():
            fn()
    except Exception as exc:  # the message is what we record
        return _first_error_line(exc)
    return None


def stock_exporter_errors(model: DigitsQAT) -> dict[str, str | None]:
    """What the stock exporters say to the observer-style int8 model (None: the export worked)."""
    table = {torch.ops.aten.fake_quantize_per_channel_affine.default: _fq_translation}
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}
    frozen = frozen_copy(model)
    return {
        "torchscript_stock_narrow_range": try_export(
            lambda: torch.onnx.export(model, (_example(),), io.BytesIO(), dynamo=False, opset_version=TS_OPSET)
        ),
        "dynamo_fakequantize_modules": try_export(
            lambda: torch.onnx.export(model, (_example(),), dynamo=True, opset_version=DYNAMO_OPSET)
        ),
        "dynamo_stock_frozen_narrow_range": try_export(
            lambda: torch.onnx.export(frozen, (_example(),), dynamo=True, opset_version=DYNAMO_OPSET)
        ),
        "dynamo_frozen_dynamic_batch": try_export(
            lambda: torch.onnx.export(
                frozen,
                (_example(),),
                dynamo=True,
                opset_version=DYNAMO_OPSET,
                dynamic_shapes=batch,
                custom_translation_table=table,
            )
        ),
    }


def export_float_renamed(model: DigitsQAT, path: Path, doc: str) -> None:
    """The plain float model (fake quant removed) in the form of digits_cnn.onnx: dynamo exporter, opset 17,
    GlobalAveragePool head, and names: nodes after their torch modules, intermediate tensors '<node>.out'."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _quiet():
        prog = torch.onnx.export(
            model,
            (_example(),),
            dynamo=True,
            opset_version=FLOAT_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
            optimize=False,
            verify=False,
            report=False,
            custom_translation_table={torch.ops.aten.mean.dim: base._global_average_pool},
        )
    base._optimize_keep_batchnorm(prog.model)  # constant folding and clean-up only
    m = prog.model_proto
    _clean_dynamo(m, FLOAT_OPSET, FLOAT_IR)
    _rename(m)
    m.graph.name = "digits_cnn_folded"
    _stamp(m, doc)
    save_model(m, path)


def _rename(m: onnx.ModelProto) -> None:
    fixed = {"Concat": "concat", "MaxPool": "pool", "GlobalAveragePool": "gap", "Flatten": "flatten"}
    inits = {t.name for t in m.graph.initializer}
    producer = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm"):
            assert n.input[1] in inits, (n.op_type, n.input[1])
            n.name = n.input[1].rsplit(".", 1)[0]  # "stem.conv.weight" -> "stem.conv", "fc.weight" -> "fc"
        elif n.op_type == "Relu":
            prev = producer[n.input[0]]
            assert prev.endswith(".conv"), prev
            n.name = prev[: -len(".conv")] + ".relu"
        else:
            n.name = fixed[n.op_type]
        for o in n.output:
            producer[o] = n.name
    names = [n.name for n in m.graph.node]
    assert len(set(names)) == len(names), names
    outputs = {o.name for o in m.graph.output}
    rename = {}
    for n in m.graph.node:
        assert len(n.output) == 1, (n.name, list(n.output))
        if n.output[0] not in outputs:
            rename[n.output[0]] = n.name + ".out"
            n.output[0] = rename[n.output[0]]
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)


# --- sidecar --------------------------------------------------------------------------------------------


def lsq_sidecar(model: DigitsQAT, bits: int, onnx_name: str) -> dict:
    tensors = {}
    for name in WEIGHT_LAYERS:
        layer = getattr(model, name)
        weight_name = "fc.weight" if name == "fc" else f"{name}.conv.weight"
        fq = layer.weight_fq
        scale, _ = fq.qparams()
        tensors[weight_name] = {
            "scale": [float(s) for s in scale],
            "zero_point": [0] * len(scale),
            "bits": bits,
            "signed": True,
            "axis": 0,
            "qmin": fq.qmin,
            "qmax": fq.qmax,
        }
    for tensor_name, attr in ACT_QUANTIZERS.items():
        fq = getattr(model, attr)
        scale, zero = fq.qparams()
        tensors[tensor_name] = {
            "scale": float(scale[0]),
            "zero_point": int(zero[0]),
            "bits": 8,
            "signed": False,
            "axis": None,
            "qmin": fq.qmin,
            "qmax": fq.qmax,
        }
    return {
        "model": onnx_name,
        "method": "LSQ (learned step size; activations with a learned zero point), straight-through rounding",
        "semantics": "q = clip(round(x / scale) + zero_point, qmin, qmax); x' = (q - zero_point) * scale; "
        "round half to even; weights per channel along axis 0",
        "tensors": tensors,
    }


def sidecar_qdq_model(m: onnx.ModelProto, sidecar: dict) -> onnx.ModelProto:
    """The float model with the sidecar applied the plain way (weights replaced by their fake-quantized
    values, activations through QuantizeLinear -> DequantizeLinear uint8): checks the sidecar alone
    reproduces the torch fake-quant model."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    inits = {t.name: t for t in m.graph.initializer}
    for name, e in sidecar["tensors"].items():
        if name in inits:
            w = numpy_helper.to_array(inits[name])
            s = np.asarray(e["scale"], np.float32).reshape(-1, *([1] * (w.ndim - 1)))
            wq = (np.clip(np.round(w / s), e["qmin"], e["qmax"]) * s).astype(np.float32)
            inits[name].CopyFrom(numpy_helper.from_array(wq, name))
            continue
        assert e["qmin"] == 0 and e["qmax"] == 255, e
        s_name, z_name, q_name, dq_name = (f"{name}.sim_scale", f"{name}.sim_zp", f"{name}.sim_q", f"{name}.sim_dq")
        m.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(e["scale"], np.float32), s_name),
                numpy_helper.from_array(np.array(e["zero_point"], np.uint8), z_name),
            ]
        )
        for n in m.graph.node:
            for i, x in enumerate(n.input):
                if x == name:
                    n.input[i] = dq_name
        m.graph.node.extend(
            [
                helper.make_node("QuantizeLinear", [name, s_name, z_name], [q_name]),
                helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_name]),
            ]
        )
    # restore topological order
    produced = {i.name for i in m.graph.input} | set(inits) | {t.name for t in m.graph.initializer}
    pending, ordered = list(m.graph.node), []
    while pending:
        ready = [n for n in pending if all(x in produced for x in n.input if x)]
        assert ready, "cycle"
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
            pending.remove(n)
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    onnx.checker.check_model(m, full_check=True)
    return m


# --- checks ---------------------------------------------------------------------------------------------


def ort_logits(model: onnx.ModelProto | Path, X: np.ndarray, optimize: bool = False) -> np.ndarray:
    """Logits from onnxruntime (CPU). optimize=False (graph optimizations off) runs every node as written, the
    reference semantics that torch's fake quantization matches. With optimizations on, onnxruntime fuses
    DQ -> Conv/Gemm -> Q into integer kernels and rewrites Q/DQ chains around MaxPool, which is not bit-true:
    on CPUs without VNNI its u8 x s8 kernels saturate int16 pair sums for full-range int8 weights."""
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    (logits,) = sess.run(["logits"], {"input": X})
    (one,) = sess.run(["logits"], {"input": X[:1]})  # dynamic batch
    assert one.shape == (1, 10), one.shape
    return logits


def histogram(path: Path) -> dict[str, int]:
    m = onnx.load(str(path))
    return dict(sorted(collections.Counter(n.op_type for n in m.graph.node).items()))


def torch_logits(model: nn.Module, X: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(X)).numpy()


N_LOGITS_HEAD = 8  # torch logits of the first eval samples, kept in results.json for the tests


def dumps(obj) -> str:
    """JSON with one level of indent per nesting, numeric lists kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(
        r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text
    )


def compare(name: str, path: Path, t_logits, X, y, extra: dict) -> dict:
    o_logits = ort_logits(path, X)
    t_acc = float((t_logits.argmax(1) == y).mean())
    o_acc = float((o_logits.argmax(1) == y).mean())
    o_opt_acc = float((ort_logits(path, X, optimize=True).argmax(1) == y).mean())
    diff = float(np.abs(o_logits - t_logits).max())
    m = onnx.load(str(path))
    row = {
        "file": path.name,
        **extra,
        "opset": int(next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))),
        "ir_version": int(m.ir_version),
        "torch_fake_quant_acc": t_acc,
        "onnxruntime_acc": o_acc,
        "max_abs_logit_diff_vs_torch": diff,
        "onnxruntime_acc_all_optimizations": o_opt_acc,
        "op_histogram": histogram(path),
        "bytes": path.stat().st_size,
        "torch_logits_head": [[round(float(v), 5) for v in row] for row in t_logits[:N_LOGITS_HEAD]],
    }
    print(
        f"{name}: torch {t_acc:.4f}  onnxruntime {o_acc:.4f} (all optimizations: {o_opt_acc:.4f})  "
        f"max|dlogit| {diff:.2e}  {row['op_histogram']}"
    )
    return row


def main() -> int:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    X_tr, X_te, y_tr, y_te = base.load_data()
    ev = np.load(base.EVAL_PATH)
    assert np.array_equal(ev["input"], X_te) and np.array_equal(ev["label"], y_te), "eval.npz is not the test split"

    print("float model (as train.py) ...")
    float_model = base.train(X_tr, y_tr, X_te, y_te)
    float_acc, _ = base.accuracy(float_model, X_te, y_te)
    print(f"float torch accuracy {float_acc:.4f}")
    if float_acc < base.MIN_ACC:
        print(f"ERROR: float accuracy {float_acc:.4f} below {base.MIN_ACC}", file=sys.stderr)
        return 1
    committed = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(base.ONNX_PATH)).graph.initializer}
    same_as_committed = all(
        name in committed and np.array_equal(committed[name], p.detach().numpy())
        for name, p in float_model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    )
    state = folded_state(float_model)
    folded = DigitsQAT()
    load_folded(folded, state)
    folded_acc = float((torch_logits(folded, X_te).argmax(1) == y_te).mean())
    print(f"BatchNorm folded: accuracy {folded_acc:.4f}  (weights equal digits_cnn.onnx: {same_as_committed})")

    OUT.mkdir(parents=True, exist_ok=True)
    variants: dict[str, dict] = {}
    exporter_notes: dict[str, str | None] = {}

    # (A) observer style ---------------------------------------------------------------------------------
    for bits in (8, 4):
        print(f"(A) observer-style QAT, int{bits} weights ...")
        model = train_observer(state, bits, X_tr, y_tr)
        t_logits = torch_logits(model, X_te)
        qmin, qmax = WEIGHT_RANGES[bits]
        if bits == 8:
            exporter_notes = stock_exporter_errors(model)
        torch.onnx.register_custom_op_symbolic("aten::fake_quantize_per_channel_affine", _fq_symbolic, TS_OPSET)
        try:
            path = OUT / f"digits_qat_int{bits}_qdq.onnx"
            export_torchscript(
                model,
                path,
                f"digits CNN, observer-style QAT (torch.ao FakeQuantize), int{bits} weights [{qmin},{qmax}] per "
                "channel, uint8 activations; TorchScript exporter, opset 13; built by models/digits/qat_train.py",
            )
        finally:
            torch.onnx.unregister_custom_op_symbolic("aten::fake_quantize_per_channel_affine", TS_OPSET)
        extra = {
            "style": "observer",
            "exporter": "torchscript",
            "weight_bits": bits,
            "weight_range": [qmin, qmax],
        }
        variants[path.stem] = compare(path.stem, path, t_logits, X_te, y_te, extra)
        if bits == 8:
            frozen = frozen_copy(model)
            assert np.array_equal(torch_logits(frozen, X_te), t_logits), "frozen copy differs from FakeQuantize model"
            path = OUT / "digits_qat_int8_dynamo.onnx"
            export_dynamo(
                frozen,
                path,
                "digits CNN, observer-style QAT, int8 weights [-127,127] per channel, uint8 activations; dynamo "
                "exporter, opset 18 (fake quant as torch.fake_quantize_* calls); built by models/digits/qat_train.py",
                table={torch.ops.aten.fake_quantize_per_channel_affine.default: _fq_translation},
                dynamic=False,
            )
            extra = {**extra, "exporter": "dynamo"}
            variants[path.stem] = compare(path.stem, path, t_logits, X_te, y_te, extra)

    # (B) LSQ -------------------------------------------------------------------------------------------
    for bits in (8, 4):
        print(f"(B) LSQ QAT, int{bits} weights ...")
        model = train_lsq(state, bits, X_tr, y_tr)
        t_logits = torch_logits(model, X_te)
        qmin, qmax = WEIGHT_RANGES[bits]
        plain = DigitsQAT()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "_fq" not in k})
        plain.eval()
        f_logits = torch_logits(plain, X_te)
        path = OUT / f"digits_lsq_int{bits}.onnx"
        export_float_renamed(
            plain,
            path,
            f"digits CNN after LSQ QAT (int{bits} weights [{qmin},{qmax}], uint8 activations), BatchNorm folded, "
            f"float weights as trained; learned scales in {path.stem}.json; built by models/digits/qat_train.py",
        )
        sidecar = lsq_sidecar(model, bits, path.name)
        m = onnx.load(str(path))
        names = {t.name for t in m.graph.initializer} | {i.name for i in m.graph.input}
        names |= {o for n in m.graph.node for o in n.output}
        missing = [k for k in sidecar["tensors"] if k not in names]
        assert not missing, f"sidecar names not in the ONNX graph: {missing}"
        consumers = collections.Counter(
            n.input[i] for n in m.graph.node if n.op_type in ("Conv", "Gemm") for i in range(2)
        )
        assert set(consumers) <= set(sidecar["tensors"]), set(consumers) - set(sidecar["tensors"])
        write_atomically(path.with_suffix(".json"), (dumps(sidecar) + "\n").encode())
        sim = sidecar_qdq_model(m, sidecar)
        sim_logits = ort_logits(sim, X_te)
        sim_acc = float((sim_logits.argmax(1) == y_te).mean())
        sim_diff = float(np.abs(sim_logits - t_logits).max())
        beyond = differ = 0  # weights whose w/scale rounds outside the narrow range / lands elsewhere in full range
        for name in WEIGHT_LAYERS:
            layer = getattr(model, name)
            w = (layer.conv.weight if name != "fc" else layer.weight).detach().numpy()
            s = layer.weight_fq.qparams()[0].reshape(-1, *([1] * (w.ndim - 1)))
            r = np.round(w / s)
            beyond += int(((r < qmin) | (r > qmax)).sum())
            differ += int((np.clip(r, qmin, qmax) != np.clip(r, -qmax - 1, qmax)).sum())
        extra = {
            "style": "lsq",
            "exporter": "dynamo (float model, fake quant removed)",
            "weight_bits": bits,
            "weight_range": [qmin, qmax],
            "sidecar": path.with_suffix(".json").name,
        }
        row = compare(path.stem, path, f_logits, X_te, y_te, extra)
        row["torch_float_weights_acc"] = row.pop("torch_fake_quant_acc")
        row["torch_fake_quant_acc"] = float((t_logits.argmax(1) == y_te).mean())
        row["torch_float_weights_logits_head"] = row.pop("torch_logits_head")
        row["torch_fake_quant_logits_head"] = [[round(float(v), 5) for v in r] for r in t_logits[:N_LOGITS_HEAD]]
        row["onnxruntime_acc_note"] = "the ONNX file is the float model: its accuracy is the QAT weights in float"
        row["onnxruntime_sidecar_qdq_acc"] = sim_acc
        row["sidecar_qdq_max_abs_logit_diff_vs_torch"] = sim_diff
        row["weights_rounding_beyond_narrow_range"] = beyond
        row["weights_differing_if_quantized_to_full_range"] = differ
        print(
            f"  LSQ int{bits}: torch fake-quant {row['torch_fake_quant_acc']:.4f}, "
            f"float ONNX {row['onnxruntime_acc']:.4f}, "
            f"ONNX + sidecar as Q/DQ {sim_acc:.4f} (max|dlogit| {sim_diff:.2e}), weights beyond range {beyond}"
        )
        variants[path.stem] = row
        if bits == 8:
            path = OUT / "digits_lsq_int8_dynamo.onnx"
            export_dynamo(
                model,
                path,
                "digits CNN, LSQ QAT int8 weights [-127,127], uint8 activations, exported as is by the dynamo "
                "exporter (opset 18, default optimizer): fake quant written as arithmetic; "
                "built by models/digits/qat_train.py",
            )
            extra = {**extra, "exporter": "dynamo (LSQ fake quant in the graph)"}
            del extra["sidecar"]
            variants[path.stem] = compare(path.stem, path, t_logits, X_te, y_te, extra)

    results = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "eval": "models/digits/eval.npz (540 test images)",
        "onnxruntime_acc_settings": "CPUExecutionProvider, graph_optimization_level ORT_DISABLE_ALL (every node as "
        "written: the reference semantics)",
        "onnxruntime_acc_all_optimizations_note": "ORT_ENABLE_ALL fuses DQ->Conv/Gemm->Q into integer kernels and "
        "moves Q/DQ around MaxPool; not bit-true, and machine-dependent (u8 x s8 int16 saturation without VNNI); "
        "measured on the machine that ran this script",
        "float_acc": float_acc,
        "float_bn_folded_acc": folded_acc,
        "float_weights_equal_digits_cnn_onnx": bool(same_as_committed),
        "qat": {
            "epochs": QAT_EPOCHS,
            "lr": QAT_LR,
            "lsq_scale_lr": SCALE_LR,
            "observers_frozen_from_epoch": FREEZE_OBSERVERS_AT,
            "weights": "per-channel (axis 0) symmetric, int8 [-127,127] or int4 [-7,7]",
            "activations": "per-tensor asymmetric uint8 [0,255] on input, stem.relu out, concat out, pool out, "
            "flatten out",
        },
        "stock_exporter_errors": exporter_notes,
        "variants": variants,
    }
    write_atomically(RESULTS_PATH, (dumps(results) + "\n").encode())
    bad = [
        k
        for k, v in variants.items()
        if v["torch_fake_quant_acc"] != v.get("onnxruntime_sidecar_qdq_acc", v["onnxruntime_acc"])
    ]
    for k, v in variants.items():
        print(f"  {k:28s} {v['bytes']:7d} bytes  {v['op_histogram']}")
    print(f"done in {time.time() - t_start:.0f}s")
    if bad:
        print(f"ERROR: onnxruntime disagrees with torch for {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
