"""`check_grads`: a drop-in for `jax.test_util.check_grads` that runs jaxcheck's check.

The positional arguments of `f` become the parameter pytree (a tuple) of one `verify` call;
JAX's `modes` and `order` map onto its `mode` and `order`, and JAX's tolerances become floors
under jaxcheck's own derived tolerance (see `check_grads` for exactly how).
"""

import dataclasses
import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from . import (
    _closure,
    _evaluate,
    _fingerprint,
    _host,
    _keywords,
    _options,
    _pipeline,
    _plan,
    _precision,
    _problem,
    _rule_search,
    _tree,
    _verdict,
    _verify,
)
from ._error_model import Comparison
from ._errors import GradientCheckError
from ._report import Report, Status, apart

MODES = {"fwd": "forward", "rev": "reverse", "lin": "forward"}
# The loosest floor a JAX-style tolerance can set: a zero or sign-flipped gradient has a
# relative error of 1 or more, and the floor must stay below what verify accepts (< 1).
MAX_FLOOR = _options.MAX_RTOL
# The floor a tolerance left unset stands for: JAX's default for float64, the tightest of
# its per-dtype defaults. Derivatives that are approximate by design (an ODE solver's
# adjoint, an iterative solve to its tolerance) differ from finite differences of the
# function by about the solver's tolerance, which JAX's check passes; a bug of 0.1 % still
# fails in every dtype.
DEFAULT_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One `check_grads` call: its report and what it means for a test.

    `verdict` is "pass", "fail" (a wrong derivative, or a NaN/Inf derivative where `f` is
    finite) or "unjudged" (nothing to judge: a kink at the point, or `f` itself NaN/Inf at
    or next to it; JAX's check_grads counts NaN equal to NaN there).
    """

    report: Report | None  # None when there is nothing to check (`empty` says why)
    verdict: str
    empty: str = "every floating-point argument is empty"

    @property
    def headline(self) -> str:
        """Status, relative error against tolerance, and the first problem noted, on one
        line: for a check of several orders that did not pass, those of the part (order and
        derivative map) that decided its status."""
        r = self.report
        if r is None:
            return f"{self.empty}, nothing to check; not judged"
        # (the parts of an order >= 2 check; those of a first-order one are its rule rows;
        # a pass's first note is the whole check's, as what was held fixed)
        orders = [p for p in r.parts if p.label.startswith("order ")]
        part = next((p for p in orders if p.status is r.status), None)
        part = None if r.status is Status.PASS else part
        parts = [r.status.value]
        if part is not None and part.label:
            parts.append(part.label)
        source = r if part is None else part
        if not math.isnan(source.relative_error):
            error, tolerance = apart(source.relative_error, source.tolerance)
            parts.append(f"relative error {error} (tolerance {tolerance})")
        note = _telling(source.problems, r.problems, self.verdict == "fail")
        if note:
            parts.append(note)
        if self.verdict == "unjudged":
            parts.append("not judged")
        return _in_check_grads_terms("; ".join(parts))


def _telling(own, whole, failed: bool) -> str:
    """The note a one-line headline quotes: for a failure, the one that says why (a wrong
    rule, a constant factor, a solver stopped at a tolerance, a gamma sample) where the
    notes of the part that decided (`own`) or of the whole check (`whole`) hold one; else
    the part's first, but a tolerance capped or a note on data cast for the reference (an
    inconclusive check's headline said that, where the reason was kinks)."""
    if failed:
        for start in ("wrong rule", _verdict.FACTOR, _pipeline.SOLVER_HINT, _pipeline.GAMMA_HINT):
            said = [q for q in (*own, *whole) if q.startswith(start)]
            if said:
                return said[0]
    aside = ("tolerance capped", *_evaluate.CAST_NOTES)
    notes = [q for q in own if not q.startswith(aside)] or list(own)
    return notes[0] if notes else ""


def _refusing_unknown_keywords(entry):
    """A misspelt keyword (JAX's `mode=` for `modes=`) named with the one meant, as
    verify's options are, instead of Python's bare unexpected-keyword error."""
    names = tuple(inspect.signature(entry).parameters)

    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        call = "check_grads(f, args, order, modes=..., atol=..., rtol=..., eps=...)"
        _keywords.refuse_unknown("check_grads", call, kwargs, names, args[0] if args else None)
        return entry(*args, **kwargs)

    return wrapper


@_refusing_unknown_keywords
def check_grads(
    f: Callable,
    args: Sequence[Any],
    order: int,
    modes: Sequence[str] = ("fwd", "rev"),
    atol: Any = None,
    rtol: Any = None,
    eps: float | None = None,
    *,
    raise_unjudged: bool = False,
) -> None:
    """Check the derivatives of `f` at `args` like `jax.test_util.check_grads`, with
    jaxcheck's calibrated check: `verify(lambda a: f(*a), tuple(args), order=order, mode=m)`.

    Every floating-point argument is differentiated (integer and other non-float arguments
    are held fixed; JAX's own check_grads cannot differentiate them either); when every one
    of them is empty there is nothing to check and it returns. `f` may return
    any pytree of float arrays. `modes` "fwd" (and JAX's "lin") check forward mode (jvp),
    "rev" reverse mode (vjp); both also check that the two agree. `order` is the highest
    order of derivatives checked, as in JAX.

    Tolerances. jaxcheck derives its tolerance for each check from the finite-difference
    error model (about 1e-6 for float32 against a float64 reference); JAX's values only
    loosen it, as a floor on the relative error
    `‖W(g̃ − g)‖ / ‖W g‖` (see `verify`) that counts as a bug:

    - `rtol`: the smallest relative error treated as a bug (verify's `rtol`). A dict keyed
      by dtype, as JAX accepts, gives the value for f's output dtype, as JAX looks it up
      (the strictest entry among several output dtypes; the arguments' lowest-precision
      float dtype where f cannot be traced abstractly). Values above 0.5 count as 0.5, as
      does a floor above 0.5 from `atol`, and the report's first note says so: a
      derivative that is zero has a relative error of 1, so a tolerance near 1 would pass
      it (a derivative more than 50 % off fails whatever `rtol` and `atol` say).
      Unset (None, 0, or a dict without that dtype), it stands for 1e-5, JAX's default
      for float64: a derivative that is approximate by design (an ODE solver's adjoint,
      an iterative solve to its tolerance) differs from finite differences of `f` by
      about the solver's tolerance, and JAX's check passes it. (`verify` has no such
      floor.)
    - `atol`: JAX's absolute tolerance keeps derivatives that are near zero from failing on
      finite-difference noise. jaxcheck judges such derivatives in absolute terms against
      its measured noise already, so `atol` acts as a relative floor too, no looser than
      what JAX's own check allows at f's scale: JAX compares the jvp along one random
      normal tangent entry by entry within n (atol + rtol |b|) for an output leaf of n
      entries b, and (reverse mode) one inner product p with a random cotangent within
      atol + rtol |p|, so where the derivative is large an absolute atol is a small
      relative error. The floor is the larger of `rtol` and the smaller of `atol` and
      rtol + atol / |b| (or / |p|; rtol there as JAX takes it, its default for the dtype
      where unset), from one jvp and one vjp of f along JAX's own random draws: with
      `atol=0.05` and derivatives near 100, a bug of 2 % fails, as in JAX.
    - `eps`: accepted and not used. JAX's fixed step suits one float32 difference; jaxcheck
      evaluates the differences in float64 on a step ladder that its error model moves away
      from roundoff, truncation and kinks, which a fixed step would undo.

    Loose values set to quiet JAX's false alarms still catch larger bugs: with
    `atol=rtol=0.2` a derivative 50 % off fails, and with the defaults one 0.1 % off fails.
    The floor is on the error of the whole derivative, not entry by entry as JAX's
    tolerances are: an error in one of n entries of equal size counts about 1/sqrt(n) of its
    size (with `atol=rtol=0.05`, one of 200 entries 50 % off is 3.5 % of the whole and
    passes, where JAX's elementwise comparison fails it). Leave the tolerances unset, or set
    them no looser than the error you need to see, where that matters.

    Args:
        f: function of the positional `args`, returning a pytree of float arrays.
        args: tuple or list of the arguments.
        order: highest derivative order to check (0 or below checks first derivatives,
            as JAX's check_grads does).
        modes: a sequence of "fwd", "rev" (and "lin", checked as "fwd").
        atol: absolute tolerance of JAX's check_grads; here a relative floor at f's
            scale (see above).
        rtol: smallest relative error treated as a bug (float, or dict keyed by dtype).
        eps: JAX's finite-difference step; not used (see above).
        raise_unjudged: also raise when there is nothing to judge (status "inconclusive",
            or "nonfinite" because `f` itself is NaN/Inf at or next to `args`). By default
            these return quietly, as JAX's check_grads does where it counts NaN equal to NaN;
            so does a check of empty arguments or outputs, with nothing to compare.
            Where `f` or `args` are NaN/Inf at some entries only, the others are judged
            (those outputs set to 0, the argument entries held fixed that are NaN/Inf or feed
            only those outputs; the report's first problem says how many), and a NaN/Inf
            derivative of an output that is finite fails.

    Returns:
        None.

    Raises:
        GradientCheckError: the derivative is wrong, or NaN/Inf where `f` is finite.
        TypeError, ValueError: bad inputs, saying which and what to pass; forward mode
            (modes with "fwd") through a jax.custom_vjp function, as in JAX.

    Example:
        >>> import jax.numpy as jnp, jaxcheck
        >>> jaxcheck.check_grads(lambda x, y: jnp.sin(x) * y, (jnp.ones(3), 2.0), order=1)
    """
    if not isinstance(raise_unjudged, bool | np.bool_):
        raise ValueError(
            f"check_grads: raise_unjudged must be True or False, got {raise_unjudged!r}."
        )
    outcome = run(f, args, order, modes, atol, rtol, eps)
    if outcome.verdict == "fail" or (raise_unjudged and outcome.verdict == "unjudged"):
        if outcome.report is None:
            raise GradientCheckError(None, f"jaxcheck.check_grads: {outcome.headline}")
        raise error(outcome.report)


def error(report) -> GradientCheckError:
    """The GradientCheckError of a report of check_grads, said in its terms."""
    said = str(report)
    # (JAX's derivatives of f that were checked: the mode's)
    derivatives = {"reverse": "JAX's vjp of f", "forward": "JAX's jvp of f"}.get(report.mode)
    if derivatives is not None:
        said = said.replace("(autodiff, or your grad_fn)", f"({derivatives})")
    return GradientCheckError(report, _in_check_grads_terms(said))


def run(f, args, order, modes=("fwd", "rev"), atol=None, rtol=None, eps=None) -> Outcome:
    """`check_grads` without raising: the report and its verdict."""
    token = _verify.KINKS_LEFT_TO_CALLER.set(True)  # (held here: `_kinked_outcome`)
    try:
        return _run(f, args, order, modes, atol, rtol, eps)
    finally:
        _verify.KINKS_LEFT_TO_CALLER.reset(token)


def _run(f, args, order, modes, atol, rtol, eps) -> Outcome:
    if not callable(f):
        raise TypeError(f"check_grads: f must be callable, got {type(f).__name__}.")
    unpacked = None if isinstance(args, tuple | list) else type(args).__name__
    if unpacked:
        # as JAX's check_grads takes them, tuple(args): an array's rows are f's arguments
        # (a suite passing jnp.array([0.3]) for f(0.3) passes there); a dict's keys or a
        # string's characters never are what was meant
        try:
            if isinstance(args, str | bytes | Mapping):
                raise TypeError
            args = tuple(args)
        except TypeError:
            raise TypeError(
                f"check_grads: args must be a tuple or list of f's positional arguments, got "
                f"{type(args).__name__}. For one argument x, pass (x,)."
            ) from None
    order, eps, atol, rtol = _options.whole(order), *map(_options.scalar, (eps, atol, rtol))
    if isinstance(order, float) and math.isfinite(order):
        # (JAX's check_grads counts a float order down by one per derivative while it is
        # above 1: order 1.5 checks second derivatives, as 2 does)
        order = math.ceil(order)
    if not isinstance(order, int) or isinstance(order, bool):
        raise ValueError(f"check_grads: order must be an int (the highest order), got {order!r}.")
    order = max(order, 1)  # (JAX's check_grads checks first derivatives at order <= 0 too)
    if order > _options.MAX_ORDER:
        raise ValueError(
            f"check_grads: order={order} is above the largest supported, "
            f"{_options.MAX_ORDER}: each order nests one more derivative map, and the programs "
            "grow about twofold per order."
        )
    _check_step(eps)
    args = tuple(args)
    _tree.refuse_unsortable_keys(args, "check_grads: args")
    with _tree.settled(args, lambda p: f(*p)) as settled:
        return _judged(f, settled, order, modes, atol, rtol, eps, unpacked)


def _raised_by_f(err: Exception) -> bool:
    """Whether `err` was raised by f's own code (or by JAX inside it), not by jaxcheck
    about f: the innermost frame of its traceback lies outside jaxcheck's package."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return not path.startswith(_rule_search.OWN_DIR)


def _judged(f, params, order, modes, atol, rtol, eps, unpacked) -> Outcome:
    """`_run` with args checked and settled: the check itself, and its outcome."""
    mode = _mode(modes)
    wanted = _wanted_floor(f, atol, rtol, params, mode)
    options = _options.Options(order=order, mode=mode, rtol=min(wanted, MAX_FLOOR))
    floats = [x for x in jax.tree.leaves(params) if _inexact(x)]
    if floats and not any(np.size(x) for x in floats):
        # a derivative with respect to empty arrays is empty: JAX's check passes there
        # too, and nothing is raised; a plugin's summary lists it as not judged
        return Outcome(None, "unjudged")
    try:
        keyed, held = _keyed(f, params, order)
        # (the arrays f closes over enter as they are, as its constants did)
        token = _tree.ARGS_AS_THEY_ARE.set(held)
        try:
            report = _verify.run(keyed, params, held, options)
        finally:
            _tree.ARGS_AS_THEY_ARE.reset(token)
    except (TypeError, ValueError) as err:
        if str(err).startswith(_problem.EMPTY_OUTPUT):
            # no derivative to compare: JAX's check passes (nothing is raised in a test)
            return Outcome(None, "unjudged", "every output of f is empty")
        if type(err) not in (TypeError, ValueError) or str(err).startswith("check_grads: "):
            raise
        if _raised_by_f(err) and not (unpacked and isinstance(err, TypeError)):
            raise  # (f's own error, as JAX's check raises it: a test may match its text)
        hint = ""
        if unpacked and isinstance(err, TypeError):
            hint = (
                f" (args was a {unpacked}, which check_grads unpacks as JAX's does, "
                f"tuple(args): its {len(params)} rows were f's positional arguments; for one "
                "argument x, pass (x,))"
            )
        raise type(err)("check_grads: " + _in_check_grads_terms(str(err)) + hint) from err
    if options.mode == "both" and any(_evaluate.NO_JVP in p for p in report.problems):
        raise TypeError(
            f"check_grads: modes={modes!r} asks for forward mode (jvp), but f contains a "
            "jax.custom_vjp function, which has no jvp (jax.test_util.check_grads raises "
            f"here too: {_evaluate.JAX_NO_JVP}). Pass modes=('rev',) to check its custom rule "
            "in reverse mode."
        )
    # (the programs of the checks below kept under what f computes, as the check's own are,
    # so that checking f again there compiles none of them; they close over f's data: f's
    # own fingerprint, taken where they run, not at every check)
    if report.status is not Status.NONFINITE:
        outcome = Outcome(report, STATUS_VERDICT[report.status])
        if report.status is Status.INCONCLUSIVE:
            key = _unlifted_key(f, params, order, keyed)
            with _plan.own_transfers(), np.errstate(all="ignore"):  # (as below)
                outcome = _kinked_outcome(f, params, options, report, key) or outcome
    else:
        # (jaxcheck's own transfers, allowed under a caller's transfer guard as in the check;
        # f read at the point and beside it, where NumPy arguments of a NaN/Inf f make NumPy
        # warn, which a suite that turns warnings into errors raises: JAX's check never
        # evaluates f at the point itself)
        key = _unlifted_key(f, params, order, keyed)
        with _plan.own_transfers(), np.errstate(all="ignore"):
            outcome = _nonfinite_outcome(f, params, report, options, key)
    if wanted <= MAX_FLOOR:
        return outcome
    note = _capped(wanted, atol, rtol, _tolerance_dtypes(f, atol, rtol, params, mode))
    r = outcome.report
    return dataclasses.replace(outcome, report=dataclasses.replace(r, problems=(note, *r.problems)))


def _keyed(f, params, order: int) -> tuple:
    """(f keyed by what it computes, as `Positional`, and the arrays it is given after its
    arguments): the arrays f closes over taken as arguments where f traces so
    (`_closure`), so that a new lambda over new data of the same shapes runs the programs
    compiled for the first; f as it is otherwise."""
    with _host.x64_as_checked(params):
        lifted = _closure.lift(f, params)
        if lifted is not None:
            g, held = lifted
            fingerprint = _fingerprint.of(g, *params, *held, order=order)
            if fingerprint is not None:
                return Positional(g, fingerprint), held
        return Positional(f, _fingerprint.of(f, *params, order=order)), ()


def _unlifted_key(f, params, order: int, keyed: "Positional"):
    """A hashable stand-in for f itself (its programs close over the arrays it does), or
    None where f cannot be traced."""
    if keyed.f is not f:  # (lifted: f's own fingerprint)
        with _host.x64_as_checked(params):
            keyed = Positional(f, _fingerprint.of(f, *params, order=order))
    return keyed if keyed.fingerprint is not None else None


def _capped(wanted: float, atol, rtol, dtypes) -> str:
    """The report's note where the floor asked for is above `MAX_FLOOR`."""
    r, a = (_tolerance_value(name, t, dtypes) for name, t in (("rtol", rtol), ("atol", atol)))
    said = f"atol={a!r} (at f's scale a relative error of {wanted:.1e})"
    if r is not None and r >= wanted:
        entry = " (its entry for f's output dtype)" if isinstance(rtol, dict) else ""
        said = f"rtol={r!r}{entry}"
    return (
        f"tolerance capped: {said} was taken as {MAX_FLOOR}, the loosest tolerance "
        "check_grads applies to the relative error of the whole derivative (a derivative "
        "that is zero or has the wrong sign is 1 or more off, so a tolerance near 1 would "
        f"pass it); a derivative more than {MAX_FLOOR:.0%} off fails whatever rtol and atol "
        f"say. Pass rtol and atol of at most {MAX_FLOOR} to be judged by them as given"
    )


def _nonfinite_outcome(f, params, report, options, key=None) -> Outcome:
    """The verdict of a check that met NaN/Inf: where f itself is NaN/Inf, or at the edge
    of its domain, judged on its finite part or not judged (as JAX's check_grads, which
    counts NaN equal to NaN). `key`: a hashable stand-in for f, for the programs of those
    checks to be kept."""
    with jax.debug_nans(False), jax.debug_infs(False):  # f at the point, read once
        outputs = f(*params)
    verdict = _nonfinite_verdict(report, params, outputs)
    if verdict == "unjudged" and _nonfinite_derivative_at(f, params, outputs, options.mode):
        # f finite at arguments NaN/Inf themselves (softplus at -inf): a NaN/Inf derivative
        # fails there, as where f is finite everywhere (JAX's check compares it with
        # finite differences, which are 0 along infinite entries)
        note = (
            "f's arguments are NaN/Inf at the point and f is finite there, but its "
            "derivative is NaN/Inf (which fails, as it does where f is finite everywhere)"
        )
        return Outcome(dataclasses.replace(report, problems=(note, *report.problems)), "fail")
    edge = _nonfinite_nearby(f, params) if verdict == "fail" else None
    if edge is not None:
        verdict = "unjudged"
        note = (
            "f is finite at the point but NaN/Inf right next to it: the point is at the edge "
            "of f's domain (x log x or sqrt at 0), where an infinite derivative is the "
            "one-sided limit, and finite differences have nothing to compare (not judged)"
        )
        report = dataclasses.replace(report, problems=(*report.problems, note))
    if verdict == "unjudged":
        judged = _finite_part_outcome(f, params, outputs, options, key)
        if judged is None and edge is not None:
            n = _count(edge)
            judged = _held_part_outcome(
                f,
                _inside(f, params, edge),
                edge,
                options,
                f"f is at the edge of its domain at {n} argument "
                f"{'entry' if n == 1 else 'entries'} (its derivative NaN/Inf there, f NaN/Inf "
                "right next to it); the derivative was judged at the other entries, holding "
                "those fixed (a step of 1e-6 into the domain, where f's derivative is finite)",
                key,
            )
        if judged is not None:
            return judged
    return Outcome(report, verdict)


def _inside(f, params, edge) -> tuple:
    """`params` with the entries `edge` (per real float leaf) moved by 1e-6 of themselves
    (of their leaf's RMS where they are 0) to the side where f and its derivative are
    finite, as `_nonfinite_nearby` moves them: held there, they leave no 0 times an
    infinite derivative in forward mode. `params` itself where neither side is."""
    of, floats = _of_floats(f, params, complex_too=False)
    with jax.debug_nans(False), jax.debug_infs(False):
        for sign in (1.0, -1.0):
            moved = _moved_off(floats, edge, sign)
            try:
                out, pullback = jax.vjp(of, *moved)
                grads = pullback(jax.tree.map(_tree.unit_like, out))
            except Exception:  # noqa: BLE001 - f refuses the moved point: try the other side
                continue
            if _all_finite(out) and _all_finite(grads):
                leaves, treedef = jax.tree.flatten(list(params))
                at = iter(moved)
                leaves = [
                    _like(np.asarray(next(at)), x) if _inexact(x) and not jnp.iscomplexobj(x) else x
                    for x in leaves
                ]
                return tuple(jax.tree.unflatten(treedef, leaves))
    return params


def _held_part_outcome(f, params, held, options, note: str, key=None) -> Outcome | None:
    """Judge `f` with the argument entries `held` (per real float leaf of `params`) fixed
    at the point, and its outputs that a held entry makes NaN in forward mode (0 times an
    infinite derivative) replaced by 0: the pass or fail of that check, else None. `key`:
    a hashable stand-in for f (`_FinitePart.key`)."""
    leaves = jax.tree.leaves(params)
    if any(_inexact(x) and jnp.iscomplexobj(x) for x in leaves):
        return None  # (`held` covers the real leaves only)
    with jax.debug_nans(False), jax.debug_infs(False):
        part = _FinitePart.holding(f, params, held)
        if part is None:
            return None
        xs, outputs = part._floats_function(leaves)
        try:
            zeros = [jnp.zeros_like(x) for x in xs]
            tangents = jax.jvp(outputs, (xs,), (zeros,))[1]
        except Exception:  # noqa: BLE001 - no forward mode (a custom_vjp): mask nothing
            tangents = [np.zeros(m.shape) for m in part.masked]
    masked = tuple(~np.isfinite(np.asarray(t)) for t in tangents)
    if all(m.all() for m in masked):
        return None  # every output meets a held entry's infinite derivative
    part = dataclasses.replace(part, masked=masked, filled=params, note=note, key=key)
    report = _verify.run(part, params, (), options)
    if report.status not in (Status.PASS, Status.FAIL):
        return None
    report = dataclasses.replace(report, problems=(note, *report.problems))
    return Outcome(report, STATUS_VERDICT[report.status])


# The most argument entries that are each moved alone to find where f has kinks, and the
# most values (4 moved points per entry, each of all the arguments and outputs) that search
# evaluates at once.
MAX_KINK_ENTRIES = 1024
MAX_KINK_VALUES = 2**24


def _kinked_outcome(f, params, options, report: Report, key=None) -> Outcome | None:
    """Where a check is inconclusive for kinks: find the argument entries at which f has one
    (`_one_sided`), and judge the derivative at the others, holding those fixed, as JAX's
    check_grads would see a wrong derivative at them. None where none is found, or the
    rest cannot be judged either. `key`: a hashable stand-in for f, for the programs of
    that search and check to be kept (a warm check at a kink compiled 5 of them anew)."""
    kinks, lowest, g, order, outside = None, None, f, options.order, None
    for k in range(order):  # f, then its derivative maps up to the one checked at `order`
        try:
            with jax.debug_nans(False), jax.debug_infs(False):
                found = _one_sided(g, params, key=key and (key, "derivative", k))
                if found is not None and k == 0:
                    outside = _outside_slopes(f, params, found[1], key=key)
                g = _unit_derivative(g, params) if k + 1 < order else g
        except Exception:  # noqa: BLE001 - f refuses the moved points: what was found stands
            break
        if found is not None:
            found = found[0]
            kinks = found if kinks is None else [a | b for a, b in zip(kinks, found)]
            lowest = k if lowest is None else lowest
    if kinks is None:
        return None
    n = _count(kinks)
    which = {0: "f", 1: "f's first derivative"}.get(lowest, f"f's derivative of order {lowest}")
    held = _held_part_outcome(
        f,
        params,
        kinks,
        options,
        f"{which} has a kink (one-sided slopes that differ) at {n} argument "
        f"{'entry' if n == 1 else 'entries'}, found by moving each entry alone; the "
        "derivative was judged at the other entries, holding those fixed",
        key,
    )
    if outside is None:
        return held
    return Outcome(outside_fails(held.report if held else report, outside), "fail")


def _unit_derivative(f, params):
    """f's derivative map along the unit tangent (every real float argument entry moved by
    1; by the pullback of unit cotangents where f has no forward mode), as a function of
    the same arguments: where a partial derivative of f has a kink in an entry, it shows
    when that entry alone moves."""
    treedef = jax.tree.structure(list(params))
    of, _ = _of_floats(f, params, complex_too=False)
    where = [
        i
        for i, x in enumerate(jax.tree.leaves(list(params)))
        if _inexact(x) and not jnp.iscomplexobj(x)
    ]

    def derivative(*args):
        leaves = jax.tree.leaves(list(args))
        if jax.tree.structure(list(args)) != treedef:
            raise ValueError("the arguments changed structure")
        xs = [jnp.asarray(leaves[i]) for i in where]
        try:
            return _along_units(of, xs, "forward")[0]
        except TypeError:  # a custom_vjp: no forward mode
            return _along_units(of, xs, "reverse")[0]

    return derivative


@dataclasses.dataclass(frozen=True)
class Kink:
    """f's one-sided slopes at the entry `entry` (flat) of its float leaf `leaf`, each a
    vector over f's flattened outputs (extrapolated to a step of 0 from h and h/2), and the
    margin within which a derivative counts as between them (inf where the sides are not
    smooth at the step: a jump, or curvature the step spans)."""

    leaf: int
    entry: int
    up: np.ndarray
    down: np.ndarray
    margin: float
    step: float  # the step the entry was moved by


def _batched(f, batch) -> Callable:
    """`jax.vmap(f)` over the leading axis of the arrays `batch`, or `lax.map` of f where
    vmap would change what f does (`_problem.unbatched`: a cond with a while_loop in a
    branch, whose loop vmap would run at the inputs of the branch not taken)."""
    try:
        closed = jax.make_jaxpr(f)(*[x[0] for x in batch])
    except Exception:  # noqa: BLE001 - f's own error comes from its call
        return jax.vmap(f)
    if not _problem.unbatched(closed.jaxpr):
        return jax.vmap(f)
    return lambda *xs: jax.lax.map(lambda ys: f(*ys), xs)


def _one_sided(f, params, share: float = 0.05, wide: bool = False, key=None) -> tuple | None:
    """Where f has kinks: (per real float leaf of `params`, True at the entries where f's
    one-sided slopes, each entry moved alone up and down by a step h and by h/2, differ by
    more than rounding, by more than `share` of their size, and by a jump that does not
    shrink with the step, as a smooth f's difference of slopes (its curvature times h)
    does; the `Kink` of each entry so marked). None where there are none, or too many
    entries to move one by one (`MAX_KINK_ENTRIES`), or complex ones. `wide`: f is
    evaluated in float64 where it runs there (a kink whose slopes differ by less than
    float32's rounding of f over the step shows), else in its own precision. `key`: a
    hashable stand-in for f, for its program to be kept (`_plan.run_once`)."""
    if wide:
        try:
            with _precision.x64_scope(True):
                leaves = jax.tree.leaves(list(params))
                wider = [
                    np.asarray(x, np.float64) if _inexact(x) and not jnp.iscomplexobj(x) else x
                    for x in leaves
                ]
                treedef = jax.tree.structure(list(params))
                return _one_sided(f, jax.tree.unflatten(treedef, wider), share, key=key)
        except Exception:  # noqa: BLE001 - f refuses float64: in its own precision
            pass
    of, floats = _of_floats(f, params, complex_too=False)
    leaves = [x for x in jax.tree.leaves(list(params)) if _inexact(x)]
    n = sum(int(np.size(x)) for x in floats)
    if len(floats) != len(leaves) or not 0 < n <= MAX_KINK_ENTRIES:
        return None
    outputs = jax.eval_shape(lambda *xs: _flat_outputs(of(*xs)), *floats).size
    if 4 * n * (n + outputs) > MAX_KINK_VALUES:
        return None
    points = [np.asarray(x) for x in floats]
    steps, moves, columns = [], [], []  # per column (leaf j, entry i): its step; moved points
    for j, x in enumerate(points):
        a = np.abs(x.astype(np.float64)).ravel()
        rms = float(np.sqrt(np.mean(np.square(a)))) if a.size else 0.0
        rel = min(float(np.finfo(x.dtype).eps) ** (1 / 3), 0.05)
        for i in range(x.size):
            h = rel * (a[i] if a[i] > 0 else (rms if rms > 0 else 1.0))
            steps.append(h)
            columns.append((j, i))
            for scale in (1.0, -1.0, 0.5, -0.5):
                moved = [y.copy() for y in points]
                flat = moved[j].reshape(-1)
                flat[i] = flat[i] + scale * h
                moves.append(moved)
    # (the point itself last, from the same program: one kept from an earlier check of
    # this fn holds the values fn closed over then, as its other programs do)
    moves.append([y.copy() for y in points])
    batch = [jnp.asarray(np.stack([m[j] for m in moves])) for j in range(len(points))]
    if key is not None:  # (`of` closes over params' other leaves)
        held = [_tree.digest(x) for x in jax.tree.leaves(list(params)) if not _inexact(x)]
        key = ("one-sided", key, jax.tree.structure(list(params)), tuple(held))
    evaluate = _batched(lambda *xs: _flat_outputs(of(*xs)), batch)
    values = _plan.run_once(evaluate, *batch, key=key)
    values = np.asarray(values, np.float64)
    centre, values = values[-1].ravel(), values[:-1].reshape(n, 4, -1)
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(centre))):
        return None
    eps = max(float(np.finfo(x.dtype).eps) for x in points)
    kinked = np.zeros(n, bool)
    found = []
    for c in range(n):
        h = steps[c]
        up, down, half_up, half_down = values[c]
        jump = np.linalg.norm((up - centre) / h - (centre - down) / h)
        half = np.linalg.norm((half_up - centre) / (h / 2) - (centre - half_down) / (h / 2))
        size = np.linalg.norm(up - centre) / h + np.linalg.norm(centre - down) / h
        noise = 8 * eps * (np.linalg.norm(centre) + np.linalg.norm(up)) / (h / 2)
        kinked[c] = jump > max(share * size, 4 * noise) and half > 0.75 * jump
        if kinked[c]:
            # one-sided slopes at h and h/2, extrapolated (Richardson) to a step of 0; where
            # a side's slope moves by more than a quarter of the jump from h to h/2, the
            # sides are not smooth at this step (sin at 1e6, whose period the step spans):
            # no derivative is judged against them
            near_up, far_up = (half_up - centre) / (h / 2), (up - centre) / h
            near_down, far_down = (centre - half_down) / (h / 2), (centre - down) / h
            clean = (
                max(np.linalg.norm(near_up - far_up), np.linalg.norm(near_down - far_down))
                <= 0.25 * jump
            )
            margin = 0.05 * size + 8 * noise if clean else math.inf
            found.append(
                Kink(*columns[c], 2 * near_up - far_up, 2 * near_down - far_down, margin, h)
            )
    if not kinked.any():
        return None
    out, start = [], 0
    for x in points:
        out.append(kinked[start : start + x.size].reshape(x.shape))
        start += x.size
    return out, found


