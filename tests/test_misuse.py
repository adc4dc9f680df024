"""Misuse and odd inputs get a message that says what happened and what to do, and leave
the caller's arrays, and every later check, intact."""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcheck
from jaxcheck import _plan, _problem, _report

_TRACED = "jaxcheck.verify runs on the host"


def _loss(p):
    return jnp.sum(jnp.sin(p) ** 2)


def _grad(p):
    return 2 * jnp.sin(p) * jnp.cos(p)


@pytest.mark.parametrize("key", [0, 7, "typed"])
@pytest.mark.parametrize(
    "where",
    ["jit-params", "jit-constants", "grad-closure", "vmap-params", "vmap-closure"],
)
def test_traced_call_is_refused_and_breaks_nothing(where, key):
    """Called inside a transformation, verify says it runs on the host; nothing traced
    reaches a cache, so the next ordinary call with the same key passes."""
    key = jax.random.key(3) if key == "typed" else key
    p = jnp.linspace(0.1, 1.0, 3)
    calls = {
        "jit-params": lambda: jax.jit(lambda q: jaxcheck.verify(_loss, q, key=key).ok)(p),
        "jit-constants": lambda: jax.jit(lambda s: jaxcheck.verify(_loss, jnp.ones(3), key=key).ok)(
            1.0
        ),
        "grad-closure": lambda: jax.grad(
            lambda s: jaxcheck.verify(lambda q: jnp.sum(jnp.sin(q * s)), p, key=key).relative_error
        )(1.0),
        "vmap-params": lambda: jax.vmap(lambda q: jaxcheck.verify(_loss, q, key=key).ok)(
            jnp.ones((2, 3))
        ),
        "vmap-closure": lambda: jax.vmap(
            lambda s: jaxcheck.verify(lambda q: jnp.sum(jnp.sin(q * s)), p, key=key).ok
        )(jnp.ones(2)),
    }
    cached = (len(_plan._CACHE), len(_problem._STRUCTURES))
    with pytest.raises(TypeError, match=_TRACED):
        calls[where]()
    assert (len(_plan._CACHE), len(_problem._STRUCTURES)) <= cached  # nothing traced kept
    report = jaxcheck.verify(_loss, p, key=key)
    assert report.status == "pass", str(report)


def test_traced_params_message_names_the_leaf():
    def inside(q):
        jaxcheck.verify(_loss, {"w": q})
        return q

    with pytest.raises(TypeError, match=r"The params leaf \['w'\] is a traced value"):
        jax.jit(inside)(jnp.ones(3))


@pytest.mark.parametrize("entry", ["check_grads", "verify_rule"])
def test_the_other_entry_points_refuse_a_traced_call_in_their_own_terms(entry):
    """verify_rule said a correct jnp.sin was WRONG inside jax.jit (every row failed on the
    tracer); check_grads said "Call verify" and named a "params leaf"."""
    calls = {
        "check_grads": lambda q: jaxcheck.check_grads(jnp.sin, (q,), 1),
        "verify_rule": lambda q: jaxcheck.verify_rule(jnp.sin, q),
    }

    def inside(q):
        calls[entry](q)
        return q

    with pytest.raises(TypeError) as info:
        jax.jit(inside)(jnp.ones(3))
    assert str(info.value).endswith(
        f"jaxcheck.{entry} runs on the host (it reads numbers back and decides), so it cannot "
        "be called inside jax.jit, jax.grad, jax.vmap or any other transformation. The args "
        f"leaf [0] is a traced value. Call {entry} outside the transformation, on concrete "
        "arrays."
    )


def test_closure_over_a_tracer_is_explained():
    with pytest.raises(TypeError, match="fn closes over a traced value") as info:
        jax.grad(lambda s: jaxcheck.verify(lambda q: jnp.sum(q * s), jnp.ones(3)).step)(1.0)
    assert "pass it as an argument instead" in str(info.value)


def test_a_rule_inside_fn_closing_over_a_value_fn_traced_is_explained():
    """A custom_vjp defined inside fn closing over a value fn computes from params leaks
    that tracer (jax.grad(fn) fails too): the message blamed a jax.jit around verify,
    where there was none."""

    def loss(p):
        scale = jnp.sum(p**2) + 1.0

        @jax.custom_vjp
        def f(z):
            return jnp.sin(z) * scale

        f.defvjp(lambda z: (f(z), z), lambda z, g: (g * jnp.cos(z) * scale,))
        return jnp.sum(f(p) ** 2)

    with pytest.raises(
        TypeError,
        match="fn leaks a value it traced: a custom_vjp/custom_jvp "
        "defined inside fn whose function or rule closes over a value",
    ) as info:
        jaxcheck.verify(loss, jnp.asarray([0.3, -0.2]))
    assert "jax.grad(fn) fails the same way; pass the value to the rule as an argument" in str(
        info.value
    )
    assert "inside jax.jit" not in str(info.value)


def test_a_rule_in_a_scan_body_closing_over_its_index_is_explained():
    """A custom_vjp defined in a scan body whose bwd reads the body's index: the leaked
    tracer reached XLA as a constant ("No constant handler for type: DynamicJaxprTracer")."""
    d = jnp.cos(jnp.arange(8.0)) + 2.0

    def loss(p):
        def body(c, i):
            @jax.custom_vjp
            def q(u):
                return jnp.sin(u) * d[i]

            q.defvjp(lambda u: (q(u), u), lambda u, g: (jnp.cos(u) * d[i] * g,))
            return c + q(p[i]), None

        return jax.lax.scan(body, 0.0, jnp.arange(8))[0]

    with pytest.raises(TypeError, match="fn leaks a value it traced"):
        jaxcheck.verify(loss, jnp.linspace(0.1, 0.8, 8))


def test_float64_numpy_params_are_checked_in_float64():
    """With 64-bit types off, float64 NumPy params used to be rounded to float32, where a
    float64 gradient 5e-7 off passes as rounding."""
    assert not jax.config.jax_enable_x64
    p = np.linspace(0.1, 1.0, 4)
    bad = jaxcheck.verify(_loss, p, grad_fn=lambda q: _grad(q) * (1 + 5e-7))
    assert bad.status == "fail", str(bad)
    assert bad.tested_dtype == "float64"
    assert 4e-7 < bad.relative_error < 6e-7
    assert any(
        "params hold float64 NumPy arrays while 64-bit types are off" in q for q in bad.problems
    )
    good = jaxcheck.verify(_loss, p, grad_fn=_grad)
    assert good.status == "pass", str(good)
    assert not jax.config.jax_enable_x64  # restored
    assert p.dtype == np.float64 and p[0] == 0.1  # the caller's array is intact


