"""
model.py -- Stage 2 of ScratchLM: the Transformer language model, its variants, and fast inference.

The problem
-----------
A language model assigns a probability to the next token given the ones before it, p(x_t | x_<t): a
function of the whole prefix that is cheap to train on many positions at once (so: no recurrence over
time) and that can still look arbitrarily far back.

The idea
--------
The decoder-only Transformer stacks identical blocks. Each block mixes information ACROSS positions
(causal self-attention: every token takes a weighted average of the values of earlier tokens, weighted
by how well its query matches their keys) and then WITHIN a position (a small feed-forward network);
a residual stream carries the sum of every block's contribution from the embeddings to the output head.
The core builds it from tensor primitives, in the order a reader needs them: ModelConfig; Linear,
Embedding, RMSNorm, SwiGLU, RoPE, softmax; attention with grouped-query heads, whose readable path
("naive") and fast one ("sdpa": torch's fused kernel, the default; kernels.py registers FlashAttention-2)
are one branch, proven equal by a test; the block and the LM; what it costs; generation with a KV cache.

The design choices the field argues about are ONE-WORD SWITCHES on `ModelConfig`, each implemented (and
documented) in a menu section after the core: other norms, positions and FFNs, other sequence mixers (MLA,
linear attention, Hyena), mixture of experts, dropout, sampling and faster decoding (nucleus sampling,
sliding windows, padded batches, speculative decoding). The defaults are the modern stack; the GPT-2
switches (learned positions, GELU, LayerNorm, biases, tied head) let `from_pretrained("gpt2")` load
OpenAI's weights into the same class.

What it costs
-------------
A forward pass costs about 2N FLOPs per token for N non-embedding parameters (a multiply and an add per
weight) plus the attention term 4 L d T_attended; training about 3x that (two backward matmuls per forward
one). Generation is memory-bound instead: each new token reads every weight once, hence the KV cache and
speculative decoding. `python model.py table` prints the numbers for GPT-2-sized configs.

Sources
-------
* Vaswani et al., "Attention Is All You Need" (2017), arXiv:1706.03762 -- sinusoidal positions, post-norm.
* Radford et al., GPT-2 (2019) -- pre-norm, learned positions, GELU (arXiv:1606.08415), tied embeddings.
* Xiong et al., "On Layer Normalization in the Transformer Architecture" (2020), arXiv:2002.04745 -- pre-norm.
* Zhang & Sennrich, "Root Mean Square Layer Normalization" (2019), arXiv:1910.07467.
* Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021), arXiv:2104.09864.
* Shazeer, "GLU Variants Improve Transformer" (2020), arXiv:2002.05202 -- SwiGLU.
* Shazeer, "One Write-Head is All You Need" (2019), arXiv:1911.02150 -- MQA; Ainslie et al., GQA, arXiv:2305.13245.
* Dehghani et al., "Scaling Vision Transformers to 22B Parameters" (2023), arXiv:2302.05442 -- QK-norm.
* Kaplan et al., "Scaling Laws for Neural Language Models" (2020), arXiv:2001.08361 -- 6N, non-embedding N.
* Stanford CS336 "Language Modeling from Scratch", assignment 1 -- the interface names used here.
The menus cite their own (tying, MLA, linear attention, Hyena, experts, dropout, top-p, speculative decoding).

Command line: `python model.py --help` (subcommands: table, generate, bench).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import tokenizer as tk

# ---- 1. The configuration: every switch in one place, validated on construction ----
# A model is fully described by a handful of sizes -- vocabulary V, context T, width d, layers L, heads H
# -- plus the design switches. Keeping them in one JSON-safe dataclass means a checkpoint can rebuild its
# model exactly, and a sweep (scaling.py) can vary one switch at a time. Shapes used throughout:
#     B batch, T sequence length, d = d_model, H heads, Hkv key/value heads, dh = d / H, V vocabulary.

@dataclasses.dataclass
class ModelConfig:
    """Everything needed to build a TransformerLM, JSON-safe (to_dict / from_dict). Each `name: text` line below
    is the --help of its flag (tokenizer.config_help); the menu switches' lines are in their menus (field_help).

    vocab_size: vocabulary size V
    context_length: longest sequence T (rows of the position tables)
    d_model: model width d, the size of the residual stream
    num_layers: number of transformer blocks L
    num_heads: attention heads H (head dimension dh = d / H)
    d_ff: feed-forward width (default: default_d_ff, 8/3 d for swiglu and 4 d for the others)
    rope_theta: RoPE base (pair j of a head turns by theta^(-2j/dh) radians per position)
    num_kv_heads: key/value heads: num_heads (MHA, the default), fewer (GQA) or 1 (MQA); the KV cache
        shrinks by num_heads / num_kv_heads at a small quality cost
    qk_norm: RMSNorm on each head's queries and keys before RoPE (bounds the attention logits)
    attn_impl: sdpa (torch's fused attention), naive (from scratch) or a registered backend (softmax mixers)
    norm_eps: the epsilon inside every norm's square root
    """

    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: Optional[int] = None
    rope_theta: float = 10000.0
    num_kv_heads: Optional[int] = None
    qk_norm: bool = False
    attn_impl: str = "sdpa"
    norm_eps: float = 1e-5
    norm: str = "rmsnorm"        # menu: other norms, positions and FFNs (FORM_HELP), down to tie_embeddings
    norm_position: str = "pre"
    position: str = "rope"
    ffn: str = "swiglu"
    bias: bool = False
    tie_embeddings: bool = False
    mixer: str = "attention"     # menu: other sequence mixers (MIXER_HELP), down to hyena_filter_dim
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    hyena_order: Optional[int] = None
    hyena_filter_dim: Optional[int] = None
    num_experts: int = 0         # menu: mixture of experts (MOE_HELP), down to moe_aux_weight
    experts_top_k: int = 2
    moe_aux_weight: float = 0.01
    dropout: float = 0.0         # menu: dropout (DROPOUT_HELP)
    attn_dropout: float = 0.0
    attention: str = "full"      # menu: sampling and faster decoding (DECODING_HELP): sliding windows
    window_size: Optional[int] = None

    @classmethod
    def field_help(cls) -> dict:
        """The menu switches' --help lines, one table per menu (tokenizer.config_help reads them)."""
        return {**FORM_HELP, **MIXER_HELP, **MOE_HELP, **DROPOUT_HELP, **DECODING_HELP}

    def __post_init__(self):
        _validate_config(self)  # every field checked once (plumbing: _CONFIG_RULES); None defaults made concrete

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def window(self) -> Optional[int]:
        return self.window_size if self.attention == "sliding" else None  # in tokens; None = full causal

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of to_dict; unknown or missing fields are a ValueError naming them."""
        _check_config_dict(cls, d)
        return cls(**d)


def default_d_ff(d_model: int, ffn: str) -> int:
    """The conventional hidden size of the feed-forward network. SwiGLU has THREE weight matrices, so to
    keep the 8d^2 parameters of a two-matrix 4d MLP it uses d_ff = 8/3 d (3 * 8/3 d * d = 8d^2), rounded to a
    multiple of 64 so the matmuls tile well; silu, relu and gelu use 4d. e.g. d 768: 2048; GPT-2's GELU 3072."""
    if ffn == "swiglu":
        return max(64, int(round(8 * d_model / 3 / 64)) * 64)
    return 4 * d_model


# ---- 2. The primitives, from scratch (CS336 names and conventions) ----
# Each layer is a few tensor operations on nn.Parameters (torch's own layers appear only in the tests and
# benchmark peers that check these). Weights use torch's [out, in] layout: a course solution's state dict loads.

class Linear(nn.Module):
    """y = x W^T (+ b) with W stored [out_features, in_features] (the PyTorch/CS336 layout).

    Init N(0, sigma^2) with sigma^2 = 2 / (in + out) (Glorot: keeps activation AND gradient variance
    roughly constant through the layer), truncated at +-3 sigma so no weight starts as an outlier.
    The CS336 layer has no bias; `bias=True` (GPT-2's layers) adds one, initialized to zero."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        # a registered None keeps `self.bias` readable while leaving no "bias" key in the state dict
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) @ (in, out) -> (..., out). matmul folds the leading dims into one big GEMM.
        y = x @ self.weight.t()
        return y if self.bias is None else y + self.bias  # bias (out,) broadcasts over the leading dims

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(nn.Module):
    """Token id -> row of a [num_embeddings, embedding_dim] matrix. Init N(0, 1) truncated at +-3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]  # (..., ) -> (..., embedding_dim)

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}"


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g.

    Computed in float32 and cast back: in bf16 the sum of squares over d_model elements loses precision
    (8 mantissa bits), and in fp16 x^2 overflows to inf once |x| > 256 (65504 is fp16's largest number),
    which would zero the whole row. eps sits INSIDE the square root: it bounds 1/rms by 1/sqrt(eps) for
    an all-near-zero row (eps outside would divide by ~0). Gain g initialized to 1 (identity).
    Zhang & Sennrich (2019), arXiv:1910.07467: dropping LayerNorm's mean subtraction loses nothing."""

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.to(torch.promote_types(in_dtype, torch.float32))                 # (..., d) fp32 (fp64 stays)
        inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # (..., 1) = 1/sqrt(ms+eps)
        return (x32 * inv_rms * self.weight.to(x32.dtype)).to(in_dtype)          # back to the input dtype

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, eps={self.eps}"


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / swish: x * sigmoid(x). Smooth, non-monotonic near 0, ~ReLU for large |x|."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """SwiGLU(x) = W2 (silu(W1 x) * W3 x): a gated MLP. The gate W3 x lets each hidden unit be switched
    by a second linear view of the input; empirically better than ReLU/GELU MLPs at equal parameters
    (Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, bias: bool = False):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype, bias=bias)  # gate branch, through silu
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype, bias=bias)  # back down to d_model
        self.w3 = Linear(d_model, d_ff, device=device, dtype=dtype, bias=bias)  # linear "value" branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu(self.w1(x)) * self.w3(x))  # (..., d) -> (..., d_ff) -> (..., d)


class RotaryPositionalEmbedding(nn.Module):
    """RoPE: rotate each adjacent pair (x[2j], x[2j+1]) of a query/key by the angle pos * theta^(-2j/d_k).

    Why it works: a rotation R(a) satisfies <R(a) q, R(b) k> = <q, R(b - a) k>, so the attention score
    between positions m and n depends only on the offset m - n -- relative position for free, with no
    parameters. Low pairs (j small) rotate fast (local order), high pairs slowly (long range).

    The rotation of each pair (a, b) = (x[2j], x[2j+1]) by angle t is
        a' = a cos t - b sin t,     b' = b cos t + a sin t
    which for the whole vector is  x' = x * COS + swap_pairs(x) * SIN  with swap_pairs(x) = (x1, x0, x3, x2, ..)
    COS = (cos t0, cos t0, cos t1, cos t1, ..) and SIN = (-sin t0, +sin t0, -sin t1, +sin t1, ..): two
    multiplies and an add over full-width tensors (fewer, larger ops than working on the halves).

    The COS/SIN tables are NON-persistent buffers (not weights: not in the state dict). One module serves
    every layer: the lookup for a positions tensor (any leading shape that broadcasts against x) is remembered."""

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None):
        super().__init__()
        if d_k % 2 != 0:
            raise ValueError(f"RoPE needs an even d_k, got {d_k}")
        self.theta, self.d_k, self.max_seq_len = theta, d_k, max_seq_len
        # pair j turns by theta^(-2j/d_k) radians per position: 1 rad for j = 0 down to ~1/theta for the
        # last pair (a wavelength of ~2 pi theta tokens); tables are built in float64, then stored float32
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=torch.float64) / d_k)  # (d_k/2,)
        angles = torch.arange(max_seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq  # (T, d_k/2)
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos_table", cos.repeat_interleave(2, dim=-1).float(), persistent=False)  # (T, d_k)
        self.register_buffer("sin_table", torch.stack((-sin, sin), dim=-1).flatten(-2).float(), persistent=False)
        self._memo = None  # the last lookup, which the other layers reuse (plumbing: _rope_rows)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor) -> torch.Tensor:
        # x: (..., T, d_k); token_positions: (..., T) broadcastable to x's leading dims.
        # Worked example, d_k = 2, position 1, theta 10000: angle 1 rad, so (1, 0) -> (cos 1, sin 1).
        cos, sin = _rope_rows(self, token_positions, x.dtype)            # (..., T, d_k): COS, SIN rows
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)          # (x1, x0, x3, x2, ...)
        return x * cos + swapped * sin


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x - max) / sum exp(x - max): subtracting the max changes nothing mathematically (it cancels)
    but keeps exp() <= 1, so huge logits do not overflow to inf/inf = NaN."""
    x_max = x.amax(dim=dim, keepdim=True)
    e = torch.exp(x - x_max)
    return e / e.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                                 mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k)) V for any leading batch dims. mask: True = may attend (broadcastable
    to (..., Tq, Tk)). Dividing by sqrt(d_k) keeps the scores' variance ~1 regardless of head size, so
    softmax does not saturate. Q: (..., Tq, d_k), K: (..., Tk, d_k), V: (..., Tk, d_v) -> (..., Tq, d_v).
    dropout_p > 0 drops attention probabilities (training only; callers pass 0 in eval)."""
    d_k = Q.shape[-1]
    scores = (Q @ K.transpose(-2, -1)) / math.sqrt(d_k)  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return dropout(softmax(scores, dim=-1), dropout_p) @ V


def causal_window_mask(Tq: int, Tk: int, window: Optional[int], device=None) -> torch.Tensor:
    """(Tq, Tk) bool, True = may attend. Queries are the LAST Tq of the Tk positions (so with a KV cache
    query i sits at absolute position Tk - Tq + i). Causal: key j <= query position; sliding window W:
    additionally query_pos - j < W (W keys including itself)."""
    # e.g. Tq = Tk = 3, no window: [[1,0,0], [1,1,0], [1,1,1]] -- the lower triangle
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=device)[None, :]           # (1, Tk)
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (q_pos - k_pos < window)
    return mask


# ---- 3. Attention: the readable path and the fast path, one branch ----

def attend(q, k, v, attn_mask: Optional[torch.Tensor], impl: str, window: Optional[int],
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) v, causal (and windowed), by ModelConfig.attn_impl. q (B, H, Tq, dh); k, v
    (B, H, Tk, dh), KV heads already expanded to H; the queries are the LAST Tq of the Tk positions (a KV-cache
    chunk needs no offset). attn_mask: an explicit (B, 1, Tq, Tk) mask (padded rows, a rolling buffer)."""
    if impl == "naive":  # the readable definition: materialize the (Tq, Tk) scores, our softmax
        mask = attn_mask if attn_mask is not None else causal_window_mask(q.shape[-2], k.shape[-2], window, q.device)
        return scaled_dot_product_attention(q, k, v, mask, dropout_p)
    if attn_mask is None and dropout_p == 0:  # the fast path: torch's fused kernel or a registered backend
        return get_attention_backend(impl)(q, k, v, causal=True, window=window)
    return masked_sdpa(q, k, v, attn_mask, impl, window, dropout_p)  # an explicit mask or dropout (plumbing)


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention with optional RoPE, grouped-query heads, QK-norm, sliding window.

    One matmul per projection computes all heads at once; heads are then a reshape, not a loop. RoPE turns
    queries and keys only (values carry content, not position). With num_kv_heads < num_heads each K/V head
    serves a group of num_heads/num_kv_heads query heads (GQA; 1 KV head = MQA), shrinking the KV cache.
    CS336 signatures: (d_model, num_heads) without position, (d_model, num_heads, max_seq_len, theta) with RoPE."""

    def __init__(self, d_model: int, num_heads: int, max_seq_len: Optional[int] = None,
                 theta: Optional[float] = None, *, num_kv_heads: Optional[int] = None, qk_norm: bool = False,
                 window_size: Optional[int] = None, attn_impl: str = "sdpa",
                 rope: Optional[RotaryPositionalEmbedding] = None, bias: bool = False, norm_eps: float = 1e-5,
                 attn_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_attention_args(d_model, num_heads, num_kv_heads, attn_impl)
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.window_size, self.attn_impl, self.attn_dropout = window_size, attn_impl, attn_dropout
        # W_q: d -> H*dh, W_k/W_v: d -> Hkv*dh (GQA stores fewer K/V heads), W_o: H*dh -> d
        self.q_proj = Linear(d_model, num_heads * self.head_dim, device=device, dtype=dtype, bias=bias)
        self.k_proj = Linear(d_model, num_kv_heads * self.head_dim, device=device, dtype=dtype, bias=bias)
        self.v_proj = Linear(d_model, num_kv_heads * self.head_dim, device=device, dtype=dtype, bias=bias)
        self.output_proj = Linear(num_heads * self.head_dim, d_model, device=device, dtype=dtype, bias=bias)
        # QK-norm (arXiv:2302.05442): RMSNorm over each head's dh features, so |q.k| stays bounded
        self.q_norm = RMSNorm(self.head_dim, eps=norm_eps, device=device, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=norm_eps, device=device, dtype=dtype) if qk_norm else None
        if rope is None and theta is not None and max_seq_len is not None:  # a lone layer makes its own table
            rope = RotaryPositionalEmbedding(theta, self.head_dim, max_seq_len, device=device)
        self.rope = rope  # (TransformerLM passes one module shared by all layers)

    def forward(self, x: torch.Tensor, token_positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache: Optional["KVCache"] = None,
                layer_idx: int = 0) -> torch.Tensor:
        """x (..., T, d) -> (..., T, d). token_positions: (T,) or per-row (B, 1, T) for RoPE; attn_mask: an explicit
        (B, 1, T, Tk) mask (padding, rolling cache); kv_cache + layer_idx: append this chunk, attend to all cached."""
        lead, T = x.shape[:-2], x.shape[-2]
        x = x.reshape(-1, T, self.d_model)  # (B, T, d): any leading dims folded into one batch dim
        B, H, Hkv, dh = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)    # (B, H, T, dh)
        k = self.k_proj(x).view(B, T, Hkv, dh).transpose(1, 2)  # (B, Hkv, T, dh)
        v = self.v_proj(x).view(B, T, Hkv, dh).transpose(1, 2)  # (B, Hkv, T, dh)
        if self.q_norm is not None:  # normalize each head's vectors before RoPE (rotation keeps the norm)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:  # rotate q and k by their positions; v is untouched (content, not place)
            pos = _head_positions(token_positions, lead, T, x.device)  # one position row per sequence
            q, k = self.rope(q, pos), self.rope(k, pos)
        if kv_cache is not None:  # append this chunk's keys/values; get back everything to attend to
            k, v = kv_cache.update(layer_idx, k, v)
        if Hkv != H:
            # GQA: query heads come in H/Hkv CONSECUTIVE groups, group g reading KV head g. So KV head g
            # must be copied to positions g*G .. g*G+G-1 (G = H/Hkv): repeat_interleave gives
            # (k0, k0, k1, k1); `repeat` would give (k0, k1, k0, k1) and silently pair the wrong heads.
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
        # softmax(q k^T / sqrt(dh)) v per head: (B, H, T, dh) x (B, H, Tk, dh) -> (B, H, T, dh), where Tk is
        # T, or the cached length plus T during generation
        out = attend(q, k, v, attn_mask, self.attn_impl, self.window_size, self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, T, H * dh)  # (B, T, d): heads side by side again
        return self.output_proj(out).reshape(*lead, T, self.d_model)

# ---- 4. The Transformer block and the language model ----
# Embed tokens -> L identical blocks on a residual stream x (B, T, d) -> a final norm -> the LM head (d -> V:
# a logit per vocabulary entry per position). Training reads all T positions' logits at once (teacher
# forcing); generation only the last. make_norm, make_block_ffn and make_mixer (the menus) build each
# switch's module; the defaults give the core's RMSNorm, SwiGLU and MultiHeadSelfAttention.

class TransformerBlock(nn.Module):
    """One layer. Pre-norm (default):  x = x + attn(ln1(x));  x = x + ffn(ln2(x)).
                  Post-norm:          x = ln1(x + attn(x));  x = ln2(x + ffn(x)).
    Pre-norm leaves an un-normalized identity path from input to output (gradients flow straight down the
    residual stream); post-norm normalizes the stream itself after every sublayer. CS336 signature
    TransformerBlock(d_model, num_heads, d_ff, max_seq_len, theta), any ModelConfig switch as a keyword."""

    def __init__(self, d_model: int, num_heads: int, d_ff: Optional[int] = None, max_seq_len: int = 2048,
                 theta: float = 10000.0, *, config: Optional[ModelConfig] = None,
                 rope: Optional[RotaryPositionalEmbedding] = None, device=None, dtype=None, **switches):
        super().__init__()
        cfg = config if config is not None else _config_from_block_args(d_model, num_heads, d_ff, max_seq_len,
                                                                         theta, switches)
        self.norm_position, self.dropout = cfg.norm_position, cfg.dropout
        self.ln1 = make_norm(cfg.norm, cfg.d_model, device, dtype, eps=cfg.norm_eps)
        self.attn = make_mixer(cfg, rope, device, dtype)
        self.ln2 = make_norm(cfg.norm, cfg.d_model, device, dtype, eps=cfg.norm_eps)
        self.ffn = make_block_ffn(cfg, device, dtype)  # SwiGLU, another MLP, or a mixture of experts

    def forward(self, x: torch.Tensor, token_positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache: Optional["KVCache"] = None,
                layer_idx: int = 0) -> torch.Tensor:
        # x: (B, T, d), the residual stream; each sublayer adds (or normalizes) its output, dropped out in training
        p = self.dropout if self.training else 0.0
        if self.norm_position == "pre":
            x = x + dropout(self.attn(self.ln1(x), token_positions, attn_mask, kv_cache, layer_idx), p)
            return x + dropout(self.ffn(self.ln2(x)), p)
        x = self.ln1(x + dropout(self.attn(x, token_positions, attn_mask, kv_cache, layer_idx), p))
        return self.ln2(x + dropout(self.ffn(x), p))