# the most kinks at which the derivative under test is compared with f's one-sided slopes,
# and the points nearby where it is evaluated too
MAX_KINKS_COMPARED = 64
NEARBY = 32


def _outside_slopes(f, params, kinks: list, names=None, key=None) -> tuple | None:
    """Where f's derivative (autodiff: forward mode, else reverse) at a kink entry is out
    of the range, per output of f and to within the kink's margin, of f's one-sided slopes
    there and of autodiff's derivatives at `NEARBY` points nearby: relu's derivative at 0
    given as 2, outside [0, 1], which holding the kink entries fixed leaves unjudged and
    JAX's check_grads fails. (a note saying where, the distance and its tolerance relative
    to the slopes' size), or None (nowhere, or not compared). `names`: the float leaves'
    names, for the note (else their positions). `key`: a hashable stand-in for f, for
    its programs to be kept (`_plan.run_once`)."""
    if not kinks or len(kinks) > MAX_KINKS_COMPARED:
        return None
    of, floats = _of_floats(f, params, complex_too=False)
    points = [jnp.asarray(x) for x in floats]

    def along(t):  # f's outputs with each kink entry moved by its entry of t
        moved = list(points)
        for c, k in enumerate(kinks):
            x = moved[k.leaf]
            moved[k.leaf] = x.ravel().at[k.entry].add(t[c].astype(x.dtype)).reshape(x.shape)
        return _flat_outputs(of(*moved))

    wide = jnp.result_type(float)
    t = jnp.zeros(len(kinks), wide)
    # the derivative at points nearby too, every kink entry moved at once by its step
    # times a normal draw, and by smaller fractions of it: at a tie of three entries
    # (top_k, cummax) JAX's derivative is the limit of gradients where they move together,
    # which moving each alone misses; where other kinks lie within the step (a ramp
    # between two kinks 1e-3 apart), so does the derivative between them
    draws = np.random.default_rng(0).normal(size=(NEARBY, len(kinks)))
    draws *= (16.0 ** -(np.arange(NEARBY) % 4))[:, None]
    nearby = jnp.asarray(draws * np.asarray([k.step for k in kinks]), wide)
    if key is not None:  # (`along` closes over params and the kinks' places)
        held = [_tree.digest(x) for x in jax.tree.leaves(list(params))]
        places = tuple((k.leaf, k.entry) for k in kinks)
        key = ("slopes", key, jax.tree.structure(list(params)), tuple(held), places)
    try:
        try:
            jacobian = _compiled_first(jax.jacfwd(along), t, key and (*key, "at", "forward"))
            around = _compiled_first(
                _batched(jax.jacfwd(along), (nearby,)), nearby, key and (*key, "near", "forward")
            )
        except TypeError:  # a custom_vjp: no forward mode
            jacobian = _compiled_first(jax.jacrev(along), t, key and (*key, "at", "reverse"))
            around = _compiled_first(
                _batched(jax.jacrev(along), (nearby,)), nearby, key and (*key, "near", "reverse")
            )
    except Exception:  # noqa: BLE001 - no derivative to compare
        return None
    jacobian = np.asarray(jacobian, np.float64).reshape(-1, len(kinks))
    around = np.asarray(around, np.float64).reshape(NEARBY, -1, len(kinks))
    outside = []  # (kink, its derivative, distance and margin relative to the slopes' size)
    for c, k in enumerate(kinks):
        # the box around the one-sided slopes and the nearby derivatives, per output
        seen = np.concatenate([k.up[None], k.down[None], around[:, :, c]])
        low, high = seen.min(axis=0), seen.max(axis=0)
        column = jacobian[:, c]
        distance = float(np.linalg.norm(np.maximum(low - column, 0) + np.maximum(column - high, 0)))
        size = max(float(np.linalg.norm(k.up)), float(np.linalg.norm(k.down)), 1e-300)
        if np.isfinite(distance) and distance > k.margin:
            outside.append((k, column, distance / size, k.margin / size))
    if not outside:
        return None
    k, column, relative, tolerance = max(outside, key=lambda found: found[2])
    leaf = f"float leaf {k.leaf} of the arguments" if names is None else names[k.leaf]
    where = f"at entry {k.entry} of {leaf}"
    # where one output moves (a real scalar f: its imaginary part, flattened beside it,
    # stays 0), the numbers themselves
    moving = np.flatnonzero(np.abs(k.up) + np.abs(k.down) + np.abs(column))
    i = int(moving[0]) if moving.size == 1 else None
    said = (
        f"{where}, {column[i]:.4g} against slopes {k.down[i]:.4g} (below) and {k.up[i]:.4g} (above)"
        if i is not None
        else f"{where}, a derivative of norm {np.linalg.norm(column):.3g} against slopes of "
        f"norms {np.linalg.norm(k.down):.3g} (below) and {np.linalg.norm(k.up):.3g} (above), "
        f"{relative:.2g} of their size outside the range of them and of the derivatives nearby"
    )
    n = len(kinks)
    # (in verify's words where it names params' leaves: fn, and entries of params)
    f, where = ("f", "argument") if names is None else ("fn", "params")
    entries = f"{len(outside)} of the {n} {where} entries" if n > 1 else f"the {where} entry"
    note = (
        f"{f}'s derivative at {entries} where {f} has a kink is not between its one-sided "
        "slopes there, nor within the derivatives at points nearby (no step of finite "
        f"differences gives it; JAX's check_grads fails it too): {said}"
    )
    return note, relative, tolerance


