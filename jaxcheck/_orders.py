"""Second and higher derivatives, and the staging of a check (complex view, then orders).

The derivative of order k is checked as `jax.test_util.check_grads` does: the order k - 1
check of fn, plus first-order checks of the derivative maps of level k - 1, which are
ordinary functions of the parameters:

    jvp map  m_f(params, *args) = <u, jvp(fn, (params,), (v,))[1]>
    vjp map  m_r(params, *args) = <vjp(fn, params)[1](u), v>

with a fixed random tangent v (random signs scaled to each leaf's RMS, like the directions)
and a fixed random cotangent u (each output leaf divided by its RMS; 1 for a scalar fn).
Both are <u, J v>, computed by forward and by reverse mode; their gradient is the second
derivative contracted with u and v (for a scalar fn, the Hessian-vector product H v).
Checking the vjp map in reverse mode is reverse-over-reverse, the jvp map in forward mode
forward-over-forward; mode="both" checks one function with the outputs (jvp map, vjp map,
jvp map) in both modes, which covers the mixed orders too, in one check instead of two
(the first-order check contracts the outputs with random weights per direction, so a wrong
chain shows). Level j maps are the same maps of the level j - 1 map with a new tangent, so
the number of checks grows linearly with the order. With `grad_fn`, the level-1 map is
<grad_fn, v>: grad_fn's Jacobian by JAX's autodiff is checked against finite differences
of grad_fn.

The maps are contracted to scalars (rather than checking the vector-valued jvp and vjp,
as check_grads does) because the first-order check of a scalar function needs no random
output cotangents and forms its reverse projections from one gradient: measured on a small
MLP, its programs compile in about half the time.

Everything else (float64 reference, error bars, step ladder, kinks, localization by leaf)
comes from the first-order check, run on each map with the same key. v and u travel as
arguments, not constants, and the maps compare by value: checking the same fn again
compiles nothing.
"""

import contextvars
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import (
    _autodiff,
    _complex,
    _directions,
    _evaluate,
    _localize,
    _options,
    _plan,
    _precision,
    _probe,
    _problem,
    _report,
    _rule_search,
    _state,
    _tree,
    _verdict,
)
from ._errors import NO_DERIVATIVE, GradientCheckError
from ._report import Report, Status

# set while a first-order check of a real function runs, so that `_verify.run` goes straight on
INSIDE = contextvars.ContextVar("jaxcheck_first_order", default=False)


def _restricted(inner, s, arrays, rest, has_aux):
    def f(diff):
        out = inner(_tree.merge(s, diff, arrays), *rest)
        # (a Python number among the outputs, a learning rate returned beside a loss, as
        # the array it stands for)
        return jax.tree_util.tree_map(_as_array, out[0] if has_aux else out)

    return f


def _as_array(y):
    return jnp.asarray(y) if isinstance(y, int | float | complex | np.generic) else y


def _dot(a: list, b: list):
    """sum_l <a_l, b_l> in float32, or float64 when a is: the map's scalar output."""
    acc = jnp.float64 if any(jnp.dtype(x.dtype).itemsize >= 8 for x in a) else jnp.float32
    terms = [_plan.vdot(x.astype(acc), jnp.asarray(y).astype(acc)) for x, y in zip(a, b)]
    return sum(terms, jnp.zeros((), acc))


@jax.custom_jvp
def _held(t, x):
    """The tangent `t` of a jvp map, unchanged; differentiated in `x` (the parameters), its
    derivative is an array of zeros rather than JAX's symbolic zero. Some of JAX's jvp rules
    take symbolic zeros in only as the tangents of their own inputs, not where their
    operands are tangents themselves (forward-over-forward of a `lax.reduce_window` with a
    custom reducer raises); `check_grads`, which differentiates its tangents too, never
    passes them one."""
    del x
    return t


@_held.defjvp
def _held_jvp(primals, tangents):
    t, x = primals
    # both held again, so that the derivatives below this one (the rule runs once per
    # level of differentiation) see arrays too: zeros at every order
    return _held(t, x), _held(jnp.zeros_like(t), x)


@dataclasses.dataclass(frozen=True)
class JvpMap:
    """params, (tangent, cotangent), *rest -> <cotangent, jvp of `inner(params, *rest)`
    along `tangent`>; the jvp itself when `inner` is scalar (cotangent empty). One tangent
    array per differentiable leaf of params, one cotangent array per output leaf."""

    inner: Callable
    has_aux: bool = False

    def __call__(self, params, fixed, *rest):
        tangent, cotangent = fixed
        s, diff, arrays = _tree.split(params, "params")
        f = _restricted(self.inner, s, arrays, rest, self.has_aux)
        t = [_held(jnp.asarray(x).astype(d.dtype), d) for x, d in zip(tangent, diff)]
        out = jax.tree_util.tree_leaves(jax.jvp(f, (diff,), (t,))[1])
        return _dot(out, cotangent) if cotangent else out[0]


@dataclasses.dataclass(frozen=True)
class VjpMap:
    """params, (cotangent, tangent), *rest -> <vjp of `inner(params, *rest)` with
    `cotangent`, tangent>: one cotangent array per output leaf, one tangent array per
    differentiable leaf of params."""

    inner: Callable
    has_aux: bool = False

    def __call__(self, params, fixed, *rest):
        cotangent, tangent = fixed
        s, diff, arrays = _tree.split(params, "params")
        out, pullback = jax.vjp(_restricted(self.inner, s, arrays, rest, self.has_aux), diff)
        leaves, treedef = jax.tree_util.tree_flatten(out)
        u = [jnp.asarray(c).astype(y.dtype) for c, y in zip(cotangent, leaves)]
        return _dot(pullback(jax.tree_util.tree_unflatten(treedef, u))[0], tangent)


