"""`graphprune bench` and graphprune.bench: real onnxruntime runs on tiny models (no mocks of onnxruntime)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from graphprune import log
from graphprune.bench import benchmark, resolve_providers, speedups
from graphprune.cli import main
from graphprune.errors import UserError
from tests.helpers import const, make_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "digits_resnet.onnx"
AVAILABLE = ort.get_available_providers()
HAS_CUDA = "CUDAExecutionProvider" in AVAILABLE
HAS_TRT = "TensorrtExecutionProvider" in AVAILABLE
FAST = dict(warmup=1, runs=5, batches=(1, 4))


def conv_model(widths, *, hw=16, batch="N", name="m") -> onnx.ModelProto:
    """A chain of 3x3 convs (padding 1) with ReLUs: widths[0] input channels, widths[-1] output channels."""
    nodes, inits, x = [], [], "x"
    for i, (cin, cout) in enumerate(zip(widths, widths[1:])):
        inits += [const(f"w{i}", (cout, cin, 3, 3)), const(f"b{i}", (cout,))]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x = f"r{i}"
    nodes[-1].output[0] = "y"
    m = make_model(nodes, [("x", [batch, widths[0], hw, hw])], [("y", [batch, widths[-1], hw, hw])], inits)
    m.graph.name = name
    return m


def macs(widths, hw=16) -> int:
    return sum(cin * cout * 9 * hw * hw for cin, cout in zip(widths, widths[1:]))


SMALL, BIG = (3, 4), (3, 64, 64, 64)


@pytest.fixture(scope="module")
def small():
    return conv_model(SMALL, name="small")


@pytest.fixture(scope="module")
def big():
    return conv_model(BIG, name="big")


@pytest.fixture(scope="module")
def two_files(tmp_path_factory, small, big):
    d = tmp_path_factory.mktemp("bench")
    onnx.save(small, d / "small.onnx")
    onnx.save(big, d / "big.onnx")
    return d / "small.onnx", d / "big.onnx"


# ---------------------------------------------------------------- library

def test_result_structure_and_sanity(small, big):
    res = benchmark([("small", small), ("big", big)], **FAST)
    assert res["requested_provider"] == "cpu" and res["providers"] == ["CPUExecutionProvider"]
    assert [m["name"] for m in res["models"]] == ["small", "big"]
    assert all(m["providers"] == ["CPUExecutionProvider"] for m in res["models"])
    mach = res["machine"]
    assert mach["cpu_count"] >= 1 and mach["onnxruntime"] == ort.__version__ and mach["platform"]
    assert res["settings"]["batches"] == [1, 4] and res["settings"]["runs"] == 5
    assert {(r["model"], r["batch"]) for r in res["results"]} == {(m, b) for m in ("small", "big") for b in (1, 4)}
    assert res["skipped"] == [] and res["notes"] == []
    for r in res["results"]:
        assert r["runs"] == 5
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["max_ms"]
        assert r["min_ms"] <= r["mean_ms"] <= r["max_ms"] and r["std_ms"] >= 0
        assert r["throughput"] == pytest.approx(r["batch"] / (r["p50_ms"] / 1e3))
    json.dumps(res)  # JSON-serialisable as is


def test_runs_interleave_in_rotating_order(small, big):
    third = conv_model((3, 8), name="third")
    calls = []
    ticks = []

    def clock():
        ticks.append(1)
        return time.perf_counter_ns()

    res = benchmark([("a", small), ("b", big), ("c", third)], batches=(2,), warmup=2, runs=6, clock=clock,
                    on_run=lambda name, batch, phase, it: calls.append((name, batch, phase, it)))
    assert [c for c in calls if c[2] == "warmup"] == [(n, 2, "warmup", i) for i in range(2) for n in "abc"]
    timed = [c for c in calls if c[2] == "timed"]
    assert len(timed) == 18 and len(ticks) == 2 * 18  # two clock reads around every timed run
    order = "abc"
    for it in range(6):  # every iteration runs each model once, the first one rotating
        names = [n for n, _, _, i in timed if i == it]
        assert names == list(order[it % 3:] + order[:it % 3])
    assert all(r["runs"] == 6 for r in res["results"])


def test_min_time_extends_runs(small):
    t0 = time.perf_counter()
    res = benchmark([small], batches=(1,), warmup=0, runs=2, min_time=0.2)
    assert time.perf_counter() - t0 >= 0.2
    assert res["results"][0]["runs"] > 2


def test_bigger_model_is_slower(small, big):
    assert macs(BIG) > 100 * macs(SMALL)  # a clear gap: ~700x the work
    res = benchmark([("small", small), ("big", big)], **FAST)
    p50 = {(r["model"], r["batch"]): r["p50_ms"] for r in res["results"]}
    for b in (1, 4):
        assert p50[("big", b)] > 3 * p50[("small", b)], p50
    sp = speedups(res)  # baseline: the small model, so the big one is a slow-down
    assert sp["small"] == {1: pytest.approx(1.0), 4: pytest.approx(1.0)}
    assert all(v < 1 / 3 for v in sp["big"].values())
    assert speedups(res, baseline="big")["small"][1] > 3
    with pytest.raises(UserError):
        speedups(res, baseline="nope")


def test_static_batch_model_skips_other_batches(small):
    static = conv_model(SMALL, batch=1, name="static")
    res = benchmark([("dyn", small), ("static", static)], **FAST)
    got = {(r["model"], r["batch"]) for r in res["results"]}
    assert got == {("dyn", 1), ("dyn", 4), ("static", 1)}
    assert res["skipped"] == [{"model": "static", "batch": 4,
                               "reason": "input 'x' has a static batch dimension of 1"}]
    assert len(res["notes"]) == 1 and "static: batch 4 skipped" in res["notes"][0]
    sp = speedups(res)
    assert 4 not in sp["static"] and 1 in sp["static"]


def test_paths_and_protos_get_display_names(small, two_files):
    res = benchmark([str(two_files[0]), small, small], batches=(1,), warmup=0, runs=2)
    assert [m["name"] for m in res["models"]] == ["small.onnx", "small", "small#2"]
    assert res["models"][0]["source"] == str(two_files[0]) and res["models"][1]["source"] is None


def test_bad_arguments_are_user_errors(small):
    for kw in (dict(runs=0), dict(warmup=-1), dict(batches=(0,)), dict(threads=0), dict(provider="tpu")):
        with pytest.raises(UserError):
            benchmark([small], **kw)
    with pytest.raises(UserError):
        benchmark([])


def test_threads_option_runs(small):
    res = benchmark([small], batches=(1,), warmup=0, runs=2, threads=1)
    assert res["settings"]["threads"] == 1 and res["results"][0]["runs"] == 2


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available: nothing to fall back from")
def test_cuda_falls_back_to_cpu_with_one_warning(small, capsys):
    res = benchmark([("a", small), ("b", small)], provider="cuda", batches=(1,), warmup=0, runs=2)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "CUDA provider not available in this onnxruntime build; falling back to CPUExecutionProvider" in err
    assert res["requested_provider"] == "cuda" and res["providers"] == ["CPUExecutionProvider"]
    assert len(res["results"]) == 2


@pytest.mark.skipif(HAS_CUDA or HAS_TRT, reason="a GPU provider is available")
def test_tensorrt_and_io_binding_fall_back_on_cpu(small, capsys):
    assert resolve_providers("tensorrt") == ["CPUExecutionProvider"]
    assert "TensorRT and CUDA provider not available" in capsys.readouterr().err
    res = benchmark([small], provider="cpu", batches=(1,), warmup=0, runs=2, io_binding=True)
    assert "I/O binding needs the CUDA or TensorRT provider" in capsys.readouterr().err
    assert res["io_binding"] is False and res["results"][0]["runs"] == 2


# ---------------------------------------------------------------- real GPU paths

@pytest.mark.skipif(not HAS_CUDA, reason="CUDAExecutionProvider not in onnxruntime providers")
@pytest.mark.parametrize("io_binding", [False, True])
def test_cuda_provider(small, big, io_binding):
    res = benchmark([("small", small), ("big", big)], provider="cuda", io_binding=io_binding, **FAST)
    assert res["providers"][0] == "CUDAExecutionProvider" and res["io_binding"] is io_binding
    assert len(res["results"]) == 4 and all(r["p50_ms"] > 0 for r in res["results"])


@pytest.mark.skipif(not HAS_TRT, reason="TensorrtExecutionProvider not in onnxruntime providers")
def test_tensorrt_provider(small):
    res = benchmark([small], provider="tensorrt", batches=(1,), warmup=1, runs=3)
    assert res["requested_provider"] == "tensorrt"
    assert res["providers"][0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert res["results"][0]["runs"] == 3


# ---------------------------------------------------------------- command line

def cli(*args):
    """Run main() in-process; returns the exit code (output via capsys)."""
    try:
        rc = main([*map(str, args)])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    return rc


def test_cli_table_and_json(two_files, tmp_path, capsys):
    small_p, big_p = two_files
    out = tmp_path / "bench.json"
    # a 0.02 ms model next to a 0.4 ms one: its relative noise keeps the interval wide; cap the time
    assert cli("bench", small_p, big_p, "--runs", 5, "--warmup", 1, "--batch", "1,4", "--json", out,
               "--max-time", 1) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0].startswith("provider: CPUExecutionProvider (requested cpu)")
    header = stdout[1].split()
    assert header[:2] == ["model", "batch"] and "p50" in header and "speed-up" in header
    rows = [ln.split() for ln in stdout[2:6]]
    assert [(r[0], int(r[1])) for r in rows] == [("small.onnx", 1), ("big.onnx", 1), ("small.onnx", 4), ("big.onnx", 4)]
    col = header.index("speed-up") - 2  # "p50 ms", "p90 ms" are two words each in the header
    assert all(r[col].endswith("x") for r in rows) and rows[0][col] == "1.00x"
    assert all(float(r[col][:-1]) < 1 for r in rows if r[0] == "big.onnx")
    for r in rows:  # the baseline has no interval; every other model its 95% bootstrap interval
        if r[0] == "small.onnx":
            assert r[col + 1] == "-"
        else:
            lo, hi = float(r[col + 1].strip("[,")), float(r[col + 2].strip("]"))
            assert lo <= float(r[col][:-1]) <= hi
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["models"]] == ["small.onnx", "big.onnx"]
    assert data["models"][1]["source"] == str(big_p)
    assert len(data["results"]) == 4 and data["speedups"]["small.onnx"] == {"1": 1.0, "4": 1.0}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_sample_model_and_static_note(tmp_path, capsys):
    static = tmp_path / "static.onnx"
    onnx.save(conv_model((1, 4), hw=8, batch=1), static)
    assert cli("bench", SAMPLE, static, "--runs", 3, "--warmup", 1, "--batch", "1,2", "--threads", 1) == 0
    out = capsys.readouterr().out
    assert "note: static.onnx: batch 2 skipped (input 'x' has a static batch dimension of 1)" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("digits_resnet", "static"))]
    assert [(r[0], r[1]) for r in rows] == [("digits_resnet.onnx", "1"), ("static.onnx", "1"), ("digits_resnet.onnx", "2")]


def test_cli_profile_splits_kernel_time_by_op_type(two_files, tmp_path, capsys):
    """--profile N: onnxruntime's profiler, per op type, for every model; MAC ops against the rest."""
    small_p, big_p = two_files
    out = tmp_path / "bench.json"
    assert cli("bench", small_p, big_p, "--runs", 3, "--warmup", 1, "--batch", "2", "--ci", 0, "--threads", 1,
               "--profile", 3, "--json", out) == 0
    text = capsys.readouterr().out
    assert "profile at batch 2 (onnxruntime profiler, kernel ms per inference, mean of 3 runs):" in text
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith(("Conv", "MAC", "all"))}
    assert "(x" in lines["Conv"] and "(x" in lines["MAC"]  # the second model's ratio to the first
    profiles = json.loads(out.read_text())["profiles"]
    assert [(p["model"], p["batch"], p["runs"]) for p in profiles] == [("small.onnx", 2, 3), ("big.onnx", 2, 3)]
    for p in profiles:
        assert p["by_op"]["Conv"] > 0 and p["mac_ops_ms"] >= p["by_op"]["Conv"]
        assert p["kernel_ms"] == pytest.approx(p["mac_ops_ms"] + p["other_ops_ms"])
        assert p["kernel_ms"] == pytest.approx(sum(p["by_op"].values()))
    small, big = profiles
    # 3 convs of 64 channels against one of 4: the profile must see the MAC ops' time grow
    assert big["mac_ops_ms"] > 5 * small["mac_ops_ms"]
    # the profiler's files went to a temporary folder, then away (none under onnxruntime's default name)
    for folder in {ROOT, Path.cwd()}:
        assert not [p for p in folder.iterdir() if p.name.startswith(("onnxruntime_profile", "model0_", "model1_"))]


