#!/usr/bin/env bash
# The README's newcomer path, in the README's order, on synthetic data: every step must exit as documented and
# print no traceback. Run by tests/test_walkthrough.py in CI's slow step; by hand: bash tests/walkthrough.sh [DIR]
set -uo pipefail
W=${1:-$(mktemp -d)}
mkdir -p "$W"
fail=0
run() {  # run EXPECTED_EXIT CMD...: the command's exit code and its stderr are checked
  local want=$1; shift
  echo "+ $*"
  "$@" >"$W/out.txt" 2>"$W/err.txt"
  local rc=$?
  tail -n 5 "$W/out.txt"
  if [ "$rc" -ne "$want" ] || grep -q "Traceback" "$W/err.txt"; then
    echo "FAILED (exit $rc, expected $want): $*"; tail -n 20 "$W/err.txt"; fail=1
  fi
}
run 0 cxr-edge --version
# 1. the main job: synthetic data -> small CNN -> report -> gated artifacts and their bundles
run 0 cxr-edge demo --out "$W/demo" --per-class 60
B="$W/demo/artifacts/bundles/model.int8-cpu.onnx"
run 0 cxr-edge bundle "$B" --check
run 0 cxr-edge bundle "$B" --archive "$W/kiosk.cxrbundle.tar"
# 2. a site calibrates on its own labelled images (not the training images), enough of them for the rule
run 0 cxr-edge synth "$W/site" --per-class 120 --seed 7
run 0 cxr-edge calibrate "$B" "$W/site" --target-sensitivity 0.95
grep -q "images the model was trained on: none of the 240" "$B"/calibration/*/calibration.md || { echo "FAILED: no overlap line"; fail=1; }
run 2 cxr-edge calibrate "$B" "$W/site" --target-sensitivity 95
run 5 cxr-edge calibrate "$W/kiosk.cxrbundle.tar" "$W/site"
# 3. screening, streamed, from the archive a kiosk would be given
run 0 cxr-edge predict "$W/kiosk.cxrbundle.tar" "$W/site/COVID" --out "$W/pred" --explain --no-progress
[ -s "$W/pred/predictions.jsonl" ] || { echo "FAILED: no predictions.jsonl"; fail=1; }
# 4. the service a kiosk runs, from the bundle folder; a busy port is one line before anything starts
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cxr-edge serve "$B" --port "$PORT" >"$W/serve.log" 2>&1 &
SERVE=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.5; done
curl -sf -F "files=@$(ls "$W"/site/COVID/* | head -n 1)" "http://127.0.0.1:$PORT/v1/predict" >"$W/served.json" \
  || { echo "FAILED: the service did not answer"; fail=1; }
run 5 cxr-edge serve "$B" --port "$PORT"
kill "$SERVE"; wait "$SERVE" 2>/dev/null
grep -q "Traceback" "$W/serve.log" && { echo "FAILED: traceback in the service log"; fail=1; }
# 5. a piece missing from a copied bundle is named in one line
cp -r "$B" "$W/partial" && rm "$W/partial/model.head.npz"
run 6 cxr-edge predict "$W/partial" "$W/site/COVID"
grep -q "model.head.npz (the Grad-CAM head) missing" "$W/err.txt" || { echo "FAILED: missing piece not named"; fail=1; }
# 6. the ML engineer's benchmark, with the same precision words as export
run 0 cxr-edge bench "$W/demo/artifacts" --precision fp32,int8 --batch 1,8 --budget 0.3 --out "$W/bench"
exit $fail