@dataclasses.dataclass(frozen=True)
class CotangentMap:
    """params, (base, cotangent, tangent), *rest -> <vjp of `inner` at `base`, pulling back
    `cotangent` times the output jax.vjp of `inner` returns at params, tangent>: fn's vjp
    at a fixed point as a function of its cotangent, which the vjp map (fixed cotangent)
    never differentiates. Its derivative is the transpose of fn's vjp in its cotangent,
    applied to the derivative of that output, which a custom_vjp's fwd computes: a
    custom_vjp whose bwd is right but holds its cotangent behind a `stop_gradient` (or
    differentiates it wrongly) fails here, and so does one whose fwd's output
    differentiates otherwise than fn (held behind a `stop_gradient`, or computed by a
    wrong rule), as in JAX's check_grads, which pulls back the outputs jax.vjp returns."""

    inner: Callable
    has_aux: bool = False

    def __call__(self, params, fixed, *rest):
        base, cotangent, tangent = fixed
        s, diff, arrays = _tree.split(params, "params")
        f = _restricted(self.inner, s, arrays, rest, self.has_aux)
        at = [jnp.asarray(b).astype(d.dtype) for b, d in zip(base, diff)]
        out, pullback = jax.vjp(f, at)
        leaves, treedef = jax.tree_util.tree_flatten(out)
        g = [
            jnp.asarray(c).astype(y.dtype) * (y / _power_of_two(y0).astype(y.dtype))
            for c, y, y0 in zip(cotangent, jax.tree_util.tree_leaves(jax.vjp(f, diff)[0]), leaves)
        ]
        return _dot(pullback(jax.tree_util.tree_unflatten(treedef, g))[0], tangent)


@dataclasses.dataclass(frozen=True)
class PrimalMap:
    """params, cotangent, *rest -> <cotangent, the primal output jax.jvp of `inner`
    returns>: a custom_jvp rule's own primal output as a function of params, which the jvp
    and vjp maps (their tangent outputs alone) never differentiate. A rule whose primal
    output has the right value but is held behind a `stop_gradient` (or computed by code
    that differentiates otherwise) fails here, as in JAX's check_grads, which
    differentiates the primal outputs jax.jvp and jax.vjp return (a value_and_grad in fn
    differentiates it too)."""

    inner: Callable
    has_aux: bool = False

    def __call__(self, params, cotangent, *rest):
        s, diff, arrays = _tree.split(params, "params")
        f = _restricted(self.inner, s, arrays, rest, self.has_aux)
        # zeros, not symbolic ones: the rule itself runs
        zeros = [jnp.zeros_like(d) for d in diff]
        out = jax.tree_util.tree_leaves(jax.jvp(f, (diff,), (zeros,))[0])
        return _dot(out, [jnp.asarray(c).astype(y.dtype) for c, y in zip(cotangent, out)])


def _power_of_two(y):
    """The power of two nearest the largest |y| (1 where y is zero or not finite), taken
    in float32 so that the map scales alike in every precision: fn's outputs over it
    are about 1, and pulled back they overflow no more than the vjp map does."""
    top = jnp.max(jnp.abs(y.astype(jnp.float32)), initial=0.0)
    usable = (top > 0) & jnp.isfinite(top)
    return jnp.exp2(jnp.round(jnp.log2(jnp.where(usable, top, 1.0))))


@dataclasses.dataclass(frozen=True)
class PairMap:
    """params, (jvp's fixed, vjp's fixed), *rest -> (jvp map, vjp map, jvp map): two
    computations, by forward and by reverse mode, of the same scalar <u, J v>. One
    first-order check of the pair in both modes covers forward-over-forward,
    reverse-over-forward, forward-over-reverse and reverse-over-reverse, at the cost of one
    check instead of two (a wrong chain shows in the random combinations of the
    outputs that the check draws per direction)."""

    jvp: JvpMap
    vjp: VjpMap

    def __call__(self, params, fixed, *rest):
        jvp_fixed, vjp_fixed = fixed
        by_jvp = self.jvp(params, jvp_fixed, *rest)
        by_vjp = self.vjp(params, vjp_fixed, *rest)
        # one precision for both: where fn returns float32 even in the float64 reference,
        # the jvp map is a float32 staircase there while the vjp map is not, and a step
        # fine enough for one leaves the other flat
        low = _precision.lowest([by_jvp.dtype, by_vjp.dtype])
        by_jvp, by_vjp = by_jvp.astype(low), by_vjp.astype(low)
        # the outputs are equal, and the check weighs each by a random sign over its RMS:
        # with two of them the signs would cancel exactly along half of the directions
        # (fn would look constant there); an odd number of equal outputs never cancels
        return by_jvp, by_vjp, by_jvp


@dataclasses.dataclass(frozen=True)
class GradFnMap:
    """params, tangent, *rest -> <the hand-written gradient, tangent>."""

    grad_fn: Callable

    def __call__(self, params, tangent, *rest):
        s = _tree.split(params, "params")[0]
        grads = _tree.match_gradient(s, self.grad_fn(params, *rest))
        return _dot([jnp.asarray(g) for g in grads], tangent)


