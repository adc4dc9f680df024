"""Precision, scales, ill-conditioning, kinks and non-finite values."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from cases import (
    bug,
    enable_x64,
    ill_conditioned_loss,
    ill_conditioned_params,
    mlp_data,
    mlp_loss,
    mlp_params,
    relu_sloped_at_zero,
    scaled_sin,
)
from jaxcheck import _check_grads

CPU = jax.default_backend() == "cpu"

SIZES = (5, 12, 3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("planted", [None, 0.01])
def test_low_precision_models_are_upcast(dtype, planted):
    params = mlp_params(SIZES, dtype)
    x, y = mlp_data(SIZES, dtype)
    fn = mlp_loss() if planted is None else mlp_loss(bug("scale", planted), (1, "w"))
    report = jaxcheck.verify(fn, params, x, y)
    assert report.tested_dtype == jnp.dtype(dtype).name
    assert report.reference_dtype == "float64"
    if planted is None:
        assert report.status == "pass", str(report)
        # the tolerance follows the measured rounding of the low-precision gradient
        assert report.tolerance >= 2 * report.checks[0].rounding
    else:
        assert report.status == "fail", str(report)
        rule = report.checks[1]  # the same rule in float64 sees the bug without rounding
        assert rule.name.startswith("reverse autodiff, same rule in float64")
        assert rule.relative_error > 1e-3 and not rule.passed


@pytest.mark.parametrize("param_scale", [1e-4, 1.0, 1e4])
@pytest.mark.parametrize("loss_scale", [1e-8, 1e8])
def test_parameter_and_loss_scales(param_scale, loss_scale):
    params = mlp_params(SIZES, jnp.float32, scale=param_scale)
    x, y = mlp_data(SIZES, jnp.float32)
    good = jaxcheck.verify(mlp_loss(loss_scale=loss_scale), params, x, y)
    assert good.status == "pass", str(good)
    bad = jaxcheck.verify(
        mlp_loss(bug("scale", 0.01), (1, "w"), loss_scale=loss_scale), params, x, y
    )
    assert bad.status == "fail", str(bad)
    assert "['layers'][1]['w']" in [leaf.path for leaf in bad.leaves if leaf.status == "fail"]


def test_leaves_of_very_different_scales():
    r = np.random.default_rng(0)
    params = {
        "big": jnp.asarray(r.normal(size=4) * 1e4, jnp.float32),
        "small": jnp.asarray(r.normal(size=4) * 1e-4, jnp.float32),
    }

    def fn(p, wrap=lambda v: v):
        return jnp.sum(jnp.sin(p["big"] * 1e-4)) + jnp.sum(jnp.cos(wrap(p["small"]) * 1e4))

    assert jaxcheck.verify(fn, params).status == "pass"
    bad = jaxcheck.verify(lambda p: fn(p, bug("scale", 1e-3)), params)
    assert bad.status == "fail"
    assert [leaf.path for leaf in bad.leaves if leaf.status == "fail"] == ["['small']"]


def test_zeroed_gradient_of_large_leaf_is_caught():
    params = {"w": jnp.full((3,), 3e4, jnp.float32), "v": jnp.ones(3, jnp.float32)}
    fn = lambda p: jnp.sum(jnp.sin(bug("scale", -1.0)(p["w"]) * 1e-4)) + jnp.sum(p["v"] ** 2)  # noqa: E731
    report = jaxcheck.verify(fn, params)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['w']"]


def test_ill_conditioned_float32_loss_uses_measured_rounding():
    """A correct float32 gradient far from the float64 truth passes; a 0.1 % bug still fails."""
    params = ill_conditioned_params()
    good = jaxcheck.verify(ill_conditioned_loss(), params)
    assert good.status == "pass", str(good)
    assert not any("accepted as rounding" in p for p in good.problems)  # 6.5e-5 < 1.2e-4
    assert good.relative_error > 1e-5  # float32 rounding, not a bug
    assert good.checks[0].rounding > 1e-5
    assert good.checks[1].relative_error < 1e-7  # the rule itself is exact (noise 3e-7)
    bad = jaxcheck.verify(ill_conditioned_loss(bug("scale", 1e-3)), params)
    assert bad.status == "fail"
    assert bad.checks[1].relative_error == pytest.approx(1e-3, rel=0.05)


@pytest.mark.rules_auto
def test_a_rule_wrong_only_in_float32_fails_through_its_own_check():
    """A 1 % error that exists only in the float32 path puts the float32 derivative 1e-2
    from the same rule in float64, which is no rounding (it does not move when params move
    by a few ulps): the check fails, says so, and the custom rule is named."""

    @jax.custom_vjp
    def ident(x):
        return x

    def bwd(_, g):
        return (g * 1.01 if g.dtype == jnp.float32 else g,)

    ident.defvjp(lambda x: (x, None), bwd)
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(ident(p)) ** 2), jnp.linspace(0.2, 1.0, 6))
    assert report.status == "fail"
    [note] = [p for p in report.problems if "moves by only" in p]
    assert "float32 derivative differs from the same rule in float64 by 1.0e-02" in note
    [wrong] = [p for p in report.problems if p.startswith("wrong rule:")]
    assert "custom_vjp ident" in wrong and "vjp vs finite differences, relative error" in wrong
    # without the rule checks, the all-leaf verdict alone fails it too
    alone = jaxcheck.verify(
        lambda p: jnp.sum(jnp.sin(ident(p)) ** 2), jnp.linspace(0.2, 1.0, 6), rules=False
    )
    assert alone.status == "fail"


@pytest.mark.parametrize("scale", [1.0, 1.01, 1.03])
def test_float32_differences_of_a_sum_onto_a_constant_go_up_to_the_params_scale(scale):
    """A window sum onto an init value of np.float32(1) cannot run in float64 (reduce_window
    wants the init in the operand's dtype), and its inputs near 1e-3 change its values near
    1 by a few ulps of float32 within a relative step of 5 %: the noise floor was 4e-2,
    and a rule 3 % off passed. It is straight, so the ladder may take steps up to the
    parameters' scale, as in half precision."""
    init = np.asarray(1, np.float32)

    def window_sum(x):
        return jax.lax.reduce_window(
            x,
            init,
            lambda a, b: a + b,
            (1, 2, 1),
            (1, 1, 1),
            [(0, 1), (1, 0), (0, 2)],
            (2, 1, 3),
            (1, 2, 1),
        )

    f = jax.custom_jvp(window_sum)
    f.defjvp(lambda p, t: (window_sum(p[0]), scale * jax.jvp(window_sum, p, t)[1]))
    x = (1e-3 * np.random.RandomState(0).randn(3, 4, 5)).astype(np.float32)
    report = jaxcheck.verify(f, x, mode="forward")
    assert any(q.startswith("fn could not run in float64") for q in report.problems)
    assert report.status == ("pass" if scale == 1.0 else "fail"), str(report)
    assert abs(report.relative_error - (scale - 1)) < 1e-3
    assert report.tolerance < 5e-3


def test_native_precision_reports_coarser_resolution():
    params = mlp_params(SIZES, jnp.float32)
    x, y = mlp_data(SIZES, jnp.float32)
    report = jaxcheck.verify(mlp_loss(), params, x, y, precision="native")
    assert report.status == "pass"
    assert report.reference_dtype == "float32"
    # GPUs multiply float32 matrices in TensorFloat-32 by default: noisier values
    assert 1e-6 < report.noise_floor < (1e-2 if CPU else 0.025)
    bad = jaxcheck.verify(mlp_loss(bug("scale", 0.05), (0, "w")), params, x, y, precision="native")
    assert bad.status == "fail"


@pytest.mark.parametrize(
    "round_to, step_dtype, said",
    [
        (
            lambda x: x.astype(jnp.float32),
            jnp.float64,
            "fn casts values computed from params to float32, which rounds nothing in the model "
            "(first at ",
        ),
        (
            lambda x: jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=23),
            jnp.float32,
            "fn rounds values computed from params to float32 (an explicit cast, ",
        ),
    ],
    ids=["cast", "reduce_precision"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_function_computing_in_float32_internally(round_to, step_dtype, said, seed):
    """fn rounds to float32 inside: its trace in float64 shows it. reduce_precision rounds
    there as in the model, so the reference starts at a float32 step and says why (was: FAIL
    at a float64 step, with errors of 1e-3, the rounding of each input to its float32 grid
    being odd in the step, which the fourth differences miss). A cast to float32 rounds
    nothing in a float32 model: the reference holds its values in float64 and judges at a
    float64 step (was: at a float32 step, where bugs of 1e-4 pass)."""
    fn = lambda p: jnp.sum(jnp.tanh(round_to(p) * 3.0) ** 2)  # noqa: E731
    p = jnp.asarray(np.random.default_rng(seed).normal(size=10), jnp.float32)
    report = jaxcheck.verify(fn, p)
    assert report.status == "pass", str(report)
    assert report.steps_tried[0] == pytest.approx(jnp.finfo(step_dtype).eps ** (1 / 3))
    assert any(q.startswith(said) for q in report.problems), report.problems


@pytest.mark.parametrize(
    ("fn", "point"),
    [
        (lambda p: jnp.sum(jax.nn.relu(p)), jnp.zeros(5)),
        (lambda p: jnp.sum(jnp.abs(p)), jnp.asarray([0.0, 1.0, -2.0, 3.0])),
        # a tie of three: kinked along 3 of 4 directions (one of two entries tied is a
        # subgradient's pass, test_verdict_holes)
        (lambda p: jnp.max(p), jnp.asarray([1.0, 1.0, 1.0, 0.5])),
    ],
    ids=["relu-at-0", "abs-at-0", "max-tie-of-three"],
)
def test_kinks_are_inconclusive_not_failures(fn, point):
    report = jaxcheck.verify(fn, point)
    assert report.status == "inconclusive", str(report)
    assert not report.ok
    assert report.num_nonsmooth >= report.num_directions // 2
    assert "non-smooth" in str(report)
    assert "FAIL" not in str(report)  # excluded directions leave the checks "not judged"
    assert report.num_subgradient_consistent == report.num_nonsmooth


@pytest.mark.parametrize("detached", [False, True])
def test_an_inconclusive_check_at_kinks_judges_the_other_entries(detached):
    """A pruned model with an L1 penalty: entries of w at exactly 0 are kinks, which every
    direction crosses. The check held them fixed only on the way to a pass; inconclusive,
    it now holds them and judges the others, as check_grads does: a row of w cut off from
    the data term by a stop_gradient (its gradient 15 % off) fails instead of leaving the
    check inconclusive; correct, the others pass and the check stays inconclusive."""
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    x, y = jax.random.normal(k[0], (32, 8)), jax.random.normal(k[1], (32, 3))
    w = jax.random.normal(k[2], (8, 3)) * 0.5 * (jax.random.uniform(k[3], (8, 3)) > 0.5)
    assert int(jnp.sum(w == 0)) == 11

    def loss(p):
        data_w = p["w"].at[0].set(jax.lax.stop_gradient(p["w"][0])) if detached else p["w"]
        fit = jnp.mean((jnp.tanh(x @ data_w + p["b"]) - y) ** 2)
        return fit + 1e-2 * jnp.sum(jnp.abs(p["w"]))

    report = jaxcheck.verify(loss, {"w": w, "b": jnp.full(3, 0.1)})
    kinks = (
        "fn has kinks (one-sided slopes that differ) at 11 entries of params, found by moving "
        "each entry alone; checked again with them held fixed, the others "
    )
    if detached:
        assert report.status == "fail", str(report)
        assert report.problems[0] == kinks + "fail (the leaf table counts the entries moved)"
        assert [(leaf.path, leaf.shape) for leaf in report.leaves if leaf.status == "fail"] == [
            ("['w']", (13,))
        ]
        return
    assert report.status == "inconclusive", str(report)
    [said] = [q for q in report.problems if q.startswith(kinks)]
    assert said.startswith(kinks + "pass (relative error ")
    assert said.endswith(
        "and the derivative under test is within the range of fn's one-sided slopes and of its "
        "derivatives nearby at each kink, widened by 5 % of the slopes' size: not judged there"
    )


def test_a_checker_at_kinks_compiles_nothing_on_its_next_call():
    """The search for kinks, the one-sided slopes compared there and the check with the
    kinks held were compiled anew at every call (a Checker's second call at a padded ReLU
    layer: 1.8 s and 5 programs against 5 ms for a warm call off kinks). They are now kept
    under fn and the values they close over: the same call compiles nothing, and a held
    argument that moves the kinks is seen (2 kinked entries, then 3)."""
    x = jnp.asarray([0.5, -0.25, 1.0, 0.75])

    def loss(p, target):
        return jnp.sum(jnp.abs(p["w"] - target)) + jnp.sum(jnp.sin(p["w"] * p["v"]))

    params = {"w": jnp.asarray([0.5, -0.25, 0.3, 0.2]), "v": jnp.asarray([0.3, 0.6, 0.9, 1.2])}
    checker = jaxcheck.Checker(loss)

    def kinks(report):
        [said] = [q for q in report.problems if q.startswith("fn has kinks")]
        return said.split(" entries of params")[0].rsplit(" ", 1)[1]

    first = checker(params, x)
    assert first.status == "inconclusive", str(first)
    assert kinks(first) == "2"
    compiled = checker.compilations
    again = checker(params, x)
    assert checker.compilations == compiled
    assert again.problems == first.problems
    moved = checker(params, x.at[2].set(0.3))
    assert kinks(moved) == "3"


def test_a_checker_at_kinks_keeps_the_values_fn_closed_over_at_its_first_call():
    """A Checker fixes the values fn closes over at its first call (as jax.jit does): its
    kept kink search compared them with fn's value at the point evaluated anew, with the
    new values, took every entry for a kink with sides not smooth, and dropped its note."""
    target = jnp.asarray([0.5, -0.25, 0.3, 0.2])

    def loss(p):
        return jnp.sum(jnp.abs(p["w"] - target)) + jnp.sum(jnp.sin(p["w"] * p["v"]))

    params = {"w": jnp.asarray([0.5, -0.25, 1.0, 0.75]), "v": jnp.asarray([0.3, 0.6, 0.9, 1.2])}
    checker = jaxcheck.Checker(loss)
    first = checker(params)
    assert any(q.startswith("fn has kinks") for q in first.problems), str(first)
    target = jnp.asarray([0.5, -0.25, 1.0, 0.2])  # noqa: F841 - read by loss
    assert checker(params).problems == first.problems


def test_relu_network_away_from_kinks_passes():
    r = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(r.normal(size=(6, 32)), jnp.float32),
        "b1": jnp.zeros(32, jnp.float32),
        "w2": jnp.asarray(r.normal(size=(32, 2)), jnp.float32),
    }
    x = jnp.asarray(r.normal(size=(16, 6)), jnp.float32)

    def fn(p, x):
        return jnp.sum((jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]) ** 2)

    assert jaxcheck.verify(fn, params, x).status == "pass"


