"""verify_rule: planted rule bugs, each caught by the property it breaks; real rules pass."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.custom_batching import custom_vmap

import jaxcheck
from cases import relu_sloped_at_zero

X = jnp.linspace(-2.0, 2.0, 5)


def failed(report) -> set:
    return {p.label for p in report.parts if p.status == "fail"}


def sin_vjp(bwd, fwd_out=jnp.sin, residual=lambda x: x):
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (fwd_out(x), residual(x)), bwd)
    return f


def test_correct_custom_vjp_passes_with_every_row():
    report = jaxcheck.verify_rule(sin_vjp(lambda x, g: (g * jnp.cos(x),)), X)
    assert report.ok, report
    assert [c.passed for c in report.checks] == [True] * len(report.checks)
    assert {p.label for p in report.parts} >= {
        "primal",
        "vjp vs finite differences",
        "cotangent types",
        "vmap",
        "jit",
        "checkpoint",
    }
    assert "custom_vjp function, which has no forward mode" in str(report)
    # the headline's numbers are those of the finite differences, and labelled so (they
    # were labelled "primal", the first part, whose difference is 0)
    first, numbers = str(report).splitlines()[:2]
    assert first == (
        "jaxcheck.verify_rule: PASS — derivatives of the rule are consistent with finite "
        "differences"
    )
    vjp = next(p for p in report.parts if p.label == "vjp vs finite differences")
    assert report.relative_error == vjp.relative_error > 0
    assert numbers.startswith("  vjp vs finite differences: relative error ")


def _sum_rule(on_cotangent):
    """sum(sin(x) * y), a custom_vjp whose bwd passes its cotangent g through
    `on_cotangent` first."""

    @jax.custom_vjp
    def f(x, y):
        return jnp.sum(jnp.sin(x) * y)

    def bwd(res, g):
        g = on_cotangent(g)
        return g * jnp.cos(res[0]) * res[1], g * jnp.sin(res[0])

    f.defvjp(lambda x, y: (f(x, y), (x, y)), bwd)
    return f


@pytest.mark.parametrize(
    "name, on_cotangent",
    [
        ("g * |g|", lambda g: g * jnp.abs(g)),
        ("|g|", jnp.abs),
        ("linear", lambda g: g),
    ],
)
def test_a_scalar_rule_not_linear_in_its_cotangent_fails(name, on_cotangent):
    """A custom_vjp of one scalar output has no jvp rows: its bwd met the cotangent 1 only
    (and 2 inside models), where g * |g| and |g| are g, and verify_rule passed them (|g|
    passed verify and check_grads too)."""
    rule = _sum_rule(on_cotangent)
    x, y = jnp.linspace(-1.0, 1.0, 5), jnp.linspace(0.3, 0.9, 5)
    report = jaxcheck.verify_rule(rule, x, y)
    if name == "linear":
        assert report.status == "pass", str(report)
        return
    assert report.status == "fail", str(report)
    assert "linearity: derivative at cotangent -2, halved" in str(report)
    assert jaxcheck.verify(lambda p: rule(*p), (x, y)).status == "fail"
    with pytest.raises(AssertionError, match="FAIL"):
        jaxcheck.check_grads(rule, (x, y), 1, modes=["rev"])
    # the row keeps its name in an order-2 check (it read "order 1: linearity: (fn)")
    report = jaxcheck.verify(lambda p: rule(*p), (x, y), order=2)
    assert "order 1: linearity: derivative at cotangent -2, halved, vs at cotangent 1 (fn)" in [
        c.name for c in report.checks
    ]
    # and its headline the gap's, not a relative error with a noise floor of 0
    assert str(report).splitlines()[1].startswith("  order 1: fn: relative gap ")


def test_fwd_primal_differs_from_the_function():
    f = sin_vjp(lambda x, g: (g * jnp.cos(x),), fwd_out=lambda x: 1.01 * jnp.sin(x))
    report = jaxcheck.verify_rule(f, X)
    assert failed(report) == {"primal"}
    assert "FAIL — primal is WRONG" in str(report)
    assert "primal: the rule's forward pass vs f: relative difference 1.0e-02" in str(report)


def test_wrong_residual():
    # saves sin(x) where bwd expects x
    f = sin_vjp(lambda r, g: (g * jnp.cos(r),), residual=jnp.sin)
    report = jaxcheck.verify_rule(f, X)
    assert "vjp vs finite differences" in failed(report)
    assert "wrong: args[0]" in str(report)


def test_missing_factor_in_bwd():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(2.0 * x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * jnp.cos(2.0 * x),))  # misses the 2
    report = jaxcheck.verify_rule(f, X)
    assert failed(report) == {"vjp vs finite differences"}
    part = report.parts[1]
    assert part.relative_error == pytest.approx(0.5, rel=0.3)
    assert "vjp vs finite differences is WRONG" in str(report)


def test_bwd_ignores_the_cotangent_of_one_output():
    @jax.custom_vjp
    def f(x, y):
        return {"s": jnp.sin(x) * y, "c": jnp.cos(x)}

    def bwd(res, g):
        x, y = res
        return g["s"] * jnp.cos(x) * y, g["s"] * jnp.sin(x)  # forgets -g["c"] sin(x)

    f.defvjp(lambda x, y: (f(x, y), (x, y)), bwd)
    report = jaxcheck.verify_rule(f, X, X + 3.0)
    assert failed(report) == {"vjp vs finite differences"}
    wrong = [leaf.path for leaf in report.parts[1].leaves if leaf.status == "fail"]
    assert wrong == ["args[0]"]  # y's cotangent is right


def test_wrong_only_for_negative_inputs():
    f = sin_vjp(lambda x, g: (g * jnp.where(x < 0, -jnp.cos(x), jnp.cos(x)),))
    assert jaxcheck.verify_rule(f, jnp.linspace(0.5, 2.0, 5)).ok
    report = jaxcheck.verify_rule(f, X)
    assert failed(report) == {"vjp vs finite differences"}


def _relu_with_slope(positive):
    @jax.custom_vjp
    def relu(x):
        return jnp.maximum(x, 0.0)

    relu.defvjp(lambda x: (relu(x), x), lambda x, g: (g * jnp.where(x > 0, positive, 0.0),))
    return relu


@pytest.mark.parametrize(("slope", "status"), [(1.0, "pass"), (1.05, "fail")])
def test_an_input_at_the_rules_kink_is_held_and_the_others_judged(slope, status):
    """One entry at relu's kink (a zero-padded row) left every direction non-smooth, and a
    slope 5 % off at the three others inconclusive; JAX's check_grads, which moves every
    entry by one step, sees it."""
    report = jaxcheck.verify_rule(_relu_with_slope(slope), jnp.asarray([0.0, 0.5, -0.3, 1.2]))
    assert report.status == status, str(report)
    assert (
        "the rule has a kink (one-sided slopes that differ) at 1 input entry, found by moving "
        "each entry alone; its derivative was judged at the other entries, holding those fixed"
        in report.problems
    )
    if status == "fail":
        assert failed(report) == {"vjp vs finite differences"}


@pytest.mark.parametrize(
    ("slope", "status"),
    [(0.0, "pass"), (0.5, "pass"), (1.0, "pass"), (2.0, "fail"), (-1.0, "fail")],
)
def test_a_rules_derivative_at_its_kink_is_between_its_one_sided_slopes(slope, status):
    """relu's derivative at 0 given as 2 (or -1), outside the one-sided slopes 0 and 1: the
    entry at the kink was held fixed and the others passed (JAX's check_grads fails it).
    Any value between them (0, 1/2, 1: the conventions in use) passes."""
    report = jaxcheck.verify_rule(relu_sloped_at_zero(slope), jnp.asarray([0.0, 0.5, -0.3, 1.2]))
    assert report.status == status, str(report)
    if status == "pass":
        return
    assert report.problems[2] == (
        "f's derivative at the argument entry where f has a kink is not between its "
        "one-sided slopes there, nor within the derivatives at points nearby (no step of "
        "finite differences gives it; JAX's check_grads fails it too): "
        f"at entry 0 of float leaf 0 of the arguments, {slope:.4g} against "
        "slopes 0 (below) and 1 (above)"
    ), str(report)
    [row] = [c for c in report.checks if c.name.endswith("derivative at kinks vs one-sided slopes")]
    assert not row.passed and row.relative_error == pytest.approx(1.0, rel=0.02)


def _maxpool(share: bool):
    """A window-2 max pool as a custom_vjp whose bwd gives the gradient whole to every
    entry equal to the max (wrong at a tie), or shares it among them (right)."""

    @jax.custom_vjp
    def pool(h):
        return jnp.max(h.reshape(-1, 2, h.shape[-1]), 1)

    def bwd(res, g):
        h, y = res
        mask = (h.reshape(-1, 2, h.shape[-1]) == y[:, None, :]).astype(h.dtype)
        if share:
            mask = mask / jnp.sum(mask, 1, keepdims=True)
        return ((mask * g[:, None, :]).reshape(h.shape),)

    pool.defvjp(lambda h: (pool(h), (h, pool(h))), bwd)
    return pool


@pytest.mark.parametrize("share", [False, True])
def test_a_rule_judged_off_its_kinks_is_not_cleared_of_an_error_at_a_tie(share):
    """Edge padding repeats the last step, so its window holds two equal entries that
    always move together: fn is smooth there, and a bwd giving the gradient whole to both
    is wrong (fn's gradient 49 % off). The rule's own check holds its kink entries (the
    ties) fixed and passes: it was called fine, and fn's error "outside" the rules."""
    pool = _maxpool(share)
    x = jax.random.normal(jax.random.PRNGKey(0), (7, 3))
    p = {"w": jax.random.normal(jax.random.PRNGKey(1), (3, 4)) * 0.5}

    def loss(p, x):
        h = jnp.pad(jnp.tanh(x @ p["w"]), ((0, 1), (0, 0)), mode="edge")
        return jnp.mean(pool(h) ** 2)

    report = jaxcheck.verify(loss, p, x)
    if share:
        assert report.status == "pass", str(report)
        return
    assert report.status == "fail", str(report)
    assert not [q for q in report.problems if q.startswith("rules fine")], str(report)
    [said] = [q for q in report.problems if q.startswith("a rule with kinks")]
    assert said.startswith(
        "a rule with kinks at the inputs fn gives it was judged with the input entries at "
        "them held fixed, so it is not cleared of fn's error: custom_vjp pool at "
    ), said
    [row] = [c for c in report.checks if c.name.startswith("rule custom_vjp pool")]
    assert row.name.endswith(": no error found off its kinks"), row.name


def test_a_wrong_rule_at_a_zero_padded_row_is_named_inside_a_model():
    relu = _relu_with_slope(1.05)
    x = jnp.concatenate([jnp.zeros((1, 3)), jnp.linspace(-1.0, 1.0, 9).reshape(3, 3)])
    params = {
        "w": 0.4 * jnp.cos(jnp.arange(6.0)).reshape(3, 2),
        "b": jnp.zeros(2),
        "v": jnp.asarray([0.5, -1.0]),
    }
    loss = lambda p, x: jnp.sum((relu(x @ p["w"] + p["b"]) @ p["v"]) ** 2)  # noqa: E731
    report = jaxcheck.verify(loss, params, x)
    assert report.status == "fail", str(report)
    [named] = [q for q in report.problems if q.startswith("wrong rule: custom_vjp relu")]
    assert "vjp vs finite differences, relative error 5.0e-02" in named


def test_custom_jvp_with_a_nonlinear_tangent():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0] ** 2))
    report = jaxcheck.verify_rule(f, X)
    assert "jvp linearity" in failed(report)
    assert "jvp linear in the tangents: jvp(a v + b w) vs a jvp(v) + b jvp(w): relative" in str(
        report
    )
    # the headline is a measured error, not the inf of the vjp row that JAX could not
    # transpose
    assert "relative error inf" not in str(report).splitlines()[1], str(report)
    assert np.isfinite(report.relative_error) and report.relative_error > 0.1
    assert report.tolerance < 1e-3


