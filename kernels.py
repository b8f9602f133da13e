"""
kernels.py -- Stage 4 of ScratchLM: GPU kernels in Triton (fused RMSNorm, FlashAttention-2, int8 weight-only
matmul for cheaper decoding).

The problem
-----------
A GPU does arithmetic far faster than it can move data: an H100 does ~990 bf16 TFLOP/s on its tensor cores but
reads its HBM at ~3.35 TB/s, i.e. it must do ~300 FLOPs per byte it loads to be compute-bound. Most of a
transformer that is not a matmul (normalization, softmax, masking) does ~1 FLOP per byte, so its speed is set by
how many times it reads and writes memory. Attention is worse: written naively it stores two (T, T) matrices per
head, O(T^2) memory that limits the context length long before the FLOPs do.

The idea
--------
ORGANIZE THE COMPUTATION SO DATA IS MOVED AS FEW TIMES AS POSSIBLE: load a tile into fast on-chip memory
(registers / shared memory, ~100x faster than HBM), do all the work on it there, write the result once.
Two kernels make that concrete (the Menus add a third):

1. Fused RMSNorm.  Eager PyTorch runs `x.pow(2).mean(-1)`, `rsqrt`, `x * r`, `* w` as separate kernels, each
   reading and writing a full (rows, d) tensor: ~5 round trips to HBM. One Triton program per row loads the row
   once, does all of it in registers and writes y once (forward = 1 read + 1 write, the minimum). The backward is
   fused the same way; the gain gradient (a sum over all rows) is accumulated per program and reduced at the end.

2. FlashAttention-2.  Naive attention materializes S = QK^T/sqrt(d) and P = softmax(S), both (T, T) per head:
   at T = 16384 that is 1 GiB per head in fp32, written and read back several times. FA2 tiles Q into blocks that
   stay on chip, streams K/V blocks past them, and uses the ONLINE SOFTMAX (running max m, running sum l, rescale
   the partial output whenever the max grows) so P never exists in HBM. It saves only O and the log-sum-exp
   L = m + log(l) (one float per query), and the backward RECOMPUTES P = exp(S - L) tile by tile instead of
   storing it: a few extra FLOPs (cheap) to avoid O(T^2) bytes (expensive). Memory becomes O(T).

3. Menu: int8 weight-only matmul for cheaper decoding (W ~ q * s, one byte per weight), and an ahead-of-time
   compile of every kernel for a GPU architecture on a machine without one.

What it costs: two extra code paths to keep correct (a from-scratch PyTorch version of each kernel comes FIRST in
this file, and the tests prove the Triton version agrees with it and with a float64 reference), Triton as a
dependency, and a Python-level tiled loop (FlashAttention2PyTorch) that is slow -- it exists to make the algorithm
readable and testable; the Triton kernel is the fast path.

Sources
-------
- Dao, Fu, Ermon, Rudra, Re, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness"
  (2022), arXiv:2205.14135: tiling + online softmax + recomputation in backward.
- Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023),
  arXiv:2307.08691: the loop order used here (a program owns a query tile), fewer non-matmul FLOPs, L = m + log l.
- Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018), arXiv:1805.02867: the running-max
  softmax that lets the sum be rescaled as the max grows.
- Tillet, Kung, Cox, "Triton: An Intermediate Language and Compiler for Tiled Neural Network Computations" (MAPL
  2019): block-level programs; Triton's tutorials "Layer Normalization" and "Fused Attention" for launch shapes.
- Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019), arXiv:1910.07467: RMSNorm itself.
- Williams, Waterman, Patterson, "Roofline: An Insightful Visual Performance Model" (CACM 2009): FLOPs per byte.
- Stanford CS336 (Spring 2025), assignment 2: FlashAttention-2 in PyTorch and Triton, the benchmark grid.
- Dettmers et al., LLM.int8() (2022), arXiv:2208.07339; Frantar et al., GPTQ (2022), arXiv:2210.17323; Lin
  et al., AWQ (2023), arXiv:2306.00978: weight quantization (the int8 Menu).

Reading order
-------------
  The core: RMSNorm (readable PyTorch with its hand-derived backward -> Triton kernels -> autograd.Function),
  attention (naive reference -> FlashAttention2PyTorch, tiled with the online softmax -> Triton kernels ->
  FlashAttention2Triton), then how both plug into model.py (attention backends, use_kernels). Then the Menus, the
  appendices and the command line: `python kernels.py bench | check | compile | train | quantize` (see --help).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import os
import subprocess
import sys
import tempfile
import time
import types
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer import OneLineParser, atomic_open, machine_label

# Triton setup. Without a GPU, TRITON_INTERPRET=1 runs every kernel in Triton's CPU interpreter (slowly, same tile
# semantics; see the plumbing appendix). It is read when each @triton.jit decorator runs, so it is set here first,
# and only without CUDA, where the interpreter is the only way a kernel can run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # e.g. macOS / Windows, where requirements.txt does not install triton
    triton = None
    tl = None
    HAVE_TRITON = False

import model as M  # noqa: E402  (pipeline order: tokenizer -> model -> train -> kernels)
import train as T  # noqa: E402


# the dtypes the kernels take: fp32 and the 16-bit formats of mixed precision (bf16: fp32's range, 8 mantissa bits)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---- Part 1: RMSNorm ----
#
# RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g, over the last dim (size d), computed in fp32 and cast back to the
# input dtype (the same math as model.RMSNorm). Write r = (mean(x^2) + eps)^(-1/2) ("rstd") and x_hat = x * r:
#
#   y_k = g_k * x_k * r
#   dL/dg_k = sum over rows of dy_k * x_hat_k
#   dL/dx_k = r * (dy_k g_k - x_hat_k * mean_j(dy_j g_j x_hat_j))
#
# (from dr/dx_k = -r^3 x_k / d: the second term is the gradient flowing through the normalizer.)
# Only rstd (one float per row, d times smaller than x) is saved for backward.
#
# Back of the envelope, 2048 rows x 4096 bf16 (16 MiB per tensor) on an H100 (3.35 TB/s): the fused forward moves
# x in and y out, 33.6 MB, so ~10 us is the floor. Eager PyTorch runs ~5 kernels that each read and write a
# (rows, d) tensor (square, mean, rsqrt-multiply, gain-multiply, cast), some in fp32: several times the bytes and
# several times the time. The arithmetic (~4 FLOPs per element) never matters: this kernel is all memory.


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Compute in at least fp32 (bf16/fp16 -> fp32; fp64 stays fp64 so float64 references and gradcheck work)."""
    # a bf16 sum of squares over 4096 elements would keep ~3 significant digits; in fp32 the mean is accurate
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Readable from-scratch RMSNorm (the 'eager' peer in the benchmark; torch.compile(rmsnorm_torch) is the
    other). x: (..., d), weight: (d,) -> (..., d) in x.dtype."""
    x32 = _upcast(x)
    rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (x32 * rstd * _upcast(weight)).to(x.dtype)


class RMSNormPyTorch(torch.autograd.Function):
    """RMSNorm with the hand-derived backward above, in plain PyTorch. It is the readable statement of exactly
    what the Triton kernels compute; the tests check it against finite differences (gradcheck)."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        x32 = _upcast(x)
        rstd = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
        # keep x (not x_hat): backward recomputes x_hat = x * rstd, one multiply instead of a second (..., d) tensor
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd * _upcast(weight)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        x_hat = _upcast(x) * rstd                                  # (..., d)
        g_dy = _upcast(dy) * _upcast(weight)                       # (..., d): the gradient w.r.t. x_hat
        # dx = r (g dy - x_hat mean(g dy x_hat)): the second term is the normalizer's share (see the math above)
        dx = rstd * (g_dy - x_hat * (g_dy * x_hat).mean(dim=-1, keepdim=True))
        # the gain is shared by every row: its gradient sums over all leading dimensions -> (d,)
        dweight = (_upcast(dy) * x_hat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dweight.to(weight.dtype), None


# One row must fit in one program's registers (single pass = one read of x). 65536 fp32 values over 16 warps
# (512 threads) is 128 registers' worth per thread -- the limit before spilling makes a two-pass kernel better.
RMSNORM_MAX_HIDDEN = 65536

if HAVE_TRITON:

    @triton.jit
    def _rmsnorm_fwd_kernel(X, W, Y, RSTD, stride_x_row, stride_y_row, n_cols, eps, BLOCK_N: tl.constexpr):
        # X, Y: (rows, n_cols) with row strides; W: (n_cols,); RSTD: (rows,) fp32, written for backward
        # One program = one row. The whole row lives in registers: x is read once, y written once.
        row = tl.program_id(0).to(tl.int64)                        # int64: rows * stride may exceed 2^31
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols                                       # BLOCK_N is n_cols rounded up to a power of 2
        # the row (BLOCK_N,) from HBM, in fp32 whatever the storage dtype; masked lanes read 0
        x = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N,) the gain, shared by all rows
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)  # padded zeros do not change the sum
        y = x * rstd * w
        tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)  # rounded once, on store
        tl.store(RSTD + row, rstd)                                 # 4 bytes per row, for backward

    @triton.jit
    def _rmsnorm_bwd_kernel(X, W, DY, DX, RSTD, DW_PARTIAL, stride_x_row, stride_dy_row, stride_dx_row,
                            n_rows, n_cols, BLOCK_N: tl.constexpr):
        # Program p handles rows p, p + P, p + 2P, ... (P = number of programs). dx is per row; dgain is a sum over
        # ALL rows, so each program accumulates its own partial sum in fp32 registers and writes one row of
        # DW_PARTIAL (P, n_cols); the host reduces those P rows. No atomics, deterministic.
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)   # loaded once per program, not per row
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)             # this program's share of sum_rows dy * x_hat
        pid64 = pid.to(tl.int64)                                   # int64 row offsets (rows * stride > 2^31)
        for i in range(0, tl.cdiv(n_rows - pid, n_programs)):
            row64 = pid64 + i * n_programs
            x = tl.load(X + row64 * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64)                           # saved by forward: no second pass over x
            x_hat = x * rstd
            g_dy = dy * w
            mean_gdy_xhat = tl.sum(g_dy * x_hat, axis=0) / n_cols  # the one reduction over the row
            dx = rstd * (g_dy - x_hat * mean_gdy_xhat)              # the same formula as RMSNormPyTorch
            tl.store(DX + row64 * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat
        tl.store(DW_PARTIAL + pid64 * n_cols + cols, dw_acc, mask=mask)


class RMSNormTriton(torch.autograd.Function):
    """Fused RMSNorm: apply(x, weight, eps) for x of any leading shape (..., d), fp32/bf16/fp16.
    Non-contiguous x is copied to contiguous (documented; the kernel wants unit stride along d)."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        _check_rmsnorm_inputs(x, weight)
        # the kernel sees a 2-D (rows, d) matrix: every leading dimension (batch, time, ...) is just more rows
        x2, w = _rows(x), weight.contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_n, num_warps = _rmsnorm_launch_params(n_cols)
        if n_rows > 0:                                             # grid: one program per row
            _rmsnorm_fwd_kernel[(n_rows,)](x2, w, y, rstd, x2.stride(0), y.stride(0), n_cols, eps,
                                           BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(x2, w, rstd)            # x (for x_hat), the gain, one float per row: not y, not x_hat
        ctx.x_shape, ctx.weight_dtype = x.shape, weight.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        # one fused pass: each program reads x, dy (and rstd) once per row and writes dx once
        x2, w, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty_like(x2)                                  # (rows, d) in the input dtype
        n_programs = _rmsnorm_num_programs(n_rows, x2.device)
        # (P, d) fp32: row p = program p's partial gain gradient (zeros: a program may get no rows)
        dw_partial = torch.zeros((n_programs, n_cols), dtype=torch.float32, device=x2.device)
        block_n, num_warps = _rmsnorm_launch_params(n_cols)
        if n_rows > 0:
            _rmsnorm_bwd_kernel[(n_programs,)](x2, w, dy2, dx, rstd, dw_partial, x2.stride(0), dy2.stride(0),
                                               dx.stride(0), n_rows, n_cols, BLOCK_N=block_n, num_warps=num_warps)
        dweight = dw_partial.sum(0).to(ctx.weight_dtype)           # reduce the P per-program partial sums
        return dx.view(ctx.x_shape), dweight, None


def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Fused RMSNorm with autograd: (..., d) -> (..., d) in x.dtype (same math as rmsnorm_torch)."""
    return RMSNormTriton.apply(x, weight, eps)


# ---- Part 2: attention ----
#
# Single-head attention on (batch, seq, d) tensors (a multi-head model folds heads into batch):
#   S = Q K^T / sqrt(d)                 (batch, Nq, Nk)
#   P = softmax(S) row-wise (causal: S_ij = -inf for j > i)
#   O = P V                             (batch, Nq, d)
#   L = logsumexp(S) row-wise           (batch, Nq)   -- what FlashAttention saves instead of P
#
# Back of the envelope, one head at T = 16384, d = 64: QK^T and PV are 2 * 2 T^2 d = 69 GFLOPs (half with the causal
# mask), a few tens of microseconds of tensor-core time. Naive attention also writes and reads S and P: 2 x 1 GiB
# in fp32, ~0.6 ms of HBM traffic per pass, and backward reads them again. FA2 reads Q, K, V and writes O: 8 MiB.


def attention_reference(Q, K, V, is_causal: bool = False):
    """Naive attention: materializes S and P (O(N^2) memory). The 'naive' peer in the benchmark and, in float64,
    the reference in the tests. Returns (O, L)."""
    # the 1/sqrt(d) keeps the scores' variance ~1 for unit-variance q, k: softmax does not saturate
    scale = 1.0 / math.sqrt(Q.shape[-1])
    S = torch.einsum("bqd,bkd->bqk", Q, K) * scale               # (B, Nq, Nk): the O(N^2) tensor FA2 never stores
    if is_causal:
        n_q, n_k = Q.shape[-2], K.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=Q.device).tril()
        S = S.masked_fill(~keep, float("-inf"))
    L = torch.logsumexp(S, dim=-1)                                 # (B, Nq)
    P = torch.exp(S - L.unsqueeze(-1))                             # softmax(S) = exp(S - logsumexp(S))
    return torch.einsum("bqk,bkd->bqd", P, V), L


# The online softmax (Milakov & Gimelshein). softmax(s)_j = exp(s_j - m) / l with m = max_j s_j and
# l = sum_j exp(s_j - m). Seen in tiles, keep a running max m and running sum l: when a tile raises the max from
# m to m', every exp computed so far was relative to the old max and is rescaled by alpha = exp(m - m'):
#     m' = max(m, rowmax(S_j)),  l' = alpha l + rowsum(exp(S_j - m')),  acc' = alpha acc + exp(S_j - m') V_j
# After the last tile, O = acc / l exactly (not an approximation) and L = m + log(l) = logsumexp of the row.
# Subtracting the running max keeps every exponent <= 0: no overflow in fp32 whatever the scores.