class TransformerLM(nn.Module):
    """token ids (B, T) -> logits (B, T, vocab_size). No softmax: the loss and the sampler want logits.

    TransformerLM(vocab_size, context_length, d_model, num_layers, num_heads, d_ff, rope_theta, **switches)
    (CS336's; switches: any other ModelConfig field) or from_config(cfg); `model.config` is the ModelConfig.
    After each forward `model.aux_loss` is the MoE balancing loss times moe_aux_weight (0.0 when dense), for
    trainers to add. Inputs are checked (ids in [0, V), length <= T); `model.validate_inputs = False` skips it."""

    def __init__(self, vocab_size: int, context_length: int, d_model: int, num_layers: int, num_heads: int,
                 d_ff: Optional[int] = None, rope_theta: float = 10000.0, *, device=None, dtype=None,
                 **switches):
        super().__init__()
        cfg = ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=d_model,
                          num_layers=num_layers, num_heads=num_heads, d_ff=d_ff, rope_theta=rope_theta, **switches)
        self.config, self.validate_inputs = cfg, True
        # Init: embeddings N(0, 1) (CS336), linear layers Glorot-normal; no depth-dependent rescaling of
        # the residual projections (GPT-2 scales them by 1/sqrt(2L)), which pre-norm tolerates at the
        # depths this project trains.
        self.token_embeddings = Embedding(cfg.vocab_size, cfg.d_model, device=device, dtype=dtype)
        # absolute positions (sinusoidal, learned: menu) are added to the embeddings; RoPE and NoPE add nothing
        self.position_embeddings = absolute_positions(cfg, device, dtype)
        # one RoPE table shared by every layer; MLA rotates only its qk_rope_head_dim decoupled dims
        rope_dim = cfg.qk_rope_head_dim if cfg.mixer == "mla" else cfg.head_dim
        rope = RotaryPositionalEmbedding(cfg.rope_theta, rope_dim, cfg.context_length, device=device) \
            if cfg.position == "rope" else None
        self.layers = nn.ModuleList([TransformerBlock(cfg.d_model, cfg.num_heads, config=cfg, rope=rope,
                                                      device=device, dtype=dtype) for _ in range(cfg.num_layers)])
        # post-norm blocks already end in a norm, so only pre-norm needs the final one
        pre = cfg.norm_position == "pre"
        self.ln_final = make_norm(cfg.norm, cfg.d_model, device, dtype, eps=cfg.norm_eps) if pre else nn.Identity()
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, device=device, dtype=dtype)
        if cfg.tie_embeddings:
            # One matrix for both ends. It keeps the LM head's init: N(0, 1) embedding rows would make the
            # initial logits' std sqrt(d_model) (one-hot-like, overconfident) instead of ~1.
            self.token_embeddings.weight = self.lm_head.weight
        self.aux_loss = torch.zeros((), device=device)

    @classmethod
    def from_config(cls, cfg: ModelConfig, device=None, dtype=None) -> "TransformerLM":
        """Build from a ModelConfig (or its to_dict() form, e.g. read from a checkpoint)."""
        d = (ModelConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg).to_dict()
        return cls(**d, device=device, dtype=dtype)

    def forward(self, token_ids: torch.Tensor, token_positions: Optional[torch.Tensor] = None, *,
                kv_cache: Optional["KVCache"] = None, pad_lens: Optional[torch.Tensor] = None,
                last_only: bool = False) -> torch.Tensor:
        """token_ids (B, T) or (T,) -> logits (B, T, V) (or (T, V)). token_positions: (T,) or (B, T), default
        0..T-1. kv_cache: a KVCache (see generate), the chunk goes after the cached tokens. pad_lens: (B,) LEFT
        padding per row (batched prompts of different lengths). last_only: logits of the last position only."""
        squeeze = token_ids.dim() == 1
        token_ids = token_ids[None] if squeeze else token_ids
        _check_token_ids(self, token_ids)
        T, cfg = token_ids.shape[1], self.config
        attn_mask = None
        if kv_cache is not None:    # the cache knows where this chunk goes and what it may attend to
            token_positions, attn_mask = kv_cache.begin(T)
        elif pad_lens is not None:  # left-padded rows (menu: sampling and faster decoding)
            token_positions, attn_mask = padded_positions_and_mask(pad_lens, T, cfg.window)
        _check_positions(self, T, token_positions)
        if token_positions is None:
            token_positions = torch.arange(T, device=token_ids.device)  # one tensor for all layers (RoPE memo)
        x = self.token_embeddings(token_ids)  # (B, T, d)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(token_positions).to(x.dtype)  # (T, d) or (B, T, d)
        x = dropout(x, cfg.dropout, self.training)                          # embedding dropout (nanoGPT's)
        # per-row positions (B, T) -> (B, 1, T), broadcast over heads; made once so RoPE's lookup is shared
        layer_positions = token_positions[:, None, :] if token_positions.dim() == 2 else token_positions
        for i, layer in enumerate(self.layers):
            x = layer(x, layer_positions, attn_mask, kv_cache, i)
        x = self.ln_final(x)
        logits = self.lm_head(x[:, -1:] if last_only else x)  # (B, T, V)
        self.aux_loss = moe_aux_loss(self)                    # 0 for dense models
        return logits[0] if squeeze else logits

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """torch's load_state_dict, but a mismatch raises StateDictMismatchError naming every missing,
        unexpected and wrongly-shaped key; compile/DDP prefixes ("_orig_mod.", "module.") are stripped."""
        state_dict = _strip_wrapper_prefixes(state_dict)
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

# ---- 5. Accounting: parameters and FLOPs ----
# What a configuration costs, from the config alone (no model built): train.py reports MFU (achieved FLOP/s
# over the hardware's peak), scaling.py picks sizes for a budget C ~ 6 N D (N parameters, D tokens; Kaplan et
# al., 2020). The other mixers' terms come from their menu; attended keys, activations and the
# training memory (memory_estimate: weights, gradients, optimizer state, activations) from plumbing.

def _mixer_params(c: ModelConfig) -> int:
    """Parameters of one layer's mixing sublayer."""
    if c.mixer in ("mla", "hyena"):
        return _other_mixer_params(c)
    d, H, dh = c.d_model, c.num_heads, c.head_dim
    # softmax and linear attention: q and output d x (H dh) each; k and v d x (Hkv dh) each (GQA shrinks them)
    attn = d * H * dh + 2 * d * c.num_kv_heads * dh + H * dh * d
    attn += (H * dh + 2 * c.num_kv_heads * dh + d) if c.bias else 0
    return attn + (2 * dh if c.qk_norm else 0)  # q_norm and k_norm gains, shared by all heads


def num_params(model_or_config, include_embeddings: bool = True) -> int:
    """Number of trainable parameters. Tied embedding/LM-head weights are counted once.

    include_embeddings=False drops the vocabulary matrices -- the token embedding and (when untied) the
    LM head -- and a learned position table, giving Kaplan et al.'s "non-embedding" N used in scaling
    laws. Given a ModelConfig it is computed analytically (no model built); given a module it counts
    tensors. Known answer: GPT-2 small (V 50257, T 1024, d 768, 12 layers, GPT-2 switches) = 124,439,808."""
    if isinstance(model_or_config, ModelConfig):
        c, d = model_or_config, model_or_config.d_model
        norm = {"rmsnorm": d, "layernorm": 2 * d, "none": 0}[c.norm]  # a gain per feature (+ a bias)
        n_in = 2 if c.ffn == "swiglu" else 1  # matrices d -> d_ff: SwiGLU's w1 and w3, the others' w1; then w2
        ffn = (n_in + 1) * d * c.d_ff + ((n_in * c.d_ff + d) if c.bias else 0)  # (+ a bias per output unit)
        if c.num_experts > 0:
            ffn = c.num_experts * ffn + d * c.num_experts  # experts + router
        total = c.num_layers * (_mixer_params(c) + ffn + 2 * norm) + (norm if c.norm_position == "pre" else 0)
        vocab = c.vocab_size * d * (1 if c.tie_embeddings else 2)
        vocab += c.context_length * d if c.position == "learned" else 0
        return total + (vocab if include_embeddings else 0)
    return _count_module_params(model_or_config, include_embeddings)  # a built model: count its tensors


def flops_breakdown(config: ModelConfig, seq_len: Optional[int] = None, causal_average: bool = True) -> dict:
    """Forward FLOPs per token by component (2mnp per matmul; norms, softmax, RoPE, activations ignored)."""
    c = config
    T = c.context_length if seq_len is None else seq_len
    d, dh, L = c.d_model, c.head_dim, c.num_layers
    n_keys = mean_attended_keys(T, c.window, causal_average)
    # one token is one row: a (1 x m) @ (m x p) product costs 2mp (a multiply and an add per weight)
    proj = 2 * d * (c.num_heads * dh) * 2 + 2 * d * (c.num_kv_heads * dh) * 2  # q, out + k, v
    # its query dots with n_keys keys (dh each) in every head, then the same count of value rows is summed
    scores = 2 * c.num_heads * dh * n_keys * 2                                  # Q K^T and A V
    if c.mixer != "attention":
        proj, scores = _mixer_flops(c, T, proj, scores)
    ffn = (6 if c.ffn == "swiglu" else 4) * d * c.d_ff  # 3 or 2 matrices of d x d_ff, 2 FLOPs each
    if c.num_experts > 0:
        ffn = 2 * d * c.num_experts + c.experts_top_k * ffn  # router + k experts per token
    return {"attention_projections": L * proj, "attention_scores": L * scores, "ffn": L * ffn,
            "lm_head": 2 * d * c.vocab_size}


def flops_per_token(config: ModelConfig, training: bool = False, seq_len: Optional[int] = None,
                    causal_average: bool = True) -> float:
    """FLOPs per token at sequence length seq_len (default context_length): flops_breakdown's matmuls (the
    embedding lookup is free). Training = 3x forward: two backward matmuls (wrt input, weight) per forward one."""
    forward = float(sum(flops_breakdown(config, seq_len, causal_average).values()))
    return 3.0 * forward if training else forward


# ---- 6. Inference: the KV cache, sampling, batched generation ----
# Generating n tokens naively reruns the model on the whole sequence n times (O(n^2) positions). But a causal
# model's keys and values of earlier positions never change: cache them (per layer, (B, Hkv, T, dh)) and each
# step processes ONE new position. Decoding is then bound by reading the weights, not by FLOPs (menu: speculative).

class KVCache:
    """Keys and values of every processed token, per layer, so each new token costs one position.

    Storage: (B, Hkv, max_len, dh) per layer, filled left to right (GQA caches only the Hkv heads); keys are
    cached AFTER RoPE, at their absolute positions. TransformerLM.forward calls begin(n) once -> (positions,
    mask or None), then update(layer, k, v) in each layer. KVCache(...) builds the menu's ExtendedKVCache when
    a switch needs more: a sliding window, left-padded rows, `slack` for speculative rollback, another mixer."""

    def __new__(cls, config: ModelConfig, batch_size: int, max_len: int, pad_lens: Optional[torch.Tensor] = None,
                slack: int = 0, device=None, dtype=torch.float32):
        padded = pad_lens is not None and bool((pad_lens > 0).any())
        if cls is KVCache and (config.window is not None or config.mixer != "attention" or padded or slack):
            cls = ExtendedKVCache
        return super().__new__(cls)

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, pad_lens: Optional[torch.Tensor] = None,
                 slack: int = 0, device=None, dtype=torch.float32):
        """Room for max_len tokens of batch_size rows; dtype should match the model's (no conversion per step).
        Memory: 2 (k and v) * L * B * Hkv * max_len * dh numbers, e.g. GPT-2 small at 1024 tokens in fp32:
        2 * 12 * 1 * 12 * 1024 * 64 * 4 bytes = 75 MB per sequence; GQA with Hkv = H/4 cuts it 4x."""
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.capacity, self.length, self.pad_lens = max_len, 0, None  # length: tokens cached so far

    def begin(self, n: int):
        """Make room for a chunk of n new tokens: their positions (n,) and no mask (plain causal order)."""
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache is full: {self.length} + {n} tokens exceed its capacity {self.capacity}")
        self.start, self.length = self.length, self.length + n
        return torch.arange(self.start, self.length, device=self.k[0].device), None

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Store this layer's new keys/values (B, Hkv, n, dh); return all cached so far (B, Hkv, length, dh)."""
        self.k[layer][:, :, self.start:self.length] = k_new
        self.v[layer][:, :, self.start:self.length] = v_new
        return self.k[layer][:, :, :self.length], self.v[layer][:, :, :self.length]


# Sampling from softmax(logits / temperature): temperature -> 0 approaches argmax (greedy), 1 is the model's own
# distribution, > 1 flattens it; top_p < 1 keeps only the likeliest tokens (menu: sampling and faster decoding).

def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution we actually sample from: softmax(logits / T), nucleus-filtered (top_p_filter). temperature == 0
    means greedy, returned as a one-hot distribution (so speculative decoding needs no special case)."""
    logits = logits.float()  # sampling in float32: bf16 logits would round small probabilities to 0
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return top_p_filter(softmax(logits / temperature, dim=-1), top_p)


def sample_from_probs(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row by inverse-CDF: the first index whose cumulative probability exceeds u ~ U[0,1).
    (B, V) -> (B,)."""
    # e.g. probs (0.1, 0.6, 0.3): cdf (0.1, 0.7, 1.0); u = 0.5 lands in (0.1, 0.7] -> token 1, which
    # happens for 60% of u. Scaling u by the last cdf entry tolerates rows that sum to 1 only roughly.
    u = torch.rand(probs.shape[:-1] + (1,), generator=generator, device=probs.device)
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1)
    return idx.clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def generate(model: TransformerLM, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             eos_id: Optional[int] = None, use_cache: bool = True,
             generator: Optional[torch.Generator] = None) -> list[list[int]]:
    """Autoregressive sampling. prompt_ids: list[int] or list[list[int]] (different lengths allowed).

    Returns one list of NEW token ids per prompt; a row stops after emitting eos_id (included as its last
    token). temperature 0 = greedy; top_p < 1 = nucleus sampling. Batched prompts are LEFT-padded, masked and
    positioned from 0 at each prompt's first token, so each row gets exactly the computation it would get
    alone. use_cache=True prefills a KVCache once, then feeds one token per step; use_cache=False recomputes
    the whole sequence every step (the reference the cache must match)."""
    cfg = model.config
    check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, min_new_tokens=0)
    prompts = _normalize_prompts(prompt_ids, cfg.vocab_size, max_new_tokens, {"the model's": cfg.context_length})
    device, dtype = _model_device_dtype(model)
    # prompts of different lengths are left-padded: every row ends at the same slot, so each step appends one
    # column for all rows (menu: sampling and faster decoding); pad_lens is None when no row is padded
    rows, pad_lens = left_pad(prompts, device)  # (B, longest), (B,)
    B, longest = rows.shape
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(cfg, B, longest + max_new_tokens, pad_lens, device=device, dtype=dtype) if use_cache else None
    seq = rows
    with eval_mode(model):  # no dropout while sampling; the model's own mode comes back afterwards
        for step in range(max_new_tokens):
            if use_cache:  # step 0 prefills the whole prompt; later steps feed only the newest token
                feed = rows if step == 0 else seq[:, -1:]
                logits = model(feed, kv_cache=cache, last_only=True)[:, -1]  # (B, V)
            else:
                logits = model(seq, pad_lens=pad_lens, last_only=True)[:, -1]
            next_ids = logits.argmax(-1) if temperature == 0 else \
                sample_from_probs(logits_to_probs(logits, temperature, top_p), generator)  # greedy, or sampled
            for b in range(B):  # finished rows keep computing (the batch stays rectangular) but record nothing
                if not done[b]:
                    out[b].append(int(next_ids[b]))
            if eos_id is not None:
                done |= next_ids == eos_id
                if bool(done.all()):
                    break
            seq = torch.cat([seq, next_ids[:, None]], dim=1)
    return out


# ===== Menu: other norms, positions and FFNs =====
# The other values of the norm, position and ffn switches: LayerNorm and no norm (make_norm, which builds
# every norm the blocks use), absolute positions added to the embeddings (TransformerLM.__init__ asks
# absolute_positions), and the classic two-matrix MLPs (make_ffn). GPT-2 is LayerNorm + learned positions + GELU.

def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    # norms compute in float32 for fp16/bf16 inputs, and keep float64 for float64 inputs (reference runs)
    return torch.promote_types(dtype, torch.float32)


