"""Single-image latency, bytes to decision (+ heatmap), for one real large radiograph as PNG, JPEG and DICOM
(uncompressed and JPEG 2000): cxr-edge's path beside what a user would write, interleaved in one run.

    python benchmarks/single_image_latency.py runs/real_small/art [--image ../shared/data/cxr-dev/.../x.jpg]
        [--repeats 40] [--out benchmarks/results/single_image]

Ours: a warm ``Screener`` (the artifact's own decode choices: full resolution unless its decode gate passed) with
``predict([bytes], explain=True)``: decision and Grad-CAM heatmap. The user's: OpenCV (PNG/JPEG) or pydicom
(DICOM, with its pylibjpeg plugins) decode, min-max to 8 bit, ``cv2.resize(INTER_AREA)``, and OpenVINO on the
FP32 ONNX (the best peer engine on this CPU for this model; ONNX Runtime FP32 is reported too), decision only.
The image files are made in a temporary folder from the real image and never written into the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # dicom_studies: the repo's one way to make DICOM from a real image


def default_image() -> Path:
    """The largest real JPEG in the shared set with a shorter side of 1.8k px or more (a 2-3k px CR/DX export)."""
    import cv2

    best = None
    for p in sorted((ROOT.parent / "shared" / "data" / "cxr-dev").rglob("*.jp*g")):
        h, w = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape
        if 1800 <= min(h, w) <= 3000 and (best is None or h * w > best[0]):
            best = (h * w, p)
    if best is None:
        raise SystemExit("no 2-3k px JPEG in ../shared/data/cxr-dev; pass --image")
    return best[1]


def make_inputs(image: Path, tmp: Path) -> dict[str, bytes]:
    import cv2
    from dicom_studies import make_instance

    gray = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
    ok, png = cv2.imencode(".png", gray)
    assert ok
    out = {"png8": png.tobytes(), "jpeg": image.read_bytes()}
    side = max(gray.shape)
    for name, enc in (("dicom", "explicit"), ("dicom-j2k", "jpeg2000")):
        path = tmp / f"{name}.dcm"
        make_instance(image, path, "pa", bits=16, max_side=side, encoding=enc)
        out[name] = path.read_bytes()
    return out


def naive_decode(data: bytes, fmt: str) -> np.ndarray:
    import cv2

    if fmt.startswith("dicom"):
        import pydicom

        px = pydicom.dcmread(io.BytesIO(data)).pixel_array.astype(np.float32)
        lo, hi = float(px.min()), float(px.max())
        return ((px - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def naive_engines(fp32: Path):
    """What a user would run the same model on: OpenVINO (and ONNX Runtime) on the FP32 ONNX, one image at a time."""
    import onnxruntime as ort
    import openvino as ov

    compiled = ov.Core().compile_model(str(fp32), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return {"openvino": lambda x: req.infer({0: x}), "onnxruntime": lambda x: sess.run(None, {name: x})}


def run(art_dir: Path, image: Path, repeats: int) -> dict:
    import cv2

    from cxr_edge.manifest import read_manifest
    from cxr_edge.runtime import Screener

    ours_art = next(p for p in (art_dir / "model.int8-cpu.onnx", art_dir / "model.fp32.onnx") if p.is_file())
    fp32 = art_dir / "model.fp32.onnx"
    spec = read_manifest(fp32, verify=False).preprocess
    with tempfile.TemporaryDirectory() as d:
        inputs = make_inputs(image, Path(d))
    engines = naive_engines(fp32)
    times: dict[str, dict[str, list[float]]] = {f: {} for f in inputs}
    with Screener(ours_art, batch_size=1, isolation=None) as s:
        decode_note = s.decode_note
        for _ in range(3):  # warm every path once
            for data in inputs.values():
                s.predict([data], explain=True)
        for _ in range(repeats):
            for fmt, data in inputs.items():  # interleaved: a noisy VM's drift hits every contender alike
                t = time.perf_counter()
                r = s.predict([data], explain=True)[0]
                times[fmt].setdefault("ours (decision + heatmap)", []).append(time.perf_counter() - t)
                assert r.ok, r.error
                for eng, infer in engines.items():
                    t = time.perf_counter()
                    px = naive_decode(data, fmt)
                    x = cv2.resize(px, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
                    x = x.reshape(1, spec.height, spec.width, 1)
                    if spec.input_channels == 3:
                        x = np.repeat(x, 3, axis=3)
                    infer(np.ascontiguousarray(x))
                    times[fmt].setdefault(f"user: OpenCV/pydicom + {eng} FP32 (decision only)", []).append(
                        time.perf_counter() - t)
    rows = []
    for fmt, per in times.items():
        ours = np.percentile(per["ours (decision + heatmap)"], 90)
        best_user = min(np.percentile(v, 90) for k, v in per.items() if k.startswith("user"))
        for who, v in per.items():
            rows.append({"format": fmt, "bytes": len(inputs[fmt]), "path": who, "p50_ms": 1e3 * float(np.median(v)),
                         "p90_ms": 1e3 * float(np.percentile(v, 90)), "n": len(v),
                         "ours_p90_over_best_user_p90": float(ours / best_user)})
    return {"image": str(image.relative_to(ROOT.parent)) if image.is_relative_to(ROOT.parent) else str(image),
            "shape": list(cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).shape), "artifact": ours_art.name,
            "decode": decode_note, "repeats": repeats, "rows": rows}


def write(res: dict, out: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxr_edge.bench.machine import machine_info

    out.mkdir(parents=True, exist_ok=True)
    res["machine"] = machine_info()
    res["command"] = command
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    lines = ["# Single-image latency: bytes to decision (+ heatmap)", "", f"Command: `{command}`", "",
             f"Image: {res['image']} ({res['shape'][1]}x{res['shape'][0]} px), {res['repeats']} interleaved repeats; "
             f"ours: {res['artifact']} ({res['decode']})", "",
             "| format | bytes | path | p50 ms | p90 ms | ours p90 / best user p90 |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['format']} | {r['bytes']:,} | {r['path']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['ours_p90_over_best_user_p90']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    fmts = list(dict.fromkeys(r["format"] for r in res["rows"]))
    paths = list(dict.fromkeys(r["path"] for r in res["rows"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(paths)
    for k, p in enumerate(paths):
        ax.bar([i + k * w for i in range(len(fmts))],
               [next(r["p90_ms"] for r in res["rows"] if r["format"] == f and r["path"] == p) for f in fmts], w, label=p)
    ax.set_xticks([i + w * (len(paths) - 1) / 2 for i in range(len(fmts))], fmts)
    ax.set_ylabel("p90 latency, ms (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact_dir", type=Path)
    ap.add_argument("--image", type=Path)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "single_image")
    a = ap.parse_args()
    res = run(a.artifact_dir, a.image or default_image(), a.repeats)
    write(res, a.out, "python " + " ".join(sys.argv))
    print((a.out / "results.md").read_text())


if __name__ == "__main__":
    main()
