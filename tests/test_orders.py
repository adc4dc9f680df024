"""Second and higher derivatives: verify(..., order=k)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax import lax

import jaxcheck
from cases import sin_with_second_derivative
from jaxcheck import _check_grads, _evaluate


def mlp(p, x):
    return jnp.sum(jnp.tanh(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]) ** 2)


MLP_PARAMS = {
    "w1": jnp.linspace(-0.5, 0.5, 6).reshape(3, 2),
    "b1": jnp.array([0.1, -0.2]),
    "w2": jnp.array([[0.3], [-0.4]]),
}
X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def sin_exp(p):
    return {"s": jnp.sin(p["a"]) * jnp.exp(p["b"][0]), "e": jnp.exp(jnp.sin(p["b"]))}


PYTREE = {"a": jnp.array([0.3, -0.7, 1.2]), "b": jnp.array([0.5, 0.1])}


@pytest.mark.parametrize("mode", ["reverse", "forward", "both"])
def test_correct_mlp_passes_at_order_2(mode):
    report = jaxcheck.verify(mlp, MLP_PARAMS, X, order=2, mode=mode, num_directions=8)
    assert report.status == "pass", str(report)
    labels = [p.label for p in report.parts]
    hvp = "order 2: Hessian-vector products"
    expected = {
        "reverse": ["order 1: fn", hvp],
        "forward": ["order 1: fn", "order 2: jvp map"],
        "both": ["order 1: fn", hvp],
    }[mode]
    assert labels == expected
    assert report.relative_error < report.tolerance
    assert report.num_evaluations == sum(p.num_evaluations for p in report.parts)


def test_vector_output_pytree_params_pass_at_order_3():
    report = jaxcheck.verify(sin_exp, PYTREE, order=3, num_directions=8)
    assert report.status == "pass", str(report)
    names = [c.name for c in report.checks if "same rule" not in c.name]
    assert names == [
        "order 1: reverse (fn)",
        "order 2: reverse-over-reverse (vjp map)",
        "order 3: reverse-over-reverse-over-reverse (vjp map of the vjp map)",
    ]


@pytest.mark.parametrize("mode", ["forward", "both"])
def test_vector_output_pytree_params_pass_at_order_2(mode):
    report = jaxcheck.verify(sin_exp, PYTREE, order=2, mode=mode, num_directions=8)
    assert report.status == "pass", str(report)
    label = "order 2: jvp and vjp maps" if mode == "both" else "order 2: jvp map"
    assert report.parts[-1].label == label


def test_both_modes_at_order_3_cover_the_mixed_orders():
    def scalar(p):
        return jnp.sum(jnp.exp(jnp.sin(p["a"]) * p["b"][0]))

    report = jaxcheck.verify(scalar, PYTREE, order=3, mode="both", num_directions=8)
    assert report.status == "pass", str(report)
    names = {c.name for c in report.checks}
    pair = "forward/reverse"
    assert f"order 2: reverse-over-{pair} (Hessian-vector products)" in names
    assert f"order 2: forward-over-{pair} (Hessian-vector products)" in names
    maps = "jvp and vjp maps of the Hessian-vector products"
    assert f"order 3: forward-over-{pair}-over-{pair} ({maps})" in names
    assert f"order 3: forward vs reverse ({maps})" in names
    assert len(report.parts) == 3  # one part per order: linear in the order


def test_repeated_order_2_check_compiles_nothing():
    def fresh(p, x):  # a function no other test has compiled
        return jnp.sum(jnp.sin(x @ p["w1"]) ** 2)

    checker = jaxcheck.Checker(fresh, order=2, num_directions=8)
    first = checker(MLP_PARAMS, X)
    later = checker(jax.tree.map(lambda a: a * 1.5, MLP_PARAMS), X)
    assert first.ok and later.ok
    assert first.num_compiled > 0 and later.num_compiled == 0
    assert checker.compilations == first.num_compiled


def test_an_order_2_check_compiles_only_its_own_programs(caplog):
    """A test suite checks new functions at new shapes: each program JAX compiles costs
    there. The fixed tangent and cotangent of the derivative maps are made on the host;
    made with jnp.asarray, they compiled one small program per new shape and check."""
    jaxcheck.verify(lambda p: jnp.sin(p) ** 2, jnp.ones(2), order=2)  # the key, once

    def fresh(p):  # a shape no other test uses
        return jnp.tanh(p["w"] @ p["w"].T).sum(axis=0)

    params = {"w": jnp.linspace(-1.0, 1.0, 7 * 13).reshape(7, 13)}
    with caplog.at_level("WARNING", logger="jax"), jax.log_compiles():
        report = jaxcheck.verify(fresh, params, order=2, num_directions=8)
    assert report.ok, str(report)
    messages = [r.getMessage() for r in caplog.records]
    compiled = [m.split()[4] for m in messages if m.startswith("Finished XLA compilation")]
    assert len(compiled) == 4, compiled
    assert set(compiled) <= {"jit(probe_folded)", "jit(probe)", "jit(reference)"}, compiled


# -- planted second-order bugs: right first derivative, wrong second ------------------------


@jax.custom_vjp
def sin_stopped(x):
    return jnp.sin(x)


sin_stopped.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * lax.stop_gradient(jnp.cos(x)),))


@jax.custom_jvp
def cos_wrong(x):
    return jnp.cos(x)


cos_wrong.defjvp(lambda primals, tangents: (jnp.cos(primals[0]), jnp.sin(primals[0]) * tangents[0]))


@jax.custom_vjp
def sin_bwd_through_wrong_rule(x):
    return jnp.sin(x)


sin_bwd_through_wrong_rule.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * cos_wrong(x),))


@jax.custom_jvp
def sin_second_wrong(x):
    return jnp.sin(x)


sin_second_wrong.defjvp(
    lambda primals, tangents: (jnp.sin(primals[0]), cos_wrong(primals[0]) * tangents[0])
)


@jax.custom_vjp
def sin_rounded(x):
    return jnp.sin(x)


# round() has a zero derivative: the backward pass is right, its derivative is not
sin_rounded.defvjp(
    lambda x: (jnp.sin(x), x),
    lambda x, g: (g * (jnp.round(jnp.cos(x) * 2.0**20) / 2.0**20),),
)


def planted(rule):
    return lambda p: jnp.sum(rule(p["a"])) + jnp.sum(jnp.exp(p["b"]))


@pytest.mark.parametrize(
    "rule", [sin_stopped, sin_bwd_through_wrong_rule, sin_rounded], ids=lambda f: f.__name__
)
def test_custom_vjp_right_backward_wrong_second_order_fails_only_at_order_2(rule):
    first = jaxcheck.verify(planted(rule), PYTREE, num_directions=8)
    assert first.status == "pass", str(first)
    report = jaxcheck.verify(planted(rule), PYTREE, order=2, num_directions=8)
    assert report.status == "fail"
    # (the backward pass is right in its cotangent: that part passes)
    assert [p.status.value for p in report.parts] == ["pass", "fail", "pass"]
    assert report.label == "orders 1 to 2"
    # localization names the leaf whose second derivative is wrong
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['a']"]
    assert report.relative_error > 0.3
    text = str(report)
    assert text.splitlines()[0] == (
        "jaxcheck.verify: FAIL — order 2: Hessian-vector products are WRONG"
    )
    assert "order 2: reverse-over-reverse (Hessian-vector products)" in text
    assert "! order 2: Hessian-vector products: wrong: ['a']" in text


@pytest.mark.parametrize("mode", ["reverse", "forward", "both"])
def test_custom_jvp_with_wrong_second_derivative_fails_at_order_2(mode):
    fn = planted(sin_second_wrong)
    assert jaxcheck.verify(fn, PYTREE, mode=mode, num_directions=8).ok
    report = jaxcheck.verify(fn, PYTREE, mode=mode, order=2, num_directions=8)
    assert report.status == "fail"
    # (the rule's primal output is right: its own part passes)
    maps = [p for p in report.parts[1:] if p.label != "order 2: primal output of fn's jvp"]
    assert len(maps) == len(report.parts) - 2
    assert all(p.status == "fail" for p in maps), str(report)
    for part in maps:
        assert [leaf.path for leaf in part.leaves if leaf.status == "fail"] == ["['a']"]


def test_custom_vjp_in_both_modes_checks_the_reverse_maps_only():
    report = jaxcheck.verify(planted(sin_stopped), PYTREE, order=2, mode="both", num_directions=8)
    assert report.status == "fail"
    assert [p.label for p in report.parts] == [
        "order 1: fn",
        "order 2: Hessian-vector products",
        "order 2: vjp map in its cotangent",
    ]
    assert "the jvp map (forward-over-forward, reverse-over-forward) was not checked" in str(report)


@jax.custom_vjp
def sin_cotangent_stopped(x):
    return jnp.sin(x)


# right in value; differentiated in its cotangent g, 1 % off
sin_cotangent_stopped.defvjp(
    lambda x: (jnp.sin(x), x),
    lambda x, g: (g * jnp.cos(x) + 0.01 * (g - lax.stop_gradient(g)) * jnp.cos(x),),
)


@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_a_backward_pass_wrong_in_its_cotangent_fails_at_order_2(mode):
    """The vjp map pulls back a fixed cotangent, so the derivative of a custom_vjp's bwd in
    its cotangent went unchecked (JAX's check_grads, which pulls back fn's outputs, fails
    it): fn's vjp at a fixed point, as a function of a cotangent that moves with params,
    is checked too where fn calls a custom_vjp."""
    fn = lambda x: sin_cotangent_stopped(x)  # noqa: E731 - a vector output
    x = jnp.linspace(0.2, 1.2, 6)
    assert jaxcheck.verify(fn, x, mode=mode).ok
    report = jaxcheck.verify(fn, x, order=2, mode=mode)
    assert report.status == "fail", str(report)
    [part] = [p for p in report.parts if p.status == "fail"]
    assert part.label == "order 2: vjp map in its cotangent"
    assert 0.005 < part.relative_error < 0.02
    assert part.checks[0].name == "order 2: reverse-over-reverse (vjp map in its cotangent)"
    with pytest.raises(jaxcheck.GradientCheckError, match="vjp map in its cotangent is WRONG"):
        jaxcheck.check_grads(sin_cotangent_stopped, (x,), 2, modes=["rev"])
    # the right rule passes that part, and a fn without a custom_vjp has no such part
    assert jaxcheck.verify(jnp.sin, x, order=2, mode=mode).ok
    assert [p.label for p in jaxcheck.verify(jnp.sin, x, order=2).parts] == [
        "order 1: fn",
        "order 2: vjp map",
    ]


@jax.custom_vjp
def sin_off_inside(x):
    return jnp.sin(x)


sin_off_inside.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x) * 1.01,))


def _forward_output(kind):
    """A custom_vjp right in value and bwd, whose fwd's output differentiates wrongly."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    output = {
        "stop_gradient": lambda x: lax.stop_gradient(jnp.sin(x)),
        "inner rule 1 % off": sin_off_inside,
    }[kind]
    f.defvjp(lambda x: (output(x), x), lambda x, g: (g * jnp.cos(x),))
    return f