class LayerNorm(nn.Module):
    """LayerNorm(x) = (x - mean) / sqrt(var + eps) * g + b (biased variance), in float32 like RMSNorm.

    The original Transformer's norm: it also removes the mean and adds a bias -- one more reduction and
    2x the parameters of RMSNorm, which works as well in practice (hence RMSNorm is the default).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.d_model, self.eps = d_model, eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(d_model, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x32 = x.to(_at_least_fp32(in_dtype))
        mean = x32.mean(dim=-1, keepdim=True)                 # (..., 1)
        var = (x32 - mean).pow(2).mean(dim=-1, keepdim=True)  # (..., 1) biased variance (divide by d, not d-1)
        y = (x32 - mean) * torch.rsqrt(var + self.eps)        # (..., d) zero mean, unit variance
        return (y * self.weight.to(y.dtype) + self.bias.to(y.dtype)).to(in_dtype)


def make_norm(kind: str, d_model: int, device=None, dtype=None, eps: float = 1e-5) -> nn.Module:
    """The `norm` switch: "rmsnorm" (the core's RMSNorm), "layernorm" or "none" (identity, no parameters)."""
    if kind == "rmsnorm":
        return RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
    if kind == "layernorm":
        return LayerNorm(d_model, eps=eps, device=device, dtype=dtype)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of {list(NORM_CHOICES)}")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's "gelu_new"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    The exact GELU is x * Phi(x) (Phi = the standard normal CDF): the input scaled by the probability
    that a unit Gaussian is below it. GPT-2 was trained with this tanh curve, which differs from the
    exact one by up to ~1e-3, so loading its weights needs exactly this formula (Hendrycks & Gimpel,
    arXiv:1606.08415)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


# The two-matrix MLP's activations. relu is max(0, x) written as a clamp (no Python branch per element).
_ACTIVATIONS = {"silu": silu, "relu": lambda h: torch.clamp_min(h, 0.0), "gelu": gelu}


class FeedForward(nn.Module):
    """The classic two-matrix MLP, W2 act(W1 x), with act = silu, relu or gelu (d_ff = 4 d by default).
    GPT-2's MLP is this with gelu and biases: its c_fc is our w1, its c_proj our w2."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "silu", device=None, dtype=None,
                 bias: bool = False):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"FeedForward activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.activation = activation
        self.w1 = Linear(d_model, d_ff, device=device, dtype=dtype, bias=bias)
        self.w2 = Linear(d_ff, d_model, device=device, dtype=dtype, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., d) -> (..., d_ff) -> act -> (..., d)
        return self.w2(_ACTIVATIONS[self.activation](self.w1(x)))


def make_ffn(kind: str, d_model: int, d_ff: int, device=None, dtype=None, bias: bool = False) -> nn.Module:
    """The `ffn` switch: "swiglu" (the core's SwiGLU), or a two-matrix MLP "silu" | "relu" | "gelu"."""
    if kind == "swiglu":
        return SwiGLU(d_model, d_ff, device=device, dtype=dtype, bias=bias)
    return FeedForward(d_model, d_ff, kind, device=device, dtype=dtype, bias=bias)


def sinusoidal_positions(max_seq_len: int, d_model: int) -> torch.Tensor:
    """The 2017 absolute encoding: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same). (T, d)"""
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq
    pe = torch.zeros(max_seq_len, d_model, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = angles.sin(), angles.cos()
    return pe.float()


class SinusoidalPositions(nn.Module):
    """positions -> their fixed sin/cos rows (a buffer: not a weight, not in the state dict)."""

    def __init__(self, max_seq_len: int, d_model: int, device=None):
        super().__init__()
        self.register_buffer("table", sinusoidal_positions(max_seq_len, d_model).to(device), persistent=False)

    def forward(self, token_positions: torch.Tensor) -> torch.Tensor:
        return self.table[token_positions]


def absolute_positions(cfg: ModelConfig, device=None, dtype=None) -> Optional[nn.Module]:
    """What `position` adds to the token embeddings: a fixed sin/cos table (sinusoidal), a trained
    [context_length, d] table (learned: GPT-2's wpe; it cannot run past context_length), or None (nope:
    the causal mask still leaks order, since token t can count how many tokens it sees)."""
    if cfg.position == "sinusoidal":
        return SinusoidalPositions(cfg.context_length, cfg.d_model, device)
    if cfg.position == "learned":
        return Embedding(cfg.context_length, cfg.d_model, device=device, dtype=dtype)
    return None


# The --help lines of this menu's switches (ModelConfig.field_help collects each menu's table). Tied
# embeddings: Press & Wolf, "Using the Output Embedding to Improve Language Models" (2016), arXiv:1608.05859.
FORM_HELP = {
    "norm": "rmsnorm (no mean, no bias: cheaper and as good), layernorm (the original) or none (an ablation)",
    "norm_position": "pre (x + f(norm(x)): an identity residual path, stable when deep) or post (norm(x + f(x)), "
                     "the 2017 original: slightly better when it trains, but needs warmup and is fragile when deep)",
    "position": "rope (rotate q, k: scores depend on offsets), sinusoidal or learned (absolute, added to the "
                "embeddings; learned is GPT-2's), nope (none: the causal mask alone leaks order)",
    "ffn": "swiglu (gated, 3 matrices), silu, relu or gelu (2 matrices; gelu is GPT-2's tanh approximation)",
    "bias": "a bias in every attention and FFN linear layer (GPT-2's; the LM head and MoE router have none)",
    "tie_embeddings": "share the embedding matrix with the LM head (saves V d parameters; GPT-2 does)",
}


# ===== Menu: other sequence mixers =====
# The `mixer` switch's other values -- multi-head latent attention, linear attention and Hyena -- each a
# drop-in for MultiHeadSelfAttention (same forward signature), built by make_mixer (after Hyena). Their
# decoding state lives in the ExtendedKVCache (the decoding menu); their costs plug into the accounting
# through _other_mixer_params, _mixer_flops and _mixer_activations below.

# ---- Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434): cache a small latent instead of K and V ----
# MHA caches 2 H dh numbers per token per layer; GQA/MQA shrink that by sharing K/V heads, at some quality
# cost. MLA keeps H distinct key/value heads but makes them LOW RANK: every head's keys and values are
# linear images of one latent c = RMSNorm(x W_dkv^T) of rank r (kv_lora_rank) << H dh:
#     k_h = [c W_uk,h^T | k_rope]   (dh - dr latent dims, then dr RoPE dims)      v_h = c W_uv,h^T (dh)
# RoPE cannot act on the latent part (a position-dependent rotation between W_uk and c would block the
# absorption below), so each head's last dr = qk_rope_head_dim query/key dims carry it, from ONE shared
# "decoupled" key k_rope = RoPE(x W_kr^T). The cache holds c and k_rope: r + dr numbers per token, e.g.
# d 768, 12 heads of 64, r 192, dr 32: 224 instead of MHA's 1536 (6.9x less; DeepSeek-V2: 93% less).
# Decoding never rebuilds k_h or v_h -- the absorbed form, with q_h = [q_nope,h | q_rope,h]:
#     q_nope,h . (W_uk,h c) = (W_uk,h^T q_nope,h) . c        W_uk absorbed into the query (r wide)
#     sum_s a_s (W_uv,h c_s) = W_uv,h (sum_s a_s c_s)         W_uv applied after the sum (into the output)
# i.e. MQA over the cached latents: one (r + dr)-wide key head and one r-wide value head for all H heads.
# Trade-off: each decoded token does more FLOPs (scores are r + dr wide, not dh), but reads 2 H dh / (r + dr)
# times fewer cache bytes, and decoding is bound by bytes. Training uses the plain form (per-head K and V
# materialized, any attention backend). Query/key heads keep width dh here (dh - dr latent + dr RoPE), so
# the backends need no change; DeepSeek-V2 adds the RoPE dims on top (128 + 64) and also compresses the
# queries (q_lora_rank: activation memory only, not done here).

class MultiHeadLatentAttention(nn.Module):
    """MLA as a drop-in for MultiHeadSelfAttention (same forward signature; the KV cache holds the latent)."""

    def __init__(self, cfg: ModelConfig, rope: Optional[RotaryPositionalEmbedding] = None, device=None, dtype=None):
        super().__init__()
        d, H, dh = cfg.d_model, cfg.num_heads, cfg.head_dim
        self.d_model, self.num_heads, self.head_dim = d, H, dh
        self.rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.window_size, self.attn_impl, self.attn_dropout = cfg.window, cfg.attn_impl, cfg.attn_dropout
        kw = dict(device=device, dtype=dtype)
        self.q_proj = Linear(d, H * dh, **kw)                             # per head [nope dh - dr | rope dr]
        self.kv_down_proj = Linear(d, self.rank, **kw)                    # W_dkv: d -> r, the cached latent
        self.kv_norm = RMSNorm(self.rank, eps=cfg.norm_eps, **kw)         # DeepSeek-V2 normalizes the latent
        self.k_up_proj = Linear(self.rank, H * (dh - self.rope_dim), **kw)  # W_uk: r -> H (dh - dr)
        self.v_up_proj = Linear(self.rank, H * dh, **kw)                  # W_uv: r -> H dh
        self.k_rope_proj = Linear(d, self.rope_dim, **kw) if self.rope_dim else None  # W_kr: d -> dr, shared
        self.output_proj = Linear(H * dh, d, **kw)
        if rope is None and cfg.position == "rope":  # a lone block (CS336 signature) makes its own table
            rope = RotaryPositionalEmbedding(cfg.rope_theta, self.rope_dim, cfg.context_length, device=device)
        self.rope = rope  # a RoPE table of width dr (TransformerLM shares one across layers)

    def forward(self, x: torch.Tensor, token_positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache: Optional["KVCache"] = None,
                layer_idx: int = 0) -> torch.Tensor:
        """x (..., T, d) -> (..., T, d). Without a cache: the plain form; with one: the absorbed form."""
        lead, T = x.shape[:-2], x.shape[-2]
        x = x.reshape(-1, T, self.d_model)
        B, H, dh, dr = x.shape[0], self.num_heads, self.head_dim, self.rope_dim
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)                 # (B, H, T, dh)
        q_nope, q_rope = q.split([dh - dr, dr], dim=-1)
        c = self.kv_norm(self.kv_down_proj(x))                               # (B, T, r): all a token leaves behind
        k_rope = self.k_rope_proj(x)[:, None] if dr else x.new_zeros(B, 1, T, 0)  # (B, 1, T, dr)
        if self.rope is not None:
            pos = _head_positions(token_positions, lead, T, x.device)
            q_rope, k_rope = self.rope(q_rope, pos), self.rope(k_rope, pos)
        if kv_cache is None:  # plain form: up-project every head's keys and values
            k_nope = self.k_up_proj(c).view(B, T, H, dh - dr).transpose(1, 2)          # (B, H, T, dh - dr)
            k = torch.cat([k_nope, k_rope.expand(B, H, T, dr)], dim=-1)                # (B, H, T, dh)
            v = self.v_up_proj(c).view(B, T, H, dh).transpose(1, 2)                    # (B, H, T, dh)
            out = attend(torch.cat([q_nope, q_rope], -1), k, v, attn_mask, self.attn_impl, self.window_size,
                         self.attn_dropout if self.training else 0.0)
        else:
            out = self.absorbed(q_nope, q_rope, *kv_cache.update(layer_idx, c[:, None], k_rope), attn_mask)
        return self.output_proj(out.transpose(1, 2).reshape(B, T, H * dh)).reshape(*lead, T, self.d_model)

    def absorbed(self, q_nope, q_rope, c_all, k_rope_all, attn_mask):
        """Attention straight on the cached latents. q_nope (B, H, T, dh - dr), q_rope (B, H, T, dr),
        c_all (B, 1, Tk, r), k_rope_all (B, 1, Tk, dr) -> (B, H, T, dh)."""
        H, dh, r = self.num_heads, self.head_dim, self.rank
        B, T, Tk = q_nope.shape[0], q_nope.shape[2], c_all.shape[2]
        w_uk = self.k_up_proj.weight.view(H, dh - self.rope_dim, r)
        w_uv = self.v_up_proj.weight.view(H, dh, r)
        # Per decoded token and head this costs 2 (dh - dr) r for the absorption plus 2 (r + dr) per cached
        # token for the scores, instead of rebuilding every cached token's k_h and v_h (2 r (2 dh - dr) per
        # token): the absorbed form is what makes a latent cache cheap to READ as well as to store.
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)                 # (B, H, T, r): W_uk absorbed
        q_abs = torch.cat([q_lat, q_rope], -1)                               # (B, H, T, r + dr)
        # scores must be scaled by 1/sqrt(dh) (the heads' true width), not 1/sqrt(r + dr) as the kernel does
        q_abs = q_abs * math.sqrt(q_abs.shape[-1] / dh)
        k_abs = torch.cat([c_all, k_rope_all], -1).expand(B, H, Tk, -1)      # one key head, shared
        mask = attn_mask if attn_mask is not None else causal_window_mask(T, Tk, self.window_size, q_abs.device)
        o_lat = attend(q_abs, k_abs, c_all.expand(B, H, Tk, r), mask, self.attn_impl, self.window_size)  # (B,H,T,r)
        return torch.einsum("bhtr,hdr->bhtd", o_lat, w_uv)                  # W_uv after the weighted sum

# ---- Linear attention (Katharopoulos et al., "Transformers are RNNs", arXiv:2006.16236) ----
# Replace exp(q.k) by a kernel phi(q).phi(k) with a positive feature map phi(x) = elu(x) + 1. Then
#     out_i = sum_{j<=i} (phi(q_i).phi(k_j)) v_j / sum_{j<=i} phi(q_i).phi(k_j)
#           = phi(q_i)^T S_i / phi(q_i)^T z_i,     S_i = sum_{j<=i} phi(k_j) v_j^T (dh x dh),  z_i = sum phi(k_j)
# so a token costs O(dh^2) however long the prefix: O(T) training and an O(1) decoding state per layer
# (S, z) instead of a growing KV cache -- an RNN. The price: the whole past is squeezed into a dh x dh
# matrix, so exact recall ("copy the token after the last X") degrades; softmax's sharp lookups are gone.
# Training uses the CHUNKED parallel form: within a chunk of C tokens the masked C x C products (like
# attention without softmax), across chunks the running (S, z); C = T is the fully parallel form, C = 1
# the recurrence itself. RoPE (RoFormer, arXiv:2104.09864, eq. 19) rotates phi(q), phi(k) in the
# numerator only; the denominator stays unrotated, hence positive.

LINEAR_ATTENTION_CHUNK = 64  # tokens per chunk: C x C intra-chunk products, one state update per chunk


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 = x + 1 for x > 0, exp(x) otherwise: positive, smooth, ~linear for large x."""
    return torch.where(x > 0, x + 1, torch.exp(x.clamp_max(0)))


def causal_linear_attention(q, k, v, q_rot=None, k_rot=None, state=None, chunk: int = LINEAR_ATTENTION_CHUNK,
                            eps: float = 1e-6):
    """Causal linear attention on feature-mapped q, k (B, H, T, dk) and v (B, H, T, dv), starting from
    state = (S (B, H, dk, dv), z (B, H, dk)) of the tokens before (None = empty). q_rot/k_rot: RoPE-rotated
    features for the numerator (default q, k). Returns out (B, H, T, dv) and the state after the last token."""
    q_rot, k_rot = (q, k) if q_rot is None else (q_rot, k_rot)
    B, H, _, dk = q.shape
    S = q.new_zeros(B, H, dk, v.shape[-1]) if state is None else state[0]
    z = q.new_zeros(B, H, dk) if state is None else state[1]
    outs = []
    # split, not slice: the backward of T/C slices would write each gradient into a fresh full-length zero
    # tensor (O(T^2 / C) traffic, 85% of the step at T = 4096); split's backward is one concatenation
    for qc, kc, qr, kr, vc in zip(*(t.split(chunk, dim=-2) for t in (q, k, q_rot, k_rot, v))):  # (B, H, C, .)
        # for query i of this chunk: numerator = qr_i^T S (all earlier chunks at once) + sum_{j<=i in chunk}
        # (qr_i . kr_j) v_j; denominator = q_i . z + sum_{j<=i} (q_i . k_j). Both are sums of positive
        # weights times values, like softmax attention's, only with phi(q).phi(k) in place of exp(q.k).
        a_num = (qr @ kr.transpose(-1, -2)).tril()                  # (B, H, C, C): j <= i inside the chunk
        a_den = a_num if q_rot is q else (qc @ kc.transpose(-1, -2)).tril()
        num = qr @ S + a_num @ vc                                   # earlier chunks + this chunk: (B, H, C, dv)
        den = (qc @ z[..., None]).squeeze(-1) + a_den.sum(-1)       # (B, H, C)
        outs.append(num / (den[..., None] + eps))
        S = S + kr.transpose(-1, -2) @ vc                           # the state after this chunk
        z = z + kc.sum(dim=-2)
    return torch.cat(outs, dim=-2), (S, z)


def _valid_keys(attn_mask: Optional[torch.Tensor], T: int) -> Optional[torch.Tensor]:
    """For the attention-free mixers: which of the last T slots are real tokens (not left padding),
    (B, T, 1) bool, read off the last query's row of the (B, 1, Tq, Tk) mask; None = all real."""
    return None if attn_mask is None else attn_mask[:, 0, -1, -T:, None]


class LinearAttention(MultiHeadSelfAttention):
    """Linear attention with MultiHeadSelfAttention's projections (same parameters, QK-norm, GQA) and a
    recurrent (S, z) state per layer in the KV cache instead of keys and values."""

    def forward(self, x: torch.Tensor, token_positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache: Optional["KVCache"] = None,
                layer_idx: int = 0) -> torch.Tensor:
        lead, T = x.shape[:-2], x.shape[-2]
        x = x.reshape(-1, T, self.d_model)
        B, H, Hkv, dh = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, dh).transpose(1, 2)                            # (B, H, T, dh)
        k = self.k_proj(x).view(B, T, Hkv, dh).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        v = self.v_proj(x).view(B, T, Hkv, dh).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = elu_feature_map(q), elu_feature_map(k)
        valid = _valid_keys(attn_mask, T)
        if valid is not None:  # left padding must add nothing to the state: zero its keys and values
            k, v = torch.where(valid[:, None], k, 0.0), torch.where(valid[:, None], v, 0.0)
        q_rot = k_rot = None
        if self.rope is not None:
            pos = _head_positions(token_positions, lead, T, x.device)
            q_rot, k_rot = self.rope(q, pos), self.rope(k, pos)
        state = kv_cache.state[layer_idx] if kv_cache is not None else None
        out, state = causal_linear_attention(q, k, v, q_rot, k_rot, state)
        if kv_cache is not None:
            kv_cache.state[layer_idx] = state
        return self.output_proj(out.transpose(1, 2).reshape(B, T, H * dh)).reshape(*lead, T, self.d_model)


# ---- Hyena (Poli et al., "Hyena Hierarchy", arXiv:2302.10866): long convolutions instead of attention ----
# Project x into N + 1 streams v, x_1..x_N (d channels each), then alternate a causal convolution with a
# filter as long as the sequence and an elementwise gate:  z_0 = v,  z_n = x_n * (h_n conv z_{n-1} + D_n z_{n-1}),
# output = W_o z_N. The filters are IMPLICIT: h_n(t) = MLP(positional features of t) * exp(-alpha_c t), so
# the parameter count does not grow with length and the decay window biases channels toward recent
# tokens at different rates. A length-T convolution by FFT costs O(T log T) (pad to 2T so the circular
# convolution does not wrap around), against attention's O(T^2): Hyena's case for long contexts.
# Trade-off: no content-based lookup (the filter is the same for every input; only the gates depend on
# it), so in-context recall lags attention at equal size. The paper's short depthwise convolution on the
# projections is left out here.
# Decoding caches the convolution INPUTS (N d numbers per token per layer, like a KV cache) and computes
# each new output as one dot product over the history, O(t d): recomputing the prefix would cost a whole
# forward pass per token, and a constant-size state needs the filters distilled into a recurrence
# (Massaroli et al., "Laughing Hyena Distillery", arXiv:2310.18780), not done here.

HYENA_POS_BANDS = 4  # sin/cos frequencies in the filter MLP's positional features (1 + 2 * 4 inputs)


def fft_causal_conv(u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_{s<=t} h[t-s] u[s] per channel along dim -2: u (..., T, C), h (T, C) -> (..., T, C).
    FFT in float32 or wider (no half-precision FFT on CPU)."""
    T, dt = u.shape[-2], _at_least_fp32(u.dtype)
    n = 2 * T  # zero-padded: the length-2T circular convolution equals the linear one on outputs 0..T-1
    # the FFTs run along the LAST dim (time moved there): 2x faster on CPU than strided FFTs along dim -2
    spectrum = torch.fft.rfft(u.to(dt).transpose(-1, -2), n=n) * torch.fft.rfft(h.to(dt).transpose(-1, -2), n=n)
    return torch.fft.irfft(spectrum, n=n)[..., :T].transpose(-1, -2).to(u.dtype)


class HyenaFilter(nn.Module):
    """The implicit filters: positions t -> h (order, T, d) via a small MLP with sin activations and a
    per-channel exponential decay (channel c falls to 1% after 30% .. 150% of the context)."""

    def __init__(self, d_model: int, order: int, hidden: int, context_length: int, device=None, dtype=None):
        super().__init__()
        self.d_model, self.order, self.context_length = d_model, order, context_length
        self.fc1 = Linear(1 + 2 * HYENA_POS_BANDS, hidden, device=device, dtype=dtype, bias=True)
        self.fc2 = Linear(hidden, hidden, device=device, dtype=dtype, bias=True)
        self.fc3 = Linear(hidden, order * d_model, device=device, dtype=dtype)
        rates = torch.linspace(math.log(100) / 0.3, math.log(100) / 1.5, d_model, device=device)
        self.register_buffer("decay_rate", rates.repeat(order), persistent=False)  # (order * d,), not a weight

    def forward(self, T: int) -> torch.Tensor:
        t = torch.arange(T, device=self.decay_rate.device, dtype=torch.float32)[:, None] / self.context_length
        angles = 2 * math.pi * t * torch.arange(1, HYENA_POS_BANDS + 1, device=t.device)  # (T, bands)
        feats = torch.cat([t, angles.cos(), angles.sin()], dim=-1).to(self.fc1.weight.dtype)  # (T, 1 + 2 bands)
        h = self.fc3(torch.sin(self.fc2(torch.sin(self.fc1(feats)))))                    # (T, order * d)
        h = h * torch.exp(-t * self.decay_rate).to(h.dtype)                               # decay window
        return h.view(T, self.order, self.d_model).transpose(0, 1)                       # (order, T, d)


class HyenaOperator(nn.Module):
    """Hyena as a drop-in for the attention sublayer (same forward signature; attn_mask only marks padding)."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        d, N = cfg.d_model, cfg.hyena_order
        self.d_model, self.order = d, N
        self.in_proj = Linear(d, (N + 1) * d, device=device, dtype=dtype, bias=cfg.bias)  # v, x_1 .. x_N
        self.filter = HyenaFilter(d, N, cfg.hyena_filter_dim, cfg.context_length, device, dtype)
        self.skip = nn.Parameter(torch.randn(N, d, device=device, dtype=dtype))  # D_n: the filter's t = 0 bypass
        self.output_proj = Linear(d, d, device=device, dtype=dtype, bias=cfg.bias)

    def forward(self, x: torch.Tensor, token_positions: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_cache: Optional["KVCache"] = None,
                layer_idx: int = 0) -> torch.Tensor:
        lead, T = x.shape[:-2], x.shape[-2]
        x = x.reshape(-1, T, self.d_model)
        z, *gates = self.in_proj(x).chunk(self.order + 1, dim=-1)  # N + 1 tensors (B, T, d)
        # Left padding: the filter only sees offsets t - s, so a row that starts at slot p with zeros before
        # it gives exactly the outputs it would give alone (shifted by p) -- no position bookkeeping needed.
        valid = _valid_keys(attn_mask, T)
        Tk = T if kv_cache is None else kv_cache.length            # convolution inputs seen so far
        if kv_cache is None:
            h = self.filter(T)                                     # (N, T, d)
        else:  # the filters depend on position only: one decode computes them once, for the whole cache
            if kv_cache.state[layer_idx] is None:
                kv_cache.state[layer_idx] = self.filter(kv_cache.capacity)
            h = kv_cache.state[layer_idx][:, :Tk]                  # (N, Tk, d)
        for n in range(self.order):
            if valid is not None:  # left padding enters every convolution as zeros (shift invariance does the rest)
                z = torch.where(valid, z, 0.0)
            u = z if kv_cache is None else kv_cache.history(layer_idx, n, z)  # (B, Tk, d)
            if T == 1 and kv_cache is not None:  # one new token: y_t = sum_s h[t - s] u[s], a dot product
                y = (u * h[n].flip(0)).sum(dim=1, keepdim=True)
            else:
                y = fft_causal_conv(u, h[n])[:, -T:]
            z = gates[n] * (y + self.skip[n] * z)
        return self.output_proj(z).reshape(*lead, T, self.d_model)


def make_mixer(cfg: ModelConfig, rope: Optional[RotaryPositionalEmbedding], device=None, dtype=None) -> nn.Module:
    """The `mixer` switch: "attention" (the core's MultiHeadSelfAttention: MHA/GQA/MQA), "mla", "hyena" or
    "linear" (linear attention reuses MultiHeadSelfAttention's projections; it has no window or dropout)."""
    if cfg.mixer == "mla":
        return MultiHeadLatentAttention(cfg, rope, device, dtype)
    if cfg.mixer == "hyena":
        return HyenaOperator(cfg, device, dtype)
    cls = LinearAttention if cfg.mixer == "linear" else MultiHeadSelfAttention
    return cls(cfg.d_model, cfg.num_heads, cfg.context_length if rope else None, cfg.rope_theta if rope else None,
               num_kv_heads=cfg.num_kv_heads, qk_norm=cfg.qk_norm, window_size=cfg.window, attn_impl=cfg.attn_impl,
               rope=rope, bias=cfg.bias, norm_eps=cfg.norm_eps, attn_dropout=cfg.attn_dropout, device=device,
               dtype=dtype)


def _other_mixer_params(c: ModelConfig) -> int:
    """Parameters of one MLA or Hyena sublayer. MLA trades K/V parameters for the latent's: with r = d/4
    and dr = dh/2 it has 2.625 d^2 + d dh / 2 against MHA's 4 d^2; Hyena's filter MLP does not grow with
    the context length (an explicit length-T filter per channel would be T d parameters)."""
    d, H, dh = c.d_model, c.num_heads, c.head_dim
    if c.mixer == "mla":
        r, dr = c.kv_lora_rank, c.qk_rope_head_dim
        # q d x H dh; latent d x r and its norm's r gains; up-projections r x H (dh - dr) keys and r x H dh
        # values; the shared RoPE key d x dr; output H dh x d
        return d * H * dh + d * r + r + r * H * (dh - dr) + r * H * dh + d * dr + H * dh * d
    N, f, feats = c.hyena_order, c.hyena_filter_dim, 1 + 2 * HYENA_POS_BANDS
    proj = d * (N + 1) * d + d * d + (((N + 1) * d + d) if c.bias else 0)  # in_proj, output_proj
    filt = feats * f + f + f * f + f + f * N * d                               # the filter MLP (2 biases)
    return proj + filt + N * d                                                 # + the D_n skips


def _mixer_flops(c: ModelConfig, T: int, proj: float, scores: float) -> tuple[float, float]:
    """(projection, mixing) forward FLOPs per token for the non-default mixers, given softmax attention's
    (proj, scores); flops_breakdown reports them as its two attention entries. Biases are not counted."""
    d, H, dh = c.d_model, c.num_heads, c.head_dim
    if c.mixer == "mla":  # its training form is softmax attention over dh-wide heads: the same scores
        r, dr = c.kv_lora_rank, c.qk_rope_head_dim
        return 2 * (d * H * dh + d * r + r * H * (dh - dr) + r * H * dh + d * dr + H * dh * d), scores
    if c.mixer == "linear":
        # the recurrent count per head: S += phi(k) v^T and phi(q)^T S (2 dh^2 each), z += phi(k), phi(q).z
        # and the division (dh + 2 dh + dh); the chunked training form groups the same sums differently
        return proj, H * (4 * dh * dh + 4 * dh)
    # hyena: in_proj and output_proj (the filter MLP runs once per position for the whole batch, like
    # RoPE's tables, and is left out). Mixing per order and channel: two real FFTs of length n = 2T
    # (~2.5 n log2 n each) and n/2 + 1 complex products (6 each) per sequence, spread over its T tokens;
    # then the skip (2) and the gate (1) per token. e.g. T = 4: n = 8, (120 + 30) / 4 + 3 = 40.5.
    N, n = c.hyena_order, 2 * T
    fft = 2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)
    return 2 * (d * (N + 1) * d + d * d), N * d * (fft / T + 3)


def _mixer_activations(c: ModelConfig, T: int, score_elems: int) -> int:
    """activation_elements_per_token's mixer term for the other mixers: MLA adds the latent, linear attention
    keeps its chunk products instead of scores, Hyena its N + 1 streams and spectra instead of q and k."""
    d, kv_dim = c.d_model, c.num_kv_heads * c.head_dim
    if c.mixer == "mla":     # q, latent before/after its norm, RoPE key, up-projected k and v, output
        return d + 2 * c.kv_lora_rank + c.qk_rope_head_dim + 2 * d + d + score_elems
    if c.mixer == "linear":  # q, k, v, phi(q), phi(k) (heads expanded), output, the two C x C chunk products
        return d + 2 * kv_dim + 2 * d + d + 2 * c.num_heads * min(T, LINEAR_ATTENTION_CHUNK)
    return (c.hyena_order + 1) * d + 5 * c.hyena_order * d + d  # N + 1 streams; per order 5 d; output


def _even_in(v, lo: int, hi: int) -> bool:
    return _pos_int(v) and v % 2 == 0 and lo <= v < hi


# The mixers' own rules, checked by ModelConfig after the core's (_CONFIG_RULES, in plumbing, ends with
# these). A field of another mixer would be silently ignored, so it is refused.
_MIXER_FIELDS = {"kv_lora_rank": "mla", "qk_rope_head_dim": "mla", "hyena_order": "hyena", "hyena_filter_dim": "hyena"}
_MIXER_RULES = [
    *[(lambda c, f=field, m=mixer: getattr(c, f) is None or c.mixer == m,
       f"ModelConfig.{field} is only used with mixer={mixer!r} (mixer={{c.mixer!r}})")
      for field, mixer in _MIXER_FIELDS.items()],
    (lambda c: c.mixer not in ("linear", "hyena") or c.attention != "sliding", "ModelConfig.attention='sliding' "
     "needs softmax attention; mixer={c.mixer!r} has no attention window (use mixer='attention' or 'mla')"),
    (lambda c: c.mixer != "mla" or c.num_kv_heads == c.num_heads, "ModelConfig.mixer='mla' does not combine with "
     "num_kv_heads={c.num_kv_heads!r}: every head has its own keys/values, made from the shared latent"),
    (lambda c: c.mixer != "mla" or not c.qk_norm, "ModelConfig.mixer='mla' does not combine with qk_norm="
     "{c.qk_norm!r}: a norm on the up-projected keys would block absorbing W_uk into the query"),
    (lambda c: c.mixer != "mla" or not c.bias, "ModelConfig.mixer='mla' does not combine with bias={c.bias!r}: "
     "biases on the up-projections would break the absorbed decoding form"),
    (lambda c: c.mixer != "mla" or _pos_int(c.kv_lora_rank),
     "ModelConfig.kv_lora_rank must be a positive integer, got {c.kv_lora_rank!r}"),
    (lambda c: c.mixer != "mla" or c.kv_lora_rank <= c.d_model, "ModelConfig.kv_lora_rank={c.kv_lora_rank} is "
     "larger than d_model={c.d_model} (a latent wider than the model compresses nothing)"),
    (lambda c: c.mixer != "mla" or c.position != "rope" or _even_in(c.qk_rope_head_dim, 2, c.head_dim),
     "ModelConfig.qk_rope_head_dim={c.qk_rope_head_dim!r} must be even and in [2, head_dim={dh}) with "
     "position='rope' (the rest of each query/key head comes from the latent)"),
    (lambda c: c.mixer != "mla" or c.position == "rope" or c.qk_rope_head_dim == 0,
     "ModelConfig.qk_rope_head_dim={c.qk_rope_head_dim!r} must be 0 with position={c.position!r} "
     "(the decoupled key exists only to carry RoPE)"),
    (lambda c: c.mixer != "hyena" or not (c.position == "rope" or c.qk_norm or c.num_kv_heads != c.num_heads),
     "ModelConfig.mixer='hyena' has no queries or keys: it does not combine with position='rope' (use 'nope': "
     "the long filters carry position), qk_norm or num_kv_heads (got position={c.position!r}, qk_norm="
     "{c.qk_norm}, num_kv_heads={c.num_kv_heads})"),
    *[(lambda c, f=field: c.mixer != "hyena" or _pos_int(getattr(c, f)),
       f"ModelConfig.{field} must be a positive integer, got {{c.{field}!r}}")
      for field in ("hyena_order", "hyena_filter_dim")],
    (lambda c: c.attn_dropout == 0 or c.mixer not in ("linear", "hyena"), "ModelConfig.attn_dropout applies to "
     "softmax attention probabilities; mixer={c.mixer!r} has none (use dropout)"),
]


