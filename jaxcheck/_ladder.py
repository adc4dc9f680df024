"""The step ladder: for each group of directions, the finite-difference step at which the
error model trusts the differences. Central differences at the starting step settle a clear
pass; otherwise the full stencil is taken and the step moves (smaller across kinks, larger
for a fn that computes in a lower precision, to the roundoff/truncation balance when the
noise is above target)."""

import dataclasses

import numpy as np

from . import _differences, _error_model, _evaluate, _precision, _sequential, _verdict
from ._state import Pass, Run

# |d4| / h over the one-sided slopes' difference above which fourth differences that scale
# with the step are taken for kinks (a kink's is of order 1; rounding of the inputs near a
# minimum, 1e-11 measured)
KINK_SHARE = 0.01
# the noise floor at which a smaller step, whose fourth differences show the larger one to
# be truncation-bound, is kept (a hundredth of the floor at which nothing is judged)
TRUNCATION_RESOLVED = 2.5e-4
# at most this many steps 16 times smaller again, where each shrinks the truncation error
MORE_DESCENTS = 4


@dataclasses.dataclass(frozen=True)
class Choice:
    """Where the ladder settled for a group: the factor on the starting step, the stencil
    points per direction (2: central differences settled it; 4: Richardson), whether the
    noise was estimated from the fourth differences (not where they are kinks), and the
    smaller step that showed kinks or jumps at the point, to look at again for more
    directions."""

    factor: float = 1.0
    points: int = 4
    from_data: bool = True
    crossed_at: float | None = None  # a smaller factor at which directions cross a kink


def ladder(run: Run, index, rows, h, groups):
    """Finite differences for each group of directions (a slice of the rows), each with
    its own step: the step h times a factor applied to the group's rows.

    First, central differences D(h) from two points per direction. A group whose checks
    all pass with a margin (the derivative agrees with D(h) to within half the
    tolerance, or to its own measured rounding) is settled: D(h)'s truncation and noise
    can only be smaller than that agreement, unless they cancel a bug along every
    direction. Otherwise the stencil is completed with -h/2, h/2 and the error model
    takes over (`_full_ladder`). Returns one (Pass, steps, Choice) per group.
    """
    out = _sequential.evaluate(run, index, rows, h, _differences.OUTER)
    results, pending = [None] * len(groups), []
    for i, g in enumerate(groups):
        p = _group(run, out, g, h, 1.0)
        if _settled(run, p):
            results[i] = (p, (h,), Choice(1.0, 2))
        else:
            pending.append(i)
    if not pending:
        return results
    picked, sub_groups = pick_groups(groups, pending, len(index))
    sub_index, sub_rows = index[picked], rows[picked]
    inner = _sequential.evaluate(run, sub_index, sub_rows, h, _differences.INNER)
    first = {name: None if v is None else v[picked] for name, v in out.items()}
    first = _evaluate.complete(first, inner)
    for i, r in zip(pending, _full_ladder(run, sub_index, sub_rows, h, sub_groups, first)):
        results[i] = r
    return results


def pick_groups(groups, which, n) -> tuple:
    """(the positions among n directions of the groups `which`, those groups as slices of
    the directions at these positions)."""
    rows_of = [np.arange(n)[groups[i]] for i in which]
    ends = np.cumsum([len(r) for r in rows_of])
    return np.concatenate(rows_of), [slice(end - len(r), end) for r, end in zip(rows_of, ends)]


def _settled(run: Run, p: Pass) -> bool:
    """Whether central differences alone settle the verdict as a pass."""
    if not (p.fd.finite.all() and p.fd.smooth.all()):
        return False
    if _verdict.unresolved(run, p.fd):
        return False  # rounding alone is too coarse here: a larger step is needed
    for c in _verdict.compare(run, p):
        margin = 1.0 if c.rounding_measured else 0.5
        if not (c.num_used and c.relative_error <= margin * c.tolerance):
            return False
        if c.noise_floor and (not c.resolved or c.absolute):
            return False
    return True


