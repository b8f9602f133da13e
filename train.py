"""
train.py -- Stage 3 of ScratchLM: from raw text to a trained language model in one command.

The problem
-----------
tokenizer.py turns text into integers and model.py turns integers into next-token probabilities, but the
model's weights are random: it has learned nothing. Training fits the weights theta by stochastic gradient
descent on the average next-token loss over the training text,

    L(theta) = - mean over positions t of  log p_theta(x_{t+1} | x_1..x_t)          (nats per token)

using small random batches of windows cut from one long array of token ids.

The idea, in the order this file tells it
-----------------------------------------
  1. The loss and how we report it: cross-entropy written from scratch (stable at huge logits),
     perplexity = exp(loss), and bits per byte (bpb) = total nats / ln 2 / total bytes of text. bpb
     compares models with different tokenizers: longer tokens raise the loss per token, not per byte.
  2. AdamW exactly as in the CS336 handout (a readable per-parameter loop; torch's fused AdamW is the
     fast path, a test proves they agree).
  3. Learning-rate schedules (cosine with warm-up; warm-up, stable, decay) and global-norm clipping.
  4. Batches: random windows of the token array, drawn from a seeded stream so a resumed or distributed
     run sees exactly the batches it should.
  5. The loop: one `train_step` (micro-batches with gradient accumulation, clipping, the update) inside a
     flat `train()`; ddp.py plugs in through TrainHooks, the menu items through Extension.
  6. Evaluation: a sliding-window pass over the validation split that scores every token exactly once.
  7. Checkpoints: atomic, safe to load (`weights_only=True`), complete enough to resume bit-identically.
The menus: other optimizers (Muon, which orthogonalizes each hidden matrix's momentum, as modded-nanogpt
and nanochat do; SOAP, Adam in Shampoo's eigenbasis; muP), the batch size and the gradient noise scale
B_simple (--noise-scale), and cheaper models (distillation, --distill-from; pruning, --prune-sparsity).
The appendices hold the plumbing (a synthetic corpus whose entropy we know exactly, downloads, the cached
text -> tokenizer -> token-file pipeline, presets, devices and threads), the benchmark against nanoGPT,
the sweeps (`python train.py batch-size`: where larger batches stop paying; `python train.py ablate`: the
lecture's architecture and optimizer arguments, measured on the demo model), and the command line:
`python train.py [preset] [--flags]`, `python train.py sample ...`, `python train.py bench-nanogpt`.

What it costs
-------------
Training FLOPs are about 6 * parameters * tokens (forward 2, backward 4 per parameter per token, plus
attention). A ~1M-parameter model on a 2-core CPU sees tens of thousands of tokens per second, so the
default demo takes a few minutes; the `owt` preset is sized for one H100 for 90 minutes. Memory: weights,
gradients and AdamW's two moments are 4 copies of the parameters, plus the activations of one micro-batch.

Sources
-------
  - Kingma & Ba, "Adam: A Method for Stochastic Optimization", arXiv:1412.6980.
  - Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (AdamW), arXiv:1711.05101.
  - Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts" (cosine schedule),
    arXiv:1608.03983.
  - Hu et al., "MiniCPM: Unveiling the Potential of Small Language Models" (warm-up-stable-decay),
    arXiv:2404.06395.
  - Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (blog post, 2024), and
    Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982.
  - Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321.
  - McCandlish et al., "An Empirical Model of Large-Batch Training" (gradient noise scale), arXiv:1812.06162.
  - Hinton et al., "Distilling the Knowledge in a Neural Network", arXiv:1503.02531.
  - Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626, and
    Zhu & Gupta, "To prune, or not to prune" (the gradual sparsity schedule), arXiv:1710.01878.
  - Karpathy, nanoGPT (github.com/karpathy/nanoGPT): the training loop's shape and the CPU recipe that
    `bench-nanogpt` runs side by side; Stanford CS336 assignment 1 for the function names.

Imports: only tokenizer.py and model.py from this project (stages import only to their left).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import errno
import gzip
import hashlib
import itertools
import json
import lzma
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import model as M
import tokenizer as tk
from model import (DeviceUnavailableError, download, load_model_state, read_checkpoint, resolve_device,  # noqa: F401
                   sample_windows, sha256_file)
from tokenizer import EOT, Progress, atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text

# Shared with model.py (one home each, re-exported here under the names the course and ddp.py use):
# resolve_device turns a device name into a torch.device or raises DeviceUnavailableError (a RuntimeError
# like torch's, and a ValueError); read_checkpoint / load_model_state read checkpoints safely;
# sample_windows draws random training windows; download fetches a public file resumably.
_unwrap = M._unwrap_module  # the bare module under torch.compile / DDP wrappers


# ---- 1. The loss: cross-entropy, perplexity, bits per byte ---------------------------------------

def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `targets` under softmax(`logits`), written from scratch.

    logits: (..., V) unnormalized scores; targets: (...) integer ids. Returns a scalar (nats per position).

    -log softmax(z)_y = -z_y + log sum_j exp(z_j). Computing exp(z_j) directly overflows for z ~ 1000
    (float32 exp overflows above ~88), so we subtract the max first, which changes nothing mathematically:
        log sum_j exp(z_j) = m + log sum_j exp(z_j - m),  m = max_j z_j,
    and every exp argument is now <= 0 (the largest term is exactly exp(0) = 1, so the sum is in [1, V]:
    no overflow, and the log never sees 0).
    """
    z = logits.float().reshape(-1, logits.shape[-1])  # (N, V); float32 even under bf16 autocast
    y = targets.reshape(-1)  # (N,)
    m = z.max(dim=-1, keepdim=True).values  # (N, 1)
    log_sum_exp = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(dim=-1))  # (N,)
    # z[i, y_i]: pick each row's target logit without building a one-hot (N, V) matrix
    target_logit = z.gather(1, y.unsqueeze(1)).squeeze(1)  # (N,)
    return (log_sum_exp - target_logit).mean()


def cross_entropy_fast(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fast path: torch's fused log-softmax + NLL (fewer passes over the (N, V) logits). A test proves it
    equals `cross_entropy`; the training loop uses it unless `--loss-impl ours` is given."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def perplexity(loss_nats: float) -> float:
    """exp(mean nats per token): the 'effective number of equally likely next tokens'."""
    return math.exp(min(loss_nats, 700.0))  # clamp: exp(710) overflows a float64


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Tokenizer-independent quality: total code length in bits divided by the text's UTF-8 byte count."""
    return total_nats / math.log(2) / max(total_bytes, 1)


# ---- 2. The optimizer: AdamW, from scratch ------------------------------------------------------------
# Plain SGD moves every weight by lr * gradient. Two problems: coordinates whose gradients are tiny barely
# move, and noisy coordinates jitter. Adam (arXiv:1412.6980) keeps running averages of the gradient (m) and
# of its square (v) per coordinate and steps by m / sqrt(v): about lr in every coordinate, whatever the
# gradient's scale. AdamW (arXiv:1711.05101) applies weight decay directly to the weights instead of adding
# it to the gradient, where Adam's division would rescale it per coordinate.


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, arXiv:1711.05101), in the CS336 handout's form. For each parameter theta
    with gradient g, at step t = 1, 2, ...:

        m <- beta1 * m + (1 - beta1) * g              first moment (momentum)
        v <- beta2 * v + (1 - beta2) * g^2            second moment (per-coordinate scale)
        alpha_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)   bias corrections for m, v starting at 0
        theta <- theta - alpha_t * m / (sqrt(v) + eps)
        theta <- theta - lr * weight_decay * theta    decoupled weight decay (not added to g)

    State per parameter: m and v (2x the parameter memory, the reason optimizer state dominates memory).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        if lr < 0:
            raise ValueError(f"AdamW: invalid learning rate {lr} (must be >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: invalid betas {betas} (each must be in [0, 1))")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: eps ({eps}) and weight_decay ({weight_decay}) must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one pass over every parameter: elementwise updates, so each parameter tensor is handled alone
        # (torch's fused AdamW does the same math in a few large kernels: the fast path)
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if len(state) == 0:  # first step: both moments start at zero (hence the bias corrections)
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)  # m = b1 m + (1-b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = b2 v + (1-b2) g^2
                # m and v start at 0, so early on they underestimate E[g] and E[g^2] by the factors
                # (1 - beta^t); dividing them out is folded into one step size
                alpha_t = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(m, v.sqrt().add_(eps), value=-alpha_t)  # theta -= alpha_t m / (sqrt v + eps)
                if wd != 0:
                    p.mul_(1 - lr * wd)  # decoupled decay, applied after the Adam step (handout order)
        return loss


# ---- 3. Learning-rate schedules and gradient clipping -------------------------------------------------
# Why a schedule at all: early on, Adam's moment estimates are noise, so a full-size step can throw the
# weights somewhere they never recover from (hence warm-up); late in training, a large step keeps the loss
# bouncing around the bottom of the valley, and annealing the rate toward a small value lets it settle.


def get_lr_cosine_schedule(it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int,
                           cosine_cycle_iters: int) -> float:
    """Linear warm-up to max, then half a cosine from max down to min, then min forever (CS336 form; the
    cosine shape is SGDR's, Loshchilov & Hutter, arXiv:1608.03983, without the restarts).

        it < Tw:              lr = it / Tw * max
        Tw <= it <= Tc:       lr = min + 1/2 (1 + cos(pi (it - Tw) / (Tc - Tw))) (max - min)
        it > Tc:              lr = min
    """
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it > cosine_cycle_iters:
        return min_learning_rate
    if cosine_cycle_iters == warmup_iters:
        return max_learning_rate
    progress = (it - warmup_iters) / (cosine_cycle_iters - warmup_iters)
    return min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)


def get_lr_wsd_schedule(it: int, max_learning_rate: float, min_learning_rate: float, warmup_iters: int,
                        total_iters: int, decay_fraction: float = 0.2) -> float:
    """Warm-up, Stable, Decay (Hu et al., "MiniCPM", arXiv:2404.06395; used by nanochat and modded-nanogpt).

        it < Tw:                    lr = it / Tw * max                      (warm-up)
        Tw <= it < Td:              lr = max                                (stable)
        Td <= it <= T:              lr = max + (min - max) (it - Td)/(T - Td)  (linear decay to min)
        it > T:                     lr = min
    with Td = T - decay_fraction * T. Why the field likes it: the run's length need not be known in advance
    (the stable phase can continue, a checkpoint from it can be decayed later), and it matches cosine's
    final loss.
    """
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it > total_iters:
        return min_learning_rate
    decay_start = max(warmup_iters, total_iters - decay_fraction * total_iters)
    if it < decay_start:
        return max_learning_rate
    span = max(total_iters - decay_start, 1e-12)
    return max_learning_rate + (min_learning_rate - max_learning_rate) * (it - decay_start) / span


def schedule_factor(cfg: "TrainConfig", step: int, frac: float) -> float:
    """The learning-rate multiplier in (0, 1] for optimizer step `step` (0-based), given `frac` in [0, 1]:
    how far the run is through its post-warm-up part, by steps or by the time budget (see TimeBudget).

    Warm-up is counted in steps: (step + 1) / warmup_iters, so the very first step already moves
    (lr 0 would waste it) and step warmup_iters - 1 is at the full peak. After it, the CS336 functions
    above are evaluated on the progress fraction itself -- warm-up 0, cycle length 1 -- so the same curve
    fits a run of any length, known in steps or only in seconds. With a step budget T,
    frac = (step - Tw) / (T - Tw), which makes this exactly get_lr_cosine_schedule(step, .., Tw, T).
    """
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.schedule == "cosine":
        return get_lr_cosine_schedule(frac, 1.0, cfg.min_lr_ratio, 0, 1.0)
    if cfg.schedule == "wsd":  # stable, then a linear decay over the last decay_fraction of the run
        return get_lr_wsd_schedule(frac, 1.0, cfg.min_lr_ratio, 0, 1.0, cfg.decay_fraction)
    return 1.0  # "constant"