def _future(q0, q1, k0, k1, device):
    """(bq, bk) bool: True where key j (of k0..k1) lies after query i (of q0..q1), the entries causal masks out."""
    return torch.arange(k0, k1, device=device)[None, :] > torch.arange(q0, q1, device=device)[:, None]


class FlashAttention2PyTorch(torch.autograd.Function):
    """FlashAttention-2 in plain PyTorch: the algorithm, readable. apply(Q, K, V, is_causal, q_tile, k_tile) on
    (batch, seq, d). Saves O, L (batch, Nq), Q, K, V; backward recomputes P from L tile by tile."""

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False, q_tile=64, k_tile=64):
        _check_attention_inputs("FlashAttention2PyTorch", Q, K, V, is_causal)
        if q_tile < 1 or k_tile < 1:   # (any tile size works here, ragged ones included: the tests use 3 x 2)
            raise ValueError(f"FlashAttention2PyTorch: tile sizes must be >= 1, got {q_tile}, {k_tile}")
        B, n_q, d = Q.shape
        n_k = K.shape[1]
        scale = 1.0 / math.sqrt(d)
        acc_dtype = torch.float64 if Q.dtype == torch.float64 else torch.float32  # on-chip accumulators: fp32
        O = torch.empty_like(Q)
        L = torch.empty(B, n_q, dtype=acc_dtype, device=Q.device)  # fp32 (fp64 for fp64 inputs: gradcheck)
        # The outer loop over query tiles is what a GPU runs in parallel (one program per tile); the inner loop
        # over key tiles is what one program does in sequence, with m, l, acc in registers.
        for q0 in range(0, n_q, q_tile):
            q1 = min(q0 + q_tile, n_q)
            Qi = Q[:, q0:q1].to(acc_dtype)                         # (B, bq, d)
            m = torch.full((B, q1 - q0), float("-inf"), dtype=acc_dtype, device=Q.device)  # running max
            l = torch.zeros((B, q1 - q0), dtype=acc_dtype, device=Q.device)               # running sum
            acc = torch.zeros((B, q1 - q0, d), dtype=acc_dtype, device=Q.device)          # unnormalized O
            k_end = min(n_k, q1) if is_causal else n_k             # causal: tiles right of the diagonal skipped
            for k0 in range(0, k_end, k_tile):
                k1 = min(k0 + k_tile, n_k)
                # on a GPU: K_j, V_j loaded from HBM into on-chip memory, once per query tile
                Kj, Vj = K[:, k0:k1].to(acc_dtype), V[:, k0:k1].to(acc_dtype)
                S = Qi @ Kj.transpose(1, 2) * scale                # (B, bq, bk)
                if is_causal and k1 - 1 > q0:                      # only tiles touching the diagonal need a mask
                    S = S.masked_fill(_future(q0, q1, k0, k1, Q.device), float("-inf"))
                # Online softmax: new max, rescale what we had by exp(m_old - m_new), add this tile.
                m_new = torch.maximum(m, S.amax(dim=-1))
                P = torch.exp(S - m_new.unsqueeze(-1))             # (B, bq, bk)
                alpha = torch.exp(m - m_new)                       # 0 on the first tile (m = -inf)
                l = alpha * l + P.sum(dim=-1)
                # P rounded to the input dtype before P V, as the tensor-core kernel does (bf16 in, fp32 accumulate)
                acc = alpha.unsqueeze(-1) * acc + P.to(V.dtype).to(acc_dtype) @ Vj
                m = m_new
            O[:, q0:q1] = (acc / l.unsqueeze(-1)).to(Q.dtype)   # normalize once, at the end
            L[:, q0:q1] = m + torch.log(l)                       # (B, bq): all backward needs to rebuild P
        ctx.save_for_backward(Q, K, V, O, L)
        ctx.is_causal, ctx.q_tile, ctx.k_tile = is_causal, q_tile, k_tile
        return O

    @staticmethod
    def backward(ctx, dO):
        Q, K, V, O, L = ctx.saved_tensors
        dQ, dK, dV = _flash_backward_pytorch(Q, K, V, O, L, dO, ctx.is_causal, ctx.q_tile, ctx.k_tile)
        return dQ, dK, dV, None, None, None        # no gradients for is_causal and the tile sizes


def _flash_backward_pytorch(Q, K, V, O, L, dO, is_causal, q_tile, k_tile):
    """FA2 backward, tiled: D = rowsum(O * dO); for each (query tile, key tile): P = exp(S - L), dV += P^T dO,
    dP = dO V^T, dS = P * (dP - D), dQ += dS K / sqrt(d), dK += dS^T Q / sqrt(d)."""
    # Softmax backward: with P = softmax(S) per row, dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik). The row sum is
    # sum_k P_ik (dO_i . V_k) = dO_i . O_i, so D = rowsum(O * dO) gives it from two (N, d) tensors, no (N, N) one.
    B, n_q, d = Q.shape
    n_k = K.shape[1]
    scale = 1.0 / math.sqrt(d)
    acc_dtype = torch.float64 if Q.dtype == torch.float64 else torch.float32
    D = (O.to(acc_dtype) * dO.to(acc_dtype)).sum(-1)              # (B, Nq): equals rowsum(P * dP)
    dQ = torch.zeros(B, n_q, d, dtype=acc_dtype, device=Q.device)
    dK = torch.zeros(B, n_k, d, dtype=acc_dtype, device=Q.device)
    dV = torch.zeros(B, n_k, d, dtype=acc_dtype, device=Q.device)
    # one loop nest for readability; the Triton version splits it into a dK/dV kernel (parallel over key tiles)
    # and a dQ kernel (parallel over query tiles), each accumulating its own output in registers
    for q0 in range(0, n_q, q_tile):
        q1 = min(q0 + q_tile, n_q)
        Qi, dOi = Q[:, q0:q1].to(acc_dtype), dO[:, q0:q1].to(acc_dtype)
        Li, Di = L[:, q0:q1].to(acc_dtype).unsqueeze(-1), D[:, q0:q1].unsqueeze(-1)
        k_end = min(n_k, q1) if is_causal else n_k
        for k0 in range(0, k_end, k_tile):
            k1 = min(k0 + k_tile, n_k)
            Kj, Vj = K[:, k0:k1].to(acc_dtype), V[:, k0:k1].to(acc_dtype)
            S = Qi @ Kj.transpose(1, 2) * scale                    # (B, bq, bk), recomputed
            P = torch.exp(S - Li)                                  # softmax probabilities, from L alone
            if is_causal and k1 - 1 > q0:
                P = P.masked_fill(_future(q0, q1, k0, k1, Q.device), 0.0)
            dV[:, k0:k1] += P.transpose(1, 2) @ dOi               # O = P V      -> dV = P^T dO   (bk, d)
            dP = dOi @ Vj.transpose(1, 2)                          # (B, bq, bk)   -> dP = dO V^T
            dS = P * (dP - Di)                                     # softmax backward (see above)
            dQ[:, q0:q1] += dS @ Kj * scale                        # S = Q K^T/sqrt(d) -> dQ = dS K / sqrt(d)
            dK[:, k0:k1] += dS.transpose(1, 2) @ Qi * scale        #                   -> dK = dS^T Q / sqrt(d)
    return dQ.to(Q.dtype), dK.to(K.dtype), dV.to(V.dtype)


# ---- FlashAttention-2 in Triton ----
#
# Forward: grid = (ceil(Nq / BLOCK_Q), batch). A program owns one query tile: Q_i stays in registers, K_j/V_j tiles
# stream past it, m_i / l_i / acc live in fp32 registers, and only O_i and L_i are written. Causal: the program
# stops at the tile holding its last query (half the work at long seq), and splits the loop into "fully visible"
# tiles (no mask arithmetic at all) and the tiles that touch the diagonal or the ragged end of K (masked).
#
# Backward: dQ needs a sum over key tiles, dK/dV a sum over query tiles. FA2 (the paper) parallelizes over key
# tiles and adds each program's dQ contribution with fp32 atomics. We instead run TWO kernels: one over key tiles
# accumulating dK, dV in registers, one over query tiles accumulating dQ in registers. Cost: S and P are
# recomputed twice (7 tile matmuls instead of 5, ~40% more backward FLOPs). Gain: no atomics (deterministic
# results, bitwise reproducible runs, no fp32 dQ scratch buffer of size (B, N, d) to zero and convert, no
# contention on dQ rows in the causal triangle), and each kernel has one accumulator set, so fewer registers and
# larger tiles. A tiny preprocess kernel computes D = rowsum(O * dO) first.

# head dims the Triton kernel takes: tl.dot needs >= 16; above 128 a Q tile and the fp32 accumulator no longer
# fit in registers at useful tile sizes (FA2 itself supports up to 256 with smaller tiles)
ATTN_MIN_HEAD_DIM, ATTN_MAX_HEAD_DIM = 16, 128
# exp(x) = 2^(x * log2(e)): the kernels keep scores in base-2 units so each exponential is one exp2 instruction
LOG2_E = 1.4426950408889634