@pytest.mark.parametrize("kind", ["stop_gradient", "inner rule 1 % off"])
def test_a_forward_pass_whose_output_differentiates_wrongly_fails_at_order_2(kind):
    """JAX's check_grads pulls back the output that jax.vjp returns, which is the fwd's:
    differentiated at order 2, a fwd whose output is held behind a stop_gradient, or
    computed by a wrong rule, fails there. The map in the cotangent pulled back fn's own
    output instead, which the fwd never computes, and passed."""
    f = _forward_output(kind)
    x = jnp.linspace(-1.0, 1.0, 5)
    assert jaxcheck.verify(f, x).ok
    jaxcheck.check_grads(f, (x,), 1, modes=["rev"])
    with pytest.raises(jaxcheck.GradientCheckError, match="vjp map in its cotangent is WRONG"):
        jaxcheck.check_grads(f, (x,), 2, modes=["rev"])
    report = jaxcheck.verify(f, x, order=2)
    assert report.status == "fail", str(report)
    [part] = [p for p in report.parts if p.status == "fail"]
    assert part.label == "order 2: vjp map in its cotangent"
    expected = 1.0 if kind == "stop_gradient" else 0.01
    assert expected / 2 < part.relative_error < expected * 2, str(report)


@pytest.mark.parametrize("case", ["exp-float32", "square-float16"])
def test_the_cotangent_part_does_not_overflow_where_fn_does_not(case):
    """Pulled back as they are, fn's outputs overflowed (exp(50) times exp(50) in float32;
    x * x at 240, its Jacobian contracted twice, in float16): a right rule was reported
    NaN/Inf. The map scales fn's outputs by a power of two near their largest and takes
    an unscaled tangent."""
    if case == "exp-float32":
        fwd = lambda x: (jnp.exp(x), jnp.exp(x))  # noqa: E731
        bwd = lambda r, g: (g * r,)  # noqa: E731
        x = jnp.asarray([30.0, 40.0, 50.0], jnp.float32)
    else:
        fwd = lambda x: (x * x, x)  # noqa: E731
        bwd = lambda x, g: (2 * g * x,)  # noqa: E731
        x = (jnp.asarray([0.3, -0.8, 1.2, 0.5, 0.9, -1.1]) * 200).astype(jnp.float16)

    @jax.custom_vjp
    def f(x):
        return fwd(x)[0]

    f.defvjp(fwd, bwd)
    report = jaxcheck.verify(f, x, order=2)
    assert [(p.label, p.status.value) for p in report.parts] == [
        ("order 1: fn", "pass"),
        ("order 2: vjp map", "pass"),
        ("order 2: vjp map in its cotangent", "pass"),
    ], str(report)


