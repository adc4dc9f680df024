"""A test suite's global JAX settings never break a check, and never change its verdict."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxcheck
from cases import enable_x64


def _loss(p, x):
    return jnp.sum(jnp.sin(p["w"] @ x) ** 2) + jnp.sum(p["b"] ** 2)


def _outputs(p, x):
    return {"a": jnp.sin(p["w"] @ x), "b": jnp.cos(p["b"]).sum()}


def _inputs(dtype):
    p = {
        "w": jnp.linspace(0.1, 1.0, 6, dtype=jnp.float32).reshape(2, 3).astype(dtype),
        "b": jnp.linspace(0.5, 1.0, 2, dtype=jnp.float32).astype(dtype),
    }
    return p, jnp.linspace(-1.0, 1.0, 3, dtype=jnp.float32).astype(dtype)


@pytest.mark.parametrize("mode", ["reverse", "forward", "both"])
@pytest.mark.parametrize("fn", [_loss, _outputs], ids=["scalar", "pytree"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_strict_promotion(strict_numerics, dtype, fn, mode):
    p, x = _inputs(jnp.dtype(dtype))
    report = jaxcheck.verify(fn, p, x, mode=mode)
    assert report.status == "pass", str(report)
    assert report.tested_dtype == dtype
    assert report.reference_dtype == "float64"  # the float64 reference was not refused
    assert not any("could not run" in q for q in report.problems), report.problems


@pytest.mark.parametrize("mode", ["reverse", "both"])
def test_strict_promotion_float64(strict_numerics, x64, mode):
    p, x = _inputs(jnp.float64)
    report = jaxcheck.verify(_outputs, p, x, mode=mode)
    assert report.status == "pass", str(report)
    assert report.tested_dtype == "float64"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_strict_promotion_with_grad_fn(strict_numerics, dtype):
    p, x = _inputs(jnp.dtype(dtype))
    report = jaxcheck.verify(_loss, p, x, grad_fn=jax.grad(_loss))
    assert report.status == "pass", str(report)


@pytest.mark.parametrize("promotion", ["standard", "strict"])
@pytest.mark.parametrize("factor", [1.0, 1.0003])
def test_strict_promotion_keeps_the_float64_reference_of_an_explicit_cast(promotion, factor):
    """fn casts a parameter to float32 before a product with float32 data: valid under
    strict promotion, until the reference widens the data to float64. The reference fell
    back to float32, blamed fn ("fn could not run in float64"), and at its coarser
    tolerance passed a grad_fn 3e-4 off that standard promotion fails."""

    def loss(p, x):
        return jnp.sum(jnp.tanh(p["w"].astype(jnp.float32) @ x))

    def grad_fn(p, x):
        return jax.tree.map(lambda g: g * factor, jax.grad(loss)(p, x))

    p = {"w": jnp.linspace(0.1, 1.0, 6).reshape(2, 3)}
    x = jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)
    with jax.numpy_dtype_promotion(promotion), jax.numpy_rank_promotion("raise"):
        report = jaxcheck.verify(loss, p, x, grad_fn=grad_fn)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert report.reference_dtype == "float64"
    assert not any("could not run" in q for q in report.problems), report.problems


def test_strict_promotion_mixed_leaf_dtypes(strict_numerics):
    p = {"w": jnp.linspace(0.1, 1.0, 3, dtype=jnp.float32), "v": jnp.ones(2, jnp.bfloat16)}
    fn = lambda p: {"a": jnp.sin(p["w"]), "b": jnp.cos(p["v"])}  # noqa: E731
    report = jaxcheck.verify(fn, p, mode="both")
    assert report.status == "pass", str(report)
    assert report.tested_dtype == "bfloat16"


@pytest.mark.parametrize("x64_on", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_strict_promotion_with_a_python_float_argument(strict_numerics, dtype, x64_on):
    """A Python float beside a float32 (or bfloat16) array is weakly typed: fn computes in
    the array's dtype, with or without 64-bit types, and strict promotion allows it. The
    check takes the float in that dtype too (not float64, which strict promotion refuses
    beside float32), and still fails a derivative wrong in it."""
    x = jnp.array([0.3, -0.7, 1.1], dtype)
    with enable_x64(x64_on):
        jaxcheck.check_grads(lambda x, y: jnp.sin(x) * y, (x, 2.0), order=1)
        report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p[0]) * p[1]), (x, 2.0))
        assert report.status == "pass", str(report)
        assert report.tested_dtype == dtype  # y taken in x's dtype, as fn computes
        with pytest.raises(AssertionError, match="FAIL — gradient is WRONG"):
            # the derivative in y is half what it should be
            jaxcheck.check_grads(
                lambda x, y: jnp.sin(x) * y * lax.stop_gradient(y) / 2, (x, 2.0), order=1
            )


@pytest.mark.parametrize("x64_on", [False, True])
@pytest.mark.parametrize("where", ["alone", "beside complex64"])
def test_strict_promotion_with_a_python_complex(strict_numerics, where, x64_on):
    """A Python complex among params (or checked alone, fn closing over complex64 data)
    is weakly typed: fn computes in complex64. The check took it as complex128, which
    strict promotion refuses beside complex64 once 64-bit types are on; it is taken in
    complex64 now, and a derivative wrong in it still fails."""
    w = jnp.array([0.3 + 0.4j, -0.5 + 0.2j], jnp.complex64)
    if where == "alone":
        params, fn = 1.5 + 0.5j, lambda c: jnp.sum(jnp.abs(w * c) ** 2)
    else:
        params, fn = {"z": w, "c": 1.5 + 0.5j}, lambda p: jnp.sum(jnp.abs(p["z"] * p["c"]) ** 2)
    with enable_x64(x64_on):
        report = jaxcheck.verify(fn, params)
        assert report.status == "pass", str(report)
        assert report.tested_dtype == "float32"  # (complex64's parts)

        def grad_fn(p):
            return jax.tree.map(lambda g: g * 1.01, jax.grad(fn)(p))

        report = jaxcheck.verify(fn, params, grad_fn=grad_fn)
        assert report.status == "fail", str(report)


def test_a_python_float_beside_float32_and_complex128_leaves_stays_float32():
    """With 64-bit types on, a Python float beside float32 data and a complex128 leaf
    computes in float32 where fn multiplies it with the data; counting complex128 as
    float64 settled it to float64 (and fn's product with it to float64)."""
    from jaxcheck import _tree  # noqa: PLC0415

    with enable_x64(True):
        params = {"w": jnp.ones(3, jnp.float32), "z": jnp.ones(2, jnp.complex128), "s": 1.5}
        settled = _tree.settle_weak(params)
        assert {k: v.dtype.name for k, v in settled.items()} == {
            "s": "float32",
            "w": "float32",
            "z": "complex128",
        }
        params = {"z": jnp.ones(2, jnp.complex64), "c": 1.5 + 0.5j}
        assert _tree.settle_weak(params)["c"].dtype == jnp.complex64
        # beside complex leaves alone, in their parts' dtype, as fn computes z * 1.5
        params = {"z": jnp.ones(2, jnp.complex64), "s": 1.5}
        assert _tree.settle_weak(params)["s"].dtype == jnp.float32


@pytest.mark.parametrize("strict", [False, True])
def test_a_weak_leaf_keeps_its_own_dtype_where_a_float16_partner_would_overflow_it(strict):
    """`jnp.full(3, 1e5)` is a weakly typed float32 array: beside a float16 leaf it was
    cast to float16, Inf, and a check of finite params reported NaN/Inf; a Python float 1e5
    beside a float16 argument of check_grads passed a derivative twice too large (its
    reference overflowed too). fn uses it alone, in float32, and so does the check now."""
    params = {"h": jnp.array([0.5, 0.25], jnp.float16), "k": jnp.full(3, 1e5)}

    def loss(p):
        return jnp.sum(p["h"].astype(jnp.float32) ** 2) + jnp.sum(jnp.log(p["k"]))

    @jax.custom_vjp
    def log_twice_too_steep(s):
        return jnp.log(s)

    log_twice_too_steep.defvjp(lambda s: (jnp.log(s), s), lambda s, g: (2 * g / s,))
    with jax.numpy_dtype_promotion("strict" if strict else "standard"):
        report = jaxcheck.verify(loss, params)
        assert report.status == "pass", str(report)
        assert {leaf.path: leaf.dtype for leaf in report.leaves}["['k']"] == "float32"
        with pytest.raises(
            AssertionError, match=r"(?s)FAIL — gradient is WRONG.*\[1\] +\(\) +float32"
        ):
            jaxcheck.check_grads(
                lambda h, s: jnp.sum(h.astype(jnp.float32) ** 2) + log_twice_too_steep(s),
                (params["h"], 1e5),
                order=1,
                modes=("rev",),
            )


@pytest.mark.parametrize("x64_on", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_strict_promotion_with_a_python_float_alone_beside_closed_over_data(
    strict_numerics, dtype, x64_on
):
    """JAX's shard_map tests check `f(0.2)` with float32 data closed over: the Python float
    is weakly typed, so fn computes in float32. With no other float among the arguments, the
    check took it as float64 under 64-bit types, and strict promotion refused float64 beside
    the data (TypePromotionError from jaxcheck's own trace). It is taken in the dtype of
    fn's outputs, and a derivative wrong in it still fails."""
    w = jnp.array([0.3, -0.7, 1.1], dtype)
    with enable_x64(x64_on):
        jaxcheck.check_grads(lambda x: jnp.sin(x * w), (0.2,), order=2, atol=1e-2, rtol=1e-2)
        report = jaxcheck.verify(lambda x: jnp.sum(jnp.sin(x * w)), 0.2)
        assert report.status == "pass", str(report)
        assert report.tested_dtype == dtype
        checker = jaxcheck.Checker(lambda x, v: jnp.sum(jnp.sin(x * v)))
        assert checker(0.2, w).tested_dtype == dtype
        with pytest.raises(AssertionError, match="FAIL — gradient is WRONG"):
            jaxcheck.check_grads(
                lambda x: jnp.sin(x * w) * lax.stop_gradient(x) / x, (0.2,), order=1
            )


def _times_half_steep_in_s(x, s):
    """x * s, its derivative in s half what it should be."""
    held = lax.stop_gradient(s)
    return x * (s + held) / 2


@pytest.mark.parametrize("x64_on", [False, True])
@pytest.mark.parametrize("case", ["complex argument", "float64 closed over"])
def test_strict_promotion_with_a_python_float_fn_takes_only_weak(strict_numerics, x64_on, case):
    """A Python float beside complex arguments (x * s, x complex64), or beside a float64
    array fn closes over, is weakly typed in fn: strict promotion takes it there, and
    JAX's check_grads passes. Settled to the other arguments' float dtype, strict promotion
    refused it (TypePromotionError from inside the check); the check now runs fn with
    standard promotion there, which computes what the weak float does, and still fails a
    derivative wrong in the float."""
    with enable_x64(x64_on):
        if case == "complex argument":
            x = np.array([0.3 + 0.1j, 0.7 - 0.2j], np.complex64)
            f = lambda x, s: x * s + jnp.exp(x)  # noqa: E731
            bad = lambda x, s: _times_half_steep_in_s(x, s) + jnp.exp(x)  # noqa: E731
        else:
            w = jnp.ones(2, jnp.float64 if x64_on else jnp.float32) * 0.5
            x = np.array([0.3, 0.5], np.float32)
            f = lambda x, s: jnp.sum(jnp.sin(x)).astype(w.dtype) + w * s  # noqa: E731

            def bad(x, s):
                return jnp.sum(jnp.sin(x)).astype(w.dtype) + _times_half_steep_in_s(w, s)

        jaxcheck.check_grads(f, (x, 1.5), order=2)
        report = jaxcheck.verify(lambda p: jnp.sum(jnp.abs(f(*p)) ** 2), (x, 1.5))
        assert report.status == "pass", str(report)
        checker = jaxcheck.Checker(lambda s, x: jnp.sum(jnp.abs(f(x, s)) ** 2))
        assert checker(1.5, x).status == "pass"
        with pytest.raises(AssertionError, match=r"(?s)FAIL — gradient is WRONG.*wrong: \[1\]"):
            jaxcheck.check_grads(bad, (x, 1.5), order=1)


def test_strict_promotion_is_not_relaxed_over_a_bwd_it_refuses(strict_numerics):
    """The relaxation above is decided from fn and its vjp: a custom rule's bwd mixing
    bfloat16 into float32 is refused by strict promotion as jax.grad meets it (JAX's
    check_grads raises), and was passed under standard promotion."""

    @jax.custom_vjp
    def square(y):
        return y * y

    square.defvjp(lambda y: (y * y, y), lambda y, c: (c * y * jnp.asarray(2, jnp.bfloat16),))
    x = jnp.array([0.3 + 0.1j, 0.7 - 0.2j], jnp.complex64)
    with pytest.raises(ValueError, match="no available implicit dtype promotion path"):
        jaxcheck.check_grads(lambda x, s: jnp.sum(square(jnp.abs(x * s))), (x, 1.5), 1)


@pytest.mark.parametrize(
    "x64_on, out_dtype, expected", [(False, "float16", "float32"), (True, "float32", "float64")]
)
def test_a_python_float_alone_keeps_the_default_dtype_where_fn_takes_it(
    x64_on, out_dtype, expected
):
    """fn computes in JAX's default dtype and casts its output: the float is checked in
    the default dtype, not the output's (a first version took float16 for 7e4, which
    overflows it, and float32 under 64-bit types, where exp(100) overflows)."""
    w = jnp.array([0.3, 0.7, 1.1], jnp.float32)
    with enable_x64(x64_on):
        if out_dtype == "float16":
            fn = lambda x: jnp.sum(jnp.sin(x * w * 1e-4) * 100).astype(out_dtype)  # noqa: E731
            report = jaxcheck.verify(fn, 7e4)
        else:
            fn = lambda x: (jnp.exp(x) * 1e-40).astype(out_dtype)  # noqa: E731
            report = jaxcheck.verify(fn, 100.0)
        assert report.tested_dtype == expected, str(report)
        assert report.status == "pass", str(report)


@pytest.mark.parametrize("enabled", [False, True])
def test_x64_on_or_off(enabled):
    with enable_x64(enabled):
        p, x = _inputs(jnp.float32)
        report = jaxcheck.verify(_outputs, p, x, mode="both")
        assert report.status == "pass", str(report)
        assert report.tested_dtype == "float32" and report.reference_dtype == "float64"
        assert jax.config.jax_enable_x64 is enabled  # the check restores the setting


@pytest.mark.parametrize("precision", ["bfloat16", "highest"])
def test_default_matmul_precision(precision):
    p, x = _inputs(jnp.float32)
    with jax.default_matmul_precision(precision):
        report = jaxcheck.verify(_loss, p, x)
    assert report.status == "pass", str(report)


@pytest.mark.parametrize("order, under_checks", [(1, 2), (2, 6)])
def test_enable_checks(order, under_checks):
    """The derivatives under test are traced once alone under the caller's checks; the
    compiled programs (fn batched over directions, in float32 and float64) without them.
    At order 1: fn's output structure, and its vjp. At order 2 fn's first derivatives are
    traced under the checks inside the derivative maps' vjp, not once more alone before
    (was: 7 traces): fn's output structure; the maps' (jvp and vjp map: fn twice) and the
    maps' vjp (the same two); the search for custom_vjp rules in fn."""
    p, x = _inputs(jnp.float32)
    seen = []

    def outputs(p, x):
        seen.append((jax.config.jax_enable_x64, bool(jax.config.jax_enable_checks)))
        return _outputs(p, x)

    with jax.enable_checks(True):
        report = jaxcheck.verify(outputs, p, x, mode="both", order=order)
    assert report.status == "pass", str(report)
    assert seen.count((False, True)) == under_checks
    assert (False, False) in seen
    assert (True, False) in seen
    assert (True, True) not in seen
    assert not jax.config.jax_enable_checks


@pytest.mark.parametrize("order", [1, 2])
def test_enable_checks_with_a_custom_jvp_taking_a_static_argument(order):
    """jax.scipy.special.log_ndtr (a custom_jvp with a non-differentiable argument) trips
    an assertion of JAX's checks when staged with jax.make_jaxpr (jax 0.10), not when its
    vjp runs op by op, as JAX's own check_grads runs it: the check passes as that does."""
    x = np.array([0.5, -1.2, 2.0], np.float32)
    with jax.enable_checks(True):
        report = jaxcheck.verify(jax.scipy.special.log_ndtr, x, order=order)
    assert report.status == "pass", str(report)


@pytest.mark.parametrize("flag", ["debug_nans", "debug_infs"])
def test_debug_flags_are_not_tripped_by_the_check_itself(flag):
    """The check's own infinities (overflow-safe scales, cotangents of tiny float16
    outputs, large steps) must not trip the caller's debug flags."""
    p16 = jnp.linspace(0.1, 1.0, 4, dtype=jnp.float32).astype(jnp.float16)
    with getattr(jax, flag)(True):
        tiny = jaxcheck.verify(lambda p: jnp.sin(p) * jnp.float16(1e-6), p16, mode="both")
        p, x = _inputs(jnp.float32)
        plain = jaxcheck.verify(_outputs, p, x, mode="both")
    assert tiny.status == "pass", str(tiny)
    assert plain.status == "pass", str(plain)


@pytest.mark.parametrize(
    "fn",
    [
        lambda p: jnp.sum(jax.nn.softmax(p) * jnp.arange(3.0)),
        lambda p: jax.nn.logsumexp(p) - p[0],
        lambda p: -jnp.sum(jax.nn.log_softmax(p) * jnp.array([0.2, 0.3, 0.5])),
    ],
    ids=["softmax", "logsumexp", "log_softmax"],
)
def test_debug_infs_is_not_tripped_by_jaxs_own_constants(fn):
    """The replay under the caller's flags ran fn under jax.disable_jit, where the -inf
    inside JAX's own softmax and logsumexp tripped jax_debug_infs: every cross-entropy
    model raised FloatingPointError, where fn, jax.grad and JAX's check_grads run."""
    p = jnp.array([0.3, -1.2, 2.5])
    with jax.debug_infs(True):
        assert jaxcheck.verify(fn, p).status == "pass"
        jaxcheck.check_grads(fn, (p,), 2)


def test_debug_nans_names_the_users_primitive():
    """With jax_debug_nans on, a NaN gradient raises JAX's own error naming the primitive
    of fn that made it (as jax.grad(fn) would), not one about jaxcheck's programs."""
    fn = lambda p: jnp.sum(jnp.where(p > 0, jnp.log(p), 0.0))  # noqa: E731
    p = jnp.asarray([0.0, 1.0], jnp.float32)
    with jax.debug_nans(True), pytest.raises(FloatingPointError, match="nan.* in div"):
        jaxcheck.verify(fn, p)
    assert jaxcheck.verify(fn, p).status == "nonfinite"  # the flag off: reported


@pytest.mark.parametrize("flag, message", [("nans", "nan.* in log"), ("infs", "inf.* in exp")])
def test_debug_flags_raise_for_a_nan_fn_makes_and_drops(flag, message):
    """A NaN (Inf) made inside fn and dropped before its output (nan_to_num, a minimum)
    does not show in the compiled programs' results, and the check passed where JAX's
    check_grads, running fn op by op, raises it under the caller's flag. fn is now run so
    at params once too."""
    x = jnp.linspace(1.0, 2.0, 4)
    sg = jax.lax.stop_gradient
    fns = {
        "nans": lambda p: jnp.sum(p**2) + jnp.sum(jnp.nan_to_num(jnp.log(sg(p) - 5.0))),
        "infs": lambda p: jnp.sum(jnp.minimum(jnp.exp(100.0 * sg(p)), 1.0) * p),
    }
    fn = fns[flag]
    assert jaxcheck.verify(fn, x).status == "pass"  # the flag off
    with getattr(jax, f"debug_{flag}")(True):
        with pytest.raises(FloatingPointError, match=message):
            jaxcheck.verify(fn, x)
        with pytest.raises(FloatingPointError, match=message):
            jaxcheck.check_grads(fn, (x,), 2)
        assert jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p)), x, order=2).status == "pass"