@pytest.mark.rules_auto
def test_a_nonlinear_tangent_inside_a_model_checked_forward_shows_a_measured_error():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0] * jnp.abs(t[0])))
    loss = lambda p: jnp.sum(f(p["w"]) ** 2)  # noqa: E731
    report = jaxcheck.verify(loss, {"w": jnp.linspace(0.1, 1.0, 5)}, mode="forward")
    assert report.status == "fail", str(report)
    [named] = [q for q in report.problems if q.startswith("wrong rule: custom_jvp f")]
    assert "jvp linearity" in named and "relative error inf" not in named, named
    [row] = [c for c in report.checks if c.name.startswith("rule custom_jvp f")]
    assert np.isfinite(row.relative_error) and np.isfinite(row.tolerance), row


def test_custom_jvp_whose_transpose_disagrees():
    # the tangent goes through a linear solve whose transpose_solve is wrong: jvp is right,
    # the vjp JAX derives from it is not
    @jax.custom_jvp
    def f(x):
        return 3.0 * x

    @f.defjvp
    def f_jvp(primals, tangents):
        tangent = lax.custom_linear_solve(
            lambda y: y / 3.0,
            tangents[0],
            solve=lambda matvec, b: 3.0 * b,
            transpose_solve=lambda matvec, b: 2.0 * b,
        )
        return 3.0 * primals[0], tangent

    report = jaxcheck.verify_rule(f, X)
    assert {"transpose", "vjp vs finite differences"} <= failed(report)
    assert "jvp linearity" not in failed(report)
    assert "transpose: <u, J v> by jvp vs <J^T u, v> by vjp: relative difference" in str(report)


