"""Localization: which leaves are checked on their own (all of them after a failure; after a
pass, those too small for the all-leaf check to see a 0.1 % error in them), the per-leaf
checks along leaf-local directions, and how their results change the overall status."""

import dataclasses
import math

import numpy as np

from . import _directions, _jitter, _ladder, _precision, _report, _sequential, _tree, _verdict
from ._report import LeafResult, Status
from ._state import Run

LEAF_INDEX_OFFSET = 2**30  # leaf-local directions use indices disjoint from the global ones
COVERAGE_ERROR = 1e-3  # leaves where a 0.1 % error might go unseen globally are checked alone


def chosen_leaves(
    localize,
    status: Status,
    share,
    tolerance: float,
    num_leaves: int,
    floor: float | None,
    upper: float = math.inf,
) -> list:
    """Indices of the leaves to check alone, given the `localize` option, the all-leaf
    status, tolerance and upper bound of the measured error, each leaf's share of the
    all-leaf projections (None when the directions were not balanced against the
    gradient, in forward mode alone), and the caller's floor on every tolerance (`rtol`)."""
    if localize is True or (localize == "auto" and status is Status.FAIL):
        return list(range(num_leaves))
    if localize != "auto" or num_leaves < 2:  # one leaf: the all-leaf check was its own
        return []
    if status is Status.INCONCLUSIVE:
        # a kink or noise along the all-leaf directions may sit in some leaves only: the
        # others are judged along their own directions (a wrong one fails the check)
        return list(range(num_leaves))
    if status is not Status.PASS:
        return []
    if share is None:
        # forward mode alone: no gradient weighed the leaves, so a leaf of small share in
        # the directional derivative can hide any error: every leaf is checked alone
        return list(range(num_leaves))
    if (floor or 0.0) < COVERAGE_ERROR:
        # leaves whose 0.1 % error the all-leaf check could not see: check them alone
        return [i for i, s in enumerate(share) if COVERAGE_ERROR * math.sqrt(s) <= tolerance]
    # a loose floor (check_grads' atol=rtol=0.2): an error that size in one leaf adds
    # about floor * sqrt(share) to the all-leaf error; leaves where the measured error's
    # upper bound does not rule that out are checked alone (none where the derivative and
    # its error are exactly zero: a second derivative of a linear map)
    return [i for i, s in enumerate(share) if floor * math.sqrt(s) < upper]


def within_accepted_rounding(run: Run, leaves, head) -> tuple:
    """`leaves` with those that fail alone by no more than the all-leaf tolerance `head`
    allowed not judged, where that check passed on taking the gap between the derivative
    and the same rule in the reference precision for rounding (a loss that cancels): a
    leaf's share of that rounding is larger relative to its own, smaller gradient (a bias
    beside the weights of confident logits: 1.9e-4 against its tolerance of 1.2e-4, where
    all leaves together allowed 7.9e-4)."""
    out, named = [], []
    for leaf in leaves:
        if leaf.status is Status.FAIL and leaf.relative_error <= head.tolerance:
            leaf = dataclasses.replace(leaf, status=Status.INCONCLUSIVE)
            named.append(leaf.path or "(root)")
        out.append(leaf)
    if named:
        run.problems.append(
            f"{', '.join(named)}: checked alone, off by no more than the tolerance "
            f"{head.tolerance:.1e} that the rounding accepted for all leaves together allows; "
            "not judged"
        )
    return tuple(out)


def localize(run: Run, scales, leaf_k, h, paths, chosen, sequential=False, fixed=False) -> tuple:
    """One `LeafResult` per chosen leaf, from up to `leaf_k` directions along that leaf
    alone: with `sequential`, 4 first, then more only for the leaves whose verdict is
    still in doubt (`_sequential`).

    A leaf that fails by no more than the derivative's own rounding allows, where nothing
    more precise measured it (`_jitter`), is inconclusive: at a stationary point the
    derivative is rounding, and along one leaf's directions the finite differences can
    resolve their own rounding of it finely. A leaf along which fn is flat at the step
    while the derivative under test is not is looked at again at the largest step (unless
    the caller `fixed` the step), as the all-leaf check does: a staircase of a low
    precision moves there, a fn truly constant in the leaf stays flat and is judged.
    """
    run.leaf_checks = True
    try:
        return _localize(run, scales, leaf_k, h, paths, chosen, sequential, fixed)
    finally:
        run.leaf_checks = False


