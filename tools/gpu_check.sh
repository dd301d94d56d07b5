#!/usr/bin/env bash
# Everything a session with a lent CUDA machine should run, in one go (device time is scarce): the test
# suite (its CUDA tests run there), then every GPU benchmark, each bounded in time, with its log in $OUT.
#
#   bash tools/gpu_check.sh                        # on the CUDA machine; needs data/penn (bash getdata.sh)
#   DEV=cpu QUICK=1 OUT=/tmp/gpu_check bash tools/gpu_check.sh   # a rehearsal of the same commands on the CPU
#
# Uses the machine's own torch (no install). Figures then go into bench/RESULTS.md by hand or with the
# benchmarks' --write-results; each log names its command. Exit status: the number of steps that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
DEV=${DEV:-cuda}
QUICK=${QUICK:-0}
LIMIT=${LIMIT:-240}
mkdir -p "$OUT"
rm -rf "$OUT/main_run"  # the training run's folder: a fresh run each time (a kept one would ask for --resume)
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, print its end
    local name=$1 limit=$2
    shift 2
    echo "== $name ($limit s): $*"
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "   exit $status after $((SECONDS - started)) s"
    tail -n 6 "$OUT/$name.log" | sed 's/^/   | /'
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

python - >"$OUT/machine.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton absent")
PY
cat "$OUT/machine.txt"

if [ "$QUICK" = 1 ]; then  # tiny sizes: only that every command runs
    step tests "$LIMIT" python -m pytest -q -x -p no:cacheprovider tests/test_loop.py tests/test_relational_memory.py \
        tests/test_triton_kernels.py
    step loop "$LIMIT" python bench/bench_loop.py --device "$DEV" --cases lstm200 --batches 2 --rounds 1 \
        --precision fp32 bf16 --json "$OUT/loop.json"
    step compiled_steps "$LIMIT" python bench/bench_compiled_steps.py --device "$DEV" --cores gru-loop \
        --warmup 1 --repeats 1 --steps 5 --json "$OUT/compiled_steps.json"
    step rmc_lm "$LIMIT" python bench/bench_rmc_lm.py --device "$DEV" --compiled --batch-sizes 2 --bptt 5 \
        --vocab 100 --repeats 1 --warmup 1 --json "$OUT/rmc_lm.json"
    step main_py "$LIMIT" python main.py --data data/penn --batch_size 20 --dropouti 0.4 --dropouth 0.25 \
        --seed 141 --emsize 16 --nhid 16 --max-steps 3 --log-interval 1 --device "$DEV" --run-dir "$OUT/main_run"
    step forget_mult_bandwidth "$LIMIT" python bench/bench_forget_mult.py --device "$DEV" --bandwidth --batch-size 4 \
        --hidden 64 --lengths 64 --repeats 1 --warmup 1 --configs 256x4 256x1t4 --json "$OUT/forget_mult_bandwidth.json"
    step qrnn_grid "$LIMIT" python bench/bench_qrnn.py --device "$DEV" --grid --batches 8 --lengths 32 --repeats 1 \
        --warmup 1 --json "$OUT/qrnn_grid.json"
    step dnc "$LIMIT" python bench/bench_dnc.py --device "$DEV" --quick --dnc-cells 16 256 --sparse-cells 1024 \
        --steps 4 --no-rss --construction-cells 1024 --plot "$OUT/dnc.png" --json "$OUT/dnc.json"
else
    step tests 420 python -m pytest -q -m "not slow" -p no:cacheprovider
    step loop "$LIMIT" python bench/bench_loop.py --device "$DEV" --cases lstm200 lstm650 awd --batches 50 \
        --rounds 5 --precision fp32 bf16 --json "$OUT/loop.json"
    step compiled_steps "$LIMIT" python bench/bench_compiled_steps.py --device "$DEV" --batch-size 64 --steps 100 \
        --repeats 20 --json "$OUT/compiled_steps.json"
    step rmc_lm_forward "$LIMIT" python bench/bench_rmc_lm.py --device "$DEV" --compiled --forward-only \
        --batch-sizes 64 --warmup 3 --repeats 20 --json "$OUT/rmc_lm_forward.json"
    step rmc_lm "$LIMIT" python bench/bench_rmc_lm.py --device "$DEV" --compiled --batch-sizes 8 64 --warmup 3 \
        --repeats 20 --json "$OUT/rmc_lm.json"
    # the README's PTB command: ms/batch against the 2017 code's 15.2 on an H200 (target at most 13)
    step main_py "$LIMIT" python main.py --data data/penn --batch_size 20 --dropouti 0.4 --dropouth 0.25 \
        --seed 141 --epochs 1 --max-steps 600 --log-interval 100 --device "$DEV" --run-dir "$OUT/main_run"
    step forget_mult "$LIMIT" python bench/bench_forget_mult.py --device "$DEV" --json "$OUT/forget_mult.json"
    # ForgetMult at B 256, H 1024, T 2048 against the copy rate (target 80 %), the Triton launch configs swept
    step forget_mult_bandwidth 300 python bench/bench_forget_mult.py --device "$DEV" --bandwidth \
        --configs 256x4 1024x4 256x1t4 512x2t4 256x2t8 1024x4t4 --json "$OUT/forget_mult_bandwidth.json"
    step qrnn "$LIMIT" python bench/bench_qrnn.py --device "$DEV" --json "$OUT/qrnn.json"
    # the QRNN paper's inference grid (320 units, batch 8-256, T 32-512) against nn.LSTM, eager and fused
    step qrnn_grid "$LIMIT" python bench/bench_qrnn.py --device "$DEV" --grid --json "$OUT/qrnn_grid.json"
    step dnc "$LIMIT" python bench/bench_dnc.py --device "$DEV" --quick --json "$OUT/dnc.json"
fi
echo "failed steps: $failed (logs in $OUT)"
exit "$failed"
