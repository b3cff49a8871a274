"""graphprune: structured channel pruning of exported ONNX models."""
import os as _os

__version__ = "0.1.0"

# OpenMP threads that wait at a barrier sleep instead of spinning (read when torch loads its OpenMP
# runtime, so only if graphprune is imported first; OMP_WAIT_POLICY=ACTIVE in the environment keeps
# spinning). On a machine whose cores are busy with other jobs a spinning thread waits for a core at
# every parallel region: the OCR fisher statistics took 33.5 s on 2 cores at load 3.6 with spinning
# threads, 4.5 s with sleeping ones (and 4.7 s on one thread); the recovery that follows 359 -> 116 s.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import UserError, VerificationError  # noqa: E402

__all__ = ["UserError", "VerificationError", "__version__", "inspect", "prune", "verify", "PruneConfig", "Budget"]


def __getattr__(name):  # keep `import graphprune` light; the API loads on first use
    if name in ("inspect", "prune", "verify", "PruneConfig", "load_and_trace", "evaluate"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Budget":
        from .planner import Budget

        return Budget
    raise AttributeError(name)