# where a failing leaf's note of a constant factor (`_verdict.constant_factor`) says it holds
OF_THE_LEAF = "every direction of it"


def _localize(run: Run, scales, leaf_k, h, paths, chosen, sequential, fixed) -> tuple:
    sequential = sequential and run.plan.direction_sharding is None
    ks = _sequential.looks(leaf_k, sequential, run.looks_kind)
    results, pending, choices, within, zero, rounded = {}, list(chosen), {}, [], [], []
    rounded_over = []  # (path, head): absolute for the derivative's rounding alone
    retry = {}  # leaf: its larger scale, where at its own its derivative is lost in noise
    on_gap = {}  # leaf path: its gap, where its pass rests on that gap being rounding
    factors = []  # (leaf path, `_verdict.constant_factor`'s note) of failing leaves
    surrogates = []  # (leaf path, the note that fn is flat along it) of failing leaves
    for n in ks:
        if not pending:
            break
        index = np.tile(LEAF_INDEX_OFFSET + np.arange(n, dtype=np.int32), len(pending))
        rows = np.repeat(np.diag(scales)[pending], n, axis=0)
        groups = [slice(j * n, (j + 1) * n) for j in range(len(pending))]
        if n == ks[0]:
            found = _ladder.ladder(run, index, rows, h, groups)
            if not fixed:
                found = _flat_at_largest(run, index, rows, h, groups, found)
        else:  # more directions at the step each leaf's first look settled on
            found = _ladder.extend(run, index, rows, h, groups, [choices[i] for i in pending])
            redo = [
                j
                for j, (p, _, _) in enumerate(found)
                if not _sequential.step_fits(run, p, _verdict.compare(run, p), n)
            ]
            if redo:  # the step is chosen again for these leaves, on all n directions
                picked, sub = _ladder.pick_groups(groups, redo, len(index))
                again = _ladder.ladder(run, index[picked], rows[picked], h, sub)
                if not fixed:
                    again = _flat_at_largest(run, index[picked], rows[picked], h, sub, again)
                for j, r in zip(redo, again):
                    found[j] = r
        still = []
        for leaf, (p, _, choices[leaf]) in zip(pending, found):
            checks = _verdict.compare(run, p)
            said = []
            status = _verdict.status(run, p, checks, n, said)
            if n < leaf_k and not _sequential.settled(p, checks, status, n, len(ks))[0]:
                still.append(leaf)
                continue
            if status is Status.FAIL and _jitter.explains(run, p, np.diag(scales)[leaf]):
                status = Status.INCONCLUSIVE
                within.append(paths[leaf] or "(root)")
            elif status is Status.FAIL and _rule_row_at_zero(checks):
                status = Status.INCONCLUSIVE
                rounded.append(paths[leaf] or "(root)")
            head, x = _verdict.head(checks, status), run.inputs.diff[leaf]
            if status is Status.PASS and _jitter.rests_on_gap(run, p, head):
                on_gap[paths[leaf] or "(root)"] = head.gap
            if status is Status.PASS and head.absolute and not fixed:
                larger = _negligible(run, scales, leaf)
                if larger is not None:  # (at a tenth of the others' scale, below)
                    retry[leaf] = larger
                    continue
            if status is Status.PASS and head.absolute:
                if head.resolved and head.rounding_measured:  # (`_verdict.rounding_as_large`)
                    rounded_over.append((paths[leaf] or "(root)", head))
                else:
                    zero.append(paths[leaf] or "(root)")
            if status is Status.FAIL:
                factor = _verdict.constant_factor(
                    p, head.tolerance, int(np.size(x)), along=OF_THE_LEAF
                )
                if factor is not None:
                    factors.append((paths[leaf] or "(root)", factor))
                # (a straight-through estimator beside ordinary leaves: flat along its own)
                flat = next((q for q in said if _verdict.SURROGATE in q), None)
                if flat is not None:
                    surrogates.append((paths[leaf] or "(root)", flat))
            results[leaf] = LeafResult(
                paths[leaf],
                tuple(x.shape),
                str(x.dtype),
                head.relative_error,
                head.interval,
                head.tolerance,
                p.fd.num_nonsmooth,
                status,
                n,
            )
        pending = still
    if retry:
        wider = np.asarray(scales, np.float64).copy()
        wider[list(retry)] = list(retry.values())
        again = _localize(run, wider, leaf_k, h, paths, list(retry), sequential, fixed)
        results.update(zip(retry, again))
    if not any(q.startswith(_verdict.FACTOR) for q in run.problems):
        # (a factor on some leaves only: the all-leaf comparison is no multiple)
        run.problems.extend(f"{path}: {factor}" for path, factor in factors)
    run.problems.extend(f"{path}, checked alone: {note}" for path, note in surrogates)
    _note_gaps_on_another_path(run, on_gap)
    if within:
        run.problems.append(f"{', '.join(within)}: {_jitter.WITHIN_ROUNDING}")
    if rounded:
        one = len(rounded) == 1
        run.problems.append(
            f"{', '.join(rounded)}: checked alone, the derivative is zero to within noise and "
            f"the {run.tested.name} derivative passes, but the same rule in float64 does not "
            "quite: fn hardly changes with "
            f"{'this leaf' if one else 'these leaves'}, and its float64 finite differences "
            "are noisier than its output's size tells where fn cancels inside (a variance of "
            "values offset far from zero, say); not judged"
        )
    if zero:
        it = "it" if len(zero) == 1 else "them"
        # (in the model's own precision the noise may hide a derivative of ordinary size)
        less = (
            f", or by less than finite differences in {np.dtype(run.reference).name} resolve"
            if run.native_differences
            else ""
        )
        run.problems.append(
            f"{', '.join(zero)}: the derivative is zero to within finite-difference noise or "
            "rounding along every direction of "
            f"{'this leaf' if len(zero) == 1 else 'these leaves'} (fn does not change with "
            f"{it} here{less}: a bias before a softmax or a "
            "normalization, a parameter cut off from the loss?); judged in absolute terms, "
            "hence a relative error of at most about 1 against a tolerance of 2"
        )
    if rounded_over:
        # (one note for them all, with the largest noise floor among them)
        head = max((h for _, h in rounded_over), key=lambda h: h.noise_floor)
        named = ", ".join(path for path, _ in rounded_over)
        run.problems.append(_verdict.rounding_as_large(run, head, f"{named}: "))
    return tuple(results[leaf] for leaf in chosen)


