"""Speed-up that matches the MACs removed (issue 13): per model, batch and budget, prune, then
re-measure dense vs pruned independently in a fresh process (``graphprune bench``: interleaved runs,
pinned intra-op threads, timed until the 95% bootstrap interval of the speed-up is within --ci or
--max-time), and record MACs reduction, speed-up with its interval and efficiency (speed-up ÷ MACs
reduction); for --keep-latency, where the measured latency lands against F x dense.

    python benchmarks/speedup.py [--models resnet50,mobilenet_v2,yolov8n,yolov8s,vit_tiny,vit] [--batches 1,8]
        [--budgets flops0.7,flops0.7-auto,...,latency0.5] [--threads 1] [--work DIR] [--fresh] [--collect-only]

Models: ResNet-50 at 224 (samples/resnet50.py), MobileNetV2 at 224 (samples/imagenet.py), a
YOLOv8n-sized detector at 640 (samples/yolov8n.py) and the same at YOLOv8s widths
(samples/yolov8n.py:yolov8s), a ViT at DeiT-Tiny sizes at 224
(samples/transformers.py:vit_tiny), and the digits ViT (samples/digits_vit.onnx; 0.1 ms a batch, so
its time is per-op overhead: it shows where a latency target cannot land); with --models zoo (or
zoo_<name>), the sample zoo's CNN families (samples/zoo.py) at their own 32x32-sized inputs.
Budgets (default: all): flops0.7 / flops0.5 / flops0.3 (--round-to 1), the same with -auto
(--round-to auto), latency0.7 / latency0.5 (--keep-latency, round-to auto). Magnitude criterion, no
calibration data (latency does not depend on the weights' values).

Resumable: every (model, batch, budget) row is a JSON file under --work/rows, skipped when present
(--fresh re-runs); dense exports, pruned models, reports and the latency cache (--work/latency.json)
stay in --work. Pruning and each measurement run as separate processes with OMP_NUM_THREADS=1.
Results: --out.json and --out.md (default benchmarks/results/speedup).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from graphprune.bench import MAC_OPS  # noqa: E402

MODELS = {  # name: (source for `graphprune convert` or an .onnx path, input shape)
    "resnet50": ("samples/resnet50.py:resnet50", "1,3,224,224"),
    "mobilenet_v2": ("samples/imagenet.py:mobilenet_v2", "1,3,224,224"),
    "yolov8n": ("samples/yolov8n.py:yolov8n", "1,3,640,640"),
    "yolov8s": ("samples/yolov8n.py:yolov8s", "1,3,640,640"),
    "vit_tiny": ("samples/transformers.py:vit_tiny", "1,3,224,224"),
    "vit": ("samples/digits_vit.onnx", "1,1,8,8"),
}
#: the sample zoo (samples/zoo.py, the CNN families the tests prune) at its own small input size:
#: opt-in as zoo_<name>, or all of them as --models zoo
ZOO = ["resnet_basic", "resnet_bottleneck", "mobilenet_v2", "mobilenet_v3", "densenet", "inception", "vgg",
       "resnext", "regnet_se", "shufflenet", "silu_net"]


def model_source(name: str) -> tuple[str, str]:
    """(source for `graphprune convert` or an .onnx path, input shape) of a benchmark model."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("zoo_") and name[4:] in ZOO:
        from samples import zoo

        return f"samples/zoo.py:{name[4:]}", ",".join(map(str, zoo.input_shape(name[4:])))
    raise SystemExit(f"unknown model {name!r} (choose from {', '.join(MODELS)}, zoo, "
                     f"{', '.join('zoo_' + z for z in ZOO)})")
BUDGETS = ["flops0.7", "flops0.7-auto", "flops0.5", "flops0.5-auto", "flops0.3", "flops0.3-auto",
           "latency0.7", "latency0.5"]


def parse_budget(name: str) -> tuple[str, float, str]:
    """"flops0.5-auto" -> ("flops", 0.5, "auto"); "latency0.5" -> ("latency", 0.5, "auto")."""
    base, _, suffix = name.partition("-")
    for kind in ("flops", "latency"):
        if base.startswith(kind):
            try:
                ratio = float(base[len(kind):])
            except ValueError:
                break
            if not 0 < ratio <= 1 or suffix not in ("", "auto"):
                break
            return kind, ratio, "auto" if (suffix == "auto" or kind == "latency") else "1"
    raise SystemExit(f"unknown budget {name!r} (e.g. flops0.5, flops0.5-auto, latency0.5)")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRAPHPRUNE_QUIET", None)
    return env