# The --help lines of this menu's switches (ModelConfig.field_help collects each menu's table).
MIXER_HELP = {
    "mixer": "the sequence mixer of every block: attention (softmax: MHA/GQA/MQA), mla (multi-head latent "
             "attention), linear (elu+1 kernel attention) or hyena (long convolutions)",
    "kv_lora_rank": "mla: rank r of the cached latent (default d / 4; at most d)",
    "qk_rope_head_dim": "mla: RoPE dims per head, from one shared key (default dh / 2, even; 0 without RoPE)",
    "hyena_order": "hyena: number of convolution + gate steps N (default 2)",
    "hyena_filter_dim": "hyena: width of the implicit filters' MLP (default 64)",
}


# ===== Menu: mixture of experts =====
# num_experts > 0 replaces each block's FFN by a routed set of FFNs (TransformerBlock builds MoEFeedForward);
# TransformerLM.forward collects the load-balancing loss through moe_aux_loss, and the accounting counts
# k experts' FLOPs per token and all E experts' parameters. Switch Transformers arXiv:2101.03961, GShard
# arXiv:2006.16668, Mixtral arXiv:2401.04088.

class MoEFeedForward(nn.Module):
    """Mixture of experts: a router scores num_experts FFNs per token; each token uses its top-k.

    router probs p = softmax(x W_r^T) (float32). Gates: the top-k probs renormalized to sum to 1 when
    k > 1 (Mixtral); with k = 1 the raw top prob (Switch), so the router still gets a gradient.
    Load-balancing loss (Switch Transformer / GShard): aux = E * sum_i f_i * P_i, with f_i the fraction
    of token->expert assignments that went to expert i and P_i the mean router probability of expert i.
    It is 1.0 for perfectly uniform routing and grows when the router favours a few experts (f_i is not
    differentiable; P_i carries the gradient). Experts run on only their tokens (gather -> FFN ->
    scatter-add), so FLOPs per token are k FFNs, not E.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int, ffn: str = "swiglu",
                 device=None, dtype=None, bias: bool = False):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = Linear(d_model, num_experts, device=device, dtype=dtype)  # W_r: d -> E scores
        self.experts = nn.ModuleList([make_ffn(ffn, d_model, d_ff, device=device, dtype=dtype, bias=bias)
                                      for _ in range(num_experts)])
        self.aux_loss = None  # set by forward

    def route(self, x_flat: torch.Tensor):
        """(N, d) -> router probs (N, E) float32, gates (N, k) float32, expert ids (N, k)."""
        # the router in float32: small differences between experts' scores decide the routing
        probs = softmax(self.router(x_flat).float(), dim=-1)
        top_probs, top_idx = probs.topk(self.top_k, dim=-1)  # (N, k) each
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_probs
        return probs, gates, top_idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d): route, record the balancing loss in self.aux_loss, run each expert on
        its tokens only, and sum the gate-weighted results back per token."""
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])  # (N, d) with N = B * T: routing is per token, batch order is moot
        N, E, k = x_flat.shape[0], self.num_experts, self.top_k
        probs, gates, top_idx = self.route(x_flat)
        # load balancing: f_i from hard assignments, P_i from soft probabilities
        counts = torch.zeros(E, device=x.device, dtype=torch.float32)
        counts.index_add_(0, top_idx.reshape(-1), torch.ones(N * k, device=x.device))
        f = counts / (N * k)
        P = probs.mean(dim=0)
        self.aux_loss = E * (f * P).sum()
        # e.g. E = 4 experts, uniform routing: f_i = P_i = 1/4 -> 4 * 4 * (1/16) = 1; all tokens on one
        # expert with P = 1 there: 4 * 1 * 1 = 4 (the loss pushes the router back toward balance)
        # dispatch: every (token, slot) pair goes to its expert; results are scatter-added back
        out = torch.zeros_like(x_flat)
        flat_expert = top_idx.reshape(-1)                                   # (N*k,)
        flat_gate = gates.reshape(-1)                                       # (N*k,)
        flat_token = torch.arange(N, device=x.device).repeat_interleave(k)  # (N*k,)
        for e, expert in enumerate(self.experts):
            sel = (flat_expert == e).nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            tokens = flat_token[sel]
            y = expert(x_flat[tokens]) * flat_gate[sel, None].to(x.dtype)  # (n_e, d)
            out.index_add_(0, tokens, y)
        return out.reshape(shape)


def make_block_ffn(cfg: ModelConfig, device=None, dtype=None) -> nn.Module:
    """A block's FFN: the `ffn` switch's MLP (make_ffn), or num_experts of them behind a router."""
    if cfg.num_experts > 0:
        return MoEFeedForward(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.experts_top_k, cfg.ffn,
                              device=device, dtype=dtype, bias=cfg.bias)
    return make_ffn(cfg.ffn, cfg.d_model, cfg.d_ff, device, dtype, bias=cfg.bias)


def moe_aux_loss(model: "TransformerLM") -> torch.Tensor:
    """model.aux_loss: the mean over MoE layers of E * sum f_i P_i, times moe_aux_weight (0.0 when dense)."""
    moe = [layer.ffn.aux_loss for layer in model.layers if isinstance(layer.ffn, MoEFeedForward)]
    if not moe:
        return torch.zeros((), device=next(model.parameters()).device)  # any parameter (FSDP renames weights)
    return model.config.moe_aux_weight * torch.stack(moe).mean()


# the experts' rules, checked after the core's and the mixers' (see _CONFIG_RULES)
_MOE_RULES = [
    (lambda c: isinstance(c.num_experts, int) and not isinstance(c.num_experts, bool) and c.num_experts >= 0,
     "ModelConfig.num_experts must be an integer >= 0 (0 = dense), got {c.num_experts!r}"),
    (lambda c: c.num_experts == 0 or 1 <= c.experts_top_k <= c.num_experts,
     "ModelConfig.experts_top_k={c.experts_top_k} must be in 1..num_experts={c.num_experts}"),
    (lambda c: c.moe_aux_weight >= 0, "ModelConfig.moe_aux_weight must be >= 0, got {c.moe_aux_weight}"),
]


# The --help lines of this menu's switches (ModelConfig.field_help collects each menu's table).
MOE_HELP = {
    "num_experts": "0 = a dense FFN; > 0 = a mixture of experts (more parameters at the same FLOPs per token)",
    "experts_top_k": "experts each token is routed to (mixture of experts)",
    "moe_aux_weight": "weight of the load-balancing loss (mixture of experts)",
}

# ===== Menu: dropout =====
# The `dropout` and `attn_dropout` switches: TransformerLM.forward drops the embeddings, TransformerBlock each
# sublayer's output, and attend() the attention probabilities, all through dropout() below (training only).

def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout (Hinton et al. 2012, arXiv:1207.0580): zero each element with probability p and
    scale the survivors by 1/(1-p), so E[output] = x and evaluation needs no rescaling (it is the identity).
    The regularizer of the lecture's menu: a random sub-network per step cannot co-adapt; it costs noisier
    gradients, so single-epoch pretraining usually leaves it at 0 and small-data or fine-tuning runs use it."""
    if not training or p == 0:
        return x
    keep = torch.rand_like(x) >= p  # e.g. p = 0.5: half the elements survive, each doubled
    return x * keep / (1 - p)


# The --help lines of this menu's switches (ModelConfig.field_help collects each menu's table).
DROPOUT_HELP = {
    "dropout": "inverted dropout on the embeddings and on each sublayer's output (0 = off; training only)",
    "attn_dropout": "dropout on the attention probabilities (softmax mixers, naive or sdpa backend; 0 = off)",
}


# ===== Menu: sampling and faster decoding =====
# What generate and TransformerLM.forward use beyond temperature sampling and the plain KV cache: nucleus
# (top-p) filtering, left padding for batches of prompts of different lengths and its masks, the
# ExtendedKVCache that KVCache(...) becomes for sliding windows (a rolling buffer), rollback room, padding and
# the other mixers' decoding state, the cache sizes per mixer, and speculative decoding on top of generate:
# a small draft model guesses k tokens and the big model checks all k in ONE pass (as cheap as one step,
# since decoding is memory-bound), keeping the guesses its own distribution agrees with -- exactly, not
# approximately (Leviathan et al. 2022, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318).
# Sliding windows: Beltagy et al., "Longformer" (2020), arXiv:2004.05150.

def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019, arXiv:1904.09751: the long tail of unlikely tokens is where
    degenerate text comes from): keep the smallest set of most-likely tokens whose total mass reaches top_p,
    zero the rest, renormalize. A token is kept if the mass strictly before it (in sorted order) is
    < top_p, so the most likely token always survives. probs: (..., V)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)   # (..., V) largest first
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs     # exclusive prefix sum
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to vocabulary order
    filtered = probs * keep
    return filtered / filtered.sum(dim=-1, keepdim=True)


def left_pad(prompts: list[list[int]], device=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Prompts of different lengths as one LEFT-padded (B, longest) batch (pad id 0, masked out later) and each
    row's padding pad_lens (B,), or None when no row is padded. e.g. [5, 6, 7] and [8] -> rows [[5, 6, 7],
    [0, 0, 8]], pad_lens [0, 2]: both rows end at the same slot, so each decoding step appends one column."""
    longest = max(len(p) for p in prompts)
    rows = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    pad_lens = torch.tensor([longest - len(p) for p in prompts], device=device)
    return rows, pad_lens if bool((pad_lens > 0).any()) else None


def slot_attention_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, pad_lens: Optional[torch.Tensor],
                        window: Optional[int]) -> torch.Tensor:
    """(B, 1, Tq, Tk) bool mask from absolute slot indices (slot = index in the left-padded row).
    Key j is visible to query i if it is a real slot (>= 0), not padding (>= pad_len of the row), not
    in the future, and inside the window. Each query also sees its own slot, so rows of padding attend
    to themselves instead of to nothing (which would make softmax NaN); nobody ever reads their output."""
    qs, ks = q_slots[:, None], k_slots[None, :]  # (Tq, 1), (1, Tk)
    # e.g. rows [[5, 6, 7], [pad, pad, 8]] (pad_lens [0, 2]): row 1's query at slot 2 sees only slot 2
    allowed = (ks >= 0) & (ks <= qs)
    if window is not None:
        allowed = allowed & (qs - ks < window)
    if pad_lens is not None:
        allowed = allowed[None] & (ks[None] >= pad_lens[:, None, None])  # (B, Tq, Tk)
    else:
        allowed = allowed[None]
    allowed = allowed | (ks == qs)[None]
    return allowed[:, None]  # (B, 1, Tq, Tk): broadcast over heads


def padded_positions_and_mask(pad_lens: torch.Tensor, T: int, window: Optional[int]):
    """Positions (B, T) and mask (B, 1, T, T) of left-padded rows: row b's real tokens start at slot
    pad_lens[b] with position 0, and no query sees a padding slot."""
    slots = torch.arange(T, device=pad_lens.device)
    return (slots[None, :] - pad_lens[:, None]).clamp_min(0), slot_attention_mask(slots, slots, pad_lens, window)


def cache_entry_shape(config: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """(heads, width) of what the decoding cache stores per token per layer, for its k and v buffers."""
    c = config
    if c.mixer == "mla":
        return (1, c.kv_lora_rank), (1, c.qk_rope_head_dim)   # the latent, the shared RoPE key
    if c.mixer == "hyena":
        return (c.hyena_order, c.d_model), (0, 0)             # the convolution inputs of every order
    if c.mixer == "linear":
        return (0, 0), (0, 0)                                 # nothing per token (a fixed state instead)
    return (c.num_kv_heads, c.head_dim), (c.num_kv_heads, c.head_dim)


def kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """Decoding-cache bytes one more token adds, all layers: MHA 2 L H dh, GQA 2 L Hkv dh, MQA 2 L dh,
    MLA L (r + dr), Hyena L N d, linear attention 0 (its state is fixed: see decode_state_bytes).
    e.g. d 768, 12 layers, 12 heads of 64, bf16: MHA 36,864 bytes; MLA with r 192, dr 32: 5,376."""
    (kh, kw), (vh, vw) = cache_entry_shape(config)
    return config.num_layers * (kh * kw + vh * vw) * dtype_bytes


def decode_state_bytes(config: ModelConfig, seq_len: int, batch_size: int = 1, dtype_bytes: int = 2) -> int:
    """Bytes the decoding state of batch_size sequences of seq_len tokens needs: the per-token cache times
    the tokens it keeps (the window for sliding attention), plus linear attention's L H (dh^2 + dh) state.
    (Hyena's precomputed filters, L N d per position, are shared by the whole batch and not counted.)"""
    c = config
    kept = seq_len if c.window is None else min(seq_len, c.window)
    fixed = c.num_layers * c.num_heads * (c.head_dim ** 2 + c.head_dim) if c.mixer == "linear" else 0
    return batch_size * (kept * kv_cache_bytes_per_token(c, dtype_bytes) + fixed * dtype_bytes)


class ExtendedKVCache(KVCache):
    """The KVCache for everything beyond the plain contiguous case (KVCache(...) picks it by itself).

    Rows are left-padded to a common length, so every row writes the same slot each step; `slot_of`
    records which absolute slot each buffer entry holds (-1 = empty), and masks are built from it.
    Sliding-window models keep a ROLLING buffer: capacity = window + slack entries, slot s stored at
    s % capacity -- memory O(W) however long the generation. `slack` extra entries let speculative
    decoding write k draft tokens and roll them back (truncate) without losing keys still inside the window.
    The other mixers keep their own per-layer decoding state here (see cache_entry_shape):
      mla     k holds the latent (B, 1, capacity, r), v the RoPE key (B, 1, capacity, dr); update() as above
      hyena   k holds the convolution inputs of each order (B, N, capacity, d); history() appends one order;
              state[layer] keeps the layer's filters (N, capacity, d), computed once per cache
      linear  nothing per token: state[layer] = (S, z), the recurrent state (it cannot be rolled back)
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, pad_lens: Optional[torch.Tensor] = None,
                 slack: int = 0, device=None, dtype=torch.float32):
        self.window, self.mixer = config.window, config.mixer
        self.capacity = max(1, max_len if self.window is None else min(max_len, self.window + slack))
        (kh, kw), (vh, vw) = cache_entry_shape(config)  # (Hkv, dh) for softmax attention
        self.k = [torch.zeros((batch_size, kh, self.capacity, kw), device=device, dtype=dtype)
                  for _ in range(config.num_layers)]
        self.v = [torch.zeros((batch_size, vh, self.capacity, vw), device=device, dtype=dtype)
                  for _ in range(config.num_layers)]
        self.state = [None] * config.num_layers  # linear attention's (S, z), Hyena's filters, per layer
        self.slot_of = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        self.pad_lens = pad_lens if pad_lens is not None and bool((pad_lens > 0).any()) else None
        self.length, self._plan = 0, None  # slots consumed so far (the same for every row)
        self.wrapped = False    # once a rolling buffer wraps, entry index != slot, so masks are explicit

    def begin(self, n: int):
        """Plan the writes for a chunk of n new tokens; return (positions (B, n) or (n,), mask or None)."""
        # Three ways a chunk can go in: "contiguous" (the common case: append after what is cached),
        # "ring" (a sliding-window buffer that has filled: overwrite the oldest entries, which no query
        # can see any more), and "concat" (a chunk longer than the ring's spare room: attend to
        # [buffer, chunk] for this forward, then keep only the chunk's last entries).
        device = self.slot_of.device
        start, cap, W = self.length, self.capacity, self.window
        new_slots = torch.arange(start, start + n, device=device)
        if start + n <= cap and not self.wrapped:
            # contiguous: buffer entries 0..start+n-1 hold slots 0..start+n-1 in order
            mode = "contiguous"
            self.slot_of[start:start + n] = new_slots
            key_slots = self.slot_of[:start + n]
        elif W is not None and n <= cap - W + 1:
            # rolling, write first: entries overwritten are older than every query's window
            mode, self.wrapped = "ring", True
            self.slot_of[new_slots % cap] = new_slots
            key_slots = self.slot_of
        elif W is not None:
            # big chunk into a rolling buffer (long prompt): attend to old entries + the whole chunk,
            # then keep only the last `cap` of the chunk
            mode, self.wrapped = "concat", True
            key_slots = torch.cat([self.slot_of, new_slots])
            keep = new_slots[-cap:]
            self.slot_of[keep % cap] = keep
        else:
            raise ValueError(f"KV cache is full: {start} + {n} tokens exceed its capacity {cap}")
        self._plan = (mode, start, n, new_slots)
        self.start, self.length = start, start + n
        if self.pad_lens is None:
            positions = new_slots
            # the registered backend's contract holds: keys 0..start+n-1 in order, queries are the last n
            mask = None if mode == "contiguous" else slot_attention_mask(new_slots, key_slots, None, W)
        else:
            positions = (new_slots[None, :] - self.pad_lens[:, None]).clamp_min(0)
            mask = slot_attention_mask(new_slots, key_slots, self.pad_lens, W)
        return positions, mask

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor):
        """Store this layer's new keys/values (B, Hkv, n, dh); return the keys/values to attend to."""
        mode, start, n, new_slots = self._plan
        K, V = self.k[layer], self.v[layer]
        if mode == "contiguous":
            return super().update(layer, k_new, v_new)
        if mode == "ring":  # slot s lives in entry s % capacity; the mask (from slot_of) sorts out the order
            idx = new_slots % self.capacity
            K.index_copy_(2, idx, k_new)
            V.index_copy_(2, idx, v_new)
            return K, V
        # "concat": this layer attends to [old entries, whole chunk]; only the chunk's tail is kept
        k_all, v_all = torch.cat([K, k_new], dim=2), torch.cat([V, v_new], dim=2)
        keep = min(n, self.capacity)
        idx = new_slots[-keep:] % self.capacity
        K.index_copy_(2, idx, k_new[:, :, -keep:])
        V.index_copy_(2, idx, v_new[:, :, -keep:])
        return k_all, v_all

    def history(self, layer: int, index: int, new: torch.Tensor) -> torch.Tensor:
        """Hyena: store this chunk's order-`index` convolution inputs (B, n, d); return all so far (B, length, d)."""
        mode, start, n, _ = self._plan  # always "contiguous": Hyena has no window, so no rolling buffer
        buf = self.k[layer]
        buf[:, index, start:start + n] = new
        return buf[:, index, :start + n]

    def truncate(self, length: int) -> None:
        """Forget every slot >= length (speculative decoding's rollback of rejected draft tokens)."""
        if length > self.length:
            raise ValueError(f"cannot truncate a KV cache of length {self.length} to {length}")
        if self.mixer == "linear" and length < self.length:
            raise ValueError("a linear-attention state cannot be rolled back: (S, z) sums every token seen")
        # only the bookkeeping changes: the stale keys stay in the buffer, masked out (slot -1) until
        # the next tokens overwrite their entries, so a rollback costs nothing
        self.slot_of[self.slot_of >= length] = -1
        self.length = length


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft_tokens: torch.Tensor,
                       generator: Optional[torch.Generator] = None) -> tuple[list[int], int]:
    """Leviathan et al. (2023) accept/reject for ONE sequence.

    p: (k+1, V) target distributions (row i = the target's next-token distribution before draft token i;
    row k = after all k drafts), q: (k, V) draft distributions, draft_tokens: (k,) sampled from q.
    Draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection we
    sample from the residual norm(max(0, p_i - q_i)) and stop; if all k are accepted we sample a bonus
    token from p_k. Every emitted token is then distributed exactly as the target's sample would be:
    P(x) = q(x) min(1, p/q) + (1 - sum_y min(p, q)) * (p - q)+(x) / sum (p - q)+ = min(p, q) + (p - q)+ = p.
    Returns (emitted tokens, number of accepted draft tokens).
    """
    k = draft_tokens.shape[0]
    emitted = []
    for i in range(k):
        x = int(draft_tokens[i])
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * float(q[i, x]) < float(p[i, x]):  # u < p/q without dividing
            emitted.append(x)
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q: a rejection has probability 0; guard rounding
            residual = p[i]
        emitted.append(int(sample_from_probs(residual[None] / residual.sum(), generator)[0]))
        return emitted, i
    emitted.append(int(sample_from_probs(p[k][None], generator)[0]))
    return emitted, k


@torch.no_grad()
def speculative_generate(target: TransformerLM, draft: TransformerLM, prompt_ids, max_new_tokens: int, k: int = 4,
                         temperature: float = 1.0, top_p: float = 1.0, eos_id: Optional[int] = None,
                         generator: Optional[torch.Generator] = None, return_stats: bool = False):
    """Speculative decoding: the cheap draft proposes k tokens one by one; the target scores all of them
    in ONE forward pass (k+1 positions); speculative_accept keeps a prefix and emits one extra token, so
    each target pass yields 1..k+1 tokens while the output distribution stays exactly the target's
    (with temperature 0 the output equals the target's greedy output). Both models use KV caches and
    roll them back past rejected tokens. Batched prompts are decoded one after another (acceptance
    lengths differ per row). Returns the same as generate(); with return_stats=True returns
    (outputs, stats) where stats has acceptance_rate = accepted / proposed draft tokens, alpha = accepted /
    judged draft tokens (the per-token acceptance probability, see speculative_speedup), the number of
    target verification passes (target_forwards; the prompt prefill is counted apart as target_prefills),
    draft forward passes and tokens_per_target_forward = new tokens / verification passes.
    """
    prompts = _check_speculative_args(target, draft, prompt_ids, max_new_tokens, k, temperature, top_p)
    stats = {"proposed": 0, "accepted": 0, "rejected": 0, "target_prefills": 0, "target_forwards": 0,
             "draft_forwards": 0, "new_tokens": 0}
    with eval_mode(target, draft):
        outputs = [_speculative_one(target, draft, p, max_new_tokens, k, temperature, top_p, eos_id, generator,
                                    stats) for p in prompts]
    stats["acceptance_rate"] = stats["accepted"] / max(1, stats["proposed"])
    # each draft token the target judged was accepted or was the round's one rejection: the per-token
    # acceptance probability alpha of Leviathan et al. (later drafts of a rejected round are never judged)
    stats["alpha"] = stats["accepted"] / max(1, stats["accepted"] + stats["rejected"])
    stats["tokens_per_target_forward"] = stats["new_tokens"] / max(1, stats["target_forwards"])
    return (outputs, stats) if return_stats else outputs


