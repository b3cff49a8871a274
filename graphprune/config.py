"""What a prune run is asked to do: ``PruneConfig`` (the CLI's options as one value) and the defaults
that depend on other options."""
from __future__ import annotations

from dataclasses import dataclass, field

from .planner import Budget

#: the distillation temperature recovery uses unless told (PruneConfig and recover.RecoverConfig)
RECOVER_TEMPERATURE = 2.0

#: what ``--criterion auto`` (the default) means with calibration data (without it: magnitude, since
#: curvature from noise inputs means nothing); chosen from the held-out table in the README
AUTO_CRITERION = "taylor"


@dataclass
class PruneConfig:
    criterion: str = "auto"  # AUTO_CRITERION with --calib, else magnitude
    budget: Budget = field(default_factory=lambda: Budget("flops", 0.5))
    verify: bool = True
    rtol: float = 1e-4
    seed: int = 0
    force: bool = False
    eval_data: str | None = None
    external_data: bool = False  # write OUT.data beside OUT (automatic for models over 2 GB)
    # curvature criteria and compensation
    calib: str | None = None  # .npz, one array per input (+ optional labels)
    samples: int = 128
    batch_size: int = 32
    loss: str = "auto"
    compensate: bool | str | None = None  # None: on for curvature criteria; or a method name
    damping: float = 1e-3
    device: str = "cpu"
    steps: int = 1
    # recovery by distillation from the dense model (graphprune/recover.py): steps per round; None:
    # AUTO_RECOVER_STEPS when --calib is given, else off
    recover: int | None = None
    recover_lr: float = 1e-3
    recover_temperature: float = RECOVER_TEMPERATURE  # τ of the distillation KL on classifier logits
    recover_batch: int = 32
    recover_features: bool = False  # also match block-boundary activations the plan left whole
    recover_mix: float = 0.5  # fraction of each recovery batch replaced by mixed calibration inputs
    #: wall seconds for recovery in all (split evenly over the rounds): the step count is sized from the
    #: measured step time (``recover`` then caps it; alone it enables recovery)
    recover_time: float | None = None
    max_memory: int | None = None  # bytes for curvature statistics (default: 80% of available RAM)
    block_size: int | None = None  # WoodFisher diagonal blocks (weights); None: the largest that fits max_memory
    # hardware-aware planning (--keep-latency)
    provider: str = "cpu"
    latency_batch: int = 8
    latency_cache: str | None = None
    latency_attempts: int = 5
    #: the input size to count and check at: ``--input-shape`` strings or {input: dims}; None: the
    #: calibration arrays' shapes, else the model's static dims (see graphprune.shapes.resolve)
    input_shapes: object = None


#: recovery steps per round when --recover is not given and calibration data is
AUTO_RECOVER_STEPS = 100
#: the step cap when only --recover-time is given (the time budget sets the count)
UNCAPPED_STEPS = 1 << 40


def resolved(config: PruneConfig) -> PruneConfig:
    """``config`` with ``criterion="auto"`` replaced by what it means for this run, and a
    ``round_to="auto"`` budget told where to measure (the provider, batch and cache of the config)."""
    from dataclasses import replace

    if config.criterion == "auto":
        config = replace(config, criterion=AUTO_CRITERION if config.calib is not None else "magnitude")
    if config.budget.round_to == "auto" and config.budget.hardware is None:
        config = replace(config, budget=replace(config.budget, hardware={
            "provider": config.provider, "batch": config.latency_batch, "cache": config.latency_cache}))
    return config
