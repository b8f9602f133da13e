"""
ddp.py -- Stage 5: training on many processes. Data parallelism, optimizer sharding, FSDP.

The problem. One process trains at the speed of one device and holds the whole training state in one memory:
parameters (4 bytes each in fp32), gradients (4 more) and AdamW's two moments (8 more), i.e. 16 bytes per
parameter before a single activation. Two ways out, and this file builds both from scratch on top of
torch.distributed's collectives (the NCCL/gloo communication engine and `torchrun`, the field's standard):

1. Data parallelism (DP): N processes ("ranks") each hold a full copy of the model and run forward/backward on
   1/N of the batch. Averaging the gradients across ranks (one all-reduce) gives exactly the gradient of the
   full batch, because the mean loss over B examples is the mean of the N per-rank means:
       grad L = (1/N) sum_r grad L_r          (each L_r a mean over B/N examples)
   so every rank takes the same optimizer step and the copies never drift apart. Cost: one all-reduce of the
   gradients per step (2 (N-1)/N * P * 4 bytes moved per rank with a ring), which we hide behind backward by
   launching it per parameter (`DDP`) or per bucket of parameters (`DDPBucketed`) as soon as gradients are ready.
2. Sharding (ZeRO). DP wastes memory: N identical copies of everything. `ShardedOptimizer` (ZeRO-1) keeps each
   parameter's optimizer state on one rank only (the "owner"), which steps it and broadcasts the new values:
   optimizer memory / N for the same communication volume. `FSDP` (ZeRO-3) goes all the way: each rank stores
   1/N of every big weight; a layer's full weight is all-gathered just before the layer runs (and again in
   backward), then freed; its gradient is reduce-scattered so each rank receives only its own slice. Params,
   grads and optimizer state all / N, for 1.5x DP's communication (gather, gather, reduce-scatter vs all-reduce
   = reduce-scatter + all-gather).

Order of the file (read top to bottom):
    0. process groups: torchrun's environment, timeouts, a local launcher for tests and benchmarks
    1. a tour of the four collectives + a from-scratch ring all-reduce; `bench-comm`
    2. data parallel wrappers: NaiveDDP -> DDP (per-parameter async all-reduce) -> DDPBucketed
    3. ShardedOptimizer (ZeRO stage 1)
    4. FSDP (ZeRO stage 3 style) with prefetching and mixed precision
    5. the training command (reuses train.py) with consolidated, world-size independent checkpoints
    6. `bench`: time per step and communication share of every strategy, torch's own DDP side by side
    7. command line:  torchrun --nproc_per_node=N ddp.py [train.py's options] --strategy ...
                      python ddp.py bench --nproc 2        (spawns its own processes when not under torchrun)
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import numpy as np

import model as M
import train as T

# ---------------------------------------------------------------------------------------------------------------
# 0. Process groups
# ---------------------------------------------------------------------------------------------------------------
# torchrun starts N copies of this script and tells each one who it is through environment variables:
#   RANK (0..N-1 over all machines), LOCAL_RANK (index on this machine -> which GPU), WORLD_SIZE (N),
#   MASTER_ADDR/MASTER_PORT (where rank 0's rendezvous store listens).
# `init_process_group` connects them. The backend moves the bytes: NCCL between GPUs, gloo between CPU processes.
# A collective blocks until every rank joins it; if one rank never arrives (crashed, different config, took
# another code path) the others would wait forever. The timeout turns such a hang into an error.

DEFAULT_TIMEOUT_S = 120


def init_distributed(backend=None, timeout_s=DEFAULT_TIMEOUT_S):
    """Join the process group described by torchrun's env vars (or a single process if there are none).
    Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:  # plain `python ddp.py ...`: a world of one, still a real process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port():
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local_rank, world_size, port, threads, fn, args):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    fn(*args)


def launch_local(fn, nprocs, *args):
    """Run fn(*args) in `nprocs` fresh processes on this machine, with the same environment torchrun would give
    them (so fn calls init_distributed() either way). Used by tests and by `bench`/`bench-comm --nproc N`.
    Each process gets cores/N threads: N processes x all cores each would fight over the same cores."""
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    mp.spawn(_spawn_entry, args=(nprocs, free_port(), threads, fn, args), nprocs=nprocs, join=True)


