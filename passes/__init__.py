"""Built-in passes; each is an onnx-ir InPlacePass usable alone or in a user's PassManager."""

from .adaround import AdaRound
from .assign_precision import AssignPrecision
from .bias_correction import BiasCorrection
from .cleanup import Cleanup
from .equalize import Equalize
from .fold_batchnorm import FoldBatchNorm
from .fold_qat import FoldQAT
from .insert_qdq import InsertQDQ
from .lower_fp16 import LowerFP16
from .matmul_nbits import FromMatMulNBits, ToMatMulNBits
from .mixed_precision import MixedPrecision
from .quantize_dynamic import QuantizeDynamic
from .quantize_weights import QuantizeWeights
from .search_ranges import SearchRanges
from .simplify import Simplify
from .smooth_quant import SmoothQuant
from .upcast_fp16 import UpcastFP16
from .upgrade_opset import UpgradeOpset

__all__ = [
    "AdaRound",
    "AssignPrecision",
    "BiasCorrection",
    "Cleanup",
    "Equalize",
    "FoldBatchNorm",
    "FoldQAT",
    "FromMatMulNBits",
    "InsertQDQ",
    "LowerFP16",
    "MixedPrecision",
    "QuantizeDynamic",
    "QuantizeWeights",
    "SearchRanges",
    "Simplify",
    "SmoothQuant",
    "ToMatMulNBits",
    "UpcastFP16",
    "UpgradeOpset",
]
