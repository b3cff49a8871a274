"""Per-layer latency tables for hardware-aware planning (`--keep-latency`).

Each Conv/Gemm/MatMul layer is timed alone in onnxruntime, on the chosen provider and batch size,
at a grid of kept (output, input) widths; planning interpolates bilinearly in that grid. Timings are
cached in a JSON file keyed by provider, device, onnxruntime version, batch and the layer's shapes
and attributes, so a second run (or another model sharing layer shapes) measures nothing.
"""
from __future__ import annotations

import hashlib
import json
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


def _widths(full: int) -> list[int]:
    return sorted({max(1, int(round(f * full))) for f in GRID})


class LatencyTable:
    def __init__(self, provider: str = "cpu", batch: int = 8, cache: Path | None = None, runs: int = 15,
                 shapes: dict | None = None) -> None:
        self.shapes = shapes  # the model's input size ({input: dims}) for end-to-end measurements
        import onnxruntime as ort

        self.provider, self.batch, self.runs = provider, batch, runs
        self.cache_path = Path(cache) if cache else default_cache()
        self.device = device_name(provider)
        self.prefix = f"{provider}|{self.device}|ort{ort.__version__}|b{batch}"
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
    def _time(self, model: onnx.ModelProto, feeds: dict) -> float:
        sess = self._session(model)
        for _ in range(3):
            sess.run(None, feeds)
        times = []
        for _ in range(self.runs):
            t = time.perf_counter_ns()
            sess.run(None, feeds)
            times.append(time.perf_counter_ns() - t)
        return float(np.median(times)) / 1e6

    def _session(self, model: onnx.ModelProto):
        from .bench import resolve_providers
        from .runtime import session

        if not hasattr(self, "_providers"):
            self._providers = resolve_providers(self.provider)  # falls back to CPU with a warning
        return session(model, self._providers)

    def measure_pair(self, dense: onnx.ModelProto, pruned: onnx.ModelProto, runs: int = 60,
                     min_seconds: float = 2.0) -> tuple[float, float]:
        """Median end-to-end latency (ms) of both models, runs interleaved (alternating order) so
        drift and background load hit both alike; at least ``runs`` pairs and ``min_seconds``."""
        from .runtime import random_inputs

        feeds = random_inputs(dense, batch=self.batch, seed=0, shapes=self.shapes)
        if not hasattr(self, "_dense") or self._dense[0] is not dense:
            self._dense = (dense, self._session(dense))
        sessions = [self._dense[1], self._session(pruned)]
        for s in sessions:
            for _ in range(3):
                s.run(None, feeds)
        times: list[list[int]] = [[], []]
        start = time.perf_counter()
        r = 0
        while r < runs or (time.perf_counter() - start < min_seconds and r < 20 * runs):
            for k in ((0, 1) if r % 2 == 0 else (1, 0)):
                t = time.perf_counter_ns()
                sessions[k].run(None, feeds)
                times[k].append(time.perf_counter_ns() - t)
            r += 1
        return float(np.median(times[0])) / 1e6, float(np.median(times[1])) / 1e6

    def _layer_model(self, spec: dict, out_w: int, in_w: int) -> tuple[onnx.ModelProto, dict]:
        rng = np.random.default_rng(0)
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
            w = rng.standard_normal((cout, cin // g, *spec["kernel"])).astype(np.float32)
        else:  # Gemm / MatMul as MatMul over the last axis
            in_shape[-1] = in_w
            w = rng.standard_normal((in_w, out_w)).astype(np.float32)
            op, attrs = "MatMul", {}
        node = helper.make_node(op, ["x", "w"], ["y"], **attrs)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model, {"x": rng.standard_normal(in_shape).astype(np.float32)}

    def grid(self, spec: dict) -> tuple[list[int], list[int], np.ndarray]:
        """(out widths, in widths, ms[o, i]) for one layer, from the cache or measured now."""
        key = self.prefix + "|" + hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()
        outs = _widths(spec["out"])
        ins = [1] if spec["depthwise"] else _widths(spec["in"])
        if key in self.cache:
            return outs, ins, np.asarray(self.cache[key])
        t = time.perf_counter()
        ms = np.zeros((len(outs), len(ins)))
        for a, o in enumerate(outs):
            for b, i in enumerate(ins):
                ms[a, b] = self._time(*self._layer_model(spec, o, i))
        self.cache[key] = ms.tolist()
        self.measured += 1
        self.seconds += time.perf_counter() - t
        return outs, ins, ms


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


def interpolator(outs, ins, ms):
    """Bilinear interpolation of ms over (kept out, kept in) widths; clamps outside the grid."""
    outs, ins = np.asarray(outs, float), np.asarray(ins, float)

    def f(o: float, i: float = 1.0) -> float:
        row = np.array([np.interp(i, ins, ms[a]) for a in range(len(outs))]) if len(ins) > 1 else ms[:, 0]
        return float(np.interp(o, outs, row))

    return f
