"""The parts `verify` adds after its gradient check: the custom rules the model calls, each
checked where the model calls it (`rules=True`, and by default when the check fails), and
the consistency of the gradient under JAX's transformations (`transforms=True`)."""

import dataclasses
import hashlib
import math
import re

import jax
import numpy as np

from . import (
    _pipeline,
    _plan,
    _precision,
    _probe,
    _report,
    _rule_rows,
    _rule_search,
    _rules,
    _transforms,
    _tree,
    _verdict,
)
from ._error_model import Comparison
from ._errors import GradientCheckError, one_line
from ._report import Report, Status, headline
from ._state import TRACED_RULE


def checked(fn, params, args, options, check) -> Report:
    """`check(options)` (the gradient check), with the parts `options` ask for added; raises
    as `options.raise_on_failure` says once they are in."""
    o = options
    if o.rules is False and not o.transforms:
        return check(o)
    try:
        report = check(o)
    except GradientCheckError as err:  # raised again below, with the parts added
        report = err.report
    except (TypeError, AssertionError) as err:
        wrong = _wrong_cotangent_rules(fn, params, args, o)
        if not wrong:
            raise
        raise TypeError(
            f"fn's derivative cannot be evaluated: JAX raised {one_line(err).rstrip('.')}. "
            f"The custom rule {'; '.join(wrong)} gives its inputs cotangents of other dtypes than "
            "theirs (a custom_vjp's bwd returning a complex cotangent for a real input, or "
            "a real one for a complex input): the operations the cotangent meets in fn's "
            "reverse pass then refuse it (jax.grad(fn) raises the same). Return each "
            "cotangent in its input's dtype; jaxcheck.verify_rule(rule, *args) shows the "
            "rule's checks."
        ) from err
    parts, notes = [], []
    what = []  # what the parts check besides fn's derivatives, for the headline
    if o.transforms:
        try:
            # (on a mesh of Explicit axes the rows' jitted gradients take that mesh)
            with _plan.explicit_mesh_of((params, args)):
                part, more = _transforms.check(fn, params, args, o, _measured_rounding(report))
            parts += [part] if part is not None else []
            what += [", under JAX's transformations too,"] if part is not None else []
            notes += more
        except Exception as err:  # noqa: BLE001 - the gradient check's verdict stands
            notes.append(f"transforms: not checked ({one_line(err)})")
    if o.grad_fn is not None and report.status is Status.PASS and _rounding_gap(report):
        part, more = _grad_fn_native(o, check)
        parts += [part] if part is not None else []
        notes += more
    if _wants_rules(o, report):
        error = report.relative_error if report.status is Status.FAIL else None
        passed = report.status is Status.PASS
        # (a pass that took a gap to the same rules in float64 for rounding is what a rule
        # wrong in float32 alone looks like: it clears no rule)
        # (nor does a pass judged at fn's own half-precision resolution: a rule 50 % wrong
        # hid below its tolerance of 0.48 in a model of bfloat16 matmuls)
        clean = passed and not _rounding_gap(report) and not _coarse(report)
        part, more = rules_part(
            fn, params, args, o, _rule_order(o, report), error, passed, clean, _failing(report)
        )
        if part is not None:
            parts.append(part)
            if part.status is Status.FAIL:  # the rule is named: no advice to name it
                report = _probe.without_kind_hint(report)
            # (a rule failing alone where fn passes is not counted, nor cleared)
            judged = sum(
                c.num_used > 0 and not c.name.endswith(_report.NOT_COUNTED) for c in part.checks
            )
            total = len(part.checks)
            if judged == total:
                what.append(" and its custom rules")
            elif judged:
                what.append(f" and {judged} of its {total} custom rules")
        notes += more
    report = combine(report, parts, notes, "fn" + "".join(what))
    if o.raise_on_failure and not report.ok:
        raise GradientCheckError(report)
    return report


def _wrong_cotangent_rules(fn, params, args, o) -> list[str]:
    """Where fn's derivative could not be traced: the custom rules fn calls whose
    cotangents have other dtypes than their inputs (each rule's row name), found by
    checking them alone where fn calls them; empty where there is none, or where rules
    were not to be checked (`rules=False`) or could not be."""
    if o.rules is False or o.grad_fn is not None:
        return []
    try:
        part, _ = rules_part(fn, params, args, o)
    except Exception:  # noqa: BLE001 - no diagnosis: JAX's error stands
        return []
    if part is None:
        return []
    row = ": vjp vs finite differences, cotangent types"
    return [c.name[len("rule ") :].split(row)[0] for c in part.checks if row in c.name]


def _grad_fn_native(o, check) -> tuple[Report | None, list]:
    """grad_fn, passed with a gap to itself in float64 taken for rounding, checked against
    finite differences in its own precision: a grad_fn wrong on its float32 path alone
    looks like that gap, and no rule check sees into grad_fn. A failure there is a part
    of the report; anything else a note."""
    native = check(
        dataclasses.replace(
            o, precision="native", order=1, raise_on_failure=False, rules=False, transforms=False
        )
    )
    dtype = native.tested_dtype
    what = f"grad_fn ({dtype}) vs finite differences in {dtype}"
    if native.status is Status.FAIL:
        return dataclasses.replace(native, label=what), []
    seen = (
        f"relative error {native.relative_error:.1e}, tolerance {native.tolerance:.1e}"
        if native.status is Status.PASS
        else "not judged"
    )
    return None, [
        f"{what}, as the gap above could hide a bug on grad_fn's {dtype} path: "
        f"{native.status.value} ({seen})"
    ]