def run(fn, params, args: tuple, options: _options.Options, first: Callable) -> Report:
    """The check `options` ask for, with `first(fn, params, args, options)` running one
    first-order check of a real function: complex parameters or outputs through their real
    view (`_complex`), then orders above 1 through derivative maps."""
    first = functools.partial(_inside, first)
    paths = _complex.complex_paths(params)
    complex_outputs = False
    if not paths:
        try:
            return _staged(fn, params, args, options, first)
        except (TypeError, ValueError):
            # complex outputs of real parameters: only now worth a trace to find out
            complex_outputs = _complex.has_complex_outputs(fn, params, args, options.has_aux)
            if not complex_outputs:
                raise
    if options.grad_fn is not None and (
        complex_outputs or _complex.has_complex_outputs(fn, params, args, options.has_aux)
    ):
        raise ValueError(
            "grad_fn was given, but fn returns a complex value: a hand-written gradient is "
            "checked for a real scalar fn only (jax.grad's convention; jax.grad itself "
            "refuses a complex output unless holomorphic=True). Leave grad_fn out to check "
            "JAX's derivatives of the complex fn, holomorphic or not, through its real "
            "view; or check a real loss of it (jnp.abs(fn(z)) ** 2, say) with that "
            "loss's gradient."
        )
    fn_r, params_r, grad_r = _complex.real_problem(
        fn, params, options.grad_fn, options.has_aux, paths
    )
    inner = dataclasses.replace(options, grad_fn=grad_r, raise_on_failure=False)
    report = _staged(fn_r, params_r, args, inner, first)
    report = _complex.restore_leaves(report, params, paths)
    if report.status is Status.FAIL and options.grad_fn is not None:
        real = _real_gradients(options.grad_fn, params, args, paths)
        if real:
            note = (
                f"grad_fn returns {'a real array' if len(real) == 1 else 'real arrays'} for "
                f"the complex {'leaf' if len(real) == 1 else 'leaves'} {', '.join(real)}: JAX's "
                "gradient of a real loss in a complex parameter is complex (dL/dx - i dL/dy "
                "for z = x + iy), and a real one leaves out the derivative along the "
                "imaginary parts"
            )
            report = dataclasses.replace(report, problems=(note, *report.problems))
    if paths and report.status is Status.PASS:
        report = _off_real_axis(report, fn, params, args, options, paths, first)
    if options.raise_on_failure and not report.ok:
        raise GradientCheckError(report)
    return report


def _inside(first, fn, params, args, options) -> Report:
    token = INSIDE.set(True)
    try:
        return first(fn, params, args, options)
    finally:
        INSIDE.reset(token)


def _staged(fn, params, args, options, first) -> Report:
    if options.order == 1:
        return first(fn, params, args, options)
    o = dataclasses.replace(options, raise_on_failure=False)
    token, curves = _state.SCALES.set({}), _state.CURVES.set({})
    maps = _state.MAPS.set(False)  # (set by `_parts` once its first-order part ran)
    try:
        parts = _parts(fn, params, args, o, first)
    finally:
        _state.SCALES.reset(token)
        _state.CURVES.reset(curves)
        _state.MAPS.reset(maps)
    report = _report.compose(parts, options.order)
    if options.raise_on_failure and not report.ok:
        raise GradientCheckError(report)
    return report


def _parts(fn, params, args, o: _options.Options, first) -> list:
    base = dataclasses.replace(o, order=1)
    # (fn's own derivatives are traced under jax_enable_checks by the order-2 part)
    token = _state.CHECKED_LATER.set(o.grad_fn is None)
    try:
        head = _named(first(fn, params, args, base), 1, (), "fn")
    finally:
        _state.CHECKED_LATER.reset(token)
    parts = [(1, head)]
    _state.MAPS.set(True)  # (reset by `_staged`)
    if _probe.KIND_HINT in head.problems:  # a cotangent of the wrong kind: nothing above
        return [dataclasses.replace(head, problems=(*head.problems, _ABOVE_NOT_CHECKED))]
    curved = head_curved = _curved()
    draws = _Draws.make(fn, params, args, base)
    notes, inner = [], "pair" if o.mode == "both" else o.mode
    if inner == "pair" and "forward" not in head.mode:
        notes.append(_NO_JVP_MAP)
        inner = "reverse"
    mapped, name, extra = fn, "fn", ()
    derived = dataclasses.replace(base, grad_fn=None, has_aux=False)
    for level in range(1, o.order):
        below = parts[-1][1]

        def check(
            draws,
            inner=inner,
            level=level,
            below=below,
            curved=curved,
            map_below=(mapped, name, extra),
        ):
            mapped, name, extra = _derive(inner, level, *map_below, o, draws)
            report = _checked_map(first, mapped, name, extra, level, params, args, derived, o)
            report = _beside_kinks(report, below, level + 1)
            report = _on_rounding(report, below, level + 1)
            report = _flat_where_curved(report, curved, level + 1, o.grad_fn is not None)
            return (mapped, name, extra), report

        try:
            (mapped, name, extra), report = _again_if_flat(check, draws)
        except NotImplementedError as err:
            # fn calls a custom_vjp, which has no jvp, and the order-1 part did not find it
            # out (fn NaN/Inf at params ended it before forward mode was tried): the jvp
            # map's jvp of it, differentiated in reverse mode, has no rule in JAX
            if inner != "pair" or "custom_lin" not in str(err):
                raise
            notes += [_evaluate.NO_JVP, _NO_JVP_MAP]
            inner = "reverse"
            (mapped, name, extra), report = _again_if_flat(
                functools.partial(check, inner=inner), draws
            )
        curved = _curved()
        chain = (_CHAIN_NAMES.get(inner, inner),) * level
        parts.append((level + 1, _named(report, level + 1, chain, name)))
        # the kinds of custom rules fn calls, for the two parts below (one trace for both)
        kinds = frozenset()
        if level == 1 and o.grad_fn is None:
            # (fn's output alone: an aux of strings, or a module, cannot be traced)
            out = (lambda p, *a: fn(p, *a)[0]) if o.has_aux else fn
            kinds = _rule_search.fn_rule_kinds(out, params, args)
        if _in_cotangent(inner, kinds):

            def in_cotangent(draws):
                vectors = draws.inputs.diff, draws.output_signs(), draws.tangent(1, scaled=False)
                reverse = dataclasses.replace(derived, mode="reverse")
                try:
                    report = _forward_if_refused(
                        first,
                        CotangentMap(fn, o.has_aux),
                        params,
                        (vectors, *args),
                        reverse,
                        _COTANGENT_LABEL,
                    )
                except ValueError as err:
                    if _REVERSE_REFUSED not in str(err):
                        raise
                    raise _refused_at(o.order, 1, _COTANGENT_LABEL, err) from err
                report = _on_rounding(_beside_kinks(report, head, 2), head, 2)
                # the map's derivative holds fn's vjp at params: where fn's derivative is
                # zero there (a square at 0, a layer started at zero), the map is flat
                # whether fn curves or not
                zero = bool(head.checks) and head.checks[0].absolute
                return None, _flat_where_curved(report, head_curved and not zero, 2)

            report = _again_if_flat(in_cotangent, draws)[1]
            parts.append((2, _named(report, 2, ("reverse",), _COTANGENT_LABEL)))
        elif "custom_jvp" in kinds:
            # fn calls a custom_jvp, whose rule computes the primal output of fn's jvp (a
            # custom_vjp's, in reverse mode, is differentiated by the cotangent map)

            def in_primal(draws):
                report = first(
                    PrimalMap(fn, o.has_aux), params, (draws.cotangent(), *args), derived
                )
                report = _on_rounding(_beside_kinks(report, head, 2), head, 2)
                return None, _flat_where_curved(report, head_curved, 2)

            report = _again_if_flat(in_primal, draws)[1]
            # (its derivative, in the modes of the check, of what fn's jvp returns)
            parts.append((2, _named(report, 2, ("forward",), PRIMAL_LABEL)))
    if o.grad_fn is not None and head.status is Status.PASS:
        parts.append((2, _grad_fn_nearby(first, fn, params, args, base)))
    if notes:
        parts[0] = (1, dataclasses.replace(head, problems=head.problems + tuple(notes)))
    return [part for _, part in sorted(parts, key=lambda item: item[0])]