def rank0_print(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_host(t, op=dist.ReduceOp.SUM):
    """All-reduce a small CPU tensor (loss sums, norms) whatever the backend: NCCL only reduces GPU tensors."""
    if dist.get_backend() == "nccl":
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
    dist.all_gather_object(values, value)
    if all(v == values[0] for v in values):
        return
    if all(isinstance(v, dict) for v in values):
        keys = sorted(set().union(*[v.keys() for v in values]))
        diffs = [f"{k}: " + ", ".join(f"rank{r}={v.get(k, '<missing>')!r}" for r, v in enumerate(values))
                 for k in keys if len({repr(v.get(k, '<missing>')) for v in values}) > 1]
        raise ValueError(f"{name} differs across ranks: " + "; ".join(diffs))
    raise ValueError(f"{name} differs across ranks: " + ", ".join(f"rank{r}={v!r}" for r, v in enumerate(values)))


# ---------------------------------------------------------------------------------------------------------------
# 1. The collectives
# ---------------------------------------------------------------------------------------------------------------
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
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return tensor
    flat = tensor.view(-1)
    chunks = list(flat.tensor_split(world))          # N chunks of ~P/N elements (views into `tensor`)
    right, left = (rank + 1) % world, (rank - 1) % world
    recv_buf = torch.empty_like(chunks[0])
    # reduce-scatter phase: at step s rank r sends chunk (r - s) and accumulates chunk (r - s - 1)
    for s in range(world - 1):
        send_idx, recv_idx = (rank - s) % world, (rank - s - 1) % world
        incoming = recv_buf[: chunks[recv_idx].numel()]
        send = dist.isend(chunks[send_idx].contiguous(), right)
        dist.recv(incoming, left)
        send.wait()
        chunks[recv_idx].add_(incoming)
    # now rank r holds the complete sum of chunk (r + 1); all-gather phase passes the finished chunks around
    for s in range(world - 1):
        send_idx, recv_idx = (rank + 1 - s) % world, (rank - s) % world
        incoming = recv_buf[: chunks[recv_idx].numel()]
        send = dist.isend(chunks[send_idx].contiguous(), right)
        dist.recv(incoming, left)
        send.wait()
        chunks[recv_idx].copy_(incoming)
    return tensor


def collectives_tour():
    """Print what each collective does on tiny tensors (run: python ddp.py tour, or under torchrun)."""
    rank, world, device = init_distributed()
    lines = []
    show = lambda what, t: lines.append(f"rank {rank}: {what:36s} {[round(v, 2) for v in t.tolist()]}")
    x = torch.arange(4, dtype=torch.float32, device=device) + 10 * rank          # rank r holds [10r, .., 10r+3]
    # (each call below blocks until every rank has called it: collectives are rendezvous points)
    show("mine", x)
    y = x.clone(); dist.all_reduce(y, op=dist.ReduceOp.SUM)
    show("all_reduce(SUM)", y)
    z = x.clone(); ring_all_reduce(z)
    show("ring_all_reduce (send/recv only)", z)
    g = torch.empty(world * 4, device=device); dist.all_gather_single(g, x)
    show("all_gather", g)
    if 4 % world == 0:
        rs = torch.empty(4 // world, device=device)
        dist.reduce_scatter_single(rs, x)
        show("reduce_scatter (my chunk of the sum)", rs)
    b = x.clone(); dist.broadcast(b, src=0)
    show("broadcast from rank 0", b)
    everyone = [None] * world
    dist.all_gather_object(everyone, lines)   # print in order, from rank 0
    if rank == 0:
        for i in range(len(lines)):
            for r in range(world):
                print(everyone[r][i])
    cleanup_distributed()


def _timed_collective(op, nbytes, device, iters, warmup):
    """Seconds per call of `op` on an fp32 tensor of nbytes (median of iters after warmup)."""
    world = dist.get_world_size()
    n = nbytes // 4
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
        dist.barrier()
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
        _atomic_write_text(args.out, json.dumps(rows, indent=1))
    cleanup_distributed()


def _atomic_write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------------------------------
# 2. Data parallelism, three ways
# ---------------------------------------------------------------------------------------------------------------
# Same interface for all (and for torch's own DDP through `TorchDDP` below):
#     model = Wrapper(module)                # broadcasts rank 0's parameters: all replicas start identical
#     loss = loss_fn(model(x_my_shard)); loss.backward()
#     model.finish_gradient_synchronization()  # afterwards every p.grad is the average over ranks
#     optimizer.step()
# Tied weights (one Parameter reached from two modules) appear once in module.parameters(), so they are reduced
# once, with the sum of both uses' gradients (autograd adds them before .grad is written). Frozen parameters
# (requires_grad=False) have no gradient and are skipped. A trainable parameter that got no gradient on this step
# (an MoE expert nobody routed to on this rank) is reduced as zeros, because the other ranks may have a gradient for
# it and every rank must issue the same collectives in the same order.


def broadcast_module_(module, src=0):
    """Make every rank's parameters and buffers equal to rank src's (different seeds -> different inits)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src)


def _trainable_params(module):
    return [p for p in module.parameters() if p.requires_grad]  # unique (tied counted once), registration order


def _clear_globally_unused(params, had_grad):
    """A parameter no rank produced a gradient for must end with .grad None, as in single-process training (an
    optimizer skips it; a zero gradient would still move it through momentum and weight decay). One tiny
    all-reduce of 'had a gradient' flags; call it after every reduction of the step has been launched, so it sits
    at the same place in every rank's sequence of collectives."""
    flags = torch.tensor(had_grad, dtype=torch.float32)
    all_reduce_host(flags)
    for p, f in zip(params, flags.tolist()):
        if f == 0:
            p.grad = None


class NaiveDDP(nn.Module):
    """The baseline: after backward, one blocking all-reduce per parameter. Correct and simple, but nothing is
    sent until backward has finished, so compute and communication add up, and many small messages each pay
    the network's latency."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        broadcast_module_(module)
        self._params = _trainable_params(module)
        self.comm_wait_seconds = 0.0        # time spent blocked in finish_gradient_synchronization (bench)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):  # gradient accumulation: nothing to skip, we only communicate when asked
        yield

    def finish_gradient_synchronization(self):
        t0 = time.perf_counter()
        had_grad = [p.grad is not None for p in self._params]
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)
        _clear_globally_unused(self._params, had_grad)
        self.comm_wait_seconds += time.perf_counter() - t0


class DDP(nn.Module):
    """Overlap communication with backward: autograd calls a hook on each parameter the moment its gradient is
    final (`register_post_accumulate_grad_hook`), and the hook launches an asynchronous all-reduce of it right
    away; backward keeps computing earlier layers' gradients while the last layers' gradients travel.
    `finish_gradient_synchronization` only waits for the handles and divides by N.

    Ordering rule (the subtle part): collectives are matched across ranks by the order in which they are issued,
    so every rank must launch the same reductions in the same order. Reductions are therefore launched in a fixed
    order of "buckets" (here: one parameter per bucket): a ready bucket is launched only once all buckets before it
    have been. The order starts as reverse registration order (backward visits the last layers first) and is
    rebuilt once, after the first step, from the order in which rank 0 actually saw gradients arrive (broadcast so
    all ranks agree), which is what torch's DDP does too."""

    bucket_size_mb = 0.0  # 0: every parameter is its own bucket

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.world_size = dist.get_world_size()
        broadcast_module_(module)
        self._params = _trainable_params(module)
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._build_buckets(list(reversed(range(len(self._params)))))
        self._sync_enabled = True
        self._observed_order = []           # parameter indices in the order their hooks fired (first step)
        self._order_rebuilt = False
        for p in self._params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self.comm_wait_seconds = 0.0        # time spent blocked in finish_gradient_synchronization (bench)

    # -- buckets ---------------------------------------------------------------------------------------------
    def _build_buckets(self, order):
        """Group parameter indices (in launch order) into buckets of <= bucket_size_mb, one dtype each."""
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
        self._buckets = buckets
        self._bucket_of = {i: b for b, idxs in enumerate(buckets) for i in idxs}
        self._buffers = [None if len(idxs) == 1 else
                         torch.empty(sum(self._params[i].numel() for i in idxs),
                                     dtype=self._params[idxs[0]].dtype, device=self._params[idxs[0]].device)
                         for idxs in buckets]
        self._reset_step_state()

    def _reset_step_state(self):
        self._ready_count = [0] * len(self._buckets)
        self._handles = [None] * len(self._buckets)
        self._next_to_launch = 0

    def _launch(self, b):
        # Called from inside backward (a hook) on the autograd thread: it must be cheap. It copies, launches the
        # non-blocking all-reduce and returns; gloo/NCCL move the bytes on their own threads/streams while
        # autograd goes on computing the gradients of earlier layers.
        idxs = self._buckets[b]
        for i in idxs:  # a parameter unused on this rank this step: contributes zeros (see the ordering rule)
            if self._params[i].grad is None:
                self._params[i].grad = torch.zeros_like(self._params[i])
        if self._buffers[b] is None:  # single parameter: reduce its .grad in place, no copy
            tensor = self._params[idxs[0]].grad
        else:  # flatten the bucket's grads into one contiguous buffer: one message instead of len(idxs)
            tensor = self._buffers[b]
            offset = 0
            for i in idxs:
                g = self._params[i].grad
                tensor[offset: offset + g.numel()].copy_(g.view(-1))
                offset += g.numel()
        self._handles[b] = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)

    def _launch_ready_in_order(self):
        while self._next_to_launch < len(self._buckets) and \
                self._ready_count[self._next_to_launch] == len(self._buckets[self._next_to_launch]):
            self._launch(self._next_to_launch)
            self._next_to_launch += 1

    def _on_grad_ready(self, p):
        if not self._sync_enabled:
            return
        i = self._index[id(p)]
        if not self._order_rebuilt:
            self._observed_order.append(i)
        self._ready_count[self._bucket_of[i]] += 1
        self._launch_ready_in_order()

    # -- public interface ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

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
        # Backward is over. Only the tail of the communication is still in flight (ideally just the last bucket,
        # launched when the first layers' gradients arrived); waiting here is the communication we failed to hide.
        t0 = time.perf_counter()
        had_grad = [p.grad is not None for p in self._params]
        # buckets whose parameters got no gradient on this rank were never launched: launch them now, in order
        for b in range(len(self._buckets)):
            self._ready_count[b] = len(self._buckets[b])
        self._launch_ready_in_order()
        for b, idxs in enumerate(self._buckets):
            self._handles[b].wait()
            if self._buffers[b] is None:
                self._params[idxs[0]].grad.div_(self.world_size)
            else:
                self._buffers[b].div_(self.world_size)
                offset = 0
                for i in idxs:
                    g = self._params[i].grad
                    g.view(-1).copy_(self._buffers[b][offset: offset + g.numel()])
                    offset += g.numel()
        _clear_globally_unused(self._params, had_grad)
        self.comm_wait_seconds += time.perf_counter() - t0
        if not self._order_rebuilt:
            self._rebuild_from_observed_order()
        self._reset_step_state()

    def _rebuild_from_observed_order(self):
        """After the first synchronized step: re-bucket in rank 0's observed gradient-arrival order."""
        self._order_rebuilt = True
        seen = list(dict.fromkeys(self._observed_order))
        order = seen + [i for i in reversed(range(len(self._params))) if i not in set(seen)]
        box = [order]
        dist.broadcast_object_list(box, src=0)
        self._build_buckets(box[0])
        self._observed_order = []


class DDPBucketed(DDP):
    """DDP with gradients grouped into buckets of about `bucket_size_mb` MB: one all-reduce per bucket, launched
    when the bucket's last gradient arrives. Per-parameter DDP sends many small messages (a norm gain is a few KB)
    and each message pays a fixed latency (alpha in the alpha-beta cost model t = alpha + bytes/beta); buckets
    amortize it, at the price of a copy into/out of the flat buffer and a little less overlap (a bucket waits for
    its slowest member). torch's DDP defaults to 25 MB buckets."""

    def __init__(self, module, bucket_size_mb=25.0):
        if bucket_size_mb <= 0:
            raise ValueError(f"bucket_size_mb must be > 0, got {bucket_size_mb}")
        self.bucket_size_mb = float(bucket_size_mb)
        super().__init__(module)


class TorchDDP(nn.Module):
    """torch.nn.parallel.DistributedDataParallel behind our interface: the peer in benchmarks (C++ reducer,
    25 MB buckets after a 1 MB first bucket, all-reduces launched from autograd hooks like ours)."""

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module = module
        self.ddp = nn.parallel.DistributedDataParallel(module, **kwargs)

    def forward(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()

    def finish_gradient_synchronization(self):
        pass  # torch's reducer waits for its all-reduces at the end of backward


# ---------------------------------------------------------------------------------------------------------------
# 3. ShardedOptimizer (ZeRO stage 1)
# ---------------------------------------------------------------------------------------------------------------
# In DP every rank runs the same optimizer step on the same gradients: N copies of AdamW's m and v (8 bytes per
# parameter). ZeRO-1 assigns each parameter to one owner rank; only the owner keeps its state and updates it, then
# the owner broadcasts the new values. Optimizer memory per rank: ~1/N. Communication: the broadcasts move each
# parameter once, like the all-gather half of an all-reduce (ZeRO-1 proper would also replace the gradient
# all-reduce by a reduce-scatter; we keep it composable with any of the DP wrappers above).
# Parameters are whole (not sliced), so any optimizer works unchanged, including Muon (which needs whole matrices);
# balance comes from a greedy "largest parameter to the least loaded rank" assignment, deterministic on all ranks.


def assign_shards(sizes, world, load=None):
    """Greedy balanced partition: owner rank of each item (largest first to the lightest rank; ties -> lowest
    index), starting from an existing per-rank `load`. Deterministic, so every rank computes the same answer."""
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
        self.local_optimizer = None
        super().__init__(params, kwargs)  # calls add_param_group for each group
        local = [g for g in self._local_groups if g is not None]
        if local:
            self.local_optimizer = optimizer_cls(local, **kwargs)
            # the local optimizer copies the group dicts; keep references to its own so we can sync hyperparams
            it = iter(self.local_optimizer.param_groups)
            self._local_groups = [next(it) if g is not None else None for g in self._local_groups]

    def add_param_group(self, param_group):
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
        local_group = {k: v for k, v in group.items() if k != "params"}
        local_group["params"] = mine
        if self.local_optimizer is not None:  # group added after construction
            if mine:
                self.local_optimizer.add_param_group(local_group)
                self._local_groups.append(self.local_optimizer.param_groups[-1])
            else:
                self._local_groups.append(None)
        else:
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
            for group, local in zip(self.param_groups, self._local_groups):  # lr schedules write the outer groups
                if local is not None:
                    for k, v in group.items():
                        if k != "params":
                            local[k] = v
            self.local_optimizer.step(**kwargs)
        self._broadcast_params()
        return loss

    def _broadcast_params(self):
        """Each owner sends its freshly updated parameters: one flat broadcast per (owner, dtype)."""
        for r in range(self.world_size):
            owned = [p for p, o in zip(self._all_params, self._owner) if o == r]
            for dtype in sorted({p.dtype for p in owned}, key=str):
                ps = [p for p in owned if p.dtype == dtype]
                flat = torch.cat([p.detach().reshape(-1) for p in ps]) if r == self.rank else \
                    torch.empty(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device)
                dist.broadcast(flat, src=r)
                if r != self.rank:
                    offset = 0
                    for p in ps:
                        p.data.view(-1).copy_(flat[offset: offset + p.numel()])
                        offset += p.numel()

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)  # all params: DP wrappers need every rank's grads cleared

    # -- memory accounting and checkpoints ---------------------------------------------------------------------
    def local_state_bytes(self):
        """Bytes of optimizer state tensors held by this rank."""
        if self.local_optimizer is None:
            return 0
        return sum(t.numel() * t.element_size() for s in self.local_optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t))

    def state_dict(self):
        """Collective. The state dict of the equivalent unsharded `optimizer_cls(params)`: state keyed by global
        parameter index, tensors on CPU. Every rank gets it (all_gather_object); rank 0 saves it."""
        mine = {}
        if self.local_optimizer is not None:
            local_params = [p for g in self.local_optimizer.param_groups for p in g["params"]]
            gidx = {id(p): i for i, p in enumerate(self._all_params)}
            for p in local_params:
                if p in self.local_optimizer.state:
                    mine[gidx[id(p)]] = {k: (v.detach().cpu() if torch.is_tensor(v) else v)
                                         for k, v in self.local_optimizer.state[p].items()}
        parts = [None] * self.world_size
        dist.all_gather_object(parts, mine)
        state = {}
        for part in parts:
            state.update(part)
        groups, start = [], 0
        for g in self.param_groups:
            d = {k: v for k, v in g.items() if k != "params"}
            d["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(d)
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load a consolidated (unsharded-format) state dict written at any world size: keep our shard's part."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or \
                any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state dict does not match these parameter groups "
                             f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in self.param_groups]})")
        for g, saved in zip(self.param_groups, groups):
            g.update({k: v for k, v in saved.items() if k != "params"})
        if self.local_optimizer is None:
            return
        state = {int(k): v for k, v in state_dict["state"].items()}
        for i, p in enumerate(self._all_params):
            if self._owner[i] == self.rank and i in state:
                self.local_optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else
                                                     v.clone() if torch.is_tensor(v) else v)
                                                 for k, v in state[i].items()}
        for group, local in zip(self.param_groups, self._local_groups):
            if local is not None:
                local.update({k: v for k, v in group.items() if k != "params"})


