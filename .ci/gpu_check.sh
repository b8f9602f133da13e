#!/usr/bin/env bash
# ScratchLM stage 4 GPU script: correctness FIRST, then benchmarks, all within ~9 minutes of device time.
#
# Run from the repository root on a machine with an NVIDIA GPU and a CUDA build of torch + triton:
#     bash .ci/gpu_check.sh   (not run by CI, which has no GPU; this is the one script for a GPU machine)
# Output is also written to $OUT/gpu_check.log when $OUT is set.
#
# Steps and time limits (seconds):       0. environment report                       (~5)
#                                         1. python kernels.py check (float64 refs)   <= 200
#                                         2. python kernels.py bench rmsnorm          <= 100
#                                         3. python kernels.py bench attention        <= 170 (stops new shapes at 120)
#                                         4. python kernels.py bench int8             <= 60  (stops new shapes at 40)
#                                         5. ddp.py plan --check and bench --parallel <= 120 (machines with >= 2 GPUs;
#                                            NCCL needs one GPU per rank, so a 1-GPU machine skips it)
# Step 1 also checks the int8 weight-only matmul kernel against float64 (decode, ragged and prefill shapes).
# Triton compiles are cached under $TRITON_CACHE_DIR (default ~/.triton/cache), so step 1 warms step 3.
set -uo pipefail
cd "$(dirname "$0")/.." 2>/dev/null || true
[ -f kernels.py ] || cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
LOG="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$LOG") 2>&1

PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    PY=.venv/bin/python
fi
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

echo "== 0. environment ($(date -u +%H:%M:%S) UTC)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader || true
if ! "$PY" -c "import torch, triton, sys; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "FATAL: $PY has no CUDA-enabled torch + triton; set PYTHON=/path/to/python"; exit 3
fi

echo; echo "== 1. correctness: python kernels.py check ($(date -u +%H:%M:%S))"
timeout 200 "$PY" kernels.py check
CHECK=$?
echo "check exit code: $CHECK"

echo; echo "== 2. bench RMSNorm ($(date -u +%H:%M:%S))"
timeout 100 "$PY" kernels.py bench rmsnorm --max-seconds 75 || echo "rmsnorm bench exit code $?"

echo; echo "== 3. bench attention ($(date -u +%H:%M:%S))"
timeout 170 "$PY" kernels.py bench attention --max-seconds 120 || echo "attention bench exit code $?"

echo; echo "== 4. bench int8 weight-only matmul ($(date -u +%H:%M:%S))"
timeout 60 "$PY" kernels.py bench int8 --max-seconds 40 || echo "int8 bench exit code $?"

echo; echo "== 5. parallelism on the GPUs: ddp.py plan --check, bench --parallel ($(date -u +%H:%M:%S))"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -ge 2 ]; then
    timeout 40 "$PY" ddp.py plan --d-model 64 --num-layers 2 --num-heads 4 --vocab-size 512 --context-length 64 \
        --tp 2 --check --backend nccl || echo "plan exit code $?"
    timeout 80 "$PY" -m torch.distributed.run --nproc_per_node=2 ddp.py bench --parallel --backend nccl \
        || echo "bench --parallel exit code $?"
else
    echo "skipped: $NGPU GPU(s); multi-rank NCCL checks need >= 2"
fi

echo; echo "== done ($(date -u +%H:%M:%S)); correctness exit code $CHECK; log: $LOG"
exit $CHECK