def test_wrong_first_derivative_is_the_headline():
    @jax.custom_jvp
    def bad(x):
        return jnp.sin(x)

    bad.defjvp(lambda p, t: (jnp.sin(p[0]), 1.1 * jnp.cos(p[0]) * t[0]))
    report = jaxcheck.verify(planted(bad), PYTREE, order=2, num_directions=8)
    assert report.status == "fail" and report.parts[0].status == "fail"
    assert report.relative_error == report.parts[0].relative_error
    assert report.problems[0].startswith("the first derivative is wrong")
    assert "order 1: fn: wrong: ['a']" in report.problems


# -- grad_fn and has_aux -------------------------------------------------------------------


def loss(p):
    return jnp.sum(jnp.sin(p["a"]) ** 2) + jnp.sum(p["b"] ** 3)


def test_grad_fn_order_2_checks_its_jacobian():
    good = jax.grad(loss)
    report = jaxcheck.verify(loss, PYTREE, grad_fn=good, order=2, num_directions=8)
    assert report.status == "pass", str(report)
    assert [p.label for p in report.parts[1:]] == [
        "order 2: grad_fn",
        "order 2: grad_fn against fn's gradient at a nearby point",
    ]

    def not_differentiable(p):
        return jax.tree.map(lax.stop_gradient, good(p))

    bad = jaxcheck.verify(loss, PYTREE, grad_fn=not_differentiable, order=2, num_directions=8)
    assert [p.status.value for p in bad.parts] == ["pass", "fail", "pass"]


@pytest.mark.parametrize("at", ["zero", "elsewhere"])
def test_a_grad_fn_right_at_params_with_the_wrong_slope_fails_at_order_2(at):
    """grad_fn's Jacobian, which the order-2 map checks against finite differences of
    grad_fn, must be fn's Hessian: sin(2w) + 5 sin(w - w0) is the gradient of
    sum(sin(w) ** 2) at w0 only, with 7 times its slope, and passed at order 2."""
    w0 = jnp.zeros(3) if at == "zero" else jnp.array([0.3, -0.2, 0.9])

    def grad_fn(w):
        return jnp.sin(2 * w) + 5 * jnp.sin(w - w0)

    report = jaxcheck.verify(lambda w: jnp.sum(jnp.sin(w) ** 2), w0, grad_fn=grad_fn, order=2)
    assert report.status == "fail", str(report)
    assert [p.status.value for p in report.parts] == ["pass", "pass", "fail"]
    assert (
        "order 2: grad_fn against fn's gradient at a nearby point: grad_fn agrees with fn's "
        "gradient at params but not at params moved by 1% of each entry's size: its slope, "
        "the Jacobian the order-2 map checks, is not fn's Hessian"
    ) in report.problems


def test_the_nearby_point_of_a_float16_grad_fn_check_is_finite():
    """The nearby point's step is 1 % of each leaf's RMS, which squared in float16 overflowed
    above 256: the point was Inf and the right gradient "nonfinite"."""

    def loss(w):
        return jnp.sum(jnp.sin(w.astype(jnp.float32) / 300.0) ** 2)

    w = jnp.linspace(200.0, 400.0, 4).astype(jnp.float16)
    report = jaxcheck.verify(loss, w, grad_fn=jax.grad(loss), order=2)
    assert [(p.label, p.status.value) for p in report.parts][-1] == (
        "order 2: grad_fn against fn's gradient at a nearby point",
        "pass",
    ), str(report)


def test_a_grad_fn_returning_a_gradient_computed_beforehand_fails_at_order_2():
    """Its Jacobian is zero where fn curves; the note pointed to checking a custom rule
    with verify_rule, which a grad_fn is not."""
    w = jnp.array([0.3, -0.7, 1.1])
    g0 = jnp.sin(2 * w)
    report = jaxcheck.verify(lambda w: jnp.sum(jnp.sin(w) ** 2), w, grad_fn=lambda v: g0, order=2)
    assert [p.status.value for p in report.parts] == ["pass", "fail", "fail"], str(report)
    (note,) = [q for q in report.problems if q.startswith("order 2: grad_fn: flat where")]
    assert note.endswith(
        "A grad_fn that returns a gradient computed beforehand, or goes through round, "
        "floor, an integer cast, a lookup table or a stop_gradient, is such a staircase"
    )
    assert "verify_rule" not in note


def _log_domain(p):
    k, m, c = p[0], p[1], p[2]
    return jnp.sqrt(k / m) * c + jnp.log(m) + jnp.log(c)


@pytest.mark.parametrize(
    "fn, w",
    [
        (_log_domain, [1e4, 0.05, 1.0]),
        (lambda w: jnp.sum(jnp.log(w)), [1e-3, 1.0, 2.0, 0.5]),
        (lambda w: jnp.sum(jnp.log(w)), [4e-3, 1.0, 2.0, 0.5]),
        (lambda w: jnp.sum(jnp.exp(w * 1e20)), [1e-20, -2e-20, 3e-20]),
    ],
    ids=["packed", "log-packed", "log-unpacked", "tiny"],
)
@pytest.mark.parametrize("seed", [0, 2, 3])
def test_the_nearby_point_keeps_each_entry_at_its_own_scale(fn, w, seed):
    """Every leaf was moved by 1 % of its RMS: a damping of 0.05 beside a rate of 1e4 by
    58, a log's argument of 1e-3 beside 1 and 2 below zero (fn NaN there, and the report
    said "at params", where fn is finite), and a leaf of 1e-20 in float32, whose sum of
    squares is 0, by 0.01. A right grad_fn was "nonfinite" or "inconclusive"."""
    w = jnp.asarray(w, jnp.float32)
    report = jaxcheck.verify(fn, w, grad_fn=jax.grad(fn), order=2, key=jax.random.key(seed))
    assert report.status == "pass", str(report)
    assert report.parts[-1].label == "order 2: grad_fn against fn's gradient at a nearby point"


