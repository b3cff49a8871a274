"""Session fixtures: the sample zoo exported with both PyTorch exporters (cached per session)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRAPHPRUNE_QUIET", "1")

# Under pytest-xdist (`-n N`) the workers share the cores: each worker's PyTorch (and the
# subprocesses it starts) gets its share of the threads instead of all of them (read by torch at
# import, so set before any test module imports it).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

EXPORTERS = ("torchscript", "dynamo")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(name, exporter) -> path of the exported .onnx (exported once per session)."""
    from converters.torch_to_onnx import export_module
    from samples import zoo

    cache: dict[tuple[str, str], str] = {}

    def get(name: str, exporter: str) -> str:
        key = (name, exporter)
        if key not in cache:
            path = str(zoo_dir / f"{name}_{exporter}.onnx")
            export_module(zoo.make(name), (zoo.example_input(name, 1, 0),), path, exporter=exporter)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def transformer_model(tmp_path_factory):
    """transformer_model(name, exporter) -> path of samples/transformers.py's model exported by that
    exporter ("torchscript", "dynamo", "dynamo-opset23"), exported once per session and shared by
    every test that asks."""
    from samples import transformers

    d = tmp_path_factory.mktemp("transformers")
    cache: dict[tuple[str, str], str] = {}

    variants = {"torchscript": {}, "dynamo": {}, "dynamo-opset23": {"opset": 23}}  # 23: the ONNX Attention op

    def get(name: str, exporter: str) -> str:
        key = (name, exporter)
        if key not in cache:
            path = str(d / f"{name}_{exporter}.onnx")
            transformers.export(transformers.make(name), path, exporter=exporter.split("-")[0], **variants[exporter])
            cache[key] = path
        return cache[key]

    return get