@pytest.mark.parametrize(
    ("fn", "point", "where"),
    [
        (lambda p: jnp.sum(jnp.log(p)), jnp.asarray([1.0, -1.0]), "fn's output (root) is NaN/Inf"),
        (
            lambda p: jnp.sum(jnp.sqrt(p)),
            jnp.asarray([1.0, 0.0]),
            "the gradient (autodiff) of leaf (root) is NaN/Inf at entry 1 (1 of 2)",
        ),
        (
            lambda p: jnp.sum(jnp.sqrt(p)),
            # (at 1e-9 a smaller step stays inside; 65 entries: no packed leaf, whose
            # entries would move by their own sizes)
            jnp.asarray([1.0] * 64 + [1e-30]),
            "finite differences are NaN/Inf along",
        ),
        (
            lambda p: jnp.sum(p["w"]),
            {"w": jnp.asarray([jnp.nan, 1.0])},
            "parameter leaf ['w'] contains NaN/Inf",
        ),
    ],
    ids=["loss", "gradient", "differences", "params"],
)
def test_nonfinite_is_reported_with_location(fn, point, where):
    report = jaxcheck.verify(fn, point)
    assert report.status == "nonfinite"
    assert any(where in p for p in report.problems), report.problems
    assert where in str(report)
    if report.steps_tried == ():
        assert "no finite differences were taken" in str(report)
        # (16 directions were claimed taken where none was)
        assert (report.num_directions, report.max_directions) == (0, 16)


def test_an_infinite_jvp_at_the_edge_of_fns_domain_is_named_in_forward_mode():
    """sqrt at 0: reverse mode names the infinite gradient before any direction; forward
    mode put it down to fn's domain ("finite differences are NaN/Inf along 16 of 16
    directions") after cutting the step 16-fold again and again (14 steps tried, 748
    evaluations), though no step makes the derivative at params finite."""
    report = jaxcheck.verify(
        lambda p: jnp.sum(jnp.sqrt(p)), jnp.asarray([0.0, 1.0]), mode="forward"
    )
    assert report.status == "nonfinite"
    assert report.problems[0] == (
        "the derivative under test (forward mode, autodiff) is NaN/Inf along 16 of 16 "
        f"directions, and fn is not finite within a step of {report.step:.1e} along 16 (params "
        "at the edge of its domain?)"
    )
    assert len(report.steps_tried) <= 2, report.steps_tried


@pytest.mark.parametrize(
    "case",
    [
        # squares of c = scale x gradient norm near 1e304 overflowed in the leaf balance
        ("check_grads", jnp.exp, [700.0, 1.0], 1, "pass"),
        # the maps' float32 cotangent, 1 / exp(90), was subnormal, flushed to zero by
        # XLA, and the correct map "flat where the order below curves": a false failure
        ("check_grads", jnp.exp, [90.0, 1.0], 2, "pass"),
        ("verify", lambda p: jnp.sin(p) * 1e40, [0.5, 1.0], 2, "pass"),
        # a tangent at the leaf's scale of 1e40 overflowed float32
        ("check_grads", lambda x: x * 2.0, [1e40, 1.0], 2, "pass"),
        # a packed leaf's spread tested by a product that overflowed; a norm of 1e160
        ("verify", lambda p: jnp.sum(p) * 1e-300, [1.7e308, -1.7e308], 1, "pass"),
        ("verify", lambda p: jnp.sum(p**2), [1e160, 1.0], 1, "nonfinite"),
    ],
    ids=["exp-700", "exp-90-order-2", "sin-1e40-order-2", "1e40-order-2", "1e308", "1e160"],
)
def test_float64_values_beyond_float32s_range_raise_no_numpy_warning(case):
    """Host arithmetic of float64 magnitudes beyond float32's range (or whose squares leave
    float64's) warned, an error under a suite's warnings-as-errors; one made an order-2
    check of a correct function fail."""
    entry, fn, point, order, status = case
    with enable_x64():
        x = jnp.asarray(point)
        if entry == "verify":
            report = jaxcheck.verify(fn, x, order=order)
        else:
            report = _check_grads.run(fn, (x,), order, ("fwd", "rev")).report
    assert report.status == status, str(report)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_infinities_on_both_sides_of_the_point_raise_no_numpy_warning(mode):
    """fn finite at params and -inf on both sides of it (a log-density at the edge of its
    support, as JAX's dirichlet.logpdf off the simplex): the central difference of two
    infinities is NaN, which NumPy warns about; under a suite that turns warnings into
    errors (this one does) that warning raised inside the check."""

    def fn(x):
        return jnp.where(x[0] == 1.0, jnp.sum(x**2), -jnp.inf)

    report = jaxcheck.verify(fn, jnp.asarray([1.0, 2.0, 3.0]), mode=mode)
    assert report.status == "nonfinite", str(report)
    assert "finite differences are NaN/Inf along 16 of 16 directions" in str(report)


@pytest.mark.parametrize("value", [jnp.inf, jnp.nan])
def test_a_nonfinite_argument_is_named_beside_the_nonfinite_gradient(value):
    def fn(p, data):
        return jnp.sum(jnp.tanh(p["w"] * data["x"])) + jnp.sum(data["y"])

    data = {"x": jnp.asarray([1.0, value, 2.0]), "y": jnp.ones(2)}
    report = jaxcheck.verify(fn, {"w": jnp.ones(3)}, data)
    assert report.status == "nonfinite"
    line = (
        "argument args[0]['x'] contains NaN/Inf (held fixed, not differentiated; what is "
        "NaN/Inf above may come from it)"
    )
    assert line in report.problems, report.problems
    assert not any("['y']" in p for p in report.problems)


def test_wrong_sign_and_clipped_backward_fail():
    p = {"w": jnp.linspace(-2.0, 2.0, 8)}
    flipped = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(bug("scale", -2.0)(p["w"]))), p)
    assert flipped.status == "fail" and flipped.relative_error > 1.0
    clipped = jaxcheck.verify(lambda p: jnp.sum(bug("clip", 0.5)(p["w"]) ** 2), p)
    assert clipped.status == "fail"


def test_stationary_point_is_judged_in_absolute_terms():
    report = jaxcheck.verify(lambda p: jnp.sum((p - 1.0) ** 2), jnp.ones(4))
    assert report.status == "pass", str(report)
    assert any("zero to within finite-difference noise" in p for p in report.problems)
    bad = jaxcheck.verify(
        lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(bug("perturb", 1.0)(p)), jnp.ones(4)
    )  # a wrong gradient at that point still fails
    assert bad.status == "fail"


@pytest.mark.rules_auto
@pytest.mark.parametrize("bugged", [False, True])
def test_fn_with_new_constants_at_each_trace_is_not_passed(bugged):
    """Constants drawn with NumPy while tracing differ from program to program: fn is not
    a function of params alone. Its derivative then looks like zero within huge noise; that
    must not read as a pass, with or without a bug (a bug in a custom rule is then caught by
    that rule's own check)."""
    rng = np.random.default_rng(0)

    def fn(p):
        w = bug("scale", 0.01)(p["w"]) if bugged else p["w"]
        return jnp.sum(jnp.tanh(w @ jnp.asarray(rng.normal(size=(4, 3)), w.dtype)) ** 2)

    report = jaxcheck.verify(fn, {"w": jnp.full((2, 4), 0.3, jnp.float32)})
    assert any("not a function of params and args alone" in p for p in report.problems)
    # the 1 % bug is then found by its custom rule's own check (a deterministic function)
    assert report.status == ("fail" if bugged else "inconclusive"), str(report)
    assert any(p.startswith("wrong rule: custom_vjp") for p in report.problems) == bugged


def test_vector_fn_with_new_constants_at_each_trace_is_not_passed():
    """The same with an array output: its values, sums of outputs over their RMS, are of
    order 1, and scatter far beyond rounding."""
    rng = np.random.default_rng(0)

    def fn(p):
        return jnp.tanh(p["w"] @ jnp.asarray(rng.normal(size=(4, 3)), p["w"].dtype)) ** 2

    report = jaxcheck.verify(fn, {"w": jnp.full((2, 4), 0.3, jnp.float32)})
    assert report.status == "inconclusive", str(report)
    assert any("not a function of params and args alone" in p for p in report.problems)


def test_huge_parameter_values_do_not_overflow():
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.log(p)), jnp.asarray([1e30, 2e30], jnp.float32))
    assert report.status == "pass", str(report)


@pytest.mark.parametrize("bug", [1.0, 1.3])
def test_fn_that_differs_in_float64_is_not_called_zero_by_the_distance_to_it(bug):
    """The distance between the derivatives of the two functions (float32 and float64
    dropout masks) is no rounding of either: the float64 rule's derivative was taken as
    "zero to within noise" beside it (every direction taken for that, and a failure said
    to be at a stationary point)."""
    keys = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(keys[0], (4, 8)) / 2,
        "w2": jax.random.normal(keys[1], (8, 3)) / 2,
    }
    x = jax.random.normal(keys[2], (6, 4))

    def loss(p, x, key):
        h = jnp.tanh(x @ p["w1"])
        h = jnp.where(jax.random.bernoulli(key, 0.7, h.shape), h / 0.7, 0.0)
        return jnp.mean(jnp.tanh(h @ p["w2"]) ** 2)

    grad = jax.grad(loss)
    report = jaxcheck.verify(
        loss,
        p,
        x,
        jax.random.key(7),
        grad_fn=lambda p, x, k: {**grad(p, x, k), "w2": grad(p, x, k)["w2"] * bug},
    )
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    rule = report.checks[0]
    assert "same rule in float64" in rule.name and not rule.absolute
    assert report.num_directions == 4, report.stopped
    assert not any("zero" in q for q in report.problems), report.problems


@pytest.mark.parametrize("bug", [1.0, 1.01, 1.001])
def test_fn_that_differs_in_float64_is_judged_by_its_float64_rule(bug):
    """Dropout masks drawn in the default dtype differ between float32 and float64, so fn
    in float64 is another function: its float64 derivative against its own float64
    differences still judges the derivative's code (a 0.1 % bug in one leaf fails, named),
    where finite differences in float32 resolve a percent at best (a 1 % bug passed)."""
    rng = np.random.default_rng(0)
    p = {
        "a": jnp.asarray(rng.normal(size=20), jnp.float32),
        "b": jnp.asarray(rng.normal(size=5), jnp.float32),
    }

    def fn(p, key):
        mask = jax.random.bernoulli(key, 0.5, p["a"].shape)
        return jnp.sum(jnp.tanh(p["a"]) * mask) + jnp.sum(jnp.sin(p["b"]))

    grad = jax.grad(fn)

    def grad_fn(p, key):
        g = grad(p, key)
        return {"a": g["a"] * bug, "b": g["b"]}

    report = jaxcheck.verify(fn, p, jax.random.key(3), grad_fn=grad_fn)
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    assert report.reference_dtype == "float64"
    [said] = [q for q in report.problems if "fn computes something else in float64" in q]
    assert said.endswith(
        "the derivative's code is judged by the same rule run in float64 against finite "
        "differences in float64 (as precision='float64' does), not the float32 derivative "
        "itself. To check that too, draw random numbers in an explicit dtype (jax.random."
        "uniform(key, shape, jnp.float32); bernoulli with p=jnp.float32(...)) or pass them "
        "to fn as an argument"
    )
    assert not any(
        "(random numbers drawn in the default dtype, a branch" in q for q in report.problems
    )
    # the float64 rule leads the report (its numbers are the headline); the float32
    # derivative, of another function, is shown beside it and not judged
    rule, tested = report.checks[:2]
    assert "same rule in float64" in rule.name, report.checks
    assert rule.passed == (bug == 1.0) and rule.tolerance < 1e-5
    assert report.relative_error == rule.relative_error
    assert "(float32)" in tested.name and not tested.judged
    [row] = [line for line in str(report).splitlines() if tested.name in line]
    assert row.endswith("not judged"), row
    failing = [leaf.path for leaf in report.leaves if leaf.status == "fail"]
    assert failing == ([] if bug == 1.0 else ["['a']"])

    def fixed(p, key):  # as the report says
        mask = jax.random.bernoulli(key, jnp.float32(0.5), p["a"].shape)
        return jnp.sum(jnp.tanh(p["a"]) * mask) + jnp.sum(jnp.sin(p["b"]))

    report = jaxcheck.verify(fixed, p, jax.random.key(3))
    assert report.status == "pass", str(report)
    assert report.reference_dtype == "float64"
    assert not any("computes something else" in q for q in report.problems)