# How far the point of `_grad_fn_nearby` is from params: this share of each entry's own
# size (Gaussian, so that no sum of the moves cancels exactly), and a hundredth of it
# where fn or grad_fn is NaN/Inf there
NEARBY = 1e-2
NEARBY_SHARES = (NEARBY, NEARBY / 100)
NEARBY_LABEL = "grad_fn against fn's gradient at a nearby point"


def _grad_fn_nearby(first, fn, params, args, base) -> Report:
    """The first-order check of grad_fn at params moved by `NEARBY` of each entry's size
    along a Gaussian draw. The order-2 map of a grad_fn is grad_fn's own Jacobian, checked
    against finite differences of grad_fn: nothing there ties it to fn's Hessian, and a
    grad_fn right at params with the wrong slope (sin(2w) + 5 sin(w) for the gradient of
    sum(sin(w) ** 2) at 0) passed. Right at both points, its slope along the move is fn's.

    Each entry moves in proportion to itself (a zero one to its leaf's largest entry, an
    all-zero leaf to the others'), so that it keeps its sign: log(w) at a small positive
    w stays defined, and a packed leaf of a rate of 1e4 beside a damping of 0.05 moves
    each quantity at its own scale."""
    seed = int(_directions.seeds(base.key, "nearby", ("",))[0])
    leaves, treedef = jax.tree_util.tree_flatten(params)
    at = [
        i
        for i, x in enumerate(leaves)
        if (_tree.is_array(x) or isinstance(x, float))
        and jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        and np.size(x)
    ]
    with _plan.own_transfers():
        # each leaf's largest magnitude, on the leaf's devices (exact in every dtype: a
        # sum of squares of 1e-20 in float32 is zero)
        tops = jax.device_get([jnp.max(jnp.abs(jnp.asarray(leaves[i]))) for i in at])
        tops = np.asarray(tops, np.float64)
        sizes = _directions.with_floor(tops, [np.size(leaves[i]) for i in at])
        for share in NEARBY_SHARES:
            moved = list(leaves)
            for n, (i, size) in enumerate(zip(at, sizes)):
                moved[i] = _moved(leaves[i], share, float(size), seed + n)
            near = first(fn, jax.tree_util.tree_unflatten(treedef, moved), args, base)
            if near.status is not Status.NONFINITE:
                break
    where = f"params moved by {share * 100:g}% of each entry's size"
    report = _named(near, 2, (), NEARBY_LABEL)
    # the first-order check speaks of params: here they are the moved ones
    problems = tuple(p.replace("at params", f"at {where}") for p in report.problems)
    if near.status is Status.FAIL:
        note = (
            f"grad_fn agrees with fn's gradient at params but not at {where}: its slope, "
            "the Jacobian the order-2 map checks, is not fn's Hessian"
        )
        problems = (note, *problems)
    return dataclasses.replace(report, problems=problems)


# How far `_off_real_axis` moves complex leaves that hold real numbers: an imaginary part
# of this share of each entry's size, times a standard normal draw. A missing conjugate is
# then about this share wrong, beyond the loose tolerances of test suites (0.2)
OFF_AXIS = 0.5


def _real_gradients(grad_fn, params, args, paths) -> list:
    """The complex leaves of params (their `paths`) for which `grad_fn` returns a real
    array, by its trace (none where it cannot be traced so)."""
    try:
        grads = jax.eval_shape(lambda p: grad_fn(p, *args), params)
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    except Exception:  # noqa: BLE001 - the check reported what grad_fn does
        return []
    return [
        jax.tree_util.keystr(path) or "(root)"
        for path, g in flat
        if jax.tree_util.keystr(path) in paths and not jnp.iscomplexobj(g)
    ]


OFF_AXIS_NAME = "fn with imaginary parts added"


