"""``cxr-edge bench``: one row per (backend, provider, precision, batch), plus accuracy per precision."""

from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import scan_dataset, split_dataset
from ..data.labelled import load_items
from ..decision import decide
from ..errors import ConfigError
from ..evaluation.criteria import PASSED, accepted, agreement_verdict
from ..graph_macs import macs_per_image
from ..manifest import read_manifest
from ..preprocess import PreprocessSpec
from ..runtime.backends.registry import open_backend
from ..runtime.batching import BatchPacker
from .machine import machine_info
from .timing import measure, peak_rss_mb, reset_peak_rss, summarise

log = logging.getLogger(__name__)

GATE_AGREEMENT = {"fp32": 1.0, "fp16": 0.995, "bf16": 0.995, "int8": 0.99}


@dataclass(frozen=True)
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 32)
    backends: tuple[str, ...] = ("onnxruntime", "openvino", "tensorrt", "keras")
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8-trt", "int8-cpu")
    budget_s: float = 3.0
    e2e: bool = True
    accuracy: bool = True
    data: str | None = None
    threads: int | None = None
    max_accuracy_images: int = 400
    cuda_graph: bool = False  # TensorRT rows: replay CUDA graphs
    preprocessing: bool = True  # rows for the host half of preprocessing, CPU and GPU paths


@dataclass
class Target:
    """One thing to time: an artifact on a backend at a precision."""

    label: str
    backend: str
    precision: str
    artifact: Path
    options: dict = field(default_factory=dict)


def discover_targets(artifact_dir: Path, cfg: BenchConfig) -> tuple[list[Target], list[dict], Path | None]:
    """Targets to run, rows for what cannot run (with the reason), and the source Keras model."""
    targets, skipped, source = [], [], None
    threads = cfg.threads or len(os.sched_getaffinity(0))
    for onnx in sorted(artifact_dir.glob("model.*.onnx")):
        doc = read_manifest(onnx, verify=False)
        tag = onnx.name.split(".")[1]
        if doc.gate_failed:
            log.warning("%s failed its export gate; benchmarking it anyway, marked", onnx.name)
        src = doc.source_model
        for cand in (artifact_dir / src.get("file", "-"), Path(src.get("path", "-"))):
            if source is None and cand.is_file():
                source = cand
        if tag in cfg.precisions and "onnxruntime" in cfg.backends:
            targets.append(Target(f"onnxruntime {tag}", "onnxruntime", tag, onnx, {"device": "cpu", "threads": threads}))
        if "openvino" in cfg.backends:
            ov_precs = [p for p in (["fp32", "bf16"] if tag == "fp32" else [tag]) if p in cfg.precisions]
            for p in ov_precs:
                targets.append(Target(f"openvino {p}", "openvino", p, onnx,
                                      {"precision": p if p in ("fp32", "bf16") else None, "threads": threads}))
        if "tensorrt" in cfg.backends and tag in ("fp32", "int8-trt"):
            plans = sorted(artifact_dir.glob("model.*.plan"))
            if not plans:
                for p in (["fp32", "fp16"] if tag == "fp32" else ["int8"]):
                    skipped.append({"label": f"tensorrt {p}", "backend": "tensorrt", "precision": p,
                                    "status": "could not run: no GPU/TensorRT (no engine built; cxr-edge build needs a GPU)"})
                skipped.append({"label": f"onnxruntime-trt-ep {tag}", "backend": "onnxruntime (TensorRT EP)",
                                "precision": tag, "status": _trt_ep_status()})
    for plan in sorted(artifact_dir.glob("model.*.plan")):
        doc = read_manifest(plan, verify=False)
        targets.append(Target(f"tensorrt {doc['precision']}", "tensorrt", doc["precision"], plan,
                              {"cuda_graph": True} if cfg.cuda_graph else {}))
    if "keras" in cfg.backends:
        if source is None:
            skipped.append({"label": "keras", "backend": "keras", "precision": "fp32",
                            "status": "could not run: the source .keras model is not available"})
        else:
            for mode in ("predict", "call"):
                targets.append(Target(f"keras {mode}", "keras", "fp32", source, {"mode": mode}))
    return targets, skipped, source


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
    trained = (read_manifest(source, verify=False).data if source else {}) or \
        read_manifest(artifact_dir / "model.fp32.onnx", verify=False).data
    root = data or (trained.get("root") if trained.get("root") and Path(trained["root"]).is_dir() else None)
    if root is None:
        from ..synthetic import synthetic_parity_images

        x = synthetic_parity_images(spec, 64)
        return x, np.full(len(x), -1), [], {"data": "synthetic (unlabelled)", "split": None}
    ds = scan_dataset(root, classes=classes)
    if trained.get("fingerprint") == ds.fingerprint():
        items = split_dataset(ds, tuple(trained["split_fractions"]), seed=trained["split_seed"])["test"]
        split = "test"
    else:
        items, split = ds.items, "all"
    data = load_items(items[:limit], classes, spec, split)
    return data.x, data.y, [i.path for i in data.items], {"data": str(root), "split": split, "n": len(data.items)}


