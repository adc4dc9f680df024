"""The derivatives under test, evaluated in the model's own (native) precision.

`probe` makes one reverse pass (or calls the hand-written gradient) to get the gradient's
size per leaf; `projections` evaluates the projections <u, J v> (jvp) and <J^T u, v> (vjp)
along each direction when they cannot be formed from one gradient vector (forward mode,
non-scalar outputs). For small problems `probe_folded` computes those projections in the
probe itself, per leaf and with unit steps, before the steps are known: they are linear in
the direction, so the host scales and sums them (`folded`), and the check compiles one
program fewer.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _directions, _plan, _precision
from ._errors import CotangentKind

# A derivative is linear in its tangent or cotangent, as it must be; a rule that is not
# (a custom_vjp bwd computing g * |g|, a custom_jvp rule with t * |t|, rules that clip or
# threshold their cotangent or tangent) can agree with a linear one at the one unit it
# meets. A scalar fn's gradient is pulled back from the cotangent 1, as jax.grad pulls it
# back, and checked; where fn calls a custom rule (JAX's own primitives are linear by
# construction), again from the cotangent LINEAR_UNIT, -2, divided by it, which for a
# linear rule is the same to the bit (a power of two scales exactly, barring overflow:
# float16 values above half its largest number, 32752, become Inf, and are left out; a unit
# of no power of two rounded the two apart, and failed right rules whose gradient cancels).
# The two are compared (`linear_gap`): a rule clipping at 0.75, which jax.grad's cotangent
# of 1 reaches wherever fn's own derivative above the rule is near 1, fails either way,
# and one clipping at 1.5, which jax.grad never reaches, is no derivative all the same:
# under a loss scaled, or summed with another, its gradient is another; the unit is
# negative, so that a rule dropping its cotangent's sign (|g|, relu(g)), right at 1 and 2,
# fails too. The folded forward projections of small problems push tangents of entries
# +-1 and -+2 alike, compared the same way (`tangent_gap`), where fn calls a custom rule;
# where it calls none, they are taken at entries +-UNIT alone.
UNIT = 2.0
LINEAR_UNIT = -2.0

# The index of the random-sign cotangent whose vjp sizes a non-scalar fn's gradient per leaf
# (for the balancing of the directions' steps).
BALANCE_INDEX = 2**31 - 1


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
    # one accumulator for all leaves: a float16 leaf beside a float64 one must not mix
    # float32 and float64 sums (refused under strict promotion)
    acc = _precision.accumulator([x.dtype for x in v] + [x.dtype for g in grads for x in g])
    for i, vi in enumerate(v):
        products = tuple(g[i].astype(acc) * vi.astype(acc) for g in grads)
        sums = jax.lax.reduce(
            products, tuple(jnp.zeros((), acc) for _ in grads), _add, tuple(range(vi.ndim))
        )
        totals = [t + s for t, s in zip(totals, sums)]
    return totals


def _add(x: tuple, y: tuple) -> tuple:
    """The variadic sum of `vdots`' reductions: one function object for all of them, so that
    JAX's caches of reductions keyed by it hit (run eagerly, a fresh lambda per reduction
    compiled each one anew: 0.17 s each, a minute for a small grad_fn check)."""
    return tuple(p + q for p, q in zip(x, y))


def output_scales(outs: list, moved: list | None = None):
    """Magnitude of each output leaf: its RMS value, or with `moved` (fn's outputs at the
    parameters moved by `MOVE`, `moved_params`) the larger of that and the RMS of its
    change there over `MOVE` (less what rounding in its dtype can account for), a
    derivative's; all-zero (or non-finite) ones floored, and never below
    1 / sqrt(largest finite value) of the leaf's dtype: the output cotangent is divided by
    it and cast to that dtype, where a float16 output of RMS 1e-5 would make it overflow.

    A leaf's share of a projection is its derivative's size over its scale: scaled by its
    value, a constraint returned beside an energy at a feasible point (a value of 1e-7, a
    derivative of 1) drowned the energy, and a gradient of the energy 10 % off passed,
    where JAX's check_grads, comparing each output entry alone, fails it. A leaf changing
    slowly is not weighed up: its rounding, which the error model counts at the scale of
    the whole output, would then swamp the others (a float32 check of a loss beside a
    slowly changing leaf became inconclusive, and hid a bug 3 % off)."""
    sizes = [max(y.size, 1) for y in outs]
    if moved is None:
        squares = _directions.sum_squares(outs)
        return _floored(jnp.sqrt(squares / jnp.asarray(sizes, squares.dtype)), outs, sizes)
    # (leaves against each other, each measured at its own magnitude)
    acc = _precision.accumulator([y.dtype for y in outs])
    scales = _rms(outs, acc)
    rates = _rms([m.astype(acc) - y.astype(acc) for m, y in zip(moved, outs)], acc) / MOVE
    eps = jnp.asarray([_precision.eps(y.dtype) for y in outs], acc)
    rates = rates - 2 * eps * scales / MOVE
    faster = jnp.isfinite(rates) & jnp.isfinite(scales) & (rates > scales)
    return _floored(jnp.where(faster, rates, scales), outs, sizes)


def _floored(scales, outs, sizes):
    scales = _directions.with_floor(scales, sizes)
    least = [1.0 / math.sqrt(float(jnp.finfo(y.dtype).max)) for y in outs]
    return jnp.maximum(scales, jnp.asarray(least, scales.dtype))


def _rms(leaves: list, acc):
    """The RMS of each leaf in `acc`, measured relative to its largest entry, so that a
    float32 leaf of RMS 1e-20 (or 1e20) does not square to 0 (or Inf): scaled so, it drew
    the scale of the others, and a loss 100 % off beside it passed."""
    rms = []
    for y in leaves:
        unit, squares = _directions.scaled_squares(y, acc)
        rms.append(jnp.sqrt(squares / max(y.size, 1)) * unit)
    return jnp.stack(rms)


# the relative move of every parameter entry (random signs) at which `output_scales` sees
# how fast each output leaf changes: small enough not to reach a jump 0.5 % away, large
# enough that float32 rounding shows as no change
MOVE = 2.0**-10


def moved_params(diff: list) -> list:
    """`diff` with every entry x moved to x (1 + MOVE s), s random signs fixed per leaf
    (entries at 0 stay)."""
    seeds = jnp.arange(len(diff), dtype=jnp.uint32) + 0x5EED
    steps = _directions.direction(seeds, 0, diff, jnp.full(len(diff), MOVE), "rademacher")
    return [x + step * x for x, step in zip(diff, steps)]


# The largest weight of an output entry against its leaf's others (`output_weights`): an
# entry whose derivative is 1e6 times smaller than its neighbours' counts 32 times more,
# no more, so that an entry near a zero of its derivative does not drown the others
MAX_ENTRY_WEIGHT = 32.0


def output_weights(jv: list, dtype) -> list:
    """Per output leaf, a weight for each of its entries in the output cotangent, from the
    jvps `jv` (rows of tangents, then the leaf's shape): the leaf's RMS derivative over
    the entry's, rounded to a power of two (exact in every dtype), from 1 to
    MAX_ENTRY_WEIGHT; 1 where the entry's derivative is zero or not finite. The relative
    error of the whole leaf then sees an entry whose derivative is far smaller than its
    neighbours' (exp over [-10, 10], whose outputs span 1e9; a rule wrong for x < 0
    passed), as JAX's check compares entries one by one."""
    weights = []
    for y in jv:
        d = jnp.sqrt(jnp.mean(jnp.square(jnp.abs(y).astype(dtype)), axis=0))
        fine = jnp.isfinite(d) & (d > 0)
        d = jnp.where(fine, d, 0.0)
        whole = jnp.sqrt(jnp.mean(jnp.square(d))) if d.size else jnp.zeros((), dtype)
        ratio = whole / jnp.where(fine, d, 1.0)
        power = jnp.exp2(jnp.round(jnp.log2(jnp.clip(ratio, 1.0, MAX_ENTRY_WEIGHT))))
        weights.append(jnp.where(fine & jnp.isfinite(ratio), power, 1.0).astype(jnp.float32))
    return weights