def unrounded(run: Run, option) -> list:
    """Where the all-leaf check judged at the resolution of a dtype fn rounds to inside
    (`run.rounds_to`), the leaves whose values reach no such cast (`Problem.unrounded`),
    with elements: fn is smooth along their own directions, which judge them at the
    reference's resolution (a weight of a model that casts its bias alone to float32, a
    no-op in fn and a rounding in the float64 reference). None with `localize=False`."""
    if run.rounds_to is None or option is False:
        return []
    return [i for i in run.problem.unrounded if np.size(run.inputs.diff[i])]


# where finite differences run in the model's precision, an all-leaf pass blind to a leaf
# unjudged alone is inconclusive only where the leaf's own check cannot rule out an error
# of this size in it
NATIVE_DOUBT = 0.1
# ... and a leaf failing alone by no more than this factor over its tolerance, within its
# error bars, is not judged there (`within_native_bars`)
NATIVE_NEAR = 1.25
# where finite differences run in the model's precision, or judge at the resolution of a
# lower precision fn rounds to inside, a leaf checked alone moves at least by this share
# of the parameters' pooled RMS (times the relative step)
ALONE_SHARE = 0.1


def _scales_alone(run: Run, scales):
    """The leaves' scales for their checks alone: where finite differences run in the
    model's precision (fn refusing float64), or judge at the resolution of a lower
    precision fn rounds to inside (`run.rounds_to`), a leaf far smaller than the
    parameters' pooled RMS, and whose entries have both signs, moves by
    `ALONE_SHARE` of it. At its own size (a bias of 1e-4 beside weights of 0.4) the
    change of fn is below float32 rounding, and a gradient zeroed, negated or 1 % off could
    not be judged (a zeroed bias of 1e-3 beside float32-cast weights passed). Elsewhere,
    `scales` as they are."""
    if not (run.native_differences or run.rounds_to is not None):
        return scales
    values = np.asarray(scales, np.float64)
    sizes = [max(np.size(x), 1) for x in run.inputs.diff]
    floor = ALONE_SHARE * float(_directions.pooled(values, sizes))
    if not (np.isfinite(floor) and floor > 0):
        return values
    out = values.copy()
    for i, x in enumerate(run.inputs.diff):
        # (a leaf of one sign, a scale or variance inside a log or a sqrt, keeps its own
        # size: moved by more, it would leave fn's domain)
        if values[i] < floor and np.size(x) and _directions.both_signs(x):
            out[i] = floor
    return out