def test_float64_numpy_params_reaching_a_numpy_constant_in_fn_are_checked_in_float64(capfd):
    """fn multiplies a float64 NumPy matrix by the array it is given. Fingerprinting fn for
    its programs traced it with 64-bit types off, and JAX kept the matrix's float32
    conversion for the float64 check: XLA errors on stderr, and a check in float32 where a
    gradient 2e-4 off passed."""
    assert not jax.config.jax_enable_x64
    a = np.random.RandomState(0).randn(6, 3)

    def loss(w):
        return float(np.sum(np.tanh(a @ w) ** 2))

    def grad(w):
        t = np.tanh(a @ w)
        return a.T @ (2 * t * (1 - t**2)) * 1.0002

    report = jaxcheck.verify(loss, np.array([0.3, -0.2, 0.5]), grad_fn=grad)
    assert report.status == "fail", str(report)
    assert (report.tested_dtype, report.reference_dtype) == ("float64", "float64")
    assert report.relative_error == pytest.approx(2e-4, rel=0.05)
    assert [q for q in report.problems if "params hold float64 NumPy" in q] == [
        "params hold float64 NumPy arrays while 64-bit types are off: the check ran with them "
        "on, so that the float64 parameters are checked as float64 (not rounded to float32)"
    ]
    assert "RuntimeProgramInputMismatch" not in capfd.readouterr().err


def test_all_empty_params_are_refused():
    with pytest.raises(ValueError, match=r"every floating-point leaf of params is empty") as info:
        jaxcheck.verify(
            lambda p: jnp.sum(p["a"]) + jnp.sum(p["b"]), {"a": jnp.zeros(0), "b": jnp.ones((2, 0))}
        )
    assert "['a'] (0,), ['b'] (2, 0)" in str(info.value)
    assert "nothing to check" in str(info.value)


def test_an_all_empty_output_is_refused():
    """It passed ("fn is flat here") though there is no derivative to check."""
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: {"y": p[:0] * 2.0, "z": p[3:]}, jnp.ones(3))
    assert str(info.value) == (
        "every output leaf of fn is empty (['y'] (0,), ['z'] (0,)): there is no derivative "
        "to check. Return at least one element (a scalar loss, for example)."
    )


def test_an_empty_leaf_beside_others_is_not_checked_alone():
    """It was checked alone and reported flat ("a parameter cut off from the loss?")."""
    params = {"a": jnp.ones((0,)), "b": jnp.linspace(0.5, 1.0, 2)}
    report = jaxcheck.verify(
        lambda p: jnp.sum(p["a"] ** 3) + jnp.sum(p["b"] ** 2), params, localize=True
    )
    assert report.status == "pass", str(report)
    assert [leaf.path for leaf in report.leaves] == ["['b']"]
    assert not any("flat" in q for q in report.problems), report.problems


def test_scalar_from_grad_fn_for_a_pytree():
    params = {"a": jnp.ones(2), "b": jnp.ones(3)}
    fn = lambda p: jnp.sum(p["a"]) + jnp.sum(p["b"])  # noqa: E731
    with pytest.raises(TypeError, match=r"grad_fn returned a single array \(shape \(\)\)") as info:
        jaxcheck.verify(fn, params, grad_fn=lambda p: jnp.float32(1.0))
    assert "where a pytree like params, with 2 leaves (['a'], ['b']), was expected" in str(
        info.value
    )


@pytest.mark.parametrize("params", [{"w": jnp.ones(3)}, [jnp.ones(3)]])
def test_array_from_grad_fn_for_a_pytree_of_one_leaf(params):
    """A bare array for params of one leaf inside a dict or list was told that grad_fn
    returned "no gradient for the parameter leaf ['w'] ... (found leaves: none)"."""
    fn = lambda p: jnp.sum(jnp.sin(jax.tree_util.tree_leaves(p)[0]))  # noqa: E731
    path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(params)[0][0][0])
    with pytest.raises(TypeError) as info:
        jaxcheck.verify(fn, params, grad_fn=lambda p: jnp.cos(jnp.ones(3)))
    assert str(info.value) == (
        f"grad_fn returned a single array (shape (3,)) where a pytree like params, with 1 leaf "
        f"({path}), was expected. Return the gradient with the structure of params "
        "(jax.grad(fn) does)."
    )
    # a bare array for a bare array is the gradient itself
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p)), jnp.ones(3), grad_fn=jnp.cos)
    assert report.status == "pass"


def test_low_precision_grad_fn_is_pointed_out():
    p = jnp.linspace(0.1, 1.0, 4, dtype=jnp.float32)
    report = jaxcheck.verify(_loss, p, grad_fn=lambda q: _grad(q).astype(jnp.float16))
    if jax.default_backend() == "cpu":
        # elsewhere float64 may round to float16 through float32: the float64 rule then
        # differs from the float32 one, and that difference is accepted as rounding
        assert report.status == "fail"
    assert any(
        "grad_fn returned float16 for the parameter leaf (root), whose dtype is float32" in q
        for q in report.problems
    )


@pytest.mark.parametrize("has_aux", [False, True])
def test_fn_returning_a_string(has_aux):
    fn = (lambda p: ("loss", 0)) if has_aux else (lambda p: "loss")
    with pytest.raises(
        TypeError,
        match="fn must return a scalar or a pytree of float arrays; it returned str 'loss'",
    ):
        jaxcheck.verify(fn, jnp.ones(2), has_aux=has_aux)


def test_string_leaf_in_fn_outputs_is_located():
    with pytest.raises(TypeError, match=r"it returned str 'x' at \['name'\]"):
        jaxcheck.verify(lambda p: {"y": jnp.sum(p), "name": "x"}, jnp.ones(2))


def test_numpy_fn_without_grad_fn():
    p = np.linspace(0.1, 1.0, 3)
    with pytest.raises(TypeError, match="jax cannot differentiate it") as info:
        jaxcheck.verify(lambda q: np.sum(np.sin(q)), p)
    assert "grad_fn=grad_fn" in str(info.value)


