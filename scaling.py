"""
scaling.py -- Stage 6 of ScratchLM: predict the big run from small ones, then check the prediction.

The story
---------
Training a large model is a one-shot bet: a run that costs C FLOPs cannot be repeated with a different shape.
So before the big run the field trains many small ones and fits a SCALING LAW: how the final loss depends on
the number of parameters N and the number of training tokens D. Training costs about

    C ~= 6 N D          (forward 2 FLOPs per parameter per token, backward 4; attention adds a little)

so for a fixed budget C the question is a trade: a bigger model seeing fewer tokens, or a smaller model
seeing more. The answer moved, and why it moved is the lesson of this stage.

* Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv 2001.08361), fitted
  L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D and concluded N_opt ~ C^0.73: spend most of a
  bigger budget on a bigger model, train it on relatively few tokens (GPT-3: 175B parameters, 300B tokens).
* Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models" -- "Chinchilla" (arXiv
  2203.15556) -- found N_opt ~ C^0.5 and D_opt ~ C^0.5: parameters and tokens grow together, about 20
  tokens per parameter. Their 70B model on 1.4T tokens beat the 280B Gopher at the same compute.
  Why the answer moved: Kaplan's runs used ONE learning-rate schedule length for every run, so a run
  stopped early was measured mid-cosine, not at the end of its own schedule -- this penalizes small-D runs
  and favours big models; Kaplan counted non-embedding parameters and fitted mostly small models, where
  embeddings are a large share (Pearce & Song 2024, arXiv 2406.12907, and Porian et al. 2024, arXiv
  2406.19146, reconcile the two this way).
  Chinchilla gives three methods; this file implements two of them:
    approach 2, IsoFLOPs: at each of several budgets train models of several sizes; the loss-minimizing
      size at each budget, fitted as N_opt = k C^a (`fit_isoflops`);
    approach 3, a parametric law  L(N, D) = E + A / N^alpha + B / D^beta  fitted to all runs, from which
      the optimum follows in closed form (`fit_parametric_law`, `compute_optimal_allocation`).
* Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (Epoch AI, arXiv 2404.10102)
  refitted approach 3 from the paper's own figure and found the published parameters did not fit the
  data (and implied implausibly tight intervals): the optimizer had stopped early. With a proper fit
  (Huber loss on log-loss, L-BFGS from a grid of starts, float64) approach 3 agrees with approaches 1-2.
  This file follows their recipe, and bootstraps the runs for intervals.
* Sardana & Frankle 2024, "Beyond Chinchilla-Optimal: Accounting for Inference in Language Model Scaling
  Laws" (arXiv 2401.00448): Chinchilla minimizes TRAINING compute. A model served for trillions of tokens
  should be smaller and trained longer (Llama 3 8B: 15T tokens, ~1,900 tokens per parameter): the
  parametric law answers that question too (`compute_optimal_allocation` gives the training optimum; any
  (N, D) on the law can be priced with inference added).
* Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter
  Transfer" -- muP (arXiv 2203.03466): under the standard parametrization the best learning rate shrinks
  as the model widens, so a law fitted with one lr per size mixes in lr mistuning. muP scales the
  initialization and per-layer learning rates with width so the best lr stays put: tune small, transfer.
  train.py implements it (`--mup-base-width`); `python scaling.py lr-transfer` tests the claim.
* Hu et al. 2024, "MiniCPM: Unveiling the Potential of Small Language Models with Scalable Training
  Strategies" (arXiv 2404.06395): with a Warmup-Stable-Decay schedule, ONE long run per model size gives
  the loss at many token counts -- branch a short decay off the stable phase at each count -- instead of
  one run per (N, D). The `--mode branched` sweep does exactly that and reports the compute saved.

What this file does, in order
-----------------------------
The core: compute accounting (model shapes from one dial, `depth`, nanochat's idea; C = 6ND next to model.py's
exact count), IsoFLOPs fits with bootstrap intervals, the parametric fit over the whole grid of starts (readable
L-BFGS, then the batched fast path) and its closed-form optimum, and the sweep: plan small runs, train them
through train.py, fit, then train the predicted optimum at a larger budget. The menus: one-run data points
(branched WSD), a known irreducible loss, muP learning-rate transfer.

What it costs: a fit is seconds on one core (4,500 starts on 250 runs: ~4 CPU s). The default sweep (`python
scaling.py`) trains 23 models of 20K-760K parameters at 5 budgets plus one verification run: ~12 minutes of one
CPU core. Its law is one of THIS corpus and THESE tiny models, but the method is the one used at scale: predict,
then check.

Reading the numbers
-------------------
* An IsoFLOPs exponent a (N_opt ~ C^a) near 0.5 is Chinchilla's answer; near 0.73, Kaplan's. Its interval
  comes from resampling the runs: with 5 budgets over 1.2 decades it is still wide, and it should be.
* The parametric fit's E is the loss no model reaches: on the synthetic corpus it is known (the corpus'
  entropy), a check real data never offers. The default sweep's free fit fails it (E far below the entropy),
  so the sweep also fits the law with E held there (`fit_parametric_law(..., E=...)`) and reports both.
* Extrapolation is the point and the danger: a power law fitted over one decade of compute says nothing
  certain four decades away. `--verify` measures how far one factor of 4 already is.

Limits, stated plainly
----------------------
* CPU-sized sweeps use models of 20K-500K parameters, where the embeddings are a large share of N and 6ND
  is off by up to ~35% (`python scaling.py shapes`): the law fits, with the constants of tiny models.
* One learning rate for every size (train.py's defaults) means bigger models are slightly mistuned under
  the standard parametrization -- the very bias muP addresses, measured by `lr-transfer`.
* Each (N, D) point is one seed; seed-to-seed noise is part of the residuals the Huber loss absorbs.
* At these sizes one model's loss does not fall as a power law in D: it sits on plateaus and drops (depth 3 at
  6e11 -> 1.2e12 FLOPs gains 2%, depth 4 gains 32%), so an IsoFLOPs curve zigzags by ~10% between neighbouring
  sizes. No five-parameter law fits that closely, which bounds how well `--verify` can come out (README).

Imports: tokenizer.py, model.py and train.py from this project (stages to the left).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import tokenizer as tk
import model as M
import train as T


def say(msg: str):
    """The default `log`: a line on stdout, flushed at once (progress reaches a log file as it happens)."""
    print(msg, flush=True)


# ---- 1. compute: C = 6 N D, and one dial for the model's shape ----


def shape_for_depth(depth: int, width_per_depth: int = 16, head_dim: int = 16) -> dict:
    """The whole architecture from one integer (nanochat's "depth" dial): num_layers = depth,
    d_model = width_per_depth * depth (the aspect ratio d/L stays fixed, as in Kaplan et al.'s finding
    that shape matters little at fixed N), heads of a fixed size head_dim (so muP's attention scaling
    question does not arise), d_ff = 8/3 d_model rounded to a multiple of 16 (SwiGLU keeps the 8 d^2
    parameters of a 4d two-matrix MLP). A sweep then varies ONE number, and N grows ~ 12 d^2 L ~ depth^3."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    # (B, T, d) activations with d = 16 * depth: depth 1 is a 16-wide, 1-layer model (~20K parameters with a
    # 512-token vocabulary), depth 8 is 128 wide and 8 deep (~1.7M)
    d = width_per_depth * depth
    if d % head_dim:
        raise ValueError(f"d_model {d} (= {width_per_depth} x depth {depth}) is not a multiple of head_dim {head_dim}")
    # parameters per layer ~ 4 d^2 (attention) + 3 d d_ff (SwiGLU) = 12 d^2; with d = 16 depth and L = depth
    # layers the non-embedding count is ~ 3,100 depth^3, and the 2 V d embedding/head ~ 16K depth (V = 512)
    return dict(d_model=d, num_layers=depth, num_heads=d // head_dim, d_ff=max(16, 16 * round(8 * d / 3 / 16)))


def model_config_for_depth(depth: int, vocab_size: int, context_length: int, **shape_kw) -> M.ModelConfig:
    return M.ModelConfig(vocab_size=vocab_size, context_length=context_length, **shape_for_depth(depth, **shape_kw))


def compute_accounting(cfg: M.ModelConfig) -> dict:
    """N (all parameters, Chinchilla's convention), N without the embedding/head matrices (Kaplan's), and
    the training FLOPs per token two ways: 6N, and model.py's exact count (every matmul at 2mnp, attention
    scores at the causal average of (T+1)/2 keys, the LM head; the embedding lookup is free, so the exact
    count can be BELOW 6N when the input embedding is a big share of N, as in tiny models)."""
    # both from model.py's accounting (analytic, from the config: no model is built)
    n = M.num_params(cfg)
    exact = M.flops_per_token(cfg, training=True)
    return dict(parameters=n, non_embedding=M.num_params(cfg, include_embeddings=False),
                flops_6n=6.0 * n, flops_exact=exact, exact_over_6n=exact / (6.0 * n))


def flops_per_token(cfg: M.ModelConfig, flops: str = "6nd") -> float:
    """FLOPs per training token under the chosen convention: "6nd" (C = 6 N D) or "exact" (model.py)."""
    # the convention decides D for a given C: with "exact" a tiny model (exact < 6N) trains on more tokens
    if flops == "6nd":
        return 6.0 * M.num_params(cfg)
    if flops == "exact":
        return M.flops_per_token(cfg, training=True)
    raise ValueError(f"flops convention must be '6nd' or 'exact', got {flops!r}")


# ---- 2. IsoFLOPs (Chinchilla approach 2): the best size at each budget, then a power law ----


@dataclass
class Run:
    """One training run's outcome. `budget` groups runs into IsoFLOPs curves (the nominal budget the run
    was planned for); `tokens` is D as trained. `name` says where it came from (make_run and load_runs, in the
    plumbing, build runs from raw values and files, validated)."""
    parameters: float
    tokens: float
    budget: float
    loss: float
    name: str = ""


def group_by_budget(runs: list[Run], min_budgets: int = 2, min_runs: int = 3) -> dict[float, list[Run]]:
    """{budget: runs at it}, budgets equal to 6 significant digits grouped. Fitting N_opt = k C^a needs at
    least 2 budgets (3 for an interval worth the name) and each parabola at least 3 sizes."""
    # budgets read from files are often 6e18 vs 6.000000001e18 (rounded in a spreadsheet); 6 significant
    # digits are plenty to tell budgets apart (they differ by factors, not by parts per million)
    groups: dict[float, list[Run]] = {}
    for r in runs:
        key = float(f"{r.budget:.6g}")
        groups.setdefault(key, []).append(r)
    if len(groups) < min_budgets:
        raise ValueError(f"IsoFLOPs needs runs at >= {min_budgets} compute budgets, got {len(groups)}: "
                         f"{sorted(groups)}")
    for c, rs in groups.items():
        if len({r.parameters for r in rs}) < min_runs:
            raise ValueError(f"budget {c:.3g} has runs at {len({r.parameters for r in rs})} model sizes; each budget "
                             f"needs >= {min_runs} ({', '.join(r.name for r in rs)})")
    return dict(sorted(groups.items()))


def budget_optimum(n: np.ndarray, loss: np.ndarray, method: str) -> float:
    """The loss-minimizing N on one IsoFLOPs curve.
    argmin:   the best run's N (robust, but quantized to the sizes that were trained).
    parabola: fit loss = a x^2 + b x + c in x = ln N and take the vertex x* = -b / (2a) (Chinchilla's
              method; interpolates between sizes). a <= 0 means the curve has no minimum (all runs on one
              side of it): an error, since the vertex would be a maximum."""
    # (the two agree on a symmetric curve sampled at its minimum; they differ by up to half the spacing
    # between sizes otherwise -- a factor 1.4 with sizes spaced 2x)
    if method == "argmin":
        return float(n[int(np.argmin(loss))])
    if method != "parabola":
        raise ValueError(f"method must be 'argmin' or 'parabola', got {method!r}")
    # least squares through every run of the curve (3 points: exact interpolation; more: a smoothed vertex)
    a, b, _ = np.polyfit(np.log(n), loss, 2)
    if a <= 0:
        raise ValueError("the loss is not convex in ln N on this curve (no minimum inside the sizes trained)")
    return float(math.exp(-b / (2 * a)))


def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """y = k x^a by least squares in log-log space: ln y = ln k + a ln x. Returns (k, a)."""
    # unweighted: every budget counts the same, as in Hoffmann et al.'s Figure 3 fits
    a, lnk = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(lnk)), float(a)


@dataclass
class IsoFlopsFit:
    """N_opt = k C^a, D_opt = C / (6 N_opt). `optima` holds the per-budget (C, N*) the law was fitted to;
    `boot` the (k, a) of each bootstrap refit (runs resampled within each budget)."""
    method: str
    k: float
    a: float
    optima: list
    boot: np.ndarray

    # D_opt follows from N_opt through C = 6ND, so only N's law is fitted: fitting D's law separately would
    # let the two predictions disagree with the budget they share
    def predict(self, C):
        """(N_opt, D_opt) at compute C (scalars or arrays)."""
        n = self.k * np.asarray(C, dtype=np.float64) ** self.a
        return n, np.asarray(C, dtype=np.float64) / (6.0 * n)

    def interval(self, C, level: float = 0.95):
        """((N_lo, N_hi), (D_lo, D_hi)) percentile bootstrap interval at compute C."""
        # percentiles of the bootstrap refits' predictions AT C: the band widens away from the data, as it
        # should, because an error in the exponent multiplies with ln C
        n = self.boot[:, 0] * float(C) ** self.boot[:, 1]
        q = [50 * (1 - level), 50 * (1 + level)]
        lo, hi = np.percentile(n, q)
        return (lo, hi), (C / (6 * hi), C / (6 * lo))


def fit_isoflops(runs: list[Run], method: str = "parabola", n_bootstrap: int = 200, seed: int = 0) -> IsoFlopsFit:
    """Chinchilla approach 2. For each budget, the optimum N* (`budget_optimum`), then N_opt = k C^a through
    the (C, N*) points. Intervals: resample the runs of each budget with replacement and refit everything
    (a resample with fewer than 3 distinct sizes, or a parabola without a minimum, is drawn again)."""
    groups = group_by_budget(runs)
    cs = np.array(list(groups))

    def optima(g):
        out = []
        for c, rs in g.items():
            n = np.array([r.parameters for r in rs])
            try:
                out.append(budget_optimum(n, np.array([r.loss for r in rs]), method))
            except ValueError as e:
                raise ValueError(f"budget {c:.3g} ({len(rs)} runs): {e}") from None
        return np.array(out)

    # the point estimate from all runs, then the bootstrap: resampling WITHIN each budget keeps every
    # budget in every replicate (resampling budgets themselves would often leave fewer than 2)
    n_star = optima(groups)
    k, a = fit_power_law(cs, n_star)
    rng = np.random.default_rng(seed)
    boot, tries = [], 0
    while len(boot) < n_bootstrap and tries < 20 * n_bootstrap:
        tries += 1
        g = {c: [rs[i] for i in rng.integers(0, len(rs), len(rs))] for c, rs in groups.items()}
        if any(len({r.parameters for r in rs}) < 3 for rs in g.values()):
            continue
        try:
            boot.append(fit_power_law(cs, optima(g)))
        except ValueError:
            continue
    return IsoFlopsFit(method=method, k=k, a=a, optima=list(zip(cs.tolist(), n_star.tolist())),
                       boot=np.array(boot).reshape(-1, 2))


# ---- 3. the parametric law (Chinchilla approach 3, as Epoch AI's replication fits it) ----
# L(N, D) = E + A / N^alpha + B / D^beta. Three terms: the irreducible loss E (the entropy of the text), the
# loss of a finite model trained forever, and the loss of an infinite model trained on D tokens. Fitting it
# naively (least squares on L) is badly conditioned: A and B span orders of magnitude. Hoffmann et al.
# reparametrize a = ln A, b = ln B, e = ln E and fit the LOG of the loss:
#
#     ln L_hat = LSE(a - alpha ln N,  b - beta ln D,  e)        (LSE = log-sum-exp, exact: ln(A/N^a + B/D^b + E))
#     objective = sum_i Huber_delta(ln L_hat_i - ln L_i),   delta = 1e-3
#
# The Huber loss is quadratic for |r| < delta and linear beyond, so the few outlier runs (a diverged or
# mistuned one) pull on the fit with a bounded force. The objective is non-convex, hence the grid of starts.


def _objective(theta: torch.Tensor, log_n, log_d, log_l, delta: float) -> torch.Tensor:
    """Huber objective for K parameter vectors at once. theta: (K, 5) = (a, b, e, alpha, beta); log_n,
    log_d, log_l: (n,). Returns (K,). Every row is an independent problem, so the gradient of the SUM
    w.r.t. row k is the gradient of problem k alone: one batched tensor optimizes the whole grid."""
    # stacking the three log-terms and taking logsumexp over them is the numerically safe ln(x + y + z):
    # no exp of a large number is ever formed, whatever the scale of A, B, N, D
    a, b, e, alpha, beta = theta.unbind(-1)  # each (K,)
    terms = torch.stack([a[:, None] - alpha[:, None] * log_n,  # (K, n): ln(A / N^alpha)
                         b[:, None] - beta[:, None] * log_d,  # (K, n): ln(B / D^beta)
                         e[:, None].expand(-1, log_n.shape[0])])  # (K, n): ln E
    r = torch.logsumexp(terms, dim=0) - log_l  # (K, n) residuals in log-loss
    return torch.nn.functional.huber_loss(r, torch.zeros_like(r), reduction="none", delta=delta).sum(-1)


def init_grid() -> torch.Tensor:
    """Hoffmann et al.'s grid of starting points: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
    a, b in {0, 5, ..., 25}: 5 x 5 x 5 x 6 x 6 = 4,500 starts, as a (4500, 5) float64 tensor."""
    # a = ln A in [0, 25] covers A from 1 to 7e10: the published fits (A ~ 400, Kaplan-like A ~ 1e3-1e8) and
    # CPU-scale fits (A ~ 10) all lie inside
    ranges = ((0, 30, 5), (0, 30, 5), (-1, 1.5, 0.5), (0, 2.5, 0.5), (0, 2.5, 0.5))  # a, b, e, alpha, beta
    axes = [torch.arange(*r, dtype=torch.float64) for r in ranges]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 5)


