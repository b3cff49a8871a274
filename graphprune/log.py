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


_started: dict[str, float] = {}


def _secs(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def duration(seconds: float) -> str:
    """``95`` -> ``1m35s``, ``12`` -> ``12s`` (as the progress lines write it)."""
    return _secs(seconds)


def progress(stage: str, done: int, total: int, *, items: int | None = None, total_items: int | None = None,
             unit: str = "samples") -> None:
    """A progress line for long stages: redrawn in place on a terminal, else every ~10%. Call it with
    ``done=0`` before the first step to start the clock; with ``items`` (e.g. samples done of
    ``total_items``) the line gives the rate and the time left, from the first step on."""
    if _quiet or total <= 1:
        return
    now = time.perf_counter()
    if done == 0 or stage not in _started:
        _started[stage] = now
        if done == 0:
            return
    line = f"graphprune: {stage} {done}/{total}"
    elapsed = now - _started[stage]
    if items is not None and total_items and elapsed > 0:
        rate = items / elapsed
        line += f" ({items}/{total_items} {unit}, {rate:.1f} {unit}/s, "
        line += f"ETA {_secs((total_items - items) / rate)})" if done < total else f"{_secs(elapsed)})"
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\r{line}\033[K", end=end, file=sys.stderr, flush=True)
    elif done == total or done == 1 or done % max(1, total // 10) == 0:
        print(line, file=sys.stderr, flush=True)
    if done == total:
        _started.pop(stage, None)
