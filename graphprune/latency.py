"""Per-layer latency tables for hardware-aware planning (`--keep-latency`, `--round-to auto`).

Each Conv/Gemm/MatMul layer is timed alone in onnxruntime, on the chosen provider, precision and
batch size. Two kinds of table, both cached in one JSON file keyed by provider, device, onnxruntime
version, precision, threads, batch and the layer's shapes and attributes (a second run, or another
model sharing layer shapes, measures nothing):

* the *grid* (``grid``): a coarse grid of kept (output, input) widths that planning interpolates
  bilinearly in (``--keep-latency``'s cost model);
* the *staircase* (``axis_times``): the layer's latency at a few exact widths of one axis (the
  other at full width), the candidates ``--round-to auto`` snaps between. Kernels work in channel
  blocks (onnxruntime's NCHWc convolutions on AVX-512 in blocks of 16 output channels and need
  input channels in whole blocks; GPU tensor cores in multiples of 8), so latency is a staircase
  in the width, and a width just above a step costs as much as the top of the next one.

A MatMul of two activations (attention's scores and their product with V) has no weight to build a
grid from: it is timed once at full size and scales linearly with its kept heads; so does ONNX's
Attention op (opset 23), timed as one node.

Candidate widths of one layer axis are timed interleaved (rotating order, medians), with the
intra-op thread count pinned; GPU providers warm up until stable (TensorRT engine builds) and time
with I/O binding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import log
from .io import write_json_atomic

GRID = (1.0, 0.75, 0.5, 0.25, 0.0)  # fractions of the full width (0.0 means width 1)


def default_cache() -> Path:
    base = os.environ.get("GRAPHPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphprune")
    return Path(base) / "latency.json"


def device_name(provider: str) -> str:
    if provider != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except Exception:
            pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def nchwc_block(cpuinfo: str = "/proc/cpuinfo", machine: str | None = None) -> int:
    """Channels per block of onnxruntime's blocked (NCHWc) CPU convolutions on this machine: 16 with
    AVX-512F, 8 with AVX2, 1 (none) on other CPUs or when the CPU's flags cannot be read (MLAS picks
    its kernels the same way). A conv with fewer input channels than a block gets plain-layout input,
    and the graph gains a layout reorder around it."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return 1
    try:
        with open(cpuinfo) as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return 1
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 1


def _widths(full: int, block: int = 1) -> list[int]:
    """Grid widths of one axis: the GRID fractions of the full width. With blocked (NCHWc) kernels
    (``block`` > 1) and a layer at least one block wide, the inner points are rounded to whole blocks:
    the fast top of each step of the staircase, where --round-to auto snaps. An odd point (54 of 72) is
    a slow plain-layout width, and interpolating towards it said that narrowing a 72-channel layer
    costs time until half of it was gone, so the planner never narrowed it (the sample zoo's
    MobileNetV3 missed --keep-latency 0.5 by +69%)."""
    ws = {max(1, int(round(f * full))) for f in GRID}
    if block > 1 and full >= block:
        ws = {w if w in (1, full) else max(block, int(round(w / block)) * block) for w in ws}
    return sorted(ws)


