"""ONNX Runtime execution providers: which ones an artifact may use, and their options.

The TensorRT EP is offered only to artifacts TensorRT can take: FP32/FP16 graphs and the S8S8
``int8-trt`` QDQ graph. onnxruntime-gpu always *lists* the TensorRT EP, and giving it the U8S8
``int8-cpu`` graph makes session creation raise, so on a GPU server ``device="auto"`` with that
artifact would fail instead of running on CUDA.

The TensorRT EP compiles engines and caches them on disk; ONNX Runtime deserialises cached engines
without any hash or signature check. So the cache is private (0700, in the user's cache directory,
never beside a possibly read-only or shared artifact), keyed by the artifact's sha256 so that a
swapped model never meets an old engine, and switched off when the operator asked for signed
artifacts (``--trusted-key``): there, engines are rebuilt at every start.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from pathlib import Path

from ...errors import ConfigError
from ...manifest import Manifest
from ...precision import Int8Target, Precision

log = logging.getLogger(__name__)

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
GPU_PROVIDERS = {PROVIDERS["tensorrt"], PROVIDERS["cuda"]}
DEFAULT_PROFILE = (1, 8, 32)

#: cuDNN convolution algorithm choice for the CUDA EP. ONNX Runtime's default, EXHAUSTIVE, benchmarks every
#: algorithm the first time each input shape is seen: with dynamic batching every new batch size stalls
#: one request for hundreds of ms. HEURISTIC asks cuDNN's heuristics once, at a few percent of speed on
#: some convolutions; pass cudnn_conv_algo_search="EXHAUSTIVE" for fixed-batch offline runs.
CUDNN_CONV_ALGO_SEARCH = "HEURISTIC"


#: what ONNX Runtime's TensorRT EP opens by soname, in load order; pip's ``tensorrt-cuXX-libs`` puts them in
#: ``site-packages/tensorrt_libs``, where the dynamic loader never looks, and only ``import tensorrt`` loads them.
#: Without them the EP is listed, session creation silently skips it and the session runs on CUDA.
TENSORRT_EP_LIBS = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
_dlopen = ctypes.CDLL  # the loader (tests put a recording loader here)
_preloaded: str | None = None


def preload_tensorrt_libs() -> str:
    """Load TensorRT 10's libraries from the pip package (``tensorrt_libs``) with RTLD_GLOBAL, once per process,
    before a session asks for the TensorRT EP; returns what was found (logged, and shown by ``cxr-edge doctor``).
    Where no pip package is installed (JetPack, a system TensorRT) the system loader path is left to find them."""
    global _preloaded
    if _preloaded is not None:
        return _preloaded
    spec = importlib.util.find_spec("tensorrt_libs")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        _preloaded = "no pip TensorRT libraries (tensorrt_libs) installed: the system loader path must provide them"
        return _preloaded
    folder = Path(folders[0])
    loaded, failed = [], []
    for name in TENSORRT_EP_LIBS:
        path = folder / name
        if not path.exists():
            failed.append(f"{name} missing")
            continue
        try:
            _dlopen(str(path), mode=ctypes.RTLD_GLOBAL)
            loaded.append(name)
        except OSError as exc:
            failed.append(f"{name}: {str(exc).splitlines()[0][:120]}")
    _preloaded = (f"loaded {', '.join(loaded)} from {folder}" if loaded else f"nothing loaded from {folder}") + (
        f"; not loaded: {'; '.join(failed)}" if failed else "")
    (log.info if loaded and not failed else log.warning)("TensorRT EP libraries: %s", _preloaded)
    return _preloaded


class ProviderFallbackError(ConfigError):
    """A GPU provider was required (``--device cuda`` / ``--require-gpu``) but cannot be used here."""


def tensorrt_compatible(doc: Manifest | None) -> tuple[bool, str]:
    """Whether TensorRT (native or through the EP) can take this ONNX artifact (None: nothing known against it), and
    why not."""
    if doc is not None and doc.precision is Precision.INT8 and doc.int8_target is not Int8Target.TRT:
        target = doc.int8_target.value if doc.int8_target is not None else None
        return False, (f"its INT8 graph ({target} flavour) has unsigned (U8) activations, which "
                       "TensorRT does not take; "
                       "use model.int8-trt.onnx for TensorRT")
    return True, ""


def profile_for(max_batch: int | None, min_batch: int = 1) -> tuple[int, int, int]:
    """An optimisation profile covering ``min_batch..max_batch``, optimised for a mid-size batch."""
    hi = int(max_batch or DEFAULT_PROFILE[2])
    if hi < min_batch:
        raise ConfigError(f"Batch range {min_batch}..{hi} is empty; the maximum batch must be >= {min_batch}.")
    return (min_batch, min(max(min_batch, DEFAULT_PROFILE[1]), hi), hi)


def private_cache_dir(sha256: str, kind: str = "ort-trt") -> Path | None:
    """``$XDG_CACHE_HOME/cxr-edge/<kind>/<sha256 prefix>``, created 0700; None when it cannot be created."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-edge" / kind
    path = root / sha256[:32]
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as exc:
        log.warning("cannot create the TensorRT engine cache %s (%s): engines will be rebuilt at every start", path, exc)
        return None
    return path


