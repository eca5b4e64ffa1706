"""Data-parallel plumbing that is not GradCon math: how N workers agree on gradients and split batches.

Contract (docs/design.md §4): every global batch of B images is cut into N
near-equal slices, worker r takes slice r (n_r images) and weights its per-sample-mean loss by
N * n_r / B; gradients are then mean-all-reduced across workers. The mean over workers of the
weighted gradients is the gradient of the global batch mean, so N workers take exactly the step one
process takes on the global batch. A worker left without images still joins every collective, with
weight 0. Needs only torch.distributed (never Ray): the Ray Train job and plain torch.multiprocessing
tests use the same code.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class GradientSync(Protocol):
    """How data-parallel workers agree on gradients; None everywhere means one process."""

    world_size: int

    def mean_differentiable(self, t: torch.Tensor) -> torch.Tensor: ...

    def mean_(self, tensors: list[torch.Tensor]) -> None: ...

    def gather(self, value: np.ndarray) -> list[np.ndarray]: ...


STEP_PARTS = ("compute", "inner_allreduce", "final_allreduce", "data_wait")


@dataclass
class StepClock:
    """Where a worker's steps spend their time: the constraint's inner all-reduces (forward and backward),
    the final all-reduce of the gradients, waiting for data (stream mode: the next local batch and the
    per-step count swap), and compute, the rest. A collective's time includes waiting for the slowest worker.
    On a GPU each timed part synchronizes the device, so that its time is its own (docs/design.md §4).
    Made when the worker starts, it also records how long the worker took to its first step (first_step_s)."""

    device: torch.device | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    first_step_s: float | None = None
    _made: float = field(default_factory=time.perf_counter)
    _open: bool = False
    _start: float = 0.0

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the block as `name`; a part inside another (the count swap inside a data wait) is the outer's."""
        if self._open:
            yield
            return
        self._sync_device()
        self._open, start = True, time.perf_counter()
        try:
            yield
        finally:
            self._sync_device()
            self._open = False
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def waited(self, items: Iterable[T]) -> Iterator[T]:
        """items, the time spent getting each one counted as data wait."""
        it = iter(items)
        while True:
            with self.part("data_wait"):
                item = next(it, None)
            if item is None:
                return
            self.step_begins()
            yield item

    def step_begins(self) -> None:
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self._made

    def restart(self) -> None:
        """Start timing a loop of steps."""
        self.seconds, self._start = {}, time.perf_counter()

    def per_step_ms(self, steps: int) -> dict[str, float]:
        """Per-step means, in ms, of each part of the `steps` steps since restart()."""
        parts = {name: self.seconds.get(name, 0.0) for name in STEP_PARTS[1:]}
        parts["compute"] = time.perf_counter() - self._start - sum(parts.values())
        return {f"step_{name}_ms": 1000 * parts[name] / max(steps, 1) for name in STEP_PARTS}

    def _sync_device(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _timed(clock: StepClock | None, part: str) -> contextlib.AbstractContextManager:
    return clock.part(part) if clock is not None else contextlib.nullcontext()


class _AllReduceSum(torch.autograd.Function):
    """The sum over workers, whose backward is the sum of the workers' output gradients (what the constraint's
    inner gradients need). torch.distributed.nn's is deprecated in torch 2.14 and the replacement it names has
    no backward; this one also times itself as the inner all-reduce."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, clock: StepClock | None) -> torch.Tensor:
        ctx.clock = clock
        out = t.clone(memory_format=torch.contiguous_format)
        with _timed(clock, "inner_allreduce"):
            torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.clock), None


class AllReduceMean:
    """GradientSync over torch.distributed (an initialised process group): the mean over workers.
    With a StepClock it times its collectives (mean_ as the final all-reduce, unless inside another part)."""

    def __init__(self, world_size: int, clock: StepClock | None = None):
        self.world_size, self.clock = world_size, clock

    def mean_differentiable(self, t: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(t, self.clock) / self.world_size

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        # One all-reduce of all tensors flattened together: per-tensor calls cost 2x DDP's step time.
        flat = torch.cat([t.flatten() for t in tensors])
        with _timed(self.clock, "final_allreduce"):
            torch.distributed.all_reduce(flat)
        flat.div_(self.world_size)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def gather(self, value: np.ndarray) -> list[np.ndarray]:
        """Every worker's array, in rank order (stream mode's validation scores: a few floats per row)."""
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


def training_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """The data order and the noise of training (ARAE's random starts), seeded: with the initial weights,
    all the randomness of a run, shared by the single-process fit and every data-parallel worker."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)


@dataclass
class LocalBatch:
    """One worker's part of one global batch."""

    rows: torch.Tensor  # row numbers into the epoch's images (one row, with weight 0, for a worker left empty)
    scale: float  # N * n_r / B: the weight of this worker's per-sample-mean loss
    own: int  # images this worker really holds (0: it joins the collectives with weight 0)
    global_size: int  # B
    offset: int  # where this worker's slice starts within the global batch

    @classmethod
    def alone(cls, n: int) -> LocalBatch:
        """One process holding a whole global batch of n images."""
        return cls(torch.arange(n), 1.0, n, n, 0)


def local_batches(order: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1) -> list[LocalBatch]:
    """Worker rank's parts of the global batches of batch_size cut from `order` (an epoch's permutation)."""
    out = []
    for batch in order.split(batch_size):
        parts = batch.tensor_split(world_size)
        mine, offset = parts[rank], sum(len(p) for p in parts[:rank])
        if len(mine):
            out.append(LocalBatch(mine, len(mine) * world_size / len(batch), len(mine), len(batch), offset))
        else:
            out.append(LocalBatch(batch[:1], 0.0, 0, len(batch), offset))
    return out


def step_counts(own: int, rank: int, world_size: int, sync: GradientSync | None) -> list[int]:
    """Every worker's number of images for this step, in rank order (one small all-reduce)."""
    counts = torch.zeros(world_size, dtype=torch.float64)
    counts[rank] = own
    if sync is not None:
        sync.mean_([counts])
        counts *= world_size
    return [round(c) for c in counts.tolist()]


def streamed_batches(batches: Iterable[torch.Tensor], placeholder: torch.Tensor, rank: int = 0, world_size: int = 1,
                     sync: GradientSync | None = None) -> Iterator[tuple[torch.Tensor, LocalBatch]]:
    """Stream mode's steps: this worker's local batches as they arrive, each with its LocalBatch.

    Workers read their own shards, so a step's global batch is the union of what each brings to it: the
    workers swap their counts every step (n_r; B = their sum), which gives each its weight N * n_r / B
    and its offset in the global batch. A worker whose shard has run out (or was empty: Ray Data hands out
    whole blocks) joins with weight 0, on the placeholder (one image [1, C, H, W]), until every shard is
    done: the workers' step counts need not be equal, and no row is dropped to make them so.
    """
    it = iter(batches)
    while True:
        x = next(it, None)
        own = 0 if x is None else len(x)
        counts = step_counts(own, rank, world_size, sync)
        total = sum(counts)
        if total == 0:
            return
        x = placeholder if not own else x  # (a batch of rows that all failed to decode is empty)
        yield x, LocalBatch(torch.arange(len(x)), own * world_size / total, own, total, sum(counts[:rank]))


def all_reduce_gradients(optimizer: torch.optim.Optimizer, sync: GradientSync | None) -> None:
    """Mean-all-reduce the gradients of all the optimizer's parameters (zeros where one got none, so that
    every worker passes the same list)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if sync is not None:
        sync.mean_([p.grad for p in params])


def average_buffers(module: torch.nn.Module, sync: GradientSync | None) -> None:
    """Average a module's float buffers across workers (BatchNorm statistics), as DDP's broadcast would
    keep them equal: every rank then holds the state rank 0 saves."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if sync is not None and buffers:
        sync.mean_(buffers)
