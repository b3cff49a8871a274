"""Measured speed-up vs MACs reduction on this machine's CPU provider (issue: latency checks).

    python benchmarks/latency_cpu.py [--models resnet_basic,mobilenet_v2] [--batch 8] [--runs 60]

For each sample model (exported with the TorchScript exporter) it prunes with magnitude to
--keep-flops 0.75 / 0.5 / 0.3, each with and without --round-to 8, and with --keep-latency 0.7 / 0.5,
then times dense vs pruned interleaved (graphprune.bench) at the batch size and records
speed-up, MACs reduction and their ratio, and for --keep-latency how far the measured latency lands
from the requested one. Results: benchmarks/results/latency_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet_basic,mobilenet_v2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "latency_cpu"))
    args = ap.parse_args()
    import onnxruntime as ort
    import torch

    from converters.torch_to_onnx import export_module
    from graphprune import log
    from graphprune.bench import benchmark
    from graphprune.io import load_model
    from graphprune.pipeline import PruneConfig, prune
    from graphprune.planner import Budget
    from samples import zoo

    log.set_quiet(True)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        cache = os.path.join(d, "latency.json")
        for name in args.models.split(","):
            src = os.path.join(d, f"{name}.onnx")
            export_module(zoo.make(name), (zoo.example_input(name, 1, 0),), src)
            runs = [("flops", r, rt) for r in (0.75, 0.5, 0.3) for rt in (1, 8)] + [("latency", r, 1) for r in (0.7, 0.5)]
            for kind, ratio, round_to in runs:
                out = os.path.join(d, f"{name}_{kind}{ratio}_{round_to}.onnx")
                cfg = PruneConfig(budget=Budget(kind, ratio, round_to=round_to, best_effort=True), force=True,
                                  latency_batch=args.batch, latency_cache=cache)
                rep = prune(src, out, cfg)
                res = benchmark([("dense", load_model(src)), ("pruned", load_model(out))], batches=(args.batch,),
                                runs=args.runs, warmup=10)
                p50 = {r["model"]: r["p50_ms"] for r in res["results"]}
                speedup = p50["dense"] / p50["pruned"]
                macs_red = 1 / rep["totals"]["macs_ratio"]
                row = {"model": name, "budget": f"--keep-{kind} {ratio}" + (f" --round-to {round_to}" if round_to > 1 else ""),
                       "macs_ratio": rep["totals"]["macs_ratio"], "dense_p50_ms": p50["dense"],
                       "pruned_p50_ms": p50["pruned"], "speedup": speedup, "macs_reduction": macs_red,
                       "speedup_per_macs_reduction": speedup / macs_red}
                if kind == "latency":
                    lat = rep["latency"]
                    row.update({"target_ms": lat["target_ms"], "planner_measured_ms": lat["measured_ms"],
                                "predicted_ms": lat["predicted_ms"],
                                "landing_error": p50["pruned"] / (ratio * p50["dense"]) - 1,
                                "planner_landing_error": lat["measured_ms"] / lat["target_ms"] - 1})
                rows.append(row)
                print(json.dumps(row), flush=True)
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "onnxruntime": ort.__version__, "batch": args.batch, "runs": args.runs,
           "seconds": round(time.perf_counter() - t0, 1)}
    with open(args.out + ".json", "w") as fh:
        json.dump({"env": env, "rows": rows}, fh, indent=2)
    lines = [f"Measured on {env['cpu_count']}-core CPU, onnxruntime {env['onnxruntime']} CPUExecutionProvider, "
             f"batch {args.batch}, {args.runs} interleaved runs; `python benchmarks/latency_cpu.py`.", "",
             "| model | budget | MACs kept | dense p50 ms | pruned p50 ms | speed-up | MACs reduction | speed-up / MACs reduction | latency landing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        landing = f"{r['landing_error']:+.1%}" if "landing_error" in r else ""
        lines.append(f"| {r['model']} | {r['budget']} | {r['macs_ratio']:.1%} | {r['dense_p50_ms']:.3f} | "
                     f"{r['pruned_p50_ms']:.3f} | x{r['speedup']:.2f} | x{r['macs_reduction']:.2f} | "
                     f"{r['speedup_per_macs_reduction']:.2f} | {landing} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
