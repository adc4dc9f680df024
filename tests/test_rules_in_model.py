"""verify(rules=...): the custom rules a model calls are found, checked where they are
called, and named with their call sites."""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from cases import enable_x64, sin_with_second_derivative, tanh_with_backward
from jaxcheck import _rule_search

SymbolicZero = jax.custom_derivatives.SymbolicZero

# how "rules fine" ends at order 1
FIRST_ORDER = " (their first derivatives; order=2 checks their second)"


@jax.custom_vjp
def good_sin(x):
    return jnp.sin(x)


good_sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))


@jax.custom_jvp
def good_exp(x):
    return jnp.exp(x)


good_exp.defjvp(lambda p, t: (jnp.exp(p[0]), jnp.exp(p[0]) * t[0]))


@jax.custom_vjp
def bad_tanh(x):
    return jnp.tanh(x)


bad_tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x)),))  # not 1 - t²


@jax.custom_vjp
def good_tanh(x):
    return jnp.tanh(x)


good_tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))


def make_loss(tanh, where):
    def in_scan(p, x):
        h = good_sin(x @ p["w"])

        def body(c, row):
            return c + tanh(row * p["b"]), None

        c, _ = jax.lax.scan(body, jnp.zeros(2), h)
        return jnp.sum(jax.jit(good_exp)(0.5 * c) ** 2)

    def in_jit(p, x):
        h = good_sin(x @ p["w"])
        c = jax.jit(lambda a: jnp.sum(tanh(a * p["b"]), axis=0))(h)
        return jnp.sum(good_exp(0.5 * c) ** 2)

    return {"scan": in_scan, "jit": in_jit}[where]


PARAMS = {"w": jnp.ones((3, 2)) / 3, "b": jnp.asarray([0.5, -0.3])}
X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def line_of(fn, text) -> int:
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("where", ["scan", "jit"])
def test_the_wrong_rule_is_named_with_its_call_site(where):
    loss = make_loss(bad_tanh, where)
    report = jaxcheck.verify(loss, PARAMS, X)  # rules="auto": on failure
    assert report.status == "fail"
    rules = report.parts[-1]
    assert rules.label.startswith("custom rule custom_vjp bad_tanh at ")
    call_site = (
        f"test_rules_in_model.py:{line_of(make_loss, 'tanh(row' if where == 'scan' else 'tanh(a')}"
    )
    wrong = [p for p in report.problems if p.startswith("wrong rule:")]
    assert len(wrong) == 1
    assert "custom_vjp bad_tanh at " in wrong[0] and call_site in wrong[0]
    assert ("scan body, first iteration" if where == "scan" else "inside jit") in wrong[0]
    assert "vjp vs finite differences, relative error" in wrong[0]
    fine = next(p for p in report.problems if p.startswith("rules fine:"))
    assert "custom_vjp good_sin" in fine and "custom_jvp good_exp" in fine
    verdicts = {r.label.split(" at ")[0]: r.status.value for r in rules.parts}
    assert verdicts == {
        "custom_vjp good_sin": "pass",
        "custom_vjp bad_tanh": "fail",
        "custom_jvp good_exp": "pass",
    }
    text = str(report)
    assert "custom_vjp bad_tanh at " in text and ": vjp vs finite differences" in text


def test_correct_model_lists_every_rule_as_fine():
    report = jaxcheck.verify(make_loss(good_tanh, "scan"), PARAMS, X, rules=True)
    assert report.ok, report
    rows = [c.name for c in report.parts[-1].checks]
    assert len(rows) == 3 and all(r.endswith(": all properties hold") for r in rows)
    assert str(report).startswith("jaxcheck.verify: PASS — derivatives of fn and its custom rules")


def test_rules_off_adds_nothing(monkeypatch):
    def refuse(*args):
        raise AssertionError("no rule search when rules are off")

    monkeypatch.setattr(_rule_search, "find", refuse)
    report = jaxcheck.verify(make_loss(bad_tanh, "scan"), PARAMS, X, rules=False)
    assert report.status == "fail" and not report.parts
    assert jaxcheck.verify(make_loss(good_tanh, "scan"), PARAMS, X).ok  # auto: pass, no search


def test_rule_found_alone_does_not_fail_a_passing_check_unless_asked():
    # the bad rule is off the differentiation path at these params: the gradient passes
    def loss(p):
        return jnp.sum(good_sin(p)) + 0.0 * jnp.sum(bad_tanh(jnp.cos(p)))

    p = jnp.asarray([0.3, -0.7])
    report = jaxcheck.verify(loss, p)
    assert report.ok and not any("bad_tanh" in q for q in report.problems), str(report)
    # asked, the rule is checked and listed as failing alone; fn's derivatives pass
    # cleanly, so its error does not reach them here: not counted
    report = jaxcheck.verify(loss, p, rules=True)
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if q.startswith("rules whose derivatives fail alone")]
    assert "custom_vjp bad_tanh at " in said
    # (neither counted nor cleared: the headline called fn's custom rules consistent, and
    # the row of a rule 290 % off read "ok")
    text = str(report)
    assert text.startswith(
        "jaxcheck.verify: PASS — derivatives of fn and 1 of its 2 custom rules are consistent"
    ), text
    [row] = [line for line in text.splitlines() if "bad_tanh" in line and "not counted)" in line]
    assert row.endswith("not counted"), row


def test_a_rule_whose_inputs_stop_gradient_cuts_off_is_not_checked():
    """fn's derivative never differentiates a rule whose inputs do not depend on params
    (data, or values behind a stop_gradient): it is held out of the check, and said so."""

    def loss(p):
        return jnp.sum(good_sin(p)) + 0.0 * jnp.sum(bad_tanh(jax.lax.stop_gradient(p)))

    report = jaxcheck.verify(loss, jnp.asarray([0.3, -0.7]), rules=True)
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if q.startswith("rule custom_vjp bad_tanh at ")]
    assert said.endswith(
        "no floating-point input that depends on params (fn's data and constants are held "
        "fixed, as fn's derivative never asks for theirs), nothing to differentiate; not "
        "checked"
    )


def test_rules_that_cannot_be_intercepted_are_listed_not_crashed():
    def loss(p):
        # the branch not taken holds a rule whose inputs are never computed
        y = jax.lax.cond(jnp.sum(p) > 0, lambda a: bad_tanh(a), lambda a: good_sin(a), p)
        return jnp.sum(y**2)

    p = jnp.asarray([0.3, 0.7])
    report = jaxcheck.verify(loss, p, rules=True)
    assert report.status == "fail"
    text = str(report)
    assert "custom_vjp good_sin at " in text and "cond branch not taken): not intercepted" in text
    assert "its inputs could not be intercepted; the leaf-level verdict stands" in text


def test_while_loop_body_is_checked_at_its_first_iteration():
    @jax.custom_jvp
    def bad_exp(x):
        return jnp.exp(x)

    bad_exp.defjvp(lambda p, t: (jnp.exp(p[0]), 2.0 * jnp.exp(p[0]) * t[0]))

    def loss(p):
        def body(s):
            return s[0] + 1, bad_exp(s[1])

        return jnp.sum(jax.lax.while_loop(lambda s: s[0] < 2, body, (0, p))[1])

    # a while loop has no reverse mode: forward mode checks it
    report = jaxcheck.verify(loss, jnp.asarray([0.3, -0.2]), mode="forward")
    assert report.status == "fail"
    assert report.parts[-1].label.startswith("custom rule custom_jvp bad_exp at ")
    assert report.parts[-1].label.endswith("(while body, first iteration)")


NONE_FOUND = (
    "rules: no custom_vjp/custom_jvp rule found in fn (one that fn itself differentiates, "
    "under a jax.grad, jax.vjp or jax.jvp inside fn, is traced already differentiated and "
    "cannot be found: check it with jaxcheck.verify_rule; a lax.custom_linear_solve's "
    "transpose_solve and a lax.custom_root's tangent_solve are not rules checked one by one)"
)


def test_model_without_rules_says_so():
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p)), jnp.ones(3), rules=True)
    assert report.ok and not report.parts
    assert NONE_FOUND in report.problems


def test_a_wrong_transpose_solve_is_pointed_at_though_no_rule_is_found():
    """A lax.custom_linear_solve whose transpose_solve is 1 % off: the gradient fails, no
    custom_vjp/custom_jvp rule is found, and the advice names transpose_solve as a
    derivative given, where it named only custom rules, which fn has none of."""
    a = jnp.array([[3.0, 1.0], [0.5, 2.0]])

    def loss(p):
        m = a * p["s"]
        x = jax.lax.custom_linear_solve(
            lambda x: m @ x,
            jnp.sin(p["b"]),
            solve=lambda _, b: jnp.linalg.solve(m, b),
            transpose_solve=lambda _, b: jnp.linalg.solve(m.T, b) * 1.01,
        )
        return jnp.sum(x**2)

    report = jaxcheck.verify(loss, {"b": jnp.array([0.3, 0.7]), "s": jnp.asarray(1.2)}, rules=True)
    assert report.status == "fail"
    assert NONE_FOUND in report.problems
    assert "or the transpose_solve of a lax.custom_linear_solve" in str(report)


def test_a_rule_under_a_gradient_inside_fn_is_not_said_to_be_absent():
    """A gradient penalty, <grad g, v>, through a custom_vjp whose bwd cuts off its own
    derivative: the check fails, and the report said that fn calls no rule."""

    @jax.custom_vjp
    def soft(x):
        return jnp.sin(x)

    soft.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jax.lax.stop_gradient(jnp.cos(x)),))

    def penalty(p):
        return jnp.vdot(jax.grad(lambda q: jnp.sum(soft(q) ** 2))(p), jnp.cos(p))

    report = jaxcheck.verify(penalty, jnp.linspace(0.2, 1.0, 4), rules=True)
    assert report.status == "fail", str(report)
    assert NONE_FOUND in report.problems


def test_raise_on_failure_carries_the_rules():
    with pytest.raises(jaxcheck.GradientCheckError, match="wrong rule: custom_vjp bad_tanh"):
        jaxcheck.verify(make_loss(bad_tanh, "jit"), PARAMS, X, raise_on_failure=True)


def test_rules_option_is_validated():
    with pytest.raises(ValueError, match="rules must be True, False or 'auto', got 'yes'"):
        jaxcheck.verify(lambda p: jnp.sum(p), jnp.ones(2), rules="yes")


def test_rule_inside_shard_map_is_listed_as_not_intercepted():
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh, PartitionSpec  # noqa: PLC0415

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        shard_map = pytest.importorskip("jax.experimental.shard_map").shard_map
    mesh = Mesh(np.array(jax.devices()[:1]), ("d",))

    def loss(p):
        spec = PartitionSpec("d")
        f = shard_map(bad_tanh, mesh=mesh, in_specs=spec, out_specs=spec)
        return jnp.sum(f(p))

    report = jaxcheck.verify(loss, jnp.asarray([0.3, 0.5]))
    assert report.status == "fail"
    assert "wrong: (root)" in report.problems
    note = next(p for p in report.problems if p.startswith("rule custom_vjp bad_tanh at "))
    assert note.endswith(
        "(inside shard_map): its inputs could not be intercepted; the leaf-level verdict stands"
    )


def test_rule_under_vmap_and_checkpoint_is_found_with_its_batched_inputs():
    def loss(p, x):
        rows = jax.vmap(lambda r: jax.checkpoint(lambda a: bad_tanh(a * p))(r))(x)
        return jnp.sum(rows**2)

    found, notes = _rule_search.find(loss, jnp.ones(3), (X,))
    assert notes == []
    [rule] = found
    assert rule.title.startswith("custom_vjp bad_tanh at ")
    assert rule.context == "inside checkpoint"
    assert [x.shape for x in rule.inputs] == [(4, 3)]


def test_jax_own_rules_are_checked_only_when_asked():
    """jax.nn.relu and jax.nn.softplus (logaddexp) are custom_jvp rules of JAX itself, in
    most models: a failing check names the model's own wrong rule and leaves JAX's alone
    (each rule checked costs about a check), unless rules=True."""

    def loss(p, x):
        h = jax.nn.relu(x @ p["w"]) + jax.nn.softplus(x @ p["w"])
        return jnp.sum(bad_tanh(h + p["b"]) ** 2)

    params = {"w": jnp.full((3, 2), 0.3), "b": jnp.asarray([0.1, -0.2])}
    x = jnp.linspace(0.1, 1.0, 12).reshape(4, 3)
    auto = jaxcheck.verify(loss, params, x)
    assert auto.status == "fail"
    assert [r.label.split(" at ")[0] for r in auto.parts[-1].parts] == ["custom_vjp bad_tanh"]
    assert "rules: JAX's own (logaddexp, relu) not checked; rules=True checks them too" in (
        auto.problems
    )
    every = jaxcheck.verify(loss, params, x, rules=True)
    checked = sorted(r.label.split(" at ")[0] for r in every.parts[-1].parts)
    assert checked == ["custom_jvp logaddexp", "custom_jvp relu", "custom_vjp bad_tanh"]


def test_scan_operands_are_told_apart_by_shape_without_count_parameters():
    """Newer JAX versions may not name a scan's constants and carries among its operands;
    the rule search then finds them by shape."""

    def f(c, xs, k):
        return jax.lax.scan(lambda c, x: (c + k * x, c * x), c, xs)

    jaxpr = jax.make_jaxpr(f)(jnp.ones(2), jnp.ones((5, 2)), 3.0)
    [eqn] = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    body = eqn.params["jaxpr"].jaxpr
    named = (eqn.params["num_consts"], eqn.params["num_carry"])
    params = {k: v for k, v in eqn.params.items() if k not in ("num_consts", "num_carry")}
    assert _rule_search._scan_counts(eqn.replace(params=params), body) == named == (1, 1)


SCALE = jnp.asarray([0.7, 0.3, -0.2])  # module-level arrays the rules below close over


def _closing_over(constant, bug=1.0):
    """A custom_vjp exp(c * x) and a custom_jvp sin(c * x) that close over the array
    `constant` (fn's trace lifts it into the rule's call as a constant input); the vjp's
    cotangent is scaled by `bug` (1: correct)."""

    @jax.custom_vjp
    def scaled_exp(x):
        return jnp.exp(constant * x)

    scaled_exp.defvjp(
        lambda x: (scaled_exp(x), x), lambda x, g: (g * bug * constant * jnp.exp(constant * x),)
    )

    @jax.custom_jvp
    def scaled_sin(x):
        return jnp.sin(constant * x)

    scaled_sin.defjvp(lambda p, t: (scaled_sin(p[0]), constant * jnp.cos(constant * p[0]) * t[0]))
    return lambda x: jnp.sum(scaled_exp(x) ** 2 + scaled_sin(x))


@pytest.mark.parametrize(
    "constant", [SCALE, np.asarray([0.7, 0.3, -0.2], np.float32)], ids=["jax", "numpy"]
)
def test_rules_closing_over_an_array_are_checked_in_their_arguments(constant):
    """JAX differentiates a custom rule in its explicit arguments only (differentiating a
    custom_vjp in a closed-over value raises); the rule check holds the closed-over values
    fixed too. Was: both correct rules called WRONG with a relative error of inf."""
    x = jnp.asarray([0.3, -0.5, 1.0])
    report = jaxcheck.verify(_closing_over(constant), x, rules=True)
    assert report.status == "pass", str(report)
    [fine] = [q for q in report.problems if q.startswith("rules fine: ")]
    assert "custom_vjp scaled_exp" in fine and "custom_jvp scaled_sin" in fine
    report = jaxcheck.verify(_closing_over(constant, bug=1.02), x, rules=True)
    assert report.status == "fail"
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert wrong.startswith("wrong rule: custom_vjp scaled_exp at ")
    assert "vjp vs finite differences, relative error 2.0e-02" in wrong
    assert any(q.startswith("rules fine: custom_jvp scaled_sin") for q in report.problems)


