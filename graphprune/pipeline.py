"""The Python API: inspect, prune, verify. The CLI is a thin layer over these functions.

``prune`` is the list of stages in graphprune/stages/ (load → trace → score → plan → compensate →
rewrite → verify → recover → write); this module checks the request, picks the method (channel
rounds, or EigenDamage's layer rewriting) and hands the result to the write stage."""
from __future__ import annotations

import os
import time
from pathlib import Path

from .config import AUTO_CRITERION, AUTO_RECOVER_STEPS, PruneConfig, resolved
from .cost import model_costs
from .errors import UserError
from .io import opset_of
from .shapes import describe as describe_shapes
from .stages import eigendamage, rounds
from .stages.load import check_sizes, load_and_trace, signature, upgrade_info
from .stages.recover import recovery_steps
from .stages.report import describe_groups
from .stages.score import collect_statistics
from .stages.accuracy import accuracy_before, evaluate
from .stages.verify import verify
from .stages.write import finish

__all__ = ["AUTO_CRITERION", "AUTO_RECOVER_STEPS", "PruneConfig", "inspect", "prune", "verify", "evaluate",
           "load_and_trace", "signature", "check_sizes", "collect_statistics", "describe_groups", "recovery_steps"]

def inspect(path: str | os.PathLike, input_shapes=None, calib: str | None = None) -> dict:
    t0 = time.perf_counter()
    model, tr = load_and_trace(path, input_shapes, calib)
    elapsed = time.perf_counter() - t0
    costs = model_costs(tr)
    groups = describe_groups(tr)
    return {
        "model": str(path),
        "opset": opset_of(model),
        **upgrade_info(model),
        "input_shapes": describe_shapes(tr.input_shapes),
        "nodes": len(model.graph.node),
        "macs": costs["macs"],
        "params": costs["params"],
        "groups": groups,
        "prunable_groups": sum(g["prunable"] for g in groups),
        "prunable_channels": sum(g["size"] for g in groups if g["prunable"]),
        "trace_seconds": round(elapsed, 4),
    }


def _check_request(path, out: Path, config: PruneConfig) -> None:
    """Everything about the options and paths that can be refused before any work."""
    if out.exists() and not config.force:
        raise UserError(f"{out}: exists (use --force to overwrite)")
    if Path(path).exists() and out.exists() and out.resolve() == Path(path).resolve():
        raise UserError(f"{out}: refusing to overwrite the input model")
    if config.steps < 1:
        raise UserError(f"--steps must be >= 1, got {config.steps}")
    if config.budget.kind == "latency" and config.steps > 1:
        raise UserError("--keep-latency is planned against measurements in one round (no --steps)")
    if config.provider not in ("cpu", "cuda", "tensorrt"):
        raise UserError(f"unknown --provider {config.provider!r} (cpu, cuda, tensorrt)")


def _check_runnable(model, config: PruneConfig) -> None:
    """Data and ops the requested checks need, refused before any work rather than after."""
    if config.eval_data:
        from .calib import load_labelled

        load_labelled(model, config.eval_data)
    from .runtime import custom_domains

    needs_ort = config.verify or config.eval_data or config.budget.kind == "latency"
    if needs_ort and custom_domains(model):
        raise UserError(f"onnxruntime cannot run ops of the custom domain {custom_domains(model)[0]!r}, which "
                        "verification, accuracy and latency need; use --no-verify (without --eval/--keep-latency)")


def _fit_static_batch(model, config: PruneConfig) -> PruneConfig:
    """A model with a static batch B runs B samples at a time only (its Reshapes may even hold B):
    calibration statistics and recovery keep their mini-batches (rounded down to multiples of B)
    and forward them B samples at a time (curvature.collect's ``micro``, recover's ``forward``);
    onnxruntime runs are chunked by runtime.run, the calibration set is cut to whole batches by
    load_calib."""
    import dataclasses

    from . import log
    from .runtime import static_batch

    b = static_batch(model)
    if b is None:
        return config
    batch, recover_batch = (max(b, x - x % b) for x in (config.batch_size, config.recover_batch))
    if config.calib is not None:
        log.info(f"the model's inputs have a static batch of {b}: calibration mini-batches of {batch} and "
                 f"recovery's of {recover_batch} run in forward passes of {b}")
    return dataclasses.replace(config, batch_size=batch, recover_batch=recover_batch)


def prune(path: str | os.PathLike, out: str | os.PathLike, config: PruneConfig,
          report_path: str | os.PathLike | None = None) -> dict:
    """Load and trace PATH, prune it (channel rounds: score, plan, compensate, rewrite, verify,
    recover; or EigenDamage's layer rewriting), then write OUT (and the report) atomically. With
    ``config.steps`` > 1 the budget is reached in rounds, re-collecting statistics in between."""
    timings: dict[str, float] = {}
    config = resolved(config)
    out = Path(out)
    _check_request(path, out, config)
    t = time.perf_counter()
    model, tr = load_and_trace(path, config.input_shapes, config.calib)
    timings["load_and_trace"] = time.perf_counter() - t
    _check_runnable(model, config)
    config = _fit_static_batch(model, config)
    before_accuracy = accuracy_before(model, tr, config.eval_data, timings)
    n_recover = recovery_steps(config)
    if eigendamage.applies(config):
        report, pruned = eigendamage.run(model, tr, config, path, out, timings, recover_steps=n_recover)
    else:
        report, pruned = rounds.run(model, tr, config, path, out, timings, recover_steps=n_recover)
    return finish(report, before_accuracy, pruned, path, out, config, report_path, timings)
