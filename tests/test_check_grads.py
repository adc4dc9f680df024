"""`jaxcheck.check_grads`: JAX's check_grads call, jaxcheck's check."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax import lax

import jaxcheck
from cases import enable_x64, relu_sloped_at_zero, scaled_sin, sin_with_second_derivative
from jaxcheck import _check_grads, _report

X = np.linspace(0.1, 1.0, 4, dtype=np.float32)


@jax.custom_vjp
def _sin_by_vjp(x):
    return jnp.sin(x)


_sin_by_vjp.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


@pytest.mark.parametrize("modes", [["fwd"], ("rev",), ("fwd", "rev"), "rev"])
def test_correct_gradient_passes_in_every_mode(modes):
    f = lambda x, y: {"a": jnp.sin(x) * y, "b": (x**2, jnp.tanh(y))}  # noqa: E731
    assert jaxcheck.check_grads(f, (X, np.float32(2.0)), 1, modes) is None


@pytest.mark.parametrize(
    ("modes", "derivatives"),
    [(["fwd", "rev"], "jvp and vjp"), (["rev"], "vjp"), (["fwd"], "jvp")],
)
def test_loose_jax_tolerances_still_catch_a_50_percent_bug(modes, derivatives):
    """(said in the terms of the modes checked: a reverse-mode check said "JAX's jvp and
    vjp of f")"""
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(scaled_sin(1.5), (X,), 1, modes, atol=0.2, rtol=0.2)
    report = info.value.report
    assert isinstance(info.value, AssertionError)
    assert report.status == "fail"
    assert report.tolerance == pytest.approx(0.2)
    assert 0.45 < report.relative_error < 0.55
    text = str(info.value)
    assert text.startswith("jaxcheck.check_grads: FAIL — gradient is WRONG")
    assert "wrong: [0]" in text
    # said in check_grads' terms: it takes no grad_fn and no key
    assert f"The derivative under test (JAX's {derivatives} of f) disagrees" in text
    assert "grad_fn" not in text and "key" not in text


@pytest.mark.parametrize("order, eps", [(0, None), (-1, None), (1, -1e-3), (1, 0)])
def test_order_below_1_and_any_finite_eps_are_taken_as_jax_takes_them(order, eps):
    """JAX's check_grads checks first derivatives at any order <= 1 and takes any finite
    step (a negative one mirrors its differences): a test passing there passes here, and a
    planted bug fails in both."""
    assert jaxcheck.check_grads(jnp.sin, (X,), order, eps=eps) is None
    with pytest.raises(jaxcheck.GradientCheckError, match="relative error 5.0e-01"):
        jaxcheck.check_grads(scaled_sin(1.5), (X,), order, eps=eps)
    with pytest.raises(AssertionError):
        jax.test_util.check_grads(scaled_sin(1.5), (X,), order, eps=eps)


@pytest.mark.parametrize("bug", [1.0, 2.0])
def test_loose_tolerances_see_a_bug_in_one_argument_of_many(bug):
    # at atol=rtol=0.2, a 100 % error in one of 8 arguments is 0.11 of the whole
    args = tuple(np.linspace(0.1, 1.0, 5, dtype=np.float32) + i for i in range(8))
    wrong = scaled_sin(bug)

    def f(*a):
        return (*(jnp.sin(x) for x in a[:-1]), wrong(a[-1]))

    if bug == 1.0:
        assert jaxcheck.check_grads(f, args, 1, atol=0.2, rtol=0.2) is None
        return
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(f, args, 1, atol=0.2, rtol=0.2)
    report = info.value.report
    assert "wrong: [7]" in report.problems
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["[7]"]


@pytest.mark.parametrize("bug", [1.0, 2.0])
def test_a_kink_in_one_argument_leaves_the_others_judged(bug):
    f = lambda a, b: jnp.abs(a) + jnp.sum(scaled_sin(bug)(b))  # noqa: E731
    args = (np.float32(0.0), np.linspace(0.1, 1.0, 4, dtype=np.float32))
    outcome = _check_grads.run(f, args, 1, ("rev",), None, None, None)
    leaves = {leaf.path: leaf.status.value for leaf in outcome.report.leaves}
    if bug == 1.0:
        # the kink's entry held fixed (`test_one_entry_at_a_kink_or_domain_edge_...`), the
        # rest is judged: a pass
        assert outcome.verdict == "pass", str(outcome.report)
        assert outcome.report.problems[0].startswith("f has a kink (one-sided slopes")
    else:
        assert outcome.verdict == "fail"
        assert leaves == {"[0]": "inconclusive", "[1]": "fail"}
        assert "wrong: [1]" in outcome.report.problems


@pytest.mark.parametrize("modes", [("fwd", "rev"), ("rev",)])
@pytest.mark.parametrize("scale", [1.0, 1.05])
def test_a_kink_in_the_first_derivative_leaves_the_other_entries_judged_at_order_2(scale, modes):
    """relu(x) * x is smooth but its derivative has a kink at 0: at order 2 that entry
    made the whole check inconclusive, and a second derivative 5 % off at the other
    entries passed unseen (JAX's check fails it)."""
    sin = sin_with_second_derivative(scale)
    f = lambda x: jax.nn.relu(x) * x + sin(x)  # noqa: E731
    outcome = _check_grads.run(f, (jnp.array([0.0, 0.5, -0.7, 1.1]),), 2, modes)
    assert outcome.verdict == ("pass" if scale == 1.0 else "fail"), str(outcome.report)
    assert outcome.report.problems[0] == (
        "f's first derivative has a kink (one-sided slopes that differ) at 1 argument entry, "
        "found by moving each entry alone; the derivative was judged at the other entries, "
        "holding those fixed"
    )


@pytest.mark.parametrize(
    "options",
    [
        {"order": np.int64(2)},
        {"eps": 0},
        {"eps": jnp.float32(1e-3)},
        {"atol": np.array(0.2), "rtol": jnp.float32(0.2)},
    ],
    ids=["numpy order", "eps 0", "jax eps", "array tolerances"],
)
def test_numpy_and_jax_scalars_are_taken_as_jax_takes_them(options):
    order = options.pop("order", 1)
    assert jaxcheck.check_grads(jnp.sin, (X,), order, **options) is None
    with pytest.raises(jaxcheck.GradientCheckError):
        jaxcheck.check_grads(scaled_sin(1.5), (X,), order, **options)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_tolerances_catch_a_0_1_percent_bug(dtype):
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(scaled_sin(1.001), (X.astype(dtype),), 1, ("rev",))
    report = info.value.report
    assert 8e-4 < report.relative_error < 1.2e-3
    assert report.tolerance == pytest.approx(_check_grads.DEFAULT_FLOOR)


def test_default_tolerances_pass_a_derivative_approximate_by_design():
    # a float64 derivative 2e-7 off, as an ODE solver's adjoint is at its tolerance:
    # JAX's default tolerances pass it, and so does the drop-in; verify and a tolerance
    # set tighter than the default still see it
    f, x = scaled_sin(1 + 2e-7), (X.astype(np.float64),)
    assert jaxcheck.check_grads(f, x, 1, ("rev",)) is None
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(f, x, 1, ("rev",), atol=1e-9, rtol=1e-9)
    assert 1.5e-7 < info.value.report.relative_error < 2.5e-7
    assert jaxcheck.verify(lambda a: jnp.sum(f(a)), x[0]).status == "fail"


def test_second_order_bug_is_caught_at_order_2_only():
    @jax.custom_jvp
    def wrong_cos(x):
        return jnp.cos(x)

    @wrong_cos.defjvp
    def _wrong_cos_jvp(primals, tangents):  # the sign of -sin is lost
        (x,), (t,) = primals, tangents
        return wrong_cos(x), jnp.sin(x) * t

    @jax.custom_jvp
    def sin(x):
        return jnp.sin(x)

    @sin.defjvp
    def _sin_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return sin(x), wrong_cos(x) * t

    x = np.linspace(0.1, 1.0, 4)
    jaxcheck.check_grads(sin, (x,), 1, ("fwd",))
    with pytest.raises(jaxcheck.GradientCheckError):
        jaxcheck.check_grads(sin, (x,), 2, ("fwd",))


def test_integer_arguments_are_held_fixed():
    outcome = _check_grads.run(lambda x, n: jnp.sin(x) * n, (X, 3), 1, ("rev",))
    assert outcome.verdict == "pass"
    assert outcome.report.held_fixed == (("[1]", "3"),)


def test_a_map_constant_up_to_rounding_passes_at_order_2():
    """z * z / z is z up to rounding (JAX's lu of a 1x1 matrix), so its second derivative
    is zero; what is left of the order-2 maps <u, J v> is rounding of a map that is zero,
    not the scatter of a random fn."""
    outcome = _check_grads.run(lambda z: z * z / z, (np.array([-4.057125, 2.5], np.float32),), 2)
    assert outcome.verdict == "pass", str(outcome.report)
    assert not any("scatter by" in q for q in outcome.report.problems)
    assert any("the derivative is zero to within" in q for q in outcome.report.problems)


def test_kink_is_not_judged_and_raises_only_when_asked():
    assert jaxcheck.check_grads(jnp.abs, (np.zeros(3),), 1, ("rev",)) is None
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(jnp.abs, (np.zeros(3),), 1, ("rev",), raise_unjudged=True)
    assert info.value.report.status == "inconclusive"
    outcome = _check_grads.Outcome(info.value.report, "unjudged")
    assert outcome.headline.startswith("inconclusive; only 0 of 16 directions are smooth")
    assert outcome.headline.endswith("; not judged")


@pytest.mark.parametrize("where", ["kink", "NaN entry"])
def test_checking_again_at_a_kink_or_nan_entry_compiles_nothing(where):
    """A check at a kink (or where f is NaN at some entries) judges the other entries,
    holding those fixed: a second check of the same f there compiled the search and that
    check anew (5 programs, 1.4 s, where the check elsewhere took 0.03 s). Now they are
    kept under what f computes and the point; another point is checked anew."""
    from jaxcheck import _plan

    if where == "kink":
        f = lambda b: jnp.sum(jax.nn.relu(b) * jnp.arange(1.0, 5.0))  # noqa: E731
        point, other = jnp.array([0.0, 0.5, -0.3, 0.2]), jnp.array([0.5, 0.0, -0.3, 0.2])
    else:
        f = lambda b: jnp.log(b) * 2.0  # noqa: E731
        point, other = jnp.array([-1.0, 0.5, 0.3, 0.2]), jnp.array([0.5, -1.0, 0.3, 0.2])
    first = _check_grads.run(f, (point,), 1)
    assert first.verdict == "pass", first.headline
    before = _plan.compilations
    again = _check_grads.run(f, (point,), 1)
    assert _plan.compilations == before
    assert again.headline == first.headline
    assert _check_grads.run(f, (other,), 1).verdict == "pass"
    assert _plan.compilations > before


def test_the_headline_of_a_kink_says_kink_beside_float32_data_f_closes_over():
    """A ReLU at 0 in every entry, whose output is multiplied by a float32 array f closes
    over: the headline (the plugin's line for a check not judged) quoted the note on that
    array cast to float64 for the reference ("cast exactly: their values are the same"),
    not the kinks that left the check inconclusive. (The array is bound by
    functools.partial: an array a lambda closes over is taken as an argument of the
    check's programs, cast to float64 with the rest, where no cast is noted.)"""
    w = np.ones(3, np.float32)
    f = functools.partial(lambda w, v: jnp.maximum(v, 0.0).astype(w.dtype) * w, w)
    outcome = _check_grads.run(f, (np.zeros(3, np.float32),), 1)
    assert outcome.verdict == "unjudged"
    assert any("cast exactly" in q for q in outcome.report.problems)  # (noted, not headlined)
    assert outcome.headline.startswith("inconclusive; only 0 of 16 directions are smooth")
    # (nor the other notes on data cast for the reference)
    reason = "only 0 of 16 directions are smooth at this point"
    for aside in (
        "fn rounds to float32 in float64 only through float32 arrays it closes over",
        "fn mixed int32 arrays among its inputs with 64-bit integers of its own",
        "fn mixed float32 arrays it closes over (or reads from its module's globals",
    ):
        assert _check_grads._telling((f"{aside} ...", reason), (), False) == reason


def test_the_headline_of_a_solver_stopped_at_a_tolerance_says_so():
    """odeint's adjoint at rtol=1e-4 is 2.3e-5 off in float32 (a float64 solve at 1e-12
    says -1.42499, it gives -1.42503), over the 1e-5 an unset tolerance stands for: the
    failure stands, but its headline (the plugin's summary line) quoted the first note, on
    float32 constants mixed with float64 inputs, not the note on the solver."""
    from jax.experimental.ode import odeint  # noqa: PLC0415 - one test's

    ts = np.array([0.0, 0.5, 1.0], np.float32)

    def f(y0, k):
        return odeint(lambda y, t, k: -k * y + jnp.sin(t), y0, ts, k, rtol=1e-4, atol=1e-4)

    outcome = _check_grads.run(f, (np.array([1.0, 0.5], np.float32), np.float32(0.8)), 1, ("rev",))
    assert outcome.verdict == "fail", str(outcome.report)
    upper = outcome.report.checks[0].interval[1]
    assert re.match(
        r"fail; relative error [23]\.\de-05 \(tolerance 1\.0e-05\); f runs a lax\.while_loop \(an "
        r"iterative solver\?\)",
        outcome.headline,
    ), outcome.headline
    assert f"pass an rtol above it (above {upper:.1e}, the upper end" in outcome.headline


def test_the_headline_is_that_of_the_part_that_was_not_judged():
    """x |x| at 0 has a first derivative and no second: the order-2 part is not judged
    (with more entries than are moved one by one to find the kinks' entries, none is held
    fixed). The headline showed the order-1 part's note (float64 NumPy arguments), not
    why."""
    x = np.concatenate([[0.0, 0.0], np.linspace(0.5, 1.0, _check_grads.MAX_KINK_ENTRIES)])
    outcome = _check_grads.run(lambda x: x * jnp.abs(x), (x,), 2)
    assert outcome.verdict == "unjudged"
    assert outcome.report.problems[0].startswith("order 1: fn: params hold float64 NumPy")
    assert outcome.headline == (
        "inconclusive; order 2: jvp and vjp maps; only 0 of 16 directions are smooth at this "
        "point; non-smooth directions (kinks or jumps within the step) are excluded from the "
        "verdict; not judged"
    )


def test_nan_function_is_not_judged_but_nan_gradient_of_finite_function_fails():
    outcome = _check_grads.run(jnp.log, (np.array([-1.0, -2.0]),), 1, ("rev",))
    assert (outcome.verdict, outcome.report.status) == ("unjudged", "nonfinite")
    assert "f's output (root) is NaN/Inf at params" in outcome.headline
    # sqrt(x**2) is |x|, finite all around 0, where autodiff's 0/0 makes a NaN gradient
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(lambda x: jnp.sqrt(x**2), (np.array([0.0, 2.0]),), 1, ("rev",))
    assert "the gradient (autodiff) of leaf [0] is NaN/Inf" in str(info.value)


def test_f_of_numpy_arguments_infinite_at_the_point_raises_no_numpy_warning():
    """JAX's check evaluates f on NumPy arguments beside the point only; the verdict on a
    NaN/Inf f reads f at the point itself, where NumPy arithmetic in f on NumPy arguments
    (1 / (x - 1) at 1) warns, which this suite, like JAX's, turns into an error. The
    entries where f is finite are still judged."""

    def f(x):
        return jnp.where(x >= 1.0, 1.0 / (x - 1.0), x)

    outcome = _check_grads.run(f, (np.array([1.0, 0.5, 0.25]),), 1, ("fwd", "rev"))
    assert (outcome.verdict, outcome.report.status) == ("pass", "pass"), outcome.headline


def _naive_sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))  # 0 at -inf, its derivative inf / inf = NaN there


