"""Where the time of curvature scoring goes (issue #11, point 1).

    python benchmarks/scoring_cost.py [--models resnet50,mobilenet_v2,vit,vit224,ocr] [--samples 128]
                                      [--criteria taylor,fisher,kron-obd,kron-obs,woodfisher,eigendamage]

For every model, on the same calibration inputs and in a fresh subprocess per measurement (peak
memory = ``resource.getrusage`` maxrss of that process, which includes the interpreter, torch and the
loaded model: ``base_rss_mb`` is the resident size right before the measured work starts):

(a) ``executor``: a plain PyTorch forward + backward of the ONNX->PyTorch executor (TorchGraph built as
    the statistics build it: layer weights and biases trainable, weights shared with the graph),
    over all samples in mini-batches, a scalar loss on the outputs, no recorder;
(b) ``native``: the same network as a PyTorch module (samples/ defines each model; the ONNX file is
    the TorchScript export of that very module, so the weights are the same; BatchNorm stays a module
    in eval mode where the export folded it into the conv);
(c) ``stats:<criterion>``: graphprune's own code path (pipeline.collect_statistics with the criterion's
    needs and those of its default compensation, for the layers the criterion scores, as the score
    stage calls it; then the criterion's score; eigendamage: the K-FAC statistics of every layer and
    the eigendecompositions), plus ``fisher-nocomp`` (fisher's statistics alone) and the OBS
    compensation of a --keep-flops 0.5 plan (``compensate_s``). ``fisher-obsA`` (asked for by name):
    fisher with the ``kfac_a`` need only, which is what fisher's default compensation asks for since
    f0592f9 (rows of earlier runs).

Writes benchmarks/results/scoring_cost.{json,md}: seconds, peak memory, and the ratios (c)/(a) and
(a)/(b). The machine's load average is recorded before and after each measurement: on a shared
machine the figures are noisy, the ratios less so (both sides of a ratio ran minutes apart).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CRITERIA = ("taylor", "fisher", "kron-obd", "kron-obs", "woodfisher", "eigendamage")
MODELS = ("resnet50", "mobilenet_v2", "vit", "vit224", "ocr")
DESCRIPTION = {
    "resnet50": "ResNet-50 (samples/resnet50.py), 3x224x224, 1000 classes, random weights",
    "mobilenet_v2": "MobileNetV2 x0.5 (samples/heldout.py, trained), 3x32x32, 10 classes",
    "vit": "digits ViT (samples/digits_transformers.py, trained), 1x8x8, dim 32, 2 blocks",
    "vit224": "ViT (samples/transformers.py ViT), 3x224x224, patch 16, dim 192, 6 blocks, 4 heads, random",
    "ocr": "OCR recogniser (samples/ocr.py), 3x48x320 -> 40x6625 softmax, random weights",
}


# ------------------------------------------------------------------ models
def native_module(name: str):
    import torch

    if name == "resnet50":
        from samples.resnet50 import resnet50

        return resnet50()
    if name == "mobilenet_v2":
        from samples.heldout import heldout_mobilenet_v2

        m = heldout_mobilenet_v2()
        m.load_state_dict(torch.load(os.path.join(ROOT, "samples", "heldout_mobilenet_v2.pt")))
        return m.eval()
    if name == "vit":
        from samples.digits_transformers import digits_vit

        m = digits_vit()
        m.load_state_dict(torch.load(os.path.join(ROOT, "samples", "digits_vit.pt")))
        return m.eval()
    if name == "vit224":
        from samples.transformers import ViT

        torch.manual_seed(0)
        return ViT(img=224, patch=16, in_ch=3, dim=192, depth=6, heads=4, mlp_ratio=4.0, num_classes=1000).eval()
    if name == "ocr":
        from samples.ocr import ocr_recognizer

        return ocr_recognizer()
    raise SystemExit(f"unknown model {name!r}")


def input_shape(name: str) -> tuple[int, ...]:
    return {"resnet50": (3, 224, 224), "mobilenet_v2": (3, 32, 32), "vit": (1, 8, 8), "vit224": (3, 224, 224),
            "ocr": (3, 48, 320)}[name]


def prepare(name: str, folder: str, samples: int) -> tuple[str, str]:
    """Export the module (TorchScript, dynamic batch) unless samples/ ships it; random calibration
    inputs (the shipped calibration images for the digits / held-out models)."""
    import numpy as np
    import torch

    from converters import export_module

    calib = os.path.join(folder, f"{name}_calib.npz")
    shipped = {"mobilenet_v2": ("heldout_mobilenet_v2.onnx", "heldout_calib.npz"),
               "vit": ("digits_vit.onnx", "digits_calib.npz")}
    if name in shipped:
        path = os.path.join(ROOT, "samples", shipped[name][0])
        arrays = np.load(os.path.join(ROOT, "samples", shipped[name][1]))
        x = arrays[[k for k in arrays.files if k != "labels"][0]]
        reps = -(-samples // len(x))
        np.savez(calib, input=np.concatenate([x] * reps)[:samples].astype(np.float32))
        return path, calib
    path = os.path.join(folder, f"{name}.onnx")
    x = torch.randn(1, *input_shape(name))
    export_module(native_module(name), (x,), path, exporter="torchscript", dynamic_batch=True)
    rng = np.random.default_rng(0)
    np.savez(calib, input=rng.standard_normal((samples, *input_shape(name))).astype(np.float32))
    return path, calib


# ------------------------------------------------------------------ one measurement (subprocess)
def _rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _plain_loss(outs):
    return sum(o.float().square().mean() for o in outs if o.is_floating_point() and o.requires_grad)


def _cpu() -> float:
    """CPU seconds of this process (all threads): on a shared machine, steadier than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _passes(entry: dict, loss_fn, module, batches) -> dict:
    """Two timed passes over the batches: "seconds" the first (cold: lazy initialisation, allocator
    warm-up; what a one-shot statistics run pays), "warm_s" the second; "cpu_s" / "warm_cpu_s" the
    CPU seconds of each."""
    for key in ("seconds", "warm_s"):
        t, c = time.perf_counter(), _cpu()
        for xb in batches:
            module.zero_grad(set_to_none=True)
            loss_fn(xb).backward()
        entry[key] = time.perf_counter() - t
        entry["cpu_s" if key == "seconds" else "warm_cpu_s"] = _cpu() - c
    return entry


