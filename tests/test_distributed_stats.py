"""Data-parallel curvature statistics (issue 11 point 4): two CPU processes (gloo) give the scores of
one process to float tolerance, and the same plan and byte-identical written model."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = str(ROOT / "samples" / "digits_resnet.onnx")
CALIB = str(ROOT / "samples" / "digits_calib.npz")

#: scores (and the summed statistics) of several criteria, dumped by every rank
SCORES = textwrap.dedent("""
    import sys
    import numpy as np
    from graphprune import distributed as dp
    from graphprune.criteria import ScoringContext, make_criterion
    from graphprune.pipeline import PruneConfig, collect_statistics, load_and_trace
    from graphprune.planner import Budget

    model, calib, out = sys.argv[1:4]
    skel, tr = load_and_trace(model, calib=calib)
    arrays = {}
    for name in ("fisher", "kron-obs", "taylor", "woodfisher"):
        crit = make_criterion(name)
        ctx = ScoringContext(tr)
        needs = set(crit.needs) - {"weights"}
        if name == "fisher":
            needs.add("kfac_a")  # what its OBS compensation reads
        cfg = PruneConfig(criterion=name, budget=Budget("flops", 0.5), calib=calib, samples=100, batch_size=33)
        collect_statistics(skel, tr, ctx, cfg, needs, {}, on_batch=lambda g: crit.on_batch(ctx, g))
        for gid, s in crit.score(ctx).items():
            arrays[f"{name}/score/{gid}"] = np.asarray(s, np.float64)
        for layer, st in ctx.stats.layers.items():
            for f in ("A", "S", "fisher"):
                if getattr(st, f) is not None:
                    arrays[f"{name}/{f}/{layer}"] = getattr(st, f).double().numpy()
            arrays[f"{name}/counts/{layer}"] = np.array([st.n, st.a_count], np.float64)
    np.savez(f"{out}.rank{dp.rank()}.npz", **arrays)