@pytest.mark.parametrize("seed", range(6))
def test_a_grad_fn_wrong_along_a_sum_fails_the_nearby_check_at_every_key(seed):
    """The gradient of sum(w ** 2) * sum(w) without its 2 w sum(w) term is right wherever
    sum(w) = 0. Moved along random signs, a pair of leaves summed to zero again at every
    other key, and the wrong slope passed."""

    def fn(w):
        return jnp.sum(w**2) * jnp.sum(w)

    def grad_fn(w):
        return jnp.full_like(w, jnp.sum(w**2))

    w = jnp.array([0.7, -0.7])
    report = jaxcheck.verify(fn, w, grad_fn=grad_fn, order=2, key=jax.random.key(seed))
    assert [p.status.value for p in report.parts] == ["pass", "pass", "fail"], str(report)


@pytest.mark.parametrize("params", [{"a": 0.5, "b": 1.5}, 0.5, [0.5, 1.0]], ids=str)
def test_the_nearby_check_moves_python_float_params(params):
    """Python floats were left out of the nearby point, and params of nothing else
    crashed with "Need at least one array to stack"."""

    def fn(p):
        return sum(jnp.sin(x) * x for x in jax.tree.leaves(p))

    report = jaxcheck.verify(fn, params, grad_fn=jax.grad(fn), order=2)
    assert report.status == "pass", str(report)
    assert len(report.parts) == 3


def test_the_nearby_check_says_where_fn_is_nan():
    """fn finite only within 1e-5 of params: the first-order check's message says "at
    params", which there meant the moved point."""

    w0 = jnp.array([0.3, 0.6])

    def fn(w):
        return jnp.sum(jnp.where(jnp.abs(w - w0) < 1e-5 * w0, jnp.sin(w), jnp.nan))

    report = jaxcheck.verify(fn, w0, grad_fn=lambda w: jnp.cos(w), order=2)
    assert [p.status.value for p in report.parts[:2]] == ["pass", "pass"], str(report)
    near = report.parts[-1]
    assert near.status == "nonfinite", str(report)
    assert near.problems[0] == (
        "fn's output (root) is NaN/Inf at params moved by 0.01% of each entry's size"
    )


def test_has_aux_is_dropped_in_the_derivative_maps():
    def with_aux(p, x):
        return mlp(p, x), {"note": "anything"}

    report = jaxcheck.verify(with_aux, MLP_PARAMS, X, has_aux=True, order=2, num_directions=8)
    assert report.status == "pass", str(report)


def test_composite_report_serializes_and_flattens():
    report = jaxcheck.verify(loss, PYTREE, order=2, num_directions=8, localize=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and len(data["parts"]) == 2
    assert data["parts"][1]["label"] == "order 2: Hessian-vector products"
    leaves, treedef = jax.tree_util.tree_flatten(report)
    assert len(leaves) == 6  # numeric and analytic of the headline and of both parts
    assert jax.tree_util.tree_unflatten(treedef, leaves).status == "pass"
    np.testing.assert_allclose(report.parts[1].numeric, report.parts[1].analytic, rtol=1e-5)
    lines = str(report).splitlines()
    assert lines[0] == (
        "jaxcheck.verify: PASS — derivatives of orders 1 to 2 are consistent with finite "
        "differences"
    )
    assert len(lines) <= 8


def test_raise_on_failure_at_order_2():
    with pytest.raises(jaxcheck.GradientCheckError, match="order 2: Hessian-vector products"):
        jaxcheck.verify(planted(sin_stopped), PYTREE, order=2, raise_on_failure=True)


def test_untraceable_grad_fn_at_order_2_says_why():
    def numpy_loss(p):
        return float(np.sum(np.sin(np.asarray(p)) ** 2))

    def numpy_grad(p):
        x = np.asarray(p)
        return jnp.asarray(2.0 * np.sin(x) * np.cos(x), jnp.float32)

    with pytest.raises(
        TypeError,
        match=(
            r"order=2: the order-2 check differentiates grad_fn with JAX \(grad_fn\), but "
            r"grad_fn cannot be traced \(TracerArrayConversionError"
        ),
    ):
        jaxcheck.verify(numpy_loss, jnp.ones(3), grad_fn=numpy_grad, order=2, num_directions=4)


def _softplus_with_rule(derivative):
    """softplus with a custom_jvp whose tangent is derivative(x) * t."""

    @jax.custom_jvp
    def f(x):
        return jax.nn.softplus(x)

    f.defjvp(lambda p, t: (f(p[0]), derivative(p[0]) * t[0]))
    return f


SOFTPLUS_RULES = {
    "right": jax.nn.sigmoid,
    # 5 % off: wrong at every order
    "first-wrong": lambda x: 1.05 * jax.nn.sigmoid(x),
    # right first derivative, but its own derivative is zero: wrong from the second order
    "second-wrong": lambda x: jax.nn.sigmoid(lax.stop_gradient(x)),
    # differs from sigmoid by 1e-26 at 1e-8: no finite difference can see it
    "invisible": lambda x: jax.nn.sigmoid(x) + 0.5 * x**3 / 6,
}


@pytest.mark.parametrize("rule", list(SOFTPLUS_RULES))
def test_roundoff_inside_fn_near_zero_is_not_a_wrong_fourth_derivative(rule):
    """At x = 1e-8 the relative step is 1e-8 times softplus's own scale: its third
    derivative, a difference of values near 1/2, rounds far above what its value near
    zero suggests. The check moves to larger steps while the error shrinks, and passes;
    a rule wrong at the first or second order still fails there, at that order."""
    fn = _softplus_with_rule(SOFTPLUS_RULES[rule])
    report = jaxcheck.verify(lambda p: fn(p[0]), (1e-8,), order=4)
    statuses = [p.status.value for p in report.parts]
    if rule in ("right", "invisible"):
        assert report.status == "pass", str(report)
        assert any("roundoff inside fn, not a wrong derivative" in q for q in report.problems)
        [fourth] = [p for p in report.parts if p.label.startswith("order 4")]
        assert max(fourth.steps_tried) > 1e3 * min(fourth.steps_tried)
    elif rule == "first-wrong":
        assert statuses[0] == "fail" and report.parts[0].relative_error > 0.04, str(report)
    else:
        assert statuses[:2] == ["pass", "fail"], str(report)
        assert report.parts[1].relative_error > 0.5


@pytest.mark.parametrize("order", [2, 3])
def test_forward_over_forward_through_a_rule_that_takes_no_symbolic_zero_tangents(order):
    """JAX's jvp of a reduce_window with a custom reducer raises when the operands' tangents
    arrive as symbolic zeros (jax 0.10: "Operands must have the same tree structure as
    init_values"), which a jvp map's fixed tangent is, differentiated in params (at order 3
    also the tangent's own value, differentiated once more). The maps hold both as arrays
    instead, as check_grads's differentiated tangents are."""

    def f(x):
        return lax.reduce_window(
            x, jnp.ones((), x.dtype), lambda a, b: a * b, (3, 1), (1, 1), "VALID"
        )

    x = jnp.linspace(0.5, 1.5, 12, dtype=jnp.float32).reshape(4, 3)
    report = jaxcheck.verify(f, x, order=order, mode="forward")
    assert report.status == "pass", str(report)
    assert report.relative_error < 1e-5
    assert len(report.parts) == order
    assert not report.problems


@jax.custom_jvp
def _softmax_first_order_only(x):
    return jax.nn.softmax(x)


@_softmax_first_order_only.defjvp
def _softmax_jvp(primals, tangents):
    """Right to first order; the stop_gradient makes its own derivative wrong."""
    (x,), (t,) = primals, tangents
    s = jax.lax.stop_gradient(jax.nn.softmax(x))
    return _softmax_first_order_only(x), s * (t - jnp.sum(t * s))


@pytest.mark.parametrize("key", range(4))
def test_order_2_of_softmax_of_three_is_judged_for_every_key(key):
    """softmax's derivative maps vanish identically along a tangent or cotangent
    proportional to ones; with random signs alone, 3 elements drew one (as u or v) 44 %
    of the time, and the check passed a wrong second derivative or had nothing to judge."""
    x = jnp.asarray([0.3, -1.2, 2.0])
    good = jaxcheck.verify(jax.nn.softmax, x, order=2, mode="both", key=key)
    assert good.status == "pass", str(good)
    bad = jaxcheck.verify(_softmax_first_order_only, x, order=2, mode="both", key=key)
    # (softmax is a custom_jvp: its primal output is checked too, and is right)
    assert [p.status.value for p in bad.parts] == ["pass", "fail", "pass"], str(bad)


@pytest.mark.parametrize("gap", [20.0, 25.0])
def test_order_2_on_a_float32_derivative_that_is_rounding_is_not_judged(gap):
    """Cross-entropy at a logit gap of 20 in float32: the gradient is float32 rounding
    (1 - p rounds to 0), 99 % off the float64 one, which order 1 says. Its reverse-mode
    Hessian-vector products are made of that rounding, 270 % off, and were called WRONG."""
    x = jnp.asarray([0.1, 0.2, gap])
    report = jaxcheck.verify(lambda x: -jax.nn.log_softmax(x)[2], x, order=2, mode="both")
    assert report.status == "inconclusive", str(report)
    said = "the derivative of the order below is float32 rounding at this point"
    assert any(said in q for q in report.problems), report.problems
    assert not any("between the two precisions" in q for q in report.problems)


# -- derivative maps flat where fn curves: a staircase rule ----------------------------------


@jax.custom_vjp
def sin_table(x):
    return jnp.sin(x)


# the backward pass looks cos up on a grid of 1e-3: right at the grid points, flat between
sin_table.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(jnp.round(x * 1e3) / 1e3),))


