"""Stage: recover. Distillation of the pruned model from the dense one on the calibration inputs
(graphprune/recover.py trains; this stage holds what recovery needs across rounds)."""
from __future__ import annotations

import time

import onnx

from ..config import AUTO_RECOVER_STEPS, UNCAPPED_STEPS, PruneConfig
from ..errors import UserError
from ..runtime import GraphModel
from ..tracer import Trace
from .accuracy import evaluate


def recovery_steps(config: PruneConfig) -> int:
    """Recovery steps per round that ``config`` asks for (``recover=None``: automatic; with
    ``recover_time`` this is the cap of the count the time budget sets)."""
    if config.recover_time is not None:
        if not (config.recover_time > 0 and config.recover_time < float("inf")):
            raise UserError(f"--recover-time must be a positive number of seconds, got {config.recover_time}")
        if config.calib is None:
            raise UserError("--recover-time distils from the dense model on the calibration inputs: give --calib FILE.npz")
        if config.recover is None:
            return UNCAPPED_STEPS
    if config.recover is None:
        auto = config.calib is not None and config.budget.kind != "lossless"
        return AUTO_RECOVER_STEPS if auto else 0
    if config.recover < 0:
        raise UserError(f"--recover must be >= 0 steps, got {config.recover}")
    if config.recover and config.calib is None:
        raise UserError("--recover distils from the dense model on the calibration inputs: give --calib FILE.npz")
    return config.recover


class Recovery:
    """What recovery needs across rounds: the calibration inputs (every row of the file), the dense
    model's outputs on them (computed once, before scoring or compensation touch the weights), and the
    names of the original's initializers (only those may be trained: verification scatters them back)."""

    def __init__(self, model: onnx.ModelProto, tr: Trace, config: PruneConfig, steps: int, timings: dict):
        from ..curvature.collect import available_bytes
        from ..curvature.data import load_calib
        from ..recover import RecoverConfig, branch_tensors, teacher_targets

        t = time.perf_counter()
        data = load_calib(model, config.calib, 1 << 62, config.seed, shapes=tr.input_shapes)
        self.inputs, self.labels = data.inputs, data.labels
        dense = GraphModel(tr.graph, model)
        names = branch_tensors(dense.model) if config.recover_features else []
        self.teacher, self.features = teacher_targets(dense, self.inputs, names,
                                                      int(0.25 * (available_bytes() or 1 << 34)))
        self.allowed = {name for name, t in tr.graph.tensors().items() if hasattr(t, "values")}
        self.cfg = RecoverConfig(steps=steps, lr=config.recover_lr, batch_size=config.recover_batch,
                                 temperature=config.recover_temperature,
                                 seed=config.seed, device=config.device, mix=config.recover_mix,
                                 seconds=None if config.recover_time is None
                                 else config.recover_time / max(config.steps, 1))
        self.dense = None
        if self.cfg.mix > 0:
            from ..export import export_graph

            self.dense = export_graph(tr.graph.copy(), model)  # before compensation touches the weights
        self.config = config
        self.rounds: list[dict] = []
        timings["recovery_teacher"] = time.perf_counter() - t

    def run(self, pruned: onnx.ModelProto, timings: dict, tag: str = "", eval_data: str | None = None) -> list[str]:
        """Train ``pruned``'s weights in place; returns the names of the tensors written."""
        from ..recover import recover, write_values

        t = time.perf_counter()
        before = evaluate(pruned, eval_data) if eval_data else None
        from converters.onnx_to_torch import ExecutionError

        try:
            res = recover(pruned, self.inputs, self.teacher, self.cfg, self.labels, self.allowed,
                          tag=tag.replace("_", " "), features=self.features, dense=self.dense)
        except ExecutionError as exc:
            raise UserError(f"recovery: {exc} (use --recover 0)") from None
        write_values(pruned, res.values)
        entry = res.summary()
        if before is not None:
            entry["accuracy_before_recovery"] = before
        self.rounds.append(entry)
        timings[tag + "recovery"] = time.perf_counter() - t
        return sorted(res.values)

    def report(self) -> dict:
        steps = self.cfg.steps
        if self.cfg.seconds is not None:  # the count the time budget gave (the last round's)
            steps = self.rounds[-1]["planned_steps"] if self.rounds else 0
        extra = {} if self.cfg.seconds is None else {"seconds_per_round": self.cfg.seconds}
        return {"steps_per_round": steps, **extra, "lr": self.config.recover_lr, "batch": self.config.recover_batch,
                "temperature": self.config.recover_temperature,
                "rounds": self.rounds}
