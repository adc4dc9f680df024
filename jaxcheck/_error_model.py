"""Error model: error bars for each finite difference, and the verdict of each comparison.

For one direction, with centre value phi0 and step h (stencil of `_differences`):

- roundoff: the noise sigma of one evaluation of phi is estimated from the fourth
  differences d4 = phi(-h) - 4 phi(-h/2) + 6 phi(0) - 4 phi(h/2) + phi(h), which for a
  smooth function are O(h^4) and otherwise are noise of standard deviation sqrt(70) sigma
  (median over directions, so a few kinks do not inflate it: `_median_noise`), never below
  eps |phi|.
  The Richardson value R carries about 1.9 sigma / h of it; we take 2 standard deviations.
- truncation: |D(h) - D(h/2)| / 3, the error of D(h/2); conservative for R where phi is
  smooth at the step. Where it may not be (`kinks_within=True`), twice that: a kink at a
  third of the step from the point leaves five values that a cubic fits exactly (d4 = 0),
  and moves R by 2 |D(h) - D(h/2)| / 3.
- kink: the part of |d4| / h above its noise (2 sqrt(70) sigma / h): the jump between
  one-sided slopes that d4 implies.

A direction is *non-smooth* when its d4 is far above the noise (30x) and the implied jump
is large enough to matter for the verdict; it is then excluded and counted. The relative
error of a candidate derivative a against the reference R over the remaining directions is

    err = RMS(R - a) / RMS(R),

(the RMS error bar replaces RMS(R) when it is larger: the derivative is then zero to within
noise and the comparison is in effect absolute), which for random-sign or Gaussian
directions estimates |W (g_checked - g_true)| / |W g_true|, W being the per-leaf step weights
of `_directions.balance`. Its 95 % interval comes from the F(n, n) law of the ratio of the
two sums of squares (n directions used). The comparison fails when err exceeds
max(floor, 2 * hypot(noise, rounding)), where noise is the RMS error bar of R relative to
RMS(R) and rounding the measured difference between the derivative under test and the
same rule in higher precision.
"""

import dataclasses
import math

import numpy as np

from . import _differences

NONSMOOTH_NOISE_FACTOR = 30.0
CURVATURE_LIMIT = 1e-2  # |phi''| h / |phi'| above this: possibly a kink, take the full stencil
SAFETY = 2.0
_TINY = 1e-300


@dataclasses.dataclass(frozen=True)
class Differences:
    """Finite-difference estimates along n directions with their error bars."""

    value: np.ndarray  # Richardson estimate R, (n,)
    bar: np.ndarray  # error bar of R, (n,)
    finite: np.ndarray  # (n,) bool
    smooth: np.ndarray  # (n,) bool, finite and not non-smooth
    slopes: tuple[np.ndarray, np.ndarray]  # one-sided slopes (left, right)
    d4: np.ndarray  # fourth differences, (n,)
    noise: float  # sigma, roundoff noise of one evaluation of phi
    relative_noise: float  # sigma / typical |phi|: the precision the function really has
    truncation: float  # median truncation error, net of noise
    roundoff: float  # median roundoff bar
    h: float
    points: int = 4  # stencil points per direction: 4, or 2 (central differences only)
    # error bar of the one-sided slopes: their truncation (from the slopes at h and h/2)
    # and rounding, without the kink's own size, which is the quantity they bound
    slope_bar: np.ndarray | None = None

    @property
    def num_nonsmooth(self) -> int:
        return int(np.sum(self.finite & ~self.smooth))

    @property
    def noise_floor(self) -> float:
        """RMS error bar of the smooth directions relative to their RMS value."""
        if not self.smooth.any():
            return math.inf
        return rms(self.bar[self.smooth]) / max(rms(self.value[self.smooth]), _TINY)

    def better_step(self) -> float:
        """The step minimising roundoff (~1/h) plus truncation (~h^2), as a factor of h."""
        if self.truncation <= 0:
            return 1e3
        return (self.roundoff / (2 * self.truncation)) ** (1 / 3)