def test_fn_returning_a_python_float_without_grad_fn():
    """float() of a traced value raised JAX's bare ConcretizationTypeError from inside the
    check; with grad_fn the same fn is checked (evaluated eagerly)."""
    fn = lambda p: float(jnp.sum(jnp.sin(p)))  # noqa: E731
    with pytest.raises(TypeError) as info:
        jaxcheck.verify(fn, jnp.ones(3))
    assert str(info.value) == (
        "fn converts its inputs to Python numbers (float(), int() or .item() on a value "
        "computed from params), so jax cannot differentiate it: jax.grad needs fn written "
        "with jax.numpy. To check such a function, pass its hand-written gradient: "
        "verify(fn, params, *args, grad_fn=grad_fn)."
    )
    assert isinstance(info.value.__cause__, jax.errors.ConcretizationTypeError)
    assert jaxcheck.verify(fn, jnp.ones(3), grad_fn=jnp.cos).status == "pass"
    # Python control flow on values is not such a conversion: checked as usual
    branchy = lambda p: jnp.sum(p**2) if p[0] > 0 else jnp.sum(p)  # noqa: E731
    assert jaxcheck.verify(branchy, jnp.ones(3)).status == "pass"


def test_keyword_for_fn():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'x'") as info:
        jaxcheck.verify(lambda p, x: jnp.sum(p * x), jnp.ones(2), x=1.0)
    assert "verify(functools.partial(fn, x=...), params, *args)" in str(info.value)
    report = jaxcheck.verify(
        functools.partial(lambda p, x: jnp.sum(jnp.sin(p * x)), x=1.0), jnp.ones(2)
    )
    assert report.ok


def test_keyword_for_fn_that_looks_like_an_option():
    """fn takes `scale` and `step_size`: they are fn's keywords (bind them), not misspelt
    `localize` and `step`."""

    def loss(p, scale=1.0, step_size=1.0):
        return jnp.sum(p**2) * scale * step_size

    with pytest.raises(TypeError) as info:
        jaxcheck.verify(loss, jnp.ones(2), scale=2.0, step_size=0.5)
    text = str(info.value)
    assert "got unexpected keyword argument(s) 'scale', 'step_size';" in text
    assert "did you mean" not in text
    assert "verify(functools.partial(fn, scale=..., step_size=...), params, *args)" in text


def test_misspelt_option():
    with pytest.raises(
        TypeError, match=r"'num_direction' \(did you mean 'num_directions'\?\)"
    ) as info:
        jaxcheck.verify(_loss, jnp.ones(2), num_direction=8)
    assert "functools.partial" not in str(info.value)


@pytest.mark.parametrize("other, ours", [("seed", "key"), ("eps", "step"), ("tol", "rtol")])
def test_an_option_named_as_other_checkers_name_it_points_to_ours(other, ours):
    with pytest.raises(TypeError) as info:
        jaxcheck.verify(_loss, jnp.ones(2), **{other: 1e-3})
    text = str(info.value)
    assert f"unexpected keyword argument(s) '{other}' (did you mean '{ours}'?);" in text
    assert "functools.partial" not in text

    # a keyword fn takes itself is fn's, whatever other checkers call it
    def loss(p, seed=0, eps=0.0, tol=0.0):
        return _loss(p)

    with pytest.raises(TypeError, match=rf"functools.partial\(fn, {other}=...\)"):
        jaxcheck.verify(loss, jnp.ones(2), **{other: 1e-3})


@pytest.mark.parametrize(
    "key, what",
    [
        (np.array([0, 1], np.int64), "dtype int64 and shape (2,)"),
        (jnp.zeros(2, jnp.float32), "dtype float32 and shape (2,)"),
        (np.zeros(4, np.uint32), "dtype uint32 and shape (4,)"),
    ],
)
def test_wrong_key_arrays(key, what):
    with pytest.raises(TypeError, match="raw key data of dtype uint32 and shape") as info:
        jaxcheck.verify(_loss, jnp.ones(2), key=key)
    assert what in str(info.value)


def test_raw_uint32_key_data_is_accepted():
    report = jaxcheck.verify(_loss, jnp.linspace(0.1, 1.0, 3), key=jax.random.PRNGKey(0))
    assert report.ok


def test_raw_key_data_of_the_default_implementation_is_accepted():
    """Under `jax_default_prng_impl="rbg"`, jax.random.PRNGKey(0) is uint32[4]: it was
    refused with a message recommending jax.random.PRNGKey(0)."""
    before = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    try:
        key = jax.random.PRNGKey(0)
        assert key.shape == (4,)
        report = jaxcheck.verify(_loss, jnp.linspace(0.1, 1.0, 3), key=key)
        assert report.ok, str(report)
        with pytest.raises(TypeError, match=r"of dtype uint32 and shape \(4,\) \(jax.random"):
            jaxcheck.verify(_loss, jnp.ones(2), key=np.zeros(2, np.uint32))
    finally:
        jax.config.update("jax_default_prng_impl", before)


@dataclasses.dataclass
class _Unregistered:
    w: jax.Array


def test_unregistered_class_in_params_is_named_not_silently_held():
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: jnp.sum(p.w**2), _Unregistered(jnp.ones(2)))
    assert str(info.value).startswith(
        "params has no floating-point leaf to differentiate: (root) is a _Unregistered "
        "object, which JAX does not see into (its class is not a registered pytree). "
        "Register the class as a pytree"
    )
    params = {"a": jnp.ones(2), "b": _Unregistered(jnp.ones(2)), "mesh": np.array([object()])}
    report = jaxcheck.verify(lambda p: jnp.sum(p["a"] ** 2 * p["b"].w), params)
    assert report.status == "pass"
    assert report.problems == (
        "params leaf ['b'] is a _Unregistered object, which JAX does not see into (its class "
        "is not a registered pytree): its arrays were held fixed, not checked; register the "
        "class as a pytree to check them",
    )


@pytest.mark.parametrize(
    "aux",
    [lambda p, x: {"count": 1.0}, lambda p, x: jnp.mean(x), lambda p, x: jnp.argmax(p * x) * 1.0],
    ids=["constant", "of-args", "through-argmax"],
)
def test_a_second_output_without_derivative_suggests_has_aux(aux):
    x = jnp.arange(3.0)
    report = jaxcheck.verify(lambda p, x: (jnp.sum((p * x) ** 2), aux(p, x)), jnp.ones(3), x)
    assert report.status == "pass"
    assert report.problems == (
        "fn returns a pair whose second part does not depend on params (no derivative flows "
        "to it): if it is an auxiliary output, pass has_aux=True; it was checked as an output",
    )
    both = jaxcheck.verify(lambda p, x: (jnp.sum((p * x) ** 2), p * 2.0), jnp.ones(3), x)
    assert both.problems == ()


