"""The projections folded into the probe (`_autodiff.probe_folded`): the same numbers as the
separate projections program, one compiled program fewer, and the same fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from jaxcheck import _plan

PARAMS = {"w": jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6]]), "b": jnp.array([0.2, -0.1])}
X = jnp.array([0.5, -1.0, 2.0])


def _vector(p, x):
    return {"y": jnp.tanh(p["w"] @ x + p["b"]), "s": jnp.sum(p["w"] ** 2)}


def _scalar(p, x):
    return jnp.sum(jnp.sin(p["w"] @ x) * p["b"])


def _check(fn, folded: bool, monkeypatch, **options):
    _plan._CACHE.clear()  # a cold check: its compilations are counted
    with monkeypatch.context() as m:
        if not folded:
            m.setattr(_plan, "fold", lambda *args: ())
        return jaxcheck.verify(fn, PARAMS, X, num_directions=8, **options)


@pytest.mark.parametrize(
    ("fn", "mode", "programs"),
    [(_vector, "both", 2), (_vector, "forward", 2), (_vector, "reverse", 2), (_scalar, "both", 2)],
)
def test_folded_projections_equal_the_projections_program(fn, mode, programs, monkeypatch):
    folded = _check(fn, True, monkeypatch, mode=mode, localize=False)
    apart = _check(fn, False, monkeypatch, mode=mode, localize=False)
    assert folded.status == apart.status == "pass"
    # float64 sums of float32 unit-step projections against float32 sums of scaled ones
    np.testing.assert_allclose(folded.analytic, apart.analytic, rtol=2e-6, atol=1e-7)
    assert folded.relative_error < 1e-5 and apart.relative_error < 1e-5
    assert (folded.num_compiled, apart.num_compiled) == (programs, programs + 1)


def test_localizing_a_bug_compiles_no_projections_program(monkeypatch):
    @jax.custom_jvp
    def scaled_tanh(x):
        return jnp.tanh(x)

    @scaled_tanh.defjvp
    def _(primals, tangents):  # the derivative 3 % off
        (x,), (t,) = primals, tangents
        return jnp.tanh(x), 1.03 * (1 - jnp.tanh(x) ** 2) * t

    def fn(p, x):
        return {"y": scaled_tanh(p["w"] @ x) + p["b"], "s": jnp.sum(p["b"] ** 2)}

    folded = _check(fn, True, monkeypatch, mode="both")
    apart = _check(fn, False, monkeypatch, mode="both")
    assert folded.status == apart.status == "fail"
    assert [leaf.status for leaf in folded.leaves] == [leaf.status for leaf in apart.leaves]
    assert "wrong: ['w']" in folded.problems
    assert folded.num_compiled == apart.num_compiled - 1


def test_custom_vjp_still_falls_back_to_reverse_mode(monkeypatch):
    @jax.custom_vjp
    def square(x):
        return x**2

    square.defvjp(lambda x: (x**2, x), lambda x, g: (2 * x * g,))

    def fn(p, x):
        return {"y": square(p["w"] @ x) + p["b"], "s": jnp.sum(p["b"])}

    report = _check(fn, True, monkeypatch, mode="both", localize=False)
    assert report.status == "pass" and report.mode == "reverse"
    assert report.problems == (
        "fn contains a jax.custom_vjp function, which has no jvp: only the reverse mode was "
        "checked",
    )
    # the probe's reverse projections are kept: probe and reference only
    assert report.num_compiled == 2
    with pytest.raises(TypeError, match="custom_vjp function, which has no jvp. Use mode='rev"):
        _check(fn, True, monkeypatch, mode="forward")


def test_large_problems_keep_the_projections_program():
    diff = [jnp.ones((60, 60))]
    plan = _plan.Plan(None, True, (None,), None)
    assert _plan.fold(plan, ("reverse", "forward"), False, diff, 24) == ()  # 24 * 3600 > 2**16
    assert _plan.fold(plan, ("reverse", "forward"), False, diff, 8) == ("reverse", "forward")
    assert _plan.fold(plan, ("reverse",), True, diff, 24) == ()  # nothing to fold
    chunked = _plan.Plan(1, False, (None,), None)
    assert _plan.fold(chunked, ("reverse",), False, diff, 24) == ()
