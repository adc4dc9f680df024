"""The result of a check: a frozen, pytree-registered report with a compact text form."""

import dataclasses
import enum
import math
import re
from typing import Any

import jax
import numpy as np

from ._error_model import Comparison


class Status(enum.StrEnum):
    """Outcome of a check. Compares equal to its string value, e.g. `status == "pass"`."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    NONFINITE = "nonfinite"

    @property
    def advice(self) -> str:
        return _ADVICE[self]

    def __str__(self) -> str:
        return self.value


_ADVICE = {
    Status.PASS: "The derivative agrees with finite differences within the stated resolution.",
    Status.FAIL: (
        "The derivative under test (autodiff, or your grad_fn) disagrees with central finite "
        "differences of fn (the reference) by more than the error model allows. Look at the "
        "failing leaves first; if a custom_vjp/custom_jvp rule touches them (or the "
        "transpose_solve of a lax.custom_linear_solve, the tangent_solve of a "
        "lax.custom_root: derivatives given, not derived), check it; if none does, look on "
        "their path for what JAX's derivative leaves out or bends (a "
        "jax.lax.stop_gradient, as in a target held fixed, a cast to an integer, a callback). "
        "If you believe fn itself is not smooth here, try another point or key."
    ),
    Status.INCONCLUSIVE: (
        "Finite differences could not judge the derivative here (the notes above say why): "
        "kinks or jumps at or near these parameters (relu/abs/max/sign), a derivative no "
        "larger than their noise (a stationary point, where it is rounding), or fn rounding "
        "to a low precision inside. Try a point away from kinks and stationary points, or "
        "more directions (num_directions); if the reference ran in the model's precision, "
        "make fn run in float64."
    ),
    Status.NONFINITE: (
        "NaN or Inf appeared (see above where); a derivative cannot be judged there. Check the "
        "inputs, the function's domain, or the gradient rule that produced it."
    ),
}


# why a check took a fixed number of directions (`Report.stopped`)
FIXED = (
    "a fixed number (sequential=False, direction_sharding, or no more than the first look "
    "of a sequential check takes)"
)


@dataclasses.dataclass(frozen=True)
class LeafResult:
    """The check restricted to directions that move a single parameter leaf: its `path`,
    `shape` and `dtype`, the `relative_error` of its head comparison with its 95 %
    `interval` and `tolerance`, how many of its directions crossed a kink
    (`num_nonsmooth`), its `status`, and the `num_directions` its verdict rests on."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    relative_error: float
    interval: tuple[float, float]
    tolerance: float
    num_nonsmooth: int
    status: Status
    num_directions: int = 0  # directions along this leaf the verdict rests on