def _compiled_first(f, x, key=None):
    """f(x) compiled (eagerly, f's operations run one by one, and a small model's
    derivatives at 32 points took seconds; kept under `key`, `_plan.run_once`), or eagerly
    where that fails, as before (a custom_vjp's forward mode raises again there, and is
    caught as it was)."""
    try:
        return _plan.run_once(f, x, key=key)
    except Exception:  # noqa: BLE001 - eagerly, as before
        return f(x)


def outside_fails(report: Report, outside: tuple) -> Report:
    """`report`, failed for a derivative outside f's one-sided slopes at a kink (the
    `_outside_slopes` found: its note first, its row added and made the headline)."""
    note, relative, tolerance = outside
    row = Comparison(
        "derivative at kinks vs one-sided slopes",
        relative,
        (relative, relative),
        0.0,
        0.0,
        tolerance,
        1,
        False,
    )
    return dataclasses.replace(
        report,
        status=Status.FAIL,
        relative_error=relative,
        interval=(relative, relative),
        tolerance=tolerance,
        checks=(*report.checks, row),
        problems=(note, *report.problems),
    )


def _flat_outputs(outs) -> jax.Array:
    """f's float outputs as one real float64-or-default vector (real and imaginary parts)."""
    wide = jnp.result_type(float)
    parts = []
    for y in jax.tree.leaves(outs):
        if not _inexact(y):
            continue
        y = jnp.ravel(y)
        parts += [jnp.real(y).astype(wide), jnp.imag(y).astype(wide)]
    return jnp.concatenate(parts) if parts else jnp.zeros(0, wide)


