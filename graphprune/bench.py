"""Latency benchmark: onnxruntime sessions, warm-up, interleaved timed runs, robust statistics.

Models are run in rotating order inside every timed iteration, so slow drift of the machine (clock
boost, thermal throttling, a noisy neighbour) affects all of them alike and their ratio stays fair.
"""
from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx

from . import log
from .errors import UserError
from .runtime import random_inputs

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}
_LABEL = {"CUDAExecutionProvider": "CUDA", "TensorrtExecutionProvider": "TensorRT"}


def resolve_providers(provider: str) -> list[str]:
    """The provider list to ask onnxruntime for, without the ones this build lacks (warning once)."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    available = set(ort.get_available_providers())
    wanted = PROVIDERS[provider]
    kept = [p for p in wanted if p in available]
    if len(kept) < len(wanted):
        missing = " and ".join(_LABEL.get(p, p) for p in wanted if p not in available)
        to = kept[0] if kept else "CPUExecutionProvider"
        log.warn(f"{missing} provider not available in this onnxruntime build; falling back to {to}")
    return kept + [p for p in ["CPUExecutionProvider"] if p not in kept]


def _named(models) -> list[tuple[str, onnx.ModelProto, str | None]]:
    """(display name, model, source path) for paths, ModelProtos or (name, path-or-model) pairs."""
    from .io import load_model

    out, seen = [], {}
    for i, item in enumerate(models):
        name, m = item if isinstance(item, tuple) else (None, item)
        src = None
        if isinstance(m, (str, os.PathLike)):
            src, m = str(m), load_model(m)
            name = name or Path(src).name
        elif not isinstance(m, onnx.ModelProto):
            raise UserError(f"model {i}: expected a path or an onnx.ModelProto, got {type(m).__name__}")
        name = name or m.graph.name or f"model{i}"
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}#{seen[name]}", m, src))
    return out


def _static_batch_conflict(model: onnx.ModelProto, batch: int) -> str | None:
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            return f"input {vi.name!r} has a static batch dimension of {dims[0].dim_value}"
    return None


def _session(model: onnx.ModelProto, name: str, providers: list[str], threads: int | None):
    from .runtime import session

    return session(model, providers, threads=threads, name=name)


def _runner(sess, feeds: dict, io_binding: bool):
    """A no-argument callable doing one inference; with I/O binding the inputs live on the GPU."""
    if not io_binding:
        return lambda: sess.run(None, feeds)
    import onnxruntime as ort

    binding = sess.io_binding()
    device_inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in feeds.items()}
    for k, v in device_inputs.items():
        binding.bind_ortvalue_input(k, v)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run(_keep=device_inputs):  # the default argument keeps the device buffers alive
        sess.run_with_iobinding(binding)
    return run


def stats(times_ns: list[int], batch: int) -> dict:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p50 = float(np.percentile(ms, 50))
    return {"batch": batch, "runs": len(ms), "p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "throughput": batch / (p50 / 1e3) if p50 > 0 else float("inf")}


def machine_info(providers: list[str]) -> dict:
    import onnxruntime as ort

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "device": ort.get_device()}
    if any(p != "CPUExecutionProvider" for p in providers):
        try:
            import torch

            if torch.cuda.is_available():
                info["device_name"] = torch.cuda.get_device_name(0)
        except Exception:  # torch missing or broken: the name is a nicety
            pass
    return info


def benchmark(models, *, provider: str = "cpu", batches=(1, 8, 32), warmup: int = 5, runs: int = 30,
              min_time: float | None = None, io_binding: bool = False, threads: int | None = None,
              seed: int = 0, clock=time.perf_counter_ns, on_run=None, input_shapes=None) -> dict:
    """Time every model at every batch size; see the module docstring for the method.

    `min_time` (seconds) keeps iterating past `runs` until that much time was spent per batch size.
    `on_run(name, batch, phase, iteration)` is called after each inference ("warmup" or "timed").
    `input_shapes` (``--input-shape`` strings or {input: dims}) sets the input size of models with
    dynamic dims (applied to every model; each model's static dims otherwise)."""
    if not models:
        raise UserError("no models to benchmark")
    if warmup < 0 or runs < 1 or any(int(b) < 1 for b in batches) or (threads is not None and threads < 1):
        raise UserError("warmup must be >= 0; runs, threads and batch sizes must be >= 1")
    named = _named(models)
    from .shapes import describe, resolve

    sizes = [resolve(model, input_shapes) for _, model, _ in named]  # each model its own (same flag)
    shapes = sizes[0]
    providers = resolve_providers(provider)
    on_gpu = providers[0] != "CPUExecutionProvider"
    if io_binding and not on_gpu:
        log.warn("I/O binding needs the CUDA or TensorRT provider; timing plain session.run on CPU")
        io_binding = False
    entries, sessions = [], []
    for name, model, src in named:
        sess = _session(model, name, providers, threads)
        sessions.append(sess)
        entries.append({"name": name, "source": src, "providers": sess.get_providers()})
    used = entries[0]["providers"]
    if on_gpu and providers[0] not in used:
        log.warn(f"onnxruntime could not start {providers[0]} and runs on {used[0]} instead")
    result = {"requested_provider": provider, "providers": used, "io_binding": io_binding,
              "settings": {"batches": [int(b) for b in batches], "warmup": warmup, "runs": runs,
                           "min_time": min_time, "threads": threads, "seed": seed,
                           "input_shapes": describe(shapes)},
              "machine": machine_info(used), "models": entries, "results": [], "skipped": [], "notes": []}
    for batch in (int(b) for b in batches):
        active = []  # (index, name, run callable)
        for i, ((name, model, _), sess) in enumerate(zip(named, sessions)):
            conflict = _static_batch_conflict(model, batch)
            if conflict:
                result["skipped"].append({"model": name, "batch": batch, "reason": conflict})
                result["notes"].append(f"{name}: batch {batch} skipped ({conflict})")
                continue
            active.append((i, name, _runner(sess, random_inputs(model, batch, seed, shapes=sizes[i]), io_binding)))
        if not active:
            continue
        log.info(f"bench: batch {batch}, {len(active)} model(s), {warmup} warm-up + {runs} timed runs each")
        times = _interleaved(active, batch, warmup, runs, min_time, clock, on_run)
        for i, name, _ in sorted(active):
            result["results"].append({"model": name, **stats(times[i], batch)})
    return result


def _interleaved(active, batch, warmup, runs, min_time, clock, on_run) -> dict[int, list[int]]:
    times = {i: [] for i, _, _ in active}
    for it in range(warmup):
        for _, name, run in active:
            run()
            if on_run:
                on_run(name, batch, "warmup", it)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to whichever model was running
    try:
        start, it = time.perf_counter(), 0
        while it < runs or (min_time is not None and time.perf_counter() - start < min_time):
            k = it % len(active)
            for i, name, run in active[k:] + active[:k]:  # rotate who goes first
                t0 = clock()
                run()
                times[i].append(clock() - t0)
                if on_run:
                    on_run(name, batch, "timed", it)
            it += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def speedups(result: dict, baseline: int | str = 0) -> dict[str, dict[int, float]]:
    """p50 speed-up of every model over the baseline (index or name), per batch both ran at."""
    names = [m["name"] for m in result["models"]]
    base = names[baseline] if isinstance(baseline, int) else baseline
    if base not in names:
        raise UserError(f"baseline {baseline!r} is not one of the benchmarked models")
    p50 = {(r["model"], r["batch"]): r["p50_ms"] for r in result["results"]}
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    for (name, batch), t in p50.items():
        if (base, batch) in p50 and t > 0:
            out[name][batch] = p50[(base, batch)] / t
    return out
