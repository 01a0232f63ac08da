"""Which instruction set this CPU runs INT8 and float kernels with, named the way gates and results report it.

INT8 answers depend on it: x86 without VNNI multiplies u8 x s8 pairs with ``vpmaddubsw``, whose int16
intermediate saturates, while VNNI/AMX and TensorRT accumulate exactly in int32. A gate measured on one
and an engine run on the other can disagree (benchmarks/results/gate_numerics/), so every gate and every
load-time self-check records the ISA it ran on.

``CXR_EDGE_CPU_FLAGS`` (space-separated /proc/cpuinfo flags) replaces what the probe reads: tests force an
ISA with it, and a CI step caps it to AVX2 together with oneDNN's ``ONEDNN_MAX_CPU_ISA`` so that what
cxr-edge *reports* matches what the capped libraries run. It never changes what ONNX Runtime's own
kernels use (MLAS dispatches on CPUID and has no cap).
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

FLAGS_ENV = "CXR_EDGE_CPU_FLAGS"
#: the flags that decide which INT8 / bf16 kernels a CPU runtime picks (reported in fingerprints)
RELEVANT_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                  "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "bf16", "sve")

# strongest first: (name, flag that implies it)
_X86_LADDER = (("AMX", "amx_int8"), ("AVX-512 VNNI", "avx512_vnni"), ("AVX-VNNI", "avx_vnni"),
               ("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"), ("SSE4.2", "sse4_2"))
_ARM_LADDER = (("ARMv8 I8MM", "i8mm"), ("ARMv8 dot-product", "asimddp"), ("ARMv8 NEON", "asimd"))
#: ISAs whose INT8 dot products accumulate exactly in int32 (no int16 saturation)
EXACT_INT8_ISAS = {"AMX", "AVX-512 VNNI", "AVX-VNNI", "ARMv8 I8MM", "ARMv8 dot-product"}


@lru_cache(maxsize=1)
def _probe() -> tuple[str, frozenset[str]]:
    model = platform.processor() or platform.machine()
    flags: frozenset[str] = frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "CPU part") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def cpu_model() -> str:
    return _probe()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, or those ``CXR_EDGE_CPU_FLAGS`` forces."""
    forced = os.environ.get(FLAGS_ENV)
    if forced is not None:
        return frozenset(forced.replace(",", " ").split())
    return _probe()[1]


def isa_name(flags: frozenset[str] | set[str] | None = None) -> str:
    """The strongest ISA the flags give for INT8 work: ``AMX``, ``AVX-512 VNNI``, ``AVX2``, ``ARMv8 NEON``..."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    for name, flag in _X86_LADDER + _ARM_LADDER:
        if flag in flags:
            return name
    return platform.machine() or "unknown"


def isa_facts() -> dict:
    """What gates and self-checks record about the CPU they measured on."""
    flags = cpu_flags()
    isa = isa_name(flags)
    return {"isa": isa, "cpu": cpu_model(), "flags": sorted(f for f in RELEVANT_FLAGS if f in flags),
            "exact_int8_dot_products": isa in EXACT_INT8_ISAS, "forced": os.environ.get(FLAGS_ENV) is not None}