@dataclasses.dataclass(frozen=True, eq=False)
class Positional:
    """f of a tuple of its positional arguments. Equal for the same f (or a new lambda of
    the same code over equal values) computing the same program (`_fingerprint.Keyed`), so
    that checking the same function again (a test calling check_grads on it several times,
    or a parametrized test making its lambda anew) reuses the programs compiled for it,
    while f changed in between (a global it reads, an attribute of its object) is checked
    anew, as JAX's check_grads, which keeps nothing, would."""

    f: Callable
    fingerprint: Any = None  # `_fingerprint.of(f, *args)`
    positional: ClassVar[bool] = True  # (f's own errors show f's arguments as given)

    def __call__(self, args, *held):  # (held: arrays f closes over, `_closure`)
        return self.f(*args, *held)

    __post_init__ = _fingerprint.Keyed.__post_init__
    __eq__ = _fingerprint.Keyed.__eq__
    __hash__ = _fingerprint.Keyed.__hash__
    _identity = _fingerprint.Keyed._identity


# verify's advice, said in check_grads' terms (its f, args and modes; no has_aux or grad_fn)
_TERMS = (
    ("mode='forward' needs", "modes=('fwd',) needs"),
    ("Use mode='reverse' to check", "Pass modes=('rev',) to check"),
    (
        " or move it into the auxiliary output with has_aux=True",
        " (check_grads differentiates every output of f)",
    ),
    (
        "; put anything else in an auxiliary output with has_aux=True.",
        ". check_grads differentiates every output of f and takes no auxiliary output: "
        "check a function that returns only f's arrays (for f returning (y, label): "
        "check_grads(lambda *a: f(*a)[0], args, order)).",
    ),
    ("params has no floating-point leaf", "args has no floating-point leaf"),
    ("Pass the parameters to check as float arrays", "Pass the arguments to check as float arrays"),
    (
        "pass its hand-written gradient: verify(fn, params, *args, grad_fn=grad_fn)",
        "pass its hand-written gradient to jaxcheck.verify(fn, params, *args, "
        "grad_fn=grad_fn) (check_grads takes none)",
    ),
    ("jaxcheck.verify runs on the host", "jaxcheck.check_grads runs on the host"),
    ("The params leaf [", "The args leaf ["),
    ("jaxcheck.verify: ", "jaxcheck.check_grads: "),
    ("(autodiff, or your grad_fn)", "(JAX's jvp and vjp of f)"),
    ("try another point or key.", "try another point."),
    ("jaxcheck differentiates (likely params[", "check_grads differentiates (likely args["),
    ("jaxcheck differentiates", "check_grads differentiates"),
    ("params hold float64 NumPy arrays", "args hold float64 NumPy arrays"),
    ("jax.jit cannot trace fn or grad_fn", "jax.jit cannot trace fn"),
    ("within the step of params", "within the step of args"),
    (" or params[", " or args["),
    (
        _problem.STATIC_HOW,
        "check_grads differentiates every floating-point argument, and passes it to f as an "
        "array. Hold that value fixed by closing over it: for args (x, a), "
        "check_grads(lambda x: f(x, a), (x,), order).",
    ),
    ("Call verify outside the transformation", "Call check_grads outside the transformation"),
    # (check_grads passes its args to verify as params: params[i] is args[i])
    (
        "params and args hold arrays committed to different devices (",
        "args hold arrays committed to different devices (",
    ),
    ("(params[", "(args["),
    ("; params[", "; args["),
    (
        "pass it as an argument instead: verify(fn, params, x)",
        "pass it in args instead: check_grads(f, (x, ...), order)",
    ),
)