def _wants_rules(o, report: Report) -> bool:
    """rules=True; or "auto" and a derivative is wrong, or could not be judged (a kink at
    the point leaves a rule beside it unjudged but for its own check), or the first one is
    far from the same rules in float64 (a pass then accepts that as rounding): a rule that
    rounds to bfloat16, or takes another path in float32, looks like that, and only its
    own check in float32 tells it from an ill-conditioned loss."""
    if o.rules is True:
        return True
    rounding = _rounding_gap(report) or _coarse(report)
    unjudged = report.status is Status.INCONCLUSIVE  # (a kink beside a rule: judge the rule)
    return o.rules == "auto" and (report.status is Status.FAIL or rounding or unjudged)


def _coarse(report: Report) -> bool:
    """Whether fn's first derivative passed at a coarse resolution only, where a rule's own
    check resolves its error far more finely: fn rounds to a half precision inside (a noise
    floor beyond `_verdict.MAX_NOISE_FLOOR`), or its finite differences ran in a precision
    below float64 (fn refuses float64: a rule 1e-4 off passed at a tolerance of 3.5e-4),
    or fn rounds its values to float32 (a staircase judged at float32 resolution)."""
    first = report.parts[0] if report.parts else report
    if first.status is not Status.PASS:
        return False
    # (or fn rounds to float32 inside, judged at that resolution: a rule 2e-4 off passed)
    staircase = any(q.startswith(_pipeline.ROUNDS) for q in first.problems)
    return (
        _below_float64(first.reference_dtype)
        or first.noise_floor > _verdict.MAX_NOISE_FLOOR
        or staircase
    )


def _below_float64(dtype: str) -> bool:
    """Whether a report's reference dtype (its name, "" where none) is less precise than
    float64: finite differences in fn's own precision."""
    return bool(dtype) and _precision.eps(dtype) > _precision.eps("float64")


def _rounding_gap(report: Report) -> bool:
    """Whether fn's first derivative is far from the same rules in float64: a pass then
    accepted that gap as rounding, or judged the derivative in the model's precision only
    coarsely, or not at all (fn in float64 computing another function)."""
    first = report.parts[0] if report.parts else report
    marks = (_verdict.ROUNDING_GAP, _verdict.INCOMPARABLE)
    return any(m in p for p in first.problems for m in marks)


def _rule_order(o, report: Report) -> int:
    """The order the rules' finite-difference rows check: all of `options.order` with
    rules=True; under "auto", the lowest order whose check failed or could not be judged
    (a rule wrong in its first derivative is found at order 1, at a fraction of the cost;
    one wrong in its second beside a kink only at order 2)."""
    if o.rules is True:
        return o.order
    doubtful = (Status.FAIL, Status.INCONCLUSIVE)
    failed = [_report.order_of(p) for p in report.parts if p.status in doubtful]
    return next((k for k in failed if k is not None), 1)


def _failing(report: Report) -> frozenset:
    """The paths of the params leaves that failed alone, in any part of `report`."""
    parts = report.parts or (report,)
    return frozenset(
        leaf.path for part in parts for leaf in part.leaves if leaf.status is Status.FAIL
    )


def _measured(r: Report) -> str:
    """ ", relative error ... (tolerance ...)" of a wrong rule, where finite differences
    measured one (not for a cotangent of the wrong dtype alone)."""
    if math.isnan(r.relative_error):
        return ""
    return f", relative error {r.relative_error:.1e} (tolerance {r.tolerance:.1e})"


def _surrogate(r: Report) -> str:
    """Where a wrong rule's function is piecewise constant about its inputs while its
    derivative is not zero (a straight-through estimator: `_verdict.SURROGATE` in its
    report), the clause that says so instead of the errors, which count in units of
    noise there and judge nothing; else ""."""
    notes = [*r.problems, *(q for part in r.parts for q in part.problems)]
    if not any(_verdict.SURROGATE in q for q in notes):
        return ""
    return (
        f"; its function is piecewise constant about these inputs (or flat to within "
        f"float64, saturated, where a rule that is not 0 is wrong), its derivative 0, "
        f"while the rule's is not: a {_verdict.SURROGATE}"
    )


def _iterates(r: Report) -> str:
    """Where a wrong rule's function runs a while_loop and its error is the size of a
    solver's (`_pipeline.SOLVER_HINT` in its report), the clause that says so: a correct
    implicit-differentiation rule of a solve stopped at a tolerance fails this way."""
    if not any(q.startswith(_pipeline.SOLVER_HINT) for q in r.problems):
        return ""
    return (
        "; its function runs a lax.while_loop: a rule giving the derivative of the exact "
        "solution can differ this much from a stopped solve's own (see the note on "
        "the solver)"
    )


