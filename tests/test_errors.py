"""Bad inputs fail early with messages that say what, where and what to do."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck


def loss(p, *args):
    return jnp.sum(p["w"] ** 2)


P = {"w": jnp.ones(3)}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_directions": 2}, ValueError, "num_directions must be an int >= 4, got 2."),
        ({"num_directions": 8.0}, ValueError, "num_directions must be an int >= 4, got 8.0."),
        ({"leaf_directions": 1}, ValueError, "leaf_directions must be an int >= 2, got 1."),
        # (unbounded, these ran for minutes, or forever, before any error)
        ({"order": 30}, ValueError, "order=30 is above the largest supported, 8."),
        (
            {"num_directions": 10**9},
            ValueError,
            "num_directions=1000000000 is above the largest supported, 65536.",
        ),
        (
            {"leaf_directions": 10**9},
            ValueError,
            "leaf_directions=1000000000 is above the largest supported, 65536.",
        ),
        (
            {"mode": "fwd"},
            ValueError,
            "mode must be 'reverse', 'forward' or 'both', got 'fwd' "
            "(jax.test_util.check_grads' 'fwd' is mode='forward' here).",
        ),
        ({"mode": "up"}, ValueError, "mode must be 'reverse', 'forward' or 'both', got 'up'."),
        (
            {"precision": "float32"},
            ValueError,
            "precision must be one of ('auto', 'float64', 'native'), got 'float32'. It is "
            "the precision of the finite differences (the reference), not of fn: 'auto' "
            "takes them in float64, or in fn's own precision where fn cannot run in "
            "float64; 'float64' requires float64; 'native' takes them in fn's own dtype "
            "(at least float32).",
        ),
        ({"step": 0.0}, ValueError, "step must be a float in (0, 1) or None, got 0.0."),
        (
            {"step": 1e-30},  # was INCONCLUSIVE, blamed on fn rounding to a low precision
            ValueError,
            "step=1e-30 is below 1e-12: params moved by so small a relative step round back",
        ),
        ({"rtol": 2.0}, ValueError, "rtol must be a float in (0, 0.5] or None, got 2.0."),
        (
            {"rtol": 0.99},  # passed a derivative a tenth of fn's
            ValueError,
            "rtol=0.99 is above 0.5: a derivative that is zero, or a tenth of fn's, has a "
            "relative error of 1 or 0.9, so a tolerance that loose would pass it. Pass rtol of "
            "at most 0.5",
        ),
        ({"localize": "yes"}, ValueError, "localize must be True, False or 'auto', got 'yes'."),
        (
            {"directions": "sobol"},
            ValueError,
            "directions must be one of ('uniform', 'rademacher', 'gaussian'), got 'sobol'.",
        ),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int or None, got 0."),
        (
            {"memory_budget": 1.5e9},
            ValueError,
            "memory_budget must be a positive int or None, got 1500000000.0.",
        ),
        (
            {"direction_sharding": "data"},
            TypeError,
            "direction_sharding must be a jax.sharding.NamedSharding whose PartitionSpec names "
            "one mesh axis for the directions, got 'data'.",
        ),
        (
            {"key": "seed"},
            TypeError,
            "key must be an int seed or a single JAX PRNG key, got str. Try key=0",
        ),
        ({"grad_fn": 3}, TypeError, "grad_fn must be callable or None, got int."),
        (  # was JAX's "Expected a callable value, got JitTracer(float32[3])"
            {"grad_fn": jax.grad},
            TypeError,
            "grad_fn=jax.grad is the transformation itself, not a gradient function: pass "
            "grad_fn=jax.grad(fn) (or your own function of (params, *args) returning the "
            "gradient), or leave grad_fn out to check JAX's gradient of fn.",
        ),
        (
            {"grad_fn": lambda p: p, "mode": "both"},
            ValueError,
            "grad_fn checks a reverse-mode gradient; mode='both' is not possible with it.",
        ),
    ],
)
def test_bad_options(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        jaxcheck.verify(loss, P, **kwargs)


def test_direction_sharding_over_one_device_takes_any_number_of_directions():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert jaxcheck.verify(loss, P, direction_sharding=one, num_directions=5).ok
    none = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None))
    with pytest.raises(TypeError) as info:  # was taken, spreading nothing
        jaxcheck.verify(loss, P, direction_sharding=none)
    assert str(info.value) == (
        "direction_sharding names no mesh axis for the directions (its PartitionSpec is "
        f"{none.spec!r}), so nothing would be spread. Name one, say "
        "NamedSharding(mesh, PartitionSpec('data')), or leave direction_sharding=None."
    )


@pytest.mark.skipif(not hasattr(jax.sharding, "AxisType"), reason="no Explicit mesh axes")
def test_direction_sharding_on_a_mesh_of_explicit_axes_then_of_auto_ones():
    """jax.make_mesh's axes are Explicit in newer jax: the directions are resharded there
    (with_sharding_constraint refused them), and a program compiled for that mesh is not
    reused for a mesh of Auto axes of the same devices, whose arrays do not mix with it."""
    devices = np.array(jax.devices()[:1])
    explicit = jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    auto = jax.sharding.Mesh(devices, ("data",))
    over = [
        jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec("data")) for m in (explicit, auto)
    ]
    for sharding in over:
        report = jaxcheck.verify(loss, P, direction_sharding=sharding)
        assert report.status == "pass", str(report)
        bad = jaxcheck.verify(
            loss,
            P,
            grad_fn=lambda p: {"w": jax.grad(loss)(p)["w"] * 1.01},
            direction_sharding=sharding,
        )
        assert bad.status == "fail", str(bad)
        assert 9e-3 < bad.relative_error < 1.1e-2


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"num_directions": 2}, ValueError, "num_directions must be an int >= 4, got 2."),
        ({"key": "seed"}, TypeError, "key must be an int seed or a single JAX PRNG key"),
        (
            {"chunks": 4},
            TypeError,
            "jaxcheck.Checker got unexpected keyword argument(s) 'chunks' (did you mean "
            "'chunk_size'?); its options are grad_fn, has_aux, order,",
        ),
        (
            {"x": 2.0},
            TypeError,
            "If these are fn's keyword arguments: fn's inputs are positional, Checker(fn, "
            "**options)(params, *args); bind keywords first, Checker(functools.partial(fn, "
            "x=...), **options)(params, *args).",
        ),
    ],
)
def test_checker_validates_options_when_made(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        jaxcheck.Checker(loss, **kwargs)


def test_fn_not_callable():
    with pytest.raises(TypeError, match=re.escape("fn must be callable, got dict.")):
        jaxcheck.verify({"not": "callable"}, P)


def test_no_float_leaves_lists_what_was_found():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "params has no floating-point leaf to differentiate (held fixed: ['n'] int32[3])"
        ),
    ):
        jaxcheck.verify(lambda p: 0.0, {"n": jnp.arange(3)})
    with pytest.raises(
        ValueError,
        match=re.escape("params has no floating-point leaf to differentiate (held fixed: (root) "),
    ):
        jaxcheck.verify(lambda p: 0.0, "abc")  # a string is one leaf at the root


def test_integer_output_is_rejected():
    with pytest.raises(
        TypeError,
        match=re.escape(
            "fn's output leaf (root) has dtype int32; only floating and complex outputs"
        ),
    ):
        jaxcheck.verify(lambda p: jnp.sum(p["w"]).astype(jnp.int32), P)


def test_has_aux_without_pair():
    with pytest.raises(
        TypeError,
        match=re.escape("fn must return a pair (output, aux); it returned an array of shape ()."),
    ):
        jaxcheck.verify(loss, P, has_aux=True)


@pytest.mark.parametrize("order", [1, 2])
def test_has_aux_takes_a_list_pair_as_jax_does(order):
    """jax.grad(has_aux=True) takes [output, aux] as it takes (output, aux); it was refused:
    "has_aux=True, so fn must return a pair (output, aux); it returned list"."""
    report = jaxcheck.verify(lambda p: [loss(p), "aux"], P, has_aux=True, order=order)
    assert report.status == "pass", str(report)


def test_grad_fn_wrong_shape_names_leaf():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "grad_fn returned shape (1,) for the parameter leaf ['w'], whose shape is (3,)."
        ),
    ):
        jaxcheck.verify(loss, P, grad_fn=lambda p: {"w": jnp.ones(1)})


def test_grad_fn_missing_leaf_names_leaf():
    with pytest.raises(
        ValueError, match=re.escape("grad_fn returned no gradient for the parameter leaf ['b']")
    ):
        jaxcheck.verify(
            lambda p: jnp.sum(p["w"]) + p["b"],
            {"w": jnp.ones(2), "b": 1.0},
            grad_fn=lambda p: {"w": jnp.ones(2)},
        )


def test_value_and_grad_as_grad_fn_is_told_apart():
    loss = lambda p: jnp.sum(p["w"] ** 2) + p["b"]  # noqa: E731
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify(loss, {"w": jnp.ones(3), "b": 1.0}, grad_fn=jax.value_and_grad(loss))
    assert str(caught.value).endswith(
        "(found leaves: [0], [1]['b'], [1]['w']). It returned a pair whose second part holds "
        "the gradient: a (value, gradient) pair, as jax.value_and_grad returns? grad_fn must "
        "return the gradient alone, as jax.grad(fn) does: pass `lambda p: grad_fn(p)[1]`."
    )


def test_grad_fn_needs_scalar_output():
    with pytest.raises(
        ValueError, match=re.escape("grad_fn was given, but fn does not return a scalar")
    ):
        jaxcheck.verify(lambda p: p["w"] * 2, P, grad_fn=lambda p: p)


def test_precision_float64_required_but_impossible():
    def float32_only(p):
        assert p["w"].dtype == jnp.float32, "float32 only"
        return jnp.sum(p["w"] ** 2)

    with pytest.raises(ValueError) as info:
        jaxcheck.verify(float32_only, P, precision="float64")
    assert str(info.value) == (
        "precision='float64', but fn could not run in float64 (AssertionError: float32 only). "
        "Pass precision='auto' to fall back to the model's precision (the report says so), "
        "or make fn accept float64 inputs."
    )
    assert isinstance(info.value.__cause__, AssertionError)  # fn's own error, chained
    report = jaxcheck.verify(float32_only, P)  # "auto" falls back, and says so
    assert report.status == "pass"
    assert report.reference_dtype == "float32"
    assert any(
        "could not run in float64 (AssertionError: float32 only)" in p for p in report.problems
    )


def test_a_long_error_of_fn_in_float64_is_reported_whole_up_to_a_cut_at_a_word():
    words = " ".join(f"word{i}" for i in range(80))  # 549 characters on one line

    def float32_only(p):
        assert p["w"].dtype == jnp.float32, f"float32 only: {words}\nsecond line"
        return jnp.sum(p["w"] ** 2)

    report = jaxcheck.verify(float32_only, P)
    [said] = [p for p in report.problems if "could not run in float64" in p]
    kept = said.split("(AssertionError: ", 1)[1].split(" ...)", 1)[0]
    line = f"float32 only: {words}"
    # whole words up to 300 characters: the next word would not have fitted
    assert line.startswith(kept + " ") and len(kept) <= 300
    next_word = line[len(kept) + 1 :].split(" ")[0]
    assert len(kept) + 1 + len(next_word) > 300
    assert "second line" not in said


def test_errors_in_fn_propagate():
    def broken(p):
        raise RuntimeError("user bug")

    with pytest.raises(RuntimeError, match="user bug"):
        jaxcheck.verify(broken, P)


def _while_sin(w):
    def body(carry):
        i, v = carry
        return i + 1, jnp.sin(v) * w

    return jnp.sum(jax.lax.while_loop(lambda c: c[0] < 3, body, (0, w))[1])


@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_reverse_mode_through_a_while_loop_says_to_check_forward_mode(mode):
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(_while_sin, jnp.full(3, 0.5), mode=mode)
    text = str(info.value)
    assert text.startswith("Reverse-mode differentiation does not work for lax.while_loop")
    assert f"which the check asks for (mode='{mode}'). If it has a forward mode" in text
    assert jaxcheck.verify(_while_sin, jnp.full(3, 0.5), mode="forward").status == "pass"
    jaxcheck.check_grads(_while_sin, (jnp.full(3, 0.5),), 2, ["fwd"])


def test_a_primitive_without_reverse_mode_says_to_check_forward_mode():
    """A custom_vmap function without a jvp rule of its own: JAX linearizes it in forward
    mode and cannot transpose it ("Linearization failed")."""
    custom_vmap = pytest.importorskip("jax.custom_batching").custom_vmap

    @custom_vmap
    def square(x):
        return x**2

    square.def_vmap(lambda axis_size, in_batched, x: (x**2, in_batched[0]))
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: jnp.sum(square(p)), jnp.ones(3))
    text = str(info.value)
    assert text.startswith("Linearization failed to produce known values")
    assert "verify(..., mode='forward'), or modes=('fwd',) in check_grads." in text
    assert jaxcheck.verify(lambda p: jnp.sum(square(p)), jnp.ones(3), mode="forward").ok


ONE_AT_A_TIME = "its directions and stencil points were evaluated one at a time, which is slower"


@pytest.mark.parametrize("jvp_scale", [1.0, 1.01])
def test_a_custom_vmap_is_evaluated_as_fn_runs_alone(jvp_scale):
    """Under jax.vmap a custom_vmap runs its batching rule, here 1 % off fn's own code: the
    directions' values were the rule's, a correct jvp was not judged ("fn's values
    scatter") and a jvp 1 % off fn was not failed."""
    custom_vmap = pytest.importorskip("jax.custom_batching").custom_vmap

    @custom_vmap
    def batched_off(x):
        return jnp.sin(x)

    batched_off.def_vmap(lambda axis_size, in_batched, x: (1.01 * jnp.sin(x), in_batched[0]))

    @jax.custom_jvp
    def f(x):
        return batched_off(x)

    f.defjvp(lambda p, t: (f(p[0]), jvp_scale * jnp.cos(p[0]) * t[0]))
    x = jnp.linspace(-1.0, 1.0, 5)
    loss = lambda p: jnp.sum(f(p["w"] * x)) + p["b"] ** 2  # noqa: E731
    report = jaxcheck.verify(loss, {"w": jnp.linspace(0.2, 0.9, 5), "b": jnp.asarray(0.1)})
    assert report.status == ("pass" if jvp_scale == 1.0 else "fail"), str(report)
    assert (
        "fn calls a custom_vmap, whose batching rule jax.vmap would run in place of fn's own "
        f"code: {ONE_AT_A_TIME}"
    ) in report.problems
    if jvp_scale != 1.0:
        assert report.relative_error == pytest.approx(0.0088, rel=0.2)


def test_a_cond_with_a_while_loop_in_a_branch_is_not_batched():
    """jax.vmap turns a cond whose predicate it batches into a select running both
    branches: a while_loop in the branch not taken, meant for other inputs, ran at these
    (one that never ends there hung the check)."""

    def g(p):
        def climb(q):
            # ends for q[0] <= 0 only, the branch's own inputs; here bounded to end anyway
            body = lambda c: (c[0] + 1, c[1] * 1.1)  # noqa: E731
            start = (0, jax.lax.stop_gradient(-q))
            n, _ = jax.lax.while_loop(lambda c: (c[1][0] < 1.0) & (c[0] < 50), body, start)
            return jnp.sum(q**2) + n

        return jax.lax.cond(p[0] > 0, lambda q: jnp.sum(jnp.sin(q)), climb, p)

    report = jaxcheck.verify(g, jnp.asarray([0.5, 0.3, 0.2]))
    assert report.status == "pass", str(report)
    assert (
        "fn has a lax.cond with a while_loop in a branch; jax.vmap turns a cond whose predicate "
        "it batches into a select that runs every branch, where a loop meant for other inputs "
        f"may never end: {ONE_AT_A_TIME}"
    ) in report.problems


def test_a_callback_refusing_the_inputs_of_a_branch_not_taken_does_not_stop_the_check():
    """An eqx.error_if or a callback in the branch of a cond fn does not take raised when
    jax.vmap ran that branch too; jax.test_util.check_grads passes."""

    def refuse_negative(q):
        q = np.asarray(q)
        if np.any(q < 0):
            raise ValueError("negative input to the callback")
        return np.sqrt(q).astype(q.dtype)

    @jax.custom_jvp
    def sqrt(q):
        shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
        return jax.pure_callback(refuse_negative, shape, q, vmap_method="sequential")

    sqrt.defjvp(lambda p, t: (sqrt(p[0]), t[0] / (2 * sqrt(p[0]))))

    def g(p):
        return jax.lax.cond(p[0] > 0, lambda q: jnp.sum(sqrt(q)), lambda q: jnp.sum(sqrt(-q)), p)

    report = jaxcheck.verify(g, jnp.asarray([0.5, 0.3, 0.2]))
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if q.startswith("fn raised where jax.vmap batched")]
    # (JAX's runtime error class: XlaRuntimeError in jax 0.7, JaxRuntimeError in 0.9 and 0.10)
    assert re.search(r"\((Jax|Xla)RuntimeError: ValueError: negative input to the callback\)", said)
    assert "they were evaluated one at a time, which is slower" in said
    jaxcheck.check_grads(g, (jnp.asarray([0.5, 0.3, 0.2]),), 1, modes=["rev"])