def _lbfgs(theta0: torch.Tensor, data, delta: float, max_iter: int = 200, mask=None) -> tuple[torch.Tensor, float]:
    """torch.optim.LBFGS (strong-Wolfe line search, float64) from one start; returns (theta, objective)."""
    theta = theta0.clone().reshape(1, 5).requires_grad_(True)
    # strong Wolfe line search: the Huber objective has regions of tiny curvature where a fixed step would
    # overshoot; tolerances far below float32's because the fit is float64 end to end
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = _objective(theta, *data, delta).sum()
        f.backward()
        if mask is not None:  # a held-fixed coordinate (a known E) gets no gradient, so it never moves
            theta.grad.mul_(mask)
        return f

    opt.step(closure)
    # L-BFGS may end on a worse point than it visited (a failed line search): report the objective at the
    # returned point, and treat an overflow as "no solution" so callers skip it
    with torch.no_grad():
        f = float(_objective(theta, *data, delta).sum())
    return theta.detach()[0], f if math.isfinite(f) else float("inf")


def _objective_and_grad(theta: torch.Tensor, log_n, log_d, log_l, delta: float):
    """The same objective as `_objective` for K rows, with its gradient written out (no autograd graph: the
    grid phase evaluates ~10^6 residuals per step, and autograd's temporaries would dominate). With
    p_j = exp(term_j - LSE) the softmax weights of the three terms and h'(r) = clamp(r, -delta, delta):
        d r / d a = p_1,  d r / d alpha = -p_1 ln N,  d r / d b = p_2,  d r / d beta = -p_2 ln D,  d r / d e = p_3
    Returns (f (K,), grad (K, 5)). A test checks it against autograd."""
    a, b, e, alpha, beta = (t[:, None] for t in theta.unbind(-1))  # each (K, 1)
    t1, t2 = a - alpha * log_n, b - beta * log_d  # (K, n)
    m = torch.maximum(torch.maximum(t1, t2), e)
    p1, p2, p3 = torch.exp(t1 - m), torch.exp(t2 - m), torch.exp(e - m)
    z = p1 + p2 + p3
    r = m + torch.log(z) - log_l  # (K, n) residuals
    h = torch.clamp(r, -delta, delta)  # Huber'(r)
    f = torch.where(r.abs() < delta, 0.5 * r * r, delta * (r.abs() - 0.5 * delta)).sum(-1)
    hp1, hp2 = h * p1 / z, h * p2 / z
    grad = torch.stack([hp1.sum(-1), hp2.sum(-1), (h * p3 / z).sum(-1), -(hp1 @ log_n), -(hp2 @ log_d)], -1)
    return f, grad


def _fit_from_grid(grid: torch.Tensor, data, delta: float, polish: int = 8, mask=None,
                   stages=((None, 25), (400, 100), (40, 200))):
    """Optimize from EVERY start of the grid, as one (K, 5) tensor: batched Adam steps (Adam is
    per-coordinate and each row's gradient is its own problem's, so the rows stay independent problems),
    successive halving over `stages` of (starts kept, Adam steps): all starts for 25 steps, the best 400 for
    100 more, the best 40 for 200 more; then L-BFGS polishes the `polish` best distinct end points to full
    precision. Returns (theta, objective)."""
    # Why not L-BFGS from all 4,500 starts (Epoch AI's recipe)? Each L-BFGS run is sequential, ~0.1 s on
    # 250 points: minutes in all. Batched Adam moves all starts per tensor operation; most starts fall into
    # the same few basins within tens of steps, and only the leaders need the expensive polish.
    theta = grid.clone()
    f = None
    for keep, steps in stages:
        if keep is not None:
            theta = theta[torch.argsort(f)[:keep]]
        theta = theta.clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=0.1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=3e-3)
        for _ in range(steps):
            with torch.no_grad():
                f, g = _objective_and_grad(theta, *data, delta)
                theta.grad = torch.where(torch.isfinite(g), g, torch.zeros_like(g))  # overflowed starts stay put
                if mask is not None:
                    theta.grad.mul_(mask)
            opt.step()
            sched.step()
        theta = theta.detach()
        f, _ = _objective_and_grad(theta, *data, delta)
        f = torch.where(torch.isfinite(f), f, torch.full_like(f, float("inf")))
    # several starts end in the same basin; polishing duplicates would waste the L-BFGS budget, so keep
    # the best `polish` DISTINCT end points (rounded to 0.01 in every coordinate)
    best, seen = None, set()
    for i in torch.argsort(f).tolist():
        key = tuple(np.round(theta[i].numpy(), 2))  # distinct end points only
        if key in seen:
            continue
        seen.add(key)
        cand = _lbfgs(theta[i], data, delta, mask=mask)
        if best is None or cand[1] < best[1]:
            best = cand
        if len(seen) >= polish:
            break
    return best


def compute_optimal_allocation(A, B, alpha, beta, C):
    """Minimize L = E + A N^-alpha + B D^-beta subject to 6 N D = C. Setting dL/dN = 0 along D = C/(6N):
        alpha A N^-alpha = beta B D^-beta
    gives N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
    with G = (alpha A / (beta B))^(1/(alpha+beta)). Works elementwise on numpy arrays."""
    # a = beta / (alpha + beta) is the exponent approach 2 measures directly: the two approaches agree when
    # the law is right, which is why Epoch AI's refit (a ~ 0.5 again) settled the Chinchilla question
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    c6 = np.asarray(C, dtype=np.float64) / 6.0
    return G * c6 ** (beta / (alpha + beta)), c6 ** (alpha / (alpha + beta)) / G


@dataclass
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta with bootstrap refits. `se` holds the bootstrap standard errors
    of E, A, B, alpha, beta; `boot` is (n_bootstrap, 5) of (E, A, B, alpha, beta)."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    se: dict
    boot: np.ndarray
    n_points: int = 0
    seconds: float = 0.0

    # the fitted law itself; vectorized over numpy arrays of N and D
    def predict_loss(self, N, D):
        N, D = np.asarray(N, dtype=np.float64), np.asarray(D, dtype=np.float64)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def optimal_allocation(self, C):
        """(N_opt, D_opt) at compute C, in closed form."""
        return compute_optimal_allocation(self.A, self.B, self.alpha, self.beta, C)

    # the interval of a PREDICTION (what --verify checks) comes from the joint bootstrap refits, not from the
    # per-parameter standard errors, because the parameters are strongly correlated (A with alpha, B with beta)
    def loss_interval(self, N, D, level: float = 0.95):
        """Percentile bootstrap interval of the predicted loss at (N, D)."""
        E, A, B, al, be = self.boot.T
        pred = E + A / float(N) ** al + B / float(D) ** be
        return tuple(np.percentile(pred, [50 * (1 - level), 50 * (1 + level)]))

    def allocation_interval(self, C, level: float = 0.95):
        """((N_lo, N_hi), (D_lo, D_hi)) at compute C over the bootstrap refits."""
        E, A, B, al, be = self.boot.T
        n, d = compute_optimal_allocation(A, B, al, be, C)
        q = [50 * (1 - level), 50 * (1 + level)]
        return tuple(np.percentile(n, q)), tuple(np.percentile(d, q))