if HAVE_TRITON:
    _LOG2_E = tl.constexpr(LOG2_E)  # a @triton.jit function may only read module globals that are constexpr

    # Kernel argument conventions: capitalized arguments are pointers to tensors (Q, K, V, O, L, ...); stride_xb /
    # stride_xt are a tensor's strides over batch and sequence (the head dim is contiguous, stride 1); constexpr
    # arguments are compile-time constants: each combination is a separate compiled kernel.
    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # acc + a @ b with fp32 accumulation. UPCAST is set only under the interpreter, which multiplies bf16
        # operands as raw uint16 bits (bug); bf16 -> fp32 is exact, so this reproduces the tensor-core result.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_q, offs_d, offs_k0,
                        k_lo, k_hi, n_keys, qk_scale,
                        D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                        MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # Streams key/value tiles [k_lo, k_hi) past one query tile, updating the online-softmax state.
        # MASKED=False is the fast path for tiles fully visible to every query and fully inside K.
        for k_start in range(k_lo, k_hi, BLOCK_K):
            offs_k = k_start + offs_k0                                             # (BK,)
            if MASKED:
                kv_mask = (offs_k[:, None] < n_keys) & (offs_d[None, :] < D)
            else:
                kv_mask = offs_d[None, :] < D                                      # all keys in range
            # K_j, V_j (BK, D_PAD) from HBM: the only reads in the loop; each is used by all BQ queries at once
            k = tl.load(k_base + offs_k[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _mma(q, tl.trans(k), tl.zeros([BLOCK_Q, BLOCK_K], tl.float32), UPCAST, PRECISION)
            s = s * qk_scale                                                       # (BQ, BK), log2 units
            if MASKED:
                visible = offs_k[None, :] < n_keys
                if IS_CAUSAL:
                    visible = visible & (offs_k[None, :] <= offs_q[:, None])
                s = tl.where(visible, s, float("-inf"))
            # Online softmax update (the same four lines as FlashAttention2PyTorch, in base 2). Every query row
            # sees key 0 in its first tile, so m_new is finite from then on and exp2(-inf - m_new) = 0 is clean.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)                                           # rescales old l, acc
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, L, n_queries, n_keys, qk_scale,
                         stride_qb, stride_qt, stride_kb, stride_kt, stride_vb, stride_vt, stride_ob, stride_ot,
                         D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # grid = (query tiles, batch*heads): this program owns queries [q_start, q_start + BLOCK_Q) of row b
        q_start = tl.program_id(0) * BLOCK_Q
        b = tl.program_id(1).to(tl.int64)                          # int64: b * stride may exceed 2^31
        offs_q = q_start + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, D_PAD)                               # head dim padded to a power of two, masked
        offs_k0 = tl.arange(0, BLOCK_K)
        q_mask = (offs_q[:, None] < n_queries) & (offs_d[None, :] < D)
        # Q_i (BQ, D_PAD): read from HBM once, kept in registers for the whole loop over keys
        q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)  # running max (log2 units)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)                # running sum of exp2(s - m)
        acc = tl.zeros([BLOCK_Q, D_PAD], dtype=tl.float32)         # running unnormalized output
        k_base = K + b * stride_kb
        v_base = V + b * stride_vb
        # Key tiles [0, k_free) are fully visible to every query of this tile and fully inside K: no masks.
        # Two calls of the same loop with MASKED a compile-time constant: the compiler emits a mask-free loop for
        # the (many) interior tiles and a masked one for the (few) diagonal and ragged-end tiles.
        if IS_CAUSAL:
            k_hi = tl.minimum(n_keys, q_start + BLOCK_Q)           # skip tiles above the diagonal
            k_free = tl.minimum(q_start // BLOCK_K, n_keys // BLOCK_K) * BLOCK_K
        else:
            k_hi = n_keys
            k_free = (n_keys // BLOCK_K) * BLOCK_K
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_q, offs_d,
                                        offs_k0, 0, k_free, n_keys, qk_scale, D, D_PAD, BLOCK_Q, BLOCK_K, False,
                                        IS_CAUSAL, UPCAST, PRECISION)
        acc, l_i, m_i = _attn_fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_q, offs_d,
                                        offs_k0, k_free, k_hi, n_keys, qk_scale, D, D_PAD, BLOCK_Q, BLOCK_K, True,
                                        IS_CAUSAL, UPCAST, PRECISION)
        o = acc / l_i[:, None]                                     # (BQ, D_PAD): softmax(S_i) V, normalized once
        tl.store(O + b * stride_ob + offs_q[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=q_mask)
        # L in natural-log units: L = ln(sum exp(S)) = (m + log2 l) * ln 2
        tl.store(L + b * n_queries + offs_q, (m_i + tl.log2(l_i)) / _LOG2_E, mask=offs_q < n_queries)

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, n_queries, stride_ob, stride_ot, stride_dob, stride_dot,
                                    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr):
        # DELTA = rowsum(O * dO) (batch, Nq), fp32. (Equals rowsum(P * dP), the softmax-Jacobian term.)
        q_start = tl.program_id(0) * BLOCK_Q
        b = tl.program_id(1).to(tl.int64)
        offs_q = q_start + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, D_PAD)
        mask = (offs_q[:, None] < n_queries) & (offs_d[None, :] < D)
        o = tl.load(O + b * stride_ob + offs_q[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b * stride_dob + offs_q[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
        # one float per query, computed once here instead of once per key tile in both backward kernels
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + b * n_queries + offs_q, delta, mask=offs_q < n_queries)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, L, DELTA, DK, DV, n_queries, n_keys, qk_scale, sm_scale,
                              stride_qb, stride_qt, stride_kb, stride_kt, stride_vb, stride_vt,
                              stride_dob, stride_dot, stride_dkb, stride_dkt, stride_dvb, stride_dvt,
                              D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                              IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # One program = one key tile; loops over query tiles. Works with transposed tiles (keys x queries) so
        # that dV = P^T dO and dK = dS^T Q are plain (BK, BQ) @ (BQ, d) products.
        k_start = tl.program_id(0) * BLOCK_K
        b = tl.program_id(1).to(tl.int64)
        offs_k = k_start + tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, D_PAD)
        offs_q0 = tl.arange(0, BLOCK_Q)
        kv_mask = (offs_k[:, None] < n_keys) & (offs_d[None, :] < D)
        # this program's K_j, V_j (BK, D_PAD) stay in registers; Q_i, dO_i stream past them
        k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_K, D_PAD], dtype=tl.float32)         # sum over query tiles of dS^T Q, fp32
        dv = tl.zeros([BLOCK_K, D_PAD], dtype=tl.float32)         # sum over query tiles of P^T dO, fp32
        # Causal: query tiles entirely above this key tile (all i < k_start) never see it -> start below them.
        # (a query tile that straddles k_start still sees part of this key tile: start at the tile holding it)
        q_lo = (k_start // BLOCK_Q) * BLOCK_Q if IS_CAUSAL else 0
        for q_start in range(q_lo, n_queries, BLOCK_Q):
            # per query tile: Q_i, dO_i (BQ, D_PAD) and the two per-query floats L_i, D_i -- everything needed to
            # rebuild this tile's P and dS without anything of size (N, N) in memory
            offs_q = q_start + offs_q0
            q_valid = offs_q < n_queries
            q_mask = q_valid[:, None] & (offs_d[None, :] < D)
            q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + b * stride_dob + offs_q[:, None] * stride_dot + offs_d[None, :], mask=q_mask,
                         other=0.0)
            l_q = tl.load(L + b * n_queries + offs_q, mask=q_valid, other=0.0) * _LOG2_E    # log2 units
            delta = tl.load(DELTA + b * n_queries + offs_q, mask=q_valid, other=0.0)
            # S^T (BK, BQ) in log2 units; P^T = 2^(S^T - L log2 e) is exactly softmax, because L is the row's
            # log-sum-exp: no running max is needed in backward
            s_t = _mma(k, tl.trans(q), tl.zeros([BLOCK_K, BLOCK_Q], tl.float32), UPCAST, PRECISION) * qk_scale
            visible = (offs_k[:, None] < n_keys) & q_valid[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_k[:, None] <= offs_q[None, :])
            p_t = tl.where(visible, tl.exp2(s_t - l_q[None, :]), 0.0)                 # P^T, recomputed from L
            dv = _mma(p_t.to(do.dtype), do, dv, UPCAST, PRECISION)                     # dV += P^T dO
            dp_t = _mma(v, tl.trans(do), tl.zeros([BLOCK_K, BLOCK_Q], tl.float32), UPCAST, PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])                                       # dS^T
            dk = _mma(ds_t.to(q.dtype), q, dk, UPCAST, PRECISION)                      # dK += dS^T Q
        dk = dk * sm_scale                  # the 1/sqrt(d) of S = Q K^T / sqrt(d), applied once at the end
        tl.store(DK + b * stride_dkb + offs_k[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + b * stride_dvb + offs_k[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, L, DELTA, DQ, n_queries, n_keys, qk_scale, sm_scale,
                            stride_qb, stride_qt, stride_kb, stride_kt, stride_vb, stride_vt,
                            stride_dob, stride_dot, stride_dqb, stride_dqt,
                            D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                            IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # One program = one query tile; loops over key tiles (up to the diagonal when causal). dQ += dS K.
        q_start = tl.program_id(0) * BLOCK_Q
        b = tl.program_id(1).to(tl.int64)
        offs_q = q_start + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, D_PAD)
        offs_k0 = tl.arange(0, BLOCK_K)
        q_valid = offs_q < n_queries
        q_mask = q_valid[:, None] & (offs_d[None, :] < D)
        q = tl.load(Q + b * stride_qb + offs_q[:, None] * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b * stride_dob + offs_q[:, None] * stride_dot + offs_d[None, :], mask=q_mask, other=0.0)
        l_q = tl.load(L + b * n_queries + offs_q, mask=q_valid, other=0.0) * _LOG2_E  # log2 units
        delta = tl.load(DELTA + b * n_queries + offs_q, mask=q_valid, other=0.0)
        dq = tl.zeros([BLOCK_Q, D_PAD], dtype=tl.float32)         # sum over key tiles of dS K, fp32
        k_hi = tl.minimum(n_keys, q_start + BLOCK_Q) if IS_CAUSAL else n_keys   # causal: up to the diagonal
        for k_start in range(0, k_hi, BLOCK_K):
            offs_k = k_start + offs_k0
            kv_mask = (offs_k[:, None] < n_keys) & (offs_d[None, :] < D)
            k = tl.load(K + b * stride_kb + offs_k[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + b * stride_vb + offs_k[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _mma(q, tl.trans(k), tl.zeros([BLOCK_Q, BLOCK_K], tl.float32), UPCAST, PRECISION) * qk_scale
            visible = q_valid[:, None] & (offs_k[None, :] < n_keys)
            if IS_CAUSAL:
                visible = visible & (offs_k[None, :] <= offs_q[:, None])
            p = tl.where(visible, tl.exp2(s - l_q[:, None]), 0.0)                  # P, recomputed from L
            dp = _mma(do, tl.trans(v), tl.zeros([BLOCK_Q, BLOCK_K], tl.float32), UPCAST, PRECISION)  # dO V^T
            ds = p * (dp - delta[:, None])                                        # softmax backward
            dq = _mma(ds.to(k.dtype), k, dq, UPCAST, PRECISION)                   # dQ += dS K
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + offs_q[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=q_mask)

class FlashAttention2Triton(torch.autograd.Function):
    """FlashAttention-2 with Triton forward and backward. apply(Q, K, V, is_causal[, tiles]) on (batch, seq, d),
    d in 16..128, any seq length, fp32 / bf16 / fp16. Non-contiguous inputs are copied to contiguous first
    (documented fallback: correct, costs one copy). tiles=(BLOCK_Q, BLOCK_K) pins the tile sizes (else autotuned
    on GPU). Saves O, L (batch, Nq) fp32, Q, K, V."""

    @staticmethod
    def forward(ctx, Q, K, V, is_causal=False, tiles=None):
        _check_triton_attention_inputs(Q, K, V, is_causal)
        Q, K, V = Q.contiguous(), K.contiguous(), V.contiguous()  # the kernels assume unit stride along d
        O, L = flash_attention_triton_forward(Q, K, V, is_causal, tiles)
        # saved: the inputs and O, plus L -- one float per query instead of FA's O(N^2) probabilities
        ctx.save_for_backward(Q, K, V, O, L)
        ctx.is_causal, ctx.tiles = is_causal, tiles
        return O

    @staticmethod
    def backward(ctx, dO):
        # three launches (preprocess, dK/dV, dQ); P is rebuilt from L inside the kernels, tile by tile
        Q, K, V, O, L = ctx.saved_tensors
        dQ, dK, dV = flash_attention_triton_backward(Q, K, V, O, L, dO, ctx.is_causal, ctx.tiles)
        return dQ, dK, dV, None, None              # no gradients for is_causal and tiles


# ---- Part 3: ScratchLM integration ----
#
# model.py's attention backends take q (B, H, Tq, dh), k/v (B, H, Tk, dh) (GQA already expanded) with the queries
# being the LAST Tq of the Tk positions. The kernels work on (batch, seq, d): fold heads into batch. Cases the
# kernels do not cover fall back to model.py's "sdpa" backend (same semantics; _kernel_unsupported lists them):
# sliding windows shorter than Tk, causal with Tq != Tk (KV-cache decoding), head dims outside 16..128 or other
# dtypes (Triton only), devices Triton cannot run on. The swap changes how attention and RMSNorm are computed,
# never what they compute: the tests check logits and every parameter gradient against the sdpa backend.

# How often each backend fell back to sdpa: a silent fallback would make a "kernel" run measure sdpa instead, so
# the count is visible (tests assert it stays 0 on the paths the kernels cover)
_FALLBACK_COUNTS = {"flash_triton": 0, "flash_torch": 0}


def _multihead(impl: str, q, k, v, *, causal: bool, window: Optional[int] = None):
    """(B, H, Tq, dh) -> (B, H, Tq, dh) through FlashAttention2{Triton,PyTorch}, or the documented fallback."""
    B, H, Tq, dh = q.shape
    Tk = k.shape[-2]
    if window is not None and window >= Tk:  # every query already sees all its keys: same as no window
        window = None
    if _kernel_unsupported(impl, q, k, v, causal, window):
        _FALLBACK_COUNTS[impl] += 1
        # model.py's 'sdpa': query i of Tq is position Tk - Tq + i; causal sees keys <= it; a window W the last W
        return M.get_attention_backend("sdpa")(q, k, v, causal=causal, window=window)
    # the heads are independent attentions: fold them into the batch dimension, one kernel launch for all (a
    # reshape, not a copy: the (B, H, T, dh) tensors model.py passes are contiguous in this order)
    q3, k3, v3 = q.reshape(B * H, Tq, dh), k.reshape(B * H, Tk, dh), v.reshape(B * H, Tk, dh)
    fa = FlashAttention2Triton if impl == "flash_triton" else FlashAttention2PyTorch
    return fa.apply(q3, k3, v3, bool(causal)).view(B, H, Tq, dh)


# model.py's attention backends 'flash_triton' and 'flash_torch' (the tiled PyTorch FA2: slow, for reading and
# testing), with the signature model.py's backends share: (B, H, Tq, dh) tensors, keyword causal and window.
# model.py cannot import kernels.py (pipeline order), so kernels.py adds them to model.py's registry at import:
# `import kernels` is all a user needs before ModelConfig(attn_impl="flash_triton").
flash_triton_attention = functools.partial(_multihead, "flash_triton")
flash_torch_attention = functools.partial(_multihead, "flash_torch")
M.register_attention_backend("flash_triton", flash_triton_attention)
M.register_attention_backend("flash_torch", flash_torch_attention)


def _rmsnorm_kernel_forward(self, x):
    """Replacement forward for model.RMSNorm modules: same parameters (.weight, .eps), fused Triton kernel where
    it can run, the module's own (identical) math elsewhere (e.g. CPU tensors on a GPU machine)."""
    if _triton_runs_on(x) and x.dtype in _FLOAT_DTYPES and x.shape[-1] <= RMSNORM_MAX_HIDDEN:
        return RMSNormTriton.apply(x, self.weight, self.eps)
    return type(self).forward(self, x)


def use_kernels(model: torch.nn.Module, rmsnorm: bool = True, attention=True) -> torch.nn.Module:
    """Swap the kernels into a TransformerLM in one call (in place; returns the model).

    rmsnorm=True: every model.RMSNorm module's forward becomes the fused Triton kernel. Only the bound method is
      replaced (an instance attribute), so state_dict() is untouched; `del module.forward` undoes it.
    attention=True / "flash_triton" / "flash_torch": every attention module's backend (`.attn_impl`) is set.
      model.config is NOT changed (unlike model.set_attention_backend): the kernels compute the same function, so
      checkpoints of a kernel run record the portable backend and load where kernels.py is never imported.
    """
    if attention:
        name = "flash_triton" if attention is True else str(attention)
        if name not in ("flash_triton", "flash_torch"):
            raise ValueError("use_kernels: attention must be True/False, 'flash_triton' or 'flash_torch', "
                             f"got {attention!r}")
        for module in model.modules():          # every layer's attention (and any nested model's)
            if isinstance(module, M.MultiHeadSelfAttention):
                module.attn_impl = name         # read by MultiHeadSelfAttention on every forward
    if rmsnorm:
        _require_triton("use_kernels(rmsnorm=True)")
        norms = [m for m in model.modules() if isinstance(m, M.RMSNorm)]
        if not norms:   # asked for the kernel and nothing would change: say so instead of running eager code
            raise ValueError("use_kernels: rmsnorm=True but the model has no model.RMSNorm modules "
                             "(config norm != 'rmsnorm'?)")
        for module in norms:    # bound to each instance: the class and other models' norms are untouched
            module.forward = types.MethodType(_rmsnorm_kernel_forward, module)
    return model


# ===== Menu: cheaper decoding: int8 weight-only quantization =====
# Plugs in after training: quantize_model(model) swaps every model.Linear of a trained TransformerLM for a
# QuantizedLinear (int8 weights, float activations); `python kernels.py quantize --checkpoint CKPT` measures it.
#
# Decoding one token at a time is a (B, d_in) @ (d_in, d_out) matmul per layer with B = the batch of sequences
# (1..a few dozen): 2 B FLOPs per weight read, so every step streams ALL the weights from memory and is
# memory-bound (an H100 needs ~300 FLOPs per byte to be compute-bound). Storing the weights in int8 moves 1 byte
# per weight instead of 2 (bf16) or 4 (fp32): up to 2x / 4x less traffic per decoded token. "Weight-only" (W8A16):
# activations stay in float, so the only error is the rounding of the weights.
#
# The scheme: symmetric absmax scaling, one scale per OUTPUT channel (row o of W, shape (d_out, d_in)):
#   s_o = max_i |W_oi| / 127,   q_oi = clamp(round(W_oi / s_o), -127, 127) in int8,   W_oi ~ q_oi * s_o
# so every weight is off by at most s_o / 2 (half a step), and the largest weight of each row is exact. -128 is
# left unused so that the grid is symmetric (-W quantizes to -q). Why per output channel: in
#   y_bo = sum_i x_bi W_oi ~ sum_i x_bi q_oi s_o = s_o * (sum_i x_bi q_oi)
# the scale factors OUT of the dot product, so a kernel can multiply integers-as-floats and apply s_o once per
# output element, after the sum (a per-input-channel scale would have to be applied inside the sum). A row
# with one large weight gets a coarse grid for all its others: that is the error this scheme cannot avoid.
#
# In the field: LLM.int8() (arXiv:2208.07339) quantizes weights AND activations, and finds the hard part is a few
# outlier activation features at >6.7B parameters; weight-only int8 round-to-nearest, as here, is nearly lossless
# at these sizes. GPTQ (arXiv:2210.17323) reaches 3-4 bits by rounding columns one at a time and correcting the rest
# with second-order (Hessian) information; AWQ (arXiv:2306.00978) rescales the ~1% of input channels that see large
# activations before rounding. Both start from exactly this per-channel absmax grid.
#
# What it costs: the readable path (dequantize the whole matrix, then a float matmul) writes a float copy of W
# for every call -- MORE memory traffic than the float model, so it is slower, not faster (see the CPU bench).
# The gain needs the fused kernel below, which reads the int8 tile and converts it in registers.

INT8_MAX = 127   # symmetric grid [-127, 127]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric absmax: W (d_out, d_in) float -> (q int8 (d_out, d_in), scale fp32 (d_out,))."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8: expected a float matrix (d_out, d_in), got {w.dtype} {tuple(w.shape)}")
    w32 = w.detach().float()
    if not torch.isfinite(w32).all():   # a NaN/inf would become a NaN scale and poison the whole row silently
        raise ValueError("quantize_int8: the weight holds NaN or inf values")
    absmax = w32.abs().amax(dim=1)                                 # (d_out,)
    # an all-zero row gets scale 1 (its q is all zeros: exact) instead of a 0/0
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    # round() is round-half-to-even; |W / s| <= 127 by construction, the clamp only guards float rounding
    q = torch.round(w32 / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q int8 (d_out, d_in), scale (d_out,)) -> W_hat = q * scale[:, None] in `dtype` (computed in >= fp32)."""
    ct = torch.promote_types(dtype, torch.float32)   # bf16 weights are rounded once, from the fp32 product
    return (q.to(ct) * scale.to(ct)[:, None]).to(dtype)


def int8_matmul_torch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The readable version: y = x @ (q * scale)^T. x (..., d_in) -> (..., d_out) in x.dtype."""
    _check_int8_inputs(x, q, scale, triton=False)
    # materializes a float copy of W (d_out, d_in) in the activation dtype every call, then one float matmul
    return x @ dequantize_int8(q, scale, x.dtype).t()


# The fused kernel. Grid = (ceil(M / BLOCK_M), ceil(N / BLOCK_N)) over Y (M, N) = X (M, K) @ W^T, W (N, K) int8.
# A program owns one (BLOCK_M, BLOCK_N) output tile and walks K in BLOCK_K steps: it loads an X tile
# (BLOCK_M, BLOCK_K) in its float dtype and the int8 tile of W for the same columns, converts the int8 values to
# the float dtype IN REGISTERS (exact: |q| <= 127 fits bf16's 8 significant bits), and accumulates the tile product
# in fp32. Only after the last K step does it multiply column n of the accumulator by s_n: N scales per output
# tile instead of N * K per weight. HBM traffic: 1 byte per weight (plus X and Y), the whole point.
if HAVE_TRITON:

    @triton.jit
    def _int8_matmul_kernel(X, WQ, SCALE, Y, n_rows, n_out, n_in, stride_xm, stride_wn, stride_ym,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # rows of X / Y this program owns (int64: rows * stride may exceed 2^31) and the output channels
        offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)      # (BM,)
        offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)      # (BN,)
        offs_k0 = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)      # sum_k x_mk q_nk, unscaled, fp32
        for k_start in range(0, n_in, BLOCK_K):
            offs_k = k_start + offs_k0
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < n_rows) & (offs_k[None, :] < n_in), other=0.0)    # (BM, BK)
            # W^T's tile (BK, BN): element (k, n) is W[n, k]; ragged edges read 0, which adds nothing
            wq = tl.load(WQ + offs_n[None, :] * stride_wn + offs_k[:, None],
                         mask=(offs_n[None, :] < n_out) & (offs_k[:, None] < n_in), other=0)      # int8
            # int8 -> float in registers (-> fp32 directly under the interpreter, whose int8 -> bf16 cast is
            # wrong; exact either way), then the tile product with fp32 sums
            if UPCAST:
                w = wq.to(tl.float32)
            else:
                w = wq.to(x.dtype)
            acc = _mma(x, w, acc, UPCAST, PRECISION)
        s = tl.load(SCALE + offs_n, mask=offs_n < n_out, other=0.0)                                 # (BN,) fp32
        y = acc * s[None, :]                                       # the per-channel scale, once per tile
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
                 mask=(offs_m[:, None] < n_rows) & (offs_n[None, :] < n_out))