def _sqrt_of_square(p):
    """At a = 0 its autodiff jvp is 0 / 0, NaN, whatever the tangent; fn is finite."""
    return jnp.sum(jnp.sqrt(p["a"] ** 2) ** 2) + jnp.sum(p["b"] ** 2)


@jax.custom_jvp
def _square_with_an_infinite_tangent(x):
    return x**2


_square_with_an_infinite_tangent.defjvp(
    lambda primals, tangents: (primals[0] ** 2, jnp.where(tangents[0] > 0, jnp.inf, 0.0))
)

_NAN_TANGENT_PARAMS = {"a": jnp.array([0.0, 0.5, -0.7]), "b": jnp.ones(2)}


def test_a_nan_derivative_in_forward_mode_is_nonfinite_not_wrong():
    """In forward mode the probe computes no gradient, and a NaN jvp along the directions
    was judged "wrong: ['a']" with an error of "—", where reverse mode says nonfinite."""
    report = jaxcheck.verify(_sqrt_of_square, _NAN_TANGENT_PARAMS, mode="forward")
    assert report.status == "nonfinite", str(report)
    assert report.problems[0] == (
        "the derivative under test (forward mode, autodiff) is NaN/Inf along 16 of 16 "
        "directions, where fn's finite differences are finite"
    )
    # (the jvp is NaN along zero tangents too: each leaf is moved alone to name it)
    assert [(leaf.path, leaf.status.value) for leaf in report.leaves] == [("['a']", "nonfinite")]

    def fn(p):
        return jnp.sum(_square_with_an_infinite_tangent(p["a"])) + jnp.sum(p["b"] ** 2)

    report = jaxcheck.verify(fn, _NAN_TANGENT_PARAMS, mode="forward")
    assert report.status == "nonfinite", str(report)
    assert [(leaf.path, leaf.status.value) for leaf in report.leaves] == [("['a']", "nonfinite")]
    order_2 = jaxcheck.verify(_sqrt_of_square, _NAN_TANGENT_PARAMS, mode="forward", order=2)
    assert order_2.status == "nonfinite", str(order_2)