def test_a_rule_that_raises_where_it_is_checked_says_what_it_raised():
    """A backward pass that converts traced values to Python (it runs op by op in fn's
    own check, eagerly, but not under jit or vmap): the wrong-rule line names the error."""

    @jax.custom_vjp
    def untraceable_sin(x):
        return jnp.sin(x)

    def bwd(x, g):
        if float(jnp.sum(g)) > -1e9:  # Python control flow on a value
            return (g * jnp.cos(x),)
        return (g,)

    untraceable_sin.defvjp(lambda x: (untraceable_sin(x), x), bwd)
    x = jnp.asarray([0.3, -0.5, 1.0])
    report = jaxcheck.verify(lambda x: jnp.sum(untraceable_sin(x) ** 2), x, rules=True)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert "relative error inf (tolerance 1.2e-04); primal: ConcretizationTypeError: " in wrong


def test_the_wrong_rule_is_named_when_aux_holds_a_string():
    """has_aux=True lets aux hold anything; the rule search traces only fn's output (it
    traced aux too, and a string there stopped it: "fn could not be traced")."""
    p = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.full(2, 0.1)}
    x = jnp.linspace(-2.0, 2.0, 12).reshape(4, 3)

    def loss(p, x):
        h = bad_tanh(x @ p["w"] + p["b"])
        return jnp.mean(h**2), {"activations": h, "name": "layer 1"}

    report = jaxcheck.verify(loss, p, x, has_aux=True)
    assert report.status == "fail"
    assert any(q.startswith("wrong rule: custom_vjp bad_tanh at ") for q in report.problems), (
        report.problems
    )


@jax.custom_vjp
def sin_frozen_backward(x):
    return jnp.sin(x)


# right backward pass, but its derivative is not: the cosine is held fixed
sin_frozen_backward.defvjp(
    lambda x: (jnp.sin(x), x), lambda x, g: (g * jax.lax.stop_gradient(jnp.cos(x)),)
)


def test_a_rule_wrong_only_at_order_2_is_named_by_an_order_2_check():
    def loss(p, x):
        h = good_tanh(x @ p["w1"])
        return jnp.sum(sin_frozen_backward(h @ p["w2"]) ** 2)

    p = {
        "w1": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4),
        "w2": jnp.linspace(0.5, -0.7, 8).reshape(4, 2),
    }
    x = jnp.linspace(-2.0, 1.5, 15).reshape(5, 3)
    assert jaxcheck.verify(loss, p, x).status == "pass"  # first order: nothing to find
    report = jaxcheck.verify(loss, p, x, order=2)
    assert report.status == "fail"
    # (fn's vjp in its cotangent is right: that part passes; the rules part fails)
    assert [(q.label, q.status.value) for q in report.parts][:3] == [
        ("order 1: fn", "pass"),
        ("order 2: Hessian-vector products", "fail"),
        ("order 2: vjp map in its cotangent", "pass"),
    ]
    assert report.parts[3].label.startswith("custom rule custom_vjp sin_frozen_backward at ")
    assert report.parts[3].status == "fail"
    wrong = [q for q in report.problems if q.startswith("wrong rule:")]
    assert len(wrong) == 1
    assert wrong[0].startswith("wrong rule: custom_vjp sin_frozen_backward at ")
    assert "loss): vjp vs finite differences (order 2: vjp map), relative error 1.0e+00" in wrong[0]
    assert any(q.startswith("rules fine: custom_vjp good_tanh at ") for q in report.problems)


@jax.custom_jvp
def softplus_slightly_off(x):
    return jnp.log1p(jnp.exp(x))


# 2e-4 too large; the float literal is typed float32 in fn's trace at float32
softplus_slightly_off.defjvp(
    lambda p, t: (softplus_slightly_off(p[0]), jax.nn.sigmoid(p[0]) * t[0] * 1.0002)
)


def test_a_rule_in_a_float32_model_is_checked_in_float64():
    """The rule's equation in fn's float32 trace is typed float32 throughout, its literal
    1.0002 too, and refuses float64 inputs; the same equation from fn traced in float64
    takes them. Was: the rule checked in float32, where finite differences resolve 3.5e-4,
    and a bug of 2e-4 beside the model's failure of 2.0e-04 left unnamed."""
    x = jnp.linspace(-3.0, 3.0, 12).reshape(3, 4)
    report = jaxcheck.verify(
        lambda w, x: jnp.mean(softplus_slightly_off(x @ w)), jnp.full((4, 2), 0.3), x, rules=True
    )
    assert report.status == "fail"
    assert report.relative_error == pytest.approx(2e-4, rel=0.05)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert wrong.startswith("wrong rule: custom_jvp softplus_slightly_off at ")
    assert wrong.endswith(
        "<lambda>): vjp vs finite differences, relative error 2.0e-04 (tolerance 1.2e-06)"
    )
    [rule] = report.parts[-1].parts
    [fd] = [p for p in rule.parts if p.label.startswith("vjp vs finite differences")]
    assert (fd.tested_dtype, fd.reference_dtype) == ("float32", "float64")
    assert fd.status == "fail"


def float32_only(w, x):
    if w.dtype != jnp.float32:
        raise TypeError("this model runs in float32 only")
    return jnp.mean(softplus_slightly_off(x @ w))


def test_a_rule_in_a_model_refusing_float64_is_checked_in_float64_from_its_program():
    """fn refuses float64, so its rule is known only as fn's float32 trace typed it: its
    check ran in float32, where finite differences resolve 3.5e-4, and the bug of 2e-4
    passed. The rule's program is now evaluated with its float32 values held in float64
    (its primal and its derivative rules alike), which resolves it."""
    x = jnp.linspace(-3.0, 3.0, 12).reshape(3, 4)
    report = jaxcheck.verify(float32_only, jnp.full((4, 2), 0.3), x, rules=True)
    assert report.status == "fail", str(report)
    assert report.reference_dtype == "float32"
    [rule] = report.parts[-1].parts
    [fd] = [p for p in rule.parts if p.label.startswith("vjp vs finite differences")]
    assert (fd.reference_dtype, fd.tolerance) == ("float64", pytest.approx(1.2e-6, rel=0.05))
    assert fd.relative_error == pytest.approx(2e-4, rel=0.05)
    assert any(
        q.startswith("wrong rule: custom_jvp softplus_slightly_off") for q in report.problems
    )
    # its own function, checked alone, finds the same
    alone = jaxcheck.verify_rule(softplus_slightly_off, x @ jnp.full((4, 2), 0.3))
    assert alone.status == "fail"
    assert alone.relative_error == pytest.approx(2e-4, rel=0.05)


@jax.custom_vjp
def tanh_off_when_saturated(x):
    return jnp.tanh(x)


tanh_off_when_saturated.defvjp(
    lambda x: (jnp.tanh(x), x),
    lambda x, g: (g * jnp.where(jnp.abs(x) > 1.0, 1.05, 1.0) * (1 - jnp.tanh(x) ** 2),),
)


def test_a_rule_fine_at_a_loops_first_iteration_is_not_cleared_of_fns_error():
    """The rule is 5 % off only where |x| > 1, which the scan's first iteration (inputs
    near 0) does not reach: it is fine where it is checked, and the report says where that
    was. It is not listed as "rules fine" beside the model's failure (it was, with a note
    that read as a clean bill for the only rule in the model, the one at fault)."""

    def rnn(p, xs):
        def step(h, x):
            h = tanh_off_when_saturated(h @ p["wh"] + x @ p["wx"])
            return h, h

        return jnp.mean(jax.lax.scan(step, jnp.zeros(4), xs)[1] ** 2)

    k = jax.random.split(jax.random.key(2), 3)
    params = {
        "wh": 0.9 * jax.random.normal(k[0], (4, 4)),
        "wx": 0.3 * jax.random.normal(k[1], (2, 4)),
    }
    xs = jnp.concatenate([jnp.full((1, 2), 0.1), 3.0 * jax.random.normal(k[2], (7, 2))])
    report = jaxcheck.verify(rnn, params, xs)
    assert report.status == "fail"
    assert not any(q.startswith("rules fine") for q in report.problems), report.problems
    [loop] = [q for q in report.problems if q.startswith("a rule in a loop body")]
    assert loop.startswith(
        "a rule in a loop body was checked at the loop's first iteration only, so it is not "
        "cleared of fn's error: custom_vjp tanh_off_when_saturated at "
    )
    assert loop.endswith(
        "(scan body, first iteration); one wrong at later iterations (at inputs that first "
        "iteration does not reach) goes unseen there (check it with jaxcheck.verify_rule at "
        "those inputs)"
    )
    [row] = [c for c in report.checks if c.name.startswith("rule ")]
    assert row.name.endswith(": no error found at its first iteration only")


def test_a_rule_no_failing_leaf_reaches_is_cleared_beside_a_failure():
    """The model fails on a leaf that scales the loss after the scan (held by a
    stop_gradient), which never reaches the rule in the scan body: that rule, right at
    the first iteration, was still said "not cleared of fn's error", pointing at correct
    code. The leaves that reach it pass; the hedge stays for a rule they do reach."""

    def rnn(p, xs):
        def step(h, x):
            h = tanh_off_when_saturated(h @ p["wh"] + x @ p["wx"])
            return h, h

        out = jnp.mean(jax.lax.scan(step, jnp.zeros(4), xs)[1] ** 2)
        return out * jax.lax.stop_gradient(p["s"])

    k = jax.random.split(jax.random.key(2), 3)
    params = {
        "wh": 0.3 * jax.random.normal(k[0], (4, 4)),
        "wx": 0.3 * jax.random.normal(k[1], (2, 4)),
        "s": jnp.float32(1.3),
    }
    xs = 0.1 * jax.random.normal(k[2], (6, 2))
    report = jaxcheck.verify(rnn, params, xs)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['s']"]
    assert not any(q.startswith("a rule in a loop body") for q in report.problems)
    [fine] = [q for q in report.problems if q.startswith("rules fine")]
    assert "custom_vjp tanh_off_when_saturated at " in fine


def _cubic_root(bug):
    """x with x**3 + a x = b, per element, by Newton's method under lax.custom_root; its
    tangent solve `bug` too large."""

    def solve(a, b):
        def newton(f, x0):
            return jax.lax.fori_loop(0, 30, lambda _, x: x - f(x) / (3 * x**2 + a), x0)

        def tangent_solve(g, y):
            return y / g(jnp.ones_like(y)) * (1 + bug)

        f = lambda x: x**3 + a * x - b  # noqa: E731
        return jax.lax.custom_root(f, jnp.ones_like(b), newton, tangent_solve)

    return solve


@pytest.mark.parametrize("bug", [0.0, 0.01])
def test_a_value_passed_twice_to_a_rule_is_perturbed_as_one(bug):
    """custom_root hands a and b, which fn and the solver both close over, to its rule
    twice: checked as independent inputs, moving one copy moves the rule's derivative and
    not the solver's root, and the correct rule was called WRONG (relative error 1.1)."""
    solve = _cubic_root(bug)
    params = {"a": jnp.asarray([1.0, 2.0, 0.5]), "b": jnp.asarray([0.3, -1.0, 2.0])}
    report = jaxcheck.verify(lambda p: jnp.sum(solve(p["a"], p["b"]) ** 2), params, rules=True)
    if bug == 0:
        assert report.status == "pass", str(report)
        assert any(q.startswith("rules fine: custom_jvp _custom_root") for q in report.problems)
    else:
        assert report.status == "fail"
        [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
        assert wrong.startswith("wrong rule: custom_jvp _custom_root at ")
        assert "relative error 1.0e-02" in wrong


def test_a_rule_closing_over_a_value_computed_in_fn_is_not_called_wrong():
    def loss(p, x):
        scale = jnp.std(x) + 1.0  # traced inside fn: the jvp rule closes over it

        @jax.custom_jvp
        def scaled_tanh(h):
            return jnp.tanh(h * scale)

        scaled_tanh.defjvp(
            lambda pr, t: (scaled_tanh(pr[0]), (1 - jnp.tanh(pr[0] * scale) ** 2) * scale * t[0])
        )
        return jnp.sum(scaled_tanh(x * p["w"]) ** 2)

    p, x = {"w": jnp.asarray([0.5, -0.3, 0.2])}, jnp.asarray([1.0, 2.0, 3.0])
    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == "pass", str(report)
    assert str(report).splitlines()[0] == (
        "jaxcheck.verify: PASS — derivatives of fn are consistent with finite differences"
    )
    (note,) = [q for q in report.problems if "scaled_tanh" in q]
    assert note.endswith(
        "could not be checked alone: its derivative rule closes over a value computed inside "
        "fn, or is given one in its nondiff_argnums (UnexpectedTracerError); the leaf-level "
        "verdict stands. To check it, pass that value to the rule as a differentiable "
        "argument, or use jaxcheck.verify_rule on a function that does"
    )
    # beside a wrong rule, only the wrong one is named
    bad = jaxcheck.verify(lambda p, x: loss(p, x) + jnp.sum(bad_tanh(p["w"])), p, x)
    assert bad.status == "fail"
    wrong = [q for q in bad.problems if q.startswith("wrong rule")]
    assert len(wrong) == 1 and "bad_tanh" in wrong[0], bad.problems


def test_a_rule_of_integer_inputs_only_is_not_checked():
    table = jnp.linspace(0.0, 1.0, 5)

    @jax.custom_jvp
    def lookup(i):
        return jnp.take(table, i)

    lookup.defjvp(lambda p, t: (lookup(p[0]), jnp.zeros(p[0].shape)))
    report = jaxcheck.verify(
        lambda p, i: jnp.sum(lookup(i) * jnp.sin(p)),
        jnp.asarray([0.5, -0.3]),
        jnp.asarray([1, 3]),
        rules=True,
    )
    assert report.status == "pass", str(report)
    assert any(
        q.startswith("rule custom_jvp lookup at ")
        and q.endswith("nothing to differentiate; not checked")
        for q in report.problems
    ), report.problems


def test_rules_not_judged_are_said_so_and_not_claimed_in_the_headline():
    @jax.custom_jvp
    def safe_log(x):
        return jnp.log(jnp.where(x > 0, x, 1.0))

    safe_log.defjvp(
        lambda p, t: (
            safe_log(p[0]),
            jnp.where(p[0] > 0, t[0] / jnp.where(p[0] > 0, p[0], 1.0), 0.0),
        )
    )

    def loss(p, x):
        return jnp.sum(safe_log(jax.nn.relu(x * p)) * p) + jnp.sum(good_exp(p))

    report = jaxcheck.verify(loss, jnp.full(3, 0.5), jnp.asarray([1.0, 0.0, -3.0]), rules=True)
    assert report.status == "pass", str(report)
    assert str(report).splitlines()[0] == (
        "jaxcheck.verify: PASS — derivatives of fn and 2 of its 3 custom rules are consistent "
        "with finite differences"
    )
    # safe_log at 0 (a pole held off by its where) is not judged; relu, with one of its
    # inputs at its kink, is judged at the others (`verify_rule` holds that one fixed)
    (line,) = [q for q in report.problems if q.startswith("rules not judged")]
    assert "custom_jvp safe_log at " in line and "custom_jvp relu" not in line
    assert line.count("(inconclusive)") == 1
    (line,) = [q for q in report.problems if q.startswith("rules fine")]
    assert "custom_jvp relu at " in line and "custom_jvp good_exp at " in line


@pytest.mark.parametrize("value", [1, 0, 1.0, np.True_])
def test_rules_must_be_a_bool_or_auto(value):
    with pytest.raises(
        ValueError, match=re.escape(f"rules must be True, False or 'auto', got {value!r}.")
    ):
        jaxcheck.verify(lambda p: jnp.sum(p**2), jnp.ones(2), rules=value)


def _softplus_wrong_above(threshold):
    """A softplus whose derivative is 1.2 times too large at inputs above `threshold`."""

    @jax.custom_jvp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    softplus.defjvp(
        lambda p, t: (
            softplus(p[0]),
            jnp.where(p[0] > threshold, 1.2, 1.0) * jax.nn.sigmoid(p[0]) * t[0],
        )
    )
    return softplus


@pytest.mark.parametrize("called", ["loop", "tree_map"])
def test_a_rule_called_from_one_line_several_times_is_checked_at_its_later_calls(called):
    """A rule called several times from one line (a Python loop over layers, a tree_map
    over params) was checked at its first call only: one wrong at the inputs of a later
    call only was not named, though fn failed on the leaf that call reaches."""
    softplus = _softplus_wrong_above(0.0)  # the first call's inputs are negative

    def loop(params, x):
        for w in params:  # the first layer's inputs are negative, the second's positive
            x = softplus(x @ w)
        return jnp.sum(x)

    def mapped(params, x):
        out = jax.tree_util.tree_map(softplus, params)
        return jnp.sum(out[0] ** 2) + jnp.sum(out[1] ** 2) + jnp.sum(x)

    fn = {"loop": loop, "tree_map": mapped}[called]
    params = {"loop": [-jnp.eye(3) * 0.5, jnp.eye(3) * 2.0], "tree_map": [-x3, x3]}[called]
    report = jaxcheck.verify(fn, params, jnp.asarray([[1.0, 2.0, 3.0]]))
    assert report.status == "fail", str(report)
    [line] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert (
        line.startswith("wrong rule: custom_jvp softplus at ")
        and (
            " at its call 2 of 2 (the call checked first passes): vjp vs finite differences, "
            "relative error 2.0e-01"
        )
        in line
    ), line
    assert not [q for q in report.problems if q.startswith("a rule called several times")]


x3 = jnp.asarray([0.5, 1.0, 1.5])


def test_a_rule_called_more_often_than_checked_says_so():
    """Beyond the first call and 4 others, a rule's calls are not checked: said."""
    softplus = _softplus_wrong_above(60.0)  # reached by the last call only

    def loss(params, x):
        for w in params:
            x = softplus(x @ w)
        return jnp.sum(x)

    params = [jnp.eye(3) * 2.0 for _ in range(6)]
    report = jaxcheck.verify(loss, params, jnp.asarray([[0.5, 1.0, 1.5]]))
    assert report.status == "fail", str(report)
    assert not [q for q in report.problems if q.startswith("wrong rule: ")], str(report)
    (line,) = [q for q in report.problems if q.startswith("a rule called several times")]
    assert (
        "was checked at some of its calls only (the first whose inputs depend on params, and "
        "up to 4 others that the failing leaves reach): custom_jvp softplus at "
    ) in line
    assert "(6 calls, 5 checked); one wrong at the inputs of the others goes unseen" in line
    assert "no error found at 5 of its 6 calls only" in str(report), str(report)


@jax.custom_vjp
def tanh_off(z):
    return jnp.tanh(z)


tanh_off.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * (1 - jnp.tanh(z) ** 2) * 1.01,))