def _int8_tiles(n_rows: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Decoding (few rows): the smallest M tile tl.dot takes and long
    K steps, since the time is all in streaming W; prefill / batches: square tiles that reuse each W tile."""
    if INTERPRET:
        return 16, 32, 32, 4, 1     # small tiles: the tests' odd sizes span several tiles with ragged edges
    if n_rows <= 16:
        return 16, 64, 128, 4, 4
    return (64, 64, 64, 4, 3) if n_rows <= 128 else (128, 128, 64, 8, 3)


def int8_matmul_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fused dequantize-in-the-tile matmul: x (..., d_in) fp32/bf16/fp16, q (d_out, d_in) int8, scale (d_out,)
    -> (..., d_out) in x.dtype; equals int8_matmul_torch up to float summation order. Inference only."""
    _check_int8_inputs(x, q, scale)
    x2 = _rows(x)                                                  # (M, K): leading dims are just more rows
    q, scale = q.contiguous(), scale.float().contiguous()
    M, K = x2.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        bm, bn, bk, warps, stages = _int8_tiles(M)
        _int8_matmul_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x2, q, scale, y, M, N, K, x2.stride(0), q.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            UPCAST=INTERPRET, PRECISION=_dot_precision(x.dtype), num_warps=warps, num_stages=stages)
    return y.view(*x.shape[:-1], N)


# Training a quantized model is refused, loudly: the int8 weights have no gradient (round() has derivative 0
# almost everywhere), so an optimizer would only move the norms and embeddings while the loss says "training".
# model.train(), requires_grad_() on a quantized layer, and backward through one each raise this.
QUANTIZED_TRAINING_ERROR = ("{what}: this model is int8 weight-only quantized (kernels.quantize_model) and is "
                            "inference-only -- its int8 weights have no gradients. Train or fine-tune the float "
                            "checkpoint, then quantize again")


def _refuse_training(what: str):
    raise RuntimeError(QUANTIZED_TRAINING_ERROR.format(what=what))


class QuantizedLinear(torch.nn.Module):
    """model.Linear with int8 weights: buffers weight_int8 (d_out, d_in) and weight_scale (d_out,) fp32 (+ bias).
    forward uses the Triton kernel on CUDA (impl="auto"), the readable dequantize-then-matmul elsewhere;
    impl="torch" / "triton" pins one. `.weight` is the dequantized float matrix (read-only, for code that reads
    it, e.g. MLA's absorbed decoding). Inference only: training raises (QUANTIZED_TRAINING_ERROR)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.impl = in_features, out_features, "auto"
        # buffers, not parameters: saved in the state dict, moved by .to(), invisible to optimizers
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.training = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Module) -> "QuantizedLinear":
        """Quantize a model.Linear (its weight (d_out, d_in); a bias stays in float)."""
        w = linear.weight
        m = cls(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device)
        m.weight_int8, m.weight_scale = quantize_int8(w)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight_int8, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d_in) -> (..., d_out) in x.dtype. "auto" takes the readable path on CPU, where the interpreter
        # would be ~1000x slower than dequantizing
        impl = self.impl
        if impl == "auto":
            impl = "triton" if x.is_cuda and HAVE_TRITON and not INTERPRET and x.dtype in _FLOAT_DTYPES else "torch"
        y = (int8_matmul_triton if impl == "triton" else int8_matmul_torch)(x, self.weight_int8, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        # A graph is being built through this layer (some input or remaining parameter requires grad): attach a
        # hook that refuses the backward by name. torch.no_grad() inference builds no graph and pays nothing.
        if y.requires_grad:
            y.register_hook(lambda g: _refuse_training("backward through a QuantizedLinear"))
        return y

    def train(self, mode: bool = True):
        if mode:
            _refuse_training("model.train()")
        return torch.nn.Module.train(self, False)

    def requires_grad_(self, requires_grad: bool = True):
        if requires_grad:
            _refuse_training("requires_grad_() on a QuantizedLinear")
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, " \
               f"bias={self.bias is not None}"


class QuantizedEmbedding(torch.nn.Module):
    """model.Embedding with int8 rows and one scale per row (the same per-channel grid: a row is an output
    channel of the tied LM head). ids (...) -> (..., d) float32; dequantizes only the rows looked up."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.training = False

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[token_ids].float() * self.weight_scale[token_ids, None]   # (..., d)

    train = QuantizedLinear.train                 # the same refusal (the module holds no trainable tensor)


def quantize_model(model: torch.nn.Module, *, lm_head: bool = False, embeddings: bool = False) -> torch.nn.Module:
    """Replace every model.Linear of a TransformerLM (MoE routers excepted) by a QuantizedLinear, in place; returns
    the model (in eval mode, inference only). lm_head / embeddings: quantize the vocabulary matrices too (default
    off: they are the layers most sensitive to rounding, kept in float by common practice, e.g. bitsandbytes').
    With tied embeddings and both on, the embedding reads the LM head's int8 matrix (one copy, as before)."""
    if getattr(model, "quantization", None):
        raise ValueError("quantize_model: this model is already quantized")
    # Collect first, replace after: replacing modules while iterating named_modules would skip or revisit some.
    # Every model.Linear counts (attention q/k/v/output, the FFN's w1/w2/w3, MLA's down/up projections, MoE
    # experts), the LM head only when asked. MoE routers stay in float: d x E weights (nothing to save), and a
    # near-tie between two experts' scores flips the routing, a discrete change no rounding bound covers.
    keep = {"router"} | (set() if lm_head else {"lm_head"})
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, M.Linear) and name.split(".")[-1] not in keep]
    if not targets:
        raise ValueError("quantize_model: the model has no model.Linear layers to quantize")
    model.eval()
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, QuantizedLinear.from_linear(mod))
    # Embeddings: a lookup reads only B x T rows per step, so int8 saves file size and memory, not decode time.
    # Tied (one matrix for both ends): reuse the head's int8 rows, so the file keeps one copy as before.
    emb = getattr(model, "token_embeddings", None)
    if embeddings and isinstance(emb, M.Embedding):
        head = getattr(model, "lm_head", None)
        tied = isinstance(head, QuantizedLinear) and getattr(model.config, "tie_embeddings", False)
        q, s = (head.weight_int8, head.weight_scale) if tied else quantize_int8(emb.weight)
        model.token_embeddings = QuantizedEmbedding(q, s)
    model.quantization = dict(scheme="int8-weight-only-per-channel", lm_head=lm_head, embeddings=embeddings)
    # model.train() is refused before it flips any module (the layers' own train() refuses direct calls)
    model.train = types.MethodType(QuantizedLinear.train, model)
    return model


# Quantized model files. A quantized model is not a training checkpoint (it cannot be trained), so it gets its own
# format tag: model.read_checkpoint (train.py --resume, model.py generate) refuses it with a message naming the
# format instead of failing on missing keys. torch.load(weights_only=True): tensors and plain values only.
QUANTIZED_FORMAT = "scratchlm-int8-v1"


def save_quantized(model: torch.nn.Module, path, **extra) -> None:
    """Write a quantize_model()'d TransformerLM atomically: its state dict (int8 + scales + float rest), its
    ModelConfig and quantization options, plus `extra` plain values (source checkpoint, tokenizer, ...)."""
    if not getattr(model, "quantization", None):
        raise ValueError("save_quantized: the model is not quantized (run kernels.quantize_model first)")
    payload = dict(format=QUANTIZED_FORMAT, model=model.state_dict(), model_config=model.config.to_dict(),
                   quantization=dict(model.quantization), **extra)
    with atomic_open(path, "wb") as f:   # temp file + rename: an interrupted write leaves the old file intact
        torch.save(payload, f)