def _speculative_one(target, draft, prompt, max_new_tokens, k, temperature, top_p, eos_id, generator, stats):
    """One prompt's speculative loop. Each round: the draft proposes k tokens one at a time (k cheap
    passes, extending its own cache); the target scores [last committed token, d_1..d_k] in ONE pass,
    giving k + 1 next-token distributions; speculative_accept keeps an accepted prefix plus one token of
    its own; both caches are truncated back to the committed sequence. E.g. k = 4 with drafts
    accepted 2 times out of 4 emits 3 tokens for one target pass."""
    device, t_dtype = _model_device_dtype(target)
    _, d_dtype = _model_device_dtype(draft)
    total = len(prompt) + max_new_tokens
    t_cache = KVCache(target.config, 1, total, slack=k + 1, device=device, dtype=t_dtype)
    d_cache = KVCache(draft.config, 1, total, slack=k + 1, device=device, dtype=d_dtype)
    seq = list(prompt)  # everything committed so far
    out: list[int] = []
    if max_new_tokens == 0:
        return out
    # Invariant between rounds: the target cache holds seq[:-1]; seq[-1] is fed with the drafts.
    if len(seq) > 1:
        target(torch.tensor([seq[:-1]], device=device), kv_cache=t_cache, last_only=True)
        stats["target_prefills"] += 1
    while len(out) < max_new_tokens:
        k_eff = min(k, max_new_tokens - len(out) - 1)  # never draft past the budget
        drafts, q_rows = [], []  # proposed tokens and the draft distributions they were drawn from
        # the draft catches up on committed tokens it has not cached yet, then extends by its own guesses
        for _ in range(k_eff):
            feed = torch.tensor([seq[d_cache.length:] + drafts[-1:] if drafts else seq[d_cache.length:]],
                                device=device)
            q_i = logits_to_probs(draft(feed, kv_cache=d_cache, last_only=True)[0, -1], temperature, top_p)
            stats["draft_forwards"] += 1
            x = int(q_i.argmax()) if temperature == 0 else int(sample_from_probs(q_i[None], generator)[0])
            drafts.append(x)
            q_rows.append(q_i)
        # the target scores [last committed token, d_1, ..., d_k] in one pass -> k+1 distributions
        feed = torch.tensor([seq[-1:] + drafts], device=device)
        p = logits_to_probs(target(feed, kv_cache=t_cache)[0], temperature, top_p)  # (k_eff+1, V)
        stats["target_forwards"] += 1
        q = torch.stack(q_rows) if q_rows else p.new_zeros(0, p.shape[-1])
        emitted, n_acc = speculative_accept(p, q, torch.tensor(drafts, dtype=torch.long), generator)
        stats["proposed"] += k_eff
        stats["accepted"] += n_acc
        stats["rejected"] += int(n_acc < k_eff)  # a round ends at its first rejection, if it has one
        # roll back: keep the cached keys of the committed tokens only
        seq_before = len(seq)
        if eos_id is not None and eos_id in emitted:
            emitted = emitted[:emitted.index(eos_id) + 1]
        seq.extend(emitted)
        out.extend(emitted)
        stats["new_tokens"] += len(emitted)
        t_cache.truncate(len(seq) - 1)
        d_cache.truncate(min(d_cache.length, seq_before + n_acc))
        if eos_id is not None and out and out[-1] == eos_id:
            break
    return out[:max_new_tokens]


