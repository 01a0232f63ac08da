"""Preprocessing throughput, CPU (OpenCV) vs GPU (CuPy), on radiograph-sized images: the kit's benchmark.

    python gpu_kit/preprocess_bench.py --out results.json
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxr_edge.bench.preprocess_bench import measure_preprocessing
from cxr_edge.preprocess import PreprocessSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=2.0)
    a = ap.parse_args()
    results = {}
    for name, spec in (("224 gray (ResNet recipes)", PreprocessSpec(224, 224, "caffe")),
                       ("128 gray (small CNN)", PreprocessSpec(128, 128, "rescale"))):
        rows = measure_preprocessing([], spec, budget_s=a.budget)  # synthetic 2000 x 1600 radiograph-sized images
        results[name] = rows
        for r in rows:
            speed = f"{r['images_per_s']:.1f} img/s, {r['ms_per_megapixel']:.2f} ms/MP" if r["status"] == "ran" else r["status"]
            print(f"{name:28s} {r['path']:4s} {r['implementation'][:48]:48s} {speed}")
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