def measure(kind: str, name: str, onnx_path: str, calib: str, samples: int, batch: int) -> dict:
    import numpy as np
    import torch

    from graphprune import log

    log.set_quiet(True)
    x = np.load(calib)["input"][:samples]
    batches = [torch.from_numpy(np.ascontiguousarray(x[s:s + batch])) for s in range(0, len(x), batch)]
    entry: dict = {"kind": kind}
    if kind == "native":
        model = native_module(name)
        for p in model.parameters():
            p.requires_grad_(True)
        entry["base_rss_mb"] = round(_rss_mb())
        return _passes(entry, lambda xb: _plain_loss([model(xb)]), model, batches)
    from graphprune.criteria import ScoringContext, make_criterion
    from graphprune.pipeline import PruneConfig, collect_statistics, load_and_trace
    from graphprune.stages.score import compensation_method as _compensation_method, needs_of as _needs
    from graphprune.planner import Budget, make_plan

    t = time.perf_counter()
    model, tr = load_and_trace(onnx_path, calib=calib)
    entry["trace_s"] = time.perf_counter() - t
    if kind == "executor":
        from converters.onnx_to_torch import TorchGraph
        from graphprune.curvature.layers import layer_views

        t, c = time.perf_counter(), _cpu()
        views = layer_views(tr.graph, tr.state)
        tg = TorchGraph(tr.graph, trainable=[n for v in views.values() for n in (v.weight, v.bias) if n],
                        share_weights=True)
        entry["build_s"], entry["build_cpu_s"] = time.perf_counter() - t, _cpu() - c
        names = tg.input_names
        entry["base_rss_mb"] = round(_rss_mb())
        entry = _passes(entry, lambda xb: _plain_loss(tg(**{names[0]: xb})), tg, batches)
        entry["cpu_s"] += entry.pop("build_cpu_s")
        entry["seconds"] += entry.pop("build_s")  # cold, as the statistics pay it: build + first pass
        return entry
    crit_name = kind.split(":", 1)[1]
    base = crit_name.replace("-nocomp", "").replace("-obsA", "")
    config = PruneConfig(criterion=base, budget=Budget("flops", 0.5), calib=calib,
                         samples=samples, batch_size=batch, compensate=False if crit_name.endswith("-nocomp") else None)
    timings: dict = {}
    ctx = ScoringContext(tr)
    entry["base_rss_mb"] = round(_rss_mb())
    if config.criterion == "eigendamage":
        from graphprune import eigendamage as ed

        c = _cpu()
        meta = collect_statistics(model, tr, ctx, config, {"kfac"}, timings)
        entry["statistics_s"], entry["statistics_cpu_s"] = timings["statistics"], _cpu() - c
        t = time.perf_counter()
        nodes = {n.name: n for n in tr.graph.nodes}
        views = {n: v for n, v in ctx.views.items() if v.groups == 1 and ctx.stats.layers[n].n > 0
                 and float(nodes[n].attrs.get("alpha", 1.0)) == 1.0 and float(nodes[n].attrs.get("beta", 1.0)) == 1.0
                 and len(tr.graph.tensors()[v.weight].outputs) == 1}
        ctx.views = views
        for n, v in views.items():
            ed.decompose(ctx, v, config.damping)
        entry["score_s"] = time.perf_counter() - t
        entry["needs"] = ["kfac"]
    else:
        criterion = make_criterion(config.criterion)
        method = _compensation_method(criterion, config)
        needs = _needs(criterion, method)
        if crit_name.endswith("-obsA") and method == "obs" and "kfac" not in criterion.needs:
            needs = needs - {"kfac"} | {"kfac_a"}  # what layer-wise OBS reads: the input factors only
        entry["needs"], entry["compensation"] = sorted(needs), method
        c = _cpu()
        meta = collect_statistics(model, tr, ctx, config, needs, timings, scored_only=True,
                                  on_batch=lambda g: criterion.on_batch(ctx, g))
        entry["statistics_s"], entry["statistics_cpu_s"] = timings["statistics"], _cpu() - c
        t = time.perf_counter()
        scores = criterion.score(ctx)
        entry["score_s"] = time.perf_counter() - t
        if method:
            from graphprune.curvature.compensate import compensate

            plan = make_plan(tr, scores, config.budget)
            roots = tr.removed_roots(plan.removed)
            t = time.perf_counter()
            compensate(ctx, tr.kept_fn(roots), method, config.damping)
            entry["compensate_s"] = time.perf_counter() - t
    entry["loss"] = meta.get("loss")
    entry["seconds"] = entry["statistics_s"]
    return entry