def _check_speculative_args(target, draft, prompt_ids, max_new_tokens, k, temperature, top_p) -> list[list[int]]:
    """speculative_generate's checks: one shared vocabulary, k >= 1, sampling ranges, prompts that fit
    both models' contexts. Returns the prompts as a list of lists."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab_size "
                         f"{target.config.vocab_size}: the models must share a tokenizer")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k (draft tokens per step) must be a positive integer, got {k!r}")
    for model, name in ((target, "target"), (draft, "draft")):
        if model.config.mixer == "linear":  # rejected drafts must be rolled back, which a running sum cannot do
            raise ValueError(f"speculative decoding needs a cache that can be rolled back; the {name} model's "
                             "mixer='linear' keeps a recurrent state that cannot")
    check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, min_new_tokens=0)
    # both caches hold the whole sequence, so a draft with a shorter context limits the pair as well
    contexts = {f"the {name} model's": m.config.context_length for name, m in (("target", target), ("draft", draft))}
    return _normalize_prompts(prompt_ids, target.config.vocab_size, max_new_tokens, contexts)


# The --help lines of this menu's switches (ModelConfig.field_help collects each menu's table).
DECODING_HELP = {
    "attention": "full (every earlier token) or sliding (the last window_size: O(T W) and a W-entry KV cache)",
    "window_size": "the sliding window in tokens, the query's own included",
}


# ===== Appendix: plumbing =====
# Everything a user of the model needs around it but that teaches nothing about Transformers. Later
# stages import these from here (each is defined once, in the leftmost file that needs it):
#     load_model_state, check_state_dict   strict weight loading; errors name every key that does not fit
#     resolve_device                       "auto" / "cuda:1" / ... checked to exist, before any work
#     register/get/set_attention_backend   the backend registry attend() looks up (kernels.py adds its own)
#     _rope_rows, _head_positions          RoPE's shared table lookup and per-row positions
#     memory_estimate                      training memory: weights, gradients, optimizer state, activations
#     _check_token_ids and friends         the checks behind TransformerLM.forward and generate; eval_mode
#     sample_windows                       random (x, y) training windows of a token array
#     download, sha256_file                resumable, verified, atomic downloads
#     read_checkpoint, load_checkpoint_model   one reader, one clear error per way a file can be bad
#     read_safetensors, from_pretrained    OpenAI's GPT-2 weights from the Hugging Face Hub
#     sample_from_checkpoint               load + tokenize + generate + decode (model.py generate and
#                                          train.py sample both call it)

class StateDictMismatchError(ValueError, RuntimeError):
    """A checkpoint whose keys or shapes do not match the model. (A ValueError for our callers, and a
    RuntimeError for code written against torch's own load_state_dict.)"""


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    """The same state dict with wrapper prefixes removed, so any saved form loads into a bare model."""
    # torch.compile saves "_orig_mod.<name>", DistributedDataParallel "module.<name>": the same weights
    out = {}
    for key, value in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _unwrap_module(model: nn.Module) -> nn.Module:
    """The bare module under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def check_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Raise StateDictMismatchError naming missing / unexpected / wrongly-shaped keys (no-op if it fits)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict))
              if hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    parts = [f"{what} {keys}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                 ("shape mismatches", shapes)) if keys]
    if parts:
        raise StateDictMismatchError("state dict does not match the model: " + "; ".join(parts))


def load_model_state(model: nn.Module, state: dict, src=None, assign: bool = False) -> None:
    """Load weights strictly into `model` (compile/DDP wrappers are looked through), with an error that
    names every key that does not fit. `state` is a state dict, or a checkpoint dict whose "model" entry
    is one (as read_checkpoint returns); `src`, when given, is the file named in the error. assign=True
    makes the given tensors the parameters (for a model built on the "meta" device)."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a whole checkpoint: take its weights
        state = state["model"]
    state = _strip_wrapper_prefixes(state)
    model = _unwrap_module(model)
    try:
        check_state_dict(model, state)
    except StateDictMismatchError as e:
        if src is None:
            raise
        raise StateDictMismatchError(f"checkpoint {src} is incompatible with this model: {e}") from None
    nn.Module.load_state_dict(model, state, strict=True, assign=assign)


class DeviceUnavailableError(ValueError, RuntimeError):
    """A device name that is malformed or not present on this machine (a RuntimeError, as torch raises
    for devices, and a ValueError, as our command lines report usage errors)."""


def resolve_device(name) -> torch.device:
    """torch.device for `name` ("auto" = cuda, else mps, else cpu), checked to exist on this machine.
    torch itself accepts "cuda:7" on a one-GPU machine and fails only at the first tensor moved there,
    possibly after minutes of loading; checking here makes that a one-line error up front."""
    if str(name) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceUnavailableError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device {name!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {name!r} requested but this machine has "
                                         f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceUnavailableError(f"device {name!r} requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise DeviceUnavailableError(f"unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)")
    return dev


# ---- Attention backends: fn(q, k, v, *, causal, window) -> out, as attend() calls them ----

def masked_sdpa(q, k, v, attn_mask: Optional[torch.Tensor], impl: str, window: Optional[int],
                dropout_p: float = 0.0) -> torch.Tensor:
    """attend()'s fast path when there is an explicit mask (padded rows, a rolling buffer) or attention dropout:
    the backend interface has no argument for either, so these cases run torch's SDPA with a boolean mask."""
    if dropout_p > 0 and impl != "sdpa":
        raise ValueError(f"attention dropout needs the 'naive' or 'sdpa' backend, got {impl!r}")
    mask = attn_mask if attn_mask is not None else causal_window_mask(q.shape[-2], k.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def naive_attention(q, k, v, *, causal: bool = True, window: Optional[int] = None):
    """attend()'s readable branch as a backend: materializes the (Tq, Tk) score matrix, our softmax."""
    mask = causal_window_mask(q.shape[-2], k.shape[-2], window, q.device) if (causal or window) else None
    return scaled_dot_product_attention(q, k, v, mask)


def sdpa_attention(q, k, v, *, causal: bool = True, window: Optional[int] = None):
    """torch's fused attention (flash / memory-efficient kernels where available). Its is_causal flag
    aligns the mask top-left, which is only right when Tq == Tk, so other shapes (KV-cache chunks) and
    sliding windows get an explicit boolean mask; a single query with full attention needs none."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if not causal and window is None:
        return F.scaled_dot_product_attention(q, k, v)
    if window is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if window is None and Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_window_mask(Tq, Tk, window, q.device))


# name -> backend; ModelConfig.attn_impl picks one. Later stages add theirs with register_attention_backend
# (e.g. kernels.py's "flash_triton"), and set_attention_backend(model, name) switches a built model.
ATTENTION_BACKENDS: dict[str, Callable] = {"naive": naive_attention, "sdpa": sdpa_attention}


def register_attention_backend(name: str, fn: Callable) -> None:
    """Make `fn(q, k, v, *, causal: bool, window: int | None) -> out` selectable as attn_impl=name.
    (Re-registering a name replaces it; that is how a stage swaps in a faster kernel.)"""
    if not isinstance(name, str) or not name:
        raise ValueError(f"attention backend name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"attention backend {name!r} must be callable, got {type(fn).__name__}")
    ATTENTION_BACKENDS[name] = fn


def get_attention_backend(name: str) -> Callable:
    """The registered function for `name`; an unknown name is a ValueError listing the registered ones."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]


def set_attention_backend(model: nn.Module, name: str) -> None:
    """Switch every attention module in `model` to backend `name` (and record it in model.config)."""
    get_attention_backend(name)
    for module in model.modules():
        if isinstance(module, (MultiHeadSelfAttention, MultiHeadLatentAttention)):
            module.attn_impl = name
    if isinstance(getattr(model, "config", None), ModelConfig):
        model.config.attn_impl = name


# ---- RoPE: positions per head, and one table lookup for all layers ----

def _rope_rows(rope: RotaryPositionalEmbedding, token_positions: torch.Tensor, dtype: torch.dtype):
    """The COS, SIN rows of `rope`'s tables for these positions, (..., T, d_k) in `dtype`. Every layer rotates
    by the same positions tensor, so the last lookup is remembered (keyed by that tensor, its version, the
    dtype and the device) and reused: one gather per forward instead of two per layer."""
    memo = rope._memo
    if memo is not None and memo[0] is token_positions and memo[1] == token_positions._version \
            and memo[2] == dtype and memo[3].device == token_positions.device:
        return memo[3], memo[4]
    cos = rope.cos_table[token_positions].to(dtype)
    sin = rope.sin_table[token_positions].to(dtype)
    if not torch.compiler.is_compiling():  # a traced graph does the plain lookup
        rope._memo = (token_positions, token_positions._version, dtype, cos, sin)
    return cos, sin


def _head_positions(token_positions: Optional[torch.Tensor], lead: tuple, T: int, device) -> torch.Tensor:
    """RoPE positions for (B, heads, T, .) tensors: (T,), or per-row (..., T) -> (B, 1, T) for all heads."""
    pos = torch.arange(T, device=device) if token_positions is None else token_positions
    if pos.dim() > 1 and pos.dim() == len(lead) + 1:
        pos = pos.expand(*lead, T).reshape(-1, T)[:, None, :]
    return pos


# ---- Accounting details: a built model's parameters, attended keys, activations, training memory ----

def _count_module_params(model: nn.Module, include_embeddings: bool = True) -> int:
    """num_params of a built module: each distinct tensor once (tied weights are one tensor); without
    embeddings, the token embedding, LM head and learned position table are left out."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"num_params expects a ModelConfig or nn.Module, got {type(model).__name__}")
    unique = {id(p): p for p in model.parameters()}
    if not include_embeddings:
        for name in ("token_embeddings", "lm_head", "position_embeddings"):
            weight = getattr(getattr(model, name, None), "weight", None)
            unique.pop(id(weight), None)
    return sum(p.numel() for p in unique.values())


def mean_attended_keys(seq_len: int, window: Optional[int], causal_average: bool = True) -> float:
    """How many keys an average query attends to in a sequence of seq_len tokens.
    causal_average=True counts only the keys a causal kernel must touch: query i sees min(i+1, W) keys,
    averaging (T+1)/2 for full attention. False counts the whole row (T, or W) -- the convention of
    Kaplan et al. / PaLM's MFU formula, and what a kernel that computes then masks the full matrix does."""
    if not causal_average:
        return float(seq_len if window is None else min(window, seq_len))
    # e.g. T = 4, full: (1 + 2 + 3 + 4) / 4 = 2.5 keys; window 2: (1 + 2 + 2 + 2) / 4 = 1.75 keys
    w = seq_len if window is None else window
    return sum(min(i + 1, w) for i in range(seq_len)) / seq_len


def activation_elements_per_token(config: ModelConfig, seq_len: Optional[int] = None,
                                  materialize_scores: Optional[bool] = None) -> int:
    """Approximate number of activation elements autograd keeps per token for the backward pass. Per layer:
    each norm's input and output (2d, x2 norms), q/k/v (d + 2 kv_dim), the attention output (d), the FFN's
    hidden tensors (swiglu: w1 out, w3 out, silu out, product = 4 d_ff; 2 d_ff for the others; MoE: times k,
    plus the router probs E), and -- only when scores are materialized (the "naive" backend) -- the score
    and probability matrices (2 H T; fused attention keeps one log-sum-exp per head instead). Then the
    final norm (2d) and the logits + softmax (2V). Dropout masks are not counted."""
    c = config
    T = c.context_length if seq_len is None else seq_len
    if materialize_scores is None:
        materialize_scores = c.attn_impl == "naive"
    d, kv_dim = c.d_model, c.num_kv_heads * c.head_dim
    ffn_hidden = (4 if c.ffn == "swiglu" else 2) * c.d_ff
    if c.num_experts > 0:
        ffn_hidden = c.experts_top_k * (ffn_hidden + d) + c.num_experts
    score_elems = 2 * c.num_heads * T if materialize_scores else c.num_heads
    attn = d + 2 * kv_dim + d + score_elems if c.mixer == "attention" else _mixer_activations(c, T, score_elems)
    return c.num_layers * (4 * d + attn + ffn_hidden) + 2 * d + 2 * c.vocab_size


OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "muon": 1, "sgd_momentum": 1, "sgd": 0}


def memory_estimate(config: ModelConfig, batch_size: int, optimizer: str = "adamw", dtype_bytes: int = 4,
                    seq_len: Optional[int] = None) -> dict:
    """Bytes needed to train: parameters, gradients, optimizer state and activations for one batch of
    batch_size x seq_len (default context_length) tokens, all stored in dtype_bytes per element.
    AdamW keeps two moments per parameter (2P); Muon/SGD-momentum one; plain SGD none."""
    # e.g. GPT-2 small (124M) in fp32 with AdamW: 124M * 4 bytes * (1 weights + 1 grads + 2 moments)
    # ~ 2 GB before any activation -- which then grow with batch x sequence length and usually dominate.
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer={optimizer!r} is not one of {sorted(OPTIMIZER_STATES)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    T = config.context_length if seq_len is None else seq_len
    P = num_params(config)
    out = {"params": P * dtype_bytes, "grads": P * dtype_bytes,
           "optimizer_state": OPTIMIZER_STATES[optimizer] * P * dtype_bytes,
           "activations": activation_elements_per_token(config, T) * batch_size * T * dtype_bytes}
    out["total"] = sum(out.values())
    return out


# ---- Validation: configs, token ids, sampling arguments (errors that name the problem) ----

# The allowed values of each one-word switch. An unknown value is a clear ValueError naming the field.
NORM_CHOICES = ("rmsnorm", "layernorm", "none")
NORM_POSITION_CHOICES = ("pre", "post")
POSITION_CHOICES = ("rope", "sinusoidal", "learned", "nope")
FFN_CHOICES = ("swiglu", "silu", "relu", "gelu")
ATTENTION_CHOICES = ("full", "sliding")
MIXER_CHOICES = ("attention", "mla", "linear", "hyena")  # the sublayer that moves information across positions


def _fill_defaults(c: ModelConfig) -> None:
    """The derived defaults: d_ff by FFN kind, num_kv_heads = num_heads (MHA), and the mixers' own sizes --
    MLA's latent of d/4 and half of each head for RoPE (DeepSeek-V2-Lite: 512 of 2048, 64 of 192; even,
    since RoPE turns pairs), Hyena's order 2 (the paper's) and a 64-wide filter MLP."""
    c.d_ff = default_d_ff(c.d_model, c.ffn) if c.d_ff is None else c.d_ff
    c.num_kv_heads = c.num_heads if c.num_kv_heads is None else c.num_kv_heads
    if c.mixer == "mla" and c.kv_lora_rank is None:
        c.kv_lora_rank = max(1, c.d_model // 4)
    if c.mixer == "mla" and c.qk_rope_head_dim is None:
        c.qk_rope_head_dim = max(2, c.d_model // c.num_heads // 4 * 2) if c.position == "rope" else 0
    if c.mixer == "hyena":
        c.hyena_order = 2 if c.hyena_order is None else c.hyena_order
        c.hyena_filter_dim = 64 if c.hyena_filter_dim is None else c.hyena_filter_dim


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v, lo: float, hi: float) -> bool:
    """A real number (not a bool) in [lo, hi)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v < hi


# The rules every config must pass, in order: (passes, the error), after the sizes and the one-word switches
# are known to be valid and the defaults filled in; the error is formatted with c (the config) and dh. The
# menu sections' rules of their own switches (mixers, experts) come last.
_CONFIG_RULES = [
    (lambda c: c.attn_impl in ATTENTION_BACKENDS, "ModelConfig.attn_impl={c.attn_impl!r} is not one of "
     "{backends} (register others with register_attention_backend)"),
    (lambda c: c.d_model % c.num_heads == 0, "d_model={c.d_model} is not divisible by num_heads={c.num_heads}"),
    (lambda c: _pos_int(c.num_kv_heads), "ModelConfig.num_kv_heads must be a positive integer, got {c.num_kv_heads!r}"),
    (lambda c: c.num_heads % c.num_kv_heads == 0, "num_heads={c.num_heads} is not divisible by num_kv_heads="
     "{c.num_kv_heads} (each key/value head must serve a whole group of query heads)"),
    (lambda c: c.position != "rope" or c.head_dim % 2 == 0,
     "RoPE needs an even head dimension, got d_model/num_heads = {dh}"),
    (lambda c: c.position != "sinusoidal" or c.d_model % 2 == 0,
     "sinusoidal positions need an even d_model, got {c.d_model}"),
    (lambda c: _number(c.rope_theta, 1e-300, math.inf), "ModelConfig.rope_theta must be > 0, got {c.rope_theta!r}"),
    (lambda c: _pos_int(c.d_ff), "ModelConfig.d_ff must be a positive integer, got {c.d_ff!r}"),
    (lambda c: c.attention != "sliding" or c.window_size is not None,
     "ModelConfig.attention='sliding' needs window_size (a positive integer)"),
    (lambda c: c.window_size is None or c.attention == "sliding", "ModelConfig.window_size={c.window_size} is only "
     "used with attention='sliding' (attention={c.attention!r})"),
    (lambda c: c.window_size is None or _pos_int(c.window_size),
     "ModelConfig.window_size must be a positive integer, got {c.window_size!r}"),
    (lambda c: _number(c.norm_eps, 1e-300, 1), "ModelConfig.norm_eps must be a number in (0, 1), got {c.norm_eps!r}"),
    *[(lambda c, f=flag: isinstance(getattr(c, f), int) and getattr(c, f) in (0, 1),
       f"ModelConfig.{flag} must be true or false, got {{c.{flag}!r}}")
      for flag in ("qk_norm", "tie_embeddings", "bias")],
    *[(lambda c, f=field: _number(getattr(c, f), 0, 1), f"ModelConfig.{field} must be a number in [0, 1), got "
       f"{{c.{field}!r}}") for field in ("dropout", "attn_dropout")],
    (lambda c: c.attn_dropout == 0 or c.attn_impl in ("naive", "sdpa"), "ModelConfig.attn_dropout needs attn_impl "
     "'naive' or 'sdpa' (the backend interface has no dropout argument), got attn_impl={c.attn_impl!r}"),
    *_MIXER_RULES,
    *_MOE_RULES,
]


def _validate_config(c: ModelConfig) -> None:
    """ModelConfig.__post_init__: the sizes, the one-word switches, the defaults, then _CONFIG_RULES in order;
    the first rule a config breaks is a ValueError naming the field."""
    for field in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads"):
        if not _pos_int(getattr(c, field)):
            raise ValueError(f"ModelConfig.{field} must be a positive integer, got {getattr(c, field)!r}")
    for field, allowed in (("norm", NORM_CHOICES), ("norm_position", NORM_POSITION_CHOICES), ("ffn", FFN_CHOICES),
                           ("position", POSITION_CHOICES), ("attention", ATTENTION_CHOICES),
                           ("mixer", MIXER_CHOICES)):
        if getattr(c, field) not in allowed:
            raise ValueError(f"ModelConfig.{field}={getattr(c, field)!r} is not one of {list(allowed)}")
    _fill_defaults(c)
    for passes, error in _CONFIG_RULES:
        if not passes(c):
            raise ValueError(error.format(c=c, dh=c.head_dim, backends=sorted(ATTENTION_BACKENDS)))
    for flag in ("qk_norm", "tie_embeddings", "bias"):
        setattr(c, flag, bool(getattr(c, flag)))


def _config_from_block_args(d_model, num_heads, d_ff, max_seq_len, theta, switches) -> ModelConfig:
    """A block is built from a ModelConfig so that every switch is validated in one place. (vocab_size 1
    and num_layers 1 are placeholders: a lone block has neither a vocabulary nor neighbours.)"""
    return ModelConfig(vocab_size=1, context_length=max_seq_len, d_model=d_model, num_layers=1,
                       num_heads=num_heads, d_ff=d_ff, rope_theta=theta, **switches)


def _check_config_dict(cls, d) -> None:
    """ModelConfig.from_dict's checks: a dict, no unknown keys (typos like n_layer), no missing sizes."""
    if not isinstance(d, dict):
        raise ValueError(f"ModelConfig.from_dict expects a dict, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d)
    if missing:
        raise ValueError(f"ModelConfig dict is missing required field(s) {missing}")


def _check_attention_args(d_model: int, num_heads: int, num_kv_heads: int, attn_impl: str) -> None:
    """MultiHeadSelfAttention's own checks (it can be built without a ModelConfig, CS336-style)."""
    if d_model % num_heads != 0:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    get_attention_backend(attn_impl)  # fail early on an unknown name


def _check_token_ids(model: "TransformerLM", token_ids: torch.Tensor) -> None:
    """Ids must be a (batch, seq) tensor of integers in [0, vocab): a bad id on a GPU would otherwise be an
    opaque device-side assert. The range check reads tensor values (a device sync, a graph break under
    torch.compile), so `model.validate_inputs = False` or compiling skips it."""
    if token_ids.dim() != 2:
        raise ValueError(f"token ids must have shape (batch, seq) or (seq,), got {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"token ids must be an integer tensor, got dtype {token_ids.dtype}")
    if model.validate_inputs and not torch.compiler.is_compiling() and token_ids.numel() > 0:
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= model.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {model.config.vocab_size})")


def _check_positions(model: "TransformerLM", T: int, token_positions: Optional[torch.Tensor]) -> None:
    """Every position must have a row in the position tables (RoPE, sinusoidal, learned): < context_length."""
    ctx = model.config.context_length
    if token_positions is None:
        if T > ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context_length {ctx}")
    elif model.validate_inputs and not torch.compiler.is_compiling() and token_positions.numel() > 0 \
            and int(token_positions.max()) >= ctx:
        raise ValueError(f"position {int(token_positions.max())} exceeds the model's context_length {ctx} "
                         "(sequence too long)")


def check_sampling_options(*, max_new_tokens: int, temperature: float, top_p: float, num_samples: int = 1,
                           seed: int = 0, min_new_tokens: int = 1) -> None:
    """Sampling options' ranges, ValueError naming the option: command lines call this before any loading (so
    `--top-p 1.5` fails in milliseconds, not after a model load); generate and speculative_generate too, with
    min_new_tokens=0. temperature finite and >= 0, top_p in (0, 1], the counts integers."""
    for name, value, low in (("max_new_tokens", max_new_tokens, min_new_tokens), ("num_samples", num_samples, 1),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    # `not (x >= 0)` also rejects NaN, whose comparisons are all False
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _normalize_prompts(prompt_ids, vocab_size: int, max_new_tokens: int = 0,
                       contexts: Optional[dict] = None) -> list[list[int]]:
    """One prompt (list of ints) or many (list of lists, or a 1-D / 2-D tensor) -> a list of lists, each
    non-empty and inside the vocabulary (checked here, before any model call, so the error names the
    prompt and the id instead of surfacing as an indexing failure deep in the embedding). contexts,
    {"the model's": context_length, ...}: the longest prompt plus max_new_tokens must fit each of them."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of ints or a non-empty list of lists of ints")
    prompts = [list(prompt_ids)] if isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (generation needs at least one token to condition on)")
        for t in p:
            if not isinstance(t, int) or not (0 <= t < vocab_size):
                raise ValueError(f"prompt {i} contains token id {t!r} outside the vocabulary [0, {vocab_size})")
    longest = max(len(p) for p in prompts)
    for whose, context_length in (contexts or {}).items():
        if longest + max_new_tokens > context_length:
            raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds {whose} "
                             f"context_length {context_length}")
    return prompts


def _model_device_dtype(model: nn.Module):
    """Where the model's weights live: new tensors (prompts, caches) are made there, in their dtype."""
    p = next(model.parameters())
    return p.device, p.dtype


@contextlib.contextmanager
def eval_mode(*models: nn.Module):
    """The body runs with every model in eval mode (no dropout); afterwards, exception or not, each model is
    back in its own mode. generate and speculative_generate sample inside it."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


# ---- Random training windows: how a language model sees a token stream ----
# A corpus is one long array of token ids. Training draws windows at random offsets rather than walking
# it in order: consecutive batches are then independent samples (an unbiased gradient estimate), any
# amount of data can be used for any number of steps, and a window never has to align with a document
# (the <|endoftext|> tokens inside it teach the model where documents end).

def sample_windows(tokens, batch_size: int, context_length: int, rng: np.random.Generator):
    """`batch_size` windows of a 1-D token array (ndarray or np.memmap) at uniformly random starts.

    x[b] = tokens[s_b : s_b + T] and y[b] = tokens[s_b + 1 : s_b + T + 1]: at every position the target
    is the next token, so one window gives T training examples. s_b is uniform in [0, n - T - 1], the
    last start whose target window still fits. Returns two int64 arrays of shape (B, T); only the
    B * (T + 1) tokens used are read, so a memory-mapped corpus larger than RAM works. `rng` (a numpy
    Generator) makes the draw reproducible: train.py derives one per step for exact resumes.
    """
    n = len(tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if n < context_length + 1:
        raise ValueError(f"dataset has {n} tokens, fewer than one context window + 1 ({context_length + 1}); "
                         "use a bigger corpus or a smaller context length")
    starts = rng.integers(0, n - context_length, size=batch_size)   # (B,) in [0, n - T - 1]
    offsets = np.arange(context_length + 1)                          # (T + 1,)
    windows = np.asarray(tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)  # (B, T + 1) gather
    return windows[:, :-1], windows[:, 1:]


# ---- Downloads: resumable, verified, atomic ----

def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in `chunk`-byte pieces (constant memory for any file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def download(url: str, dest, *, sha256: Optional[str] = None, expected_size: Optional[int] = None,
             progress: bool = True, timeout: float = 60.0, chunk: int = 1 << 20) -> Path:
    """Download `url` to `dest`, resuming a partial `dest.part` with an HTTP Range request.

    - If `dest` exists and (when known) its size / SHA-256 match, nothing is downloaded.
    - The bytes go to `dest.part`; a re-run asks the server for `Range: bytes=<have>-`. A 206 reply is
      appended; a 200 reply (server ignores ranges) restarts from zero. file:// URLs resume by seeking.
    - At the end the size is checked against Content-Length / `expected_size` and the SHA-256 against
      `sha256`; only then is `.part` renamed to `dest` (atomic), and the hash recorded in `dest.sha256`.
    Network failures raise ConnectionError (one line naming the URL), bad bytes ValueError.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    hash_file, part = Path(str(dest) + ".sha256"), Path(str(dest) + ".part")
    # 1. already complete: verify what we can (size, then the hash given or the one recorded at download)
    if dest.exists():
        if expected_size is not None and dest.stat().st_size != expected_size:
            raise ValueError(f"cached {dest} has {dest.stat().st_size} bytes, expected {expected_size}; "
                             "delete it to download again")
        want = sha256 or (hash_file.read_text().strip() if hash_file.exists() else None)
        if want and sha256_file(dest) != want:
            raise ValueError(f"cached {dest} does not match its SHA-256 {want}: it is corrupt or was modified; "
                             "delete it to download again")
        return dest
    total = _fetch_to_part(url, part, expected_size, tk.Progress(True, f"downloading {dest.name}") if progress
                           else None, timeout, chunk)
    # 4. only a complete, verified file gets the final name (a crash leaves just the .part to resume)
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"download of {url} incomplete: got {size} of {total} bytes; run again to resume")
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ValueError(f"download of {url} failed verification: SHA-256 {digest} != expected {sha256}")
    os.replace(part, dest)
    tk.atomic_write_text(hash_file, digest + "\n")
    return dest


def _fetch_to_part(url: str, part: Path, total: Optional[int], bar, timeout: float, chunk: int) -> Optional[int]:
    """download's steps 2 and 3: ask for the bytes `part` does not have yet and append them, in `chunk`-byte
    pieces (constant memory), updating the progress `bar`. Returns the file's full size when known."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "ScratchLM/1.0"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # range not satisfiable: the .part is already complete
            return total
        raise ConnectionError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"download of {url} failed: {e}") from None
    local = url.startswith("file:")
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        if local:  # a local file: skip what we already have
            resp.read(have) if have else None
            status = 206 if have else 200
        have = have if status == 206 else 0  # a 200 reply is the whole file: start over
        length = resp.headers.get("Content-Length")
        if length is not None and total is None:
            # a 206 reply's Content-Length is the REST of the file; a file:// one is the whole file
            total = int(length) + (have if status == 206 and not local else 0)
        done = have
        try:
            with open(part, "ab" if have else "wb") as f:
                while b := resp.read(chunk):
                    f.write(b)
                    done += len(b)
                    if bar is not None:
                        bar.update(f"{done / 1e6:,.1f} MB" + (f" / {total / 1e6:,.1f} MB ({100 * done / total:.0f}%)"
                                                                if total else ""))
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left writing {part}; run again to resume") from None
            raise ConnectionError(f"download of {url} interrupted after {done} bytes ({e}); "
                                  "run again to resume") from None
    if bar is not None:
        bar.close(f"{done / 1e6:,.1f} MB")
    return total


# ---- Checkpoints: one reader with one clear error per way a file can be wrong ----

CHECKPOINT_FORMAT = "scratchlm-checkpoint-v1"


def read_checkpoint(path) -> dict:
    """Read a checkpoint dict written by train.py (or any torch.save'd dict with a "model" state dict).

    torch.load runs with weights_only=True: only tensors and plain Python values are unpickled, so a
    malicious file cannot run code. Every failure is a one-line error that names the file: missing
    (FileNotFoundError), a directory, zero bytes (an interrupted copy), truncated or corrupt, a pickle
    that wants to run code, or a file that is not a ScratchLM checkpoint (ValueError). `path` may also
    be a binary file object.
    """
    # cheap checks on the path first: torch.load's own errors for these are cryptic (an IndexError from
    # an empty file's message, "failed finding central directory" for a truncated zip)
    if isinstance(path, (str, os.PathLike)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"checkpoint {path} is a directory; pass the checkpoint file inside it (ckpt.pt)")
        if os.path.getsize(path) == 0:
            raise ValueError(f"checkpoint {path} is empty (0 bytes): it was never completely written")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError, ...)
        msg = str(e)
        if "GLOBAL " in msg or "Unsupported global" in msg:  # a pickle that names a function to call
            raise ValueError(f"checkpoint {path} was refused: it holds pickled objects that would run code when "
                             "loaded (a ScratchLM checkpoint holds only tensors and plain values)") from None
        # torch's weights-only message starts with generic advice; the useful detail comes after this marker
        detail = msg.split("WeightsUnpickler error:")[-1].strip()
        first = (detail.splitlines() or [""])[0][:200]
        raise ValueError(f"checkpoint {path} is corrupt or not a ScratchLM checkpoint "
                         f"({type(e).__name__}{': ' + first if first else ''})") from None
    # a checkpoint without "format" is accepted (the course's save_checkpoint writes model / optimizer /
    # iteration only); one with another format is not, since its layout may differ
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"checkpoint {path} is not a ScratchLM checkpoint (no 'model' state dict in it)")
    if ckpt.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path} has format {ckpt.get('format')!r}; this version reads "
                         f"{CHECKPOINT_FORMAT!r}")
    return ckpt


def _checkpoint_model_config(ckpt: dict, path) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with, wherever its writer stored it."""
    # train.py stores "model_config"; the course's layout nests it as config["model"], or config is it
    cfg = ckpt.get("model_config")
    if cfg is None and isinstance(ckpt.get("config"), dict):
        cfg = ckpt["config"].get("model", ckpt["config"] if "vocab_size" in ckpt["config"] else None)
    if not isinstance(cfg, dict):
        raise ValueError(f"checkpoint {path} has no model config ('model_config' or 'config'['model'])")
    try:
        return ModelConfig.from_dict(dict(cfg))
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {path} has an invalid model config: {e}") from None


def check_tokenizer_matches(ckpt: dict, tokenizer, path) -> None:
    """A tokenizer from another corpus with the same vocab size would sample fluent-looking garbage: the
    checkpoint's stored fingerprint (hash of vocab + merges + specials) must match the tokenizer's."""
    want = ckpt.get("tokenizer_fingerprint")
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if want and callable(fingerprint) and fingerprint() != want:
        raise ValueError(f"tokenizer (fingerprint {fingerprint()}) is not the one checkpoint {path} was trained "
                         f"with (fingerprint {want}): its ids would decode to different text")


def load_checkpoint_model(path, device="cpu", tokenizer=None) -> tuple[TransformerLM, dict]:
    """Rebuild the TransformerLM a checkpoint describes and load its weights: returns (model, ckpt).
    With a `tokenizer`, its fingerprint is checked against the checkpoint's (when both have one)."""
    return _model_from_checkpoint(read_checkpoint(path), path, resolve_device(device), tokenizer)


def _model_from_checkpoint(ckpt: dict, path, dev, tokenizer=None) -> tuple[TransformerLM, dict]:
    """load_checkpoint_model for a checkpoint dict already read (sample_from_checkpoint reads it once)."""
    cfg = _checkpoint_model_config(ckpt, path)
    if tokenizer is not None:
        check_tokenizer_matches(ckpt, tokenizer, path)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} > model vocab_size {cfg.vocab_size} "
                             f"in {path}: wrong tokenizer for this checkpoint")
    model = TransformerLM.from_config(cfg)
    load_model_state(model, ckpt["model"], src=path)
    return model.to(dev), ckpt


def find_tokenizer_dir(path, ckpt: dict) -> Optional[str]:
    """The tokenizer of a train.py run: the `tokenizer/` folder next to the checkpoint, or the folder the
    checkpoint recorded. None when neither holds a vocab.json. (The folder next to the checkpoint wins:
    a run folder copied to another machine carries its tokenizer, while recorded paths go stale.)"""
    for cand in (os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer"), ckpt.get("tokenizer_dir")):
        if cand and os.path.exists(os.path.join(str(cand), "vocab.json")):
            return str(cand)
    return None


# ---- GPT-2 from Hugging Face: a from-scratch safetensors reader and the name mapping ----
# A .safetensors file is: 8 bytes (little-endian uint64) = N, then N bytes of JSON, then raw tensor bytes.
# The JSON maps each tensor name to {"dtype": "F32", "shape": [768, 2304], "data_offsets": [begin, end]}
# (byte offsets into the data section, little-endian, row-major); "__metadata__" holds free-form strings.
# No code runs when reading it (unlike a pickle), which is why the Hub prefers it.

SAFETENSORS_DTYPES = {  # safetensors name -> (numpy little-endian dtype, torch dtype)
    "F64": ("<f8", torch.float64), "F32": ("<f4", torch.float32), "F16": ("<f2", torch.float16),
    "BF16": ("<u2", torch.bfloat16), "I64": ("<i8", torch.int64), "I32": ("<i4", torch.int32),
    "I16": ("<i2", torch.int16), "I8": ("i1", torch.int8), "U8": ("u1", torch.uint8), "BOOL": ("?", torch.bool),
}


def read_safetensors(path) -> dict:
    """{name: tensor} from a .safetensors file, with a clear error naming the file for any malformation."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        # a header must at least hold "{}" and fit the file; random bytes give absurd lengths here
        if n < 2 or n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object)")
        data_size, out = size - 8 - n, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                np_dtype, torch_dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(s) for s in info["shape"]]
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: tensor {name!r} has a malformed or unsupported entry {info!r} "
                                 f"(dtypes: {sorted(SAFETENSORS_DTYPES)})") from None
            nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
            if not (0 <= begin <= end <= data_size) or end - begin != nbytes:
                raise ValueError(f"{path}: tensor {name!r} with shape {shape} {info['dtype']} needs {nbytes} bytes "
                                 f"but its offsets [{begin}, {end}] give {end - begin} (data section {data_size}): "
                                 "the file is truncated or corrupt")
            # offsets count from the start of the data section, which follows the 8 + n header bytes; a
            # bytearray (writable) lets torch share numpy's memory instead of warning and copying
            f.seek(8 + n + begin)
            arr = np.frombuffer(bytearray(f.read(end - begin)), dtype=np_dtype)
            arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)  # a no-op on little-endian machines
            t = torch.from_numpy(arr)
            if torch_dtype is torch.bfloat16:  # numpy has no bfloat16: reinterpret the 16-bit patterns
                t = t.view(torch.int16).view(torch.bfloat16)
            out[name] = t.reshape(shape)
    return out


# The four released GPT-2 sizes on the Hugging Face Hub (the user-facing names are the Hub's model ids).
GPT2_HF_REPOS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                 "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
HF_BASE_URL = "https://huggingface.co"


def gpt2_config_from_hf(hf: dict, vocab_size: Optional[int] = None) -> ModelConfig:
    """Our ModelConfig for a Hugging Face GPT-2 config.json: pre-norm LayerNorm with biases, learned
    positions, a tanh-GELU MLP of width n_inner (default 4 d), biases everywhere, tied LM head."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config model_type {hf.get('model_type')!r} is not 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh approximation
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported (only the tanh GELU 'gelu_new')")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not "
                         "supported (they change the attention math)")
    # HF field -> ours: n_embd -> d_model, n_layer -> num_layers, n_head -> num_heads, n_positions (or
    # the older n_ctx) -> context_length, n_inner -> d_ff (None means 4 * n_embd), layer_norm_epsilon ->
    # norm_eps. GPT-2 small: 768, 12, 12, 1024, 3072, 1e-5; the vocabulary is 50257 for every size.
    try:
        d = int(hf["n_embd"])
        return ModelConfig(vocab_size=int(vocab_size or hf["vocab_size"]),
                           context_length=int(hf.get("n_positions", hf.get("n_ctx"))), d_model=d,
                           num_layers=int(hf["n_layer"]), num_heads=int(hf["n_head"]),
                           d_ff=int(hf.get("n_inner") or 4 * d), norm="layernorm", norm_position="pre",
                           position="learned", ffn="gelu", bias=True, tie_embeddings=True,
                           norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except (KeyError, TypeError) as e:
        raise ValueError(f"GPT-2 config is missing or has a bad field ({e!r})") from None


def gpt2_state_dict_from_hf(tensors: dict, cfg: ModelConfig, src="checkpoint") -> dict:
    """Map Hugging Face GPT-2 tensor names onto ours (HF's mask buffers and tied lm_head are not weights)."""
    # The mapping, per layer i (HF name -> ours; "T" = transposed from Conv1D's [in, out]):
    #     wte -> token_embeddings (and lm_head, tied)       wpe -> position_embeddings
    #     h.i.ln_1 -> layers.i.ln1                           h.i.ln_2 -> layers.i.ln2
    #     h.i.attn.c_attn   -> T, split -> layers.i.attn.{q,k,v}_proj
    #     h.i.attn.c_proj   -> T -> layers.i.attn.output_proj
    #     h.i.mlp.c_fc      -> T -> layers.i.ffn.w1          h.i.mlp.c_proj -> T -> layers.i.ffn.w2
    #     ln_f -> ln_final
    # GPT2LMHeadModel files prefix everything with "transformer."; GPT2Model files do not.
    t = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in tensors.items()}
    used, sd = set(), {}
    d = cfg.d_model

    def take(name: str) -> torch.Tensor:
        if name not in t:
            raise ValueError(f"{src}: GPT-2 tensor {name!r} is missing (has {len(t)} tensors, e.g. "
                             f"{sorted(t)[:3]})")
        used.add(name)
        return t[name].to(torch.float32)  # fp16/bf16 files load as float32 weights (a no-op for F32)

    sd["token_embeddings.weight"] = take("wte.weight")           # (V, d)
    sd["lm_head.weight"] = sd["token_embeddings.weight"]         # tied: the same matrix
    sd["position_embeddings.weight"] = take("wpe.weight")        # (T, d)
    for i in range(cfg.num_layers):
        h, o = f"h.{i}.", f"layers.{i}."
        for hf_ln, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
            sd[o + ours + ".weight"], sd[o + ours + ".bias"] = take(h + hf_ln + ".weight"), take(h + hf_ln + ".bias")
        # c_attn computes [q | k | v] = x @ W + b with W (d, 3d): after the transpose, rows 0..d-1 of W^T
        # produce q, rows d..2d-1 produce k, rows 2d..3d-1 produce v (each split into heads later)
        w, b = take(h + "attn.c_attn.weight").t(), take(h + "attn.c_attn.bias")  # (3d, d), (3d,)
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[o + f"attn.{name}.weight"] = w[j * d:(j + 1) * d].contiguous()
            sd[o + f"attn.{name}.bias"] = b[j * d:(j + 1) * d].contiguous()
        for hf_name, ours in (("attn.c_proj", "attn.output_proj"), ("mlp.c_fc", "ffn.w1"), ("mlp.c_proj", "ffn.w2")):
            sd[o + ours + ".weight"] = take(h + hf_name + ".weight").t().contiguous()  # Conv1D [in, out] -> [out, in]
            sd[o + ours + ".bias"] = take(h + hf_name + ".bias")
    sd["ln_final.weight"], sd["ln_final.bias"] = take("ln_f.weight"), take("ln_f.bias")
    ignorable = {k for k in t if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight"}
    extra = sorted(set(t) - used - ignorable)
    if extra:
        raise ValueError(f"{src}: unexpected GPT-2 tensors {extra[:5]} (is config.json for these weights?)")
    return sd


def default_cache_dir() -> Path:
    """Where downloaded weights live: $SCRATCHLM_CACHE, else ~/.cache/scratchlm."""
    return Path(os.environ.get("SCRATCHLM_CACHE") or Path.home() / ".cache" / "scratchlm")


def _pretrained_files(name_or_path: str, cache_dir, progress: bool, base_url: str) -> tuple[Path, Path]:
    """(model.safetensors, config.json) for a Hub name (downloaded and cached) or a local folder/file."""
    p = Path(name_or_path)
    if p.exists():  # a local copy (e.g. a clone of the Hub repo, or files copied to an offline machine)
        weights = p / "model.safetensors" if p.is_dir() else p
        config = (p if p.is_dir() else p.parent) / "config.json"
        for f in (weights, config):
            if not f.is_file():
                raise FileNotFoundError(f"pretrained model {name_or_path}: {f} not found (a folder needs "
                                        "model.safetensors and config.json)")
        return weights, config
    if name_or_path not in GPT2_HF_REPOS:
        raise ValueError(f"unknown pretrained model {name_or_path!r}: use one of {sorted(GPT2_HF_REPOS)} or a "
                         "folder holding model.safetensors and config.json")
    # Hub layout: <base>/<repo>/resolve/main/<file>. config.json first: it is tiny, so a network problem
    # shows before the big download starts; each file resumes independently if interrupted.
    repo = GPT2_HF_REPOS[name_or_path]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "huggingface" / repo.replace("/", "--")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache folder {folder} is a file")
    created = [d for d in [folder, *folder.parents] if not d.exists()]  # to remove again if nothing arrives
    files = []
    for fname in ("config.json", "model.safetensors"):
        url = f"{base_url.rstrip('/')}/{repo}/resolve/main/{fname}"
        try:
            files.append(download(url, folder / fname, progress=progress))
        except ConnectionError as e:
            for d in created:  # deepest first; a folder holding a resumable .part stays
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise ConnectionError(f"cannot fetch {name_or_path}'s {fname} ({e}); check the network, or pass a "
                                  "local folder holding model.safetensors and config.json") from None
    return files[1], files[0]


def from_pretrained(name_or_path: str = "gpt2", cache_dir=None, device="cpu", *, progress: bool = True,
                    base_url: str = HF_BASE_URL) -> TransformerLM:
    """A TransformerLM holding OpenAI's GPT-2 weights (`model.config` is its ModelConfig).

    name_or_path: "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" (downloaded once from the Hugging Face
    Hub into `cache_dir`, default default_cache_dir()/huggingface/<repo>; resumable, atomic), or a local
    folder with model.safetensors + config.json, or a .safetensors file with config.json beside it.
    Offline with nothing cached: one ConnectionError line. Pair it with tokenizer.gpt2_tokenizer().
    """
    dev = resolve_device(device)  # checked first: a bad device should not cost a 500 MB download
    weights, config = _pretrained_files(str(name_or_path), cache_dir, progress, base_url)
    try:
        hf = json.loads(Path(config).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{config} is not a JSON object")
    cfg = gpt2_config_from_hf(hf)
    state = gpt2_state_dict_from_hf(read_safetensors(weights), cfg, weights)
    # Built on the "meta" device (shapes only, no memory, no random init -- which alone takes ~40 s for
    # GPT-2 small on a CPU), then the loaded tensors are assigned in place of the parameters. The strict
    # check proves every parameter received a GPT-2 tensor of the right shape; the head is re-tied.
    with torch.device("meta"):
        model = TransformerLM.from_config(cfg)
    load_model_state(model, state, src=weights, assign=True)
    model.token_embeddings.weight = model.lm_head.weight
    model.aux_loss = torch.zeros(())
    return model.to(dev).eval()


# ---- Sampling from a checkpoint: `model.py generate` and `train.py sample` both call it ----

def fit_to_context(prompt: list, max_new_tokens: int, context_length: int) -> tuple[list, int, list[str]]:
    """Make prompt + new tokens fit the model's window: a prompt longer than context_length - 1 keeps its
    LAST tokens (the ones nearest the continuation); then max_new_tokens shrinks to the room left.
    Returns (prompt, max_new_tokens, notes for the user)."""
    # e.g. context 32, a 40-token prompt and 5 new tokens: keep the prompt's last 31 tokens, generate 1
    notes = []
    keep = max(1, context_length - 1)
    if len(prompt) > keep:
        notes.append(f"prompt of {len(prompt)} tokens cut from the left to its last {keep} (context length "
                     f"{context_length})")
        prompt = prompt[-keep:]
    room = context_length - len(prompt)
    if max_new_tokens > room:
        notes.append(f"max_new_tokens reduced from {max_new_tokens} to {room} to fit the context length "
                     f"{context_length}")
        max_new_tokens = room
    return prompt, max_new_tokens, notes


def _load_gpt2_tokenizer():
    """tokenizer.gpt2_tokenizer(), with the failure it has offline turned into one clear line."""
    try:
        return tk.gpt2_tokenizer()
    except Exception as e:  # tiktoken raises network, file and key errors of many types
        raise ConnectionError(f"GPT-2's tokenizer could not be loaded (tiktoken needs its 'gpt2' files from the "
                              f"network or TIKTOKEN_CACHE_DIR): {type(e).__name__}: {str(e)[:200]}") from None


def sample_from_checkpoint(checkpoint=None, prompt: str = "", *, pretrained: Optional[str] = None, tokenizer=None,
                           prompt_ids: Optional[list] = None, num_samples: int = 1, max_new_tokens: int = 200,
                           temperature: float = 0.8, top_p: float = 0.95, seed: int = 0, device="cpu",
                           eos_id: Optional[int] = None, use_cache: bool = True, cache_dir=None,
                           note: Optional[Callable[[str], None]] = None) -> dict:
    """Load a model (a train.py `checkpoint`, or `pretrained` GPT-2) and its tokenizer, and sample.

    tokenizer: a Tokenizer, a tokenizer folder, or None (the run's `tokenizer/` folder next to the
    checkpoint or recorded in it; GPT-2's for `pretrained`). prompt_ids: token ids instead of text (no
    tokenizer needed). An empty prompt starts a new document after <|endoftext|>; generation stops at
    `eos_id` (default the tokenizer's <|endoftext|>). temperature 0 = greedy. Every option is checked
    before anything is loaded; a prompt too long for the context is cut from the left (see
    fit_to_context) and `note` (default: a line on stderr) says so.
    Returns {"texts": prompt + continuation per sample (None without a tokenizer), "ids": new token ids
    per sample, "prompt_ids": the ids actually used, "seconds": generation time}.
    """
    note = note or (lambda msg: print(f"[note] {msg}", file=sys.stderr, flush=True))
    # 1. every option that can be checked without loading anything (a typo costs nothing)
    check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           num_samples=num_samples, seed=seed)
    if (checkpoint is None) == (pretrained is None):
        raise ValueError("give exactly one of a checkpoint or a pretrained model name")
    if prompt_ids is not None and any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in prompt_ids):
        raise ValueError(f"prompt ids must be integers >= 0, got {list(prompt_ids)[:10]}")
    dev = resolve_device(device)
    # 2. the tokenizer and the model; the checkpoint is read once, and its tokenizer fingerprint checked
    if isinstance(tokenizer, (str, os.PathLike)):
        if not os.path.isfile(os.path.join(tokenizer, "vocab.json")):
            raise FileNotFoundError(f"tokenizer folder {tokenizer} has no vocab.json")
        tokenizer = tk.Tokenizer.load(str(tokenizer))
    if pretrained is not None:
        if tokenizer is None and prompt_ids is None:
            tokenizer = _load_gpt2_tokenizer()
        model = from_pretrained(pretrained, cache_dir, dev)
    else:
        ckpt = read_checkpoint(checkpoint)
        if tokenizer is None and prompt_ids is None:
            tok_dir = find_tokenizer_dir(checkpoint, ckpt)
            if tok_dir is None:
                raise FileNotFoundError(f"no tokenizer found for {checkpoint} (looked for a tokenizer/ folder next "
                                        "to it and the one it records); pass a tokenizer folder or prompt ids")
            tokenizer = tk.Tokenizer.load(tok_dir)
        model, _ = _model_from_checkpoint(ckpt, checkpoint, dev, tokenizer)
    # 3. the prompt, checked against this model's vocabulary and cut to its context
    cfg = model.config
    eos = eos_id if eos_id is not None else (tokenizer.eot_id if tokenizer is not None else None)
    if eos is not None and not 0 <= eos < cfg.vocab_size:
        raise ValueError(f"eos id {eos} is outside the model's vocabulary [0, {cfg.vocab_size})")
    if prompt_ids is not None:
        ids = list(prompt_ids)
    else:
        ids = tokenizer.encode(prompt) if prompt else ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
        if not ids:
            raise ValueError("empty prompt and the tokenizer has no <|endoftext|> token to start a document from")
    bad = [t for t in ids if t >= cfg.vocab_size]
    if bad or not ids:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {cfg.vocab_size})"
                         if bad else "the prompt is empty")
    n_given = len(ids)
    ids, n_new, notes = fit_to_context(ids, max_new_tokens, cfg.context_length)
    for msg in notes:
        note(msg)
    # 4. sample: num_samples copies of the prompt as one batch (one prefill, KV cache), seeded per run
    gen = torch.Generator(device=dev).manual_seed(seed)
    t0 = time.perf_counter()
    outs = generate(model, [ids] * num_samples, n_new, temperature=temperature, top_p=top_p, eos_id=eos,
                    use_cache=use_cache, generator=gen)
    seconds = time.perf_counter() - t0
    texts = None
    if tokenizer is not None:
        # the text shows the prompt the model actually saw (its kept tail, when it was cut)
        head = prompt if prompt_ids is None and len(ids) == n_given else tokenizer.decode(ids)
        texts = [head + tokenizer.decode([t for t in out if t != eos]) for out in outs]
    return {"texts": texts, "ids": outs, "prompt_ids": ids, "seconds": seconds}


# ===== Appendix: benchmarks =====
# The speed peers and the side-by-side benchmarks behind the README's figures (`python model.py bench`).

# The peer for the training-step benchmark: the same default architecture written with torch's own
# layers (nn.Linear, F.rms_norm, F.scaled_dot_product_attention, F.silu), the way a user would write
# it without this file. It shares our state-dict names, so the same weights load into both and the
# benchmark compares equal models; our from-scratch version should cost no more than ~10% extra.

class _TorchLayersBlock(nn.Module):
    """Default-switch block (pre-norm RMSNorm, RoPE, SwiGLU, full causal MHA) from nn.Linear, F.rms_norm,
    F.scaled_dot_product_attention and F.silu. Same state-dict names, so our weights load into it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, cfg.d_ff
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.ln1, self.ln2 = (nn.ParameterDict({"weight": nn.Parameter(torch.ones(d))}) for _ in range(2))
        self.attn = nn.ModuleDict({name: nn.Linear(d, d, bias=False) for name in ("q_proj", "k_proj", "v_proj",
                                                                                  "output_proj")})
        self.ffn = nn.ModuleDict({"w1": nn.Linear(d, f, bias=False), "w2": nn.Linear(f, d, bias=False),
                                  "w3": nn.Linear(d, f, bias=False)})

    def forward(self, x, rope, positions):  # x (B, T, d)
        B, T, d = x.shape
        H, dh, attn, ffn = self.num_heads, self.head_dim, self.attn, self.ffn
        h = F.rms_norm(x, (d,), self.ln1["weight"], eps=1e-5)       # pre-norm
        q = attn["q_proj"](h).view(B, T, H, dh).transpose(1, 2)     # (B, H, T, dh)
        k = attn["k_proj"](h).view(B, T, H, dh).transpose(1, 2)
        v = attn["v_proj"](h).view(B, T, H, dh).transpose(1, 2)
        q, k = rope(q, positions), rope(k, positions)  # torch has no RoPE layer: the same function as ours
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attn["output_proj"](a.transpose(1, 2).reshape(B, T, d))
        h = F.rms_norm(x, (d,), self.ln2["weight"], eps=1e-5)
        return x + ffn["w2"](F.silu(ffn["w1"](h)) * ffn["w3"](h))  # SwiGLU


class TorchLayersLM(nn.Module):
    """The speed/correctness peer of TransformerLM for the default switches, built from torch's layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if (cfg.norm, cfg.norm_position, cfg.position, cfg.ffn, cfg.num_experts, cfg.attention, cfg.qk_norm,
                cfg.tie_embeddings) != ("rmsnorm", "pre", "rope", "swiglu", 0, "full", False, False) \
                or cfg.num_kv_heads != cfg.num_heads or cfg.mixer != "attention" or cfg.dropout or cfg.attn_dropout:
            raise ValueError("TorchLayersLM only mirrors the default switches")
        self.config = cfg
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([_TorchLayersBlock(cfg) for _ in range(cfg.num_layers)])
        self.ln_final = nn.ParameterDict({"weight": nn.Parameter(torch.ones(cfg.d_model))})
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryPositionalEmbedding(cfg.rope_theta, cfg.head_dim, cfg.context_length)

    def forward(self, token_ids):  # (B, T) -> (B, T, V), the same computation as TransformerLM.forward
        positions = torch.arange(token_ids.shape[1], device=token_ids.device)
        x = self.token_embeddings(token_ids)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, self.rope, positions)
        return self.lm_head(F.rms_norm(x, (x.shape[-1],), self.ln_final["weight"], eps=1e-5))


