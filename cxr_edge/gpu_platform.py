"""Which NVIDIA platform this is (x86 server with a CUDA 12 or 13 driver, a Jetson and its JetPack, or none), and
the install advice that follows from it.

Advice that ignores the platform was wrong where it mattered: on a JetPack 6 Jetson (CUDA 12.6, driver fixed by
the L4T release) "upgrade the driver to R525+" cannot be followed, and on a CUDA 13 host the CuPy wheel is
``cupy-cuda13x``, not ``cupy-cuda12x``. The driver's CUDA version is read from ``libcuda`` itself
(``cuDriverGetVersion``, no Python package needed), the Jetson release from ``/etc/nv_tegra_release``. Every
source is a parameter so the advice for each platform is tested without that platform.
"""

from __future__ import annotations

import platform as _platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: L4T release -> (JetPack, CUDA it ships); JetPack 6.1+ is what cxr-edge supports on Jetson
JETPACK = {"36.4.4": ("6.2.1", "12.6"), "36.4.3": ("6.2", "12.6"), "36.4": ("6.1", "12.6"), "36.3": ("6.0", "12.2"),
           "36.2": ("6.0 DP", "12.2"), "35": ("5.x", "11.4")}
#: cuda-python releases whose bindings run on JetPack 6.1/6.2's CUDA 12.6 (12.8+ link a newer runtime statically)
JETSON_CUDA_PYTHON = "cuda-python>=12.6,<12.7"


@dataclass(frozen=True)
class GpuPlatform:
    machine: str  # x86_64, aarch64
    jetson: bool
    l4t: str | None = None  # e.g. "36.4.3"
    driver_cuda: tuple[int, int] | None = None  # the CUDA version the installed driver supports

    @property
    def jetpack(self) -> str | None:
        return self._jetpack_row()[0] if self.jetson else None

    @property
    def jetpack_cuda(self) -> str | None:
        return self._jetpack_row()[1] if self.jetson else None

    def _jetpack_row(self) -> tuple[str | None, str | None]:
        rel = self.l4t or ""
        for key in sorted(JETPACK, key=len, reverse=True):  # most specific release first
            if rel == key or rel.startswith(key + "."):
                return JETPACK[key]
        return (None, None)

    @property
    def cuda_major(self) -> int | None:
        if self.jetson:
            return 12 if (self.jetpack_cuda or "12").startswith("12") else 11
        return self.driver_cuda[0] if self.driver_cuda else None

    def describe(self) -> str:
        if self.jetson:
            jp = f"JetPack {self.jetpack} (CUDA {self.jetpack_cuda})" if self.jetpack else "JetPack unknown"
            return f"Jetson, L4T R{self.l4t or '?'}: {jp}"
        if self.driver_cuda:
            return f"{self.machine}, NVIDIA driver for CUDA {self.driver_cuda[0]}.{self.driver_cuda[1]}"
        return f"{self.machine}, no NVIDIA driver (libcuda) found"

    # ---- advice
    def gpu_extra(self) -> str | None:
        """The install extra for this platform, or None where no GPU stack can run."""
        if self.jetson:
            return "cxr-edge[jetson]"
        return {12: "cxr-edge[gpu-cu12]", 13: "cxr-edge[gpu-cu13]"}.get(self.cuda_major or 0)

    def cupy_wheel(self) -> str:
        major = self.cuda_major
        if major in (12, 13):
            return f"cupy-cuda{major}x"
        return "cupy-cuda12x or cupy-cuda13x (the CUDA major nvidia-smi shows)"

    def install_fix(self) -> str:
        """What to install for the GPU stack here."""
        if self.jetson:
            if self.jetpack is None or not self.jetpack.startswith("6") or self.jetpack.startswith("6.0"):
                return (f"cxr-edge needs JetPack 6.1 or 6.2 on Jetson (this is L4T R{self.l4t or '?'}): flash or "
                        "upgrade JetPack with NVIDIA SDK Manager")
            return ("python3 -m venv --system-site-packages .venv (sees JetPack's TensorRT), then pip install "
                    "'cxr-edge[jetson]' (cuda-python 12.6, numpy<2) and onnxruntime-gpu from the Jetson AI Lab index "
                    "for JetPack 6 / CUDA 12.6")
        extra = self.gpu_extra()
        if extra:
            return f"pip install '{extra}'"
        if self.driver_cuda:
            return (f"the driver supports CUDA {self.driver_cuda[0]}.{self.driver_cuda[1]}: cxr-edge's GPU stack needs "
                    "CUDA 12 (driver R525+) or 13 (R580+); upgrade the NVIDIA driver")
        return ("no NVIDIA driver here, so no GPU path can run on this machine: on a GPU server install the NVIDIA "
                "driver first (CUDA 12: R525+, CUDA 13: R580+) and run cxr-edge doctor again; CPU only: pip install "
                "'cxr-edge[cpu]'")

    def driver_fix(self) -> str:
        """What to do when the CUDA runtime cannot use the driver (cudaErrorInsufficientDriver and the like)."""
        if self.jetson:
            return (f"JetPack {self.jetpack or '6'} ships CUDA {self.jetpack_cuda or '12.6'} and its driver cannot be "
                    f"upgraded on its own: keep cuda-python at 12.6 ({JETSON_CUDA_PYTHON}, what 'cxr-edge[jetson]' "
                    "pins), or install NVIDIA's cuda-compat package for the newer CUDA")
        if self.driver_cuda:
            return (f"this driver supports CUDA {self.driver_cuda[0]}.{self.driver_cuda[1]}: install the extra for "
                    f"that major ({self.gpu_extra() or 'none fits'}) or upgrade the driver (CUDA 12: R525+, CUDA 13: "
                    "R580+); nvidia-smi shows both")
        return "install the NVIDIA driver (CUDA 12: R525+, CUDA 13: R580+) and check nvidia-smi"


def _libcuda_version() -> int | None:
    """``cuDriverGetVersion`` from the driver library (e.g. 12040 for CUDA 12.4), or None without a driver."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        v = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
                return v.value
        except AttributeError:
            return None
    return None


def _l4t_release(root: Path) -> str | None:
    """``# R36 (release), REVISION: 4.3, ...`` -> ``36.4.3``."""
    try:
        text = (root / "etc" / "nv_tegra_release").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def detect(root: Path = Path("/"), driver_version: Callable[[], int | None] = _libcuda_version,
           machine: str | None = None, kernel: str | None = None) -> GpuPlatform:
    """This machine's platform; ``root``, ``driver_version``, ``machine`` and ``kernel`` stand in for it in tests."""
    l4t = _l4t_release(root)
    kernel = kernel if kernel is not None else _platform.release()
    jetson = l4t is not None or "tegra" in kernel
    v = driver_version()
    cuda = (v // 1000, (v % 1000) // 10) if v else None
    return GpuPlatform(machine or _platform.machine(), jetson, l4t, cuda)