@pytest.mark.parametrize("which", ["fn", "grad_fn"])
def test_a_function_of_the_wrong_arity_is_told_how_it_is_called(which):
    """Python's own "takes 0 positional arguments but 1 was given", raised from inside
    jaxcheck, said nothing of how verify calls fn and grad_fn."""
    x = jnp.arange(3.0)
    if which == "fn":
        call = lambda: jaxcheck.verify(lambda: 1.0, jnp.ones(3))  # noqa: E731
        given = 1
    else:
        call = lambda: jaxcheck.verify(  # noqa: E731
            lambda q, x: jnp.sum(q * x), jnp.ones(3), x, grad_fn=lambda q: q
        )
        given = 2
    with pytest.raises(TypeError) as info:
        call()
    text = str(info.value)
    assert text.startswith(f"{which} was called as {which}(params, *args) with {given} positional")
    assert f"Define it as def {which}(params, *args)" in text


@pytest.mark.parametrize("packed", [tuple, list])
def test_extra_arguments_given_as_one_tuple_are_told_to_be_unpacked(packed):
    """verify(fn, params, (x, y)) for fn(params, x, y) was told to define fn as
    fn(params, *args), which it is."""

    def fn(p, x, y):
        return jnp.sum((x @ p - y) ** 2)

    x, y = jnp.ones((2, 3)), jnp.ones(2)
    with pytest.raises(TypeError) as info:
        jaxcheck.verify(fn, jnp.ones(3), packed((x, y)))
    assert str(info.value).endswith(
        f"missing 1 required positional argument: 'y'. The extra arguments were given as one "
        f"{packed.__name__} of 2, which fn takes as 2 arguments: pass them one by one, "
        "verify(fn, params, *args) (verify(fn, params, x, y), not verify(fn, params, (x, y)))."
    ), str(info.value)


def test_a_function_raising_a_type_error_itself_keeps_its_error():
    def fn(p):
        raise TypeError("my own error")

    with pytest.raises(TypeError, match="^my own error"):
        jaxcheck.verify(fn, jnp.ones(3))


@pytest.mark.parametrize("entry", ["verify", "check_grads"])
def test_an_error_inside_fn_keeps_its_type_and_verify_adds_what_it_passed(entry):
    """Params and data given in each other's place (`verify(loss, x, params)`) showed only
    JAX's error from deep inside fn; it is kept, with a note of what fn was given. JAX's
    check_grads passes f its arguments as given: nothing is added there."""
    params, x = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}, jnp.ones((5, 3))

    def loss(params, x):
        return jnp.mean((x @ params["w"] + params["b"]) ** 2)

    with pytest.raises(TypeError, match="JAX does not support string indexing") as info:
        if entry == "verify":
            jaxcheck.verify(loss, x, params)
        else:
            jaxcheck.check_grads(loss, (x, params), order=1)
    notes = getattr(info.value, "__notes__", [])
    if entry == "check_grads":
        assert not any("jaxcheck" in n for n in notes)
        return
    assert [n for n in notes if "jaxcheck" in n] == [
        "(raised inside fn, called by jaxcheck as fn(params, *args) with params = "
        "float32[5, 3] and args = ({'b': float32[2], 'w': float32[3, 2]},); params, the "
        "argument differentiated, comes first)"
    ]


def test_grad_fn_with_leaves_params_lack_is_refused():
    params = {"w": jnp.array([0.3, -0.7, 1.2]), "b": jnp.array(0.5)}

    def fn(q):
        return jnp.sum(jnp.sin(q["w"])) * q["b"]

    def grad_fn(q):
        return {"w": jnp.cos(q["w"]) * q["b"], "b": jnp.sum(jnp.sin(q["w"])), "c": 1.0}

    with pytest.raises(ValueError) as info:
        jaxcheck.verify(fn, params, grad_fn=grad_fn)
    assert str(info.value).startswith(
        "grad_fn returned leaves that match no parameter leaf: ['c']."
    )


def test_a_seed_beyond_64_bits_is_refused_clearly():
    with pytest.raises(ValueError, match=r"key must be an int seed in \[-2\*\*63, 2\*\*64\)"):
        jaxcheck.verify(_loss, jnp.ones(3), key=2**70)


def test_numpy_and_jax_scalars_as_options():
    """np.int64(2) was refused as "order must be an int >= 1, got np.int64(2)"."""
    x = jnp.linspace(0.1, 1.0, 3)
    report = jaxcheck.verify(
        _loss, x, order=np.int64(2), num_directions=np.int32(8), step=jnp.float32(1e-3)
    )
    assert report.ok, str(report)
    assert max(_report.order_of(p) or 0 for p in report.parts) == 2
    with pytest.raises(ValueError, match=r"order must be an int >= 1, got np.float64\(2.0\)"):
        jaxcheck.verify(_loss, x, order=np.float64(2.0))
    jaxcheck.check_grads(jnp.sin, (x,), 2.0)  # a float order, as JAX's check_grads takes


@pytest.mark.parametrize("seed", [jnp.int32(3), jnp.uint8(3), np.array(3)])
def test_a_jax_or_numpy_integer_scalar_is_the_seed_it_holds(seed):
    """jnp.int32(3) was refused ("got an array of dtype int32 and shape ()") where
    np.int64(3) was taken, and jax.random.key takes both; under a transfer guard too."""
    x = jnp.linspace(0.1, 1.0, 3)
    with jax.transfer_guard("disallow"):
        report = jaxcheck.verify(_loss, x, key=seed)
    np.testing.assert_array_equal(report.numeric, jaxcheck.verify(_loss, x, key=3).numeric)
    assert jaxcheck.verify_rule(jax.nn.softplus, x, key=seed).ok
    with pytest.raises(TypeError, match=r"got an array of dtype float32 and shape \(\)"):
        jaxcheck.verify(_loss, x, key=jnp.float32(3))


@pytest.mark.parametrize("keyword", ["holomorphic", "allow_int"])
def test_jax_grads_own_flags_are_said_to_be_needless(keyword):
    """holomorphic=True, a jax.grad habit, was told to be bound into fn with
    functools.partial, which fn does not take."""
    z = jnp.array([0.3 + 0.4j, -0.5 + 0.2j], jnp.complex64)
    with pytest.raises(TypeError, match=rf"'{keyword}' \(no flag is needed: ") as raised:
        jaxcheck.verify(lambda z: jnp.sum(z**2), z, **{keyword: True})
    assert "functools.partial" not in str(raised.value)
    with pytest.raises(TypeError, match=rf"'{keyword}' \(no flag is needed: "):
        jaxcheck.check_grads(jnp.sin, (1.0,), 1, **{keyword: True})