def _row(what: str, command: str, shape: str, ours: str, peer: str, ratio: str) -> str:
    # one markdown row: | stage | what | command | ours | peer | ratio | (the shape goes into "what")
    return f"| model | {what} ({shape}) | `{command}` | {ours} | {peer} | {ratio} |"


# Timing: each candidate runs once per round, alternating (A B A B ...), and the median over rounds is
# reported. On a shared machine load comes and goes; interleaving exposes both sides to the same load,
# so the RATIO stays meaningful even when the absolute numbers drift.

def _interleaved(fns: list, repeats: int) -> tuple[list[float], list]:
    """Median wall-clock seconds of each fn, run alternately (A B A B ...) so load changes hit all alike,
    and what each fn returned the last time."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], results


def bench_kv(args) -> list[str]:
    """KV-cache decoding against recomputing the whole sequence every step, same random model, greedy.

    Both must produce the SAME tokens (checked), so the ratio is pure speed. Recompute does O(T) work per
    new token (T = prompt + tokens so far), the cache O(1) positions plus attention over T cached keys;
    the gap grows with the prompt length, hence the two prompt lengths."""
    rows = []
    for prompt_len in [int(p) for p in str(args.kv_prompt).split(",")]:
        torch.manual_seed(0)
        n = args.kv_new_tokens
        cfg = ModelConfig(vocab_size=args.vocab_size, context_length=prompt_len + n, d_model=args.d_model,
                          num_layers=args.num_layers, num_heads=args.num_heads)
        model = TransformerLM.from_config(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (prompt_len,)).tolist()
        runs = [functools.partial(generate, model, prompt, n, temperature=0, use_cache=c) for c in (True, False)]
        generate(model, prompt, 4, temperature=0), generate(model, prompt, 4, temperature=0, use_cache=False)  # warm-up
        (t_cache, t_full), (cached, full) = _interleaved(runs, args.repeats)
        if cached != full:
            raise AssertionError("KV-cache greedy output differs from recompute output")
        print(f"[kv] d={cfg.d_model} L={cfg.num_layers} V={cfg.vocab_size} prompt {prompt_len} + {n} new tokens: "
              f"cache {n / t_cache:.1f} tok/s, recompute {n / t_full:.1f} tok/s, speedup {t_full / t_cache:.2f}x "
              f"(outputs identical)", flush=True)
        shape = (f"d{cfg.d_model} L{cfg.num_layers} H{cfg.num_heads} V{cfg.vocab_size}, prompt {prompt_len}, "
                 f"{n} new, greedy, batch 1")
        rows.append(_row("KV-cache decode vs recompute-everything (tokens/s)", "python model.py bench --only kv",
                         shape, f"{n / t_cache:.1f} tok/s", f"{n / t_full:.1f} tok/s (recompute)",
                         f"{t_full / t_cache:.2f}x"))
    return rows


def _read_corpus(path: Optional[str]) -> tuple[bytes, str]:
    """The spec bench's training text: --text FILE, else this file's own source (always there, so the bench
    runs anywhere; a real text such as tinyshakespeare gives the pair more to agree on)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--text {path} does not exist")
        return Path(path).read_bytes(), os.path.basename(path)
    return Path(os.path.abspath(__file__)).read_bytes(), "model.py source"


def _quick_train(model: TransformerLM, data: np.ndarray, steps: int, batch: int, seq: int, lr: float,
                 label: str) -> float:
    """AdamW steps on byte tokens so the speculative pair predicts something real: 5% warmup, cosine decay
    to 10%. (A bench-only loop: train.py is the real trainer, but model.py may not import it.)"""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)
    model.train()
    loss, warmup = float("nan"), max(1, steps // 20)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, y = (torch.from_numpy(a) for a in sample_windows(data, batch, seq, rng))  # (B, T) each
        loss_t = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = loss_t.item()
        if step % max(1, steps // 4) == 0 or step == steps - 1:
            print(f"  [{label}] step {step + 1}/{steps} loss {loss:.3f}", flush=True)
    model.eval()
    return loss


def _cached_byte_model(data: np.ndarray, digest: str, ctx: int, shape: tuple, steps: int, args, role: str):
    """A byte-level TransformerLM of shape (d, L, H) trained on `data` (the text's first 95%), from the cache
    folder when the same text, shape and training settings were trained before (an atomic checkpoint that
    read_checkpoint reads, so an interrupted run leaves nothing half-written)."""
    d, L, H = shape
    key = json.dumps([digest, ctx, shape, steps, args.spec_train_batch, args.spec_train_seq, args.spec_lr])
    path = Path(args.spec_cache) / f"spec-{role}-d{d}-L{L}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    if path.is_file():
        model, ckpt = load_checkpoint_model(path)
        print(f"[spec] {role} d{d} L{L} from {path} (final training loss {ckpt['loss']:.3f})")
        return model.eval()
    torch.manual_seed(0)
    model = TransformerLM(256, ctx, d, L, H)
    print(f"[spec] training the byte-level {role} d{d} L{L} ({num_params(model) / 1e6:.2f}M) for {steps} steps "
          f"of {args.spec_train_batch}x{args.spec_train_seq} bytes; cached in {path}", flush=True)
    loss = _quick_train(model, data, steps, args.spec_train_batch, args.spec_train_seq, args.spec_lr, role)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.config.to_dict(),
                "loss": loss}, tmp)
    os.replace(tmp, path)
    return model.eval()


def _spec_pair(args):
    """bench_spec's models and prompts: two checkpoints, or (by default) a byte-level pair (vocab 256) trained
    on the first 95% of the same text, the prompts cut from the held-out rest. The default target (d128, 12
    layers) is 2x wider and 12x deeper than the draft (d64, 1 layer): at batch 1 a decoding step is bound by
    per-layer overhead and weight reads, so the target costs >= 10x the draft per token. Returns (target,
    draft, prompts, what they were trained on)."""
    n = args.spec_prompt
    if args.target_checkpoint:
        target, draft = (load_checkpoint_model(p)[0] for p in (args.target_checkpoint, args.draft_checkpoint))
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, target.config.vocab_size, (args.spec_prompts, n), generator=g).tolist()
        return target, draft, prompts, "checkpoints"
    raw, source = _read_corpus(args.text)
    data = np.frombuffer(raw, dtype=np.uint8)  # byte-level tokens: vocab 256, no tokenizer needed
    split = int(len(data) * 0.95)
    held_out = data[split:]
    if len(held_out) < max(n * args.spec_prompts, args.spec_train_seq + 1):  # checked before any training
        raise ValueError(f"--text {source} is too short: its held-out 5% has {len(held_out)} bytes, fewer than "
                         f"{args.spec_prompts} prompts of {n} or one window of {args.spec_train_seq + 1}")
    digest = hashlib.sha256(raw).hexdigest()
    ctx = max(n + args.spec_new_tokens, args.spec_train_seq)
    target = _cached_byte_model(data[:split], digest, ctx, (args.target_d_model, args.target_num_layers,
                                                          args.target_num_heads), args.spec_train_steps, args, "target")
    draft = _cached_byte_model(data[:split], digest, ctx, (args.draft_d_model, args.draft_num_layers,
                                                         max(1, args.draft_d_model // 32)), args.draft_train_steps,
                               args, "draft")
    with torch.no_grad():  # the quality of each model on text neither saw: mean next-byte loss (nats)
        x, y = (torch.from_numpy(a) for a in sample_windows(held_out, 16, args.spec_train_seq,
                                                             np.random.default_rng(1)))
        losses = [F.cross_entropy(m(x).flatten(0, 1), y.flatten()).item() for m in (target, draft)]
    print(f"[spec] held-out loss: target {losses[0]:.3f}, draft {losses[1]:.3f} nats per byte")
    starts = np.linspace(0, len(held_out) - n, args.spec_prompts).astype(int)
    return target, draft, [[int(b) for b in held_out[s0:s0 + n]] for s0 in starts], source


def speculative_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Leviathan et al.'s expected wall-time improvement (their Theorem 3.8): each target pass yields
    (1 - alpha^(k+1)) / (1 - alpha) tokens on average and costs one target step plus k draft steps
    (cost_ratio c = draft time / target time per token): speed-up = (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)).
    e.g. alpha 0.8, k 4, c 0.1: 3.36 tokens per pass for 1.4 target steps, 2.40x."""
    tokens = k + 1 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens / (k * cost_ratio + 1)


def bench_spec(args) -> list[str]:
    """Speculative decoding against the target decoding alone, greedy and sampled, for each k of the sweep.

    All runs (the target alone greedy and sampled, the draft alone, and speculative decoding at every k, greedy
    and sampled) are interleaved, so load hits all alike. Greedy speculative output must equal the target's
    greedy output token for token (checked). Printed per k: alpha (see speculative_speedup), tokens per
    target pass, Leviathan et al.'s predicted speed-up from alpha and the measured cost ratio c, and the
    measured speed-up. The table rows report the best k of each mode."""
    target, draft, prompts, source = _spec_pair(args)
    n, T, ks = args.spec_new_tokens, args.spec_temperature, [int(k) for k in str(args.k).split(",")]

    def alone(model, temp):  # one prompt after another, as speculative_generate decodes them
        g = torch.Generator().manual_seed(1)
        return [generate(model, p, n, temperature=temp, generator=g)[0] for p in prompts]

    def spec(k, temp):
        return speculative_generate(target, draft, prompts, n, k=k, temperature=temp,
                                    generator=torch.Generator().manual_seed(1), return_stats=True)

    runs = [functools.partial(alone, target, 0), functools.partial(alone, target, T),
            functools.partial(alone, draft, 0)]
    runs += [functools.partial(spec, k, temp) for k in ks for temp in (0, T)]
    speculative_generate(target, draft, prompts[:1], 8, k=2)  # warm-up
    times, results = _interleaved(runs, args.repeats)
    c = times[2] / times[0]  # draft / target wall time per token, both decoding alone
    print(f"[spec] {len(prompts)} held-out prompts of {args.spec_prompt} bytes, {n} new each; target alone "
          f"{len(prompts) * n / times[0]:.1f} tok/s greedy; draft alone {len(prompts) * n / times[2]:.1f} tok/s: "
          f"target/draft cost per token {1 / c:.1f}x")
    print(f"[spec] {'k':>2s} {'mode':8s} {'alpha':>6s} {'tok/pass':>8s} {'predicted':>9s} {'measured':>8s}")
    best = {}
    for i, k in enumerate(ks):
        for j, (mode, temp) in enumerate((("greedy", 0), (f"T={T}", T))):
            out, st = results[3 + 2 * i + j]
            if temp == 0 and out != results[0]:
                raise AssertionError(f"speculative greedy output (k={k}) differs from the target's greedy output")
            base = times[0] if temp == 0 else times[1]
            row = (k, st, speculative_speedup(st["alpha"], k, c), base / times[3 + 2 * i + j], base)
            print(f"[spec] {k:2d} {mode:8s} {st['alpha']:6.2f} {st['tokens_per_target_forward']:8.2f} "
                  f"{row[2]:8.2f}x {row[3]:7.2f}x" + ("  (output identical)" if temp == 0 else ""))
            best[mode] = max(best.get(mode, row), row, key=lambda r: r[3])
    if target.config.vocab_size == 256:
        print(f"[spec] target greedy sample: {bytes(prompts[0] + results[0][0]).decode('utf-8', errors='replace')!r}")
    tc, dc = target.config, draft.config
    shape = (f"target d{tc.d_model} L{tc.num_layers}, draft d{dc.d_model} L{dc.num_layers}, target/draft cost "
             f"{1 / c:.1f}x per token, {source}, {len(prompts)} held-out prompts of {args.spec_prompt}, {n} new")
    total = len(prompts) * n
    return [_row(f"speculative decoding, {mode}, best of k={args.k}: k={k} (alpha {st['alpha']:.2f}, "
                 f"{st['tokens_per_target_forward']:.2f} tokens per target pass, predicted {pred:.2f}x"
                 f"{'; output identical to target greedy' if mode == 'greedy' else ''})",
                 "python model.py bench --only spec", shape, f"{total * speed / base:.1f} tok/s",
                 f"{total / base:.1f} tok/s (target alone)", f"{speed:.2f}x")
            for mode, (k, st, pred, speed, base) in best.items()]


def bench_train(args) -> list[str]:
    """One training step (forward + backward) of our from-scratch model on the sdpa fast path against the
    same architecture built from torch's layers (TorchLayersLM), with identical weights (the max logit
    difference is printed, so the comparison is like for like). Ratio = our time / torch's time."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab_size, context_length=args.train_seq, d_model=args.d_model,
                      num_layers=args.num_layers, num_heads=args.num_heads, attn_impl="sdpa")
    ours = TransformerLM.from_config(cfg)
    peer = TorchLayersLM(cfg)
    peer.load_state_dict(ours.state_dict())  # identical weights: the two must compute the same logits
    # random ids and targets suffice: the cost of a step does not depend on what the tokens are
    x = torch.randint(0, cfg.vocab_size, (args.train_batch, cfg.context_length))
    y = torch.randint(0, cfg.vocab_size, (args.train_batch, cfg.context_length))
    with torch.no_grad():
        diff = (ours(x) - peer(x)).abs().max().item()

    def step(model):  # forward + loss + backward; gradients dropped so each step starts the same way
        def fn():
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            for p in model.parameters():
                p.grad = None
        return fn

    step(ours)(), step(peer)()  # warm-up: first calls pay for allocator growth and kernel selection
    (t_ours, t_peer), _ = _interleaved([step(ours), step(peer)], args.train_repeats)
    tokens = x.numel()
    print(f"[train] fwd+bwd d={cfg.d_model} L={cfg.num_layers} T={cfg.context_length} B={args.train_batch}: "
          f"ours {tokens / t_ours:.0f} tok/s, torch layers {tokens / t_peer:.0f} tok/s, time ratio "
          f"{t_ours / t_peer:.3f}x (lower is better); same weights, max |logit diff| {diff:.1e}")
    shape = (f"d{cfg.d_model} L{cfg.num_layers} H{cfg.num_heads} V{cfg.vocab_size}, T={cfg.context_length} "
             f"B={args.train_batch}, fp32")
    return [_row("training step fwd+bwd, sdpa fast path vs torch layers (time ratio, lower is better)",
                 "python model.py bench --only train", shape, f"{tokens / t_ours:.0f} tok/s",
                 f"{tokens / t_peer:.0f} tok/s (nn.Linear/F.rms_norm/F.sdpa/F.silu)", f"{t_ours / t_peer:.3f}x")]