def test_beyond_32_leaves_a_nan_jvp_along_zero_tangents_names_none_and_says_so():
    """Naming a leaf there takes a program per leaf: beyond 32 leaves none is compiled."""
    params = {f"l{i:02d}": jnp.array([0.5, -0.7]) for i in range(33)}
    params["l00"] = jnp.array([0.0, 0.5])
    report = jaxcheck.verify(
        lambda p: sum(jnp.sum(jnp.sqrt(x**2) ** 2) for x in p.values()), params, mode="forward"
    )
    assert report.status == "nonfinite", str(report)
    assert report.leaves == ()
    assert report.problems[1] == (
        "the jvp is NaN/Inf even along zero tangents, and of 33 leaves (more than 32) none "
        "is moved alone to name it: a derivative inside fn is infinite at params (sqrt or a "
        "division at 0)"
    )


def test_debug_nans_raises_for_a_nan_derivative_in_forward_mode():
    """reverse mode replays fn's gradient under the caller's flag; forward mode replayed
    fn alone, and the check failed the derivative as wrong instead of JAX raising."""
    with jax.debug_nans(True):
        with pytest.raises(FloatingPointError, match="nan"):
            jaxcheck.verify(_sqrt_of_square, _NAN_TANGENT_PARAMS, mode="forward")
        with pytest.raises(FloatingPointError, match="nan"):
            jaxcheck.check_grads(
                lambda a: _sqrt_of_square({"a": a, "b": jnp.ones(2)}),
                (_NAN_TANGENT_PARAMS["a"],),
                1,
                modes=("fwd",),
            )


