#!/usr/bin/env bash
# poolbench's CUDA code paths in one command, under 10 minutes on one GPU; prints one summary.
#
#   scripts/gpu_check.sh                      on a machine with a GPU (poolbench installed, or PYTHONPATH set)
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh the same steps on CPU: checks this script, not the GPU paths
#
# Steps (each logged to $GPU_CHECK_OUT/<step>.log, default a new temporary folder):
#   cuda-tests     the tests that skip without CUDA (operators on CUDA against CPU), with the reasons of any skip
#   bench-fp32     poolbench bench --models resnet50 --pooling avg,gem,dgmp (model mode: inference + train step)
#   bench-ops-fp32 poolbench bench --ops avg,gem,dgmp at ResNet-50's final map (operator mode)
#   bench-ops-bf16 the same in bf16 (model mode times fp32 models only; bf16 training is trainer.amp=bf16)
#   train-<amp>    one short `poolbench train` with pooling=dgmp per AMP mode: none, bf16, fp16
#                  (channels_last and non_blocking transfers are on by default on CUDA)
#   sweep          a 2-job local sweep (one GPU per job when several are visible)
# Exit status: 0 when every step passed, 1 otherwise, 2 when asked for CUDA and there is none.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t poolbench-gpu-check.XXXXXX)}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
# On CPU the check only exercises this script: small inputs and bench's --quick.
if [ "$DEVICE" = cpu ]; then INPUT=64; QUICK=(--quick); else INPUT=224; QUICK=(); fi

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (GPU_CHECK_DEVICE=cpu runs the same steps on CPU)" >&2
    exit 2
fi

SUMMARY=()
FAILED=0
step() {  # step NAME COMMAND...: run it, log it, time it
    local name=$1 start status
    shift
    start=$(date +%s)
    echo "gpu_check: $name ..." >&2
    "$@" >"$OUT/$name.log" 2>&1
    status=$?
    local line
    line=$(printf '%-15s %-6s %4d s  %s' "$name" "$([ $status -eq 0 ] && echo ok || echo FAILED)" \
        "$(($(date +%s) - start))" "$OUT/$name.log")
    [ $status -eq 0 ] || FAILED=1
    SUMMARY+=("$line")
}

TINY=(dataset=digits trainer.epochs=1 trainer.steps_per_epoch=20 trainer.latency.repeats=5 "device=$DEVICE")

step cuda-tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider -k cuda_matches_cpu \
    tests/pooling/test_basic.py tests/pooling/test_local.py tests/pooling/test_structured.py
step bench-fp32 "$PYTHON" -m poolbench bench --models resnet50 --pooling avg,gem,dgmp --input-size "$INPUT" \
    --device "$DEVICE" "${QUICK[@]}" --out "$OUT/bench"
step bench-ops-fp32 "$PYTHON" -m poolbench bench --global --ops avg,gem,dgmp --shape 32,2048,7,7 \
    --device "$DEVICE" --dtype fp32 "${QUICK[@]}" --out "$OUT/bench"
step bench-ops-bf16 "$PYTHON" -m poolbench bench --global --ops avg,gem,dgmp --shape 32,2048,7,7 \
    --device "$DEVICE" --dtype bf16 "${QUICK[@]}" --out "$OUT/bench"
for amp in none bf16 fp16; do
    step "train-$amp" "$PYTHON" -m poolbench train --quiet pooling=dgmp "trainer.amp=$amp" "${TINY[@]}" \
        "results_dir=$OUT/runs"
done
step sweep "$PYTHON" -m poolbench sweep pooling=avg,dgmp seed=1 "${TINY[@]}" "results_dir=$OUT/runs" --jobs 2

echo
echo "poolbench gpu_check on $DEVICE ($("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'no CUDA', 'torch', torch.__version__)"))"
printf '%s\n' "${SUMMARY[@]}"
if [ -d "$OUT/runs" ]; then
    "$PYTHON" - "$OUT/runs" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*/result.json")):
    r = json.loads(path.read_text())
    print(f"  run {r['run_id']}: {r['status']} amp={r.get('cfg.trainer.amp')} acc@1={r.get('acc@1')} "
          f"infer {r.get('latency.infer_image_ms')} ms/image on {r.get('env.device_name')}")
EOF
fi
exit $FAILED
