"""Compare pruning criteria (with and without compensation) on the three digits classifiers.

    python benchmarks/criteria_digits.py             # full grid, writes benchmarks/results/criteria_digits.{json,md}
    python benchmarks/criteria_digits.py --quick     # smoke subset, writes ..._quick.{json,md}
    python benchmarks/criteria_digits.py --models resnet --criteria magnitude taylor --budgets 0.5

Every cell is one-shot ``graphprune.pipeline.prune`` to ``Budget("flops", ratio)`` with calibration
``samples/digits_calib.npz`` (256 samples) and top-1 accuracy on ``samples/digits_test.npz``.
Compensation "off" is ``compensate=False``; "default" is ``compensate=None`` (the criterion's own
default), except for magnitude where it is ``compensate=True`` (layer-wise OBS).
A ``UserError`` (e.g. budget unreachable) is recorded as a failed cell; any other exception is a
bug: recorded with its traceback and printed at the end (exit status 1).
Models come from ``samples/digits.py`` (resnet) and ``samples/digits_models.py`` (mobilenet_v2, densenet).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback

os.environ.setdefault("GRAPHPRUNE_QUIET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from graphprune import UserError, log  # noqa: E402
from graphprune.pipeline import PruneConfig, evaluate, prune  # noqa: E402
from graphprune.io import load_model  # noqa: E402
from graphprune.planner import Budget  # noqa: E402

MODELS = {
    "resnet": "samples/digits_resnet.onnx",
    "mobilenet_v2": "samples/digits_mobilenet_v2.onnx",
    "densenet": "samples/digits_densenet.onnx",
}
CRITERIA = ["magnitude", "taylor", "taylor2", "fisher", "kron-obd", "kron-obs", "woodfisher", "eigendamage",
            "eigendamage-channel"]
BUDGETS = [0.5, 0.3]
COMPENSATIONS = ["off", "default"]
CALIB = "samples/digits_calib.npz"
TEST = "samples/digits_test.npz"
QUICK = {"models": ["resnet"], "criteria": ["magnitude", "taylor"], "budgets": [0.5]}


def compensations(criterion: str) -> list[str]:
    if criterion == "eigendamage":
        return ["default"]  # a layer rewrite in the eigenbasis: nothing to compensate
    if criterion == "kron-obs":
        return COMPENSATIONS + ["obs"]  # its own row update vs plain layer-wise OBS
    if criterion == "woodfisher":
        # stronger dampening of the Fisher inverse; 0.03 is about where the row-block WoodFisher's
        # "0.1" was (its λ came from the first 8 samples: 0.1-0.8x the mean Fisher diagonal)
        return COMPENSATIONS + ["default-damping0.03", "default-damping0.1"]
    return COMPENSATIONS


def compensate_arg(criterion: str, comp: str):
    if comp == "off":
        return False
    if comp == "obs":
        return "obs"
    if comp.startswith("default-damping"):
        return None
    return True if criterion == "magnitude" else None


def run_cell(model: str, path: str, criterion: str, comp: str, ratio: float, samples: int, tmp: str) -> dict:
    cell = {"model": model, "budget": ratio, "criterion": criterion, "compensation": comp,
            "compensate_arg": compensate_arg(criterion, comp)}
    out = os.path.join(tmp, f"{model}_{criterion}_{comp}_{ratio}.onnx")
    config = PruneConfig(criterion=criterion, budget=Budget("flops", ratio), calib=os.path.join(ROOT, CALIB),
                         samples=samples, eval_data=os.path.join(ROOT, TEST), force=True, recover=0,
                         compensate=cell["compensate_arg"],
                         damping=float(comp.removeprefix("default-damping")) if comp.startswith("default-damping") else 1e-3)
    t0 = time.perf_counter()
    try:
        report = prune(os.path.join(ROOT, path), out, config)
    except UserError as exc:
        cell.update(status="user_error", error=str(exc), wall_s=round(time.perf_counter() - t0, 3))
        return cell
    except Exception as exc:  # a bug in graphprune: keep everything
        cell.update(status="exception", error_type=type(exc).__name__, error=str(exc),
                    traceback=traceback.format_exc(), wall_s=round(time.perf_counter() - t0, 3))
        return cell
    wall = time.perf_counter() - t0
    totals = report["totals"]
    cell.update(
        status="ok",
        compensation_method=report.get("compensation"),
        accuracy_before=report["accuracy"]["before"],
        accuracy_after=report["accuracy"]["after"],
        macs_ratio=totals["macs_ratio"],
        params_ratio=totals["params_ratio"],
        channels_removed=totals["channels_removed"],
        budget_met=report.get("budget_met"),
        notes=report.get("notes", []),
        wall_s=round(wall, 3),
        timings=report.get("timings", {}),
    )
    return cell


def _short(msg: str, n: int = 60) -> str:
    msg = " ".join(str(msg).split()).replace("|", "\\|")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def _acc_cell(c: dict | None) -> str:
    if c is None:
        return "—"
    if c["status"] == "ok":
        return f"{c['accuracy_after']:.4f} ({c['macs_ratio']:.2f})"
    if c["status"] == "user_error":
        return f"fail: {_short(c['error'])}"
    return f"**BUG** {c['error_type']}: {_short(c['error'], 40)}"


def markdown(result: dict) -> str:
    meta = result["meta"]
    budgets = meta["budgets"]
    lines = ["# Pruning criteria on the digits classifiers", "",
             f"One-shot `graphprune.pipeline.prune` to `Budget(\"flops\", r)`, calibration `{CALIB}` "
             f"({meta['samples']} samples), top-1 accuracy on `{TEST}` (360 images). "
             "Accuracy cells: accuracy after pruning (MACs ratio actually reached). "
             "Compensation *off* = `compensate=False`; *default* = `compensate=None` (criterion default; "
             "for magnitude `compensate=True`, layer-wise OBS), method actually used in brackets. "
             "Time: wall seconds of `prune` (incl. statistics, verification and evaluation) per budget.", "",
             f"Reproduce: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"graphprune at git HEAD {meta.get('git_head')} (plus uncommitted changes, if any)  ",
             f"Total runtime: {meta['total_s']:.0f} s", ""]
    for model, mres in result["models"].items():
        lines += [f"## {model} (`{mres['path']}`)", "",
                  f"Dense accuracy: {mres['dense_accuracy']:.4f}; {mres['params']:.0f} params, {mres['macs']:.0f} MACs", ""]
        head = ["criterion", "compensation"] + [f"acc @ {int(round(b * 100))}% MACs" for b in budgets] + \
               ["time (s) " + " / ".join(f"{int(round(b * 100))}%" for b in budgets)]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for crit in meta["criteria"]:
            for comp in compensations(crit):
                cells = {c["budget"]: c for c in mres["cells"] if c["criterion"] == crit and c["compensation"] == comp}
                methods = {c.get("compensation_method") for c in cells.values() if c["status"] == "ok"}
                method = "/".join(sorted(m or "none" for m in methods)) if methods else "?"
                if comp == "off":
                    comp_label = comp
                elif comp == "obs":
                    comp_label = "obs (forced)"
                elif comp.startswith("default-damping"):
                    comp_label = f"default ({method}), --damping {comp.removeprefix('default-damping')}"
                else:
                    comp_label = f"default ({method})"
                row = [crit, comp_label] + [_acc_cell(cells.get(b)) for b in budgets]
                row.append(" / ".join(f"{cells[b]['wall_s']:.2f}" if b in cells else "—" for b in budgets))
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    bugs = [c for m in result["models"].values() for c in m["cells"] if c["status"] == "exception"]
    if bugs:
        lines += ["## Exceptions other than UserError", ""]
        for c in bugs:
            lines += [f"- {c['model']} {c['criterion']} {c['compensation']} {c['budget']}: "
                      f"`{c['error_type']}: {_short(c['error'], 200)}`"]
        lines.append("")
    return "\n".join(lines)


def model_info(path: str) -> dict:
    from graphprune.pipeline import inspect

    info = inspect(path)
    return {"macs": info["macs"], "params": info["params"], "dense_accuracy": evaluate(load_model(path), os.path.join(ROOT, TEST))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    ap.add_argument("--criteria", nargs="+", choices=CRITERIA, default=None)
    ap.add_argument("--budgets", nargs="+", type=float, default=None)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="smoke subset: resnet, magnitude + taylor, 50%% MACs")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/criteria_digits[_quick])")
    args = ap.parse_args(argv)
    log.set_quiet(True)
    base = QUICK if args.quick else {"models": list(MODELS), "criteria": CRITERIA, "budgets": BUDGETS}
    models = args.models or base["models"]
    criteria = args.criteria or base["criteria"]
    budgets = args.budgets or base["budgets"]
    stem = args.out or os.path.join(ROOT, "benchmarks", "results", "criteria_digits" + ("_quick" if args.quick else ""))
    command = "python benchmarks/criteria_digits.py" + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cores, "
               f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}")
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:
        commit = None
    result = {"meta": {"command": command, "machine": machine, "git_head": commit, "criteria": criteria, "budgets": budgets,
                       "samples": args.samples, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                       "torch_threads": torch.get_num_threads()}, "models": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="criteria_digits_") as tmp:
        for model in models:
            path = MODELS[model]
            if not os.path.exists(os.path.join(ROOT, path)):
                print(f"{path} missing: run python samples/digits.py / samples/digits_models.py", file=sys.stderr)
                return 2
            mres = {"path": path, **model_info(os.path.join(ROOT, path)), "cells": []}
            result["models"][model] = mres
            print(f"== {model}: dense accuracy {mres['dense_accuracy']:.4f}", flush=True)
            for crit in criteria:
                for comp in compensations(crit):
                    for ratio in budgets:
                        c = run_cell(model, path, crit, comp, ratio, args.samples, tmp)
                        mres["cells"].append(c)
                        if c["status"] == "ok":
                            msg = (f"acc {c['accuracy_before']:.4f} -> {c['accuracy_after']:.4f}, "
                                   f"macs {c['macs_ratio']:.3f}, params {c['params_ratio']:.3f} "
                                   f"[{c['compensation_method'] or 'no compensation'}]")
                        else:
                            msg = f"{c['status'].upper()}: {c.get('error_type', 'UserError')}: {_short(c['error'], 120)}"
                        print(f"  {crit:<10} {comp:<7} {ratio:.2f}  {c['wall_s']:6.1f}s  {msg}", flush=True)
    result["meta"]["total_s"] = round(time.perf_counter() - t_all, 1)
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(f"wrote {stem}.json and {stem}.md in {result['meta']['total_s']:.0f}s")
    bugs = [c for m in result["models"].values() for c in m["cells"] if c["status"] == "exception"]
    if bugs:
        print("\n" + "!" * 78 + f"\n{len(bugs)} run(s) raised exceptions other than UserError (bugs):", file=sys.stderr)
        for c in bugs:
            print(f"\n--- {c['model']} criterion={c['criterion']} compensation={c['compensation']} "
                  f"budget={c['budget']}\n{c['traceback']}", file=sys.stderr)
        print("!" * 78, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