@pytest.mark.parametrize("bug", [1.0, 1.01])
def test_dropout_whose_other_mask_moves_the_gradient_under_10_percent_is_told_apart(bug):
    """Batch norm and dropout drawn in the default dtype: the float64 mask moved the
    float32 gradient by 9.9e-2, under the 0.1 that a gap of rounding may reach, so the
    check passed at a tolerance of 0.2 and put the gap down to a loss that cancels. fn
    draws random bits: a gap beyond 1e-2 is taken for other draws, and the float64 rule
    judged, as for a larger gap."""
    keys = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(keys[0], (4, 16)) / 2,
        "g": jnp.ones(16),
        "b": jnp.zeros(16),
        "w2": jax.random.normal(keys[1], (16,)) / 4,
    }
    x = jax.random.normal(keys[2], (32, 4))

    def loss(p, key, x, y):
        h = x @ p["w1"]
        h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5) * p["g"] + p["b"]
        h = jnp.where(jax.random.bernoulli(key, 0.9, h.shape), jnp.tanh(h) / 0.9, 0)
        return jnp.mean((h @ p["w2"] - y) ** 2)

    grad = jax.grad(loss)
    report = jaxcheck.verify(
        loss,
        p,
        jax.random.key(42),
        x,
        jnp.sin(x[:, 0]),
        grad_fn=lambda p, *a: {**grad(p, *a), "g": grad(p, *a)["g"] * bug},
    )
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    assert any("fn computes something else in float64" in q for q in report.problems)
    assert not any("it cancels" in q for q in report.problems), report.problems
    rule, tested = report.checks[:2]
    assert "same rule in float64" in rule.name and rule.tolerance < 1e-5, str(report)
    assert not tested.judged