@pytest.mark.parametrize("modes", [("fwd", "rev"), ("rev",), ("fwd",)])
@pytest.mark.parametrize("x", [-np.inf, np.array([-np.inf, -np.inf], np.float32)])
def test_a_nan_derivative_at_infinite_arguments_where_f_is_finite_fails(x, modes):
    """softplus(-inf) is 0, and JAX's suites test its derivative there: a NaN one fails
    under JAX's check and failed nothing here (every argument entry infinite, nothing
    finite left to judge); a finite one, as JAX's softplus has, is not judged."""
    outcome = _check_grads.run(_naive_sigmoid, (x,), 1, modes)
    assert outcome.verdict == "fail"
    assert outcome.report.problems[0] == (
        "f's arguments are NaN/Inf at the point and f is finite there, but its derivative "
        "is NaN/Inf (which fails, as it does where f is finite everywhere)"
    )
    assert _check_grads.run(jax.nn.softplus, (x,), 1, modes).verdict == "unjudged"


@jax.custom_jvp
def _log_1_percent_off(x):
    return jnp.log(x)


@_log_1_percent_off.defjvp
def _log_1_percent_off_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.log(x), 1.01 * t / x


NAN_AT = np.array([0.3, -1.5, 0.7, 2.0], np.float32)  # log and arcsin are NaN at -1.5


@pytest.mark.parametrize(
    "f, args, note",
    [
        (
            jnp.log,
            (NAN_AT,),
            "f's output is NaN/Inf at 1 of 4 entries; the derivative was "
            "judged where both are finite",
        ),
        (
            jnp.arcsin,
            (NAN_AT,),
            "f's output is NaN/Inf at 2 of 4 entries; the derivative "
            "was judged where both are finite, holding 2 argument entries fixed (NaN/Inf "
            "themselves, or feeding only NaN/Inf outputs)",
        ),
        (
            jax.nn.softplus,
            (np.array([-np.inf, 0.3, 1.0], np.float32),),
            "its arguments are "
            "NaN/Inf at 1 of 3 entries; the derivative was judged where both are finite, "
            "holding 1 argument entry fixed",
        ),
        (
            jax.scipy.special.xlog1py,
            (np.array([1.0, 2.0, 3.0]), np.array([0.2, -1.5, 0.4])),
            "f's output is NaN/Inf at 1 of 3 entries; the derivative was judged where both are "
            "finite, holding 1 argument entry fixed",
        ),
        (
            lambda a, b: {"ab": a @ b, "b": b**2},
            (np.array([[1.0, np.nan], [2.0, 3.0]]), np.ones((2, 2))),
            "f's output is NaN/Inf at 2 of 8 entries and its arguments are "
            "NaN/Inf at 1 of 8 entries; the derivative was judged where both are finite, "
            "holding 3 argument entries fixed",
        ),
    ],
    ids=["log", "arcsin", "softplus-at-inf", "xlog1py", "matmul-dict"],
)
def test_where_f_is_nan_at_some_entries_the_others_are_judged(f, args, note):
    outcome = _check_grads.run(f, args, 2)
    assert outcome.verdict == "pass", str(outcome.report)
    assert outcome.report.status == "pass"
    assert outcome.report.problems[0].startswith(note)
    assert note in outcome.headline


@pytest.mark.parametrize("modes", [("fwd",), ("rev",), ("fwd", "rev")])
@pytest.mark.parametrize("order", [1, 2])
def test_a_bug_where_f_is_finite_fails_though_f_is_nan_elsewhere(modes, order):
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(_log_1_percent_off, (NAN_AT,), order, modes)
    report = info.value.report
    assert report.status == "fail"
    assert report.relative_error == pytest.approx(0.01, rel=0.2)
    assert "f's output is NaN/Inf at 1 of 4 entries; the derivative was judged" in str(info.value)
    # jaxcheck.verify itself still reports the NaN and judges nothing
    assert jaxcheck.verify(lambda x: jnp.log(x), NAN_AT).status == "nonfinite"