def test_verify_rule_names_the_option_meant_or_says_to_bind_fs_keywords():
    """verify_rule had Python's bare "unexpected keyword argument 'num_direction'"."""
    x = jnp.linspace(0.1, 1.0, 3)
    with pytest.raises(TypeError, match=r"'num_direction' \(did you mean 'num_directions'\?\)"):
        jaxcheck.verify_rule(jnp.sin, x, num_direction=4)
    with pytest.raises(TypeError) as info:
        jaxcheck.verify_rule(lambda x, scale=1.0: jnp.sin(x) * scale, x, scale=2.0)
    assert str(info.value).endswith(
        "bind keywords first, verify_rule(functools.partial(f, scale=...), *args)."
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: jaxcheck.verify(fn=_loss, params=jnp.ones(3)),
            "jaxcheck.verify got fn=, params= as keyword argument(s); fn, params, args are its "
            "positional arguments: call verify(fn, params, *args).",
        ),
        (
            lambda: jaxcheck.verify(_loss, jnp.ones(3), args=(jnp.ones(3),)),
            "jaxcheck.verify got args= as keyword argument(s); fn, params, args are its "
            "positional arguments: call verify(fn, params, *args).",
        ),
        (
            lambda: jaxcheck.Checker(_loss, params=jnp.ones(3)),
            "jaxcheck.Checker got params= as keyword argument(s); fn, params, args are its "
            "positional arguments: call Checker(fn, **options)(params, *args).",
        ),
    ],
)
def test_the_entry_points_own_arguments_given_as_keywords_are_told_to_be_positional(call, message):
    """They were taken for fn's keywords: "bind keywords first, verify(functools.partial(fn,
    fn=..., params=...), params, *args)"."""
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == message


def test_a_leaf_cut_off_by_stop_gradient_is_said_so():
    """A hyperparameter in params (equinox's dropout rate) reaches fn through
    stop_gradient: jax.grad says 0, finite differences do not. The failure says why and
    what to do; a leaf wrong in another way does not get that note."""

    def fn(p):
        keep = 1.0 - jax.lax.stop_gradient(p["rate"])
        return jnp.sum(jnp.sin(p["w"]) * keep)

    params = {"rate": jnp.asarray(0.3), "w": jnp.linspace(0.1, 1.0, 5)}
    report = jaxcheck.verify(fn, params)
    assert report.status == "fail"
    assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["['rate']"]
    assert (
        "['rate']: the derivative under test is exactly zero for this leaf while fn changes "
        "with it: a jax.lax.stop_gradient (or a custom rule returning zeros, a value passed "
        "in a custom_jvp/custom_vjp's nondiff_argnums, which JAX does not differentiate, a "
        "cast to an integer, or .item() on a value computed from params) cuts it off; so "
        "does a rule at a point where it takes the derivative 0 (abs of a complex 0: JAX's "
        "second derivative of abs(z)**2 there is 0, not 2). If it is meant to "
        "be held fixed (a hyperparameter such as a dropout rate), pass it to fn as an "
        "argument or leave it out of params (equinox: eqx.partition(model, "
        "eqx.is_inexact_array)); if not, that is the bug"
    ) in report.problems
    grad = jax.grad(lambda p: jnp.sum(jnp.sin(p["w"]) * (1.0 - p["rate"])))
    wrong = jaxcheck.verify(fn, params, grad_fn=lambda p: {**grad(p), "w": 1.01 * grad(p)["w"]})
    assert [leaf.path for leaf in wrong.leaves if leaf.status == "fail"] == ["['w']"]
    assert not any("exactly zero" in q for q in wrong.problems), wrong.problems


@pytest.mark.parametrize("key", [2**63, 2**64 - 1, np.uint64(2**63)])
def test_int_seeds_above_int64_are_taken_as_their_64_bits(key):
    """The range the key error names, [-2**63, 2**64), ended in JAX's OverflowError."""
    fn = lambda p: jnp.sum(jnp.sin(p) ** 2)  # noqa: E731
    report = jaxcheck.verify(fn, jnp.linspace(0.1, 1.0, 3), key=key)
    signed = jaxcheck.verify(fn, jnp.linspace(0.1, 1.0, 3), key=int(key) - 2**64)
    assert report.status == "pass"
    np.testing.assert_array_equal(report.numeric, signed.numeric)


def test_item_on_a_value_computed_from_params_is_named_among_the_causes():
    # eagerly, JAX's derivative drops what .item() turns into a Python number (float()
    # raises instead); the check fails, and says what can cut a leaf off
    report = jaxcheck.verify(lambda q: jnp.sum(q**2).item(), jnp.asarray([0.3, -0.7, 1.1]))
    assert report.status == "fail"
    (line,) = [q for q in report.problems if "exactly zero" in q]
    assert "or .item() on a value computed from params) cuts it off" in line


def test_a_rule_taking_the_derivative_zero_at_the_point_is_named_among_the_causes():
    """JAX differentiates abs of a complex 0 as 0, so its second derivative of abs(z)**2
    at z = 0 is 0 where it is 2 (the real abs has it right). The failure is real; the
    note named only stop_gradient and custom rules, which fn does not have."""
    report = jaxcheck.verify(
        lambda z: jnp.sum(jnp.abs(z) ** 2), jnp.zeros(3, jnp.complex64), order=2
    )
    assert report.status == "fail"
    assert report.parts[-1].label == "order 2: Hessian-vector products"
    (line,) = [q for q in report.problems if "exactly zero" in q]
    assert "(abs of a complex 0: JAX's second derivative of abs(z)**2 there is 0, not 2)" in line


def test_a_report_has_no_truth_value_and_compares_by_identity():
    """`assert jaxcheck.verify(...)` passed a failing report; `==` of two reports raised
    NumPy's ambiguous truth value, and hash() refused their arrays."""
    import copy

    report = jaxcheck.verify(lambda p: jnp.sum(p**2), jnp.ones(3), grad_fn=lambda p: 3 * p)
    assert report.status == "fail"
    with pytest.raises(TypeError, match=r"has no truth value: use report\.ok \(True only"):
        assert report
    assert report == report and report != copy.deepcopy(report)
    assert hash(report) == hash(report)


def test_periodic_check_steps_out_of_order_and_a_root_leaf():
    """After a restart the steps came back 5, 1: the first failure said 5, not 1; a failing
    single-array params was named '' in the history."""

    def loss(w):
        return jnp.sum(jnp.sin(w) ** 2)

    check = jaxcheck.PeriodicCheck(loss, every=1, grad_fn=lambda w: 3 * jnp.sin(w) * jnp.cos(w))
    for step in (5, 1):
        check(step, jnp.linspace(0.1, 1.0, 3))
    assert check.first_failure == 1
    assert (
        str(check)
        .splitlines()[0]
        .startswith("PeriodicCheck(every=1): 2 checks, first failure at step 1")
    )
    assert check.history[0].failing == ("(root)",)
    with pytest.raises(TypeError, match=r"training_seconds must be a number of seconds, got str"):
        check.cost_fraction("10")


