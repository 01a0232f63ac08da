"""Grad-CAM: engine-native (ONNX features + closed-form NumPy head gradient) vs TensorFlow GradientTape.

    python benchmarks/gradcam_parity.py MODEL_DIR DATA_DIR OUT_DIR [--n 32]

MODEL_DIR holds model.keras and artifacts/ from cxr-edge export. For every exported precision this
measures heatmap parity against the TensorFlow reference on the Keras FP32 model (Pearson correlation,
max abs difference of max-normalised maps) and the time Grad-CAM adds per image on each path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cxr_edge.data import scan_dataset
from cxr_edge.data.loading import load_images
from cxr_edge.keras_layers import load_keras_model
from cxr_edge.manifest import read_manifest
from cxr_edge.runtime.backends.keras import gradcam_tf
from cxr_edge.runtime.backends.registry import open_backend
from cxr_edge.runtime.gradcam import gradcam, normalise
from cxr_edge.runtime.head import load_artifact_head


def parity(a, b):
    corr = float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else 1.0
    return corr, float(np.abs(normalise(a) - normalise(b)).max())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=32)
    a = ap.parse_args()
    mdir = Path(a.model_dir)
    doc = read_manifest(mdir / "model.keras")
    spec = doc.preprocess
    ds = scan_dataset(a.data, classes=list(doc.classes))
    items = ds.items[:: max(1, len(ds.items) // a.n)][: a.n]
    x = load_images([i.path for i in items], spec).x
    model = load_keras_model(mdir / "model.keras")
    layer = doc.last_conv_layer
    gradcam_tf(model, x[:2], layer)  # trace once
    t0 = time.perf_counter()
    ref, targets, _ = gradcam_tf(model, x, layer)
    tf_s = (time.perf_counter() - t0) / len(x)
    t0 = time.perf_counter()
    model.predict(x, verbose=0)
    keras_predict_s = (time.perf_counter() - t0) / len(x)
    rows = []
    for art in sorted((mdir / "artifacts").glob("model.*.onnx")):
        adoc = read_manifest(art)
        head = load_artifact_head(art, adoc)
        with open_backend(art, device="cpu") as eng:
            eng.infer(x[:2])
            t0 = time.perf_counter()
            feats = eng.infer(x, ["features"])["features"]
            infer_s = (time.perf_counter() - t0) / len(x)
            t0 = time.perf_counter()
            cams = gradcam(head, feats, targets).cam
            cam_s = (time.perf_counter() - t0) / len(x)
        pars = [parity(c, r) for c, r in zip(cams, ref)]
        rows.append({"artifact": art.name, "precision": adoc.precision.value, "min_corr": min(p[0] for p in pars),
                     "median_corr": float(np.median([p[0] for p in pars])), "max_abs_diff": max(p[1] for p in pars),
                     "engine_native_cam_ms_per_image": 1e3 * cam_s, "features_infer_ms_per_image": 1e3 * infer_s})
    res = {"recipe": doc.recipe, "n_images": len(x), "layer": layer,
           "tensorflow_gradcam_ms_per_image": 1e3 * tf_s, "keras_predict_ms_per_image": 1e3 * keras_predict_s, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradcam.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# Grad-CAM parity and cost: {res['recipe']} (layer {layer}, {len(x)} real images)", "",
             f"TensorFlow GradientTape Grad-CAM (batch of {len(x)}): {res['tensorflow_gradcam_ms_per_image']:.1f} ms/image.", "",
             "| artifact | min corr vs TF | median corr | max abs diff (normalised) | engine-native Grad-CAM ms/image (after inference) | inference ms/image |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['artifact']} | {r['min_corr']:.4f} | {r['median_corr']:.4f} | {r['max_abs_diff']:.4f} | "
                     f"{r['engine_native_cam_ms_per_image']:.2f} | {r['features_infer_ms_per_image']:.2f} |")
    (out / "gradcam.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
