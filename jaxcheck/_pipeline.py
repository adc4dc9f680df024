"""The check, stage by stage: probe at params (`_probe`), choose the starting step and
balance the directions, take finite differences on the step ladder (`_ladder`), compare and
judge (`_verdict`), check leaves alone where needed (`_localize`), and assemble the
`Report`."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from . import (
    _directions,
    _error_model,
    _jitter,
    _ladder,
    _localize,
    _plan,
    _precision,
    _probe,
    _problem,
    _sequential,
    _state,
    _tree,
    _verdict,
)
from ._error_model import SAFETY, Comparison
from ._errors import CotangentKind
from ._host import NOTES
from ._report import FIXED, LINEAR_CHECK, PIECEWISE_CONSTANT, PRIMAL_CHECK, Report, Status
from ._state import MAX_STEP, PRIMAL_ROW, Run

# times a step is cut 16-fold where the finite differences leave fn's domain
DOMAIN_SHRINKS = 3

# Largest relative step when finite differences run in half precision (fn closes over a
# bfloat16/float16 array, so its inputs cannot be widened): along a direction where fn is
# straight (a pad, a convolution in its input), any step is exact, and only a step of the
# order of the parameters' scale brings roundoff (eps / h) below a few percent. The error
# model's truncation estimate keeps the ladder below that where fn curves.
LOW_PRECISION_MAX_STEP = 1.0
# In float32, a noise floor above this at MAX_STEP (a tolerance that lets a 1 % bug pass)
# lets the ladder go up to LOW_PRECISION_MAX_STEP too
COARSE_AT_LARGEST_STEP = 5e-3
# a gap between the derivative under test and the same rule in float64 at least this share
# of the derivative: the derivative is mostly rounding, or the bug is that large
MOSTLY_ROUNDING = 0.5


def check(run: Run, k, step, localize, leaf_k, held_fixed, sequential=False) -> Report:
    """Check the derivative along k directions (with `sequential`, up to k: 4, then more
    only while the verdict is in doubt, `_sequential`), starting from the relative `step`
    (None: the reference precision's default), localizing as `localize` says."""
    reverse = "reverse" in run.modes
    _state.note_curves(False)
    ks = _sequential.looks(k, sequential and run.plan.direction_sharding is None, run.looks_kind)
    try:
        _probe.probe(run, reverse, k, leaf_k if localize is not False else 0, ks[0])
    except CotangentKind as err:
        leaves = _probe.wrong_kind_leaves(run, err.leaves)
        return _report(run, Status.FAIL, (0, k), None, (), leaves, held_fixed, (), "")
    if run.timer.eager_reason is not None:
        run.problems.append(
            f"jax.jit cannot trace fn or grad_fn ({run.timer.eager_reason}); they were "
            "evaluated eagerly, one direction at a time, which is slower"
        )
    paths = run.problem.params.paths_of(_tree.DIFF)
    nonfinite = _probe.nonfinite(run, paths)
    ref = _precision.reference_dtype(run.policy, run.tested)
    _probe.replay_nonfinite(run, reverse, found=nonfinite)
    if nonfinite:
        leaves = _probe.nonfinite_leaves(run, paths)
        return _report(run, Status.NONFINITE, (0, k), None, (), leaves, held_fixed, (), "")
    scales = run.probe["leaf_scales"]
    h0 = step if step is not None else _precision.default_step(ref)
    rounds_to = run.problem.rounds_to
    if rounds_to is not None and run.problem.retyped and np.dtype(ref) == np.float64:
        at = run.problem.rounds_at
        run.problems.append(
            f"fn casts values computed from params to {rounds_to}, which rounds nothing in "
            "the model"
            f"{' (first at ' + at + ')' if at else ''} but would round in float64: the "
            f"reference evaluates fn's program with its {rounds_to} values held in "
            "float64, and judges it at float64 resolution"
        )
    elif rounds_to is not None and _precision.eps(rounds_to) > _precision.eps(ref):
        run.rounds_to = jnp.dtype(rounds_to)
        if step is None:
            h0 = _precision.default_step(run.rounds_to)
        at = run.problem.rounds_at
        advice = (
            "(the float64 reference cannot hold the rule's derivative in float64 outside "
            "fn's trace: pass that value to the rule as an argument, not in a closure or "
            "nondiff_argnums, to have it judged at float64 resolution; a bug smaller than "
            "the tolerance goes unseen)"
            if _problem.CLOSED_RULE in at
            else "(JAX's own code casts there, whatever the dtype of its inputs; a bug smaller "
            "than the tolerance goes unseen: to judge finely, check the code around that "
            "call with it written out, or its custom rules alone with jaxcheck.verify_rule)"
            if _problem.INSIDE_JAX in at
            else "(a kernel's or callback's out_shape fixes its output dtype whatever its "
            "inputs' dtype: declare it as that of the inputs, jax.ShapeDtypeStruct(x.shape, "
            "x.dtype), to have it follow them)"
            if _problem.DECLARED in at
            else "(where that cast is only meant to match dtypes, cast "
            "to the dtype of the value it meets instead, x.astype(y.dtype); a flax module's "
            "dtype= is such a cast: leave it unset where the params are in that dtype "
            "already, and the computation takes theirs; flax.nnx modules, nnx.Embed among "
            "them, fix it to the params' dtype when created: to judge their code finely, "
            "create the model with param_dtype=jnp.float64 under jax_enable_x64)"
        )
        run.problems.append(
            f"{ROUNDS} {rounds_to} (an explicit cast, "
            "lax.reduce_precision, a product's preferred_element_type or a kernel's or "
            "callback's declared output dtype"
            f"{', first at ' + at if at else ''}), "
            f"so it is a staircase of {rounds_to} quanta even in {jnp.dtype(ref).name}: "
            f"finite differences take a relative step of {h0:.1e} and judge at "
            f"{rounds_to} resolution {advice}"
        )
    run.max_step = max(MAX_STEP, h0)
    beta, share = scales, None
    if reverse:
        beta, share = _directions.balance(
            scales,
            run.probe["grad_norms"],
            _precision.eps(ref) ** 0.25,
            _needed_derivative(run, ref, h0),
        )
    run.batch = ks[0]  # later looks run their new directions through the same programs
    tried, why, rows, choice = {}, "", np.tile(beta, (k, 1)), None
    i, previous = 0, 0
    while True:
        n = ks[i]
        index = np.arange(n, dtype=np.int32)
        redo = n == ks[0]
        if not redo:  # more directions at the step the first look settled on
            [(p, steps, choice)] = _ladder.extend(run, index, rows[:n], h0, [slice(0, n)], [choice])
            checks = _verdict.compare(run, p)
            redo = not _sequential.step_fits(run, p, checks, n)
        if redo:
            p, steps, checks, h0, choice = _directions_check(run, n, beta, h0, step, ref)
        tried.update(dict.fromkeys(steps))
        said = []
        status = _verdict.status(run, p, checks, n, said)
        stop = n == k
        if not stop:
            stop, why = _sequential.settled(p, checks, status, n, len(ks), run.exact_at(n))
        if stop:
            break
        i, previous = _sequential.next_look(ks, i, why), n
    if status == Status.FAIL and step is None:  # confirmed at other steps first
        p, more, confirmed, h0, choice = _larger_steps(run, n, beta, p, checks, h0, choice)
        tried.update(dict.fromkeys(more))
        smaller = False
        if not all(c.passed for c in confirmed):
            before = confirmed
            p, more, confirmed, h0, choice = _smaller_steps(run, n, beta, p, confirmed, h0, choice)
            tried.update(dict.fromkeys(more))
            smaller = confirmed is not before
        if confirmed is not checks:
            checks, said = confirmed, []
            status = _verdict.status(run, p, checks, n, said)
            settled, why = _sequential.settled(p, checks, status, n, len(ks), run.exact_at(n))
            why = why if settled else None
        if smaller and status is Status.FAIL:
            # at a relative step of 1e-10 the inputs x + h v round to 2e-6 of the step
            input_rounding = _input_rounding(run, p.step)
            if checks[0].relative_error <= input_rounding:
                status = Status.INCONCLUSIVE
                said.append(
                    f"at that step the inputs round to {input_rounding:.1e} of it, which the "
                    f"error {checks[0].relative_error:.1e} does not exceed: {TOO_FINE}"
                )
            elif _aliased(p, STILL_ALIASED):
                status = Status.INCONCLUSIVE
                said.append(
                    "even at that step the finite differences are a fraction of the "
                    f"derivative, as differences across fn's periods are: {TOO_FINE}"
                )
    if status is Status.FAIL and _jitter.explains(run, p, beta):
        status, said = Status.INCONCLUSIVE, [*said, _jitter.WITHIN_ROUNDING]
    mostly_rounding = checks[0].gap >= MOSTLY_ROUNDING
    if status is Status.PASS and not run.other_function and not _verdict.tensorfloat32(run):
        # (where the gap is most of the derivative, the derivative is mostly rounding, as
        # at an exact least-squares fit, whose rounding hardly moves with params: the move
        # cannot tell rounding from a bug there, the model's own differences below do)
        moved = None if mostly_rounding else _jitter.systematic(run, p, checks[0], beta)
        if moved is not None and _verdict.value_gap(run, p) < 0.1 * checks[0].gap:
            # the float64 gap is no rounding: judged with the derivative's own instead
            run.rounding_share, gap = moved, checks[0].gap
            checks, said = _verdict.compare(run, p), []
            status = _verdict.status(run, p, checks, n, said)
            said.append(_jitter.systematic_note(run, gap, moved))
    if (
        status is Status.PASS
        and run.rounding_share is None
        and not run.other_function
        and not _verdict.tensorfloat32(run)
        and _jitter.rests_on_gap(run, p, checks[0])
        and (_jitter.fn_differs(run) or (mostly_rounding and _jitter.other_path(run)))
    ):
        # fn, or its derivative, is another program in the model's precision (a branch on
        # the dtype): the gap to the float64 rule may be a bug on that path alone, which
        # the model's own finite differences judge
        own = _own_precision(run, n, beta, step, checks[0])
        if checks[0].resolved:
            # finite differences resolve the derivative: what made the comparison absolute
            # is the gap to the float64 rule, which the note on the other program explains
            said = [q for q in said if q != _verdict.ZERO_WITHIN_NOISE]
        if own is UNJUDGED:
            status = Status.INCONCLUSIVE
        elif own is not None:
            p, steps, checks, h0, choice = own
            tried.update(dict.fromkeys(steps))
            status, said = Status.FAIL, []
            why = f"clear above the tolerance {_verdict.head(checks, status).tolerance:.1e}"
    run.problems += said
    stopped = _stopped(ks, n, previous, _verdict.head(checks, status), why, run.exact_at(n))
    if status is Status.NONFINITE and p.fwd is not None and not np.isfinite(p.fwd).all():
        # the derivative under test is NaN/Inf in forward mode (`_verdict.status`)
        leaves = _probe.nonfinite_tangent_leaves(run, paths)
        return _report(run, status, (n, k), p, checks, leaves, held_fixed, tuple(tried), stopped)
    accepted = _verdict.note_large_rounding(run, checks[0], status, p, checks[1:])
    leaves = ()
    upper = max((c.interval[1] for c in checks), default=math.inf)
    chosen = _localize.chosen_leaves(
        localize, status, share, checks[0].tolerance, len(paths), run.rtol, upper
    )
    chosen = [i for i in chosen if np.size(run.inputs.diff[i])]  # an empty leaf has no check
    fine = _localize.unrounded(run, localize)
    if chosen or fine:
        said = len(run.problems)
        leaves = _localize.localize_finely(
            run, scales, leaf_k, h0, paths, chosen, fine, step, sequential
        )
        if status is Status.FAIL and not any(leaf.status is Status.FAIL for leaf in leaves):
            # random signs can miss a leaf's error along all its directions (two entries
            # of equal size and opposite sign, 1 in 256 over 8, in a leaf of more than
            # `_directions.SPANNED` elements): before no leaf is blamed,
            # the leaves are checked again along twice as many
            del run.problems[said:]
            leaves = _localize.localize_finely(
                run, scales, 2 * leaf_k, h0, paths, chosen, fine, step
            )
        if accepted:  # (all leaves passed on a gap taken for rounding)
            leaves = _localize.within_accepted_rounding(run, leaves, checks[0])
        if _localize.fails_in_rule_row_at_zero(status, leaves, checks):
            status = _localize.not_judged_at_zero(run)
        else:
            nonempty = sum(1 for x in run.inputs.diff if np.size(x))
            leaves = _localize.within_native_bars(run, status, leaves)
            status = _localize.merge_leaves(run, status, leaves, nonempty)
            shares = None if share is None else dict(zip(paths, np.asarray(share).tolist()))
            status = _localize.coarse_pass(run, status, leaves, checks[0], shares)
    status, checks = _primal(run, status, p, checks)
    status, checks = _linear(run, status, checks)
    if status is Status.PASS and run.noisy_native:
        # the float32 derivative itself is judged by nothing: a bug on its float32 path
        # alone (30 % at such a point) would pass here
        status = Status.INCONCLUSIVE
        run.problems.append(NOISY_NATIVE)
    if (
        status is Status.FAIL
        and run.problem.iterates
        and checks[0].relative_error < SOLVER_SIZED
        # (a solve stopped at a tolerance is not off by one factor along every direction)
        and not any(q.startswith(_verdict.FACTOR) for q in run.problems)
    ):
        run.problems.append(solver_hint(checks[0].interval[1]))
    if status is Status.FAIL and run.problem.samples_gamma:
        run.problems.append(GAMMA_HINT)
    if _state.CURVES.get() is not None:  # (read by an order >= 2 check only)
        _state.note_curves(_verdict.curves(run, p))
    if step is not None and status is not Status.FAIL and checks:
        coarse = _given_step_coarse(checks[0], step)
        if coarse:
            run.problems.append(coarse)
    return _report(run, status, (n, k), p, checks, leaves, held_fixed, tuple(tried), stopped)


# a tolerance this many times the smallest that counts, raised by the noise of a step the
# caller fixed, is pointed out (`_given_step_coarse`)
COARSE_STEP = 10


def _given_step_coarse(head, step: float) -> str:
    """A note where the step the caller fixed (`step=`) left finite differences so noisy
    (too small a step: roundoff; too large: truncation) that the tolerance rose far above
    the smallest that counts: a bug below it passes unseen, where the check's own steps
    would have resolved more finely; "" otherwise."""
    if not (head.floor > 0 and head.tolerance > COARSE_STEP * head.floor):
        return ""
    if head.tolerance > 2.5 * max(head.noise_floor, head.rounding):
        return ""  # (raised by something else than the step's noise)
    return (
        f"step={step:g} was given: finite differences at that step have a noise floor of "
        f"{head.noise_floor:.1e}, which raised the tolerance to {head.tolerance:.1e}, "
        f"{head.tolerance / head.floor:.0f} times the {head.floor:.1e} that counts here; "
        "leave step unset for the check to choose steps that resolve the derivative finely"
    )


ROUNDS = "fn rounds values computed from params to"  # (the staircase's note opens so)


# an error this small in a fn that iterates may be its solver's tolerance, by design (an
# ODE solver at rtol=1e-3: 3e-3)
SOLVER_SIZED = 3e-2
SOLVER_HINT = (
    "fn runs a lax.while_loop (an iterative solver?): where it stops at a tolerance, fn and "
    "its derivative are exact only to about that tolerance, and finite differences of fn "
    "see the solver's error"
)


def solver_hint(upper: float) -> str:
    """`SOLVER_HINT` with its advice, `upper` the failing error's 95 % upper bound: the
    derivative of a solve stopped at a tolerance can differ from the solution's by far more
    than that tolerance (a fixed point solved to 1e-5: 8e-4), so the rtol to pass is the
    error's, not the solver's."""
    return (
        f"{SOLVER_HINT} (a rule for the exact solution's derivative, as implicit "
        "differentiation or an adjoint gives, can differ from that of the stopped iteration "
        "by more than the solver's tolerance); if an error of the size above is by design, "
        f"pass an rtol above it (above {upper:.1e}, the upper end of its 95 % interval: "
        "jaxcheck.check_grads, like JAX's check_grads, allows 1e-5 unless told otherwise), "
        "or solve to a tighter tolerance for the check"
    )


GAMMA_HINT = (
    "fn draws from jax.random.gamma (jax.random.beta and dirichlet draw from it too): JAX "
    "differentiates a gamma sample in its shape parameter by implicit reparameterization "
    "(the derivative of the sample's quantile at its probability), which is right in "
    "expectation but is not the derivative of fn's sample at this key, which finite "
    "differences measure (a few percent apart, by design). Hold the sampled values or the "
    "shape parameter fixed to check the rest of fn"
)


def _primal(run: Run, status: Status, p, checks) -> tuple[Status, list]:
    """(FAIL, the checks with a failing primal row) where fn's value as its derivative
    computes it (the primal of jax.vjp or jax.value_and_grad: a custom_vjp's fwd, a
    custom_jvp rule's primal output) differs from fn's own beyond 1000 eps of the tested
    dtype (0.2 at most), or beyond 100 times fn's own rounding where fn's value cancels (a
    loss near zero, its float32 value far from its float64 one): a rule whose forward pass
    computes something else. Its derivative may still match fn's (the checks above then
    pass); a value_and_grad training loop sees the wrong value all the same."""
    gap = run.probe.get("primal_gap")
    if gap is None or not np.isfinite(gap) or status is Status.NONFINITE or PRIMAL_ROW.get():
        return status, checks
    allowed = min(max(1000 * _precision.eps(run.tested), 1e-8), 0.2)
    value = run.probe.get("value")
    if run.problem.scalar_output and p is not None and value is not None and value != 0:
        # fn's float32 value against its float64 one: how much its value cancels
        rounding = abs(float(value) - float(p.phi0[0])) / abs(float(value))
        allowed = max(allowed, 100 * rounding)
    if gap <= allowed:
        return status, checks
    run.problems.append(
        f"fn's value as its derivative computes it (the primal output of jax.vjp, "
        f"jax.value_and_grad or jax.jvp) differs from fn's own value by {float(gap):.1e} "
        f"(relative; allowed {allowed:.1e}): a custom rule's forward pass (a custom_vjp's fwd, a "
        "custom_jvp rule's primal output) computes something other than its function"
    )
    gap = float(gap)
    row = Comparison(PRIMAL_CHECK, gap, (gap, gap), 0.0, 0.0, allowed, 1, False)
    return Status.FAIL, [*checks, row]


def _linear(run: Run, status: Status, checks) -> tuple[Status, list]:
    """(FAIL, the checks with a failing row) where a scalar fn's gradient pulled back from
    the cotangent -2 (`_autodiff.LINEAR_UNIT`), halved, is not the one pulled back from 1
    (jax.grad's, which the rows above judge), or the folded forward projections of a small
    problem along tangents of entries -+2, halved, are not those along +-1: a derivative
    rule that is not linear in its cotangent or tangent (`_autodiff.linear_gap`).
    Allowed: the head row's tolerance (no finer than the derivative itself is judged), at
    least 64 eps of the tested dtype, a few eps of a lower precision fn rounds to inside,
    and twice the derivative's rounding measured against float64 (XLA may fuse the two
    pullbacks apart, rounding them otherwise: a derivative that is all rounding is no more
    linear than that)."""
    # (in verify_rule's rows too: a custom_vjp has no jvp rows, and a bwd squaring or
    # dropping the sign of its cotangent passed it there)
    if status is Status.NONFINITE:
        return status, checks
    allowed = 64 * _precision.eps(run.tested)
    if run.rounds_to is not None:
        allowed = max(allowed, 4 * _precision.eps(run.rounds_to))
    if checks and math.isfinite(checks[0].rounding):
        allowed = max(allowed, SAFETY * checks[0].rounding)
    if checks and math.isfinite(checks[0].tolerance):
        # no finer than the derivative itself is judged
        allowed = max(allowed, checks[0].tolerance)
    if run.problem.iterates:
        # a derivative that iterates to a tolerance (an ODE solver's adjoint, whose steps
        # follow the cotangent's size through its absolute tolerance: 5e-5 apart for a
        # right one in float32) is linear only to about that tolerance
        allowed = max(allowed, SOLVER_SIZED)
    for key, what, name, computes, scaled in (
        (
            "cotangent_gap",
            "gradient",
            "cotangent",
            "jax.grad computes",
            "fn's loss is scaled, summed with another or averaged over a batch",
        ),
        (
            "tangent_gap",
            "forward-mode derivative",
            "tangent",
            "jax.jacfwd takes",
            "a tangent is scaled (jax.jvp along 2 v)",
        ),
    ):
        gap = run.probe.get(key)
        if gap is None or not float(gap) > allowed:  # (NaN: a derivative NaN/Inf, said)
            continue
        gap = float(gap)
        run.problems.append(
            f"the {what} ({run.problem.source}) is not linear in its {name}: at the "
            f"{name} -2, halved, it is {gap:.1e} (relative) off "
            f"the one at 1, which {computes} "
            "and the rows above judge. A derivative is linear in its tangent and "
            "cotangent; a custom rule that clips, thresholds, squares or rounds them, or drops "
            "their sign, is not, and "
            f"gives another derivative where {scaled} (rules=True names the rule)"
        )
        row = Comparison(LINEAR_CHECK.format(name), gap, (gap, gap), 0.0, 0.0, allowed, 1, False)
        status, checks = Status.FAIL, [*checks, row]
    return status, checks


def _directions_check(run: Run, n, beta, h0, step, ref):
    """Finite differences along the first n global directions and their comparisons:
    (Pass, steps tried, comparisons, the step the ladder starts from, where it settled),
    with the precision and step moved where fn needs it."""
    index = np.arange(n, dtype=np.int32)
    rows = np.tile(beta, (n, 1))
    [(p, steps, choice)] = _ladder.ladder(run, index, rows, h0, [slice(0, n)])
    if step is None and run.reference != ref:
        # fn could not run in float64: take the step of the precision it ran in
        if _precision.eps(run.reference) > _precision.eps(jnp.float32):
            # half precision: roundoff ~ eps / h swamps any step below MAX_STEP; the
            # ladder may go up to the scale of the parameters where fn is that straight
            run.max_step = max(run.max_step, LOW_PRECISION_MAX_STEP)
        h0 = min(_precision.default_step(run.reference), run.max_step)
        [(p, steps, choice)] = _ladder.ladder(run, index, rows, h0, [slice(0, n)])
        if (
            run.max_step < LOW_PRECISION_MAX_STEP
            and p.step >= 0.99 * run.max_step
            and p.fd.finite.all()
            and not p.fd.num_nonsmooth
            and _verdict.compare(run, p)[0].noise_floor > COARSE_AT_LARGEST_STEP
        ):
            # float32, and roundoff still too coarse at the largest step: fn's values are
            # far larger than their changes along it (a sum onto a constant 1 of inputs
            # near 1e-3); as in half precision, the ladder may go up to the parameters'
            # scale where fn is that straight
            largest, run.max_step = run.max_step, LOW_PRECISION_MAX_STEP
            [(q, more, q_choice)] = _ladder.ladder(run, index, rows, h0, [slice(0, n)])
            steps = tuple(steps) + tuple(more)
            if _verdict.compare(run, q)[0].noise_floor <= COARSE_AT_LARGEST_STEP:
                p, choice = q, q_choice
            else:  # no finer there (fn curves at that scale): the steps stay as they were
                run.max_step = largest
    for _ in range(DOMAIN_SHRINKS):
        if step is not None or p.fd.finite.all() or not np.isfinite(p.phi0).all():
            break
        if p.fwd is not None and not np.isfinite(p.fwd).all():
            break  # the derivative at params is NaN/Inf itself: no step makes it finite
        # fn is finite at params but not within the step along some directions: an element
        # far smaller than its leaf's RMS, near the edge of fn's domain (log at 1e-7 beside
        # 0.5), is crossed; smaller steps stay inside (the differences' roundoff grows)
        h0 = h0 / 16
        [(p, more, choice)] = _ladder.ladder(run, index, rows, h0, [slice(0, n)])
        steps = tuple(steps) + tuple(more)
    if step is not None and not p.fd.finite.all() and np.isfinite(p.phi0).all():
        run.problems.append(
            f"the step was given (step={step:g}), and a given step is kept: where fn is not "
            "finite within it from params, pass a smaller step, or none (the ladder then "
            "shrinks its step to stay inside fn's domain)"
        )
    flat = _verdict.flat_directions(p)
    if step is None and flat is not None and not flat[1] and p.step < run.max_step:
        # flat at this step while the derivative is not: a staircase of quanta larger
        # than the step (fn rounds to a low precision), or truly flat: the largest
        # step tells them apart
        h0 = run.max_step
        [(p, more, choice)] = _ladder.ladder(run, index, rows, h0, [slice(0, n)])
        steps = tuple(steps) + tuple(more)
    checks = _verdict.compare(run, p)
    if _other_function_without_rule(run, p, checks):
        wide = (run.reference, p, steps, checks, h0, choice)
        p, steps, checks, h0, choice, blind = _native_look(run, index, rows, n, step)
        if not blind and _other_function_told(checks[0], wide[3][0]):
            _note_other_function_without_rule(run, wide[0], _verdict.value_gap(run, wide[1]))
        else:  # (the model's own differences no judge of it: as it was)
            run.reference, p, steps, checks, h0, choice = wide
            run.native_blind = True
    # (once the model's precision was found blind here, a later look does not ask again)
    if not run.native_blind and _verdict.incomparable(run, checks[0], p):
        wide = (run.reference, p, steps, checks, h0, choice)
        p, steps, checks, h0, choice, blind = _native_look(run, index, rows, n, step)
        if blind:
            # finite differences in the model's precision see nothing here (a loss that
            # rounds to 0 in float32, as cross-entropy on confident logits does): the gap
            # is float32 rounding of a derivative far smaller than fn's own terms
            run.reference, p, steps, checks, h0, choice = wide
            run.native_blind = True
        elif _values_differ(run, wide[1]):
            # they do see it, and fn's own value differs too: fn in float64 is another
            # function (random numbers drawn in the default dtype). Its float64 derivative
            # against its own float64 differences (the row "same rule in float64") still
            # judges the derivative's code finely, where the model's precision would
            # resolve a percent at best: the check goes on as precision="float64" does
            native = (run.reference, p, steps, checks, h0, choice, run.policy)
            run.reference, p, steps, checks, h0, choice = wide
            run.policy, run.other_function = "float64", True
            checks = _verdict.compare(run, p)
            # (where they fail it by far more than float64 differences, of a function that
            # differs from its own, do, they are no judge: the model's precision rounds a
            # loss that cancels to noise, as binary cross-entropy at confident logits)
            sane = native[3][0].relative_error <= NATIVE_SANITY * wide[3][0].relative_error
            if all(c.passed for c in checks) and not all(c.passed for c in native[3]) and sane:
                # except where the model's own differences fail its derivative while the
                # float64 rule passes: a rule wrong in float32 alone (beside dropout drawn
                # in the default dtype) is right in float64, and that failure stands
                *native_pass, run.policy = native
                run.reference, p, steps, checks, h0, choice = native_pass
                run.other_function = False
                _verdict.note_native(run, wide[3][0], wide[0], values_differ=True)
            else:
                run.noisy_native = not sane and not all(c.passed for c in native[3])
                _verdict.note_incomparable(run, wide[3][0], run.reference, run.noisy_native)
        else:
            # fn's value agrees in both (to 1e-3): only its derivative differs (a rule taking
            # another path in float32): judged by finite differences in the model's
            # precision
            _verdict.note_native(
                run, wide[3][0], wide[0], other_program=_jitter.fn_differs(run, wide[0])
            )
    return p, steps, checks, h0, choice


NOISY_NATIVE = (
    "not judged: the derivative in the model's precision is judged neither by finite "
    "differences in float64 (fn differs there) nor by its own (too noisy here), so a bug on "
    "its path in that precision alone would go unseen; the same rule in float64 passes. To "
    "judge it, check fn at a point where its value does not cancel"
)
# A failure by the model's own finite differences counts where its error is at most this
# many times the one float64 differences measure (`_directions_check`)
NATIVE_SANITY = 10.0


UNJUDGED = object()  # `_own_precision`: the model's own finite differences could not judge


def _own_precision(run: Run, n: int, beta, step, head):
    """Where fn (or its derivative alone) is another program in the model's precision than
    in the reference's and its derivative passed only on its gap (in comparison `head`) to
    the reference's being rounding: finite differences in the model's precision along the
    same n directions.
    Returns (Pass, steps tried, comparisons, step, choice) where those fail the derivative
    (confirmed at larger steps, as any failure is), with the reference left at the model's
    precision for the leaves; `UNJUDGED` where they could not judge it and the gap is far
    beyond rounding (a pass would rest on nothing); else None, the reference as it was."""
    wide = run.reference
    run.reference = _precision.reference_dtype("native", run.tested)
    index = np.arange(n, dtype=np.int32)
    h = step if step is not None else _precision.default_step(run.reference)
    [(q, steps, q_choice)] = _ladder.ladder(run, index, np.tile(beta, (n, 1)), h, [slice(0, n)])
    own = _verdict.compare(run, q)
    status = _verdict.status(run, q, own, n, [])
    if status is Status.FAIL and step is None:
        q, more, own, h, q_choice = _larger_steps(run, n, beta, q, own, h, q_choice)
        steps = tuple(steps) + tuple(more)
        status = _verdict.status(run, q, own, n, [])
    fn_differs = _jitter.fn_differs(run, wide)
    if status is not Status.FAIL:
        run.reference = wide
        if status is Status.PASS:
            return None
        vouches = head.gap <= _verdict.gap_limit(run)
        _verdict.note_own_path(run, head, wide, fn_differs, judged=False, vouches=vouches)
        return None if vouches else UNJUDGED
    _verdict.note_own_path(run, head, wide, fn_differs)
    return q, steps, own, h, q_choice


def _other_function_without_rule(run: Run, p, checks) -> bool:
    """Whether fn may compute another function in the reference, where the derivative
    under test could not run there (`_evaluate._without_rule`), so that no float64
    derivative tells it: its finite differences there fail the derivative (or see none),
    and fn's value there is far from its value in the model's precision
    (`_values_differ`). A float32 bit trick (a bitcast to int32, which makes two words of
    a float64, and back) had its right custom rule judged by the finite differences of
    the other function and failed at relative error 1. (A value that merely rounds, a
    loss against a baseline, differs too: `_other_function_told` decides.)"""
    return (
        not all(c.passed and c.resolved for c in checks)
        and bool(run.rule_refused)
        and not run.native_blind
        and run.problem.scalar_output
        and run.probe.get("value") is not None
        and _precision.eps(run.reference) < _precision.eps(run.tested)
        and _values_differ(run, p)
    )


def _native_look(run: Run, index, rows, n: int, step):
    """The check's finite differences again in the model's precision (`run.reference` set
    to it): (Pass, steps tried, comparisons, step, Choice, whether they are blind: flat
    along the directions, or seeing no derivative above their own noise)."""
    run.reference = _precision.reference_dtype("native", run.tested)
    h0 = step if step is not None else _precision.default_step(run.reference)
    [(p, steps, choice)] = _ladder.ladder(run, index, rows, h0, [slice(0, n)])
    checks = _verdict.compare(run, p)
    flat = _verdict.flat_directions(p)
    blind = (flat is not None and not flat[1]) or not (checks[0].num_used and checks[0].resolved)
    return p, steps, checks, h0, choice, blind


def _other_function_told(native, wide) -> bool:
    """Whether the model's own finite differences (head comparison `native`, not blind)
    tell fn in the reference (head comparison `wide`) for another function: the
    derivative's errors against the two differ by more than 10 times their own noise
    floor, which one function's differences cannot. A float32 loss against a baseline,
    whose value merely rounds by 1e-2, differs within it: the reference, which resolves
    the derivative finely, stands (its failure of one 1 % off is no other function's)."""
    return wide.relative_error > native.relative_error + 10 * native.noise_floor


def _note_other_function_without_rule(run: Run, reference, gap: float) -> None:
    """Say that finite differences fell back to the model's precision
    (`_other_function_without_rule`), in place of the note that they ran in `reference`."""
    source = "grad_fn" if run.problem.grad_fn is not None else "the derivative under test"
    said = f"{source} could not run in {reference.name} ("
    run.problems[:] = [q for q in run.problems if not q.startswith(said)]
    run.problems.append(
        f"{source} could not run in {reference.name} ({run.rule_refused}), and fn's own "
        f"value there differs from its {run.tested.name} value by {gap:.1e} (relative): fn "
        f"computes another function in {reference.name} (a bit trick on {run.tested.name} "
        f"words, numbers drawn in the default dtype), so finite differences use "
        f"{run.reference.name} and the resolution is coarser"
        + (
            ""
            if run.problem.grad_fn is not None
            else " (a custom rule inside is resolved more finely on its own: rules=True)"
        )
    )


def _values_differ(run: Run, p) -> bool:
    """Whether fn's value in the model's precision is far (1e-3, relative) from its value
    in the reference: fn computes another function there, not only another derivative.
    True where it cannot be told (a non-scalar fn)."""
    if not run.problem.scalar_output or run.probe.get("value") is None:
        return True
    return _verdict.value_gap(run, p) > 1e-3


def _larger_steps(run: Run, n: int, beta, p, checks, h0, choice):
    """A failing check again along its n directions at 16 times the step, for as long as
    that shrinks the error of a failing comparison 4 times or more: a wrong derivative's
    error does not depend on the step, roundoff (~1/h) does. fn can round far above what
    the error model sees in its values: a value near zero computed as a difference of
    values near one (`softplus`'s third derivative at 1e-8, where the relative step is 1e-8
    times that of softplus's own scale), or data near 1e4 added to params near 1e-2, whose
    sum rounds alike at h and h/2. Any comparison that fails counts: the float32
    derivative's own rounding, which no step removes, can keep its row from shrinking
    where the same rule in float64 shows the roundoff. Returns (Pass, steps tried,
    comparisons, step, Choice), the comparisons `checks` itself where the step stayed."""
    more, seen = (), []
    q, q_checks, h = p, checks, h0
    index, rows = np.arange(n, dtype=np.int32), np.tile(beta, (n, 1))
    while (
        not all(c.passed for c in q_checks)
        and q.step < run.max_step
        and q.fd.finite.all()
        and not q.fd.num_nonsmooth
    ):
        h_next = min(16.0 * q.step, run.max_step)  # (the ladder may have moved from h)
        # the full stencil at exactly that step: the ladder's own moves would read the
        # roundoff's fourth differences as kinks and step back down
        q2, steps, choice2 = _ladder.at_step(run, index, rows, h_next)
        checks2 = _verdict.compare(run, q2)
        more += tuple(steps)
        smooth = q2.fd.finite.all() and not q2.fd.num_nonsmooth
        failing = [i for i, c in enumerate(q_checks) if not c.passed]
        j = max(failing, key=lambda i: _shrink(q_checks[i], checks2[i]))
        if not (smooth and _shrink(q_checks[j], checks2[j]) >= 4):
            break
        if not seen:
            seen.append((q.step, q_checks[j].relative_error))
        q, q_checks, h, choice = q2, checks2, h_next, choice2
        seen.append((q.step, q_checks[j].relative_error))
    if not seen:
        return p, more, checks, h0, choice
    errors = ", ".join(f"{e:.1e} at {s:.1e}" for s, e in seen)
    run.problems.append(
        f"the finite differences disagreed with the derivative by {errors} (relative "
        "error at relative step): an error that shrinks as the step grows is roundoff "
        "inside fn, not a wrong derivative; the check went on at the last step"
    )
    return q, more, q_checks, h, choice


def _smaller_steps(run: Run, n: int, beta, p, checks, h0, choice):
    """A failing check whose finite differences are not resolved (their noise floor above
    a tenth of the smallest error that counts) again along its n directions at steps 16,
    256, ... times smaller: fn may curve on a scale far below the step (sin at 1e6, whose
    period is 6e-6 of it), where differences across several periods alias, and their own
    error estimate with them. The least noisy of those is taken where it shrinks the error
    of a failing comparison 4 times or more: a wrong derivative's error does not depend on
    the step. Returns as `_larger_steps` does."""
    if not (_verdict.unresolved(run, p.fd) and p.fd.finite.all()):
        return p, (), checks, h0, choice
    # differences across periods average fn's slope away (sin's by sin(h)/h): they come out
    # smaller than the derivative; where they are not, the step is not what is wrong (a
    # derivative map rounding to 2^-20 inside is a staircase, flat at smaller steps along
    # what it leaves out, and the larger step judges it as the smooth map it rounds)
    if not _aliased(p, 1.0):
        return p, (), checks, h0, choice
    index, rows = np.arange(n, dtype=np.int32), np.tile(beta, (n, 1))
    more, best = (), None
    # (from the precision's own step where the ladder or the larger steps moved above it)
    judged_in = run.reference if run.rounds_to is None else run.rounds_to
    start = min(p.step, _precision.default_step(judged_in))
    for k in range(1, SMALLER_STEPS + 1):
        q, steps, q_choice = _ladder.at_step(run, index, rows, start / 16**k)
        more += tuple(steps)
        if not q.fd.finite.all():
            break
        if q.fd.num_nonsmooth or np.any(_verdict.constant_along(q)):
            continue  # (kinks, or a staircase's flat steps: no step to go on at)
        if best is None or q.fd.noise_floor < best[0].fd.noise_floor:
            best = (q, q_choice)
    if best is None:
        return p, more, checks, h0, choice
    q, q_choice = best
    q_checks = _verdict.compare(run, q)
    j = max(
        (i for i, c in enumerate(checks) if not c.passed),
        key=lambda i: _shrink(checks[i], q_checks[i]),
    )
    if _shrink(checks[j], q_checks[j]) < 4 or q.fd.noise_floor >= p.fd.noise_floor:
        return p, more, checks, h0, choice
    run.problems.append(
        f"the finite differences disagreed with the derivative by "
        f"{checks[j].relative_error:.1e} at the relative step {p.step:.1e} and by "
        f"{q_checks[j].relative_error:.1e} at {q.step:.1e}: an error that shrinks with the "
        "step is truncation (fn curves on a scale far below the step), not a wrong "
        "derivative; the check went on at the smaller step"
    )
    return q, more, q_checks, q.step, q_choice


def _input_rounding(run: Run, step: float) -> float:
    """The rounding of params + step v relative to the step: eps / step, times the largest
    ratio of an entry to the size its step is scaled to (the leaf's RMS, times its own
    share of the largest entry's power of two in a packed leaf): an entry at 9e6 in a leaf
    of RMS 4.5e6 rounds to twice eps / step."""
    spread = 1.0
    for x, scale, packed in zip(run.inputs.diff, run.probe["leaf_scales"], run.problem.packed):
        if not np.size(x) or not scale > 0:
            continue
        x = np.abs(_plan.host_array(x)).astype(np.float64)  # (a complex leaf's moduli)
        moved = float(scale) * (_directions.entry_scales(x) if packed else 1.0)
        spread = max(spread, float(np.max(x / moved)))
    return _precision.eps(run.reference) * spread / step


def _aliased(p, share: float) -> bool:
    """Whether the finite differences' RMS is below `share` of the derivative's."""
    return bool(_error_model.rms(p.fd.value) < share * _error_model.rms(p.analytic))


# a failing check whose differences are not resolved looks at steps down to 16**-this
SMALLER_STEPS = 5
# differences still below this share of the derivative at the smaller step average fn's
# slope away yet (sin at 1e11, where even a step of 1e-12 spans periods): not judged
STILL_ALIASED = 0.25
TOO_FINE = (
    "not judged (fn curves too finely for finite differences in its precision to resolve "
    "at this point)"
)


def _shrink(before: Comparison, after: Comparison) -> float:
    """How many times smaller a comparison's error is at the other step."""
    if not (before.relative_error > 0 and math.isfinite(before.relative_error)):
        return 0.0
    return before.relative_error / max(after.relative_error, 1e-300)


def _stopped(ks, n, previous, head, why, exact=False) -> str:
    """Why the check took the directions it took; `previous` is the number of directions
    at the look before the last, `head` the comparison reported, `exact` whether these
    directions measure it with no sampling error (`Run.exact_at`)."""
    k = ks[-1]
    if len(ks) == 1:
        return f"took all {k} directions, {FIXED}"
    if why is None:  # (a failing check looked at other steps: said above)
        return f"stopped after {n} of {k} directions, then looked at other steps"
    if n < k:
        lo, hi = head.interval
        error = (
            f"the relative error {head.relative_error:.1e} ({lo:.1e}..{hi:.1e} with the "
            "finite differences' noise), measured with no sampling error (the directions "
            "span the parameters),"
            if exact
            else f"the relative error ({lo:.1e}..{hi:.1e}, 95%)"
        )
        return f"settled after {n} of {k} directions: {error} is {why}"
    return f"took all {k} directions: after {previous}, {why}"


def _needed_derivative(run: Run, ref, h) -> float:
    """Smallest RMS directional derivative whose roundoff error bar (~15 sigma / h, with
    sigma ~ 10 eps |phi|) stays at a tenth of the smallest tolerance."""
    if run.problem.scalar_output:
        magnitude = abs(float(run.probe["value"]))
    else:
        magnitude = math.sqrt(sum(math.prod(s) for s in run.problem.out_shapes))
    eps_r, eps_t = _precision.eps(ref), _precision.eps(run.tested)
    ruled = _verdict.with_rule(run, ref)
    rule, tested = _verdict.floor_values(eps_t, eps_r if ruled else eps_t, eps_r)
    floor = rule if ruled else tested
    return 15 * 10 * eps_r * magnitude / (h * 0.1 * floor)


def _report(run: Run, status, counts, p, checks, leaves, held_fixed, steps, stopped) -> Report:
    head = _verdict.head(checks, status) if checks else None
    piecewise = any(q.startswith(PIECEWISE_CONSTANT) for q in run.problems)
    if status is Status.INCONCLUSIVE or (status is Status.FAIL and piecewise):
        # not judged: a row's failure the verdict overruled, and a row's pass where its
        # tolerance is no finer than the quantity judged (a relative error of 1 or more)
        checks = [
            c if c.passed and c.tolerance < 1 else dataclasses.replace(c, judged=False)
            for c in checks
        ]
    if status in (Status.PASS, Status.FAIL) and head is not None and not head.num_used:
        # judged leaf by leaf (`_localize.merge_leaves`; no direction of the whole smooth,
        # a kink in another leaf): the leaf nearest its tolerance, or farthest beyond it
        ratio = lambda leaf: leaf.relative_error / leaf.tolerance  # noqa: E731
        judged = [leaf for leaf in leaves if leaf.tolerance > 0 and math.isfinite(ratio(leaf))]
        head = max(judged, key=ratio, default=head)
    nan = math.nan
    ref = run.reference or _precision.reference_dtype(run.policy, run.tested)
    return Report(
        status=status,
        relative_error=head.relative_error if head else nan,
        interval=head.interval if head else (nan, nan),
        tolerance=head.tolerance if head else nan,
        noise_floor=getattr(head, "noise_floor", nan),
        checks=tuple(checks),
        leaves=tuple(leaves),
        held_fixed=tuple(held_fixed),
        mode="+".join(run.modes),
        tested_dtype=run.tested.name,
        reference_dtype=jnp.dtype(ref).name,
        step=p.step if p else math.nan,
        steps_tried=tuple(float(s) for s in steps),
        num_directions=counts[0],
        max_directions=counts[1],
        stopped=stopped,
        num_nonsmooth=p.fd.num_nonsmooth if p else 0,
        num_nonfinite=int(np.sum(~p.fd.finite)) if p else 0,
        num_subgradient_consistent=(
            _error_model.subgradient_consistent(p.fd, p.analytic) if p else 0
        ),
        num_evaluations=run.evaluations,
        problems=(*run.problems, *NOTES.get(), *run.problem.notes),
        compile_seconds=run.timer.compile_s,
        run_seconds=run.timer.run_s,
        num_compiled=run.timer.compiled,
        stencil_points=p.fd.points if p else 0,
        peak_memory_bytes=run.timer.peak_bytes,
        numeric=None if p is None else np.asarray(p.numeric),
        analytic=None if p is None else np.asarray(p.analytic, np.float64),
    )