def _in_check_grads_terms(message: str) -> str:
    for verify_said, said in _TERMS:
        message = message.replace(verify_said, said)
    # verify's "fn" is check_grads' "f" (not inside a call such as verify(fn, ...))
    return re.sub(r"(?<![\w(])fn(?=('s)?[ :;,)])", "f", message)


def _mode(modes) -> str:
    if isinstance(modes, str):  # JAX's `"fwd" in modes` lets a bare string through
        modes = (modes,)
    try:
        names = list(modes)
    except TypeError:
        raise TypeError(
            f"check_grads: modes must be a sequence of 'fwd'/'rev', got {modes!r}."
        ) from None
    unknown = [m for m in names if m not in MODES]
    if unknown:
        raise ValueError(
            f"check_grads: unknown mode(s) {unknown!r} in modes={modes!r}; use 'fwd' "
            "(forward, jvp), 'rev' (reverse, vjp), or both: modes=('fwd', 'rev')."
        )
    chosen = {MODES[m] for m in names}
    if not chosen:
        raise ValueError(
            "check_grads: modes is empty, so nothing would be checked; pass modes=('fwd', "
            "'rev'), ('fwd',) or ('rev',)."
        )
    return chosen.pop() if len(chosen) == 1 else "both"


def _check_step(eps) -> None:
    # JAX takes any finite step (0 for its default; a negative one mirrors the central
    # differences): all are accepted, and none is used
    if eps is not None and not (
        isinstance(eps, int | float | np.floating)
        and not isinstance(eps, bool)
        and math.isfinite(eps)
    ):
        raise ValueError(
            f"check_grads: eps must be a finite float, or None (JAX's default step), got {eps!r}."
        )