# ---------------------------------------------------------------------------------------------------------------
# 4. FSDP (ZeRO stage 3 style): shard the weights themselves
# ---------------------------------------------------------------------------------------------------------------
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


def _shardable_kind(module):
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


class _ShardedWeight:
    """One (R, C) weight kept as this rank's block of rows."""

    def __init__(self, name, weight, rank, world):
        self.name = name
        self.full_shape = tuple(weight.shape)
        self.rows = -(-weight.shape[0] // world)                 # ceil(R / N) rows per rank
        self.world = world
        padded = weight.detach().new_zeros((self.rows * world,) + self.full_shape[1:])
        padded[: weight.shape[0]] = weight.detach()
        self.shard = nn.Parameter(padded[rank * self.rows: (rank + 1) * self.rows].clone(),
                                  requires_grad=weight.requires_grad)

    def padded_shape(self):
        return (self.rows * self.world,) + self.full_shape[1:]


class _FSDPLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard, fsdp, sw, pos):
        W = fsdp._acquire(sw, pos, +1)                           # (R, C) in compute dtype
        x_in = x.to(W.dtype)
        y = F.linear(x_in, W)                                    # (..., R) = x W^T
        fsdp._release(W)
        ctx.save_for_backward(x_in)
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
        # the original state-dict names -> live tensors, to rebuild full checkpoints under the original names
        self._orig_state = list(module.state_dict(keep_vars=True).items())
        self._orig_param_names = [n for n, _ in module.named_parameters()]      # deduplicated, original order
        self._sharded = {}                                                     # id(original weight) -> shard
        replicated_modules = _data_dependent_modules(module)
        for name, m in list(module.named_modules()):
            kind = _shardable_kind(m)
            if kind is None or id(m) in replicated_modules:
                continue
            w = m._parameters.get("weight")
            if w is None or w.dim() != 2:
                raise ValueError(f"FSDP: {name} has no 2-D weight Parameter to shard")
            sw = self._sharded.get(id(w))
            if sw is None:
                sw = self._sharded[id(w)] = _ShardedWeight(name + ".weight", w, self.rank, self.world_size)
            del m._parameters["weight"]                 # the module no longer holds the full weight ...
            m.register_parameter("weight_shard", sw.shard)  # ... only its block of rows
            m.forward = self._make_forward(m, kind, sw)
        self._weight_of_key = {k: self._sharded.get(id(t)) for k, t in self._orig_state}
        self._param_of_name = {}
        named = dict(self._orig_state)
        for n in self._orig_param_names:
            sw = self._sharded.get(id(named[n]))
            self._param_of_name[n] = sw.shard if sw is not None else named[n]
        # drop our references to the original full weights: the shards replace them (else no memory is saved)
        self._orig_state = [(k, None if self._weight_of_key[k] is not None else t) for k, t in self._orig_state]
        self._sharded = list(self._sharded.values())
        named = w = None
        shard_ids = {id(sw.shard) for sw in self._sharded}
        self._replicated = [p for p in module.parameters() if p.requires_grad and id(p) not in shard_ids]
        self._pending_gathers = {}      # id(shard) -> [(full buffer, work, source)] in issue order
        self._pending_reductions = []   # (shard, grad block, full padded grad, work)
        self._sequence, self._recording, self._cursor = None, [], 0
        self.gathered_bytes, self.peak_gathered_bytes = 0, 0
        self.comm_wait_seconds = 0.0    # time blocked waiting for gathers / reduce-scatters (bench)

    def _make_forward(self, m, kind, sw):
        fn = _FSDPLinearFn if kind == "linear" else _FSDPEmbeddingFn

        def forward(x):
            pos = self._cursor
            self._cursor += 1
            if self._sequence is None:
                self._recording.append((sw, kind))
            y = fn.apply(x, sw.shard, self, sw, pos)
            bias = getattr(m, "bias", None) if kind == "linear" else None
            return y + bias.to(y.dtype) if bias is not None else y
        return forward

    # -- gathers with prefetch ---------------------------------------------------------------------------------
    def _start_gather(self, sw):
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
        if not self._pending_gathers.get(id(sw.shard)):
            self._start_gather(sw)
        if self._sequence is not None:
            nxt = pos + direction
            if 0 <= nxt < len(self._sequence):
                nsw, nkind = self._sequence[nxt]
                if direction > 0 or nkind == "linear":  # an Embedding's backward needs no weight
                    self._start_gather(nsw)
        full, work, _ = self._pending_gathers[id(sw.shard)].pop(0)
        t0 = time.perf_counter()
        work.wait()
        self.comm_wait_seconds += time.perf_counter() - t0
        return full[: sw.full_shape[0]]

    def _release(self, W):
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
        self._cursor = 0
        out = self.module(*args, **kwargs)
        if self._sequence is None:
            self._sequence = self._recording
        if self.compute_dtype is not None and torch.is_tensor(out) and out.is_floating_point():
            out = out.float()         # logits back to fp32 for a stable loss
        return out

    @contextlib.contextmanager
    def no_sync(self):
        yield  # FSDP must reduce-scatter every micro-batch (nobody holds a full gradient to accumulate into)

    def finish_gradient_synchronization(self):
        self._complete_reductions()
        self._drain_gathers()
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

    # -- full state: checkpoints and inspection ----------------------------------------------------------------
    @torch.no_grad()
    def _gather_full(self, sw, block):
        full = torch.empty(sw.padded_shape(), dtype=block.dtype, device=block.device)
        dist.all_gather_single(full, block.contiguous())
        return full[: sw.full_shape[0]].clone()

    @torch.no_grad()
    def gather_full_params(self):
        """Collective. The full fp32 state dict of the original module, under its original names."""
        out, cache = {}, {}
        for key, t in self._orig_state:
            sw = self._weight_of_key[key]
            if sw is None:
                out[key] = t.detach().clone()
            else:
                if id(sw) not in cache:
                    cache[id(sw)] = self._gather_full(sw, sw.shard.detach())
                out[key] = cache[id(sw)]
        return out

    def _my_block(self, sw, full):
        padded = full.new_zeros(sw.padded_shape())
        padded[: sw.full_shape[0]] = full
        return padded[self.rank * sw.rows: (self.rank + 1) * sw.rows]

    @torch.no_grad()
    def load_full_params(self, state_dict):
        """Load a full (unsharded) state dict of the original module: each rank keeps its block of rows."""
        missing = [k for k, _ in self._orig_state if k not in state_dict]
        if missing:
            raise ValueError(f"FSDP.load_full_params: missing keys {missing[:5]}")
        for key, t in self._orig_state:
            src = state_dict[key]
            sw = self._weight_of_key[key]
            if sw is None:
                t.data.copy_(src)
            else:
                if tuple(src.shape) != sw.full_shape:
                    raise ValueError(f"FSDP.load_full_params: {key} has shape {tuple(src.shape)}, "
                                     f"expected {sw.full_shape}")
                sw.shard.data.copy_(self._my_block(sw, src.to(sw.shard.dtype)))

    def named_local_params(self):
        """original parameter name -> the Parameter this rank optimizes for it (a shard or a replicated param)."""
        return dict(self._param_of_name)