def cli(*args, log=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "graphprune.cli", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    if log is not None:
        with open(log, "a") as fh:
            fh.write("$ " + " ".join(cmd[2:]) + "\n" + res.stdout + res.stderr + "\n")
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:2]))} failed ({res.returncode}): "
                           f"{(res.stderr.strip().splitlines() or [''])[-1]}")
    return res


def dense_model(name: str, work: str, log: str) -> str:
    src, shape = model_source(name)
    if src.endswith(".onnx"):
        return os.path.join(ROOT, src)
    out = os.path.join(work, f"{name}.onnx")
    if not os.path.exists(out):
        cli("convert", src, "-o", out, "--input-shape", shape, log=log)
    return out


def run_row(name: str, batch: int, budget: str, args, work: str, log: str) -> dict:
    kind, ratio, round_to = parse_budget(budget)
    dense = dense_model(name, work, log)
    # a --round-to 1 MACs plan does not depend on the batch: shared by the batch sizes
    tag = f"{name}_{budget}" + ("" if kind == "flops" and round_to == "1" else f"_b{batch}")
    pruned, report = os.path.join(work, tag + ".onnx"), os.path.join(work, tag + ".json")
    t0 = time.perf_counter()
    if not (os.path.exists(pruned) and os.path.exists(report)) or args.fresh:
        flag = "--keep-flops" if kind == "flops" else "--keep-latency"
        cli("prune", dense, "-o", pruned, flag, ratio, "--round-to", round_to, "--latency-batch", batch,
            "--latency-threads", args.threads, "--latency-cache", os.path.join(work, "latency.json"),
            "--best-effort", "--force", "--report", report, log=log)
    prune_s = time.perf_counter() - t0
    rep = json.load(open(report))
    bench_json = os.path.join(work, f"{tag}_bench_b{batch}.json")
    load_before = os.getloadavg()
    cli("bench", dense, pruned, "--batch", batch, "--threads", args.threads, "--runs", args.runs, "--warmup", 5,
        "--ci", args.ci, "--max-time", args.max_time, "--quantile", args.quantile, "--profile", args.profile,
        "--json", bench_json, log=log)
    res = json.load(open(bench_json))
    rows = {r["model"]: r for r in res["results"]}
    d, p = rows[os.path.basename(dense)], rows[os.path.basename(pruned)]
    macs_red = 1 / max(rep["totals"]["macs_ratio"], 1e-12)
    lo, hi = p["speedup_ci"]
    row = {"model": name, "batch": batch, "budget": budget, "kind": kind, "ratio": ratio, "round_to": round_to,
           "macs_ratio": rep["totals"]["macs_ratio"], "macs_reduction": macs_red,
           "dense_p50_ms": d["p50_ms"], "pruned_p50_ms": p["p50_ms"], "speedup": p["speedup"],
           "speedup_ci": [lo, hi], "efficiency": p["speedup"] / macs_red,
           "efficiency_ci": [lo / macs_red, hi / macs_red], "runs": p["runs"], "stopped": p["stopped"],
           "slower_than_dense": hi < 1.0, "budget_met": rep.get("budget_met"), "prune_seconds": round(prune_s, 1),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "bench_threads": res["settings"]["threads"], "quantile": res["settings"]["quantile"]}
    profiles = {q["model"]: q for q in res.get("profiles", [])}
    pd, pp = profiles.get(os.path.basename(dense)), profiles.get(os.path.basename(pruned))
    if pd and pp and pd["mac_ops_ms"] > 0 and pd["other_ops_ms"] > 0:
        # where the time went (onnxruntime's profiler): the MAC ops against everything else
        share = pd["other_ops_ms"] / pd["kernel_ms"]
        row.update({"mac_ops_time_ratio": pp["mac_ops_ms"] / pd["mac_ops_ms"],
                    "other_ops_time_ratio": pp["other_ops_ms"] / pd["other_ops_ms"],
                    "other_ops_share_dense": share,
                    # the efficiency if the MAC ops' time fell exactly with the MACs and the rest not at all
                    "efficiency_other_ops_fixed": 1 / ((1 - share) / macs_red + share) / macs_red})
        row["other_ops_top"] = [[op, round(ms, 3), round(pp["by_op"].get(op, 0.0), 3)]
                                for op, ms in pd["by_op"].items() if op not in MAC_OPS][:5]
        # per output size: dense MAC ops, dense other ops, pruned MAC ops, pruned other ops (ms)
        row["by_size"] = {k: [round(v["mac_ops_ms"], 3), round(v["other_ops_ms"], 3),
                              round(pp.get("by_size", {}).get(k, {}).get("mac_ops_ms", 0.0), 3),
                              round(pp.get("by_size", {}).get(k, {}).get("other_ops_ms", 0.0), 3)]
                          for k, v in pd.get("by_size", {}).items()}
    if kind == "latency":
        lat = rep["latency"]
        # measured pruned / (F x dense) - 1, from the independent measurement and its interval
        row.update({"landing": 1 / (ratio * p["speedup"]) - 1,
                    "landing_ci": [1 / (ratio * hi) - 1, 1 / (ratio * lo) - 1],
                    "planner_landing": lat["measured_ms"] / lat["target_ms"] - 1,
                    "planner_attempts": len(lat["attempts"]), "predicted_ms": lat["predicted_ms"]})
        widths = lat.get("widths") or []
    else:  # --keep-flops --round-to auto: the report's "widths" entry
        widths = (rep.get("widths") or {}).get("groups") or []
    row["groups_snapped"] = sum(1 for w in widths if w["snapped"] != w["planned"])
    return row


