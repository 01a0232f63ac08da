"""Are predictions identical across two revisions of cxr-edge? Train the three recipes small, export them, screen.

A refactor that claims "no behaviour change" is checked here end to end rather than module by module: the same
Keras models are exported by each revision and every artifact screens the same images, and the probabilities,
labels and Grad-CAM maps must be bit-identical. The revision that runs is whichever ``cxr_edge`` is first on
``PYTHONPATH`` (a ``git worktree`` of the old revision), so one environment serves both.

    # with the old revision: data, the three recipes, their artifacts, its predictions
    PYTHONPATH=/tmp/old python benchmarks/prediction_identity.py make /tmp/ident
    PYTHONPATH=/tmp/old python benchmarks/prediction_identity.py export /tmp/ident old
    PYTHONPATH=/tmp/old python benchmarks/prediction_identity.py predict /tmp/ident old old.json
    # with this revision: the old artifacts (old manifests must load) and its own export of the same models
    python benchmarks/prediction_identity.py predict /tmp/ident old new-on-old.json
    python benchmarks/prediction_identity.py export /tmp/ident new
    python benchmarks/prediction_identity.py predict /tmp/ident new new.json
    python benchmarks/prediction_identity.py compare old.json new-on-old.json new.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

RECIPES = ("small_cnn", "resnet50_tl", "resnet152v2_tl")
PRECISIONS = "fp32,fp16,int8"
INT8_TARGETS = "cpu,trt,ov"


def _cli(*args: str, check: bool = True) -> None:
    subprocess.run([sys.executable, "-m", "cxr_edge.cli", *args], check=check)


def make(root: Path, image_size: int, per_class: int) -> None:
    """Synthetic data and one small model per recipe, trained once so both revisions export the same weights."""
    _cli("synth", str(root / "data"), "--per-class", str(per_class), "--seed", "0")
    for recipe in RECIPES:
        _cli("train", "--recipe", recipe, "--data", str(root / "data"), "--out", str(root / "models" / recipe),
             "--epochs", "1", "--fine-tune-epochs", "0", "--image-size", str(image_size), "--batch-size", "8",
             "--seed", "0", "--weights", "none")


def export(root: Path, tag: str) -> None:
    for recipe in RECIPES:
        model = next((root / "models" / recipe).glob("*.keras"))
        _cli("export", str(model), "--out", str(root / tag / recipe), "--precision", PRECISIONS,
             "--int8-target", INT8_TARGETS, "--calib", str(root / "data"), "--force",
             check=False)  # one-epoch models fail some INT8 gates; --force keeps them, marked, and exits 1


def predict(root: Path, tag: str, out: Path) -> None:
    """Every artifact screens every test image on the CPU; probabilities, labels and heatmap hashes are kept."""
    import cxr_edge
    from cxr_edge.runtime import Screener

    images = sorted(p for p in (root / "data").rglob("*.png"))[::4]
    rows: dict[str, dict] = {"_revision": {"module": str(Path(cxr_edge.__file__).parent)}}
    for art in sorted((root / tag).rglob("*.onnx")):
        key = str(art.relative_to(root / tag))
        try:
            s = Screener(art, backend="onnxruntime", device="cpu", tuning="off")
        except Exception as exc:  # an artifact this revision refuses is a difference too
            rows[key] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        results = s.predict([str(p) for p in images])
        cams = []
        try:
            for r in s.predict([str(p) for p in images[:3]], explain=True):
                cam = r.explanation.cam if r.explanation is not None else None
                cams.append(None if cam is None else hashlib.sha256(np.ascontiguousarray(cam).tobytes()).hexdigest()[:16])
        except Exception as exc:
            cams = [f"{type(exc).__name__}: {exc}"]
        rows[key] = {"probs": [list((r.probabilities or {}).values()) for r in results],
                     "labels": [r.label if r.ok else r.error for r in results], "gradcam": cams}
        s.close()
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"{len(rows) - 1} artifacts x {len(images)} images -> {out}")


def compare(files: list[Path]) -> int:
    docs = [json.loads(f.read_text()) for f in files]
    ref, bad = docs[0], 0
    for f, doc in zip(files[1:], docs[1:]):
        keys = sorted((set(ref) | set(doc)) - {"_revision"})
        for k in keys:
            if k == "_revision":
                continue
            a, b = ref.get(k), doc.get(k)
            if a == b:
                continue
            bad += 1
            if a is None or b is None or "error" in a or "error" in b:
                print(f"{f.name}: {k}: {a and a.get('error')} vs {b and b.get('error')}")
            else:
                d = float(np.abs(np.asarray(a["probs"]) - np.asarray(b["probs"])).max())
                print(f"{f.name}: {k}: max |dprob| {d:.3g}, labels equal {a['labels'] == b['labels']}, "
                      f"gradcam equal {a['gradcam'] == b['gradcam']}")
        print(f"{f.name} vs {files[0].name}: {len(keys)} artifacts, {bad} differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("root", type=Path)
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--per-class", type=int, default=24)
    e = sub.add_parser("export")
    e.add_argument("root", type=Path)
    e.add_argument("tag")
    p = sub.add_parser("predict")
    p.add_argument("root", type=Path)
    p.add_argument("tag")
    p.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("files", type=Path, nargs="+")
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.root, a.image_size, a.per_class)
    elif a.cmd == "export":
        export(a.root, a.tag)
    elif a.cmd == "predict":
        predict(a.root, a.tag, a.out)
    else:
        return compare(a.files)
    return 0


if __name__ == "__main__":
    sys.exit(main())