def _bootstrap(theta: torch.Tensor, data, delta: float, n_bootstrap: int, seed: int, mask=None) -> torch.Tensor:
    """Refit on `n_bootstrap` resamples of the runs (n runs drawn with replacement), each by L-BFGS warm-started
    at the full fit. On a nearly piecewise-linear Huber objective (most residuals beyond delta) L-BFGS started
    exactly on a kink can stop at once; such a refit is retried from a nudged start. (A batched Adam over all
    resamples at once was tried: it stopped 2-6% above L-BFGS's objective, which inflates the intervals.)
    Returns (B, 5) in (a, b, e, alpha, beta)."""
    rng = np.random.default_rng(seed)
    n = data[0].shape[0]
    out = []
    for _ in range(n_bootstrap):
        idx = torch.from_numpy(rng.integers(0, n, n))
        sample = tuple(x[idx] for x in data)
        f0 = float(_objective(theta[None], *sample, delta).sum())
        th, f = _lbfgs(theta, sample, delta, mask=mask)
        if f >= f0 * (1 - 1e-9):  # no progress from the warm start: stalled on a kink
            scale = torch.tensor([0.2, 0.2, 0.02, 0.01, 0.01], dtype=torch.float64)
            nudge = torch.from_numpy(rng.normal(0, 1, 5)) * scale
            nudge = nudge if mask is None else nudge * mask
            th = min([(th, f), _lbfgs(theta + nudge, sample, delta, mask=mask)], key=lambda t: t[1])[0]
        out.append(th)
    return torch.stack(out) if out else torch.zeros(0, 5, dtype=torch.float64)