@pytest.mark.parametrize("params", ["my_model", None, {}])
def test_gradient_health_init_refuses_what_is_not_parameters(params):
    with pytest.raises(TypeError, match=r"init takes the parameters being trained .* no array"):
        jaxcheck.gradient_health().init(params)


@pytest.mark.parametrize(
    ("leaf", "said"),
    [(jnp.tanh, "['act'] is PjitFunction"), ("layer1", "['act'] is str 'layer1'")],
)
def test_gradient_health_init_names_a_leaf_that_is_not_an_array(leaf, said):
    """A function or a string beside the arrays (an equinox Module's callable fields) gave
    JAX's "Value ... is not a valid JAX array type" from inside init."""
    with pytest.raises(TypeError) as info:
        jaxcheck.gradient_health().init({"w": jnp.ones(3), "act": leaf})
    text = str(info.value)
    assert text.startswith(f"gradient_health: params leaf {said}"), text
    assert "not an array: it has no gradient to watch" in text
    assert "opt.init(eqx.filter(model, eqx.is_inexact_array))" in text


def test_health_of_a_single_array_names_it_root():
    """The leaf column of a flagged single-array params was blank."""
    opt = jaxcheck.gradient_health()
    state = opt.init(jnp.ones(3))
    _, state = opt.update(jnp.array([jnp.nan, 1.0, 1.0]), state, jnp.ones(3))
    rows = str(jaxcheck.health(state)).splitlines()
    assert rows[2].split()[:2] == ["(root)", "non-finite"], rows


@pytest.mark.parametrize(
    "args, expected",
    [
        (("abc",), "verify_rule: args[0] is a str ('abc'), not an array or a number."),
        (
            (jnp.ones(2), {"scale": object}),
            "verify_rule: args[1]['scale'] is a type (<class 'object'>), not an array or a number.",
        ),
    ],
)
def test_verify_rule_names_an_input_that_is_not_an_array(args, expected):
    """A string input crashed with JAX's "Value 'abc' with dtype <U3 is not a valid JAX
    array type" from inside jaxcheck."""
    with pytest.raises(TypeError) as caught:
        jaxcheck.verify_rule(lambda x, *rest: jnp.sin(x), *args)
    assert str(caught.value).startswith(expected)
    assert str(caught.value).endswith(
        "pass other values through nondiff_argnums or close over them (functools.partial)."
    )


def test_verify_rule_keeps_non_arrays_at_nondiff_positions():
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def scaled(x, how):
        return jnp.sin(x) * (2.0 if how == "double" else 1.0)

    def fwd(x, how):
        return scaled(x, how), x

    def bwd(how, x, g):
        return (g * jnp.cos(x) * (2.0 if how == "double" else 1.0),)

    scaled.defvjp(fwd, bwd)
    report = jaxcheck.verify_rule(scaled, jnp.linspace(-1.0, 1.0, 4), "double")
    assert report.ok, str(report)


def test_verify_rule_on_empty_inputs_says_there_is_nothing_to_check():
    """Empty inputs were a FAIL with relative error inf and an inner ValueError as a note."""
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify_rule(jnp.sin, jnp.zeros((0, 3)))
    assert str(caught.value) == (
        "verify_rule: every floating-point input of f is empty (shapes: (0, 3)): there is "
        "nothing to check. Pass inputs with at least one element."
    )


def test_grad_with_aux_as_grad_fn_is_told_apart():
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    grad_fn = jax.grad(lambda p: (loss(p), {"loss": loss(p)}), has_aux=True)
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify(loss, {"w": jnp.ones(3)}, grad_fn=grad_fn)
    assert str(caught.value).endswith(
        "(found leaves: [0]['w'], [1]['loss']). It returned a pair whose first part holds "
        "the gradient: a (gradient, aux) pair, as jax.grad(..., has_aux=True) returns? "
        "grad_fn must return the gradient alone: pass `lambda p: grad_fn(p)[0]`."
    )


@pytest.mark.parametrize(
    "params, found",
    [((jnp.ones(3), jnp.ones(3)), "[0][0], [0][1], [0][2]"), (jnp.ones(2), "[0], [1]")],
    ids=["tuple", "array"],
)
def test_a_gradient_returned_as_python_lists_is_told_so(params, found):
    """grad_fn returning .tolist() of each gradient leaf was told it returned a (gradient,
    aux) pair, and to pass grad_fn(p)[0], which was wrong."""
    loss = lambda p: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(p))  # noqa: E731
    grad_fn = lambda p: jax.tree.map(lambda g: g.tolist(), jax.grad(loss)(p))  # noqa: E731
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify(loss, params, grad_fn=grad_fn)
    assert str(caught.value).endswith(
        f"It returned Python numbers in a list or tuple where the parameter is an array "
        f"({found}): return an array for each parameter leaf (jnp.asarray(...), not "
        ".tolist()), as jax.grad(fn) does."
    ), str(caught.value)


@pytest.mark.parametrize(
    "params, grad_fn, found, part",
    [
        # one array: both parts of the pair have a leaf at its (root) path
        (jnp.ones(3), lambda q: (2 * q, 1.0), "[0], [1]", "first part holds the gradient"),
        (jnp.ones(3), lambda q: (2 * q, jnp.zeros(5)), "[0], [1]", "first part holds"),
        (jnp.ones(3), lambda q: (jnp.sum(q**2), 2 * q), "[0], [1]", "second part holds"),
        # a scalar: the two pairs look alike
        (jnp.float32(1.0), lambda q: (q**2, 2 * q), "[0], [1]", "It returned a pair: a (value"),
    ],
    ids=["grad-aux", "grad-array-aux", "value-grad", "scalar"],
)
def test_a_pair_for_one_array_params_is_told_apart(params, grad_fn, found, part):
    """The (gradient, aux) pair of a single-array params was taken for a (value, gradient)
    pair: both parts have a leaf at the root path."""
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify(lambda q: jnp.sum(q**2), params, grad_fn=grad_fn)
    message = str(caught.value)
    assert "no gradient for the parameter leaf (root). It must return a pytree with the " in (
        message
    )
    assert f"(found leaves: {found})." in message
    assert part in message
    fix = {"first": "grad_fn(p)[0]`.", "second": "grad_fn(p)[1]`.", "It returned": "[0]`."}
    assert message.endswith(next(v for k, v in fix.items() if k in part)), message