def test_partly_nan_outputs_of_two_dtypes_under_strict_promotion(strict_numerics):
    # log(a) is NaN at -1.5 and fine elsewhere; the second output's entry 1 is NaN too
    f = lambda a, b: (jnp.log(a), jnp.log(b) * jnp.float16(2))  # noqa: E731
    outcome = _check_grads.run(f, (NAN_AT, NAN_AT.astype(np.float16)), 2)
    assert outcome.verdict == "pass", str(outcome.report)
    assert outcome.report.problems[0] == (
        "f's output is NaN/Inf at 2 of 8 entries; the derivative was judged where both are finite"
    )


@pytest.mark.parametrize("bug", [False, True])
def test_function_that_runs_only_in_float16_is_judged_at_float16_resolution(bug, strict_numerics):
    # fn refuses float32 and float64 inputs: both modes then run in float16, and a
    # caller's rtol of 1e-5 (check_grads' default) cannot make them agree to it
    sin = scaled_sin(1.1) if bug else jnp.sin

    def half_only(b):
        if b.dtype != jnp.float16:
            raise TypeError(f"float16 only, got {b.dtype}")
        return b

    f = lambda a, b: (jnp.sin(a), sin(half_only(b)) * jnp.float16(2))  # noqa: E731
    outcome = _check_grads.run(f, (X, X.astype(np.float16)), 2)
    assert outcome.verdict == ("fail" if bug else "pass"), str(outcome.report)
    consistency = [c for c in outcome.report.checks if "forward vs reverse" in c.name]
    # (a planted custom_jvp adds the part of its primal output, in both modes)
    assert len(consistency) == (3 if bug else 2)
    assert all(c.tolerance == pytest.approx(np.sqrt(np.finfo(np.float16).eps)) for c in consistency)
    if bug:
        assert [leaf.path for leaf in outcome.report.leaves if leaf.status == "fail"] == ["[1]"]


@pytest.mark.parametrize("modes", [("fwd",), ("rev",)])
def test_a_nan_derivative_of_a_finite_output_fails_though_f_is_nan_elsewhere(modes):
    # sqrt is NaN at -1 (held fixed) and finite at 0, where its derivative is inf
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(jnp.sqrt, (np.array([0.0, -1.0, 2.0], np.float32),), 1, modes)
    assert info.value.report.status == "nonfinite"
    assert info.value.report.problems[0] == (
        "f's output is NaN/Inf at 1 of 3 entries, and the derivative of an output that is "
        "finite is NaN/Inf (which fails, as it does where f is finite everywhere)"
    )


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            (jnp.sin, X, 1),
            TypeError,
            "sin() takes 1 positional argument but 4 were given (args was a ndarray, which "
            "check_grads unpacks as JAX's does, tuple(args): its 4 rows were f's positional "
            "arguments; for one argument x, pass (x,))",
        ),
        (
            (jnp.sin, {"x": X}, 1),
            TypeError,
            "args must be a tuple or list of f's positional arguments, "
            "got dict. For one argument x, pass (x,).",
        ),
        ((jnp.sin, (X,), float("inf")), ValueError, "order must be an int (the highest order)"),
        ((jnp.sin, (X,), 1, ("fwd", "bwd")), ValueError, "unknown mode(s) ['bwd']"),
        ((jnp.sin, (X,), 1, ()), ValueError, "modes is empty, so nothing would be checked"),
        (
            (jnp.sin, (X,), 1, ("rev",), None, None, float("nan")),
            ValueError,
            "eps must be a finite float, or None (JAX's default step), got nan.",
        ),
        ((jnp.sin, (X,), 1, ("rev",), "loose"), TypeError, "atol must be a float, a dict"),
        ((X, (X,), 1), TypeError, "f must be callable, got ndarray."),
        # verify's advice in check_grads' terms
        (
            (_sin_by_vjp, (X,), 1, ("fwd",)),
            TypeError,
            "modes=('fwd',) needs forward-mode autodiff (jvp), but f contains a "
            "jax.custom_vjp function, which has no jvp. Pass modes=('rev',) to check",
        ),
        (
            (lambda x: (jnp.sin(x), jnp.ones(2, jnp.int32)), (X,), 1, ("rev",)),
            TypeError,
            "f's output leaf [1] has dtype int32; only floating and complex outputs can be "
            "differentiated. Cast it to a float dtype (check_grads differentiates every "
            "output of f).",
        ),
        (
            (lambda x: (jnp.sin(x), "label"), (X,), 1),
            TypeError,
            "f must return a scalar or a pytree of float arrays; it returned str 'label' at "
            "[1]. Return arrays (a loss, or model outputs). check_grads differentiates every "
            "output of f and takes no auxiliary output: check a function that returns only "
            "f's arrays (for f returning (y, label): check_grads(lambda *a: f(*a)[0], args, "
            "order)).",
        ),
        (
            (lambda i: i * 1.0, (np.arange(3),), 1),
            ValueError,
            "args has no floating-point leaf to differentiate",
        ),
        (
            (lambda x: np.sin(x), (X,), 1, ("rev",)),
            TypeError,
            "pass its hand-written gradient to jaxcheck.verify(fn, params, *args, "
            "grad_fn=grad_fn) (check_grads takes none)",
        ),
    ],
)
def test_bad_inputs_say_what_to_pass(call, error, message):
    with pytest.raises(error) as info:
        jaxcheck.check_grads(*call)
    assert message in str(info.value)
    assert str(info.value).startswith("check_grads: ")


def _refuses_three_entries(x):
    if x.shape[0] != 2:
        raise ValueError("boom: expected 2 entries")
    return jnp.sin(x)


@pytest.mark.parametrize(
    "f, error, message",
    [
        (_refuses_three_entries, ValueError, "boom: expected 2 entries"),
        (
            lambda x: jnp.dot(x, jnp.ones((4, 2))),
            TypeError,
            "dot_general requires contracting dimensions to have the same shape",
        ),
    ],
)
def test_fs_own_errors_are_raised_as_jax_check_grads_raises_them(f, error, message):
    """An error f raises itself (or JAX inside f) is f's, raised as it was: it came back
    re-created with a "check_grads: " prefix, as if check_grads had refused its input,
    and a test matching f's message (`pytest.raises(ValueError, match="^boom")`) failed
    under the plugin."""
    for check in (jax.test_util.check_grads, jaxcheck.check_grads):
        with pytest.raises(error) as info:
            check(f, (jnp.ones(3),), 1)
        assert str(info.value).startswith(message)


def test_jax_tolerances_become_a_relative_floor():
    f32 = (np.ones(2, np.float32),)
    small = lambda x: jnp.sum(1e-3 * jnp.sin(x))  # noqa: E731 - derivatives of 5e-4
    floor = functools.partial(_check_grads._floor, small)
    assert floor(None, None, f32, "both") == 1e-5  # JAX's float64 default
    assert floor(0.2, 0.01, f32, "both") == 0.2
    assert floor(None, 1e-8, f32, "both") == 1e-5  # the unset atol's default
    assert floor(1e-8, 1e-8, f32, "both") == 1e-8
    assert floor(None, 3.0, f32, "both") == 0.5  # capped: a zero gradient is 1 off
    assert floor(0, 0, f32, "both") == 1e-5  # JAX reads 0 as "default"
    # a dict keyed by dtype: the entry of f's output dtype applies, as in JAX
    tol = {np.float32: 1e-3, jnp.bfloat16: 5e-2}
    mixed = (np.ones(2, np.float32), jnp.ones(2, jnp.bfloat16))
    assert floor(tol, None, f32, "both") == 1e-3
    as_f32 = lambda x, y: jnp.sum(x) + jnp.sum(y.astype(jnp.float32))  # noqa: E731
    assert _check_grads._floor(as_f32, tol, tol, mixed, "both") == 1e-3
    as_bf16 = lambda x, y: jnp.sum(x.astype(jnp.bfloat16) * y)  # noqa: E731
    assert _check_grads._floor(as_bf16, tol, tol, mixed, "both") == 5e-2
    assert floor({np.float64: 1e-7}, 1e-7, f32, "both") == 1e-5


@pytest.mark.parametrize("mode", ["forward", "reverse", "both"])
def test_atol_is_relative_to_the_size_of_the_derivative_as_in_jax(mode):
    """JAX's atol bounds the difference of derivative values, so where they are large it
    allows only a small relative error: atol=0.05 with derivatives near 100 allows
    rtol + 0.05 / |value| (was: a relative floor of 0.05, passing a 2 % bug JAX catches)."""
    x = np.array([0.3, -0.7, 1.2], np.float32)
    big = lambda x: jnp.sum(100.0 * jnp.sin(x))  # noqa: E731
    # JAX's draws: a normal tangent v, then a normal cotangent u (scalar output)
    rng = np.random.RandomState(0)
    v = rng.randn(3)
    u = rng.randn()
    value = float(np.sum(100.0 * np.cos(x) * v))
    by_mode = {"forward": [abs(value)], "reverse": [abs(u * value)]}
    by_mode["both"] = by_mode["forward"] + by_mode["reverse"]
    expected = min(1e-3 + 0.05 / scale for scale in by_mode[mode])
    assert _check_grads._floor(big, 0.05, 1e-3, (x,), mode) == pytest.approx(expected)
    assert expected < 2e-2
    # a vector output: JAX scales its tolerances by the number of entries compared
    vector = lambda x: 100.0 * jnp.sin(x)  # noqa: E731
    forward = _check_grads._floor(vector, 0.05, 1e-3, (x,), "forward")
    b = 100.0 * np.cos(x) * np.random.RandomState(0).randn(3)
    assert forward == pytest.approx(min(0.05, 3 * (1e-3 + 0.05 / np.max(np.abs(b)))))
    # an integer output beside it (float0 tangents) leaves the float output's scale alone
    with_int = lambda x: (100.0 * jnp.sin(x), jnp.arange(3))  # noqa: E731
    assert _check_grads._floor(with_int, 0.05, 1e-3, (x,), "forward") == pytest.approx(forward)
    # near-zero derivatives: atol is as loose as it was (JAX's is looser still)
    tiny = lambda x: jnp.sum(1e-4 * jnp.sin(x))  # noqa: E731
    assert _check_grads._floor(tiny, 0.05, 1e-3, (x,), mode) == 0.05