@torch.no_grad()
def gradient_clipping(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> float:
    """Clip the global L2 norm of all gradients to `max_l2_norm` in place; return the norm before clipping.

    norm = sqrt(sum over params of sum(g^2)); if norm > max: every g *= max / (norm + eps). One global
    norm (not per tensor) keeps the update's direction unchanged; it only limits a rare huge step.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    # the global norm is the norm of all gradients concatenated into one vector: sqrt of summed squares
    total = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
    total_f = float(total)  # one host sync per step; the comparison below needs the number on the CPU
    if total_f > max_l2_norm:
        scale = max_l2_norm / (total_f + eps)
        for g in grads:
            g.mul_(scale)
    return total_f


# ---- 4. Batches: random windows of one long token array -----------------------------------------------
# np.memmap so a 10 GB corpus costs no RAM. A batch is B windows of T+1 consecutive tokens at random
# starts: the first T are the input, the last T (shifted by one) the targets. Random starts (instead of
# walking the file in order) make every batch an unbiased sample of the whole corpus.


def get_batch(dataset, batch_size: int, context_length: int, device, rng: np.random.Generator | None = None):
    """Sample `batch_size` random windows from a 1-D token array (np.memmap or ndarray).

    x[b] = dataset[s_b : s_b + T], y[b] = dataset[s_b + 1 : s_b + T + 1] (the next token at every position),
    with start s_b uniform in [0, n - T - 1]. Returns two int64 tensors of shape (B, T) on `device`.
    `rng` (a numpy Generator) makes the draw reproducible; the training loop derives one from
    (seed, step, rank, micro-step) so a resumed or distributed run draws exactly the batches it should.
    A device that is not on this machine raises DeviceUnavailableError (a RuntimeError, as in torch).
    """
    dev = resolve_device(device)  # first: a bad device fails before any work
    x, y = sample_windows(dataset, batch_size, context_length, rng if rng is not None else np.random.default_rng())
    x, y = torch.from_numpy(x), torch.from_numpy(y)  # (B, T) int64 each, still in CPU memory
    if dev.type == "cuda":  # pinned (page-locked) memory lets the copy to the GPU overlap with compute
        return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
    return x.contiguous().to(dev), y.contiguous().to(dev)


# ---- 5. The training loop ---------------------------------------------------------------------------
# nanoGPT's loop: for every step, the learning rate from the schedule, one train_step (forward, loss and
# backward over grad_accum micro-batches, clip, update), a log line, now and then an evaluation and a
# checkpoint; stop at --max-steps or when the time budget says so. Two small, named mechanisms plug
# things in without branches in the step: TrainHooks (ddp.py runs this same loop on every rank) and
# Extension (the menu items: the noise scale, distillation, pruning). Building and ending a run
# (_setup_run, _finish) and the time budget are in the plumbing appendix.


def model_config(cfg: "TrainConfig", vocab_size: int):
    """model.ModelConfig from the training options (the switches in cfg.model_kw on top)."""
    kw = dict(vocab_size=vocab_size, context_length=cfg.context_length, d_model=cfg.d_model,
              num_layers=cfg.num_layers, num_heads=cfg.num_heads, d_ff=cfg.d_ff, rope_theta=cfg.rope_theta)
    kw.update(cfg.model_kw or {})
    return M.ModelConfig.from_dict(kw)


def build_model(cfg: "TrainConfig", vocab_size: int, device="cpu") -> torch.nn.Module:
    """TransformerLM from model.py, initialized under cfg.seed (same weights on every rank)."""
    torch.manual_seed(cfg.seed)
    model = M.TransformerLM.from_config(model_config(cfg, vocab_size))
    return model.to(device)


@dataclass
class TrainHooks:
    """Extension points for ddp.py, kernels.py and tests. All optional; None = the single-process behaviour.
    `model` is the bare TransformerLM, `run_model` what wrap_model made of it (or the model itself).

    Building the run (in this order, so a wrapper can shard or broadcast the resumed weights, and the optimizer
    holds the parameters the wrapper trains, e.g. FSDP's shards):
      wrap_model(model) -> run_model, used for forward/backward and evaluation (kernels swapped in, DDP, FSDP)
      build_optimizer(model, run_model, cfg) -> optimizer (e.g. ZeRO-1's sharded optimizer)
      load_optimizer_state(optimizer, run_model, ckpt) on resume, with the checkpoint dict (from
          read_checkpoint): e.g. cut a consolidated state into this rank's shards
    Each step:
      get_batch(step, micro) -> (x, y) this rank's micro-batch (ddp.py: its slice of a world-size independent
          global batch; default: get_batch() on the (seed, step, rank, micro) stream)
      no_sync(run_model, is_last_micro_step) -> context manager (skip gradient communication on early micro-steps)
      sync_gradients(run_model) after the last backward, before clipping and the optimizer step: make every
          rank's gradient the full-batch average (wait for DDP's all-reduces, FSDP's reduce-scatters)
      clip_gradients(run_model, optimizer, max_norm) -> global L2 norm before clipping (FSDP: summed over shards)
      all_reduce(tensor) -> tensor summed over ranks (the step loss, the finite-weights check, eval sums)
      on_step(step, model, metrics) after every optimizer step (rank-local)
      progress_note(run_model, train_seconds) -> text appended to the progress line (ddp.py: communication share)
    Checkpoints and the end of the run (COLLECTIVE: train() calls these on every rank, only rank 0 writes):
      checkpoint_state(model, run_model, optimizer) -> dict with the checkpoint's "model" and "optimizer" state
          dicts (full, unsharded) plus any extra primitive entries
      full_model(model, run_model) -> an ordinary module holding the full weights, for the samples
    For models split by layers or by weight matrices (ddp.py's --tp/--pp mesh), which never form full logits:
      loss_and_backward(run_model, x, y, scale) -> the micro-batch's mean cross-entropy (a 0-d tensor, every rank
          the same), after backward of scale * that loss (scale = 1 / grad_accum; gradients add up over calls).
          Replaces the forward / loss / backward of one micro-step (a pipeline schedule runs its own).
      eval_model(model, run_model) -> the module to evaluate (logits from model(x)); COLLECTIVE, called before
          every evaluation (ddp.py gathers the full weights into `model`)
      tokens_per_step: an int, not a callable: the tokens one optimizer step trains on over all ranks, when
          ranks share rows (tensor/pipeline ranks of one replica); default batch_size * T * grad_accum * ranks
    """
    wrap_model: Optional[Callable] = None
    build_optimizer: Optional[Callable] = None
    load_optimizer_state: Optional[Callable] = None
    get_batch: Optional[Callable] = None
    no_sync: Optional[Callable] = None
    sync_gradients: Optional[Callable] = None
    clip_gradients: Optional[Callable] = None
    all_reduce: Optional[Callable] = None
    on_step: Optional[Callable] = None
    progress_note: Optional[Callable] = None
    checkpoint_state: Optional[Callable] = None
    full_model: Optional[Callable] = None
    loss_and_backward: Optional[Callable] = None
    eval_model: Optional[Callable] = None
    tokens_per_step: Optional[int] = None


class Extension:
    """A menu item plugged into the loop (NoiseScaleProbe, Distillation, Pruning, in the menus below).
    train_step and train() call each method of every extension in run.extensions at its point; the
    defaults change nothing, so a subclass writes only the points it needs."""

    def objective(self, run: "Run", x, y, logits, objective):
        """The micro-batch's training objective from its cross-entropy (default: unchanged)."""
        return objective

    def after_backward(self, run: "Run"):
        """After each micro-batch's backward: its gradient has just been added into .grad."""

    def before_update(self, run: "Run"):
        """After the last backward and the gradient sync, before clipping and the optimizer step."""

    def after_step(self, run: "Run", step: int, frac: float):
        """After optimizer step `step` (counted from 1), at run progress `frac` in [0, 1]."""

    def metrics(self, run: "Run") -> dict:
        """Extra entries for this step's metrics row."""
        return {}

    def progress(self, run: "Run") -> str:
        """Text appended to the progress line."""
        return ""

    def report(self, run: "Run", final: dict, eval_seconds: float, n_tokens: int) -> dict:
        """At the end, on rank 0, after the final evaluation: lines to print and entries for the summary."""
        return {}


@dataclass
class Run:
    """Everything one training run holds. _setup_run (plumbing) fills the fields in this order; train_step
    and train() read them."""
    cfg: "TrainConfig"  # every option, validated
    hooks: TrainHooks  # ddp.py's extension points (all None in a single process)
    rank: int = 0  # this process, 0 .. world_size - 1; only rank 0 writes files
    world_size: int = 1  # processes training together
    log: Callable = print  # where progress lines go
    say: Callable = print  # `log` on rank 0, nothing on the other ranks
    t_start: float = 0.0  # when the command started (time.time()): the wall clock of --max-minutes
    device: torch.device = None  # where the model and its batches live
    out: Path = None  # the run folder: ckpt.pt, metrics.jsonl, tokenizer/, loss_curve.png
    ckpt_path: Path = None  # out / "ckpt.pt"
    train_tokens: np.ndarray = None  # the training split: one flat np.memmap of token ids
    val_tokens: np.ndarray = None  # the validation split
    tokenizer: "tk.Tokenizer" = None  # the data's BPE tokenizer
    floor: Optional[float] = None  # entropy floor of the validation split in bits per byte (synthetic data)
    model: torch.nn.Module = None  # the bare TransformerLM
    mcfg: dict = None  # its ModelConfig as a dict (stored in checkpoints)
    tokens_per_step: int = 0  # tokens one optimizer step trains on, over all ranks
    run_model: torch.nn.Module = None  # what forward/backward run: hooks.wrap_model(model), torch.compile
    eval_model: torch.nn.Module = None  # what the evaluations run
    optimizer: torch.optim.Optimizer = None  # build_optimizer's (or hooks.build_optimizer's)
    loss_fn: Callable = None  # cross_entropy_fast or cross_entropy (--loss-impl)
    extensions: list = field(default_factory=list)  # the Extensions switched on
    metrics: Optional["MetricsLog"] = None  # metrics.jsonl (rank 0 only)
    flops_per_tok: float = 0.0  # training FLOPs per token (for MFU)
    peak: Optional[float] = None  # the GPU's peak FLOP/s (None: unknown, no MFU)
    final_eval_tokens: int = 0  # validation tokens of the final evaluation
    budget: "TimeBudget" = None  # --max-steps / --max-minutes: progress through the run, when to stop
    eval_kw: dict = None  # evaluate()'s options, the same for every evaluation of the run
    start_step: int = 0  # 0, or the step a resumed run continues from
    loop_t0: float = 0.0  # the loop clock's zero: time.time() minus the training seconds of earlier processes
    elapsed_before: float = 0.0  # wall-clock seconds of the run's earlier processes (before resumes)
    last_log: tuple = (0.0, 0)  # (time, step) of the last progress line, for the tokens/s since then
    losses: list = field(default_factory=list)  # every step's training loss

    @property
    def main(self) -> bool:
        return self.rank == 0

    def clock(self) -> float:
        """Seconds of training so far, continued across resumes."""
        return time.time() - self.loop_t0

    def minutes(self) -> float:
        """Wall-clock minutes of the whole run so far, all resumed processes included."""
        return (self.elapsed_before + time.time() - self.t_start) / 60


def train_step(run: Run, step: int, lr_factor: float) -> tuple[float, float]:
    """One optimizer step: the learning rate, then forward, loss and backward over grad_accum micro-batches
    (their gradients add up), clipping, the update. Returns (the step's mean loss over all micro-batches and
    ranks, the gradient norm before clipping). ddp.py's pieces come in through run.hooks, the menu's through
    run.extensions."""
    cfg, hooks = run.cfg, run.hooks
    for g in run.optimizer.param_groups:  # every group's peak rate times the schedule's factor in (0, 1]
        g["lr"] = g.get("base_lr", cfg.lr) * lr_factor
    loss_sum = 0.0
    for micro in range(cfg.grad_accum):
        x, y = _micro_batch(run, step, micro)  # (B, T) each
        if hooks.loss_and_backward:  # the model runs its own forward and backward (ddp.py's pipeline / TP mesh)
            loss_sum += hooks.loss_and_backward(run.run_model, x, y, 1.0 / cfg.grad_accum).detach().float()
            continue
        last = micro == cfg.grad_accum - 1
        with hooks.no_sync(run.run_model, last) if hooks.no_sync else contextlib.nullcontext():
            with autocast_context(run.device, cfg.dtype):
                logits = run.run_model(x)  # (B, T, V)
                loss = run.loss_fn(logits, y)  # the logged loss: plain cross-entropy, also when distilling
                objective = loss
                for ext in run.extensions:  # e.g. distillation: the teacher's soft targets
                    objective = ext.objective(run, x, y, logits, objective)
                aux = getattr(run.model, "aux_loss", None)  # mixture-of-experts load balancing, if any
                if isinstance(aux, torch.Tensor) and aux.requires_grad:
                    objective = objective + aux
            # gradients add up over backward calls; dividing each micro-batch's loss by grad_accum makes the
            # sum the gradient of the MEAN loss over all grad_accum * B sequences: one big batch, in pieces
            (objective / cfg.grad_accum).backward()
        loss_sum += loss.detach().float()
        for ext in run.extensions:  # e.g. the noise scale: this micro-batch's own gradient
            ext.after_backward(run)
    if hooks.sync_gradients:  # the one addition to a single-process step: gradients averaged over ranks
        hooks.sync_gradients(run.run_model)
    step_loss = _step_loss(run, step, loss_sum / cfg.grad_accum)  # averaged over ranks; stops on NaN/inf
    for ext in run.extensions:
        ext.before_update(run)
    grad_norm = float("nan")
    if cfg.grad_clip > 0:
        grad_norm = (hooks.clip_gradients(run.run_model, run.optimizer, cfg.grad_clip) if hooks.clip_gradients
                     else gradient_clipping(run.model.parameters(), cfg.grad_clip))
    run.optimizer.step()
    # set_to_none frees the gradient memory until the next backward (cheaper than writing zeros)
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _micro_batch(run: Run, step: int, micro: int):
    """This rank's micro-batch `micro` of optimizer step `step`: (x, y), (B, T) each."""
    if run.hooks.get_batch:
        return run.hooks.get_batch(step, micro)
    # batch = f(seed, step, rank, micro): a resumed run redraws exactly the same batches
    rng = np.random.default_rng([run.cfg.seed, step, run.rank, micro])
    return get_batch(run.train_tokens, run.cfg.batch_size, run.cfg.context_length, run.device, rng)


def train(cfg: "TrainConfig", data: "PreparedData | None" = None, *, hooks: TrainHooks | None = None, rank: int = 0,
          world_size: int = 1, log: Callable = print, t_start: float | None = None) -> dict:
    """Train per cfg; return a summary dict: steps, stop_reason, train_seconds, eval_seconds, tokens, val
    (the final evaluation), entropy_floor_bpb, out_dir, first_losses, last_loss, losses, samples.

    Distributed use (ddp.py): call on every rank with its rank/world_size and hooks (see TrainHooks); each
    rank draws its own batches (by default from the (seed, step, rank) stream; ddp.py's get_batch hook slices
    a world-size independent global batch); only rank 0 logs, writes metrics, checkpoints and samples.
    Ctrl-C (single process): the run saves a checkpoint after the current step and stops (a second Ctrl-C
    stops at once, without saving); `--resume` continues it exactly.
    """
    run = _setup_run(cfg, data, hooks or TrainHooks(), rank, world_size, log, t_start)
    step, stop_reason = run.start_step, None
    with _checkpoint_on_interrupt(enabled=world_size == 1) as interrupted:
        while True:
            # how far the run is (by steps or by the time budget), or why it stops now
            frac, stop_reason = run.budget.progress(step, run.clock())
            if stop_reason:
                break
            loss, grad_norm = train_step(run, step, schedule_factor(cfg, step, frac))
            step += 1
            for ext in run.extensions:  # e.g. pruning: the pruned weights back to zero, the masks grown
                ext.after_step(run, step, frac)
            run.losses.append(loss)
            if run.hooks.on_step is not None:
                run.hooks.on_step(step, run.model, dict(loss=loss))
            _log_step(run, step, loss, grad_norm)
            if step % cfg.eval_interval == 0:
                _periodic_eval(run, step)
            if step % cfg.ckpt_interval == 0 or interrupted():
                _save(run, step)
            if interrupted():
                run.say(f"interrupted: checkpoint saved at step {step} in {run.ckpt_path}; continue with --resume")
                raise KeyboardInterrupt
    return _finish(run, step, stop_reason)


# ---- 6. Evaluation: loss, perplexity and bits per byte on the validation split -----------------------


@torch.no_grad()
def evaluate(model, tokens, *, context_length: int, batch_size: int, device, token_bytes: np.ndarray | None = None,
             max_tokens: int | None = None, dtype: str = "auto", rank: int = 0, world_size: int = 1,
             all_reduce: Callable | None = None, stride: int | None = None,
             equal_batches: bool = False) -> dict:
    """Validation loss, perplexity and bits per byte over the first `max_tokens` of `tokens`.

    Sliding windows of context_length T (+1 for the targets) starting every `stride` tokens (default T:
    consecutive, non-overlapping). Every target token is scored exactly once: the first window scores all
    its T targets, each later one only its last `stride` targets, which therefore see at least T - stride
    tokens of context. Why overlap: with disjoint windows the first targets of each window are predicted
    from almost nothing (e.g. a name chosen before the cut), which measures the cut, not the model; with
    stride T/2 (the training loop's default) every scored token has >= T/2 context, at 2x the compute.
    Same tokens every call, so evals are comparable. Rank r of world_size takes windows r, r + world_size,
    ...; `all_reduce` (ddp.py's) sums [nats, tokens, bytes] across ranks.
    `equal_batches=True` makes every rank run the same number of forward passes (a rank out of windows
    re-runs window 0 and discards the result): needed when the forward itself is a collective (ddp.py's FSDP).
    bpb = sum of nats / ln 2 / sum of UTF-8 bytes of the target tokens (token_bytes[id] from the tokenizer).
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    T = context_length
    stride = T if not stride else int(stride)
    if not 1 <= stride <= T:
        raise ValueError(f"eval stride {stride} must be in [1, context_length={T}]")
    if n - 1 < T:
        raise ValueError(f"validation split has {len(tokens)} tokens, fewer than one context window + 1 "
                         f"({T + 1}); use more validation text or a smaller --context-length")
    # window w covers tokens[w * stride : w * stride + T + 1]; the last one must end inside the n tokens
    n_windows = 1 + (n - 1 - T) // stride
    mine = list(range(rank, n_windows, world_size))  # this rank's share, round-robin
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, bytes
    tb = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64)) if token_bytes is not None else None
    n_batches = -(-len(mine) // batch_size)
    if equal_batches:  # ceil(ceil(windows / ranks) / batch): the same on every rank
        n_batches = -(-(-(-n_windows // world_size)) // batch_size)
    for b in range(n_batches):
        idx = mine[b * batch_size: (b + 1) * batch_size]
        real = bool(idx)  # False only with equal_batches, on a rank that has run out of windows
        idx = idx or [0]
        # the same slicing as get_batch, at fixed starts instead of random ones
        win = np.stack([np.asarray(tokens[w * stride: w * stride + T + 1], dtype=np.int64) for w in idx])
        xy = torch.from_numpy(win)  # (b, T+1)
        x, y = xy[:, :-1].to(device), xy[:, 1:]
        with autocast_context(device, dtype):
            logits = model(x)  # (b, T, V)
        # per-token losses (reduction="none"), summed in float64 below: millions of float32 additions
        # would drift in the last digits, and evals must be comparable to 4 decimals
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1).to(device),
                              reduction="none").reshape(len(idx), T).cpu().double()  # (b, T)
        scored = torch.zeros(len(idx), T, dtype=torch.bool)  # which targets this window scores
        scored[:, T - stride:] = True
        scored[torch.tensor(idx) == 0] = True  # the first window scores everything
        if not real:
            continue
        sums[0] += float(nll[scored].sum())
        sums[1] += int(scored.sum())
        if tb is not None:
            sums[2] += float(tb[y][scored].sum())
    if all_reduce is not None:  # every rank ends with the totals over all ranks
        sums = all_reduce(sums)
    if was_training:
        model.train()
    # loss = mean nats per scored token; bpb = the same total in bits, per byte of the text those tokens are
    nats, count, nbytes = float(sums[0]), int(sums[1]), int(sums[2])
    loss = nats / max(count, 1)
    return dict(loss=loss, ppl=perplexity(loss), bpb=bits_per_byte(nats, nbytes) if nbytes else float("nan"),
                tokens=count, bytes=nbytes)


# ---- 7. Checkpoints: atomic, safe to load, complete enough to resume exactly --------------------------
# torch.load(weights_only=True) only unpickles tensors and primitive containers (dict/list/tuple/str/int/
# float/bool/None), so a malicious checkpoint cannot run code. Everything we store is therefore converted
# to those types: RNG states become tensors/lists, configs become plain dicts. Exact resume needs more
# than the weights: the optimizer's moments, the step (which fixes the batches and the learning rate), the
# loop's clock and budget (which fix the time-based schedule), and every RNG state.


def save_checkpoint(model, optimizer, iteration: int, out, **extra):
    """Write model + optimizer state, iteration, RNG states and any `extra` primitives to `out` (a path,
    written atomically; or a binary file object). The CS336 signature."""
    write_checkpoint(out, iteration, model=_unwrap(model).state_dict(),
                     optimizer=optimizer.state_dict() if optimizer is not None else None, **extra)


def write_checkpoint(out, iteration: int, **entries):
    """The file format of save_checkpoint, from state dicts already in hand (ddp.py's are consolidated from
    shards on every rank): `entries` holds "model", "optimizer" and any extra primitives.

    A path is written through atomic_open: a temporary file in the same folder, renamed over the old
    checkpoint only once complete, so a crash, a kill or a full disk mid-write leaves the previous one."""
    # "format" lets model.read_checkpoint refuse files of another layout with a clear message
    payload = {"format": "scratchlm-checkpoint-v1", "iteration": int(iteration), "rng": rng_state(), **entries}
    if not isinstance(out, (str, os.PathLike)):
        torch.save(payload, out)
        return
    try:
        with atomic_open(out, "wb") as f:
            torch.save(payload, f)
    except OSError as e:  # atomic_open removed its temporary file; say what that means for a checkpoint
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left writing {out}; the previous checkpoint is intact") from None
        raise


def load_checkpoint(src, model, optimizer, restore_rng: bool = True) -> int:
    """Load a checkpoint written by save_checkpoint into `model` (and `optimizer` unless None); restore the
    RNG states; return the iteration (the CS336 signature). A checkpoint that does not fit raises
    model.StateDictMismatchError naming every key (a ValueError, and a RuntimeError as torch raises)."""
    ckpt = read_checkpoint(src)  # weights_only=True: a checkpoint cannot run code
    load_model_state(model, ckpt, src)
    if optimizer is not None:
        load_optimizer_state(optimizer, ckpt, src)
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt["iteration"])


# ===== Menu: other optimizers =====
# Muon (orthogonalized momentum), SOAP (Adam in Shampoo's eigenbasis), the OptimizerGroup that steps two
# optimizers as one, and muP's per-layer learning rates. They plug into the core at one point: the
# optimizer factory build_optimizer (--optimizer, --mup-base-width), which the run calls once at its start.


def zeropower_via_newtonschulz5(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalize a matrix: G = U S V^T  ->  ~ U V^T (all singular values pushed to ~1).

    Newton-Schulz iteration with the quintic polynomial p(x) = a x + b x^3 + c x^5 applied to the singular
    values (X <- a X + b (X X^T) X + c (X X^T)^2 X). The coefficients (3.4445, -4.7750, 2.0315), from
    Keller Jordan's modded-nanogpt, make p steep at 0 so small singular values grow fast; after 5 steps
    they land in roughly [0.7, 1.2], which empirically is as good as exact orthogonalization.
    Normalizing by the Frobenius norm first guarantees every singular value starts <= 1 (inside the
    iteration's basin). We iterate on the wide orientation so X X^T is the smaller Gram matrix.
    """
    assert G.ndim == 2, "Newton-Schulz orthogonalization expects a matrix"
    a, b, c = 3.4445, -4.7750, 2.0315
    # bfloat16 on GPU (the iteration is robust to low precision and it doubles matmul speed); float32 on
    # CPU, where bf16 matmuls are slow.
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T  # (small, large)
    X = X / (X.norm() + eps)
    # each iteration maps every singular value s to p(s) = a s + b s^3 + c s^5 (U and V never change)
    for _ in range(steps):
        A = X @ X.T  # (small, small) Gram matrix
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al. 2024, blog post; Liu et al.,
    arXiv:2502.16982; used by modded-nanogpt and nanochat).

    For a 2-D weight W with gradient G:
        B <- mu * B + (1 - mu) * G                  momentum buffer (an EMA of gradients)
        U  = (1 - mu) G + mu B  if nesterov else B  (Nesterov look-ahead)
        O  = NewtonSchulz5(U) ~ orthogonal factor of U (all singular values ~1)
        W <- W * (1 - lr * weight_decay) - lr * sqrt(max(1, rows/cols)) * O

    Why: the raw gradient of a weight matrix is dominated by a few large singular directions; SGD/Adam
    mostly move along those. Orthogonalizing gives every direction of the update the same size ("steepest
    descent under the spectral norm"), which trains transformer hidden matrices with fewer tokens. It is
    only meant for hidden 2-D matrices: embeddings, the output head and norm gains go to AdamW.
    Cost: ~5 * 3 small matmuls per matrix per step, negligible next to the forward/backward.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        if lr < 0 or not (0.0 <= momentum < 1.0):
            raise ValueError(f"Muon: invalid lr {lr} or momentum {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D weight matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                # lerp_(g, 1 - mu): buf + (1 - mu) (g - buf) = mu buf + (1 - mu) g, in place
                buf.lerp_(g, 1 - mu)  # B = mu B + (1 - mu) G
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                # the orthogonal factor: same row and column spaces as the update, all singular values ~1
                O = zeropower_via_newtonschulz5(update, steps=group["ns_steps"])
                # scale so the per-element RMS of the update is ~independent of the matrix's aspect ratio
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(O, alpha=-lr * scale)
        return loss


class SOAP(torch.optim.Optimizer):
    """SOAP: ShampoO with Adam in the Preconditioner's eigenbasis (Vyas et al., "SOAP: Improving and
    Stabilizing Shampoo using Adam", arXiv:2409.11321). For a 2-D weight W (m, n) with gradient G:

        L <- b2 L + (1 - b2) G G^T        (m, m)   Shampoo's left preconditioner statistics
        R <- b2 R + (1 - b2) G^T G        (n, n)   and right
        every `precondition_frequency` steps (and at step 1): Q_L, Q_R = eigenvectors of L, R (eigh)
        m <- b1 m + (1 - b1) G                     momentum, kept in the ORIGINAL basis
        G' = Q_L^T G Q_R,  M' = Q_L^T m Q_R        gradient and momentum rotated into the eigenbasis
        v <- b2 v + (1 - b2) G'^2                  Adam's second moment, in the ROTATED basis
        W <- W - alpha_t Q_L (M' / (sqrt(v) + eps)) Q_R^T,   alpha_t = lr sqrt(1 - b2^t) / (1 - b1^t)
        W <- W (1 - lr weight_decay)

    Why: Adam's per-coordinate scaling is a diagonal preconditioner, right only when the loss curvature is
    aligned with the coordinate axes. Shampoo's L^-1/4 G R^-1/4 captures the rotation but its scaling is
    fixed by the matrix powers; SOAP keeps Shampoo's rotation and lets Adam learn the scale in that frame.
    The paper reports ~35-40% fewer steps than AdamW at LM scale. Cost: L, R, Q_L, Q_R (2 m^2 + 2 n^2
    numbers per matrix, on top of Adam's 2 m n) and an eigendecomposition per matrix every f steps
    (O(m^3 + n^3)); so only hidden matrices get it, as with Muon. Simplifications, stated: we recompute the
    eigenbasis by eigh (the paper's later refreshes use one QR power-iteration step, cheaper on GPUs) and
    v is not re-projected when the basis changes (the paper's code re-sorts it; a refresh every f steps
    moves the basis little). Eigenvector signs and order do not matter: each cancels between the rotation
    in and the rotation out.
    """

    def __init__(self, params, lr: float = 3e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 precondition_frequency: int = 10):
        if lr < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0) or precondition_frequency < 1:
            raise ValueError(f"SOAP: invalid lr {lr}, betas {betas} or precondition_frequency {precondition_frequency}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"SOAP only handles 2-D weight matrices, got shape {tuple(p.shape)}")

    @staticmethod
    def _eigenbasis(S: torch.Tensor) -> torch.Tensor:
        # eigh of a symmetric PSD matrix; float32 at least (bf16 eigh does not exist, and its error is large)
        dt = torch.float64 if S.dtype == torch.float64 else torch.float32
        return torch.linalg.eigh(S.to(dt))[1].to(S.dtype)  # columns = eigenvectors (ascending eigenvalues)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if len(state) == 0:
                    m, n = p.shape
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                 L=p.new_zeros(m, m), R=p.new_zeros(n, n))
                state["step"] += 1
                t, L, R = state["step"], state["L"], state["R"]
                # Shampoo's statistics: L's eigenvectors are the directions the rows of G vary along,
                # R's those of its columns; together they are the frame in which G is "most diagonal"
                L.mul_(b2).add_(g @ g.T, alpha=1 - b2)  # (m, m)
                R.mul_(b2).add_(g.T @ g, alpha=1 - b2)  # (n, n)
                if (t - 1) % group["precondition_frequency"] == 0:  # steps 1, 1 + f, 1 + 2f, ...
                    state["QL"], state["QR"] = self._eigenbasis(L), self._eigenbasis(R)
                QL, QR = state["QL"], state["QR"]
                m_, v = state["exp_avg"], state["exp_avg_sq"]
                m_.mul_(b1).add_(g, alpha=1 - b1)  # momentum in the original basis
                g_rot, m_rot = QL.T @ g @ QR, QL.T @ m_ @ QR  # (m, n) each, in the eigenbasis
                v.mul_(b2).addcmul_(g_rot, g_rot, value=1 - b2)  # second moment in the eigenbasis
                # Adam's bias corrections, folded into the step size exactly as in AdamW above; with
                # Q_L = Q_R = identity this whole step IS AdamW (the rotation is the only difference)
                alpha_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                p.add_(QL @ (m_rot / (v.sqrt() + eps)) @ QR.T, alpha=-alpha_t)  # Adam step, rotated back
                if wd != 0:
                    p.mul_(1 - lr * wd)
        return loss


class OptimizerGroup(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for hidden matrices + AdamW for the rest).

    It is a torch.optim.Optimizer so the loop, checkpoints and ddp.py can treat it like any other:
    `param_groups` is the concatenation of the members' groups (so `for g in opt.param_groups: g["lr"] = ..`
    reaches every member), and state_dict() is a plain dict of the members' state dicts.
    Each param group carries "base_lr", its peak learning rate; the loop sets g["lr"] = base_lr * the
    schedule's factor before every step.
    """

    def __init__(self, optimizers: list):
        self.optimizers = list(optimizers)
        # torch.optim.Optimizer.__init__ would want params; we set the attributes its methods read instead
        self.defaults, self.state = {}, {}
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", {})

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, closure=None):
        """Step every member; each owns disjoint parameters, so the order does not matter."""
        loss = closure() if closure is not None else None
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        """{"optimizers": [member state dicts]}: plain containers, loadable with weights_only=True."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict):
        """The inverse of state_dict; a state from another optimizer layout is a clear ValueError."""
        sds = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(sds, list) or len(sds) != len(self.optimizers):
            raise ValueError("optimizer state does not match this optimizer (different optimizer kind or "
                             "number of parameter groups)")
        for opt, sd in zip(self.optimizers, sds):
            opt.load_state_dict(sd)


def build_optimizer(model: torch.nn.Module, cfg: "TrainConfig") -> torch.optim.Optimizer:
    """Parameter groups, each with a "base_lr" the schedule scales:
    - adamw: 2-D weights with weight decay, 1-D gains without (decaying a norm's gain toward 0 hurts).
    - muon: the transformer blocks' 2-D matrices -> Muon; embeddings, lm_head and gains -> AdamW
      (Muon's orthogonalization suits linear maps between hidden states, not lookup tables or the
      classifier whose rows are per-token; this is the split nanochat and modded-nanogpt use).
    - soap: the same split, SOAP for the hidden matrices (at AdamW's --lr: it is Adam in a rotated basis;
      a vocab-sized (V, V) preconditioner for the embeddings would cost more than the model).
    """
    named = [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]
    is_hidden_matrix = lambda n, p: p.ndim == 2 and n.startswith("layers.")
    adam_kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)

    def adamw(groups):
        for g in groups:
            g["base_lr"] = g["lr"]
        if cfg.adamw_impl == "torch":  # the fast path: torch's fused/foreach kernels
            return torch.optim.AdamW(groups, **adam_kw)
        return AdamW(groups, **adam_kw)

    if cfg.optimizer == "adamw" and cfg.mup_base_width is not None:
        return adamw(mup_param_groups(named, cfg))  # muP: per-layer learning rates (section below)
    if cfg.optimizer == "adamw":
        decay = [p for n, p in named if p.ndim >= 2]
        no_decay = [p for n, p in named if p.ndim < 2]
        return adamw([dict(params=decay, lr=cfg.lr, weight_decay=cfg.weight_decay),
                      dict(params=no_decay, lr=cfg.lr, weight_decay=0.0)])
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    other2d = [p for n, p in named if not is_hidden_matrix(n, p) and p.ndim >= 2]
    gains = [p for n, p in named if p.ndim < 2]
    if cfg.optimizer == "soap":
        first = SOAP([dict(params=hidden, lr=cfg.lr, base_lr=cfg.lr)], betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                     weight_decay=cfg.weight_decay, precondition_frequency=cfg.soap_frequency)
    else:
        first = Muon([dict(params=hidden, lr=cfg.muon_lr, base_lr=cfg.muon_lr)], momentum=cfg.muon_momentum,
                     weight_decay=0.0)
    rest = adamw([dict(params=other2d, lr=cfg.lr, weight_decay=cfg.weight_decay),
                  dict(params=gains, lr=cfg.lr, weight_decay=0.0)])
    return OptimizerGroup([first, rest])


