"""
ddp.py -- Stage 5 of ScratchLM: training on many processes. Data parallelism, optimizer sharding, FSDP, and the
model-parallel splits: tensor, sequence, context (ring attention) and pipeline parallelism, on a device mesh.

The problem
-----------
One process trains at the speed of one device and holds the whole training state in one memory: parameters
(4 bytes each in fp32), gradients (4 more) and AdamW's two moments (8 more), i.e. 16 bytes per parameter before a
single activation. A 1.5B-parameter model needs 24 GB for that alone. Three ways out, all built here from scratch
on top of torch.distributed's collectives (the NCCL/gloo communication engines and the `torchrun` launcher, the
field's standard):

1. Data parallelism (DP). N processes ("ranks") each hold a full copy of the model and run forward/backward on
   1/N of the batch. Averaging the gradients across ranks (one all-reduce) gives exactly the gradient of the full
   batch, because the mean loss over B examples is the mean of the N per-rank means:
       grad L = (1/N) sum_r grad L_r          (each L_r a mean over B/N examples)
   so every rank takes the same optimizer step and the copies never drift apart. Cost: one all-reduce of the
   gradients per step (2 (N-1)/N * P * 4 bytes sent per rank with a ring), which we hide behind backward by
   launching it per parameter (`DDP`) or per bucket of parameters (`DDPBucketed`) as soon as gradients are ready.
2. Sharding (ZeRO). DP wastes memory: N identical copies of everything. `ShardedOptimizer` (ZeRO-1) keeps each
   parameter's optimizer state on one rank only (the "owner"), which steps it and broadcasts the new values:
   optimizer memory / N for the same communication volume. `FSDP` (ZeRO-3) goes all the way: each rank stores 1/N
   of every big weight; a layer's full weight is all-gathered just before the layer runs (and again in backward),
   then freed; its gradient is reduce-scattered so each rank receives only its own slice. Params, grads and
   optimizer state all / N, for 1.5x DP's communication (gather, gather, reduce-scatter vs all-reduce =
   reduce-scatter + all-gather).
3. Model parallelism. When one layer's activations or the whole model still do not fit, or a batch cannot grow
   further, split the model itself. Tensor parallelism (TP, Megatron) cuts every weight matrix across tp ranks that
   all see the same batch: two all-reduces of the activations per layer. Sequence parallelism (SP) also splits the
   activations between those matrices along the sequence, and ring attention (context parallelism) splits
   attention itself, passing K/V blocks around a ring. Pipeline parallelism (PP) gives each rank a run of layers
   and streams micro-batches through them (point-to-point sends; the price is the pipeline bubble,
   (p-1)/(m+p-1) of the time). A (dp, tp, pp) mesh combines them: TP inside a machine, PP and DP across.

What it costs: communication (bandwidth between devices is 10-100x below memory bandwidth, so it must overlap
with compute), one more way to hang (every rank must issue the same collectives in the same order), and care
with anything a single process decides alone -- batches, clipping norms, checkpoints, and when to stop.

Sources
-------
- Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training" (2020), arXiv:2006.15704:
  gradient buckets launched from autograd hooks, bucket order rebuilt from the observed order, no_sync.
- Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models" (2019),
  arXiv:1910.02054: sharding optimizer state (stage 1), gradients (2) and parameters (3).
- Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel" (2023), arXiv:2304.11277:
  gather-before-use, free-after-use, prefetching, mixed precision with fp32 master weights.
- Patarasuk & Yuan, "Bandwidth Optimal All-reduce Algorithms for Clusters of Workstations" (J. Parallel Distrib.
  Comput. 2009), and Gibiansky, "Bringing HPC Techniques to Deep Learning" (Baidu Research blog, 2017): the ring
  all-reduce; Sergeev & Del Balso, "Horovod" (2018), arXiv:1802.05799: ring all-reduce and tensor fusion in DL.
- Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour" (2017), arXiv:1706.02677: data
  parallel training as one large batch.
- NVIDIA nccl-tests, "Performance reported by NCCL tests" (PERFORMANCE.md): algorithm vs bus bandwidth.
- Stanford CS336 (Spring 2025), assignment 2: DDP with overlap, bucketing, and a sharded optimizer.
- Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism" (2019),
  arXiv:1909.08053: column/row-parallel layers, the f/g operators, vocabulary-parallel embedding and loss.
- Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), arXiv:2205.05198:
  sequence parallelism (all-gather / reduce-scatter in place of all-reduce).
- Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context" (2023),
  arXiv:2310.01889; Llama 3 team, "The Llama 3 Herd of Models" (2024), arXiv:2407.21783: context parallelism with
  the 2p-chunk causal load balancing; Dao, "FlashAttention-2" (2023), arXiv:2307.08691: the online softmax.
- Huang et al., "GPipe" (2018), arXiv:1811.06965: micro-batched pipelines and the bubble; Narayanan et al.,
  "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM" (2021), arXiv:2104.04473:
  the 1F1B schedule (PipeDream-Flush) and the (dp, tp, pp) composition.

Reading order
-------------
    1. the collectives, and a ring all-reduce written from send/recv
    2. data parallelism: NaiveDDP -> DDP (per-parameter async all-reduce, overlapped with backward)
    3. ShardedOptimizer (ZeRO-1), 4. FSDP (ZeRO-3 style) with prefetching and mixed precision
    5. tensor parallelism: f/g, column- and row-parallel layers, TP attention and MLP
    6. pipeline schedules as data and their bubble
  Menus: gradient buckets (DDPBucketed); torch's FSDP2 and DTensor TP (the fast paths); sequence parallelism;
  model parallelism (whole TP / pipeline-stage models, the vocabulary-parallel embedding and cross-entropy, the
  pipeline executor and its timeline); context parallelism (ring attention, and a whole model around it).
  Appendix: process groups and the launcher, training on N ranks (train.py's loop with this file's hooks, a
  budget all ranks obey), the (dp, tp, pp) mesh and its planner, consolidated checkpoints; benchmarks.
  Command line:  torchrun --nproc_per_node=N ddp.py [preset] [train.py's options] [--strategy S]
                 torchrun --nproc_per_node=N ddp.py ... --max-steps S --tp T [--sp] | --pp P  (model parallel)
                 torchrun --nproc_per_node=N ddp.py ... --tp T [--sp] --tp-impl dtensor   (TP on torch's DTensor)
                 torchrun ddp.py          (the distributed demo: train.py's demo on every rank torchrun starts)
                 python ddp.py            (no torchrun: spawns the ranks itself, --nproc N)
                 python ddp.py bench | bench-comm | tour | plan
"""


import argparse
import collections
import contextlib
import dataclasses
import datetime
import itertools
import math
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import model as M
import tokenizer as tk
import train as T
from tokenizer import atomic_write_json, machine_label


# ---- 1. The collectives ----
# Four operations carry all of parallel training. With N ranks each holding a tensor x_r of P elements:
#   all-reduce      every rank ends with sum_r x_r                       (DP: average the gradients)
#   all-gather      every rank ends with concat_r x_r (N*P elements)      (FSDP: rebuild a sharded weight)
#   reduce-scatter  rank r ends with the r-th 1/N chunk of sum_r x_r     (FSDP: each rank's slice of the grad)
#   broadcast       every rank ends with rank src's x                    (init; ZeRO-1: owner sends new params)
# all-reduce = reduce-scatter followed by all-gather, and that is how the ring algorithm runs it: the tensor is cut
# into N chunks; in N-1 steps each rank sends one chunk to its right neighbour and adds the chunk arriving from the
# left (reduce-scatter: each rank now owns one fully summed chunk), then in N-1 more steps the summed chunks travel
# around the ring (all-gather). Each rank sends 2(N-1) chunks of P/N elements: 2(N-1)/N * P, almost independent of
# N -- that is why all-reduce scales. `ring_all_reduce` below is that algorithm written with point-to-point
# send/recv, to see it work; the library's all_reduce does the same in C++ (NCCL also uses trees).
#
# Bandwidth reporting (nccl-tests convention), for a tensor of S bytes taking t seconds:
#   algorithm bandwidth  algbw = S / t                      (what the caller sees)
#   bus bandwidth        busbw = algbw * 2(N-1)/N  (all-reduce)   or  algbw * (N-1)/N  (all-gather, reduce-scatter)
# busbw is what each link actually carried, so it is comparable to the hardware's link speed at any N.


def ring_all_reduce(tensor):
    """Sum `tensor` across ranks in place with the ring algorithm, from send/recv only (readable reference; the
    library's dist.all_reduce is the fast path and a test checks both agree)."""
    # Worked example, N = 3 ranks, chunks a, b, c: after the reduce-scatter phase rank 0 holds the full sum of
    # chunk b, rank 1 of c, rank 2 of a; the all-gather phase then forwards those finished chunks twice around
    # the ring, so every rank ends with all three sums. Each step every rank sends AND receives one chunk, so all
    # links are busy at once: time ~ 2 (N-1) (alpha + (P/N) / bandwidth) in the alpha-beta model.
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return tensor
    chunks = list(tensor.view(-1).tensor_split(world))   # N chunks of ~P/N elements (views into `tensor`)
    right, left = (rank + 1) % world, (rank - 1) % world
    recv_buf = torch.empty_like(chunks[0])
    # phase 0, reduce-scatter: at step s rank r sends chunk (r - s) and adds the arriving chunk (r - s - 1) into its
    # own; after N-1 steps rank r holds the complete sum of chunk (r + 1). Phase 1, all-gather: the finished chunks
    # travel around the ring once more, one step ahead.
    for phase in (0, 1):
        for s in range(world - 1):
            send_idx, recv_idx = (rank + phase - s) % world, (rank + phase - s - 1) % world
            incoming = recv_buf[: chunks[recv_idx].numel()]        # chunks differ by one element when N ∤ P
            # non-blocking send first: if every rank did a blocking send, all N would wait for a receiver at once
            send = dist.isend(chunks[send_idx].contiguous(), right)
            dist.recv(incoming, left)
            send.wait()
            if phase == 0:
                chunks[recv_idx].add_(incoming)                    # the partial sum grows by one rank's chunk
            else:
                chunks[recv_idx].copy_(incoming)                   # a finished sum: overwrite, do not add
    return tensor


# ---- 2. Data parallelism, three ways ----
# Same interface for all (and for torch's own DDP through `TorchDDP`, the benchmarks' peer):
#     model = Wrapper(module)                # broadcasts rank 0's parameters: all replicas start identical
#     loss = loss_fn(model(x_my_shard)); loss.backward()
#     model.finish_gradient_synchronization()  # afterwards every p.grad is the average over ranks
#     optimizer.step()
# Why overlap matters: backward computes the last layers' gradients first. If their all-reduce starts right away,
# it travels while backward is still busy with the earlier layers, and only the first layers' reduction is left
# when backward ends: the step costs max(compute, communication) instead of their sum -- if the reductions start
# in time and in an order every rank agrees on, which is what the hooks and buckets below are about.
# Tied weights appear once in module.parameters(): reduced once, with the sum of both uses' gradients. Frozen
# parameters have no gradient and are skipped. A trainable parameter without a gradient on this rank this step (an
# MoE expert nobody routed to) is reduced as zeros: the other ranks may have one, and every rank must issue the
# same collectives in the same order.


def broadcast_module_(module, src=0):
    """Make every rank's parameters and buffers equal to rank src's (different seeds -> different inits)."""
    # Identical starting points + identical averaged gradients + the same optimizer = identical replicas at every
    # step, without ever comparing them. Buffers too: e.g. RoPE's cos/sin tables or a norm's running statistics.
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


class NaiveDDP(nn.Module):
    """The baseline: after backward, one blocking all-reduce per parameter. Correct and simple, but nothing is
    sent until backward has finished, so compute and communication add up, and many small messages each pay
    the network's latency: t_backward + sum over parameters of (alpha + bytes / beta)."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        broadcast_module_(module)
        self._params = [p for p in module.parameters() if p.requires_grad]  # each once (tied too), in order
        self.comm_wait_seconds = 0.0        # time spent blocked in finish_gradient_synchronization (bench)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)  # the plain model's: the data-parallel work happens after backward

    @contextlib.contextmanager
    def no_sync(self):  # gradient accumulation: nothing to skip, we only communicate when asked
        yield

    def finish_gradient_synchronization(self):
        t0 = time.perf_counter()
        had_grad = [p.grad is not None for p in self._params]
        for p in self._params:
            if p.grad is None:          # unused on this rank this step: contribute zeros (same collectives)
                p.grad = torch.zeros_like(p)
            # sum over ranks, then / N: the mean of the per-rank mean gradients = the full-batch gradient
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)
        _clear_globally_unused(self._params, had_grad)
        self.comm_wait_seconds += time.perf_counter() - t0


class DDP(NaiveDDP):
    """NaiveDDP with the communication overlapped with backward: autograd calls a hook on each parameter the
    moment its gradient is final (`register_post_accumulate_grad_hook`), and the hook launches an asynchronous
    all-reduce of it; `finish_gradient_synchronization` only waits for the handles and divides by N.
    The ordering rule (the subtle part): collectives are matched across ranks by the order they are issued in, so
    reductions launch in a fixed order of "buckets" (here one parameter each): a ready bucket is launched only
    once all buckets before it have been. The order starts as reverse registration order (backward visits the last
    layers first) and is rebuilt once, after the first step, from the order rank 0 saw gradients arrive in
    (broadcast so all ranks agree), as torch's DDP does."""

    def __init__(self, module):
        super().__init__(module)            # NaiveDDP's: broadcast rank 0's weights, list the trainable params
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._build_buckets(list(reversed(range(len(self._params)))))   # backward runs the layers last to first
        self._sync_enabled = True
        self._observed_order = []           # parameter indices in the order their hooks fired (first step)
        self._order_rebuilt = False
        for p in self._params:
            # fires after autograd has ADDED this backward's contribution to p.grad (for a tied weight: after
            # both uses), i.e. when p.grad is final for this backward
            p.register_post_accumulate_grad_hook(self._on_grad_ready)

    def _build_buckets(self, order):
        """Parameter indices, in launch order, grouped into buckets: here one parameter each (DDPBucketed, in the
        menu, groups them)."""
        self._set_buckets([[i] for i in order])

    def _set_buckets(self, buckets):
        self._buckets = buckets
        self._bucket_of = {i: b for b, idxs in enumerate(buckets) for i in idxs}
        self._reset_step_state()

    def _reset_step_state(self):
        # per step: how many of each bucket's gradients are final, the in-flight handles, and the next bucket in
        # launch order (buckets launch strictly in order, even if a later one fills up first)
        self._ready_count = [0] * len(self._buckets)
        self._handles = [None] * len(self._buckets)
        self._next_to_launch = 0

    def _launch(self, b):
        # Runs inside backward (a hook, on the autograd thread), so it is cheap: copy, launch the non-blocking
        # all-reduce, return; gloo/NCCL move the bytes on their own threads/streams while autograd goes on.
        for i in self._buckets[b]:  # a parameter unused on this rank this step: contributes zeros (ordering rule)
            if self._params[i].grad is None:
                self._params[i].grad = torch.zeros_like(self._params[i])
        tensor = self._pack(b)
        self._handles[b] = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)

    def _pack(self, b):
        return self._params[self._buckets[b][0]].grad       # one parameter: reduce its .grad in place, no copy

    def _unpack(self, b):
        self._params[self._buckets[b][0]].grad.div_(self.world_size)

    def _launch_ready_in_order(self):
        """Launch every bucket that is complete AND whose predecessors are launched (the ordering rule)."""
        while self._next_to_launch < len(self._buckets) and \
                self._ready_count[self._next_to_launch] == len(self._buckets[self._next_to_launch]):
            self._launch(self._next_to_launch)
            self._next_to_launch += 1

    def _on_grad_ready(self, p):
        """Autograd hook: p.grad is final for this backward. Count it; launch whatever became launchable."""
        if not self._sync_enabled:     # inside no_sync(): just let the gradient accumulate in p.grad
            return
        i = self._index[id(p)]
        if not self._order_rebuilt:
            self._observed_order.append(i)
        self._ready_count[self._bucket_of[i]] += 1
        self._launch_ready_in_order()

    @contextlib.contextmanager
    def no_sync(self):
        """Gradient accumulation: backward inside this context only accumulates into .grad; the backward of the
        last micro-batch (outside it) reduces the accumulated sum once."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def finish_gradient_synchronization(self):
        # Backward is over; only the tail of the communication is still in flight (ideally just the last bucket):
        # waiting here is the communication we failed to hide.
        t0 = time.perf_counter()
        had_grad = [p.grad is not None for p in self._params]
        # buckets whose parameters got no gradient on this rank were never launched: launch them now, in order
        for b in range(len(self._buckets)):
            self._ready_count[b] = len(self._buckets[b])
        self._launch_ready_in_order()
        for b in range(len(self._buckets)):
            self._handles[b].wait()
            self._unpack(b)                # the reduced SUM -> the mean, in each .grad
        _clear_globally_unused(self._params, had_grad)
        self.comm_wait_seconds += time.perf_counter() - t0
        if not self._order_rebuilt:    # the true arrival order is known now: rebuild the buckets, once
            self._rebuild_from_observed_order()
        self._reset_step_state()

    def _rebuild_from_observed_order(self):
        """After the first synchronized step: re-bucket in rank 0's observed gradient-arrival order."""
        # Registration order only guesses the backward order (a tied embedding/head, a module used twice, modules
        # registered in another order than they run). Buckets in true arrival order fill, and launch, as early as
        # possible. Rank 0's order is broadcast: every rank must build the same buckets.
        self._order_rebuilt = True
        seen = list(dict.fromkeys(self._observed_order))
        order = seen + [i for i in reversed(range(len(self._params))) if i not in set(seen)]
        box = [order]
        dist.broadcast_object_list(box, src=0)
        self._build_buckets(box[0])
        self._observed_order = []


# ---- 3. ShardedOptimizer (ZeRO stage 1) ----
# In DP every rank runs the same optimizer step on the same gradients: N copies of AdamW's m and v (8 bytes per
# parameter). ZeRO-1 assigns each parameter to one owner rank; only the owner keeps its state and updates it, then
# the owner broadcasts the new values. Optimizer memory per rank: ~1/N. Communication: the broadcasts move each
# parameter once, like the all-gather half of an all-reduce (ZeRO-1 proper would also replace the gradient
# all-reduce by a reduce-scatter; we keep it composable with any of the DP wrappers above).
# Parameters are whole (not sliced), so any optimizer works unchanged, including Muon (which needs whole matrices);
# balance comes from a greedy "largest parameter to the least loaded rank" assignment, deterministic on all ranks.
#
# Memory per rank for P parameters in fp32 with AdamW (bytes): DP 4P + 4P + 8P = 16P; ZeRO-1 4P + 4P + 8P/N;
# ZeRO-2 (gradients sharded too, not built here) 4P + (4P + 8P)/N; ZeRO-3 / FSDP 16P/N (+ the gathered layers).
# At N = 8 that is 16P, 9P, 5.5P, 2P: the optimizer state is the largest single item, so ZeRO-1 alone nearly
# halves the memory for the same communication volume as DP.


