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


def all_reduce_tensors(tensors: list[torch.Tensor], device: str = "cpu", bucket: int = 1 << 24) -> None:
    """Sum ``tensors`` in place over the ranks: tensors of up to ``bucket`` elements go together in
    flat all-reduces of one dtype, larger ones alone (no copy of a large statistic is made)."""
    if world_size() == 1 or not tensors:
        return
    dist = _group(device)
    small: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() > bucket and t.is_contiguous():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            small.setdefault(t.dtype, []).append(t)
    for group in small.values():
        batch: list[torch.Tensor] = []
        size = 0
        for t in group + [None]:
            if t is None or (batch and size + t.numel() > bucket):
                all_reduce_sum(batch, device)
                batch, size = [], 0
            if t is not None:
                batch.append(t)
                size += t.numel()


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks get one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def shard_chunks(n: int, chunk: int) -> slice:
    """This rank's share of ``n`` items cut into whole chunks of ``chunk`` items (the last one
    shorter): ranks' shares start on chunk boundaries, so a chunk is never split over two ranks."""
    nchunks = -(-n // chunk) if n else 0
    part = shard(nchunks)
    return slice(min(n, part.start * chunk), min(n, part.stop * chunk))


# ------------------------------------------------------------------ --workers N: local workers
def launch(workers: int, fn, *args, quiet: bool = False):
    """Run ``fn(*args)`` in ``workers`` local processes started by torch.distributed's elastic
    launcher (the one ``torchrun --standalone`` uses: a c10d rendezvous on localhost, a free port,
    no restarts), CPU threads split evenly unless OMP_NUM_THREADS is set. Returns rank 0's result.
    In the workers only rank 0 prints (``quiet`` silences it too). A UserError or VerificationError
    in any worker is written to a file by the first worker that fails (the agent may stop rank 0
    before it could print: the message was lost under load) and raised here again, so the CLI
    prints it once; WorkersFailed(code) only when no message came back."""
    import json
    import logging
    import shutil
    import tempfile
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .errors import WorkersFailed

    if workers < 1:
        from .errors import UserError

        raise UserError(f"--workers must be >= 1, got {workers}")
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=f"graphprune-{uuid.uuid4().hex}",
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                       start_method="spawn", monitor_interval=0.1)
    saved = os.environ.get("OMP_NUM_THREADS")
    errdir = tempfile.mkdtemp(prefix="graphprune-workers-")
    os.environ[_ERROR_FILE] = os.path.join(errdir, "error.json")  # inherited by the spawned workers
    if saved is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
    # the agent's own log lines (rendezvous, failures, terminating the other workers) stay out of ours
    loggers = [logging.getLogger(n) for n in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(cfg, _worker)(fn, args, quiet)
    except ChildFailedError as exc:
        failures = exc.failures
        # the worker that failed with our error code (the agent stops the others: they show a signal)
        code = next((f.exitcode for _, f in sorted(failures.items()) if f.exitcode in (1, 2)), None)
        if code in (1, 2):  # a UserError / VerificationError, written by the first worker that failed
            try:
                with open(os.environ[_ERROR_FILE]) as f:
                    kind, message = json.load(f)
            except (OSError, ValueError):
                raise WorkersFailed(code) from None
            from .errors import UserError, VerificationError

            raise (UserError if kind == "error" else VerificationError)(message) from None
        raise
    finally:
        shutil.rmtree(errdir, ignore_errors=True)
        os.environ.pop(_ERROR_FILE, None)
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return results[0]


_ERROR_FILE = "GRAPHPRUNE_WORKER_ERROR"


def _worker(fn, args, quiet: bool):
    import json
    import sys

    from . import log
    from .errors import UserError, VerificationError

    log.set_quiet(quiet or not is_main())
    try:
        return fn(*args)
    except (UserError, VerificationError) as exc:
        path = os.environ.get(_ERROR_FILE)
        if path:  # the first worker to fail leaves its message for launch() to raise
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(["error" if isinstance(exc, UserError) else "verification", str(exc)], f)
        elif is_main():
            what = "error" if isinstance(exc, UserError) else "verification failed"
            print(f"graphprune: {what}: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
