"""``cxr-edge bench``: one row per (backend, provider, precision, batch), plus accuracy per precision."""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import scan_dataset
from ..data.labelled import load_items
from ..data.split import is_training_data, training_split
from ..decision import decide
from ..errors import ConfigError
from ..evaluation.criteria import FAILED, PASSED, WITHIN_RESOLUTION, accepted, agreement_verdict
from ..graph_macs import macs_per_image
from ..machine import gpu_names, usable_cores
from ..manifest import Manifest, read_manifest
from ..manifest_schema import DataProvenance
from ..precision import CPU_HINT_PRECISIONS, GATE_LIMITS, INT8_TAGS, Int8Target, Precision, Variant
from ..preprocess import PreprocessSpec
from ..runtime.backends.base import Backend
from ..runtime.backends.registry import open_backend
from ..runtime.batching import BatchPacker
from ..runtime.result import self_check_summary
from .int8_payoff import (
    COMPARED_OPTIONS,
    add_fp32_ratios,
    int8_does_not_pay,
    int8_mac_share,
    int8_pays,
    is_int8,
    lower_precisions_slower,
    mostly_float,
    self_check_failed,
)
from .machine import machine_info
from .timing import current_rss_kb, measure, summarise

log = logging.getLogger(__name__)

#: what bench can time, by artifact tag: every exported variant, and FP32 artifacts also under OpenVINO's BF16 hint
BENCH_PRECISIONS: tuple[str, ...] = (Precision.FP32.value, Precision.FP16.value, Precision.BF16.value, *INT8_TAGS)
#: the backends bench can time our artifacts on (the Keras baseline included)
BENCH_BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "tensorrt", "keras")
#: the row status bench writes for each verdict of the agreement criterion the export gates share
STATUS_OF_VERDICT: dict[str, str] = {PASSED: "validated", WITHIN_RESOLUTION: "validated within resolution",
                                     FAILED: "ran, failed validation"}
#: the verdict of a row that was never validated (it could not load, or failed while running)
NOT_VALIDATED = "not validated"
#: the inference-precision hints OpenVINO runs an FP32 artifact in, each its own row
OPENVINO_HINTS = CPU_HINT_PRECISIONS
#: tags of the ONNX artifacts a TensorRT engine is built from
TENSORRT_SOURCES: tuple[str, ...] = (Precision.FP32.value, Variant(Precision.INT8, Int8Target.TRT).tag)
#: the reference every row is validated against
FP32_ARTIFACT = Variant(Precision.FP32).filename()


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    backends: tuple[str, ...] | None = None  # None: those that can run on this machine (backend_availability)
    precisions: tuple[str, ...] = BENCH_PRECISIONS  # those without an artifact in the folder are left out, said once
    budget_s: float = 3.0
    e2e: bool = True
    accuracy: bool = True
    data: str | None = None
    threads: int | None = None
    max_accuracy_images: int = 400
    cuda_graph: bool = False  # TensorRT rows: replay CUDA graphs
    preprocessing: bool = True  # rows for the host half of preprocessing, CPU and GPU paths
    rounds: int = 1  # interleaved timing rounds (every row once per round); --peers defaults to 5
    peers: tuple[str, ...] = ()  # peers timed in the same rounds (bench/peers.py)
    peer_calib_size: int = 200  # calibration images for the peers: the export's default count and sample


@dataclass
class Target:
    """One thing to time: an artifact on a backend at a precision."""

    label: str
    backend: str
    precision: str
    artifact: Path
    options: dict = field(default_factory=dict)


def verdict_of(row: dict) -> str:
    """A row's verdict (passed, within resolution, failed, not validated), read from its status through the one
    mapping above, so a report never compares status strings of its own (results.json from older runs included)."""
    return {status: verdict for verdict, status in STATUS_OF_VERDICT.items()}.get(str(row.get("status")), NOT_VALIDATED)


def expand_precisions(values) -> tuple[str, ...]:
    """Precisions as ``export --precision`` spells them: ``int8`` stands for every INT8 flavour; order kept, no repeats."""
    out: list[str] = []
    for v in values:
        out += INT8_TAGS if v == Precision.INT8.value else [v]
    unknown = [v for v in out if v not in BENCH_PRECISIONS]
    if unknown:
        raise ConfigError(f"Unknown bench precision {unknown[0]!r}; choose from {', '.join(BENCH_PRECISIONS)} or int8.")
    return tuple(dict.fromkeys(out))


