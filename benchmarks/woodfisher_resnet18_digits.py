"""WoodFisher on the network the row-block version refused (issue 14): a ResNet-18 (torchvision
definition, samples/imagenet.py) trained on digits at 32x32, pruned one-shot with woodfisher.

    python benchmarks/woodfisher_resnet18_digits.py [--epochs 15] [--budgets 0.5,0.3]
        [--criteria woodfisher,woodfisher:0.1,woodfisher/obs,woodfisher/none,taylor,fisher] [--samples 256] [--work DIR] [--threads 1]

1. Trains ResNet18(num_classes=10) on the held-out digits data (samples/heldout.py: 1300 training
   images upsampled to 3x32x32; samples/digits.py's train: Adam, OneCycle, seed 0), exports it
   (TorchScript exporter, opset 17, dynamic batch) to --work; skipped when the export is there.
2. Shows that whole-row blocks (the row-block version's per-row inverses, ``--block-size`` larger
   than any row) are refused by the up-front memory estimate, with the one-line error recorded.
3. Per criterion and budget: ``graphprune prune --keep-flops F --recover 0 --calib C --eval T`` in
   a fresh process, with the default ``--max-memory`` (WoodFisher's block size chosen from it),
   labelled calibration (samples/heldout_calib.npz, 256 images), accuracy on the 497 images of
   samples/heldout_test.npz. Records accuracy, MACs reached, block size, wall time, peak RSS.
   ``NAME:D`` runs criterion NAME with ``--damping D``, ``NAME/M`` with ``--compensate M`` (``NAME/none``: ``--no-compensate``).

Resumable: each cell's row is kept in --work (cell_*.json) and reused unless --fresh.

Writes --out.json and --out.md (default benchmarks/results/woodfisher_resnet18_digits).
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


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("GRAPHPRUNE_QUIET", None)
    return env


def train_and_export(work: str, epochs: int, threads: int) -> dict:
    import torch

    from samples.digits import accuracy, train
    from samples.heldout import export, load_data
    from samples.imagenet import ResNet18

    onnx_path = os.path.join(work, "digits_resnet18.onnx")
    meta_path = os.path.join(work, "digits_resnet18.json")
    if os.path.exists(onnx_path) and os.path.exists(meta_path):
        return json.load(open(meta_path))
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data(0)
    torch.manual_seed(0)
    model = ResNet18(num_classes=10)
    t0 = time.time()
    model = train(model, x_tr, y_tr, epochs=epochs, lr=3e-3, seed=0)
    secs = time.time() - t0
    with torch.no_grad():
        acc = accuracy(model(torch.from_numpy(x_te)).numpy(), y_te)
    export(model, torch.from_numpy(x_te[:1]), onnx_path)
    meta = {"onnx": onnx_path, "epochs": epochs, "train_seconds": round(secs, 1), "torch_accuracy": acc,
            "params": int(sum(p.numel() for p in model.parameters()))}
    json.dump(meta, open(meta_path, "w"), indent=1)
    print(f"trained ResNet-18 on digits 32x32: {epochs} epochs in {secs:.0f}s, test accuracy {acc:.4f}",
          flush=True)
    return meta


def prune_cell(model: str, criterion: str, budget: float, args, extra=()) -> dict:
    tag = "_".join([criterion, str(budget), str(args.samples), *extra])
    cached = os.path.join(args.work, f"cell_{tag}.json")
    if os.path.exists(cached) and not args.fresh:
        return json.load(open(cached))
    row = _prune_cell(model, criterion, budget, args, tag, extra)
    json.dump(row, open(cached, "w"), indent=1)
    return row


def _prune_cell(model: str, criterion: str, budget: float, args, tag: str, extra) -> dict:
    out = os.path.join(args.work, f"r18_{tag}.onnx")
    report = os.path.join(args.work, f"r18_{tag}.json")
    cmd = [sys.executable, "-m", "graphprune.cli", "prune", model, "-o", out, "--keep-flops", str(budget),
           "--criterion", criterion, "--recover", "0", "--calib", os.path.join(ROOT, "samples/heldout_calib.npz"),
           "--eval", os.path.join(ROOT, "samples/heldout_test.npz"), "--samples", str(args.samples),
           "--force", "--report", report, *extra]
    # the child's peak RSS: run it under a tiny wrapper that reports ru_maxrss of its child
    wrapper = ("import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);"
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr);"
               "sys.exit(r.returncode)")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=ROOT,
                         env=child_env(args.threads))
    secs = time.perf_counter() - t0
    peak = next((int(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("PEAK_RSS_KB")]
    row = {"criterion": criterion, "budget": budget, "extra": list(extra), "seconds": round(secs, 1),
           "peak_rss_gib": round(peak / 2**20, 2), "returncode": res.returncode}
    if res.returncode != 0:
        row["error"] = err_lines[-1] if err_lines else ""
        return row
    rep = json.load(open(report))
    acc = rep.get("accuracy") or {}
    row.update({"accuracy": acc.get("after"), "dense": acc.get("before"), "macs_ratio": rep["totals"]["macs_ratio"],
                "block_size": (rep.get("scoring") or {}).get("block_size", rep.get("block_size"))})
    if row["block_size"] is None:  # wherever the report keeps it
        row["block_size"] = _find(rep, "block_size")
    return row


def _find(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            r = _find(v, key)
            if r is not None:
                return r
    elif isinstance(obj, list):
        for v in obj:
            r = _find(v, key)
            if r is not None:
                return r
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--budgets", default="0.5,0.3")
    ap.add_argument("--criteria", default="woodfisher,woodfisher:0.1,woodfisher/obs,woodfisher/none,taylor,fisher",
                    help="comma-separated; NAME:D adds --damping D, NAME/M --compensate M (NAME/none: --no-compensate)")
    ap.add_argument("--samples", type=int, default=256, help="calibration samples (default all 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "graphprune", "woodfisher_r18"))
    ap.add_argument("--fresh", action="store_true", help="re-run cells that have a kept row")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "woodfisher_resnet18_digits"))
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    t_all = time.perf_counter()
    meta = train_and_export(args.work, args.epochs, args.threads)
    rows = []
    # the row-block version: one block per row (a block size above every row's length)
    rb = prune_cell(meta["onnx"], "woodfisher", 0.5, args, extra=("--block-size", "100000000"))
    rb["what"] = "whole-row blocks (the row-block version)"
    print(json.dumps(rb), flush=True)
    rows.append(rb)
    for spec in args.criteria.split(","):
        spec, _, comp = spec.partition("/")
        crit, _, damping = spec.partition(":")
        extra = (("--damping", damping) if damping else ()) + (
            (("--no-compensate",) if comp == "none" else ("--compensate", comp)) if comp else ())
        for b in (float(x) for x in args.budgets.split(",")):
            r = prune_cell(meta["onnx"], crit, b, args, extra=extra)
            print(json.dumps(r), flush=True)
            rows.append(r)
    import onnxruntime
    import torch

    env = {"machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}",
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "threads": args.threads,
           "command": "python benchmarks/woodfisher_resnet18_digits.py " + " ".join(argv or sys.argv[1:]),
           "seconds": round(time.perf_counter() - t_all, 1)}
    json.dump({"env": env, "model": meta, "rows": rows}, open(args.out + ".json", "w"), indent=1)
    lines = ["# WoodFisher on a digits ResNet-18 (32x32): the model the row-block version refused", "",
             f"`{env['command']}` on {env['machine']}, torch {env['torch']}, {args.threads} thread(s), "
             f"{env['seconds']:.0f} s this run (cells kept in --work from earlier runs are reused; each row's own wall time is in the table). ResNet18(num_classes=10) (samples/imagenet.py, torchvision's definition) "
             f"trained {meta['epochs']} epochs on samples/heldout.py's data ({meta['params']:,} params, test accuracy "
             f"{meta['torch_accuracy']:.4f}); one-shot (`--recover 0`), {args.samples} labelled calibration images "
             f"(samples/heldout_calib.npz), accuracy on samples/heldout_test.npz (497 images), default `--max-memory`.",
             "", "| criterion | budget | accuracy | MACs kept | block size | wall s | peak RSS GiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("what", "")
        if r["returncode"] != 0:
            note = (note + ": " if note else "") + "refused: " + r.get("error", "").replace("|", "/")
        acc = f"{r['accuracy']:.4f}" if r.get("accuracy") is not None else "-"
        macs = f"{r['macs_ratio']:.3f}" if r.get("macs_ratio") is not None else "-"
        crit = " ".join([r["criterion"], *r["extra"]]) if r["extra"] and r["extra"][0] != "--block-size" else r["criterion"]
        lines.append(f"| {crit} | {r['budget']} | {acc} | {macs} | {r.get('block_size') or '-'} | "
                     f"{r['seconds']} | {r['peak_rss_gib']} | {note} |")
    open(args.out + ".md", "w").write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