@pytest.mark.parametrize("bug", [0.02, 0.05])
def test_a_bug_jax_catches_under_a_loose_atol_fails(bug):
    @jax.custom_jvp
    def g(x):
        return 100.0 * jnp.sin(x)

    g.defjvp(lambda p, t: (g(p[0]), 100.0 * jnp.cos(p[0]) * (1 + bug) * t[0]))
    x = np.array([0.3, -0.7, 1.2], np.float32)
    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        jaxcheck.check_grads(lambda x: jnp.sum(g(x)), (x,), 1, atol=0.05, rtol=1e-3)
    g_right = scaled_sin(1.0)
    assert jaxcheck.check_grads(lambda x: jnp.sum(100.0 * g_right(x)), (x,), 1, atol=0.05) is None


def test_a_tolerance_dict_applies_the_entry_of_the_output_dtype():
    """JAX looks a tolerance dict up by the dtype of the values it compares: a float32
    output of float32 and float16 arguments gets the float32 entry (was: the float16 one,
    0.5, passing a 10 % bug)."""

    @jax.custom_jvp
    def h(x):
        return jnp.sin(x)

    h.defjvp(lambda p, t: (h(p[0]), 1.1 * jnp.cos(p[0]) * t[0]))
    x = np.array([0.3, -0.7, 1.2], np.float32)
    b = np.array([0.5, 0.25, 1.0], np.float16)
    tol = {np.float16: 0.5, np.float32: 1e-3}
    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        jaxcheck.check_grads(
            lambda x, b: jnp.sum(h(x) * b.astype(jnp.float32)), (x, b), 1, atol=tol, rtol=tol
        )


def test_empty_arguments_have_nothing_to_check():
    """JAX's check passes with nothing compared, and so does this one by default; it is
    not judged (a plugin's summary lists it so, not among the passes), and
    raise_unjudged=True raises, saying why."""
    outcome = _check_grads.run(jnp.sort, (np.zeros((0,), np.float32),), 2)
    assert (outcome.report, outcome.verdict) == (None, "unjudged")
    assert (
        outcome.headline == "every floating-point argument is empty, nothing to check; not judged"
    )
    assert jaxcheck.check_grads(jnp.sum, (np.zeros((2, 0)),), 1) is None
    with pytest.raises(
        jaxcheck.GradientCheckError,
        match="^jaxcheck.check_grads: every floating-point argument is empty, nothing to check",
    ):
        jaxcheck.check_grads(jnp.sum, (np.zeros((2, 0)),), 1, raise_unjudged=True)
    # no output elements: nothing to compare, and JAX's check passes too
    empty_output = lambda x: x[1:8:-1] * 2.0  # noqa: E731
    outcome = _check_grads.run(empty_output, (np.ones(10, np.float32),), 2)
    assert (outcome.report, outcome.verdict) == (None, "unjudged")
    assert outcome.headline == "every output of f is empty, nothing to check; not judged"
    assert jaxcheck.check_grads(empty_output, (np.ones(10, np.float32),), 2) is None
    with pytest.raises(jaxcheck.GradientCheckError, match="every output of f is empty"):
        jaxcheck.check_grads(empty_output, (np.ones(10, np.float32),), 2, raise_unjudged=True)


def test_checking_the_same_function_again_compiles_nothing():
    """A test that calls check_grads on one function several times (at other points, as
    JAX's expm test does) pays for compiling once."""
    from jaxcheck import _plan

    def f(a, b):
        return jnp.sum(jnp.sin(a) * b)

    jaxcheck.check_grads(f, (jnp.ones(3), jnp.ones(3)), 2)
    before = _plan.compilations
    jaxcheck.check_grads(f, (jnp.full(3, 0.5), jnp.ones(3)), 2)
    assert _plan.compilations == before


def _sin_times(k):
    return lambda x, y: jnp.sin(x) * y * k


def _with_rule(factor):
    @jax.custom_jvp
    def sin(x):
        return jnp.sin(x)

    sin.defjvp(lambda p, t: (sin(p[0]), factor * jnp.cos(p[0]) * t[0]))
    return lambda x, y: sin(x) * y


def _with_bwd(on_cotangent):
    @jax.custom_vjp
    def sin(x):
        return jnp.sin(x)

    sin.defvjp(lambda x: (sin(x), jnp.cos(x)), lambda c, g: (on_cotangent(g) * c,))
    return lambda x, y: jnp.sum(sin(x)) * y


def _with_primal(scale):
    """A custom_vjp of fwd and bwd right for sin, its primal scale * sin."""

    @jax.custom_vjp
    def f(x):
        return scale * jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (c * g,))
    return f


_PRIMAL_TWIN = None


@pytest.mark.parametrize("order", [1, 2])
def test_a_new_function_of_the_same_program_compiles_nothing(order):
    """A parametrized test builds a new lambda for each check: one of the same code over
    equal values reuses the first one's programs (each compiled them all again: 131 ms a
    check at order 1, where JAX's check took 3 ms), while one computing anything else
    (another constant, a custom rule with another derivative or primal, other code alike
    at the check's dtypes) is compiled, and judged, anew."""
    from jaxcheck import _plan

    args = (jnp.linspace(0.1, 1.0, 3), jnp.float32(2.0))
    summed = lambda k: lambda p: jnp.sum(_sin_times(k)(*p))  # noqa: E731
    jaxcheck.check_grads(_sin_times(2.0), args, order)
    jaxcheck.verify(summed(2.0), args)
    before = _plan.compilations
    jaxcheck.check_grads(_sin_times(2.0), args, order)
    jaxcheck.verify(summed(2.0), args)
    assert _plan.compilations == before
    jaxcheck.check_grads(_sin_times(3.0), args, order)
    assert _plan.compilations > before
    jaxcheck.check_grads(_with_rule(1.0), args, order)
    with pytest.raises(AssertionError, match="FAIL — (gradient|order 1: f) is WRONG"):
        jaxcheck.check_grads(_with_rule(1.01), args, order)
    # a custom_vjp whose bwd squares its cotangent: its vjp traced at the cotangent 1
    # showed the same program as the right one's, and reused its programs (and verdict)
    bwds = {"right": lambda g: g, "squared": lambda g: g * jnp.abs(g)}
    for which in ("right", "squared", "right"):
        twin = _with_bwd(bwds[which])
        if which == "right":
            jaxcheck.check_grads(twin, args, order, modes=["rev"])
        else:
            with pytest.raises(AssertionError, match="FAIL"):
                jaxcheck.check_grads(twin, args, order, modes=["rev"])
    # a rule differing from its twin in its primal alone, read from a global by a lambda
    # of the same code: its derivative's jaxpr showed the same program
    global _PRIMAL_TWIN
    for scale, fails in ((1.0, False), (2.0, True)):
        _PRIMAL_TWIN = _with_primal(scale)
        report = jaxcheck.verify(lambda p: jnp.sum(_PRIMAL_TWIN(p)), args[0])  # noqa: B023
        assert (report.status == "fail") == fails, str(report)
    # functions of other code, alike at the check's dtypes (one casts float32 to float32,
    # which rounds in the float64 reference only), share nothing
    first = lambda x, y: jnp.sum(jnp.tanh(x) * x) * y  # noqa: E731
    second = lambda x, y: jnp.sum(jnp.tanh(x.astype(jnp.float32)) * x) * y  # noqa: E731
    jaxcheck.check_grads(first, args, order)
    before = _plan.compilations
    jaxcheck.check_grads(second, args, order)
    assert _plan.compilations > before
    # (the same code returning its outputs in another structure is another program)
    pair = lambda x, y: (jnp.sin(x) * y, x * y)  # noqa: E731
    listed = lambda x, y: [jnp.sin(x) * y, x * y]  # noqa: E731
    jaxcheck.check_grads(pair, args, order)
    before = _plan.compilations
    jaxcheck.check_grads(listed, args, order)
    assert _plan.compilations > before


_SCALED_SIN = scaled_sin(1.1)  # (one rule for every case below, as a module's would be)
_Batch = collections.namedtuple("_Batch", "x y")


def _field(data, name):
    return data[name] if isinstance(data, dict) else getattr(data, name)


def _over(data, where=None):
    """A check's function as a parametrized test writes it: a new lambda over its data."""
    if where is None:
        return lambda w: jnp.sum(
            jnp.where(_field(data, "x") > 0, _SCALED_SIN(w), jnp.sin(w)) * _field(data, "y")
        )
    # (jnp.greater: NumPy's own > on NumPy data would run before the check, a constant)
    return lambda w: jnp.sum(jnp.where(jnp.greater(where, 0), _SCALED_SIN(w), jnp.sin(w)) * data)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("held", ["arrays", "dict", "namedtuple", "numpy", "defaults"])
