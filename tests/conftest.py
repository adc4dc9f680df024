import jax
import pytest

from jaxcheck import _rule_report

# where the automatic rule checks of a failing verify are the subject (elsewhere they add
# about a second to every planted bug, and the leaf-level verdict is what is tested)
RULE_MODULES = ("test_rules", "test_transforms", "test_multiprocess")


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
    with jax.enable_x64(True):
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
