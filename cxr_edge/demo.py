"""``cxr-edge demo``: the whole path on the built-in synthetic data (or yours), in minutes on a CPU."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TypedDict

log = logging.getLogger(__name__)


class DemoOverrides(TypedDict, total=False):
    """The TrainConfig fields the demo overrides (passed as keywords)."""

    epochs: int
    learning_rate: float
    image_size: int


# Tuned so the demo trains to well above chance on 2 CPU cores in about a minute. The published
# small-CNN learning rate (1e-3, plain SGD) needs many more epochs than a demo should take; the
# real recipe is untouched for `cxr-edge train`.
DEMO_OVERRIDES: DemoOverrides = {"epochs": 12, "learning_rate": 0.01}
#: seconds of timing per benchmark row: enough for a first impression, not for a report
DEMO_BENCH_BUDGET_S = 1.0


def explain_examples(artifact_dir: Path, data_dir: str | Path, out_dir: Path, per_class: int = 2) -> list[str]:
    """Screen ``per_class`` images of each class with the INT8 CPU artifact and write Grad-CAM overlays."""
    from .data import scan_dataset
    from .runtime import Screener

    art = next((p for p in (Path(artifact_dir) / "model.int8-cpu.onnx", Path(artifact_dir) / "model.fp32.onnx")
                if p.is_file()), None)
    if art is None:
        return []
    try:
        with Screener(art, isolation=None) as s:
            ds = scan_dataset(data_dir, classes=s.classes)
            picks = [i.path for c in ds.classes for i in [it for it in ds.items if it.label == c][:per_class]]
            results = s.predict(picks, explain=True, out_dir=out_dir)
    except Exception as exc:  # a demo step, not the product: say why and go on
        log.warning("heatmaps skipped: %s", exc)
        return []
    return [f"{Path(r.explanation.files['overlay']).name}: {r.decision.text() if r.decision else r.label}"
            for r in results if r.ok and r.explanation and r.explanation.files]


def run_demo(out_dir: str | Path = "cxr-edge-demo", data_dir: str | Path | None = None,
             per_class: int = 150, seed: int = 0) -> Path:
    from .export.pipeline import ExportConfig, export_model
    from .synthetic import write_synthetic_dataset
    from .train.evaluate import evaluate_model
    from .train.trainer import TrainConfig, train

    out = Path(out_dir)
    t0 = time.perf_counter()
    if data_dir is None:
        data_dir = out / "synthetic-data"
        print(f"[1/5] Synthesising {per_class} CXR-like images per class into {data_dir}")
        write_synthetic_dataset(data_dir, per_class=per_class, seed=seed)
        config = TrainConfig(recipe="small_cnn", seed=seed, **DEMO_OVERRIDES)
    else:
        print(f"[1/5] Using your data in {data_dir}")
        config = TrainConfig(recipe="small_cnn", seed=seed)
    print("[2/5] Training the small CNN recipe (COVID vs Normal, 128x128)")
    result = train(config, data_dir, out / "model")
    print("[3/5] Evaluating on the held-out test split")
    report, metrics = evaluate_model(result.model_path, data_dir, out / "report", n_boot=300, progress=False)
    print("[4/5] Exporting ONNX FP32 / FP16 / INT8 (TensorRT and CPU flavours), each gated against FP32")
    exported = export_model(result.model_path, out / "artifacts", ExportConfig(calib_size=200, seed=seed))
    export_md = (exported.out_dir / "export_report.md").read_text()
    with open(report, "a") as f:
        f.write("\n" + export_md.replace("# Export report", "## Exported artifacts and their accuracy gates"))
    doc = json.loads(report.with_suffix(".json").read_text())
    doc["export"] = json.loads((exported.out_dir / "export_report.json").read_text())
    report.with_suffix(".json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print("[5/5] Grad-CAM heatmaps of a few images, and a short benchmark (batch 1 and 8) against Keras")
    heatmaps = explain_examples(exported.out_dir, data_dir, out / "heatmaps")
    from .bench.report import write_results
    from .bench.runner import BenchConfig, run_bench

    bench = run_bench(exported.out_dir, BenchConfig(batches=(1, 8), budget_s=DEMO_BENCH_BUDGET_S, e2e=False), progress=False)
    bench_md = write_results(bench, out / "bench", "cxr-edge demo (short benchmark)")
    cov = metrics.get("covid") or {}
    print(f"\nTest accuracy {metrics['accuracy']:.3f}, ROC-AUC {metrics['roc_auc_macro']:.3f}, "
          f"COVID sensitivity {cov.get('sensitivity', float('nan')):.3f} / specificity "
          f"{cov.get('specificity', float('nan')):.3f} on {metrics['n']} images")
    for a in exported.artifacts:
        verdict = "passed" if a.gate and a.gate.passed else "FAILED"
        size = f"{a.size_bytes / 1e6:.1f} MB" if a.size_bytes else "-"
        print(f"  {a.variant:9s} {size:>9s}  gate {verdict}")
    print("\n  benchmark (offline img/s at best batch; single-stream p90 ms):")
    for label, v in bench["summary"].items():
        p90 = v["single_stream_p90_ms"] or float("nan")
        print(f"  {label:22s} {v['offline_throughput_ips']:8.1f} img/s  p90 {p90:7.1f} ms  {v['status']}")
    print(f"Model:  {result.model_path}")
    print(f"Artifacts: {exported.out_dir}")
    for variant, folder in exported.bundles.items():
        if variant.startswith("int8-cpu"):  # the one a CPU kiosk runs
            print(f"To a kiosk, copy: {folder} (or: cxr-edge bundle {folder} --archive kiosk.cxrbundle.tar)")
    print(f"Report: {report}")
    print(f"Benchmark: {bench_md}")
    if heatmaps:
        print("Heatmaps (where the model looked; caption and colour scale in each image):")
        for line in heatmaps:
            print(f"  {line}")
    print(f"Done in {time.perf_counter() - t0:.0f} s")
    return report