# muP (maximal update parametrization): width-independent hyperparameters. Off by default
# (--mup-base-width unset); source: Yang et al., "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
# Hyperparameter Transfer" (arXiv:2203.03466), Table 3, the Adam column.
# Why: under the standard parametrization (SP: one lr for every layer, init ~ 1/sqrt(fan_in)), Adam's update
# of a d x d hidden matrix W moves each entry by ~ lr (Adam normalizes the gradient), and the d entries of a
# row add up coherently in W x, so the output moves by ~ lr * d. The stable lr therefore shrinks like 1/d as
# the model widens, and an lr tuned on a small model is wrong for a wide one. muP rescales per layer so the
# update's effect stays O(1) at every width. Written relative to a base width d0 (the width the lr was tuned
# at) with m = d / d0 the width multiplier:
#   hidden matrices (attention, FFN):  init unchanged (~ 1/sqrt(fan_in)),          lr * 1/m
#   output layer (lm_head):            init * 1/m on top (so ~ 1/fan_in at scale),  lr * 1/m
#   embeddings, norm gains:            unchanged (their fan-in is the vocab / 1, not d)
# At d = d0 (m = 1) muP IS the standard parametrization: every factor is exactly 1.0. The remaining muP rule,
# attention logits scaled by 1/d_head instead of 1/sqrt(d_head), does not change with width here because
# wider models add heads of a fixed head_dim (scaling.py's shapes). Only AdamW is supported: these are Adam's
# rules (Muon normalizes each matrix's update itself, a different answer to the same problem).


def mup_width_mult(cfg: "TrainConfig") -> float:
    """muP's width multiplier m = d_model / mup_base_width (1.0 when muP is off)."""
    return 1.0 if cfg.mup_base_width is None else cfg.d_model / cfg.mup_base_width


def mup_init_(model: torch.nn.Module, cfg: "TrainConfig") -> None:
    """muP's one init change, in place on a freshly built model: the LM head's weights * 1/m, so its
    logits start O(1) at any width (the head sums d inputs that become correlated during training). A no-op
    when muP is off. Resumed runs load trained weights over this afterwards, so it never compounds."""
    if cfg.mup_base_width is not None:
        with torch.no_grad():
            _unwrap(model).lm_head.weight.mul_(1.0 / mup_width_mult(cfg))


def mup_param_groups(named: list, cfg: "TrainConfig") -> list:
    """AdamW parameter groups with muP's per-layer learning rates (the table above), from (name, param)
    pairs: hidden matrices and lm_head at lr/m, embeddings and norm gains at lr; gains without weight decay,
    as in the SP groups. With decoupled weight decay, lr * wd shrinks by the same 1/m."""
    m = mup_width_mult(cfg)
    groups = {"hidden": [], "head": [], "embed": [], "gain": []}
    for name, p in named:
        kind = ("gain" if p.ndim < 2 else "head" if name.startswith("lm_head") else
                "hidden" if name.startswith("layers.") else "embed")
        groups[kind].append(p)
    scale = dict(hidden=1 / m, head=1 / m, embed=1.0, gain=1.0)
    return [dict(params=ps, lr=cfg.lr * scale[k], weight_decay=0.0 if k == "gain" else cfg.weight_decay)
            for k, ps in groups.items() if ps]


# ===== Menu: batch size and the noise scale =====
# How big should a batch be? The gradient noise scale, measured while training (--noise-scale). It plugs
# into the loop as an Extension (NoiseScaleProbe): after every micro-batch's backward, and before the update.
#
# A batch of B examples estimates the true gradient G with noise of covariance Sigma / B (Sigma: the
# per-example gradient covariance). McCandlish et al. ("An Empirical Model of Large-Batch Training",
# arXiv:1812.06162) show that the best step with such a noisy gradient improves the loss by a fraction
# 1 / (1 + B_noise / B) of the noiseless step, with B_simple = tr(Sigma) / |G|^2. Below B_simple, doubling
# the batch nearly halves the steps to a target loss (perfect scaling: free speed on parallel hardware);
# far above it, extra examples per step buy almost nothing (the same steps, more compute). It is measured
# for free from gradient norms at two batch sizes, because E|G_B|^2 = |G|^2 + tr(Sigma) / B:
#     |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
#     tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)
# Both are unbiased but very noisy one step at a time, so (as the paper does) each is averaged (an EMA)
# before the ratio is taken. Here small = one micro-batch, big = the accumulated step (grad_accum of them).


def noise_scale_terms(g2_small: float, g2_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates (|G|^2, tr(Sigma)) from squared gradient norms at batch sizes b_small < b_big."""
    g2 = (b_big * g2_big - b_small * g2_small) / (b_big - b_small)
    trace = (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScale:
    """A running B_simple = EMA[tr(Sigma)] / EMA[|G|^2] (in the units of b_small, b_big: we pass tokens).
    The EMAs start at zero, so both are bias-corrected like Adam's moments (the ratio alone would cancel
    the correction, but the logged parts should not)."""

    def __init__(self, beta: float = 0.95):
        self.beta, self.g2, self.trace, self.n = beta, 0.0, 0.0, 0

    def update(self, g2_small: float, g2_big: float, b_small: float, b_big: float) -> float:
        # one step's estimates can be negative (|G|^2 is a small difference of two noisy numbers); only
        # their averages are meaningful, which is why the EMAs come before the ratio
        g2, trace = noise_scale_terms(g2_small, g2_big, b_small, b_big)
        self.n += 1
        self.g2 = self.beta * self.g2 + (1 - self.beta) * g2
        self.trace = self.beta * self.trace + (1 - self.beta) * trace
        return self.value

    @property
    def value(self) -> float:
        """B_simple, or nan while the averaged |G|^2 is not yet positive (early, noisy estimates)."""
        return self.trace / self.g2 if self.g2 > 0 else float("nan")


def _micro_grad_sq(model, prev: list | None, grad_accum: int) -> tuple[list, float]:
    """|g|^2 of the micro-batch just back-propagated: the accumulated gradients minus what they held before
    (`prev`), times grad_accum (each micro-batch's loss was divided by it). Returns (a copy of the
    gradients now, for the next call; |g|^2). Costs one copy of the gradients: only with --noise-scale."""
    # backward ADDS into .grad, so the difference before/after one backward is that micro-batch's own
    # (scaled) gradient; undoing the 1/grad_accum scaling gives the gradient of its mean loss
    now = [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]
    total = 0.0
    for i, g in enumerate(now):
        if g is not None:
            d = g if prev is None or prev[i] is None else g - prev[i]
            total += float((d.float() * grad_accum).pow(2).sum())
    return now, total


class NoiseScaleProbe(Extension):
    """--noise-scale: B_simple in tokens, small = one micro-batch, big = the accumulated step, logged with
    every step (metrics "noise_scale_tokens", the progress line's B_noise)."""

    def __init__(self):
        self.noise, self.prev, self.g2_small = NoiseScale(), None, 0.0

    def after_backward(self, run: Run):
        # this micro-batch's own gradient norm (the small batch), averaged over the step's micro-batches
        self.prev, g2 = _micro_grad_sq(run.model, self.prev, run.cfg.grad_accum)
        self.g2_small += g2 / run.cfg.grad_accum

    def before_update(self, run: Run):
        # the big batch: the whole step's gradient, before clipping (batch sizes in tokens)
        g2_big = sum(float(p.grad.float().pow(2).sum()) for p in run.model.parameters() if p.grad is not None)
        b_small = run.cfg.batch_size * run.cfg.context_length
        self.noise.update(self.g2_small, g2_big, b_small, b_small * run.cfg.grad_accum)
        self.prev, self.g2_small = None, 0.0

    def metrics(self, run: Run) -> dict:
        return {"noise_scale_tokens": self.noise.value}

    def progress(self, run: Run) -> str:
        # McCandlish et al.'s B_simple, compared with this run's tokens per step
        return f" | B_noise {self.noise.value:,.0f} tok (batch {run.tokens_per_step:,})"


# ===== Menu: cheaper models =====
# Models cheaper to decode: distillation from a teacher checkpoint (--distill-from) and gradual magnitude
# pruning (--prune-sparsity). Each plugs into the loop as an Extension: Distillation replaces the
# micro-batch's objective, Pruning acts after every optimizer step; both report the trade-off at the end.


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531): train a small student on a big teacher's whole next-token distribution, not only
    on the one token the text happened to contain.

        p_T = softmax(teacher / T),  q_T = softmax(student / T)          (..., V) each, temperature T
        loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(student, targets)

    Why: the teacher's probabilities on the wrong tokens ("dark knowledge": which continuations are almost
    right) carry far more bits per example than a one-hot target, so the student learns more per token.
    T > 1 softens both distributions so those small probabilities matter; the gradient of the soft term
    scales as 1/T^2, hence the T^2 that keeps the two terms' balance independent of T. Cost: a teacher
    forward pass per micro-batch (no backward), and the teacher's weights in memory. The KL needs the same
    vocabulary on both sides: the same tokenizer, checked when the teacher is loaded.
    """
    # float32 even under bf16 autocast: the KL is a small difference of large log-probabilities
    V = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, V)  # (N, V)
    log_p = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)  # teacher, (N, V)
    log_q = F.log_softmax(s / temperature, dim=-1)  # student
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # KL(p || q) per position, averaged
    return alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(s, targets.reshape(-1))


class Distillation(Extension):
    """--distill-from: the student's objective is distillation_loss against a frozen teacher's logits (the
    logged loss stays the plain cross-entropy on the text)."""

    def __init__(self, run: Run):
        self.teacher = _load_teacher(run.cfg, run)

    def objective(self, run: Run, x, y, logits, objective):
        with torch.no_grad():  # the teacher's soft targets: no backward through it
            teacher_logits = self.teacher(x)  # (B, T, V)
        return distillation_loss(logits, teacher_logits, y, run.cfg.distill_temperature, run.cfg.distill_alpha)

    def report(self, run: Run, final: dict, eval_seconds: float, n_tokens: int) -> dict:
        # the teacher is evaluated here, once, on exactly the tokens the student's final evaluation used: the
        # bpb difference is the quality cost, the eval-time ratio the decoding speed gained
        t0 = time.time()
        tv = evaluate(self.teacher, run.val_tokens, max_tokens=n_tokens, **run.eval_kw)
        t_sec = time.time() - t0
        ns, nt = M.num_params(run.model), M.num_params(self.teacher)
        run.say(f"distilled student: val bpb {final['bpb']:.4f} vs teacher {tv['bpb']:.4f} "
                f"({100 * (final['bpb'] / tv['bpb'] - 1):+.1f}%) | params {ns / 1e6:.2f}M vs {nt / 1e6:.2f}M "
                f"({nt / ns:.1f}x fewer) | eval forward {t_sec / max(eval_seconds, 1e-9):.2f}x the teacher's speed")
        return {"distill": dict(student_bpb=final["bpb"], teacher_bpb=tv["bpb"], student_params=ns,
                                teacher_params=nt, speedup=t_sec / max(eval_seconds, 1e-9))}


def _load_teacher(cfg: "TrainConfig", run: Run) -> torch.nn.Module:
    """The --distill-from checkpoint's model, frozen, after checking that it speaks this run's tokenizer
    (the KL between teacher and student compares probabilities of the same token ids)."""
    ckpt = read_checkpoint(cfg.distill_from)
    mine = dict(tokenizer_fingerprint=run.tokenizer.fingerprint(), vocab_size=run.tokenizer.vocab_size)
    theirs = dict(tokenizer_fingerprint=ckpt.get("tokenizer_fingerprint"),
                  vocab_size=(ckpt.get("model_config") or {}).get("vocab_size"))
    bad = [k for k in mine if theirs[k] is not None and theirs[k] != mine[k]]
    if bad or theirs["vocab_size"] is None:
        raise ValueError(f"--distill-from {cfg.distill_from}: the teacher has another tokenizer ("
                         + ", ".join(f"{k} {theirs[k]} vs this run's {mine[k]}" for k in bad or ["vocab_size"])
                         + "); distillation needs the teacher's --data and --vocab-size")
    teacher, _ = M.load_checkpoint_model(cfg.distill_from, device=run.device)
    if teacher.config.context_length < cfg.context_length:
        raise ValueError(f"--distill-from {cfg.distill_from}: the teacher's context_length "
                         f"{teacher.config.context_length} < --context-length {cfg.context_length}")
    # frozen and in eval mode: no gradients, no dropout; its logits are a fixed target for the student
    teacher.eval().requires_grad_(False)
    run.say(f"distilling from {cfg.distill_from}: teacher {M.num_params(teacher) / 1e6:.2f}M parameters, "
            f"T {cfg.distill_temperature:g}, alpha {cfg.distill_alpha:g}")
    return teacher


class MagnitudePruner:
    """Gradual magnitude pruning (Han et al., "Learning both Weights and Connections for Efficient Neural
    Networks", arXiv:1506.02626; the schedule from Zhu & Gupta, "To prune, or not to prune",
    arXiv:1710.01878). The hidden weight matrices (the blocks' 2-D weights, as Muon's grouping) are pruned
    each to the same sparsity, the smallest |w| first, with the target ramping up as

        s(frac) = S (1 - (1 - (frac - f0) / (f1 - f0))^3)   for frac in [f0, f1]   (0 before, S after)

    (frac: the run's progress, as the learning-rate schedule's): fast at first, while there are many
    redundant weights, slowly near the end so the network can recover. A pruned weight stays zero: the
    mask is re-applied after every optimizer step (the optimizer would otherwise move it back).
    Trade-off: S = 50-90% of the weights can go at a small loss, but unstructured zeros in dense tensors
    save nothing by themselves: the gain needs a sparse storage format or sparse kernels (2:4 sparsity
    on recent GPUs). Embeddings, the head and norm gains stay dense."""

    def __init__(self, model: torch.nn.Module, sparsity: float, start: float = 0.2, end: float = 0.7,
                 interval: int = 10):
        self.sparsity, self.start, self.end, self.interval = sparsity, start, end, interval
        self.params = [p for n, p in _unwrap(model).named_parameters() if p.ndim == 2 and n.startswith("layers.")]
        # zeros already there (a resumed run's pruned weights) stay pruned
        self.masks = [p.detach() != 0 for p in self.params]

    def target(self, frac: float) -> float:
        """The scheduled sparsity at progress `frac` in [0, 1]."""
        x = min(max((frac - self.start) / max(self.end - self.start, 1e-12), 0.0), 1.0)
        return self.sparsity * (1 - (1 - x) ** 3)

    @torch.no_grad()
    def prune(self, sparsity: float):
        """Each matrix to exactly round(sparsity * numel) zeros: its k smallest |w| (earlier zeros among them)."""
        for p, mask in zip(self.params, self.masks):
            # per matrix, not one global threshold: every layer keeps the same share of its weights (Zhu &
            # Gupta's choice; a global threshold can empty a small layer whose weights happen to be small)
            k = int(round(sparsity * p.numel()))
            if k > int((~mask).sum()):  # never un-prune: the target only grows
                mask.view(-1)[torch.topk(p.detach().abs().view(-1).float(), k, largest=False).indices] = False
        self.apply()

    @torch.no_grad()
    def apply(self):
        """Zero the pruned weights (after every optimizer step)."""
        for p, mask in zip(self.params, self.masks):
            p.mul_(mask)

    def after_step(self, step: int, frac: float):
        """Called after optimizer step `step`: re-apply the masks; every `interval` steps (and once the
        ramp is over) raise them to the schedule's sparsity."""
        if step % self.interval == 0 or frac >= self.end:
            self.prune(self.target(frac))
        else:
            self.apply()

    def counts(self) -> tuple[int, int]:
        """(zeros, weights) over the pruned matrices."""
        return sum(int((~m).sum()) for m in self.masks), sum(m.numel() for m in self.masks)