def test_a_new_function_over_new_data_runs_the_programs_of_the_first(order, held):
    """A parametrized test draws its data anew for each case and closes over it: the arrays
    f closes over are taken as its arguments, so a lambda of the same code over new data of
    the same shapes compiles nothing (each compiled its programs anew: 0.06 s a check at
    order 1, JAX's check 0.003 s), and each is judged at its own data (the rule is wrong
    only where x > 0 selects it)."""
    from jaxcheck import _plan

    rng = np.random.default_rng(0)

    def case(sign):
        x = sign * jnp.asarray(rng.uniform(0.5, 1.0, 4), jnp.float32)
        y = jnp.asarray(rng.normal(size=4), jnp.float32)
        if held == "dict":
            return _over({"x": x, "y": y})
        if held == "namedtuple":  # (a batch, say)
            return _over(_Batch(x, y))
        if held == "numpy":
            return _over(np.asarray(y), where=np.asarray(x))
        if held == "defaults":  # (bound as a loop binds them: lambda w, x=x)
            return lambda w, x=x, y=y: jnp.sum(jnp.where(x > 0, _SCALED_SIN(w), jnp.sin(w)) * y)
        return _over(y, where=x)

    jaxcheck.check_grads(case(-1.0), (X,), order)
    before = _plan.compilations
    jaxcheck.check_grads(case(-1.0), (X,), order)
    assert _plan.compilations == before
    with pytest.raises(jaxcheck.GradientCheckError, match="WRONG"):
        jaxcheck.check_grads(case(1.0), (X,), order)


def test_data_a_function_branches_on_in_python_stays_a_constant():
    """An array f reads in Python (a branch on its values) cannot be an argument of its
    programs, nor an initial value JAX needs as a constant (`lax.reduce_window` over a
    traced one has no derivative; JAX's own lax_autodiff_test closes over one): f is
    checked over it as it is."""
    init = np.asarray(-np.inf, np.float32)
    window = lambda w: lax.reduce_window(w, init, lax.max, (2,), (1,), "VALID")  # noqa: E731
    assert jaxcheck.check_grads(window, (X,), 2) is None
    x = np.asarray([1.0, -1.0, 2.0, 0.5], np.float32)

    def f(w):
        return jnp.sum(_SCALED_SIN(w) if x.sum() > 0 else jnp.sin(w) * x)

    with pytest.raises(jaxcheck.GradientCheckError, match="WRONG"):
        jaxcheck.check_grads(f, (X,), 1)
    x = -x
    assert jaxcheck.check_grads(f, (X,), 1) is None


def test_a_function_changed_between_two_checks_is_checked_anew():
    impl = {"sin": jnp.sin}

    def f(x):
        return impl["sin"](x)

    assert jaxcheck.check_grads(f, (X,), 1) is None
    impl["sin"] = scaled_sin(2.0)  # the same function object, now with a wrong rule
    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        jaxcheck.check_grads(f, (X,), 1)


def test_a_rule_redefined_between_two_checks_is_checked_anew():
    # f's jaxpr names the custom_vjp but not its bwd: the fingerprint traces f's vjp
    @jax.custom_vjp
    def sin(x):
        return jnp.sin(x)

    sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (2.0 * g * jnp.cos(x),))

    def f(x):
        return sin(x) ** 2

    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        jaxcheck.check_grads(f, (X,), 1, ("rev",))
    sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))  # fixed
    assert jaxcheck.check_grads(f, (X,), 1, ("rev",)) is None


@pytest.mark.parametrize("order", [1, 2])
def test_forward_mode_through_a_custom_vjp_raises_as_in_jax(order):
    """JAX's check_grads raises where forward mode meets a custom_vjp; so does the drop-in
    (it checked reverse mode alone and returned quietly, its note unseen), and reverse mode
    alone is checked."""
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.test_util.check_grads(_sin_by_vjp, (X,), order, modes=("fwd", "rev"))
    with pytest.raises(TypeError) as info:
        jaxcheck.check_grads(_sin_by_vjp, (X,), order, modes=("fwd", "rev"))
    assert str(info.value) == (
        "check_grads: modes=('fwd', 'rev') asks for forward mode (jvp), but f contains a "
        "jax.custom_vjp function, which has no jvp (jax.test_util.check_grads raises here "
        "too: can't apply forward-mode autodiff (jvp) to a custom_vjp function.). Pass "
        "modes=('rev',) to check its custom rule in reverse mode."
    )
    # a suite matching JAX's own words passes either way
    for modes in [("fwd",), ("fwd", "rev")]:
        with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a"):
            jaxcheck.check_grads(_sin_by_vjp, (X,), order, modes=modes)
    jaxcheck.check_grads(_sin_by_vjp, (X,), order, modes=("rev",))


def test_an_infinite_derivative_at_the_edge_of_the_domain_is_not_judged():
    """x log x at 0 is finite, NaN just below, and its derivative there is the one-sided
    limit, -inf: JAX's check_grads passes; the drop-in failed the call (a NaN/Inf
    derivative where f is finite). f is NaN next to the point: that entry is not judged,
    the other is, held 1e-6 inside the domain (also where f has a single output, which
    forward mode's 0 times an infinite derivative at the point made NaN). A NaN derivative
    where f is finite all around still fails."""
    x = jnp.array([0.0, 1.0])

    def f(a):
        return jax.scipy.special.xlogy(a, a)

    jax.test_util.check_grads(f, (x,), 1)
    outcome = _check_grads.run(f, (x,), 1, ("fwd", "rev"), None, None, None)
    assert outcome.verdict == "pass", str(outcome.report)
    assert outcome.report.problems[0].startswith("f is at the edge of its domain at 1 argument")
    jaxcheck.check_grads(f, (x,), 1)
    summed = _check_grads.run(lambda a: jnp.sum(f(a)), (x,), 1, ("fwd", "rev"), *[None] * 3)
    assert summed.verdict == "pass", str(summed.report)

    g = jax.custom_jvp(lambda x: jnp.sum(x**2))
    g.defjvp(lambda p, t: (g(p[0]), jnp.sum(t[0] * 2 * p[0] / 0.0)))
    with pytest.raises(jaxcheck.GradientCheckError):
        jaxcheck.check_grads(g, (jnp.array([0.5, 1.0]),), 1)


@pytest.mark.parametrize("x", [jnp.zeros(2), jnp.array(0.0)], ids=["zeros", "scalar"])
@pytest.mark.parametrize("f", [jnp.sqrt, lambda a: jax.scipy.special.xlogy(a, a)])
def test_an_argument_all_at_the_edge_of_the_domain_is_not_judged(f, x):
    """Entries at the edge of f's domain were moved by 1e-6 of their argument's RMS, which
    is 0 where every entry is 0: the edge went unseen, and sqrt at zeros(2) raised
    "NONFINITE" where at [0, 1] it returned quietly. Such an argument moves by 1e-6."""
    outcome = _check_grads.run(f, (x,), 1, ("fwd", "rev"), None, None, None)
    assert outcome.verdict == "unjudged", str(outcome.report)
    assert outcome.report.problems[-1].startswith(
        "f is finite at the point but NaN/Inf right next to it: the point is at the edge of "
        "f's domain"
    )
    assert jaxcheck.check_grads(f, (x,), 1) is None


def test_a_nan_rule_beside_an_entry_near_its_own_edge_still_fails():
    """The look for NaN next to the point moved every entry by 1e-6 of its leaf's RMS: an
    entry at 1e-6 crossed 0, log turned NaN there, and a rule returning NaN below 1e-4 was
    excused. Only the entries whose derivative is NaN/Inf move, by 1e-6 of themselves."""

    @jax.custom_jvp
    def log(x):
        return jnp.log(x)

    log.defjvp(lambda p, t: (jnp.log(p[0]), jnp.where(p[0] < 1e-4, jnp.nan, 1 / p[0]) * t[0]))
    with pytest.raises(jaxcheck.GradientCheckError):
        jaxcheck.check_grads(
            lambda x: jnp.sum(log(x)), (jnp.array([1.0, 2.0, 1e-6]),), 1, modes=("rev",)
        )


def test_a_misspelt_keyword_names_the_one_meant():
    """`mode=` (verify's option) got Python's bare unexpected-keyword error."""
    said = r"^check_grads got unexpected keyword argument\(s\) 'mode' \(did you mean 'modes'\?\)"
    with pytest.raises(TypeError, match=said):
        jaxcheck.check_grads(jnp.sin, (X,), 1, mode="rev")


@pytest.mark.parametrize("modes, fails", [(["fwd"], False), (["rev"], True)])
def test_atol_at_fs_scale_takes_jaxs_default_rtol_where_rtol_is_unset(modes, fails):
    """A derivative 0.5 % off by design (an absolute 0.5 on values near 100) with atol=0.1
    and rtol unset: JAX compares with its float32 default rtol of 2e-3, per entry of the
    jvp (4 entries: within 4 (0.1 + 2e-3 |b|), passes) and on one inner product in reverse
    mode (within 0.1 + 2e-3 |p|, fails); jaxcheck agrees with both (was: the scale taken
    with rtol 1e-5, failing the forward check JAX passes)."""

    @jax.custom_jvp
    def g(x):
        return 100.0 * jnp.sin(x)

    g.defjvp(lambda p, t: (g(p[0]), (100.0 * jnp.cos(p[0]) + 0.5) * t[0]))
    x = np.array([0.3, -0.4, 0.8, 0.1], np.float32)
    for check in (jax.test_util.check_grads, jaxcheck.check_grads):
        if fails:
            with pytest.raises(AssertionError):
                check(g, (x,), 1, modes, atol=0.1)
        else:
            check(g, (x,), 1, modes, atol=0.1)


def test_one_leaf_at_the_tolerance_is_not_said_to_spread_over_leaves():
    """A 50 % bug against rtol=0.9, capped at 0.5: the all-leaf check fails, the only
    leaf alone passes, and the report said the error "is spread thinly over several
    leaves" of a one-leaf function."""

    @jax.custom_jvp
    def sin_off(x):
        return jnp.sin(x)

    sin_off.defjvp(lambda p, t: (jnp.sin(p[0]), 1.5 * jnp.cos(p[0]) * t[0]))
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(sin_off, (jnp.linspace(0.1, 1.0, 3),), 1, rtol=0.9)
    report = info.value.report
    assert "spread thinly" not in str(report)
    assert (
        "[0], the only leaf, passes checked alone (relative error 5.0e-01, tolerance 5.0e-01): "
        "the error is at the tolerance, where two estimates of it fall on either side; more "
        "directions (verify's num_directions) narrow its interval"
    ) in report.problems


