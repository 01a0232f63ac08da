"""What the numbers were measured on, and what the CPU could do at best."""

from __future__ import annotations

import os
import platform

from ..cpu_isa import cpu_flags, cpu_model, isa_facts
from ..machine import cpu_mhz, gpu_names, package_versions, usable_cores


def _cpuinfo() -> dict:
    """Model, clock and flags; the flags as cpu_isa reads them, so ``CXR_EDGE_CPU_FLAGS`` caps what bench reports too."""
    return {"model": cpu_model(), "mhz": cpu_mhz(), "flags": set(cpu_flags())}


def machine_info() -> dict:
    """What the numbers were measured on: CPU, the ISA its INT8 kernels run with, cores, GPU, library versions."""
    cpu, isa = _cpuinfo(), isa_facts()
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_int8", "amx_bf16"]
    versions = package_versions(("cxr-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorflow", "keras",
                                 "opencv-python-headless", "tensorrt"))
    return {
        "cpu_model": cpu["model"], "cpu_mhz": cpu["mhz"], "cpu_flags": [f for f in wanted if f in cpu["flags"]],
        "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
        "gpu": gpu_names(), "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "int8_peak": int8_peak(cpu), "isa": isa["isa"], "isa_facts": isa,
    }


def int8_peak(cpu: dict | None = None) -> dict:
    """Theoretical INT8 multiply-accumulates per second of the usable cores, per instruction set.

    Estimate = cores x clock x MACs per cycle per core: AVX-512 VNNI (VPDPBUSD: 64 int8 MACs per
    512-bit instruction, two FMA ports on Xeon) = 128; AVX-VNNI (256-bit) = 64; AMX-INT8 (TMUL: a
    16x64 by 64x16 tile product, 16 K-MACs, over 16 cycles) = 1024. The clock is /proc/cpuinfo's
    nominal MHz; turbo and shared hosts move the real figure, so treat the fraction as approximate.
    """
    cpu = cpu or _cpuinfo()
    cores = usable_cores()
    ghz = (cpu["mhz"] or 0) / 1000
    out = {"cores": cores, "ghz": ghz}
    for name, flag, macs in (("amx_int8", "amx_int8", 1024), ("avx512_vnni", "avx512_vnni", 128),
                             ("avx_vnni", "avx_vnni", 64)):
        if flag in cpu["flags"]:
            out[f"{name}_gmacs"] = cores * ghz * macs
    return out