def _factor(r: Report) -> list[str]:
    """Where a wrong rule's derivative is a constant multiple of its function's (a
    gradient-reversal layer's -lambda, a factor of 2 left out), the note that says so,
    naming the rule; else none."""
    notes = [*r.problems, *(q for part in r.parts for q in part.problems)]
    factor = next((q for q in notes if q.startswith(_verdict.FACTOR)), None)
    if factor is None:
        return []
    factor = factor.replace(_verdict.FACTOR, f"{r.label}: its derivative is ", 1)
    return [factor.replace(" times fn's along ", " times its function's along ", 1)]


def _measured_rounding(report: Report) -> float:
    """The largest rounding of the derivative under test that its check measured against
    the same rule in a higher precision and accepted as such, in a comparison judged and
    passed (relative; 0 where none was). (A gap not taken for rounding, as where fn
    computes something else in float64, a dropout mask drawn in the default dtype, is no
    rounding of the transformations' float32 programs: taken for one, a vmap rule 10 % off
    passed.)"""
    measured = [
        c.rounding
        for c in report.checks
        if c.rounding_measured and c.judged and c.passed and math.isfinite(c.rounding)
    ]
    return max(measured, default=0.0)


def rules_part(
    fn, params, args, o, order=1, error=None, passed=False, clean=False, failing=frozenset()
) -> tuple[Report | None, list]:
    """(a report listing the custom rules fn calls, each with its verdict at the inputs it
    receives, or None when there are none; notes for the report). `error` is the relative
    error of fn's failing derivative: a rule whose finite differences cannot resolve an
    error that size is not called fine, unless none of the params leaves that failed alone
    (`failing`, their paths) reaches its inputs. `passed`: fn's own check passed; `clean`:
    without taking a gap to the same rules in float64 for rounding."""
    if o.grad_fn is not None:
        return None, ["rules: not checked, the gradient under test is grad_fn's"]
    if o.has_aux:  # aux may hold anything jax cannot trace (strings, Python objects)
        with_aux = fn
        fn = lambda p, *a: with_aux(p, *a)[0]  # noqa: E731
    try:
        # (JAX's own rules are checked only with rules=True)
        checked = None if o.rules is True else (lambda r: not r.in_jax)
        found, notes = _rule_search.find(fn, params, args, checked)
    except Exception as err:  # noqa: BLE001 - the leaf-level verdict stands whatever happens
        why = one_line(err)
        if isinstance(err, ValueError) and _plan.cannot_trace(err):  # (JAX's many lines)
            why = "a static argument of a jax.jit function in fn got a traced value"
        return None, [f"rules: fn could not be traced to find them ({why})"]
    if o.rules is not True:  # "auto": the model's own rules, not JAX's
        # JAX's own rules (jax.nn.relu, logaddexp, ...) are tested by JAX, sit in most
        # models, and would multiply the cost of every failing check
        own = [r for r in found if r.in_jax]
        found = [r for r in found if not r.in_jax]
        if own:
            names = ", ".join(sorted({r.name for r in own}))
            notes.append(f"rules: JAX's own ({names}) not checked; rules=True checks them too")
    if not found:
        if o.rules is True:
            return None, [
                "rules: no custom_vjp/custom_jvp rule found in fn (one that fn itself "
                "differentiates, under a jax.grad, jax.vjp or jax.jvp inside fn, is traced "
                "already differentiated and cannot be found: check it with "
                "jaxcheck.verify_rule; a lax.custom_linear_solve's transpose_solve and a "
                "lax.custom_root's tangent_solve are not rules checked one by one)"
            ]
        return None, notes
    # a call of a rule whose inputs do not depend on params, where another call of it does
    # (flax's nn.scan traces its body once more apart from the scan): nothing to check there
    found = [
        r
        for r in found
        if not (_without_params(r) and any(_same(r, s) and not _without_params(s) for s in found))
    ]
    checked = [_check_one(fn, rule, o, order, error) for rule in found]
    cleared, at_call, calls_checked = set(), {}, {}
    if error is not None:
        cleared, at_call, calls_checked = _other_calls(fn, found, checked, o, order, error, failing)
    rows, reports = [], []
    for row, report, note in checked:
        rows.append(row)
        if report is not None:
            reports.append(report)
        if note:
            notes.append(note)
    wrong = [r for r in reports if r.status is Status.FAIL]
    by_label = {rule.title: rule for rule in found}
    # rules that no failing leaf reaches: fn's error cannot be theirs (a rule in a scan
    # body, while the failing leaf scales the loss after the scan)
    unreached = set()
    if failing and failing <= set(_tree.leaf_paths(params)):
        unreached = {
            rule.title for rule in found if rule.sources is not None and not rule.sources & failing
        }
    titles = [rule.title for rule in found]  # rows[i] is found[i]'s
    masked, unseen = [], []
    if passed and wrong and all(by_label[r.label].in_jax for r in wrong):
        # JAX's own rules that fail alone while fn's derivatives pass: jnp.sinc calls a
        # rule right only at 0 and masks its output elsewhere with jnp.where
        masked, wrong = wrong, []
        _not_counted(rows, titles, masked, "JAX's own, masked in fn")
    if clean and wrong:
        # the user's rules whose derivative values alone fail, while fn's pass: their error
        # does not reach fn's derivatives at this point (a relu at inputs fn holds at 0, a
        # gradient clip fn's cotangents stay inside); the other rows (linearity, vmap, ...)
        # are properties fn's own check cannot see, and count
        unseen = [r for r in wrong if _values_only(r)]
        wrong = [r for r in wrong if r not in unseen]
        _not_counted(rows, titles, unseen, "fn's derivatives pass")
    head = wrong[0] if wrong else None
    problems = [
        line
        for r in wrong
        for line in (
            f"wrong rule: {r.label}{at_call.get(r.label, '')}: {_failed_rows(r)}"
            f"{_surrogate(r) or _measured(r) + _failing_inputs(r)}{_raised(r)}{_iterates(r)}",
            *_factor(r),
        )
    ]
    unjudged = [r for r in reports if r.status in (Status.INCONCLUSIVE, Status.NONFINITE)]
    if unjudged:
        each = "; ".join(
            f"{r.label} ({r.status.value}{_why_nonfinite(r, error is not None)})" for r in unjudged
        )
        half = [r for r in unjudged if r.tested_dtype in ("bfloat16", "float16")]
        hint = (
            "; rules given bfloat16 or float16 inputs are resolved no finer than those: "
            "check such a rule alone with jaxcheck.verify_rule at float32 inputs, where its "
            "own code may run in float32 or float64"
            if half
            else ""
        )
        problems.append(f"rules not judged at the inputs fn gives them: {each}{hint}")
    # with no rule found wrong, fn's error may be a rule's below its tolerance, amplified
    factor = 1.0 if wrong else AMPLIFICATION
    coarse = [
        r for r in reports if r.ok and r.label not in unreached and _coarser(r, error, factor)
    ]
    # with no error of fn's to clear them of, rules resolved no better than a few percent
    # (recorded in bfloat16 or float16 and unable to run higher) are not called fine either
    loose = [r for r in reports if r.ok and r not in coarse and _too_coarse(r)]
    coarse += loose
    for r in coarse:
        i = titles.index(r.label)
        rows[i] = dataclasses.replace(
            rows[i], name=f"rule {r.label}: no error found ({_resolution(r)})"
        )
    # fn fails: a rule checked at one of its calls only (a loop body at its first
    # iteration, a block called from one line) is not cleared of it, whether or not another
    # rule was found wrong (that one may not be all of fn's error)
    first_only = [
        r
        for r in reports
        if error is not None
        and r.ok
        and r not in coarse
        and r.label not in unreached
        and (
            "first iteration" in r.label
            or (getattr(by_label.get(r.label), "calls", 1) > 1 and r.label not in cleared)
        )
    ]
    for r in first_only:
        i = titles.index(r.label)
        where = "iteration" if "first iteration" in r.label else "call"
        some = calls_checked.get(r.label, 1)
        which = (
            f"at its first {where} only"
            if some == 1
            else f"at {some} of its {by_label[r.label].calls} calls only"
        )
        rows[i] = dataclasses.replace(rows[i], name=f"rule {r.label}: no error found {which}")
    # fn fails: a rule judged with the input entries at its kinks held fixed (a max at a
    # tie, a relu at 0) is not cleared of it either: a derivative wrong at such an entry
    # (one that sends a max's gradient to every tied entry) is what holding them hides
    at_kinks = [
        r
        for r in reports
        if error is not None
        and r.ok
        and r not in coarse + first_only
        and r.label not in unreached
        and any(q.startswith(_rules.KINKS_HELD) for q in r.problems)
    ]
    for r in at_kinks:
        i = titles.index(r.label)
        rows[i] = dataclasses.replace(rows[i], name=f"rule {r.label}: no error found off its kinks")
    fine = [r.label for r in reports if r.ok and r not in coarse and r not in first_only + at_kinks]
    if masked:
        problems.append(
            f"JAX's own rules that fail alone at the inputs fn gives them, while fn's "
            f"derivatives pass: {_with_rows(masked)}; their outputs do not reach fn's "
            "there (JAX masks them, as jnp.sinc does with jnp.where away from 0), so they "
            "are not counted as wrong"
        )
    if unseen:
        problems.append(
            f"rules whose derivatives fail alone at the inputs fn gives them, while fn's own "
            f"derivatives pass: {_with_rows(unseen)}; their error does not reach fn's "
            "derivatives here (an output fn masks or clips, a kink at inputs fn holds fixed, "
            "as a relu at entries fn keeps at 0?), or reaches them below fn's tolerance (a "
            "term fn weighs lightly), so they are not counted as wrong; check such a rule "
            "alone with jaxcheck.verify_rule at inputs fn reaches"
        )
    # passed, whether or not finely enough or at every call
    unfaulted = fine + [r.label for r in first_only + coarse + at_kinks]
    repeated = [
        f"{label} ({by_label[label].calls} calls, {calls_checked.get(label, 1)} checked)"
        for label in unfaulted
        if label in by_label and by_label[label].calls > 1 and label not in unreached | cleared
    ]
    if fine:
        # (a rule whose second derivative is wrong, a stop_gradient in its bwd, passes at
        # order 1: say what was checked)
        which = ""
        if order == 1:  # (under rules="auto", the order of fn's check that failed first)
            more = "; order=2 checks their second" if o.order == 1 else ""
            which = f" (their first derivatives{more})"
        problems.append(f"rules fine: {'; '.join(fine)}{which}")
    if unfaulted and error is not None and not wrong:
        # (those checked at one call only too: a gradient penalty's loop over layers)
        # (unless some were checked at one call or coarsely only: said below; or some
        # could not be checked at all, which may hold fn's error)
        unchecked = [rule.title for rule, row in zip(found, rows) if row.num_used == 0]
        outside = (
            "so fn's error is outside them, "
            if not (first_only or coarse or at_kinks or unchecked)
            else "so fn's error is outside them or in one not cleared (below), "
            if not unchecked
            else f"so fn's error is outside them or in one not checked ({'; '.join(unchecked)}), "
        )
        problems.append(
            f"every rule {'checked' if unchecked else 'found'} passes where it was checked at "
            f"order {order}, {outside}"
            "unless fn differentiates inside itself (jax.grad or jax.jvp in fn: a PINN "
            "residual, a MAML step, a gradient penalty): its derivative then takes "
            f"derivatives of order {order + 1} of the rules it differentiates, which these "
            f"checks do not clear (check each with jaxcheck.verify_rule(rule, *args, "
            f"order={order + 1})), and a rule called only inside such an inner derivative "
            "is not found here at all"
        )
    # (whether or not another rule was found wrong: that one may not be all of fn's error)
    if error is not None and repeated:
        problems.append(
            "a rule called several times from one line (a Python loop over layers, a "
            "shared block) was checked at some of its calls only (the first whose inputs "
            f"depend on params, and up to {_rule_search.MAX_OTHER_CALLS} others that the "
            f"failing leaves reach): {'; '.join(repeated)}; "
            "one wrong at the inputs of the others goes unseen there (check it with "
            "jaxcheck.verify_rule at those inputs)"
        )
    if at_kinks:
        problems.append(
            "a rule with kinks at the inputs fn gives it was judged with the input entries "
            "at them held fixed, so it is not cleared of fn's error: "
            f"{'; '.join(r.label for r in at_kinks)}; its derivative at those entries goes "
            "unjudged (a max at a tie, whose gradient over the tied entries must sum to fn's "
            "slope, not be given whole to each; a relu at 0): check that derivative by hand, "
            "or the rule with jaxcheck.verify_rule at inputs away from its kinks"
        )
    in_loops = [f for f in unfaulted if "first iteration" in f and f not in unreached]
    # (whether or not another rule was found wrong: that one may not be all of fn's error)
    if error is not None and in_loops:
        problems.append(
            f"a rule in a loop body was checked at the loop's first iteration only, so it is "
            f"not cleared of fn's error: {'; '.join(in_loops)}; one wrong at later iterations "
            "(at inputs that first iteration does not reach) goes unseen there (check it "
            "with jaxcheck.verify_rule at those inputs)"
        )
    if loose:
        each = "; ".join(f"{r.label} ({_resolution(r)})" for r in loose)
        problems.append(
            f"rules without an error found, but too coarse to call fine: {each}; a wrong rule "
            f"within that tolerance goes unseen (check it alone with jaxcheck.verify_rule at "
            "float32 inputs, where its own code may run in float64; a kernel that takes "
            "float32 alone is resolved no finer there)"
        )
    coarse = [r for r in coarse if r not in loose]
    if coarse:
        each = "; ".join(f"{r.label} ({_resolution(r)})" for r in coarse)
        problems.append(
            f"rules without an error found, but too coarse to clear them of fn's error "
            f"({error:.1e}; one below a rule's tolerance, amplified up to "
            f"{AMPLIFICATION:.0f} times by fn, could be it): {each}"
        )
    part = Report(
        status=Status.FAIL if wrong else Status.PASS,
        relative_error=head.relative_error if head is not None else 0.0,
        interval=head.interval if head is not None else (0.0, 0.0),
        tolerance=head.tolerance if head is not None else 0.0,
        noise_floor=head.noise_floor if head is not None else 0.0,
        checks=tuple(rows),
        leaves=(),
        held_fixed=(),
        mode="reverse",
        tested_dtype=reports[0].tested_dtype if reports else "",
        reference_dtype=reports[0].reference_dtype if reports else "",
        step=math.nan,
        steps_tried=(),
        num_directions=o.num_directions,
        num_nonsmooth=0,
        num_nonfinite=0,
        num_subgradient_consistent=0,
        num_evaluations=sum(r.num_evaluations for r in reports),
        problems=tuple(problems + notes),
        compile_seconds=sum(r.compile_seconds for r in reports),
        run_seconds=sum(r.run_seconds for r in reports),
        num_compiled=sum(r.num_compiled for r in reports),
        label=f"custom rule {head.label}" if head is not None else "custom rules",
        parts=tuple(reports),
    )
    return part, []