def test_a_rule_whose_first_call_sees_data_alone_is_checked_at_a_later_call():
    """In a loop over layers, the activation's first call takes the data alone (held
    fixed: nothing to differentiate), its second a value of params. The rule was reported
    "not checked" on its first call, and its 1 % error went unnamed."""

    def loss(ws, x):
        h = x
        for w in ws:
            h = tanh_off(h) @ w
        return jnp.sum(h**2)

    ws = [jnp.full((3, 3), 0.3), jnp.full((3, 3), -0.2)]
    report = jaxcheck.verify(loss, ws, jnp.linspace(-1.0, 1.0, 6).reshape(2, 3))
    assert report.status == "fail", str(report)
    [line] = [q for q in report.problems if q.startswith("wrong rule")]
    assert "custom_vjp tanh_off at " in line, line
    assert not any("nothing to differentiate" in q for q in report.problems), report.problems


def make_dense(scale):
    @jax.custom_vjp
    def dense(x, w):
        return x @ w

    dense.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, scale * r[0].T @ g))
    return dense


def test_rule_objects_of_one_name_called_from_one_line_are_each_checked():
    # a factory made both layers' rules; only the second one's bwd is wrong
    layers = [make_dense(1.0), make_dense(-1.0)]

    def loss(params, x):
        for dense, w in zip(layers, params):
            x = jnp.tanh(dense(x, w))
        return jnp.sum(x**2)

    params = [jnp.eye(3) * 0.5 + 0.1, jnp.eye(3) * 0.7 - 0.1]
    report = jaxcheck.verify(loss, params, jnp.asarray([[1.0, 2.0, -0.5]]))
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["[1]"]
    (wrong,) = [q for q in report.problems if q.startswith("wrong rule")]
    assert wrong.startswith("wrong rule: custom_vjp dense at "), wrong
    assert "(rule 2 of 2 of that name called here): vjp vs finite differences" in wrong
    (fine,) = [q for q in report.problems if q.startswith("rules fine")]
    assert fine.endswith("(rule 1 of 2 of that name called here)" + FIRST_ORDER), fine
    # one object called twice is one rule
    layers[1] = layers[0]
    report = jaxcheck.verify(loss, params, jnp.asarray([[1.0, 2.0, -0.5]]), rules=True)
    assert report.ok and not any("of that name" in q for q in report.problems), str(report)


def test_a_constant_passed_to_a_rule_is_held_fixed_as_in_the_model():
    # the temperature is a Python float in fn: its bwd may return None for it
    @jax.custom_vjp
    def tempered_softmax(x, temperature):
        return jax.nn.softmax(x / temperature)

    def fwd(x, t):
        y = jax.nn.softmax(x / t)
        return y, (y, t)

    def bwd(res, g):
        y, t = res
        return (y * (g - jnp.sum(g * y, -1, keepdims=True)) / t, None)

    tempered_softmax.defvjp(fwd, bwd)

    def loss(p, x):
        return jnp.sum(tempered_softmax(x @ p, 0.5) * jnp.arange(3.0))

    p = jnp.asarray([[0.5, -0.3, 0.2], [0.1, 0.4, -0.2]])
    x = jnp.asarray([[1.0, 2.0], [-1.0, 0.5]])
    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == "pass", str(report)
    assert any(q.startswith("rules fine: custom_vjp tempered_softmax") for q in report.problems)


def test_a_custom_gradient_rule_is_the_users_and_named_after_its_function():
    @jax.custom_gradient
    def clipped_sin(x):
        return jnp.sin(x), lambda g: (1.2 * g * jnp.cos(x),)  # 20 % off

    def loss(p, x):
        return jnp.sum(clipped_sin(x * p) ** 2)

    report = jaxcheck.verify(loss, jnp.asarray([0.5, -0.3, 0.2]), jnp.asarray([1.0, 2.0, 3.0]))
    assert report.status == "fail"
    (wrong,) = [q for q in report.problems if q.startswith("wrong rule")]
    assert wrong.startswith("wrong rule: custom_vjp clipped_sin at ")
    assert not any("JAX's own" in q for q in report.problems), report.problems


def test_a_jax_rule_masked_in_fn_is_not_counted_wrong_when_fn_passes():
    # jnp.sinc calls _sinc_maclaurin, right only at 0, and masks it with jnp.where elsewhere
    report = jaxcheck.verify(
        lambda p: jnp.sum(jnp.sinc(p)), jnp.asarray([0.3, -0.7, 1.2]), order=2, rules=True
    )
    assert report.status == "pass", str(report)
    (line,) = [q for q in report.problems if q.startswith("JAX's own rules that fail alone")]
    assert "custom_jvp _sinc_maclaurin at " in line
    assert line.endswith("so they are not counted as wrong")


def test_a_rule_error_fn_amplifies_is_found_by_the_rules_float64_check():
    """The rule is 1e-4 off; fn subtracts 0.999 of the same sine, so its gradient is 1e-1
    off. Checked in float32, as fn's float32 trace typed it, the rule resolved 3.5e-4 and
    was listed as too coarse to clear; from fn's float64 trace it runs in float64."""

    @jax.custom_jvp
    def my_sin(x):
        return jnp.sin(x)

    my_sin.defjvp(lambda p, t: (my_sin(p[0]), jnp.cos(p[0]) * t[0] * 1.0001))

    def loss(p, x):
        return jnp.sum(my_sin(x * p) - 0.999 * jnp.sin(x * p))

    report = jaxcheck.verify(loss, jnp.asarray([0.5, -0.3, 0.2]), jnp.asarray([1.0, 2.0, 3.0]))
    assert report.status == "fail" and report.relative_error == pytest.approx(0.1, rel=0.05)
    assert not any(q.startswith("rules fine") for q in report.problems), report.problems
    (line,) = [q for q in report.problems if q.startswith("wrong rule:")]
    assert line.startswith("wrong rule: custom_jvp my_sin at ")
    assert line.endswith("vjp vs finite differences, relative error 1.0e-04 (tolerance 1.2e-06)")


@pytest.mark.parametrize("bug", [2.0, 1.0])
def test_a_rule_beside_a_kink_at_the_point_is_judged_on_its_own(bug):
    """relu at 0 crosses every direction of the one leaf, so fn's check cannot judge; a
    custom rule 2x off beside it was left unjudged, and check_grads stayed quiet."""

    @jax.custom_vjp
    def sin2(x):
        return jnp.sin(x)

    sin2.defvjp(lambda x: (jnp.sin(x), x), lambda x, ct: (ct * jnp.cos(x) * bug,))

    def loss(p):
        return jnp.sum(jax.nn.relu(p)) + jnp.sum(sin2(p))

    x = jnp.asarray([0.0, 0.3, 0.5])
    report = jaxcheck.verify(loss, x)
    if bug == 1.0:
        assert report.status == "inconclusive", str(report)
        assert any(q.startswith("rules fine: custom_vjp sin2") for q in report.problems)
        jaxcheck.check_grads(loss, (x,), 1, modes=("rev",))
        return
    assert report.status == "fail", str(report)
    assert any(q.startswith("wrong rule: custom_vjp sin2") for q in report.problems)
    with pytest.raises(jaxcheck.GradientCheckError, match="custom rule custom_vjp sin2 at"):
        jaxcheck.check_grads(loss, (x,), 1, modes=("rev",))


def test_a_rule_with_a_python_constant_under_a_float64_reference():
    """A custom_jvp rule multiplying by 1.0, checked in a float32 model with
    precision="float64": its jvp, as the model's trace recorded it, holds a float32
    constant and cannot run on float64 inputs. It was called WRONG, with relative error
    inf and lax.mul's TypeError; the rule check falls back instead."""

    @jax.custom_jvp
    def good(x):
        return jnp.sin(x)

    good.defjvp(lambda p, t: (good(p[0]), 1.0 * jnp.cos(p[0]) * t[0]))
    x = jnp.array([0.3, -0.7, 1.2], jnp.float32)
    report = jaxcheck.verify(lambda q: jnp.sum(good(q)), x, precision="float64", rules=True)
    assert report.status == "pass", str(report)
    assert any(q.startswith("rules fine: custom_jvp good") for q in report.problems)


def test_a_users_backward_pass_around_a_jax_function_is_the_users_rule():
    """jax.custom_vjp(jnp.exp) with the user's own backward pass was listed as JAX's own
    rule (its function is defined in JAX) and not checked, so the wrong rule went unnamed."""
    my_exp = jax.custom_vjp(jnp.exp)
    my_exp.defvjp(lambda x: (jnp.exp(x), x), lambda x, g: (1.1 * jnp.exp(x) * g,))
    report = jaxcheck.verify(lambda q: jnp.sum(my_exp(q)), jnp.array([0.3, -0.7, 1.2]))
    assert report.status == "fail", str(report)
    assert any(q.startswith("wrong rule: custom_vjp exp at") for q in report.problems)
    assert not any("JAX's own" in q for q in report.problems), report.problems


def _sin_jvp(primals, tangents):
    return jnp.sin(primals[0]), 1.01 * jnp.cos(primals[0]) * tangents[0]


@pytest.mark.parametrize("define", ["defjvp", "defjvps"])
@pytest.mark.parametrize("alone", [False, True])
def test_a_users_jvp_around_a_jax_function_is_the_users_rule(define, alone):
    """jax.custom_jvp(jnp.sin) with the user's own jvp, 1 % off, was listed as JAX's own
    rule (its function is defined in JAX) and not checked; checked alone, it was placed at
    JAX's sin rather than at the user's jvp."""
    my_sin = jax.custom_jvp(jnp.sin)
    if define == "defjvp":
        my_sin.defjvp(_sin_jvp)
    else:
        my_sin.defjvps(lambda t, y, x: 1.01 * jnp.cos(x) * t)
    x = jnp.array([0.1, 0.5, -0.7, 1.3])
    report = jaxcheck.verify(my_sin if alone else lambda q: jnp.sum(my_sin(q)), x)
    assert report.status == "fail", str(report)
    [said] = [q for q in report.problems if q.startswith("wrong rule: custom_jvp sin at ")]
    assert "vjp vs finite differences, relative error 1.0e-02" in said, said
    assert ("test_rules_in_model.py" in said) and ("ufuncs.py" not in said), said
    assert not any("JAX's own" in q for q in report.problems), report.problems


@pytest.mark.parametrize("kind", ["custom_jvp", "custom_vjp"])
def test_an_equinox_rule_is_named_after_the_users_function(kind):
    """equinox's filter_custom_jvp and filter_custom_vjp wrap the user's function in their
    own (fn_wrapper, fn_wrapped): a wrong rule was reported under the wrapper's name. Its
    internal rule (_nondifferentiable, on the data) keeps its name, as any library's."""
    eqx = pytest.importorskip("equinox")
    a = jnp.array([0.5, 1.0, 1.5])
    if kind == "custom_jvp":

        @eqx.filter_custom_jvp
        def square(x):
            return x**2

        @square.def_jvp
        def _(primals, tangents):
            return primals[0] ** 2, 2.002 * primals[0] * tangents[0]

        report = jaxcheck.verify(lambda p: jnp.sum(square(p) * jnp.arange(3.0)), a)
        named, error = "custom_jvp square", "1.0e-03"
    else:

        @eqx.filter_custom_vjp
        def scale(w, x):
            return jnp.tanh(w * x)

        @scale.def_fwd
        def _(perturbed, w, x):
            return jnp.tanh(w * x), None

        @scale.def_bwd
        def _(res, g, perturbed, w, x):
            return 1.01 * jnp.sum(g * (1 - jnp.tanh(w * x) ** 2) * x)

        report = jaxcheck.verify(lambda p: jnp.sum(scale(p, a) ** 2), jnp.float32(0.7))
        named, error = "custom_vjp scale", "1.0e-02"
    assert report.status == "fail", str(report)
    [said] = [q for q in report.problems if q.startswith("wrong rule")]
    assert said.startswith(f"wrong rule: {named} at "), said
    assert f"vjp vs finite differences, relative error {error}" in said, said
    rows = [q.split(" at ")[0] for q in report.problems if q.startswith("rule ")]
    assert rows == (["rule custom_jvp _nondifferentiable"] if kind == "custom_vjp" else [])
    assert not any("fn_wrap" in q for q in report.problems), report.problems