def assign_shards(sizes, world, load=None):
    """Greedy balanced partition: owner rank of each item (largest first to the lightest rank; ties -> lowest
    index), starting from an existing per-rank `load`. Deterministic, so every rank computes the same answer."""
    # Largest-first greedy ("LPT" scheduling) is within 4/3 of the best possible max load; for a transformer's
    # parameter sizes (many equal matrices) it is close to perfect balance.
    load = list(load) if load is not None else [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO-1: `ShardedOptimizer(params, optimizer_cls, **kwargs)` behaves like `optimizer_cls(params, **kwargs)`
    (param_groups, lr schedules writing group["lr"], zero_grad) but holds state for this rank's parameters only.
    `state_dict()` is collective and returns the consolidated state of the equivalent unsharded optimizer, so a
    checkpoint written at one world size loads at any other (and into a plain optimizer)."""

    def __init__(self, params, optimizer_cls, **kwargs):
        self.optimizer_cls = optimizer_cls
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._all_params = []       # every parameter, in order (global index = position here)
        self._owner = []            # global index -> owner rank
        self._local_groups = []     # per param group: the group dict of the local optimizer (or None)
        self.local_optimizer = None  # optimizer_cls over this rank's parameters only: the only state it holds
        super().__init__(params, kwargs)  # calls add_param_group for each group
        local = [g for g in self._local_groups if g is not None]
        if local:
            self.local_optimizer = optimizer_cls(local, **kwargs)
            # the local optimizer copies the group dicts; keep references to its own so we can sync hyperparams
            it = iter(self.local_optimizer.param_groups)
            self._local_groups = [next(it) if g is not None else None for g in self._local_groups]

    def add_param_group(self, param_group):
        # torch.optim.Optimizer's constructor calls this once per group: the outer optimizer keeps every parameter
        # (so lr schedules and zero_grad see them all); the local optimizer gets only the ones this rank owns
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        start = len(self._all_params)
        self._all_params.extend(group["params"])
        # balance this group's parameters on top of the load earlier groups already put on each rank
        load = [0] * self.world_size
        for p, r in zip(self._all_params, self._owner):
            load[r] += p.numel()
        self._owner.extend(assign_shards([p.numel() for p in group["params"]], self.world_size, load))
        mine = [p for i, p in enumerate(group["params"]) if self._owner[start + i] == self.rank]
        local_group = dict({k: v for k, v in group.items() if k != "params"}, params=mine)
        if mine and self.local_optimizer is not None:    # a group added after construction
            self.local_optimizer.add_param_group(local_group)
            local_group = self.local_optimizer.param_groups[-1]
        self._local_groups.append(local_group if mine else None)

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        # 1. every rank already holds the averaged gradient of every parameter (a DP wrapper did the all-reduce);
        # 2. each rank updates only the parameters it owns, with the wrapped optimizer's own update rule;
        # 3. the owners broadcast the new values, after which all replicas are identical again.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.local_optimizer is not None:
            # train.py's schedule writes group["lr"] into OUR param_groups each step; copy every hyperparameter
            # to the local optimizer's groups before it steps (else the shards would train at the initial rate)
            for group, local in zip(self.param_groups, self._local_groups):
                if local is not None:
                    local.update({k: v for k, v in group.items() if k != "params"})
            self.local_optimizer.step(**kwargs)
        self._broadcast_params()
        return loss

    def _broadcast_params(self):
        """Each owner sends its freshly updated parameters: one flat broadcast per (owner, dtype)."""
        # Every rank walks the owners in the same order (0..N-1) and the dtypes in sorted order, so the N
        # broadcasts pair up. Volume: every parameter crosses the network once per step, like the all-gather
        # half of an all-reduce.
        for r in range(self.world_size):
            owned = [p for p, o in zip(self._all_params, self._owner) if o == r]
            for dtype in sorted({p.dtype for p in owned}, key=str):
                # the owner packs its parameters into one flat tensor (one message); the others receive into an
                # empty buffer of the same size and unpack it into their copies
                ps = [p for p in owned if p.dtype == dtype]
                flat = torch.cat([p.detach().reshape(-1) for p in ps]) if r == self.rank else \
                    torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device)
                dist.broadcast(flat, src=r)
                if r != self.rank:
                    offset = 0
                    for p in ps:
                        p.data.view(-1).copy_(flat[offset: offset + p.numel()])
                        offset += p.numel()

    # (zero_grad is the base class's, over all parameters: every rank computed and all-reduced every gradient)
    def local_state_bytes(self):
        """Bytes of optimizer state tensors held by this rank."""
        if self.local_optimizer is None:
            return 0
        return sum(t.numel() * t.element_size() for s in self.local_optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t))

    def state_dict(self):
        """Collective. The state dict of the equivalent unsharded `optimizer_cls(params)` (state keyed by global
        parameter index, tensors on CPU), on every rank; rank 0 saves it. See consolidated_state_dict."""
        return consolidated_state_dict(self)

    def load_state_dict(self, state_dict):
        """Load a consolidated (unsharded-format) state dict written at any world size: keep our shard's part."""
        load_consolidated_state_dict(self, state_dict)


# ---- 4. FSDP (ZeRO stage 3 style): shard the weights themselves ----
# Every Linear and Embedding weight W of shape (R, C) is padded to a multiple of N rows and cut into N row blocks;
# rank r keeps block r as its Parameter `weight_shard` (ceil(R/N), C), and only that block has a gradient and
# optimizer state. Small parameters (norm gains, biases) stay replicated; their gradients are all-reduced as in DP.
#
# Each use of a sharded weight runs through an autograd Function:
#   forward:  W = all_gather(shards)  (cast to the compute dtype first: fp16/bf16 halves the bytes on the wire)
#             y = x W^T  (Linear)  or  y = W[ids]  (Embedding);  free W;  save only x (or ids)
#   backward: W = all_gather(shards) again (Linear needs it for dL/dx = dL/dy W; Embedding does not)
#             dL/dW = dL/dy^T x  (full (R, C) on every rank, each from its own micro-batch)
#             reduce_scatter(dL/dW) -> rank r receives block r of sum_r dL/dW_r, divided by N later
# Memory per rank: params + grads + optimizer state of 1/N of the weights, plus ONE or two full weights alive at a
# time (the current layer and the prefetched next one). Prefetch: the order in which weights are used is recorded on
# the first forward; afterwards, while layer i computes, the all-gather for layer i+1 (forward) or i-1 (backward) is
# already in flight. Tied weights (embedding = LM head) are one shard used twice: both uses gather it and both
# reduce-scatters add into the same shard's gradient.
# Mixed precision: master weights, gradients and optimizer stay fp32 (small updates to large weights vanish in
# fp16's 10-bit mantissa); compute and gathers use compute_dtype; gradients are reduced in fp32.
#
# What it costs: every weight crosses the network three times per step (gather in forward, gather in backward,
# reduce-scatter of its gradient): 3 (N-1)/N * 4P bytes per rank, 1.5x DP's all-reduce. The gathers sit on the
# critical path unless the prefetch hides them behind the previous layer's compute, which needs layers big
# enough that their matmuls take longer than their weights' transfer -- true for large models on fast links,
# not for the tiny models a CPU test runs.


class _ShardedWeight:
    """One (R, C) weight kept as this rank's block of rows."""
    # Rows, not columns: row r of a Linear weight is output feature r and row r of an Embedding is token r, and a
    # row block is contiguous in memory, so all-gather's concatenation of the N blocks IS the (padded) weight.

    def __init__(self, name, weight, rank, world):
        self.name = name
        self.full_shape = tuple(weight.shape)
        self.rows = -(-weight.shape[0] // world)                 # ceil(R / N) rows per rank
        self.world = world
        self.shard = nn.Parameter(self.block(weight.detach(), rank).clone(), requires_grad=weight.requires_grad)

    def padded_shape(self):
        return (self.rows * self.world,) + self.full_shape[1:]

    def block(self, full, rank):
        """Rank's (rows, C) block of a full (R, C) tensor (the weight, or an optimizer moment of its shape). R is
        padded up to N * rows with zero rows (e.g. vocab 50257 over 8 ranks): collectives need equal-sized
        pieces; the padding rows are never read (sliced off after each gather)."""
        padded = full.new_zeros(self.padded_shape())
        padded[: self.full_shape[0]] = full
        return padded[rank * self.rows: (rank + 1) * self.rows]


class _FSDPLinearFn(torch.autograd.Function):
    """y = x W^T with W gathered for this use only. `shard` is passed (though unused) so that autograd connects
    the output to the shard Parameter and calls backward for it; the shard's gradient arrives through the
    reduce-scatter instead of the return value."""

    @staticmethod
    def forward(ctx, x, shard, fsdp, sw, pos):
        W = fsdp._acquire(sw, pos, +1)                           # (R, C) in compute dtype
        x_in = x.to(W.dtype)
        y = F.linear(x_in, W)                                    # (..., R) = x W^T
        fsdp._release(W)
        ctx.save_for_backward(x_in)     # only the input is kept: W is gathered again in backward
        ctx.fsdp, ctx.sw, ctx.pos, ctx.x_dtype = fsdp, sw, pos, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (x_in,) = ctx.saved_tensors
        fsdp, sw = ctx.fsdp, ctx.sw
        W = fsdp._acquire(sw, ctx.pos, -1)
        grad_y = grad_y.to(W.dtype)
        grad_x = (grad_y @ W).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None   # (..., C)
        fsdp._release(W)
        if ctx.needs_input_grad[1]:
            R, C = sw.full_shape
            grad_W = grad_y.reshape(-1, R).t() @ x_in.reshape(-1, C)                   # (R, C)
            fsdp._reduce_scatter_grad(sw, grad_W)
        return grad_x, None, None, None, None  # the shard's grad is written by finish_gradient_synchronization


class _FSDPEmbeddingFn(torch.autograd.Function):
    """y = W[ids]. Backward needs no weight at all (dL/dW is a scatter-add of dL/dy into the used rows), so an
    embedding is gathered once per step, in forward."""

    @staticmethod
    def forward(ctx, ids, shard, fsdp, sw, pos):
        W = fsdp._acquire(sw, pos, +1)
        y = F.embedding(ids, W)                                  # (..., C)
        fsdp._release(W)
        ctx.save_for_backward(ids)
        ctx.fsdp, ctx.sw = fsdp, sw
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (ids,) = ctx.saved_tensors
        sw = ctx.sw
        if ctx.needs_input_grad[1]:
            R, C = sw.full_shape
            grad_W = torch.zeros(R, C, dtype=torch.float32, device=grad_y.device)
            grad_W.index_add_(0, ids.reshape(-1), grad_y.reshape(-1, C).float())        # scatter-add rows
            ctx.fsdp._reduce_scatter_grad(sw, grad_W)
        return None, None, None, None, None


class FSDP(nn.Module):
    """`FSDP(module, compute_dtype=None)`: Linear/Embedding weights sharded by rows across ranks, gathered per use
    with prefetch, gradients reduce-scattered; other parameters replicated. Same training interface as the DP
    wrappers: forward, backward, `finish_gradient_synchronization()`, optimizer over `fsdp.parameters()`."""

    def __init__(self, module, compute_dtype=None):
        super().__init__()
        if compute_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"compute_dtype must be None, float32, float16 or bfloat16, got {compute_dtype}")
        self.module = module
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.compute_dtype = compute_dtype
        broadcast_module_(module)
        _remember_full_names(self, module)  # (plumbing: checkpoints keep the unsharded model's names)
        sharded = {}                        # id(original weight) -> its _ShardedWeight
        replicated_modules = _data_dependent_modules(module)   # MoE experts stay replicated (plumbing)
        # Replace each Linear/Embedding's full weight by this rank's row block. Sharding happens in place, on the
        # module itself, so the model's own forward code runs unchanged: only each layer's forward is swapped for
        # one that gathers the weight first. A weight shared by two modules (tied) becomes ONE shard.
        for name, m in list(module.named_modules()):
            kind = _shardable_kind(m)
            if kind is None or id(m) in replicated_modules:
                continue
            w = m._parameters.get("weight")
            if w is None or w.dim() != 2:
                raise ValueError(f"FSDP: {name} has no 2-D weight Parameter to shard")
            sw = sharded.get(id(w))
            if sw is None:
                sw = sharded[id(w)] = _ShardedWeight(name + ".weight", w, self.rank, self.world_size)
            del m._parameters["weight"]                 # the module no longer holds the full weight ...
            m.register_parameter("weight_shard", sw.shard)  # ... only its block of rows
            m.forward = self._make_forward(m, kind, sw)
        _index_full_names(self, sharded)    # (plumbing) and drop our references to the full weights
        self._sharded = list(sharded.values())
        w = None                            # (the last reference to a full weight in this frame)
        shard_ids = {id(sw.shard) for sw in self._sharded}
        self._replicated = [p for p in module.parameters() if p.requires_grad and id(p) not in shard_ids]
        self._pending_gathers = {}      # id(shard) -> [(full buffer, work, source)] in issue order
        self._pending_reductions = []   # (shard, grad block, full padded grad, work)
        # the order of weight uses, recorded on the first forward: [(sharded weight, kind)], indexed by use number
        self._sequence, self._recording, self._cursor = None, [], 0
        self.gathered_bytes, self.peak_gathered_bytes = 0, 0   # full weights alive right now / at most (memory)
        self.comm_wait_seconds = 0.0    # time blocked waiting for gathers / reduce-scatters (bench)

    def _make_forward(self, m, kind, sw):
        """The forward that replaces module m's: gather its weight for this use, compute, free (bias added after,
        replicated like the other small parameters)."""
        fn = _FSDPLinearFn if kind == "linear" else _FSDPEmbeddingFn

        # replaces the module's forward: the same computation, with the weight gathered for this use only
        def forward(x):
            pos = self._cursor          # use number within this forward pass (a tied weight has two)
            self._cursor += 1
            if self._sequence is None:  # first forward: record which weight use number `pos` needs
                self._recording.append((sw, kind))
            y = fn.apply(x, sw.shard, self, sw, pos)
            bias = getattr(m, "bias", None) if kind == "linear" else None
            return y + bias.to(y.dtype) if bias is not None else y
        return forward

    # -- gathers with prefetch ---------------------------------------------------------------------------------
    def _start_gather(self, sw):
        # asynchronous all-gather of the N row blocks into one (N * rows, C) buffer; the handle is queued and
        # waited for by _acquire when the layer actually needs the weight
        dtype = self.compute_dtype or sw.shard.dtype
        source = sw.shard.detach().to(dtype)                      # (rows, C): this rank's block, cast for the wire
        full = torch.empty(sw.padded_shape(), dtype=dtype, device=source.device)
        work = dist.all_gather_single(full, source, async_op=True)
        self._pending_gathers.setdefault(id(sw.shard), []).append((full, work, source))
        self.gathered_bytes += full.numel() * full.element_size()
        self.peak_gathered_bytes = max(self.peak_gathered_bytes, self.gathered_bytes)

    def _acquire(self, sw, pos, direction):
        """Full weight for use number `pos` (waits for its gather); launches the gather of the neighbouring use in
        execution order (pos+1 in forward, pos-1 in backward) so it travels while this layer computes."""
        # Every rank runs the same layers in the same order, so every rank issues the same gathers in the same
        # order (the rule that keeps collectives paired). Memory: at most the current and the prefetched weight
        # are alive at once, plus whatever autograd is still holding.
        if not self._pending_gathers.get(id(sw.shard)):   # not prefetched (first use, or the first step)
            self._start_gather(sw)
        # prefetch one use ahead in execution order: forward runs uses 0, 1, 2, ...; backward runs them in
        # reverse, so the neighbour is pos + 1 in forward and pos - 1 in backward
        if self._sequence is not None:
            nxt = pos + direction
            if 0 <= nxt < len(self._sequence):
                nsw, nkind = self._sequence[nxt]
                if direction > 0 or nkind == "linear":  # an Embedding's backward needs no weight
                    self._start_gather(nsw)
        # the oldest pending gather of this weight is the one for this use (a tied weight can have two in flight)
        full, work, _ = self._pending_gathers[id(sw.shard)].pop(0)
        t0 = time.perf_counter()
        work.wait()                      # exposed communication: the prefetch did not finish in time
        self.comm_wait_seconds += time.perf_counter() - t0
        return full[: sw.full_shape[0]]

    def _release(self, W):
        # bookkeeping only: the gathered weight is freed when the last reference to it goes (right after this
        # layer's matmul in forward; autograd saved only the input)
        base = W._base if W._base is not None else W
        self.gathered_bytes -= base.numel() * base.element_size()

    def _drain_gathers(self):
        """Wait for (and drop) prefetches that were not used (e.g. a layer whose backward did not run)."""
        for lst in self._pending_gathers.values():
            for full, work, _ in lst:
                work.wait()
                self.gathered_bytes -= full.numel() * full.element_size()
        self._pending_gathers = {}

    # -- gradients ---------------------------------------------------------------------------------------------
    def _reduce_scatter_grad(self, sw, grad_W):
        # grad_W (R, C) is this rank's gradient of the FULL weight from its own micro-batch. reduce-scatter sums
        # the N of them and hands rank r only rows [r*rows, (r+1)*rows): half the bytes of an all-reduce, and no
        # rank ever stores the full summed gradient. Asynchronous: completed in finish_gradient_synchronization.
        padded = torch.zeros(sw.padded_shape(), dtype=torch.float32, device=grad_W.device)
        padded[: sw.full_shape[0]] = grad_W                      # reduce in fp32 whatever the compute dtype
        block = torch.empty(sw.shard.shape, dtype=torch.float32, device=grad_W.device)
        work = dist.reduce_scatter_single(block, padded, op=dist.ReduceOp.SUM, async_op=True)
        self._pending_reductions.append((sw.shard, block, padded, work))

    def _complete_reductions(self):
        # Wait for every reduce-scatter launched during backward and turn each summed block into the mean
        # gradient of this rank's rows. A weight used twice (tied embedding/head) has two blocks: they add up, as
        # autograd would add the two uses' gradients of one full weight.
        for shard, block, _, work in self._pending_reductions:
            t0 = time.perf_counter()
            work.wait()
            self.comm_wait_seconds += time.perf_counter() - t0
            block = block.div_(self.world_size).to(shard.dtype)
            if shard.grad is None:
                shard.grad = block
            else:
                shard.grad.add_(block)
        self._pending_reductions = []

    def forward(self, *args, **kwargs):
        self._complete_reductions()   # (gradient accumulation: fold the previous micro-batch's blocks in)
        self._drain_gathers()
        self._cursor = 0              # use numbers restart: use i of this pass = use i of the recorded order
        out = self.module(*args, **kwargs)
        if self._sequence is None:
            self._sequence = self._recording
        if self.compute_dtype is not None and torch.is_tensor(out) and out.is_floating_point():
            # logits back to fp32 for a stable loss: log-softmax over a 32K vocabulary in fp16 loses the
            # small probabilities the loss is made of
            out = out.float()
        return out

    @contextlib.contextmanager
    def no_sync(self):
        # FSDP must reduce-scatter every micro-batch: nobody holds a full gradient to accumulate into (that is the
        # memory it saves), so each micro-batch's full dL/dW is reduced and freed at once; the blocks accumulate
        yield

    def finish_gradient_synchronization(self):
        self._complete_reductions()
        self._drain_gathers()
        # replicated parameters (norm gains, biases, MoE experts) are averaged like plain DP, all in ONE flat
        # all-reduce: they are small, so one message beats many (latency dominates)
        if self._replicated and self.world_size > 1:
            had_grad = [p.grad is not None for p in self._replicated]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._replicated]
            flat = torch.cat([g.reshape(-1) for g in grads])
            t0 = time.perf_counter()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            self.comm_wait_seconds += time.perf_counter() - t0
            flat.div_(self.world_size)
            offset = 0
            for p in self._replicated:
                p.grad = flat[offset: offset + p.numel()].view_as(p).clone()
                offset += p.numel()
            _clear_globally_unused(self._replicated, had_grad)

    def gather_full_params(self):
        """Collective. The full fp32 state dict of the original module, under its original names."""
        return fsdp_full_state_dict(self)

    def load_full_params(self, state_dict):
        """Load a full (unsharded) state dict of the original module: each rank keeps its block of rows."""
        fsdp_load_full_state_dict(self, state_dict)


# ---- 5. Tensor parallelism (Megatron-LM): split every weight matrix, not the batch ----
# Data parallelism needs the whole model on every rank. Tensor parallelism (TP) splits each layer across tp ranks
# so each holds 1/tp of every big matrix, and all tp ranks see the SAME batch. Megatron's insight (Shoeybi et al.,
# arXiv:1909.08053) is which way to cut so a sub-block needs ONE all-reduce in forward and one in backward:
#   column-parallel  Y = X W^T with W's rows (output features) split: rank r computes Y_r = X W_r^T, its own slice
#                    of the output features. Needs the full X, produces a split Y. No communication.
#   row-parallel     Y = X W^T with W's columns (input features) split: rank r holds X_r (the matching slice of
#                    the input) and computes the partial sum X_r W_r^T; Y = sum_r X_r W_r^T: one all-reduce.
# A column-parallel layer feeding a row-parallel one needs nothing in between as long as whatever sits between
# them works element-wise or per head: SwiGLU's silu(x W1^T) * (x W3^T) is element-wise over d_ff, attention is
# independent per head. So   MLP:   x -> [w1, w3 column] -> silu * -> [w2 row] -> all-reduce -> y
#                            attn:  x -> [q, k, v column: heads split] -> attention per head -> [output row] -> y
# The two conjugate operators mark the region's edges (the names f and g are the paper's):
#   f = copy_to_tp:      forward identity (x is already the same on every rank), backward ALL-REDUCE: each rank's
#                        dL/dx is only its heads' / hidden units' share, the true gradient is the sum.
#   g = reduce_from_tp:  forward ALL-REDUCE (sum the row-parallel partial products), backward identity (the sum's
#                        gradient reaches each summand unchanged).
# Per layer per step: 2 all-reduces of B*T*d forward (attn + MLP) and 2 backward. That traffic is per TOKEN, not
# per parameter as in DP, so TP lives inside a machine (NVLink) and DP goes across machines.
# Everything else (norms, residual adds) runs replicated: the residual stream is identical on every TP rank after
# each g, and its gradient is too after each f, so replicated weights get identical gradients with no reduction.


class _CopyToTP(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        _count("tp all-reduce", grad.numel())
        dist.all_reduce(grad, group=ctx.group)       # sum over TP ranks of each rank's partial dL/dx
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()                   # clone: all_reduce works in place, x may be saved for backward
        _count("tp all-reduce", x.numel())
        dist.all_reduce(x, group=group)              # Y = sum_r X_r W_r^T
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x, group):
    """f: enter a TP region. x (any shape) is returned as is; its gradient is summed over the group."""
    return x if dist.get_world_size(group) == 1 else _CopyToTP.apply(x, group)    # (tp = 1: nothing to sum)


def reduce_from_tp(x, group):
    """g: leave a TP region. The ranks' partial results are summed; the gradient passes through unchanged."""
    return x if dist.get_world_size(group) == 1 else _ReduceFromTP.apply(x, group)


def _shard_rows(t, rank, parts):
    """Rank's contiguous 1/parts of t along dim 0 (a copy, so the full tensor can be freed)."""
    return t.chunk(parts, dim=0)[rank].clone()


# Shapes, with W stored (out, in) as in model.Linear: a column-parallel shard keeps out/tp ROWS of W (whole output
# features), a row-parallel shard keeps in/tp COLUMNS (whole input features). Each records `tp_dim` (0 or 1) on
# its parameter, which is all full_state_dict needs to put the matrix back together with one all-gather.


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T: rank r holds rows [r*out/tp, (r+1)*out/tp) of W (out/tp output features). With
    copy_input=True it applies f itself; a sub-block with several column layers on the same x (q, k, v; w1, w3)
    applies f once and passes copy_input=False, so backward all-reduces dL/dx once, not per layer."""

    def __init__(self, full_weight, group, copy_input=True):
        super().__init__()
        self.group, self.copy_input = group, copy_input
        tp, r = dist.get_world_size(group), dist.get_rank(group)
        self.weight = nn.Parameter(_shard_rows(full_weight, r, tp))     # (out/tp, in)
        self.weight.tp_dim = 0                                          # how to gather it back: along rows

    def forward(self, x):                                               # (..., in) -> (..., out/tp)
        if self.copy_input:
            x = copy_to_tp(x, self.group)
        return x @ self.weight.t()


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T: rank r holds columns [r*in/tp, (r+1)*in/tp) of W and the matching slice x_r of the
    input (a column-parallel layer's output); g all-reduces the partial products (sequence_parallel: reduce-
    scatters them along the sequence instead)."""

    def __init__(self, full_weight, group, sequence_parallel=False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        tp, r = dist.get_world_size(group), dist.get_rank(group)
        self.weight = nn.Parameter(_shard_rows(full_weight.t(), r, tp).t().contiguous())  # (out, in/tp)
        self.weight.tp_dim = 1

    def forward(self, x_r):                                             # (..., in/tp) -> (..., out), summed
        partial = x_r @ self.weight.t()
        return scatter_seq(partial, self.group) if self.sp else reduce_from_tp(partial, self.group)


class TPAttention(nn.Module):
    """Causal self-attention with heads split over the TP ranks: rank r owns query heads [r*H/tp, (r+1)*H/tp)
    and KV heads [r*Hkv/tp, (r+1)*Hkv/tp). With GQA query head h reads KV head h // (H/Hkv), and the contiguous
    split keeps every query head on the rank of its KV head (H/tp query heads = Hkv/tp whole groups)."""

    def __init__(self, cfg, sd, prefix, rope, group, sequence_parallel=False):
        super().__init__()
        tp = dist.get_world_size(group)
        self.group, self.cfg, self.rope, self.sp = group, cfg, rope, sequence_parallel
        self.h, self.hkv, self.dh = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.head_dim   # local heads
        self.q_proj = ColumnParallelLinear(sd[prefix + "q_proj.weight"], group, copy_input=False)
        self.k_proj = ColumnParallelLinear(sd[prefix + "k_proj.weight"], group, copy_input=False)
        self.v_proj = ColumnParallelLinear(sd[prefix + "v_proj.weight"], group, copy_input=False)
        self.output_proj = RowParallelLinear(sd[prefix + "output_proj.weight"], group, sequence_parallel)

    def forward(self, x, pos):                                  # x (B, T, d) the same on every TP rank (SP: T/tp)
        x = gather_seq(x, self.group) if self.sp else copy_to_tp(x, self.group)   # f: once for q, k and v
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.dh).transpose(1, 2)      # (B, H/tp, T, dh)
        k = self.k_proj(x).view(B, T, self.hkv, self.dh).transpose(1, 2)    # (B, Hkv/tp, T, dh)
        v = self.v_proj(x).view(B, T, self.hkv, self.dh).transpose(1, 2)
        # RoPE rotates each head's q and k by the token's position, the same table for every head: splitting heads
        # changes nothing about it (positions are the full sequence's, also under SP, where x was gathered above)
        if self.rope is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        if self.hkv != self.h:                                          # GQA within this rank's groups
            k, v = k.repeat_interleave(self.h // self.hkv, 1), v.repeat_interleave(self.h // self.hkv, 1)
        out = M.attend(q, k, v, None, self.cfg.attn_impl, self.cfg.window)  # (B, H/tp, T, dh), per head
        return self.output_proj(out.transpose(1, 2).reshape(B, T, self.h * self.dh))   # g inside: (B, T, d)


class TPSwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with w1, w3 column-parallel (d_ff/tp hidden units each) and w2 row-parallel."""

    def __init__(self, sd, prefix, group, sequence_parallel=False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        self.w1 = ColumnParallelLinear(sd[prefix + "w1.weight"], group, copy_input=False)
        self.w3 = ColumnParallelLinear(sd[prefix + "w3.weight"], group, copy_input=False)
        self.w2 = RowParallelLinear(sd[prefix + "w2.weight"], group, sequence_parallel)

    def forward(self, x):
        x = gather_seq(x, self.group) if self.sp else copy_to_tp(x, self.group)   # f
        return self.w2(M.silu(self.w1(x)) * self.w3(x))                 # element-wise on local units, then g


# What a TP rank holds and sends, per step, for L layers, batch B x T, width d, vocabulary V, b bytes per number:
#   parameters   attention 4 d^2 / tp (GQA: less), SwiGLU 3 d d_ff / tp, embedding and head V d / tp each; the norms
#                (d numbers each) are replicated. Gradients and AdamW's moments split the same way, so the
#                training state shrinks by ~tp, like FSDP's, but without gathering weights: each rank only ever
#                multiplies by its own slice.
#   forward      2 L + 1 all-reduces of B T d b bytes (g after attention and MLP, and the embedding) + 3 all-
#                reduces of B T numbers in the loss; backward 2 L + 1 more (f's). A ring all-reduce moves 2 (tp-1)/tp
#                of each, so ~8 L B T d b (tp-1)/tp bytes per rank per step -- proportional to tokens, not weights.
#   activations  the attention and MLP insides (B T H dh / tp, B T d_ff / tp) shrink by tp; the residual stream and
#                the norms' inputs (B T d) do not -- which is what SP fixes.


# ---- 6. Pipeline parallelism: split the model by layers, stream micro-batches through the stages ----
# Stage s of p holds a contiguous run of layers (the first also the embedding, the last the final norm, the LM
# head and the loss). A batch is cut into m micro-batches; stage s receives micro-batch i's activations (b, T, d)
# from stage s-1, runs its layers, sends the result on to s+1; backward sends dL/d(activations) the other way.
# Point-to-point only, b*T*d numbers per micro-batch per boundary: the cheapest communication of all the
# parallelisms, which is why PP is the one that crosses slow links.
# The price is the BUBBLE: stage s cannot start micro-batch 0 until s stages before it are done with it, and the
# last backward drains the same way. With equal time per stage and micro-batch, each rank idles p-1 slots of
# forward and p-1 of backward out of m+p-1 each:
#     bubble fraction = (p - 1) / (m + p - 1)          (GPipe, Huang et al. arXiv:1811.06965)
# so m >> p hides it (p = 4, m = 16: 16%). Two schedules with the SAME bubble:
#   GPipe  all m forwards, then all m backwards: every stage keeps m micro-batches' activations alive.
#   1F1B   (PipeDream-Flush, Narayanan et al. arXiv:2104.04473) stage s runs p-s-1 warm-up forwards, then
#          alternates one forward, one backward: at most p-s micro-batches in flight, so activation memory is
#          bounded by p instead of m. Same arithmetic, same gradients (they are summed in another order only).
# Gradients: each micro-batch's loss is divided by m, so the accumulated .grad is the full batch's mean gradient.


def gpipe_schedule(num_stages, num_micro, stage):
    """[("F", i) ...] then [("B", i) ...]: this stage's actions, in order."""
    return [("F", i) for i in range(num_micro)] + [("B", i) for i in range(num_micro)]


def one_f_one_b_schedule(num_stages, num_micro, stage):
    """Warm-up forwards (p - s - 1 of them), then one forward + one backward at a time, then the remaining
    backwards. The last stage (no warm-up) runs F0 B0 F1 B1 ...: a micro-batch's backward starts as soon as
    its loss exists."""
    warm = min(num_stages - stage - 1, num_micro)
    acts, f, b = [("F", i) for i in range(warm)], warm, 0
    while f < num_micro:
        acts += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    return acts + [("B", i) for i in range(b, num_micro)]


SCHEDULES = {"gpipe": gpipe_schedule, "1f1b": one_f_one_b_schedule}


# Worked example, GPipe with p = 2 stages, m = 2 micro-batches, forward 1 unit, backward 1 unit:
#     stage 0 | F0 F1 .. .. B0 B1        stage 1 starts F0 one unit late and finishes B1 one unit early; each
#     stage 1 | .. F0 F1 B0 B1 ..        row idles 2 of 6 units: bubble 1/3 = (p-1)/(m+p-1). (format_timeline)


def simulate_pipeline(schedule, num_stages, num_micro, t_forward=1, t_backward=2):
    """Run a schedule on paper: every action starts when its rank is free and its input exists (F(s, i) needs
    F(s-1, i); B(s, i) needs B(s+1, i)). Returns ({(s, kind, i): (start, end)}, makespan, bubble fraction)."""
    acts = [schedule(num_stages, num_micro, s) for s in range(num_stages)]
    done, free, nxt = {}, [0] * num_stages, [0] * num_stages
    while any(nxt[s] < len(acts[s]) for s in range(num_stages)):
        progressed = False
        for s in range(num_stages):
            if nxt[s] == len(acts[s]):
                continue
            kind, i = acts[s][nxt[s]]
            dep = (s - 1, "F", i) if kind == "F" else (s + 1, "B", i)
            if kind == "B" and s == num_stages - 1:
                dep = (s, "F", i)                           # the last stage's backward starts from its own loss
            if 0 <= dep[0] < num_stages and dep not in done:
                continue                                    # input not produced yet: try another rank
            start = max(free[s], done[dep][1] if dep in done else 0)
            done[(s, kind, i)] = (start, start + (t_forward if kind == "F" else t_backward))
            free[s], nxt[s], progressed = done[(s, kind, i)][1], nxt[s] + 1, True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocks")   # (no schedule here does)
    makespan = max(free)
    busy = num_micro * (t_forward + t_backward)             # per rank
    return done, makespan, 1 - busy / makespan


# ===== Menu: gradient buckets =====
# DDPBucketed is the core's DDP with one change: `_build_buckets` groups several parameters into one bucket, sent as
# one flat tensor (`_pack` / `_unpack`). The hooks, the launch order and its rebuild are DDP's, unchanged.


class DDPBucketed(DDP):
    """DDP with gradients grouped into buckets of about `bucket_size_mb` MB: one all-reduce per bucket, launched
    when the bucket's last gradient arrives. Each message pays a fixed latency (alpha in t = alpha + bytes/beta):
    with one bucket per parameter a transformer sends hundreds of messages per step, most of them tiny (a norm gain
    is a few KB); with ONE bucket nothing is sent until backward is done (no overlap). torch's default, 25 MB, is a
    few messages per step for a 100M-parameter model, each large enough to run at full bandwidth, and launched
    while backward still runs. The price: a copy into/out of the flat buffer, and a bucket waits for its slowest
    member."""

    def __init__(self, module, bucket_size_mb=25.0):
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb}")
        self.bucket_size_mb = float(bucket_size_mb)   # read by DDP._build_buckets (a class attribute in DDP)
        super().__init__(module)




    def _build_buckets(self, order):
        """Group parameter indices (in launch order) into buckets of <= bucket_size_mb, one dtype each (a bucket is
        sent as one flat tensor): greedy, close the bucket when the next parameter would overflow it."""
        limit = self.bucket_size_mb * 2**20
        buckets, cur, cur_bytes = [], [], 0
        for i in order:
            p = self._params[i]
            nbytes = p.numel() * p.element_size()
            if cur and (cur_bytes + nbytes > limit or p.dtype != self._params[cur[0]].dtype):
                buckets.append(cur)
                cur, cur_bytes = [], 0
            cur.append(i)
            cur_bytes += nbytes
        if cur:
            buckets.append(cur)
        # one flat send buffer per multi-parameter bucket, allocated once (not per step)
        self._buffers = [None if len(idxs) == 1 else
                         torch.empty(sum(self._params[i].numel() for i in idxs),
                                     dtype=self._params[idxs[0]].dtype, device=self._params[idxs[0]].device)
                         for idxs in buckets]
        self._set_buckets(buckets)

    def _pack(self, b):
        """Flatten the bucket's grads into its contiguous buffer: one message instead of len(bucket)."""
        if self._buffers[b] is None:
            return super()._pack(b)
        offset = 0
        for i in self._buckets[b]:
            g = self._params[i].grad
            self._buffers[b][offset: offset + g.numel()].copy_(g.view(-1))
            offset += g.numel()
        return self._buffers[b]

    def _unpack(self, b):
        """The reduced SUM -> the mean, copied back into each .grad (a view into the flat buffer would alias the
        next step's send buffer)."""
        if self._buffers[b] is None:
            return super()._unpack(b)
        self._buffers[b].div_(self.world_size)
        offset = 0
        for i in self._buckets[b]:
            g = self._params[i].grad
            g.view(-1).copy_(self._buffers[b][offset: offset + g.numel()])
            offset += g.numel()


