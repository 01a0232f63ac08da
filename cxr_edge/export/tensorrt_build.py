"""``cxr-edge build``: TensorRT engines from exported ONNX artifacts, for TensorRT 10.x and 11.x.

How precision is expressed depends on the TensorRT generation (:mod:`cxr_edge.runtime.backends.tensorrt_api`):

| engine | TensorRT 10 (weakly typed) | TensorRT 11 (strongly typed only) |
|---|---|---|
| fp32 | ``model.fp32.onnx``, TF32 cleared | same |
| fp16 | ``model.fp32.onnx`` + ``BuilderFlag.FP16`` (or ``model.fp16.onnx``) | ``model.fp16.onnx`` |
| int8 | ``model.int8-trt.onnx`` (QDQ) + ``INT8``/``FP16`` flags | ``model.int8-trt.onnx``, float parts as typed |
| int8 on DLA | ``model.fp32.onnx`` + entropy calibration (DLA's implicit INT8) | ``model.int8-trt.onnx`` |

Precision is never downgraded and never mislabelled: a GPU without fast FP16/INT8, an fp16 graph asked
to become an "fp32" engine, or a U8S8 CPU graph are refused up front. FP32 builds clear TF32 (on by
default in TensorRT) unless ``--allow-tf32``, because TF32 rounds matmul inputs to 10 mantissa bits.

After building, the engine itself is run on the gate images against the FP32 ONNX with the export
gates' criteria, and its own result goes into its manifest. The ``.plan`` and its manifest are
written to temporary names and renamed into place only once both exist and the gate has been decided.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, EngineError, ExitCode
from ..manifest import ArtifactManifest, read_manifest, sha256_file, write_manifest
from ..manifest_schema import (
    ArtifactFormat,
    DataProvenance,
    DlaRecord,
    EngineBuild,
    EngineDevice,
    EngineProfile,
    GateRecord,
    ParentRef,
    SourceOnnx,
    TensorRTRecord,
)
from ..precision import Int8Target, Precision, Variant
from ..runtime.backends.tensorrt_api import TensorRTFlavor, check_trt, current_device, require_tensorrt

if TYPE_CHECKING:
    import tensorrt as trt_t

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    precision: Precision
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 2048
    dla_core: int | None = None
    timing_cache: str | None = None
    allow_tf32: bool = False
    gate: bool = True  # run the built engine against the FP32 ONNX before keeping it
    gate_data: str | None = None
    force: bool = False  # keep an engine that fails its gate, marked failed

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
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise ConfigError(f"DLA core must be >= 0, got {self.dla_core}.")
            if self.precision is Precision.FP32:
                raise ConfigError("DLA runs FP16 or INT8 only; pass --precision fp16 or int8 with --dla.")
            if not self.min_batch == self.opt_batch == self.max_batch:
                raise ConfigError(
                    f"DLA engines have static shapes: MIN, OPT and MAX must be equal (e.g. --batch "
                    f"{self.opt_batch},{self.opt_batch},{self.opt_batch}); got {self.min_batch},{self.opt_batch},"
                    f"{self.max_batch}. Smaller batches are padded to it at run time."
                )

    @classmethod
    def from_batch_text(cls, precision: str, batch: str, **kw) -> BuildConfig:
        try:
            parts = [int(p) for p in batch.split(",")]
        except ValueError:
            raise ConfigError(f"--batch must be MIN,OPT,MAX integers, got {batch!r}.") from None
        if len(parts) != 3:
            raise ConfigError(f"--batch must be MIN,OPT,MAX (three numbers), got {batch!r}.")
        return cls(precision, *parts, **kw)  # type: ignore[arg-type]  # __post_init__ converts and checks

    def profile_shapes(self, input_shape_hwc) -> dict[str, tuple]:
        h, w, c = input_shape_hwc
        return {k: (b, h, w, c) for k, b in (("min", self.min_batch), ("opt", self.opt_batch), ("max", self.max_batch))}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["precision"] = self.precision.value
        return d


FP32_SOURCE, FP16_SOURCE = Variant(Precision.FP32), Variant(Precision.FP16)
INT8_TRT_SOURCE = Variant(Precision.INT8, Int8Target.TRT)


def _source_variant(doc: ArtifactManifest) -> Variant:
    """The exported variant an ONNX artifact is (an INT8 one always names its target)."""
    return Variant(doc.precision, doc.int8_target)


def check_source_artifact(onnx_doc: ArtifactManifest, config: BuildConfig, flavor: TensorRTFlavor | None = None) -> None:
    """Refuse combinations that would silently produce another precision than the one asked for.

    ``flavor`` None checks the rules common to TensorRT 10 and 11 (useful before TensorRT is imported).
    """
    src, name = _source_variant(onnx_doc), onnx_doc.variant_tag
    want = config.precision
    dla = config.dla_core is not None
    if src.int8_target is not None and src.int8_target.for_cpu_runtimes:
        raise ConfigError(f"The {name} artifact has unsigned (U8) activations, which TensorRT does not take; "
                          f"use {INT8_TRT_SOURCE.filename()}.")
    if onnx_doc.gate_failed:
        raise ConfigError("The source artifact failed its accuracy gate at export; refusing to build an engine from it.")
    if want is Precision.FP32 and src != FP32_SOURCE:
        raise ConfigError(f"An fp32 engine must be built from {FP32_SOURCE.filename()}; this is a {name} artifact, whose "
                          f"graph computes in {name} (the engine would be labelled fp32 but not be fp32).")
    if want is Precision.FP16:
        if src == INT8_TRT_SOURCE:
            raise ConfigError(f"A QDQ INT8 artifact cannot build a fp16 engine; use {FP16_SOURCE.filename()} or "
                              f"{FP32_SOURCE.filename()}.")
        if flavor is not None and flavor.strongly_typed_only and src != FP16_SOURCE:
            raise ConfigError(f"TensorRT {flavor.version} builds strongly typed networks only: an fp16 engine comes "
                              f"from {FP16_SOURCE.filename()} (cxr-edge export --precision fp16), not from the fp32 graph.")
    if want is Precision.INT8:
        if dla and flavor is None:
            allowed = {FP32_SOURCE, INT8_TRT_SOURCE}  # decided once the TensorRT version is known
        elif dla and flavor is not None and flavor.has_implicit_int8:
            allowed = {FP32_SOURCE}
        else:
            allowed = {INT8_TRT_SOURCE}
        if src not in allowed and allowed == {FP32_SOURCE}:
            raise ConfigError("INT8 on DLA with TensorRT 10 is calibrated implicitly from the fp32 artifact; pass "
                              f"{FP32_SOURCE.filename()} with --calib DATA.")
        if src not in allowed:
            raise ConfigError(
                f"INT8 engines are built from the int8-trt QDQ artifact (explicit quantisation); this is a {name} "
                f"artifact. Use {INT8_TRT_SOURCE.filename()} from cxr-edge export."
            )


def engine_path_for(onnx_path: Path, config: BuildConfig) -> Path:
    dla = f".dla{config.dla_core}" if config.dla_core is not None else ""
    return onnx_path.with_name(f"{onnx_path.name.split('.')[0]}.{config.precision.value}{dla}.plan")


def calibration_cache_path(onnx_path: Path, onnx_sha: str, data_fingerprint: str, n_images: int, batch: int) -> Path:
    """A DLA calibration cache named by what it was computed from, so a changed model or data never reuses it."""
    key = hashlib.sha256(f"{onnx_sha}|{data_fingerprint}|{n_images}|{batch}".encode()).hexdigest()[:16]
    return onnx_path.with_name(f"dla_calibration.{key}.cache")


def make_entropy_calibrator(batches, cache_file: Path):
    """IInt8EntropyCalibrator2 over uint8 batches: only for DLA on TensorRT 10, whose INT8 is implicit.

    Defined inside a function because its base class exists only where TensorRT 10 is installed.
    """
    import tensorrt as trt

    from ..runtime.backends.tensorrt_api import check_cuda, require_cudart

    cudart = require_cudart()

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = list(batches)
            self.i = 0
            self.nbytes = self.batches[0].nbytes
            self.dptr = int(check_cuda(cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes}) for calibration"))

        def get_batch_size(self):
            return len(self.batches[0])

        def get_batch(self, names):
            if self.i >= len(self.batches):
                return None
            b = self.batches[self.i]
            self.i += 1
            check_cuda(cudart.cudaMemcpy(self.dptr, b.ctypes.data, b.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy (calibration)")
            return [self.dptr]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            _atomic_write(cache_file, bytes(cache))

        def free(self):
            cudart.cudaFree(self.dptr)

    return EntropyCalibrator()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _set_timing_cache(bc: trt_t.IBuilderConfig, path: Path) -> None:
    """Load a timing cache; one from another GPU or TensorRT version is replaced by a fresh one, with a warning."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = bc.create_timing_cache(blob)
    if bc.set_timing_cache(cache, ignore_mismatch=False):
        return
    log.warning("timing cache %s was made on another GPU or TensorRT version: starting a fresh one "
                "(it will be overwritten after this build)", path)
    check_trt(bc.set_timing_cache(bc.create_timing_cache(b""), ignore_mismatch=False), "a fresh timing cache")