@pytest.mark.parametrize("bug", [1.0, 1.003])
def test_a_float32_only_bug_in_a_small_rule_is_caught(bug):
    """A backward pass 0.3 % off in float32 only passes the model's check as rounding (the
    float64 rule is right); the rule's own row in float32 had a tolerance of 3.8e-3,
    because its values, <u, sin(x)> with random cotangents, cancel to 0.02 of their terms,
    and their noise over that size read as a precision of 8e-6 (float32's is 1.2e-7)."""

    @jax.custom_vjp
    def mysin(x):
        return jnp.sin(x)

    def bwd(x, g):
        return ((bug if x.dtype == jnp.float32 else 1.0) * jnp.cos(x) * g,)

    mysin.defvjp(lambda x: (jnp.sin(x), x), bwd)
    x = jnp.array([0.3, -0.7, 1.2], jnp.float32)
    report = jaxcheck.verify(lambda q: jnp.sum(mysin(q)), x)
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    if bug != 1.0:
        assert any(q.startswith("wrong rule: custom_vjp mysin") for q in report.problems)


@jax.custom_vjp
def _gelu_30_percent_off(z):
    return jax.nn.gelu(z)


_gelu_30_percent_off.defvjp(
    lambda z: (jax.nn.gelu(z), z),
    lambda z, g: (jax.vjp(jax.nn.gelu, z)[1](g)[0] * 1.3,),
)


def test_a_rule_recorded_in_bfloat16_is_not_called_fine_at_bfloat16_resolution():
    """Mixed precision: the rule as fn's trace recorded it holds bfloat16 constants and
    runs in neither float64 nor float32, so its finite differences resolve only ~40 %: a
    rule 30 % wrong passes there. Not "fine": too coarse, with the way to check it."""

    def loss(p, x):
        h = _gelu_30_percent_off(x.astype(jnp.bfloat16) @ p["w"].astype(jnp.bfloat16))
        return jnp.mean(h.astype(jnp.float32) ** 2)

    p = {"w": jax.random.normal(jax.random.key(0), (16, 32)) / 4}
    x = jax.random.normal(jax.random.key(1), (8, 16))
    report = jaxcheck.verify(loss, p, x)
    assert report.status == "inconclusive"
    assert not any(q.startswith("rules fine") for q in report.problems), report.problems
    (note,) = [q for q in report.problems if "too coarse to call fine" in q]
    assert re.search(
        r"too coarse to call fine: custom_vjp _gelu_30_percent_off at .* \(finite differences "
        r"in bfloat16, tolerance [0-9.]+e-01\); .*jaxcheck\.verify_rule at float32 inputs",
        note,
    ), note
    (row,) = [c for c in report.checks if c.name.startswith("rule ")]
    assert "no error found (finite differences in bfloat16" in row.name
    assert 0.1 < row.relative_error < row.tolerance  # the finite differences' numbers
    # alone, at float32 inputs, the rule's own code runs in float64 and fails
    alone = jaxcheck.verify_rule(_gelu_30_percent_off, (x @ p["w"]))
    assert alone.status == "fail"


@pytest.mark.parametrize("bug", [1.0, 1.01])
def test_a_rule_with_an_integer_output_is_judged_on_its_float_outputs(bug):
    """A custom_jvp returning a count beside its value (equinox's wrappers, optimistix's
    solvers do): its finite differences refused the int32 output, and a right rule was
    called wrong with a relative error of inf, failing a right gradient."""

    @jax.custom_jvp
    def counted(x):
        return jnp.sin(x), jnp.int32(3)

    @counted.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return counted(x), (bug * jnp.cos(x) * t, np.zeros((), jax.dtypes.float0))

    def loss(p):
        y, n = counted(p)
        return jnp.sum(y**2) * n

    report = jaxcheck.verify(loss, jnp.asarray([0.3, -0.2, 0.5]), rules=True)
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    if bug == 1.0:
        assert any(q.startswith("rules fine: custom_jvp counted") for q in report.problems)
    else:
        [said] = [q for q in report.problems if q.startswith("wrong rule: custom_jvp counted")]
        assert "vjp vs finite differences, relative error 1.0e-02" in said, said


@pytest.mark.parametrize("callback_in", ["primal", "jvp"])
def test_a_rule_that_raises_only_apart_from_fn_is_not_called_wrong(callback_in):
    """A rule that fn's own derivative runs but that raises where its check runs it another
    way (here under jax.vmap: a host callback without a vmap_method; equinox's
    filter_custom_vjp refuses tangents for its *args) is not called wrong: the error is the
    re-run's. It failed a right gradient. Where JAX cannot batch the rule's primal at all,
    the rule is checked with its vmap row not judged."""

    def host_cos(x):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(lambda a: np.cos(a).astype(a.dtype), shape, x)

    @jax.custom_jvp
    def host_cos_of(x):
        return host_cos(x) if callback_in == "primal" else jnp.cos(x)

    @host_cos_of.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        slope = -jnp.sin(x) if callback_in == "primal" else -host_cos(x - np.pi / 2)
        return host_cos_of(x), slope * t

    report = jaxcheck.verify(
        lambda p: jnp.sum(host_cos_of(p) ** 2), jnp.asarray([0.3, -0.2, 0.5]), rules=True
    )
    assert report.status == "pass", str(report)
    assert not any(q.startswith("wrong rule") for q in report.problems), report.problems
    if callback_in == "primal":
        (fine,) = [q for q in report.problems if q.startswith("rules fine")]
        assert "custom_jvp host_cos_of at " in fine
        [rule] = report.parts[-1].parts
        [vmap] = [p for p in rule.parts if p.label == "vmap"]
        assert not vmap.checks[0].judged and vmap.problems[0].startswith(
            "vmap: not checked: the rule cannot be batched by jax.vmap (NotImplementedError"
        )
        return
    [said] = [q for q in report.problems if q.startswith("rule custom_jvp host_cos_of at ")]
    assert "could not be checked alone (vmap: NotImplementedError: vmap is only supported" in said
    assert said.endswith(
        "rules its function calls in turn are not reached either (check them with "
        "jaxcheck.verify_rule)"
    )


@pytest.mark.parametrize("bug", [1.0, 1.01])
def test_a_rule_is_checked_in_the_inputs_that_depend_on_params_only(bug):
    """A custom_vjp of (params, data) whose backward pass returns None for the data, as
    researchers write one: fn's derivative never asks for the data's, but the rule was
    checked in both and called wrong (relative error 1.3) on a right model."""

    @jax.custom_vjp
    def matmul(w, x):
        return x @ w

    matmul.defvjp(lambda w, x: (x @ w, x), lambda x, g: (bug * x.T @ g, None))
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    p = {"w": jnp.linspace(0.2, 0.8, 6).reshape(3, 2), "b": jnp.asarray([0.1, -0.2])}

    def loss(p, x):
        return jnp.sum(jnp.tanh(matmul(p["w"], x) + p["b"]) ** 2)

    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == ("pass" if bug == 1.0 else "fail"), str(report)
    if bug == 1.0:
        assert any(q.startswith("rules fine: custom_vjp matmul") for q in report.problems)
    else:
        [wrong] = [q for q in report.problems if q.startswith("wrong rule: custom_vjp matmul")]
        assert "vjp vs finite differences, relative error 1.0e-02" in wrong, wrong


def test_a_rule_output_fn_never_uses_is_left_out_of_its_check():
    """A rule returning (value, statistic) whose backward pass ignores the statistic's
    cotangent, as flash-attention kernels ignore the log-sum-exp's: fn never uses it, so
    fn's derivative never sends one, yet the rule was checked with one and called wrong."""

    @jax.custom_vjp
    def normalized(z):
        return z - jax.nn.logsumexp(z), jax.nn.logsumexp(z)

    def bwd(z, g):
        return (g[0] - jnp.sum(g[0]) * jax.nn.softmax(z),)  # the statistic's g[1] ignored

    normalized.defvjp(lambda z: (normalized(z), z), bwd)

    def loss(p):
        y, _ = normalized(p)
        return jnp.sum(jnp.sin(y))

    report = jaxcheck.verify(loss, jnp.asarray([0.3, -0.2, 0.5, 0.1]), rules=True)
    assert report.status == "pass", str(report)
    assert any(q.startswith("rules fine: custom_vjp normalized") for q in report.problems)


def test_a_rule_failing_alone_where_fn_never_reaches_is_not_counted():
    """A user's relu at inputs a fixed mask holds at exactly 0: its derivative there cannot
    be judged alone (the kink is crossed by the rule's own finite differences, never by
    fn's; along random-sign cotangents some of them ran exactly along the kink, and it
    failed alone), fn's derivatives pass, and the check passed only for jax.nn.relu. The
    rule is judged at its other inputs, those at the kink held fixed."""

    @jax.custom_jvp
    def relu(z):
        return jnp.maximum(z, 0.0)

    relu.defjvp(lambda p, t: (relu(p[0]), jnp.where(p[0] > 0, t[0], 0.0)))
    mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    p = {"w": jnp.linspace(0.2, 0.8, 6).reshape(3, 2), "b": jnp.asarray([0.1, -0.2])}

    def loss(p, x):
        return jnp.sum(relu((x @ p["w"] + p["b"]) * mask) * jnp.asarray([0.3, -0.7]))

    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == "pass", str(report)
    [said] = report.problems
    assert said.startswith("rules fine: custom_jvp relu at "), said
    assert said.endswith("(their first derivatives; order=2 checks their second)")


def test_a_rule_integer_output_that_differs_under_vmap_is_not_compared():
    """optimistix's solvers return step counts beside the solution, and a vmapped solve
    takes other steps: the rule's vmap row compared those integers and called a right rule
    wrong. Integer outputs carry no derivative and are left out of every row."""

    def count(x):  # how many numbers the call sees: more under vmap
        shape = jax.ShapeDtypeStruct((), jnp.int32)
        size = lambda a: np.full(a.shape[:-1], a.size, np.int32)  # noqa: E731
        return jax.pure_callback(size, shape, x, vmap_method="expand_dims")

    @jax.custom_jvp
    def counted_sin(x):
        return jnp.sin(x), count(x)

    @counted_sin.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return counted_sin(x), (jnp.cos(x) * t, np.zeros((), jax.dtypes.float0))

    def loss(p):
        y, n = counted_sin(p)
        return jnp.sum(y**2) * jnp.where(n > 0, 1.0, 0.0)

    report = jaxcheck.verify(loss, jnp.asarray([0.3, -0.2, 0.5]), rules=True)
    assert report.status == "pass", str(report)
    assert any(q.startswith("rules fine: custom_jvp counted_sin") for q in report.problems)