# ===== Menu: torch's FSDP2 and DTensor TP (the fast paths of FSDP and TP) =====
# `--strategy torch-fsdp`: torch's own fully sharded data parallelism (FSDP2, `fully_shard`, the engine torchtitan
# runs on) behind the interface of the core's FSDP: the same train.py hooks, the same consolidated checkpoints. A
# test holds its loss and every gradient equal to FSDP's and to one process. `--tp-impl dtensor`: below.


class TorchFSDP(nn.Module):
    """`TorchFSDP(module, compute_dtype=None)`: fully_shard on every transformer block, then on the root (the
    embedding, final norm and head), so each block's parameters are one all-gather / one reduce-scatter, as FSDP's
    paper groups them. Every parameter becomes a DTensor sharded by rows (Shard(0)) over the ranks. compute_dtype
    (bf16/fp16): MixedPrecisionPolicy gathers and computes in it, reduces gradients in fp32, returns fp32 logits;
    the sharded master weights, gradients and optimizer state stay fp32, as in our FSDP."""

    def __init__(self, module, compute_dtype=None):
        super().__init__()
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        broadcast_module_(module)           # every rank shards the same weights (rank 0's initialization)
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for block in getattr(module, "layers", []):     # (a module without blocks: one group, the root)
            fully_shard(block, mp_policy=mp)
        fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                           output_dtype=torch.float32 if compute_dtype else None))
        self.module = module                # (sharded in place: model.parameters() are the DTensor shards)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        # like our FSDP: every micro-batch's gradient is reduce-scattered at once, the shards accumulate
        return contextlib.nullcontext()

    def finish_gradient_synchronization(self):
        pass    # FSDP2 reduce-scatters (and averages) each block's gradients during backward


def _is_dtensor(t):
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _full_tensor(t):
    """Collective for a DTensor: the whole tensor (its shards all-gathered over every mesh dimension), on the CPU."""
    return (t.full_tensor() if _is_dtensor(t) else t).detach().to("cpu", copy=True)


def _shard_like(p, full):
    """The inverse: a full tensor (every rank holds the same one) cut like parameter p, DTensor or not."""
    from torch.distributed.tensor import distribute_tensor
    full = full.to(p.device)
    if not _is_dtensor(p):
        return full.clone()
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)   # local slicing, no messages


# `--tp-impl dtensor`: the fast path of the core's tensor parallelism. torch's DTensor engine splits the same
# TransformerLM by a plan -- {module name: ParallelStyle} -- that says what the core's classes spell out: q, k, v,
# w1, w3 and the LM head column-parallel (ColwiseParallel: weight Shard(0)), output_proj and w2 row-parallel
# (RowwiseParallel: weight Shard(1); the partial sums all-reduced, g), the embedding split along the vocabulary,
# and under --sp the norms on sequence shards (SequenceParallel) with an all-gather before each TP region
# (PrepareModuleInput). The logits stay split over the vocabulary and loss_parallel computes the cross-entropy from
# the shards, like vocab_parallel_cross_entropy. With dp > 1, FSDP2 shards the TP shards again over the dp
# dimension of a 2-D (dp, tp) mesh. DTensorTPModel offers MeshModel's methods, so the --tp command (train.train,
# evaluation, consolidated checkpoints that either implementation resumes) drives either; a test holds both to
# one process.


def dtensor_tp_plan(sequence_parallel=False):
    """The parallelize_module plan of TransformerLM (names with `*`: every layer)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, \
        SequenceParallel
    sp = sequence_parallel
    seq = Shard(1) if sp else Replicate()        # the residual stream between TP regions: (B, T/tp, d) or (B, T, d)
    # (under SP the stream stays a DTensor, so model.py's residual adds see one type; else plain local tensors)
    plan = {"token_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq, use_local_output=not sp),
            "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)}
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "ffn.w1", "ffn.w3"):
        plan[f"layers.*.{name}"] = ColwiseParallel()                  # (B, T, d) -> this rank's heads / units
    for name in ("attn.output_proj", "ffn.w2"):
        plan[f"layers.*.{name}"] = RowwiseParallel(output_layouts=seq, use_local_output=not sp)   # g (SP: scatter)
    if sp:   # f becomes an all-gather along T: the attention's 5 inputs (x, positions, mask, cache, layer), ffn's 1
        plan.update({n: SequenceParallel() for n in ("layers.*.ln1", "layers.*.ln2", "ln_final")})
        plan["layers.*.attn"] = PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * 4,
                                                   desired_input_layouts=(Replicate(),) + (None,) * 4)
        plan["layers.*.ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    return plan


def _torch_layers_(model):
    """torch's styles shard only nn.Linear and nn.Embedding: swap model.py's Linear and Embedding for them, holding
    the SAME Parameter objects under the same names (y = x W^T and a row lookup either way)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is M.Linear:
                new = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
            elif type(child) is M.Embedding:
                new = nn.Embedding(child.num_embeddings, child.embedding_dim, device="meta")
            else:
                continue
            new.weight = child.weight
            setattr(module, name, new)


class DTensorTPModel(nn.Module):
    """`DTensorTPModel(cfg, full_sd, mesh, sequence_parallel=False)`: a TransformerLM on a (dp, tp, pp=1) mesh
    by torch's DTensor (see above), with MeshModel's interface: local_forward_backward, synchronize_gradients,
    clip_gradients, full_state, load_optimizer_state, forward_backward. Every parameter ends up a DTensor on the
    (dp, tp) mesh (1-D TP without SP: the norms stay plain tensors, identical on the tp ranks)."""

    def __init__(self, cfg, full_sd, mesh, sequence_parallel=False):
        super().__init__()
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module
        check_tp_config(cfg, mesh.tp)
        if mesh.pp > 1 or mesh.tp == 1:
            raise ValueError(f"--tp-impl dtensor runs dp x tp meshes with tp > 1 and no pipeline, got tp={mesh.tp}, "
                             f"pp={mesh.pp} (use --tp-impl ours)")
        w = full_sd["lm_head.weight"]
        self.mesh, self.sp = mesh, sequence_parallel
        # the same rank order as DeviceMesh (rank = d * tp + t): a dp rank's tp partners are neighbours
        self.torch_mesh = init_device_mesh(w.device.type, (mesh.dp, mesh.tp), mesh_dim_names=("dp", "tp"))
        model = M.TransformerLM.from_config(cfg, device=w.device, dtype=w.dtype)
        model.load_state_dict(full_sd)
        _torch_layers_(model)
        # src_data_rank=None: every rank holds the same full weights, so each keeps its slices without a message
        parallelize_module(model, self.torch_mesh["tp"], dtensor_tp_plan(sequence_parallel), src_data_rank=None)
        emb = model.token_embeddings.weight     # its gradient comes back whole (Replicate): keep this rank's rows
        emb.register_hook(lambda g: g.redistribute(emb.device_mesh, emb.placements))   # (a local slice, no message)
        for block in model.layers:              # model.py's attention reshapes q, k, v by its heads: the local ones
            block.attn.num_heads //= mesh.tp
            block.attn.num_kv_heads //= mesh.tp
        if mesh.dp > 1:                         # 2-D: FSDP2 per block and at the root, over the dp dimension
            for block in model.layers:
                fully_shard(block, mesh=self.torch_mesh["dp"])
            fully_shard(model, mesh=self.torch_mesh["dp"])
        self.inner = model

    def local_forward_backward(self, x, y, scale=1.0):
        """MeshModel's: scale * this replica's mean loss backward (gradients add up over micro-steps)."""
        from torch.distributed.tensor.parallel import loss_parallel
        with loss_parallel():                   # cross-entropy of vocabulary-split logits, forward and backward
            logits = self.inner(x)                                           # (B, T, V) DTensor, V/tp per rank
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss if scale == 1.0 else loss * scale).backward()
        return torch.tensor([float(_full_tensor(loss))], dtype=torch.float64, device=x.device)

    def synchronize_gradients(self):
        pass    # DTensor sums the SP norms' partial gradients in backward; FSDP2 averages over dp there too

    def forward_backward(self, x, y):
        """MeshModel's: the step's loss and gradients, the loss averaged over the dp ranks."""
        loss_t = self.local_forward_backward(x, y)
        if self.mesh.dp > 1:
            dist.all_reduce(loss_t, group=self.mesh.dp_group)
        return float(loss_t) / self.mesh.dp

    def clip_gradients(self, max_norm):
        """Global L2 norm clipping: sum(g^2) of a DTensor gradient is a DTensor that is Partial over the mesh
        dimensions g is split on; summed per layout and reduced once per layout, each slice counts once."""
        grads = [p.grad for p in self.inner.parameters() if p.grad is not None]
        sq = {}
        for g in grads:
            s = g.detach().to(torch.float64).pow(2).sum()
            key = (s.device_mesh, s.placements) if _is_dtensor(s) else None      # plain: replicated, once
            sq[key] = sq[key] + s if key in sq else s
        norm = math.sqrt(sum(float(_full_tensor(s)) for s in sq.values()))    # (same order on every rank)
        if norm > max_norm:
            for g in grads:
                g.mul_(max_norm / (norm + 1e-6))         # the same eps as train.gradient_clipping
        return norm

    def full_state(self, optimizer=None):
        """MeshModel's: (full model state dict, AdamW state by parameter name or None), gathered (collective)."""
        named = list(self.inner.named_parameters())
        model_sd = {n: _full_tensor(p) for n, p in named}
        if optimizer is None:
            return model_sd, None
        return model_sd, {n: {k: _full_tensor(v) if torch.is_tensor(v) and v.dim() else v
                              for k, v in optimizer.state[p].items()} for n, p in named if optimizer.state.get(p)}

    def load_optimizer_state(self, optimizer, full_opt):
        """MeshModel's: a full optimizer state by name (any layout, either implementation) cut like the shards."""
        for name, p in self.inner.named_parameters():
            if name in full_opt:
                optimizer.state[p] = {k: _shard_like(p, v) if torch.is_tensor(v) and v.dim() else v
                                      for k, v in full_opt[name].items()}


# ===== Menu: sequence parallelism =====
# Megatron-SP: the f/g operators of the core's tensor parallelism, re-cut along the sequence. RowParallelLinear,
# TPAttention and TPSwiGLU call these in place of copy_to_tp / reduce_from_tp when built with
# sequence_parallel=True; TPTransformerLM (next menu) then keeps (B, T/tp, d) activations between the regions.


# Sequence parallelism (Megatron-SP, Korthikanti et al. arXiv:2205.05198). Between the TP regions (norms, residual
# adds, dropout) every TP rank above does the SAME work on the SAME (B, T, d) activations: tp copies of them in
# memory. Split those along the sequence instead: each rank keeps (B, T/tp, d). The region edges change:
#   f -> all-gather along T     (forward: the column layers need the full sequence; backward: reduce-scatter)
#   g -> reduce-scatter along T (forward: sum the partial products AND keep only my T/tp rows; backward: all-gather)
# all-reduce = reduce-scatter + all-gather, so the bytes on the wire are unchanged, while the activations between
# regions and the norms' work shrink by tp. One new duty: a replicated norm weight now sees only T/tp positions on
# each rank, so its gradient is a partial sum -- all-reduced over the TP group after backward.


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 1 (sequence) forward; reduce-scatter along dim 1 backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        _count("tp all-gather", x.numel() * dist.get_world_size(group))
        return _gather_tp(x, 1, group)                   # (B, T/tp, d) -> (B, T, d)   (_gather_tp: next menu)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Reduce-scatter along dim 1 forward; all-gather along dim 1 backward."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)             # (B, T, d) partial sums -> (B, T/tp, d) full sums

    @staticmethod
    def backward(ctx, grad):
        _count("tp all-gather", grad.numel() * dist.get_world_size(ctx.group))
        return _gather_tp(grad, 1, ctx.group), None


def _reduce_scatter_seq(x, group):
    """(B, T, d) partial sums on every rank -> rank r's (B, T/tp, d) slice of their total (sequence chunk r)."""
    chunks = [c.contiguous() for c in x.chunk(dist.get_world_size(group), dim=1)]
    out = torch.empty_like(chunks[0])
    _count("tp reduce-scatter", x.numel())
    dist.reduce_scatter(out, chunks, group=group)        # rank r: sum over ranks of their chunk r
    return out


def gather_seq(x, group):
    """SP's f: (B, T/tp, d) sequence shards -> the full (B, T, d) on every rank (backward: reduce-scatter)."""
    return _GatherSeq.apply(x, group)


def scatter_seq(x, group):
    """SP's g: (B, T, d) partial sums -> this rank's (B, T/tp, d) shard of the total (backward: all-gather)."""
    return _ScatterSeq.apply(x, group)


# ===== Menu: model parallelism =====
# The core's TP layers and pipeline schedules assembled into whole TransformerLMs, each built from a FULL state
# dict: TPTransformerLM (a tp group; optionally SP, optionally one pipeline stage, with the vocabulary split for
# the embedding and the loss) and PipelineStage (a run of whole layers), and run_pipeline, the executor that
# drives either as a stage. The mesh (plumbing) builds one per rank.


class VocabParallelEmbedding(nn.Module):
    """Rank r holds embedding rows [r*V/tp, (r+1)*V/tp). Each rank looks up the ids in its range, writes zeros
    for the others, and one all-reduce (g) sums the ranks' rows: exactly one rank contributed each token's row."""

    def __init__(self, full_weight, group, sequence_parallel=False):
        super().__init__()
        self.group, self.sp = group, sequence_parallel
        tp, r = dist.get_world_size(group), dist.get_rank(group)
        self.weight = nn.Parameter(_shard_rows(full_weight, r, tp))     # (V/tp, d)
        self.weight.tp_dim = 0
        self.lo = r * self.weight.shape[0]                              # first vocabulary id this rank holds

    def forward(self, ids):                                             # (B, T) -> (B, T, d)
        local = ids - self.lo
        mine = (local >= 0) & (local < self.weight.shape[0])
        rows = self.weight[local.clamp(0, self.weight.shape[0] - 1)] * mine[..., None]   # zeros off this rank
        return scatter_seq(rows, self.group) if self.sp else reduce_from_tp(rows, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over logits split along the vocabulary, without ever gathering them: (N, V/tp) per rank
    holds (N, V) in all. With m = max over all V, the loss of a row is  log sum_j exp(z_j - m) + m - z_y:
      1. m      = all-reduce MAX of the local row maxima                     (N numbers)
      2. S      = all-reduce SUM of sum_{j local} exp(z_j - m)             (N numbers)
      3. z_y    = all-reduce SUM of the target logit (zero on the ranks that do not hold y)   (N numbers)
    3 all-reduces of N numbers instead of an all-gather of N*V. Backward needs no communication: dL/dz_j =
    (softmax_j - [j == y]) / N, and softmax_j = exp(z_j - m) / S is computable from the local logits."""

    @staticmethod
    # Worked example, V = 4 split over 2 ranks, one row z = (1, 3 | 2, 0), target y = 2 (on rank 1): local maxima
    # 3 and 2 -> m = 3; local sums e^-2 + e^0 and e^-1 + e^-3 -> S = 1.553; z_y = 2 from rank 1, 0 from rank 0;
    # loss = log 1.553 + 3 - 2 = 1.440, the same as log_softmax over the four logits.
    def forward(ctx, z, y, lo, group):                                  # z (N, V/tp) local logits, y (N,)
        m = z.max(dim=-1).values.detach()
        if dist.get_world_size(group) > 1:
            _count("tp all-reduce", 3 * m.numel())                      # the three (N,) reductions below
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)           # 1.
        e = torch.exp(z - m[:, None])                                   # (N, V/tp)
        s = e.sum(dim=-1)
        dist.all_reduce(s, group=group)                                 # 2.
        local_y = y - lo
        mine = (local_y >= 0) & (local_y < z.shape[1])
        zy = z.gather(1, local_y.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1) * mine
        dist.all_reduce(zy, group=group)                                # 3.
        ctx.save_for_backward(e / s[:, None], local_y, mine)            # this rank's slice of the softmax
        return (torch.log(s) + m - zy).mean()

    @staticmethod
    def backward(ctx, grad):
        # d loss / d z_j = (softmax_j - [j == y]) / N for the mean over N rows. Each rank owns its V/tp columns of
        # the softmax, and the "- 1" lands only on the rank whose columns hold y: no communication at all.
        p, local_y, mine = ctx.saved_tensors
        g = p.clone()
        rows = torch.arange(p.shape[0], device=p.device)[mine]
        g[rows, local_y[mine]] -= 1.0                                   # softmax - one_hot(y), on y's rank only
        return g * (grad / p.shape[0]), None, None, None


def vocab_parallel_cross_entropy(local_logits, targets, vocab_start, group):
    """Mean cross-entropy of (..., V/tp) vocabulary-split logits (columns from vocab_start) against (...) ids."""
    z = local_logits.reshape(-1, local_logits.shape[-1])
    return _VocabParallelCrossEntropy.apply(z, targets.reshape(-1), vocab_start, group)


# Switches the TP model leaves out, and why each needs more than a split: QK-norm's per-head-dim gain is shared by all
# heads, so its gradient is a sum over every rank's heads (one more all-reduce); a row-parallel layer's bias must be
# added once, after the reduction, not on every rank; LayerNorm, post-norm, learned/sinusoidal positions, tied
# embeddings, MoE and dropout each change where the TP regions start and end or what must agree across ranks.
# They are refused by name instead of silently computing something else.


def check_tp_config(cfg, tp):
    """Refuse, before any work, a config whose heads, KV heads, d_ff or vocabulary do not split over tp ranks, or
    that uses a switch the TP model does not implement."""
    for name, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads), ("d_ff", cfg.d_ff),
                    ("vocab_size", cfg.vocab_size)):
        if n % tp:
            raise ValueError(f"tensor parallelism over {tp} ranks needs {name} divisible by {tp}, got {n}")
    unsupported = {k: getattr(cfg, k) for k, ok in (("mixer", "attention"), ("ffn", "swiglu"), ("norm", "rmsnorm"),
                   ("norm_position", "pre"), ("bias", False), ("qk_norm", False), ("tie_embeddings", False),
                   ("num_experts", 0), ("dropout", 0.0), ("attn_dropout", 0.0)) if getattr(cfg, k, ok) != ok}
    if cfg.position not in ("rope", "nope"):
        unsupported["position"] = cfg.position
    if unsupported:
        raise ValueError(f"the tensor-parallel model supports the default LLaMA-style block only; unsupported "
                         f"settings: {unsupported}")


def _gather_tp(t, dim, group):
    """The full tensor from the tp group's slices of it along `dim` (a TP weight, its gradient or a moment)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class TPTransformerLM(nn.Module):
    """TransformerLM split over the TP group: every attention and SwiGLU sub-block Megatron-style, the embedding
    and LM head split along the vocabulary, norms replicated. Built from a FULL model's state dict (each rank keeps
    its shard); `full_state_dict()` gathers it back under TransformerLM's names. forward(ids, targets) -> the mean
    cross-entropy computed from vocabulary-split logits (the full (B, T, V) logits never exist anywhere).
    sequence_parallel=True: Megatron-SP between the TP regions; call finish_gradient_synchronization() after
    backward (the replicated norm weights' gradients are per-shard partial sums).
    stage, num_stages: keep only pipeline stage `stage`'s layers (the embedding on the first, the head and loss on
    the last): a TP-split pipeline stage, which run_pipeline drives like a PipelineStage."""

    def __init__(self, cfg, full_sd, group=None, sequence_parallel=False, stage=0, num_stages=1):
        super().__init__()
        group = group if group is not None else dist.group.WORLD
        tp = dist.get_world_size(group)
        check_tp_config(cfg, tp)
        self.cfg, self.group, self.sp, self.d_model = cfg, group, sequence_parallel, cfg.d_model
        bounds = _split_layers(cfg.num_layers, num_stages)
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layer_ids = range(bounds[stage], bounds[stage + 1])
        self.vocab_lo = dist.get_rank(group) * (cfg.vocab_size // tp)      # first vocabulary id of this rank
        sd = {k: v.detach() for k, v in full_sd.items()}
        dt, dev = sd["lm_head.weight"].dtype, sd["lm_head.weight"].device    # shards keep the full model's dtype
        if self.first:
            self.token_embeddings = VocabParallelEmbedding(sd["token_embeddings.weight"], group, sequence_parallel)
        self.rope = M.RotaryPositionalEmbedding(cfg.rope_theta, cfg.head_dim, cfg.context_length,
                                                device=sd["lm_head.weight"].device) if cfg.position == "rope" else None
        self.layers = nn.ModuleDict()                                        # keyed by the GLOBAL layer index
        for i in self.layer_ids:
            block = nn.Module()
            block.ln1, block.ln2 = (M.RMSNorm(cfg.d_model, cfg.norm_eps, device=dev, dtype=dt) for _ in range(2))
            block.ln1.weight.data.copy_(sd[f"layers.{i}.ln1.weight"])
            block.ln2.weight.data.copy_(sd[f"layers.{i}.ln2.weight"])
            block.attn = TPAttention(cfg, sd, f"layers.{i}.attn.", self.rope, group, sequence_parallel)
            block.ffn = TPSwiGLU(sd, f"layers.{i}.ffn.", group, sequence_parallel)
            self.layers[str(i)] = block
        if self.last:
            self.ln_final = M.RMSNorm(cfg.d_model, cfg.norm_eps, device=dev, dtype=dt)
            self.ln_final.weight.data.copy_(sd["ln_final.weight"])
            # (V/tp, d): this rank's logits; under SP the all-gather before it already plays f's part
            self.lm_head = ColumnParallelLinear(sd["lm_head.weight"], group, copy_input=not sequence_parallel)

    def activation_shape(self, batch, seq):
        """The (b, T, d) activations a pipeline passes between stages: (b, T/tp, d) sequence shards under SP."""
        return (batch, seq // dist.get_world_size(self.group) if self.sp else seq, self.d_model)

    def forward(self, x, targets=None):
        """ids (B, T) on the first stage, else the previous stage's activations -> the next stage's activations,
        or (last stage) the mean cross-entropy against targets (targets None: this rank's (B, T, V/tp) logits)."""
        tp = dist.get_world_size(self.group)
        T = x.shape[1] if self.first else x.shape[1] * (tp if self.sp else 1)
        if self.sp and T % tp:
            raise ValueError(f"sequence parallelism over {tp} ranks needs a sequence length divisible by {tp}, "
                             f"got {T}")
        pos = torch.arange(T, device=x.device)
        if self.first:
            x = self.token_embeddings(x)                     # (B, T, d) all-reduced (SP: (B, T/tp, d) scattered)
        for block in self.layers.values():
            x = x + block.attn(block.ln1(x), pos)                            # one all-reduce (inside output_proj)
            x = x + block.ffn(block.ln2(x))                                  # one all-reduce (inside w2)
        if not self.last:
            return x
        h = self.ln_final(x)
        if self.sp:
            h = gather_seq(h, self.group)                                    # (B, T, d) for the vocab-split head
        local_logits = self.lm_head(h)                                       # (B, T, V/tp): f inside
        if targets is None:
            return local_logits
        # the loss in float32 at least (bf16 autocast computes the logits in bf16; train.py's loss upcasts too)
        local_logits = local_logits.to(torch.promote_types(local_logits.dtype, torch.float32))
        return vocab_parallel_cross_entropy(local_logits, targets, self.vocab_lo, self.group)

    def finish_gradient_synchronization(self):
        """Under SP: sum the replicated (norm) weights' per-shard gradients over the TP group. Without SP every TP
        rank already holds the full, identical gradient of a replicated weight: nothing to do."""
        if self.sp:
            for p in self.parameters():
                if getattr(p, "tp_dim", None) is None and p.grad is not None:
                    _count("tp all-reduce", p.grad.numel())
                    dist.all_reduce(p.grad, group=self.group)

    def full_state_dict(self, grads=False):
        """TransformerLM's state dict (or its gradients, grads=True), gathered from the shards on every TP rank:
        split parameters are all-gathered along their split dimension, replicated ones taken as they are."""
        out = {}
        for name, p in self.named_parameters():
            t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
            dim = getattr(p, "tp_dim", None)
            out[name] = (_gather_tp(t, dim, self.group) if dim is not None else t).clone()
        return out


def _split_layers(num_layers, num_stages):
    """Contiguous, balanced layer ranges: 5 layers on 2 stages -> [0, 3), [3, 5)."""
    if num_stages > num_layers:
        raise ValueError(f"pipeline of {num_stages} stages needs at least as many layers, got {num_layers}")
    per, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + per + (s < extra))
    return bounds


class PipelineStage(nn.Module):
    """Stage `stage` of `num_stages` of a TransformerLM (parameter names stay TransformerLM's, so the stages'
    state dicts together are the full model's). The first stage embeds ids, the last returns the loss."""

    # Construction takes a full model and keeps references to its stage's modules; the rest is freed when the caller
    # drops it. MeshModel passes one on the "meta" device (shapes, no storage) and then gives only this stage's
    # modules memory and weights (_stage_from_meta): building a stage never needs room for the whole model.
    def __init__(self, full_model, stage, num_stages):
        super().__init__()
        cfg = full_model.config
        if cfg.tie_embeddings or cfg.num_experts or cfg.position not in ("rope", "nope"):
            raise ValueError("the pipeline supports untied, dense models with rope/nope positions")
        bounds = _split_layers(cfg.num_layers, num_stages)
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.d_model = cfg.d_model                          # the width of the activations stages exchange
        self.layer_ids = range(bounds[stage], bounds[stage + 1])
        self.layers = nn.ModuleDict({str(i): full_model.layers[i] for i in self.layer_ids})
        if self.first:
            self.token_embeddings = full_model.token_embeddings
        if self.last:
            self.ln_final, self.lm_head = full_model.ln_final, full_model.lm_head

    def activation_shape(self, batch, seq):
        """The activations this stage receives and sends: (b, T, d)."""
        return (batch, seq, self.d_model)

    def forward(self, x, targets=None):
        """ids (b, T) on the first stage, activations (b, T, d) elsewhere -> activations, or the loss (last)."""
        # the blocks are TransformerLM's own modules, called exactly as TransformerLM.forward calls them, so a
        # stage computes bit for bit what the same layers compute inside the whole model
        if self.first:
            x = self.token_embeddings(x)
        pos = torch.arange(x.shape[1], device=x.device)
        for i in self.layer_ids:
            x = self.layers[str(i)](x, pos)
        if not self.last:
            return x
        logits = self.lm_head(self.ln_final(x))
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits   # loss in >= fp32
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1))