def _full_ladder(run: Run, index, rows, h, groups, out):
    """The error model's step ladder, starting from the full stencil `out` at step h.

    A group whose fourth differences are far above the reference precision's rounding
    is evaluated again at a 16 times smaller step: if d4 / step agrees direction by
    direction, the directions cross kinks (judged against rounding alone from then on);
    if not, fn computes in lower precision than the reference, and a third evaluation
    takes a correspondingly larger step. A group whose noise floor is above target
    moves to the step that balances roundoff (~1/h) against truncation (~h^2). Keeps for
    each group the evaluation with most smooth directions, then lowest noise.
    """
    factors = np.ones(len(groups))
    eps = _verdict.eps_fd(run)
    best = [_group(run, out, g, h, 1.0) for g in groups]
    how = [Choice() for _ in groups]

    def keep_better(i, p, factor):
        best[i] = _better(best[i], p)
        if best[i] is p:
            how[i] = Choice(float(factor))

    tried = [[h] for _ in groups]
    suspect = [p.fd.relative_noise > 100 * eps for p in best]
    # at the reference's own small step (not a step the caller fixed, nor one raised for
    # a fn that rounds to a lower precision inside), truncation is far below rounding: a
    # d4 far above rounding that shrinks with the step is kinks (at a stationary point,
    # rounding that grows with the step too: excluded by its noise floor)
    kinks_possible = run.rounds_to is None and h <= _precision.default_step(run.reference)
    # (fn computed in float64 with no callback or kernel, which may round unseen)
    wide = not run.problem.opaque and _precision.eps(run.reference) < _precision.eps(np.float32)
    for i, p in enumerate(best):
        flat_count, zero = _verdict.flat_directions(p) or (0, False)
        if zero:
            continue  # flat with a zero derivative under test: settled (a larger step
            # is for staircases, and could cross the jumps of a piecewise-constant fn)
        if kinks_possible and wide and flat_count == len(p.fd.smooth):
            run.flat_below = h  # (`Run.flat_below`: piecewise constant at this step)
        if suspect[i]:
            factors[i] = 1 / 16
        elif _verdict.unresolved(run, p.fd) or p.fd.num_nonsmooth:
            f = min(max(p.fd.better_step(), 1e-3), 1e3, run.max_step / h)
            factors[i] = min(f, 1 / 8) if p.fd.num_nonsmooth else f
    factors[(factors >= 0.5) & (factors <= 2)] = 1.0
    if np.all(factors == 1.0):
        return list(zip(best, map(tuple, tried), how))
    out2 = _sequential.evaluate_full(run, index, _scale_rows(rows, groups, factors), h)
    again, down = np.ones(len(groups)), {}
    for i, g in enumerate(groups):
        if factors[i] == 1.0:
            continue
        p2 = _group(run, out2, g, h, factors[i])
        tried[i].append(h * factors[i])
        if suspect[i] and _same_kinks(best[i].fd, p2.fd, factors[i]) and _kink_sized(p2.fd):
            kinked = _assess(run, p2.phis, p2.phi0, h, from_data=False)
            best[i] = dataclasses.replace(p2, fd=kinked)
            how[i] = Choice(float(factors[i]), 4, from_data=False)
        elif (
            suspect[i]
            and p2.fd.relative_noise <= 100 * eps
            and not np.any(_verdict.constant_along(p2))
        ):
            # jumps (rem, floor, a piecewise-constant derivative map): fewer directions
            # cross one at a smaller step, and the others are as precise as the reference
            # and none is flat; a staircase at a step below its quanta stays flat along
            # some (float32 out of a float64 reference: the larger step below)
            keep_better(i, p2, factors[i])
        elif (
            suspect[i]
            and kinks_possible
            and best[i].fd.noise_floor < 0.1
            and not np.any(_verdict.constant_along(p2))  # (a staircase's flat steps)
            and _shrinks(best[i].fd, p2.fd, factors[i])
            and _kink_sized(p2.fd)
        ):
            # kinks near the point, not at it (a ReLU unit at 0 in float32 is a hair off
            # 0 in float64): d4 shrinks with the step but not in proportion, as the kink
            # moves inside the stencil. Judged against rounding alone, the directions
            # that cross one are non-smooth at either step
            q1, q2 = (
                dataclasses.replace(q, fd=_assess(run, q.phis, q.phi0, h, from_data=False))
                for q in (best[i], p2)
            )
            factor = factors[i] if _better(q1, q2) is q2 else 1.0
            best[i] = q2 if factor != 1.0 else q1
            how[i] = Choice(float(factor), 4, from_data=False)
        elif (
            suspect[i]
            and p2.fd.smooth.sum() >= best[i].fd.smooth.sum()
            and p2.fd.noise_floor < min(TRUNCATION_RESOLVED, 0.25 * best[i].fd.noise_floor)
        ):
            # a large step (a caller's) whose d4 is truncation, not noise: the smaller
            # step resolves far more finely (noise would resolve 16 times less finely),
            # and finely enough to judge (near a pole, 1/x at 1e-6, it still resolves
            # only to a few percent: then the larger step below, and no verdict)
            best[i], how[i] = p2, Choice(float(factors[i]))
        elif suspect[i] and _truncation_bound(best[i], p2):
            keep_better(i, p2, factors[i])
            down[i] = p2  # d4 is truncation: smaller steps still (below)
        elif suspect[i]:  # d4 is noise: the function is noisier than the reference
            again[i] = min(1e3, (best[i].fd.relative_noise / eps) ** (1 / 3), run.max_step / h)
        else:
            kept = best[i]
            if factors[i] < 1:
                best[i] = _at_point(best[i], p2)
            keep_better(i, p2, factors[i])
            if best[i] is not p2 and best[i] is not kept:
                how[i] = dataclasses.replace(how[i], crossed_at=float(factors[i]))
    for _ in range(MORE_DESCENTS):
        if not down:
            break
        # fn curves on a scale far below the parameters' (sin at 1e6, period 2 pi): its
        # truncation error shrinks with the step, down to where it resolves
        smaller = np.ones(len(groups))
        for i, q in down.items():
            smaller[i] = q.step / h / 16
        out4 = _sequential.evaluate_full(run, index, _scale_rows(rows, groups, smaller), h)
        for i, q in list(down.items()):
            q2 = _group(run, out4, groups[i], h, smaller[i])
            tried[i].append(h * smaller[i])
            keep_better(i, q2, smaller[i])
            del down[i]
            if _verdict.unresolved(run, q2.fd) and _truncation_bound(q, q2):
                down[i] = q2
    if np.any(again != 1.0):
        out3 = _sequential.evaluate_full(run, index, _scale_rows(rows, groups, again), h)
        for i, g in enumerate(groups):
            if again[i] != 1.0:
                tried[i].append(h * again[i])
                keep_better(i, _group(run, out3, g, h, again[i]), again[i])
    return list(zip(best, map(tuple, tried), how))


