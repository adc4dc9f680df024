"""Sequential directions: the looks, the stopping rule's error rates (simulated under the
error model), and what the checks and their reports do with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from cases import (
    bug,
    fresh_programs,
    ill_conditioned_loss,
    ill_conditioned_params,
    mlp_data,
    mlp_loss,
    mlp_params,
)
from jaxcheck import _sequential

SIZES = (3, 5, 2)


def test_looks_double_up_to_the_maximum():
    assert _sequential.looks(16, True) == (4, 8, 16)
    assert _sequential.looks(12, True) == (4, 8, 12)
    assert _sequential.looks(32, True) == (4, 8, 16, 32)
    assert _sequential.looks(16, False) == (16,)
    assert _sequential.looks(4, True) == (4,)
    assert _sequential.looks(16, True, "rademacher") == (8, 16)
    assert _sequential.looks(32, True, "rademacher") == (8, 16, 32)
    assert _sequential.looks(8, True, "rademacher") == (8,)
    assert _sequential.looks(16, True, "gaussian") == (4, 8, 16)
    assert _sequential.looks(4, True, "gaussian") == (4,)


def test_clearance_is_the_exact_f_quantile():
    # sqrt of the 0.975 quantile of F(4, 4) and F(8, 8) (beta = 5 % over 2 early looks)
    assert _sequential.clearance(4, 3) == pytest.approx(3.0991, abs=1e-4)
    assert _sequential.clearance(8, 3) == pytest.approx(2.1055, abs=1e-4)
    # P(F(16, 16) > 4) = 0.424 %, plus P(F(4, 4) > 4 c_4²) + P(F(8, 8) > 4 c_8²) = 0.215 %
    assert _sequential.error_bounds(16, "gaussian") == pytest.approx((0.006387, 0.006387), abs=1e-6)
    assert _sequential.error_bounds(32, "gaussian")[0] == pytest.approx(0.001461, abs=1e-6)
    # "uniform" directions, the default, look as Gaussian ones do
    assert _sequential.error_bounds(16) == _sequential.error_bounds(16, "gaussian")
    # random signs look first after 8 (one early look: c_8 = 1.854), 0.424 % + 0.063 %
    assert _sequential.clearance(8, 2) == pytest.approx(1.8542, abs=1e-4)
    bounds = _sequential.error_bounds(16, "rademacher")
    assert bounds == pytest.approx((0.004865, 0.004865), abs=1e-6)
    assert _sequential.error_bounds(32, "rademacher")[0] == pytest.approx(0.000346, abs=1e-6)
    assert _sequential.clear(0.3, 1.0, 4, 3) == "pass"
    assert _sequential.clear(3.2, 1.0, 4, 3) == "fail"
    assert _sequential.clear(0.5, 1.0, 4, 3) is None


def _draw(rng, kind, shape):
    """Direction entries of `kind` other than Gaussian: random signs, or "uniform" ones
    (a random sign times one of 128 evenly spaced magnitudes, unit variance)."""
    signs = rng.choice(np.array([-1.0, 1.0]), size=shape)
    if kind == "rademacher":
        return signs
    return signs * (2 * rng.integers(0, 128, size=shape) + 1) * (np.sqrt(3.0) / 256)


def _simulate(true, k, trials, kind, seed=0, pair=False, dim=32):
    """The sequential procedure on synthetic per-direction errors: projections of an error
    of relative size `true` (tolerance 1) orthogonal to the gradient, along directions of
    `kind`; with `pair`, an error of two entries of equal size and opposite
    sign (the worst case of random signs: invisible along half of them), in `dim`
    dimensions (2: the gradient is then invisible along the other half). Returns
    (verdicts, directions used)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        e = rng.standard_normal((trials, k)) * true
        g = rng.standard_normal((trials, k))
    else:
        gv, ev = rng.standard_normal(dim), rng.standard_normal(dim)
        if dim == 2:
            gv = np.ones(2)
        if pair:  # (its projections vanish or not with the signs alone)
            ev = np.zeros(dim)
            ev[:2] = (1.0, -1.0)
        else:
            ev -= gv * (ev @ gv) / (gv @ gv)
        ev *= true * np.linalg.norm(gv) / np.linalg.norm(ev)
        v = _draw(rng, kind, (trials, k, dim))
        e, g = v @ ev, v @ gv
    sum_e, sum_g = np.cumsum(e**2, axis=1), np.cumsum(g**2, axis=1)
    ks = _sequential.looks(k, True, kind)
    verdict = np.full(trials, "", dtype=object)
    used = np.zeros(trials, dtype=np.int64)
    clear = np.vectorize(lambda err, n: _sequential.clear(err, 1.0, n, len(ks)) or "")
    for n in ks:
        with np.errstate(divide="ignore"):  # (a gradient unseen along all n: err inf)
            err = np.sqrt(sum_e[:, n - 1] / sum_g[:, n - 1])
        decided = np.where(err <= 1.0, "pass", "fail") if n == k else clear(err, n)
        take = (verdict == "") & (decided != "")
        verdict[take], used[take] = decided[take], n
    return verdict, used


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "rademacher"])
def test_simulated_error_rates_are_within_the_stated_bounds(kind):
    k, trials = 16, 20000
    fail_correct, pass_bug = _sequential.error_bounds(k, kind)
    # three Monte Carlo standard errors (the union bound is nearly tight: the early and
    # the last look's wrong verdicts seldom coincide)
    slack = 3 * np.sqrt(fail_correct / trials)
    # a correct gradient: error at half the tolerance
    verdict, _ = _simulate(0.5, k, trials, kind)
    assert np.mean(verdict == "fail") <= fail_correct + slack
    # a bug at twice the tolerance
    verdict, _ = _simulate(2.0, k, trials, kind, seed=1)
    assert np.mean(verdict == "pass") <= pass_bug + slack
    # the early looks' budget holds even at an error equal to the tolerance
    verdict, used = _simulate(1.0, k, trials, kind, seed=2)
    early = used < k
    at_tol = 3 * np.sqrt(_sequential.EARLY_ERROR / trials)
    assert np.mean(early & (verdict == "pass")) <= _sequential.EARLY_ERROR + at_tol
    assert np.mean(early & (verdict == "fail")) <= _sequential.EARLY_ERROR + at_tol
    assert np.mean(used) > 14  # at the tolerance most checks take all 16
    # far from the tolerance (a correct float32 model, a 1 % bug) the first look settles it
    first = _sequential.FIRST[kind]
    for true, expected in ((0.05, "pass"), (1e4, "fail")):
        verdict, used = _simulate(true, k, trials, kind, seed=3)
        assert np.all(verdict == expected) and np.mean(used == first) > 0.99