@pytest.mark.parametrize("bug", [1.0, 1.1])
def test_rule_wrong_in_float32_alone_beside_default_dtype_dropout_fails(bug):
    """fn in float64 is another function (dropout drawn in the default dtype), and a
    custom_vjp is wrong on its float32 path alone: the float64 rule passes, but finite
    differences in float32 fail the float32 derivative, and that failure stands (it was
    passed, judged by the float64 rule alone, the float32 row "not judged")."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def bwd(x, g):
        d = g * jnp.cos(x)
        return (d * bug if x.dtype == jnp.float32 else d,)

    f.defvjp(lambda x: (jnp.sin(x), x), bwd)

    def loss(p, key):
        keep = jax.random.uniform(key, p.shape, dtype=jnp.result_type(float)) > 0.3
        return jnp.sum(jnp.where(keep, f(p), 0.0) / 0.7)

    report = jaxcheck.verify(loss, jnp.linspace(0.1, 1.0, 16), jax.random.key(0))
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    if bug == 1.0:  # judged by the float64 rule, as above
        assert report.reference_dtype == "float64"
        return
    assert report.reference_dtype == "float32"
    assert 0.03 < report.relative_error < 0.3, str(report)
    [said] = [q for q in report.problems if "fn's value differs too" in q]
    assert said.endswith(
        "and fn's value differs too (fn computes something else in float64, e.g. random "
        "numbers drawn in the default dtype, or cancels in float32, as 1 - cos(x) near 0 "
        "does, leaving its value and derivative mostly rounding); the same rule in float64 "
        "passes its own finite differences, but those in float32 fail the float32 "
        "derivative (a rule or grad_fn wrong on its float32 path alone, or its float32 "
        "rounding grown far beyond the value's?): it is judged by them (check such a rule "
        "alone with jaxcheck.verify_rule)"
    ), said
    assert report.checks[0].name == "reverse autodiff (float32) vs finite differences (float32)"


def test_a_float32_loss_that_cancels_is_not_put_down_to_random_numbers_alone():
    """(1 - cos u) / u ** 2 at u near 0.02 in float32: its value and derivative are mostly
    rounding, 83 % off the float64 derivative. The note named random numbers drawn in the
    default dtype and a rule or grad_fn wrong on its float32 path, of which fn has none."""
    rng = np.random.RandomState(1)
    params = {
        "w1": jnp.asarray(rng.randn(4, 5) / 2, jnp.float32),
        "b1": jnp.asarray(rng.randn(5) * 0.1, jnp.float32),
        "w2": jnp.asarray(rng.randn(5, 3) / 2, jnp.float32),
    }
    x = jnp.asarray(np.random.RandomState(0).randn(8, 4), jnp.float32)

    def loss(p, x):
        u = x @ p["w1"] * 0.01 + 0.02
        return jnp.mean((1 - jnp.cos(u)) / u**2 @ p["w2"])

    report = jaxcheck.verify(loss, params, x)
    [said] = [q for q in report.problems if "fn's value differs too" in q]
    assert "or cancels in float32, as 1 - cos(x) near 0 does" in said, said
    assert "(fn's derivative here is JAX's own, of no custom rule nor grad_fn: its float32 " in said
    assert "rounding grown far" in said, said
    assert "wrong on its float32 path" not in said, said


def test_constant_function_with_rounding_gradient_passes():
    """softplus(x) + log_sigmoid(-x) is identically zero; its float32 gradient is rounding."""
    fn = lambda p: jnp.sum(jax.nn.softplus(30 * p) + jax.nn.log_sigmoid(-30 * p))  # noqa: E731
    # XLA's optimized build (a Checker's, for an input this large), whose reassociation
    # leaves rounding (the fast-compile build of a one-off check evaluates the cancellation
    # exactly: fn is then flat here)
    p = jnp.linspace(-1.0, 1.0, 5000)
    report = jaxcheck.Checker(fn)(p)
    assert report.status == "pass", str(report)
    # a GPU build evaluates the cancellation exactly, as CPU's small-program build does
    said = ("judged in absolute terms",) if CPU else ("judged in absolute terms", "flat here")
    assert any(s in q for q in report.problems for s in said)
    wrong = lambda p: jnp.sum(  # noqa: E731
        jax.nn.softplus(30 * bug("perturb", 1.0)(p)) + jax.nn.log_sigmoid(-30 * p)
    )
    assert jaxcheck.verify(wrong, p).status == "fail"


@pytest.mark.parametrize("platform", ["cpu", "gpu", "gpu-highest"])
def test_rounding_accepted_on_a_gpu_names_tensorfloat32(monkeypatch, platform):
    """float32 matrix products on GPUs run in TensorFloat-32 by default: a float32
    gradient ~1e-2 from the float64 rule is that (rounding that does not move when params
    move by a few ulps, as a different computation's). Without it, the same gap is no
    rounding: the rule's float32 path is 1 % off, and the check fails."""
    from jaxcheck import _plan

    @jax.custom_vjp
    def ident(x):
        return x

    ident.defvjp(lambda x: (x, None), lambda _, g: (g * 1.01 if g.dtype == jnp.float32 else g,))
    m = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    fn = lambda p: jnp.sum(jnp.sin(ident(p) @ m) ** 2)  # noqa: E731
    if platform != "cpu":
        monkeypatch.setattr(_plan, "platform_of", lambda device: "gpu")
    precision = "highest" if platform == "gpu-highest" else None
    with jax.default_matmul_precision(precision):
        report = jaxcheck.verify(fn, jnp.linspace(0.2, 1.0, 6).reshape(2, 3), rules=False)
    if platform != "gpu":
        assert report.status == "fail", str(report)
        assert any("moves by only" in q for q in report.problems), report.problems
        return
    assert report.status == "pass", str(report)
    [note] = [p for p in report.problems if "accepted as rounding" in p]
    assert "float32 matrix products run in TensorFloat-32 on this GPU" in note


def _float32_only(fn):
    """fn as a float32-only kernel would be: it refuses any other parameter dtype."""

    def refusing(p, *args):
        for leaf in jax.tree_util.tree_leaves(p):
            if leaf.dtype != jnp.float32:
                raise TypeError(f"this kernel takes float32 only, got {leaf.dtype}")
        return fn(p, *args)

    return refusing


@pytest.mark.parametrize("leaf", [(1, "w"), (2, "b")])
def test_one_percent_bug_in_a_float32_only_model_fails_on_its_leaf(leaf):
    """Finite differences in float32 resolve a 1 % bug on one leaf (issue: the float64
    reference cannot run; rules=False, so the all-leaf and leaf verdicts alone decide)."""
    sizes = (16, 32, 32, 4)
    params = mlp_params(sizes, jnp.float32)
    x, y = mlp_data(sizes, jnp.float32)
    good = jaxcheck.verify(_float32_only(mlp_loss()), params, x, y, rules=False)
    assert good.status == "pass", str(good)
    assert good.reference_dtype == "float32"
    assert any("fn could not run in float64 (TypeError: this kernel" in q for q in good.problems)
    assert 1e-5 < good.noise_floor < 1e-3  # the resolution reached, in the report
    assert good.relative_error < good.tolerance < 1e-3
    bad = jaxcheck.verify(
        _float32_only(mlp_loss(bug("scale", 0.01), leaf)), params, x, y, rules=False
    )
    assert bad.status == "fail", str(bad)
    path = f"['layers'][{leaf[0]}]['{leaf[1]}']"
    assert [lf.path for lf in bad.leaves if lf.status == "fail"] == [path]


@pytest.mark.parametrize(("scale", "status"), [(1.0, "pass"), (1.001, "fail"), (1.003, "fail")])
@pytest.mark.parametrize("seed", [0, 2])
def test_a_float32_only_loss_that_cancels_to_zero_is_judged_at_its_derivatives_precision(
    scale, status, seed
):
    """A loss odd in its params at a symmetric point sums to about 0, so its float32
    rounding is large against its value, though not against its derivatives: the floor
    that value's precision set (1.4e-2) passed a grad_fn 0.1 % off on one leaf, where the
    right one is held to 3.5e-4."""
    x = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
    params = {"x": x, "w": jnp.cos(x)}
    loss = _float32_only(lambda p: jnp.sum(jnp.tanh(jnp.sin(p["x"]) * p["w"])))
    assert abs(float(loss(params))) < 1e-5
    grad = jax.grad(loss)

    def grad_fn(p):
        g = grad(p)
        return {"x": g["x"], "w": g["w"] * scale}

    report = jaxcheck.verify(loss, params, grad_fn=grad_fn, key=jax.random.key(seed))
    assert report.reference_dtype == "float32"
    assert report.status == status, str(report)
    assert report.tolerance < 1.5e-3, str(report)
    if status == "fail":
        assert [lf.path for lf in report.leaves if lf.status == "fail"] == ["['w']"]


def _gp_negative_log_likelihood(p, x, y):
    """A Gaussian process's negative log marginal likelihood, RBF kernel, 12 points."""
    scales = jnp.exp(p["log_lengths"])
    squared = jnp.sum((x[:, None] - x[None]) ** 2 / scales**2, -1)
    k = jnp.exp(2 * p["log_amplitude"]) * jnp.exp(-0.5 * squared)
    k = k + (jnp.exp(2 * p["log_noise"]) + 1e-6) * jnp.eye(x.shape[0])
    chol = jnp.linalg.cholesky(k)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    return (
        0.5 * y @ alpha + jnp.sum(jnp.log(jnp.diag(chol))) + 0.5 * x.shape[0] * jnp.log(2 * jnp.pi)
    )


@pytest.mark.parametrize(("seed", "log_noise"), [(0, -6.0), (4, -5.0)])
def test_a_leaf_of_one_entry_is_judged_against_fns_noise_along_every_direction(seed, log_noise):
    """A float64 GP likelihood (an ill-conditioned kernel, rounded far beyond eps of its
    value): its noise scale, one entry, failed alone at 3.5e-8 against 1.9e-8 on every key, its
    gradient right to 3e-14. All of a one-entry leaf's directions run along one line, and
    that line's fourth difference measured fn's noise 40 times below what the all-leaf
    directions did; a 0.1 % bug in another leaf named this one too."""
    with enable_x64():
        x = jax.random.uniform(jax.random.PRNGKey(seed), (12, 2), jnp.float64) * 3
        y = jnp.sin(x[:, 0]) + 0.1 * jnp.cos(3 * x[:, 1])
        params = {
            "log_lengths": jnp.asarray([0.0, 0.3]),
            "log_amplitude": jnp.asarray(0.1),
            "log_noise": jnp.asarray(log_noise),
        }
        fn = _gp_negative_log_likelihood
        report = jaxcheck.verify(fn, params, x, y, localize=True)
        assert report.status == "pass", str(report)
        assert [leaf.status.value for leaf in report.leaves] == ["pass"] * 3, str(report)
        grad = jax.grad(fn)

        def grad_fn(p, x, y):
            g = grad(p, x, y)
            return {**g, "log_lengths": g["log_lengths"].at[1].multiply(1.001)}

        bad = jaxcheck.verify(fn, params, x, y, grad_fn=grad_fn)
    assert bad.status == "fail", str(bad)
    assert [leaf.path for leaf in bad.leaves if leaf.status == "fail"] == ["['log_lengths']"]


def _near_optimum_model():
    """A float32-only equinox MLP fit to its own output plus a residual of 3e-5: the
    float32 gradient of its small biases is then 1e-3 off the exact one by rounding alone
    (the residual cancels in float32)."""
    eqx = pytest.importorskip("equinox")
    kd, km, kb = jax.random.split(jax.random.PRNGKey(3), 3)
    model = eqx.nn.MLP(8, 4, 32, 2, activation=jnp.tanh, key=km)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    model = jax.tree_util.tree_unflatten(
        treedef,
        [
            1e-3 * jax.random.normal(jax.random.fold_in(kb, i), v.shape)
            if "bias" in jax.tree_util.keystr(path)
            else v
            for i, (path, v) in enumerate(leaves)
        ],
    )
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x = jax.random.normal(kd, (16, 8))
    y = apply(params, x) + 3e-5 * jax.random.normal(jax.random.PRNGKey(103), (16, 4))
    return _float32_only(lambda p, x, y: jnp.mean((apply(p, x) - y) ** 2)), params, x, y


@pytest.mark.parametrize("factor", [1.0, 1.03, 0.0])
def test_a_float32_only_model_near_its_optimum_is_not_failed_for_its_gradients_rounding(factor):
    """Near a fit, the float32 gradient of the last bias is 1e-3 off by rounding, and
    float32 finite differences resolve that: the correct model failed on that bias at 2 of
    12 keys. The gradient's move when params move by a few ulps, its rounding, was read in
    the weights' units, ten times smaller than the projections' for a leaf checked alone at
    a larger scale than its own; it is now taken relative to the gradient along the same
    leaves. A 3 % error in that bias still fails."""
    fn, p, x, y = _near_optimum_model()

    def grad_fn(p, x, y):
        g = jax.grad(fn)(p, x, y)
        return eqx.tree_at(lambda m: m.layers[2].bias, g, factor * g.layers[2].bias)

    eqx = pytest.importorskip("equinox")
    given = {} if factor == 1.0 else {"grad_fn": grad_fn}
    report = jaxcheck.verify(fn, p, x, y, rules=False, key=3, **given)
    assert report.reference_dtype == "float32"
    if factor == 1.0:
        assert report.status == "pass", str(report)
        return
    assert report.status == "fail", str(report)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == [".layers[2].bias"]


def _casting_model(seed, round_to=lambda a: a.astype(jnp.float32)):
    """A tanh MLP that casts its params to float32 inside (a precision policy; or rounds
    them with `round_to`), with biases of 1e-3, and its data."""
    keys = jax.random.split(jax.random.key(seed), 8)
    sizes = (8, 32, 32, 4)
    p = {
        f"w{i}": jax.random.uniform(keys[i], (a, b), minval=-1, maxval=1) / np.sqrt(a)
        for i, (a, b) in enumerate(zip(sizes, sizes[1:]))
    }
    p |= {f"b{i}": 1e-3 * jax.random.normal(keys[3 + i], (b,)) for i, b in enumerate(sizes[1:])}

    def loss(p, x, y):
        p = jax.tree.map(round_to, p)
        h = x
        for i in range(2):
            h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    return loss, p, jax.random.normal(keys[6], (16, 8)), jax.random.normal(keys[7], (16, 4))


def test_a_model_rounding_its_params_to_float32_not_judged_is_pointed_to_native_precision():
    """Against the float64 reference, the float32 staircase of such a model left its check
    not judged (noise floor 4e-2 to 9e-2 at four seeds), where precision="native" passes it
    at a tolerance of about 1e-3 and fails a 1 % bug; the report did not say so. (Its
    params rounded as in the model: a cast to float32 rounds nothing there, see below.)"""
    float32 = functools.partial(jax.lax.reduce_precision, exponent_bits=8, mantissa_bits=23)
    loss, p, x, y = _casting_model(0, float32)
    report = jaxcheck.verify(loss, p, x, y)
    assert report.status == "inconclusive", str(report)
    assert any(
        q.endswith(
            "is too coarse to judge the gradient; fn rounds to float32 inside: "
            "precision='native' takes finite differences in float32 throughout, as fn "
            "computes, which may resolve it more finely"
        )
        for q in report.problems
    ), report.problems
    native = jaxcheck.verify(loss, p, x, y, precision="native")
    assert native.status == "pass" and native.tolerance < 1e-2, str(native)
    assert not any("precision='native'" in q for q in native.problems)


@pytest.mark.parametrize("factor", [1.0, 1.0 + 3e-4])
def test_a_model_casting_its_params_to_float32_is_judged_at_float64_resolution(factor):
    """The casts to float32 round nothing in the model, only in the float64 reference,
    which holds fn's float32 values in float64 instead: a correct gradient passes at a
    float64 step and tolerance, one 3e-4 off fails. Was: not judged (as above)."""
    loss, p, x, y = _casting_model(0)

    def grad_fn(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return g | {"w1": g["w1"] * factor}

    report = jaxcheck.verify(loss, p, x, y, grad_fn=grad_fn)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert report.tolerance < 2e-6 and report.noise_floor < 1e-7, str(report)
    [said] = [q for q in report.problems if q.startswith("fn casts values")]
    assert said.startswith(
        "fn casts values computed from params to float32, which rounds nothing in the model "
        "(first at tests/test_numerics.py:"
    )
    assert said.endswith(
        "but would round in float64: the reference evaluates fn's program with its float32 "
        "values held in float64, and judges it at float64 resolution"
    )


def test_a_float32_only_fn_refusing_float64_in_its_own_words_gets_no_stale_constant_hint():
    """The hint about float32 conversions of NumPy constants (jax.clear_caches()) was given
    wherever fn's error named float32 and float64, a kernel's own "takes float32 only, got
    float64" too; it is given where JAX's words say operands were mismatched."""
    sizes = (16, 32, 32, 4)
    params = mlp_params(sizes, jnp.float32)
    x, y = mlp_data(sizes, jnp.float32)
    report = jaxcheck.verify(_float32_only(mlp_loss()), params, x, y, rules=False)
    (note,) = [q for q in report.problems if q.startswith("fn could not run in float64")]
    assert "(TypeError: this kernel takes float32 only, got float64)" in note
    assert "jax.clear_caches()" not in note
    mixed = TypeError("lax.add requires arguments to have the same dtypes, got float32, float64.")
    assert jaxcheck._precision.stale_constants(mixed)


def _small_bias_model(weight):
    """A float32-only tanh layer whose bias of 1e-4 (scaled by `weight` inside) sits beside
    weights of about 0.4, and its data."""

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + weight * p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    keys = jax.random.split(jax.random.key(100), 5)
    p = {
        "w1": jax.random.normal(keys[0], (7, 7)) / np.sqrt(7),
        "b1": 1e-4 * jax.random.normal(keys[1], (7,)),
        "w2": jax.random.normal(keys[2], (7, 4)) / np.sqrt(7),
        "b2": 0.1 * jax.random.normal(keys[3], (4,)),
    }
    x = jax.random.normal(keys[4], (64, 7))
    return loss, p, x, jnp.sin(x[:, :1] * jnp.arange(1, 5.0))


def _bias_scaled(loss, factor):
    def grad_fn(p, *args):
        g = jax.grad(loss)(p, *args)
        return {**g, "b1": g["b1"] * factor}

    return grad_fn


@pytest.mark.parametrize("factor", [0.0, -1.0, 3.0, 1.01, 1.0])
def test_a_small_leaf_of_a_float32_only_model_is_checked_alone_at_the_others_scale(factor):
    """In a float32-only model a bias of 1e-4 beside weights of 0.4 weighs little in the
    all-leaf check, and alone it moved by steps of its own size, whose effect float32
    rounding hides: its gradient zeroed, negated or tripled passed, with nothing said.
    Alone it now moves by a tenth of the parameters' pooled RMS: those fail, named; a 1 %
    error sits at the resolution reached, its tolerance in the leaf's row."""
    loss, p, x, y = _small_bias_model(1.0)
    report = jaxcheck.verify(_float32_only(loss), p, x, y, grad_fn=_bias_scaled(loss, factor))
    if factor in (0.0, -1.0, 3.0):
        assert report.status == "fail", str(report)
        assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['b1']"]
        return
    assert report.status == "pass", str(report)
    [b1] = [leaf for leaf in report.leaves if leaf.path == "['b1']"]
    # the resolution reached for it (a 1 % error sits at it: the leaf passes, or fails
    # within its bars and is not judged, by the jax version's rounding)
    assert b1.tolerance < 0.02
    assert b1.status in (("pass",) if factor == 1.0 else ("pass", "inconclusive"))


@pytest.mark.parametrize("scale", [1e-16, 1e-9])
@pytest.mark.parametrize("factor", [1.0, -1.0, 1.01])
def test_a_leaf_far_smaller_than_the_others_is_checked_alone_at_their_scale(factor, scale):
    """A leaf at 1e-16 beside weights of 0.3 moved, alone, by steps of its own size: its
    change of fn is below float64 rounding, and a negated gradient passed as "zero to
    within noise" (the same leaf at exactly 0, moved at the others' scale, failed). Now it
    is checked again moved by a tenth of the parameters' pooled RMS: a wrong gradient
    fails, named (test_leaves_of_very_different_scales: a small leaf that fn reads at its
    own scale keeps it)."""
    x = jnp.linspace(-1.0, 2.0, 6)
    c = jnp.array([1.0, 2.0, -1.0])

    @jax.custom_vjp
    def scaled(v):
        return v

    scaled.defvjp(lambda v: (v, None), lambda _, g: (factor * g,))

    def loss(p):
        return jnp.sum(jnp.tanh(p["w"] * x)) + jnp.sum(scaled(p["b"]) * c)

    p = {"w": jnp.full(6, 0.3), "b": scale * jnp.array([1.0, -2.0, 3.0])}
    report = jaxcheck.verify(loss, p)
    if factor == 1.0:
        assert report.status == "pass", str(report)
        assert not [q for q in report.problems if "zero to within" in q], str(report)
        return
    assert report.status == "fail", str(report)
    [b] = [leaf for leaf in report.leaves if leaf.path == "['b']"]
    assert b.status == "fail" and b.relative_error == pytest.approx(abs(factor - 1), rel=0.1)


@pytest.mark.parametrize("factor", [1.0, -1.0])
def test_a_leaf_a_float32_only_pass_cannot_see_and_unjudged_alone_makes_no_pass(factor):
    """The same bias entering fn 100 times weaker: alone it cannot be judged even at the
    larger step, and the all-leaf check could not see it wholly wrong: a pass says nothing
    of it, so the check is inconclusive, naming it (negated, it fails)."""
    loss, p, x, y = _small_bias_model(1e-2)
    report = jaxcheck.verify(_float32_only(loss), p, x, y, grad_fn=_bias_scaled(loss, factor))
    if factor == -1.0:
        assert report.status == "fail", str(report)
        return
    assert report.status == "inconclusive", str(report)
    [note] = [q for q in report.problems if "could not be judged alone" in q]
    assert note.startswith(
        "the all-leaf check passes in float32, where it cannot see an error in this leaf "
        "even as large as its gradient"
    )
    assert "but ['b1'] (relative error" in note


def test_a_float32_only_leaf_failing_alone_within_its_bars_is_not_called_wrong():
    """A correct float32-only ReLU classifier: its first layer failed alone at 3.4e-2
    against its tolerance of 3.3e-2 (the lower end of its interval far below), while the
    all-leaf check passed, and passed alone at other keys: a correct model called WRONG."""
    keys = jax.random.split(jax.random.key(0), 2)
    x, y = jax.random.normal(keys[0], (32, 16)), jax.random.normal(keys[1], (32, 4))
    kk = jax.random.split(jax.random.key(2), 6)
    p = {
        "w1": jax.random.normal(kk[0], (16, 64)) / 4,
        "b1": 1e-3 * jax.random.normal(kk[1], (64,)),
        "w2": jax.random.normal(kk[4], (64, 4)) / 8,
        "b2": 1e-3 * jax.random.normal(kk[5], (4,)),
    }

    def loss(p, x, y):
        logits = jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        labels = jnp.argmax(y, -1)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    report = jaxcheck.verify(_float32_only(loss), p, x, y)
    assert report.status == "pass", str(report)
    [note] = [q for q in report.problems if q.startswith("fail alone only within")]
    assert note.startswith(
        "fail alone only within their error bars, in float32, while the all-leaf check "
        "passes: ['w1'] (relative error"
    )
    assert note.endswith("; not judged (more directions, num_directions, narrow the bars)")


@pytest.mark.parametrize("zeroed", [False, True])
def test_a_small_positive_leaf_of_a_float32_only_model_keeps_its_own_scale_alone(zeroed):
    """A scale of 1e-4 inside a log: moved alone by a tenth of the others' RMS it left
    fn's domain, and the leaf came out NaN/Inf where it was judged before (its gradient
    zeroed was no longer named). A leaf of one sign keeps its own scale alone."""
    keys = jax.random.split(jax.random.key(1), 3)
    x, y = jax.random.normal(keys[0], (32, 6)), jax.random.normal(keys[1], (32,))

    def loss(p, x, y):
        return jnp.mean((x @ p["w"] + p["b"] - y) ** 2) + 1e-3 * jnp.sum(jnp.log(p["c"]))

    def zero_c(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return {**g, "c": jnp.zeros_like(g["c"])}

    p = {
        "w": 0.5 * jax.random.normal(keys[2], (6,)),
        "b": jnp.zeros(()),
        "c": jnp.asarray([1e-4, 2e-4, 0.5e-4], jnp.float32),
    }
    report = jaxcheck.verify(
        _float32_only(loss), p, x, y, grad_fn=zero_c if zeroed else None, localize=True
    )
    [c] = [leaf for leaf in report.leaves if leaf.path == "['c']"]
    assert c.status == ("fail" if zeroed else "pass"), str(report)
    assert report.status == ("fail" if zeroed else "pass"), str(report)


def test_a_float32_only_leaf_failing_alone_well_beyond_its_tolerance_still_fails():
    """The leaf failing alone within its bars is not judged only near its tolerance: a
    3 % error in a bias measured at 1.9 times its tolerance (the interval from just
    below it) passed the check."""
    ks = jax.random.split(jax.random.PRNGKey(2), 6)
    x, labels = jax.random.normal(ks[0], (64, 10)), jax.random.randint(ks[1], (64,), 0, 4)
    p = {
        "w1": jax.random.normal(ks[2], (10, 32)) / jnp.sqrt(10.0),
        "b1": jnp.full((32,), 0.01),
        "w2": jax.random.normal(ks[3], (32, 32)) / jnp.sqrt(32.0),
        "b2": jnp.zeros((32,)),
        "w3": jax.random.normal(ks[4], (32, 4)) / jnp.sqrt(32.0),
        "b3": jnp.zeros((4,)),
    }

    def loss(p, x, labels):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        logits = h @ p["w3"] + p["b3"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    def off(p, x, labels):
        g = jax.grad(loss)(p, x, labels)
        return {**g, "b2": 1.03 * g["b2"]}

    report = jaxcheck.verify(_float32_only(loss), p, x, labels, grad_fn=off, key=0)
    assert report.status == "fail", str(report)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['b2']"]


def test_a_large_leaf_of_a_float32_only_model_resolved_coarsely_alone_says_so():
    """A float32-only leaf of 131,072 entries with its gradient 1 % off passed: alone it
    is resolved to 1.7 %, while the all-leaf tolerance of 0.38 % the headline shows weighs
    it little. The report now states the resolution reached for it."""

    def loss(p, x):
        h = jnp.sin(x * p["a"] + p["b"])
        return jnp.mean(h**2 + h)

    def grad_fn(p, x):
        g = jax.grad(loss)(p, x)
        return {**g, "a": g["a"] * 1.01}

    keys = jax.random.split(jax.random.key(12), 3)
    x = jax.random.normal(keys[0], (2048, 64))
    p = {
        "a": 1 + 0.1 * jax.random.normal(keys[1], (2048, 64)),
        "b": 0.5 * jax.random.normal(keys[2], (64,)),
    }
    report = jaxcheck.verify(_float32_only(loss), p, x, grad_fn=grad_fn)
    [a] = [leaf for leaf in report.leaves if leaf.path == "['a']"]
    assert report.status == "pass" and a.status == "pass", str(report)
    assert a.tolerance > 0.01 > report.tolerance  # the bug sits between the two
    [note] = [q for q in report.problems if q.startswith("leaves checked alone in float32")]
    assert f"['a'] to {a.tolerance:.1e}; an error below that in them passes" in note


def test_a_jump_at_the_point_is_named_as_one():
    """round at half-integers jumps within any step: nothing to judge, and the report says
    that fn may jump here before it asks whether fn is random."""
    report = jaxcheck.verify(lambda x: jnp.sum(jnp.round(x)), jnp.asarray([0.5, 1.5, 2.5]))
    assert report.status == "inconclusive", str(report)
    [said] = [q for q in report.problems if "scatter by" in q]
    assert "cannot be told from zero: fn jumps within the step of params (a discontinuity" in said


@pytest.mark.parametrize("size", [1.0, 1e-7])
def test_a_jump_centred_on_the_point_is_inconclusive(size):
    """sign(0) is halfway up its jump, so its fourth difference vanishes and only the 1/h
    growth of the central differences shows it; a jump of 1e-7 beside a slope of order one
    shows only at a smaller step, and still biases the larger one 7 times its error bar."""
    report = jaxcheck.verify(
        lambda x: size * jnp.sum(jnp.sign(x)) + jnp.sum(x**2), jnp.asarray([0.0, 1.0, -0.3])
    )
    assert report.status == "inconclusive", str(report)
    assert report.num_nonsmooth == report.num_directions
    assert "(kinks or jumps within the step)" in str(report)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (jnp.maximum, (jnp.asarray([0.5, 1.0, -0.3]), jnp.asarray([0.5, 1.0, -0.3]))),
        (jnp.abs, (jnp.asarray([0.0, 0.0, 0.0]),)),
        (lambda x: jnp.clip(x, -0.3, 1.0), (jnp.asarray([-0.3, 1.0, 1.0]),)),
    ],
    ids=["maximum-tie", "abs-at-0", "clip-at-bounds"],
)
def test_order_2_at_a_tie_is_inconclusive_not_a_failure(fn, args):
    """At a tie the derivative maps jump, halfway (JAX splits a tie's derivative in two):
    the second order cannot be judged there; the first order is right where it is smooth."""
    report = jaxcheck.verify(lambda a: fn(*a), args, order=2, mode="both")
    assert report.status == "inconclusive", str(report)
    assert "FAIL" not in str(report)


def test_a_failing_report_leads_with_the_comparison_that_failed():
    """bfloat16 parameters with a gradient 1 % off in one leaf: the bfloat16 derivative is
    within its own rounding of the finite differences (tolerance 7.8e-2), the same rule in
    float64 is not (2.4e-4), and the check fails. Was: the headline, the leaf row and the
    reason the check stopped all quoted the passing row's tolerance, 7.8e-2, above the
    error they called a failure."""
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    params = {
        "w": jnp.linspace(-0.5, 0.6, 6).reshape(3, 2).astype(jnp.bfloat16),
        "b": jnp.asarray([0.1, -0.1]).astype(jnp.bfloat16),
    }

    def loss(p, x):
        y = jnp.tanh(x.astype(jnp.bfloat16) @ p["w"] + p["b"])
        return jnp.sum(y.astype(jnp.float32) ** 2)

    grad = jax.grad(loss)

    def off(p, x):
        g = grad(p, x)
        return {**g, "w": (g["w"].astype(jnp.float32) * 1.01).astype(jnp.bfloat16)}

    report = jaxcheck.verify(loss, params, x, grad_fn=off)
    assert report.status == "fail"
    [passed, failed] = report.checks
    assert passed.passed and not failed.passed
    assert "same rule in float64" in failed.name
    assert (report.relative_error, report.tolerance) == (failed.relative_error, failed.tolerance)
    assert report.relative_error > report.tolerance
    assert report.stopped.endswith(f"is clear above the tolerance {failed.tolerance:.1e}")
    leaf = {leaf.path: leaf for leaf in report.leaves}["['w']"]
    assert leaf.status == "fail" and leaf.relative_error > leaf.tolerance


@pytest.mark.parametrize("offset", [0.0, 1e-3])
def test_a_minimum_exact_in_float32_only_is_judged_in_float64(offset):
    """Targets computed in float32 from the same weights: the fit is perfect in float32
    (gradient exactly 0) and off by float32 rounding in float64 (gradient about 1e-8), a
    relative gap of 1. Was: taken for fn computing something else in float64, judged in
    float32 instead, and inconclusive at a noise floor of 1.0."""
    x = jax.random.normal(jax.random.key(1), (32, 3))
    w = jnp.asarray([[0.5], [-0.3], [0.2]])
    y = x @ w

    def loss(w, x, y):
        return jnp.mean((x @ w - y) ** 2)

    grad = jax.grad(loss)
    report = jaxcheck.verify(loss, w, x, y, grad_fn=lambda w, x, y: grad(w, x, y) + offset)
    assert str(report.reference_dtype) == "float64", report.problems
    assert not any("computes something else" in p for p in report.problems), report.problems
    assert report.status == ("pass" if offset == 0 else "fail"), str(report)


@pytest.mark.parametrize("bug", [0.0, 1e-3])
def test_a_relu_unit_on_its_kink_is_not_taken_for_noise(bug):
    """One pre-activation of a ReLU layer exactly 0 in float32 (a hair off 0 in float64):
    every direction crosses that kink within the step, so the fourth differences of all of
    them are the kink's, which the median took for noise. Was: a pass on a tolerance raised
    to 9e-4 "on measured noise", through which a 0.1 % bug in w1 passed too; the kinked
    directions are now found (their fourth differences shrink with the step, as noise's
    do not) and the check is inconclusive without the bug; with it, the entries at the
    kink held fixed, the others fail (as in the test of a pruned model above)."""
    k = jax.random.split(jax.random.key(1), 4)
    params = {
        "w1": jax.random.normal(k[0], (3, 16)),
        "b1": 0.1 * jax.random.normal(k[1], (16,)),
        "w2": jax.random.normal(k[2], (16, 1)),
    }
    x = jax.random.normal(k[3], (32, 3))
    params["b1"] = params["b1"].at[0].set(-(x[0] @ params["w1"][:, 0]))
    assert (x[0] @ params["w1"] + params["b1"])[0] == 0

    def loss(p, x):
        return jnp.mean((jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]) ** 2)

    grad = jax.grad(loss)
    report = jaxcheck.verify(
        loss, params, x, grad_fn=lambda p, x: {**grad(p, x), "w1": grad(p, x)["w1"] * (1 + bug)}
    )
    if bug:
        assert report.status == "fail", str(report)
        assert report.problems[0].startswith("fn has kinks (one-sided slopes that differ) at ")
        assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['w1']"]
        return
    assert report.status == "inconclusive", str(report)
    assert report.num_nonsmooth >= 8
    assert "directions are smooth at this point" in report.problems[0]


@pytest.mark.parametrize("bug", [1.0, 1.02])
def test_a_grad_fn_wrong_on_its_float32_path_alone_fails_in_float32(bug):
    """A hand-written gradient 2 % off in float32 alone differs from itself in float64 by
    about that: the gap was taken for rounding and passed (no rule check sees into
    grad_fn). The gap does not move when params move by a few ulps, as rounding would: it
    fails against float64 finite differences and the leaf is named; the right one passes."""

    def loss(p, x):
        return jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)

    def grad_fn(p, x):
        z = jnp.tanh(x @ p["w"] + p["b"])
        d = 2 * z * (1 - z * z) / z.size
        gw = x.T @ d
        return {"w": gw * bug if gw.dtype == jnp.float32 else gw, "b": d.sum(0)}

    params = {"w": jnp.linspace(-0.5, 0.5, 6).reshape(3, 2), "b": jnp.asarray([0.1, -0.2])}
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    report = jaxcheck.verify(loss, params, x, grad_fn=grad_fn)
    if bug == 1.0:
        assert report.status == "pass" and report.relative_error < 1e-6, str(report)
        assert not any("grad_fn (float32) vs finite differences" in q for q in report.problems)
        return
    assert report.status == "fail", str(report)
    assert str(report).splitlines()[0] == "jaxcheck.verify: FAIL — gradient is WRONG"
    assert 0.01 < report.relative_error < 0.1 and report.tolerance < 1e-4
    assert any("moves by only" in q for q in report.problems)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['w']"]