@dataclasses.dataclass(frozen=True, eq=False)
class Report:
    """What `jaxcheck.verify` found.

    `relative_error` is the estimated ‖W(g̃ − g)‖ / ‖W g‖ between the derivative under
    test g̃ and the finite-difference reference g, with W the per-leaf step weights (each
    leaf scaled by its RMS magnitude and balanced, as far as roundoff allows, so that every
    leaf counts about equally);
    `interval` is its 95 % confidence interval, `tolerance` the threshold it was judged
    against and `noise_floor` the relative error of the finite-difference reference itself.
    `numeric` and `analytic` hold the per-direction values behind the headline check.
    `num_directions` is the number of directions the verdict rests on: with sequential
    directions, 4, 8, 16, ... (8, 16, ... for random signs alone, and where at most 16
    parameter elements get directions that span them) up to `max_directions` (the
    `num_directions` option), and
    `stopped` says why the check took that many. Reports compare by identity (their
    arrays have no single truth value), and have none themselves: test `report.ok`.

    With `order` > 1 the report is composite: `parts` holds one report per order and
    derivative map (each with its `label`), the status is the worst of theirs (fail >
    nonfinite > inconclusive > pass) and the headline fields are those of the lowest-order
    part with that status, whose leaves name where it fails; `checks` lists every part's
    comparisons, and the counts and timings add up over the parts.
    """

    status: Status
    relative_error: float
    interval: tuple[float, float]
    tolerance: float
    noise_floor: float
    checks: tuple[Comparison, ...]
    leaves: tuple[LeafResult, ...]
    held_fixed: tuple[tuple[str, str], ...]
    mode: str
    tested_dtype: str
    reference_dtype: str
    step: float
    steps_tried: tuple[float, ...]
    num_directions: int
    num_nonsmooth: int
    num_nonfinite: int
    num_subgradient_consistent: int
    num_evaluations: int
    problems: tuple[str, ...]
    compile_seconds: float
    run_seconds: float
    num_compiled: int = 0
    stencil_points: int = 4
    peak_memory_bytes: int | None = None
    numeric: Any = None
    analytic: Any = None
    max_directions: int = 0  # num_directions asked for: the most a sequential check takes
    stopped: str = ""  # why a sequential check took the directions it took
    label: str = ""  # which part of a composite check this is, e.g. "order 2: vjp map"
    parts: tuple["Report", ...] = ()  # order > 1: one report per order and derivative map

    def __post_init__(self):
        # a frozen report holds read-only views of its per-direction values
        for name in ("numeric", "analytic"):
            value = getattr(self, name)
            if isinstance(value, np.ndarray) and value.flags.writeable:
                view = value.view()
                view.flags.writeable = False
                object.__setattr__(self, name, view)

    def __setstate__(self, state):
        # (pickle and copy.deepcopy restore the fields without __init__)
        self.__dict__.update(state)
        self.__post_init__()

    @property
    def ok(self) -> bool:
        """True only when the derivative was judged correct."""
        return self.status is Status.PASS

    def __bool__(self):
        # `assert jaxcheck.verify(...)` (torch's gradcheck returns a bool) would pass every
        # report, a failing one too
        raise TypeError(
            "a jaxcheck Report has no truth value: use report.ok (True only for a pass), or "
            "verify(..., raise_on_failure=True) to raise GradientCheckError on a failure."
        )

    def to_dict(self) -> dict:
        """JSON-serializable contents (floats, ints, strings, lists)."""
        out = {"ok": self.ok}
        for f in dataclasses.fields(self):
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def __str__(self) -> str:
        return render(self)


_DATA_FIELDS = ("numeric", "analytic", "parts")
jax.tree_util.register_dataclass(
    Report,
    data_fields=list(_DATA_FIELDS),
    meta_fields=[f.name for f in dataclasses.fields(Report) if f.name not in _DATA_FIELDS],
)

# Worst first. A failure outranks NaN/Inf: a wrong derivative is the finding, while NaN/Inf
# only hides one; an inconclusive part says nothing either way.
SEVERITY = (Status.FAIL, Status.NONFINITE, Status.INCONCLUSIVE, Status.PASS)


def check_kind(name: str) -> tuple[str, str]:
    """(kind, mode) of a comparison from its name: kind "tested" (the derivative under
    test), "rule" (the same rule in higher precision), "consistency" (forward vs reverse)
    or "linearity" (two autodiff passes, `LINEAR_CHECK`)."""
    if name.startswith("forward vs reverse"):
        return "consistency", ""
    if name.startswith(LINEARITY):
        return "linearity", ""
    return ("rule" if "same rule" in name else "tested"), name.split(" ", 1)[0]


def order_of(part: Report) -> int | None:
    """The order a part of a composite report checks, from its label ("order 2: vjp map",
    `_orders`); None for a part of another kind (custom rules, transforms)."""
    found = re.match(r"order (\d+): ", part.label)
    return int(found.group(1)) if found else None


def headline(parts) -> Report:
    """The part whose numbers a composite report carries: the first of the most severe
    status that measured an error (`measured`), else the first of that status."""
    status = min((p.status for p in parts), key=SEVERITY.index)
    alike = [p for p in parts if p.status is status]
    return next((p for p in alike if measured(p)), alike[0])


def measured(part: Report) -> bool:
    """Whether a part's error is a measurement against a tolerance: not the inf or NaN of
    a part that could not be evaluated (JAX refusing to transpose a rule), nor the 0
    tolerance of a comparison of types."""
    return math.isfinite(part.relative_error) and part.tolerance > 0