def test_an_error_random_signs_see_least_passes_rarely():
    """A bwd that swaps two cotangents makes an error of two entries of equal size and
    opposite sign: along half of all random-sign directions it vanishes. A first look
    after 4 directions passed such a bug (94 % wrong) with probability 1/16; after 8 a bug
    at twice the tolerance passes with probability 1/256 there and 0.21 % at the last look
    (at most 2 of 16 directions see it)."""
    trials = 40000
    verdict, used = _simulate(2.0, 16, trials, "rademacher", seed=5, pair=True)
    slack = 3 * np.sqrt(0.006 / trials)
    assert np.mean(verdict == "pass") <= 1 / 256 + 137 / 2**16 + slack
    # far beyond the tolerance it takes the 8 directions not to see it at all
    verdict, used = _simulate(30.0, 16, trials, "rademacher", seed=6, pair=True)
    assert np.mean(verdict == "pass") == pytest.approx(1 / 256, abs=3 * np.sqrt(1 / 256 / trials))


def test_uniform_directions_see_that_error_along_almost_every_direction():
    """The same error along "uniform" directions: it vanishes along 1 in 256 (equal levels
    and signs), and is small where the two levels are close, as along Gaussian directions;
    the first look after 4 keeps the F law's rates (0.64 % at K = 16) and never passes such
    a bug far beyond the tolerance."""
    trials = 40000
    bound = _sequential.error_bounds(16)[1]
    verdict, used = _simulate(2.0, 16, trials, "uniform", seed=5, pair=True)
    assert np.mean(verdict == "pass") <= bound + 3 * np.sqrt(bound / trials)
    verdict, used = _simulate(30.0, 16, trials, "uniform", seed=6, pair=True)
    assert np.all(verdict == "fail") and np.mean(used == 4) > 0.99


