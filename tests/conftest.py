"""Shared rank pools, and what the `slow` and `gpu` markers (pyproject.toml) do.

`slow` tests are skipped unless asked for (`--runslow`, or a `-m` expression naming `slow`),
so `python -m pytest -q tests` stays inside CI's limit. `gpu` tests are skipped, with the
reason, where CUDA is unavailable or where a module named in the marker
(`@pytest.mark.gpu("flash_attn")`) does not import: GPU kernels are optional fast paths.
"""

import importlib

import pytest

from tests.dist import RankPool

pytest_plugins = ["pytester"]  # tests/test_gpu.py runs the marker hooks in a scratch session


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (skipped by default; `-m slow` runs only those)")


def _gpu_missing(marker) -> str | None:
    """Why a `gpu`-marked test cannot run here, or None if it can."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    for name in marker.args:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install counts as missing
            return f"needs {name} on CUDA ({type(e).__name__}: {e})"
    return None


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or "slow" in (config.getoption("markexpr") or "")
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (or -m slow)")
    gpu_reasons: dict = {}  # marker args -> reason (probe each requirement once)
    for item in items:
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)
        gpu = item.get_closest_marker("gpu")
        if gpu is not None:
            if gpu.args not in gpu_reasons:
                gpu_reasons[gpu.args] = _gpu_missing(gpu)
            if gpu_reasons[gpu.args] is not None:
                item.add_marker(pytest.mark.skip(reason=f"gpu: {gpu_reasons[gpu.args]}"))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches the code keeps per user (verified shard stamps) go to a folder of this session,
    set before any rank process starts so they inherit it."""
    import os

    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def pool2():
    pool = RankPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def pool4():
    pool = RankPool(4)
    yield pool
    pool.close()