def _negligible(run: Run, scales, leaf: int) -> float | None:
    """A tenth of the parameters' pooled RMS, for a leaf whose derivative came out zero to
    within noise at its own scale, where that scale is below the cube root of the
    reference's eps times the pooled RMS (5e-6 in float64) and its entries have both
    signs; else None. At 1e-16 beside weights of 0.3 a leaf moves fn by less than float64
    rounding, and its gradient negated passed as "zero to within noise" (the same leaf at
    exactly 0, moved at the others' scale, failed); a small leaf fn reads at its own scale
    (cos(1e4 w) for w near 1e-4) has a derivative there, and keeps its scale."""
    values = np.asarray(scales, np.float64)
    sizes = [max(np.size(x), 1) for x in run.inputs.diff]
    pooled = float(_directions.pooled(values, sizes))
    ref = run.reference or _precision.reference_dtype(run.policy, run.tested)
    x = run.inputs.diff[leaf]
    small = values[leaf] < _precision.eps(ref) ** (1 / 3) * pooled
    if small and np.isfinite(pooled) and np.size(x) and _directions.both_signs(x):
        return ALONE_SHARE * pooled
    return None


def localize_finely(run: Run, scales, leaf_k, h, paths, chosen, fine, step, sequential=False):
    """`localize` over the leaves `chosen` and `fine` (see `unrounded`): these at the
    reference's resolution and its own step (or the caller's `step`), the others as the
    all-leaf check was judged, at `h`. One `LeafResult` per leaf, in leaf order."""
    fixed = step is not None
    if not fixed:
        scales = _scales_alone(run, scales)
    coarse = [i for i in chosen if i not in fine]
    found = dict(zip(coarse, localize(run, scales, leaf_k, h, paths, coarse, sequential, fixed)))
    if fine:
        # (nor is the noise the all-leaf directions measured theirs: that was the
        # staircase of the cast, along which these leaves do not move; a gradient zeroed
        # by a stop_gradient was "zero to within noise" there, and passed)
        rounds_to, run.rounds_to = run.rounds_to, None
        noise, run.fn_noise = run.fn_noise, None
        try:
            h_fine = step if fixed else _precision.default_step(run.reference)
            alone = localize(run, scales, leaf_k, h_fine, paths, fine, sequential, fixed)
            found.update(zip(fine, alone))
        finally:
            run.rounds_to, run.fn_noise = rounds_to, noise
        named = ", ".join(paths[i] or "(root)" for i in fine)
        run.problems.append(
            f"{named}: {'its values reach' if len(fine) == 1 else 'their values reach'} no "
            f"such cast to {rounds_to.name}: checked alone at {run.reference.name} "
            "resolution"
        )
    return tuple(found[i] for i in sorted(found))