@jax.custom_jvp
def sin_gridded(x):
    return jnp.sin(x)


sin_gridded.defjvp(
    lambda primals, tangents: (
        jnp.sin(primals[0]),
        jnp.cos(jnp.round(primals[0] * 1e3) / 1e3) * tangents[0],
    )
)

TABLE_POINT = jnp.array([0.3, -1.2, 0.8, 2.0], jnp.float32)  # on the grid (in float32)
TABLE_WEIGHTS = jnp.array([1.0, -0.5, 2.0, 0.7], jnp.float32)
CHECK_GRADS_MODES = {"reverse": ["rev"], "forward": ["fwd"], "both": ["fwd", "rev"]}


@pytest.mark.parametrize(
    "rule, mode", [(sin_table, "reverse"), (sin_gridded, "forward"), (sin_gridded, "both")]
)
def test_a_rule_computed_on_a_grid_fails_at_order_2_though_its_maps_are_flat(rule, mode):
    """Its derivative maps are flat within the step, and so is their derivative by autodiff:
    the two agree (JAX's check_grads passes it), yet fn curves, so its second derivative
    is not zero."""

    def fn(w):
        return jnp.sum(rule(w) * TABLE_WEIGHTS)

    assert jaxcheck.verify(fn, TABLE_POINT, mode=mode).ok
    report = jaxcheck.verify(fn, TABLE_POINT, mode=mode, order=2)
    assert [p.status.value for p in report.parts][:2] == ["pass", "fail"], str(report)
    text = str(report)
    assert "flat where the order below curves: the maps checked at order 2 are flat" in text
    assert "so their derivative (zero) is not fn's derivative of order 2" in text
    assert "its rows agree: the maps are flat here; the failure is that the function" in text
    assert "fn is flat here" not in text
    with pytest.raises(jaxcheck.GradientCheckError, match="flat where the order below curves"):
        jaxcheck.check_grads(fn, (TABLE_POINT,), 2, modes=CHECK_GRADS_MODES[mode])


@pytest.mark.parametrize("modes", [["rev"], ["fwd"], ["fwd", "rev"]])
@pytest.mark.parametrize(
    "f, args",
    [
        (lambda x: (x * x, x * x), (3.0,)),
        (lambda x: (jnp.sin(x), 2.0 * jnp.sin(x)), (3.0,)),
        (
            jax.remat(
                lambda x: jax.lax.cond(
                    x > 0, lambda c: (jnp.sin(c), jnp.sin(c)), lambda c: (jnp.cos(c), c), x
                )
            ),
            (3.0,),
        ),
        (lambda x, y: jnp.sin(x - y), (0.3, 0.7)),
    ],
    ids=["equal outputs", "outputs 1:2", "remat of cond", "x - y"],
)
def test_maps_cancelled_by_their_fixed_vectors_are_checked_along_gaussian_ones(f, args, modes):
    """The derivative maps' fixed cotangents (tangents) are signs times powers of two: two
    outputs (parameters) in a power-of-two relation cancelled along them, the map was
    identically zero, and a correct second derivative failed as "flat where the order
    below curves" (JAX's api_test remat-of-cond tests). Such a map is checked again along
    Gaussian vectors; a staircase rule still fails (test above)."""
    assert jaxcheck.check_grads(f, args, 2, modes=modes) is None
    assert jaxcheck.check_grads(f, args, 3, modes=modes) is None