def _save_timing_cache(bc: trt_t.IBuilderConfig, path: Path) -> None:
    try:
        _atomic_write(path, bytes(bc.get_timing_cache().serialize()))
    except Exception as exc:  # the engine is good without it: a cache is only a build-time shortcut
        log.warning("could not save the timing cache %s: %s", path, exc)


def _set_precision(flavor: TensorRTFlavor, builder: trt_t.Builder, bc: trt_t.IBuilderConfig,
                   config: BuildConfig, src: Variant) -> dict[str, Any]:
    """Builder flags for the requested precision; returns what the manifest records about typing (its
    ``tensorrt_typing``, ``tf32`` and ``float_layers`` fields)."""
    import tensorrt as trt

    typing: dict[str, Any] = {"tensorrt_typing": flavor.to_dict()["typing"], "tf32": bool(config.allow_tf32)}
    if not config.allow_tf32:
        bc.clear_flag(trt.BuilderFlag.TF32)
    if flavor.strongly_typed_only:
        typing["float_layers"] = {Precision.FP32: Precision.FP32.value,
                                  Precision.FP16: f"fp16 (as {FP16_SOURCE.filename()} states)",
                                  Precision.INT8: "as the QDQ graph states (fp32 outside Q/DQ pairs)"}[config.precision]
        return typing
    if config.precision is Precision.FP16 or (config.precision is Precision.INT8 and src == INT8_TRT_SOURCE):
        if not builder.platform_has_fast_fp16:
            raise ConfigError("This GPU has no fast FP16; refusing to build a slower engine and call it fp16.")
        bc.set_flag(trt.BuilderFlag.FP16)  # INT8: layers left in float may use fp16 rather than fp32
    if config.precision is Precision.INT8:
        if not builder.platform_has_fast_int8:
            raise ConfigError("This GPU has no fast INT8; refusing to build an int8 engine that would run in float.")
        bc.set_flag(trt.BuilderFlag.INT8)
    typing["float_layers"] = {Precision.FP32: Precision.FP32.value,
                              Precision.FP16: "fp16 where TensorRT chooses (weakly typed)",
                              Precision.INT8: "fp16/fp32 where TensorRT chooses (weakly typed)"}[config.precision]
    return typing


