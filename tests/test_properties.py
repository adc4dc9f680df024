"""Property tests: random pytrees, shapes, scales and dtypes."""

import contextlib

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxcheck
from cases import bug, enable_x64

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple)
problems = st.fixed_dictionaries(
    {
        "shapes": st.lists(shapes, min_size=1, max_size=3),
        "log_scales": st.lists(st.floats(-4, 4), min_size=3, max_size=3),
        "log_loss_scale": st.floats(-8, 8),
        "dtype": st.sampled_from(["float32", "float64"]),
        "seed": st.integers(0, 2**16),
    }
)


def _setup(spec, planted):
    rng = np.random.default_rng(spec["seed"])
    scales = [10.0**s for s in spec["log_scales"]]
    dtype = jnp.dtype(spec["dtype"])
    params = {
        f"p{i}": jnp.asarray(scales[i] * (1 + rng.random(shape)), dtype)
        for i, shape in enumerate(spec["shapes"])
    }
    loss_scale = 10.0 ** spec["log_loss_scale"]

    def fn(p):
        total = 0.0
        for i, (_, x) in enumerate(sorted(p.items())):
            if i == 0 and planted:
                x = bug("scale", planted)(x)
            u = x / scales[i]  # O(1) in the leaf's own units
            total = total + jnp.sum(jnp.tanh(u) * jnp.cos(u) + 0.1 * u**2)
        return loss_scale * total

    return fn, params


def _x64(spec):
    return enable_x64(True) if spec["dtype"] == "float64" else contextlib.nullcontext()


@settings(max_examples=8, deadline=None)
@given(problems)
def test_correct_gradients_pass(spec):
    with _x64(spec):
        fn, params = _setup(spec, None)
        report = jaxcheck.verify(fn, params)
    assert report.status == "pass", str(report)
    assert report.relative_error <= report.tolerance


@settings(max_examples=8, deadline=None)
@given(problems, st.sampled_from([0.01, -0.02, 0.5]))
def test_planted_bugs_fail_on_the_right_leaf(spec, planted):
    with _x64(spec):
        fn, params = _setup(spec, planted)
        report = jaxcheck.verify(fn, params)
    assert report.status == "fail", str(report)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['p0']"]