# ---------------------------------------------------------------------------------------------------------------
# 5. The training command
# ---------------------------------------------------------------------------------------------------------------
# The loop is train.py's `train()`, the same code a single process runs; ddp.py only fills in its `TrainHooks`:
# wrap the model (a strategy), build the optimizer over what the wrapper trains (ZeRO-1: sharded; FSDP: shards),
# draw this rank's slice of the global batch, finish the gradient synchronization between backward and the
# optimizer step, clip with a norm summed over shards (FSDP), all-reduce the loss and the eval sums, checkpoint
# collectively (ZeRO-1's and FSDP's state lives on all ranks; rank 0 writes), and gather FSDP's weights into a
# plain model for the samples. Around that call: rank agreement checks, data prepared by rank 0 first, resume
# after a torchrun restart. A ddp.py checkpoint is a normal ScratchLM checkpoint (`train.py sample --checkpoint`
# reads it).
#
# Batches. The global batch of (step, micro-step) is a function of (seed, step, micro) only: G windows drawn from
# one numpy stream, rank r taking the r-th contiguous 1/N of them. The same step therefore sees the same tokens at
# any world size, so a run checkpointed at N=2 continues at N=1 (or 4) with the same losses, and the averaged
# gradient equals the single-process gradient of the whole batch.
#
# Checkpoints are consolidated: the model's full state dict under its original names and the optimizer's state in
# the format of the unsharded optimizer (state keyed by the index of each parameter in optimizer order), whatever
# the strategy. Any world size and any strategy can resume from it; the optimizer's parameter names are stored
# with it and checked on load.