def compose(parts, order: int) -> Report:
    """One report from the parts of a check of derivatives up to `order` (see `Report`)."""
    parts = tuple(parts)
    worst = headline(parts)
    problems = []
    if parts[0].status is Status.FAIL and len(parts) > 1:
        problems.append(
            "the first derivative is wrong: the higher-order parts differentiate it, so fix "
            "it first"
        )
    problems += [f"{p.label}: {problem}" for p in parts for problem in p.problems]
    peaks = [p.peak_memory_bytes for p in parts if p.peak_memory_bytes is not None]
    return dataclasses.replace(
        worst,
        checks=tuple(c for p in parts for c in p.checks),
        problems=tuple(problems),
        num_evaluations=sum(p.num_evaluations for p in parts),
        compile_seconds=sum(p.compile_seconds for p in parts),
        run_seconds=sum(p.run_seconds for p in parts),
        num_compiled=sum(p.num_compiled for p in parts),
        peak_memory_bytes=max(peaks) if peaks else None,
        label=f"orders 1 to {order}",
        parts=parts,
    )


def _plain(x):
    if isinstance(x, Status):
        return x.value
    if dataclasses.is_dataclass(x):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, tuple | list):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return [_plain(float(v)) for v in np.asarray(x, np.float64).ravel()]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def _e(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def apart(error: float, tolerance: float) -> tuple[str, str]:
    """`error` and `tolerance` as printed, with as many more digits as it takes to tell
    them apart where one decimal shows them equal: an error a hair above its tolerance
    fails, and its row must not read as a tie (5.0e-01 against 5.0e-01, FAIL)."""
    a, b = _e(error), _e(tolerance)
    digits = 1
    finite = all(isinstance(x, float | int) and math.isfinite(x) for x in (error, tolerance))
    while finite and a == b and error != tolerance and digits < 17:
        digits += 1
        a, b = f"{error:.{digits}e}", f"{tolerance:.{digits}e}"
    return a, b


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*header).rstrip()] + ["  " + fmt.format(*r).rstrip() for r in rows]


def _error_line(r: Report, prefix: str = "") -> str:
    lo, hi = r.interval
    error, tolerance = apart(r.relative_error, r.tolerance)
    head = [
        c for c in r.checks if (c.relative_error, c.tolerance) == (r.relative_error, r.tolerance)
    ]
    if head and LINEARITY in head[0].name:  # (two autodiff passes compared; at any order)
        unit = "cotangent" if "cotangent" in head[0].name else "tangent"
        return (
            f"  {prefix}relative gap {error} between the derivative at the {unit} -2, halved, "
            f"and at the {unit} 1, tolerance {tolerance} (two autodiff passes compared: no "
            "finite-difference noise in it)"
        )
    absolute = bool(head) and head[0].absolute
    # the derivative is zero to within noise: no size of its own to be relative to
    unit = (
        "; absolute: in units of the finite differences' noise or the derivative's rounding, "
        "as the derivative is zero to within them"
        if absolute
        else ""
    )
    if absolute and head[0].resolved and head[0].rounding_measured:
        # (finite differences see the derivative: `_verdict.rounding_as_large`)
        unit = (
            "; absolute: in units of the derivative's rounding, which is as large as the derivative"
        )
    return (
        f"  {prefix}{'error' if absolute else 'relative error'} {error} (95% {_e(lo)}..{_e(hi)}), "
        f"tolerance {tolerance}, finite-difference noise floor {_e(r.noise_floor)}{unit}"
    )


def _failed_elsewhere(r: Report, failed: list) -> str:
    """Where a failure comes from when the headline error, over all leaves together, is
    within its tolerance (and so reads like a pass)."""
    # (an infinite error against an infinite tolerance: a row that could not be evaluated)
    if r.status is not Status.FAIL or not r.relative_error <= r.tolerance < math.inf:
        return ""
    if any(p.startswith(FLAT_WHERE_CURVED) for p in r.problems):
        return (
            "\n  (its rows agree: the maps are flat here; the failure is that the function "
            "one order below is not, see the note below)"
        )
    if any(p.startswith(PIECEWISE_CONSTANT) for p in r.problems):
        return (
            "\n  (its rows, in units of noise, judge nothing here: fn is piecewise constant "
            "about params, its derivative 0, and the failure is that the derivative under "
            "test is not, see the note below)"
        )
    if any(leaf.status is Status.FAIL for leaf in r.leaves):
        where = "the leaf checks below"
    elif PRIMAL_CHECK in failed:
        where = "the primal row below"
    elif any(p.startswith("wrong rule") for p in r.problems):
        where = "the checks of the rules below"
    else:
        where = "the failing rows below"
    return f"\n  (within the tolerance over all leaves together; the failure is in {where})"