def _why_nonfinite(report: Report, fn_failed: bool) -> str:
    """For a rule whose own output is NaN/Inf at the inputs fn gives it, everywhere (where
    it is finite at some entries, those are judged: `_rules._finite_entries`): why, and
    what judges it (fn may discard those entries, as jnp.where(x > 0, log(x), 0) does)."""
    if report.status is not Status.NONFINITE or not any(
        _probe.output_nonfinite(q) for p in (report, *report.parts) for q in p.problems
    ):
        return ""
    cleared = ", so it is not cleared of fn's error" if fn_failed else ""
    return (
        ": its output is NaN/Inf at every entry it could be judged at, which fn may "
        f"discard (as jnp.where(x > 0, rule(x), 0) does){cleared}; check it with "
        "jaxcheck.verify_rule at inputs where it is finite"
    )


def _not_counted(rows: list, titles: list, reports: list, why: str) -> None:
    """Mark the rows of the rules whose `reports` failed alone as passed, saying `why` they
    are not counted (`rows[i]` is the row of the rule titled `titles[i]`)."""
    for r in reports:
        i = titles.index(r.label)
        name = f"{rows[i].name} ({why}{_report.NOT_COUNTED}"
        rows[i] = dataclasses.replace(rows[i], name=name, passed=True)