def _configure_dla(flavor: TensorRTFlavor, builder: trt_t.Builder, bc: trt_t.IBuilderConfig, config: BuildConfig,
                   doc: ArtifactManifest, onnx_path: Path, profile: trt_t.IOptimizationProfile, calib_data) -> dict:
    import tensorrt as trt

    assert config.dla_core is not None
    if builder.num_DLA_cores == 0:
        raise ConfigError("--dla was given but this device has no DLA cores (DLA exists on Jetson AGX/NX Orin).")
    if config.dla_core >= builder.num_DLA_cores:
        raise ConfigError(f"DLA core {config.dla_core} does not exist; this device has {builder.num_DLA_cores}.")
    bc.default_device_type = trt.DeviceType.DLA
    bc.DLA_core = config.dla_core
    bc.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    info: dict[str, Any] = {"dla_core": config.dla_core}
    if config.precision is Precision.INT8 and flavor.has_implicit_int8:
        from ..data.gate_data import load_gate_data

        # calibrated on the data given, never on the training data the ONNX manifest names
        data = load_gate_data(dataclasses.replace(doc, data=DataProvenance()), doc.preprocess, calib_data, calib_size=256)
        x, bs = data.calib_x, config.opt_batch
        if len(x) < bs:
            raise ConfigError(f"Only {len(x)} calibration images for DLA batch {bs}; pass more data with --calib.")
        batches = [x[i : i + bs] for i in range(0, len(x) - len(x) % bs, bs)]
        cache = calibration_cache_path(onnx_path, doc.sha256 or "", data.info["fingerprint"], len(x), bs)
        bc.int8_calibrator = calibrator = make_entropy_calibrator(batches, cache)
        check_trt(bc.set_calibration_profile(profile), "the calibration profile")
        info.update({"calibration": "implicit (IInt8EntropyCalibrator2)", "calibration_cache": cache.name,
                     "calibration_data": data.info["data"], "n_calibration": len(x)})
        info["_calibrator"] = calibrator
    return info