def fit_parametric_law(N, D, losses, huber_delta: float = 1e-3, n_bootstrap: int = 100, seed: int = 0,
                       grid: torch.Tensor | None = None, E: float | None = None) -> ParametricFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (N, D, final loss), Hoffmann et al. / Epoch AI style:
    log-sum-exp form on ln L, Huber loss (delta 1e-3), float64, the full grid of starts (`init_grid`).
    Bootstrap: resample the runs with replacement, refit warm-started at the full fit (`_bootstrap`); the
    standard deviation of each parameter over the refits is its standard error.
    E: hold the irreducible loss fixed at a KNOWN value (the synthetic corpus' entropy, in nats per token)
    and fit the other four -- the law's least constrained parameter replaced by a fact."""
    t0 = time.perf_counter()
    N, D, L = (np.asarray(v, dtype=np.float64).ravel() for v in (N, D, losses))
    if not (len(N) == len(D) == len(L)):
        raise ValueError(f"N, D and losses must have the same length, got {len(N)}, {len(D)}, {len(L)}")
    for name, v in (("N", N), ("D", D), ("loss", L)):
        bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
        if len(bad):
            raise ValueError(f"{name} of run {int(bad[0])} is {v[bad[0]]!r}; every value must be finite and > 0")
    if len(N) < 5:
        raise ValueError(f"the parametric law has 5 parameters; got only {len(N)} runs (need >= 5, better >> 5)")
    # everything in logs once: the objective only ever needs ln N, ln D, ln L
    data = tuple(torch.from_numpy(np.log(v)) for v in (N, D, L))
    # A known E: the grid's e column is set to ln E (duplicate rows dropped: 4,500 -> 900 starts) and a mask
    # zeroes e's gradient in every optimizer, so the four free parameters fit around the fixed one.
    grid, mask = init_grid() if grid is None else grid, None
    if E is not None:
        if not (math.isfinite(E) and E > 0):
            raise ValueError(f"a fixed E must be finite and > 0, got {E!r}")
        e_col = torch.full_like(grid[:, :1], math.log(E))
        grid = torch.unique(torch.cat([grid[:, :2], e_col, grid[:, 3:]], 1), dim=0)
        mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    theta, f = _fit_from_grid(grid, data, huber_delta, mask=mask)
    boot = _bootstrap(theta, data, huber_delta, n_bootstrap, seed, mask=mask)
    # back from (a, b, e, alpha, beta) to the natural parameters (E, A, B, alpha, beta)
    def to_nat(th):
        return np.stack([np.exp(th[..., 2]), np.exp(th[..., 0]), np.exp(th[..., 1]), th[..., 3], th[..., 4]], -1)
    best = to_nat(theta.numpy())
    boot = to_nat(boot.numpy().reshape(-1, 5))
    se = dict(zip(("E", "A", "B", "alpha", "beta"), boot.std(0, ddof=1) if len(boot) > 1 else [float("nan")] * 5))
    return ParametricFit(*map(float, best), objective=f, se={k: float(v) for k, v in se.items()}, boot=boot,
                         n_points=len(N), seconds=time.perf_counter() - t0)


# ---- 4. the sweep: train small runs, fit, predict the big one and train it ----


@dataclass
class SweepSpec:
    """Everything that decides a sweep's results (hashed: a folder holds one sweep). Runs: for each budget C,
    the `runs_per_budget` depths whose N lies closest (in ln N) to the Chinchilla-rule guess
    N ~ sqrt(C / (6 tokens_per_param)), each trained for D = C / flops_per_token tokens. Each field is a flag
    of `python scaling.py sweep` (`--runs-per-budget` ...), with this help line:
    budgets: FLOP budgets, comma-separated
    depths: candidate depths (the model-size dial), comma-separated
    runs_per_budget: model sizes per budget (>= 3: a parabola needs 3; a small budget gets the >= 3 it can serve)
    tokens_per_param: centre of each budget's window of sizes (Chinchilla's ~20; on the synthetic corpus the
        optimum sits at ~4-25 tokens per parameter, and 10 centres the default windows on it)
    flops: compute convention: 6nd, or exact (model.py's per-token count)
    width_per_depth: d_model = this x depth (shape_for_depth)
    head_dim: attention head size (heads = d_model / this)
    context_length: tokens per window
    batch_size: windows per step (x context_length = 1,024 tokens per step by default)
    optimizer: muon or adamw: train.py's defaults, one setting for every size (the muP question)
    lr: AdamW lr
    muon_lr: Muon lr (hidden matrices)
    warmup_iters: linear warm-up steps
    decay_fraction: WSD: final fraction of steps spent decaying
    min_steps: runs shorter than this are not planned (they would measure the warm-up, not the model)
    data: train.py's --data: synthetic, tinystories, owt, or a file
    synthetic_bytes: size of the synthetic training text
    vocab_size: BPE vocabulary
    eval_tokens: validation tokens scored per run (the same first ones for every run)
    seed: init and batch seed"""
    budgets: list = field(default_factory=lambda: [7.5e10, 1.5e11, 3e11, 6e11, 1.2e12])
    depths: list = field(default_factory=lambda: list(range(1, 8)))
    runs_per_budget: int = 5
    tokens_per_param: float = 10.0
    flops: str = "6nd"
    width_per_depth: int = 16
    head_dim: int = 16
    context_length: int = 64
    batch_size: int = 16
    optimizer: str = "muon"
    lr: float = 3e-3
    muon_lr: float = 0.02
    warmup_iters: int = 20
    decay_fraction: float = 0.2
    min_steps: int = 50
    # 6 MB of synthetic stories = 1.9M tokens; the longest default run (depth 1 at 6e11: 5M tokens) sees
    # each token ~2.6 times -- repetition this mild costs little (Muennighoff et al. 2023, arXiv 2305.16264)
    data: str = "synthetic"
    synthetic_bytes: int = 6_000_000
    vocab_size: int = 512
    eval_tokens: int = 32_768
    seed: int = 1337

    def __post_init__(self):
        _check_spec(self)  # the table of rules, one per field (plumbing, _SPEC_RULES)

    # tokens per optimizer step: the unit in which every run's length D is counted
    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    # the spec's fingerprint: result files carry it, so results of different settings can never mix
    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class PlannedRun:
    # one run of a sweep: what to train and where its result goes
    key: str  # file name of the result: "C1e+11-d03"
    budget: float
    depth: int
    parameters: int
    steps: int


def plan_sweep(spec: SweepSpec, vocab_size: int) -> list[PlannedRun]:
    """The runs of a sweep, in a stable order (budget, then depth). Errors name the budget that cannot be
    served: fewer than 3 sizes get min_steps there (a budget with fewer than runs_per_budget usable sizes gets
    the ones it has)."""
    # For each budget: every candidate depth gets D = C / (FLOPs per token), rounded to whole steps (see
    # _round_steps); depths too big to get min_steps at this budget drop out; then the window of sizes
    # closest to the rule-of-thumb optimum. The plan depends only on the spec and the vocabulary, so every
    # machine of a sharded sweep computes the same one.
    plan = []
    for c in sorted(spec.budgets):
        fits = []
        for depth in sorted(set(spec.depths)):
            cfg = model_config_for_depth(depth, vocab_size, spec.context_length, width_per_depth=spec.width_per_depth,
                                         head_dim=spec.head_dim)
            steps = _round_steps(c / flops_per_token(cfg, spec.flops) / spec.tokens_per_step, spec.decay_fraction)
            if steps >= spec.min_steps:
                fits.append((depth, M.num_params(cfg), steps))
        # a small budget affords few sizes (bigger ones get too few steps): it keeps the sizes it can serve, down
        # to the 3 a parabola needs, so the sweep can reach down a decade without a smaller batch per budget
        if len(fits) < 3:
            raise ValueError(f"budget {c:.3g} FLOPs is too small: only {len(fits)} of depths {sorted(spec.depths)} get "
                             f">= {spec.min_steps} steps of {spec.tokens_per_step} tokens (a parabola needs 3; "
                             f"smallest model depth {min(spec.depths)}). Raise the budget or add smaller depths")
        guess = math.sqrt(c / (6 * spec.tokens_per_param))  # Chinchilla's rule, only to centre the window
        fits.sort(key=lambda t: abs(math.log(t[1] / guess)))
        for depth, n, steps in sorted(fits[:spec.runs_per_budget]):
            plan.append(PlannedRun(key=f"C{c:.3g}-d{depth:02d}", budget=c, depth=depth, parameters=n, steps=steps))
    return plan


def train_config(spec: SweepSpec, depth: int, steps: int, out_dir, data_dir: str, *, schedule: str = "wsd",
                 threads: int = 1, device: str = "cpu", final_eval_tokens: int | None = None) -> T.TrainConfig:
    """The train.py configuration of one run: the depth's shape, `steps` optimizer steps (a fixed token budget,
    never wall clock, so results are deterministic), WSD schedule, no samples/plots/periodic evals."""
    # data_dir is only used to name the cache; the prepared data itself is passed to train.train
    return T.TrainConfig(
        preset="scaling", data=spec.data, data_dir=data_dir, synthetic_bytes=spec.synthetic_bytes,
        vocab_size=spec.vocab_size, context_length=spec.context_length,
        **shape_for_depth(depth, spec.width_per_depth, spec.head_dim),
        optimizer=spec.optimizer, lr=spec.lr, muon_lr=spec.muon_lr, schedule=schedule, warmup_iters=spec.warmup_iters,
        decay_fraction=spec.decay_fraction, batch_size=spec.batch_size, max_steps=steps, max_minutes=None,
        eval_interval=10 ** 9, ckpt_interval=10 ** 9, log_interval=10 ** 9, num_samples=0, plot=False,
        final_eval_tokens=spec.eval_tokens if final_eval_tokens is None else final_eval_tokens,
        seed=spec.seed, threads=threads, device=device, out_dir=str(out_dir))


def verify_prediction(spec: SweepSpec, out, data, runs: list[Run], factor: float = 4.0, *, threads=1, device="cpu",
                      log=say, iso: IsoFlopsFit | None = None, par: ParametricFit | None = None,
                      par_known: ParametricFit | None = None) -> dict:
    """Fit both laws on the sweep, take C_v = factor x the largest swept budget, pick the depth whose N is
    closest (in ln N) to the IsoFLOPs (parabola) N_opt(C_v), PRINT the parametric law's predicted loss at that
    (N, D) with its bootstrap interval, write it to <out>/verify.json, and only then train the run and add
    its `actual` loss. The interval covers the fit's uncertainty, not run-to-run noise of the one run.
    `par_known`: a second law fitted with E held at the corpus' known entropy: verify.json's "fixed" entry
    next to the free law's "free" one."""
    iso = iso or fit_isoflops(runs, "parabola")  # (the caller's fits when it already has them)
    par = par or fit_parametric_law([r.parameters for r in runs], [r.tokens for r in runs], [r.loss for r in runs],
                                    n_bootstrap=50)
    # N from approach 2 (the IsoFLOPs power law), the loss from approach 3 (the parametric law): each
    # method answers the question it is better at. Only whole depths exist, so the nearest one is trained.
    c_v = factor * max(r.budget for r in runs)
    n_iso, _ = iso.predict(c_v)
    cands = [(d, model_config_for_depth(d, data.tokenizer.vocab_size, spec.context_length,
                                        width_per_depth=spec.width_per_depth, head_dim=spec.head_dim))
             for d in range(1, 33)]
    depth, cfg = min(cands, key=lambda t: abs(math.log(M.num_params(t[1]) / float(n_iso))))
    n = M.num_params(cfg)
    steps = _round_steps(c_v / flops_per_token(cfg, spec.flops) / spec.tokens_per_step, spec.decay_fraction)
    if steps < spec.min_steps:
        raise ValueError(f"verification at C = {c_v:.3g}: the predicted optimum (depth {depth}, N = {n:,}) gets only "
                         f"{steps} steps (< min_steps {spec.min_steps}); raise --verify-factor or the budgets")
    tokens = steps * spec.tokens_per_step
    log(f"verify: C = {c_v:.3g} FLOPs ({factor:g}x the largest budget): IsoFLOPs N_opt = {float(n_iso):,.0f} -> "
        f"depth {depth} (N = {n:,}), D = {tokens:,} tokens ({steps} steps)")
    # the prediction is made, printed and written BEFORE the run it predicts exists
    res = dict(spec=spec.key(), compute=c_v, depth=depth, parameters=n, tokens=tokens, steps=steps,
               isoflops_n_opt=float(n_iso), parametric_n_opt=float(par.optimal_allocation(c_v)[0]), actual=None)
    for name, law in (("free", par), ("fixed", par_known)):
        if law is not None:
            lo, hi = law.loss_interval(n, tokens)
            res[name] = dict(E=law.E, predicted=float(law.predict_loss(n, tokens)), interval=[float(lo), float(hi)])
            log(f"verify: predicted loss with E {name} ({law.E:.4f}): {res[name]['predicted']:.4f} (95% interval "
                f"{lo:.4f}-{hi:.4f})")
    res["actual"] = _verification_loss(spec, Path(out), data, res, threads=threads, device=device, log=log)
    for name in ("free", "fixed"):
        if name in res:  # the check: the error of each law's prediction, and whether its interval held the truth
            r, (lo, hi) = res[name], res[name]["interval"]
            r.update(rel_error=(r["predicted"] - res["actual"]) / res["actual"], inside=bool(lo <= res["actual"] <= hi))
            log(f"verify: E {name}: predicted {r['predicted']:.4f}, actual {res['actual']:.4f}: error "
                f"{100 * r['rel_error']:+.2f}%, {'inside' if r['inside'] else 'OUTSIDE'} the interval")
    tk.atomic_write_json(Path(out) / "verify.json", dict(res, complete=True))
    return res


# ===== Menu: one-run data points (WSD branches) =====
# MiniCPM's trick: one stable-phase trunk per model size, with a short WSD decay branched off at each token count,
# gives the points of separate runs for one run plus the decays. run_sweep(mode="branched") calls
# run_branched_depth per depth instead of one train.train per run; `sweep --compare-modes` compares the two modes.


def run_branched_depth(spec: SweepSpec, out: Path, data, points: list[PlannedRun], stats: dict, *, threads=1,
                       device="cpu", log=say, after_run=None):
    """MiniCPM's one-run data points for one depth. The trunk trains at the stable learning rate (train.py's
    "constant" schedule: the same warm-up, then the peak lr -- exactly WSD's stable phase). At each branch
    point S_k = (1 - f) T_k the trunk's checkpoint is copied aside (`stable.pt`), and a branch resumes from
    the copy with train.py's WSD schedule for T_k steps, which decays over [S_k, T_k]. Because batches are a
    function of (seed, step) and the lr before S_k is identical, the branch IS the separate WSD run of
    T_k steps (the tests check this), at the cost of only its decay. Resumable: each stable copy is made
    before the trunk moves past it, and each branch restarts from its copy if killed."""
    trunk = out / "train" / f"trunk-d{points[0].depth:02d}"
    for pr in sorted(points, key=lambda p: p.steps):  # increasing branch points: the trunk only moves forward
        path = out / "runs" / f"{pr.key}.json"
        if read_result(path, spec.key(), warn=log) is not None:
            stats["skipped"].append(pr.key)
            continue
        t1 = time.time()
        # S_k: where WSD's decay of a T_k-step run starts (whole steps by _round_steps); the trunk must be
        # exactly there when copied
        s_k = round(pr.steps * (1 - spec.decay_fraction))
        branch = out / "train" / f"branch-{pr.key}"
        branch.mkdir(parents=True, exist_ok=True)
        stable = branch / "stable.pt"
        if not stable.exists():
            at = _checkpoint_step(trunk / "ckpt.pt")
            if at > s_k:  # the trunk ran past this point without its copy (should not happen): start over
                log(f"trunk {trunk} is at step {at}, past branch point {s_k} of {pr.key}: retraining the trunk")
                shutil.rmtree(trunk)
                at = 0
            if at < s_k:
                cfg = train_config(spec, pr.depth, s_k, trunk, data.cache_dir, schedule="constant", threads=threads,
                                   device=device, final_eval_tokens=2 * spec.context_length)
                T.train(dataclasses.replace(cfg, resume=True), data=data, log=_quiet)
                stats["steps_trained"] += s_k - at
            # the copy is made BEFORE the trunk moves on: after a kill, this branch can always restart from it
            with tk.atomic_open(stable, "wb") as f:
                f.write((trunk / "ckpt.pt").read_bytes())
        with tk.atomic_open(branch / "ckpt.pt", "wb") as f:  # a fresh copy: a killed branch restarts cleanly
            f.write(stable.read_bytes())
        # resume=True: train.train loads weights, optimizer state and the step count, then runs steps
        # S_k .. T_k - 1 under the WSD schedule of a T_k-step run, i.e. exactly its decay phase
        cfg = train_config(spec, pr.depth, pr.steps, branch, data.cache_dir, threads=threads, device=device)
        summary = T.train(dataclasses.replace(cfg, resume=True), data=data, log=_quiet)
        _write_result(path, spec, pr, summary, dict(branched_from_step=s_k))
        stable.unlink()
        _drop_checkpoint(branch)
        stats["ran"].append(pr.key)
        stats["steps_trained"] += pr.steps - s_k
        _progress_line(log, len(stats["ran"]), stats["planned"], pr, spec, summary["val"]["loss"], time.time() - t1,
                       None, note=f" (branched at step {s_k})")
        if after_run:
            after_run(pr.key)


# (train.read_checkpoint gives clear errors for a corrupt file; a trunk checkpoint is written atomically by
# train.py, so it is either the previous segment's or the new one's, never half of one)
def _checkpoint_step(path: Path) -> int:
    """The iteration a train.py checkpoint holds (0 when there is none)."""
    return int(T.read_checkpoint(path)["iteration"]) if path.exists() else 0


def _compare_modes(fits, spec):
    """Separate vs branched on the same budgets: the fits should agree (the branches reproduce the separate
    runs), and the branched mode should cost less. Compute is counted in FLOPs, 6 N x tokens, per depth:
    separate = every run in full; branched = each depth's trunk up to its last branch point, plus every
    branch's decay (the result files record steps and the branch point: no training logs needed)."""
    (rs, iso_s, par_s, fs, _), (rb, iso_b, par_b, fb, _) = fits["separate"], fits["branched"]
    read = lambda folder: [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    flops = lambda r, steps: 6.0 * r["parameters"] * steps * spec.tokens_per_step
    sep = sum(flops(r, r["steps"]) for r in read(fs))
    trunk, decay = {}, 0.0
    for r in read(fb):
        trunk[r["depth"]] = max(trunk.get(r["depth"], 0.0), flops(r, r["branched_from_step"]))
        decay += flops(r, r["steps"] - r["branched_from_step"])
    br = sum(trunk.values()) + decay
    print(f"branched vs separate: {br:.3g} vs {sep:.3g} training FLOPs (6ND): {100 * (1 - br / sep):.0f}% of the "
          f"compute saved")
    # the same runs by name in both folders; the largest loss difference says how exactly branches reproduce
    ls, lb = ({r.name.split("/")[-1]: r.loss for r in runs} for runs in (rs, rb))
    diff = max(abs(ls[k] - lb[k]) for k in ls.keys() & lb.keys())
    # the fits compared where --verify would use them: the exponent and N_opt at 4x the largest budget
    c = 4 * max(spec.budgets)
    rows = (("IsoFLOPs parabola exponent a", iso_s["parabola"].a, iso_b["parabola"].a),
            (f"IsoFLOPs parabola N_opt({c:.0e})", float(iso_s["parabola"].predict(c)[0]),
             float(iso_b["parabola"].predict(c)[0])),
            ("parametric alpha", par_s.alpha, par_b.alpha), ("parametric beta", par_s.beta, par_b.beta))
    for name, a, b in rows:
        print(f"    {name}: separate {a:.4g}, branched {b:.4g}")
    print(f"    largest |final loss difference| between a run and its branched twin: {diff:.2e}")


# ===== Menu: a known irreducible loss =====
# On the synthetic corpus E is a fact (the corpus' entropy), not a parameter to fit. The sweep command fits the
# law a second time with E held there (fit_parametric_law's E=), and verify_prediction reports its prediction too:
# E is the parameter a small sweep pins down worst (the loss at N, D -> infinity, far beyond the data), and a fitted
# E below the data's entropy is a physical impossibility that drags every extrapolated loss down.


def _fit_known_entropy(runs, data, folder, log=say):
    """On the synthetic corpus the irreducible loss is KNOWN: the corpus' entropy (train.py prints it in
    bits per byte). In nats per token, E = floor_bpb x (loss / bpb) of any run (loss / bpb = ln 2 x bytes
    per token of the validation text). Fit the law again with E held there; None for other data."""
    res = [json.loads(p.read_text()) for p in sorted((Path(folder) / "runs").glob("*.json"))]
    ratio = [r["final_loss"] / r["bpb"] for r in res if r.get("bpb")]
    if data.entropy_floor_bpb is None or not ratio:
        return None
    # loss / bpb is the same for every run (same validation tokens); the mean only guards against rounding
    E = data.entropy_floor_bpb * float(np.mean(ratio))
    par = fit_parametric_law([r.parameters for r in runs], [r.tokens for r in runs], [r.loss for r in runs], E=E,
                             n_bootstrap=50)
    log(f"parametric with E fixed at the entropy floor ({E:.4f} nats/token): L = {par.E:.4f} + {par.A:.4g} / "
        f"N^{par.alpha:.3f}(+-{par.se['alpha']:.3f}) + {par.B:.4g} / D^{par.beta:.3f}(+-{par.se['beta']:.3f}); "
        f"N_opt ~ C^{par.beta / (par.alpha + par.beta):.3f}")
    return par


# ===== Menu: muP learning-rate transfer =====
# The sweep trains every size with one learning rate, so under the standard parametrization (SP) bigger models
# are mistuned. lr_transfer measures it: the best lr per width under SP and under muP (train.py's mup_base_width).


def lr_transfer(out, data, widths=(32, 64, 128), lrs=(1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1),
                steps: int = 150, num_layers: int = 2, head_dim: int = 16, context_length: int = 64,
                batch_size: int = 16, threads: int = 1, device: str = "cpu", seed: int = 1337,
                eval_tokens: int = 16_384, log=say) -> dict:
    """Train every (parametrization, width, lr) with AdamW for `steps` steps (same data, same seed) and return
    {"sp": {width: {lr: loss}}, "mup": {...}, "best": {param: {width: best lr}}}. Each run's result is a file
    under out/lr/, so a killed experiment resumes. Diverged runs count as loss = inf."""
    # The experiment of Tensor Programs V's Figure 1 in miniature: same depth, data, seed and number of steps;
    # only the width and the learning rate change. Under SP the curves' minima should drift left as width
    # grows; under muP they should line up. AdamW for both, so the only difference is the parametrization
    # (train.py's default Muon normalizes its updates per matrix, a different answer to the same problem).
    out = Path(out)
    (out / "lr").mkdir(parents=True, exist_ok=True)
    res = {"sp": {}, "mup": {}}
    grid = [(p, w, lr) for p in ("sp", "mup") for w in widths for lr in lrs]
    t0 = time.time()
    for done, (param, w, lr) in enumerate(grid, start=1):
        # every setting that changes the result is in the file name: resuming with other settings never reads
        # a result of a different experiment
        key = f"{param}-w{w}-L{num_layers}-lr{lr:.3g}-s{steps}-T{context_length}-B{batch_size}-seed{seed}"
        path = out / "lr" / f"{key}.json"
        r = json.loads(path.read_text()) if path.exists() else None
        if not (isinstance(r, dict) and r.get("complete")):
            cfg = T.TrainConfig(
                preset="lr-transfer", data=data.source, data_dir=str(Path(data.cache_dir).parent.parent),
                context_length=context_length, d_model=w, num_layers=num_layers, num_heads=w // head_dim,
                optimizer="adamw", lr=lr, schedule="cosine", warmup_iters=min(20, steps // 5),
                batch_size=batch_size, max_steps=steps, max_minutes=None, eval_interval=10 ** 9,
                ckpt_interval=10 ** 9, log_interval=10 ** 9, num_samples=0, plot=False,
                final_eval_tokens=eval_tokens, seed=seed, threads=threads, device=device,
                out_dir=str(_fresh(out / "train" / key)),
                # muP is train.py's switch: the smallest width is the base (where muP = SP)
                mup_base_width=min(widths) if param == "mup" else None)
            # too high an lr diverges: train.train raises FloatingPointError; that point is "inf" in the table
            # (a real outcome of the sweep, not an error of the command)
            try:
                loss = T.train(cfg, data=data, log=_quiet)["val"]["loss"]
            except FloatingPointError:
                loss = float("inf")
            _drop_checkpoint(out / "train" / key)
            r = dict(param=param, width=w, lr=lr, loss=loss if math.isfinite(loss) else None, complete=True)
            tk.atomic_write_json(path, r)
        loss = r["loss"] if r["loss"] is not None else float("inf")
        res[param].setdefault(w, {})[lr] = loss
        log(f"lr-transfer [{done}/{len(grid)}] {param:3s} width {w:4d} lr {lr:.2e}: loss {loss:.4f} "
            f"[{time.time() - t0:.0f}s]")
    # best lr per (parametrization, width): the quantity whose spread across widths answers the question
    # (a best lr at the edge of the grid is only a bound: extend --lrs until every minimum is inside)
    res["best"] = {p: {w: min(d, key=d.get) for w, d in res[p].items()} for p in ("sp", "mup")}
    return res


def print_lr_transfer(res: dict, widths, lrs, log=say):
    """lr_transfer's table (rows: widths, columns: lrs, per parametrization) and the spread of the best lr across
    widths (1.0x = perfect transfer)."""
    log(f"{'width':>6s} | " + " | ".join(f"{lr:9.2e}" for lr in lrs) + " | best lr")
    for p in ("sp", "mup"):
        log(p)
        for w in widths:
            log(f"{w:6d} | " + " | ".join(f"{res[p][w][lr]:9.4f}" for lr in lrs) + f" | {res['best'][p][w]:.2e}")
    # a spread of 1.0x means every width's best lr is the same grid point: perfect transfer on this grid
    spread = {p: max(res["best"][p].values()) / min(res["best"][p].values()) for p in ("sp", "mup")}
    log(f"best-lr spread across widths (max/min): SP {spread['sp']:.1f}x, muP {spread['mup']:.1f}x")


def plot_lr_transfer(res: dict, path):
    """Loss vs learning rate, one line per width; left SP, right muP. Transfer = the minima line up."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, p, name in ((axes[0], "sp", "standard parametrization"), (axes[1], "mup", "muP")):
        # the legend names each width's best lr, so the drift (or its absence) reads without squinting;
        # diverged runs (inf) are drawn at 10 so the curve shows where the lr became too high
        for w, d in sorted(res[p].items()):
            lrs = sorted(d)
            ax.plot(lrs, [min(d[lr], 10.0) for lr in lrs], "o-", label=f"width {w} (best {res['best'][p][w]:.2g})")
        ax.set(xscale="log", xlabel="learning rate (AdamW, hidden layers)", title=name)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final val loss")
    _save_fig(fig, path)


# ===== Appendix: plumbing =====


def _pos(x) -> bool:
    """A finite number > 0 (a boolean is not a number here: True would read as 1.0)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


# SweepSpec's rules: (field, check of the spec, what the field allows), checked in order before any work, so a
# bad value is one line naming the field (a check runs only after the ones before it passed: no ZeroDivision)
_SPEC_RULES = (
    ("budgets", lambda s: len(s.budgets) >= 2, "a list of >= 2 budgets (N_opt = k C^a needs 2)"),
    ("budgets", lambda s: all(map(_pos, s.budgets)), "finite positive numbers of FLOPs"),
    ("depths", lambda s: len(s.depths) >= 1 and all(d >= 1 for d in s.depths), "depths >= 1"),
    ("runs_per_budget", lambda s: s.runs_per_budget >= 3, ">= 3 (a parabola needs 3 sizes)"),
    ("tokens_per_param", lambda s: _pos(s.tokens_per_param), "a finite number > 0"),
    ("flops", lambda s: s.flops in ("6nd", "exact"), "'6nd' or 'exact'"),
    ("width_per_depth", lambda s: s.width_per_depth >= 1, ">= 1"), ("head_dim", lambda s: s.head_dim >= 1, ">= 1"),
    ("depths", lambda s: all(s.width_per_depth * d % s.head_dim == 0 for d in s.depths),
     "depths whose d_model (width_per_depth x depth) is a multiple of head_dim"),
    ("context_length", lambda s: s.context_length >= 1, ">= 1"), ("batch_size", lambda s: s.batch_size >= 1, ">= 1"),
    ("optimizer", lambda s: s.optimizer in ("muon", "adamw"), "'muon' or 'adamw'"),
    ("lr", lambda s: _pos(s.lr), "a finite number > 0"), ("muon_lr", lambda s: _pos(s.muon_lr), "a finite number > 0"),
    ("warmup_iters", lambda s: s.warmup_iters >= 0, ">= 0"),
    ("decay_fraction", lambda s: 0 <= s.decay_fraction < 1, "in [0, 1)"),
    ("min_steps", lambda s: s.min_steps >= 1, ">= 1"), ("synthetic_bytes", lambda s: s.synthetic_bytes >= 1, ">= 1"),
    ("vocab_size", lambda s: s.vocab_size >= 257, ">= 257 (256 bytes + <|endoftext|>)"),
    ("eval_tokens", lambda s: s.eval_tokens >= s.context_length, "at least one window (>= context_length)"),
)


def _check_spec(spec) -> None:
    for name, ok, allowed in _SPEC_RULES:
        if not ok(spec):
            raise ValueError(f"{name} must be {allowed}, got {getattr(spec, name)!r}")


# The options that are not SweepSpec fields (those are checked by SweepSpec itself): (dest, check, allowed).
# Checked in main before any work, so a bad value is one usage line.
_ARG_RULES = (
    ("verify_factor", lambda v: _pos(v), "a finite number > 0"), ("bootstrap", lambda v: v >= 2, ">= 2"),
    ("predict", lambda v: all(map(_pos, v)), "finite positive FLOP budgets"),
    ("threads", lambda v: v >= 0, ">= 0 (0: auto)"), ("steps", lambda v: v >= 1, ">= 1"),
    ("num_layers", lambda v: v >= 1, ">= 1"), ("widths", lambda v: all(w >= 16 and w % 16 == 0 for w in v),
                                                 "multiples of 16 (the head size)"),
    ("lrs", lambda v: all(map(_pos, v)), "finite positive learning rates"),
    ("peer_stride", lambda v: v >= 1, ">= 1"), ("depths", lambda v: all(d >= 1 for d in v), "depths >= 1"),
)


_HELD: set = set()  # sweep folders whose lock this process holds (sweep_main, then run_sweep inside it)


@contextlib.contextmanager
def sweep_lock(folder):
    """One process per sweep folder: two sweeps in one folder would both train every run neither has finished
    (each sees no result file yet). An exclusive flock on <folder>/.lock: the kernel gives it to one process
    and takes it back when that process ends, even by kill -9, so a lock is never stale. Re-entrant."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"{folder} is in use by another sweep (pid {f.read().strip() or '?'}): wait for it "
                             "to end, or give another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))  # (only for that message: the flock is the lock)
        f.flush()
        _HELD.add(folder)
        try:
            yield
        finally:  # closing the file releases the flock
            _HELD.discard(folder)


def make_run(name: str, parameters, loss, tokens=None, budget=None) -> Run:
    """Build a Run from raw values, with D = C / (6N) or C = 6ND when one of them is missing. Every value
    must be a finite positive number; the error names the run (file:line or index) and the field."""
    # validate every given field before deriving anything: the error must point at the bad value itself
    vals = dict(parameters=parameters, final_loss=loss, tokens=tokens, compute_budget=budget)
    for k, v in vals.items():
        if v is None and k in ("tokens", "compute_budget"):
            continue
        if isinstance(v, bool):  # float(True) is 1.0: a JSON true is a mistake, not a loss of 1
            raise ValueError(f"{name}: {k} = {v!r} is a boolean, not a number")
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: {k} = {v!r} is not a number") from None
        if not math.isfinite(x) or x <= 0:
            raise ValueError(f"{name}: {k} = {v!r} must be a finite positive number")
        vals[k] = x
    if vals["tokens"] is None and vals["compute_budget"] is None:
        raise ValueError(f"{name}: needs tokens (D) or compute_budget (C) besides parameters and final_loss")
    # D given: C = 6ND (the budget a run "used"). Only C given: D = C / 6N (how CS336's file is meant).
    n, c = vals["parameters"], vals["compute_budget"]
    d = vals["tokens"] if vals["tokens"] is not None else c / (6.0 * n)
    return Run(parameters=n, tokens=d, budget=c if c is not None else 6.0 * n * d, loss=vals["final_loss"], name=name)


def load_runs(path, fmt: str | None = None, n_col: str = "parameters", d_col: str | None = None,
              c_col: str | None = "compute_budget", loss_col: str = "final_loss", skipped: list | None = None
              ) -> list[Run]:
    """Runs from a file in a format `_FORMATS` lists: CS336's JSON list of {"parameters", "compute_budget" and/or
    "tokens", "final_loss"}, or CSV/TSV with the columns named by n_col, d_col and/or c_col, loss_col (fmt None:
    from the extension; --format overrides). Errors name the file and the run's index or line. `skipped`: a
    list to collect the errors of runs with bad VALUES (a negative N, a NaN loss) instead of raising; those
    runs are left out (`fit` reports each and fits the rest). A malformed file always raises."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"runs file {path} does not exist")
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "json")
    if fmt == "json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of runs, got {type(rows).__name__}")
        runs = []
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or "parameters" not in r or "final_loss" not in r:
                raise ValueError(f"{path}: run {i} is not an object with 'parameters' and 'final_loss': {r!r:.120}")
            _add_run(runs, skipped, f"{path.name} run {i}", r["parameters"], r["final_loss"], r.get("tokens"),
                     r.get("compute_budget"))
        return runs
    if fmt != "csv":
        raise ValueError(f"unknown runs format {fmt!r} (json or csv)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = reader.fieldnames or []
        # N and loss are required; of D and C at least one (the other follows from C = 6ND)
        missing = [c for c in (n_col, loss_col) if c not in header]
        if not (d_col in header or c_col in header):
            missing += [c for c in (d_col, c_col) if c]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in the header {header} (set --n-col, --d-col, --c-col, "
                             "--loss-col)")
        # line numbers count the header as line 1, as an editor shows them. A short row gets None values, a
        # long one a None key (csv.DictReader's convention): both mean a malformed line.
        runs = []
        for line, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise ValueError(f"{path}:{line}: row has {len(row) - (None in row)} fields, the header has "
                                 f"{len(header)}")
            _add_run(runs, skipped, f"{path.name}:{line}", row[n_col], row[loss_col],
                     row.get(d_col) if d_col in header else None, row.get(c_col) if c_col in header else None)
    return runs


def _add_run(runs: list, skipped: list | None, name: str, *values):
    """make_run into `runs`; a bad value raises, or with a `skipped` list is recorded there instead."""
    try:
        runs.append(make_run(name, *values))
    except ValueError as e:
        if skipped is None:
            raise
        skipped.append(str(e))


def _round_steps(target: float, decay_fraction: float) -> int:
    """The step count nearest `target` whose decay phase (decay_fraction x steps) is a whole number of steps,
    so a branched decay starts exactly where train.py's WSD schedule of a separate run would."""
    # search outward from the target: the first whole-decay step count is at most a few steps away
    # (every 5th integer when decay_fraction = 0.2)
    base = max(1, round(target))
    for off in range(0, 200):
        for s in (base + off, base - off):
            if s >= 1 and abs(s * decay_fraction - round(s * decay_fraction)) < 1e-9:
                return s
    return base


def _quiet(*args, **kwargs):
    """train.train's log: a sweep prints one line per run instead of train.py's per-step lines."""


def read_result(path: Path, spec_key: str, warn: Callable = say, then: str = "rerunning that run") -> dict | None:
    """A finished run's result, or None when it must be (re)run. Result files are written atomically, but a
    copy interrupted mid-way, a full disk elsewhere or a hand edit can still leave a broken one: anything
    that is not complete JSON with every field and this sweep's key, or holds a value no run can have (a
    negative N, a boolean loss), is reported with the reason and `then` (what the caller does), never used."""
    # "complete": True is written last inside the same atomic write; the spec key ties the result to the
    # exact settings that produced it
    if not path.exists():
        return None
    why = "a killed or interrupted write?"
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(r, dict) and r.get("complete") is True and r.get("spec") == spec_key
        if ok:
            make_run(path.name, r.get("parameters"), r.get("final_loss"), r.get("tokens", "absent"),
                     r.get("compute_budget", "absent"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        ok = False
    except ValueError as e:  # make_run's reason, naming the field
        ok, why = False, str(e)
    if not ok:
        warn(f"result file {path} is incomplete or corrupt ({why}): {then}")
        return None
    return r


def _write_result(path: Path, spec: SweepSpec, pr: PlannedRun, summary: dict, extra: dict | None = None):
    tokens = pr.steps * spec.tokens_per_step
    tk.atomic_write_json(path, dict(
        spec=spec.key(), key=pr.key, depth=pr.depth, parameters=pr.parameters, tokens=tokens,
        compute_budget=pr.budget, compute_6nd=6.0 * pr.parameters * tokens, steps=pr.steps,
        final_loss=summary["val"]["loss"], bpb=summary["val"]["bpb"], train_seconds=summary["train_seconds"],
        **(extra or {}), complete=True))


def shard_filter(items: list, shard: tuple[int, int] | None) -> list:
    """--shard K/N (0 <= K < N, as data.py counts): item i belongs to shard K when i mod N == K. Every machine
    computes the same plan, so N machines split a sweep with no coordination; together they cover it once."""
    # round-robin rather than contiguous blocks: the plan is ordered by budget, so blocks would give one
    # machine all the expensive runs; i mod N spreads every budget over all machines
    if shard is None:
        return items
    k, n = shard
    if not 0 <= k < n:
        raise ValueError(f"shard {k}/{n}: expected K/N with 0 <= K < N (shards count from 0)")
    return [x for i, x in enumerate(items) if i % n == k]


def _prepare_folder(out: Path, spec: SweepSpec) -> None:
    """One sweep per folder: sweep.json records its spec; a different spec in the same folder is an error
    (its results would silently mix with this one's)."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    # a corrupt sweep.json (e.g. a copy cut short) is simply rewritten: the per-run files carry the key too
    meta = out / "sweep.json"
    if meta.exists():
        try:
            old = json.loads(meta.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old.get("key") != spec.key():
            diff = [k for k, v in dataclasses.asdict(spec).items() if old.get("spec", {}).get(k) != v]
            raise ValueError(f"{out} holds a different sweep (differs in {diff}); use another --out or the same "
                             "settings to resume it")
    tk.atomic_write_json(meta, dict(key=spec.key(), spec=dataclasses.asdict(spec)))


def run_sweep(spec: SweepSpec, out, data: T.PreparedData, *, shard=None, mode: str = "separate", threads: int = 1,
              device: str = "cpu", log: Callable = say, after_run: Callable | None = None) -> dict:
    """Train every planned run of this shard that has no valid result yet; return {"ran": [keys], "skipped":
    [keys], "steps_trained": what this call trained, "steps_separate": what separate runs would cost}.
    mode "separate": one train.train per run. mode "branched": one stable-phase trunk per depth with a WSD
    decay branched off at each of its budgets (`run_branched_depth`). `after_run(key)` is called after each
    result is written (the tests use it to kill a sweep midway)."""
    # Layout of a sweep folder:  sweep.json (the spec and its key)
    #                            runs/<key>.json (one result per run: the sweep's only source of truth)
    #                            train/<key>/ (train.py's run folder: metrics.jsonl, tokenizer; checkpoint
    #                                          deleted once the result is written)
    out = Path(out)
    with sweep_lock(out):
        return _run_sweep_locked(spec, out, data, shard, mode, threads, device, log, after_run)


def _run_sweep_locked(spec, out, data, shard, mode, threads, device, log, after_run) -> dict:
    """run_sweep's body, while this process holds the folder's lock."""
    _prepare_folder(out, spec)
    plan = plan_sweep(spec, data.tokenizer.vocab_size)
    stats = dict(ran=[], skipped=[], steps_trained=0, steps_separate=sum(p.steps for p in plan), planned=len(plan))
    if mode == "branched":  # the unit of work (and of sharding) is a depth's trunk
        for depth in shard_filter(sorted({p.depth for p in plan}), shard):
            run_branched_depth(spec, out, data, [p for p in plan if p.depth == depth], stats, threads=threads,
                               device=device, log=log, after_run=after_run)
        return stats
    if mode != "separate":
        raise ValueError(f"sweep mode must be 'separate' or 'branched', got {mode!r}")
    # the loop is idempotent: a finished run (valid result file) is skipped, anything else is trained from
    # step 0 (a half-done run is never continued: its checkpoint might predate a kill mid-step)
    mine = shard_filter(plan, shard)
    t0 = time.time()
    for i, pr in enumerate(mine):
        path = out / "runs" / f"{pr.key}.json"
        if read_result(path, spec.key(), warn=log) is not None:
            stats["skipped"].append(pr.key)
            continue
        t1 = time.time()
        cfg = train_config(spec, pr.depth, pr.steps, _fresh(out / "train" / pr.key), data.cache_dir, threads=threads,
                           device=device)
        # the result file is the commit point: written atomically, after training and the final eval
        summary = T.train(cfg, data=data, log=_quiet)
        _write_result(path, spec, pr, summary)
        _drop_checkpoint(out / "train" / pr.key)
        stats["ran"].append(pr.key)
        stats["steps_trained"] += pr.steps
        _progress_line(log, i + 1, len(mine), pr, spec, summary["val"]["loss"], time.time() - t1, time.time() - t0)
        if after_run:
            after_run(pr.key)
    return stats


def collect_results(folders, warn: Callable = say) -> list[Run]:
    """Runs from one or more sweep folders (shards merge here; a run present in several is counted once). A
    broken result file is reported through `warn` (which file, why) and left out."""
    # keyed by (sweep key, run key): the same sweep split over shards merges; two different sweeps given
    # together stay separate runs (their budgets may coincide, their results are not interchangeable)
    seen = {}
    for folder in folders:
        folder = Path(folder)
        meta = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").exists() else None
        if meta is None:
            raise ValueError(f"{folder} is not a sweep folder (no sweep.json)")
        for p in sorted((folder / "runs").glob("*.json")):
            r = read_result(p, meta["key"], warn, then="left out of the fit")
            if r is not None:
                seen.setdefault((meta["key"], r["key"]), make_run(
                    f"{folder.name}/{r['key']}", r["parameters"], r["final_loss"], r["tokens"], r["compute_budget"]))
    return list(seen.values())


def fit_sweep(folder: Path, data, n_planned: int, predict_at: float, log=say):
    """A sweep folder's fits, printed with their predictions at `predict_at` FLOPs: (runs, {"argmin", "parabola":
    IsoFlopsFit}, the free parametric law, the law with E at the corpus' entropy or None). None while runs of the
    plan are missing: a shard of a larger sweep stops here (merge the folders with `fit folder1 folder2 ...`)."""
    runs = collect_results([folder], warn=log)
    if len(runs) < n_planned:
        log(f"{n_planned - len(runs)} runs of the sweep are not finished (other shards?); fit later with: "
            f"python scaling.py fit {folder}")
        return None
    iso, par = fit_all(runs)
    print_fits(runs, iso, par, predict_at=[predict_at], log=log)
    # on the synthetic corpus, the same law with E held at the corpus' entropy (see _fit_known_entropy)
    return runs, iso, par, _fit_known_entropy(runs, data, folder, log=log)


def _verification_loss(spec: SweepSpec, out: Path, data, res: dict, *, threads=1, device="cpu", log=say) -> float:
    """verify_prediction's run: its loss, trained once. verify.json is the resume point: one that holds an
    `actual` loss for the same spec, depth and steps means the run is done (a rerun of the command); otherwise
    the prediction is written there first (atomically, `actual` still null), then the run is trained."""
    path = out / "verify.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        old = {}  # cut short: the run is simply trained again
    if all(old.get(k) == res[k] for k in ("spec", "depth", "steps")) and _pos(old.get("actual")):
        log(f"verify: the run is already trained ({path}): actual loss {old['actual']:.4f}")
        return old["actual"]
    tk.atomic_write_json(path, res)
    log("verify: training the predicted optimum ...")
    t0 = time.time()
    summary = T.train(train_config(spec, res["depth"], res["steps"], _fresh(out / "train" / "verify"), data.cache_dir,
                                   threads=threads, device=device), data=data, log=_quiet)
    log(f"verify: trained in {time.time() - t0:.0f}s")
    _drop_checkpoint(out / "train" / "verify")
    return summary["val"]["loss"]


def _fresh(run_dir: Path) -> Path:
    """An empty run folder for a run that starts from step 0. A folder left by a killed attempt holds its
    metrics (and maybe a checkpoint); train.py refuses to mix a new run into it, and the sweep's rule is that
    an unfinished run is retrained from scratch, so the leftovers go."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return Path(run_dir)


def _drop_checkpoint(run_dir: Path):
    """A finished run's result file holds what a sweep needs; its checkpoint (weights + optimizer state)
    would only fill the disk (tens of MB x dozens of runs)."""
    p = Path(run_dir) / "ckpt.pt"
    if p.exists():
        p.unlink()


def _progress_line(log, i, n, pr: PlannedRun, spec: SweepSpec, loss, secs, elapsed, note=""):
    tokens = pr.steps * spec.tokens_per_step
    log(f"sweep [{i}/{n}] C={pr.budget:.3g} depth {pr.depth} (N={pr.parameters / 1e3:,.1f}K, D={tokens / 1e6:.2f}M "
        f"tokens, {pr.steps} steps){note}: loss {loss:.4f} in {secs:.1f}s" +
        (f"; {elapsed / 60:.1f} min so far" if elapsed is not None else ""))


def prepare_sweep_data(spec: SweepSpec, data_dir: str = "data_cache", log=say) -> T.PreparedData:
    """train.py's cached data pipeline (corpus -> BPE -> token files), run once and shared by every run."""
    cfg = T.TrainConfig(data=spec.data, data_dir=data_dir, synthetic_bytes=spec.synthetic_bytes,
                        vocab_size=spec.vocab_size)
    return T.prepare_data(cfg, log=log)


# The printed report. Every estimate comes with its 95% bootstrap interval: a point prediction four decades
# beyond the data without an interval would claim a precision the method does not have.


def print_fits(runs: list[Run], iso: dict, par: ParametricFit | None, predict_at=(1e23, 1e24), log=say):
    """The fitted laws and their predictions at `predict_at`, with 95% bootstrap intervals."""
    log(f"{len(runs)} runs at {len({float(f'{r.budget:.6g}') for r in runs})} budgets")
    # the exponent's interval is the most telling single number: whether "0.5" or "0.73" is inside it
    for m, f in iso.items():
        why = _no_interval(runs, f)
        log(f"IsoFLOPs ({m}): N_opt = {f.k:.3g} C^{f.a:.3f} " + (f"(no interval: {why})" if why else
            f"(a: 95% {np.percentile(f.boot[:, 1], 2.5):.3f}-{np.percentile(f.boot[:, 1], 97.5):.3f}, "
            f"{len(f.boot)} bootstrap refits)"))
        for c in predict_at:
            n, d = f.predict(c)
            (nl, nh), (dl, dh) = f.interval(c) if not why else ((0, 0), (0, 0))
            ni, di = ("", "") if why else (f" [{nl:.3g}, {nh:.3g}]", f" [{dl:.3g}, {dh:.3g}]")
            log(f"    C = {c:.0e}: N_opt = {float(n):.3g}{ni}, D_opt = {float(d):.3g}{di} ({float(d / n):.1f} "
                "tokens/parameter)")
    if par is not None:
        se = par.se
        log(f"parametric: L = {par.E:.3f}(+-{se['E']:.3f}) + {par.A:.4g}(+-{se['A']:.2g}) / N^{par.alpha:.3f}"
            f"(+-{se['alpha']:.3f}) + {par.B:.4g}(+-{se['B']:.2g}) / D^{par.beta:.3f}(+-{se['beta']:.3f})  "
            f"[{par.n_points} runs, fit + {len(par.boot)} bootstrap refits in {par.seconds:.1f}s]")
        # the exponents the law implies, comparable with the IsoFLOPs exponent above
        a = par.beta / (par.alpha + par.beta)
        log(f"    closed form: N_opt ~ C^{a:.3f}, D_opt ~ C^{1 - a:.3f}")
        for c in predict_at:
            n, d = par.optimal_allocation(c)
            (nl, nh), (dl, dh) = par.allocation_interval(c)
            log(f"    C = {c:.0e}: N_opt = {float(n):.3g} [{nl:.3g}, {nh:.3g}], D_opt = {float(d):.3g} [{dl:.3g}, "
                f"{dh:.3g}], loss {float(par.predict_loss(n, d)):.4f}")


def _no_interval(runs: list[Run], f: IsoFlopsFit) -> str:
    """Why an IsoFLOPs fit has no bootstrap interval ("" when it has one): its refits all landed on one value."""
    if len(f.boot) > 1 and np.ptp(f.boot[:, 1]) > 1e-9 * max(1.0, abs(f.a)):
        return ""
    fewest = min(len(rs) for rs in group_by_budget(runs).values())
    if fewest == 3:  # resampling 3 runs with replacement keeps 3 distinct sizes only as a permutation of them
        return ("a budget has only 3 runs, and the only resamples of them that keep 3 distinct sizes (each "
                "budget's fit needs 3) are the runs themselves; train >= 4 sizes per budget (5 is the default)")
    return f"all {len(f.boot)} bootstrap refits gave the same exponent"


def fit_all(runs: list[Run], n_bootstrap: int = 200, parametric: bool = True) -> tuple[dict, ParametricFit | None]:
    """Both IsoFLOPs methods and (optionally) the parametric law on the same runs. The parametric bootstrap
    is capped at 50 refits: each is an L-BFGS solve, and 50 already pins a standard error to ~10%."""
    iso = {m: fit_isoflops(runs, m, n_bootstrap=n_bootstrap) for m in ("argmin", "parabola")}
    par = None
    if parametric:
        par = fit_parametric_law([r.parameters for r in runs], [r.tokens for r in runs], [r.loss for r in runs],
                                 n_bootstrap=min(n_bootstrap, 50))
    return iso, par


def _warn_design(runs: list[Run], log=say):
    """Warnings for runs that cannot pin the five-parameter law down (the fit still runs: they are the user's)."""
    budgets = {float(f"{r.budget:.6g}") for r in runs}
    if len(runs) and len(budgets) == 1:
        log(f"warning: every run has the same compute budget ({budgets.pop():.3g} FLOPs): along one IsoFLOPs curve "
            "D = C / 6N moves with N, so the law's N and D terms are not separately identified and its "
            "predictions at other budgets are guesses; train runs at >= 2 budgets (better >= 4)")
    if 5 <= len(runs) < 10:
        log(f"warning: {len(runs)} runs for the parametric law's 5 parameters: the fit nearly interpolates them "
            "and its bootstrap intervals mean little (better >= 10 runs)")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path):
    """Lay out and write a matplotlib figure atomically (a killed command never leaves half a PNG)."""
    fig.tight_layout()
    with tk.atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=90, format="png")
    _pyplot().close(fig)