@pytest.mark.parametrize(
    "true, kind, rate",
    [(2.0, "rademacher", 0.0128), (3.0, "rademacher", 0.0041), (2.0, "uniform", 0.0098)],
)
def test_a_gradient_and_its_error_on_the_same_two_entries_pass_as_documented(true, kind, rate):
    """fn of two parameters, gradient [1, 1], its error [d, -d]: each is invisible along
    the directions that see the other, so the estimate's denominator shrinks exactly when
    its numerator grows. A bug at twice the tolerance passes 1.3 % of the time (the F law
    and the case above: 0.5 % and 0.6 %), at three times 0.4 %, the 1/256 of the first
    look; the README states these, and 1.0 % along the default directions."""
    trials = 40000
    verdict, _ = _simulate(true, 16, trials, kind, seed=7, pair=True, dim=2)
    assert np.mean(verdict == "pass") == pytest.approx(rate, abs=3 * np.sqrt(rate / trials))


def test_simulated_fixed_k_rates_are_nearly_kept():
    # at the design points the early looks add about 0.2 % to the 0.42 % of a fixed K = 16,
    # and save a third of the directions
    verdict, used = _simulate(0.5, 16, 20000, "gaussian", seed=4)
    assert 0.004 < np.mean(verdict == "fail") < 0.008 and np.mean(used) < 12


def _mlp(**options):
    params = mlp_params(SIZES, jnp.float32)
    x, y = mlp_data(SIZES, jnp.float32)
    return params, x, y


def test_correct_model_settles_after_four_directions():
    params, x, y = _mlp()
    report = jaxcheck.verify(mlp_loss(), params, x, y, localize=False)
    assert report.ok
    assert (report.num_directions, report.max_directions) == (4, 16)
    assert report.numeric.shape == (4,)
    assert report.num_evaluations == 2 * 4 + 1  # central differences along 4 directions
    assert report.relative_error * _sequential.clearance(4, 3) < report.tolerance
    assert report.stopped.startswith("settled after 4 of 16 directions: the relative error (")
    assert report.stopped.endswith(f"is clear below the tolerance {report.tolerance:.1e}")
    text = str(report)
    assert "  4 of 16 directions (0 non-smooth, 0 with fn non-finite), 9 evaluations of fn" in text
    assert report.stopped in text


def test_fixed_directions_with_sequential_false():
    params, x, y = _mlp()
    report = jaxcheck.verify(mlp_loss(), params, x, y, localize=False, sequential=False)
    assert report.ok and (report.num_directions, report.max_directions) == (16, 16)
    assert report.stopped == (
        "took all 16 directions, a fixed number (sequential=False, direction_sharding, or no "
        "more than the first look of a sequential check takes)"
    )
    assert report.num_evaluations == 2 * 16 + 1
    text = str(report)
    assert "  16 directions (0 non-smooth" in text and "a fixed number" not in text


