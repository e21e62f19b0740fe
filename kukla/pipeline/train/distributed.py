"""Data parallelism across torchrun ranks: one process group, one collective per step.

Dictionaries are trained through `training_loss`, not `forward`, and a sweep holds many of
them; torch's `DistributedDataParallel` hooks only `forward` and keeps one reducer per
module. So the gradient sync is done here, by hand, as DDP does it: every rank holds an
equal share of each global batch, computes its loss with the global batch's statistics
(`RankShare`: variances and BatchTopK's cutoff reduced over ranks), and one flat all-reduce
(averaged over ranks) of every sweep member's gradients gives each rank the gradient of the
global batch's loss: the same as one process, whatever the world size.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from kukla.config import usable_device
from kukla.pipeline.dictionary.loss import ONE_PROCESS, GlobalBatch


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank, the world size, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and the final dictionaries."""
        return self.rank == 0


def init_ranks(device: str) -> Ranks:
    """Join torchrun's process group when launched under it (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(usable_device(device))
    if dev.type == "cuda" and dev.index is None:  # set_device needs an index
        dev = torch.device("cuda", 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
    return Ranks(rank=rank, world=world, device=dev)


def close_ranks(ranks: Ranks) -> None:
    """Leave the process group (only if we are in one)."""
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: Iterable[torch.nn.Parameter], ranks: Ranks) -> None:
    """Average gradients over ranks with one flat all-reduce (grads of None are skipped)."""
    if ranks.world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ranks.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(masks: list[torch.Tensor], ranks: Ranks) -> list[torch.Tensor]:
    """Elementwise OR of boolean masks over ranks: a latent fired if it fired anywhere."""
    if ranks.world == 1:
        return masks
    flat = torch.cat([m.reshape(-1).to(torch.uint8) for m in masks])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    out, offset = [], 0
    for m in masks:
        out.append(flat[offset:offset + m.numel()].view_as(m).bool())
        offset += m.numel()
    return out


def sum_over_ranks(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Sum a tensor over ranks (used for token counts and logged metrics)."""
    if ranks.world > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def broadcast_parameters(module: torch.nn.Module, ranks: Ranks) -> None:
    """Make every rank start from rank 0's weights and buffers, as DDP does at wrap time."""
    if ranks.world == 1:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order (each rank's stream cursor, for checkpoints)."""
    if ranks.world == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def agree(flag: bool | torch.Tensor, ranks: Ranks) -> bool:
    """True on every rank if it is true on any rank (so all ranks stop together)."""
    if ranks.world == 1:
        return bool(flag)
    t = torch.as_tensor(flag, device=_collective_device(ranks)).reshape(1).int()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _collective_device(ranks: Ranks) -> torch.device:
    """NCCL reduces tensors on the GPU, gloo on the CPU."""
    return ranks.device if ranks.device.type == "cuda" else torch.device("cpu")


class RankShare(GlobalBatch):
    """This rank's equal share of every global batch: the loss's statistics are reduced over ranks."""

    def __init__(self, ranks: Ranks) -> None:
        self.world = ranks.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)


def global_batch(ranks: Ranks) -> GlobalBatch:
    """How `training_loss` sees the batch on this rank: the whole of it, or one rank's share."""
    return ONE_PROCESS if ranks.world == 1 else RankShare(ranks)


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (e.g. while rank 0 writes a checkpoint)."""
    if ranks.world > 1:
        dist.barrier()
