"""torch.distributed glue for training under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

A run is distributed when ``torchrun`` set ``WORLD_SIZE`` > 1 (with ``RANK`` and ``LOCAL_RANK``); otherwise
everything here is a no-op and the single-process path is untouched. Conventions used by
:mod:`robust_jem.train`:

* batch: the global batch of step t is the single-process batch (deterministic ``BatchOrder``); rank r takes
  the rank-strided slice ``idx[r::world]``, so ``batch_size`` must be divisible by the world size and the
  per-rank batch is ``batch_size / world``. DDP averages the per-rank gradients, which equals the gradient of
  the single-process mean loss (exactly for deterministic losses, up to float summation order).
* replay buffer: rank r owns the contiguous shard ``torch.tensor_split(buffer, world)[r]``; checkpoints hold
  the full buffer gathered in rank order, so they resume on any world size (re-sharded on load).
* randomness: each rank has its own generator, seeded ``derive_seed(seed, "sampler", retry, rank)`` (rank 0
  uses exactly the single-process seed).
* files: only rank 0 writes (checkpoints, metrics, samples); all ranks read the same ``--out`` directory
  on resume, so with several machines ``--out`` must be on a shared file system.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .errors import UserError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; ``world == 1`` means single process (no collectives)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (``t`` itself when single process)."""
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """Element-wise OR of boolean flags over ranks, so every rank takes the same decision."""
        if not self.enabled:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's ``t`` (same trailing shape, any length) in rank order on rank 0.

        Returns the concatenation on rank 0 and None elsewhere (``t`` itself when single process).
        """
        if not self.enabled:
            return t
        n = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        lengths = [int(s) for s in sizes]
        padded = torch.zeros((max(lengths), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)] if self.is_main else None
        dist.gather(padded.contiguous(), parts, dst=0)
        if not self.is_main:
            return None
        return torch.cat([p[:k] for p, k in zip(parts, lengths)])  # type: ignore[arg-type]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's picklable ``obj`` on rank 0 (``[obj]`` when single process), None elsewhere."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = DistContext()


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous shard of ``t`` along dim 0 (the inverse of :meth:`DistContext.gather_rows`)."""
    return torch.tensor_split(t, world)[rank]


def shard_size(n: int, rank: int, world: int) -> int:
    """Length of rank ``rank``'s shard of ``n`` rows (``torch.tensor_split`` convention)."""
    return n // world + (1 if rank < n % world else 0)


def env_rank() -> DistContext:
    """The (rank, world, local rank) that ``torchrun`` put in the environment; single process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistContext(rank=rank, world=world, local_rank=local)


@contextmanager
def launch(device: torch.device) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the ``torchrun`` process group when there is one; yield the context and this rank's device.

    On CUDA each rank uses ``cuda:LOCAL_RANK`` with the nccl backend; on CPU the gloo backend. Without
    ``torchrun`` (or with one process) this yields :data:`SINGLE` and ``device`` unchanged.
    """
    ctx = env_rank()
    if not ctx.enabled:
        yield SINGLE, device
        return
    if device.type == "cuda":
        if device.index is not None and device.index != ctx.local_rank:
            raise UserError(f"under torchrun each rank uses cuda:LOCAL_RANK; ask for the device cuda or auto, "
                            f"not {device}")
        if ctx.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {ctx.local_rank} but only {torch.cuda.device_count()} CUDA devices")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=ctx.rank, world_size=ctx.world, device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world)
    else:
        raise UserError(f"distributed training supports cpu (gloo) and cuda (nccl), not {device.type}")
    log.info("rank %d/%d on %s (%s)", ctx.rank, ctx.world, device, dist.get_backend())
    try:
        yield ctx, device
    finally:
        dist.destroy_process_group()