def test_one_percent_bug_fails_at_the_first_look_and_is_localized():
    params, x, y = _mlp()
    loss = mlp_loss(bug("scale", 0.01), where=(1, "w"))
    report = jaxcheck.verify(loss, params, x, y)
    assert report.status == "fail" and report.num_directions == 4
    assert report.stopped.startswith("settled after 4 of 16 directions")
    assert "clear above the tolerance" in report.stopped
    by_path = {leaf.path: leaf for leaf in report.leaves}
    wrong = by_path["['layers'][1]['w']"]
    assert wrong.status == "fail" and wrong.num_directions == 4
    assert wrong.relative_error == pytest.approx(0.01, rel=0.05)
    assert [p for p, leaf in by_path.items() if leaf.status == "fail"] == [wrong.path]
    # leaves clearly right or wrong settle after 4 of their 8 directions too
    assert all(leaf.num_directions == 4 for leaf in report.leaves)
    # Gaussian directions look as "uniform" ones do; random signs first after 8
    for kind, first in (("gaussian", 4), ("rademacher", 8)):
        other = jaxcheck.verify(loss, params, x, y, directions=kind)
        assert other.status == "fail" and other.num_directions == first
        by_path = {leaf.path: leaf for leaf in other.leaves}
        assert by_path["['layers'][0]['w']"].num_directions == first
        assert [p for p, leaf in by_path.items() if leaf.status == "fail"] == [wrong.path]


def _scaled(x, c):
    @jax.custom_vjp
    def f(x, c):
        return x

    f.defvjp(lambda x, c: (x, c), lambda c, ct: (ct * c, jnp.zeros_like(c)))
    return f(x, c)


def _borderline():
    """A new function each time (its programs are compiled afresh): a loss whose
    gradient along "w" is c times the true one."""

    def loss(params, c):
        return jnp.sum(jnp.sin(_scaled(params["w"], c)) ** 2) + jnp.sum(params["b"] ** 2)

    return loss


PARAMS = {"w": jnp.linspace(0.1, 1.0, 6), "b": jnp.linspace(-1.0, 1.0, 3)}
BORDERLINE = jnp.float32(1.0015)  # a 0.15 % error in the gradient along "w"


def test_borderline_bug_takes_every_direction_and_says_so():
    # a 0.15 % error against rtol=1e-3, within the early looks' doubt (clearing the
    # tolerance takes a factor 1.85 after 8 directions)
    report = jaxcheck.verify(_borderline(), PARAMS, BORDERLINE, rtol=1e-3, localize=False)
    # the 9 parameters' 16 directions span them: the estimate is the balanced relative
    # error itself, 0.15 % times the square root of "w"'s half share, up to noise
    assert report.status == "fail"
    assert report.relative_error == pytest.approx(1.5e-3 / np.sqrt(2), rel=1e-3)
    assert (report.num_directions, report.max_directions) == (16, 16)
    assert report.stopped.startswith("took all 16 directions: after 8, the relative error (")
    assert report.stopped.endswith("was too close to the tolerance 1.0e-03 to tell")
    # every direction evaluated once: 2 calls of the 8-direction programs at +-h and
    # at +-h/2, each 2 points per direction and the centre; then the failure confirmed
    # along all 16 (the same programs, twice) at a 16 times larger step (where roundoff
    # would shrink 16 times)
    assert report.num_evaluations == 2 * 2 * (2 * 8 + 1) + 2 * 2 * (2 * 8 + 1)
    assert report.steps_tried == pytest.approx((report.step, 16 * report.step))
    assert not any("roundoff inside fn" in q for q in report.problems)


def test_later_looks_reuse_the_first_looks_programs(monkeypatch):
    checker = jaxcheck.Checker(_borderline(), rtol=1e-3)
    first = checker(PARAMS, BORDERLINE)  # every look, and the leaves
    assert first.num_directions == 16 and first.num_compiled > 0
    later = [checker(PARAMS, c) for c in (jnp.float32(1.0), jnp.float32(1.05), BORDERLINE)]
    assert [r.status.value for r in later] == ["pass", "fail", "fail"]
    assert [r.num_directions for r in later] == [8, 8, 16]
    assert [r.num_compiled for r in later] == [0, 0, 0]
    # the same check at 16 directions a batch compiles as many programs
    fresh_programs(monkeypatch)  # (else it reuses some of the checker's)
    fixed = jaxcheck.verify(_borderline(), PARAMS, jnp.float32(1.002), rtol=1e-3, sequential=False)
    assert first.num_compiled == fixed.num_compiled