def _accuracy(probs, y, classes, threshold, ref) -> dict:
    from ..evaluation.metrics import evaluate_predictions

    out = {"top_class_agreement_vs_fp32": float((probs.argmax(1) == ref.argmax(1)).mean()),
           "decision_flips_vs_fp32": int((decide(probs, classes, threshold) != decide(ref, classes, threshold)).sum()),
           "max_abs_dprob_vs_fp32": float(np.abs(probs - ref).max())}
    if (y >= 0).all() and len(set(y.tolist())) > 1:
        m = evaluate_predictions(y, probs, classes, threshold, n_boot=0)
        cov = m.get("covid") or {}
        out.update({"accuracy": m["accuracy"], "roc_auc": m["roc_auc"].get("COVID") or m["roc_auc_macro"],
                    "covid_sensitivity": cov.get("sensitivity"), "covid_specificity": cov.get("specificity")})
    return out


def run_bench(artifact_dir: str | Path, cfg: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    artifact_dir = Path(artifact_dir)
    targets, skipped, source = discover_targets(artifact_dir, cfg)
    if not targets:
        raise ConfigError(f"Nothing to benchmark in {artifact_dir}: expected model.*.onnx artifacts from cxr-edge export.")
    fp32_doc = read_manifest(artifact_dir / "model.fp32.onnx", verify=False)
    spec = PreprocessSpec.from_dict(fp32_doc["preprocess"])
    classes = fp32_doc.classes
    threshold = fp32_doc.threshold
    x_acc, y_acc, paths, data_info = labelled_images(artifact_dir, spec, classes, cfg.data, source, cfg.max_accuracy_images)
    macs = macs_per_image(artifact_dir / "model.fp32.onnx")
    rows, accuracy = list(skipped), {}
    from ..runtime.ort_session import cpu_session, run_batched

    ref_probs = run_batched(cpu_session(artifact_dir / "model.fp32.onnx"), x_acc, ["probs"])["probs"]
    total = len(targets) * len(cfg.batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="bench", unit="row")
    for t in targets:
        base = {"label": t.label, "backend": t.backend, "precision": t.precision, "artifact": t.artifact.name,
                "size_mb": round(t.artifact.stat().st_size / 1e6, 2)}
        try:
            reset_peak_rss()
            t0 = time.perf_counter()
            # a gate-failed artifact is measured and reported as such, never deployed by bench
            eng = open_backend(t.artifact, backend=t.backend, verify=True, allow_failed_gate=True, **t.options).load()
            load_s = time.perf_counter() - t0
        except Exception as exc:  # a row that cannot run is reported, not fatal
            rows += [{**base, "batch": b, "status": f"could not run: {exc}"} for b in cfg.batches]
            if bar:
                bar.update(len(cfg.batches))
            continue
        info = eng.info
        base.update({"provider": info.provider, "precision": info.precision, "load_s": round(load_s, 3),
                     "threads": t.options.get("threads")})
        done = set()
        try:
            probs = eng.infer_all(x_acc, 32)
            acc = _accuracy(probs, y_acc, classes, threshold, ref_probs)
            kind = "int8" if t.precision.startswith("int8") else t.precision
            verdict = agreement_verdict(int((probs.argmax(1) == ref_probs.argmax(1)).sum()), len(ref_probs),
                                        GATE_AGREEMENT.get(kind, 0.99), data_info.get("split") or "synthetic")
            acc["agreement_verdict"] = verdict["text"]
            validated = accepted(verdict) and (kind != "fp32" or acc["max_abs_dprob_vs_fp32"] <= 1e-4)
            status = ("validated" if verdict["status"] == PASSED else "validated within resolution") if validated \
                else "ran, failed validation"
            accuracy[t.label] = {**acc, "status": status, "provider": info.provider}
            for b in cfg.batches:
                pool = [np.take(x_acc, range(k * b, (k + 1) * b), axis=0, mode="wrap") for k in range(4)]
                times = measure(lambda batch, e=eng: e.infer(batch, ["probs"]), pool, cfg.budget_s)
                row = {**base, "batch": b, "status": status, **summarise(times, b), "peak_rss_mb": peak_rss_mb()}
                if note := eng.fit_note(b):  # engines with a fixed profile: say what the timing includes
                    row["note"] = note
                if macs:
                    row["gmacs_per_s"] = row["throughput_ips"] * macs / 1e9
                if cfg.e2e and paths and b == max(cfg.batches):
                    row.update(_end_to_end(eng, paths, spec, b, cfg.budget_s))
                    row["e2e_vs_engine"] = row["e2e_throughput_ips"] / row["throughput_ips"]
                    row.update(_end_to_end_gpu(eng, paths, spec, b, cfg.budget_s, row["throughput_ips"]))
                rows.append(row)
                done.add(b)
                if bar:
                    bar.update(1)
        except Exception as exc:  # an engine that fails mid-run (e.g. a graph a backend cannot compile) is a row, not a crash
            reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
            log.warning("%s failed while running: %s", t.label, reason)
            for b in cfg.batches:
                if b not in done:
                    rows.append({**base, "batch": b, "status": f"failed while running: {reason}"})
                    if bar:
                        bar.update(1)
        eng.close()
        del eng
        gc.collect()
    if bar:
        bar.close()
    _add_ratios(rows)
    from .peak import measured_int8_gemm_peak

    peak = measured_int8_gemm_peak(budget_s=min(cfg.budget_s, 1.0), threads=cfg.threads)
    if peak.get("status") == "ran":
        for r in rows:
            if r.get("gmacs_per_s") and str(r.get("precision", "")).startswith("int8"):
                r["fraction_of_measured_int8_peak"] = r["gmacs_per_s"] / peak["gmacs"]
    prep = []
    if cfg.preprocessing:
        from .preprocess_bench import measure_preprocessing

        prep = measure_preprocessing(paths, spec, budget_s=min(cfg.budget_s, 2.0))
    return {"measured_int8_peak": peak, "preprocessing": prep, "machine": machine_info(),
            "config": {k: v for k, v in cfg.__dict__.items()}, "artifact_dir": str(artifact_dir),
            "recipe": fp32_doc.get("recipe"), "classes": classes, "input": spec.to_dict(), "macs_per_image": macs,
            "accuracy_data": data_info, "rows": rows, "accuracy": accuracy, "summary": _summary(rows, macs)}


def _end_to_end_gpu(eng, paths, spec, batch, budget_s, engine_ips) -> dict:
    """The same with GPU preprocessing (resize on the device), where the engine runs on CUDA."""
    from ..runtime.screener import choose_preprocess

    path, why = choose_preprocess("auto", eng)
    if path != "gpu":
        return {"e2e_gpu_preprocess": f"could not run: {why}"}
    from ..runtime.gpu_preprocess import GpuBatchPacker

    try:
        r = _end_to_end(eng, paths, spec, batch, budget_s, GpuBatchPacker(spec, batch))
    except Exception as exc:  # the device path failing is a result, not a crash
        return {"e2e_gpu_preprocess": f"could not run: {type(exc).__name__}: {exc}"[:200]}
    return {"e2e_gpu_preprocess": "ran", "e2e_gpu_throughput_ips": r["e2e_throughput_ips"],
            "e2e_gpu_vs_engine": r["e2e_throughput_ips"] / engine_ips}


def _end_to_end(eng, paths, spec, batch, budget_s, packer=None) -> dict:
    """Files -> decode -> resize -> pack -> infer, decode overlapped with inference."""
    packer = packer or BatchPacker(spec, batch)
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
                      "status": best["status"]}
    return out
