"""What the numbers were measured on, and what the CPU could do at best."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
from pathlib import Path

from ..cpu_isa import cpu_flags, isa_facts


def _cpuinfo() -> dict:
    """Model, clock and flags; the flags as cpu_isa reads them, so ``CXR_EDGE_CPU_FLAGS`` caps what bench reports too."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", text)
    mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
    flags = set(cpu_flags())
    return {"model": model.group(1).strip() if model else platform.processor(),
            "mhz": float(mhz.group(1)) if mhz else None, "flags": flags}


def machine_info() -> dict:
    """What the numbers were measured on: CPU, the ISA its INT8 kernels run with, cores, GPU, library versions."""
    cpu, isa = _cpuinfo(), isa_facts()
    wanted = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
              "amx_int8", "amx_bf16"]
    versions = {}
    for d in ("cxr-edge", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorflow", "keras",
              "opencv-python-headless", "tensorrt"):
        try:
            versions[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu_model": cpu["model"], "cpu_mhz": cpu["mhz"], "cpu_flags": [f for f in wanted if f in cpu["flags"]],
        "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "gpu": _gpu(), "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "int8_peak": int8_peak(cpu), "isa": isa["isa"], "isa_facts": isa,
    }


def _gpu() -> str | None:
    dev = Path("/proc/driver/nvidia/gpus")
    if dev.is_dir():
        return ", ".join(p.name for p in dev.iterdir()) or "nvidia"
    return None


def int8_peak(cpu: dict | None = None) -> dict:
    """Theoretical INT8 multiply-accumulates per second of the usable cores, per instruction set.

    Estimate = cores x clock x MACs per cycle per core: AVX-512 VNNI (VPDPBUSD: 64 int8 MACs per
    512-bit instruction, two FMA ports on Xeon) = 128; AVX-VNNI (256-bit) = 64; AMX-INT8 (TMUL: a
    16x64 by 64x16 tile product, 16 K-MACs, over 16 cycles) = 1024. The clock is /proc/cpuinfo's
    nominal MHz; turbo and shared hosts move the real figure, so treat the fraction as approximate.
    """
    cpu = cpu or _cpuinfo()
    cores = len(os.sched_getaffinity(0))
    ghz = (cpu["mhz"] or 0) / 1000
    out = {"cores": cores, "ghz": ghz}
    for name, flag, macs in (("amx_int8", "amx_int8", 1024), ("avx512_vnni", "avx512_vnni", 128),
                             ("avx_vnni", "avx_vnni", 64)):
        if flag in cpu["flags"]:
            out[f"{name}_gmacs"] = cores * ghz * macs
    return out