def _off_real_axis(report, fn, params, args, options, paths, first) -> Report:
    """`report` with one more part where complex leaves of params hold only real numbers
    and fn calls a custom rule (or a grad_fn is checked): the first-order check with
    imaginary parts added to those leaves. At a real z, z equals conj(z), so a rule that
    leaves out a conjugate (z for jnp.conj(z)) or is written for real inputs
    (jnp.cos(jnp.real(z))) gives the right derivative; its maps of order 2 are wrong only
    off the real axis, where their finite differences run the same rule. JAX's own rules
    are taken as right."""
    keyed, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [x for _, x in keyed]
    at = [i for i, (p, _) in enumerate(keyed) if jax.tree_util.keystr(p) in paths]
    with _plan.own_transfers():
        hosts = {i: _plan.host_array(leaves[i]) for i in at}
        real = [i for i in at if hosts[i].size and not np.any(hosts[i].imag)]
        # (fn's output alone: an aux of strings cannot be traced)
        out = (lambda p, *a: fn(p, *a)[0]) if options.has_aux else fn
        if not real or (
            options.grad_fn is None and not _rule_search.fn_rule_kinds(out, params, args)
        ):
            return report
        tops = np.asarray([np.max(np.abs(hosts[i])) for i in real], np.float64)
        sizes = _directions.with_floor(tops, [hosts[i].size for i in real])
        seed = int(_directions.seeds(options.key, "off axis", ("",))[0])
        moved = list(leaves)
        for n, (i, size) in enumerate(zip(real, sizes)):
            h, x = hosts[i], leaves[i]
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                moved[i] = _moved(x, OFF_AXIS, float(size), seed + n, imaginary=True)
                continue
            g = np.random.default_rng(seed + n).standard_normal(h.shape)
            z = (h + 1j * OFF_AXIS * g * np.where(h == 0, size, np.abs(h))).astype(h.dtype)
            if isinstance(x, jax.Array):
                z = jax.device_put(z, x.sharding if x.committed else None)
            moved[i] = z
    moved = jax.tree_util.tree_unflatten(treedef, moved)
    fn_r, params_r, grad_r = _complex.real_problem(
        fn, moved, options.grad_fn, options.has_aux, paths
    )
    once = dataclasses.replace(options, order=1, grad_fn=grad_r, raise_on_failure=False)
    off = _complex.restore_leaves(first(fn_r, params_r, args, once), moved, paths)
    names = ", ".join(jax.tree_util.keystr(keyed[i][0]) or "(root)" for i in real)
    one = len(real) == 1
    where = (
        f"complex {'leaf' if one else 'leaves'} {names} hold{'s' if one else ''} only real numbers"
    )
    if off.status is Status.FAIL:
        note = (
            f"the derivative agrees at params, where {where}, but not with imaginary parts "
            f"of {OFF_AXIS:g} times each entry's size added: at a real z, z equals "
            "conj(z), so a rule that leaves out a conjugate (z for jnp.conj(z)) or is "
            "written for real inputs (jnp.cos(jnp.real(z))) is right there and wrong off "
            "the real axis"
        )
        off = dataclasses.replace(off, problems=(note, *off.problems))
    elif off.status is not Status.PASS:
        note = (
            f"{where}: there a rule that leaves out a conjugate, or is written for real "
            "inputs, cannot show; the check with imaginary parts added could not judge "
            f"({off.status.value}): check at a point with imaginary parts"
        )
        return dataclasses.replace(report, problems=(*report.problems, note))
    off = _named(off, 1, (), OFF_AXIS_NAME)
    if report.parts:
        parts = sorted((*report.parts, off), key=lambda p: _report.order_of(p) or 0)
        return _report.compose(parts, options.order)
    composed = _report.compose((_named(report, 1, (), "fn"), off), 1)
    return dataclasses.replace(composed, label="order 1")


def _moved(x, share: float, size: float, seed: int, imaginary: bool = False):
    """x + share * g * x entry by entry (size in place of x where x is zero), g standard
    normal (complex normal for a complex x; i times a real one with `imaginary`, the
    entries' magnitudes in place of x), in x's own kind: a jax array on its devices
    and sharding (a sharded model is not gathered, and a grad_fn on a mesh of Explicit
    axes meets the layout it was written for), a NumPy array or scalar in its dtype."""
    if isinstance(x, jax.Array):
        if imaginary:
            g = jax.random.normal(jax.random.key(seed), x.shape, jnp.real(x).dtype)
            g = jax.device_put(jax.lax.complex(jnp.zeros_like(g), g), x.sharding)
            scale = jnp.where(x == 0, jnp.asarray(size, x.dtype), jnp.abs(x).astype(x.dtype))
            return x + share * g * scale
        g = jax.random.normal(jax.random.key(seed), x.shape, x.dtype)
        g = jax.device_put(g, x.sharding)
        return x + share * g * jnp.where(x == 0, jnp.asarray(size, x.dtype), x)
    a = np.asarray(x)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(a.shape)
    if np.iscomplexobj(a):
        g = (g + 1j * rng.standard_normal(a.shape)) / np.sqrt(2)
    out = (a + share * g * np.where(a == 0, size, a)).astype(a.dtype)
    return float(out) if type(x) is float else out


def _again_if_flat(check, draws) -> tuple:
    """`check(draws)`, done again with Gaussian draws where its map came out flat where the
    order below curves: the fixed tangents and cotangents are signs times powers of two
    (exact in every dtype), and along them outputs or parameters in a power-of-two
    relation cancel exactly (fn returning (y, y) or (y, 2 y) with cotangent signs +1, -1;
    a loss of x - y along the tangent (1, 1)): the map is then identically zero, whatever
    the rule. Gaussian values cancel along no such relation: where the map passes along
    them, it was that; where it does not (a staircase rule is flat along any vectors, its
    jumps then crossed within the step), the first verdict stands."""
    out, report = check(draws)
    if not any(q.startswith(_report.FLAT_WHERE_CURVED) for q in report.problems):
        return out, report
    again_out, again = check(dataclasses.replace(draws, gaussian=True))
    if again.status is not Status.PASS:
        return out, report
    note = (
        "the map's fixed tangents and cotangents (signs times powers of two) made it "
        "identically zero (outputs or parameters in a power-of-two relation cancel along "
        "them), so it was checked along Gaussian ones instead"
    )
    return again_out, dataclasses.replace(again, problems=(*again.problems, note))