# Executing a schedule. Each action is either F(i) -- receive micro-batch i's activations (a blocking recv: the
# bubble shows up as time spent here), run the stage, send the result on -- or B(i) -- receive dL/d(output), run
# backward through the stage, send dL/d(input) back. The received activations are made leaves with
# requires_grad, so backward stops at the stage boundary and their .grad is exactly what the previous stage needs.
# Sends are non-blocking (isend), waited for at the end: in 1F1B two neighbours can both be sending (activations
# forward, gradients backward) at the same moment, and two blocking sends would wait for each other forever.
# Tags (i for activations, m + i for gradients) name each message, so a receive can never pick up the wrong one.


def run_pipeline(stage_module, ranks, xs, ys, schedule="1f1b", events=None, scale=1.0):
    """One training step's forward and backward through the pipeline on the ranks `ranks` (global ranks, stage s
    = ranks[s]); xs, ys: the m micro-batches (every stage gets them; only the first reads xs, the last ys).
    Accumulates the batch-mean gradient in .grad; returns the mean loss on the last stage (None elsewhere).
    events: a list to append (kind, i, t_start, t_end) of this rank's compute to (for the measured bubble).
    scale: the backward runs on scale * loss (gradient accumulation: 1 / grad_accum); the returned loss is unscaled."""
    p, m, s = len(ranks), len(xs), ranks.index(dist.get_rank())
    prev, nxt = (ranks[s - 1] if s > 0 else None), (ranks[s + 1] if s < p - 1 else None)
    inputs, outputs, sends, total = {}, {}, [], 0.0
    act_shape = stage_module.activation_shape(xs[0].shape[0], xs[0].shape[1])
    dtype = next(stage_module.parameters()).dtype
    for kind, i in SCHEDULES[schedule](p, m, s):
        if kind == "F":
            if prev is None:
                inp = xs[i]
            else:                                           # micro-batch i's activations from the previous stage
                inp = torch.empty(act_shape, dtype=dtype, device=xs[i].device)
                dist.recv(inp, prev, tag=i)
                inp.requires_grad_(True)
            t0 = time.perf_counter()
            out = stage_module(inp, ys[i] if nxt is None else None)
            if nxt is None:
                out = out / m                               # mean over micro-batches = the full batch's mean loss
                total += float(out.detach())
                if scale != 1.0:
                    out = out * scale                       # (the gradient of scale * loss flows back to stage 0)
            else:                                           # isend: a blocking send could wait for a peer that is
                _count("pp send", out.numel())
                sends.append(dist.isend(out.detach().contiguous(), nxt, tag=i))   # itself blocked sending to us
            inputs[i], outputs[i] = inp, out
            if events is not None:
                events.append(("F", i, t0, time.perf_counter()))
        else:
            grad = None
            if nxt is not None:                             # dL/d(my output) from the next stage
                grad = torch.empty_like(outputs[i])
                dist.recv(grad, nxt, tag=m + i)
            t0 = time.perf_counter()
            torch.autograd.backward(outputs.pop(i), grad)   # activations of micro-batch i are freed here
            inp = inputs.pop(i)
            if events is not None:
                events.append(("B", i, t0, time.perf_counter()))
            if prev is not None:
                _count("pp send", inp.grad.numel())
                sends.append(dist.isend(inp.grad.contiguous(), prev, tag=m + i))
    for w in sends:
        w.wait()
    return total if nxt is None else None


def format_timeline(events, num_stages, makespan, unit=1.0, width=3):
    """An ASCII timeline, one row per stage, one cell per `unit` of time: F3 = forward of micro-batch 3,
    B3 its backward, .. idle (the bubble). events {(s, kind, i): (start, end)}, in any time unit."""
    # With simulate_pipeline's default costs (backward = 2 forwards) a backward fills two cells; measured events
    # (seconds from run_pipeline's `events`) work the same with unit = the length of one cell in seconds.
    cols = max(1, int(round(makespan / unit)))
    rows = []
    for s in range(num_stages):
        cells = [".." .ljust(width - 1)] * cols
        for (es, kind, i), (t0, t1) in events.items():
            if es == s:
                for c in range(int(round(t0 / unit)), max(int(round(t1 / unit)), int(round(t0 / unit)) + 1)):
                    cells[min(c, cols - 1)] = f"{kind}{i}".ljust(width - 1)[:width - 1]
        rows.append(f"stage {s} | " + " ".join(cells))
    return "\n".join(rows)


# ===== Menu: context parallelism (ring attention) =====
# Split attention itself along the sequence: ring_attention passes K/V blocks around a ring of ranks, and
# ContextParallelLM runs it inside every layer of a whole TransformerLM, every other piece per token. It plugs in
# where a DP wrapper does (forward, backward, finish_gradient_synchronization); the (dp, tp, pp) mesh does not
# use it.


# Liu et al., "Ring Attention with Blockwise Transformers", arXiv:2310.01889.
# Megatron-SP still gathers the whole sequence for attention. For long contexts, split attention itself along the
# sequence: rank r keeps its queries and passes its K/V block around a ring; after p - 1 hops every rank has seen
# every block and combined them with FlashAttention's online softmax (kernels.py does the same across tiles):
#     per block:  s = q k^T / sqrt(dh) (masked),  m' = max(m, rowmax s),  a = exp(m - m'),
#                 l' = a l + rowsum exp(s - m'),  o' = a o + exp(s - m') v;     output = o / l at the end
# (exact: the running max only shifts exponents, and every block's terms are rescaled to the same max).
# Causal load balancing: with plain contiguous chunks rank 0's queries see one block and rank p-1's see p (rank 0
# idles). Cut the sequence into 2p chunks and give rank i chunks i and 2p-1-i: every rank then holds one early and
# one late chunk and does the same amount of unmasked work. A sequence that does not fill 2p equal chunks is padded
# at the end; padded keys are masked out and padded queries' outputs dropped.
# Communication: each hop moves one K and one V block (2 B H (T/p) dh numbers), overlappable with the block's math;
# activations per rank are T/p long, so the context length grows with the number of ranks.


def ring_layout(T, world, rank):
    """Global positions (padded length T_pad = 2 p ceil(T / 2p)) held by `rank`: chunks rank and 2p-1-rank."""
    c = -(-T // (2 * world))                                    # chunk length, ceil(T / 2p)
    lo, hi = rank * c, (2 * world - 1 - rank) * c
    return torch.cat([torch.arange(lo, lo + c), torch.arange(hi, hi + c)])


def ring_shard(x, world, rank, dim=-2):
    """This rank's rows of x along `dim` under ring_layout (zero rows where the position is padding)."""
    T = x.shape[dim]
    pos = ring_layout(T, world, rank)
    pad_shape = list(x.shape)
    pad_shape[dim] = 2 * world * (-(-T // (2 * world))) - T
    x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    return x.index_select(dim, pos.to(x.device))


class _RingPass(torch.autograd.Function):
    """Forward: send x to the next rank, return the previous rank's x. Backward: the reverse hop for gradients."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _ring_hop(x, group, +1)

    @staticmethod
    def backward(ctx, grad):
        return _ring_hop(grad, ctx.group, -1), None


def _ring_hop(x, group, step):
    """Send x to the rank `step` places along the ring, return what arrives from `step` places back."""
    # (step +1 in forward: K/V move right; -1 in backward: their gradients travel back left to their owners)
    ranks = dist.get_process_group_ranks(group)
    i = ranks.index(dist.get_rank())
    x = x.contiguous()
    out = torch.empty_like(x)
    send = dist.isend(x, ranks[(i + step) % len(ranks)])     # isend: every rank sends and receives at once
    dist.recv(out, ranks[(i - step) % len(ranks)])
    send.wait()
    return out


# Memory and backward: this version lets autograd record every hop, so backward keeps all p K/V blocks (T long in
# total, like an all-gather) and sends their gradients back around the ring hop by hop. Production ring attention
# (and FlashAttention) instead save only q, the output and the log-sum-exp, and recompute each block in a second ring
# pass during backward, so K/V memory stays at T/p; the arithmetic (and this function's result) are the same.


def ring_attention(q, k, v, T, group=None):
    """Causal attention over a sequence of true length T split by ring_layout: q, k, v (B, H, T_local, dh) are this
    rank's rows (ring_shard). Returns this rank's output rows (B, H, T_local, dh). Differentiable (the K/V hops
    are autograd functions, so backward sends the K/V gradients back around the ring)."""
    group = group if group is not None else dist.group.WORLD
    p, r = dist.get_world_size(group), dist.get_rank(group)
    q_pos = ring_layout(T, p, r).to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    m = q.new_full(q.shape[:-1] + (1,), -math.inf)              # running row max    (B, H, Tl, 1)
    l = q.new_zeros(q.shape[:-1] + (1,))                        # running row sum    (B, H, Tl, 1)
    o = torch.zeros_like(q)                                     # running numerator  (B, H, Tl, dh)
    for hop in range(p):
        src = (r - hop) % p                                     # whose K/V block we hold at this hop
        k_pos = ring_layout(T, p, src).to(q.device)
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < T)   # causal, and no padded keys
        if mask.any():                                          # (a block entirely in the future costs nothing)
            s = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, -math.inf)
            m_new = torch.maximum(m, s.detach().amax(-1, keepdim=True))   # the max is a shift: no gradient needed
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)   # rows with no key yet
            a = torch.exp(m - m_safe)                           # rescales what was accumulated under the old max
            e = torch.exp(s - m_safe)
            l, o, m = a * l + e.sum(-1, keepdim=True), a * o + e @ v, m_new
        if hop < p - 1:
            k, v = _RingPass.apply(k, group), _RingPass.apply(v, group)
    return o / l


# Context parallelism for a whole model. Attention is the only sublayer where tokens meet; everything else in a
# block (norms, projections, the MLP, the head, the loss) works token by token. So a rank that holds a subset of
# the positions can run all of those on its own tokens, with no communication, and only attention needs the ring.
# The weights are NOT split: every rank holds the whole model (combine with TP or FSDP for that), and since each
# rank's gradient covers only its tokens' contributions, the replicated weights' gradients are summed over the
# group after backward -- exactly data parallelism's reduction, with the sequence in place of the batch.
# Cost per layer: (p - 1) hops of one K and one V block forward, the same for their gradients backward; the
# activation memory per rank is T/p tokens' worth, which is the point: a context p times longer than one rank holds.
# Positions: RoPE rotates q and k by each token's GLOBAL position (ring_layout), so the scores are exactly those of
# the unsplit sequence; padded positions beyond T get clamped into the table and are masked as keys anyway.
# Worked example, T = 13, p = 2: chunks of 4 (padded to 16); rank 0 holds positions 0-3 and 12-15 (12 real), rank 1
# holds 4-11. Rank 0's loss share covers 5 targets, rank 1's 8; the two shares sum to the mean over 13.


class ContextParallelLM(nn.Module):
    """Context parallelism for a whole TransformerLM: the sequence is split over the group by ring_layout, every
    per-token piece (embedding, norms, projections, MLP, head, loss) runs on this rank's tokens only, and attention
    runs as ring_attention. The weights are the wrapped model's own, replicated on every rank; forward(ids, targets)
    returns THIS rank's share of the mean loss (the shares sum to it), and finish_gradient_synchronization() sums the
    replicated weights' gradients over the group after backward (each rank saw only its tokens)."""

    def __init__(self, model, group=None):
        super().__init__()
        cfg = model.config
        bad = {k: getattr(cfg, k) for k, ok in (("mixer", "attention"), ("norm_position", "pre"), ("num_experts", 0),
               ("dropout", 0.0), ("attn_dropout", 0.0)) if getattr(cfg, k) != ok}
        if cfg.position not in ("rope", "nope") or cfg.window is not None:
            bad.update(position=cfg.position, window=cfg.window)
        if bad:
            raise ValueError(f"context parallelism supports causal softmax attention with rope/nope positions, "
                             f"pre-norm, dense FFNs, no dropout; unsupported settings: {bad}")
        self.model, self.group = model, group if group is not None else dist.group.WORLD

    def _attention(self, attn, x, pos, T):
        """The block's attention on this rank's tokens x (B, Tl, d), keys and values from the whole ring."""
        B, Tl, _ = x.shape
        H, Hkv, dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = attn.q_proj(x).view(B, Tl, H, dh).transpose(1, 2)                    # (B, H, Tl, dh)
        k = attn.k_proj(x).view(B, Tl, Hkv, dh).transpose(1, 2)
        v = attn.v_proj(x).view(B, Tl, Hkv, dh).transpose(1, 2)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope is not None:          # padded positions (>= T) are clamped into the table; they are masked
            rp = pos.clamp(max=attn.rope.max_seq_len - 1)
            q, k = attn.rope(q, rp), attn.rope(k, rp)
        if Hkv != H:       # GQA: expand before the ring (a production version would send the Hkv heads only)
            k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        out = ring_attention(q, k, v, T, self.group)                              # (B, H, Tl, dh)
        return attn.output_proj(out.transpose(1, 2).reshape(B, Tl, H * dh))

    def forward(self, ids, targets):
        """ids, targets (B, T), the same full batch on every rank -> this rank's share of the mean loss."""
        # (every rank reads the whole (B, T) ids -- a few KB -- and keeps its own positions; the activations, which
        # are what does not fit, exist only for those)
        p, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        B, T = ids.shape
        pos = ring_layout(T, p, r).to(ids.device)                                # my global positions
        real = pos < T                                                           # the rest is padding
        m = self.model
        x = m.token_embeddings(ring_shard(ids, p, r, dim=1))                     # (B, Tl, d)
        for layer in m.layers:
            x = x + self._attention(layer.attn, layer.ln1(x), pos, T)
            x = x + layer.ffn(layer.ln2(x))
        logits = m.lm_head(m.ln_final(x))[:, real]                               # (B, real Tl, V)
        y = ring_shard(targets, p, r, dim=1)[:, real]
        z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        # a sum over my tokens / all B*T tokens: the ranks' shares add up to the mean over the whole sequence
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), reduction="sum") / (B * T)

    def finish_gradient_synchronization(self):
        """Sum every weight's gradient over the group (each rank's covers only its own tokens' part)."""
        for prm in self.model.parameters():
            if prm.grad is not None:
                dist.all_reduce(prm.grad, group=self.group)


# ===== Appendix: plumbing =====
# Process groups, the local launcher, helpers that make every rank agree or fail together, data preparation on N
# ranks, and the consolidated checkpoint format.
#
def _clear_globally_unused(params, had_grad):
    """A parameter no rank produced a gradient for must end with .grad None, as in single-process training (an
    optimizer skips it; a zero gradient would still move it through momentum and weight decay). One tiny
    all-reduce of 'had a gradient' flags, issued after all of the step's reductions, at the same place on every
    rank."""
    flags = torch.tensor(had_grad, dtype=torch.float32)
    all_reduce_host(flags)
    for p, f in zip(params, flags.tolist()):
        if f == 0:
            p.grad = None


# torchrun starts N copies of this script and tells each one who it is through environment variables:
#   RANK (0..N-1 over all machines), LOCAL_RANK (index on this machine -> which GPU), WORLD_SIZE (N),
#   MASTER_ADDR/MASTER_PORT (where rank 0's rendezvous store listens).
# `init_process_group` connects them. The backend moves the bytes: NCCL between GPUs, gloo between CPU processes.
# A collective blocks until every rank joins it; if one rank never arrives (crashed, different config, took
# another code path) the others would wait forever. This timeout (seconds, --timeout) turns such a hang into an
# error.
DEFAULT_TIMEOUT_S = 120


def init_distributed(backend=None, timeout_s=DEFAULT_TIMEOUT_S):
    """Join the process group described by torchrun's env vars (or a single process if there are none).
    Returns (rank, world_size, device)."""
    # plain `python ddp.py ... --nproc 1` (or a test): a world of one, still a real process group, so the same
    # collectives run (trivially) and the code path is the one N ranks take
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # NCCL moves GPU memory directly between devices (NVLink, InfiniBand); gloo moves CPU tensors over TCP.
    # One process per GPU: LOCAL_RANK picks this process's device on a multi-GPU machine.
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # Under torchrun the agent hosts the rendezvous store and keeps it across restarts; the dead ranks'
            # connection addresses from the previous attempt are still in it, and a restarted rank would try to
            # connect to them. A key prefix per attempt gives every restart a clean namespace.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timeout)
            store = dist.PrefixStore(f"scratchlm_ddp/attempt_{restart}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return rank, world_size, device


def cleanup_distributed():
    # leaving the group explicitly lets every rank exit without the backend's "not destroyed" warnings
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port():
    """A TCP port nobody listens on right now (the OS picks it)."""
    # (bind to port 0 and read back the port the OS chose; a tiny race with other programs is acceptable for a
    # local launcher -- torchrun's own --standalone does the same)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local_rank, world_size, port, threads, fn, args):
    """What mp.spawn runs in each child: torchrun's environment for this rank, its thread count, then fn."""
    # what torchrun would have put in the environment of worker `local_rank` (one machine: rank = local rank)
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    fn(*args)


def launch_local(fn, nprocs, *args):
    """Run fn(*args) in `nprocs` fresh processes on this machine, with the same environment torchrun would give
    them (so fn calls init_distributed() either way). Used by tests and by `bench`/`bench-comm --nproc N`.
    Each process gets cores/N threads: N processes x all cores each would fight over the same cores."""
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    # spawn (not fork): each child starts a fresh interpreter, so no thread pools or CUDA state are inherited;
    # join=True waits for all, and a child that raises or exits non-zero makes mp.spawn raise in the parent
    mp.spawn(_spawn_entry, args=(nprocs, free_port(), threads, fn, args), nprocs=nprocs, join=True)


def _under_launcher():
    """True when torchrun (or launch_local) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_rank():
    """This process's rank from the launcher's environment (0 when there is none), usable before init."""
    return int(os.environ.get("RANK", "0"))


def _run_maybe_spawned(fn, args):
    """Run fn(args) on every rank: here under torchrun, else in --nproc spawned processes."""
    if _under_launcher():
        fn(args)
    else:
        launch_local(fn, args.nproc, args)
    return 0


def rank0_print(*args, **kwargs):
    """print() on rank 0 only (or when there is no process group)."""
    # N ranks printing the same line would interleave N copies: the group speaks through rank 0
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_host(t, op=dist.ReduceOp.SUM):
    """All-reduce a small CPU tensor (loss sums, norms) whatever the backend: NCCL only reduces GPU tensors."""
    # used for the few numbers the ranks must agree on each step: the logged loss, FSDP's squared gradient
    # norm, the shared budget's stop step, evaluation sums
    if dist.get_backend() == "nccl":   # round trip through this rank's GPU (a few bytes: latency only)
        dev = torch.device("cuda", torch.cuda.current_device())
        t_dev = t.to(dev)
        dist.all_reduce(t_dev, op=op)
        t.copy_(t_dev.cpu())
    else:
        dist.all_reduce(t, op=op)
    return t


def check_same_across_ranks(name, value):
    """Fail fast when ranks disagree (different configs, different data): gather every rank's value (a dict or
    anything picklable) and raise on every rank with the differing fields named. Without this a mismatch shows
    up as a hang inside the first collective whose shapes differ, or as silently different models."""
    world = dist.get_world_size()
    values = [None] * world
    dist.all_gather_object(values, value)        # pickled, so any comparable value works (dicts, numbers)
    if all(v == values[0] for v in values):
        return
    if all(isinstance(v, dict) for v in values):
        keys = sorted(set().union(*[v.keys() for v in values]))
        diffs = [f"{k}: " + ", ".join(f"rank{r}={v.get(k, '<missing>')!r}" for r, v in enumerate(values))
                 for k in keys if len({repr(v.get(k, '<missing>')) for v in values}) > 1]
        raise RanksFailedTogether(f"{name} differs across ranks: " + "; ".join(diffs))
    raise RanksFailedTogether(f"{name} differs across ranks: " +
                              ", ".join(f"rank{r}={v!r}" for r, v in enumerate(values)))



class RanksFailedTogether(ValueError):
    """An error every rank raises with the same message (the agreement checks): reported once, by rank 0."""


def _all_ranks_ok(what, fn):
    """Run fn() on every rank; if it raised anywhere, raise on EVERY rank with each failing rank's message (a rank
    that died alone would leave the others blocked in their next collective)."""
    # every rank reaches the all_gather below whether fn() succeeded or not, so the collective always pairs up
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on all ranks, with the rank named
        err = f"{type(e).__name__}: {e}"
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    bad = [(r, e) for r, e in enumerate(errs) if e is not None]
    if bad:
        raise RanksFailedTogether(f"{what} failed on " + "; ".join(f"rank {r}: {e}" for r, e in bad))
    return result


def prepare_data_on_all_ranks(cfg, out, main, say):
    """train.prepare_data on every rank without N ranks racing to build the same caches: rank 0 builds them
    (corpus, tokenizer training, encoding -- possibly hours for a large corpus), the others wait at a barrier with
    a long timeout and then read the finished caches. A failure anywhere fails every rank with its message."""
    # Why not every rank at once: N ranks writing the same cache files race (torn files, N x the work). Errors
    # are caught and carried, not raised: a rank that raised here would skip the barrier below and leave the
    # others waiting for it until the timeout.
    data, err = None, None
    if main:
        try:
            T.check_out_dir(out)
            data = T.prepare_data(cfg, log=say)
        except Exception as e:  # reported on every rank below
            err = f"{type(e).__name__}: {e}"
    # a separate gloo group with a long timeout for this one wait: the default group's timeout (minutes) is
    # meant to catch hangs in training, not a first run that trains a 32K tokenizer
    long_wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))
    dist.barrier(group=long_wait)
    if not main:
        try:
            data = T.prepare_data(cfg, log=lambda *a, **k: None)   # reads rank 0's caches
        except Exception as e:
            err = f"{type(e).__name__}: {e}"

    def report_preparation():
        if err is not None:
            raise RuntimeError(err)
    _all_ranks_ok("data preparation", report_preparation)

    # every rank must see the same data (same token counts, same vocabulary): a rank reading a stale cache from
    # a different tokenizer would train a different problem without any error
    def check_data():
        tr, va = data.train_tokens(), data.val_tokens()
        for name, arr, path in (("training", tr, data.train_path), ("validation", va, data.val_path)):
            if len(arr) < cfg.context_length + 2:
                raise ValueError(f"{name} split {path} has {len(arr)} tokens, fewer than one context window + 1 "
                                 f"({cfg.context_length + 1}): this rank has no data to train on")
        return dict(train_tokens=len(tr), val_tokens=len(va), vocab_size=data.tokenizer.vocab_size)
    check_same_across_ranks("data", _all_ranks_ok("data check", check_data))
    return data


def _resume_state(ckpt_path, resume, G, G_given):
    """What a resumed run needs before train.train reads the checkpoint itself: the ddp entry it was written
    with, the global batch (the checkpoint's, unless --global-batch-size was given: the same batches at any world
    size), and the iteration and loop time already spent. Read on every rank, so a bad file fails on all."""
    prior = dict(train_seconds=0.0, iteration=0)   # a fresh run: no steps and no loop time spent yet
    if not (resume and ckpt_path.exists()):
        return None, G, prior
    ckpt = _all_ranks_ok("reading the checkpoint", lambda: T.read_checkpoint(ckpt_path))
    written_at = ckpt.get("ddp", {})
    G = G if G_given else int(written_at.get("global_batch_size", G))
    prior = dict(train_seconds=float(ckpt.get("train_seconds", 0.0)), iteration=int(ckpt.get("iteration", 0)))
    return written_at, G, prior


def _shared_budget(cfg, written_at, prior, G, data, rank, t_start, say):
    """The run's SharedBudget (None without --max-minutes). The time the loop may use is rank 0's: the budget
    minus what imports, data preparation and the tokenizer took (budget_includes_prep), minus the loop time of the
    run being resumed; a resumed run keeps the loop budget it was started with."""
    if cfg.max_minutes is None:
        return None
    loop_seconds = (written_at or {}).get("loop_budget_seconds")
    if loop_seconds is None:
        loop_seconds = cfg.max_minutes * 60 - ((time.time() - t_start) if cfg.budget_includes_prep else 0.0)
    final_eval = cfg.final_eval_tokens if cfg.final_eval_tokens is not None else len(data.val_tokens())
    budget = SharedBudget(cfg, loop_seconds - prior["train_seconds"], G * cfg.context_length * cfg.grad_accum,
                          final_eval, rank)
    if (written_at or {}).get("budget_spent"):   # the run already ended by its budget: it stays finished
        budget.loop_seconds = 0.0
    left = torch.tensor([budget.loop_seconds if rank == 0 else 0.0], dtype=torch.float64)
    budget.loop_seconds = float(all_reduce_host(left)[0])    # rank 0's figure on every rank
    # the whole run's loop budget (what a later resume starts from): what is left + the loop time already used
    budget.total_loop_seconds = budget.loop_seconds + prior["train_seconds"]
    if budget.loop_seconds <= 5 and prior["iteration"] == 0:
        raise RanksFailedTogether(f"--max-minutes {cfg.max_minutes}: the budget is already used up by data "
                                  f"preparation ({time.time() - t_start:.0f}s)")
    say(f"ddp.py: time budget {cfg.max_minutes:g} min, {max(budget.loop_seconds, 0) / 60:.2f} min left for "
        f"training; rank 0's clock decides, every rank stops at the same step")
    return budget


# Optimizers per strategy: train.py's optimizer over what the strategy trains (ZeRO-1: the same optimizer,
# sharded; FSDP: over the shards and the replicated parameters, and never Muon).

def shard_optimizer(opt):
    """The same optimizer (class, groups, hyperparameters) as a ShardedOptimizer; train.OptimizerGroup (Muon +
    AdamW) becomes a group of sharded members."""
    # Muon + AdamW is two optimizers over disjoint parameter sets: shard each on its own (both balance over all
    # ranks, so every rank owns some matrices and some embeddings/gains)
    if isinstance(opt, T.OptimizerGroup):
        return T.OptimizerGroup([shard_optimizer(o) for o in opt.optimizers])
    import inspect
    # rebuild with the same constructor arguments: opt.defaults may hold extra keys (e.g. "base_lr") that the
    # class does not accept as keywords
    accepted = inspect.signature(type(opt).__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
    return ShardedOptimizer([dict(g) for g in opt.param_groups], type(opt), **kwargs)


FSDP_MUON_ERROR = ("--strategy fsdp and torch-fsdp shard weight matrices by rows, and Muon and SOAP precondition "
                   "whole matrices: use --optimizer adamw with them (or --strategy zero1, which keeps whole "
                   "parameters)")


def build_strategy_optimizer(model, run_model, strategy, cfg):
    """train.py's optimizer over what the strategy trains: FSDP's shards + replicated params, ZeRO-1 sharded."""
    if strategy in SHARDED:
        if cfg.optimizer == "muon":
            raise ValueError(FSDP_MUON_ERROR)
        return T.build_optimizer(run_model, cfg)  # over the shards and the replicated params
    opt = T.build_optimizer(model, cfg)
    return shard_optimizer(opt) if strategy == "zero1" else opt


def _optimizer_params(opt):
    """Every parameter an optimizer holds, in optimizer order (the order consolidated state is keyed by)."""
    # (train.OptimizerGroup exposes its members' groups as its own param_groups, so this covers Muon + AdamW)
    return [p for g in opt.param_groups for p in g["params"]]


# What a collective raises when a peer process is gone or stuck (gloo and NCCL messages, torch's timeouts).
_COMMUNICATION_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out",
                           "Timed out", "NCCL error", "ProcessGroupNCCL", "ProcessGroupGloo", "Socket Timeout")


def _is_communication_failure(e):
    """True for the error a collective raises when another rank died or stopped answering (not a bug here)."""
    return isinstance(e, dist.DistError) or any(text in str(e) for text in _COMMUNICATION_FAILURES)


def _missing_folders(path):
    """The folders of `path` that do not exist yet, deepest first (what this command will create)."""
    missing, p = [], Path(path).absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing


def _remove_if_no_run(created, out):
    """After a failed start: remove the folders this command created, unless a run was saved in them (a
    checkpoint or metrics: those are kept, whatever happened later)."""
    if created and not any((out / f).exists() for f in ("ckpt.pt", "metrics.jsonl")):
        shutil.rmtree(created[-1], ignore_errors=True)        # the top-most folder that did not exist before


# Testing the restart path: the last rank SIGKILLs itself after step N, once. Reached through this environment
# variable (not a command-line flag: it is a test tool, not something a user runs).
DIE_AT_STEP_ENV = "SCRATCHLM_DDP_DIE_AT_STEP"


def _restarted():
    """True in a job torchrun restarted (--max-restarts) after a rank failed: it resumes its own run."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def _die_if_asked(die_at_step, step, rank, world, out):
    """The restart test's fault: the last rank SIGKILLs itself once, after step `die_at_step`."""
    if die_at_step is not None and step == die_at_step and rank == world - 1 and world > 1:
        marker = out / f".died_at_step_{die_at_step}"
        if not marker.exists():  # die only the first time: the restarted job must get past this step
            marker.write_text(f"rank {rank} killed itself at step {step}\n")
            print(f"rank {rank}: {DIE_AT_STEP_ENV}={step}: killing myself (SIGKILL)", flush=True)
            os.kill(os.getpid(), 9)


