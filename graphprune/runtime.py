"""onnxruntime sessions and random inputs for a model's signature."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx

from .errors import UserError

_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
}


_ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def custom_domains(model: onnx.ModelProto) -> list[str]:
    """Op domains of the main graph that onnxruntime does not ship kernels for."""
    return sorted({n.domain for n in model.graph.node if n.domain not in _ORT_DOMAINS})


class GraphModel:
    """An onnx-graphsurgeon graph that onnxruntime runs without a copy of its weights.

    Every float constant of ``min_bytes`` or more becomes a graph input, fed at each run straight from
    the graph's own arrays (onnxruntime reads numpy inputs in place), so neither a serialized model
    nor the session holds the weights again. Used for the reference side of verification (the masked
    original, the original carrying the pruned weights) and for the original's accuracy, where the
    weights are the big trace graph's. ``like`` supplies the signature, opset and metadata."""

    def __init__(self, graph, like: onnx.ModelProto, *, min_bytes: int | None = None):
        import onnx_graphsurgeon as gs

        from .io import WEIGHT_MIN_BYTES
        from .export import export_graph

        min_bytes = WEIGHT_MIN_BYTES if min_bytes is None else min_bytes
        g = graph.copy()  # new tensor objects, the same arrays
        self.like = like
        self.weights: dict[str, np.ndarray] = {}
        real_inputs = list(g.inputs)
        for t in g.tensors().values():
            if not isinstance(t, gs.Constant):
                continue
            values = t.values
            if values.nbytes < min_bytes or values.dtype not in (np.float32, np.float64, np.float16):
                continue
            self.weights[t.name] = np.ascontiguousarray(values)
            t.to_variable(dtype=values.dtype, shape=list(values.shape))
            t.type = "tensor_type"  # what Variable.__init__ would set (to_variable does not)
        g.inputs = real_inputs + [t for t in g.tensors().values() if t.name in self.weights]
        self.model = export_graph(g, like)

    @property
    def graph(self) -> onnx.GraphProto:
        """The signature's graph (real inputs and outputs only)."""
        return self.like.graph


class _FedSession:
    """A session whose weight inputs are filled in from a GraphModel at every run."""

    def __init__(self, sess, weights: dict[str, np.ndarray]):
        self._sess, self._weights = sess, weights
        self._inputs = [i for i in sess.get_inputs() if i.name not in weights]

    def run(self, output_names, feeds, *args, **kwargs):
        return self._sess.run(output_names, {**feeds, **self._weights}, *args, **kwargs)

    def get_inputs(self):
        return self._inputs

    def __getattr__(self, name):
        return getattr(self._sess, name)


def session(model, providers=("CPUExecutionProvider",), *, threads: int | None = None,
            name: str | None = None, prepack: bool = True, profile: str | None = None):
    """An onnxruntime session (all graph optimisations on) for a ModelProto or a GraphModel;
    failures are one-line UserErrors. ``prepack=False`` keeps onnxruntime from holding a second,
    pre-packed copy of the weights (for sessions run a few times only, like verification).
    ``profile``: onnxruntime's own profiler on, its JSON file named from this prefix."""
    import onnxruntime as ort

    from .io import use_files, write_model_files

    if isinstance(model, GraphModel):
        return _FedSession(session(model.model, providers, threads=threads, name=name, prepack=prepack,
                                   profile=profile), model.weights)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors come back as exceptions (one line); ort would also print them
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    prefix = f"{name}: " if name else ""
    try:
        if not use_files(model):
            return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
        # large models (and every model over 2 GB, which protobuf cannot serialize in one piece):
        # onnxruntime reads a temporary copy written with external data (streamed tensor by
        # tensor, deleted once the session holds the weights)
        with tempfile.TemporaryDirectory(prefix="graphprune-ort-") as d:
            path = os.path.join(d, "model.onnx")
            write_model_files(model, path, path + ".data", "model.onnx.data")
            return ort.InferenceSession(path, opts, providers=list(providers))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        custom = custom_domains(model)
        if custom:
            raise UserError(f"{prefix}onnxruntime cannot run ops of the custom domain {custom[0]!r} ({msg[:200]}); "
                            "use --no-verify to prune without the parity check") from None
        if "ValidateOpsetForDomain" in msg or "opset" in msg.lower() and "support" in msg.lower():
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
            raise UserError(f"{prefix}onnxruntime {ort.__version__} cannot run opset {opset} (verification, accuracy "
                            "and latency need it; prune with --no-verify, or convert the model to a lower opset)") from None
        raise UserError(f"{prefix}onnxruntime cannot load the model ({msg[:300]})") from None


