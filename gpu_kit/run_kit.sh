#!/usr/bin/env bash
# The GPU verification kit, in one go (about 2-4 minutes on an H100; well inside the 10 minutes a call has):
#   1. the GPU / driver / CUDA / CuPy stack,  2. the wheels brought along (.whl/),  3. tests/gpu with junit XML,
#   4. the preprocessing benchmark (CPU vs GPU) as JSON.  Everything lands in $OUT (default: gpu-kit-out/).
# On a machine without CUDA it runs too (dry mode): the GPU tests skip with their reason, the scripts work.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-kit-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
  date -u; uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi: not available (no NVIDIA driver here)"
  python3 - <<'PY'
import sys
print("python", sys.version.split()[0])
for m in ("numpy", "cv2", "cupy", "onnxruntime", "torch"):
    try:
        mod = __import__(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "missing:", type(exc).__name__)
try:
    import cupy as cp
    p = cp.cuda.runtime.getDeviceProperties(0)
    print("device", p["name"].decode(), "sm", f"{p['major']}.{p['minor']}", "driver", cp.cuda.runtime.driverGetVersion(),
          "runtime", cp.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("CUDA device: none (", type(exc).__name__, exc, ")")
PY
} > "$OUT/stack.txt" 2>&1
cat "$OUT/stack.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cxr-site .whl/*.whl \
    && export PYTHONPATH=/tmp/cxr-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -m pytest --noconftest -p no:cacheprovider tests/gpu -o addopts="" -rs -v --junitxml="$OUT/junit.xml" \
  2>&1 | tee "$OUT/pytest.txt"
rc=${PIPESTATUS[0]}
python3 gpu_kit/preprocess_bench.py --out "$OUT/preprocess.json" --budget "${CXR_KIT_BENCH_BUDGET:-2.0}" 2>&1 | tee "$OUT/preprocess.txt"
python3 - "$OUT" "$rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
out, rc = sys.argv[1], int(sys.argv[2])
s = ET.parse(f"{out}/junit.xml").getroot()
suite = s if s.tag == "testsuite" else s.find("testsuite")
summary = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
summary["pytest_exit"] = rc
summary["stack"] = open(f"{out}/stack.txt").read().splitlines()[:40]
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print("summary:", {k: v for k, v in summary.items() if k != "stack"})
PY
exit "$rc"
