"""Latency benchmark: onnxruntime sessions, warm-up, interleaved timed runs, robust statistics.

Models are run in rotating order inside every timed iteration, so slow drift of the machine (clock
boost, thermal throttling, a noisy neighbour) affects all of them alike and their ratio stays fair.
Every session gets the same, explicit number of intra-op threads (pinned: never onnxruntime's
"all cores" default, which changes with the machine's load and affinity). The speed-up of every
model over the first comes with a bootstrap confidence interval over the interleaved iterations
(a moving-block bootstrap: iteration i's times of all models are resampled together, in blocks,
so drift shared by a block stays paired); with ``ci`` set, timing goes on until every interval is
narrower than that (relative half-width) or ``max_time`` is spent.
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
from .runtime import random_inputs, session

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}
_LABEL = {"CUDAExecutionProvider": "CUDA", "TensorrtExecutionProvider": "TensorRT"}


#: provider options onnxruntime gets for each GPU provider (precision added per run)
_TRT_OPTIONS = {"trt_engine_cache_enable": True, "trt_timing_cache_enable": True}


def default_threads() -> int:
    """Intra-op threads used when none are given: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def provider_options(providers: list[str], precision: str = "fp32", cache_dir: str | None = None) -> list:
    """``providers`` as onnxruntime wants them, with TensorRT's options: engine and timing caches
    (in ``cache_dir``, default ~/.cache/graphprune/trt) and fp16 when ``precision`` is fp16."""
    if precision not in ("fp32", "fp16"):
        raise UserError(f"unknown precision {precision!r} (fp32 or fp16)")
    out = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            d = cache_dir or os.path.join(os.environ.get("GRAPHPRUNE_CACHE") or
                                          os.path.join(os.path.expanduser("~"), ".cache", "graphprune"), "trt")
            os.makedirs(d, exist_ok=True)
            out.append((p, {**_TRT_OPTIONS, "trt_engine_cache_path": d, "trt_timing_cache_path": d,
                            "trt_fp16_enable": precision == "fp16"}))
        else:
            out.append(p)
    return out


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


def _runner(sess, feeds: dict, io_binding: bool):
    """A no-argument callable doing one inference; with I/O binding the inputs live on the GPU and
    the outputs stay there (the device is synchronised after every run, so the time is the GPU's)."""
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
        binding.synchronize_inputs()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def warm_up(run, warmup: int, *, until_stable: bool = False, max_seconds: float = 600.0,
            clock=time.perf_counter_ns) -> int:
    """``warmup`` untimed runs; with ``until_stable`` (GPU providers: the first TensorRT run builds
    its engine, CUDA autotunes convolutions) it goes on until three runs in a row are within 20% of
    each other, or ``max_seconds`` passed. Returns how many runs it made."""
    recent: list[int] = []
    start, n = time.perf_counter(), 0
    while n < warmup or (until_stable and time.perf_counter() - start < max_seconds and
                         (len(recent) < 3 or max(recent[-3:]) > 1.2 * min(recent[-3:]))):
        t0 = clock()
        run()
        recent.append(clock() - t0)
        n += 1
    return n