class Pruning(Extension):
    """--prune-sparsity: MagnitudePruner after every optimizer step; the first time the schedule asks for
    zeros, the still-dense model is evaluated first (on the periodic-evaluation tokens): the reference for
    the final report."""

    def __init__(self, run: Run):
        cfg = run.cfg
        self.pruner = MagnitudePruner(run.model, cfg.prune_sparsity, cfg.prune_start, cfg.prune_end)
        self.dense_val = None  # the val bpb just before the first weights go (the dense reference)

    def after_step(self, run: Run, step: int, frac: float):
        # the reference is measured once, on the tokens the final report evaluates the pruned model on
        if self.dense_val is None and self.pruner.target(frac) > 0:
            self.dense_val = dict(step=step, **evaluate(run.eval_model, run.val_tokens,
                                                        max_tokens=run.cfg.eval_tokens, **run.eval_kw))
        self.pruner.after_step(step, frac)

    def report(self, run: Run, final: dict, eval_seconds: float, n_tokens: int) -> dict:
        # pruned vs the dense model at pruning start, on the same tokens
        zeros, n = self.pruner.counts()
        total = M.num_params(run.model)
        pv = evaluate(run.eval_model, run.val_tokens, max_tokens=run.cfg.eval_tokens, **run.eval_kw)
        dv = self.dense_val
        line = (f"pruned: {100 * zeros / n:.1f}% of the hidden matrices' weights are zero | nonzero params "
                f"{(total - zeros) / 1e6:.2f}M of {total / 1e6:.2f}M ({100 * (total - zeros) / total:.0f}%) | val bpb "
                f"{pv['bpb']:.4f}")
        if dv:
            line += (f" vs {dv['bpb']:.4f} dense at step {dv['step']} (pruning start; {pv['tokens']:,} val tokens)"
                     f" ({100 * (pv['bpb'] / dv['bpb'] - 1):+.1f}%)")
        run.say(line + " | speed: unchanged with dense matmuls (unstructured zeros need sparse kernels)")
        return {"prune": dict(sparsity=zeros / n, nonzero_params=total - zeros, params=total, pruned_bpb=pv["bpb"],
                              dense_bpb=dv["bpb"] if dv else None, dense_step=dv["step"] if dv else None)}


# ===== Appendix: plumbing =====
# Data (a synthetic corpus with a known entropy, public downloads, the cached text -> tokenizer -> token
# files pipeline), the configuration and its presets, devices, threads and run folders. None of it is
# needed to understand training; all of it is needed to run it.

# ---- Building, resuming and ending a run; the time budget ---------------------------------------------


