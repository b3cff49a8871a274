"""Prune every producer-style sample (samples/producers.py) at its real input size.

    python benchmarks/producers.py [--keep-flops 0.7] [--extra MODEL.onnx=1,3,640,640 ...]

For each model (paddle2onnx detector at 640x640 and recogniser at 48x320, the Caffe2-era model-zoo
file at opsets 7 and 9, YOLOv8 at 640x640 from the dynamic and the static export, tf2onnx at its
NHWC size, and any `--extra` file, e.g. real exported models you have on disk) it runs
`graphprune prune MODEL -o OUT --keep-flops F --input-shape SIZE --report R` in a subprocess and
records: MACs before/after as graphprune reports them and as counted independently from
onnxruntime's produced shapes (tests/macs.py), parameters, the sizes verification ran at and its
max relative error, prunable/frozen groups, wall time and the child's peak resident memory.
Results: benchmarks/results/producers.json and producers.md.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The orchestrating process imports nothing heavy (no torch, no onnxruntime): a child's peak RSS
# as the kernel reports it starts from its parent's at fork, so models are built and MACs counted
# in helper subprocesses and the measured `graphprune prune` child starts from a small parent.
SAMPLES = [  # name, builder, kwargs, real size (None: the model's own static size)
    ("paddle_det (paddle2onnx, opset 11)", "paddle_det", {}, [1, 3, 640, 640]),
    ("paddle_rec (paddle2onnx, opset 11)", "paddle_rec", {}, [1, 3, 48, 320]),
    ("caffe2_zoo (opset 7)", "caffe2_zoo", {"opset": 7}, None),
    ("caffe2_zoo (opset 9)", "caffe2_zoo", {"opset": 9}, None),
    ("yolov8 (dynamic export, opset 12)", "yolov8", {"dynamic": True}, [1, 3, 640, 640]),
    ("yolov8 (static export, opset 17)", "yolov8", {"dynamic": False, "opset": 17}, None),
    ("tf2onnx_cnn (NHWC, dynamic H/W)", "tf2onnx_cnn", {"dynamic": True}, [1, 32, 32, 3]),
]


def _helper(mode: str, payload: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, f"--{mode}", json.dumps(payload)], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{mode} helper failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _build(payload: dict) -> dict:
    import onnx

    from samples import producers

    model, _ = getattr(producers, payload["builder"])(**payload["kwargs"])
    onnx.save(model, payload["path"])
    return {"ok": True}


def _count(payload: dict) -> dict:
    from tests.macs import count_macs

    shapes = {k: tuple(v) for k, v in payload["shapes"].items()}
    return {"before": count_macs(payload["original"], shapes), "after": count_macs(payload["pruned"], shapes)}


def run_one(name: str, path: str, size, keep: float, work: str) -> dict:
    out, rep = os.path.join(work, "out.onnx"), os.path.join(work, "rep.json")
    cmd = [sys.executable, "-m", "graphprune.cli", "-q", "prune", path, "-o", out, "--keep-flops", str(keep),
           "--report", rep, "--force"]
    if size:
        cmd += ["--input-shape", ",".join(map(str, size))]
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (peak RSS in KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    wall = time.perf_counter() - t
    row = {"model": name, "command": " ".join(["graphprune", *cmd[4:]]).replace(path, Path(path).name),
           "exit": proc.returncode, "wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if proc.returncode != 0:
        row["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else "?"
        return row
    report = json.loads(Path(rep).read_text())
    t = report["totals"]
    counted = _helper("count", {"original": path, "pruned": out, "shapes": report["input_shapes"]})
    ind_before, ind_after = counted["before"], counted["after"]
    groups = report["groups"]
    row.update({
        "input_shapes": report["input_shapes"], "opset_upgraded": report.get("opset_upgraded"),
        "macs_before": t["macs_before"], "macs_after": t["macs_after"], "macs_ratio": t["macs_ratio"],
        "macs_before_independent": ind_before, "macs_after_independent": ind_after,
        "macs_ratio_independent": ind_after / ind_before,
        "params_before": t["params_before"], "params_after": t["params_after"],
        "groups": len(groups), "prunable_groups": sum(g["prunable"] for g in groups),
        "frozen_reasons": sorted({r for g in groups for r in g["frozen"]}),
        "verification_sizes": report["verification"]["sizes"],
        "max_rel_error": report["verification"]["max_rel_error"],
        "timings": report["timings"],
    })
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-flops", type=float, default=0.7)
    ap.add_argument("--extra", action="append", default=[], metavar="MODEL.onnx=1,3,640,640",
                    help="also prune this file at this size (not shipped; e.g. a real exported model)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "producers"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        jobs = []
        for name, builder, kwargs, size in SAMPLES:
            path = os.path.join(work, name.split()[0] + f"_{len(jobs)}.onnx")
            _helper("build", {"builder": builder, "kwargs": kwargs, "path": path})
            jobs.append((name, path, size))
        for spec in args.extra:
            path, _, size = spec.partition("=")
            jobs.append((Path(path).name + " (--extra)", path, [int(d) for d in size.split(",")] if size else None))
        for name, path, size in jobs:
            print(f"{name} ...", flush=True)
            row = run_one(name, path, size, args.keep_flops, work)
            rows.append(row)
            if row["exit"] == 0:
                print(f"  MACs {row['macs_before'] / 1e6:.1f}M -> {row['macs_after'] / 1e6:.1f}M "
                      f"({row['macs_ratio']:.3f}; independent {row['macs_ratio_independent']:.3f}), "
                      f"max rel error {row['max_rel_error']:.2e}, {row['wall_s']} s", flush=True)
            else:
                print(f"  exit {row['exit']}: {row.get('error')}", flush=True)
    result = {"keep_flops": args.keep_flops, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
              "python": platform.python_version()}, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| model | input size | MACs before | MACs after | ratio (independent count) | prunable / groups | "
             "verified at | max rel error | wall s | peak RSS MiB |", "|" + "---|" * 10]
    for r in rows:
        if r["exit"] != 0:
            lines.append(f"| {r['model']} | | | | exit {r['exit']}: {r.get('error')} | | | | {r['wall_s']} | |")
            continue
        size = "; ".join("x".join(map(str, v)) for v in r["input_shapes"].values())
        at = "; ".join("x".join(map(str, v[1:])) for s in r["verification_sizes"] for v in s.values())
        at = ", ".join(dict.fromkeys(at.split("; ")))
        lines.append(f"| {r['model']} | {size} | {r['macs_before'] / 1e6:.1f}M | {r['macs_after'] / 1e6:.1f}M | "
                     f"{r['macs_ratio']:.3f} ({r['macs_ratio_independent']:.3f}) | {r['prunable_groups']} / {r['groups']} | "
                     f"{at} | {r['max_rel_error']:.1e} | {r['wall_s']} | {r['peak_rss_mib']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--build", "--count"):
        fn = _build if sys.argv[1] == "--build" else _count
        print(json.dumps(fn(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(main())