def probe(problem, reverse: bool, out_seeds, diff, traced, signs=None) -> dict:
    """One native evaluation of fn (and of its gradient, when reverse): the value, the
    output scales, the per-leaf sums of squares of parameters and gradient, and the
    gradient itself (left on its devices by the caller). A non-scalar fn's gradient is that
    of a random-sign cotangent, its signs drawn on the host (`split_signs` of no
    directions), or hashed here where `signs` is None."""
    return _probe(problem, reverse, None, (None, out_seeds), diff, traced, None, signs)


def probe_folded(problem, reverse: bool, fold: tuple, seeds, diff, traced, index, signs) -> dict:
    """`probe`, plus the projections along directions `index` with unit steps, per
    parameter leaf: "fold_fwd"[k, l] = <u_k, J_l z_kl> and "fold_rev"[k, l] =
    <(J^T u_k)_l, z_kl> (z_kl leaf l's unit direction). Projections are linear in the
    direction, so the host forms them for any step sizes beta as sum_l beta_l P[k, l]
    (`folded`), and the check compiles no separate projections program. `fold` is
    (kind, modes folded); `signs` the signs of directions `index` and of the balancing
    cotangent drawn on the host (`split_signs`), or None."""
    fold = None if _plan.is_eager() else fold
    return _probe(problem, reverse, fold, seeds, diff, traced, index, signs)


