"""The verdict: the smallest errors that count as bugs (floors), the comparisons of the
derivative under test with finite differences, and the status they lead to, with the rules
for a flat fn (piecewise constant at the step) and for an absolute comparison that says
nothing (vacuous)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _differences, _error_model, _plan, _precision
from ._report import PIECEWISE_CONSTANT, Status
from ._state import CHECKER_AGAIN, MAPS, PRIMAL_ROW, TRACED_RULE, Pass, Run

MAX_NOISE_FLOOR = 0.025  # a reference noisier than this cannot resolve a few-percent bug
# where fn rounds to a half precision inside, its finite differences cannot be finer than
# that precision allows: a noise floor up to this still tells a derivative from one 2x off
COARSE_NOISE_FLOOR = 0.25
ROUNDING_NOTE = 1e3  # rounding above this many eps of the tested dtype is pointed out
ROUNDING_ACCEPTED = "accepted as rounding"  # in that note, where the check passed
ROUNDING_GAP = "far above rounding"  # in every such note: the custom rules are then checked


ZERO_WITHIN_NOISE = (
    "the derivative is zero to within finite-difference noise or rounding along these "
    "directions (at a stationary point?); it was judged in absolute terms"
)


def rounding_as_large(run: Run, head, where: str = "") -> str:
    """The note of an absolute comparison made so by the derivative's rounding, where
    finite differences resolve the derivative (`ZERO_WITHIN_NOISE` where they do not)."""
    ref = np.dtype(run.reference or _precision.reference_dtype(run.policy, run.tested)).name
    return (
        f"{where}the {run.tested.name} derivative's rounding (its gap to the same rule in "
        f"{ref}) is as large as the derivative{' of each' if where else ''}, which finite "
        f"differences resolve (noise floor {head.noise_floor:.1e}): it was judged in "
        "absolute terms, in units of that rounding, and says nothing about an error "
        "smaller than it (fn is ill-conditioned here, or cancels)"
    )


def eps_fd(run: Run) -> float:
    """The resolution of fn's values in the reference: its precision, or that of a
    lower-precision dtype fn rounds its values to inside."""
    eps = _precision.eps(run.reference)
    return eps if run.rounds_to is None else max(eps, _precision.eps(run.rounds_to))


def with_rule(run: Run, reference=None) -> bool:
    """Whether the reference (in `reference`, else the check's) evaluates the derivative
    under test's own rule in its higher precision, which measures the tested derivative's
    rounding: where it is more precise than the tested dtype, and the rule ran in it."""
    reference = run.reference if reference is None else reference
    return _precision.eps(reference) < _precision.eps(run.tested) and not run.rule_refused


def floors(run: Run, fd) -> dict:
    """Smallest relative errors that count as bugs, per comparison."""
    eps_t = _precision.eps(run.tested)
    ruled = with_rule(run)
    # (with no rule in the reference precision, nothing measures the tested derivative's
    # rounding: it is held as a derivative tested in the reference's own precision is)
    eps_r = _precision.eps(run.reference) if ruled else eps_t
    eps_eff = max(eps_fd(run), _precision_of(run, fd))
    rule, tested = floor_values(eps_t, eps_r, eps_eff)
    if run.rtol is not None:
        rule, tested = run.rtol, run.rtol
    return {"rule": rule, "tested": tested, "nonsmooth": rule if ruled else tested}


def unresolved(run: Run, fd) -> bool:
    """Whether finite differences `fd` are noisier than a tenth of the smallest error that
    counts: not resolved finely enough to judge at that step."""
    return fd.noise_floor > 0.1 * floors(run, fd)["nonsmooth"]


def _precision_of(run: Run, fd) -> float:
    """The relative precision fn's values are computed to: their noise over their size,
    or for a non-scalar fn over 1, the size of each term of <u, fn> (its outputs over
    their own RMS, times random signs): that sum can cancel to a fraction of its terms
    (<u, sin(x)> at 0.02 over three outputs read as a float32 precision of 8e-6), and is no
    less precise than they are. Nor over less than the change of fn as every entry moves
    by its own scale (the RMS derivative along the directions, whose entries are relative
    to each leaf's size): a float32 loss that cancels to 1e-2 at a symmetric point, with
    derivatives of 2, read as a precision of 5e-5, and the floor that set (1.4e-2) passed
    a gradient 0.1 % off, where 3.5e-4 held the right one."""
    if fd is None or not fd.relative_noise > 0:
        return 0.0
    size = fd.noise / fd.relative_noise
    if not run.problem.scalar_output:
        size = max(size, 1.0)
    change = _error_model.rms(fd.value[fd.smooth]) if fd.smooth.any() else 0.0
    return fd.noise / max(size, change)


def floor_values(eps_tested: float, eps_reference: float, eps_effective: float):
    """Default smallest relative errors that count as bugs: (same rule in the reference
    precision, derivative under test). The rule is held to 1e-6, or to 10 eps^(2/3) of the
    precision fn really computes in; the derivative under test to 10 eps of its dtype when a
    higher-precision rule measures its rounding, else to sqrt(eps) (1.5e-8 in float64: a
    float64 gradient 5e-7 off is wrong), or to what fn's real precision allows."""
    rule = max(1e-6, 10 * eps_effective ** (2 / 3))
    if eps_reference < eps_tested:
        return rule, 10 * eps_tested
    return rule, max(math.sqrt(eps_tested), 10 * eps_effective ** (2 / 3))


def compare(run: Run, p: Pass) -> tuple:
    """The comparisons of the derivative under test (per mode; with the same rule in the
    reference precision where that is more precise) with the finite differences, and of
    forward with reverse mode when both are checked. The first one is the head check.
    Kept on the run: the ladder compares a pass to settle it, the pipeline again to judge
    it."""
    key = (
        *(id(p), run.tested, run.reference, run.rounds_to, run.rtol, run.modes),
        *(run.other_function, run.rounding_share, run.rule_refused),
    )
    kept = run.compared.get(key)
    if kept is not None and kept[0] is p:
        return kept[1]
    checks = _compare(run, p)
    run.compared[key] = (p, checks)
    return checks


def _compare(run: Run, p: Pass) -> tuple:
    fl = floors(run, p.fd)
    t, r = run.tested.name, run.reference.name
    ruled = with_rule(run)
    source = run.problem.source
    checks = []
    use = p.fd.smooth
    # the absolute size below which a derivative is zero here: by the finite
    # differences' error bars, or by the rounding of the derivatives under test
    zero_scale = max(_error_model.rms(p.fd.value[use]), _error_model.rms(p.fd.bar[use]))
    for mode, a, a_ref in (("reverse", p.rev, p.ref_rev), ("forward", p.fwd, p.ref_fwd)):
        if mode not in run.modes:
            continue
        rounding_scale = 0.0
        if ruled:  # absolute size of the tested derivative's rounding
            use = p.fd.smooth & np.isfinite(a) & np.isfinite(a_ref)
            rounding_scale = _error_model.rms(a[use] - a_ref[use]) if use.any() else 0.0
            if run.rounding_share is not None:
                rounding_scale *= run.rounding_share
            if not run.other_function:  # (else it is the distance to another function's)
                zero_scale = max(zero_scale, rounding_scale)
        checks.append(
            _error_model.compare(
                f"{mode} {source} ({t}) vs finite differences ({r})",
                p.fd,
                a,
                fl["tested"],
                a_ref if ruled else None,
                rounding_scale,
                # where the gap to the same rule in float64 is no rounding
                # (`_jitter.systematic`), the rounding allowed is the derivative's own move
                1.0 if run.rounding_share is None else run.rounding_share,
            )
        )
        if ruled:
            checks.append(
                _error_model.compare(
                    f"{mode} {source}, same rule in {r}, vs finite differences",
                    p.fd,
                    a_ref,
                    fl["rule"],
                    # where fn computes another function in the model's precision, the
                    # distance to its derivative is no rounding of this one: a derivative
                    # of size 0.2 was judged "zero to within noise" beside one 100 % apart
                    rounding_scale=0.0 if run.other_function else rounding_scale,
                )
            )
    if len(run.modes) == 2:
        rounding = math.hypot(checks[0].rounding, checks[-2 if ruled else -1].rounding)
        if run.other_function:
            # (the gaps to the same rule in float64 are the distance to another function,
            # fn with other random numbers drawn in float64: no rounding of the two modes,
            # which compute the same float32 function; taken for one, the row's tolerance
            # was 1.7, and transforms=True widened its rows by it)
            rounding = 0.0
        # a cast to a lower precision inside fn rounds forward-mode tangents to it too
        low = 0.0 if run.rounds_to is None else 10 * _precision.eps(run.rounds_to)
        if not ruled or run.other_function:
            # no higher-precision rule measured the two modes' rounding: at least half the
            # digits of their dtype (a caller's rtol of 1e-5 cannot make float16 modes
            # agree)
            low = max(low, math.sqrt(_precision.eps(run.tested)))
        checks.append(
            _error_model.consistency(
                f"forward vs reverse ({t}), <u, J v> = <J^T u, v>",
                p.fwd,
                p.rev,
                max(fl["tested"], low),
                rounding,
                zero_scale,
            )
        )
    if run.other_function and ruled:
        # the same rule in float64 leads; the model's derivative, of another function, is
        # shown beside it, not judged
        for i in range(0, 2 * len(run.modes), 2):
            tested = dataclasses.replace(checks[i], passed=True, judged=False)
            checks[i : i + 2] = [checks[i + 1], tested]
    n = len(p.fd.smooth)
    if run.exact_at(n):
        # directions that span the parameters: the errors are measured with no sampling
        # error, up to the finite differences' noise, which moves them by at most its
        # relative RMS (the noise floor)
        checks = [
            dataclasses.replace(c, interval=_within_noise(c)) if c.num_used == n else c
            for c in checks
        ]
    return tuple(checks)


def _within_noise(c) -> tuple[float, float]:
    """The interval of an error measured with no sampling error: its value, give or take
    the finite differences' noise floor."""
    noise = c.noise_floor if math.isfinite(c.noise_floor) else 0.0
    return max(c.relative_error - noise, 0.0), c.relative_error + noise


def head(checks, status: Status):
    """The comparison a report leads with: the first that failed where the status is a
    failure (a float32 derivative can be within its own rounding of the finite
    differences while the same rule in float64, judged more finely, is not), else the
    first one."""
    if status is Status.FAIL:
        return next((c for c in checks if not c.passed), checks[0])
    return checks[0]


def status(run: Run, p: Pass, checks, k, problems) -> Status:
    """The status of one group of k directions from its checks; the reasons for any status
    but a plain pass or fail are appended to `problems`."""
    bad = int(np.sum(~p.fd.finite))
    # (reverse mode's gradient is examined at params by the probe, before any direction)
    forward = "forward" in run.modes and p.fwd is not None
    bad_tangents = int(np.sum(~np.isfinite(p.fwd))) if forward else 0
    if bad_tangents:
        # named first: it is the derivative at params itself (sqrt's at 0), whatever fn
        # does within a step of them
        where = (
            f", and fn is not finite within a step of {p.step:.1e} along {bad} (params at "
            "the edge of its domain?)"
            if bad
            else ", where fn's finite differences are finite"
        )
        problems.append(
            f"the derivative under test (forward mode, {run.problem.source}) is NaN/Inf "
            f"along {bad_tangents} of {k} directions{where}"
        )
        return Status.NONFINITE
    if bad:
        problems.append(
            f"finite differences are NaN/Inf along {bad} of {k} directions: fn is not finite "
            f"within a step of {p.step:.1e} times each leaf's RMS size from params (the "
            "same for every element of a leaf: an element far smaller than its leaf's RMS "
            "sits that close to the edge of fn's domain, as log of 1e-9 beside 1.0)"
        )
        return Status.NONFINITE
    used = int(p.fd.smooth.sum())
    if used < max(3, k // 2):
        problems.append(
            f"only {used} of {k} directions are smooth at this point; non-smooth directions "
            "(kinks or jumps within the step) are excluded from the verdict"
        )
        return Status.INCONCLUSIVE
    kinked = int(np.sum(~p.fd.smooth))
    between = _error_model.subgradient_consistent(p.fd, p.analytic) if kinked >= 2 else 0
    if kinked >= 2 and 2 * between < kinked:
        # at a kink the derivative must lie between fn's one-sided slopes along every
        # direction that crosses it; the smooth directions run along the kink and cannot
        # see a derivative wrong across it (a rule at a tie of max returning [5, -4])
        problems.append(
            f"the derivative under test lies outside fn's one-sided slopes along "
            f"{kinked - between} of the {kinked} directions that cross a kink within the "
            "step (there it must lie between them): it may be wrong across the kink, which "
            "the smooth directions, along it, cannot show. Try a point away from the kink"
        )
        return Status.INCONCLUSIVE
    head = checks[0]
    flat = _flat(run, p, k, problems, checks)
    if flat is not None:
        return flat
    noisy = max(math.sqrt(_precision.eps(run.tested)), 100 * eps_fd(run))
    scatter = p.fd.relative_noise
    if not run.problem.scalar_output:
        # the values are sums of outputs over their own RMS (1 where the outputs are zero),
        # of order 1: far below that, they are the rounding of a map that is zero, not noise
        scatter = min(scatter, p.fd.noise)
    # fn even about the point along every direction (central differences exactly 0, as
    # sum(p**4) at 0 has; or fn's odd part at the step a millionth of its fourth difference,
    # as sum((p - 1)**4) at 1 has, where rounding p - 1 leaves the odd part not quite 0; a
    # random or jumping fn never is): judged. (A derivative far outside the error bars is
    # not enough: across a pole, tan near pi / 2, the finite differences are garbage the
    # size of their bars.)
    even = not np.any(p.fd.value[p.fd.smooth]) or _even(p)
    if head.absolute and scatter > noisy and not even:
        # (a derivative under test that is not zero where fn jumps is a surrogate)
        surrogate = np.any(p.analytic[p.fd.smooth & np.isfinite(p.analytic)])
        if surrogate and run.flat_below is not None:
            # exactly constant about params in float64, jumping only further out: fn is
            # piecewise constant there, and its derivative at params is 0
            problems.append(
                f"{PIECEWISE_CONSTANT}{run.flat_below:.1e} along any of the directions "
                "(computed in float64, with no cast to a lower precision, nor a callback or "
                "kernel, inside), and jump at larger steps (they scatter by "
                f"{scatter:.1e} at {p.step:.1e}): fn is piecewise constant here "
                "(round, floor, argmax, comparisons), or flat to within float64 (a softmax "
                "or sigmoid saturated far into its tail, where a derivative that is not 0 "
                "is wrong), so its derivative at params is 0, while the derivative under "
                f"test is not: a {SURROGATE}"
            )
            return Status.FAIL
        problems.append(
            f"{SCATTERS}{scatter:.1e} (relative) between nearby "
            "evaluations, far beyond rounding, so its derivative cannot be told from zero: "
            "fn jumps within the step of params (a discontinuity: round or floor at a "
            "tie, a comparison), or its derivative changes by orders of magnitude within "
            "the step (a pole or singularity next to params: 1/x near 0, a singular value "
            "near 0 in pinv or a solve), or fn is random, or not a function of params and "
            "args alone (say, constants drawn anew each time it is traced)"
            + (
                "; if fn is piecewise constant (argmax, one_hot, round), the derivative "
                "under test, which is not zero, is a surrogate gradient (a straight-through "
                "estimator), which no finite difference can confirm"
                if surrogate
                else ""
            )
            + (
                "; this check ran through a Checker, which reuses the programs it traced "
                "first: if fn, or a global or setting it reads, changed since, its programs "
                "traced now disagree with those, so make a new Checker for the new fn"
                if CHECKER_AGAIN.get()
                else ""
            )
        )
        return Status.INCONCLUSIVE
    coarse = head.noise_floor > MAX_NOISE_FLOOR
    if coarse and head.relative_error > 2 * head.tolerance:
        return Status.FAIL  # wrong beyond twice a tolerance that includes the noise
    if head.absolute and coarse and vacuous(p, run.rounds_to is not None, eps_fd(run)):
        problems.append(
            "finite-difference noise (noise floor "
            f"{head.noise_floor:.1e}) is as large as the derivative judged: a pass would "
            "carry no information about it (does fn round to a low precision inside, or is "
            "the derivative itself rounding, at a stationary point where fn's terms cancel?). "
            "Try a larger `step`, or a point where the derivative is not zero"
        )
        return Status.INCONCLUSIVE
    if head.absolute and not head.passed:
        problems.append(
            "finite differences find fn's derivative zero here to within their noise (at a "
            "stationary point?) and the derivative under test is not; judged in absolute "
            "terms"
        )
    elif head.absolute and head.resolved and head.rounding_measured:
        # finite differences see the derivative: what made the comparison absolute is
        # the derivative's own rounding (an ill-conditioned loss), not a flat fn
        problems.append(rounding_as_large(run, head))
    elif head.absolute:  # the derivative is zero to within noise or rounding
        problems.append(ZERO_WITHIN_NOISE)
    elif coarse and (limit := _half_precision_limit(run, head)):
        problems.append(
            f"finite differences resolve the derivative only to a noise floor of "
            f"{head.noise_floor:.1e}, the limit of {limit} rounding: judged at that "
            f"resolution (tolerance {head.tolerance:.1e}), so a smaller error would go unseen"
        )
    elif coarse:
        native = (
            # (fn rounds to float32 inside: finite differences in float32 throughout, as
            # fn computes, resolved correct models that cast their params to float32 to
            # about 1e-3 where the float64 reference did not, and failed 1 % bugs)
            "; fn rounds to float32 inside: precision='native' takes finite differences in "
            "float32 throughout, as fn computes, which may resolve it more finely"
            if run.rounds_to is not None
            and np.dtype(run.rounds_to) == np.float32
            and not run.native_differences
            else ""
        )
        problems.append(
            f"finite-difference noise floor {head.noise_floor:.1e} is too coarse to judge "
            f"the gradient{native}"
        )
        return Status.INCONCLUSIVE
    if not all(c.passed for c in checks):
        entries = sum(int(np.size(x)) for x in run.inputs.diff)
        factor = constant_factor(p, head.tolerance, entries)
        if factor is not None:
            problems.append(factor)
        return Status.FAIL
    # (absolute comparisons are judged against noise, and pass rightly where the
    # derivative and its error are both within it; not so where finite differences
    # resolve the derivative and the "rounding" that made the comparison absolute is the
    # measured gap to the same rule in the reference, which a bug that size makes too)
    if (
        head.tolerance >= VACUOUS_TOLERANCE
        and _precision.eps(run.tested) > _precision.eps(jnp.float32)
        and (not head.absolute or (head.rounding_measured and head.resolved))
    ):
        problems.append(
            f"the tolerance, {head.tolerance:.1e}, is {VACUOUS_TOLERANCE} or more (set by the "
            f"derivative's measured distance from the same rule in {run.reference.name}, "
            f"taken for {run.tested.name} rounding): a derivative of twice the size, or zero, "
            f"would pass it, so the gradient is not judged (a bug on a {run.tested.name} "
            "path of fn or its rules would hide in that distance)"
        )
        return Status.INCONCLUSIVE
    return Status.PASS


# a pass at a tolerance this large would pass a zero derivative: not judged in float16 and
# bfloat16, whose rounding a bug on their own code path hides in (a float32 derivative at
# an exact fit is all rounding, and passes as such: it is the same rule as in float64)
VACUOUS_TOLERANCE = 1.0


def _half_precision_limit(run: Run, head) -> str:
    """Why a coarse reference is as fine as fn allows ("" when it is not): fn rounds to a
    half precision inside, or cannot run in any higher one (it mixes its inputs with a
    half-precision array it closes over); finite differences then judge at that
    resolution, stated in the report, provided the noise still resolves an error well
    below the derivative itself."""
    if head.noise_floor > COARSE_NOISE_FLOOR:
        return ""
    # (a cast to float32 in a float32 model, which rounds only in the float64 reference,
    # is no limit of fn's: written as x.astype(y.dtype) it judges finely)
    if run.rounds_to is not None and _precision.eps(run.rounds_to) > _precision.eps(jnp.float32):
        return f"fn's own {run.rounds_to.name}"
    if _precision.eps(run.reference) > _precision.eps(jnp.float32):
        return f"fn's {run.reference.name} (it runs in no higher precision)"
    return ""


FLAT = "fn is flat here"  # the note of a pass on a piecewise-constant fn (`_flat`)
# what that note says such a fn is (a derivative map of a polynomial says otherwise)
FLAT_KINDS = "piecewise constant, as round or argmax are, or not depending on params at all"
# a second difference of fn above this many times the rounding of its values is curvature
# (`curves`): at the default step, a curvature of 0.06 times fn's size in float64
CURVED_ABOVE = 1e4


SCATTERS = "fn's values scatter by "  # how the note of a fn jumping within the step starts


def curves(run: Run, p: Pass | None) -> bool:
    """Whether fn's second differences phi(h) - 2 phi(0) + phi(-h) stand far above the
    rounding of its values along at least half of its smooth directions: fn's derivative
    changes measurably within the step. (The rounding is that of the precision fn's
    values are computed in: the reference's, the model's where inputs keep their own
    dtypes, or a lower one fn rounds to inside.) Not where fn's values were found to
    scatter (a jump within the step, floor at an integer): a jump's second difference is
    its height, whatever the step, and says nothing of how the derivative changes."""
    if p is None or run.reference is None:
        return False
    if any(q.startswith(SCATTERS) for q in run.problems):
        return False
    use = p.fd.smooth & p.fd.finite
    if not use.any():
        return False
    dtypes = [run.reference] + ([] if run.cast else [run.tested])
    dtypes += [] if run.rounds_to is None else [run.rounds_to]
    eps = max(_precision.eps(d) for d in dtypes)
    phis = np.asarray(p.phis, np.float64)[use]
    phi0 = np.asarray(p.phi0, np.float64)[use]
    magnitude = np.maximum(np.max(np.abs(phis), axis=1), np.abs(phi0))
    second = np.abs(_differences.second(phis, phi0))
    return 2 * int(np.sum(second > CURVED_ABOVE * eps * magnitude)) >= int(use.sum())


EVEN = 1e-6  # fn's odd part at the step within this share of its fourth difference: even


def _even(p: Pass) -> bool:
    """Whether fn is even about the point along every smooth direction to within rounding:
    |phi(h) - phi(-h)| at most `EVEN` times its fourth difference, which is not zero (a
    function whose leading term is of fourth order or higher, at a stationary point)."""
    smooth = p.fd.smooth
    if p.phis.shape[1] != 4 or not smooth.any():
        return False
    odd = np.abs(p.phis[smooth, -1] - p.phis[smooth, 0])
    d4 = np.abs(p.fd.d4[smooth])
    return bool(np.all(d4 > 0) and np.all(odd <= EVEN * d4))


FACTOR = "the derivative under test is "  # how `constant_factor`'s note starts


# the most a derivative may be off a constant multiple of fn's to be called one
MAX_FACTOR_MISFIT = 0.05


def constant_factor(
    p: Pass, tolerance: float, entries: int, along: str = "every direction"
) -> str | None:
    """Where the derivative under test is a constant multiple c of the finite differences
    along every smooth direction (to within `tolerance`, relative), the note that says so:
    a constant factor wrong, the commonest slip in a hand-derived derivative, or a rule
    that scales or reverses its gradient on purpose. None otherwise, or where c is 1 or
    0 to within the tolerance (no factor to name), or fewer than 4 directions judge it.
    (Where the directions move `entries` < 2 entries, every derivative is such a multiple:
    not called.) `along`: the directions, as the note names them."""
    a = p.analytic
    if entries < 2 or a is None or np.iscomplexobj(a) or np.iscomplexobj(p.fd.value):
        return None
    use = p.fd.smooth & np.isfinite(a) & np.isfinite(p.fd.value)
    f, a = p.fd.value[use].astype(np.float64), a[use].astype(np.float64)
    if f.size < 4 or not np.any(f) or not np.any(a):
        return None
    c = float(np.dot(a, f) / np.dot(f, f))
    misfit = float(np.linalg.norm(a - c * f) / np.linalg.norm(a))
    # (a tolerance in units of noise, 2 where fn's derivative is zero within it, let a fit
    # to noise 97 % off pass as a factor of -7e9)
    if (
        misfit > min(tolerance, MAX_FACTOR_MISFIT)
        or abs(c - 1) <= 10 * max(tolerance, misfit)
        or abs(c) < 1e-3
    ):
        return None
    # (digits enough to tell the factor from 1: 1.0002 printed as "1" said nothing)
    digits = max(4, math.ceil(-math.log10(abs(c - 1))) + 2)
    return (
        f"{FACTOR}{c:.{digits}g} times fn's along {along} (to within "
        f"{max(misfit, 1e-16):.1e}): a constant factor wrong (a sign, a factor of 2, a mean "
        "taken for a sum, a scale left out), or a rule that scales or reverses its "
        "gradient on purpose (a gradient-reversal layer)"
    )


# how the notes on a derivative where fn is flat end
SURROGATE = (
    "surrogate gradient (a straight-through estimator, a custom rule that is not fn's "
    "derivative by design) fails this check by construction"
)


# how the note on a fn whose output does not depend on params begins
UNREAD = "fn's output does not depend on params"


def _flat(run: Run, p: Pass, k, problems, checks=()) -> Status | None:
    """The verdict where fn's values do not change at all within the step along most
    directions (finite differences exactly zero): a pass when the derivative under test
    is exactly zero there too (fn is piecewise constant here); inconclusive when it is
    not, unless fn stays flat at the largest step (a staircase of a low precision that
    fn rounds to inside looks flat at a step below its quanta: never a failure)."""
    flat = flat_directions(p)
    if flat is None:
        return None
    n, zero = flat
    if zero and run.problem.unread and not (MAPS.get() or PRIMAL_ROW.get() or TRACED_RULE.get()):
        # (fn's own check, not a derivative map's or a rule's: a linear fn's jvp map does
        # not read the point)
        problems.append(
            f"{UNREAD}: no operation of fn reads them, so its derivative is zero and there "
            "is nothing to check. Does fn read a global copy of the parameters instead of "
            "its first argument?"
        )
        return Status.INCONCLUSIVE
    if zero:
        problems.append(
            f"{FLAT}: its values do not change within a relative step {p.step:.1e} "
            "along any direction, so its derivative is zero everywhere nearby "
            f"({FLAT_KINDS}), as the derivative under test says"
        )
        return Status.PASS
    a = p.analytic
    use = p.fd.smooth & np.isfinite(a)
    change = _error_model.rms(a[use]) * p.step  # what the derivative says fn moves by
    if not np.any(p.phis) and not np.any(p.phi0) and change < _precision.eps(run.tested):
        problems.append(
            f"fn is exactly 0 at every point of the stencil (relative step {p.step:.1e}), "
            f"and the derivative under test says it moves by {change:.1e} there, below the "
            "rounding of a value of size 1: a value that cancels to 0 (a loss at its floor, "
            f"as cross-entropy on confident logits) {SMALL_UNSEEN}"
        )
        return Status.INCONCLUSIVE
    if p.step >= 0.99 * run.max_step:  # flat even at the largest step: judged as usual
        # (unless the derivative says fn moves by less than its own rounding there, and a
        # row fails, or the differences run in the model's own precision, where a pass
        # would say nothing: a softmax saturated in float32, whose derivative of 1e-8 no
        # float32 value shows, and whose modes differ by their rounding)
        quantum = _precision.eps(run.reference) * float(np.max(np.abs(p.phi0), initial=0.0))
        failing = any(not c.passed for c in checks)
        native = _precision.eps(run.reference) >= _precision.eps(run.tested)
        if (failing or native) and np.any(a[use]) and change < quantum:
            problems.append(
                f"fn's values do not change along {n} of {k} directions even at the largest "
                f"relative step, {p.step:.1e}, where the derivative under test says fn moves "
                f"by {change:.1e}, below the rounding of fn's {run.reference.name} values "
                f"({quantum:.1e}): fn's precision {SMALL_UNSEEN} (a "
                "softmax or sigmoid saturated in float32; or a derivative that is itself "
                "rounding, as the second derivative of a function linear up to its "
                "rounding), so nothing judges it here"
            )
            return Status.INCONCLUSIVE
        if np.any(a[use]) and change < quantum:
            # (no row fails: the derivative is judged in absolute terms, not found wrong;
            # an order above sees that it is made of rounding, `_orders._on_rounding`)
            problems.append(
                f"fn's values do not change along {n} of {k} directions even at the largest "
                f"relative step, {p.step:.1e}, where the derivative under test says fn moves "
                f"by {change:.1e}, below the rounding of fn's {run.reference.name} values "
                f"({quantum:.1e}): fn's precision {SMALL_UNSEEN} (a softmax or sigmoid "
                "saturated), and it is judged in absolute terms"
            )
        elif np.any(a[use]):
            problems.append(
                f"fn's values do not change along {n} of {k} directions even at the largest "
                f"relative step, {p.step:.1e} (fn is constant along them: invariant to "
                "them, as a softmax is to a shift of its logits, or piecewise constant, as "
                "round, floor, sign and comparisons are), while the derivative under test is "
                f"not zero: a {SURROGATE}"
            )
        return None
    if not np.any(a[p.fd.smooth & np.isfinite(a)]):
        # the derivative under test is zero along every direction, and fn is flat along
        # some only: a zero of higher order (det at a matrix of rank n - 2, whose values
        # change as h^3 along some directions and not at all along others): judged as usual
        return None
    problems.append(
        f"fn's values do not change within a relative step {p.step:.1e} along {n} of {k} "
        "directions (finite differences exactly zero) while the derivative under test is "
        "not zero there: fn is piecewise constant at this scale, so finite differences "
        "cannot judge its derivative. Either it rounds to a low precision inside (a cast "
        f"to bfloat16?), where a larger `step` (up to {run.max_step}) can help, or it is "
        f"built from round, floor, argmax or comparisons, where a {SURROGATE}"
    )
    return Status.INCONCLUSIVE


def vacuous(p: Pass, rounds: bool, eps: float) -> bool:
    """Whether an absolute comparison (the derivative zero to within the error bars) says
    nothing: fn's values are coarse (it rounds to a low precision: seen in its jaxpr, or
    constant along some direction while others scatter by more than the reference's
    rounding `eps`), or the derivative under test (its rule in higher precision, where
    measured) is not small against the error bars, which then hide it. At a true zero (a
    stationary point, an identically zero fn, the derivative map of a linear fn) it is far
    below them."""
    use = p.fd.smooth
    a = p.analytic
    a_ref = p.analytic_ref
    claimed = _error_model.rms((a if a_ref is None else a_ref)[use])
    # values equal to the last bit along some directions and a few ulps apart along
    # others are ordinary rounding of a constant, not the quanta of a lower precision
    quanta = p.fd.relative_noise > 10 * eps
    coarse_values = rounds or (quanta and bool(np.any(constant_along(p))))
    return (
        coarse_values
        or claimed > 0.1 * _error_model.rms(p.fd.bar[use])
        or _moves_beyond_rounding(p, eps)
    )


# how far above the rounding of fn's values their move across the stencil must be, for a
# difference judged zero within its bars to be no rounding (`_moves_beyond_rounding`)
BEYOND_ROUNDING = 1e3


def _moves_beyond_rounding(p: Pass, eps: float) -> bool:
    """Whether fn's values are exactly constant along some smooth directions and jump
    along others, while the comparison found the difference zero within its bars: central
    differences growing as 1/step (D(h/2) at least 1.5 D(h), as a jump J makes them, J/2h
    and J/h) by far more than the rounding of fn's values. The steps of a staircase or a
    jump, not rounding (a tie in a sort parting at every step, the jump's size read as
    fn's noise): a pass would carry no information. At a true zero (a stationary point, a
    bias before a normalization, det at a matrix of low rank, changing as h^3 along some
    directions and not at all along others) the differences shrink with the step."""
    if p.phis.shape[1] < 4:
        return False  # (central differences alone: no second step to tell them apart)
    use = p.fd.smooth & np.all(np.isfinite(p.phis), axis=1)
    if not np.any(use & constant_along(p)):
        return False
    pm1, pmh, pph, pp1 = (p.phis[use, i] for i in range(4))
    outer, inner = (pp1 - pm1) / 2, pph - pmh  # D(h) and D(h/2), times h
    scale = float(np.max(np.abs(p.phis[use]), initial=0.0))
    jumps = (outer * inner > 0) & (np.abs(inner) >= 1.5 * np.abs(outer))
    return bool(np.any(jumps & (np.abs(inner) > BEYOND_ROUNDING * eps * scale)))


def constant_along(p: Pass) -> np.ndarray:
    """Whether fn's values are exactly equal at every stencil point, per direction."""
    return np.all(p.phis == p.phi0[:, None], axis=1)


# Flat directions whose derivative under test has an RMS below this fraction of the other
# directions' are taken as orthogonal to the gradient, not as a flat fn: where a staircase
# leaves fn flat along most directions, the flat ones are those of smaller derivative, whose
# RMS (the lower half of a Gaussian's) is still 0.3 of the others'.
ORTHOGONAL = 0.1


def flat_directions(p: Pass):
    """None, unless fn's values are exactly constant within the step along at least half of
    the smooth directions; then (how many, whether the derivative under test is zero
    there: exactly, or to within its rounding against the same rule in higher precision)."""
    a = p.analytic
    use = p.fd.smooth & np.isfinite(a)
    flat = use & constant_along(p)
    n = int(flat.sum())
    if n == 0 or 2 * n < int(use.sum()):
        return None
    zero = not np.any(a[use])
    moving = use & ~flat
    if np.any(moving) and _error_model.rms(a[flat]) < ORTHOGONAL * _error_model.rms(a[moving]):
        # constant where the derivative under test is (about) zero, changing where it is
        # not: directions orthogonal to the gradient (random signs against a gradient of a
        # few equal entries meet them often), not a flat fn, whose flat directions would
        # carry derivatives like the others'
        return None
    a_ref = p.analytic_ref
    if (
        not zero
        and a_ref is not None
        and _error_model.rms(a_ref[use]) <= _error_model.rms(a[use] - a_ref[use])
    ):
        return None  # the same rule in higher precision is zero: a is rounding alone
    return n, zero and n == int(use.sum())


# where fn draws random numbers, a gap between the float32 derivative and the float64 one
# beyond this is taken for fn drawing others in float64 (`incomparable`)
RANDOM_GAP_LIMIT = 1e-2


def incomparable(run: Run, head, p: Pass) -> bool:
    """Whether fn in float64 is a different function from fn in the model's precision
    (say, random numbers drawn in the default dtype), judged by the gradients of the two
    disagreeing by far more than rounding; then finite differences fall back to the
    model's precision. A gap within what moving the parameters by their own rounding
    changes the derivative by (curvature times eps of the model's dtype, along each
    direction) is rounding too: at a minimum exact in float32 (a perfect fit to targets
    computed in float32) the float32 gradient is 0 and the float64 one is not."""
    limit = gap_limit(run)
    if run.problem.draws_random and _precision.eps(run.tested) <= _precision.eps(jnp.float32):
        # a dropout mask drawn anew in float64 moved a float32 gradient by 9.9e-2, under
        # the limit, and the pass was put down to a loss that cancels
        limit = min(limit, RANDOM_GAP_LIMIT)
    if run.policy != "auto" or not head.resolved or not head.rounding > limit:
        return False
    a, a_ref = p.analytic, p.analytic_ref
    if a is not None and a_ref is not None:
        curvature = _differences.second(p.phis, p.phi0) / p.fd.h**2
        gap = _error_model.rms(np.asarray(a, np.float64) - a_ref)
        if gap <= 10 * _precision.eps(run.tested) * _error_model.rms(curvature):
            return False
    return True


def note_incomparable(run: Run, head, reference, noisy: bool = False) -> None:
    """Say that fn in `reference` computes something else than in the model's precision
    (`incomparable`), that the derivative's code is judged in `reference` throughout, and
    how to keep fn the same function in both; `noisy`: the model's own finite differences
    were far noisier than that (fn cancels, its value there is rounding)."""
    name = jnp.dtype(reference).name
    tested = run.tested.name
    what = f"fn computes something else in {name} (e.g. random numbers drawn in the default dtype)"
    advice = (
        "To check that too, draw random numbers in an explicit dtype "
        "(jax.random.uniform(key, shape, jnp.float32); bernoulli with p=jnp.float32(...)) "
        "or pass them to fn as an argument"
    )
    if not run.problem.draws_random:
        # (a Gaussian process's float32 Cholesky at a condition number of 1e7: a leaf's
        # float32 gradient had the wrong sign, and the note spoke of random numbers)
        eps = _precision.eps(run.tested)
        what = (
            f"fn draws no random numbers, so its {tested} evaluation is far from its {name} "
            f"one here: an ill-conditioned step (a Cholesky, solve or log-determinant of a "
            f"matrix whose condition number nears 1/eps of {tested}, {1 / eps:.1e}; a long "
            "recurrence), or a branch on the dtype"
        )
        advice = (
            f"The {tested} derivative itself is that far from the true one: where that "
            f"matters, compute in {name} (jax.config.update('jax_enable_x64', True)) or "
            "condition the problem (a larger jitter or noise on a kernel's diagonal, say)"
        )
    if noisy:
        what = (
            f"fn's {run.tested.name} value is rounding here, or {what}: finite differences "
            f"in {run.tested.name} fail the derivative far beyond that (a loss that cancels "
            "to near zero, as binary cross-entropy at confident logits, rounds to noise)"
        )
    run.problems.append(
        f"the derivative of fn in {name} differs from that in "
        f"{run.tested.name} by {head.rounding:.1e}, {INCOMPARABLE}: {what}: the derivative's code "
        f"is judged by the same rule run in {name} against finite differences in {name} "
        f"(as precision='float64' does), not the {run.tested.name} derivative itself. " + advice
    )


def note_native(
    run: Run, head, reference, values_differ: bool = False, other_program: bool = False
) -> None:
    """Say that fn's derivative in `reference` differs from that in the model's precision
    (while fn's value does not, or while the model's own finite differences fail its
    derivative), and that finite differences fell back to the model's precision;
    `other_program`: fn is another program in the model's precision (`_jitter.fn_differs`)."""
    name = jnp.dtype(reference).name
    own = run.problem.grad_fn is not None or run.problem.has_rules
    suspects = (
        f"a rule or grad_fn wrong on its {run.tested.name} path alone, or "
        if own
        else "fn's derivative here is JAX's own, of no custom rule nor grad_fn: "
    )
    why = (
        f"and fn's value differs too (fn computes something else in {name}, e.g. random "
        f"numbers drawn in the default dtype, or cancels in {run.tested.name}, as "
        "1 - cos(x) near 0 does, leaving its value and derivative mostly rounding); the "
        f"same rule in {name} passes its own finite differences, but those in "
        f"{run.tested.name} fail the {run.tested.name} derivative ({suspects}its "
        f"{run.tested.name} rounding grown far beyond the value's?): it is judged by them"
        if values_differ
        else "while fn's value agrees in both to 1e-3 (a rule or grad_fn taking another path "
        f"in {run.tested.name}, or one not linear in its tangent or cotangent?); finite "
        "differences use the model's precision instead, which resolves more coarsely"
        if own
        else "while fn's value agrees in both to 1e-3; fn's derivative here is JAX's own, of "
        f"no custom rule nor grad_fn, but fn is another program in {run.tested.name} (a "
        "branch on the dtype?), whose "
        "derivative finite differences in the model's precision judge instead, more coarsely"
        if other_program
        else "while fn's value agrees in both to 1e-3; fn's derivative here is JAX's own, "
        f"of no custom rule nor grad_fn, so this is the {run.tested.name} derivative's own "
        "rounding, grown far "
        "beyond its value's (along a long recurrence or simulation, say), or a kink or "
        f"branch fn's {run.tested.name} values sit exactly on (jnp.where(x > c, ...) at "
        f"x == c, a sample on a bin edge), which {name} misses by a rounding, taking one "
        "side of it; finite differences use the model's precision instead, which resolves "
        "more coarsely"
    )
    run.problems.append(
        f"the derivative of fn in {name} differs from that in {run.tested.name} by "
        f"{head.rounding:.1e}, {INCOMPARABLE}, {why}"
        + (" (check such a rule alone with jaxcheck.verify_rule)" if own or values_differ else "")
    )


def note_own_path(
    run: Run, head, reference, fn_differs: bool, judged: bool = True, vouches: bool = True
) -> None:
    """Say that fn (where `fn_differs`; else its derivative alone) is another program in
    the model's precision than in `reference`, that its derivative there is off the same
    rule in `reference` by more than rounding of a well-conditioned computation, and that
    finite differences in the model's precision fail it (or, not `judged`, could not judge
    it, and the pass rests on the gap being rounding; unless it `vouches`, a gap beyond
    `gap_limit`, then nothing is judged)."""
    name, tested = jnp.dtype(reference).name, run.tested.name
    verdict = (
        f"finite differences in {tested} fail it: the derivative of the {tested} path is "
        f"wrong (judged at {tested} resolution)"
        if judged
        else f"finite differences in {tested} could not judge that path here, and the pass "
        f"rests on taking the gap for rounding (an ill-conditioned loss?); check the {tested} "
        "path at a better-conditioned point, or alone"
        if vouches
        else f"finite differences in {tested} could not judge that path here, and a gap "
        f"beyond {gap_limit(run):.0e} is not taken for rounding: not judged; check the "
        f"{tested} path at a better-conditioned point, or alone"
    )
    what = (
        f"{OWN_PATH} in {tested} than in {name} (a branch on the dtype, a constant of "
        "jnp.finfo, Python state that changes from trace to trace?)"
        if fn_differs
        else f"{OWN_DERIVATIVE} in {tested} than in {name} while fn is not (a rule or "
        "grad_fn with a branch on the dtype?)"
    )
    run.problems.append(
        f"{what}, and its {tested} derivative differs from the one in {name} by "
        f"{head.gap:.1e} (relative), far above rounding of a well-conditioned computation; "
        f"{verdict}"
    )


OWN_PATH = "fn is another program"
OWN_DERIVATIVE = "fn's derivative is another program"


# said where the derivative in float64 and in the model's precision are too far apart for
# one to judge the other (`note_incomparable`, `note_native`)
INCOMPARABLE = "far beyond the rounding between the two precisions"
# said where the derivative in the model's precision is rounding far off the same rule in
# the reference, which finite differences in the model's precision cannot resolve
BLIND = "cannot resolve the derivative"
# how `_flat` says that fn's values cannot show a derivative as small as the one under test
SMALL_UNSEEN = "cannot show a derivative this small"


def gap_limit(run: Run) -> float:
    """A relative gap between the derivative in the model's precision and the same rule in
    the reference beyond which it is no rounding of a well-conditioned computation."""
    return max(0.1, 30 * math.sqrt(_precision.eps(run.tested)))


def note_large_rounding(run: Run, head, status: Status, p: Pass | None = None, others=()) -> bool:
    """Say so when the derivative in the model's dtype is far from the same rule in the
    reference dtype: where the check passed, it was excused as rounding, which is right for
    an ill-conditioned loss, but would also excuse a bug in a code path taken only in the
    model's dtype. A gap as large as the derivative is no rounding at all. Each note says
    `ROUNDING_GAP`: the custom rules are then checked. Returns whether the note says the gap
    was accepted as rounding (`ROUNDING_ACCEPTED`)."""
    if (
        any(INCOMPARABLE in q or q.startswith((OWN_PATH, OWN_DERIVATIVE)) for q in run.problems)
        or run.rounding_share is not None
    ):
        # the gap is fn computing something else in float64, or no rounding
        # (`_jitter.systematic`): said, with what was done
        return False
    if not large_rounding(run, head):
        return False
    gap = (
        f"the {run.tested.name} derivative differs from the same rule in "
        f"{run.reference.name} by {head.gap:.1e} (relative), {ROUNDING_GAP}"
    )
    if run.native_blind:
        run.problems.append(
            f"{gap}, yet finite differences in {run.tested.name} {BLIND} here: the gap "
            f"is {run.tested.name} rounding of a derivative far smaller than the terms "
            "fn computes (cross-entropy on confident logits), or fn computes something "
            f"else in {run.reference.name} (a kink or branch its {run.tested.name} values sit "
            f"exactly on, as jnp.where(x > c, ...) at x == c, which {run.reference.name} "
            f"misses by a rounding); the same rule in "
            f"{run.reference.name} is what the finite differences judged"
        )
        return False
    cancels, stationary = value_gap(run, p), near_stationary(run, p)
    if head.gap > gap_limit(run) and cancels < 0.1 * head.gap and not stationary:
        run.problems.append(
            f"{gap}: fn or its rules compute something else in {run.reference.name} "
            "(random numbers drawn in the default dtype, a branch on the dtype?)"
        )
        return False
    why = (
        "an ill-conditioned loss, or an algorithm that loses precision in "
        f"{run.tested.name}, as eigh and svd do near repeated values?"
    )
    if stationary:
        why = (
            f"the derivative is within {STATIONARY} {run.tested.name} epsilons of fn's own "
            "size, as at a stationary point (a gradient zero by symmetry, up to the rounding "
            f"of the data), so its {run.tested.name} rounding is as large as itself"
        )
    elif cancels >= 0.1 * head.gap:
        why = (
            f"fn's own {run.tested.name} value is {cancels:.1e} off its value in "
            f"{run.reference.name}: it cancels, as a loss at a fit or a minimum does, and its "
            "derivative rounds as much"
        )
        if run.problem.iterates:
            why += (
                f"; or a lax.while_loop in fn runs another number of steps in "
                f"{run.tested.name} (a stopping test on values that round: a time t += dt, "
                "a residual below a tolerance), which makes it another function there"
            )
    if tensorfloat32(run):
        why = (
            "float32 matrix products run in TensorFloat-32 on this GPU, about 3 "
            "significant digits, unless jax_default_matmul_precision is 'highest'"
        )
    accepted = f"; it was {ROUNDING_ACCEPTED} ({why})" if status is Status.PASS else ""
    path = run.tested.name
    if status is Status.FAIL and head.passed and any(not c.passed for c in others):
        # the derivative under test passes, at a tolerance that takes the gap for
        # rounding, and the same rule in the reference fails: that path is the wrong one
        accepted = (
            f"; the {path} derivative passes at a tolerance that allows for that gap, and "
            f"the same rule in {run.reference.name} fails"
        )
        path = run.reference.name
    run.problems.append(
        f"{gap} of a well-conditioned computation in {run.tested.name}{accepted}. If fn or "
        f"its rules take a different path in {path}, check that path; if fn "
        "reads Python state that changes from call to call (a counter, a global), each "
        "trace of it is another function: make it a function of params and args alone"
    )
    return status is Status.PASS


def large_rounding(run: Run, head) -> bool:
    """Whether the derivative in the model's dtype is farther from the same rule in the
    reference dtype than rounding of a well-conditioned computation takes it."""
    eps_t = max(_precision.eps(run.tested), eps_fd(run))
    # (in float16 and bfloat16, 1000 eps is about 1: a few percent is already far above
    # the rounding of a well-conditioned computation there)
    return head.rounding_measured and head.gap > min(ROUNDING_NOTE, 30 + 0.01 / eps_t) * eps_t


# a derivative (along the directions, in fn's units) within this many epsilons of the
# tested dtype times fn's value is at a stationary point: its rounding is as large as it
STATIONARY = 10


def near_stationary(run: Run, p: Pass | None) -> bool:
    """Whether the derivative along the directions, by finite differences, under test and
    by the same rule in the reference, is within `STATIONARY` epsilons of the tested dtype
    times fn's scalar value: there the derivative under test is mostly its own rounding
    (the terms of its sum are of fn's size and cancel)."""
    value = run.probe.get("value") if run.probe else None
    if p is None or value is None or not run.problem.scalar_output or p.analytic_ref is None:
        return False
    size = abs(float(value))
    sizes = []
    for d in (p.numeric, p.analytic, p.analytic_ref):
        d = np.asarray(d, np.float64)
        sizes.append(_error_model.rms(d[np.isfinite(d)]))
    return math.isfinite(size) and max(sizes) < STATIONARY * _precision.eps(run.tested) * size


def value_gap(run: Run, p: Pass | None) -> float:
    """How far fn's value in the tested dtype is from its value in the reference, relative
    to the larger (0 where unknown): near 1 where the value cancels to rounding."""
    value = run.probe.get("value") if run.probe else None
    if p is None or value is None or not run.problem.scalar_output or p.phi0 is None:
        return 0.0
    tested, reference = float(value), float(np.asarray(p.phi0).ravel()[0])
    size = max(abs(tested), abs(reference))
    return abs(tested - reference) / size if size > 0 and math.isfinite(size) else 0.0


def tensorfloat32(run: Run) -> bool:
    """Whether fn's float32 matrix products run in TensorFloat-32: on a GPU, at the
    default precision, unless the configuration asks for full float32."""
    if not run.problem.float32_products:
        return False
    configured = jax.config.jax_default_matmul_precision
    full = configured is not None and str(configured).lower() in ("highest", "float32")
    return _plan.platform_of(_plan.device_of(run.inputs.diff)) == "gpu" and not full