def _note_gaps_on_another_path(run: Run, on_gap: dict) -> None:
    """Say which leaves passed alone only on taking their gap (`on_gap`, path: gap) to the
    same rule in the reference precision for rounding, where the derivative is another
    program in the model's precision than in the reference's while fn is not (a rule or
    grad_fn with a branch on the dtype): the note (`_verdict.ROUNDING_GAP`) has the rules
    checked on their own in the model's precision, which tells a bug on that path from
    rounding. A float32-only bug in a leaf of small share (a bias whose gradient is 500
    times below the weights') is too small a part of the all-leaf gap to be noted there,
    and the leaf's own tolerance, twice its gap, passes it at any size; neither the move
    of the derivative with params nor finite differences in float32 tell it apart from
    the rounding of a leaf at its optimum (tried on 880 correct checks: 421 failed)."""
    if not on_gap or run.other_function or not _jitter.other_path(run):
        return
    t, r = run.tested.name, run.reference.name
    finer = (
        f"nothing here judges grad_fn's {t} path more finely: check it where this leaf's "
        "gradient is not small"
        if run.problem.grad_fn is not None
        else f"a custom rule's own check in {t} tells it from a bug on that path"
    )
    for path, gap in on_gap.items():
        run.problems.append(
            f"{path}: checked alone, its {t} derivative differs from the same rule in {r} by "
            f"{gap:.1e} (relative), {_verdict.ROUNDING_GAP} of a well-conditioned "
            f"computation, and it is another program in {t} than in {r} while fn is not (a "
            f"rule or grad_fn with a branch on the dtype?): the pass takes that gap for "
            f"rounding, as at a leaf's optimum, where the derivative is rounding; {finer}"
        )


def _rule_row_at_zero(checks) -> bool:
    """Whether a leaf fails only in the rows of the same rule in float64, each judged in
    absolute terms (the leaf's derivative is zero to within noise), while the derivative
    under test passes: fn hardly changes with the leaf, and float64 finite differences of
    a fn that cancels inside (a variance of values offset far from zero) are noisier than
    its output's size tells."""
    rows = [(_report.check_kind(c.name)[0], c) for c in checks]
    failing = [(kind, c) for kind, c in rows if not c.passed]
    tested = [c for kind, c in rows if kind == "tested"]
    return (
        bool(failing)
        and bool(tested)
        # (judged: where fn computes another function in float64, the float32 rows are
        # shown unjudged, and the float64 rule leads)
        and all(c.passed and c.judged for c in tested)
        and all(kind == "rule" and c.absolute for kind, c in failing)
    )


def _flat_at_largest(run: Run, index, rows, h, groups, found) -> list:
    """`found` with the groups that are flat at their step, while the derivative under
    test is not, taken again by the ladder from the largest step (their choices rescaled
    to factors of h, with the full stencil, for the looks that add directions)."""
    redo = []
    for j, (p, _, _) in enumerate(found):
        flat = _verdict.flat_directions(p)
        if flat is not None and not flat[1] and p.step < run.max_step:
            redo.append(j)
    if not redo:
        return found
    found = list(found)
    picked, sub = _ladder.pick_groups(groups, redo, len(index))
    f = run.max_step / h
    for j, (p, steps, c) in zip(redo, _ladder.ladder(run, index[picked], rows[picked], h * f, sub)):
        crossed = None if c.crossed_at is None else c.crossed_at * f
        c = _ladder.Choice(c.factor * f, 4, c.from_data, crossed)
        found[j] = (p, (*found[j][1], *steps), c)
    return found


def _cut_off(run: Run, failing: list) -> list:
    """The failing leaves whose derivative under test is exactly zero (by the probe)."""
    norms = run.probe.get("grad_norms")
    if norms is None:
        return []
    paths = run.problem.params.paths_of(_tree.DIFF)
    zero = {path for path, norm in zip(paths, norms) if norm == 0}
    return [path or "(root)" for path in failing if path in zero]


# said where an all-leaf check that could not judge passes on its leaves alone
LEAF_BY_LEAF = "the gradient is judged leaf by leaf"


NO_SINGLE_LEAF = "no single leaf fails on its own"
# how the note on leaves whose derivative under test is zero while fn changes goes on
CUT_OFF = "the derivative under test is exactly zero for"