def _bfloat16_matmul_model(w1_scale):
    """float32 params and bfloat16 matmuls (flax's dtype=jnp.bfloat16): fn's values are a
    staircase of bfloat16 quanta, and its finite differences resolve only about 0.2."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (8, 6))
    params = {"W1": jax.random.normal(k2, (6, 6)) / 2.4, "W2": jax.random.normal(k3, (6, 1)) / 2.4}
    bf = jnp.bfloat16

    @jax.custom_vjp
    def matmul(a, w):
        return (a.astype(bf) @ w.astype(bf)).astype(jnp.float32)

    def bwd(res, g):
        a, w = (r.astype(bf).astype(jnp.float32) for r in res)
        return g @ w.T, w1_scale * (a.T @ g)

    matmul.defvjp(lambda a, w: (matmul(a, w), (a, w)), bwd)

    def loss(p, x):
        h = jnp.tanh(matmul(x, p["W1"]))
        return jnp.mean(((h.astype(bf) @ p["W2"].astype(bf)).astype(jnp.float32)) ** 2)

    return loss, params, x


@pytest.mark.rules_auto
@pytest.mark.parametrize("w1_scale", [1.0, 0.7, 1.3])
def test_a_pass_at_half_precision_resolution_clears_no_rule(w1_scale):
    """fn's check passes at bfloat16 resolution (tolerance 0.4): a custom_vjp 30 % (and
    50 %) wrong in W1 passed there, under rules=True too, its failure put down to fn's
    derivatives passing."""
    loss, params, x = _bfloat16_matmul_model(w1_scale)
    report = jaxcheck.verify(loss, params, x)
    if w1_scale == 1.0:
        assert report.status == "pass", str(report)
        return
    assert report.status == "fail", str(report)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert wrong.startswith("wrong rule: custom_vjp matmul at ")
    assert "vjp vs finite differences, relative error 3.0e-01" in wrong


@pytest.mark.parametrize("w1_scale", [1.0, 0.5])
def test_a_leaf_not_judged_alone_undoes_a_pass_at_half_precision_resolution(w1_scale):
    """grad_fn halving W1's gradient passed (all-leaf error 0.44 against a tolerance of
    0.48) while W1 checked alone measured 0.5 and was inconclusive. With the truncation bar
    that allows for kinks within bfloat16-sized steps, the all-leaf check no longer
    resolves it at all; either way, no pass."""
    loss, params, x = _bfloat16_matmul_model(1.0)

    def grad_fn(p, x):
        g = jax.grad(loss)(p, x)
        return {"W1": w1_scale * g["W1"], "W2": g["W2"]}

    report = jaxcheck.verify(loss, params, x, grad_fn=grad_fn)
    if w1_scale == 1.0:
        assert report.status == "pass", str(report)
        return
    assert report.status == "inconclusive", str(report)
    [coarse] = [q for q in report.problems if q.startswith("finite-difference noise floor")]
    assert coarse == "finite-difference noise floor 2.7e-01 is too coarse to judge the gradient"
    [w1] = [leaf for leaf in report.leaves if leaf.path == "['W1']"]
    assert (w1.relative_error, w1.status) == (pytest.approx(0.5, abs=0.01), "inconclusive")


def test_a_coarse_all_leaf_pass_vouches_for_no_leaf_unjudged_alone():
    """At bfloat16 resolution the all-leaf check passes a gradient of W1 halved (weights
    2.5 times larger than above), while W1 checked alone cannot be judged: the pass does
    not vouch for it, and the check is inconclusive, naming it."""
    loss, params, x = _bfloat16_matmul_model(2.5)

    def grad_fn(p, x):
        g = jax.grad(loss)(p, x)
        return {"W1": 0.5 * g["W1"], "W2": g["W2"]}

    report = jaxcheck.verify(loss, params, x, grad_fn=grad_fn)
    assert report.status == "inconclusive", str(report)
    [note] = [q for q in report.problems if q.startswith("the all-leaf check passes at a")]
    assert re.match(
        r"the all-leaf check passes at a coarse resolution \(tolerance \d\.\de-01\), but "
        r"\['W1'\] \(relative error \d\.\de-01, 95% up to ",
        note,
    ), note
    assert note.endswith(
        "could not be judged alone, and its error may exceed that tolerance: not judged"
    )


def test_a_rule_taking_a_python_float_parameter_is_judged_in_it():
    """A Python float among params (a temperature) is differentiated like an array: the
    rule it enters was checked with it held fixed, and a cotangent 5 % off for it was
    cleared ("without an error found") while fn failed on that very leaf."""

    @jax.custom_vjp
    def scale(h, t):
        return h * t

    scale.defvjp(lambda h, t: (h * t, (h, t)), lambda r, g: (g * r[1], jnp.sum(g * r[0]) * 1.05))
    x = jnp.linspace(-0.5, 1.0, 12).reshape(4, 3)
    report = jaxcheck.verify(
        lambda p, x: jnp.sum(scale(jnp.tanh(x @ p["w"]), p["temp"])),
        {"w": jnp.ones(3) / 3, "temp": 0.7},
        x,
    )
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['temp']"]
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert "custom_vjp scale" in wrong and "relative error 2.4e-02" in wrong


def test_a_rule_failing_on_one_small_input_says_which():
    """A bias of size 1e-6 whose cotangent is 5 % off: the rule's error over all its inputs
    together is within tolerance, its check of that input alone fails. The problem line
    said only "relative error 3.4e-07 (tolerance 1.2e-06)" beside FAIL."""

    @jax.custom_vjp
    def addb(h, b):
        return h + b

    addb.defvjp(lambda h, b: (h + b, None), lambda _, g: (g, g.sum(0) * 1.05))
    keys = jax.random.split(jax.random.key(3), 10)
    x = jax.random.normal(keys[0], (6, 4))
    y = jax.random.normal(keys[1], (6, 2))
    params = {"W": jax.random.normal(keys[9], (4, 2)), "b": jnp.array([1e-6, -2e-6])}
    report = jaxcheck.verify(
        lambda p, x, y: jnp.mean((jnp.tanh(addb(x @ p["W"], p["b"])) - y) ** 2), params, x, y
    )
    assert report.status == "fail"
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert re.search(
        r"within the tolerance over all its inputs together; failing alone: args\[1\] "
        r"\(relative error 5\.0e-02\)",
        wrong,
    ), wrong


def test_rules_unjudged_at_bfloat16_inputs_point_to_checking_them_in_float32():
    """A bfloat16 model whose custom_vjp matmul is 50 % wrong in one cotangent: fn and the
    rule at the bfloat16 inputs fn gives it resolve no finer than bfloat16 (inconclusive);
    the report now says how to judge the rule finely, as verify_rule at float32 inputs
    does."""

    @jax.custom_vjp
    def bmm(a, b):
        return a @ b

    bmm.defvjp(lambda a, b: (a @ b, (a, b)), lambda r, g: (g @ r[1].T * 1.5, r[0].T @ g))

    def loss(p, x, y):
        pb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
        h = jnp.tanh(bmm(x.astype(jnp.bfloat16), pb["w1"]))
        return jnp.mean((bmm(h, pb["w2"]).astype(jnp.float32) - y) ** 2)

    keys = jax.random.split(jax.random.key(8), 8)
    x, y = jax.random.normal(keys[1], (8, 4)), jax.random.normal(keys[2], (8, 2))
    p = {"w1": jax.random.normal(keys[3], (4, 8)) / 2, "w2": jax.random.normal(keys[4], (8, 2)) / 3}
    report = jaxcheck.verify(loss, p, x, y)
    # (the products computed into bfloat16 count as rounding casts: where the rule's own
    # check then resolves the wrong cotangent, it fails, and is named)
    assert report.status in ("inconclusive", "fail"), str(report)
    if report.status == "fail":
        [said] = [q for q in report.problems if q.startswith("wrong rule")]
        assert said.startswith("wrong rule: custom_vjp bmm at "), said
    else:
        [said] = [q for q in report.problems if q.startswith("rules not judged")]
        assert said.endswith(
            "rules given bfloat16 or float16 inputs are resolved no finer than those: check "
            "such a rule alone with jaxcheck.verify_rule at float32 inputs, where its own "
            "code may run in float32 or float64"
        )
    alone = jaxcheck.verify_rule(bmm, jax.random.normal(keys[5], (3, 4)), jnp.ones((4, 2)))
    assert alone.status == "fail"


def _assert_one_wrong_rule(report, rule: str, ending: str) -> None:
    """fn failed, and exactly one rule, `rule` ("custom_vjp name"), is named wrong, its
    line ending with `ending`."""
    assert report.status == "fail", str(report)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert wrong.startswith(f"wrong rule: {rule} at "), wrong
    assert wrong.endswith(ending), wrong


def _scaled_sine(scale, bug):
    @jax.custom_vjp
    def act(x):
        return scale * jnp.sin(x)

    act.defvjp(
        lambda x: (scale * jnp.sin(x), x), lambda x, g: (g * scale * jnp.cos(x) * (1 + bug),)
    )
    return act


def _block(h, scale, bug=0.0):
    return _scaled_sine(scale, bug)(h)  # one call site for every layer


@pytest.mark.parametrize("where", ["jit", "cond"])
def test_rules_from_one_call_site_get_their_own_float64_record(where):
    """Two rules made at one line, one 0.1 % off: each rule's float64 record was the first
    one found at that line and shapes, so the correct rule was checked against the wrong
    one's record and named wrong too (and, in a cond, a taken branch by the other's)."""
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    w = jnp.arange(9.0).reshape(3, 3) / 7 - 0.3
    if where == "jit":

        def loss(w, x):
            h = _block(x @ w, 1.0, 1e-3)
            h = jax.jit(_block, static_argnums=(1, 2))(h, 2.0, 0.0)
            return jnp.sum(h**2)

    else:

        def loss(w, x):
            h = jax.lax.cond(
                jnp.sum(x @ w) > -100,
                lambda h: _block(h, 2.0),  # taken
                lambda h: _block(h, 1.0, 1e-2),
                x @ w,
            )
            return jnp.sum(h**2)

    report = jaxcheck.verify(loss, w, x, rules=True)
    wrong = [q for q in report.problems if q.startswith("wrong rule:")]
    fine = [q for q in report.problems if q.startswith("rules fine:")]
    if where == "jit":
        assert report.status == "fail"
        [wrong] = wrong
        assert wrong.endswith(
            "(_block): vjp vs finite differences, relative error 1.0e-03 (tolerance 1.2e-06)"
        )
        assert fine == [fine[0]] and fine[0].endswith("(_block) (inside jit)" + FIRST_ORDER)
    else:
        assert report.status == "pass", str(report)
        assert wrong == [] and fine[0].endswith("(_block) (inside cond)" + FIRST_ORDER)


def test_a_rule_taking_a_typed_key_is_checked_in_float64():
    """A typed PRNG key among a rule's inputs: its dtype is not NumPy's, and choosing the
    rule's float64 record raised, so the rule was not checked."""

    @jax.custom_vjp
    def noisy(x, key):
        return x + 0.01 * jax.random.normal(key, x.shape) * jnp.sin(x)

    def bwd(res, g):
        x, key = res
        noise = jax.random.normal(key, x.shape)
        return (g * (1 + 0.01 * noise * jnp.cos(x)) * (1 + 1e-3), None)

    noisy.defvjp(lambda x, key: (noisy(x, key), (x, key)), bwd)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    w = jnp.arange(9.0).reshape(3, 3) / 7 - 0.3
    report = jaxcheck.verify(lambda w, x: jnp.sum(noisy(x @ w, jax.random.key(0)) ** 2), w, x)
    _assert_one_wrong_rule(
        report,
        "custom_vjp noisy",
        "vjp vs finite differences, relative error 1.0e-03 (tolerance 1.0e-06)",
    )


@jax.custom_jvp
def _softplus_two_percent_off(x):
    return jnp.logaddexp(x, 0.0)


_softplus_two_percent_off.defjvp(
    lambda p, t: (_softplus_two_percent_off(p[0]), jax.nn.sigmoid(p[0]) * t[0] * 1.02)
)


def test_a_rule_in_a_bfloat16_model_gets_its_float64_record():
    """NumPy does not count bfloat16 as a floating-point type: a bfloat16 rule got no
    float64 record, ran in bfloat16 (tolerance 0.39) and was not named."""
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3).astype(jnp.bfloat16)
    w = (jnp.arange(9.0).reshape(3, 3) / 7 - 0.3).astype(jnp.bfloat16)

    def loss(w, x):
        return jnp.sum(_softplus_two_percent_off(x @ w).astype(jnp.float32) ** 2)

    report = jaxcheck.verify(loss, w, x, rules=True)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert wrong.startswith("wrong rule: custom_jvp _softplus_two_percent_off at ")
    assert "relative error 2.0e-02" in wrong


def test_a_rule_on_complex64_inputs_gets_its_float64_record():
    """complex64 is 8 bytes, as float64: counted wide by its size, its rule got no
    complex128 record and a 1e-4 error in it was "too coarse" to name."""

    @jax.custom_vjp
    def square(z):
        return z * z * 1.0

    square.defvjp(lambda z: (square(z), z), lambda z, g: (g * 2 * z * (1 + 1e-4),))
    z = jnp.array([0.3 + 0.4j, -0.5 + 0.2j], jnp.complex64)
    report = jaxcheck.verify(lambda z: jnp.sum(jnp.abs(square(z)) ** 2), z)
    _assert_one_wrong_rule(
        report,
        "custom_vjp square",
        "vjp vs finite differences, relative error 1.0e-04 (tolerance 1.2e-06)",
    )


@jax.custom_vjp
def _tanh_fast(x):
    return jnp.tanh(x)


_tanh_fast.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))


@jax.custom_vjp
def _tanh_reference(x):
    return jnp.tanh(x)


# wrong, but fn calls it in float64 only
_tanh_reference.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x)),))


def test_a_rule_fn_calls_in_float32_only_is_not_checked_against_another():
    """fn picks its rule by dtype: its float64 trace calls another rule at the same place,
    whose wrong derivative made the correct float32 rule a "wrong rule" and failed fn."""

    def loss(p, x):
        act = _tanh_reference if x.dtype == jnp.float64 else _tanh_fast
        return jnp.sum(act(x @ p) ** 2)

    p = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    x = jnp.linspace(0.1, 1.0, 6).reshape(2, 3)
    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == "pass", str(report)
    assert not [q for q in report.problems if q.startswith("wrong rule:")]
    assert any(q.startswith("rules fine: custom_vjp _tanh_fast at ") for q in report.problems)


@jax.custom_vjp
def _softplus_bwd_20_percent_off(x):
    return jnp.logaddexp(x, 0.0)


_softplus_bwd_20_percent_off.defvjp(
    lambda x: (_softplus_bwd_20_percent_off(x), x), lambda x, g: (g * jax.nn.sigmoid(x) * 1.2,)
)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_rule_before_a_half_precision_sum_gets_its_float64_record(dtype):
    """jnp.sum of bfloat16/float16 casts through float32, which its float64 trace does not:
    matched equation by equation, the traces differed and the rule got no float64 record
    (finite differences in the half precision, "too coarse" for a 20 % error)."""
    p = jnp.linspace(-1.0, 1.0, 6).astype(dtype).reshape(3, 2)
    x = jnp.linspace(0.1, 0.9, 6).astype(dtype).reshape(2, 3)
    report = jaxcheck.verify(
        lambda p, x: jnp.sum(_softplus_bwd_20_percent_off(x @ p) ** 2), p, x, rules=True
    )
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert wrong.startswith("wrong rule: custom_vjp _softplus_bwd_20_percent_off at ")
    assert "vjp vs finite differences, relative error 2.0e-01" in wrong


def test_a_rule_taking_an_index_fn_makes_gets_its_float64_record():
    """An index array made inside fn is int32 in its float32 trace and int64 in its float64
    one: passed as recorded, the float64 rule refused it and the rule fell back to float32."""

    @jax.custom_vjp
    def gather_scale(x, idx):
        return x[idx] * 3.0

    def bwd(res, g):
        idx, shape = res
        return (jnp.zeros(shape, g.dtype).at[idx].add(g * 3.0003), None)

    gather_scale.defvjp(lambda x, idx: (x[idx] * 3.0, (idx, x.shape)), bwd)
    report = jaxcheck.verify(
        lambda p: jnp.sum(jnp.sin(gather_scale(p, jnp.array([1, 2])))), jnp.linspace(-1, 1, 4)
    )
    [wrong] = [q for q in report.problems if q.startswith("wrong rule:")]
    assert wrong.startswith("wrong rule: custom_vjp gather_scale at ")
    assert wrong.endswith("relative error 1.0e-04 (tolerance 1.2e-06)")


def test_a_loop_rule_checked_at_its_first_iteration_is_not_called_fine_beside_a_wrong_rule():
    """Two wrong rules: `scale` (found) and `sp` in a scan body, wrong only at inputs above
    3, which the loop reaches from its third iteration on. Once `scale` was found wrong,
    `sp`, checked at the first iteration only, was listed under "rules fine"."""

    @jax.custom_jvp
    def sp(x):
        return jnp.logaddexp(x, 0.0)

    sp.defjvp(lambda p, t: (sp(p[0]), jax.nn.sigmoid(p[0]) * jnp.where(p[0] > 3, 1.05, 1.0) * t[0]))

    @jax.custom_vjp
    def scale(x, s):
        return x * s

    scale.defvjp(lambda x, s: (x * s, (x, s)), lambda r, g: (g * r[1] * 1.1, jnp.sum(g * r[0], 0)))

    def loss(p, x):
        h, _ = jax.lax.scan(lambda h, i: (sp(h @ p["w"] + 0.8 * h), None), 0.1 * x, None, 5)
        return jnp.mean(scale(h, p["s"]))

    keys = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(keys[0], (8, 8)) / 3, "s": jnp.ones(8)}
    report = jaxcheck.verify(loss, params, jax.random.normal(keys[1], (6, 8)))
    assert report.status == "fail", str(report)
    assert not any(q.startswith("rules fine") for q in report.problems), str(report)
    assert any(q.startswith("wrong rule: custom_vjp scale") for q in report.problems)
    names = [c.name for c in report.checks]
    assert any(
        "custom_jvp sp" in n and "no error found at its first iteration only" in n for n in names
    )


def test_the_programs_compiled_for_the_rules_are_counted():
    """A failing check's rule checks compiled programs of their own, which the report's
    `num_compiled` left out (0 for a warm fn whose rules compiled 9)."""

    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (1.1 * g * jnp.cos(x),))
    report = jaxcheck.verify(lambda p: jnp.sum(f(p) ** 2), jnp.linspace(0.1, 1.0, 5))
    gradient, rules = report.parts
    assert report.status == "fail" and rules.num_compiled > 0, str(report)
    assert report.num_compiled == gradient.num_compiled + rules.num_compiled


@jax.custom_vjp
def _sin_complex_cotangent(x):
    return jnp.sin(x)


_sin_complex_cotangent.defvjp(
    lambda x: (jnp.sin(x), x), lambda x, g: ((g * jnp.cos(x)).astype(jnp.complex64),)
)


def _encoder(p, x):
    h = _sin_complex_cotangent(jnp.tanh(x @ p["enc"]) * p["scale"])
    return jnp.mean((h @ p["dec"]) ** 2)


def _looped(p, x):
    def body(c, _):
        return c + jnp.sum(_sin_complex_cotangent(p["scale"])), None

    return jax.lax.scan(body, jnp.sum(x), None, length=3)[0]


@pytest.mark.parametrize("fn", [_encoder, _looped], ids=["between layers", "in a scan"])
def test_a_rule_whose_cotangent_has_another_dtype_inside_the_model_is_named(fn):
    """A custom_vjp's bwd returning a complex cotangent for a real input, between layers:
    the next operation of the reverse pass refuses it and JAX raised its own error (a
    TypeError from lax.mul, a bare AssertionError from a scan), naming no rule; the error
    now names the rule and says what is wrong with it."""
    params = {"enc": jnp.ones((4, 5)) * 0.3, "scale": jnp.full(5, 0.9), "dec": jnp.full(5, 0.2)}
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    with pytest.raises(TypeError) as caught:
        jaxcheck.verify(fn, params, x)
    said = str(caught.value)
    assert said.startswith("fn's derivative cannot be evaluated: JAX raised "), said
    assert "The custom rule custom_vjp _sin_complex_cotangent at " in said, said
    assert "gives its inputs cotangents of other dtypes than theirs" in said, said
    assert isinstance(caught.value.__cause__, TypeError | AssertionError)


@jax.custom_vjp
def nudged(w):
    return w


nudged.defvjp(lambda w: (w, None), lambda _, g: (g * (1 + 1e-4),))  # 1e-4 too large


def carry():
    """Fixes a scan's carry at float32, made inside fn: fn refuses float64 (an array fn
    closes over or reads from the globals is cast to float64 with its inputs)."""
    return jnp.zeros(3, jnp.float32)