def test_equal_outputs_of_a_rule_wrong_at_order_2_still_fail():
    @jax.custom_vjp
    def sin_held(x):
        return jnp.sin(x)

    sin_held.defvjp(
        lambda x: (jnp.sin(x), x), lambda x, g: (g * jax.lax.stop_gradient(jnp.cos(x)),)
    )
    jaxcheck.check_grads(lambda x: (sin_held(x), sin_held(x)), (3.0,), 1, modes=["rev"])
    with pytest.raises(jaxcheck.GradientCheckError, match="order 2: vjp map is WRONG"):
        jaxcheck.check_grads(lambda x: (sin_held(x), sin_held(x)), (3.0,), 2, modes=["rev"])


def relu_net(p, x):
    return jnp.sum(jax.nn.relu(x @ p["w1"]) @ p["w2"])


@pytest.mark.parametrize(
    "fn, params, order",
    [
        # piecewise linear: flat derivative maps, and fn does not curve
        (relu_net, {"w1": MLP_PARAMS["w1"], "w2": MLP_PARAMS["w2"]}, 2),
        # piecewise constant
        (lambda p, x: jnp.sum(jnp.round(p * 4.0) * x[0]), jnp.array([0.3, 0.6, -0.9]), 2),
        # quadratic: the order-3 maps are flat, the order-2 ones straight
        (lambda p, x: jnp.sum((x @ p["w1"]) ** 2), {"w1": MLP_PARAMS["w1"]}, 3),
    ],
    ids=["relu", "round", "quadratic"],
)
def test_flat_maps_where_fn_does_not_curve_pass(fn, params, order):
    report = jaxcheck.verify(fn, params, X, order=order, mode="both")
    assert report.ok, str(report)
    assert not any("order below curves" in q for p in report.parts for q in p.problems)


@pytest.mark.parametrize("mode", ["both", "reverse"])
def test_flat_maps_above_a_jump_at_the_point_are_not_judged_rather_than_failed(mode):
    """floor(p) + p at an integer entry jumps there: the order-1 check cannot judge it. Its
    second difference is the jump's height, not a curvature, so the order-2 maps (exactly
    1 everywhere off the jump, hence flat) were failed as "flat where the order below
    curves": a correct derivative failed at a discontinuity the report itself named."""
    report = jaxcheck.verify(
        lambda p: jnp.floor(p) + p, jnp.array([1.0, 0.3, -0.4]), order=2, mode=mode
    )
    assert report.status == "inconclusive", str(report)
    assert report.problems[0].startswith("order 1: fn: fn's values scatter by "), str(report)
    assert not any("order below curves" in q for q in report.problems), str(report)


@jax.custom_vjp
def square(v):
    return v * v


square.defvjp(lambda v: (v * v, v), lambda v, g: (2 * v * g,))


def test_a_right_rule_where_its_derivative_is_zero_passes_at_order_2():
    """A square's vjp at 0 is zero for every cotangent, so fn's vjp map in its cotangent is
    flat there by the maths, while fn (the square) curves: a correct rule failed as "flat
    where the order below curves", at a zero-initialised layer and in check_grads, where
    JAX's check passes. Away from 0, a rule flat in its cotangent still fails (above)."""
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    report = jaxcheck.verify(lambda w, x: jnp.sum(square(x @ w)), jnp.zeros((3, 2)), x, order=2)
    assert [(p.label, p.status.value) for p in report.parts][:3] == [
        ("order 1: fn", "pass"),
        ("order 2: Hessian-vector products", "pass"),
        ("order 2: vjp map in its cotangent", "pass"),
    ], str(report)
    assert jaxcheck.verify_rule(square, jnp.zeros(3), order=2).ok
    assert jaxcheck.check_grads(square, (jnp.zeros(3),), 2, modes=["rev"]) is None


@pytest.mark.parametrize("differentiable", [True, False])
def test_a_custom_vjp_where_fn_is_nan_is_checked_at_order_2_in_reverse_mode(differentiable):
    """fn NaN at params ends the order-1 part before it finds that a custom_vjp in fn has no
    forward mode; the jvp map's jvp of it, differentiated in reverse mode, then raised
    JAX's NotImplementedError for custom_lin out of verify."""

    @jax.custom_vjp
    def log(x):
        return jnp.log(x)

    def bwd(x, ct):
        return (ct / (x if differentiable else jax.lax.stop_gradient(x)),)

    log.defvjp(lambda x: (jnp.log(x), x), bwd)
    p = jnp.asarray([1.6243454, -0.6117564, -0.5281718], jnp.float32)
    report = jaxcheck.verify(lambda p: jnp.sum(log(p)), p, order=2, mode="both")
    head, second, in_cotangent = report.parts
    assert head.status is jaxcheck.Status.NONFINITE
    assert "fn's output (root) is NaN/Inf at params" in head.problems
    assert _evaluate.NO_JVP in head.problems
    assert any(q.startswith("for the same reason, the jvp map") for q in head.problems)
    # as where fn is finite: the vjp map alone, in both modes, and the map in its cotangent
    assert second.label == "order 2: Hessian-vector products"
    assert second.status is (jaxcheck.Status.PASS if differentiable else jaxcheck.Status.FAIL)
    assert in_cotangent.label == "order 2: vjp map in its cotangent"
    with pytest.raises(TypeError, match="asks for forward mode .jvp., but f contains a jax"):
        jaxcheck.check_grads(lambda p: jnp.sum(log(p)), (p,), order=2)


@jax.custom_jvp
def softplus_primal_stopped(x):
    return jnp.logaddexp(x, 0.0)


@softplus_primal_stopped.defjvp
def _softplus_primal_stopped_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jax.lax.stop_gradient(jnp.logaddexp(x, 0.0)), jax.nn.sigmoid(x) * t


@pytest.mark.parametrize("mode", ["reverse", "forward", "both"])
def test_a_custom_jvp_primal_output_behind_stop_gradient_fails_at_order_2(mode):
    """A custom_jvp rule returning its primal output behind a stop_gradient has the right
    values and derivatives, and maps of its tangent outputs: it passed at orders 2 and 3
    (JAX's check_grads fails it), while value_and_grad of it inside a gradient penalty is
    96 % off. The primal output fn's jvp returns is checked as a function of params."""
    x = jnp.linspace(-1.0, 1.5, 5)
    fn = lambda x: jnp.sum(softplus_primal_stopped(x) * jnp.arange(1.0, 6.0))  # noqa: E731
    assert jaxcheck.verify(fn, x, mode=mode).ok
    report = jaxcheck.verify(fn, x, order=2, mode=mode)
    assert report.status == "fail", str(report)
    [part] = [p for p in report.parts if p.status == "fail"]
    assert part.label == "order 2: primal output of fn's jvp"
    assert 0.5 < part.relative_error < 2.0
    first = "reverse" if mode != "forward" else "forward"
    assert part.checks[0].name == f"order 2: {first}-over-forward (primal output of fn's jvp)"
    with pytest.raises(jaxcheck.GradientCheckError, match="primal output of fn?'s jvp is WRONG"):
        jaxcheck.check_grads(softplus_primal_stopped, (x,), 2)
    # JAX's own custom_jvp functions pass it
    right = jaxcheck.verify(lambda x: jnp.sum(jax.nn.softplus(x)), x, order=2, mode=mode)
    assert right.ok, str(right)
    assert right.parts[-1].label == "order 2: primal output of fn's jvp"


