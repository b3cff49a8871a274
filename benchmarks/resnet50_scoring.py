"""Scoring cost on a ResNet-50-sized graph (25.5M parameters, 224x224, 128 calibration samples).

    python benchmarks/resnet50_scoring.py [--criteria taylor,fisher,kron-obs] [--samples 128]

Exports samples/resnet50.py (random weights: this measures time and memory, not accuracy), then runs
`graphprune prune --keep-flops 0.5` per criterion with random calibration images, and writes
benchmarks/results/resnet50_scoring.json. Peak RSS is read from /proc (Linux).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--criteria", default="taylor,fisher,kron-obs")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "resnet50_scoring.json"))
    args = ap.parse_args()
    import numpy as np
    import torch

    from converters.torch_to_onnx import export_module
    from samples.resnet50 import resnet50

    results = {}
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "resnet50.onnx")
        t = time.perf_counter()
        export_module(resnet50(), (torch.randn(1, 3, 224, 224),), model)
        results["export_s"] = round(time.perf_counter() - t, 1)
        calib = os.path.join(d, "calib.npz")
        np.savez(calib, input=np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
        for crit in args.criteria.split(","):
            rep = os.path.join(d, f"{crit}.json")
            cmd = [sys.executable, "-c",
                   "import resource,sys; from graphprune.cli import main; rc=main(sys.argv[1:]); "
                   "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)",
                   "prune", model, "-o", os.path.join(d, f"{crit}.onnx"), "--keep-flops", "0.5", "--criterion", crit,
                   "--calib", calib, "--samples", str(args.samples), "--batch-size", str(args.batch_size),
                   "--report", rep]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t
            entry = {"wall_s": round(wall, 1), "returncode": proc.returncode}
            for line in proc.stdout.splitlines():
                if line.startswith("PEAK_RSS_MB"):
                    entry["peak_rss_mb"] = int(line.split()[1])
            if proc.returncode == 0:
                r = json.load(open(rep))
                entry["timings"] = r["timings"]
                entry["macs_ratio"] = r["totals"]["macs_ratio"]
            else:
                entry["stderr"] = proc.stderr[-2000:]
            results[crit] = entry
            print(crit, json.dumps(entry), flush=True)
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "samples": args.samples, "batch_size": args.batch_size}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"env": env, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