@pytest.mark.parametrize("factor", [1.5, -1.0])
def test_a_rule_wrong_only_in_float32_fails_however_large(factor):
    """fn's value is the same in float32 and float64, only its derivative differs: not
    'fn computes something else' (which judged the float64 rule and passed a sign flip)."""

    @jax.custom_vjp
    def act(z):
        return jnp.tanh(z)

    def bwd(z, g):
        return (g * (1 - jnp.tanh(z) ** 2) * (factor if z.dtype == jnp.float32 else 1.0),)

    act.defvjp(lambda z: (act(z), z), bwd)
    w = 0.4 * jax.random.normal(jax.random.key(1), (8, 16))
    x = jax.random.normal(jax.random.key(5), (10, 8))
    report = jaxcheck.verify(lambda w, x: jnp.mean(act(x @ w) ** 2), w, x)
    assert report.status == "fail", str(report)
    [said] = [q for q in report.problems if "between the two precisions" in q]
    assert "while fn's value agrees in both to 1e-3 (a rule or grad_fn taking another" in said
    assert "computes something else" not in said


def test_a_rule_wrong_in_float64_alone_points_to_its_float64_path():
    """A rule right in float32 and 1 % off in float64, on a float32 model: the float64 row
    fails, and the note told the user to check the float32 path, the right one."""

    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    def bwd(x, g):
        return (g * (1 - jnp.tanh(x) ** 2) * (1.01 if x.dtype == jnp.float64 else 1.0),)

    act.defvjp(lambda x: (jnp.tanh(x), x), bwd)
    w = jnp.asarray(np.random.RandomState(1).randn(4, 3), jnp.float32)
    c = jnp.asarray(np.random.RandomState(2).randn(4, 3), jnp.float32)
    report = jaxcheck.verify(lambda w: jnp.sum(jnp.sin(act(w) * c)), w, rules=False)
    assert report.status == "fail", str(report)
    tested, rule = report.checks[:2]
    assert tested.passed and not rule.passed and "same rule in float64" in rule.name
    [said] = [q for q in report.problems if "far above rounding" in q]
    assert (
        "; the float32 derivative passes at a tolerance that allows for that gap, and the "
        "same rule in float64 fails. If fn or its rules take a different path in float64, "
        "check that path"
    ) in said