@pytest.mark.rules_auto
@pytest.mark.parametrize("rules", ["auto", True])
def test_a_rule_below_what_float32_differences_resolve_is_named_wrong(rules):
    # fn's finite differences run in float32 (tolerance about 3e-4): its pass clears no
    # rule of an error of 1e-4, which the rule's own check, in float64, resolves
    def loss(p, xs):
        w = nudged(p["w"])
        c, _ = jax.lax.scan(lambda c, x: (jnp.tanh(c * w + x * p["b"]), None), carry(), xs)
        return jnp.sum(c**2)

    p = {"w": jnp.asarray([0.5, -0.4, 0.3]), "b": jnp.asarray([0.2, 0.1, -0.3])}
    xs = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    report = jaxcheck.verify(loss, p, xs, rules=rules)
    assert report.status == "fail", str(report)
    (wrong,) = [q for q in report.problems if q.startswith("wrong rule")]
    assert wrong.startswith("wrong rule: custom_vjp nudged at "), wrong
    assert not any("not counted" in q for q in report.problems), report.problems


def masked_softmax_rule(right):
    @jax.custom_vjp
    def smax(s):
        return jax.nn.softmax(s, -1)

    def bwd(y, g):
        return (y * (g - jnp.sum(g * y, -1, keepdims=True)) if right else y * g,)

    smax.defvjp(lambda s: (jax.nn.softmax(s, -1), jax.nn.softmax(s, -1)), bwd)
    return smax


@pytest.mark.rules_auto
@pytest.mark.parametrize("right", [True, False])
def test_a_rule_given_a_causal_masks_minus_inf_is_judged_on_the_other_entries(right):
    smax = masked_softmax_rule(right)

    def loss(p, x):
        s = (x @ p["q"]) @ (x @ p["k"]).T
        s = jnp.where(jnp.tril(jnp.ones((4, 4), bool)), s, -jnp.inf)
        return jnp.mean(jnp.sin(smax(s) @ x))

    p = {"q": jnp.eye(3) * 0.5 + 0.1, "k": jnp.eye(3) * 0.4 - 0.1}
    x = jnp.cos(jnp.arange(12.0)).reshape(4, 3)
    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == ("pass" if right else "fail"), str(report)
    text = "\n".join(report.problems)
    assert "rule custom_vjp smax at " in text
    assert (
        "its inputs' entries that are -inf, inf or NaN in fn (a mask's -inf before a softmax, "
        "say) were held fixed, the others checked"
    ) in text
    assert not any(q.startswith("rules not judged") for q in report.problems), text
    if right:
        assert any(q.startswith("rules fine: custom_vjp smax at ") for q in report.problems)
    else:
        (wrong,) = [q for q in report.problems if q.startswith("wrong rule")]
        assert wrong.startswith("wrong rule: custom_vjp smax at "), wrong


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def tangent_scaled(x, scale):
    return x


@tangent_scaled.defjvp
def _tangent_scaled(scale, primals, tangents):
    return primals[0], scale * tangents[0]


@pytest.mark.rules_auto
def test_a_rule_in_a_model_refusing_float64_is_found_wrong_in_float64():
    # fn refuses float64 (its scan's carry is fixed at float32), and so did the rule's
    # record in fn's trace: its finite differences in float32 resolved about 3.5e-4, and a
    # rule 3e-4 off was listed as fine, later as too coarse to call fine; its program is
    # now evaluated in float64, which finds it
    def fn(p, xs):
        w = tangent_scaled(p["w"], 1 + 3e-4)
        c, _ = jax.lax.scan(lambda c, x: (jnp.tanh(c @ w + x), None), carry(), xs)
        return jnp.sum(jnp.sin(c))

    p = {"w": jnp.linspace(-0.5, 0.5, 9).reshape(3, 3)}
    report = jaxcheck.verify(fn, p, jnp.cos(jnp.arange(12.0)).reshape(4, 3))
    text = "\n".join(report.problems)
    assert report.status == "fail", text
    (line,) = [q for q in report.problems if q.startswith("wrong rule")]
    assert line.startswith("wrong rule: custom_jvp tangent_scaled at "), line
    assert line.endswith("relative error 3.0e-04 (tolerance 1.2e-06)"), line


def test_a_param_passed_in_nondiff_argnums_is_said_to_be_cut_off_there():
    """JAX does not differentiate a custom_jvp's nondiff_argnums: a param passed there has
    a zero gradient. The failing leaf and the rule's note both name that cause."""

    @functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
    def scaled_sin(x, s):
        return jnp.sin(x) * s

    @scaled_sin.defjvp
    def _(s, primals, tangents):
        return scaled_sin(primals[0], s), jnp.cos(primals[0]) * s * tangents[0]

    x = jnp.linspace(-1.0, 1.0, 4)
    params = {"s": jnp.float32(1.5), "w": jnp.ones(4)}
    report = jaxcheck.verify(lambda p: jnp.sum(scaled_sin(p["w"] * x, p["s"]) ** 2), params)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['s']"]
    (cut,) = [q for q in report.problems if q.startswith("['s']: the derivative under test")]
    assert "a value passed in a custom_jvp/custom_vjp's nondiff_argnums" in cut
    (rule,) = [q for q in report.problems if "scaled_sin" in q]
    assert "or is given one in its nondiff_argnums (UnexpectedTracerError)" in rule, rule


@pytest.mark.parametrize("scale", [1.0, 1.05])
def test_a_rule_wrong_at_order_2_beside_a_kink_is_checked_at_order_2(scale):
    """fn's order-2 check cannot judge at a kink of its derivative (relu(x) * x at 0), and
    the rules were then checked at order 1 only, where a sin whose second derivative is
    5 % off is right: "rules fine" beside an inconclusive verdict."""
    sin = sin_with_second_derivative(scale)
    x = jnp.array([0.0, 0.5, -0.7, 1.1])
    report = jaxcheck.verify(lambda x: jnp.sum(jax.nn.relu(x) * x + sin(x)), x, order=2)
    if scale == 1.0:
        assert report.status == "inconclusive", str(report)
        (fine,) = [q for q in report.problems if q.startswith("rules fine:")]
        assert "custom_jvp sin at " in fine
        return
    assert report.status == "fail", str(report)
    (wrong,) = [q for q in report.problems if q.startswith("wrong rule:")]
    assert wrong.startswith("wrong rule: custom_jvp sin at ")
    assert "vjp vs finite differences (order 2: vjp map), relative error 5.0e-02" in wrong


@pytest.mark.rules_auto
def test_right_rules_of_a_bfloat16_model_cleared_in_float64_are_fine():
    """A bfloat16 model's rules are recorded at bfloat16 resolution (7.8e-2) and checked
    again as the same rule in float64 (to 1e-6). Right rules passing there were listed as
    "too coarse to clear them" at the bfloat16 row's tolerance, labelled float64."""

    @jax.custom_vjp
    def softplus_bad(x):
        return jnp.logaddexp(x, 0.0)

    softplus_bad.defvjp(
        lambda x: (softplus_bad(x), x), lambda x, g: (g * jax.nn.sigmoid(x) * 1.01,)
    )

    def loss(p, x):
        z = x.astype(jnp.bfloat16) @ p["w"] + p["b"]
        return jnp.mean(good_tanh(z) ** 2 + softplus_bad(z)).astype(jnp.float32)

    p = {
        "w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3).astype(jnp.bfloat16),
        "b": jnp.array([-0.5, 0.1, 0.3], jnp.bfloat16),
    }
    x = jnp.cos(jnp.arange(20.0)).reshape(5, 4)
    report = jaxcheck.verify(loss, p, x)
    assert report.status == "fail", str(report)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert wrong.startswith("wrong rule: custom_vjp softplus_bad at ")
    [fine] = [q for q in report.problems if q.startswith("rules fine: ")]
    assert fine.startswith("rules fine: custom_vjp good_tanh at ")
    assert not any("too coarse" in q for q in report.problems), report.problems


@pytest.mark.rules_auto
def test_loop_rules_checked_at_the_first_iteration_are_listed_beside_a_wrong_one():
    """Rules of a scan body that pass at its first iteration are not cleared of fn's
    error; beside a rule found wrong they were in the table alone, in no line of the
    problems."""

    @jax.custom_vjp
    def tanh_bad(x):
        return jnp.tanh(x)

    tanh_bad.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2) * 1.01,))

    @jax.custom_vjp
    def softplus_ok(x):
        return jnp.logaddexp(x, 0.0)

    softplus_ok.defvjp(lambda x: (softplus_ok(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))

    def loss(p, xs):
        def body(h, x):
            h = tanh_bad(x @ p["w"] + h * 0.5 + p["b"])
            return h, softplus_ok(h)

        return jnp.mean(jax.lax.scan(body, jnp.zeros(3), xs)[1])

    p = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([-0.5, 0.1, 0.3])}
    report = jaxcheck.verify(loss, p, jnp.cos(jnp.arange(20.0)).reshape(5, 4))
    assert report.status == "fail", str(report)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert wrong.startswith("wrong rule: custom_vjp tanh_bad at ")
    [loop] = [q for q in report.problems if q.startswith("a rule in a loop body was checked")]
    assert "not cleared of fn's error: custom_vjp softplus_ok at " in loop


@pytest.mark.rules_auto
@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_a_rule_nan_where_fn_discards_it_is_judged_at_its_finite_entries(scale):
    """A custom_vjp log behind jnp.where is NaN at the inputs fn discards: its check was
    nonfinite, listed as "(nonfinite)" alone, and a rule 1 % wrong was never named."""

    @jax.custom_vjp
    def my_log(x):
        return jnp.log(x)

    my_log.defvjp(lambda x: (jnp.log(x), x), lambda x, g: (g / x * scale,))

    def loss(p, x):
        z = x @ p["w"] + p["b"]
        return jnp.mean(jnp.where(z > 0, my_log(z), 0.0))

    p = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([-0.5, 0.1, 0.3])}
    x = jnp.cos(jnp.arange(20.0)).reshape(5, 4)
    with jax.transfer_guard("disallow"):  # (the rule's entries are read on the host)
        report = jaxcheck.verify(loss, p, x, rules=True)
    assert not any(q.startswith("rules not judged") for q in report.problems), report.problems
    if scale == 1.0:
        assert report.status == "pass", str(report)
        assert any(q.startswith("rules fine: custom_vjp my_log at ") for q in report.problems)
        return
    assert report.status == "fail", str(report)
    [wrong] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert wrong.startswith("wrong rule: custom_vjp my_log at ")
    [rule] = report.parts[-1].parts
    assert re.match(
        r"the rule's output is NaN/Inf at \d+ of its 15 output entries at these inputs, "
        r"which fn discards there",
        rule.parts[1].problems[0],
    ), rule.parts[1].problems


@pytest.mark.rules_auto
@pytest.mark.parametrize("outputs", ["one", "two"])
def test_a_rule_nan_at_every_entry_fn_discards_is_said_to_be_unjudged_and_why(outputs):
    """Every entry of the rule's output is NaN where fn discards all of them: nothing is
    left to judge it at, and the report said "(nonfinite)" alone (with two outputs too,
    whose paths are not "(root)")."""

    @jax.custom_vjp
    def my_log(x):
        return jnp.log(x) if outputs == "one" else (jnp.log(x), 2 * jnp.log(x))

    def bwd(x, g):
        return (g / x * 1.01 if outputs == "one" else (g[0] + 2 * g[1]) / x * 1.01,)

    my_log.defvjp(lambda x: (my_log(x), x), bwd)

    def loss(p):
        y = my_log(p["z"]) if outputs == "one" else my_log(p["z"])[1]
        return jnp.sum(jnp.where(p["z"] > 0, y, 0.0)) + jnp.sum(p["w"] ** 3)

    p = {"z": -jnp.linspace(1.0, 2.0, 3), "w": jnp.array([0.3, -0.4])}
    report = jaxcheck.verify(loss, p, rules=True)
    [unjudged] = [q for q in report.problems if q.startswith("rules not judged")]
    assert "custom_vjp my_log at " in unjudged
    assert unjudged.endswith(
        "(nonfinite: its output is NaN/Inf at every entry it could be judged at, which fn "
        "may discard (as jnp.where(x > 0, rule(x), 0) does); check it with "
        "jaxcheck.verify_rule at inputs where it is finite)"
    )


@jax.custom_vjp
def _tanh_factor_stopped(x):
    return jnp.tanh(x)


_tanh_factor_stopped.defvjp(
    lambda x: (jnp.tanh(x), x),
    lambda x, g: (g * jax.lax.stop_gradient(1 - jnp.tanh(x) ** 2),),
)


def test_a_rule_differentiated_inside_fn_is_not_cleared_by_its_first_order_check():
    """A PINN-style loss takes jax.grad of the network inside itself, so its derivative
    takes the rule's second derivative: a bwd right at first order but holding its factor
    behind a stop_gradient makes fn fail, while the rule's first-order check passes. The
    report listed that rule as fine and said nothing more."""

    def net(p, z):
        return jnp.sum(p["w2"] * _tanh_factor_stopped(p["w1"] @ z + p["b1"]))

    def loss(p, zs):
        du = jax.vmap(jax.grad(lambda z: net(p, z)))(zs)
        return jnp.mean(du**2) + jnp.mean(jax.vmap(lambda z: net(p, z))(zs) ** 2)

    keys = jax.random.split(jax.random.key(1), 4)
    p = {
        "w1": jax.random.normal(keys[0], (4, 2)),
        "b1": 0.1 * jax.random.normal(keys[1], (4,)),
        "w2": jax.random.normal(keys[2], (4,)) / 3,
    }
    zs = jax.random.uniform(keys[3], (6, 2), minval=-1, maxval=1)
    report = jaxcheck.verify(loss, p, zs)
    assert report.status == "fail", str(report)
    [note] = [q for q in report.problems if q.startswith("every rule found passes")]
    assert note == (
        "every rule found passes where it was checked at order 1, so fn's error is outside "
        "them, unless fn "
        "differentiates inside itself (jax.grad or jax.jvp in fn: a PINN residual, a MAML "
        "step, a gradient penalty): its derivative then takes derivatives of order 2 of the "
        "rules it differentiates, which these checks do not clear (check each with "
        "jaxcheck.verify_rule(rule, *args, order=2)), and a rule called only inside such an "
        "inner derivative is not found here at all"
    )
    assert jaxcheck.verify_rule(_tanh_factor_stopped, jnp.linspace(-1, 1, 5), order=2).status == (
        "fail"
    )


def test_a_rule_differentiated_inside_fn_in_a_loop_over_layers_gets_the_same_hint():
    """A gradient penalty over a critic whose two layers call the rule from one line: the
    report said only that later calls go unseen, not that fn's inner derivative takes the
    rule's second derivative. (Both calls are checked now.)"""

    def critic(p, x):
        for w in (p["w1"], p["w2"]):  # two layers, one line
            x = _tanh_factor_stopped(x @ w)
        return x @ p["w3"]

    def penalty(p, xs):  # a critic's loss and its gradient penalty
        g = jax.vmap(jax.grad(lambda x: critic(p, x)))(xs)
        scores = jax.vmap(lambda x: critic(p, x))(xs)
        return jnp.mean(scores) + jnp.mean((jnp.linalg.norm(g, axis=-1) - 1.0) ** 2)

    keys = jax.random.split(jax.random.key(0), 4)
    p = {
        "w1": jax.random.normal(keys[0], (2, 8)),
        "w2": jax.random.normal(keys[1], (8, 8)) / 3,
        "w3": jax.random.normal(keys[2], (8,)) / 3,
    }
    report = jaxcheck.verify(penalty, p, jax.random.normal(keys[3], (16, 2)))
    assert report.status == "fail", str(report)
    assert not [q for q in report.problems if q.startswith("a rule called several times")]
    [note] = [q for q in report.problems if q.startswith("every rule found passes")]
    assert "(check each with jaxcheck.verify_rule(rule, *args, order=2))" in note


