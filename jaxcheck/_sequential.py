"""Sequential directions: the check looks at its relative error after 4 directions (8 for
random signs alone, and for signs that span a small problem) and adds directions in
batches (4 -> 8 -> 16 -> 32 -> ... up to `num_directions`)
only while the verdict is in doubt; and the evaluations of the directions already taken are
kept, so that every look pays only for its new directions.

The stopping rule. Over n directions the relative error err_n estimates the true error
e = ‖W(g̃ − g)‖ / ‖W g‖, with err_n² / e² distributed as F(n, n) for Gaussian directions
(less spread for random signs; `_error_model.interval`). At every look but the last, the
check stops when the estimate clears the tolerance tol by a factor c_n:

    err_n · c_n < tol  (settled as a pass),    err_n / c_n > tol  (settled as a fail),

with c_n² the 1 - beta quantile of F(n, n) (exact) and beta = EARLY_ERROR / (number of
early looks): a Bonferroni split of the error budget over the looks, so that even at
e = tol each side's early stops together happen with probability at most EARLY_ERROR (5 %,
the 95 % level of an interval). At the last look (n = K) the usual rule applies: pass when
err_K <= tol. The error rates are those at the two points that define them, a correct
gradient (e = tol / 2: the tolerance is twice the finite differences' measured noise and
rounding) and a bug at twice the tolerance (e = 2 tol); an early wrong verdict there needs
the estimate off by the factor 2 c_n, so (a union bound over the looks)

    P(correct gradient failed), P(bug at 2 tol passes)
        <= sum over early looks of P(F(n, n) > 4 c_n²)  +  P(F(K, K) > 4),

`error_bounds(K)`: for the default "uniform" directions and Gaussian ones 0.64 % each for
K = 16 (0.22 % + the fixed-K check's own 0.42 %), 0.15 % for K = 32; for random signs alone,
which look first after 8, 0.49 % and 0.03 %; less where e is further from tol. The tests
measure them by simulation.

Why random signs alone look first after 8 directions, not 4: along a random-sign direction
v an error vector can vanish exactly, e . v = 0, with probability up to 1/2 (two entries of
equal size and opposite sign, as a bwd that swaps two cotangents makes: v0 = v1 hides it; a
constant error, as a bias gradient missing a term, hides along 3 of 8 sign patterns of 4
entries). No directions can rule that out, but 4 of them miss such an error altogether with
probability 1/16, far above the rates above, and 8 with 1/256: at worst (two entries, a bug at
2 tol) 0.39 % at the look after 8 and 0.21 % at the last (a pass there needs at most 2 of 16
directions to see it), 0.6 % in all. Worse still is a gradient on the same two entries, each
invisible where the other is seen (fn of two parameters, gradient [1, 1], error [d, -d]):
1.3 % at 2 tol, 0.4 % at 3 tol (simulated in the tests). Gaussian directions see every
error along every direction (e . v is normal with variance |e|^2), so the F(n, n) rates
hold as stated for any structure. The default "uniform" directions, random signs times one
of 128 evenly spaced magnitudes, cost what signs cost to draw and behave as Gaussian ones
here: the two-entry error vanishes along 1 in 256 of them and is small only where two
magnitudes happen to be close (as likely as a Gaussian projection near zero), so they look
first after 4 within the same bounds (simulated: 0.4 % for that error at 2 tol, 1.0 % with the
gradient on the same two entries, and no pass far beyond the tolerance). Neither miss happens
with at most 16 parameter elements in all, whose random signs span them
(`_directions.spanning_signs`, whatever the kind but Gaussian): every block of 8 (16 above 8
elements) sees the error at its exact size, and their looks are those of random signs (a
first look at 4 of a block of 8 would miss the two-entry error 1 time in 70). Where fn is
scalar (no random cotangent) and no derivative map of an order >= 2 check (no fixed random
vectors), a look at whole blocks measures the error with no sampling error: it settles as
soon as the error is off the tolerance, either way, by more than the finite differences'
noise floor (c_n = 1, `Run.exact_at`).

Only plain verdicts stop early: every comparison resolved, relative (not absolute), judged
against its fixed floor (not a tolerance estimated from the noise or rounding measured along
these few directions), its interval clear of it, every direction finite and smooth, none
flat; with two more ways to settle:

- A float32 (or lower) derivative whose rounding is measured against the same rule in
  float64 settles as a pass when that rule's own error is clear below the rounding
  (`explained_by_rounding`): its error is then its rounding, within its tolerance whether
  that is the floor or rests on the rounding, and the rule comparisons, on their fixed
  floors, decide. This is the usual case of a correct float32 model of a million
  parameters or more, whose gradient rounds to a few 1e-7, near the floor 10 eps.
- A comparison whose tolerance was estimated settles as a pass clear below the fixed
  floor (so below any tolerance at or above it: the bounds above hold with tol the
  floor), and as a fail beyond c_n² times the estimated tolerance (the error and the noise
  or rounding each within c_n of their true values).

Anything else (kinks, a noisy or coarse reference, a float64 fn whose own roundoff sets the
tolerance, a stationary point) takes all K directions, as a fixed-K check does.
"""

