"""The derivatives under test, evaluated in the model's own (native) precision.

`probe` makes one reverse pass (or calls the hand-written gradient) to get the gradient's
size per leaf; `projections` evaluates the projections <u, J v> (jvp) and <J^T u, v> (vjp)
along each direction when they cannot be formed from one gradient vector (forward mode,
non-scalar outputs).
"""

import math

import jax
import jax.numpy as jnp

from . import _directions, _plan, _precision

BALANCE_INDEX = 2**31 - 1  # the cotangent index used to size a non-scalar output's gradient


def vdot(a: list, b: list):
    """sum_l <a_l, b_l>, accumulated in at least float32."""
    return vdots([a], b)[0]


def vdots(grads: list, v: list) -> list:
    """[sum_l <g_l, v_l> for g in grads], accumulated in at least float32: one variadic
    reduction per leaf, so the direction v (hashed on the fly) is made once for all of
    them (measured 1.3x faster than separate dot products for two gradients)."""
    if not grads:
        return []
    totals = [0.0] * len(grads)
    for i, vi in enumerate(v):
        acc = _precision.accumulator([vi.dtype] + [g[i].dtype for g in grads])
        products = tuple(g[i].astype(acc) * vi.astype(acc) for g in grads)
        sums = jax.lax.reduce(
            products,
            tuple(jnp.zeros((), acc) for _ in grads),
            lambda x, y: tuple(p + q for p, q in zip(x, y)),
            tuple(range(vi.ndim)),
        )
        totals = [t + s for t, s in zip(totals, sums)]
    return totals


def output_scales(outs: list):
    """RMS magnitude of each output leaf, all-zero (or non-finite) ones floored, and never
    below 1 / sqrt(largest finite value) of the leaf's dtype: the output cotangent is divided
    by it and cast to that dtype, where a float16 output of RMS 1e-5 would make it overflow."""
    sizes = [max(y.size, 1) for y in outs]
    squares = _directions.sum_squares(outs)
    scales = _directions.with_floor(jnp.sqrt(squares / jnp.asarray(sizes, squares.dtype)), sizes)
    least = [1.0 / math.sqrt(float(jnp.finfo(y.dtype).max)) for y in outs]
    return jnp.maximum(scales, jnp.asarray(least, scales.dtype))


def probe(problem, reverse: bool, out_seeds, diff, traced) -> dict:
    """One native evaluation of fn (and of its gradient, when reverse): the value, the
    output scales, the per-leaf sums of squares of parameters and gradient, and the
    gradient itself (left on its devices by the caller)."""
    outs = problem.outputs(diff, traced)
    scales = output_scales(outs)
    result = {
        "outputs_finite": jnp.stack([jnp.all(jnp.isfinite(y)) for y in outs]),
        "output_scales": scales,
        "param_squares": _directions.sum_squares(diff),
        "value": outs[0] if problem.scalar_output else jnp.zeros(()),
    }
    if not reverse:
        return result
    if problem.grad_fn is not None:
        grad = problem.gradient(diff, traced)
    elif problem.scalar_output:
        grad = jax.grad(lambda d: problem.outputs(d, traced)[0])(diff)
    else:
        _, vjp_fn = jax.vjp(lambda d: problem.outputs(d, traced), diff)
        cot = _directions.cotangent(out_seeds, BALANCE_INDEX, scales, outs, "gaussian")
        grad = vjp_fn(cot)[0]
    result["grad_squares"] = _directions.sum_squares(grad)
    result["grad"] = grad
    return result


def direction(problem, seeds, k, diff, beta, kind, out_scales, outs):
    """Direction number k in parameter space and, for a non-scalar fn, its output cotangent
    (None for a scalar fn)."""
    p_seeds, o_seeds = seeds
    v = _directions.direction(p_seeds, k, diff, beta, kind)
    if problem.scalar_output:
        return v, None
    return v, _directions.cotangent(o_seeds, k, out_scales, outs, kind)


def jvp_projection(f, diff, v, cot):
    """<u, J v> by forward mode (J v itself for a scalar fn)."""
    _, jv = jax.jvp(f, (diff,), (v,))
    if cot is None:
        return jv[0].astype(_precision.accumulator([jv[0].dtype]))
    return vdot(cot, jv)


def projections(problem, modes, kind, plan, seeds, diff, traced, beta_rows, index, out_scales):
    """Native-precision projections along directions `index` (rows of `beta_rows`): <u, J v>
    ("fwd") and, for a non-scalar fn, <J^T u, v> ("rev"); a scalar fn's reverse projections
    are formed from its gradient in the reference program instead."""
    f = lambda d: problem.outputs(d, traced)  # noqa: E731
    if "reverse" in modes:
        outs, vjp_fn = jax.vjp(f, diff)
    else:
        outs = f(diff)

    def one(k, beta):
        v, cot = direction(problem, seeds, k, diff, beta, kind, out_scales, outs)
        v = _plan.constrain(v, plan)
        res = {}
        if "reverse" in modes:
            res["rev"] = vdot(vjp_fn(cot)[0], v)
        if "forward" in modes:
            res["fwd"] = jvp_projection(f, diff, v, cot)
        return res

    return _plan.map_directions(one, (index, beta_rows), plan)