def _probe(problem, reverse, fold, seeds, diff, traced, index, signs) -> dict:
    f = lambda d: problem.outputs(d, traced)  # noqa: E731
    kind, modes = fold or (None, ())
    num = 0 if index is None else index.shape[0]
    p_signs, o_signs, balance = (None, None, None) if signs is None else signs
    rev = "reverse" in modes
    # autodiff through fn's custom rules, which compute a primal of their own
    own = problem.grad_fn is None and problem.has_rules
    # value and gradient from one trace of fn (`Problem.value_with_gradient`)
    pair = scalar_grad(f, diff) if reverse and problem.value_with_gradient and not rev else None
    if rev or (reverse and not problem.scalar_output):
        outs, vjp_fn = jax.vjp(f, diff)
        # the primal jax.vjp returns is a custom_vjp's fwd (a custom_jvp rule's primal
        # output): a wrong one is compared with fn's own value (XLA computes both once where
        # no rule differs)
        gap = primal_gap(outs, f(diff)) if own else None
    else:
        outs, vjp_fn, gap = (f(diff) if pair is None else [pair[0]]), None, None
    # only a non-scalar fn's cotangents are divided by its outputs' scales (a scalar fn
    # has none: its reverse projections come from its gradient), so a scalar fn's program
    # does without their reductions, compiling faster
    if problem.scalar_output:
        scales = jnp.ones(1, jnp.float32)
    else:  # (several leaves weighed by how fast each changes: one more evaluation of fn)
        scales = output_scales(outs, f(moved_params(diff)) if len(outs) > 1 else None)
    result = {
        "outputs_finite": jnp.stack([jnp.all(jnp.isfinite(y)) for y in outs]),
        "output_scales": scales,
        "value": outs[0] if problem.scalar_output else jnp.zeros(()),
    }
    # a small problem (its signs drawn on the host) leaves the sums of squares of its
    # parameters and gradient to the host too (`_probe`): fewer reductions to compile
    small = signs is not None
    if not small:
        result["param_squares"] = _directions.sum_squares(diff)
    if fold:
        acc = _precision.accumulator([x.dtype for x in diff])
        # (unit steps in float64 where a leaf is: a packed leaf's entry scales, exact in
        # its dtype, would be rounded to float32 on the way, and its folded projections
        # would be 1e-8 off, a bug against a float64 tolerance)
        ones = jnp.ones(len(diff), acc)
        # per leaf (K, *shape): its unit direction (signs, or float32 Gaussians) for each k,
        # in the leaf's dtype: the very values the stencil scales by beta in float64
        units = jax.vmap(
            lambda k, z: _directions.direction(seeds[0], k, diff, ones, kind, z, problem.packed)
        )(index, p_signs)
    weights = None
    if "forward" in modes:
        # traced first, so that a custom_vjp in fn fails early. Rows ordered (leaf,
        # direction): the tangent of row (l, k) is UNIT z_kl in leaf l alone
        leaves = len(diff)
        # and, where fn calls a custom rule, the same rows at the unit 1 after them
        # (`linear_gap`; JAX's own primitives are linear in their tangents by construction)
        both = problem.has_rules
        tangents = [
            jnp.concatenate(
                [
                    z * u if j == i else jnp.zeros_like(z)
                    for u in ((LINEAR_UNIT, 1) if both else (UNIT,))
                    for j in range(leaves)
                ]
            )
            for i, z in enumerate(units)
        ]
        primals, jv = jax.vmap(lambda t: jax.jvp(f, (diff,), (t,)))(tangents)
        rows = leaves * num
        primals = [y[:rows] for y in primals]
        jv, jv_one = [y[:rows] for y in jv], ([y[rows:] for y in jv] if both else None)
        if own and gap is None:  # forward mode alone: the primal jax.jvp returns
            gap = primal_gap([y[0] for y in primals], outs)
        if not problem.scalar_output:
            # each output entry weighed by its derivative along these rows (in every
            # program of the check: the probe hands them on with the scales)
            weights = output_weights(jv, _precision.accumulator([y.dtype for y in jv]))
            result["output_weights"] = weights
    cots = None
    if fold and not problem.scalar_output:
        cots = jax.vmap(
            lambda k, z: _directions.cotangent(seeds[1], k, scales, outs, kind, z, weights)
        )(index, o_signs)
    if "forward" in modes:
        if cots is None:
            project = lambda y: y[0].astype(_precision.accumulator([y[0].dtype]))  # noqa: E731
        else:
            rows_cots = [jnp.concatenate([c] * leaves) for c in cots]
            project = lambda y: jax.vmap(vdot)(rows_cots, y)  # noqa: E731
        p = project(jv)
        if jv_one is None:
            result["fold_fwd"] = (p.astype(acc) / UNIT).reshape(leaves, num).T
        else:
            p_one = project(jv_one)
            result["fold_fwd"] = p_one.astype(acc).reshape(leaves, num).T
            result["tangent_gap"] = linear_gap([p_one], [p])  # (p at LINEAR_UNIT)
    grad = None
    if reverse and problem.grad_fn is not None:
        grad = problem.gradient(diff, traced)
    elif reverse and problem.scalar_output:
        if pair is None:  # fn calls a custom rule: pulled back from two cotangents
            value, grad, result["cotangent_gap"] = scalar_grad_linear(f, diff)
        else:  # fn of JAX's own primitives and rules: linear in its cotangent by construction
            value, grad = pair
        wrong_kinds(grad, diff)
        if own:
            gap = primal_gap([value], outs)
    elif reverse or rev:
        cot = _directions.cotangent(
            seeds[1], BALANCE_INDEX, scales, outs, "rademacher", balance, weights
        )
        if rev:  # one batched vjp: the K directions' cotangents, then the balancing one
            rows = [jnp.concatenate([c, b[None]]) for c, b in zip(cots, cot)]
            grads = jax.vmap(lambda c: vjp_fn(c)[0])(rows)
            wrong_kinds(grads, diff)
            result["fold_rev"] = jnp.stack(
                [_leaf_dots(g[:num], z, acc) for g, z in zip(grads, units)], 1
            )
            grad = [g[num] for g in grads]
        else:
            grad = vjp_fn(cot)[0]
            wrong_kinds(grad, diff)
    if own and gap is None and not reverse:
        # forward mode alone (not folded): the primal jax.jvp returns (a custom_jvp rule's
        # primal output), as the reverse modes compare the primal of jax.vjp
        zeros = [jnp.zeros_like(x) for x in diff]
        gap = primal_gap(jax.jvp(f, (diff,), (zeros,))[0], outs)
    if reverse:
        if not small:
            result["grad_squares"] = _directions.sum_squares(grad)
        result["grad"] = grad
    if gap is not None:
        result["primal_gap"] = gap
    return result