def _half_gradient(x):
    return x * jax.lax.stop_gradient(x)  # its derivative is x, half of 2x: 50 % off


@pytest.mark.parametrize(
    "tolerances, said",
    [
        ({"rtol": 1.0, "atol": 1.0}, r"rtol=1\.0"),
        ({"rtol": {np.float32: 0.9}}, r"rtol=0\.9 \(its entry for f's output dtype\)"),
        ({"atol": 100.0}, r"atol=100\.0 \(at f's scale a relative error of \d\.\de\+\d\d\)"),
    ],
)
def test_a_tolerance_above_the_cap_is_said_to_be_capped(tolerances, said):
    x = jnp.array([2.3, 2.7, 3.1])
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(_half_gradient, (x,), 1, modes=("rev",), **tolerances)
    note = info.value.report.problems[0]
    rest = (
        " was taken as 0.5, the loosest tolerance check_grads applies to the relative error "
        "of the whole derivative (a derivative that is zero or has the wrong sign is 1 or "
        "more off, so a tolerance near 1 would pass it); a derivative more than 50% off "
        "fails whatever rtol and atol say. Pass rtol and atol of at most 0.5 to be judged "
        "by them as given"
    )
    assert re.fullmatch("tolerance capped: " + said + re.escape(rest), note), note
    assert f"! {note}" in str(info.value)


def test_a_tolerance_at_the_cap_is_not_said_to_be_capped():
    outcome = _check_grads.run(_half_gradient, (jnp.array([2.3, 2.7]),), 1, ("rev",), rtol=0.5)
    assert not any("capped" in p for p in outcome.report.problems)


def test_rows_at_the_capped_tolerance_print_numbers_that_agree_with_their_result():
    """An error a hair above the tolerance fails: its row shows the digits that tell them
    apart, not 5.0e-01 against 5.0e-01 beside a row of the same numbers that passes."""
    x = jnp.array([2.3, 2.7, 3.1])
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(_half_gradient, (x,), 1, modes=("rev",), rtol=1.0)
    row = r" (\d\.\d+e-0\d) +(?:\S+\.\.\S+ +)?(\d\.\d+e-0\d) +(ok|FAIL)$"
    rows = re.findall(row, str(info.value), re.M)
    assert len(rows) == 3  # two checks, one leaf
    for error, tolerance, result in rows:
        assert error != tolerance
        assert (float(error) <= float(tolerance)) == (result == "ok")
    assert "FAIL" in [result for *_, result in rows]


@pytest.mark.parametrize(
    "error, tolerance, shown",
    [
        (0.5 + 2e-11, 0.5, ("5.0000000002e-01", "5.0000000000e-01")),
        (0.5 - 1e-8, 0.5, ("4.9999999e-01", "5.0000000e-01")),
        (0.5, 0.5, ("5.0e-01", "5.0e-01")),
        (0.31, 0.5, ("3.1e-01", "5.0e-01")),
        (float("nan"), 0.5, ("—", "5.0e-01")),
    ],
)
def test_an_error_and_its_tolerance_are_printed_apart(error, tolerance, shown):
    assert _report.apart(error, tolerance) == shown


def _straight_through(scale):
    rounded = jax.custom_jvp(jnp.round)  # passes round's static decimals on traced
    rounded.defjvp(lambda p, t: (jnp.round(p[0]), scale * t[0]))
    return rounded


@pytest.mark.parametrize("scale, verdict", [(0.0, "pass"), (1.0, "fail")])
def test_a_function_jax_jit_cannot_trace_runs_eagerly_and_is_judged(scale, verdict):
    """jax.custom_jvp(jnp.round) runs op by op but not under jax.jit: it is judged as JAX's
    check_grads judges it (the straight-through estimator fails, round's zero passes)."""
    outcome = _check_grads.run(_straight_through(scale), (jnp.array([0.3, 1.7]),), 1)
    assert outcome.verdict == verdict
    surrogate = "a surrogate gradient (a straight-through estimator, a custom rule that is not"
    assert any(surrogate in p for p in outcome.report.problems) == (verdict == "fail")


def test_a_float_argument_passed_on_to_a_static_argument_says_how_to_hold_it():
    scaled = jax.jit(lambda x, a: x * a, static_argnums=1)
    with pytest.raises(ValueError) as info:
        jaxcheck.check_grads(scaled, (jnp.array([0.3, 1.7]), 0.5), 1)
    assert str(info.value) == (
        "check_grads: f could not be traced: a jax.jit function in f has a static argument "
        "(static_argnums or static_argnames) that got one of the float values check_grads "
        "differentiates (likely args[1], a float scalar), as an array or a traced value, "
        "which jax.jit cannot hash (JAX: Non-hashable static arguments are not supported). "
        "check_grads differentiates every floating-point argument, and passes it to f as an "
        "array. Hold that value fixed by closing over it: for args (x, a), "
        "check_grads(lambda x: f(x, a), (x,), order)."
    )


_KINK_NOTE = (
    "f has a kink (one-sided slopes that differ) at 1 argument entry, found by moving each "
    "entry alone; the derivative was judged at the other entries, holding those fixed"
)
_EDGE_NOTE = (
    "f is at the edge of its domain at 1 argument entry (its derivative NaN/Inf there, f "
    "NaN/Inf right next to it); the derivative was judged at the other entries, holding "
    "those fixed (a step of 1e-6 into the domain, where f's derivative is finite)"
)


@pytest.mark.parametrize(
    "f, x, order, modes, verdict, note",
    [
        (
            lambda x: jax.nn.relu(x) + x**2,
            [0.0, 1.0, -2.0, 0.5],
            1,
            ("fwd", "rev"),
            "pass",
            _KINK_NOTE,
        ),
        (
            lambda x: jax.nn.relu(x) + x * jax.lax.stop_gradient(x),  # half the derivative
            [0.0, 1.0, -2.0, 0.5],
            1,
            ("fwd", "rev"),
            "fail",
            _KINK_NOTE,
        ),
        (
            lambda x: jnp.abs(x[0]) + jnp.sum(x[1:] ** 3),
            [0.0, 1.0, 2.0],
            2,
            ("fwd", "rev"),
            "pass",
            _KINK_NOTE,
        ),
        (
            lambda x: jnp.abs(x[0]) + jnp.sum(x[1:] ** 2 * jax.lax.stop_gradient(x[1:])),
            [0.0, 1.0, 2.0],
            2,
            ("rev",),
            "fail",
            _KINK_NOTE,
        ),
        (lambda x: jnp.sqrt(x) + x**2, [0.0, 1.0, 2.0], 1, ("fwd", "rev"), "pass", _EDGE_NOTE),
        (
            lambda x: jnp.sqrt(x) + x * jax.lax.stop_gradient(x),
            [0.0, 1.0, 2.0],
            1,
            ("fwd", "rev"),
            "fail",
            _EDGE_NOTE,
        ),
        (
            lambda x: jnp.sqrt(x[0]) + jnp.sum(scaled_sin(1.01)(x[1:])),  # one output
            [0.0, 1.0, 2.0],
            1,
            ("fwd", "rev"),
            "fail",
            _EDGE_NOTE,
        ),
    ],
    ids=[
        *("relu", "relu-bug", "abs-order-2", "abs-order-2-bug", "sqrt-at-0", "sqrt-at-0-bug"),
        "sqrt-at-0-scalar-bug",
    ],
)
def test_one_entry_at_a_kink_or_domain_edge_leaves_the_others_judged(
    f, x, order, modes, verdict, note
):
    """One entry at relu's kink or at sqrt's edge made the whole check unjudged (the
    plugin passed the test), hiding a derivative wrong at every other entry, which JAX's
    check_grads fails: the entries where f has a kink, found by moving each alone, or where
    it is at its domain's edge, are held fixed and the others judged."""
    outcome = _check_grads.run(f, (jnp.array(x),), order, modes)
    assert outcome.verdict == verdict, str(outcome.report)
    assert outcome.report.problems[0] == note
    if verdict == "fail":
        with pytest.raises(jaxcheck.GradientCheckError, match="FAIL — .*WRONG"):
            jaxcheck.check_grads(f, (jnp.array(x),), order, modes=modes)