def backend_availability() -> dict[str, str | None]:
    """Each bench backend -> None when it can run on this machine, else why not and what to do; cheap (nothing
    heavy is imported), so the defaults never time a backend that would only fill the report with failures."""
    from ..runtime.backends.tensorrt_api import tensorrt_installed

    def missing(module: str, extra: str) -> str | None:
        return None if importlib.util.find_spec(module) else f"{module} is not installed (pip install 'cxr-edge[{extra}]')"

    trt = {(True, True): None, (True, False): "TensorRT is installed but no NVIDIA GPU is visible",
           (False, True): "TensorRT is not installed (pip install 'cxr-edge[gpu-cu12]', or gpu-cu13)",
           (False, False): "no NVIDIA GPU and no TensorRT here"}[(tensorrt_installed(), gpu_names() is not None)]
    keras = None if importlib.util.find_spec("tensorflow") else "TensorFlow is not installed (pip install 'cxr-edge[train]')"
    return {"onnxruntime": missing("onnxruntime", "cpu"), "openvino": missing("openvino", "openvino"),
            "tensorrt": trt, "keras": keras}


def resolve_backends(cfg: BenchConfig) -> tuple[tuple[str, ...], list[dict]]:
    """The backends to time and what the defaults left out, with why; backends named explicitly are all kept (one
    that cannot run here is then reported as not run, with its cause)."""
    if cfg.backends is not None:
        return tuple(cfg.backends), []
    why = backend_availability()
    chosen = tuple(b for b in BENCH_BACKENDS if why[b] is None)
    if not chosen:
        raise ConfigError("No benchmark backend can run on this machine: " + "; ".join(f"{b}: {w}" for b, w in why.items())
                          + ". Install onnxruntime (pip install 'cxr-edge[cpu]').")
    return chosen, [{"what": b, "why": w} for b, w in why.items() if w is not None]


def left_out_precisions(artifact_dir: Path, precisions: tuple[str, ...], backends: tuple[str, ...]) -> list[dict]:
    """Requested precisions with nothing to time in the folder (no artifact; bf16 is OpenVINO's hint on FP32)."""
    tags = {p.name.split(".")[1] for p in artifact_dir.glob("model.*.onnx")}
    tags |= {_plan_tag(read_manifest(p, verify=False)) for p in artifact_dir.glob("model.*.plan")}
    out = []
    for p in precisions:
        if p == Precision.BF16.value and Precision.FP32.value in tags and "openvino" not in backends:
            out.append({"what": p, "why": "only OpenVINO runs it (a hint on the FP32 artifact), and openvino is not timed"})
        elif p not in tags and not (p == Precision.BF16.value and Precision.FP32.value in tags):
            out.append({"what": p, "why": "no artifact in the folder"})
    return out


def _plan_tag(doc: Manifest) -> str:
    """The precision tag of a TensorRT engine: its precision, INT8 named by its flavour (int8-trt)."""
    if doc.precision is not Precision.INT8:
        return doc.precision.value
    return Variant(Precision.INT8, doc.int8_target or Int8Target.TRT).tag


def discover_targets(artifact_dir: Path, cfg: BenchConfig) -> tuple[list[Target], list[dict], Path | None]:
    """Targets to run, rows for what cannot run (with the reason), and the source Keras model; ``cfg.backends``
    resolved (None: those that can run here)."""
    targets: list[Target] = []
    skipped: list[dict] = []
    source: Path | None = None
    threads = cfg.threads or usable_cores()
    backends = resolve_backends(cfg)[0]
    plans = sorted(artifact_dir.glob("model.*.plan"))
    for onnx in sorted(artifact_dir.glob("model.*.onnx")):
        doc = read_manifest(onnx, verify=False)
        tag = onnx.name.split(".")[1]
        if doc.gate_failed:
            log.warning("%s failed its export gate; benchmarking it anyway, marked", onnx.name)
        src = doc.source_model
        for cand in (artifact_dir / (src.file or "-"), Path(src.path or "-")):
            if source is None and cand.is_file():
                source = cand
        if tag in cfg.precisions and "onnxruntime" in backends:
            targets.append(Target(f"onnxruntime {tag}", "onnxruntime", tag, onnx, {"device": "cpu", "threads": threads}))
        if "openvino" in backends:
            targets += _openvino_targets(onnx, tag, cfg.precisions, threads)
        if "tensorrt" in backends and tag in TENSORRT_SOURCES and not plans:
            skipped += _no_tensorrt_rows(tag, cfg.precisions, backend_availability()["tensorrt"])
    for plan in plans if "tensorrt" in backends else ():
        doc = read_manifest(plan, verify=False)
        if _plan_tag(doc) in cfg.precisions:
            targets.append(Target(f"tensorrt {doc.precision.value}", "tensorrt", doc.precision.value, plan,
                                  {"cuda_graph": True} if cfg.cuda_graph else {}))
    if "keras" in backends:
        if source is None:
            skipped.append({"label": "keras", "backend": "keras", "precision": Precision.FP32.value,
                            "status": "could not run: the source .keras model is not available"})
        else:
            for mode in ("predict", "call"):
                targets.append(Target(f"keras {mode}", "keras", Precision.FP32.value, source, {"mode": mode}))
    return targets, skipped, source