def test_debug_nans_with_an_infinite_gradient_reports_nonfinite():
    """An Inf (not NaN) gradient does not trip jax_debug_nans: the report says so."""
    with jax.debug_nans(True):
        report = jaxcheck.verify(lambda p: jnp.sum(jnp.sqrt(p)), jnp.asarray([0.0, 1.0]))
    assert report.status == "nonfinite"
    assert "the gradient (autodiff) of leaf (root) is NaN/Inf at entry 0 (1 of 2)" in (
        report.problems
    ), report.problems


@pytest.mark.parametrize("order", [1, 2])
def test_disable_jit(order):
    """JAX's suites run tests under jax.disable_jit(); the check compiles its programs ahead
    of time, which raised "Disable jit is not supported in the AOT path". A wrong
    derivative still fails; the caller's setting is in force again after the check."""
    x = jnp.array([0.3, 0.7, 1.1])
    with jax.disable_jit():
        jaxcheck.check_grads(jnp.sin, (x,), order)
        assert jaxcheck.verify_rule(jax.nn.softplus, x).ok
        sin_off = jax.custom_jvp(jnp.sin)
        sin_off.defjvp(lambda p, t: (jnp.sin(p[0]), 1.01 * jnp.cos(p[0]) * t[0]))
        assert jaxcheck.verify(sin_off, x, order=order).status == "fail"
        assert jax.config.jax_disable_jit