# ZeRO-1's and FSDP's state is spread over the ranks; these assemble it into (and cut it out of) the format of the
# unsharded model and optimizer. ShardedOptimizer.state_dict / load_state_dict and FSDP.gather_full_params /
# load_full_params call them.

def consolidated_state_dict(opt):
    """Collective. The state dict of the equivalent unsharded `optimizer_cls(params)`: state keyed by global
    parameter index, tensors on CPU. Every rank gets it (all_gather_object); rank 0 saves it."""
    # each rank contributes the state of the parameters it owns, under their global index; the union over
    # ranks is the whole state, exactly as one unsharded optimizer would have it
    mine = {}
    if opt.local_optimizer is not None:
        local_params = [p for g in opt.local_optimizer.param_groups for p in g["params"]]
        gidx = {id(p): i for i, p in enumerate(opt._all_params)}
        for p in local_params:
            if p in opt.local_optimizer.state:
                mine[gidx[id(p)]] = {k: (v.detach().cpu() if torch.is_tensor(v) else v)
                                     for k, v in opt.local_optimizer.state[p].items()}
    parts = [None] * opt.world_size
    dist.all_gather_object(parts, mine)
    state = {}
    for part in parts:
        state.update(part)
    groups, start = [], 0
    for g in opt.param_groups:
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = list(range(start, start + len(g["params"])))
        start += len(g["params"])
        groups.append(d)
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def load_consolidated_state_dict(opt, state_dict):
    """Load a consolidated (unsharded-format) state dict written at any world size: keep our shard's part."""
    groups = state_dict["param_groups"]
    if len(groups) != len(opt.param_groups) or \
            any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, opt.param_groups)):
        raise ValueError("optimizer state dict does not match these parameter groups "
                         f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in opt.param_groups]})")
    for g, saved in zip(opt.param_groups, groups):   # hyperparameters (lr, betas, ...) on every rank
        g.update({k: v for k, v in saved.items() if k != "params"})
    if opt.local_optimizer is None:                  # this rank owns nothing: no state to keep
        return
    state = {int(k): v for k, v in state_dict["state"].items()}
    for i, p in enumerate(opt._all_params):
        if opt._owner[i] == opt.rank and i in state:
            opt.local_optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else
                                                 v.clone() if torch.is_tensor(v) else v)
                                             for k, v in state[i].items()}
    for group, local in zip(opt.param_groups, opt._local_groups):
        if local is not None:
            local.update({k: v for k, v in group.items() if k != "params"})


def _shardable_kind(module):
    """'linear' / 'embedding' for the modules whose 2-D weight FSDP shards; None for the rest (replicated)."""
    if isinstance(module, (nn.Linear, M.Linear)):
        return "linear"
    if isinstance(module, (nn.Embedding, M.Embedding)):
        if isinstance(module, nn.Embedding) and (module.padding_idx is not None or module.max_norm is not None):
            raise ValueError("FSDP supports nn.Embedding without padding_idx/max_norm only")
        return "embedding"
    return None


def _data_dependent_modules(module):
    """Modules that run only for some inputs: MoE experts (an expert nobody routed to is skipped). Their weights
    stay replicated: a gather issued by one rank and not by another would pair up the wrong collectives."""
    skip = set()
    for m in module.modules():
        experts = getattr(m, "experts", None)
        if isinstance(experts, nn.ModuleList):
            skip.update(id(sub) for sub in experts.modules())
    return skip


def _remember_full_names(fsdp, module):
    """Before sharding: the original state-dict names -> live tensors, and the parameter names in order."""
    fsdp._orig_state = list(module.state_dict(keep_vars=True).items())
    fsdp._orig_param_names = [n for n, _ in module.named_parameters()]      # deduplicated, original order


def _index_full_names(fsdp, sharded):
    """After sharding: state-dict key -> its _ShardedWeight (None: replicated), and original parameter name -> the
    Parameter this rank optimizes for it; then drop the references to the full weights (else no memory is saved)."""
    fsdp._weight_of_key = {k: sharded.get(id(t)) for k, t in fsdp._orig_state}
    fsdp._param_of_name = {}
    named = dict(fsdp._orig_state)
    for n in fsdp._orig_param_names:
        sw = sharded.get(id(named[n]))
        fsdp._param_of_name[n] = sw.shard if sw is not None else named[n]
    fsdp._orig_state = [(k, None if fsdp._weight_of_key[k] is not None else t) for k, t in fsdp._orig_state]


@torch.no_grad()
def _fsdp_gather(sw, block):
    """Collective. The full (R, C) tensor from every rank's (rows, C) block (a weight or an optimizer moment)."""
    full = torch.empty(sw.padded_shape(), dtype=block.dtype, device=block.device)
    dist.all_gather_single(full, block.contiguous())
    return full[: sw.full_shape[0]].clone()


@torch.no_grad()
def fsdp_full_state_dict(fsdp):
    """Collective. The full fp32 state dict of the original module, under its original names."""
    out, cache = {}, {}
    for key, t in fsdp._orig_state:
        sw = fsdp._weight_of_key[key]
        if sw is None:
            out[key] = t.detach().clone()
        else:
            if id(sw) not in cache:
                cache[id(sw)] = _fsdp_gather(sw, sw.shard.detach())
            out[key] = cache[id(sw)]
    return out


@torch.no_grad()
def fsdp_load_full_state_dict(fsdp, state_dict):
    """Load a full (unsharded) state dict of the original module: each rank keeps its block of rows."""
    missing = [k for k, _ in fsdp._orig_state if k not in state_dict]
    if missing:
        raise ValueError(f"FSDP.load_full_params: missing keys {missing[:5]}")
    for key, t in fsdp._orig_state:
        src = state_dict[key]
        sw = fsdp._weight_of_key[key]
        if sw is None:
            t.data.copy_(src)
        else:
            if tuple(src.shape) != sw.full_shape:
                raise ValueError(f"FSDP.load_full_params: {key} has shape {tuple(src.shape)}, "
                                 f"expected {sw.full_shape}")
            sw.shard.data.copy_(sw.block(src.to(sw.shard.dtype), fsdp.rank))


def _checkpoint_hooks(*, strategy, G, world, device, out, budget):
    """The TrainHooks entries for checkpoints and the end of the run: load a consolidated optimizer state into
    this strategy's optimizer, write the consolidated state (plus the run's world size, strategy, global batch and
    loop budget), and a plain full model for the samples."""

    def load_optimizer_state(optimizer, run_model, ckpt):
        # the consolidated state is keyed by position: refuse a checkpoint whose parameter order differs
        saved_names = ckpt.get("optimizer_param_names")
        names = optimizer_param_names(run_model, optimizer)
        if saved_names is not None and saved_names != names:
            diff = next(i for i, (a, b) in enumerate(zip(saved_names + [None], names + [None])) if a != b)
            raise ValueError(f"checkpoint {out / 'ckpt.pt'}: optimizer parameter order differs at index {diff} "
                             f"({saved_names[diff:diff + 1]} vs {names[diff:diff + 1]}); was it written "
                             f"with a different --optimizer?")
        full_sd = ckpt.get("optimizer")
        if full_sd is None and ckpt.get("optimizer_by_name"):     # a --tp/--pp checkpoint: AdamW's by name
            full_sd = _adamw_state_by_position(ckpt["optimizer_by_name"], names, optimizer)
        if full_sd is not None:
            load_full_optimizer_state(optimizer, run_model, full_sd)

    def checkpoint_state(model, run_model, optimizer):
        # consolidated, whatever the strategy: any world size and strategy can resume it (collective for
        # ZeRO-1 and FSDP, whose state is spread over the ranks)
        return dict(model=full_model_state(model, run_model), optimizer=full_optimizer_state(optimizer, run_model),
                    optimizer_param_names=optimizer_param_names(run_model, optimizer),
                    ddp=_run_record(world, strategy, G, budget))

    def full_model(model, run_model):
        # the samples at the end need the whole model on rank 0; only FSDP has to gather it (collectively)
        if not isinstance(run_model, (FSDP, TorchFSDP)):
            return model
        sd = full_model_state(model, run_model)  # collective; then a plain copy for generation
        plain = M.TransformerLM.from_config(model.config).to(device)
        plain.load_state_dict(sd)
        return plain

    return dict(load_optimizer_state=load_optimizer_state, checkpoint_state=checkpoint_state, full_model=full_model)


# Consolidated checkpoints: whatever the strategy, the file holds the full model under its original names and the
# optimizer state of the equivalent unsharded optimizer, so any world size and strategy can resume it.


def _adamw_state_by_position(by_name, names, opt):
    """A mesh checkpoint's AdamW state {parameter name: {step, exp_avg, exp_avg_sq}} as the consolidated state of
    this run's optimizer (keyed by position; `names` in optimizer order), if that optimizer is AdamW. None
    otherwise: Muon's or SOAP's state cannot be made from AdamW's, so they start fresh."""
    cls = opt.optimizer_cls if isinstance(opt, ShardedOptimizer) else type(opt)
    if not issubclass(cls, (T.AdamW, torch.optim.AdamW)) or not set(names) <= set(by_name):
        return None
    as_tensor = issubclass(cls, torch.optim.AdamW)            # torch's AdamW keeps its step counter as a tensor
    state = {}
    for i, n in enumerate(names):
        step = int(by_name[n]["step"])
        state[i] = dict(by_name[n], step=torch.tensor(float(step)) if as_tensor else step)
    groups, start = [], 0
    for g in opt.param_groups:
        groups.append(dict({k: v for k, v in g.items() if k != "params"},
                           params=list(range(start, start + len(g["params"])))))
        start += len(g["params"])
    return {"state": state, "param_groups": groups}


def optimizer_param_names(run_model, opt):
    """The original name of each parameter the optimizer holds, in optimizer order (a shard is named after its
    weight). Stored with checkpoints and checked on resume: the consolidated state is keyed by position."""
    # (a different --optimizer or model switch changes the order: Muon's groups, tied weights, frozen layers)
    if isinstance(run_model, FSDP):
        names = {id(p): n for n, p in run_model._param_of_name.items()}
    else:  # every DP wrapper keeps the bare model as .module
        names = {id(p): n for n, p in run_model.module.named_parameters()}
    return [names[id(p)] for p in _optimizer_params(opt)]


def full_model_state(model, run_model):
    """Collective for FSDP. The full state dict of the bare model under its original names (CPU tensors)."""
    # DP wrappers: every rank holds the whole model already (identical on all ranks, rank 0 writes it)
    sd = run_model.gather_full_params() if isinstance(run_model, FSDP) else model.state_dict()
    # (TorchFSDP: each DTensor shard all-gathered, in state-dict order: the same collectives on every rank)
    return {k: _full_tensor(v) for k, v in sd.items()}  # CPU tensors: load anywhere


def full_optimizer_state(opt, run_model):
    """Collective (ZeRO-1, FSDP). The unsharded optimizer's state dict."""
    sd = opt.state_dict()  # ShardedOptimizer.state_dict consolidates itself (collective)
    if isinstance(run_model, TorchFSDP):     # AdamW's moments are DTensors like their parameters: gather each
        return {"state": {i: {k: _full_tensor(v) if torch.is_tensor(v) else v for k, v in st.items()}
                          for i, st in sorted(sd["state"].items())}, "param_groups": sd["param_groups"]}
    if not isinstance(run_model, FSDP):
        return sd
    # FSDP's optimizer state of a sharded weight (AdamW's exp_avg, exp_avg_sq) has the shard's (rows, C) shape:
    # gather the N blocks into the full (R, C) tensor, as an unsharded AdamW would have it. Scalars (step) and
    # replicated parameters' state are the same on every rank and kept as they are.
    shards = {id(sw.shard): sw for sw in run_model._sharded}
    params = _optimizer_params(opt)
    state = {}
    for i in sorted(sd["state"]):
        p = params[i]
        sw = shards.get(id(p))
        state[i] = {k: (_fsdp_gather(sw, v).cpu() if sw is not None and torch.is_tensor(v)
                        and v.shape == p.shape else v) for k, v in sd["state"][i].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt, run_model, full_sd):
    """The inverse of full_optimizer_state: a consolidated optimizer state (written at any world size, by any
    strategy) into this rank's optimizer; FSDP cuts each full-shape tensor down to this rank's row block."""
    if isinstance(run_model, TorchFSDP):       # each full moment cut like its DTensor parameter
        params = _optimizer_params(opt)
        state = {int(i): {k: _shard_like(params[int(i)], v) if torch.is_tensor(v) and v.shape == params[int(i)].shape
                          else v for k, v in st.items()} for i, st in full_sd["state"].items()}
        opt.load_state_dict({"state": state, "param_groups": full_sd["param_groups"]})
        return
    if not isinstance(run_model, FSDP):        # plain or ShardedOptimizer: load_state_dict handles it
        opt.load_state_dict(full_sd)
        return
    shards = {id(sw.shard): sw for sw in run_model._sharded}
    params = _optimizer_params(opt)
    state = {}
    for i, s in full_sd["state"].items():
        p = params[int(i)]
        sw = shards.get(id(p))
        state[int(i)] = {k: (sw.block(v, run_model.rank).clone() if sw is not None and torch.is_tensor(v)
                             and tuple(v.shape) == sw.full_shape else v) for k, v in s.items()}
    opt.load_state_dict({"state": state, "param_groups": full_sd["param_groups"]})


# ---- training on N ranks ----
# The loop is train.py's `train()`, the same code a single process runs; ddp.py only fills in its `TrainHooks`:
# wrap the model (a strategy), build the optimizer over what the wrapper trains (ZeRO-1: sharded; FSDP: shards),
# draw this rank's slice of the global batch, finish the gradient synchronization between backward and the
# optimizer step, clip with a norm summed over shards (FSDP), all-reduce the loss and the eval sums, checkpoint
# collectively (ZeRO-1's and FSDP's state lives on all ranks; rank 0 writes), gather FSDP's weights into a plain
# model for the samples, and agree on when to stop. Around that call: rank agreement checks, data prepared by
# rank 0 first, resume after a torchrun restart. A ddp.py checkpoint is an ordinary ScratchLM checkpoint
# (`train.py sample --checkpoint` reads it).
#
# Batches. The global batch of (step, micro-step) is a function of (seed, step, micro) only: G windows drawn from
# one numpy stream, rank r taking the r-th contiguous 1/N of them. The same step therefore sees the same tokens at
# any world size, so a run checkpointed at N=2 continues at N=1 (or 4) with the same losses, and the averaged
# gradient equals the single-process gradient of the whole batch. Checkpoints are consolidated (see above): any
# world size and any strategy resumes them.

# the --strategy choices, in the order a reader meets them above (torch-ddp: the peer, through the same hooks)
STRATEGIES = ("naive", "ddp", "bucketed", "zero1", "fsdp", "torch-ddp", "torch-fsdp")
SHARDED = ("fsdp", "torch-fsdp")           # strategies whose optimizer steps row shards (AdamW only)
# --compute-dtype: FSDP's dtype for gathered weights and matmuls (None: the parameters' own, fp32)
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass
class DistributedOptions:
    """The training command's own options (it takes every train.py flag too), each one a --flag derived from this
    list by tokenizer.OneLineParser.add_config: what train_distributed and train_mesh take besides the TrainConfig.
    The benchmarks' commands take some of them too (--nproc, --backend, --bucket-mb, --tp, ...).

    strategy: naive: blocking all-reduce after backward; ddp: async all-reduce per parameter from backward
        hooks; bucketed: the same per bucket; zero1: bucketed + ShardedOptimizer (optimizer state / N); fsdp:
        weights, grads and optimizer state / N (trains with AdamW); torch-ddp: torch's DistributedDataParallel;
        torch-fsdp: torch's FSDP2 (fully_shard per block)
    bucket_mb: bucket size in MB for bucketed/zero1/torch-ddp (ours and torch's)
    compute_dtype: fsdp, torch-fsdp: dtype of gathered weights and matmuls (master weights, optimizer stay fp32)
    global_batch_size: sequences per micro-step over all ranks (default: --batch-size x world size; on resume:
        the checkpoint's, so a run continues at another world size with the same batches)
    backend: torch.distributed backend (unset: nccl with CUDA, else gloo)
    timeout: seconds a collective may wait for the other ranks before failing (catches mismatches)
    nproc: without torchrun: spawn this many local processes (training: default the number of GPUs, or 2 on
        CPU); ignored under torchrun, which sets the world size
    tp: tensor-parallel ranks (Megatron: heads, d_ff and vocabulary split); heads, KV heads, d_ff and vocab size
        must divide by it
    pp: pipeline stages (layers split; needs --num-layers >= pp)
    sp: sequence parallelism between the TP regions (needs --tp > 1 and a context length divisible by tp)
    tp_impl: ours: this file's Megatron layers (any mesh); dtensor: torch's DTensor plan (parallelize_module; with
        dp > 1 FSDP2 on the dp dimension; no --pp)
    pp_schedule: pipeline schedule
    micro_batches: pipeline micro-batches per step
    overwrite: replace an earlier run in the run folder (default: refuse; --resume continues it)
    """
    strategy: str = "bucketed"
    bucket_mb: float = 25.0
    compute_dtype: str = "fp32"
    global_batch_size: int | None = None
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    nproc: int | None = 2
    tp: int = 1
    pp: int = 1
    sp: bool = False
    tp_impl: str = "ours"
    pp_schedule: str = "1f1b"
    micro_batches: int = 4
    overwrite: bool = False


def wrap_model(model, strategy, bucket_mb=25.0, compute_dtype=None):
    """The module used for forward/backward under a strategy (zero1 = bucketed gradients + ShardedOptimizer)."""
    if strategy == "naive":
        return NaiveDDP(model)
    if strategy == "ddp":
        return DDP(model)
    if strategy in ("bucketed", "zero1"):
        return DDPBucketed(model, bucket_size_mb=bucket_mb)
    if strategy == "fsdp":
        return FSDP(model, compute_dtype=compute_dtype)
    if strategy == "torch-ddp":
        return TorchDDP(model, bucket_cap_mb=bucket_mb)
    if strategy == "torch-fsdp":
        return TorchFSDP(model, compute_dtype=compute_dtype)
    # (every wrapper broadcasts rank 0's weights at construction: all replicas start equal, whatever each
    # rank initialized or loaded before)
    if strategy == "local":  # benchmarks only: no communication at all (the compute-only baseline)
        return _LocalOnly(model)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


def accumulation_context(run_model, is_last_micro_step):
    """Gradient accumulation over micro-batches: communicate only in the last micro-batch's backward (the DP
    wrappers' no_sync), which then reduces the summed gradient once; FSDP reduce-scatters every micro-batch."""
    return contextlib.nullcontext() if is_last_micro_step else run_model.no_sync()


def clip_gradients(run_model, opt, max_norm):
    """Global L2 norm clipping. DP: every rank holds the full averaged gradient -> train.py's function. FSDP: each
    rank holds only its shards' gradients, so the norm must be assembled across ranks:
        ||g||^2 = sum_r ||g_shards on r||^2  (one all-reduce)  +  ||g_replicated||^2  (same on every rank: once)
    Without the all-reduce each rank would clip by its own partial norm: different scales on different shards,
    i.e. a different update than one process would make."""
    if isinstance(run_model, TorchFSDP):       # every parameter is a shard: ||g||^2 = sum_r ||local shards||^2
        return _clip_sharded(_optimizer_params(opt), max_norm, lambda g: g.to_local(), lambda p: True)
    if not isinstance(run_model, FSDP):
        return T.gradient_clipping(_optimizer_params(opt), max_norm)
    shard_ids = {id(sw.shard) for sw in run_model._sharded}
    return _clip_sharded(_optimizer_params(opt), max_norm, lambda g: g, lambda p: id(p) in shard_ids)


def _clip_sharded(params, max_norm, local, is_shard):
    """Clip by the global norm when is_shard(p) says which gradients are this rank's slices (summed over ranks)
    and which are replicated (the same on every rank: counted once); local(grad) -> its tensor on this rank."""
    params = [p for p in params if p.grad is not None]
    sq_sharded = sum((local(p.grad).float().pow(2).sum().cpu() for p in params if is_shard(p)), torch.zeros(()))
    sq_sharded = all_reduce_host(sq_sharded.to(torch.float64).cpu())
    sq_repl = sum((p.grad.float().pow(2).sum().cpu() for p in params if not is_shard(p)), torch.zeros(()))
    norm = math.sqrt(float(sq_sharded) + float(sq_repl))
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)        # the same eps as train.gradient_clipping
        for p in params:
            local(p.grad).mul_(scale)
    return norm


def global_batch_shard(tokens, global_batch, context_length, seed, step, micro, rank, world, device):
    """Rank `rank`'s contiguous 1/world of the (seed, step, micro) global batch: x, y of shape (G/N, T)."""
    # Every rank draws ALL G windows from the same (seed, step, micro) stream (model.sample_windows, the one
    # random-window sampler) and keeps its own slice: no communication, and the batch does not depend on N. The
    # rank is deliberately not in the seed (train.py's default batches use (seed, step, rank, micro), which would
    # change the data with the world size). Reading G windows instead of G/N costs G (T+1) token reads per step:
    # kilobytes to a few MB, nothing next to the step itself.
    rng = np.random.default_rng([seed, step, micro])
    x, y = M.sample_windows(tokens, global_batch, context_length, rng)           # (G, T) each, same on every rank
    per = global_batch // world
    mine = slice(rank * per, (rank + 1) * per)                                   # (G/N, T): this rank's rows
    return (torch.from_numpy(np.ascontiguousarray(x[mine])).to(device),
            torch.from_numpy(np.ascontiguousarray(y[mine])).to(device))


# A wall-clock budget on N ranks. train.py stops a budgeted run at the top of the first step that starts after the
# deadline, by its own clock. N ranks have N clocks and reach the top of a step at slightly different moments, so a
# deadline falling between them would stop rank 0 before step s and rank 1 after it: rank 1 then waits forever in
# step s's first collective (or pairs it with rank 0's checkpoint gather). The fix: one clock decides. After every
# step, rank 0 turns its clock into a step count -- the last step that fits, from the recent time per step and the
# time the final evaluation needs -- and one tiny all-reduce carries that number to every rank, which sets it as
# the run's max_steps. Every rank then stops at the same step, and because the target is a step count, train.py's
# schedule stretches its learning-rate curve over it exactly as over a --max-steps run (the progress line shows
# "step s/target" and the ETA of that target).