def _checked_map(first, mapped, name, extra, level, params, args, derived, o) -> Report:
    """The first-order check of the level-`level` derivative map, JAX's refusals to
    differentiate it said in words of the order asked."""
    try:
        return _forward_if_refused(first, mapped, params, (*extra, *args), derived, name)
    except ValueError as err:
        if _REVERSE_REFUSED not in str(err) and _NO_JVP not in str(err):
            raise
        raise _refused_at(o.order, level, name, err) from err
    except (TypeError, *_plan.TRACING_ERRORS) as err:
        # the first-order check may have put its own words around the tracing error
        cause = err if isinstance(err, _plan.TRACING_ERRORS) else err.__cause__
        if not isinstance(cause, _plan.TRACING_ERRORS):
            raise
        source = "grad_fn" if o.grad_fn is not None else "fn"
        raise TypeError(
            f"order={o.order}: the order-{level + 1} check differentiates {source} "
            f"with JAX ({name}), but {source} cannot be traced "
            f"({type(cause).__name__}: it converts traced values to NumPy or branches "
            f"on them). Write {source} with jax.numpy, or check order=1 only."
        ) from err


def _refused_at(order: int, level: int, name: str, err: ValueError) -> ValueError:
    """JAX's refusal to differentiate the level-`level` derivative map `name` in reverse
    mode (`_verify.run`'s ValueError), said in words of the order asked."""
    said = str(err.__cause__ or err).strip().splitlines()[0]  # JAX's own words
    return ValueError(
        f"order={order}: the order-{level + 1} check differentiates the {name} with JAX, "
        f"which says: {said} fn's derivative of order {level} cannot be differentiated "
        f"itself (a custom_vjp whose bwd, or a kernel or callback in it, {NO_DERIVATIVE}); "
        f"fn passes or fails at order={level} alone. Check order={level}, or give that "
        "rule a differentiable bwd."
    )


# JAX's words where a callback's value is differentiated (a bwd calling one, at order 2)
_NO_JVP = "do not support JVP"


def _forward_if_refused(first, mapped, params, args, options, name) -> Report:
    """`first(mapped, params, args, options)`; where JAX refuses to differentiate the map in
    reverse mode, the map checked in forward mode instead, which a note says. JAX
    differentiates some derivatives in forward mode only: the bwd of a custom_vjp whose fwd
    runs a while_loop (an implicit layer's; forward-over-reverse is how its Hessian-vector
    products are computed). JAX's refusal stands where forward mode fails too."""
    try:
        return first(mapped, params, args, options)
    except ValueError as err:
        if options.mode == "forward" or _REVERSE_REFUSED not in str(err):
            raise
        refused = err
    try:
        report = first(mapped, params, args, dataclasses.replace(options, mode="forward"))
    except (ValueError, TypeError, NotImplementedError):
        raise refused from refused.__cause__
    # (the first sentence of JAX's own words, as `_checked_map` takes them: "Reverse-mode
    # differentiation does not work for lax.while_loop or lax.fori_loop with dynamic
    # start/stop values")
    said = str(refused.__cause__ or refused).strip().splitlines()[0].split(". ")[0].rstrip(".")
    note = f"JAX cannot differentiate the {name} in reverse mode ({said}): checked in forward mode"
    return dataclasses.replace(report, problems=(*report.problems, note))


_NO_JVP_MAP = (
    "for the same reason, the jvp map (forward-over-forward, reverse-over-forward) was not checked"
)

_ABOVE_NOT_CHECKED = (
    "the orders above 1 were not checked (their maps need a first derivative of the right dtype)"
)

# what `_verify.run` says where fn has no reverse mode
_REVERSE_REFUSED = "cannot be differentiated in reverse mode"


def _in_cotangent(inner, kinds: frozenset) -> bool:
    """Whether to check fn's vjp in its cotangent too (`CotangentMap`): in reverse mode,
    where fn calls a custom_vjp (`kinds`: those of the rules fn calls), the only rule
    whose derivative in its cotangent is code of its own (JAX transposes its primitives'
    and custom_jvp's linear maps)."""
    return inner in ("reverse", "pair") and "custom_vjp" in kinds


PRIMAL_LABEL = "primal output of fn's jvp"
_COTANGENT_LABEL = "vjp map in its cotangent"

_LOCALIZED = ("wrong: ", _localize.NO_SINGLE_LEAF)


def _beside_kinks(report: Report, below: Report, order: int) -> Report:
    """A failing order-`order` check where the order below could not be judged for kinks:
    where fn (or a derivative map) has a kink at the point, its derivative maps jump there,
    so their finite differences say nothing about the rule: not judged."""
    # (an order below that passed on its leaves alone, its all-leaf directions kinked,
    # may sit on a kink that only combined directions cross: |a b| / |(a, b)| at 0)
    unjudged = below.status is Status.INCONCLUSIVE or any(
        _localize.LEAF_BY_LEAF in q for q in below.problems
    )
    if not (report.status is Status.FAIL and unjudged and below.num_nonsmooth):
        return report
    return _unjudged(
        report,
        f"the order below has kinks or jumps at this point along {below.num_nonsmooth} of "
        f"{below.num_directions} directions, so the maps checked at order {order} jump "
        "here: their finite differences cannot judge them (not a verdict on the rule)",
    )


def _unjudged(report: Report, why: str) -> Report:
    """`report` with its failure turned into "not judged", for the reason `why`."""
    unjudged = Status.INCONCLUSIVE
    return dataclasses.replace(
        report,
        status=unjudged,
        checks=tuple(
            c if c.passed else dataclasses.replace(c, judged=False) for c in report.checks
        ),
        leaves=tuple(
            dataclasses.replace(leaf, status=unjudged) if leaf.status is Status.FAIL else leaf
            for leaf in report.leaves
        ),
        problems=(why, *(q for q in report.problems if not q.startswith(_LOCALIZED))),
    )