class TimeBudget:
    """Where a run stands against its limits: --max-steps and/or the wall-clock budget --max-minutes.

    The budget bounds the whole command: data preparation (unless --no-budget-includes-prep), the loop,
    the final evaluation and the samples. So the loop stops early by a `reserve`, the time the final
    evaluation and samples will take, estimated from the step speed once a few steps have run (an
    evaluation token costs a forward pass, about a third of a training token's forward + backward).
    The learning-rate schedule then ends when the loop does: after warm-up, progress is
    (t - t_warm) / (t_end - t_warm) on the loop's clock, with t_warm the time warm-up ended.
    Times are seconds on the loop's clock, which continues across resumes; the budget and t_warm are
    stored in checkpoints (state()), so a resumed run keeps the plan it started with.
    """

    SAMPLE_SECONDS = 3.0  # time kept for the samples at the end (a few hundred tokens with a KV cache)

    def __init__(self, cfg: "TrainConfig", start_step: int, train_seconds: float, prep_seconds: float,
                 saved: dict | None, tokens_per_step: int, final_eval_tokens: int):
        self.cfg, self.start_step, self.resumed_seconds = cfg, start_step, train_seconds
        self.tokens_per_step, self.final_eval_tokens = tokens_per_step, final_eval_tokens
        saved = saved or {}
        self.budget, self.warm = saved.get("budget_seconds"), saved.get("warm_seconds")
        # the reserve carries over a resume until it is measured again (a finished run then stays finished)
        self.reserve, self.measured = float(saved.get("reserve_seconds") or 0.0), False
        self.train_tps = self.eval_tps = None  # tokens/s: measured as the run goes
        # the budget is fixed once, at the start of a run; a resumed run reads it from its checkpoint
        if cfg.max_minutes is not None and self.budget is None:
            self.budget = cfg.max_minutes * 60 - (prep_seconds if cfg.budget_includes_prep else 0.0)
            if self.budget <= 5:
                raise ValueError(f"--max-minutes {cfg.max_minutes}: the budget is already used up by data "
                                 f"preparation ({prep_seconds:.0f}s)")
        self.sample_seconds = self.SAMPLE_SECONDS if cfg.num_samples else 0.0

    @property
    def end(self) -> float:
        """Loop time at which training stops, leaving the reserve for the final evaluation and samples."""
        return self.budget - self.reserve

    def progress(self, step: int, t: float):
        """(frac, stop_reason) before step `step` at loop time t: progress through the post-warm-up part of
        the run (by steps or by time, whichever is further), or why the run stops now."""
        cfg, frac = self.cfg, 0.0
        # by steps: the fraction of the post-warm-up steps done (negative during warm-up, clamped below)
        if cfg.max_steps is not None:
            if step >= cfg.max_steps:
                return 1.0, "max_steps"
            frac = (step - cfg.warmup_iters) / max(cfg.max_steps - cfg.warmup_iters, 1)
        if self.budget is not None:
            if not self.measured and step - self.start_step >= 5 and step >= cfg.warmup_iters:
                self._measure(step, t)
            if t >= self.end:
                return 1.0, "time budget"
            # by time: the fraction of the post-warm-up seconds used; the further of the two drives the schedule
            if self.warm is not None:
                frac = max(frac, (t - self.warm) / max(self.end - self.warm, 1e-9))
        return min(max(frac, 0.0), 1.0), None

    def _measure(self, step: int, t: float):
        """Set the reserve from the training speed so far (once); mark the end of warm-up."""
        self.measured = True
        self.train_tps = (step - self.start_step) * self.tokens_per_step / max(t - self.resumed_seconds, 1e-9)
        # planning: assume evaluation at only 1.5x the training speed (margin for a slower machine later)
        self.reserve = self.final_eval_tokens / self._eval_speed(1.5) + self.sample_seconds
        if self.warm is None:
            self.warm = t

    def _eval_speed(self, vs_training: float) -> float:
        """Validation tokens per second: measured by the periodic evaluations when any ran, else
        `vs_training` times the training speed, divided by the windows' overlap (stride < T: each scored
        token costs T / stride window positions). A forward pass is ~3x faster per position than a
        training step's forward + backward."""
        if self.eval_tps is not None:
            return self.eval_tps
        overlap = self.cfg.context_length / (self.cfg.eval_stride or max(self.cfg.context_length // 2, 1))
        return vs_training * self.train_tps / overlap

    def eta(self, step: int, t: float) -> float:
        """Seconds of training left: the nearer of the step limit (at the average speed so far) and the
        time budget's end."""
        left = []
        if self.budget is not None:
            left.append(max(self.end - t, 0.0))
        if self.cfg.max_steps is not None and step > self.start_step:
            left.append((self.cfg.max_steps - step) * (t - self.resumed_seconds) / (step - self.start_step))
        return min(left) if left else 0.0

    def final_eval_cap(self, step: int, t: float, n_tokens: int) -> int | None:
        """How many validation tokens the final evaluation can score in the budget's remaining time, or
        None when there is no budget or it holds all n_tokens. A hard limit, so it takes the realistic
        speed (3x training's per position), not the planning margin."""
        if self.budget is None:
            return None
        if self.train_tps is None and self.eval_tps is None:
            if step <= self.start_step:
                return None  # nothing ran, nothing to go by
            self._measure(step, t)
        cap = int(max(self.budget - t - self.sample_seconds, 0.0) * self._eval_speed(3.0))
        return cap if cap < n_tokens else None

    def state(self) -> dict:
        """What a checkpoint stores, so a resumed run keeps this plan (the reserve is measured again)."""
        return dict(budget_seconds=self.budget, warm_seconds=self.warm, reserve_seconds=self.reserve)

_PROCESS_START = time.time()


def _step_loss(run: Run, step: int, loss) -> float:
    """The logged loss: the mean over micro-batches, then over ranks (a number only: the gradients are synced
    by their own hook). A NaN/inf loss means the weights are about to be ruined: stop before the update, so
    the last checkpoint is still the last good state."""
    if run.hooks.all_reduce is not None:
        loss = run.hooks.all_reduce(loss.reshape(1).double())[0] / run.world_size
    loss = float(loss)
    if not math.isfinite(loss):
        msg = (f"loss is {loss} at step {step + 1}: training diverged. Stopped without saving; the last "
               f"good checkpoint {run.ckpt_path} is intact" if run.ckpt_path.exists() else
               f"loss is {loss} at step {step + 1}: training diverged before the first checkpoint")
        raise FloatingPointError(msg + " (try a lower --lr / --muon-lr or --grad-clip)")
    return loss


def _setup_run(cfg: "TrainConfig", data, hooks: TrainHooks, rank: int, world_size: int, log: Callable,
               t_start: float | None) -> Run:
    """Setup and resume: device and threads, the run folder (refusing to replace an earlier run), the
    checkpoint (read first, so a bad one fails before any work), data, model, wrapper, optimizer."""
    run = Run(cfg=cfg, hooks=hooks, rank=rank, world_size=world_size, log=log,
              say=log if rank == 0 else (lambda *a, **k: None), t_start=t_start or _PROCESS_START)
    # the same device check as the command line's; then torch's CPU thread count (timed, see set_cpu_threads)
    run.device = resolve_device(cfg.device)
    n_threads = set_cpu_threads(cfg.threads) if run.device.type == "cpu" else torch.get_num_threads()
    # remember which folders this run creates: if the start fails, they are removed again (when empty)
    new_dirs = _missing_dirs(cfg.out_dir) if run.main else []
    try:
        run.out = check_out_dir(cfg.out_dir, cfg) if run.main else Path(cfg.out_dir)
        run.ckpt_path = run.out / "ckpt.pt"
        ckpt = read_checkpoint(run.ckpt_path) if cfg.resume and run.ckpt_path.exists() else None
        # the expensive part of a start (corpus, tokenizer, encoding), cached: seconds on a second run
        data = data or prepare_data(cfg, log=run.say)
        run.train_tokens, run.val_tokens = data.train_tokens(), data.val_tokens()  # np.memmap: no RAM
        for name, arr in (("training", run.train_tokens), ("validation", run.val_tokens)):
            if len(arr) < cfg.context_length + 2:
                raise ValueError(f"{name} split has {len(arr)} tokens, fewer than one context window + 1 "
                                 f"({cfg.context_length + 1}); use more text or a smaller --context-length")
        run.tokenizer, run.floor = data.tokenizer, data.entropy_floor_bpb
        model = build_model(cfg, run.tokenizer.vocab_size, run.device)
        mup_init_(model, cfg)  # muP's LM-head init (a no-op when off; a checkpoint's weights replace it)
        if ckpt is not None:  # weights into the bare model before wrapping: a wrapper may shard them
            _check_resumable(run, ckpt, model)
            load_model_state(model, ckpt, run.ckpt_path)
    except BaseException:
        _remove_empty_dirs(new_dirs)  # a failed start leaves no empty run folder behind
        raise
    if run.device.type == "cuda" and hasattr(model, "validate_inputs"):
        model.validate_inputs = False  # its id-range check syncs the GPU every forward; our ids are valid
    run.model, run.mcfg = model, model.config.to_dict()
    # tokens per optimizer step over all ranks: B sequences of T tokens, grad_accum times, on every rank
    run.tokens_per_step = hooks.tokens_per_step or cfg.batch_size * cfg.context_length * cfg.grad_accum * world_size
    n_params, n_body = M.num_params(model), M.num_params(model, include_embeddings=False)
    run.say(f"model: {n_params / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M non-embedding), {cfg.num_layers} layers, "
            f"d_model {cfg.d_model}, context {cfg.context_length}, vocab {run.tokenizer.vocab_size}; "
            f"device {run.device}"
            + (f" ({n_threads} threads)" if run.device.type == "cpu" else "")
            + f"; optimizer {cfg.optimizer}; {run.tokens_per_step:,} tokens/step")
    # wrap, then the optimizer over what the wrapper trains (e.g. FSDP's shards), then its saved state
    run.run_model = hooks.wrap_model(model) if hooks.wrap_model else model
    run.optimizer = (hooks.build_optimizer or (lambda m, rm, c: build_optimizer(m, c)))(model, run.run_model, cfg)
    start_step, train_seconds, saved = _resume(run, ckpt)
    del ckpt
    _setup_loop(run, start_step, train_seconds, saved)
    return run


def _resume(run: Run, ckpt: dict | None) -> tuple[int, float, dict | None]:
    """A resumed run continues its step count, its loop clock, its wall clock and its RNG streams: the
    optimizer state and RNG states from the checkpoint; returns (start step, training seconds, checkpoint)."""
    if ckpt is None:
        if run.cfg.resume:
            run.say(f"--resume: no checkpoint at {run.ckpt_path}, starting fresh")
        return 0, 0.0, None
    if run.hooks.load_optimizer_state:
        run.hooks.load_optimizer_state(run.optimizer, run.run_model, ckpt)
    else:
        load_optimizer_state(run.optimizer, ckpt, run.ckpt_path)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    run.elapsed_before = float(ckpt.get("elapsed_seconds", 0.0))
    run.say(f"resumed from {run.ckpt_path} at step {int(ckpt['iteration'])}")
    return int(ckpt["iteration"]), float(ckpt.get("train_seconds", 0.0)), ckpt


def _setup_loop(run: Run, start_step: int, train_seconds: float, saved: dict | None):
    """The rest of the run's state, once the weights are in place: compile, loss, extensions, metrics log,
    time budget, evaluation options, the loop's clock."""
    cfg, hooks = run.cfg, run.hooks
    if run.main:
        run.tokenizer.save(str(run.out / "tokenizer"))  # so `train.py sample` works from the run folder alone
    if cfg.compile:  # compiled after the weights are in place; the first steps pay the compile time
        run.run_model = torch.compile(run.run_model)
    run.eval_model = run.run_model if hooks.wrap_model else run.model  # (a wrapper may be needed to run it: FSDP)
    run.loss_fn = cross_entropy_fast if cfg.loss_impl == "fast" else cross_entropy
    run.extensions = _setup_extras(run)  # noise scale, distillation teacher, pruning masks (each off by default)
    # only rank 0 writes files; the other ranks compute and take part in the collectives
    run.metrics = MetricsLog(run.out / "metrics.jsonl", start_step if start_step else None) if run.main else None
    run.flops_per_tok, run.peak = M.flops_per_token(run.model.config, training=True), peak_flops(run.device)
    run.final_eval_tokens = cfg.final_eval_tokens if cfg.final_eval_tokens is not None else len(run.val_tokens)
    run.budget = TimeBudget(cfg, start_step, train_seconds, time.time() - run.t_start, saved,
                            run.tokens_per_step, run.final_eval_tokens)
    # several ranks: every rank runs the same number of eval forwards (FSDP's forward is a collective)
    run.eval_kw = dict(context_length=cfg.context_length, batch_size=cfg.batch_size * 2, device=run.device,
                       token_bytes=np.asarray(run.tokenizer.token_byte_lengths()), dtype=cfg.dtype, rank=run.rank,
                       world_size=run.world_size, all_reduce=hooks.all_reduce,
                       stride=cfg.eval_stride or max(cfg.context_length // 2, 1), equal_batches=run.world_size > 1)
    run.start_step, run.loop_t0 = start_step, time.time() - train_seconds  # the loop's clock continues
    run.last_log = (time.time(), start_step)
    run.model.train()


def _setup_extras(run: Run) -> list:
    """The Extensions this run switches on: the gradient noise scale (--noise-scale), the distillation
    teacher (--distill-from) and the pruning masks (--prune-sparsity)."""
    cfg = run.cfg
    # both need whole gradients / matrices in this process: under ddp.py, no_sync's micro-batch gradients
    # are rank-local while the last one is averaged, and FSDP holds only a shard of each matrix
    for on, flag in ((cfg.noise_scale, "--noise-scale"), (cfg.prune_sparsity, "--prune-sparsity")):
        if on and run.world_size > 1:
            raise ValueError(f"{flag} works in a single process only (use train.py, not ddp.py)")
    return ([NoiseScaleProbe()] if cfg.noise_scale else []) + ([Distillation(run)] if cfg.distill_from else []) \
        + ([Pruning(run)] if cfg.prune_sparsity else [])


def _periodic_eval(run: Run, step: int):
    """Validation on the first eval_tokens of the val split (the same tokens every time: comparable)."""
    t0 = time.time()
    model = run.hooks.eval_model(run.model, run.run_model) if run.hooks.eval_model else run.run_model
    r = evaluate(model, run.val_tokens, max_tokens=run.cfg.eval_tokens, **run.eval_kw)
    run.budget.eval_tps = r["tokens"] / max(time.time() - t0, 1e-9)  # measured: sizes the final evaluation
    if run.main:
        run.metrics.write(kind="val", step=step, minutes=run.minutes(), **r)
        run.say(f"step {step}: {_val_line(r, run.floor)}")

def _save(run: Run, step: int):
    """Checkpoint at `step`. Called on every rank: checkpoint_state may gather sharded state (a collective);
    rank 0 writes."""
    # never overwrite the last good checkpoint with weights a bad step just turned into NaN/inf (counted
    # over all ranks, so with sharded weights every rank stops, not only the one holding the bad shard)
    n_bad = sum(not bool(torch.isfinite(p).all()) for p in run.model.parameters())
    if run.hooks.all_reduce is not None:
        n_bad = int(run.hooks.all_reduce(torch.tensor([float(n_bad)], dtype=torch.float64))[0])
    if n_bad:  # (a collective above: every rank raises together, none waits forever for the others)
        raise FloatingPointError(f"non-finite weights at step {step}: training diverged. Not saved; the last "
                                 f"good checkpoint {run.ckpt_path} is intact (try a lower --lr / --muon-lr)")
    if run.hooks.checkpoint_state:
        state = run.hooks.checkpoint_state(run.model, run.run_model, run.optimizer)
    else:
        state = dict(model=_unwrap(run.model).state_dict(), optimizer=run.optimizer.state_dict())
    if run.main:
        write_checkpoint(run.ckpt_path, step, **state, config=dataclasses.asdict(run.cfg), model_config=run.mcfg,
                         train_seconds=run.clock(), elapsed_seconds=run.minutes() * 60, data_position=step,
                         tokenizer_dir=str(run.out / "tokenizer"), tokenizer_fingerprint=run.tokenizer.fingerprint(),
                         **run.budget.state())


def _finish(run: Run, step: int, stop_reason: str) -> dict:
    """The end of a run: the last checkpoint, the final evaluation (cut to fit the time budget, with a note),
    the plot, the samples; returns the summary."""
    cfg, train_seconds = run.cfg, run.clock()
    _save(run, step)  # first: whatever happens during the evaluation, the trained weights are on disk
    n_tokens = run.final_eval_tokens
    cap = run.budget.final_eval_cap(step, run.clock(), n_tokens)
    # under a time budget, the final evaluation gets what is left of it: fewer tokens, with a note, rather
    # than a command that runs past --max-minutes
    if cap is not None:
        if run.hooks.all_reduce is not None:  # the ranks' estimates differ a little: use their average
            cap = int(run.hooks.all_reduce(torch.tensor([float(cap)], dtype=torch.float64))[0] / run.world_size)
        n_tokens = min(max(cap, cfg.context_length + 1), n_tokens)
        run.say(f"final evaluation cut to {n_tokens:,} of {run.final_eval_tokens:,} validation tokens to end "
                f"within --max-minutes {cfg.max_minutes:g}")
    t_eval = time.time()
    model = run.hooks.eval_model(run.model, run.run_model) if run.hooks.eval_model else run.eval_model
    final = evaluate(model, run.val_tokens, max_tokens=n_tokens, **run.eval_kw)
    eval_seconds = time.time() - t_eval
    cheaper = {}  # the menu's trade-offs (distillation, pruning), reported on rank 0
    for ext in run.extensions if run.main else ():
        cheaper.update(ext.report(run, final, eval_seconds, n_tokens))
    losses = run.losses
    summary = dict(steps=step, stop_reason=stop_reason, train_seconds=train_seconds, eval_seconds=eval_seconds,
                   tokens=step * run.tokens_per_step, val=final, entropy_floor_bpb=run.floor, out_dir=str(run.out),
                   first_losses=losses[:5], last_loss=losses[-1] if losses else None, losses=losses, **cheaper)
    # samples need the whole model on one process; under FSDP each rank holds a shard, so gather first
    sample_model = run.model
    if cfg.num_samples > 0 and run.hooks.full_model:
        sample_model = run.hooks.full_model(run.model, run.run_model)  # on every rank (FSDP gathers the weights)
    if not run.main:
        return summary
    run.metrics.write(kind="val", step=step, minutes=run.minutes(), final=True, **final)
    run.say(f"final ({step} steps, {final['tokens']:,} val tokens): {_val_line(final, run.floor)}")
    if cfg.plot:
        try:
            plot_losses(run.out / "metrics.jsonl", run.out / "loss_curve.png", title=f"{cfg.preset}: {cfg.data}",
                        floor=run.floor)
        except Exception as e:  # a plotting problem must never lose a finished run
            run.say(f"(loss plot skipped: {e})")
    if cfg.num_samples > 0:
        samples = sample_texts(sample_model, run.tokenizer, "", cfg.num_samples, cfg.sample_tokens, cfg.temperature,
                               cfg.top_p, seed=cfg.seed, device=run.device)
        for i, s in enumerate(samples):
            run.say(f"--- sample {i + 1} ---\n{s.strip()}")
        summary["samples"] = samples
    run.say(f"done in {(time.time() - run.t_start) / 60:.2f} min; run folder {run.out}")
    return summary


# ---- A synthetic story corpus with a known entropy --------------------------------------------------
#
# A language model's loss can never go below the entropy rate of the text's true distribution. For real
# text that number is unknown; for text we generate ourselves we can know it *exactly*: the generator is a
# left-to-right writer whose every random decision appends a string to the story. We add up
# log2(probability) of each decision. If the text determines the decisions (the grammar is uniquely
# decodable), then P(text) = product of the decision probabilities, so
#         -sum log2 p(decisions) = -log2 P(text)         (bits)
# is the code length the TRUE distribution assigns to this text: the ideal model's loss. Divided by the
# text's byte count it is the floor in bits per byte. If two different decision sequences could produce
# the same text, P(text) would be the SUM over them and our number would be an upper bound on the true
# code length (the true entropy would be lower). We rule that out by construction: at every decision the
# option strings (rendered with everything decided so far) are distinct and prefix-free (no option is a
# prefix of another), so reading the text left to right, exactly one option matches at each point and
# the decisions can be recovered. `StoryWriter(check=True)` verifies this at every decision (the tests run
# it); the generator's grammar is deterministic given the history, so the decoder always knows the options.


class StoryWriter:
    """Accumulates one story's text and its log2-probability. `pick` is the only source of randomness."""

    def __init__(self, rng: random.Random, check: bool = False):
        self.rng = rng
        self.check = check
        self.parts: list[str] = []
        self.bits = 0.0  # -log2 P(decisions so far)

    def write(self, text: str):
        """Deterministic text (costs 0 bits)."""
        self.parts.append(text)

    def pick(self, options, weights=None) -> int:
        """Append one of `options` (strings), uniformly or with relative `weights`; return its index."""
        n = len(options)
        if self.check and not _is_prefix_free(options):
            raise AssertionError(f"grammar not uniquely decodable: one of {options!r} is a prefix of another")
        # draw index i with probability p, u uniform in [0, 1), and charge -log2 p (min(.., n - 1): u == 1.0)
        u = self.rng.random()
        if weights is None:  # uniform: i = floor(u n)
            i, p = min(int(u * n), n - 1), 1.0 / n
        else:  # by weights, the inverse CDF: the first i whose running sum w_0 + .. + w_i exceeds u * sum(w)
            cum = list(itertools.accumulate(weights))
            i = min(bisect.bisect_right(cum, u * cum[-1]), n - 1)
            p = weights[i] / cum[-1]
        if n > 1:  # a one-option "choice" is deterministic text: 0 bits
            self.bits -= math.log2(p)
        self.parts.append(options[i])
        return i

    def text(self) -> str:
        return "".join(self.parts)


# Word lists. Each list is prefix-free, so picks from it are uniquely decodable (StoryWriter(check=True), which
# the tests run, verifies every option list at every pick).
_GIRLS = ["Lily", "Mia", "Anna", "Zoe", "Ella", "Rosa", "Nora", "Ivy", "Lucy", "Emma", "Sara", "Kate"]
_BOYS = ["Ben", "Tom", "Max", "Sam", "Jack", "Leo", "Finn", "Owen", "Tim", "Paul", "Adam", "Luke"]
_TRAITS = ["happy", "curious", "brave", "kind", "shy", "clever", "silly", "gentle"]
_ANIMALS = ["dog", "cat", "bird", "frog", "bunny", "duck", "fox", "bear", "horse", "goat", "mouse", "pig"]
_PLACES = ["park", "forest", "beach", "garden", "farm", "lake", "hill", "meadow", "river", "village", "pond",
           "castle"]
_OBJECTS = ["ball", "kite", "box", "hat", "drum", "boat", "key", "shell", "book", "cup", "star", "apple",
            "sock", "bell", "map", "rock"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "orange", "shiny", "little", "big", "old",
           "new"]
_FEELINGS = ["happy", "excited", "surprised", "proud", "glad", "amazed", "lucky", "curious"]
_PRAISE = ["nice", "pretty", "cool", "great", "special", "lovely"]
_WHEN = ["all day.", "until dinner.", "in the sun.", "after lunch."]
_WEATHER = [("rain", "wet"), ("snow", "cold"), ("get windy", "lost")]
_SOUNDS = ["loud", "soft", "funny", "strange"]
_PET_ACTS = ["barked.", "hid.", "ran away.", "looked around."]
_FOODS = ["cookies", "bread", "soup", "cake", "berries", "pie", "rice", "eggs"]


def _write_story(w: StoryWriter):
    """The default story grammar. Every random choice goes through w.pick (in text order); the rest is
    fixed text. Characters (hero, pet, friend), the place and the object are chosen once and then reused,
    so a model must look back in its context to predict them (the copying that attention is good at)."""
    # the setting: 8 traits x 2 x 12 names x 12 places x 12 pets, ~16.6 bits; after "named", the gender
    # already fixes which 12 names are possible (a model that tracks it saves a bit per story)
    w.write("Once upon a time, there was a ")
    w.pick(_TRAITS)
    w.write(" ")
    is_boy = w.pick(["girl", "boy"])
    w.write(" named ")
    names = _BOYS if is_boy else _GIRLS
    name = names[w.pick(names)]
    # pronouns follow from the gender: deterministic text, 0 bits, but only for a model that remembers it
    he, his = ("he", "his") if is_boy else ("she", "her")
    He = he.capitalize()
    w.write(f". {He} lived near a ")
    place = _PLACES[w.pick(_PLACES)]
    w.write(f". {He} had a pet ")
    pet = _ANIMALS[w.pick(_ANIMALS)]
    w.write(f".\nOne day, {name} found a ")
    w.pick(_COLORS)
    w.write(" ")
    obj = _OBJECTS[w.pick(_OBJECTS)]
    w.write(f" in the {place}. {name} felt ")
    w.pick(_FEELINGS)
    w.write(".")
    # up to 4 events, then the fixed ending. "The end." weighs 2 of 7 while events remain, so stories vary
    # in length (geometric), and the ending costs log2(7/2) bits like any other decision
    friends = [n for n in _GIRLS + _BOYS if n != name]
    friend = None
    n_events = 0
    while True:
        # Next event, or the ending? The options are the rendered sentence heads: distinct, prefix-free.
        heads = [" The end."]
        if n_events < 4:
            heads += [f" {name} showed the {obj} to ", f" {name} and the {pet} played with the {obj} ",
                      " Then it started to ", f" {name} heard a ", f" At home, {name} ate some "]
        k = w.pick(heads, [2, 1, 1, 1, 1, 1] if n_events < 4 else None)
        if k == 0:
            break
        n_events += 1
        if k == 1:  # the friend is chosen at the first visit and named again later: long-range copying
            if friend is None:
                w.write(f"{his} friend ")
                friend = friends[w.pick(friends)]
            else:
                w.write(f"{friend} again")
            w.write(f". {friend} said, \"What a ")
            w.pick(_PRAISE)
            w.write(f" {obj}!\"")
        elif k == 2:
            w.pick(_WHEN)
        elif k == 3:  # the weather decides the adjective later in the sentence: 0 extra bits
            wi = w.pick([x for x, _ in _WEATHER])
            w.write(f". {name} kept the {obj} safe so it did not get {_WEATHER[wi][1]}.")
        elif k == 4:
            w.pick(_SOUNDS)
            w.write(f" noise. The {pet} ")
            w.pick(_PET_ACTS)
        elif k == 5:
            w.pick(_FOODS)
            w.write(f" and put the {obj} on the table.")
    w.write("\n")


class SyntheticCorpus:
    """Deterministic synthetic stories with exact entropy bookkeeping.

    `SyntheticCorpus(seed).stories(n)` yields (text, bits) per story; `write(path, n_bytes)` writes stories
    separated by <|endoftext|> until the file has ~n_bytes, and returns the totals. The <|endoftext|>
    after each story is deterministic (the story's end is marked by its fixed last sentence), so it costs
    0 bits and its 13 bytes count in the denominator like any other text.
    `story_fn(writer)` can be replaced (tests use a grammar with one fair coin per story).
    """

    def __init__(self, seed: int = 0, story_fn: Callable[[StoryWriter], None] = None, check: bool = False):
        self.seed = seed
        self.story_fn = story_fn or _write_story
        self.check = check

    def stories(self, n: int | None = None, start_seed_offset: int = 0):
        """Yield (text, bits) for n stories (forever if None). Different `start_seed_offset`s are independent
        streams: the validation split uses stream 1, so it shares no stories with training by construction."""
        rng = random.Random(f"scratchlm-synthetic-{self.seed}-{start_seed_offset}")  # str seeds: stable
        for _ in itertools.count() if n is None else range(n):
            w = StoryWriter(rng, check=self.check)
            self.story_fn(w)
            yield w.text(), w.bits

    def write(self, path, n_bytes: int, stream: int = 0) -> dict:
        """Write stories until >= n_bytes (UTF-8) to `path` atomically. Returns stats incl. bits_per_byte."""
        total_bits, total_bytes = 0.0, 0
        with atomic_open(path, "wb") as f:  # a buffered file: one small write per story is cheap
            for n_stories, (text, bits) in enumerate(self.stories(None, start_seed_offset=stream), 1):
                data = (text + EOT).encode("utf-8")
                f.write(data)
                total_bits += bits
                total_bytes += len(data)
                if total_bytes >= n_bytes:
                    break
        return dict(bits=total_bits, bytes=total_bytes, stories=n_stories,
                    bits_per_byte=total_bits / max(total_bytes, 1))


def _is_prefix_free(options) -> bool:
    return all(not (i != j and b.startswith(a)) for i, a in enumerate(options) for j, b in enumerate(options))


# ---- Downloading the public datasets: resumable, verified, cached ------------------------------------


@dataclass(frozen=True)
class Remote:
    """One public file: its URL, how to get text from it ("gz", "xz" or None), and, where pinned, its size
    and SHA-256 (checked after the download and whenever the cached copy is reused)."""
    url: str
    unpack: Optional[str] = None
    size: Optional[int] = None
    sha256: Optional[str] = None


# The CS336 assignment's files, and Karpathy's tinyshakespeare (nanoGPT's char-level recipe; one file,
# split like any local text file: its last --val-fraction is validation, nanoGPT's 90/10 split). The large
# files' sizes and hashes are not pinned; the server's Content-Length is checked instead, and the SHA-256 of
# the finished download is recorded in `<file>.sha256` and re-checked whenever the cache is reused.
HF = "https://huggingface.co"
GITHUB_RAW = "https://raw.githubusercontent.com"
DATASETS = {
    "tinystories": {
        "train": Remote(HF + "/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt"),
        "val": Remote(HF + "/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt"),
    },
    "owt": {
        "train": Remote(HF + "/datasets/stanford-cs336/owt-sample/resolve/main/owt_train.txt.gz", "gz"),
        "val": Remote(HF + "/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz", "gz"),
    },
    "tinyshakespeare": {
        "text": Remote(GITHUB_RAW + "/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", None, 1_115_394,
                       "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    },
}


def unpack(src, dest, kind: str | None, progress: bool = True) -> Path:
    """Decompress `src` (kind "gz", "xz", or None = plain copy/link) to `dest` atomically."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        return dest
    if kind is None:
        try:
            os.link(src, dest)  # no copy needed for an uncompressed download
        except OSError:
            shutil.copyfile(src, dest)
        return dest
    opener = {"gz": gzip.open, "xz": lzma.open}.get(kind)
    if opener is None:
        raise ValueError(f"cannot unpack {src}: unsupported compression {kind!r} (supported: gz, xz)")
    done, bar = 0, Progress(progress, f"unpacking {src.name}")
    try:
        with opener(src, "rb") as fin, atomic_open(dest, "wb") as fout:
            while b := fin.read(1 << 22):
                fout.write(b)
                done += len(b)
                bar.update(f"{done / 1e6:,.1f} MB")
    except (OSError, EOFError, lzma.LZMAError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise
        raise ValueError(f"cannot unpack {src}: corrupt {kind} file ({e}); delete it to download again") from None
    bar.close(f"{done / 1e6:,.1f} MB")
    return dest


def fetch_dataset(name: str, data_dir, mirror: str | None = None, progress: bool = True) -> dict:
    """Download and unpack a known dataset; returns {"train": Path, "val": Path} of plain text files, or
    {"text": Path} for a one-file dataset. `mirror` replaces the scheme and host of every URL (tests
    point it at a local server or a file:// folder)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    out = {}
    ddir = Path(data_dir) / "downloads" / name
    # e.g. https://huggingface.co/datasets/x/y.txt.gz -> <data_dir>/downloads/<name>/y.txt.gz, unpacked to
    # text-y.txt next to it (a plain download is hard-linked instead of copied)
    for split, remote in DATASETS[name].items():
        path = urllib.parse.urlparse(remote.url).path
        url = mirror.rstrip("/") + path if mirror else remote.url
        fname = path.rsplit("/", 1)[-1]
        try:
            raw = download(url, ddir / fname, sha256=remote.sha256, expected_size=remote.size, progress=progress)
        except ConnectionError as e:
            raise ConnectionError(f"{e}; the {name} data set needs the network once (then it is cached in "
                                  f"{ddir}); or pass --mirror URL, or --data path/to/text.txt") from None
        text_name = fname.removesuffix(f".{remote.unpack}") if remote.unpack else fname
        out[split] = unpack(raw, ddir / ("text-" + text_name), remote.unpack, progress=progress)
    return out


# ---- The data pipeline: text -> train/val split -> BPE tokenizer -> token .bin files (each step cached) ----


@dataclass
class PreparedData:
    """What the training loop needs from the data pipeline."""
    train_path: str  # flat token .bin (np.memmap-able)
    val_path: str
    tokenizer: object  # tk.Tokenizer
    dtype: str  # numpy dtype name of the .bin files
    entropy_floor_bpb: float | None  # known only for --data synthetic (bits per byte of the val split)
    source: str
    cache_dir: str

    def train_tokens(self):
        return np.memmap(self.train_path, dtype=self.dtype, mode="r")

    def val_tokens(self):
        return np.memmap(self.val_path, dtype=self.dtype, mode="r")


def _key(d: dict) -> str:
    """A short stable hash of a dict of parameters: the name of its cache folder."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _missing_dirs(path) -> list:
    """The folders on the way to `path` (itself included) that do not exist yet, outermost first."""
    p, missing = Path(path).absolute(), []
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing[::-1]


def _make_dir(path, created: list) -> Path:
    """mkdir -p, remembering the folders it made (so a failure can remove exactly those)."""
    created.extend(_missing_dirs(path))
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def _remove_empty_dirs(dirs):
    """After a failure: remove the folders this command created, innermost first, where still empty."""
    for d in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


def _split_text_file(src: Path, train_out: Path, val_out: Path, val_fraction: float):
    """Last `val_fraction` of the file -> val; the rest -> train (never splitting a UTF-8 character)."""
    # the end, not a random sample: validation text then shares no passage with training (text is highly
    # repetitive locally, so random lines would leak their neighbours' content into the score)
    data = src.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{src} is not valid UTF-8 text (byte {e.start}: {e.reason})") from None
    cut = int(len(data) * (1 - val_fraction))  # exactly nanoGPT's split for ASCII text (first 90% / last 10%)
    while cut < len(data) and (data[cut] & 0xC0) == 0x80:  # never cut inside a UTF-8 character
        cut += 1
    atomic_write_bytes(train_out, data[:cut])
    atomic_write_bytes(val_out, data[cut:])


def _sample_for_bpe(src: Path, out: Path, max_bytes: int | None) -> Path:
    """BPE training on the first `max_bytes` of the train text (cut at a story/line boundary)."""
    # BPE's merge statistics settle long before the whole corpus is read: a prefix is enough for a big one
    if max_bytes is None or src.stat().st_size <= max_bytes:
        return src
    if out.exists():
        return out
    with open(src, "rb") as f:
        data = f.read(max_bytes)
    cut = max(data.rfind(EOT.encode()), data.rfind(b"\n"))
    # no boundary at all: drop the character the read may have cut in two (ignore only affects that tail)
    data = data[:cut] if cut > 0 else data.decode("utf-8", errors="ignore").encode("utf-8")
    atomic_write_bytes(out, data)
    return out


def prepare_data(cfg: "TrainConfig", log: Callable = print) -> PreparedData:
    """Run (or reuse) every data step for cfg.data; return paths + tokenizer + entropy floor.

    Cache layout under cfg.data_dir:  <source>-<key>/ {train.txt, val.txt, text.json}
                                      <source>-<key>/tok-<vocab>-<key2>/ {vocab.json, merges.txt, ...,
                                                                          train.bin, val.bin, done.json}
    Keys hash the source identity and parameters (seed, sizes, vocab...), so changing any of them makes a
    new cache entry and re-running with the same ones skips straight to training. Every file is written
    atomically; a failure removes the (empty) folders it created.
    """
    created = []
    try:
        tdir, floor = _prepare_text(cfg, _make_dir(cfg.data_dir, created), log, created)
        return _prepare_tokens(cfg, tdir, floor, log, created)
    except BaseException:
        _remove_empty_dirs(created)
        raise


def _prepare_text(cfg, data_dir: Path, log: Callable, created: list):
    """Step 1: the text, split into train.txt / val.txt in its cache folder. Returns (folder, floor)."""
    if cfg.data == "synthetic":
        key = dict(source="synthetic", seed=cfg.data_seed, train_bytes=cfg.synthetic_bytes,
                   val_bytes=cfg.synthetic_val_bytes, grammar=1)
        tdir = _make_dir(data_dir / f"synthetic-{_key(key)}", created)
        meta_path = tdir / "text.json"
        if not meta_path.exists():
            t0 = time.time()
            corpus = SyntheticCorpus(cfg.data_seed)
            st = corpus.write(tdir / "train.txt", cfg.synthetic_bytes, stream=0)
            sv = corpus.write(tdir / "val.txt", cfg.synthetic_val_bytes, stream=1)  # independent stream
            atomic_write_json(meta_path, dict(key=key, train=st, val=sv))
            log(f"synthetic corpus: {st['bytes'] / 1e6:.1f} MB train, {sv['bytes'] / 1e6:.2f} MB val in "
                f"{time.time() - t0:.1f}s; entropy floor {sv['bits_per_byte']:.4f} bits/byte (val split)")
        return tdir, json.loads(meta_path.read_text())["val"]["bits_per_byte"]
    # a known data set: downloaded once into <data_dir>/downloads/<name>, verified, then cached like text
    if cfg.data in DATASETS:
        _make_dir(data_dir / "downloads" / cfg.data, created)
        files = fetch_dataset(cfg.data, data_dir, mirror=cfg.mirror, progress=True)
        if "text" in files:  # one file: split like a local text file
            return _split_cached(files["text"], cfg.data, cfg, data_dir, created), None
        key = dict(source=cfg.data, train=os.path.getsize(files["train"]), val=os.path.getsize(files["val"]))
        tdir = _make_dir(data_dir / f"{cfg.data}-{_key(key)}", created)
        for split in ("train", "val"):  # hard links (or copies) of the downloads; kept when already there
            unpack(files[split], tdir / f"{split}.txt", None, progress=False)
        if not (tdir / "text.json").exists():
            atomic_write_json(tdir / "text.json", dict(key=key))
        return tdir, None
    # a user's own text file: split once, cached by path, size and modification time (edit it: a new cache)
    src = Path(cfg.data).expanduser()
    if not src.is_file():
        raise ValueError(f"--data {cfg.data!r}: not 'synthetic', a known dataset {sorted(DATASETS)}, "
                         "nor an existing file")
    return _split_cached(src, src.stem, cfg, data_dir, created), None


def _split_cached(src: Path, name: str, cfg, data_dir: Path, created: list) -> Path:
    """A plain text file split into train/val (its last val_fraction), cached by path, size and mtime."""
    stt = src.stat()
    if stt.st_size == 0:
        raise ValueError(f"--data {src} is empty")
    key = dict(source=str(src.resolve()), size=stt.st_size, mtime=int(stt.st_mtime), val=cfg.val_fraction)
    tdir = _make_dir(data_dir / f"{name}-{_key(key)}", created)
    if not (tdir / "text.json").exists():
        _split_text_file(src, tdir / "train.txt", tdir / "val.txt", cfg.val_fraction)
        atomic_write_json(tdir / "text.json", dict(key=key))
    return tdir


def _prepare_tokens(cfg, tdir: Path, floor, log: Callable, created: list) -> PreparedData:
    """Steps 2 and 3: a BPE tokenizer trained on the train text, then both splits encoded to .bin files."""
    # the tokenizer's folder sits inside its text's folder: same text + same BPE options = reuse
    tok_key = dict(vocab=cfg.vocab_size, bpe_bytes=cfg.bpe_train_bytes, specials=[EOT])
    kdir = _make_dir(tdir / f"tok-{cfg.vocab_size}-{_key(tok_key)}", created)
    if (kdir / "vocab.json").exists() and (kdir / "merges.txt").exists():
        tokenizer = tk.Tokenizer.load(str(kdir))
    else:
        t0 = time.time()
        sample = _sample_for_bpe(tdir / "train.txt", tdir / f"bpe-sample-{cfg.bpe_train_bytes}.txt",
                                 cfg.bpe_train_bytes)
        vocab, merges = tk.train_bpe(str(sample), cfg.vocab_size, [EOT], progress=False)
        tokenizer = tk.Tokenizer(vocab, merges, [EOT])
        tokenizer.save(str(kdir))
        log(f"BPE tokenizer: vocab {cfg.vocab_size} trained on {os.path.getsize(sample) / 1e6:.1f} MB in "
            f"{time.time() - t0:.1f}s")
    # uint16 when every id fits (vocab <= 65536): half the disk and memory-map traffic of int32.
    # done.json is written last, so a crash mid-encoding re-encodes instead of trusting half a file
    dtype = np.dtype(tk.token_dtype(tokenizer.vocab_size)).name
    done = kdir / "done.json"
    if not done.exists():
        t0 = time.time()
        counts = {split: tk.encode_file(tokenizer, str(tdir / f"{split}.txt"), str(kdir / f"{split}.bin"),
                                        progress=False) for split in ("train", "val")}
        atomic_write_json(done, dict(counts=counts, dtype=dtype))
        nbytes = os.path.getsize(tdir / "train.txt")
        log(f"tokenized: {counts['train']:,} train / {counts['val']:,} val tokens "
            f"({nbytes / max(counts['train'], 1):.2f} bytes/token) in {time.time() - t0:.1f}s")
    return PreparedData(train_path=str(kdir / "train.bin"), val_path=str(kdir / "val.bin"), tokenizer=tokenizer,
                        dtype=dtype, entropy_floor_bpb=floor, source=cfg.data, cache_dir=str(kdir))


# ---- Devices, precision and process handling ------------------------------------------------------


def autocast_context(device: torch.device, dtype: str):
    """bf16 autocast on GPUs that support it (matmuls in bf16, reductions in fp32), else full fp32."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of known GPUs (for MFU); None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
                       ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)):
        if key in name:
            return flops
    return None


@contextlib.contextmanager
def _checkpoint_on_interrupt(enabled: bool):
    """Ctrl-C during the loop: the first sets a flag that the loop checks after each step (it saves a
    checkpoint there and stops), the second stops at once without saving. Yields the flag's reader.
    Only for a single process in the main thread: with several ranks every rank must take part in a
    checkpoint, and they would not all see the same signal at the same step."""
    hit = []
    if not enabled or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt  # the second Ctrl-C
        hit.append(True)  # the loop finishes the step it is in: weights and optimizer stay consistent
        print("\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to stop without saving)",
              file=sys.stderr, flush=True)

    # the handler is ours only while the loop runs; the previous one (Python's default) comes back after
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- Helpers of the loop: progress lines and logs, resume checks, RNG states, samples -------------------


def learning_rates(optimizer) -> dict:
    """The current learning rate of each optimizer kind, labelled: {"lr_muon": .., "lr_adamw": ..}. One
    number alone would be ambiguous: Muon's and AdamW's peaks differ by ~10x. The kind is read from the
    group's hyperparameters (Muon's carry "ns_steps", SOAP's "precondition_frequency", AdamW's "betas"), so
    wrapped optimizers (ddp.py's ZeRO-1 shards) are labelled too."""
    out = {}
    for g in optimizer.param_groups:
        kind = ("muon" if "ns_steps" in g else "soap" if "precondition_frequency" in g
                else "adamw" if "betas" in g else "other")
        out.setdefault(f"lr_{kind}", g["lr"])
    return out


class MetricsLog:
    """metrics.jsonl: one JSON object per line ({"kind": "train"|"val", "step", ...}). A fresh run starts an
    empty log. On resume, rows after the resumed step (written before a crash, about to be redone) and the
    previous final row (the run's end is about to be evaluated again) are dropped, so the log and the plot
    read as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:  # a fresh run (check_out_dir has made sure no earlier run is lost)
            atomic_write_text(path, "")
        elif path.exists():
            rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
            keep = [r for r in rows if r["step"] <= resume_step and not r.get("final")]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, **row):
        with open(self.path, "a") as f:  # appending one line: a crash loses at most that line
            f.write(json.dumps(row) + "\n")


def _log_step(run: Run, step: int, loss: float, grad_norm: float):
    """A metrics row after every step; a progress line every log_interval steps (and after the first)."""
    cfg, now, t = run.cfg, time.time(), run.clock()
    if not run.main:
        return
    lrs = learning_rates(run.optimizer)  # each optimizer's rate, labelled (Muon's and AdamW's differ ~10x)
    extra = {k: v for ext in run.extensions for k, v in ext.metrics(run).items()}  # e.g. the noise scale
    run.metrics.write(kind="train", step=step, loss=loss, **lrs, grad_norm=grad_norm, minutes=run.minutes(), **extra)
    if step % cfg.log_interval and step != 1:
        return
    # throughput over the steps since the last progress line (not since the start: the speed right now)
    last_t, last_step = run.last_log
    tps = (step - last_step) * run.tokens_per_step / max(now - last_t, 1e-9)
    run.last_log = (now, step)
    of = f"/{cfg.max_steps}" if cfg.max_steps else ""
    line = (f"step {step:6d}{of} | loss {loss:.4f} | "
            + " ".join(f"{k} {v:.2e}" for k, v in lrs.items()) + f" | {tps:,.0f} tok/s")
    line += "".join(ext.progress(run) for ext in run.extensions)  # e.g. the noise scale B_noise
    if run.peak:  # model FLOPs utilization: achieved FLOP/s over the GPU's peak
        line += f" | MFU {100 * run.flops_per_tok * tps / run.world_size / run.peak:.1f}%"
    line += f" | {t / 60:.1f} min | ETA {run.budget.eta(step, t) / 60:.1f} min"
    if run.hooks.progress_note:
        line += run.hooks.progress_note(run.run_model, t)
    run.log(line, flush=True) if run.log is print else run.log(line)


def _check_resumable(run: Run, ckpt: dict, model):
    """A checkpoint continues this run only if it was written for the same model and the same tokenizer
    (same vocab size is not enough: another corpus's tokenizer maps the ids to other strings)."""
    mcfg = model.config.to_dict()
    saved_cfg = ckpt.get("model_config") or {}
    try:  # a checkpoint from before a new (default-off) switch lacks that field: it takes today's default
        saved_cfg = M.ModelConfig.from_dict(saved_cfg).to_dict()
    except (ValueError, TypeError):
        pass  # unknown fields or missing sizes: reported field by field below
    if saved_cfg != mcfg:  # every field that differs, as 'name: checkpoint X vs now Y'
        raise ValueError(f"checkpoint {run.ckpt_path} is incompatible with the requested model: " + "; ".join(
            f"{k}: checkpoint {saved_cfg.get(k)!r} vs now {mcfg.get(k)!r}" for k in sorted(set(saved_cfg) | set(mcfg))
            if saved_cfg.get(k) != mcfg.get(k)))
    # muP changes every step's learning rates: a run continues under the parametrization it started with
    # (a checkpoint from before the switch existed was trained without muP)
    saved_mup = (ckpt.get("config") or {}).get("mup_base_width")
    if saved_mup != run.cfg.mup_base_width:
        raise ValueError(f"checkpoint {run.ckpt_path} was trained with --mup-base-width {saved_mup} (None: off), "
                         f"this run asks for {run.cfg.mup_base_width}; resume with the same setting")
    saved, now = ckpt.get("tokenizer_fingerprint"), run.tokenizer.fingerprint()
    if saved is not None and saved != now:
        raise ValueError(f"checkpoint {run.ckpt_path} was trained with another tokenizer (fingerprint {saved}, "
                         f"this data's tokenizer {now}); resume with the same --data and --vocab-size")


def _val_line(r: dict, floor: float | None) -> str:
    s = f"val loss {r['loss']:.4f} | ppl {r['ppl']:.2f} | bpb {r['bpb']:.4f}"
    if floor is not None:
        s += f" | entropy floor {floor:.4f} bpb (gap {100 * (r['bpb'] / floor - 1):+.1f}%)"
    return s


def rng_state() -> dict:
    """Every random number generator's state (torch CPU, numpy, python, CUDA) as safe-to-load primitives."""
    # numpy's and python's states are tuples of arrays and ints: stored as tensors and lists, which
    # weights_only loading accepts (a raw numpy array would need unpickling arbitrary classes)
    py = random.getstate()
    np_state = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), int(np_state[2]),
                    int(np_state[3]), float(np_state[4])],
          "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):
    """The inverse of rng_state: every generator continues exactly where the checkpointed run left off."""
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_optimizer_state(optimizer, ckpt: dict, src):
    """The optimizer state of a checkpoint read by read_checkpoint (none stored: left as is)."""
    if ckpt.get("optimizer") is None:
        return
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"checkpoint {src}: optimizer state incompatible ({e})") from None


def sample_texts(model, tokenizer, prompt: str, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, device="cpu", note: Callable | None = None) -> list[str]:
    """Samples from a model in memory (the end of a run), with model.py's `generate` (KV cache; temperature
    0 = greedy). An empty prompt starts a fresh document after <|endoftext|>; generation stops at the next
    one. A prompt too long for the context is cut from the left and the continuation shortened to fit
    (model.fit_to_context); `note` is told when that happens."""
    eot = tokenizer.eot_id
    ids = tokenizer.encode(prompt) if prompt else ([eot] if eot is not None else [])
    if not ids:
        raise ValueError("empty prompt and the tokenizer has no <|endoftext|> token to start from")
    ids, max_new_tokens, notes = M.fit_to_context(ids, max_new_tokens, model.config.context_length)
    for msg in notes if note else ():
        note(msg)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)  # where sampling draws
    was_training = model.training
    with torch.no_grad():
        outs = M.generate(model, [list(ids) for _ in range(num_samples)], max_new_tokens, temperature=temperature,
                          top_p=top_p, eos_id=eot, generator=gen)
    model.train(was_training)
    return [prompt + tokenizer.decode([t for t in o if t != eot]) for o in outs]


# ---- The configuration: every option, its --help text, presets, validation -----------------------------


@dataclass
class TrainConfig:
    """Every training option. Presets fill them; every one is also a command-line flag that overrides the
    preset (`python train.py owt --lr 3e-4`). Each line below is that flag's --help text (get_parser reads
    them from this docstring, so the documentation lives in one place).

    preset: the one-word preset these values came from (see PRESETS)
    data: training text: 'synthetic' (built-in stories with a known entropy floor), 'tinyshakespeare',
        'tinystories', 'owt' (downloaded once and cached), or a path to a UTF-8 text file (its last
        --val-fraction is validation)
    data_dir: cache folder for downloads, corpora, tokenizers and token files
    data_seed: seed of the synthetic corpus
    synthetic_bytes: size of the synthetic training text in bytes
    synthetic_val_bytes: size of the synthetic validation text in bytes
    val_fraction: fraction of a plain text file (its end) used for validation
    vocab_size: BPE vocabulary size (256 bytes + <|endoftext|> + merges)
    bpe_train_bytes: train the tokenizer on at most this many bytes of the training text (0: all of it)
    mirror: base URL (scheme and host) replacing the public servers' in dataset downloads
    context_length: tokens per training window
    d_model: model width
    num_layers: transformer blocks
    num_heads: attention heads
    d_ff: feed-forward width (default: model.py's choice for the FFN kind)
    rope_theta: RoPE base
    model_kw: further model.ModelConfig switches as a JSON object, e.g. '{"qk_norm": true}'
    optimizer: adamw, muon (Muon for the hidden weight matrices + AdamW for embeddings, head, gains) or soap
        (SOAP for the hidden matrices, at --lr, + AdamW for the rest)
    lr: peak AdamW learning rate
    muon_lr: peak Muon learning rate (hidden matrices)
    muon_momentum: Muon momentum
    soap_frequency: SOAP: steps between eigenbasis refreshes of its preconditioners
    min_lr_ratio: final learning rate as a fraction of the peak
    schedule: learning-rate schedule: cosine, wsd (warm-up, stable, decay) or constant
    decay_fraction: wsd: fraction of the post-warm-up run spent in the final linear decay
    warmup_iters: linear warm-up steps
    weight_decay: decoupled weight decay (2-D weights only)
    mup_base_width: muP (Tensor Programs V): the d_model the learning rate was tuned at; hidden matrices and
        lm_head train at lr * base/d_model, lm_head init * base/d_model (needs --optimizer adamw; unset: off)
    beta1: Adam beta1
    beta2: Adam beta2
    eps: Adam epsilon
    grad_clip: clip the global gradient L2 norm to this (0: off)
    distill_from: train on this checkpoint's logits too (knowledge distillation; the teacher must have this
        run's tokenizer)
    distill_temperature: distillation: softmax temperature T of teacher and student
    distill_alpha: distillation: weight of the T^2-scaled KL term (1 - alpha: the cross-entropy on the text)
    prune_sparsity: gradual magnitude pruning of the hidden matrices to this fraction of zeros (0: off)
    prune_start: pruning: run progress (0-1) where the sparsity ramp begins
    prune_end: pruning: run progress where it reaches --prune-sparsity (then training continues with the masks)
    noise_scale: log the gradient noise scale B_simple (McCandlish et al.) in tokens, from the micro-batch and
        the accumulated gradients (needs --grad-accum >= 2; costs one copy of the gradients)
    batch_size: sequences per micro-batch (per process)
    grad_accum: micro-batches per optimizer step
    max_steps: optimizer steps (with --max-minutes: an upper bound)
    max_minutes: wall-clock budget of the whole command in minutes (data preparation, training, final
        evaluation and samples); the learning-rate schedule is stretched to end with training
    budget_includes_prep: count --max-minutes from process start (corpus, tokenizer and encoding included)
        instead of from the first training step
    adamw_impl: ours (from-scratch AdamW) or torch (torch.optim.AdamW, fused/foreach fast path)
    loss_impl: fast (F.cross_entropy) or ours (from-scratch cross_entropy)
    device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
    dtype: auto (bf16 autocast on CUDA), float32 or bfloat16 (autocast)
    compile: torch.compile the model
    threads: CPU threads for torch (0: auto = time a small workload with all cores and with one, keep the
        faster; on a machine whose cores are busy with other work, fewer threads can be much faster)
    seed: seed for initialization and batch sampling
    eval_interval: steps between validation passes
    eval_tokens: validation tokens per periodic evaluation (the first ones of the split, same every time)
    eval_stride: validation windows start every this many tokens and score only their last `stride`
        targets (0: context_length // 2, so every scored token sees at least half a context)
    final_eval_tokens: validation tokens in the final evaluation (default: the whole split)
    log_interval: steps between progress lines
    out_dir: run folder (default runs/<preset>)
    ckpt_interval: steps between checkpoints
    resume: continue the run in --out-dir from its ckpt.pt
    overwrite: replace an earlier run in --out-dir (without it, a folder holding a run is refused)
    num_samples: samples printed at the end
    sample_tokens: tokens per sample
    temperature: sampling temperature (0: greedy)
    top_p: nucleus sampling threshold in (0, 1]
    plot: write loss_curve.png
    """
    preset: str = "demo"
    # data
    data: str = "synthetic"
    data_dir: str = "data_cache"
    data_seed: int = 0
    synthetic_bytes: int = 6_000_000
    synthetic_val_bytes: int = 300_000
    val_fraction: float = 0.1
    vocab_size: int = 512
    bpe_train_bytes: Optional[int] = 2_000_000
    mirror: Optional[str] = None
    # model (model.ModelConfig)
    context_length: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: Optional[int] = None
    rope_theta: float = 10000.0
    model_kw: dict = field(default_factory=dict)
    # optimization
    optimizer: str = "muon"
    lr: float = 3e-3
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    soap_frequency: int = 10
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    warmup_iters: int = 50
    weight_decay: float = 0.1
    mup_base_width: Optional[int] = None
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    noise_scale: bool = False
    distill_from: Optional[str] = None
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5
    prune_sparsity: float = 0.0
    prune_start: float = 0.2
    prune_end: float = 0.7
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: Optional[int] = 2000
    max_minutes: Optional[float] = None
    budget_includes_prep: bool = True
    adamw_impl: str = "ours"
    loss_impl: str = "fast"
    # system
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int = 0
    seed: int = 1337
    # evaluation, logging, checkpoints, samples
    eval_interval: int = 250
    eval_tokens: int = 32_768
    eval_stride: int = 0
    final_eval_tokens: Optional[int] = None
    log_interval: int = 10
    out_dir: Optional[str] = None
    ckpt_interval: int = 250
    resume: bool = False
    overwrite: bool = False
    num_samples: int = 2
    sample_tokens: int = 200
    temperature: float = 1.0
    top_p: float = 1.0
    plot: bool = True


# Optimizer: every preset defaults to Muon (+ AdamW for embeddings/head/gains). Measured on the demo
# (d_model 128, 4 layers, 300 steps of 2,048 tokens): val bpb 0.246 vs AdamW's 0.268 at step 100, and Muon
# kept the lead; the GPU presets' choice follows the field (modded-nanogpt, nanochat) -- not measured here.
PRESETS = {
    # CPU demo: synthetic stories, tiny model, the whole command in 4.25 minutes (corpus + BPE included).
    "demo": dict(context_length=128, max_steps=None, max_minutes=4.25),
    # CPU speedrun vs nanoGPT's char-level shakespeare recipe (same wall clock, bpb on the last 10%). The
    # text is downloaded once (1.1 MB, SHA-256 pinned) into --data-dir; no network later, no network in tests
    # (they use --mirror with a local folder).
    "speedrun": dict(data="tinyshakespeare", vocab_size=512, bpe_train_bytes=None, context_length=128,
                     d_model=128, num_layers=4, num_heads=4, batch_size=16, lr=3e-3, muon_lr=0.02,
                     warmup_iters=30, max_steps=None, max_minutes=2.6, eval_interval=100_000,
                     ckpt_interval=100_000, eval_tokens=32_768, weight_decay=0.1, num_samples=1),
    # CS336 assignment 1: 4 layers, d_model 512, 16 heads, d_ff 1344, context 256, 10K vocab. 327.68M
    # tokens = 5000 steps x 256 x 256. Meant for one GPU.
    "tinystories": dict(data="tinystories", vocab_size=10_000, bpe_train_bytes=None, context_length=256,
                        d_model=512, num_layers=4, num_heads=16, d_ff=1344, batch_size=256, max_steps=5000,
                        lr=3e-3, muon_lr=0.02, warmup_iters=200, eval_interval=500, ckpt_interval=500,
                        eval_tokens=1_048_576, final_eval_tokens=4_194_304, compile=True),
    # CS336 leaderboard setting: OpenWebText sample, 32K vocab, context 512, 90 minutes on one H100.
    "owt": dict(data="owt", vocab_size=32_000, bpe_train_bytes=500_000_000, context_length=512, d_model=768,
                num_layers=12, num_heads=12, batch_size=32, grad_accum=4, max_steps=None, max_minutes=90.0,
                lr=3e-3, muon_lr=0.02, warmup_iters=300, eval_interval=1000, ckpt_interval=1000,
                eval_tokens=1_048_576, final_eval_tokens=8_388_608, compile=True, budget_includes_prep=False),
}

# model options that have their own flag: --model-kw must not set them behind the flag's back
_MODEL_FLAGS = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff", "rope_theta")


def validate_config(cfg: TrainConfig):
    """Check every option before any work starts: one ValueError naming the flag and its allowed range."""
    c, T = cfg, cfg.context_length
    one_of = dict(optimizer=("adamw", "muon", "soap"), schedule=("cosine", "wsd", "constant"),
                  adamw_impl=("ours", "torch"), loss_impl=("fast", "ours"), dtype=("auto", "float32", "bfloat16"))
    at_least_1 = ("batch_size", "grad_accum", "context_length", "soap_frequency", "synthetic_bytes",
                  "synthetic_val_bytes", "eval_interval", "log_interval", "ckpt_interval", "sample_tokens")
    checks = [  # (field, ok, what the flag allows); one rule for several fields first
        *[(n, getattr(c, n) in v, ", ".join(v[:-1]) + " or " + v[-1]) for n, v in one_of.items()],
        *[(n, getattr(c, n) >= 1, ">= 1") for n in at_least_1],
        *[(n, getattr(c, n) >= 0, ">= 0") for n in ("warmup_iters", "weight_decay", "eps", "num_samples")],
        *[(n, getattr(c, n) > 0, "> 0") for n in ("lr", "muon_lr", "distill_temperature")],
        *[(n, 0 <= getattr(c, n) < 1, "in [0, 1)")
          for n in ("muon_momentum", "beta1", "beta2", "prune_sparsity", "prune_start")],
        *[(n, 0 <= getattr(c, n) <= 1, "in [0, 1]") for n in ("min_lr_ratio", "decay_fraction", "distill_alpha")],
        ("prune_end", c.prune_start < c.prune_end <= 1, f"in (--prune-start ({c.prune_start}), 1]"),
        ("max_steps", c.max_steps is None or c.max_steps >= 1, ">= 1"),
        ("max_minutes", c.max_minutes is None or c.max_minutes > 0, "> 0"),
        ("grad_clip", c.grad_clip >= 0, ">= 0 (0: off)"),
        ("val_fraction", 0 < c.val_fraction < 1, "in (0, 1)"),
        ("vocab_size", c.vocab_size >= 257, ">= 257 (256 bytes + <|endoftext|>)"),
        ("bpe_train_bytes", c.bpe_train_bytes is None or c.bpe_train_bytes >= 1, ">= 0 (0: all)"),
        ("threads", c.threads >= 0, ">= 0 (0: auto)"),
        ("eval_tokens", c.eval_tokens >= T, f">= --context-length ({T})"),
        ("final_eval_tokens", c.final_eval_tokens is None or c.final_eval_tokens >= T, f">= --context-length ({T})"),
        ("eval_stride", 0 <= c.eval_stride <= T, f"in [0, --context-length ({T})]"),
        ("temperature", c.temperature >= 0, ">= 0 (0: greedy)"), ("top_p", 0 < c.top_p <= 1, "in (0, 1]"),
        ("model_kw", isinstance(c.model_kw, dict), "a JSON object"),
        ("mup_base_width", c.mup_base_width is None or c.mup_base_width >= 1, ">= 1 (unset: muP off)"),
    ]
    # the table above, then the checks that need the file system, model.py or the hardware
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(cfg, name)!r}")
    if c.distill_from is not None and not Path(c.distill_from).expanduser().is_file():
        raise ValueError(f"--distill-from {c.distill_from}: no such checkpoint file")
    if c.mup_base_width is not None and c.optimizer != "adamw":
        raise ValueError(f"--mup-base-width needs --optimizer adamw (muP's rules here are Adam's), got "
                         f"--optimizer {c.optimizer}")
    if c.noise_scale and c.grad_accum < 2:
        raise ValueError(f"--noise-scale needs two batch sizes: --grad-accum must be >= 2, got {c.grad_accum}")
    if c.max_steps is None and c.max_minutes is None:
        raise ValueError("give --max-steps or --max-minutes (or both)")
    if c.data not in ("synthetic", *DATASETS) and not Path(c.data).expanduser().is_file():
        raise ValueError(f"--data {c.data!r}: not 'synthetic', one of {sorted(DATASETS)}, nor an existing file")
    for name in ("data_dir", "out_dir"):
        path = getattr(c, name)
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ValueError(f"--{name.replace('_', '-')} {path} is a file; give a folder")
    # --model-kw: a dict of model.ModelConfig switches, built into a real config here so a typo or a bad
    # value fails now (one line) rather than after the data preparation
    clash = sorted(set(c.model_kw) & set(_MODEL_FLAGS))
    if clash:
        raise ValueError(f"--model-kw must not set {clash}: use --{clash[0].replace('_', '-')}")
    try:
        model_config(c, c.vocab_size)  # every model switch checked now, not at the first forward pass
    except (ValueError, TypeError) as e:
        raise ValueError(f"--model-kw / model options: {e}") from None
    resolve_device(c.device)


def set_cpu_threads(threads: int) -> int:
    """torch's intra-op thread count. Auto (0): time a small matmul workload (~0.2 s) with all cores and
    with one, keep the faster. Why bother: when other processes already occupy the cores, OpenMP worker
    threads that spin-wait for each other get descheduled at the worst moments, and one thread can run a
    training step several times faster than two; on an idle machine all cores win. Measuring beats
    guessing from the load average, which lags by a minute."""
    if threads <= 0:
        cores = torch.get_num_threads() if torch.get_num_threads() > 1 else (os.cpu_count() or 1)
        a, b = torch.randn(1024, 128), torch.randn(128, 512)  # a matmul the size of a small model's layer
        threads = 1 if cores == 1 else min((cores, 1), key=lambda t: _matmul_seconds(t, a, b))  # a tie: all cores
    torch.set_num_threads(threads)
    return threads


def _matmul_seconds(threads: int, a: torch.Tensor, b: torch.Tensor) -> float:
    """Seconds for 12 of what a training step spends its time on, (a @ b).relu_(), on `threads` threads."""
    torch.set_num_threads(threads)
    for _ in range(2):  # warm-up
        (a @ b).relu_()
    t0 = time.perf_counter()
    for _ in range(12):
        (a @ b).relu_()
    return time.perf_counter() - t0


# what a run writes into its folder: any one of them means the folder holds a run
RUN_FILES = ("ckpt.pt", "metrics.jsonl", "loss_curve.png", "tokenizer")


def check_out_dir(out_dir, cfg: TrainConfig | None = None) -> Path:
    """Create the run folder and prove we can write into it, before any expensive work starts.

    Given the run's cfg, it also protects an earlier run: a folder that holds any of a run's files
    (RUN_FILES) is continued with --resume, replaced only with --overwrite (which deletes its checkpoint now,
    so a crash cannot later resume the old run under the new name), and otherwise refused."""
    out = Path(out_dir)
    if cfg is not None and not cfg.resume:
        earlier = [n for n in RUN_FILES if (out / n).exists()]
        if earlier and not cfg.overwrite:
            raise ValueError(f"{out} already holds a run ({', '.join(earlier)}): continue it with --resume, "
                             "replace it with --overwrite, or choose another --out-dir")
        if earlier:
            (out / "ckpt.pt").unlink(missing_ok=True)
    # creating and deleting a small file proves the folder is writable now, not after hours of training
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_open(out / ".write_test", "w") as f:
            f.write("ok")
        (out / ".write_test").unlink()
    except OSError as e:
        raise PermissionError(f"output directory {out} is not writable: {e.strerror or e}") from None
    return out


def plot_losses(metrics_path: Path, png_path: Path, title: str = "", floor: float | None = None):
    """Loss curves against steps and against wall-clock minutes."""
    from matplotlib.figure import Figure  # a Figure without pyplot: no display, no global figure to close
    rows = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.strip()]
    tr = [r for r in rows if r["kind"] == "train"]
    va = [r for r in rows if r["kind"] == "val"]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    # left: loss against steps (what the optimizer saw); right: against minutes (what the run cost)
    for ax, xkey, xlabel in ((axes[0], "step", "step"), (axes[1], "minutes", "wall-clock minutes")):
        ax.plot([r[xkey] for r in tr], [r["loss"] for r in tr], label="train loss (nats/token)", alpha=0.7)
        ax.plot([r[xkey] for r in va], [r["loss"] for r in va], "o-", label="val loss (nats/token)")
        if va and floor is not None and va[-1].get("bpb"):
            # the floor in nats/token at the val split's bytes/token
            ax.axhline(floor * math.log(2) * va[-1]["bytes"] / va[-1]["tokens"], color="k", ls="--",
                       label="entropy floor")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    _save_png(fig, png_path)