def test_option_is_validated_and_shared():
    with pytest.raises(ValueError, match=r"^sequential must be True or False, got 'yes'\.$"):
        jaxcheck.verify(lambda p: jnp.sum(p**2), jnp.ones(3), sequential="yes")
    checker = jaxcheck.Checker(lambda p: jnp.sum(jnp.sin(p)), sequential=False)
    assert repr(checker).endswith("sequential=False)")
    assert checker(jnp.ones(3)).num_directions == 16


def test_both_modes_second_order_and_complex_settle_early_too():
    def fn(p):
        return jnp.sum(jnp.sin(p["w"]) * jnp.exp(p["b"]))

    params = {"w": jnp.linspace(0.1, 1.0, 5), "b": jnp.linspace(-0.5, 0.5, 5)}
    report = jaxcheck.verify(fn, params, order=2, mode="both")
    assert report.ok and [p.num_directions for p in report.parts] == [8, 8]
    assert all(p.stopped.startswith("settled after 8 of 16") for p in report.parts)
    assert "  8 directions per check, " in str(report)
    z = jnp.linspace(0.1, 1.0, 4) * (1 + 0.5j)
    report = jaxcheck.verify(lambda z: jnp.sum(jnp.abs(jnp.sin(z)) ** 2), z)
    assert report.ok and report.num_directions == 8


def test_a_doubt_more_directions_cannot_resolve_goes_straight_to_the_last_look(monkeypatch):
    """fn adds and removes a large offset: its float64 values carry roundoff that puts the
    tolerance far above its floor, which no early look accepts, so after the first look the
    check takes all K at once instead of looking at 8 first."""
    calls = []
    original = _sequential.next_look
    monkeypatch.setattr(
        _sequential, "next_look", lambda ks, i, why: calls.append(ks[i]) or original(ks, i, why)
    )
    w = jnp.linspace(-1.0, 1.0, 50, dtype=jnp.float32)
    report = jaxcheck.verify(lambda w: jnp.sum(jnp.sin(w) + 1e7) - 50 * 1e7, w)
    assert report.status == "pass" and report.num_directions == 16
    assert calls == [4]  # looked at 4, then at all 16
    assert report.stopped.startswith("took all 16 directions: after 4, the tolerance ")
    assert report.stopped.endswith(" rests on measured noise or rounding")  # (not "near")
    assert report.tolerance > 10 * report.checks[0].floor


@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_float32_rounding_settles_early_when_the_float64_rule_is_clear(mode):
    """An ill-conditioned float32 loss: its correct gradient rounds to 6.5e-5 (relative),
    the tolerance rests on that rounding, measured against the float64 rule, and the
    rule's own error is clear below it: settled after 8 directions (forward against
    reverse mode too, whose difference is the two modes' rounding). A 1 % bug, in every
    precision, fails after 8 too."""
    report = jaxcheck.verify(ill_conditioned_loss(), ill_conditioned_params(), mode=mode)
    tested, rule = report.checks[:2]
    assert len(report.checks) == (2 if mode == "reverse" else 5)
    assert report.status == "pass" and report.num_directions == 8
    assert tested.rounding == pytest.approx(6.5e-5, rel=0.1)
    assert tested.tolerance == pytest.approx(2 * tested.rounding, rel=1e-3)
    assert rule.relative_error < 1e-7
    assert report.stopped.endswith(
        "is within the distance of the derivative under test from the same rule in higher "
        f"precision, taken as its rounding (tolerance {report.tolerance:.1e}); that rule's "
        f"own error, {rule.relative_error:.1e}, is clear below it"
    )
    wrong = ill_conditioned_loss(bug("scale", 0.01))
    report = jaxcheck.verify(wrong, ill_conditioned_params(), mode=mode)
    assert report.status == "fail" and report.num_directions == 8
    assert "clear above the tolerance" in report.stopped
    assert jaxcheck.verify(wrong, ill_conditioned_params(), sequential=False).status == "fail"


