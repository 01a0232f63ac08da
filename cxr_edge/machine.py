"""Facts about the machine that every layer records the same way: library versions, usable cores, CPU and GPU.

Tuning keys its cache on them, the benchmark prints them beside its numbers, doctor reports them and every
manifest stores the toolchain; computing them once keeps those records comparable.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from .cpu_isa import RELEVANT_FLAGS, cpu_flags, cpu_model, isa_name

#: the distributions whose versions change what an artifact computes or how fast
TOOLCHAIN = ("cxr-edge", "tensorflow", "keras", "numpy", "opencv-python-headless", "onnx", "onnxruntime",
             "onnxruntime-gpu", "openvino", "tf2onnx", "tensorrt")


def package_version(dist: str) -> str | None:
    """The installed version of ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(dists: Iterable[str] = TOOLCHAIN) -> dict[str, str]:
    """Installed versions of ``dists``; those not installed are left out."""
    return {d: v for d in dists if (v := package_version(d)) is not None}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which is what a thread count should follow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_mhz() -> float | None:
    """The nominal clock /proc/cpuinfo reports, or None where it reports none."""
    try:
        m = re.search(r"cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
    return float(m.group(1)) if m else None


def gpu_names() -> str | None:
    """The NVIDIA GPUs the driver lists (bus ids), or None without the driver."""
    dev = Path("/proc/driver/nvidia/gpus")
    if dev.is_dir():
        return ", ".join(p.name for p in dev.iterdir()) or "nvidia"
    return None


@dataclass(frozen=True)
class MachineFacts:
    """What decides which configuration runs fastest here: CPU, its flags and ISA, usable cores, runtimes."""

    cpu: str
    flags: tuple[str, ...]
    isa: str
    usable_cores: int
    onnxruntime: str | None
    openvino: str | None

    @property
    def id(self) -> str:
        """A short stable key for caches measured on this machine."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "flags": list(self.flags), "id": self.id}


def machine_facts() -> MachineFacts:
    have = cpu_flags()
    return MachineFacts(cpu=cpu_model(), flags=tuple(f for f in RELEVANT_FLAGS if f in have), isa=isa_name(have),
                        usable_cores=usable_cores(),
                        onnxruntime=package_version("onnxruntime") or package_version("onnxruntime-gpu"),
                        openvino=package_version("openvino"))


def toolchain_versions() -> dict[str, str]:
    """Python, platform and the toolchain's versions, as every manifest records them."""
    return {"python": platform.python_version(), "platform": platform.platform(), **package_versions()}