def test_a_cast_inside_jaxs_own_function_is_said_to_be_jaxs():
    """jax.nn.dot_product_attention computes its softmax in float32 whatever its inputs'
    dtype, which in a float32 model rounds nothing: the reference holds those values in
    float64, and the note places the cast inside JAX (it blamed the caller's line). A
    cast of the caller's own to bfloat16 rounds in the model: its note keeps the advice to
    cast to the dtype the cast meets."""
    q = jnp.linspace(-1.0, 1.0, 20).reshape(1, 5, 1, 4)

    def fn(q):
        return jnp.sum(jnp.cos(jax.nn.dot_product_attention(q, q, q, is_causal=True)))

    report = jaxcheck.verify(fn, q)
    assert report.status == "pass" and report.tolerance < 2e-6, str(report)
    [said] = [p for p in report.problems if p.startswith("fn casts values computed")]
    assert ", inside JAX's own dot_product_attention) but would round in float64" in said
    own = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p.astype(jnp.bfloat16))), jnp.ones(3) / 3)
    [said] = [p for p in own.problems if p.startswith("fn rounds values computed")]
    assert "inside JAX's own" not in said and "x.astype(y.dtype)" in said
    # the caller's own product into float32 is the caller's (jnp.dot is jitted: its frames
    # below the caller's are JAX's machinery, and were named as "JAX's own
    # reraise_with_filtered_traceback")
    w = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2).astype(jnp.bfloat16)

    def product(w, x):
        return jnp.sum(jnp.tanh(jnp.dot(x, w, preferred_element_type=jnp.float32)))

    own = jaxcheck.verify(product, w, jnp.ones((4, 3), jnp.bfloat16))
    [said] = [p for p in own.problems if p.startswith("fn casts values computed")]
    assert "inside JAX's own" not in said and "(first at tests/test_numerics.py:" in said, said


def test_a_cast_inside_a_flax_module_is_not_said_to_be_jaxs(x64):
    """nn.Dense(dtype=jnp.float32) casts float64 params as its user set it up; the report
    called that "JAX's own code ... inside JAX's own wrapped_module_method" (flax's)."""
    from flax import linen

    dense = linen.Dense(4, dtype=jnp.float32, param_dtype=jnp.float64)
    x = jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)
    params = dense.init(jax.random.key(0), x)
    report = jaxcheck.verify(lambda p, x: jnp.sum(jnp.tanh(dense.apply(p, x))), params, x)
    [said] = [p for p in report.problems if p.startswith("fn rounds values computed")]
    assert "JAX's own" not in said, said
    assert "a flax module's dtype= is such a cast: leave it unset" in said


def test_a_straight_through_estimator_on_one_leaf_is_placed_there():
    """Quantization-aware training: round with a straight-through estimator on ['w'] only.
    The all-leaf check fails (fn is flat along w, its derivative under test is not), w
    alone fails (flat about params in float64, it jumps at larger steps only) and b
    passes: the report said the error was "spread thinly over several leaves"."""
    keys = jax.random.split(jax.random.key(2), 3)
    x, y = jax.random.normal(keys[0], (6, 4)), jax.random.normal(keys[1], (6, 2))

    def loss(p, x, y):
        v = p["w"] * 8
        wq = (v + jax.lax.stop_gradient(jnp.round(v) - v)) / 8
        return jnp.mean((jnp.tanh(x @ wq + p["b"]) - y) ** 2)

    params = {"w": jax.random.normal(keys[2], (4, 2)) / 2, "b": jnp.linspace(-0.1, 0.1, 2)}
    report = jaxcheck.verify(loss, params, x, y)
    assert report.status == "fail"
    assert {leaf.path: leaf.status.value for leaf in report.leaves} == {
        "['b']": "pass",
        "['w']": "fail",
    }
    assert "wrong: ['w']" in report.problems
    assert not any(q.startswith("no single leaf fails on its own") for q in report.problems)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("bug", [0.0, 1e-4])
def test_rounding_of_large_data_added_to_params_is_not_a_float64_rule_bug(seed, bug):
    """sin(x + w) for float32 data x near 1e4 and w = 0.01: in float64, x + w + t v is
    rounded to the grid of 1e4 (1.8e-12), the same for every entry, so the central
    differences are off by a few 1e-6 of the derivative, alike along every direction and
    alike at h and h/2, where neither the fourth differences nor Richardson see it. Was:
    only the same rule in float64 failed (1.2e-6 against 1e-6), and the larger steps that
    tell roundoff from a bug were tried for the float32 derivative's row alone. A 1e-4 bug,
    below the float32 row's tolerance, still fails on the float64 row."""

    sin = scaled_sin(1 + bug)
    x = jnp.linspace(1e4, 1.01e4, 16, dtype=jnp.float32)
    w = jnp.full(16, 0.01, jnp.float32)
    report = jaxcheck.verify(
        lambda w, x: jnp.sum(sin(x + w)), w, x, key=jax.random.key(seed), rules=False
    )
    rule = report.checks[1]
    assert rule.name.startswith("reverse autodiff, same rule in float64"), str(report)
    if bug == 0:
        assert report.status == "pass", str(report)
        assert any("roundoff inside fn, not a wrong derivative" in q for q in report.problems)
        assert rule.relative_error < 1e-6
    else:
        assert report.status == "fail", str(report)
        assert not rule.passed and 5e-5 < rule.relative_error < 2e-4


def _oscillator_loss(theta, observed):
    """A damped oscillator integrated by lax.scan; theta = [stiffness, damping, mass]."""
    k, c, m = theta[0], theta[1], theta[2]

    def step(state, _):
        x, v = state
        v = v + 1e-4 * (-k * x - c * v) / m
        x = x + 1e-4 * v
        return (x, v), x

    start = (jnp.asarray(1e-2, theta.dtype), jnp.asarray(0.0, theta.dtype))
    _, xs = jax.lax.scan(step, start, None, length=200)
    return 1e4 * jnp.mean((xs - observed) ** 2)


def _arrhenius_loss(theta, temperature):
    """A modified Arrhenius rate A T^n exp(-Ea / RT); theta = [A, Ea, n]."""
    rate = theta[0] * temperature ** theta[2] * jnp.exp(-theta[1] / (8.314 * temperature))
    return jnp.mean((rate / 1e4 - 1) ** 2)


OSCILLATOR = (_oscillator_loss, [1e4, 0.05, 1.0], lambda: jnp.linspace(-1e-2, 1e-2, 200))
ARRHENIUS = (_arrhenius_loss, [1e13, 8e4, 0.5], lambda: jnp.linspace(300.0, 600.0, 10))


@pytest.mark.parametrize("case", [OSCILLATOR, ARRHENIUS], ids=["oscillator", "arrhenius"])
@pytest.mark.parametrize("entry", [None, 0, 1, 2])
def test_quantities_of_different_units_in_one_leaf(case, entry):
    """Physical parameters packed in one array, [1e4, 0.05, 1] or [1e13, 8e4, 0.5]. Moved
    all at the leaf's RMS, the small entries moved far beyond their size: the Arrhenius fit
    failed ("gradient is WRONG", every error NaN, as exp overflowed), and the oscillator
    passed a gradient 10 % off in the stiffness or the damping (diluted 1e4-fold by the
    mass's derivative). Entries of such a leaf now move in proportion to their magnitudes:
    the correct gradient passes, and 10 % off in any one entry fails."""
    loss, values, data = case
    theta = jnp.asarray(values, jnp.float32)
    grad = jax.grad(loss)
    grad_fn = grad if entry is None else (lambda t, d: grad(t, d).at[entry].multiply(1.1))
    report = jaxcheck.verify(loss, theta, data(), grad_fn=grad_fn)
    if entry is None:
        assert report.status == "pass", str(report)
    else:
        assert report.status == "fail", str(report)
        assert math.isfinite(report.relative_error), str(report)
        assert report.relative_error > 3 * report.tolerance, str(report)


@pytest.mark.parametrize("bug", [1.0, 1.01])
def test_a_zero_in_a_packed_leaf_does_not_drown_its_other_entries(bug):
    """[1e4, 0.05, 1, -3, 0]: the zero has no size of its own. Moved at the leaf's RMS (set
    by the 1e4), its derivative drowned the others', and a rule 1 % off on the 0.05 entry
    passed on every key; it now moves as the smallest entry does."""
    factor = jnp.asarray([1.0, bug, 1.0, 1.0, 1.0])

    @jax.custom_vjp
    def identity(t):
        return t

    identity.defvjp(lambda t: (t, None), lambda _, c: (c * factor,))
    weights = jnp.asarray([1e-4, 10.0, 1.0, 0.3, 1.0])
    theta = jnp.asarray([1e4, 0.05, 1.0, -3.0, 0.0])
    report = jaxcheck.verify(lambda t: jnp.sum(jnp.sin(identity(t) * weights)), theta)
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)


def _bias_loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) @ params["v"] - y) ** 2)


@pytest.mark.parametrize("bug", [None, "negated", "zeroed"])
def test_a_bias_entry_near_zero_beside_others_near_one_is_judged_at_the_leafs_scale(bug):
    """A bias [0.3, -0.2, 1e-6, 0.5, ...] spans 5e5 in magnitude, so its entries were moved
    by their own sizes (a leaf of packed quantities): the derivative of the entry at 1e-6,
    -0.022 and as large as its neighbours', weighed 1e-6 of theirs, and a grad_fn negating
    or zeroing it passed on 20 of 20 keys (relative error 3.5e-7 against 1.2e-6; JAX's
    check_grads fails it). Such entries are now checked again at the leaf's scale."""
    x = jax.random.normal(jax.random.key(0), (32, 4))
    params = {
        "w": jax.random.normal(jax.random.key(1), (4, 8)) * 0.5,
        "b": jnp.asarray([0.3, -0.2, 1e-6, 0.5, 0.1, -0.4, 0.25, 0.6]),
        "v": jax.random.normal(jax.random.key(2), (8,)) * 0.5,
    }
    grad = jax.grad(_bias_loss)
    change = {None: 1.0, "negated": -1.0, "zeroed": 0.0}[bug]

    def grad_fn(p, x, y):
        g = grad(p, x, y)
        return {**g, "b": g["b"].at[2].multiply(change)}

    report = jaxcheck.verify(_bias_loss, params, x, jnp.sin(x[:, 0]), grad_fn=grad_fn)
    if bug is None:
        assert report.status == "pass" and not report.problems[:-1], str(report)
        return
    assert report.status == "fail" and report.relative_error > 1e-3, str(report)
    assert report.problems[0] == (
        "a small leaf whose entries span orders of magnitude moves each entry by its own "
        "size, which can hide the derivatives of its small entries (['b'] entries 2, 4); checked "
        "again with every entry of such a leaf moved at the leaf's scale, it fails"
    ), str(report)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['b']"], str(report)


_LASSO_DATA = np.random.RandomState(0).normal(size=(20, 11)).astype(np.float32)


def _lasso(w):
    x, y = _LASSO_DATA[:, :10], _LASSO_DATA[:, 10]
    return jnp.mean((x @ w - y) ** 2) + 0.1 * jnp.sum(jnp.abs(w))


# a lasso's point: exact zeros (the kinks of |w|) beside an entry of 3e-6
_LASSO_AT = jnp.asarray([0.8, 0.0, -0.5, 3e-6, 0.0, 1.1, -0.02, 0.0, 0.3, -0.7])


@pytest.mark.parametrize("scale", [1.0, 2.0, 1.3])
def test_a_small_entry_beside_kinks_in_its_leaf_is_judged_with_the_kinks_held(scale):
    """The entries of this lasso's point span 4e5 in magnitude, so they were moved by their
    own sizes, and the derivative at 3e-6 weighed 3e-6 of the others'; checked again at the
    leaf's scale, every direction crossed the kinks of |w| at the zero entries, and that
    look was not judged: a grad_fn doubling the entry at 3e-6 passed on 10 of 10 keys
    (relative error 4.4e-7 against 1.2e-6), where JAX's check_grads fails it. The zero
    entries are now found by moving each alone and held fixed, and the others judged."""
    grad = jax.grad(_lasso)
    report = jaxcheck.verify(_lasso, _LASSO_AT, grad_fn=lambda w: grad(w).at[3].multiply(scale))
    said = (
        "a small leaf whose entries span orders of magnitude moves each entry by its own "
        "size, which can hide the derivatives of its small entries ((root) entries 1, 3, 4, "
        "7); checked again with every entry of such a leaf moved at the leaf's scale, and, "
        "as fn has a kink at 3 of those leaves' entries (found by moving each alone), every "
        "direction crossed it there: checked once more holding them fixed and moving the "
        "others at their leaf's scale (the leaf table counts the entries moved), "
    )
    if scale == 1.0:
        assert report.status == "pass", str(report)
        assert report.problems[-1].startswith(said + "it passes (relative error "), str(report)
        return
    assert report.status == "fail" and report.relative_error > 0.05, str(report)
    assert report.problems[0] == said + "it fails", str(report)
    assert [(leaf.path, leaf.shape) for leaf in report.leaves] == [("", (7,))]


@pytest.mark.parametrize("error", [0.0, -1.0])
def test_kinks_beside_a_large_entry_are_found_in_float64(error):
    """A float32 leaf [1e4, 0, 0, 0.3, 3e-6, 0.5] with |w| kinks at the zeros beside w**2:
    searched in float32 at a step of 5e-3 of the leaf's RMS (20), the curvature swamped
    the kinks, none was held, and a rule zeroing the derivative at 3e-6 passed."""

    @jax.custom_vjp
    def same(x):
        return x

    same.defvjp(lambda x: (x, None), lambda _, g: (g * (1 + error),))

    def fn(w):
        return (
            (w[0] / 1e4) ** 2 * 1e4
            + jnp.sum(w[1:4] ** 2)
            + 0.1 * jnp.sum(jnp.abs(w[1:3]))
            + 1.5 * same(w[4])
            + w[5] * w[0] / 1e4
        )

    report = jaxcheck.verify(fn, jnp.asarray([1e4, 0.0, 0.0, 0.3, 3e-6, 0.5]))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)


