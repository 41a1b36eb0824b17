"""Data parallelism for MetaMix under ``torchrun``: one process per device, DistributedDataParallel, a
DistributedSampler per loader, and only rank 0 writing files.

Alphas and steps stay identical across ranks because they are ordinary parameters of the DDP-wrapped model:
DDP broadcasts rank 0's values at wrap time and averages their gradients on every backward, and each rank
applies the same optimizer update. Nothing is toggled between the bit-meta and bit-search steps under DDP
(``requires_grad`` stays on): the optimizers alone decide what moves, so DDP's gradient buckets never change.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler


def init_from_env(device: str = "cpu") -> bool:
    """Joins the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): gloo on CPU, nccl on CUDA.

    Returns whether the run is distributed. A group that is already initialised is kept.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_device(device: str) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (and the current device); anything else is kept."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and active():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda" and active():
        torch.cuda.set_device(dev)  # NCCL collectives (all_gather_object) run on the current device
    return dev


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself on one process, DDP-wrapped under a process group."""
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def sharded_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same dataset and batch size, each rank reading its own shard; shuffled by epoch (``set_epoch``)."""
    sampler = DistributedSampler(loader.dataset, shuffle=True, seed=seed)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def all_gather(obj) -> list:
    """``obj`` of every rank, in rank order (a one-element list on one process)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()