def _child(args) -> None:
    try:
        entry = measure(args.measure, args.model, args.onnx, args.calib, args.samples, args.batch_size)
    except Exception as exc:  # a refusal (woodfisher's memory check) or a failure: recorded, not fatal
        entry = {"kind": args.measure, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:400]}"}
    entry["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(entry), flush=True)


def run_one(kind: str, name: str, onnx_path: str, calib: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", kind, "--model", name, "--onnx", onnx_path,
           "--calib", calib, "--samples", str(args.samples), "--batch-size", str(args.batch_size)]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "GRAPHPRUNE_QUIET": "1"})
    wall = time.perf_counter() - t
    entry = next((json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    if entry is None:
        entry = {"kind": kind, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    entry["wall_s"] = round(wall, 1)
    entry["load_before"], entry["load_after"] = round(load0, 2), round(os.getloadavg()[0], 2)
    for k in ("seconds", "warm_s", "cpu_s", "warm_cpu_s", "statistics_s", "statistics_cpu_s", "score_s",
              "compensate_s", "trace_s"):
        if k in entry:
            entry[k] = round(entry[k], 2)
    print(name, json.dumps(entry), flush=True)
    return entry


# ------------------------------------------------------------------ report
def _best(e: dict, what: str = "wall"):
    keys = ("seconds", "warm_s") if what == "wall" else ("cpu_s", "warm_cpu_s")
    return min((e[k] for k in keys if e.get(k)), default=None)


def _same_run(res: dict, e: dict) -> dict:
    """The executor measurement of the same run as ``e`` (ratios never mix runs made hours apart)."""
    for key in ("executor", "executor@earlier"):
        if key in res and res[key].get("run") == e.get("run"):
            return res[key]
    return res.get("executor", {})


def _r(x):
    return "" if x is None else round(x, 1)


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def markdown(data: dict) -> str:
    env = data["env"]
    env.setdefault("load_end", "?")
    runs = [r for r in data.get("runs", [env]) if r]
    lines = ["# Scoring cost: executor vs native PyTorch, statistics vs a plain forward+backward", "",
             f"On {env['cpu_count']} CPU cores shared with other jobs (the load average before and after each "
             f"measurement is in the tables), torch {env['torch']}, batch {env['batch_size']}; runs:", ""]
    lines += [f"- `python benchmarks/scoring_cost.py {r.get('argv', '')}` ({r.get('started', '?')}, load "
              f"{r.get('load_start', '?')} -> {r.get('load_end', '?')})" for r in runs]
    lines += ["", "Times in seconds over all samples; peak = maxrss of the measuring process "
             "(MB), base = its RSS before the measured work. (c)/(a) divides by the cold executor pass (the "
             "statistics are one cold pass too, TorchGraph build included); (a)/(b) compares the faster of each "
             "one's two passes (the least disturbed by other jobs).", "",
             "(a) executor forward+backward, (b) native PyTorch forward+backward, (c) statistics (graphprune's "
             "collect_statistics for the criterion and its default compensation, since 81f8237 for the layers the "
             "criterion scores, as the score stage calls it; `fisher-nocomp`: fisher's own "
             "statistics only; `fisher-obsA`: fisher's and only the input factors A of its OBS compensation, which "
             "is all compensate() reads for obs: the `kfac_a` need, fisher's default since f0592f9), score = the "
             "criterion's scoring afterwards, comp = OBS compensation of a --keep-flops 0.5 plan. Rows marked "
             "@earlier are from runs before the last code change of the model's table; `CPU s` is blank for runs "
             "that recorded wall time only.", ""]
    for name, res in data["models"].items():
        a, b = res.get("executor", {}), res.get("native", {})
        lines += [f"## {name}: {DESCRIPTION.get(name, '')}", "",
                  f"samples {res['samples']}; (a) executor {_r(a.get('seconds'))} s cold (build + first pass; "
                  f"{_r(a.get('cpu_s'))} CPU s), {_r(a.get('warm_s'))} s warm ({_r(a.get('warm_cpu_s'))} CPU s), "
                  f"peak {a.get('peak_rss_mb')} MB, base {a.get('base_rss_mb')}; (b) native {_r(b.get('seconds'))} s "
                  f"cold ({_r(b.get('cpu_s'))} CPU s), {_r(b.get('warm_s'))} s warm ({_r(b.get('warm_cpu_s'))} CPU s), "
                  f"peak {b.get('peak_rss_mb')} MB, base {b.get('base_rss_mb')}.", "",
                  f"**(a)/(b) = {_ratio(_best(a), _best(b))}** (wall, the faster pass of each), "
                  f"**{_ratio(_best(a, 'cpu'), _best(b, 'cpu'))}** (CPU seconds)", "",
                  "| criterion | loss | needs | (c) wall s | (c) CPU s | (c)/(a) wall | (c)/(a) CPU | score s | comp s "
                  "| peak MB | base MB | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for kind, e in res.items():
            if not kind.startswith("stats:"):
                continue
            a = _same_run(res, e)
            if "error" in e:
                lines.append(f"| {kind[6:]} | | | refused / failed: {e['error'][:160]} | | | | | | "
                             f"{e.get('peak_rss_mb')} | | |")
                continue
            lines.append(f"| {kind[6:]} | {e.get('loss')} | {'+'.join(e.get('needs', []))} | {_r(e.get('statistics_s'))} | "
                         f"{_r(e.get('statistics_cpu_s'))} | {_ratio(e.get('statistics_s'), a.get('seconds'))} | "
                         f"{_ratio(e.get('statistics_cpu_s'), a.get('cpu_s') or res.get('executor', {}).get('cpu_s'))} | "
                         f"{_r(e.get('score_s'))} | "
                         f"{_r(e.get('compensate_s'))} | {e.get('peak_rss_mb')} | {e.get('base_rss_mb')} | "
                         f"{e.get('load_before')}-{e.get('load_after')} |")
        lines.append("")
    if "target" in data:
        lines += ["## Issue #11 target (OCR, fisher, 128 samples: < 30 s and < 2 GB, per-position true Fisher)", "",
                  data["target"], ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="comma-separated, or none (only (a) and (b))")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scoring_cost"))
    ap.add_argument("--markdown-only", action="store_true", help="rewrite OUT.md from OUT.json")
    ap.add_argument("--skip-base", action="store_true", help="no (a)/(b) runs (add criteria to an earlier run)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--calib", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        return _child(args)
    if args.markdown_only:
        with open(args.out + ".md", "w") as fh:
            fh.write(markdown(json.load(open(args.out + ".json"))) + "\n")
        return None
    import torch

    data = {"env": {"argv": " ".join(sys.argv[1:] if argv is None else argv), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "samples": args.samples, "batch_size": args.batch_size,
                    "load_start": round(os.getloadavg()[0], 2),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
            "models": {}}
    data["runs"] = []
    if os.path.exists(args.out + ".json"):  # keep models measured by an earlier run with other --models
        try:
            old = json.load(open(args.out + ".json"))
            data["models"], data["runs"] = old.get("models", {}), old.get("runs", [old.get("env")])
        except (OSError, ValueError):
            pass
    data["runs"].append(data["env"])
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            onnx_path, calib = prepare(name, d, args.samples)
            res = {"samples": args.samples}
            old = data["models"].get(name, {})
            if old.get("samples") == args.samples:  # add to an earlier run's figures at the same size
                res.update(old)
            kinds = [] if args.skip_base else ["executor", "native"]
            crits = [c for c in args.criteria.split(",") if c and c != "none"]
            for kind in kinds + [f"stats:{c}" for c in crits] + (
                    ["stats:fisher-nocomp"] if "fisher" in crits else []):
                res[kind] = run_one(kind, name, onnx_path, calib, args)
            data["models"][name] = res
            data["env"]["load_end"] = round(os.getloadavg()[0], 2)
            res["run"] = len(data["runs"]) - 1
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out + ".json", "w") as fh:
                json.dump(data, fh, indent=2)
            with open(args.out + ".md", "w") as fh:
                fh.write(markdown(data) + "\n")
    lines = []
    for kind, what in (("stats:fisher", "fisher with its default OBS compensation's statistics (the input factors A)"),
                       ("stats:fisher-nocomp", "fisher alone (--no-compensate)")):
        ocr = data["models"].get("ocr", {}).get(kind)
        if ocr and "error" not in ocr:
            ok = ocr["statistics_s"] + ocr.get("score_s", 0) < 30 and ocr["peak_rss_mb"] < 2048
            lines.append(f"- {what}, {data['models']['ocr']['samples']} samples, loss {ocr.get('loss')}: statistics "
                         f"{ocr['statistics_s']} s + score {ocr.get('score_s')} s, peak {ocr['peak_rss_mb']} MB, load "
                         f"{ocr.get('load_before')}-{ocr.get('load_after')}: {'met' if ok else 'NOT met'}")
    if lines:
        data["target"] = "\n".join(lines)
        with open(args.out + ".json", "w") as fh:
            json.dump(data, fh, indent=2)
        with open(args.out + ".md", "w") as fh:
            fh.write(markdown(data) + "\n")


if __name__ == "__main__":
    main()
