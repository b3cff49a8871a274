"""One-shot pruning of the digits-trained transformers (samples/digits_transformers.py).

    python benchmarks/transformers_digits.py [--budgets 0.7,0.5] [--criteria magnitude,taylor,fisher,kron-obd]
                                             [--samples 128,256] [--unlabelled]

For `digits_vit` (packed-qkv ViT, 4 heads x 2 blocks) and `digits_encoder` (post-LN
nn.TransformerEncoder; its TorchScript export as shipped, and the same weights exported by the
dynamo exporter, whose nn.MultiheadAttention heads graphprune recognises), at each `--keep-flops` budget and criterion, with and without OBS
compensation: accuracy on the 360 held-out digits, MACs kept, how many attention heads and MLP
neurons the planner kept, and wall time. Calibration: the first 128 and all 256 images of
samples/digits_calib.npz, with their labels (``--unlabelled``: without, the label-free loss).
`--best-effort` is on, so a budget the prunable groups cannot reach is recorded as reached.
Results: benchmarks/results/transformers_digits.{json,md}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphprune.pipeline import PruneConfig, prune  # noqa: E402
from graphprune.planner import Budget  # noqa: E402

CALIB, TEST = ROOT / "samples" / "digits_calib.npz", ROOT / "samples" / "digits_test.npz"
MODELS = {"digits_vit": ROOT / "samples" / "digits_vit.onnx", "digits_encoder": ROOT / "samples" / "digits_encoder.onnx",
          "digits_encoder_dynamo": None}  # the same trained encoder exported by the dynamo exporter


def _dynamo_encoder(work: str) -> Path:
    """samples/digits_encoder.pt exported with dynamo=True: nn.MultiheadAttention's heads are
    recognised in that exporter's graph (the TorchScript export keeps them whole)."""
    import torch

    from samples.digits_transformers import digits_encoder
    from samples.transformers import export

    m = digits_encoder()
    m.load_state_dict(torch.load(ROOT / "samples" / "digits_encoder.pt", weights_only=True))
    path = Path(work) / "digits_encoder_dynamo.onnx"
    export(m.eval(), path, exporter="dynamo", dynamic_seq=False, name="encoder",
           example=torch.zeros(2, 4, 16), dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def _calib_for(model: str, work: str, unlabelled: bool) -> tuple[str, str]:
    """The encoder takes 4 flattened 4x4 patches (N, 4, 16): convert the image files once; drop
    the calibration labels with ``unlabelled``."""
    import numpy as np

    from samples.digits_transformers import to_patches

    out = []
    for src, keep_labels in ((CALIB, not unlabelled), (TEST, True)):
        z = dict(np.load(src))
        x = next(v for k, v in z.items() if k != "labels")
        dst = Path(work) / f"{model}_{src.name}"
        if model == "digits_encoder":
            x = np.asarray(to_patches(x), np.float32)
        np.savez(dst, input=x, **({"labels": z["labels"]} if keep_labels else {}))
        out.append(str(dst))
    return out[0], out[1]


def heads_and_neurons(report: dict) -> dict:
    heads = [g for g in report["groups"] if g["prunable"] and g["size"] <= 16]
    neurons = [g for g in report["groups"] if g["prunable"] and g["size"] > 16]
    return {"heads_kept": f"{sum(g['kept'] for g in heads)}/{sum(g['size'] for g in heads)}",
            "neurons_kept": f"{sum(g['kept'] for g in neurons)}/{sum(g['size'] for g in neurons)}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.7,0.5")
    ap.add_argument("--criteria", default="magnitude,taylor,fisher,kron-obd")
    ap.add_argument("--samples", default="128,256", help="calibration sizes to compare")
    ap.add_argument("--unlabelled", action="store_true", help="calibrate without the labels")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "transformers_digits"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for model, path in MODELS.items():
            path = path or _dynamo_encoder(work)
            calib, test = _calib_for(model.replace("_dynamo", ""), work, args.unlabelled)
            for ratio, criterion, samples in itertools.product(
                    [float(b) for b in args.budgets.split(",")], args.criteria.split(","),
                    [int(n) for n in args.samples.split(",")]):
                for comp in ([None] if criterion == "magnitude" else [True, False]):
                    cfg = PruneConfig(criterion=criterion, budget=Budget("flops", ratio, best_effort=True),
                                      calib=calib, eval_data=test, compensate=comp, force=True, samples=samples,
                                      recover=0)
                    t = time.perf_counter()
                    rep = prune(path, Path(work) / "out.onnx", cfg)
                    row = {"model": model, "keep_flops": ratio, "criterion": criterion, "samples": samples,
                           "loss": rep.get("loss"),
                           "compensation": rep["compensation"], "accuracy_before": rep["accuracy"]["before"],
                           "accuracy_after": rep["accuracy"]["after"], "macs_ratio": rep["totals"]["macs_ratio"],
                           "budget_met": rep["budget_met"], "seconds": round(time.perf_counter() - t, 2),
                           **heads_and_neurons(rep)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    Path(args.out + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| model (dense acc.) | keep-flops | criterion | calibration | compensation | accuracy | MACs kept | "
             "heads kept | MLP neurons kept | s |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} ({r['accuracy_before']:.1%}) | {r['keep_flops']} | {r['criterion']} | "
                     f"{r['samples']} ({r['loss']}) | "
                     f"{r['compensation'] or 'none'} | {r['accuracy_after']:.1%} | {r['macs_ratio']:.1%}"
                     f"{'' if r['budget_met'] else ' (not reachable)'} | {r['heads_kept']} | {r['neurons_kept']} | "
                     f"{r['seconds']} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