@_differences.quiet
def assess(
    phis,
    phi0,
    h: float,
    eps: float,
    floor: float,
    noise_from_data=True,
    kinks_within=False,
    noise_at_least: float = 0.0,
) -> Differences:
    """Error bars and smoothness of the stencil values `phis` (n, 4) around `phi0` (n,).

    `eps` is the reference precision, `floor` the smallest relative error that matters;
    with `noise_from_data=False` the noise is taken as rounding alone (eps |phi|); with
    `kinks_within`, the step is large enough for kinks inside the stencil to be common,
    and the truncation bar covers one that the fourth difference does not show; the noise
    taken from the data is at least `noise_at_least` (fn's, measured along other
    directions).
    """
    phis = np.asarray(phis, np.float64)
    phi0 = np.asarray(phi0, np.float64)
    c = _differences.combine(phis, phi0, h)
    finite, magnitude = _finite_and_magnitude(phis, phi0)
    d4 = np.where(finite, np.abs(c["d4"]), 0.0)
    value = np.where(finite, c["richardson"], 0.0)
    scale = rms(value[finite]) if finite.any() else 0.0
    left, right = c["slopes"]
    change = _slope_change(phis, phi0, c["slopes"], h)
    # each side's slope the same at h and at h/2 (a kink at the point joins two lines),
    # and the sides far apart: rounding changes the slopes with the step as much as it
    # parts them
    kinklike = np.abs(right - left) > 4 * change
    sigma_data = _median_noise(d4[finite], h * scale, kinklike[finite]) if finite.any() else 0.0
    if not noise_from_data:  # d4 is known to come from kinks: judge it against rounding alone
        sigma_data = 0.0
    # (the noise measured along other directions widens the bars; what these directions
    # measured themselves is reported as theirs, for the ladder's reading of it)
    sigma = np.maximum(max(sigma_data, noise_at_least if noise_from_data else 0.0), eps * magnitude)
    roundoff = 3.8 * sigma / h
    share = 2 / 3 if kinks_within else 1 / 3
    truncation = np.where(finite, np.abs(c["d1"] - c["d2"]) * share, 0.0)
    kink = d4 / h
    kink_excess = np.maximum(d4 - 2 * math.sqrt(70) * sigma, 0.0) / h
    kinked = (d4 > NONSMOOTH_NOISE_FACTOR * math.sqrt(70) * sigma) & (kink > 0.25 * floor * scale)
    nonsmooth = finite & (kinked | _jumps(c["d1"], c["d2"], sigma, h, floor * scale))
    typical = float(np.median(magnitude[finite])) if finite.any() else 0.0
    return Differences(
        value=value,
        bar=truncation + roundoff + kink_excess,
        finite=finite,
        smooth=finite & ~nonsmooth,
        slopes=c["slopes"],
        # the slopes at h/2 carry their truncation (linear in the step: the change from
        # the slopes at h) again, and two standard deviations of rounding (sigma / (h/2)
        # each for two values); a kink within the step, not at the point, changes the
        # slopes with the step and widens the bar as it must
        slope_bar=2 * change + 2 * math.sqrt(2) * sigma / (h / 2),
        d4=np.where(finite, c["d4"], 0.0),
        noise=sigma_data,
        relative_noise=sigma_data / typical if typical > 0 else 0.0,
        # the part of the truncation bar that its own noise (0.53 sigma / h for |D(h) -
        # D(h/2)| / 3) does not explain
        truncation=float(np.median(np.maximum(truncation - 3.3 * share * sigma / h, 0)[finite]))
        if finite.any()
        else 0.0,
        roundoff=float(np.median(roundoff[finite])) if finite.any() else 0.0,
        h=h,
    )


@_differences.quiet
def _slope_change(phis, phi0, slopes, h: float):
    """How far each direction's one-sided slopes at h/2 (`slopes`) are from those at h, the
    larger of the two sides: their truncation, which a kink at the point leaves at zero."""
    left = (phi0 - phis[:, 0]) / h
    right = (phis[:, 3] - phi0) / h
    return np.maximum(np.abs(slopes[0] - left), np.abs(slopes[1] - right))