def build_engine(onnx_path: str | Path, config: BuildConfig, out_path: str | Path | None = None,
                 calib_data: str | Path | None = None) -> Path:
    """Build, gate and save a serialized engine plus its manifest. Needs a GPU with TensorRT 10 or 11."""
    onnx_path = Path(onnx_path)
    doc = read_manifest(onnx_path)
    check_source_artifact(doc, config)
    if config.precision is Precision.INT8 and config.dla_core is not None and _source_variant(doc) == FP32_SOURCE \
            and not calib_data:
        raise ConfigError("INT8 on DLA needs calibration images: pass --calib DATA (its train split is used).")
    _, flavor = require_tensorrt()
    import tensorrt as trt  # typed by tensorrt-stubs in CI's type check

    check_source_artifact(doc, config, flavor)
    src = _source_variant(doc)
    if src == INT8_TRT_SOURCE:
        from .trt_lint import lint_qdq, lint_summary

        violations = lint_qdq(onnx_path)
        if violations:
            raise ConfigError(f"{onnx_path.name} breaks TensorRT's QDQ rules: {lint_summary(violations)}. "
                              "Re-export it with this cxr-edge (cxr-edge export --precision int8-trt).")
    out = Path(out_path) if out_path else engine_path_for(onnx_path, config)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineError("TensorRT could not create a builder: no usable GPU or CUDA driver (cxr-edge doctor).")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flavor.strongly_typed_only else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT {flavor.version} could not parse {onnx_path.name}: {errs}")
    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    typing = _set_precision(flavor, builder, bc, config, src)
    inp = network.get_input(0)
    shapes = config.profile_shapes(doc.preprocess.input_shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    if bc.add_optimization_profile(profile) < 0:
        raise EngineError(f"TensorRT refused the optimisation profile {shapes}.")
    dla = {}
    if config.dla_core is not None:
        dla = _configure_dla(flavor, builder, bc, config, doc, onnx_path, profile, calib_data)
    cache_path = Path(config.timing_cache) if config.timing_cache else out.with_name(out.name + ".timing.cache")
    _set_timing_cache(bc, cache_path)
    t0 = time.perf_counter()
    try:
        blob = builder.build_serialized_network(network, bc)
    finally:
        calibrator = dla.pop("_calibrator", None)
        if calibrator is not None:
            calibrator.free()
    if blob is None:
        raise EngineError("TensorRT failed to build the engine; run with -v to see the builder log.")
    build_s = time.perf_counter() - t0
    _save_timing_cache(bc, cache_path)
    dev = current_device()  # the calling thread's current GPU: the one the builder built for
    engine = ArtifactManifest(
        kind="tensorrt-plan", format=ArtifactFormat.TENSORRT, precision=config.precision,
        classes=doc.classes, operating_point=doc.operating_point, preprocess=doc.preprocess,
        inputs=doc.inputs, outputs=doc.outputs, gradcam=doc.gradcam, recipe=doc.recipe,
        profile=EngineProfile(min=shapes["min"], opt=shapes["opt"], max=shapes["max"]),
        build=EngineBuild.from_dict(config.to_dict(), "build"), **typing,
        tensorrt=TensorRTRecord.from_dict(flavor.to_dict(), "tensorrt"),
        dla=DlaRecord.from_dict(dla, "dla") if dla else None,
        build_seconds=round(build_s, 1), device=EngineDevice.from_dict(dev.to_dict(), "device"),
        source_onnx=SourceOnnx(onnx_path.name, doc.sha256, doc.variant_tag),
        parent=ParentRef(onnx_path.name, doc.sha256), source_gate=doc.gate, calibration=doc.calibration,
    )
    return save_engine(bytes(blob), out, engine, onnx_path, doc, config)


def save_engine(blob: bytes, out: Path, engine: ArtifactManifest, onnx_path: Path, doc: ArtifactManifest,
                config: BuildConfig) -> Path:
    """Gate the engine under a temporary name, then move the .plan and its manifest into place together."""
    from ..manifest import manifest_path

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    try:
        from .engine_gate import engine_self_check_record, gate_engine

        engine_doc = dataclasses.replace(engine, sha256=sha256_file(tmp))
        if config.gate:
            gate, self_check = gate_engine(tmp, engine_doc, onnx_path, doc, config.gate_data)
            log.info("engine %s", gate.summary())
            if not gate.passed and not config.force:
                raise EngineGateError(f"The {config.precision.value} engine failed its gate against the FP32 ONNX: "
                                      f"{gate.summary()}. Not kept (--force keeps it, marked failed).")
            engine = dataclasses.replace(engine, gate=gate.to_record(), self_check=self_check,
                                         gate_status=None if gate.passed else "FAILED (kept with --force: do not deploy)")
        else:
            engine = dataclasses.replace(engine, gate=GateRecord(name="not run (--no-gate)", passed=None),
                                         self_check=engine_self_check_record(tmp, engine_doc, doc))
        tmp_manifest = write_manifest(tmp, engine, name=out.name)
        os.replace(tmp, out)
        try:
            os.replace(tmp_manifest, manifest_path(out))
        except OSError:
            out.unlink(missing_ok=True)  # never a plan without its manifest
            raise
    finally:
        tmp.unlink(missing_ok=True)
        manifest_path(tmp).unlink(missing_ok=True)
    return out


class EngineGateError(EngineError):
    """A built engine does not give the FP32 model's answers within the export gate's criteria."""

    exit_code = ExitCode.GATE_FAILED
