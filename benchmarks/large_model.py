"""Prune a synthetic ONNX model larger than 2 GB (weights in an external data file) end to end.

    python benchmarks/large_model.py [--hidden 12288] [--layers 4] [--dir /tmp/gp_large] [--keep]

Builds x[N, 4096] -> Gemm(4096 -> H) -> Relu -> (Gemm(H -> H) -> Relu) x (layers - 1) -> Gemm(H -> 1000)
with random float32 weights streamed into `large.onnx.data` (never more than one layer in memory),
then runs `graphprune prune large.onnx -o pruned.onnx --keep-channels 0.5` (verification on) in a
subprocess and records its peak resident memory (getrusage of the child) and wall time in
benchmarks/results/large_model.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
IN_FEATURES, CLASSES = 4096, 1000


def build(path: str | os.PathLike, hidden: int = 12288, layers: int = 5, seed: int = 0) -> dict:
    """Write the model with external data (location `<name>.data`); returns sizes."""
    path = Path(path)
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    widths = [IN_FEATURES] + [hidden] * layers + [CLASSES]
    nodes, inits, params = [], [], 0
    x = "x"
    with open(path.parent / data_name, "wb") as fh:
        for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:])):
            w = rng.standard_normal((fout, fin), dtype=np.float32)
            w *= np.float32(1.0 / np.sqrt(fin))
            t = TensorProto(name=f"fc{i}.weight", dims=[fout, fin], data_type=TensorProto.FLOAT,
                            data_location=TensorProto.EXTERNAL)
            offset = fh.tell()
            fh.write(w.tobytes())
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                t.external_data.add(key=key, value=value)
            params += w.size + fout
            del w
            inits += [t, numpy_helper.from_array((0.01 * rng.standard_normal(fout)).astype(np.float32), f"fc{i}.bias")]
            y = f"h{i}" if i < len(widths) - 2 else "logits"
            nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [y], name=f"fc{i}", transB=1))
            if i < len(widths) - 2:
                nodes.append(helper.make_node("Relu", [y], [f"r{i}"], name=f"relu{i}"))
                y = f"r{i}"
            x = y
    graph = helper.make_graph(nodes, "large",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN_FEATURES])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    data_bytes = (path.parent / data_name).stat().st_size
    return {"params": int(params), "data_bytes": int(data_bytes), "hidden": hidden, "layers": layers}


def run_graphprune(*args: str, timeout: float = 1800) -> dict:
    """`graphprune ARGS` in a child process: exit code, stderr, wall time and the child's peak RSS."""
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "dt = time.perf_counter() - t\n"
            "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
            "print(r.returncode, dt, rss)\n"
            "sys.stderr.write(r.stderr)\n")
    cmd = [sys.executable, "-m", "graphprune.cli", "-q", *map(str, args)]
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env={**os.environ, "GRAPHPRUNE_QUIET": "1"})
    rc, seconds, rss_kb = r.stdout.split()[-3:]
    return {"rc": int(rc), "seconds": round(float(seconds), 1), "peak_rss_mb": round(int(rss_kb) / 1024),
            "stderr": r.stderr, "command": " ".join(["graphprune", *cmd[4:]])}


def run_prune(src, out, *extra: str, timeout: float = 1800) -> dict:
    """`graphprune prune SRC -o OUT EXTRA...` measured by run_graphprune (paths shown as DIR)."""
    res = run_graphprune("prune", src, "-o", out, *extra, timeout=timeout)
    res["command"] = res["command"].replace(str(Path(src).parent), "DIR")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=12288)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/gp_large")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "large_model.json"))
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    info = build(d / "large.onnx", args.hidden, args.layers)
    info["build_seconds"] = round(time.perf_counter() - t, 1)
    res = run_prune(d / "large.onnx", d / "pruned.onnx", "--keep-channels", "0.5", "--force",
                    "--report", str(d / "report.json"))
    if res["rc"] != 0:
        raise SystemExit(f"prune failed ({res['rc']}): {res['stderr']}")
    report = json.loads((d / "report.json").read_text())
    out_files = {p.name: p.stat().st_size for p in d.iterdir() if p.name.startswith("pruned")}
    result = {**info, **{k: v for k, v in res.items() if k not in ("stderr", "rc")},
              "output_files": out_files, "verification": report.get("verification"),
              "timings": report.get("timings"), "params_after": report["totals"]["params_after"],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
              "peak_rss_of": "the graphprune child process (getrusage RUSAGE_CHILDREN ru_maxrss)",
              "peak_rss_over_weights": round(res["peak_rss_mb"] * 2**20 / info["data_bytes"], 2)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