def _save_png(fig, png_path: Path):
    """Write a matplotlib Figure as a PNG, atomically: an image viewer refreshing the file never sees half a PNG."""
    fig.tight_layout()
    with atomic_open(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)


# ===== Appendix: benchmarks =====
# The CPU speedrun against nanoGPT's char-level Shakespeare recipe, side by side in one command.
#
# This is a faithful re-implementation of nanoGPT's model.py and train.py (so the benchmark needs no
# download of its code) for the README's CPU recipe (config/train_shakespeare_char.py with --device=cpu
# --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
# --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0): char vocab, learned positions,
# pre-LayerNorm (no bias), GELU MLP 4x, tied embeddings, N(0, 0.02) init with 0.02/sqrt(2 L) on residual
# projections, AdamW(lr 1e-3, betas (0.9, 0.99), wd 0.1 on 2-D weights), warm-up 100, cosine to 1e-4,
# clip 1.0, eval every 250 steps on 20 batches of each split (as the recipe's timing includes).


class _NanoGPT(torch.nn.Module):
    def __init__(self, vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128):
        """nanoGPT's GPT with the recipe's sizes: 4 layers, 4 heads, width 128, context 64, no biases, no dropout."""
        super().__init__()
        nn = torch.nn
        self.n_head = n_head
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList()
        for _ in range(n_layer):
            self.blocks.append(nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(n_embd, bias=False), c_attn=nn.Linear(n_embd, 3 * n_embd, bias=False),
                c_proj=nn.Linear(n_embd, n_embd, bias=False), ln_2=nn.LayerNorm(n_embd, bias=False),
                c_fc=nn.Linear(n_embd, 4 * n_embd, bias=False), mlp_proj=nn.Linear(4 * n_embd, n_embd, bias=False))))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        # GPT-2's init: N(0, 0.02), and 0.02 / sqrt(2 L) for the projections into the residual stream, so
        # its variance does not grow with depth (2 L such additions)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx):
        """(B, T) char ids -> (B, T, V) logits, exactly nanoGPT's block: x += attn(ln_1(x)); x += mlp(ln_2(x))."""
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C): token + learned position
        for b in self.blocks:
            h = b["ln_1"](x)
            q, k, v = b["c_attn"](h).split(h.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs) each
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["c_proj"](y)
            x = x + b["mlp_proj"](F.gelu(b["c_fc"](b["ln_2"](x))))
        return self.lm_head(self.ln_f(x))