@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_a_custom_jvp_with_a_nonlinear_tangent_has_no_reverse_mode_said(mode):
    """JAX cannot transpose a jvp that is not linear in its tangents; its bare assertion
    (`AssertionError: (ValAccum(float32[5]), ...)`) came out of jaxcheck's internals."""

    @jax.custom_jvp
    def cube(x):
        return x**3

    cube.defjvp(lambda p, t: (p[0] ** 3, 3 * p[0] ** 2 * t[0] * (1 + 0.1 * t[0] ** 2)))
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: jnp.sum(cube(p)), jnp.linspace(0.2, 1.5, 5), mode=mode)
    text = str(info.value)
    # (older JAX's assertion has no message: "(AssertionError, in JAX's backward pass")
    assert text.startswith("JAX could not transpose fn's jvp into a vjp (AssertionError")
    assert "a custom_jvp whose tangent is not linear in its input tangents" in text
    assert "verify(..., mode='forward')" in text


@pytest.mark.parametrize("mode", ["reverse", "both"])
@pytest.mark.parametrize("tangent", [lambda t: t**2, jnp.sin], ids=["square", "sin"])
def test_a_tangent_through_a_primitive_without_a_transpose_rule_is_said(tangent, mode):
    """A tangent of t ** 2 or sin(t) reaches a primitive that JAX cannot transpose at all:
    its bare NotImplementedError ("Transpose rule ... for 'integer_pow' not implemented")
    came out with no word of forward mode, where a product of tangents had the advice."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * tangent(t[0])))
    x = jnp.array([0.3, -0.5, 0.9])
    with pytest.raises(NotImplementedError) as info:
        jaxcheck.verify(lambda a: jnp.sum(f(a)), x, mode=mode)
    text = str(info.value)
    assert text.startswith("Transpose rule (for reverse-mode"), text
    assert "fn calls a custom_jvp whose tangent is not linear in its input tangents" in text
    assert "verify(..., mode='forward') checks fn in forward mode" in text
    assert jaxcheck.verify(lambda a: jnp.sum(f(a)), x, mode="forward").status == "fail"


@pytest.mark.parametrize("beside", [None, "custom_vjp"])
def test_order_2_through_a_bwd_without_reverse_mode_goes_forward_or_says_so(beside):
    """The order-2 check differentiates a custom_vjp's bwd. One that JAX cannot reverse (a
    while_loop in it) is differentiated in forward mode instead (forward-over-reverse), as
    JAX's own Hessian-vector products of such a rule are; where forward mode fails too (a
    custom_vjp inside the bwd, which has no jvp), JAX's refusal is said in words of the
    order asked, and mode='forward' is not suggested."""

    @jax.custom_vjp
    def same(x):
        return x

    same.defvjp(lambda x: (x, None), lambda _, g: (g,))

    @jax.custom_vjp
    def double(x):
        return 2.0 * x

    def bwd(_, g):
        g = jax.lax.while_loop(lambda c: c[1] < 1, lambda c: (2.0 * c[0], c[1] + 1), (g, 0))[0]
        return (g if beside is None else same(g),)

    double.defvjp(lambda x: (2.0 * x, None), bwd)
    fn = lambda p: jnp.sum(jnp.sin(double(p)))  # noqa: E731
    x = jnp.linspace(0.2, 1.0, 4)
    assert jaxcheck.verify(fn, x).status == "pass"
    if beside is None:
        report = jaxcheck.verify(fn, x, order=2)
        assert report.status == "pass", str(report)
        rows = [c.name for c in report.checks]
        assert "order 2: forward-over-reverse (Hessian-vector products)" in rows, rows
        assert (
            "order 2: Hessian-vector products: JAX cannot differentiate the Hessian-vector "
            "products in reverse mode (Reverse-mode differentiation does not work for "
            "lax.while_loop or lax.fori_loop with dynamic start/stop values): checked in "
            "forward mode"
        ) in report.problems, report.problems
        return
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(fn, x, order=2)
    text = str(info.value)
    assert text.startswith(
        "order=2: the order-2 check differentiates the Hessian-vector products with JAX, "
        "which says: Reverse-mode differentiation does not work for lax.while_loop"
    )
    assert "fn passes or fails at order=1 alone. Check order=1" in text
    assert "mode='forward'" not in text


def test_order_2_through_a_pallas_bwd_says_so_in_words_of_the_order():
    """A custom_vjp whose fwd and bwd run Pallas kernels passes at order 1; at order 2 its
    vjp map, differentiated in its cotangent, reaches a kernel JAX cannot differentiate in
    either mode. The error suggested mode='forward', which a custom_vjp refuses."""
    pl = pytest.importorskip("jax.experimental.pallas")

    def kernel(x_ref, y_ref, o_ref):
        o_ref[...] = x_ref[...] * y_ref[...]

    def mul(x, y):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return pl.pallas_call(kernel, out_shape=shape, interpret=True)(x, y)

    @jax.custom_vjp
    def product(x, y):
        return mul(x, y)

    product.defvjp(lambda x, y: (mul(x, y), (x, y)), lambda r, g: (mul(g, r[1]), mul(g, r[0])))
    fn = lambda p: jnp.sum(jnp.tanh(product(p["x"], p["y"])))  # noqa: E731
    params = {"x": jnp.linspace(-1.0, 1.0, 8), "y": jnp.linspace(0.5, 2.0, 8)}
    assert jaxcheck.verify(fn, params).status == "pass"
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(fn, params, order=2)
    text = str(info.value)
    assert text.startswith(
        "order=2: the order-2 check differentiates the vjp map in its cotangent with JAX, "
        "which says: "
    ), text
    assert text.endswith(
        "fn's derivative of order 1 cannot be differentiated itself (a custom_vjp whose bwd, "
        "or a kernel or callback in it, has no derivative of its own); fn passes or fails at "
        "order=1 alone. Check order=1, or give that rule a differentiable bwd."
    ), text
    assert "mode='forward'" not in text


def test_a_float_param_passed_on_to_a_static_argument_says_how_to_hold_it():
    scaled = jax.jit(lambda x, a: x * a, static_argnums=1)
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: jnp.sum(scaled(p["x"], p["a"])), {"a": 0.5, "x": jnp.ones(2)})
    assert str(info.value) == (
        "fn could not be traced: a jax.jit function in fn has a static argument "
        "(static_argnums or static_argnames) that got one of the float values jaxcheck "
        "differentiates (likely params['a'], a float scalar), as an array or a traced value, "
        "which jax.jit cannot hash (JAX: Non-hashable static arguments are not supported). "
        "jaxcheck passes every float leaf of params (and NumPy floats in args) to fn as "
        "arrays. Hold that value fixed: pass it in args as a Python float (kept as it is), "
        "or close over it (functools.partial, or a lambda)."
    )
    # held fixed as a Python float in args, as the message says, it is checked
    fixed = jaxcheck.verify(lambda p, a: jnp.sum(scaled(p, a)), jnp.ones(2), 0.5)
    assert fixed.status == "pass"


def test_a_custom_vjp_whose_bwd_returns_a_bare_array_says_how_to_fix_it():
    """JAX's own error, from inside jaxcheck, said nothing of the missing comma of (g,)
    that verify_rule names."""

    @jax.custom_vjp
    def f(x):
        return jnp.tanh(x)

    f.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: g)
    with pytest.raises(TypeError) as info:
        jaxcheck.verify(lambda p: jnp.sum(f(p)), jnp.linspace(-1.0, 1.0, 4))
    text = str(info.value)
    assert text.startswith("Custom VJP bwd rule must produce an output with the same container")
    assert (
        "a tuple with one cotangent per primal input, shaped like it ((g,) for one input)" in text
    )
    assert "jaxcheck.verify_rule(rule, *inputs) checks the rule alone." in text


def test_verify_rule_of_a_function_without_a_rule_says_so():
    report = jaxcheck.verify_rule(lambda x: jnp.sin(x) * 2.0, jnp.linspace(-1.0, 1.0, 4))
    assert report.ok
    assert report.problems[0].startswith("f calls no jax.custom_vjp or jax.custom_jvp at these")
    assert str(report).startswith("jaxcheck.verify_rule: PASS — derivatives of the rule")
    ruled = jaxcheck.verify_rule(jax.nn.relu, jnp.linspace(-1.0, 1.0, 4) + 0.1)
    assert not any("calls no jax.custom_vjp" in q for q in ruled.problems), str(ruled)


def test_a_checker_refusing_its_arguments_does_not_speak_of_verify():
    check = jaxcheck.Checker(lambda w, x: jnp.mean(jnp.tanh(x @ w) ** 2))
    x = jnp.ones((4, 3))
    with pytest.raises(
        TypeError, match=re.escape("(params and the 2 extra argument(s) given after them)")
    ):
        check(jnp.ones(3), x, x)


def test_an_error_check_in_a_branch_not_taken_is_quoted_by_its_own_words():
    """eqx.error_if in the branch of a cond fn does not take raises once vmap runs that
    branch; the note quoted the separator line after equinox's message, then its advice
    about filter_jit, not the error."""
    eqx = pytest.importorskip("equinox")

    def f(p, x):
        s = jnp.sum(p * x)
        refuse = lambda s: eqx.error_if(s, s > 0, "the branch not taken refuses") * 2.0  # noqa: E731
        return jax.lax.cond(s > 0, jnp.sin, refuse, s)

    report = jaxcheck.verify(f, jnp.asarray([0.3, -0.2, 0.5]), jnp.asarray([1.0, 2.0, 0.5]))
    assert report.status == "pass", str(report)
    [said] = [q for q in report.problems if q.startswith("fn raised where jax.vmap batched")]
    assert "Error: the branch not taken refuses); they were evaluated one at a time" in said


def test_a_gradient_of_params_leaves_under_other_keys_says_so():
    """flax.nnx.grad of a loss of a Module returns a State: the same leaves under keys of
    another kind (`['bias'].value` for `.bias.value`). The message listed both and left the
    user to see why they differ."""
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    with pytest.raises(
        ValueError,
        match=re.escape(
            "Its leaves are params' own under keys of another kind (a flax.nnx State where "
            "params is the Module, or a dict where it is an object, say): return the gradient "
            "in params' structure, or pass params in the gradient's (nnx.state(model))."
        ),
    ):
        jaxcheck.verify(loss, model, jnp.ones((3, 4)), grad_fn=nnx.grad(loss))


def test_a_params_leaf_of_numbers_in_an_object_array_is_refused():
    """An object-dtype array of floats among params was held fixed, and a 50 % bug in what
    it feeds passed (jax.grad refuses such params); one of strings stays held fixed."""
    f = lambda p: jnp.sum(jnp.sin(p["w"])) + jnp.sum(jnp.asarray(p["b"], jnp.float32))  # noqa: E731
    params = {"w": jnp.full(3, 0.3), "b": np.array([0.1, 0.2], dtype=object)}
    with pytest.raises(TypeError, match=r"params leaf \['b'\] is a NumPy array of dtype object"):
        jaxcheck.verify(f, params)
    labels = {"w": jnp.full(3, 0.3), "names": np.array(["a", "b"], dtype=object)}
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p["w"])), labels)
    assert report.status == "pass"
    assert [path for path, _ in report.held_fixed] == ["['names']"]


def test_a_bwd_calling_a_callback_has_no_order_2_check_and_says_so():
    """A right custom_vjp whose fwd and bwd call back into NumPy: JAX cannot differentiate
    the bwd ("Pure callbacks do not support JVP"). verify(order=2) raised JAX's words
    alone, and verify_rule(order=2) called the right rule WRONG at relative error inf; both
    say now that its derivative has no derivative, and to check order 1."""

    def call(f, x):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(lambda a: f(a).astype(a.dtype), shape, x, vmap_method="sequential")

    @jax.custom_vjp
    def sin(x):
        return call(np.sin, x)

    sin.defvjp(lambda x: (sin(x), x), lambda x, g: (g * call(np.cos, x),))
    x = jnp.array([0.7, 1.3, 0.4, -0.2], jnp.float32)
    assert jaxcheck.verify_rule(sin, x).status == "pass"
    said = "or a kernel or callback in it, has no derivative of its own); fn passes or fails"
    with pytest.raises(ValueError, match=r"^order=2: .*Pure callbacks do not support JVP") as info:
        jaxcheck.verify(lambda x: jnp.sum(sin(x)), x, order=2)
    assert said in str(info.value)
    with pytest.raises(ValueError, match=r"^verify_rule: order=2: ") as info:
        jaxcheck.verify_rule(sin, x, order=2)
    assert said in str(info.value)
