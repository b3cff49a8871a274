"""Speed-up confidence intervals, adaptive run counts, pinned threads and GPU warm-up
(graphprune.bench); real onnxruntime sessions on small conv models, no timing assertions."""
from __future__ import annotations

import numpy as np
import pytest

from graphprune.bench import (benchmark, block_bootstrap, ci_half_width, default_threads, provider_options,
                              speedup_ci, warm_up)
from graphprune.errors import UserError
from tests.test_bench import conv_model


def test_speedup_ci_contains_point_and_narrows_with_runs():
    rng = np.random.default_rng(0)
    drift = np.repeat(rng.normal(1.0, 0.2, 50), 20)  # slow drift shared by both models
    base = 2e6 * drift * rng.lognormal(0, 0.05, 1000)
    other = 1e6 * drift * rng.lognormal(0, 0.05, 1000)
    sp, lo, hi = speedup_ci(base, other)
    assert lo <= sp <= hi and 1.9 < sp < 2.1
    sp100, lo100, hi100 = speedup_ci(base[:100], other[:100])
    assert ci_half_width(sp, lo, hi) < ci_half_width(sp100, lo100, hi100)
    assert speedup_ci(base, other) == (sp, lo, hi)  # seeded: reproducible
    same = speedup_ci(base, base)
    assert same == (1.0, 1.0, 1.0)
    assert np.isnan(speedup_ci([1, 2], [1, 2])[1])  # too few runs for an interval
    assert ci_half_width(1.0, float("nan"), 2.0) == float("inf")


def test_block_bootstrap_resamples_contiguous_blocks():
    idx = block_bootstrap(np.zeros(64), iters=50, seed=1)
    assert idx.shape == (50, 64) and idx.min() >= 0 and idx.max() < 64
    block = int(round(64 ** (1 / 3)))
    first = idx[:, :block]
    assert (np.diff(first, axis=1) == 1).all()  # each block is a run of consecutive iterations


@pytest.fixture(scope="module")
def pair():
    return conv_model((8, 64, 64), hw=16, name="dense"), conv_model((8, 32, 32), hw=16, name="pruned")


def test_benchmark_reports_interval_and_stops_on_it(pair):
    dense, pruned = pair
    res = benchmark([("dense", dense), ("pruned", pruned)], batches=(2,), warmup=1, runs=10, ci=0.99,
                    max_time=30, threads=1)
    rows = {r["model"]: r for r in res["results"]}
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["baseline"] == "dense"
    p = rows["pruned"]
    lo, hi = p["speedup_ci"]
    assert lo <= p["speedup"] <= hi
    assert p["speedup"] == pytest.approx(rows["dense"]["p50_ms"] / p["p50_ms"])
    assert p["stopped"] == "ci" and p["runs"] == 10  # a ±99% target is met at the first check
    assert res["settings"]["threads"] == 1 and res["settings"]["ci"] == 0.99


def test_benchmark_time_cap(pair):
    dense, pruned = pair
    res = benchmark([("dense", dense), ("pruned", pruned)], batches=(1,), warmup=0, runs=3, ci=1e-9,
                    max_time=0.3)
    p = [r for r in res["results"] if r["model"] == "pruned"][0]
    assert p["stopped"] == "max_time" and p["runs"] > 3
    assert res["settings"]["threads"] == default_threads() >= 1  # pinned to an explicit count, recorded


def test_benchmark_without_ci_stops_after_runs(pair):
    res = benchmark(list(pair), batches=(1,), warmup=0, runs=4)
    assert all(r["runs"] == 4 and r["stopped"] == "runs" for r in res["results"])


@pytest.mark.parametrize("kw", [dict(ci=0), dict(ci=1.5), dict(conf=1.0), dict(max_time=0), dict(precision="int4")])
def test_bad_interval_settings(pair, kw):
    with pytest.raises(UserError):
        benchmark(list(pair), batches=(1,), warmup=0, runs=2, **kw)


def test_warm_up_until_stable_with_a_fake_clock():
    # clock readings around each run: runs take 900, 300, 100, 100, 95, 100, ... ns
    readings = iter(np.cumsum([0, 900, 0, 300, 0, 100, 0, 100, 0, 95, 0, 100, 0, 100]).tolist())
    runs = []
    n = warm_up(lambda: runs.append(1), 2, until_stable=True, clock=lambda: next(readings))
    assert n == 5 and len(runs) == 5  # 100, 100, 95: three in a row within 20% after the fifth run
    assert warm_up(lambda: None, 3) == 3  # without until_stable: exactly the count


def test_tensorrt_options_carry_precision_and_caches(tmp_path):
    opts = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "fp16",
                            cache_dir=str(tmp_path))
    name, trt = opts[0]
    assert name == "TensorrtExecutionProvider" and trt["trt_fp16_enable"] is True
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == str(tmp_path)
    assert opts[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_options(["TensorrtExecutionProvider"], "fp32", str(tmp_path))[0][1]["trt_fp16_enable"] is False
    assert provider_options(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
