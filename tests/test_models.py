"""Correct gradients pass; planted bugs fail and are localized, across model families."""

import jax
import jax.numpy as jnp
import pytest

import jaxcheck
from cases import model_cases


def _names(kinds):
    """Case names (built in float32 at collection; float64 needs x64 on, inside the test)."""
    return [
        c.name
        for c in model_cases(jnp.float32)
        if c.expect == "pass" or any(f"-{k}" in c.name for k in kinds)
    ]


def _case(name, dtype):
    return next(c for c in model_cases(dtype) if c.name == name)


def _check(case):
    report = jaxcheck.verify(case.fn, case.params, *case.args, **case.kwargs)
    assert report.status == case.expect, str(report)
    if case.leaf is not None:
        wrong = [leaf.path for leaf in report.leaves if leaf.status == "fail"]
        assert wrong == [case.leaf], str(report)
        assert report.relative_error > 1e-3
    else:
        assert report.relative_error < report.tolerance
    return report


@pytest.mark.parametrize("name", _names(["scale+0.01", "perturb+0.01", "clip"]))
def test_float32_models(name):
    report = _check(_case(name, jnp.float32))
    assert report.tested_dtype == "float32"
    assert report.reference_dtype == "float64"


@pytest.mark.parametrize("name", _names(["scale-1"]))
def test_float64_models(name, x64):
    report = _check(_case(name, jnp.float64))
    assert report.tested_dtype == "float64"


def test_bias_bug_in_large_model_is_found():
    """A 1 % error confined to a 4-element bias of a 100k-parameter model."""
    from cases import bug, mlp_data, mlp_loss, mlp_params

    sizes = (64, 256, 256, 128, 4)
    params = mlp_params(sizes, jnp.float32)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) > 100_000
    x, y = mlp_data(sizes, jnp.float32)
    report = jaxcheck.verify(mlp_loss(bug("perturb", 0.01), (3, "b")), params, x, y)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['layers'][3]['b']"]
    bias = next(leaf for leaf in report.leaves if leaf.path == "['layers'][3]['b']")
    assert 0.005 < bias.relative_error < 0.02