def load_quantized(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """(model, payload) from a save_quantized file: the TransformerLM is rebuilt from its config, quantized with
    the stored options, then loaded strictly (a mismatch names the keys)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"quantized model {path} does not exist (or is not a file)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises many types for a truncated / foreign file
        raise ValueError(f"{path} is not a readable quantized model file ({type(e).__name__})") from None
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt != QUANTIZED_FORMAT:
        hint = "; it is a float checkpoint: quantize it with `python kernels.py quantize --checkpoint`" \
            if fmt == M.CHECKPOINT_FORMAT else ""
        raise ValueError(f"{path} has format {fmt!r}, not {QUANTIZED_FORMAT!r}{hint}")
    # Rebuild the module structure (a float model quantized with the same options: same names, shapes, sharing),
    # then copy the stored tensors in. The random init quantized on the way is overwritten, a small one-off cost.
    model = M.TransformerLM.from_config(payload["model_config"])
    quantize_model(model, **{k: payload["quantization"][k] for k in ("lm_head", "embeddings")})
    M.load_model_state(model, payload["model"], src=path)
    return model.to(M.resolve_device(device)), payload


# ===== Menu: compiling for a GPU without one =====
# `python kernels.py compile`: every kernel of the core (and the int8 Menu) compiled by Triton's real GPU compiler
# for a named architecture, on any machine (the wheel ships ptxas), reporting registers / spills / shared memory.
# The interpreter runs the kernels' Python semantics, not the GPU compiler's type checks and dot-shape rules.

# compile_for_gpu's argument types: a capitalized name is a pointer to the data dtype, any other an int32 (sizes,
# strides), except these fp32 buffers (L, DELTA, RSTD, DW_PARTIAL, gains, int8 scales), int8 weights, fp32 scalars
_ARG_TYPES = {**dict.fromkeys(["L", "DELTA", "RSTD", "DW_PARTIAL", "W", "SCALE"], "*fp32"), "WQ": "*i8",
              **dict.fromkeys(["qk_scale", "sm_scale", "eps"], "fp32")}


def compile_for_gpu(fn, dtype: torch.dtype, constexprs: dict, num_warps: int, num_stages: int, arch: int = 90):
    """Compile a @triton.jit kernel for sm_<arch> without a GPU; returns the CompiledKernel (PTX, cubin, metadata)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if INTERPRET:
        raise RuntimeError("compile_for_gpu needs TRITON_INTERPRET=0 (kernels decorated for the GPU compiler)")
    # the signature Triton would infer from the tensors of a real launch (_ARG_TYPES), constexprs as given
    sig = {p.name: "constexpr" if p.is_constexpr else
           _ARG_TYPES.get(p.name, f"*{_TL_NAMES[dtype]}" if p.name.isupper() else "i32") for p in fn.params}
    # GPUTarget("cuda", arch, 32): compute capability and warp size
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cubin_resources(kernel) -> str:
    """'regs .., spill bytes ..' from cuobjdump (spills > 0: registers ran out); empty if it is unavailable."""
    # cuobjdump ships with triton's NVIDIA backend; it reads the cubin's resource table (no GPU needed)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if "cubin" not in kernel.asm or not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            return f"regs {fields.get('REG')}, spill bytes {fields.get('LOCAL')}"
    return ""


def run_compile(args) -> int:
    """`python kernels.py compile`: compile every kernel (or those matching --only) for sm_<arch>, print
    registers / spills / shared memory per config; returns the exit status (1 if any config fails)."""
    if INTERPRET:  # kernels in this process were decorated for the interpreter: redo it in a fresh process
        env = dict(os.environ, TRITON_INTERPRET="0")
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # fused multiply-add, as on a real GPU launch
        cmd = [sys.executable, os.path.abspath(__file__), "compile", "--arch", str(args.arch)] + ["--full"] * args.full
        cmd += [arg for text in args.only for arg in ("--only", text)]
        return subprocess.call(cmd, env=env)
    _require_triton("kernels.py compile")
    jobs = _compile_jobs(args)
    print(f"# compiling {len(jobs)} kernels for sm_{args.arch} (no GPU needed)")
    failures = 0
    for label, fn, dtype, const, warps, stages in jobs:
        tiles = {k: v for k, v in const.items() if k.startswith("BLOCK")}
        t0 = time.time()
        try:
            kernel = compile_for_gpu(fn, dtype, const, warps, stages, args.arch)
            info = f"shared {kernel.metadata.shared} B, {_cubin_resources(kernel)}"
            status = "ok  "
        except Exception as e:  # report every failing config, keep going
            failures += 1
            info, status = f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}", "FAIL"
        print(f"  {status} {label:33s} {tiles} warps={warps} stages={stages}: {info} "
              f"({time.time() - t0:.1f}s)")
        sys.stdout.flush()
    # (the test suite runs a few of these and asserts "ALL COMPILED": GPU-only compile errors fail CI on a CPU)
    print("ALL COMPILED" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


def _compile_jobs(args):
    """[(label, kernel, dtype, constexprs, warps, stages)]: by default the first autotune config of each attention
    kernel (bf16 at head dims 64 and 128, fp32 at 64), both RMSNorm kernels at hidden 4096 and the int8 matmul's
    decode and prefill tiles; --full: every config at head dims 16-128 and three hidden sizes. The label names
    the dtype too ("attn fwd d=64 bf16"): what --only matches."""
    jobs = []
    first = (lambda cfgs: cfgs) if args.full else (lambda cfgs: cfgs[:1])
    attn = [("attn fwd", _attn_fwd_kernel, "fwd"), ("attn bwd dK/dV", _attn_bwd_dkdv_kernel, "dkdv"),
            ("attn bwd dQ", _attn_bwd_dq_kernel, "dq")]
    for dtype in (torch.bfloat16, torch.float32):
        t = _TL_NAMES[dtype]
        # fp32 attention compiles slowly (exact 'ieee' dots, no tensor cores): one head dim unless --full
        for d in [16, 32, 64, 128] if args.full else [64] if dtype == torch.float32 else [64, 128]:
            base = _attn_constexprs(d, True, dtype, upcast=False)
            for label, fn, kind in attn:
                jobs += [(f"{label} d={d} {t}", fn, dtype, {**base, **c.kwargs}, c.num_warps, c.num_stages)
                         for c in first(_configs(kind))]
            jobs.append((f"attn bwd preprocess d={d} {t}", _attn_bwd_preprocess_kernel, dtype,
                         dict(D=d, D_PAD=base["D_PAD"], BLOCK_Q=64), 4, 1))
        for hidden in (1024, 4096, 16384) if args.full else (4096,):
            block_n, warps = _rmsnorm_launch_params(hidden)
            for pass_, fn in (("fwd", _rmsnorm_fwd_kernel), ("bwd", _rmsnorm_bwd_kernel)):
                jobs.append((f"rmsnorm {pass_} hidden={hidden} {t}", fn, dtype, dict(BLOCK_N=block_n), warps, 1))
        for rows in (1, 4096):   # the int8 weight-only matmul: its decoding tile and its prefill tile
            bm, bn, bk, warps, stages = _int8_tiles(rows)
            jobs.append((f"int8 matmul rows={rows} {t}", _int8_matmul_kernel, dtype,
                         dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=False, PRECISION=_dot_precision(dtype)),
                         warps, stages))
    return [j for j in jobs if not args.only or any(text in j[0] for text in args.only)]


# ===== Appendix: plumbing =====
# Running without a GPU, the launch parameters of each kernel, input checks (a clear ValueError instead of a wrong
# result or a crash inside a kernel), where a Triton kernel can run, and the quantized model file.

# ---- running without a GPU ----
# With TRITON_INTERPRET=1 (read when each @triton.jit function is DECORATED, i.e. at import), Triton runs every
# kernel in a numpy interpreter on CPU tensors: slowly, with the same program/tile semantics, so the CPU test suite
# exercises the kernels. Its two bf16 quirks are handled where they arise (UPCAST: bf16 dot operands, _mma; int8
# -> bf16 casts, _int8_matmul_kernel); all other bf16 math happens in fp32 registers anyway (upcast on load).


def _interpreter_adopt_triton_stdlib() -> int:
    """If triton was imported BEFORE TRITON_INTERPRET was set (e.g. torch.compile / inductor imported it earlier
    in the same process), its own library functions written in Triton (tl.sum, tl.max, tl.cdiv, ... in
    triton.language.standard) were built as GPU-only JITFunctions, and calling them from an interpreted kernel
    fails ("Cannot call @triton.jit'd outside of the scope of a kernel"). Re-wrap them exactly as triton does
    when the variable is set before import (as InterpretedFunction). Returns how many were re-wrapped."""
    if not (HAVE_TRITON and INTERPRET):       # on a GPU (or without triton) there is nothing to adopt
        return 0
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    adopted: dict = {}
    for mod in filter(None, (tl, tl.core, tl.standard, getattr(tl, "math", None))):
        for name, obj in list(vars(mod).items()):
            if type(obj) is JITFunction:                               # same object may be aliased in tl.*
                if id(obj) not in adopted:
                    adopted[id(obj)] = InterpretedFunction(obj.fn)
                setattr(mod, name, adopted[id(obj)])
    return len(adopted)


_interpreter_adopt_triton_stdlib()

# ---- launch parameters ----

_TL_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Tile sizes used under the interpreter (no autotuning there). Small enough that the tests' short sequences
# span several tiles (ragged last tile, diagonal tiles, fully visible tiles); large enough that the interpreter's
# per-tile overhead (Python for every tl.* call) stays a small part of the run time.
INTERPRET_TILES = (32, 16)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (rows, d) with unit stride along d (a view when it can be, else a copy), as the kernels want."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _rmsnorm_launch_params(n_cols: int):
    """(BLOCK_N, num_warps) for rows of n_cols: tl.arange needs a power-of-two length, masks cover the rest.
    Enough warps that each thread holds <= ~8-16 elements of the row (as in Triton's layer-norm tutorial)."""
    block_n = triton.next_power_of_2(n_cols)
    return block_n, min(max(block_n // 256, 1), 16)


def _rmsnorm_num_programs(n_rows: int, device: torch.device) -> int:
    """How many programs the backward launches (each loops over rows n_programs apart)."""
    # Each program writes one fp32 row of partial dgain sums, which the host reduction reads back: extra traffic
    # of 2 * programs * d * 4 bytes. Two programs per SM keep every SM busy while keeping that small next to the
    # 3 * rows * d * bytes of x, dy, dx (e.g. H100, 2048 x 4096 bf16: 8.7 MB vs 50 MB).
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 2 * sms))
    return max(1, min(n_rows, 4))  # interpreter: few programs, each loops over rows