def test_rule_wrong_only_under_vmap():
    @custom_vmap
    def passthrough(g):
        return g

    @passthrough.def_vmap
    def _(axis_size, in_batched, g):
        return g + jnp.mean(g, axis=0), True  # mixes the examples of a batch

    f = sin_vjp(lambda x, g: (passthrough(g * jnp.cos(x)),))
    report = jaxcheck.verify_rule(f, X)
    assert "vmap" in failed(report)
    assert {"jit", "checkpoint", "primal"}.isdisjoint(failed(report))
    assert "vmap: primal, vjp under jax.vmap vs example by example: relative" in str(report)


def test_rule_wrong_only_in_float32():
    f = sin_vjp(lambda x, g: (g * jnp.cos(x) * (1.01 if g.dtype == jnp.float32 else 1.0),))
    report = jaxcheck.verify_rule(f, X)
    # the float32 vjp keeps its 1e-2 gap to the float64 one when x moves by a few ulps:
    # no rounding, so it is judged against float64 finite differences as it is
    assert failed(report) == {"vjp vs finite differences"}
    assert "its program in float32 is not the one in float64" in str(report)


def test_cotangent_of_the_wrong_dtype():
    f = sin_vjp(lambda x, g: ((g * jnp.cos(x)).astype(jnp.bfloat16),))
    report = jaxcheck.verify_rule(f, X)
    assert "cotangent types" in failed(report)
    assert "cotangent types: args[0]: cotangent bfloat16[5], expected float32[5]" in str(report)


def _two_inputs_one_cotangent():
    @jax.custom_vjp
    def f(x, y):
        return jnp.sin(x) * y

    f.defvjp(lambda x, y: (f(x, y), (x, y)), lambda r, g: (g * jnp.cos(r[0]) * r[1],))
    return f


def _fwd_without_residuals():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(jnp.sin, lambda x, g: (g,))
    return f


def _jvp_tangent_of_another_dtype():
    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (jnp.sin(p[0]), (jnp.cos(p[0]) * t[0]).astype(jnp.float16)))
    return f


@pytest.mark.parametrize(
    ("make", "inputs", "said"),
    [
        # the missing comma of (g,): JAX refuses the rule outright
        (lambda: sin_vjp(lambda x, g: g * jnp.cos(x)), (X,), "TypeError: Custom VJP bwd rule"),
        (lambda: sin_vjp(lambda x, g: ((g * jnp.cos(x))[:, None],)), (X,), "ValueError: "),
        (_two_inputs_one_cotangent, (X, X), "TypeError: Custom VJP bwd rule"),
        (_fwd_without_residuals, (X,), "TypeError: Custom VJP fwd"),
        (_jvp_tangent_of_another_dtype, (X,), "TypeError: Custom JVP rule"),
    ],
)
def test_a_rule_jax_cannot_run_is_refused_not_called_wrong(make, inputs, said):
    """Every row would fail with JAX's one error, and the headline said "primal is WRONG"
    (tolerance inf) of a rule whose primal is right but whose derivative cannot run."""
    with pytest.raises(TypeError) as caught:
        jaxcheck.verify_rule(make(), *inputs)
    message = str(caught.value)
    assert message.startswith(
        "verify_rule: JAX cannot differentiate f at these inputs, so no property of its rule "
        f"can be checked. jax.vjp(f) raises {said}"
    ), message
    assert "\nFix the rule first: a custom_vjp's fwd returns (output, residuals)" in message


@pytest.mark.parametrize("args", [((X,),), (X, X)], ids=["wrapped-in-a-tuple", "one-too-many"])
def test_inputs_f_itself_refuses_are_blamed_not_the_rule(args):
    """The rule was told to be fixed ("JAX cannot differentiate f at these inputs ... Fix
    the rule first") where f(*args) itself cannot run."""
    with pytest.raises(TypeError) as caught:
        jaxcheck.verify_rule(sin_vjp(lambda x, g: (g * jnp.cos(x),)), *args)
    message = str(caught.value)
    assert message.startswith(
        f"verify_rule: f itself cannot be called at these inputs, f(*args) with {len(args)} "
        "argument(s) ("
    ), message
    assert message.endswith(
        "verify_rule(f, *args) passes args to f as they are, f(*args): for f(x), call "
        "verify_rule(f, x), not verify_rule(f, (x,))."
    ), message


def test_integer_input_gets_float0_and_nondiff_argnums_are_held_fixed():
    @jax.custom_vjp
    def power(x, n):
        return x**n

    power.defvjp(lambda x, n: (x**n, (x, n)), lambda r, g: (g * r[1] * r[0] ** (r[1] - 1), None))
    assert jaxcheck.verify_rule(power, X, 3).ok

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def scaled(k, x):
        return jnp.sin(k * x)

    scaled.defvjp(lambda k, x: (scaled(k, x), x), lambda k, x, g: (g * k * jnp.cos(k * x),))
    report = jaxcheck.verify_rule(scaled, 2.0, X)
    assert report.ok, report
    assert "nondiff_argnums [0] held fixed" in report.problems


def test_a_rule_checked_again_at_another_nondiff_value_is_checked_anew():
    """The finite-difference row's programs were keyed by the rule alone: a bwd that forgets
    beta, right at beta = 1, then passed at beta = 2 (it fails there in a fresh process)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def softplus(x, beta):
        return jnp.logaddexp(beta * x, 0.0) / beta

    softplus.defvjp(
        lambda x, beta: (softplus(x, beta), x), lambda beta, x, g: (g * jax.nn.sigmoid(x),)
    )
    x = jnp.linspace(-3.0, 3.0, 7)
    assert jaxcheck.verify_rule(softplus, x, 1.0).ok
    assert "vjp vs finite differences" in failed(jaxcheck.verify_rule(softplus, x, 2.0))


@pytest.mark.parametrize("first", ["model", "rule"])
def test_a_rule_checked_in_a_model_and_alone_is_right_both_ways(first):
    """A rule found in a model is called with its held argument closed over, and alone
    with it in its place: the two programs compute alike, and the second check ran the
    first one's jitted function at its own layout of arguments ("zip() argument 2 is
    shorter than argument 1"), failing a right rule's primal, vmap, jit and checkpoint."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def power(x, k):
        return x**k

    power.defvjp(lambda x, k: (x**k, x), lambda k, x, g: (g * k * x ** (k - 1),))
    xs = jnp.linspace(0.5, 2.0, 5)

    def model():
        return jaxcheck.verify(lambda p, x: jnp.sum(power(p * x, 2.0)), 0.7, xs, rules=True)

    def alone():
        return jaxcheck.verify_rule(power, xs, 2.0)

    for check in [model, alone] if first == "model" else [alone, model]:
        report = check()
        assert report.status == "pass", str(report)
        assert not any("zip()" in q or "could not be checked" in q for q in report.problems)


