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


def progress(stage: str, done: int, total: int) -> None:
    """A progress line for long stages: redrawn in place on a terminal, else every ~10%."""
    if _quiet or total <= 1:
        return
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\rgraphprune: {stage} {done}/{total}", end=end, file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(f"graphprune: {stage} {done}/{total}", file=sys.stderr, flush=True)