# how the note of an order >= 2 part begins whose maps are flat where the function of the
# order below curves (`_orders`): a failure its rows, which agree, do not show
FLAT_WHERE_CURVED = "flat where the order below curves"
# how the note of a fn piecewise constant about params starts (`_verdict.status`)
PIECEWISE_CONSTANT = "fn's values do not change at all within a relative step "


# the name of the comparison of fn's value as its derivative computes it with fn's own
PRIMAL_CHECK = "primal: fn's value from jax.vjp / value_and_grad / jvp vs fn's own"


# the advice where only a primal row failed: the derivative itself agrees
PRIMAL_ADVICE = (
    "fn's value as its derivative computes it (a custom_vjp's fwd, a custom_jvp rule's "
    "primal output) differs from fn's own value, while the derivative agrees with finite "
    "differences: the rule's forward pass computes something other than the function it "
    "stands for, so jax.grad's caller gets a different value. Make the fwd (or the jvp's "
    "primal output) return exactly what the function returns."
)


def _primal_only(checks) -> bool:
    """Whether the rows that failed are all comparisons of fn's value (its own and a
    rule's), none of a derivative."""
    failed = [c.name for c in checks if not c.passed and c.judged]
    return bool(failed) and all(n == PRIMAL_CHECK or n.endswith(": primal") for n in failed)


# the advice where nothing that failed was compared with finite differences
UNMEASURED_ADVICE = (
    "What failed was not compared with finite differences: the notes above say what is "
    "wrong (a derivative of another dtype than its parameter: a custom_vjp's bwd "
    "returning a complex cotangent for a real input, or a real one for a complex input) "
    "and which rule gives it."
)


# how the name of `_pipeline._linear`'s row starts, and the advice where only it failed
LINEARITY = "linearity: "
LINEAR_CHECK = LINEARITY + "derivative at {0} -2, halved, vs at {0} 1"
LINEAR_ADVICE = (
    "The derivative under test agrees with finite differences of fn at the unit cotangent "
    "(or tangent) that jax.grad (jax.jacfwd) takes, but not at -2 times it: a custom rule "
    "in fn is not linear in its cotangent or tangent (it clips, thresholds, squares or rounds "
    "it, or drops its sign), so it is no derivative, and scaling the loss or the tangent "
    "changes what it gives. Find the rule with rules=True, and make its bwd (jvp) linear in "
    "g (t)."
)


def _advice(r: Report) -> str:
    if r.status is Status.FAIL and _primal_only(r.checks):
        return PRIMAL_ADVICE
    failed = [c for c in r.checks if not c.passed]
    if r.status is Status.FAIL and failed and all(c.name.startswith(LINEARITY) for c in failed):
        return LINEAR_ADVICE
    # (a leaf that failed alone at a measured error was compared with finite differences:
    # the usual advice)
    leaf_failed = any(
        leaf.status is Status.FAIL and not math.isnan(leaf.relative_error) for leaf in r.leaves
    )
    # (nor is a comparison of types, of tolerance 0)
    unmeasured = failed and all(math.isnan(c.relative_error) or c.tolerance == 0 for c in failed)
    if r.status is Status.FAIL and unmeasured and not leaf_failed:
        return UNMEASURED_ADVICE
    return r.status.advice