def wrong_kinds(grad, diff) -> None:
    """Raise `CotangentKind` for the leaves whose gradient is complex where the parameter
    is real or the other way round: a custom_vjp's bwd can return such a cotangent, JAX
    passes it on (jax.grad returns it), and the comparison would cast it silently."""
    bad = [
        (i, jnp.dtype(g.dtype).name)
        for i, (g, d) in enumerate(zip(grad, diff))
        if jnp.iscomplexobj(g) != jnp.iscomplexobj(d)
    ]
    if bad:
        raise CotangentKind(bad)


def scalar_grad(f, diff):
    """(value, gradient) of the scalar fn f(d)[0] at diff, as jax.value_and_grad gives
    them (its reverse pass started from the cotangent 1)."""
    return jax.value_and_grad(lambda d: f(d)[0])(diff)


def scalar_grad_linear(f, diff):
    """`scalar_grad`, and the `linear_gap` between the gradients pulled back from the
    cotangents 1 and `LINEAR_UNIT` (from one trace of fn's forward pass)."""
    value, pullback = jax.vjp(lambda d: f(d)[0], diff)
    # two reverse passes, not one batched over the cotangents: a batched one would run
    # fn's batching rules (a custom_vmap's), and round otherwise than jax.grad does
    single, doubled = (pullback(jnp.asarray(u, value.dtype))[0] for u in (1.0, LINEAR_UNIT))
    return value, single, linear_gap(single, doubled)