def test_transfer_guard_disallow():
    p, x = jax.device_put(_inputs(jnp.float32))
    with jax.transfer_guard("disallow"):
        report = jaxcheck.verify(_outputs, p, x, mode="both")
        assert report.status == "pass", str(report)
        # the caller's guard is in force again after the check
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_disallow_with_a_python_float_beside_an_array():
    # the float is a parameter: the check puts it on the device itself, as JAX's
    # check_grads does with its arguments
    p = jax.device_put(jnp.asarray([0.3, -0.7, 1.1]))
    with jax.transfer_guard("disallow"):
        report = jaxcheck.verify(lambda t: jnp.sum(jnp.sin(t[0]) * t[1]), (p, 2.0))
        assert report.status == "pass", str(report)
        jaxcheck.check_grads(lambda a, b: jnp.sum(jnp.sin(a) * b), (p, 2.0), 1)
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_disallow_with_a_lone_python_float_under_strict_promotion():
    """A Python float alone: under strict promotion its dtype is read from fn's outputs
    with it put on the device, which the caller's guard refused (each setting alone
    passed)."""
    with jax.numpy_dtype_promotion("strict"), jax.transfer_guard("disallow"):
        report = jaxcheck.verify(lambda p: jnp.sin(p) * 2, 0.5)
        assert report.status == "pass", str(report)
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_disallow_check_grads_with_an_absolute_tolerance():
    """check_grads' atol is taken at f's scale by a jvp and a vjp along JAX's random draws,
    which jaxcheck puts on the device itself under the caller's guard (the argument a
    NumPy array, as JAX's tests pass them)."""
    x = np.linspace(0.1, 1.0, 3, dtype=np.float32)

    @jax.custom_jvp
    def big(x):
        return 100.0 * jnp.sin(x)

    big.defjvp(lambda p, t: (big(p[0]), 102.0 * jnp.cos(p[0]) * t[0]))  # 2 % off
    with jax.transfer_guard("disallow"):
        with pytest.raises(jaxcheck.GradientCheckError, match="gradient is WRONG"):
            jaxcheck.check_grads(lambda x: jnp.sum(big(x)), (x,), 1, atol=0.05, rtol=1e-3)
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_disallow_verify_rule():
    """verify_rule's rows drew their tangents on the host and were refused: a correct tanh
    was "primal is WRONG"."""
    x = jax.device_put(jnp.linspace(-1.0, 1.0, 3))
    with jax.transfer_guard("disallow"):
        report = jaxcheck.verify_rule(jnp.tanh, x)
        assert report.status == "pass", str(report)
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_disallow_verify_rule_with_a_numpy_input():
    """verify_rule put a NumPy input on the device outside its own allowed transfers,
    and raised JAX's "Disallowed host-to-device transfer" where verify passes."""
    z = np.linspace(-1.0, 1.0, 3).astype(np.float32)
    with jax.transfer_guard("disallow"):
        assert jaxcheck.verify_rule(jnp.tanh, z).status == "pass"
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_disallow_leaves_an_edge_of_domain_unjudged_as_without_it():
    """sqrt(w)**2 at w = 0: finite, its gradient NaN. check_grads returns quietly there
    (the edge of the domain); under the guard its look at the neighbouring points made
    transfers the guard refused, and the check failed as non-finite."""
    w = jnp.asarray([0.0, 1.0, 2.0])

    def f(w):
        return jnp.sum(jnp.sqrt(w) ** 2)

    assert jaxcheck.check_grads(f, (w,), 1, modes=("rev",)) is None
    with jax.transfer_guard("disallow"):
        assert jaxcheck.check_grads(f, (w,), 1, modes=("rev",)) is None
        with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
            jax.jit(jnp.sin)(np.ones(2, np.float32))


def test_transfer_guard_with_a_numpy_constant_in_fn():
    """jaxcheck's own transfers are explicit or allowed locally; fn's programs are traced
    and run under the caller's guard, where a NumPy constant fn closes over is baked into
    the program (as under jax.jit), so nothing is refused."""
    p = jax.device_put(jnp.linspace(0.1, 1.0, 3, dtype=jnp.float32))
    c = np.arange(3, dtype=np.float32)
    with jax.transfer_guard("disallow"):
        report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p * c)), p)
    assert report.status == "pass", str(report)


@pytest.mark.parametrize(
    "name",
    ["conv_param32_arg16", "conv_param16_arg32", "pad", "dynamic_update_slice"],
)
def test_mixed_precision_functions(name):
    """A low-precision operand beside a float32 one inside fn: the float64 reference
    either runs, or the check falls back and says so; never an error."""
    w = jnp.linspace(-1.0, 1.0, 9, dtype=jnp.float32).reshape(1, 1, 3, 3)
    img = jnp.linspace(0.0, 1.0, 25, dtype=jnp.float32).reshape(1, 1, 5, 5)
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME")  # noqa: E731
    cases = {
        "conv_param32_arg16": (
            lambda p, x: jnp.sum(conv(x.astype(jnp.float32), p) ** 2),
            w,
            img.astype(jnp.bfloat16),
        ),
        "conv_param16_arg32": (
            lambda p, x: jnp.sum(conv(x, p.astype(jnp.float32)) ** 2),
            w.astype(jnp.bfloat16),
            img,
        ),
        "pad": (
            lambda p, x: jnp.sum(lax.pad(p, x.astype(p.dtype), [(1, 1, 0)]) ** 2),
            jnp.ones(3, jnp.float32),
            jnp.asarray(0.5, jnp.bfloat16),
        ),
        "dynamic_update_slice": (
            lambda p, x: jnp.sum(jnp.sin(lax.dynamic_update_slice(p, x.astype(jnp.float32), (1,)))),
            jnp.ones(5, jnp.float32),
            jnp.ones(2, jnp.bfloat16),
        ),
    }
    fn, p, x = cases[name]
    report = jaxcheck.verify(fn, p, x)
    assert report.status == "pass", str(report)
    if report.reference_dtype != "float64":
        assert any("could not run in float64" in q for q in report.problems)