def within_native_bars(run: Run, status: Status, leaves) -> tuple:
    """`leaves`, with those that fail alone only within their own error bars (the lower
    end of the 95 % interval at or below the tolerance, the estimate no more than
    `NATIVE_NEAR` times it: a 3 % bug measured at 1.9 times its tolerance fails) not
    judged, where finite differences run in the model's precision and the all-leaf check
    passes: their noise floor is itself measured along few directions, and a float32 ReLU
    network's kinks bend the differences by a few percent (a correct classifier's first
    layer failed alone at 3.4e-2 against its tolerance of 3.3e-2, and passed at other
    keys)."""
    if not run.native_differences or status is not Status.PASS:
        return leaves
    near = [
        leaf
        for leaf in leaves
        if leaf.status is Status.FAIL
        and leaf.interval[0] <= leaf.tolerance
        and leaf.relative_error <= NATIVE_NEAR * leaf.tolerance
    ]
    if not near:
        return leaves
    run.problems.append(
        f"fail alone only within their error bars, in {np.dtype(run.reference).name}, while "
        "the all-leaf check passes: "
        + ", ".join(
            f"{leaf.path or '(root)'} (relative error {leaf.relative_error:.1e}, 95% from "
            f"{leaf.interval[0]:.1e}, tolerance {leaf.tolerance:.1e})"
            for leaf in near
        )
        + "; not judged (more directions, num_directions, narrow the bars)"
    )
    return tuple(
        dataclasses.replace(leaf, status=Status.INCONCLUSIVE) if leaf in near else leaf
        for leaf in leaves
    )


def _measured_alone(leaf) -> str:
    """What a leaf's check alone measured, for a note."""
    if math.isnan(leaf.relative_error):
        return "no estimate: none of its directions was smooth with finite values"
    return f"relative error {leaf.relative_error:.1e}, 95% up to {leaf.interval[1]:.1e}"


def merge_leaves(run: Run, status: Status, leaves, num_leaves: int = 0) -> Status:
    """The overall status once the leaves are checked: a failing leaf fails the check
    (a non-finite one stays so), and is named. An all-leaf check that could not judge
    passes where every one of its `num_leaves` leaves passes alone: the gradient is its
    leaves' gradients side by side."""
    failing = [leaf.path or "(root)" for leaf in leaves if leaf.status is Status.FAIL]
    if failing:
        # (before the failing leaves' own notes of a constant factor, which it names)
        at = next((i for i, q in enumerate(run.problems) if OF_THE_LEAF in q), len(run.problems))
        run.problems.insert(at, f"wrong: {', '.join(failing)}")
        cut = _cut_off(run, [leaf.path for leaf in leaves if leaf.status is Status.FAIL])
        if cut:
            one = len(cut) == 1
            it, they = ("it", "it is") if one else ("them", "they are")
            run.problems.append(
                f"{', '.join(cut)}: {CUT_OFF} "
                f"{'this leaf' if one else 'these leaves'} while fn changes with {it}: a "
                "jax.lax.stop_gradient (or a custom rule returning zeros, a value passed "
                "in a custom_jvp/custom_vjp's nondiff_argnums, which JAX does not "
                "differentiate, a cast to an integer, or .item() on a value computed from "
                f"params) cuts {it} off; so does a rule at a point where it takes the "
                "derivative 0 (abs of a complex 0: JAX's second derivative of abs(z)**2 "
                "there is 0, not 2). If "
                f"{they} meant to be held fixed (a hyperparameter such as a dropout rate), "
                f"pass {it} to fn as an argument or leave {it} out of params (equinox: "
                "eqx.partition(model, eqx.is_inexact_array)); if not, that is the bug"
            )
        return Status.FAIL if status is not Status.NONFINITE else status
    unjudged = [leaf.path or "(root)" for leaf in leaves if leaf.status is Status.INCONCLUSIVE]
    others_pass = all(leaf.status in (Status.PASS, Status.INCONCLUSIVE) for leaf in leaves)
    if status is Status.FAIL and unjudged and others_pass:
        # (a straight-through estimator on one leaf: fn is flat along it, so alone it
        # cannot be judged, while the all-leaf directions see its derivative unmatched)
        run.problems.append(
            f"{NO_SINGLE_LEAF}, but {', '.join(unjudged)} could not be judged alone while "
            "every other leaf passes: the error is there. Finite differences cannot judge "
            "a leaf that fn is flat or kinked along; where fn is flat in it (round, floor, "
            "a comparison) and the derivative under test is not zero, that derivative is a "
            "surrogate (a straight-through estimator?), which fails this check by design"
        )
    elif status is Status.FAIL and len(leaves) == 1:
        # (one leaf: its own check and the all-leaf one estimate the same error, on either
        # side of the tolerance)
        [leaf] = leaves
        run.problems.append(
            f"{leaf.path or '(root)'}, the only leaf, passes checked alone (relative error "
            f"{leaf.relative_error:.1e}, tolerance {leaf.tolerance:.1e}): the error is at "
            "the tolerance, where two estimates of it fall on either side; more directions "
            "(verify's num_directions) narrow its interval"
        )
    elif status is Status.FAIL:
        run.problems.append(
            f"{NO_SINGLE_LEAF}: the error is spread thinly over several leaves, or comes "
            "from their interaction"
        )
    passing = [leaf for leaf in leaves if leaf.status is Status.PASS]
    if status is Status.INCONCLUSIVE and num_leaves > 1 and len(passing) == num_leaves:
        # (a leaf at 0 beside leaves at 1e4 moves by their RMS along the all-leaf
        # directions, far beyond where fn is smooth in it; alone it moves by its own scale)
        run.problems.append(
            f"every one of the {num_leaves} leaves passes checked alone, along directions "
            f"scaled to it: {LEAF_BY_LEAF} (the all-leaf directions, scaled to all the "
            "leaves together, could not judge it, as the note above says)"
        )
        return Status.PASS
    return status


