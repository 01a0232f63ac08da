"""What the TensorRT and CUDA-runtime Python APIs look like on this machine, and the checks every caller needs.

Two TensorRT API generations are supported and they differ in kind, not detail:

- **TensorRT 10.x** (JetPack 6.1/6.2 ship 10.3; x86 up to 10.16) is *weakly typed* by default: the
  builder picks layer precisions, allowed by ``BuilderFlag.FP16/INT8``; implicit INT8 calibration
  (``IInt8EntropyCalibrator2``) still exists and is what Jetson DLA needs.
- **TensorRT 11.x** removed weak typing: no ``FP16``/``INT8`` builder flags, no ``platform_has_fast_*``,
  no calibrators. Every network is strongly typed, so an engine computes in the types its ONNX graph
  states: FP16 engines come from ``model.fp16.onnx``, INT8 from the QDQ ``int8-trt`` graph.

TensorRT 8.x (JetPack 6.0 and older) is refused with what to upgrade. The names this module and the
build/run code use, and how they use them (a method called with arguments one real overload takes, a property
read or assigned as the real one allows), are checked against the real bindings of 10.3, 10.16 and 11.4 and of
cuda-bindings 12 and 13 by ``tests/test_tensorrt_api.py`` (fixtures made by ``tests/fixtures/make_tensorrt_api.py``).

Imports are lazy: this module itself imports nothing from TensorRT or CUDA until a function needs it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError, EngineError, ManifestError, MissingExtraError
from ...manifest import Manifest
from ...manifest_schema import EngineBuild
from ...precision import Precision

log = logging.getLogger(__name__)

SUPPORTED_MAJORS = (10, 11)
TRT_HINT = ("TensorRT engines need the 'tensorrt' Python package, which is not installed. On an x86 GPU server: "
            "pip install 'cxr-edge[gpu-cu12]' (CUDA 12 driver) or 'cxr-edge[gpu-cu13]' (CUDA 13, R580+ driver); "
            "on Jetson, TensorRT comes with JetPack: create the venv with --system-site-packages (README, "
            "'GPU servers and Jetson').")
CUDA_HINT = ("The TensorRT backend needs cuda-python (cuda.bindings): pip install 'cxr-edge[gpu-cu12]' "
             "(or gpu-cu13); on Jetson with JetPack 6 (CUDA 12.6): pip install 'cuda-python>=12.6,<13'.")


@dataclass(frozen=True)
class TensorRTFlavor:
    """The TensorRT generation in use, which decides how precision is expressed."""

    version: str
    major: int

    @property
    def strongly_typed_only(self) -> bool:
        return self.major >= 11

    @property
    def has_implicit_int8(self) -> bool:
        """Calibrator-based INT8 (needed by DLA on TensorRT 10); removed in 11."""
        return self.major < 11

    def to_dict(self) -> dict:
        return {"version": self.version, "major": self.major,
                "typing": "strongly typed only" if self.strongly_typed_only else "weakly typed (builder flags)"}


def flavor_of(version: str) -> TensorRTFlavor:
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise EngineError(f"Cannot read the TensorRT version {version!r}.") from None
    if major < SUPPORTED_MAJORS[0]:
        raise ConfigError(
            f"TensorRT {version} is too old: cxr-edge needs TensorRT 10 or 11 (explicit batch, execute_async_v3, "
            "named tensors). On Jetson, upgrade to JetPack 6.1 or later (TensorRT 10.3); on a server, "
            "pip install 'cxr-edge[gpu-cu12]'."
        )
    if major > SUPPORTED_MAJORS[-1]:
        raise ConfigError(
            f"TensorRT {version} is newer than this cxr-edge knows (it supports {SUPPORTED_MAJORS[0]}.x-"
            f"{SUPPORTED_MAJORS[-1]}.x); pin tensorrt<{SUPPORTED_MAJORS[-1] + 1} or upgrade cxr-edge."
        )
    return TensorRTFlavor(str(version), major)


def tensorrt_installed() -> bool:
    """True only for a real TensorRT module: ``tensorrt-stubs`` leaves a ``tensorrt/`` folder of ``.pyi``
    files that Python imports as an empty namespace package."""
    import importlib.util
    import sys

    loaded = sys.modules.get("tensorrt")
    if loaded is not None:
        return hasattr(loaded, "Builder")
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin not in (None, "namespace")


def require_tensorrt() -> tuple[Any, TensorRTFlavor]:
    """The imported ``tensorrt`` module and its flavour; a clear error when missing or unsupported."""
    if not tensorrt_installed():  # checked before importing: stubs would import as an empty namespace package
        raise MissingExtraError(TRT_HINT)
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingExtraError(TRT_HINT) from exc
    return trt, flavor_of(getattr(trt, "__version__", "0"))


def require_cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime`` since 12.6, ``cuda.cudart`` before)."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # cuda-python < 12.6
    except ImportError as exc:
        raise MissingExtraError(CUDA_HINT) from exc
    return cudart


def check_cuda(result: Any, what: str) -> Any:
    """Unwrap a cuda-python ``(err, *values)`` result; a non-zero error raises :class:`EngineError`.

    cuda-python never raises on CUDA errors: it returns them first in a tuple, so an unchecked call
    fails silently and the next one reads garbage.
    """
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"{what} failed: {getattr(err, 'name', err)}. Check the GPU and driver with: cxr-edge doctor")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else tuple(rest)


def check_trt(ok: Any, what: str) -> None:
    """TensorRT reports many failures as a False return value, not an exception."""
    if ok is False or ok is None:
        raise EngineError(f"TensorRT refused {what}. Run with -v to see TensorRT's log.")


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    cuda_driver: str | None = None  # the newest CUDA the driver supports
    cuda_runtime: str | None = None  # the CUDA runtime library loaded in this process (None: none could be loaded)
    cuda_bindings: str | None = None  # the CUDA version cuda-python's runtime bindings were built for

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CudaDevice:
    """What the CUDA runtime says about one GPU (no TensorRT needed: ``cxr-edge doctor`` uses it too)."""

    name: str
    compute_capability: str
    driver: str | None
    runtime: str | None  # the libcudart loaded here (getLocalRuntimeVersion), not the bindings' build version
    bindings_runtime: str | None = None  # cuda-python's cudaRuntimeGetVersion(): a constant of its build


def cuda_device(device: int | None = None) -> CudaDevice:
    """One GPU's name, compute capability and CUDA versions; ``None``: the calling thread's current device."""
    cudart = require_cudart()
    if device is None:
        device = current_device_index()
    props = check_cuda(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    drv = check_cuda(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    built = check_cuda(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    return CudaDevice(name.strip("\x00").strip(), f"{props.major}.{props.minor}", _cuda_version(drv),
                      loaded_runtime_version(cudart), _cuda_version(built))


def loaded_runtime_version(cudart: Any) -> str | None:
    """The version of the CUDA runtime library this process loads, or None when none can be loaded.

    cuda-python's ``cudaRuntimeGetVersion()`` does not ask a library: it returns the CUDA version the bindings
    were compiled for (NVIDIA/cuda-python#16). ``getLocalRuntimeVersion()`` (cuda-python >= 12.3) loads the
    ``libcudart`` found on the library path and asks it; it raises when there is none (NVIDIA/cuda-python#89).
    """
    try:
        result = cudart.getLocalRuntimeVersion()
    except (AttributeError, RuntimeError, OSError) as exc:
        log.debug("no CUDA runtime library version: %s", exc)
        return None
    err, *rest = result
    return _cuda_version(rest[0]) if int(err) == 0 and rest else None


def current_device_index() -> int:
    """The calling thread's current CUDA device (CUDA keeps one per host thread; a new thread starts on 0)."""
    return int(check_cuda(require_cudart().cudaGetDevice(), "cudaGetDevice"))


def current_device(device: int | None = None) -> DeviceInfo:
    """The GPU engines would be built for or run on: its name and compute capability decide compatibility.

    ``None`` is the calling thread's current device: the one TensorRT's builder uses, and the one a backend
    without a ``device_index`` runs on.
    """
    _, flavor = require_tensorrt()
    gpu = cuda_device(device)
    return DeviceInfo(gpu.name, gpu.compute_capability, flavor.version, gpu.driver, gpu.runtime, gpu.bindings_runtime)


def _cuda_version(v: Any) -> str | None:
    """CUDA encodes versions as 1000 * major + 10 * minor."""
    return f"{int(v) // 1000}.{int(v) % 1000 // 10}" if v else None


def check_engine_compat(engine_doc: Manifest, device: DeviceInfo, engine_path: str | Path = "the engine") -> None:
    """Engines are tied to one GPU model and TensorRT version; say how to rebuild when they differ."""
    built = engine_doc.device
    problems = []
    if built is None or built.tensorrt_version != device.tensorrt_version:
        problems.append(f"TensorRT {built.tensorrt_version if built else None} vs {device.tensorrt_version} here")
    if built is None or built.compute_capability != device.compute_capability or built.gpu_name != device.gpu_name:
        problems.append(f"built on {built.gpu_name if built else None} (sm {built.compute_capability if built else None}), "
                        f"this is {device.gpu_name} (sm {device.compute_capability})")
    if problems:
        src = engine_doc.source_onnx.file if engine_doc.source_onnx is not None else "MODEL.onnx"
        b = engine_doc.build or EngineBuild(Precision.FP16)  # the defaults of cxr-edge build
        raise ManifestError(
            f"{engine_path} cannot run here: " + "; ".join(problems) + ". Rebuild it on this machine: "
            f"cxr-edge build {src} --precision {b.precision.value} --batch {b.min_batch},{b.opt_batch},{b.max_batch}"
        )