def linear_gap(single, doubled) -> jax.Array:
    """RMS(doubled / LINEAR_UNIT - single) over the gradient's entries, relative to the
    larger RMS of the two, in at least float32 (0, to a rounding, for a derivative linear
    in its cotangent; entries of `doubled` at or near its dtype's largest number are left
    out: a float16 gradient above half of it overflowed at the cotangent LINEAR_UNIT,
    to Inf, or to the largest number where a rule clamps its Inf with `jnp.nan_to_num`)."""
    # (of the real dtypes: a complex64 gradient's sums are float32)
    work = _precision.accumulator([jnp.finfo(g.dtype).dtype for g in single])
    apart = ones = twos = jnp.zeros((), work)
    for a, b in zip(single, doubled):
        # (|b| above half the largest number: b * LINEAR_UNIT overflows, in any dtype)
        b = jnp.where(jnp.isfinite(b * LINEAR_UNIT), b / LINEAR_UNIT, a)
        apart += jnp.sum(jnp.square(jnp.abs(b - a).astype(work)))
        ones += jnp.sum(jnp.square(jnp.abs(a).astype(work)))
        twos += jnp.sum(jnp.square(jnp.abs(b).astype(work)))
    # (apart > 0 only where whole > 0; no dtype's tiny: a literal that differs between
    # float32 and float64 would make this program read as another one in float64)
    whole = jnp.maximum(ones, twos)
    return jnp.where(apart > 0, jnp.sqrt(apart / jnp.where(whole > 0, whole, 1)), 0)


def primal_gap(rule_outs, outs) -> jax.Array:
    """RMS(rule_outs - outs) / RMS(outs) over every output element, in at least float32:
    how far the primal the derivative computes is from fn's own value."""
    work = _precision.accumulator([y.dtype for y in outs])

    def squares(ys):
        return sum(jnp.sum(jnp.square(jnp.abs(y).astype(work))) for y in ys)

    diff = squares([a - b.astype(a.dtype) for a, b in zip(rule_outs, outs)])
    size = squares(outs)
    return jnp.sqrt(diff / jnp.where(size > 0, size, 1.0))


def split_signs(signs, num: int):
    """Host-drawn signs of directions `index` followed by `BALANCE_INDEX` (`_state.Run.signs`)
    as (per parameter leaf, per output leaf, the balancing cotangent's per output leaf), or
    None."""
    if signs is None:
        return None
    params, outputs = signs
    if outputs is None:  # hashed in the program (`_state.Run.signs`)
        return [z[:num] for z in params], None, None
    # the balancing cotangent is random signs whatever the directions' kind: the sign of
    # a "uniform" level is the random sign of the same hash, bit for bit
    balance = [np.sign(z[num]).astype(np.int8) for z in outputs]
    return [z[:num] for z in params], [z[:num] for z in outputs], balance