def _on_rounding(report: Report, below: Report, order: int) -> Report:
    """A failing order-`order` check where the order below found its derivative, in the
    model's precision, to be rounding far off the same rule in the reference (softmax
    cross-entropy at a logit gap of 20 in float32: 1 - p rounds to 0): the maps checked
    at this order are made of that rounding (a reverse-over-reverse Hessian-vector
    product 270 % off, where forward-over-forward is 3e-5 off): not judged."""
    # (a map found to compute something else in float64 than in float32 is that rounding
    # too, whether its float64 rule then passed or failed)
    made_of_rounding = report.status is Status.FAIL or any(
        _verdict.INCOMPARABLE in q for q in report.problems
    )
    # (or found it below the rounding of fn's values: softmax cross-entropy at a logit gap
    # of 50, whose gradient's entries are 1 - p, rounded to 0 in float64 too; unless the map
    # under test is exactly zero where finite differences see it change: a bwd behind a
    # stop_gradient there is no rounding)
    blind = any(_verdict.BLIND in q for q in below.problems) or (
        any(_verdict.SMALL_UNSEEN in q for q in below.problems)
        and not any(_localize.CUT_OFF in q for q in report.problems)
    )
    if not (made_of_rounding and blind):
        return report
    # (the float64 map was set aside as "something else": it is the rounding that differs)
    kept = tuple(q for q in report.problems if _verdict.INCOMPARABLE not in q)
    return _unjudged(
        dataclasses.replace(report, problems=kept),
        f"the derivative of the order below is {report.tested_dtype} rounding at this "
        "point (see its note: far from the same rule in float64, or below what fn's values "
        f"can show), so the maps checked at order {order} are made of that rounding: not a "
        "verdict on the rule",
    )


def _curved() -> bool:
    """Whether the first-order check that ran last found its function curving."""
    return bool((_state.CURVES.get() or {}).get("last", False))


def _flat_where_curved(report: Report, curved: bool, order: int, of_grad_fn=False) -> Report:
    """A failing check where the map checked at order `order` passed as flat (its values
    and its derivative exactly constant within the step, `_verdict.FLAT`) while the
    function of the order below, whose derivative the map is, curves measurably within
    its step (`_verdict.curves`): the derivative of that order then changes where the
    map built from it does not, so the map is not its derivative: a rule's bwd or jvp
    computed through round, floor, an integer cast or a lookup table is a staircase
    whose own derivative is zero. Both finite differences and autodiff of the map see the
    staircase alone, and agree on it (JAX's check_grads passes it too)."""
    flat = [q for q in report.problems if q.startswith(_verdict.FLAT)]
    if not (curved and flat and report.status is Status.PASS):
        return report
    why = (
        f"{_report.FLAT_WHERE_CURVED}: the maps checked at order {order} are flat here "
        "(their values and their derivative under test exactly constant within the step), "
        "but the function one order below, which they differentiate, curves measurably "
        "along most of its directions: its derivative changes where these maps do not, so "
        f"their derivative (zero) is not fn's derivative of order {order}. "
    )
    if of_grad_fn:
        why += (
            "A grad_fn that returns a gradient computed beforehand, or goes through round, "
            "floor, an integer cast, a lookup table or a stop_gradient, is such a staircase"
        )
    else:
        why += (
            "A custom rule whose bwd or jvp goes through round, floor, an integer cast, a "
            "lookup table or a stop_gradient is such a staircase; check it alone with "
            f"jaxcheck.verify_rule(..., order={order})"
        )
    return dataclasses.replace(
        report,
        status=Status.FAIL,
        checks=tuple(
            dataclasses.replace(c, passed=False) if c.absolute and c.passed else c
            for c in report.checks
        ),
        problems=(why, *(q for q in report.problems if q not in flat)),
    )


# mode="both" checks the jvp map and the vjp map as one function of three outputs
_CHAIN_NAMES = {"pair": "forward/reverse"}


def _derive(inner, level, mapped, name, extra, o, draws):
    """The level-`level` map: (map, its name, the fixed arguments it takes before `*args`,
    innermost last). Every map is scalar, contracted with fixed random vectors: the
    first-order check of a scalar function needs no random output cotangents and forms its
    reverse-mode projections from one gradient, so it compiles about half the work."""
    v = draws.tangent(level)
    if inner == "pair":
        aux = o.has_aux and level == 1
        if level == 1:
            u_jvp = draws.cotangent() if not draws.scalar else []
            u_vjp = draws.cotangent()
            label = "Hessian-vector products" if draws.scalar else "jvp and vjp maps"
        else:  # the map below returns three scalars: contract with ones
            u_jvp = u_vjp = [jnp.ones((), jnp.float32)] * 3
            label = f"jvp and vjp maps of the {name}"
        pair = PairMap(JvpMap(mapped, aux), VjpMap(mapped, aux))
        return pair, label, (((v, u_jvp), (u_vjp, v)), *extra)
    if inner == "forward":
        u = draws.cotangent() if level == 1 and not draws.scalar else []
        label = "jvp map" if level == 1 else f"jvp map of the {name}"
        return JvpMap(mapped, o.has_aux and level == 1), label, ((v, u), *extra)
    if level == 1 and o.grad_fn is not None:
        return GradFnMap(o.grad_fn), "grad_fn", (v,)
    u = draws.cotangent() if level == 1 else [jnp.ones((), jnp.float32)]
    if level == 1:
        label = "Hessian-vector products" if draws.scalar else "vjp map"
    else:
        label = f"vjp map of the {name}"
    return VjpMap(mapped, o.has_aux and level == 1), label, ((u, v), *extra)


def _named(report: Report, order: int, chain: tuple, name: str) -> Report:
    """The part with its label and its rows named by order and mode."""

    def row(mode):
        return f"order {order}: {'-over-'.join((mode, *chain))} ({name})"

    checks = []
    for c in report.checks:
        kind, mode = _report.check_kind(c.name)
        if kind == "consistency":
            new = f"order {order}: forward vs reverse ({name})"
        elif kind == "linearity":  # (no mode: it names its own cotangent or tangent)
            new = f"order {order}: {c.name} ({name})"
        elif kind == "rule":
            new = f"{row(mode)}, same rule in {report.reference_dtype}"
        else:
            new = row(mode)
        checks.append(dataclasses.replace(c, name=new))
    # a derivative map flat here is most often fn's derivative of that order constant (fn
    # a polynomial of lower degree), not a staircase
    constant = (
        _verdict.FLAT_KINDS,
        f"fn's derivative of order {order - 1} is constant here, as a polynomial's of "
        f"degree {order - 1} is, or the map is piecewise constant",
    )
    problems = tuple(
        q.replace(*constant) if q.startswith(_verdict.FLAT) else q for q in report.problems
    )
    return dataclasses.replace(
        report, checks=tuple(checks), problems=problems, label=f"order {order}: {name}"
    )