def test_check_grads_judges_a_wrong_rule_at_a_small_entry_beside_kinks():
    """The same through jaxcheck.check_grads: a custom_vjp doubling the cotangent of the
    entry at 3e-6 returned quietly (JAX's check_grads raises)."""

    @jax.custom_vjp
    def same(w):
        return w

    same.defvjp(lambda w: (w, None), lambda _, ct: (ct.at[3].multiply(2.0),))
    jaxcheck.check_grads(_lasso, (_LASSO_AT,), 1, modes=("rev",))
    with pytest.raises(jaxcheck.GradientCheckError, match="it fails"):
        jaxcheck.check_grads(lambda w: _lasso(same(w)), (_LASSO_AT,), 1, modes=("rev",))


def _relu_beside(slope_at_zero=0.0):
    """sum(relu(a) c) + sum(c a) + sum(sin(b)), with relu's derivative at 0 as given."""
    relu = relu_sloped_at_zero(slope_at_zero)
    return lambda p: (
        jnp.sum(relu(p["a"]) * p["c"]) + jnp.sum(p["c"] * p["a"]) + jnp.sum(jnp.sin(p["b"]))
    )


# relu's input at 0 in `a`, weighed by entries of `c` that sum to 0: along every direction
# of signs only the one-sided slopes agree, and the kinks do not show
_AT_CANCELLING_KINKS = {
    "a": jnp.zeros(4),
    "b": jnp.asarray([0.3, -0.7]),
    "c": jnp.linspace(-1.0, 1.0, 4),
}


@pytest.mark.parametrize("key", [0, 1, 2])
def test_kinks_directions_of_signs_cannot_show_are_not_called_wrong(key):
    """At most 16 elements get directions of signs only (±1 entries), and at relu's kinks
    whose weights cancel the one-sided slopes agree along each of them: their finite
    differences are fn's slopes, not a derivative, and JAX's (a subgradient) was called
    WRONG by 33 %, naming ['a'], on every key."""
    report = jaxcheck.verify(_relu_beside(), _AT_CANCELLING_KINKS, key=key)
    assert report.status == "inconclusive", str(report)
    assert report.problems[0].startswith(
        "fn has kinks (one-sided slopes that differ, found by moving each entry alone), and "
        "the directions, of signs only, crossed them without showing it"
    ), str(report)
    assert (
        "with the entries at them held fixed, the others pass (relative error"
        in (report.problems[0])
    )
    assert not any(leaf.status == "fail" for leaf in report.leaves), str(report)
    assert not any(q.startswith("wrong: ") for q in report.problems)


@pytest.mark.parametrize("key", [0, 1])
def test_kinks_of_small_weight_beside_a_large_term_are_found_in_float64(key):
    """relu(b) weighed by 1e-3 beside a**2, float32: the kink search, in float32 at a step
    of 5e-3, took the slopes' jump for rounding of fn, found no kink, and a correct
    gradient was called WRONG (JAX's check_grads passes it). It looks in float64 now."""
    c = jnp.asarray([1.0, -1.0, 2.0, -2.0])

    def f(p):
        return p["a"] ** 2 + 1e-3 * jnp.dot(jax.nn.relu(p["b"]), c)

    report = jaxcheck.verify(f, {"a": jnp.float32(1.0), "b": jnp.zeros(4)}, key=key)
    assert report.status == "inconclusive", str(report)
    assert report.problems[0].startswith("fn has kinks (one-sided slopes that differ"), str(report)


@pytest.mark.parametrize("bug", ["other entries", "at the kinks"])
def test_a_wrong_derivative_beside_kinks_directions_of_signs_cannot_show_still_fails(bug):
    """The same kinks: a grad_fn 10 % off on b (held apart from the kinks, it fails), and a
    rule whose derivative at relu's kink is 2 (outside the one-sided slopes 0 and 1), said in
    verify's words (it said "f" and "argument entries", as check_grads does)."""
    if bug == "other entries":
        grad = jax.grad(_relu_beside())

        def grad_fn(p):
            g = grad(p)
            return {**g, "b": g["b"] * 1.1}

        report = jaxcheck.verify(_relu_beside(), _AT_CANCELLING_KINKS, grad_fn=grad_fn)
        assert report.status == "fail", str(report)
        assert report.problems[0] == (
            "fn has kinks (one-sided slopes that differ, found by moving each entry alone), "
            "which directions of signs only may not show; with the entries at them held "
            "fixed, the others fail"
        )
        assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['b']"]
        return
    report = jaxcheck.verify(_relu_beside(2.0), _AT_CANCELLING_KINKS)
    assert report.status == "fail", str(report)
    assert report.problems[0].startswith(
        "fn's derivative at 4 of the 4 params entries where fn has a kink is not between its "
        "one-sided slopes there, nor within the derivatives at points nearby (no step of "
        "finite differences gives it; JAX's check_grads fails it too): at entry "
    ), str(report)
    # (relu's slope 2 at 0, weighed by c = -1, -1/3, 1/3, 1, plus c's own: 3c against c, 2c)
    assert re.search(r"of params leaf \['a'\], (-?[\d.]+) against slopes", report.problems[0])
    assert report.checks[-1].name == "derivative at kinks vs one-sided slopes"


def test_a_rule_returning_zero_near_zero_fails_at_an_entry_of_3e_7():
    """A custom_vjp |x| whose backward pass returns 0 for |x| < 1e-5 (to avoid a NaN),
    at [0.3, -0.2, 3e-7, 0.5]: the derivative under test at 3e-7 is small because the
    rule is wrong there (the true one is 1), and moves of the entry's own size hid it."""

    @jax.custom_vjp
    def safe_abs(x):
        return jnp.abs(x)

    def backward(x, g):
        return (g * jnp.where(jnp.abs(x) > 1e-5, jnp.sign(x), 0.0),)

    safe_abs.defvjp(lambda x: (jnp.abs(x), x), backward)
    weights = jnp.asarray([1.0, 2.0, 3.0, 1.5])
    report = jaxcheck.verify(
        lambda w: jnp.sum(weights * safe_abs(w)) + jnp.sum(w**2),
        jnp.asarray([0.3, -0.2, 3e-7, 0.5]),
    )
    assert report.status == "fail" and report.relative_error > 0.1, str(report)
    assert report.problems[0].endswith("it fails"), str(report)


def test_the_second_look_at_a_packed_leaf_checks_that_leaf_alone():
    """Beside many other leaves, the second look at a packed leaf's hidden entries checked
    the whole function again, compiling programs as large as the first look's (at 300
    leaves of 3 entries, 13.4 s for a first call of 6.8 s without such a leaf). It checks
    that leaf alone, the others held fixed, and its failure keeps what the first look held
    fixed."""

    @jax.custom_vjp
    def safe_abs(x):
        return jnp.abs(x)

    safe_abs.defvjp(
        lambda x: (jnp.abs(x), x),
        lambda x, g: (g * jnp.where(jnp.abs(x) > 1e-5, jnp.sign(x), 0.0),),
    )
    others = {f"w{k}": jnp.linspace(0.5, 1.0, 4) * (1 + k / 10) for k in range(6)}

    def loss(p):
        rest = sum(jnp.sum(jnp.sin(v)) for k, v in p.items() if k.startswith("w"))
        return rest * p["n"] + jnp.sum(safe_abs(p["b"]) * jnp.asarray([1.0, 2.0, 3.0, 1.5]))

    p = {**others, "b": jnp.asarray([0.3, -0.2, 3e-7, 0.5]), "n": jnp.int32(2)}
    report = jaxcheck.verify(loss, p, rules=False)
    assert report.status == "fail" and report.problems[0].endswith("it fails"), str(report)
    assert [leaf.path for leaf in report.leaves] == ["['b']"]
    assert report.held_fixed == (("['n']", "int32[]"),)


@pytest.mark.parametrize("modes", [("fwd",), ("fwd", "rev")])
def test_a_jvp_rule_wrong_near_zero_fails_in_forward_mode_too(modes):
    """A custom_jvp of x + x**3 whose tangent drops to 0 below 1e-5, checked by check_grads
    in forward mode alone (as JAX's suites check custom_jvp functions) at an entry of 1e-7
    beside entries near 0.3: without a gradient to tell each entry's share, every entry
    below 1e-3 of the leaf's largest is checked again at the leaf's scale. JAX's
    check_grads fails it too."""

    @jax.custom_jvp
    def cubic(x):
        return x + x**3

    cubic.defjvp(
        lambda p, t: (cubic(p[0]), t[0] * jnp.where(jnp.abs(p[0]) > 1e-5, 1 + 3 * p[0] ** 2, 0.0))
    )
    x = jnp.asarray([0.3, -0.2, 1e-7, 0.5])
    with pytest.raises(AssertionError) as info:
        jaxcheck.check_grads(lambda x: jnp.sin(cubic(x)), (x,), 1, modes=modes)
    assert "can hide the derivatives of its small entries ([0] entries 2); checked again" in (
        str(info.value)
    ), str(info.value)


def test_entries_near_zero_not_judged_at_the_leafs_scale_leave_a_pass_that_says_so():
    """|t| at t = 1e-7 beside entries of 1 and 0.5: moved at the leaf's scale the entry
    crosses the kink, so the check there is not judged; the own-size check's pass stands
    and says how finely it judged that entry."""
    report = jaxcheck.verify(
        lambda t: jnp.sum(t[:2] ** 2) + 1e-2 * jnp.abs(t[2]), jnp.asarray([1.0, 0.5, 1e-7])
    )
    assert report.status == "pass", str(report)
    assert report.problems[-1].startswith(
        "a small leaf whose entries span orders of magnitude moves each entry by its own "
        "size, which can hide the derivatives of its small entries ((root) entries 2); checked "
        "again with every entry of such a leaf moved at the leaf's scale, it was not judged "
        "(inconclusive: "
    ), str(report)
    assert report.problems[-1].endswith(
        "so those entries' derivatives are judged only as finely as their own sizes allow"
    ), str(report)


@pytest.mark.parametrize(("seed", "key"), [(25, 0), (25, 1), (22, 0), (31, 0)])
@pytest.mark.parametrize("bug", [1.0, 1.001])
def test_float32_data_near_1e4_added_to_small_params(seed, key, bug):
    """cos(x + w) with float32 data x of 1e2..1e5 and params w of 1e-4..1e-1: the sum
    rounds in float64 at the grid of x, alike at h and h/2, and the finite differences are
    off by a 1/h roundoff no error bar sees. The larger steps that tell it from a bug
    measured its shrink along 4 directions and on the first failing comparison alone, and
    these correct functions failed; a 0.1 % bug still fails."""
    rng = np.random.default_rng(seed)
    a, b, n = rng.uniform(2, 5), rng.uniform(-4, -1), int(rng.integers(8, 100))
    x = jnp.asarray(10**a + rng.normal(size=(n,)) * 10 ** (a - 2), jnp.float32)
    w = jnp.asarray(rng.normal(size=(n,)) * 10**b, jnp.float32)

    def fn(p, x):
        return jnp.mean((jnp.cos(x + p["w"]) - 0.3 * jnp.linspace(0.5, 1.5, n)) ** 2)

    grad = jax.grad(fn)
    report = jaxcheck.verify(
        fn, {"w": w}, x, key=key, grad_fn=lambda p, x: {"w": grad(p, x)["w"] * bug}
    )
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)


def test_a_float16_gradient_above_half_its_largest_number_is_not_nonfinite():
    """The gradient is pulled back from a cotangent of 2: a float16 gradient of 4e4
    (finite: float16 reaches 65504) overflowed to Inf, and the report blamed fn's
    gradient as NaN/Inf where jax.grad and JAX's check_grads are finite."""
    p = jnp.array([0.001, 0.002], jnp.float16)
    report = jaxcheck.verify(lambda p: jnp.sum(p * jnp.float16(40000.0)), p)
    assert report.status == "pass", str(report)
    off = jax.custom_vjp(lambda p: p * jnp.float16(40000.0))
    off.defvjp(lambda p: (p * jnp.float16(40000.0), None), lambda _, g: (g * 40000.0 * 1.05,))
    assert jaxcheck.verify(lambda p: jnp.sum(off(p)), p).status == "fail"


@pytest.mark.parametrize("history", ["fresh", "after a reverse-mode check"])
def test_a_float16_jvp_along_a_leaf_sized_tangent_does_not_overflow(history):
    """sum(exp(a)) at float16 [10, 0.5]: value, gradient and jvp along ones are finite
    (2.2e4). Along a tangent of the leaf's RMS (7) the float16 jvp overflowed: where the
    projections were not folded into the probe (a reverse-mode check of the same fn had
    compiled the probe), mode="both" said nonfinite. Tangents now go at about unit size."""

    def fn(a):
        return jnp.sum(jnp.exp(a))

    a = jnp.array([10.0, 0.5], jnp.float16)
    if history != "fresh":
        assert jaxcheck.verify(fn, a, mode="reverse").status == "pass"
    report = jaxcheck.verify(fn, a, mode="both")
    assert report.status == "pass", str(report)


@pytest.mark.parametrize(
    "dtype, big, small", [("float32", 1e20, 1e-20), ("float16", 1e4, 1e-3)], ids=str
)
def test_forward_tangents_of_leaves_far_apart_in_scale_keep_the_small_one(dtype, big, small):
    """Tangents were divided by one power of two at the largest step: leaves at 1e20 and
    1e-20 sent the small one's tangent to 0 (float32), at 1e4 and 1e-3 to float16's
    subnormals, and a right jvp failed ("wrong", 0.79 off) or was inconclusive. Unfolded
    (chunk_size=2) as a larger problem is."""

    def fn(p):
        big_part = jnp.sum(jnp.sin(p["big"] / jnp.asarray(big, p["big"].dtype)))
        return big_part + jnp.sum(jnp.sin(p["small"] / jnp.asarray(small, p["small"].dtype)))

    p = {
        "big": (jnp.linspace(0.2, 1.0, 4) * big).astype(dtype),
        "small": (jnp.linspace(0.3, 1.1, 4) * small).astype(dtype),
    }
    report = jaxcheck.verify(fn, p, mode="forward", chunk_size=2)
    assert report.status == "pass", str(report)