def _with_rows(reports: list) -> str:
    """ "<rule> (<its failing rows>); ..." for the rules of `reports`."""
    return "; ".join(f"{r.label} ({_failed_rows(r)})" for r in reports)


def _other_calls(fn, found, checked, o, order, error, failing) -> tuple[set, dict]:
    """Where fn fails, the other calls from one site of a rule that passed at the call
    checked (`Found.others`: a tree_map over params, a Python loop over layers), those
    the failing leaves reach, checked in turn until one fails, which replaces the first
    in `checked`: (the titles of the rules cleared at every call, {title: " at its call
    k of n" for each rule found wrong at a later call}, {title: how many of its calls
    were checked})."""
    cleared, at_call, counted = set(), {}, {}
    for i, rule in enumerate(found):
        report = checked[i][1]
        if not rule.others or report is None or report.status is not Status.PASS:
            continue
        reached = [
            (k, call)
            for k, call in rule.others
            if not failing or call.sources is None or call.sources & failing
        ]
        every = len(reached) + 1 == rule.calls
        reached = reached[: _rule_search.MAX_OTHER_CALLS]
        for k, call in reached:
            call = dataclasses.replace(call, calls=rule.calls)
            row, again, note = _check_one(fn, call, o, order, error, k)
            counted[rule.title] = counted.get(rule.title, 1) + 1
            if again is not None and again.status is Status.FAIL:
                checked[i] = (row, again, note)
                at_call[rule.title] = (
                    f" at its call {k} of {rule.calls} (the call checked first passes)"
                )
                break
        else:
            if every and len(reached) + 1 == rule.calls:  # every call checked
                cleared.add(rule.title)
    return cleared, at_call, counted