def _median_noise(d4, kink_sized: float, kinklike) -> float:
    """The noise sigma of one evaluation from the fourth differences `d4` (absolute values,
    one per direction), by their median; for an even count whose upper middle value is far
    above the lower one, comes from a kink (`kinklike`: one-sided slopes steady with the
    step and far apart) and is not negligible (above a hundredth of `kink_sized`, h times
    the typical derivative), by the lower middle value. The mean of the two would be half
    a kink where exactly half of the directions cross one: a tie of two entries in max
    crosses its kink along exactly half of a block of spanning directions
    (`_directions.spanning_signs`); rounding that cancels to exact zeros along half of the
    directions (cross-entropy at confident logits) is no kink."""
    n = d4.size
    order = np.argsort(d4, kind="stable")
    low, high = d4[order[(n - 1) // 2]], d4[order[n // 2]]
    middle = 0.5 * (low + high)
    if (
        n % 2 == 0
        and high > 0.01 * kink_sized
        and high > NONSMOOTH_NOISE_FACTOR * low
        and kinklike[order[n // 2]]
    ):
        middle = low
    return float(middle) / (math.sqrt(70) * 0.6745)


@_differences.quiet
def _jumps(d1, d2, sigma, h: float, matters: float):
    """Directions whose central differences grow as 1/step: a jump in phi at the point.

    A jump J centred on the point (phi(0) halfway, as sign(0) and the derivative of max at a
    tie are) has no fourth difference, but D(h) = J / 2h and D(h/2) = J / h. For a smooth
    phi, D(h/2) lies between D(h) and phi'(0), a quarter of D(h)'s truncation error away
    from phi'(0), so |D(h/2)| >= 1.5 |D(h)| with the same sign needs a truncation error
    above half of phi'(0), at a step the ladder moves away from anyway. The difference must
    also be far above its own noise (1.58 sigma / h) and large enough to matter.
    """
    step = np.abs(d2 - d1)
    return (
        (d1 * d2 > 0)
        & (np.abs(d2) >= 1.5 * np.abs(d1))
        & (step > NONSMOOTH_NOISE_FACTOR * 1.58 * sigma / h)
        & (step > 0.25 * matters)
    )


def _finite_and_magnitude(phis, phi0):
    """Which directions have all values finite, and the largest finite |phi| along each."""
    finite = np.all(np.isfinite(phis), axis=1) & np.isfinite(phi0)
    magnitude = np.maximum(
        np.max(np.abs(np.where(np.isfinite(phis), phis, 0)), axis=1),
        np.abs(np.where(finite, phi0, 0)),
    )
    return finite, magnitude


@_differences.quiet
def assess_central(phis, phi0, h: float, eps: float) -> Differences:
    """Central differences D(h) from the values at -h, h (`phis`, (n, 2)), with the error
    bar of rounding alone: 2 standard deviations of D(h) for evaluations accurate to
    eps |phi|. Truncation and the function's real noise are not measured; D(h) is only used
    where it agrees with the derivative to well within the tolerance, which bounds both.

    A direction counts as smooth only when its second difference phi(h) - 2 phi(0) + phi(-h),
    which is h^2 phi'' for a smooth function but of order h times the slope jump at a kink,
    stays below CURVATURE_LIMIT h RMS(D): a kink at the point (relu(0), a tie in max) can
    leave D(h) equal to a subgradient, and only the full stencil can tell it apart.
    """
    phis = np.asarray(phis, np.float64)
    phi0 = np.asarray(phi0, np.float64)
    finite, magnitude = _finite_and_magnitude(phis, phi0)
    roundoff = 2 * math.sqrt(2) * eps * magnitude / (2 * h)
    value = np.where(finite, _differences.central(phis, h), 0.0)
    second = np.where(finite, np.abs(_differences.second(phis, phi0)), 0.0)
    curved = second > CURVATURE_LIMIT * h * (rms(value[finite]) if finite.any() else 0.0)
    return Differences(
        value=value,
        bar=roundoff,
        finite=finite,
        smooth=finite & ~curved,
        slopes=((phi0 - phis[:, 0]) / h, (phis[:, 1] - phi0) / h),
        d4=np.zeros_like(value),
        noise=0.0,
        relative_noise=0.0,
        truncation=0.0,
        roundoff=float(np.median(roundoff[finite])) if finite.any() else 0.0,
        h=h,
        points=2,
    )


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One candidate derivative against the finite-difference reference: a row of a
    report's `checks` table.

    `relative_error` is RMS(reference - candidate) over the `num_used` directions (the
    smooth, finite ones) relative to RMS(reference), and `interval` its 95 % interval
    (a single value where the directions span the parameters and measure it exactly).
    `noise_floor` is the finite differences' own error, and `rounding` the candidate's
    rounding measured against the same rule in higher precision (`rounding_measured`),
    both in the same units; `tolerance` is the larger of `floor` (the smallest error that
    counts as a bug) and twice their hypot, and `passed` says the error is within it.
    `resolved` is False where the finite differences see no derivative above their own
    noise; then, or where the candidate's rounding is larger than the derivative,
    `absolute` is True and the errors are in units of that noise or rounding instead of
    the derivative's size (it is zero to within them). `judged` False marks a row shown
    but not judged (the point cannot be judged, or the row is the model's derivative of
    another function beside the rule that decides). `gap` is |candidate - same rule in
    higher precision| relative to the derivative's size (0 where that is within the
    error bars). The forward-vs-reverse row compares the two modes with each other
    instead, <u, J v> against <J^T u, v>, with no finite differences.
    """

    name: str
    relative_error: float
    interval: tuple[float, float]
    noise_floor: float  # error of the reference itself, relative
    rounding: float  # measured rounding of the candidate (0 when not measured)
    tolerance: float
    num_used: int
    passed: bool
    resolved: bool = True  # finite differences see a derivative above their own noise
    absolute: bool = False  # the derivative is zero to within noise or rounding
    rounding_measured: bool = False  # rounding comes from a higher-precision evaluation
    floor: float = 0.0  # the smallest error that counts, before noise and rounding raise it
    judged: bool = True  # False: the point cannot be judged, whatever the error
    # |a - a_ref| relative to the derivative's own size (its rule in higher precision, or
    # the finite differences), 0 where that size is within the error bars (no gap to tell)
    gap: float = 0.0


@_differences.quiet
def compare(name, fd: Differences, a, floor: float, a_ref=None, rounding_scale=0.0, share=1.0):
    """Compare derivative projections `a` with `fd`; `a_ref` is the same rule evaluated in
    higher precision, whose distance from `a` measures `a`'s own rounding (times `share`
    where only that share of the distance is rounding).

    Errors are relative to RMS(R); where the derivative is smaller than the error bars, or
    than `rounding_scale` (the RMS rounding of the derivative under test), they are taken
    relative to that instead: the derivative is zero to within noise and the comparison is
    in effect absolute.
    """
    a = np.asarray(a, np.float64)
    use = fd.smooth & np.isfinite(a)
    n = int(use.sum())
    if n == 0:
        return Comparison(name, math.nan, (math.nan, math.nan), math.nan, 0.0, floor, 0, False)
    r, bar = fd.value[use], fd.bar[use]
    scale = rms(r)
    denom = max(scale, rms(bar), rounding_scale, _TINY)
    err = _relative(rms(r - a[use]), denom)
    noise = rms(bar) / denom
    rounding = gap = 0.0
    if a_ref is not None:
        a_ref = np.asarray(a_ref, np.float64)[use]
        apart = rms(a[use] - a_ref)
        rounding = apart / denom * share
        size = max(rms(a_ref), scale)
        gap = apart / size if size > rms(bar) else 0.0
    tol = max(floor, SAFETY * math.hypot(noise, rounding))
    # (a failing error is beyond twice the noise floor, which bounds the differences' error
    # from above: its lower end stands, where subtracting the bound said "0" for an error
    # of 5 % measured as 5 %)
    bounds = interval(err, n)
    return Comparison(
        name,
        err,
        above_noise(bounds, noise) if err <= tol else bounds,
        noise,
        rounding,
        tol,
        n,
        bool(err <= tol),
        resolved=scale > rms(bar),
        absolute=scale < denom,
        rounding_measured=a_ref is not None,
        floor=floor,
        gap=gap,
    )


def consistency(name, a, b, floor: float, rounding: float, zero_scale: float = 0.0):
    """<u, J v> against <J^T u, v>: no finite differences, equal up to rounding. Relative
    to RMS(b), or to `zero_scale` where that is larger (the size below which the derivative
    is zero to within the finite differences' error bars or rounding: an exactly zero
    gradient must not make rounding-sized differences infinitely large)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    use = np.isfinite(a) & np.isfinite(b)
    n = int(use.sum())
    if n == 0:
        return Comparison(name, math.nan, (math.nan, math.nan), 0.0, 0.0, floor, 0, False)
    scale = rms(b[use])
    denom = max(scale, zero_scale, _TINY)
    err = _relative(rms(a[use] - b[use]), denom)
    tol = max(floor, SAFETY * rounding)
    return Comparison(
        name,
        err,
        interval(err, n),
        0.0,
        rounding,
        tol,
        n,
        bool(err <= tol),
        absolute=scale < denom,
        rounding_measured=True,
        floor=floor,
    )


def _relative(apart: float, denom: float) -> float:
    """`apart / denom`; infinite where the denominator is only the floor `_TINY` (fn's
    values, their error bars and the derivative's rounding all exactly zero) and `apart`
    is not: no finite multiple of nothing (a relative error of 1e274 was printed)."""
    return math.inf if denom <= _TINY and apart > 0 else apart / denom


def interval(err: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % interval of a relative error measured over n Gaussian directions (a little wide
    for random signs, whose squared projections vary less than Gaussian ones).

    err^2 / true^2 is a ratio of two chi-square(n) sums, F(n, n)-distributed when the error
    is unrelated to the gradient (tighter when it is parallel). log F(n, n) is close to
    normal with variance 2 psi'(n / 2), psi' the trigamma function.
    """
    x = n / 2
    trigamma = 1 / x + 1 / (2 * x**2) + 1 / (6 * x**3) - 1 / (30 * x**5)
    half_width = z * math.sqrt(2 * trigamma) / 2
    return err * math.exp(-half_width), err * math.exp(half_width)


def above_noise(bounds: tuple[float, float], noise: float) -> tuple[float, float]:
    """`bounds` of a measured relative error within the tolerance, with the lower end
    lowered by the finite differences' own error, which the measurement holds too (their
    errors add in quadrature): where the noise floor is as large as that end, the error
    may be as small as 0. A float64 loss near 1e10 whose gradient was 3e-8 off measured
    6.9e-5 at a noise floor of 2.9e-4, and said "95% 4.2e-05..1.1e-04"."""
    low, high = bounds
    return math.sqrt(max(low * low - noise * noise, 0.0)), high


@_differences.quiet
def subgradient_consistent(fd: Differences, a) -> int:
    """How many non-smooth directions have the derivative between the one-sided slopes."""
    left, right = fd.slopes
    bar = fd.bar if fd.slope_bar is None else fd.slope_bar
    lo, hi = np.minimum(left, right) - bar, np.maximum(left, right) + bar
    kinked = fd.finite & ~fd.smooth
    a = np.asarray(a, np.float64)
    return int(np.sum(kinked & (a >= lo) & (a <= hi)))


def rms(x) -> float:
    x = np.asarray(x, np.float64).ravel()
    if not x.size:
        return 0.0
    # (a dot product: np.mean costs more than the few values here)
    with np.errstate(over="ignore", under="ignore"):
        square = float(x @ x)
    if (math.isinf(square) or square < 1e-280) and np.isfinite(x).all():
        # squares beyond float64's range (finite differences of a fn near 1e200): scaled
        # by the largest entry first
        largest = float(np.max(np.abs(x)))
        if largest == 0:
            return 0.0
        y = x / largest
        return largest * math.sqrt(float(y @ y) / x.size)
    return math.sqrt(square / x.size)