def test_low_precision_array_closed_over_falls_back_to_its_own_dtype():
    """fn mixes a bfloat16 array it closes over with its bfloat16 parameters: neither
    float64 nor float32 inputs can run it; the reference keeps the inputs' own dtypes."""
    table = jnp.linspace(0.0, 1.0, 5, dtype=jnp.float32).astype(jnp.bfloat16)
    p = jnp.asarray([0.5, 0.25], jnp.bfloat16)
    fn = lambda p: jnp.sum(jnp.sin(lax.dynamic_update_slice(table, p, (1,))))  # noqa: E731
    report = jaxcheck.verify(fn, p)
    assert report.status in ("pass", "inconclusive"), str(report)
    assert any("could not run in float64" in q for q in report.problems)
    assert any("leave every input in its own dtype" in q for q in report.problems)


def test_float32_fallback_takes_a_float32_step():
    """fn cannot run in float64 (a float32-only primitive call): the fallback's step is
    float32's eps^(1/3), not float64's."""
    p = jnp.linspace(0.1, 1.0, 4, dtype=jnp.float32)
    fn = lambda p: jnp.sum(jnp.sin(lax.dynamic_update_slice(p, jnp.ones(1, jnp.float32), (1,))))  # noqa: E731
    report = jaxcheck.verify(fn, p)
    assert report.status == "pass", str(report)
    assert report.reference_dtype == "float32"
    assert report.step > 1e-3  # float64's step would be 6e-6


def test_debug_nans_with_nan_params_reports_the_leaf():
    p, x = _inputs(jnp.float32)
    p["b"] = jnp.asarray([jnp.nan, 1.0], jnp.float32)
    with jax.debug_nans(True):
        report = jaxcheck.verify(_loss, p, x)
    assert report.status == "nonfinite"
    assert (
        "parameter leaf ['b'] contains NaN/Inf (params are differentiated whole: a buffer fn "
        "does not differentiate, such as an attention mask of -inf, belongs in *args, held "
        "fixed: verify(fn, params, mask))"
    ) in report.problems


def _reuses_float32_constants() -> bool:
    """Whether this JAX keeps the float32 conversion of a NumPy constant a function
    closes over, made with 64-bit types off, once they are on (jax 0.9 and later do; 0.7
    converts it anew)."""
    probe = _scan_closing_over(np.random.RandomState(0).randn(2))
    p = (np.ones(4), np.ones((5, 3)))
    probe(p)
    with enable_x64(True):
        try:
            jax.jit(probe)(p)
        except Exception:  # noqa: BLE001 - float32 and float64 mixed: kept
            return True
    return False


def _scan_closing_over(constant):
    def body(c, a):
        b = jnp.cos(jnp.sum(jnp.sin(a)) + jnp.sum(jnp.cos(c)) + jnp.sum(jnp.tan(constant)))
        return jnp.sin(c * b), b

    return lambda p: lax.scan(body, p[0], p[1])[0]


@pytest.mark.parametrize("as_numpy", [True, False], ids=["numpy-params", "float32-params"])
def test_numpy_float64_constant_converted_with_x64_off(as_numpy):
    """fn closes over a float64 NumPy constant and first ran with 64-bit types off: jax
    then reuses its float32 conversion once they are on, and fn mixes float32 with float64.
    The check falls back to fn as jax runs it and says why, instead of crashing."""
    assert not jax.config.jax_enable_x64
    if not _reuses_float32_constants():
        pytest.skip("this JAX converts a closed-over NumPy constant anew once x64 is on")
    rng = np.random.RandomState(1)
    fn = _scan_closing_over(np.random.RandomState(0).randn(2))
    p = (rng.randn(4), rng.randn(5, 3))
    if not as_numpy:
        p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p)
    fn(p)  # with 64-bit types off: jax converts the constant to float32, and keeps that
    report = jaxcheck.verify(fn, p)
    assert report.status == "pass", str(report)
    assert report.tested_dtype == "float32" and report.reference_dtype == "float32"
    said = "checked as jax runs it, with them off" if as_numpy else "could not run in float64"
    # once: the checks run inside this one (by order) do not try float64 again
    assert len([q for q in report.problems if said in q and "jax.clear_caches()" in q]) == 1


def test_fn_evaluating_a_float32_jaxpr_falls_back_and_says_why():
    """JAX's own tests evaluate jaxprs traced in float32 (jax.core.eval_jaxpr): such a fn
    cannot run in float64, and the note blamed NumPy constants alone."""

    def g(x1, x2):
        return lax.cond(x1 > 0, lambda a, b: (jnp.sin(a), jnp.sin(b)), lambda a, b: (a, b), x1, x2)

    closed = jax.make_jaxpr(g)(1.0, 1.0)
    report = jaxcheck.verify(
        lambda x: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, x[0], x[1]),
        jnp.asarray([0.7, -0.4]),
    )
    assert report.status == "pass" and report.reference_dtype == "float32", str(report)
    [said] = [q for q in report.problems if q.startswith("fn could not run in float64")]
    assert (
        "to check fn in float64, pass any float32 array, dtype or traced jaxpr that fn closes "
        "over or writes as an argument, or cast it to the inputs' dtype; float32 conversions"
    ) in said


def test_numpy_float64_params_converted_before_with_x64_off():
    """jax.linearize converted the float64 NumPy params while 64-bit types were off (for
    the constants of a scan); the check still sees them as float64, with their float64
    values, where jnp.asarray would give float32 ones."""
    assert not jax.config.jax_enable_x64
    rng = np.random.RandomState(0)
    w, xs = (rng.randn(2, 6), rng.randn(1, 6)), rng.randn(3, 4)

    def step(w, h, x):
        hx = jnp.concatenate([h, x])
        return jnp.tanh(jnp.dot(w[0], hx)), jnp.tanh(jnp.dot(w[1], hx))

    @jax.jit
    def fn(w, xs):
        return jnp.sum(lax.scan(functools.partial(step, w), jnp.zeros(2), xs)[1] ** 2)

    _, linear = jax.linearize(fn, w, xs)  # kept: it holds jax's float32 conversions
    linear(w, xs)  # (with jax 0.10.2, jnp.asarray(w[0]) is now float32 once x64 is on)
    with jax.numpy_dtype_promotion("strict"):
        report = jaxcheck.verify(fn, w, xs)
    assert report.status == "pass", str(report)
    assert report.tested_dtype == "float64", report.problems
    with enable_x64(True):  # as the check converts them
        seen = jaxcheck._tree.split(w, "params")[1][0]
        assert seen.dtype == jnp.float64 and np.array_equal(np.asarray(seen), w[0])


@jax.custom_vjp
def _gain(w):
    return 0.9 * jnp.tanh(w)