STRATEGIES = ("naive", "ddp", "bucketed", "zero1", "fsdp", "torch-ddp")
_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    if strategy == "local":  # benchmarks only: no communication at all (the compute-only baseline)
        return _LocalOnly(model)
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")


class _LocalOnly(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_gradient_synchronization(self):
        pass


def shard_optimizer(opt):
    """The same optimizer (class, groups, hyperparameters) as a ShardedOptimizer; train.OptimizerGroup (Muon +
    AdamW) becomes a group of sharded members."""
    if isinstance(opt, T.OptimizerGroup):
        return T.OptimizerGroup([shard_optimizer(o) for o in opt.optimizers])
    import inspect
    accepted = inspect.signature(type(opt).__init__).parameters
    kwargs = {k: v for k, v in opt.defaults.items() if k in accepted}
    return ShardedOptimizer([dict(g) for g in opt.param_groups], type(opt), **kwargs)


def build_strategy_optimizer(model, run_model, strategy, cfg):
    if strategy == "fsdp":
        if cfg.optimizer == "muon":
            raise ValueError("--strategy fsdp shards weight matrices by rows, and Muon orthogonalizes whole "
                             "matrices: use --optimizer adamw with fsdp (or --strategy zero1, which keeps whole "
                             "parameters)")
        return T.build_optimizer(run_model, cfg)  # over the shards and the replicated params
    opt = T.build_optimizer(model, cfg)
    return shard_optimizer(opt) if strategy == "zero1" else opt


def _optimizer_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def optimizer_param_names(run_model, opt):
    """The original name of each parameter the optimizer holds, in optimizer order (a shard is named after its
    weight). Stored with checkpoints and checked on resume: the consolidated state is keyed by position."""
    if isinstance(run_model, FSDP):
        names = {id(p): n for n, p in run_model.named_local_params().items()}
    else:  # every DP wrapper keeps the bare model as .module
        names = {id(p): n for n, p in run_model.module.named_parameters()}
    return [names[id(p)] for p in _optimizer_params(opt)]


def full_model_state(model, run_model):
    """Collective for FSDP. The full state dict of the bare model under its original names (CPU tensors)."""
    sd = run_model.gather_full_params() if isinstance(run_model, FSDP) else model.state_dict()
    return {k: v.detach().cpu() for k, v in sd.items()}


def full_optimizer_state(opt, run_model):
    """Collective (ZeRO-1, FSDP). The unsharded optimizer's state dict."""
    sd = opt.state_dict()  # ShardedOptimizer.state_dict consolidates itself (collective)
    if not isinstance(run_model, FSDP):
        return sd
    shards = {id(sw.shard): sw for sw in run_model._sharded}
    params = _optimizer_params(opt)
    state = {}
    for i in sorted(sd["state"]):
        p = params[i]
        sw = shards.get(id(p))
        state[i] = {k: (run_model._gather_full(sw, v).cpu() if sw is not None and torch.is_tensor(v)
                        and v.shape == p.shape else v) for k, v in sd["state"][i].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(opt, run_model, full_sd):
    if not isinstance(run_model, FSDP):
        opt.load_state_dict(full_sd)
        return
    shards = {id(sw.shard): sw for sw in run_model._sharded}
    params = _optimizer_params(opt)
    state = {}
    for i, s in full_sd["state"].items():
        p = params[int(i)]
        sw = shards.get(id(p))
        state[int(i)] = {k: (run_model._my_block(sw, v).clone() if sw is not None and torch.is_tensor(v)
                             and tuple(v.shape) == sw.full_shape else v) for k, v in s.items()}
    opt.load_state_dict({"state": state, "param_groups": full_sd["param_groups"]})


def clip_gradients(run_model, opt, max_norm):
    """Global L2 norm clipping. DP: every rank holds the full averaged gradient -> train.py's function. FSDP: the
    norm^2 is the sum over ranks of the shards' norm^2 plus the replicated params' norm^2 (counted once)."""
    if not isinstance(run_model, FSDP):
        return T.gradient_clipping(_optimizer_params(opt), max_norm)
    shard_ids = {id(sw.shard) for sw in run_model._sharded}
    params = [p for p in _optimizer_params(opt) if p.grad is not None]
    sq_sharded = sum((p.grad.float().pow(2).sum().cpu() for p in params if id(p) in shard_ids), torch.zeros(()))
    sq_sharded = all_reduce_host(sq_sharded.to(torch.float64).cpu())
    sq_repl = sum((p.grad.float().pow(2).sum().cpu() for p in params if id(p) not in shard_ids), torch.zeros(()))
    norm = math.sqrt(float(sq_sharded) + float(sq_repl))
    if norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm


def global_batch_shard(tokens, global_batch, context_length, seed, step, micro, rank, world, device):
    """Rank `rank`'s contiguous 1/world of the (seed, step, micro) global batch: x, y of shape (G/N, T)."""
    rng = np.random.default_rng([seed, step, micro])
    starts = rng.integers(0, len(tokens) - context_length, size=global_batch)   # same draw on every rank
    per = global_batch // world
    mine = starts[rank * per:(rank + 1) * per]
    windows = np.asarray(tokens[mine[:, None] + np.arange(context_length + 1)[None, :]], dtype=np.int64)
    xy = torch.from_numpy(windows)                                               # (G/N, T+1)
    return xy[:, :-1].contiguous().to(device), xy[:, 1:].contiguous().to(device)


def _all_ranks_ok(what, fn):
    """Run fn() on every rank; if it raised anywhere, raise on EVERY rank with each failing rank's message (a rank
    that died alone would leave the others blocked in their next collective)."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on all ranks, with the rank named
        err = f"{type(e).__name__}: {e}"
    errs = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    bad = [(r, e) for r, e in enumerate(errs) if e is not None]
    if bad:
        raise ValueError(f"{what} failed on " + "; ".join(f"rank {r}: {e}" for r, e in bad))
    return result


def train_distributed(cfg, *, strategy="bucketed", bucket_mb=25.0, compute_dtype=None, global_batch_size=None,
                      die_at_step=None, backend=None, timeout_s=DEFAULT_TIMEOUT_S, log=print):
    """Train per train.py's TrainConfig on every rank of the process group (torchrun): the checks and data
    preparation a group of processes needs, then train.train() with this file's hooks. Returns its summary."""
    t_start = time.time()
    rank, world, device = init_distributed(backend, timeout_s)
    main = rank == 0
    say = (lambda *a: log(*a)) if main else (lambda *a: None)
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy must be one of {STRATEGIES}, got {strategy!r}")
    if cfg.compile:
        raise ValueError("--compile is not supported by ddp.py's hook-based wrappers; run without it")
    if cfg.max_steps is None:
        raise ValueError("ddp.py needs --max-steps (a wall-clock budget would stop ranks at different steps)")
    if cfg.max_minutes is not None:
        say(f"ddp.py: ignoring the wall-clock budget ({cfg.max_minutes} min): ranks stop at --max-steps "
            f"{cfg.max_steps}")
    G = global_batch_size or cfg.batch_size * world
    out = Path(cfg.out_dir)
    ckpt_path = out / "ckpt.pt"
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = cfg.resume or restarted   # torchrun --max-restarts: a restarted job continues from the checkpoint
    # ---- every rank must agree on the run, or fail now with the differing fields named --------------------------
    fingerprint = dict(dataclasses.asdict(cfg), strategy=strategy, bucket_mb=bucket_mb, world_size=world,
                       compute_dtype=str(compute_dtype), global_batch_size=global_batch_size)
    check_same_across_ranks("training configuration", fingerprint)
    written_at = None
    if resume and ckpt_path.exists():  # read here on every rank, so a bad file fails on all of them
        ckpt = _all_ranks_ok("reading the checkpoint", lambda: T.read_checkpoint(ckpt_path))
        written_at = ckpt.get("ddp", {})
        G = int(written_at.get("global_batch_size", G)) if global_batch_size is None else G
        del ckpt
    if G % world != 0:
        raise ValueError(f"global batch {G} sequences does not split over {world} ranks; pass "
                         f"--global-batch-size divisible by the world size")
    # ---- data: rank 0 builds the caches (tokenizer training, encoding), then the others read them ---------------
    data, err = None, None
    if main:
        try:
            T.check_out_dir(out)
            data = T.prepare_data(cfg, log=say)
        except Exception as e:  # reported on every rank below
            err = f"{type(e).__name__}: {e}"
    long_wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))  # data prep can take hours
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

    def check_data():
        tr, va = data.train_tokens(), data.val_tokens()
        for name, arr, path in (("training", tr, data.train_path), ("validation", va, data.val_path)):
            if len(arr) < cfg.context_length + 2:
                raise ValueError(f"{name} split {path} has {len(arr)} tokens, fewer than one context window + 1 "
                                 f"({cfg.context_length + 1}): this rank has no data to train on")
        return dict(train_tokens=len(tr), val_tokens=len(va), vocab_size=data.tokenizer.vocab_size)
    check_same_across_ranks("data", _all_ranks_ok("data check", check_data))
    train_tokens = data.train_tokens()
    say(f"ddp.py: {strategy} on {world} rank(s) ({dist.get_backend()}, {device}); global batch {G} x "
        f"{cfg.grad_accum} accum x {cfg.context_length} tokens")
    if written_at is not None:
        say(f"ddp.py: resuming a checkpoint written at world size {written_at.get('world_size', '?')} "
            f"({written_at.get('strategy', '?')}), now {world} ({strategy})")

    # ---- the hooks: what a group of ranks does differently from one process (see train.TrainHooks) --------------
    def load_optimizer_state(optimizer, run_model, ckpt):
        saved_names = ckpt.get("optimizer_param_names")
        names = optimizer_param_names(run_model, optimizer)
        if saved_names is not None and saved_names != names:
            diff = next(i for i, (a, b) in enumerate(zip(saved_names + [None], names + [None])) if a != b)
            raise ValueError(f"checkpoint {ckpt_path}: optimizer parameter order differs at index {diff} "
                             f"({saved_names[diff:diff + 1]} vs {names[diff:diff + 1]}); was it written "
                             f"with a different --optimizer?")
        if ckpt.get("optimizer") is not None:
            load_full_optimizer_state(optimizer, run_model, ckpt["optimizer"])

    def checkpoint_state(model, run_model, optimizer):
        # consolidated, whatever the strategy: any world size and strategy can resume it
        return dict(model=full_model_state(model, run_model), optimizer=full_optimizer_state(optimizer, run_model),
                    optimizer_param_names=optimizer_param_names(run_model, optimizer),
                    ddp=dict(world_size=world, strategy=strategy, global_batch_size=G))

    def full_model(model, run_model):
        if not isinstance(run_model, FSDP):
            return model
        sd = full_model_state(model, run_model)  # collective; then a plain copy for generation
        plain = M.TransformerLM.from_config(model.config).to(device)
        plain.load_state_dict(sd)
        return plain

    def die_if_asked(step, model, metrics):
        if die_at_step is not None and step == die_at_step and rank == world - 1 and world > 1:
            marker = out / f".died_at_step_{die_at_step}"
            if not marker.exists():  # die only the first time: the restarted job must get past this step
                marker.write_text(f"rank {rank} killed itself at step {step}\n")
                print(f"rank {rank}: --die-at-step {step}: killing myself (SIGKILL)", flush=True)
                os.kill(os.getpid(), 9)

    def communication_share(run_model, train_seconds):
        comm = getattr(run_model, "comm_wait_seconds", None)
        return "" if comm is None else f" | blocked on communication {100 * comm / max(train_seconds, 1e-9):.0f}%"

    hooks = T.TrainHooks(
        wrap_model=lambda model: wrap_model(model, strategy, bucket_mb, compute_dtype),
        build_optimizer=lambda model, run_model, c: build_strategy_optimizer(model, run_model, strategy, c),
        load_optimizer_state=load_optimizer_state,
        get_batch=lambda step, micro: global_batch_shard(train_tokens, G, cfg.context_length, cfg.seed, step, micro,
                                                         rank, world, device),
        no_sync=lambda run_model, last: contextlib.nullcontext() if last else run_model.no_sync(),
        sync_gradients=lambda run_model: run_model.finish_gradient_synchronization(),
        clip_gradients=clip_gradients, all_reduce=all_reduce_host, on_step=die_if_asked,
        progress_note=communication_share, checkpoint_state=checkpoint_state, full_model=full_model)
    # this rank's share of the global batch; threads: keep the launcher's per-rank count (torchrun's
    # OMP_NUM_THREADS, launch_local's cores / N) unless --threads says otherwise
    run_cfg = dataclasses.replace(cfg, batch_size=G // world, device=str(device), resume=resume, max_minutes=None,
                                  threads=cfg.threads or torch.get_num_threads())
    summary = T.train(run_cfg, data, hooks=hooks, rank=rank, world_size=world, log=log, t_start=t_start)
    dist.barrier()
    return dict(summary, world_size=world, strategy=strategy)