def render(r: Report) -> str:
    if r.parts:
        return _render_composite(r)
    failed = [c.name for c in r.checks if not c.passed]
    what = {
        Status.PASS: "gradient is consistent with finite differences",
        Status.FAIL: "fn's value from its derivative is WRONG"
        if _primal_only(r.checks)
        else "gradient is WRONG",
        Status.INCONCLUSIVE: "could not judge the gradient",
        Status.NONFINITE: "non-finite values",
    }[r.status]
    lines = [f"jaxcheck.verify: {r.status.value.upper()} — {what}"]
    if not math.isnan(r.relative_error):
        lines.append(_error_line(r) + _failed_elsewhere(r, failed))
    lines += [f"  ! {p}" for p in r.problems]
    if r.checks:
        header = ["check", "rel. error", "95% interval", "tolerance", "result"]
        lines += _table(header, _check_rows(r.checks))
    if r.leaves:
        lines += _leaf_table(r.leaves)
    if r.held_fixed:
        lines.append(_held_fixed(r.held_fixed))
    smooth_note = ""
    if r.num_nonsmooth:
        smooth_note = (
            f"; autodiff lies between the one-sided slopes on "
            f"{r.num_subgradient_consistent} of {r.num_nonsmooth} non-smooth"
        )
    timing = f"compile {r.compile_seconds:.2f} s, run {r.run_seconds:.2f} s"
    if not r.steps_tried:
        lines.append(
            f"  {r.mode}-mode derivative in {r.tested_dtype}; no finite differences were "
            f"taken; {timing}"
        )
    else:
        of = f" of {r.max_directions}" if r.max_directions > r.num_directions else ""
        lines.append(
            f"  {r.num_directions}{of} directions ({r.num_nonsmooth} non-smooth, "
            f"{r.num_nonfinite} with fn non-finite{smooth_note}), {r.num_evaluations} "
            "evaluations of fn"
        )
        if r.stopped and not r.stopped.endswith(FIXED):  # (a fixed number: said above)
            lines.append(f"  {r.stopped}")
        tried = ""
        if len(r.steps_tried) > 1:
            tried = f", tried {', '.join(_e(h) for h in r.steps_tried)}"
        stencil = (
            "step h (agreement within the tolerance settled it)"
            if r.stencil_points == 2
            else "steps h and h/2 with Richardson"
        )
        lines.append(
            f"  {r.mode}-mode derivative in {r.tested_dtype}; reference: central differences "
            f"in {r.reference_dtype}, {stencil}, relative h = {_e(r.step)}{tried}; {timing}"
        )
    if r.status is not Status.PASS:
        lines.append("  " + _advice(r))
    return "\n".join(lines)


# how the name of a rule's row ends where it failed alone and is not counted in the verdict
NOT_COUNTED = ": not counted)"


def _check_rows(checks) -> list[list[str]]:
    rows = []
    for c in checks:
        error, tolerance = apart(c.relative_error, c.tolerance)
        interval = f"{_e(c.interval[0])}..{_e(c.interval[1])}"
        result = "not judged" if c.num_used == 0 or not c.judged else "ok" if c.passed else "FAIL"
        if c.name.endswith(NOT_COUNTED):  # (failed alone: neither cleared nor counted)
            result = "not counted"
        rows.append(
            [
                c.name,
                error,
                interval,
                _shown_tolerance(tolerance, c.tolerance, result, c.relative_error),
                result,
            ]
        )
    return rows


def _leaf_table(leaves) -> list[str]:
    rows = [
        [
            leaf.path or "(root)",
            str(leaf.shape),
            leaf.dtype,
            *_leaf_numbers(leaf),
            leaf.status.value.upper() if leaf.status != "pass" else "ok",
        ]
        for leaf in leaves
    ]
    return _table(["leaf", "shape", "dtype", "rel. error", "tolerance", "result"], rows)


def _shown_in_composite(checks, i: int) -> bool:
    """Whether a composite report's table shows `checks[i]`: every row but those of the
    same rule in higher precision, which show where they alone fail, or where the row of
    the derivative under test beside them was not judged (fn computes another function in
    float64, dropout's draws: then they carry the verdict)."""
    c = checks[i]
    if check_kind(c.name)[0] != "rule":
        return True
    beside = [
        checks[j]
        for j in (i - 1, i + 1)
        if 0 <= j < len(checks) and check_kind(checks[j].name)[0] == "tested"
    ]
    return (not c.passed and checks[i - 1].passed) or (
        c.judged and any(not b.judged for b in beside)
    )


def _leaf_numbers(leaf) -> tuple[str, str]:
    error, tolerance = apart(leaf.relative_error, leaf.tolerance)
    result = {Status.INCONCLUSIVE: "not judged", Status.FAIL: "FAIL"}.get(leaf.status, "")
    return error, _shown_tolerance(tolerance, leaf.tolerance, result, leaf.relative_error)


def _shown_tolerance(text: str, tolerance: float, result: str, error: float) -> str:
    """A row's tolerance as printed: none where the row was not judged at a tolerance of
    1 or more (a relative error that large is no bound: fn flat along the directions, or
    its differences no finer than what they measure), or failed within such a tolerance
    (for another reason: fn piecewise constant about params, a rule failing on one of its
    inputs alone)."""
    unbounded = tolerance >= 1 and (
        result == "not judged" or (result == "FAIL" and error <= tolerance)
    )
    return "—" if unbounded else text