def _check_one(
    fn, rule: _rule_search.Found, o, order, error=None, call=1
) -> tuple[Comparison, Report | None, str]:
    nan = (math.nan, math.nan)
    if rule.inputs is None:
        row = Comparison(
            f"rule {rule.title}: not intercepted", math.nan, nan, 0.0, 0.0, 0.0, 0, False
        )
        note = (
            f"rule {rule.title}: its inputs could not be intercepted; the leaf-level verdict stands"
        )
        return row, None, note
    if _without_params(rule):
        return _not_checked(
            rule,
            "no floating-point input that depends on params (fn's data and constants are "
            "held fixed, as fn's derivative never asks for theirs), nothing to differentiate; "
            "not checked",
        )
    function, inputs, held = _finite_inputs(rule)
    token = TRACED_RULE.set(True)
    try:
        with _plan.explicit_mesh_of(inputs):
            report = _rules.check_rule(
                function,
                inputs,
                o.key,
                o.num_directions,
                # a rule as fn's trace recorded it is typed in fn's precision (its jvp too, with
                # the constants in it); in float64 it runs as fn's float64 trace recorded it,
                # and where fn refuses float64 it falls back, and says so, whatever fn's own
                # check asked for
                "auto" if o.precision == "float64" else o.precision,
                o.rtol,
                o.leaf_directions,
                identity=(fn, rule, held, call),
                # looking for the rule behind a failure: the rows finite differences see
                full=o.rules is True,
                order=order,
            )
    except Exception as err:  # noqa: BLE001 - one rule that cannot be checked is a note
        return _not_checked(rule, f"could not be checked ({one_line(err)})")
    finally:
        TRACED_RULE.reset(token)
    leaked = _leaked_tracer(report)
    if leaked:
        return _not_checked(
            rule,
            f"could not be checked alone: its derivative rule closes over a value computed "
            f"inside fn, or is given one in its nondiff_argnums ({leaked}); the leaf-level "
            "verdict stands. To check it, pass that value to the rule as a differentiable "
            "argument, or use jaxcheck.verify_rule on a function that does",
        )
    raised = _raised_alone(report)
    if raised:
        return _not_checked(
            rule,
            f"could not be checked alone ({raised}); fn's own derivative runs it, and the "
            "leaf-level verdict stands (a rule that needs its caller's setting, as equinox's "
            "filter_custom_vjp wrappers do, cannot be re-run apart from it); rules its "
            "function calls in turn are not reached either (check them with "
            "jaxcheck.verify_rule)",
        )
    report = dataclasses.replace(report, label=rule.title)
    note = ""
    if held:
        note = (
            f"rule {rule.title}: its inputs' entries that are -inf, inf or NaN in fn (a mask's "
            "-inf before a softmax, say) were held fixed, the others checked"
        )
    verdict = "all properties hold" if report.ok else _failed_rows(report) or report.status.value
    row = Comparison(
        f"rule {rule.title}: {verdict}",
        report.relative_error,
        report.interval,
        report.noise_floor,
        0.0,
        report.tolerance,
        0 if report.status in (Status.INCONCLUSIVE, Status.NONFINITE) else 1,
        report.status is not Status.FAIL,
    )
    return row, report, note