def _simulate_rounding(ratio, trials, kind, seed, k=16, dim=32):
    """How often `explained_by_rounding` settles an early look, and how often the fixed-K
    comparison fails, for a float32 derivative whose rounding rho is measured against a
    float64 rule off by an error e of RMS `ratio` times that of rho (projections on random
    directions; no finite-difference noise). Returns (settled early, fixed K fails)."""
    from jaxcheck._error_model import Comparison

    rng = np.random.default_rng(seed)
    g, rho, e = rng.standard_normal((3, dim))
    rho *= 1e-3 * np.linalg.norm(g) / np.linalg.norm(rho)
    e *= ratio * np.linalg.norm(rho) / np.linalg.norm(e)
    if kind == "gaussian":
        v = rng.standard_normal((trials, k, dim))
    else:
        v = _draw(rng, kind, (trials, k, dim))
    r, a_ref = v @ g, v @ (g + e)
    a = a_ref + v @ rho
    ks = _sequential.looks(k, True, kind)
    early = np.zeros(trials, bool)
    for n in ks[:-1]:
        scale = np.sqrt(np.mean(r[:, :n] ** 2, axis=1))
        err = np.sqrt(np.mean((r[:, :n] - a[:, :n]) ** 2, axis=1)) / scale
        rounding = np.sqrt(np.mean((a[:, :n] - a_ref[:, :n]) ** 2, axis=1)) / scale
        rule_err = np.sqrt(np.mean((r[:, :n] - a_ref[:, :n]) ** 2, axis=1)) / scale
        for i in np.flatnonzero(~early):
            common = dict(interval=(0.0, 0.0), noise_floor=0.0, num_used=n, passed=True)
            tested = Comparison(
                "reverse autodiff (float32) vs finite differences (float64)",
                relative_error=err[i],
                rounding=rounding[i],
                tolerance=2 * rounding[i],
                rounding_measured=True,
                floor=1e-9,
                **common,
            )
            same_rule = Comparison(
                "reverse autodiff, same rule in float64, vs finite differences",
                relative_error=rule_err[i],
                rounding=0.0,
                tolerance=1.0,
                floor=1.0,
                **common,
            )
            pair = (tested, same_rule)
            early[i] = _sequential.explained_by_rounding(tested, pair, n, len(ks)) is not None
    fails = np.sqrt(np.mean((r - a) ** 2, axis=1)) > 2 * np.sqrt(np.mean((a - a_ref) ** 2, axis=1))
    return np.mean(early), np.mean(fails)


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "rademacher"])
def test_simulated_rates_of_settling_on_measured_rounding(kind):
    trials = 4000
    slack = 3 * np.sqrt(_sequential.EARLY_ERROR / trials)
    # a float64 rule far more precise than the float32 rounding: every check settles first
    early, fails = _simulate_rounding(0.01, trials, kind, seed=0)
    assert early == 1.0 and fails == 0.0
    # at the boundary of the margin (the rule as far off as the rounding), the early
    # looks together settle at most EARLY_ERROR of the checks
    early, fails = _simulate_rounding(1.0, trials, kind, seed=1)
    assert 0.01 < early <= _sequential.EARLY_ERROR + slack
    # where the fixed-K comparison fails most of the time, an early pass is rare
    early, fails = _simulate_rounding(2.0, trials, kind, seed=2)
    assert fails > 0.7 and early < 0.01


@pytest.mark.parametrize("offset", [5e5, 1e7])
def test_a_measured_tolerance_settles_early_only_below_its_floor(offset):
    """fn adds and removes a large offset, so its float64 values carry roundoff that raises
    the tolerance above its floor (1.2e-06). An estimate clear below the floor itself
    settles early (it is clear below any tolerance above the floor): here after 8
    directions, the 4 of the first look leaving it below the floor but not clear of it;
    one that is not takes all 16, as before."""
    w = jnp.linspace(-1.0, 1.0, 50, dtype=jnp.float32)
    report = jaxcheck.verify(lambda w: jnp.sum(jnp.sin(w) + offset) - 50 * offset, w)
    assert report.status == "pass", str(report)
    assert report.tolerance > report.checks[0].floor == pytest.approx(1.19e-6, rel=0.01)
    if offset == 5e5:
        assert report.num_directions == 8
        assert report.stopped.startswith("settled after 8 of 16 directions: ")
        assert report.stopped.endswith(
            "is clear below the tolerance's floor 1.2e-06 (the tolerance "
            f"{report.tolerance:.1e} rests on measured noise or rounding)"
        )
    else:
        assert report.num_directions == 16
        assert "rests on measured noise or rounding" in report.stopped