""")


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> str:
    """No labels: the loss is the true Fisher, classes sampled from the model (per-sample seeds)."""
    with np.load(CALIB) as d:
        path = tmp_path_factory.mktemp("dp") / "calib_unlabelled.npz"
        np.savez(path, input=d["input"])
    return str(path)


def _env(threads: int = 1) -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def test_shards_are_whole_chunks(monkeypatch):
    from graphprune import distributed as dp

    for n in (1, 7, 8, 9, 33, 64):
        for world in (1, 2, 3):
            monkeypatch.setenv("WORLD_SIZE", str(world))
            rows = []
            for r in range(world):
                monkeypatch.setenv("RANK", str(r))
                part = dp.shard_chunks(n, 8)
                assert part.start % 8 == 0 or part.start == part.stop == n
                rows += list(range(n))[part]
            assert rows == list(range(n))


def test_sampled_classes_do_not_depend_on_the_batching():
    from graphprune.curvature.data import SampleSeeds, _draw_classes

    prob = torch.softmax(torch.randn(12 * 5, 30, dtype=torch.float64), 1)  # 12 samples x 5 positions
    whole = _draw_classes(prob, SampleSeeds(3, range(12)), 0, 12)
    parts = torch.cat([_draw_classes(prob[:35], SampleSeeds(3, range(7)), 0, 7),
                       _draw_classes(prob[35:], SampleSeeds(3, range(7, 12)), 0, 5)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, _draw_classes(prob, SampleSeeds(4, range(12)), 0, 12))  # the seed counts


def test_two_processes_score_and_write_what_one_does(tmp_path, unlabelled):
    """fisher (per-sample Fisher diagonal + the input factors of its OBS compensation) and kron-obs
    (K-FAC A and S, kron-obs compensation): scores equal to float tolerance on every rank, the same
    removed channels, byte-identical models. Uneven shares: batches of 33 over two ranks (24 + 9
    rows in whole chunks of 8), a last batch of one sample that one rank holds alone. Taylor (its
    mini-batch gradients all-reduced) and WoodFisher (block sums inverted after the reduction) score
    to float tolerance."""
    script = tmp_path / "scores.py"
    script.write_text(SCORES)
    r = subprocess.run([sys.executable, str(script), SAMPLE, unlabelled, str(tmp_path / "one")],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), SAMPLE, unlabelled, str(tmp_path / "two")],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one = np.load(tmp_path / "one.rank0.npz")
    two0, two1 = np.load(tmp_path / "two.rank0.npz"), np.load(tmp_path / "two.rank1.npz")
    assert set(one.files) == set(two0.files) == set(two1.files)
    assert any(k.startswith("kron-obs/S/") for k in one.files) and any(k.startswith("fisher/fisher/") for k in one.files)
    for k in one.files:
        np.testing.assert_array_equal(two0[k], two1[k], err_msg=k)  # every rank plans from the same scores
        if "/counts/" in k:
            np.testing.assert_array_equal(two0[k], one[k], err_msg=k)
        else:
            scale = max(float(np.abs(one[k]).max()), 1e-30)
            np.testing.assert_allclose(two0[k], one[k], rtol=1e-6, atol=1e-9 * scale, err_msg=k)

    for criterion in ("fisher", "kron-obs"):
        common = ["-m", "graphprune.cli", "-q", "prune", SAMPLE, "--keep-flops", "0.5", "--criterion", criterion,
                  "--calib", unlabelled, "--samples", "100", "--batch-size", "33", "--recover", "0", "--report"]
        out = {}
        for tag, extra in (("one", []), ("two", ["--workers", "2"])):
            r = subprocess.run([sys.executable, *common, str(tmp_path / f"{criterion}-{tag}.json"),
                                "-o", str(tmp_path / f"{criterion}-{tag}.onnx"), *extra],
                               capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
            assert r.returncode == 0, r.stderr[-3000:]
            out[tag] = r.stdout
        assert out["two"].count("wrote ") == 1  # rank 0 alone reports and writes
        rep1, rep2 = (json.loads((tmp_path / f"{criterion}-{t}.json").read_text()) for t in ("one", "two"))
        assert rep1["compensation"] and rep1["compensated_tensors"]
        assert [g["removed"] for g in rep1["groups"]] == [g["removed"] for g in rep2["groups"]]
        assert (tmp_path / f"{criterion}-one.onnx").read_bytes() == (tmp_path / f"{criterion}-two.onnx").read_bytes()


def test_workers_report_a_user_error_in_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, input=np.full((10, 1, 8, 8), np.nan, np.float32))
    r = subprocess.run([sys.executable, "-m", "graphprune.cli", "prune", SAMPLE, "-o", str(tmp_path / "o.onnx"),
                        "--keep-flops", "0.5", "--criterion", "fisher", "--calib", str(bad), "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [f"graphprune: error: {bad}: array 'input' contains NaN or Inf"], r.stderr
    assert not (tmp_path / "o.onnx").exists()


def _fail_on_rank_one():
    """A worker body whose error comes from rank 1 only (rank 0 waits for the agent to stop it)."""
    import time

    from graphprune.distributed import rank
    from graphprune.errors import UserError

    if rank() == 1:
        raise UserError("rank 1 found bad input")
    time.sleep(30)
    return "rank 0 finished"


def test_an_error_on_another_rank_than_0_still_comes_back_once(capfd):
    """Only rank 0 prints; an error raised on rank 1 alone used to end with exit code 2 and no
    message at all (also under load, when rank 1 fails first and the agent stops rank 0 before it
    prints). The first failing worker's message now comes back and is raised in the parent."""
    from graphprune.distributed import launch
    from graphprune.errors import UserError

    with pytest.raises(UserError, match="^rank 1 found bad input$"):
        launch(2, _fail_on_rank_one, quiet=True)
    assert "rank 1 found bad input" not in capfd.readouterr().err  # raised here, not printed by a worker