def _without_params(rule: _rule_search.Found) -> bool:
    """Whether the rule's call has no floating-point input that depends on params."""
    if rule.inputs is None:
        return False
    free = [x for i, x in enumerate(rule.inputs) if i not in rule.constants]
    return not any(_rule_rows.inexact(x) for x in jax.tree_util.tree_leaves(free))


def _same(a: _rule_search.Found, b: _rule_search.Found) -> bool:
    """Whether two calls found are of one rule object at one call site."""
    return (a.kind, a.name, a.where, a.identity) == (b.kind, b.name, b.where, b.identity)


def _finite_inputs(rule: _rule_search.Found) -> tuple:
    """(the rule as a function, its inputs, a digest of what is held fixed): where a
    floating input has entries that are not finite (a causal mask's -inf before a custom
    softmax), those entries are held at their values and the others differentiated, as
    the model's derivative does (a step from -inf stays -inf; the input's RMS and its
    differences would be Inf and NaN); the digest is empty where nothing is held."""
    function, inputs = rule.function(), rule.inputs
    masks = []
    for i, x in enumerate(inputs):
        if i in rule.constants or not (_tree.is_array(x) and _rule_rows.inexact(x)):
            continue
        values = np.asarray(_plan.host_array(x))
        finite = np.isfinite(values)
        if not finite.all():
            masks.append((i, finite, values))
    if not masks:
        return function, inputs, ()

    def held_fixed(*xs):
        xs = list(xs)
        for i, finite, values in masks:
            xs[i] = jax.numpy.where(finite, xs[i], values)
        return function(*xs)

    held_fixed.__name__ = function.__name__
    held_fixed.nondiff_argnums = function.nondiff_argnums
    inputs = list(inputs)
    for i, finite, values in masks:
        inputs[i] = jax.device_put(np.where(finite, values, 0).astype(values.dtype))
    digest = hashlib.sha1(b"".join(v.tobytes() + f.tobytes() for _, f, v in masks)).hexdigest()
    return held_fixed, tuple(inputs), (digest,)


def _not_checked(rule: _rule_search.Found, why: str) -> tuple[Comparison, None, str]:
    """The row and note of a rule found in fn that was not checked, and why."""
    nan = (math.nan, math.nan)
    row = Comparison(f"rule {rule.title}: not checked", math.nan, nan, 0.0, 0.0, 0.0, 0, False)
    return row, None, f"rule {rule.title}: {why}"


def _leaked_tracer(report: Report) -> str:
    """The first line of an UnexpectedTracerError some row of `report` raised, or "": a
    rule whose jvp or bwd closes over a value traced inside fn (not lifted into the rule's
    call as an argument) can only run inside fn's own trace."""
    for p in report.parts:
        for q in p.problems:
            if "UnexpectedTracerError" in q:
                return "UnexpectedTracerError"
    return ""


# a problem saying which exception a rule's row raised: "<row>: <ExceptionType>[: message]"
_RAISED = re.compile(r"^[\w ]+: ([A-Z]\w*(Error|Exception))(:|$)")


def _raised_alone(report: Report) -> str:
    """The first failing row's error where every failing row of a rule found in fn failed
    by raising, or "": fn's own derivative ran the rule (fn's check got that far), so an
    exception when it runs apart from fn is the re-run's, not a wrong derivative. Not
    where the rule cannot be traced (Python control flow on a traced value, which fn's
    own check may have run op by op): under jit, as most models are, that rule fails."""
    failing = [p for p in report.parts if p.status is Status.FAIL]
    if not failing:
        return ""
    for p in failing:
        raised = math.isinf(p.relative_error) and p.problems and _RAISED.match(p.problems[0])
        if not raised or "Tracer" in raised[1] or "Concretization" in raised[1]:
            return ""
    return failing[0].problems[0]


