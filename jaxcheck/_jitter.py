"""The derivative under test's own rounding, where no higher-precision rule measures it.

A float32 derivative is compared with the same rule in float64, and their distance is its
rounding. A derivative tested in the reference's own precision (float64 models, or the
"native" policy) has nothing finer to be compared with, and where the derivative is
itself rounding (a residual that cancels to 1e-17 at an exact fit, which the gradient's
program and the finite differences' compute in different orders), a finite difference
that resolves its own rounding finely calls it wrong. Before a failure stands there, the
gradient is evaluated again at params moved by a few ulps (relative, random signs, so
that zeros stay zeros and no kink at 0 is crossed): how far it moves is its rounding.
Where fn casts values computed from params to a less precise dtype inside, the move is by
ulps of that dtype, both ways, and the gradient's smooth change along it is taken out. A
wrong rule moves with the point no more than a right one, so a bug stays a failure.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _autodiff, _error_model, _plan, _precision, _rule_search, _verdict
from ._error_model import SAFETY
from ._state import Run

JITTER_ULPS = 4  # relative move of every parameter entry, in eps of the tested dtype
WITHIN_ROUNDING = (
    "the derivative under test is off the finite differences by no more than it moves "
    f"itself when params move by {JITTER_ULPS} ulps (its own rounding: at a stationary "
    "point the derivative is rounding, computed differently by each program); not judged"
)


def explains(run: Run, p, weights) -> bool:
    """Whether the distance of the derivative under test from the finite differences of
    pass `p` (along directions whose per-leaf scales are `weights`) is within what the
    finite differences' noise and the derivative's rounding allow together."""
    if _verdict.with_rule(run):
        return False  # a higher-precision rule measured the rounding already
    use = p.fd.smooth
    if not use.any():
        return False
    weights = np.asarray(weights, np.float64)
    noise = _error_model.rms(p.fd.bar[use])
    gap = apart(p, run.modes)
    tested = max((_error_model.rms(a) for a in _tested(p, run.modes)), default=0.0)
    # the largest of a few moves (one move of a leaf of 4 entries is a sum of 4 squares,
    # and spreads several-fold between draws)
    for draw in range(SYSTEMATIC_DRAWS):
        moved = _gradient_change(run, draw)
        if moved is None:
            return False
        # relative to the gradient along the same leaves, then in the projections' units
        # (the weights' overall scale is not the directions': a leaf checked alone at a
        # larger scale than its own read ten times less rounding than it has)
        size = math.sqrt(float(np.sum(np.square(weights) * run.probe["jitter_sizes"])))
        share = math.sqrt(float(np.sum(np.square(weights) * moved))) / size if size else 0.0
        if gap <= SAFETY * math.hypot(noise, share * tested):
            return True
    return False


def _tested(p, modes):
    """The derivative under test's projections over the smooth directions (float64), one
    array per mode checked."""
    use = p.fd.smooth
    for mode, a in (("reverse", p.rev), ("forward", p.fwd)):
        if mode in modes and a is not None and use.any():
            yield np.asarray(a, np.float64)[use]


def apart(p, modes) -> float:
    """RMS distance of the derivative under test from the finite differences, over the
    smooth directions, in the worse mode (absolute, per direction)."""
    value = p.fd.value[p.fd.smooth]
    return max((_error_model.rms(a - value) for a in _tested(p, modes)), default=0.0)


SYSTEMATIC = 30  # a gap to the same rule in float64 this many times its own move is no rounding
SYSTEMATIC_DRAWS = 3  # moves of params drawn to measure rounding: the largest counts


def systematic(run: Run, p, head, weights) -> float | None:
    """Where a pass rests on the gap between the derivative under test and the same rule in
    the reference precision being rounding (the tolerance grows with it), and the gap is
    beyond the rounding of a well-conditioned computation, whether it is rounding. Where
    the derivative's program is the same in both precisions (`other_path`), it is. Where it
    is not (a grad_fn or rule that takes another path in the tested precision): rounding
    changes with the point, so moving params by a few ulps moves the derivative by about as
    much as the gap, while another computation keeps its gap. Returns the derivative's own
    move (the RMS change of its projections, the largest of a few moves) as a share of the
    gap where that share is below 1 / SYSTEMATIC, else None."""
    if not rests_on_gap(run, p, head):
        return None
    a, a_ref = (p.rev, p.ref_rev) if p.rev is not None else (p.fwd, p.ref_fwd)
    use = p.fd.smooth & np.isfinite(a) & np.isfinite(a_ref)
    if not use.any() or not other_path(run):  # (traces only: before any evaluation)
        return None
    apart = _error_model.rms(np.asarray(a, np.float64)[use] - np.asarray(a_ref, np.float64)[use])
    weights = np.asarray(weights, np.float64)
    moves = []
    for draw in range(SYSTEMATIC_DRAWS):
        moved = _gradient_change(run, draw)
        if moved is None:
            return None
        moves.append(math.sqrt(float(np.sum(np.square(weights) * moved))))
    move = max(moves)
    return move / apart if apart > SYSTEMATIC * move else None


def rests_on_gap(run: Run, p, head) -> bool:
    """Whether the pass `head` of pass `p` was made by a gap between the derivative under
    test and the same rule in the reference precision beyond the rounding of a
    well-conditioned computation (the tolerance grows with the gap)."""
    a, a_ref = (p.rev, p.ref_rev) if p.rev is not None else (p.fwd, p.ref_fwd)
    return not (
        a is None
        or a_ref is None
        or not head.passed
        or not head.rounding_measured
        or head.relative_error <= max(head.floor, SAFETY * head.noise_floor)
        or not _verdict.large_rounding(run, head)
    )


def other_path(run: Run) -> bool:
    """Whether the derivative under test is computed by another program in the tested
    precision than in the reference's, while fn itself is the same program in both: other
    operations, or other constants (a grad_fn or rule that multiplies by 1.001, or rounds
    through bfloat16, in float32 only). Rounding that params cannot move (of features fn
    computes from its data alone) comes from the same program in both: a gap that does not
    move with params is no bug there. False where either cannot be traced."""
    programs = _programs(run)
    if programs is None:  # no trace to compare: the gap is not called a bug
        return False
    narrow, wide = programs
    # fn itself the same program in both, its derivative not: fn computing another function
    # in float32 (a smoothing constant of finfo(dtype).eps) has another derivative there
    return narrow[0] == wide[0] and narrow[1] != wide[1]


def fn_differs(run: Run, reference=None) -> bool:
    """Whether fn itself is another program in the tested precision than in the reference's
    (a branch on the dtype, a constant of finfo(dtype)): its derivative there is not the same
    rule's, and a gap between them may be a bug of the tested precision's path. False where
    either cannot be traced."""
    programs = _programs(run, reference)
    return programs is not None and programs[0][0] != programs[1][0]


def _programs(run: Run, reference=None):
    """The signatures (`_signature`) of fn and of the gradient's program in the tested and
    in the `reference` precision (the check's), traced once per check; None where either
    cannot be traced."""
    reference = run.reference if reference is None else reference
    kept = run.probe.setdefault("programs", {})
    if reference not in kept:
        # (casts to either dtype are left out: a constant fn closes over, in its own dtype,
        # is cast to float64 in the wide program alone; and to float32, through which JAX
        # sums bfloat16 and float16 in the narrow one alone)
        casts = {jnp.dtype(run.tested), jnp.dtype(reference), jnp.dtype(jnp.float32)}
        # constants compared at the tested precision where it is below float32 (1.1 in a
        # float16 program is 1.0996) and at float32 otherwise
        coarse = _precision.eps(run.tested) > _precision.eps(jnp.float32)
        rounding = np.dtype(run.tested) if coarse else np.dtype(np.float32)
        try:
            # (a constant beyond the range of a float16 model's dtype rounds to inf there, as
            # in its program: no warning of NumPy's, which strict suites raise)
            with _plan.own_transfers(), np.errstate(over="ignore", invalid="ignore"):
                narrow = _signatures(_jaxprs(run, None), casts, rounding)
                with _precision.x64_scope(True), _precision.widening():
                    wide = _signatures(_jaxprs(run, reference), casts, rounding)
            kept[reference] = (narrow, wide)
        except Exception:  # noqa: BLE001 - no trace to compare
            kept[reference] = None
    return kept[reference]


def _jaxprs(run: Run, dtype) -> tuple:
    """The jaxprs of fn and of the gradient's program, their floating inputs in `dtype`
    (None: as they are)."""

    def typed(x):
        x_dtype = jnp.result_type(x)
        if dtype is not None and jnp.issubdtype(x_dtype, jnp.inexact):
            wide = jnp.dtype(dtype)
            x_dtype = jnp.promote_types(wide, jnp.complex64) if jnp.iscomplexobj(x) else wide
        return jax.ShapeDtypeStruct(np.shape(x), x_dtype)

    program = functools.partial(_autodiff.probe, run.problem, True)
    p_arrays, a_floats, a_arrays = run.inputs.traced()
    diff = [typed(x) for x in run.inputs.diff]
    traced = ([typed(x) for x in p_arrays], [typed(x) for x in a_floats], list(a_arrays))
    with _plan.own_transfers():
        return (
            jax.make_jaxpr(run.problem.outputs)(diff, traced),
            jax.make_jaxpr(program)(run.seeds[1], diff, traced, None),
        )


def _signatures(closed, casts, rounding) -> list:
    """The signatures of fn's and the gradient's closed jaxprs (`_jaxprs`); fn's with its
    floating constants too (an array of finfo(dtype).eps that fn closes over)."""
    fn, grad = closed
    constants = [
        (np.shape(c), np.asarray(c).astype(rounding).tobytes())
        for c in fn.consts
        if np.issubdtype(np.asarray(c).dtype, np.floating)
    ]
    return [
        _signature(fn.jaxpr, casts, rounding) + constants,
        _signature(grad.jaxpr, casts, rounding),
    ]


def _signature(jaxpr, casts, rounding) -> list:
    """The operations of `jaxpr` and of the jaxprs inside it, in order, each with its
    scalar literals at the precision `rounding` (1.001 and 1.0 differ in float32; eps of
    float32 and of float64 too), but for casts to a dtype in `casts` and to integers
    (indices: with 64-bit types on, JAX casts the int32 indices of `jnp.diag` or a gather
    to int64, and the same cholesky read as another program in float64)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type" and (
            eqn.params["new_dtype"] in casts
            or not jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact)
        ):
            continue
        literals = tuple(  # (as text: NaN equals NaN)
            repr(float(np.asarray(np.real(v.val)).astype(rounding)))
            for v in eqn.invars
            if type(v).__name__ == "Literal" and np.ndim(v.val) == 0
        )
        out.append((eqn.primitive.name, literals))
        for key in _rule_search.SUBJAXPR_KEYS:
            for sub, _ in _rule_search.jaxprs_of(eqn.params.get(key)):
                out += _signature(sub, casts, rounding)
    return out