def plot_fits(runs: list[Run], iso: dict, par: ParametricFit | None, path, extrapolate_to: float | None = None,
              verify: dict | None = None, title: str = ""):
    """Two panels: (left) loss vs N on each IsoFLOPs curve with its parabola and the parametric law's
    curve at that budget; (right) the per-budget optima vs C, the fitted power laws extrapolated to
    `extrapolate_to` with 95% bootstrap bands, and the verification run if any."""
    plt = _pyplot()
    # left panel: the raw evidence. Each budget is one colour; solid = the parabola in ln N that approach 2
    # takes the vertex of, dotted = what approach 3's law says along the same budget (C = 6ND fixed).
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = group_by_budget(runs)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    for (c, rs), col in zip(groups.items(), colors):
        n = np.array([r.parameters for r in rs])
        l = np.array([r.loss for r in rs])
        ax1.scatter(n, l, color=col, s=18, label=f"C={c:.2g}")
        x = np.linspace(np.log(n.min()), np.log(n.max()), 50)
        coef = np.polyfit(np.log(n), l, 2)
        ax1.plot(np.exp(x), np.polyval(coef, x), color=col, lw=1)
        if par is not None:
            ax1.plot(np.exp(x), par.predict_loss(np.exp(x), c / (6 * np.exp(x))), color=col, lw=1, ls=":")
    ax1.set(xscale="log", xlabel="parameters N", ylabel="final loss", title="IsoFLOPs curves (dotted: parametric law)")
    ax1.legend(fontsize=7)
    # right panel: the prediction. Points = per-budget optima; lines = the fitted power laws carried out to
    # the largest budget asked for (extrapolation), shaded = 95% bootstrap band; star = the verified run.
    cs = np.array(list(groups))
    hi = max(extrapolate_to or 0, cs.max() * (verify["compute"] / cs.max() if verify else 1), cs.max())
    grid = np.logspace(np.log10(cs.min()), np.log10(hi), 60)
    for (m, f), col in zip(iso.items(), ("tab:blue", "tab:orange")):
        ax2.scatter([o[0] for o in f.optima], [o[1] for o in f.optima], color=col, s=20)
        ax2.plot(grid, f.predict(grid)[0], color=col, label=f"IsoFLOPs {m}: N ~ C^{f.a:.2f}")
        band = np.array([f.interval(c)[0] for c in grid])
        ax2.fill_between(grid, band[:, 0], band[:, 1], color=col, alpha=0.2)
    if par is not None:
        ax2.plot(grid, par.optimal_allocation(grid)[0], color="tab:green",
                 label=f"parametric: N ~ C^{par.beta / (par.alpha + par.beta):.2f}")
        band = np.array([par.allocation_interval(c)[0] for c in grid])
        ax2.fill_between(grid, band[:, 0], band[:, 1], color="tab:green", alpha=0.15)
    if verify:
        ax2.scatter([verify["compute"]], [verify["parameters"]], marker="*", s=120, color="red",
                    label=f"verified: loss {verify['actual']:.3f} vs predicted {verify['free']['predicted']:.3f}")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt", title="compute-optimal size")
    ax2.legend(fontsize=7)
    fig.suptitle(title)
    _save_fig(fig, path)


