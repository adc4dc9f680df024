import importlib.metadata
import os
import shutil
import tempfile

import jax
import pytest

from cases import enable_x64
from jaxcheck import _rule_report

# where the automatic rule checks of a failing verify are the subject (elsewhere they add
# about a second to every planted bug, and the leaf-level verdict is what is tested)
RULE_MODULES = ("test_rules", "test_transforms", "test_multiprocess")


MAX_WORKERS = 4  # each worker is a process with its own jax and compile caches


def pytest_xdist_auto_num_workers(config):
    """Workers for `-n auto` (pyproject.toml): one per core this process may use, at most
    MAX_WORKERS; one where jax may run on a GPU, of which every worker process would claim
    most of the memory."""
    if os.environ.get("JAX_PLATFORMS", "").lower() != "cpu" and _gpu_plugin_installed():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_WORKERS, cores or 1))


def _gpu_plugin_installed() -> bool:
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().replace("_", "-").startswith(("jax-cuda", "jax-rocm")) for n in names)


# A persistent compilation cache for the run: parametrized tests and the child processes the
# tests start (they inherit the environment) compile many identical programs (same shapes,
# the key an input). Measured on the full suite (2 cores, two workers): 411 s without it,
# 369 s and 381 s with it. Each worker has a folder of its own: JAX writes an entry in place,
# and a worker reading one another is writing would warn, an error here. Unless the caller
# set the variable (to a folder of their own, or empty for no cache); removed at the end.
_CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
_CACHE_OF_RUN = "JAXCHECK_TESTS_XLA_CACHE"  # set where this conftest made the run's folder


def pytest_configure(config):
    worker = getattr(config, "workerinput", {}).get("workerid")
    if worker is None and _CACHE_VARIABLE not in os.environ:
        base = tempfile.mkdtemp(prefix="jaxcheck-tests-xla-cache-")
        config._jaxcheck_xla_cache = base
        os.environ[_CACHE_OF_RUN] = base
        _use_cache(base)
    elif worker is not None and os.environ.get(_CACHE_OF_RUN):
        folder = os.path.join(os.environ[_CACHE_OF_RUN], worker)
        os.makedirs(folder, exist_ok=True)
        _use_cache(folder)


def _use_cache(folder: str) -> None:
    os.environ[_CACHE_VARIABLE] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    # jax was imported above, before the variables were set
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
    base = getattr(config, "_jaxcheck_xla_cache", None)
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
        for name in (_CACHE_VARIABLE, _CACHE_OF_RUN, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
            os.environ.pop(name, None)


@pytest.fixture(autouse=True)
def _automatic_rule_checks(request, monkeypatch):
    module = request.node.module.__name__ if request.node.module else ""
    keep = module.startswith(RULE_MODULES) or request.node.get_closest_marker("rules_auto")
    if not keep:
        wants = _rule_report._wants_rules
        monkeypatch.setattr(
            _rule_report, "_wants_rules", lambda o, report: o.rules is True and wants(o, report)
        )


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Run a test with 64-bit types on, restoring the setting afterwards."""
    with enable_x64(True):
        yield


@pytest.fixture
def strict_ranks():
    """jaxcheck itself must not rely on implicit rank promotion."""
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def strict_numerics():
    """What JAX's own test suite runs under (and equinox's: rank promotion raises too):
    jaxcheck must be dtype- and rank-explicit everywhere."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield
