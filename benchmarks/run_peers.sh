#!/usr/bin/env bash
# Reproduce benchmarks/results/peers/: export the three recipes' models (trained by run_all.sh) with the
# current pipeline (preprocessing folded where exact, fully-INT8 CPU graphs: int8-cpu (U8S8, for ONNX Runtime)
# and int8-ov (S8 where the graph allows negatives, for OpenVINO; min-max, percentile and NNCF measured and
# the one closest to FP32 kept)), then time them against what a user would pick instead
# (OpenVINO + NNCF with the LATENCY and THROUGHPUT hints, LiteRT full-integer, ONNX Runtime quantize_static
# defaults) in 5 interleaved rounds on this machine.
#
#   bash benchmarks/run_peers.sh [MODELS_DIR] [WORK_DIR]
#
# Needs the train and peers extras (LiteRT converts from the Keras model). Ratios are only comparable
# within one run: the VMs here drift 2-3x between runs.
set -euo pipefail
MODELS=${1:-runs/bench}
WORK=${2:-runs/peers}
OUT=benchmarks/results/peers
BUDGET=${BUDGET:-10}
mkdir -p "$WORK" "$OUT"
for m in small_cnn resnet50_tl resnet152v2_tl; do
  [ -f "$WORK/$m/model.int8-ov.onnx" ] || cxr-edge export "$MODELS/$m/model.keras" --out "$WORK/$m" --precision fp32,int8-cpu,int8-ov
done
for m in small_cnn resnet50_tl resnet152v2_tl; do
  cxr-edge bench "$WORK/$m" --peers --batch 1,16 --budget "$BUDGET" --backends onnxruntime,openvino,keras \
    --precisions fp32,bf16,int8-cpu,int8-ov --out "$OUT/$m" --force
  cp "$WORK/$m/export_report.md" "$OUT/$m/export_report.md"
done