if HAVE_TRITON:
    # On a GPU the tile sizes / warps / pipeline stages are autotuned per (sequence length, head dim, causal,
    # dtype); under the interpreter they are fixed (INTERPRET_TILES). Few configs on purpose: each one is a
    # separate compile per (dtype, head dim, causal), and the GPU script must compile + tune + benchmark inside
    # ~8 minutes. (BLOCK_Q, BLOCK_K, warps, pipeline stages), shapes from Triton's fused-attention tutorial:
    # forward: 128-query tiles amortize each K/V load over more queries; dK/dV: tall key tiles (their dK, dV
    # accumulators stay in registers), short query tiles streaming past; dQ: the mirror image.
    _ATTN_CONFIGS = dict(fwd=[(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
                         dkdv=[(32, 128, 8, 3), (64, 64, 4, 3)], dq=[(128, 32, 8, 3), (64, 64, 4, 3)])

    def _configs(kind):
        return [triton.Config({"BLOCK_Q": bq, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bq, bk, w, s in _ATTN_CONFIGS[kind]]

    # re-tune when any of these changes (the dtype is part of the compiled signature anyway); the first call at a
    # new key times every config, later calls reuse the winner
    _TUNE_KEY = ["n_queries", "n_keys", "D_PAD", "IS_CAUSAL"]
    if not INTERPRET:
        _attn_fwd_tuned = triton.autotune(_configs("fwd"), key=_TUNE_KEY)(_attn_fwd_kernel)
        _attn_bwd_dkdv_tuned = triton.autotune(_configs("dkdv"), key=_TUNE_KEY)(_attn_bwd_dkdv_kernel)
        _attn_bwd_dq_tuned = triton.autotune(_configs("dq"), key=_TUNE_KEY)(_attn_bwd_dq_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ('ieee') unless PyTorch itself is allowed TF32 for matmuls; half types use
    the tensor cores natively ('tf32' is Triton's default setting and only affects fp32 operands)."""
    # TF32 keeps fp32's range but 10 mantissa bits (~3 significant digits) in the products, for ~8x the speed of
    # exact fp32 on tensor cores; we follow the user's PyTorch setting instead of choosing for them
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _attn_constexprs(d: int, is_causal: bool, dtype: torch.dtype, upcast: bool = INTERPRET) -> dict:
    """The compile-time arguments of the attention kernels. tl.arange and tl.dot want power-of-two sizes >= 16:
    head dim 80 is computed as D_PAD = 128 with masked lanes."""
    return dict(D=d, D_PAD=max(16, triton.next_power_of_2(d)), IS_CAUSAL=bool(is_causal), UPCAST=upcast,
                PRECISION=_dot_precision(dtype))


def _tile_args(tiles):
    """Explicit (BLOCK_Q, BLOCK_K) -> launch those; None -> autotune on GPU / INTERPRET_TILES under interpreter."""
    if tiles is None and INTERPRET:
        tiles = INTERPRET_TILES
    if tiles is None:
        return None
    bq, bk = int(tiles[0]), int(tiles[1])
    # powers of two >= 16: tl.arange needs power-of-two lengths and tl.dot at least 16 rows/columns
    if any(t < 16 or t & (t - 1) for t in (bq, bk)):
        raise ValueError(f"FlashAttention2Triton: tile sizes must be powers of two >= 16, got {tiles}")
    return bq, bk


def _strides(*tensors):
    """(stride over batch, stride over sequence) of each (batch, seq, d) tensor, flattened: the kernels' order."""
    return tuple(s for t in tensors for s in (t.stride(0), t.stride(1)))


def _attn_launch(kernel, tuned: str, n: int, block: str, batch: int, args, common, tiles):
    """Launch an attention kernel on a (ceil(n / block), batch) grid: at the given tiles, or autotuned, where the
    grid depends on the tile size the autotuner picks -- a function of the chosen config `meta`."""
    if tiles is None:
        globals()[tuned][lambda meta: (triton.cdiv(n, meta[block]), batch)](*args, **common)
    else:
        bq, bk = tiles
        grid = (triton.cdiv(n, bq if block == "BLOCK_Q" else bk), batch)
        kernel[grid](*args, BLOCK_Q=bq, BLOCK_K=bk, **common)


def flash_attention_triton_forward(Q, K, V, is_causal=False, tiles=None):
    """Launch the forward kernel. Q (B, Nq, d), K/V (B, Nk, d), contiguous. Returns O (B, Nq, d), L (B, Nq) fp32."""
    B, n_q, d = Q.shape
    common = _attn_constexprs(d, is_causal, Q.dtype)
    O = torch.empty_like(Q)
    L = torch.empty(B, n_q, dtype=torch.float32, device=Q.device)  # fp32 whatever the input dtype
    # the kernel takes the scale times log2(e): one multiply turns the scores into base-2 units for exp2
    args = (Q, K, V, O, L, n_q, K.shape[1], (1.0 / math.sqrt(d)) * LOG2_E, *_strides(Q, K, V, O))
    _attn_launch(_attn_fwd_kernel, "_attn_fwd_tuned", n_q, "BLOCK_Q", B, args, common, _tile_args(tiles))
    return O, L


def flash_attention_triton_backward(Q, K, V, O, L, dO, is_causal=False, tiles=None):
    """Launch preprocess (D = rowsum(O dO)), the dK/dV kernel (over key tiles) and the dQ kernel (over query
    tiles). Returns dQ, dK, dV in the input dtype."""
    B, n_q, d = Q.shape
    n_k = K.shape[1]
    common = _attn_constexprs(d, is_causal, Q.dtype)
    dO = dO.to(Q.dtype).contiguous()                               # tl.dot needs matching operand dtypes
    # 1. D = rowsum(O * dO), (B, Nq) fp32: a cheap elementwise pass before the two matmul-heavy kernels
    delta = torch.empty(B, n_q, dtype=torch.float32, device=Q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(n_q, 64), B)](O, dO, delta, n_q, *_strides(O, dO), D=d,
                                                           D_PAD=common["D_PAD"], BLOCK_Q=64)
    # 2. dK, dV: one program per key tile; 3. dQ: one program per query tile (no atomics: each output tile has
    # exactly one program writing it, so results are bitwise reproducible)
    dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
    sm_scale = 1.0 / math.sqrt(d)
    scales = (sm_scale * LOG2_E, sm_scale)
    tiles = _tile_args(tiles)
    _attn_launch(_attn_bwd_dkdv_kernel, "_attn_bwd_dkdv_tuned", n_k, "BLOCK_K", B,
                 (Q, K, V, dO, L, delta, dK, dV, n_q, n_k, *scales, *_strides(Q, K, V, dO, dK, dV)), common, tiles)
    _attn_launch(_attn_bwd_dq_kernel, "_attn_bwd_dq_tuned", n_q, "BLOCK_Q", B,
                 (Q, K, V, dO, L, delta, dQ, n_q, n_k, *scales, *_strides(Q, K, V, dO, dQ)), common, tiles)
    return dQ, dK, dV


# ---- input checks: a clear ValueError naming the problem, never a wrong result or a crash inside a kernel ----

def _first_problem(what: str, checks) -> None:
    """checks: (is_bad, message) pairs in order, from the most basic problem to the most specific; raise the
    first bad one as `what: message`."""
    for bad, message in checks:
        if bad:
            raise ValueError(f"{what}: {message}")


def _require_triton(what: str) -> None:
    """Clear error when a Triton path is used where Triton cannot run."""
    if not HAVE_TRITON:
        raise RuntimeError(f"{what} needs the `triton` package (pip install triton; Linux x86_64 only). "
                           "The PyTorch versions in kernels.py work without it.")


def _triton_runs_on(t: torch.Tensor) -> bool:
    """A Triton kernel runs on CUDA tensors, and on CPU tensors only under the interpreter."""
    return HAVE_TRITON and (t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET))


def _kernel_unsupported(impl: str, q, k, v, causal, window) -> bool:
    """The cases _multihead hands to sdpa (GQA's fewer K/V heads were already repeated to H by model.py)."""
    if window is not None or (causal and q.shape[-2] != k.shape[-2]) or q.dtype not in _FLOAT_DTYPES \
            or not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        return True
    return impl == "flash_triton" and not (ATTN_MIN_HEAD_DIM <= q.shape[-1] <= ATTN_MAX_HEAD_DIM
                                           and _triton_runs_on(q))


def _check_triton_device(what: str, *tensors: torch.Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors when the interpreter (TRITON_INTERPRET=1) is on."""
    _require_triton(what)
    devices = {t.device for t in tensors}
    # the interpreter can only be chosen at import (kernels are decorated then); switching it on later would not
    # change kernels that were already compiled for the GPU, hence an error instead of a silent switch
    _first_problem(what, [
        (len(devices) != 1, f"all inputs must be on the same device, got {sorted(str(d) for d in devices)}"),
        (not _triton_runs_on(tensors[0]), f"tensors on {tensors[0].device} cannot run a Triton kernel; use CUDA "
         "tensors, or set TRITON_INTERPRET=1 before importing kernels.py to run the (slow) CPU interpreter")])


def _check_rmsnorm_inputs(x: torch.Tensor, weight: torch.Tensor) -> None:
    """RMSNormTriton's contract: float x (..., d), a float gain (d,), d small enough for one row in registers."""
    _first_problem("RMSNorm (Triton)", [
        (x.dtype not in _FLOAT_DTYPES, f"unsupported input dtype {x.dtype}; use float32, bfloat16 or float16"),
        (weight.dtype not in _FLOAT_DTYPES, f"unsupported weight dtype {weight.dtype}"),
        (x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1],
         f"weight shape {tuple(weight.shape)} must be (d,) with d = x.shape[-1] (x is {tuple(x.shape)})"),
        (x.dim() >= 1 and x.shape[-1] > RMSNORM_MAX_HIDDEN, f"hidden size {x.shape[-1]} > {RMSNORM_MAX_HIDDEN} is "
         "not supported (the single-pass kernel keeps a whole row in registers); use rmsnorm_torch")])
    _check_triton_device("RMSNorm (Triton)", x, weight)


def _check_attention_inputs(what: str, Q, K, V, is_causal, max_head_dim=None, min_head_dim=1):
    """Bad input -> a clear ValueError naming the problem: each of these would otherwise read out of bounds,
    broadcast silently or fail deep inside a kernel with a message about pointers and strides."""
    for name, t in (("Q", Q), ("K", K), ("V", V)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what}: {name} must be a (batch, seq, d) torch.Tensor, got {got}")
    d = Q.shape[2]
    _first_problem(what, [
        (not (Q.dtype == K.dtype == V.dtype), f"Q, K, V dtypes differ ({Q.dtype}, {K.dtype}, {V.dtype})"),
        (not (Q.device == K.device == V.device), f"Q, K, V devices differ ({Q.device}, {K.device}, {V.device})"),
        (K.shape != V.shape, f"K and V shapes differ ({tuple(K.shape)} vs {tuple(V.shape)})"),
        (Q.shape[0] != K.shape[0] or d != K.shape[2],
         f"Q {tuple(Q.shape)} and K {tuple(K.shape)} must share batch and head dim"),
        (Q.shape[1] == 0 or K.shape[1] == 0, f"empty sequence (Q {tuple(Q.shape)}, K {tuple(K.shape)})"),
        # causal with Nq != Nk is ambiguous (which keys does query 0 see?); model.py's backends define it as
        # "queries are the last Nq positions" and route it to sdpa, which implements exactly that
        (is_causal and Q.shape[1] != K.shape[1], f"is_causal needs n_queries == n_keys (got {Q.shape[1]} and "
         f"{K.shape[1]}); the model backends fall back to sdpa for KV-cache decoding"),
        (d < min_head_dim or (max_head_dim is not None and d > max_head_dim),
         f"head dim {d} unsupported (supported: {min_head_dim}..{max_head_dim})"),
        (not Q.is_floating_point(), f"inputs must be floating point, got {Q.dtype}")])


def _check_triton_attention_inputs(Q, K, V, is_causal):
    """FlashAttention2Triton's contract: the PyTorch version's, plus head dims 16..128 (one tile of Q and the
    accumulators must fit in registers), fp32/bf16/fp16, and a device Triton can run on."""
    _check_attention_inputs("FlashAttention2Triton", Q, K, V, is_causal, ATTN_MAX_HEAD_DIM, ATTN_MIN_HEAD_DIM)
    _first_problem("FlashAttention2Triton", [
        (Q.dtype not in _FLOAT_DTYPES, f"dtype {Q.dtype} unsupported (float32, bfloat16, float16)")])
    _check_triton_device("FlashAttention2Triton", Q, K, V)


def _check_int8_inputs(x, q, scale, triton: bool = True) -> None:
    """int8 matmul contract: float x (..., d_in), int8 q (d_out, d_in), float scale (d_out,), one device."""
    what = "int8_matmul_triton" if triton else "int8_matmul_torch"
    if q.dtype != torch.int8 or q.dim() != 2:    # first: the checks below read q's two dimensions
        raise ValueError(f"{what}: q must be an int8 matrix (d_out, d_in), got {q.dtype} {tuple(q.shape)}")
    _first_problem(what, [
        (scale.shape != (q.shape[0],) or not scale.is_floating_point(),
         f"scale must be float (d_out,) = ({q.shape[0]},), got {scale.dtype} {tuple(scale.shape)}"),
        (x.dim() < 1 or x.shape[-1] != q.shape[1], f"x {tuple(x.shape)} must end in d_in = {q.shape[1]}"),
        (not x.is_floating_point() or (triton and x.dtype not in _FLOAT_DTYPES), f"unsupported input dtype {x.dtype}")])
    if triton:
        _check_triton_device(what, x, q, scale)


# L is also what a caller would need to combine attention over several key blocks (e.g. split across devices):
# O = sum_b exp(L_b - L) O_b with L = logsumexp_b(L_b). Only the tests read it here.
def saved_logsumexp(O: torch.Tensor) -> torch.Tensor:
    """The L that FlashAttention2{PyTorch,Triton}.forward saved for the output O (for tests and inspection).
    Call it before backward(), which frees the saved tensors."""
    # saved_tensors follows save_for_backward's order (Q, K, V, O, L): index 4 is L
    if O.grad_fn is None or not hasattr(O.grad_fn, "saved_tensors"):
        raise ValueError("saved_logsumexp: O must be the output of a FlashAttention2 apply() with autograd on")
    return O.grad_fn.saved_tensors[4]


# ===== Appendix: benchmarks =====
# Timing tables (ours vs the peers, side by side in one run: `python kernels.py bench`), the correctness check at
# GPU shapes (`check`), and the measurements of `quantize` (bpb, bytes, decode speed).

MODES = ("fwd", "bwd", "fwd+bwd")
_INTERPRETER_NOTE = " (triton = CPU interpreter: plumbing check, NOT a speed number)"


def _sync(device):
    """Wait for queued GPU work: kernel launches return at once, so a timer must wait for the result."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 3, rep: int = 10,
            budget_s: float = 2.0) -> float:
    """Median wall time of fn() in ms. GPU: triton.testing.do_bench -- CUDA events around each call, the L2 cache
    flushed between calls (else a small tensor is served from L2 and a memory-bound kernel looks faster than it
    is), ~100 ms of repetitions. CPU: perf_counter, at most `rep` runs and ~budget_s seconds, so that slow peers
    (the Python-loop FA2) do not take minutes."""
    if device.type == "cuda" and HAVE_TRITON and not INTERPRET:
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    for _ in range(warmup):                  # first calls: allocator growth, lazy initialization, compilation
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < rep and (time.perf_counter() - start < budget_s or len(times) < 1):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]   # median: robust to the odd slow run


def _interleaved(timers: dict, rounds: int) -> dict:
    """{name: median of timers[name]()} over `rounds` rounds that each call every timer in turn: a change in the
    machine's load during the run hits every implementation alike."""
    times = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}   # medians


def _fmt(x):
    """A table cell: '-' for missing, strings as they are, numbers with 3 significant digits (timings are noisy
    in the third digit anyway)."""
    if x is None:
        return "-"
    return x if isinstance(x, str) else f"{x:.3g}" if x < 100 else f"{x:.1f}"


def _print_table(title, header, rows):
    """Print a markdown table (pastes into the README as it is); flushed so long runs show progress."""
    print(f"\n## {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    sys.stdout.flush()


def _out_of_time(deadline, what) -> bool:
    """True (and a note) once the --max-seconds budget is spent: no new shapes are started after it."""
    if deadline is not None and time.time() > deadline:
        print(f"(time budget reached; skipping {what})")
        return True
    return False


def _time_modes(make_inputs, forward, device):
    """Times forward, backward (given a forward graph), and both. Returns dict mode -> ms or an error string.
    The modes are timed separately because the kernels differ most in backward (recomputation, two passes)."""
    try:
        inputs = make_inputs()                    # fresh inputs for every implementation: same shapes and dtype
        out = {"fwd": time_ms(lambda: forward(*inputs), device)}
        # backward alone: one forward graph kept alive (retain_graph) and differentiated again and again
        y = forward(*inputs)
        dy = torch.randn_like(y)
        params = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def step(fresh: bool):   # bwd: the kept graph again; fwd+bwd (a training step): a new forward first
            for p in params:
                p.grad = None
            (forward(*inputs) if fresh else y).backward(dy, retain_graph=not fresh)

        out["bwd"] = time_ms(lambda: step(False), device)
        out["fwd+bwd"] = time_ms(lambda: step(True), device)
    except torch.cuda.OutOfMemoryError:  # e.g. naive attention at T = 16384: an "OOM" cell, the table goes on
        out = {m: "OOM" for m in MODES}
        torch.cuda.empty_cache()
    except RuntimeError as e:  # e.g. torch.compile without a working compiler
        out = {m: f"error: {str(e).splitlines()[0][:40]}" for m in MODES}
    return out


def _mode_table(title, label_header, cases, impls, ours, peers, rate, device, deadline):
    """Time every implementation on cases of (label cells, make_inputs, work per pass, names skipped) and print
    a row per case and pass: ms and rate (work per second) of each, then the speed-up of `ours` over each peer
    (peer time / our time: > 1 means ours is faster)."""
    rows = []
    for label, make, work, skipped in cases:
        if _out_of_time(deadline, f"the remaining shapes from {label[0]}"):
            break
        results = {name: {m: "skipped" for m in MODES} if name in skipped else _time_modes(make, fn, device)
                   for name, fn in impls.items()}
        for mode in MODES:
            row = list(label) + [mode]
            for name in impls:
                t = results[name][mode]
                row += [_fmt(t), _fmt(work[mode] / (t * 1e-3) if isinstance(t, float) else None)]
            for peer in peers:
                a, b = results[ours][mode], results[peer][mode]
                row.append(f"{b / a:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-")
            rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()              # the next (larger) shape should not inherit fragmentation
    header = list(label_header) + ["pass"] + [f"{n} {u}" for n in impls for u in ("ms", rate)]
    _print_table(title, header + [f"{ours} vs {p}" for p in peers], rows)
    return rows


def bench_rmsnorm(device, dtype, shapes, include_triton=True, ratios=True, deadline=None):
    """RMSNorm on (rows, hidden) shapes: Triton vs eager rmsnorm_torch vs torch.compile(rmsnorm_torch)."""
    try:  # compiled backward graphs may "donate" their buffers, which forbids retain_graph=True (used to time bwd)
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
    except (ImportError, AttributeError):
        pass
    # the peers: eager PyTorch (one kernel per op, ~5 passes over the tensor) and torch.compile of the same
    # function (inductor generates its own fused Triton kernel: the fair "compiler" baseline)
    impls = dict(triton=rmsnorm_triton) if include_triton else {}
    impls.update(eager=rmsnorm_torch, compile=torch.compile(rmsnorm_torch))
    peers = ("eager", "compile") if include_triton and ratios else ()
    elem = torch.tensor([], dtype=dtype).element_size()

    def make(n_rows, hidden):
        return (torch.randn(n_rows, hidden, device=device, dtype=dtype, requires_grad=True),
                torch.ones(hidden, device=device, dtype=torch.float32, requires_grad=True))
    cases = []
    for r, h in shapes:
        # GB/s of the unavoidable traffic (rows x hidden tensors read or written): fwd reads x, writes y; bwd reads
        # x, dy, writes dx. A kernel at the memory's speed reaches the card's HBM bandwidth here.
        work = {m: r * h * elem * n / 1e9 for m, n in zip(MODES, (2, 3, 5))}
        cases.append(([f"{r}x{h}"], functools.partial(make, r, h), work, ()))
    note = "" if ratios or not include_triton else _INTERPRETER_NOTE
    return _mode_table(f"RMSNorm, {str(dtype).replace('torch.', '')}, {device.type}{note}", ["rows x hidden"],
                       cases, impls, "triton", peers, "GB/s", device, deadline)


def _sdpa_flash(Q, K, V, is_causal):
    """PyTorch's SDPA on CUDA restricted to its flash backend (the named peer, not a fallback) -- which has no
    fp32 kernel, so fp32 inputs get the memory-efficient backend (the fastest fp32 one). CPU: what SDPA picks."""
    if Q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(Q.unsqueeze(1), K.unsqueeze(1), V.unsqueeze(1),
                                                  is_causal=is_causal).squeeze(1)
    return F.scaled_dot_product_attention(Q, K, V, is_causal=is_causal)


def attention_flops(batch, seq, d, causal, mode):
    """FA convention: forward = 2 matmuls of 2*N^2*d FLOPs (halved if causal); backward = 2.5x forward."""
    # (QK^T and PV are each N x N x d multiply-adds = 2 N^2 d FLOPs; backward has 5 such matmuls -- dV, dP, dQ,
    # dK and the recomputed S -- i.e. 2.5x; softmax and masking FLOPs are not counted, as in the FA papers)
    fwd = 4.0 * batch * seq * seq * d * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def bench_attention(device, configs, torch_fa2_max_seq=4096, naive_max_seq=16384, include_triton=True,
                    deadline=None, ratios=True):
    """Attention, causal: Triton FA2 vs our PyTorch FA2 vs naive vs SDPA (flash backend on GPU).
    configs: list of (batch, heads, seq, d, dtype); heads are folded into batch for the (batch, seq, d) API."""
    # the peers: our tiled PyTorch FA2 (same algorithm, Python loop), naive attention (materializes S and P) and
    # PyTorch's SDPA (its FlashAttention-2 CUDA kernel on a GPU: the production baseline)
    impls = dict(triton=lambda q, k, v: FlashAttention2Triton.apply(q, k, v, True)) if include_triton else {}
    impls.update(torch_fa2=lambda q, k, v: FlashAttention2PyTorch.apply(q, k, v, True, 256, 256),
                 naive=lambda q, k, v: attention_reference(q, k, v, True)[0],
                 sdpa=lambda q, k, v: _sdpa_flash(q, k, v, True))
    # ours: the Triton kernel; with the PyTorch variants only, how the tiled PyTorch FA2 compares to its peers
    if include_triton:
        ours, peers = "triton", ("torch_fa2", "naive", "sdpa") if ratios else ()
    else:
        ours, peers = "torch_fa2", ("naive", "sdpa")

    def make(n, seq, d, dtype):
        return tuple(torch.randn(n, seq, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    cases = []
    for batch, heads, seq, d, dtype in configs:
        # the Python-loop FA2 is skipped at long sequences (minutes per call); naive attention above 16K would
        # need 16 GiB of scores per 16 heads in fp32
        skipped = {name for name, limit in (("torch_fa2", torch_fa2_max_seq), ("naive", naive_max_seq))
                   if seq > limit}
        # TFLOP/s from the FA convention's count (attention_flops)
        work = {m: attention_flops(batch * heads, seq, d, True, m) / 1e12 for m in MODES}
        cases.append(([f"{batch}x{heads}x{seq}x{d}", str(dtype).replace("torch.", "")],
                      functools.partial(make, batch * heads, seq, d, dtype), work, skipped))
    note = "" if ratios or not include_triton else _INTERPRETER_NOTE
    return _mode_table(f"Causal attention, {device.type}{note}", ["BxHxTxd", "dtype"], cases, impls, ours, peers,
                       "TFLOP/s", device, deadline)


def bench_int8(device, shapes, deadline=None):
    """y = x @ W^T with W (N, K): int8 weight-only (Triton on GPU; the readable dequantize-then-matmul on both)
    vs torch's own matmul with W in fp32 and in bf16. shapes: (M rows, K, N). GB/s counts each path's weight
    bytes read (int8: 1 per weight + scales; bf16: 2; fp32: 4) -- the traffic that decides decoding speed."""
    gpu = device.type == "cuda"
    rows = []
    for m_rows, k, n in shapes:
        if _out_of_time(deadline, f"int8 shapes from {m_rows}x{k}x{n}"):
            break
        # W (N, K) fp32 with a Glorot-like scale, its int8 form, and the bf16 copy a bf16 inference model holds
        w = torch.randn(n, k, device=device) / math.sqrt(k)
        q, s = quantize_int8(w)
        w16 = w.to(torch.bfloat16)
        x32 = torch.randn(m_rows, k, device=device)
        x16 = x32.to(torch.bfloat16)
        # the activations stay in the dtype the float peer uses: bf16 on a GPU (as in inference), both on CPU
        impls = [("fp32 matmul", lambda: x32 @ w.t(), 4 * n * k), ("bf16 matmul", lambda: x16 @ w16.t(), 2 * n * k),
                 ("int8 readable", lambda: int8_matmul_torch(x16 if gpu else x32, q, s), n * k + 4 * n)]
        if gpu and HAVE_TRITON and not INTERPRET:
            impls.insert(0, ("int8 triton", lambda: int8_matmul_triton(x16, q, s), n * k + 4 * n))
        elif hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            # CPU: PyTorch's own fused int8 weight-only kernel (the op torchao / gpt-fast use), the same math as
            # ours: does a fused kernel change the CPU verdict?
            impls.append(("torch int8pack", lambda: torch.ops.aten._weight_int8pack_mm(x32, q, s), n * k + 4 * n))
        # interleaved repetitions on CPU, where the machine's load varies; one round on a GPU (do_bench repeats)
        ms = _interleaved({name: functools.partial(time_ms, fn, device, warmup=1, rep=3, budget_s=1.0)
                           for name, fn, _ in impls}, 1 if gpu else 5)
        # "ours" (Triton on a GPU, the readable path on CPU) against torch's fp32 and bf16 matmuls
        ours = "int8 triton" if "int8 triton" in ms else "int8 readable"
        row = [f"{m_rows}x{k}x{n}"]
        for name, _, nbytes in impls:
            row += [_fmt(ms[name]), _fmt(nbytes / (ms[name] * 1e-3) / 1e9)]
        rows.append(row + [f"{ms[peer] / ms[ours]:.2f}x" for peer in ("fp32 matmul", "bf16 matmul")])
    if rows:                 # (none when the time budget ran out before the first shape)
        header = ["MxKxN"] + [f"{name} {u}" for name, _, _ in impls for u in ("ms", "weight GB/s")]
        _print_table(f"int8 weight-only matmul, {device.type}", header + [f"{ours} vs fp32", f"{ours} vs bf16"],
                     rows)
    return rows


def _attention_sweep(full: bool):
    """The benchmark grid: causal, batch 1-8, seq 128..16384, head dims 16..128, bf16 and fp32; 16 heads.
    Batch shrinks as seq grows (same tokens per step). Default = the subset that fits the ~8 min GPU script."""
    # the longest sequence is where FA2's O(T) memory matters: naive attention needs 16 GiB of fp32 scores for
    # 16 heads there, and the Python-loop FA2 is skipped beyond 4096 (bench_attention)
    batch_for = {128: 8, 1024: 8, 4096: 2, 16384: 1}
    configs = [(1, 16, 16384, 64, torch.bfloat16)]  # the headline shape first, measured even if the sweep is cut
    for dtype in (torch.bfloat16, torch.float32):
        for seq, batch in batch_for.items():
            for d in [16, 32, 64, 128] if full else [64, 128]:
                c = (batch, 16, seq, d, dtype)
                if c not in configs and (full or dtype != torch.float32 or d == 64):
                    configs.append(c)
    return configs


def run_bench(args) -> None:
    """`python kernels.py bench`: the tables, ours next to the peers in one run (ratios, not absolute times, are
    what carries over between machines)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    deadline = time.time() + args.max_seconds if args.max_seconds else None
    torch.manual_seed(0)
    what = {args.what} if args.what != "all" else {"rmsnorm", "attention", "int8"}
    if device.type == "cuda":
        # GPU: the real comparison -- Triton kernels against eager PyTorch, torch.compile and SDPA's flash kernel
        print(f"# kernels.py bench on {machine_label()}, triton {triton.__version__ if HAVE_TRITON else 'missing'}")
        if "rmsnorm" in what:   # 2048 rows (e.g. batch 8 x 256 tokens) at the hidden sizes of small to large models
            for dtype in (torch.bfloat16, torch.float32):
                bench_rmsnorm(device, dtype, [(2048, h) for h in (1024, 2048, 4096, 8192, 16384)], deadline=deadline)
        if "attention" in what:   # causal attention over the sweep, the headline shape first
            bench_attention(device, _attention_sweep(args.full), deadline=deadline)
        if "int8" in what:
            # decoding (1 and 16 rows: memory-bound, where int8 should approach 2x bf16) and a prefill (4096 rows:
            # compute-bound, where converting int8 in the tile is overhead next to cuBLAS); 4096 / 14336 are
            # Llama-3-8B's d_model and d_ff
            shapes = [(1, 4096, 4096), (16, 4096, 4096), (1, 4096, 14336), (16, 14336, 4096), (4096, 4096, 4096)]
            bench_int8(device, shapes, deadline=deadline)
        return
    # CPU: the Triton kernels only run in the interpreter here (a correctness tool, ~1000x slower than anything
    # real), so the tables compare the PyTorch variants at CPU-sized shapes, plus one tiny interpreter row.
    print(f"# kernels.py bench on {machine_label()}: GPU benchmarks need CUDA. CPU tables below compare the PyTorch "
          "variants; Triton rows run in the interpreter and are NOT speed numbers.")
    if "rmsnorm" in what:
        # 2048 x 1024 fp32: big enough that per-call overhead does not dominate the eager-vs-compile comparison
        bench_rmsnorm(device, torch.float32, [(2048, 1024)], include_triton=False)
        if HAVE_TRITON:
            bench_rmsnorm(device, torch.float32, [(16, 256)], include_triton=True, ratios=False)
    if "attention" in what:
        # 4 heads x 512 tokens: naive attention's (512, 512) scores are small here, so this shows the Python
        # loop's cost, not FA2's memory advantage (which needs long sequences on a GPU)
        bench_attention(device, [(1, 4, 512, 64, torch.float32)], include_triton=False, deadline=deadline)
        if HAVE_TRITON:
            bench_attention(device, [(1, 1, 64, 32, torch.float32)], include_triton=True, ratios=False)
    if "int8" in what:
        # CPU: only the readable path exists (the interpreter is no speed number); decode-sized and batched rows
        bench_int8(device, [(1, 2048, 2048), (1, 2048, 8192), (64, 2048, 2048)], deadline=deadline)


# ---- correctness checks (`python kernels.py check`) ----
# On a GPU at real shapes; on CPU tiny shapes via the interpreter. Reference: float64 math (attention_reference /
# rmsnorm_torch / the int8 product) on the same device. Tolerances per element, |got - ref| <= atol * max|ref| +
# rtol * |ref|: fp32 2e-3 (looser than the CPU tests' 2e-5 because GPU sums over up to 4096 keys in a different
# order, and TF32 if PyTorch enables it); bf16 3e-2 (8 mantissa bits: each rounding is up to 2^-9 relative, and
# P / dS are rounded before matmuls); fp16 has 3 more mantissa bits than bf16, hence its tighter bound.
CHECK_TOL = {torch.float32: (2e-3, 2e-3), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _close(name, got, ref, dtype, failures):
    """Print one check line; append `name` to failures when got is not close to the float64 reference."""
    atol, rtol = CHECK_TOL[dtype]
    got, ref = got.double(), ref.double()
    scale = ref.abs().max().item()
    err = (got - ref).abs()
    bad = err > atol * max(scale, 1e-6) + rtol * ref.abs()
    ok = not bool(bad.any()) and bool(torch.isfinite(got).all())
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max abs err {err.max().item():.2e} (max |ref| {scale:.2e})")
    if not ok:
        failures.append(name)


def _check_attention(B, T, d, causal, tiles, dtype, device, failures):
    """O, L and dQ, dK, dV of FlashAttention2Triton against float64 naive attention on the same inputs."""
    print(f"attention B={B} T={T} d={d} causal={causal} {dtype} tiles={tiles or 'autotuned'}")
    q, k, v = (torch.randn(B, T, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    o = FlashAttention2Triton.apply(q, k, v, causal, tiles)
    L = saved_logsumexp(o)                                 # read before backward frees saved tensors
    do = torch.randn_like(o)                               # a random upstream gradient: all of dQ, dK, dV
    o.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref, L_ref = attention_reference(q64, k64, v64, causal)
    o_ref.backward(do.double())
    for name, got, ref in (("O", o, o_ref), ("L", L, L_ref), ("dQ", q.grad, q64.grad), ("dK", k.grad, k64.grad),
                           ("dV", v.grad, v64.grad)):
        _close(name, got, ref, dtype, failures)


def _check_rmsnorm(shape, dtype, device, failures):
    """y, dx and the gain gradient of the fused RMSNorm against float64 rmsnorm_torch."""
    print(f"rmsnorm {shape} {dtype}")
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    # a gain near 1 but not 1: a kernel that ignored it (or its gradient) would fail
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).requires_grad_()
    y = rmsnorm_triton(x, w, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = rmsnorm_torch(x64, w64, 1e-5)
    y_ref.backward(dy.double())
    for name, got, ref in (("y", y, y_ref), ("dx", x.grad, x64.grad), ("dweight", w.grad, w64.grad)):
        _close(name, got, ref, dtype, failures)


def run_check(args) -> int:
    """`python kernels.py check`: outputs, L and every gradient of the kernels vs float64 references; returns
    the exit status (1 if anything is off)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _require_triton("kernels.py check")
    failures: list = []
    torch.manual_seed(0)
    gpu = device.type == "cuda"
    if gpu:
        print(f"# kernels.py check on {torch.cuda.get_device_name()}")
        # (B, T, d, causal, tiles): tiles=None = the autotuned path users get; pinned tiles keep the number of
        # compiles (and the script's time) down. Sequence lengths that are not tile multiples, a single query,
        # a head dim that is not a power of two (96), RMSNorm rows of awkward widths (3000) and a 3-D input.
        attn_shapes = [(3, 1000, 64, True, None), (2, 1027, 128, True, None), (1, 4096, 64, True, None),
                       (2, 1, 64, False, (64, 64)), (2, 513, 16, True, (64, 64)), (1, 2048, 96, True, (64, 64)),
                       (4, 777, 32, False, (64, 32))]
        norm_shapes = [(4, 33, 4096), (2048, 1024), (1000, 16384), (7, 3000)]
    else:
        print("# kernels.py check: no CUDA device -- running the Triton kernels in the CPU interpreter on tiny "
              "shapes (the pytest suite covers more); run on a GPU for the real check")
        attn_shapes = [(1, 37, 32, True, None), (2, 20, 16, False, None)]
        norm_shapes = [(3, 5, 96)]
    # bf16 first (the dtype that matters on a GPU). fp32 on a GPU uses exact-fp32 ('ieee') dots, which compile
    # slowly (no tensor cores), so it gets fewer shapes, with tiles pinned to the config the autotuner also tries.
    for dtype in (torch.bfloat16, torch.float32):
        shapes = attn_shapes
        if gpu and dtype == torch.float32:
            shapes = [(3, 1000, 64, True, (64, 64)), (2, 513, 16, True, (64, 64)), (4, 777, 64, False, (64, 64))]
        for shape in shapes:
            _check_attention(*shape, dtype, device, failures)
        for shape in norm_shapes:
            _check_rmsnorm(shape, dtype, device, failures)
    # int8 weight-only matmul: the fused kernel against float64 math on the same int8 weights, at decode, ragged
    # (not tile multiples) and prefill sizes; the tolerances are the output dtype's (the int8 values are exact)
    int8_shapes = [(1, 4096, 4096), (16, 4096, 11008), (1000, 1027, 777), (4096, 2048, 2048)] if gpu \
        else [(3, 70, 37)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m_rows, k, n in int8_shapes:
            print(f"int8 matmul {m_rows}x{k}x{n} {dtype}")
            q, s = quantize_int8(torch.randn(n, k, device=device))
            x = torch.randn(m_rows, k, device=device, dtype=dtype)
            ref = (x.double() @ q.double().t()) * s.double()
            _close(f"int8 y {m_rows}x{k}x{n} {_TL_NAMES[dtype]}", int8_matmul_triton(x, q, s), ref, dtype, failures)
    # one verdict line at the end (the GPU script greps for it), failures named
    print(f"\n{'ALL CHECKS PASSED' if not failures else 'FAILED: ' + ', '.join(failures)}")
    return 1 if failures else 0


# ---- what `quantize` measures ----

def _model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's state dict, each storage counted once: tied weights and the int8 matrix a quantized
    embedding shares with the LM head are one storage (torch.save also writes a shared storage once)."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(seen.values())


def _decode_speed(models: dict, prompt: list, n_new: int, repeats: int, device) -> dict:
    """{name: (tokens/s, greedy ids)} from model.generate, the models timed in turn (_interleaved), median of
    `repeats` runs per model. Batch 1, greedy, KV cache on: the setting where decoding is memory-bound and weight
    bytes should matter. The first run also pays one-time costs (allocator growth, a GPU kernel compile)."""
    out = {}

    def run(name, m):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out[name] = M.generate(m, [prompt], n_new, temperature=0.0)[0]   # greedy: comparable outputs
        _sync(device)
        return time.perf_counter() - t0

    seconds = _interleaved({name: functools.partial(run, name, m) for name, m in models.items()}, repeats)
    return {name: (n_new / s, out[name]) for name, s in seconds.items()}


def _quantize_measure(models: dict, data, tcfg, args, device) -> tuple[dict, dict, int]:
    """Score every model on the run's validation split and time its greedy decoding: (evals, speed, n_new)."""
    # Both models are scored on the same validation tokens with the run's own evaluation settings (windows of
    # the context length, train.py's default stride T/2, the run's autocast dtype), so the bpb difference is the
    # quantization's cost alone.
    T_ctx = models["float"].config.context_length
    ev = dict(context_length=T_ctx, batch_size=tcfg.batch_size, device=device, dtype=tcfg.dtype,
              token_bytes=np.asarray(data.tokenizer.token_byte_lengths()), max_tokens=args.eval_tokens or None,
              stride=tcfg.eval_stride or max(T_ctx // 2, 1))
    val = data.val_tokens()
    print(f"evaluating both models on {min(len(val) - 1, args.eval_tokens or len(val)):,} validation tokens "
          f"({device}) ...")
    evals = {name: T.evaluate(m, val, **ev) for name, m in models.items()}
    # decode: greedy continuation of the split's first tokens, as long as the context allows
    prompt = [int(t) for t in val[:min(16, T_ctx // 2)]]
    n_new = min(args.decode_tokens, T_ctx - len(prompt))
    return evals, _decode_speed(models, prompt, n_new, args.repeats, device), n_new


# ===== Command line =====

def run_train(args, train_argv) -> int:
    """`python kernels.py train [train.py options]`: train.py's training command with the kernels swapped in
    (train.py cannot import kernels.py -- pipeline order -- so the switch lives here). Everything after the kernel
    options goes to train.py's parser unchanged; see `python train.py --help`."""
    # train.py's own parser and checks: its usage errors are one line and exit status 2 before any work
    parser = T.get_parser()
    parser.prog = "kernels.py train"
    try:
        cfg = T.config_from_args(parser.parse_args(train_argv))
    except ValueError as e:
        parser.error(str(e))
    device_note = "" if torch.cuda.is_available() else \
        " (no CUDA: Triton kernels run in the CPU interpreter -- correct but very slow; meant for GPUs)"
    attention = False if args.attention == "none" else args.attention
    print(f"kernels.py train: rmsnorm kernel {'on' if args.rmsnorm else 'off'}, attention {args.attention}"
          f"{device_note}")
    try:
        # the only difference from `python train.py`: the wrap_model hook swaps the kernels into the model
        hooks = T.TrainHooks(wrap_model=lambda m: use_kernels(m, rmsnorm=args.rmsnorm, attention=attention))
        T.train(cfg, hooks=hooks)
    except (ValueError, OSError, FloatingPointError) as e:   # errors with a message for the user: one line
        print(f"kernels.py train: error: {e}", file=sys.stderr)
        return 1
    return 0


def _quantize_setup(args, parser):
    """Every check of `kernels.py quantize` before any work: one-line usage errors (exit 2). Returns
    (checkpoint dict, train.TrainConfig, output path, device)."""
    # default output: next to the checkpoint (run/ckpt.pt -> run/ckpt.int8.pt), so the run's tokenizer/ folder
    # sits beside it too (model.find_tokenizer_dir looks there first)
    out = args.out or os.path.splitext(args.checkpoint)[0] + ".int8.pt"
    # never lose a file: the float checkpoint is never the output, an existing output needs --force, and the
    # write itself is atomic (save_quantized), so an interrupted run leaves the old file as it was
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        parser.error("--out must differ from --checkpoint (the float checkpoint is kept)")
    if os.path.isdir(out) or (os.path.exists(out) and not args.force):
        parser.error(f"--out {out} already exists" + ("" if os.path.isdir(out) else "; pass --force to replace it"))
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        parser.error(f"--out {out}: folder {os.path.dirname(os.path.abspath(out))} does not exist")
    # reading the checkpoint is part of checking --checkpoint: missing, empty, corrupt or foreign files are
    # model.read_checkpoint's one-line errors, reported as usage errors before anything is evaluated
    try:
        device = M.resolve_device(args.device)
        ckpt = M.read_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    # the run's training config says where its validation split lives (the data cache) and how it was scored
    fields = {f.name for f in dataclasses.fields(T.TrainConfig)}
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model_config"), dict):
        parser.error(f"--checkpoint {args.checkpoint} has no training/model config (not written by train.py)")
    tcfg = T.TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
    if args.data_dir:
        tcfg.data_dir = args.data_dir
    return ckpt, tcfg, out, device


def run_quantize(args, parser) -> int:
    """`python kernels.py quantize --checkpoint CKPT`: int8-quantize a train.py checkpoint; print bpb on the run's
    validation split, model bytes and greedy decode speed of both models side by side; write the quantized model."""
    ckpt, tcfg, out, device = _quantize_setup(args, parser)
    # Errors from here on are about the data or the files, not the command line: one line, exit status 1.
    # The quantized model is a deep copy, so the float model is evaluated and timed unchanged next to it.
    try:
        model = M.TransformerLM.from_config(ckpt["model_config"])
        M.load_model_state(model, ckpt, src=args.checkpoint)
        model = model.to(device).eval()
        # the validation split exactly as training built it (cached under data_dir: reused, not rebuilt)
        data = T.prepare_data(tcfg, log=lambda msg: print(f"data: {msg}"))
        M.check_tokenizer_matches(ckpt, data.tokenizer, args.checkpoint)
        qmodel = quantize_model(copy.deepcopy(model), lm_head=args.lm_head, embeddings=args.embeddings)
        models = {"float": model, "int8": qmodel}
        evals, speed, n_new = _quantize_measure(models, data, tcfg, args, device)
        save_quantized(qmodel, out, source_checkpoint=os.path.abspath(args.checkpoint), config=ckpt["config"],
                       iteration=ckpt.get("iteration"), tokenizer_dir=ckpt.get("tokenizer_dir"),
                       tokenizer_fingerprint=ckpt.get("tokenizer_fingerprint"))
    except (ValueError, OSError) as e:
        print(f"kernels.py quantize: error: {e}", file=sys.stderr)
        return 1
    # one table, float and int8 side by side; the last column is the difference (bpb, loss) or the ratio
    size = {name: _model_bytes(m) for name, m in models.items()}
    f, q = "float", "int8"
    rows = [[label, f"{evals[f][key]:.4f}", f"{evals[q][key]:.4f}", f"{evals[q][key] - evals[f][key]:+.5f}"]
            for label, key in (("val bpb", "bpb"), ("val loss (nats/token)", "loss"))]
    rows += [["model bytes (state dict)", f"{size[f]:,}", f"{size[q]:,}", f"{size[q] / size[f]:.2f}x"],
             [f"decode tokens/s ({n_new} greedy, batch 1)", f"{speed[f][0]:.1f}", f"{speed[q][0]:.1f}",
              f"{speed[q][0] / speed[f][0]:.2f}x"]]
    opts = f"lm_head {'int8' if args.lm_head else 'float'}, embeddings {'int8' if args.embeddings else 'float'}"
    _print_table(f"int8 weight-only quantization of {args.checkpoint} ({opts}; {machine_label()})",
                 ["", "float", "int8", "int8 vs float"], rows)
    same = sum(a == b for a, b in zip(speed[f][1], speed[q][1]))
    print(f"greedy tokens identical to the float model's: {same}/{n_new}")
    extra = " with its optimizer state" if ckpt.get("optimizer") else ""
    print(f"wrote {out} ({os.path.getsize(out):,} bytes; the float checkpoint file is "
          f"{os.path.getsize(args.checkpoint):,} bytes{extra})")
    return 0


# (subcommand, option, valid, what a valid value is): checked before any work (a benchmark or a compile can take
# minutes), each a one-line usage error with exit status 2
_OPTION_RULES = [
    ("bench", "max_seconds", lambda v: v >= 0, ">= 0 (0 = no limit)"),
    ("compile", "arch", lambda v: 70 <= v <= 120,
     "a CUDA compute capability x10 between 70 and 120 (80 = A100, 90 = H100)"),
    ("quantize", "eval_tokens", lambda v: v >= 0, ">= 0 (0 = the whole split)"),
    ("quantize", "decode_tokens", lambda v: v >= 1, ">= 1"),
    ("quantize", "repeats", lambda v: v >= 1, ">= 1"),
]


def get_parser() -> argparse.ArgumentParser:
    """`kernels.py bench | check | compile | train | quantize`. Usage errors are one line with exit status 2
    (OneLineParser, whose subparsers inherit it)."""
    p = OneLineParser(prog="kernels.py",
                      description="ScratchLM stage 4: Triton kernels (fused RMSNorm, FlashAttention-2).")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="time Triton kernels vs their peers (tables: ms, GB/s or TFLOP/s, ratios)")
    b.add_argument("what", nargs="?", default="all", choices=["all", "rmsnorm", "attention", "int8"],
                   help="which benchmark to run (default: all)")
    b.add_argument("--full", action="store_true", help="GPU only: the full attention grid (head dims 16/32/64/128, "
                   "fp32 for all); default is the subset that fits the ~8 minute GPU script")
    b.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop starting new benchmark shapes after this many seconds (0 = no limit)")
    # `compile` needs no GPU: Triton's compiler and its bundled ptxas run on any Linux machine
    c = sub.add_parser("compile", help="compile every kernel for a GPU architecture WITHOUT a GPU (Triton's compiler "
                                       "+ bundled ptxas) and report registers / spills / shared memory")
    c.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10: 80 = A100, 90 = H100 (default)")
    c.add_argument("--full", action="store_true",
                   help="every autotune config, head dims 16-128 (76 compiles: tens of minutes on 2 CPU cores)")
    c.add_argument("--only", action="append", default=[],
                   help="only kernels whose label contains this text, e.g. 'attn fwd d=64 bf16' (repeatable)")
    # `train` forwards every option it does not know to train.py's own parser (main uses parse_known_args)
    t = sub.add_parser("train", help="train.py's training run with the kernels swapped in (use_kernels); "
                                     "all further options go to train.py (see python train.py --help)")
    t.add_argument("--attention", default="flash_triton", choices=["flash_triton", "flash_torch", "none"],
                   help="attention backend for every layer (default flash_triton; falls back to sdpa where the "
                        "kernel does not apply, e.g. sliding windows)")
    t.add_argument("--rmsnorm", action=argparse.BooleanOptionalAction, default=True,
                   help="use the fused Triton RMSNorm (default on; --no-rmsnorm keeps model.RMSNorm)")
    sub.add_parser("check", help="correctness of the Triton kernels vs float64 references (GPU shapes on CUDA; "
                                 "tiny shapes in the interpreter on CPU); exit code 1 on failure")
    q = sub.add_parser("quantize", help="int8 weight-only quantization of a train.py checkpoint: bpb, model bytes "
                                        "and decode speed next to the float model; writes the quantized model")
    q.add_argument("--checkpoint", required=True, help="a train.py checkpoint (ckpt.pt)")
    q.add_argument("--out", help="where to write the quantized model (default: CKPT with .int8.pt)")
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    q.add_argument("--lm-head", action="store_true", help="quantize the LM head too (default: kept in float)")
    q.add_argument("--embeddings", action="store_true", help="quantize the token embeddings too (default: float)")
    q.add_argument("--eval-tokens", type=int, default=32768,
                   help="validation tokens to score both models on (0 = the whole split; default 32768)")
    q.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens per decode-speed run (default 64)")
    q.add_argument("--repeats", type=int, default=3, help="decode-speed runs per model, median (default 3)")
    q.add_argument("--data-dir", help="the run's data cache folder, if it moved (default: the one recorded)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    return p


def main(argv=None) -> int:
    """The command line; returns the exit status (2: usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    if argv and argv[0] == "train":  # kernel options first, the rest belongs to train.py's own parser
        args, train_argv = parser.parse_known_args(argv)
        return run_train(args, train_argv)
    args = parser.parse_args(argv)
    for cmd, dest, valid, rule in _OPTION_RULES:
        if args.cmd == cmd and not valid(getattr(args, dest)):
            parser.error(f"--{dest.replace('_', '-')} must be {rule}, got {getattr(args, dest)}")
    if args.cmd == "bench":
        run_bench(args)
        return 0
    if args.cmd == "quantize":
        return run_quantize(args, parser)
    return run_compile(args) if args.cmd == "compile" else run_check(args)


if __name__ == "__main__":
    sys.exit(main())
