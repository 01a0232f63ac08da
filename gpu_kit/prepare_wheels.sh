#!/usr/bin/env bash
# Wheels the bare GPU machine lacks (it has PyTorch, CuPy, cuda-bindings, NumPy, OpenCV, onnx, onnxruntime,
# pytest, hypothesis, tifffile; Python 3.12, x86-64), downloaded here into .whl/ (git-ignored), checked
# against the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
common=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
python3 -m pip download -q "${common[@]}" "simplejpeg==1.9.0"   # strict JPEG decoding (cxr_edge.decode)
python3 -m pip download -q "${common[@]}" "pebble==5.2.3"        # decode worker processes
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
ls -la .whl
echo "total $((total / 1024)) KiB of the 65536 KiB a call may carry"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then echo "over the carry limit" >&2; exit 1; fi
