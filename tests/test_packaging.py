"""Packaging: a wheel built from this tree holds every module and works when installed.

The test

1. copies the source tree (without .git, build/, *.egg-info, caches) to a temporary
   directory and builds a wheel there with ``pip wheel --no-deps --no-build-isolation``
   (no network; building in a copy keeps a stale ``build/lib`` from leaking old files
   into the wheel and leaves the working tree untouched);
2. checks the wheel holds every ``.py`` file under ``graphprune/`` and ``converters/``
   of the source tree, and no top-level ``samples``/``tests``/``benchmarks`` package;
3. installs the wheel (``--no-deps --no-index``) into a fresh venv and, from a working
   directory outside the source tree with PYTHONPATH unset, checks that ``graphprune``,
   ``converters`` and every module of both import from the venv's site-packages, then
   runs ``graphprune compress`` with a curvature criterion (taylor) on the digits ResNet.

Isolation: the development environment has an editable install of graphprune whose
``__editable__`` meta-path finder maps ``graphprune`` to this source tree and would
also serve any subpackage missing from the wheel, hiding exactly the bug this test
is for.  (``--system-site-packages`` would not help anyway: from inside a venv it exposes
the base interpreter's site-packages, not the one holding torch.)  So the new venv is
created WITHOUT system site packages, and a ``.pth`` file in its site-packages lists the
directories that hold the dependencies (the current ``sys.path`` minus the stdlib and
the source tree).  Plain directory lines in a ``.pth`` are only appended to ``sys.path``:
the ``.pth`` files inside those directories -- including ``__editable__.graphprune*.pth``
-- are not executed, so the editable finder is never installed.  The child process
asserts that no editable finder is on ``sys.meta_path`` and the source tree is not on
``sys.path``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("graphprune", "converters")
NOT_INSTALLED = ("samples", "tests", "benchmarks")
_IGNORE_ANYWHERE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
_IGNORE_AT_ROOT = {".git", "build", "dist", ".pytest_cache", ".venv", "venv", "out",
                   ".whl", ".gl"}


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    ignored = set(_IGNORE_ANYWHERE(directory, names))
    if Path(directory).resolve() == REPO:
        ignored |= _IGNORE_AT_ROOT & set(names)
    return ignored


def _source_modules() -> set[str]:
    """Every .py file under the packages, as a wheel path (graphprune/x/y.py)."""
    found = set()
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = path.relative_to(REPO)
            if "__pycache__" in rel.parts:
                continue
            found.add(rel.as_posix())
    return found


def _dependency_paths(already: list[str]) -> list[str]:
    """Directories of the current sys.path the fresh venv needs for torch/onnx/numpy/...

    Skips '' (cwd), what the new venv has on its own path (``already``: the stdlib),
    and anything inside the source tree (pytest's ``pythonpath = ["."]`` puts the repo
    root on sys.path).
    """
    have = {os.path.realpath(p) for p in already if p}
    out = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue  # '', python3XX.zip, missing entries
        real = os.path.realpath(entry)
        if real in have or real in out:
            continue
        if real == str(REPO) or real.startswith(str(REPO) + os.sep):
            continue
        out.append(real)
    return out


def _clean_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
                        "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env["PYTHONNOUSERSITE"] = "1"
    env["PWD"] = str(cwd)
    return env


def test_wheel_contains_all_modules_and_compress_runs_installed(tmp_path):
    pytest.importorskip("setuptools", reason="setuptools is needed to build the wheel "
                        "without build isolation (no network)")
    pytest.importorskip("wheel", reason="the 'wheel' package is needed to build the "
                        "wheel without build isolation (no network)")
    pip_check = subprocess.run([sys.executable, "-m", "pip", "--version"],
                               capture_output=True, text=True)
    if pip_check.returncode != 0:
        pytest.skip("pip is not available in the test interpreter")
    pip_version = tuple(int(x) for x in pip_check.stdout.split()[1].split(".")[:2])

    # 1. build the wheel from a clean copy of the tree
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_copy_ignore)
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(wheel_dir), str(src)],
        capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    wheels = list(wheel_dir.glob("graphprune-*.whl"))
    assert len(wheels) == 1, wheels

    # 2. the wheel's file list
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    missing = sorted(_source_modules() - names)
    assert not missing, f"modules missing from the wheel: {missing}"
    tops = {n.split("/", 1)[0] for n in names}
    stray = sorted(t for t in tops if t in NOT_INSTALLED)
    assert not stray, f"non-package directories installed top-level: {stray}"

    # 3. install into an isolated venv
    env_dir = tmp_path / "venv"
    with_pip = pip_version < (22, 3)  # older pip has no --python
    venv.EnvBuilder(system_site_packages=False, with_pip=with_pip,
                    symlinks=os.name != "nt").create(env_dir)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    vpy = bindir / ("python.exe" if os.name == "nt" else "python")
    fresh = json.loads(subprocess.run(
        [str(vpy), "-c", "import json, sys, sysconfig; print(json.dumps("
         "[sysconfig.get_paths()['purelib'], sys.path]))"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env=_clean_env(tmp_path)).stdout)
    site = Path(fresh[0])
    deps = _dependency_paths(fresh[1])
    assert deps, "found no dependency directories on sys.path"
    (site / "_graphprune_test_deps.pth").write_text("".join(p + "\n" for p in deps))

    pip = ([str(vpy), "-m", "pip"] if with_pip
           else [sys.executable, "-m", "pip", "--python", str(vpy)])
    inst = subprocess.run(
        pip + ["install", "--no-deps", "--no-index", "-q", "--disable-pip-version-check",
               str(wheels[0])],
        capture_output=True, text=True, cwd=tmp_path)
    assert inst.returncode == 0, inst.stdout + inst.stderr

    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(work)

    # every source module imports from the venv's site-packages, not from the tree
    modules = sorted(m[:-3].replace("/", ".").removesuffix(".__init__")
                     for m in _source_modules())
    probe = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "files = {m: importlib.import_module(m).__file__ for m in mods}\n"
        "finders = [repr(f) for f in sys.meta_path if 'editable' in repr(f).lower()]\n"
        "print(json.dumps({'files': files, 'finders': finders, 'path': sys.path}))\n"
    )
    res = subprocess.run([str(vpy), "-c", probe], capture_output=True, text=True,
                         cwd=work, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert not info["finders"], f"editable finder active in the test venv: {info['finders']}"
    assert str(REPO) not in [os.path.realpath(p) for p in info["path"] if p]
    site_real = os.path.realpath(site)
    outside = {m: f for m, f in info["files"].items()
               if not os.path.realpath(f).startswith(site_real + os.sep)}
    assert not outside, f"modules not imported from the venv ({site}): {outside}"

    # the installed console script runs a curvature criterion end to end
    script = bindir / ("graphprune.exe" if os.name == "nt" else "graphprune")
    assert script.exists(), sorted(p.name for p in bindir.iterdir())
    cmd = [str(script), "compress", str(REPO / "samples" / "digits_resnet.onnx"),
           "-o", "out.onnx", "--keep-flops", "0.5", "--criterion", "taylor",
           "--calib", str(REPO / "samples" / "digits_calib.npz"),
           "--samples", "32", "--no-bench", "--force"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (work / "out.onnx").is_file()


def test_no_import_circle_between_tracer_runtime_and_rewriter():
    """tracer -> runtime -> export, rewriter -> tracer/runtime/export: the graph-handling modules import
    each other (at module level or inside functions) without a cycle."""
    import re

    core = ("tracer", "runtime", "rewriter", "export", "io", "validate")
    edges = {m: set(re.findall(r"from \.(\w+) import", (REPO / "graphprune" / f"{m}.py").read_text())) & set(core)
             for m in core}

    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in edges[a])

    assert not [m for m in core if reaches(m, m)], edges


def test_pipeline_reads_as_stages():
    """prune is the stage modules in order; no stage imports the pipeline (the API sits on top of
    them, never under), and the stages import each other without a cycle."""
    import re

    stages = REPO / "graphprune" / "stages"
    names = sorted(p.stem for p in stages.glob("*.py") if p.stem != "__init__")
    assert {"load", "score", "plan", "compensate", "rewrite", "verify", "recover", "write"} <= set(names)
    edges = {}
    for name in names:
        text = (stages / f"{name}.py").read_text()
        assert "pipeline" not in re.findall(r"from \.\.(\w+) import", text), name
        edges[name] = set(re.findall(r"from \.(\w+) import", text)) & set(names)

    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in edges[a])

    assert not [m for m in names if reaches(m, m)], edges
    pipeline = (REPO / "graphprune" / "pipeline.py").read_text()
    assert len(pipeline.splitlines()) < 200  # the API and the order of stages, not their insides
    assert "LatencyTable" not in pipeline and "ed.decompose" not in pipeline  # no method special-cased inside