@pytest.mark.parametrize("factor", [1.0, 1.01])
def test_a_rule_at_inputs_masked_with_minus_inf_is_judged_at_the_others(factor):
    """A softmax rule at causal scores (-inf above the diagonal): the whole rule was said
    to be non-finite, with advice to pass the mask in *args, which verify_rule has not,
    and a rule 1 % off was never judged."""

    @jax.custom_vjp
    def softmax(s):
        return jax.nn.softmax(s, -1)

    softmax.defvjp(
        lambda s: (softmax(s), softmax(s)),
        lambda y, g: (factor * y * (g - jnp.sum(g * y, -1, keepdims=True)),),
    )
    mask = jnp.tril(jnp.ones((4, 4), bool))
    scores = jnp.where(mask, jnp.sin(jnp.arange(16.0).reshape(4, 4)), -jnp.inf)
    report = jaxcheck.verify_rule(softmax, scores)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert (
        "6 of the rule's input entries are NaN/Inf (a mask of -inf?): it is judged moving the "
        "others, those held at their values"
    ) in report.problems
    assert not any("belongs in *args" in q for q in report.problems), report.problems


def test_a_rule_returning_a_count_is_not_told_to_pass_has_aux():
    """A rule returning an integer count beside its value was told "pass has_aux=True",
    which verify_rule does not take."""

    @jax.custom_vjp
    def relu_count(x):
        return jnp.sum(jnp.maximum(x, 0.0)), jnp.sum(x > 0)

    relu_count.defvjp(lambda x: (relu_count(x), x), lambda x, g: ((x > 0) * g[0],))
    report = jaxcheck.verify_rule(relu_count, jnp.linspace(-2.0, 2.0, 6) + 0.1)
    assert report.status == "pass", str(report)
    assert not any("has_aux" in q for q in report.problems), report.problems


@pytest.mark.parametrize("factor", [1.0, 1.01])
def test_an_equinox_filter_custom_vjp_is_differentiated_in_its_first_argument(factor):
    """equinox differentiates a filter_custom_vjp in its first argument alone: asked for a
    tangent of the second, it raised, and verify_rule called a right rule broken."""
    eqx = pytest.importorskip("equinox")

    @eqx.filter_custom_vjp
    def scale(vjp_arg, s):
        return vjp_arg * s

    @scale.def_fwd
    def scale_fwd(perturbed, vjp_arg, s):
        return vjp_arg * s, None

    @scale.def_bwd
    def scale_bwd(res, g, perturbed, vjp_arg, s):
        return g * s * factor

    report = jaxcheck.verify_rule(scale, jnp.linspace(-1.0, 1.0, 8), 2.0)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert (
        "arguments [1] held fixed: an equinox filter_custom_vjp differentiates its first "
        "argument alone"
    ) in report.problems


def test_raise_on_failure_names_the_property():
    f = sin_vjp(lambda x, g: (2.0 * g * jnp.cos(x),))
    with pytest.raises(jaxcheck.GradientCheckError, match="vjp vs finite differences is WRONG"):
        jaxcheck.verify_rule(f, X, raise_on_failure=True)


def test_f_must_be_callable():
    with pytest.raises(TypeError, match="f must be callable, got int"):
        jaxcheck.verify_rule(3, X)


def test_order_2_fails_a_backward_pass_that_is_right_but_not_differentiable():
    f = sin_vjp(lambda x, g: (g * lax.stop_gradient(jnp.cos(x)),))
    assert jaxcheck.verify_rule(f, X).ok
    report = jaxcheck.verify_rule(f, X, order=2)
    assert failed(report) == {"vjp vs finite differences (order 2: vjp map)"}
    assert report.relative_error == pytest.approx(1.0, rel=0.05)
    assert jaxcheck.verify_rule(sin_vjp(lambda x, g: (g * jnp.cos(x),)), X, order=2).ok


@pytest.mark.parametrize("order", [0, 1.0, True])
def test_order_must_be_a_positive_int(order):
    with pytest.raises(ValueError, match=f"order must be an int >= 1, got {order!r}."):
        jaxcheck.verify_rule(jnp.sin, X, order=order)