# ===== Appendix: benchmarks =====


def synthetic_law_data(n_points: int = 250, noise: float = 0.01, seed: int = 0, params=None):
    """(N, D, L) from a known law (default: Hoffmann et al.'s published E=1.69, A=406.4, B=410.7,
    alpha=0.34, beta=0.28) times log-normal noise, over N in [1e7, 1e10] and 2..200 tokens per parameter."""
    # multiplicative noise on L is additive on ln L, the space the fit works in; 1% is about the seed-to-
    # seed spread of real final losses
    E, A, B, al, be = params or (1.69, 406.4, 410.7, 0.34, 0.28)
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7, 10, n_points)
    D = N * 10 ** rng.uniform(np.log10(2), np.log10(200), n_points)
    L = (E + A / N ** al + B / D ** be) * np.exp(noise * rng.standard_normal(n_points))
    return N, D, L


def _scipy_peer(N, D, L, delta, starts):
    """Epoch AI's published recipe as the peer: scipy's L-BFGS-B from each start in turn."""
    import scipy.optimize as so
    x = [np.log(v) for v in (N, D, L)]

    def f(th):
        t = torch.from_numpy(th).reshape(1, 5).requires_grad_(True)
        v = _objective(t, *(torch.from_numpy(v) for v in x), delta).sum()
        v.backward()
        return float(v.detach()), t.grad.numpy().ravel().astype(np.float64)

    # the same objective and exact gradient as ours, so the comparison is only about the search strategy
    # (every start to convergence, one at a time) and not about the function being minimized
    best = min((so.minimize(f, s, jac=True, method="L-BFGS-B") for s in starts), key=lambda r: r.fun)
    return best