def test_a_part_of_rules_none_judged_prints_what_it_found():
    """A straight-through estimator (round forward, identity backward): fn fails (flat
    about params), the rule is not judged at the inputs fn gives it, and the rules part,
    which passes (no rule wrong), has no part of its status to head its text: printing it
    raised an IndexError."""

    @jax.custom_vjp
    def round_ste(x):
        return jnp.round(x)

    round_ste.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))

    def fn(p, x, t):
        return jnp.sum((round_ste(3 * (x @ p["W"] + p["b"])) / 3 - t) ** 2)

    rng = np.random.default_rng(0)
    params = {
        "W": jnp.asarray(rng.standard_normal((4, 3)) * 0.8, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3) * 0.2, jnp.float32),
    }
    x = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    t = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
    report = jaxcheck.verify(fn, params, x, t)
    assert report.status == "fail", str(report)
    (rules,) = [p for p in report.parts if p.label == "custom rules"]
    assert [p.status for p in rules.parts] == ["inconclusive"]
    text = str(rules)
    assert text.startswith(
        "jaxcheck.verify: PASS — nothing found wrong in custom rules, though not all were "
        "judged\n  ! rules not judged at the inputs fn gives them: custom_vjp round_ste at "
    ), text
    assert "relative error 0.0e+00" not in text


def test_a_straight_through_rule_named_wrong_says_why_instead_of_noise_units():
    """A straight-through estimator named as the wrong rule read "relative error 4.4e-01
    (tolerance 2.0e+00), within the tolerance over all its inputs together; failing alone:
    args[0] (relative error 7.0e-01)": errors in units of noise, below the tolerance,
    for a rule of one input. It says why it fails instead."""

    @jax.custom_vjp
    def ste_round(x):
        return jnp.round(x)

    ste_round.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))

    def fn(p, x):  # (its inputs far from round's jumps: the rule is flat about them)
        h = jnp.tanh(x @ p)
        return jnp.mean((ste_round(h) + h) ** 2)

    w = jnp.sin(jnp.arange(20.0)).reshape(4, 5) * 0.1
    x = jnp.cos(jnp.arange(24.0)).reshape(6, 4)
    report = jaxcheck.verify(fn, w, x)
    assert report.status == "fail", str(report)
    [line] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert line.startswith("wrong rule: custom_vjp ste_round at "), line
    assert line.endswith(
        ": vjp vs finite differences; its function is piecewise constant about these inputs "
        "(or flat to within float64, saturated, where a rule that is not 0 is wrong), its "
        "derivative 0, while the rule's is not: a surrogate gradient (a straight-through "
        "estimator, a custom rule that is not fn's derivative by design) fails this check by "
        "construction"
    ), line


def test_a_wrong_rule_in_a_term_fn_weighs_lightly_is_said_to_be_below_fns_tolerance():
    """A rule 20 % off in a term weighted 1e-6: its error reaches fn's gradient at 2e-7,
    below fn's float32 tolerance, so fn passes and the rule is listed but not counted;
    the note said its error "does not reach fn's derivatives here", which is not so."""

    @jax.custom_vjp
    def log1p(x):
        return jnp.log1p(x)

    log1p.defvjp(lambda x: (jnp.log1p(x), x), lambda x, g: (1.2 * g / (1 + x),))

    def loss(p, x):
        h = jnp.tanh(x @ p["w1"])
        return jnp.mean(h @ p["w2"]) + 1e-6 * jnp.mean(log1p(h**2))

    rng = np.random.RandomState(1)
    params = {
        "w1": jnp.asarray(rng.randn(4, 5) / 2, jnp.float32),
        "w2": jnp.asarray(rng.randn(5, 3) / 2, jnp.float32),
    }
    x = jnp.asarray(np.random.RandomState(0).randn(8, 4), jnp.float32)
    report = jaxcheck.verify(loss, params, x, rules=True)
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if q.startswith("rules whose derivatives fail alone")]
    assert "or reaches them below fn's tolerance (a term fn weighs lightly)" in said, said


def test_rules_fine_at_order_1_say_that_their_first_derivatives_were_checked():
    """A bwd hiding cos(x) behind stop_gradient is right at order 1 and wrong at order 2:
    listed "rules fine" at order 1 without a word that only first derivatives were
    checked."""

    @jax.custom_vjp
    def sin(x):
        return jnp.sin(x)

    sin.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jax.lax.stop_gradient(jnp.cos(x)),))

    def loss(p):
        return jnp.sum(jnp.tanh(sin(p)))

    x = jnp.linspace(-1.0, 1.0, 5)
    report = jaxcheck.verify(loss, x, rules=True)
    assert report.status == "pass", str(report)
    [fine] = [q for q in report.problems if q.startswith("rules fine: ")]
    assert fine.endswith("(their first derivatives; order=2 checks their second)"), fine
    report = jaxcheck.verify(loss, x, rules=True, order=2)
    assert report.status == "fail", str(report)
    assert not any(q.startswith("rules fine: ") for q in report.problems), report.problems


def test_a_dropout_rate_an_equinox_module_holds_stays_a_python_float_in_the_rule_search():
    """eqx.nn.Dropout(p=0.0), which eqx.nn.MultiheadAttention holds, asks for a key unless
    its p is a Python 0: the rule search traced p as an array, could not trace fn, and the
    wrong rule went unnamed."""
    eqx = pytest.importorskip("equinox")
    act = tanh_with_backward(1.1)

    class Net(eqx.Module):
        lin: eqx.nn.Linear
        drop: eqx.nn.Dropout

        def __call__(self, x):
            return self.drop(act(self.lin(x)))

    net = Net(eqx.nn.Linear(4, 3, key=jax.random.key(0)), eqx.nn.Dropout(p=0.0))
    x = jax.random.normal(jax.random.key(1), (8, 4))
    report = jaxcheck.verify(lambda m, x: jnp.mean(jax.vmap(m)(x) ** 2), net, x)
    assert report.status == "fail", str(report)
    assert not [q for q in report.problems if q.startswith("rules: fn could not be traced")]
    [named] = [q for q in report.problems if q.startswith("wrong rule: custom_vjp act at ")]
    assert "vjp vs finite differences, relative error 1.0e-01" in named


def test_a_loop_rule_wrong_at_later_iterations_only_is_not_said_to_be_cleared():
    """A scan body's rule wrong only at inputs its first iteration does not reach: the
    report said that every rule passes, "so fn's error is outside them", beside the line
    saying that rule is not cleared of fn's error."""

    @jax.custom_vjp
    def grow(x):
        return x + 0.1 * x**2

    def bwd(x, g):
        slope = 1 + 0.2 * x
        return (g * jnp.where(x > 1.0, 1.05 * slope, slope),)  # wrong beyond 1 only

    grow.defvjp(lambda x: (grow(x), x), bwd)

    def loss(p, xs):
        def body(h, x):
            h = grow(h + p * x)
            return h, h

        return jnp.sum(jax.lax.scan(body, jnp.zeros(3), xs)[1])

    report = jaxcheck.verify(loss, jnp.asarray([0.2, 0.3, 0.4]), jnp.ones((6, 3)))
    assert report.status == "fail", str(report)
    assert not [q for q in report.problems if q.startswith("wrong rule")], report.problems
    [note] = [q for q in report.problems if q.startswith("every rule found passes")]
    assert note.startswith(
        "every rule found passes where it was checked at order 1, so fn's error is outside "
        "them or in one not cleared (below), unless fn differentiates inside itself"
    ), note
    [loop] = [q for q in report.problems if q.startswith("a rule in a loop body was checked")]
    assert "not cleared of fn's error: custom_vjp grow at " in loop


@pytest.mark.parametrize("scale", [1.0, 1.01])
def test_a_custom_root_is_checked_as_the_users_rule(scale):
    """lax.custom_root runs the user's solve and tangent_solve inside a custom_jvp of JAX's
    (`_custom_root`): a tangent_solve 1 % off was left unchecked as one of JAX's own rules,
    and the report said fn's error was outside the rules."""

    def loss(p):
        c = jnp.abs(p) + 1.0
        root = jax.lax.custom_root(
            lambda y: y**3 + y - c,
            jnp.ones_like(c),
            lambda f, y0: jax.lax.fori_loop(0, 30, lambda _, y: y - f(y) / (3 * y**2 + 1), y0),
            lambda g, y: y / g(jnp.ones_like(y)) * scale,
        )
        return jnp.sum(root**2)

    report = jaxcheck.verify(loss, jnp.linspace(-1.0, 2.0, 8))
    if scale == 1.0:
        assert report.status == "pass", str(report)
        assert not any(q.startswith("wrong rule: ") for q in report.problems)
        return
    assert report.status == "fail", str(report)
    [named] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert named.startswith("wrong rule: custom_jvp _custom_root at ")
    assert "vjp vs finite differences, relative error 1.0e-02" in named


def test_a_rule_that_could_not_be_checked_is_not_cleared_of_fns_error():
    """A rule closing over a value computed inside fn cannot be checked alone; it was the
    wrong one (1 % off), and the report still said every rule found passes, "so fn's error
    is outside them"."""

    @jax.custom_vjp
    def tanh(x):
        return jnp.tanh(x)

    tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))

    def model(p, x):
        s = jnp.mean(x**2)

        @jax.custom_vjp
        def scaled(h):
            return jnp.sin(s * h)

        scaled.defvjp(lambda h: (jnp.sin(s * h), h), lambda h, g: (g * s * jnp.cos(s * h) * 1.01,))
        return jnp.mean(scaled(tanh(x @ p["w"] + p["b"])) ** 2)

    x = jnp.cos(jnp.arange(30.0)).reshape(6, 5)
    p = {"w": jnp.sin(jnp.arange(40.0)).reshape(5, 8) / 2, "b": jnp.linspace(-0.5, 0.5, 8)}
    report = jaxcheck.verify(model, p, x)
    assert report.status == "fail", str(report)
    [note] = [q for q in report.problems if q.startswith("every rule")]
    assert note.startswith(
        "every rule checked passes where it was checked at order 1, so fn's error is outside "
        "them or in one not checked (custom_vjp scaled at "
    ), note


def test_a_rule_wrong_at_a_later_call_is_named_beside_another_wrong_rule():
    """A softplus rule 1 % off only at inputs above 3, which the later layers of a Python
    loop reach and its first call does not, carried most of fn's error; once another rule
    (a tanh 0.1 % off) was found wrong, the note that it was checked at one call only was
    left out, and only its row said so. Its later calls are checked now."""

    @jax.custom_vjp
    def softplus(x):
        return jnp.logaddexp(x, 0.0)

    def backward(x, g):
        d = jax.nn.sigmoid(x)
        return (g * jnp.where(jnp.abs(x) > 3.0, d * 0.99, d),)

    softplus.defvjp(lambda x: (softplus(x), x), backward)

    @jax.custom_vjp
    def tanh(x):
        return jnp.tanh(x)

    tanh.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2) * 1.001,))

    def model(p, x):
        h = x @ p["w"] + p["b"]
        for w in p["ws"]:
            h = softplus(h @ w)
        return jnp.mean(tanh(h))

    x = jnp.cos(jnp.arange(30.0)).reshape(6, 5)
    p = {
        "w": jnp.sin(jnp.arange(40.0)).reshape(5, 8) / 6,
        "b": jnp.linspace(-0.5, 0.5, 8),
        "ws": [
            jnp.eye(8) * 2.2 + 0.05 * jnp.cos(jnp.arange(64.0) + i).reshape(8, 8) for i in range(3)
        ],
    }
    report = jaxcheck.verify(model, p, x)
    assert report.status == "fail", str(report)
    assert any(q.startswith("wrong rule: custom_vjp tanh") for q in report.problems)
    # (the later calls are checked too: the softplus is named at one of them)
    [line] = [q for q in report.problems if q.startswith("wrong rule: custom_vjp softplus")]
    assert "at its call 2 of 3 (the call checked first passes)" in line, line