def _optax_losses():
    optax = pytest.importorskip("optax")
    logits = jnp.asarray([[0.3, -1.2, 2.0], [1.0, 0.1, -0.4]])
    labels = jnp.asarray([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    return [
        (lambda z: optax.softmax_cross_entropy(z, labels), (logits,)),
        (lambda z: optax.huber_loss(z, labels), (logits,)),
        (lambda z: optax.sigmoid_binary_cross_entropy(z, labels), (logits,)),
    ]


A = jnp.asarray([[3.0, 0.5, 0.2], [0.1, 2.0, 0.3], [0.4, 0.2, 1.5]])
REAL_RULES = {
    "jax.nn.softplus": (jax.nn.softplus, (X,)),
    "jax.nn.gelu": (jax.nn.gelu, (X,)),
    "jax.nn.silu": (jax.nn.silu, (X,)),
    "jax.nn.logsumexp": (lambda x: jax.nn.logsumexp(x.reshape(5, 1), axis=0), (X,)),
    "jax.nn.softmax": (jax.nn.softmax, (X,)),
    "jnp.linalg.solve": (jnp.linalg.solve, (A, jnp.asarray([1.0, -2.0, 0.5]))),
    "jnp.linalg.slogdet": (lambda a: jnp.linalg.slogdet(a)[1], (A,)),
    "jnp.linalg.inv": (jnp.linalg.inv, (A,)),
}


@pytest.mark.parametrize("name", sorted(REAL_RULES))
def test_real_rules_pass(name):
    f, args = REAL_RULES[name]
    report = jaxcheck.verify_rule(f, *args)
    assert report.ok, report


def test_optax_losses_pass():
    for f, args in _optax_losses():
        report = jaxcheck.verify_rule(f, *args)
        assert report.ok, report


def test_equinox_module_call_passes():
    eqx = pytest.importorskip("equinox")
    layer = eqx.nn.Linear(3, 2, key=jax.random.key(1))
    report = jaxcheck.verify_rule(
        lambda w, x: (eqx.tree_at(lambda m: m.weight, layer, w))(x),
        layer.weight,
        jnp.asarray([0.5, -1.0, 2.0]),
    )
    assert report.ok, report


def test_float64_inputs_take_no_native_row(x64):
    f = sin_vjp(lambda x, g: (g * jnp.cos(x),))
    report = jaxcheck.verify_rule(f, np.linspace(-2.0, 2.0, 5))
    assert report.ok
    assert report.tested_dtype == "float64"
    assert not any("in float32" in p.label for p in report.parts)


def _interpreted(kernel, *xs):
    """A Pallas kernel run in interpret mode, its output shaped as its first input (tests
    calling it skip first where Pallas is missing)."""
    from jax.experimental import pallas as pl  # noqa: PLC0415 - only where it imports

    shape = jax.ShapeDtypeStruct(xs[0].shape, xs[0].dtype)
    return pl.pallas_call(kernel, out_shape=shape, interpret=True)(*xs)


def test_pallas_kernel_with_a_wrong_backward_is_named_in_the_model():
    pytest.importorskip("jax.experimental.pallas")

    def sin_kernel(x_ref, o_ref):
        o_ref[...] = jnp.sin(x_ref[...])

    def bwd_kernel(x_ref, g_ref, o_ref):
        o_ref[...] = g_ref[...] * jnp.cos(x_ref[...]) * 1.01  # 1 % off

    @jax.custom_vjp
    def kernel_sin(x):
        return _interpreted(sin_kernel, x)

    kernel_sin.defvjp(
        lambda x: (_interpreted(sin_kernel, x), x), lambda x, g: (_interpreted(bwd_kernel, x, g),)
    )
    x = jnp.linspace(-1.0, 1.0, 8)
    assert failed(jaxcheck.verify_rule(kernel_sin, x)) == {"vjp vs finite differences"}

    def loss(p, x):
        return jnp.mean(jnp.tanh(kernel_sin(x * p)) ** 2)

    report = jaxcheck.verify(loss, jnp.ones(8), x)
    wrong = next(p for p in report.problems if p.startswith("wrong rule:"))
    assert wrong.startswith("wrong rule: custom_vjp kernel_sin at ")
    assert "vjp vs finite differences, relative error 1.0e-02" in wrong


@pytest.mark.parametrize("out_dtype", ["declared", "inputs"])
def test_a_kernel_whose_out_shape_fixes_float32_is_said_to_round(out_dtype):
    """A Pallas kernel whose out_shape is float32 whatever its inputs rounds fn to float32
    in the float64 reference too: the report names the kernel's call and its declared
    dtype as the cause (it named nothing, while its tolerance rose to 7e-5); declared as
    the inputs' dtype, it follows them and nothing is said."""
    pl = pytest.importorskip("jax.experimental.pallas")

    def sin_kernel(x_ref, o_ref):
        o_ref[...] = jnp.sin(x_ref[...]).astype(o_ref.dtype)

    def kernel_sin(x):
        dtype = jnp.float32 if out_dtype == "declared" else x.dtype
        shape = jax.ShapeDtypeStruct(x.shape, dtype)
        return pl.pallas_call(sin_kernel, out_shape=shape, interpret=True)(x)

    x = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)
    report = jaxcheck.verify(
        lambda p: jnp.sum(kernel_sin(p * x) ** 2), jnp.full(8, 0.7), mode="forward"
    )
    assert report.status == "pass", str(report)
    said = [q for q in report.problems if q.startswith("fn rounds values computed from params")]
    if out_dtype == "inputs":
        assert not said, said
        return
    (said,) = said
    assert said.startswith("fn rounds values computed from params to float32 (")
    assert ", by the declared output dtype of a pallas_call), so it is a staircase" in said
    assert said.endswith(
        "(a kernel's or callback's out_shape fixes its output dtype whatever its inputs' "
        "dtype: declare it as that of the inputs, jax.ShapeDtypeStruct(x.shape, x.dtype), "
        "to have it follow them)"
    )


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_a_cast_inside_a_pallas_kernel_is_seen(factor):
    """A Pallas matmul that casts its operands to bfloat16 inside the kernel (and
    accumulates in float32): the kernel returns nothing and stores through its output ref,
    so its casts were taken for dead code, the float64 reference was a staircase of
    bfloat16 quanta judged at float64 steps, and a backward pass 50 % off passed ("the
    derivative is zero to within noise"). The cast is now found and named, and the check
    judges at bfloat16 resolution."""
    pl = pytest.importorskip("jax.experimental.pallas")

    def kernel(a_ref, b_ref, o_ref):
        a, b = a_ref[...].astype(jnp.bfloat16), b_ref[...].astype(jnp.bfloat16)
        o_ref[...] = jnp.dot(a, b, preferred_element_type=jnp.float32).astype(o_ref.dtype)

    def matmul(a, b):
        (m, k), n = a.shape, b.shape[1]
        return pl.pallas_call(  # (row blocks: XLA's CPU dot takes no bfloat16 pair unblocked)
            kernel,
            out_shape=jax.ShapeDtypeStruct((m, n), a.dtype),
            grid=(m // 8,),
            in_specs=[
                pl.BlockSpec((8, k), lambda i: (i, 0)),
                pl.BlockSpec((k, n), lambda i: (0, 0)),
            ],
            out_specs=pl.BlockSpec((8, n), lambda i: (i, 0)),
            interpret=True,
        )(a, b)

    @jax.custom_vjp
    def mm(a, b):
        return matmul(a, b)

    mm.defvjp(
        lambda a, b: (matmul(a, b), (a, b)),
        lambda r, g: (factor * matmul(g, r[1].T), factor * matmul(r[0].T, g)),
    )
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"a": jax.random.normal(k[0], (16, 16)), "b": jax.random.normal(k[1], (16, 16)) / 4}
    target = jax.random.normal(k[2], (16, 16))
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.tanh(mm(p["a"], p["b"])) * target), params)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    [said] = [q for q in report.problems if q.startswith("fn rounds values computed from params")]
    assert said.startswith("fn rounds values computed from params to bfloat16 ("), said
    assert ".<locals>.kernel)), so it is a staircase of bfloat16 quanta" in said, said


def test_a_cast_into_a_kernel_output_fn_drops_is_no_rounding():
    """A kernel that also writes a bfloat16 copy of its input to a second output, which fn
    drops: taken for rounding once writes into refs counted, it left a backward pass 30 %
    off inconclusive at bfloat16 resolution (and passed one 1 % off). Only what is written
    into outputs the caller uses counts."""
    pl = pytest.importorskip("jax.experimental.pallas")

    def kernel(x_ref, o_ref, copy_ref):
        copy_ref[...] = x_ref[...].astype(jnp.bfloat16)
        o_ref[...] = jnp.sin(x_ref[...])

    def sin_kernel(x):
        shapes = [
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
        ]
        return pl.pallas_call(kernel, out_shape=shapes, interpret=True)(x)[0]

    @jax.custom_vjp
    def psin(x):
        return sin_kernel(x)

    psin.defvjp(lambda x: (sin_kernel(x), x), lambda x, g: (1.01 * g * jnp.cos(x),))
    report = jaxcheck.verify(lambda x: jnp.sum(psin(x) ** 2), jnp.linspace(-1.0, 1.0, 16))
    assert report.status == "fail", str(report)
    assert report.tolerance < 1e-5, str(report)
    assert not any(q.startswith("fn rounds values") for q in report.problems), str(report)