def _tolerance_value(name: str, tol, dtypes) -> float | None:
    """The value of a JAX-style tolerance for values of `dtypes`: a float, or a dict's
    strictest entry among them (None: unset, also where the dict has no entry for one of
    them: JAX then takes its default for that one, and the strictest applies)."""
    if tol is None:
        return None
    if isinstance(tol, dict):
        try:
            by_dtype = {np.dtype(k): v for k, v in tol.items()}
        except TypeError as err:
            raise TypeError(
                f"check_grads: {name} must be a float, a dict of floats keyed by dtype, or "
                f"None; a key of {tol!r} is not a dtype ({err}). Key it by dtypes, e.g. "
                f"{{np.float32: 1e-3, np.float64: 1e-5}}."
            ) from None
        found = [by_dtype[d] for d in dtypes if d in by_dtype]
        if not found or len(found) < len(dtypes):
            return None
        return _tolerance_value(name, min(found), dtypes)
    if isinstance(tol, bool) or not isinstance(tol, int | float | np.number):
        raise TypeError(
            f"check_grads: {name} must be a float, a dict of floats keyed by dtype, or None; "
            f"got {tol!r}."
        )
    if not tol >= 0:  # (NaN or negative; an infinite one is capped, as JAX's check passes)
        raise ValueError(f"check_grads: {name} must be a number >= 0, got {tol!r}.")
    return float(tol) or None  # JAX treats 0 as "use the default"


def _floor(f, atol, rtol, params, mode: str) -> float:
    """The relative floor verify's `rtol` gets from JAX-style `atol`/`rtol`: the one they
    ask for (`_wanted_floor`), at most `MAX_FLOOR`."""
    return min(_wanted_floor(f, atol, rtol, params, mode), MAX_FLOOR)


def _wanted_floor(f, atol, rtol, params, mode: str) -> float:
    """The relative floor JAX-style `atol`/`rtol` ask for (an unset one stands for
    `DEFAULT_FLOOR`), before `MAX_FLOOR` caps it: the larger of the two, where `atol` is
    no looser than the relative error JAX's own check allows at f's scale
    (`_relative_atol`)."""
    dtypes = _tolerance_dtypes(f, atol, rtol, params, mode)
    a = _tolerance_value("atol", atol, dtypes)
    r = _tolerance_value("rtol", rtol, dtypes)
    r = DEFAULT_FLOOR if r is None else r
    if a is None or a <= r:
        return max(DEFAULT_FLOOR if a is None else a, r)
    return max(r, min(a, _relative_atol(f, params, a, rtol, mode)))


def _tolerance_dtypes(f, atol, rtol, params, mode: str) -> list:
    """The dtypes whose entries of a tolerance dict apply: those of f's float outputs, as
    in JAX's check_grads, which looks each compared array's dtype up (the lowest-precision
    float argument's where f cannot be traced abstractly); in reverse mode it compares
    real inner products, so a complex output's real dtype (float32 for complex64), and
    with both modes the entries of both, the strictest of which applies (either check
    fails a derivative there)."""
    if not (isinstance(atol, dict) or isinstance(rtol, dict)):
        return []
    try:
        out = jax.eval_shape(f, *params)
        outs = {np.dtype(y.dtype) for y in jax.tree.leaves(out) if _inexact(y)}
        found = set(outs) if mode in ("forward", "both") else set()
        if mode in ("reverse", "both"):
            found |= {np.dtype(jnp.finfo(d).dtype) for d in outs}
    except Exception:  # noqa: BLE001 - f's own errors are raised by the check itself
        found = set()
    if not found:
        found = {np.dtype(jnp.result_type(x)) for x in jax.tree.leaves(params) if _inexact(x)}
        found = set(sorted(found, key=lambda d: float(jnp.finfo(d).eps))[-1:])
    return sorted(found, key=str)


# JAX's check_grads' default tolerances by dtype (`default_gradient_tolerance` of
# jax._src.public_test_util), which it uses for an rtol left unset or missing from a dict
_JAX_DEFAULT_RTOL = {
    "bfloat16": 1e-1,
    "float16": 1e-2,
    "float32": 2e-3,
    "float64": 1e-5,
    "complex64": 1e-3,
    "complex128": 1e-5,
}


def _jax_rtol(rtol, dtypes) -> float:
    """The rtol JAX's check_grads compares values of `dtypes` with (the largest, as it
    takes for a pair): the caller's, or its default for the dtype where unset; 0 is
    NumPy's default, 1e-7."""
    by_dtype = {np.dtype(k): v for k, v in rtol.items()} if isinstance(rtol, dict) else None
    found = []
    for d in map(np.dtype, dtypes):
        given = rtol if by_dtype is None else by_dtype.get(d)
        if given is None:
            found.append(_JAX_DEFAULT_RTOL.get(d.name, 1e-5))
        else:
            found.append(float(_options.scalar(given)) or 1e-7)
    return max(found, default=1e-5)


