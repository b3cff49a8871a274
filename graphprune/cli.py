"""The `graphprune` command. Exit codes: 0 success, 1 verification failed, 2 user error."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from . import __version__, log
from .errors import UserError, VerificationError, WorkersFailed
from .io import same_file as _same_file
from .shapes import text as shapes_text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"graphprune: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v:g}")
    return v


def _tolerance(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0.0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def _size(text: str) -> int:
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        v = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(v)


def _check_report_path(args) -> None:
    """The report must not clobber the input model or the pruned model, and must be a file path."""
    if args.report is None:
        return
    if Path(args.report).is_dir():
        raise UserError(f"{args.report}: is a directory (--report needs a file path)")
    if _same_file(args.report, args.model):
        raise UserError(f"{args.report}: --report would overwrite the input model")
    if _same_file(args.report, args.output):
        raise UserError(f"{args.report}: --report and --output name the same file")


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


INPUT_SHAPE_HELP = ("input size to count MACs, check and time at: 1,3,640,640 for a single-input model, "
                    "NAME:1,3,640,640 (repeatable) for several; default: the --calib arrays' shapes, else the "
                    "model's static dims (required for dynamic height/width/length)")


def add_input_shape(p: argparse.ArgumentParser, help_text: str = INPUT_SHAPE_HELP) -> None:
    p.add_argument("--input-shape", dest="input_shape", action="append", metavar="[NAME:]1,3,640,640",
                   help=help_text)


def _recover_steps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps (0 = off), got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not (0 < v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def _round_to(text: str):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or auto, got {n}")
    return n


def add_recover_options(p: argparse.ArgumentParser, steps_flag: str = "--recover") -> None:
    from .config import PruneConfig

    rc = p.add_argument_group("recovery: distillation from the dense model on the --calib inputs")
    rc.add_argument(steps_flag, dest="recover", type=_recover_steps, default=None, metavar="STEPS",
                    help="training steps per pruning round (0 = off; default: 100 when --calib is given)")
    rc.add_argument("--recover-time", type=_seconds, default=None, metavar="SECONDS",
                    help="wall-clock budget for recovery (all rounds together): the step count is sized from the "
                         "measured time of a few probe steps, capped by the step count when one is given, and "
                         "reported (give that count instead to reproduce the run exactly)")
    rc.add_argument("--recover-lr", type=_tolerance, default=1e-3, metavar="LR",
                    help="AdamW learning rate, cosine schedule (default 1e-3)")
    rc.add_argument("--recover-batch", type=int, default=32, metavar="B", help="mini-batch size (default 32)")
    rc.add_argument("--recover-temperature", type=_tolerance, default=PruneConfig.recover_temperature, metavar="T",
                    help="temperature of the distillation KL on classifier logits: the dense model's softened "
                         "probabilities are the targets, the loss scaled by T^2 (default "
                         f"{PruneConfig.recover_temperature:g})")
    rc.add_argument("--recover-mix", type=_fraction, default=0.5, metavar="F",
                    help="fraction of each mini-batch replaced by mixtures of two calibration inputs, the dense "
                         "model's outputs on them computed on the fly: more distinct inputs than the file holds "
                         "(default 0.5; 0 = off; labelled batches and integer inputs are never mixed)")
    rc.add_argument("--recover-features", action="store_true",
                    help="also match the dense model's activations at block boundaries (tensors read by several "
                         "nodes) that the plan left at full width (MSE over their variance)")


def add_prune_options(pr: argparse.ArgumentParser, budget_required: bool = True) -> None:
    """Options shared by `prune` and `compress`."""
    add_input_shape(pr)
    pr.add_argument("--criterion", default="auto",
                    help="auto (default: taylor with --calib, magnitude without), magnitude, magnitude-l1, taylor, "
                         "taylor2, fisher, kron-obd, kron-obs, woodfisher, woodtaylor, eigendamage, "
                         "eigendamage-channel")
    b = pr.add_mutually_exclusive_group(required=budget_required)
    b.add_argument("--keep-flops", type=_ratio, metavar="F", help="keep at most F x the MACs (batch 1)")
    b.add_argument("--keep-params", type=_ratio, metavar="F", help="keep at most F x the parameters")
    b.add_argument("--keep-channels", type=_ratio, metavar="F", help="keep F of every group (uniform)")
    b.add_argument("--lossless", action="store_true", help="remove only channels proven identically zero")
    b.add_argument("--keep-latency", type=_ratio, metavar="F",
                   help="measured latency at most F x the dense model's (per-layer latency tables)")
    pr.add_argument("--round-to", type=_round_to, default=None, metavar="N|auto",
                    help="kept widths multiple of N, or auto: each layer's width snapped to the fastest width "
                         "not above the planned one, from measured latency tables of --provider at "
                         "--latency-batch; on CPU, conv channels kept in whole NCHWc blocks (16 with "
                         "AVX-512, 8 with AVX2) (default: auto for compress and --keep-latency, else 1)")
    pr.add_argument("--max-group-removal", type=float, default=0.9, metavar="F",
                    help="remove at most F of any group (default 0.9; never all of it)")
    pr.add_argument("--best-effort", action="store_true", help="prune as far as possible if the budget is unreachable")
    pr.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
    pr.add_argument("--eval", metavar="DATA.npz", help="labelled data (inputs + 'labels') for accuracy before/after")
    pr.add_argument("--no-verify", action="store_true", help="skip the parity check against the masked original")
    pr.add_argument("--rtol", type=_tolerance, default=1e-4, help="parity tolerance (max relative error)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--workers", type=int, default=1, metavar="N",
                    help="run in N local processes (torch.distributed, gloo on CPU, NCCL with --device cuda: "
                         "one GPU each): calibration statistics and recovery data-parallel, same result")
    pr.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    pr.add_argument("--external-data", action="store_true",
                    help="write the weights to OUTPUT.data beside OUTPUT (automatic above 2 GB)")
    cv = pr.add_argument_group("curvature criteria and weight compensation")
    cv.add_argument("--calib", metavar="FILE.npz",
                    help="calibration inputs: one array per graph input (or one unnamed array), optional 'labels'")
    cv.add_argument("--samples", type=int, default=128, metavar="N", help="calibration samples to use (default 128)")
    cv.add_argument("--batch-size", type=int, default=32, metavar="B", help="mini-batch size (default 32)")
    cv.add_argument("--loss", default="auto",
                    help="auto (labels if given and output 0 is N x classes; else by each output's kind: a "
                         "Softmax/LogSoftmax output, or one summing to one along an axis, is a categorical per "
                         "position sampled from the model (true Fisher), a Sigmoid a Bernoulli per score, plain "
                         "N x C logits the classifier's true Fisher, anything else Gauss-Newton; several outputs: "
                         "the sum), labels, true-fisher, empirical-fisher, gauss-newton, categorical[:AXIS] "
                         "(a categorical per position over AXIS of output 0; default the softmax axis, else the "
                         "last axis of N x T x C, else axis 1), bernoulli; an explicit kind applies to output 0")
    comp = cv.add_mutually_exclusive_group()
    comp.add_argument("--compensate", nargs="?", const=True, default=None, metavar="METHOD",
                      help="update kept weights (OBS); default on for curvature criteria; METHOD obs|kron-obs|woodfisher|woodtaylor")
    comp.add_argument("--no-compensate", dest="compensate", action="store_false")
    cv.add_argument("--damping", type=float, default=1e-3, help="relative damping of curvature factors (default 1e-3)")
    cv.add_argument("--steps", type=int, default=1, metavar="K", help="reach the budget in K rounds, re-scoring between")
    cv.add_argument("--device", default="cpu", help="torch device for statistics (cpu, cuda)")
    cv.add_argument("--block-size", type=int, default=None, metavar="C",
                    help="woodfisher/woodtaylor: diagonal Fisher blocks of at most C weights, aligned on input "
                         "channels (default: the largest up to 1024 that fits --max-memory)")
    cv.add_argument("--max-memory", type=_size, default=None, metavar="SIZE",
                    help="memory allowed for curvature statistics, e.g. 4G (default: 80%% of available RAM)")
    add_recover_options(pr)
    lt = pr.add_argument_group("hardware-aware planning (--keep-latency)")
    lt.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"),
                    help="onnxruntime provider to measure on (default cpu)")
    lt.add_argument("--latency-batch", type=int, default=8, metavar="B", help="batch size to measure at (default 8)")
    lt.add_argument("--latency-threads", type=int, default=1, metavar="N",
                    help="onnxruntime intra-op threads the latency tables and measurements use (default 1)")
    lt.add_argument("--latency-precision", choices=("fp32", "fp16"), default="fp32",
                    help="precision the latency tables are measured in (fp16: fp16 layers; TensorRT builds fp16 "
                         "engines); default fp32")
    lt.add_argument("--latency-attempts", type=int, default=5, metavar="N",
                    help="--keep-latency: plan, measure end to end and correct at most N times, until the "
                         "measured latency is within 2.5%% of the target (then the nearest within 5%% is kept; "
                         "default 5)")
    lt.add_argument("--latency-cache", metavar="FILE",
                    help="per-layer latency cache (default ~/.cache/graphprune/latency.json)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="graphprune", description="Structured channel pruning of ONNX models.")
    p.add_argument("--version", action="version", version=f"graphprune {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ins = sub.add_parser("inspect", help="list channel groups, MACs and params")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--all", action="store_true", help="show every group (default: first 40)")
    add_input_shape(ins)
    ins.add_argument("--calib", metavar="FILE.npz", help="take the input size from these arrays' shapes")

    pr = sub.add_parser("prune", help="prune channels to a budget and write a smaller ONNX model")
    pr.add_argument("model")
    pr.add_argument("-o", "--output", required=True)
    add_prune_options(pr, budget_required=True)

    ve = sub.add_parser("verify", help="compare a pruned model with its masked original")
    ve.add_argument("original")
    ve.add_argument("pruned")
    ve.add_argument("--report", required=True, metavar="REPORT.json")
    ve.add_argument("--rtol", type=_tolerance, default=1e-4)
    ve.add_argument("--seed", type=int, default=0)
    add_input_shape(ve, "input size to check at (default: the size the report records, else the model's "
                        "static dims); NAME:1,3,640,640 for several inputs")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(sub, COMMON)
    return p


def _cmd_inspect(args) -> int:
    from .pipeline import inspect

    info = inspect(args.model, args.input_shape, args.calib)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    sizes = shapes_text(info["input_shapes"])
    upgraded = info.get("opset_upgraded")
    opset = f"opset {info['opset']}" + (f" (upgraded from {upgraded['from']})" if upgraded else "")
    print(f"{info['model']}: {opset}, {info['nodes']} nodes, MACs {_human(info['macs'])} at {sizes}, "
          f"params {_human(info['params'])}, traced in {info['trace_seconds']:.2f}s")
    print(f"{len(info['groups'])} groups, {info['prunable_groups']} prunable "
          f"({info['prunable_channels']} channels)")
    print(f"{'id':>4} {'size':>5} {'status':<9} sources / reason")
    shown = info["groups"] if args.all else info["groups"][:40]
    for g in shown:
        status = "prunable" if g["prunable"] else "frozen"
        srcs = ", ".join(s["node"] for s in g["sources"][:3]) + (" ..." if len(g["sources"]) > 3 else "")
        why = "" if g["prunable"] else ("  [" + "; ".join(g["frozen"][:2]) + "]" if g["frozen"] else "  [single channel]")
        print(f"{g['id']:>4} {g['size']:>5} {status:<9} {srcs}{why}")
    if len(shown) < len(info["groups"]):
        print(f"... {len(info['groups']) - len(shown)} more (use --all or --json)")
    return 0


def config_from_args(args, default_budget: tuple[str, float] | None = None):
    """PruneConfig from the options added by add_prune_options."""
    from .pipeline import PruneConfig
    from .planner import Budget

    if args.lossless:
        kind, ratio = "lossless", 1.0
    else:
        kind, ratio = next(((k, v) for k, v in (("flops", args.keep_flops), ("params", args.keep_params),
                                                ("channels", args.keep_channels), ("latency", args.keep_latency))
                            if v is not None), default_budget or (None, None))
        if kind is None:
            raise UserError("choose a budget: --keep-flops, --keep-params, --keep-channels, --keep-latency or --lossless")
    round_to = args.round_to
    if round_to is None:  # compress and --keep-latency are about speed: hardware-friendly widths
        round_to = "auto" if getattr(args, "command", None) == "compress" or kind == "latency" else 1
    if args.latency_threads < 1:
        raise UserError(f"--latency-threads must be >= 1, got {args.latency_threads}")
    if args.latency_attempts < 1:
        raise UserError(f"--latency-attempts must be >= 1, got {args.latency_attempts}")
    hardware = {"provider": args.provider, "batch": args.latency_batch, "cache": args.latency_cache,
                "threads": args.latency_threads, "precision": args.latency_precision}
    budget = Budget(kind, ratio, cap=args.max_group_removal, round_to=round_to, best_effort=args.best_effort,
                    hardware=hardware)
    if args.samples < 1 or args.batch_size < 1 or args.steps < 1 or args.latency_batch < 1:
        raise UserError("--samples, --batch-size, --steps and --latency-batch must be >= 1")
    if args.recover_batch < 1:
        raise UserError(f"--recover-batch must be >= 1, got {args.recover_batch}")
    if args.block_size is not None and args.block_size < 1:
        raise UserError(f"--block-size must be >= 1, got {args.block_size}")
    if not args.damping > 0:
        raise UserError(f"--damping must be > 0, got {args.damping}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available to PyTorch")
    return PruneConfig(criterion=args.criterion, budget=budget, verify=not args.no_verify, rtol=args.rtol,
                       seed=args.seed, force=args.force, eval_data=args.eval, calib=args.calib,
                       external_data=getattr(args, "external_data", False),
                       samples=args.samples, batch_size=args.batch_size, loss=args.loss,
                       compensate=args.compensate, damping=args.damping, device=args.device, steps=args.steps,
                       provider=args.provider, latency_batch=args.latency_batch, latency_cache=args.latency_cache,
                       latency_attempts=args.latency_attempts, max_memory=args.max_memory, input_shapes=args.input_shape or None,
                       block_size=args.block_size, recover=args.recover, recover_lr=args.recover_lr,
                       recover_temperature=args.recover_temperature,
                       recover_batch=args.recover_batch, recover_features=args.recover_features,
                       recover_mix=args.recover_mix, recover_time=args.recover_time)


def print_summary(rep: dict, output: str) -> None:
    t = rep["totals"]
    print(f"wrote {output}: MACs {_human(t['macs_before'])} -> {_human(t['macs_after'])} "
          f"({t['macs_ratio']:.1%}), params {_human(t['params_before'])} -> {_human(t['params_after'])} "
          f"({t['params_ratio']:.1%}), {t['channels_removed']} channels removed")
    if "verification" in rep:
        v = rep["verification"]
        sizes = "; ".join(shapes_text(size) for size in v.get("sizes", []))
        print(f"verified against the masked original: max abs error {v['max_abs_error']:.2e}, "
              f"max rel error {v['max_rel_error']:.2e}{' at ' + sizes if sizes else ''}")
        if v.get("second_size_skipped"):
            print(f"note: second size skipped: {v['second_size_skipped']}")
    if rep.get("compensation"):
        print(f"weights compensated ({rep['compensation']}); curvature from {rep.get('samples')} samples "
              f"of {rep.get('calibration')} with the {rep.get('loss')} loss")
    if "latency" in rep:
        lat = rep["latency"]
        print(f"latency ({lat['provider']}, batch {lat['batch']}): {lat['dense_ms']:.3f} ms -> measured "
              f"{lat['measured_ms']:.3f} ms (target {lat['target_ms']:.3f}, predicted {lat['predicted_ms']:.3f})")
    if "recovery" in rep:
        rec = rep["recovery"]
        last = rec["rounds"][-1] if rec["rounds"] else None
        if last is not None:
            held = (f"; held-out distillation loss {last['holdout_loss_before']:.4g} -> {last['holdout_loss_after']:.4g}"
                    if last.get("holdout_loss_before") is not None and last["samples"].get("holdout") else "")
            source = ("; labels used (cross-entropy)" if last.get("labels")
                      else "; no labels in the calibration file: distillation only")
            print(f"recovered: {rec['steps_per_round']} steps per round (kept step {last['best_step']}), "
                  f"{len(last['tensors'])} tensors trained{held}{source}")
    if "accuracy" in rep:
        a = rep["accuracy"]
        one_shot = f" (before recovery {a['before_recovery']:.2%})" if "before_recovery" in a else ""
        print(f"accuracy: {a['before']:.2%} -> {a['after']:.2%}{one_shot}")


def run_prune(args, model, output, cfg, report_path=None) -> dict:
    """pipeline.prune, in ``--workers N`` local processes when asked (rank 0's report)."""
    from .distributed import launch, world_size
    from .pipeline import prune

    workers = getattr(args, "workers", 1) or 1
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers == 1 or world_size() > 1:  # already under torchrun: this process is one of the ranks
        return prune(model, output, cfg, report_path=report_path)
    return launch(workers, prune, model, output, cfg, report_path, quiet=bool(args.quiet))


def _cmd_prune(args) -> int:
    _check_report_path(args)
    cfg = config_from_args(args)
    rep = run_prune(args, args.model, args.output, cfg, report_path=args.report)
    from .distributed import is_main

    if not is_main():
        return 0
    print_summary(rep, args.output)
    if args.report:
        print(f"report: {args.report}")
    return 0


def _cmd_verify(args) -> int:
    from .pipeline import verify

    try:
        with open(args.report) as fh:
            report = json.load(fh)
    except OSError as exc:
        raise UserError(f"{args.report}: cannot read report ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{args.report}: not a JSON report ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(report, dict):
        raise UserError(f"{args.report}: not a graphprune report")
    res = verify(args.original, args.pruned, report, rtol=args.rtol, seed=args.seed,
                 input_shapes=args.input_shape or None)
    if not res["ok"]:
        reason = res.get("reason") or f"max rel error {res['max_rel_error']:.3e} > {res['rtol']:g}"
        print(f"MISMATCH: {reason}")
        return 1
    sizes = "; ".join(shapes_text(size) for size in res.get("sizes", []))
    print(f"OK: pruned model equals the masked original (max abs error {res['max_abs_error']:.2e}, "
          f"max rel error {res['max_rel_error']:.2e}{', at ' + sizes if sizes else ''})")
    if res.get("note"):
        print(f"note: {res['note']}")
    return 0


COMMANDS = {"inspect": _cmd_inspect, "prune": _cmd_prune, "verify": _cmd_verify}
#: subcommands defined in graphprune/commands/<name>.py
COMMAND_MODULES: tuple[str, ...] = ("bench", "convert", "compress", "recover")
#: argument helpers shared with command modules
COMMON = {"ratio": _ratio, "tolerance": _tolerance, "human": _human, "same_file": _same_file,
          "add_prune_options": add_prune_options, "config_from_args": config_from_args,
          "print_summary": print_summary, "add_input_shape": add_input_shape,
          "add_recover_options": add_recover_options, "run_prune": run_prune}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import is_main

    if args.quiet or not is_main():  # under torchrun only rank 0 reports
        log.set_quiet(True)
    try:
        run = getattr(args, "run", None) or COMMANDS[args.command]
        return run(args)
    except UserError as exc:
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except VerificationError as exc:
        print(f"graphprune: verification failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except WorkersFailed as exc:  # --workers: a worker failed and its message did not come back
        print(f"graphprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `graphprune inspect ... | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
