"""`graphprune compress SOURCE -o OUT.onnx`: convert (if needed) → prune → verify → benchmark, one summary.

SOURCE is an ONNX model or anything `graphprune convert` takes (file.py:factory, TorchScript, .pt2).
With --sweep F1,F2,... every budget is run (outputs OUT-keepF.onnx) and the HTML report draws the
accuracy-vs-MACs and latency-vs-MACs curves.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UserError


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--sweep: expected comma-separated ratios, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise UserError(f"--sweep: ratios must be in (0, 1], got {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--bench-batch: expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise UserError(f"--bench-batch: batch sizes must be >= 1, got {text!r}")
    return vals


def register(sub, common) -> None:
    p = sub.add_parser("compress", help="convert, prune, verify and benchmark in one go")
    p.add_argument("source", help="model.onnx, file.py:factory, a TorchScript file or a .pt2 ExportedProgram")
    p.add_argument("-o", "--output", required=True)
    common["add_prune_options"](p, budget_required=False)
    c = p.add_argument_group("conversion (when SOURCE is not ONNX; --input-shape, one per input, sets the export size)")
    c.add_argument("--weights", metavar="STATE_DICT.pt", help="state dict for a factory (weights_only=True)")
    c.add_argument("--exporter", choices=("torchscript", "dynamo"), default=None)
    c.add_argument("--opset", type=int, default=None)
    b = p.add_argument_group("benchmark and report")
    b.add_argument("--bench-batch", default="1,8", metavar="1,8,32", help="batch sizes to time (default 1,8)")
    b.add_argument("--bench-runs", type=int, default=30, metavar="N", help="timed runs per model and batch")
    b.add_argument("--io-binding", action="store_true", help="time with onnxruntime I/O binding (GPU providers)")
    b.add_argument("--no-bench", action="store_true", help="skip the latency benchmark")
    b.add_argument("--sweep", metavar="F1,F2,...", help="run several budgets of the chosen kind (default kind: flops)")
    b.add_argument("--report-html", metavar="REPORT.html", help="self-contained HTML report with charts")
    p.set_defaults(run=lambda args: run(args, common))


def _outputs(out: str, ratios: list[float] | None) -> list[str]:
    if not ratios:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}-keep{r:g}{ext or '.onnx'}" for r in ratios]


def run(args, common) -> int:
    import dataclasses

    from ..bench import benchmark
    from ..distributed import is_main
    from ..io import load_model, write_json_atomic
    from ..report_html import render

    cfg = common["config_from_args"](args, default_budget=("flops", 0.5))
    ratios = _floats(args.sweep) if args.sweep else None
    batches = _ints(args.bench_batch)
    if args.bench_runs < 1:
        raise UserError("--bench-runs must be >= 1")
    outputs = _outputs(args.output, ratios)
    for o in outputs:
        if Path(o).exists() and not args.force:
            raise UserError(f"{o}: exists (use --force to overwrite)")
    for extra in (args.report, args.report_html):
        if extra and any(common["same_file"](extra, x) for x in [args.source.split(":")[0], *outputs]):
            raise UserError(f"{extra}: a report path must not name the source or an output model")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.output))) as tmp:
        source = args.source
        if not source.lower().endswith(".onnx"):
            from converters.load_torch import parse_input_shape, source_kind
            from converters.torch_to_onnx import ConversionError

            from .convert import convert

            try:
                kind = source_kind(source)
                shapes = [parse_input_shape(s) for s in args.input_shape or []]
            except ConversionError as exc:
                raise UserError(str(exc)) from None
            if not shapes and kind != "program":
                raise UserError("SOURCE is not ONNX: give --input-shape (e.g. --input-shape 1,3,224,224)")
            exporter = args.exporter or ("dynamo" if kind == "program" else "torchscript")
            source = convert(args.source, os.path.join(tmp, "converted.onnx"), input_shapes=shapes or None,
                             weights=args.weights, exporter=exporter, opset=args.opset)
            print(f"converted {args.source} -> ONNX ({exporter} exporter)")
            cfg.input_shapes = None  # the export size is the converted model's (only the batch stays dynamic)
        elif args.weights:
            raise UserError("--weights applies only when SOURCE is not an ONNX model")
        reports = []
        staged = []
        for k, out in enumerate(outputs):
            if ratios:
                b = cfg.budget
                cfg.budget = dataclasses.replace(b, ratio=ratios[k])
            tmp_out = os.path.join(tmp, f"pruned{k}.onnx")
            rep = common["run_prune"](args, source, tmp_out, cfg)  # --workers N: in N processes
            if not is_main():  # launched by torchrun: every rank prunes, rank 0 alone benchmarks and writes
                continue
            rep["input"], rep["output"] = args.source, out
            rep["file_size"] = {"before": os.path.getsize(source), "after": os.path.getsize(tmp_out)}
            if not args.no_bench:
                res = benchmark([("dense", load_model(source)), ("pruned", load_model(tmp_out))],
                                provider=args.provider, batches=batches, runs=args.bench_runs, warmup=5,
                                io_binding=args.io_binding, input_shapes=rep["input_shapes"])
                rows = []
                by = {(r["model"], r["batch"]): r for r in res["results"]}
                for bsz in batches:
                    d, p = by.get(("dense", bsz)), by.get(("pruned", bsz))
                    if d and p:
                        rows.append({"batch": bsz, "provider": res["providers"][0], "dense_p50_ms": d["p50_ms"],
                                     "dense_p90_ms": d["p90_ms"], "pruned_p50_ms": p["p50_ms"],
                                     "pruned_p90_ms": p["p90_ms"], "speedup": d["p50_ms"] / p["p50_ms"],
                                     "macs_reduction": 1 / max(rep["totals"]["macs_ratio"], 1e-12)})
                rep["bench"] = {"rows": rows, "machine": res["machine"], "requested_provider": args.provider,
                                "providers": res["providers"], "notes": res["notes"]}
            reports.append(rep)
            staged.append((tmp_out, out))
        if not is_main():
            return 0
        _print_table(reports, common["human"])
        for tmp_out, out in staged:  # every check passed: publish the outputs
            os.replace(tmp_out, out)
    if args.report:
        write_json_atomic(reports if ratios else reports[0], args.report)
    if args.report_html:
        html_path = Path(args.report_html)
        tmp_html = html_path.with_name(f".{html_path.name}.tmp")
        tmp_html.write_text(render(reports, title=f"graphprune: {Path(args.source).name}"))
        os.replace(tmp_html, html_path)
        print(f"HTML report: {args.report_html}")
    return 0


def _print_table(reports: list[dict], human) -> None:
    for rep in reports:
        t = rep["totals"]
        print(f"\n{rep['output']}  (criterion {rep['criterion']}, budget {rep['budget']['kind']} "
              f"{rep['budget']['ratio']:g}, verification {'passed' if rep.get('verification', {}).get('ok') else 'off'})")
        rows = [("MACs", human(t["macs_before"]), human(t["macs_after"]), f"{t['macs_ratio']:.1%}"),
                ("params", human(t["params_before"]), human(t["params_after"]), f"{t['params_ratio']:.1%}"),
                ("file size", human(rep["file_size"]["before"]) + "B", human(rep["file_size"]["after"]) + "B",
                 f"{rep['file_size']['after'] / rep['file_size']['before']:.1%}")]
        for b in rep.get("bench", {}).get("rows", []):
            rows.append((f"p50 ms, batch {b['batch']}", f"{b['dense_p50_ms']:.3f}", f"{b['pruned_p50_ms']:.3f}",
                         f"speed-up x{b['speedup']:.2f} (MACs reduction x{b['macs_reduction']:.2f})"))
            rows.append((f"p90 ms, batch {b['batch']}", f"{b['dense_p90_ms']:.3f}", f"{b['pruned_p90_ms']:.3f}", ""))
        if "accuracy" in rep:
            a = rep["accuracy"]
            rows.append(("accuracy", f"{a['before']:.2%}", f"{a['after']:.2%}", f"{a['after'] - a['before']:+.2%}"))
            if "before_recovery" in a:
                rec = rep["recovery"]
                rows.append(("  before recovery", "", f"{a['before_recovery']:.2%}",
                             f"{rec['steps_per_round']} recovery steps per round (--recover 0: one-shot)"))
        if rep.get("bench"):
            rows.append(("provider", rep["bench"]["providers"][0], "", ""))
        print(f"  {'':22s} {'dense':>12s} {'pruned':>12s}  change")
        for name, a, b, c in rows:
            print(f"  {name:22s} {a:>12s} {b:>12s}  {c}")