def tensorrt_ep_options(doc: Manifest, batch: tuple[int, int, int] = DEFAULT_PROFILE,
                        cache_dir: str | Path | None = None, dump_ep_context: bool = False) -> dict:
    """Provider options for ONNX Runtime's TensorRT EP: precision from the artifact, the given profile.

    ``cache_dir=None`` disables the engine and timing caches (signed-only deployments).
    """
    ok, why = tensorrt_compatible(doc)
    if not ok:
        raise ConfigError(f"The TensorRT EP cannot run this artifact: {why}.")
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"Batch range {lo},{opt},{hi} is invalid: need 1 <= MIN <= OPT <= MAX (e.g. 1,8,32).")
    precision = doc.precision
    if not doc.inputs:
        raise ConfigError("The manifest names no graph input, which the TensorRT EP's profile needs; re-export the artifact.")
    inp = doc.inputs[0].name
    h, w, c = doc.preprocess.input_shape
    fmt = lambda b: f"{inp}:{b}x{h}x{w}x{c}"
    opts = {
        # fp16: FP32 graphs may run FP16 layers where TensorRT finds them faster (the EP is weakly typed);
        # an fp16 artifact computes in FP16 anyway. int8: the QDQ graph decides what is INT8.
        "trt_fp16_enable": str(precision in (Precision.FP16, Precision.INT8)),
        "trt_int8_enable": str(precision is Precision.INT8),
        "trt_profile_min_shapes": fmt(lo),
        "trt_profile_opt_shapes": fmt(opt),
        "trt_profile_max_shapes": fmt(hi),
        "trt_engine_cache_enable": str(cache_dir is not None),
        "trt_timing_cache_enable": str(cache_dir is not None),
    }
    if cache_dir is not None:
        opts["trt_engine_cache_path"] = str(cache_dir)
        opts["trt_timing_cache_path"] = str(cache_dir)
    if dump_ep_context:
        if cache_dir is None:
            raise ConfigError("Dumping an EP-context model needs a cache directory to write it to.")
        opts["trt_dump_ep_context_model"] = "True"
        opts["trt_ep_context_file_path"] = str(cache_dir)
        # embed the engine in the .onnx: the manifest hash and signature then cover it (the loader
        # refuses EP-context models whose engine sits in an external file)
        opts["trt_ep_context_embed_mode"] = "1"
    return opts


def cuda_ep_options(**overrides) -> dict:
    opts = {"cudnn_conv_algo_search": CUDNN_CONV_ALGO_SEARCH, "do_copy_in_default_stream": "1"}
    opts.update({k: str(v) for k, v in overrides.items() if v is not None})
    if opts["cudnn_conv_algo_search"] not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ConfigError(f"cudnn_conv_algo_search must be EXHAUSTIVE, HEURISTIC or DEFAULT, got "
                          f"{opts['cudnn_conv_algo_search']!r}.")
    return opts


def requested_providers(device: str, providers: list[str] | None, available: list[str],
                        doc: Manifest | None = None) -> list[str]:
    """Provider names in preference order for ``device`` ('auto' | 'cpu' | 'cuda') and this artifact."""
    trt_ok, trt_why = tensorrt_compatible(doc)
    if providers:
        names = [PROVIDERS.get(p, p) for p in providers]
        if PROVIDERS["tensorrt"] in names and not trt_ok:
            raise ConfigError(f"The TensorRT execution provider was requested, but {trt_why}.")
    elif device == "cpu":
        names = [PROVIDERS["cpu"]]
    elif device in ("auto", "cuda"):
        names = [PROVIDERS["tensorrt"]] if trt_ok else []
        names += [PROVIDERS["cuda"], PROVIDERS["cpu"]]
    else:
        raise ConfigError(f"Unknown device {device!r}; use auto, cpu or cuda.")
    chosen = [n for n in names if n in available]
    if device == "cuda" and not (set(chosen) & GPU_PROVIDERS):
        raise ProviderFallbackError(
            f"Could not find the requested execution provider. Requested: {names}; available: {available}. "
            "Install onnxruntime-gpu (pip install 'cxr-edge[gpu-cu12]' for a CUDA 12 driver, 'cxr-edge[gpu-cu13]' for "
            "CUDA 13; on Jetson the Jetson AI Lab wheel) on a machine with CUDA, or run with --device cpu. "
            "'cxr-edge doctor' shows what this machine can run."
        )
    missing = [n for n in names if n not in available]
    if missing and device == "auto":
        log.debug("providers not available here: %s", missing)
    return chosen or [PROVIDERS["cpu"]]
