"""Recovery on the digits models (issue 12): every criterion at 50% and 30% of MACs, one-shot vs
``--recover STEPS`` (default settings otherwise: no per-model damping, --recover-mix 0.5), from 256
UNLABELLED calibration digits, with each cell's wall time against a budget of 2 minutes.

    python benchmarks/recover_digits.py --threads 1 --jobs 2 --recover-time 75   # full grid, time-budgeted
    python benchmarks/recover_digits.py --threads 1 --recover 1000   # full grid, a fixed step count
    python benchmarks/recover_digits.py --models vit --budgets 0.5 --criteria taylor
    python benchmarks/recover_digits.py --steps 3 --recover 400      # gradual: 3 rounds, 400 steps after each
    python benchmarks/recover_digits.py --steps 3 --recover 0 --criteria woodfisher woodtaylor  # WoodTaylor between rounds

One ``graphprune.pipeline.prune`` per cell: the one-shot accuracy is the report's accuracy before
recovery (the same plan and compensation, nothing trained), so both columns come from one run.
Accuracy on samples/digits_test.npz (360 images: one image is 0.28%). A UserError is a failed cell;
any other exception is a bug (traceback printed, exit status 1).
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

from graphprune import UserError  # noqa: E402
from graphprune.pipeline import PruneConfig, prune  # noqa: E402
from graphprune.planner import Budget  # noqa: E402
from heldout_quality import unlabelled  # noqa: E402  (benchmarks/ is the script's folder)

MODELS = {"resnet": "samples/digits_resnet.onnx", "mobilenet_v2": "samples/digits_mobilenet_v2.onnx",
          "densenet": "samples/digits_densenet.onnx", "vit": "samples/digits_vit.onnx"}
CALIB, TEST = "samples/digits_calib.npz", "samples/digits_test.npz"
CRITERIA = ["taylor", "fisher", "kron-obd", "kron-obs", "woodfisher", "eigendamage"]
BUDGETS = [0.5, 0.3]
TARGETS = {0.3: 0.99}  # fraction of dense accuracy at 30% MACs (CNNs); the ViT: 0.98 at 50%
TIME_BUDGET_S = 120


def cell(model: str, criterion: str, budget: float, calib: str, tmp: str, args) -> dict:
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))  # also in --jobs workers
    cfg = PruneConfig(criterion=criterion, budget=Budget("flops", budget, cap=args.max_group_removal), calib=calib,
                      eval_data=os.path.join(ROOT, TEST), force=True, seed=args.seed,
                      recover=args.recover if args.recover_time is None or args.recover_set else None,
                      recover_time=args.recover_time, steps=args.steps, recover_mix=args.mix,
                      recover_lr=args.recover_lr, recover_batch=args.recover_batch,
                      recover_temperature=args.recover_temperature,
                      recover_features=args.recover_features)
    t = time.perf_counter()
    try:
        rep = prune(os.path.join(ROOT, model), os.path.join(tmp, "out.onnx"), cfg)
    except UserError as exc:
        return {"status": "failed", "error": str(exc)}
    acc = rep["accuracy"]
    rounds = (rep.get("recovery") or {}).get("rounds") or [{}]
    one_shot = acc.get("before_recovery", acc["after"])  # --recover 0: the result is the one-shot one
    return {"status": "ok", "dense": acc["before"], "one_shot": one_shot, "recovered": acc["after"],
            "one_shot_relative": one_shot / max(acc["before"], 1e-9),
            "relative": acc["after"] / max(acc["before"], 1e-9), "macs_ratio": rep["totals"]["macs_ratio"],
            "best_step": rounds[-1].get("best_step"), "seconds": round(time.perf_counter() - t, 1),
            "recover_steps": (rep.get("recovery") or {}).get("steps_per_round"),
            "recovery_seconds": round(sum(v for k, v in rep["timings"].items() if k.endswith("recovery")), 1)}


def safe_cell(model: str, criterion: str, budget: float, calib: str, tmp: str, args) -> dict:
    os.makedirs(tmp, exist_ok=True)
    try:
        return cell(model, criterion, budget, calib, tmp, args)
    except Exception:  # a bug: keep going, report at the end
        return {"status": "bug", "error": traceback.format_exc()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--budgets", nargs="+", type=float, default=BUDGETS)
    ap.add_argument("--recover", type=int, default=None, help="recovery steps per round (default 1000; with "
                    "--recover-time: the cap)")
    ap.add_argument("--recover-time", type=float, default=None, metavar="S",
                    help="graphprune's --recover-time: recovery sized to S wall seconds per cell (all rounds)")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in this many processes at once (each with "
                    "--threads torch threads; recovery on these small nets is fastest at 1 thread)")
    ap.add_argument("--steps", type=int, default=1, help="pruning rounds (default 1)")
    ap.add_argument("--mix", type=float, default=0.5, help="--recover-mix (default 0.5, graphprune's default)")
    ap.add_argument("--recover-lr", type=float, default=1e-3, help="graphprune's --recover-lr (default 1e-3)")
    ap.add_argument("--recover-temperature", type=float, default=PruneConfig.recover_temperature,
                    help=f"graphprune's --recover-temperature (default {PruneConfig.recover_temperature:g})")
    ap.add_argument("--recover-batch", type=int, default=32, help="graphprune's --recover-batch (default 32)")
    ap.add_argument("--recover-features", action="store_true", help="graphprune's --recover-features")
    ap.add_argument("--max-group-removal", type=float, default=0.9, metavar="F",
                    help="graphprune's --max-group-removal (default 0.9)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="results stem (default benchmarks/results/recover_digits)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores; 1 on a busy machine)")
    args = ap.parse_args(argv)
    args.recover_set = args.recover is not None
    if args.recover is None:
        args.recover = 1000
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    stem = args.out or os.path.join(ROOT, "benchmarks", "results", "recover_digits")
    rows, bugs = [], []
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        calib = unlabelled(CALIB, tmp)
        grid = [(name, crit, budget) for name in args.models for crit in args.criteria for budget in args.budgets]
        pool = None
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
            futures = [pool.submit(safe_cell, MODELS[n], c, b, calib, os.path.join(tmp, f"{i}"), args)
                       for i, (n, c, b) in enumerate(grid)]
            results = (f.result() for f in futures)
        else:
            results = (safe_cell(MODELS[n], c, b, calib, tmp, args) for n, c, b in grid)
        for (name, crit, budget), res in zip(grid, results):
            if res["status"] == "bug":
                bugs.append(res["error"])
            rows.append({"model": name, "criterion": crit, "budget": budget, **res})
            msg = (f"{res['one_shot_relative']:.3f} -> {res['relative']:.3f} of dense, {res['seconds']} s"
                   + (f", {res['recover_steps']} steps" if res.get("recover_steps") is not None else "")
                   if res["status"] == "ok" else res["status"] + ": " + res.get("error", "")[:200])
            print(f"{name:13s} {crit:12s} {budget:.1f} {msg}", flush=True)
        if pool is not None:
            pool.shutdown()
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "recover": args.recover if args.recover_time is None or args.recover_set else None,
            "recover_time": args.recover_time, "jobs": args.jobs, "steps": args.steps,
            "recover_lr": args.recover_lr, "recover_batch": args.recover_batch,
            "recover_temperature": args.recover_temperature,
            "recover_features": args.recover_features, "mix": args.mix,
            "max_group_removal": args.max_group_removal, "calibration": CALIB + " (labels stripped)",
            "test": TEST, "seconds": round(time.perf_counter() - t0, 1), "load_average": [load0, os.getloadavg()]}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, rows))
    for b in bugs:
        print(b, file=sys.stderr)
    return 1 if bugs else 0


def markdown(meta: dict, rows: list[dict]) -> str:
    load = " -> ".join(f"{a[0]:.1f}" for a in meta["load_average"])
    lines = ["# Recovery on the digits models", "",
             f"`{meta['command']}` ({meta['date']}; {meta['cpus']} CPUs, torch {meta['torch']}, "
             f"{meta['torch_threads']} torch thread(s), load average {load}; {meta['seconds']} s in all).", "",
             f"Calibration: {meta['calibration']}; accuracy on {meta['test']} (360 images). Each cell: one-shot "
             f"accuracy -> after " + (f"`--recover {meta['recover']}`" if meta.get("recover") is not None else "")
             + (" " if meta.get("recover") is not None and meta.get("recover_time") else "")
             + (f"`--recover-time {meta['recover_time']:g}`" if meta.get("recover_time") else "")
             + (f" with `--steps {meta['steps']}`" if meta["steps"] > 1 else "")
             + f", `--recover-mix {meta['mix']}`, `--recover-temperature {meta.get('recover_temperature', 1.0):g}`"
             + ", everything else at its default, as a fraction of dense; "
             f"then the wall seconds of the whole prune (time budget {TIME_BUDGET_S} s; over it: ⏱)"
             + (" and the recovery steps the time budget gave" if meta.get("recover_time") else "")
             + (f"; {meta['jobs']} cells at a time, one process each" if meta.get("jobs", 1) > 1 else "") + ". "
             "Targets: >= 0.99 of dense at 30% MACs (CNNs), >= 0.98 at 50% (ViT); ✓ marks a met target.", ""]
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    for m in dict.fromkeys(r["model"] for r in rows):
        dense = next((r["dense"] for r in rows if r["model"] == m and r["status"] == "ok"), None)
        lines += [f"## {m} (dense {dense:.3f})" if dense is not None else f"## {m}", ""]
        lines.append("| criterion | " + " | ".join(f"{int(b * 100)}% MACs" for b in budgets) + " |")
        lines.append("|---" * (len(budgets) + 1) + "|")
        for crit in dict.fromkeys(r["criterion"] for r in rows if r["model"] == m):
            cells = []
            for b in budgets:
                r = next((r for r in rows if r["model"] == m and r["criterion"] == crit and r["budget"] == b), None)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    target = 0.98 if (m == "vit" and b == 0.5) else TARGETS.get(b) if m != "vit" else None
                    mark = " ✓" if target is not None and r["relative"] >= target else ""
                    over = " ⏱" if r["seconds"] > TIME_BUDGET_S else ""
                    steps = f", {r['recover_steps']} steps" if meta.get("recover_time") and r.get("recover_steps") else ""
                    cells.append(f"{r['one_shot_relative']:.3f} → **{r['relative']:.3f}**{mark} "
                                 f"({r['seconds']:.0f} s{over}{steps})")
            lines.append(f"| {crit} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
