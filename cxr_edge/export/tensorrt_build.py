"""``cxr-edge build``: TensorRT engines from exported ONNX artifacts (TensorRT Python API).

INT8 uses explicit quantisation: the engine is built from the ``int8-trt`` QDQ artifact, whose scales
were calibrated and gated at export. Implicit calibration is deprecated since TensorRT 10.1; an entropy
calibrator is kept only for Jetson DLA, which still needs it. Precision is never downgraded: a device
without fast FP16/INT8 is an error, not a silent FP32 engine.

TensorRT and CUDA are imported lazily; everything that needs no GPU (option validation, profile
shapes, manifests, device-compatibility checks) is plain Python and unit-tested on CPU machines.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError, ManifestError
from ..manifest import read_manifest, sha256_file, write_manifest
from .artifacts import Precision

log = logging.getLogger(__name__)

TRT_HINT = ("The TensorRT backend needs the 'tensorrt' package, which is not installed. On a GPU machine: "
            "pip install 'cxr-edge[gpu]' (on Jetson, TensorRT comes with JetPack).")


@dataclass(frozen=True)
class BuildConfig:
    precision: Precision
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 2048
    dla_core: int | None = None
    timing_cache: str | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            raise ConfigError(f"Unknown precision {self.precision!r}; choose fp32, fp16 or int8.") from None
        if not (1 <= self.min_batch <= self.opt_batch <= self.max_batch):
            raise ConfigError(
                f"Batch range {self.min_batch},{self.opt_batch},{self.max_batch} is invalid: "
                "need 1 <= MIN <= OPT <= MAX (e.g. --batch 1,8,32)."
            )
        if self.workspace_mb < 16:
            raise ConfigError(f"Workspace {self.workspace_mb} MB is too small; use >= 16.")
        if self.dla_core is not None and self.dla_core < 0:
            raise ConfigError(f"DLA core must be >= 0, got {self.dla_core}.")
        if self.dla_core is not None and self.precision is Precision.FP32:
            raise ConfigError("DLA runs FP16 or INT8 only; pass --precision fp16 or int8 with --dla.")

    @classmethod
    def from_batch_text(cls, precision: str, batch: str, **kw) -> "BuildConfig":
        try:
            parts = [int(p) for p in batch.split(",")]
        except ValueError:
            raise ConfigError(f"--batch must be MIN,OPT,MAX integers, got {batch!r}.") from None
        if len(parts) != 3:
            raise ConfigError(f"--batch must be MIN,OPT,MAX (three numbers), got {batch!r}.")
        return cls(precision, *parts, **kw)

    def profile_shapes(self, input_shape_hwc) -> dict[str, tuple]:
        h, w, c = input_shape_hwc
        return {k: (b, h, w, c) for k, b in (("min", self.min_batch), ("opt", self.opt_batch), ("max", self.max_batch))}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precision"] = self.precision.value
        return d


def check_source_artifact(onnx_doc: dict, config: BuildConfig) -> None:
    """Refuse combinations that would silently produce the wrong precision."""
    prec = onnx_doc.get("precision")
    if prec == "int8" and onnx_doc.get("int8_target") == "cpu":
        raise ConfigError("The int8-cpu artifact has unsigned (U8S8) activations, which TensorRT does not take; "
                          "use model.int8-trt.onnx.")
    if config.precision is Precision.INT8 and config.dla_core is not None and prec != "fp32":
        raise ConfigError("INT8 on DLA is calibrated implicitly from the fp32 artifact; pass model.fp32.onnx with --calib DATA.")
    if config.precision is Precision.INT8 and config.dla_core is None:
        if prec != "int8" or onnx_doc.get("int8_target") != "trt":
            raise ConfigError(
                f"INT8 engines are built from the int8-trt QDQ artifact (explicit quantisation); this is a "
                f"{prec}{'-' + onnx_doc['int8_target'] if onnx_doc.get('int8_target') else ''} artifact. "
                "Use model.int8-trt.onnx from cxr-edge export."
            )
    if config.precision is not Precision.INT8 and prec == "int8":
        raise ConfigError(f"A QDQ INT8 artifact cannot build a {config.precision.value} engine; use model.fp32.onnx.")
    if onnx_doc.get("gate", {}).get("passed") is False:
        raise ConfigError("The source artifact failed its accuracy gate at export; refusing to build an engine from it.")


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    cuda_driver: str | None = None


def current_device() -> DeviceInfo:
    trt = require_tensorrt()
    name, cc, drv = "unknown", "unknown", None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
            cc = f"{props.major}.{props.minor}"
        err, v = cudart.cudaDriverGetVersion()
        drv = str(v) if int(err) == 0 else None
    return DeviceInfo(name.strip("\x00"), cc, trt.__version__, drv)


def check_engine_compat(engine_doc: dict, device: DeviceInfo, engine_path: str | Path = "the engine") -> None:
    """Engines are tied to one GPU model and TensorRT version; say how to rebuild when they differ."""
    built = engine_doc.get("device", {})
    problems = []
    if built.get("tensorrt_version") != device.tensorrt_version:
        problems.append(f"TensorRT {built.get('tensorrt_version')} vs {device.tensorrt_version} here")
    if built.get("compute_capability") != device.compute_capability or built.get("gpu_name") != device.gpu_name:
        problems.append(f"built on {built.get('gpu_name')} (sm {built.get('compute_capability')}), this is "
                        f"{device.gpu_name} (sm {device.compute_capability})")
    if problems:
        src = engine_doc.get("source_onnx", {}).get("file", "MODEL.onnx")
        b = engine_doc.get("build", {})
        raise ManifestError(
            f"{engine_path} cannot run here: " + "; ".join(problems) + ". Rebuild it on this machine: "
            f"cxr-edge build {src} --precision {b.get('precision', 'fp16')} "
            f"--batch {b.get('min_batch', 1)},{b.get('opt_batch', 8)},{b.get('max_batch', 32)}"
        )


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        from ..errors import MissingExtraError

        raise MissingExtraError(TRT_HINT) from exc
    return trt


def engine_path_for(onnx_path: Path, config: BuildConfig) -> Path:
    dla = f".dla{config.dla_core}" if config.dla_core is not None else ""
    return onnx_path.with_name(f"{onnx_path.name.split('.')[0]}.{config.precision.value}{dla}.plan")


def make_entropy_calibrator(batches, cache_file: Path):
    """IInt8EntropyCalibrator2 over uint8 batches: only for Jetson DLA, which lacks explicit-quantisation support.

    Defined inside a function because its base class exists only where TensorRT is installed.
    """
    trt = require_tensorrt()
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = list(batches)
            self.i = 0
            self.nbytes = self.batches[0].nbytes
            err, self.dptr = cudart.cudaMalloc(self.nbytes)
            if int(err) != 0:
                raise ConfigError(f"cudaMalloc of {self.nbytes} bytes for calibration failed ({err}).")

        def get_batch_size(self):
            return len(self.batches[0])

        def get_batch(self, names):
            if self.i >= len(self.batches):
                return None
            b = self.batches[self.i]
            self.i += 1
            cudart.cudaMemcpy(self.dptr, b.ctypes.data, b.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
            return [int(self.dptr)]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


def build_engine(onnx_path: str | Path, config: BuildConfig, out_path: str | Path | None = None,
                 calib_data: str | Path | None = None) -> Path:
    """Build and save a serialized engine plus its manifest. Needs a GPU with TensorRT."""
    onnx_path = Path(onnx_path)
    doc = read_manifest(onnx_path)
    check_source_artifact(doc, config)
    dla_int8 = config.precision is Precision.INT8 and config.dla_core is not None
    if dla_int8 and not calib_data:
        raise ConfigError("INT8 on DLA needs calibration images: pass --calib DATA (its train split is used).")
    trt = require_tensorrt()
    out = Path(out_path) if out_path else engine_path_for(onnx_path, config)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"TensorRT could not parse {onnx_path}: {errs}")
    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    if config.precision is Precision.FP16:
        if not builder.platform_has_fast_fp16:
            raise ConfigError("This GPU has no fast FP16; refusing to build a slower engine and call it fp16.")
        bc.set_flag(trt.BuilderFlag.FP16)
    if config.precision is Precision.INT8:
        if not builder.platform_has_fast_int8:
            raise ConfigError("This GPU has no fast INT8; refusing to build an int8 engine that would run in float.")
        bc.set_flag(trt.BuilderFlag.INT8)
        bc.set_flag(trt.BuilderFlag.FP16)  # layers TensorRT keeps in float may use fp16 rather than fp32
        if dla_int8:
            from ..preprocess import PreprocessSpec
            from .gate_data import load_gate_data

            spec = PreprocessSpec.from_dict(doc["preprocess"])
            x = load_gate_data({**doc, "data": {}}, spec, calib_data, calib_size=256).calib_x
            bs = config.opt_batch
            batches = [x[i : i + bs] for i in range(0, len(x) - len(x) % bs, bs)]
            bc.int8_calibrator = make_entropy_calibrator(batches, onnx_path.with_name("dla_calibration.cache"))
    if config.dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise ConfigError("--dla was given but this device has no DLA cores (DLA exists on Jetson AGX/NX).")
        bc.default_device_type = trt.DeviceType.DLA
        bc.DLA_core = config.dla_core
        bc.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    inp = network.get_input(0)
    shapes = config.profile_shapes(tuple(doc["preprocess"][k] for k in ("height", "width", "input_channels")))
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    bc.add_optimization_profile(profile)
    cache_path = Path(config.timing_cache) if config.timing_cache else onnx_path.with_name("trt_timing.cache")
    cache = bc.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    bc.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, bc)
    if blob is None:
        raise ConfigError("TensorRT failed to build the engine; run with -v to see the builder log.")
    out.write_bytes(bytes(blob))
    cache_path.write_bytes(bytes(bc.get_timing_cache().serialize()))
    dev = current_device()
    write_manifest(out, {
        "kind": "tensorrt-plan", "format": "tensorrt", "precision": config.precision.value,
        "classes": doc["classes"], "operating_point": doc.get("operating_point"), "preprocess": doc["preprocess"],
        "inputs": doc["inputs"], "outputs": doc["outputs"], "gradcam": doc.get("gradcam"),
        "profile": {k: list(v) for k, v in shapes.items()}, "build": config.to_dict(),
        "build_seconds": round(time.perf_counter() - t0, 1), "device": asdict(dev),
        "source_onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)},
        "parent": {"file": onnx_path.name, "sha256": doc["sha256"]}, "gate": doc.get("gate"),
        "calibration": doc.get("calibration"),
    })
    return out


def ort_tensorrt_ep_options(onnx_doc: dict, precision: Precision | str, cache_dir: str | Path,
                            batch: tuple[int, int, int] = (1, 8, 32), dump_ep_context: bool = False) -> dict:
    """Provider options for ONNX Runtime's TensorRT execution provider (engine + timing caches on disk)."""
    precision = Precision(precision)
    inp = onnx_doc["inputs"][0]["name"]
    h, w, c = (onnx_doc["preprocess"][k] for k in ("height", "width", "input_channels"))
    cfg = BuildConfig(precision, *batch)  # validates the batch range
    shapes = cfg.profile_shapes((h, w, c))
    fmt = lambda s: f"{inp}:{'x'.join(str(d) for d in s)}"  # noqa: E731
    cache_dir = Path(cache_dir)
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": str(precision in (Precision.FP16, Precision.INT8)),
        "trt_int8_enable": str(precision is Precision.INT8),
        "trt_profile_min_shapes": fmt(shapes["min"]),
        "trt_profile_opt_shapes": fmt(shapes["opt"]),
        "trt_profile_max_shapes": fmt(shapes["max"]),
    }
    if precision is Precision.INT8 and onnx_doc.get("int8_target") != "trt":
        raise ConfigError("The TensorRT EP takes only the int8-trt (S8S8 QDQ) artifact for INT8.")
    if dump_ep_context:
        opts["trt_dump_ep_context_model"] = "True"
        opts["trt_ep_context_file_path"] = str(cache_dir)
        # embed the engine in the .onnx: the manifest hash and signature then cover it (the loader
        # refuses EP-context models whose engine sits in an external file)
        opts["trt_ep_context_embed_mode"] = "1"
    return opts
