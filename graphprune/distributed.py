"""Data parallelism with torch.distributed, when graphprune is launched by ``torchrun``.

Every rank runs the same pipeline on the same files (tracing, scoring and planning are deterministic,
so every rank reaches the same plan); the data-parallel stages split each mini-batch over the ranks
and all-reduce what they accumulate; only rank 0 writes files and prints progress.

    torchrun --nproc_per_node 2 -m graphprune.cli prune MODEL.onnx -o OUT.onnx --keep-flops 0.5 --calib C.npz

The process group is created on first use from torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): gloo for CPU tensors, NCCL for CUDA ones (``--device cuda`` then uses
the GPU ``LOCAL_RANK``). Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""
from __future__ import annotations

import os

import torch


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank() -> int:
    if world_size() == 1:
        return 0
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main() -> bool:
    """True on rank 0 (and in a plain single-process run): the rank that writes files."""
    return rank() == 0


def local_device(device: str) -> str:
    """``cuda`` under torchrun means this rank's GPU (LOCAL_RANK)."""
    if world_size() > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _group(device: str):
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return dist


def all_reduce_sum(tensors: list[torch.Tensor], device: str = "cpu") -> None:
    """Sum ``tensors`` in place over the ranks (one flat all-reduce)."""
    if world_size() == 1 or not tensors:
        return
    dist = _group(device)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    pos = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[pos:pos + n].view_as(t))
        pos += n


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks get one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))