def test_a_tangent_computed_by_a_pallas_kernel_is_said_to_have_no_reverse_mode():
    """A custom_jvp whose tangent is a Pallas kernel (linear in the tangent, but a kernel
    JAX cannot transpose): verify in reverse mode raised JAX's bare "AssertionError: must
    override" from inside the check; it now says why and that forward mode checks it."""
    pytest.importorskip("jax.experimental.pallas")

    def softmax_kernel(x_ref, o_ref):
        e = jnp.exp(x_ref[...] - jnp.max(x_ref[...], axis=1, keepdims=True))
        o_ref[...] = e / jnp.sum(e, axis=1, keepdims=True)

    def tangent_kernel(y_ref, t_ref, o_ref):
        y, t = y_ref[...], t_ref[...]
        o_ref[...] = y * (t - jnp.sum(y * t, axis=1, keepdims=True))

    @jax.custom_jvp
    def softmax(x):
        return _interpreted(softmax_kernel, x)

    @softmax.defjvp
    def _(primals, tangents):
        y = softmax(primals[0])
        return y, _interpreted(tangent_kernel, y, tangents[0])

    x = jax.random.normal(jax.random.PRNGKey(5), (4, 8))
    target = jax.random.normal(jax.random.PRNGKey(6), (4, 8))

    def loss(p):
        return jnp.sum(jnp.sin(softmax(p)) * target)

    with pytest.raises(ValueError) as info:
        jaxcheck.verify(loss, x)
    said = str(info.value)
    assert said.startswith("JAX could not form fn's reverse-mode derivative ("), said
    assert "fn computes a tangent with a pallas_call (a Pallas kernel or a callback" in said
    assert "verify(..., mode='forward') checks it in forward mode" in said
    assert jaxcheck.verify(loss, x, mode="forward").status == "pass"


def test_backward_rounded_to_bfloat16_fails_the_rule_and_the_model():
    @jax.custom_vjp
    def rounded_sin(x):
        return jnp.sin(x)

    def bwd(x, g):
        d = g * jnp.cos(x)
        if d.dtype == jnp.float32:  # silently through bfloat16: about 0.3 % off
            d = d.astype(jnp.bfloat16).astype(jnp.float32)
        return (d,)

    rounded_sin.defvjp(lambda x: (jnp.sin(x), x), bwd)
    x = jnp.linspace(-1.0, 1.0, 16)
    report = jaxcheck.verify_rule(rounded_sin, x)
    assert failed(report) == {"vjp vs finite differences"}
    # compiled, the round trip through bfloat16 may round differently (XLA on GPUs does):
    # jit, vmap and checkpoint agree with eager evaluation to a few bfloat16 quanta
    tolerances = {r.label: r.tolerance for r in report.parts}
    assert tolerances["jit"] == tolerances["vmap"] == pytest.approx(10 * 2.0**-7)
    assert tolerances["primal"] == pytest.approx(1000 * 2.0**-23)

    def loss(p, x):
        return jnp.mean(rounded_sin(x * p) ** 2)

    p = jnp.linspace(0.5, 1.5, 16)
    # alone, the all-leaf check sees that the gap to float64 is no float32 rounding (it does
    # not move when params move by a few ulps)
    assert jaxcheck.verify(loss, p, x, rules=False).status == "fail"
    for rules in ("auto", True):
        model = jaxcheck.verify(loss, p, x, rules=rules)
        assert model.status == "fail"
        assert any("moves by only" in q for q in model.problems)
        [wrong] = [q for q in model.problems if q.startswith("wrong rule:")]
        assert "custom_vjp rounded_sin at " in wrong
        assert ": vjp vs finite differences, relative error" in wrong


def sin_cos(zero_as):
    """(sin x, cos x) with a rule that takes symbolic zeros, and turns the one of the cos
    output into `zero_as(x)` (zeros: right)."""
    from jax.custom_derivatives import SymbolicZero  # noqa: PLC0415

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x), jnp.cos(x)

    def fwd(x):
        return (jnp.sin(x.value), jnp.cos(x.value)), x.value

    def bwd(x, g):
        gs, gc = g
        gs = jnp.zeros_like(x) if isinstance(gs, SymbolicZero) else gs
        gc = zero_as(x) if isinstance(gc, SymbolicZero) else gc
        return (gs * jnp.cos(x) - gc * jnp.sin(x),)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def test_rule_that_mishandles_a_symbolic_zero_fails_the_unused_outputs_row():
    report = jaxcheck.verify_rule(sin_cos(jnp.ones_like), X)
    assert failed(report) == {"unused outputs"}
    assert "unused outputs: vjp with one output used vs the others' cotangents zero: relative" in (
        str(report)
    )
    assert jaxcheck.verify_rule(sin_cos(jnp.zeros_like), X).ok


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "double"}, "precision must be one of ('auto', 'float64', 'native')"),
        ({"num_directions": 0}, "num_directions must be an int >= 4, got 0."),
        ({"rtol": -1.0}, "rtol must be a float in (0, 0.5] or None, got -1.0."),
        ({"leaf_directions": 0}, "leaf_directions must be an int >= 2, got 0."),
    ],
)
def test_bad_options_are_refused_not_reported_as_a_wrong_rule(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxcheck.verify_rule(jax.nn.softplus, jnp.linspace(-1.0, 1.0, 3), **options)


@pytest.mark.parametrize(
    ("f", "x", "message"),
    [
        (lambda i: i * 2, jnp.asarray([1, 2]), "f's inputs hold no floating-point array"),
        (
            lambda x: x > 0,
            jnp.asarray([1.0, -2.0]),
            "f returns no floating-point output (dtypes: bool)",
        ),
    ],
    ids=["integer input", "bool output"],
)
def test_nothing_to_differentiate_is_refused(f, x, message):
    with pytest.raises(ValueError, match=re.escape("verify_rule: " + message)):
        jaxcheck.verify_rule(f, x)


def test_a_typed_prng_key_input_is_batched_for_the_vmap_row():
    @jax.custom_vjp
    def dropout(x, key):
        return jnp.where(jax.random.bernoulli(key, 0.7, x.shape), x / 0.7, 0.0)

    def fwd(x, key):
        keep = jax.random.bernoulli(key, 0.7, x.shape)
        return jnp.where(keep, x / 0.7, 0.0), keep

    dropout.defvjp(fwd, lambda keep, g: (jnp.where(keep, g / 0.7, 0.0), None))
    report = jaxcheck.verify_rule(dropout, jnp.linspace(-1.0, 1.0, 8), jax.random.key(0))
    assert report.ok, str(report)
    assert "vmap" in [p.label.split(":")[0] for p in report.parts]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("factor", [1.0, 1.5])
def test_a_wrong_primal_fails_in_16_bit_dtypes_too(dtype, factor):
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (factor * jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))
    primal = jaxcheck.verify_rule(f, jnp.linspace(0.2, 1.0, 6).astype(dtype)).parts[0]
    assert primal.label.startswith("primal")
    assert primal.tolerance == pytest.approx(0.2)
    assert primal.status == ("pass" if factor == 1.0 else "fail")