@pytest.mark.parametrize(
    "why, after",
    [
        ("the relative error (1.0e-07..9.0e-07, 95%) was too close to the tolerance 1.2e-06", 1),
        ("the tolerance 1.4e-06 rests on measured noise or rounding, near its floor 1.2e-06", 1),
        ("the tolerance 1.3e-04 rests on measured noise or rounding", 2),
        ("some directions were not smooth (a kink within the step)", 2),
        (
            "the tolerance 3.6e-06 rests on measured noise or rounding; the relative error "
            "4.1e-07 is below its floor 1.2e-06, not yet clearly",
            1,
        ),
    ],
)
def test_which_doubts_look_again_before_the_last_look(why, after):
    ks = _sequential.looks(32, True, "rademacher")
    assert ks == (8, 16, 32)
    assert _sequential.next_look(ks, 0, why) == after


@jax.custom_vjp
def _reversed_pair(x):
    return x[::-1]


# the backward pass forgets to reverse the cotangent back: the gradients of x[0] and x[1]
# are swapped, an error [a, -a] that random signs with v0 = v1 do not see
_reversed_pair.defvjp(lambda x: (x[::-1], None), lambda _, g: (g,))


@pytest.mark.parametrize("key", [0, 3, 14, 22])
def test_swapped_cotangents_fail_at_keys_whose_first_four_signs_hid_them(key):
    """At these keys the first 4 random-sign directions all had v0 = v1, and a first look
    after 4 passed the swap (94 % wrong on x) with "settled after 4 of 16 directions"."""
    a = jnp.array([2.0, 1.0])

    def loss(p):
        x = p["x"]
        return (
            jnp.sum(_reversed_pair(x[:2]) * a * jnp.cos(x[:2]))
            + jnp.sin(x[2])
            + jnp.sum(p["y"] ** 2)
        )

    p = {"x": jnp.array([0.7, 1.3, 0.3]), "y": jnp.array([0.2, 0.4])}
    report = jaxcheck.verify(loss, p, key=key)
    assert report.status == "fail", str(report)
    assert report.relative_error > 0.3
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['x']"]


def test_a_leaf_whose_error_its_directions_all_missed_is_checked_again():
    """An error (+c, -c, 0, 0) in a bias of 4, 1000 times the tolerance: at key 57 the
    bias's 8 random-sign directions all had v0 = v1 (1 in 256), every leaf passed alone,
    and the report blamed "the error spread thinly over several leaves". Before no leaf is
    blamed, the leaves are checked again along twice as many directions."""
    from cases import enable_x64

    with enable_x64():
        rng = np.random.default_rng(0)
        x, y = jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.normal(size=(8,)))

        def loss(p, x, y):
            h = jnp.tanh(x @ p["w1"] + p["b1"])
            return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

        params = {
            "w1": jnp.asarray(rng.normal(size=(5, 4)) / 2),
            "b1": jnp.asarray(rng.normal(size=4) * 0.1),
            "w2": jnp.asarray(rng.normal(size=(4,))),
            "b2": jnp.asarray(0.1),
        }
        offset = jnp.array([1.0, -1.0, 0.0, 0.0]) * 5e-5

        def grad_fn(p, x, y):
            g = dict(jax.grad(loss)(p, x, y))
            return {**g, "b1": g["b1"] + offset}

        report = jaxcheck.verify(
            loss, params, x, y, grad_fn=grad_fn, key=57, directions="rademacher"
        )
        # "uniform" directions, the default, see it along each of the first 4
        default = jaxcheck.verify(loss, params, x, y, grad_fn=grad_fn, key=57)
    failed = [(leaf.path, leaf.num_directions) for leaf in default.leaves if leaf.status == "fail"]
    assert failed == [("['b1']", 4)]
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['b1']"]
    [b1] = [leaf for leaf in report.leaves if leaf.path == "['b1']"]
    assert b1.num_directions == 16
    assert not any(q.startswith("no single leaf fails on its own") for q in report.problems)


