"""``cxr-edge doctor``: what this machine can run, and for what it cannot, the exact reason and fix.

Everything is probed, not assumed: ONNX Runtime providers are *created* on a one-node model (the
GPU package lists CUDA and TensorRT providers even where their libraries are missing), CUDA is asked
for devices through cuda-python, TensorRT is imported and its API generation read. Nothing is
installed or downloaded; each probe is isolated so one broken library cannot hide the others.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .gpu_platform import GpuPlatform, detect
from .machine import package_version

log = logging.getLogger(__name__)


@dataclass
class Probe:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Report:
    probes: list[Probe] = field(default_factory=list)
    matrix: list[dict] = field(default_factory=list)

    def get(self, name: str) -> Probe | None:
        return next((p for p in self.probes if p.name == name), None)

    def to_dict(self) -> dict:
        return {"probes": [p.__dict__ for p in self.probes], "matrix": self.matrix}


_version = package_version


def is_jetson() -> bool:
    return detect(driver_version=lambda: None).jetson


def probe_packages(plat: GpuPlatform | None = None) -> Probe:
    plat = plat or detect()
    gpu = plat.gpu_extra()
    both = [d for d in ("onnxruntime", "onnxruntime-gpu") if _version(d)]
    if len(both) == 2:
        return Probe("onnxruntime packages", False, "both onnxruntime and onnxruntime-gpu are installed: they "
                     "overwrite each other's files and the CUDA provider can vanish",
                     "pip uninstall -y onnxruntime onnxruntime-gpu, then "
                     + (f"pip install '{gpu}' (GPU) or 'cxr-edge[cpu]'" if gpu else "pip install 'cxr-edge[cpu]'"))
    if not both:
        return Probe("onnxruntime packages", False, "no ONNX Runtime installed", "pip install 'cxr-edge[cpu]'")
    return Probe("onnxruntime packages", True, f"{both[0]} {_version(both[0])}")


def probe_cuda(plat: GpuPlatform | None = None) -> Probe:
    plat = plat or detect()
    try:
        from .runtime.backends.tensorrt_api import check_cuda, cuda_device, require_cudart

        cudart = require_cudart()
    except Exception as exc:
        return Probe("CUDA", False, "cuda-python (cuda.bindings) is not installed" if isinstance(exc, ImportError)
                     else str(exc).splitlines()[0][:160], plat.install_fix())
    try:
        n = check_cuda(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        gpu = cuda_device(0) if n else None
    except Exception as exc:
        return Probe("CUDA", False, str(exc).splitlines()[0], plat.driver_fix())
    if gpu is None:
        return Probe("CUDA", False, "the CUDA runtime sees no GPU", "check nvidia-smi and the driver")
    return Probe("CUDA", True, f"{n} GPU(s): {gpu.name} (sm {gpu.compute_capability}); driver CUDA {gpu.driver}, "
                 f"runtime {gpu.runtime}")


def probe_cudnn(plat: GpuPlatform | None = None) -> Probe:
    for lib in ("libcudnn.so.9", "libcudnn.so.8"):
        try:
            import ctypes

            ctypes.CDLL(lib)
            return Probe("cuDNN", True, f"{lib} loads")
        except OSError:
            continue
    wheel = _version("nvidia-cudnn-cu12") or _version("nvidia-cudnn-cu13")
    if wheel:
        return Probe("cuDNN", True, f"nvidia-cudnn wheel {wheel} (ONNX Runtime preloads it)")
    plat = plat or detect()
    if plat.jetson:
        return Probe("cuDNN", False, "no cuDNN library found", "cuDNN comes with JetPack (sudo apt install nvidia-jetpack)")
    extra = plat.gpu_extra()
    return Probe("cuDNN", False, "no cuDNN library found",
                 f"pip install '{extra}' brings it as a wheel" if extra else plat.install_fix())


def probe_tensorrt(plat: GpuPlatform | None = None) -> Probe:
    from .runtime.backends.tensorrt_api import require_tensorrt, tensorrt_installed

    plat = plat or detect()
    if not tensorrt_installed():
        fix = ("TensorRT comes with JetPack 6.1+: make the venv with --system-site-packages" if plat.jetson
               else plat.install_fix())
        return Probe("TensorRT", False, "the tensorrt package is not installed", fix)
    try:
        _, flavor = require_tensorrt()
    except Exception as exc:
        return Probe("TensorRT", False, str(exc).splitlines()[0][:200], "see the message")
    typing = flavor.to_dict()["typing"]
    note = "; ONNX Runtime's TensorRT EP needs TensorRT 10 (it links libnvinfer.so.10)" if flavor.major >= 11 else ""
    return Probe("TensorRT", True, f"TensorRT {flavor.version} ({typing}){note}")


def _tiny_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def probe_ort_providers(plat: GpuPlatform | None = None) -> list[Probe]:
    """Create a session on each listed provider and read back which one really runs (TensorRT's libraries loaded
    first, as the ONNX Runtime backend does)."""
    plat = plat or detect()
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return [Probe("ONNX Runtime", False, "onnxruntime not importable", "pip install 'cxr-edge[cpu]'")]
    out = []
    listed = ort.get_available_providers()
    if "TensorrtExecutionProvider" in listed:
        from .runtime.backends.ort_providers import preload_tensorrt_libs

        found = preload_tensorrt_libs()
        out.append(Probe("TensorRT libraries for ORT", found.startswith("loaded") and "not loaded" not in found, found,
                         "" if found.startswith("loaded") else _ort_fix("TensorrtExecutionProvider", plat)))
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "probe.onnx"
        _tiny_model(model)
        so = ort.SessionOptions()
        so.log_severity_level = 4
        for prov in listed:
            short = prov.replace("ExecutionProvider", "")
            try:
                s = ort.InferenceSession(str(model), so, providers=[prov])
                s.run(None, {"x": np.ones((1, 4), np.float32)})
                used = s.get_providers()[0]
            except Exception as exc:
                out.append(Probe(f"ORT {short}", False, f"listed, but creating a session failed: "
                                 f"{str(exc).splitlines()[0][:160]}", _ort_fix(prov, plat)))
                continue
            if used != prov:
                out.append(Probe(f"ORT {short}", False, f"listed, but a session asked for it runs on {used}",
                                 _ort_fix(prov, plat)))
            else:
                out.append(Probe(f"ORT {short}", True, f"onnxruntime {ort.__version__}: a session runs on it"))
    pkg = "onnxruntime-gpu" if _version("onnxruntime-gpu") else "onnxruntime"
    for prov in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if prov not in listed:
            out.append(Probe(f"ORT {prov.replace('ExecutionProvider', '')}", False,
                             f"not part of this {pkg} build", _ort_fix(prov, plat)))
    return out


def _ort_fix(prov: str, plat: GpuPlatform) -> str:
    if plat.jetson:
        stack = "JetPack's TensorRT (venv --system-site-packages) and onnxruntime-gpu from the Jetson AI Lab index"
    elif plat.gpu_extra():
        stack = f"pip install '{plat.gpu_extra()}'"
    else:
        return plat.install_fix()
    if prov == "TensorrtExecutionProvider":
        return (f"needs libnvinfer.so.10 (TensorRT 10) and a GPU: {stack}; TensorRT 11 disables this EP (use cxr-edge "
                "build for native engines)")
    if prov == "CUDAExecutionProvider":
        return f"needs a GPU, the CUDA runtime and cuDNN of onnxruntime-gpu's CUDA major: {stack}"
    return "reinstall onnxruntime"


def probe_cupy(plat: GpuPlatform | None = None) -> Probe:
    plat = plat or detect()
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        return Probe("CuPy", bool(n), f"cupy {cupy.__version__}, {n} device(s)")
    except ImportError:
        return Probe("CuPy", False, "not installed (optional: GPU preprocessing)", f"pip install {plat.cupy_wheel()}")
    except Exception as exc:
        return Probe("CuPy", False, str(exc).splitlines()[0][:160], plat.driver_fix())


def probe_openvino() -> Probe:
    try:
        import openvino as ov

        devs = ov.Core().available_devices
        return Probe("OpenVINO", True, f"openvino {ov.__version__}: devices {devs}")
    except ImportError:
        return Probe("OpenVINO", False, "not installed (optional CPU backend)", "pip install 'cxr-edge[openvino]'")
    except Exception as exc:
        return Probe("OpenVINO", False, str(exc).splitlines()[0][:160], "reinstall openvino")


def _matrix(r: Report) -> list[dict]:
    def ok(name: str) -> bool:
        p = r.get(name)
        return bool(p and p.ok)

    def why(name: str) -> str:
        p = r.get(name)
        if p is None:
            return f"{name}: not probed"
        return p.detail + (f" -> {p.fix}" if p.fix else "")

    from .precision import EXPORTED_PRECISIONS, Int8Target, Precision, Variant

    rows = []
    variants = [Variant(p) for p in EXPORTED_PRECISIONS if p is not Precision.INT8]
    variants += [Variant(Precision.INT8, t) for t in Int8Target]
    for v in variants:
        prec = v.tag
        rows.append({"backend": "onnxruntime CPU", "precision": prec,
                     "status": "will run" if ok("ORT CPU") else why("ORT CPU")})
        rows.append({"backend": "onnxruntime CUDA", "precision": prec,
                     "status": "will run" if ok("ORT CUDA") else why("ORT CUDA")})
        trt_ep = (f"not for this artifact: {prec} has U8 activations, CPU-only "
                  f"(use {Variant(Precision.INT8, Int8Target.TRT).tag})"
                  if v.int8_target is not None and v.int8_target.for_cpu_runtimes
                  else "will run" if ok("ORT Tensorrt") else why("ORT Tensorrt"))
        rows.append({"backend": "onnxruntime TensorRT EP", "precision": prec, "status": trt_ep})
        rows.append({"backend": "OpenVINO", "precision": prec, "status": "will run" if ok("OpenVINO") else why("OpenVINO")})
    for prec in (p.value for p in EXPORTED_PRECISIONS):
        missing = [n for n in ("TensorRT", "CUDA") if not ok(n)]
        rows.append({"backend": "TensorRT engine (cxr-edge build)", "precision": prec,
                     "status": "will run" if not missing else "; ".join(why(n) for n in missing)})
    return rows


def probe_cpu_isa() -> Probe:
    """The ISA CPU runtimes run INT8 with: without VNNI/AMX, u8 x s8 products saturate in int16, so INT8 answers
    here can differ from those the export gate measured (the load-time self-check then refuses the artifact)."""
    from .cpu_isa import isa_facts

    f = isa_facts()
    if f["exact_int8_dot_products"]:
        return Probe("CPU ISA", True, f"{f['cpu']}: {f['isa']} (INT8 dot products accumulate exactly in int32)")
    return Probe("CPU ISA", True, f"{f['cpu']}: {f['isa']}, no VNNI/AMX: INT8 kernels on this CPU saturate in int16 "
                 "and may drift from FP32 beyond an artifact's band (the load-time self-check says so; int8-cpu and "
                 "int8-ov are gated on CPU kernels, int8-trt is made for TensorRT, fp32 may be as fast here)")


def run_doctor(plat: GpuPlatform | None = None) -> Report:
    """Every probe, with install advice for this platform (``plat`` stands in for it in tests)."""
    plat = plat or detect()
    r = Report()
    r.probes.append(Probe("machine", True, f"{platform.machine()} {platform.system()} {platform.release()}, "
                          f"Python {platform.python_version()}, {os.cpu_count()} CPUs"))
    r.probes.append(Probe("GPU platform", plat.driver_cuda is not None or plat.jetson, plat.describe(),
                          plat.install_fix()))
    r.probes.append(probe_cpu_isa())
    for fn in (probe_packages, probe_cuda, probe_cudnn, probe_tensorrt, probe_cupy):
        r.probes.append(fn(plat))
    r.probes.append(probe_openvino())
    r.probes += probe_ort_providers(plat)
    r.matrix = _matrix(r)
    return r


def format_report(r: Report) -> str:
    lines = ["# cxr-edge doctor", ""]
    for p in r.probes:
        lines.append(f"[{'ok' if p.ok else '--'}] {p.name}: {p.detail}" + (f"\n      fix: {p.fix}" if p.fix and not p.ok else ""))
    gpu = [m for m in r.matrix if "CPU" not in m["backend"] and "OpenVINO" not in m["backend"]]
    runs = sorted({m["backend"] for m in gpu if m["status"] == "will run"})
    lines += ["", f"GPU paths that can run here: {', '.join(runs)}" if runs else
              "No GPU path can run here (reasons and fixes above and in the table)."]
    lines += ["", "| backend | precision | status |", "|---|---|---|"]
    lines += [f"| {m['backend']} | {m['precision']} | {m['status']} |" for m in r.matrix]
    return "\n".join(lines)