def _leaf_dots(g, z, acc):
    """<g_k, z_k> for every row k, in at least float32, as `acc`."""
    work = _precision.accumulator([g.dtype, z.dtype])
    axes = tuple(range(1, z.ndim))
    return jnp.sum(g.astype(work) * z.astype(work), axis=axes).astype(acc)


def folded(matrix, at, rows) -> np.ndarray:
    """Projections along the directions in rows `at` of a unit-step matrix of
    `probe_folded`, with per-leaf steps `rows`, in float64."""
    return np.einsum("kl,kl->k", np.asarray(rows, np.float64), matrix[at].astype(np.float64))


def direction(problem, seeds, k, diff, beta, kind, out_scales, outs, signs=None):
    """Direction number k in parameter space and, for a non-scalar fn, its output cotangent
    (None for a scalar fn); from `signs` (per parameter leaf, per output leaf) where they
    were drawn on the host."""
    p_seeds, o_seeds = seeds
    p_signs, o_signs = (None, None) if signs is None else signs
    v = _directions.direction(p_seeds, k, diff, beta, kind, p_signs, problem.packed)
    if problem.scalar_output:
        return v, None
    scales, weights = out_scales  # (`_evaluate.output_scales`: weights None if not formed)
    return v, _directions.cotangent(o_seeds, k, scales, outs, kind, o_signs, weights)


def jvp_projection(f, diff, v, cot):
    """<u, J v> by forward mode (J v itself for a scalar fn)."""
    _, jv = jax.jvp(f, (diff,), (v,))
    if cot is None:
        return jv[0].astype(_precision.accumulator([jv[0].dtype]))
    return vdot(cot, jv)


def projections(
    problem, modes, kind, plan, seeds, diff, traced, beta_rows, index, signs, out_scales
):
    """Native-precision projections along directions `index` (rows of `beta_rows`; their
    signs drawn on the host, or None): <u, J v> ("fwd") and, for a non-scalar fn,
    <J^T u, v> ("rev"); a scalar fn's reverse projections are formed from its gradient in
    the reference program instead."""
    f = lambda d: problem.outputs(d, traced)  # noqa: E731
    if "reverse" in modes:
        outs, vjp_fn = jax.vjp(f, diff)
    else:
        outs = f(diff)

    def one(k, beta, z):
        v, cot = direction(problem, seeds, k, diff, beta, kind, out_scales, outs, z)
        v = _plan.constrain(v, plan)
        res = {}
        if "reverse" in modes:
            res["rev"] = vdot(vjp_fn(cot)[0], v)
        if "forward" in modes:
            unit, size = _near_unit(v, beta)
            projection = jvp_projection(f, diff, unit, cot)
            res["fwd"] = projection * size.astype(projection.dtype)
        return res

    return _plan.map_directions(one, (index, beta_rows, signs), plan)


def _near_unit(v, beta):
    """(v / 2^e, 2^e), 2^e the power of two at or below the smallest positive step in
    `beta`, and at least 1: the tangent brought down towards unit size, in each leaf's
    dtype (the division is exact), and the factor that scales its projection back in the
    accumulator's. A tangent of a leaf's RMS size (7 in a float16 model of exp at 10) made
    a float16 jvp overflow where the derivative is finite, as the folded projections,
    along unit directions, do not. No leaf's tangent goes below its unit direction: one
    factor for leaves at 1e20 and 1e-20 (the largest step's) sent the small one's to 0."""
    low = jnp.min(jnp.where(beta > 0, beta, jnp.inf))
    size = jnp.exp2(jnp.floor(jnp.log2(jnp.where(jnp.isfinite(low) & (low > 1), low, 1.0))))
    # (divided in the wider of the two dtypes: a float64 tangent is not rounded, a
    # float16 one is not divided by a power of two beyond its range)
    wide = [_precision.accumulator([x.dtype, size.dtype]) for x in v]
    unit = [(x.astype(w) / size.astype(w)).astype(x.dtype) for x, w in zip(v, wide)]
    return unit, size