def input_specs(model: onnx.ModelProto, batch: int = 2, shapes=None) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, concrete shape, dtype) for each real graph input. ``shapes`` ({name: dims}, see
    graphprune.shapes.resolve) gives the size; the batch axis becomes ``batch`` where the model's
    batch is dynamic. Without ``shapes`` the model's own dims are used, and a dynamic non-batch
    dimension is a one-line error (never silently 1)."""
    from .shapes import declared_inputs, resolve, with_batch

    if shapes is None:
        shapes = resolve(model)
    sized = with_batch(shapes, model, batch)
    specs = []
    for name, dims, elem in declared_inputs(model):
        if elem not in _NP:
            raise UserError(f"input {name!r} has an unsupported element type")
        if name not in sized:
            raise UserError(f"no size for input {name!r}; give it with --input-shape {name}:...")
        specs.append((name, tuple(int(d) for d in sized[name]), _NP[elem]))
    return specs


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0, shapes=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(model, batch, shapes):
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


def static_batch(model) -> int | None:
    """The batch size a model fixes on every data input (dim 0 a number, the same on all of them:
    a file exported with a static batch, as detectors' export scripts and old zoo files are), or
    None when the batch is free. Such a model runs at that batch only: graphprune feeds it that many
    samples at a time."""
    proto = model.model if isinstance(model, GraphModel) else model
    inits = {i.name for i in proto.graph.initializer}
    dims = set()
    for vi in proto.graph.input:
        if vi.name in inits or (isinstance(model, GraphModel) and vi.name in model.weights):
            continue
        shape = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else []
        if not shape or not shape[0].HasField("dim_value") or shape[0].dim_value < 1:
            return None
        dims.add(int(shape[0].dim_value))
    return dims.pop() if len(dims) == 1 else None


def _session_batch(sess) -> int | None:
    """static_batch of a session's data inputs (their dim 0, when all are the same number)."""
    dims = {i.shape[0] if i.shape else None for i in sess.get_inputs()}
    b = dims.pop() if len(dims) == 1 else None
    return b if isinstance(b, int) and b >= 1 else None


def run(model_or_session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of one run. A model with a static batch B (``static_batch``) given another number of
    samples runs B at a time (the last chunk padded with copies of its last sample, whose outputs
    are dropped) and the outputs are concatenated along the batch axis."""
    sess = model_or_session if hasattr(model_or_session, "run") else session(model_or_session)
    b = _session_batch(sess)
    n = len(next(iter(feeds.values()))) if feeds else 0
    try:
        if b is None or n == b or n == 0 or any(np.ndim(v) == 0 or len(v) != n for v in feeds.values()):
            return sess.run(None, feeds)
        parts = []
        for s in range(0, n, b):
            chunk = {k: v[s:s + b] for k, v in feeds.items()}
            got = len(next(iter(chunk.values())))
            if got < b:
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], b - got, axis=0)]) for k, v in chunk.items()}
            outs = sess.run(None, chunk)
            parts.append([np.asarray(o)[:got] if np.ndim(o) and len(o) == b else np.asarray(o) for o in outs])
        return [np.concatenate([p[i] for p in parts]) if np.ndim(parts[0][i]) else parts[0][i]
                for i in range(len(parts[0]))]
    except Exception as exc:  # onnxruntime errors (shape mismatches inside the graph, ...) are the model's
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot run the model ({msg[:300]})") from None