def test_profile_splits_time_by_output_size(tmp_path, capsys):
    """--profile also says at which output size the time goes (where a pruned detector's time did not
    fall): a 32x32 conv chain, a MaxPool to 16x16 and a wide conv there, and a Flatten."""
    m = conv_model((3, 8, 8), hw=32, name="sizes")
    m.graph.output[0].name = "r1"  # keep the 32x32 chain's last ReLU output as an intermediate
    m.graph.node[-1].output[0] = "r1"
    m.graph.initializer.extend([const("w9", (96, 8, 3, 3))])
    m.graph.node.extend([helper.make_node("MaxPool", ["r1"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                         helper.make_node("Conv", ["p", "w9"], ["c9"], pads=[1, 1, 1, 1]),
                         helper.make_node("Flatten", ["c9"], ["y"])])
    del m.graph.output[:]
    m.graph.output.extend([helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 96 * 16 * 16])])
    onnx.checker.check_model(m)
    path, out = tmp_path / "sizes.onnx", tmp_path / "bench.json"
    onnx.save(m, path)
    assert cli("bench", path, "--runs", 2, "--warmup", 1, "--batch", "2", "--ci", 0, "--threads", 1,
               "--profile", 2, "--json", out) == 0
    text = capsys.readouterr().out
    (p,) = json.loads(out.read_text())["profiles"]
    sizes = p["by_size"]
    assert list(sizes) == ["32x32", "16x16", "other"]  # largest first, non-image outputs last
    assert sizes["32x32"]["mac_ops_ms"] > 0 and sizes["16x16"]["mac_ops_ms"] > 0
    assert sizes["16x16"]["other_ops_ms"] > 0  # the MaxPool's output is 16x16
    assert sum(v["mac_ops_ms"] for v in sizes.values()) == pytest.approx(p["mac_ops_ms"])
    assert sum(v["other_ops_ms"] for v in sizes.values()) == pytest.approx(p["other_ops_ms"])
    assert "by output size" in text and "16x16 MAC ops *" in text and "32x32 other ops" in text


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available: nothing to fall back from")
def test_cli_cuda_fallback_warns(two_files, capsys):
    assert cli("bench", two_files[0], "--provider", "cuda", "--runs", 2, "--warmup", 0, "--batch", 1) == 0
    cap = capsys.readouterr()
    assert "falling back to CPUExecutionProvider" in cap.err
    assert cap.out.startswith("provider: CPUExecutionProvider (requested cuda)")