@pytest.mark.parametrize(
    "keywords, hint",
    [
        (
            {"rtol": 1e-3},
            "rtol is an option of the check, fixed when the checker is made: pass rtol=... to "
            "Checker(fn, ...), or make a second checker for other values.",
        ),
        (
            {"scale": 2.0},
            "fn's keyword arguments cannot be passed through a checker: close over them "
            "(functools.partial) or pass them positionally.",
        ),
    ],
)
def test_checker_call_with_keywords_says_where_they_go(keywords, hint):
    """`Checker(f)(p, rtol=...)` got Python's bare "unexpected keyword argument 'rtol'"."""
    checker = jaxcheck.Checker(lambda p: jnp.sum(p**2))
    with pytest.raises(TypeError) as caught:
        checker(jnp.ones(3), **keywords)
    name = next(iter(keywords))
    assert str(caught.value) == (
        f"a Checker is called as checker(params, *args); it got keyword arguments {name}. {hint}"
    )


@pytest.mark.parametrize(
    "near, got",
    [(None, "NoneType"), (np.ones(2), "arrays of shapes [(2,)]")],
    ids=["none", "vector"],
)
def test_numpy_fn_whose_output_changes_near_params_is_told_so(near, got):
    """A NumPy fn returning None (a domain guard) at a perturbed point crashed with a bare
    IndexError from inside jaxcheck."""

    def fn(x):
        x = np.asarray(x)
        return near if np.any(x < 0.999999) else float(np.sum(x**2))

    x = np.ones(2, np.float32)
    with pytest.raises(ValueError) as caught:
        jaxcheck.verify(fn, x, grad_fn=lambda x: 2 * np.asarray(x))
    assert str(caught.value).startswith(
        f"fn returned {got} at a point near params (params + t v, t a finite-difference step), "
        "where at params it returned shapes [()]: fn must return the same structure of arrays "
        "at every point near params"
    )
    np.testing.assert_array_equal(x, np.ones(2))


@pytest.mark.parametrize("call", ["verify", "Checker"])
def test_a_checker_given_as_fn_is_told_to_pass_the_function(call):
    """A Checker as fn was called on traced values and told that verify cannot run inside
    jax.jit, though the user called no transformation."""
    checker = jaxcheck.Checker(lambda p: jnp.sum(jnp.sin(p)))
    where = "verify(fn, params)" if call == "verify" else "Checker(fn, **options)"
    with pytest.raises(TypeError) as caught:
        if call == "verify":
            jaxcheck.verify(checker, jnp.ones(3))
        else:
            jaxcheck.Checker(checker)
    assert str(caught.value) == (
        f"fn is a jaxcheck.Checker, a check of a function, not a function to check: in {where} "
        "pass the loss function itself (checker.fn), or call the checker as "
        "checker(params, *args)."
    )
    assert checker(jnp.ones(3)).ok  # the checker itself is unharmed


def test_a_failure_without_custom_rules_points_at_what_cuts_the_derivative():
    """A TD-style target held fixed by stop_gradient fails (fn's derivative is not the one
    JAX computes); with no custom rule in fn, the advice said only to check custom rules."""

    def loss(p):
        q = jnp.tanh(p)
        target = 0.5 + 0.9 * jax.lax.stop_gradient(jnp.roll(q, 1))
        return jnp.mean((q - target) ** 2)

    report = jaxcheck.verify(loss, jnp.linspace(-1.0, 1.0, 6))
    assert report.status == "fail", str(report)
    assert str(report).endswith(
        "if none does, look on their path for what JAX's derivative leaves out or bends (a "
        "jax.lax.stop_gradient, as in a target held fixed, a cast to an integer, a callback). "
        "If you believe fn itself is not smooth here, try another point or key."
    )


def test_fn_reading_state_that_changes_between_traces_is_pointed_at():
    """fn scaled by a call counter is another function each time it is traced: the float32
    gradient and the float64 reference disagree, and the report names that cause too."""
    calls = {"n": 0.0}

    def fn(p, x):
        calls["n"] += 1.0
        return jnp.sum(jnp.sin(x @ p["w"])) * (1 + 1e-3 * calls["n"])

    x = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3)
    report = jaxcheck.verify(fn, {"w": jnp.full((3, 2), 1 / 3, jnp.float32)}, x)
    assert report.status == "fail", str(report)
    assert any(
        "if fn reads Python state that changes from call to call (a counter, a global), each "
        "trace of it is another function: make it a function of params and args alone" in q
        for q in report.problems
    ), report.problems


def test_fn_mutating_an_array_it_closes_over_is_not_passed_on_the_gap():
    """Each trace of fn captures the array as it is then: the float32 gradient is off the
    float64 rule by 28 %, which the float32 differences (traced once more) cannot judge
    either. That gap was taken for rounding, with a tolerance of 55 %, and passed."""
    data = np.ones(4, np.float32)

    def fn(p):
        data[0] += 1.0
        return jnp.sum(p * data)

    report = jaxcheck.verify(fn, jnp.linspace(0.1, 1.0, 4))
    assert report.status == "inconclusive", str(report)
    assert report.checks[0].relative_error == pytest.approx(0.28, abs=0.01)
    assert report.problems[0].startswith(
        "fn is another program in float32 than in float64 (a branch on the dtype, a constant "
        "of jnp.finfo, Python state that changes from trace to trace?), and its float32 "
        "derivative differs from the one in float64 by 2.8e-01 (relative)"
    ), report.problems
    assert report.problems[0].endswith(
        "finite differences in float32 could not judge that path here, and a gap beyond "
        "1e-01 is not taken for rounding: not judged; check the float32 path at a "
        "better-conditioned point, or alone"
    ), report.problems


def test_a_donated_params_leaf_is_named():
    params = {"w": jnp.ones(3), "b": jnp.ones(3)}
    params["b"].delete()  # as donating it to a jitted step does
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(lambda p: jnp.sum(jnp.sin(p["w"]) * p["b"]), params)
    assert str(info.value).startswith(
        "The params leaf ['b'] is an array that has been deleted (donated to a jax.jit "
        "function with donate_argnums, say, or deleted with .delete()): its buffer is gone. "
        "Pass the arrays that function returned instead."
    )
    assert not params["w"].is_deleted()


@pytest.mark.parametrize("where", ["params", "args"])
def test_a_shape_dtype_struct_leaf_is_named(where):
    """fn failed on it deep inside the check: "unsupported operand type(s) for +"."""
    abstract = jax.ShapeDtypeStruct((3,), jnp.float32)
    params = {"w": jnp.ones(3), "s": abstract} if where == "params" else {"w": jnp.ones(3)}
    args = (jnp.ones(3),) if where == "params" else (abstract,)
    with pytest.raises(TypeError) as info:
        jaxcheck.verify(lambda p, x: jnp.sum(p["w"] * x), params, *args)
    leaf = "['s']" if where == "params" else "[0]"
    assert str(info.value) == (
        f"The {where} leaf {leaf} is a jax.ShapeDtypeStruct (float32[3]): a shape and dtype "
        "without values, which fn cannot compute with. Pass an array, say "
        "jnp.zeros(s.shape, s.dtype) or the model's initialized parameters."
    )