def fails_in_rule_row_at_zero(status: Status, leaves, checks) -> bool:
    """Whether the all-leaf check fails only in its rows of the same rule in float64, in
    absolute terms (the derivative is zero to within noise), while the derivative under
    test passes and no leaf checked alone fails: float64 finite differences of a fn that
    cancels inside (a layer norm of values offset far from zero, nearly invariant to its
    scale and shift) are noisier than its output's size tells (`not_judged_at_zero`)."""
    return (
        status is Status.FAIL
        and _rule_row_at_zero(checks)
        and bool(leaves)
        and not any(leaf.status is Status.FAIL for leaf in leaves)
    )


def not_judged_at_zero(run: Run) -> Status:
    """INCONCLUSIVE, said where `fails_in_rule_row_at_zero` holds."""
    run.problems.append(
        "only the same rule in float64 fails, in absolute terms, while the derivative under "
        "test passes and no leaf fails checked alone: fn hardly changes here, and its "
        "float64 finite differences are noisier than its output's size tells where fn "
        "cancels inside (a normalization of values offset far from zero, say); not judged"
    )
    return Status.INCONCLUSIVE


def _resolved_alone(run: Run, leaves, head, vouched) -> None:
    """Where finite differences run in the model's precision, the leaves that passed
    checked alone at more than twice the all-leaf check's tolerance, where that check,
    weighing them by their share, vouches for them (`vouched`) no better: the resolution
    reached for them (a float32-only leaf of 131,072 entries with its gradient 1 % off
    passed alone at a tolerance of 1.7 %, under an all-leaf 0.38 %)."""
    loose = [
        leaf
        for leaf in leaves
        if leaf.status is Status.PASS
        and 2 * head.tolerance < leaf.tolerance < 1.0
        and not vouched(leaf) <= leaf.tolerance
    ]
    if loose:
        named = ", ".join(f"{leaf.path or '(root)'} to {leaf.tolerance:.1e}" for leaf in loose)
        run.problems.append(
            f"leaves checked alone in {np.dtype(run.reference).name} to a coarser tolerance "
            f"than the all-leaf {head.tolerance:.1e}: {named}; an error below that in them "
            "passes where the all-leaf check, which weighs each leaf by its share, does not "
            "see it (float64 finite differences, where fn can run in float64, or "
            "jaxcheck.verify_rule on a custom rule, resolve more finely)"
        )