def _gradient_change(run: Run, draw: int = 0):
    """Per parameter leaf, the squared norm of the change of the gradient under test when
    every entry of params moves by JITTER_ULPS ulps (`_ulp`; of a less precise dtype fn
    rounds to, its smooth change along the move taken out) (once per check and `draw` of
    the signs); None where the gradient is not at hand (forward mode alone)."""
    kept = run.probe.setdefault("jitter", {})
    if draw in kept:
        return kept[draw]
    moved = None
    try:
        moved = _moved(run, draw)
    except Exception:  # noqa: BLE001 - only a reason not to fail: without it, none
        moved = None
    kept[draw] = moved
    return moved


def _moved(run: Run, draw: int):
    program = functools.partial(_autodiff.probe, run.problem, True)
    grad = run.probe.get("grad")
    if grad is None:  # kept for a scalar fn only; a non-scalar fn's is of a fixed cotangent
        if "jitter_from" not in run.probe:
            inputs = run.inputs
            values = run.timer.run(program, run.seeds[1], inputs.diff, inputs.traced(), None)
            run.probe["jitter_from"] = values["grad"]
        grad = run.probe["jitter_from"]
    if "jitter_sizes" not in run.probe:  # (the same gradient for every draw)
        run.probe["jitter_sizes"] = _squares(_wide(g) for g in grad)
    key = jax.random.key(draw)
    moves, coarse = [], False
    for i, x in enumerate(run.inputs.diff):
        real = jnp.real(x).dtype
        sign = jax.random.rademacher(jax.random.fold_in(key, i), np.shape(x), real)
        ulp = _ulp(run, real)
        coarse = coarse or ulp > _precision.eps(real)
        moves.append(x * (JITTER_ULPS * ulp) * sign)

    def grad_at(s):
        moved = [x + s * d for x, d in zip(run.inputs.diff, moves)]
        return run.timer.run(program, run.seeds[1], moved, run.inputs.traced(), None)["grad"]

    if coarse:
        # moved by ulps of the dtype fn rounds to, both ways: the gradient's smooth change
        # along the move (its Hessian times the move, which near a minimum is as large as
        # the gradient itself at a float32 ulp, and far larger than the change rounding
        # the params to float32 makes) cancels in g(p + d) + g(p - d) - 2 g(p); its
        # rounding, independent at the three points, stays, at sqrt(3) times that of a
        # one-way move g(p + d) - g(p)
        ahead, behind = grad_at(1), grad_at(-1)
        changes = (_wide(a) + _wide(b) - 2 * _wide(g) for g, a, b in zip(grad, ahead, behind))
        moved = _squares(changes) / 3
    else:  # (at ulps of the params' own dtype, the smooth change is the params' rounding)
        moved = _squares(_wide(a) - _wide(g) for g, a in zip(grad, grad_at(1)))
    return moved if np.all(np.isfinite(moved)) else None


