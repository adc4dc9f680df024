"""Finite differences along each direction, in the reference precision.

Along direction v the function phi(t) = <u, f(x + t v)> is evaluated at t = -h, h (and, when
that is not enough, at -h/2, h/2; the centre value phi(0) is shared by all directions).
From the two points `central` forms the central difference D(h); from all four `combine`
forms D(h), D(h/2), their Richardson extrapolation R = (4 D(h/2) - D(h)) / 3 and the fourth
difference, which measures roundoff noise and kinks. The program for +-h also projects the
gradient under test, and the reference-precision derivative of the same rule, onto each
direction, so that everything is compared along identical directions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import _autodiff, _plan, _precision, _retype, _tree

OUTER = (-1.0, 1.0)  # the first evaluation: D(h) needs two points per direction
INNER = (-0.5, 0.5)  # added when D(h) alone cannot settle the verdict
OFFSETS = (-1.0, -0.5, 0.5, 1.0)  # the full stencil, in the column order of `combine`


def quiet(fn):
    """`fn` with NumPy's floating-point warnings off: finite differences of a fn whose
    values are Inf, NaN or near float64's range are judged from what they give (non-finite
    directions), and a warning would be an error in a test suite that turns warnings into
    errors."""

    @functools.wraps(fn)
    def quietly(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return quietly


def reference(*args):
    """`_reference` (below), fn traced under `_precision.widening`."""
    with _precision.widening():
        return _reference(*args)


def _reference(
    problem,
    modes,
    kind,
    plan,
    offsets,
    with_projections,
    with_rule,
    dtype,
    work,
    seeds,
    diff,
    traced,
    beta_rows,
    index,
    signs,
    out_scales,
    g_test,
    h,
):
    """Stencil values (n, len(offsets)) and centre values (n,) along directions `index`
    (their `signs` drawn on the host, or None: hashed here); with `with_projections`, also
    the projections of `g_test` ("test_rev") and, when `with_rule`, of the
    reference-precision derivatives of the same rule ("ref_rev", "ref_fwd"). Floating
    inputs are cast to `dtype` inside the program (None: each keeps its own); steps and
    sums are formed in `work`."""
    diff = _tree.cast(diff, dtype)
    traced = (traced[0], _tree.cast(traced[1], dtype), traced[2])
    f = lambda d: problem.outputs(d, traced)  # noqa: E731
    if problem.retyped and dtype == jnp.float64:
        # fn's program with its float32 values held in float64, where its casts to float32
        # would round them only here; its custom rules' derivatives are their own
        f = _retype.function(f, diff)
    points = h.astype(work) * jnp.asarray(offsets, work)
    with_rule = with_rule and with_projections
    rule_rev = with_rule and "reverse" in modes
    if rule_rev and problem.value_with_gradient:
        value, g_ref = _autodiff.scalar_grad(f, diff)
        outs = [value]
    elif rule_rev and problem.scalar_output:
        outs = f(diff)
        if problem.grad_fn is not None:
            g_ref = problem.gradient(diff, traced)
        else:
            g_ref = _autodiff.scalar_grad(f, diff)[1]
    elif rule_rev:
        outs, vjp_fn = jax.vjp(f, diff)
    else:
        outs = f(diff)
    # the centre value from fn itself: jax.vjp's primal output is a custom_vjp's fwd (or a
    # custom_jvp rule's primal), which a wrong rule may compute differently; with no such
    # rule XLA computes the two once
    plain = f(diff) if rule_rev and not problem.scalar_output and problem.has_rules else outs

    def one(k, beta, z):
        v, cot = _autodiff.direction(problem, seeds, k, diff, beta, kind, out_scales, outs, z)
        v = _plan.constrain(v, plan)

        def phi(t):
            moved = [x + t.astype(x.dtype) * vi for x, vi in zip(diff, v)]
            return problem.scalarize(f(_plan.constrain(moved, plan)), cot)

        res = {"phis": _plan.map_points(phi, points, plan), "phi0": problem.scalarize(plain, cot)}
        grads = {}
        if with_projections and g_test is not None:
            grads["test_rev"] = [g.astype(work) for g in g_test]
        if rule_rev:
            grads["ref_rev"] = g_ref if cot is None else vjp_fn(cot)[0]
        res.update(zip(grads, _autodiff.vdots(list(grads.values()), v)))
        if with_rule and "forward" in modes:
            res["ref_fwd"] = _autodiff.jvp_projection(f, diff, v, cot)
        return res

    return _plan.map_directions(one, (index, beta_rows, signs), plan)


@quiet
def central(phis: np.ndarray, h: float) -> np.ndarray:
    """D(h) from the values at -h, h."""
    return (phis[:, 1] - phis[:, 0]) / (2 * h)


@quiet
def second(phis: np.ndarray, phi0: np.ndarray) -> np.ndarray:
    """phi(h) - 2 phi(0) + phi(-h) from the outer points of either stencil (its first and
    last columns): h^2 phi'' where fn is smooth."""
    return phis[:, 0] - 2 * phi0 + phis[:, -1]


@quiet
def combine(phis: np.ndarray, phi0: np.ndarray, h: float) -> dict:
    """Central differences, Richardson extrapolation and the fourth difference."""
    pm1, pmh, pph, pp1 = (phis[:, i] for i in range(4))
    d1 = (pp1 - pm1) / (2 * h)
    d2 = (pph - pmh) / h
    return {
        "d1": d1,
        "d2": d2,
        "richardson": (4 * d2 - d1) / 3,
        "d4": pm1 - 4 * pmh + 6 * phi0 - 4 * pph + pp1,
        "slopes": ((phi0 - pmh) / (h / 2), (pph - phi0) / (h / 2)),
    }