@pytest.mark.parametrize("args, needle", [
    (["--batch", "1,x"], "--batch: expected comma-separated integers"),
    (["--batch", ""], "--batch: expected comma-separated integers"),
    (["--batch", "1,0"], "--batch: batch sizes must be >= 1"),
    (["--batch", "-4"], "--batch: batch sizes must be >= 1"),
    (["--runs", "0"], "--runs must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--min-time", "0"], "--min-time must be > 0"),
    (["--profile", "-1"], "--profile must be >= 0 runs"),
    (["--runs", "many"], "argument --runs: invalid int value"),
    (["--provider", "tpu"], "argument --provider: invalid choice"),
])
def test_cli_bad_arguments(two_files, args, needle, capsys):
    assert cli("bench", two_files[0], *args) == 2
    cap = capsys.readouterr()
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphprune: error:") and needle in lines[0], cap.err
    assert cap.out == ""


def test_cli_json_path_problems(two_files, tmp_path, capsys):
    for target, needle in ((tmp_path, "is a directory"), (tmp_path / "no" / "r.json", "does not exist"),
                           (two_files[0], "would overwrite an input model")):
        assert cli("bench", two_files[0], "--runs", 1, "--json", target) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and needle in lines[0]


def test_cli_missing_and_corrupt_models_subprocess(two_files, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage, not protobuf" * 10)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "GRAPHPRUNE_QUIET"}
    for path, needle in ((tmp_path / "missing.onnx", "no such file"), (corrupt, "not a valid ONNX file"),
                         (empty, "empty file"), (tmp_path, "is a directory")):
        r = subprocess.run([sys.executable, "-m", "graphprune.cli", "bench", str(two_files[0]), str(path),
                            "--runs", "1", "--json", str(tmp_path / "r.json")],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("graphprune: error:") and needle in lines[0], r.stderr
        assert not (tmp_path / "r.json").exists()


def test_quiet_flag_silences_progress(two_files, capsys):
    was_quiet = log._quiet
    log.set_quiet(False)
    try:
        assert cli("bench", two_files[0], "--runs", 1, "--warmup", 0, "--batch", 1) == 0
        assert "graphprune: bench:" in capsys.readouterr().err
        assert cli("-q", "bench", two_files[0], "--runs", 1, "--warmup", 0, "--batch", 1) == 0
        assert capsys.readouterr().err == ""
    finally:
        log.set_quiet(was_quiet)
