"""Progress output on stderr, silenced with GRAPHPRUNE_QUIET=1 or set_quiet(True)."""
import os
import sys
import time

_quiet = os.environ.get("GRAPHPRUNE_QUIET", "") not in ("", "0")


def set_quiet(flag: bool) -> None:
    global _quiet
    _quiet = flag


def info(msg: str) -> None:
    if not _quiet:
        print(f"graphprune: {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"graphprune: warning: {msg}", file=sys.stderr, flush=True)


class Timer:
    """Context manager recording elapsed seconds into a dict under a stage name."""

    def __init__(self, sink: dict, stage: str):
        self.sink, self.stage = sink, stage

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sink[self.stage] = round(time.perf_counter() - self.t0, 4)
        return False