def _float32_only_rule(scale):
    """x tanh(x), whose custom_vjp fwd and bwd take float32 only (a kernel's), while the
    primal fn evaluates is plain jnp and runs in float64; the bwd `scale` times right."""

    def float32_only(x):
        if x.dtype != jnp.float32:
            raise TypeError(f"this kernel takes float32 only, got {x.dtype}")

    @jax.custom_vjp
    def f(x):
        return jnp.tanh(x) * x

    def fwd(x):
        float32_only(x)
        return f(x), x

    def bwd(x, g):
        float32_only(x)
        t = jnp.tanh(x)
        return (scale * g * (t + x * (1 - t * t)),)

    f.defvjp(fwd, bwd)
    return f


@pytest.mark.parametrize("precision", ["auto", "float64"])
@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_a_rule_refusing_float64_keeps_float64_finite_differences_of_fn(scale, precision):
    """Where only the derivative under test refuses float64, fn's finite differences still
    run in it (they were dropped to float32, with a note that fn could not run in float64,
    and precision="float64" was refused); the report says what was not measured."""
    f = _float32_only_rule(scale)
    x = jnp.linspace(-1.0, 1.5, 8, dtype=jnp.float32)
    params = {"w": jnp.full(8, 0.7, jnp.float32), "b": jnp.linspace(-0.3, 0.3, 8)}
    report = jaxcheck.verify(
        lambda p, x: jnp.sum(jnp.sin(f(p["w"] * x + p["b"]))), params, x, precision=precision
    )
    assert report.reference_dtype == "float64"
    assert report.noise_floor < 1e-8
    assert report.status == ("pass" if scale == 1.0 else "fail"), str(report)
    assert report.tolerance == pytest.approx(math.sqrt(np.finfo(np.float32).eps), rel=0.01)
    assert (
        "the derivative under test could not run in float64 (TypeError: this kernel takes "
        "float32 only, got float64), though fn itself does: finite differences use float64, "
        "but the float32 derivative's own rounding is not measured against its rule in "
        "float64, so it is held to a coarser tolerance (the square root of float32's "
        "epsilon)."
    ) in " ".join(report.problems)
    assert not any("fn could not run" in q for q in report.problems), report.problems


def _bit_trick_rule(scale):
    """tanh of x passed through its float32 bits, with a custom_vjp `scale` times right:
    in float64 the bitcast makes two int32 words of each float64, and fn another function
    (of other output shape inside), where the bwd refuses to run."""

    def bits(x):
        return jnp.tanh(
            jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.int32), jnp.float32)
        )

    @jax.custom_vjp
    def f(x):
        return bits(x)

    f.defvjp(lambda x: (bits(x), bits(x)), lambda y, g: (scale * g * (1 - y * y),))
    return f


@pytest.mark.parametrize("scale", [1.0, 1.05])
def test_fn_of_another_value_in_float64_where_its_rule_refuses_it_is_judged_natively(scale):
    """A float32 bit trick's right rule refused float64, and fn's float64 finite
    differences, of another function there, failed it at relative error 1.0; fn's value
    in float64 against its float32 one tells, and its own precision judges it."""
    f = _bit_trick_rule(scale)
    x = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
    params = {"w": jnp.linspace(-0.3, 0.4, 36).reshape(6, 6), "b": jnp.full((6,), 0.1)}
    report = jaxcheck.verify(lambda p, x: jnp.mean(f(x @ p["w"] + p["b"]) ** 2), params, x)
    assert report.status == ("pass" if scale == 1.0 else "fail"), str(report)
    assert report.reference_dtype == "float32"
    [note] = [q for q in report.problems if q.startswith("the derivative under test could")]
    assert note.startswith("the derivative under test could not run in float64 (ValueError: ")
    assert ", and fn's own value there differs from its float32 value by " in note, note
    assert note.endswith(
        "(relative): fn computes another function in float64 (a bit trick on float32 "
        "words, numbers drawn in the default dtype), so finite differences use float32 and "
        "the resolution is coarser (a custom rule inside is resolved more finely on its "
        "own: rules=True)"
    ), note
    if scale != 1.0:
        assert report.relative_error == pytest.approx(0.05, rel=0.2), str(report)


@pytest.mark.parametrize("error", [0.0, 1e-2])
def test_a_loss_rounding_in_float32_where_its_rule_refuses_float64_keeps_float64(error):
    """A loss against a baseline (its float32 value rounds by 1e-2) whose rule refuses
    float64 is no other function there: judged by float32 differences, coarse here, a bwd
    1 % off passed; the float64 ones, which resolve it, stand."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    def bwd(x, g):  # (float32 only: its bits make two words of a float64)
        g = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(g, jnp.int32), jnp.float32)
        return (jnp.cos(x) * g * (1 + error),)

    f.defvjp(lambda x: (jnp.sin(x), x), bwd)
    p = jnp.linspace(-3.0, 3.0, 4096, dtype=jnp.float32)
    data = jnp.linspace(30.0, 60.0, 4096, dtype=jnp.float32)
    baseline = np.float32(jnp.sum(data + f(p)))
    report = jaxcheck.verify(lambda p: jnp.sum(data + f(p)) - baseline + 1.0, p, rules=False)
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert report.reference_dtype == "float64"
    assert not any("another function" in q for q in report.problems), report.problems


@pytest.mark.parametrize("error", [math.nan, 0.05])
def test_a_leaf_checked_alone_without_an_estimate_is_said_so_in_notes(error):
    """A float32-only model's bias whose directions alone were all non-smooth was named
    "(relative error nan, 95% up to nan; ...)" in a passing report's notes."""
    from jaxcheck import _localize
    from jaxcheck._report import LeafResult, Status

    interval = (math.nan, math.nan) if math.isnan(error) else (0.03, 0.08)
    leaf = LeafResult("['b']", (4,), "float32", error, interval, 0.01, 8, Status.INCONCLUSIVE)
    said = _localize._measured_alone(leaf)
    if math.isnan(error):
        assert said == "no estimate: none of its directions was smooth with finite values"
    else:
        assert said == "relative error 5.0e-02, 95% up to 8.0e-02"


def _relu_mlp_casting_to_float32(seed):
    """A ReLU MLP that rounds its params to float32 (as a mixed-precision policy's cast to
    its compute dtype does in the float64 reference, where a cast itself is held in float64:
    see test_a_model_casting_its_params_to_float32_is_judged_at_float64_resolution) and
    fits random targets: 8 -> 32 -> 32 -> 1 on 64 samples."""
    rng = np.random.default_rng(seed)
    sizes = (8, 32, 32, 1)
    params = {}
    for i in range(3):
        params[f"w{i}"] = jnp.asarray(rng.normal(size=sizes[i : i + 2]) / sizes[i] ** 0.5, "f4")
        params[f"b{i}"] = jnp.asarray(0.1 * rng.normal(size=sizes[i + 1]), "f4")
    x = jnp.asarray(rng.normal(size=(64, 8)), "f4")
    y = jnp.asarray(rng.normal(size=(64, 1)), "f4")

    def loss(p, x, y):
        p = jax.tree.map(lambda v: jax.lax.reduce_precision(v, 8, 23), p)
        h = x
        for i in range(3):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            h = jax.nn.relu(h) if i < 2 else h
        return jnp.mean((h - y) ** 2)

    return loss, params, x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("factor", [1.0, 1.1, 0.0])
def test_relu_kinks_within_a_float32_sized_step_do_not_fail_a_correct_model(seed, factor):
    """Behind a cast to float32 the step is raised to float32's quanta (relative 2e-2),
    and along a bias all directions cross a ReLU's kink at the same distance: at a third
    of the step, the five stencil values fit a cubic, and the Richardson value is off by
    twice the truncation bar. The first bias of a correct model failed alone at 2.0e-2
    against its tolerance of 1.7e-2 (seed 1). A bias gradient 10 % off, or zeroed, fails."""
    loss, p, x, y = _relu_mlp_casting_to_float32(seed)

    def grad_fn(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return {**g, "b0": factor * g["b0"]}

    report = jaxcheck.verify(loss, p, x, y, grad_fn=grad_fn)
    if factor != 1.0:
        assert report.status == "fail", str(report)
        assert "! wrong: ['b0']" in str(report)
        return
    assert report.status == "pass", str(report)
    assert all(leaf.status != "fail" for leaf in report.leaves), str(report)


@pytest.mark.parametrize("factor", [1.0, 0.0, 1.1])
def test_a_small_bias_behind_a_float32_cast_is_judged_alone_at_a_larger_scale(factor):
    """A bias of 1e-3 beside weights of 0.1, all cast to float32 inside fn: checked alone
    at its own size, fn changed by less than the float32 resolution the check judges at,
    the bias was not judged (tolerance 0.57), and its gradient zeroed passed. Moved by a
    tenth of the parameters' pooled RMS, it is judged: correct passes, zeroed or 10 % off
    fails, naming it."""
    rng = np.random.default_rng(0)
    p = {
        "w": jnp.asarray(rng.normal(size=(64, 64)) / 8, "f4"),
        "s": jnp.asarray([0.5], "f4"),
        "b": jnp.asarray(1e-3 * rng.normal(size=64), "f4"),
    }
    x, y = (jnp.asarray(rng.normal(size=(16, 64)), "f4") for _ in range(2))

    def loss(p, x, y):
        p = jax.tree.map(lambda v: v.astype(jnp.float32), p)
        return jnp.mean((jnp.tanh(x @ p["w"] * p["s"] + p["b"]) - y) ** 2)

    def grad_fn(p, x, y):
        g = jax.grad(loss)(p, x, y)
        return {**g, "b": factor * g["b"]}

    report = jaxcheck.verify(loss, p, x, y, grad_fn=grad_fn)
    [b] = [leaf for leaf in report.leaves if leaf.path == "['b']"]
    assert b.tolerance < 0.1, str(report)
    if factor == 1.0:
        assert (report.status, b.status) == ("pass", "pass"), str(report)
        assert b.relative_error < 1e-4
        return
    assert (report.status, b.status) == ("fail", "fail"), str(report)
    assert "! wrong: ['b']" in str(report)
    assert b.relative_error == pytest.approx(abs(1 - factor), rel=0.01)


def test_a_leaf_not_judged_alone_under_a_pass_is_named_with_what_the_pass_vouches():
    """A correct ReLU MLP behind a float32 cast passes, while its first weight, checked
    alone, crosses kinks and is not judged: its table row said INCONCLUSIVE and no note
    said why, or how far the all-leaf pass covers it."""
    loss, p, x, y = _relu_mlp_casting_to_float32(1)
    report = jaxcheck.verify(loss, p, x, y)
    assert report.status == "pass", str(report)
    unjudged = [leaf.path for leaf in report.leaves if leaf.status == "inconclusive"]
    assert unjudged == ["['w0']"], str(report)
    [note] = [q for q in report.problems if q.startswith("checked alone, not judged: ")]
    assert re.fullmatch(
        r"checked alone, not judged: \['w0'\] \(relative error \d\.\de-02, 95% up to "
        r"\d\.\de-0[12]; the pass sees an error in it from \d\.\de-0[12]\); the all-leaf "
        r"pass \(tolerance \d\.\de-02\) covers it as far as it weighs it",
        note,
    ), note


def test_a_float32_gradient_far_from_float64_without_random_numbers_says_why():
    """A Gaussian process likelihood in float32 at a kernel's condition number near 1e7:
    the float32 gradient is 21 % from the float64 one (a leaf's has the wrong sign), and
    the note put that down to random numbers fn does not draw."""
    x = jnp.linspace(0.0, 5.0, 40)[:, None]
    y = jnp.sin(x[:, 0]) + 0.1 * jnp.cos(7.0 * x[:, 0])

    def nll(p, x, y):
        d2 = jnp.sum((x[:, None, :] - x[None, :, :]) ** 2, -1)
        k = jnp.exp(2 * p["log_sf"]) * jnp.exp(-0.5 * d2 / jnp.exp(2 * p["log_ls"]))
        k = k + (jnp.exp(2 * p["log_sn"]) + 1e-6) * jnp.eye(40)
        chol = jnp.linalg.cholesky(k)
        a = jax.scipy.linalg.cho_solve((chol, True), y)
        return 0.5 * y @ a + jnp.sum(jnp.log(jnp.diag(chol)))

    p = {"log_ls": jnp.asarray(0.5), "log_sf": jnp.asarray(0.0), "log_sn": jnp.asarray(-7.0)}
    report = jaxcheck.verify(nll, p, x, y)
    [said] = [q for q in report.problems if q.startswith("the derivative of fn in float64")]
    assert (
        "fn draws no random numbers, so its float32 evaluation is far from its float64 one "
        "here: an ill-conditioned step (a Cholesky, solve or log-determinant"
    ) in said, said
    assert said.endswith(
        "The float32 derivative itself is that far from the true one: where that matters, "
        "compute in float64 (jax.config.update('jax_enable_x64', True)) or condition the "
        "problem (a larger jitter or noise on a kernel's diagonal, say)"
    )
    assert "random numbers drawn" not in said