def test_a_jvp_not_linear_in_its_tangent_is_said_to_have_no_vjp():
    """JAX cannot transpose such a jvp: every row that needs the vjp raised JAX's internal
    `AssertionError: (ValAccum(float32[3]), ...)`, quoted bare, and the report said the
    error (inf) was within its tolerance (inf) over all leaves together."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def _(primals, tangents):
        (x,), (dx,) = primals, tangents
        return f(x), jnp.cos(x) * dx * (1 + 0.01 * jnp.abs(dx))

    report = jaxcheck.verify_rule(f, jnp.array([0.3, -0.5, 1.1]))
    assert report.status == "fail"
    said = (
        "vjp vs finite differences: JAX could not transpose the rule's jvp into a vjp "
        "(AssertionError"
    )
    assert any(q.startswith(said) for q in report.problems), report.problems
    assert any(
        q.startswith("jvp linear in the tangents: ") and "relative difference 4.1e-03" in q
        for q in report.problems
    )
    assert "within the tolerance over all leaves together" not in str(report)


def _sine_with_a_looped_jvp(bug, only_in=None):
    """sin with a custom_jvp whose tangent goes through a while loop: JAX runs its jvp but
    cannot run it in reverse mode. `bug` applies in the dtype `only_in` alone if given."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    def jvp(primals, tangents):
        (x,), (t,) = primals, tangents

        def body(carry):
            i, total = carry
            return i + 1, total + 0.5 * jnp.cos(x) * t

        _, total = jax.lax.while_loop(lambda c: c[0] < 2, body, (0, jnp.zeros_like(t)))
        return f(x), total * (bug if only_in in (None, x.dtype) else 1.0)

    f.defjvp(jvp)
    return f


@pytest.mark.parametrize("bug", [1.0, 1.05])
def test_a_rule_without_reverse_mode_is_checked_by_its_jvp(bug):
    """Was: every row of the vjp failed (the rule cannot run in reverse mode), so a correct
    rule was called wrong, and inside a forward-mode check the rule went unchecked."""
    x = jnp.linspace(0.1, 1.0, 4)
    report = jaxcheck.verify_rule(_sine_with_a_looped_jvp(bug), x)
    rows = [(p.label, p.status.value) for p in report.parts]
    judged = "pass" if bug == 1.0 else "fail"
    assert rows == [
        ("primal", "pass"),
        ("jvp vs finite differences", judged),
        ("jvp linearity", "pass"),
        ("vmap", "pass"),
        ("jit", "pass"),
        ("checkpoint", "pass"),
    ]
    assert report.status == judged
    assert report.parts[1].relative_error == pytest.approx(bug - 1.0, abs=1e-6)
    [note] = [q for q in report.problems if q.startswith("f's jvp cannot run in reverse mode")]
    assert note.startswith(
        "f's jvp cannot run in reverse mode, so its finite differences check the jvp, and "
        "the rows of the vjp (transpose, cotangent types) were not checked (ValueError: "
        "Reverse-mode differentiation does not work for lax.while_loop"
    )
    # inside a model checked in forward mode, the rule is named after the same row
    f = _sine_with_a_looped_jvp(bug)
    model = jaxcheck.verify(lambda p: jnp.sum(f(p) ** 2), x, mode="forward", rules=True)
    assert model.status == judged
    rule_line = [q for q in model.problems if q.startswith(("wrong rule:", "rules fine:"))]
    if bug == 1.0:
        assert rule_line == [rule_line[0]] and rule_line[0].startswith("rules fine: custom_jvp f")
    else:
        assert rule_line[0].startswith("wrong rule: custom_jvp f at ")
        assert rule_line[0].endswith(
            "jvp vs finite differences, relative error 5.0e-02 (tolerance 1.2e-06)"
        )


def test_a_rule_without_reverse_mode_wrong_only_in_float32_fails_by_its_jvp():
    """The float64 row forgives a float32 rule its distance to itself in float64; the row
    in the inputs' own precision then ran in reverse mode, which the rule has not."""
    f = _sine_with_a_looped_jvp(1.001, only_in=jnp.float32)
    report = jaxcheck.verify_rule(f, jnp.linspace(0.1, 1.0, 4))
    assert report.status == "fail"
    last = report.parts[-1]
    assert (last.label, last.status) == ("jvp vs finite differences in float32", "fail")
    assert last.relative_error == pytest.approx(1e-3, rel=0.01)


def _callback_sinh(scale):
    def host_sinh(a):
        return np.sinh(a).astype(a.dtype)

    def host_bwd(a, g):
        return (scale * g * np.cosh(a)).astype(a.dtype)

    @jax.custom_vjp
    def f(x):
        return jax.pure_callback(host_sinh, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    def bwd(x, g):
        return (jax.pure_callback(host_bwd, jax.ShapeDtypeStruct(x.shape, x.dtype), x, g),)

    f.defvjp(lambda x: (f(x), x), bwd)
    return f


@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_a_rule_jax_cannot_batch_is_not_checked_under_vmap_nor_failed_for_it(scale):
    report = jaxcheck.verify_rule(_callback_sinh(scale), X.astype(jnp.float32))
    vmap = next(p for p in report.parts if p.label == "vmap")
    assert vmap.status == "pass" and not vmap.checks[0].judged
    assert any(
        p.startswith("vmap: not checked: the rule cannot be batched by jax.vmap (")
        and "vmap_method" in p
        for p in report.problems
    ), report.problems
    assert failed(report) == ({"vjp vs finite differences"} if scale != 1.0 else set())


def test_a_leaf_a_note_opens_with_is_named_as_an_argument():
    """verify_rule names its leaves args[i]: a note that opened with the leaf's path
    kept the bare [1] beside "wrong: args[1]"."""

    @jax.custom_vjp
    def scaled(x, y):
        return jnp.sin(x) * y

    scaled.defvjp(
        lambda x, y: (jnp.sin(x) * y, (x, y)), lambda r, g: (g * jnp.cos(r[0]) * r[1], None)
    )
    x = jnp.linspace(0.1, 0.9, 4)
    report = jaxcheck.verify_rule(scaled, x, x + 2)
    assert report.status == "fail", str(report)
    assert any(q.startswith("wrong: args[1]") for q in report.problems), report.problems
    assert any(
        q.startswith("args[1]: the derivative under test is exactly zero for this leaf")
        for q in report.problems
    ), report.problems
    assert not any(q.startswith("[") for q in report.problems), report.problems


def test_a_rule_report_counts_only_the_checks_that_take_directions():
    """verify_rule at order 2 printed "0 to 8 directions per check": its rows without
    finite differences (linearity, vmap, ...) take no directions."""

    @jax.custom_vjp
    def f(x, w):
        return jnp.sin(x * w)

    def bwd(r, g):
        x, w = r
        return g * jnp.cos(x * w) * w, jnp.sum(g * jnp.cos(x * w) * x)

    f.defvjp(lambda x, w: (jnp.sin(x * w), (x, w)), bwd)
    report = jaxcheck.verify_rule(f, jnp.linspace(-1.0, 1.2, 5), jnp.asarray(0.8), order=2)
    assert report.ok, str(report)
    assert 0 in {p.num_directions for p in report.parts}
    [line] = [q for q in str(report).splitlines() if "directions per check" in q]
    assert line.startswith("  8 directions per check, ")


def _float32_only_sin():
    """A custom_vjp sin that refuses any dtype but float32."""

    @jax.custom_vjp
    def f(x):
        if x.dtype != jnp.float32:
            raise TypeError("float32 only")
        return jnp.sin(x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * jnp.cos(x),))
    return f