def profile_cell(r: dict) -> str:
    """Pruned/dense kernel time of the MAC ops and of all other ops, and the other ops' share of the
    dense model's kernel time (from the profiled runs); empty for rows measured without a profile."""
    if "mac_ops_time_ratio" not in r:
        return ""
    return (f"x{r['mac_ops_time_ratio']:.2f} / x{r['other_ops_time_ratio']:.2f} "
            f"({r['other_ops_share_dense']:.0%})")


def budget_flags(r: dict) -> str:
    return (f"--keep-{'flops' if r['kind'] == 'flops' else 'latency'} {r['ratio']:g}"
            + (" --round-to auto" if r["kind"] == "flops" and r["round_to"] == "auto" else ""))


def write_results(rows: list[dict], out: str, env: dict) -> None:
    with open(out + ".json", "w") as fh:
        json.dump({"env": env, "rows": rows}, fh, indent=2)
    lines = [f"`python benchmarks/speedup.py` on {env['cpu']} ({env['cpu_count']} cores), onnxruntime "
             f"{env['onnxruntime']} CPUExecutionProvider, {env['threads']} intra-op thread(s); every row re-measured "
             f"in a fresh process (`graphprune bench`, interleaved, until the 95% interval of the speed-up is within "
             f"±{env['ci']:.0%} or {env['max_time']:g} s). Efficiency = speed-up / MACs reduction. Landing = measured "
             f"pruned latency / (F x dense) - 1. Time x: pruned / dense kernel time of the MAC ops (Conv, MatMul, "
             f"Gemm, fused forms) and of every other op (activations, concats, reorders, softmax...), from "
             f"onnxruntime's profiler (`graphprune bench --profile`), with the other ops' share of the dense time.", "",
             "| model | batch | budget | MACs kept | dense p50 ms | pruned p50 ms | speed-up [95% CI] | MACs reduction "
             "| efficiency | landing [95% CI] | time x: MAC ops / other ops (other share) | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_ci"]
        landing = (f"{r['landing']:+.1%} [{r['landing_ci'][0]:+.1%}, {r['landing_ci'][1]:+.1%}]"
                   if "landing" in r else "")
        notes = []
        if r["slower_than_dense"]:
            notes.append("SLOWER than dense")
        if r["stopped"] == "max_time":
            notes.append("interval not within target (time cap)")
        if "landing" in r and abs(r["landing"]) > 0.05:
            notes.append("outside ±5%")
        if r.get("budget_met") is False:
            notes.append("budget not met")
        budget = budget_flags(r)
        lines.append(f"| {r['model']} | {r['batch']} | {budget} | {r['macs_ratio']:.1%} | {r['dense_p50_ms']:.3f} | "
                     f"{r['pruned_p50_ms']:.3f} | x{r['speedup']:.2f} [{lo:.2f}, {hi:.2f}] | x{r['macs_reduction']:.2f} | "
                     f"{r['efficiency']:.2f} | {landing} | {profile_cell(r)} | {'; '.join(notes)} |")
    checks = []
    for name in ("resnet50", "yolov8n", "yolov8s"):
        r = next((r for r in rows if r["model"] == name and r["batch"] == 8 and r["budget"] == "flops0.5-auto"), None)
        if r:
            checks.append(f"* {name}, batch 8, --keep-flops 0.5 --round-to auto: efficiency {r['efficiency']:.2f} "
                          f"(target >= 0.85: {'met' if r['efficiency'] >= 0.85 else 'MISSED'})")
    slower = [r for r in rows if r["slower_than_dense"]]
    checks.append(f"* pruned models slower than dense (interval entirely below x1.00): {len(slower)}"
                  + ("".join(f"; {r['model']} b{r['batch']} {r['budget']}" for r in slower)))
    for r in rows:
        if r["kind"] == "latency":
            checks.append(f"* {r['model']} b{r['batch']} --keep-latency {r['ratio']:g}: lands {r['landing']:+.1%} "
                          f"({'within' if abs(r['landing']) <= 0.05 else 'OUTSIDE'} ±5%)")
    where = []  # where the time did not fall, per output size (the profiler's), for the 0.5 rows
    for r in rows:
        if r.get("by_size") and r["budget"] == "flops0.5-auto":
            where += ["", f"{r['model']} batch {r['batch']} {budget_flags(r)}: kernel ms per inference by "
                      "output size (onnxruntime profiler; 'other': tokens, the detector's flattened anchors)", "",
                      "| output size | MAC ops dense ms | MAC ops pruned ms (x) | other ops dense ms | "
                      "other ops pruned ms (x) |", "|---|---|---|---|---|"]
            for size, (dm, do, pm, po) in r["by_size"].items():
                x = lambda p, d: f" (x{p / d:.2f})" if d > 0 else ""  # noqa: E731
                where.append(f"| {size} | {dm:.1f} | {pm:.1f}{x(pm, dm)} | {do:.1f} | {po:.1f}{x(po, do)} |")
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines + ["", *checks, *where]) + "\n")
    print("\n".join(lines + ["", *checks, *where]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, from {','.join(MODELS)}; zoo_<name> for a sample-zoo model "
                         f"({','.join(ZOO)}) at its own input size, or zoo for all of them")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="comma-separated, e.g. flops0.5,flops0.5-auto,latency0.5")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of planning and measurement (default 1)")
    ap.add_argument("--ci", type=float, default=0.02, help="target relative half-width of the speed-up interval")
    ap.add_argument("--max-time", type=float, default=120.0, help="seconds of timed runs per measurement at most")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per model before the interval is checked")
    ap.add_argument("--profile", type=int, default=3, help="profiled runs per model after the timing (`graphprune "
                    "bench --profile`): where the time went, MAC ops against the rest (0: off)")
    ap.add_argument("--quantile", type=float, default=0.5, help="speed-ups compare this quantile (default p50)")
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "graphprune", "speedup"),
                    help="models, reports, latency cache and per-row results (resumable)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "speedup"))
    ap.add_argument("--fresh", action="store_true", help="re-run rows that already have results")
    ap.add_argument("--collect-only", action="store_true",
                    help="measure nothing: write --out from the rows already under --work (an interrupted run)")
    args = ap.parse_args(argv)
    models = [z for m in args.models.split(",") if m for z in (["zoo_" + n for n in ZOO] if m == "zoo" else [m])]
    for m in models:
        model_source(m)
    batches = [int(b) for b in args.batches.split(",") if b]
    budgets = [b for b in args.budgets.split(",") if b]
    for b in budgets:
        parse_budget(b)
    rows_dir = os.path.join(args.work, "rows")
    os.makedirs(rows_dir, exist_ok=True)
    log = os.path.join(args.work, "commands.log")
    import onnxruntime as ort

    from graphprune.latency import device_name

    env = {"cpu": device_name("cpu"), "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "onnxruntime": ort.__version__, "threads": args.threads, "ci": args.ci, "max_time": args.max_time,
           "quantile": args.quantile, "profile_runs": args.profile}
    t0 = time.perf_counter()
    for name in models:
        for batch in batches:
            for budget in budgets:
                path = os.path.join(rows_dir, f"{name}_b{batch}_{budget}.json")
                if args.collect_only or (os.path.exists(path) and not args.fresh):
                    continue
                t = time.perf_counter()
                try:
                    row = run_row(name, batch, budget, args, args.work, log)
                except RuntimeError as exc:
                    row = {"model": name, "batch": batch, "budget": budget, "error": str(exc)}
                row["seconds"] = round(time.perf_counter() - t, 1)
                with open(path + ".tmp", "w") as fh:
                    json.dump(row, fh, indent=2)
                os.replace(path + ".tmp", path)
                print(json.dumps({k: row[k] for k in ("model", "batch", "budget", "speedup", "efficiency", "seconds",
                                                      "error") if k in row}), flush=True)
    rows = []
    for name in models:  # every selected row with results, in a stable order (also from earlier runs)
        for batch in batches:
            for budget in budgets:
                path = os.path.join(rows_dir, f"{name}_b{batch}_{budget}.json")
                if os.path.exists(path):
                    row = json.load(open(path))
                    if "error" in row:
                        print(f"{name} b{batch} {budget}: {row['error']}", file=sys.stderr)
                    else:
                        rows.append(row)
    env["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    write_results(rows, args.out, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
