"""`graphprune bench`: onnxruntime latency of one or more models, interleaved, with speed-ups."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..shapes import text as shapes_text


def register(sub, common) -> None:
    p = sub.add_parser("bench", help="measure onnxruntime latency of one or more models")
    p.add_argument("models", nargs="+", metavar="MODEL", help="ONNX models (the first is the speed-up baseline)")
    p.add_argument("--provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                   help="execution provider (falls back to CPU with a warning when unavailable)")
    p.add_argument("--batch", default="1,8,32", metavar="B[,B...]", help="batch sizes (default 1,8,32)")
    p.add_argument("--warmup", type=int, default=5, metavar="N", help="untimed runs per model and batch (default 5)")
    p.add_argument("--runs", type=int, default=30, metavar="N", help="timed runs per model and batch (default 30)")
    p.add_argument("--min-time", type=float, default=None, metavar="S",
                   help="keep running past --runs until S seconds were spent per batch size")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="onnxruntime intra-op threads, the same for every model (default: the cores available)")
    p.add_argument("--ci", type=float, default=0.02, metavar="F",
                   help="after --runs, keep timing until the 95%% bootstrap interval of every speed-up is within "
                        "±F (relative; default 0.02; 0 = stop after --runs)")
    p.add_argument("--max-time", type=float, default=30.0, metavar="S",
                   help="at most S seconds of timed runs per batch size while narrowing the interval (default 30)")
    p.add_argument("--quantile", type=float, default=0.5, metavar="Q",
                   help="speed-ups compare this quantile of the run times (default 0.5, the p50; 0.2 is steadier "
                        "on a machine shared with other work)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: TensorRT builds fp16 engines (other providers run the model as it is)")
    p.add_argument("--io-binding", action="store_true", help="keep inputs/outputs on the GPU (CUDA/TensorRT)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, N profiled runs per model and batch (onnxruntime's profiler): kernel time "
                        "per op type, and the split between MAC ops (Conv, MatMul, Gemm and their fused forms) "
                        "and everything else, also per output size (H x W), which shows where a speed-up falls "
                        "short of the MACs removed")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--json", metavar="FILE", help="write the full result as JSON here")
    common["add_input_shape"](p, "input size of the random inputs (batch replaced by --batch): 1,3,640,640, or "
                                 "NAME:1,3,640,640 per input; required for dynamic height/width/length")
    p.set_defaults(run=lambda args: run(args, common))


def parse_batches(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in parts]
    except ValueError:
        raise UserError(f"--batch: expected comma-separated integers like 1,8,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"--batch: batch sizes must be >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def _check_args(args, common) -> list[int]:
    batches = parse_batches(args.batch)
    if args.runs < 1:
        raise UserError(f"--runs must be >= 1, got {args.runs}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.min_time is not None and not args.min_time > 0:
        raise UserError(f"--min-time must be > 0 seconds, got {args.min_time}")
    if not 0 <= args.ci < 1:
        raise UserError(f"--ci must be in [0, 1), got {args.ci}")
    if not 0 < args.quantile < 1:
        raise UserError(f"--quantile must be in (0, 1), got {args.quantile}")
    if args.profile < 0:
        raise UserError(f"--profile must be >= 0 runs, got {args.profile}")
    if not args.max_time > 0:
        raise UserError(f"--max-time must be > 0 seconds, got {args.max_time}")
    if args.json:  # fail before a long run, not after it
        out = Path(args.json)
        if out.is_dir():
            raise UserError(f"{args.json}: is a directory (--json needs a file path)")
        if not (out.parent if str(out.parent) else Path(".")).is_dir():
            raise UserError(f"{out.parent}: folder of --json does not exist")
        if any(common["same_file"](args.json, m) for m in args.models):
            raise UserError(f"{args.json}: --json would overwrite an input model")
    return batches


def _names(paths: list[str]) -> list[str]:
    short = [Path(p).name for p in paths]
    return short if len(set(short)) == len(short) else list(paths)


def run(args, common) -> int:
    from .. import log
    from ..bench import benchmark, speedups
    from ..io import load_model, write_json_atomic

    batches = _check_args(args, common)
    models = [(name, load_model(path)) for name, path in zip(_names(args.models), args.models)]
    log.info(f"bench: {len(models)} model(s), batches {','.join(map(str, batches))}, provider {args.provider}")
    res = benchmark(models, provider=args.provider, batches=batches, warmup=args.warmup, runs=args.runs,
                    min_time=args.min_time, io_binding=args.io_binding, threads=args.threads, seed=args.seed,
                    input_shapes=args.input_shape or None, ci=args.ci or None, max_time=args.max_time,
                    precision=args.precision, quantile=args.quantile, profile_runs=args.profile)
    for entry, path in zip(res["models"], args.models):
        entry["source"] = path
    res["speedups"] = {n: {str(b): s for b, s in per.items()} for n, per in speedups(res).items()}
    print(f"provider: {', '.join(res['providers'])} (requested {res['requested_provider']}"
          f"{', I/O binding' if res['io_binding'] else ''}{', fp16' if args.precision == 'fp16' else ''}); "
          f"{res['machine']['cpu_count']} CPUs, {res['settings']['threads']} intra-op thread(s), "
          f"onnxruntime {res['machine']['onnxruntime']}; input "
          + shapes_text({n: ["B", *d[1:]] for n, d in res["settings"]["input_shapes"].items()}))
    width = max(len("model"), *(len(m["name"]) for m in res["models"]))
    print(f"{'model':<{width}} {'batch':>5} {'runs':>5} {'p50 ms':>9} {'p90 ms':>9} {'samples/s':>11} "
          f"{'speed-up':>8} {'95% interval':>15}")
    first = res["models"][0]["name"]
    for r in sorted(res["results"], key=lambda r: (r["batch"], [m["name"] for m in res["models"]].index(r["model"]))):
        s = r["speedup"] if r.get("baseline") == first else res["speedups"][r["model"]].get(str(r["batch"]))
        sp = f"{s:.2f}x" if s is not None else "-"
        lo, hi = r.get("speedup_ci", [None, None])
        interval = (f"[{lo:.2f}, {hi:.2f}]" if lo is not None and lo == lo and hi == hi and r.get("baseline") != r["model"]
                    else "-")
        print(f"{r['model']:<{width}} {r['batch']:>5} {r['runs']:>5} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
              f"{r['throughput']:>11.1f} {sp:>8} {interval:>15}")
    for note in res["notes"]:
        print(f"note: {note}")
    if len(res["models"]) > 1:
        q = "p50" if args.quantile == 0.5 else f"the {args.quantile:g} quantile"
        print(f"speed-up: {q} of {first} / {q} of the model, at the same batch size; interval: 95% block "
              f"bootstrap over the interleaved runs"
              + (f", timed until within ±{args.ci:.0%} or {args.max_time:g} s per batch" if args.ci else ""))
        capped = sorted({r["batch"] for r in res["results"] if r.get("stopped") == "max_time"})
        if capped:
            print(f"note: batch {','.join(map(str, capped))}: the time cap came before the ±{args.ci:.0%} interval")
    for batch in dict.fromkeys(p["batch"] for p in res["profiles"]):
        print_profile([p for p in res["profiles"] if p["batch"] == batch], batch)
    if args.json:
        write_json_atomic(res, args.json)
        print(f"json: {args.json}")
    return 0


def print_profile(profiles: list[dict], batch: int, top: int = 10) -> None:
    """Kernel ms per inference by op type, one column per model, each with its ratio to the first."""
    from ..bench import MAC_OPS

    ops: dict[str, float] = {}
    for p in profiles:
        for op, ms in p["by_op"].items():
            ops[op] = max(ops.get(op, 0.0), ms / max(p["kernel_ms"], 1e-12))
    shown = [op for op, share in sorted(ops.items(), key=lambda kv: -kv[1]) if share >= 0.01][:top]
    names = [p["model"] for p in profiles]
    w = max(14, *(len(n) for n in names))
    base = profiles[0]

    def cell(p, get) -> str:
        v, b = get(p), get(base)
        ratio = f" (x{v / b:.2f})" if p is not base and b > 0 else ""
        return f"{v:.2f}{ratio}"

    print(f"profile at batch {batch} (onnxruntime profiler, kernel ms per inference, mean of {base['runs']} runs):")
    print(f"{'op type':<22}" + "".join(f" {n:>{w + 9}}" for n in names))
    for op in shown:
        print(f"{op + (' *' if op in MAC_OPS else ''):<22}" + "".join(f" {cell(p, lambda q: q['by_op'].get(op, 0.0)):>{w + 9}}"
                                                                 for p in profiles))
    rest = lambda q: q["kernel_ms"] - sum(q["by_op"].get(op, 0.0) for op in shown)  # noqa: E731
    print(f"{'(other op types)':<22}" + "".join(f" {cell(p, rest):>{w + 9}}" for p in profiles))
    for label, key in (("MAC ops *", "mac_ops_ms"), ("all other ops", "other_ops_ms"), ("all kernels", "kernel_ms")):
        print(f"{label:<22}" + "".join(f" {cell(p, lambda q: q[key]):>{w + 9}}" for p in profiles))
    sizes = list(dict.fromkeys(k for p in profiles for k in p.get("by_size", {})))
    if len(sizes) > 1:  # where the time did not fall: per output size, MAC ops then the rest
        print("by output size (dims 2 x 3 of each op's 4-D output; 'other': any other rank):")
        for size in sizes:
            for label, key in (("MAC ops *", "mac_ops_ms"), ("other ops", "other_ops_ms")):
                get = lambda q: q.get("by_size", {}).get(size, {}).get(key, 0.0)  # noqa: E731
                print(f"{size + ' ' + label:<22}" + "".join(f" {cell(p, get):>{w + 9}}" for p in profiles))
