"""Where does one-shot pruning go wrong? Predicted vs measured loss increase, per group.

    python benchmarks/oneshot_diagnose.py                       # every digits model, default criteria
    python benchmarks/oneshot_diagnose.py --models samples/heldout_densenet.onnx --calib samples/heldout_calib.npz
    python benchmarks/oneshot_diagnose.py --criteria taylor fisher --budgets 0.3

For each model, criterion and ``--keep-flops`` budget: score with the first half of the calibration
file (no labels: the criteria's label-free loss), plan the budget, and then, on the *other* half
(held out), measure for every group the planner cut into:

* predicted: the criterion's estimate of the loss increase of removing the planned units (the sum
  of their scores; every curvature criterion scores in units of loss);
* measured: the actual increase of the mean cross-entropy against the held-out labels when only
  that group's planned units are removed (the masked original run by onnxruntime), without and
  with the criterion's compensation (layer-wise OBS unless the criterion has its own);
* the same for the whole plan at once (interactions between groups show up as the gap between the
  sum of per-group losses and the joint loss).

Each group is tagged with where it sits: ``depthwise`` (a depthwise conv produces it), ``preact``
(a BatchNormalization reads it without a conv right before: pre-activation BN -> ReLU -> Conv),
``concat`` (it enters a Concat), ``residual`` (several sources add into it), ``stem``/``early``/
``mid``/``late`` (depth of its first producer). Per tag the report gives the Spearman rank
correlation of predicted vs measured and the median measured/predicted ratio, which is what tells
whether the global ranking (across layers) or the compensation is what breaks.

Results: benchmarks/results/oneshot_diagnose.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("GRAPHPRUNE_QUIET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from graphprune import UserError  # noqa: E402
from graphprune.pipeline import PruneConfig, load_and_trace  # noqa: E402
from graphprune.stages.score import score  # noqa: E402
from graphprune.planner import Budget, make_plan  # noqa: E402
from graphprune.rewriter import masked_view  # noqa: E402
from graphprune.runtime import run, session  # noqa: E402

DIGITS = ["samples/digits_resnet.onnx", "samples/digits_mobilenet_v2.onnx", "samples/digits_densenet.onnx"]
CRITERIA = ["taylor", "fisher", "kron-obd", "kron-obs", "woodfisher"]


def split_calib(path: str, work: str) -> tuple[str, dict, np.ndarray]:
    """First half -> a scoring file without labels; second half -> held-out (feeds, labels)."""
    z = dict(np.load(path))
    labels = z.pop("labels")
    n = len(labels) // 2
    score_path = os.path.join(work, "score.npz")
    np.savez(score_path, **{k: v[:n] for k, v in z.items()})
    return score_path, {k: v[n:] for k, v in z.items()}, labels[n:]


def cross_entropy(model, feeds: dict, labels: np.ndarray) -> float:
    sess = session(model)
    logits = run(sess, feeds)[0].reshape(len(labels), -1).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def tags(tr, group) -> list[str]:
    nodes = {n.name: n for n in tr.graph.nodes}
    order = {n.name: i for i, n in enumerate(tr.graph.nodes)}
    out = []
    src = [nodes[s.node] for s in group.sources]
    if any(n.op == "Conv" and int(n.attrs.get("group", 1)) > 1 and int(n.attrs.get("group", 1)) == n.outputs[0].shape[1]
           for n in src if n.outputs[0].shape is not None and len(n.outputs[0].shape) > 1):
        out.append("depthwise")
    unit_roots = set(group.units.tolist())
    for m in tr.members:
        node = nodes[m.node]
        if node.op == "BatchNormalization" and unit_roots & set(tr.roots[m.ids].tolist()):
            prod = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
            if prod is None or prod.op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
                out.append("preact")
                break
    ids = {name for name, info in tr.state.infos.items() if set(tr.roots[info.ids].tolist()) & unit_roots}
    if any(n.op == "Concat" and any(t.name in ids for t in n.inputs) for n in tr.graph.nodes):
        out.append("concat")
    if len(group.sources) > 1:
        out.append("residual")
    depth = min(order[s.node] for s in group.sources) / max(len(order) - 1, 1)
    out.append("stem" if depth < 0.05 else "early" if depth < 0.35 else "mid" if depth < 0.7 else "late")
    return out


def spearman(a, b) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(tr, model, roots, ctx, method, damping, feeds, labels) -> tuple[float, float]:
    """Held-out mean cross-entropy with ``roots`` removed (masked original): without and with compensation."""
    with masked_view(tr, roots, model) as masked:
        plain = cross_entropy(masked, feeds, labels)
    if not method:
        return plain, plain
    from graphprune.curvature.compensate import compensate

    tensors = tr.graph.tensors()
    saved = {}
    try:
        for name, values in compensate(ctx, tr.kept_fn(roots), method, damping).items():
            saved[name] = tensors[name].values
            tensors[name].values = values
        with masked_view(tr, roots, model) as masked:
            comp = cross_entropy(masked, feeds, labels)
    finally:
        for name, values in saved.items():
            tensors[name].values = values
    return plain, comp


def diagnose(path: str, calib: str, criterion: str, ratio: float, work: str) -> dict:
    score_path, feeds, labels = split_calib(calib, work)
    model, tr = load_and_trace(path, calib=score_path)
    config = PruneConfig(criterion=criterion, budget=Budget("flops", ratio), calib=score_path, samples=1 << 30)
    t = time.perf_counter()
    scoring = score(model, tr, config, config.budget, {})
    method, ctx, scores, meta = scoring.method, scoring.ctx, scoring.scores, scoring.meta
    plan = make_plan(tr, scores, config.budget)
    seconds = time.perf_counter() - t
    with masked_view(tr, set(), model) as dense:
        base = cross_entropy(dense, feeds, labels)
    rows = []
    for gid, units in sorted(plan.removed.items()):
        g = tr.groups[gid]
        roots = {int(r) for r in g.units[units]}
        plain, comp = measure(tr, model, roots, ctx, method, config.damping, feeds, labels)
        rows.append({"group": gid, "size": g.size, "removed": len(units), "tags": tags(tr, g),
                     "source": g.sources[0].node, "predicted": float(np.sum(scores[gid][units])),
                     "measured": plain - base, "measured_compensated": comp - base})
    all_roots = tr.removed_roots(plan.removed)
    plain, comp = measure(tr, model, all_roots, ctx, method, config.damping, feeds, labels)
    return {"model": os.path.basename(path), "criterion": criterion, "budget": ratio, "compensation": method,
            "loss": meta.get("loss"), "macs_ratio": plan.after["macs"] / plan.before["macs"], "seconds": seconds,
            "dense_loss": base, "groups": rows,
            "total": {"predicted": float(sum(r["predicted"] for r in rows)),
                      "sum_measured": float(sum(r["measured"] for r in rows)),
                      "sum_measured_compensated": float(sum(r["measured_compensated"] for r in rows)),
                      "measured": plain - base, "measured_compensated": comp - base}}


def summarise(result: dict) -> dict:
    rows = result["groups"]
    out = {}
    for tag in sorted({t for r in rows for t in r["tags"]} | {"all"}):
        sel = [r for r in rows if tag == "all" or tag in r["tags"]]
        p = np.array([r["predicted"] for r in sel])
        m = np.array([r["measured"] for r in sel])
        mc = np.array([r["measured_compensated"] for r in sel])
        ok = p > 0
        out[tag] = {"groups": len(sel), "spearman": spearman(p, m), "spearman_compensated": spearman(p, mc),
                    "median_ratio": float(np.median(m[ok] / p[ok])) if ok.any() else None,
                    "median_ratio_compensated": float(np.median(mc[ok] / p[ok])) if ok.any() else None,
                    "compensation_gain": float(np.sum(m) - np.sum(mc))}
    return out


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DIGITS)
    ap.add_argument("--calib", default="samples/digits_calib.npz", help="calibration .npz with labels (split in two)")
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "oneshot_diagnose"))
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for path in args.models:
            for criterion in args.criteria:
                for ratio in args.budgets:
                    try:
                        r = diagnose(os.path.join(ROOT, path), os.path.join(ROOT, args.calib), criterion, ratio, work)
                    except UserError as exc:
                        print(f"{path} {criterion} {ratio}: {exc}", flush=True)
                        results.append({"model": os.path.basename(path), "criterion": criterion, "budget": ratio,
                                        "error": str(exc)})
                        continue
                    r["summary"] = summarise(r)
                    results.append(r)
                    s = r["summary"]["all"]
                    print(f"{r['model']} {criterion} {ratio}: spearman {_fmt(s['spearman'])} / compensated "
                          f"{_fmt(s['spearman_compensated'])}; total predicted {r['total']['predicted']:.3f}, "
                          f"measured {r['total']['measured']:.3f}, compensated {r['total']['measured_compensated']:.3f}",
                          flush=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(results, fh, indent=1)
    lines = ["# One-shot diagnosis: predicted vs measured loss increase", "",
             f"Reproduce: `python benchmarks/oneshot_diagnose.py {' '.join(sys.argv[1:])}`".rstrip() + "", "",
             "Per model, criterion and budget: the whole plan's predicted loss increase, the measured one without and "
             "with compensation (held-out half of the calibration file, cross-entropy against its labels), the sum of "
             "the groups' own compensated increases (each group removed alone: the gap to the joint figure is the "
             "interaction between groups), and per "
             "position tag the Spearman correlation of predicted vs measured per-group increases (uncompensated / "
             "compensated) and the median measured/predicted ratio.", "",
             "| model | criterion | keep | predicted | measured | compensated | per-group sum, compensated | "
             "tag: groups, spearman (plain/comp), median ratio (plain/comp) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['criterion']} | {r['budget']} | refused: {r['error'][:80]} | | | | |")
            continue
        per = "; ".join(f"{t}: {v['groups']}, {_fmt(v['spearman'])}/{_fmt(v['spearman_compensated'])}, "
                        f"{_fmt(v['median_ratio'], '.2g')}/{_fmt(v['median_ratio_compensated'], '.2g')}"
                        for t, v in r["summary"].items())
        lines.append(f"| {r['model']} | {r['criterion']} | {r['budget']} | {r['total']['predicted']:.3f} | "
                     f"{r['total']['measured']:.3f} | {r['total']['measured_compensated']:.3f} | "
                     f"{r['total']['sum_measured_compensated']:.3f} | {per} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