def bench_main(args):
    print(f"machine: {tk.machine_label()}; torch threads {torch.get_num_threads()}")
    # row 1: the fit's speed on 250 runs, grid included, and whether it recovers the law that made the data
    N, D, L = synthetic_law_data(250)
    data = tuple(torch.from_numpy(np.log(v)) for v in (N, D, L))
    # CPU time as well as wall time: on a shared machine the wall clock measures the neighbours too
    c0 = time.process_time()
    t0 = time.perf_counter()
    theta, f_ours = _fit_from_grid(init_grid(), data, 1e-3)
    t_ours, cpu_ours = time.perf_counter() - t0, time.process_time() - c0
    print(f"parametric fit, 250 points, full grid (4,500 starts): {t_ours:.2f}s wall, {cpu_ours:.2f}s CPU, "
          f"objective {f_ours:.6g}")
    fit = fit_parametric_law(N, D, L, n_bootstrap=50)
    print(f"  recovered E={fit.E:.3f} A={fit.A:.1f} B={fit.B:.1f} alpha={fit.alpha:.3f} beta={fit.beta:.3f} "
          f"(true 1.69, 406.4, 410.7, 0.34, 0.28); with 50 bootstrap refits {fit.seconds:.2f}s")
    # row 2: the peer. scipy is not a dependency; timing every K-th start and scaling to the full grid keeps
    # the bench short (the per-start cost hardly depends on the start)
    try:
        import scipy  # noqa: F401  (optional peer)
        starts = init_grid().numpy()[:: max(1, args.peer_stride)]
        t0, c0 = time.perf_counter(), time.process_time()
        r = _scipy_peer(N, D, L, 1e-3, starts)
        t_peer = (time.perf_counter() - t0) * len(init_grid()) / len(starts)
        cpu_peer = (time.process_time() - c0) * len(init_grid()) / len(starts)
        print(f"  peer (scipy L-BFGS-B from each start, Epoch AI's recipe): {len(starts)} starts timed, "
              f"{t_peer:.1f}s wall / {cpu_peer:.1f}s CPU extrapolated to the full grid, best objective {r.fun:.6g}; "
              f"ratio ours/peer {t_ours / t_peer:.3f} wall, {cpu_ours / cpu_peer:.3f} CPU")
    except ImportError:
        print("  (scipy not installed: peer row skipped)")
    # row 3 (--runs, e.g. CS336's 72 runs in isoflops_curves.json): both IsoFLOPs methods and the parametric law
    if args.runs is None:
        print("no --runs FILE (e.g. CS336's isoflops_curves.json): the IsoFLOPs rows are skipped")
        return
    # CS336's 72 runs give N and C only; D = C / 6N as the assignment intends
    runs = load_runs(args.runs)
    iso, par = fit_all(runs)
    print_fits(runs, iso, par)
    if args.plot:
        plot_fits(runs, iso, par, args.plot, extrapolate_to=1e24, title=f"{args.runs} ({len(runs)} runs)")
        print(f"plot: {args.plot}")


# ===== Command line =====


_FORMATS = """input formats for `fit`:
  JSON  a list of runs: [{"parameters": N, "compute_budget": C, "final_loss": L}, ...]
        (CS336's isoflops_curves.json); "tokens": D may replace or accompany "compute_budget"
        (missing one is derived from C = 6 N D)
  CSV   a header row, one run per row; columns named by --n-col, --loss-col and --d-col and/or --c-col
  a sweep folder (written by `sweep`): every finished run in it; several folders (shards) merge
"""


_SWEEP_DOC = """Train an IsoFLOPs sweep through train.py, fit both laws, optionally verify the prediction.
Each run's result is written atomically to <out>/runs/<key>.json: a killed sweep resumes by running the
same command again (finished runs are skipped, an unfinished one is retrained from step 0, a broken result
file is reported and rerun). --shard K/N on N machines with the same flags splits the runs with no
coordination; merge with `python scaling.py fit <out1> <out2> ...`. A second process on the same --out is
refused. Runs are fixed token budgets (steps), never wall clock: deterministic for a given --threads."""