_GAIN_OFF = {"factor": 1.0}
_gain.defvjp(
    lambda w: (0.9 * jnp.tanh(w), w),
    lambda w, g: (_GAIN_OFF["factor"] * g * 0.9 * (1 - jnp.tanh(w) ** 2),),
)
# data a test module keeps at its top level, read by name
_START = jnp.asarray([0.3, -0.2, 0.5], jnp.float32)
_STARTS = {"start": _START, "label": "a value that is no array"}


def _relaxed(w, start):
    """A scan whose carry starts from `start`: float32 data beside float64 params changes
    the carry's type, which a scan refuses."""

    def step(c, _):
        c = c * _gain(w) + 0.1
        return c, jnp.sum(c**2)

    return jnp.mean(lax.scan(step, start, None, length=20)[1])


_KEYS = jax.random.normal(jax.random.key(1), (1, 4, 1, 8))  # (float32, at module level)


@pytest.mark.parametrize("error", [0.0, 1e-3])
def test_data_a_library_function_refuses_beside_float64_is_cast_for_the_reference(error):
    """jax.nn.dot_product_attention over keys fn reads from its module says "query dtype
    should be float32, but got float64", none of JAX's words for mixed operands: the check
    fell back to float32 differences (tolerance 3.5e-4, a rule 2e-4 off passed) without
    casting the keys as it does for those. Its words are among them now (not any error
    naming both dtypes: a kernel comparing its input's dtype with a global's, refusing
    float64 on purpose, passed once the global was cast)."""
    q = jax.random.normal(jax.random.key(0), (1, 4, 1, 8))

    def fn(q):
        q = q + error * (q - lax.stop_gradient(q))
        return jax.nn.dot_product_attention(q, _KEYS, _KEYS)

    report = jaxcheck.verify(fn, q)
    assert report.status == ("fail" if error else "pass"), str(report)
    assert report.reference_dtype == "float64" and report.tolerance < 2e-4, str(report)
    said = [p for p in report.problems if p.startswith("fn mixed float32 arrays it closes")]
    assert len(said) == 1 and "query dtype should be float32, but got float64" in said[0]


@pytest.mark.parametrize("factor", [1.0, 1.001])
@pytest.mark.parametrize(
    "held", ["closure", "global", "partial", "global dict", "tuple", "partial dict", "indexed"]
)
def test_float32_data_fn_closes_over_is_cast_for_the_float64_reference(held, factor, monkeypatch):
    """A scan starting from float32 data that fn closes over (check_grads takes no other
    data) could not run in float64: the check fell back to float32 finite differences,
    whose tolerance (1e-2) passed a rule 50 % off in one entry. The data is now cast to
    float64 for the reference too, as arguments are: a rule 0.1 % off fails. So is data in
    a plain container (a dict of initial weights at module level, unrolled by an
    optimizer: tolerance 4e-4 before)."""
    monkeypatch.setitem(_GAIN_OFF, "factor", factor)
    start = jnp.asarray([0.3, -0.2, 0.5], jnp.float32)
    starts = (start, "a value that is no array")
    fn = {
        "closure": lambda w: _relaxed(w, start),
        "global": lambda w: _relaxed(w, _START),
        "partial": functools.partial(_relaxed, start=start),
        "global dict": lambda w: _relaxed(w, _STARTS["start"]),
        "tuple": lambda w: _relaxed(w, starts[0]),
        # (a dict bound by partial; an array indexed by a traced index, which a NumPy array
        # refuses: the cast keeps a JAX array one)
        "partial dict": functools.partial(lambda w, data: _relaxed(w, data["start"]), data=_STARTS),
        "indexed": lambda w: _relaxed(w, start[jnp.argsort(w * 0.0)]),
    }[held]
    w = jnp.asarray([0.4, 0.7, -0.5], jnp.float32)
    report = jaxcheck.verify(fn, w)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert report.reference_dtype == "float64" and report.tolerance < 1e-4, str(report)
    said = [q for q in report.problems if q.startswith("fn mixed float32 arrays it closes over")]
    assert len(said) == 1 and "them cast to float64 too (1 array, cast exactly" in said[0], (
        report.problems
    )
    # put back
    assert start.dtype == _START.dtype == jnp.float32 and float(start[0]) == pytest.approx(0.3)
    if held == "partial":
        assert fn.keywords["start"] is start
    assert _STARTS["start"] is _START and starts[0] is start
    if factor != 1.0:
        with pytest.raises(jaxcheck.GradientCheckError):
            jaxcheck.check_grads(fn, (w,), 1, modes=["rev"])