# ---------------------------------------------------------------------------------------------------------------
# 6. Benchmark: every strategy on the same model and batch, side by side, interleaved
# ---------------------------------------------------------------------------------------------------------------
# Step time = forward + backward + gradient synchronization + optimizer step, per rank, timed between barriers.
# The machine may be busy (shared cores), so strategies take turns: R rounds, each running k steps of every
# strategy in a rotated order, and we report the median round -> load changes hit all strategies alike.
# "local" runs the same step with no communication at all: exposed communication share = 1 - t_local / t.
# Memory: bytes of parameters + gradients + optimizer state this rank holds (counted from the tensors), and for FSDP
# the peak of gathered full weights alive at once.

def _tensor_bytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _optimizer_state_bytes(opt):
    if isinstance(opt, ShardedOptimizer):
        return opt.local_state_bytes()
    return _tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def bench(args):
    rank, world, device = init_distributed(args.backend)
    cfg = M.ModelConfig(vocab_size=args.vocab_size, context_length=args.context_length, d_model=args.d_model,
                        num_layers=args.num_layers, num_heads=args.num_heads)
    strategies = args.strategies.split(",")
    for s in strategies:
        if s not in STRATEGIES + ("local",):
            raise ValueError(f"unknown strategy {s!r} in --strategies; choose from {STRATEGIES + ('local',)}")
    g = torch.Generator().manual_seed(1234 + rank)                     # each rank its own shard of the batch
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length), generator=g).to(device)
    setups = {}
    for s in strategies:
        torch.manual_seed(0)
        model = M.TransformerLM.from_config(cfg).to(device)
        model.validate_inputs = False
        run = wrap_model(model, s, args.bucket_mb, _DTYPES[args.compute_dtype] if s == "fsdp" else None)
        params = [p for p in run.parameters() if p.requires_grad]
        opt = ShardedOptimizer(params, torch.optim.AdamW, lr=1e-4) if s == "zero1" else \
            torch.optim.AdamW(params, lr=1e-4)
        setups[s] = (model, run, opt)
    n_params = M.num_params(setups[strategies[0]][0])

    def one_step(s, measure_memory=False):
        # one training step exactly as the training loop runs it (forward, loss, backward, sync, optimizer)
        model, run, opt = setups[s]
        logits = run(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        run.finish_gradient_synchronization()
        mem = None
        if measure_memory:
            params = list(run.parameters())
            mem = dict(params=_tensor_bytes(params), grads=_tensor_bytes(p.grad for p in params))
        opt.step()
        if measure_memory:
            mem["optimizer"] = _optimizer_state_bytes(opt)
            mem["total"] = mem["params"] + mem["grads"] + mem["optimizer"]
            mem["gathered_peak"] = getattr(run, "peak_gathered_bytes", 0)
        opt.zero_grad(set_to_none=True)
        return mem

    rank0_print(f"bench: {world} ranks ({dist.get_backend()}, {device}, {torch.get_num_threads()} threads/rank), "
                f"TransformerLM {n_params / 1e6:.2f}M params (d_model {cfg.d_model}, {cfg.num_layers} layers, "
                f"vocab {cfg.vocab_size}), per-rank batch {args.batch_size} x {cfg.context_length} tokens; "
                f"{args.rounds} rounds x {args.steps} steps per strategy, interleaved; load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    memory = {s: one_step(s, measure_memory=True) for s in strategies}   # warm-up step + memory accounting
    for s in strategies:
        one_step(s)
    times = {s: [] for s in strategies}
    comm_wait = {s: [] for s in strategies}
    for r in range(args.rounds):
        order = strategies[r % len(strategies):] + strategies[:r % len(strategies)]
        for s in order:
            run = setups[s][1]
            w0 = getattr(run, "comm_wait_seconds", 0.0)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one_step(s)
            dist.barrier()
            t = (time.perf_counter() - t0) / args.steps
            times[s].append(t)
            comm_wait[s].append((getattr(run, "comm_wait_seconds", 0.0) - w0) / args.steps)
    median = lambda v: sorted(v)[len(v) // 2]
    med = {s: median(v) for s, v in times.items()}
    peer = "torch-ddp" if "torch-ddp" in times else None
    # paired ratio: each round's time over the peer's time in the SAME round, median over rounds. On a shared
    # machine the load drifts between rounds; within one round both saw (nearly) the same load.
    paired = {s: median([t / p for t, p in zip(times[s], times[peer])]) if peer else float("nan")
              for s in strategies}
    local = med.get("local")
    rows = []
    rank0_print(f"{'strategy':10s} {'step ms':>9s} {'vs torch-ddp':>12s} {'(paired)':>9s} {'exposed comm':>12s} "
                f"{'blocked waiting':>15s}  rounds (ms)")
    pct = lambda v: f"{v:.1%}" if math.isfinite(v) else "-"
    for s in strategies:
        share = (1 - local / med[s]) if local and s != "local" else float("nan")
        wait = median(comm_wait[s]) / med[s]
        ratio = med[s] / med[peer] if peer else float("nan")
        rows.append(dict(strategy=s, step_ms=1e3 * med[s], ratio_vs_torch_ddp=ratio, paired_ratio=paired[s],
                         exposed_comm_share=share, wait_share=wait, rounds_ms=[1e3 * t for t in times[s]]))
        waited = pct(wait) if hasattr(setups[s][1], "comm_wait_seconds") else "(not visible)"
        rank0_print(f"{s:10s} {1e3 * med[s]:9.1f} {ratio:12.3f} {paired[s]:9.3f} {pct(share):>12s} {waited:>15s}  "
                    f"{' '.join(f'{1e3 * t:.0f}' for t in times[s])}")
    rank0_print("exposed comm = 1 - t(local) / t: step time not hidden behind compute; blocked waiting = time inside "
                "our wrappers' waits (torch's reducer waits inside backward, not visible)")
    if "fsdp" in strategies and args.compute_dtype != "fp32":
        rank0_print(f"(fsdp computes in {args.compute_dtype}, 'local' in fp32: fsdp's exposed-comm share also holds "
                    f"the compute-speed difference; CPUs without native {args.compute_dtype} matmuls are much slower)")
    # memory: the largest figure over ranks (ZeRO's shards need not be exactly equal)
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
    if args.out and rank == 0:
        _atomic_write_text(args.out, json.dumps(dict(world=world, params=n_params, rows=rows,
                                                     load_average=os.getloadavg()), indent=1))
    cleanup_distributed()


# ---------------------------------------------------------------------------------------------------------------
# 7. Command line
# ---------------------------------------------------------------------------------------------------------------

def _under_launcher():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def build_train_parser():
    p = T.get_parser()
    p.prog = "ddp.py"
    p.description = ("Distributed training of a ScratchLM model: the same options as train.py, run on every rank "
                     "by torchrun (torchrun --nproc_per_node=N ddp.py [preset] [--flags] --strategy S), or "
                     "spawned locally with --nproc N. Other commands: 'ddp.py bench --help', "
                     "'ddp.py bench-comm --help', 'ddp.py tour --help'.")
    d = p.add_argument_group("distributed")
    d.add_argument("--strategy", default="bucketed", choices=STRATEGIES,
                   help="naive: blocking all-reduce after backward; ddp: async all-reduce per parameter from "
                        "backward hooks; bucketed: the same per bucket; zero1: bucketed + ShardedOptimizer "
                        "(optimizer state / N); fsdp: weights, grads and optimizer state / N (needs --optimizer "
                        "adamw); torch-ddp: torch's DistributedDataParallel")
    d.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size for bucketed/zero1/torch-ddp")
    d.add_argument("--compute-dtype", default="fp32", choices=list(_DTYPES),
                   help="fsdp: dtype of gathered weights and matmuls (master weights and optimizer stay fp32)")
    d.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per micro-step over all ranks (default: --batch-size x world size; on resume: "
                        "the checkpoint's, so a run continues at another world size with the same batches)")
    d.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    d.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait for the other ranks before failing (catches mismatches)")
    d.add_argument("--nproc", type=int, default=None,
                   help="when not started by torchrun: spawn this many local processes (default 1)")
    d.add_argument("--die-at-step", type=int, default=None,
                   help="testing the restart path: the last rank SIGKILLs itself after this step, once (a marker "
                        "file in the run folder stops it from dying again after torchrun restarts the job)")
    return p


def config_for_strategy(args):
    """train.py's config from the parsed flags, with one strategy-specific default: every preset trains with Muon,
    which orthogonalizes whole weight matrices, but FSDP holds row shards of them. When the user did not choose the
    optimizer, FSDP trains with AdamW; an explicit --optimizer muon still gets build_strategy_optimizer's error."""
    if args.strategy == "fsdp" and args.optimizer is None:
        args.optimizer = "adamw"
        if int(os.environ.get("RANK", "0")) == 0:
            print("--strategy fsdp: using --optimizer adamw (the preset's Muon needs whole weight matrices)")
    return T.config_from_args(args)


def _train_entry(argv):
    args = build_train_parser().parse_args(argv)
    cfg = config_for_strategy(args)
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise ValueError("--global-batch-size must be >= 1")
    if args.timeout <= 0:
        raise ValueError("--timeout must be > 0")
    try:
        train_distributed(cfg, strategy=args.strategy, bucket_mb=args.bucket_mb,
                          compute_dtype=_DTYPES[args.compute_dtype], global_batch_size=args.global_batch_size,
                          die_at_step=args.die_at_step, backend=args.backend, timeout_s=args.timeout)
    finally:
        cleanup_distributed()


def _add_launch_args(p):
    p.add_argument("--nproc", type=int, default=2,
                   help="processes to spawn locally when not started by torchrun (ignored under torchrun)")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="default: nccl with CUDA, else gloo")


def _run_maybe_spawned(fn, args):
    if _under_launcher():
        fn(args)
    else:
        if args.nproc < 1:
            raise ValueError("--nproc must be >= 1")
        launch_local(fn, args.nproc, args)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench-comm":
        p = argparse.ArgumentParser(prog="ddp.py bench-comm", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                    description="Time collectives on fp32 tensors from --min-mb to --max-mb "
                                                "(doubling) for this world size and backend; prints algorithm and "
                                                "bus bandwidth.")
        _add_launch_args(p)
        p.add_argument("--min-mb", type=float, default=1.0, help="smallest tensor, MB")
        p.add_argument("--max-mb", type=float, default=1024.0, help="largest tensor, MB")
        p.add_argument("--ops", default="all_reduce", help="comma list of all_reduce,all_gather,reduce_scatter")
        p.add_argument("--iters", type=int, default=5, help="timed iterations per size (median)")
        p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations per size")
        p.add_argument("--out", default=None, help="write the rows as JSON here (rank 0)")
        args = p.parse_args(argv[1:])
        if not 0 < args.min_mb <= args.max_mb:
            raise ValueError("need 0 < --min-mb <= --max-mb")
        bad = [o for o in args.ops.split(",") if o not in ("all_reduce", "all_gather", "reduce_scatter")]
        if bad:
            raise ValueError(f"unknown collective(s) {bad} in --ops")
        _run_maybe_spawned(bench_comm, args)
    elif argv and argv[0] == "bench":
        p = argparse.ArgumentParser(prog="ddp.py bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                    description="Time per training step and communication share of every "
                                                "strategy, torch's DistributedDataParallel side by side, plus "
                                                "per-rank memory of params/grads/optimizer state.")
        _add_launch_args(p)
        p.add_argument("--strategies", default="local,naive,ddp,bucketed,torch-ddp,zero1,fsdp",
                       help="comma list; 'local' = the same step without any communication (baseline)")
        p.add_argument("--vocab-size", type=int, default=4096, help="model vocabulary")
        p.add_argument("--d-model", type=int, default=256, help="model width")
        p.add_argument("--num-layers", type=int, default=4, help="transformer blocks")
        p.add_argument("--num-heads", type=int, default=4, help="attention heads")
        p.add_argument("--context-length", type=int, default=128, help="tokens per sequence")
        p.add_argument("--batch-size", type=int, default=4, help="sequences per rank per step")
        p.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size (ours and torch's)")
        p.add_argument("--compute-dtype", default="fp32", choices=list(_DTYPES), help="fsdp compute dtype")
        p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
        p.add_argument("--steps", type=int, default=3, help="steps per strategy per round")
        p.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
        args = p.parse_args(argv[1:])
        if min(args.rounds, args.steps, args.batch_size) < 1:
            raise ValueError("--rounds, --steps and --batch-size must be >= 1")
        bad = [s for s in args.strategies.split(",") if s not in STRATEGIES + ("local",)]
        if bad:
            raise ValueError(f"unknown strategies {bad} in --strategies; choose from {STRATEGIES + ('local',)}")
        _run_maybe_spawned(bench, args)
    elif argv and argv[0] == "tour":
        p = argparse.ArgumentParser(prog="ddp.py tour", description="Show all-reduce, ring all-reduce, all-gather, "
                                    "reduce-scatter and broadcast on tiny tensors.")
        _add_launch_args(p)
        args = p.parse_args(argv[1:])
        if _under_launcher():
            collectives_tour()
        else:
            launch_local(_tour_entry, args.nproc)
    else:
        args = build_train_parser().parse_args(argv)   # validate before spawning anything
        if args.nproc is not None and args.nproc > 1 and not _under_launcher():
            launch_local(_train_entry, args.nproc, argv)
        else:
            _train_entry(argv)


def _tour_entry():
    collectives_tour()


if __name__ == "__main__":
    main()