def _name_unjudged(run: Run, unjudged, head, vouched, where: str = "") -> None:
    """Under an all-leaf pass, name the leaves `unjudged` that could not be judged alone
    (a kink crossed along their own directions, their check too noisy; checked `where`,
    " in float32" say) with what they measured and the error from which the pass would
    see them (`vouched`, where known); else only their row in the table said so."""
    if not unjudged:
        return
    named = ", ".join(
        f"{leaf.path or '(root)'} ({_measured_alone(leaf)}"
        + (
            f"; the pass sees an error in it from {vouched(leaf):.1e}"
            if math.isfinite(vouched(leaf))
            else ""
        )
        + ")"
        for leaf in unjudged
    )
    run.problems.append(
        f"checked alone{where}, not judged: {named}; the all-leaf pass (tolerance "
        f"{head.tolerance:.1e}) covers {'it' if len(unjudged) == 1 else 'them'} as far as it "
        f"weighs {'it' if len(unjudged) == 1 else 'them'}"
    )


def coarse_pass(run: Run, status: Status, leaves, head, shares=None) -> Status:
    """An all-leaf pass judged at a coarse resolution (fn's own half-precision rounding:
    a noise floor beyond `_verdict.MAX_NOISE_FLOOR`) vouches for a leaf only as far as that
    leaf, checked alone, agrees: a leaf that could not be judged alone, whose measured error
    may exceed the all-leaf tolerance, makes the check inconclusive (a leaf's derivative
    2x off in a model with bfloat16 matmuls passed, its own check measuring 0.5).

    Where finite differences run in the model's precision (fn refusing float64), the
    all-leaf check sees an error e in a leaf of share s of its projections (`shares`, by
    path; None in forward mode) as about e sqrt(s), so it vouches for that leaf up to its
    tolerance / sqrt(s): a leaf unjudged alone that it cannot see even wholly wrong (beyond
    1), and whose own check cannot rule out an error of `NATIVE_DOUBT`, makes the check
    inconclusive (a float32-only model's bias of 1e-4 beside weights of 0.4 passed with
    its gradient zeroed, negated or 1 % off); the others are named, with what the pass
    vouches for. Under any other pass, the leaves not judged alone are named
    (`_name_unjudged`)."""
    coarse = head.noise_floor > _verdict.MAX_NOISE_FLOOR
    native = run.native_differences
    if status is not Status.PASS:
        return status

    def vouched(leaf) -> float:
        share = (shares or {}).get(leaf.path)
        if share is None:
            return math.nan  # (unknown: named, not counted)
        return math.inf if share <= 0 else head.tolerance / math.sqrt(share)

    if not (coarse or native):
        unjudged = [leaf for leaf in leaves if leaf.status is Status.INCONCLUSIVE]
        _name_unjudged(run, unjudged, head, vouched)
        return status

    if native:
        _resolved_alone(run, leaves, head, vouched)
    unjudged = [
        leaf
        for leaf in leaves
        if leaf.status is Status.INCONCLUSIVE and not leaf.interval[1] <= head.tolerance
    ]

    # (where its own check bounds its error below NATIVE_DOUBT, the leaf is named only)
    doubtful = (
        unjudged
        if coarse
        else [
            leaf
            for leaf in unjudged
            if vouched(leaf) > 1.0 and not leaf.interval[1] <= NATIVE_DOUBT
        ]
    )
    partly = [leaf for leaf in unjudged if leaf not in doubtful]
    _name_unjudged(run, partly, head, vouched, f" in {np.dtype(run.reference).name}")
    if not doubtful:
        return status
    named = ", ".join(f"{leaf.path or '(root)'} ({_measured_alone(leaf)})" for leaf in doubtful)
    how = (
        "at a coarse resolution"
        if coarse
        else f"in {np.dtype(run.reference).name}, where it cannot see an error in "
        f"{'this leaf' if len(doubtful) == 1 else 'these leaves'} even as large as "
        f"{'its' if len(doubtful) == 1 else 'their'} gradient"
    )
    run.problems.append(
        f"the all-leaf check passes {how} (tolerance {head.tolerance:.1e}), "
        f"but {named} could not be judged alone, and {'its' if len(doubtful) == 1 else 'their'} "
        "error may exceed that tolerance: not judged"
    )
    return Status.INCONCLUSIVE