@pytest.mark.parametrize("factor", [0.0, 5e-5])
def test_a_derivative_in_float32_data_fn_closes_over_is_taken_in_float64(factor):
    """A PINN's residual takes a Hessian in its float32 collocation points, closed over:
    in the float64 reference JAX returns that Hessian in float32, so fn was taken for a
    staircase of float32 quanta and judged at float32 resolution (tolerance 1.7e-4), and a
    gradient 5e-5 off passed, failing with the points passed as an argument. With the
    points cast to float64 fn rounds nothing, and is judged at float64 resolution."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k[0], (2, 8)), "w2": jax.random.normal(k[1], (8,)) / 3}
    points = jax.random.uniform(k[2], (6, 2))

    def u(p, xy):
        return jnp.tanh(xy @ p["w1"]) @ p["w2"]

    def residual(p):
        laplacian = jax.vmap(lambda xy: jnp.trace(jax.hessian(lambda q: u(p, q))(xy)))(points)
        loss = jnp.mean((laplacian + jnp.sin(points[:, 0])) ** 2)
        return loss - factor * (loss - lax.stop_gradient(loss))  # gradient scaled by 1 - factor

    report = jaxcheck.verify(residual, params)
    assert report.status == ("pass" if factor == 0.0 else "fail"), str(report)
    assert report.tolerance < 1e-5, str(report)
    [said] = [q for q in report.problems if q.startswith("fn rounds to float32 in float64 only")]
    assert said.endswith(
        "them cast to float64 too (1 array, cast exactly: their values are the same)"
    )
    assert points.dtype == jnp.float32  # put back


def _cubed_sines(q):
    return jnp.sin(q) ** 3


@pytest.mark.parametrize("given_to", ["jvp", "vjp", "linearize", "complex scan"])
def test_a_float32_vector_fn_closes_over_as_a_tangent_or_complex_data_is_cast(given_to):
    """A Hessian-vector product's vector (or a probe) that fn closes over, given to
    jax.jvp, jax.vjp's pullback or a linearized function, and complex64 data in a scan's
    carry, were not recognised as float32 data mixed with float64: the check fell back to
    float32 finite differences (tolerance 3.5e-4), and a grad_fn 2e-4 off passed."""
    u = jnp.linspace(0.5, 1.5, 5)
    start = jnp.asarray([1 + 1j, 0.5 - 0.2j, 0.3j, 0.1, -0.4j], jnp.complex64)

    def complex_scan(p):
        def step(c, _):
            return c * jnp.exp(1j * p) * 0.9 + 0.1, None

        return jnp.sum(jnp.abs(lax.scan(step, start, None, length=5)[0]) ** 2)

    fn = {
        "jvp": lambda p: jnp.sum(
            u * jax.jvp(jax.grad(lambda q: jnp.sum(_cubed_sines(q))), (p,), (u,))[1]
        ),
        "vjp": lambda p: jnp.sum(jax.vjp(_cubed_sines, p)[1](u)[0] ** 2),
        "linearize": lambda p: jnp.sum(jax.linearize(_cubed_sines, p)[1](u) ** 2),
        "complex scan": complex_scan,
    }[given_to]
    p = jnp.linspace(0.1, 0.9, 5)
    slightly_off = lambda q: jax.tree.map(lambda g: g * (1 + 2e-4), jax.grad(fn)(q))  # noqa: E731
    for grad_fn, expected in ((None, "pass"), (slightly_off, "fail")):
        report = jaxcheck.verify(fn, p, grad_fn=grad_fn)
        assert report.status == expected, str(report)
        assert report.reference_dtype == "float64" and report.tolerance < 1e-5, str(report)
        said = [q for q in report.problems if q.startswith("fn mixed float32 arrays it closes")]
        assert len(said) == 1 and "cast to float64 too (1 array, cast exactly" in said[0], (
            report.problems
        )
    assert u.dtype == jnp.float32 and start.dtype == jnp.complex64


def test_the_cast_of_closed_over_data_leaves_large_containers_alone():
    """A table of 4097 numbers beside the data in one list was copied leaf by leaf at every
    check (a 1e6-entry table: 1.3 s a warm call); containers beyond 4096 entries are not
    reached, smaller ones are, and everything is put back."""
    data = jnp.asarray([0.3, -0.2], jnp.float32)
    small, large = [data, "label"], [data] + [0.5] * 4096

    def reads_small(w):
        return w * small[0]

    def reads_large(w):
        return w * large[0]

    with jaxcheck._precision.widened_closures(reads_small) as cast:
        assert cast == 1 and small[0].dtype == jnp.float64
    with jaxcheck._precision.widened_closures(reads_large) as cast:
        assert cast == 0 and large[0].dtype == jnp.float32
    assert small[0] is data and large[0] is data


@jax.custom_jvp
def _sine(x):
    return jnp.sin(x)


@_sine.defjvp
def _sine_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.sin(x), jnp.cos(x) * t * _SINE_OFF["factor"]


_SINE_OFF = {"factor": 1.0}


@pytest.mark.rules_auto
@pytest.mark.parametrize("factor", [1.0, 1 + 2e-4])
@pytest.mark.parametrize("tested", ["grad_fn", "custom_jvp"])
def test_an_int32_loop_bound_argument_keeps_the_float64_reference(tested, factor, monkeypatch):
    """`lax.fori_loop(0, n)` with `n` an int32 array argument (made with 64-bit types
    off) failed in the float64 reference, where the loop's Python 0 is int64: the check
    fell back to float32 finite differences (tolerance 6e-4) and passed a derivative 2e-4
    off. The int32 inputs are now cast to int64 there (the rule search's float64 trace
    too); a loop counted by integers is no solver stopping at a tolerance."""
    monkeypatch.setitem(_SINE_OFF, "factor", factor)

    def fn(w, n):
        return jnp.sum(lax.fori_loop(0, n, lambda i, x: _sine(x * w) + x, jnp.ones(4)))

    def grad_fn(w, n):  # (reverse mode refuses a loop with a traced bound)
        return jax.jacfwd(fn)(w, n) * factor

    w, n = jnp.linspace(0.5, 1.0, 4), jnp.asarray(5)
    assert n.dtype == jnp.int32
    if tested == "grad_fn":
        report = jaxcheck.verify(fn, w, n, grad_fn=grad_fn)
    else:
        report = jaxcheck.verify(fn, w, n, mode="forward")
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert report.reference_dtype == "float64" and report.tolerance < 1e-5, str(report)
    [said] = [q for q in report.problems if q.startswith("fn mixed int32 arrays among its")]
    assert "got int64 and int32" in said and said.endswith(
        "finite differences in float64 ran with them cast to int64 (1 array, the same values)"
    )
    assert not any("solver" in q for q in report.problems), report.problems
    if tested == "custom_jvp" and factor != 1.0:
        assert "wrong rule: custom_jvp _sine at " in str(report), str(report)
    assert n.dtype == jnp.int32


@pytest.mark.parametrize("factor", [1.0, 1 + 2e-4])
def test_an_int32_position_argument_keeps_the_float64_reference(factor):
    """A KV cache written at an int32 position argument (`dynamic_update_slice(cache, k,
    (pos, 0))`, whose Python 0 is int64 under 64-bit types) fell back to float32 finite
    differences in the same way: JAX's message says "of the same type"."""

    def fn(w, cache, pos):
        k = jnp.tanh(w * jnp.arange(1.0, 4.0))
        return jnp.sum(jnp.sin(lax.dynamic_update_slice(cache, k[None], (pos, 0)) * w) ** 2)

    def grad_fn(w, cache, pos):
        return jax.grad(fn)(w, cache, pos) * factor

    w, cache = jnp.asarray([0.3, -0.6, 0.9]), jnp.cos(jnp.arange(12.0)).reshape(4, 3)
    report = jaxcheck.verify(fn, w, cache, jnp.int32(2), grad_fn=grad_fn)
    assert report.status == ("pass" if factor == 1.0 else "fail"), str(report)
    assert report.reference_dtype == "float64" and report.tolerance < 1e-5, str(report)
    [said] = [q for q in report.problems if q.startswith("fn mixed int32 arrays among its")]
    assert "must be integers of the same type, got int32, int64" in said, said