def _relative_atol(f, params, atol: float, rtol, mode: str) -> float:
    """The relative error JAX's check_grads allows at f's scale with these tolerances: it
    compares f's jvp along one random normal tangent v entry by entry, within
    n * (atol + rtol |b|) for an output leaf of n entries b, and in reverse mode the inner
    product <v, vjp(u)> with a random normal cotangent u within atol + rtol |<v, vjp(u)>|,
    rtol being the caller's (a float, or a dict's entry for the compared values' dtype) or
    JAX's default for that dtype (2e-3 for float32). So where the derivative is large, an
    absolute `atol` is a small relative one: the smallest of rtol + atol / scale over those
    comparisons (inf where none can be made)."""
    g, floats = _of_floats(f, params)
    rng = np.random.RandomState(0)  # JAX's draws, in its order: tangent, then cotangent
    tangent = [_random_like(rng, x) for x in floats]
    found = []
    with jax.debug_nans(False), jax.debug_infs(False), _plan.own_transfers():
        try:
            points = [jnp.asarray(x) for x in floats]
            if mode in ("forward", "both"):
                _, t_out = jax.jvp(
                    g, points, [jnp.asarray(t, p.dtype) for t, p in zip(tangent, points)]
                )
                for t in [t for t in jax.tree.leaves(t_out) if _inexact(t)]:
                    top = float(np.max(np.abs(np.asarray(t)), initial=0.0))
                    if math.isfinite(top) and top > 0:
                        found.append(np.size(t) * (_jax_rtol(rtol, [t.dtype]) + atol / top))
            if mode in ("reverse", "both"):
                out, pullback = jax.vjp(g, *points)
                outs, out_tree = jax.tree.flatten(out)
                if all(_inexact(y) for y in outs):
                    u = [np.conj(_random_like(rng, y)) for y in outs]
                    pulled = pullback(
                        jax.tree.unflatten(
                            out_tree, [jnp.asarray(c, y.dtype) for c, y in zip(u, outs)]
                        )
                    )
                    ip = sum(
                        float(np.real(np.vdot(np.asarray(v), np.conj(np.asarray(w)))))
                        for v, w in zip(tangent, pulled)
                    )
                    if math.isfinite(ip) and ip != 0:
                        compared = [y.dtype for y in outs] + [p.dtype for p in points]
                        found.append(_jax_rtol(rtol, compared) + atol / abs(ip))
        except Exception:  # noqa: BLE001 - f's own errors are raised by the check itself
            pass
    return min(found, default=math.inf)


def _random_like(rng, x) -> np.ndarray:
    """A standard normal array shaped like `x` (complex: independent real and imaginary
    parts), drawn as JAX's check_grads draws its tangents and cotangents."""
    shape, dtype = np.shape(x), np.dtype(jnp.result_type(x))
    value = rng.randn(*shape)
    if np.issubdtype(dtype, np.complexfloating):
        value = value + 1j * rng.randn(*shape)
    return np.asarray(value)


def _inexact(x) -> bool:
    if isinstance(x, bool | int):
        return False
    if isinstance(x, float | complex):
        return True
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


STATUS_VERDICT = {Status.PASS: "pass", Status.FAIL: "fail", Status.INCONCLUSIVE: "unjudged"}


def _nonfinite_verdict(report: Report, params, outputs) -> str:
    """A NaN/Inf derivative where f (its `outputs` at `params`) and its inputs are finite
    is a bug; NaN/Inf in f at the point, or within the finite-difference step of it, leaves
    nothing to judge."""
    if not _all_finite(params) or not _all_finite(outputs):
        return "unjudged"
    if report.analytic is not None and not _all_finite(report.analytic):
        return "fail"
    return "unjudged" if report.num_nonfinite else "fail"


def _nonfinite_derivative_at(f, params, outputs, mode: str) -> bool:
    """Whether, at arguments with NaN/Inf entries where every output of f is finite, f's
    derivative in `mode` (the sum of its partials: a unit tangent, a unit cotangent) is
    NaN/Inf."""
    if _all_finite(params) or not _all_finite(outputs):
        return False
    of, floats = _of_floats(f, params)
    xs, derivatives = [jnp.asarray(x) for x in floats], []
    with jax.debug_nans(False), jax.debug_infs(False):
        for one in ("reverse", "forward"):
            if mode in (one, "both"):
                try:
                    derivatives += _along_units(of, xs, one)
                except Exception:  # noqa: BLE001, PERF203 - none in that mode (a custom_vjp)
                    continue
    return any(not _all_finite(d) for d in derivatives)


def _along_units(of, xs, mode: str) -> list:
    """`of`'s derivatives at `xs` in `mode`: the pullback of unit cotangents (reverse) and
    the push of unit tangents (forward), each the sum of its partials."""
    derivatives = []
    if mode in ("reverse", "both"):
        out, pullback = jax.vjp(of, *xs)
        derivatives.append(pullback(jax.tree.map(_tree.unit_like, out)))
    if mode in ("forward", "both"):
        derivatives.append(jax.jvp(of, xs, [_tree.unit_like(x) for x in xs])[1])
    return derivatives


def _of_floats(f, params, *, complex_too: bool = True) -> tuple:
    """(g, floats): `f` of the positional arguments `params` as a function `g(*floats)` of
    their floating-point leaves (complex ones too, or not), the other leaves held."""
    leaves, treedef = jax.tree.flatten(list(params))
    where = [
        i for i, x in enumerate(leaves) if _inexact(x) and (complex_too or not jnp.iscomplexobj(x))
    ]

    def g(*values):
        return f(*jax.tree.unflatten(treedef, _tree.filled(leaves, where, values)))

    return g, [leaves[i] for i in where]


def _nonfinite_nearby(f, params, relative: float = 1e-6) -> list | None:
    """Whether f turns NaN/Inf where the entries whose reverse derivative is NaN/Inf move by
    a small step, up or down (relative to the entry; relative to its leaf's RMS where the
    entry is 0): the edge of f's domain at the point, as xlogy(x, x) at 0. Other entries
    stay, so a NaN rule at an ordinary point beside an entry near its own edge still fails.
    Those entries (per real float leaf) where it does, else None."""
    of, floats = _of_floats(f, params, complex_too=False)
    points = [jnp.asarray(x) for x in floats]
    with jax.debug_nans(False), jax.debug_infs(False):
        try:
            out, pullback = jax.vjp(of, *points)
            grads = pullback(jax.tree.map(_tree.unit_like, out))
        except Exception:  # noqa: BLE001 - no reverse derivative to locate it by: no excuse
            return None
        bad = [~np.isfinite(np.asarray(g)) for g in grads]
        for sign in (1.0, -1.0):
            try:
                out = of(*_moved_off(points, bad, sign, relative))
            except Exception:  # noqa: BLE001 - f refuses the moved point: no verdict from it
                return None
            if not _all_finite(out):
                return bad
    return None


def _moved_off(points, entries, sign: float, relative: float = 1e-6) -> list:
    """The real float arrays `points` with their `entries` moved by `relative` of
    themselves (of their array's RMS where they are 0; of 1 where the array is all 0),
    up or down as `sign` says."""
    moved = []
    for x, b in zip(points, entries):
        a = np.asarray(x, np.float64)
        rms = np.sqrt(np.mean(np.square(a))) if a.size else 0.0
        rms = rms if rms > 0 else 1.0
        step = relative * np.where(a != 0, np.abs(a), rms)
        moved.append(jnp.asarray(np.where(b, a + sign * step, a), jnp.result_type(x)))
    return moved


def _finite_part_outcome(f, params, outputs, options, key=None) -> Outcome | None:
    """Where `f` (or an argument) is NaN/Inf at some entries only, judge the rest, as JAX's
    check_grads compares the finite entries and counts NaN equal to NaN: the check runs on
    `f` with its NaN/Inf outputs replaced by 0 and the argument entries held fixed that are
    NaN/Inf themselves or feed only those outputs. A pass or fail of that check is the
    outcome, and so is a NaN/Inf derivative of an output that is finite (a fail, as where
    `f` is finite everywhere); anything else leaves the call unjudged (None)."""
    part = _FinitePart.at(f, params, outputs)
    if part is None:
        return None
    report = _verify.run(dataclasses.replace(part, key=key), part.filled, (), options)
    failed = report.status is Status.FAIL or (
        report.status is Status.NONFINITE and part.nonfinite_derivative
    )
    if report.status is not Status.PASS and not failed:
        return None
    report = dataclasses.replace(report, problems=(part.note, *report.problems))
    return Outcome(report, "fail" if failed else "pass")


# The most argument entries whose NaN/Inf reverse derivative is told apart, one forward
# derivative each, into entries that feed only NaN/Inf outputs (held fixed) and entries
# whose derivative is NaN/Inf in a finite output (a failure). Beyond it, all are held.
MAX_FORWARD_COLUMNS = 256