def _ulp(run: Run, real) -> float:
    """The relative size of one ulp of a parameter of dtype `real` as fn's derivative
    rounds it: of the less precise dtype fn casts values computed from params to, where
    there is one (float64 params of a model computed in float32 under jax_enable_x64 do
    not move its float32 values at all by a few float64 ulps, nor its gradient's
    rounding)."""
    eps = _precision.eps(real)
    return eps if run.rounds_to is None else max(eps, _precision.eps(run.rounds_to))


def _squares(leaves) -> np.ndarray:
    """The squared norm of each leaf, in float64."""
    return np.asarray([float(np.sum(np.abs(x) ** 2)) for x in leaves])


def _wide(x) -> np.ndarray:
    x = _plan.host_array(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def systematic_note(run: Run, gap: float, share: float) -> str:
    """Say that the derivative under test keeps its gap to the same rule in the reference
    precision when params move, so that the gap was not allowed as rounding."""
    t, r = run.tested.name, run.reference.name
    return (
        f"the {t} derivative differs from the same rule in {r} by {gap:.1e} (relative), "
        f"{_verdict.ROUNDING_GAP}: it moves by only {share * gap:.1e} when params move by "
        f"{JITTER_ULPS} ulps "
        f"({SYSTEMATIC_DRAWS} draws), and its program in {t} is not the one in {r} (other "
        f"operations or constants: a grad_fn or rule taking another path in {t}?): the gap "
        "is no rounding, which moves with the point, but another computation; its check "
        "allows only the derivative's own move as rounding"
    )
