"""graphprune: structured channel pruning of exported ONNX models."""
__version__ = "0.1.0"

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