@dataclasses.dataclass(frozen=True, eq=False)
class _FinitePart:
    """`f` restricted to where it and its arguments are finite, as a function of the
    argument tuple: held argument entries keep their values at the point (whatever the
    check passes there), masked outputs are 0."""

    f: Callable
    treedef: Any  # of the argument tuple
    point: tuple  # the float leaves of the arguments at the point (NumPy)
    held: tuple  # per float leaf: True where the entry is held fixed
    masked: tuple  # per float output leaf: True where the output is replaced by 0
    filled: tuple = ()  # the arguments with every NaN/Inf entry replaced by 0
    note: str = ""
    nonfinite_derivative: bool = False  # NaN/Inf in the derivative of a finite output
    # a hashable stand-in for f (`Positional`), or None: equal to another part of an equal
    # key, point and masks, whose compiled programs it then reuses; else only to itself
    key: Any = None

    def __post_init__(self):
        # (digested once, not at every lookup of its programs)
        identity = id(self)
        if self.key is not None:
            arrays = (self.point, self.held, self.masked, jax.tree.leaves(self.filled))
            digests = tuple(tuple(map(_tree.digest, a)) for a in arrays)
            identity = (self.key, self.treedef, digests, self.note, self.nonfinite_derivative)
        object.__setattr__(self, "_identity", identity)

    def __call__(self, args):
        return self._outputs(jax.tree.leaves(args))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self is other or (self.key is not None and self._identity == other._identity)

    def __hash__(self):
        return hash(self._identity)

    def _outputs(self, leaves):
        floats = iter(zip(self.point, self.held))
        leaves = [_hold(x, *next(floats)) if _inexact(x) else x for x in leaves]
        outs = self.f(*jax.tree.unflatten(self.treedef, leaves))
        out_leaves, out_def = jax.tree.flatten(outs)
        masks = iter(self.masked)
        out_leaves = [_zero_at(y, next(masks)) if _inexact(y) else y for y in out_leaves]
        return jax.tree.unflatten(out_def, out_leaves)

    @classmethod
    def at(cls, f, params, outputs) -> "_FinitePart | None":
        """The part of `f` to judge at `params`, where it is `outputs`; None where nothing
        is masked, or nothing is left."""
        leaves, treedef = jax.tree.flatten(params)
        floats = tuple(np.asarray(x) for x in leaves if _inexact(x))
        outs = [np.asarray(y) for y in jax.tree.leaves(outputs) if _inexact(y)]
        masked = tuple(~np.isfinite(y) for y in outs)
        bad_in = tuple(~np.isfinite(x) for x in floats)
        if not any(m.any() for m in masked + bad_in):
            return None  # NaN/Inf only next to the point: nothing to mask
        if all(m.all() for m in masked) or all(m.all() for m in bad_in):
            return None  # nothing finite left to judge
        filled = iter([np.where(b, np.zeros((), x.dtype), x) for x, b in zip(floats, bad_in)])
        filled_leaves = [_like(next(filled), x) if _inexact(x) else x for x in leaves]
        part = cls(f, treedef, floats, bad_in, masked)
        with jax.debug_nans(False), jax.debug_infs(False):
            flagged = [~b & ~np.isfinite(g) for b, g in zip(bad_in, part._gradient(filled_leaves))]
            genuine = part._forward_nonfinite(filled_leaves, flagged)
        held = tuple(b | (fl & ~g) for b, fl, g in zip(bad_in, flagged, genuine))
        if all(h.all() for h in held):
            return None
        found = [
            f"{what} NaN/Inf at {_count(masks)} of {sum(m.size for m in masks)} entries"
            for what, masks in (("f's output is", masked), ("its arguments are", bad_in))
            if _count(masks)
        ]
        n = _count(held)
        if _count(genuine):
            note = (
                f"{' and '.join(found)}, and the derivative of an output that is finite is "
                "NaN/Inf (which fails, as it does where f is finite everywhere)"
            )
        else:
            note = f"{' and '.join(found)}; the derivative was judged where both are finite"
            if n:
                note += (
                    f", holding {n} argument {'entry' if n == 1 else 'entries'} fixed "
                    "(NaN/Inf themselves, or feeding only NaN/Inf outputs)"
                )
        filled_args = jax.tree.unflatten(treedef, filled_leaves)
        return cls(f, treedef, floats, held, masked, filled_args, note, _count(genuine) > 0)

    @classmethod
    def holding(cls, f, params, held) -> "_FinitePart | None":
        """`f` with the argument entries `held` (per float leaf of `params`) fixed at the
        point, no output masked; None where none or all of them are held."""
        leaves, treedef = jax.tree.flatten(params)
        floats = tuple(np.asarray(x) for x in leaves if _inexact(x))
        if len(held) != len(floats):
            return None
        held = tuple(np.asarray(h, bool).reshape(np.shape(x)) for h, x in zip(held, floats))
        if not any(h.any() for h in held) or all(h.all() for h in held):
            return None
        outs = [y for y in jax.tree.leaves(f(*params)) if _inexact(y)]
        return cls(f, treedef, floats, held, tuple(np.zeros(np.shape(y), bool) for y in outs))

    def _floats_function(self, leaves):
        """(the float leaves of `leaves`, the masked outputs' float leaves as a function
        of them)."""
        where = [i for i, x in enumerate(leaves) if _inexact(x)]

        def outputs(floats):
            full = _tree.filled(leaves, where, floats)
            return [y for y in jax.tree.leaves(self._outputs(full)) if _inexact(y)]

        return [jnp.asarray(leaves[i]) for i in where], outputs

    def _gradient(self, leaves) -> list:
        """The gradient of the sum of the masked outputs (real and imaginary parts) in
        every float argument entry: NaN/Inf where an entry feeds only masked outputs (0
        times a NaN/Inf derivative), or where its derivative is NaN/Inf. All zero when
        reverse mode fails (a forward-only f): nothing more is held."""
        floats, outputs = self._floats_function(leaves)

        def summed(xs):
            wide = jnp.result_type(float)  # outputs of several dtypes, strict promotion
            return sum(
                (jnp.sum(jnp.real(y)) + jnp.sum(jnp.imag(y))).astype(wide) for y in outputs(xs)
            )

        try:
            return [np.asarray(g) for g in jax.grad(summed)(floats)]
        except Exception:  # noqa: BLE001 - any failure of reverse mode: hold nothing more
            return [np.zeros(x.shape) for x in floats]

    def _forward_nonfinite(self, leaves, flagged) -> list:
        """Per float leaf, True at the `flagged` entries whose forward derivative is
        NaN/Inf in an output that is finite: a derivative that is NaN/Inf where `f` is
        not. All False when there are too many to tell apart, or forward mode fails."""
        none = [np.zeros(m.shape, bool) for m in flagged]
        columns = [(j, i) for j, m in enumerate(flagged) for i in np.flatnonzero(m)]
        if not columns or len(columns) > MAX_FORWARD_COLUMNS:
            return none
        floats, outputs = self._floats_function(leaves)
        tangents = [np.zeros((len(columns), *x.shape), x.dtype) for x in floats]
        for c, (j, i) in enumerate(columns):
            tangents[j].reshape(len(columns), -1)[c, i] = 1
        try:
            jvp = jax.vmap(lambda t: jax.jvp(outputs, (floats,), (t,))[1])
            derivatives = jvp(tangents)
        except Exception:  # noqa: BLE001 - no forward mode (a custom_vjp): hold them all
            return none
        bad = np.zeros(len(columns), bool)
        for d in derivatives:
            d = np.asarray(d).reshape(len(columns), -1)
            bad |= np.any(~np.isfinite(d), axis=1)
        out = none
        for c, (j, i) in enumerate(columns):
            out[j].reshape(-1)[i] = bad[c]
        return out


def _count(masks) -> int:
    return sum(int(m.sum()) for m in masks)


def _hold(x, point, held):
    """x with its `held` entries replaced by their values at the point."""
    if not held.any():
        return x
    x = jnp.asarray(x)
    return jnp.where(held, jnp.asarray(point).astype(x.dtype), x)


def _zero_at(y, masked):
    if not masked.any():
        return y
    y = jnp.asarray(y)
    return jnp.where(masked, jnp.zeros((), y.dtype), y)


def _like(value, original):
    """`value` as the kind of leaf `original` is: a Python scalar, a NumPy or a JAX array."""
    if isinstance(original, float | complex):
        return type(original)(value)
    if isinstance(original, jax.Array):
        return jnp.asarray(value, original.dtype)
    return np.asarray(value, getattr(original, "dtype", None))


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if _inexact(x))
