"""What this CPU's onnxruntime integer kernels can do, for defaults that depend on it."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# x86 instructions that multiply u8·s8 and accumulate in int32 (no int16 pair sums to saturate).
_INT32_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@cache
def x86_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


@cache
def int8_pairs_saturate() -> bool:
    """Whether onnxruntime's u8·s8 kernels here add product pairs in int16 (x86 without VNNI), where full 8-bit
    weights saturate; assumed so on x86 when the flags cannot be read, since 7-bit weights are always safe."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False  # ARM's sdot/i8mm and others accumulate in int32
    flags = x86_flags()
    return not flags or not (flags & _INT32_DOT_FLAGS)
