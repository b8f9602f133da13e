#!/usr/bin/env bash
# ScratchLM stage 4 GPU script: correctness FIRST, then benchmarks, all within ~12 minutes of device time.
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
#                                         5. ddp.py plan --check, bench --parallel,   <= 300 (machines with >= 2 GPUs;
#                                            FSDP vs FSDP2 and TP vs DTensor TP over NCCL;
#                                            NCCL needs one GPU per rank, so a 1-GPU machine skips it)
#                                         6. bf16 MFU of a training step, one GPU     <= 120
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
    # ours vs torch's engine over NCCL: FSDP vs FSDP2 (bf16 compute) and TP vs DTensor TP, side by side
    timeout 90 "$PY" ddp.py bench --nproc 2 --backend nccl --strategies local,fsdp,torch-fsdp,torch-ddp \
        --compute-dtype bf16 --rounds 5 --steps 2 || echo "bench fsdp/torch-fsdp exit code $?"
    timeout 90 "$PY" ddp.py bench --nproc 2 --backend nccl --strategies local,tp,tp-dtensor --rounds 5 --steps 2 \
        || echo "bench tp/tp-dtensor exit code $?"
else
    echo "skipped: $NGPU GPU(s); multi-rank NCCL checks need >= 2"
fi

echo; echo "== 6. bf16 MFU of one GPU: the owt preset's training step ($(date -u +%H:%M:%S))"
# model FLOPs utilization: model.flops_per_token (training, as train.py's log) x tokens/s over the card's dense bf16
# peak (train.peak_flops), eager and compiled, printed with torch.cuda.get_device_name. Without a GPU the same
# Python is a dry run on a tiny model, a check of the code:
#     awk '/<<.PY_MFU./{f=1;next} /^PY_MFU$/{f=0} f' .ci/gpu_check.sh | python -
timeout 120 "$PY" - <<'PY_MFU' || echo "mfu exit code $?"
import time

import torch

import model as M
import train as T

gpu = torch.cuda.is_available()
device = torch.device("cuda" if gpu else "cpu")
# the owt preset's model and batch, as `python train.py owt` builds them (134M parameters with its 32K vocab);
# without a GPU, a dry run of the same code on a tiny model (no peak, no MFU: a check of the script only)
tiny = {} if gpu else dict(d_model=64, num_layers=2, num_heads=4, vocab_size=512, context_length=32, batch_size=2)
cfg = T.TrainConfig(**{**T.PRESETS["owt"], **tiny})
B, L = cfg.batch_size, cfg.context_length
model = T.build_model(cfg, cfg.vocab_size, device)
optimizer = T.build_optimizer(model, cfg)
flops_per_token = M.flops_per_token(model.config, training=True)   # what train.py's MFU log uses
peak = T.peak_flops(device)
name = torch.cuda.get_device_name() if gpu else "CPU (dry run)"


def train_step(run_model, x, y):
    # train.train_step for one micro-batch: bf16 autocast forward and loss, backward, clipping, AdamW
    with T.autocast_context(device, "bfloat16"):
        loss = T.cross_entropy_fast(run_model(x), y)
    loss.backward()
    T.gradient_clipping(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(run_model, label, warmup=3, steps=10 if gpu else 2):
    x, y = (torch.randint(0, cfg.vocab_size, (B, L), device=device) for _ in range(2))
    for _ in range(warmup):   # allocator growth, cuBLAS heuristics, torch.compile's compile
        train_step(run_model, x, y)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run_model, x, y)
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    achieved = flops_per_token * B * L / seconds
    mfu = f"{100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s peak" if peak else "n/a (peak unknown)"
    memory = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else ""
    print(f"bf16 MFU {mfu} on {name}: {achieved / 1e12:.1f} TFLOP/s, {B * L / seconds:,.0f} tokens/s, "
          f"{1e3 * seconds:.0f} ms/step ({label}, AdamW {cfg.adamw_impl}; {M.num_params(model.config) / 1e6:.1f}M "
          f"params, d_model {cfg.d_model} x {cfg.num_layers} layers, batch {B} x {L}{memory})", flush=True)


measure(model, "eager")
if gpu:   # the owt preset trains compiled
    try:
        measure(torch.compile(model), "torch.compile, as the owt preset")
    except Exception as e:   # e.g. no working compiler on this machine: the eager line stands
        print(f"torch.compile step failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
PY_MFU

echo; echo "== done ($(date -u +%H:%M:%S)); correctness exit code $CHECK; log: $LOG"
exit $CHECK
