"""onnxruntime sessions and random inputs for a model's signature."""
from __future__ import annotations

import numpy as np
import onnx

from .errors import UserError

_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8,
}


def session(model: onnx.ModelProto, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=list(providers))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "ValidateOpsetForDomain" in msg or "opset" in msg.lower() and "support" in msg.lower():
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
            raise UserError(f"onnxruntime {ort.__version__} cannot run opset {opset} (verification, accuracy "
                            "and latency need it; prune with --no-verify, or convert the model to a lower opset)") from None
        raise UserError(f"onnxruntime cannot load the model ({msg[:300]})") from None


def input_specs(model: onnx.ModelProto, batch: int = 2) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, concrete shape, dtype) for each real graph input; dynamic dims: batch for axis 0, else 1."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in _NP:
            raise UserError(f"input {vi.name!r} has an unsupported element type")
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            shape.append(d.dim_value if d.HasField("dim_value") else (batch if axis == 0 else 1))
        specs.append((vi.name, tuple(shape), _NP[tt.elem_type]))
    return specs


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in input_specs(model, batch):
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[name] = rng.integers(0, 8, shape).astype(dtype)
    return feeds


def run(model_or_session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = model_or_session if hasattr(model_or_session, "run") else session(model_or_session)
    return sess.run(None, feeds)