def _openvino_targets(onnx: Path, tag: str, precisions: tuple[str, ...], threads: int) -> list[Target]:
    """An FP32 artifact under each of OpenVINO's float hints, any other as it is; INT8 also split over streams."""
    out = []
    for p in [p for p in (OPENVINO_HINTS if tag == Precision.FP32 else (tag,)) if p in precisions]:
        opts = {"precision": p if p in OPENVINO_HINTS else None, "threads": threads}
        out.append(Target(f"openvino {p}", "openvino", p, onnx, opts))
        if is_int8(p) and threads > 1:  # one stream per core: batches split over streams
            out.append(Target(f"openvino {p} {threads} streams", "openvino", p, onnx, {**opts, "streams": threads}))
    return out


def _no_tensorrt_rows(tag: str, precisions: tuple[str, ...], unavailable: str | None) -> list[dict]:
    """Rows saying why the requested TensorRT engines an artifact would build, and ONNX Runtime's TensorRT EP, did
    not run (``unavailable``: why TensorRT cannot run here, None when it can and only the engine is missing)."""
    built = (Precision.FP32, Precision.FP16) if tag == Precision.FP32 else (Precision.INT8,)
    engines = [p for p in built if (tag if p is Precision.INT8 else p.value) in precisions]
    why = ("could not run: no GPU/TensorRT (no engine built; cxr-edge build needs a GPU)" if unavailable else
           "could not run: no TensorRT engine (.plan) in the folder; build one here with cxr-edge build")
    rows = [{"label": f"tensorrt {p.value}", "backend": "tensorrt", "precision": p.value, "status": why}
            for p in engines]
    if tag in precisions:
        rows.append({"label": f"onnxruntime-trt-ep {tag}", "backend": "onnxruntime (TensorRT EP)", "precision": tag,
                     "status": _trt_ep_status()})
    return rows


def _trt_ep_status() -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "could not run: onnxruntime missing"
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "could not run: no GPU/TensorRT (TensorrtExecutionProvider not available in this onnxruntime)"
    return "could not run: no GPU visible"


def labelled_images(artifact_dir: Path, spec: PreprocessSpec, classes, data: str | None, source: Path | None,
                    limit: int) -> tuple[np.ndarray, np.ndarray, list[Path], dict]:
    """Test-split images (or all, for foreign data) packed once, with labels and paths.

    The training data's split comes from the source Keras model's manifest, else from the FP32
    artifact's (export copies it there), so an export folder moved without its .keras still finds it.
    """
    trained = read_manifest(source, verify=False).data if source else DataProvenance()
    if trained == DataProvenance():  # none recorded with the source model
        trained = read_manifest(artifact_dir / FP32_ARTIFACT, verify=False).data
    root = data or (trained.root if trained.root and Path(trained.root).is_dir() else None)
    if root is None:
        from ..synthetic import synthetic_parity_images

        x = synthetic_parity_images(spec, 64)
        return x, np.full(len(x), -1), [], {"data": "synthetic (unlabelled)", "split": None}
    ds = scan_dataset(root, classes=classes)
    if is_training_data(ds, trained):
        items = training_split(ds, trained)["test"]
        split = "test"
    else:
        items, split = ds.items, "all"
    got = load_items(items[:limit], classes, spec, split)
    return got.x, got.y, [i.path for i in got.items], {"data": str(root), "split": split, "n": len(got.items)}


def _accuracy(probs, y, classes, threshold, ref) -> dict:
    from ..evaluation.metrics import evaluate_predictions

    out: dict[str, Any] = {"top_class_agreement_vs_fp32": float((probs.argmax(1) == ref.argmax(1)).mean()),
           "decision_flips_vs_fp32": int((decide(probs, classes, threshold) != decide(ref, classes, threshold)).sum()),
           "max_abs_dprob_vs_fp32": float(np.abs(probs - ref).max())}
    if (y >= 0).all() and len(set(y.tolist())) > 1:
        m = evaluate_predictions(y, probs, classes, threshold, n_boot=0)
        cov = m.get("covid") or {}
        out.update({"accuracy": m["accuracy"], "roc_auc": m["roc_auc"].get("COVID") or m["roc_auc_macro"],
                    "covid_sensitivity": cov.get("sensitivity"), "covid_specificity": cov.get("specificity")})
    return out