class SharedBudget:
    """Rank 0's wall-clock budget as a step target all ranks agree on (see above). `start()` at the first step,
    `agree(step)` after every step on every rank (a collective) -> the step to stop at."""

    def __init__(self, cfg, loop_seconds, tokens_per_step, final_eval_tokens, rank):
        # every rank builds one (each calls agree() every step), but only rank 0's clock and figures are used
        self.loop_seconds = loop_seconds            # seconds the training loop may use (rank 0's clock)
        self.user_max_steps = cfg.max_steps         # a --max-steps given with the budget is an upper bound
        self.tokens_per_step = tokens_per_step      # over all ranks
        # forward-only tokens of the final evaluation: windows overlap by context/stride
        overlap = cfg.context_length / (cfg.eval_stride or max(cfg.context_length // 2, 1))
        self.eval_tokens = final_eval_tokens * overlap
        self.sample_seconds = 3.0 if cfg.num_samples else 0.0
        self.rank = rank
        self.t0 = time.time()                       # the budget's clock starts now (model building included)
        self.times = collections.deque(maxlen=101)  # (step, time) of the last 100 steps: the recent speed
        self.started = False
        self.stopped_by_budget = False

    def start(self, step):
        # the loop's first step: the speed window starts here (model building and the first compile-like
        # warm-up of the step are in t0's elapsed time, not in the seconds-per-step estimate)
        self.started = True
        self.times.append((step, time.time()))

    def target(self, step):
        """Rank 0: the step to stop at, judged from its clock after `step` steps."""
        now = time.time()
        self.times.append((step, now))
        (s_old, t_old), elapsed = self.times[0], now - self.t0
        # seconds per step over the last (up to) 100 steps: recent enough to follow a change of speed (an eval
        # pass, other load), long enough that one slow step does not swing the target
        sec_per_step = (now - t_old) / max(step - s_old, 1)
        # time kept for the end of the run: the final eval is forward-only (~1/3 of a training step's work per
        # token, counted as 1/1.5 for safety: the same rule as train.py's single-process budget) + samples
        tokens_per_second = self.tokens_per_step / max(sec_per_step, 1e-9)
        reserve = self.eval_tokens / (1.5 * tokens_per_second) + self.sample_seconds
        left = self.loop_seconds - reserve - elapsed
        if left < 0.5 * sec_per_step:                # the next step would end past the deadline: stop here
            return step
        target = step + max(1, round(left / sec_per_step))   # the steps that still fit, at least one more
        return min(target, self.user_max_steps) if self.user_max_steps else target

    def agree(self, step):
        """Collective: every rank gets rank 0's target (a sum in which only rank 0 contributes)."""
        mine = torch.tensor([float(self.target(step)) if self.rank == 0 else 0.0], dtype=torch.float64)
        target = int(all_reduce_host(mine)[0])
        self.stopped_by_budget = target == step and target != self.user_max_steps
        return target


def _communication_share(run_model, train_seconds):
    """The progress line's note: the share of the training time spent blocked waiting for collectives (the
    communication NOT hidden behind compute)."""
    comm = getattr(run_model, "comm_wait_seconds", None)
    return "" if comm is None else f" | blocked on communication {100 * comm / max(train_seconds, 1e-9):.0f}%"


def _run_record(world, strategy, G, budget):
    """A checkpoint's `ddp` entry: how it was written, and the loop budget a resumed run keeps."""
    return dict(world_size=world, strategy=strategy, global_batch_size=G,
                loop_budget_seconds=budget.total_loop_seconds if budget else None,
                budget_spent=bool(budget and budget.stopped_by_budget))


def train_on_ranks(cfg, *, rank, world, device, dp, dp_rank, layout, fingerprint, global_batch_size, hooks_for,
                   fault=None, log=print, t_start=None):
    """What train_distributed and train_mesh share around train.train(): every rank agrees on the run (or all fail
    with the differing fields named), a resumed run keeps its checkpoint's global batch, rank 0 prepares the data
    first, the wall-clock budget becomes a step count all ranks obey (SharedBudget), this replica's share of the
    batch; then the loop on every rank (only rank 0 logs and writes), and the check that all stopped at the same
    step. hooks_for(G, data, budget, common) -> the run's TrainHooks, `common` holding get_batch and on_step.
    dp, dp_rank: the data-parallel size and this rank's place in it (the ranks of one replica share its rows)."""
    t_start = time.time() if t_start is None else t_start
    main, out = rank == 0, Path(cfg.out_dir)
    say = log if main else (lambda *a, **k: None)
    resume = cfg.resume or _restarted()     # torchrun --max-restarts: a restarted job continues from the checkpoint
    check_same_across_ranks("training configuration", dict(dataclasses.asdict(cfg), world_size=world,
                                                           global_batch_size=global_batch_size, **fingerprint))
    written_at, G, prior = _resume_state(out / "ckpt.pt", resume, global_batch_size or cfg.batch_size * dp,
                                         global_batch_size is not None)
    if G % dp:   # (the command line checked this already, except for a resumed checkpoint's batch)
        raise ValueError(f"global batch {G} sequences does not split over {dp} data-parallel ranks; pass "
                         f"--global-batch-size divisible by {dp}")
    data = prepare_data_on_all_ranks(cfg, out, main, say)
    say(f"ddp.py: {layout}; global batch {G} x {cfg.grad_accum} accum x {cfg.context_length} tokens; run folder "
        f"{out}")
    if written_at is not None:
        say(f"ddp.py: resuming a checkpoint written at world size {written_at.get('world_size', '?')} "
            f"({written_at.get('strategy', '?')}), now {layout}")
    budget = _shared_budget(cfg, written_at, prior, G, data, rank, t_start, say)
    # train.train gets a step count that rank 0 keeps re-estimating, never a clock; threads: the launcher's
    # per-rank count (torchrun's OMP_NUM_THREADS, launch_local's cores / N) unless --threads says otherwise
    run_cfg = dataclasses.replace(cfg, batch_size=G // dp, device=str(device), resume=resume, max_minutes=None,
                                  max_steps=cfg.max_steps or 10**9, threads=cfg.threads or torch.get_num_threads())
    if budget is not None and budget.loop_seconds <= 0:   # a resumed run whose budget is spent: no more steps
        run_cfg.max_steps = prior["iteration"]
    train_tokens = data.train_tokens()

    def get_batch(step, micro):
        # (G/dp, T) token windows: this replica's slice of the global batch of (step, micro)
        if budget is not None and micro == 0 and not budget.started:
            budget.start(step)                   # the loop's first step: the budget's clock starts
        return global_batch_shard(train_tokens, G, cfg.context_length, cfg.seed, step, micro, dp_rank, dp, device)

    def on_step(step, model, metrics):
        if fault is not None:
            fault(step)
        if budget is not None:                   # every rank, every step: the shared stop decision
            run_cfg.max_steps = budget.agree(step)

    hooks = hooks_for(G, data, budget, dict(get_batch=get_batch, on_step=on_step, all_reduce=all_reduce_host))
    summary = T.train(run_cfg, data, hooks=hooks, rank=rank, world_size=world, log=log, t_start=t_start)
    check_same_across_ranks("the final step", summary["steps"])   # the shared budget's promise, verified
    dist.barrier()
    spent = budget is not None and (budget.stopped_by_budget or budget.loop_seconds <= 0)
    stop = "time budget" if spent else summary.get("stop_reason")
    say(f"ddp.py: every rank stopped at step {summary['steps']} ({stop})")
    return dict(summary, world_size=world, stop_reason=stop)


def train_distributed(cfg, *, strategy="bucketed", bucket_mb=25.0, compute_dtype=None, global_batch_size=None,
                      die_at_step=None, backend=None, timeout_s=DEFAULT_TIMEOUT_S, log=print, t_start=None):
    """Train per train.py's TrainConfig on every rank of the process group (torchrun) with a data-parallel
    strategy: train_on_ranks with this strategy's hooks. Returns train.train's summary. cfg.max_minutes is a
    budget for the whole group, decided by rank 0's clock (SharedBudget)."""
    rank, world, device = init_distributed(backend, timeout_s)      # blocks until all `world` ranks have joined
    out = Path(cfg.out_dir)

    # The gradient path of one step, in train.train's order: forward/backward per micro-batch (inside
    # accumulation_context) -> sync_gradients (all-reduce / reduce-scatter finished: every rank holds the
    # full-batch mean gradient of what it optimizes) -> clip_gradients (the global norm) -> optimizer.step.
    def hooks_for(G, data, budget, common):
        return T.TrainHooks(
            wrap_model=lambda model: wrap_model(model, strategy, bucket_mb, compute_dtype),
            build_optimizer=lambda model, run_model, c: build_strategy_optimizer(model, run_model, strategy, c),
            no_sync=accumulation_context, sync_gradients=lambda run_model: run_model.finish_gradient_synchronization(),
            clip_gradients=clip_gradients, progress_note=_communication_share, **common,
            **_checkpoint_hooks(strategy=strategy, G=G, world=world, device=device, out=out, budget=budget))
    summary = train_on_ranks(
        cfg, rank=rank, world=world, device=device, dp=world, dp_rank=rank, hooks_for=hooks_for,
        layout=f"{strategy} on {world} rank(s) ({dist.get_backend()}, {device})", global_batch_size=global_batch_size,
        fingerprint=dict(strategy=strategy, bucket_mb=bucket_mb, compute_dtype=str(compute_dtype)),
        fault=lambda step: _die_if_asked(die_at_step, step, rank, world, out), log=log, t_start=t_start)
    return dict(summary, strategy=strategy)


# Every model-parallel communication below reports its payload (numbers handed to the collective; all-gather:
# the gathered size, reduce-scatter: the input size) to COMM_COUNT when it is a Counter, so `ddp.py plan --check`
# can hold a real step's traffic against the formulas. None (the default) costs one comparison per call.
COMM_COUNT = None


def _count(kind, numel):
    """Add `numel` numbers to this step's total for the collective `kind` (only while plan --check measures)."""
    if COMM_COUNT is not None:
        COMM_COUNT[kind] += numel


# ---- composition: a (dp, tp, pp) device mesh ----
# world = dp * tp * pp ranks arranged as a 3-D grid, rank = (d * pp + s) * tp + t. TP is the innermost dimension
# because it communicates most (activations, every layer): its tp partners are neighbouring ranks, i.e. the GPUs
# of one machine. Then PP (one activation per micro-batch per stage boundary), and DP outermost (one gradient
# all-reduce per step, the easiest to overlap). Each rank belongs to one group per dimension:
#   tp group   ranks (d, s, *)  -- the Megatron all-reduces / SP gathers
#   pp ranks   ranks (d, *, t)  -- point-to-point activations and their gradients
#   dp group   ranks (*, s, t)  -- the gradient average (they hold the same shard of the same stage)
# dist.new_group is itself a collective over the whole world: every rank creates EVERY group, in the same order,
# and keeps the ones it is in.


def check_mesh(dp, tp, pp, world):
    """A clear error, before any group or model is built, when the mesh does not tile the world."""
    for name, n in (("dp", dp), ("tp", tp), ("pp", pp)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"mesh size {name} must be a positive integer, got {n!r}")
    if dp * tp * pp != world:
        raise ValueError(f"mesh dp={dp} x tp={tp} x pp={pp} = {dp * tp * pp} ranks, but the world has {world} "
                         f"(start dp*tp*pp processes, or change --tp/--pp)")


# Worked example, 8 ranks as dp = 2, pp = 2, tp = 2: rank 5 = (1 * 2 + 0) * 2 + 1 sits at d = 1, s = 0, t = 1. Its tp
# partner is rank 4 (same d, s), its pipeline is ranks [5, 7] (same d, t), and its dp partner is rank 1 (same s, t),
# which holds the same TP shard of the same stage -- the only rank whose gradients it averages with.


class DeviceMesh:
    """This rank's coordinates (dp_rank, pp_rank, tp_rank) and its tp group, dp group and pipeline ranks."""

    def __init__(self, dp=1, tp=1, pp=1):
        world, rank = dist.get_world_size(), dist.get_rank()
        check_mesh(dp, tp, pp, world)
        self.dp, self.tp, self.pp = dp, tp, pp
        self.dp_rank, rest = divmod(rank, pp * tp)
        self.pp_rank, self.tp_rank = divmod(rest, tp)
        at = lambda d, s, t: (d * pp + s) * tp + t                                  # noqa: E731
        for d in range(dp):
            for s in range(pp):
                g = dist.new_group([at(d, s, t) for t in range(tp)])
                if (d, s) == (self.dp_rank, self.pp_rank):
                    self.tp_group = g
        for s in range(pp):
            for t in range(tp):
                g = dist.new_group([at(d, s, t) for d in range(dp)])
                if (s, t) == (self.pp_rank, self.tp_rank):
                    self.dp_group = g
        for d in range(dp):
            for t in range(tp):
                g = dist.new_group([at(d, s, t) for s in range(pp)])
                if (d, t) == (self.dp_rank, self.tp_rank):
                    self.pp_group = g
        # the pipeline is addressed by global ranks (point-to-point sends name their peer), not by a group
        self.pp_ranks = [at(self.dp_rank, s, self.tp_rank) for s in range(pp)]

    def __repr__(self):
        return f"DeviceMesh(dp={self.dp}, tp={self.tp}, pp={self.pp}; this rank d={self.dp_rank} s={self.pp_rank} " \
               f"t={self.tp_rank})"


class MeshModel(nn.Module):
    """A TransformerLM laid out on a mesh: TP (optionally with SP) or PP inside, DP across. Built from a FULL
    state dict, and `full_state()` returns full (consolidated) model and optimizer state, so a checkpoint written
    at one layout loads at any other. One step: forward_backward(x, y) on this dp rank's rows, then optimizer.step().
    With tp > 1 and pp > 1 each pipeline stage is itself TP-split (TPTransformerLM with a layer range); every tp
    rank of stage s sends its activations to the same tp rank of stage s+1."""

    def __init__(self, cfg, full_sd, mesh, sequence_parallel=False, schedule="1f1b", micro_batches=4):
        super().__init__()
        if sequence_parallel and mesh.tp == 1:
            raise ValueError("sequence parallelism (--sp) splits the sequence over the tp ranks: it needs tp > 1")
        self.mesh, self.schedule, self.micro_batches = mesh, schedule, micro_batches
        # Inside one dp replica the model is either split by tensors (every rank runs every layer on a slice of
        # every matrix) or by layers (each rank runs a few whole layers). Both are built from the same full state
        # dict, so the layout is a choice at load time, never a property of the checkpoint.
        if mesh.pp > 1 and mesh.tp > 1:                                    # TP-split stages of a pipeline
            self.inner = TPTransformerLM(cfg, full_sd, mesh.tp_group, sequence_parallel, mesh.pp_rank, mesh.pp)
        elif mesh.pp > 1:
            self.inner = _stage_from_meta(cfg, full_sd, mesh.pp_rank, mesh.pp)   # only its layers get memory
        else:
            self.inner = TPTransformerLM(cfg, full_sd, mesh.tp_group, sequence_parallel)

    # The DP average here is ONE blocking all-reduce of all gradients flattened into one buffer, after backward:
    # simple, exact, one message's latency (at the cost of a gradient-sized copy). The overlap that DDP/DDPBucketed
    # add (reduce buckets while backward still runs) applies unchanged to the dp group and is the next step.
    def forward_backward(self, x, y):
        """Loss and gradients of this dp rank's batch (x, y), then the DP average: afterwards every rank holds
        its shard of the full (all dp ranks') batch-mean gradient. Returns the global mean loss (every rank)."""
        loss_t = self.local_forward_backward(x, y)
        self.synchronize_gradients()
        if self.mesh.dp > 1:
            dist.all_reduce(loss_t, group=self.mesh.dp_group)
        return float(loss_t) / self.mesh.dp

    def local_forward_backward(self, x, y, scale=1.0):
        """Forward and backward of scale * this replica's mean loss on (x, y); gradients ADD to .grad (so several
        calls accumulate micro-steps). No DP communication. Returns the replica's loss, (1,) float64, on every
        rank of the replica (the pipeline's last stage shares it)."""
        mesh = self.mesh
        if mesh.pp > 1:
            m = min(self.micro_batches, x.shape[0])
            loss = run_pipeline(self.inner, mesh.pp_ranks, list(x.chunk(m)), list(y.chunk(m)), self.schedule,
                                scale=scale)
            loss_t = torch.tensor([loss if loss is not None else 0.0], dtype=torch.float64, device=x.device)
            dist.all_reduce(loss_t, group=mesh.pp_group)                   # only the last stage had it
        else:
            loss = self.inner(x, y)
            (loss if scale == 1.0 else loss * scale).backward()
            loss_t = torch.tensor([loss.item()], dtype=torch.float64, device=x.device)   # (NCCL: on the GPU)
        return loss_t

    def synchronize_gradients(self):
        """After the last backward of a step: the tp ranks' partial gradients of replicated weights summed (SP's
        norms), then the DP average, so every rank holds its shard of the full batch-mean gradient."""
        mesh = self.mesh
        if mesh.pp == 1 or mesh.tp > 1:
            self.inner.finish_gradient_synchronization()                   # SP: the norms' partial gradients
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if mesh.dp > 1 and grads:                                          # DP: average over the dp group
            flat = torch.cat([g.reshape(-1) for g in grads])               # one message: one latency, not ~100
            _count("dp all-reduce", flat.numel())
            dist.all_reduce(flat, group=mesh.dp_group)
            flat /= mesh.dp
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def clip_gradients(self, max_norm):
        """Global L2 norm clipping over the whole model, returns the norm before clipping. A TP shard's squared norm
        is summed over the tp group (each rank holds a different slice); replicated weights (norms) hold the same
        full gradient on every tp rank, so they count once; stages' sums add over the pipeline. After the DP
        average every dp rank holds the same gradients: no dp reduction."""
        grads = [(p.grad, getattr(p, "tp_dim", None) is not None) for p in self.parameters() if p.grad is not None]
        dev = grads[0][0].device if grads else torch.device("cpu")
        split_sq, repl_sq = (torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(2))
        for g, split in grads:
            (split_sq if split else repl_sq).add_(g.double().pow(2).sum())
        if self.mesh.tp > 1:
            dist.all_reduce(split_sq, group=self.mesh.tp_group)           # the slices' sums -> the matrices'
        sq = torch.cat([split_sq, repl_sq])
        if self.mesh.pp > 1:
            dist.all_reduce(sq, group=self.mesh.pp_group)                 # every stage's parameters
        norm = float(sq.sum().sqrt())
        if norm > max_norm:
            for g, _ in grads:
                g.mul_(max_norm / (norm + 1e-6))         # the same eps as train.gradient_clipping
        return norm

    def _full(self, named):
        """{TransformerLM name: full tensor} from this rank's {name: local tensor}: all-gather along tp_dim (TP),
        then merge the stages' pieces (PP) -- the same on every rank."""
        params = dict(self.inner.named_parameters())
        out = {}
        for name, t in named.items():
            dim = getattr(params[name], "tp_dim", None)
            if dim is not None and self.mesh.tp > 1:
                t = _gather_tp(t, dim, self.mesh.tp_group)
            out[name] = t.detach().to("cpu", copy=True)   # CPU (loads anywhere; pickles off the GPU), a copy
        return self._merge_stages(out)

    def _merge_stages(self, named):
        """The union of the pipeline stages' disjoint {name: ...} pieces, pickled to every rank of the pipeline:
        simple, and a copy of the whole model per rank for a moment (a large model would gather to rank 0 only,
        or save per-stage files)."""
        if self.mesh.pp == 1:
            return named
        pieces = [None] * self.mesh.pp
        dist.all_gather_object(pieces, named, group=self.mesh.pp_group)
        return {k: v for piece in pieces for k, v in piece.items()}

    def full_state(self, optimizer=None):
        """(full model state dict, full optimizer state {name: {step, exp_avg, exp_avg_sq, ...}} or None)."""
        # AdamW's moments have their parameter's shape, so they are split, gathered and re-split exactly like it;
        # keyed by parameter NAME (not position), so a layout with other parameter objects can take them back.
        model_sd = self._full({n: p for n, p in self.inner.named_parameters()})
        if optimizer is None:
            return model_sd, None
        named = [(n, p) for n, p in self.inner.named_parameters() if optimizer.state.get(p)]
        keys = sorted({k for _, p in named for k, v in optimizer.state[p].items() if torch.is_tensor(v) and v.dim()})
        opt_sd = {n: {k: v for k, v in optimizer.state[p].items() if not (torch.is_tensor(v) and v.dim())}
                  for n, p in named}                                   # step counters and other scalars
        opt_sd = self._merge_stages(opt_sd)                            # ... of every stage's parameters
        for k in keys:                                                     # gather each moment like its parameter
            for n, t in self._full({n: optimizer.state[p][k] for n, p in named}).items():
                opt_sd.setdefault(n, {})[k] = t
        return model_sd, opt_sd

    def load_optimizer_state(self, optimizer, full_opt):
        """Cut a full optimizer state (full_state's second half, any layout) into this rank's shards."""
        for name, p in self.inner.named_parameters():
            if name not in full_opt:
                continue
            dim = getattr(p, "tp_dim", None)
            state = {}
            for k, v in full_opt[name].items():
                if torch.is_tensor(v) and v.dim() and dim is not None and self.mesh.tp > 1:
                    v = v.chunk(self.mesh.tp, dim=dim)[self.mesh.tp_rank]
                state[k] = v.to(p.device, copy=True) if torch.is_tensor(v) else v
            optimizer.state[p] = state


def _stage_from_meta(cfg, full_sd, stage, num_stages):
    """PipelineStage `stage` without ever building the whole model: TransformerLM on the meta device (shapes, no
    storage), then only this stage's modules materialized and loaded from full_sd (a memory-mapped checkpoint's
    tensors are then read for this stage only). RoPE's tables, buffers and not weights, are computed again; a model
    with other such buffers (e.g. Hyena's filters) is built whole, as before, and keeps its stage's modules."""
    w = full_sd["lm_head.weight"]
    meta = M.TransformerLM.from_config(cfg, device="meta", dtype=w.dtype)
    if any(m._non_persistent_buffers_set for m in meta.modules() if not isinstance(m, M.RotaryPositionalEmbedding)):
        meta = M.TransformerLM.from_config(cfg, device=w.device, dtype=w.dtype)
        meta.load_state_dict(full_sd)
        return PipelineStage(meta, stage, num_stages)
    stage_module = PipelineStage(meta, stage, num_stages).to_empty(device=w.device)
    stage_module.load_state_dict({k: full_sd[k] for k in stage_module.state_dict()})
    for m in stage_module.modules():
        if isinstance(m, M.RotaryPositionalEmbedding):       # (one module, shared by the stage's layers)
            fresh = M.RotaryPositionalEmbedding(m.theta, m.d_k, m.max_seq_len, device=w.device)
            m.cos_table, m.sin_table = fresh.cos_table, fresh.sin_table
    return stage_module


class _TPEvalModel(nn.Module):
    """model(x) -> full (b, T, V) logits for train.evaluate from a tp-only MeshModel's shards, without gathering the
    weights: the tp ranks, each with its own windows, run ONE forward on all of them (gathered, padded to the
    largest rank's count); the logits are all-gathered along the vocabulary and each rank keeps its own rows."""

    def __init__(self, mesh_model):
        super().__init__()
        self.mm = mesh_model

    def forward(self, x):                                                   # (b, T) this rank's windows
        group, mesh = self.mm.mesh.tp_group, self.mm.mesh
        if mesh.tp == 1:
            return self.mm.inner(x)
        n = torch.tensor([x.shape[0]], device=x.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
        b = int(n)
        padded = torch.cat([x, x[:1].expand(b - x.shape[0], -1)])           # (b, T): equal shapes to gather
        logits = _gather_tp(self.mm.inner(_gather_tp(padded, 0, group)), -1, group)   # (tp b, T, V): all windows
        return logits[mesh.tp_rank * b: mesh.tp_rank * b + x.shape[0]]       # (b, T, V): this rank's


def _mesh_optimizer(mesh_model, cfg):
    """AdamW as train.py sets it up: decoupled weight decay on 2-D weights only. Element-wise, so it steps a shard
    exactly as it would step that slice of the full tensor (Muon, which orthogonalizes whole matrices, would not)."""
    params = [p for p in mesh_model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return T.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


# The --tp/--pp training command runs train.train, like the data-parallel strategies, through four extra hooks:
# loss_and_backward (the mesh runs its own forward and backward, under --dtype's autocast: a pipeline schedule, or a
# vocabulary-split loss, never forms full logits), eval_model and full_model (the full weights gathered into the bare
# TransformerLM on every rank: evaluation and samples run on an ordinary model), and tokens_per_step (the tp and pp
# ranks of one replica share its rows, so the step trains on G * T tokens, not world * ...). A mesh run gets the
# periodic evaluation, metrics.jsonl, samples, the shared wall-clock budget, gradient accumulation and resume. Its
# batches are the same as at every other layout (global_batch_shard by dp rank), and its checkpoint is consolidated:
# the full model under TransformerLM's names and AdamW's moments by parameter name ("optimizer_by_name"), so it
# resumes at any mesh, and under plain data parallelism or on one process with AdamW's moments re-keyed by position
# (_adamw_state_by_position). The other way, a data-parallel AdamW checkpoint resumes here with its moments.


def _adamw_state_by_name(ckpt):
    """A data-parallel checkpoint's consolidated optimizer state (keyed by position, with optimizer_param_names)
    re-keyed by parameter name, if it is AdamW's (exp_avg, exp_avg_sq); None otherwise (Muon's, SOAP's state does not
    carry over to AdamW: the mesh run then starts its moments at zero)."""
    names, sd = ckpt.get("optimizer_param_names"), ckpt.get("optimizer")
    if not names or not isinstance(sd, dict) or not sd.get("state"):
        return None
    by_name = {names[int(i)]: dict(st) for i, st in sd["state"].items()}
    return by_name if all({"exp_avg", "exp_avg_sq"} <= set(st) for st in by_name.values()) else None


# What a rank really holds, counted from its tensors (not from the formulas): the distinct storages behind the
# parameters, their gradients and the optimizer's state. A slice or view that keeps a whole tensor alive counts as
# the whole tensor, a storage reached twice counts once. A mesh run's bare TransformerLM (train.py builds it and loads
# the checkpoint into it, before the mesh takes its slices) then gives its weights back, keeping only their shapes:
# it holds the full weights again only while the samples or a pipeline/DTensor evaluation use them, until the next
# step (a tp-only evaluation runs on the shards: _TPEvalModel).


def held_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (None skipped; a DTensor: its local shard's)."""
    storages = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = (t.to_local() if _is_dtensor(t) else t).untyped_storage()
            storages[(str(s.device), s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def training_state_bytes(modules, optimizer):
    """Bytes of the weights, gradients and optimizer state this rank holds for `modules` (each storage once)."""
    params = [p for m in modules for p in m.parameters()]
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return held_bytes(params + [p.grad for p in params] + state)


def peak_rss_bytes():
    """This process's peak resident memory so far (Linux's getrusage reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_weights_(model):
    """Free a module's weights but keep their shapes: each parameter becomes one zero expanded to its shape (one
    number of storage); load_state_dict(..., assign=True) puts real weights back."""
    for p in model.parameters():
        p.data = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)


def _check_finite_shards(run_model):
    """Raise on every rank when any rank's shard holds a non-finite weight (train.py checks the bare model, which
    holds no weights here): never overwrite the last good checkpoint with a diverged run."""
    bad = sum(not bool(torch.isfinite(p.to_local() if _is_dtensor(p) else p).all()) for p in run_model.parameters())
    if all_reduce_host(torch.tensor([float(bad)], dtype=torch.float64))[0]:
        raise FloatingPointError("non-finite weights: training diverged. Not saved; the last good checkpoint is "
                                 "intact (try a lower --lr)")


def _mesh_hooks(cfg, mesh, sp, schedule, micro_batches, tp_impl, G, data, budget, common, held=None):
    """train.TrainHooks for one rank of a (dp, tp, pp) mesh: what it does differently from data parallelism.
    held: a dict the hooks fill (the bare model, the optimizer, the largest training state seen at a step)."""
    held = {} if held is None else held
    mcfg = T.model_config(cfg, data.tokenizer.vocab_size)
    check_tp_config(mcfg, mesh.tp)              # the trained tokenizer's real vocabulary must split too
    held.update(gathered=False, state_bytes=0)

    def wrap_model(model):
        run_model = DTensorTPModel(mcfg, model.state_dict(), mesh, sp) if tp_impl == "dtensor" else \
            MeshModel(mcfg, model.state_dict(), mesh, sp, schedule, micro_batches)
        _release_weights_(model)                # this rank's slices are in run_model: the full weights go
        held["model"] = model
        return run_model

    def build_optimizer(model, run_model, c):
        held["optimizer"] = _mesh_optimizer(run_model, c)
        return held["optimizer"]

    def load_optimizer_state(optimizer, run_model, ckpt):
        full_opt = ckpt.get("optimizer_by_name") or _adamw_state_by_name(ckpt)
        if full_opt is not None:                # (Muon/SOAP state of a data-parallel run: AdamW starts fresh)
            run_model.load_optimizer_state(optimizer, full_opt)

    def checkpoint_state(model, run_model, optimizer):
        # collective: the full model and AdamW state gathered over tp and pp (into the checkpoint, not the model)
        _check_finite_shards(run_model)
        model_sd, opt_sd = run_model.full_state(optimizer)
        return dict(model=model_sd, optimizer=None, optimizer_by_name=opt_sd,
                    mesh=dict(dp=mesh.dp, tp=mesh.tp, pp=mesh.pp, sp=sp),
                    ddp=_run_record(mesh.dp * mesh.tp * mesh.pp, "mesh", G, budget))

    def loss_and_backward(run_model, x, y, scale):
        # --dtype: the same bf16 autocast as train.py's step, here around the mesh's own forward AND backward (a
        # pipeline interleaves them; backward ops run in the dtypes their forward chose either way)
        if held["gathered"]:                    # an evaluation's full weights: not needed any more
            _release_weights_(held["model"])
            held["gathered"] = False
        with T.autocast_context(x.device, cfg.dtype):
            loss = run_model.local_forward_backward(x, y, scale)[0]
        if "optimizer" in held:                 # (train.train built the run: what this rank holds now)
            held["state_bytes"] = max(held["state_bytes"], training_state_bytes([held["model"], run_model],
                                                                                held["optimizer"]))
        return loss

    def gathered_model(model, run_model):
        # collective: evaluation and samples run on the bare TransformerLM holding the current full weights (each
        # rank scores its share of the validation windows with the whole model: one gather per evaluation), given
        # back at the next step
        params = dict(model.named_parameters())
        full = run_model.full_state()[0]
        model.load_state_dict({k: v.to(params[k].device, params[k].dtype) for k, v in full.items()}, assign=True)
        held["gathered"] = True
        return model

    return T.TrainHooks(
        wrap_model=wrap_model, build_optimizer=build_optimizer,
        load_optimizer_state=load_optimizer_state,
        loss_and_backward=loss_and_backward,
        sync_gradients=lambda run_model: run_model.synchronize_gradients(),
        clip_gradients=lambda run_model, opt, max_norm: run_model.clip_gradients(max_norm),
        checkpoint_state=checkpoint_state, full_model=gathered_model,
        eval_model=lambda model, run_model: _TPEvalModel(run_model) if mesh.pp == 1 and tp_impl == "ours" else
        gathered_model(model, run_model),
        tokens_per_step=G * cfg.context_length * cfg.grad_accum, **common)


def train_mesh(cfg, *, tp=1, pp=1, sp=False, schedule="1f1b", micro_batches=4, global_batch_size=None,
               backend=None, timeout_s=DEFAULT_TIMEOUT_S, log=print, t_start=None, tp_impl="ours"):
    """The training command with --tp/--pp: train.train on a (world/(tp*pp), tp, pp) mesh with AdamW (see above),
    by MeshModel or (tp_impl="dtensor") DTensorTPModel; cfg.max_minutes is a budget for the whole group
    (SharedBudget, as train_distributed). Returns the summary."""
    rank, world, device = init_distributed(backend, timeout_s)
    mesh = DeviceMesh(world // (tp * pp), tp, pp)
    held = {}
    summary = train_on_ranks(
        cfg, rank=rank, world=world, device=device, dp=mesh.dp, dp_rank=mesh.dp_rank,
        layout=f"mesh dp={mesh.dp} x tp={tp} x pp={pp}{' +sp' if sp else ''} on {world} ranks"
               f"{' (DTensor)' if tp_impl == 'dtensor' else ''}",
        fingerprint=dict(tp=tp, pp=pp, sp=sp, tp_impl=tp_impl), global_batch_size=global_batch_size, log=log,
        t_start=t_start, hooks_for=lambda G, data, budget, common: _mesh_hooks(
            cfg, mesh, sp, schedule, micro_batches, tp_impl, G, data, budget, common, held))
    # the largest rank's training state at any step, counted from its tensors, and its process's peak memory
    state, rss = all_reduce_host(torch.tensor([float(held["state_bytes"]), float(peak_rss_bytes())],
                                              dtype=torch.float64), op=dist.ReduceOp.MAX).tolist()
    if rank == 0:
        log(f"ddp.py: per rank at most {state / 2**20:.3f} MB of training state (weights, gradients, AdamW: "
            f"counted from the tensors), peak RSS {rss / 2**20:.0f} MB")
    return dict(summary, mesh=(mesh.dp, tp, pp), state_bytes=int(state), peak_rss_bytes=int(rss))


# The memory and traffic of one training step on a mesh, on paper. Per rank, in numbers (x bytes per number):
#   parameters   TP splits q/k/v/o, w1/w2/w3, the embedding and the head by tp; norms stay whole. PP gives stage s
#                its layers (and the embedding on the first, the head on the last).
#   gradients    the same count; AdamW's two moments: twice it.
#   traffic      see the TP, SP, PP and DP comments above: counted as the payload handed to each collective
#                (all-gather: the gathered size), not wire bytes (a ring all-reduce puts 2 (n-1)/n of it on each link).
#   activations  the tensors autograd saves in one forward, counted for model.py's block with F.sdpa (a count of
#                this code, checked against the measured step; another attention backend or norm saves other
#                tensors). Per layer per token, in numbers (d model width, f d_ff, H query heads):
#                  TP:      6 d + 2  +  (4 d + 5 f + H) / tp
#                           replicated: both norms' input and output (4 d) and their 1/rms (2), the residual
#                           stream at the f/g edges (2 d); split: q, k, v (GQA: at H heads after expansion),
#                           the attention output and the o_proj input (4 d over the heads), the log-sum-exp (H),
#                           and SwiGLU's w1 and w3 outputs, silu's, their product and w2's input (5 f)
#                  TP + SP: 2 d  +  (8 d + 5 f + H + 2) / tp
#                           the norms and the residual edges move to (B, T/tp, d) shards; what stays whole is
#                           the two all-gathered inputs of the column-parallel layers (2 d), which their
#                           matmuls keep for backward (Megatron-SP re-gathers them in backward instead)
#                Outside the layers: the logits shard (V / tp), the final norm (3 d; SP: d + 2 d / tp) and ~5
#                small per-token terms (targets, loss statistics), the RoPE tables (2 T d_head, shared by the
#                layers), and the weights the matmuls save (all parameters but the embedding table). Pipeline
#                stages hold several micro-batches in flight; the formula is given for pp = 1 only.


def parallel_plan(cfg, dp=1, tp=1, pp=1, sp=False, batch=8, micro_batches=4):
    """{stage: {"params": n, "comm": {kind: numbers per step}}} for one rank of each pipeline stage; batch = the
    sequences of one dp rank per step, each cfg.context_length long."""
    d, L, V, T, H, Hkv, dh = (cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.context_length, cfg.num_heads,
                              cfg.num_kv_heads, cfg.head_dim)
    split = d * H * dh * 2 + 2 * d * Hkv * dh + 3 * d * cfg.d_ff           # q, o; k, v; w1, w2, w3
    layer = split // tp + 2 * d                                              # + ln1, ln2 (replicated)
    bounds, act = _split_layers(L, pp), batch * T * d                        # act: one (b, T, d) activation
    plan = {}
    for s in range(pp):
        n_layers, first, last = bounds[s + 1] - bounds[s], s == 0, s == pp - 1
        params = n_layers * layer + (V * d // tp if first else 0) + ((V * d // tp + d) if last else 0)
        comm = collections.Counter()
        # TP: 2 per layer forward and 2 backward, + the embedding's g (first stage), + the head's f (last stage)
        regions = 4 * n_layers + first + last
        if tp > 1 and not sp:
            comm["tp all-reduce"] = regions * act + 3 * batch * T * last
        if tp > 1 and sp:
            comm["tp all-gather"] = comm["tp reduce-scatter"] = regions * act
            comm["tp all-reduce"] = 3 * batch * T * last + (2 * n_layers + last) * d   # loss; norm-weight grads
        if pp > 1:   # activations on, gradients back; under SP each tp rank passes its (b, T/tp, d) shard
            comm["pp send"] = (act // tp if sp else act) * ((s < pp - 1) + (s > 0))
        if dp > 1:
            comm["dp all-reduce"] = params
        plan[s] = dict(params=params, grads=params, adamw=2 * params, comm=dict(comm),
                       activations=_activation_numbers(cfg, tp, sp, batch, params) if pp == 1 else None)
    return plan


def _activation_numbers(cfg, tp, sp, batch, params):
    """Numbers autograd saves in one forward of a whole (pp = 1) model on `batch` x T tokens (see above)."""
    d, f, H, V, T = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.vocab_size, cfg.context_length
    per_layer = 2 * d + (8 * d + 5 * f + H + 2) / tp if sp else 6 * d + 2 + (4 * d + 5 * f + H) / tp
    rest = V / tp + (d + 2 * d / tp if sp else 3 * d) + 5
    return batch * T * (cfg.num_layers * per_layer + rest) + 2 * T * cfg.head_dim + params - V * d // tp


# ---- one rank of the training command ----
def _report_error(e, rank):
    """One line per failure: rank 0 reports errors every rank shares; other ranks only their own."""
    # (an error only one rank hit -- its own disk, its own memory -- must still be seen: that rank prints it)
    if rank == 0:
        print(f"ddp.py: error: {e}", file=sys.stderr, flush=True)
    elif not isinstance(e, RanksFailedTogether):
        print(f"ddp.py: rank {rank}: error: {e}", file=sys.stderr, flush=True)


def run_training(args, cfg, t_start=None):
    """One rank of the training command after its checks: train_mesh (--tp/--pp) or train_distributed. Errors a
    user can act on (bad data, an incompatible checkpoint, a diverged run, a full disk) become one line and exit
    status 1; anything else is a bug in the project and keeps its traceback."""
    if getattr(args, "overwrite", False) and not cfg.resume and not _restarted() and _env_rank() == 0:
        # the replaced run's checkpoint must go now: a torchrun restart before the first new checkpoint would
        # otherwise resume the OLD run (metrics.jsonl is restarted by train.train itself)
        with contextlib.suppress(FileNotFoundError):
            os.remove(Path(cfg.out_dir) / "ckpt.pt")
    created = _missing_folders(cfg.out_dir) if _env_rank() == 0 else []   # what a failure should take back
    die = os.environ.get(DIE_AT_STEP_ENV)       # the restart test's fault injection (unset in normal use)
    try:
        if args.tp * args.pp > 1:
            train_mesh(cfg, tp=args.tp, pp=args.pp, sp=args.sp, schedule=args.pp_schedule,
                       micro_batches=args.micro_batches, global_batch_size=args.global_batch_size,
                       backend=args.backend, timeout_s=args.timeout, t_start=t_start, tp_impl=args.tp_impl)
        else:
            train_distributed(cfg, strategy=args.strategy, bucket_mb=args.bucket_mb,
                              compute_dtype=_DTYPES[args.compute_dtype], global_batch_size=args.global_batch_size,
                              die_at_step=int(die) if die else None, backend=args.backend, timeout_s=args.timeout,
                              t_start=t_start)
    except (ValueError, OSError, FloatingPointError) as e:    # errors with a message for the user
        _report_error(e, dist.get_rank() if dist.is_initialized() else _env_rank())
        _remove_if_no_run(created, Path(cfg.out_dir))
        return 1
    except RuntimeError as e:
        if not _is_communication_failure(e):
            raise                                               # anything else is a bug: keep the traceback
        # another rank died or stopped answering: gloo names the peer that closed the connection, and torchrun's
        # summary names the dead rank and its signal
        print(f"ddp.py: rank {_env_rank()}: communication with the other ranks failed: "
              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed()                   # on success and on error: leave the group, free the port
    return 0


def _spawned_train_entry(argv, t_start):
    """One rank spawned by `python ddp.py` (launch_local): the training command, its status as exit code."""
    try:
        code = _train_entry(argv, t_start)
    except UsageError as e:     # (the parent checked the command line already; a folder may have changed since)
        if _env_rank() == 0:
            print(f"ddp.py: error: {e}", file=sys.stderr)
        code = 2
    if code:
        sys.exit(code)   # a non-zero exit tells launch_local (mp.spawn) that this rank failed


def spawn_training(argv, nproc, t_start):
    """`python ddp.py ...` without torchrun: the training command on `nproc` local processes. Returns the status."""
    # one line, so a user who meant to use torchrun sees what happened and how to change it
    print(f"ddp.py: not started by torchrun; spawning {nproc} local processes (--nproc N to change; the usual "
          f"launcher is `torchrun --nproc_per_node={nproc} ddp.py ...`)", flush=True)
    try:   # t_start travels to the ranks: the time budget counts from this command's start, spawning included
        launch_local(_spawned_train_entry, nproc, argv, t_start)
    except mp.ProcessExitedException as e:   # the failing rank has printed its error line
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    return 0


# ===== Appendix: benchmarks =====
# The tour of the collectives, their bandwidth, and every strategy's step time and memory side by side with
# torch's own DistributedDataParallel (the peer).


@dataclasses.dataclass
class BenchOptions:
    """The options of `ddp.py bench | bench-comm | tour | plan` besides DistributedOptions', each a derived --flag
    (TOOLS in the command line says which command takes which).

    strategies: comma list of strategies; 'local' = the same step without any communication (baseline); 'tp',
        'tp-dtensor' = tensor parallelism over all ranks (--tp-impl ours, dtensor) on the same global batch
    dp: data-parallel ranks of the mesh
    vocab_size: model vocabulary
    context_length: tokens per sequence
    d_model: model width
    num_layers: transformer blocks
    num_heads: attention heads
    num_kv_heads: KV heads (default: --num-heads)
    d_ff: SwiGLU hidden width (default: model.py's)
    batch_size: sequences per (data-parallel) rank per step
    rounds: interleaved rounds (median reported)
    steps: steps per strategy per round
    parallel: instead: dp / tp / tp+sp / pp (GPipe, 1F1B) layouts side by side (2 or 4 ranks), and the pipeline
        bubble measured vs (p-1)/(m+p-1)
    min_mb: smallest tensor, MB
    max_mb: largest tensor, MB
    ops: comma list of all_reduce,all_gather,reduce_scatter
    iters: timed iterations per size (median)
    warmup: untimed warm-up iterations per size
    bytes: bytes per number in the MB columns
    check: also run and measure one step on dp*tp*pp local processes (small models only)
    out: write the results as JSON here (rank 0)
    """
    strategies: str = "local,naive,ddp,bucketed,torch-ddp,zero1,fsdp,torch-fsdp,tp,tp-dtensor"
    dp: int = 1
    vocab_size: int = 4096
    context_length: int = 128
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    d_ff: int | None = None
    batch_size: int = 4
    rounds: int = 5
    steps: int = 3
    parallel: bool = False
    min_mb: float = 1.0
    max_mb: float = 1024.0
    ops: str = "all_reduce"
    iters: int = 5
    warmup: int = 2
    bytes: int = 4
    check: bool = False
    out: str | None = None


# `bench --parallel`: the model-parallel layouts side by side on the same model and the same global batch (G
# sequences per step whatever the layout), interleaved in rounds like `bench`, so machine load hits all alike.
# Then the pipeline's bubble: measured from run_pipeline's per-action timestamps (1 - busy / (p x makespan), busy =
# this rank's compute, makespan = first start to last end over all stages) against (p-1)/(m+p-1).


def _parallel_layouts(world):
    """(name, mesh sizes, sp, schedule) of every layout a world of this size can take, plain DP first."""
    out = [("dp", dict(dp=world), False, "1f1b"), ("tp", dict(tp=world), False, "1f1b"),
           ("tp+sp", dict(tp=world), True, "1f1b"), ("pp gpipe", dict(pp=world), False, "gpipe"),
           ("pp 1f1b", dict(pp=world), False, "1f1b")]
    if world == 4:
        out += [("dp2 x tp2", dict(dp=2, tp=2), False, "1f1b"), ("dp2 x pp2", dict(dp=2, pp=2), False, "1f1b"),
                ("tp2 x pp2", dict(tp=2, pp=2), True, "1f1b")]
    return out


def _measured_bubble(mm, xs, ys, schedule):
    """One pipelined step with timestamps; returns (measured bubble, formula) as seen over all stages."""
    # time.perf_counter is CLOCK_MONOTONIC on Linux, one clock for all processes of a machine, so stages' start
    # and end times compare directly (across machines they would need a clock offset first)
    events = []
    dist.barrier(group=mm.mesh.pp_group)
    run_pipeline(mm.inner, mm.mesh.pp_ranks, xs, ys, schedule, events)
    busy = sum(t1 - t0 for _, _, t0, t1 in events)
    span = torch.tensor([min(e[2] for e in events), -max(e[3] for e in events), busy], dtype=torch.float64,
                        device=xs[0].device)
    lo, hi = span[:2].clone(), span[2:].clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=mm.mesh.pp_group)      # earliest start, latest end
    dist.all_reduce(hi, group=mm.mesh.pp_group)                           # busy seconds over all stages
    p, m = mm.mesh.pp, len(xs)
    return 1 - float(hi) / (p * float(-lo[1] - lo[0])), (p - 1) / (m + p - 1)


def bench_parallel(args):
    """One rank of `bench --parallel`."""
    # What to expect on CPU processes with gloo: every layout does the same arithmetic, so the differences are the
    # communication each adds and how little of it overlaps here -- TP's per-layer all-reduces sit on the critical
    # path, SP swaps each for a gather + scatter pair (same payload, twice the calls), PP idles in its bubble. The
    # memory column is the one that shows why they exist: TP and PP hold 1/N of the training state per rank.
    # The measured bubble includes the point-to-point transfers and Python overhead of each action, so it lies
    # above the formula, which assumes free communication; the gap shrinks as per-micro-batch compute grows.
    rank, world, device = init_distributed(args.backend)
    try:
        cfg = _model_config(args)
        torch.manual_seed(0)
        full_sd = M.TransformerLM.from_config(cfg, device=device).state_dict()
        G = args.batch_size * world
        g = torch.Generator().manual_seed(1)
        x, y = (torch.randint(0, cfg.vocab_size, (G, cfg.context_length), generator=g).to(device) for _ in range(2))
        setups = []
        for name, sizes, sp, sched in _parallel_layouts(world):
            mesh = DeviceMesh(**sizes)
            mm = MeshModel(cfg, full_sd, mesh, sp, sched, micro_batches=args.micro_batches)
            rows = slice(mesh.dp_rank * G // mesh.dp, (mesh.dp_rank + 1) * G // mesh.dp)
            opt = T.AdamW(mm.parameters(), lr=1e-4)
            setups.append((name, mm, opt, x[rows], y[rows]))
        # interleaved: round r times every layout once, so a slow moment of the machine hits them all alike; the
        # barriers make each step's time the slowest rank's (a step is done when every rank is done)
        times = collections.defaultdict(list)
        for _ in range(args.rounds):
            for name, mm, opt, xs, ys in setups:
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                mm.forward_backward(xs, ys)
                opt.step()
                dist.barrier()
                times[name].append(time.perf_counter() - t0)
        rank0_print(f"bench --parallel: {machine_label()}; {world} {dist.get_backend()} ranks; d {cfg.d_model}, "
                    f"{cfg.num_layers} layers, vocab {cfg.vocab_size}; global batch {G} x {cfg.context_length}; "
                    f"median of {args.rounds} interleaved rounds")
        rank0_print(f"{'layout':12s}{'ms/step':>10s}{'vs dp':>8s}{'state MB/rank (max)':>22s}")
        base = _median(times["dp"])
        # state per rank: weights + gradients + AdamW's two moments, counted from the tensors this rank holds; the
        # largest rank is reported (a pipeline's first and last stages also hold the embedding and the head)
        for name, mm, opt, _, _ in setups:
            state = training_state_bytes([mm], opt)
            worst = all_reduce_host(torch.tensor([float(state)]), op=dist.ReduceOp.MAX)
            rank0_print(f"{name:12s}{1000 * _median(times[name]):10.1f}{_median(times[name]) / base:8.2f}"
                        f"{float(worst) / 2**20:22.2f}")
        rank0_print(f"{'layout':12s}{'p':>3s}{'m':>4s}{'bubble measured':>17s}{'formula':>9s}")
        for name, mm, _, xs, ys in setups:
            if mm.mesh.pp > 1 and mm.mesh.dp == 1:
                for m in (1, 2, 4, 8):
                    if xs.shape[0] >= m:
                        meas, formula = _measured_bubble(mm, list(xs.chunk(m)), list(ys.chunk(m)), mm.schedule)
                        rank0_print(f"{name:12s}{mm.mesh.pp:3d}{m:4d}{meas:17.3f}{formula:9.3f}")
    finally:
        cleanup_distributed()


def measure_plan_step(cfg, mesh, sp=False, batch=8, micro_batches=4, seed=0, device="cpu"):
    """One real step on this rank of `mesh` (AdamW, random tokens): its parameter, gradient and AdamW numbers,
    the payload of every collective (COMM_COUNT), the bytes of the tensors autograd saved in forward, the bytes of
    training state the rank holds (training_state_bytes) and its process's peak RSS."""
    global COMM_COUNT
    torch.manual_seed(seed)
    full = M.TransformerLM.from_config(cfg, device=device)
    mm = MeshModel(cfg, full.state_dict(), mesh, sp, "1f1b", micro_batches)
    del full
    opt = T.AdamW(mm.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), generator=g).to(device) for _ in range(2))
    # Activation memory is what autograd keeps from forward for backward. A saved-tensors hook sees every tensor it
    # keeps; summing distinct storages gives the bytes alive at the end of forward (weights autograd saves for the
    # matmul backward are counted too, and views of one storage once). This is the number SP shrinks: the norms'
    # inputs and the residual stream become (B, T/tp, d) per rank, while the attention and MLP insides already
    # were split by TP. With PP it is the in-flight micro-batches' activations on this stage.
    saved = {}

    def pack(t):                                  # count each saved storage once (views share one)
        if t.device.type != "meta":
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    COMM_COUNT = collections.Counter()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mm.forward_backward(x, y)
        comm = dict(COMM_COUNT)
    finally:
        COMM_COUNT = None
    opt.step()
    numel = lambda ts: sum(t.numel() for t in ts)                            # noqa: E731
    return dict(params=numel(mm.parameters()), grads=numel(p.grad for p in mm.parameters() if p.grad is not None),
                adamw=numel(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()),
                activation_bytes=sum(saved.values()), comm=comm, state_bytes=training_state_bytes([mm], opt),
                peak_rss=peak_rss_bytes())


def collectives_tour():
    """Print what each collective does on tiny tensors (run: python ddp.py tour, or under torchrun)."""
    rank, world, device = init_distributed()
    lines = []
    show = lambda what, t: lines.append(f"rank {rank}: {what:36s} {[round(v, 2) for v in t.tolist()]}")
    # rank r holds [10r, 10r+1, 10r+2, 10r+3]: every printed number says which rank it came from
    x = torch.arange(4, dtype=torch.float32, device=device) + 10 * rank
    # (each call below blocks until every rank has called it: collectives are rendezvous points)
    show("mine", x)
    # (name, output buffer, the call that fills it); reduce-scatter needs 4 elements to split over the world
    steps = [("all_reduce(SUM)", x.clone(), lambda out: dist.all_reduce(out, op=dist.ReduceOp.SUM)),
             ("ring_all_reduce (send/recv only)", x.clone(), ring_all_reduce),
             ("all_gather", torch.empty(world * 4, device=device), lambda out: dist.all_gather_single(out, x))]
    if 4 % world == 0:
        steps.append(("reduce_scatter (my chunk of the sum)", torch.empty(4 // world, device=device),
                      lambda out: dist.reduce_scatter_single(out, x)))
    steps.append(("broadcast from rank 0", x.clone(), lambda out: dist.broadcast(out, src=0)))
    for what, out, call in steps:
        call(out)
        show(what, out)
    # N processes printing at once interleave their lines: gather every rank's lines to rank 0, print in order
    everyone = [None] * world
    dist.all_gather_object(everyone, lines)
    if rank == 0:
        for i in range(len(lines)):
            for r in range(world):
                print(everyone[r][i])
    cleanup_distributed()


def _timed_collective(op, nbytes, device, iters, warmup):
    """Seconds per call of `op` on an fp32 tensor of nbytes (median of iters after warmup)."""
    world = dist.get_world_size()
    n = nbytes // 4                                    # fp32 elements
    # S = nbytes is the size of the RESULT each rank ends with (the nccl-tests convention): all-reduce's whole
    # tensor, all-gather's concatenation, reduce-scatter's input (each rank keeps 1/N of it)
    if op == "all_reduce":
        x = torch.ones(n, device=device)
        call = lambda: dist.all_reduce(x)
    elif op == "all_gather":
        x, out = torch.ones(n // world, device=device), torch.empty(n // world * world, device=device)
        call = lambda: dist.all_gather_single(out, x)
    elif op == "reduce_scatter":
        x, out = torch.ones(n // world * world, device=device), torch.empty(n // world, device=device)
        call = lambda: dist.reduce_scatter_single(out, x)
    else:
        raise ValueError(f"unknown collective {op!r}")
    times = []
    for i in range(warmup + iters):
        dist.barrier()                                 # start together, or we time the wait for a late rank
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64)
    all_reduce_host(t, op=dist.ReduceOp.MAX)          # the slowest rank's time is the collective's time
    return float(t.item())


def bench_comm(args):
    """Time all-reduce (and all-gather / reduce-scatter) from --min-mb to --max-mb fp32 bytes, doubling."""
    rank, world, device = init_distributed(args.backend)
    ops = args.ops.split(",")
    rank0_print(f"bench-comm: world {world}, backend {dist.get_backend()}, device {device}, "
                f"{args.iters} timed iterations after {args.warmup} warm-up (median, slowest rank)")
    rank0_print("busbw = algbw * 2(N-1)/N for all_reduce, * (N-1)/N for all_gather/reduce_scatter: the bytes "
                "each rank's link carries in a ring")
    rank0_print(f"{'op':15s} {'size':>10s} {'time ms':>10s} {'algbw GB/s':>11s} {'busbw GB/s':>11s}")
    # sizes double from min to max: small messages show the per-call latency (alpha), large ones the bandwidth
    rows = []
    mb = args.min_mb
    while mb <= args.max_mb:
        nbytes = int(mb * 2**20)
        for op in ops:
            t = _timed_collective(op, nbytes, device, args.iters, args.warmup)
            factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
            algbw = nbytes / t / 1e9
            rows.append(dict(op=op, mb=mb, seconds=t, algbw=algbw, busbw=algbw * factor, world=world))
            rank0_print(f"{op:15s} {mb:>8g}MB {t * 1e3:10.3f} {algbw:11.3f} {algbw * factor:11.3f}")
        mb *= 2
    if args.out and rank == 0:
        atomic_write_json(args.out, rows)
    cleanup_distributed()


class TorchDDP(nn.Module):
    """torch.nn.parallel.DistributedDataParallel behind our interface: the peer in benchmarks (C++ reducer,
    25 MB buckets after a 1 MB first bucket, all-reduces launched from autograd hooks like ours)."""
    # It is also a training strategy (--strategy torch-ddp): the same run with torch's implementation, which is
    # the check that our wrappers' results and speed are what the field's standard gives.

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module = module
        self.ddp = nn.parallel.DistributedDataParallel(module, **kwargs)

    def forward(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()

    def finish_gradient_synchronization(self):
        pass  # torch's reducer waits for its all-reduces at the end of backward (inside loss.backward())



class _LocalOnly(nn.Module):
    """The 'local' baseline of `bench`: the same step with no communication at all."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_gradient_synchronization(self):
        pass


# Step time = forward + backward + gradient synchronization + optimizer step, per rank, timed between barriers.
# Strategies take turns: R rounds, each running k steps of every strategy in a rotated order, and we report the
# median round, so a change in the machine's speed during the run hits all strategies alike.
# "local" runs the same step with no communication at all: exposed communication share = 1 - t_local / t.
# Memory: bytes of parameters + gradients + optimizer state this rank holds (counted from the tensors), and for FSDP
# the peak of gathered full weights alive at once.

def _tensor_bytes(ts):
    """Bytes this rank holds for the tensors of `ts` (None entries count 0; a DTensor: its local shard)."""
    ts = [t.to_local() if _is_dtensor(t) else t for t in ts if t is not None]
    return sum(t.numel() * t.element_size() for t in ts)


def _optimizer_state_bytes(opt):
    """Bytes of optimizer state THIS rank holds (ZeRO-1: its own shard only)."""
    if isinstance(opt, ShardedOptimizer):
        return opt.local_state_bytes()
    return _tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


BENCH_TP = {"tp": "ours", "tp-dtensor": "dtensor"}      # bench's tensor-parallel rows: --tp-impl


def _bench_setups(args, cfg, strategies, device, batch):
    """strategy -> (bare model, wrapped model, optimizer): the same model (seed 0) under every strategy. The TP
    rows train on `batch`, the whole global batch (every rank of the tp group sees all of it)."""
    # each strategy gets its own copy and its own optimizer, built once; the timed loop then runs them in turns,
    # so all of them see the same machine conditions
    setups = {}
    for s in strategies:
        torch.manual_seed(0)
        model = M.TransformerLM.from_config(cfg).to(device)
        model.validate_inputs = False          # skip the token-id range check (a device sync) in timed steps
        if s in BENCH_TP:
            mesh = DeviceMesh(tp=dist.get_world_size())
            run = (DTensorTPModel if s == "tp-dtensor" else MeshModel)(cfg, model.state_dict(), mesh)
            run.bench_batch = batch
            run.inner.validate_inputs = False   # (DTensor's TransformerLM: no id-range check, as above)
        else:
            run = wrap_model(model, s, args.bucket_mb, _DTYPES[args.compute_dtype] if s in SHARDED else None)
        params = [p for p in run.parameters() if p.requires_grad]
        opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-4) if s == "zero1" else \
            torch.optim.AdamW(params, lr=1e-4)
        setups[s] = (model, run, opt)
    return setups


def _bench_step(setup, x, y, measure_memory=False):
    """One training step exactly as the training loop runs it (forward, loss, backward, sync, optimizer); with
    measure_memory, the bytes of params, grads and optimizer state this rank holds, measured at their peak."""
    model, run, opt = setup
    if hasattr(run, "bench_batch"):                                   # tp: the mesh's own step (no full logits)
        run.forward_backward(*run.bench_batch)
    else:
        logits = run(x)                                               # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        run.finish_gradient_synchronization()
    mem = None
    if measure_memory:                       # gradients exist between backward and zero_grad
        params = list(run.parameters())
        mem = dict(params=_tensor_bytes(params), grads=_tensor_bytes(p.grad for p in params))
    opt.step()
    if measure_memory:                       # optimizer state exists after the first step
        mem["optimizer"] = _optimizer_state_bytes(opt)
        mem["total"] = mem["params"] + mem["grads"] + mem["optimizer"]
        mem["gathered_peak"] = getattr(run, "peak_gathered_bytes", 0)
    opt.zero_grad(set_to_none=True)
    return mem


def _bench_rounds(args, setups, strategies, x, y):
    """Interleaved timing: per strategy, a list of seconds per step (one per round) and of seconds blocked."""
    times = {s: [] for s in strategies}
    comm_wait = {s: [] for s in strategies}
    for r in range(args.rounds):
        # rotate the order each round: no strategy always runs first (cold caches) or right after a heavy one
        order = strategies[r % len(strategies):] + strategies[:r % len(strategies)]
        for s in order:
            run = setups[s][1]
            w0 = getattr(run, "comm_wait_seconds", 0.0)
            dist.barrier()                 # all ranks start together; the slowest rank's time is the step time
            t0 = time.perf_counter()
            for _ in range(args.steps):
                _bench_step(setups[s], x, y)
            dist.barrier()
            times[s].append((time.perf_counter() - t0) / args.steps)
            comm_wait[s].append((getattr(run, "comm_wait_seconds", 0.0) - w0) / args.steps)
    return times, comm_wait


def _median(values):
    # median over rounds: one slow round (another process woke up) moves it little, unlike a mean
    return sorted(values)[len(values) // 2]


def _bench_time_table(args, setups, strategies, times, comm_wait):
    """Print (rank 0) and return the step-time rows: median ms, ratio to torch's DDP (medians and paired), the
    exposed-communication share and the time blocked in our wrappers' waits."""
    med = {s: _median(v) for s, v in times.items()}
    peer = "torch-ddp" if "torch-ddp" in times else None
    # paired ratio: each round's time over the peer's time in the SAME round, median over rounds. The machine's
    # speed may drift between rounds; within one round both ran under (nearly) the same conditions.
    paired = {s: _median([t / p for t, p in zip(times[s], times[peer])]) if peer else float("nan")
              for s in strategies}
    local = med.get("local")
    rows = []
    rank0_print(f"{'strategy':10s} {'step ms':>9s} {'vs torch-ddp':>12s} {'(paired)':>9s} {'exposed comm':>12s} "
                f"{'blocked waiting':>15s}  rounds (ms)")
    pct = lambda v: f"{v:.1%}" if math.isfinite(v) else "-"
    for s in strategies:
        share = (1 - local / med[s]) if local and s != "local" else float("nan")
        wait = _median(comm_wait[s]) / med[s]
        ratio = med[s] / med[peer] if peer else float("nan")
        rows.append(dict(strategy=s, step_ms=1e3 * med[s], ratio_vs_torch_ddp=ratio, paired_ratio=paired[s],
                         exposed_comm_share=share, wait_share=wait, rounds_ms=[1e3 * t for t in times[s]]))
        waited = pct(wait) if hasattr(setups[s][1], "comm_wait_seconds") else "(not visible)"
        rank0_print(f"{s:10s} {1e3 * med[s]:9.1f} {ratio:12.3f} {paired[s]:9.3f} {pct(share):>12s} {waited:>15s}  "
                    f"{' '.join(f'{1e3 * t:.0f}' for t in times[s])}")
    rank0_print("exposed comm = 1 - t(local) / t: step time not hidden behind compute; blocked waiting = time inside "
                "our wrappers' waits (torch's reducer waits inside backward, not visible)")
    for ours, peer in (("fsdp", "torch-fsdp"), ("tp", "tp-dtensor")):     # ours against torch's, round by round
        if {ours, peer} <= set(strategies):
            rank0_print(f"{ours} / {peer} step time: {med[ours] / med[peer]:.3f} (paired "
                        f"{_median([a / b for a, b in zip(times[ours], times[peer])]):.3f})")
    if "fsdp" in strategies and args.compute_dtype != "fp32":
        rank0_print(f"(fsdp computes in {args.compute_dtype}, 'local' in fp32: fsdp's exposed-comm share also holds "
                    f"the compute-speed difference; CPUs without native {args.compute_dtype} matmuls are much slower)")
    return rows


def _bench_memory_table(memory, strategies, rows, world):
    """Print (rank 0) per-rank memory of every strategy, the largest figure over ranks (ZeRO's shards need not be
    exactly equal); every rank's figures are gathered to rank 0."""
    all_mem = [None] * world
    dist.all_gather_object(all_mem, memory)
    mem = {s: {k: max(m[s][k] for m in all_mem) for k in memory[s]} for s in strategies}
    base = mem.get("ddp") or mem.get("bucketed") or mem[strategies[0]]
    rank0_print(f"memory per rank (max over ranks), MB: {'params':>8s} {'grads':>8s} {'optim':>8s} {'total':>8s} "
                f"{'vs ddp':>7s} {'gathered peak':>13s}")
    for s in strategies:
        m = mem[s]
        rank0_print(f"  {s:34s} {m['params'] / 2**20:8.2f} {m['grads'] / 2**20:8.2f} {m['optimizer'] / 2**20:8.2f} "
                    f"{m['total'] / 2**20:8.2f} {m['total'] / base['total']:7.3f} {m['gathered_peak'] / 2**20:13.2f}")
        next(r for r in rows if r["strategy"] == s)["memory_bytes"] = m
    if "zero1" in mem:
        rank0_print(f"ZeRO-1 optimizer state per rank / unsharded: {mem['zero1']['optimizer'] / base['optimizer']:.3f} "
                    f"(ideal 1/{world} = {1 / world:.3f})")


def bench(args):
    """`python ddp.py bench`: every strategy on the same model and per-rank batch, side by side, interleaved."""
    rank, world, device = init_distributed(args.backend)
    cfg = _model_config(args)
    strategies = [s for s in args.strategies.split(",") if world > 1 or s not in BENCH_TP]   # (tp: 2+ ranks)
    # random tokens: the step's cost does not depend on the text (no data pipeline in the timed loop); one global
    # batch of batch_size x world rows, each data-parallel rank taking its own rows
    g = torch.Generator().manual_seed(1234)
    X, Y = (torch.randint(0, cfg.vocab_size, (args.batch_size * world, cfg.context_length), generator=g).to(device)
            for _ in range(2))
    mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)
    x, y = X[mine], Y[mine]
    setups = _bench_setups(args, cfg, strategies, device, (X, Y))
    n_params = M.num_params(setups[strategies[0]][0])
    rank0_print(f"bench: {world} ranks ({dist.get_backend()}, {device}, {torch.get_num_threads()} threads/rank), "
                f"TransformerLM {n_params / 1e6:.2f}M params (d_model {cfg.d_model}, {cfg.num_layers} layers, "
                f"vocab {cfg.vocab_size}), per-rank batch {args.batch_size} x {cfg.context_length} tokens; "
                f"{args.rounds} rounds x {args.steps} steps per strategy, interleaved; {machine_label()}")
    # two untimed steps per strategy: allocator warm-up, DDP's bucket order rebuild and FSDP's use-order
    # recording all happen on the first step(s) and are not what a long run pays per step
    memory = {s: _bench_step(setups[s], x, y, measure_memory=True) for s in strategies}
    for s in strategies:
        _bench_step(setups[s], x, y)
    times, comm_wait = _bench_rounds(args, setups, strategies, x, y)
    rows = _bench_time_table(args, setups, strategies, times, comm_wait)
    _bench_memory_table(memory, strategies, rows, world)
    if args.out and rank == 0:
        atomic_write_json(args.out, dict(world=world, params=n_params, rows=rows, machine=machine_label(),
                                         load_average=os.getloadavg()))
    cleanup_distributed()


def _model_config(args):
    """The model.ModelConfig of `bench` and `plan` (default d_ff / num_kv_heads resolved by ModelConfig)."""
    return M.ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                         num_layers=args.num_layers, num_heads=args.num_heads,
                         num_kv_heads=getattr(args, "num_kv_heads", None), d_ff=getattr(args, "d_ff", None))


def _tour_entry(args=None):
    collectives_tour()


def _plan(a):
    """`plan` without --check: the formulas alone (no processes: any size); with it, the step on dp*tp*pp ranks."""
    # (the formulas answer for models far larger than this machine holds -- choosing tp and pp before renting the
    # devices; --check proves the same code path on a model small enough to run here)
    if not a.check:
        _print_plan(a)
        return 0
    a.nproc = a.dp * a.tp * a.pp
    return _run_maybe_spawned(_plan_entry, a)


def _plan_entry(args):
    """One rank of `plan --check`: a real step on the mesh; rank 0 gathers every rank's measurement and prints."""
    # every rank measures its own step (its shard, its stage); the first rank of each pipeline stage speaks for the
    # stage (all dp and tp ranks of one stage hold the same amounts)
    _, _, device = init_distributed(args.backend)
    try:
        mesh = DeviceMesh(args.dp, args.tp, args.pp)
        got = measure_plan_step(_model_config(args), mesh, args.sp, args.batch_size, args.micro_batches,
                                device=device)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (mesh.pp_rank, got))
        if dist.get_rank() == 0:
            _print_plan(args, {s: g for s, g in reversed(every)})
    finally:
        cleanup_distributed()


# Reading the plan: params/grads/adamw are what this rank stores (x 4 bytes in fp32 training: weights, gradients and
# two moments: 16 bytes per parameter, split by tp and pp). The traffic rows are per step; dividing by the link's
# bandwidth gives the communication time to hide behind compute. TP's rows grow with batch x context (tokens), DP's
# with the parameter count, PP's only with the activations at one boundary.


def _print_plan(args, measured=None):
    """The plan as a table (MB at --bytes per number), one block per pipeline stage, measured values alongside."""
    cfg = _model_config(args)
    plan = parallel_plan(cfg, args.dp, args.tp, args.pp, args.sp, args.batch_size, args.micro_batches)
    mb = lambda n: f"{n * args.bytes / 2**20:10.3f}"                        # noqa: E731
    print(f"plan: mesh dp={args.dp} x tp={args.tp} x pp={args.pp}{' +sp' if args.sp else ''}; {args.batch_size} x "
          f"{cfg.context_length} tokens per dp rank per step; MB at {args.bytes} bytes per number")
    for s, row in plan.items():
        got = (measured or {}).get(s)
        print(f"stage {s}:{'':22s}{'formula':>10s}" + (f"{'measured':>12s}" if got else ""))
        for k in ("params", "grads", "adamw"):
            print(f"  {k:28s}{mb(row[k])}" + (f"  {mb(got[k])}" if got else ""))
        for kind in sorted(set(row["comm"]) | set((got or {}).get("comm", {}))):
            print(f"  {kind + ' per step':28s}{mb(row['comm'].get(kind, 0))}" +
                  (f"  {mb(got['comm'].get(kind, 0))}" if got else ""))
        if row["activations"] is not None or got:    # (the formula's numbers at --bytes; measured: real bytes)
            formula = mb(row["activations"]) if row["activations"] is not None else f"{'(pp > 1)':>10s}"
            measured_mb = f"  {got['activation_bytes'] / 2**20:10.3f}" if got else ""
            print(f"  {'saved activations':28s}{formula}{measured_mb}")
        if got:          # weights + gradients + AdamW's two moments (formula) against the rank's tensors (bytes)
            print(f"  {'training state':28s}{mb(4 * row['params'])}  {got['state_bytes'] / 2**20:10.3f}")
            print(f"  {'peak RSS (process)':28s}{'':10s}  {got['peak_rss'] / 2**20:10.3f}")
    if measured is not None and args.pp == 1:
        worst = max(abs(plan[s]["activations"] * args.bytes / measured[s]["activation_bytes"] - 1) for s in plan)
        print(f"plan: saved activations formula within {100 * worst:.1f}% of the measured step")
    if measured is not None:
        same = all(measured[s][k] == plan[s][k] for s in plan for k in ("params", "grads", "adamw")) and \
            all(measured[s]["comm"] == plan[s]["comm"] for s in plan)
        print("plan: every formula equals the measured step" if same else "plan: MISMATCH between formula and step")


# ===== Command line =====
# Under torchrun every rank runs this same command line: every check runs on every rank, BEFORE the process group
# exists (nothing to hang on) and before any data or model work; only rank 0 prints, a usage error is one line.

class UsageError(ValueError):
    """A bad command line: one line on stderr (rank 0 only) and exit status 2."""


def _raise_usage_errors(p):
    """A tokenizer.OneLineParser prints its one-line error and exits; here every rank parses the same argv, so the
    error is raised instead (UsageError) and main() prints it on rank 0 only."""
    def error(message):
        raise UsageError(f"{message} (see {p.prog} --help)")
    p.error = error
    return p


_CHOICES = {"strategy": STRATEGIES, "compute_dtype": tuple(_DTYPES), "backend": ("gloo", "nccl"),
            "pp_schedule": tuple(SCHEDULES), "tp_impl": ("ours", "dtensor")}
# the lowest value of each numeric option (None: not given); floats must be above 0
_LOWEST = dict(dict.fromkeys(("global_batch_size", "nproc", "dp", "tp", "pp", "micro_batches", "vocab_size",
                              "context_length", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_ff",
                              "batch_size", "rounds", "steps", "iters", "bytes"), 1), warmup=0)
_POSITIVE = ("bucket_mb", "timeout", "min_mb", "max_mb")


def _add_options(p, names, defaults=None):
    """The DistributedOptions and BenchOptions fields `names` as flags of parser p, with their choices (a flag p
    already has, like train.py's --overwrite, stays as it is)."""
    for cls in (DistributedOptions, BenchOptions):
        skip = [f.name for f in dataclasses.fields(cls) if f.name not in names] + [a.dest for a in p._actions]
        p.add_config(cls, skip=skip, defaults=defaults)
    for action in p._actions:
        action.choices = _CHOICES.get(action.dest, action.choices)
    return p


def _common_checks(args):
    """(condition, message) for the ranges of every numeric option args has, and for --backend."""
    for name, low in _LOWEST.items():
        v = getattr(args, name, None)
        yield v is None or v >= low, f"--{name.replace('_', '-')} must be >= {low}, got {v}"
    for name in _POSITIVE:
        v = getattr(args, name, None)
        yield v is None or v > 0, f"--{name.replace('_', '-')} must be > 0, got {v}"
    yield args.backend != "nccl" or torch.cuda.is_available(), "--backend nccl needs CUDA GPUs; use gloo on CPUs"


def _accepts(fn, *args):
    """(True, "") if fn(*args) passes, else (False, the message of the ValueError it raised)."""
    try:
        fn(*args)
    except ValueError as e:
        return False, str(e)
    return True, ""


def _check(*checks):
    """Raise UsageError for the first failing (condition, message), in order (generators: checked lazily)."""
    for ok, message in itertools.chain(*checks):
        if not ok:
            raise UsageError(message)


def build_train_parser():
    """The training command's parser: train.py's (presets, every TrainConfig field) + every DistributedOptions
    field; usage errors raise UsageError (one line)."""
    p = T.get_parser()
    p.prog = "ddp.py"
    p.description = ("Distributed training of a ScratchLM model: the same options as train.py, run on every rank "
                     "by torchrun (torchrun --nproc_per_node=N ddp.py [preset] [--flags] [--strategy S]; bare "
                     "`torchrun ddp.py` trains train.py's demo, into runs/ddp-demo), or spawned locally by "
                     "`python ddp.py [--nproc N]`. A time budget (--max-minutes, the presets' default) is decided "
                     "by rank 0's clock, so every rank stops at the same step. Other commands: "
                     + ", ".join(f"'ddp.py {c} --help'" for c in TOOLS) + ".")
    names = [f.name for f in dataclasses.fields(DistributedOptions)]
    return _raise_usage_errors(_add_options(p, names, dict(nproc=None)))


def config_for_strategy(args):
    """train.py's config from the parsed flags (no folder checks), with ddp.py's defaults: the run folder is
    runs/ddp-<preset>, never `python train.py`'s runs/<preset>; FSDP and --tp/--pp train with AdamW when no
    --optimizer is given (the presets' Muon needs whole weight matrices; an explicit muon gets FSDP_MUON_ERROR)."""
    if (args.strategy in SHARDED or getattr(args, "tp", 1) * getattr(args, "pp", 1) > 1) and args.optimizer is None:
        args.optimizer = "adamw"
        if _env_rank() == 0:
            print(f"{'--strategy ' + args.strategy if args.strategy in SHARDED else '--tp/--pp'}: using --optimizer "
                  f"adamw (the preset's Muon needs whole weight matrices)")
    cfg = T.config_from_args(args)
    if args.out_dir is None:
        cfg.out_dir = str(Path("runs") / f"ddp-{cfg.preset}")
    return cfg


def _train_checks(args, cfg, world):
    """(condition, message) for the training command's options, the --tp/--pp mesh included (a mesh that does not
    fit would otherwise surface as a hang, or as a shape error in a layer)."""
    tp, pp = args.tp, args.pp
    yield not cfg.compile, "--compile is not supported by ddp.py's hook-based wrappers; run without it"
    yield not (args.strategy in SHARDED and cfg.optimizer in ("muon", "soap")), FSDP_MUON_ERROR
    yield args.compute_dtype == "fp32" or args.strategy in SHARDED, \
        f"--compute-dtype {args.compute_dtype} applies to --strategy fsdp or torch-fsdp only"
    # rank r takes sequences [r G/N, (r+1) G/N) of each global batch (on resume: checked on the checkpoint's)
    G = args.global_batch_size or cfg.batch_size * world
    yield cfg.resume or G % world == 0, f"--global-batch-size {G} does not split over {world} ranks; give a " \
                                        f"multiple of {world}"
    yield not args.sp or tp > 1, "--sp splits the sequence over the tensor-parallel ranks: it needs --tp > 1"
    yield args.tp_impl == "ours" or (tp > 1 and pp == 1), "--tp-impl dtensor needs --tp > 1 and no --pp"
    if tp * pp == 1:
        return
    yield world % (tp * pp) == 0, f"--tp {tp} x --pp {pp} = {tp * pp} ranks per model replica does not divide " \
                                  f"the world size {world}"
    yield cfg.optimizer == "adamw", f"--tp/--pp train with --optimizer adamw (got {cfg.optimizer}: Muon and SOAP " \
                                    f"need whole weight matrices)"
    yield not (cfg.noise_scale or cfg.prune_sparsity or cfg.distill_from), \
        "--noise-scale, --prune-sparsity and --distill-from are not supported with --tp/--pp"
    yield pp <= cfg.num_layers, f"--pp {pp} needs at least {pp} layers, got --num-layers {cfg.num_layers}"
    yield not args.sp or cfg.context_length % tp == 0, \
        f"--sp needs --context-length divisible by --tp {tp}, got {cfg.context_length}"
    # at --vocab-size, the size BPE trains to (the mesh checks the trained tokenizer's real size again)
    ok, message = _accepts(check_tp_config, T.model_config(cfg, cfg.vocab_size), tp)
    yield ok, f"--tp {tp}: {message}"


def check_train_args(args, world):
    """Every option of the training command, checked before any process group, data or model exists. Returns the
    TrainConfig; raises UsageError naming the option."""
    try:
        cfg = config_for_strategy(args)
    except ValueError as e:   # train.py's own checks of its options
        raise UsageError(str(e)) from None
    _check(_common_checks(args), _train_checks(args, cfg, world))
    # Never destroy an earlier run by accident: a folder that holds any of a run's files (train.py's RUN_FILES: a
    # checkpoint, a metrics log, a loss plot, a tokenizer) is continued (--resume), replaced (--overwrite) or left
    # alone. A torchrun restart resumes its own run by design.
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out-dir {out} is a file, not a folder")
    earlier = [f for f in T.RUN_FILES if (out / f).exists()]
    if earlier and not (cfg.resume or _restarted() or getattr(args, "overwrite", False)):
        raise UsageError(f"{out} already holds a run ({', '.join(earlier)}): pass --resume to continue it, "
                         f"--overwrite to replace it, or --out-dir DIR for a new run")
    return cfg


def _train_entry(argv, t_start=None):
    """One rank of the training command (under torchrun, spawned by launch_local, or alone). Returns the exit
    status."""
    # parsed and checked again in every rank process (cheap, and the same answer everywhere): a spawned or
    # torchrun-started rank gets only the argv, not the parent's objects
    args = build_train_parser().parse_args(argv)
    return run_training(args, check_train_args(args, int(os.environ.get("WORLD_SIZE", "1"))), t_start)


def train_main(argv, t_start):
    """`ddp.py [preset] [options]`: under torchrun, this process is one rank; without it, spawn the ranks."""
    args = build_train_parser().parse_args(argv)
    if _under_launcher():                   # torchrun started this process: it is one rank of the job
        return _train_entry(argv, t_start)
    # without torchrun: one process per GPU, or 2 CPU processes (a real distributed run); --nproc 1: this process
    nproc = args.nproc or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    check_train_args(args, nproc)   # every usage error now, before any process is spawned
    return _train_entry(argv, t_start) if nproc == 1 else spawn_training(argv, nproc, t_start)


def _bench_checks(a):
    yield a.d_model % a.num_heads == 0, f"--d-model {a.d_model} must be divisible by --num-heads {a.num_heads}"
    if a.parallel:
        yield a.nproc in (2, 4) or _under_launcher(), f"bench --parallel runs on 2 or 4 ranks, got --nproc {a.nproc}"
        yield _accepts(check_tp_config, _model_config(a), a.nproc)
    known = STRATEGIES + ("local",) + tuple(BENCH_TP)
    bad = [s for s in a.strategies.split(",") if s not in known]
    yield not bad, f"--strategies: unknown {bad}; choose from {', '.join(known)}"
    if set(BENCH_TP) & set(a.strategies.split(",")):     # (tp over every rank the bench runs on)
        ok, message = _accepts(check_tp_config, _model_config(a), int(os.environ.get("WORLD_SIZE", a.nproc)))
        yield ok, f"{message} (the rows tp, tp-dtensor of --strategies)"


def _comm_checks(a):
    yield a.min_mb <= a.max_mb, f"need --min-mb <= --max-mb, got {a.min_mb} and {a.max_mb}"
    bad = [o for o in a.ops.split(",") if o not in ("all_reduce", "all_gather", "reduce_scatter")]
    yield not bad, f"--ops: unknown collective(s) {bad}; choose from all_reduce, all_gather, reduce_scatter"


def _plan_checks(a):
    yield _accepts(_model_config, a)
    cfg = _model_config(a)
    yield _accepts(check_mesh, a.dp, a.tp, a.pp, a.dp * a.tp * a.pp)
    yield _accepts(check_tp_config, cfg, a.tp)
    yield _accepts(_split_layers, cfg.num_layers, a.pp)
    yield not a.sp or (a.tp > 1 and cfg.context_length % a.tp == 0), \
        "--sp needs --tp > 1 and --context-length divisible by it"


_MODEL = ("vocab_size", "context_length", "d_model", "num_layers", "num_heads")
# command -> (description, its options besides --nproc and --backend, defaults other than the dataclasses',
# its checks, what runs)
TOOLS = {
    "bench": ("Time per training step and communication share of every strategy, torch's DistributedDataParallel "
              "side by side, plus per-rank memory of params/grads/optimizer state.",
              ("strategies",) + _MODEL + ("batch_size", "bucket_mb", "compute_dtype", "rounds", "steps", "out",
                                          "parallel", "micro_batches"), {}, _bench_checks,
              lambda a: _run_maybe_spawned(bench_parallel if a.parallel else bench, a)),
    "bench-comm": ("Time collectives on fp32 tensors from --min-mb to --max-mb (doubling) for this world size and "
                   "backend; prints algorithm and bus bandwidth.", ("min_mb", "max_mb", "ops", "iters", "warmup",
                                                                    "out"),
                   {}, _comm_checks, lambda a: _run_maybe_spawned(bench_comm, a)),
    "tour": ("Show all-reduce, ring all-reduce, all-gather, reduce-scatter and broadcast on tiny tensors.", (), {},
             lambda a: (), lambda a: _run_maybe_spawned(_tour_entry, a)),
    "plan": ("Per-rank parameter, gradient, AdamW and communication volume of one training step on a (dp, tp, pp) "
             "mesh (default: a GPT-2-small-sized model at 8 x 1024 tokens per dp rank); --check runs the step on "
             "dp*tp*pp local processes and measures.",
             _MODEL + ("num_kv_heads", "d_ff", "dp", "tp", "pp", "sp", "batch_size", "micro_batches", "bytes",
                       "check"),
             dict(vocab_size=32768, context_length=1024, d_model=768, num_layers=12, num_heads=12, batch_size=8),
             _plan_checks, _plan),
}


def _tool_main(command, argv):
    """`ddp.py <command> ...` for the commands of TOOLS: parse, check, run."""
    description, names, defaults, checks, run = TOOLS[command]
    p = tk.OneLineParser(prog=f"ddp.py {command}", description=description,
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    args = _add_options(_raise_usage_errors(p), ("nproc", "backend") + names, defaults).parse_args(argv)
    _check(_common_checks(args), checks(args))
    return run(args)


def main(argv=None):
    """The command line: `ddp.py [bench | bench-comm | tour | plan] ...`, else the training command. Returns the
    exit status (2: usage error)."""
    t_start = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = _under_launcher() and _env_rank() != 0      # under torchrun, only rank 0 speaks for the command line
    if quiet and any(a in ("-h", "--help") for a in argv):
        return 0                                        # one help text, not one per rank
    try:
        if argv and argv[0] in TOOLS:
            return _tool_main(argv[0], argv[1:])
        return train_main(argv, t_start)
    except UsageError as e:
        if not quiet:
            print(f"ddp.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