def _list_of(kind):
    """An argparse `type=` for comma-separated numbers: a bad value becomes argparse's own one-line usage error
    (exit 2), naming the flag."""
    def parse(s):
        try:
            return [kind(x) for x in s.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {s!r}") from None
    return parse


_budget_list, _int_list = _list_of(float), _list_of(int)


def _shard(s):
    """'K/N' -> (K, N), 0 <= K < N: shards count from 0, as in data.py (Slurm: --array=0-{N-1})."""
    try:
        k, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/4), got {s!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {s}: expected K/N with 0 <= K < N (shards count from 0)")
    return (k, n)


def _add_run_flags(p, threads_help: str):
    """The flags of the commands that train: where the data cache is, CPU threads per run."""
    p.add_argument("--data-dir", default="data_cache", help="train.py's data cache (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help=threads_help)


def get_parser() -> argparse.ArgumentParser:
    p = tk.OneLineParser(prog="scaling.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Scaling laws: fit IsoFLOPs and parametric laws, run and verify sweeps, "
                                     "test muP learning-rate transfer. With no command: sweep --verify (the "
                                     "default sweep into runs/scaling, ~12 CPU-minutes).", epilog=_FORMATS)
    # one subcommand per job: sweep (train + fit + verify), fit (files or folders), lr-transfer (muP), bench,
    # shapes (the depth table)
    sub = p.add_subparsers(dest="cmd", parser_class=tk.OneLineParser)
    s = sub.add_parser("sweep", help="train an IsoFLOPs sweep through train.py (resumable, shardable), fit, verify",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=_SWEEP_DOC)
    s.add_argument("--out", default="runs/scaling", help="sweep folder (results, run folders, plots)")
    s.add_argument("--mode", choices=("separate", "branched"), default="separate",
                   help="separate runs per (N, D), or one WSD trunk per N with branched decays (MiniCPM)")
    s.add_argument("--compare-modes", action="store_true",
                   help="run both modes (folders <out>/separate and <out>/branched) and compare their fits")
    s.add_argument("--shard", type=_shard, default=None, help="K/N, 0 <= K < N: run only runs K, K+N, K+2N, ... "
                   "of the plan (shards count from 0, as in data.py)")
    s.add_argument("--verify", action="store_true", help="then print the predicted loss at --verify-factor x the "
                   "largest budget (written to <out>/verify.json first), train that optimum, add its actual loss")
    s.add_argument("--verify-factor", type=float, default=4.0, help="verification budget / largest swept budget")
    # one flag per SweepSpec field (same names with dashes), each with its default in --help
    s.add_config(SweepSpec, types=dict(budgets=_budget_list, depths=_int_list), note=" (default: {default})")
    # one thread per run by default: on 2 cores, two shards (or two users) can each run one
    _add_run_flags(s, "torch CPU threads per run (0: auto); fixed counts make results bitwise reproducible across "
                      "machines")
    s.add_argument("--device", default="cpu")
    # `fit` reads what others trained too: the CS336 JSON, any CSV with named columns, or sweep folders
    f = sub.add_parser("fit", help="fit laws to runs (JSON, CSV or sweep folders) and plot",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_FORMATS)
    f.add_argument("inputs", nargs="+", help="runs files (.json/.csv) and/or sweep folders")
    f.add_argument("--format", choices=("json", "csv"), default=None, help="default: from the file extension")
    for col, default in (("n", "parameters"), ("d", None), ("c", "compute_budget"), ("loss", "final_loss")):
        f.add_argument(f"--{col}-col", default=default, help="CSV column (default: %(default)s)")
    f.add_argument("--predict", type=_budget_list, default=[1e23, 1e24], help="budgets to predict N_opt, D_opt at")
    f.add_argument("--bootstrap", type=int, default=200)
    f.add_argument("--no-parametric", action="store_true", help="IsoFLOPs fits only")
    f.add_argument("--plot", default="scaling_fit.png")
    # lr-transfer's widths are d_model values (depth fixed by --num-layers); the smallest is muP's base width
    lt = sub.add_parser("lr-transfer", help="sweep the lr at several widths, standard parametrization vs muP")
    lt.add_argument("--out", default="runs/lr_transfer")
    lt.add_argument("--widths", type=_int_list, default=[32, 64, 128])
    lt.add_argument("--lrs", type=_budget_list, default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1],
                    help="learning rates (AdamW peak), comma-separated; widen it if a best lr sits at an end")
    lt.add_argument("--steps", type=int, default=150)
    lt.add_argument("--num-layers", type=int, default=2)
    _add_run_flags(lt, "torch CPU threads per run (0: auto)")
    # bench and shapes are read-only: they train nothing
    b = sub.add_parser("bench", help="fit speed (250 points, full grid); with --runs, a runs file's predictions")
    b.add_argument("--runs", default=None, metavar="FILE",
                   help="runs to fit and predict from, e.g. CS336's isoflops_curves.json (without it: rows skipped)")
    b.add_argument("--peer-stride", type=int, default=30, help="time the scipy peer on every K-th start")
    b.add_argument("--plot", default=None)
    a = sub.add_parser("shapes", help="the depth dial: N, 6N vs exact FLOPs per token")
    a.add_argument("--depths", type=_int_list, default=list(range(1, 13)))
    a.add_argument("--vocab-size", type=int, default=512)
    a.add_argument("--context-length", type=int, default=64)
    return p


# The commands. Each handler turns arguments into calls of the functions above and prints; ValueError and
# FileNotFoundError from bad input end as one line on stderr with exit status 2 (see main).


def _spec_from_args(args) -> SweepSpec:
    # every SweepSpec field that has a flag; fields without one keep their defaults
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(SweepSpec) if hasattr(args, f.name)}
    return SweepSpec(**kw)


def sweep_main(args):
    """`sweep`: prepare data once, run the sweep (this shard's share), and when every run is in, fit, print,
    optionally verify, and plot. With --compare-modes both modes run into sibling folders and are compared."""
    spec = _spec_from_args(args)  # a bad option fails here, before the lock and the data
    with sweep_lock(args.out):
        _sweep_locked(args, spec)


def _sweep_locked(args, spec):
    # the data pipeline runs once here (cached on disk); every run reads the same token files
    t0, data = time.time(), prepare_sweep_data(spec, args.data_dir)
    # the thread count is resolved once (auto mode times a workload; doing it per run would cost seconds and
    # could pick different counts for different runs, which changes results in the last bits)
    threads = T.set_cpu_threads(args.threads)
    modes = ("separate", "branched") if args.compare_modes else (args.mode,)
    plan, fits = plan_sweep(spec, data.tokenizer.vocab_size), {}
    for mode in modes:
        folder = Path(args.out) / mode if args.compare_modes else Path(args.out)
        print(f"{mode} sweep: {len(plan)} runs at {len(spec.budgets)} budgets into {folder}"
              + (f" (shard {args.shard[0]}/{args.shard[1]})" if args.shard else ""), flush=True)
        st = run_sweep(spec, folder, data, shard=args.shard, mode=mode, threads=threads, device=args.device)
        print(f"{mode}: ran {len(st['ran'])}, already done {len(st['skipped'])}; steps trained {st['steps_trained']:,} "
              f"(separate runs would take {st['steps_separate']:,})", flush=True)
        # predictions at --verify-factor x the largest budget: where --verify will check them
        fitted = fit_sweep(folder, data, len(plan), args.verify_factor * max(spec.budgets))
        if fitted is None:
            return
        fits[mode] = (*fitted[:3], folder, fitted[3])
    if args.compare_modes:
        _compare_modes(fits, spec)
    # verification and the plot use the first mode's fit (separate runs, when both modes ran)
    runs, iso, par, folder, par_known = fits[modes[0]]
    # the verification run is one more train.train call, recorded in <out>/verify.json (resumable too)
    ver = verify_prediction(spec, folder, data, runs, args.verify_factor, threads=threads, device=args.device,
                            iso=iso["parabola"], par=par, par_known=par_known) if args.verify else None
    plot_fits(runs, iso, par, folder / "fit.png", verify=ver, title=f"sweep {folder}")
    print(f"results in {folder}: runs/*.json (one per run), fit.png" + (", verify.json (predicted vs actual)" if ver
          else "") + f"; total {(time.time() - t0) / 60:.1f} min (the same command again resumes or reprints)")


def fit_main(args):
    """`fit`: runs from files and/or sweep folders (merged), both approaches, predictions, a plot."""
    folders, skipped = [Path(i) for i in args.inputs if Path(i).is_dir()], []
    runs = collect_results(folders, warn=skipped.append) if folders else []  # all at once: shards' duplicates merge
    for inp in args.inputs:
        if not Path(inp).is_dir():
            runs += load_runs(inp, args.format, args.n_col, args.d_col, args.c_col, args.loss_col, skipped=skipped)
    # a run with an impossible value (a negative N, a NaN loss) is reported by name and left out; the rest fit
    for msg in skipped:
        print(f"skipped: {msg}")
    if skipped:
        print(f"{len(skipped)} runs skipped, {len(runs)} fitted")
    _warn_design(runs)
    try:
        iso, par = fit_all(runs, n_bootstrap=args.bootstrap, parametric=not args.no_parametric)
    except ValueError as e:
        # runs that are not IsoFLOPs profiles (e.g. a CSV of (N, D) points with no shared budgets) still
        # serve approach 3; the reason approach 2 could not run is printed, not swallowed
        if args.no_parametric or not runs:
            raise
        # (the parametric fit needs no shared budgets: any spread of (N, D) points constrains it)
        print(f"IsoFLOPs fits skipped: {e}")
        iso, par = {}, fit_parametric_law([r.parameters for r in runs], [r.tokens for r in runs],
                                          [r.loss for r in runs], n_bootstrap=min(args.bootstrap, 50))
    print_fits(runs, iso, par, predict_at=args.predict)
    if iso:  # the plot extends the power laws to the largest budget asked about, so the extrapolation shows
        plot_fits(runs, iso, par, args.plot, extrapolate_to=max(args.predict), title=", ".join(args.inputs))
        print(f"plot: {args.plot}")


def lr_main(args):
    """`lr-transfer`: the SP vs muP learning-rate sweep, a table (rows: widths, columns: lrs), the spread
    of the best lr across widths (1.0x = perfect transfer), and a plot."""
    spec = SweepSpec()
    data = prepare_sweep_data(spec, args.data_dir)
    threads = T.set_cpu_threads(args.threads)
    res = lr_transfer(args.out, data, widths=args.widths, lrs=args.lrs, steps=args.steps, num_layers=args.num_layers,
                      threads=threads)
    print_lr_transfer(res, args.widths, args.lrs)
    plot_lr_transfer(res, Path(args.out) / "lr_transfer.png")
    print(f"plot: {Path(args.out) / 'lr_transfer.png'}")


def shapes_main(args):
    """`shapes`: the depth dial's table -- what one step of the dial does to N, and how far 6N is from the
    exact per-token count (the embedding lookup is free, attention is not counted by 6N)."""
    print(f"{'depth':>5s} {'d_model':>7s} {'layers':>6s} {'heads':>5s} {'d_ff':>5s} {'N':>12s} {'non-emb N':>12s} "
          f"{'6N':>12s} {'exact':>12s} {'exact/6N':>8s}")
    # exact/6N < 1 for tiny models (the input embedding is counted in N but costs no FLOPs), > 1 for large
    # ones (attention's T-dependent term, which 6N leaves out)
    for d in args.depths:
        cfg = model_config_for_depth(d, args.vocab_size, args.context_length)
        a = compute_accounting(cfg)
        print(f"{d:5d} {cfg.d_model:7d} {cfg.num_layers:6d} {cfg.num_heads:5d} {cfg.d_ff:5d} {a['parameters']:12,d} "
              f"{a['non_embedding']:12,d} {a['flops_6n']:12.4g} {a['flops_exact']:12.4g} {a['exact_over_6n']:8.3f}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.cmd is None:  # the README's first command: sweep, fit, predict, then verify the prediction
        args = parser.parse_args(["sweep", "--verify"])
        print(f"python scaling.py = python scaling.py sweep --verify: the default sweep into {args.out} (about 12 "
              "minutes of one CPU core; rerun to resume, finished runs are kept)", flush=True)
    for name, ok, allowed in _ARG_RULES:
        if getattr(args, name, None) is not None and not ok(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(args, name)!r}")
    # usage errors were already handled by OneLineParser; here, errors about the INPUT (a bad file, a budget too
    # small) get the same one-line treatment: they are the user's to fix, not bugs with a traceback
    handlers = {"sweep": sweep_main, "fit": fit_main, "lr-transfer": lr_main, "bench": bench_main,
                "shapes": shapes_main}
    try:
        handlers[args.cmd](args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        parser.exit(2, f"scaling.py {args.cmd}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
