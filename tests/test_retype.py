"""Casts to float32 in a float32 model round nothing there, and only in the float64
reference: it holds fn's float32 values in float64 instead (`_retype`), and judges at
float64 resolution, where bugs of 3e-4 are seen."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxcheck

RETYPED = "fn casts values computed from params to float32, which rounds nothing in the model"
ROUNDS = "fn rounds values computed from params to float32"


def _tanh_rule(error):
    @jax.custom_vjp
    def act(z):
        return jnp.tanh(z)

    act.defvjp(lambda z: (jnp.tanh(z), z), lambda z, g: (g * (1 + error) / jnp.cosh(z) ** 2,))
    return act


@jax.jit
def _jitted_tanh(h):
    return jnp.tanh(h).astype(jnp.float32)


def _model(kind, error):
    act = _tanh_rule(error)
    x = jnp.cos(jnp.arange(48.0)).reshape(6, 8)

    def logits_cast(p):
        h = act(x @ p["w1"]).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp((h @ p["w2"]).astype(jnp.float32), -1))

    def scan_into_float32_buffers(p):
        def body(c, row):
            c = c + _jitted_tanh(row).astype(jnp.float32)
            return c, c.sum()

        c, ys = lax.scan(body, jnp.zeros(5, jnp.float32), act(x @ p["w1"]))
        buf = jnp.zeros(6, jnp.float32).at[jnp.arange(6)].set(ys)
        return jnp.sum(c @ p["w2"]) + 1e-2 * jnp.mean(buf**2)

    def products_cond_and_loop(p):
        h = act(jnp.dot(x, p["w1"], preferred_element_type=jnp.float32))
        h = lax.cond(h.sum() > -1e9, lambda h: 2 * h, lambda h: h, h)
        h = lax.fori_loop(0, 3, lambda i, h: 0.9 * h, h)
        return jnp.mean(jnp.dot(h, p["w2"], preferred_element_type=jnp.float32) ** 2)

    def policy_and_remat(p):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        h = jax.checkpoint(act)(x @ p["w1"])
        return jnp.mean((h @ p["w2"]) ** 2)

    return locals()[kind]


def _params():
    return {
        "w1": jnp.sin(jnp.arange(40.0)).reshape(8, 5) * 0.5,
        "w2": jnp.cos(jnp.arange(15.0)).reshape(5, 3) * 0.5,
    }


@pytest.mark.parametrize(
    "kind",
    ["logits_cast", "scan_into_float32_buffers", "products_cond_and_loop", "policy_and_remat"],
)
@pytest.mark.parametrize("error", [0.0, 3e-4])
def test_a_float32_model_casting_to_float32_is_judged_at_float64_resolution(kind, error):
    """A rule 3e-4 off passed at float32 resolution (tolerance 3e-3); now it fails, and the
    correct rule passes at a tolerance of 1.2e-6."""
    report = jaxcheck.verify(_model(kind, error), _params())
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert report.tolerance < 2e-6, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems
    if error:
        assert 1e-4 < report.relative_error < 1e-3, str(report)


def test_jitted_functions_inside_fn_keep_their_own_casts_afterwards():
    """The reference retypes fn's program, never fn or JAX's functions: a jitted function
    fn calls still casts to float32 when the user calls it with float64 afterwards."""
    report = jaxcheck.verify(_model("scan_into_float32_buffers", 0.0), _params())
    assert report.status == "pass", str(report)
    with jax.enable_x64(True):
        out = _jitted_tanh(jnp.ones(3, jnp.float64))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("error", [0.0, 3e-4])
def test_a_second_order_check_of_a_casting_model_is_judged_finely(error):
    act = _tanh_rule(0.0)

    @jax.custom_jvp
    def cube(z):
        return z**3

    cube.defjvp(lambda p, t: (p[0] ** 3, 3 * (1 + error) * p[0] ** 2 * t[0]))

    def fn(w):
        return jnp.sum(act(cube(w).astype(jnp.float32)) ** 2)

    report = jaxcheck.verify(fn, jnp.linspace(-0.9, 0.8, 6), order=2)
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert any(RETYPED in q for q in report.problems), report.problems


@pytest.mark.parametrize("params_dtype", ["float32", "float64"])
def test_under_x64_a_cast_rounds_where_the_params_are_float64(params_dtype):
    """With 64-bit types on, a float32 model's casts to float32 are held in float64 as with
    them off; float64 params cast to float32 round in the model too: judged as they round."""
    with jax.enable_x64(True):
        x = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)
        w = jnp.linspace(0.5, 1.5, 8, dtype=params_dtype)
        report = jaxcheck.verify(lambda w, x: jnp.sum(jnp.sin(w.astype(jnp.float32) * x)), w, x)
    assert report.status == "pass", str(report)
    said = [q for q in report.problems if q.startswith((RETYPED, ROUNDS))]
    assert len(said) == 1 and said[0].startswith(
        RETYPED if params_dtype == "float32" else ROUNDS
    ), report.problems


def test_a_callback_declaring_float32_keeps_the_rounding_it_declares():
    """Code the jaxpr does not show (a callback, a kernel) cannot be held in float64: fn is
    judged as it rounds there."""

    @jax.custom_jvp
    def host_sin(x):
        out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
        return jax.pure_callback(lambda x: np.sin(x).astype(np.float32), out, x)

    host_sin.defjvp(lambda p, t: (host_sin(p[0]), jnp.cos(p[0]) * t[0]))

    def fn(p):
        return jnp.sum(host_sin(p).astype(jnp.float32) ** 2)

    report = jaxcheck.verify(fn, jnp.linspace(0.1, 1.0, 5), rules=False)
    assert not any(q.startswith(RETYPED) for q in report.problems), report.problems
    assert any(q.startswith(ROUNDS) for q in report.problems), report.problems


def test_random_numbers_drawn_in_float32_are_drawn_as_in_the_model():
    """jax.random.uniform in float32 forms its numbers from bits (a bit cast, kept as it
    is): a dropout mask drawn so passes with the casts held in float64."""
    key = jax.random.key(3)

    def fn(w):
        keep = jax.random.uniform(key, w.shape, dtype=jnp.float32) > 0.3
        return jnp.sum(jnp.where(keep, jnp.tanh(w).astype(jnp.float32), 0.0) ** 2)

    report = jaxcheck.verify(fn, jnp.linspace(-1.0, 1.0, 12))
    assert report.status == "pass" and report.tolerance < 2e-6, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


def test_a_flax_dense_with_its_dtype_set_is_judged_finely():
    linen = pytest.importorskip("flax.linen")
    dense = linen.Dense(3, dtype=jnp.float32)
    x = jnp.cos(jnp.arange(12.0)).reshape(4, 3)
    variables = dense.init(jax.random.key(0), x)
    report = jaxcheck.verify(lambda v, x: jnp.sum(jnp.tanh(dense.apply(v, x)) ** 2), variables, x)
    assert report.status == "pass" and report.tolerance < 2e-6, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


@pytest.mark.parametrize("upcast", [False, True])
def test_a_bfloat16_model_returning_its_loss_in_float32_is_judged_as_without(upcast):
    """A bfloat16 model's loss cast up to float32 (mixed precision's usual last step) rounds
    nothing in the model: a rule 2e-4 off fails either way (it passed with the cast, then
    judged at float32 resolution)."""

    @jax.custom_jvp
    def act(z):
        return jnp.tanh(z)

    act.defjvp(lambda p, t: (jnp.tanh(p[0]), (1 - jnp.tanh(p[0]) ** 2) * t[0] * 1.0002))
    bf16 = jnp.bfloat16
    p = {"w": (jnp.linspace(-1, 1, 6).reshape(3, 2) * 0.7).astype(bf16), "b": jnp.ones(2, bf16)}
    x = jnp.linspace(-1, 1, 12).reshape(4, 3).astype(bf16)

    def fn(p, x):
        loss = jnp.sum(act(x @ p["w"] + p["b"]) * jnp.array([1.0, -2.0], bf16))
        return loss.astype(jnp.float32) if upcast else loss

    report = jaxcheck.verify(fn, p, x)
    assert report.status == "fail", str(report)
    [rule] = [c for c in report.checks if "same rule" in c.name]
    assert rule.tolerance < 2e-6 and not rule.passed, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems) == upcast, report.problems


def test_a_fit_casting_its_predictions_is_not_failed_by_the_rule_row():
    """Near a fit the float32 gradient cancels (6e-4 from float64's): the row of the same
    rule in float64 measures that, and allows for it. Its derivative was taken through the
    casts, rounding at float32 (2e-4 off the finite differences, against 1e-6): FAIL."""
    x = jnp.cos(jnp.arange(2048.0)).reshape(256, 8)
    target = jnp.linspace(-1.0, 1.0, 8)
    y = x @ target + 1e-5 * jnp.sin(jnp.arange(256.0) * 7.0)

    def loss(w, x, y):
        return jnp.mean(((x @ w).astype(jnp.float32) - y) ** 2)

    report = jaxcheck.verify(loss, target + 1e-5, x, y)
    assert report.status == "pass", str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


@pytest.mark.parametrize("noise", ["normal", "hash"])
def test_values_not_computed_from_params_are_computed_as_fn_computes_them(noise):
    """Numbers fn makes from other inputs than params (Gaussian noise from a key, a table
    hashed from positions) are fn's own in float32: held in float64 they came out other
    numbers (a normal sample 2e-3 off, hashed noise 1e-2 off), the reference another
    function, and a correct gradient failed."""
    key = jax.random.key(0)

    def fn(p):
        if noise == "normal":
            eps = jax.random.normal(key, (100_000,), jnp.float32)
        else:
            s = jnp.sin(jnp.arange(4096, dtype=jnp.float32) * 12.9898) * 43758.5453
            eps = s - jnp.floor(s)
        z = (p["mu"] + jnp.exp(p["log_sigma"]) * eps).astype(jnp.float32)
        return jnp.mean(jnp.exp(0.5 * z))

    report = jaxcheck.verify(fn, {"mu": jnp.float32(0.1), "log_sigma": jnp.float32(0.0)})
    assert report.status == "pass" and report.tolerance < 2e-6, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


@pytest.mark.parametrize("error", [0.0, 3e-4])
def test_a_deep_casting_model_with_rules_measures_its_rounding_against_them(error):
    """Every layer casts and calls a custom rule: the rows of the same rules in float64
    hold the casts' values in float64 too, with each rule's own derivative, so the
    float32 gradient's rounding is measured, not taken for a bug."""
    act = _tanh_rule(error)
    ws = jnp.sin(jnp.arange(8 * 32 * 32.0)).reshape(8, 32, 32) * 0.25
    x = jnp.cos(jnp.arange(16 * 32.0)).reshape(16, 32)

    def loss(ws):
        h = x
        for i in range(8):
            h = h + act((h @ ws[i]).astype(jnp.float32))
        return jnp.mean(jax.nn.logsumexp(h, -1))

    report = jaxcheck.verify(loss, ws)
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


def _rule_beside_data(kind, error):
    """A custom rule behind a cast to float32, taking an array not computed from params
    (closed over, or an argument) or returning an integer beside its value."""
    scale = jnp.linspace(0.5, 1.5, 3)
    if kind == "closed over":

        @jax.custom_vjp
        def f(h):
            return jnp.sin(h) * scale

        f.defvjp(lambda h: (f(h), h), lambda h, g: (g * jnp.cos(h) * scale * (1 + error),))
        return lambda h: f(h)
    if kind == "integer output":

        @jax.custom_jvp
        def g(h):
            return jnp.sin(h), jnp.argmax(h, axis=-1)

        @g.defjvp
        def g_jvp(primals, tangents):
            y, i = g(primals[0])
            zero = np.zeros(i.shape, jax.dtypes.float0)
            return (y, i), (jnp.cos(primals[0]) * tangents[0] * (1 + error), zero)

        return lambda h: g(h)[0] + 0.0 * g(h)[1][:, None]
    eqx = pytest.importorskip("equinox")

    @eqx.filter_custom_vjp
    def e(h, s):
        return jnp.sin(h) * s

    @e.def_fwd
    def e_fwd(perturbed, h, s):
        return e(h, s), None

    @e.def_bwd
    def e_bwd(res, g, perturbed, h, s):
        return g * jnp.cos(h) * s * (1 + error)

    return lambda h: e(h, scale)


@pytest.mark.parametrize("kind", ["closed over", "integer output", "equinox argument"])
@pytest.mark.parametrize("error", [0.0, 3e-4])
def test_a_rule_beside_values_not_from_params_keeps_its_own_derivative(kind, error):
    """The rule's derivative in the reference was taken in all its inputs: JAX refuses a
    custom_vjp's closed-over value, equinox its other arrays, and an integer output's
    float0 tangent was cast to int32: the reference fell back to float32 and a rule 3e-4
    off passed."""
    rule = _rule_beside_data(kind, error)
    x = jnp.cos(jnp.arange(20.0)).reshape(5, 4)

    def loss(p):
        return jnp.sum(rule(jnp.tanh(x @ p).astype(jnp.float32)) ** 2)

    report = jaxcheck.verify(loss, jnp.sin(jnp.arange(12.0)).reshape(4, 3))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert report.tolerance < 3e-6, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems
    assert not any("could not run in float64" in q for q in report.problems), report.problems


@pytest.mark.parametrize("error", [0.0, 3e-4])
def test_a_branch_of_constants_takes_the_held_type(error):
    """lax.cond with a branch returning constants (a NaN guard, as in
    jax.scipy.linalg.expm): held in float64 the other branch's output differed in type,
    the reference failed when compiled, and a bug 3e-4 passed at float32 resolution."""
    x = jnp.cos(jnp.arange(20.0)).reshape(5, 4)

    @jax.jit
    def guard(z):
        return lax.cond(jnp.any(jnp.isnan(z)), lambda z: jnp.full_like(z, jnp.nan), jnp.sin, z)

    def loss(p):
        out = jnp.sum(guard(jnp.tanh(x @ p).astype(jnp.float32)) ** 2)
        return out + error * (out - lax.stop_gradient(out))

    report = jaxcheck.verify(loss, jnp.sin(jnp.arange(12.0)).reshape(4, 3))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


def test_a_bit_cast_of_a_value_from_params_is_judged_as_it_rounds():
    """The bits of a float32 value are not those of its float64 value: a bit cast of one
    computed from params leaves fn as it rounds (it crashed in jaxcheck's comparison,
    the reference's output shaped by float64's bits)."""
    x = jnp.cos(jnp.arange(20.0)).reshape(5, 4)

    def loss(p):
        h = jnp.tanh(x @ p).astype(jnp.float32)
        return jnp.sum(h**2) + 0.0 * jnp.sum(lax.bitcast_convert_type(h, jnp.int32))

    report = jaxcheck.verify(loss, jnp.sin(jnp.arange(12.0)).reshape(4, 3))
    assert report.status == "pass", str(report)
    assert not any(q.startswith(RETYPED) for q in report.problems), report.problems


@pytest.mark.parametrize("error", [0.0, 3e-4])
def test_a_rule_computing_on_data_inside_is_held_where_params_reach(error):
    """Inside a rule (or a jitted call) the operations on data alone run as fn has them,
    in float32: its data were cast up on entry, and a float32 literal beside them made the
    reference refuse the retyping (lax.mul of float64 and float32)."""
    scale = jnp.linspace(0.5, 1.5, 3)

    @jax.custom_vjp
    def f(h):
        return jnp.sin(h) * (scale * 2.0 + 1.0)

    f.defvjp(
        lambda h: (f(h), h), lambda h, g: (g * jnp.cos(h) * (scale * 2.0 + 1.0) * (1 + error),)
    )
    x = jnp.cos(jnp.arange(20.0)).reshape(5, 4)

    @jax.jit
    def inner(h, s):
        return jnp.tanh(h) * (s * 3.0)

    def loss(p):
        h = jnp.tanh(x @ p).astype(jnp.float32)
        return jnp.sum(f(h) ** 2) + jnp.sum(inner(h, scale))

    report = jaxcheck.verify(loss, jnp.sin(jnp.arange(12.0)).reshape(4, 3))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert report.tolerance < 3e-6, str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems


def _rounding_rules(kind, error):
    """A square whose rule computes 2x through a difference of squares near 1e6: right,
    but rounded to about 3e-5 in float32 (and to 1e-13 in float64)."""

    def slope(x):
        return ((x + 1000.0) ** 2 - (x - 1000.0) ** 2) / 2000.0 * (1 + error)

    if kind == "custom_jvp":

        @jax.custom_jvp
        def square(x, k):
            return k * x**2

        square.defjvp(lambda p, t: (square(*p), p[1] * slope(p[0]) * t[0] + p[0] ** 2 * t[1]))
        return lambda x: square(x, 2.0)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def square(x, k):
        return k * x**2

    # (x forwarded as a residual, as JAX lays such residuals out apart)
    square.defvjp(lambda x, k: (square(x, k), (x, 2 * x)), lambda k, r, g: (g * k * slope(r[0]),))
    return lambda x: square(x, 2.0)


@pytest.mark.parametrize("kind", ["custom_jvp", "custom_vjp"])
@pytest.mark.parametrize("error", [0.0, 1e-3])
def test_a_rule_behind_a_cast_is_differentiated_in_float64(kind, error):
    """The rule's derivative in the reference ran at fn's dtypes, float32, where the rule
    rounds to 3e-5: the same rule's rows matched the gradient under test to the last bit,
    and a right rule failed against the float64 tolerance, 1.2e-6. Its derivative
    programs are now evaluated in float64 too, as where fn has no cast."""
    square = _rounding_rules(kind, error)

    def loss(p):
        return jnp.sum(square(jnp.tanh(p).astype(jnp.float32)) * jnp.arange(1.0, 9.0))

    report = jaxcheck.verify(loss, jnp.linspace(-1.0, 1.0, 8))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems
    (row,) = [c for c in report.checks if "same rule in float64" in c.name]
    assert row.relative_error == pytest.approx(error, abs=1e-9, rel=0.05), str(report)


@pytest.mark.parametrize("error", [0.0, 3e-3])
def test_a_bwd_closing_over_a_value_fn_computed_is_judged_as_fn_rounds(error):
    """A bwd closing over a value fn computed (from data) reads a tracer of fn's own
    trace, which the retyped reference ran in another: the float64 reference failed
    ("Computation compiled for 12 inputs but called with 10") and judged in float32.
    Such a program is not retyped; its casts are judged as they round."""

    def loss(p, x):
        t = jnp.sum(x) * 0.1

        @jax.custom_vjp
        def g(w):
            return jnp.sin(w) * t

        g.defvjp(lambda w: (g(w), w), lambda w, ct: (ct * jnp.cos(w) * t * (1 + error),))
        return jnp.sum(g(jnp.tanh(p).astype(jnp.float32)) * jnp.arange(1.0, 9.0))

    report = jaxcheck.verify(loss, jnp.linspace(-1.0, 1.0, 8), jnp.linspace(1.0, 2.0, 5))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    (note,) = [q for q in report.problems if q.startswith(ROUNDS)]
    # (the note says why, and how to have it judged finely, rather than blame the cast)
    assert ", where a custom rule's derivative reads a value fn computes)" in note, note
    assert "pass that value to the rule as an argument, not in a closure" in note, note
    assert not any("could not run in float64" in q for q in report.problems), report.problems


@pytest.mark.parametrize("error", [0.0, 1e-3])
def test_rules_taking_symbolic_zeros_behind_a_cast_are_differentiated_in_float64(error):
    """Rules defined with symbolic_zeros=True take their zero tangents as markers (the
    others take arrays): their derivative programs are read with the markers laid out as
    JAX lays them out, and evaluated in float64 as well."""
    from jax.custom_derivatives import SymbolicZero

    def slope(x):
        return ((x + 1000.0) ** 2 - (x - 1000.0) ** 2) / 2000.0 * (1 + error)

    @jax.custom_jvp
    def square(x, k):
        return k * x**2

    def square_jvp(p, t):
        out = p[1] * slope(p[0]) * t[0]
        return square(*p), out if type(t[1]) is SymbolicZero else out + p[0] ** 2 * t[1]

    square.defjvp(square_jvp, symbolic_zeros=True)

    @jax.custom_vjp
    def times(x, y):
        return x * y

    def times_fwd(x, y):
        return times(x.value, y.value), (x.value, y.value)

    def times_bwd(r, g):
        return g * ((r[1] + 1000.0) - 1000.0) * (1 + error), g * r[0]

    times.defvjp(times_fwd, times_bwd, symbolic_zeros=True)

    def loss(p, d):
        h = jnp.tanh(p).astype(jnp.float32)
        return jnp.sum(square(h, d[0]) * jnp.arange(1.0, 9.0)) + jnp.sum(times(h, d) ** 2)

    report = jaxcheck.verify(loss, jnp.linspace(-1.0, 1.0, 8), jnp.linspace(1.0, 2.0, 8))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    (row,) = [c for c in report.checks if "same rule in float64" in c.name]
    assert row.relative_error == pytest.approx(error, abs=1e-9, rel=0.05), str(report)


@pytest.mark.parametrize("error", [0.0, 1e-3])
def test_a_rule_with_float32_products_inside_is_differentiated_in_float64(error):
    """An attention rule whose products declare preferred_element_type=float32: its
    derivative in the reference ran in float32, and the same rule's row (1.2e-6) failed
    a right rule against its float64 tolerance, 1e-6."""

    def mm(a, b):
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def attend(q, k, v):
        return mm(jax.nn.softmax(mm(q, k.T), -1), v)

    def attend_fwd(q, k, v):
        p = jax.nn.softmax(mm(q, k.T), -1)
        return mm(p, v), (q, k, v, p)

    def attend_bwd(res, do):
        q, k, v, p = res
        dp = mm(do, v.T)
        ds = p * (dp - jnp.sum(dp * p, -1, keepdims=True))
        return mm(ds, k), mm(ds.T, q), mm(p.T, do) * (1 + error)

    attend.defvjp(attend_fwd, attend_bwd)

    def loss(p, x):
        return jnp.sum(jnp.tanh(attend(x @ p["wq"], x @ p["wk"], x @ p["wv"])) ** 2)

    keys = jax.random.split(jax.random.key(0), 4)
    p = {n: jax.random.normal(k, (8, 8)) / 3 for n, k in zip(["wq", "wk", "wv"], keys)}
    report = jaxcheck.verify(loss, p, jax.random.normal(keys[3], (6, 8)))
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    (row,) = [c for c in report.checks if "same rule in float64" in c.name]
    assert row.relative_error < (1e-7 if error == 0.0 else 1.0), str(report)
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == (
        [] if error == 0.0 else ["['wv']"]
    ), str(report)


@pytest.mark.parametrize("error", [0.0, 1e-2])
def test_a_cast_inside_a_bwd_is_held_in_float64_too(error):
    """A layer norm's bwd casting its residual and cotangent to float32, a no-op in the
    model: the bwd was traced on float64 values, its cast rounded them there, and a right
    rule (whose model gradient is bit for bit the one without the cast) failed."""

    def norm(z):
        m = z.mean(-1, keepdims=True)
        return (z - m) / jnp.sqrt(((z - m) ** 2).mean(-1, keepdims=True))

    def norm_bwd(z, g):
        z, g = z.astype(jnp.float32), g.astype(jnp.float32)
        m = z.mean(-1, keepdims=True)
        r = 1 / jnp.sqrt((z * z).mean(-1, keepdims=True) - m * m)
        xh = (z - m) * r
        return (r * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True)),)

    rule = jax.custom_vjp(norm)
    rule.defvjp(lambda z: (norm(z), z), lambda z, g: tuple(c * (1 + error) for c in norm_bwd(z, g)))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    p = {"w": jax.random.normal(jax.random.key(0), (8, 64)) * 0.5, "b": jnp.full(64, 300.0)}

    def loss(p, x):
        z = (x @ p["w"] + p["b"]).astype(jnp.float32)
        return jnp.sum(jnp.sin(rule(z)) * jnp.arange(64) / 64)

    report = jaxcheck.verify(loss, p, x)
    assert report.status == ("pass" if error == 0.0 else "fail"), str(report)
    assert any(q.startswith(RETYPED) for q in report.problems), report.problems