_MIXER_BENCH = {"attention": {}, "mla": {"mixer": "mla"}, "linear": {"mixer": "linear"},
                "hyena": {"mixer": "hyena", "position": "nope"}}


def bench_mixers(args) -> list[str]:
    """The mixers side by side against softmax attention (sdpa), same width, heads and depth:
    (1) one block's forward + backward at each --mixer-seq length, where attention's O(T^2) should lose to
    linear attention's O(T) and Hyena's O(T log T) as T grows; (2) greedy decoding of --kv-new-tokens after
    a --mixer-prompt-token prompt with each mixer's cache or state, with its bytes per cached token."""
    rows, d, H = [], args.d_model, args.num_heads
    for T in [int(t) for t in str(args.mixer_seq).split(",")]:
        x = torch.randn(1, T, d)
        blocks = {}
        for name, sw in _MIXER_BENCH.items():
            torch.manual_seed(0)
            blocks[name] = TransformerBlock(d, H, config=ModelConfig(vocab_size=1, context_length=T, d_model=d,
                                                                     num_layers=1, num_heads=H, **sw))

        def step(block):  # forward + backward of one block on one sequence
            block(x).square().mean().backward()

        fns = [functools.partial(step, b) for b in blocks.values()]
        [f() for f in fns]  # warm-up
        times = dict(zip(blocks, _interleaved(fns, args.repeats)[0]))
        print(f"[mixers] block fwd+bwd d={d} H={H} T={T}: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()), flush=True)
        for name in ("mla", "linear", "hyena"):
            rows.append(_row(f"one block fwd+bwd, {name} vs softmax attention (time ratio, lower is better)",
                             "python model.py bench --only mixers", f"d{d} H{H}, T={T}, batch 1, fp32",
                             f"{times[name] * 1e3:.1f} ms", f"{times['attention'] * 1e3:.1f} ms (sdpa attention)",
                             f"{times[name] / times['attention']:.2f}x"))
    return rows + _bench_mixer_decode(args)


def _bench_mixer_decode(args) -> list[str]:
    """Part (2) of bench_mixers: tokens/s of greedy decoding with each mixer's cache, against attention's."""
    rows, n, P = [], args.kv_new_tokens, args.mixer_prompt
    models = {}
    for name, sw in _MIXER_BENCH.items():
        torch.manual_seed(0)
        models[name] = TransformerLM(args.vocab_size, P + n, args.d_model, args.num_layers, args.num_heads,
                                     **sw).eval()
    prompt = torch.randint(0, args.vocab_size, (P,)).tolist()
    fns = [functools.partial(generate, m, prompt, n, temperature=0) for m in models.values()]
    [generate(m, prompt, 2, temperature=0) for m in models.values()]  # warm-up
    speed = {name: n / t for name, t in zip(models, _interleaved(fns, args.repeats)[0])}
    shape = (f"d{args.d_model} L{args.num_layers} H{args.num_heads} V{args.vocab_size}, prompt {P}, {n} new, "
             "greedy, batch 1")
    print(f"[mixers] decode {shape}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in speed.items()), flush=True)
    for name in ("mla", "linear", "hyena"):
        cfg, base = models[name].config, models["attention"].config
        what = (f"decode with the {name} cache vs the KV cache (tokens/s; cache "
                f"{kv_cache_bytes_per_token(cfg, 4)} vs {kv_cache_bytes_per_token(base, 4)} bytes/token fp32)")
        rows.append(_row(what, "python model.py bench --only mixers", shape, f"{speed[name]:.1f} tok/s",
                         f"{speed['attention']:.1f} tok/s (attention)", f"{speed[name] / speed['attention']:.2f}x"))
    return rows


def cmd_bench(args) -> None:
    """Run the chosen sections and print one markdown table of figures, each with its command."""
    torch.set_num_threads(args.threads) if args.threads else None
    rows = [row for name in args.only.split(",") for row in BENCH_SECTIONS[name](args)]
    print(f"\nmachine: {tk.machine_label()}")
    print("| stage | what | command | ours | peer | ratio |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


# ---- The accounting tables behind `python model.py table` ----

# GPT-2's four sizes (d_model, layers, heads) at its vocabulary and context, in our modern stack.
GPT2_SIZES = {"gpt2-small": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20),
              "gpt2-xl": (1600, 48, 25)}


def _fmt_bytes(n: float) -> str:
    """Bytes as GiB (2^30), the unit GPU memory is quoted in."""
    return f"{n / 2**30:.2f} GiB"


def cmd_table(args) -> None:
    """`python model.py table`: for each GPT-2 size, parameters (total and non-embedding), forward and
    training FLOPs per token with their split across attention, FFN and LM head, and the memory to train
    it (weights + gradients + optimizer state, then activations for one batch)."""
    print(f"vocab {args.vocab_size}, context {args.context_length}, ffn {args.ffn}, batch {args.batch_size}, "
          f"{args.dtype_bytes}-byte numbers, optimizer {args.optimizer}, attention FLOPs "
          f"{'causal average' if not args.full_attention_flops else 'full rows'}")
    header = (f"{'config':12s} {'d':>5s} {'L':>3s} {'H':>3s} {'d_ff':>5s} {'params':>8s} {'non-emb':>8s} "
              f"{'fwd GF/tok':>10s} {'train GF/tok':>12s} {'attn%':>6s} {'ffn%':>6s} {'head%':>6s} "
              f"{'params+grads+opt':>17s} {'activations':>12s} {'total':>10s}")
    print(header)
    print("-" * len(header))
    for name, (d, L, H) in GPT2_SIZES.items():
        cfg = ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=d, num_layers=L,
                          num_heads=H, ffn=args.ffn, tie_embeddings=args.tie_embeddings)
        causal = not args.full_attention_flops
        # the share of forward FLOPs in attention / FFN / LM head shows where a size spends its compute:
        # the LM head's share falls as d grows, attention's grows with context
        br = flops_breakdown(cfg, causal_average=causal)
        fwd = sum(br.values())
        mem = memory_estimate(cfg, args.batch_size, args.optimizer, args.dtype_bytes)
        state = mem["params"] + mem["grads"] + mem["optimizer_state"]
        print(f"{name:12s} {d:5d} {L:3d} {H:3d} {cfg.d_ff:5d} {num_params(cfg) / 1e6:7.1f}M "
              f"{num_params(cfg, include_embeddings=False) / 1e6:7.1f}M {fwd / 1e9:10.3f} "
              f"{flops_per_token(cfg, training=True, causal_average=causal) / 1e9:12.3f} "
              f"{100 * (br['attention_projections'] + br['attention_scores']) / fwd:5.1f}% "
              f"{100 * br['ffn'] / fwd:5.1f}% {100 * br['lm_head'] / fwd:5.1f}% {_fmt_bytes(state):>17s} "
              f"{_fmt_bytes(mem['activations']):>12s} {_fmt_bytes(mem['total']):>10s}")
    _print_cache_table(args)


def _print_cache_table(args) -> None:
    """The decoding-cache side of the table: bytes each generated token adds to the cache, per mixer.
    Decoding is bound by reading weights AND this cache every step, so at long contexts or large batches
    the cache, not the weights, sets the speed and the batch that fits."""
    b = args.dtype_bytes
    print(f"\ndecoding cache per token (all layers, {b}-byte numbers, KiB); MLA at kv_lora_rank d/4 and "
          f"qk_rope_head_dim dh/2; linear attention keeps a fixed state instead (per sequence, MiB)")
    header = (f"{'config':12s} {'MHA':>8s} {'GQA':>13s} {'MQA':>7s} {'MLA':>15s} {'MLA/MHA':>8s} "
              f"{'hyena':>8s} {'linear state':>13s} {'MHA @ ctx':>10s} {'MLA @ ctx':>10s}")
    print(header)
    print("-" * len(header))
    for name, (d, L, H) in GPT2_SIZES.items():
        base = dict(vocab_size=args.vocab_size, context_length=args.context_length, d_model=d, num_layers=L,
                    num_heads=H)
        # GQA with about 4 query heads per key/value head: the largest divisor of H that is <= H / 4
        # (LLaMA-2 70B and Mistral use 8 query heads per KV head; 4 keeps every GPT-2 size divisible).
        # MLA/MHA = (r + dr) / (2 H dh): with r = d/4 and dr = dh/2 that is 1/8 + 1/(4H), about 0.13-0.15.
        g = max(k for k in range(1, H + 1) if H % k == 0 and k <= max(1, H // 4))
        mha, gqa, mqa = (ModelConfig(**base, num_kv_heads=k) for k in (H, g, 1))
        mla = ModelConfig(**base, mixer="mla")
        hyena = ModelConfig(**base, mixer="hyena", position="nope")
        lin = ModelConfig(**base, mixer="linear")
        per = {k: kv_cache_bytes_per_token(c, b) / 1024 for k, c in
               (("mha", mha), ("gqa", gqa), ("mqa", mqa), ("mla", mla), ("hyena", hyena))}
        ctx = args.context_length
        print(f"{name:12s} {per['mha']:8.1f} {per['gqa']:7.1f} (Hkv{g:2d}) {per['mqa']:7.1f} "
              f"{per['mla']:7.1f} (r {mla.kv_lora_rank:3d}) {per['mla'] / per['mha']:8.3f} {per['hyena']:8.1f} "
              f"{decode_state_bytes(lin, ctx, 1, b) / 2**20:13.2f} "
              f"{_fmt_bytes(decode_state_bytes(mha, ctx, 1, b)):>10s} "
              f"{_fmt_bytes(decode_state_bytes(mla, ctx, 1, b)):>10s}")


BENCH_SECTIONS = {"kv": bench_kv, "spec": bench_spec, "train": bench_train, "mixers": bench_mixers}


# ===== Command line =====
#     python model.py table                                    costs of GPT-2-sized configs
#     python model.py generate --checkpoint runs/demo/ckpt.pt --prompt "Once upon a time"
#     python model.py generate --pretrained gpt2 --prompt "The meaning of life is" --temperature 0
#     python model.py bench --only kv                          one benchmark section
# Usage errors are one line on stderr and exit status 2, found before any model is loaded.

def cmd_generate(args) -> None:
    """`python model.py generate`: print samples from a checkpoint or from pretrained GPT-2. Samples go
    to stdout (text, or comma-separated ids without a tokenizer); notes and the speed line to stderr, so
    `> out.txt` keeps only the samples."""
    ids = None
    if args.prompt_ids is not None:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]  # syntax checked by _check_args
    res = sample_from_checkpoint(args.checkpoint, args.prompt, pretrained=args.pretrained, tokenizer=args.tokenizer,
                                 prompt_ids=ids, num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed, device=args.device,
                                 eos_id=args.eos_id, use_cache=not args.no_cache, cache_dir=args.cache_dir)
    for i in range(args.num_samples):  # texts when a tokenizer is known, else the raw ids
        body = res["texts"][i] if res["texts"] is not None else ",".join(map(str, res["ids"][i]))
        print(f"--- sample {i} ---\n{body}")
    n, dt = sum(len(o) for o in res["ids"]), res["seconds"]
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s, cache {'off' if args.no_cache else 'on'}]",
          file=sys.stderr)


def _model_flags(parser, fields: tuple, note: str, **defaults) -> None:
    """--flags for these ModelConfig fields, derived from the dataclass (type, help line), with these defaults."""
    skip = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in fields]
    parser.add_config(ModelConfig, skip=skip, defaults=defaults, note=note)


def build_parser() -> argparse.ArgumentParser:
    """The three subcommands. Defaults are chosen so each runs as written on a laptop CPU: `table` and
    `bench` need nothing else; `generate` needs a checkpoint (from train.py) or --pretrained gpt2."""
    p = tk.OneLineParser(prog="model.py", description="ScratchLM stage 2: the Transformer LM. Print the accounting "
                       "table, generate from a checkpoint or pretrained GPT-2, or run the benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)

    # table: pure arithmetic on configs (num_params, flops_breakdown, memory_estimate); instant
    t = sub.add_parser("table", help="parameters / FLOPs per token / training memory for GPT-2-sized configs")
    _model_flags(t, ("vocab_size", "context_length", "ffn", "tie_embeddings"), " (default {default})",
                 vocab_size=50257, context_length=1024)
    t.add_argument("--batch-size", type=int, default=8, help="batch size for the activation memory (default 8)")
    t.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATES), default="adamw",
                   help="optimizer whose state is counted (default adamw: 2 numbers per parameter)")
    t.add_argument("--dtype-bytes", type=int, default=4, help="bytes per stored number (4 fp32, 2 bf16)")
    t.add_argument("--full-attention-flops", action="store_true",
                   help="count the full T x T attention matrix (Kaplan/PaLM convention) instead of the causal "
                        "average (T+1)/2 keys per query")
    t.set_defaults(func=cmd_table)

    # generate: the model comes from exactly one source (a train.py checkpoint or GPT-2), the prompt from
    # text (needs a tokenizer) or ids (needs none)
    g = sub.add_parser("generate", help="sample text from a train.py checkpoint or pretrained GPT-2")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="path to a train.py checkpoint (.pt)")
    src.add_argument("--pretrained", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl (downloaded once, cached) "
                                          "or a folder with model.safetensors + config.json")
    g.add_argument("--prompt", default="", help="prompt text (default '': start a new document)")
    g.add_argument("--prompt-ids", default=None, help="prompt as comma-separated token ids (no tokenizer needed)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: next to the checkpoint, or "
                                                    "the tokenizer_dir recorded in it; GPT-2's for --pretrained)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass in (0, 1] (default 0.95; 1 = off)")
    g.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")
    g.add_argument("--eos-id", type=int, default=None, help="stop token id (default: the tokenizer's "
                                                            "<|endoftext|>)")
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    g.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    g.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--cache-dir", default=None, help="--pretrained: download folder (default "
                                                     "$SCRATCHLM_CACHE or ~/.cache/scratchlm)")
    g.set_defaults(func=cmd_generate)

    # bench: independent sections; each prints its figures and a markdown row with its command
    _add_bench_flags(sub.add_parser("bench", help="side-by-side speed ratios: KV cache vs recompute, speculative "
                                                  "decoding, training step vs torch's layers, the sequence mixers"))
    return p


# bench's own sizes: (flag, default, lowest allowed value or None, help). The help shows the default, and
# _OPTION_RULES checks the lowest value before any work.
_BENCH_OPTIONS = [
    ("--repeats", 2, 1, "kv/spec/mixers: interleaved repetitions (median)"),
    ("--train-repeats", 7, 1, "train: interleaved repetitions (median)"),
    ("--threads", 0, 0, "torch threads, 0 = torch's choice"),
    ("--kv-prompt", "16,64", None, "kv: prompt length(s), comma-separated"),
    ("--kv-new-tokens", 256, 1, "kv/mixers: new tokens"),
    ("--mixer-seq", "256,1024,4096", None, "mixers: block sequence lengths"),
    ("--mixer-prompt", 512, 1, "mixers: decoding prompt tokens"),
    ("--train-seq", 128, 1, "train: context length"),
    ("--train-batch", 4, 1, "train: batch size"),
    ("--spec-train-steps", 150, 1, "spec: target training steps"),
    ("--draft-train-steps", 600, 1, "spec: draft training steps"),
    ("--spec-train-seq", 128, 2, "spec: training sequence length"),
    ("--spec-train-batch", 16, 1, "spec: training batch size"),
    ("--spec-lr", 3e-3, None, "spec: peak AdamW learning rate"),
    ("--spec-cache", "data_cache/spec", None, "spec: folder of the trained pairs, reused by reruns"),
    ("--spec-prompt", 32, 1, "spec: prompt bytes"),
    ("--spec-prompts", 3, 1, "spec: held-out prompts, decoded in turn"),
    ("--spec-new-tokens", 64, 1, "spec: new tokens per prompt"),
    ("--target-d-model", 128, 1, "spec: target width"),
    ("--target-num-layers", 12, 1, "spec: target layers"),
    ("--target-num-heads", 4, 1, "spec: target heads"),
    ("--draft-d-model", 64, None, "spec: draft width, one head per 32 dims"),
    ("--draft-num-layers", 1, 1, "spec: draft layers"),
    ("-k", "2,3,4,5,6,7,8", None, "spec: draft tokens per target pass, comma-separated: the sweep"),
    ("--spec-temperature", 0.8, None, "spec: temperature of the sampled run"),
]


def _add_bench_flags(b) -> None:
    """`bench`'s options: the sections to run, the shared model shape, and each section's own sizes."""
    b.add_argument("--only", default="kv,spec,train", help="sections: kv, spec, train, mixers (kv,spec,train)")
    # kv, train and mixers share one model shape; spec trains its own byte-level pair
    _model_flags(b, ("vocab_size", "d_model", "num_layers", "num_heads"), " (kv/train/mixers; default {default})",
                 vocab_size=4096, d_model=384, num_layers=6, num_heads=6)
    for flag, default, _, text in _BENCH_OPTIONS:
        b.add_argument(flag, type=type(default), default=default, help=f"{text} ({default})")
    b.add_argument("--text", default=None, help="spec: a text FILE to train the byte-level pair on (e.g. "
                                                "tinyshakespeare.txt; default: this file's source)")
    b.add_argument("--target-checkpoint", default=None, help="spec: use trained checkpoints instead "
                                                             "(needs --draft-checkpoint too)")
    b.add_argument("--draft-checkpoint", default=None, help="spec: draft checkpoint")
    b.set_defaults(func=cmd_bench)


def _ints(text: str, low: int) -> bool:
    """True for comma-separated integers >= low ("16,64")."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    return bool(parts) and all(t.isdigit() and int(t) >= low for t in parts)


_AT_LEAST_1 = ("vocab_size", "context_length", "batch_size", "max_new_tokens", "num_samples", "d_model", "num_layers",
               "num_heads")
# What each option allows, by argparse dest: (passes, the allowed values). Checked before any work, so a bad
# value never costs a model load; options absent from the subcommand (or not given: None) are skipped.
_OPTION_RULES = [
    *[(dest, lambda v: v >= 1, ">= 1") for dest in _AT_LEAST_1],
    *[(dest, lambda v: v >= 0, ">= 0") for dest in ("seed", "eos_id")],
    *[(flag.lstrip("-").replace("-", "_"), lambda v, lo=lo: v >= lo, f">= {lo}")
      for flag, _, lo, _ in _BENCH_OPTIONS if lo is not None],
    ("draft_d_model", lambda v: v >= 32 and v % 32 == 0, "a multiple of 32 (one head per 32 dims)"),
    ("dtype_bytes", lambda v: v in (1, 2, 4, 8), "1, 2, 4 or 8"),
    ("ffn", lambda v: v in FFN_CHOICES, f"one of {', '.join(FFN_CHOICES)}"),
    ("temperature", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    ("spec_temperature", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("prompt_ids", lambda v: _ints(v, 0), "comma-separated integers >= 0"),
    *[(dest, lambda v: _ints(v, 1), "comma-separated integers >= 1") for dest in ("kv_prompt", "mixer_seq", "k")],
    ("spec_lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("spec_cache", lambda v: not os.path.isfile(v), "a folder, not a file"),
    ("only", lambda v: set(v.split(",")) <= set(BENCH_SECTIONS), f"sections among {', '.join(BENCH_SECTIONS)}"),
    ("tokenizer", lambda v: os.path.isfile(os.path.join(v, "vocab.json")), "a tokenizer folder (with vocab.json)"),
    ("pretrained", lambda v: v in GPT2_HF_REPOS or os.path.exists(v), f"one of {sorted(GPT2_HF_REPOS)} or a path"),
    ("cache_dir", lambda v: not os.path.isfile(v), "a folder, not a file"),
]


def _check_args(args) -> Optional[str]:
    """The first problem with the parsed options, as one line naming the option, or None.

    Only checks that need no loading happen here (ranges, files, the device); the rest (an id beyond this
    checkpoint's vocabulary, a mismatched tokenizer) comes right after loading, still before any generation,
    and main turns it into the same one-line error."""
    a = vars(args)

    def opt(dest):
        return "-k" if dest == "k" else "--" + dest.replace("_", "-")
    for dest, passes, allowed in _OPTION_RULES:
        if a.get(dest) is not None and not passes(a[dest]):
            return f"{opt(dest)} must be {allowed}, got {a[dest]!r}"
    for dest in ("checkpoint", "target_checkpoint", "draft_checkpoint", "text"):
        path = a.get(dest)
        if path is not None and not os.path.isfile(path):
            return f"{opt(dest)} {path} " + ("is a directory" if os.path.isdir(path) else "does not exist")
    if a.get("prompt_ids") is not None and a.get("prompt"):
        return "--prompt and --prompt-ids are exclusive: give the prompt one way"
    if bool(a.get("target_checkpoint")) != bool(a.get("draft_checkpoint")):
        return "--target-checkpoint and --draft-checkpoint go together: give both or neither"
    if args.command == "bench" and (args.d_model % args.num_heads or args.target_d_model % args.target_num_heads):
        return "--d-model / --target-d-model must be divisible by --num-heads / --target-num-heads"
    if args.command == "generate":
        try:
            resolve_device(args.device)
        except DeviceUnavailableError as e:
            return f"--device: {e}"
    return None


def main(argv: Optional[list] = None) -> None:
    """Parse, check every option, run. Usage errors and bad inputs (a corrupt checkpoint, an id outside
    the vocabulary, no network for a download) are one line on stderr with exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)  # unknown options and unparsable values: one line, exit 2 (tokenizer.OneLineParser)
    problem = _check_args(args)     # ranges and files: the same, still before any work
    if problem:
        parser.error(problem)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # OSError: missing files, no network, full disk
        print(f"model.py {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