def at_step(run: Run, index, rows, h):
    """The full stencil along `index` at exactly step h, without the ladder's moves:
    (Pass, steps, Choice), as `ladder` returns for one group."""
    whole = slice(0, len(index))
    p = _group(run, _sequential.evaluate_full(run, index, rows, h), whole, h, 1.0)
    return p, (h,), Choice(1.0, 4)


def extend(run: Run, index, rows, h, groups, choices):
    """The finite differences of each group along (more) directions at the step and
    stencil the ladder chose for it on fewer (`choices`): one (Pass, steps, Choice) per
    group. The directions evaluated before are not evaluated again. A group that central
    differences settled climbs the whole ladder again where its added directions no
    longer settle it."""
    results = []
    for g, c in zip(groups, choices):
        idx, r = index[g], rows[g]
        whole = slice(0, len(idx))
        if c.points == 2:
            p = _group(run, _sequential.evaluate(run, idx, r, h, _differences.OUTER), whole, h, 1)
            results.append((p, (h,), c) if _settled(run, p) else ladder(run, idx, r, h, [whole])[0])
            continue
        scaled = _scale_rows(r, [whole], np.asarray([c.factor]))
        p = _group(run, _sequential.evaluate_full(run, idx, scaled, h), whole, h, c.factor)
        if not c.from_data:
            p = dataclasses.replace(p, fd=_assess(run, p.phis, p.phi0, h, from_data=False))
        steps = (h * c.factor,)
        if c.crossed_at is not None:
            smaller = _scale_rows(r, [whole], np.asarray([c.crossed_at]))
            out = _sequential.evaluate_full(run, idx, smaller, h)
            p = _at_point(p, _group(run, out, whole, h, c.crossed_at))
            steps += (h * c.crossed_at,)
        results.append((p, steps, c))
    return results


def _group(run: Run, out, sl, h, factor) -> Pass:
    """The finite differences of one group (rows `sl` of the evaluations `out`, taken at
    step h times `factor`), assessed by the error model."""

    def cut(name):
        return None if out.get(name) is None else out[name][sl]

    if out["phis"].shape[1] == 2:
        eps = _verdict.eps_fd(run)
        fd = _error_model.assess_central(cut("phis"), cut("phi0"), h, eps)
    else:
        fd = _assess(run, cut("phis"), cut("phi0"), h, from_data=True)
    return Pass(
        fd,
        cut("rev"),
        cut("fwd"),
        cut("ref_rev"),
        cut("ref_fwd"),
        cut("phis"),
        cut("phi0"),
        h * factor,
    )


