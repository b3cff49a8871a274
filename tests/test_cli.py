"""The real `graphprune` command line, run as a subprocess: output, reports, exit codes, user errors."""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.helpers import make_model

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "digits_resnet.onnx"
TEST_DATA = ROOT / "samples" / "digits_test.npz"


def gp(*args, quiet=True, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "graphprune.cli", *(["-q"] if quiet else []), *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k != "GRAPHPRUNE_QUIET"}  # conftest sets it
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, timeout=300, env=env)


def tmp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def assert_user_error(r: subprocess.CompletedProcess, *, folder: Path | None = None, absent=(), needle=None):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"user error must be exactly one line on stderr, got: {r.stderr!r}"
    assert lines[0].startswith("graphprune: error:"), lines
    if needle is not None:
        assert needle.lower() in lines[0].lower(), lines[0]
    for p in absent:
        assert not Path(p).exists(), f"{p} left behind after a user error"
    if folder is not None:
        assert tmp_leftovers(folder) == []
    return lines[0]


def inspect_json(path) -> dict:
    r = gp("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def T(name, a):
    return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)


def odd_widths_model(seed=0) -> onnx.ModelProto:
    """conv(3->12) relu conv(12->20) relu conv(20->30) relu GAP flatten gemm(30->5): widths not multiples of 8."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["h3"], name="conv3", pads=[1] * 4),
        helper.make_node("Relu", ["h3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [T("w1", w(12, 3, 3, 3)), T("b1", w(12)), T("w2", w(20, 12, 3, 3)), T("b2", w(20)),
             T("w3", w(30, 20, 3, 3)), T("b3", w(30)), T("wf", w(5, 30)), T("bf", w(5))]
    return make_model(nodes, [("x", ["N", 3, 16, 16])], [("y", ["N", 5])], inits)


@pytest.fixture(scope="module")
def pruned_sample(tmp_path_factory):
    """digits_resnet pruned once at --keep-flops 0.5 --round-to 8 with --report and --eval."""
    d = tmp_path_factory.mktemp("pruned_sample")
    out, rep = d / "p.onnx", d / "r.json"
    r = gp("prune", SAMPLE, "-o", out, "--keep-flops", "0.5", "--round-to", "8", "--report", rep,
           "--eval", TEST_DATA)
    assert r.returncode == 0, r.stderr
    return {"dir": d, "out": out, "report": rep, "stdout": r.stdout, "data": json.loads(rep.read_text())}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    p = d / "small.onnx"
    onnx.save(odd_widths_model(), str(p))
    return p


# --------------------------------------------------------------------------- inspect
def test_version_and_help():
    r = gp("--version")
    assert r.returncode == 0 and r.stdout.startswith("graphprune ")
    r = gp("--help")
    assert r.returncode == 0 and "prune" in r.stdout and "inspect" in r.stdout and "verify" in r.stdout
    r = gp()  # no subcommand: argparse user error
    assert_user_error(r)


def test_inspect_human():
    r = gp("inspect", SAMPLE)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "opset 17" in out and "MACs 2.12M" in out and "params 77.00k" in out
    assert "5 groups, 4 prunable (192 channels)" in out
    frozen = [ln for ln in out.splitlines() if " frozen " in ln]
    assert len(frozen) == 1 and "/fc/Gemm" in frozen[0] and "reaches graph output 'output'" in frozen[0]
    assert r.stderr == ""


def test_inspect_json():
    info = inspect_json(SAMPLE)
    assert info["opset"] == 17 and info["nodes"] == 16
    assert info["macs"] == 2116224 and info["params"] == 77002
    groups = info["groups"]
    assert [g["id"] for g in groups] == list(range(len(groups))) == list(range(5))
    assert [g["size"] for g in groups] == [32, 32, 64, 64, 10]
    assert info["prunable_groups"] == sum(g["prunable"] for g in groups) == 4
    assert info["prunable_channels"] == sum(g["size"] for g in groups if g["prunable"]) == 192
    for g in groups:
        assert g["kept"] == g["size"] and g["removed"] == []
        assert g["prunable"] == (not g["frozen"] and g["size"] > 1)
        assert g["sources"] and all({"node", "tensor", "channels"} <= set(s) for s in g["sources"])
    frozen = [g for g in groups if not g["prunable"]]
    assert len(frozen) == 1 and frozen[0]["frozen"] == ["reaches graph output 'output'"]
    assert [s["node"] for s in frozen[0]["sources"]] == ["/fc/Gemm"]
    # residual: the stem and layer1.conv2 feed one Add, so they form one group
    assert {s["node"] for s in groups[0]["sources"]} == {"/stem/stem.0/Conv", "/layer1/conv2/Conv"}


def test_inspect_all_flag_and_many_groups(small_model):
    r = gp("inspect", small_model, "--all")
    assert r.returncode == 0, r.stderr
    assert "4 groups, 3 prunable (62 channels)" in r.stdout


# --------------------------------------------------------------------------- prune + report
def _check_report_consistency(report: dict, pruned_path: Path):
    t = report["totals"]
    for key in ("macs_before", "macs_after", "params_before", "params_after", "macs_ratio", "params_ratio",
                "channels_removed"):
        assert key in t
    assert t["macs_ratio"] == pytest.approx(t["macs_after"] / t["macs_before"])
    assert t["params_ratio"] == pytest.approx(t["params_after"] / t["params_before"])
    assert t["channels_removed"] == sum(len(g["removed"]) for g in report["groups"])
    for g in report["groups"]:
        rem = g["removed"]
        assert rem == sorted(set(rem)) and all(0 <= i < g["size"] for i in rem)
        assert g["kept"] == g["size"] - len(rem)
        if not g["prunable"]:
            assert rem == []
        if rem:
            assert g["kept"] >= 1
            assert set(g["removed_channels"]) == {s["node"] for s in g["sources"]}
            for s in g["sources"]:
                assert len(g["removed_channels"][s["node"]]) == len(rem) * g["channels_per_unit"]
    # the after-values are what `inspect` says about the pruned file
    after = inspect_json(pruned_path)
    assert after["macs"] == pytest.approx(t["macs_after"])
    assert after["params"] == pytest.approx(t["params_after"])
    # every group's kept width is the pruned model's group width (matched by source node)
    sizes = {s["node"]: g["size"] for g in after["groups"] for s in g["sources"]}
    for g in report["groups"]:
        for s in g["sources"]:
            if s["node"] in sizes:
                assert sizes[s["node"]] == g["kept"] * g["channels_per_unit"] or sizes[s["node"]] == g["kept"], s
    # the output model itself: valid, smaller initializers where channels went
    onnx.checker.check_model(onnx.load(str(pruned_path)), full_check=True)


def test_prune_report_eval_and_stdout(pruned_sample):
    rep, out = pruned_sample["data"], pruned_sample["out"]
    assert rep["budget"] == {"kind": "flops", "ratio": 0.5, "cap": 0.9, "round_to": 8, "steps": 1}
    assert rep["budget_met"] is True and rep["notes"] == []
    assert rep["criterion"] == "magnitude"
    assert rep["totals"]["macs_before"] == 2116224 and rep["totals"]["params_before"] == 77002
    assert rep["totals"]["macs_ratio"] <= 0.5
    assert rep["verification"]["ok"] is True and rep["verification"]["max_rel_error"] <= 1e-4
    acc = rep["accuracy"]
    assert set(acc) == {"before", "after"} and 0.0 <= acc["after"] <= 1.0
    assert acc["before"] > 0.9  # the sample model is trained
    for g in rep["groups"]:
        assert g["kept"] == g["size"] or g["kept"] % 8 == 0
    _check_report_consistency(rep, out)
    so = pruned_sample["stdout"]
    assert so.startswith(f"wrote {out}:") and "channels removed" in so
    assert f"accuracy: {acc['before']:.2%} -> {acc['after']:.2%}" in so
    assert "verified against the masked original" in so
    assert tmp_leftovers(pruned_sample["dir"]) == []


def test_output_files_have_default_permissions(pruned_sample):
    umask = os.umask(0)
    os.umask(umask)
    for p in (pruned_sample["out"], pruned_sample["report"]):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, oct(p.stat().st_mode)


BUDGETS = [
    ("--keep-flops", "0.6"), ("--keep-params", "0.7"), ("--keep-channels", "0.5"), ("--lossless", None),
]


@pytest.mark.parametrize("flag,value", BUDGETS, ids=[b[0].lstrip("-") for b in BUDGETS])
@pytest.mark.parametrize("round_to", [1, 8])
def test_prune_budgets(tmp_path, small_model, flag, value, round_to):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = gp("prune", small_model, "-o", out, flag, *([value] if value else []), "--round-to", round_to,
           "--report", rep)
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    kind = flag.replace("--keep-", "") if value else "lossless"
    assert report["budget"]["kind"] == kind and report["budget"]["round_to"] == round_to
    assert report["budget_met"] is True
    t = report["totals"]
    if kind == "flops":
        assert t["macs_ratio"] <= 0.6 + 1e-9
    elif kind == "params":
        assert t["params_ratio"] <= 0.7 + 1e-9
    elif kind == "channels":
        for g in report["groups"]:
            if g["prunable"]:
                assert g["kept"] >= math.ceil(0.5 * g["size"])
                if round_to == 1:
                    assert g["kept"] == math.ceil(0.5 * g["size"])
    else:
        assert t["channels_removed"] == 0  # random weights: nothing is provably zero
    if kind != "lossless":
        assert t["channels_removed"] > 0
    for g in report["groups"]:
        assert g["kept"] == g["size"] or g["kept"] % round_to == 0, g
    _check_report_consistency(report, out)
    v = gp("verify", small_model, out, "--report", rep)
    assert v.returncode == 0 and v.stdout.startswith("OK"), v.stdout + v.stderr
    assert tmp_leftovers(tmp_path) == []


def test_criterion_l1_and_seed(tmp_path, small_model):
    out = tmp_path / "p.onnx"
    r = gp("prune", small_model, "-o", out, "--keep-flops", "0.5", "--criterion", "magnitude-l1", "--seed", "3",
           "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["criterion"] == "magnitude-l1"


def test_force_overwrites_and_no_verify(tmp_path, small_model):
    out = tmp_path / "p.onnx"
    out.write_bytes(b"old")
    r = gp("prune", small_model, "-o", out, "--keep-flops", "0.5", "--force", "--no-verify")
    assert r.returncode == 0, r.stderr
    assert "verified" not in r.stdout
    onnx.checker.check_model(onnx.load(str(out)))


def test_progress_goes_to_stderr_only(tmp_path, small_model):
    r = gp("prune", small_model, "-o", tmp_path / "p.onnx", "--keep-flops", "0.5", quiet=False)
    assert r.returncode == 0
    assert "graphprune: traced" in r.stderr
    assert all(ln.startswith("graphprune: ") for ln in r.stderr.splitlines())
    assert not any(ln.startswith("graphprune: ") for ln in r.stdout.splitlines())


def test_unreachable_budget_best_effort(tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = gp("prune", SAMPLE, "-o", out, "--keep-flops", "0.01", "--report", rep)
    line = assert_user_error(r, folder=tmp_path, absent=[out, rep], needle="--best-effort")
    assert "cannot be met" in line
    r = gp("prune", SAMPLE, "-o", out, "--keep-flops", "0.01", "--best-effort", "--report", rep, quiet=False)
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "cannot be met" in r.stderr
    report = json.loads(rep.read_text())
    assert report["budget_met"] is False
    assert len(report["notes"]) == 1 and "cannot be met" in report["notes"][0]
    assert "best reachable" in report["notes"][0]
    assert report["totals"]["macs_ratio"] > 0.01
    _check_report_consistency(report, out)
    assert gp("verify", SAMPLE, out, "--report", rep).returncode == 0


# --------------------------------------------------------------------------- verify
def test_verify_genuine_pair(pruned_sample):
    r = gp("verify", SAMPLE, pruned_sample["out"], "--report", pruned_sample["report"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OK: pruned model equals the masked original")


def _tamper(src: Path, dst: Path, delta: float = 0.5):
    m = onnx.load(str(src))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the biggest weight
    a = numpy_helper.to_array(init).copy()
    a.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    onnx.save(m, str(dst))


def test_verify_tampered_weights_exit_1(pruned_sample, tmp_path):
    bad = tmp_path / "tampered.onnx"
    _tamper(pruned_sample["out"], bad)
    r = gp("verify", SAMPLE, bad, "--report", pruned_sample["report"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith("MISMATCH") and "Traceback" not in r.stderr


def test_verify_wrong_pruned_model_exit_1(pruned_sample, small_model):
    # a model with another signature is a failed verification, not a crash
    r = gp("verify", SAMPLE, small_model, "--report", pruned_sample["report"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "MISMATCH" in r.stdout and "signature" in r.stdout


def test_verify_report_of_another_model_exit_2(pruned_sample, small_model, tmp_path):
    out, rep = tmp_path / "s.onnx", tmp_path / "s.json"
    assert gp("prune", small_model, "-o", out, "--keep-flops", "0.5", "--report", rep).returncode == 0
    r = gp("verify", SAMPLE, pruned_sample["out"], "--report", rep)
    assert_user_error(r, needle="report does not describe this original model")
    r = gp("verify", small_model, pruned_sample["out"], "--report", pruned_sample["report"])
    assert_user_error(r)


def test_verify_report_same_group_count_other_sources(pruned_sample, tmp_path):
    data = json.loads(pruned_sample["report"].read_text())
    data["groups"][1]["sources"][0]["node"] = "/not/a/node"
    rep = tmp_path / "r.json"
    rep.write_text(json.dumps(data))
    assert_user_error(gp("verify", SAMPLE, pruned_sample["out"], "--report", rep), needle="sources differ")
    data = json.loads(pruned_sample["report"].read_text())
    data["groups"][1]["removed"] = [999]
    rep.write_text(json.dumps(data))
    assert_user_error(gp("verify", SAMPLE, pruned_sample["out"], "--report", rep), needle="out of range")


@pytest.mark.parametrize("content", ["missing", "dir", "notjson", "list", "empty"])
def test_verify_bad_report_exit_2(pruned_sample, tmp_path, content):
    rep = tmp_path / "r.json"
    if content == "dir":
        rep.mkdir()
    elif content == "notjson":
        rep.write_text("{nope")
    elif content == "list":
        rep.write_text("[1, 2]")
    elif content == "empty":
        rep.write_text("{}")
    assert_user_error(gp("verify", SAMPLE, pruned_sample["out"], "--report", rep))


def test_verify_bad_model_paths_exit_2(pruned_sample, tmp_path):
    assert_user_error(gp("verify", tmp_path / "nope.onnx", pruned_sample["out"], "--report", pruned_sample["report"]),
                      needle="no such file")
    assert_user_error(gp("verify", SAMPLE, tmp_path / "nope.onnx", "--report", pruned_sample["report"]),
                      needle="no such file")


# --------------------------------------------------------------------------- user errors
def _write_bad_inputs(d: Path) -> dict[str, Path]:
    data = SAMPLE.read_bytes()
    files = {}

    def put(name, blob):
        p = d / name
        p.write_bytes(blob)
        files[name] = p

    put("empty.onnx", b"")
    put("truncated.onnx", data[: len(data) // 2])
    put("random.onnx", np.random.default_rng(0).bytes(4096))
    put("tensor.onnx", onnx.TensorProto(name="w", doc_string="a tensor, not a model").SerializeToString())
    put("tensor2.onnx", numpy_helper.from_array(np.ones((3, 3), np.float32), "w").SerializeToString())
    put("graphproto.onnx", onnx.load(str(SAMPLE)).graph.SerializeToString())
    m = onnx.load(str(SAMPLE))
    m.graph.node[0].input[0] = "does_not_exist"
    put("checker.onnx", m.SerializeToString())
    m = onnx.load(str(SAMPLE))
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 5
    put("opset5.onnx", m.SerializeToString())
    # a legacy file onnx.version_converter cannot upgrade (BatchNormalization-7 with spatial=0)
    bn_in = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    bn_out = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3, 4, 4])
    stats = [numpy_helper.from_array(np.ones(3, np.float32), n) for n in "sbmv"]
    bn = helper.make_node("BatchNormalization", ["x", *"sbmv"], ["y"], spatial=0, name="bn_spatial0")
    put("opset8_unconvertible.onnx", helper.make_model(helper.make_graph([bn], "g", [bn_in], [bn_out], stats),
                                                       opset_imports=[helper.make_opsetid("", 8)]).SerializeToString())
    (d / "adir.onnx").mkdir()
    files["adir.onnx"] = d / "adir.onnx"
    files["missing.onnx"] = d / "missing.onnx"
    return files


BAD_MODELS = {
    "missing.onnx": "no such file",
    "adir.onnx": "directory",
    "empty.onnx": "empty",
    "truncated.onnx": "not a valid ONNX",
    "random.onnx": "",
    "tensor.onnx": "",
    "tensor2.onnx": "",
    "graphproto.onnx": "",
    "checker.onnx": "checker",
    "opset5.onnx": "opset 5",  # Conv-5 does not exist: checker or converter refuses it
    "opset8_unconvertible.onnx": "stopped at BatchNormalization node 'bn_spatial0'",
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_bad_model_file(tmp_path, name, command):
    files = _write_bad_inputs(tmp_path)
    out = tmp_path / "out" / "p.onnx"
    out.parent.mkdir()
    rep = tmp_path / "out" / "r.json"
    if command == "prune":
        r = gp("prune", files[name], "-o", out, "--keep-flops", "0.5", "--report", rep)
    else:
        r = gp("inspect", files[name], "--json")
        assert r.stdout == ""
    assert_user_error(r, folder=out.parent, absent=[out, rep], needle=BAD_MODELS[name] or None)
    assert list(out.parent.iterdir()) == []


def _npz(d: Path, name: str, **arrays) -> Path:
    p = d / name
    np.savez(p, **arrays)
    return p


def _bad_eval(d: Path, kind: str) -> Path:
    data = np.load(TEST_DATA)
    x, y = data["input"], data["labels"]
    if kind == "missing":
        return d / "nope.npz"
    if kind == "no_labels":
        return _npz(d, "a.npz", input=x)
    if kind == "wrong_shape":
        return _npz(d, "a.npz", input=x[:, :, :4, :4], labels=y)
    if kind == "wrong_rank":
        return _npz(d, "a.npz", input=x[:, 0], labels=y)
    if kind == "nan":
        x = x.copy()
        x[3, 0, 2, 2] = np.nan
        return _npz(d, "a.npz", input=x, labels=y)
    if kind == "inf":
        x = x.copy()
        x[0, 0, 0, 0] = np.inf
        return _npz(d, "a.npz", input=x, labels=y)
    if kind == "float_labels":
        return _npz(d, "a.npz", input=x, labels=y.astype(np.float32))
    if kind == "label_count":
        return _npz(d, "a.npz", input=x, labels=y[:7])
    if kind == "extra_array":
        return _npz(d, "a.npz", input=x, labels=y, other=x)
    if kind == "zero_samples":
        return _npz(d, "a.npz", input=x[:0], labels=y[:0])
    if kind == "npy":
        p = d / "a.npy"
        np.save(p, x)
        return p
    if kind == "garbage":
        p = d / "a.npz"
        p.write_bytes(b"this is not a zip archive")
        return p
    if kind == "object":
        return _npz(d, "a.npz", input=np.array([None, 1], dtype=object), labels=y)
    raise AssertionError(kind)


EVAL_ERRORS = ["missing", "no_labels", "wrong_shape", "wrong_rank", "nan", "inf", "float_labels", "label_count",
               "extra_array", "zero_samples", "npy", "garbage", "object"]


@pytest.mark.parametrize("kind", EVAL_ERRORS)
def test_bad_eval_data(tmp_path, kind):
    data = _bad_eval(tmp_path, kind)
    out, rep = tmp_path / "out" / "p.onnx", tmp_path / "out" / "r.json"
    out.parent.mkdir()
    r = gp("prune", SAMPLE, "-o", out, "--keep-flops", "0.5", "--eval", data, "--report", rep)
    assert_user_error(r, folder=out.parent, absent=[out, rep])
    assert list(out.parent.iterdir()) == []


BAD_ARGS = {
    "keep_flops_1.5": (["--keep-flops", "1.5"], "(0, 1]"),
    "keep_flops_0": (["--keep-flops", "0"], "(0, 1]"),
    "keep_flops_neg": (["--keep-flops", "-0.5"], None),
    "keep_flops_nan": (["--keep-flops", "nan"], None),
    "keep_params_text": (["--keep-params", "half"], "not a number"),
    "keep_channels_2": (["--keep-channels", "2"], "(0, 1]"),
    "no_budget": ([], "required"),
    "two_budgets": (["--keep-flops", "0.5", "--keep-params", "0.5"], "not allowed"),
    "lossless_and_flops": (["--lossless", "--keep-flops", "0.5"], "not allowed"),
    "criterion": (["--keep-flops", "0.5", "--criterion", "no-such-criterion"], "unknown criterion"),
    "round_to_0": (["--keep-flops", "0.5", "--round-to", "0"], "round-to"),
    "round_to_text": (["--keep-flops", "0.5", "--round-to", "x"], "round-to"),
    "max_group_removal_1": (["--keep-flops", "0.5", "--max-group-removal", "1.0"], "max-group-removal"),
    "rtol_negative": (["--keep-flops", "0.5", "--rtol", "-1"], "rtol"),
    "rtol_zero": (["--keep-flops", "0.5", "--rtol", "0"], "rtol"),
    "unknown_option": (["--keep-flops", "0.5", "--frobnicate"], "unrecognized"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments(tmp_path, case):
    args, needle = BAD_ARGS[case]
    out = tmp_path / "p.onnx"
    r = gp("prune", SAMPLE, "-o", out, *args)
    assert_user_error(r, folder=tmp_path, absent=[out], needle=needle)


def test_missing_output_option():
    assert_user_error(gp("prune", SAMPLE, "--keep-flops", "0.5"), needle="-o")


def test_output_exists_without_force(tmp_path):
    out = tmp_path / "p.onnx"
    out.write_bytes(b"precious")
    r = gp("prune", SAMPLE, "-o", out, "--keep-flops", "0.5", "--report", tmp_path / "r.json")
    assert_user_error(r, folder=tmp_path, absent=[tmp_path / "r.json"], needle="--force")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("force", [False, True])
def test_output_is_input(tmp_path, force):
    src = tmp_path / "m.onnx"
    shutil.copy(SAMPLE, src)
    before = src.read_bytes()
    r = gp("prune", src, "-o", src, "--keep-flops", "0.5", *(["--force"] if force else []))
    assert_user_error(r, folder=tmp_path)
    assert src.read_bytes() == before
    # the same file under another spelling
    r = gp("prune", src, "-o", tmp_path / "." / "m.onnx", "--keep-flops", "0.5", "--force")
    assert_user_error(r, folder=tmp_path)
    assert src.read_bytes() == before


def test_report_must_not_clobber_model_or_output(tmp_path):
    src = tmp_path / "m.onnx"
    shutil.copy(SAMPLE, src)
    before = src.read_bytes()
    out = tmp_path / "p.onnx"
    r = gp("prune", src, "-o", out, "--keep-flops", "0.5", "--report", src)
    assert_user_error(r, folder=tmp_path, absent=[out])
    assert src.read_bytes() == before
    r = gp("prune", src, "-o", out, "--keep-flops", "0.5", "--report", out)
    assert_user_error(r, folder=tmp_path, absent=[out])
    (tmp_path / "rdir").mkdir()
    r = gp("prune", src, "-o", out, "--keep-flops", "0.5", "--report", tmp_path / "rdir")
    assert_user_error(r, folder=tmp_path, absent=[out])


def test_output_or_report_folder_missing(tmp_path):
    out = tmp_path / "p.onnx"
    r = gp("prune", SAMPLE, "-o", tmp_path / "nodir" / "p.onnx", "--keep-flops", "0.5")
    assert_user_error(r, folder=tmp_path, needle="does not exist")
    r = gp("prune", SAMPLE, "-o", out, "--keep-flops", "0.5", "--report", tmp_path / "nodir" / "r.json")
    assert_user_error(r, folder=tmp_path, absent=[out], needle="does not exist")
    r = gp("prune", SAMPLE, "-o", tmp_path, "--keep-flops", "0.5", "--force")
    assert_user_error(r, folder=tmp_path, needle="directory")


def test_user_error_without_quiet_has_one_error_line(tmp_path):
    """Without -q, progress lines may precede the error, but the error itself is one line."""
    r = gp("prune", SAMPLE, "-o", tmp_path / "p.onnx", "--keep-flops", "0.5", "--criterion", "bogus", quiet=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].startswith("graphprune: error: unknown criterion")
    assert all(ln.startswith("graphprune: ") for ln in r.stderr.splitlines())
    assert not (tmp_path / "p.onnx").exists()
