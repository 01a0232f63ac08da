"""``cxr-edge export``: Keras model -> gated FP32 / FP16 / INT8 ONNX artifacts with manifests."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.gate_data import GateData, load_gate_data
from ..decision import borderline_band
from ..errors import ConfigError, CxrEdgeError, ExitCode
from ..extras import require
from ..manifest import ArtifactManifest, read_manifest, sha256_file, write_manifest
from ..manifest_schema import (
    ArtifactFormat,
    Calibration,
    GateAttempt,
    GateRecord,
    GradCam,
    GraphRewrites,
    ParentRef,
    PreprocessingFold,
    Quantization,
    SelfCheckRecord,
    SourceModel,
    TensorSpec,
)
from ..precision import EXPORTED_PRECISIONS, MOSTLY_FLOAT_BELOW, Int8Target, Precision, Variant, parse_precisions
from ..preprocess import PreprocessSpec
from ..runtime.backends.ort_session import cpu_session, run_batched
from ..runtime.head import forward, load_head
from ..self_check import make_record, reference_batch
from .gate_numerics import GateNumerics, numerics_for
from .gates import GateResult, fp16_gate, fp32_parity, int8_gate
from .graph_fold import FoldResult, fold_input_preprocessing
from .head_export import UnsupportedHead, extract_head, save_head
from .onnx_export import DEFAULT_OPSET, FEATURES_OUTPUT, PROBS_OUTPUT, convert_in_subprocess, io_contract
from .quantize import (
    CALIBRATION_METHODS,
    QuantConfig,
    classifier_head,
    first_and_last_compute,
    ort_cpu_kernels,
    pre_process_for_quantization,
    quantize,
)

log = logging.getLogger(__name__)


class ExportGateError(CxrEdgeError):
    """An artifact failed its accuracy gate; the message carries the gate report."""

    exit_code = ExitCode.GATE_FAILED


@dataclass(frozen=True)
class ExportConfig:
    """What ``cxr-edge export`` makes. ``precisions``/``int8_targets`` accept ``"fp32,int8"`` or a tuple and
    are checked here, so a typo fails before the slow work, not after the FP32 export."""

    precisions: tuple[str, ...] = tuple(p.value for p in EXPORTED_PRECISIONS)
    int8_targets: tuple[str, ...] = tuple(t.value for t in Int8Target)
    calib_data: str | None = None
    calib_method: str = "minmax"
    calib_size: int = 200
    force: bool = False
    opset: int = DEFAULT_OPSET
    seed: int = 0
    mixed_precision: bool = True  # last INT8 remedy: keep the noisiest layers in float
    fold_preprocessing: bool = True  # fold cast/replication/normalisation into the first conv where exact
    bundles: bool = True  # one bundle folder per gate-passing artifact under OUT/bundles/ (what a kiosk is given)
    decode_gate: bool = True  # measure reduced-resolution JPEG decoding per artifact (runtime/decode_gate.py)

    def __post_init__(self):
        for name in ("precisions", "int8_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, tuple(t.strip() for t in value.split(",") if t.strip()))
        if self.calib_method not in CALIBRATION_METHODS:
            raise ConfigError(f"Unknown calibration method {self.calib_method!r}; choose from {list(CALIBRATION_METHODS)}.")
        if self.calib_size < 1:
            raise ConfigError(f"calib_size must be >= 1, got {self.calib_size}.")
        self.variants()  # raises ConfigError on an unknown precision or INT8 target

    def variants(self) -> list[Variant]:
        return parse_precisions(",".join(self.precisions), ",".join(self.int8_targets))


@dataclass
class ExportedArtifact:
    variant: str
    path: Path | None
    gate: GateResult | None
    size_bytes: int | None
    kept: bool
    attempts: list[GateAttempt] = field(default_factory=list)
    quantization: Quantization | None = None


@dataclass
class ExportSummary:
    out_dir: Path
    artifacts: list[ExportedArtifact]
    data: dict
    bundles: dict[str, Path] = field(default_factory=dict)  # variant -> bundle folder (gate-passing artifacts)

    @property
    def ok(self) -> bool:
        return all(a.gate is None or a.gate.passed for a in self.artifacts)


def _int8_attempts(target: Int8Target, method: str, model_path: Path) -> tuple[list[QuantConfig], list[QuantConfig]]:
    """The opening attempts (all measured, the closest kept), then the known remedies in order of cost to
    accuracy (tried only while nothing has passed)."""
    onnx = require("onnx")
    # the names quantize() will look for: ORT's pre-processing fuses MatMul+Add into a node of another
    # name, so names read from the exported file would exclude nothing (the classifier stayed INT8)
    with tempfile.TemporaryDirectory() as tmp:
        pre = onnx.load(str(pre_process_for_quantization(model_path, Path(tmp) / "p.onnx")))
    keep = tuple(first_and_last_compute(pre))
    opening = opening_attempts(target, method, tuple(classifier_head(pre)))
    remedies = [QuantConfig(target, method, exclude_nodes=keep)]
    remedies += [QuantConfig(target, m, exclude_nodes=keep) for m in CALIBRATION_METHODS if m != method]
    return opening, remedies


def opening_attempts(target: Int8Target, method: str, head: tuple[str, ...] = ()) -> list[QuantConfig]:
    """The attempts that all run before the gate images pick one; remedies follow only if none passes.

    For the ov target, percentile calibration and NNCF run beside the configured method: its symmetric S8
    tensors (ResNetV2's residual sums) waste half their range on a few outliers under min-max, which percentile
    calibration or NNCF avoid; the export report and manifest record each attempt's distance from FP32.

    Given the nodes of a classifier ``head`` (after the global pool), the ov target also measures percentile with
    that head in float, which can bring the model markedly closer to FP32 for a negligible share of MACs. It is
    not offered to the cpu target, where the same change made min-max fail gates the fully INT8 graph passed.
    """
    out = [QuantConfig(target, method)]
    if target is Int8Target.OV:
        import importlib.util

        if method != "percentile":
            out.append(QuantConfig(target, "percentile", note=PERCENTILE_NOTE))
        if importlib.util.find_spec("nncf") is not None:
            out.append(QuantConfig(target, method, quantizer="nncf", note=NNCF_NOTE))
        if head:
            out.append(QuantConfig(target, "percentile", exclude_nodes=head, note=HEAD_FLOAT_NOTE))
    return out


NNCF_NOTE = "NNCF quantiser, measured beside the first attempt; the one closest to FP32 is kept"
PERCENTILE_NOTE = "percentile calibration, measured beside the first attempt; the one closest to FP32 is kept"
HEAD_FLOAT_NOTE = ("percentile calibration with the classifier head (after the global pool) in float, measured "
                   "beside the first attempt; the one closest to FP32 is kept")


def _mixed_precision_attempts(fp32_path: Path, qdq_path: Path, qc: QuantConfig, calib_x: np.ndarray,
                              numerics: str = "kernels") -> list[QuantConfig]:
    from .sensitivity import node_sensitivity, worst_nodes

    onnx = require("onnx")
    sens = node_sensitivity(fp32_path, qdq_path, calib_x, numerics=numerics)
    if not sens:
        return []
    with tempfile.TemporaryDirectory() as tmp:  # node names as quantize() sees them (after its pre-processing)
        model = onnx.load(str(pre_process_for_quantization(fp32_path, Path(tmp) / "pre.onnx")))
    out = []
    for frac in (0.05, 0.15):
        worst = worst_nodes(sens, frac, model)
        keep = tuple(sorted(set(qc.exclude_nodes) | set(worst)))
        out.append(QuantConfig(qc.target, qc.method, exclude_nodes=keep, quantizer=qc.quantizer,
                               note=f"mixed precision: the blocks of the {max(1, round(frac * len(sens)))} compute nodes "
                                    f"losing most SQNR ({len(keep)} nodes) in float"))
    return out


@dataclass
class Int8Attempt:
    """One rung of the remedy ladder: a quantisation config, the QDQ graph it gave, and that graph's gate."""

    number: int
    config: QuantConfig
    path: Path
    gate: GateResult
    info: Quantization
    self_check_probs: np.ndarray | None = None  # its answers on the self-check images, from the gate's own run

    @property
    def remedy(self) -> str:
        return self.config.note or ("first conv + classifier in float" if self.config.exclude_nodes else "")

    @property
    def score(self) -> tuple[bool, float, float, float]:
        """Passing beats failing; among passing, more of the work in INT8 (NNCF leaves some layers in float
        on some graphs: closer to FP32 by leaving work undone is not the better artifact), then higher
        top-class agreement with FP32, then closer probabilities.

        The work is the share of MACs in INT8 nodes, in steps of 0.1%: a classifier head left float is a negligible
        share of the MACs and not work undone, while a first convolution is.
        """
        m = self.gate.metrics
        share = self.info.int8_mac_share
        int8 = round(1000 * float(share)) / 1000 if self.gate.passed and share is not None else 0.0
        return self.gate.passed, int8, m["top_class_agreement"], -float(m.get("max_abs_dprob", 0.0))

    def record(self) -> GateAttempt:
        return GateAttempt(attempt=self.number, quantizer=self.config.quantizer, method=self.config.method,
                           excluded=tuple(self.config.exclude_nodes), remedy=self.remedy, passed=self.gate.passed,
                           metrics=self.gate.metrics, failures=tuple(self.gate.failures))


def remedy_ladder(opening: list[QuantConfig], remedies: list[QuantConfig], config: ExportConfig, fp32_path: Path,
                  calib_x: np.ndarray, best: Callable[[], Int8Attempt | None],
                  numerics: str = "kernels") -> Iterator[QuantConfig]:
    """Quantisation configs to try, cheapest remedy first; the caller stops at the first that passes.

    The last rung (mixed precision) is derived from the best attempt so far, which ``best`` returns
    when the ladder gets there: its QDQ graph is compared with FP32 layer by layer.
    """
    yield from opening
    yield from remedies
    if config.mixed_precision and (b := best()) is not None:
        yield from _mixed_precision_attempts(fp32_path, b.path, b.config, calib_x, numerics)


def climb_ladder(opening: list[QuantConfig], remedies: list[QuantConfig], config: ExportConfig, fp32_path: Path,
                 calib_x: np.ndarray, attempt: Callable[[int, QuantConfig], Int8Attempt],
                 numerics: str = "kernels") -> tuple[list[Int8Attempt], Int8Attempt]:
    """Every opening attempt, then remedies only while none has passed; returns all attempts and the best.

    An opening attempt that passed is kept even when the last opening attempt fails: remedies exist for
    a model none of the openings suits, not to give a failed rival another go.
    """
    attempts: list[Int8Attempt] = []
    best: Int8Attempt | None = None
    # late binding is the point: the mixed-precision rung reads the best attempt when it gets there
    ladder = remedy_ladder(opening, remedies, config, fp32_path, calib_x, lambda: best, numerics)
    for number, qc in enumerate(ladder, 1):
        a = attempt(number, qc)
        attempts.append(a)
        if best is None or a.score > best.score:
            best = a
        if best.gate.passed and number >= len(opening):
            break
    assert best is not None  # the ladder always has a first rung
    return attempts, best


@dataclass(frozen=True)
class ExportContext:
    """What every variant's step needs, fixed once the FP32 artifact has passed its parity gate."""

    out: Path
    config: ExportConfig
    fp32_path: Path
    base: ArtifactManifest  # what every variant's manifest shares (the FP32 one's, without its file facts)
    parent: ParentRef  # the FP32 artifact every variant derives from
    data: GateData
    classes: list[str]
    threshold: float | None
    ref_parity: np.ndarray  # FP32 probabilities on data.parity_x (validation images first)
    self_check_x: np.ndarray  # the self-check reference images (cxr_edge.reference_inputs)
    ref_self_check: np.ndarray  # FP32 probabilities on them

    @property
    def ref_val(self) -> np.ndarray:
        return self.ref_parity[: len(self.data.val_x)]

    def manifest_for(self, v: Variant) -> ArtifactManifest:
        """The shared fields as variant ``v``'s manifest, before its gate: what its target runtime is opened with."""
        return dataclasses.replace(self.base, precision=v.precision, int8_target=v.int8_target)

    def probs(self, path: Path, x: np.ndarray, numerics: GateNumerics, v: Variant) -> tuple[np.ndarray, np.ndarray]:
        """The artifact's probabilities on ``x`` and on the self-check images, computed as its target runtime
        computes them, in one run of one session (the manifest's self-check record needs no second load)."""
        both = numerics.probs(path, np.concatenate([x, self.self_check_x]), self.manifest_for(v))
        return both[: len(x)], both[len(x):]


def _self_check_record(spec: PreprocessSpec, ref: np.ndarray, got: np.ndarray, gate: GateRecord,
                       measured_on: str) -> SelfCheckRecord:
    """The manifest's reference answers for the load-time self-check (cxr_edge.self_check)."""
    rec = make_record(spec.input_shape, ref, got, borderline_band(gate), "FP32 ONNX on onnxruntime (CPU)", measured_on)
    return SelfCheckRecord.from_dict(rec, "self_check")


def export_model(model_path: str | Path, out_dir: str | Path, config: ExportConfig = ExportConfig()) -> ExportSummary:
    from ..keras_layers import load_keras_model

    model_path = Path(model_path)
    if model_path.suffix.lower() != ".keras":
        raise ConfigError(f"export takes the .keras model from cxr-edge train; {model_path.name} is not one "
                          "(an exported artifact is built for TensorRT with cxr-edge build and measured with "
                          "cxr-edge evaluate or bench).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    variants = config.variants()
    doc = read_manifest(model_path)
    spec = doc.preprocess
    classes = list(doc.classes)
    threshold = doc.threshold
    model = load_keras_model(model_path)
    data = load_gate_data(doc, spec, config.calib_data, config.calib_size, seed=config.seed)
    log.info("gate data: %s", json.dumps({k: v for k, v in data.info.items() if k != "skipped"}))

    # ---- FP32 + the Grad-CAM head
    fp32_path = out / Variant(Precision.FP32).filename()
    layer = doc.last_conv_layer
    proto = convert_in_subprocess(model_path, fp32_path, config.opset)
    folded = FoldResult(False, "not asked (--no-fold)")
    if config.fold_preprocessing:
        folded = fold_input_preprocessing(proto)
        if folded.folded:
            onnx = require("onnx")
            onnx.checker.check_model(proto, full_check=True)
            onnx.save(proto, str(fp32_path))
        log.info("preprocessing fold: %s", folded.reason)
    inputs, outputs = io_contract(proto)
    parity_x = data.parity_x
    ref = model.predict(parity_x, batch_size=32, verbose=0)
    fp32_session = cpu_session(fp32_path)
    fp32_out = run_batched(fp32_session, parity_x)
    gate32 = fp32_parity(ref, fp32_out[PROBS_OUTPUT])
    num32 = numerics_for(Variant(Precision.FP32))
    gate32.numerics = num32.to_dict()
    self_check_x = reference_batch(spec.input_shape)
    ref_self = run_batched(fp32_session, self_check_x, [PROBS_OUTPUT])[PROBS_OUTPUT]
    del fp32_session
    log.info("%s", gate32.summary())
    base = ArtifactManifest(
        kind="onnx", format=ArtifactFormat.ONNX, opset=config.opset, classes=doc.classes,
        operating_point=doc.operating_point, preprocess=spec, recipe=doc.recipe,
        inputs=_tensors(inputs, "inputs"), outputs=_tensors(outputs, "outputs"),
        io_notes={"image": "raw uint8 pixels, NHWC; cast, channel replication and normalisation are in the graph",
                  PROBS_OUTPUT: f"softmax probabilities over {classes}",
                  FEATURES_OUTPUT: f"activations of {layer!r} (Grad-CAM feature map)"},
        gradcam=_export_head(model, layer, out, fp32_out),
        graph_rewrites=GraphRewrites(PreprocessingFold(folded.folded, folded.reason)),
        source_model=SourceModel(file=model_path.name, path=str(model_path.resolve()), sha256=doc.sha256),
        # the training data's root, fingerprint and split: bench finds the test split without the .keras model
        data=doc.data,
    )
    fp32_sha = sha256_file(fp32_path)
    artifacts = [ExportedArtifact(Variant(Precision.FP32).tag, fp32_path, gate32, fp32_path.stat().st_size, gate32.passed)]
    fp32_gate = gate32.to_record()
    write_manifest(fp32_path, dataclasses.replace(
        base, precision=Precision.FP32, gate=fp32_gate,
        self_check=_self_check_record(spec, ref_self, ref_self, fp32_gate, num32.where())))
    if not gate32.passed:
        fp32_path.rename(fp32_path.with_suffix(".failed.onnx"))
        raise ExportGateError(f"FP32 ONNX does not match Keras: {gate32.summary()}. This is an export bug; "
                              "please report it with the model's manifest.")
    ctx = ExportContext(out, config, fp32_path, base, ParentRef(fp32_path.name, fp32_sha), data,
                        classes, threshold, fp32_out[PROBS_OUTPUT], self_check_x, ref_self)
    for v in variants:
        if v.precision is Precision.FP16:
            artifacts.append(_export_fp16(ctx, v))
        elif v.precision is Precision.INT8:
            artifacts.append(_export_int8(ctx, v))
    summary = ExportSummary(out, artifacts, data.info)
    if config.decode_gate:
        _decode_gates(artifacts, data)
    if config.bundles:
        from ..bundle import make_bundle

        summary.bundles = {a.variant: make_bundle(a.path, replace=True) for a in artifacts
                           if a.path is not None and a.gate is not None and a.gate.passed and a.path.exists()}
    write_export_report(summary)
    return summary


def _decode_gates(artifacts: list[ExportedArtifact], data) -> None:
    """Each kept artifact measured with reduced-resolution JPEG decoding against full decoding, on the gate's
    validation images (synthetic ones when the export had no real data); the verdict goes into its manifest."""
    from ..runtime.decode_gate import gate_artifact

    sources = list(data.val_paths) or list(data.val_x)
    split = "val" if data.val_paths else "synthetic"
    for a in artifacts:
        if a.path is not None and a.path.exists() and a.gate is not None and a.gate.passed:
            try:
                gate_artifact(a.path, sources, split)
            except Exception as exc:  # never lose an export over an optimisation: it simply stays off
                log.warning("decode gate of %s could not run (%s: %s); reduced decoding stays off", a.path.name,
                            type(exc).__name__, exc)


def _tensors(specs: list[dict], what: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_dict(t, f"{what}[{i}]") for i, t in enumerate(specs))


def _export_head(model, layer, out: Path, fp32_out: dict) -> GradCam:
    if not layer:
        return GradCam(engine_native=False, reason="the model names no Grad-CAM layer")
    try:
        ops, arrays = extract_head(model, layer)
    except UnsupportedHead as exc:
        return GradCam(layer=layer, feature_output=FEATURES_OUTPUT, engine_native=False, reason=str(exc))
    head_path = save_head(arrays, out / "model.head.npz")
    recomputed = forward(load_head(ops, head_path), fp32_out[FEATURES_OUTPUT])
    err = float(np.abs(recomputed - fp32_out[PROBS_OUTPUT]).max())
    native = err <= 1e-4
    if not native:
        log.warning("NumPy head differs from the ONNX probabilities by %.2e: engine-native Grad-CAM disabled", err)
    return GradCam.from_dict(
        {"layer": layer, "feature_output": FEATURES_OUTPUT, "probs_output": PROBS_OUTPUT, "head_file": head_path.name,
         "head_sha256": sha256_file(head_path), "head_ops": ops, "head_check_max_abs": err, "engine_native": native,
         "method": "gradient of the pre-softmax class score w.r.t. the feature map, closed form through the head"},
        "gradcam")


def _export_fp16(ctx: ExportContext, v: Variant) -> ExportedArtifact:
    from .fp16 import convert_fp16

    path = ctx.out / v.filename()
    convert_fp16(ctx.fp32_path, path)
    numerics = numerics_for(v)
    probs, self_check_probs = ctx.probs(path, ctx.data.parity_x, numerics, v)
    gate = fp16_gate(ctx.ref_parity, probs)
    gate.numerics = numerics.to_dict()
    log.info("%s", gate.summary())
    manifest = dataclasses.replace(ctx.manifest_for(v), conversion="onnxruntime.transformers.float16, "
                                   "keep_io_types=True (uint8 input, float32 outputs)")
    return _finish(ctx, path, v, gate, numerics, self_check_probs, manifest)


def _try_int8(ctx: ExportContext, v: Variant, qc: QuantConfig, number: int, tmp: Path,
              numerics: GateNumerics) -> Int8Attempt:
    cand = tmp / f"attempt{number}.onnx"
    info = Quantization.from_dict(quantize(ctx.fp32_path, cand, ctx.data.calib_x, qc), "quantization")
    probs, self_check_probs = ctx.probs(cand, ctx.data.val_x, numerics, v)
    gate = int8_gate(ctx.ref_val, probs, ctx.data.val_y, ctx.classes, ctx.threshold)
    gate.numerics = numerics.to_dict()
    if info.tensorrt_lint:  # a graph TensorRT would refuse fails like an inaccurate one
        gate.passed = False
        gate.failures.append(f"{len(info.tensorrt_lint)} TensorRT QDQ rule violation(s), first: {info.tensorrt_lint[0]}")
    attempt = Int8Attempt(number, qc, cand, gate, info, self_check_probs)
    how = attempt.remedy
    log.info("%s attempt %d (%s%s): %s", v.tag, number, qc.method, f", {how}" if how else "", gate.summary())
    return attempt


def _export_int8(ctx: ExportContext, v: Variant) -> ExportedArtifact:
    path = ctx.out / v.filename()
    target = v.int8_target
    assert target is not None  # an INT8 variant always names its flavour
    numerics = numerics_for(v)
    with tempfile.TemporaryDirectory() as tmp:
        opening, remedies = _int8_attempts(target, ctx.config.calib_method, ctx.fp32_path)
        attempts, best = climb_ladder(opening, remedies, ctx.config, ctx.fp32_path, ctx.data.calib_x,
                                      lambda number, qc: _try_int8(ctx, v, qc, number, Path(tmp), numerics),
                                      numerics.mode)
        shutil.copy(best.path, path)
    qinfo = best.info
    if target.for_cpu_runtimes:
        from .qdq_rewrites import openvino_runtime_precisions

        qinfo = Quantization.from_dict({**qinfo.to_dict(), "ort_cpu_int8_kernels": ort_cpu_kernels(path),
                                        "openvino_cpu_precisions": openvino_runtime_precisions(path)}, "quantization")
    records = [a.record() for a in attempts]
    info = ctx.data.info
    calibration = Calibration(method=qinfo.method, data=info["data"], synthetic=info["synthetic"],
                              fingerprint=info["fingerprint"], calibration_split=info["calibration_split"],
                              n_calibration=info["n_calibration"])
    manifest = dataclasses.replace(ctx.manifest_for(v), quantization=qinfo, gate_attempts=tuple(records),
                                   calibration=calibration)
    assert best.self_check_probs is not None  # _try_int8 keeps every attempt's self-check answers
    art = _finish(ctx, path, v, best.gate, numerics, best.self_check_probs, manifest)
    art.attempts, art.quantization = records, qinfo
    return art


def _finish(ctx: ExportContext, path: Path, v: Variant, gate: GateResult, numerics: GateNumerics,
            self_check_probs: np.ndarray, manifest: ArtifactManifest) -> ExportedArtifact:
    """Write the variant's manifest (its gate, parent and self-check record added), or drop a failed artifact."""
    if not gate.passed and not ctx.config.force:
        path.unlink(missing_ok=True)
        log.error("%s failed its gate and was not kept (use --force to keep it, marked failed)", v.tag)
        return ExportedArtifact(v.tag, None, gate, None, False)
    record = gate.to_record()
    manifest = dataclasses.replace(
        manifest, parent=ctx.parent, gate=record,
        self_check=_self_check_record(ctx.base.preprocess, ctx.ref_self_check, self_check_probs, record, numerics.where()),
        gate_status=None if gate.passed else "FAILED (kept with --force: do not deploy)")
    write_manifest(path, manifest)
    return ExportedArtifact(v.tag, path, gate, path.stat().st_size, True)


def _quantization_row(q: Quantization | None) -> dict:
    """How much of an INT8 artifact runs in INT8, as the export report shows it (None for float artifacts)."""
    ov = q.openvino_cpu_precisions if q is not None else None
    return {"int8_compute_nodes": q.int8_compute_nodes if q else None,
            "float_compute_nodes": q.float_compute_nodes if q else None,
            "int8_mac_share": q.int8_mac_share if q else None,
            "ort_cpu_int8_kernels": dict(q.ort_cpu_int8_kernels) if q and q.ort_cpu_int8_kernels is not None else None,
            "openvino_cpu_precisions": {"per_precision": dict(ov.per_precision), "not_int8": list(ov.not_int8)}
            if ov is not None else None,
            "tensorrt_lint": list(q.tensorrt_lint) if q and q.tensorrt_lint is not None else None}


def write_export_report(s: ExportSummary) -> Path:
    rows = []
    for a in s.artifacts:
        rows.append({"artifact": a.path.name if a.path else None, "variant": a.variant, "kept": a.kept,
                     "size_mb": round(a.size_bytes / 1e6, 3) if a.size_bytes else None,
                     "gate": a.gate.to_dict() if a.gate else None, "attempts": [t.to_dict() for t in a.attempts],
                     **_quantization_row(a.quantization)})
    (s.out_dir / "export_report.json").write_text(json.dumps({"data": s.data, "artifacts": rows}, indent=2, default=str) + "\n")
    lines = ["# Export report", "", f"Calibration / gate data: {s.data.get('data')} "
             f"({s.data.get('n_calibration')} calibration images from the train split, "
             f"{s.data.get('n_gate')} gate images from the val split)", "",
             "| artifact | size MB | gate | key numbers | INT8 compute nodes |", "|---|---|---|---|---|"]
    for r, a in zip(rows, s.artifacts):
        g = a.gate
        key = ", ".join(f"{k} {v:.4g}" for k, v in (g.metrics.items() if g else []) if isinstance(v, float))
        verdict = "passed" if g and g.passed else ("FAILED" + (" (kept, --force)" if a.kept else " (not kept)"))
        q = f"{r['int8_compute_nodes']} int8 / {r['float_compute_nodes']} float" if r["int8_compute_nodes"] is not None else ""
        if r["int8_mac_share"] is not None:
            q += f" ({100 * r['int8_mac_share']:.3f}% of the MACs in INT8)"
            if r["int8_mac_share"] < MOSTLY_FLOAT_BELOW and g and g.passed:
                verdict += f" (mostly float: {100 * r['int8_mac_share']:.0f}% of the MACs in INT8)"
        if r["ort_cpu_int8_kernels"]:
            conv = sum(v for k, v in r["ort_cpu_int8_kernels"].items() if k in ("QLinearConv", "ConvInteger"))
            mm = sum(v for k, v in r["ort_cpu_int8_kernels"].items() if "MatMul" in k or k == "QGemm")
            q += f"; ONNX Runtime CPU runs {conv} conv + {mm} matmul in INT8"
        if ov := r["openvino_cpu_precisions"]:
            q += "; OpenVINO CPU runs " + ", ".join(f"{n} {p}" for p, n in ov["per_precision"].items())
            if ov["not_int8"]:
                q += f" (not INT8: {', '.join(ov['not_int8'][:4])}{' ...' if len(ov['not_int8']) > 4 else ''})"
        if r["tensorrt_lint"] is not None:
            q += "; TensorRT QDQ rules: " + (f"{len(r['tensorrt_lint'])} violation(s)" if r["tensorrt_lint"] else "clean")
        lines.append(f"| {r['artifact'] or a.variant} | {r['size_mb'] or '-'} | {verdict} | {key} | {q} |")
    if s.bundles:
        lines += ["", "## Bundles: what to copy to a screening box", "",
                  "Each folder holds one artifact with everything it needs (model, manifest, Grad-CAM head, signature, "
                  "calibration history) and bundle.json, which every command checks on load. Copy the whole folder, or "
                  "make one file of it with `cxr-edge bundle FOLDER --archive NAME.cxrbundle.tar`.", ""]
        lines += [f"- {v}: `{p.relative_to(s.out_dir) if p.is_relative_to(s.out_dir) else p}`" for v, p in s.bundles.items()]
    (s.out_dir / "export_report.md").write_text("\n".join(lines) + "\n")
    return s.out_dir / "export_report.md"