def _values_only(report: Report) -> bool:
    """Whether every failing row of a rule's check compares its derivative's values with
    finite differences (what fn's own check sees too, where they reach fn's derivatives)."""
    failing = [p for p in report.parts if p.status is Status.FAIL]
    return bool(failing) and all(p in _finite_difference_rows(report) for p in failing)


def _finite_difference_rows(report: Report) -> list:
    return [p for p in report.parts if p.label.startswith(FINITE_DIFFERENCE_ROWS)]


FINITE_DIFFERENCE_ROWS = ("vjp vs finite differences", "jvp vs finite differences")


# How much fn may amplify a rule's relative error: a loss that cancels (a difference of
# nearly equal terms) turned a float32 rule's 1e-4 error into 1e-1 of fn's gradient.
AMPLIFICATION = 1e3


def _coarser(report: Report, error, factor: float = 1.0) -> bool:
    """Whether a rule's finite differences cannot clear it of fn's relative error `error`
    (None: nothing to clear): an error below their tolerance, amplified by fn up to
    `factor` times, could reach it."""
    rows = _finite_difference_rows(report)
    return error is not None and any(_resolved(p) * factor >= error for p in rows)


def _resolved(row: Report) -> float:
    """The finest tolerance a rule's finite-difference row judged it to: that of the same
    rule in float64 where it was judged (a bfloat16 model's rule, recorded at bfloat16
    resolution, 7.8e-2, passed at 1e-6 there), else the row's own."""
    same = [c.tolerance for c in row.checks if _report.check_kind(c.name)[0] == "rule" and c.judged]
    return min(same, default=row.tolerance)


# A rule whose finite differences judge it no more finely than this is not called fine.
COARSE_RULE = 0.05


def _too_coarse(report: Report) -> bool:
    """Whether a rule's finite differences judge it no more finely than COARSE_RULE, or ran
    in a precision below float64 (where fn refuses float64: about 3e-4 on a small rule, and
    a rule 3e-4 off was called fine), or held a derivative below float64 to the square root
    of its epsilon (where its rule refuses float64, so nothing measures its rounding)."""
    return any(
        _resolved(p) >= COARSE_RULE
        or _below_float64(p.reference_dtype)
        or (
            _below_float64(p.tested_dtype)
            and _resolved(p) >= 0.99 * math.sqrt(_precision.eps(p.tested_dtype))
        )
        for p in _finite_difference_rows(report)
    )


def _resolution(report: Report) -> str:
    """ "finite differences in <dtype>, tolerance <t>" of a rule's coarsest such row."""
    p = max(_finite_difference_rows(report), key=_resolved)
    return f"finite differences in {p.reference_dtype}, tolerance {_resolved(p):.1e}"


def _failed_rows(report: Report) -> str:
    return ", ".join(p.label for p in report.parts if p.status is Status.FAIL)


def _failing_inputs(report: Report) -> str:
    """Where a rule fails when its error over all inputs together is within tolerance:
    ", within the tolerance over all its inputs together; failing alone: args[1]
    (relative error 5.0e-02)", or ""."""
    if not report.relative_error <= report.tolerance:
        return ""
    failing = [leaf for leaf in report.leaves if leaf.status is Status.FAIL]
    if not failing:
        return ""
    each = ", ".join(f"{leaf.path} (relative error {leaf.relative_error:.1e})" for leaf in failing)
    return f", within the tolerance over all its inputs together; failing alone: {each}"


def _raised(report: Report) -> str:
    """ "; <row>: <the error it raised>" for the first row that failed by raising (its
    relative error is inf), or ""."""
    for p in report.parts:
        if p.status is Status.FAIL and math.isinf(p.relative_error) and p.problems:
            return f"; {p.problems[0]}"
    return ""


def combine(report: Report, parts: list, notes: list, label: str = "") -> Report:
    """The gradient check's report with `parts` added (the report becomes composite), with
    `label` for what it checked where the report has none of its own."""
    if not parts:
        return dataclasses.replace(report, problems=report.problems + tuple(notes))
    base = report.parts or (dataclasses.replace(report, label="gradient"),)
    every = (*base, *parts)
    head = headline(every)
    status = head.status
    return dataclasses.replace(
        report,
        status=status,
        # the leaves of the part with the headline status, where it has any (grad_fn
        # failing on its float32 path against float32 differences); a rule's part has none
        leaves=head.leaves if head.leaves and head.status is not report.status else report.leaves,
        relative_error=head.relative_error,
        interval=head.interval,
        tolerance=head.tolerance,
        noise_floor=head.noise_floor,
        checks=report.checks + tuple(c for p in parts for c in p.checks),
        problems=report.problems + tuple(q for p in parts for q in p.problems) + tuple(notes),
        num_evaluations=report.num_evaluations + sum(p.num_evaluations for p in parts),
        compile_seconds=report.compile_seconds + sum(p.compile_seconds for p in parts),
        run_seconds=report.run_seconds + sum(p.run_seconds for p in parts),
        num_compiled=report.num_compiled + sum(p.num_compiled for p in parts),
        label=report.label or label,
        parts=every,
    )