# the exponents of the powers of two a map's fixed vectors are scaled by (`_Draws._signs`):
# times 1/2 or 2, float32 normal numbers (2^-126 to just below 2^128)
_LOW_POWER, _HIGH_POWER = -125, 126


@dataclasses.dataclass
class _Draws:
    """The fixed tangents and cotangents of the derivative maps, drawn on the host from
    the check's key (per leaf path and level), scaled like the directions. They are float32
    arguments, which the maps cast to the dtype of what they multiply. The scales come from
    the first-order check's probe, taken over (`_state.SCALES`), or that probe program run again
    (compiled once for both) when it is not at hand."""

    key: object
    problem: _problem.Problem
    inputs: _problem.Inputs
    reverse: bool
    # Gaussian values instead of signs times powers of two (`_again_if_flat`)
    gaussian: bool = False

    @classmethod
    def make(cls, fn, params, args, o: _options.Options) -> "_Draws":
        p_split, diff, p_arrays = _tree.split(params, "params")
        a_split, a_floats, a_arrays = _tree.split(args, "args")
        inputs = _problem.Inputs(diff, p_arrays, a_floats, a_arrays)
        problem = _problem.Problem(fn, o.grad_fn, o.has_aux, p_split, a_split)
        problem = _problem.with_output_structure(problem, inputs)
        return cls(o.key, problem, inputs, o.mode != "forward")

    @property
    def scalar(self) -> bool:
        return self.problem.scalar_output

    @functools.cached_property
    def _scales(self) -> tuple[np.ndarray, np.ndarray]:
        """(per parameter leaf, per output leaf) RMS magnitudes, zero ones floored: those
        of the first-order check's probe, or the probe run again when it did not run."""
        seen = _state.SCALES.get() or {}
        if "params" in seen:
            return np.asarray(seen["params"], np.float64), np.asarray(seen["outputs"], np.float64)
        probe = _plan.Timer().run(
            functools.partial(_autodiff.probe, self.problem, self.reverse),
            _directions.seeds(self.key, "outputs", self.problem.out_paths),
            self.inputs.diff,
            self.inputs.traced(),
        )
        diff = self.inputs.diff
        rms, _ = _directions.host_rms(np.asarray(probe["param_squares"]), diff)
        sizes = [max(x.size, 1) for x in diff]
        params = np.asarray(_directions.with_floor(np.nan_to_num(rms), sizes), np.float64)
        return params, np.asarray(probe["output_scales"], np.float64)

    def _signs(self, namespace, paths, shapes, scales) -> list:
        """Random signs times random powers of two (1/2, 1 or 2), times each leaf's scale
        rounded to a power of two: products with them are exact in every float dtype, so
        the map computes the same function in the model's precision and in float64. A
        leaf of several elements is never proportional to ones (its first sign is
        flipped where it would be), the vector along which many maps vanish identically
        (softmax's, whose outputs sum to one; a shift-invariant fn's): with signs alone,
        a leaf of 3 elements drew one a quarter of the time, and the check then had
        nothing to judge, or passed a wrong second derivative."""
        out = []
        for seed, shape, scale in zip(
            _directions.seeds(self.key, namespace, paths), shapes, scales
        ):
            rng = np.random.default_rng(int(seed))
            signs = rng.integers(0, 2, size=shape) * 2.0 - 1.0
            values = signs * 2.0 ** rng.integers(-1, 2, size=shape)
            if self.gaussian:
                values = rng.standard_normal(size=shape)
            flat = values.reshape(-1)
            if flat.size > 1 and np.all(flat == flat[0]):
                flat[0] = -flat[0]
            # (within float32's normal range, its factors of 2 included: a float64 leaf's
            # scale of 1e40, or an output's of exp(-90), made the float32 vector infinite
            # or subnormal, which XLA flushes to zero, and the map identically zero)
            power = 2.0 ** np.clip(np.round(np.log2(scale)), _LOW_POWER, _HIGH_POWER)
            # on the host: jnp.asarray of a NumPy array compiles a small program per new
            # shape, one per check in a test suite
            out.append(jax.device_put(np.asarray(values * power, np.float32)))
        return out

    def tangent(self, level: int, scaled: bool = True) -> list:
        """The fixed tangent of level `level` in parameter space (shared by the jvp and the
        vjp chain: their maps are then the same function, computed in different modes),
        scaled to each leaf's RMS, or not (`CotangentMap`'s, which contracts fn's
        Jacobian twice: at a leaf's scale, float16 would overflow)."""
        paths = self.problem.params.paths_of(_tree.DIFF)
        shapes = [x.shape for x in self.inputs.diff]
        scales = self._scales[0] if scaled else [1.0] * len(paths)
        return self._signs(f"tangent:{level}", paths, shapes, scales)

    def output_signs(self, scaled: bool = False) -> list:
        """Random signs (times 1/2, 1 or 2) per output element, a scalar fn's too, over
        each output leaf's RMS where `scaled`: unscaled, the weights `CotangentMap` gives
        fn's outputs, which it scales itself."""
        problem = self.problem
        scales = 1.0 / self._scales[1] if scaled else [1.0] * len(problem.out_paths)
        return self._signs("cotangent:1", problem.out_paths, problem.out_shapes, scales)

    def cotangent(self) -> list:
        """The fixed cotangent of fn's outputs (1 for a scalar fn)."""
        if self.scalar:
            return [jnp.ones((), jnp.float32)]
        return self.output_signs(scaled=True)