def block_bootstrap(times: np.ndarray, iters: int = 1000, seed: int = 0) -> np.ndarray:
    """Resampled iteration indices (iters x n) for a moving-block bootstrap over n interleaved
    iterations (blocks of about n^(1/3) consecutive iterations: drift is correlated in time)."""
    n = times.shape[-1]
    rng = np.random.default_rng(seed)
    block = max(1, int(round(n ** (1 / 3))))
    nblocks = -(-n // block)
    starts = rng.integers(0, n - block + 1, size=(iters, nblocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(iters, -1)[:, :n]
    return idx


def speedup_ci(base_ns, other_ns, *, conf: float = 0.95, iters: int = 1000, seed: int = 0,
               quantile: float = 0.5) -> tuple[float, float, float]:
    """(speed-up, low, high): q(base) / q(other) over paired interleaved iterations (q: the
    ``quantile`` of the times, the median by default), with a ``conf`` bootstrap percentile interval
    (block bootstrap over iterations, both resampled alike). On a machine shared with other work a
    lower quantile (0.2) is the steadier estimate: preemption only ever adds time, and it hits a
    long run more often than a short one."""
    b = np.asarray(base_ns, dtype=np.float64)
    o = np.asarray(other_ns, dtype=np.float64)
    n = min(len(b), len(o))
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    b, o = b[:n], o[:n]
    point = float(np.quantile(b, quantile) / np.quantile(o, quantile))
    if n < 3:
        return point, float("nan"), float("nan")
    idx = block_bootstrap(b, iters, seed)
    ratios = np.quantile(b[idx], quantile, axis=1) / np.quantile(o[idx], quantile, axis=1)
    lo, hi = np.percentile(ratios, [50 * (1 - conf), 100 - 50 * (1 - conf)])
    # with few distinct times the resampled medians are lumpy and a percentile interval can miss
    # the estimate itself: widen it to include it
    return point, float(min(lo, point)), float(max(hi, point))


def ci_half_width(point: float, lo: float, hi: float) -> float:
    """Relative half-width of an interval (inf when unknown)."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or point <= 0:
        return float("inf")
    return float(max(point - lo, hi - point) / point)


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
              seed: int = 0, clock=time.perf_counter_ns, on_run=None, input_shapes=None,
              ci: float | None = None, max_time: float = 60.0, conf: float = 0.95,
              precision: str = "fp32", quantile: float = 0.5, profile_runs: int = 0) -> dict:
    """Time every model at every batch size; see the module docstring for the method.

    `min_time` (seconds) keeps iterating past `runs` until that much time was spent per batch size.
    `ci` (e.g. 0.02): keep iterating past `runs` until the `conf` bootstrap interval of every
    speed-up over the first model is within ±ci (relative), or `max_time` seconds were spent on the
    batch size. `quantile`: the statistic speed-ups compare (0.5: p50; 0.2 on a loaded machine).
    `threads`: intra-op threads of every session (default: the cores available to this
    process, recorded in the settings). `precision` fp16 enables TensorRT's fp16 kernels.
    `on_run(name, batch, phase, iteration)` is called after each inference ("warmup" or "timed").
    `input_shapes` (``--input-shape`` strings or {input: dims}) sets the input size of models with
    dynamic dims (applied to every model; each model's static dims otherwise). ``profile_runs``:
    after the timing, each model also runs that many profiled inferences per batch size in a session
    of its own (same provider and threads), kernel time per op type in ``result["profiles"]``."""
    if not models:
        raise UserError("no models to benchmark")
    if warmup < 0 or runs < 1 or any(int(b) < 1 for b in batches) or (threads is not None and threads < 1):
        raise UserError("warmup must be >= 0; runs, threads and batch sizes must be >= 1")
    if ci is not None and not 0 < ci < 1:
        raise UserError(f"the confidence interval target must be in (0, 1), got {ci}")
    if not 0 < conf < 1 or not max_time > 0 or not 0 < quantile < 1:
        raise UserError("conf and quantile must be in (0, 1) and max_time > 0")
    threads = threads or default_threads()
    named = _named(models)
    from .shapes import describe, resolve

    sizes = [resolve(model, input_shapes) for _, model, _ in named]  # each model its own (same flag)
    shapes = sizes[0]
    providers = resolve_providers(provider)
    on_gpu = providers[0] != "CPUExecutionProvider"
    if io_binding and not on_gpu:
        log.warn("I/O binding needs the CUDA or TensorRT provider; timing plain session.run on CPU")
        io_binding = False
    if precision == "fp16" and providers[0] != "TensorrtExecutionProvider":
        log.warn("fp16 applies to the TensorRT provider (other providers run the model's own precision)")
    entries, sessions = [], []
    for name, model, src in named:
        sess = session(model, provider_options(providers, precision), threads=threads, name=name)
        sessions.append(sess)
        entries.append({"name": name, "source": src, "providers": sess.get_providers()})
    used = entries[0]["providers"]
    if on_gpu and providers[0] not in used:
        log.warn(f"onnxruntime could not start {providers[0]} and runs on {used[0]} instead")
    result = {"requested_provider": provider, "providers": used, "io_binding": io_binding,
              "settings": {"batches": [int(b) for b in batches], "warmup": warmup, "runs": runs,
                           "min_time": min_time, "threads": threads, "seed": seed,
                           "input_shapes": describe(shapes), "ci": ci, "conf": conf, "max_time": max_time,
                           "precision": precision, "quantile": quantile, "profile_runs": profile_runs},
              "machine": machine_info(used), "models": entries, "results": [], "skipped": [], "notes": [],
              "profiles": []}
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
        log.info(f"bench: batch {batch}, {len(active)} model(s), {warmup} warm-up + {runs} timed runs each"
                 + (f" (more until the speed-up interval is within ±{ci:.0%}, at most {max_time:g} s)" if ci else ""))
        times, stop = _interleaved(active, batch, warmup, runs, min_time, clock, on_run, ci=ci, conf=conf,
                                   max_time=max_time, until_stable=on_gpu, seed=seed, quantile=quantile)
        base = min(i for i, _, _ in active)
        for i, name, _ in sorted(active):
            row = {"model": name, **stats(times[i], batch), "stopped": stop}
            if i != base:
                sp, lo, hi = speedup_ci(times[base], times[i], conf=conf, seed=seed, quantile=quantile)
                row.update({"speedup": sp, "speedup_ci": [lo, hi], "baseline": named[base][0]})
            else:
                row.update({"speedup": 1.0, "speedup_ci": [1.0, 1.0], "baseline": named[base][0]})
            result["results"].append(row)
        if profile_runs:
            import tempfile

            log.info(f"bench: batch {batch}, {profile_runs} profiled runs per model (onnxruntime profiler)")
            with tempfile.TemporaryDirectory(prefix="graphprune-profile-") as d:
                for i, _, _ in sorted(active):
                    name, model, _ = named[i]
                    sess = session(model, provider_options(providers, precision), threads=threads, name=name,
                                   profile=os.path.join(d, f"model{i}"))
                    feeds = random_inputs(model, batch, seed, shapes=sizes[i])
                    prof = op_profile(sess, _runner(sess, feeds, io_binding), profile_runs)
                    result["profiles"].append({"model": name, "batch": batch, **prof})
                    del sess
    return result


def _interleaved(active, batch, warmup, runs, min_time, clock, on_run, *, ci=None, conf=0.95, max_time=60.0,
                 until_stable=False, seed=0, quantile=0.5) -> tuple[dict[int, list[int]], str]:
    """Timed runs in rotating order; returns the times per model and why timing stopped ("runs",
    "min_time", "ci": every interval narrow enough, "max_time": the cap was hit first)."""
    times = {i: [] for i, _, _ in active}
    if until_stable:  # GPU: engine builds and autotuning belong to no timed run
        for _, _, run in active:
            warm_up(run, 0, until_stable=True)
    for it in range(warmup):
        for _, name, run in active:
            run()
            if on_run:
                on_run(name, batch, "warmup", it)
    base = min(i for i, _, _ in active)

    def narrow() -> bool:
        return all(ci_half_width(*speedup_ci(times[base], times[i], conf=conf, iters=400, seed=seed,
                                             quantile=quantile)) <= ci
                   for i, _, _ in active if i != base)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to whichever model was running
    stop = "runs"
    try:
        start, it, next_check = time.perf_counter(), 0, runs
        while True:
            elapsed = time.perf_counter() - start
            if it >= runs and (min_time is None or elapsed >= min_time):
                if ci is None or len(active) < 2:
                    stop = "min_time" if min_time is not None and it > runs else "runs"
                    break
                if elapsed >= max_time:
                    stop = "max_time"
                    break
                if it >= next_check:
                    next_check = it + max(5, it // 4)  # checks cost little next to the runs they add
                    if narrow():
                        stop = "ci"
                        break
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
    return times, stop


#: ops whose time is the multiply-accumulates graphprune counts (onnxruntime's fused forms included):
#: a profile splits a model's time into these and everything else (activations, copies, concats,
#: layout reorders, softmax), which pruning shrinks with the channels at best, not with the MACs
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul",
                     "NhwcConv", "NhwcFusedConv", "ConvGrad", "Attention", "MultiHeadAttention",
                     "GroupQueryAttention", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                     "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"})


def op_profile(sess, run, runs: int = 5) -> dict:
    """Per-op-type kernel time (ms per inference) from onnxruntime's own profiler: ``sess`` was made
    with profiling on (``runtime.session(..., profile=prefix)``), ``run`` does one inference. The first
    inference is a warm-up and is left out; its profile file is deleted once read."""
    import json

    for _ in range(runs + 1):
        run()
    path = sess.end_profiling()
    try:
        with open(path) as f:
            events = json.load(f)
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
    starts = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in events
                    if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = starts[0][1] if len(starts) > runs else -1  # the end of the warm-up run
    counted = max(1, len(starts) - (1 if after >= 0 else 0))
    by_op: dict[str, float] = {}
    by_size: dict[str, list[float]] = {}  # output spatial size: [MAC ops ms, other ops ms]
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e.get("ts", 0) >= after:
            args = e.get("args") or {}
            op = args.get("op_name") or "?"
            ms = e.get("dur", 0) / 1e3 / counted
            by_op[op] = by_op.get(op, 0.0) + ms
            cell = by_size.setdefault(_spatial(args.get("output_type_shape")), [0.0, 0.0])
            cell[0 if op in MAC_OPS else 1] += ms
    mac = sum(v for k, v in by_op.items() if k in MAC_OPS)
    total = sum(by_op.values())
    return {"runs": counted, "kernel_ms": total, "mac_ops_ms": mac, "other_ops_ms": total - mac,
            "by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "by_size": {k: {"mac_ops_ms": v[0], "other_ops_ms": v[1]}
                        for k, v in sorted(by_size.items(), key=lambda kv: _size_key(kv[0]))}}


def _spatial(shapes) -> str:
    """'HxW' of a node's first output when it is 4-D ([N, C, H, W]; NCHWc's [N, C/b, H, W, b] too),
    else 'other' (tokens, flattened anchors, vectors). A 4-D tensor that is not an image is labelled
    by its dims 2 and 3 all the same (a YOLO head's DFL, [N, 16, 4, anchors], shows as '4x8400')."""
    try:
        dims = list(shapes[0].values())[0]
    except (TypeError, IndexError, AttributeError):
        return "other"
    if len(dims) == 4 or (len(dims) == 5 and dims[-1] in (4, 8, 16)):
        return f"{dims[2]}x{dims[3]}"
    return "other"


def _size_key(k: str) -> tuple:
    """Largest spatial size first, 'other' last."""
    if k == "other":
        return (1, 0)
    h, w = (int(x) for x in k.split("x"))
    return (0, -h * w)


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