def bench_nanogpt(text_path: str, iters: int = 2000, seed: int = 1337, log: Callable = print) -> dict:
    """Train the nanoGPT CPU recipe on `text_path`; return wall time and bpb on the last 10% (exact pass)."""
    t0 = time.time()
    torch.manual_seed(seed)
    # nanoGPT's data/shakespeare_char/prepare.py: one token per character, first 90% train, last 10% val
    text = Path(text_path).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(data))
    train_d, val_d = data[:n], data[n:]
    model = _NanoGPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)],
                            lr=1e-3, betas=(0.9, 0.99))
    bs, T = 12, 64

    # nanoGPT's get_batch: random starts from torch's generator, one slice per row (the same windows as
    # ours, drawn differently)
    def batch(d):
        ix = torch.randint(len(d) - T, (bs,))
        x = torch.stack([torch.from_numpy(d[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    # nanoGPT's train.py loop: lr from its cosine (the same formula as ours), an estimate every 250 steps,
    # then one step (forward, backward, clip to 1.0, AdamW); iteration `iters` only evaluates
    for it in range(iters + 1):
        lr = get_lr_cosine_schedule(it, 1e-3, 1e-4, 100, iters)
        for g in opt.param_groups:
            g["lr"] = lr
        if it % 250 == 0:  # the recipe's periodic estimate (20 batches per split), part of its wall time
            model.eval()
            with torch.no_grad():
                est = {s: float(np.mean([float(F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1)))
                                         for x, y in (batch(d) for _ in range(20))]))
                       for s, d in (("train", train_d), ("val", val_d))}
            model.train()
            log(f"nanoGPT step {it}: train {est['train']:.4f}, val {est['val']:.4f} ({time.time() - t0:.0f}s)")
        if it == iters:
            break
        x, y = batch(train_d)
        loss = F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    train_time = time.time() - t0
    # a character's bytes in UTF-8 (tinyshakespeare is ASCII: 1 each), so its bpb is bits per character
    char_bytes = np.array([len(c.encode("utf-8")) for c in chars])
    r = evaluate(model, val_d, context_length=T, batch_size=64, device="cpu", token_bytes=char_bytes,
                 stride=T // 2)  # the same sliding-window evaluator and stride policy (T/2) as ours
    return dict(seconds=train_time, val=r)


def bench_main(argv):
    """`python train.py bench-nanogpt`: the nanoGPT recipe first (its wall time sets our budget unless
    --minutes is given), then our speedrun preset in the same process with the same thread count, then one
    table row with both validation bpbs. Our time includes BPE training on a fresh cache."""
    p = tk.OneLineParser(prog="train.py bench-nanogpt", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Side-by-side CPU speedrun: nanoGPT's char-level Shakespeare recipe (re-implemented "
                            "here) vs our 'speedrun' preset, same text, same validation split (last 10%), bpb "
                            "from a full pass over it.")
    p.add_argument("--data", default="tinyshakespeare",
                   help="text file, or 'tinyshakespeare' (downloaded once into --data-dir; the recipe's text)")
    p.add_argument("--data-dir", default="data_cache", help="download cache for --data tinyshakespeare")
    p.add_argument("--mirror", default=None, help="base URL replacing the public server in the download")
    p.add_argument("--iters", type=int, default=2000, help="nanoGPT iterations (the recipe: 2000)")
    p.add_argument("--minutes", type=float, default=None,
                   help="our wall-clock budget (default: the time nanoGPT just took, so both get the same)")
    p.add_argument("--skip-nanogpt", action="store_true", help="only run ours (with --minutes)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for BOTH runs (0: auto, see "
                                                           "train.py --help)")
    a = p.parse_args(argv)
    if a.iters < 1 or a.threads < 0 or (a.minutes is not None and a.minutes <= 0):
        p.error("need --iters >= 1, --threads >= 0 and --minutes > 0")
    # both runs read the same local file; ours gets it as a plain text file, split at the same 90% mark
    if a.data == "tinyshakespeare":
        a.data = str(fetch_dataset("tinyshakespeare", a.data_dir, mirror=a.mirror)["text"])
    if not Path(a.data).is_file():
        p.error(f"--data {a.data} not found")
    threads = set_cpu_threads(a.threads)
    print(f"{tk.machine_label()}; {threads} torch thread(s) for both runs")
    peer = None
    if not a.skip_nanogpt:
        peer = bench_nanogpt(a.data, a.iters)
        print(f"nanoGPT recipe: {peer['seconds']:.1f}s, val bpb {peer['val']['bpb']:.4f} "
              f"(loss {peer['val']['loss']:.4f} nats/char)")
    minutes = a.minutes or (peer["seconds"] / 60 if peer else 2.75)
    import tempfile
    # a fresh cache, so our time includes training the tokenizer and encoding the text (nanoGPT's char
    # vocabulary costs nothing to build); the run folder goes with it
    with tempfile.TemporaryDirectory() as tmp:
        args = get_parser().parse_args(["speedrun", "--data", a.data, "--data-dir", tmp, "--out-dir",
                                        str(Path(tmp) / "run"), "--max-minutes", str(minutes), "--no-plot",
                                        "--threads", str(threads)])
        t0 = time.time()
        ours = train(config_from_args(args), t_start=t0)
        ours_seconds = time.time() - t0
    print(f"ours (speedrun preset): {ours_seconds:.1f}s incl. BPE training, val bpb {ours['val']['bpb']:.4f}")
    if peer:
        print(f"| train | CPU speedrun, val bpb (last 10%) | python train.py bench-nanogpt | tinyshakespeare |"
              f" {ours['val']['bpb']:.3f} bpb in {ours_seconds:.0f}s | {peer['val']['bpb']:.3f} bpb in "
              f"{peer['seconds']:.0f}s | {peer['val']['bpb'] / ours['val']['bpb']:.2f}x lower bpb |"
              f" {tk.machine_label()} |")


# ---- Sweeps: the batch-size sweep and the ablation table -------------------------------------------
# Both train the demo model many times with one thing changed, at equal tokens, and are resumable at the
# level of one run: each run's result is written atomically to <folder>/results/<name>.json and a rerun
# skips every result already there (an interrupted sweep loses at most the run in progress).


def sweep_config(steps: int, **overrides) -> TrainConfig:
    """The demo preset for a sweep run: a fixed step count (equal tokens), no time budget, no samples or
    plots, a short warm-up (a tenth of the run) and a fixed final evaluation (the first 16K val tokens)."""
    values = dict(PRESETS["demo"], preset="demo", max_minutes=None, max_steps=steps, warmup_iters=max(steps // 10, 1),
                  num_samples=0, plot=False, eval_interval=10 ** 9, ckpt_interval=10 ** 9, log_interval=10 ** 9,
                  final_eval_tokens=16_384, eval_tokens=16_384, overwrite=True)
    # the caller's overrides last (tests shrink the model; the CLI passes --data-dir and --threads, checked
    # here with the rest, before any work; each run's train() sets the thread count)
    values.update(overrides)
    cfg = TrainConfig(**values)
    validate_config(cfg)
    return cfg


def _sweep_run(folder: Path, name: str, cfg: TrainConfig, data: "PreparedData", log: Callable) -> dict:
    """One run of a sweep, or its stored result if an earlier invocation finished it."""
    path = folder / "results" / f"{name}.json"
    # the result file is the unit of resumption: written atomically at the end of the run, so it is either
    # complete or absent; a run cut short is simply trained again (its folder is overwritten)
    if path.exists():
        log(f"{name}: done earlier ({path})")
        return json.loads(path.read_text())
    cfg = dataclasses.replace(cfg, out_dir=str(folder / "runs" / name), resume=False, overwrite=True)
    t0 = time.time()
    s = train(cfg, data, log=lambda *a, **k: None)
    res = dict(name=name, val_bpb=s["val"]["bpb"], val_loss=s["val"]["loss"], steps=s["steps"], tokens=s["tokens"],
               seconds=time.time() - t0, tokens_per_step=s["tokens"] // max(s["steps"], 1), losses=s["losses"],
               seed=cfg.seed, optimizer=cfg.optimizer, schedule=cfg.schedule, model_kw=cfg.model_kw)
    # the run's last noise-scale estimate (the EMA over the whole run), when it measured one
    rows = [json.loads(l) for l in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    noise = [r["noise_scale_tokens"] for r in rows if "noise_scale_tokens" in r]
    res["noise_scale_tokens"] = noise[-1] if noise else None
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, res)
    log(f"{name}: val bpb {res['val_bpb']:.4f} in {res['seconds']:.0f}s")
    return res


def _smoothed(losses: list, tokens_per_step: int, tau_tokens: float) -> list:
    """The training loss after every step, smoothed by an EMA with a time constant of `tau_tokens` tokens (the
    same horizon in tokens for every batch size)."""
    beta = math.exp(-tokens_per_step / tau_tokens)  # the weight of the past after one step of tokens_per_step
    return list(itertools.accumulate(losses, lambda ema, x: beta * ema + (1 - beta) * x))  # starts at losses[0]


def steps_to_target(losses: list, tokens_per_step: int, target: float, tau_tokens: float) -> int | None:
    """The first step at which the smoothed training loss is at or below `target`; None if never."""
    return next((i for i, e in enumerate(_smoothed(losses, tokens_per_step, tau_tokens), 1) if e <= target), None)


def batch_size_sweep(batch_sizes: list, tokens: int, folder, seed: int = 1337, data=None, log: Callable = print,
                     **overrides) -> dict:
    """Train at each batch size (sequences) for the same number of tokens; report, per batch size, the val
    bpb at equal tokens, the steps (and tokens) to reach a common training-loss target, and B_simple.

    Each run accumulates 2 half batches (same gradient as one batch) so --noise-scale measures B_simple on
    the way. The target is the worst run's final smoothed loss, so every run reaches it. McCandlish et al.
    fit S = S_min (1 + B_crit / B) (steps to a target vs batch size; their eq. 2.11): a straight line in
    1 / B whose slope / intercept is B_crit, the batch where a run needs twice the minimal steps -- beyond
    it, a larger batch stops paying (more tokens for few saved steps). The learning rate is NOT re-tuned
    per batch size (the paper's fit assumes tuned rates), which pulls the measured B_crit down."""
    folder = Path(folder)
    # a constant rate after warm-up: with a decaying schedule, "steps to a target" would mostly measure
    # where each run's decay happens to start, not what its batch size buys
    base = sweep_config(1, seed=seed, schedule="constant", noise_scale=True, grad_accum=2, **overrides)
    data = data or prepare_data(base, log=log)  # once: every run reads the same token files
    results = []
    for b in batch_sizes:
        # equal tokens: a batch twice as large gets half the steps
        steps = max(tokens // (b * base.context_length), 1)
        cfg = dataclasses.replace(base, batch_size=b // 2, max_steps=steps, warmup_iters=max(steps // 10, 1))
        validate_config(cfg)
        results.append(_sweep_run(folder, f"batch{b}_seed{seed}", cfg, data, log))
    # a common target and the steps each batch size needs to reach it. The per-step training loss is noisy
    # (more so at small batches), so it is smoothed over a fixed horizon in TOKENS (a twentieth of the run):
    # the same amount of data in every run's average, whatever its batch size
    tau = tokens / 20
    target = max(_smoothed(r["losses"], r["tokens_per_step"], tau)[-1] for r in results)  # worst final level
    rows = []
    for b, r in zip(batch_sizes, results):
        s = steps_to_target(r["losses"], r["tokens_per_step"], target, tau)
        rows.append(dict(batch=b, tokens_per_step=r["tokens_per_step"], steps=r["steps"], val_bpb=r["val_bpb"],
                         steps_to_target=s, tokens_to_target=s * r["tokens_per_step"] if s else None,
                         noise_scale_tokens=r["noise_scale_tokens"]))
    # least squares of S on 1/B: S = S_min + (S_min B_crit) / B
    # (runs that never reached the target carry no information about S(B) and are left out of the fit; at
    # least two points are needed for a line, and a negative slope means noise won, so no B_crit then)
    pts = [(1 / r["tokens_per_step"], r["steps_to_target"]) for r in rows if r["steps_to_target"]]
    b_crit = None
    if len(pts) >= 2:
        xs, ys = np.array(pts).T
        slope, intercept = np.polyfit(xs, ys, 1)
        b_crit = float(slope / intercept) if intercept > 0 and slope > 0 else None
    return dict(rows=rows, target_loss=target, b_crit_tokens=b_crit, tokens=tokens)


def _num(x) -> str:
    """A table cell: a count with thousands separators, or '-' for none / not a number."""
    return f"{x:,.0f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def batch_size_table(rep: dict) -> str:
    """The sweep as a markdown table, then the verdict line."""
    out = ["| batch (seq) | tokens/step | steps | val bpb at equal tokens | steps to target | tokens to target "
           "| B_simple (tokens) |", "|---|---|---|---|---|---|---|"]
    prev = None
    for r in rep["rows"]:
        s = r["steps_to_target"]
        out.append(f"| {r['batch']} | {r['tokens_per_step']:,} | {r['steps']} | {r['val_bpb']:.4f} | "
                   f"{s if s else '-'}" + (f" ({prev / s:.2f}x fewer)" if prev and s else "")
                   + f" | {_num(r['tokens_to_target'])} | {_num(r['noise_scale_tokens'])} |")
        prev = s
    bc = rep["b_crit_tokens"]
    out += ["", f"Target: smoothed training loss {rep['target_loss']:.4f} nats/token (the worst run's final level). "
               + (f"Fit S = S_min (1 + B_crit / B): B_crit ~ {bc:,.0f} tokens/step. Beyond it larger batches stop "
                  f"paying: each doubling of the tokens per step saves at most 1.33x in steps." if bc else
                  "The fit found no positive B_crit (steps to target did not fall with the batch size).")]
    return "\n".join(out)


def ablation_variants(quick: bool = False) -> list:
    """(name, what changes, TrainConfig overrides) for `train.py ablate`: the demo model (RMSNorm pre-norm,
    RoPE, SwiGLU, softmax MHA, untied, Muon + AdamW, cosine) with one switch changed at a time. Mixers
    model.py does not have are left out (detected from ModelConfig's fields)."""
    fields = {f.name for f in dataclasses.fields(M.ModelConfig)}
    mk = lambda **kw: dict(model_kw=kw)
    v = [("baseline", "demo model as is", {}),
         ("layernorm", "norm: LayerNorm", mk(norm="layernorm")),
         ("post-norm", "norm position: post", mk(norm_position="post")),
         ("nope", "position: none (NoPE)", mk(position="nope")),
         ("learned-pos", "position: learned absolute", mk(position="learned")),
         ("gelu", "FFN: GELU MLP (4d)", mk(ffn="gelu")),
         ("relu", "FFN: ReLU MLP (4d)", mk(ffn="relu")),
         ("moe4", "FFN: MoE 4 experts, top-2", mk(num_experts=4, experts_top_k=2)),
         ("gqa2", "GQA: 2 KV heads of 4", mk(num_kv_heads=2)),
         ("mqa", "MQA: 1 KV head", mk(num_kv_heads=1)),
         ("sliding32", "sliding window 32", mk(attention="sliding", window_size=32)),
         ("tied", "tied embeddings", mk(tie_embeddings=True)),
         ("qk-norm", "QK-norm", mk(qk_norm=True))]
    if "mixer" in fields:  # model.py's other sequence mixers (Hyena carries its own position signal)
        v += [("mla", "mixer: MLA", mk(mixer="mla")), ("linear-attn", "mixer: linear attention", mk(mixer="linear")),
              ("hyena", "mixer: Hyena (no RoPE)", mk(mixer="hyena", position="nope"))]
    v += [("adamw", "optimizer: AdamW only", dict(optimizer="adamw")),
          ("soap", "optimizer: SOAP + AdamW", dict(optimizer="soap")),
          ("wsd", "schedule: WSD", dict(schedule="wsd"))]
    if quick:  # one switch from each family: norm, position, FFN, optimizer, schedule
        keep = ("baseline", "layernorm", "nope", "gelu", "adamw", "wsd")
        v = [x for x in v if x[0] in keep]
    return v


def ablate(folder, steps: int, seeds: list, quick: bool = False, data=None, log: Callable = print,
           **overrides) -> list:
    """Train every variant at every seed for `steps` steps (equal tokens); returns one row per variant with
    the per-seed val bpb. Variants whose switches model.py refuses are reported and skipped."""
    folder = Path(folder)
    base = sweep_config(steps, **overrides)
    data = data or prepare_data(base, log=log)  # the same corpus, tokenizer and token files for every run
    rows, variants = [], ablation_variants(quick)
    for i, (name, what, ov) in enumerate(variants):
        # the variant's model switches go on top of the base's (a caller's model_kw stays in force)
        ov = dict(ov)
        ov["model_kw"] = {**base.model_kw, **ov.get("model_kw", {})}
        cfg = dataclasses.replace(base, **ov)
        try:  # a switch model.py refuses for this model is a skipped row with the reason, not a crash
            validate_config(cfg)
        except ValueError as e:
            log(f"[{i + 1}/{len(variants)}] {name}: skipped ({e})")
            continue
        # the seed changes both the initialization and the batch stream; the data and tokenizer stay fixed
        res = [_sweep_run(folder, f"{name}_seed{s}", dataclasses.replace(cfg, seed=s), data,
                          lambda m: log(f"[{i + 1}/{len(variants)}] {m}")) for s in seeds]
        rows.append(dict(name=name, what=what, bpb=[r["val_bpb"] for r in res], seconds=[r["seconds"] for r in res]))
    return rows


def ablation_table(rows: list, steps: int, tokens_per_step: int, eval_tokens: int = 16_384) -> str:
    """Markdown: val bpb mean, seed spread (max - min), the change vs the baseline and whether it exceeds
    the spread (an honest 'no clear difference' otherwise)."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    b0 = float(np.mean(base["bpb"])) if base else None
    spread0 = (max(base["bpb"]) - min(base["bpb"])) if base else 0.0
    out = [f"| variant | change | val bpb (mean of {len(rows[0]['bpb']) if rows else 0} seeds) | seed spread | "
           f"vs baseline | s/run |", "|---|---|---|---|---|---|"]
    # best first; a difference smaller than the seed-to-seed spread (of this variant or of the baseline) is
    # marked as such: with 2 seeds and short runs, that is most of the small effects the field argues about
    for r in sorted(rows, key=lambda r: np.mean(r["bpb"])):
        m, spread = float(np.mean(r["bpb"])), max(r["bpb"]) - min(r["bpb"])
        d = "" if b0 is None or r is base else f"{100 * (m / b0 - 1):+.1f}%"
        if d and abs(m - b0) <= max(spread, spread0):
            d += " (within spread)"
        out.append(f"| {r['name']} | {r['what']} | {m:.4f} | {spread:.4f} | {d or '-'} | {np.mean(r['seconds']):.0f} |")
    out.append(f"\n{steps} steps x {tokens_per_step:,} tokens per variant and seed (equal tokens); synthetic "
               f"stories; val bpb on the first {eval_tokens:,} validation tokens.")
    return "\n".join(out)


def plot_ablation(rows: list, png_path: Path):
    """Horizontal bars of mean val bpb per variant with the seed range as error bars."""
    from matplotlib.figure import Figure
    rows = sorted(rows, key=lambda r: np.mean(r["bpb"]))
    means = [np.mean(r["bpb"]) for r in rows]
    err = [[m - min(r["bpb"]) for m, r in zip(means, rows)], [max(r["bpb"]) - m for m, r in zip(means, rows)]]
    # one bar per variant, best at the top; the baseline in another colour so the eye finds the reference
    fig = Figure(figsize=(7, 0.35 * len(rows) + 1.2))
    ax = fig.subplots()
    ax.barh([r["name"] for r in rows], means, xerr=err, color=["C1" if r["name"] == "baseline" else "C0" for r in rows])
    ax.set_xlim(min(means) * 0.97, max(means) * 1.02)
    ax.set_xlabel("val bits per byte (lower is better; bars: seed range)")
    ax.invert_yaxis()
    _save_png(fig, png_path)

# ===== Command line =====


def _json_object(text: str) -> dict:
    """argparse type of --model-kw: a JSON object, or a one-line usage error naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object like '{{\"qk_norm\": true}}', got {text!r}")
    return value


def get_parser() -> argparse.ArgumentParser:
    """The training command's parser: a preset name, then any TrainConfig field as --flag (default None,
    meaning 'keep the preset's value'). ddp.py builds on this same parser."""
    p = tk.OneLineParser(
        prog="train.py",
        description="Train a ScratchLM model: data -> BPE tokenizer -> token files -> training -> eval -> samples. "
                    "Other commands: 'python train.py sample --help', 'python train.py bench-nanogpt --help', "
                    "'python train.py batch-size --help', 'python train.py ablate --help'.")
    p.add_argument("preset", nargs="?", default=None,
                   help=f"one-word preset: {', '.join(PRESETS)} (default: demo, synthetic stories in a few CPU "
                        f"minutes; with --data tinystories or --data owt and no preset, that data set's preset)")
    # one flag per TrainConfig field (name, type, help line from its docstring), default None: "keep the preset's"
    p.add_config(TrainConfig, skip=("preset",), types={"model_kw": _json_object}, given_only=True,
                 note=" (demo default: {default})", defaults={k: v for k, v in PRESETS["demo"].items()})
    return p


def config_from_args(args) -> TrainConfig:
    """Preset values, then every flag the user gave. Validates names and ranges (clear errors)."""
    preset = getattr(args, "preset", None)
    # a preset first, then only the flags the user gave on top of it
    if not preset:  # `python train.py --data owt` means the owt preset (its 32K vocab, its model), not the demo's
        data = getattr(args, "data", None)
        preset = data if data in DATASETS and data in PRESETS else "demo"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    # flags default to None in the parser, so "not given" and "given the preset's value" are told apart
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if f.name != "preset" and v is not None:
            values[f.name] = v
    if values.get("bpe_train_bytes") == 0:  # "0: all of it" on the command line is None in the config
        values["bpe_train_bytes"] = None
    cfg = TrainConfig(**values)
    if cfg.out_dir is None:
        cfg.out_dir = str(Path("runs") / preset)
    validate_config(cfg)
    return cfg


def sample_main(argv):
    """`python train.py sample`: model.py's sampling (sample_from_checkpoint) with this command's defaults.
    `python model.py generate` is the same thing with more options (GPT-2 weights, prompt ids)."""
    p = tk.OneLineParser(prog="train.py sample", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Generate text from a checkpoint written by train.py.")
    p.add_argument("--checkpoint", required=True, help="path to ckpt.pt (its tokenizer/ folder sits next to it)")
    p.add_argument("--prompt", default="", help="text to continue ('' starts a new document); a prompt longer "
                                                "than the context is cut from the left, with a note")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (>= 0; 0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    a = p.parse_args(argv)
    # every option checked before the checkpoint is read, by `model.py generate`'s rules (one line naming it)
    problem = M._check_args(argparse.Namespace(command="generate", **vars(a)))
    if problem:
        p.error(problem)
    note = lambda msg: print(f"note: {msg}", file=sys.stderr)
    # loading, the tokenizer lookup and its fingerprint check, fitting the prompt and sampling: model.py's
    res = M.sample_from_checkpoint(a.checkpoint, a.prompt, num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                                   temperature=a.temperature, top_p=a.top_p, seed=a.seed, device=a.device, note=note)
    for i, text in enumerate(res["texts"]):
        print(f"--- sample {i + 1} ---\n{text}")


def _ints(text: str) -> list:
    """argparse type: a comma-separated list of positive integers, e.g. '4,8,16' (model.py's check)."""
    if not M._ints(text, 1):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text!r}")
    return [int(x) for x in text.split(",") if x.strip()]


def _sweep_parser(prog: str, description: str, out_dir: str) -> tk.OneLineParser:
    """The options both sweeps share."""
    p = tk.OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", default=out_dir, help="folder for results/, runs/ and the table (rerun: resumes)")
    p.add_argument("--data-dir", default="data_cache", help="cache for the synthetic corpus and its tokenizer")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: auto)")
    return p


def batch_size_main(argv):
    """`python train.py batch-size`: the batch-size sweep at fixed tokens (see batch_size_sweep)."""
    p = _sweep_parser("train.py batch-size", "Sweep the batch size at a fixed token count on the demo model: val bpb "
                      "at equal tokens, steps to a common loss target, the measured noise scale B_simple, and the "
                      "fitted critical batch size where larger batches stop paying.", "runs/batch-size")
    p.add_argument("--batches", type=_ints, default=[4, 8, 16, 32, 64], help="batch sizes in sequences (even)")
    p.add_argument("--tokens", type=int, default=262_144, help="training tokens per run (the same for every batch)")
    p.add_argument("--seed", type=int, default=1337, help="seed of every run")
    a = p.parse_args(argv)
    # every option checked before any work: one line, exit 2
    T_ctx = PRESETS["demo"]["context_length"]
    # odd batches cannot be split into the two equal micro-batches the noise-scale estimate needs
    if any(b % 2 for b in a.batches):
        p.error(f"--batches must be even (each run accumulates two half batches), got {a.batches}")
    if a.tokens < max(a.batches) * T_ctx:
        p.error(f"--tokens must be >= the largest batch ({max(a.batches) * T_ctx:,} tokens)")
    rep = batch_size_sweep(sorted(a.batches), a.tokens, a.out_dir, seed=a.seed, data_dir=a.data_dir, threads=a.threads)
    table = batch_size_table(rep)
    atomic_write_text(Path(a.out_dir) / "batch_size.md", table + "\n")
    print(table)


def ablate_main(argv):
    """`python train.py ablate`: the ablation table (see ablate)."""
    p = _sweep_parser("train.py ablate", "Train the demo model with one switch changed at a time (equal tokens, "
                      "several seeds) and tabulate val bpb per variant with its seed spread.", "runs/ablate")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 80; --quick: 40)")
    p.add_argument("--seeds", type=_ints, default=[1, 2], help="seeds (at least 2, for the spread)")
    p.add_argument("--quick", action="store_true", help="a short subset: 6 variants, 40 steps")
    a = p.parse_args(argv)
    # default: 19 variants x 2 seeds x 80 steps of 2,048 tokens: measured 12 min 40 s with 1 thread on a
    # shared 2-core CPU (14-36 s per run including setup and a 16K-token evaluation), inside 30 minutes
    steps = a.steps or (40 if a.quick else 80)
    if steps < 10 or len(set(a.seeds)) < 2:
        p.error(f"need --steps >= 10 (got {steps}) and at least 2 distinct --seeds (got {a.seeds})")
    out = Path(a.out_dir)
    rows = ablate(out, steps, a.seeds, quick=a.quick, data_dir=a.data_dir, threads=a.threads, log=print)
    base = sweep_config(steps)
    table = ablation_table(rows, steps, base.batch_size * base.context_length)
    atomic_write_text(out / "ablation.md", table + "\n")
    plot_ablation(rows, out / "ablation.png")
    print(table)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")


def main(argv=None):
    """`python train.py [preset] [--flags]`, `python train.py sample ...`, `python train.py bench-nanogpt ...`.

    Exit status: 0 done; 2 a usage error or bad input (one line on stderr); 1 a failure of the machine (e.g.
    a full disk; one line); 130 interrupted (Ctrl-C; the run saved a checkpoint unless it was pressed twice).
    A traceback means a bug in the project."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"sample": sample_main, "bench-nanogpt": bench_main, "bench": bench_main,
                "batch-size": batch_size_main, "ablate": ablate_main}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        train(config_from_args(get_parser().parse_args(argv)))
    # bad input of any kind (options, data, checkpoints, the network): one line naming it, status 2
    except (ValueError, FileNotFoundError, PermissionError, FloatingPointError, ConnectionError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # e.g. a full disk: not a usage error, but still one clear line
        print(f"train.py: error: {e.strerror if e.filename is None and e.strerror else e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume (the last checkpoint is intact)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