def _assess(run: Run, phis, phi0, h, from_data: bool) -> _error_model.Differences:
    # where fn rounds to a lower precision inside, the step is raised to that precision's
    # quanta (relative 5e-3 and more), and a ReLU's, max's or abs's kink lies inside the
    # stencil along many directions (where finite differences run in float32 alone, a leaf
    # failing alone within its error bars is not judged instead: `within_native_bars`;
    # the wider bar there lost a negated bias under jax 0.9.2)
    # along one leaf, the noise is at least what the all-leaf directions measured (a GP's
    # noise scale, one entry: all its directions on one line, whose fourth difference
    # happened to be 40 times below the noise, failed its right float64 gradient)
    fd = _error_model.assess(
        phis,
        phi0,
        h,
        _verdict.eps_fd(run),
        _verdict.floors(run, None)["nonsmooth"],
        noise_from_data=from_data,
        kinks_within=run.rounds_to is not None,
        noise_at_least=(run.fn_noise or 0.0) if run.leaf_checks else 0.0,
    )
    if from_data and not run.leaf_checks and fd.noise > 0:
        run.fn_noise = fd.noise if run.fn_noise is None else min(run.fn_noise, fd.noise)
    return fd


def _at_point(p: Pass, smaller: Pass) -> Pass:
    """`p` with the directions that are non-smooth at a smaller step non-smooth too.

    A kink or jump within the smaller stencil is at the point itself, so it is inside the
    larger one as well, where the smooth part of phi can dilute its signature (a jump of
    1e-7 next to a slope of 1 at h = 6e-6: D(h/2) / D(h) = 1.008) while it still biases the
    Richardson value by 7 J / 6h against an error bar of J / 6h."""
    crossed = smaller.fd.finite & ~smaller.fd.smooth
    if not crossed.any():
        return p
    return dataclasses.replace(p, fd=dataclasses.replace(p.fd, smooth=p.fd.smooth & ~crossed))


def _same_kinks(fd1, fd2, factor: float) -> bool:
    """Whether d4 / step agrees between two steps direction by direction, as it does for a
    kink at the point (a fixed jump in slope), and not for rounding noise, whose d4 is
    random even where its size scales with the step."""
    j1, j2 = fd1.d4, fd2.d4 / factor
    use = fd1.finite & fd2.finite & (j1 != 0)
    if not use.any():
        return False
    return bool(np.median(np.abs(j2[use] - j1[use]) / np.abs(j1[use])) < 0.3)


def _kink_sized(fd) -> bool:
    """Whether the fourth differences are as large as a kink's against the one-sided slopes.

    A slope jump J within the stencil gives |d4| / h of order J and one-sided slopes J +
    2 A h apart (A the curvature). Near a minimum, the rounding of params + t v (ulps of
    params, not of fn's values) moves fn by its gradient there, which grows with t: a d4
    that shrinks with the step as a kink's does, and is a consistent ulp-sized pattern
    along random-sign directions, yet a vanishing fraction of the slopes' difference,
    which is curvature."""
    left, right = fd.slopes
    apart = np.abs(np.asarray(right) - np.asarray(left))
    use = fd.finite & (apart > 0)
    if not use.any():
        return True
    return bool(np.median(np.abs(fd.d4[use]) / fd.h / apart[use]) > KINK_SHARE)


def _shrinks(fd1, fd2, factor: float) -> bool:
    """Whether the fourth differences shrink with the step (by 4 times or more where the
    step shrank 16 times), as those of kinks within the stencil do; rounding noise does
    not shrink with the step."""
    use1, use2 = fd1.finite & (fd1.d4 != 0), fd2.finite
    if not (use1.any() and use2.any()):
        return False
    ratio = np.median(np.abs(fd2.d4[use2])) / np.median(np.abs(fd1.d4[use1]))
    return bool(ratio <= 4 * factor)


def _truncation_bound(p: Pass, smaller: Pass) -> bool:
    """Whether finite differences at a 16 times smaller step (`smaller`) are far less noisy
    than `p`'s: their fourth differences shrink with the step, as truncation does (by 256
    for central differences, 65536 with Richardson), where rounding would grow 16 times,
    while the differences themselves do not shrink (fn's first-order term is there: det at
    the zero matrix, h^n det(v), shrinks as a whole) and fn is not flat along any direction
    at the smaller step (a staircase is, below its quanta)."""
    fd, small = p.fd, smaller.fd
    return bool(
        small.finite.all()
        and small.smooth.sum() >= fd.smooth.sum()
        and small.noise_floor < fd.noise_floor / 16
        # (along rows scaled with the step: per unit of it)
        and _error_model.rms(small.value) / smaller.step
        >= 0.25 * _error_model.rms(fd.value) / p.step
        and not np.any(_verdict.constant_along(smaller))
    )


def _better(p1: Pass, p2: Pass) -> Pass:
    key = lambda p: (int(p.fd.smooth.sum()), -p.fd.noise_floor)  # noqa: E731
    return p2 if key(p2) > key(p1) else p1


def _scale_rows(rows, groups, factors):
    rows = rows.copy()
    for g, f in zip(groups, factors):
        rows[g] *= f
    return rows