def test_a_float32_only_rule_checked_alone_is_not_told_to_be_checked_alone():
    """verify_rule of a rule that refuses float64 said its resolution would be finer
    checked on its own, "rules=True, or jaxcheck.verify_rule": the call already running."""
    f = _float32_only_sin()
    report = jaxcheck.verify_rule(f, jnp.linspace(0.1, 1.0, 4))
    assert report.ok, str(report)
    [note] = [q for q in report.problems if "could not run in float64" in q]
    assert note == (
        "fn could not run in float64 (TypeError: float32 only); finite differences use "
        "float32, so the resolution is coarser"
    )


def test_a_model_refusing_float64_points_to_the_check_that_resolves_its_rule_finer():
    """The note of a model whose rule refuses float64 pointed to verify_rule too, which
    falls back to the rule's own precision as well; rules=True evaluates the rule's
    program, traced in fn, in float64."""
    f = _float32_only_sin()
    report = jaxcheck.verify(lambda p: jnp.sum(f(p) ** 2), jnp.linspace(0.1, 1.0, 4))
    [note] = [q for q in report.problems if "could not run in float64" in q]
    assert note == (
        "fn could not run in float64 (TypeError: float32 only); finite differences use "
        "float32, so the resolution is coarser (a custom rule inside, a Pallas kernel's say, "
        "is resolved more finely on its own: rules=True)"
    )
    finer = jaxcheck.verify(lambda p: jnp.sum(f(p) ** 2), jnp.linspace(0.1, 1.0, 4), rules=True)
    [row] = [c for c in finer.checks if c.name.startswith("rule custom_vjp f")]
    assert row.tolerance < 1e-4 < report.tolerance, str(finer)


@pytest.mark.parametrize("kind", ["custom_jvp", "custom_vjp"])
@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_a_rule_with_symbolic_zeros_is_checked_with_each_input_held(kind, scale):
    """With symbolic_zeros=True a rule runs other code where an input is not
    differentiated (a SymbolicZero tangent; a cotangent's input not `perturbed`): one 1 %
    off only there passed verify_rule on every key, as it differentiates every input."""
    if kind == "custom_jvp":

        @jax.custom_jvp
        def product(a, b):
            return a * jnp.sin(b)

        def jvp(primals, tangents):
            (a, b), (ta, tb) = primals, tangents
            if type(tb) is jax.custom_derivatives.SymbolicZero:
                return product(a, b), ta * jnp.sin(b) * scale
            if type(ta) is jax.custom_derivatives.SymbolicZero:
                return product(a, b), a * jnp.cos(b) * tb
            return product(a, b), ta * jnp.sin(b) + a * jnp.cos(b) * tb

        product.defjvp(jvp, symbolic_zeros=True)
    else:

        @jax.custom_vjp
        def product(a, b):
            return a * jnp.sin(b)

        def fwd(a, b):
            return a.value * jnp.sin(b.value), (a.value, b.value, b.perturbed)

        def bwd(saved, g):
            a, b, b_moves = saved
            return g * jnp.sin(b) * (1.0 if b_moves else scale), g * a * jnp.cos(b)

        product.defvjp(fwd, bwd, symbolic_zeros=True)
    a, b = jnp.linspace(0.5, 1.5, 4), jnp.linspace(-1.0, 1.0, 4)
    report = jaxcheck.verify_rule(product, a, b)
    assert report.status == ("pass" if scale == 1.0 else "fail"), str(report)
    labels = {c.name.split(":")[0] for c in report.checks}
    assert "vjp vs finite differences, input 1 held (its tangent a symbolic zero)" in labels
    if scale != 1.0:
        assert failed(report) == {
            "vjp vs finite differences, input 1 held (its tangent a symbolic zero)"
        }, str(report)


@pytest.mark.parametrize("factor", [1.0, 1.02])
def test_a_rule_logging_through_an_ordered_io_callback_is_checked(factor):
    """A custom_jvp whose primal logs its input in order (an ordered io_callback, which
    jax.vmap and jax.checkpoint refuse, and jax.grad runs): every check raised JAX's
    "Cannot `vmap` ordered IO callback"; its evaluations now run one at a time, and
    verify_rule leaves the vmap and checkpoint rows unjudged, saying why."""
    from jax.experimental import io_callback  # noqa: PLC0415 - one test's

    @jax.custom_jvp
    def logged_sin(x):
        io_callback(lambda v: None, None, x, ordered=True)
        return jnp.sin(x)

    logged_sin.defjvps(lambda t, ans, x: factor * jnp.cos(x) * t)
    x = jnp.array([0.7, 1.3, 0.4, -0.2], jnp.float32)
    expected = "pass" if factor == 1.0 else "fail"
    for mode in ("reverse", "forward"):
        report = jaxcheck.verify(lambda x: jnp.sum(logged_sin(x) ** 2), x, mode=mode)
        assert report.status == expected, str(report)
        assert any("ordered io_callback, which jax.vmap cannot batch" in p for p in report.problems)
    rule = jaxcheck.verify_rule(logged_sin, x)
    assert rule.status == expected, str(rule)
    unjudged = [c.name.split(":")[0] for c in rule.checks if not c.judged]
    assert unjudged == ["vmap", "checkpoint"]
    assert any(p.startswith("vmap: not checked: JAX cannot run") for p in rule.problems)
