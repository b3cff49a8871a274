"""`graphprune recover DENSE.onnx PRUNED.onnx -o OUT.onnx --calib C.npz`: distil any smaller model
with the dense model's signature (pruned by graphprune or elsewhere) from the dense model."""
from __future__ import annotations

from ..errors import UserError

HELP = "train a pruned model's weights to match the dense model on calibration inputs (structure unchanged)"


def register(sub, common) -> None:
    p = sub.add_parser("recover", help=HELP, description=HELP + ". Trains convolution, linear and normalisation "
                       "parameters with AdamW toward the dense model's outputs (KL for softmax/classifier "
                       "outputs, MSE otherwise; plus cross-entropy when the file has labels), keeps the weights "
                       "of the best held-out loss, and writes them into the same initializers.")
    p.add_argument("dense", metavar="DENSE.onnx", help="the model to match (teacher)")
    p.add_argument("pruned", metavar="PRUNED.onnx", help="the smaller model whose weights are trained")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx")
    p.add_argument("--calib", required=True, metavar="FILE.npz",
                   help="inputs (one array per graph input, optional 'labels'); every row is used, 1/8 held out")
    common["add_recover_options"](p, steps_flag="--steps")
    common["add_input_shape"](p)
    p.add_argument("--eval", metavar="DATA.npz", help="labelled data for accuracy before/after")
    p.add_argument("--report", metavar="REPORT.json", help="write the recovery report (loss curve) here")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(run=lambda args: run(args, common))


def _structure(model) -> bytes:
    """The model without initializer values: what recovery must leave unchanged."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        dims, dtype, name = list(init.dims), init.data_type, init.name
        init.Clear()
        init.name, init.data_type = name, dtype
        init.dims.extend(dims)
    return m.SerializeToString(deterministic=True)


def run(args, common) -> int:
    from pathlib import Path

    from .. import log
    from ..curvature.data import load_calib
    from ..io import check_output, load_model, save_model, write_json_atomic
    from ..pipeline import evaluate, signature
    from ..recover import RecoverConfig, recover, teacher_targets, write_values
    from ..shapes import resolve as resolve_shapes

    from ..config import AUTO_RECOVER_STEPS, UNCAPPED_STEPS

    if args.recover is not None:
        steps = args.recover
    else:
        steps = AUTO_RECOVER_STEPS if args.recover_time is None else UNCAPPED_STEPS
    if args.recover_batch < 1:
        raise UserError(f"--recover-batch must be >= 1, got {args.recover_batch}")
    out = Path(args.output)
    for other in (args.dense, args.pruned):
        if out.exists() and Path(other).exists() and out.resolve() == Path(other).resolve():
            raise UserError(f"{out}: refusing to overwrite an input model")
    if out.exists() and not args.force:
        raise UserError(f"{out}: exists (use --force to overwrite)")
    if args.report and Path(args.report).is_dir():
        raise UserError(f"{args.report}: is a directory (--report needs a file path)")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available to PyTorch")
    dense = load_model(args.dense, allow_quantized=False)
    pruned = load_model(args.pruned, allow_quantized=False)
    if signature(pruned) != signature(dense):
        raise UserError(f"{args.pruned}: inputs/outputs differ from {args.dense}'s (recovery needs the same signature)")
    shapes = resolve_shapes(dense, args.input_shape or None, args.calib)
    data = load_calib(dense, args.calib, 1 << 62, args.seed, shapes=shapes)
    before = evaluate(pruned, args.eval) if args.eval else None
    structure = _structure(pruned)
    cfg = RecoverConfig(steps=steps, lr=args.recover_lr, batch_size=args.recover_batch, seed=args.seed,
                        temperature=args.recover_temperature,
                        device=args.device, mix=args.recover_mix, seconds=args.recover_time)
    names, limit = [], 1 << 62
    if args.recover_features:
        from ..curvature.collect import available_bytes
        from ..recover import branch_tensors

        names, limit = branch_tensors(dense), int(0.25 * (available_bytes() or 1 << 34))
    teacher, features = teacher_targets(dense, data.inputs, names, limit)
    res = recover(pruned, data.inputs, teacher, cfg, data.labels, features=features, dense=dense)
    write_values(pruned, res.values)
    if _structure(pruned) != structure:
        raise RuntimeError("internal error: recovery changed the model's structure")
    try:
        check_output(pruned)
    except Exception as exc:
        raise RuntimeError(f"internal error: recovered model fails onnx.checker: {exc}") from exc
    report = {"dense": str(args.dense), "pruned": str(args.pruned), "output": str(out), "calibration": str(args.calib),
              "recovery": {"steps_per_round": res.planned, "lr": args.recover_lr, "batch": args.recover_batch,
                           "temperature": args.recover_temperature,
                           "rounds": [res.summary()]}}
    if args.recover_time is not None:
        report["recovery"]["seconds_per_round"] = args.recover_time
    if args.eval:
        report["accuracy"] = {"dense": evaluate(dense, args.eval), "before": before, "after": evaluate(pruned, args.eval)}
    from ..distributed import is_main

    if not is_main():  # under torchrun: rank 0 writes
        return 0
    save_model(pruned, out, src=args.pruned, force=args.force)
    if args.report:
        try:
            write_json_atomic(report, args.report)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    s = res.summary()
    held = (f"; held-out loss {s['holdout_loss_before']:.4g} -> {s['holdout_loss_after']:.4g} (kept step "
            f"{s['best_step']})" if s["samples"].get("holdout") else "")
    print(f"wrote {out}: {len(res.values)} tensors trained in {s['seconds']:.1f} s{held}")
    if "accuracy" in report:
        a = report["accuracy"]
        print(f"accuracy: dense {a['dense']:.2%}, pruned {a['before']:.2%} -> {a['after']:.2%}")
    log.info("structure unchanged: only initializer values were written")
    return 0