@pytest.mark.parametrize("kinds", [("tanh", "sin"), ("sin", "sin")])
def test_one_rule_object_called_with_other_static_arguments_is_checked_at_each(kinds):
    """A custom_vjp with nondiff_argnums called from a loop with kind "tanh" then "sin"
    runs other code at each, and was checked at its first call only: its "sin" branch,
    1 % off, went unnamed. Calls with the same static value are still one rule."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def activation(kind, x):
        return jnp.tanh(x) if kind == "tanh" else jnp.sin(x)

    def backward(kind, x, g):
        return (g * (1 - jnp.tanh(x) ** 2) if kind == "tanh" else g * jnp.cos(x) * 1.01,)

    activation.defvjp(lambda kind, x: (activation(kind, x), x), backward)

    def model(p, x):
        h = x @ p["w"] + p["b"]
        for kind in kinds:
            h = activation(kind, h)
        return jnp.mean(h**2)

    x = jnp.cos(jnp.arange(30.0)).reshape(6, 5)
    p = {"w": jnp.sin(jnp.arange(40.0)).reshape(5, 8) / 2, "b": jnp.linspace(-0.5, 0.5, 8)}
    report = jaxcheck.verify(model, p, x)
    assert report.status == "fail", str(report)
    [named] = [q for q in report.problems if q.startswith("wrong rule: ")]
    if kinds == ("tanh", "sin"):
        assert "(rule 2 of 2 of that name called here)" in named, named
    else:
        assert "of that name called here" not in named, named


def test_a_rule_inside_flax_scan_is_named_once_and_not_also_listed_unchecked():
    """flax's nn.scan traces its body once more apart from the scan, where the rule's
    inputs do not depend on params: that call is no second, unchecked rule."""
    nn = pytest.importorskip("flax.linen")
    act = tanh_with_backward(1.01)

    class Cell(nn.Module):
        @nn.compact
        def __call__(self, h, x):
            h = act(nn.Dense(4)(h) + x)
            return h, h

    class Net(nn.Module):
        @nn.compact
        def __call__(self, xs):
            scan = nn.scan(
                Cell, variable_broadcast="params", split_rngs={"params": False}, in_axes=0
            )
            _, ys = scan()(jnp.zeros(4), xs)
            return jnp.sum(ys**2)

    xs = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    model = Net()
    params = model.init(jax.random.key(0), xs)
    report = jaxcheck.verify(lambda p: model.apply(p, xs), params)
    assert report.status == "fail", str(report)
    rows = [c for c in report.checks if c.name.startswith("rule custom_vjp act")]
    assert [c.name.split(": ", 1)[1] for c in rows] == ["vjp vs finite differences"], rows
    assert "(scan body, first iteration)" in rows[0].name
    assert not [q for q in report.problems if "not checked" in q], report.problems


@pytest.mark.parametrize(
    "loops", [("scan", "scan"), ("scan", "scan", "scan"), ("scan", "jit", "scan")]
)
def test_a_rule_in_nested_loop_bodies_is_labelled_with_their_depth(loops):
    def loss(p):
        def nest(h, kinds):
            if not kinds:
                return bad_tanh(h * p["b"])
            if kinds[0] == "scan":
                return jax.lax.scan(lambda c, _: (nest(c, kinds[1:]), None), h, None, length=2)[0]
            return jax.jit(lambda c: nest(c, kinds[1:]))(h)

        return jnp.sum(nest(jnp.asarray([0.3, -0.2]), loops) ** 2)

    report = jaxcheck.verify(loss, {"b": jnp.asarray([0.5, -0.3])})
    [wrong] = [p for p in report.problems if p.startswith("wrong rule: custom_vjp bad_tanh")]
    where = {
        ("scan", "scan"): "(2 nested scan bodies, first iteration of each)",
        ("scan", "scan", "scan"): "(3 nested scan bodies, first iteration of each)",
        # (loop bodies not directly nested are not counted together)
        ("scan", "jit", "scan"): "(scan body, first iteration, inside jit, scan body, first "
        "iteration)",
    }[loops]
    assert where in wrong, wrong


def _relaxation(off: float):
    """A custom_vjp whose forward pass iterates from `zeros_like(a)` (a scan's carry):
    float32 data `a` beside float64 inputs changes the carry's type, which scan refuses.
    Its bwd is `off` times the envelope derivative."""

    def iterate(c, a):
        def body(f, _):
            return 0.5 * jnp.tanh(c - f) + a, None

        return jax.lax.scan(body, jnp.zeros_like(a), None, length=30)[0]

    @jax.custom_vjp
    def relaxed(c, a):
        return jnp.sum(iterate(c, a) ** 2)

    def fwd(c, a):
        f = iterate(c, a)
        return jnp.sum(f**2), (c, f, a)

    def bwd(res, g):
        c, f, a = res
        # f = 0.5 tanh(c - f) + a at the fixed point: df/dc = s / (1 + s), s = 0.5 sech^2
        s = 0.5 * (1 - jnp.tanh(c - f) ** 2)
        return off * g * 2 * f * s / (1 + s), g * 2 * f / (1 + s)

    relaxed.defvjp(fwd, bwd)
    return relaxed


@pytest.mark.parametrize("off", [1.0, 1.02])
def test_a_rule_given_float32_data_fn_closes_over_is_checked_in_float64(off):
    """The rule's float64 record traced fn in float64 without casting the float32 data fn
    closes over and passes to the rule, which its scan refused: the rule was checked in
    float32 (tolerance 6.7e-4) while fn was checked in float64 with that data cast."""
    a = jnp.asarray([0.2, -0.1, 0.3], jnp.float32)
    relaxed = _relaxation(off)
    report = jaxcheck.verify(
        lambda c: relaxed(jnp.sin(c), a), jnp.asarray([0.3, 0.5, -0.4]), rules=True
    )
    [row] = [c for c in report.checks if c.name.startswith("rule custom_vjp relaxed")]
    assert row.tolerance < 1e-5, str(report)
    assert row.passed == (off == 1.0) and report.status == ("pass" if off == 1.0 else "fail"), str(
        report
    )


def test_a_gradient_reversal_rule_is_named_with_its_factor():
    """A gradient-reversal layer (a domain-adversarial net's): its bwd is -lambda times
    its function's derivative on purpose; the wrong rule's line says the factor."""

    @jax.custom_vjp
    def reversed_grad(x, lam):
        return x

    reversed_grad.defvjp(lambda x, lam: (x, lam), lambda lam, g: (-lam * g, None))
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x, y = jax.random.normal(k[0], (8, 5)), jax.random.normal(k[3], (8,))
    params = {"w": jax.random.normal(k[1], (5, 4)) / 2, "v": jax.random.normal(k[2], (4,)) / 2}

    def loss(p):
        feature = jnp.tanh(x @ p["w"])
        task = jnp.mean((feature @ p["v"] - y) ** 2)
        return task + jnp.mean(jnp.tanh(reversed_grad(feature, 0.5) @ p["v"]))

    report = jaxcheck.verify(loss, params)
    [at] = [i for i, q in enumerate(report.problems) if q.startswith("wrong rule: custom_vjp rev")]
    line, factor = report.problems[at : at + 2]
    assert line.endswith(": vjp vs finite differences, relative error 1.5e+00 (tolerance 1.2e-06)")
    name = line[len("wrong rule: ") :].split(": vjp vs")[0]
    assert factor.startswith(
        f"{name}: its derivative is -0.5 times its function's along every direction"
    ), factor
    assert factor.endswith("(a gradient-reversal layer)"), factor


_COMPILES = []


def _count_compiles(name, seconds, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(seconds)


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


@pytest.mark.parametrize("factor", [1.0, 1.01])
def test_a_checker_with_rules_compiles_nothing_for_them_on_its_next_call(factor):
    """The rule checks' own programs (the derivatives at random tangents, under vmap and
    checkpoint, with one output used) were compiled anew at every check: a warm
    `rules=True` check of a model with 3 rules took 2.3 s against 0.04 s without. They
    are kept under the rule's identity now; the verdict stays each call's own."""
    act = tanh_with_backward(factor)

    @jax.custom_vjp
    def pair(x):  # two outputs: the unused-outputs row runs too
        return jnp.sin(x), jnp.cos(x)

    pair.defvjp(lambda x: (pair(x), x), lambda x, g: (g[0] * jnp.cos(x) - g[1] * jnp.sin(x),))

    def loss(p, x):
        s, c = pair(x @ p["w"])
        return jnp.sum(act(s) * c)

    params = {"w": jnp.sin(jnp.arange(12.0)).reshape(4, 3)}
    x = jnp.cos(jnp.arange(8.0)).reshape(2, 4)
    checker = jaxcheck.Checker(loss, rules=True)
    first = checker(params, x)
    compiled = len(_COMPILES)
    again = checker(params, x)
    assert len(_COMPILES) == compiled
    for report in (first, again):
        assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
        wrong = [q for q in report.problems if q.startswith("wrong rule: ")]
        assert [q.split(" at ")[0] for q in wrong] == (
            [] if factor == 1.0 else ["wrong rule: custom_vjp act"]
        ), wrong


@pytest.mark.parametrize("change", ["redefined", "global read"])
def test_a_rule_changed_between_checks_is_not_judged_by_its_old_programs(change, monkeypatch):
    """The rule checks' kept programs were keyed by the rule object: after `defvjp` gave
    it another bwd (wrong only where an output's cotangent is a symbolic zero), the
    unused-outputs row ran the old bwd and passed; after a bwd's global setting changed,
    the jit row compared the old program with the new eager rule and failed."""

    @jax.custom_vjp
    def pair(x):
        return jnp.sin(x), jnp.cos(x)

    def fwd(x):
        return (jnp.sin(x.value), jnp.cos(x.value)), x.value

    def backward(zero):
        def bwd(x, g):
            g0, g1 = (zero(x) if isinstance(c, SymbolicZero) else c for c in g)
            return ((g0 * jnp.cos(x) - g1 * jnp.sin(x)) * _BWD_SCALE["scale"],)

        return bwd

    x = jnp.linspace(-1.0, 1.0, 4)
    pair.defvjp(fwd, backward(jnp.zeros_like), symbolic_zeros=True)
    monkeypatch.setitem(_BWD_SCALE, "scale", 1.0 if change == "redefined" else 1.1)
    first = jaxcheck.verify_rule(pair, x)
    assert first.status == ("pass" if change == "redefined" else "fail"), str(first)
    if change == "redefined":  # wrong only where an output's cotangent is a symbolic zero
        pair.defvjp(fwd, backward(jnp.ones_like), symbolic_zeros=True)
    else:
        monkeypatch.setitem(_BWD_SCALE, "scale", 1.0)
    again = jaxcheck.verify_rule(pair, x)
    failed = [c.name.split(":")[0] for c in again.checks if not c.passed]
    assert failed == (["unused outputs"] if change == "redefined" else []), str(again)


_BWD_SCALE = {"scale": 1.0}


def test_a_checker_with_rules_sees_a_new_value_in_a_rules_nondiff_argnums():
    """A temperature passed in nondiff_argnums is bound into fn's trace, not passed as an
    input: a Checker's second call at another value ran the rule programs kept for the
    first and named the right rule wrong (jit row, relative error 0.32)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def scaled_tanh(beta, h):
        return jnp.tanh(beta * h)

    scaled_tanh.defvjp(
        lambda beta, h: (jnp.tanh(beta * h), h),
        lambda beta, h, g: (g * beta * (1 - jnp.tanh(beta * h) ** 2),),
    )

    def loss(p, x, beta):
        return jnp.sum(scaled_tanh(beta, p["w"] * x) ** 2)

    p, x = {"w": jnp.linspace(-0.5, 0.7, 5)}, jnp.linspace(0.3, 1.1, 5)
    checker = jaxcheck.Checker(loss, rules=True)
    for beta in (1.0, 2.0):
        report = checker(p, x, beta)
        assert report.status == "pass", str(report)


def test_a_rule_wrong_at_a_call_beyond_the_fifth_is_named_where_the_failing_leaf_reaches_it():
    """The other calls checked were the first 4 after the first, whichever the failing
    leaves reach: a rule wrong only at the sixth call of a tree_map over 6 leaves was not
    named ("6 calls, 1 checked")."""

    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    act.defvjp(
        lambda x: (jnp.tanh(x), x),
        lambda x, g: (g * (1 - jnp.tanh(x) ** 2) * jnp.where(x < -2.0, 1.05, 1.0),),
    )
    params = {f"l{i}": jnp.linspace(-1.0, 1.0, 3) * 0.5 for i in range(5)}
    params["l5"] = jnp.asarray([-2.5, -3.0, -2.2])

    def loss(p):
        return sum(jnp.sum(y**2) for y in jax.tree_util.tree_leaves(jax.tree.map(act, p)))

    report = jaxcheck.verify(loss, params)
    assert report.status == "fail", str(report)
    [line] = [q for q in report.problems if q.startswith("wrong rule: ")]
    assert " at its call 6 of 6 (the call checked first passes): " in line, line


@pytest.mark.parametrize("error", [0.0, 1e-4])
def test_a_rule_behind_a_cast_to_float32_is_checked_at_float64_resolution(error):
    """A rule called on values fn casts to float32 is typed float32 in fn's float64 trace
    too: its own check ran its finite differences in float32 (tolerance 3.5e-4) and found
    "no error" in a rule 1e-4 off, while the model failed."""

    @jax.custom_jvp
    def softplus(z):
        return jax.nn.softplus(z)

    softplus.defjvp(lambda p, t: (softplus(p[0]), jax.nn.sigmoid(p[0]) * t[0] * (1 + error)))
    x = jax.random.normal(jax.random.key(1), (32, 8))
    p = {"w": jax.random.normal(jax.random.key(0), (8, 4)) * 0.5, "b": jnp.full(4, 0.1)}

    def loss(p, x):
        return jnp.sum(softplus((x @ p["w"] + p["b"]).astype(jnp.float32)))

    report = jaxcheck.verify(loss, p, x, rules=True)
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    (row,) = [c for c in report.checks if c.name.startswith("rule custom_jvp softplus")]
    assert row.tolerance < 3e-6, str(report)
    if error:
        assert any(q.startswith("wrong rule: custom_jvp softplus") for q in report.problems)


@pytest.mark.parametrize("error", [0.0, 2e-4])
def test_a_float64_model_computing_in_float32_has_its_rules_checked(error):
    """Float64 params cast to float32 for the computation: fn rounds, is judged at float32
    resolution (tolerance 2.4e-4), and a rule 2e-4 off passed with no rule checked; such a
    pass is coarse, and its rules are now checked, in float64."""

    @jax.custom_vjp
    def log_sigmoid(z):
        return -jnp.logaddexp(0.0, -z)

    log_sigmoid.defvjp(
        lambda z: (log_sigmoid(z), z), lambda z, g: (g * jax.nn.sigmoid(-z) * (1 + error),)
    )

    def loss(p, x):
        z = (x @ p["w"] + p["b"]).astype(jnp.float32)
        return -jnp.mean(log_sigmoid(z).astype(jnp.float64))

    with enable_x64():
        p = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.asarray([0.1, -0.3, 0.2])}
        report = jaxcheck.verify(loss, p, jnp.linspace(-2.0, 2.0, 20).reshape(5, 4))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert any(
        q.startswith("fn rounds values computed from params to float32")
        for q in (report.parts[0].problems if report.parts else report.problems)
    ), str(report)
    if error:
        assert any("wrong rule: custom_vjp log_sigmoid" in q for q in report.problems), str(report)


def test_a_leaf_failing_beside_a_rule_not_checked_gets_the_usual_advice():
    """fn fails in one leaf alone, beside a rule that could not be checked (its jvp closes
    over a value fn computes): the only failed row was the unjudged rule's, so the report
    ended saying that what failed was not compared with finite differences."""
    x = jax.random.normal(jax.random.key(1), (32, 8))
    p = {"w": jax.random.normal(jax.random.key(0), (8, 4)) * 0.5, "b": jnp.full(4, 0.1)}

    def loss(p, x):
        c = jnp.cos(x[:, :4]) + 2.0

        @jax.custom_jvp
        def t(u):
            return jnp.tanh(u) * c

        t.defjvp(lambda pr, tg: (t(pr[0]), (1 - jnp.tanh(pr[0]) ** 2) * c * tg[0] * (1 + 1e-4)))
        return jnp.sum(t((x @ p["w"] + p["b"]).astype(jnp.float32)))

    report = jaxcheck.verify(loss, p, x, mode="forward")
    assert report.status == "fail", str(report)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"], str(report)
    assert "What failed was not compared with finite differences" not in str(report)
    assert "Look at the failing leaves first" in str(report)


@pytest.mark.parametrize("held", ["key", "typed key", "step"])
def test_a_rule_input_drawn_from_a_params_leaf_held_fixed_is_held_fixed(held):
    """Noise drawn from a PRNG key kept in params (or a schedule of an integer step count
    there) is data to a rule, as when passed in args: a right reparameterization rule
    giving the noise no gradient was checked in it and called wrong (relative error 1.0)."""

    @jax.custom_vjp
    def reparam(mu, eps):
        return mu + eps

    reparam.defvjp(lambda mu, eps: (mu + eps, None), lambda _, g: (g, jnp.zeros_like(g)))
    made = {
        "key": lambda: jax.random.PRNGKey(0),
        "typed key": lambda: jax.random.key(0),
        "step": lambda: jnp.asarray(3, jnp.int32),
    }

    def loss(p):
        if held == "step":
            eps = jnp.sin(p["held"] * jnp.arange(3.0))
        else:
            eps = jax.random.normal(p["held"], (3,))
        return jnp.sum(jnp.sin(reparam(p["mu"], eps)))

    p = {"mu": jnp.asarray([0.1, 0.2, 0.3]), "held": made[held]()}
    report = jaxcheck.verify(loss, p, rules=True)
    assert report.status == "pass", str(report)
    assert any(q.startswith("rules fine: custom_vjp reparam") for q in report.problems), str(report)


def test_checking_a_model_of_more_rules_than_programs_kept_again_compiles_nothing(
    monkeypatch, caplog
):
    """The programs a check uses are kept until it ends, however many: a model calling
    more rules than the cache holds programs let them go in turn as the check went, and
    the same check again (a training loop's) compiled every one anew (90 programs a check
    for 30 rules)."""
    from jaxcheck import _plan  # noqa: PLC0415

    def rule(scale):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x) * scale

        f.defvjp(lambda x: (f(x), x), lambda x, g: (g * jnp.cos(x) * scale,))
        return f

    rules = [rule(1.0 + i / 10) for i in range(3)]

    def loss(p):
        x = p["w"]
        for f in rules:
            x = f(x) + 0.5
        return jnp.sum(x**2)

    monkeypatch.setattr(_plan, "CACHE_SIZE", 2)
    p = {"w": jnp.linspace(0.1, 1.0, 4)}
    jaxcheck.verify(loss, p, rules=True)
    with caplog.at_level("WARNING", logger="jax"), jax.log_compiles():
        report = jaxcheck.verify(loss, p, rules=True)
    assert report.status == "pass", str(report)
    compiled = [r.getMessage() for r in caplog.records]
    assert not [m for m in compiled if m.startswith("Finished XLA compilation")], compiled
    assert len(_plan._JITTED) > 2  # (all the last check's kept)