def _weighted_sines(p):
    return jnp.sum(jnp.sin(p) ** 2 * jnp.arange(1.0, 4.0))


@pytest.mark.parametrize(("times", "status"), [(0.7, "pass"), (1.3, "fail")])
def test_directions_that_span_few_parameters_measure_the_error_exactly(times, status):
    """At most 8 parameter elements: each block of 8 directions spans them, and a scalar
    fn's relative error over it has no sampling error. It was shown with an interval as if
    sampled (0.05 as 0.024..0.10), and errors at 0.7 and 1.3 times the tolerance took all
    16 directions as "too close to the tolerance to tell"."""
    p = jnp.asarray([0.3, 0.7, 1.1])
    g = jax.grad(_weighted_sines)(p)
    error = jnp.asarray([0.0, 1.0, 0.0]) * jnp.linalg.norm(g) * 1e-2 * times
    report = jaxcheck.verify(
        _weighted_sines, p, grad_fn=lambda q: jax.grad(_weighted_sines)(q) + error, rtol=1e-2
    )
    assert report.status == status
    err = report.relative_error
    assert err == pytest.approx(1e-2 * times, rel=1e-4)
    # the value, give or take the finite differences' noise
    assert report.interval == (err - report.noise_floor, err + report.noise_floor)
    assert report.noise_floor < 1e-8
    assert report.num_directions == 8
    side = "below" if status == "pass" else "above"
    lo, hi = report.interval
    assert report.stopped == (
        f"settled after 8 of 16 directions: the relative error {err:.1e} ({lo:.1e}..{hi:.1e} "
        "with the finite differences' noise), measured with no sampling error (the "
        f"directions span the parameters), is clear {side} the tolerance 1.0e-02"
    )
    # a vector fn's comparisons are sampled by its random cotangents: an interval
    vector = jaxcheck.verify(lambda q: jnp.sin(q) * jnp.arange(1.0, 4.0), p)
    assert vector.interval[1] > 1.5 * vector.interval[0] > 0
    # and so are the derivative maps of an order-2 check, drawn with fixed random vectors
    second = jaxcheck.verify(_weighted_sines, p, order=2)
    [head, *maps] = second.parts
    assert head.interval[1] - head.interval[0] < 1e-6
    assert maps and all(m.interval[1] > 1.5 * m.interval[0] > 0 for m in maps), second


def test_an_error_within_the_noise_of_the_tolerance_does_not_settle_early():
    """Measured with no sampling error, the error still carries the finite differences'
    noise: a 0.995 * rtol error in float32 differences (noise floor 1.3e-4) was settled
    "clear above the tolerance" after 8 directions, and failed."""
    p = jnp.asarray([0.3, 0.7, 1.1])
    g = jax.grad(_weighted_sines)(p)
    error = jnp.asarray([0.0, 1.0, 0.0]) * jnp.linalg.norm(g) * 1e-3 * 0.995
    report = jaxcheck.verify(
        _weighted_sines,
        p,
        grad_fn=lambda q: jax.grad(_weighted_sines)(q) + error,
        rtol=1e-3,
        precision="native",
    )
    assert report.noise_floor > 1e-5, str(report)
    assert report.num_directions == 16, str(report)
    assert report.interval[0] < 1e-3 < report.interval[1]


def test_a_flat_fn_says_along_how_many_directions_it_was_flat():
    # ("fn was flat along some directions" beside a note that it is flat along all)
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.round(p)), jnp.asarray([0.3, 1.2, 2.4]))
    assert report.status == "pass"
    assert report.stopped == "took all 16 directions: after 8, fn was flat along 8 of 8 directions"