@pytest.mark.parametrize("factor", [1.0, 1.01])
def test_an_implicit_layer_solved_by_a_while_loop_is_checked_forward_over_reverse(factor):
    """A deep-equilibrium layer: a custom_vjp whose fwd iterates z = tanh(W z + b) in a
    while_loop and whose bwd solves the implicit function theorem's linear system. JAX
    cannot reverse the while_loop that fwd's residual depends on, so reverse-over-reverse
    is refused; its Hessian-vector products are forward-over-reverse, and so are the
    order-2 checks. A 1 % error in bwd fails at order 1, and is not lost to a refusal."""
    n = 3
    w = jnp.asarray([[0.1, -0.2, 0.05], [0.15, 0.1, -0.1], [-0.05, 0.2, 0.1]])

    def solve(w, b):
        def body(c):
            return jnp.tanh(w @ c[0] + b), c[0], c[2] + 1

        def cond(c):
            return (jnp.max(jnp.abs(c[0] - c[1])) > 1e-7) & (c[2] < 200)

        return lax.while_loop(cond, body, (jnp.tanh(b), jnp.zeros(n), 0))[0]

    @jax.custom_vjp
    def layer(w, b):
        return solve(w, b)

    def fwd(w, b):
        z = solve(w, b)
        return z, (w, b, z)

    def bwd(res, g):
        w, b, z = res
        a = jnp.eye(n) - (1 - z**2)[:, None] * w
        lam = jnp.linalg.solve(a.T, g) * factor
        return jax.vjp(lambda w, b: jnp.tanh(w @ z + b), w, b)[1](lam)

    layer.defvjp(fwd, bwd)
    fn = lambda p: jnp.sum(layer(p["w"], p["b"]) * jnp.arange(1.0, n + 1))  # noqa: E731
    report = jaxcheck.verify(fn, {"w": w, "b": jnp.asarray([-0.3, 0.1, 0.3])}, order=2)
    parts = [(p.label, p.status.value) for p in report.parts]
    if factor != 1.0:
        assert parts[0] == ("order 1: fn", "fail"), str(report)
        return
    assert report.status == "pass", str(report)
    rows = [c.name for c in report.checks]
    for name in ("Hessian-vector products", "vjp map in its cotangent"):
        assert f"order 2: forward-over-reverse ({name})" in rows, rows
        said = f"JAX cannot differentiate the {name} in reverse mode (Reverse-mode"
        assert any(said in q for q in report.problems), report.problems


def test_a_composite_table_shows_the_rows_that_carry_the_verdict_beside_unjudged_ones():
    """Dropout drawn in the default dtype: the float32 rows are not judged (fn is another
    function in float64) and the same rule in float64 carries the verdict; the table of an
    order-2 check showed only the rows not judged and forward-vs-reverse rows, whose
    tolerance (1.4 to 1.7) was the float32 rows' gap to float64 taken for rounding."""
    params = {"w": jnp.linspace(-0.5, 0.5, 12).reshape(4, 3), "b": jnp.array([0.1, -0.2, 0.05])}
    x = jnp.linspace(-1, 1, 20).reshape(5, 4)

    def loss(p, x, key):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return jnp.mean(jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h / 0.8, 0.0) ** 2)

    report = jaxcheck.verify(loss, params, x, jax.random.key(0), order=2, mode="both")
    assert report.status == "pass", str(report)
    rows = [line.split() for line in str(report).splitlines() if line.startswith("  order ")]
    ruled = [r for r in rows if "same rule in float64" in " ".join(r)]
    assert len(ruled) == 4 and all(r[-1] == "ok" for r in ruled), str(report)
    unjudged = [r for r in rows if r[-2:] == ["not", "judged"]]
    assert len(unjudged) == 4 and all(r[-3] == "—" for r in unjudged), str(report)
    both = [c for c in report.checks if "forward vs reverse" in c.name]
    assert len(both) == 2 and all(c.passed and c.tolerance < 1e-3 for c in both), str(report)


@pytest.mark.parametrize("closed_over", [False, True])
def test_float32_data_a_scan_closes_over_is_cast_for_the_order_2_reference(closed_over):
    """A scan whose carry starts from float32 data fn closes over cannot run in float64
    as it is: at order 1 such arrays are cast to float64 for the reference, but not
    through the order-2 derivative maps, whose reference fell back to float32 (tolerance
    4e-4), and a second-derivative bug of 1e-4 passed there, failing with the data passed
    as an argument."""
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    x = jax.random.normal(k[0], (8, 3))
    params = {"w": 0.8 * jax.random.normal(k[1], (3, 3)), "b": jnp.zeros(3)}

    def act(z):  # tanh's value and first derivative; its second derivative 3e-4 off
        return jnp.tanh(z) + 1.5e-4 * (z - lax.stop_gradient(z)) ** 2

    def node(p, x0):
        def step(x, _):
            return x + 0.1 * act(x @ p["w"] + p["b"]), None

        return jnp.mean(lax.scan(step, x0, None, length=20)[0] ** 2)

    if closed_over:
        report = jaxcheck.verify(lambda p: node(p, x), params, order=2)
    else:
        report = jaxcheck.verify(node, params, x, order=2)
    assert [(p.label, p.status.value) for p in report.parts] == [
        ("order 1: fn", "pass"),
        ("order 2: Hessian-vector products", "fail"),
    ], str(report)
    assert report.parts[1].tolerance < 1e-5, str(report)
    assert not any("finite differences use float32" in q for q in report.problems), str(report)


def test_a_composite_footer_names_each_part_s_reference_precision():
    """Where one part's finite differences fell back to float32 (its fn could not run in
    float64), the footer of the whole report still said "reference: central differences
    in float64", the precision of the part that decided the headline."""
    x = jnp.linspace(0.1, 1.0, 4)
    wide = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p)), x)
    native = jaxcheck.verify(lambda p: jnp.sum(jnp.cos(p)), x, precision="native")
    assert (wide.reference_dtype, native.reference_dtype) == ("float64", "float32")
    parts = [
        dataclasses.replace(wide, label="order 1: fn"),
        dataclasses.replace(native, label="order 2: Hessian-vector products"),
    ]
    footer = str(jaxcheck._report.compose(parts, 2)).splitlines()[-1]
    assert "reference: central differences in float64 (order 1: fn), float32 (order 2: " in footer
    assert "Hessian-vector products)" in footer