@dataclass
class Contender:
    """Something bench times: one of our targets, a peer, or the Keras baseline, loaded once for all rounds."""

    label: str
    kind: str  # "ours", "peer" or "baseline"
    base: dict
    status: str
    infer: Callable[[np.ndarray], np.ndarray]
    close: Callable[[], None]
    engine: Backend | None = None  # our Backend (end-to-end rows need it)
    times: dict[int, list[np.ndarray]] = field(default_factory=dict)  # batch -> seconds per call, one array per round


def _validate(probs, y_acc, classes, threshold, ref_probs, precision: str, split: str) -> tuple[dict, str]:
    acc = _accuracy(probs, y_acc, classes, threshold, ref_probs)
    kind = Precision.of(precision)
    verdict = agreement_verdict(int((probs.argmax(1) == ref_probs.argmax(1)).sum()), len(ref_probs),
                                GATE_LIMITS.min_agreement(kind), split)
    acc["agreement_verdict"] = verdict["text"]
    validated = accepted(verdict) and (kind is not Precision.FP32 or acc["max_abs_dprob_vs_fp32"] <= GATE_LIMITS.fp32_max_abs)
    return acc, STATUS_OF_VERDICT[verdict["status"] if validated else FAILED]


def _infer_all(infer, x: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([infer(x[i : i + batch]) for i in range(0, len(x), batch)])


@dataclass
class Reference:
    """What every row is validated against and timed on: the FP32 artifact's facts, the labelled images packed once,
    and the FP32 artifact's answers on them."""

    fp32_doc: Manifest
    spec: PreprocessSpec
    x: np.ndarray
    y: np.ndarray
    paths: list[Path]
    data_info: dict
    macs: int
    probs: np.ndarray

    @property
    def split(self) -> str:
        return self.data_info.get("split") or "synthetic"

    def validate(self, probs: np.ndarray, precision: str) -> tuple[dict, str]:
        """Accuracy and agreement with the FP32 answers, judged by the export gate's limits for ``precision``."""
        return _validate(probs, self.y, self.fp32_doc.classes, self.fp32_doc.threshold, self.probs, precision, self.split)


def run_bench(artifact_dir: str | Path, cfg: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    """Every target and peer loaded and validated once, timed in interleaved rounds, then set against the Keras
    baseline, its FP32 artifact and the machine's measured ceilings."""
    artifact_dir = Path(artifact_dir)
    backends, left_out = resolve_backends(cfg)
    cfg = dataclasses.replace(cfg, precisions=expand_precisions(cfg.precisions))
    targets, skipped, source = discover_targets(artifact_dir, dataclasses.replace(cfg, backends=backends))
    if cfg.backends is None:  # defaults are not noisy: what they cannot run here is one line, not rows
        left_out += _fold_skipped(skipped)
        skipped = []
    left_out += left_out_precisions(artifact_dir, cfg.precisions, backends)
    if not targets:
        raise ConfigError(f"Nothing to benchmark in {artifact_dir} with backends {', '.join(backends)} and precisions "
                          f"{', '.join(cfg.precisions)}: expected model.*.onnx artifacts from cxr-edge export; check the "
                          "folder, --backend and --precision.")
    ref = _reference(artifact_dir, cfg, source)
    rows: list[dict] = list(skipped)
    accuracy: dict[str, dict] = {}
    contenders = [c for t in targets if (c := _load_target(t, ref, cfg.batches, rows, accuracy)) is not None]
    if cfg.peers:
        contenders += _load_peers(artifact_dir, ref.fp32_doc, ref.spec, source, cfg, rows, accuracy, ref.validate, ref.x)
    failed = _time_rounds(contenders, ref.x, cfg, progress)
    rows += [_timed_row(c, b, failed, ref, cfg) for c in contenders for b in cfg.batches]
    comparison = compare_rounds(contenders, cfg.batches) if cfg.peers else None
    for c in contenders:
        c.close()
    contenders.clear()
    gc.collect()
    _add_ratios(rows)
    add_fp32_ratios(rows)
    machine = machine_info()
    peak, float_peaks = _measured_peaks(rows, cfg)
    prep = []
    if cfg.preprocessing:
        from .preprocess_bench import measure_preprocessing

        prep = measure_preprocessing(ref.paths, ref.spec, budget_s=min(cfg.budget_s, 2.0))
    return {"measured_int8_peak": peak, "measured_float_peaks": float_peaks, "preprocessing": prep, "machine": machine,
            "config": {k: v for k, v in cfg.__dict__.items()}, "artifact_dir": str(artifact_dir),
            "backends": list(backends), "left_out": left_out, "mostly_float": mostly_float(rows),
            "lower_precisions_slower": lower_precisions_slower(rows),
            "recipe": ref.fp32_doc.recipe, "classes": ref.fp32_doc.classes, "input": ref.spec.to_dict(),
            "macs_per_image": ref.macs, "accuracy_data": ref.data_info, "rows": rows, "accuracy": accuracy,
            "summary": _summary(rows, ref.macs), "peers": comparison, "graph_rewrites": _graph_rewrites(ref.fp32_doc),
            "int8_does_not_pay": int8_does_not_pay(rows, machine), "int8_pays": int8_pays(rows, machine)}


def _fold_skipped(skipped: list[dict]) -> list[dict]:
    """Rows the default backends could not run, one left-out entry per backend and cause."""
    causes = {(r["backend"], r["status"].removeprefix("could not run: ")): None for r in skipped}
    return [{"what": b, "why": why} for b, why in causes]


def _graph_rewrites(doc: Manifest) -> dict[str, Any] | None:
    """The rewrites export made to the FP32 graph, as its manifest records them (None: none recorded)."""
    return (doc.graph_rewrites.to_dict() or None) if doc.graph_rewrites is not None else None


def _reference(artifact_dir: Path, cfg: BenchConfig, source: Path | None) -> Reference:
    """The labelled images and the FP32 artifact's answers on them, computed once with ONNX Runtime's CPU kernels."""
    from ..runtime.backends.ort_session import cpu_session, run_batched

    fp32 = artifact_dir / FP32_ARTIFACT
    fp32_doc = read_manifest(fp32, verify=False)
    spec = fp32_doc.preprocess
    x, y, paths, data_info = labelled_images(artifact_dir, spec, fp32_doc.classes, cfg.data, source,
                                             cfg.max_accuracy_images)
    macs = macs_per_image(fp32)
    probs = run_batched(cpu_session(fp32), x, ["probs"])["probs"]
    return Reference(fp32_doc, spec, x, y, paths, data_info, macs, probs)


def _load_target(t: Target, ref: Reference, batches: tuple[int, ...], rows: list[dict],
                 accuracy: dict) -> Contender | None:
    """One of our targets loaded and validated on the labelled images; one that cannot load or run is a row per
    batch in ``rows`` instead."""
    base: dict[str, Any] = {"label": t.label, "backend": t.backend, "precision": t.precision, "artifact": t.artifact.name,
                            "size_mb": round(t.artifact.stat().st_size / 1e6, 2),
                            "options": {k: v for k, v in t.options.items() if k in COMPARED_OPTIONS}}
    if is_int8(t.precision):
        base["int8_mac_share"] = int8_mac_share(t.artifact)
    try:
        rss0 = current_rss_kb()
        t0 = time.perf_counter()
        # a gate-failed artifact, or one failing its load-time self-check here, is measured and reported as
        # such, never deployed by bench
        eng = open_backend(t.artifact, backend=t.backend, verify=True, allow_failed_gate=True, self_check="warn",
                           **t.options).load()
        base["load_s"] = round(time.perf_counter() - t0, 3)
    except Exception as exc:  # a row that cannot run is reported, not fatal
        rows += [{**base, "batch": b, "status": f"could not run: {_reason(exc)}"} for b in batches]
        return None
    try:
        probs = eng.infer_all(ref.x, 32)
    except Exception as exc:  # an engine that loads but fails on real input (a graph it cannot compile)
        log.warning("%s failed while running: %s", t.label, _reason(exc))
        rows += [{**base, "batch": b, "status": f"failed while running: {_reason(exc)}"} for b in batches]
        eng.close()
        return None
    base.update({"provider": eng.info.provider, "precision": eng.info.precision, "threads": t.options.get("threads"),
                 "rss_added_mb": _rss_added(rss0), "self_check": self_check_summary(eng.info.self_check)})
    acc, status = ref.validate(probs, t.precision)
    accuracy[t.label] = {**acc, "status": status, "provider": eng.info.provider}
    return Contender(t.label, "baseline" if t.backend == "keras" else "ours", base, status, _probs_of(eng), eng.close, eng)


def _probs_of(eng: Backend) -> Callable[[np.ndarray], np.ndarray]:
    def infer(batch: np.ndarray) -> np.ndarray:
        return eng.infer(batch, ["probs"])["probs"]

    return infer


def _time_rounds(contenders: list[Contender], x: np.ndarray, cfg: BenchConfig, progress: bool) -> dict[str, str]:
    """Every contender at every batch once per round, the order rotated per round, so a VM's drift hits them alike;
    returns why each contender that failed mid-run failed."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(contenders) * len(cfg.batches) * cfg.rounds, desc="bench", unit="row")
    failed: dict[str, str] = {}
    for r in range(cfg.rounds):
        k = r % max(1, len(contenders))
        for c in contenders[k:] + contenders[:k]:
            for b in cfg.batches:
                if c.label not in failed:
                    pool = [np.take(x, range(j * b, (j + 1) * b), axis=0, mode="wrap") for j in range(4)]
                    try:
                        c.times.setdefault(b, []).append(measure(c.infer, pool, cfg.budget_s / cfg.rounds))
                    except Exception as exc:  # an engine that fails mid-run is a row, not a crash
                        failed[c.label] = _reason(exc)
                        log.warning("%s failed while running: %s", c.label, failed[c.label])
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return failed


def _timed_row(c: Contender, b: int, failed: dict[str, str], ref: Reference, cfg: BenchConfig) -> dict:
    """One contender at one batch: its timings over the rounds and, for our rows at the largest batch, end to end."""
    rounds = c.times.get(b, [])
    if not rounds or c.label in failed:
        return {**c.base, "batch": b, "status": f"failed while running: {failed.get(c.label, '?')}"}
    row = {**c.base, "batch": b, "status": c.status, "verdict": verdict_of({"status": c.status}), **_over_rounds(rounds, b)}
    if c.kind == "peer":
        row["peer"] = True
    if c.engine is not None and (note := c.engine.fit_note(b)):  # fixed-profile engines: what timing includes
        row["note"] = note
    if ref.macs:
        row["gmacs_per_s"] = row["throughput_ips"] * ref.macs / 1e9
    if c.kind == "ours" and cfg.e2e and ref.paths and b == max(cfg.batches):
        row.update(_end_to_end(c.engine, ref.paths, ref.spec, b, cfg.budget_s))
        row["e2e_vs_engine"] = row["e2e_throughput_ips"] / row["throughput_ips"]
        row["decode_ceiling_ips"] = _decode_ceiling(ref, b, cfg.budget_s, _reduced(c.engine))
        row["e2e_vs_ceiling"] = row["e2e_throughput_ips"] / min(row["throughput_ips"], row["decode_ceiling_ips"])
        row.update(_end_to_end_gpu(c.engine, ref.paths, ref.spec, b, cfg.budget_s, row["throughput_ips"]))
    return row


def _measured_peaks(rows: list[dict], cfg: BenchConfig) -> tuple[dict, dict]:
    """This machine's measured INT8 and float GEMM ceilings, and each row's fraction of the one for its precision."""
    from .peak import measured_float_gemm_peaks, measured_int8_gemm_peak

    peak = measured_int8_gemm_peak(budget_s=min(cfg.budget_s, 1.0), threads=cfg.threads)
    float_peaks = measured_float_gemm_peaks(budget_s=min(cfg.budget_s, 1.0), threads=cfg.threads)
    for r in rows:
        prec = str(r.get("precision", ""))
        ceiling = peak.get("gmacs") if is_int8(prec) else float_peaks.get(prec)
        if r.get("gmacs_per_s") and ceiling:
            r["fraction_of_measured_peak"] = r["gmacs_per_s"] / ceiling
            if is_int8(prec):
                r["fraction_of_measured_int8_peak"] = r["fraction_of_measured_peak"]
    return peak, float_peaks


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:200] if text else type(exc).__name__


def _rss_added(rss0_kb: int | None) -> float | None:
    now = current_rss_kb()
    return None if rss0_kb is None or now is None else round((now - rss0_kb) / 1024, 1)


def _over_rounds(rounds: list[np.ndarray], batch: int) -> dict:
    """Latency percentiles over every call of every round; throughput as the median of the rounds' own,
    with their min and max, so one noisy round on a shared VM shows as a spread, not as the result."""
    row = summarise(np.concatenate(rounds), batch)
    per_round = [batch / float(np.median(t)) for t in rounds]
    row.update({"rounds": len(rounds), "throughput_ips": float(np.median(per_round)),
                "throughput_min_ips": float(min(per_round)), "throughput_max_ips": float(max(per_round))})
    return row


def _load_peers(artifact_dir, fp32_doc: Manifest, spec, source, cfg, rows, accuracy, validate, x_acc) -> list[Contender]:
    from ..data.gate_data import load_gate_data
    from .peers import build_peers

    # the calibration images cxr-edge's own export used: same split, same sample, same count
    calib = load_gate_data(fp32_doc, spec, cfg.data if cfg.data else None, cfg.peer_calib_size, seed=0).calib_x
    threads = cfg.threads or usable_cores()
    engines, skipped = build_peers(artifact_dir, artifact_dir / FP32_ARTIFACT, source, calib, threads, cfg.peers)
    rows += [{**s, "batch": b} for s in skipped for b in cfg.batches]
    out = []
    for p in engines:
        base = {"label": p.label, "backend": p.backend, "precision": p.precision, "provider": p.provider,
                "artifact": f"peers/{p.artifact.name}", "size_mb": p.size_mb,
                "load_s": round(p.load_s, 3), "threads": threads, "how": p.how}
        try:
            acc, status = validate(_infer_all(p.infer, x_acc), p.precision)
        except Exception as exc:  # a peer that cannot answer is a row, not a failed benchmark
            rows += [{**base, "batch": b, "peer": True, "status": f"could not run: {_reason(exc)}"} for b in cfg.batches]
            continue
        accuracy[p.label] = {**acc, "status": status, "provider": p.provider, "peer": True}
        out.append(Contender(p.label, "peer", base, status, p.infer, p.close))
    return out


def compare_rounds(contenders: list[Contender], batches) -> dict:
    """Ours vs the best peer, round by round: offline throughput at each batch, and batch-1 p90 latency.

    Within a round every contender ran minutes apart at most, so the ratio survives a VM whose speed drifts
    between runs; the median over rounds and the min-max are reported, with who won each round. The same
    against only the peers whose outputs passed validation here (a peer that fails it would not be deployed).
    """
    # an engine failing its self-check here would be refused at deployment, so it is not "our best" either
    ours = [c for c in contenders if c.kind == "ours" and c.status.startswith("validated") and not self_check_failed(c.base)]
    peers = [c for c in contenders if c.kind == "peer"]
    out: dict = {"ours": [c.label for c in ours], "peers": [c.label for c in peers]}
    if not ours or not peers:
        mine = "no validated cxr-edge row passing its self-check"
        out["note"] = "nothing to compare: " + (mine if not ours else "no peer could run")
        return out
    out.update(_ratios(ours, peers, batches))
    valid = [c for c in peers if c.status.startswith("validated")]
    out["validated_peers"] = [c.label for c in valid]
    if valid and len(valid) < len(peers):
        out["vs_validated_peers"] = _ratios(ours, valid, batches)
    return out


def _ratios(ours: list[Contender], peers: list[Contender], batches) -> dict:
    def per_round(c: Contender, b: int, stat) -> list[float]:
        return [stat(t, b) for t in c.times.get(b, [])]

    n_rounds = min(len(c.times.get(b, [])) for c in ours + peers for b in batches)
    tput = lambda t, b: b / float(np.median(t))
    p90 = lambda t, b: 1e3 * float(np.percentile(t, 90))
    out: dict = {"throughput": {}, "latency_p90": None, "rounds": n_rounds}
    for b in batches:
        ratios, winners = [], []
        for r in range(n_rounds):
            mine = max(ours, key=lambda c: per_round(c, b, tput)[r])
            theirs = max(peers, key=lambda c: per_round(c, b, tput)[r])
            ratios.append(per_round(mine, b, tput)[r] / per_round(theirs, b, tput)[r])
            winners.append((mine.label, theirs.label))
        out["throughput"][str(b)] = _spread(ratios) | {"ours_best": _mode(w[0] for w in winners),
                                                        "peer_best": _mode(w[1] for w in winners)}
    if 1 in batches:
        ratios, winners = [], []
        for r in range(n_rounds):
            mine = min(ours, key=lambda c: per_round(c, 1, p90)[r])
            theirs = min(peers, key=lambda c: per_round(c, 1, p90)[r])
            ratios.append(per_round(theirs, 1, p90)[r] / per_round(mine, 1, p90)[r])  # > 1: ours is faster
            winners.append((mine.label, theirs.label))
        out["latency_p90"] = _spread(ratios) | {"ours_best": _mode(w[0] for w in winners),
                                                "peer_best": _mode(w[1] for w in winners)}
    return out


def _spread(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "per_round": [round(v, 4) for v in values]}


def _mode(labels) -> str:
    from collections import Counter

    return Counter(labels).most_common(1)[0][0]


def _end_to_end_gpu(eng, paths, spec, batch, budget_s, engine_ips) -> dict:
    """The same with GPU preprocessing (resize on the device), where the engine runs on CUDA."""
    from ..runtime.screener import choose_preprocess

    path, why = choose_preprocess("auto", eng)
    if path != "gpu":
        return {"e2e_gpu_preprocess": f"could not run: {why}"}
    from ..runtime.gpu_preprocess import GpuBatchPacker

    try:
        r = _end_to_end(eng, paths, spec, batch, budget_s, GpuBatchPacker(spec, batch, reduce=_reduced(eng)))
    except Exception as exc:  # the device path failing is a result, not a crash
        return {"e2e_gpu_preprocess": f"could not run: {type(exc).__name__}: {exc}"[:200]}
    return {"e2e_gpu_preprocess": "ran", "e2e_gpu_throughput_ips": r["e2e_throughput_ips"],
            "e2e_gpu_vs_engine": r["e2e_throughput_ips"] / engine_ips}


def _reduced(eng) -> bool:
    from ..runtime.decode_gate import decode_mode

    return decode_mode(getattr(eng, "manifest", None))[0]


_DECODE_CEILINGS: dict[tuple, float] = {}


def _decode_ceiling(ref, batch: int, budget_s: float, reduce: bool) -> float:
    """Files -> decode -> resize -> pack on every usable core with no inference: the most images/s any engine could
    be fed here, so end to end is judged against min(engine, this), not against the engine alone (measured once per
    image set, size and decode choice)."""
    key = (tuple(map(str, ref.paths)), ref.spec, batch, reduce)
    if key not in _DECODE_CEILINGS:
        packer = BatchPacker(ref.spec, batch, reduce=reduce)
        n, t0 = 0, time.perf_counter()
        try:
            while time.perf_counter() - t0 < budget_s or n == 0:
                for pb in packer.iter_batches(ref.paths):
                    n += len(pb.indices)
                    if time.perf_counter() - t0 > budget_s and n > 0:
                        break
        finally:
            packer.close()
        _DECODE_CEILINGS[key] = n / (time.perf_counter() - t0)
    return _DECODE_CEILINGS[key]


def _end_to_end(eng, paths, spec, batch, budget_s, packer=None) -> dict:
    """Files -> decode -> resize -> pack -> infer, decode overlapped with inference, decoding as the runtime would
    for this artifact (reduced-resolution JPEG decoding only where its decode gate passed)."""
    packer = packer or BatchPacker(spec, batch, reduce=_reduced(eng))
    infer = eng.infer_device if getattr(packer, "path", "cpu") == "gpu" else eng.infer
    n = 0
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < budget_s or n == 0:
            for pb in packer.iter_batches(paths):
                if len(pb.x):
                    infer(pb.x, ["probs"])
                n += len(pb.indices)
                if time.perf_counter() - t0 > budget_s and n > 0:
                    break
    finally:
        packer.close()
    return {"e2e_throughput_ips": n / (time.perf_counter() - t0)}


def _add_ratios(rows: list[dict]) -> None:
    base = {r["batch"]: r["p50_ms"] for r in rows if r.get("label") == "keras predict" and "p50_ms" in r}
    for r in rows:
        if "p50_ms" in r and r["batch"] in base:
            r["speedup_vs_keras_predict"] = base[r["batch"]] / r["p50_ms"]


def _summary(rows: list[dict], macs: int) -> dict:
    ok = [r for r in rows if "p50_ms" in r]
    out = {}
    for label in sorted({r["label"] for r in ok}):
        mine = [r for r in ok if r["label"] == label]
        single = next((r for r in mine if r["batch"] == 1), None)
        best = max(mine, key=lambda r: r["throughput_ips"])
        out[label] = {"single_stream_p90_ms": single["p90_ms"] if single else None,
                      "offline_throughput_ips": best["throughput_ips"], "offline_batch": best["batch"],
                      "status": best["status"], "verdict": verdict_of(best), "self_check": best.get("self_check"),
                      "x_fp32_same_backend": best.get("x_fp32_same_backend"), "int8_mac_share": best.get("int8_mac_share")}
    return out