def _held_fixed(held) -> str:
    shown = ", ".join(f"{p or '(root)'} {d}" for p, d in held[:8])
    more = f" and {len(held) - 8} more" if len(held) > 8 else ""
    return f"  held fixed: {shown}{more}"


def _render_composite(r: Report) -> str:
    """The problems of every part, one row per order and mode (same-rule rows only where
    they alone fail), then the leaves of every part that did not pass."""
    # the part whose numbers the report carries (of equally bad parts, not always the first)
    alike = [p for p in r.parts if p.status is r.status]
    # (none alike: a part of custom rules, none wrong and not all judged, passes)
    head = next(
        (p for p in alike if (p.relative_error, p.tolerance) == (r.relative_error, r.tolerance)),
        alike[0] if alike else r.parts[0],
    )
    if r.status is Status.FAIL and not head.checks:
        # (a part failed with no row, finite differences stopped by a cotangent of the
        # wrong type: the part whose row names it heads)
        head = next((p for p in alike if p.checks), head)
    what = {
        Status.PASS: f"derivatives of {r.label} are consistent with finite differences"
        if alike
        else f"nothing found wrong in {r.label}, though not all were judged",
        Status.FAIL: "fn's value from its derivative is WRONG"
        if _primal_only(r.checks)
        else f"{head.label} {_is(head.label)} WRONG",
        Status.INCONCLUSIVE: f"could not judge {head.label}",
        Status.NONFINITE: f"non-finite values in {head.label}",
    }[r.status]
    who = "verify_rule" if r.label == "the rule" else "verify"
    lines = [f"jaxcheck.{who}: {r.status.value.upper()} — {what}"]
    # (no error line for a comparison of types, of tolerance 0: its row says it)
    if alike and not math.isnan(r.relative_error) and r.tolerance > 0:
        failed = [c.name for c in head.checks if not c.passed]
        lines.append(_error_line(r, f"{head.label}: ") + _failed_elsewhere(head, failed))
    lines += [f"  ! {p}" for p in r.problems]
    # a same-rule row only adds to its tested row (just before it) when they disagree
    shown = [c for i, c in enumerate(r.checks) if _shown_in_composite(r.checks, i)]
    if shown:
        header = ["check", "rel. error", "95% interval", "tolerance", "result"]
        lines += _table(header, _check_rows(shown))
    for part in r.parts:
        if part.leaves and part.status is not Status.PASS:
            lines.append(f"  {part.label}: {part.status.value}")
            lines += ["  " + line for line in _leaf_table(part.leaves)]
    if r.held_fixed:
        lines.append(_held_fixed(r.held_fixed))
    # (parts that take no directions, such as a rule's checks without finite
    # differences, are not counted)
    used = sorted({p.num_directions for p in r.parts if p.num_directions and p.num_evaluations})
    count = "" if not used else str(used[0]) if len(used) == 1 else f"{used[0]} to {used[-1]}"
    timing = f"compile {r.compile_seconds:.2f} s, run {r.run_seconds:.2f} s"
    if not r.num_evaluations:
        lines.append(
            f"  derivatives in {r.tested_dtype}; no finite differences were taken; {timing}"
        )
    else:
        # (a part whose fn could not run in float64 fell back: its precision, by name)
        references = {}
        for p in r.parts:
            if p.num_evaluations:
                references.setdefault(p.reference_dtype, []).append(p.label)
        reference = r.reference_dtype
        if len(references) > 1:
            reference = ", ".join(f"{d} ({', '.join(on)})" for d, on in references.items())
        lines.append(
            f"  {count or 0} directions per check, {r.num_evaluations} evaluations of fn "
            f"and its derivative maps; derivatives in {r.tested_dtype}, reference: central "
            f"differences in {reference}; {timing}"
        )
    if r.status is not Status.PASS:
        lines.append("  " + _advice(r))
    return "\n".join(lines)


def _is(label: str) -> str:
    """The verb for a part's label: "order 2: jvp and vjp maps are", "gradient is"."""
    noun = label.split(" of the ")[0]
    return "are" if noun.endswith(("maps", "products", "types")) else "is"
