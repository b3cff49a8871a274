"""Stage: write. Accuracy after pruning (with --eval), timings, then the model and its report,
atomically (no half-written output: the model is removed again if the report cannot be written),
on rank 0 only under torchrun."""
from __future__ import annotations

import time
from pathlib import Path

from ..config import PruneConfig
from ..distributed import is_main
from ..io import save_model, write_json_atomic
from .accuracy import evaluate


def finish(report: dict, before: float | None, pruned, path, out, config: PruneConfig, report_path,
           timings: dict) -> dict:
    if config.eval_data:
        t = time.perf_counter()
        report["accuracy"] = {"before": before, "after": evaluate(pruned, config.eval_data)}
        rounds = (report.get("recovery") or {}).get("rounds") or []
        if rounds and "accuracy_before_recovery" in rounds[-1]:
            report["accuracy"]["before_recovery"] = rounds[-1]["accuracy_before_recovery"]
        timings["evaluate"] = timings.get("evaluate", 0.0) + time.perf_counter() - t
    report["timings"] = {k: round(v, 4) for k, v in timings.items()}
    if not is_main():  # under torchrun every rank computes the same model; rank 0 writes it
        return report
    save_model(pruned, out, src=path, force=config.force, external_data=config.external_data or None)
    if report_path is not None:
        try:
            write_json_atomic(report, report_path)
        except BaseException:
            Path(out).unlink(missing_ok=True)
            raise
    return report
