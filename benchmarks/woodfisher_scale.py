"""WoodFisher at the scale of real networks (issue #14): block size, time and peak memory per model.

    python benchmarks/woodfisher_scale.py [--models resnet18,resnet50,mobilenet_v2] [--samples 128]
                                          [--max-memory 8G] [--block-size C] [--criterion woodfisher]

Exports ResNet-18 / MobileNetV2 (samples/imagenet.py) and ResNet-50 (samples/resnet50.py) at
1x3x224x224 with random weights (this measures cost, not accuracy), writes random calibration images,
then runs `graphprune prune --keep-flops 0.5 --criterion woodfisher` per model in a fresh subprocess,
whose peak RSS (resource.getrusage ru_maxrss: torch's allocations included, unlike tracemalloc) is
the figure recorded. The block size is the one the run chose from --max-memory (or --block-size),
read from the report. The load average before and after each run is recorded: on a shared machine,
wall times depend on it. Writes benchmarks/results/woodfisher_scale.{json,md}.
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

MODELS = {"resnet18": ("samples.imagenet", "resnet18"), "resnet50": ("samples.resnet50", "resnet50"),
          "mobilenet_v2": ("samples.imagenet", "mobilenet_v2")}


def mem_available_gib() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--criterion", default="woodfisher")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-memory", default="8G", help="passed to prune (empty: the default, 80%% of available RAM)")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "woodfisher_scale"))
    args = ap.parse_args()
    import importlib

    import numpy as np
    import torch

    from converters.torch_to_onnx import export_module
    from graphprune.pipeline import PruneConfig

    results = {}
    with tempfile.TemporaryDirectory() as d:
        calib = os.path.join(d, "calib.npz")
        np.savez(calib, input=np.random.default_rng(0).standard_normal((args.samples, 3, 224, 224)).astype(np.float32))
        for name in args.models.split(","):
            mod, fn = MODELS[name]
            model = os.path.join(d, f"{name}.onnx")
            net = getattr(importlib.import_module(mod), fn)()
            export_module(net, (torch.randn(1, 3, 224, 224),), model)
            params = sum(p.numel() for p in net.parameters())
            del net
            rep = os.path.join(d, f"{name}.json")
            cmd = [sys.executable, "-c",
                   "import resource,sys; from graphprune.cli import main; rc=main(sys.argv[1:]); "
                   "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)",
                   "-q", "prune", model, "-o", os.path.join(d, f"{name}_pruned.onnx"), "--keep-flops", "0.5",
                   "--criterion", args.criterion, "--calib", calib, "--samples", str(args.samples),
                   "--batch-size", str(args.batch_size), "--report", rep]
            if args.max_memory:
                cmd += ["--max-memory", args.max_memory]
            if args.block_size:
                cmd += ["--block-size", str(args.block_size)]
            if "recover" in PruneConfig.__dataclass_fields__:
                cmd += ["--recover", "0"]  # scoring cost only, no distillation afterwards
            load0, avail0 = os.getloadavg(), mem_available_gib()
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t
            entry = {"params": params, "wall_s": round(wall, 1), "returncode": proc.returncode,
                     "loadavg_before": [round(x, 2) for x in load0],
                     "loadavg_after": [round(x, 2) for x in os.getloadavg()], "mem_available_gib_before": avail0}
            for line in proc.stdout.splitlines():
                if line.startswith("PEAK_RSS_MB"):
                    entry["peak_rss_mb"] = int(line.split()[1])
            if proc.returncode == 0:
                r = json.load(open(rep))
                entry.update(block_size=r.get("block_size"), timings=r["timings"],
                             macs_ratio=round(r["totals"]["macs_ratio"], 4),
                             verified=r["verification"]["ok"], compensation=r.get("compensation"))
            else:
                entry["stderr"] = proc.stderr[-2000:]
            results[name] = entry
            print(name, json.dumps(entry), flush=True)
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "criterion": args.criterion, "samples": args.samples, "batch_size": args.batch_size,
           "max_memory": args.max_memory or "default (80% of available RAM)", "block_size": args.block_size,
           "input": "1x3x224x224, random weights and random calibration images"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"env": env, "results": results}, fh, indent=2)
    with open(args.out + ".md", "w") as fh:
        fh.write(f"# WoodFisher at scale ({args.criterion}, {args.samples} calibration images at 224x224, "
                 f"--max-memory {env['max_memory']})\n\n")
        fh.write(f"{env['cpu_count']} CPU cores, torch {env['torch']}; shared machine: the load average "
                 "(1/5/15 min) before and after each run is given, wall times depend on it.\n\n")
        fh.write("| model | params | block size | statistics s | score s | compensate s | total wall s | "
                 "peak RSS | load before → after | verified |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for name, e in results.items():
            tm = e.get("timings", {})
            fh.write(f"| {name} | {e['params'] / 1e6:.1f}M | {e.get('block_size')} | {tm.get('statistics', 0):.0f} | "
                     f"{tm.get('score', 0):.0f} | {tm.get('compensate', 0):.0f} | {e['wall_s']:.0f} | "
                     f"{e.get('peak_rss_mb', 0) / 1024:.2f} GiB | {e['loadavg_before'][0]} → {e['loadavg_after'][0]} | "
                     f"{e.get('verified', 'failed: rc %d' % e['returncode'])} |\n")


if __name__ == "__main__":
    main()