@pytest.mark.parametrize("rules", [True, False])
def test_a_wrong_primal_alone_is_not_called_a_wrong_gradient(rules):
    """A custom_vjp whose fwd returns a value 1 % off, with a right bwd: only the primal
    rows fail, and the headline and advice said the gradient was wrong."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x) * 1.01, x), lambda x, g: (g * jnp.cos(x),))
    x = jnp.array([0.3, -0.7, 1.1])
    report = jaxcheck.verify(lambda p: jnp.sum(f(p)), x, rules=rules)
    assert report.status == "fail"
    lines = str(report).splitlines()
    assert lines[0] == "jaxcheck.verify: FAIL — fn's value from its derivative is WRONG"
    assert lines[-1].startswith(
        "  fn's value as its derivative computes it (a custom_vjp's fwd, a custom_jvp rule's "
        "primal output) differs from fn's own value, while the derivative agrees"
    )
    with pytest.raises(jaxcheck.GradientCheckError) as raised:
        jaxcheck.check_grads(f, (x,), 1, modes=("rev",))
    assert str(raised.value).splitlines()[0] == (
        "jaxcheck.check_grads: FAIL — f's value from its derivative is WRONG"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"rtol": {"bogus": 1e-3}},
            TypeError,
            "check_grads: rtol must be a float, a dict of floats keyed by dtype, or None; a key "
            "of {'bogus': 0.001} is not a dtype",
        ),
        ({"raise_unjudged": "no"}, ValueError, "raise_unjudged must be True or False, got 'no'."),
        ({"order": 9}, ValueError, "check_grads: order=9 is above the largest supported, 8"),
    ],
)
def test_bad_arguments_are_refused_in_its_terms(kwargs, error, message):
    order = kwargs.pop("order", 1)
    with pytest.raises(error, match=re.escape(message)):
        jaxcheck.check_grads(jnp.sin, (jnp.ones(3),), order, **kwargs)


@pytest.mark.parametrize("bug", [1.0, 1.1])
def test_python_floats_beside_numpy_float64_scalars_raise_no_dtype_warning(bug):
    """With 64-bit types off, arguments mixing Python floats and NumPy float64 scalars (as
    `list(rng.randn(n))` gives) made jaxcheck ask for float64 while settling the Python
    floats' dtype, and JAX warned that it truncates to float32: an error in suites that
    turn warnings into errors (JAX's own). The Python floats take float32, as JAX takes
    the NumPy scalars; the check still judges."""
    assert not jax.config.jax_enable_x64

    sin = scaled_sin(bug)

    def f(scales, values):
        return [s * sin(v) for s, v in zip(scales, values)]

    args = ([1.0, 2.0], list(np.random.RandomState(0).randn(2)))
    if bug == 1.0:
        jaxcheck.check_grads(f, args, order=1)
        return
    with pytest.raises(jaxcheck.GradientCheckError):
        jaxcheck.check_grads(f, args, order=1)


def test_an_array_for_args_is_unpacked_as_jax_does():
    """jax.test_util.check_grads takes tuple(args): a suite passing jnp.array([0.3]) for
    f(0.3) passes there, and was refused under the plugin."""
    jaxcheck.check_grads(jnp.sin, jnp.array([0.3]), 2)
    jaxcheck.check_grads(lambda a, b: a * jnp.sin(b), np.array([[0.5, 1.0], [0.2, 0.3]]), 1)
    sin_off = jax.custom_jvp(jnp.sin)
    sin_off.defjvp(lambda p, t: (jnp.sin(p[0]), 1.01 * jnp.cos(p[0]) * t[0]))
    with pytest.raises(jaxcheck.GradientCheckError, match="WRONG"):
        jaxcheck.check_grads(sin_off, jnp.array([0.3]), 1)


@jax.custom_jvp
def _exp_off_in_imaginary_tangents(z):
    return jnp.exp(z)


_exp_off_in_imaginary_tangents.defjvp(
    lambda p, t: (jnp.exp(p[0]), jnp.exp(p[0]) * (jnp.real(t[0]) + 1.01j * jnp.imag(t[0])))
)


@pytest.mark.parametrize(
    "modes, key, fails",
    [
        (("rev",), np.complex64, True),
        (("rev",), np.float32, False),
        (("fwd",), np.complex64, False),
        (("fwd",), np.float32, True),
        (("fwd", "rev"), np.complex64, True),
        (("fwd", "rev"), np.float32, True),
    ],
)
def test_a_tolerance_dict_applies_to_complex_outputs_as_in_jax(modes, key, fails):
    """JAX looks a complex output's dtype up in forward mode, and its real dtype in reverse
    mode, where it compares real inner products; a dtype missing from the dict takes the
    default, and the strictest applies. A 1 % bug in a complex rule passed with
    {complex64: 0.1} in reverse mode, which JAX's check fails."""
    z = jnp.array([0.3 + 0.4j, -0.5 + 0.2j, 0.7 - 0.6j], jnp.complex64)
    tol = {key: 0.1}
    call = functools.partial(
        jaxcheck.check_grads, _exp_off_in_imaginary_tangents, (z,), 1, modes, tol, tol
    )
    if fails:
        with pytest.raises(jaxcheck.GradientCheckError):
            call()
    else:
        assert call() is None


def test_float64_numpy_args_of_a_rule_that_returns_float32_are_checked_as_jax_takes_them():
    """With 64-bit types off, float64 NumPy arguments are checked in float64; a custom_jvp
    whose tangent is cast to float32 (as a kernel declaring a float32 output) raised there,
    where JAX rounds the arguments to float32 and its check_grads passes."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (jnp.sin(p[0]), (jnp.cos(p[0]) * t[0]).astype(jnp.float32)))
    x = np.array([0.3, -1.2, 2.0])
    jax.test_util.check_grads(f, (x,), 1)
    jaxcheck.check_grads(f, (x,), 1)
    report = jaxcheck.verify(f, x)
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if q.startswith("params hold float64 NumPy")]
    assert said.startswith(
        "params hold float64 NumPy arrays while 64-bit types are off; with them on, fn "
        "raised (TypeError: Custom JVP rule must produce primal and tangent outputs with "
    ), said
    assert said.endswith(
        "so it was checked as jax runs it, with them off (params rounded to float32)"
    ), said

    @jax.custom_jvp
    def g(x):  # wrong, and raising in float64 too: the float64 error is the one raised
        return jnp.sin(x)

    g.defjvp(lambda p, t: (jnp.sin(p[0]), (p[0] * t[0]).astype(jnp.float32)))
    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        jaxcheck.check_grads(g, (x,), 1)


def _exp_halved_below_zero(bug: float):
    @jax.custom_jvp
    def f(x):
        return jnp.exp(x)

    f.defjvp(lambda p, t: (jnp.exp(p[0]), jnp.where(p[0] < 0, bug, 1.0) * jnp.exp(p[0]) * t[0]))
    return f


@pytest.mark.parametrize("bug", [1.0, 0.5])
def test_an_error_in_output_entries_far_smaller_than_their_neighbours_fails(bug):
    """exp over [-10, 10], outputs spanning 1e9, its jvp halved for x < 0: the relative
    error of the whole output leaf was 1e-9, and the check passed, where JAX's, comparing
    entry by entry, fails it. Entries are weighed by their derivatives (up to 32-fold)."""
    f = _exp_halved_below_zero(bug)
    x = jnp.linspace(-10.0, 10.0, 21)
    if bug == 1.0:
        jaxcheck.check_grads(f, (x,), 1)
        return
    with pytest.raises(jaxcheck.GradientCheckError) as caught:
        jaxcheck.check_grads(f, (x,), 1)
    report = caught.value.report
    assert report.status == "fail" and report.relative_error > 1e-4, str(report)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_wrong_sign_beside_an_output_entry_1e7_times_larger_fails(sign):
    @jax.custom_jvp
    def s(x):
        return jnp.sin(x)

    s.defjvp(lambda p, t: (jnp.sin(p[0]), sign * jnp.cos(p[0]) * t[0]))

    def f(x):
        return jnp.stack([1e7 * jnp.sin(x[0]), s(x[1])])

    report = jaxcheck.verify(f, jnp.array([0.4, 0.7]), mode="both")
    assert report.status == ("pass" if sign == 1.0 else "fail"), str(report)


@pytest.mark.parametrize("bug", [False, True])
def test_a_kink_in_one_of_600_entries_leaves_the_others_judged(bug):
    """|x| (as max(x, -x)) at 0 in one entry of 600: the search for the kinks' entries
    moved at most 256 entries, so a check of 257 or more was not judged, and a gradient
    half wrong elsewhere (x * stop_gradient(x)) went unseen where JAX's check fails it."""
    x = jnp.linspace(0.1, 1.5, 600).at[300].set(0.0)

    def f(x):
        return jnp.maximum(x, -x) + x * (jax.lax.stop_gradient(x) if bug else x)

    outcome = _check_grads.run(f, (x,), 1)
    assert outcome.verdict == ("fail" if bug else "pass"), outcome.headline
    assert outcome.report.problems[0].startswith(
        "f has a kink (one-sided slopes that differ) at 1 argument entry"
    ), outcome.report.problems[0]


def test_an_infinite_atol_is_capped_as_others_are():
    """JAX's check takes atol=np.inf (and passes anything); it was refused as not finite."""
    outcome = _check_grads.run(jnp.sin, (np.array([0.3, 1.0]),), 1, atol=np.inf)
    assert outcome.verdict == "pass"
    assert outcome.report.problems[0].startswith(
        "tolerance capped: atol=inf (at f's scale a relative error of inf) was taken as 0.5"
    ), outcome.report.problems[0]

    @jax.custom_jvp
    def sin(x):
        return jnp.sin(x)

    sin.defjvps(lambda t, ans, x: -jnp.cos(x) * t)  # the wrong sign: fails whatever atol
    with pytest.raises(jaxcheck.GradientCheckError):
        jaxcheck.check_grads(sin, (np.array([0.3, 1.0]),), 1, atol=np.inf)
    for bad in (np.nan, -1.0):
        wrong = rf"^check_grads: atol must be a number >= 0, got {bad}"
        with pytest.raises(ValueError, match=wrong):
            jaxcheck.check_grads(jnp.sin, (np.array([0.3]),), 1, atol=bad)


@pytest.mark.parametrize("slope", [0.5, 2.0])
def test_a_derivative_at_a_kink_outside_the_one_sided_slopes_fails(slope):
    """A custom relu whose derivative at 0 is 2 returned quietly where every argument entry
    is at the kink (nothing left to judge once they are held), though JAX's check_grads
    fails it; 1/2, between the one-sided slopes 0 and 1, passes."""

    relu = relu_sloped_at_zero(slope)
    f = lambda x: 3.0 * relu(x)  # noqa: E731
    if slope == 0.5:
        jaxcheck.check_grads(f, (jnp.float32(0.0),), 1, modes=("rev",))
        return
    with pytest.raises(jaxcheck.GradientCheckError) as info:
        jaxcheck.check_grads(f, (jnp.float32(0.0),), 1, modes=("rev",))
    assert info.value.report.problems[0] == (
        "f's derivative at the argument entry where f has a kink is not between its "
        "one-sided slopes there, nor within the derivatives at points nearby (no step of "
        "finite differences gives it; JAX's check_grads fails it too): "
        "at entry 0 of float leaf 0 of the arguments, 6 against slopes 0 "
        "(below) and 3 (above)"
    )


@pytest.mark.parametrize(
    ("f", "args"),
    [
        (
            lambda x: jnp.dot(jax.lax.top_k(x, 2)[0], jnp.asarray([1.0, 3.0])),
            (jnp.asarray([1.0, 1.0, 1.0, 0.0]),),
        ),
        (jax.lax.cummax, (jnp.asarray([1.0, 1.0, 0.0, 1.0]),)),
        (
            lambda x, y: jnp.sum(
                jax.nn.relu(x - 0.9996) - 2 * jax.nn.relu(x - 1.0004) + jnp.maximum(y, 0.0)
            ),
            (jnp.ones(1), jnp.zeros(1)),
        ),
    ],
    ids=["top_k-tie-of-three", "cummax-ties", "kinks-within-the-step"],
)
def test_a_derivative_that_is_a_limit_of_gradients_nearby_is_not_outside_the_slopes(f, args):
    """At a tie of three entries JAX's derivative is the limit of gradients where they move
    together (top_k's [1, 3, 0, 0]), which moving each entry alone never shows; and a
    float32 step that spans two kinks 8e-4 apart measures slopes the ramp between them
    does not have. Both were failed as outside the one-sided slopes (JAX's check passes
    the ramp; at the ties both fail)."""
    jaxcheck.check_grads(f, args, 1)


@jax.custom_jvp
def _relu_twice(x):
    return jnp.maximum(x, 0.0)


_relu_twice.defjvp(lambda p, t: (_relu_twice(p[0]), jnp.where(p[0] > 0, 2.0, 0.0) * t[0]))


@pytest.mark.parametrize("loose", [False, True])
def test_a_failures_headline_says_why_in_check_grads_terms(loose):
    """The one-line headline (the plugin's summary) quoted the first note: at a point with
    an entry on the kink, that the directions crossing it were left out, and under loose
    tolerances the note that they were capped, not the wrong rule that failed it."""
    tolerances = {"atol": 1.0, "rtol": 1.0} if loose else {}
    x = np.array([0.0, 0.5, 1.0, 1.5], np.float32)
    outcome = _check_grads.run(lambda x: jnp.sum(_relu_twice(x) ** 2), (x,), 1, **tolerances)
    assert outcome.verdict == "fail"
    tolerance = "5.0e-01" if loose else "1.0e-05"
    # (with the automatic rule checks, the wrong rule named would come first)
    why = "wrong: [0]" if loose else "the derivative under test is 2 times f's along every"
    assert outcome.headline.startswith(
        f"fail; relative error 1.0e+00 (tolerance {tolerance}); {why}"
    ), outcome.headline
    # at order 2, the part's label too ("order 1: fn")
    second = _check_grads.run(lambda x: jnp.sum(_relu_twice(x) ** 2), (x + 1,), 2, **tolerances)
    assert second.verdict == "fail"
    assert second.headline.startswith("fail; order 1: f; relative error"), second.headline


@pytest.mark.parametrize("factor", [1.0, 1.001])
@pytest.mark.parametrize("modes", [("fwd",), ("rev",), ("fwd", "rev")])
def test_a_scalar_output_beside_a_large_one_counts(factor, modes):
    """fn returns (loss, predictions), 2048 of them, and only the loss's derivative is
    0.1 % off: JAX's check_grads, comparing each output, fails it; in a projection over all
    outputs the scalar weighed a forty-fifth of the predictions, and it passed."""

    @jax.custom_jvp
    def sq(x):
        return x**2

    sq.defjvp(lambda p, t: (p[0] ** 2, 2 * p[0] * t[0] * factor))
    w = jnp.sin(jnp.arange(512.0)).reshape(8, 64) * 0.3
    x = jnp.cos(jnp.arange(256.0)).reshape(32, 8)
    y = jnp.sin(3.0 * jnp.arange(2048.0)).reshape(32, 64)

    def f(w):
        h = jnp.tanh(x @ w)
        return jnp.mean(sq(h - y)), h

    if factor == 1.0:
        jaxcheck.check_grads(f, (w,), 1, modes=modes)
    else:
        with pytest.raises(jaxcheck.GradientCheckError, match="WRONG"):
            jaxcheck.check_grads(f, (w,), 1, modes=modes)


def test_a_float_order_counts_down_as_in_jax():
    """JAX's check_grads takes order=1.5 (it checks the derivatives of the derivative
    maps while the order is above 1, counting down by one): a test passing so failed
    under the plugin with "order must be an int"; 1.5 checks what 2 does."""
    wrong = sin_with_second_derivative(1.1)
    jax.test_util.check_grads(jnp.sin, (X,), 1.5)
    assert jaxcheck.check_grads(jnp.sin, (X,), 1.5) is None
    assert jaxcheck.check_grads(wrong, (X,), 1) is None
    with pytest.raises(jaxcheck.GradientCheckError, match="order 2"):
        jaxcheck.check_grads(wrong, (X,), 1.5)


def test_notes_of_a_failure_speak_of_args():
    """verify's words leaked into check_grads' failures: "params hold float64 NumPy
    arrays" where check_grads has args."""
    with pytest.raises(AssertionError) as info:
        jaxcheck.check_grads(lambda x: jnp.sum(scaled_sin(1.1)(x)), (np.linspace(0.1, 1, 4),), 1)
    assert "! args hold float64 NumPy arrays while 64-bit types are off" in str(info.value)
    assert "params hold" not in str(info.value)


@jax.custom_jvp
def _norm_dropping_eps(v, eps):
    return jnp.sqrt(jnp.sum(v**2) + eps)


@_norm_dropping_eps.defjvp
def _norm_dropping_eps_jvp(primals, tangents):
    (v, eps), (dv, _) = primals, tangents
    return _norm_dropping_eps(v, eps), jnp.sum(v * dv) / jnp.sqrt(jnp.sum(v**2))  # (no eps)


@pytest.mark.parametrize("case", ["labels", "finfo", "mixed product"])
def test_data_f_closes_over_keeps_its_dtype_when_taken_as_an_argument(case):
    """Closed-over arrays taken as arguments of the check's programs were cast to float64
    for the reference, as arguments are, where as f's constants they kept their dtype:
    float32 labels compared with 0.1 chose the other branch (a right gradient failed at
    relative error 0.85), a rule dropping finfo(x.dtype).eps passed (eps was float64's),
    and float32 data in lax.mul beside a cast failed to run in float64 (a stop_gradient
    2.5e-5 off passed at float32 resolution). They keep their dtype now, as constants
    did, and each is judged as before they were taken as arguments."""
    if case == "labels":
        with enable_x64(True):
            labels = jnp.array([0.1, 0.9, 0.1], jnp.float32)
            f = lambda w: jnp.sum(jnp.where(labels == 0.1, 2.0 * w**2, w**2))  # noqa: E731
            assert jaxcheck.check_grads(f, (jnp.array([0.3, 0.7, 1.1]),), 1) is None
        return
    if case == "finfo":
        x = jnp.ones(3, jnp.float32)
        f = lambda w: _norm_dropping_eps(w * x, jnp.finfo(x.dtype).eps)  # noqa: E731
        w = jnp.array([1e-4, 2e-4, -3e-4], jnp.float32)
    else:
        x = jnp.array([1.5, 2.5, 3.5, 1.25], jnp.float32)

        def f(w):
            term = 3e-5 * lax.stop_gradient(w) ** 2  # (its gradient cut off: 2.5e-5 off)
            return jnp.sum(jnp.sin(lax.mul(w.astype(jnp.float32), x)) + term)

        w = jnp.array([0.3, 0.7, 1.1, 0.2], jnp.float32)
    with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
        jaxcheck.check_grads(f, (w,), 1)


@pytest.mark.parametrize("writes", ["cell", "dict entry"])
def test_a_function_writing_to_what_it_closes_over_is_told_it_leaks(writes):
    """f storing a traced value in what it closes over (nonlocal x; x = x * 1.0, or an
    entry of a dict) leaks it: the check said so, until f's cells were replaced by
    arguments, where the writes went to copies and the check passed (f broken afterwards
    all the same)."""
    x = jnp.array([1.5, 2.5, 3.5], jnp.float32)
    state = {"x": x}

    def f(w):
        nonlocal x
        if writes == "cell":
            x = x * 1.0
            return jnp.sum(w * x)
        state["x"] = state["x"] / jnp.linalg.norm(state["x"])
        return jnp.sum(jnp.sin(w) * state["x"])

    with pytest.raises(TypeError, match="f leaks a value it traced"):
        jaxcheck.check_grads(f, (jnp.array([0.3, 0.7, 1.1], jnp.float32),), 1)


def test_data_a_callback_reads_and_contents_changed_in_place_stay_as_they_are():
    """A host callback reading the data f closes over (a log line, a table np.interp
    reads) read it traced once it was taken as an argument, and the check raised; a dict
    whose entries a test changed between two checks of the same f kept the first check's
    decision, and a reduce_window over a traced init raised. Both are checked as f is."""
    x = jnp.array([1.5, 2.5, 3.5], jnp.float32)
    logged = []

    def logging(w):
        jax.debug.callback(lambda v: logged.append(float(np.sum(np.sin(v) * np.asarray(x)))), w)
        return jnp.sum(jnp.sin(w) * x)

    w = jnp.array([0.3, 0.7, 1.1], jnp.float32)
    assert jaxcheck.check_grads(logging, (w,), 1) is None and logged
    config = {}

    def configured(w):
        if "floor" in config:
            return jnp.sum(lax.reduce_window(w, config["floor"], lax.max, (2,), (1,), "VALID") ** 2)
        return jnp.sum(jnp.sin(w) * config["scale"])

    for entries in (
        {"scale": np.array([1.5, 2.5, 3.5], np.float32)},
        {"floor": np.array(-np.inf, np.float32)},
    ):
        config.clear()
        config.update(entries)
        assert jaxcheck.check_grads(configured, (w,), 1) is None