@pytest.mark.parametrize("check", ["verify", "Checker"])
@pytest.mark.parametrize("where", ["args", "params"])
def test_an_iterator_among_the_inputs_is_refused_before_it_runs_out(where, check):
    def batches():
        while True:
            yield jnp.ones(3)

    def loss(p, b):
        return jnp.sum(p["w"] * next(p["data"] if where == "params" else b))

    params = {"w": jnp.ones(3)}
    if where == "params":
        params["data"] = batches()
        args = (None,)
        path = "params['data']"
    else:
        args = (batches(),)
        path = "args[0]"
    with pytest.raises(TypeError) as err:
        if check == "verify":
            jaxcheck.verify(loss, params, *args)
        else:
            jaxcheck.Checker(loss)(params, *args)
    assert str(err.value) == (
        f"{path} is an iterator (generator): a check traces and evaluates fn many times, and "
        "an iterator gives other values at each call, then runs out. Pass the values "
        "themselves (an array, or a list(...) of them)."
    )


@pytest.mark.parametrize("entry", ["verify", "check_grads", "Checker"])
def test_a_dict_of_keys_jax_cannot_sort_is_named(entry):
    """JAX flattens a dict in the order of its sorted keys, and of "a" beside 1 it said only
    that its comparator raised, naming no dict."""
    x = jnp.ones(2)
    params = {"a": x, "b": {"w": x, 1: x}}
    loss = lambda p: jnp.sum(p["a"] ** 2)  # noqa: E731
    where = "params['b']"
    with pytest.raises(ValueError) as info:
        if entry == "verify":
            jaxcheck.verify(loss, params)
        elif entry == "Checker":
            jaxcheck.Checker(loss)(params)
        else:
            where = "check_grads: args[0]['b']"
            jaxcheck.check_grads(loss, (params,), 1)
    assert str(info.value) == (
        f"{where} is a dict whose keys are of several types (int, str: 'w', 1), which JAX, "
        "flattening it in the order of its sorted keys, cannot order. Use keys of one type "
        "(all strings, say)."
    )


def test_a_dict_jax_cannot_sort_is_found_through_a_namedtuple_or_left_to_jax():
    """Inside a namedtuple the dict is named as JAX names the field; inside a pytree node
    of another kind the dict is not found, and JAX's own error stands (not a message with
    no keys in it)."""
    x = jnp.ones(2)
    pair = collections.namedtuple("Pair", "w rest")
    loss = lambda p: jnp.sum(x)  # noqa: E731
    with pytest.raises(ValueError) as info:
        jaxcheck.verify(loss, pair(x, {"v": x, 3: x}))
    assert str(info.value).startswith(
        "params.rest is a dict whose keys are of several types (int, str: 'v', 3)"
    )

    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class Box:
        d: dict

    with pytest.raises(ValueError, match="sort") as info:
        jaxcheck.verify(loss, Box({"v": x, 3: x}))
    assert "is a dict whose keys" not in str(info.value)


def test_a_given_step_leaving_fns_domain_is_named_as_the_cause():
    """With step=0.5, log's stencil leaves its domain: "nonfinite" blamed "an element far
    smaller than its leaf's RMS", and not the step the caller gave, which is kept."""
    report = jaxcheck.verify(lambda p: jnp.sum(jnp.log(p)), jnp.array([0.3, 0.7, 1.1]), step=0.5)
    assert report.status == "nonfinite", str(report)
    assert (
        "the step was given (step=0.5), and a given step is kept: where fn is not finite "
        "within it from params, pass a smaller step, or none (the ladder then shrinks its "
        "step to stay inside fn's domain)"
    ) in report.problems
    assert jaxcheck.verify(lambda p: jnp.sum(jnp.log(p)), jnp.array([0.3, 0.7, 1.1])).ok


def test_an_option_fn_takes_too_is_said_to_have_gone_to_the_check():
    """verify(loss, p, x, key=k) for a loss(p, x, key=None) drawing dropout from its key:
    key= is the check's option, and fn was checked without dropout, silently. The report
    says so (fn's own keyword filled positionally is no collision)."""

    def loss(p, x, key=None):
        h = jnp.tanh(x @ p)
        if key is not None:
            h = h * jax.random.bernoulli(key, 0.5, h.shape)
        return jnp.mean(h**2)

    p, x = jnp.full((3, 2), 0.3), jnp.linspace(-1, 1, 12).reshape(4, 3)
    said = (
        "key= went to the check as its option, not to fn, whose own keyword argument of that "
        "name was left at its default: to pass it to fn, bind it first, "
        "functools.partial(fn, key=...)"
    )
    report = jaxcheck.verify(loss, p, x, key=jax.random.key(7))
    assert report.problems[0] == said
    assert jaxcheck.Checker(loss, key=jax.random.key(7))(p, x).problems[0] == said
    fixed = jaxcheck.verify(loss, p, x, jax.random.key(3), key=jax.random.key(7))
    assert said not in fixed.problems
    assert said not in jaxcheck.verify(loss, p, x).problems


@pytest.mark.parametrize("step", [1e-12, 0.5])
def test_a_given_step_too_noisy_to_resolve_says_so(step):
    """step=1e-12 (roundoff) or 0.5 (truncation) raised the tolerance to 2e-4 to 3e-4, and
    a rule 2e-4 off passed without a word; the default steps fail it. The report now says
    what the given step cost."""

    @jax.custom_vjp
    def s(x):
        return jnp.sin(x)

    s.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (1.0002 * jnp.cos(x) * g,))
    f = lambda w, x: jnp.sum(s(w * x))  # noqa: E731
    w, x = jnp.array([0.3, -0.7, 1.1]), jnp.array([0.5, 1.5, 2.5])
    assert jaxcheck.verify(f, w, x).status == "fail"
    report = jaxcheck.verify(f, w, x, step=step)
    assert report.tolerance > 1e-4, str(report)
    [said] = [q for q in report.problems if q.startswith(f"step={step:g} was given")]
    assert f"raised the tolerance to {report.tolerance:.1e}" in said
    assert said.endswith(
        "leave step unset for the check to choose steps that resolve the derivative finely"
    )
    fine = jaxcheck.verify(f, w, x, step=1e-3)
    assert fine.status == "fail" and not any(q.startswith("step=") for q in fine.problems)
