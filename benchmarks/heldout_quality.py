"""Pruning quality on the held-out digits classifiers (issue 15): every criterion, one-shot and with
the default recovery, from UNLABELLED calibration data, at default settings otherwise.

    python benchmarks/heldout_quality.py                      # full grid -> results/heldout_quality.{json,md}
    python benchmarks/heldout_quality.py --models regnet_se --criteria fisher --budgets 0.3 --modes default
    python benchmarks/heldout_quality.py --tuned              # the digits models graphprune was tuned on
    python benchmarks/heldout_quality.py --criteria woodfisher woodfisher:0.1 --modes one-shot  # NAME:D = --damping D

Held-out models (samples/heldout.py; never used to choose settings): MobileNetV2 x0.5, a
pre-activation DenseNet-BC with unfolded BatchNormalization, a RegNet-style net with squeeze-excite.
Calibration: samples/heldout_calib.npz (256 images) with its labels stripped; accuracy on the 497 images
of samples/heldout_test.npz. ``--tuned`` runs the same grid on samples/digits_*.onnx (digits_calib.npz,
labels stripped, digits_test.npz).

Modes: "one-shot" is ``recover=0`` (score, plan, compensate, nothing trained); "default" is
``PruneConfig()``'s own settings with ``--calib`` given (recovery on: graphprune.pipeline.AUTO_RECOVER_STEPS
steps of distillation from the dense model). Every cell is ``graphprune.pipeline.prune`` in this process; a
UserError is a failed cell; any other exception is a bug (traceback printed, exit status 1).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphprune import UserError  # noqa: E402
from graphprune.pipeline import AUTO_RECOVER_STEPS, PruneConfig, prune  # noqa: E402
from graphprune.planner import Budget  # noqa: E402

HELDOUT = {"mobilenet_v2": "samples/heldout_mobilenet_v2.onnx", "densenet": "samples/heldout_densenet.onnx",
           "regnet_se": "samples/heldout_regnet_se.onnx"}
TUNED = {"resnet": "samples/digits_resnet.onnx", "mobilenet_v2": "samples/digits_mobilenet_v2.onnx",
         "densenet": "samples/digits_densenet.onnx"}
DATA = {"heldout": ("samples/heldout_calib.npz", "samples/heldout_test.npz"),
        "tuned": ("samples/digits_calib.npz", "samples/digits_test.npz")}
CRITERIA = ["magnitude", "taylor", "fisher", "kron-obd", "kron-obs", "woodfisher", "eigendamage"]
BUDGETS = [0.5, 0.3]
MODES = ["one-shot", "default"]


def unlabelled(path: str, tmp: str) -> str:
    with np.load(os.path.join(ROOT, path)) as d:
        arrays = {k: d[k] for k in d.files if k != "labels"}
    out = os.path.join(tmp, "calib_unlabelled.npz")
    np.savez(out, **arrays)
    return out


def cell(model: str, criterion: str, budget: float, mode: str, calib: str, test: str, tmp: str,
         seed: int) -> dict:
    name, _, damping = criterion.partition(":")  # "woodfisher:0.1" = --criterion woodfisher --damping 0.1
    extra = {"damping": float(damping)} if damping else {}
    cfg = PruneConfig(criterion=name, budget=Budget("flops", budget), calib=calib, **extra,
                      eval_data=os.path.join(ROOT, test), force=True, seed=seed,
                      recover=0 if mode == "one-shot" else None)
    t = time.perf_counter()
    try:
        rep = prune(os.path.join(ROOT, model), os.path.join(tmp, "out.onnx"), cfg)
    except UserError as exc:
        return {"status": "failed", "error": str(exc)}
    acc = rep["accuracy"]
    return {"status": "ok", "accuracy": acc["after"], "dense": acc["before"],
            "relative": acc["after"] / max(acc["before"], 1e-9), "one_shot": acc.get("before_recovery"),
            "macs_ratio": rep["totals"]["macs_ratio"], "seconds": round(time.perf_counter() - t, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuned", action="store_true", help="the digits models graphprune was tuned on")
    ap.add_argument("--models", nargs="+")
    ap.add_argument("--criteria", nargs="+", default=CRITERIA, help="NAME or NAME:D (with --damping D)")
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results stem (default benchmarks/results/heldout_quality[_tuned])")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores; 1 on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    which = "tuned" if args.tuned else "heldout"
    models = TUNED if args.tuned else HELDOUT
    names = args.models or list(models)
    calib_path, test = DATA[which]
    stem = args.out or os.path.join(ROOT, "benchmarks", "results", f"heldout_quality{'_tuned' if args.tuned else ''}")
    rows, bugs = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        calib = unlabelled(calib_path, tmp)
        for name in names:
            for crit in args.criteria:
                for budget in args.budgets:
                    for mode in args.modes:
                        try:
                            res = cell(models[name], crit, budget, mode, calib, test, tmp, args.seed)
                        except Exception:  # a bug: keep going, report at the end
                            res = {"status": "bug", "error": traceback.format_exc()}
                            bugs.append(res["error"])
                        rows.append({"model": name, "criterion": crit, "budget": budget, "mode": mode, **res})
                        acc = f"{res['accuracy']:.3f} ({res['relative']:.3f} of dense)" if res["status"] == "ok" else res["status"]
                        print(f"{name:13s} {crit:12s} {budget:.1f} {mode:8s} {acc}", flush=True)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "auto_recover_steps": AUTO_RECOVER_STEPS, "calibration": calib_path + " (labels stripped)",
            "test": test, "seconds": round(time.perf_counter() - t0, 1),
            "load_average": os.getloadavg()}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, rows))
    for b in bugs:
        print(b, file=sys.stderr)
    return 1 if bugs else 0


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Pruning quality, {'tuned-on' if 'digits_calib' in meta['calibration'] else 'held-out'} digits models",
             "", f"`{meta['command']}` — {meta['date']}, {meta['cpus']} CPUs, torch {meta['torch']}, "
             f"{meta['seconds']} s, load average at the end {tuple(round(x, 1) for x in meta['load_average'])}.",
             f"Calibration {meta['calibration']}; accuracy on {meta['test']}. Cells: accuracy "
             f"(fraction of dense). \"default\" = recovery on ({meta['auto_recover_steps']} steps).", ""]
    models = list(dict.fromkeys(r["model"] for r in rows))
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for m in models:
        dense = next((r["dense"] for r in rows if r["model"] == m and r["status"] == "ok"), None)
        lines += [f"## {m} (dense {dense:.3f})" if dense is not None else f"## {m}", ""]
        cols = [(b, md) for b in budgets for md in modes]
        lines.append("| criterion | " + " | ".join(f"{int(b * 100)}% MACs {md}" for b, md in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for crit in dict.fromkeys(r["criterion"] for r in rows if r["model"] == m):
            cells = []
            for b, md in cols:
                r = next((r for r in rows if r["model"] == m and r["criterion"] == crit and r["budget"] == b
                          and r["mode"] == md), None)
                cells.append("" if r is None else f"{r['accuracy']:.3f} ({r['relative']:.3f})" if r["status"] == "ok"
                             else r["status"])
            lines.append(f"| {crit} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