@pytest.mark.parametrize("shape", ["plain", "str aux", "eager"])
def test_a_bwd_not_differentiable_in_its_cotangent_fails_behind_an_aux_or_eagerly(shape):
    """The parts of order 2 that check a custom_vjp's bwd in its cotangent ran only where
    fn's trace showed the rule: an aux of strings (or an equinox module) cannot be traced
    as an output, and a boolean mask's indexing runs fn eagerly; the bwd's stop_gradient
    on its cotangent then passed at order 2, where JAX's check_grads fails it."""

    @jax.custom_vjp
    def s(x):
        return jnp.sin(x)

    s.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (lax.stop_gradient(g) * jnp.cos(x),))
    c = jnp.array([1.0, 2.0, -0.5])
    x = jnp.array([0.3, -0.8, 1.2])
    fn, kw = {
        "plain": (lambda p: jnp.sum(s(p) * c), {}),
        "str aux": (lambda p: (jnp.sum(s(p) * c), "tag"), {"has_aux": True}),
        "eager": (lambda p: jnp.sum(s(p[p > -5.0]) * c), {}),
    }[shape]
    report = jaxcheck.verify(fn, x, order=2, **kw)
    assert report.status == "fail", str(report)
    assert [(part.label, part.status) for part in report.parts][-1] == (
        "order 2: vjp map in its cotangent",
        "fail",
    ), str(report)


@pytest.mark.parametrize("order", [2, 3])
def test_a_constant_derivative_map_is_said_to_be_one(order):
    """A polynomial of degree order - 1 has a constant derivative map of that order: its
    note called it piecewise constant, "as round or argmax are, or not depending on params
    at all"."""
    w = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    x = jnp.linspace(0.5, 2.0, 6).reshape(2, 3)
    fn = (lambda w, x: jnp.sum(x @ w)) if order == 2 else (lambda w, x: jnp.sum((x @ w) ** 2))
    report = jaxcheck.verify(fn, w, x, order=order)
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if "fn is flat here" in q]
    assert (
        f"(fn's derivative of order {order - 1} is constant here, as a polynomial's of degree "
        f"{order - 1} is, or the map is piecewise constant)"
    ) in said
    assert "as round or argmax are" not in said


@pytest.mark.parametrize("error", [0.0, 1e-2])
def test_a_python_number_among_the_outputs_is_checked_at_order_2(error):
    """A learning rate returned beside a loss as a Python float: order 1 took it, order 2
    crashed reading its dtype ("'float' object has no attribute 'dtype'", blamed on fn)."""

    def fn(w):
        loss = jnp.sum(w**3)
        return {"loss": loss + error * (loss - lax.stop_gradient(loss)) ** 2, "lr": 1e-3}

    w = jnp.linspace(-0.3, 0.35, 10)
    report = jaxcheck.verify(fn, w, order=2, mode="both")
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    if error:
        with pytest.raises(AssertionError):
            jaxcheck.check_grads(fn, (w,), order=2, modes=("rev",))
    else:
        jaxcheck.check_grads(fn, (w,), order=2, modes=("rev",))


def test_a_setting_read_by_a_rule_inside_a_rules_jvp_is_seen_at_order_2():
    """The same fn checked again at order 2 after a global that a rule called by another
    rule's jvp reads changed (its second derivative 50 % off): the programs of the first
    check were reused, and it passed at the first check's very error; the jaxprs of
    derivatives are taken as deep as the check goes where each calls rules again."""
    setting = {"scale": 1.0}

    @jax.custom_jvp
    def h(x):
        return 3 * x * x

    h.defjvp(lambda p, t: (h(p[0]), 6 * p[0] * t[0] * setting["scale"]))

    @jax.custom_jvp
    def f(x):
        return x**3

    f.defjvp(lambda p, t: (f(p[0]), h(p[0]) * t[0]))

    def fn(x):
        return jnp.sum(f(x))

    x = jnp.array([0.3, -0.5, 1.1])
    for scale, status in ((1.0, "pass"), (1.5, "fail"), (1.0, "pass")):
        setting["scale"] = scale
        for mode in ("reverse", "forward"):
            report = jaxcheck.verify(fn, x, order=2, mode=mode)
            assert report.status == status, (scale, mode, str(report))
        if status == "fail":
            assert report.relative_error == pytest.approx(0.5, rel=0.05), str(report)
            with pytest.raises(AssertionError, match="WRONG"):
                jaxcheck.check_grads(fn, (x,), order=2)
        else:
            jaxcheck.check_grads(fn, (x,), order=2)


@pytest.mark.parametrize("which", ["cross_entropy", "softmax"])
def test_order_2_of_a_softmax_saturated_beyond_float64_is_not_judged(which):
    """A softmax at a logit gap of 50 (JAX's check_grads passes it at order 2): its
    gradient's entries 1 - p round to 0 in float64 too, and the order-2 maps, made of that
    rounding, failed at relative errors of 3e4 to 7e5, where the order-1 check had found
    the derivative below what fn's values can show. Not judged now, saying why; a wrong
    second derivative at a gap of 5 still fails, and so does one cut off by a
    stop_gradient in a bwd at the same gap of 50 (its map is exactly zero where finite
    differences see it change: no rounding)."""
    fn = {
        "cross_entropy": lambda x: -jax.nn.log_softmax(50 * x)[0],
        "softmax": lambda x: jax.nn.softmax(50 * x),
    }[which]
    x = np.float32([0.0, -1.0])
    jax.test_util.check_grads(fn, (x,), 2)
    outcome = _check_grads.run(fn, (x,), 2)
    assert outcome.verdict == "unjudged", str(outcome.report)
    assert any("made of that rounding" in q for q in outcome.report.problems)
    wrong = sin_with_second_derivative(1.1)
    with pytest.raises(AssertionError, match="order 2"):
        jaxcheck.check_grads(lambda x: jax.nn.softmax(5 * wrong(x)), (x,), 2)

    @jax.custom_vjp
    def lse(logits):
        return jax.nn.logsumexp(logits)

    lse.defvjp(lambda a: (lse(a), a), lambda a, g: (g * lax.stop_gradient(jax.nn.softmax(a)),))
    logits = jnp.array([50.0, 0.0, 0.0, 0.3])
    with pytest.raises(AssertionError, match="order 2"):
        jaxcheck.check_grads(lambda a: lse(a) - a[0], (logits,), 2, modes=("rev",))