import functools
import math

import numpy as np

from . import _differences, _evaluate, _verdict
from ._error_model import SAFETY
from ._report import Status, check_kind

# the directions of the first look, by their kind
FIRST = {"uniform": 4, "gaussian": 4, "rademacher": 8}
EARLY_ERROR = 0.05  # at e = tol, the chance of an early stop on each side, all looks together


def looks(k: int, sequential: bool, kind: str = "uniform") -> tuple[int, ...]:
    """The numbers of directions after which the check looks: 4, 8, 16, ... (8, 16, 32, ...
    for random signs alone) and k last; just (k,) when not sequential or k is no more than
    the first look."""
    first = FIRST[kind]
    if not sequential or k <= first:
        return (k,)
    out = [first]
    while 2 * out[-1] < k:
        out.append(2 * out[-1])
    return (*out, k)


def clearance(n: int, num_looks: int) -> float:
    """The factor c_n by which an early look's estimate must clear the tolerance: the
    1 - beta quantile of err_n / e, sqrt of F(n, n)'s (exact; n is even at early looks);
    1 for `num_looks` 0, a look whose directions measure the error exactly."""
    if num_looks == 0:
        return 1.0
    beta = EARLY_ERROR / max(num_looks - 1, 1)
    w = _beta_quantile(n // 2, beta)  # F = W / (1 - W), W ~ Beta(n/2, n/2)
    return math.sqrt((1 - w) / w)


def clear(err: float, tol: float, n: int, num_looks: int, margin: float = 0.0) -> str | None:
    """Returns "pass" or "fail" when err over n directions is clear of tol at an early look of
    a sequence of `num_looks` looks, and by `margin` (the noise of an error measured with no
    sampling error); None while in doubt."""
    c = clearance(n, num_looks)
    if err * c + margin < tol:
        return "pass"
    if err / c - margin > tol:
        return "fail"
    return None


def error_bounds(k: int, kind: str = "uniform") -> tuple[float, float]:
    """(chance that a correct gradient is failed, that a bug at 2x the tolerance passes)
    for a maximum of k directions of `kind`, as bounded in the module docstring (for an odd
    k, the bound of k - 1, which is larger). F(n, n) is symmetric about 1 in log: both are
    equal."""
    ks = looks(k, True, kind)
    # early: err_n / e beyond 2 c_n either way; last: beyond 2 (F beyond 4, W beyond 4 / 5)
    early = sum(_f_tail(n, 4 * clearance(n, len(ks)) ** 2) for n in ks[:-1])
    bound = early + _f_tail(k, 4.0)
    return bound, bound


def _f_tail(n: int, x: float) -> float:
    """P(F(n, n) > x), n even (odd: that of n - 1)."""
    return 1 - _beta_cdf(n // 2, x / (1 + x))


@functools.lru_cache(maxsize=64)
def _beta_quantile(m: int, p: float) -> float:
    """The p quantile (p < 1/2) of Beta(m, m), by bisection."""
    lo, hi = 0.0, 0.5
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _beta_cdf(m, mid) < p else (lo, mid)
    return (lo + hi) / 2


def _beta_cdf(m: int, x: float) -> float:
    """P(W <= x) for W ~ Beta(m, m), m a positive integer: the chance of at least m
    successes in 2m - 1 trials of probability x."""
    t = 2 * m - 1
    return sum(math.comb(t, j) * x**j * (1 - x) ** (t - j) for j in range(m, t + 1))


def settled(
    p, checks, status: Status, n: int, num_looks: int, exact: bool = False
) -> tuple[bool, str]:
    """(whether the look at n directions settles the verdict, why or why not): it does for
    a plain pass or fail whose every comparison is clear of its tolerance; by the noise
    floor alone where the n directions measure the errors with no sampling error
    (`exact`, `Run.exact_at`)."""
    if exact:  # no sampling error: every early look is as good as the last, but for noise
        num_looks = 0
    if status not in (Status.PASS, Status.FAIL):
        return False, f"the check was {status.value}"
    if not p.fd.finite.all() or not p.fd.smooth.all():
        return False, "some directions were not smooth (a kink within the step)"
    flat = _verdict.flat_directions(p)
    if flat:
        return False, f"fn was flat along {flat[0]} of {len(p.fd.smooth)} directions"
    sides, head_below_floor, head_rounding = [], False, None
    for c in checks:
        if not c.judged:  # shown, not judged (the model's derivative of another function)
            continue
        # forward vs reverse is "absolute" whenever rounding puts RMS <J^T u, v> below the
        # finite differences' RMS; the finite-difference rows tell a zero derivative
        absolute = c.absolute and check_kind(c.name)[0] != "consistency"
        if c.num_used != n or absolute or not c.resolved:
            return False, "fn's derivative was zero to within noise (an absolute comparison)"
        if c.noise_floor > _verdict.MAX_NOISE_FLOOR or not math.isfinite(c.relative_error):
            return False, "the finite differences were too noisy"
        estimated = SAFETY * math.hypot(c.noise_floor, c.rounding) >= c.tolerance
        margin = c.noise_floor if exact else 0.0
        side = None if estimated else clear(c.relative_error, c.tolerance, n, num_looks, margin)
        if side is None:
            # a float32 derivative whose error is its rounding, measured against the same
            # rule in float64: within its tolerance, whether that is the floor or rests
            # on the rounding
            unexplained = explained_by_rounding(c, checks, n, num_looks)
            if unexplained is not None:
                sides.append("pass")
                if c is checks[0]:
                    head_rounding = unexplained
                continue
        if estimated:
            # the tolerance itself was estimated (from the noise or rounding measured along
            # these few directions), not the fixed floor the error rates are stated for;
            # an estimate clear below that floor is clear below any tolerance above it
            if clear(c.relative_error, c.floor, n, num_looks, margin) == "pass":
                sides.append("pass")
                head_below_floor |= c is checks[0]  # said in the reason below
                continue
            if c.relative_error - margin > c.tolerance * clearance(n, num_looks) ** 2:
                # beyond what the estimate of its tolerance can move: the error and the
                # noise or rounding are each within c_n of their true values
                sides.append("fail")
                continue
            far = c.tolerance > FAR * c.floor  # a few more directions will not bring it down
            if not far:
                more = f", {MEASURED_NEAR} {c.floor:.1e}"
            elif c.relative_error < c.floor:  # more directions may clear it below the floor
                more = (
                    f"; the relative error {c.relative_error:.1e} is below its floor "
                    f"{c.floor:.1e}, {NOT_YET_CLEAR}"
                )
            else:
                more = ""
            return False, (
                f"the tolerance {c.tolerance:.1e} rests on measured noise or rounding" + more
            )
        sides.append(side)
    head = checks[0]
    if status is Status.PASS and all(s == "pass" for s in sides):
        if head_below_floor:
            return True, (
                f"clear below the tolerance's floor {head.floor:.1e} (the tolerance "
                f"{head.tolerance:.1e} rests on measured noise or rounding)"
            )
        if head_rounding is not None:
            return True, (
                "within the distance of the derivative under test from the same rule in "
                f"higher precision, taken as its rounding (tolerance {head.tolerance:.1e}); "
                f"that rule's own error, {head_rounding:.1e}, is clear below it"
            )
        return True, f"clear below the tolerance {head.tolerance:.1e}"
    if status is Status.FAIL and "fail" in sides and None not in sides:
        failed = _verdict.head(checks, status)
        return True, f"clear above the tolerance {failed.tolerance:.1e}"
    lo, hi = head.interval
    return False, (
        f"the relative error ({lo:.1e}..{hi:.1e}, 95%) was {TOO_CLOSE} the tolerance "
        f"{head.tolerance:.1e} to tell"
    )


def explained_by_rounding(c, checks, n: int, num_looks: int) -> float | None:
    """The error of comparison `c` that its rounding does not explain, when `c` measures
    its rounding against the same rule in higher precision (`rounding_measured`) and
    passes by a margin that more directions will not take away; else None.

    For the derivative under test, a = a_ref + rho (its rounding, measured: `c.rounding`
    is RMS rho) and a_ref = R + e (the rule's own error, with the finite differences' noise:
    the error of the same-rule comparison), so err <= RMS e + RMS rho, within the tolerance
    SAFETY RMS rho as long as RMS e <= (SAFETY - 1) RMS rho. Both are projections of fixed
    vectors on the same random directions, so their ratio over n directions estimates the
    true one to within the factor c_n of an early look (`clearance`): it settles when
    RMS e c_n <= (SAFETY - 1) RMS rho (and then err <= SAFETY RMS rho is within any
    tolerance, the floor or one that rests on the rounding). Forward against reverse mode
    differ by their two rule errors plus the difference of their roundings, at most
    sqrt(2) times the rounding the comparison measures (their hypot): it settles when the
    rule errors of both modes together, times c_n, stay within (SAFETY - sqrt(2)) of it.
    Then the rule comparisons decide on their own fixed floors, and the rule's error, not
    the rounding, is what a wrong rule shows in. (A rule wrong in float32 alone shows in
    the rounding: its tolerance rests on that rounding at every look, so settling early
    leaves its verdict as a fixed-K check gives it.)"""
    if not c.rounding_measured or not c.rounding > 0:
        return None
    kind, mode = check_kind(c.name)
    rules = [d for d in checks if check_kind(d.name)[0] == "rule"]
    if kind == "tested":
        rules = [d for d in rules if check_kind(d.name)[1] == mode]
        margin, needed = SAFETY - 1, 1
    elif kind == "consistency":
        margin, needed = SAFETY - math.sqrt(2), 2
    else:
        return None
    if len(rules) != needed:
        return None
    unexplained = sum(d.relative_error for d in rules)
    if unexplained * clearance(n, num_looks) <= margin * c.rounding:  # (False for NaN)
        return unexplained
    return None


# the reasons for doubt that more directions resolve: an error too close to the tolerance;
# a tolerance that noise or rounding measured along a few directions put just above its
# floor (within FAR times it); or one far above it, with the error below that floor but not
# yet clear of it
TOO_CLOSE = "too close to"
MEASURED_NEAR = "near its floor"
NOT_YET_CLEAR = "not yet clearly"
FAR = 2.0


def next_look(ks, i: int, why: str) -> int:
    """The look after look number i, in doubt for the reason `why`: the next one when the
    error was too close to the tolerance, or the tolerance rests on noise or rounding measured
    just above its floor, or far above it with the error below the floor but not yet clear
    of it, which more directions resolve; else straight the last one. Kinks, flat
    directions, a noisy reference or a tolerance that rests on measured noise or rounding
    far above its floor with the error above that floor stop no early look, so the looks in
    between would only cost their programs' fixed work (the gradients at the centre,
    computed by every call). Fewer looks leave the error rates within their bounds."""
    resolvable = (TOO_CLOSE, MEASURED_NEAR, NOT_YET_CLEAR)
    return i + 1 if any(r in why for r in resolvable) else len(ks) - 1


def step_fits(run, p, checks, n: int) -> bool:
    """Whether the step a first look chose on fewer directions fits these n as well:
    they are all smooth, fn is not flat along them, and the check (`checks`) is not
    inconclusive (otherwise the step is chosen again on all n, as a check of n
    directions does)."""
    if not p.fd.smooth.all() or _verdict.flat_directions(p) is not None:
        return False
    return _verdict.status(run, p, checks, n, []) is not Status.INCONCLUSIVE


def evaluate(run, index, rows, h, offsets) -> dict:
    """`_evaluate.evaluate`, evaluating only the directions not evaluated before in this
    check (same direction index, step sizes, step, stencil points, precision and modes):
    a later look re-runs the ladder over all its directions and pays for the new ones."""
    keys = [_key(run, i, r, h, offsets) for i, r in zip(index, rows)]
    first = {}
    for j, key in enumerate(keys):
        if key not in run.evaluated:
            first.setdefault(key, j)
    missing = list(first.values())
    if missing:
        state = _state(run)
        out = _evaluate.evaluate(run, index[missing], rows[missing], h, offsets)
        for pos, j in enumerate(missing):
            key = _key(run, index[j], rows[j], h, offsets)
            run.evaluated[key] = {
                name: None if v is None else np.asarray(v[pos]) for name, v in out.items()
            }
        if _state(run) != state:
            # the precision or the modes changed on the way (fn could not run in float64,
            # or has no jvp): what was kept before belongs to the old ones
            return evaluate(run, index, rows, h, offsets)
    found = [run.evaluated[key] for key in keys]
    return {
        name: None if found[0][name] is None else np.stack([f[name] for f in found])
        for name in found[0]
    }


def evaluate_full(run, index, rows, h) -> dict:
    """The full stencil, as `_evaluate.evaluate_full`, from kept evaluations where it can."""
    outer = evaluate(run, index, rows, h, _differences.OUTER)
    return _evaluate.complete(outer, evaluate(run, index, rows, h, _differences.INNER))


def _key(run, i, row, h, offsets) -> tuple:
    return (int(i), np.asarray(row, np.float64).tobytes(), float(h), tuple(offsets), *_state(run))


def _state(run) -> tuple:
    # by name: a NumPy dtype compares equal to None (np.dtype(None) is float64)
    reference = None if run.reference is None else run.reference.name
    return reference, run.cast, tuple(run.modes)