def candidate_widths(planned: int, full: int, unit: int = 1, lowest: int = 1,
                     multiples=(4, 8, 16, 32)) -> list[int]:
    """A few widths (in channels, multiples of ``unit``, within [lowest, full]) to time around a
    planned width: itself, the full width, and the multiples of 4/8/16/32 just below and above it.
    Bounded (at most 10 widths) whatever the layer size."""
    out = {planned, full}
    for m in multiples:
        m = math.lcm(m, unit)
        out.add(planned // m * m)
        out.add(-(-planned // m) * m)
    return sorted(w for w in out if lowest <= w <= full and w % unit == 0)


def frontier(times: dict[int, float], tol: float = 0.03) -> list[int]:
    """Widths worth keeping: no wider candidate is as fast (within ``tol``, relative). On a
    staircase these are the top widths of the steps; on a smooth curve, every width."""
    widths = sorted(times)
    keep = []
    for k, w in enumerate(widths):
        wider = [times[v] for v in widths[k + 1:]]
        if not wider or min(wider) > times[w] * (1 + tol):
            keep.append(w)
    return keep


def snap_width(planned: int, times: dict[int, float], lowest: int = 1, tol: float = 0.03) -> int:
    """The fastest width not above ``planned``: the widest frontier width <= planned (and >=
    ``lowest``); ``planned`` itself when no candidate qualifies. Every width between the snapped
    one and ``planned`` is slower than the snapped one."""
    ok = [w for w in frontier(times, tol) if lowest <= w <= planned]
    return max(ok) if ok else planned


class LatencyTable:
    def __init__(self, provider: str = "cpu", batch: int = 8, cache: Path | None = None, runs: int = 15,
                 shapes: dict | None = None, threads: int | None = None, precision: str = "fp32",
                 io_binding: bool | None = None) -> None:
        self.shapes = shapes  # the model's input size ({input: dims}) for end-to-end measurements
        import onnxruntime as ort

        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        self.provider, self.batch, self.runs = provider, batch, runs
        # pinned: one intra-op thread unless told otherwise (on a machine shared with other work,
        # two threads wait on each other's preemptions and the tables measure the neighbours)
        self.threads = threads or 1
        self.precision = precision
        self.io_binding = (provider != "cpu") if io_binding is None else io_binding
        self.cache_path = Path(cache) if cache else default_cache()
        # keyed by the provider that really runs (a CUDA request on a CPU-only build measures the CPU)
        used = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}.get(
            self._provider_list()[0], "cpu")
        self.device = device_name(used)
        #: --round-to auto keeps the widths of groups that reach a Conv in whole blocks of this many
        #: channels (onnxruntime's NCHWc blocks on CPU; 1 on GPU providers, whose steps the tables show)
        self.channel_block = nchwc_block() if used == "cpu" else 1
        extra = ("" if precision == "fp32" else f"|{precision}") + f"|t{self.threads}"
        self.prefix = f"{used}|{self.device}|ort{ort.__version__}|b{batch}" + extra
        try:
            self.cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        except (OSError, json.JSONDecodeError):
            log.warn(f"ignoring unreadable latency cache {self.cache_path}")
            self.cache = {}
        self.measured = 0
        self.seconds = 0.0

    def save(self) -> None:
        if self.measured:
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.cache, self.cache_path)
            except Exception as exc:  # a cache is an optimisation: never fail the run for it
                log.warn(f"could not write latency cache {self.cache_path} ({exc})")

    # ------------------------------------------------------------------ measuring
    @property
    def on_gpu(self) -> bool:
        return self._provider_list()[0] != "CPUExecutionProvider"

    def _provider_list(self) -> list[str]:
        from .bench import resolve_providers

        if not hasattr(self, "_providers"):
            self._providers = resolve_providers(self.provider)  # falls back to CPU with a warning
        return self._providers

    def _session(self, model: onnx.ModelProto):
        from .bench import provider_options
        from .runtime import session

        return session(model, provider_options(self._provider_list(), self.precision), threads=self.threads)

    def _runner(self, model: onnx.ModelProto, feeds: dict, warmup: int = 3):
        from .bench import _runner, warm_up

        run = _runner(self._session(model), feeds, self.io_binding and self.on_gpu)
        warm_up(run, warmup, until_stable=self.on_gpu)  # GPU: TensorRT engine builds, cuDNN autotuning
        return run

    def _time_many(self, items: list[tuple[onnx.ModelProto, dict]], runs: int | None = None) -> list[float]:
        """Median latency (ms) of each model, timed interleaved in rotating order."""
        runners = [self._runner(m, f) for m, f in items]
        times: list[list[int]] = [[] for _ in runners]
        for r in range(runs or self.runs):
            k = r % len(runners)
            for i in list(range(k, len(runners))) + list(range(k)):
                t = time.perf_counter_ns()
                runners[i]()
                times[i].append(time.perf_counter_ns() - t)
        return [float(np.median(t)) / 1e6 for t in times]

    def _time(self, model: onnx.ModelProto, feeds: dict) -> float:
        return self._time_many([(model, feeds)])[0]

    def measure_pair(self, dense: onnx.ModelProto, pruned: onnx.ModelProto, runs: int = 60,
                     min_seconds: float = 2.0, ci: float = 0.02, max_seconds: float = 10.0) -> tuple[float, float]:
        """Median end-to-end latency (ms) of both models, runs interleaved (alternating order) so
        drift and background load hit both alike: at least ``runs`` pairs and ``min_seconds``, then
        on until the 95% bootstrap interval of the speed-up is within ±``ci`` (relative) or
        ``max_seconds`` passed. ``self.last_pair`` holds the speed-up, its interval and the runs."""
        from .bench import _interleaved, speedup_ci
        from .runtime import random_inputs

        feeds = random_inputs(dense, batch=self.batch, seed=0, shapes=self.shapes)
        if not hasattr(self, "_dense") or self._dense[0] is not dense:
            self._dense = (dense, self._runner(dense, feeds, warmup=10))
        active = [(0, "dense", self._dense[1]), (1, "pruned", self._runner(pruned, feeds, warmup=10))]
        times, stop = _interleaved(active, self.batch, 0, runs, min_seconds, time.perf_counter_ns, None,
                                   ci=ci, max_time=max(max_seconds, min_seconds))
        sp, lo, hi = speedup_ci(times[0], times[1])
        dense_ms, pruned_ms = float(np.median(times[0])) / 1e6, float(np.median(times[1])) / 1e6
        self.last_pair = {"dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": sp, "speedup_ci": [lo, hi],
                          "runs": len(times[0]), "stopped": stop, "threads": self.threads}
        return dense_ms, pruned_ms

    def _layer_model(self, spec: dict, out_w: int, in_w: int) -> tuple[onnx.ModelProto, dict]:
        rng = np.random.default_rng(0)
        fp16 = self.precision == "fp16"
        elem, dtype = (TensorProto.FLOAT16, np.float16) if fp16 else (TensorProto.FLOAT, np.float32)
        op = spec["op"]
        in_shape = [self.batch] + list(spec["in_shape"][1:])
        attrs = dict(spec["attrs"])
        if op == "Conv":
            g = spec["groups"]
            depthwise = spec["depthwise"]
            cin = in_w * (g if not depthwise else 1)
            cout = out_w
            if depthwise:
                g = cin = cout = out_w
            attrs["group"] = g
            in_shape[1] = cin
            w = rng.standard_normal((cout, cin // g, *spec["kernel"])).astype(dtype)
        else:  # Gemm / MatMul as MatMul over the last axis
            in_shape[-1] = in_w
            w = rng.standard_normal((in_w, out_w)).astype(dtype)
            op, attrs = "MatMul", {}
        node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", elem, in_shape)],
                                  [helper.make_tensor_value_info("y", elem, None)],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model, {"x": rng.standard_normal(in_shape).astype(dtype)}

    def _context_model(self, spec: dict, out_w: int, in_w: int) -> tuple[onnx.ModelProto, dict]:
        """The layer between two fixed 1x1 layers of 16 channels (pre: 16 -> its input width, post:
        its output width -> 16), each followed by a Relu: what the layer's neighbours in a real graph
        do to it is in the time. On CPU, a width that leaves onnxruntime's blocked (NCHWc) kernels
        costs reorders to and from plain layout around the layer that an isolated layer would not
        show, and an isolated blocked layer would show reorders a graph does not have."""
        layer, feeds = self._layer_model(spec, out_w, in_w)
        g = layer.graph
        x = g.input[0]
        elem = x.type.tensor_type.elem_type
        dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
        in_shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
        rng = np.random.default_rng(1)
        conv = spec["op"] == "Conv"
        cin = in_shape[1] if conv else in_shape[-1]
        cout = int(numpy_helper.to_array(g.initializer[0]).shape[0 if conv else 1])
        ctx_shape = list(in_shape)
        ctx_shape[1 if conv else -1] = 16
        if conv:
            pre = rng.standard_normal((cin, 16, 1, 1)).astype(dtype) * 0.25
            post = rng.standard_normal((16, cout, 1, 1)).astype(dtype) * 0.1
            mk = lambda i, o, w: helper.make_node("Conv", [i, w], [o])  # noqa: E731
        else:
            pre = rng.standard_normal((16, cin)).astype(dtype) * 0.25
            post = rng.standard_normal((cout, 16)).astype(dtype) * 0.1
            mk = lambda i, o, w: helper.make_node("MatMul", [i, w], [o])  # noqa: E731
        node = g.node[0]
        node.input[0], node.output[0] = "h", "z"
        nodes = [mk("x", "p", "w_pre"), helper.make_node("Relu", ["p"], ["h"]), node,
                 helper.make_node("Relu", ["z"], ["r"]), mk("r", "y", "w_post")]
        graph = helper.make_graph(nodes, "layer_in_context", [helper.make_tensor_value_info("x", elem, ctx_shape)],
                                  [helper.make_tensor_value_info("y", elem, None)],
                                  [*g.initializer, numpy_helper.from_array(pre, "w_pre"),
                                   numpy_helper.from_array(post, "w_post")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model, {"x": rng.standard_normal(ctx_shape).astype(dtype)}

    def grid(self, spec: dict) -> tuple[list[int], list[int], np.ndarray]:
        """(out widths, in widths, ms[o, i]) for one layer, from the cache or measured now."""
        key = self.prefix + "|" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        # whole-block grid points where the layer's widths are free (not a grouped conv's per-group widths)
        block = self.channel_block if spec.get("depthwise") or spec.get("groups", 1) == 1 else 1
        outs = _widths(spec["out"], block)
        ins = [1] if spec["depthwise"] else _widths(spec["in"], block)
        if block > 1:
            key += f"|b{block}"  # tables cached before the block-aligned grid hold other widths
        if key in self.cache:
            return outs, ins, np.asarray(self.cache[key])
        t = time.perf_counter()
        pairs = [(o, i) for o in outs for i in ins]
        flat = self._time_many([self._layer_model(spec, o, i) for o, i in pairs])
        ms = np.asarray(flat, dtype=np.float64).reshape(len(outs), len(ins))
        self.cache[key] = ms.tolist()
        self.measured += 1
        self.seconds += time.perf_counter() - t
        return outs, ins, ms

    def pair_ms(self, spec: dict) -> float:
        """Latency (ms) of a MatMul of two activations (``pair_spec``) at full size, at this table's
        batch (the leading axis times the batch), from the cache or measured now."""
        key = self.prefix + "|pair|" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        if key in self.cache:
            return float(self.cache[key])
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        elem, dtype = ((TensorProto.FLOAT16, np.float16) if self.precision == "fp16"
                       else (TensorProto.FLOAT, np.float32))
        attention = spec.get("op") == "Attention"
        names = ("q", "k", "v") if attention else ("a", "b")
        shapes = {n: [d * self.batch if k == 0 else d for k, d in enumerate(spec[n])] for n in names}
        node = (helper.make_node("Attention", list(names), ["y"], **spec["attrs"]) if attention
                else helper.make_node("MatMul", ["a", "b"], ["y"]))
        graph = helper.make_graph([node], "pair", [helper.make_tensor_value_info(n, elem, shapes[n]) for n in names],
                                  [helper.make_tensor_value_info("y", elem, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23 if attention else 17)])
        model.ir_version = 10 if attention else 8
        ms = self._time(model, {n: rng.standard_normal(shapes[n]).astype(dtype) for n in names})
        self.cache[key] = ms
        self.measured += 1
        self.seconds += time.perf_counter() - t
        return ms

    def axis_times(self, spec: dict, axis: str, widths) -> dict[int, float]:
        """Latency (ms) of one layer at each width of ``axis`` ("out" or "in"; the other axis at its
        full width), from the cache or measured now (the missing widths together, interleaved).
        A depthwise conv has one width: ``axis`` "in" is read as "out"."""
        if spec["depthwise"]:
            axis = "out"
        base = (self.prefix + "|ctx|" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
                + f"|{axis}")
        widths = sorted({int(w) for w in widths if 1 <= int(w) <= spec[axis]})
        out = {w: float(self.cache[f"{base}{w}"]) for w in widths if f"{base}{w}" in self.cache}
        missing = [w for w in widths if w not in out]
        if missing:
            t = time.perf_counter()
            full_o, full_i = spec["out"], spec["in"]
            models = [self._context_model(spec, w, full_i) if axis == "out" else self._context_model(spec, full_o, w)
                      for w in missing]
            for w, ms in zip(missing, self._time_many(models)):
                out[w] = ms
                self.cache[f"{base}{w}"] = ms
            self.measured += 1
            self.widths_measured = getattr(self, "widths_measured", 0) + len(missing)
            self.seconds += time.perf_counter() - t
        return out


def layer_spec(trace, layer) -> dict | None:
    """What determines a layer's latency: op, attributes, input shape (batch excluded), widths."""
    from .rules.base import attr

    node = trace.graph_node(layer.node)
    st = trace.state
    w = st.const(node.inputs[1])
    in_shape = st.cost_shape(node.inputs[0])
    if w is None or not in_shape or None in in_shape[1:]:
        return None
    if layer.op == "Conv":
        g = int(attr(node, "group", 1))
        depthwise = layer.in_ids is None and g > 1
        keep = ("strides", "pads", "dilations", "auto_pad")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in node.attrs.items() if k in keep}
        attrs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in attrs.items()}
        return {"op": "Conv", "attrs": attrs, "in_shape": list(in_shape), "kernel": list(w.shape[2:]),
                "groups": g, "depthwise": depthwise, "out": layer.out_size, "in": layer.in_size}
    if layer.op in ("Gemm", "MatMul"):
        return {"op": layer.op, "attrs": {}, "in_shape": list(in_shape), "kernel": [], "groups": 1,
                "depthwise": False, "out": layer.out_size, "in": layer.in_size}
    return None


def pair_spec(trace, layer) -> dict | None:
    """A MatMul of two activations (attention's scores Q·Kᵀ and their product with V): both input
    shapes at batch 1, or None. It has no weight to build a width grid from; its time is measured at
    full size and scales linearly with its kept units (heads), as batched matmuls do."""
    if layer.op not in ("MatMul", "Attention") or (layer.out_ids is None and layer.in_ids is None):
        return None  # no unit of any group scales it: a fixed cost, nothing to rank by
    node = trace.graph_node(layer.node)
    st = trace.state
    if layer.op == "Attention":  # ONNX's Attention op: timed whole (q, k, v at batch 1), no mask
        from .rules.base import attr

        shapes = [st.cost_shape(t) for t in node.inputs[:3]]
        if any(not s or None in s for s in shapes):
            return None
        keep = ("is_causal", "q_num_heads", "kv_num_heads", "scale", "softcap")
        attrs = {k: attr(node, k) for k in keep if attr(node, k) is not None}
        return {"op": "Attention", "q": [int(d) for d in shapes[0]], "k": [int(d) for d in shapes[1]],
                "v": [int(d) for d in shapes[2]], "attrs": attrs, "out": layer.out_size, "in": layer.in_size}
    if len(node.inputs) != 2 or any(st.const(t) is not None for t in node.inputs):
        return None
    a, b = (list(st.cost_shape(t) or []) for t in node.inputs)
    if len(a) < 3 or len(a) != len(b):
        return None
    # a dim shape inference left open is read from the other side: the contracted axis, batch axes
    if a[-1] is None or b[-2] is None:
        a[-1] = b[-2] = a[-1] if a[-1] is not None else b[-2]
    for k in range(len(a) - 2):
        if a[k] is None or b[k] is None:
            a[k] = b[k] = a[k] if a[k] is not None else b[k]
    if None in a or None in b:
        return None
    return {"op": "MatMul2", "a": [int(d) for d in a], "b": [int(d) for d in b], "out": layer.out_size,
            "in": layer.in_size}


def interpolator(outs, ins, ms):
    """Bilinear interpolation of ms over (kept out, kept in) widths; clamps outside the grid."""
    outs, ins = np.asarray(outs, float), np.asarray(ins, float)

    def f(o: float, i: float = 1.0) -> float:
        row = np.array([np.interp(i, ins, ms[a]) for a in range(len(outs))]) if len(ins) > 1 else ms[:, 0]
        return float(np.interp(o, outs, row))

    return f
